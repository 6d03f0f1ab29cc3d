"""Per-block rollout telemetry: JSON and a PNG plot.

A record is the dict a rollout yields per block (see ``tokentrim.rollout.common.BlockRecord``
fields): ``block``, ``severity`` / ``threshold`` / ``prune`` / ``regenerated`` / ``final_severity``
(lists, one value per video, ``None`` where no decision was made), ``regenerations`` and
``time_s``. Missing keys are tolerated so controller-only records can be plotted too.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, tensors -> lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return value


def to_json(records: Sequence[dict], meta: dict | None = None) -> str:
    """Serialize ``{"meta": meta, "blocks": records}`` (NaN written as null)."""
    return json.dumps({"meta": _clean(meta or {}), "blocks": _clean(list(records))}, indent=2)


def save_json(records: Sequence[dict], path: str | os.PathLike, meta: dict | None = None) -> str:
    """Write the telemetry JSON to ``path``; returns the path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_json(records, meta))
    return str(path)


def _per_video(records: Sequence[dict], key: str, batch: int) -> list[list[float]]:
    """[batch][blocks] floats (NaN where missing) from list-valued record fields."""
    out = [[math.nan] * len(records) for _ in range(batch)]
    for i, rec in enumerate(records):
        vals = rec.get(key)
        if vals is None:
            continue
        if not isinstance(vals, (list, tuple)):
            vals = [vals] * batch
        for b, v in enumerate(vals[:batch]):
            out[b][i] = math.nan if v is None else float(v)
    return out


def plot(records: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> str:
    """PNG plot of the run, block by block (matplotlib Agg backend, no display needed).

    With TokenTrim decisions: severity per video (solid), the threshold mu + lambda*sigma (dashed),
    pruned blocks marked with a red x, the severity of the regenerated block (dots); then the
    regenerations per block. Always: the time per block (``time_s``), so a run without TokenTrim
    (no severities) still shows its per-block time and forwards instead of empty axes.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = _figure(list(records), title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _figure(records: list[dict], title: str | None):
    import matplotlib.pyplot as plt

    batch = max((len(r["severity"]) for r in records if isinstance(r.get("severity"), (list, tuple))), default=1)
    blocks = [r.get("block", i) for i, r in enumerate(records)]
    sev = _per_video(records, "severity", batch)
    decided = any(not math.isnan(x) for row in sev for x in row)
    times = [float(r["time_s"]) if r.get("time_s") is not None else math.nan for r in records]
    if not decided:
        fig, (ax_t, ax_f) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        _time_panel(ax_t, blocks, times, "time per block (s)")
        ax_t.set_title(title or "per-block telemetry (no TokenTrim decisions)")
        ax_f.bar(blocks, [int(r.get("forwards") or 0) for r in records], color="C2")
        ax_f.set_ylabel("forwards")
        ax_f.set_xlabel("block")
        ax_f.grid(alpha=0.3)
        fig.tight_layout()
        return fig
    thr = _per_video(records, "threshold", batch)
    fin = _per_video(records, "final_severity", batch)
    fig, (ax, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1, 1]})
    for b in range(batch):
        color = f"C{b % 10}"
        ax.plot(blocks, sev[b], "-o", color=color, ms=3, label=f"severity v{b}")
        ax.plot(blocks, thr[b], "--", color=color, alpha=0.7, label=f"threshold v{b}")
        pruned = [
            (blk, s) for blk, s, r in zip(blocks, sev[b], records) if _flag(r.get("prune"), b) and not math.isnan(s)
        ]
        if pruned:
            ax.scatter([p[0] for p in pruned], [p[1] for p in pruned], marker="x", color="red", s=60, zorder=3,
                       label="prune" if b == 0 else None)
        regen = [(blk, f) for blk, f, r in zip(blocks, fin[b], records) if _flag(r.get("regenerated"), b)]
        if regen:
            ax.scatter([p[0] for p in regen], [p[1] for p in regen], marker=".", color=color, s=80, zorder=3)
    ax.set_ylabel("drift severity D_t")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title(title or "TokenTrim per-block telemetry")
    ax2.bar(blocks, [_regen_count(r) for r in records], color="C3")
    ax2.set_ylabel("regenerations")
    ax2.grid(alpha=0.3)
    _time_panel(ax3, blocks, times, "time (s)")
    ax3.set_xlabel("block")
    fig.tight_layout()
    return fig


def _time_panel(ax, blocks: list, times: list[float], ylabel: str) -> None:
    """Bars of the seconds per block (``time_s``, NaN where a record has none) on ``ax``."""
    ax.bar(blocks, times, color="C0")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _flag(values, b: int) -> bool:
    if values is None:
        return False
    if isinstance(values, (list, tuple)):
        return b < len(values) and bool(values[b])
    return bool(values)


def _regen_count(record: dict) -> int:
    """Regeneration passes of a block: ``num_regenerations``, else the max over ``regenerations``."""
    n = record.get("num_regenerations")
    if n is not None:
        return int(n)
    r = record.get("regenerations")
    if isinstance(r, (list, tuple)):
        return max((int(x or 0) for x in r), default=0)
    return int(r or 0)
