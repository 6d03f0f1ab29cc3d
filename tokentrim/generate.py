"""``tokentrim generate``: prompt -> mp4 with real Wan2.1 weights from a local folder.

Pipeline: check the Diffusers folder -> load the transformer (a Self/Rolling Forcing checkpoint, or
the folder's ``transformer/``) -> encode the prompts with umT5 (then free it) -> stream the rollout
block by block: each accepted block is decoded causally by the VAE and its frames are appended to
the mp4 at once. Whatever ends the run (done, Ctrl-C, SIGTERM, an exception, out of memory), every
finished block is in a playable mp4 and in the telemetry JSON/PNG written beside it.

Under torchrun: ``--prompts`` alone is data parallel (each rank its contiguous share of the prompts);
``--sp N`` is head parallel for one job (``_run_sp``: every rank runs the rollout with 1/N of the
heads, rank 0 alone encodes, decodes and writes).

Frame counts: a rollout of n blocks of 3 latent frames decodes to 1 + 4*(3n - 1) = 12n - 3 pixel
frames at 16 fps (9 for the first block, 12 for each later one).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch

from tokentrim.config import TokenTrimConfig
from tokentrim.safeio import LOAD_ERRORS, OutputLock, deferred_signals, describe, sigterm_as_interrupt

PIPELINES = ("self-forcing", "rolling-forcing")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BLOCK_FRAMES = 3
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Per-video fields of a block record (lists with one entry per video of the batch).
_PER_VIDEO_KEYS = ("severity", "threshold", "mu", "sigma", "warming_up", "detected", "prune", "pruned",
                   "unstable_idx", "regenerated", "regenerations", "accepted_severity", "final_severity")


class GenerateError(ValueError):
    """A usage problem reported to the user as one clear message (exit code 2)."""


# ------------------------------------------------------------------------------------------ CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on an ``argparse`` subparsers object; sets ``func=run_generate``."""
    from tokentrim.cli import HelpFormatter

    p = subparsers.add_parser(
        "generate",
        help="prompt -> mp4 with a Wan2.1-T2V model (Self Forcing / Rolling Forcing) and TokenTrim",
        description="Prompt -> mp4 with real Wan2.1 weights from a local Wan2.1-T2V-1.3B-Diffusers folder and "
                    "a Self Forcing / Rolling Forcing checkpoint, with TokenTrim. Every finished block is "
                    "written at once: an interrupted run leaves a playable video of the blocks done.",
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run_generate)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text prompt")
    src.add_argument("--prompts", type=Path, metavar="FILE", help="a text file with one prompt per line")
    src.add_argument("--prompt-schedule", type=Path, metavar="FILE",
                     help="one video whose prompt changes: lines of SECONDS_OR_BLOCK<TAB>prompt (4.5 or 4.5s = "
                          "seconds, b7 = block 7), the first at 0")
    p.add_argument("--recache", action="store_true",
                   help="with --prompt-schedule: re-cache the recent context under the new prompt at each switch "
                        "(Self Forcing; LongLive's KV re-cache)")
    p.add_argument("--trim-reset-on-switch", action=argparse.BooleanOptionalAction, default=True,
                   help="with --prompt-schedule: restart TokenTrim's statistics at each switch (a wanted jump is "
                        "not drift)")
    p.add_argument("--model-dir", type=Path, required=True,
                   help="local Wan2.1-T2V-1.3B-Diffusers folder (text_encoder/, tokenizer/, vae/, transformer/)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Self Forcing / Rolling Forcing .pt, or a Wan/diffusers folder; "
                        "default: the model folder's transformer/")
    p.add_argument("--checkpoint-key", default="generator_ema", choices=("generator_ema", "generator"),
                   help="which weights of a Self/Rolling Forcing .pt to use")
    p.add_argument("--pipeline", choices=PIPELINES, default="self-forcing",
                   help="rollout matching the checkpoint")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None,
                        help="video length at 16 fps, rounded up to whole 3-latent-frame blocks (default 5)")
    length.add_argument("--blocks", type=int, default=None, help="number of 3-latent-frame blocks")
    p.add_argument("--height", type=int, default=480, help="frame height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, default=832, help="frame width in pixels (multiple of 16)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch-size", type=int, default=1, help="prompts generated together")
    p.add_argument("--compare", action="store_true",
                   help="same seed without (left) and with (right) TokenTrim, side by side in one video")
    p.add_argument("--overlay", action="store_true",
                   help="also write <stem>.overlay.mp4 with the pruned token positions tinted red")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="transformer and text encoder dtype (default bfloat16 on CUDA, float32 on CPU); "
                        "the VAE runs in float32")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the cached forward with CUDA graphs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the cached forward (fullgraph, fused ops); composes with --cuda-graphs")
    p.add_argument("--out", type=Path, default=Path("tokentrim.mp4"),
                   help="output mp4; with several prompts: <stem>_000.mp4, <stem>_001.mp4, ...")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality: 0 lossless, 18 visually lossless, 23 x264's default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sp", type=int, default=1, metavar="N",
                   help="head (Ulysses) parallel over N ranks for one job: launch with torchrun --nproc_per_node N; "
                        "N must divide the transformer's attention heads")
    from tokentrim.memory import add_cli_arguments

    add_cli_arguments(p)
    TokenTrimConfig.add_cli_arguments(p)


