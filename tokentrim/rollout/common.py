"""Pieces shared by the Self Forcing and Rolling Forcing loops: results, noise, model facts, TokenTrim.

Noise: every video ``v`` of a batch draws all of block ``b``'s Gaussian noise (the initial noise and
one tensor per re-noising) from its own CPU ``torch.Generator`` seeded with
``block_seed(seed, b, attempt, video=video_offset + v)``, in float32, then moves it to the model's
device. So a video's noise does not depend on the device, on the batch it runs in (video 0 of a
batch of 2 gets the noise of the same seed run alone), on what earlier blocks did (regenerations,
detection), and a regeneration with ``same_noise`` reuses exactly the tensors of the first attempt.
``video_offset`` is the job-level index of the batch's first video (data parallel: each rank passes
the index of its first video in the whole job, so a video's noise is the same whatever the split).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tokentrim.config import TokenTrimConfig
from tokentrim.kernels.validate import check_int
from tokentrim.profiling import nvtx_range
from tokentrim.rollout.schedule import FlowSchedule


@dataclass
class BlockOutput:
    """One accepted block, as ``iter_blocks`` yields it.

    Attributes:
        index: block index (0-based).
        latents: [B, block_frames, C, H, W] float32 clean latents on the model's device.
        record: the block's telemetry dict (see ``BlockRecorder``).
    """

    index: int
    latents: torch.Tensor
    record: dict


@dataclass
class RolloutResult:
    """A finished rollout.

    Attributes:
        latents: [B, F, C, H, W] float32 on the CPU, F = num_blocks * block_frames.
        records: one telemetry dict per block.
        timings: ``total_s``, ``block_s`` (list), ``latent_frames``, ``pixel_frames`` (4F-3),
            ``latent_fps``, ``pixel_fps``, ``forwards`` (model forward calls).
        windows: Rolling Forcing only: one dict per window forward (frames, per-frame timesteps).
    """

    latents: torch.Tensor
    records: list[dict]
    timings: dict
    windows: list[dict] = field(default_factory=list)


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames the Wan VAE decodes from ``latent_frames`` latent frames: 4F - 3."""
    return max(0, 4 * latent_frames - 3)


def block_seed(seed: int, block: int, attempt: int = 0, video: int = 0) -> int:
    """Seed in [0, 2**63) of the generator of video ``video`` (its index in the job) in block
    ``block`` (``attempt`` > 0: fresh noise for a regeneration): a 64-bit BLAKE2b hash of the four
    integers, so distinct tuples get unrelated streams and any size of ``seed`` is accepted."""
    key = f"tokentrim-noise:{int(seed)}:{int(video)}:{int(block)}:{int(attempt)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def block_noise(seed: int, block: int, count: int, shape, device, attempt: int = 0,
                video_offset: int = 0) -> torch.Tensor:
    """[count, *shape] float32 standard normal noise of one block, drawn on the CPU, on ``device``.

    ``shape[0]`` is the batch B: video ``v`` draws its [count, *shape[1:]] slice from its own
    generator seeded ``block_seed(seed, block, attempt, video_offset + v)`` (batch invariance).
    """
    check_int("video_offset", video_offset, 0)
    B, per_video = int(shape[0]), (count, *shape[1:])
    out = torch.empty((count, B, *shape[1:]), dtype=torch.float32)
    for v in range(B):
        gen = torch.Generator(device="cpu").manual_seed(block_seed(seed, block, attempt, video_offset + v))
        out[:, v] = torch.randn(per_video, generator=gen, dtype=torch.float32)
    return out.to(device)


def check_steps(name: str, steps) -> tuple[int, ...]:
    steps = tuple(steps)
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1000 for s in steps):
        raise ValueError(f"{name} must be a non-empty sequence of ints in (0, 1000], got {steps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{name} must be strictly decreasing, got {steps}")
    return steps


def check_compact_after_prune(config) -> None:
    """TypeError unless ``config.compact_after_prune`` (a rollout config) is a bool or None."""
    value = config.compact_after_prune
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{type(config).__name__}.compact_after_prune must be a bool or None, got {value!r}")


