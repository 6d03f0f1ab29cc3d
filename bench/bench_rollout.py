"""Whole-rollout benchmark: Self Forcing and Rolling Forcing, TokenTrim off/on, eager vs CUDA graphs.

Per pipeline, each configuration gets one warm-up run, then ``--rollout-repeats`` timed runs
(median), interleaved across configurations:

- ``eager`` (TokenTrim off): the baseline. Latent frames/s, pixel frames/s (4F-3, DiT only, no VAE),
  median per-block latency, achieved model TFLOP/s (counted FLOPs / time), peak memory (CUDA).
- ``trim-never``: TokenTrim detects every block (drift + decision, one host sync per block) but
  never prunes: its time ratio to ``eager`` is the detection overhead.
- ``trim-always``: TokenTrim prunes and regenerates every block after warm-up: the cost of forced
  regenerations (the regeneration rate is reported).
- ``graphs`` (CUDA only): the eager baseline with the cached forward replayed from CUDA graphs.

FLOPs per forward (B videos, Lq query tokens, Lk attended keys = committed + Lq, Lt text tokens,
per layer): 2*B*Lq*(4 d^2 + 2 d^2 + 2 d*ffn) for the linear layers (self q/k/v/o, cross q/o, FFN;
the cross-attention K/V of the prompt are computed once) + 4*B*Lq*d*(Lk + Lt) for attention.

Defaults: on CPU the "tiny" preset at 16x16 latents, 4 blocks, so the section takes well under two
minutes on two cores; on CUDA the 1.3B configuration with random bf16 weights (or
``--rollout-checkpoint``), Self Forcing 7 blocks (21 latent frames) at 60x104 latents (832x480)
and a 30-block (90 latent frames) Rolling Forcing run.
"""

from __future__ import annotations

import statistics
import sys

import torch

from bench import common

SECTION = "rollout"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--rollout-pipeline",
        choices=("self-forcing", "rolling-forcing", "both"),
        default="both",
        help="which rollout(s) to time",
    )
    parser.add_argument(
        "--rollout-preset",
        default=None,
        help="WanConfig preset with random weights (default: tiny on cpu, wan2.1-t2v-1.3b on cuda)",
    )
    parser.add_argument(
        "--rollout-checkpoint",
        default=None,
        metavar="PATH",
        help="load real weights (Wan/diffusers folder, .safetensors or Self/Rolling Forcing .pt)",
    )
    parser.add_argument(
        "--rollout-blocks",
        type=int,
        default=None,
        help="Self Forcing blocks of 3 latent frames (default: 4 on cpu, 7 on cuda)",
    )
    parser.add_argument(
        "--rollout-rf-blocks",
        type=int,
        default=None,
        help="Rolling Forcing blocks (default: 4 on cpu, 30 on cuda)",
    )
    parser.add_argument(
        "--rollout-height", type=int, default=None, help="latent height (default: 16 cpu, 60 cuda)"
    )
    parser.add_argument(
        "--rollout-width", type=int, default=None, help="latent width (default: 16 cpu, 104 cuda)"
    )
    parser.add_argument("--rollout-batch", type=int, default=1, help="videos per rollout")
    parser.add_argument(
        "--rollout-repeats",
        type=int,
        default=None,
        help="timed runs per configuration, median reported (default: 7; 1 with --quick)",
    )
    parser.add_argument("--rollout-no-graphs", action="store_true", help="skip the CUDA-graph runs")


def forward_flops(cfg, batch: int, q_tokens: int, k_tokens: int) -> float:
    """Counted FLOPs of one cached forward (see the module docstring)."""
    d, ffn, L, Lt = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.text_len
    linear = 2.0 * q_tokens * (6 * d * d + 2 * d * ffn)
    attn = 4.0 * q_tokens * d * (k_tokens + Lt)
    return batch * L * (linear + attn)


def rollout_flops(cfg, batch: int, tokens_per_frame: int, log) -> float:
    """FLOPs of every forward a ``GraphRunner`` logged (query frames, committed frames, kv_only)."""
    return sum(forward_flops(cfg, batch, q * tokens_per_frame, (c + q) * tokens_per_frame) for q, c, _ in log)


def _defaults(args, device):
    cuda = device.type == "cuda"
    return dict(
        preset=args.rollout_preset or ("wan2.1-t2v-1.3b" if cuda else "tiny"),
        sf_blocks=args.rollout_blocks or (7 if cuda else 4),
        rf_blocks=args.rollout_rf_blocks or (30 if cuda else 4),
        height=args.rollout_height or (60 if cuda else 16),
        width=args.rollout_width or (104 if cuda else 16),
        repeats=args.rollout_repeats or (1 if args.quick else 7),
    )


