"""Hopper compile gate (``pytest -m aot``): every Triton kernel compiled for sm_90a on this machine.

``bench/aot.py`` compiles each kernel, at the Wan2.1-1.3B shapes, for every autotune config its
launcher can pick (no GPU: Triton's compiler and bundled ptxas only) and reports registers, spill
bytes, shared memory and wgmma use. It must run without TRITON_INTERPRET, so the gate runs it in
subprocesses (two, each compiling half of the cases). Deselected by default (see pyproject.toml);
CI runs ``pytest -m aot``. The coverage check below runs in the default suite.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 2


def _kernel_modules() -> set[str]:
    return {p.stem for p in (ROOT / "kernels").glob("*.py") if re.search(r"^@triton\.jit", p.read_text(), re.M)}


def _case_modules() -> set[str]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    names: set[str] = set()
    for f in sorted((ROOT / "bench").glob("aot_cases*.py")):
        names |= set(importlib.import_module(f"bench.{f.stem}").CASES)
    return names


def test_every_kernel_module_has_an_aot_case():
    """A kernel that the compile gate does not cover could spill unnoticed: add its cases to a
    bench/aot_cases*.py file (a CASES dict: kernels module -> launches at the Wan shapes)."""
    missing = _kernel_modules() - _case_modules()
    assert not missing, f"kernels without sm_90a compile-gate cases in bench/aot_cases*.py: {sorted(missing)}"


@pytest.fixture(scope="module")
def aot_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = []
    for i in range(SHARDS):
        js = out / f"shard{i}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "aot.py"), "--no-fail", "--shard", f"{i}/{SHARDS}", "--json", str(js)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), js))
    records, problems = [], []
    for proc, js in procs:
        log, _ = proc.communicate(timeout=1800)
        print(log)  # the register / spill / shared-memory table, shown with -s or on failure
        assert proc.returncode == 0, log[-4000:]
        data = json.loads(js.read_text())
        records += data["records"]
        problems += data["problems"]
    return records, problems


@pytest.mark.aot
def test_every_module_compiles(aot_records):
    records, _ = aot_records
    compiled = {r["case"].split(":")[0] for r in records}
    assert compiled == _case_modules()


@pytest.mark.aot
def test_no_spills_smem_fits_attention_uses_wgmma(aot_records):
    """bench/aot.py's gate: no spills (the fp32 test-only path excepted), shared memory within
    227 KB, wgmma in the attention PTX."""
    _, problems = aot_records
    assert not problems, "\n".join(problems)


@pytest.mark.aot
def test_every_attention_config_is_compiled(aot_records):
    """Each (dtype, keep) case compiles once per autotune config the launcher can pick."""
    records, _ = aot_records
    att = [r for r in records if r["kernel"] == "_masked_attn_fwd" and "tests only" not in r["case"]]
    per_case: dict[str, int] = {}
    for r in att:
        per_case[r["case"]] = per_case.get(r["case"], 0) + 1
    assert len(per_case) == 4 and len(set(per_case.values())) == 1 and min(per_case.values()) >= 2, per_case
