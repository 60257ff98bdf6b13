"""Keeps one worker's entry in a shared (Redis) prefix index current: its registration, renewed
by heartbeat before the TTL runs out, and the stored/evicted block hashes of every engine step.

Runs on its own thread so that a slow or dead Redis never stalls the engine. When a heartbeat
reports the index lost track of us (Redis restarted, or events were dropped while it was
down), the full cached set is republished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prefix_index.interface import PrefixIndex

log = logging.getLogger(__name__)


class IndexPublisher:
    def __init__(self, index: PrefixIndex, worker_id: str, info: dict[str, str], *,
                 ttl_s: float, heartbeat_s: float,
                 cached_hashes: Callable[[], Iterable[int]]):
        if heartbeat_s >= ttl_s:
            raise ValueError(f"heartbeat_s {heartbeat_s} must be below ttl_s {ttl_s}")
        self.index, self.worker_id, self.info = index, worker_id, info
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self._cached_hashes = cached_hashes
        self._events: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.resyncs = 0
        self._thread = threading.Thread(target=self._run, name=f"{worker_id}-index", daemon=True)
        self._thread.start()

    def push(self, events: list[Any]) -> None:
        """A step's `BlockManager.drain_events()`; called on the engine thread."""
        if events:
            self._events.put(events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.index.unregister_worker(self.worker_id)
        self.index.close()

    def _drain(self) -> list[Any]:
        batch: list[Any] = []
        while True:
            try:
                batch.extend(self._events.get_nowait())
            except queue.Empty:
                return batch

    def _run(self) -> None:
        registered = self.index.register_worker(self.worker_id, self.info, self.ttl_s)
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.is_set():
            try:
                events = self._events.get(timeout=max(0.0, next_beat - time.monotonic()))
                self.index.publish(self.worker_id, events + self._drain())
            except queue.Empty:
                pass
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + self.heartbeat_s
            intact = (self.index.heartbeat(self.worker_id, self.ttl_s) if registered
                      else self.index.register_worker(self.worker_id, self.info, self.ttl_s))
            if not registered:
                registered = intact
                intact = False  # a fresh registration starts empty: publish what we hold
            if not intact and registered:
                self._resync()

    def _resync(self) -> None:
        self._drain()  # the snapshot below covers them; later events are idempotent on top
        try:
            hashes = list(self._cached_hashes())
        except Exception:
            log.warning("%s: could not read the cached block set for a resync", self.worker_id,
                        exc_info=True)
            return
        if self.index.resync_worker(self.worker_id, hashes):
            self.resyncs += 1
            log.info("%s: republished %d cached blocks to the prefix index", self.worker_id,
                     len(hashes))
