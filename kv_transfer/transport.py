"""The transport contract: a KVReceiver on the decode side, a KVSender on the prefill side.

Life of one transfer (see ../shared/DESIGN.md, "KV transfer"):
1. The decode worker reserves blocks (`LLMEngine.reserve_kv`) and tells its receiver to expect
   them: `pending = receiver.expect(request_id, dst_block_ids, on_done, lease_s)`. It hands
   `receiver.address` and the block ids to the prefill side (through the router). The
   reservation lives `lease_s` past the prefill side's last sign of life: until its session
   opens, the prefill side renews it with `sender.keepalive(address, [request_id])`; after,
   every layer renews it (receiver_core.py).
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
   control.num_computed_tokens, control.output_token_ids)`; not ok (refused, sender died, lease
   ran out, cancelled) -> the owner calls `cancel_reservation(request_id)`, and by then the
   transport has stopped writing into those blocks. No blocks leak. The connectors
   (prefill_connector.py, decode_connector.py) drive this life for the workers.

Different TP sizes (kv_transfer/tp_plan.py): each TP rank has its own pool and receiver or
sender. A decode rank expects `num_senders` sessions for one request, one per route; each is
opened with `heads=HeadSlice(src_head, dst_head, count)`, moves those head slots of every
(layer, block) region, and may come from a pool whose layout differs in head count and TP
place only. The sessions must write disjoint head slots (an overlapping one is refused). The
pending transfer is ok once every session finished ok with the same control message; it
fails, once, as soon as one fails, aborts or its lease runs out, and the other sessions' writers are
stopped before the owner hears (their senders get an error). A sender's own `finish` returns
when its session's bytes landed: the owner's report is the one that covers the request.

A receiver keeps serving other transfers after any single failure.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from kv_transfer.control import KVControl, TransferResult
from kv_transfer.header import HeadSlice
from kv_transfer.pool import KVPool
from kv_transfer.receiver_core import DEFAULT_LEASE_S, PendingTransfer, ReceiverCore

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


class KVReceiver(ABC):
    """Bound to one pool; listens on `address`; writes incoming blocks into the reserved
    destination blocks of that pool."""

    pool: KVPool
    address: str
    _core: ReceiverCore

    def expect(self, request_id: str, dst_block_ids: Sequence[int],
               on_done: Callable[[TransferResult], None] | None = None,
               lease_s: float = DEFAULT_LEASE_S, num_senders: int = 1) -> PendingTransfer:
        """Register a reservation; exactly one TransferResult follows (see module doc).
        `lease_s`: how long it lives without a sign of life from the prefill side.
        `num_senders`: sessions that together fill these blocks, each a disjoint run of head
        slots (source ranks of another TP size, kv_transfer/tp_plan.py)."""
        return self._core.expect(request_id, dst_block_ids, on_done, lease_s, num_senders)

    def cancel(self, request_id: str) -> bool:
        return self._core.cancel(request_id)

    def renew(self, request_ids: Iterable[str]) -> list[str]:
        """Renew these reservations' leases here (what a KEEPALIVE does); returns the ids
        not expected here."""
        return self._core.renew(request_ids)

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
             dst_block_ids: Sequence[int], timeout_s: float = DEFAULT_LEASE_S,
             heads: HeadSlice | None = None) -> SendSession:
        """Start a transfer; raises KVLayoutMismatch / TransferError if the receiver refuses.
        `timeout_s`: how long the session may go without progress (each layer sent renews
        it). `heads`: move only these head slots (the receiver's layout may then differ in
        head count and TP place); None: whole blocks between equal layouts."""

    @abstractmethod
    def keepalive(self, address: str, request_ids: Sequence[str]) -> None:
        """Renew the leases of these reservations at the receiver `address` (requests whose
        sessions are not open yet). Raises TransferError if the receiver is not reachable."""

    def connect(self, address: str) -> None:  # noqa: B027 - optional: a no-op by default
        """Set up and keep a connection to address ahead of the first transfer there, so that
        request does not pay the handshake. Raises TransferError if the receiver is not
        reachable. Transports without connections have nothing to do."""

    def send(self, address: str, control: KVControl, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = DEFAULT_LEASE_S,
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
