"""Cluster membership for KV connections: a challenge-response over a shared secret, run on
every new connection before HELLO, so that no stranger can write blocks into a pool or read
them out of one (and learns no UCX worker address).

    S -> R  AUTH  nonce_s                       (16 random bytes)
    R -> S  AUTH  nonce_r + HMAC(k, "R" nonce_s nonce_r)
    S -> R  AUTH  HMAC(k, "S" nonce_r nonce_s)

Each side proves it holds the secret without sending it; fresh nonces on both sides stop
replays. MACs are compared in constant time. Without a secret on either side the step is
skipped (local tests), and a receiver with a secret refuses a sender without one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket

from kv_transfer.header import HeaderError, KVLayout, MsgKind
from kv_transfer.wire import read_message, send_message

NONCE = 16
MAC = 32


class AuthFailed(HeaderError):
    """The peer is not a member of this cluster (or holds another secret)."""


def _mac(secret: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, b"pdserve-kv-auth:" + role + a + b, hashlib.sha256).digest()


def _expect(sock: socket.socket, size: int) -> bytes:
    header, payload = read_message(sock, 256)
    if header.kind != MsgKind.AUTH:
        raise AuthFailed(f"expected AUTH, got {header.kind.name} (peer without the cluster "
                         "secret?)")
    if len(payload) != size:
        raise AuthFailed(f"AUTH payload of {len(payload)} bytes, expected {size}")
    return payload


def authenticate_sender(sock: socket.socket, layout: KVLayout, secret: bytes) -> None:
    """Sender side, right after connecting: prove membership and check the receiver's."""
    nonce_s = os.urandom(NONCE)
    send_message(sock, MsgKind.AUTH, layout, payload=nonce_s)
    reply = _expect(sock, NONCE + MAC)
    nonce_r, proof = reply[:NONCE], reply[NONCE:]
    if not hmac.compare_digest(proof, _mac(secret, b"R", nonce_s, nonce_r)):
        raise AuthFailed("the KV receiver does not hold this cluster's secret")
    send_message(sock, MsgKind.AUTH, layout, payload=_mac(secret, b"S", nonce_r, nonce_s))


def authenticate_receiver(sock: socket.socket, layout: KVLayout, secret: bytes) -> None:
    """Receiver side, on a new connection: raises AuthFailed unless the sender is a member."""
    nonce_s = _expect(sock, NONCE)
    nonce_r = os.urandom(NONCE)
    send_message(sock, MsgKind.AUTH, layout,
                 payload=nonce_r + _mac(secret, b"R", nonce_s, nonce_r))
    proof = _expect(sock, MAC)
    if not hmac.compare_digest(proof, _mac(secret, b"S", nonce_r, nonce_s)):
        raise AuthFailed("the KV sender does not hold this cluster's secret")
