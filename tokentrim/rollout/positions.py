"""Unbounded rollouts: keep every RoPE position a forward looks up inside the model's table.

Wan2.1's RoPE table has 1024 temporal positions (about 4 min 15 s at 16 fps). A cache key of
absolute frame f is rotated at position ``f - cache.position_base``. Before each forward the
rollout calls ``PositionRebaser.ensure(lo, hi)`` with the absolute frames it is about to look up
in the table: the new block's frames [fs, fs + n) and, for Rolling Forcing, the frames the raw
sink is rotated at (right before the oldest kept non-sink frame). When they would leave
[0, limit), the base moves to ``lo`` and every cached key of every layer (and of every cache the
rollout keeps, e.g. Rolling Forcing's refresh cache) is rotated in place by the position shift
(``ops.rope_rebase``, one fused launch per cache). Rotations compose and attention depends only
on position differences, so a re-based rollout equals the same rollout with an infinite table
(up to one rounding of the keys to the cache dtype per re-base). Cached keys may end up at
negative positions (Self Forcing's sink: the same distance to the new block as without a
re-base); they are never looked up again. Rolling Forcing's raw sink keys are stored
un-rotated, so they need no re-base: they are rotated at ``anchor - sink_frames - base``.

The shift lives in a 0-dim device tensor and the base in ``cache.position_base_t``, so a CUDA
graph captured before a re-base replays correctly after it. Host sync: none.
"""

from __future__ import annotations

import torch

from tokentrim import ops
from tokentrim.kernels.validate import check_int

__all__ = ["PositionRebaser"]


class PositionRebaser:
    """Re-bases the RoPE positions of a rollout's caches when a forward would pass the table.

    Args:
        model: the ``WanModel`` (its RoPE table length is the default limit).
        caches: the rollout's ``KVCache`` objects (None entries are skipped); they share one base.
        limit: positions available, 1 <= limit <= the table length (None = the table length). A
            smaller limit re-bases earlier (tests, or on request).
    """

    def __init__(self, model, caches, limit: int | None = None):
        table = int(model.rope_cos.shape[0])
        if limit is None:
            limit = table
        check_int("position_limit", limit, 1)
        if limit > table:
            raise ValueError(f"position_limit must be <= the model's RoPE table of {table} positions, got {limit}")
        self.limit = limit
        self.caches = [c for c in caches if c is not None]
        if not self.caches:
            raise ValueError("caches must hold at least one KVCache")
        bases = {c.position_base for c in self.caches}
        if len(bases) != 1:
            raise ValueError(f"caches must share one position_base, got {sorted(bases)}")
        self.theta = float(getattr(model.config, "rope_theta", 10000.0))
        self._shift = torch.zeros((), dtype=torch.int64, device=self.caches[0].device)
        #: one dict per re-base: ``frame`` (first frame looked up), ``old_base``, ``new_base``, ``shift``
        self.events: list[dict] = []

    @property
    def base(self) -> int:
        """Absolute frame at position 0 (host int)."""
        return self.caches[0].position_base

    def ensure(self, lo: int, hi: int) -> dict | None:
        """Absolute frames [lo, hi) are about to be looked up: re-base if they leave [0, limit).

        Returns the re-base event, or None when the positions already fit. Raises ValueError when
        hi - lo exceeds the limit (no base can fit them). Host sync: none.
        """
        lo, hi = int(lo), int(hi)
        if hi - lo > self.limit:
            raise ValueError(
                f"one forward looks up frames [{lo}, {hi}): {hi - lo} positions, more than the "
                f"position limit of {self.limit}"
            )
        if lo - self.base >= 0 and hi - self.base <= self.limit:
            return None
        return self.rebase(lo, frame=lo)

    def rebase(self, new_base: int, frame: int | None = None) -> dict:
        """Make absolute frame ``new_base`` position 0: rotate every cached key of every cache by
        the shift ``old_base - new_base`` (one ``ops.rope_rebase`` launch per cache). Host sync: none."""
        new_base = int(new_base)
        old = self.base
        shift = old - new_base
        if shift:
            self._shift.fill_(shift)
            for c in self.caches:
                ops.rope_rebase(c.kv[:, 0], self._shift, self.theta, backend=c.backend)
                c.position_base = new_base
                c.position_base_t.fill_(new_base)
        event = {"frame": new_base if frame is None else frame, "old_base": old, "new_base": new_base,
                 "shift": shift}
        self.events.append(event)
        return event
