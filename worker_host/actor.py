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
from collections.abc import Callable
from typing import Any, TypeVar

from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from worker_host.engine_loop import EngineLoop
from worker_host.placement import pin_process
from worker_host.spec import WorkerSpec, node_host

log = logging.getLogger(__name__)
T = TypeVar("T")


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
        self.streams: dict[str, asyncio.Queue] = {}  # actor event loop only
        self._pending_events: list[Any] = []  # in-process index mode: pulled by the router
        self.publisher = None
        from worker_host.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(self.mode.value, self.worker_id)
        self.metrics_address = self.metrics.serve(node_host(), spec.metrics_port)
        if self.publishes_blocks and spec.redis_url:
            from prefix_index.redis_index import RedisPrefixIndex
            from worker_host.index_publisher import IndexPublisher

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

    def ready(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "mode": self.mode.value,
                "num_blocks": self.engine.block_manager.num_blocks,
                "block_size": self.engine.config.block_size,
                "max_model_len": self.engine.max_model_len, "metrics": self.metrics_address,
                "pid": os.getpid(),
                **self._ready_extra()}

    def _ready_extra(self) -> dict[str, Any]:
        return {}

    async def adopt(self) -> dict[str, Any]:
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

    def _held_request_ids(self, e: LLMEngine) -> list[str]:
        return list(e.requests)

    def kv_secret(self) -> bytes | None:
        """For a router adopting detached workers: workers it starts anew must share it."""
        return self.spec.cluster_secret

    async def abort(self, request_id: str) -> bool:
        raise NotImplementedError

    async def stats(self) -> dict[str, Any]:
        """The router's heartbeat: answered without waiting for the engine thread (a long
        step must not look like a dead worker), from plain reads of its counters."""
        e = self.engine
        return {"worker_id": self.worker_id, **self._load(),
                "num_blocks": e.block_manager.num_blocks,
                "num_waiting": len(e.scheduler.waiting), "num_held": len(e.requests),
                "step_s": self.loop.stats.ewma_step_s, "batch": self.loop.stats.last_batch,
                "steps": self.loop.stats.steps}

    async def check_integrity(self) -> dict[str, Any]:
        """Block-accounting check plus what is still held (tests assert nothing leaks)."""
        def check(e: LLMEngine) -> dict[str, Any]:
            e.check_integrity()
            return {"free_blocks": e.block_manager.num_free_blocks,
                    "num_blocks": e.block_manager.num_blocks, "requests": sorted(e.requests),
                    **self._integrity_extra()}
        return await self.call(check)

    def _integrity_extra(self) -> dict[str, Any]:
        return {}

    async def take_index_events(self) -> list[Any]:
        """In-process index mode: block events since the last call (the router applies them)."""
        def take(_: LLMEngine) -> list[Any]:
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

    async def next_items(self, request_id: str) -> list[dict[str, Any]]:
        """The request's output since the last call: waits for one item, returns every item
        queued by then; the last has `finished` once the request ended. The router polls
        this (a long poll) rather than taking a Ray streaming generator, which Ray Client
        (`ray://`, how a Kubernetes router joins) cannot carry."""
        q = self.streams.get(request_id)
        if q is None:
            return [{"finished": True, "error": f"request {request_id!r} is not known here"}]
        items = [await q.get()]
        while not items[-1].get("finished") and not q.empty():
            items.append(q.get_nowait())
        if items[-1].get("finished"):
            self.streams.pop(request_id, None)
        return items

    def _push(self, request_id: str, item: dict[str, Any]) -> None:
        """From any thread: queue an item on the request's stream (dropped if it has none)."""
        if self.aloop is None:
            return

        def put() -> None:
            q = self.streams.get(request_id)
            if q is not None:
                q.put_nowait(item)

        self.aloop.call_soon_threadsafe(put)

    @staticmethod
    def _item(out: RequestOutput) -> dict[str, Any]:
        return {"token_ids": list(out.new_token_ids), "text": out.text,
                "finished": out.finished, "finish_reason": out.finish_reason,
                "num_prompt_tokens": out.num_prompt_tokens,
                "num_cached_tokens": out.num_cached_tokens,
                "num_output_tokens": out.num_output_tokens}

    # ---- engine thread -----------------------------------------------------------------------

    def _load(self) -> dict[str, int]:
        # Plain int reads: a slightly stale view is fine for placement.
        return {"free_blocks": self.engine.block_manager.num_free_blocks,
                "num_running": len(self.engine.scheduler.running)}

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
