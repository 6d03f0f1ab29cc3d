"""bench/bench_detect.py in a small mode: the synthetic denoiser, the corruption bookkeeping and the table."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_detect  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


def test_denoiser_first_step_carries_noise_and_corruption():
    plan = [("noise", 1, [0, 5]), None]
    m = bench_detect.SyntheticDenoiser(2, 4, 6, seed0=0, err=0.5, corrupt=plan)

    class Cache:  # the bookkeeping the denoiser reads from a KVCache
        length = torch.zeros(2, dtype=torch.int32)

        def kept_count(self):
            return torch.zeros(2, dtype=torch.int32)

    x = torch.randn(2, 3, 16, 4, 6)
    t = torch.full((2, 3), 1000.0)
    x0 = x - m.forward_cached(x, t, None, Cache(), 3)  # sigma = 1: x0 = x - flow
    clean = m.target([3, 4, 5])
    err = x0 - clean - 0.5 * x  # what is left: the corruption, video 0 only, tokens 0 and 5 (3x2 token grid)
    assert err[1].abs().max() < 1e-5
    touched = err[0].abs().amax(dim=(0, 1)) > 1e-6  # [4, 6] pixels
    want = torch.zeros(4, 6, dtype=torch.bool)
    want[0:2, 0:2] = True  # token 0
    want[2:4, 4:6] = True  # token 5 = row 1, column 2
    assert torch.equal(touched, want)
    assert m.forward_cached(x, t, None, Cache(), 3, kv_only=True) is None


@pytest.mark.parametrize("preset", ["paper", "robust"])
def test_small_detect_run(preset):
    seeds, blocks = 6, 7
    clean = bench_detect.evaluate(preset, None, seeds, blocks)
    noisy = bench_detect.evaluate(preset, "noise", seeds, blocks)
    for r in (clean, noisy):
        assert r["decided"] == seeds * (blocks - 3)  # blocks 1, 2 warm up; block 0 has no previous
        assert r["forwards_per_block_off"] == (4 * blocks + blocks - 1) / blocks
        assert r["forwards_per_block_on"] >= r["forwards_per_block_off"]
    assert clean["tp"] == clean["fn"] == 0 and 0 <= clean["false_trigger"] <= 1
    assert clean["detected"] == clean["fp"]
    # one corrupted block per video, always decided: tp + fn = videos
    assert noisy["tp"] + noisy["fn"] == seeds
    # noise of the pattern's amplitude on k tokens is caught by both presets, and S_t finds the tokens
    assert noisy["recall"] == 1.0
    assert noisy["token_precision"] > 0.5
    text = bench_detect.table([clean, noisy])
    assert text.count("\n") == 3 and f"| {preset} | noise | {seeds} |" in text
    assert not math.isnan(noisy["precision"])