def _check(args) -> None:
    for name in ("rollout_blocks", "rollout_rf_blocks", "rollout_height", "rollout_width", "rollout_repeats"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.rollout_batch < 1:
        raise ValueError(f"--rollout-batch must be >= 1, got {args.rollout_batch}")


def _model(args, preset, device):
    from tokentrim.model import WanConfig, WanModel, load_wan

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.rollout_checkpoint:
        return load_wan(args.rollout_checkpoint, config=args.rollout_preset, dtype=dtype, device=device)
    torch.manual_seed(0)
    return WanModel(WanConfig.preset(preset), dtype=dtype, device=device).eval()


def _run_once(make, text, blocks, h, w, device):
    r = make()
    common.synchronize(device)
    res = r.run(text, blocks, h, w, seed=0)
    common.synchronize(device)
    return res, r


def _pipeline_rows(name, cls, cfg_cls, args, device, model, text, blocks, h, w, repeats):
    """Rows of one pipeline. Configurations are timed interleaved (one run of each per round,
    after one warm-up run of each), so a slow phase of a shared machine hits all of them."""
    from tokentrim.config import TokenTrimConfig

    mcfg = model.config
    B = text.shape[0]
    tpf = mcfg.tokens_per_frame(h, w)
    shape = f"B{B} {blocks}x3x{h}x{w}"
    dtype = model.dtype
    runs = {
        "eager": dict(trim=None, use_graphs=False),
        "trim-never": dict(trim=TokenTrimConfig(force="never"), use_graphs=False),
        "trim-always": dict(trim=TokenTrimConfig(force="always", warmup=1), use_graphs=False),
    }
    if device.type == "cuda" and not args.rollout_no_graphs:
        runs["graphs"] = dict(trim=None, use_graphs=True)
        runs["graphs+trim-never"] = dict(trim=TokenTrimConfig(force="never"), use_graphs=True)
    makers = {impl: (lambda kw=kw: cls(model, cfg_cls(), **kw)) for impl, kw in runs.items()}
    times = {impl: [] for impl in runs}
    last = {}
    peak = {}
    for rnd in range(repeats + 1):
        for impl, make in makers.items():
            print(
                f"[rollout] {name} {impl} {shape} {'warm-up' if rnd == 0 else f'run {rnd}/{repeats}'}",
                file=sys.stderr,
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            res, r = _run_once(make, text, blocks, h, w, device)
            if rnd:
                times[impl].append(res.timings["total_s"])
                last[impl] = (res, r)
            if device.type == "cuda":
                peak[impl] = torch.cuda.max_memory_allocated(device)
    rows = []
    for impl in runs:
        res, r = last[impl]
        med = statistics.median(times[impl])
        F = res.timings["latent_frames"]
        pix = res.timings["pixel_frames"]
        block_ms = statistics.median(res.timings["block_s"]) * 1e3
        flops = rollout_flops(mcfg, B, tpf, r.runner.log)
        row = lambda metric, value, unit, note="", impl=impl: common.row(
            SECTION, name, impl, shape, dtype, metric, value, unit, device=device, note=note
        )
        rows.append(row("time", med * 1e3, "ms", note=f"median of {repeats}, {r.runner.calls} forwards"))
        rows.append(row("latent_fps", F * B / med, "frames/s"))
        rows.append(row("pixel_fps", pix * B / med, "frames/s", note="4F-3 pixel frames, DiT only"))
        rows.append(row("block_latency", block_ms, "ms", note="median per block"))
        rows.append(
            row("model_tflops", flops / med / 1e12, "TFLOP/s", note=f"{flops / 1e12:.3g} TFLOP counted")
        )
        if "trim" in impl:
            regen = sum(rec.get("num_regenerations") or 0 for rec in res.records)
            decided = sum(
                1 for rec in res.records if rec.get("warming_up") is not None and not all(rec["warming_up"])
            )
            rows.append(row("regeneration_rate", regen / max(1, decided), "per decided block"))
        if impl in peak:
            rows.append(row("peak_memory", peak[impl] / 2**30, "GiB"))
    common.add_ratios(rows, "eager", metric="time")
    # graphs+trim-never against graphs: the detection overhead with graphs
    base = {r["metric"]: r["value"] for r in rows if r["impl"] == "graphs"}
    for r in rows:
        if r["impl"] == "graphs+trim-never" and r["metric"] == "time" and base.get("time"):
            r["baseline"], r["ratio"] = "graphs", base["time"] / r["value"]
    return rows


def run(args, device: torch.device) -> list[dict]:
    from tokentrim.rollout import (
        RollingForcingConfig,
        RollingForcingRollout,
        SelfForcingConfig,
        SelfForcingRollout,
    )

    _check(args)
    d = _defaults(args, device)
    model = _model(args, d["preset"], device)
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(args.rollout_batch, model.config.text_len, model.config.text_dim, generator=gen).to(
        device
    )
    rows = []
    with torch.no_grad():
        if args.rollout_pipeline in ("self-forcing", "both"):
            rows += _pipeline_rows(
                "self_forcing",
                SelfForcingRollout,
                SelfForcingConfig,
                args,
                device,
                model,
                text,
                d["sf_blocks"],
                d["height"],
                d["width"],
                d["repeats"],
            )
        if args.rollout_pipeline in ("rolling-forcing", "both"):
            rows += _pipeline_rows(
                "rolling_forcing",
                RollingForcingRollout,
                RollingForcingConfig,
                args,
                device,
                model,
                text,
                d["rf_blocks"],
                d["height"],
                d["width"],
                d["repeats"],
            )
    return rows
