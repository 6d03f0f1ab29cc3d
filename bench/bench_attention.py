"""Section "attention": masked attention over a TokenTrim-pruned KV cache, against dense SDPA in the same run.

CUDA (Wan2.1 shapes): B in {1, 2}, H=12, D=128, Lq=4680 (one 3-frame block), Lk in {4680, 18720,
32760} (3, 12 and 21 cached frames of 1560 tokens), keep fraction in {1.0, 0.9, 0.5}, bf16. The
holes are TokenTrim-shaped: per video, the same (1 - keep) * 1560 spatial positions are pruned in
every cached frame (``tokentrim_keep``). K/V are views of layer 0 of a [layers, 2, B, Lk, H, D]
cache tensor. Implementations:

- ``sdpa_dense``: torch SDPA over all Lk keys, the baseline (attention without pruning)
- ``sdpa_mask``: torch SDPA with the boolean keep mask
- ``flex``: torch.compile(flex_attention) with the equivalent BlockMask (``--attn-no-flex`` skips it)
- ``tokentrim``: the masked kernel over the holed cache (keep + kv_len; its plan prepass included)
- ``tokentrim_split1``: the same with split-KV forced off, when the launcher's choice splits
- ``tokentrim_compact:*``: ``compact_<layers>_layers`` (compact_kv of the whole cache, one launch,
  in place), ``compact`` (that / layers: one layer's share), ``attn_compacted`` (the kernel over the
  compacted prefix: kv_len = kept count, no mask; what every layer pays after a prune) and ``total`` =
  compact + attn_compacted
- ``flash_attn_kvcache``: ``flash_attn_with_kvcache`` over the compacted prefix
  (cache_seqlens = kept count), when flash-attn is importable

Metrics: ``time`` (ms, median), ``throughput`` (TFLOP/s of the attended work: 4*Lq*D*H*sum_b kept_b
/ time; all Lk for the dense impls). ``ratio`` against sdpa_dense: its time / this time on time
rows (> 1 = faster than dense SDPA), this TFLOP/s / its TFLOP/s on throughput rows.

CPU: small shapes (Lq=64, Lk in {128, 512} as 4 and 16 frames of 32 tokens, H=2, D=64, fp32):
reference, SDPA and eager FlexAttention; the Triton kernels only with TRITON_INTERPRET=1, without
--quick and at Lk=128 (the interpreter times Python, not the kernel: for information only).
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

from bench import common

SECTION = "attention"

GPU_SHAPE = dict(H=12, D=128, Lq=4680)
GPU_BATCH = (1, 2)
GPU_LK = (4680, 18720, 32760)
GPU_TOKENS_PER_FRAME = 1560
GPU_LAYERS = 30  # Wan2.1-1.3B: compaction covers every layer's K and V in one launch
KEEP_FRACS = (1.0, 0.9, 0.5)
CPU_SHAPE = dict(H=2, D=64, Lq=64)
CPU_BATCH = (1,)
CPU_LK = (128, 512)
CPU_TOKENS_PER_FRAME = 32
CPU_KEEP_FRACS = (1.0, 0.5)
CPU_KERNEL_MAX_LK = 128  # beyond this one interpreter call takes seconds
CPU_MAX_REPEATS = 5  # keeps the CPU section well under 30 s
INTERP_NOTE = "Triton interpreter on cpu: Python overhead, not kernel speed"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--attn-lk", type=int, nargs="+", default=None, help="key lengths (default: per device)"
    )
    parser.add_argument("--attn-keep", type=float, nargs="+", default=None, help="keep fractions")
    parser.add_argument("--attn-batch", type=int, nargs="+", default=None, help="batch sizes")
    parser.add_argument(
        "--attn-layers", type=int, default=GPU_LAYERS, help="cache layers compacted in one launch (cuda)"
    )
    parser.add_argument(
        "--attn-no-flex", action="store_true", help="skip FlexAttention (compiling it takes a while)"
    )


def _note(msg: str) -> None:
    print(f"[attention] {msg}", file=sys.stderr)


def tokentrim_keep(B: int, Lk: int, tokens_per_frame: int, frac: float, generator, device) -> torch.Tensor:
    """[B, Lk] bool: per video, round((1 - frac) * tokens_per_frame) random spatial positions are
    pruned in every frame (the same positions in each frame, as TokenTrim masks them)."""
    keep = torch.ones(B, Lk, dtype=torch.bool, device=device)
    n_holes = round((1.0 - frac) * tokens_per_frame)
    if n_holes <= 0:
        return keep
    frames = -(-Lk // tokens_per_frame)
    for b in range(B):
        holes = torch.randperm(tokens_per_frame, generator=generator)[:n_holes]
        spatial = torch.ones(tokens_per_frame, dtype=torch.bool)
        spatial[holes] = False
        keep[b] = spatial.repeat(frames)[:Lk].to(device)
    return keep


def make_inputs(B, H, D, Lq, Lk, frac, dtype, device, tokens_per_frame, layers=1, seed=0):
    """q [B,Lq,H,D]; cache [layers,2,B,Lk,H,D] (k/v: views of layer 0); keep [B,Lk] with TokenTrim
    holes; kv_len [B] int32 = Lk."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Lq, H, D, generator=g, device=device).to(dtype)
    cache = torch.empty(layers, 2, B, Lk, H, D, device=device, dtype=dtype)
    cache.normal_(generator=g)
    keep = tokentrim_keep(B, Lk, tokens_per_frame, frac, torch.Generator().manual_seed(seed + 1), device)
    kv_len = torch.full((B,), Lk, dtype=torch.int32, device=device)
    return q, cache, keep, kv_len


