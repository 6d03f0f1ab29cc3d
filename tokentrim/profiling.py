"""NVTX ranges for profilers (Nsight Systems); no-ops when no profiler is attached.

Uses the ``nvtx`` package (works with CPU-only torch, unlike ``torch.cuda.nvtx``). Names used by
the rollouts: ``block``, ``step``, ``forward``, ``detect``, ``prune``, ``regenerate``,
``cache_refresh``, ``window``.
"""

from __future__ import annotations

import contextlib

try:  # pragma: no cover - nvtx is an install requirement, but stay usable without it
    import nvtx as _nvtx
except ImportError:  # pragma: no cover
    _nvtx = None

_COLORS = {
    "block": "blue",
    "window": "blue",
    "step": "green",
    "forward": "purple",
    "detect": "orange",
    "prune": "red",
    "regenerate": "red",
    "cache_refresh": "cyan",
}

_enabled = True


def set_enabled(flag: bool) -> None:
    """Turn all ranges on or off (they are cheap, but this makes them exactly free)."""
    global _enabled
    _enabled = bool(flag)


def nvtx_range(name: str, **payload):
    """Context manager marking an NVTX range named ``name`` (e.g. ``nvtx_range("block", index=3)``).

    Extra keyword values are appended to the message (``block index=3``).
    """
    if _nvtx is None or not _enabled:
        return contextlib.nullcontext()
    message = name if not payload else name + " " + " ".join(f"{k}={v}" for k, v in payload.items())
    return _nvtx.annotate(message, color=_COLORS.get(name, "white"), domain="tokentrim")
