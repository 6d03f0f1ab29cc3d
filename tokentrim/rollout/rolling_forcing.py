"""Rolling Forcing inference (REFERENCE.md section 4) with TokenTrim.

With S = len(denoising_steps) (= window_blocks) warped timesteps t_0 > ... > t_{S-1}, block ``b``
sits at noise level ``j = w - b`` in window ``w``. Window ``w`` (w = 0 .. num_blocks + S - 2) holds
the blocks b with 0 <= w - b <= S - 1 and b < num_blocks, oldest first, so the oldest block has
the lowest noise. One ``forward_cached`` denoises the whole window with per-frame timesteps
``t_{w-b}`` (frames of a block share it). Then:

- the block at level S - 1 (if any) is finished: its x0 is final;
- every other block is re-noised to its next level: x = (1 - sigma_{j+1}) x0 + sigma_{j+1} noise;
- the next window adds block w + 1 as pure noise (level 0).

Start-up (w < S - 1): windows hold blocks 0..w at levels w..0 (no block finishes). Drain
(w >= num_blocks): no new block joins; the window shrinks from the front as blocks finish, and
its levels are the lowest ones. Every block thus passes each level exactly once. (Upstream
picks the timesteps of a partial window from its position; that matches this rule whenever
num_blocks >= S; for shorter videos this rule is the consistent one.)

Cache (``KVCache(raw_sink=True, sink_frames, max_frames = sink + local + window frames)``): before
each window ``cache.prepare(window frames)`` evicts down to the sink plus the latest finished
block(s). After a block finishes, a timestep-0 forward of its clean x0 writes its K/V and
``commit`` makes it part of the cache; block 0 becomes the attention sink, kept un-rotated and
re-rotated by the model to sit right before the oldest non-sink key frame. Only finished blocks
are ever committed: a window attends to the sink, the previous clean block(s) and itself.

TokenTrim: each finished block (b >= 1) is the candidate, judged against the previous finished
block. Flagged videos get the unstable positions masked in the cache (scope "previous": the
previous finished block, unless it is the raw sink, which cannot be pruned; "all": every
non-sink frame) and the same window forward runs again on the pruned cache (its input is the
same, so ``same_noise`` changes nothing here; ``detect_step`` is not used: the candidate is
always the finished x0). Flagged videos take the whole regenerated window (the finished block
and the re-noised rest).

Noise: block b draws S tensors from its own generator (``common.block_noise``): the initial
noise and the re-noising noise of levels 1..S-1.
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
    check_int,
    check_steps,
    prepare_text,
)
from tokentrim.rollout.graphs import GraphRunner


@dataclass
class RollingForcingConfig:
    """Rolling Forcing settings (defaults: the published inference setup).

    Attributes:
        block_frames: latent frames per block (3).
        window_blocks: blocks denoised jointly (5); must equal len(denoising_steps).
        denoising_steps: nominal steps, warped ((1000, 800, 600, 400, 200)).
        shift: flow-matching timestep shift (5.0).
        sink_frames: attention-sink frames, the video's first frames (3).
        local_frames: previous clean frames kept besides the sink (3 = one block).
        compact_after_prune: delete pruned tokens right after masking (needs persist).
        use_graphs: capture the cached forward into CUDA graphs (CUDA only).
    """

    block_frames: int = 3
    window_blocks: int = 5
    denoising_steps: tuple[int, ...] = (1000, 800, 600, 400, 200)
    shift: float = 5.0
    sink_frames: int = 3
    local_frames: int = 3
    compact_after_prune: bool = False
    use_graphs: bool = False

    def __post_init__(self):
        check_int("RollingForcingConfig.block_frames", self.block_frames, 1)
        check_int("RollingForcingConfig.window_blocks", self.window_blocks, 1)
        self.denoising_steps = check_steps("RollingForcingConfig.denoising_steps", self.denoising_steps)
        if len(self.denoising_steps) != self.window_blocks:
            raise ValueError(
                f"RollingForcingConfig.window_blocks ({self.window_blocks}) must equal the number of "
                f"denoising_steps ({len(self.denoising_steps)}): one noise level per window block"
            )
        if isinstance(self.shift, bool) or not isinstance(self.shift, (int, float)) or not self.shift > 0:
            raise ValueError(f"RollingForcingConfig.shift must be a positive number, got {self.shift!r}")
        check_int("RollingForcingConfig.sink_frames", self.sink_frames, 1)
        check_int("RollingForcingConfig.local_frames", self.local_frames, 0)
        if self.sink_frames % self.block_frames:
            raise ValueError(
                f"RollingForcingConfig.sink_frames ({self.sink_frames}) must be a multiple of block_frames "
                f"({self.block_frames}): the sink is the first block(s)"
            )
        for name in ("compact_after_prune", "use_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RollingForcingConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def window_frames(self) -> int:
        return self.window_blocks * self.block_frames

    @property
    def cache_frames(self) -> int:
        """KV cache capacity: sink + local + window frames (21 with the defaults)."""
        return self.sink_frames + self.local_frames + self.window_frames


class RollingForcingRollout(RolloutBase):
    """Rolling Forcing rollout of a ``WanModel`` with optional TokenTrim.

    Args:
        model: a ``WanModel``.
        config: ``RollingForcingConfig`` (defaults if None).
        trim: ``TokenTrimConfig`` or None (None or ``enabled=False`` = the plain rollout).
        use_graphs: CUDA graphs for the cached forward (or ``config.use_graphs``); eager on CPU.

    ``run(...)`` returns a ``RolloutResult`` whose ``windows`` lists every window forward with its
    per-frame timesteps.
    """

    config_class = RollingForcingConfig
    name = "rolling-forcing"

    def iter_blocks(self, text, num_blocks: int, height: int, width: int, seed: int = 0) -> Iterator[BlockOutput]:
        """Yield each block when it finishes (window ``b + S - 1``): ``BlockOutput(index, latents
        [B, block_frames, C, H, W] f32 on the model's device, record)``; the record's ``windows``
        lists the window forwards since the previous block (start-up windows go to block 0)."""
        check_int("num_blocks", num_blocks, 1)
        check_int("seed", seed, 0)
        cfg, facts = self.config, self.facts
        tpf = facts.tokens_per_frame(height, width)
        ctx, batch = prepare_text(self.model, text)
        from tokentrim.cache import KVCache

        self.cache = KVCache(facts.num_layers, batch, facts.num_heads, facts.head_dim, tpf, cfg.cache_frames,
                             sink_frames=cfg.sink_frames, raw_sink=True, dtype=facts.dtype, device=facts.device)
        self.runner = GraphRunner(self.model, ctx, self.cache, enabled=self.use_graphs)
        self.hook = TrimHook(self.trim, batch, cfg.compact_after_prune)
        self.recorder = BlockRecorder(facts.device)
        self.windows = []
        S, bf = len(self.timesteps), cfg.block_frames
        shape = (batch, bf, facts.channels, height, width)
        noise: dict[int, torch.Tensor] = {}  # block -> [S, B, bf, C, H, W]
        state: dict[int, torch.Tensor] = {}  # block -> its current noisy latents (f32)
        prev = None
        pending: list[dict] = []
        forwards = 0
        with torch.no_grad():
            for w in range(num_blocks + S - 1):
                first, last = max(0, w - S + 1), min(num_blocks - 1, w)
                if w < num_blocks:
                    noise[w] = block_noise(seed, w, S, shape, facts.device)
                    state[w] = noise[w][0]
                blocks = list(range(first, last + 1))
                levels = [w - b for b in blocks]
                finishing = blocks[0] if levels[0] == S - 1 else None
                with nvtx_range("window", index=w):
                    x = torch.cat([state[b] for b in blocks], dim=1)
                    t = torch.cat([self.timesteps[j].expand(batch, bf) for j in levels], dim=1).to(facts.device)
                    fs = first * bf
                    self.cache.prepare(x.shape[1])
                    attended = list(self.cache.frames)
                    x0 = self._window(x, t, fs)
                    forwards += 1
                    win = {"window": w, "blocks": blocks, "frame_start": fs, "levels": levels,
                           "timesteps": t[0].tolist(), "cache_frames": attended}
                    self.windows.append(win)
                    pending.append(win)
                    trim_record, passes = None, 0
                    if finishing is not None and self.hook.active and prev is not None:
                        x0, trim_record, passes, n = self._judge(x, t, fs, x0, prev, finishing)
                        forwards += n
                    for k, b in enumerate(blocks):
                        if levels[k] < S - 1:
                            j = levels[k] + 1
                            x0_b = x0[:, k * bf:(k + 1) * bf]
                            state[b] = self.schedule.renoise(x0_b, noise[b][j], float(self.timesteps[j]))
                    if finishing is None:
                        continue
                    done = x0[:, :bf].contiguous()
                    del state[finishing], noise[finishing]
                    if finishing < num_blocks - 1:
                        with nvtx_range("cache_refresh", block=finishing):
                            self.cache.prepare(bf)
                            self.runner(done.to(facts.dtype), torch.zeros(batch, bf, device=facts.device),
                                        finishing * bf, kv_only=True)
                            self.cache.commit(finishing * bf, bf)
                        forwards += 1
                    self.hook.after_block(self.cache)
                rec = self.recorder.finish_block(finishing, finishing * bf, bf, forwards, trim_record, passes,
                                                 extra={"windows": pending})
                pending, forwards = [], 0
                prev = done
                yield BlockOutput(finishing, done, rec)

    def _window(self, x: torch.Tensor, t: torch.Tensor, fs: int) -> torch.Tensor:
        """One joint forward of a window: x0 [B, n*bf, C, H, W] f32 from noisy x (f32) at per-frame t."""
        flow = self.runner(x.to(self.facts.dtype), t, fs)
        return self.schedule.x0_from_flow(flow, x, t)

    def _judge(self, x, t, fs, x0, prev, b):
        """TokenTrim on finished block ``b`` (the window's first): returns (x0 of the window, the
        accepted record, regeneration passes, extra forwards)."""
        hook, bf = self.hook, self.config.block_frames
        tcfg = hook.config
        B = x.shape[0]
        d = first = hook.decide(x0[:, :bf], prev, b)
        prev_frames = list(range((b - 1) * bf, b * bf))
        final_sev = list(first.severity)
        regen = [0] * B
        passes = n = 0
        eligible = [True] * B
        while tcfg.max_regenerations > 0 and any(p and eligible[v] for v, p in enumerate(d.prune)):
            videos = [v for v in range(B) if d.prune[v] and eligible[v]]
            if not hook.prune(self.cache, d, videos, prev_frames):
                break  # nothing maskable (the previous block is the raw sink): no regeneration
            passes += 1
            for v in videos:
                regen[v] += 1
            with nvtx_range("regenerate", block=b, attempt=passes):
                x0_new = self._window(x, t, fs)
            n += 1
            sel = torch.tensor([v in videos for v in range(B)], device=x0.device).view(B, 1, 1, 1, 1)
            x0 = torch.where(sel, x0_new, x0)
            d = hook.decide(x0[:, :bf], prev, b)
            for v in videos:
                final_sev[v] = d.severity[v]
            eligible = [v in videos for v in range(B)]
            if passes >= tcfg.max_regenerations:
                break
        if tcfg.max_regenerations == 0 and first.any_prune:
            hook.prune(self.cache, first, [v for v in range(B) if first.prune[v]], prev_frames)
        record = hook.controller.accept(first, final_severity=final_sev, regenerated=regen)
        return x0, record, passes, n
