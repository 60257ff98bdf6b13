"""When to send: arrival processes and the limits that end a run.

- `poisson`: open loop, exponential gaps at `rate` requests/s; the first request goes at 0.
- `burst`: open loop, `burst_size` requests at once every `burst_interval_s`.
- `concurrency`: closed loop, `concurrency` requests always in flight (a new one as soon as
  one ends); it has no schedule, the runner paces it with `Limits.claim`.

A sweep over rates is one poisson run per rate (`loadgen.runner.run_sweep`).

Limits: the warm-up (the first `warmup_requests` requests, or those sent in the first
`warmup_s` seconds) is sent like any other request but excluded from the statistics; then
`num_requests` measured requests, or as many as are sent in `duration_s` seconds after the
warm-up ends (at `warmup_s`, or when the first measured request is sent), whichever comes
first. Open-loop schedules are computed up front from the seed
(`open_loop_schedule`), so a run is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ARRIVAL_KINDS = ("poisson", "burst", "concurrency")


@dataclass
class ArrivalConfig:
    kind: str = "poisson"  # one of ARRIVAL_KINDS
    rate: float = 1.0  # poisson: requests/s
    concurrency: int = 1  # concurrency: requests in flight
    burst_size: int = 8  # burst: requests per burst
    burst_interval_s: float = 1.0  # burst: seconds between bursts

    def __post_init__(self) -> None:
        if self.kind not in ARRIVAL_KINDS:
            raise ValueError(f"arrival process {self.kind!r}: must be one of "
                             f"{', '.join(ARRIVAL_KINDS)}")
        if self.kind == "poisson" and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"poisson rate must be > 0 requests/s, got {self.rate}")
        if self.kind == "concurrency" and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.kind == "burst" and (self.burst_size < 1 or not self.burst_interval_s > 0):
            raise ValueError(f"bursts need size >= 1 and interval > 0, got {self.burst_size} "
                             f"every {self.burst_interval_s} s")

    @property
    def open_loop(self) -> bool:
        return self.kind != "concurrency"

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"poisson {self.rate:g} req/s"
        if self.kind == "burst":
            return f"bursts of {self.burst_size} every {self.burst_interval_s:g} s"
        return f"concurrency {self.concurrency}"


@dataclass
class Limits:
    num_requests: int | None = 100  # measured requests (warm-up not included)
    duration_s: float | None = None  # measured seconds (after the warm-up)
    warmup_requests: int = 0
    warmup_s: float = 0.0

    def __post_init__(self) -> None:
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("a run needs a bound: a request count, a duration, or both")
        if self.num_requests is not None and self.num_requests < 0:
            raise ValueError(f"request count must be >= 0, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.warmup_requests < 0 or self.warmup_s < 0:
            raise ValueError("warm-up must be >= 0")
        if self.warmup_requests and self.warmup_s:
            raise ValueError("give the warm-up as a request count or as seconds, not both")

    @property
    def max_total(self) -> int | None:
        """Most requests a run sends (None: bounded by time only)."""
        if self.num_requests is None or self.warmup_s:
            return None
        return self.warmup_requests + self.num_requests


@dataclass(frozen=True, slots=True)
class Arrival:
    offset_s: float  # from the start of the run
    warmup: bool


class LimitState:
    """Claims send slots one at a time against `Limits` (used by the closed loop and to cut
    open-loop schedules). Not thread-safe; no awaits inside, so safe on one event loop."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.sent = 0
        self.measured = 0
        self.measured_start: float | None = None

    def _warm(self, now_s: float) -> bool:
        lim = self.limits
        return self.sent < lim.warmup_requests if lim.warmup_requests else now_s < lim.warmup_s

    def exhausted(self, now_s: float) -> bool:
        """Whether no request may be sent at `now_s` (or later: limits only tighten)."""
        lim = self.limits
        if self._warm(now_s):
            return False
        start = self.measured_start
        if start is None:  # the warm-up's end
            start = lim.warmup_s if lim.warmup_s else now_s
        if lim.num_requests is not None and self.measured >= lim.num_requests:
            return True
        return lim.duration_s is not None and now_s >= start + lim.duration_s

    def claim(self, now_s: float) -> bool | None:
        """For a request about to be sent at `now_s` (seconds since the run started): True if
        it is warm-up, False if measured, None if the run is over."""
        if self.exhausted(now_s):
            return None
        warm = self._warm(now_s)
        if not warm:
            if self.measured_start is None:
                self.measured_start = self.limits.warmup_s or now_s
            self.measured += 1
        self.sent += 1
        return warm


def arrival_offsets(config: ArrivalConfig, seed: int) -> Iterator[float]:
    """The endless sequence of send offsets (seconds) of an open-loop process."""
    if config.kind == "poisson":
        rng = np.random.default_rng(seed)
        t = 0.0
        while True:
            yield t
            t += float(rng.exponential(1.0 / config.rate))
    elif config.kind == "burst":
        k = 0
        while True:
            for _ in range(config.burst_size):
                yield k * config.burst_interval_s
            k += 1
    else:
        raise ValueError(f"{config.kind} is a closed loop: it has no arrival schedule")


def open_loop_schedule(config: ArrivalConfig, limits: Limits, seed: int) -> list[Arrival]:
    """Every send of an open-loop run, in order, cut by the limits."""
    state = LimitState(limits)
    out: list[Arrival] = []
    for t in arrival_offsets(config, seed):
        warm = state.claim(t)
        if warm is None:
            return out
        out.append(Arrival(t, warm))
    raise AssertionError("unreachable")  # pragma: no cover
