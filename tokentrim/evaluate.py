"""``tokentrim eval``: weight-free drift metrics of finished videos (mp4), per window of frames.

Decoded frames (RGB, uint8 -> float 0..255) are grouped into windows of ``window`` frames (1 s at
16 fps by default); per window:

- ``flicker``: mean absolute difference of consecutive frames (VBench's temporal flickering
  measures the same quantity; its score is (255 - this) / 255). Catches flicker and jitter; a
  static video scores 0, fast real motion scores high too, so compare like with like.
- ``mean_rgb`` / ``std_rgb``: per-channel mean and standard deviation over the window's pixels;
  ``mean_drift`` / ``std_drift``: the L2 distance of those vectors to the first window's.
  Catches colour casts, fading and saturation or contrast collapse that build up over time.
- ``luminance`` (Rec. 601 luma mean) and ``luminance_drift`` (luminance - the first window's):
  catches brightening/darkening drift.
- ``hist_distance``: total variation distance (0..1) between the window's per-channel colour
  histograms (32 bins) and the first window's, averaged over channels. Catches palette changes
  that keep the mean.

and for each metric the least-squares ``slope`` per second over the windows (drift rate). With two
videos (or ``split=True``: the left and right halves of one frame, as ``tokentrim generate --compare``
writes them: no TokenTrim left, TokenTrim right) the differences (second - first) of the window
means and the slopes are reported too.

Out of scope (they need model weights): VBench subject consistency (DINO features), background
consistency (CLIP features), imaging quality (MUSIQ), aesthetic quality (LAION predictor), motion
smoothness (a frame-interpolation network), dynamic degree (RAFT optical flow).

Only PyAV is needed to decode (the ``video`` extra); matplotlib for the PNG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from tokentrim import safeio, telemetry
from tokentrim.video import pixel_frames

METRICS = ("flicker", "mean_drift", "std_drift", "luminance_drift", "hist_distance", "luminance")
BINS = 32
_LUMA = torch.tensor([0.299, 0.587, 0.114])


class EvalError(ValueError):
    """A video that cannot be evaluated (missing, not a video, no frames, mismatched sizes)."""


def _frames(path: Path):
    """Yield (fps, frame [H, W, 3] uint8 tensor) of every decoded frame of ``path``."""
    if not path.exists():
        raise EvalError(f"{path}: no such file")
    if not path.is_file():
        raise EvalError(f"{path}: not a file")
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is in the video extra
        raise EvalError("tokentrim eval needs PyAV: pip install 'tokentrim[video]'") from e
    try:
        container = av.open(str(path))
    except Exception as e:  # av raises its own error types for every way a file is not a video
        raise EvalError(f"{path}: not a readable video ({type(e).__name__}: {e})") from None
    with container:
        if not container.streams.video:
            raise EvalError(f"{path}: has no video stream (zero frames)")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 16.0
        try:
            for frame in container.decode(video=0):
                yield fps, torch.from_numpy(frame.to_ndarray(format="rgb24"))
        except Exception as e:
            raise EvalError(f"{path}: decoding failed ({type(e).__name__}: {e})") from None


def probe(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a video, from its first decoded frame (also proves it has one)."""
    path = Path(path)
    for _fps, frame in _frames(path):
        return int(frame.shape[0]), int(frame.shape[1])
    raise EvalError(f"{path}: the video has zero frames")


