"""One request's KV leaving one prefill rank: a transfer session per route, opened together
in the step where the prompt's last chunk runs, fed layer by layer, finished together.

Without tensor parallelism there is one route, to the decode worker's receiver, with every
head. With it, every prefill rank ships the KV heads that `plan_head_routes` gives it straight
to the decode ranks that own them (rank to rank; nothing passes through rank 0), each route a
session carrying a `HeadSlice`. The first error wins: the other sessions are aborted, so the
decode side fails the whole transfer once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kv_transfer import (
    HeadSlice,
    KVControl,
    KVSender,
    SendSession,
    TransferError,
    plan_head_routes,
    routes_by_src,
)
from kv_transfer.header import KVLayoutMismatch

log = logging.getLogger(__name__)
TRANSFER_ERRORS = (TransferError, KVLayoutMismatch, OSError, ValueError)


@dataclass(frozen=True)
class KVRoute:
    address: str  # a decode rank's KV receiver
    heads: HeadSlice | None = None  # None: every head, both pools unsharded alike


def routes_for_rank(num_kv_heads: int, src_tp: int, src_rank: int,
                    dst_addresses: Sequence[str]) -> list[KVRoute]:
    """The sessions prefill rank `src_rank` opens for one request (dst_addresses: the decode
    worker's receivers, by rank: their count is its TP size)."""
    dst_tp = len(dst_addresses)
    if src_tp == dst_tp == 1:
        return [KVRoute(dst_addresses[0])]
    plan = plan_head_routes(num_kv_heads, src_tp, dst_tp)
    return [KVRoute(dst_addresses[r.dst_rank], r.heads)
            for r in routes_by_src(plan, src_tp)[src_rank]]


class KVShipment:
    def __init__(self, sender: KVSender, request_id: str, routes: list[KVRoute],
                 dst_block_ids: list[int], timeout_s: float):
        self.sender, self.request_id, self.routes = sender, request_id, routes
        self.dst_block_ids, self.timeout_s = dst_block_ids, timeout_s
        self.sessions: list[SendSession] = []
        self.opened = False
        self.error: str | None = None
        self.num_bytes = 0

    def open(self, src_block_ids: Sequence[int]) -> None:
        """Open every route's session (before the forward pass of the finishing step)."""
        self.opened = True
        if len(src_block_ids) != len(self.dst_block_ids):
            self.error = (f"decode reserved {len(self.dst_block_ids)} blocks for a prompt of "
                          f"{len(src_block_ids)} blocks")
            return
        for route in self.routes:
            try:
                self.sessions.append(self.sender.open(
                    route.address, self.request_id, src_block_ids, self.dst_block_ids,
                    timeout_s=self.timeout_s, heads=route.heads))
            except TRANSFER_ERRORS as e:
                self.fail(f"opening the KV transfer to {route.address}: {e}")
                return

    def send_layer(self, layer: int) -> None:
        for session in self.sessions:
            if self.error is not None:
                return
            try:
                session.send_layer(layer)
            except Exception as e:  # noqa: BLE001 - any transport error: the step goes on
                log.warning("%s: sending layer %d failed: %s", self.request_id, layer, e)
                self.fail(f"sending layer {layer}: {e}")

    def finish(self, control: KVControl) -> None:
        """Complete every session; `error` says if any failed. Returns when the receivers
        have every byte."""
        if self.error is None and not self.sessions:
            self.error = "the KV transfer was never opened"
        for session in self.sessions:
            if self.error is not None:
                break
            try:
                result = session.finish(control)
            except TRANSFER_ERRORS as e:
                self.fail(f"KV transfer failed: {e}")
                break
            self.num_bytes += result.num_bytes
            if not result.ok:
                self.fail(f"KV transfer failed: {result.error}")
        self.sessions = []

    def fail(self, error: str) -> None:
        """Abort the sessions still open (the receiver fails the transfer once)."""
        if self.error is None:
            self.error = error
        sessions, self.sessions = self.sessions, []
        for session in sessions:
            try:
                session.abort(error)
            except Exception:  # the peer may be gone: the error is what matters
                log.debug("abort of %s failed", self.request_id, exc_info=True)
