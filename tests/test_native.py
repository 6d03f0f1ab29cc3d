"""The native extension tokentrim._C (csrc/native.cpp) against tokentrim.reference, its dispatch
through tokentrim.ops, and the package without it.

Tests of the kernels themselves skip where the extension is not built (CI builds it, then runs a
second short pass with ``TOKENTRIM_NO_EXT=1``); the fallback tests run everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import native, ops, reference

built = pytest.mark.skipif(not native.available(), reason=f"tokentrim._C: {native.status()}")
TOL = dict(rtol=1e-5, atol=1e-5)  # both sides read in fp32 and accumulate in fp32
NAT = torch.ops.tokentrim_native if native.available() else None


def make(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.fixture
def no_ext(monkeypatch):
    """The package as if the extension were absent (TOKENTRIM_NO_EXT=1), restored afterwards."""
    monkeypatch.setenv(native.ENV_DISABLE, "1")
    native._load.cache_clear()
    yield
    monkeypatch.undo()
    native._load.cache_clear()


# ---------------------------------------------------------------------------------------- drift
def oracle_topk(drift: torch.Tensor, k: int) -> list[list[int]]:
    """Plain-Python top-k: decreasing value, ties toward the lower index."""
    return [sorted(range(len(r)), key=lambda n, r=r: (-r[n], n))[:k] for r in drift.tolist()]


def check_drift(cand, prev, k, patch):
    drift, idx, sev = ops.drift_topk(cand, prev, k, patch, backend="native")
    r_drift, r_idx, r_sev = reference.drift_topk(cand, prev, k, patch)
    B, N = r_drift.shape
    assert (drift.dtype, idx.dtype, sev.dtype) == (torch.float32, torch.int64, torch.float32)
    assert (tuple(drift.shape), tuple(idx.shape), tuple(sev.shape)) == ((B, N), (B, k), (B,))
    torch.testing.assert_close(drift, r_drift, **TOL)
    assert idx.tolist() == oracle_topk(drift, k), "native ranking of its own drift"
    for b in range(B):  # a token in one top-k but not the other can only be a rounding near-tie
        kth = float(r_drift[b, r_idx[b, -1]])
        for i in set(idx[b].tolist()) ^ set(r_idx[b].tolist()):
            assert abs(float(r_drift[b, i]) - kth) <= 1e-5 * (1 + abs(kth)), f"token {i} of video {b}"
    torch.testing.assert_close(sev, r_sev, **TOL)
    return drift, idx, sev


DRIFT_SHAPES = [  # B, F, F', C, H, W, patch
    (1, 1, 2, 5, 6, 10, (2, 2)),
    (3, 2, 3, 5, 6, 10, (2, 2)),
    (2, 3, 1, 3, 7, 9, (1, 1)),
    (2, 2, 2, 4, 9, 10, (3, 2)),
]


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", DRIFT_SHAPES, ids=lambda s: "B{}F{}Fp{}C{}H{}W{}p{}{}".format(*s[:6], *s[6]))
def test_drift_matches_reference(shape, dtype):
    B, F, Fp, C, H, W, patch = shape
    N = (H // patch[0]) * (W // patch[1])
    cand, prev = make((B, F, C, H, W), dtype, 1), make((B, Fp, C, H, W), dtype, 2)
    for k in (1, N // 3 + 1, N):
        check_drift(cand, prev, k, patch)


@built
def test_drift_strided_and_mixed_dtypes():
    cand = make((2, 3, 5, 10, 6), seed=3).transpose(-1, -2)  # W stride != 1
    prev = make((2, 7, 5, 6, 10), seed=4)[:, 2:6:2]  # a frame slice
    assert not cand.is_contiguous() and not prev.is_contiguous()
    check_drift(cand, prev, 5, (2, 2))
    check_drift(cand, make((2, 1, 5, 6, 10), seed=5).expand(2, 4, 5, 6, 10), 5, (2, 2))  # stride-0 frames
    check_drift(make((2, 2, 3, 4, 6), torch.float16, 6), make((2, 3, 3, 4, 6), torch.float32, 7), 3, (2, 2))


@built
def test_drift_ties_go_to_lower_index():
    # Latents in {0, 1}, one frame: every drift is the exact sqrt of a small integer, so both sides
    # hold bit-identical drifts with many ties, and the top-k must equal the reference's exactly.
    g = torch.Generator().manual_seed(8)
    cand = torch.randint(0, 2, (3, 1, 2, 8, 10), generator=g).float()
    prev = torch.zeros(3, 1, 2, 8, 10)
    for k in (1, 7, 20):
        drift, idx, sev = check_drift(cand, prev, k, (2, 2))
        assert drift.unique().numel() <= 9  # the input really has ties
        r_drift, r_idx, r_sev = reference.drift_topk(cand, prev, k)
        assert torch.equal(drift, r_drift) and torch.equal(idx, r_idx)
    same = torch.ones(2, 1, 2, 4, 4)
    _, idx, sev = ops.drift_topk(same, torch.zeros_like(same), 3, backend="native")
    assert idx.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(sev, torch.full((2,), math.sqrt(8.0)))


@built
def test_drift_nan_ranks_first_like_reference():
    """Without the finite check, a NaN token ranks first (lower index first among NaNs), as in the
    reference's sort and the Triton kernel; the others keep their order."""
    cand, prev = make((1, 2, 3, 6, 8), seed=9), make((1, 2, 3, 6, 8), seed=10)
    cand[0, 1, 2, 4, 6] = math.nan  # token (2, 3) = 11
    cand[0, 0, 0, 0, 1] = math.nan  # token 0
    got = ops.drift_topk(cand, prev, 5, backend="native", check_finite_inputs=False)
    want = reference.drift_topk(cand, prev, 5)
    assert got[1][0, :2].tolist() == [0, 11] == want[1][0, :2].tolist()
    assert torch.equal(got[1], want[1])
    assert got[2].isnan().all() and want[2].isnan().all()


