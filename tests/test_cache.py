"""KVCache: bookkeeping against a list-based model, attention equivalences, sinks, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import ops
from tokentrim.cache import KVCache

L, B, H, D, TPF = 2, 2, 2, 4, 3


def make(batch=B, max_frames=5, sink_frames=0, **kw) -> KVCache:
    return KVCache(L, batch, H, D, TPF, max_frames, sink_frames=sink_frames, **kw)


def rand_block(gen, cache: KVCache, frames: int):
    """Random per-layer (k, v) for a block: two [L, B, T, H, D] tensors."""
    shape = (cache.num_layers, cache.batch, frames * cache.tokens_per_frame, cache.num_heads, cache.head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def write_block(cache: KVCache, k, v, k_raw=None):
    for layer in range(cache.num_layers):
        cache.write(layer, k[layer], v[layer], None if k_raw is None else k_raw[layer])


def explicit_attention(q, keys, vals):
    """q [Lq,H,D], keys/vals [n,H,D] -> [Lq,H,D] in float64; zeros when n == 0."""
    if keys.shape[0] == 0:
        return torch.zeros(q.shape, dtype=torch.float64)
    s = torch.einsum("qhd,khd->hqk", q.double(), keys.double()) * q.shape[-1] ** -0.5
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vals.double())


class ListCache:
    """The specification: per video a python list of [frame, pos, k [L,H,D], v [L,H,D], kept]."""

    def __init__(self, batch, sink_frames, max_frames, tpf):
        self.entries = [[] for _ in range(batch)]
        self.frames: list[int] = []
        self.sink, self.max, self.tpf = sink_frames, max_frames, tpf
        self.pending = None

    def prepare(self, n):
        extra = len(self.frames) + n - self.max
        if extra > 0:
            gone = set(self.frames[self.sink : self.sink + extra])
            self.frames = [f for f in self.frames if f not in gone]
            self.entries = [[e for e in ent if e[0] not in gone] for ent in self.entries]

    def commit(self, frame_start, n):
        k, v = self.pending
        for b, ent in enumerate(self.entries):
            for t in range(n * self.tpf):
                ent.append([frame_start + t // self.tpf, t % self.tpf, k[:, b, t], v[:, b, t], True])
        self.frames += list(range(frame_start, frame_start + n))

    def prune(self, b, positions, frames):
        frames = set(self.frames[self.sink :] if frames is None else frames)
        for e in self.entries[b]:
            if e[1] in positions and e[0] in frames:
                e[4] = False

    def compact(self):
        self.entries = [[e for e in ent if e[4]] for ent in self.entries]

    def unprune(self):
        for ent in self.entries:
            for e in ent:
                e[4] = True


def check_against(cache: KVCache, model: ListCache):
    assert cache.frames == model.frames
    assert cache.length.dtype == torch.int32
    for b, ent in enumerate(model.entries):
        n = len(ent)
        assert int(cache.length[b]) == n
        assert cache.token_frame[b, :n].tolist() == [e[0] for e in ent]
        assert cache.token_pos[b, :n].tolist() == [e[1] for e in ent]
        assert cache.keep[b, :n].tolist() == [e[4] for e in ent]
        assert not cache.keep[b, n:].any()
        assert (cache.token_frame[b, n:] == -1).all() and (cache.token_pos[b, n:] == -1).all()
        if n:
            assert torch.equal(cache.kv[:, 0, b, :n], torch.stack([e[2] for e in ent], dim=1))
            assert torch.equal(cache.kv[:, 1, b, :n], torch.stack([e[3] for e in ent], dim=1))


# ------------------------------------------------------------------------------------ bookkeeping
def test_write_commit_attend_len_bookkeeping():
    gen = torch.Generator().manual_seed(0)
    cache = make(max_frames=6)
    assert cache.capacity == 18 and cache.length.tolist() == [0, 0]
    k1, v1 = rand_block(gen, cache, 2)
    k2, v2 = rand_block(gen, cache, 2)
    write_block(cache, k1, v1)
    write_block(cache, k2, v2)  # a second denoising step overwrites the same slots
    assert cache.length.tolist() == [0, 0], "write must not advance length"
    assert cache.attend_len(6).tolist() == [6, 6] and cache.attend_len(6).dtype == torch.int32
    assert torch.equal(cache.kv[:, 0, :, :6], k2) and torch.equal(cache.kv[:, 1, :, :6], v2)
    assert cache.keep[:, :6].all() and not cache.keep[:, 6:].any()
    cache.commit(0, 2)
    assert cache.length.tolist() == [6, 6] and cache.frames == [0, 1]
    assert cache.token_frame[0, :6].tolist() == [0, 0, 0, 1, 1, 1]
    assert cache.token_pos[1, :6].tolist() == [0, 1, 2, 0, 1, 2]
    k3, v3 = rand_block(gen, cache, 1)
    write_block(cache, k3, v3)
    assert torch.equal(cache.kv[:, 0, :, 6:9], k3) and torch.equal(cache.kv[:, 0, :, :6], k2)
    assert cache.attend_len(3).tolist() == [9, 9]
    cache.commit(5, 1)  # gaps in absolute frame indices are allowed
    assert cache.frames == [0, 1, 5] and cache.token_frame[1, 6:9].tolist() == [5, 5, 5]
    assert torch.equal(cache.k(1), cache.kv[1, 0]) and torch.equal(cache.v(0), cache.kv[0, 1])
    cache.reset()
    assert cache.length.tolist() == [0, 0] and cache.frames == [] and not cache.keep.any()
    assert (cache.token_frame == -1).all()


def test_writes_follow_per_video_lengths():
    """After compaction videos have different lengths; a write lands at each video's own length."""
    gen = torch.Generator().manual_seed(1)
    cache = make(max_frames=4)
    k, v = rand_block(gen, cache, 2)
    write_block(cache, k, v)
    cache.commit(0, 2)
    cache.prune(1, torch.tensor([0, 2]))
    cache.compact()
    assert cache.length.tolist() == [6, 2]
    k2, v2 = rand_block(gen, cache, 1)
    write_block(cache, k2, v2)
    assert torch.equal(cache.kv[:, :, 0, 6:9], torch.stack([k2[:, 0], v2[:, 0]], 1))
    assert torch.equal(cache.kv[:, :, 1, 2:5], torch.stack([k2[:, 1], v2[:, 1]], 1))
    assert cache.attend_len(3).tolist() == [9, 5]


