"""drift_topk: the fused Triton kernel (tokentrim.kernels.drift) against tokentrim.reference.

On CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay small; the bf16 test needs a GPU because bf16 is broken in the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokentrim import native, ops, reference
from tokentrim.kernels import drift as kdrift

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)  # both sides upcast to fp32 and accumulate in fp32


def make(shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def run_kernel(cand, prev, k, patch, single_launch=False):
    """Run the launcher into NaN / -1 pre-filled outputs and check every element was written."""
    B, H, W = cand.shape[0], cand.shape[3], cand.shape[4]
    N = (H // patch[0]) * (W // patch[1])
    out = (
        torch.full((B, N), math.nan, device=cand.device),
        torch.full((B, k), -1, dtype=torch.int64, device=cand.device),
        torch.full((B,), math.nan, device=cand.device),
    )
    res = kdrift.drift_topk(cand, prev, k, patch, out=out, single_launch=single_launch)
    assert all(r is o for r, o in zip(res, out)), "the launcher must return the out tensors"
    drift, idx, sev = res
    assert not drift.isnan().any() and not sev.isnan().any(), "unwritten (NaN) output element"
    assert (idx >= 0).all() and (idx < N).all(), "unwritten or out-of-range index"
    if single_launch:  # the per-video completion counters are left at zero for the next call
        assert not kdrift._counters(cand.device, B).any()
    return drift, idx, sev


def oracle_topk(drift: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-Python top-k: decreasing value, ties toward the lower index."""
    rows = [sorted(range(drift.shape[1]), key=lambda n, r=r: (-r[n], n))[:k] for r in drift.tolist()]
    return torch.tensor(rows, dtype=torch.int64)


def check_against_reference(cand, prev, k, patch, got):
    drift, idx, sev = got
    r_drift, r_idx, r_sev = reference.drift_topk(cand, prev, k, patch)
    torch.testing.assert_close(drift, r_drift, **TOL)
    # The kernel's own drift ranks exactly like the spec (decreasing, ties to the lower index).
    assert torch.equal(idx.cpu(), oracle_topk(drift.cpu(), k))
    for b in range(cand.shape[0]):
        # Same ranking as the reference: the reference's drift read in the kernel's order equals its
        # own sorted values, and a token in one top-k but not the other can only be a near-tie
        # (within rounding) of the k-th value. Exact ties are covered by test_ties_go_to_lower_index.
        got_vals, want_vals = r_drift[b, idx[b]], r_drift[b, r_idx[b]]
        torch.testing.assert_close(got_vals, want_vals, **TOL)
        kth = float(want_vals[-1])
        for i in set(idx[b].tolist()) ^ set(r_idx[b].tolist()):
            assert abs(float(r_drift[b, i]) - kth) <= 1e-5 * (1 + abs(kth)), f"token {i} of video {b}"
    torch.testing.assert_close(sev, r_sev, **TOL)
    torch.testing.assert_close(sev, drift.gather(1, idx).mean(1), **TOL)


SHAPES = [  # B, F, F', C, H, W, patch
    (1, 1, 2, 5, 6, 10, (2, 2)),
    (3, 2, 3, 5, 6, 10, (2, 2)),
    (3, 3, 1, 5, 6, 10, (1, 1)),
    (1, 2, 2, 5, 6, 10, (2, 1)),
]