@built
@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 3), F=st.integers(1, 3), Fp=st.integers(1, 3), C=st.integers(1, 5),
    ph=st.integers(1, 3), pw=st.integers(1, 3), Ht=st.integers(1, 6), Wt=st.integers(1, 9),
    kfrac=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_drift_property(B, F, Fp, C, ph, pw, Ht, Wt, kfrac, dtype, seed):
    N = Ht * Wt
    k = 1 + int(kfrac * (N - 1))
    cand, prev = make((B, F, C, Ht * ph, Wt * pw), dtype, seed), make((B, Fp, C, Ht * ph, Wt * pw), dtype, seed + 1)
    check_drift(cand, prev, k, (ph, pw))


@built
def test_drift_select_matches_oracle():
    g = torch.Generator().manual_seed(11)
    drift = torch.randint(0, 50, (3, 997), generator=g).float() / 7  # many exact ties
    for k in (1, 100, 997):
        idx, sev = native.drift_select(drift, k)
        assert idx.tolist() == oracle_topk(drift, k)
        torch.testing.assert_close(sev, drift.gather(1, idx).mean(1), **TOL)
    idx, _ = native.drift_select(drift.t().contiguous().t(), 4)  # non-contiguous rows
    assert idx.tolist() == oracle_topk(drift, 4)


@built
def test_drift_meta_shapes():
    c = torch.empty(2, 3, 4, 6, 8, device="meta", dtype=torch.bfloat16)
    d, i, s = NAT.drift_topk(c, c, 5, 2, 2)
    assert [(t.shape, t.dtype, t.device.type) for t in (d, i, s)] == [
        ((2, 12), torch.float32, "meta"),
        ((2, 5), torch.int64, "meta"),
        ((2,), torch.float32, "meta"),
    ]
    n = NAT.compact_kv(torch.empty(3, 2, 5, 2, 4, device="meta"), torch.empty(2, 5, dtype=torch.bool, device="meta"),
                       torch.empty(2, dtype=torch.int64, device="meta"))  # fmt: skip
    assert (n.shape, n.dtype) == ((2,), torch.int32)


