"""Fused drift / top-k kernel: the Triton twin of ``tokentrim.reference.drift_topk``.

Two launches (or one with ``single_launch=True``, see ``_drift_topk_kernel``):

1. ``_drift_kernel``, grid (B, cdiv(N, BLOCK_T)): each program reads, for a tile of tokens, every
   frame of ``cand`` and ``prev`` at every channel and patch offset (in place, with strides),
   forms the frame means in fp32, and writes ``drift[b, n] = ||mean_f cand - mean_f prev||_2``.
   The token summaries stay in registers; nothing but the drift reaches global memory.
2. ``_topk_kernel``, grid (B,): one program per video sorts the N drifts packed with their index
   into one int64 key (drift bits high, reversed index low), so a single descending sort gives
   decreasing drift with ties toward the lower index; it writes the first k indices and their
   mean drift (the severity).

With ``single_launch=True``, ``_drift_topk_kernel`` runs both in the grid of (1): after writing
its tile, each program bumps a per-video atomic counter and the last one of its video sorts.

Drift is >= 0, so the bits of an fp32 drift order like the values; N is capped at ``MAX_N``
because the top-k sort holds a whole row (next power of two of N) in one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import INTERPRET
from .validate import check_drift_inputs, check_finite

MAX_N = 32768  # tokens per frame the single-program top-k sort accepts (832x480 latents: N = 1560)

if INTERPRET:  # the interpreter fails with more than one autotune config
    _DRIFT_CONFIGS = [triton.Config({"BLOCK_T": 64}, num_warps=4)]
else:
    _DRIFT_CONFIGS = [triton.Config({"BLOCK_T": bt}, num_warps=nw) for bt in (32, 64, 128) for nw in (2, 4)]
# The single-launch kernel also sorts a whole row in the last program. sm_90a compiles (bench/aot.py)
# of that sort spilled 4 bytes at 4 warps (triton 3.7.1) and at 8 warps with BLOCK_T 32/64 (triton
# 3.6.0); 2 warps compiled spill-free on both, so the experimental single launch runs 2 warps.
_SINGLE_CONFIGS = (
    _DRIFT_CONFIGS if INTERPRET else [triton.Config({"BLOCK_T": bt}, num_warps=2) for bt in (32, 64, 128)]
)


@triton.jit
def _tile_drift(
    cand_ptr, prev_ptr, drift_ptr, b, tile,
    N, WT, C, F, FP,
    csb, csf, csc, csh, csw,
    psb, psf, psc, psh, psw,
    PH: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """drift[b, tile*BLOCK_T : (tile+1)*BLOCK_T] from the latents, read once with their strides."""
    tok = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < N
    h = tok // WT
    w = tok % WT
    p = tl.arange(0, PP)  # patch offset (i, j) flattened row-major, padded to a power of two
    row = (h[:, None] * PH + (p // PW)[None, :]).to(tl.int64)
    col = (w[:, None] * PW + (p % PW)[None, :]).to(tl.int64)
    mask = tok_ok[:, None] & (p < PH * PW)[None, :]

    c_ptrs = cand_ptr + b * csb + row * csh + col * csw  # [BLOCK_T, PP], frame 0 channel 0
    p_ptrs = prev_ptr + b * psb + row * psh + col * psw
    inv_f = 1.0 / F.to(tl.float32)
    inv_fp = 1.0 / FP.to(tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for _c in range(C):
        sum_c = tl.zeros([BLOCK_T, PP], dtype=tl.float32)
        ptrs = c_ptrs
        for _f in range(F):
            sum_c += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)  # bf16/fp16 -> fp32 first
            ptrs += csf
        sum_p = tl.zeros([BLOCK_T, PP], dtype=tl.float32)
        ptrs = p_ptrs
        for _f in range(FP):
            sum_p += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            ptrs += psf
        diff = sum_c * inv_f - sum_p * inv_fp
        sq += tl.sum(diff * diff, axis=1)
        c_ptrs += csc
        p_ptrs += psc
    tl.store(drift_ptr + b * N + tok, tl.sqrt_rn(sq), mask=tok_ok)


@triton.autotune(configs=_DRIFT_CONFIGS, key=["N", "C", "PH", "PW"])
@triton.jit(do_not_specialize=["F", "FP"])
def _drift_kernel(
    cand_ptr, prev_ptr, drift_ptr,
    N, WT, C, F, FP,
    csb, csf, csc, csh, csw,
    psb, psf, psc, psh, psw,
    PH: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    _tile_drift(
        cand_ptr, prev_ptr, drift_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1),
        N, WT, C, F, FP, csb, csf, csc, csh, csw, psb, psf, psc, psh, psw, PH, PW, PP, BLOCK_T,
    )  # fmt: skip


@triton.jit
def _pair_indicator(n_dims: tl.constexpr, axis_from_inner: tl.constexpr):
    """[1,..,2,..,1] tensor holding (0, 1) along one axis of the [2]*n_dims hypercube."""
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - axis_from_inner - 1) + [2] + [1] * axis_from_inner)


@triton.jit
def _compare_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    # Each pair along the i-th innermost axis becomes (min, max), or (max, min) where flip is 1.
    # min/max reductions (not the xor trick of tl.sort) keep the Triton interpreter fast.
    lo = tl.min(h, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(h, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((_pair_indicator(n_dims, i) ^ flip) != 0, hi, lo)


@triton.jit
def _sort_descending(x, LOG_N: tl.constexpr):
    """Bitonic sort of a 1-D tensor of 2**LOG_N elements, largest first."""
    h = tl.reshape(x, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        if stage < LOG_N:
            flip = _pair_indicator(LOG_N, stage)  # alternate directions of the merged runs
        else:
            flip = 1  # the last merge produces one descending run
        for r in tl.static_range(stage):
            h = _compare_swap(h, flip, stage - 1 - r, LOG_N)
    return tl.reshape(h, [2**LOG_N])


@triton.jit
def _row_topk(drift_ptr, idx_ptr, sev_ptr, b, N, k, BLOCK_N: tl.constexpr, LOG_N: tl.constexpr):
    """Sort drift[b, :N] (largest first, ties to the lower index); write idx[b, :k] and sev[b]."""
    offs = tl.arange(0, BLOCK_N)
    # Padding reads drift 0 at an index >= N, so it sorts after every real token (drift >= 0,
    # ties toward the lower index).
    d = tl.load(drift_ptr + b * N + offs, mask=offs < N, other=0.0, cache_modifier=".cg")
    # Sign bit cleared: drift >= 0 (a NaN from NaN input then sorts first instead of corrupting
    # the padding order). Low 32 bits hold BLOCK_N-1-index so equal drifts put lower indices first.
    bits = (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    key = (bits << 32) | (BLOCK_N - 1 - offs).to(tl.int64)
    key = _sort_descending(key, LOG_N)
    top_idx = (BLOCK_N - 1) - (key & (BLOCK_N - 1))  # low bits hold values < BLOCK_N
    top_d = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    in_top = offs < k
    tl.store(idx_ptr + b * k + offs, top_idx, mask=in_top)
    sev = tl.sum(tl.where(in_top, top_d, 0.0), axis=0) / k.to(tl.float32)
    tl.store(sev_ptr + b, sev)


@triton.jit(do_not_specialize=["k"])
def _topk_kernel(drift_ptr, idx_ptr, sev_ptr, N, k, BLOCK_N: tl.constexpr, LOG_N: tl.constexpr):
    _row_topk(drift_ptr, idx_ptr, sev_ptr, tl.program_id(0).to(tl.int64), N, k, BLOCK_N, LOG_N)


@triton.autotune(configs=_SINGLE_CONFIGS, key=["N", "C", "PH", "PW"])
@triton.jit(do_not_specialize=["F", "FP", "k"])
def _drift_topk_kernel(
    cand_ptr, prev_ptr, drift_ptr, idx_ptr, sev_ptr, count_ptr,
    N, WT, C, F, FP, k,
    csb, csf, csc, csh, csw,
    psb, psf, psc, psh, psw,
    PH: tl.constexpr, PW: tl.constexpr, PP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, LOG_N: tl.constexpr,
):  # fmt: skip
    """Single launch: every program writes its drift tile; the last one of a video to finish
    (counted with an atomic per video) sorts the row. The counter is reset for the next call."""
    b = tl.program_id(0).to(tl.int64)
    _tile_drift(
        cand_ptr, prev_ptr, drift_ptr, b, tl.program_id(1),
        N, WT, C, F, FP, csb, csf, csc, csh, csw, psb, psf, psc, psh, psw, PH, PW, PP, BLOCK_T,
    )  # fmt: skip
    tl.debug_barrier()  # all of this program's drift stores precede the release below
    done = tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(1) - 1:
        tl.store(count_ptr + b, 0)
        tl.debug_barrier()  # no thread reads the row before the acquire above
        _row_topk(drift_ptr, idx_ptr, sev_ptr, b, N, k, BLOCK_N, LOG_N)


def _check_out(out, B: int, N: int, k: int, device: torch.device):
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise TypeError(f"out must be a tuple (drift, idx, severity) of tensors, got {type(out).__name__}")
    specs = (("out[0] (drift)", (B, N), torch.float32), ("out[1] (idx)", (B, k), torch.int64),
             ("out[2] (severity)", (B,), torch.float32))  # fmt: skip
    for t, (name, shape, dtype) in zip(out, specs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name} must be {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    return tuple(out)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counters stay alive: captured CUDA graphs may use them


def _counters(device: torch.device, B: int) -> torch.Tensor:
    """Per-video completion counters of the single-launch kernel (zero between calls)."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < B:
        if c is not None:
            _RETIRED.append(c)
        c = _COUNTERS[device] = torch.zeros(max(B, 64), dtype=torch.int32, device=device)
    return c


