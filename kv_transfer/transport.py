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

A receiver keeps serving other transfers after any single failure.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kv_transfer.header import HeaderError, KVLayout, KVLayoutMismatch
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
    WAITING = "waiting"  # expected, nothing arrived yet
    ACTIVE = "active"  # a sender was accepted; bytes may be landing
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False)
class PendingTransfer:
    """A reservation waiting for its KV. Read by the owner: `wait()`, `done()`, `result`."""

    request_id: str
    dst_block_ids: tuple[int, ...]
    deadline: float  # time.monotonic() by which it must be DONE
    on_done: Callable[[TransferResult], None] | None = None
    state: State = State.WAITING
    result: TransferResult | None = None
    started: float = 0.0
    # Local transport: the watchdog may fail an ACTIVE transfer (it takes `lock`, which the
    # writer holds while copying). Socket transports police their own deadline instead, since
    # only the connection thread can stop the bytes that are landing.
    watchdog_fails_active: bool = False
    cancel_requested: bool = False
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
               timeout_s: float = 30.0) -> PendingTransfer:
        if self._stop.is_set():
            raise TransferError(f"{self.name} is closed")
        ids = tuple(int(i) for i in dst_block_ids)
        if not ids:
            raise ValueError("a transfer needs at least one destination block")
        self.pool.check_ids(ids, "destination")
        pt = PendingTransfer(request_id, ids, time.monotonic() + timeout_s, on_done)
        with self._lock:
            if request_id in self._pending:
                raise ValueError(f"request {request_id!r} is already expected here")
            self._pending[request_id] = pt
        return pt

    def cancel(self, request_id: str, reason: str = "cancelled by the owner") -> bool:
        """Stop expecting a transfer. A waiting one fails now; an active one fails at the
        transport's next message boundary. False if unknown or already finished."""
        with self._lock:
            pt = self._pending.get(request_id)
        if pt is None:
            return False
        pt.cancel_requested = True
        with pt.lock:
            waiting = pt.state == State.WAITING
        if waiting or pt.watchdog_fails_active:
            return self.finish(pt, ok=False, error=reason)
        return True

    def claim(self, layout: KVLayout, request_id: str, src_ids: Sequence[int],
              dst_ids: Sequence[int], watchdog_fails_active: bool = False) -> PendingTransfer:
        """Validate a sender's BEGIN; on success the transfer is ACTIVE and the caller may write
        into its destination blocks. Raises Refused (and fails the pending transfer where the
        refusal means its data will not come)."""
        with self._lock:
            pt = self._pending.get(request_id)
        try:
            self.pool.layout.check_compatible(layout)
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
        with pt.lock:
            if pt.state != State.WAITING:
                raise Refused(RefuseCode.STATE, f"request {request_id!r} is {pt.state.value}")
            pt.state = State.ACTIVE
            pt.started = time.monotonic()
            pt.watchdog_fails_active = watchdog_fails_active
        return pt

    def finish(self, pt: PendingTransfer, ok: bool, control: KVControl | None = None,
               error: str | None = None, num_bytes: int = 0) -> bool:
        """Report a transfer's outcome once. Returns False if it was already reported."""
        with pt.lock:
            if pt.state in (State.DONE, State.FAILED):
                return False
            pt.state = State.DONE if ok else State.FAILED
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
                with pt.lock:
                    expire = pt.state == State.WAITING or (
                        pt.state == State.ACTIVE and pt.watchdog_fails_active)
                if expire:
                    self.finish(pt, ok=False, error=f"timed out: no complete transfer by the "
                                f"deadline (was {pt.state.value})")

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
               timeout_s: float = 30.0) -> PendingTransfer:
        """Register a reservation; exactly one TransferResult follows (see module doc)."""
        return self._core.expect(request_id, dst_block_ids, on_done, timeout_s)

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

    @abstractmethod
    def open(self, address: str, request_id: str, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = 30.0) -> SendSession:
        """Start a transfer; raises KVLayoutMismatch / TransferError if the receiver refuses."""

    def connect(self, address: str) -> None:
        """Set up and keep a connection to address ahead of the first transfer there, so that
        request does not pay the handshake. Raises TransferError if the receiver is not
        reachable. Transports without connections have nothing to do."""

    def send(self, address: str, control: KVControl, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = 30.0) -> TransferResult:
        """Whole-request transfer: every layer, then the control message."""
        with self.open(address, control.request_id, src_block_ids, dst_block_ids,
                       timeout_s) as session:
            for layer in range(self.pool.layout.num_layers):
                session.send_layer(layer)
            return session.finish(control)

    def close(self) -> None:
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
