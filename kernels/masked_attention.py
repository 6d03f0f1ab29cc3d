"""Forward-only flash attention over the kept keys of a cache-layout K/V buffer (kernel v2).

``masked_attention(q, k, v, keep=None, kv_len=None, scale=None)``: q [B,Lq,H,D], k/v [B,Lk_max,H,D]
(read in place through their strides, e.g. views of a [layers, 2, B, L, H, D] cache), ``keep``
[B,Lk_max] bool (True = attend), ``kv_len`` [B] int32/int64 device tensor (keys at or past kv_len[b]
are ignored; clamped to [0, Lk_max] in the kernel). Online softmax in fp32; the output [B,Lq,H,D]
has q's dtype. A query row with no attended key is all zeros; a key that is not attended never
influences the output (its K/V are not loaded: masked loads give 0); NaN in q or in an attended
key's K/V propagates.

The work plan (``attention_plan``, once per forward, a few small torch ops, no host sync) splits the
attended key range of every video into

- full tiles: ``FULL_TILE`` (128) consecutive keys all attended. They run a mask-free loop: no keep
  loads, no ``where``, unmasked K/V loads, ``BLOCK_N`` in {64, 128} per autotune config (a full
  tile is ``FULL_TILE // BLOCK_N`` kernel steps);
- partial tiles: ``PART_TILE`` (64) keys with at least one but not all attended (and not inside a
  full tile). They run the masked loop; their keep bits come packed, one int64 word per tile
  (bit j = key tile*64+j attended), instead of 64 byte loads.

Tiles with no attended key (pruned, or past kv_len) are in neither list: they cost nothing. Without
``keep`` no plan is needed: full tiles are 0 .. kv_len // FULL_TILE - 1 and the (at most two) tail
partial tiles are masked by kv_len.

Split-KV (flash-decoding style): when B*H*cdiv(Lq, 128) programs fill less than about 4 waves of the
device's SMs, ``choose_splits`` (from the device's SM count) splits each program's full and partial
tile lists into S in {2, 3, 4} contiguous shares run by separate programs; each writes its fp32
partial output and base-2 log-sum-exp, and a second small kernel merges them. The result equals the
unsplit one within rounding.

Under ``TRITON_INTERPRET=1`` the tiles shrink (FULL_TILE 32, PART_TILE 16) so the tests stay fast.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .rows import INTERPRET
from .validate import check_attention_inputs, check_kv_len_range

HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634

#: keys per full tile (the unit of the mask-free loop) and per partial tile (one 64-bit keep word)
FULL_TILE = 32 if INTERPRET else 128
PART_TILE = 16 if INTERPRET else 64
MAX_SPLITS = 4
#: split-KV: programs below this many waves of SMs are split ...
SPLIT_BELOW_WAVES = 4
#: ... as long as every split keeps at least this many keys (the merge pass costs about
#: 2 * S / Lk bytes per attention FLOP; above 4096 keys a split stays under ~10% of the work)
MIN_KEYS_PER_SPLIT = 4096
#: BLOCK_M the split decision assumes (the large autotune configs)
SPLIT_BLOCK_M = 128


def tile_size() -> int:
    """Partial key tile length (the finest skipping granule)."""
    return PART_TILE


# (BLOCK_M, BLOCK_N, num_warps, num_stages), each compiled spill-free for sm_90a (tests/test_aot.py;
# ptxas 12.8 with divisibility-16 strides): BLOCK_N 128 needs 2 stages (K+V ring of 2 x 2 x 128 x
# 128 bf16 = 128 KB plus Q: 160 KB shared). 4-warp BLOCK_M 128 and 4-warp BLOCK_N 64 configs spill
# (255 registers) and are left out.
GPU_CONFIGS = (
    (128, 128, 8, 2),
    (64, 128, 4, 2),
    (128, 64, 8, 3),
    (128, 64, 8, 2),
)
INTERP_CONFIG = (16, 16, 1, 1)


def _configs():
    rows = [INTERP_CONFIG] if INTERPRET else GPU_CONFIGS
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


def _bucket(n: int, cap: int) -> int:
    """Autotune key of a length n: the next power of two >= n (1 for n <= 1), at most cap."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


