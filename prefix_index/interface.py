"""The prefix-cache index's interface: which worker holds which chained block hash (DESIGN:
request path step 2).

Workers publish the hashes of the KV blocks they store and evict (engine/block_manager.py's
`BlockStored` / `BlockRemoved` events, hashes from engine/hashing.py); the router asks, for a
prompt's hash chain, how many LEADING blocks each live worker holds. Because hash i covers
blocks 0..i, holding block i without block i-1 cannot happen for one worker's consistent view,
but a stale or partial view can show it, so a worker's count stops at its first miss.

Contract (both implementations, `in_process.py` and `redis_index.py`):
- `register_worker(id, info, ttl_s)` registers a worker for ttl_s seconds and starts it with
  no entries (a worker (re)starts with an empty cache, so entries left under its id are stale);
  `heartbeat(id, ttl_s)` extends it (re-registering with the last known info, keeping entries,
  when it has lapsed). A worker whose registration expired stops counting in `longest_prefix`
  and `live_workers` at once; its block entries linger but are ignored, and are deleted
  lazily (a bounded sweep on every heartbeat, by any worker).
  Register before publishing: entries of a worker with no registration may be swept.
- `heartbeat` returns True when the index's view of the worker is intact, False when the
  caller should republish its full cached set with `resync_worker(id, hashes)`: the
  registration had lapsed (expired, or Redis restarted and lost everything), or events were
  dropped while Redis was unreachable.
- `apply_events(id, stored, removed)` adds, then removes, hash -> worker membership. Net an
  ordered event list first with `events_to_changes`, or call `publish(id, drain_events())`.
- `longest_prefix(chain)` -> {worker: leading blocks held} for every live worker, in one
  round trip (for Redis, a Lua script that stops as soon as every worker has missed).
- `unregister_worker(id)` drops the registration and all its entries.
- `live_workers()` -> {worker: info}.

The index is a hint: a stale entry costs a recompute, never a wrong answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class BlockChanges(NamedTuple):
    """Net effect of an ordered event list: disjoint hash lists (unpacks as a tuple)."""

    stored: list[int]
    removed: list[int]


def events_to_changes(events: Iterable[Any]) -> BlockChanges:
    """Net BlockStored/BlockRemoved events (in order) into (stored, removed).

    A hash stored then removed in one batch ends up removed, and removed then stored ends up
    stored, so applying the two lists in any order gives the same membership as replaying the
    events. Events are read by class name so this module need not import the engine.
    """
    last: dict[int, bool] = {}
    for ev in events:
        kind = type(ev).__name__
        if kind == "BlockStored":
            present = True
        elif kind == "BlockRemoved":
            present = False
        else:
            raise TypeError(f"not a block event: {ev!r}")
        for h in ev.block_hashes:
            last.pop(h, None)  # re-insert so the result keeps the last event's order
            last[h] = present
    return BlockChanges([h for h, p in last.items() if p], [h for h, p in last.items() if not p])


class PrefixIndex(ABC):
    """The interface both implementations share; see the module docstring for the contract."""

    @abstractmethod
    def register_worker(self, worker_id: str, info: dict[str, str], ttl_s: float) -> bool: ...

    @abstractmethod
    def heartbeat(self, worker_id: str, ttl_s: float) -> bool: ...

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> bool: ...

    @abstractmethod
    def apply_events(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int] = ()
    ) -> bool: ...

    @abstractmethod
    def resync_worker(self, worker_id: str, hashes: Iterable[int]) -> bool: ...

    @abstractmethod
    def longest_prefix(self, block_hashes: Sequence[int]) -> dict[str, int]: ...

    @abstractmethod
    def live_workers(self) -> dict[str, dict[str, str]]: ...

    @abstractmethod
    def check_integrity(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional: the in-process index holds nothing
        pass

    def publish(self, worker_id: str, events: Iterable[Any]) -> bool:
        """Apply a block manager's `drain_events()` output."""
        stored, removed = events_to_changes(events)
        if not stored and not removed:
            return True
        return self.apply_events(worker_id, stored, removed)
