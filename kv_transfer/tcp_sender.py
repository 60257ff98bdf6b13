"""TCP transport, sending side: sessions over pooled connections (protocol in
tcp_receiver.py).

Sending: one `sendmsg` scatter-gather call over views of the source runs per layer, no
Python-side concatenation. A head-sliced session whose slice is not its whole region gathers
each layer into one staging tensor (from the sender's StagingCache, reused across sessions)
before `sendmsg`. Connections are kept per receiver address and reused; a connection carries
one session at a time, so a KEEPALIVE (leases of requests whose sessions are not open yet)
takes an idle one of its own.

A session's waits are bounded by `timeout_s` from its last progress: opening, each layer sent
and END renew it, like the receiver's lease.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kv_transfer.auth import authenticate_sender
from kv_transfer.control import KVControl, TransferError, TransferResult, refusal_error
from kv_transfer.header import HeaderError, HeadSlice, KVHeader, MsgKind
from kv_transfer.pool import KVPool, Run, runs
from kv_transfer.receiver_core import DEFAULT_LEASE_S
from kv_transfer.staging import StagingCache
from kv_transfer.transport import KVSender, SendSession, check_layer
from kv_transfer.wire import (
    SMALL_PAYLOAD,
    Conn,
    decode_refusal,
    encode_ids,
    parse_address,
    read_message,
    send_message,
    sendmsg_all,
    tune,
)

log = logging.getLogger(__name__)


class TcpSession(SendSession):
    def __init__(self, sender: TcpSender, conn: Conn, address: str, request_id: str,
                 src: list[int], dst: list[int], slot: int, timeout_s: float,
                 heads: HeadSlice | None = None):
        self.request_id = request_id
        self._sender, self._conn, self._address = sender, conn, address
        self.src, self.dst, self.slot, self.timeout_s = src, dst, slot, timeout_s
        self.deadline = time.monotonic() + timeout_s
        lay = sender.pool.layout
        first, count = (0, lay.num_kv_heads) if heads is None else (heads.src_head, heads.count)
        self.heads = range(first, first + count)  # source head slots read
        self.whole = count == lay.num_kv_heads  # whole regions: zero-copy from the pool
        self.layer_bytes = 2 * len(src) * count * lay.head_region_bytes
        self._sent: set[int] = set()
        self._t0 = time.monotonic()
        self._over = False
        self.extra: dict[str, Any] = {}  # transport state (UCX: in-flight send requests)
        self._dirty = False  # a message was cut short: the connection cannot be reused

    def _timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError(f"transfer {self.request_id} timed out on the sender "
                                f"({self.timeout_s:g} s without progress)")
        return remaining

    def _renew(self) -> None:
        self.deadline = time.monotonic() + self.timeout_s

    def _check_open(self) -> None:
        if self._over:
            raise TransferError(f"transfer {self.request_id} is already over")

    def send_layer(self, layer: int) -> None:
        self._check_open()
        check_layer(layer, self._sender.pool.layout.num_layers, self._sent)
        self._renew()
        self._conn.sock.settimeout(self._timeout())
        self._dirty = True
        try:
            self._sender._send_layer_data(self, layer)
        except OSError as e:
            self._fail_conn()
            raise TransferError(f"sending layer {layer} of {self.request_id}: {e}") from e
        self._dirty = False
        self._sent.add(layer)

    def finish(self, control: KVControl) -> TransferResult:
        self._check_open()
        missing = set(range(self._sender.pool.layout.num_layers)) - self._sent
        if missing:
            self.abort(f"finish() before layers {sorted(missing)[:8]}")
            raise TransferError(f"finish() before layers {sorted(missing)[:8]} were sent")
        lay = self._sender.pool.layout
        self._renew()
        try:
            self._sender._before_end(self)
            self._conn.sock.settimeout(self._timeout())
            send_message(self._conn.sock, MsgKind.END, lay, self.request_id, control.encode())
            header, payload = read_message(self._conn.sock, SMALL_PAYLOAD)
        except (OSError, HeaderError, TransferError) as e:
            self._fail_conn()
            raise TransferError(f"finishing {self.request_id}: {e}") from e
        self._over = True
        self._sender._release_staging(self)
        if header.kind == MsgKind.DONE:
            self._sender._release(self._address, self._conn)
            nbytes = lay.num_layers * self.layer_bytes
            return TransferResult(self.request_id, True, control, None, nbytes,
                                  time.monotonic() - self._t0)
        self._sender._discard(self._conn)
        raise TransferError(f"receiver failed {self.request_id}: "
                            f"{payload.decode(errors='replace')}")

    def abort(self, reason: str) -> None:
        if self._over:
            return
        self._over = True
        if self._dirty:
            self._fail_conn()  # the receiver sees a cut stream and fails the transfer
            return
        try:
            self._sender._abandon(self)
            self._sender._release_staging(self)
            self._conn.sock.settimeout(5.0)
            send_message(self._conn.sock, MsgKind.ABORT, self._sender.pool.layout,
                         self.request_id, reason.encode()[:4000])
            self._sender._release(self._address, self._conn)
        except OSError:
            self._sender._discard(self._conn)

    def _fail_conn(self) -> None:
        self._over = True
        self._sender._abandon(self)
        self._sender._release_staging(self)
        self._sender._discard(self._conn)


class TcpSender(KVSender):
    scheme = "tcp"
    session_cls = TcpSession

    def __init__(self, pool: KVPool, connect_timeout_s: float = 5.0,
                 secret: bytes | None = None):
        self.pool = pool
        self.connect_timeout_s = connect_timeout_s
        self._secret = secret
        self._idle: dict[str, list[Conn]] = {}
        self._lock = threading.Lock()
        self._staging = StagingCache(self._staging_device())

    # ---- transport hooks -----------------------------------------------------------------

    def _staging_device(self) -> torch.device:
        return torch.device("cpu")  # sockets read host memory

    def _hello_payload(self, conn: Conn) -> bytes:
        return b""

    def _on_hello(self, conn: Conn, payload: bytes) -> None:
        pass

    def _stage(self, session: TcpSession, layers: int | None = None) -> torch.Tensor:
        """The session's staging tensor (one layer, or `layers` of them), taken once."""
        stage = session.extra.get("stage")
        if stage is None:
            shape = self.pool.staging_shape(len(session.src), len(session.heads), layers)
            stage = session.extra["stage"] = self._staging.take(shape, self.pool.layout.dtype)
        return stage

    def _send_layer_data(self, session: TcpSession, layer: int) -> None:
        lay = self.pool.layout
        header = KVHeader(MsgKind.LAYER, lay, session.request_id, len(session.src),
                          session.layer_bytes, layer)
        bufs: list[Any]
        if session.whole:
            bufs = [self._src_run(kv, layer, run) for kv in (0, 1) for run in runs(session.src)]
        else:  # a head slice: pack this layer's heads (the stage is reused layer to layer)
            stage = self._stage(session)
            self.pool.gather_heads(layer, session.src, session.heads, stage)
            bufs = [stage.view(-1).view(torch.uint8).numpy()]
        sendmsg_all(session._conn.sock, [header.encode(), *bufs])

    def _src_run(self, kv: int, layer: int, run: Run) -> np.ndarray:
        if self.pool.device.type == "cpu":
            return self.pool.run(kv, layer, run.src, run.count)
        return self.pool.run_tensor(kv, layer, run.src, run.count).cpu().numpy()

    def _before_end(self, session: TcpSession) -> None:
        """Before END (UCX waits for its sends here)."""

    def _abandon(self, session: TcpSession) -> None:
        """The session failed (UCX cancels in-flight sends here)."""

    def _release_staging(self, session: TcpSession) -> None:
        """The session is over: its staging goes back to the cache (sendmsg is synchronous,
        so nothing reads it any more)."""
        stage = session.extra.pop("stage", None)
        if stage is not None:
            self._staging.give(stage)

    def _drop(self, conn: Conn) -> None:
        """A connection is going away."""

    # ---- connections ---------------------------------------------------------------------

    def _connect(self, address: str) -> Conn:
        host, port = parse_address(address, self.scheme)
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        except OSError as e:
            raise TransferError(f"cannot connect to KV receiver {address}: {e}") from e
        tune(sock)
        conn = Conn(sock, address)
        try:
            if self._secret is not None:
                authenticate_sender(sock, self.pool.layout, self._secret)
            send_message(sock, MsgKind.HELLO, self.pool.layout,
                         payload=self._hello_payload(conn))
            header, payload = read_message(sock, SMALL_PAYLOAD)
            if header.kind != MsgKind.HELLO:
                raise HeaderError(f"expected HELLO, got {header.kind.name}")
            self._on_hello(conn, payload)
        except (OSError, HeaderError) as e:
            self._discard(conn)
            raise TransferError(f"handshake with {address} failed: {e}") from e
        return conn

    def _take(self, address: str) -> Conn | None:
        with self._lock:
            idle = self._idle.get(address)
            return idle.pop() if idle else None

    def _release(self, address: str, conn: Conn) -> None:
        with self._lock:
            self._idle.setdefault(address, []).append(conn)

    def _discard(self, conn: Conn) -> None:
        self._drop(conn)
        conn.close()

    def connect(self, address: str) -> None:
        self._release(address, self._connect(address))

    def keepalive(self, address: str, request_ids: Sequence[str]) -> None:
        if not request_ids:
            return
        payload = "\n".join(request_ids).encode()
        conn = self._take(address)
        while True:
            pooled, conn = conn is not None, conn or self._connect(address)
            try:
                conn.sock.settimeout(self.connect_timeout_s)
                send_message(conn.sock, MsgKind.KEEPALIVE, self.pool.layout, payload=payload)
            except OSError as e:
                self._discard(conn)
                if not pooled:
                    raise TransferError(f"keepalive to {address}: {e}") from e
                conn = None  # a pooled connection the receiver dropped: retry on a fresh one
                continue
            self._release(address, conn)
            return

    def open(self, address: str, request_id: str, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = DEFAULT_LEASE_S,
             heads: HeadSlice | None = None) -> SendSession:
        src, dst = [int(i) for i in src_block_ids], [int(i) for i in dst_block_ids]
        self.pool.check_ids(src, "source")
        if len(src) != len(dst) or not src:
            raise ValueError(f"{len(src)} source blocks for {len(dst)} destination blocks")
        self._check_heads(heads)
        deadline = time.monotonic() + timeout_s
        conn = self._take(address)
        while True:
            pooled, conn = conn is not None, conn or self._connect(address)
            try:
                conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                send_message(conn.sock, MsgKind.BEGIN, self.pool.layout, request_id,
                             encode_ids(src, dst), num_blocks=len(src), heads=heads)
                header, payload = read_message(conn.sock, SMALL_PAYLOAD)
                break
            except (OSError, HeaderError) as e:
                self._discard(conn)
                if not pooled:
                    raise TransferError(f"opening {request_id} on {address}: {e}") from e
                conn = None  # a pooled connection the receiver dropped: retry on a fresh one
        if header.kind == MsgKind.REFUSE:
            self._release(address, conn)
            raise refusal_error(*decode_refusal(payload))
        if header.kind != MsgKind.ACCEPT or len(payload) != 8:
            self._discard(conn)
            raise TransferError(f"receiver answered BEGIN with {header.kind.name}")
        return self.session_cls(self, conn, address, request_id, src, dst,
                                int.from_bytes(payload, "big"), timeout_s, heads)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            self._discard(conn)
