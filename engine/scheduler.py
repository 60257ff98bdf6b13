"""Continuous-batching scheduler with a per-step token budget, chunked prefill and preemption.

`schedule()` returns a plain value, `{request_id: num_tokens}` plus the block copies to apply;
it touches no tensors. Prefill, chunked prefill, prefix hits and decode all fall out of "each
request computes its next N uncomputed tokens" (vLLM v1). Running requests go first (decode
priority); when blocks run out, the most recently admitted running request is preempted
(recompute: its blocks are freed and it goes back to the head of the queue).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)  # in scheduling order
    copy_pairs: list[tuple[int, int]] = field(default_factory=list)  # CoW (src, dst) blocks
    preempted: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        long_prefill_token_threshold: int | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_cap = long_prefill_token_threshold or max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A request whose KV is already in its blocks (decode mode after import)."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_running: list[Request] = []
        queue = list(self.running)
        while queue and budget > 0:
            req = queue.pop(0)
            num_new = min(req.num_tokens - req.num_computed_tokens, self.chunk_cap, budget)
            if num_new <= 0:
                continue
            while (pairs := self.block_manager.allocate_slots(req, num_new)) is None:
                victim = queue.pop() if queue else req
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if pairs is None:
                break
            out.copy_pairs.extend(pairs)
            self._add_to_output(out, req, num_new)
            scheduled_running.append(req)
            budget -= num_new

        # New requests only when nothing had to be preempted: admitting while short of blocks
        # would thrash.
        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                req = self.waiting[0]
                cached = (self.block_manager.find_cached_prefix(req)
                          if req.num_computed_tokens == 0 else [])
                uncomputed = req.num_tokens - req.num_computed_tokens
                num_new = min(uncomputed - self.block_manager.cached_tokens(req, cached),
                              self.chunk_cap, budget)
                pairs = self.block_manager.allocate_slots(req, num_new, cached)
                if pairs is None:
                    break
                self.waiting.popleft()
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                self.running.append(req)
                out.copy_pairs.extend(pairs)
                self._add_to_output(out, req, num_new)
                budget -= num_new
        return out

    def _add_to_output(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        out.num_scheduled_tokens[req.request_id] = num_new
        out.requests.append(req)

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus, keep_blocks: bool = False) -> None:
        """Take req out of scheduling; free its blocks unless they are held for export."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not keep_blocks:
            self.block_manager.free(req)
