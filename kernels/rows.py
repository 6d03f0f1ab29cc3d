"""Launch helpers of the row-wise kernels (``ln_modulate``, ``qk_norm_rope``): one program per row
of the last dimension. Also ``INTERPRET``, shared by every kernel module's launch sizes."""

from __future__ import annotations

import os

import torch

#: Triton's interpreter is on (TRITON_INTERPRET set before import): launchers pick tiny tiles/warps
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., dim] as [R, dim] rows with a unit last stride (a copy only when a view cannot do)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def row_warps(dim: int) -> int:
    """Warps of a program that owns one row of ``dim`` elements (1 under the interpreter)."""
    return 1 if INTERPRET else (4 if dim <= 2048 else 8)
