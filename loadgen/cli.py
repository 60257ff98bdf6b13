"""`pdserve bench`: the load generator's command line (a thin layer over loadgen.bench).

    pdserve bench --address HOST:PORT [--rate R | --concurrency C | --burst N | --sweep R1,R2]
                  [--num-requests N] [--duration S] [--warmup N | --warmup-s S] [--seed S]
                  [--workload random|shared-prefix|sharegpt] [workload options]
                  [--traffic-class NAME:key=value,...]... [--out DIR]
    pdserve bench compare A.json B.json

`add_bench_parser(subparsers)` adds both to a parent argparse parser; each sets `func`, which
takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.backends import BACKENDS
from loadgen.bench import bench_once, bench_sweep
from loadgen.distributions import LengthDist
from loadgen.record import BackendError
from loadgen.report import format_compare, load_report
from loadgen.runner import BenchConfig
from loadgen.workloads import GROUP_ORDERS, WORKLOAD_KINDS, TrafficClass, WorkloadConfig

DEFAULT_NUM_REQUESTS = 100
EXIT_ERROR, EXIT_USAGE = 1, 2


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated rates, "
                                         "e.g. 1,2,4") from None
    if not rates:
        raise argparse.ArgumentTypeError("--sweep needs at least one rate")
    return rates


def _dist(text: str) -> str:
    try:
        return str(LengthDist.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _token_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW:HIGH, e.g. 16:300") from None


def _traffic_class(text: str) -> TrafficClass:
    try:
        return TrafficClass.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="load-test a running cluster: per-phase latency percentiles, "
                      "throughput, goodput under SLO",
        description="Drive a running pdserve router and report P50/P90/P95/P99 per phase, "
                    "throughput, SLO attainment and goodput, and errors by status code. "
                    "`pdserve bench compare A.json B.json` compares two reports.")
    p.set_defaults(func=cmd_bench)
    p.add_argument("--address", help="HOST:PORT of the router's gRPC API (required for a run)")
    p.add_argument("--backend", default="grpc", choices=BACKENDS)
    p.add_argument("--channels", type=int, default=1,
                   help="gRPC connections to spread requests over (default 1)")

    arr = p.add_argument_group("arrivals (default: poisson at 1 req/s)")
    mode = arr.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="poisson arrivals at this many requests/s")
    mode.add_argument("--concurrency", type=int,
                      help="closed loop: keep this many requests in flight")
    mode.add_argument("--burst", type=int, metavar="N",
                      help="send N requests at once every --burst-interval seconds")
    mode.add_argument("--sweep", type=_rates, metavar="R1,R2,...",
                      help="one poisson run per rate; adds sweep.json/sweep.png")
    arr.add_argument("--burst-interval", type=float, default=1.0, metavar="S")
    arr.add_argument("--num-requests", type=int, default=None,
                     help=f"measured requests per run (default {DEFAULT_NUM_REQUESTS} "
                          "unless --duration is given)")
    arr.add_argument("--duration", type=float, default=None, metavar="S",
                     help="stop sending this many seconds after the warm-up")
    warm = arr.add_mutually_exclusive_group()
    warm.add_argument("--warmup", type=int, default=0, metavar="N",
                      help="first N requests are warm-up, excluded from the statistics")
    warm.add_argument("--warmup-s", type=float, default=0.0, metavar="S",
                      help="requests sent in the first S seconds are warm-up")
    arr.add_argument("--seed", type=int, default=0, help="seeds arrivals and workload")
    arr.add_argument("--request-timeout", type=float, default=None, metavar="S",
                     help="deadline per request (counted as DEADLINE_EXCEEDED)")
    arr.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                     help="after the last send, wait at most S seconds, then cancel the rest "
                          "(counted as CANCELLED); default: wait for all")

    wl = p.add_argument_group("workload")
    wl.add_argument("--workload", default="random", choices=WORKLOAD_KINDS)
    wl.add_argument("--input-len", type=_dist, default="uniform:32:256", metavar="DIST",
                    help="prompt tokens (random): fixed:N | uniform:LO:HI | "
                         "normal:MEAN:STD[:LO:HI] | lognormal:MEAN:SIGMA[:LO:HI] "
                         "(default uniform:32:256)")
    wl.add_argument("--output-len", type=_dist, default="uniform:8:64", metavar="DIST",
                    help="output tokens, same forms (default uniform:8:64)")
    wl.add_argument("--prompt-format", default="tokens", choices=["tokens", "text"],
                    help="random prompts as token ids (exact lengths) or words")
    wl.add_argument("--token-id-range", type=_token_range, default=(16, 300),
                    metavar="LOW:HIGH", help="random token ids in [LOW, HIGH); HIGH must not "
                                             "exceed the model's vocabulary (default 16:300)")
    wl.add_argument("--num-groups", type=int, default=4, help="shared-prefix: groups")
    wl.add_argument("--prefix-len", type=int, default=256,
                    help="shared-prefix: tokens shared by a group")
    wl.add_argument("--suffix-len", type=int, default=32,
                    help="shared-prefix: fresh tokens per request")
    wl.add_argument("--group-order", default="random", choices=GROUP_ORDERS)
    wl.add_argument("--dataset", help="sharegpt: path to a ShareGPT-format JSON file")
    wl.add_argument("--output-cap", type=int, default=256,
                    help="sharegpt: most output tokens per request")
    wl.add_argument("--max-prompt-chars", type=int, default=None,
                    help="sharegpt: skip conversations with longer prompts")
    wl.add_argument("--temperature", type=float, default=0.0)
    wl.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly the output length asked for (default on)")
    wl.add_argument("--ttft-ms", type=float, default=0.0,
                    help="TTFT SLO of the default class (0 = none)")
    wl.add_argument("--tpot-ms", type=float, default=0.0,
                    help="TPOT SLO of the default class (0 = none)")
    wl.add_argument("--priority", type=int, default=0, help="priority of the default class")
    wl.add_argument("--traffic-class", type=_traffic_class, action="append", default=None,
                    metavar="NAME:key=value,...",
                    help="a traffic class (repeat for a mix; replaces the default class): keys "
                         "weight, ttft_ms, tpot_ms, priority, input_len, output_len, e.g. "
                         "chat:weight=3,ttft_ms=500,tpot_ms=100,priority=1")

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("pdserve-bench"), metavar="DIR",
                     help="where report.json, requests.jsonl and plots go "
                          "(default ./pdserve-bench)")
    out.add_argument("--label", default="", help="a name for this run in reports")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-progress", action="store_true")

    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    cmp = sub.add_parser("compare", help="two reports side by side, with ratios B/A")
    cmp.add_argument("a", type=Path, metavar="A.json")
    cmp.add_argument("b", type=Path, metavar="B.json")
    cmp.set_defaults(func=cmd_compare)
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError with a message for the user on a bad combination."""
    if args.sweep:
        arrival = ArrivalConfig(kind="poisson", rate=args.sweep[0])
    elif args.concurrency is not None:
        arrival = ArrivalConfig(kind="concurrency", concurrency=args.concurrency)
    elif args.burst is not None:
        arrival = ArrivalConfig(kind="burst", burst_size=args.burst,
                                burst_interval_s=args.burst_interval)
    else:
        arrival = ArrivalConfig(kind="poisson", rate=1.0 if args.rate is None else args.rate)
    num = args.num_requests
    if num is None and args.duration is None:
        num = DEFAULT_NUM_REQUESTS
    classes = args.traffic_class or [TrafficClass(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms,
                                                  priority=args.priority)]
    if args.traffic_class and (args.ttft_ms or args.tpot_ms or args.priority):
        raise ValueError("--ttft-ms/--tpot-ms/--priority set the default class; with "
                         "--traffic-class give them per class instead")
    workload = WorkloadConfig(
        kind=args.workload, input_len=args.input_len, output_len=args.output_len,
        prompt_format=args.prompt_format, token_id_low=args.token_id_range[0],
        token_id_high=args.token_id_range[1], num_groups=args.num_groups,
        prefix_len=args.prefix_len, suffix_len=args.suffix_len, group_order=args.group_order,
        dataset=args.dataset, output_cap=args.output_cap,
        max_prompt_chars=args.max_prompt_chars, classes=classes,
        temperature=args.temperature, ignore_eos=args.ignore_eos)
    return BenchConfig(
        address=args.address, backend=args.backend, arrival=arrival, rates=args.sweep or [],
        limits=Limits(num_requests=num, duration_s=args.duration,
                      warmup_requests=args.warmup, warmup_s=args.warmup_s),
        workload=workload, seed=args.seed, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout, channels=args.channels, label=args.label)


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.address:
        print("pdserve bench: error: --address HOST:PORT is required (the router of a running "
              "cluster, e.g. from `pdserve up`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    run = bench_sweep if config.rates else bench_once
    try:
        result = run(config, args.out, progress=not args.no_progress, plots=not args.no_plots)
    except BackendError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:  # e.g. an unreadable dataset
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # asyncio.run has cancelled the requests in flight
        print("pdserve bench: interrupted; no report written for the unfinished run",
              file=sys.stderr)
        return 130
    runs = result["runs"] if config.rates else [{"sent": result["counts"]["sent"],
                                                 "errored": result["counts"]["errored"]}]
    if any(r["sent"] and r["errored"] == r["sent"] for r in runs):
        print("pdserve bench: every request of a run failed; see the errors above",
              file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        a, b = load_report(args.a), load_report(args.b)
    except ValueError as e:
        print(f"pdserve bench compare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_compare(a, b, args.a.stem if args.a.stem != "report" else str(args.a.parent),
                         args.b.stem if args.b.stem != "report" else str(args.b.parent)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m loadgen.cli bench ...` until `pdserve bench` is wired in."""
    parser = argparse.ArgumentParser(prog="loadgen")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
