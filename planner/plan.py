"""`pdserve plan`: which deployment of N devices serves a workload best within its SLO.

Candidates: colocated ×N and every P:D split with P + D = N (one device a worker: TP 1; a
profile describes one worker). For each, `max_rate` searches the highest Poisson arrival rate
whose simulated SLO attainment (planner/simulator.py, on the workload's own prompts) is at
least `attainment`: doubling from `start_rate` until it fails, then bisecting. The candidate's
score is the goodput at that rate per device. The recommendation is the best score; a tie
within `tie_tolerance` goes to colocation (fewer moving parts, no KV transfer), so P/D is
recommended only where it wins clearly.

Deterministic: the same workload seed gives every candidate and rate the same prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from loadgen.arrivals import ArrivalConfig
from loadgen.runner import BenchConfig
from loadgen.stats import summarize
from pdserve_api.errors import ConfigError
from planner.sim_inputs import from_bench_config
from planner.simulator import SimConfig, simulate


@dataclass(frozen=True)
class Candidate:
    colocated: int = 0
    prefill: int = 0
    decode: int = 0

    @property
    def devices(self) -> int:
        return self.colocated or self.prefill + self.decode

    def describe(self) -> str:
        return f"colocated x{self.colocated}" if self.colocated \
            else f"{self.prefill}P:{self.decode}D"


@dataclass
class Outcome:
    candidate: Candidate
    max_rate: float  # requests/s offered at the best rate within the SLO (0: none)
    goodput: float  # requests/s meeting the SLO at that rate
    attainment: float | None
    ttft_p99_ms: float | None
    tpot_p99_ms: float | None

    @property
    def goodput_per_device(self) -> float:
        return self.goodput / self.candidate.devices

    def to_json(self) -> dict[str, Any]:
        return {"config": self.candidate.describe(), **dataclasses.asdict(self.candidate),
                "max_rate": self.max_rate, "goodput": self.goodput,
                "goodput_per_device": self.goodput_per_device, "attainment": self.attainment,
                "ttft_p99_ms": self.ttft_p99_ms, "tpot_p99_ms": self.tpot_p99_ms}


def candidates(devices: int) -> list[Candidate]:
    if devices < 1:
        raise ConfigError(f"a plan needs at least one device, got {devices}")
    return [Candidate(colocated=devices)] + [Candidate(prefill=p, decode=devices - p)
                                             for p in range(1, devices)]


def _run(base: SimConfig, cand: Candidate, bench: BenchConfig, rate: float) -> dict[str, Any]:
    bench = dataclasses.replace(bench, arrival=ArrivalConfig(kind="poisson", rate=rate))
    config = dataclasses.replace(base, num_colocated=cand.colocated, num_prefill=cand.prefill,
                                 num_decode=cand.decode, transport=base.transport)
    return summarize(simulate(config, from_bench_config(bench)), bench.to_json())


def max_rate(base: SimConfig, cand: Candidate, bench: BenchConfig, *, attainment: float,
             start_rate: float = 1.0, steps: int = 7, max_doublings: int = 20) -> Outcome:
    def ok(report: dict[str, Any]) -> bool:
        got = report["slo_attainment"]["both"]
        return got is not None and got >= attainment

    best: tuple[float, dict[str, Any]] | None = None
    lo, hi = 0.0, start_rate
    for _ in range(max_doublings):
        report = _run(base, cand, bench, hi)
        if not ok(report):
            break
        best, lo, hi = (hi, report), hi, hi * 2
    else:
        raise ConfigError(f"{cand.describe()} holds the SLO beyond {lo:g} req/s: the profile "
                          "or workload is degenerate (zero step times?)")
    for _ in range(steps):
        mid = (lo + hi) / 2
        report = _run(base, cand, bench, mid)
        if ok(report):
            best, lo = (mid, report), mid
        else:
            hi = mid
    if best is None:
        return Outcome(cand, 0.0, 0.0, None, None, None)
    rate, report = best
    return Outcome(cand, rate, report["goodput"]["requests_per_s"],
                   report["slo_attainment"]["both"], report["phases"]["ttft"]["p99"],
                   report["phases"]["tpot"]["p99"])


@dataclass
class Plan:
    outcomes: list[Outcome]
    best: Outcome | None
    disaggregate: bool

    def to_json(self) -> dict[str, Any]:
        return {"outcomes": [o.to_json() for o in self.outcomes],
                "recommendation": None if self.best is None else {
                    "disaggregate": self.disaggregate, **self.best.to_json()}}

    def table(self) -> str:
        head = (f"{'config':<16}{'max req/s':>10}{'goodput':>9}{'per device':>11}"
                f"{'TTFT p99':>10}{'TPOT p99':>10}{'SLO met':>9}")
        lines = [head, "-" * len(head)]
        for o in self.outcomes:
            met = "-" if o.attainment is None else f"{100 * o.attainment:.1f}%"
            ms = [("-" if v is None else f"{v:.0f}") for v in (o.ttft_p99_ms, o.tpot_p99_ms)]
            lines.append(f"{o.candidate.describe():<16}{o.max_rate:>10.3g}{o.goodput:>9.3g}"
                         f"{o.goodput_per_device:>11.3g}{ms[0]:>10}{ms[1]:>10}{met:>9}")
        if self.best is None:
            lines.append("no configuration meets the SLO at any rate: the SLO is impossible "
                         "on this profile")
        else:
            what = (f"disaggregate, {self.best.candidate.describe()}" if self.disaggregate
                    else f"colocate ({self.best.candidate.describe()})")
            lines.append(f"recommendation: {what}; holds the SLO up to "
                         f"{self.best.max_rate:.3g} req/s")
        return "\n".join(lines)


def plan(base: SimConfig, bench: BenchConfig, devices: int, *, attainment: float = 0.9,
         tie_tolerance: float = 0.05) -> Plan:
    """Every candidate's outcome and the recommendation (see module doc)."""
    if not 0 < attainment <= 1:
        raise ConfigError(f"attainment must be in (0, 1], got {attainment}")
    outcomes = [max_rate(base, c, bench, attainment=attainment) for c in candidates(devices)]
    scored = [o for o in outcomes if o.goodput > 0]
    if not scored:
        return Plan(outcomes, None, False)
    top = max(o.goodput_per_device for o in scored)
    colocated = outcomes[0]
    if colocated.goodput_per_device >= top * (1 - tie_tolerance) and colocated.goodput > 0:
        return Plan(outcomes, colocated, False)
    best = max(scored, key=lambda o: o.goodput_per_device)
    return Plan(outcomes, best, best.candidate.colocated == 0)
