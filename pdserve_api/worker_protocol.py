"""The router <-> worker protocol: every message crossing that boundary (Ray actor calls), one
slotted dataclass each, pickled by Ray as is.

Contract: a worker's Ray methods take and return only these (or plain ids and lists of them);
the full request (prompt and `SamplingParams`) goes to a worker once (`ReserveRequest`,
`PrefillRequest`, `ColocatedRequest`), later calls carry its id (`next_items`, `abort`). Each
field's comment says who reads it. Round-trip tested through Ray's serializer in
tests/test_worker_protocol.py, which also fails on a worker method annotated with an untyped
dict.

Calls, by worker (prefill_worker/, decode_worker/, colocated_worker/, worker_host/):
    every worker   ready() / adopt() -> ReadyInfo; stats() -> WorkerStats;
                   check_integrity() -> IntegrityReport; abort(request_id) -> bool
    prefill        connect_decode(addresses) -> {address: error}; prefill(PrefillRequest)
                   -> PrefillResult
    decode         reserve(ReserveRequest) -> Reservation | Refused;
                   next_items(request_id) -> [StreamItem]
    colocated      generate(ColocatedRequest) -> Refused | None; next_items as decode
    TP follower    ready() -> FollowerReady; alive() -> FollowerAlive; plan_send(SendPlan);
                   send_result(request_id) / kv_result(request_id) -> RankTransfer;
                   expect_kv(ExpectKV)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pdserve_api.sampling import SamplingParams

# ---- start-up and heartbeat ------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ReadyInfo:
    """A pool worker's answer to `ready` / `adopt`: it has loaded its model and serves."""

    worker_id: str  # launcher: logs; router: which pool entry this is
    mode: str  # "prefill" | "decode" | "colocated" (engine.config.EngineMode value)
    num_blocks: int  # launcher, tests: the KV pool's size
    block_size: int  # launcher: ModelInfo.block_size (prefix hashing in the router)
    max_model_len: int  # launcher: the smallest over workers bounds the prompt length
    metrics: str  # launcher: host:port of this worker's /metrics (scrape targets)
    pid: int  # tests and bench: the process to signal
    transport: str  # launcher: logs; "none" for a colocated worker
    tp_size: int = 1  # router: a decode reservation plans head routes by the prefill TP size
    # router: the decode worker's KV receivers, one per TP rank, handed to prefill workers
    # (empty for prefill and colocated workers).
    kv_addresses: list[str] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class WorkerStats:
    """The router's heartbeat (`stats`), answered without waiting for the engine thread."""

    worker_id: str  # router: logs
    free_blocks: int  # router: decode placement (router/decode_ranking.py)
    num_running: int  # router: decode placement
    num_blocks: int  # router, tests: pool size
    num_waiting: int  # tests: the engine's queue
    num_held: int  # tests: requests the engine holds (running, waiting or prefilled)
    step_s: float  # router: smoothed step time (decode TPOT model)
    batch: int  # tests: the last step's batch
    steps: int  # router: step_s means nothing before the first step


@dataclass(slots=True, frozen=True)
class IntegrityReport:
    """`check_integrity`: block accounting checked (it raises otherwise) and what is held."""

    free_blocks: int  # tests: equals num_blocks when idle (cached blocks count as free)
    num_blocks: int
    requests: list[str]  # tests, launcher: ids the engine still holds
    jobs: list[str] = field(default_factory=list)  # tests: prefill transfers not resolved


@dataclass(slots=True, frozen=True)
class WorkerLoad:
    """Decode load as of a reply, for placement (router: DecodeRanking.update)."""

    free_blocks: int
    num_running: int


# ---- decode reservation ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ReserveRequest:
    """Router -> decode worker: hold KV blocks for a prompt about to be prefilled elsewhere."""

    request_id: str  # decode worker: engine request id, stream key, transfer id
    prompt_token_ids: list[int]  # decode worker: what the KV covers (and prefix reuse)
    sampling: SamplingParams  # decode worker: how to continue after the first token
    kv_timeout_s: float  # decode worker: the reservation is freed if no KV came by then
    src_tp: int = 1  # decode worker: TP size of the prefill worker, for head routes


@dataclass(slots=True, frozen=True)
class Reservation:
    """Decode worker -> router: blocks held; the router passes both lists to prefill."""

    addresses: list[str]  # prefill worker: the receivers, by decode TP rank
    block_ids: list[int]  # prefill worker: where the prompt's KV goes
    load: WorkerLoad  # router: placement


class RefusalReason(Enum):
    NO_KV_SPACE = "no_kv_space"  # router: try another decode worker or wait
    ERROR = "error"  # router: the request fails (a bug or a dying worker)


@dataclass(slots=True, frozen=True)
class Refused:
    """A worker did not take the request; nothing is held for it."""

    reason: RefusalReason  # router: wait and retry, or fail
    message: str  # router: the client's error / the log
    load: WorkerLoad | None = None  # router: decode placement (decode workers only)