def blocks_for_seconds(seconds: float, fps: int = 16, block_frames: int = BLOCK_FRAMES) -> int:
    """Blocks covering at least ``seconds`` of video: pixel frames -> latent frames
    1 + ceil((pixel - 1) / 4) -> whole blocks (5 s -> 80 frames -> 21 latent frames -> 7 blocks)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise GenerateError(f"--seconds must be a positive number, got {seconds!r}")
    pixel = max(1, round(seconds * fps))
    latent = 1 + math.ceil((pixel - 1) / 4)
    return max(1, math.ceil(latent / block_frames))


def read_prompts(args) -> list[str]:
    from tokentrim.safeio import read_text_file

    if args.prompt is not None:
        if not args.prompt.strip():
            raise GenerateError("--prompt is empty")
        return [args.prompt]
    if getattr(args, "prompt_schedule", None) is not None:
        return [args._schedule[0][1]]
    path = Path(args.prompts)
    try:
        text = read_text_file(path, "--prompts file")
    except ValueError as e:
        raise GenerateError(str(e)) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise GenerateError(f"--prompts file {str(path)!r} holds no prompt (one per line)")
    return prompts


def _read_schedule(args, num_blocks: int):
    """--prompt-schedule as [(block, prompt), ...] (None without it); every mistake is a
    GenerateError naming the file and line, before anything is loaded."""
    path = getattr(args, "prompt_schedule", None)
    if path is None:
        if getattr(args, "recache", False):
            raise GenerateError("--recache re-caches at prompt switches: it needs --prompt-schedule")
        return None
    from tokentrim.rollout.prompts import parse_prompt_schedule
    from tokentrim.safeio import read_text_file

    try:
        schedule = parse_prompt_schedule(read_text_file(path, "--prompt-schedule file"), num_blocks,
                                         f"--prompt-schedule {str(path)!r}")
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if args.recache and args.pipeline != "self-forcing":
        raise GenerateError("--recache is supported with --pipeline self-forcing only")
    return schedule


def _output_paths(out: Path, n: int) -> list[Path]:
    if out.suffix.lower() != ".mp4":
        raise GenerateError(f"--out must end in .mp4, got {str(out)!r}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}.mp4") for i in range(n)]


def _check_outputs(paths: list[Path], overlay: bool) -> None:
    """Before any model loads: every file a run writes (mp4, JSON, PNG, overlay) can be written."""
    from tokentrim.safeio import check_output_file

    for p in paths:
        files = [p, p.with_suffix(".json"), p.with_suffix(".png")]
        if overlay:
            files.append(p.with_name(p.stem + ".overlay.mp4"))
        for f in files:
            try:
                check_output_file(f, "--out" if f == p else "output file")
            except ValueError as e:
                raise GenerateError(str(e)) from None


def _transformer_source(args, model_dir: Path):
    """(path, config) that ``load_transformer`` passes to ``load_wan``: ``<model_dir>/transformer``, or
    ``--checkpoint`` with, when it is a file that carries no config (``model.checkpoint_config``: a
    .pt, a .safetensors with no config.json beside it), the model folder's transformer config, else
    the 1.3B preset. Nothing is read."""
    from tokentrim.model import checkpoint_config_file

    if args.checkpoint is None:
        return model_dir / "transformer", None
    path = Path(args.checkpoint)
    if path.is_file() and checkpoint_config_file(path) is None:
        folder_cfg = model_dir / "transformer" / "config.json"
        return path, str(folder_cfg) if folder_cfg.is_file() else "wan2.1-t2v-1.3b"
    return path, None


def _model_config(args, model_dir: Path):
    """The transformer's WanConfig from the config files alone (no weights read): the one
    ``load_transformer`` builds its model from, or None when it cannot be told without loading (the
    loader then reports any problem)."""
    from tokentrim.model import checkpoint_config

    try:
        return checkpoint_config(*_transformer_source(args, model_dir))
    except Exception:  # a broken config is the loader's to report, with its own message
        return None


def _check_trim_against_model(trim_cfg: TokenTrimConfig, args, model_dir: Path) -> None:
    """--trim-detect-step against the pipeline's steps and --trim-patch against the model's patch,
    before any model loads."""
    from tokentrim.rollout import RollingForcingConfig, SelfForcingConfig

    if not (trim_cfg.enabled or args.compare):
        return
    steps = len((SelfForcingConfig() if args.pipeline == "self-forcing" else RollingForcingConfig()).denoising_steps)
    try:
        trim_cfg.resolve_detect_step(steps)
    except ValueError as e:
        raise GenerateError(f"--trim-detect-step: {e}") from None
    cfg = _model_config(args, model_dir)
    patch = getattr(trim_cfg, "patch", None)
    if cfg is not None and patch is not None and tuple(patch) != tuple(cfg.patch_size[1:]):
        raise GenerateError(
            f"--trim-patch {patch[0]} {patch[1]} does not match the model's spatial patch "
            f"{tuple(cfg.patch_size[1:])}: TokenTrim's token grid must be the model's"
        )


def _check_args(args) -> tuple[int, torch.device, torch.dtype]:
    for name in ("height", "width"):
        v = getattr(args, name)
        if v <= 0 or v % 16:
            raise GenerateError(f"--{name} must be a positive multiple of 16 (VAE 8 x patch 2), got {v}")
    if args.blocks is not None:
        if args.blocks < 1:
            raise GenerateError(f"--blocks must be >= 1, got {args.blocks}")
        blocks = args.blocks
    else:
        blocks = blocks_for_seconds(5.0 if args.seconds is None else args.seconds)
    if not 0 <= args.crf <= 51:
        raise GenerateError(f"--crf must be in [0, 51], got {args.crf}")
    if not 0 <= args.seed < 2**63:
        raise GenerateError(f"--seed must be in [0, 2**63 - 1] (a signed 64-bit seed), got {args.seed}")
    if args.batch_size < 1:
        raise GenerateError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.compare and not args.trim:
        raise GenerateError("--compare shows the video without and with TokenTrim: it cannot be combined with --no-trim")
    if args.overlay and not args.trim:
        raise GenerateError("--overlay marks TokenTrim's pruned tokens: it cannot be combined with --no-trim")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise GenerateError(f"--device {args.device!r} is not a torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda was asked for but torch sees no CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return blocks, device, dtype


# -------------------------------------------------------------------------------------- loading
def load_transformer(args, model_dir: Path, device, dtype):
    """The WanModel: ``--checkpoint`` (with the folder's transformer config when the checkpoint has
    none) or ``<model_dir>/transformer``. Errors become GenerateError naming the checkpoint."""
    from tokentrim.model import load_wan

    path, config = _transformer_source(args, model_dir)
    if args.checkpoint is not None and not path.exists():
        raise GenerateError(f"--checkpoint {str(path)!r} does not exist")
    try:
        return load_wan(path, config=config, dtype=dtype, device=device, which=args.checkpoint_key)
    except LOAD_ERRORS as e:
        raise GenerateError(f"cannot load the transformer from {str(path)!r}: {describe(e)}") from None


def load_text_encoder(model_dir: Path, device, dtype, text_len: int):
    from tokentrim.video import TextEncoder

    try:
        return TextEncoder.load(model_dir, device=device, dtype=dtype, text_len=text_len)
    except LOAD_ERRORS as e:
        raise GenerateError(f"cannot load the tokenizer/text encoder from {str(model_dir)!r} "
                            f"(tokenizer/, text_encoder/): {describe(e)}") from None
    except Exception as e:  # the tokenizers library raises bare Exception for a broken tokenizer.json
        if type(e).__module__.split(".")[0] not in ("tokenizers", "builtins"):
            raise
        raise GenerateError(f"cannot load the tokenizer from {str(model_dir / 'tokenizer')!r}: "
                            f"{describe(e)}") from None


def load_vae(model_dir: Path, device):
    from tokentrim.video import WanVAE

    try:
        return WanVAE.load(model_dir, device=device, dtype=torch.float32)
    except LOAD_ERRORS as e:
        raise GenerateError(f"cannot load the VAE from {str(model_dir / 'vae')!r}: {describe(e)}") from None


def _check_compatible(model, text_dim: int, z_dim: int, source: str) -> None:
    cfg = model.config
    if cfg.text_dim != text_dim:
        raise GenerateError(f"{source}: transformer text_dim={cfg.text_dim} but the text encoder outputs {text_dim}")
    if cfg.in_dim != z_dim or cfg.out_dim != z_dim:
        raise GenerateError(f"{source}: transformer in/out channels {cfg.in_dim}/{cfg.out_dim} but the VAE has z_dim={z_dim}")


def make_rollout(pipeline: str, model, trim: TokenTrimConfig | None, use_graphs: bool, compile: bool = False):
    from tokentrim.rollout import (
        RollingForcingConfig,
        RollingForcingRollout,
        SelfForcingConfig,
        SelfForcingRollout,
    )

    if pipeline == "self-forcing":
        return SelfForcingRollout(model, SelfForcingConfig(), trim=trim, use_graphs=use_graphs, compile=compile)
    if pipeline == "rolling-forcing":
        return RollingForcingRollout(model, RollingForcingConfig(), trim=trim, use_graphs=use_graphs, compile=compile)
    raise GenerateError(f"--pipeline must be one of {PIPELINES}, got {pipeline!r}")


# ------------------------------------------------------------------------------------ streaming
def _video_record(rec: dict, b: int) -> dict:
    """Video ``b``'s view of a batch record: per-video lists reduced to that video's entry (kept as a
    one-element list, the telemetry format for one video)."""
    out = {}
    for k, v in rec.items():
        if k in _PER_VIDEO_KEYS and isinstance(v, (list, tuple)):
            out[k] = [v[b]] if b < len(v) else None
        else:
            out[k] = v
    return out


class VideoOutput:
    """One output video: its mp4 writer (+ overlay writer) and the records of its written blocks.

    After every block the mp4 holds that block (one flushed fragment, see ``Mp4Writer``) and
    ``<the partial mp4>.json`` the telemetry so far, so even a SIGKILL keeps every finished block.
    """

    def __init__(self, path: Path, prompt: str, overlay: bool, fps: int, crf: int, meta: dict | None = None):
        from tokentrim.video import Mp4Writer

        self.path = path
        self.prompt = prompt
        self.meta = dict(meta or {})
        self.writer = Mp4Writer(path, fps=fps, crf=crf)
        self.overlay = Mp4Writer(path.with_name(path.stem + ".overlay.mp4"), fps=fps, crf=crf) if overlay else None
        self.records: list[dict] = []
        self.final_path: Path | None = None
        self.json_path: Path | None = None
        self.png_path: Path | None = None

    def _meta(self, status: str, meta: dict | None = None) -> dict:
        return dict(self.meta, **(meta or {}), status=status, prompt=self.prompt, blocks_written=len(self.records),
                    pixel_frames=self.writer.frames_written)

    def write_block(self, frames, overlay_frames, record: dict) -> None:
        from tokentrim import telemetry
        from tokentrim.safeio import atomic_write_text

        self.writer.write(frames)
        if self.overlay is not None:
            self.overlay.write(overlay_frames)
        self.records.append(record)
        atomic_write_text(self.writer.tmp_path.with_suffix(".json"),
                          telemetry.to_json(self.records, self._meta("running")))

    def finalize(self, meta: dict, complete: bool = True) -> None:
        """Close the mp4(s), renaming them into place (a partial video never replaces an existing
        file: see ``Mp4Writer.close``), and write the telemetry JSON and PNG beside the video.
        With no block written nothing is left on disk. Call it with signals deferred."""
        from tokentrim import telemetry
        from tokentrim.safeio import atomic_write, atomic_write_text

        running_json = self.writer.tmp_path.with_suffix(".json") if self.writer.tmp_path else None
        self.final_path = self.writer.close(complete)
        if self.overlay is not None:
            self.overlay.close(complete)
        if self.final_path is None:
            return
        status = meta.pop("status", "complete")
        meta = self._meta(status, meta)
        meta["video"] = str(self.final_path)
        self.json_path = atomic_write_text(self.final_path.with_suffix(".json"), telemetry.to_json(self.records, meta))
        if running_json is not None:
            running_json.unlink(missing_ok=True)
        try:
            self.png_path = atomic_write(self.final_path.with_suffix(".png"),
                                         lambda t: telemetry.plot(self.records, t, title=self.prompt[:80]))
        except Exception as e:  # a plotting problem must not lose the video or the JSON
            print(f"warning: telemetry plot failed: {e}", file=sys.stderr)


def _panel_frames(vae_stream, out, video_b: int):
    from tokentrim.video import to_uint8

    return to_uint8(vae_stream.push(out.latents[video_b : video_b + 1])[0])


def _overlay_frames(frames, record: dict, b: int, grid_w: int, cell: tuple[int, int]):
    from tokentrim.video import mark_tokens

    idx = record.get("unstable_idx")
    prune = record.get("prune")
    if not idx or not prune or not prune[b] or idx[b] is None:
        return frames
    return mark_tokens(frames, idx[b], grid_w, cell)


def generate_batch(model, vae, text, prompts, paths, args, trim_cfg, num_blocks, on_block=None,
                   base_meta=None, video_offset: int = 0, sp=None,
                   collect: list | None = None) -> tuple[str, list[VideoOutput]]:
    """Run the rollout(s) for one batch of prompts and stream every video to its mp4.

    text: [B, Lt, text_dim] prompt embeddings; video_offset: the job index of the batch's first
    prompt (its noise is that of (seed, index)). Returns (status, outputs); status is "complete" or
    "interrupted". Exceptions other than KeyboardInterrupt propagate after every output has been
    finalised with its finished blocks (``collect``, when given, receives the outputs first).

    Head parallel (``sp``: the DistContext, ``model.sequence_parallel`` set): every rank runs the
    same rollout; ``vae=None`` on the ranks that write nothing (no outputs). After each block the
    ranks' TokenTrim decisions are all-gathered (host, gloo) and compared: a difference raises
    RuntimeError on every rank at the same block, before rank 0 writes it.
    """
    from tqdm import tqdm

    from tokentrim.distributed import check_decisions
    from tokentrim.video import FPS, VAE_SPATIAL

    B = len(prompts)
    lat_h, lat_w = args.height // VAE_SPATIAL, args.width // VAE_SPATIAL
    ph, pw = model.config.patch_size[1:]
    grid_w, cell = lat_w // pw, (VAE_SPATIAL * ph, VAE_SPATIAL * pw)
    # panels left to right: (rollout, is_trim); --compare puts the plain rollout on the left.
    if args.compare:
        panels = [(make_rollout(args.pipeline, model, None, args.cuda_graphs, args.compile), False),
                  (make_rollout(args.pipeline, model, trim_cfg, args.cuda_graphs, args.compile), True)]
    else:
        panels = [(make_rollout(args.pipeline, model, trim_cfg if args.trim else None, args.cuda_graphs, args.compile), args.trim)]
    write = vae is not None
    outputs = [VideoOutput(p, prompt, args.overlay, FPS, args.crf, base_meta)
               for p, prompt in zip(paths, prompts)] if write else []
    if collect is not None:
        collect.extend(outputs)
    streams = [[vae.streaming_decoder() for _ in panels] for _ in range(B)] if write else []
    switches = getattr(args, "_switches", None)
    extra = {} if not switches else dict(prompts=switches, recache=args.recache, reset_trim=args.trim_reset_on_switch)
    gens = [r.iter_blocks(text, num_blocks, lat_h, lat_w, seed=args.seed, video_offset=video_offset, **extra)
            for r, _ in panels]
    status, error = "complete", None
    bar = tqdm(total=num_blocks, unit="block", desc=args.pipeline, file=sys.stderr,
               disable=args.no_progress or (sp is not None and not sp.is_main))
    t0, frames_done = time.perf_counter(), 0
    try:
        with sigterm_as_interrupt():
            for outs in zip(*gens):
                index = outs[0].index
                trim_pos = next((i for i, (_, is_trim) in enumerate(panels) if is_trim), 0)
                record = dict(outs[trim_pos].record)
                if args.compare:
                    record["baseline_time_s"] = outs[0].record.get("time_s")
                if sp is not None:
                    check_decisions(sp, [out.record for out in outs], index)
                for b in range(len(outputs)):
                    frames = [_panel_frames(streams[b][i], out, b) for i, out in enumerate(outs)]
                    over = None
                    if args.overlay:
                        over = [_overlay_frames(f, out.record, b, grid_w, cell) if panels[i][1] else f
                                for i, (f, out) in enumerate(zip(frames, outs))]
                        over = torch.cat(over, dim=2)
                    outputs[b].write_block(torch.cat(frames, dim=2), over, _video_record(record, b))
                frames_done = outputs[0].writer.frames_written if outputs else 0
                elapsed = time.perf_counter() - t0
                post = {"fps": f"{frames_done * B / elapsed:.2f}"}
                if record.get("prune") is not None:
                    post["pruned"] = sum(bool(p) for p in record["prune"])
                bar.set_postfix(post)
                bar.update(1)
                if on_block is not None:
                    on_block(index)
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException as e:
        status, error = f"failed: {type(e).__name__}: {e}", e
    finally:
        # a second Ctrl-C / SIGTERM must not cut the cleanup in half: held back until it is done
        with deferred_signals() as deferred:
            bar.close()
            for g in gens:
                g.close()
            meta = dict(status=status, blocks_requested=num_blocks, wall_s=time.perf_counter() - t0,
                        panels=["no-trim", "tokentrim"] if args.compare else None)
            for o in outputs:
                o.finalize(dict(meta), complete=status == "complete")
    if error is not None:
        raise error
    if deferred.received is not None:
        status = "interrupted"
    return status, outputs


# ------------------------------------------------------------------------------------------ run
def run_generate(args, on_block=None) -> int:
    """Entry point of ``tokentrim generate``. Returns the exit code: 0 done, 2 usage error (message
    on stderr), 130 interrupted (the finished blocks are saved). ``on_block(index)`` is called
    after each block has been written (tests use it to interrupt a run)."""
    from tokentrim.video import ModelFolderError

    try:
        return _run(args, on_block)
    except _PeerStopped:  # --sp: another rank's error, printed by that rank and rank 0
        return EXIT_USAGE
    except (GenerateError, ModelFolderError) as e:
        print(f"tokentrim generate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the first block (loading, encoding): nothing to save
        print("tokentrim generate: interrupted before any block was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(args, on_block) -> int:
    from tokentrim import distributed

    num_blocks, device, dtype = _check_args(args)
    args._schedule = _read_schedule(args, num_blocks)
    prompts = read_prompts(args)
    paths = _output_paths(Path(args.out), len(prompts))
    _check_sp(args, prompts)
    if args.sp > 1 and not args.dry_run:  # head parallel: one job over WORLD_SIZE == --sp ranks
        ctx = _init(device, tensors=True)
        try:
            return _run_sp(args, on_block, ctx, num_blocks, dtype, prompts, paths)
        finally:
            ctx.close()
    if not distributed.launched() or args.dry_run:  # a dry run prints the estimate, joins no job
        return _run_share(args, on_block, None, num_blocks, device, dtype, prompts, paths)
    # torchrun: data parallel, this rank makes its contiguous share of the prompts
    ctx = _init(device)
    try:
        out = Path(args.out)
        job = distributed.DataParallelJob(ctx, len(prompts), out.with_name(out.stem + ".ranks"),
                                          out.with_name(out.stem + ".summary.json"), meta={"argv": sys.argv})
        return _run_share(args, on_block, job, num_blocks, ctx.device, dtype, prompts, paths)
    finally:
        ctx.close()


def _init(device: torch.device, tensors: bool = False):
    """``distributed.init`` on ``device``'s type; its ValueError (a device type it does not take,
    fewer GPUs than LOCAL_RANK needs, a malformed RANK/LOCAL_RANK) becomes a GenerateError."""
    from tokentrim import distributed

    try:
        return distributed.init(device.type, tensors=tensors)
    except ValueError as e:
        raise GenerateError(str(e)) from None


def _trim_and_model_dir(args) -> tuple[TokenTrimConfig, Path]:
    """The run's TokenTrim settings (``--compare`` turns TokenTrim on for its second panel) and the
    checked model folder; raises GenerateError / ModelFolderError naming the bad argument."""
    from tokentrim.video import check_model_dir

    try:
        trim_cfg = TokenTrimConfig.from_cli_args(args)
    except (ValueError, TypeError) as e:
        raise GenerateError(str(e)) from None
    if args.compare:
        trim_cfg.enabled = True
    model_dir = check_model_dir(args.model_dir, need_transformer=args.checkpoint is None)
    _check_trim_against_model(trim_cfg, args, model_dir)
    return trim_cfg, model_dir


def _run_share(args, on_block, job, num_blocks, device, dtype, prompts, paths) -> int:
    """Generate the prompts of ``job.videos`` (all of them without a job)."""

    mine = job.videos if job is not None else range(len(prompts))
    trim_cfg, model_dir = _trim_and_model_dir(args)
    if _memory_check(args, model_dir, num_blocks, device, dtype, len(prompts)):
        return 0  # --dry-run
    _check_outputs(paths, args.overlay)
    with contextlib.ExitStack() as locks:  # data parallel: each rank locks its own videos
        _lock_outputs(locks, paths[mine.start : mine.stop])
        return _load_and_generate(args, on_block, model_dir, prompts, paths, trim_cfg, num_blocks, device, dtype,
                                  job)


def _lock_outputs(stack: contextlib.ExitStack, paths) -> None:
    """Hold an OutputLock on every path until ``stack`` closes: one run at a time per output, a
    second one stops here (GenerateError naming the path)."""
    for p in paths:
        try:
            stack.enter_context(OutputLock(p))
        except ValueError as e:
            raise GenerateError(str(e)) from None


def _memory_check(args, model_dir, num_blocks, device, dtype, num_prompts, show: bool = True) -> bool:
    """Print the memory estimate (from the folder's config files, before loading anything) and refuse
    a run that would not fit, with the numbers. Returns True for ``--dry-run``."""
    from tokentrim import memory

    config = _model_config(args, model_dir)  # the loader's choice; None: estimate_generate reads the folder's
    try:
        est = memory.estimate_generate(model_dir, pipeline=args.pipeline, height=args.height, width=args.width,
                                       num_blocks=num_blocks, batch=min(args.batch_size, num_prompts), dtype=dtype,
                                       num_prompts=len(getattr(args, "_schedule", None) or [None]),
                                       device=device.type, checkpoint_config=config,
                                       panels=2 if args.compare else 1, sp=args.sp)
    except (ValueError, TypeError) as e:
        raise GenerateError(f"cannot estimate the memory of this run: {e}") from None
    if show:
        print(est.format(), file=sys.stdout if args.dry_run else sys.stderr)
    if args.dry_run:
        return True
    try:
        memory.check_fits(est, memory.cli_limit(args, device), f"--height {args.height} --width {args.width}")
    except (MemoryError, ValueError) as e:
        raise GenerateError(str(e)) from None
    return False


def _encode_prompts(args, model, model_dir, source: str, device, dtype, batches: list[list[str]]):
    """Load the text encoder and the VAE, check them against the transformer, encode each batch of
    prompts ([B_i, text_len, text_dim] on ``device``) and the later prompts of --prompt-schedule
    (one video: [(block, [1, text_len, text_dim]), ...], empty without a schedule), then free the
    encoder (umT5-xxl is ~11 GB in bf16) before the rollout. Returns (vae, texts, switches)."""
    encoder = load_text_encoder(model_dir, device, dtype, model.config.text_len)
    vae = load_vae(model_dir, device)
    _check_compatible(model, encoder.text_dim, vae.z_dim, source)
    texts = [encoder.encode(batch) for batch in batches]
    switches = [(b, encoder.encode([p])) for b, p in (getattr(args, "_schedule", None) or [])[1:]]
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return vae, texts, switches


def _load_and_generate(args, on_block, model_dir, prompts, paths, trim_cfg, num_blocks, device, dtype,
                       job=None) -> int:
    """The prompts of ``job.videos`` (all of them without a job): load, encode, generate."""
    mine = job.videos if job is not None else range(len(prompts))
    if job is not None and not mine:  # more ranks than prompts: nothing to load, only the summary to join
        return _run_job(job, None, None, [], [], prompts, paths, args, trim_cfg, num_blocks, on_block, {})
    source = str(args.checkpoint or model_dir / "transformer")
    model = load_transformer(args, model_dir, device, dtype)
    starts = list(range(mine.start, mine.stop, args.batch_size))
    vae, texts, switches = _encode_prompts(args, model, model_dir, source, device, dtype,
                                           [prompts[i : min(i + args.batch_size, mine.stop)] for i in starts])
    if switches:
        args._switches = switches

    base_meta = _base_meta(args, model_dir, source, device, dtype, trim_cfg)
    if job is not None:
        return _run_job(job, model, vae, texts, starts, prompts, paths, args, trim_cfg, num_blocks, on_block, base_meta)
    written = []
    for start, text in zip(starts, texts):
        end = start + text.shape[0]
        status, outputs = generate_batch(model, vae, text, prompts[start:end], paths[start:end], args,
                                         trim_cfg, num_blocks, on_block, base_meta, video_offset=start)
        written += [o for o in outputs if o.final_path is not None]
        if status == "interrupted":
            _report(outputs, "interrupted")
            return EXIT_INTERRUPTED
    _report(written, "complete")
    return 0


def _base_meta(args, model_dir, source: str, device, dtype, trim_cfg, **extra) -> dict:
    """The run's settings for every video's telemetry JSON (``extra``: e.g. ``sp``)."""
    return {
        "pipeline": args.pipeline, "model_dir": str(model_dir), "checkpoint": source, "seed": args.seed,
        "height": args.height, "width": args.width, "fps": 16, "device": str(device), "dtype": str(dtype),
        "trim": trim_cfg.to_dict() if (args.trim or args.compare) else None, "compare": args.compare,
        "argv": sys.argv, "prompt_schedule": getattr(args, "_schedule", None), **extra,
    }


def _report(outputs, status: str) -> None:
    """One stderr line per output: where an interrupted run's finished blocks went, or what was written."""
    for o in outputs:
        if status == "interrupted":
            where = o.final_path or "nothing (no block had finished)"
            print(f"interrupted: {len(o.records)} finished block(s) saved to {where}", file=sys.stderr)
        else:
            extra = ", ".join(p.name for p in (o.json_path, o.png_path) if p is not None)
            print(f"wrote {o.final_path} ({o.writer.frames_written} frames) + {extra}", file=sys.stderr)


def _run_job(job, model, vae, texts, starts, prompts, paths, args, trim_cfg, num_blocks, on_block, base_meta) -> int:
    """This rank's batches of a data-parallel job; the summary and the exit code come from ``job.close``."""
    text_at = dict(zip(starts, texts))

    def work(videos):  # a failure leaves the finished blocks in the mp4s already
        start, end = videos[0], videos[-1] + 1
        status, outputs = generate_batch(model, vae, text_at[start], prompts[start:end], paths[start:end], args,
                                         trim_cfg, num_blocks, on_block, base_meta, video_offset=start)
        if status == "interrupted":
            raise KeyboardInterrupt
        for b, o in enumerate(outputs):
            entry = {"video": start + b, "path": str(o.final_path), "prompt": o.prompt,
                     "blocks": len(o.records), "pixel_frames": o.writer.frames_written,
                     "pruned_blocks": sum(1 for r in o.records if r.get("prune") and r["prune"][0])}
            wall = sum(r.get("time_s") or 0.0 for r in o.records)
            entry["pixel_fps"] = o.writer.frames_written / wall if wall > 0 else None
            job.finished(start + b, entry)

    return job.run([list(range(s, s + t.shape[0])) for s, t in zip(starts, texts)], work)


# ------------------------------------------------------------------------------- head parallel
class _PeerStopped(GenerateError):
    """--sp: this rank stops because another rank's check or load failed (that rank reports it)."""


def _check_sp(args, prompts: list[str]) -> None:
    """``--sp N``: every check that needs no weights and no process group, before any work: N
    divides the transformer's heads (from the folder's config files), one job (a single --prompt,
    --prompt-schedule, or --prompts of at most --batch-size prompts), no --cuda-graphs/--compile,
    and WORLD_SIZE == N (except --dry-run, which prints the per-rank estimate)."""
    from tokentrim import distributed
    from tokentrim.video import check_model_dir

    if args.sp < 1:
        raise GenerateError(f"--sp must be >= 1, got {args.sp}")
    if args.sp == 1:
        return
    if args.cuda_graphs:
        raise GenerateError("--sp cannot be combined with --cuda-graphs (the collectives are not captured)")
    if args.compile:
        raise GenerateError("--sp cannot be combined with --compile (the exchange is not traced into the "
                            "compiled forward)")
    if len(prompts) > args.batch_size:
        raise GenerateError(f"--sp runs one job of at most --batch-size videos together, but --prompts has "
                            f"{len(prompts)} prompts for --batch-size {args.batch_size}: raise --batch-size, or "
                            f"drop --sp (under torchrun, --prompts alone is data parallel)")
    model_dir = check_model_dir(args.model_dir, need_transformer=args.checkpoint is None)
    cfg = _model_config(args, model_dir)
    if cfg is not None:
        _check_heads(args.sp, cfg.num_heads)
    world = distributed.env_world_size()
    if world != args.sp and not args.dry_run:
        raise GenerateError(f"--sp {args.sp} needs {args.sp} processes, one per head group: launch with "
                            f"torchrun --nproc_per_node {args.sp} -m tokentrim generate ... (WORLD_SIZE is {world})")


def _check_heads(sp: int, num_heads: int) -> None:
    if num_heads % sp:
        ok = ", ".join(str(n) for n in range(1, num_heads + 1) if num_heads % n == 0)
        raise GenerateError(f"--sp {sp} must divide the transformer's {num_heads} attention heads; use one of {ok}")


def _fingerprint(model) -> list[float]:
    """Per-parameter float64 sums (one host sync): tells whether every rank loaded the same weights."""
    with torch.no_grad():
        return torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()]).cpu().tolist()


