"""torch.ops.tokentrim.*: the custom ops equal tokentrim.ops, their fake kernels pass opcheck, and
``torch.compile(model.forward_cached, fullgraph=True)`` traces with zero graph breaks and equals eager.

On CPU the "triton" backend runs in the interpreter (conftest); the compiled-model checks use the
tiny preset so they stay cheap (dynamo explain and an aot_eager rollout in the default run, inductor
in a ``slow`` test).
"""

from __future__ import annotations

import os

import pytest
import torch
from _wan_helpers import randomize_, two_cached_blocks

from tokentrim import ops, reference
from tokentrim.cache import KVCache
from tokentrim.model import WanConfig, WanModel

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON = "triton" if (HAS_CUDA or ops.interpreter_enabled()) else "reference"
tt = torch.ops.tokentrim


def _randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def test_every_public_op_is_registered():
    for name in ("drift_topk", "masked_attention", "compact_kv", "attention_tiles"):
        assert hasattr(tt, name), name


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_drift_topk_op_equals_ops(backend):
    cand, prev = _randn(2, 3, 5, 6, 10, seed=1), _randn(2, 2, 5, 6, 10, seed=2)
    got = tt.drift_topk(cand, prev, 4, 2, 2, backend)
    want = reference.drift_topk(cand, prev, 4, (2, 2))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_attention_op_equals_reference(backend, dtype):
    B, Lq, Lk, H, D = 2, 13, 37, 2, 64
    q = _randn(B, Lq, H, D, seed=3, dtype=dtype)
    kv = _randn(2, 2, B, Lk, H, D, seed=4, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    keep = (torch.rand(B, Lk, generator=g) < 0.6).to(DEVICE)
    kv_len = torch.tensor([Lk, 21], dtype=torch.int32, device=DEVICE)
    tiles, count = tt.attention_tiles(keep, kv_len, backend)
    got = tt.masked_attention(q, kv[1, 0], kv[1, 1], keep, kv_len, None, tiles, count, backend)
    want = reference.masked_attention(q, kv[1, 0], kv[1, 1], keep=keep, kv_len=kv_len)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.is_contiguous() and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="tiles and count"):
        tt.masked_attention(q, kv[1, 0], kv[1, 1], keep, kv_len, None, tiles, None, backend)


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_compact_kv_op_mutates_in_place(backend):
    B, L, H, D = 2, 19, 2, 8
    kv = _randn(3, 2, B, L, H, D, seed=6)
    g = torch.Generator().manual_seed(7)
    keep = (torch.rand(B, L, generator=g) < 0.5).to(DEVICE)
    kv_len = torch.tensor([L, 11], dtype=torch.int32, device=DEVICE)
    want_kv = kv.clone()
    want_len = reference.compact_kv(want_kv, keep, kv_len)
    got_len = tt.compact_kv(kv, keep, kv_len, backend)
    assert torch.equal(got_len, want_len)
    for b in range(B):
        n = int(want_len[b])
        assert torch.equal(kv[..., b, :n, :, :], want_kv[..., b, :n, :, :])


def test_opcheck_fake_kernels():
    """Schema, fake kernels and mutation declarations agree with the real kernels (reference backend)."""
    B, Lq, Lk, H, D = 1, 5, 9, 2, 64
    q, kv = _randn(B, Lq, H, D, seed=8), _randn(2, B, Lk, H, D, seed=9)
    keep = torch.ones(B, Lk, dtype=torch.bool, device=DEVICE)
    keep[0, 3] = False
    kv_len = torch.tensor([7], dtype=torch.int32, device=DEVICE)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    tiles, count = tt.attention_tiles(keep, kv_len, "reference")
    torch.library.opcheck(tt.attention_tiles, (keep, kv_len, "reference"), test_utils=tests)
    torch.library.opcheck(
        tt.masked_attention, (q, kv[0], kv[1], keep, kv_len, None, tiles, count, "reference"), test_utils=tests
    )
    torch.library.opcheck(tt.compact_kv, (kv.clone(), keep, kv_len, "reference"), test_utils=tests)
    cand, prev = _randn(1, 2, 4, 4, 6, seed=10), _randn(1, 2, 4, 4, 6, seed=11)
    torch.library.opcheck(tt.drift_topk, (cand, prev, 3, 2, 2, "reference"), test_utils=tests)


# ------------------------------------------------------------------------------ torch.compile
TINY = WanConfig.preset("tiny")


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = randomize_(WanModel(TINY), seed=5).eval()
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 6, TINY.in_dim, 4, 6, generator=g)
    t = torch.rand(1, 6, generator=g) * 1000
    with torch.no_grad():
        ctx = model.prepare_text(torch.randn(1, 5, TINY.text_dim, generator=g))
    return model, x, t, ctx


def _two_blocks(fn, model, x, t, ctx, raw_sink):
    """Two 3-frame blocks through ``fn`` in a 9-frame cache; returns their outputs."""
    return two_cached_blocks(fn, TINY, x, t, ctx, raw_sink, 9)[0]


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_forward_cached_has_no_graph_breaks(tiny_model, fused):
    """The unfused path (the CPU default) and the fused one (CUDA default; reference twins here)."""
    model, x, t, ctx = tiny_model
    torch._dynamo.reset()
    S = TINY.tokens_per_frame(x.shape[3], x.shape[4])
    cache = KVCache(TINY.num_layers, 1, TINY.num_heads, TINY.head_dim, S, 9, sink_frames=3, raw_sink=True)
    cache.prepare(3)
    fn = model.forward_cached
    explain = torch._dynamo.explain(fn)(x[:, :3], t[:, :3], ctx, cache, torch.tensor(0), fused=fused)
    assert explain.graph_break_count == 0, [str(r.reason)[:300] for r in explain.break_reasons]
    assert explain.graph_count == 1


@pytest.mark.slow
@pytest.mark.skipif(
    not (HAS_CUDA or os.environ.get("TOKENTRIM_SLOW")),
    reason="inductor compiles C++ for about a minute on CPU: set TOKENTRIM_SLOW=1 to run it",
)
@torch.no_grad()
def test_compiled_forward_equals_eager_inductor(tiny_model):
    model, x, t, ctx = tiny_model
    torch._dynamo.reset()
    want = _two_blocks(model.forward_cached, model, x, t, ctx, True)
    compiled = torch.compile(model.forward_cached, fullgraph=True)
    got = _two_blocks(compiled, model, x, t, ctx, True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_rollout_compile_equals_eager_without_per_block_recompiles(tiny_model):
    """compile= on a rollout: same latents as eager; one graph per (query shape, kv_only), not one per
    committed-frame count (the runner hands the host-side cache facts in)."""
    from torch._dynamo.utils import counters

    from tokentrim.rollout import SelfForcingConfig, SelfForcingRollout

    model, _, _, _ = tiny_model
    text = torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(2))
    cfg = SelfForcingConfig(cache_frames=9, sink_frames=3)
    eager = SelfForcingRollout(model, cfg).run(text, 2, 2, 4, seed=1)
    torch._dynamo.reset()
    counters.clear()
    r = SelfForcingRollout(model, cfg, compile="eager")  # dynamo only: guards and graphs
    got = r.run(text, 2, 2, 4, seed=1)  # frames committed: 0 then 3; kv_only False and True
    torch.testing.assert_close(got.latents, eager.latents, rtol=1e-5, atol=1e-5)
    assert r.runner.compiled is not None
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    with pytest.raises(TypeError, match="compile must be"):
        SelfForcingRollout(model, cfg, compile=1)