@pytest.mark.parametrize("single_launch", [False, True], ids=["2launch", "1launch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}F{}Fp{}C{}H{}W{}p{}{}".format(*s[:6], *s[6]))
def test_kernel_matches_reference(shape, dtype, single_launch):
    B, F, Fp, C, H, W, patch = shape
    N = (H // patch[0]) * (W // patch[1])
    cand = make((B, F, C, H, W), dtype, seed=1)
    prev = make((B, Fp, C, H, W), dtype, seed=2)
    for k in (1, N // 3 + 1, N):
        check_against_reference(cand, prev, k, patch, run_kernel(cand, prev, k, patch, single_launch))


def test_ops_triton_backend_matches_reference():
    cand, prev = make((2, 3, 5, 6, 10), torch.float32, 3), make((2, 2, 5, 6, 10), torch.float32, 4)
    got = ops.drift_topk(cand, prev, 4, backend="triton")
    assert [t.dtype for t in got] == [torch.float32, torch.int64, torch.float32]
    assert [tuple(t.shape) for t in got] == [(2, 15), (2, 4), (2,)]
    check_against_reference(cand, prev, 4, (2, 2), got)


def test_mixed_input_dtypes():
    cand, prev = make((2, 2, 3, 4, 6), torch.float16, 5), make((2, 3, 3, 4, 6), torch.float32, 6)
    check_against_reference(cand, prev, 3, (2, 2), run_kernel(cand, prev, 3, (2, 2)))


def test_non_contiguous_inputs():
    # H/W transposed storage, a frame slice of a longer rollout, and a broadcast (stride 0) frame.
    cand = make((2, 3, 5, 10, 6), torch.float32, 7).transpose(-1, -2)
    prev = make((2, 7, 5, 6, 10), torch.float32, 8)[:, 2:6:2]
    assert not cand.is_contiguous() and not prev.is_contiguous()
    check_against_reference(cand, prev, 5, (2, 2), run_kernel(cand, prev, 5, (2, 2)))
    prev_b = make((2, 1, 5, 6, 10), torch.float32, 9).expand(2, 4, 5, 6, 10)
    check_against_reference(cand, prev_b, 5, (2, 2), run_kernel(cand, prev_b, 5, (2, 2)))


@pytest.mark.parametrize("single_launch", [False, True], ids=["2launch", "1launch"])
def test_many_tokens(single_launch):
    # N = 4400 > 4096: several drift tiles and a 8192-wide top-k sort.
    cand, prev = make((1, 1, 1, 4, 1100), torch.float32, 10), make((1, 1, 1, 4, 1100), torch.float32, 11)
    check_against_reference(cand, prev, 500, (1, 1), run_kernel(cand, prev, 500, (1, 1), single_launch))


@pytest.mark.parametrize("single_launch", [False, True], ids=["2launch", "1launch"])
def test_ties_go_to_lower_index(single_launch):
    # Latents in {0, 1} with C*ph*pw = 4: five possible drifts, so 30 tokens share few values.
    g = torch.Generator().manual_seed(12)
    cand = torch.randint(0, 2, (2, 1, 1, 6, 10), generator=g).float().to(DEVICE)
    prev = torch.zeros(2, 2, 1, 6, 10, device=DEVICE)
    drift, idx, _ = run_kernel(cand, prev, 7, (2, 2), single_launch)
    assert drift.unique().numel() <= 5  # the input really has ties
    check_against_reference(cand, prev, 7, (2, 2), (drift, idx, _))
    # All tokens equal: the top-k is exactly the k lowest indices, in order.
    same = torch.ones(1, 1, 2, 4, 4, device=DEVICE)
    drift, idx, sev = run_kernel(same, torch.zeros_like(same), 3, (2, 2), single_launch)
    assert idx.tolist() == [[0, 1, 2]]
    torch.testing.assert_close(sev, torch.full((1,), math.sqrt(8.0), device=DEVICE))  # ||ones(C*ph*pw=8)||


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="bf16 is broken in the Triton interpreter")
@pytest.mark.parametrize("shape", [SHAPES[1], (2, 3, 3, 16, 60, 104, (2, 2))], ids=["small", "832x480"])
def test_bf16_on_gpu(shape):
    B, F, Fp, C, H, W, patch = shape
    N = (H // patch[0]) * (W // patch[1])
    cand = make((B, F, C, H, W), torch.bfloat16, 13, device="cuda")
    prev = make((B, Fp, C, H, W), torch.bfloat16, 14, device="cuda")
    for k in (1, max(1, round(0.1 * N)), N):
        for single in (False, True):
            check_against_reference(cand, prev, k, patch, run_kernel(cand, prev, k, patch, single))


# ------------------------------------------------------------------------------------ bad input
GOOD_C = (2, 2, 3, 4, 6)


def _bad_cases():
    f = lambda *s, dtype=torch.float32, device="cpu": torch.zeros(*s, dtype=dtype, device=device)
    c = f(*GOOD_C)
    return [
        ("rank", dict(cand=f(2, 3, 4, 6)), ValueError, "cand"),
        ("rank-prev", dict(prev=f(2, 2, 3, 4, 6, 1)), ValueError, "prev"),
        ("C", dict(prev=f(2, 2, 4, 4, 6)), ValueError, "prev"),
        ("H", dict(prev=f(2, 2, 3, 2, 6)), ValueError, "prev"),
        ("W", dict(prev=f(2, 2, 3, 4, 8)), ValueError, "prev"),
        ("B", dict(prev=f(3, 2, 3, 4, 6)), ValueError, "prev"),
        ("H-patch", dict(cand=f(2, 2, 3, 5, 6), prev=f(2, 2, 3, 5, 6)), ValueError, "patch"),
        ("W-patch", dict(cand=f(2, 2, 3, 4, 7), prev=f(2, 2, 3, 4, 7)), ValueError, "patch"),
        ("patch", dict(patch=(0, 2)), ValueError, "patch"),
        ("k0", dict(k=0), ValueError, "k"),
        ("k>N", dict(k=7), ValueError, "k"),
        ("k-float", dict(k=2.0), TypeError, "k"),
        ("k-bool", dict(k=True), TypeError, "k"),
        ("k-tensor", dict(k=torch.tensor(2)), TypeError, "k"),
        ("int-cand", dict(cand=c.to(torch.int32)), TypeError, "cand"),
        ("int-prev", dict(prev=c.to(torch.int64)), TypeError, "prev"),
        ("not-tensor", dict(cand=c.numpy()), TypeError, "cand"),
        ("device", dict(prev=f(*GOOD_C, device="meta")), ValueError, "prev"),
    ]


@pytest.mark.parametrize("fn", ["ops", "kernel"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case, fn):
    _, kw, exc, name = case
    args = dict(cand=torch.zeros(*GOOD_C), prev=torch.zeros(*GOOD_C), k=2, patch=(2, 2)) | kw
    call = (lambda **a: ops.drift_topk(**a, backend="triton")) if fn == "ops" else kdrift.drift_topk
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call(**args)


@pytest.mark.parametrize("which", ["cand", "prev"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_latents(which, bad):
    x = {"cand": torch.zeros(*GOOD_C), "prev": torch.zeros(*GOOD_C)}
    x[which][1, 1, 2, 3, 5] = bad
    with pytest.raises(ValueError, match=which):
        ops.drift_topk(x["cand"], x["prev"], 2, backend="triton")
    with pytest.raises(ValueError, match=which):
        kdrift.drift_topk(x["cand"], x["prev"], 2, check_finite_inputs=True)


def test_too_many_tokens_and_bad_out():
    big = torch.empty(1, 1, 1, 2, 2 * (kdrift.MAX_N + 1), device="meta")
    with pytest.raises(ValueError, match="cand"):
        kdrift.drift_topk(big, big, 1)
    c = torch.zeros(*GOOD_C)
    good = (torch.empty(2, 6), torch.empty(2, 2, dtype=torch.int64), torch.empty(2))
    for i, wrong in enumerate([torch.empty(2, 5), torch.empty(2, 2), torch.empty(2, dtype=torch.float64)]):
        out = list(good)
        out[i] = wrong
        with pytest.raises(ValueError, match=rf"out\[{i}\]"):
            kdrift.drift_topk(c, c, 2, out=tuple(out))
    with pytest.raises(TypeError, match="out"):
        kdrift.drift_topk(c, c, 2, out=good[:2])


# ---------------------------------------------------------------------------------- properties
@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3), F=st.integers(1, 3), Fp=st.integers(1, 3), C=st.integers(1, 6),
    ph=st.integers(1, 2), pw=st.integers(1, 2), Ht=st.integers(1, 5), Wt=st.integers(1, 7),
    kfrac=st.floats(0.0, 1.0), half=st.booleans(), single=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_property_random_shapes(B, F, Fp, C, ph, pw, Ht, Wt, kfrac, half, single, seed):
    H, W, N = Ht * ph, Wt * pw, Ht * Wt
    k = 1 + int(kfrac * (N - 1))
    dtype = torch.float16 if half else torch.float32
    cand, prev = make((B, F, C, H, W), dtype, seed), make((B, Fp, C, H, W), dtype, seed + 1)
    check_against_reference(cand, prev, k, (ph, pw), run_kernel(cand, prev, k, (ph, pw), single))


# ------------------------------------------------------------------------------------ dispatch
def _spy_kernel(monkeypatch):
    calls = []
    real = kdrift.drift_topk
    monkeypatch.setattr(kdrift, "drift_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_dispatch_reference_and_auto_on_cpu(monkeypatch):
    calls = _spy_kernel(monkeypatch)
    cand, prev = (
        make((1, 2, 3, 4, 6), torch.float32, 20, "cpu"),
        make((1, 2, 3, 4, 6), torch.float32, 21, "cpu"),
    )
    want = reference.drift_topk(cand, prev, 2)
    for g, w in zip(ops.drift_topk(cand, prev, 2, backend="reference"), want):
        assert torch.equal(g, w)
    # auto on CPU: the native kernel where tokentrim._C is built (tests/test_native.py), else the reference
    auto_is = "native" if native.available() else "reference"
    for g, w in zip(ops.drift_topk(cand, prev, 2), ops.drift_topk(cand, prev, 2, backend=auto_is)):
        assert torch.equal(g, w)
    assert calls == [], "auto on CPU tensors must not use the Triton kernel"
    ops.drift_topk(cand, prev, 2, backend="triton")
    assert calls == [1]


def test_dispatch_errors(monkeypatch):
    cand = torch.zeros(*GOOD_C)
    with pytest.raises(ValueError, match="backend"):
        ops.drift_topk(cand, cand, 2, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.drift_topk(cand, cand, 2, backend="triton")
