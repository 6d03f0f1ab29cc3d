"""Memory estimate of a rollout or a prompt -> video run, before any work: weights, KV cache,
activations, VAE, text encoder.

``estimate_rollout(...)`` / ``estimate_generate(...)`` return a ``MemoryEstimate`` (bytes per
component and the peak). Nothing is allocated: parameter counts come from a model built on the
meta device, cache sizes from the rollout's cache layout, activations from the shapes of the
largest forward. The CLIs print it before loading anything (``--dry-run`` prints and exits) and
refuse a run whose peak exceeds the memory available (or ``--memory-limit``), with the numbers.

The run has two phases that never overlap (``tokentrim generate`` frees the text encoder after
encoding):

- encode: text encoder weights + its activations (+ the transformer and VAE weights, loaded first);
- rollout: transformer weights + KV cache(s) + prompt contexts + latents + the larger of one
  forward's activations, the KV eviction copy and the VAE's per-block decode, + VAE weights.

Activations of one cached forward of T query tokens over Lk attended keys (B videos, dim d, FFN
f, weight bytes e): ``B*T*(18*4*d + 3*e*f)`` for the residual stream, norms, q/k/v/RoPE temporaries
and the FFN, plus, where attention materialises keys in fp32 (the CPU reference path:
``tokentrim.reference.masked_attention``), ``2.5*B*Lk*d*4`` (4.5 copies for non-fp32 caches). The
Triton kernel keeps no [T, Lk] state. On the CPU the reference compaction copies one video's K/V of
all layers when frames are evicted, and the allocator keeps it resident (counted on top). The factors were fitted to CPU peaks measured here (tiny and
small presets, 16x16 to 48x48 latents, both pipelines). ``runtime`` is what the framework itself
holds: about 1 MiB of CPU allocator state here; on CUDA a context + cuBLAS workspace of about 600 MiB is assumed
(not measured in this repository). Accuracy: within 25% of the measured CPU RSS peak for the tiny
and small presets (tests/test_memory.py; at these 10-40 MB sizes the peak itself moves by about 10%
between identical runs); the CUDA figures are a prediction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["MemoryEstimate", "add_cli_arguments", "available_bytes", "check_fits", "cli_limit", "estimate_generate",
           "estimate_rollout", "format_bytes"]

GiB = 1024**3
MiB = 1024**2
RUNTIME_CPU = 1 * MiB
RUNTIME_CUDA = 600 * MiB
_ACT_PER_TOKEN_D = 18 * 4  # bytes per token per model dim (fp32 residual stream and temporaries)
_ACT_PER_TOKEN_F = 3  # FFN hidden copies (in the weight dtype) per token per ffn dim


def format_bytes(n: int | float) -> str:
    """Human-readable bytes (binary units)."""
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class MemoryEstimate:
    """Bytes per component (0 = not part of the run) and where they live.

    Attributes:
        device: "cpu" or "cuda" (where the transformer runs).
        weights: transformer parameters and buffers (RoPE tables).
        kv_cache: every KV cache of the rollout (all layers, K and V, metadata, raw sink).
        text: prompt contexts (cross-attention K/V of every layer, for every prompt) + text input.
        latents: noise and latents of the blocks in flight, plus the whole output when kept.
        activations: the transient peak of the largest forward (or of a KV eviction copy).
        vae: VAE weights + one block's decode (0 when no VAE).
        text_encoder: text encoder weights + activations, its own phase (0 when none).
        runtime: allocator / CUDA context overhead.
        encode_extra: what else is resident while the text encoder runs (``tokentrim generate``
            loads the transformer and the VAE first).
        details: the shapes behind the numbers (query tokens, keys, frames ...).
    """

    device: str
    weights: int = 0
    kv_cache: int = 0
    text: int = 0
    latents: int = 0
    activations: int = 0
    vae: int = 0
    text_encoder: int = 0
    runtime: int = 0
    encode_extra: int = 0
    details: dict = field(default_factory=dict)

    @property
    def rollout_phase(self) -> int:
        return self.weights + self.kv_cache + self.text + self.latents + self.activations + self.vae + self.runtime

    @property
    def encode_phase(self) -> int:
        return self.text_encoder + self.encode_extra + self.runtime if self.text_encoder else 0

    @property
    def peak(self) -> int:
        """The estimated peak: the larger phase."""
        return max(self.rollout_phase, self.encode_phase)

    def to_dict(self) -> dict:
        keys = ("weights", "kv_cache", "text", "latents", "activations", "vae", "text_encoder", "runtime")
        return {"device": self.device, **{k: getattr(self, k) for k in keys}, "peak": self.peak,
                "details": dict(self.details)}

    def format(self) -> str:
        """A few lines for the terminal."""
        rows = [("transformer weights", self.weights), ("KV cache", self.kv_cache), ("prompt contexts", self.text),
                ("latents", self.latents), ("activations (peak forward)", self.activations),
                ("VAE (weights + block decode)", self.vae), ("runtime overhead", self.runtime)]
        sp = self.details.get("sp", 1)
        lines = [f"memory estimate ({self.device}{f', per rank of --sp {sp}' if sp > 1 else ''}):"]
        lines += [f"  {name:<30} {format_bytes(v):>12}" for name, v in rows if v]
        if self.text_encoder:
            lines.append(f"  {'text encoder (freed before)':<30} {format_bytes(self.text_encoder):>12}")
        lines.append(f"  {'peak':<30} {format_bytes(self.peak):>12}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ helpers
def _transformer_bytes(config, dtype: torch.dtype) -> int:
    """Parameter + buffer bytes of a WanModel of ``config`` in ``dtype`` (counted on the meta device)."""
    from tokentrim.model.wan import WanModel  # the class itself (callers may patch tokentrim.model)

    model = WanModel(config, dtype=dtype, device="meta")
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    return n + sum(b.numel() * b.element_size() for b in model.buffers())


def _cache_bytes(layers, batch, heads, head_dim, tpf, frames, dtype, sink_frames=0, raw_sink=False) -> int:
    """``KVCache.nbytes`` of the cache built with these arguments (on the meta device: nothing is
    allocated) plus its per-slot index tables (int64 offsets, int32 frame and position of each slot)."""
    from tokentrim.cache import KVCache  # cache.py imports this module

    cache = KVCache(layers, batch, heads, head_dim, tpf, frames, sink_frames=sink_frames, raw_sink=raw_sink,
                    dtype=dtype, device="meta")
    return cache.nbytes + frames * tpf * (8 + 4 + 4)


def _forward_act(batch, T, Lk, d, f, elem, attention_copies: float) -> int:
    return batch * T * (_ACT_PER_TOKEN_D * d + _ACT_PER_TOKEN_F * elem * f) + int(attention_copies * batch * Lk * d * 4)


def _is_cpu_reference(device: str, attention_backend: str) -> bool:
    return device == "cpu" or attention_backend == "reference"


# ----------------------------------------------------------------------------------- rollout
def estimate_rollout(config, *, pipeline: str = "self-forcing", rollout_config=None, batch: int = 1,
                     height: int, width: int, num_blocks: int, dtype: torch.dtype = torch.bfloat16,
                     device: str = "cuda", num_prompts: int = 1, keep_output: bool = True,
                     attention_backend: str = "auto", sp: int = 1) -> MemoryEstimate:
    """Estimate a ``tokentrim rollout`` (or ``rollout.run``) run.

    Args:
        config: the model's ``WanConfig`` (or a preset name).
        pipeline: "self-forcing" or "rolling-forcing"; rollout_config: its config (defaults if None).
        batch, height, width, num_blocks: as the rollout gets them (latent height/width).
        dtype: the model's weight dtype (the cache's too); device: "cpu" or "cuda".
        num_prompts: prompt contexts held at once (a prompt schedule keeps every prompt's).
        keep_output: ``run`` keeps every block's latents (and concatenates them at the end);
            False for a streamed run (``iter_blocks``, ``tokentrim generate``).
        attention_backend: the model's ``attention_backend`` ("auto": Triton on CUDA, the
            reference on the CPU).
        sp: head-parallel ranks (``rollout --sp N``): the estimate is then PER RANK. Each rank
            holds the whole model, the prompt contexts and the full latents, but the KV cache of
            H/N heads, the layer activations of ceil(S/N) tokens of each frame, attention over its
            H/N heads, plus the exchange buffers (q/k/v/raw-k sent, received and reassembled, fp32
            bound). Must divide the model's heads.
    """
    from tokentrim.model import WanConfig
    from tokentrim.rollout import RollingForcingConfig, SelfForcingConfig

    cfg = WanConfig.resolve(config)
    device = torch.device(device).type
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1 or cfg.num_heads % sp:
        raise ValueError(f"sp must be a positive divisor of the model's {cfg.num_heads} heads, got {sp!r}")
    if pipeline not in ("self-forcing", "rolling-forcing"):
        raise ValueError(f"pipeline must be 'self-forcing' or 'rolling-forcing', got {pipeline!r}")
    rc = rollout_config or (SelfForcingConfig() if pipeline == "self-forcing" else RollingForcingConfig())
    tpf = cfg.tokens_per_frame(height, width)
    elem = dtype.itemsize
    d, f, L, H, hd = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads // sp, cfg.head_dim
    bf = rc.block_frames
    total = num_blocks * bf
    est = MemoryEstimate(device=device, runtime=RUNTIME_CUDA if device == "cuda" else RUNTIME_CPU)
    est.weights = _transformer_bytes(cfg, dtype)
    cpu_ref = _is_cpu_reference(device, attention_backend)
    copies = 0 if not cpu_ref else (2.5 if elem == 4 else 4.5)
    frames = rc.cache_frames_for(num_blocks)
    if pipeline == "self-forcing":
        est.kv_cache = _cache_bytes(L, batch, H, hd, tpf, frames, dtype, sink_frames=rc.sink_frames)
        T, Lk = bf * tpf, frames * tpf
        steps = len(rc.denoising_steps)
        in_flight = (steps + 4) * bf  # noise of every step, x, x0, the candidate and the previous block
    else:
        S = rc.window_blocks
        est.kv_cache = _cache_bytes(L, batch, H, hd, tpf, frames, dtype, sink_frames=rc.sink_frames, raw_sink=True)
        if rc.refresh_frames:
            est.kv_cache += _cache_bytes(L, batch, H, hd, tpf, rc.refresh_frames_for(num_blocks), dtype)
        T, Lk = min(num_blocks, S) * bf * tpf, frames * tpf
        in_flight = (S * S + 4 * S) * bf  # every window block's noise levels, states, x, x0
    block_lat = batch * cfg.in_dim * height * width * 4
    est.latents = in_flight * block_lat + (2 * total * block_lat if keep_output else 0)
    est.text = num_prompts * (L * 2 * batch * cfg.text_len * d * elem + batch * cfg.text_len * cfg.text_dim * 4)
    if sp == 1:
        act = _forward_act(batch, T, Lk, d, f, elem, copies)
    else:  # this rank's tokens through the layers; all tokens of its heads through the attention
        Tl = T // tpf * -(-tpf // sp)
        act = _forward_act(batch, Tl, 0, d, f, elem, 0) + int(copies * batch * Lk * (d // sp) * 4)
        act += 3 * 4 * batch * T * (d // sp) * 4  # exchange: q/k/v/raw-k sent, received, reassembled
    evict = 0
    if cpu_ref and total > frames:
        # the reference compaction copies one video's surviving K/V of all layers; the CPU
        # allocator keeps that memory resident, so later forwards add to it
        evict = L * 2 * (frames - rc.sink_frames) * tpf * (d // sp) * elem
    est.activations = act + evict
    est.details = {"pipeline": pipeline, "tokens_per_frame": tpf, "query_tokens": T, "cache_frames": frames,
                   "latent_frames": total, "dtype": str(dtype).replace("torch.", "")}
    if sp > 1:
        est.details["sp"] = sp
    return est


# ----------------------------------------------------------------------------------- generate
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object")
    return d


def _t5_bytes(cfg: dict, dtype: torch.dtype, batch: int, text_len: int) -> int:
    """umT5 encoder weights + activations from its config.json (vocab, d_model, d_ff, layers, heads)."""
    dm, dff, n = int(cfg.get("d_model", 4096)), int(cfg.get("d_ff", 10240)), int(cfg.get("num_layers", 24))
    heads, dkv, vocab = int(cfg.get("num_heads", 64)), int(cfg.get("d_kv", 64)), int(cfg.get("vocab_size", 256384))
    inner = heads * dkv
    per_layer = 4 * dm * inner + 3 * dm * dff + 2 * dm + heads * int(cfg.get("relative_attention_num_buckets", 32))
    params = vocab * dm + n * per_layer + dm
    act = batch * text_len * (8 * dm + 3 * dff) * 4 + batch * heads * text_len * text_len * 4 * 3
    return params * dtype.itemsize + act


def _vae_weight_bytes(cfg: dict) -> int:
    """AutoencoderKLWan weights (fp32) from its channel sizes: about 127M parameters per 96 base
    channels, squared scaling (Wan2.1 VAE: 127M, 508 MB fp32)."""
    base = int(cfg.get("base_dim", 96))
    return int(127e6 * (base / 96) ** 2) * 4


def _vae_decode_bytes(cfg: dict, pixel_h: int, pixel_w: int, batch: int) -> int:
    """One latent frame's streamed decode: the decoder's full-resolution stage holds ~8 feature maps
    of base_dim channels for 4 pixel frames, plus the causal-conv caches (2 frames per conv)."""
    per_frame = int(cfg.get("base_dim", 96)) * pixel_h * pixel_w * 4
    return batch * per_frame * (8 * 4 + 2 * 12)


def estimate_generate(model_dir, *, pipeline: str, height: int, width: int, num_blocks: int, batch: int = 1,
                      dtype: torch.dtype = torch.bfloat16, device: str = "cuda", num_prompts: int = 1,
                      checkpoint_config=None, panels: int = 1, sp: int = 1) -> MemoryEstimate:
    """Estimate ``tokentrim generate`` from the folder's config files only (no weights are read).

    height/width are in pixels (latents are /8). ``checkpoint_config``: the transformer's
    ``WanConfig`` when it does not come from ``<model_dir>/transformer/config.json``. ``panels``:
    rollouts run side by side (``--compare``: 2). ``num_prompts``: prompt contexts per video (a
    prompt schedule keeps each prompt's). ``sp``: head-parallel ranks (``generate --sp N``): the
    estimate is then that of rank 0, the largest (the only rank holding the VAE and the text
    encoder; the transformer part is per rank as in ``estimate_rollout``).
    """
    from tokentrim.model import WanConfig

    root = Path(model_dir)
    if checkpoint_config is not None:
        cfg = WanConfig.resolve(checkpoint_config)
    elif (root / "transformer" / "config.json").is_file():
        cfg = WanConfig.from_json(root / "transformer" / "config.json")
    else:
        cfg = WanConfig.preset("wan2.1-t2v-1.3b")
    lat_h, lat_w = height // 8, width // 8
    one = estimate_rollout(cfg, pipeline=pipeline, batch=batch, height=lat_h, width=lat_w, num_blocks=num_blocks,
                           dtype=dtype, device=device, num_prompts=num_prompts, keep_output=False, sp=sp)
    est = MemoryEstimate(device=one.device, weights=one.weights, runtime=one.runtime, details=dict(one.details))
    est.kv_cache, est.text, est.latents = panels * one.kv_cache, panels * one.text, panels * one.latents
    est.activations = one.activations
    vae_cfg = root / "vae" / "config.json"
    vae_weights = 0
    if vae_cfg.is_file():
        vae = _read_json(vae_cfg)
        vae_weights = _vae_weight_bytes(vae)
        est.vae = vae_weights + _vae_decode_bytes(vae, height, width, batch * panels)
    te_cfg = root / "text_encoder" / "config.json"
    if te_cfg.is_file():
        est.text_encoder = _t5_bytes(_read_json(te_cfg), dtype, batch * num_prompts, cfg.text_len)
        est.encode_extra = est.weights + vae_weights
    est.details.update({"pixel_size": [height, width], "panels": panels})
    return est


# ------------------------------------------------------------------------------------ limits
def available_bytes(device) -> int | None:
    """Memory a run may use on ``device``: free CUDA memory (``torch.cuda.mem_get_info``), or the
    CPU's MemAvailable (/proc/meminfo). None when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(est: MemoryEstimate, limit: int | None, what: str = "this run") -> None:
    """Raise ``MemoryError`` with the numbers when ``est.peak`` exceeds ``limit`` bytes (None = no check)."""
    if limit is None or est.peak <= limit:
        return
    raise MemoryError(
        f"{what} needs about {format_bytes(est.peak)} on {est.device} but only {format_bytes(limit)} is "
        f"available (KV cache {format_bytes(est.kv_cache)}, weights {format_bytes(est.weights)}, activations "
        f"{format_bytes(est.activations)}); use a smaller size, fewer videos per batch, or --memory-limit "
        f"to override"
    )


# ------------------------------------------------------------------------------------ CLI glue
def add_cli_arguments(parser) -> None:
    """``--dry-run`` and ``--memory-limit`` on an argparse parser (or argument group)."""
    parser.add_argument("--dry-run", action="store_true",
                        help="print the memory estimate (weights, KV cache, activations, VAE) and exit")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                        help="memory the run may use, in GiB (default: free memory of the device); a run "
                             "whose estimate exceeds it stops before starting")


def cli_limit(args, device) -> int | None:
    """The byte limit for ``check_fits`` from ``--memory-limit`` (GiB) or the device's free memory."""
    limit = getattr(args, "memory_limit", None)
    if limit is not None:
        if not limit > 0:
            raise ValueError(f"--memory-limit must be a positive number of GiB, got {limit}")
        return int(limit * GiB)
    return available_bytes(device)