def _agree(ctx, error: str | None, extra=None) -> list:
    """Every rank's (error, extra); when any rank failed, every rank stops here (exit 2): the failed
    ranks and rank 0 print the message, the others stop quietly. Returns the extras."""
    got = ctx.all_gather_object((error, extra))
    failed = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
    if failed:
        r, e = failed[0]
        if error is not None:
            raise GenerateError(f"rank {ctx.rank}: {error}" if ctx.world > 1 else error)
        if ctx.is_main:
            raise GenerateError(f"rank {r}: {e}")
        raise _PeerStopped(e)
    return [x for _, x in got]


def _run_sp(args, on_block, ctx, num_blocks, dtype, prompts, paths) -> int:
    """``generate --sp N`` on this rank (one of N = WORLD_SIZE).

    Every rank loads the transformer from the same files (each needs the weights on its own device;
    the files give the same bytes, checked by a fingerprint exchange) and runs the same rollout with
    1/N of the heads. Rank 0 alone checks and locks the outputs, loads the text encoder and the VAE,
    encodes the prompt(s) and broadcasts the embeddings (small: B x text_len x text_dim), decodes and
    writes the mp4 / telemetry / PNG block by block; the other ranks write nothing. Any check or
    load failing on any rank stops every rank before the rollout (exit 2, one message)."""
    from tokentrim import distributed
    from tokentrim.video import ModelFolderError

    device = ctx.device
    trim_cfg, model_dir = _trim_and_model_dir(args)
    with contextlib.ExitStack() as locks:
        model, error = None, None
        try:  # memory (each rank's own device), rank 0's outputs, every rank's transformer
            _memory_check(args, model_dir, num_blocks, device, dtype, len(prompts), show=ctx.is_main)
            if ctx.is_main:
                _check_outputs(paths, args.overlay)
                _lock_outputs(locks, paths)
            model = load_transformer(args, model_dir, device, dtype)
            _check_heads(args.sp, model.config.num_heads)
        except (GenerateError, ModelFolderError) as e:
            error = str(e)
        prints = _agree(ctx, error, _fingerprint(model) if model is not None else None)
        if any(p != prints[0] for p in prints):
            raise GenerateError(f"rank {ctx.rank}: the ranks loaded different transformer weights (is "
                                f"{str(args.checkpoint or model_dir)!r} the same on every node?)")
        source = str(args.checkpoint or model_dir / "transformer")
        vae, payload = None, None
        if ctx.is_main:  # the text encoder and the VAE live on rank 0 only
            try:
                vae, (text,), switches = _encode_prompts(args, model, model_dir, source, device, dtype,
                                                         [prompts])
                payload = (None, text.cpu(), [(b, t.cpu()) for b, t in switches])
            except (GenerateError, ModelFolderError) as e:
                payload = (str(e), None, None)
        error, text, switches = ctx.broadcast_object(payload)
        if error is not None:
            if ctx.is_main:
                raise GenerateError(error)
            raise _PeerStopped(error)
        text = text.to(device)
        if switches:
            args._switches = [(b, t.to(device)) for b, t in switches]
        model.sequence_parallel = distributed.SequenceParallel()
        base_meta = _base_meta(args, model_dir, source, device, dtype, trim_cfg, sp=args.sp)
        outputs: list[VideoOutput] = []
        try:
            status, _ = generate_batch(model, vae, text, prompts, paths, args, trim_cfg, num_blocks, on_block,
                                       base_meta, video_offset=0, sp=ctx, collect=outputs)
        except Exception as e:  # rank 0's outputs are finalised with their finished blocks already
            saved = "; ".join(f"{len(o.records)} finished block(s) saved to {o.final_path}"
                              for o in outputs if o.final_path is not None)
            print(f"tokentrim generate --sp: rank {ctx.rank} failed: {type(e).__name__}: {e}"
                  + (f" ({saved or 'no block had finished'})" if ctx.is_main else ""), file=sys.stderr)
            return 1
        _report(outputs, status)
        return EXIT_INTERRUPTED if status == "interrupted" else 0


def main(argv=None) -> int:
    """Standalone entry (``python -m tokentrim.generate ...``), same as ``tokentrim generate``."""
    parser = argparse.ArgumentParser(prog="tokentrim")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
