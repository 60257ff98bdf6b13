"""Bookkeeping every receiver shares: the reservations it expects (`PendingTransfer`), the
checks a sender's BEGIN must pass, the lease that keeps a reservation alive, and the
exactly-once report to the owner. Transports (tcp_receiver.py, ucx.py, local.py) move bytes
and call in here; the contract they serve is in transport.py.

Lease: a reservation lives `lease_s` past the last sign of life from its prefill side, not a
fixed time from `expect`. Each sign renews it: a KEEPALIVE naming it (the prefill side's
connector sends one every third of the lease while the request queues or computes), a
session's BEGIN, each layer that arrives. So a slow prefill keeps its reservation for as long
as it makes progress, and a dead or silent one loses it one lease after its last word (the
error says so: "prefill side silent for N s").
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kv_transfer.control import (
    KVControl,
    RefuseCode,
    Refused,
    TransferError,
    TransferResult,
)
from kv_transfer.header import HEAD_FIELDS, MAX_TP_SIZE, HeadSlice, KVLayout, KVLayoutMismatch
from kv_transfer.pool import KVPool

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0

class State(enum.Enum):
    WAITING = "waiting"  # expected, no sender accepted yet
    ACTIVE = "active"  # at least one sender was accepted; bytes may be landing
    DONE = "done"
    FAILED = "failed"


# How long a failing transfer waits for its other sessions' writers to stop before it reports
# anyway (a socket writer stops within milliseconds of its socket being shut down).
QUIET_WAIT_S = 5.0
# The watchdog reports a transfer whose woken writers never answered this long after its
# lease ran out (a safety net: they normally fail it themselves at once).
GRACE_S = 5.0


@dataclass(eq=False)
class PendingTransfer:
    """A reservation waiting for its KV. Read by the owner: `wait()`, `done()`, `result`."""

    request_id: str
    dst_block_ids: tuple[int, ...]
    lease_s: float  # how long it lives without a sign of life from the prefill side
    deadline: float  # time.monotonic(): the lease's end, moved on by `renew`
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

    def renew(self) -> None:
        """The prefill side showed progress: the lease runs `lease_s` from now (unless the
        transfer is already being stopped)."""
        if self.stop_reason is None:
            self.deadline = max(self.deadline, time.monotonic() + self.lease_s)

    def silence(self) -> str:
        """Why the lease ran out, for the owner's error."""
        what = ("no session opened" if self.state == State.WAITING else
                f"{len(self.parts)} of {self.num_senders} sessions open, "
                f"{sum(p.control is not None for p in self.parts)} complete")
        return f"prefill side silent for {self.lease_s:g} s ({what})"


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
    """Bookkeeping every receiver shares: expected transfers, their checks, leases and the
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
               lease_s: float = DEFAULT_LEASE_S, num_senders: int = 1) -> PendingTransfer:
        if self._stop.is_set():
            raise TransferError(f"{self.name} is closed")
        ids = tuple(int(i) for i in dst_block_ids)
        if not ids:
            raise ValueError("a transfer needs at least one destination block")
        if not 1 <= num_senders <= MAX_TP_SIZE:
            raise ValueError(f"num_senders {num_senders} outside [1, {MAX_TP_SIZE}]")
        self.pool.check_ids(ids, "destination")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        pt = PendingTransfer(request_id, ids, lease_s, time.monotonic() + lease_s, on_done,
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

    def renew(self, request_ids: Iterable[str]) -> list[str]:
        """A KEEPALIVE: renew these reservations' leases. Returns the ids not expected here
        (never reserved, expired, cancelled or done)."""
        unknown = []
        with self._lock:
            pending = [(rid, self._pending.get(rid)) for rid in request_ids]
        for rid, pt in pending:
            if pt is None:
                unknown.append(rid)
            else:
                pt.renew()
        return unknown

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
                pt.renew()
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
        pt, error, merged = part.pt, None, None
        with pt.lock:
            part.control = control
            part.quiet.set()
            if pt.state != State.ACTIVE:
                return False
            if pt.stop_reason is not None:
                error = pt.stop_reason
            else:
                done = [p.control for p in pt.parts if p.control is not None]
                if len(done) < pt.num_senders:
                    return True
                merged, error = merge_controls(done)
        if error is not None or merged is None:
            self.finish(pt, ok=False, error=error)
            return False
        return self.finish(pt, ok=True, control=merged,
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
                reason = pt.silence()
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
