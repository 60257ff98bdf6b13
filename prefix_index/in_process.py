"""The prefix index in one process: a single router with no Redis, and the tests' reference.

Same semantics as `RedisPrefixIndex` (the contract is in `interface.py`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prefix_index.interface import PrefixIndex


@dataclass(slots=True)
class _Registration:
    info: dict[str, str]
    expires_at: float


class InProcessPrefixIndex(PrefixIndex):
    """Same semantics as RedisPrefixIndex, in one process (a single router, no Redis).

    Thread-safe (one lock). `clock` is injectable for tests; it defaults to time.monotonic.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._regs: dict[str, _Registration] = {}
        self._blocks: dict[int, set[str]] = {}  # hash -> workers holding it
        self._worker_blocks: dict[str, set[int]] = {}  # worker -> hashes it holds

    def register_worker(self, worker_id: str, info: dict[str, str], ttl_s: float) -> bool:
        with self._lock:
            self._regs[worker_id] = _Registration(dict(info), self._clock() + ttl_s)
            self._drop_blocks(worker_id)
            return True

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        with self._lock:
            now = self._clock()
            reg = self._regs.get(worker_id)
            intact = reg is not None and reg.expires_at > now
            if reg is None:
                reg = self._regs[worker_id] = _Registration({}, now)
            reg.expires_at = now + ttl_s
            self._sweep_expired(now)
            return intact

    def unregister_worker(self, worker_id: str) -> bool:
        with self._lock:
            self._regs.pop(worker_id, None)
            self._drop_blocks(worker_id)
            return True

    def apply_events(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int] = ()
    ) -> bool:
        with self._lock:
            mine = self._worker_blocks.setdefault(worker_id, set())
            for h in stored:
                self._blocks.setdefault(h, set()).add(worker_id)
                mine.add(h)
            for h in removed:
                holders = self._blocks.get(h)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del self._blocks[h]
                mine.discard(h)
            if not mine:
                del self._worker_blocks[worker_id]
            return True

    def resync_worker(self, worker_id: str, hashes: Iterable[int]) -> bool:
        with self._lock:
            self._drop_blocks(worker_id)
        return self.apply_events(worker_id, list(hashes))

    def longest_prefix(self, block_hashes: Sequence[int]) -> dict[str, int]:
        with self._lock:
            now = self._clock()
            active = [w for w, r in self._regs.items() if r.expires_at > now]
            result: dict[str, int] = {}
            for depth, h in enumerate(block_hashes):
                if not active:
                    break
                holders = self._blocks.get(h, set())
                for w in active:
                    if w not in holders:
                        result[w] = depth
                active = [w for w in active if w in holders]
            for w in active:
                result[w] = len(block_hashes)
            return result

    def live_workers(self) -> dict[str, dict[str, str]]:
        with self._lock:
            now = self._clock()
            return {w: dict(r.info) for w, r in self._regs.items() if r.expires_at > now}

    def check_integrity(self) -> None:
        with self._lock:
            for h, holders in self._blocks.items():
                assert holders, f"empty holder set for {h}"
                for w in holders:
                    assert h in self._worker_blocks.get(w, ()), f"{w} misses {h} in its set"
            for w, hashes in self._worker_blocks.items():
                assert hashes, f"empty block set for {w}"
                for h in hashes:
                    assert w in self._blocks.get(h, ()), f"block {h} misses holder {w}"

    # The caller holds the lock.
    def _drop_blocks(self, worker_id: str) -> None:
        for h in self._worker_blocks.pop(worker_id, ()):
            holders = self._blocks[h]
            holders.discard(worker_id)
            if not holders:
                del self._blocks[h]

    def _sweep_expired(self, now: float) -> None:
        for w in [w for w, r in self._regs.items() if r.expires_at <= now]:
            del self._regs[w]
            self._drop_blocks(w)
        # Entries of workers that never registered (or whose registration was swept) too.
        for w in [w for w in self._worker_blocks if w not in self._regs]:
            self._drop_blocks(w)
