"""pytest-benchmark microbenchmark of ``tokentrim.ops.drift_topk`` on the 832x480 latent shape.

Skipped in the default run (pyproject addopts has --benchmark-skip); run it with
``pytest tests/test_microbench.py --benchmark-only``. The reference backend is timed everywhere;
the Triton backend only on CUDA (in the interpreter it would time Python, not the kernel).
"""

import pytest
import torch

from tokentrim import ops, reference

HAS_CUDA = torch.cuda.is_available()
B, F, C, H, W = 1, 3, 16, 60, 104  # 832x480 video, 3-frame blocks
K = round(0.1 * (H // 2) * (W // 2))

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_drift_topk_microbench(benchmark, backend):
    device, dtype = ("cuda", torch.bfloat16) if HAS_CUDA else ("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(B, F, C, H, W, generator=g).to(device=device, dtype=dtype)
    prev = torch.randn(B, F, C, H, W, generator=g).to(device=device, dtype=dtype)

    def step():
        out = ops.drift_topk(cand, prev, K, backend=backend, check_finite_inputs=False)
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    drift, idx, sev = benchmark(step)
    want = reference.drift_topk(cand, prev, K)
    torch.testing.assert_close(drift, want[0], rtol=1e-5, atol=1e-5)
    assert set(idx[0].tolist()) == set(want[1][0].tolist())


# ------------------------------------------------------------- the bench/run.py harness (not timed)
def _bench_run():
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("bench.run")


def test_bench_run_writes_long_format_results(tmp_path, capsys):
    import csv
    import json

    run = _bench_run()
    assert (
        run.main(
            ["--device", "cpu", "--sections", "drift", "--quick", "--out-dir", str(tmp_path)]
        )
        == 0
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and files[0].startswith("drift-cpu-") and files[0].endswith(".csv"), files
    assert files[2].endswith(".png") and (tmp_path / files[2]).read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / files[0]).read_text().splitlines()))
    assert rows and {r["impl"] for r in rows} == {"reference"}
    ref = next(r for r in rows if r["name"] == "832x480" and r["metric"] == "time")
    assert ref["unit"] == "ms" and float(ref["value"]) > 0 and float(ref["ratio"]) == 1.0
    data = json.loads((tmp_path / files[1]).read_text())
    assert {"device_name", "torch", "triton", "python", "git_sha", "date_utc"} <= set(data["env"])
    assert len(data["rows"]) == len(rows)
    # an unknown section is an error (exit 2, tests/test_bench_cli.py), no longer skipped


def test_bench_common_ratios_and_table(capsys):
    common = _bench_run().common
    rows = [
        common.row("s", "op", "reference", "N=4", torch.float32, "time", 6.0, "ms"),
        common.row("s", "op", "triton", "N=4", torch.float32, "time", 2.0, "ms"),
        common.row("s", "op", "triton", "N=8", torch.float32, "time", 2.0, "ms"),  # no baseline row
    ]
    common.add_ratios(rows, "reference")
    assert [r["ratio"] for r in rows] == [1.0, 3.0, None]
    assert rows[1]["baseline"] == "reference" and rows[2]["baseline"] == ""
    common.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(rows) and "ratio" in lines[0] and "float32" in lines[2]
    assert common.time_ms(lambda: None, torch.device("cpu"), repeats=3, warmup=1) >= 0
