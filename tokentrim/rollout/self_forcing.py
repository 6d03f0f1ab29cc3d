"""Self Forcing inference (REFERENCE.md section 3) with TokenTrim (DESIGN.md "Rollouts").

Per block b of ``block_frames`` latent frames starting at absolute frame ``b * block_frames``:

1. ``cache.prepare(block_frames)``: past ``cache_frames`` committed frames the oldest non-sink
   frames are evicted (the first ``sink_frames`` stay). When the block would pass the RoPE table
   (``position_limit``) every cached key is re-based (``rollout.positions``): any length runs.
2. Denoising: x = noise; for each warped timestep t_i: flow = forward_cached(x, t_i); x0 = x - sigma_i
   * flow; if not last: x = (1 - sigma_{i+1}) x0 + sigma_{i+1} * fresh noise. The noisy block's K/V are
   written at the cache's end but not committed.
3. TokenTrim (blocks >= 1): the x0 of step ``detect_step`` is the candidate; the controller compares
   it with the previous accepted block's x0 at the same step (its summary). Videos it flags get the
   unstable token positions masked in the cached context (all layers; scope "recent": every
   committed non-sink frame, "previous": the previous block) before the block's own K/V are
   committed, and the block is denoised again from its first step (same noise by default). With
   ``detect_step=0`` (the paper) a flagged block costs one extra forward, with -1 a whole block.
   Only flagged videos take the regenerated result, accepted whatever its severity (one
   regeneration by default). ``accept`` feeds the statistics with the severity of the block finally
   accepted (the regenerated candidate's, for regenerated videos). The record's ``trim_forwards``
   counts the forwards TokenTrim added, ``masked_frames`` / ``masked_tokens`` what it masked.
4. Cache refresh: one forward of the clean x0 at timestep 0 rewrites the block's K/V, then
   ``cache.commit`` (skipped for the last block unless ``refresh_last_block``).
5. ``persist=False``: every mask is lifted after the block.

Upstream fidelity (guandeh17/Self-Forcing ``pipeline/causal_inference.py``
``CausalInferencePipeline.inference``, ``utils/wan_wrapper.py``, ``configs/self_forcing_dmd.yaml``
+ ``configs/default_config.yaml``):

- same: 3 frames per block, ``independent_first_frame`` false; steps [1000, 750, 500, 250] warped
  (``warp_denoising_step``) to [1000, 937.5, 833.3, 625]; x0 = x_t - sigma * flow in float64
  (``_convert_flow_pred_to_x0``); re-noising (1 - sigma') x0 + sigma' * fresh Gaussian noise at
  the next step (``add_noise``), none after the last step; the refresh feeds the clean x0 at
  ``context_noise`` = 0 (no noise added) at the block's own frames; no classifier-free guidance.
- output-equivalent: upstream also refreshes the last block (its step 3.3 runs for every block;
  REFERENCE.md says it is skipped); nothing reads that refresh, so it is skipped here by default
  (one forward less per video; ``refresh_last_block=True`` restores it).
- deliberate: upstream keeps latents in bf16 (noise drawn in bf16, x0 cast back to the model
  dtype before re-noising); here latents stay float32 between steps (x0 and re-noising in float64)
  and the model sees them in its own dtype. Upstream draws fresh noise from the global RNG; here
  per-block, per-video generators (``common.block_noise``). Upstream's default cache holds 21 frames with no
  eviction (``local_attn_size=-1``, ``sink_size=0``: 7 blocks at most); past ``cache_frames`` this
  rollout keeps ``sink_frames`` and rolls the rest (upstream's optional local attention + sink),
  identical to upstream up to 21 frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tokentrim.profiling import nvtx_range
from tokentrim.rollout.common import (
    BlockOutput,
    BlockRecorder,
    RolloutBase,
    TrimHook,
    block_noise,
    check_compact_after_prune,
    check_int,
    check_steps,
    take_videos,
)
from tokentrim.rollout.graphs import GraphRunner
from tokentrim.rollout.positions import PositionRebaser
from tokentrim.rollout.prompts import recache_recent


@dataclass
class SelfForcingConfig:
    """Self Forcing settings (defaults: the published inference setup).

    Attributes:
        block_frames: latent frames per AR block (3).
        denoising_steps: nominal steps, warped through the shifted schedule ((1000, 750, 500, 250)).
        shift: flow-matching timestep shift (5.0).
        cache_frames: KV cache capacity in latent frames (21 = 5 s); longer rollouts evict.
        sink_frames: frames kept forever once the cache is full (3); 0 = plain rolling window.
        refresh_last_block: also run the timestep-0 cache refresh after the last block.
        compact_after_prune: delete pruned cache tokens right after masking (needs persist), so
            attention cost follows the kept keys; None (default) = whenever the masks persist
            (``trim.persist``) and the run does not re-cache, False = keep them masked in place.
        use_graphs: capture the cached forward into CUDA graphs (CUDA only).
    """

    block_frames: int = 3
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    cache_frames: int = 21
    sink_frames: int = 3
    refresh_last_block: bool = False
    compact_after_prune: bool | None = None
    use_graphs: bool = False

    def __post_init__(self):
        check_int("SelfForcingConfig.block_frames", self.block_frames, 1)
        self.denoising_steps = check_steps("SelfForcingConfig.denoising_steps", self.denoising_steps)
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not self.shift > 0:
            raise ValueError(f"SelfForcingConfig.shift must be a positive number, got {self.shift!r}")
        check_int("SelfForcingConfig.sink_frames", self.sink_frames, 0)
        check_int("SelfForcingConfig.cache_frames", self.cache_frames, 1)
        need = self.sink_frames + 2 * self.block_frames
        if self.cache_frames < need:
            raise ValueError(
                f"SelfForcingConfig.cache_frames must hold the sink, the previous block and the new one "
                f"(>= sink_frames + 2*block_frames = {need}), got {self.cache_frames}"
            )
        check_compact_after_prune(self)
        for name in ("refresh_last_block", "use_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SelfForcingConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def cache_frames_for(self, num_blocks: int) -> int:
        """Frames of the cache of a ``num_blocks``-block video: ``cache_frames``, or the video's frames
        when it is shorter (at least the sink and one block, as the cache requires)."""
        return min(self.cache_frames, max(num_blocks * self.block_frames, self.sink_frames + self.block_frames))


class SelfForcingRollout(RolloutBase):
    """Self Forcing block-causal rollout of a ``WanModel`` with optional TokenTrim.

    Args:
        model: a ``WanModel`` (any dtype/device; latents follow its device).
        config: ``SelfForcingConfig`` (default settings if None).
        trim: ``TokenTrimConfig`` or None. None or ``enabled=False`` runs the plain rollout.
        use_graphs: CUDA graphs for the cached forward (or ``config.use_graphs``); eager on CPU.
        compile: ``torch.compile`` the cached forward (fullgraph, fused ops); composes with use_graphs.
    """

    config_class = SelfForcingConfig
    name = "self-forcing"

    def iter_blocks(self, text, num_blocks: int, height: int, width: int, seed: int = 0,
                    video_offset: int = 0, prompts=None, recache: bool = False,
                    reset_trim: bool = True) -> Iterator[BlockOutput]:
        """Yield each block as soon as it is accepted: ``BlockOutput(index, latents [B, block_frames, C,
        H, W] f32 on the model's device, record)``. Same arguments as ``run``."""
        tpf, schedule, batch = self._begin(text, num_blocks, height, width, seed, video_offset, prompts, recache)
        ctx = schedule.ctx
        cfg, facts = self.config, self.facts
        # re-caching rewrites each block at its uncompacted slot: pruned tokens stay masked
        compact = False if recache else cfg.compact_after_prune
        self.cache = self._make_cache(batch, tpf, num_blocks)
        self.positions = PositionRebaser(self.model, [self.cache], self.position_limit)
        self.runner = GraphRunner(self.model, ctx, self.cache, enabled=self.use_graphs, compile=self.compile)
        self.hook = TrimHook(self.trim, batch, compact)
        self.recorder = BlockRecorder(facts.device)
        self._shape = (batch, cfg.block_frames, facts.channels, height, width)
        self._seed = seed
        self._video_offset = video_offset
        prev = None
        kept_x0: dict[int, torch.Tensor] = {}  # clean latents of the committed blocks (recache only)
        with torch.no_grad():
            for b in range(num_blocks):
                self.recorder.start_block()
                extra, forwards = None, 0
                with nvtx_range("block", index=b):
                    if self._switch(schedule, b, reset_trim):
                        extra = {"prompt_switch": True, "recached": []}
                        if recache:
                            bf = cfg.block_frames
                            self.cache.prepare(bf)
                            extra["recached"] = recache_recent(self, kept_x0, bf, (b + 1) * bf)
                            forwards += len(extra["recached"])
                    x0, summary, trim_record, passes, n = self._block(b, prev)
                    forwards += n
                    if b < num_blocks - 1 or cfg.refresh_last_block:
                        self._refresh(x0, b)
                        forwards += 1
                    self.hook.after_block(self.cache)
                    if recache and schedule.switches:
                        kept_x0[b] = x0
                        live = {f // cfg.block_frames for f in self.cache.frames}
                        for old in [k for k in kept_x0 if k not in live]:
                            del kept_x0[old]
                rec = self.recorder.finish_block(b, b * cfg.block_frames, cfg.block_frames, forwards, trim_record,
                                                 passes, extra=extra)
                prev = summary  # the accepted block's x0 at the detect step (None with TokenTrim off)
                yield BlockOutput(b, x0, rec)

    # ---------------------------------------------------------------------------------- pieces
    def _check_recache(self, recache: bool) -> None:
        if recache and self.config.compact_after_prune:
            raise ValueError("recache=True rewrites cached blocks in place: it cannot be combined with "
                             "SelfForcingConfig.compact_after_prune=True")

    def _make_cache(self, batch: int, tpf: int, num_blocks: int):
        """A cache of ``cache_frames`` frames, or of the video's frames when it is shorter (at least
        the sink and one block, as the cache requires): nothing is evicted then either."""
        from tokentrim.cache import KVCache

        f, cfg = self.facts, self.config
        return KVCache(f.num_layers, batch, f.num_heads, f.head_dim, tpf, cfg.cache_frames_for(num_blocks),
                       sink_frames=cfg.sink_frames, dtype=f.dtype, device=f.device)

    def _noise(self, b: int, attempt: int = 0) -> torch.Tensor:
        """[S, B, F, C, H, W]: initial noise, then one tensor per re-noising."""
        return block_noise(self._seed, b, len(self.timesteps), self._shape, self.facts.device, attempt,
                           video_offset=self._video_offset)

    def _t(self, value: float) -> torch.Tensor:
        B, F = self._shape[:2]
        return torch.full((B, F), float(value), dtype=torch.float32, device=self.facts.device)

    def _denoise(self, noise: torch.Tensor, b: int, detect: int | None, on_candidate=None):
        """Run the denoising steps of block ``b`` from ``noise`` [S, B, F, C, H, W].

        At step ``detect`` the x0 is the candidate; ``on_candidate(x0)`` returning True aborts
        (a regeneration follows). Returns (x0 f32 or None if aborted, candidate or None, forwards).
        """
        fs = b * self.config.block_frames
        x = noise[0]
        cand = None
        n = 0
        for i, t in enumerate(self.timestep_values):
            with nvtx_range("step", block=b, step=i):
                flow = self.runner(x.to(self.facts.dtype), self._t(t), fs)
                n += 1
                x0 = self.schedule.x0_from_flow(flow, x, t)
                if i == detect:
                    cand = x0
                    if on_candidate is not None and on_candidate(x0):
                        return None, cand, n
                if i + 1 < len(self.timesteps):
                    x = self.schedule.renoise(x0, noise[i + 1], self.timestep_values[i + 1])
        return x0, cand, n

    def _block(self, b: int, prev: torch.Tensor | None):
        """One accepted block: (x0 [B,F,C,H,W] f32, its summary = the accepted x0 at the detect step
        (None when TokenTrim is off), trim record or None, regeneration passes, forwards).

        ``prev``: the previous accepted block's x0 at the detect step (None for block 0)."""
        cfg, hook = self.config, self.hook
        self.cache.prepare(cfg.block_frames)
        self.positions.ensure(b * cfg.block_frames, (b + 1) * cfg.block_frames)
        noise = self._noise(b)
        if not hook.active:
            x0, _, n = self._denoise(noise, b, None)
            return x0, None, None, 0, n
        tcfg = hook.config
        S = len(self.timesteps)
        detect = tcfg.resolve_detect_step(S)
        if prev is None:
            x0, cand, n = self._denoise(noise, b, detect)
            return x0, cand, None, 0, n

        max_regen = tcfg.max_regenerations
        B = self._shape[0]
        prev_frames = list(range((b - 1) * cfg.block_frames, b * cfg.block_frames))
        state = {"eligible": [True] * B, "allow": max_regen > 0}

        def on_candidate(cand):
            d = hook.decide(cand, prev, b)
            d.prune = [p and state["eligible"][v] for v, p in enumerate(d.prune)]
            state["d"] = d
            return state["allow"] and d.any_prune

        hook.start_block()
        x0, cand, forwards = self._denoise(noise, b, detect, on_candidate)
        first = d = state["d"]
        summary = cand  # per video: the candidate of the pass finally accepted
        # the full x0 of each video from the latest pass that finished (detect at the last step:
        # the aborted pass finished too); None when a pass aborted early
        best = x0 if x0 is not None else (cand if detect == S - 1 else None)
        final_sev = list(first.severity)
        regen = [0] * B
        passes = 0
        while x0 is None:  # some video flagged and a regeneration allowed
            videos = [v for v in range(B) if d.prune[v]]
            # the block's own K/V are not committed yet: only the cached context is masked
            hook.prune(self.cache, d, videos, prev_frames)
            passes += 1
            for v in videos:
                regen[v] += 1
            if not tcfg.same_noise:
                noise = take_videos(noise, self._noise(b, attempt=passes), videos, dim=1)
            state["eligible"] = [v in videos for v in range(B)]
            state["allow"] = passes < max_regen
            with nvtx_range("regenerate", block=b, attempt=passes):
                x0, cand, n = self._denoise(noise, b, detect, on_candidate)
            forwards += n
            d = state["d"]
            for v in videos:
                final_sev[v] = d.severity[v]  # the regenerated candidate vs the previous block
            summary = take_videos(summary, cand, videos)
            full = x0 if x0 is not None else (cand if detect == S - 1 else None)
            best = full if full is None or best is None else take_videos(best, full, videos)
        if passes:
            # videos not regenerated in the last pass keep their own earlier result (equal when
            # it was recomputed: same noise, cache unchanged for them)
            x0 = best
        record = hook.finish(self.cache, first, final_sev, regen, prev_frames, forwards - S)
        return x0, summary, record, passes, forwards

    def _refresh(self, x0: torch.Tensor, b: int) -> None:
        """Timestep-0 forward of the clean block: rewrites its K/V, then commits it."""
        fs = b * self.config.block_frames
        with nvtx_range("cache_refresh", block=b):
            self.runner(x0.to(self.facts.dtype), self._t(0.0), fs, kv_only=True)
            self.cache.commit(fs, self.config.block_frames)
