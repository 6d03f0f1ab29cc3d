"""A picture of a benchmark run: per section, the median time of every implementation per shape.

One horizontal panel per section, shapes on the y axis, one bar per implementation, log time axis,
each bar labelled with its ratio to the section's baseline (>1 = faster than the baseline).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def plot_rows(rows: list[dict], env: dict, path: Path) -> Path | None:
    """Write ``path`` (PNG) from long-format rows (metric "time" only). Returns None when no rows."""
    times = [r for r in rows if r.get("metric") == "time" and isinstance(r.get("value"), (int, float))]
    if not times:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_section: dict[str, list[dict]] = defaultdict(list)
    for r in times:
        by_section[r["section"]].append(r)
    heights = [max(2.0, 0.45 * len({(r["name"], r["shape"]) for r in rs}) * 1.6) for rs in by_section.values()]
    fig, axes = plt.subplots(len(by_section), 1, figsize=(11, sum(heights) + 1), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (section, rs) in zip(axes[:, 0], by_section.items()):
        cases = list(dict.fromkeys((r["name"], r["shape"]) for r in rs))
        impls = list(dict.fromkeys(r["impl"] for r in rs))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            for i, case in enumerate(cases):
                hit = [r for r in rs if r["impl"] == impl and (r["name"], r["shape"]) == case]
                if not hit:
                    continue
                r = hit[0]
                y = i + (j - (len(impls) - 1) / 2) * width
                ax.barh(y, r["value"], height=width, color=f"C{j}", label=impl)
                ratio = r.get("ratio")
                if isinstance(ratio, (int, float)):
                    ax.text(r["value"], y, f" {ratio:.2f}x", va="center", fontsize=7)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([f"{n}\n{s}" for n, s in cases], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(f"median time ({rs[0].get('unit', 'ms')}), log scale; label = ratio to baseline")
        ax.set_title(f"{section} (baseline: {rs[0].get('baseline', '-')})", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        vals = [r["value"] for r in rs]
        ax.set_xlim(min(vals) / 1.5, max(vals) * 2.0)  # room for the ratio labels
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"tokentrim bench: {env.get('device_name')}, torch {env.get('torch')}, triton {env.get('triton')}, "
                 f"git {env.get('git_sha')}, {env.get('date_utc')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
