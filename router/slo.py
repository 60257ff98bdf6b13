"""SLO-aware prefill scheduling for the router (DESIGN: request path step 3).

Pure bookkeeping on one asyncio event loop: no I/O, no threads, no locks; the clock is injected.

Contract:
- A request's TTFT on a prefill worker is predicted as its wait for a slot plus its service
  from grant to first token, from two models per worker learnt at every first token:
  - service time (`TimingModel`, seconds ≈ a + b*x; the models are in `timing_models.py`):
    grant to first token against x = the uncached prompt tokens in flight on the worker
    right after the grant, its own included.
    It covers everything in between: waiting inside the worker's engine, batched prefill,
    KV transfer. Learnt against the work in flight, not the request's own tokens: a worker
    prefills its in-flight requests in shared batches, so per-request times do not add up
    (summing them over-counted the work about 2× at 4 in flight).
  - throughput (`Throughput`): uncached tokens brought to their first token per second that
    the worker had a slot granted. Slots free at this rate, so it sets the wait for one: the
    queued tokens served first (the worker's share) and half an in-flight request.
- Higher priorities keep overtaking a waiting request: its wait is a priority queue's busy
  period, served at the throughput less the token rate admitted at higher priorities lately
  (`_rate_above`), with a margin for their bursts (see `_ttft`). When they take the whole
  throughput the wait is infinite: at overload, lower priorities are refused first.
- `TimingModel` also fits each decode worker's step time (x = batch size).
- `SLOScheduler.admit(req, hits)` is the early-rejection check (Mooncake-style): it raises
  `Rejected` when there is no prefill worker, the router queue is full, or the system is
  saturated and no worker's predicted TTFT fits the request's remaining TTFT budget. It never
  changes state.
- `await acquire(req, hits)` waits for a prefill slot and returns a `PrefillPlacement`. Waiters
  are granted in (priority desc, deadline asc, arrival order). A slot is handed to the head
  waiter synchronously when it frees, so a later arrival can never take it first. Waiting
  with no prefill worker at all waits until one is added (the caller owns timeouts).
- Every placement must be handed back with `release(placement, ...)` (on success or
  failure), at the request's first token when it has one (`served=True`: both models learn
  from it); a second release of the same placement is a no-op.
- `decode` (router/decode_ranking.py) orders decode workers by fit (free KV blocks, predicted
  TPOT), kept fresh by the router's worker stats.
- Removing a worker drops it at once: its slots vanish and no waiter is granted it. Its
  outstanding placements may still be released (a no-op for scheduling). Adding a worker that
  is already present changes nothing; re-adding a removed one starts it with fresh models.
- `export_profile(...)` gives the learnt models in the timing profile format
  (router/timing_profile.py): what `pdserve profile --from-cluster` writes.
- `check_integrity()` asserts the slot/in-flight accounting (tests call it).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.decode_ranking import DecodeRanking
from router.timing_models import Throughput, TimingModel
from router.timing_profile import Profile

# Deadline given to requests without a TTFT SLO: they sort after every request that has one
# (within their priority class) but still keep arrival order among themselves.
NO_SLO_HORIZON_S = 3600.0


@dataclass(frozen=True)
class RequestInfo:
    """What the scheduler needs to know about one request (times from the scheduler's clock)."""

    request_id: str
    num_prompt_tokens: int
    block_size: int
    priority: int = 0  # higher is served first
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    arrival: float = 0.0

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.block_size < 1:
            raise ValueError(
                f"request {self.request_id}: num_prompt_tokens={self.num_prompt_tokens} and "
                f"block_size={self.block_size} must both be >= 1")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_prompt_tokens // self.block_size)

    @property
    def deadline(self) -> float:
        horizon = NO_SLO_HORIZON_S if self.ttft_slo_s is None else self.ttft_slo_s
        return self.arrival + horizon

    def cached_tokens(self, blocks: int) -> int:
        """Tokens covered by `blocks` leading cached blocks; at least one token is recomputed
        so the first output token has logits."""
        return max(0, min(blocks * self.block_size, self.num_prompt_tokens - 1))


class Rejected(Exception):
    """Early rejection (the router maps it to gRPC RESOURCE_EXHAUSTED); str() says why."""


@dataclass
class PrefillPlacement:
    worker_id: str
    cached_tokens: int  # prompt tokens the worker already holds (from the prefix hits)
    predicted_ttft_s: float  # from granted_at to the first token, as predicted at grant time
    granted_at: float  # clock() when the slot was granted
    grant_id: int = field(default=0, compare=False)  # makes release idempotent; 0 = unknown


@dataclass(slots=True)
class _PrefillWorker:
    worker_id: str
    slots: int
    service: TimingModel  # grant to first token, against uncached tokens in flight at grant
    throughput: Throughput  # uncached tokens to first token per busy second
    busy: int = 0
    inflight_tokens: int = 0  # uncached prompt tokens of the granted, unreleased requests
    busy_s: float = 0.0  # busy time not yet credited to the throughput
    since: float = 0.0  # clock() of the last change of `busy`

    @property
    def free(self) -> int:
        return self.slots - self.busy

    def set_busy(self, busy: int, now: float) -> None:
        if self.busy > 0:
            self.busy_s += now - self.since
        self.busy, self.since = busy, now


@dataclass(slots=True)
class _Grant:
    worker: _PrefillWorker  # the object, not the id: a re-added worker is a new object
    uncached_tokens: int
    work_at_grant: int  # the worker's uncached tokens in flight right after this grant


@dataclass(slots=True, eq=False)
class _Waiter:
    req: RequestInfo
    hits: dict[str, int]
    fut: asyncio.Future[PrefillPlacement]
    uncached_tokens: int  # at its best known cache hit, for others' queue-wait estimates


# Heap entries: (-priority, deadline, seq, waiter); seq is unique so waiters never compare.
_Entry = tuple[int, float, float, _Waiter]


class SLOScheduler:
    """Prefill slots, the router's wait queue, and decode-worker ranking (see module doc)."""

    def __init__(
        self,
        prefill_workers: Sequence[str],
        decode_workers: Sequence[str],
        *,
        slots_per_worker: int = 4,
        max_queue: int = 256,
        service_prior: tuple[float, float] = (0.005, 0.0002),  # s = a + b * tokens in flight
        decode_prior: tuple[float, float] = (0.005, 0.0005),  # step s = a + b * batch size
        decay: float = 0.9,
        rate_window_s: float = 30.0,  # admitted token rates per priority look this far back
        margin_sigmas: float = 2.0,  # standard deviations of noise predictions allow for
        tie_tolerance: float = 0.2,  # predicted TTFTs within 20% + tie_slack_s count as equal
        tie_slack_s: float = 0.002,
        clock: Callable[[], float] = time.monotonic,
    ):
        if slots_per_worker < 1:
            raise ValueError(f"slots_per_worker must be >= 1, got {slots_per_worker}")
        self.slots_per_worker = slots_per_worker
        self.max_queue = max_queue
        self.tie_tolerance, self.tie_slack_s = tie_tolerance, tie_slack_s
        if rate_window_s <= 0:
            raise ValueError(f"rate_window_s must be positive, got {rate_window_s}")
        self._service_prior = service_prior
        self._decay = decay
        self.rate_window_s, self.margin_sigmas = rate_window_s, margin_sigmas
        self._clock = clock
        self._started = clock()
        self._admitted: collections.deque[tuple[float, int, int]] = collections.deque()
        self._prefill: dict[str, _PrefillWorker] = {}
        # Decode workers are ranked by a module of their own; the router reaches it here.
        self.decode = DecodeRanking(decode_workers, decode_prior, decay)
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._grant_ids = itertools.count(1)
        self._grants: dict[int, _Grant] = {}
        for w in prefill_workers:
            self.add_prefill_worker(w)

    # -- workers -------------------------------------------------------------------------------

    def add_prefill_worker(self, worker_id: str, *, slots: int | None = None) -> None:
        if worker_id in self._prefill:
            return
        slots = self.slots_per_worker if slots is None else slots
        if slots < 1:
            raise ValueError(f"prefill worker {worker_id}: slots must be >= 1, got {slots}")
        self._prefill[worker_id] = _PrefillWorker(
            worker_id, slots, TimingModel(*self._service_prior, self._decay),
            Throughput(self._service_prior[1] ** -1), since=self._clock())
        self._dispatch()

    def remove_prefill_worker(self, worker_id: str) -> None:
        self._prefill.pop(worker_id, None)

    # -- prefill -------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._heap)

    def predict_ttft(self, worker_id: str, req: RequestInfo, cached_tokens: int) -> float:
        """Seconds from now to req's first token if placed on worker_id (see module doc), with
        the margins admission allows for."""
        return self._ttft(self._prefill[worker_id], req, cached_tokens, self._queue_ahead(req),
                          self._rate_above(req.priority), self.margin_sigmas)

    def admit(self, req: RequestInfo, hits: Mapping[str, int]) -> None:
        if not self._prefill:
            raise Rejected(f"request {req.request_id}: no prefill worker available")
        if len(self._heap) >= self.max_queue:
            raise Rejected(f"request {req.request_id}: router queue full "
                           f"({len(self._heap)} waiting, max_queue={self.max_queue})")
        saturated = bool(self._heap) or all(w.free <= 0 for w in self._prefill.values())
        if not saturated or req.ttft_slo_s is None:
            return
        ahead, above = self._queue_ahead(req), self._rate_above(req.priority)
        best, best_id = min(
            (self._ttft(w, req, req.cached_tokens(hits.get(wid, 0)), ahead, above,
                        self.margin_sigmas), wid)
            for wid, w in self._prefill.items())
        budget = req.deadline - self._clock()
        if best > budget:
            why = (f"higher priorities take all prefill throughput ({above[0]:.0f} tokens/s)"
                   if math.isinf(best) else
                   f"best predicted TTFT {best * 1e3:.1f} ms on {best_id} exceeds the remaining "
                   f"budget {budget * 1e3:.1f} ms")
            raise Rejected(
                f"request {req.request_id}: prefill saturated ({len(self._heap)} queued, "
                f"{ahead[0]} ahead); {why} (TTFT SLO {req.ttft_slo_s * 1e3:.1f} ms)")

    async def acquire(self, req: RequestInfo, hits: Mapping[str, int]) -> PrefillPlacement:
        hits = dict(hits)
        known = [hits.get(wid, 0) for wid in self._prefill] or [0]
        waiter = _Waiter(req, hits, asyncio.get_running_loop().create_future(),
                         req.num_prompt_tokens - req.cached_tokens(max(known)))
        self._admitted.append((self._clock(), req.priority, waiter.uncached_tokens))
        self._forget_admitted()
        heapq.heappush(self._heap, (-req.priority, req.deadline, next(self._seq), waiter))
        self._dispatch()  # grants at once when a slot is free (awaiting a done future won't yield)
        try:
            return await waiter.fut
        except asyncio.CancelledError:
            if waiter.fut.done() and not waiter.fut.cancelled():
                # Granted, but the task was cancelled before it resumed: hand the slot back.
                self.release(waiter.fut.result())
            else:
                self._heap = [e for e in self._heap if e[3] is not waiter]
                heapq.heapify(self._heap)
            raise

    def release(self, placement: PrefillPlacement, *, served: bool = False) -> None:
        """Free the slot. `served`: the request's first token arrived just now; the service
        time and throughput learn from it. Not served (a failure): nothing is learnt, and its
        busy time is credited with the next request served (a pessimistic throughput)."""
        grant = self._grants.pop(placement.grant_id, None)
        if grant is None:
            return
        w, now = grant.worker, self._clock()
        w.set_busy(w.busy - 1, now)
        w.inflight_tokens -= grant.uncached_tokens
        if served:
            w.service.observe(grant.work_at_grant, now - placement.granted_at)
            w.throughput.observe(grant.uncached_tokens, w.busy_s)
            w.busy_s = 0.0
        self._dispatch()

    def _queue_ahead(self, req: RequestInfo) -> tuple[int, int]:
        """(count, uncached tokens) of the queued requests that would be served before req."""
        mine = next((e for e in self._heap if e[3].req.request_id == req.request_id), None)
        key = mine[:3] if mine else (-req.priority, req.deadline, math.inf)
        ahead = [e[3].uncached_tokens for e in self._heap if e[:3] < key]
        return len(ahead), sum(ahead)

    def _forget_admitted(self) -> float:
        """Drop admissions older than the rate window; returns now."""
        now = self._clock()
        while self._admitted and self._admitted[0][0] < now - self.rate_window_s:
            self._admitted.popleft()
        return now

    def _rate_above(self, priority: int) -> tuple[float, float]:
        """Admitted at priorities above `priority` lately, per second: (uncached tokens,
        squared uncached tokens per request). The second makes the variance of that work:
        over T seconds of Poisson arrivals it is T times the mean square per second.

        Measured over the whole window and over its last sixth, the larger taken: the long
        window is steady, the short one sees a surge within seconds (lower priorities
        admitted on the long one alone were overtaken right after a step up in load)."""
        now = self._forget_admitted()
        rates = []
        for window in (self.rate_window_s, self.rate_window_s / 6):
            # Young schedulers divide by the time they have seen (at least a second), not
            # the whole window, so a burst right after start counts at its true rate.
            span = max(1.0, min(window, now - self._started))
            above = [t for when, p, t in self._admitted if p > priority and when >= now - window]
            rates.append((sum(above) / span, sum(t * t for t in above) / span))
        return max(rates)

    def _ttft(self, w: _PrefillWorker, req: RequestInfo, cached_tokens: int,
              ahead: tuple[int, int], rate_above: tuple[float, float],
              sigmas: float) -> float:
        """Seconds from now to req's first token on w: the wait for a slot, then the service
        from grant to first token. `ahead`: (count, uncached tokens) of the queued requests
        served before req; `rate_above`: see `_rate_above`. `sigmas`: standard deviations of
        noise (higher-priority bursts, service-time errors) added, so that a request admitted
        on a prediction just inside its budget still meets it most of the time; placement
        compares expected times (0)."""
        uncached = req.num_prompt_tokens - max(0, min(cached_tokens, req.num_prompt_tokens - 1))
        if w.free > 0:  # granted at once (a free slot means nobody is queued)
            return self._service(w, w.inflight_tokens + uncached, sigmas)
        # Full: slots free one at a time as in-flight requests reach their first token, at the
        # worker's throughput. req is granted a slot once the queued work ahead of it (its
        # share of it on this worker) and the rest of the oldest in-flight request are done;
        # then it is served like any request granted on a full worker.
        n = max(1, len(self._prefill))
        mean_inflight = w.inflight_tokens / w.busy
        work = ahead[1] / n + mean_inflight / 2
        # Higher priorities keep overtaking req while it waits, so the wait T needs
        # rate*T >= work + A(T), A the higher-priority work arriving in T. Plan for A's mean
        # plus `sigmas` standard deviations (a burst of them must not push an admitted
        # request past its deadline): with left = rate - mean rate above and b = sigmas *
        # sqrt(mean square rate above), sqrt(T) solves left*u^2 - b*u - work = 0. With
        # nothing above, T = work / rate.
        rate, square = rate_above[0] / n, rate_above[1] / n
        left = w.throughput.rate - rate
        if left <= 0:
            return math.inf
        b = sigmas * math.sqrt(square)
        u = (b + math.sqrt(b * b + 4 * left * work)) / (2 * left)
        return u * u + self._service(w, w.inflight_tokens - mean_inflight + uncached, sigmas)

    @staticmethod
    def _service(w: _PrefillWorker, tokens_in_flight: float, sigmas: float) -> float:
        return w.service.predict(tokens_in_flight) + sigmas * w.service.spread

    def _dispatch(self) -> None:
        """Grant free slots to waiters, best-ordered first, until one or the other runs out."""
        while self._heap and any(w.free > 0 for w in self._prefill.values()):
            waiter = heapq.heappop(self._heap)[3]
            if not waiter.fut.done():  # defensive: cancelled waiters are removed at once
                waiter.fut.set_result(self._grant(waiter.req, waiter.hits))

    def _grant(self, req: RequestInfo, hits: Mapping[str, int]) -> PrefillPlacement:
        def score(w: _PrefillWorker) -> tuple[float, int, int]:
            cached = req.cached_tokens(hits.get(w.worker_id, 0))
            ttft = self._ttft(w, req, cached, (0, 0), (0.0, 0.0), 0.0)
            return ttft, -cached, w.inflight_tokens

        scored = [(score(w), w) for w in self._prefill.values() if w.free > 0]
        best_ttft = min(s[0] for s, _ in scored)
        # Predictions within the tolerance, or within the worker model's typical error, are a
        # tie (per-worker models carry noise that can outweigh a small prefill saving, most of
        # all while they have seen few requests): among those, the cache hit wins, which also
        # saves the pool the compute.
        near = [(s, w) for s, w in scored
                if s[0] <= best_ttft * (1 + self.tie_tolerance) + self.tie_slack_s
                + w.service.spread]
        (ttft, neg_cached, _), w = min(near, key=lambda sw: (sw[0][1], sw[0][0], sw[0][2]))
        cached = -neg_cached
        w.set_busy(w.busy + 1, self._clock())
        w.inflight_tokens += req.num_prompt_tokens - cached
        gid = next(self._grant_ids)
        self._grants[gid] = _Grant(w, req.num_prompt_tokens - cached, w.inflight_tokens)
        return PrefillPlacement(w.worker_id, cached, ttft, self._clock(), gid)

    # -- introspection -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "queue_length": len(self._heap),
            "prefill": {
                wid: {"slots": w.slots, "slots_busy": w.busy,
                      "inflight_tokens": w.inflight_tokens,
                      "service_model": w.service.as_dict(),
                      "throughput": w.throughput.as_dict()}
                for wid, w in self._prefill.items()},
            "decode": self.decode.snapshot(),
        }

    def export_profile(self, *, model: str, block_size: int, kv_bytes_per_token: int = 0,
                       kv_pool_blocks: int | None = None) -> Profile:
        """The timings learnt so far as a profile (source "cluster"). A profile describes one
        worker, so each pool's model is that of the worker that has observed the most: prefill
        as the service model (x = "tokens_in_flight", grant to first token), decode as the step
        model (x = "batch_size"). A pool with no observations yet has no model."""
        prefill = max(self._prefill.values(), key=lambda w: w.service.n, default=None)
        decode = self.decode.most_observed_model()
        return Profile(
            model=model, source="cluster", block_size=block_size,
            kv_pool_blocks=kv_pool_blocks, kv_bytes_per_token=kv_bytes_per_token,
            prefill=(prefill.service.export("tokens_in_flight")
                     if prefill is not None and prefill.service.n else None),
            decode=decode.export("batch_size") if decode is not None else None,
            notes="learnt online by the router: prefill is grant to first token (queueing in "
                  "the worker and KV transfer included) against the uncached tokens in flight")

    def check_integrity(self) -> None:
        for w in self._prefill.values():
            mine = [g for g in self._grants.values() if g.worker is w]
            assert w.busy == len(mine) and 0 <= w.busy <= w.slots, (w, len(mine))
            assert w.inflight_tokens == sum(g.uncached_tokens for g in mine), w
        if self._heap:
            assert all(w.free <= 0 for w in self._prefill.values()), "waiter left beside a slot"
            assert not any(e[3].fut.done() for e in self._heap), "finished waiter still queued"