def _sdpa(q, k, v, mask=None):
    # SDPA wants [B,H,L,D]; the transposes are views of the cache layout.
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )


def _flex_fns(q, k, v, keep, kv_len, compiled: bool):
    """(build BlockMask, run flex attention with it) for the keep/kv_len mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx] & (kv_idx < kv_len[b])

    def build():
        return create_block_mask(mask_mod, B, None, Lq, Lk, device=q.device)

    block_mask = build()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if compiled:
        fa = torch.compile(flex_attention)
        return build, lambda: fa(qt, kt, vt, block_mask=block_mask)

    def eager():  # the CPU oracle; silence its "not compiled" warning
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(qt, kt, vt, block_mask=block_mask)

    return build, eager


def _flash_kvcache():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache


def _bench_case(
    args, device, B, H, D, Lq, Lk, frac, dtype, *, kernel: bool, flex_compiled: bool, layers: int, tpf: int
):
    from tokentrim import reference
    from tokentrim.kernels import kv_compact, masked_attention

    cpu = device.type == "cpu"
    repeats = min(args.repeats, CPU_MAX_REPEATS) if cpu else args.repeats
    q, cache, keep, kv_len = make_inputs(B, H, D, Lq, Lk, frac, dtype, device, tpf, layers=layers)
    k, v = cache[0, 0], cache[0, 1]
    n_kept = int(keep.sum())  # setup
    shape = f"B{B} H{H} D{D} Lq{Lq} Lk{Lk} keep{frac:g}"
    dense_flops = 4.0 * B * H * Lq * Lk * D
    kept_flops = 4.0 * H * Lq * D * n_kept
    times, flops, notes = {}, {}, {}

    def timed(fn, interp=False):
        if interp:  # one warm-up (compile) and one timed call
            return common.time_ms(fn, device, repeats=1, warmup=1, quick=args.quick)
        return common.time_ms(fn, device, repeats=repeats, warmup=1 if cpu else 3, quick=args.quick)

    def add(impl, fn, fl, interp=False):
        times[impl] = timed(fn, interp)
        flops[impl] = fl
        if interp:
            notes[impl] = INTERP_NOTE

    add("sdpa_dense", lambda: _sdpa(q, k, v), dense_flops)
    sdpa_mask = keep[:, None, None, :]
    add("sdpa_mask", lambda: _sdpa(q, k, v, sdpa_mask), kept_flops)
    if cpu:
        add("reference", lambda: reference.masked_attention(q, k, v, keep=keep, kv_len=kv_len), kept_flops)
    if not args.attn_no_flex:
        try:
            build, run_flex = _flex_fns(q, k, v, keep, kv_len, flex_compiled)
            add("flex", run_flex, kept_flops)
            times["flex_blockmask"] = timed(build)
        except Exception as e:  # an unavailable peer is reported, not fatal
            _note(f"FlexAttention skipped for {shape}: {type(e).__name__}: {e}")

    if kernel:
        add(
            "tokentrim",
            lambda: masked_attention.masked_attention(q, k, v, keep=keep, kv_len=kv_len),
            kept_flops,
            interp=cpu,
        )
        if not cpu and masked_attention._default_splits(q, B, H, Lq, Lk) > 1:
            add(
                "tokentrim_split1",
                lambda: masked_attention.masked_attention(q, k, v, keep=keep, kv_len=kv_len, splits=1),
                kept_flops,
            )
        # compact_kv is in place; repeating it on the compacted cache (same keep, same kv_len) moves
        # the same tokens, so every timed call costs what the first one did.
        all_ms = timed(lambda: kv_compact.compact_kv(cache, keep, kv_len), interp=cpu)
        new_len = kv_compact.compact_kv(cache, keep, kv_len)
        times[f"tokentrim_compact:compact_{layers}_layers"] = all_ms
        times["tokentrim_compact:compact"] = all_ms / layers
        add(
            "tokentrim_compact:attn_compacted",
            lambda: masked_attention.masked_attention(q, k, v, kv_len=new_len),
            kept_flops,
            interp=cpu,
        )
        times["tokentrim_compact:total"] = (
            times["tokentrim_compact:compact"] + times["tokentrim_compact:attn_compacted"]
        )
        flops["tokentrim_compact:total"] = kept_flops
        if cpu:
            for impl in times:
                if impl.startswith("tokentrim_compact"):
                    notes[impl] = INTERP_NOTE
        fa = _flash_kvcache()
        if fa is not None and not cpu:
            add(
                "flash_attn_kvcache",
                lambda: fa(q, k, v, cache_seqlens=new_len, softmax_scale=D**-0.5),
                kept_flops,
            )

    rows = []
    base_ms = times["sdpa_dense"]
    base_tf = dense_flops / (base_ms * 1e-3) / 1e12
    for impl, ms in times.items():
        rows.append(
            common.row(
                SECTION, "masked_attention", impl, shape, dtype, "time", ms, "ms",
                device=device, baseline="sdpa_dense", ratio=base_ms / ms, note=notes.get(impl, ""),
            )
        )  # fmt: skip
        if impl in flops:
            tf = flops[impl] / (ms * 1e-3) / 1e12
            rows.append(
                common.row(
                    SECTION, "masked_attention", impl, shape, dtype, "throughput", tf, "TFLOP/s",
                    device=device, baseline="sdpa_dense", ratio=tf / base_tf, note=notes.get(impl, ""),
                )
            )  # fmt: skip
    return rows


def run(args, device: torch.device) -> list[dict]:
    device = torch.device(device)
    rows = []
    batches = args.attn_batch
    if device.type == "cuda":
        if _flash_kvcache() is None:
            _note("flash-attn not importable: flash_attn_kvcache rows skipped")
        lks = args.attn_lk or ((GPU_LK[1],) if args.quick else GPU_LK)
        fracs = args.attn_keep or ((1.0, 0.5) if args.quick else KEEP_FRACS)
        for B in batches or ((1,) if args.quick else GPU_BATCH):
            for Lk in lks:
                for frac in fracs:
                    rows += _bench_case(
                        args, device, B=B, **GPU_SHAPE, Lk=Lk, frac=frac, dtype=torch.bfloat16,
                        kernel=True, flex_compiled=True, layers=args.attn_layers, tpf=GPU_TOKENS_PER_FRAME,
                    )  # fmt: skip
        return rows

    from tokentrim.ops import interpreter_enabled

    interp = interpreter_enabled() and not args.quick
    if not interp:
        _note(
            "Triton kernels not timed on cpu (they need TRITON_INTERPRET=1 and no --quick; GPU numbers matter)"
        )
    lks = args.attn_lk or (CPU_LK[:1] if args.quick else CPU_LK)
    for B in batches or CPU_BATCH:
        for Lk in lks:
            use_kernel = interp and Lk <= CPU_KERNEL_MAX_LK
            if interp and not use_kernel:
                _note(f"Triton kernels skipped at Lk={Lk}: too slow in the interpreter (> {CPU_KERNEL_MAX_LK})")
            for frac in args.attn_keep or CPU_KEEP_FRACS:
                rows += _bench_case(
                    args, device, B=B, **CPU_SHAPE, Lk=Lk, frac=frac, dtype=torch.float32,
                    kernel=use_kernel, flex_compiled=False, layers=1, tpf=CPU_TOKENS_PER_FRAME,
                )  # fmt: skip
    return rows
