"""Section "native": the C++ CPU kernels of tokentrim._C against the PyTorch reference, on CPU.

Both through ``tokentrim.ops`` (same argument checks, no finite check), timed in the same run:

- ``drift_topk`` at the Wan2.1 832x480 latent block (C=16, 60x104 latents, patch 2x2, 3-frame
  block vs the previous 3-frame block, k = 10% of N = 1560), B = 1 and 4, fp32 and bf16.
  Accuracy rows: max |drift - reference| and the top-k overlap with the reference.
- ``compact_kv`` on a 21-frame Wan2.1-1.3B cache: [layers, 2, B=1, L = 21*1560 = 32760, H=12,
  D=128] bf16, 10% of the tokens pruned at random (scattered, so nearly every token moves). The
  full model has 30 layers (6 GB in bf16); ``--native-layers`` (default 2, 0.4 GB) times fewer,
  and the time scales with the layer count. Compaction is in place: repeating it with the same
  keep/kv_len moves the same tokens every call, so every timed call does the same work.

Off CPU, or without the extension built, the section says so and returns no rows.
"""

from __future__ import annotations

import torch

from bench import common
from tokentrim import native, ops

SECTION = "native"

DRIFT_SHAPES = common.DRIFT_SHAPES[:2]  # the 832x480 blocks, B = 1 and 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
FRAME_TOKENS, FRAMES, HEADS, HEAD_DIM = 1560, 21, 12, 128  # 832x480 Wan2.1-1.3B, 21-frame cache


def add_arguments(parser) -> None:
    parser.add_argument(
        "--native-layers",
        type=int,
        default=2,
        help="layers of the 21-frame 1.3B cache compacted in the native section (the model has 30)",
    )


def run(args, device: torch.device) -> list[dict]:
    if device.type != "cpu":
        print("[native] skipped: the native kernels are CPU kernels (run with --device cpu)")
        return []
    if not native.available():
        print(f"[native] skipped: tokentrim._C {native.status()}")
        return []
    if args.native_layers < 1:
        raise ValueError(f"--native-layers must be >= 1, got {args.native_layers}")
    rows = _drift_rows(args, device)
    rows += _compact_rows(args, device)
    common.add_ratios(rows, "reference")
    return rows


def _drift_rows(args, device) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    dtypes = ["float32"] if args.quick else list(DTYPES)
    for label, B, F, Fp, C, H, W in DRIFT_SHAPES[:1] if args.quick else DRIFT_SHAPES:
        k, shape = common.drift_case(B, F, Fp, C, H, W, 0.1)
        for name in dtypes:
            dtype = DTYPES[name]
            cand = torch.randn(B, F, C, H, W, generator=g).to(dtype)
            prev = torch.randn(B, Fp, C, H, W, generator=g).to(dtype)
            out = {}
            for impl in ("reference", "native"):

                def call(impl=impl, cand=cand, prev=prev, k=k):
                    return ops.drift_topk(cand, prev, k, backend=impl, check_finite_inputs=False)

                ms = common.time_ms(call, device, args.repeats, quick=args.quick)
                rows.append(common.row(SECTION, f"drift_topk {label}", impl, shape, dtype, "time", ms, "ms",
                                       device=device))  # fmt: skip
                out[impl] = call()
            rows += common.drift_accuracy_rows(SECTION, f"drift_topk {label}", "native", shape, dtype, device,
                                               out["native"], out["reference"])  # fmt: skip
    return rows


def _compact_rows(args, device) -> list[dict]:
    layers, B, L = args.native_layers, 1, FRAMES * FRAME_TOKENS
    dtype = torch.bfloat16
    shape = f"layers={layers} 2 B={B} L={L} H={HEADS} D={HEAD_DIM}"
    g = torch.Generator().manual_seed(1)
    kv = torch.empty(layers, 2, B, L, HEADS, HEAD_DIM, dtype=dtype)
    for i in range(layers):  # filled layer by layer: no fp32 copy of the whole cache
        kv[i] = torch.randn(2, B, L, HEADS, HEAD_DIM, generator=g).to(dtype)
    keep = torch.rand(B, L, generator=g) >= 0.1
    kv_len = torch.full((B,), L, dtype=torch.int32)
    rows = []
    got = {}
    for impl in ("reference", "native"):
        work = kv.clone()
        n = ops.compact_kv(work, keep, kv_len, backend=impl)
        ms = common.time_ms(lambda impl=impl, work=work: ops.compact_kv(work, keep, kv_len, backend=impl),
                            device, max(1, min(args.repeats, 7)), warmup=1, quick=args.quick)  # fmt: skip
        rows.append(common.row(SECTION, "compact_kv 21-frame 1.3B cache", impl, shape, dtype, "time", ms, "ms",
                               device=device, note=f"{layers} of 30 layers; 10% of tokens pruned"))  # fmt: skip
        got[impl] = (n, work[..., 0, : int(n[0]), :, :].clone())  # the compared part only: frees ``work``
        del work
    (n, a), (rn, ra) = got["native"], got["reference"]
    # equal lengths first: then both slices have the same shape
    same = bool(torch.equal(n, rn)) and bool(torch.equal(a, ra))
    rows.append(common.row(SECTION, "compact_kv 21-frame 1.3B cache", "native", shape, dtype, "matches_reference",
                           float(same), "bool", device=device))  # fmt: skip
    return rows
