"""Section "detect": does TokenTrim's rule find corrupted blocks and tokens? (synthetic, no weights)

A synthetic denoiser stands in for the model (the Self Forcing or Rolling Forcing loop, the KV cache,
the controller and the pruning are the real ones). Every video of the batch is one seed: a smooth,
moving pattern per latent frame (``target``) plus a little per-frame texture. The denoiser predicts

    x0_hat = target + err * sigma**2 * eps_hat,   eps_hat = (x - (1 - sigma) * target) / sigma

so the first step's x0 (sigma = 1) carries ``err`` times the block's noise, like the blurry, noisy
first-step estimate of a real few-step model, and later steps get cleaner (``--detect-err``,
default 0.5: an assumption, not a measurement of Wan). A corruption is added to ``x0_hat`` on chosen
tokens of one chosen block (k tokens, k = the unstable-set size, so a perfect S_t is possible):

- ``noise``: additive Gaussian noise (std 1, the pattern's amplitude) on those tokens;
- ``color``: a constant per-channel shift (a colour cast, norm 1 per channel vector entry ~0.7);
- ``frozen``: those tokens stuck at the video's first frame;
- ``offset``: a slow global offset: every token of every block from the chosen one on gets
  ``0.1 * (blocks since onset)`` added (all tokens corrupted; not a "clear" corruption).

The corruption stands for drift coming from the cached context: for a video whose cache gets a
token masked while the block is being generated (a prune), it disappears (the regeneration is
clean). It is applied in every forward of the block until then.

Measured per preset (paper, robust) over ``--detect-seeds`` videos (batch = seeds, one run per
corruption kind plus a clean run), with ``detected`` = what force="auto" flags after warm-up:

- block precision / recall: over decided blocks, corrupted = the chosen block (offset: every block
  from it on); a detection one block after a missed corruption counts as a false positive;
- token precision: |S_t intersect corrupted tokens| / k over the detected corrupted blocks;
- false-trigger rate: detected / decided blocks of the clean run;
- forwards per block, TokenTrim on vs off, per video (what a batch of one runs: a flagged block
  costs detect_step+1 forwards before its regeneration).

Targets for the paper preset (issue 13): recall 1.0 on noise/color/frozen, token precision >= 0.9,
false triggers <= 2%. The rows report what was measured; nothing here is tuned to meet them.
``--quick`` runs 8 seeds and 8 blocks (a few seconds).
"""

from __future__ import annotations

import math

import torch

from bench import common
from tokentrim.config import TokenTrimConfig

SECTION = "detect"
KINDS = ("noise", "color", "frozen", "offset")
CLEAR = ("noise", "color", "frozen")
PRESETS = ("paper", "robust")


def add_arguments(parser) -> None:
    parser.add_argument("--detect-seeds", type=int, default=48, help="videos (seeds) per run, >= 1 (40+ for the table)")
    parser.add_argument("--detect-blocks", type=int, default=12, help="AR blocks per video (>= 6)")
    parser.add_argument("--detect-err", type=float, default=0.5,
                        help="synthetic denoiser error: the first step's x0 carries err * noise")
    parser.add_argument("--detect-pipeline", choices=("self-forcing", "rolling-forcing"), default="self-forcing",
                        help="rollout loop the synthetic denoiser runs in")


