"""PNG plots (matplotlib, Agg backend): a latency CDF per phase, and a sweep's P99 TTFT, P99
TPOT and goodput against offered rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.stats import PHASES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdfs(samples: Mapping[str, Sequence[float]], path: Path, title: str = "") -> Path:
    """One panel per phase: the empirical CDF of its latencies (ms), P50/P99 marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
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
    return _save(plt, fig, path, title)


def plot_sweep(summary: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """P99 TTFT, P99 TPOT, and goodput (with throughput for reference) vs offered rate."""
    plt = _pyplot()
    runs = summary["runs"]
    rates = [r["rate"] for r in runs]

    def col(key: str) -> list[float]:
        return [np.nan if r[key] is None else r[key] for r in runs]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
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
    return _save(plt, fig, path, title)


def _save(plt, fig, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
