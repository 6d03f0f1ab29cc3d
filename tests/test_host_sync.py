"""No host sync on the rollout hot path (issue: GPU bring-up, item 5).

On CPU nothing syncs, so the test patches the entry points that would sync (or copy host ->
device) on a GPU: ``Tensor.item``, ``Tensor.tolist``, ``Tensor.cpu`` and building a tensor from
Python data (``torch.tensor``, ``torch.as_tensor``). Every call made while a rollout runs is
recorded with the innermost tokentrim frame that made it. Allowed: the per-block TokenTrim
decision (``tokentrim/trim.py``), the per-block telemetry record and the final gather of finished
blocks (``tokentrim/rollout/common.py``, ``tokentrim/telemetry.py``), and the noise drawn per block
on the CPU generator. Anything reached from a denoising step, a window, the schedule, the graph
runner, the model, the cache or the ops fails the test, naming the call site.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pytest
import torch

import tokentrim
from tokentrim.config import TokenTrimConfig
from tokentrim.rollout import (
    RollingForcingConfig,
    RollingForcingRollout,
    SelfForcingConfig,
    SelfForcingRollout,
)
from tokentrim.rollout import schedule as schedule_mod

PKG = Path(tokentrim.__file__).resolve().parent
ALLOWED_FILES = {"trim.py", "telemetry.py"}
# functions of rollout/common.py that run once per block (decision bookkeeping, records, output)
ALLOWED_COMMON = {"block_noise", "block_seed", "finish_block", "decide", "accept", "run", "<listcomp>", "__init__", "prune"}
# the schedule table is built once, on the CPU, when a rollout is constructed
ALLOWED_SITES = {"rollout/schedule.py:warp"}


class _SyncLog:
    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def site(self) -> str | None:
        """'file.py:function' of the innermost tokentrim frame, or None if tokentrim is not on the stack."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            p = Path(frame.filename).resolve()
            if PKG in p.parents and "tests" not in p.parts:
                return f"{p.relative_to(PKG)}:{frame.name}"
        return None

    def wrap(self, name, fn, scalar_only=False):
        log = self

        def wrapper(*args, **kwargs):
            if scalar_only and args and isinstance(args[0], torch.Tensor):
                return fn(*args, **kwargs)  # as_tensor of a tensor: no host data involved
            site = log.site()
            if site is not None:
                log.calls.append((name, site))
            return fn(*args, **kwargs)

        return wrapper


@pytest.fixture
def sync_log(monkeypatch):
    log = _SyncLog()
    for meth in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, meth, log.wrap(f"Tensor.{meth}", getattr(torch.Tensor, meth)))
    monkeypatch.setattr(torch, "tensor", log.wrap("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", log.wrap("torch.as_tensor", torch.as_tensor, scalar_only=True))
    return log


def _forbidden(calls):
    bad = []
    for name, site in calls:
        file, func = site.split(":")
        if Path(file).name in ALLOWED_FILES or site in ALLOWED_SITES:
            continue
        if file == "rollout/common.py" and func in ALLOWED_COMMON:
            continue
        bad.append(f"{name} from {site}")
    return sorted(set(bad))


@pytest.fixture(scope="module")
def text(text):
    return text[:1]


@pytest.mark.parametrize("trim", [None, TokenTrimConfig(force="always", warmup=1)], ids=["plain", "trim"])
def test_self_forcing_steps_do_not_sync(model, text, sync_log, trim):
    SelfForcingRollout(model, SelfForcingConfig(), trim=trim).run(text, 3, 4, 6, seed=0)
    assert not _forbidden(sync_log.calls), _forbidden(sync_log.calls)


@pytest.mark.parametrize("trim", [None, TokenTrimConfig(force="always", warmup=1)], ids=["plain", "trim"])
def test_rolling_forcing_windows_do_not_sync(model, text, sync_log, trim):
    RollingForcingRollout(model, RollingForcingConfig(), trim=trim).run(text, 3, 4, 6, seed=0)
    assert not _forbidden(sync_log.calls), _forbidden(sync_log.calls)


def test_the_detector_sees_a_planted_sync(model, text, sync_log, monkeypatch):
    """The test above can fail: a .item() planted in the schedule is reported."""
    real = schedule_mod.FlowSchedule.x0_from_flow

    def syncing(self, flow, x_t, timestep):
        flow.sum().item()
        return real(self, flow, x_t, timestep)

    monkeypatch.setattr(schedule_mod.FlowSchedule, "x0_from_flow", syncing)
    SelfForcingRollout(model, SelfForcingConfig()).run(text, 1, 4, 6, seed=0)
    assert "Tensor.item from rollout/schedule.py:syncing" in _forbidden(sync_log.calls) or any(
        "Tensor.item" in c for c in _forbidden(sync_log.calls)
    )


def test_schedule_with_python_floats_builds_no_tensor(sync_log):
    s = schedule_mod.FlowSchedule(5.0)
    x = torch.randn(1, 3, 4, 2, 2)
    s.renoise(x, torch.randn_like(x), 937.5)
    s.x0_from_flow(torch.randn_like(x), x, 937.5)
    assert not sync_log.calls, sync_log.calls


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
