"""Benchmark section "attention": masked attention over a pruned KV cache against its peers.

Section module for bench/run.py: ``SECTION``, ``add_arguments(parser)``, ``run(args, device)``.
Rows are long format: section, name, impl, shape, dtype, metric, value, unit, baseline, ratio.

CUDA (Wan2.1 shapes): B=1, H=12, D=128, Lq=4680, Lk in {4680, 14040, 32760}, keep fraction in
{1.0, 0.9, 0.5} (a random per-token mask, as TokenTrim's scattered pruning), bf16. K/V are views of
a [1 layer, 2, B, Lk, H, D] cache tensor. Implementations, all in the same run:

- ``sdpa_dense``: torch SDPA over all Lk keys (the baseline: what attention costs without pruning)
- ``sdpa_mask``: torch SDPA with the boolean keep mask
- ``flex``: torch.compile(flex_attention) with the equivalent BlockMask (BlockMask build reported
  separately as ``flex_blockmask``)
- ``flash_attn``: flash_attn_func over all keys, when flash-attn is importable
- ``tokentrim``: the masked kernel over the cache with keep + kv_len (includes its tile-list prepass)
- ``tokentrim_compact``: ``compact`` (compact_kv of one layer's K and V, in place) and
  ``attn_compacted`` (the kernel over the compacted prefix, kv_len = new length, no mask) and
  ``total`` (their sum)

Metrics: ``ms`` (median), ``TFLOP/s`` = 4*B*H*Lq*Lk_eff*D / time with Lk_eff the attended keys
(Lk for dense), and ``ratio`` = sdpa_dense ms / impl ms (> 1 means faster than dense SDPA) on the
``ms`` rows; on TFLOP/s rows ratio = impl TFLOP/s / sdpa_dense TFLOP/s.

CPU: small shapes (Lq=64, Lk in {128, 512}, H=2, D=64, fp32), reference and SDPA, plus the kernel
through the Triton interpreter only when TRITON_INTERPRET=1 was set before import and Lk is small
(the interpreter is ~1000x slower than compiled code; its times say nothing about GPU speed).
"""

from __future__ import annotations

import functools
import importlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SECTION = "attention"

GPU_SHAPE = dict(B=1, H=12, D=128, Lq=4680)
GPU_LK = (4680, 14040, 32760)
KEEP_FRACS = (1.0, 0.9, 0.5)
CPU_SHAPE = dict(B=1, H=2, D=64, Lq=64)
CPU_LK = (128, 512)
CPU_KEEP_FRACS = (1.0, 0.5)
CPU_KERNEL_MAX_LK = 128  # interpreter runs beyond this take seconds per call


def add_arguments(parser) -> None:
    g = parser.add_argument_group("attention section")
    g.add_argument(
        "--attn-lk", type=int, nargs="+", default=None, help="key lengths (default: Wan shapes on CUDA)"
    )
    g.add_argument("--attn-keep", type=float, nargs="+", default=None, help="keep fractions")
    g.add_argument(
        "--attn-no-flex", action="store_true", help="skip compiled FlexAttention (slow to compile)"
    )


# --------------------------------------------------------------------------------------- timing
def _timer():
    """The timing helper: bench.common's ``time_ms(fn, device)`` once that module provides it, else
    the local one (do_bench median on CUDA, perf_counter median on CPU)."""
    try:
        common = importlib.import_module("bench.common")
    except ImportError:
        return _time_ms
    return getattr(common, "time_ms", _time_ms)


