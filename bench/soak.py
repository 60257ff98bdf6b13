"""Soak: hours-long stability in minutes-long pieces. Memory growth, errors and latency drift
at a steady ~70% of measured capacity.

1. Starts a local cluster (default model, 1 prefill + 1 decode, local redis-server when on
   PATH) and measures capacity: throughput of a closed loop at `--capacity-concurrency`.
2. Offers Poisson load at `--load` × capacity for `--minutes`, as consecutive loadgen runs of
   `--window-min` each, sampling every `--sample-s` the RSS of every process of the cluster
   (this driver with the router, each worker actor, redis-server) and the C heap in use of
   each worker (its /metrics).
3. Reports per process the RSS slope and per worker the heap-in-use slope (MB/min, least
   squares over the whole soak, after the first window so warm-up allocation does not count;
   also over each minute's lowest sample, which leaves out the activations of steps in flight),
   errors by status, and P99 TTFT/TPOT of the first and the last window (drift = last /
   first). Target: flat memory, zero errors.

    python -m bench.soak [--minutes 30] [--window-min 5] [--load 0.7] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from bench.common import add_load_args, capacity_rps, random_workload
from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.bench import report_of
from loadgen.report import machine, write_json
from loadgen.runner import BenchConfig, run_bench


class MemorySampler(threading.Thread):
    """Every `every_s`: the RSS (MB) of the given processes, and the C heap in use (MB) of
    the workers, scraped from their /metrics (`pdserve:native_heap_in_use_bytes`). RSS
    growing while the heap in use stays flat is allocator retention, not a leak."""

    def __init__(self, pids: dict[str, int], metrics: dict[str, str], every_s: float):
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.metrics = metrics
        self.every_s = every_s
        self.rss: dict[str, list[tuple[float, float]]] = {n: [] for n in pids}
        self.heap: dict[str, list[tuple[float, float]]] = {n: [] for n in metrics}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            now = time.monotonic()
            for name, proc in self.procs.items():
                try:
                    self.rss[name].append((now, proc.memory_info().rss / 2**20))
                except psutil.Error:  # a dead process is itself a finding: no more samples
                    pass
            for name, address in self.metrics.items():
                heap = scrape_gauge(address, "pdserve:native_heap_in_use_bytes")
                if heap is not None:
                    self.heap[name].append((now, heap / 2**20))
            self.stopped.wait(self.every_s)


def scrape_gauge(address: str, name: str) -> float | None:
    """The value of gauge `name` on the /metrics page at host:port (first sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == name and family.samples:
            return family.samples[0].value
    return None


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mt) * (r - mr) for t, r in points) / var


def floors(points: list[tuple[float, float]], every_s: float = 60.0
           ) -> list[tuple[float, float]]:
    """The lowest sample of each `every_s` bucket. Under load a sample may land mid-step and
    count that step's activations; the floor is what stays allocated between steps, so a leak
    raises it and a large batch does not."""
    buckets: dict[int, tuple[float, float]] = {}
    for t, mb in points:
        k = int(t // every_s)
        if k not in buckets or mb < buckets[k][1]:
            buckets[k] = ((k + 0.5) * every_s, mb)
    return [buckets[k] for k in sorted(buckets)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_args(ap)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--window-min", type=float, default=5.0)
    ap.add_argument("--load", type=float, default=0.7, help="fraction of measured capacity")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--out", default="bench/out/soak.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray

    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig

    workload = random_workload(args)
    with LocalCluster(ClusterConfig(model=args.model, port=0, worker_num_cpus=0.25)) as cluster:
        pids, metrics = {"router+driver": os.getpid()}, {}
        for wid, actor in [*cluster.prefill.items(), *cluster.decode.items()]:
            info = ray.get(actor.ready.remote())
            pids[wid], metrics[wid] = info.pid, info.metrics
        if cluster._redis_proc is not None:
            pids["redis-server"] = cluster._redis_proc.pid

        def run(config: BenchConfig) -> dict[str, Any]:
            return report_of(asyncio.run(run_bench(config)))

        print("soak: measuring capacity ...", file=sys.stderr)
        capacity = capacity_rps(cluster.address, args)
        rate = args.load * capacity
        print(f"soak: capacity {capacity:.2f} req/s; offering {rate:.2f} req/s for "
              f"{args.minutes:g} min", file=sys.stderr)
        sampler = MemorySampler(pids, metrics, args.sample_s)
        sampler.start()
        windows = []
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < args.minutes * 60 - 1:
            report = run(BenchConfig(
                address=cluster.address, seed=args.seed + i, workload=workload,
                arrival=ArrivalConfig(kind="poisson", rate=rate),
                limits=Limits(num_requests=None, duration_s=args.window_min * 60),
                drain_timeout_s=120))
            windows.append(report)
            i += 1
            print(f"soak: window {i}: {report['counts']} errors {report['errors']} "
                  f"TTFT p99 {report['phases']['ttft']['p99']} ms", file=sys.stderr)
        sampler.stopped.set()
        sampler.join()
    skip = args.window_min * 60  # the first window warms caches and allocators up
    def memory(series: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
        out = {}
        for name, points in series.items():
            later = [p for p in points if p[0] - start >= skip] or points
            out[name] = {"first_mb": points[0][1] if points else None,
                         "last_mb": points[-1][1] if points else None,
                         "slope_mb_per_min": slope_mb_per_min(later),
                         "floor_slope_mb_per_min": slope_mb_per_min(floors(later)),
                         "samples": len(points),
                         "series": [(round(t - start, 1), round(mb, 2)) for t, mb in points]}
        return out

    rss, heap = memory(sampler.rss), memory(sampler.heap)
    errors: dict[str, int] = {}
    for w in windows:
        for code, n in w["errors"].items():
            errors[code] = errors.get(code, 0) + n
    first, last = windows[0]["phases"], windows[-1]["phases"]

    def drift(phase: str) -> float | None:
        a, b = first[phase]["p99"], last[phase]["p99"]
        return b / a if a and b else None

    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python -m bench.soak " + " ".join(argv or sys.argv[1:]),
        "capacity_rps": capacity, "offered_rps": rate, "minutes": args.minutes,
        "windows": len(windows),
        "sent": sum(w["counts"]["sent"] for w in windows),
        "errors": errors, "rss": rss, "heap_in_use": heap,
        "p99_ms": {p: {"first": first[p]["p99"], "last": last[p]["p99"], "drift": drift(p)}
                   for p in ("ttft", "tpot", "e2e")},
        "load_avg": os.getloadavg(),
    }
    brief = {k: summary[k] for k in ("capacity_rps", "offered_rps", "sent", "errors", "p99_ms")}
    for kind in ("rss", "heap_in_use"):
        brief[kind] = {name: {k: v for k, v in body.items() if k != "series"}
                       for name, body in summary[kind].items()}
    print(json.dumps(brief, indent=2))
    write_json(summary, Path(args.out))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
