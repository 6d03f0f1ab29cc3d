"""Wan2.1 3D rotary position embedding (interleaved pairs, separate t/h/w frequency bands).

head_dim D is split into bands of t/h/w = D - 4*(D//6), 2*(D//6), 2*(D//6) real channels
(44/42/42 for D=128). Channels 2j and 2j+1 form one complex number rotated by the angle
pos_axis * theta**(-2i/band) of its band (i = the pair index inside the band).
"""

from __future__ import annotations

import torch

MAX_POSITIONS = 1024  # table length per axis in the reference code (a hard limit on frames)
THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real channels of the (t, h, w) bands for ``head_dim``."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(head_dim: int, max_positions: int = MAX_POSITIONS, theta: float = THETA, device=None):
    """cos/sin tables [max_positions, head_dim // 2] fp32.

    Row p holds the angles of position p for every complex pair: the first t/2 pairs with the
    t band's frequencies, then h/2 and w/2 pairs with theirs (each axis indexes its own slice).
    Angles are computed in float64 as upstream, then cos/sin are rounded to fp32.
    """
    pos = torch.arange(max_positions, dtype=torch.float64, device=device)
    freqs = [theta ** (-torch.arange(0, band, 2, dtype=torch.float64, device=device) / band) for band in rope_split(head_dim)]
    angles = torch.outer(pos, torch.cat(freqs))
    return angles.cos().float(), angles.sin().float()


def _frame_positions(frame_start, num_frames: int, device, max_positions: int = MAX_POSITIONS) -> torch.Tensor:
    """int64 positions [num_frames] = frame_start + arange; frame_start int or 0-dim integer tensor.

    Host sync: none (a tensor frame_start stays on the device; its value is never read).
    """
    ar = torch.arange(num_frames, device=device)
    if isinstance(frame_start, torch.Tensor):
        if frame_start.dim() != 0 or frame_start.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"frame_start must be an int or a 0-dim int32/int64 tensor, got {tuple(frame_start.shape)} {frame_start.dtype}"
            )
        return frame_start.to(device=device, dtype=torch.int64) + ar
    if isinstance(frame_start, bool) or not isinstance(frame_start, int):
        raise TypeError(f"frame_start must be an int or a 0-dim integer tensor, got {type(frame_start).__name__}")
    if frame_start < 0 or frame_start + num_frames > max_positions:
        raise ValueError(
            f"frames [{frame_start}, {frame_start + num_frames}) exceed the RoPE table of {max_positions} positions"
            " (rollouts re-base positions past it: tokentrim.rollout.positions)"
        )
    return ar + frame_start


def rope_cos_sin(cos_tab, sin_tab, frame_start, num_frames: int, h: int, w: int):
    """cos/sin [num_frames*h*w, D/2] fp32 for tokens in (frame, row, col) order.

    frame_start: int or 0-dim int64 device tensor (graph-safe: the tables are indexed on the
    device, nothing is read back). Host sync: none.
    """
    dev = cos_tab.device
    nt, nh, _ = (b // 2 for b in rope_split(2 * cos_tab.shape[1]))
    f_idx = _frame_positions(frame_start, num_frames, dev, cos_tab.shape[0])
    out = []
    for tab in (cos_tab, sin_tab):
        ft = tab[:, :nt].index_select(0, f_idx)[:, None, None, :].expand(num_frames, h, w, nt)
        ht = tab[:h, nt : nt + nh][None, :, None, :].expand(num_frames, h, w, nh)
        wt = tab[:w, nt + nh :][None, None, :, :].expand(num_frames, h, w, tab.shape[1] - nt - nh)
        out.append(torch.cat([ft, ht, wt], dim=-1).reshape(num_frames * h * w, tab.shape[1]))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by cos/sin [L, D/2]; computed in fp32, returns x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)
