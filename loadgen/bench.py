"""A run (or a sweep) from config to files: run, summarize, print, write JSON and plots.

    report = bench_once(config, out=Path("out"))     # report.json, requests.jsonl, CDF png
    summary = bench_sweep(config, out=Path("out"))   # rate_<r>/..., sweep.json, sweep.png

This is what `pdserve bench` and the scripts in bench/ call.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.plots import plot_cdfs, plot_sweep
from loadgen.report import format_report, format_sweep, sweep_summary, write_json, write_records
from loadgen.runner import BenchConfig, RunResult, run_bench, run_sweep
from loadgen.stats import phase_samples, summarize
from loadgen.workloads import WorkloadConfig


def report_of(result: RunResult) -> dict[str, Any]:
    return summarize(result.records, result.config.to_json(),
                     {"started_at": result.started_at, "wall_s": result.wall_s})


def measure_capacity(address: str, workload: WorkloadConfig, *, concurrency: int = 8,
                     num_requests: int = 40, seed: int = 0) -> float:
    """Requests/s a closed loop of `concurrency` clients gets: the capacity that load
    fractions (the soak's 70%, the overload bench's 3x) are taken of."""
    result = asyncio.run(run_bench(BenchConfig(
        address=address, seed=seed, workload=workload,
        arrival=ArrivalConfig(kind="concurrency", concurrency=concurrency),
        limits=Limits(num_requests=num_requests, warmup_requests=4))))
    return report_of(result)["throughput"]["requests_per_s"]


def save_run(result: RunResult, report: dict[str, Any], out: Path, *, plots: bool = True
             ) -> list[Path]:
    files = [write_json(report, out / "report.json"),
             write_records(result.records, out / "requests.jsonl")]
    if plots:
        title = f"{result.config.label + ': ' if result.config.label else ''}" \
                f"{result.config.arrival.describe()}"
        files.append(plot_cdfs(phase_samples(result.records), out / "latency_cdf.png", title))
    return files


def bench_once(config: BenchConfig, out: Path | None = None, *, progress: bool = False,
               plots: bool = True, stream: TextIO | None = None) -> dict[str, Any]:
    """Run once, print the table to `stream` (default stdout), write files under `out`."""
    stream = stream or sys.stdout
    result = asyncio.run(run_bench(config, progress=progress))
    report = report_of(result)
    print(format_report(report), file=stream)
    if out is not None:
        files = save_run(result, report, out, plots=plots)
        print(f"wrote {', '.join(str(f) for f in files)}", file=stream)
    return report


def bench_sweep(config: BenchConfig, out: Path | None = None, *, progress: bool = False,
                plots: bool = True, stream: TextIO | None = None) -> dict[str, Any]:
    """One run per rate; each run's report as in bench_once (under out/rate_<r>/), then the
    sweep summary table, `sweep.json` and `sweep.png`."""
    stream = stream or sys.stdout
    runs: list[tuple[float, dict[str, Any], str]] = []

    def on_result(rate: float, result: RunResult) -> None:
        report = report_of(result)
        print(format_report(report), file=stream)
        sub = f"rate_{rate:g}"
        if out is not None:
            save_run(result, report, out / sub, plots=plots)
        runs.append((rate, report, f"{sub}/report.json"))

    asyncio.run(run_sweep(config, progress=progress, on_result=on_result))
    summary = sweep_summary(config.to_json(), runs)
    print(format_sweep(summary), file=stream)
    if out is not None:
        files = [write_json(summary, out / "sweep.json")]
        if plots:
            files.append(plot_sweep(summary, out / "sweep.png", config.label))
        print(f"wrote {', '.join(str(f) for f in files)} and rate_*/", file=stream)
    return summary
