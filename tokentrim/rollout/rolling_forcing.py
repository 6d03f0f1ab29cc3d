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
picks the timesteps of a partial window from its position: starting at frame 0 -> the noisiest
levels, ending at the video's end -> the lowest; that is this rule whenever num_blocks >= S. For
num_blocks < S upstream's rule repeats levels and restarts the last block from pure noise every
window, so this rule is used there.)

Window cache (``KVCache(raw_sink=True, sink_frames, max_frames = sink + local + window frames)``):
before each window ``cache.prepare(window frames)`` evicts down to the sink plus the latest
finished block(s). Block 0 becomes the attention sink, kept un-rotated and re-rotated by the model
to sit right before the oldest non-sink key frame. Only finished blocks are ever committed: a
window attends to the sink, the previous clean block(s) (one for a full window, more for the
shorter drain windows: sink + clean + window <= 21 frames) and itself.

Cache refresh: after a block finishes, one forward of its clean x0 at timestep 0 (upstream's
``context_noise`` is 0, its add-noise lines are commented out) computes its K/V, which are
committed. Upstream's refresh (``updating_cache=True``) attends the last ``max_attention_size`` =
21 frames of its cache ending with the block itself: the latest finished blocks (up to 6), with
block 0 at its own position 0 while it is among them and no sink once it is not. The window cache
keeps less than that, so with ``refresh_frames`` > 0 the refresh runs on a second, sink-less
``refresh_cache`` of ``refresh_frames`` frames (positions absolute, oldest evicted) and the
block's K/V are copied into the window cache; while the sink is being written the refresh runs on
the window cache (the raw keys live there) and is copied the other way.

Upstream fidelity (TencentARC/RollingForcing ``pipeline/rolling_forcing_inference.py``
``inference_rolling_forcing`` and ``wan/modules/causal_model.py`` ``CausalWanSelfAttention``):

- same: window count num_blocks + S - 1; per-frame timesteps (``shared_timestep``, the lowest
  level first; start-up windows take the noisiest levels, drain windows the lowest); the newest
  block enters as pure noise; every other block re-noised with fresh noise to the next level; the
  finished block refreshed before the next window; the sink re-rotated right before the working
  cache; a full window attends 3 + 3 + 15 = 21 frames.
- output-equivalent: upstream refreshes the window's first block after EVERY window (start-up
  windows write block 0's unfinished x0, which no window attends since they all start at frame 0
  and attend themselves only; the last window refreshes the last block, which nobody reads); here
  only finished blocks but the last are refreshed. Upstream's window forward also writes the
  first block's noisy K/V, which its refresh then overwrites.
- deliberate: upstream's cache is one 24-frame buffer (sink + 7 blocks) holding only clean
  blocks, the window's K/V being concatenated on the fly; here the window cache (21 frames) holds
  the window's K/V while it runs and the refresh cache (21 frames) the refresh context. Upstream
  draws fresh noise from the global RNG and keeps latents in bf16 (x0 cast back to the model
  dtype); here per-block, per-video generators (``common.block_noise``) and float32 latents between windows
  (x0 and re-noising in float64), the model sees them in its own dtype.

TokenTrim: ``detect_step`` picks the noise level j (0 = the first denoising iteration, the paper;
-1 = the finished x0) at which each block b >= 1 is judged: in window b + j, block b's x0 is the
candidate and the previous block's accepted x0 at the same level j (from window b - 1 + j) is
the summary it is compared with. Flagged videos get the unstable positions masked in the cache
(scope "recent": every cached non-sink frame of the recent context, in the window cache and the
refresh cache; "previous": the previous block's frames where cached, i.e. only when j is the
last level; the raw sink is never masked) and the same window forward runs again on the pruned
cache (one extra forward; its input is the same, so ``same_noise`` changes nothing here).
Flagged videos take the whole regenerated window (the judged block and the rest). When nothing
in scope is cached (start-up windows, or "previous" before the previous block finished) the
decision is recorded but nothing is regenerated. The record of block b (emitted when b
finishes) carries its decision, ``trim_forwards`` (the extra forwards) and what was masked;
``forwards`` counts the forwards of the windows since the previous record.

