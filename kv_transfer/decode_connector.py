"""The decode side of KV transfer, for one TP rank: reservations the receiver expects, each
reported once, and (on rank 0) the TP ranks' parts merged into one outcome. Rank 0
(decode_worker/worker.py) and the follower ranks (worker_host/tp_follower.py) use it the same
way:

    kv = DecodeConnector(receiver, num_kv_heads, tp_size, tp_rank, lease_s)
    n = kv.senders(src_tp)                              # sessions per decode rank
    kv.expect(request_id, block_ids, n[rank], on_done)  # right after engine.reserve_kv
    kv.cancel(request_id)                               # the owner gave up
    report = kv.part(request_id)                        # follower: this rank's outcome
    result = DecodeConnector.gather(own, reports)       # rank 0: own + followers' reports

`on_done(TransferResult)` comes once per `expect`, on a transport thread: ok -> the owner
commits the blocks (`commit_kv` with `result.control`), not ok -> it cancels the reservation;
either way on its engine thread. Under TP every rank expects its own heads from the prefill
ranks `plan_head_routes` sends them from (`num_senders` sessions); rank 0 commits only once
every rank's part landed, and cancels every rank's part when one fails.

The reservation is a lease (receiver_core.py): it lives `lease_s` past the prefill side's last
sign of life, so it survives a slow prefill and is freed one lease after a dead one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kv_transfer.control import TransferResult
from kv_transfer.receiver_core import GRACE_S, PendingTransfer
from kv_transfer.tp_plan import plan_head_routes, senders_per_dst
from kv_transfer.transport import KVReceiver


@dataclass(frozen=True)
class PartReport:
    """A follower rank's part of one transfer, as rank 0 reads it."""

    ok: bool
    num_bytes: int = 0
    error: str | None = None


class DecodeConnector:
    def __init__(self, receiver: KVReceiver, num_kv_heads: int, tp_size: int = 1,
                 tp_rank: int = 0, lease_s: float = 30.0):
        self.receiver = receiver
        self.num_kv_heads, self.tp_size, self.tp_rank = num_kv_heads, tp_size, tp_rank
        self.lease_s = lease_s
        self._pending: dict[str, PendingTransfer] = {}

    @property
    def address(self) -> str:
        return self.receiver.address

    def senders(self, src_tp: int) -> list[int]:
        """How many prefill sessions fill each decode rank's heads (by rank) from a prefill
        worker of TP size src_tp. Raises ValueError for TP sizes the heads cannot split by."""
        routes = plan_head_routes(self.num_kv_heads, src_tp, self.tp_size)
        return senders_per_dst(routes, self.tp_size)

    def expect(self, request_id: str, block_ids: Sequence[int], num_senders: int = 1,
               on_done: Callable[[TransferResult], None] | None = None,
               lease_s: float | None = None) -> None:
        """Expect the request's KV into these reserved blocks from `num_senders` sessions
        (`senders(src_tp)[this rank]`). Raises ValueError (a request id in use) or
        TransferError (receiver closed): then nothing is expected and the owner frees the
        blocks."""
        report = on_done
        if on_done is not None:  # reported to the owner: nothing to keep for `part`
            def report(result: TransferResult) -> None:
                self._pending.pop(request_id, None)
                on_done(result)
        self._pending[request_id] = self.receiver.expect(
            request_id, block_ids, report, lease_s or self.lease_s, num_senders)

    def cancel(self, request_id: str) -> bool:
        """Stop expecting the request (its on_done reports the failure). False if unknown
        or already reported."""
        self._pending.pop(request_id, None)
        return self.receiver.cancel(request_id)

    def part(self, request_id: str) -> PartReport:
        """Blocking: this rank's outcome once it is known. The receiver reports by the end of
        the lease (renewed while the prefill side makes progress), so this returns."""
        pending = self._pending.get(request_id)
        if pending is None:
            return PartReport(False, error=f"no transfer {request_id} expected here")
        try:
            while (result := pending.wait(max(pending.remaining, 0.0) + GRACE_S)) is None:
                if pending.remaining < -2 * GRACE_S:  # the watchdog should have reported
                    self.receiver.cancel(request_id)
                    return PartReport(False, error="no result by the end of the lease")
                time.sleep(0.01)
        finally:
            self._pending.pop(request_id, None)
        return PartReport(result.ok, result.num_bytes,
                          None if result.ok else result.error or "the transfer failed")

    @staticmethod
    def gather(own: TransferResult, parts: Sequence[PartReport | BaseException]
               ) -> TransferResult:
        """Rank 0's result merged with the follower ranks' reports (a Ray error stands for a
        dead rank): ok only if every part is, with every part's bytes counted."""
        if not own.ok:
            return own
        errors = [f"{type(p).__name__}: {p}" if isinstance(p, BaseException)
                  else p.error or "failed" for p in parts
                  if isinstance(p, BaseException) or not p.ok]
        if errors:
            return dataclasses.replace(own, ok=False, control=None,
                                       error=f"a TP rank's part: {errors[0]}")
        return dataclasses.replace(own, num_bytes=own.num_bytes + sum(
            p.num_bytes for p in parts if isinstance(p, PartReport)))

    def close(self) -> None:
        self.receiver.close()
