"""What a simulation serves: `SimRequest`s from the load generator's own arrival processes and
workloads, or from a `requests.jsonl` trace that `pdserve bench` wrote.

- `from_bench_config`: the open-loop schedule (`loadgen.arrivals.open_loop_schedule`) zipped
  with the workload's request stream (`loadgen.workloads.make_workload`), with the seeds
  `pdserve bench` uses, so a simulation of a bench config sees the same prompts (shared-prefix
  groups included) at the same offsets. Token-id prompts only (random and shared-prefix
  workloads): text and chat need a tokenizer. Closed loops (concurrency) have no schedule.
- `from_trace`: each recorded request at its recorded send time with its recorded prompt and
  output lengths, SLO and class. The trace keeps no token ids, so prompts are fresh random ids
  (no prefix reuse), and a failed request is replayed with the output it got before failing
  (at least one token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.arrivals import ArrivalConfig, Limits, open_loop_schedule
from loadgen.runner import BenchConfig, split_seeds
from loadgen.workloads import WorkloadConfig, make_workload
from pdserve_api.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SimRequest:
    index: int
    arrival_s: float
    token_ids: tuple[int, ...]
    max_tokens: int
    traffic_class: str = "default"
    warmup: bool = False
    ttft_slo_ms: float = 0.0  # 0 = no target
    tpot_slo_ms: float = 0.0
    priority: int = 0


def bench_config_from_json(raw: dict[str, Any]) -> BenchConfig:
    """The `config` of a `pdserve bench` report.json back as a BenchConfig."""
    try:
        return BenchConfig(
            arrival=ArrivalConfig(**raw["arrival"]), rates=list(raw.get("rates") or []),
            limits=Limits(**raw["limits"]), workload=WorkloadConfig(**raw["workload"]),
            seed=int(raw.get("seed", 0)), label=str(raw.get("label", "")))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"not a pdserve bench config: {e}") from e


def from_bench_config(config: BenchConfig) -> list[SimRequest]:
    if not config.arrival.open_loop:
        raise ConfigError("a closed loop (concurrency) has no arrival schedule to simulate; "
                          "use --rate or bursts")
    if config.workload.kind not in ("random", "shared-prefix") \
            or config.workload.prompt_format != "tokens":
        raise ConfigError("the simulator needs token-id prompts: the random (tokens) or "
                          "shared-prefix workloads, or a trace")
    workload_seed, arrival_seed = split_seeds(config.seed)
    arrivals = open_loop_schedule(config.arrival, config.limits, arrival_seed)
    out = []
    for arrival, spec in zip(arrivals, make_workload(config.workload, workload_seed)):
        assert spec.token_ids is not None
        out.append(SimRequest(spec.index, arrival.offset_s, tuple(spec.token_ids),
                              spec.max_tokens, spec.traffic_class, arrival.warmup,
                              spec.ttft_ms, spec.tpot_ms, spec.priority))
    return out


def from_trace(path: str | Path, *, vocab: tuple[int, int] = (16, 300),
               seed: int = 0) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"trace {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            server = r.get("server") or {}
            prompt = int(r.get("input_tokens_sent") or server.get("prompt_tokens") or 0)
            if prompt < 1:
                raise ValueError("no prompt length (input_tokens_sent or server.prompt_tokens)")
            out.append(SimRequest(
                int(r["index"]), float(r["send_s"]),
                tuple(int(t) for t in rng.integers(vocab[0], vocab[1], prompt)),
                max(1, int(r.get("output_tokens") or 0)), str(r.get("traffic_class", "default")),
                bool(r.get("warmup", False)), float(r.get("ttft_slo_ms") or 0.0),
                float(r.get("tpot_slo_ms") or 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"trace {path} line {n}: {e}") from e
    if not out:
        raise ConfigError(f"trace {path} holds no requests")
    return sorted(out, key=lambda s: (s.arrival_s, s.index))
