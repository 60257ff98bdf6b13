"""The transport contract: a KVReceiver on the decode side, a KVSender on the prefill side.

Life of one transfer (see ../shared/DESIGN.md, "KV transfer"):
1. The decode worker reserves blocks (`LLMEngine.reserve_kv`) and tells its receiver to expect
   them: `pending = receiver.expect(request_id, dst_block_ids, on_done, timeout_s)`. It hands
   `receiver.address` and the block ids to the prefill side (through the router).
2. The prefill side opens a session from its pool's source blocks into those destination
   blocks: `s = sender.open(address, request_id, src_ids, dst_ids)`. The receiver checks the
   header (model, dtype, block size, layers, KV heads, TP rank), that the request is expected
   and that the destination ids are the reserved ones, before a byte is written; a refusal
   raises `KVLayoutMismatch` or `TransferError` on the sender and fails the pending transfer.
3. `s.send_layer(layer)` as each layer's KV is final (layer-wise streaming; any order, each
   layer once), then `s.finish(KVControl(...))`, which returns when the receiver has every
   byte. `sender.send(...)` does 2-3 for a whole request.
4. The receiver reports exactly once per `expect`: a `TransferResult` through `on_done` (called
   on a transport thread: hand it to the engine's loop, the engine is not thread-safe) and
   through `pending.wait()`. ok -> the owner calls `commit_kv(request_id,
   control.num_computed_tokens, control.output_token_ids)`; not ok (refused, sender died, timed
   out, cancelled) -> the owner calls `cancel_reservation(request_id)`, and by then the
   transport has stopped writing into those blocks. No blocks leak.

Different TP sizes (kv_transfer/tp_plan.py): each TP rank has its own pool and receiver or
sender. A decode rank expects `num_senders` sessions for one request, one per route; each is
opened with `heads=HeadSlice(src_head, dst_head, count)`, moves those head slots of every
(layer, block) region, and may come from a pool whose layout differs in head count and TP
place only. The sessions must write disjoint head slots (an overlapping one is refused). The
pending transfer is ok once every session finished ok with the same control message; it
fails, once, as soon as one fails, aborts or times out, and the other sessions' writers are
stopped before the owner hears (their senders get an error). A sender's own `finish` returns
when its session's bytes landed: the owner's report is the one that covers the request.

A receiver keeps serving other transfers after any single failure.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kv_transfer.header import (
    HEAD_FIELDS,
    MAX_TP_SIZE,
    HeaderError,
    HeadSlice,
    KVLayout,
    KVLayoutMismatch,
)
from kv_transfer.pool import KVPool

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

MAX_OUTPUT_TOKENS = 4096
_CTRL = struct.Struct("!II")


class TransferError(RuntimeError):
    """A transfer did not complete: refused by the receiver, peer gone, or timed out."""


@dataclass(frozen=True)
class KVControl:
    """Rides with the blocks. Read by the decode side's owner for `commit_kv`."""

    request_id: str
    num_computed_tokens: int  # tokens whose KV the blocks hold
    output_token_ids: tuple[int, ...] = ()  # tokens the prefill side already sampled

    def encode(self) -> bytes:
        if len(self.output_token_ids) > MAX_OUTPUT_TOKENS:
            raise ValueError(f"more than {MAX_OUTPUT_TOKENS} output tokens in a KV control")
        toks = struct.pack(f"<{len(self.output_token_ids)}i", *self.output_token_ids)
        return _CTRL.pack(self.num_computed_tokens, len(self.output_token_ids)) + toks

    @classmethod
    def decode(cls, request_id: str, payload: bytes) -> KVControl:
        if len(payload) < _CTRL.size:
            raise HeaderError(f"control message of {len(payload)} bytes is too short")
        computed, n = _CTRL.unpack_from(payload)
        if n > MAX_OUTPUT_TOKENS or len(payload) != _CTRL.size + 4 * n:
            raise HeaderError(f"control message says {n} tokens in {len(payload)} bytes")
        tokens = struct.unpack_from(f"<{n}i", payload, _CTRL.size)
        return cls(request_id, computed, tuple(tokens))