@triton.jit
def _online_step(q, k_ptrs, v_ptrs, ok, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One key step of the online softmax. MASKED: ``ok`` [BLOCK_N] selects attended keys (loads of
    the others give 0, their scores -inf); otherwise every key is attended (no mask, no select; ok
    is not read and may be None)."""
    if MASKED:
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row with no attended key so far has m_new = -inf: shift by 0 so exp2(-inf) = 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_shift = m_new
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _row_block(Lq, H, BLOCK_M: tl.constexpr):
    """This program's (batch, head) and its BLOCK_M query rows (grid axes 0 = row block, 1 = b*H + h)."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), offs_m, offs_m < Lq


@triton.jit
def _store_rows(O, out, b, h, offs_m, offs_d, row_ok, sob, sol, soh):
    o_ptrs = O + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * sol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _masked_attn_fwd(
    Q, K, V, O, OS, LSE, KV_LEN, TILES, COUNTS,
    sqb, sql, sqh,
    skb, skl, skh,
    svb, svl, svh,
    sob, sol, soh,
    stiles_b, PART_OFF, BITS_OFF,
    Lq, Lk, H, qk_scale,
    LQ_BUCKET, LK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL_N: tl.constexpr, PART_N: tl.constexpr, SPLITS: tl.constexpr,
    HAS_KEEP: tl.constexpr, HAS_KV_LEN: tl.constexpr, IEEE_DOT: tl.constexpr,
):  # fmt: skip
    pid_bh, b, h, offs_m, row_ok = _row_block(Lq, H, BLOCK_M)
    pid_s = tl.program_id(2)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    if HAS_KEEP:
        n_full = tl.load(COUNTS + 2 * b)
        n_part = tl.load(COUNTS + 2 * b + 1)
    else:
        if HAS_KV_LEN:
            kvl = tl.minimum(tl.maximum(tl.load(KV_LEN + b), 0), Lk).to(tl.int32)
        else:
            kvl = Lk
        n_full = kvl // FULL_N
        part0 = n_full * (FULL_N // PART_N)
        n_part = tl.cdiv(kvl, PART_N) - part0
    # this program's contiguous share of both lists
    f_lo = (n_full * pid_s) // SPLITS
    f_hi = (n_full * (pid_s + 1)) // SPLITS
    p_lo = (n_part * pid_s) // SPLITS
    p_hi = (n_part * (pid_s + 1)) // SPLITS

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # pointer = scalar tile base (int64) + loop-invariant int32 offsets: few registers per tile
    offs_n0 = tl.arange(0, BLOCK_N)
    k_off = (offs_n0 * skl)[:, None] + offs_d[None, :]
    v_off = (offs_n0 * svl)[:, None] + offs_d[None, :]
    for i in range(f_lo, f_hi):
        if HAS_KEEP:
            tile = tl.load(TILES + b * stiles_b + i)
        else:
            tile = i
        for j in tl.static_range(FULL_N // BLOCK_N):
            start = (tile * FULL_N + j * BLOCK_N).to(tl.int64)
            m_i, l_i, acc = _online_step(
                q, k_base + start * skl + k_off, v_base + start * svl + v_off,
                None, m_i, l_i, acc, qk_scale, False, IEEE_DOT,  # no mask: every key attended
            )  # fmt: skip

    offs_p0 = tl.arange(0, PART_N)
    kp_off = (offs_p0 * skl)[:, None] + offs_d[None, :]
    vp_off = (offs_p0 * svl)[:, None] + offs_d[None, :]
    for i in range(p_lo, p_hi):
        if HAS_KEEP:
            tile = tl.load(TILES + b * stiles_b + PART_OFF + i)
            # the tile's 64 keep bits: two int32 words (low, high), bit j of the pair = key j
            w_ptr = TILES + b * stiles_b + BITS_OFF + 2 * tile
            word = tl.where(offs_p0 < 32, tl.load(w_ptr), tl.load(w_ptr + 1))
            ok = ((word >> (offs_p0 & 31)) & 1) != 0
        else:
            tile = part0 + i
            ok = tile * PART_N + offs_p0 < kvl
        start = (tile * PART_N).to(tl.int64)
        m_i, l_i, acc = _online_step(
            q, k_base + start * skl + kp_off, v_base + start * svl + vp_off,
            ok, m_i, l_i, acc, qk_scale, True, IEEE_DOT,
        )  # fmt: skip

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SPLITS == 1:
        _store_rows(O, out, b, h, offs_m, offs_d, row_ok, sob, sol, soh)
    else:
        # OS [S, B, H, Lq, D] fp32, LSE [S, B, H, Lq] fp32 (base 2, -inf for a row without keys)
        row = ((pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * Lq + offs_m).to(tl.int64)
        tl.store(OS + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE + row, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    O, OS, LSE, sob, sol, soh, Lq, H, BH,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); rows whose splits all lack keys are 0."""
    pid_bh, b, h, offs_m, row_ok = _row_block(Lq, H, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        row = (s * BH + pid_bh).to(tl.int64) * Lq + offs_m
        m = tl.maximum(m, tl.load(LSE + row, mask=row_ok, other=float("-inf")))
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        row = (s * BH + pid_bh).to(tl.int64) * Lq + offs_m
        w = tl.exp2(tl.load(LSE + row, mask=row_ok, other=float("-inf")) - m_shift)
        o_s = tl.load(OS + row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        den += w
        acc += w[:, None] * o_s
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    _store_rows(O, out, b, h, offs_m, offs_d, row_ok, sob, sol, soh)


#: fp32 inputs (exact IEEE dots, for tests) fit shared memory only with a small tile
FP32_CONFIG = (64, 64, 4, 2)


def _prune_configs(configs, named_args, **kwargs):
    """fp32 (IEEE_DOT) launches use FP32_CONFIG only: BLOCK_N 128 fp32 K/V rings exceed 227 KB."""
    if kwargs.get("IEEE_DOT", named_args.get("IEEE_DOT")) and not INTERPRET:
        m, n, w, st = FP32_CONFIG
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)]
    return configs


_masked_attn_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_KEEP", "SPLITS", "IEEE_DOT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_masked_attn_fwd)


# ------------------------------------------------------------------------------------------ plan
class AttentionPlan(NamedTuple):
    """Which key tiles ``masked_attention`` visits, per video: a pair of int32 tensors on keep's device
    (a pair, so it crosses the ``torch.ops.tokentrim`` boundary as two tensors).

    tiles  [B, plan_width(Lk)] int32, three sections per row (nF = max(1, Lk // FULL_TILE),
           nP = cdiv(Lk, PART_TILE)):
           [0, nF)            indices of the fully attended FULL_TILE-key tiles (tile t = keys
                              [t*FULL_TILE, (t+1)*FULL_TILE)), ascending, counts[b, 0] valid;
           [nF, nF+nP)        indices of the partially attended PART_TILE-key tiles (some but not
                              all keys attended, not inside a full tile), ascending, counts[b, 1] valid;
           [nF+nP, nF+3*nP)   the keep bits of every PART_TILE-key tile as (low, high) int32 words
                              of one 64-bit word: bit j = key t*PART_TILE + j is kept and below kv_len.
    counts [B, 2] int32: (full tiles, partial tiles) per video.
    """

    tiles: torch.Tensor
    counts: torch.Tensor


def plan_sections(lk: int) -> tuple[int, int, int]:
    """(nF, nP, width) of a plan row for Lk keys: full-list length, partial-list length, row width."""
    n_full = max(1, lk // FULL_TILE)
    n_part = triton.cdiv(lk, PART_TILE)
    return n_full, n_part, n_full + 3 * n_part


def plan_width(lk: int) -> int:
    """Columns of ``AttentionPlan.tiles`` for Lk keys."""
    return plan_sections(lk)[2]


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[B, n*PART_TILE] bool -> [B, 2n] int32: (low, high) halves of word t, bit j = mask[:, t*PART_TILE + j]."""
    B, L = mask.shape
    m = mask.view(B, L // PART_TILE, PART_TILE).to(torch.int64)
    low = min(PART_TILE, 63)
    words = (m[..., :low] << torch.arange(low, device=mask.device)).sum(dim=-1)
    if PART_TILE == 64:  # bit 63 is the sign bit: OR it in (the sum would overflow)
        words |= m[..., 63] << 63
    # little-endian int64 -> (low, high) int32 pairs (CUDA devices and x86/ARM hosts)
    return words.contiguous().view(torch.int32)


def _list_first(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the True entries of each row first, ascending, then the others (int32)."""
    return torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)


def attention_plan(keep: torch.Tensor, kv_len: torch.Tensor | None) -> AttentionPlan:
    """The tile plan for ``keep`` [B,Lk] bool and ``kv_len`` [B] int (or None; clamped to [0, Lk]).

    Host sync: none (a handful of small torch ops on keep's device, once per forward).
    """
    B, Lk = keep.shape
    dev = keep.device
    mask = keep
    if kv_len is not None:
        mask = keep & (torch.arange(Lk, device=dev)[None, :] < kv_len.to(dev)[:, None])
    n_fslots, n_part, width = plan_sections(Lk)
    padded = torch.zeros(B, n_part * PART_TILE, dtype=torch.bool, device=dev)
    padded[:, :Lk] = mask
    per_part = padded.view(B, n_part, PART_TILE).sum(dim=2)
    ratio = FULL_TILE // PART_TILE
    n_full = Lk // FULL_TILE
    full = (per_part[:, : n_full * ratio] == PART_TILE).view(B, n_full, ratio).all(dim=2)
    covered = torch.zeros(B, n_part, dtype=torch.bool, device=dev)
    covered[:, : n_full * ratio] = full.repeat_interleave(ratio, dim=1)
    partial = (per_part > 0) & ~covered
    tiles = torch.zeros(B, width, dtype=torch.int32, device=dev)
    if n_full:
        tiles[:, :n_full] = _list_first(full)
    tiles[:, n_fslots : n_fslots + n_part] = _list_first(partial)
    tiles[:, n_fslots + n_part :] = _pack_bits(padded)
    counts = torch.stack([full.sum(dim=1), partial.sum(dim=1)], dim=1).to(torch.int32)
    return AttentionPlan(tiles, counts)


def _check_plan(plan, B: int, Lk: int, width: int, device) -> AttentionPlan:
    """``plan`` as an AttentionPlan of [B, width] / [B, 2] int32 tensors on device (width =
    ``plan_width(Lk)``, Lk for the message only), made contiguous where its strides differ."""
    if not isinstance(plan, (tuple, list)) or len(plan) != 2:
        raise ValueError("tiles must be attention_plan(keep, kv_len): a pair (tiles, counts)")
    plan = AttentionPlan(*plan)
    want = {"tiles": (B, width), "counts": (B, 2)}
    for name, shape in want.items():
        t = getattr(plan, name)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.int32:
            got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"tiles must be attention_plan(keep, kv_len) for B={B}, Lk={Lk}: "
                f"{name} should be {list(shape)} int32, got {got}"
            )
        if t.device != device:
            raise ValueError(f"tiles.{name} is on {t.device}, expected {device}")
    if plan.tiles.stride(1) != 1 or plan.counts.stride(1) != 1 or plan.counts.stride(0) != 2:
        plan = AttentionPlan(plan.tiles.contiguous(), plan.counts.contiguous())
    return plan


# ----------------------------------------------------------------------------------------- split
@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_splits(programs: int, sms: int, lk: int) -> int:
    """Key-range splits S for ``programs`` = B*H*cdiv(Lq, SPLIT_BLOCK_M) on ``sms`` SMs and Lk keys.

    1 when the programs already fill SPLIT_BELOW_WAVES waves, when sms is unknown (< 1), or when a
    split would get fewer than MIN_KEYS_PER_SPLIT keys. Otherwise the S in 2..MAX_SPLITS whose last
    wave is fullest (wave efficiency programs*S / (sms * ceil(programs*S / sms))), smallest S on
    ties, provided it beats the unsplit efficiency by at least 5%.
    """
    if sms < 1 or programs < 1 or programs >= SPLIT_BELOW_WAVES * sms:
        return 1
    max_s = min(MAX_SPLITS, lk // MIN_KEYS_PER_SPLIT)

    def eff(s):
        work = programs * s
        return work / (sms * triton.cdiv(work, sms))

    best, best_eff = 1, eff(1)
    for s in range(2, max_s + 1):
        if eff(s) > best_eff * 1.05 and (best == 1 or eff(s) > best_eff):
            best, best_eff = s, eff(s)
    return best


def _default_splits(q: torch.Tensor, B: int, H: int, Lq: int, Lk: int) -> int:
    if q.device.type != "cuda":
        return 1
    programs = B * H * triton.cdiv(Lq, SPLIT_BLOCK_M)
    return choose_splits(programs, _sm_count(q.device.index or 0), Lk)


# -------------------------------------------------------------------------------------- launcher
def _check_last_dim(name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {x.stride()}")


def masked_attention(
    q, k, v, keep=None, kv_len=None, scale=None, out=None, check_range: bool = False, tiles=None,
    splits: int | None = None, config: tuple[int, int, int, int] | None = None,
):  # fmt: skip
    """Flash attention of q over the attended keys of k/v (see the module docstring).

    Args:
        q: [B,Lq,H,D] bf16/fp16/fp32, D in {64, 128}, last dim contiguous.
        k, v: [B,Lk_max,H,D], q's dtype, any strides with a contiguous last dim.
        keep: optional [B,Lk_max] bool, True = attend.
        kv_len: optional [B] int32/int64 on q's device; clamped to [0, Lk_max] in the kernel.
        scale: softmax scale (default D**-0.5).
        out: optional [B,Lq,H,D] output tensor of q's dtype (last dim contiguous), written fully.
        check_range: also check 0 <= kv_len <= Lk_max (one host sync).
        tiles: optional ``attention_plan(keep, kv_len)`` computed by the caller once and reused by
            every layer that attends under the same keep/kv_len (ignored without keep).
        splits: key-range splits (1..MAX_SPLITS); None = ``choose_splits`` from the device's SM
            count (1 off CUDA).
        config: (BLOCK_M, BLOCK_N, num_warps, num_stages) to bypass the autotuner (tests, aot).

    Returns:
        o [B,Lq,H,D] in q's dtype (``out`` when given). Host sync: none (unless check_range).
    """
    check_attention_inputs(q, k, v, keep, kv_len)
    return masked_attention_unchecked(q, k, v, keep, kv_len, scale, out, check_range, tiles, splits, config)


def masked_attention_unchecked(q, k, v, keep=None, kv_len=None, scale=None, out=None, check_range: bool = False,
                               tiles=None, splits: int | None = None, config=None):
    """``masked_attention`` for a caller that ran ``check_attention_inputs`` already
    (``tokentrim.ops``, once per layer call); the Triton-specific checks still run."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {HEAD_DIMS} for the Triton kernel, got {D}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_last_dim(name, x)
    if check_range and kv_len is not None:
        check_kv_len_range(kv_len, Lk)
    if out is None:
        out = torch.empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    else:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (B, Lq, H, D) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"out must be [{B}, {Lq}, {H}, {D}] {q.dtype} on {q.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        _check_last_dim("out", out)
    if splits is None:
        splits = _default_splits(q, B, H, Lq, Lk)
    elif isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be an int in [1, {MAX_SPLITS}] or None, got {splits!r}")
    if out.numel() == 0:
        return out

    scale = D**-0.5 if scale is None else float(scale)
    if keep is not None:
        n_fslots, n_part, width = plan_sections(Lk)
        if tiles is None:
            plan_t, counts = attention_plan(keep, kv_len)
        else:
            plan_t, counts = _check_plan(tiles, B, Lk, width, q.device)
        stiles_b, part_off, bits_off = plan_t.stride(0), n_fslots, n_fslots + n_part
    else:
        plan_t = counts = None
        stiles_b = part_off = bits_off = 0
    if splits > 1:
        o_split = torch.empty(splits, B, H, Lq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, B, H, Lq, dtype=torch.float32, device=q.device)
    else:
        o_split = lse = None

    args = (
        q, k, v, out, o_split, lse, kv_len, plan_t, counts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stiles_b, part_off, bits_off,
        Lq, Lk, H, scale * _LOG2E,
        _bucket(Lq, 1 << 15), _bucket(Lk, 1 << 17),
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=D, FULL_N=FULL_TILE, PART_N=PART_TILE, SPLITS=splits,
        HAS_KEEP=keep is not None, HAS_KV_LEN=kv_len is not None, IEEE_DOT=q.dtype == torch.float32,
    )  # fmt: skip
    if config is None:

        def grid(m):
            return (triton.cdiv(Lq, m["BLOCK_M"]), B * H, splits)

        _masked_attn_fwd_tuned[grid](*args, **meta)
    else:
        bm, bn, warps, stages = config
        if FULL_TILE % bn or bn < 16:
            raise ValueError(f"config BLOCK_N must divide FULL_TILE={FULL_TILE}, got {bn}")
        _masked_attn_fwd[(triton.cdiv(Lq, bm), B * H, splits)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
    if splits > 1:
        bm = 16 if INTERPRET else 64
        _merge_splits[(triton.cdiv(Lq, bm), B * H)](
            out, o_split, lse, out.stride(0), out.stride(1), out.stride(2), Lq, H, B * H,
            HEAD_DIM=D, BLOCK_M=bm, SPLITS=splits, num_warps=1 if INTERPRET else 4,
        )  # fmt: skip
    return out


__all__ = [
    "masked_attention",
    "masked_attention_unchecked",
    "attention_plan",
    "AttentionPlan",
    "plan_width",
    "plan_sections",
    "choose_splits",
    "tile_size",
    "FULL_TILE",
    "PART_TILE",
    "GPU_CONFIGS",
    "HEAD_DIMS",
]
