"""GraphRunner capture keys (CPU): a replay must never write the raw sink at a frozen, wrong offset."""

from __future__ import annotations

import torch

from tokentrim.cache import KVCache
from tokentrim.rollout.graphs import GraphRunner

TPF = 4


def _runner_and_cache(sink_frames: int, raw_sink: bool = True):
    cache = KVCache(2, 1, 2, 8, TPF, 12, sink_frames=sink_frames, raw_sink=raw_sink)
    runner = GraphRunner.__new__(GraphRunner)  # only _key is exercised: no model needed
    return runner, cache


def _block(frames: int = 3):
    return torch.zeros(1, frames, 4, 2, 2)


def test_sink_wider_than_a_block_gets_one_capture_per_raw_slot():
    """sink_frames=6, blocks of 3: blocks 0 and 1 both write raw keys, at different slots."""
    runner, cache = _runner_and_cache(sink_frames=6)
    x = _block()
    keys = []
    for b in range(4):
        cache.prepare(3)
        keys.append(runner._key(cache, x, False))
        cache.commit(3 * b, 3)
    assert keys[0] != keys[1], "block 1 would replay block 0's capture and overwrite raw slot 0"
    assert cache.raw_sink_slot(3 * TPF) is None
    assert keys[2] == keys[3], "once the sink is complete one capture serves every window"
    assert keys[1] != keys[2]


def test_sink_of_one_block_keeps_two_captures():
    runner, cache = _runner_and_cache(sink_frames=3)
    x = _block()
    cache.prepare(3)
    k0 = runner._key(cache, x, False)
    cache.commit(0, 3)
    cache.prepare(3)
    k1 = runner._key(cache, x, False)
    cache.commit(3, 3)
    cache.prepare(3)
    assert k0 != k1 and k1 == runner._key(cache, x, False)


def test_no_raw_sink_key_is_the_shape_only():
    runner, cache = _runner_and_cache(sink_frames=3, raw_sink=False)
    x = _block()
    cache.prepare(3)
    k0 = runner._key(cache, x, False)
    cache.commit(0, 3)
    cache.prepare(3)
    assert k0 == runner._key(cache, x, False)
    assert k0 != runner._key(cache, x, True)
