"""The router's pool manager: which workers serve, and what routing needs to know of them.

Owns the live pools (worker id -> Ray actor handle; colocated mode: `prefill` holds the
colocated workers and `decode` is empty), the TP follower ranks of each tensor-parallel
worker, the KV address book (each decode worker's receivers, each prefill worker's TP size,
from their `ready` replies), and the heartbeat task: decode load into the SLO scheduler,
liveness of every rank, and (in-process index) the prefill workers' block events into the
index.

Contract: a worker that dies (a Ray actor error on any call, reported through `worker_died`)
leaves its pool and the scheduler at once; a plain actor is taken back when Ray has restarted
it (it answers `ready` again), a TP worker when the launcher's `replace_group` has started a
fresh group. Every prefill worker is connected to every decode worker's receivers before it
takes traffic. Runs on the router's event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import ray

from engine.block_manager import BlockRemoved, BlockStored
from engine.hashing import chain_hashes
from pdserve_api.worker_protocol import FollowerAlive, ReadyInfo, WorkerStats
from prefix_index.in_process import InProcessPrefixIndex
from prefix_index.interface import PrefixIndex
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.slo import SLOScheduler

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
# A Ray actor handle. ray.actor.ActorHandle types every method call as Never (its
# __getattr__), so the handles are untyped here and each reply is annotated where awaited.
Actor = Any
ReplaceGroup = Callable[[str], tuple[Actor, list[Actor]]]


class WorkerPool:
    def __init__(self, prefill: Mapping[str, Actor], decode: Mapping[str, Actor],
                 index: PrefixIndex, slo: SLOScheduler, metrics: RouterMetrics,
                 config: RouterConfig, *, colocated: bool = False,
                 followers: Mapping[str, list[Actor]] | None = None,
                 replace_group: ReplaceGroup | None = None,
                 infos: Mapping[str, ReadyInfo] | None = None):
        self.prefill: dict[str, Actor] = dict(prefill)
        self.decode: dict[str, Actor] = dict(decode)
        self.colocated = colocated
        # Tensor-parallel workers: worker id -> its follower rank actors, heartbeated too; a
        # dead rank fails the whole worker, which `replace_group` (the launcher's) restarts.
        self.followers: dict[str, list[Actor]] = dict(followers or {})
        self.replace_group = replace_group
        self.index = index
        self.index_in_process = isinstance(index, InProcessPrefixIndex)
        self.slo, self.metrics, self.config = slo, metrics, config
        self.kv_addresses: dict[str, list[str]] = {}  # decode id -> its receivers by TP rank
        self.prefill_tp: dict[str, int] = {}  # prefill id -> its TP size (decode plans by it)
        self._tasks: list[asyncio.Task[None]] = []
        # What each worker's `ready` said (the launcher asked already): its KV addresses.
        for wid, info in (infos or {}).items():
            self._note_worker("decode" if wid in self.decode else "prefill", wid, info)

    async def start(self) -> None:
        """Register the prefill workers (in-process index), pre-connect the KV links and
        start the heartbeat."""
        if self.index_in_process:
            for wid in self.prefill:
                self.index.register_worker(wid, {"role": "prefill"}, self.config.index_ttl_s)
        self._count_workers()
        await self._connect_kv(self.prefill, self._all_kv_addresses())
        self._tasks.append(asyncio.create_task(self._watch_workers()))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def healthy(self) -> bool:
        """Some request can be served: a prefill (or colocated) worker, and a decode one."""
        return bool(self.prefill) and (self.colocated or bool(self.decode))

    async def lookup_prefix(self, token_ids: Sequence[int], block_size: int) -> dict[str, int]:
        """One round trip to the index: leading cached blocks per live prefill worker."""
        hashes = chain_hashes(list(token_ids), block_size)
        if not hashes:
            return {}
        if self.index_in_process:  # in memory and touched only on this loop
            return self.index.longest_prefix(hashes)
        return await asyncio.to_thread(self.index.longest_prefix, hashes)

    # ---- death and return --------------------------------------------------------------------

    def worker_died(self, role: Role, wid: str, error: BaseException) -> None:
        """Route around a dead worker at once; take it back if Ray restarts it."""
        pool = self.prefill if role == "prefill" else self.decode
        actor = pool.pop(wid, None)
        if actor is None:
            return
        log.error("%s worker %s is gone (%s); routing around it", role, wid,
                  type(error).__name__)
        if role == "prefill":
            self.slo.remove_prefill_worker(wid)
            self.index.unregister_worker(wid)
        else:
            self.slo.decode.remove_worker(wid)
        self._count_workers()
        if wid in self.followers:
            self._tasks.append(asyncio.create_task(self._replace_tp_worker(role, wid)))
        else:
            self._tasks.append(asyncio.create_task(self._await_restart(role, wid, actor)))

    async def _replace_tp_worker(self, role: Role, wid: str) -> None:
        """A TP worker lost a rank: the launcher starts a fresh group; it rejoins once its
        rank 0 answers `ready` (which needs every rank's shards loaded)."""
        if self.replace_group is None:
            log.error("%s worker %s lost a tensor-parallel rank and nothing can replace it",
                      role, wid)
            return
        try:
            actor, followers = await asyncio.to_thread(self.replace_group, wid)
            info: ReadyInfo = await asyncio.wait_for(actor.ready.remote(),
                                                     self.config.restart_wait_s)
        except Exception as e:  # noqa: BLE001 - any failure to start: the worker stays out
            log.error("%s worker %s could not be replaced: %s: %s", role, wid,
                      type(e).__name__, e)
            return
        self.followers[wid] = followers
        await self._rejoin(role, wid, actor, info)

    async def _await_restart(self, role: Role, wid: str, actor: Actor) -> None:
        """A restarted actor (max_restarts) answers `ready` again with a fresh engine."""
        deadline = time.monotonic() + self.config.restart_wait_s
        while True:
            try:
                info: ReadyInfo = await asyncio.wait_for(
                    actor.ready.remote(), max(0.1, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                error = "still unavailable"
            except ray.exceptions.RayActorError as e:  # dead for good (no restarts left)
                error = type(e).__name__
            except asyncio.TimeoutError:
                error = "timed out"
            log.error("%s worker %s did not come back (%s)", role, wid, error)
            return
        await self._rejoin(role, wid, actor, info)

    async def _rejoin(self, role: Role, wid: str, actor: Actor, info: ReadyInfo) -> None:
        """Take a restarted or replaced worker back into its pool."""
        self._note_worker(role, wid, info)
        if role == "prefill":
            await self._connect_kv({wid: actor}, self._all_kv_addresses())
            self.prefill[wid] = actor
            self.slo.add_prefill_worker(wid)
            if self.index_in_process:
                self.index.register_worker(wid, {"role": "prefill"}, self.config.index_ttl_s)
        else:
            await self._connect_kv(self.prefill, info.kv_addresses)
            self.decode[wid] = actor
            self.slo.decode.add_worker(wid)
        self._count_workers()
        log.warning("%s worker %s restarted (pid %s) and is back in the pool", role, wid,
                    info.pid)

    # ---- the KV address book -----------------------------------------------------------------

    def _note_worker(self, role: Role, wid: str, info: ReadyInfo) -> None:
        """Record what routing needs from a worker's `ready` reply."""
        if self.colocated:
            return
        if role == "prefill":
            self.prefill_tp[wid] = info.tp_size
        else:
            self.kv_addresses[wid] = list(info.kv_addresses)

    def _all_kv_addresses(self) -> list[str]:
        return [a for addresses in self.kv_addresses.values() for a in addresses]

    async def _connect_kv(self, prefill: Mapping[str, Actor], addresses: list[str]) -> None:
        """Have prefill workers open their KV connections to decode workers before traffic:
        the handshake then stays out of the first requests' TTFT (and out of the timing
        models fitted on it). A failure here is logged; the transfer itself retries."""
        if not addresses:
            return
        replies: list[dict[str, str] | BaseException] = await asyncio.gather(
            *(a.connect_decode.remote(addresses) for a in prefill.values()),
            return_exceptions=True)
        for wid, reply in zip(prefill, replies):
            if isinstance(reply, ray.exceptions.RayError):
                log.warning("prefill worker %s could not pre-connect its KV links: %s", wid,
                            reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                for address, error in reply.items():
                    log.warning("prefill worker %s: KV link to %s: %s", wid, address, error)

    # ---- heartbeats --------------------------------------------------------------------------

    def _count_workers(self) -> None:
        self.metrics.workers.labels("colocated" if self.colocated else "prefill").set(
            len(self.prefill))
        if not self.colocated:
            self.metrics.workers.labels("decode").set(len(self.decode))

    async def _poll(self, role: Role, wid: str, actor: Actor, method: str) -> Any:
        """One heartbeat call; None when the worker is dead (and now routed around) or did
        not answer in time (left in place: a long step can delay it)."""
        try:
            return await asyncio.wait_for(getattr(actor, method).remote(),
                                          self.config.heartbeat_timeout_s)
        except ray.exceptions.RayActorError as e:
            self.worker_died(role, wid, e)
        except asyncio.TimeoutError:
            log.warning("%s worker %s did not answer %s within %.0f s", role, wid, method,
                        self.config.heartbeat_timeout_s)
        return None

    async def _poll_followers(self) -> None:
        """A TP worker whose follower rank died is dead as a whole (its next step would fail,
        and an idle one would not notice): route around it now and have it replaced."""
        for wid, followers in list(self.followers.items()):
            role: Role = "decode" if wid in self.decode else "prefill"
            if wid not in self.decode and wid not in self.prefill:
                continue  # already out, being replaced
            replies: list[FollowerAlive | BaseException] = await asyncio.gather(
                *(asyncio.wait_for(f.alive.remote(), self.config.heartbeat_timeout_s)
                  for f in followers), return_exceptions=True)
            dead = [r for r in replies if isinstance(r, ray.exceptions.RayActorError)]
            if dead:
                self.worker_died(role, wid, dead[0])

    async def _watch_workers(self) -> None:
        """Heartbeat every worker: decode load for placement, liveness of all, and (in-process
        index) the prefill workers' block events."""
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            self.metrics.waiting.set(self.slo.queue_length)
            decode = list(self.decode.items())
            stats: list[WorkerStats | None] = await asyncio.gather(
                *(self._poll("decode", w, a, "stats") for w, a in decode))
            for (wid, _), s in zip(decode, stats):
                if s is not None:
                    self.slo.decode.update(wid, free_blocks=s.free_blocks,
                                           num_running=s.num_running,
                                           step_s=s.step_s if s.steps else None)
            await self._poll_followers()
            prefill = list(self.prefill.items())
            method = "take_index_events" if self.index_in_process else "stats"
            replies: list[Any] = await asyncio.gather(
                *(self._poll("prefill", w, a, method) for w, a in prefill))
            if self.index_in_process:
                for (wid, _), events in zip(prefill, replies):
                    if events is not None:
                        self._publish(wid, events)

    def _publish(self, wid: str, events: list[BlockStored | BlockRemoved]) -> None:
        self.index.heartbeat(wid, self.config.index_ttl_s)
        self.index.publish(wid, events)
