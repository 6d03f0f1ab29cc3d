"""Shared pieces of the benchmark sections: environment record, timing, result rows and files.

A result row is one measurement (long format): section, name, impl, shape, dtype, device,
metric, value, unit, baseline, ratio, note. ``baseline`` names the implementation measured in the
same run that ``ratio`` compares against; for times, ratio = baseline time / this time (a speedup,
> 1 means faster than the baseline).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

FIELDS = (
    "section",
    "name",
    "impl",
    "shape",
    "dtype",
    "device",
    "metric",
    "value",
    "unit",
    "baseline",
    "ratio",
    "note",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- environment
def git_sha() -> str | None:
    """Short sha of HEAD (with "+dirty" when the code has uncommitted changes; result files under
    bench/results do not count), or None outside a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def env_info(device: torch.device) -> dict:
    """Everything needed to interpret a result file later."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "platform": platform.platform(),
        "git_sha": git_sha(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv[1:],
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(env: dict) -> str:
    """Short file-name tag: "cpu" or the GPU name, e.g. "nvidia-h100-80gb-hbm3"."""
    return "cpu" if env["device"].startswith("cpu") else slug(env["device_name"])


# --------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3, quick=False
) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench`` (median over its repetitions; L2 flushed between calls), with
    a shorter window when ``quick``. CPU: ``warmup`` untimed calls, then the median of ``repeats``
    ``time.perf_counter`` measurements of single calls.
    """
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=5 if quick else 25, rep=20 if quick else 100, return_mode="median"
            )
        )
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


# ------------------------------------------------------------------------------------- results
def row(
    section, name, impl, shape, dtype, metric, value, unit, *, device="", baseline="", ratio=None, note=""
):
    """One long-format measurement (see module docstring)."""
    return {
        "section": section,
        "name": name,
        "impl": impl,
        "shape": shape,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "metric": metric,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "note": note,
    }


def add_ratios(rows: list[dict], baseline_impl: str, metric: str = "time") -> None:
    """Fill baseline/ratio of every ``metric`` row from the row of ``baseline_impl`` with the same
    section, name, shape and dtype (ratio = baseline value / value)."""
    key = lambda r: (r["section"], r["name"], r["shape"], r["dtype"], r["metric"])
    base = {key(r): r["value"] for r in rows if r["impl"] == baseline_impl and r["metric"] == metric}
    for r in rows:
        b = base.get(key(r))
        if r["metric"] == metric and b is not None and r["value"]:
            r["baseline"] = baseline_impl
            r["ratio"] = b / r["value"]


# ------------------------------------------------------------------- drift_topk (drift, native)
# Wan2.1 latent blocks: name, B, F, F', C, H, W (C=16, 8x VAE downsampling, patch 2x2, 3-frame
# block vs the previous 3-frame block). Here, not in bench_drift, so that the native section does
# not import triton.
DRIFT_SHAPES = [
    ("832x480", 1, 3, 3, 16, 60, 104),
    ("832x480-b4", 4, 3, 3, 16, 60, 104),
    ("1280x720", 1, 3, 3, 16, 90, 160),
]


def drift_case(B, F, Fp, C, H, W, ratio: float) -> tuple[int, str]:
    """k = max(1, round(ratio * N)) for the N = (H/2)*(W/2) patch tokens, and the shape label."""
    N = (H // 2) * (W // 2)
    k = max(1, round(ratio * N))
    return k, f"B={B} F={F} F'={Fp} C={C} H={H} W={W} N={N} k={k}"


def drift_accuracy_rows(section, label, impl, shape, dtype, device, got, want) -> list[dict]:
    """Max |drift - reference| and the fraction of top-k indices shared with the reference.

    ``got``/``want``: the (drift, idx, severity) of two ``drift_topk`` calls; syncs the host.
    """
    d, idx, _ = got
    rd, ridx, _ = want
    err = float((d - rd).abs().max())
    same = sum(len(set(a) & set(b)) for a, b in zip(idx.tolist(), ridx.tolist())) / idx.numel()
    return [
        row(section, label, impl, shape, dtype, "drift_max_abs_err", err, "", device=device),
        row(section, label, impl, shape, dtype, "topk_overlap", same, "fraction", device=device),
    ]


def write_results(rows: list[dict], env: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    """Write ``<tag>-<device-slug>-<YYYYMMDD>-<HHMMSS>[-<n>].csv`` and ``.json`` (the json also holds
    ``env``). Never overwrites: the stem is claimed by creating the CSV exclusively, with ``-2``,
    ``-3``, ... appended while a run of the same second (or any older file) holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    when = env["date_utc"]  # YYYY-MM-DDTHH:MM:SSZ
    base = f"{slug(tag)}-{device_slug(env)}-{when[:10].replace('-', '')}-{when[11:19].replace(':', '')}"
    for n in range(1, 10_000):
        stem = base if n == 1 else f"{base}-{n}"
        csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
        if json_path.exists() or csv_path.with_suffix(".png").exists():
            continue
        try:
            f = open(csv_path, "x", newline="", encoding="utf-8")
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"{out_dir}: no free result name for {base}")
    with f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k)) for k in FIELDS})
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"env": env, "rows": [{k: r.get(k) for k in FIELDS} for r in rows]}, f, indent=1)
        f.write("\n")
    return csv_path, json_path


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows: Iterable[dict], file=None) -> None:
    """Aligned text table of the rows (empty columns dropped)."""
    rows = list(rows)
    if not rows:
        return
    cols = [c for c in FIELDS if any(r.get(c) not in (None, "") for r in rows)]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
    out = file or sys.stdout
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)), file=out)
