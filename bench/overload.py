"""Overload: at 3x capacity, is the excess refused fast with RESOURCE_EXHAUSTED while admitted
requests keep their SLO, and does interactive traffic go before batch?

1. Starts a local cluster (default model, 1 prefill + 1 decode, default router settings) and
   measures capacity: throughput of a closed loop at `--capacity-concurrency`.
2. Offers the same Poisson mix twice, `--minutes` each: at `--baseline-load` x capacity (the
   baseline, in the same run), then at `--load` x capacity. The mix is two traffic classes:
   interactive (priority 10, TTFT SLO `--interactive-ttft-ms`) and batch (priority 0, TTFT
   SLO `--batch-ttft-ms`, twice the weight); both have TPOT SLO `--tpot-ms`. The default
   SLOs suit the default model on a 2 vCPU machine: at saturation a request granted a prefill
   slot waits for the other requests in flight (4 slots) to be batched with it, about 2.5 s
   from grant to first token there, so a 3 s interactive SLO could not be kept at any load
   above one request at a time. Set them for your machine and model.
3. Reports per phase and class: sent, admitted, refused with RESOURCE_EXHAUSTED (and how fast:
   P50/P99 of send to refusal), other errors, SLO attainment of the admitted requests, their
   TTFT P50/P99 and TPOT P99; and the overload / baseline ratios.

    python -m bench.overload [--minutes 3] [--load 3] [--baseline-load 0.7] [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bench.common import add_load_args, capacity_rps, random_workload
from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.record import RequestRecord
from loadgen.report import machine, write_json
from loadgen.runner import BenchConfig, run_bench
from loadgen.stats import summarize, summarize_values
from loadgen.workloads import TrafficClass

REFUSED = "RESOURCE_EXHAUSTED"


def class_figures(summary: dict[str, Any], records: list[RequestRecord]) -> dict[str, Any]:
    """One traffic class of one phase: its loadgen summary (`loadgen.stats.summarize`), plus
    what that leaves out: how fast refusals came, and SLO attainment among the admitted."""
    counts, errors, phases = summary["counts"], summary["errors"], summary["phases"]
    refused = errors.get(REFUSED, 0)
    refusal_ms = summarize_values([(r.end_s - r.send_s) * 1e3 for r in records
                                   if not r.warmup and r.status == REFUSED])
    return {
        "sent": counts["sent"], "admitted": counts["succeeded"], "refused": refused,
        "other_errors": sorted(set(errors) - {REFUSED}),
        "num_other_errors": counts["errored"] - refused,
        "refused_share": refused / counts["sent"] if counts["sent"] else None,
        "refusal_ms": {"p50": refusal_ms["p50"], "p99": refusal_ms["p99"],
                       "max": refusal_ms["max"]},
        "admitted_slo_attainment": (summary["goodput"]["requests"] / counts["succeeded"]
                                    if counts["succeeded"] else None),
        "goodput_rps": summary["goodput"]["requests_per_s"],
        "ttft_ms": {"p50": phases["ttft"]["p50"], "p99": phases["ttft"]["p99"]},
        "tpot_ms": {"p99": phases["tpot"]["p99"]},
    }


def phase_figures(records: list[RequestRecord]) -> dict[str, Any]:
    report = summarize(records, {})
    out = {"all": class_figures(report, records)}
    for name, summary in report["classes"].items():
        out[name] = class_figures(summary, [r for r in records if r.traffic_class == name])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_args(ap)
    ap.add_argument("--minutes", type=float, default=3.0, help="per phase")
    ap.add_argument("--load", type=float, default=3.0, help="overload, x capacity")
    ap.add_argument("--baseline-load", type=float, default=0.7)
    ap.add_argument("--interactive-ttft-ms", type=float, default=5000)
    ap.add_argument("--batch-ttft-ms", type=float, default=15000)
    ap.add_argument("--tpot-ms", type=float, default=300)
    ap.add_argument("--out", default="bench/out/overload.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig

    mix = random_workload(args, [
        TrafficClass(name="interactive", weight=1, priority=10,
                     ttft_ms=args.interactive_ttft_ms, tpot_ms=args.tpot_ms),
        TrafficClass(name="batch", weight=2, priority=0, ttft_ms=args.batch_ttft_ms,
                     tpot_ms=args.tpot_ms)])
    phases: dict[str, Any] = {}
    with LocalCluster(ClusterConfig(model=args.model, port=0, worker_num_cpus=0.25)) as cluster:
        print("overload: measuring capacity ...", file=sys.stderr)
        capacity = capacity_rps(cluster.address, args)
        for i, (name, load) in enumerate([("baseline", args.baseline_load),
                                          ("overload", args.load)]):
            rate = load * capacity
            print(f"overload: {name}: {rate:.2f} req/s ({load:g} x {capacity:.2f}) for "
                  f"{args.minutes:g} min", file=sys.stderr)
            result = asyncio.run(run_bench(BenchConfig(
                address=cluster.address, seed=args.seed + 1 + i, workload=mix,
                arrival=ArrivalConfig(kind="poisson", rate=rate),
                limits=Limits(num_requests=None, duration_s=args.minutes * 60),
                drain_timeout_s=120)))
            phases[name] = {"load": load, "offered_rps": rate,
                            **phase_figures(result.records)}
            print(f"overload: {name}: {json.dumps(phases[name]['all'])}", file=sys.stderr)
    base, over = phases["baseline"], phases["overload"]
    ratios = {}
    for cls in ("all", "interactive", "batch"):
        ratios[cls] = {
            "ttft_p99": _ratio(over[cls]["ttft_ms"]["p99"], base[cls]["ttft_ms"]["p99"]),
            "tpot_p99": _ratio(over[cls]["tpot_ms"]["p99"], base[cls]["tpot_ms"]["p99"]),
            "goodput": _ratio(over[cls]["goodput_rps"], base[cls]["goodput_rps"]),
        }
    summary = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python -m bench.overload " + " ".join(argv or sys.argv[1:]),
        "capacity_rps": capacity, "minutes_per_phase": args.minutes,
        "slo": {"interactive_ttft_ms": args.interactive_ttft_ms,
                "batch_ttft_ms": args.batch_ttft_ms, "tpot_ms": args.tpot_ms},
        "phases": phases, "overload_over_baseline": ratios,
        "load_avg": os.getloadavg(),
    }
    print(json.dumps({k: summary[k] for k in ("capacity_rps", "phases",
                                               "overload_over_baseline")}, indent=2))
    write_json(summary, Path(args.out))
    other = sum(p["all"]["num_other_errors"] for p in phases.values())
    return 0 if other == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