class SyntheticDenoiser(torch.nn.Module):
    """A stand-in for ``WanModel`` with the interface the rollouts use (``config``, ``prepare_text``,
    ``forward_cached``): the flow of ``x0_hat`` above. Writes nothing into the KV cache (the cache's
    bookkeeping, masks and pruning are the rollout's own). ``corrupt``: per video, (kind, block,
    token positions) or None; ``block_frames``: the rollout's latent frames per block."""

    def __init__(self, batch: int, height: int, width: int, seed0: int, err: float, corrupt,
                 frame_noise: float = 0.05, block_frames: int = 3):
        super().__init__()
        self.config = _wan_config()
        self._p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.dtype, self.device = torch.float32, torch.device("cpu")
        # the rollout's PositionRebaser reads the RoPE table length from here; the synthetic flow has
        # no RoPE and its short runs never reach a re-base
        self.register_buffer("rope_cos", torch.zeros(1024, 1), persistent=False)
        self.B, self.H, self.W, self.err, self.corrupt = batch, height, width, err, corrupt
        self.frame_noise, self.block_frames = frame_noise, block_frames
        C = self.config.in_dim
        g = torch.Generator().manual_seed(10_007 * seed0 + 1)
        self.freq = 0.3 + 0.5 * torch.rand(batch, C, 2, generator=g)  # spatial frequencies per channel
        self.phase = 2 * math.pi * torch.rand(batch, C, generator=g)
        self.speed = 0.15 + 0.25 * torch.rand(batch, 1, generator=g)  # pattern motion per frame
        self.cast = torch.randn(batch, C, generator=g)
        self.cast = self.cast / self.cast.norm(dim=1, keepdim=True) * math.sqrt(C) * 0.7
        self.seed0 = seed0
        yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
        self.yy, self.xx = yy, xx
        self.first_seen: dict[int, list[int]] = {}  # block -> prune-event count per video when first seen
        self.events = [0] * batch
        self._masked: dict[int, torch.Tensor] = {}
        self._targets: dict[int, torch.Tensor] = {}

    def prepare_text(self, text):
        return text

    def target(self, frames: list[int]) -> torch.Tensor:
        """[B, len(frames), C, H, W] clean latents of absolute frames."""
        for fr in frames:
            if fr not in self._targets:
                self._targets[fr] = self._target([fr])[:, 0]
        return torch.stack([self._targets[fr] for fr in frames], dim=1)

    def _target(self, frames: list[int]) -> torch.Tensor:
        f = torch.tensor(frames, dtype=torch.float32).view(1, -1, 1, 1, 1)
        fx, fy = self.freq[..., 0][:, None, :, None, None], self.freq[..., 1][:, None, :, None, None]
        arg = fx * self.xx + fy * self.yy + self.phase[:, None, :, None, None] + self.speed.view(-1, 1, 1, 1, 1) * f
        out = torch.sin(arg)
        tex = torch.stack([torch.randn(self.B, self.config.in_dim, self.H, self.W,
                                       generator=torch.Generator().manual_seed(self.seed0 * 100_003 + fr))
                           for fr in frames], dim=1)
        return out + self.frame_noise * tex

    def _note_prunes(self, cache) -> None:
        masked = cache.length.long() - cache.kept_count().long()
        last = self._masked.get(id(cache))
        if last is not None:
            for v in range(self.B):
                if int(masked[v]) > int(last[v]):
                    self.events[v] += 1
        self._masked[id(cache)] = masked

    def corruption(self, frames: list[int], bf: int) -> torch.Tensor:
        """[B, F, C, H, W] additive corruption of the frames (zero where inactive)."""
        out = torch.zeros(self.B, len(frames), self.config.in_dim, self.H, self.W)
        wt = self.W // 2
        for i, fr in enumerate(frames):
            b = fr // bf
            seen = self.first_seen.setdefault(b, list(self.events))
            for v, c in enumerate(self.corrupt):
                if c is None or self.events[v] != seen[v]:
                    continue
                kind, block, positions = c
                if kind == "offset":
                    if b >= block:
                        out[v, i] += 0.1 * (b - block + 1)
                    continue
                if b != block:
                    continue
                g = torch.Generator().manual_seed(self.seed0 * 7_919 + 31 * v + fr)
                for p in positions:
                    r, col = divmod(p, wt)
                    sl = (v, i, slice(None), slice(2 * r, 2 * r + 2), slice(2 * col, 2 * col + 2))
                    if kind == "noise":
                        out[sl] += torch.randn(out[sl].shape, generator=g)
                    elif kind == "color":
                        out[sl] += self.cast[v][:, None, None]
                    elif kind == "frozen":
                        first = self.target([0])[v, 0]
                        clean = self.target([fr])[v, 0]
                        out[sl] += (first - clean)[:, 2 * r:2 * r + 2, 2 * col:2 * col + 2]
        return out

    def forward_cached(self, x, t, ctx, cache, frame_start, kv_only: bool = False):
        if kv_only:
            return None
        self._note_prunes(cache)
        fs = int(frame_start)
        frames = list(range(fs, fs + x.shape[1]))
        sigma = (t.float() / 1000).view(*t.shape, 1, 1, 1)
        tgt = self.target(frames)
        eps_hat = (x.float() - (1 - sigma) * tgt) / sigma
        x0 = tgt + self.err * sigma**2 * eps_hat + self.corruption(frames, self.block_frames)
        return (x.float() - x0) / sigma


def _plan(kind: str, batch: int, blocks: int, k: int, tokens: int, seed0: int, first_decided: int):
    """Per video: (kind, corrupted block, k token positions)."""
    g = torch.Generator().manual_seed(seed0 * 65_537 + KINDS.index(kind))
    plan = []
    for _ in range(batch):
        block = int(torch.randint(first_decided, blocks, (1,), generator=g))
        if kind == "offset":
            block = min(block, blocks - 3)  # a few blocks of growing offset
        plan.append((kind, block, sorted(torch.randperm(tokens, generator=g)[:k].tolist())))
    return plan


def _wan_config():
    """The model config the synthetic denoiser stands in for (its channels and patch)."""
    from tokentrim.model import WanConfig

    return WanConfig.preset("tiny")


def _rollout_config(pipeline: str):
    """The rollout config of ``pipeline``: masks kept in place (no compaction, output-equivalent), so
    the denoiser sees prunes in the keep mask."""
    from tokentrim.rollout import RollingForcingConfig, SelfForcingConfig

    if pipeline == "self-forcing":
        return SelfForcingConfig(compact_after_prune=False)
    return RollingForcingConfig(compact_after_prune=False)


def _rollout(pipeline: str, model, trim, config):
    from tokentrim.rollout import RollingForcingRollout, SelfForcingRollout

    cls = SelfForcingRollout if pipeline == "self-forcing" else RollingForcingRollout
    return cls(model, config, trim=trim)


