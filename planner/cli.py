"""`pdserve profile` and `pdserve simulate`: the command-line layer over planner/profile.py
(and a live router's `GET /v1/timing_profile`, router/openai_http.py) and
planner/simulator.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from loadgen.arrivals import ArrivalConfig
from loadgen.report import format_report, write_json, write_records
from loadgen.runner import BenchConfig
from loadgen.stats import summarize
from loadgen.workloads import TrafficClass, WorkloadConfig
from planner.plan import plan
from planner.profile import SweepGrid, run_sweep
from planner.sim_inputs import SimRequest, bench_config_from_json, from_bench_config, from_trace
from planner.simulator import SimConfig, simulate
from router.timing_profile import LinearModel, Profile


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def add_profile_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("profile", help="measure this hardware's prefill, decode, mixed-step "
                                       "and KV transfer times; write a profile JSON")
    p.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-mib", type=int, default=None,
                   help="KV pool memory per worker (sets the profile's pool size)")
    p.add_argument("--out", default="profile.json", help="where to write the profile")
    p.add_argument("--from-cluster", default=None, metavar="HTTP_ADDRESS",
                   help="take the profile from a running router's learnt timing models "
                        "(its OpenAI-compatible HTTP address, e.g. 127.0.0.1:8000; API key: "
                        "$PDSERVE_API_KEY) instead of a sweep")
    defaults = SweepGrid()
    for name, help_ in (("prefill_tokens", "uncached prompt tokens"),
                        ("cached_tokens", "cached prefix lengths"),
                        ("batch_sizes", "decode batch sizes"),
                        ("contexts", "context per decoding sequence"),
                        ("mixed_chunks", "prefill chunks riding with decodes"),
                        ("transfer_blocks", "KV blocks per timed transfer")):
        p.add_argument("--" + name.replace("_", "-"), type=_ints, default=getattr(defaults, name),
                       help=f"{help_} (default {','.join(map(str, getattr(defaults, name)))})")
    p.add_argument("--repeats", type=int, default=defaults.repeats)
    p.add_argument("--transports", default=None,
                   help="comma-separated KV transports to time (default: every available)")
    p.set_defaults(func=cmd_profile)


def fetch_cluster_profile(address: str, api_key: str | None = None,
                          timeout_s: float = 10.0) -> Profile:
    url = address if "://" in address else f"http://{address}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/timing_profile")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return Profile.from_json(resp.read().decode())


def cmd_profile(args: argparse.Namespace) -> int:
    if args.from_cluster:
        profile = fetch_cluster_profile(args.from_cluster, os.environ.get("PDSERVE_API_KEY"))
    else:
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              block_size=args.block_size)
        if args.kv_cache_mib:
            config.kv_cache_memory_bytes = args.kv_cache_mib * 2**20
        grid = SweepGrid(prefill_tokens=args.prefill_tokens, cached_tokens=args.cached_tokens,
                         batch_sizes=args.batch_sizes, contexts=args.contexts,
                         mixed_chunks=args.mixed_chunks, transfer_blocks=args.transfer_blocks,
                         repeats=args.repeats,
                         transports=tuple(args.transports.split(",")) if args.transports
                         else None)
        profile = run_sweep(config, grid,
                            progress=lambda msg: print(f"pdserve: {msg}", file=sys.stderr))
    Path(args.out).write_text(profile.to_json())
    print(summary(profile))
    print(f"pdserve: profile written to {args.out}", file=sys.stderr)
    return 0


def summary(profile: Profile) -> str:
    """One line per fitted model: its terms, and its fit error."""
    models: dict[str, LinearModel | None] = {
        "prefill": profile.prefill, "decode": profile.decode, "mixed": profile.mixed,
        **{f"transfer:{k}": m for k, m in profile.transfer.items()}}
    lines = [f"profile of {profile.model} ({profile.source}; {profile.hardware or 'unknown'}); "
             f"KV pool {profile.kv_pool_blocks} blocks of {profile.block_size} tokens"]
    for name, m in models.items():
        if m is None:
            continue
        terms = " + ".join(f"{c:.3g}" + ("" if f == "1" else f"*{f}")
                           for f, c in zip(m.features, m.coef))
        worst = "" if m.max_rel_error is None else f", max {m.max_rel_error:.1%}"
        lines.append(f"  {name:<14} s = {terms}   (held-out error {m.rel_rmse:.1%}{worst}, "
                     f"{m.n_points} points)")
    return "\n".join(lines)


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="a profile JSON (`pdserve profile`)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV pool per worker in blocks (default: the profile's)")
    p.add_argument("--transport", default=None, help="the profile's transfer model to use")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int,
                   default=EngineConfig.max_num_batched_tokens)


def _add_workload_args(p: argparse.ArgumentParser, *, trace: bool) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bench-config", type=Path, metavar="REPORT.json",
                     help="the arrivals and workload of a `pdserve bench` report's config "
                          "(same seed: the same prompts at the same times)")
    if trace:
        src.add_argument("--trace", type=Path, metavar="REQUESTS.jsonl",
                         help="replay a `pdserve bench` requests.jsonl (lengths, send times)")
    p.add_argument("--rate", type=float, default=None,
                   help="poisson arrivals at this rate (overrides --bench-config's arrivals)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--workload", default="random", choices=["random", "shared-prefix"],
                   help="without --bench-config")
    p.add_argument("--input-len", default="uniform:32:256", help="without --bench-config")
    p.add_argument("--output-len", default="uniform:8:64", help="without --bench-config")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix")
    p.add_argument("--suffix-len", type=int, default=32, help="shared-prefix")
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="TTFT SLO (0: none)")
    p.add_argument("--tpot-ms", type=float, default=0.0, help="TPOT SLO (0: none)")
    p.add_argument("--seed", type=int, default=0)


def add_simulate_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("simulate", help="simulate a cluster on a profile: the report of "
                                        "`pdserve bench`, without running the model")
    _add_cluster_args(p)
    _add_workload_args(p, trace=True)
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--colocated", type=int, default=0, help="N colocated workers instead")
    p.add_argument("--out", type=Path, default=Path("pdserve-sim"), metavar="DIR",
                   help="where report.json and requests.jsonl go (default ./pdserve-sim)")
    p.add_argument("--label", default="")
    p.set_defaults(func=cmd_simulate)


def add_plan_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plan", help="search colocated and every P:D split of N devices for "
                                    "the highest goodput per device within the SLO")
    _add_cluster_args(p)
    _add_workload_args(p, trace=False)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--attainment", type=float, default=0.9,
                   help="share of requests that must meet the SLO (default 0.9)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the table and recommendation as JSON")
    p.set_defaults(func=cmd_plan)


def _bench_config(args: argparse.Namespace) -> BenchConfig:
    if args.bench_config:
        raw = json.loads(args.bench_config.read_text())
        bench = bench_config_from_json(raw.get("config", raw))
    else:
        bench = BenchConfig(seed=args.seed, workload=WorkloadConfig(
            kind=args.workload, input_len=args.input_len, output_len=args.output_len,
            prefix_len=args.prefix_len, suffix_len=args.suffix_len, num_groups=args.num_groups,
            classes=[TrafficClass(ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms)]))
    if args.rate is not None:
        bench.arrival = ArrivalConfig(kind="poisson", rate=args.rate)
    if args.num_requests is not None:
        bench.limits = dataclasses.replace(bench.limits, num_requests=args.num_requests)
    return bench


def _sim_config(args: argparse.Namespace, **workers: int) -> SimConfig:
    profile = Profile.from_json(Path(args.profile).read_text())
    engine = EngineConfig(block_size=profile.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    return SimConfig(profile, engine=engine, num_kv_blocks=args.kv_blocks,
                     transport=args.transport, **workers)


def _requests(args: argparse.Namespace) -> tuple[list[SimRequest], dict[str, Any]]:
    """The simulated requests and the run's config as a bench report records it."""
    if args.trace:
        reqs = from_trace(args.trace, seed=args.seed)
        return reqs, {"arrival": {"kind": f"trace {args.trace}"},
                      "workload": {"kind": "trace"}, "seed": args.seed}
    bench = _bench_config(args)
    return from_bench_config(bench), bench.to_json()


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _sim_config(args, num_prefill=args.prefill, num_decode=args.decode,
                         num_colocated=args.colocated)
    reqs, run_config = _requests(args)
    records = simulate(config, reqs)
    run_config["label"] = args.label or f"simulated {config.describe()}"
    run_config["simulation"] = {"profile": args.profile, "cluster": config.describe(),
                                "devices": config.devices, "kv_blocks": config.num_kv_blocks}
    report = summarize(records, run_config, {"simulated": True})
    print(format_report(report))
    files = [write_json(report, args.out / "report.json"),
             write_records(records, args.out / "requests.jsonl")]
    print(f"wrote {', '.join(map(str, files))}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    result = plan(_sim_config(args, num_colocated=1), _bench_config(args), args.devices,
                  attainment=args.attainment)
    print(result.table())
    if args.json:
        write_json(result.to_json(), args.json)
    return 0
