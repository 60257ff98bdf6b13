"""Plain TCP transport: framed messages on a socket, block bytes received straight into the pool.

Protocol per connection (headers from kv_transfer/header.py, framing from wire.py):
    S/R: AUTH x 3                                      (with a cluster secret: auth.py)
    S: HELLO            R: HELLO                       (once per connection)
    S: BEGIN(ids)       R: ACCEPT(slot) | REFUSE(code, why)
    S: LAYER(l) x L     (any order; payload = K runs then V runs of layer l)
    S: END(control)     R: DONE | FAILED(why)          (or S: ABORT(why) at any point)
A connection carries one transfer at a time and is reused by the sender afterwards.

Receiving: each LAYER payload is read with `recv_into` directly into memoryviews of the
destination pool's contiguous runs (consecutive destination ids share one view). Sending: one
`sendmsg` scatter-gather call over views of the source runs. No Python-side concatenation.
Head-sliced sessions (BEGIN carries a HeadSlice): a LAYER payload is the slice's heads packed
per block (pool.py); a side whose slice is not its whole region gathers one layer into a
staging tensor before `sendmsg`, or receives one layer into one and scatters it into the pool.

Threads, not asyncio: the blocking `recv_into`/`sendmsg` calls release the GIL and write where
the bytes belong, a decode worker has a handful of prefill peers (one thread each), and the
engine that owns the pool is synchronous: an event loop would add a hop per chunk and a loop
for the engine to host, for no gain. Deadlines are socket timeouts computed from the pending
transfer's deadline, so the thread that writes into the pool is the one that stops writing
before the owner hears of a failure. When another session of the same request fails (or the
owner cancels), the transfer wakes this one by shutting its socket down (`_wake`); the thread
falls out of its read and reports, and only then is the owner told.

Host pools only move zero-copy; a CUDA pool is staged through host memory (one copy each side).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.auth import AuthFailed, authenticate_receiver, authenticate_sender
from kv_transfer.header import HeaderError, HeadSlice, KVHeader, MsgKind
from kv_transfer.pool import KVPool, Run, runs
from kv_transfer.transport import (
    MAX_OUTPUT_TOKENS,
    KVControl,
    KVReceiver,
    KVSender,
    Part,
    PendingTransfer,
    ReceiverCore,
    Refused,
    SendSession,
    State,
    TransferError,
    TransferResult,
    check_layer,
    refusal_error,
)
from kv_transfer.wire import (
    decode_ids,
    decode_refusal,
    encode_ids,
    encode_refusal,
    parse_address,
    read_header,
    read_message,
    read_payload,
    recv_into_exact,
    send_message,
    sendmsg_all,
)

log = logging.getLogger(__name__)

_SMALL = 64 * 1024  # bound on control payloads (HELLO address, reasons, control message)
_SOCK_BUF = 4 << 20
_CHUNK = 4 << 20  # staged receives re-arm the deadline per chunk


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


def _arm(conn: Conn, inc: Incoming) -> None:
    """Socket timeout = what is left of the transfer's deadline."""
    remaining = inc.pt.remaining
    if remaining <= 0:
        raise TimeoutError("deadline passed mid-layer")
    conn.sock.settimeout(remaining)