@dataclass(frozen=True)
class TransferResult:
    """One transfer's outcome. Receiver side: handed to the owner once per `expect`."""

    request_id: str
    ok: bool
    control: KVControl | None = None  # set when ok
    error: str | None = None  # set when not ok: why
    num_bytes: int = 0  # KV bytes moved
    elapsed_s: float = 0.0  # receiver: first header to completion; sender: open to finish


class RefuseCode(enum.IntEnum):
    LAYOUT = 1
    UNKNOWN_REQUEST = 2
    BAD_BLOCKS = 3
    STATE = 4


class Refused(Exception):
    """Receiver-side refusal of a BEGIN; transports put it on the wire as REFUSE."""

    def __init__(self, code: RefuseCode, message: str):
        super().__init__(message)
        self.code = code


def refusal_error(code: int, message: str) -> Exception:
    """The sender-side exception for a receiver's refusal."""
    if code == RefuseCode.LAYOUT:
        return KVLayoutMismatch(f"receiver refused: {message}")
    return TransferError(f"receiver refused: {message}")


class State(enum.Enum):
    WAITING = "waiting"  # expected, no sender accepted yet
    ACTIVE = "active"  # at least one sender was accepted; bytes may be landing
    DONE = "done"
    FAILED = "failed"


# How long a failing transfer waits for its other sessions' writers to stop before it reports
# anyway (a socket writer stops within milliseconds of its socket being shut down).
QUIET_WAIT_S = 5.0
# The watchdog reports a transfer whose woken writers never answered this long after its
# deadline (a safety net: they normally fail it themselves at once).
GRACE_S = 5.0


@dataclass(eq=False)
class PendingTransfer:
    """A reservation waiting for its KV. Read by the owner: `wait()`, `done()`, `result`."""

    request_id: str
    dst_block_ids: tuple[int, ...]
    deadline: float  # time.monotonic() by which it must be DONE
    on_done: Callable[[TransferResult], None] | None = None
    num_senders: int = 1  # sessions (one per source rank route) that must all finish ok
    state: State = State.WAITING
    result: TransferResult | None = None
    started: float = 0.0
    parts: list[Part] = field(default_factory=list)  # accepted sessions, under `lock`
    # Set (under `lock`) when the owner's cancel or the deadline woke the writers: the session
    # threads then fail the transfer with this reason once they have stopped writing.
    stop_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _event: threading.Event = field(default_factory=threading.Event)

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> TransferResult | None:
        """The result, or None if still pending after `timeout` seconds."""
        self._event.wait(timeout)
        return self.result

    @property
    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def merge_controls(controls: list[KVControl]) -> tuple[KVControl | None, str | None]:
    """One transfer's senders' control messages -> (the control, None) or (None, error).
    They must agree on the tokens computed; only a prefill TP group's rank 0 samples, so the
    other ranks send no output tokens, and the non-empty ones must agree."""
    sampled = {c.output_token_ids for c in controls if c.output_token_ids}
    if len({c.num_computed_tokens for c in controls}) > 1 or len(sampled) > 1:
        return None, ("senders disagree on the control message: "
                      f"{sorted({repr(c) for c in controls})[:4]}")
    return dataclasses.replace(controls[0], output_token_ids=next(iter(sampled), ())), None


@dataclass(eq=False)
class Part:
    """One sender's session of a pending transfer, receiver side; read by the transport that
    serves it. Its writer (the thread or UCX requests putting its bytes into the pool) stops
    before `quiet` is set; a failing transfer calls `wake` on the others and waits for their
    `quiet` before the owner hears, so no byte lands after the report."""

    pt: PendingTransfer
    layout: KVLayout  # the sender's, from its BEGIN
    heads: HeadSlice | None  # as the sender asked; None: every head, layouts equal
    dst_heads: range  # destination pool head slots it writes
    num_bytes: int  # KV bytes it moves
    wake: Callable[[], None] | None = None  # interrupt the writer; any thread, never raises
    quiet: threading.Event = field(default_factory=threading.Event)
    control: KVControl | None = None  # set when every byte of it landed


def _fits(heads: HeadSlice, src_slots: int, dst_slots: int) -> None:
    if heads.src_head + heads.count > src_slots:
        raise KVLayoutMismatch(
            f"head slice reads sender slots [{heads.src_head}, {heads.src_head + heads.count})"
            f" but the sender's pool has {src_slots} head slots", ("num_kv_heads",))
    if heads.dst_head + heads.count > dst_slots:
        raise KVLayoutMismatch(
            f"head slice writes slots [{heads.dst_head}, {heads.dst_head + heads.count}) but "
            f"this pool has {dst_slots} head slots", ("num_kv_heads",))