def drift_topk(
    cand, prev, k: int, patch=(2, 2), *, out=None, check_finite_inputs: bool = False, single_launch=False
):
    """Fused per-token drift, top-k and severity. Twin of ``tokentrim.reference.drift_topk``.

    Args:
        cand: candidate latents [B,F,C,H,W], bf16/fp16/fp32, any strides (read in place).
        prev: previous latents [B,F',C,H,W], same B, C, H, W and device; F' may differ; its dtype
            may differ from cand's.
        k: int, 1 <= k <= N, N = (H/ph)*(W/pw) <= MAX_N.
        patch: (ph, pw), H % ph == W % pw == 0.
        out: optional preallocated (drift [B,N] fp32, idx [B,k] int64, severity [B] fp32),
            contiguous, on the inputs' device; every element is overwritten.
        check_finite_inputs: raise ValueError on NaN/Inf latents (one host sync). Off by default
            because ``tokentrim.ops.drift_topk`` checks before calling.
        single_launch: one launch instead of two: the last drift program of each video to finish
            does its top-k (a per-video atomic counter, kept by this module, decides which).
            Experimental: not safe for concurrent calls on different streams of one device.

    Returns:
        (drift [B,N] fp32, idx [B,k] int64 by decreasing drift, ties toward the lower index,
        severity [B] fp32 = mean drift of the top-k).
    """
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else patch
    ph, pw, N = check_drift_inputs(cand, prev, k, patch)
    if N > MAX_N:
        raise ValueError(f"cand has N={N} tokens per frame; the Triton drift_topk supports N <= {MAX_N}")
    if check_finite_inputs:
        check_finite("cand", cand)
        check_finite("prev", prev)
    B, F, C, H, W = cand.shape
    FP = prev.shape[1]
    if out is None:
        drift = torch.empty(B, N, dtype=torch.float32, device=cand.device)
        idx = torch.empty(B, k, dtype=torch.int64, device=cand.device)
        sev = torch.empty(B, dtype=torch.float32, device=cand.device)
    else:
        drift, idx, sev = _check_out(out, B, N, k, cand.device)

    grid = lambda meta: (B, triton.cdiv(N, meta["BLOCK_T"]))
    shape_args = (N, W // pw, C, F, FP)
    consts = dict(PH=ph, PW=pw, PP=triton.next_power_of_2(ph * pw))
    block_n = max(2, triton.next_power_of_2(N))  # the sort needs at least one pair
    sort_consts = dict(BLOCK_N=block_n, LOG_N=block_n.bit_length() - 1)
    if single_launch:
        count = _counters(cand.device, B)
        _drift_topk_kernel[grid](
            cand, prev, drift, idx, sev, count, *shape_args, k,
            *cand.stride(), *prev.stride(), **consts, **sort_consts,
        )  # fmt: skip
        return drift, idx, sev
    _drift_kernel[grid](cand, prev, drift, *shape_args, *cand.stride(), *prev.stride(), **consts)
    _topk_kernel[(B,)](drift, idx, sev, N, k, **sort_consts, num_warps=4 if block_n <= 2048 else 8)
    return drift, idx, sev