Noise: each video of block b draws S tensors from its own generator (``common.block_noise``,
seeded by (seed, video index, block)): the initial noise and the re-noising noise of levels 1..S-1.
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
        refresh_frames: frames the timestep-0 cache refresh of a finished block attends, the block
            included (21 = upstream's max_attention_size): the latest finished blocks, block 0 at
            its own position while it is among them. These K/V live in a second KV cache of
            ``refresh_frames`` frames. 0: the refresh attends what the window cache holds (sink +
            local frames), with no second cache (less memory, not upstream).
        compact_after_prune: delete pruned tokens right after masking (needs persist), so
            attention cost follows the kept keys; None (default) = whenever the masks persist
            (``trim.persist``), False = keep them masked in place.
        use_graphs: capture the cached forward into CUDA graphs (CUDA only).
    """

    block_frames: int = 3
    window_blocks: int = 5
    denoising_steps: tuple[int, ...] = (1000, 800, 600, 400, 200)
    shift: float = 5.0
    sink_frames: int = 3
    local_frames: int = 3
    refresh_frames: int = 21
    compact_after_prune: bool | None = None
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
        check_int("RollingForcingConfig.refresh_frames", self.refresh_frames, 0)
        if 0 < self.refresh_frames < self.sink_frames + self.block_frames:
            raise ValueError(
                f"RollingForcingConfig.refresh_frames must be 0 or >= sink_frames + block_frames "
                f"({self.sink_frames + self.block_frames}), got {self.refresh_frames}"
            )
        if self.sink_frames % self.block_frames:
            raise ValueError(
                f"RollingForcingConfig.sink_frames ({self.sink_frames}) must be a multiple of block_frames "
                f"({self.block_frames}): the sink is the first block(s)"
            )
        check_compact_after_prune(self)
        if not isinstance(self.use_graphs, bool):
            raise TypeError(f"RollingForcingConfig.use_graphs must be a bool, got {self.use_graphs!r}")

    @property
    def window_frames(self) -> int:
        return self.window_blocks * self.block_frames

    @property
    def cache_frames(self) -> int:
        """KV cache capacity: sink + local + window frames (21 with the defaults)."""
        return self.sink_frames + self.local_frames + self.window_frames

    def cache_frames_for(self, num_blocks: int) -> int:
        """Frames of the working cache of a ``num_blocks``-block video: a short one (fewer blocks
        than the window) never fills ``cache_frames``."""
        return min(self.cache_frames,
                   self.sink_frames + self.local_frames + min(num_blocks, self.window_blocks) * self.block_frames)

    def refresh_frames_for(self, num_blocks: int) -> int:
        """Frames of the refresh cache of a ``num_blocks``-block video (0: no refresh cache)."""
        return min(self.refresh_frames, num_blocks * self.block_frames)


class RollingForcingRollout(RolloutBase):
    """Rolling Forcing rollout of a ``WanModel`` with optional TokenTrim.

    Args:
        model: a ``WanModel``.
        config: ``RollingForcingConfig`` (defaults if None).
        trim: ``TokenTrimConfig`` or None (None or ``enabled=False`` = the plain rollout).
        use_graphs: CUDA graphs for the cached forward (or ``config.use_graphs``); eager on CPU.
        compile: ``torch.compile`` the cached forward (fullgraph, fused ops); composes with use_graphs.

    ``run(...)`` returns a ``RolloutResult`` whose ``windows`` lists every window forward with its
    per-frame timesteps.
    """

    config_class = RollingForcingConfig
    name = "rolling-forcing"

    def iter_blocks(self, text, num_blocks: int, height: int, width: int, seed: int = 0,
                    video_offset: int = 0, prompts=None, recache: bool = False,
                    reset_trim: bool = True) -> Iterator[BlockOutput]:
        """Yield each block when it finishes (window ``b + S - 1``): ``BlockOutput(index, latents
        [B, block_frames, C, H, W] f32 on the model's device, record)``; the record's ``windows``
        lists the window forwards since the previous block (start-up windows go to block 0)."""
        tpf, schedule, batch = self._begin(text, num_blocks, height, width, seed, video_offset, prompts, recache)
        ctx = schedule.ctx
        cfg, facts = self.config, self.facts
        from tokentrim.cache import KVCache

        S, bf = len(self.timesteps), cfg.block_frames
        self.cache = KVCache(facts.num_layers, batch, facts.num_heads, facts.head_dim, tpf, cfg.cache_frames_for(num_blocks),
                             sink_frames=cfg.sink_frames, raw_sink=True, dtype=facts.dtype, device=facts.device)
        self.runner = GraphRunner(self.model, ctx, self.cache, enabled=self.use_graphs, compile=self.compile)
        self.refresh_cache = None
        if cfg.refresh_frames:
            self.refresh_cache = KVCache(facts.num_layers, batch, facts.num_heads, facts.head_dim, tpf,
                                         cfg.refresh_frames_for(num_blocks), dtype=facts.dtype, device=facts.device)
        self.positions = PositionRebaser(self.model, [self.cache, self.refresh_cache], self.position_limit)
        self.hook = TrimHook(self.trim, batch, cfg.compact_after_prune)
        self.recorder = BlockRecorder(facts.device)
        self.windows = []
        self._t_windows: dict = {}
        shape = (batch, bf, facts.channels, height, width)
        noise: dict[int, torch.Tensor] = {}  # block -> [S, B, bf, C, H, W]
        state: dict[int, torch.Tensor] = {}  # block -> its current noisy latents (f32)
        hook = self.hook
        judge_level = self.trim.resolve_detect_step(S) if hook.active else None
        summaries: dict[int, torch.Tensor] = {}  # block -> its accepted x0 at the judged level
        judged: dict[int, tuple] = {}  # block -> (trim record, passes) until the block finishes
        pending: list[dict] = []
        switched: list[int] = []
        forwards = 0
        with torch.no_grad():
            for w in range(num_blocks + S - 1):
                first, last = max(0, w - S + 1), min(num_blocks - 1, w)
                if w < num_blocks and self._switch(schedule, w, reset_trim):  # the switch block enters the window
                    switched.append(w)
                if w < num_blocks:
                    noise[w] = block_noise(seed, w, S, shape, facts.device, video_offset=video_offset)
                    state[w] = noise[w][0]
                blocks = list(range(first, last + 1))
                levels = [w - b for b in blocks]
                finishing = blocks[0] if levels[0] == S - 1 else None
                with nvtx_range("window", index=w):
                    x = torch.cat([state[b] for b in blocks], dim=1)
                    t = self._window_timesteps(levels, batch)
                    fs = first * bf
                    self.cache.prepare(x.shape[1])
                    # positions looked up: the raw sink's, right before the oldest kept non-sink frame
                    # (committed frames are finished blocks, all before fs: the sink starts <= fs), up to
                    # the window's end; re-based when they would pass the RoPE table
                    self.positions.ensure(self.cache.sink_rope_frame_start(fs), fs + x.shape[1])
                    attended = list(self.cache.frames)
                    x0 = self._window(x, t, fs)
                    forwards += 1
                    win = {"window": w, "blocks": blocks, "frame_start": fs, "levels": levels,
                           "timesteps": [self.timestep_values[j] for j in levels for _ in range(bf)],
                           "cache_frames": attended}
                    self.windows.append(win)
                    pending.append(win)
                    jb = None if judge_level is None else w - judge_level  # the block judged in this window
                    if jb is not None and first <= jb <= last:
                        k = jb - first
                        if jb - 1 in summaries:
                            x0, rec_j, passes_j, n = self._judge(x, t, fs, x0, summaries.pop(jb - 1), jb, k)
                            forwards += n
                            judged[jb] = (rec_j, passes_j)
                        summaries[jb] = x0[:, k * bf:(k + 1) * bf].clone()
                    for k, b in enumerate(blocks):
                        if levels[k] < S - 1:
                            j = levels[k] + 1
                            x0_b = x0[:, k * bf:(k + 1) * bf]
                            state[b] = self.schedule.renoise(x0_b, noise[b][j], self.timestep_values[j])
                    if finishing is not None:
                        done = x0[:, :bf].contiguous()
                        del state[finishing], noise[finishing]
                        if finishing < num_blocks - 1:
                            win["refresh_frames"] = self._refresh(done, finishing)
                            forwards += 1
                    hook.after_block(self.cache, self.refresh_cache)
                if finishing is None:
                    continue
                trim_record, passes = judged.pop(finishing, (None, 0))
                rec = self.recorder.finish_block(finishing, finishing * bf, bf, forwards, trim_record, passes,
                                                 extra={"windows": pending, "prompt_switches": switched} if switched
                                                 else {"windows": pending})
                pending, forwards, switched = [], 0, []
                yield BlockOutput(finishing, done, rec)

    def _check_recache(self, recache: bool) -> None:
        if recache:
            raise ValueError("recache=True (KV re-cache at a prompt switch) is supported by Self Forcing only")

    def _window_timesteps(self, levels: list[int], batch: int) -> torch.Tensor:
        """Per-frame timesteps [batch, len(levels)*bf] f32 on the model's device for a window whose
        blocks sit at noise ``levels``. Built once per distinct pattern (start-up, steady state and
        drain windows: at most 2*S of them) and reused, so a window makes no host-to-device copy."""
        key = (tuple(levels), batch)
        cached = self._t_windows.get(key)
        if cached is None:
            bf = self.config.block_frames
            t = torch.cat([self.timesteps[j].expand(batch, bf) for j in levels], dim=1)
            cached = self._t_windows[key] = t.to(self.facts.device)
        return cached

    def _refresh(self, done: torch.Tensor, b: int) -> list[int]:
        """Timestep-0 forward of finished block ``b`` (x0 ``done`` [B, bf, C, H, W] f32): writes its
        K/V into the window cache and commits it there (and in the refresh cache). Returns the
        committed frames the refresh attended (besides the block itself)."""
        bf, facts = self.config.block_frames, self.facts
        fs = b * bf
        x = done.to(facts.dtype)
        t = torch.zeros(done.shape[0], bf, device=facts.device)
        cache, side = self.cache, self.refresh_cache
        with nvtx_range("cache_refresh", block=b):
            cache.prepare(bf)
            if side is None:
                context = list(cache.frames)
                self.runner(x, t, fs, kv_only=True)
            else:
                side.prepare(bf)
                context = list(side.frames)
                if len(cache.frames) < cache.sink_frames:
                    # the sink is being written: it needs raw keys, which only the window cache
                    # keeps; both caches hold the same frames at the same positions here
                    self.runner(x, t, fs, kv_only=True)
                    _copy_block(cache, side, bf)
                else:
                    self.runner(x, t, fs, kv_only=True, cache=side)
                    _copy_block(side, cache, bf)
                side.commit(fs, bf)
            cache.commit(fs, bf)
        return context

    def _window(self, x: torch.Tensor, t: torch.Tensor, fs: int) -> torch.Tensor:
        """One joint forward of a window: x0 [B, n*bf, C, H, W] f32 from noisy x (f32) at per-frame t."""
        flow = self.runner(x.to(self.facts.dtype), t, fs)
        return self.schedule.x0_from_flow(flow, x, t)

    def _judge(self, x, t, fs, x0, prev, b, k):
        """TokenTrim on block ``b``, the ``k``-th block of the window (at the judged level): its x0
        is compared with ``prev``, the previous block's accepted x0 at the same level. Flagged
        videos get the cache masked and re-run the whole window. Returns (x0 of the window, the
        accepted record, regeneration passes, extra forwards)."""
        hook, bf = self.hook, self.config.block_frames
        tcfg = hook.config
        B = x.shape[0]
        sl = slice(k * bf, (k + 1) * bf)
        hook.start_block()
        d = first = hook.decide(x0[:, sl], prev, b)
        prev_frames = list(range((b - 1) * bf, b * bf))
        final_sev = list(first.severity)
        regen = [0] * B
        passes = n = 0
        eligible = [True] * B
        while tcfg.max_regenerations > 0 and any(p and eligible[v] for v, p in enumerate(d.prune)):
            videos = [v for v in range(B) if d.prune[v] and eligible[v]]
            frames = hook.prune(self.cache, d, videos, prev_frames, self.refresh_cache)
            if not frames:
                break  # nothing maskable (no cached non-sink frame in scope): no regeneration
            passes += 1
            for v in videos:
                regen[v] += 1
            with nvtx_range("regenerate", block=b, attempt=passes):
                x0_new = self._window(x, t, fs)
            n += 1
            x0 = take_videos(x0, x0_new, videos)
            d = hook.decide(x0[:, sl], prev, b)
            for v in videos:
                final_sev[v] = d.severity[v]
            eligible = [v in videos for v in range(B)]
            if passes >= tcfg.max_regenerations:
                break
        record = hook.finish(self.cache, first, final_sev, regen, prev_frames, n, self.refresh_cache)
        return x0, record, passes, n


def _copy_block(src, dst, num_frames: int) -> None:
    """Write the uncommitted block ``src`` just received (``num_frames`` frames at ``src.length``,
    every layer) into ``dst`` at ``dst.length``. Keys are RoPE'd at their absolute frames in both.
    Host sync: none (device-side gather)."""
    T = num_frames * src.tokens_per_frame
    idx = src.length.long()[:, None] + torch.arange(T, device=src.device)
    bidx = torch.arange(src.batch, device=src.device)[:, None]
    for i in range(src.num_layers):
        dst.write(i, src.k(i)[bidx, idx], src.v(i)[bidx, idx])