def check_heads(heads: HeadSlice | None, src: KVLayout, dst: KVLayout) -> None:
    """Raise KVLayoutMismatch unless `src` blocks may move into `dst` with `heads`: whole
    blocks need equal layouts; a head slice needs layouts equal but for HEAD_FIELDS and both
    head ranges inside their pools."""
    if heads is None:
        dst.check_compatible(src)
        return
    dst.check_compatible(src, ignore=HEAD_FIELDS)
    _fits(heads, src.num_kv_heads, dst.num_kv_heads)


class ReceiverCore:
    """Bookkeeping every receiver shares: expected transfers, their checks, deadlines and the
    exactly-once report to the owner."""

    def __init__(self, pool: KVPool, name: str):
        self.pool = pool
        self.name = name
        self._pending: dict[str, PendingTransfer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def expect(self, request_id: str, dst_block_ids: Sequence[int],
               on_done: Callable[[TransferResult], None] | None = None,
               timeout_s: float = 30.0, num_senders: int = 1) -> PendingTransfer:
        if self._stop.is_set():
            raise TransferError(f"{self.name} is closed")
        ids = tuple(int(i) for i in dst_block_ids)
        if not ids:
            raise ValueError("a transfer needs at least one destination block")
        if not 1 <= num_senders <= MAX_TP_SIZE:
            raise ValueError(f"num_senders {num_senders} outside [1, {MAX_TP_SIZE}]")
        self.pool.check_ids(ids, "destination")
        pt = PendingTransfer(request_id, ids, time.monotonic() + timeout_s, on_done,
                             num_senders)
        with self._lock:
            if request_id in self._pending:
                raise ValueError(f"request {request_id!r} is already expected here")
            self._pending[request_id] = pt
        return pt

    def cancel(self, request_id: str, reason: str = "cancelled by the owner") -> bool:
        """Stop expecting a transfer. One with no session writing fails now; otherwise the
        writers are woken and fail it as soon as they have stopped. False if unknown or
        already finished."""
        with self._lock:
            pt = self._pending.get(request_id)
        return pt is not None and self._stop_transfer(pt, reason)

    def _stop_transfer(self, pt: PendingTransfer, reason: str) -> bool:
        """Fail `pt` from outside its sessions' threads (owner, watchdog) without waiting on
        them: at once where nothing is writing, else through the woken writers."""
        with pt.lock:
            if pt.state in (State.DONE, State.FAILED):
                return False
            busy = [p for p in pt.parts if not p.quiet.is_set()]
            if busy:
                if pt.stop_reason is not None:
                    return True  # already woken
                pt.stop_reason = reason
        if not busy:
            return self.finish(pt, ok=False, error=reason)
        for part in busy:
            if part.wake is not None:
                part.wake()
        return True

    def claim(self, layout: KVLayout, request_id: str, src_ids: Sequence[int],
              dst_ids: Sequence[int], heads: HeadSlice | None = None,
              wake: Callable[[], None] | None = None, serialized: bool = False) -> Part:
        """Validate a sender's BEGIN; on success the returned part is one of the transfer's
        sessions and the caller may write its head slots of the destination blocks. Raises
        Refused (and fails the pending transfer where the refusal means its data will not
        come). `wake` interrupts the caller's writer (see Part); `serialized`: the writer holds
        pt.lock while writing and checks the state first (local transport), so the part is
        quiet whenever the lock is free."""
        with self._lock:
            pt = self._pending.get(request_id)
        own = self.pool.layout
        try:
            check_heads(heads, layout, own)
        except KVLayoutMismatch as e:
            if pt is not None:
                self.finish(pt, ok=False, error=str(e))
            raise Refused(RefuseCode.LAYOUT, str(e)) from None
        if pt is None:
            raise Refused(RefuseCode.UNKNOWN_REQUEST,
                          f"no reservation for request {request_id!r} here (never made, "
                          "expired or cancelled)")
        problem = None
        if len(src_ids) != len(dst_ids):
            problem = f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks"
        elif tuple(dst_ids) != pt.dst_block_ids:
            problem = (f"destination blocks {list(dst_ids)[:8]} are not the ones reserved "
                       f"{list(pt.dst_block_ids)[:8]}")
        elif len(set(src_ids)) != len(src_ids) or min(src_ids) < 0:
            problem = "source block ids repeat or are negative"
        if problem is not None:
            self.finish(pt, ok=False, error=problem)
            raise Refused(RefuseCode.BAD_BLOCKS, problem)
        dst_heads = range(own.num_kv_heads) if heads is None else heads.dst_range
        part = Part(pt, layout, heads, dst_heads,
                    len(dst_ids) * 2 * own.num_layers * len(dst_heads) * own.head_region_bytes,
                    wake)
        if serialized:
            part.quiet.set()
        with pt.lock:
            if pt.state not in (State.WAITING, State.ACTIVE) or len(pt.parts) >= pt.num_senders:
                more = (f" with all {pt.num_senders} of its senders"
                        if pt.num_senders > 1 and pt.state == State.ACTIVE else "")
                raise Refused(RefuseCode.STATE, f"request {request_id!r} is "
                              f"{pt.state.value}{more}")
            clash = next((p.dst_heads for p in pt.parts
                          if p.dst_heads.start < dst_heads.stop
                          and dst_heads.start < p.dst_heads.stop), None)
            if clash is None:
                pt.parts.append(part)
                if pt.state == State.WAITING:
                    pt.state = State.ACTIVE
                    pt.started = time.monotonic()
                return part
        problem = (f"head slots [{dst_heads.start}, {dst_heads.stop}) overlap slots "
                   f"[{clash.start}, {clash.stop}) another sender of {request_id!r} writes")
        self.finish(pt, ok=False, error=problem)
        raise Refused(RefuseCode.BAD_BLOCKS, problem)

    def part_done(self, part: Part, control: KVControl) -> bool:
        """Every byte of `part` landed and its END arrived. The transfer is reported ok once
        all its senders are done and agree on the control message. False if the transfer
        failed meanwhile (or fails now): the caller tells that sender."""
        pt, error = part.pt, None
        with pt.lock:
            part.control = control
            part.quiet.set()
            if pt.state != State.ACTIVE:
                return False
            if pt.stop_reason is not None:
                error = pt.stop_reason
            else:
                done = [p for p in pt.parts if p.control is not None]
                if len(done) < pt.num_senders:
                    return True
                control, error = merge_controls([p.control for p in done])
        if error is not None:
            self.finish(pt, ok=False, error=error)
            return False
        return self.finish(pt, ok=True, control=control,
                           num_bytes=sum(p.num_bytes for p in pt.parts))

    def part_failed(self, part: Part, error: str) -> bool:
        """`part`'s writer has stopped after an error (or its sender aborted): the transfer
        fails, with the owner's or the deadline's reason where one woke it."""
        part.quiet.set()
        return self.finish(part.pt, ok=False, error=part.pt.stop_reason or error)

    def finish(self, pt: PendingTransfer, ok: bool, control: KVControl | None = None,
               error: str | None = None, num_bytes: int = 0) -> bool:
        """Report a transfer's outcome once. Returns False if it was already reported. A
        failure first stops every session still writing (see Part)."""
        with pt.lock:
            if pt.state in (State.DONE, State.FAILED):
                return False
            pt.state = State.DONE if ok else State.FAILED
            busy = [] if ok else [p for p in pt.parts if not p.quiet.is_set()]
        for part in busy:
            if part.wake is not None:
                part.wake()
        for part in busy:
            if not part.quiet.wait(QUIET_WAIT_S):
                log.error("%s: a session of %s was still writing %.0f s after the transfer "
                          "failed", self.name, pt.request_id, QUIET_WAIT_S)
        with pt.lock:
            elapsed = time.monotonic() - pt.started if pt.started else 0.0
            pt.result = TransferResult(pt.request_id, ok, control if ok else None,
                                       None if ok else (error or "failed"), num_bytes, elapsed)
        with self._lock:
            if self._pending.get(pt.request_id) is pt:
                del self._pending[pt.request_id]
        if not ok:
            log.warning("%s: KV transfer %s failed: %s", self.name, pt.request_id, error)
        pt._event.set()
        if pt.on_done is not None:
            try:
                pt.on_done(pt.result)
            except Exception:  # the owner's bug must not kill a transport thread
                log.exception("%s: on_done callback for %s raised", self.name, pt.request_id)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._lock:
                due = [pt for pt in self._pending.values() if pt.deadline <= now]
            for pt in due:
                reason = (f"timed out: no complete transfer by the deadline (was "
                          f"{pt.state.value})")
                if now > pt.deadline + GRACE_S:  # woken writers never answered
                    self.finish(pt, ok=False, error=reason)
                else:
                    self._stop_transfer(pt, reason)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            pending = list(self._pending.values())
        for pt in pending:
            self.finish(pt, ok=False, error=f"{self.name} closed")


class KVReceiver(ABC):
    """Bound to one pool; listens on `address`; writes incoming blocks into the reserved
    destination blocks of that pool."""

    pool: KVPool
    address: str
    _core: ReceiverCore

    def expect(self, request_id: str, dst_block_ids: Sequence[int],
               on_done: Callable[[TransferResult], None] | None = None,
               timeout_s: float = 30.0, num_senders: int = 1) -> PendingTransfer:
        """Register a reservation; exactly one TransferResult follows (see module doc).
        `num_senders`: sessions that together fill these blocks, each a disjoint run of head
        slots (source ranks of another TP size, kv_transfer/tp_plan.py)."""
        return self._core.expect(request_id, dst_block_ids, on_done, timeout_s, num_senders)

    def cancel(self, request_id: str) -> bool:
        return self._core.cancel(request_id)

    @abstractmethod
    def close(self) -> None:
        """Stop listening; every still-pending transfer fails (and its owner is told)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SendSession(ABC):
    """One request's transfer from the sender's pool. Not thread-safe: one caller drives it."""

    request_id: str

    @abstractmethod
    def send_layer(self, layer: int) -> None:
        """Ship K and V of `layer` for every block of the transfer. TCP: returns once the bytes
        are handed to the kernel; UCX: once posted (finish waits for them)."""

    @abstractmethod
    def finish(self, control: KVControl) -> TransferResult:
        """Send the control message; return once the receiver confirms every byte landed.
        Raises TransferError if any layer is missing or the receiver reports failure."""

    @abstractmethod
    def abort(self, reason: str) -> None:
        """Void the transfer (the receiver fails it and its owner frees the blocks)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            try:
                self.abort(f"sender error: {exc}")
            except Exception:  # the original error is the one to surface
                log.debug("abort after error failed", exc_info=True)


class KVSender(ABC):
    """Reads source blocks straight from one pool."""

    pool: KVPool

    def _check_heads(self, heads: HeadSlice | None) -> None:
        """The sender's half of the head-slice check (the receiver checks both)."""
        if heads is not None and heads.src_head + heads.count > self.pool.layout.num_kv_heads:
            raise ValueError(f"head slice {heads} reads past this pool's "
                             f"{self.pool.layout.num_kv_heads} head slots")

    @abstractmethod
    def open(self, address: str, request_id: str, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = 30.0,
             heads: HeadSlice | None = None) -> SendSession:
        """Start a transfer; raises KVLayoutMismatch / TransferError if the receiver refuses.
        `heads`: move only these head slots (the receiver's layout may then differ in head
        count and TP place); None: whole blocks between equal layouts."""

    def connect(self, address: str) -> None:  # noqa: B027 - optional: a no-op by default
        """Set up and keep a connection to address ahead of the first transfer there, so that
        request does not pay the handshake. Raises TransferError if the receiver is not
        reachable. Transports without connections have nothing to do."""

    def send(self, address: str, control: KVControl, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = 30.0,
             heads: HeadSlice | None = None) -> TransferResult:
        """Whole-request transfer: every layer, then the control message."""
        with self.open(address, control.request_id, src_block_ids, dst_block_ids,
                       timeout_s, heads) as session:
            for layer in range(self.pool.layout.num_layers):
                session.send_layer(layer)
            return session.finish(control)

    def close(self) -> None:  # noqa: B027 - optional: a no-op by default
        """Drop idle connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_layer(layer: int, num_layers: int, sent: set[int]) -> None:
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside [0, {num_layers})")
    if layer in sent:
        raise ValueError(f"layer {layer} already sent")
