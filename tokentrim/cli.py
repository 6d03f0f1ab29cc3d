"""The ``tokentrim`` command.

Subcommands:

- ``tokentrim rollout``: a latents-only Self Forcing / Rolling Forcing rollout (random weights or a
  checkpoint, random text embeddings unless given) with TokenTrim; writes ``latents.pt``
  ([B, F, C, H, W] float32), ``telemetry.json`` and ``telemetry.png`` into ``--out``.
- ``tokentrim generate``: prompt -> mp4 (registered when ``tokentrim.generate`` is importable).
- ``tokentrim eval``: weight-free drift metrics of mp4 videos (``tokentrim.evaluate``).

``tokentrim --version`` prints the version; ``python -m tokentrim`` is the same command.

Bad arguments end with an argparse error (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

PIPELINES = ("self-forcing", "rolling-forcing")
DTYPES = ("float32", "bfloat16", "float16")


def _int_at_least(minimum: int, maximum: int | None = None):
    """argparse type: an int >= ``minimum`` (and <= ``maximum``), with a message naming the bounds."""

    want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if maximum is not None:
        want = f"an integer in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)
_seed_int = _int_at_least(0, 2**63 - 1)  # torch generators take a signed 64-bit seed
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it says something: not when the help already states the
    default (any "default" in it) and not for None/False defaults (a flag that is off, or a value
    resolved at run time, which the help then explains). Used by ``tokentrim`` and ``bench/run.py``."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def add_rollout_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``rollout`` on an argparse subparsers object (handler: ``run_rollout``)."""
    from tokentrim.config import TokenTrimConfig
    from tokentrim.model.config import PRESETS

    p = subparsers.add_parser(
        "rollout",
        help="latents-only Self Forcing / Rolling Forcing rollout with TokenTrim telemetry",
        description=(
            "Run a latents-only autoregressive rollout of a Wan2.1 DiT (random weights from a preset, "
            "or --checkpoint) with TokenTrim, and write latents.pt, telemetry.json and telemetry.png "
            "into --out. Text conditioning is random embeddings (seeded) unless --text-embeddings."
        ),
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="random-weight model size (default: tiny on CPU, wan2.1-t2v-1.3b on CUDA); with "
                        "--checkpoint: the config used when the checkpoint carries none")
    g.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="Wan/diffusers folder, .safetensors or Self/Rolling Forcing .pt to load instead of "
                        "random weights")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto = cuda when available)")
    g.add_argument("--text-embeddings", metavar="PATH", default=None,
                   help="a .pt tensor [B, Lt, text_dim] of text encoder output (default: random, seeded)")
    g = p.add_argument_group("rollout")
    g.add_argument("--pipeline", choices=PIPELINES, default="self-forcing", help="which AR rollout")
    g.add_argument("--blocks", type=_positive_int, default=4, help="AR blocks of 3 latent frames")
    g.add_argument("--height", type=_positive_int, default=None,
                   help="latent height (default 16; 60 = 480 px with the 1.3B preset)")
    g.add_argument("--width", type=_positive_int, default=None,
                   help="latent width (default 16; 104 = 832 px with the 1.3B preset)")
    g.add_argument("--batch", type=_positive_int, default=1, help="videos generated together")
    g.add_argument("--num-videos", type=_positive_int, default=None, metavar="M",
                   help="a job of M videos (in batches of --batch), written one folder per video with a "
                        "summary.json; under torchrun the videos are shared out over the ranks "
                        "(default: one batch, written as latents.pt)")
    g.add_argument("--sp", type=_positive_int, default=1, metavar="N",
                   help="head (Ulysses) parallel over N torchrun ranks for one job of --batch videos; "
                        "N must divide the model's attention heads")
    g.add_argument("--seed", type=_seed_int, default=0, help="noise (and random weights/text) seed")
    g.add_argument("--cache-frames", type=_positive_int, default=21,
                   help="Self Forcing KV cache capacity in latent frames (longer rollouts evict)")
    g.add_argument("--sink-frames", type=_nonneg_int, default=3,
                   help="attention-sink frames kept forever (Rolling Forcing needs >= 1)")
    g.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the cached forward into CUDA graphs (CUDA only; eager on CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the cached forward (fullgraph, fused ops); composes with --graphs")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default="tokentrim_out",
                   help="output folder for latents.pt, telemetry.json, telemetry.png")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar per block")
    from tokentrim.memory import add_cli_arguments

    add_cli_arguments(g)
    TokenTrimConfig.add_cli_arguments(p)
    p.set_defaults(func=run_rollout, _parser=p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``tokentrim`` parser with every available subcommand."""
    from tokentrim import __version__

    parser = argparse.ArgumentParser(
        prog="tokentrim",
        description="tokentrim: Wan2.1 autoregressive video rollouts with TokenTrim drift pruning.",
    )
    parser.add_argument("--version", action="version", version=f"tokentrim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_rollout_parser(sub)
    try:
        from tokentrim import generate
    except ImportError:
        generate = None
    if generate is not None:
        generate.add_parser(sub)
    from tokentrim import evaluate

    evaluate.add_parser(sub)
    return parser


def _wants_cuda(args) -> bool:
    """--device cuda, or auto with a GPU."""
    import torch

    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def _default_preset(args) -> str:
    """--preset, else the 1.3B model on CUDA and tiny on CPU."""
    return args.preset or ("wan2.1-t2v-1.3b" if _wants_cuda(args) else "tiny")


def _resolve(args, parser):
    """Check the arguments that argparse cannot; returns (device, dtype, preset, trim config)."""
    import torch

    from tokentrim.config import TokenTrimConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    preset = _default_preset(args)
    device = torch.device("cuda" if _wants_cuda(args) else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    big = preset == "wan2.1-t2v-1.3b"
    args.height = args.height or (60 if big else 16)
    args.width = args.width or (104 if big else 16)
    if args.height % 2 or args.width % 2:
        parser.error(f"--height and --width must be even (the model's 2x2 patch), got {args.height}x{args.width}")
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.text_embeddings is not None and not os.path.isfile(args.text_embeddings):
        parser.error(f"--text-embeddings {args.text_embeddings!r} is not a file")
    if args.pipeline == "rolling-forcing" and args.sink_frames < 1:
        parser.error("--sink-frames must be >= 1 for --pipeline rolling-forcing")
    from tokentrim.safeio import check_output_dir

    try:
        if not args.dry_run:  # a dry run writes nothing
            check_output_dir(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    try:
        trim = TokenTrimConfig.from_cli_args(args)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return device, dtype, preset, trim


def _rollout_config(args):
    """The --pipeline's SelfForcingConfig / RollingForcingConfig from --cache-frames/--sink-frames
    (raises their TypeError/ValueError for bad values)."""
    from tokentrim.rollout import RollingForcingConfig, SelfForcingConfig

    if args.pipeline == "self-forcing":
        return SelfForcingConfig(cache_frames=args.cache_frames, sink_frames=args.sink_frames)
    return RollingForcingConfig(sink_frames=args.sink_frames)


def _make_rollout(args, parser, model, trim):
    from tokentrim.rollout import RollingForcingRollout, SelfForcingRollout

    try:
        cls = SelfForcingRollout if args.pipeline == "self-forcing" else RollingForcingRollout
        return cls(model, _rollout_config(args), trim=trim, use_graphs=args.graphs, compile=args.compile)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def _load_text(args, parser, cfg, n: int | None = None):
    """--text-embeddings checked up front: a [B, Lt, text_dim] float tensor, 1 <= Lt <= text_len,
    B = 1 (expanded) or ``n`` (default --batch; --num-videos for a job)."""
    import torch

    from tokentrim.safeio import LOAD_ERRORS, describe

    try:
        text = torch.load(args.text_embeddings, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:
        parser.error(f"--text-embeddings {args.text_embeddings!r}: cannot read it as a tensor saved with "
                     f"torch.save (only plain tensors are loaded, never arbitrary pickles): {describe(e)}")
    if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[2] != cfg.text_dim:
        parser.error(f"--text-embeddings must hold a [B, Lt, {cfg.text_dim}] tensor, got "
                     f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
    if not 1 <= text.shape[1] <= cfg.text_len:
        parser.error(f"--text-embeddings has Lt={text.shape[1]} text tokens; the model takes 1 to "
                     f"text_len={cfg.text_len}")
    if not text.is_floating_point():
        parser.error(f"--text-embeddings must be a floating-point tensor, got {text.dtype}")
    what, n = ("--batch", args.batch) if n is None else ("--num-videos", n)
    if text.shape[0] == 1 and n > 1:
        text = text.expand(n, -1, -1)
    if text.shape[0] != n:
        parser.error(f"--text-embeddings batch {text.shape[0]} does not match {what} {n}")
    return text


def _check_patch(parser, model, trim) -> None:
    """--trim-patch against the model's patch, named as the flag (the rollout rejects it too)."""
    cfg = model.config
    patch = getattr(trim, "patch", None)
    if trim.enabled and patch is not None and tuple(patch) != tuple(cfg.patch_size[1:]):
        parser.error(f"--trim-patch {patch[0]} {patch[1]} does not match the model's spatial patch "
                     f"{tuple(cfg.patch_size[1:])}: TokenTrim's token grid must be the model's")


def _build_model(args, parser, device, dtype, preset):
    """The WanModel of ``--checkpoint`` or random weights of ``preset`` (seeded by --seed)."""
    import torch

    from tokentrim.model import WanConfig, WanModel, load_wan
    from tokentrim.safeio import LOAD_ERRORS, describe

    torch.manual_seed(args.seed)
    if args.checkpoint is not None:
        try:
            return load_wan(args.checkpoint, config=args.preset, dtype=dtype, device=device)
        except LOAD_ERRORS as e:
            parser.error(f"--checkpoint: {describe(e)}")
    return WanModel(WanConfig.preset(preset), dtype=dtype, device=device).eval()


def _text_embeddings(args, parser, cfg, n: int | None = None):
    """[n, Lt, text_dim] CPU text embeddings: --text-embeddings (1 or n rows) or random (seeded);
    n = --batch when None, else the job's --num-videos."""
    import torch

    if args.text_embeddings is not None:
        return _load_text(args, parser, cfg, n)
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randn(args.batch if n is None else n, cfg.text_len, cfg.text_dim, generator=gen)


def rollout_meta(args, device, dtype, preset, trim) -> dict:
    """The run's settings for the telemetry JSON."""
    return {
        "pipeline": args.pipeline,
        "preset": None if args.checkpoint else preset,
        "checkpoint": args.checkpoint,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "blocks": args.blocks,
        "latent_size": [args.height, args.width],
        "batch": args.batch,
        "seed": args.seed,
        "trim": trim.to_dict(),
    }


def _check_limits(args, parser, model, trim) -> None:
    """What would stop the run midway, checked before the first block: the latent size and TokenTrim's
    patch against the model's. (Any length runs: rollouts re-base RoPE positions past the table.)"""
    cfg = model.config
    try:
        cfg.tokens_per_frame(args.height, args.width)
    except ValueError as e:
        parser.error(str(e))
    _check_patch(parser, model, trim)


def _memory_check(args, parser, device, dtype, preset, keep_output: bool = False, show: bool = True) -> bool:
    """Print the memory estimate before any work (``show``: False on the ranks other than 0); refuse
    (exit 2) a run that would not fit. Returns True for ``--dry-run`` (estimate printed, nothing else
    to do). With ``--sp N`` the estimate is per rank (1/N of the KV cache); ``keep_output``: the run
    keeps every block (``rollout.run``)."""
    from tokentrim import memory
    from tokentrim.model import WanConfig, checkpoint_config

    cfg = None
    if args.checkpoint is not None:
        try:  # the config load_wan will use (_build_model); a .pt carries none
            cfg = checkpoint_config(args.checkpoint, args.preset)
        except (TypeError, ValueError, OSError):
            cfg = None  # a malformed config.json: the loader reports it
    try:
        cfg = cfg or WanConfig.preset(preset)
        est = memory.estimate_rollout(cfg, pipeline=args.pipeline, rollout_config=_rollout_config(args),
                                      batch=args.batch, height=args.height, width=args.width,
                                      num_blocks=args.blocks, dtype=dtype, device=device.type,
                                      keep_output=keep_output, sp=args.sp)
    except (TypeError, ValueError):
        return False  # reported with its own message by the checks that follow
    if show:
        print(est.format(), file=sys.stdout if args.dry_run else sys.stderr)
    if args.dry_run:
        return True
    try:
        what = f"--height {args.height} --width {args.width} --batch {args.batch}"
        what += f" --sp {args.sp} (per rank)" if args.sp > 1 else ""
        memory.check_fits(est, memory.cli_limit(args, device), what)
    except (MemoryError, ValueError) as e:
        parser.error(str(e))
    return False


def run_rollout(args) -> int:
    """Handler of ``tokentrim rollout``; returns the exit code (0 done, 2 usage error, 130
    interrupted: the finished blocks are saved)."""
    from tokentrim import distributed
    from tokentrim.safeio import OutputLock

    if args.num_videos is not None or args.sp > 1 or distributed.launched():
        from tokentrim.parallel_cli import run_rollout_job

        return run_rollout_job(args)
    parser = args._parser
    device, dtype, preset, trim = _resolve(args, parser)
    if _memory_check(args, parser, device, dtype, preset):
        return 0  # --dry-run
    lock = OutputLock(os.path.join(args.out, "latents.pt"))  # --out exists now (checked in _resolve)
    try:
        lock.acquire()
    except ValueError as e:
        parser.error(str(e))
    try:
        return _run_rollout(args, parser, device, dtype, preset, trim)
    except KeyboardInterrupt:  # before the first block (building or loading the model): nothing to save
        print("tokentrim rollout: interrupted before any block finished; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        lock.release()


def _run_rollout(args, parser, device, dtype, preset, trim) -> int:

    from tokentrim.rollout_out import RolloutOutput

    model = _build_model(args, parser, device, dtype, preset)
    cfg = model.config
    text = _text_embeddings(args, parser, cfg)
    _check_limits(args, parser, model, trim)
    rollout = _make_rollout(args, parser, model, trim)
    meta = rollout_meta(args, device, dtype, preset, trim)
    return _stream(args, rollout, text.to(device), RolloutOutput(args.out, meta), trim)


def _stream(args, rollout, text, output, trim, label: str | None = None, main: bool = True) -> int:
    """Run the rollout block by block into ``output`` (``RolloutOutput`` or one with its
    add/finish/records/frames/deferred_signal); returns the exit code. ``label`` starts the report
    lines (default: the pipeline); ``main`` False (the other --sp ranks): no progress bar, no report."""
    from tokentrim.safeio import sigterm_as_interrupt

    label = label or args.pipeline
    status, error = "complete", None
    it = rollout.iter_blocks(text, args.blocks, args.height, args.width, seed=args.seed)
    bar = None
    if args.progress and main:
        from tqdm import tqdm

        bar = tqdm(total=args.blocks, desc=rollout.name, unit="block")
    try:
        with sigterm_as_interrupt():
            for out in it:
                output.add(out.index, out.latents, out.record)
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException as e:
        status, error = f"failed: {type(e).__name__}: {e}", e
    finally:
        if bar is not None:
            bar.close()
        it.close()
        timings = rollout.recorder.timings(output.frames) if rollout.recorder is not None else None
        summary = rollout.controller.summary() if rollout.controller is not None else None
        written = output.finish(status, {"timings": timings, "summary": summary},
                                title=f"{label}: TokenTrim {'on' if trim.enabled else 'off'}")
    if error is not None:
        raise error
    if output.deferred_signal is not None and status == "complete":
        status = "interrupted"
    files = ", ".join(str(p) for p in written.values())
    if status != "complete":
        if main:
            print(f"{label}: interrupted: {len(output.records)} finished block(s) of {args.blocks} saved"
                  f"{' to ' + files if files else ' (none had finished)'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not main:
        return 0
    t = timings
    regen = sum(r.get("num_regenerations") or 0 for r in output.records)
    print(f"{label}: {t['latent_frames']} latent frames in {t['total_s']:.2f} s "
          f"({t['latent_fps']:.2f} latent frames/s, {t['pixel_fps']:.2f} pixel frames/s), "
          f"{regen} regeneration(s)")
    print(f"wrote {files}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokentrim`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
