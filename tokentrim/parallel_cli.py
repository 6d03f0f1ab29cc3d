"""``tokentrim rollout`` as a job over torchrun ranks (``--num-videos``, ``--sp``; tokentrim.distributed).

- ``--num-videos M`` (data parallel under torchrun, or one process): rank r makes its contiguous
  share of the M videos in batches of ``--batch``, video v with the noise of (seed, v), and writes
  each finished video at once to ``--out/video_<v>/`` (latents.pt [1, F, C, H, W] float32,
  telemetry.json, telemetry.png: only that video's entries); rank 0 writes ``--out/summary.json``
  (per video: rank, frames/s, pruned blocks, status). Rank status files live in ``--out/ranks/``.
- ``--sp N`` (head parallel, N = WORLD_SIZE): every rank runs the one job of ``--batch`` videos
  with 1/N of the heads; rank 0 writes the usual ``latents.pt``, ``telemetry.json``,
  ``telemetry.png`` block by block, like one process (an interrupted run keeps its finished
  blocks); every block's TokenTrim decisions are checked across the ranks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from tokentrim import distributed
from tokentrim.safeio import OutputLock


def _check_sp(args, parser, num_heads: int, where: str) -> None:
    if num_heads % args.sp:
        ok = ", ".join(str(n) for n in range(1, num_heads + 1) if num_heads % n == 0)
        parser.error(f"--sp {args.sp} must divide the model's {num_heads} attention heads ({where}); "
                     f"use one of {ok}")


def _check(args, parser, preset):
    """The --sp checks that need no model weights and no process group (before any work; --out is
    checked by ``cli._resolve``). A ``--dry-run`` (memory estimate only, per rank with --sp) needs no
    torchrun and writes nothing."""
    from tokentrim.model import WanConfig

    world = distributed.env_world_size()
    if args.sp > 1:
        if args.checkpoint is None:
            _check_sp(args, parser, WanConfig.preset(preset).num_heads, f"preset {preset}")
        if args.num_videos is not None:
            parser.error("--sp runs one job of --batch videos together; it cannot be combined with --num-videos")
        if args.graphs:
            parser.error("--sp cannot be combined with --graphs (collectives are not captured)")
        if args.compile:  # fullgraph compile: the exchange's collectives are not traced
            parser.error("--sp cannot be combined with --compile (the exchange is not traced into the "
                         "compiled forward)")
        if world != args.sp and not args.dry_run:
            parser.error(f"--sp {args.sp} needs {args.sp} processes, one per head group: launch with "
                         f"torchrun --nproc_per_node {args.sp} (WORLD_SIZE is {world})")


def run_rollout_job(args) -> int:
    """``tokentrim rollout`` with ``--num-videos``/``--sp`` or under torchrun; returns the exit code."""
    from tokentrim.cli import (
        _build_model,
        _check_limits,
        _default_preset,
        _make_rollout,
        _memory_check,
        _resolve,
        _text_embeddings,
    )

    parser = args._parser
    _check(args, parser, _default_preset(args))  # first of all, before _resolve checks and creates --out
    device, dtype, preset, trim = _resolve(args, parser)
    # the estimate (per rank with --sp; every block is kept: rollout.run), before any work
    if args.dry_run and _memory_check(args, parser, device, dtype, preset, keep_output=True):
        return 0
    try:
        ctx = distributed.init(args.device, tensors=args.sp > 1)
    except ValueError as e:
        parser.error(str(e))
    try:
        if not args.dry_run:  # against the free memory of this rank's own device (printed by rank 0)
            _memory_check(args, parser, ctx.device, dtype, preset, keep_output=True, show=ctx.is_main)
        model = _build_model(args, parser, ctx.device, dtype, preset)
        cfg = model.config
        _check_sp(args, parser, cfg.num_heads, "from --checkpoint")
        _check_limits(args, parser, model, trim)
        if args.sp > 1:  # the same weights on every rank, whatever the init did; this rank's heads
            distributed.broadcast_parameters(model)
            model.sequence_parallel = distributed.SequenceParallel()
        rollout = _make_rollout(args, parser, model, trim)  # the rollout settings, checked before any work
        text = _text_embeddings(args, parser, cfg, args.num_videos)  # None: --batch (also --sp)
        if args.sp > 1:
            return _run_sp(args, parser, ctx, rollout, text, dtype, preset, trim)
        return _run_dp(args, parser, ctx, model, text, dtype, preset, trim)  # a fresh rollout per batch
    finally:
        ctx.close()


# ----------------------------------------------------------------------------- head parallel
def _run_sp(args, parser, ctx, rollout, text, dtype, preset, trim) -> int:
    """``rollout`` (its model's weights already broadcast, ``sequence_parallel`` set) on every rank,
    rank 0 holding the --out lock."""
    with contextlib.ExitStack() as lock:  # rank 0 writes: one run at a time per --out, like one process
        error = None
        if ctx.is_main:
            try:
                lock.enter_context(OutputLock(os.path.join(args.out, "latents.pt")))
            except ValueError as e:
                error = str(e)
        error = ctx.broadcast_object(error)
        if error is not None:
            parser.error(error)
        return _run_sp_locked(args, ctx, rollout, text, dtype, preset, trim)


class _DecisionsDiffer(RuntimeError):
    pass


class _HeadParallelOutput:
    """--sp: every finished block's TokenTrim decisions are checked across the ranks (they all see
    the same gathered latents: check, never assume), then rank 0's ``RolloutOutput`` streams it to
    disk; the other ranks keep only the records (``output`` None). Same interface as RolloutOutput."""

    def __init__(self, ctx, rollout, output):
        self.ctx, self.rollout, self.output = ctx, rollout, output
        self.records: list[dict] = []
        self.frames = 0
        self.deferred_signal = None

    def add(self, index: int, latents: torch.Tensor, record: dict) -> None:
        distributed.check_decisions(self.ctx, [record], index, self._differ)
        if self.output is not None:
            self.output.add(index, latents, record)
        self.records.append(record)
        self.frames += int(latents.shape[1])

    def _differ(self, message: str) -> _DecisionsDiffer:
        return _DecisionsDiffer(f"rank {self.ctx.rank}: {message}")

    def finish(self, status: str, extra_meta: dict | None = None, title: str | None = None) -> dict:
        if self.output is None:
            return {}
        cache = self.rollout.cache  # this rank's share of the heads
        extra = dict(extra_meta or {}, cache_heads_per_rank=cache.num_heads if cache is not None else None,
                     cache_kv_bytes_per_rank=cache.kv_nbytes if cache is not None else None)
        written = self.output.finish(status, extra, title)
        self.deferred_signal = self.output.deferred_signal
        return written


def _run_sp_locked(args, ctx, rollout, text, dtype, preset, trim) -> int:
    """Every rank runs the rollout; rank 0 writes it block by block (``cli._stream``: an
    interrupted or failed run keeps its finished blocks, like one process)."""
    from tokentrim.cli import _stream, rollout_meta
    from tokentrim.rollout_out import RolloutOutput

    meta = dict(rollout_meta(args, ctx.device, dtype, preset, trim), sp=args.sp)
    output = _HeadParallelOutput(ctx, rollout, RolloutOutput(args.out, meta) if ctx.is_main else None)
    try:
        return _stream(args, rollout, text.to(ctx.device), output, trim, label=f"{args.pipeline} --sp {args.sp}",
                       main=ctx.is_main)
    except _DecisionsDiffer as e:
        print(f"tokentrim rollout: {e}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- data parallel
def _write_video(out: Path, v: int, latents: torch.Tensor, records: list[dict], meta: dict, title: str) -> Path:
    """Write one video's folder atomically (a temporary folder renamed into place)."""
    from tokentrim import telemetry

    final = out / f"video_{v:03d}"
    tmp = out / f".video_{v:03d}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        torch.save(latents, tmp / "latents.pt")
        telemetry.save_json(records, tmp / "telemetry.json", meta)
        try:
            telemetry.plot(records, tmp / "telemetry.png", title=title)
        except Exception as e:  # a plotting problem must not lose the video
            print(f"warning: telemetry plot of video {v} failed: {e}", file=sys.stderr)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # interrupted (SIGTERM) or failed: leave no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _run_dp(args, parser, ctx, model, text, dtype, preset, trim) -> int:
    from tokentrim.cli import _make_rollout, rollout_meta
    from tokentrim.generate import _video_record

    out = Path(args.out)  # checked and created by cli._resolve
    n = text.shape[0]
    base = dict(rollout_meta(args, ctx.device, dtype, preset, trim), num_videos=n, world_size=ctx.world)
    job = distributed.DataParallelJob(ctx, n, out / "ranks", out / "summary.json", meta=base)
    title = f"{args.pipeline}: TokenTrim {'on' if trim.enabled else 'off'}"

    def work(vs):
        rollout = _make_rollout(args, parser, model, trim)
        result = rollout.run(text[vs[0]: vs[-1] + 1].to(ctx.device), args.blocks, args.height, args.width,
                             seed=args.seed, progress=args.progress and ctx.is_main, video_offset=vs[0])
        for b, v in enumerate(vs):
            records = [_video_record(r, b) for r in result.records]
            meta = dict(base, video=v, rank=ctx.rank, timings=result.timings)
            path = _write_video(out, v, result.latents[b: b + 1], records, meta, f"{title} (video {v})")
            job.finished(v, distributed.video_entry(result.records, result.timings, v, b, path))

    mine = job.videos
    return job.run([list(range(s, min(s + args.batch, mine.stop))) for s in range(mine.start, mine.stop, args.batch)],
                   work)
