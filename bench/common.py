"""What the cluster-level load benchmarks (soak, overload) share: their options, the random
workload they offer, and the capacity their loads are fractions of."""

from __future__ import annotations

import argparse

from loadgen.bench import measure_capacity
from loadgen.workloads import TrafficClass, WorkloadConfig


def add_load_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None)
    ap.add_argument("--capacity-concurrency", type=int, default=8)
    ap.add_argument("--capacity-requests", type=int, default=40)
    ap.add_argument("--input-len", default="uniform:64:256")
    ap.add_argument("--output-len", default="uniform:8:32")
    ap.add_argument("--seed", type=int, default=0)


def random_workload(args: argparse.Namespace,
                    classes: list[TrafficClass] | None = None) -> WorkloadConfig:
    """Random token prompts within the default model's vocabulary."""
    return WorkloadConfig(kind="random", input_len=args.input_len, output_len=args.output_len,
                          token_id_high=30000, classes=classes or [TrafficClass()])


def capacity_rps(address: str, args: argparse.Namespace) -> float:
    """Requests/s of a closed loop over the plain random workload."""
    return measure_capacity(address, random_workload(args),
                            concurrency=args.capacity_concurrency,
                            num_requests=args.capacity_requests, seed=args.seed)