# ---- prefill -----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class PrefillRequest:
    """Router -> prefill worker: compute the prompt's KV into a decode reservation."""

    request_id: str  # prefill worker: engine request id, transfer id (= the reservation's)
    prompt_token_ids: list[int]
    sampling: SamplingParams  # prefill worker: samples the first token
    dst_addresses: list[str]  # prefill worker (and TP followers): Reservation.addresses
    dst_block_ids: list[int]  # Reservation.block_ids


@dataclass(slots=True, frozen=True)
class PrefillTiming:
    """What a prompt's prefill cost on its worker, from the engine's request stamps
    (engine.request.Request: arrival_time, first_scheduled_time, first_token_time)."""

    num_cached_tokens: int  # router: FinalInfo.cached_tokens (prefix-cache hit)
    queued_s: float  # router: arrival at the engine -> first scheduled
    prefill_s: float  # router: first scheduled -> first token sampled


class FailedSide(Enum):
    """Which side of a P/D pair a failed prefill points at (router: what a retry avoids)."""

    PREFILL = "prefill"  # the prefill worker (or one of its TP ranks) died or failed
    DECODE = "decode"  # the receiver refused, timed out or went away


@dataclass(slots=True, frozen=True)
class PrefillResult:
    """Prefill worker -> router: the first token, or why there is none.

    `error` None: served; the router streams `token_ids`/`text` and, unless `finished`, the
    decode worker continues. `error` set with `retry_on` set: the KV transfer failed and the
    request may be retried on another worker of that side; `retry_on` None: it fails."""

    request_id: str
    worker_id: str  # router: logs
    token_ids: list[int] = field(default_factory=list)  # router: the first token
    text: str = ""  # router: its text
    finished: bool = False  # router: the first token ended the request (stop / length)
    finish_reason: str | None = None  # router: FinalInfo.finish_reason when finished
    timing: PrefillTiming | None = None  # router: FinalInfo.timing (None when not computed)
    transfer_s: float = 0.0  # router: transfer tail after the compute
    transport: str = "none"  # router: FinalInfo.kv_transport, transfer metrics
    error: str | None = None  # router: what failed
    retry_on: FailedSide | None = None  # router: the side to exclude on a retry


# ---- token streams (decode and colocated workers) ------------------------------------------


class StreamKind(Enum):
    TOKENS = "tokens"  # new tokens (maybe none, with text held back by stop strings)
    FINISHED = "finished"  # the last item: finish_reason set
    ERROR = "error"  # the last item: the request failed here; error says why


@dataclass(slots=True, frozen=True)
class StreamItem:
    """One item of a request's stream (`next_items`); the last is FINISHED or ERROR."""

    kind: StreamKind  # router: relay, finish or fail
    token_ids: list[int] = field(default_factory=list)  # router: the client's delta
    text: str = ""
    finish_reason: str | None = None  # router: FinalInfo.finish_reason (FINISHED)
    # router (colocated): the item carrying the first token has the prefill's cost
    timing: PrefillTiming | None = None
    decode_s: float = 0.0  # router: first token (or KV arrival) -> finish (FINISHED)
    error: str | None = None  # router: the client's error (ERROR)

    @property
    def last(self) -> bool:
        return self.kind is not StreamKind.TOKENS


@dataclass(slots=True, frozen=True)
class ColocatedRequest:
    """Router -> colocated worker: prefill and decode the prompt here."""

    request_id: str  # colocated worker: engine request id, stream key
    prompt_token_ids: list[int]
    sampling: SamplingParams


# ---- tensor-parallel follower ranks (rank 0 of the same worker calls these) ---------------


@dataclass(slots=True, frozen=True)
class FollowerReady:
    """A follower rank's `ready`: its shard is loaded and it has joined the TP group."""

    worker_id: str  # "<worker>/tp<rank>": logs
    tp_rank: int
    num_blocks: int
    pid: int  # tests: the process to signal
    kv_address: str | None  # decode rank 0: this rank's receiver (None on other roles)


@dataclass(slots=True, frozen=True)
class FollowerAlive:
    """A follower rank's heartbeat (router), answered off its stepping thread."""

    worker_id: str
    steps: int
    serving: bool  # False once rank 0 has stopped the group


@dataclass(slots=True, frozen=True)
class SendPlan:
    """Prefill rank 0 -> follower: where this rank's KV heads of a request go."""

    request_id: str
    dst_addresses: list[str]  # the decode receivers by TP rank (PrefillRequest's)
    dst_block_ids: list[int]


@dataclass(slots=True, frozen=True)
class ExpectKV:
    """Decode rank 0 -> follower: receive this rank's heads of a request into its blocks."""

    request_id: str
    block_ids: list[int]
    num_senders: int  # prefill ranks that send heads to this rank
    timeout_s: float  # the reservation's deadline (freed when no KV came by then)


@dataclass(slots=True, frozen=True)
class RankTransfer:
    """A follower rank's part of one transfer, once it is over (rank 0 gathers them)."""

    error: str | None = None  # rank 0: the transfer failed on this rank
    num_bytes: int = 0  # rank 0: metrics
