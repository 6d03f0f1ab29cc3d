"""Section "drift": ``tokentrim.ops.drift_topk``, fused Triton kernel vs the PyTorch reference.

Shapes are latent blocks of Wan2.1 rollouts (C=16, 8x VAE downsampling, patch 2x2, 3-frame
blocks compared with the previous 3-frame block, k = 10% of the tokens). On CUDA both backends
are timed (bf16) and the kernel rows carry speedup = reference_ms / triton_ms ("triton": the
two-launch default of ops.drift_topk, "triton-1launch": the experimental single launch; both
called through the kernel module, without ops' input checks, like the reference row's ops call
with check_finite_inputs=False). On CPU only the
reference is timed (fp32): the kernel would run in the Triton interpreter, which measures Python,
not the kernel; with TRITON_INTERPRET=1 and without --quick the interpreter is timed anyway, for
information only.
"""

from __future__ import annotations

import torch

from bench import common
from tokentrim import ops
from tokentrim.kernels import drift as kdrift

SECTION = "drift"

SHAPES = common.DRIFT_SHAPES  # name, B, F, F', C, H, W
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--drift-dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="latent dtype for the drift section (auto: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument("--drift-ratio", type=float, default=0.1, help="k = max(1, round(ratio * N))")


def _triton_plan(args, device: torch.device) -> tuple[bool, str]:
    """Whether to time the Triton backend here, and the reason when not (or the caveat)."""
    if device.type == "cuda":
        return True, ""
    if not ops.interpreter_enabled():
        return False, "cpu without TRITON_INTERPRET=1: the kernel comparison is a GPU measurement"
    if args.quick:
        return False, "--quick: the Triton interpreter is too slow to time"
    return True, "Triton interpreter on cpu: Python overhead, not kernel speed"


def run(args, device: torch.device) -> list[dict]:
    if not 0 < args.drift_ratio <= 1:
        raise ValueError(f"--drift-ratio must be in (0, 1], got {args.drift_ratio}")
    name = (
        args.drift_dtype
        if args.drift_dtype != "auto"
        else ("bfloat16" if device.type == "cuda" else "float32")
    )
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cpu" and ops.interpreter_enabled():
        print("[drift] note: bf16 is broken in the Triton interpreter; kernel outputs may not match")
    use_triton, why = _triton_plan(args, device)
    if not use_triton:
        print(f"[drift] triton backend skipped: {why}")
    shapes = SHAPES[:1] if args.quick or (use_triton and device.type == "cpu") else SHAPES

    rows = []
    g = torch.Generator().manual_seed(0)
    for label, B, F, Fp, C, H, W in shapes:
        k, shape = common.drift_case(B, F, Fp, C, H, W, args.drift_ratio)
        cand = torch.randn(B, F, C, H, W, generator=g).to(device=device, dtype=dtype)
        prev = torch.randn(B, Fp, C, H, W, generator=g).to(device=device, dtype=dtype)

        def call(backend, cand=cand, prev=prev, k=k):
            return ops.drift_topk(cand, prev, k, backend=backend, check_finite_inputs=False)

        ref_ms = common.time_ms(lambda call=call: call("reference"), device, args.repeats, quick=args.quick)
        rows.append(
            common.row(SECTION, label, "reference", shape, dtype, "time", ref_ms, "ms", device=device)
        )
        if not use_triton:
            continue
        interp = device.type == "cpu"
        variants = (
            [("triton-interpreter", False)] if interp else [("triton", False), ("triton-1launch", True)]
        )
        for impl, single in variants:

            def tri(cand=cand, prev=prev, k=k, single=single):
                return kdrift.drift_topk(cand, prev, k, single_launch=single)

            reps = min(args.repeats, 3) if interp else args.repeats
            tri_ms = common.time_ms(tri, device, reps, warmup=1, quick=args.quick)
            rows.append(
                common.row(SECTION, label, impl, shape, dtype, "time", tri_ms, "ms", device=device, note=why)
            )
            rows += common.drift_accuracy_rows(
                SECTION, label, impl, shape, dtype, device, tri(), call("reference")
            )
    common.add_ratios(rows, "reference")
    return rows
