"""PNG plots: a latency CDF per phase, and a sweep's P99 TTFT, P99 TPOT and goodput against
offered rate.

Figures are built with matplotlib's object API (`Figure`), not pyplot: no global backend to
switch, no figure registry to close, so plotting has no effect on the rest of the process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from loadgen.stats import PHASES


def plot_cdfs(samples: Mapping[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """One panel per phase: the empirical CDF of its latencies (ms), P50/P99 marked."""
    fig = Figure(figsize=(16, 7), layout="constrained")
    axes = fig.subplots(2, 4)
    for ax, phase in zip(axes.flat, PHASES):
        values = np.sort(np.asarray(samples.get(phase, []), dtype=float))
        ax.set_title(f"{phase} (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if len(values) == 0:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post")
        for q, style in ((50, "--"), (99, ":")):
            x = float(np.percentile(values, q))
            ax.axvline(x, color="grey", linestyle=style, linewidth=1, label=f"p{q} {x:.1f}")
        ax.legend(loc="lower right", fontsize=8)
    axes.flat[0].set_ylabel("fraction of requests")
    axes.flat[4].set_ylabel("fraction of requests")
    return _save(fig, path, title)


def plot_sweep(summary: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """P99 TTFT, P99 TPOT, and goodput (with throughput for reference) vs offered rate."""
    runs = summary["runs"]
    rates = [r["rate"] for r in runs]

    def col(key: str) -> list[float]:
        return [np.nan if r[key] is None else r[key] for r in runs]

    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = ((axes[0], "ttft_p99_ms", "P99 TTFT (ms)"), (axes[1], "tpot_p99_ms",
                                                          "P99 TPOT (ms)"))
    for ax, key, label in panels:
        ax.plot(rates, col(key), marker="o")
        ax.set_ylabel(label)
    axes[2].plot(rates, col("goodput_rps"), marker="o", label="goodput (met SLO)")
    axes[2].plot(rates, col("throughput_rps"), marker="x", linestyle="--",
                 label="throughput (succeeded)")
    axes[2].plot(rates, rates, color="grey", linewidth=0.8, linestyle=":", label="offered")
    axes[2].set_ylabel("requests/s")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("offered rate (requests/s)")
        ax.grid(alpha=0.3)
    return _save(fig, path, title)


def _save(fig: Figure, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
