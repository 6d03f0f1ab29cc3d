"""In-place re-base of the temporal RoPE position of every cached key, all layers in one launch.

``rope_rebase_(k, delta, theta)``: k [..., D] keys stored after Wan2.1's 3D RoPE (interleaved
pairs; t/h/w bands of D - 4*(D//6), 2*(D//6), 2*(D//6) real channels), delta a 0-dim int64
tensor on k's device. Every key's temporal position moves by ``delta`` frames: the pairs of the t
band are rotated by ``delta * freq_i`` (freq_i = theta**(-2i/t_band)); the h and w bands do not
change. Rotations compose, so a key rotated at position p and re-based by delta equals the key
rotated at p + delta, and q.k depends only on the positions' difference: attention over a
re-based cache equals attention without the re-base wherever both are defined.

Two steps, no host sync (graph-safe: ``delta`` is read on the device, so a captured graph
replays any later delta written into the same tensor):

1. setup (torch, tiny): the angles delta * freq_i in float64, their cos/sin rounded to fp32
   ([t_band/2] each).
2. one kernel launch over a [G, R, D] view of k (G = leading index such as the layer, R = rows of
   (video, token, head)): one program per (row tile, g) loads the t-band pairs of its rows,
   rotates them in fp32 and stores them back in k's dtype. Only t_band of the D channels are
   read and written. Offsets are int64.

Precision: one rounding to k's dtype per re-base (bf16: about 2**-9 relative per element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import INTERPRET
from .validate import FLOAT_DTYPES


def t_band(head_dim: int) -> int:
    """Real channels of the temporal RoPE band of a Wan head of ``head_dim`` (44 for 128)."""
    return head_dim - 4 * (head_dim // 6)


@triton.jit
def _rebase_kernel(
    K, COS, SIN,
    s_g, s_r,
    R,
    NP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < NP
    c = tl.load(COS + offs_p, mask=p_ok, other=1.0)
    s = tl.load(SIN + offs_p, mask=p_ok, other=0.0)
    m = (offs_r < R)[:, None] & p_ok[None, :]
    ptr = K + g * s_g + offs_r[:, None] * s_r + 2 * offs_p[None, :]
    x0 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(ptr + 1, mask=m, other=0.0).to(tl.float32)
    y0 = x0 * c[None, :] - x1 * s[None, :]
    y1 = x0 * s[None, :] + x1 * c[None, :]
    tl.store(ptr, y0.to(K.dtype.element_ty), mask=m)
    tl.store(ptr + 1, y1.to(K.dtype.element_ty), mask=m)


def rebase_cos_sin(delta: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos/sin [t_band/2] fp32 of the angles delta * freq_i (float64), on delta's device. Host sync: none."""
    band = t_band(head_dim)
    freqs = theta ** (-torch.arange(0, band, 2, dtype=torch.float64, device=delta.device) / band)
    ang = delta.to(torch.float64) * freqs
    return ang.cos().float(), ang.sin().float()


def rope_rebase_(k: torch.Tensor, delta: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Move every key's temporal RoPE position by ``delta`` frames, in place.

    Args:
        k: [..., D] keys after Wan RoPE (e.g. a KV cache's keys [layers, B, L, H, D]), fp32/fp16/
            bf16, last dim contiguous; viewable as [G, R, D] with G = k.shape[0] (for 2-D k: G = 1).
        delta: 0-dim int32/int64 tensor on k's device (positions p -> p + delta).
        theta: RoPE base (10000 for Wan).

    Returns:
        k (rotated in place). Host sync: none.
    """
    if not isinstance(k, torch.Tensor) or k.dtype not in FLOAT_DTYPES or k.dim() < 2:
        raise TypeError(f"k must be a float32/float16/bfloat16 tensor [..., D] with >= 2 dims, got "
                        f"{getattr(k, 'dtype', type(k).__name__)} {tuple(getattr(k, 'shape', ()))}")
    D = k.shape[-1]
    if D < 6 or D % 2:
        raise ValueError(f"k's last dim (head_dim) must be even and >= 6, got {D}")
    if not isinstance(delta, torch.Tensor) or delta.dim() != 0 or delta.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"delta must be a 0-dim int32/int64 tensor, got {getattr(delta, 'dtype', type(delta).__name__)} "
                        f"{tuple(getattr(delta, 'shape', ()))}")
    if delta.device != k.device:
        raise ValueError(f"delta is on {delta.device} but k is on {k.device}")
    if k.numel() == 0:
        return k
    if k.stride(-1) != 1:
        raise ValueError(f"k must have a contiguous last dimension, got strides {k.stride()}")
    G = k.shape[0] if k.dim() > 2 else 1
    try:
        k3 = k.view(G, -1, D)
    except RuntimeError:
        raise ValueError(
            f"k {tuple(k.shape)} with strides {k.stride()} cannot be viewed as [G, rows, D]: the dims "
            "between the first and the last must be contiguous together"
        ) from None
    cos, sin = rebase_cos_sin(delta, D, theta)
    NP = cos.numel()
    R = k3.shape[1]
    block_r = 16 if INTERPRET else 64
    grid = (triton.cdiv(R, block_r), G)
    _rebase_kernel[grid](
        k3, cos, sin,
        k3.stride(0), k3.stride(1),
        R,
        NP=NP, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(NP),
        num_warps=1 if INTERPRET else 4,
    )  # fmt: skip
    return k


__all__ = ["rebase_cos_sin", "rope_rebase_", "t_band"]
