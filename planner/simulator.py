"""Discrete-event simulation of a pdserve cluster on a timing profile (DESIGN: "Planning and
elasticity").

What is real and what is modelled:
- admission, the router's wait queue and prefill placement: the real `router.slo.SLOScheduler`
  (its `admit`, `acquire`, `release`, and its decode ranking), on the simulated clock;
  its online timing models learn from the simulated timings as they would from real ones;
- prefix hits: the prompt's chained block hashes (engine/hashing.py, as the router computes
  them) looked up in each worker's real block manager, as the prefix index would answer;
- batching, chunked prefill, preemption, KV pool accounting: the real engine scheduler and block
  manager in each `planner.sim_worker.SimWorker`;
- time: every engine step costs what the profile predicts for its batch; a KV transfer costs
  the profile's transfer model for the prompt's blocks, charged after the prefill (the real
  workers stream layers during it, so this is an upper bound).

A request's path follows router/server.py: admit or reject (RESOURCE_EXHAUSTED); wait for a
prefill slot; P/D: reserve its KV blocks on the best-ranked decode worker with room (waiting
for room until its TTFT deadline or `decode_wait_s`), prefill, transfer, then the first token
reaches the client and the slot is released, then decode; colocated: prefill and decode on one
worker, the slot released at the first token. Records are `loadgen.record.RequestRecord`s, so
`loadgen.stats.summarize` makes the same report as `pdserve bench`.

The event loop is asyncio (the scheduler's `acquire` is a coroutine) driven by a heap of timed
events: after each event the loop runs once, so a request granted a slot continues at the
same simulated instant. Deterministic: same inputs, same result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig
from engine.hashing import chain_hashes
from engine.request import Request, RequestStatus
from loadgen.record import OK, RequestRecord, ServerFinal
from pdserve_api.errors import ConfigError
from pdserve_api.sampling import SamplingParams
from planner.sim_inputs import SimRequest
from planner.sim_worker import SimWorker, StepCost
from router.config import RouterConfig
from router.slo import PrefillPlacement, Rejected, RequestInfo, SLOScheduler
from router.timing_profile import Profile, ProfileError

REJECTED = "RESOURCE_EXHAUSTED"
NO_FINAL = "NO_FINAL"  # still unfinished when nothing more could happen
TRANSPORT_PREFERENCE = ("ucx", "tcp", "local")


@dataclass
class SimConfig:
    profile: Profile
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0  # > 0: colocated serving (num_prefill / num_decode unused)
    engine: EngineConfig | None = None  # per worker; None: EngineConfig's defaults
    num_kv_blocks: int | None = None  # per worker; None: the profile's pool size
    transport: str | None = None  # the profile's transfer model; None: the best it has
    slots_per_worker: int = RouterConfig.slots_per_prefill_worker
    max_queue: int = RouterConfig.max_queue
    decode_wait_s: float = RouterConfig.decode_wait_s

    def __post_init__(self) -> None:
        if min(self.num_prefill, self.num_decode, self.num_colocated) < 0:
            raise ConfigError("worker counts must be >= 0")
        if not self.colocated and (self.num_prefill < 1 or self.num_decode < 1):
            raise ConfigError("a P/D simulation needs at least one prefill and one decode "
                              f"worker (got {self.num_prefill}P + {self.num_decode}D); or "
                              "simulate colocated workers")
        # The profile's pool size and transfer sizes are in its blocks.
        engine = dataclasses.replace(self.engine or EngineConfig(),
                                     block_size=self.profile.block_size)
        self.engine = engine
        blocks = self.num_kv_blocks or engine.num_kv_blocks or self.profile.kv_pool_blocks
        if not blocks:
            raise ConfigError("the profile does not say the KV pool size: give num_kv_blocks")
        self.num_kv_blocks = blocks
        if not self.colocated and self.transport is None:
            self.transport = next((t for t in TRANSPORT_PREFERENCE
                                   if t in self.profile.transfer), None)
        if self.transport is not None and self.transport not in self.profile.transfer:
            raise ProfileError(f"the profile has no {self.transport} transfer model (it has "
                               f"{sorted(self.profile.transfer) or 'none'})")

    @property
    def colocated(self) -> bool:
        return self.num_colocated > 0

    @property
    def devices(self) -> int:
        return self.num_colocated if self.colocated else self.num_prefill + self.num_decode

    def describe(self) -> str:
        return (f"{self.num_colocated} colocated" if self.colocated
                else f"{self.num_prefill}P+{self.num_decode}D ({self.transport or 'no transfer'})")


@dataclass(eq=False)
class _Run:
    spec: SimRequest
    req: Request  # on the prefill (or colocated) worker
    info: RequestInfo | None = None
    placement: PrefillPlacement | None = None
    prefill_worker: SimWorker | None = None
    decode_worker: SimWorker | None = None
    decode_req: Request | None = None
    decode_wait_until: float = 0.0
    started_s: float | None = None  # the prefill worker first computed it
    prefilled_s: float | None = None  # its first token sampled
    landed_s: float | None = None  # P/D: its KV committed on the decode worker
    end_s: float | None = None
    token_s: list[float] = field(default_factory=list)  # each output token reaching the client
    status: str = OK


class Simulator:
    def __init__(self, config: SimConfig):
        self.config = config
        cost = StepCost(config.profile)
        engine, blocks = config.engine, config.num_kv_blocks
        assert engine is not None and blocks is not None  # set by SimConfig
        if config.colocated:
            front = [SimWorker(f"colocated-{i}", "colocated", cost, engine, blocks)
                     for i in range(config.num_colocated)]
            back: list[SimWorker] = []
        else:
            front = [SimWorker(f"prefill-{i}", "prefill", cost, engine, blocks)
                     for i in range(config.num_prefill)]
            back = [SimWorker(f"decode-{i}", "decode", cost, engine, blocks)
                    for i in range(config.num_decode)]
        self.workers = {w.worker_id: w for w in front + back}
        self.front = [w.worker_id for w in front]
        self.now = 0.0
        self.slo = SLOScheduler(self.front, [w.worker_id for w in back],
                                slots_per_worker=config.slots_per_worker,
                                max_queue=config.max_queue, clock=lambda: self.now)
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._runs: dict[str, _Run] = {}
        self._decode_waiting: list[_Run] = []
        self._waking: set[str] = set()  # workers with a step start queued at this instant
        # A request task was started or a slot released (which may grant a waiter): let the
        # event loop run the tasks before the next event. Nothing else resolves their futures.
        self._wake = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the loop ------------------------------------------------------------------------------

    def run(self, requests: Sequence[SimRequest]) -> list[RequestRecord]:
        return asyncio.run(self._main(requests))

    async def _main(self, requests: Sequence[SimRequest]) -> list[RequestRecord]:
        for i, spec in enumerate(requests):  # ids by position: a trace may repeat indices
            sampling = SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True)
            run = _Run(spec, Request(f"sim-{i}", list(spec.token_ids), sampling))
            self._runs[run.req.request_id] = run
            self._at(spec.arrival_s, self._arrive, run)
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            self.now = t
            fn(*args)
            if self._wake:  # granted requests continue at this instant
                self._wake = False
                await asyncio.sleep(0)
        for task in self._tasks:
            task.cancel()  # waiting for a slot that never freed
        for w in self.workers.values():
            w.block_manager.check_integrity()  # the real accounting held throughout
        return [self._record(r) for r in self._runs.values()]

    def _at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    # -- router --------------------------------------------------------------------------------

    def _arrive(self, run: _Run) -> None:
        self._wake = True
        task = asyncio.ensure_future(self._route(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _route(self, run: _Run) -> None:
        spec = run.spec
        run.info = info = RequestInfo(
            run.req.request_id, len(spec.token_ids), self.config.profile.block_size,
            spec.priority, spec.ttft_slo_ms / 1e3 or None, spec.tpot_slo_ms / 1e3 or None,
            arrival=self.now)
        # The router hashes the prompt once and asks the index which worker holds how much.
        hashes = chain_hashes(spec.token_ids, self.config.profile.block_size)
        hits = {wid: n for wid in self.front
                if (n := self.workers[wid].cached_blocks(hashes))} if hashes else {}
        try:
            self.slo.admit(info, hits)
        except Rejected:
            run.status, run.end_s = REJECTED, self.now
            return
        run.placement = await self.slo.acquire(info, hits)
        run.prefill_worker = self.workers[run.placement.worker_id]
        if self.config.colocated:
            self._prefill(run)
        else:
            run.decode_wait_until = (info.deadline if info.ttft_slo_s is not None
                                     else self.now + self.config.decode_wait_s)
            if not self._reserve_decode(run):
                self._decode_waiting.append(run)
                self._at(run.decode_wait_until, self._decode_timeout, run)

    def _reserve_decode(self, run: _Run) -> bool:
        assert run.info is not None
        for wid in self.slo.decode.rank(run.info.num_blocks, run.info.tpot_slo_s):
            w = self.workers[wid]
            req = Request(run.req.request_id, list(run.spec.token_ids), run.req.sampling)
            if w.reserve(req, run.spec.max_tokens):
                self.slo.decode.note_reserved(wid, run.info.num_blocks)
                run.decode_worker, run.decode_req = w, req
                self._prefill(run)
                return True
        return False

    def _retry_decode(self) -> None:
        waiting, self._decode_waiting = self._decode_waiting, []
        for run in waiting:
            if not self._reserve_decode(run):
                self._decode_waiting.append(run)

    def _decode_timeout(self, run: _Run) -> None:
        if run in self._decode_waiting:
            self._decode_waiting.remove(run)
            run.status, run.end_s = REJECTED, self.now
            assert run.placement is not None
            self.slo.release(run.placement)
            self._wake = True

    # -- workers -------------------------------------------------------------------------------

    def _prefill(self, run: _Run) -> None:
        assert run.prefill_worker is not None
        run.prefill_worker.add(run.req, run.spec.max_tokens)
        self._kick(run.prefill_worker)

    def _kick(self, w: SimWorker) -> None:
        """Wake w's engine loop once everything else happening at this instant has happened
        (requests arriving together are scheduled in one step, as the engine would)."""
        if not w.busy and w.has_work and w.worker_id not in self._waking:
            self._waking.add(w.worker_id)
            self._at(self.now, self._start_step, w)

    def _start_step(self, w: SimWorker) -> None:
        self._waking.discard(w.worker_id)
        if w.busy or not w.has_work:
            return
        seconds = w.start_step()
        if seconds is None:
            return  # short of blocks: a finish or a release kicks it again
        if w.role != "decode":
            for req in w.scheduled:
                run = self._runs[req.request_id]
                if run.started_s is None:
                    run.started_s = self.now
        self._at(self.now + seconds, self._step_done, w, seconds)

    def _step_done(self, w: SimWorker, seconds: float) -> None:
        result = w.finish_step()
        finished = set(map(id, result.finished))
        for req in result.tokens:
            run = self._runs[req.request_id]
            if w.role == "decode":
                run.token_s.append(self.now)
            elif run.prefilled_s is None:
                run.prefilled_s = self.now
                if w.role == "colocated" or req.status == RequestStatus.FINISHED_LENGTH:
                    run.token_s.append(self.now)  # the first token goes out now
                    self._served(run)
                else:
                    self._at(self.now + self._transfer_s(run), self._landed, run)
            else:
                run.token_s.append(self.now)
            if id(req) in finished and req.status == RequestStatus.FINISHED_LENGTH:
                run.end_s = self.now
                if run.decode_worker is not None and run.decode_req is not None \
                        and w.role == "prefill":  # the first token ended it
                    run.decode_worker.cancel(run.decode_req)
                    self._decode_changed(run.decode_worker, None)
        if w.role == "decode":
            self._decode_changed(w, seconds)
        self._kick(w)

    def _decode_changed(self, w: SimWorker, step_s: float | None) -> None:
        self.slo.decode.update(w.worker_id, free_blocks=w.block_manager.num_free_blocks,
                               num_running=w.num_running, step_s=step_s)
        if self._decode_waiting:
            self._retry_decode()

    def _transfer_s(self, run: _Run) -> float:
        profile, transport = self.config.profile, self.config.transport
        if transport is None:
            return 0.0
        blocks = -(-len(run.spec.token_ids) // profile.block_size)
        nbytes = blocks * profile.block_size * profile.kv_bytes_per_token
        return profile.transfer[transport].predict({"bytes": nbytes})

    def _landed(self, run: _Run) -> None:
        assert run.prefill_worker is not None and run.decode_worker is not None
        assert run.decode_req is not None
        run.landed_s = self.now
        run.token_s.append(self.now)  # the router streams the first token with the KV landed
        run.prefill_worker.release(run.req)
        run.decode_worker.commit(run.decode_req)
        self._served(run)
        self._kick(run.prefill_worker)
        self._kick(run.decode_worker)

    def _served(self, run: _Run) -> None:
        assert run.placement is not None
        self.slo.release(run.placement, served=True)
        self._wake = True

    # -- records -------------------------------------------------------------------------------

    def _record(self, run: _Run) -> RequestRecord:
        spec = run.spec
        rec = RequestRecord(spec.index, spec.traffic_class, spec.warmup, spec.ttft_slo_ms,
                            spec.tpot_slo_ms, len(spec.token_ids), send_s=spec.arrival_s)
        if run.status == OK and run.end_s is None:
            run.status = NO_FINAL
        rec.status = run.status
        rec.end_s = run.end_s if run.end_s is not None else self.now
        if run.status != OK:
            return rec
        assert run.started_s is not None and run.prefilled_s is not None and run.token_s
        ms = 1e3
        first, end = run.token_s[0], rec.end_s
        rec.output_tokens = len(run.token_s)
        rec.ttft_ms = (first - spec.arrival_s) * ms
        rec.e2e_ms = (end - spec.arrival_s) * ms
        rec.itl_ms = [(b - a) * ms for a, b in zip(run.token_s, run.token_s[1:])]
        decode_from = run.landed_s if run.landed_s is not None else run.prefilled_s
        rec.server = ServerFinal(
            finish_reason="length", prompt_tokens=len(spec.token_ids),
            cached_tokens=run.req.num_cached_tokens, completion_tokens=rec.output_tokens,
            queue_ms=(run.started_s - spec.arrival_s) * ms,
            prefill_ms=(run.prefilled_s - run.started_s) * ms,
            transfer_ms=(decode_from - run.prefilled_s) * ms,
            decode_ms=(end - decode_from) * ms, ttft_ms=rec.ttft_ms, e2e_ms=rec.e2e_ms,
            prefill_worker=run.prefill_worker.worker_id if run.prefill_worker else "",
            decode_worker=run.decode_worker.worker_id if run.decode_worker else "",
            kv_transport=self.config.transport or "none")
        return rec


def simulate(config: SimConfig, requests: Sequence[SimRequest]) -> list[RequestRecord]:
    """One simulated run: a record per request (see module doc)."""
    return Simulator(config).run(requests)
