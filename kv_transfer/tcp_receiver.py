"""TCP transport, receiving side: framed messages on a socket, block bytes received straight
into the pool.

Protocol per connection (headers from header.py, framing from wire.py):
    S/R: AUTH x 3                                      (with a cluster secret: auth.py)
    S: HELLO            R: HELLO                       (once per connection)
    S: KEEPALIVE(ids)                                  (between transfers, any number)
    S: BEGIN(ids)       R: ACCEPT(slot) | REFUSE(code, why)
    S: LAYER(l) x L     (any order; payload = K runs then V runs of layer l)
    S: END(control)     R: DONE | FAILED(why)          (or S: ABORT(why) at any point)
A connection carries one transfer at a time and is reused by the sender afterwards
(tcp_sender.py).

Receiving: each LAYER payload is read with `recv_into` directly into memoryviews of the
destination pool's contiguous runs (consecutive destination ids share one view). A
head-sliced session (BEGIN carries a HeadSlice) whose slice is not the whole region receives
each layer into a staging tensor (from the receiver's StagingCache, reused across sessions)
and scatters it into the pool as soon as that layer has landed.

Threads, not asyncio: the blocking `recv_into` calls release the GIL and write where the bytes
belong, a decode worker has a handful of prefill peers (one thread each), and the engine that
owns the pool is synchronous: an event loop would add a hop per chunk and a loop for the
engine to host, for no gain. Waits are bounded by the reservation's lease (receiver_core.py),
re-read while waiting so that a renewal counts; every message from the sender renews it. When
another session of the same request fails (or the owner cancels), the transfer wakes this one
by shutting its socket down (`_wake`); the thread falls out of its read and reports, and only
then is the owner told.

Host pools only move zero-copy; a CUDA pool is staged through host memory (one copy).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.auth import AuthFailed, authenticate_receiver
from kv_transfer.control import MAX_OUTPUT_TOKENS, KVControl, Refused, TransferError
from kv_transfer.header import HeaderError, KVHeader, MsgKind
from kv_transfer.pool import KVPool, Run, runs
from kv_transfer.receiver_core import Part, PendingTransfer, ReceiverCore, State
from kv_transfer.staging import StagingCache
from kv_transfer.transport import KVReceiver, check_layer
from kv_transfer.wire import (
    SMALL_PAYLOAD,
    Conn,
    decode_ids,
    encode_refusal,
    read_header,
    read_message,
    read_payload,
    recv_into_exact,
    send_message,
    tune,
)

log = logging.getLogger(__name__)

_CHUNK = 4 << 20  # staged receives re-arm the deadline per chunk
MAX_KEEPALIVE_IDS = 4096


def _arm(conn: Conn, inc: Incoming) -> None:
    """Socket timeout = what is left of the transfer's lease."""
    remaining = inc.pt.remaining
    if remaining <= 0:
        raise TimeoutError("lease ran out mid-layer")
    conn.sock.settimeout(remaining)


def decode_keepalive(payload: bytes) -> list[str]:
    ids = payload.decode(errors="replace").split("\n") if payload else []
    if len(ids) > MAX_KEEPALIVE_IDS:
        raise HeaderError(f"KEEPALIVE names {len(ids)} requests (at most {MAX_KEEPALIVE_IDS})")
    return ids


@dataclass(eq=False)
class Incoming:
    """Receiver-side state of the transfer (session) a connection is carrying."""

    part: Part
    src: list[int]
    dst: list[int]
    slot: int
    layers: set[int] = field(default_factory=set)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pt(self) -> PendingTransfer:
        return self.part.pt

    @property
    def heads(self) -> range:
        """Destination head slots written."""
        return self.part.dst_heads

    def whole(self, pool: KVPool) -> bool:
        """The session writes whole regions: zero-copy into the pool."""
        return len(self.part.dst_heads) == pool.layout.num_kv_heads

    def layer_bytes(self, pool: KVPool) -> int:
        return 2 * len(self.dst) * len(self.part.dst_heads) * pool.layout.head_region_bytes