# -------------------------------------------------------------------------------------- compact
def check_compact(kv, keep, kv_len):
    """Native vs reference on clones: same lengths, identical first new_len tokens of every slice."""
    got_kv, want_kv = kv.clone(), kv.clone()
    got = ops.compact_kv(got_kv, keep, kv_len, backend="native")
    want = reference.compact_kv(want_kv, keep, kv_len)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    for b, n in enumerate(got.tolist()):
        assert torch.equal(got_kv[..., b, :n, :, :], want_kv[..., b, :n, :, :]), f"video {b}"
    return got_kv, got


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_compact_matches_reference(dtype):
    B, L, H, D = 3, 53, 3, 24
    kv = make((2, 2, B, L, H, D), dtype, 12)
    keep = torch.rand(B, L, generator=torch.Generator().manual_seed(13)) < 0.6
    keep[:, 16:40] = False
    kv_len = torch.tensor([45, 0, L], dtype=torch.int32)
    check_compact(kv, keep, kv_len)


@built
def test_compact_edge_cases():
    """4-D kv; int64 kv_len at L and 0; nothing / everything pruned."""
    B, L, H, D = 4, 37, 2, 16
    kv = make((B, L, H, D), seed=14)
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1] = False
    keep[2, ::3] = False
    kv_len = torch.tensor([L, L, L, 0], dtype=torch.int64)
    got, n = check_compact(kv, keep, kv_len)
    assert n.tolist() == [L, 0, L - len(range(0, L, 3)), 0]
    assert torch.equal(got[0], kv[0]) and torch.equal(got[3], kv[3]), "nothing to move: untouched"


@built
def test_compact_strided_views_in_place():
    """Every other layer with transposed leading dims, a head slice (heads not mergeable) and a
    strided last dim: compacted in place, nothing outside the view touched."""
    B, L, H, D = 2, 29, 4, 8
    keep = torch.rand(B, L, generator=torch.Generator().manual_seed(15)) < 0.5
    kv_len = torch.tensor([29, 20], dtype=torch.int32)
    for view in (
        lambda t: t.transpose(0, 1)[:, ::2],
        lambda t: t[:, :, :, :, 1::2],
        lambda t: t[..., ::2],
    ):
        full = make((4, 2, B, L, H, D), seed=16)
        orig = full.clone()
        sub = view(full)
        want = sub.clone()
        want_len = reference.compact_kv(want, keep, kv_len)
        got_len = ops.compact_kv(sub, keep, kv_len, backend="native")
        assert torch.equal(got_len, want_len)
        for b, n in enumerate(got_len.tolist()):
            assert torch.equal(view(full)[..., b, :n, :, :], want[..., b, :n, :, :])
        mask = torch.ones_like(full, dtype=torch.bool)
        view(mask).fill_(False)
        assert torch.equal(full[mask], orig[mask]), "memory outside the view was written"


@built
@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 3), L=st.integers(1, 40), H=st.integers(1, 3), D=st.integers(1, 9), lead=st.integers(0, 2),
    frac=st.floats(0.0, 1.0), fracs=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_compact_property(B, L, H, D, lead, frac, fracs, seed):
    kv = make((2,) * lead + (B, L, H, D), seed=seed)
    keep = torch.rand(B, L, generator=torch.Generator().manual_seed(seed)) < frac
    lens = [round(f * L) for f in fracs]
    kv_len = torch.tensor(lens[:B], dtype=torch.int32)
    got, n = check_compact(kv, keep, kv_len)
    for b in range(B):  # the kept tokens, in order, are exactly the compacted prefix
        idx = [j for j in range(lens[b]) if keep[b, j]]
        assert torch.equal(got[..., b, : n[b], :, :], kv[..., b, idx, :, :])