@dataclass(eq=False)
class Conn:
    """One peer connection; transports hang their per-peer state on `extra`."""

    sock: socket.socket
    peer: str
    extra: dict = field(default_factory=dict)

    def shutdown(self) -> None:
        """Wake any thread blocked on the socket (its reads return EOF); any thread may."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()


@dataclass(eq=False)
class Incoming:
    """Receiver-side state of the transfer (session) a connection is carrying."""

    part: Part
    src: list[int]
    dst: list[int]
    slot: int
    layers: set[int] = field(default_factory=set)
    extra: dict = field(default_factory=dict)

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
                _arm(conn, inc)  # per run, so a trickling sender cannot stretch the deadline
                self._recv_run(conn.sock, kv, header.layer, run)

    def _recv_staged(self, conn: Conn, inc: Incoming, layer: int) -> None:
        """One layer of a head slice: into the session's staging tensor, then its heads."""
        stage = inc.extra.get("stage")
        if stage is None:
            stage = inc.extra["stage"] = self.pool.staging(len(inc.dst), len(inc.heads), "cpu")
        view = memoryview(stage.view(-1).view(torch.uint8).numpy())
        for at in range(0, view.nbytes, _CHUNK):
            _arm(conn, inc)
            recv_into_exact(conn.sock, view[at : at + _CHUNK])
        self.pool.scatter_heads(layer, inc.dst, inc.heads, stage)

    def _recv_run(self, sock: socket.socket, kv: int, layer: int, run: Run) -> None:
        if self.pool.device.type == "cpu":
            recv_into_exact(sock, memoryview(self.pool.run(kv, layer, run.src, run.count)))
            return
        dst = self.pool.run_tensor(kv, layer, run.src, run.count)
        host = torch.empty(dst.numel(), dtype=torch.uint8, pin_memory=True)
        recv_into_exact(sock, memoryview(host.numpy()))
        dst.copy_(host)

    def _await_data(self, conn: Conn, inc: Incoming) -> None:
        """At END: make sure every byte has landed (TCP: all layers were read)."""
        missing = set(range(self.pool.layout.num_layers)) - inc.layers
        if missing:
            raise TransferError(f"END before layers {sorted(missing)[:8]}")

    def _abandon(self, conn: Conn, inc: Incoming) -> None:
        """A transfer failed: stop any write into its blocks before the owner is told."""

    def _drop(self, conn: Conn) -> None:
        """A connection is going away."""

    # ---- serving -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return  # listener closed
            _tune(sock)
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
            header, payload = read_message(conn.sock, _SMALL)
            if header.kind != MsgKind.HELLO:
                raise HeaderError(f"expected HELLO, got {header.kind.name}")
            self._on_hello(conn, payload)
            send_message(conn.sock, MsgKind.HELLO, self.pool.layout,
                         payload=self._hello_payload(conn))
            while True:
                conn.sock.settimeout(None)  # idle between transfers
                header = read_header(conn.sock)
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
        except Exception as e:  # noqa: BLE001  (socket, protocol, deadline, a failed copy)
            reason = ("timed out waiting for the sender" if isinstance(e, TimeoutError)
                      else f"{type(e).__name__}: {e}")
            self._abandon(conn, inc)
            self._core.part_failed(part, reason)
            try:
                conn.sock.settimeout(1.0)
                send_message(conn.sock, MsgKind.FAILED, lay, pt.request_id,
                             (pt.stop_reason or reason).encode())
            except OSError:
                pass
            return False  # mid-message: the stream cannot be trusted any more
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
        """Read LAYER... END (or ABORT) within the deadline. Returns the control message, or
        None if the sender aborted (the transfer is failed here)."""
        pt, lay = inc.pt, inc.part.layout
        while True:
            if pt.stop_reason is not None or pt.state != State.ACTIVE:
                raise TransferError(pt.stop_reason or f"the transfer is {pt.state.value}")
            remaining = pt.remaining
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            conn.sock.settimeout(remaining)
            header = read_header(conn.sock)
            if header.request_id != pt.request_id or header.layout != lay:
                raise HeaderError(f"message for {header.request_id!r} inside the transfer of "
                                  f"{pt.request_id!r}, or its layout changed")
            if header.kind == MsgKind.LAYER:
                check_layer(header.layer, lay.num_layers, inc.layers)
                self._recv_layer(conn, inc, header)
                inc.layers.add(header.layer)
            elif header.kind == MsgKind.END:
                control = KVControl.decode(pt.request_id, read_payload(
                    conn.sock, header, 8 + 4 * MAX_OUTPUT_TOKENS))
                self._await_data(conn, inc)
                return control
            elif header.kind == MsgKind.ABORT:
                reason = read_payload(conn.sock, header, _SMALL).decode(errors="replace")
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


