"""One request in the router, from admission to its final message: `RouterRequest`.

It is the only per-request state the router keeps: where the request is (`Phase`), which
workers hold it (for cleanup on cancel), what the client has already been sent (for a retry
or migration), and its timings, from which the final message is built.

Phases, and the only transitions allowed (`advance` raises on any other, so a flow bug is
loud rather than a leak):

    ADMIT -> PLACE -> RESERVE -> PREFILL -> STREAM -> FINISHED        (P/D)
    ADMIT -> PLACE -> PREFILL -> STREAM -> FINISHED                   (colocated)
    PREFILL -> FINISHED          the first token ended it
    PREFILL | STREAM -> RETRY -> PLACE    a failed transfer (retry) / a dead decode (migrate)
    any but FINISHED -> ABORTED  a failure, the client's cancel or its deadline
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from pdserve_api import pdserve_pb2
from router.api import ParsedRequest, PhaseTimes, final_response
from router.slo import RequestInfo


class Phase(Enum):
    ADMIT = "admit"  # validated, tokenized, admitted by the SLO scheduler
    PLACE = "place"  # waiting for a prefill slot
    RESERVE = "reserve"  # asking decode workers for KV blocks
    PREFILL = "prefill"  # the prefill (or colocated) worker computes the first token
    STREAM = "stream"  # relaying the decode (or colocated) worker's tokens
    RETRY = "retry"  # a failed attempt; the next one re-prefills what was streamed
    FINISHED = "finished"  # the final message was built
    ABORTED = "aborted"  # ended without one; whatever workers hold must be freed


_NEXT = {
    Phase.ADMIT: {Phase.PLACE},
    Phase.PLACE: {Phase.RESERVE, Phase.PREFILL},
    Phase.RESERVE: {Phase.PREFILL},
    Phase.PREFILL: {Phase.STREAM, Phase.RETRY, Phase.FINISHED},
    Phase.STREAM: {Phase.RETRY, Phase.FINISHED},
    Phase.RETRY: {Phase.PLACE},
    Phase.FINISHED: set(),
    Phase.ABORTED: set(),
}


class RetryKind(Enum):
    TRANSFER = "transfer"  # the KV transfer failed: prefill again on another pair
    MIGRATION = "migration"  # the decode worker died mid-stream: continue elsewhere


@dataclass(eq=False)
class RouterRequest:
    parsed: ParsedRequest  # the client's request, validated (router/api.py)
    token_ids: list[int]  # the prompt, tokenized
    info: RequestInfo  # what the SLO scheduler ranks it by
    hits: dict[str, int]  # leading cached blocks per prefill worker (the index's answer)
    arrival: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.ADMIT
    attempt: int = 0  # 0, then one more per retry or migration
    prefill_id: str | None = None  # the worker computing (or that computed) the prompt
    # The decode worker that holds (or is being asked for) a reservation; set before the
    # `reserve` call is sent, so that a cancel during it frees the reservation too.
    decode_id: str | None = None
    generated: list[int] = field(default_factory=list)  # tokens the client already has
    retries: dict[RetryKind, int] = field(default_factory=dict)
    excluded_decode: set[str] = field(default_factory=set)  # failed this request
    cached_tokens: int = 0
    transport: str = "none"
    timing: PhaseTimes = field(default_factory=PhaseTimes)
    segment_start: float = 0.0  # when this attempt started waiting (queued time)

    def __post_init__(self) -> None:
        self.segment_start = self.arrival

    @property
    def request_id(self) -> str:
        return self.parsed.request_id

    @property
    def worker_rid(self) -> str:
        """The id workers know this attempt by: a retry must not collide with the failed
        attempt's leftovers on the same worker."""
        return self.request_id if self.attempt == 0 else f"{self.request_id}#{self.attempt}"

    @property
    def prompt(self) -> list[int]:
        """What this attempt prefills: the prompt plus what was already streamed."""
        return self.token_ids + self.generated

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    @property
    def num_retries(self) -> int:
        return sum(self.retries.values())

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.ABORTED)

    def advance(self, phase: Phase) -> None:
        if phase is not Phase.ABORTED and phase not in _NEXT[self.phase]:
            raise RuntimeError(f"request {self.request_id}: {self.phase.value} -> "
                               f"{phase.value} is not a transition")
        if self.done:
            raise RuntimeError(f"request {self.request_id} already ended ({self.phase.value})")
        self.phase = phase

    def retry(self, kind: RetryKind) -> None:
        """Start the next attempt (RETRY -> PLACE happens when it is placed)."""
        self.advance(Phase.RETRY)
        self.retries[kind] = self.retries.get(kind, 0) + 1
        self.attempt += 1
        self.decode_id = None
        self.segment_start = time.monotonic()  # the failed attempt is not queueing

    def final(self, reason: str, token_ids: list[int], text: str
              ) -> pdserve_pb2.GenerateResponse:
        """The last message (it may carry the last tokens), built from the timings."""
        self.advance(Phase.FINISHED)
        self.timing.e2e_ms = 1e3 * (time.monotonic() - self.arrival)
        return final_response(
            self.request_id, finish_reason=reason, prompt_tokens=len(self.token_ids),
            cached_tokens=self.cached_tokens, completion_tokens=self.completion_tokens,
            timing=self.timing, prefill_worker=self.prefill_id or "",
            decode_worker=self.decode_id or "", kv_transport=self.transport,
            retries=self.num_retries, token_ids=token_ids, text=text)
