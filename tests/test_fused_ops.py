"""The fused model ops (qk RMSNorm + RoPE + cache write, rms_norm, LayerNorm + modulate, gated
residual + LayerNorm + modulate): Triton kernels against their references in tokentrim.reference,
on odd shapes, with the cache pre-filled with NaN (slots outside the block must stay untouched).

On CPU the kernels run in the Triton interpreter (fp32/fp16); bf16 runs in the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch

from tokentrim import ops, reference
from tokentrim.model.rope import apply_rope, rope_cos_sin, rope_tables

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
CPU_DTYPES = [torch.float32, torch.float16]
tt = torch.ops.tokentrim


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device=DEVICE, dtype=dtype)


def _qk_inputs(B, T, H, D, dtype, seed, layers=3, C=None):
    dim = H * D
    q, k, v = (_randn(B, T, dim, seed=seed + i, dtype=dtype) for i in range(3))
    wq, wk = 1 + 0.2 * _randn(dim, seed=seed + 3), 1 + 0.2 * _randn(dim, seed=seed + 4)
    g = torch.Generator().manual_seed(seed + 5)
    ang = torch.rand(T, D // 2, generator=g) * 6.3
    cos, sin = ang.cos().to(DEVICE), ang.sin().to(DEVICE)
    C = C or T + 9
    kv = torch.full((layers, 2, B, C, H, D), float("nan"), dtype=dtype, device=DEVICE)
    start = torch.tensor([3, 9][:B], dtype=torch.int32, device=DEVICE)
    return q, k, v, wq, wk, cos, sin, kv, start


def _check_qk(dtype, backend, B=2, T=7, H=3, D=10, n_raw=4, seed=0):
    q, k, v, wq, wk, cos, sin, kv, start = _qk_inputs(B, T, H, D, dtype, seed)
    raw = torch.full((B, 6, H, D), float("nan"), dtype=dtype, device=DEVICE)
    kv_ref, raw_ref = kv.clone(), raw.clone()
    got = ops.qk_norm_rope(q, k, v, wq, wk, cos, sin, 1e-6, kv, 1, start, raw, n_raw, backend=backend)
    want = reference.qk_norm_rope(q, k, v, wq, wk, cos, sin, 1e-6, kv_ref, 1, start, raw_ref, n_raw)
    tol = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # the written slots match; everything else (other layers, other slots) is still NaN
    torch.testing.assert_close(kv, kv_ref, rtol=tol, atol=tol, equal_nan=True)
    written = torch.zeros_like(kv, dtype=torch.bool)
    for b in range(B):
        s = int(start[b])
        written[1, :, b, s : s + T] = True
    assert not kv[written].isnan().any() and kv[~written].isnan().all()
    torch.testing.assert_close(raw, raw_ref, rtol=tol, atol=tol, equal_nan=True)
    assert not raw[:, :n_raw].isnan().any() and raw[:, n_raw:].isnan().all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_qk_norm_rope_kernel_matches_reference(dtype):
    _check_qk(dtype, "triton" if (HAS_CUDA or ops.interpreter_enabled()) else "reference")


@pytest.mark.gpu
def test_qk_norm_rope_kernel_bf16_gpu():
    _check_qk(torch.bfloat16, "triton", B=1, T=300, H=12, D=128, n_raw=100)


def test_qk_norm_rope_reference_is_norm_then_model_rope():
    """The reference twin equals RMSNorm across heads followed by the model's apply_rope (fp32)."""
    B, T, H, D, h, w = 1, 2 * 3 * 4, 2, 64, 3, 4
    q, k, v, wq, wk, _, _, kv, start = _qk_inputs(B, T, H, D, torch.float32, 3, C=T)
    cos_t, sin_t = rope_tables(D)
    cos, sin = rope_cos_sin(cos_t, sin_t, 5, 2, h, w)
    start.zero_()
    got = reference.qk_norm_rope(q, k, v, wq, wk, cos, sin, 1e-6, kv, 0, start)
    qn = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * wq
    torch.testing.assert_close(got, apply_rope(qn.view(B, T, H, D), cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv[0, 1, :, :T], v.view(B, T, H, D))


def test_qk_norm_rope_bad_inputs():
    q, k, v, wq, wk, cos, sin, kv, start = _qk_inputs(1, 4, 2, 8, torch.float32, 1)
    with pytest.raises(ValueError, match="k must be"):
        ops.qk_norm_rope(q, k[:, :3], v, wq, wk, cos, sin, 1e-6, kv, 0, start, backend="reference")
    with pytest.raises(ValueError, match="layer must be"):
        ops.qk_norm_rope(q, k, v, wq, wk, cos, sin, 1e-6, kv, 3, start, backend="reference")
    with pytest.raises(ValueError, match="cos must be"):
        ops.qk_norm_rope(q, k, v, wq, wk, cos[:, :2], sin, 1e-6, kv, 0, start, backend="reference")
    with pytest.raises(TypeError, match="start must have dtype"):
        ops.qk_norm_rope(q, k, v, wq, wk, cos, sin, 1e-6, kv, 0, start.float(), backend="reference")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rope_into_kernel_matches_reference(dtype):
    """The raw sink re-rotated into the first L cache slots of one layer; everything else untouched."""
    backend = "triton" if (HAS_CUDA or ops.interpreter_enabled()) else "reference"
    B, L, H, D = 2, 5, 3, 10
    x = _randn(B, L, H, D, seed=21, dtype=dtype)
    g = torch.Generator().manual_seed(22)
    ang = torch.rand(L, D // 2, generator=g) * 6.3
    cos, sin = ang.cos().to(DEVICE), ang.sin().to(DEVICE)
    kv = torch.full((2, 2, B, L + 4, H, D), float("nan"), dtype=dtype, device=DEVICE)
    kv_ref = kv.clone()
    ops.rope_into(x, cos, sin, kv, 1, backend=backend)
    reference.rope_into(x, cos, sin, kv_ref, 1)
    torch.testing.assert_close(kv, kv_ref, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)
    assert not kv[1, 0, :, :L].isnan().any()
    rest = torch.ones_like(kv, dtype=torch.bool)
    rest[1, 0, :, :L] = False
    assert kv[rest].isnan().all()
    if dtype == torch.float32:  # the reference twin is the model's apply_rope
        torch.testing.assert_close(kv_ref[1, 0, :, :L], apply_rope(x, cos, sin))
    with pytest.raises(ValueError, match="layer must be"):
        ops.rope_into(x, cos, sin, kv, 2, backend="reference")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rms_norm_kernel_matches_reference(dtype):
    backend = "triton" if (HAS_CUDA or ops.interpreter_enabled()) else "reference"
    x = _randn(2, 5, 3, 38, seed=7, dtype=dtype, scale=3.0)
    w = 1 + 0.2 * _randn(38, seed=8)
    got = ops.rms_norm(x, w, 1e-6, dtype, backend=backend)
    want = reference.rms_norm(x, w, 1e-6, dtype)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def _ln_inputs(B, F, S, dim, dtype, seed):
    x = _randn(B, F, S, dim, seed=seed, scale=2.0) + 0.5
    y = _randn(B, F, S, dim, seed=seed + 1, dtype=dtype)
    table = 0.5 * _randn(6, dim, seed=seed + 2)
    e0 = _randn(B, F, 6, dim, seed=seed + 3)
    w, b = 1 + 0.2 * _randn(dim, seed=seed + 4), 0.1 * _randn(dim, seed=seed + 5)
    return x, y, table, e0, w, b


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", ["gate+mod", "affine", "mod", "plain-ln+mod"])
def test_ln_modulate_kernels_match_reference(dtype, case):
    backend = "triton" if (HAS_CUDA or ops.interpreter_enabled()) else "reference"
    x, y, table, e0, w, b = _ln_inputs(2, 3, 5, 37, dtype, seed=11)
    gate = (table[2], e0[:, :, 2]) if case == "gate+mod" else None
    shift, scale = ((table[3], e0[:, :, 3]), (table[4], e0[:, :, 4])) if case != "affine" else (None, None)
    wb = (w, b) if case == "affine" else (None, None)
    tol = TOL[dtype]
    if case == "plain-ln+mod":
        got = ops.ln_modulate(x, *wb, shift, scale, 1e-6, dtype, backend=backend)
        want = reference.ln_modulate(x, *wb, shift, scale, 1e-6, dtype)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        return
    xn, out = ops.residual_ln_modulate(x, y, gate, *wb, shift, scale, 1e-6, dtype, backend=backend)
    xr, outr = reference.residual_ln_modulate(x, y, gate, *wb, shift, scale, 1e-6, dtype)
    torch.testing.assert_close(xn, xr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, outr, rtol=tol, atol=tol)
    assert xn.dtype == torch.float32 and out.dtype == dtype


@pytest.mark.gpu
def test_ln_modulate_kernel_bf16_gpu():
    x, y, table, e0, w, b = _ln_inputs(1, 3, 300, 1536, torch.bfloat16, seed=2)
    args = ((table[2], e0[:, :, 2]), None, None, (table[3], e0[:, :, 3]), (table[4], e0[:, :, 4]), 1e-6, torch.bfloat16)
    got = ops.residual_ln_modulate(x, y, *args, backend="triton")
    want = reference.residual_ln_modulate(x, y, *args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-2)


def test_ln_modulate_reference_matches_model_math():
    """LN + modulate reference == F.layer_norm then x*(1+scale)+shift as the unfused model computes."""
    x, y, table, e0, _, _ = _ln_inputs(1, 2, 3, 16, torch.float32, seed=5)
    mod = (table + e0).unsqueeze(3).unbind(2)
    xn = x + y * mod[2]
    want = torch.nn.functional.layer_norm(xn, (16,), eps=1e-6) * (1 + mod[4]) + mod[3]
    got = reference.residual_ln_modulate(x, y, (table[2], e0[:, :, 2]), None, None, (table[3], e0[:, :, 3]),
                                         (table[4], e0[:, :, 4]), 1e-6, torch.float32)
    torch.testing.assert_close(got[0], xn)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)


def test_ln_modulate_bad_inputs():
    x, y, table, e0, w, b = _ln_inputs(1, 2, 3, 16, torch.float32, seed=5)
    with pytest.raises(ValueError, match="y must have"):
        ops.residual_ln_modulate(x, y[:, :1], None, None, None, None, None, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="shift and scale"):
        ops.ln_modulate(x, None, None, (table[0], e0[:, :, 0]), None, 1e-6, torch.float32)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.ln_modulate(x.half(), None, None, None, None, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="shift per-frame"):
        ops.ln_modulate(x, None, None, (table[0], e0[:, :1, 0]), (table[1], e0[:, :, 1]), 1e-6, torch.float32)


def test_fused_custom_ops_opcheck():
    q, k, v, wq, wk, cos, sin, kv, start = _qk_inputs(1, 3, 2, 8, torch.float32, 2)
    kv = kv.nan_to_num(0.0)
    raw = torch.zeros(1, 3, 2, 8, device=DEVICE)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(tt.qk_norm_rope, (q, k, v, wq, wk, cos, sin, 1e-6, kv, 1, start, raw, 2, "reference"),
                          test_utils=tests)
    x, y, table, e0, w, b = _ln_inputs(1, 2, 3, 16, torch.float32, seed=5)
    torch.library.opcheck(tt.residual_ln_modulate, (x, y, table[2], e0[:, :, 2], w, b, table[3], e0[:, :, 3], table[4],
                                                    e0[:, :, 4], 1e-6, torch.float16, "reference"), test_utils=tests)
    torch.library.opcheck(tt.ln_modulate, (x, None, None, table[3], e0[:, :, 3], table[4], e0[:, :, 4], 1e-6,
                                           torch.float32, "reference"), test_utils=tests)
    torch.library.opcheck(tt.rms_norm, (y, w, 1e-6, torch.float16, "reference"), test_utils=tests)
    torch.library.opcheck(tt.rope_into, (k.view(1, 3, 2, 8), cos, sin, kv, 0, "reference"), test_utils=tests)