# ------------------------------------------------------------------------------------ bad input
def _drift_cases():
    f = lambda *s, dtype=torch.float32, device="cpu": torch.zeros(*s, dtype=dtype, device=device)
    return [
        ("rank", dict(cand=f(2, 3, 4, 6)), ValueError, "cand"),
        ("C", dict(prev=f(2, 2, 4, 4, 6)), ValueError, "prev"),
        ("H-patch", dict(cand=f(2, 2, 3, 5, 6), prev=f(2, 2, 3, 5, 6)), ValueError, "patch"),
        ("patch", dict(patch=(0, 2)), ValueError, "patch"),
        ("k0", dict(k=0), ValueError, "k"),
        ("k>N", dict(k=7), ValueError, "k"),
        ("k-float", dict(k=2.0), TypeError, "k"),
        ("int-cand", dict(cand=f(2, 2, 3, 4, 6, dtype=torch.int32)), TypeError, "cand"),
        ("device", dict(prev=f(2, 2, 3, 4, 6, device="meta")), ValueError, "prev"),
        ("nan", dict(cand=f(2, 2, 3, 4, 6).index_fill_(0, torch.tensor([1]), math.nan)), ValueError, "cand"),
    ]


def _compact_cases():
    kv, keep, n = torch.zeros(2, 2, 5, 3, 4), torch.ones(2, 5, dtype=torch.bool), torch.full((2,), 5)
    return [
        ("kv-rank", dict(kv=torch.zeros(2, 5, 3)), ValueError, "kv"),
        ("kv-int", dict(kv=kv.to(torch.int32)), TypeError, "kv"),
        ("keep-shape", dict(keep=keep[:, :4]), ValueError, "keep"),
        ("keep-dtype", dict(keep=keep.to(torch.uint8)), TypeError, "keep"),
        ("len-shape", dict(kv_len=n[:1]), ValueError, "kv_len"),
        ("len-dtype", dict(kv_len=n.float()), TypeError, "kv_len"),
        ("len-past-L", dict(kv_len=torch.tensor([6, 5])), ValueError, "kv_len"),
        ("len-negative", dict(kv_len=torch.tensor([2, -1], dtype=torch.int32)), ValueError, "kv_len"),
        ("device", dict(keep=keep.to("meta")), ValueError, "keep"),
    ]


def _outcome(fn):
    try:
        fn()
    except Exception as e:
        return type(e), str(e)
    return None, None


@built
@pytest.mark.parametrize("case", _drift_cases(), ids=lambda c: c[0])
def test_drift_bad_input_same_as_reference(case):
    _, kw, exc, name = case
    args = dict(cand=torch.zeros(2, 2, 3, 4, 6), prev=torch.zeros(2, 2, 3, 4, 6), k=2, patch=(2, 2)) | kw
    got = _outcome(lambda: ops.drift_topk(**args, backend="native"))
    assert got == _outcome(lambda: ops.drift_topk(**args, backend="reference"))
    assert got[0] is exc and name in got[1]


@built
@pytest.mark.parametrize("case", _compact_cases(), ids=lambda c: c[0])
def test_compact_bad_input_same_as_reference(case):
    _, kw, exc, name = case
    args = dict(kv=torch.zeros(2, 2, 5, 3, 4), keep=torch.ones(2, 5, dtype=torch.bool), kv_len=torch.full((2,), 5)) | kw
    got = _outcome(lambda: ops.compact_kv(**args, backend="native"))
    assert got == _outcome(lambda: ops.compact_kv(**args, backend="reference"))
    assert got[0] is exc and name in got[1]