class ModelFacts:
    """What the loops need to know about a ``WanModel``: sizes, dtype, device, patch."""

    def __init__(self, model):
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise TypeError(f"model must be a WanModel (with a .config WanConfig), got {type(model).__name__}")
        self.config = cfg
        self.num_layers = cfg.num_layers
        sp = getattr(model, "sequence_parallel", None)  # head parallel: the cache holds this rank's heads
        self.num_heads = cfg.num_heads if sp is None else sp.local_heads(cfg.num_heads)
        self.head_dim = cfg.dim // cfg.num_heads
        self.channels = cfg.in_dim
        self.patch = tuple(cfg.patch_size[1:])
        param = next(model.parameters())
        self.dtype = getattr(model, "dtype", param.dtype)
        self.device = getattr(model, "device", param.device)

    def tokens_per_frame(self, height: int, width: int) -> int:
        check_int("height", height, 1)
        check_int("width", width, 1)
        ph, pw = self.patch
        if height % ph or width % pw:
            raise ValueError(
                f"latent height and width must be multiples of the patch ({ph}, {pw}), got ({height}, {width})"
            )
        return (height // ph) * (width // pw)


def prepare_text(model, text):
    """A ``TextContext`` from ``text`` [B, Lt, text_dim] (prepared once), or ``text`` if already one.

    Returns (ctx, batch size). Raises ``ValueError`` when the text (or the TextContext's keys and
    values) holds NaN or Inf, before any work: one host sync per run.
    """
    if isinstance(text, torch.Tensor):
        if text.dim() != 3:
            raise ValueError(f"text must be [B, Lt, text_dim] or a TextContext, got shape {tuple(text.shape)}")
        _check_finite_text("text", text)
        return model.prepare_text(text), int(text.shape[0])
    batch = getattr(text, "batch", None)
    if batch is None:
        for name in ("k", "keys", "text"):
            t = getattr(text, name, None)
            if isinstance(t, torch.Tensor):
                batch = int(t.shape[0])
                break
            if isinstance(t, (list, tuple)) and t and isinstance(t[0], torch.Tensor):
                batch = int(t[0].shape[0])
                break
    if batch is None:
        raise TypeError(f"text must be a [B, Lt, text_dim] tensor or a TextContext, got {type(text).__name__}")
    for name in ("k", "v"):
        t = getattr(text, name, None)
        if isinstance(t, torch.Tensor):
            _check_finite_text(f"text (TextContext.{name})", t)
    return text, int(batch)


def _check_finite_text(name: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):  # the one host sync
        bad = int((~finite).sum())
        raise ValueError(f"{name} holds {bad} NaN or Inf value(s) of {t.numel()}: the text embeddings must be "
                         "finite (a broken text encoder or embeddings file?)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def take_videos(base: torch.Tensor, new: torch.Tensor, videos, dim: int = 0) -> torch.Tensor:
    """A copy of ``base`` whose ``videos`` (indices along ``dim``) come from ``new``. Per-video
    slicing: no mask tensor built from host data, so no host-to-device copy."""
    out = base.clone()
    for v in videos:
        out.select(dim, v).copy_(new.select(dim, v))
    return out


class TrimHook:
    """TokenTrim as the loops use it: controller, decisions and the cache masking.

    Inactive (``active`` False) when ``trim`` is None or ``trim.enabled`` is False: the loops then
    skip every TokenTrim step, so the rollout is exactly the plain one.
    """

    def __init__(self, trim: TokenTrimConfig | None, batch: int, compact_after_prune: bool | None = None):
        if trim is not None and not isinstance(trim, TokenTrimConfig):
            raise TypeError(f"trim must be a TokenTrimConfig or None, got {type(trim).__name__}")
        self.config = trim
        self.active = trim is not None and trim.enabled
        if compact_after_prune is None:  # default: delete pruned tokens whenever the masks persist
            compact_after_prune = bool(self.active and trim.persist)
        self.compact_after_prune = compact_after_prune
        self._batch = batch
        self.start_block()
        if self.active and compact_after_prune and not trim.persist:
            raise ValueError("compact_after_prune=True deletes pruned tokens, so it needs TokenTrimConfig.persist=True")
        self.controller = None
        if self.active:
            from tokentrim.trim import TokenTrimController

            self.controller = TokenTrimController(trim, batch)

    def start_block(self) -> None:
        """Reset the block's masking totals (``extra``); call once per judged block, before any prune."""
        self._masked_frames: set[int] = set()
        self._masked_tokens: list[int] = [0] * self._batch

    def reset_statistics(self) -> None:
        """Restart TokenTrim's running statistics (records are kept): the next blocks warm up again."""
        if self.controller is not None:  # None: TokenTrim off
            self.controller.reset_statistics()

    def decide(self, cand: torch.Tensor, prev: torch.Tensor, block: int):
        with nvtx_range("detect", block=block):
            return self.controller.decide(cand, prev, block)

    def prune(self, cache, decision, videos, prev_frames: list[int], mirror=None) -> list[int]:
        """Mask ``decision.unstable_idx[v]`` for each video in ``videos`` and return the frames masked.

        Frames: scope "previous": the committed frames among ``prev_frames`` (the previous block);
        scope "recent" (or "all"): every committed non-sink frame of the recent context. The sink
        frames (``cache.frames[:cache.sink_frames]``) are never masked in either scope when the
        cache keeps a raw sink (Rolling Forcing); with "recent" they are never masked at all.

        ``mirror``: a second cache (Rolling Forcing's refresh cache, no sink) that gets the same
        masks on its committed frames of the same scope, excluding ``cache``'s sink frames.

        Returns the sorted absolute frames masked in ``cache`` or ``mirror`` (empty: nothing could
        be masked, so a regeneration would see the same cache). The frames and, per video, the
        cache tokens (frame, position pairs) newly masked add to the block's totals (``extra``).
        Host sync: one (the masked-token counts).
        """
        with nvtx_range("prune", block=decision.block_index):
            sink = set(cache.sink_frame_list)
            if self.config.scope == "previous":
                frames = [f for f in prev_frames if f in cache.frames]
                if cache.raw_sink:
                    frames = [f for f in frames if f not in sink]
                pool = prev_frames
            else:
                frames = [f for f in cache.frames if f not in sink]
                pool = None
            mframes = []
            if mirror is not None:
                mframes = [f for f in (mirror.frames if pool is None else pool) if f in mirror.frames and f not in sink]
            extra = [f for f in mframes if f not in frames]  # frames only the mirror holds
            if not (frames or extra):  # then mframes is empty too
                return []

            def kept() -> torch.Tensor:
                # cache.prune masks only inside ``frames``: the whole cache's count changes as theirs;
                # the mirror's frames that the cache also holds are counted once, in the cache
                n = cache.kept_count() if frames else 0
                return (n + mirror.kept_count(extra)) if extra else n

            before = kept()
            if frames:
                for v in videos:
                    cache.prune(v, decision.unstable_idx[v], frames=frames)
            if mframes:
                for v in videos:
                    mirror.prune(v, decision.unstable_idx[v], frames=mframes)
            self._masked_tokens = [a + m for a, m in zip(self._masked_tokens, (before - kept()).tolist())]
            # only the pruned cache(s): each prune is compacted, so the other holds no masked token
            if self.compact_after_prune and videos:
                if frames:
                    cache.compact()
                if mframes:
                    mirror.compact()
            masked = sorted(set(frames) | set(mframes))
            self._masked_frames.update(masked)
            return masked

    def finish(self, cache, first, final_severity, regenerated, prev_frames, trim_forwards: int, mirror=None) -> dict:
        """Accept the block's first decision ``first`` with the severities finally accepted and
        return its record (controller fields + ``extra``). Without regenerations allowed
        (max_regenerations 0) the flagged videos' masks are applied now: to later blocks only."""
        if self.config.max_regenerations == 0 and first.any_prune:
            self.prune(cache, first, [v for v in range(len(first.prune)) if first.prune[v]], prev_frames, mirror)
        record = self.controller.accept(first, final_severity=final_severity, regenerated=regenerated)
        record.update(self.extra(trim_forwards))
        return record

    def extra(self, trim_forwards: int) -> dict:
        """Rollout fields of a block's TokenTrim record: ``trim_forwards`` (the forwards TokenTrim
        added: aborted and regenerated passes), ``masked_frames`` (absolute cache frames masked for
        this block) and ``masked_tokens`` (cache tokens newly masked, per video; sink never counted),
        the totals of the prunes since ``start_block``."""
        return {"trim_forwards": trim_forwards, "masked_frames": sorted(self._masked_frames),
                "masked_tokens": list(self._masked_tokens)}

    def after_block(self, cache, mirror=None) -> None:
        """Undo the masks when they do not persist (``persist=False``)."""
        if self.active and not self.config.persist:
            cache.unprune_all()
            if mirror is not None:
                mirror.unprune_all()


class BlockRecorder:
    """Builds the per-block telemetry records and the run timings.

    A record: ``block``, ``frame_start``, ``num_frames``, ``time_s``, ``forwards``, and when TokenTrim
    is active the controller's record fields (``severity``, ``threshold``, ``prune``, ``detected``,
    ``warming_up``, ``regenerated``, ``regenerations`` (per video), ``accepted_severity``, ...)
    plus ``final_severity`` (= accepted severity) and ``num_regenerations`` (regeneration passes of
    the batch). Blocks without a decision (block 0, TokenTrim off) carry ``None`` there.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.records: list[dict] = []
        self.block_s: list[float] = []
        self.forwards = 0
        self.t_start = time.perf_counter()
        self._t_block = self.t_start

    def start_block(self) -> None:
        self._t_block = time.perf_counter()

    def finish_block(self, index: int, frame_start: int, num_frames: int, forwards: int, trim_record: dict | None,
                     passes: int, extra: dict | None = None) -> dict:
        sync(self.device)
        dt = time.perf_counter() - self._t_block
        self.block_s.append(dt)
        self.forwards += forwards
        rec = {"block": index, "frame_start": frame_start, "num_frames": num_frames, "time_s": dt, "forwards": forwards}
        if trim_record is not None:
            rec.update({k: v for k, v in trim_record.items() if k != "block"})
            rec["final_severity"] = trim_record.get("accepted_severity")
        else:
            rec.update({"severity": None, "threshold": None, "prune": None, "regenerated": None,
                        "regenerations": None, "final_severity": None})
        rec["num_regenerations"] = passes
        if extra:
            rec.update(extra)
        self.records.append(rec)
        self._t_block = time.perf_counter()
        return rec

    def timings(self, latent_frames: int) -> dict:
        total = time.perf_counter() - self.t_start
        return {
            "total_s": total,
            "block_s": list(self.block_s),
            "latent_frames": latent_frames,
            "pixel_frames": pixel_frames(latent_frames),
            "latent_fps": latent_frames / total if total > 0 else float("nan"),
            "pixel_fps": pixel_frames(latent_frames) / total if total > 0 else float("nan"),
            "forwards": self.forwards,
        }


class RolloutBase:
    """What both rollouts share: argument checks, the schedule, ``run`` over ``iter_blocks``.

    Subclasses set ``config_class`` and ``name`` and implement ``iter_blocks``; ``run`` collects
    its blocks (and ``self.windows`` when the subclass records window forwards).
    """

    config_class: type = object
    name = "rollout"

    def __init__(self, model, config=None, trim: TokenTrimConfig | None = None, use_graphs: bool = False,
                 compile: bool | str = False, position_limit: int | None = None):
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        if trim is not None and not isinstance(trim, TokenTrimConfig):
            raise TypeError(f"trim must be a TokenTrimConfig or None, got {type(trim).__name__}")
        self.model = model
        self.config = config
        self.trim = trim
        self.use_graphs = bool(use_graphs or config.use_graphs)
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be a bool or a torch.compile backend name, got {compile!r}")
        #: torch.compile the cached forward (fullgraph, fused ops), composed with the CUDA-graph runner
        self.compile = compile
        self.facts = ModelFacts(model)
        self.schedule = FlowSchedule(config.shift)
        self.timesteps = self.schedule.warp(config.denoising_steps)  # [S] float32, t_0 = 1000
        #: the same timesteps as Python floats (the step loops use these: no tensor, no sync)
        self.timestep_values: list[float] = self.timesteps.tolist()
        if trim is not None and trim.enabled:
            trim.resolve_detect_step(len(self.timesteps))  # validates detect_step
            if tuple(trim.patch) != self.facts.patch:
                raise ValueError(
                    f"TokenTrimConfig.patch {tuple(trim.patch)} must equal the model's spatial patch "
                    f"{self.facts.patch}: the unstable set indexes the model's tokens, another patch would "
                    f"prune the wrong ones (use patch={self.facts.patch})"
                )
        #: RoPE positions a rollout may use before re-basing (None = the model's table, 1024)
        self.position_limit = position_limit
        self.positions = None  # the PositionRebaser of the last run (its .events list the re-bases)
        self.cache = None
        self.runner = None
        self.hook = None
        self.recorder = None
        self.windows: list[dict] = []

    @property
    def controller(self):
        """The ``TokenTrimController`` of the last run (None when TokenTrim is off)."""
        return None if self.hook is None else self.hook.controller

    def run(self, text, num_blocks: int, height: int, width: int, seed: int = 0, progress: bool = False,
            video_offset: int = 0, prompts=None, recache: bool = False, reset_trim: bool = True) -> RolloutResult:
        """Generate ``num_blocks`` blocks; returns latents [B, num_blocks*block_frames, C, H, W] f32 (CPU).

        Args:
            text: [B, Lt, text_dim] text embeddings or a ``TextContext`` from ``model.prepare_text``.
            num_blocks: AR blocks (>= 1).
            height, width: latent size (multiples of the model's spatial patch).
            seed: noise seed.
            progress: show a tqdm bar per block.
            video_offset: job-level index of this batch's first video: video ``v`` draws its noise
                from a generator seeded by (seed, video_offset + v), so a video's result does not
                depend on the batch it runs in (data parallel: pass each rank's first index).
            prompts: prompt switches ``[(block_index, text), ...]``: ``text`` ([B, Lt, text_dim] or a
                TextContext) conditions the blocks from ``block_index`` on (strictly increasing, in
                [1, num_blocks)); ``text`` conditions the blocks before the first switch.
            recache: at a switch, re-cache the recent context under the new prompt (Self Forcing;
                LongLive's KV re-cache).
            reset_trim: at a switch, restart TokenTrim's running statistics (a wanted jump is not
                drift, so it is not pruned).
            (tokentrim.rollout.prompts has the details.)
        """
        extra = {} if prompts is None else dict(prompts=prompts, recache=recache, reset_trim=reset_trim)
        it = self.iter_blocks(text, num_blocks, height, width, seed=seed, video_offset=video_offset, **extra)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=num_blocks, desc=self.name, unit="block")
        blocks = [out.latents.float().cpu() for out in it]
        latents = torch.cat(blocks, dim=1)
        return RolloutResult(latents, list(self.recorder.records), self.recorder.timings(latents.shape[1]),
                             windows=list(self.windows))

    def iter_blocks(self, text, num_blocks: int, height: int, width: int, seed: int = 0, video_offset: int = 0,
                    prompts=None, recache: bool = False, reset_trim: bool = True) -> Iterator[BlockOutput]:
        """Yield each block as a ``BlockOutput`` as soon as it is accepted. Same arguments as ``run``."""
        raise NotImplementedError

    def _check_recache(self, recache: bool) -> None:
        """Raise when ``recache`` cannot run with this rollout and config (subclasses)."""

    def _begin(self, text, num_blocks: int, height: int, width: int, seed: int, video_offset: int, prompts,
               recache: bool):
        """Check a run's arguments before any work, then prepare its prompts.

        Returns (tokens per frame, ``PromptSchedule``, batch); the schedule's ``ctx`` is the runner's
        text context. Host sync: ``prepare_text``'s finiteness check, one per prompt.
        """
        from tokentrim.rollout.prompts import PromptSchedule, check_prompts  # prompts imports this module

        check_int("num_blocks", num_blocks, 1)
        check_int("seed", seed, 0)
        check_int("video_offset", video_offset, 0)
        switches = check_prompts(prompts, num_blocks)
        self._check_recache(recache)
        tpf = self.facts.tokens_per_frame(height, width)
        ctx, batch = prepare_text(self.model, text)
        return tpf, PromptSchedule(self.model, ctx, batch, switches), batch

    def _switch(self, schedule, block: int, reset_trim: bool) -> bool:
        """Switch to the prompt that starts at ``block``, if any (``schedule.switch_at``), restarting
        TokenTrim's statistics when ``reset_trim``. Returns whether it switched. Host sync: none."""
        if not schedule.switch_at(block):
            return False
        if reset_trim:
            self.hook.reset_statistics()
        return True