class _Window:
    """Running sums of one window of frames."""

    def __init__(self, start: int):
        self.start, self.n, self.pixels = start, 0, 0
        self.sum = torch.zeros(3, dtype=torch.float64)
        self.sq = torch.zeros(3, dtype=torch.float64)
        self.hist = torch.zeros(3, BINS, dtype=torch.float64)
        self.mad, self.mad_n = 0.0, 0

    def add(self, f: torch.Tensor, prev: torch.Tensor | None) -> None:
        x = f.reshape(-1, 3).double()
        self.n += 1
        self.pixels += x.shape[0]
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        idx = (f.reshape(-1, 3).long() * BINS) // 256
        for c in range(3):
            self.hist[c] += torch.bincount(idx[:, c], minlength=BINS).double()
        if prev is not None:
            self.mad += (f.float() - prev.float()).abs().mean().item()
            self.mad_n += 1

    def stats(self) -> dict:
        mean = self.sum / self.pixels
        std = (self.sq / self.pixels - mean * mean).clamp_min(0).sqrt()
        return {
            "start": self.start, "frames": self.n,
            "flicker": self.mad / self.mad_n if self.mad_n else math.nan,
            "mean_rgb": mean.tolist(), "std_rgb": std.tolist(),
            "luminance": float((mean.float() * _LUMA).sum()),
            "_hist": self.hist / self.hist.sum(dim=1, keepdim=True),
        }