@built
def test_cpp_guards_direct_calls():
    """Called directly (no Python validation), the C++ kernels raise ValueError/TypeError, never crash."""
    c = torch.zeros(2, 2, 3, 4, 6)
    bad = [
        (lambda: NAT.drift_topk(c[0], c, 2, 2, 2), ValueError, "cand"),
        (lambda: NAT.drift_topk(c, c, 0, 2, 2), ValueError, "k"),
        (lambda: NAT.drift_topk(c, c, 7, 2, 2), ValueError, "k"),
        (lambda: NAT.drift_topk(c, c, 2, 0, 2), ValueError, "patch"),
        (lambda: NAT.drift_topk(c, c, 2, 3, 2), ValueError, "patch"),
        (lambda: NAT.drift_topk(c.int(), c, 2, 2, 2), TypeError, "cand"),
        (lambda: NAT.drift_topk(c, c[:, :, :2], 2, 2, 2), ValueError, "prev"),
        (lambda: NAT.drift_select(torch.zeros(2, 5), 6), ValueError, "k"),
        (lambda: NAT.drift_select(torch.zeros(2, 5).double(), 1), TypeError, "drift"),
    ]
    kv, keep, n = torch.zeros(2, 5, 3, 4), torch.ones(2, 5, dtype=torch.bool), torch.full((2,), 5)
    bad += [
        (lambda: NAT.compact_kv(kv[0], keep, n), ValueError, "kv"),
        (lambda: NAT.compact_kv(kv, keep.int(), n), TypeError, "keep"),
        (lambda: NAT.compact_kv(kv, keep[:1], n), ValueError, "keep"),
        (lambda: NAT.compact_kv(kv, keep, n.float()), TypeError, "kv_len"),
        (lambda: NAT.compact_kv(kv, keep, n[:1]), ValueError, "kv_len"),
        (lambda: NAT.compact_kv(kv, keep, n + 1), ValueError, "kv_len"),
        (lambda: NAT.compact_kv(kv, keep, n - 6), ValueError, "kv_len"),
        (lambda: NAT.compact_kv(kv[:1].expand(2, 5, 3, 4), keep, n), ValueError, "overlapping"),
    ]
    for fn, exc, word in bad:
        with pytest.raises(exc, match=word):
            fn()


# ------------------------------------------------------------------------------------- dispatch
@built
def test_auto_prefers_native_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu, "drift_topk") == "native"
    assert ops.resolve_backend("auto", cpu, "compact_kv") == "native"
    assert ops.resolve_backend("auto", cpu, "masked_attention") == "reference"
    calls = []
    real = native.drift_topk
    monkeypatch.setattr(native, "drift_topk", lambda *a: calls.append(1) or real(*a))
    ops.drift_topk(make((1, 2, 3, 4, 6)), make((1, 2, 3, 4, 6), seed=1), 2)
    assert calls == [1]
    with pytest.raises(RuntimeError, match="masked_attention"):
        ops.masked_attention(*(make((1, 3, 2, 64)),) * 3, backend="native")
    with pytest.raises(RuntimeError, match="rms_norm"):
        ops.rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-6, torch.float32, backend="native")
    with pytest.raises(RuntimeError, match="CPU tensors"):
        ops.compact_kv(torch.zeros(1, 2, 1, 4, device="meta"), torch.ones(1, 2, dtype=torch.bool, device="meta"),
                       torch.ones(1, dtype=torch.int32, device="meta"), backend="native")  # fmt: skip


def test_without_extension_falls_back(no_ext):
    """TOKENTRIM_NO_EXT=1: auto uses the reference, an explicit native request says why it cannot."""
    assert not native.available() and "TOKENTRIM_NO_EXT" in native.status()
    assert ops.resolve_backend("auto", torch.device("cpu"), "drift_topk") == "reference"
    cand, prev = make((1, 2, 3, 4, 6)), make((1, 2, 3, 4, 6), seed=1)
    for got, want in zip(ops.drift_topk(cand, prev, 2), reference.drift_topk(cand, prev, 2)):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="TOKENTRIM_NO_EXT"):
        ops.drift_topk(cand, prev, 2, backend="native")
    with pytest.raises(RuntimeError, match="TOKENTRIM_NO_EXT"):
        ops.compact_kv(torch.zeros(1, 2, 1, 4), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, dtype=torch.int32),
                       backend="native")  # fmt: skip