class TcpSession(SendSession):
    def __init__(self, sender: TcpSender, conn: Conn, address: str, request_id: str,
                 src: list[int], dst: list[int], slot: int, deadline: float,
                 heads: HeadSlice | None = None):
        self.request_id = request_id
        self._sender, self._conn, self._address = sender, conn, address
        self.src, self.dst, self.slot, self.deadline = src, dst, slot, deadline
        lay = sender.pool.layout
        first, count = (0, lay.num_kv_heads) if heads is None else (heads.src_head, heads.count)
        self.heads = range(first, first + count)  # source head slots read
        self.whole = count == lay.num_kv_heads  # whole regions: zero-copy from the pool
        self.layer_bytes = 2 * len(src) * count * lay.head_region_bytes
        self._sent: set[int] = set()
        self._t0 = time.monotonic()
        self._over = False
        self.extra: dict = {}  # transport state (UCX: in-flight send requests)
        self._dirty = False  # a message was cut short: the connection cannot be reused

    def _timeout(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError(f"transfer {self.request_id} timed out on the sender")
        return remaining

    def _check_open(self) -> None:
        if self._over:
            raise TransferError(f"transfer {self.request_id} is already over")

    def send_layer(self, layer: int) -> None:
        self._check_open()
        check_layer(layer, self._sender.pool.layout.num_layers, self._sent)
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
        try:
            self._sender._before_end(self)
            self._conn.sock.settimeout(self._timeout())
            send_message(self._conn.sock, MsgKind.END, lay, self.request_id, control.encode())
            header, payload = read_message(self._conn.sock, _SMALL)
        except (OSError, HeaderError, TransferError) as e:
            self._fail_conn()
            raise TransferError(f"finishing {self.request_id}: {e}") from e
        self._over = True
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
            self._conn.sock.settimeout(5.0)
            send_message(self._conn.sock, MsgKind.ABORT, self._sender.pool.layout,
                         self.request_id, reason.encode()[:4000])
            self._sender._release(self._address, self._conn)
        except OSError:
            self._sender._discard(self._conn)

    def _fail_conn(self) -> None:
        self._over = True
        self._sender._abandon(self)
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

    # ---- transport hooks -----------------------------------------------------------------

    def _hello_payload(self, conn: Conn) -> bytes:
        return b""

    def _on_hello(self, conn: Conn, payload: bytes) -> None:
        pass

    def _send_layer_data(self, session: TcpSession, layer: int) -> None:
        lay = self.pool.layout
        header = KVHeader(MsgKind.LAYER, lay, session.request_id, len(session.src),
                          session.layer_bytes, layer)
        if session.whole:
            bufs = [self._src_run(kv, layer, run) for kv in (0, 1) for run in runs(session.src)]
        else:  # a head slice: pack this layer's heads (the stage is reused layer to layer)
            stage = session.extra.get("stage")
            if stage is None:
                stage = session.extra["stage"] = self.pool.staging(
                    len(session.src), len(session.heads), "cpu")
            self.pool.gather_heads(layer, session.src, session.heads, stage)
            bufs = [stage.view(-1).view(torch.uint8).numpy()]
        sendmsg_all(session._conn.sock, [header.encode(), *bufs])

    def _src_run(self, kv: int, layer: int, run: Run):
        if self.pool.device.type == "cpu":
            return self.pool.run(kv, layer, run.src, run.count)
        return self.pool.run_tensor(kv, layer, run.src, run.count).cpu().numpy()

    def _before_end(self, session: TcpSession) -> None:
        """Before END (UCX waits for its sends here)."""

    def _abandon(self, session: TcpSession) -> None:
        """The session failed (UCX cancels in-flight sends here)."""

    def _drop(self, conn: Conn) -> None:
        """A connection is going away."""

    # ---- connections ---------------------------------------------------------------------

    def _connect(self, address: str) -> Conn:
        host, port = parse_address(address, self.scheme)
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout_s)
        except OSError as e:
            raise TransferError(f"cannot connect to KV receiver {address}: {e}") from e
        _tune(sock)
        conn = Conn(sock, address)
        try:
            if self._secret is not None:
                authenticate_sender(sock, self.pool.layout, self._secret)
            send_message(sock, MsgKind.HELLO, self.pool.layout,
                         payload=self._hello_payload(conn))
            header, payload = read_message(sock, _SMALL)
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

    def open(self, address: str, request_id: str, src_block_ids: Sequence[int],
             dst_block_ids: Sequence[int], timeout_s: float = 30.0,
             heads: HeadSlice | None = None) -> SendSession:
        src, dst = [int(i) for i in src_block_ids], [int(i) for i in dst_block_ids]
        self.pool.check_ids(src, "source")
        if len(src) != len(dst) or not src:
            raise ValueError(f"{len(src)} source blocks for {len(dst)} destination blocks")
        self._check_heads(heads)
        deadline = time.monotonic() + timeout_s
        pooled = self._take(address)
        for conn in ([pooled] if pooled else []) + [None]:
            conn = conn or self._connect(address)
            try:
                conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                send_message(conn.sock, MsgKind.BEGIN, self.pool.layout, request_id,
                             encode_ids(src, dst), num_blocks=len(src), heads=heads)
                header, payload = read_message(conn.sock, _SMALL)
                break
            except (OSError, HeaderError) as e:
                self._discard(conn)
                if conn is not pooled:
                    raise TransferError(f"opening {request_id} on {address}: {e}") from e
                # A pooled connection the receiver dropped meanwhile: retry on a fresh one.
        if header.kind == MsgKind.REFUSE:
            self._release(address, conn)
            raise refusal_error(*decode_refusal(payload))
        if header.kind != MsgKind.ACCEPT or len(payload) != 8:
            self._discard(conn)
            raise TransferError(f"receiver answered BEGIN with {header.kind.name}")
        return self.session_cls(self, conn, address, request_id, src, dst,
                                int.from_bytes(payload, "big"), deadline, heads)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            self._discard(conn)