def test_prune_then_masked_attention_equals_attention_over_kept_keys():
    gen = torch.Generator().manual_seed(2)
    cache = make(batch=3, max_frames=6, sink_frames=1)
    written = []
    for f in range(3):
        k, v = rand_block(gen, cache, 1)
        cache.prepare(1)
        write_block(cache, k, v)
        cache.commit(f, 1)
        written.append((k, v))
    # video 0 untouched; video 1 every non-sink frame; video 2 only frame 1, incl. an out-of-range pos
    cache.prune(1, torch.tensor([0, 2]))
    cache.prune(2, torch.tensor([1, 7, -1]), frames=[1])
    pruned = {0: set(), 1: {(1, 0), (1, 2), (2, 0), (2, 2)}, 2: {(1, 1)}}
    kb, vb = rand_block(gen, cache, 2)  # the block being generated attends to the cache and itself
    write_block(cache, kb, vb)
    q = torch.randn(3, 5, H, D, generator=gen)
    for layer in range(L):
        out = ops.masked_attention(q, cache.k(layer), cache.v(layer), cache.keep, cache.attend_len(6))
        for b in range(3):
            kept = [(f, p) for f in range(3) for p in range(TPF) if (f, p) not in pruned[b]]
            keys = torch.stack([written[f][0][layer, b, p] for f, p in kept] + list(kb[layer, b]))
            vals = torch.stack([written[f][1][layer, b, p] for f, p in kept] + list(vb[layer, b]))
            want = explicit_attention(q[b], keys, vals)
            torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-6)


