"""Disaggregated vs colocated serving: goodput under an SLO, same workload, same hardware.

Starts a local cluster twice on the same model and machine: `--workers` colocated workers
(the engine's colocated mode behind the same router), then the same number of workers split
into prefill and decode pools (`--prefill`, default half). Both get the same seeded Poisson
sweep over `--rates` (loadgen), the same prompts and the same SLO (`--ttft-ms`, `--tpot-ms`);
goodput is requests/s that met both. Prints both sweeps and, per rate, the goodput ratio
(disaggregated / colocated); writes every loadgen report plus a summary JSON.

Every measured run sends prompts not sent before: rate i of the sweep uses seed `--seed` + i
(same prompts for both setups at that rate), so no rate is served from the prefix cache the
rate before it filled.

    python -m bench.pd_vs_colocated [--model PATH] [--workers 2] [--rates 0.5,1,2]
        [--requests 40] [--ttft-ms 2000] [--tpot-ms 200] [--input-len uniform:128:512]
        [--output-len uniform:16:64] [--cpus-per-worker 1] [--device cuda --worker-gpus 1]

On a GPU box give each worker a GPU (`--device cuda --worker-gpus 1`): that is the setting
disaggregation is for (prefill bursts no longer stall the decode batch, so TPOT holds while
TTFT stays low). On a CPU box, `--cpus-per-worker N` makes each worker own N cores (isolated
workers, worker_host/placement.py), the CPU stand-in for a device per worker; without it every
worker shares every core, so a prefill slows the decode worker as much as a colocated one and
the comparison shows only the cost of the KV transfer and the second engine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Any

from loadgen.arrivals import Limits
from loadgen.bench import report_of, save_run
from loadgen.report import format_sweep, machine, sweep_summary, write_json
from loadgen.runner import BenchConfig, run_bench
from loadgen.workloads import TrafficClass, WorkloadConfig


def run_mode(args: argparse.Namespace, disaggregated: bool) -> dict[str, Any]:
    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig

    engine: dict[str, Any] = {"device": args.device, "dtype": args.dtype}
    if disaggregated:
        prefill = args.prefill or max(1, args.workers // 2)
        pools = {"num_prefill": prefill, "num_decode": args.workers - prefill}
        name = f"disaggregated {prefill}P+{args.workers - prefill}D"
    else:
        pools = {"num_prefill": 0, "num_decode": 0, "num_colocated": args.workers}
        name = f"colocated x{args.workers}"
    cfg = ClusterConfig(model=args.model, start_redis=False, engine=engine,
                        worker_num_cpus=args.worker_cpus, worker_num_gpus=args.worker_gpus,
                        cpus_per_worker=args.cpus_per_worker, **pools)
    print(f"pd_vs_colocated: starting {name} ...", file=sys.stderr)
    runs: list[tuple[float, dict[str, Any], str]] = []
    out = Path(args.out) / ("disaggregated" if disaggregated else "colocated")
    with LocalCluster(cfg) as cluster:
        config = BenchConfig(
            address=cluster.address, label=name, seed=args.seed,
            rates=args.rates, limits=Limits(num_requests=args.requests,
                                            warmup_requests=args.warmup),
            workload=WorkloadConfig(
                kind="random", input_len=args.input_len, output_len=args.output_len,
                token_id_low=16, token_id_high=args.token_id_high,
                classes=[TrafficClass(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms)]),
            request_timeout_s=args.request_timeout_s)

        for i, rate in enumerate(args.rates):
            # A seed of its own per rate: prompts the cluster has not cached yet.
            run = dataclasses.replace(config, seed=args.seed + i).for_rate(rate)
            if not args.no_progress:
                print(f"loadgen: rate {rate:g} req/s (seed {run.seed})", file=sys.stderr)
            result = asyncio.run(run_bench(run, progress=not args.no_progress))
            report = report_of(result)
            save_run(result, report, out / f"rate_{rate:g}", plots=not args.no_plots)
            runs.append((rate, report, f"rate_{rate:g}/report.json"))
    summary = sweep_summary(config.to_json(), runs)
    summary["name"] = name
    print(f"\n{name}\n{format_sweep(summary)}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--workers", type=int, default=2, help="workers in each setup")
    ap.add_argument("--prefill", type=int, default=None,
                    help="prefill workers of the disaggregated setup (default: half)")
    ap.add_argument("--rates", default="0.5,1,2", help="offered requests/s, comma separated")
    ap.add_argument("--requests", type=int, default=40, help="measured requests per rate")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--input-len", default="uniform:128:512")
    ap.add_argument("--output-len", default="uniform:16:64")
    ap.add_argument("--token-id-high", type=int, default=30000,
                    help="prompt token ids are drawn below this (keep it under the vocab)")
    ap.add_argument("--ttft-ms", type=float, default=2000.0, help="the SLO both are held to")
    ap.add_argument("--tpot-ms", type=float, default=200.0)
    ap.add_argument("--request-timeout-s", type=float, default=300.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--worker-cpus", type=float, default=0.25,
                    help="Ray CPUs per worker when they share cores (no --cpus-per-worker)")
    ap.add_argument("--cpus-per-worker", type=int, default=0, metavar="N",
                    help="isolated workers: each owns N cores (pinned), as `pdserve up`")
    ap.add_argument("--worker-gpus", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/pd_vs_colocated")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",")]
    if args.workers < 2:
        ap.error("--workers must be >= 2 (a prefill and a decode worker)")
    logging.basicConfig(level=logging.WARNING)

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():  # once for both clusters
        ray.init(num_cpus=max(os.cpu_count() or 1,
                              args.workers * max(1, args.cpus_per_worker) + 1),
                 include_dashboard=False,
                 logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"UCX_WARN_UNUSED_ENV_VARS": "n"}})
    try:
        colocated = run_mode(args, disaggregated=False)
        disaggregated = run_mode(args, disaggregated=True)
    finally:
        ray.shutdown()

    rows = []
    print(f"\ngoodput (requests/s meeting TTFT <= {args.ttft_ms:g} ms and TPOT <= "
          f"{args.tpot_ms:g} ms)")
    print(f"{'rate':>8}{'colocated':>12}{'disagg.':>12}{'ratio':>8}")
    for c, d in zip(colocated["runs"], disaggregated["runs"]):
        ratio = d["goodput_rps"] / c["goodput_rps"] if c["goodput_rps"] else None
        rows.append({"rate": c["rate"], "colocated_goodput_rps": c["goodput_rps"],
                     "disaggregated_goodput_rps": d["goodput_rps"], "ratio": ratio})
        print(f"{c['rate']:>8g}{c['goodput_rps']:>12.3f}{d['goodput_rps']:>12.3f}"
              f"{'-' if ratio is None else f'{ratio:.2f}':>8}")
    best = {name: max(r["goodput_rps"] for r in s["runs"])
            for name, s in (("colocated", colocated), ("disaggregated", disaggregated))}
    print(f"best goodput: colocated {best['colocated']:.3f}, disaggregated "
          f"{best['disaggregated']:.3f} req/s")
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_avg": os.getloadavg(),
        "command": "python -m bench.pd_vs_colocated " + " ".join(argv or sys.argv[1:]),
        "slo": {"ttft_ms": args.ttft_ms, "tpot_ms": args.tpot_ms},
        "per_rate": rows, "best_goodput_rps": best,
        "colocated": colocated, "disaggregated": disaggregated,
    }
    path = write_json(summary, Path(args.out) / "summary.json")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