def _time_ms(fn, device, reps: int | None = None) -> float:
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    reps = reps or 3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _note(msg: str) -> None:
    print(f"[attention] {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- inputs
def make_inputs(B, H, D, Lq, Lk, frac, dtype, device, seed=0):
    """q [B,Lq,H,D]; cache [1,2,B,Lk,H,D] with k/v its views; keep [B,Lk] (~frac kept); kv_len [B]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g).to(device=device, dtype=dtype)
    cache = torch.randn(1, 2, B, Lk, H, D, generator=g).to(device=device, dtype=dtype)
    keep = (
        (torch.rand(B, Lk, generator=g) < frac).to(device)
        if frac < 1.0
        else torch.ones(B, Lk, dtype=torch.bool, device=device)
    )
    kv_len = torch.full((B,), Lk, dtype=torch.int32, device=device)
    return q, cache, keep, kv_len


def _row(name, impl, shape, dtype, metric, value, unit, baseline, ratio):
    return dict(
        section=SECTION, name=name, impl=impl, shape=shape, dtype=str(dtype).replace("torch.", ""),
        metric=metric, value=value, unit=unit, baseline=baseline, ratio=ratio,
    )  # fmt: skip


def _rows_for(case, dtype, times: dict, flops: dict, base="sdpa_dense"):
    rows = []
    base_ms = times.get(base)
    for impl, ms in times.items():
        r = base_ms / ms if base_ms else None
        rows.append(_row("masked_attention", impl, case, dtype, "time", ms, "ms", base, r))
        if impl in flops:
            tf = flops[impl] / (ms * 1e-3) / 1e12
            base_tf = flops[base] / (base_ms * 1e-3) / 1e12 if base_ms else None
            rows.append(
                _row(
                    "masked_attention",
                    impl,
                    case,
                    dtype,
                    "throughput",
                    tf,
                    "TFLOP/s",
                    base,
                    tf / base_tf if base_tf else None,
                )
            )
    return rows


# ------------------------------------------------------------------------------------------ impls
def _sdpa(q, k, v, mask=None):
    # SDPA wants [B,H,L,D]; the transposes are views of the cache layout.
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )


def _flex_fns(q, k, v, keep, kv_len, compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Lq = q.shape[:2]
    Lk = k.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx] & (kv_idx < kv_len[b])

    def build():
        return create_block_mask(mask_mod, B, None, Lq, Lk, device=q.device)

    block_mask = build()
    fa = torch.compile(flex_attention) if compiled else flex_attention
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return build, lambda: fa(qt, kt, vt, block_mask=block_mask)


def _bench_case(
    B, H, D, Lq, Lk, frac, dtype, device, timer, *, kernel: bool, flex: bool, flex_compiled: bool
):
    from tokentrim.kernels import kv_compact, masked_attention

    from tokentrim import reference

    q, cache, keep, kv_len = make_inputs(B, H, D, Lq, Lk, frac, dtype, device)
    k, v = cache[0, 0], cache[0, 1]
    n_kept = int(keep.sum())  # setup only
    case = f"B{B} H{H} D{D} Lq{Lq} Lk{Lk} keep{frac:g}"
    dense_flops = 4.0 * B * H * Lq * Lk * D
    kept_flops = 4.0 * H * Lq * D * n_kept
    times, flops = {}, {}

    def add(impl, fn, fl, timer=timer):
        times[impl] = timer(fn, device)
        flops[impl] = fl

    add("sdpa_dense", lambda: _sdpa(q, k, v), dense_flops)
    sdpa_mask = keep[:, None, None, :]
    add("sdpa_mask", lambda: _sdpa(q, k, v, sdpa_mask), kept_flops)
    if torch.device(device).type == "cpu":
        add("reference", lambda: reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len), kept_flops)
    if flex:
        try:
            build, run_flex = _flex_fns(q, k, v, keep, kv_len, flex_compiled)
            add("flex", run_flex, kept_flops)
            times["flex_blockmask"] = timer(build, device)
        except Exception as e:  # noqa: BLE001 - an unavailable peer is reported, not fatal
            _note(f"FlexAttention skipped for {case}: {type(e).__name__}: {e}")
    try:
        from flash_attn import flash_attn_func

        add("flash_attn", lambda: flash_attn_func(q, k, v), dense_flops)
    except ImportError:
        pass
    if kernel:
        kt = timer
        if torch.device(device).type == "cpu":  # the interpreter: one timed call after the warm-up
            kt = functools.partial(_time_ms, reps=1)
        add(
            "tokentrim",
            lambda: masked_attention.masked_attention(q, k, v, keep=keep, kv_len=kv_len),
            kept_flops,
            timer=kt,
        )
        # compact_kv is in place: repeating it on the already compacted cache moves the same number of
        # tokens (same keep, same kv_len), so the timing is that of the first compaction.
        times["tokentrim_compact:compact"] = kt(lambda: kv_compact.compact_kv(cache, keep, kv_len), device)
        new_len = kv_compact.compact_kv(cache, keep, kv_len)
        add(
            "tokentrim_compact:attn_compacted",
            lambda: masked_attention.masked_attention(q, k, v, kv_len=new_len),
            kept_flops,
            timer=kt,
        )
        times["tokentrim_compact:total"] = (
            times["tokentrim_compact:compact"] + times["tokentrim_compact:attn_compacted"]
        )
        flops["tokentrim_compact:total"] = kept_flops
    return _rows_for(case, dtype, times, flops)


def run(args, device) -> list[dict]:
    device = torch.device(device)
    timer = _timer()
    lks = getattr(args, "attn_lk", None)
    fracs = getattr(args, "attn_keep", None)
    no_flex = bool(getattr(args, "attn_no_flex", False))
    rows = []
    if device.type == "cuda":
        for Lk in lks or GPU_LK:
            for frac in fracs or KEEP_FRACS:
                rows += _bench_case(
                    **GPU_SHAPE, Lk=Lk, frac=frac, dtype=torch.bfloat16, device=device, timer=timer,
                    kernel=True, flex=not no_flex, flex_compiled=True,
                )  # fmt: skip
        return rows

    from tokentrim.ops import interpreter_enabled

    interp = interpreter_enabled()
    if not interp:
        _note(
            "Triton kernel skipped on CPU: set TRITON_INTERPRET=1 before running to include it (interpreter)"
        )
    for Lk in lks or CPU_LK:
        use_kernel = interp and Lk <= CPU_KERNEL_MAX_LK
        if interp and not use_kernel:
            _note(f"Triton kernel skipped at Lk={Lk}: too slow under the interpreter (> {CPU_KERNEL_MAX_LK})")
        for frac in fracs or CPU_KEEP_FRACS:
            rows += _bench_case(
                **CPU_SHAPE, Lk=Lk, frac=frac, dtype=torch.float32, device=device, timer=timer,
                kernel=use_kernel, flex=not no_flex, flex_compiled=False,
            )  # fmt: skip
    return rows