def test_prune_all_and_unprune_all():
    gen = torch.Generator().manual_seed(3)
    cache = make(max_frames=4, sink_frames=1)
    k, v = rand_block(gen, cache, 3)
    write_block(cache, k, v)
    cache.commit(0, 3)
    cache.prune(0, torch.arange(TPF))
    assert cache.keep[0, :3].all(), "sink frame must not be pruned by frames=None"
    assert not cache.keep[0, 3:9].any() and cache.keep[1, :9].all()
    assert cache.kept_count().tolist() == [3, 9]
    cache.unprune_all()
    assert cache.keep[:, :9].all() and not cache.keep[:, 9:].any()


# -------------------------------------------------------------------------------------- eviction
def test_rolling_eviction_keeps_sinks_and_absolute_keys():
    gen = torch.Generator().manual_seed(4)
    cache = make(max_frames=5, sink_frames=2)
    keys = {}
    for f in range(9):
        evicted = cache.prepare(1)
        expect_evicted = [f - 3] if f >= 5 else []
        assert evicted == expect_evicted, "the oldest non-sink frame goes first"
        k, v = rand_block(gen, cache, 1)
        write_block(cache, k, v)
        cache.commit(f, 1)
        keys[f] = k
    assert cache.frames == [0, 1, 6, 7, 8]
    assert cache.length.tolist() == [15, 15]
    assert cache.token_frame[0].tolist() == [f for f in [0, 1, 6, 7, 8] for _ in range(TPF)]
    for i, f in enumerate(cache.frames):  # stored keys are the written ones: nothing re-rotated
        assert torch.equal(cache.kv[:, 0, :, i * TPF : (i + 1) * TPF], keys[f])
    # a two-frame block evicts the two oldest non-sink frames at once
    assert cache.prepare(2) == [6, 7]
    assert cache.frames == [0, 1, 8] and cache.token_frame[1, :9].tolist() == [0] * 3 + [1] * 3 + [8] * 3
    assert torch.equal(cache.kv[:, 0, :, 6:9], keys[8])


def test_eviction_preserves_prune_state_of_survivors():
    gen = torch.Generator().manual_seed(5)
    cache = make(max_frames=3, sink_frames=1)
    k, v = rand_block(gen, cache, 3)
    write_block(cache, k, v)
    cache.commit(0, 3)
    cache.prune(0, torch.tensor([1]), frames=[2])
    assert cache.prepare(1) == [1]
    assert cache.length.tolist() == [6, 6]
    assert cache.keep[0, :6].tolist() == [True] * 4 + [False, True]
    assert cache.keep[1, :6].all()
    cache.unprune_all()
    assert cache.keep[0, :6].all() and torch.equal(cache.kv[:, 0, 0, 3:6], k[:, 0, 6:9])


def test_prepare_errors_when_sink_plus_block_exceeds_capacity():
    cache = make(max_frames=5, sink_frames=3)
    with pytest.raises(ValueError, match="num_new_frames"):
        cache.prepare(3)
    with pytest.raises(TypeError, match="num_new_frames"):
        cache.prepare(1.0)


# ------------------------------------------------------------------------------------ compaction
def _compact_backends():
    yield "reference"
    has_kernel = importlib.util.find_spec("tokentrim.kernels.kv_compact") is not None
    yield pytest.param(
        "triton", marks=pytest.mark.skipif(not has_kernel, reason="kernels/kv_compact.py not available")
    )


