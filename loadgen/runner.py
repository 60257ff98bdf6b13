"""Drive one run (or a sweep of runs) against a server and collect a record per request.

    result = asyncio.run(run_bench(BenchConfig(address="127.0.0.1:50051", ...)))
    report = summarize(result)          # loadgen.stats

Every request that is sent gets exactly one `RequestRecord`, succeeded or not: a server error
keeps its status name, a request still running `drain_timeout_s` after the last send is
cancelled and counted as CANCELLED, and an unexpected client failure as CLIENT_ERROR.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from loadgen.arrivals import Arrival, ArrivalConfig, Limits, LimitState, open_loop_schedule
from loadgen.backend_factory import make_backend
from loadgen.backends import BACKENDS, Backend
from loadgen.record import BackendError, RequestRecord
from loadgen.workloads import RequestSpec, Workload, WorkloadConfig, make_workload

CANCELLED = "CANCELLED"
NO_FINAL = "NO_FINAL"
CLIENT_ERROR = "CLIENT_ERROR"


@dataclass
class BenchConfig:
    """Everything that defines a run; written verbatim into the report's `config`."""

    address: str = "127.0.0.1:50051"
    backend: str = "grpc"
    arrival: ArrivalConfig = field(default_factory=ArrivalConfig)
    rates: list[float] = field(default_factory=list)  # non-empty: a poisson sweep
    limits: Limits = field(default_factory=Limits)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    seed: int = 0
    request_timeout_s: float | None = None  # gRPC deadline per request
    drain_timeout_s: float | None = None  # after the last send; then cancel what is left
    channels: int = 1
    label: str = ""  # a name for the run (compare shows it)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: must be one of {', '.join(BACKENDS)}")
        if any(not (r > 0 and math.isfinite(r)) for r in self.rates):
            raise ValueError(f"sweep rates must be > 0 requests/s, got {self.rates}")
        for name in ("request_timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def for_rate(self, rate: float) -> BenchConfig:
        """This config as one poisson run of a sweep."""
        return dataclasses.replace(self, arrival=ArrivalConfig(kind="poisson", rate=rate),
                                   rates=[])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    config: BenchConfig
    records: list[RequestRecord]
    started_at: str  # ISO 8601, local time with offset
    wall_s: float  # the whole run, warm-up and drain included


async def run_bench(config: BenchConfig, *, backend: Backend | None = None,
                    workload: Workload | Iterator[RequestSpec] | None = None,
                    progress: bool = False) -> RunResult:
    """One run. `backend` and `workload` default to what `config` names; tests pass their
    own (e.g. a workload with injected bad requests)."""
    if config.rates:
        raise ValueError("a config with rates is a sweep: use run_sweep")
    backend = backend or make_backend(config.backend, config.address,
                                      channels=config.channels)
    specs = iter(workload if workload is not None
                 else make_workload(config.workload, split_seeds(config.seed)[0]))
    await backend.start()
    try:
        return await _Run(config, backend, specs, progress).run()
    finally:
        await backend.close()


async def run_sweep(config: BenchConfig, *, progress: bool = False,
                    on_result: Callable[[float, RunResult], None] | None = None
                    ) -> list[tuple[float, RunResult]]:
    """One poisson run per rate of `config.rates`, in order, each with the same seed (so the
    same requests); `on_result(rate, result)` after each."""
    results = []
    for rate in config.rates:
        if progress:
            print(f"loadgen: rate {rate:g} req/s", file=sys.stderr)
        result = await run_bench(config.for_rate(rate), progress=progress)
        if on_result is not None:
            on_result(rate, result)
        results.append((rate, result))
    return results


def split_seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for the workload and the arrival process (the simulator,
    planner/sim_inputs.py, uses them too, to replay a run's exact requests)."""
    a, b = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    return a, b


class _Run:
    def __init__(self, config: BenchConfig, backend: Backend, specs: Iterator[RequestSpec],
                 progress: bool):
        self.config = config
        self.backend = backend
        self.specs = specs
        self.records: list[RequestRecord] = []
        self.tasks: list[asyncio.Task] = []
        self.t0 = 0.0
        self.errors = 0
        self.schedule = (open_loop_schedule(config.arrival, config.limits,
                                            split_seeds(config.seed)[1])
                         if config.arrival.open_loop else None)
        self.bar = None
        if progress:
            total = (len(self.schedule) if self.schedule is not None
                     else config.limits.max_total)
            self.bar = tqdm(total=total, unit="req", desc=config.arrival.describe(),
                            file=sys.stderr, dynamic_ncols=True)

    async def run(self) -> RunResult:
        started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.t0 = time.perf_counter()
        try:
            if self.schedule is not None:
                await self._open_loop(self.schedule)
            else:
                await self._closed_loop()
            await self._drain()
        finally:
            if self.bar is not None:
                self.bar.close()
        return RunResult(self.config, self.records, started_at, time.perf_counter() - self.t0)

    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _launch(self, warmup: bool) -> asyncio.Task:
        spec = next(self.specs)
        rec = RequestRecord(index=spec.index, traffic_class=spec.traffic_class, warmup=warmup,
                            ttft_slo_ms=spec.ttft_ms, tpot_slo_ms=spec.tpot_ms,
                            input_tokens_sent=(len(spec.token_ids)
                                               if spec.token_ids is not None else None))
        self.records.append(rec)
        task = asyncio.create_task(self._drive(spec, rec))
        self.tasks.append(task)
        return task

    async def _open_loop(self, schedule: list[Arrival]) -> None:
        for arrival in schedule:
            delay = arrival.offset_s - self._now()
            if delay > 0:
                await asyncio.sleep(delay)
            self._launch(arrival.warmup)

    async def _closed_loop(self) -> None:
        state = LimitState(self.config.limits)

        async def worker() -> None:
            while (warm := state.claim(self._now())) is not None:
                await asyncio.wait([self._launch(warm)])  # never raises, even if cancelled

        workers = [asyncio.create_task(worker()) for _ in range(self.config.arrival.concurrency)]
        # Sending is over once the limits are reached, even while every worker still waits on
        # its last request; from then on the drain timeout runs, as in the open loop.
        while not state.exhausted(self._now()) and not all(w.done() for w in workers):
            await asyncio.sleep(0.01)
        await self._drain()
        await asyncio.gather(*workers)

    async def _drain(self) -> None:
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=self.config.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _drive(self, spec: RequestSpec, rec: RequestRecord) -> None:
        """Send one request and fill its record; always leaves a status."""
        start = time.perf_counter()
        rec.send_s = start - self.t0
        last = None
        try:
            async for event in self.backend.stream(spec, self.config.request_timeout_s):
                now = time.perf_counter()
                k = event.num_tokens
                if k:
                    if last is None:
                        rec.ttft_ms = (now - start) * 1e3
                        rec.itl_ms.extend([0.0] * (k - 1))
                    else:
                        rec.itl_ms.extend([(now - last) * 1e3 / k] * k)
                    last = now
                    rec.output_tokens += k
                if event.final is not None:
                    rec.server = event.final
            end = time.perf_counter()
            if rec.server is None:
                rec.status, rec.error = NO_FINAL, "the stream ended without a final message"
            else:
                rec.e2e_ms = (end - start) * 1e3
        except BackendError as e:
            rec.status, rec.error = e.code, e.message
        except asyncio.CancelledError:
            rec.status, rec.error = CANCELLED, "still running when the drain timeout ended"
            raise
        except Exception as e:  # noqa: BLE001 - a bug or a transport surprise: counted, not dropped
            rec.status, rec.error = CLIENT_ERROR, f"{type(e).__name__}: {e}"
        finally:
            rec.end_s = time.perf_counter() - self.t0
            if not rec.ok:
                self.errors += 1
            if self.bar is not None:
                self.bar.update(1)
                if self.errors:
                    self.bar.set_postfix(errors=self.errors, refresh=False)
