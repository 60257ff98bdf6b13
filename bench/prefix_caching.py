"""Prefix caching: TTFT with a 90% shared prefix, prefix caching on vs off, same run.

Starts a local cluster (1 prefill + 1 decode worker, in-process prefix index) on the model
twice, first with prefix caching on, then with it off (`engine.enable_prefix_caching`), and
drives both with the same loadgen workload: `--groups` shared prefixes of `--prefix-len`
tokens, each request one group's prefix plus a fresh `--suffix-len`-token suffix (90% shared
by default), closed loop at `--concurrency` (1 by default, so TTFT measures compute rather
than queueing). The first `--groups` requests (one per group, round robin) are warm-up: they
fill the cache in the "on" run and are excluded from both. Prints TTFT P50/P99 of both runs
and the speed-up (off / on); writes each run's loadgen report and a summary JSON.

Usage: python -m bench.prefix_caching [--model PATH] [--requests 24] [--groups 4]
           [--prefix-len 432] [--suffix-len 48] [--output-len 4] [--concurrency 1]
           [--out bench/out/prefix_caching]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Any

from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.bench import report_of, save_run
from loadgen.report import format_report, machine, write_json
from loadgen.runner import BenchConfig, run_bench
from loadgen.workloads import WorkloadConfig


def run_mode(args: argparse.Namespace, caching: bool) -> dict[str, Any]:
    import asyncio

    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig

    engine: dict[str, Any] = {"enable_prefix_caching": caching}
    if args.num_kv_blocks:
        engine["num_kv_blocks"] = args.num_kv_blocks
    cluster_cfg = ClusterConfig(model=args.model, num_prefill=1, num_decode=1,
                                start_redis=False, engine=engine,
                                worker_num_cpus=args.worker_cpus)
    label = f"prefix caching {'on' if caching else 'off'}"
    print(f"prefix_caching: starting a cluster, {label} ...", file=sys.stderr)
    with LocalCluster(cluster_cfg) as cluster:
        config = BenchConfig(
            address=cluster.address, label=label, seed=args.seed,
            arrival=ArrivalConfig(kind="concurrency", concurrency=args.concurrency),
            limits=Limits(num_requests=args.requests, warmup_requests=args.groups),
            workload=WorkloadConfig(kind="shared-prefix", num_groups=args.groups,
                                    prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                                    group_order="round-robin",
                                    output_len=f"fixed:{args.output_len}",
                                    token_id_low=args.token_id_range[0],
                                    token_id_high=args.token_id_range[1]))
        result = asyncio.run(run_bench(config, progress=not args.no_progress))
    report = report_of(result)
    print(format_report(report))
    if args.out:
        save_run(result, report, Path(args.out) / ("on" if caching else "off"),
                 plots=not args.no_plots)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--requests", type=int, default=24, help="measured requests per run")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=432, help="shared tokens (27 blocks)")
    ap.add_argument("--suffix-len", type=int, default=48, help="fresh tokens per request")
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--token-id-range", default="16:300", help="LOW:HIGH, within the vocab")
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--worker-cpus", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/prefix_caching")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    lo, _, hi = args.token_id_range.partition(":")
    args.token_id_range = (int(lo), int(hi))
    logging.basicConfig(level=logging.WARNING)

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():  # once for both clusters
        ray.init(num_cpus=max(os.cpu_count() or 1, 3), include_dashboard=False,
                 logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"UCX_WARN_UNUSED_ENV_VARS": "n"}})
    try:
        on = run_mode(args, caching=True)
        off = run_mode(args, caching=False)
    finally:
        ray.shutdown()

    def ttft(report: dict[str, Any], stat: str) -> float:
        value = report["phases"]["ttft"][stat]
        if value is None:
            raise SystemExit(f"prefix_caching: no successful request in the "
                             f"{report['config']['label']} run; errors {report['errors']}")
        return value

    share = args.prefix_len / (args.prefix_len + args.suffix_len)
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "command": "python -m bench.prefix_caching " + " ".join(argv or sys.argv[1:]),
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "shared_prefix_share": round(share, 3),
        "prompt_tokens": args.prefix_len + args.suffix_len,
        "requests": args.requests, "groups": args.groups, "concurrency": args.concurrency,
        "cached_tokens": {"on": on["tokens"]["cached"], "off": off["tokens"]["cached"]},
        "ttft_ms": {mode: {s: ttft(r, s) for s in ("p50", "p99")}
                    for mode, r in (("on", on), ("off", off))},
        "speedup_p50": ttft(off, "p50") / ttft(on, "p50"),
        "speedup_p99": ttft(off, "p99") / ttft(on, "p99"),
        "errors": {"on": on["errors"], "off": off["errors"]},
    }
    print(f"\nTTFT with a {100 * share:.0f}% shared prefix "
          f"({args.prefix_len}+{args.suffix_len} tokens, concurrency {args.concurrency}):")
    print(f"{'':16}{'P50 ms':>10}{'P99 ms':>10}{'cached tokens':>15}")
    for mode, r in (("caching on", on), ("caching off", off)):
        print(f"{mode:<16}{ttft(r, 'p50'):>10.1f}{ttft(r, 'p99'):>10.1f}"
              f"{r['tokens']['cached']:>15}")
    print(f"{'speed-up (off/on)':<16}{summary['speedup_p50']:>9.2f}x"
          f"{summary['speedup_p99']:>9.2f}x")
    if args.out:
        path = write_json(summary, Path(args.out) / "summary.json")
        print(f"wrote {path} and {args.out}/on, {args.out}/off", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
