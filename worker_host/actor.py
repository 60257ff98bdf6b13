"""What every pool worker (prefill, decode, colocated Ray actor) shares: its engine on an
EngineLoop thread, block events for the prefix index, per-request output streams, and the
stats / integrity methods the router and tests call.

Threads: Ray runs the actor's async methods on one event loop; the engine runs on the
EngineLoop thread and is reached only through `self.loop.submit`; transport callbacks come on
transport threads. Stream queues live on the actor's event loop (`_push` hops onto it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from engine.block_manager import BlockRemoved, BlockStored
from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from pdserve_api.worker_protocol import (
    IntegrityReport,
    PrefillTiming,
    ReadyInfo,
    StreamItem,
    StreamKind,
    WorkerLoad,
    WorkerStats,
)
from prefix_index.redis_index import RedisPrefixIndex
from worker_host.engine_loop import EngineLoop
from worker_host.index_publisher import IndexPublisher
from worker_host.metrics import WorkerMetrics
from worker_host.placement import pin_process
from worker_host.spec import WorkerSpec, node_host

log = logging.getLogger(__name__)
T = TypeVar("T")
ABORTED_EARLY_MAX = 4096
STREAM_LINGER_S = 60.0  # an aborted request's stream waits this long for its poller


class RequestAborted(ValueError):
    """The router aborted a request before the call that starts it reached this worker."""


class WorkerBase:
    mode: EngineMode
    publishes_blocks = False  # prefill-capable workers are the prefix index's candidates

    def __init__(self, spec: WorkerSpec):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if spec.cores:  # first: the model loads on the threads it will run on
            pin_process(spec.cores)
        self.spec = spec
        self.worker_id = spec.worker_id
        config = spec.engine_config(self.mode)
        self.engine = LLMEngine(config, spec.join_tp_group(config.device))
        self.engine.warmup()
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[str, asyncio.Queue[StreamItem]] = {}  # actor event loop only
        # In-process index mode: pulled by the router.
        self._pending_events: list[BlockStored | BlockRemoved] = []
        self.publisher = None
        # Ids aborted before this worker knew them (engine thread only): Ray may deliver an
        # abort ahead of the call that starts the request, which must then refuse it rather
        # than hold blocks nobody will free. Bounded: old ids can no longer arrive.
        self._aborted_early: OrderedDict[str, None] = OrderedDict()
        self.metrics = WorkerMetrics(self.mode.value, self.worker_id)
        self.metrics_address = self.metrics.serve(node_host(), spec.metrics_port)
        if self.publishes_blocks and spec.redis_url:
            self.publisher = IndexPublisher(
                RedisPrefixIndex(spec.redis_url), self.worker_id, {"role": self.mode.value},
                ttl_s=spec.ttl_s, heartbeat_s=spec.heartbeat_s,
                cached_hashes=lambda: self.loop.submit(
                    lambda e: list(e.block_manager.cached)).result(10))

    def _start_loop(self) -> None:
        """Last step of a subclass's __init__, once everything the callbacks use exists."""
        self.loop = EngineLoop(self.engine, self._outputs, self._after_step_all, self.worker_id)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread and await its result."""
        return await asyncio.wrap_future(self.loop.submit(fn))

    # ---- actor methods shared by every kind ------------------------------------------------

    def ready(self) -> ReadyInfo:
        return ReadyInfo(
            worker_id=self.worker_id, mode=self.mode.value,
            num_blocks=self.engine.block_manager.num_blocks,
            block_size=self.engine.config.block_size, max_model_len=self.engine.max_model_len,
            metrics=self.metrics_address, pid=os.getpid(), transport=self.transport,
            tp_size=self.spec.tp_size, kv_addresses=self._kv_addresses())

    # What `ready` says of the KV side: the subclass's transport and receivers.
    transport = "none"

    def _kv_addresses(self) -> list[str]:
        return []

    async def adopt(self) -> ReadyInfo:
        """A new router takes this (detached) worker over after its predecessor died: abort
        whatever that router left in flight, since no client waits for it any more, so no
        block stays held; then answer like `ready`."""
        ids = set(self.streams) | set(await self.call(self._held_request_ids))
        for rid in ids:
            await self.abort(rid)
        if ids:
            log.warning("%s: adopted by a new router; aborted %d orphaned requests",
                        self.worker_id, len(ids))
        return self.ready()

    def _note_aborted_early(self, request_id: str) -> None:
        """Engine thread: an abort found nothing for request_id; refuse it if it comes."""
        self._aborted_early[request_id] = None
        while len(self._aborted_early) > ABORTED_EARLY_MAX:
            self._aborted_early.popitem(last=False)

    def _refuse_if_aborted(self, request_id: str) -> None:
        """Engine thread, before a request is started: raise if it was aborted already."""
        if self._aborted_early.pop(request_id, False) is None:
            raise RequestAborted(f"request {request_id!r} was aborted before it arrived")

    def _held_request_ids(self, e: LLMEngine) -> list[str]:
        return list(e.requests)

    def kv_secret(self) -> bytes | None:
        """For a router adopting detached workers: workers it starts anew must share it."""
        return self.spec.cluster_secret

    async def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    async def stats(self) -> WorkerStats:
        """The router's heartbeat: answered without waiting for the engine thread (a long
        step must not look like a dead worker), from plain reads of its counters."""
        e, load = self.engine, self._load()
        return WorkerStats(
            worker_id=self.worker_id, free_blocks=load.free_blocks,
            num_running=load.num_running, num_blocks=e.block_manager.num_blocks,
            num_waiting=len(e.scheduler.waiting), num_held=len(e.requests),
            step_s=self.loop.stats.ewma_step_s, batch=self.loop.stats.last_batch,
            steps=self.loop.stats.steps)

    async def check_integrity(self) -> IntegrityReport:
        """Block-accounting check plus what is still held (tests assert nothing leaks)."""
        def check(e: LLMEngine) -> IntegrityReport:
            e.check_integrity()
            return IntegrityReport(free_blocks=e.block_manager.num_free_blocks,
                                   num_blocks=e.block_manager.num_blocks,
                                   requests=sorted(e.requests), jobs=self._unresolved_jobs())
        return await self.call(check)

    def _unresolved_jobs(self) -> list[str]:
        return []

    async def take_index_events(self) -> list[BlockStored | BlockRemoved]:
        """In-process index mode: block events since the last call (the router applies them)."""
        def take(_: LLMEngine) -> list[BlockStored | BlockRemoved]:
            events, self._pending_events = self._pending_events, []
            return events
        return await self.call(take)

    async def reset_prefix_cache(self) -> None:
        await self.call(lambda e: e.block_manager.reset_prefix_cache())

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.close()  # under TP: the follower ranks leave their loops
        self.metrics.close()
        if self.publisher is not None:
            self.publisher.close()

    # ---- output streams ----------------------------------------------------------------------

    def _open_stream(self, request_id: str) -> None:
        self.aloop = asyncio.get_running_loop()
        self.streams[request_id] = asyncio.Queue()

    async def next_items(self, request_id: str) -> list[StreamItem]:
        """The request's output since the last call: waits for one item, returns every item
        queued by then; the last is FINISHED or ERROR once the request ended. The router
        polls this (a long poll) rather than taking a Ray streaming generator, which Ray
        Client (`ray://`, how a Kubernetes router joins) cannot carry."""
        q = self.streams.get(request_id)
        if q is None:
            return [StreamItem(StreamKind.ERROR,
                               error=f"request {request_id!r} is not known here")]
        items = [await q.get()]
        while not items[-1].last and not q.empty():
            items.append(q.get_nowait())
        if items[-1].last:
            self.streams.pop(request_id, None)
        return items

    def _push(self, request_id: str, item: StreamItem) -> None:
        """From any thread: queue an item on the request's stream (dropped if it has none)."""
        if self.aloop is None:
            return

        def put() -> None:
            q = self.streams.get(request_id)
            if q is not None:
                q.put_nowait(item)

        self.aloop.call_soon_threadsafe(put)

    @staticmethod
    def _item(out: RequestOutput, timing: PrefillTiming | None = None) -> StreamItem:
        """A step's output as a stream item; a finished one carries the decode time, from
        the first token (or the KV's arrival with it) to now."""
        if not out.finished:
            return StreamItem(StreamKind.TOKENS, list(out.new_token_ids), out.text,
                              timing=timing)
        decode_s = (time.monotonic() - out.first_token_time
                    if out.first_token_time is not None else 0.0)
        return StreamItem(StreamKind.FINISHED, list(out.new_token_ids), out.text,
                          finish_reason=out.finish_reason, timing=timing, decode_s=decode_s)

    def _end_stream(self, request_id: str) -> None:
        """Actor event loop, after an abort: the stream's poller gets a final item. Nobody
        may ever poll it (a request cancelled before its tokens flowed), so the stream is
        dropped after a while if still there."""
        q = self.streams.get(request_id)
        if q is None:
            return
        q.put_nowait(StreamItem(StreamKind.FINISHED, finish_reason="abort"))
        asyncio.get_running_loop().call_later(STREAM_LINGER_S, self._drop_stream, request_id, q)

    def _drop_stream(self, request_id: str, q: asyncio.Queue[StreamItem]) -> None:
        if self.streams.get(request_id) is q:
            del self.streams[request_id]

    # ---- engine thread -----------------------------------------------------------------------

    def _load(self) -> WorkerLoad:
        # Plain int reads: a slightly stale view is fine for placement.
        return WorkerLoad(free_blocks=self.engine.block_manager.num_free_blocks,
                          num_running=len(self.engine.scheduler.running))

    def _outputs(self, outputs: list[RequestOutput]) -> None:
        m = self.metrics
        for out in outputs:
            if out.new_token_ids:
                m.generation_tokens.inc(len(out.new_token_ids))
                if out.num_output_tokens == 1:
                    m.prompt_tokens.inc(out.num_prompt_tokens)
        self._on_outputs(outputs)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        raise NotImplementedError

    def _after_step_all(self) -> None:
        m, e = self.metrics, self.engine
        m.step.observe(self.loop.stats.last_step_s)
        m.running.set(len(e.scheduler.running))
        m.waiting.set(len(e.scheduler.waiting))
        m.kv_usage.set(e.block_manager.usage)
        self._after_step()

    def _after_step(self) -> None:
        if not self.publishes_blocks:
            self.engine.block_manager.drain_events()  # nobody routes on a decode pool's cache
            return
        events = self.engine.block_manager.drain_events()
        if not events:
            return
        if self.publisher is not None:
            self.publisher.push(events)
        else:
            self._pending_events.extend(events)


def prefill_timing(out: RequestOutput) -> PrefillTiming:
    """The prompt's cost on this worker, from the engine's stamps on its request."""
    first_token = out.first_token_time if out.first_token_time is not None else time.monotonic()
    scheduled = (out.first_scheduled_time if out.first_scheduled_time is not None
                 else first_token)
    return PrefillTiming(num_cached_tokens=out.num_cached_tokens,
                         queued_s=scheduled - out.arrival_time, prefill_s=first_token - scheduled)