def evaluate(preset: str, kind: str | None, seeds: int, blocks: int, err: float = 0.5,
             pipeline: str = "self-forcing", height: int = 12, width: int = 16, seed0: int = 0) -> dict:
    """One batch run of ``seeds`` videos; returns the counts and rates of the module docstring."""
    trim = TokenTrimConfig.preset(preset)
    config = _rollout_config(pipeline)
    tokens = _wan_config().tokens_per_frame(height, width)
    k = trim.k_for(tokens)
    S = len(config.denoising_steps)
    first_decided = 1 + trim.warmup  # block 0 has no previous block; then warm-up
    plan = _plan(kind, seeds, blocks, k, tokens, seed0, first_decided) if kind else [None] * seeds
    model = SyntheticDenoiser(seeds, height, width, seed0, err, plan, block_frames=config.block_frames)
    text = torch.zeros(seeds, 1, 1)
    r = _rollout(pipeline, model, trim, config)
    res = r.run(text, blocks, height, width, seed=seed0)
    tp = fp = fn = decided = detected = 0
    tok_hits, tok_total = 0, 0
    regen = [0] * seeds
    for rec in res.records:
        if rec.get("warming_up") is None:
            continue
        b = rec["block"]
        for v in range(seeds):
            regen[v] += int(rec["regenerations"][v] or 0)
            if rec["warming_up"][v]:
                continue
            decided += 1
            det = bool(rec["detected"][v])
            detected += det
            c = plan[v]
            bad = c is not None and (b >= c[1] if c[0] == "offset" else b == c[1])
            if det and bad:
                tp += 1
                idx = rec["unstable_idx"][v] if rec["unstable_idx"][v] is not None else []
                if c[0] != "offset" and idx:
                    tok_hits += len(set(idx) & set(c[2]))
                    tok_total += k
            elif det:
                fp += 1
            elif bad:
                fn += 1
    if pipeline == "self-forcing":  # per video: S denoising forwards per block + refreshes (not the last)
        plain, detect_cost = S * blocks + (blocks - 1), trim.resolve_detect_step(S) + 1
    else:  # one forward per window (blocks + S - 1 windows) + refreshes; a regeneration re-runs one window
        plain, detect_cost = (blocks + S - 1) + (blocks - 1), 1
    trimmed = [plain + detect_cost * n for n in regen]
    return {
        "preset": preset, "kind": kind or "clean", "videos": seeds, "decided": decided, "detected": detected,
        "tp": tp, "fp": fp, "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "token_precision": tok_hits / tok_total if tok_total else math.nan,
        "false_trigger": detected / decided if (kind is None and decided) else math.nan,
        "forwards_per_block_on": sum(trimmed) / (seeds * blocks),
        "forwards_per_block_off": plain / blocks,
        "batch_forwards": res.timings["forwards"],
    }


def table(results: list[dict]) -> str:
    """A markdown table of ``evaluate`` results."""
    def f(x):
        return "-" if isinstance(x, float) and math.isnan(x) else (f"{x:.3f}" if isinstance(x, float) else str(x))

    lines = ["| preset | corruption | videos | decided | TP | FP | FN | block precision | recall | token precision "
             "| false triggers | forwards/block on | off |", "|" + "---|" * 13]
    for r in results:
        lines.append("| " + " | ".join(f(r[c]) for c in (
            "preset", "kind", "videos", "decided", "tp", "fp", "fn", "precision", "recall", "token_precision",
            "false_trigger", "forwards_per_block_on", "forwards_per_block_off")) + " |")
    return "\n".join(lines)


def run(args, device) -> list[dict]:
    seeds, blocks = args.detect_seeds, args.detect_blocks
    if args.quick:
        seeds, blocks = min(seeds, 8), min(blocks, 8)
    if seeds < 1:
        raise ValueError(f"--detect-seeds must be >= 1, got {seeds}")
    if blocks < 6:
        raise ValueError(f"--detect-blocks must be >= 6, got {blocks}")
    if not (math.isfinite(args.detect_err) and args.detect_err >= 0):
        raise ValueError(f"--detect-err must be finite and >= 0, got {args.detect_err}")
    results = [evaluate(p, kind, seeds, blocks, args.detect_err, args.detect_pipeline)
               for p in PRESETS for kind in (None, *KINDS)]
    print(table(results))
    rows = []
    shape = f"{args.detect_pipeline} B={seeds} blocks={blocks} 12x16 err={args.detect_err}"
    for r in results:
        for metric, unit in (("precision", "ratio"), ("recall", "ratio"), ("token_precision", "ratio"),
                             ("false_trigger", "ratio"), ("forwards_per_block_on", "forwards")):
            value = r[metric]
            if isinstance(value, float) and math.isnan(value):
                continue
            ratio = r["forwards_per_block_off"] / value if metric == "forwards_per_block_on" else None
            rows.append(common.row(SECTION, r["kind"], r["preset"], shape, "float32", metric, value, unit,
                                   device=str(device), baseline="trim-off" if ratio else "", ratio=ratio,
                                   note=f"tp={r['tp']} fp={r['fp']} fn={r['fn']} decided={r['decided']}"))
    return rows
