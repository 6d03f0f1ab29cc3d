"""`tokentrim --version`, `python -m tokentrim`, help texts that state each default once (issue 12)."""

import re
import subprocess
import sys

import pytest

import tokentrim
from bench import run as bench_run
from tokentrim import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tokentrim {tokentrim.__version__}"


def test_python_dash_m_tokentrim():
    done = subprocess.run([sys.executable, "-m", "tokentrim", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"tokentrim {tokentrim.__version__}"


def _option_helps(text: str) -> list[str]:
    """One string per option of an argparse --help text (wrapped lines joined)."""
    body = text.split("options:", 1)[1]
    return [" ".join(chunk.split()) for chunk in re.split(r"\n  (?=-)", body) if chunk.strip().startswith("-")]


@pytest.mark.parametrize("which", ["rollout", "generate", "bench"])
def test_help_states_each_default_once(which, capsys):
    argv = ["--help"] if which == "bench" else [which, "--help"]
    with pytest.raises(SystemExit):
        (bench_run.main if which == "bench" else cli.main)(argv)
    helps = _option_helps(capsys.readouterr().out)
    if which == "generate" and len(helps) < 5:
        pytest.skip("generate is not registered (optional video dependencies missing)")
    assert len(helps) > 5
    for h in helps:
        assert h.lower().count("default") <= 1, h
        assert "(default: None)" not in h, h