@pytest.mark.parametrize("backend", list(_compact_backends()))
def test_compaction_after_prune_keeps_attention_and_shrinks_lengths(backend):
    gen = torch.Generator().manual_seed(6)
    cache = make(batch=3, max_frames=7, sink_frames=1, backend=backend)
    k, v = rand_block(gen, cache, 5)
    write_block(cache, k, v)
    cache.commit(0, 5)
    cache.prune(0, torch.tensor([0, 1, 2]), frames=[2, 4])  # whole frames
    cache.prune(1, torch.tensor([2]))
    cache.prune(2, torch.tensor([0, 2]), frames=[0])  # the sink can be pruned when not raw
    kb, vb = rand_block(gen, cache, 1)
    write_block(cache, kb, vb)
    q = torch.randn(3, 4, H, D, generator=gen)

    def attend():
        return [
            ops.masked_attention(
                q, cache.k(i), cache.v(i), cache.keep, cache.attend_len(TPF), backend="reference"
            )
            for i in range(L)
        ]

    before = attend()
    n_pruned = (~cache.keep[:, :15]).sum(1)
    assert n_pruned.tolist() == [6, 4, 2]
    cache.compact()
    assert cache.length.tolist() == (15 - n_pruned).tolist()
    assert cache.keep[:, :9].all() and cache.kept_count().tolist() == cache.length.tolist()
    write_block(cache, kb, vb)  # the block is rewritten at the new, shorter length
    for a, b in zip(before, attend()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cache.token_frame[2, :3].tolist() == [0, 1, 1] and cache.token_pos[2, :3].tolist() == [1, 0, 1]


# ------------------------------------------------------------------------------- property test
BLOCK = st.tuples(st.just("block"), st.integers(1, 2), st.integers(1, 2), st.integers(0, 1))
OPS = st.one_of(
    BLOCK,
    BLOCK,
    BLOCK,
    st.tuples(st.just("prepare"), st.integers(1, 2)),
    st.tuples(
        st.just("prune"),
        st.integers(0, B - 1),
        st.lists(st.integers(-1, TPF), max_size=3),
        st.one_of(st.none(), st.none(), st.integers(0, 31)),
    ),
    st.just(("compact",)),
    st.just(("unprune",)),
)


@settings(max_examples=20, deadline=None)
@given(ops_list=st.lists(OPS, min_size=6, max_size=16), sink=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_cache_matches_list_model(ops_list, sink, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = make(max_frames=5, sink_frames=sink, backend="reference")
    model = ListCache(B, sink, 5, TPF)
    for op in ops_list:
        if op[0] == "block":
            _, n, rewrites, gap = op
            cache.prepare(n)
            model.prepare(n)
            for _ in range(rewrites):
                k, v = rand_block(gen, cache, n)
                write_block(cache, k, v)
            model.pending = (k, v)
            start = (model.frames[-1] + 1 + gap) if model.frames else gap
            cache.commit(start, n)
            model.commit(start, n)
        elif op[0] == "prepare":
            cache.prepare(op[1])
            model.prepare(op[1])
        elif op[0] == "prune":
            _, b, positions, bits = op
            frames = None if bits is None else [f for i, f in enumerate(model.frames) if bits >> i & 1]
            cache.prune(b, torch.tensor(positions, dtype=torch.int64), frames)
            model.prune(b, positions, frames)
        elif op[0] == "compact":
            cache.compact()
            model.compact()
        else:
            cache.unprune_all()
            model.unprune()
        check_against(cache, model)
    # attention of a fresh query over the cache equals attention over the model's kept entries
    q = torch.randn(B, 2, H, D, generator=gen)
    for layer in range(L):
        out = ops.masked_attention(q, cache.k(layer), cache.v(layer), cache.keep, cache.length)
        for b, ent in enumerate(model.entries):
            kept = [e for e in ent if e[4]]
            keys = torch.stack([e[2][layer] for e in kept]) if kept else torch.zeros(0, H, D)
            vals = torch.stack([e[3][layer] for e in kept]) if kept else torch.zeros(0, H, D)
            torch.testing.assert_close(
                out[b].double(), explicit_attention(q[b], keys, vals), rtol=1e-5, atol=1e-6
            )


# --------------------------------------------------------------------------------------- raw sink
def test_raw_sink_stores_unrotated_sink_keys():
    gen = torch.Generator().manual_seed(7)
    cache = make(max_frames=5, sink_frames=2, raw_sink=True)
    assert cache.sink_tokens == 2 * TPF and cache.sink_raw.shape == (L, B, 2 * TPF, H, D)
    assert cache.sink_rope_frame_start(0) == 0
    k, v = rand_block(gen, cache, 1)
    with pytest.raises(ValueError, match="k_raw"):
        cache.write(0, k[0], v[0])
    # a 3-frame block starting inside the sink: only its first 2 frames are sink frames
    k, v = rand_block(gen, cache, 3)
    raw = torch.randn(k.shape, generator=gen)
    write_block(cache, k, v, raw)
    assert torch.equal(cache.sink_raw, raw[:, :, : 2 * TPF])
    cache.commit(0, 1)  # only the first frame joins: the sink is not complete yet
    assert cache.sink_rope_frame_start(1) == 0
    k, v = rand_block(gen, cache, 1)
    raw2 = torch.randn(k.shape, generator=gen)
    write_block(cache, k, v, raw2)
    assert torch.equal(cache.sink_raw[:, :, :TPF], raw[:, :, :TPF])
    assert torch.equal(cache.sink_raw[:, :, TPF:], raw2)
    cache.commit(1, 1)
    assert cache.sink_rope_frame_start(2) == 0  # right before the block at frame 2
    assert cache.sink_rope_frame_start(9) == 7
    sink_before = cache.sink_raw.clone()
    for f in range(2, 8):
        cache.prepare(1)
        k, v = rand_block(gen, cache, 1)
        write_block(cache, k, v, torch.randn(k.shape, generator=gen))  # past the sink: ignored
        cache.commit(f, 1)
    assert torch.equal(cache.sink_raw, sink_before)
    assert cache.frames == [0, 1, 5, 6, 7]
    assert cache.sink_rope_frame_start(8) == 3  # sink frames rotated to 3, 4, right before frame 5
    assert (cache.token_frame[:, :TPF] == 0).all() and (cache.token_frame[:, TPF : 2 * TPF] == 1).all()
    with pytest.raises(ValueError, match="raw sink"):
        cache.prune(0, torch.tensor([0]), frames=[1, 5])
    cache.prune(0, torch.arange(TPF))
    cache.compact()
    assert cache.length.tolist() == [2 * TPF, 5 * TPF]
    assert cache.token_frame[0, : 2 * TPF].tolist() == [0] * TPF + [1] * TPF
    assert cache.sink_rope_frame_start(8) == 3  # frames are kept even when all their tokens are pruned


# ---------------------------------------------------------------------------------------- memory
def test_memory_accounting_wan_1_3b():
    cache = KVCache(30, 1, 12, 128, 1560, 21, sink_frames=3, dtype=torch.bfloat16, device="meta")
    assert cache.bytes_per_frame == 30 * 2 * 1560 * 12 * 128 * 2
    assert cache.kv_nbytes == 21 * cache.bytes_per_frame
    metadata = 21 * 1560 * (1 + 4 + 4) + 4  # keep, token_frame, token_pos, length
    assert cache.nbytes == cache.kv_nbytes + metadata
    text = repr(cache)
    assert "layers=30" in text and "274.22 MiB" in text and "GiB" in text


def test_memory_accounting_matches_buffers():
    cache = KVCache(3, 2, 2, 8, 5, 4, sink_frames=1, raw_sink=True, dtype=torch.float16)
    assert cache.bytes_per_frame == 3 * 2 * 5 * 2 * 8 * 2
    buffers = [cache.kv, cache.keep, cache.length, cache.token_frame, cache.token_pos, cache.sink_raw]
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for t in buffers)
    assert cache.kv_nbytes == cache.batch * cache.max_frames * cache.bytes_per_frame


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_layers": 0}, ValueError, "num_layers"),
        ({"batch": -1}, ValueError, "batch"),
        ({"num_heads": 2.0}, TypeError, "num_heads"),
        ({"head_dim": True}, TypeError, "head_dim"),
        ({"tokens_per_frame": 0}, ValueError, "tokens_per_frame"),
        ({"max_frames": 0}, ValueError, "max_frames"),
        ({"sink_frames": 5}, ValueError, "sink_frames"),
        ({"sink_frames": -1}, ValueError, "sink_frames"),
        ({"raw_sink": True}, ValueError, "raw_sink"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
        ({"dtype": "float32"}, TypeError, "dtype"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    args = {
        "num_layers": 2,
        "batch": 1,
        "num_heads": 2,
        "head_dim": 4,
        "tokens_per_frame": 3,
        "max_frames": 5,
    }
    args.update(kwargs)
    positional = [
        args.pop(n)
        for n in ("num_layers", "batch", "num_heads", "head_dim", "tokens_per_frame", "max_frames")
    ]
    with pytest.raises(exc, match=match):
        KVCache(*positional, **args)


def test_bad_write_commit_prune_arguments():
    cache = make(max_frames=3)
    good = torch.zeros(B, TPF, H, D)
    with pytest.raises(ValueError, match="layer"):
        cache.write(L, good, good)
    with pytest.raises(TypeError, match="k must have the cache dtype"):
        cache.write(0, good.half(), good)
    with pytest.raises(ValueError, match=r"v must be \[B=2, 3, H=2, D=4\]"):
        cache.write(0, good, torch.zeros(B, TPF, H, D + 1))
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        cache.write(0, good[0], good)
    with pytest.raises(ValueError, match="multiple of tokens_per_frame"):
        cache.write(0, good[:, :2], good[:, :2])
    with pytest.raises(ValueError, match="cache device"):
        cache.write(0, good.to("meta"), good)
    with pytest.raises(ValueError, match="prepare"):
        cache.write(0, torch.zeros(B, 4 * TPF, H, D), torch.zeros(B, 4 * TPF, H, D))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cache.write(0, good.numpy(), good)
    cache.write(0, good, good)
    cache.commit(2, 1)
    with pytest.raises(ValueError, match="frame_start"):
        cache.commit(2, 1)
    with pytest.raises(ValueError, match="max_frames"):
        cache.commit(3, 3)
    with pytest.raises(ValueError, match="video"):
        cache.prune(B, torch.tensor([0]))
    with pytest.raises(TypeError, match="token_positions"):
        cache.prune(0, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="token_positions"):
        cache.prune(0, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="uncommitted"):
        cache.prune(0, torch.tensor([0]), frames=[0])
    with pytest.raises(TypeError, match="block_frame_start"):
        cache.sink_rope_frame_start("3")


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_steady_state_is_sync_free_and_graph_capturable():
    cache = KVCache(2, 2, 2, 64, 16, 6, sink_frames=1, dtype=torch.bfloat16, device="cuda")
    k1, k2 = torch.randn(2, 2, 32, 2, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([1, 3], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for f in range(0, 4, 2):
            cache.prepare(2)  # no eviction needed: host decision only
            for layer in range(2):
                cache.write(layer, k1, k1)
            cache.attend_len(32)
            cache.commit(f, 2)
        cache.prune(0, pos)
        cache.prune(1, pos, frames=[2, 3])
        cache.unprune_all()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert cache.length.tolist() == [64, 64] and cache.keep[:, :64].all()
    # one captured write, replayed after a commit, lands at the new length (a device tensor)
    cache.reset()
    static_k = torch.zeros_like(k1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cache.write(0, static_k, static_k)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.write(0, static_k, static_k)
    static_k.copy_(k1)
    graph.replay()
    cache.commit(0, 2)
    static_k.copy_(k2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(cache.kv[0, 0, :, :32], k1) and torch.equal(cache.kv[0, 0, :, 32:64], k2)
    assert torch.equal(cache.kv[0, 1, :, 32:64], k2) and cache.keep[:, :64].all()


def test_sink_anchor_mirrors_host_sink_rope_start():
    """The device-side anchor gives the same sink RoPE start as the host rule, through evictions."""
    tpf = 2
    cache = KVCache(1, 1, 1, 64, tpf, 9, sink_frames=3, raw_sink=True)
    assert int(cache.sink_anchor) == -1
    for block in range(6):
        start = 3 * block
        cache.prepare(3)
        k = torch.randn(1, 3 * tpf, 1, 64)
        cache.write(0, k, k, k_raw=k)
        cache.commit(start, 3)
        nxt = start + 3
        if len(cache.frames) >= cache.sink_frames:
            anchor = int(cache.sink_anchor)
            device_rule = (anchor if anchor >= 0 else nxt) - cache.sink_frames
            assert device_rule == cache.sink_rope_frame_start(nxt)
    assert int(cache.sink_anchor) == cache.frames[3]
    cache.reset()
    assert int(cache.sink_anchor) == -1
