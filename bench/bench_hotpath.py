"""Section "hotpath": the non-matmul work of one cached forward of the model.

On the meta device (no GPU, no weights, no compute) one ``forward_cached`` of the Wan2.1-1.3B
config is run under ``tokentrim.opcount`` for an 832x480 block of 3 latent frames (B=1, bf16
weights and cache) attending to a full Self Forcing cache (18 committed frames + the block = 21
frames): the number of non-matmul ops it dispatches and the bytes they move, once with the unfused
path (``model.fused = False``) and once with the fused Triton ops (``model.fused = True``, the
default of the eager CUDA path). Targets of issue 14: <= 600 ops and <= 25 GB per forward.

On CUDA it also times forward_cached eager unfused vs eager fused vs ``torch.compile`` (median of
``triton.testing.do_bench``), on the same random weights.
"""

from __future__ import annotations

import torch

from bench import common
from tokentrim.cache import KVCache
from tokentrim.model import WanConfig, WanModel
from tokentrim.opcount import count_ops

SECTION = "hotpath"
TARGET_OPS, TARGET_GB = 600, 25.0


def add_arguments(parser) -> None:
    parser.add_argument("--hotpath-config", default="wan2.1-t2v-1.3b", help="WanConfig preset of the hotpath section")
    parser.add_argument("--hotpath-size", default="832x480", help="video WxH of the hotpath block")


def _setup(cfg: WanConfig, W: int, H: int, device, dtype, committed_blocks: int = 6, frames: int = 3):
    """Model, inputs and a cache with ``committed_blocks`` blocks of ``frames`` frames committed."""
    model = WanModel(cfg, dtype=dtype, device=device).eval()
    h, w = H // 8, W // 8
    S = cfg.tokens_per_frame(h, w)
    cache = KVCache(cfg.num_layers, 1, cfg.num_heads, cfg.head_dim, S, (committed_blocks + 1) * frames,
                    dtype=dtype, device=device)
    for b in range(committed_blocks):
        cache.prepare(frames)
        cache.commit(b * frames, frames)
    cache.prepare(frames)
    x = torch.randn(1, frames, cfg.in_dim, h, w, device=device, dtype=dtype)
    t = torch.full((1, frames), 750.0, device=device)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    with torch.no_grad():
        ctx = model.prepare_text(text)
    start = torch.tensor(committed_blocks * frames, device=device)
    return model, (x, t, ctx, cache, start)


def count_forward(cfg: WanConfig, W: int = 832, H: int = 480, fused: bool = True):
    """OpCount of one forward_cached on the meta device (see the module docstring)."""
    model, inputs = _setup(cfg, W, H, "meta", torch.bfloat16)
    model.fused = fused
    with torch.no_grad():
        _, counts = count_ops(model.forward_cached, *inputs)
    return counts


def run(args, device: torch.device) -> list[dict]:
    cfg = WanConfig.preset(args.hotpath_config)
    try:
        W, H = (int(v) for v in args.hotpath_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--hotpath-size must be WxH in pixels (e.g. 832x480), got {args.hotpath_size!r}") from None
    if W <= 0 or H <= 0 or W % 16 or H % 16:
        raise ValueError(f"--hotpath-size must be positive multiples of 16 (VAE 8x, patch 2x), got {W}x{H}")
    shape = f"{cfg.num_layers}L dim={cfg.dim} B=1 3 frames {W}x{H} cache 21 frames"
    rows = []
    for impl, fused in (("unfused", False), ("fused", True)):
        c = count_forward(cfg, W, H, fused)
        ops_, nbytes = c.total()
        mm_calls, mm_bytes = c.total(("matmul",))
        att_calls, att_bytes = c.total(("attention",))
        gb = nbytes / 1e9
        rows += [
            common.row(SECTION, args.hotpath_config, impl, shape, "bfloat16", "non_matmul_ops", ops_, "ops",
                       device="meta", note=f"target <= {TARGET_OPS}"),
            common.row(SECTION, args.hotpath_config, impl, shape, "bfloat16", "non_matmul_bytes", gb, "GB",
                       device="meta", note=f"target <= {TARGET_GB}; attention {att_calls} ops {att_bytes / 1e9:.2f} GB"),
            common.row(SECTION, args.hotpath_config, impl, shape, "bfloat16", "matmul_ops", mm_calls, "ops",
                       device="meta", note=f"{mm_bytes / 1e9:.2f} GB"),
        ]
        top = ", ".join(f"{n} x{k} {b / 1e9:.1f} GB" for n, k, b in c.top(6))
        print(f"[hotpath] {impl}: {ops_} non-matmul ops, {gb:.1f} GB (attention {att_calls} ops, "
              f"{att_bytes / 1e9:.1f} GB); {mm_calls} matmuls. Largest: {top}")
    for metric in ("non_matmul_ops", "non_matmul_bytes"):
        common.add_ratios(rows, "unfused", metric=metric)
    if device.type == "cuda":
        rows += _time_cuda(cfg, W, H, device, args)
    return rows


def _time_cuda(cfg, W, H, device, args) -> list[dict]:
    """Median ms of forward_cached: eager unfused, eager fused, compiled (fused ops, inductor)."""
    model, inputs = _setup(cfg, W, H, device, torch.bfloat16)
    shape = f"{cfg.num_layers}L dim={cfg.dim} B=1 3 frames {W}x{H} cache 21 frames"
    rows = []
    compiled = torch.compile(model.forward_cached, fullgraph=True)
    with torch.no_grad():
        for impl, fused, fn in (("eager-unfused", False, model.forward_cached),
                                ("eager-fused", True, model.forward_cached),
                                ("compiled", True, compiled)):
            model.fused = fused
            ms = common.time_ms(lambda fn=fn: fn(*inputs), device, args.repeats, quick=args.quick)
            rows.append(common.row(SECTION, args.hotpath_config, impl, shape, "bfloat16", "time", ms, "ms",
                                   device=device))
    common.add_ratios(rows, "eager-unfused")
    return rows
