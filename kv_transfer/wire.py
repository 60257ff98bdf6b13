"""Framing over a stream socket: header + bounded payload messages, exact reads, scatter-gather
writes, and the connection object both ends keep. Shared by the TCP transport (control and
data) and the UCX transport (control only).

Every read is exact and bounded: a payload longer than the caller's limit is refused from its
header before a byte of it is read, so a peer cannot make us allocate.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kv_transfer.header import FIXED_SIZE, HeaderError, HeadSlice, KVHeader, KVLayout, MsgKind

# sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
_IOV_BATCH = 512
SMALL_PAYLOAD = 64 * 1024  # bound on control payloads (HELLO address, reasons, control, ids)
_SOCK_BUF = 4 << 20


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)


@dataclass(eq=False)
class Conn:
    """One peer connection; transports hang their per-peer state on `extra`."""

    sock: socket.socket
    peer: str
    extra: dict[str, Any] = field(default_factory=dict)

    def shutdown(self) -> None:
        """Wake any thread blocked on the socket (its reads return EOF); any thread may."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.shutdown()
        self.sock.close()

    def wait_readable(self, remaining: Callable[[], float], poll_s: float = 0.5) -> None:
        """Block until a message starts arriving. `remaining()` is re-read every `poll_s`,
        so a deadline that moves on (a renewed lease) is honoured; TimeoutError once it is
        <= 0. A shut-down socket is readable (the read then sees EOF)."""
        while True:
            left = remaining()
            if left <= 0:
                raise TimeoutError("deadline passed")
            try:
                ready, _, _ = select.select([self.sock], [], [], min(left, poll_s))
            except (OSError, ValueError):  # closed under us: the read reports it
                return
            if ready:
                return


class PeerClosed(ConnectionError):
    """The peer closed the connection (EOF) mid-message or between messages."""


def parse_address(address: str, scheme: str) -> tuple[str, int]:
    prefix = scheme + "://"
    if not address.startswith(prefix):
        raise ValueError(f"{address!r} is not a {prefix} address")
    host, sep, port = address[len(prefix):].rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r}: expected {prefix}HOST:PORT")
    return host.strip("[]"), int(port)


def recv_into_exact(sock: socket.socket, buf: memoryview) -> None:
    """Fill `buf` from the socket (it may alias pool memory: no intermediate copy)."""
    view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
    got, n = 0, view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {n} bytes")
        got += k


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


def read_header(sock: socket.socket) -> KVHeader:
    prefix = recv_exact(sock, FIXED_SIZE)
    size = KVHeader.total_size(prefix)  # validates magic, version and string bounds first
    return KVHeader.decode(prefix + recv_exact(sock, size - FIXED_SIZE))


def read_payload(sock: socket.socket, header: KVHeader, limit: int) -> bytes:
    if header.payload_len > limit:
        raise HeaderError(f"{header.kind.name} payload of {header.payload_len} bytes exceeds "
                          f"the limit {limit}")
    return recv_exact(sock, header.payload_len)


def read_message(sock: socket.socket, limit: int) -> tuple[KVHeader, bytes]:
    header = read_header(sock)
    return header, read_payload(sock, header, limit)


def send_message(sock: socket.socket, kind: MsgKind, layout: KVLayout, request_id: str = "",
                 payload: bytes = b"", num_blocks: int = 0, layer: int | None = None,
                 heads: HeadSlice | None = None) -> None:
    kw = {} if layer is None else {"layer": layer}
    header = KVHeader(kind, layout, request_id, num_blocks, len(payload), heads=heads, **kw)
    sock.sendall(header.encode() + payload)


def sendmsg_all(sock: socket.socket, buffers: Sequence) -> None:
    """Write every buffer, in order, with scatter-gather sendmsg (no joined copy)."""
    pending = deque(v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes)
    while pending:
        sent = sock.sendmsg(list(itertools.islice(pending, _IOV_BATCH)))
        # Drop fully written buffers; trim a partly written one and resume from it.
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.popleft()
            else:
                pending[0] = head[sent:]
                sent = 0


def encode_ids(src: Sequence[int], dst: Sequence[int]) -> bytes:
    return (np.asarray(src, dtype="<i4").tobytes() + np.asarray(dst, dtype="<i4").tobytes())


def decode_ids(payload: bytes, num_blocks: int) -> tuple[list[int], list[int]]:
    if len(payload) != 8 * num_blocks:
        raise HeaderError(f"BEGIN carries {len(payload)} bytes for {num_blocks} blocks")
    ids = np.frombuffer(payload, dtype="<i4")
    return ids[:num_blocks].tolist(), ids[num_blocks:].tolist()


def encode_refusal(code: int, message: str) -> bytes:
    return struct.pack("!B", code) + message.encode()[:4000]


def decode_refusal(payload: bytes) -> tuple[int, str]:
    if not payload:
        return 0, "refused (no reason given)"
    return payload[0], payload[1:].decode(errors="replace")