def _slope(ts: Sequence[float], ys: Sequence[float]) -> float:
    pts = [(t, y) for t, y in zip(ts, ys) if math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    mt = sum(t for t, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    return sum((t - mt) * (y - my) for t, y in pts) / den if den > 0 else math.nan


def _finish(name: str, windows: list[_Window], fps: float, size: tuple[int, int], window: int) -> dict:
    stats = [w.stats() for w in windows]
    first = stats[0]
    m0, s0, h0 = torch.tensor(first["mean_rgb"]), torch.tensor(first["std_rgb"]), first["_hist"]
    for s in stats:
        s["t_s"] = (s["start"] + s["frames"] / 2) / fps
        s["mean_drift"] = float((torch.tensor(s["mean_rgb"]) - m0).norm())
        s["std_drift"] = float((torch.tensor(s["std_rgb"]) - s0).norm())
        s["luminance_drift"] = s["luminance"] - first["luminance"]
        s["hist_distance"] = float(0.5 * (s.pop("_hist") - h0).abs().sum(dim=1).mean())
    ts = [s["t_s"] for s in stats]
    return {
        "video": name, "frames": sum(s["frames"] for s in stats), "fps": fps, "height": size[0], "width": size[1],
        "window": window, "windows": stats,
        "mean": {m: _nanmean([s[m] for s in stats]) for m in METRICS},
        "slope_per_s": {m: _slope(ts, [s[m] for s in stats]) for m in METRICS},
    }


def _nanmean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def analyze(path: str | os.PathLike, window: int = 16, split: bool = False) -> list[dict]:
    """Per-window metrics of one video (``split``: of its left and right halves, two results).

    Raises ``EvalError`` (a ValueError) for a missing file, a file that is not a video, a video
    with no frames, or (``split``) an odd width.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2 (frames per window), got {window!r}")
    path = Path(path)
    parts = 2 if split else 1
    wins: list[list[_Window]] = [[] for _ in range(parts)]
    prev: list[torch.Tensor | None] = [None] * parts
    fps, size, i = 16.0, None, -1
    for i, (fps, f) in enumerate(_frames(path)):  # noqa: B007 (fps: the stream rate, read after the loop)
        if size is None:
            size = tuple(f.shape[:2])
            if split and size[1] % 2:
                raise EvalError(f"{path}: split needs an even width (two side-by-side halves), got {size[1]}")
        halves = f.chunk(2, dim=1) if split else (f,)
        for p, h in enumerate(halves):
            if i % window == 0:
                wins[p].append(_Window(i))
            wins[p][-1].add(h, prev[p])
            prev[p] = h
    if i < 0:
        raise EvalError(f"{path}: the video has zero frames")
    w = size[1] // parts
    names = [f"{path}:left", f"{path}:right"] if split else [str(path)]
    return [_finish(n, ws, fps, (size[0], w), window) for n, ws in zip(names, wins)]


def compare(a: dict, b: dict) -> dict:
    """Differences second - first of the window means and slopes of two ``analyze`` results of the
    same frame size (``evaluate`` checks the sizes before analysing)."""
    return {
        "first": a["video"], "second": b["video"],
        "mean_diff": {m: b["mean"][m] - a["mean"][m] for m in METRICS},
        "slope_diff_per_s": {m: b["slope_per_s"][m] - a["slope_per_s"][m] for m in METRICS},
    }


def telemetry_series(path: str | os.PathLike, fps: float) -> dict:
    """Block times (s, at the pixel frame rate ``fps``), severity, threshold and pruned counts of
    video 0 from a telemetry JSON (``tokentrim rollout`` / ``generate``, or a controller's to_json)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such telemetry file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: not a telemetry JSON ({e})") from None
    records = data.get("blocks", data.get("records")) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise EvalError(f"{path}: not a telemetry JSON (no 'blocks' or 'records' list)")

    def first(v):
        if isinstance(v, list):
            return v[0] if v else None
        return v

    out = {"t_s": [], "severity": [], "threshold": [], "pruned": [], "block": []}
    for i, r in enumerate(records):
        b = r.get("block", i)
        f0, nf = r.get("frame_start", 3 * b), r.get("num_frames", 3)
        lo, hi = pixel_frames(f0), pixel_frames(f0 + nf)  # pixel frames of the block's latent frames
        out["block"].append(b)
        out["t_s"].append((lo + hi) / 2 / fps)
        for key in ("severity", "threshold"):
            v = first(r.get(key))
            out[key].append(math.nan if v is None else float(v))
        pr = first(r.get("masked_tokens")) if r.get("masked_tokens") is not None else first(r.get("pruned"))
        out["pruned"].append(0 if pr is None else int(pr))
    return out


def plot(results: list[dict], path: str | os.PathLike, telemetry: dict | None = None) -> str:
    """PNG: flicker, luminance drift, colour-mean drift and histogram distance over time, one line
    per video; with ``telemetry`` a last panel of severity, threshold and pruned tokens per block."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [("flicker", "flicker (mean |frame diff|)"), ("luminance_drift", "luminance drift"),
              ("mean_drift", "colour mean drift (L2)"), ("hist_distance", "histogram distance (TV)")]
    n = len(panels) + (telemetry is not None)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.1 * n), sharex=True)
    for ax, (key, label) in zip(axes, panels):
        for i, r in enumerate(results):
            ts = [w["t_s"] for w in r["windows"]]
            ax.plot(ts, [w[key] for w in r["windows"]], "-o", ms=3, color=f"C{i}",
                    label=f"{Path(r['video'].split(':')[0]).name}{':' + r['video'].split(':')[1] if ':' in r['video'] else ''} "
                          f"(slope {r['slope_per_s'][key]:+.3g}/s)")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    if telemetry is not None:
        ax = axes[-1]
        ax.plot(telemetry["t_s"], telemetry["severity"], "-o", ms=3, color="C3", label="severity")
        ax.plot(telemetry["t_s"], telemetry["threshold"], "--", color="C3", alpha=0.7, label="threshold")
        ax.set_ylabel("TokenTrim", fontsize=8)
        ax2 = ax.twinx()
        ax2.bar(telemetry["t_s"], telemetry["pruned"], width=0.1, color="C7", alpha=0.6, label="pruned tokens")
        ax2.set_ylabel("pruned tokens", fontsize=8)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def evaluate(videos: Sequence[str | os.PathLike], window: int = 16, split: bool = False,
             telemetry: str | os.PathLike | None = None) -> dict:
    """The whole ``tokentrim eval`` report: per-video results, comparison(s), telemetry series."""
    if not videos:
        raise EvalError("give at least one video")
    if split and len(videos) != 1:
        raise EvalError(f"--split takes exactly one video (a side-by-side --compare video), got {len(videos)}")
    sizes = [probe(v) for v in videos]  # every input checked before any work
    for v, size in zip(videos[1:], sizes[1:]):
        if size != sizes[0]:
            raise EvalError(f"videos must have the same frame size to be compared: {videos[0]} is "
                            f"{sizes[0][1]}x{sizes[0][0]}, {v} is {size[1]}x{size[0]}")
    if telemetry is not None and not Path(telemetry).is_file():
        raise EvalError(f"{telemetry}: no such telemetry file")
    results = [r for v in videos for r in analyze(v, window, split)]
    comparisons = [compare(results[0], r) for r in results[1:]]
    report = {"window": window, "videos": results, "comparisons": comparisons}
    if telemetry is not None:
        report["telemetry"] = telemetry_series(telemetry, results[0]["fps"])
    return report


def add_parser(subparsers):
    """Register ``eval`` on an argparse subparsers object (handler: ``run``)."""
    from tokentrim.cli import HelpFormatter

    p = subparsers.add_parser(
        "eval", help="weight-free drift metrics of mp4 videos (flicker, colour/luminance drift, histograms)",
        description="Weight-free drift metrics of finished mp4 videos, per window of frames: temporal "
                    "flicker (mean absolute frame difference), per-channel mean/std and luminance drift and "
                    "colour-histogram distance against the first window, and the slope per second of each. "
                    "With two videos, or --split on one `tokentrim generate --compare` video, the differences "
                    "too. Prints a summary; --json / --png write the full report and a plot. Metrics that "
                    "need model weights (VBench subject/background consistency, imaging quality) are out of "
                    "scope. More: README 'Does it work?'.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO.mp4", help="video(s); the first is the reference of comparisons")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the full report here")
    p.add_argument("--png", metavar="OUT.png", default=None, help="write the plot here")
    p.add_argument("--window", type=int, default=16, help="frames per window (16 = 1 s at 16 fps)")
    p.add_argument("--split", action="store_true",
                   help="one side-by-side video (tokentrim generate --compare): compare its left and right halves")
    p.add_argument("--telemetry", metavar="RUN.json", default=None,
                   help="telemetry JSON of the run: severity, threshold and pruned tokens on the same time axis")
    p.set_defaults(func=run, _parser=p)
    return p


def run(args) -> int:
    """Handler of ``tokentrim eval``: prints a summary, writes --json / --png; user errors exit 2."""
    parser = args._parser
    if args.window < 2:
        parser.error(f"--window must be >= 2, got {args.window}")
    try:  # the outputs first: a bad path must not cost a decode
        for flag in ("json", "png"):
            if getattr(args, flag):
                safeio.check_output_file(getattr(args, flag), f"--{flag}")
    except ValueError as e:
        parser.error(str(e))
    try:
        report = evaluate(args.videos, args.window, args.split, args.telemetry)
    except EvalError as e:
        parser.error(str(e))
    for r in report["videos"]:
        m, s = r["mean"], r["slope_per_s"]
        print(f"{r['video']}: {r['frames']} frames {r['width']}x{r['height']} @ {r['fps']:.3g} fps, "
              f"{len(r['windows'])} windows | flicker {m['flicker']:.3f} | luminance drift slope {s['luminance']:+.3f}/s "
              f"| colour drift slope {s['mean_drift']:+.3f}/s | histogram distance slope {s['hist_distance']:+.4f}/s")
    for c in report["comparisons"]:
        d = c["mean_diff"]
        print(f"{c['second']} - {c['first']}: flicker {d['flicker']:+.3f}, colour drift {d['mean_drift']:+.3f}, "
              f"histogram distance {d['hist_distance']:+.4f}")
    if args.json:  # whole files or none (safeio): an interrupted write never leaves half a report
        safeio.atomic_write_text(args.json, json.dumps(telemetry._clean(report), indent=1))
        print(f"wrote {args.json}")
    if args.png:
        safeio.atomic_write(args.png, lambda t: plot(report["videos"], t, report.get("telemetry")))
        print(f"wrote {args.png}")
    return 0
