"""tokentrim benchmarks: ``python bench/run.py [--device auto|cpu|cuda] [--sections a,b] ...``.

Every section lives in ``bench/bench_<name>.py`` and exposes::

    SECTION = "<name>"
    def add_arguments(parser): ...          # optional: section flags (parser is an argument group)
    def run(args, device) -> list[dict]:    # rows made with bench.common.row

Sections are discovered from the files present, so a section that has not landed yet is simply
absent; naming an unknown one in ``--sections`` is an error (exit 2, with the valid list). Results
of the run go to ``<out-dir>/<section or "run">-<device>-<date>-<time>[-n].csv`` and ``.json``
(a new name per run: two runs never overwrite each other).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR.parent) not in sys.path:  # `python bench/run.py` from the repo root
    sys.path.insert(0, str(BENCH_DIR.parent))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.plot import plot_rows  # noqa: E402
from tokentrim.cli import HelpFormatter  # noqa: E402

ORDER = ("drift", "attention", "rollout")  # known sections first, in this order; others after


def discover() -> dict[str, object]:
    """Import every bench/bench_<name>.py; a module that fails to import is reported, not hidden."""
    names = sorted(p.stem[len("bench_") :] for p in BENCH_DIR.glob("bench_*.py"))
    names.sort(key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    sections = {}
    for name in names:
        try:
            mod = importlib.import_module(f"bench.bench_{name}")
        except Exception as e:  # a broken section must not stop the others
            sections[name] = e
            continue
        sections[getattr(mod, "SECTION", name)] = mod
    return sections


def build_parser(sections: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Time tokentrim's kernels against their pure-PyTorch references (and, when those "
        "sections are present, the attention kernel and whole rollouts). Each measurement is a "
        "median; every kernel is reported beside a baseline measured in the same run.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run: auto = cuda when available, else cpu. On cpu the Triton kernels would need "
        "the (very slow) interpreter, so sections time the references and skip kernels unless "
        "TRITON_INTERPRET=1 is set",
    )
    p.add_argument(
        "--sections",
        default="all",
        help="comma-separated sections to run; available here: "
        + (", ".join(n for n, m in sections.items() if not isinstance(m, Exception)) or "none"),
    )
    p.add_argument(
        "--repeats", type=int, default=20, help="timed calls per measurement on cpu (median reported)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: fewer shapes, 3 repeats on cpu, a short do_bench window on cuda",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for the result files (default: bench/results of this checkout)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice), recorded in the results",
    )
    p.add_argument("--no-save", action="store_true", help="print the tables only, write no result file")
    for name, mod in sections.items():
        if not isinstance(mod, Exception) and hasattr(mod, "add_arguments"):
            mod.add_arguments(p.add_argument_group(f"section '{name}'"))
    return p


def resolve_device(choice: str, parser: argparse.ArgumentParser) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return torch.device(choice)


def main(argv=None) -> int:
    sections = discover()
    parser = build_parser(sections)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, parser)

    if args.sections == "all":
        wanted = list(sections)
    else:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [n for n in wanted if n not in sections]
        if unknown or not wanted:
            parser.error(f"--sections: unknown section(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"valid: {', '.join(sections) or 'none'} (or 'all')")

    env = common.env_info(device)
    print(f"[bench] {env['device_name']} ({device}), torch {env['torch']}, triton {env['triton']}, "
          f"git {env['git_sha']}, {env['date_utc']}")  # fmt: skip
    failed, rows = [], []
    for name in wanted:
        mod = sections[name]
        if isinstance(mod, Exception):
            print(f"[bench] section '{name}' failed to import: {mod!r}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"\n== {name} ==")
        try:
            got = list(mod.run(args, device))
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for r in got:
            r["section"] = r.get("section") or name
            r["device"] = r.get("device") or str(device)
        common.print_table(got)
        rows += got

    if rows and not args.no_save:
        tag = wanted[0] if len(wanted) == 1 else "run"
        out_dir = args.out_dir if args.out_dir is not None else BENCH_DIR / "results"
        csv_path, json_path = common.write_results(rows, env, out_dir, tag)
        png = plot_rows(rows, env, csv_path.with_suffix(".png"))
        print(f"\n[bench] wrote {csv_path}, {json_path.name}" + (f" and {png.name}" if png else ""))
    if failed:
        print(f"[bench] failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