class TcpReceiver(KVReceiver):
    scheme = "tcp"

    def __init__(self, pool: KVPool, host: str = "127.0.0.1", port: int = 0,
                 name: str | None = None, secret: bytes | None = None):
        self.pool = pool
        self._secret = secret  # cluster members only (kv_transfer/auth.py)
        self._listener = socket.create_server((host, port))
        host, port = self._listener.getsockname()[:2]
        self.address = f"{self.scheme}://{host}:{port}"
        self._core = ReceiverCore(pool, name or f"{self.scheme}-rx[{self.address}]")
        self._staging = StagingCache(torch.device("cpu"))
        self._conns: set[Conn] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._slots = itertools.count(1)  # next() is atomic under the GIL
        threading.Thread(target=self._accept_loop, name=f"{self._core.name}-accept",
                         daemon=True).start()

    # ---- transport hooks (the UCX transport overrides these) ------------------------------

    def _hello_payload(self, conn: Conn) -> bytes:
        return b""

    def _on_hello(self, conn: Conn, payload: bytes) -> None:
        pass

    def _prepare(self, conn: Conn, inc: Incoming) -> None:
        """After ACCEPT is decided, before it is sent (UCX posts its receives here)."""

    def _wake(self, conn: Conn) -> None:
        """Another session of the transfer failed: make this connection's thread stop writing
        and report (it reads EOF at once)."""
        conn.shutdown()

    def _recv_layer(self, conn: Conn, inc: Incoming, header: KVHeader) -> None:
        expected = inc.layer_bytes(self.pool)
        if header.payload_len != expected:
            raise HeaderError(f"LAYER payload {header.payload_len} bytes, expected {expected}")
        if not inc.whole(self.pool):
            self._recv_staged(conn, inc, header.layer)
            return
        for kv in (0, 1):
            for run in runs(inc.dst):
                _arm(conn, inc)  # per run, so a trickling sender cannot stretch the lease
                self._recv_run(conn.sock, kv, header.layer, run)

    def _recv_staged(self, conn: Conn, inc: Incoming, layer: int) -> None:
        """One layer of a head slice: into the session's staging tensor, then its heads."""
        stage = inc.extra.get("stage")
        if stage is None:
            stage = inc.extra["stage"] = self._staging.take(
                self.pool.staging_shape(len(inc.dst), len(inc.heads)), self.pool.layout.dtype)
        view = stage.view(-1).view(torch.uint8).numpy().data
        for at in range(0, view.nbytes, _CHUNK):
            _arm(conn, inc)
            recv_into_exact(conn.sock, view[at : at + _CHUNK])
        self.pool.scatter_heads(layer, inc.dst, inc.heads, stage)

    def _recv_run(self, sock: socket.socket, kv: int, layer: int, run: Run) -> None:
        if self.pool.device.type == "cpu":
            recv_into_exact(sock, self.pool.run(kv, layer, run.src, run.count).data)
            return
        dst = self.pool.run_tensor(kv, layer, run.src, run.count)
        host = torch.empty(dst.numel(), dtype=torch.uint8, pin_memory=True)
        recv_into_exact(sock, host.numpy().data)
        dst.copy_(host)

    def _await_data(self, conn: Conn, inc: Incoming) -> None:
        """At END: make sure every byte has landed (TCP: all layers were read)."""
        missing = set(range(self.pool.layout.num_layers)) - inc.layers
        if missing:
            raise TransferError(f"END before layers {sorted(missing)[:8]}")

    def _abandon(self, conn: Conn, inc: Incoming) -> None:
        """A transfer failed: stop any write into its blocks before the owner is told."""

    def _release(self, inc: Incoming) -> None:
        """The session is over and nothing writes into its staging any more."""
        stage = inc.extra.pop("stage", None)
        if stage is not None:
            self._staging.give(stage)

    def _drop(self, conn: Conn) -> None:
        """A connection is going away."""

    # ---- serving -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # listener closed
            tune(sock)
            conn = Conn(sock, f"{peer[0]}:{peer[1]}")
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name=f"{self._core.name}-{conn.peer}").start()

    def _serve(self, conn: Conn) -> None:
        try:
            conn.sock.settimeout(10.0)
            if self._secret is not None:
                try:
                    authenticate_receiver(conn.sock, self.pool.layout, self._secret)
                except AuthFailed as e:
                    log.warning("%s: refused KV connection from %s: %s", self._core.name,
                                conn.peer, e)
                    return
            header, payload = read_message(conn.sock, SMALL_PAYLOAD)
            if header.kind != MsgKind.HELLO:
                raise HeaderError(f"expected HELLO, got {header.kind.name}")
            self._on_hello(conn, payload)
            send_message(conn.sock, MsgKind.HELLO, self.pool.layout,
                         payload=self._hello_payload(conn))
            while True:
                conn.sock.settimeout(None)  # idle between transfers
                header = read_header(conn.sock)
                if header.kind == MsgKind.KEEPALIVE:
                    conn.sock.settimeout(10.0)
                    self._core.renew(decode_keepalive(
                        read_payload(conn.sock, header, SMALL_PAYLOAD)))
                    continue
                if header.kind != MsgKind.BEGIN:
                    raise HeaderError(f"expected BEGIN, got {header.kind.name}")
                if not self._transfer(conn, header):
                    return
        except (OSError, HeaderError, TransferError) as e:
            if not self._closed:
                log.debug("%s: connection %s ends: %s", self._core.name, conn.peer, e)
        finally:
            self._drop(conn)
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def _transfer(self, conn: Conn, begin: KVHeader) -> bool:
        """One transfer on this connection. Returns False when the connection must close."""
        # Destination ids cannot outnumber the pool: bound the read by it.
        payload = read_payload(conn.sock, begin, 8 * self.pool.num_blocks)
        src, dst = decode_ids(payload, begin.num_blocks)
        lay = self.pool.layout
        try:
            part = self._core.claim(begin.layout, begin.request_id, src, dst, begin.heads,
                                    wake=lambda: self._wake(conn))
        except Refused as e:
            send_message(conn.sock, MsgKind.REFUSE, lay, begin.request_id,
                         encode_refusal(e.code, str(e)))
            return True
        inc = Incoming(part, src, dst, next(self._slots))
        pt = part.pt
        try:
            self._prepare(conn, inc)
            send_message(conn.sock, MsgKind.ACCEPT, lay, pt.request_id,
                         inc.slot.to_bytes(8, "big"))
            control = self._receive(conn, inc)
        except Exception as e:  # noqa: BLE001  (socket, protocol, lease, a failed copy)
            reason = (pt.silence() if isinstance(e, TimeoutError)
                      else f"{type(e).__name__}: {e}")
            self._abandon(conn, inc)
            self._release(inc)
            self._core.part_failed(part, reason)
            try:
                conn.sock.settimeout(1.0)
                send_message(conn.sock, MsgKind.FAILED, lay, pt.request_id,
                             (pt.stop_reason or reason).encode())
            except OSError:
                pass
            return False  # mid-message: the stream cannot be trusted any more
        self._release(inc)
        if control is None:  # the sender aborted cleanly; the stream is intact
            return True
        if self._core.part_done(part, control):
            send_message(conn.sock, MsgKind.DONE, lay, pt.request_id)
        else:  # failed meanwhile (owner cancelled, another session failed): tell the sender
            result = pt.wait(1.0)
            send_message(conn.sock, MsgKind.FAILED, lay, pt.request_id,
                         ((result.error if result else None) or "failed").encode())
        return True

    def _receive(self, conn: Conn, inc: Incoming) -> KVControl | None:
        """Read LAYER... END (or ABORT) within the lease. Returns the control message, or
        None if the sender aborted (the transfer is failed here)."""
        pt, lay = inc.pt, inc.part.layout
        while True:
            if pt.stop_reason is not None or pt.state != State.ACTIVE:
                raise TransferError(pt.stop_reason or f"the transfer is {pt.state.value}")
            conn.wait_readable(lambda: pt.remaining)
            conn.sock.settimeout(max(pt.remaining, 1e-3))
            header = read_header(conn.sock)
            if header.kind == MsgKind.KEEPALIVE:
                self._core.renew(decode_keepalive(read_payload(conn.sock, header,
                                                               SMALL_PAYLOAD)))
                continue
            if header.request_id != pt.request_id or header.layout != lay:
                raise HeaderError(f"message for {header.request_id!r} inside the transfer of "
                                  f"{pt.request_id!r}, or its layout changed")
            if header.kind == MsgKind.LAYER:
                check_layer(header.layer, lay.num_layers, inc.layers)
                pt.renew()
                self._recv_layer(conn, inc, header)
                inc.layers.add(header.layer)
            elif header.kind == MsgKind.END:
                control = KVControl.decode(pt.request_id, read_payload(
                    conn.sock, header, 8 + 4 * MAX_OUTPUT_TOKENS))
                self._await_data(conn, inc)
                return control
            elif header.kind == MsgKind.ABORT:
                reason = read_payload(conn.sock, header, SMALL_PAYLOAD).decode(errors="replace")
                self._abandon(conn, inc)
                self._core.part_failed(inc.part, f"sender aborted: {reason}")
                return None
            else:
                raise HeaderError(f"unexpected {header.kind.name} during a transfer")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        self._listener.close()
        for conn in conns:
            conn.close()
        self._core.close()
