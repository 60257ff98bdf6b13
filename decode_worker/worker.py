"""Decode worker: a Ray actor running the engine in decode mode (DESIGN: request path 4 and 6).

`reserve()` allocates KV blocks for a prompt and tells the KV receiver to expect them; the
router hands the receiver's address and the block ids to a prefill worker, which writes
straight into them. When the transfer completes the request joins the continuous batch
(`commit_kv`); when it fails or times out the reservation is freed (`cancel_reservation`).
`stream()` is a Ray streaming generator of the request's token deltas; the last item carries
the finish reason and the decode time measured here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.config import EngineMode
from engine.engine import LLMEngine, NoKVSpaceError, RequestOutput
from engine.engine_loop import EngineLoop
from engine.sampling_params import SamplingParams
from engine.worker_spec import WorkerSpec, node_host
from kv_transfer import KVPool, TransferResult, make_receiver

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, spec: WorkerSpec):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.worker_id = spec.worker_id
        self.engine = LLMEngine(spec.engine_config(EngineMode.DECODE))
        self.pool = KVPool.from_engine(self.engine, spec.model_id)
        self.receiver = make_receiver(spec.transport, self.pool, host=node_host())
        self.transport = type(self.receiver).__name__.removesuffix("Receiver").lower()
        log.info("%s: KV receiver %s (%s), %d KV blocks", self.worker_id, self.receiver.address,
                 self.transport, self.pool.num_blocks)
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[str, asyncio.Queue] = {}  # actor event loop only
        self.kv_arrived: dict[str, float] = {}  # engine thread only
        self.loop = EngineLoop(self.engine, self._on_outputs, name=self.worker_id)

    # ---- actor methods ---------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "transport": self.transport,
                "address": self.receiver.address, "num_blocks": self.pool.num_blocks,
                "block_size": self.engine.config.block_size,
                "max_model_len": self.engine.max_model_len}

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      sampling: dict[str, Any], timeout_s: float | None = None
                      ) -> dict[str, Any]:
        """Reserve blocks for the prompt's KV. Returns {address, block_ids, free_blocks,
        num_running}, or {error: "no_kv_space" | message, ...} (nothing is held then)."""
        self.aloop = asyncio.get_running_loop()
        self.streams[request_id] = asyncio.Queue()
        timeout = timeout_s or self.spec.kv_timeout_s

        def reserve(e: LLMEngine) -> list[int]:
            rid, ids = e.reserve_kv(prompt_token_ids, len(prompt_token_ids),
                                    SamplingParams(**sampling), request_id)
            try:
                self.receiver.expect(rid, ids, self._on_transfer, timeout)
            except Exception:
                e.cancel_reservation(rid)
                raise
            return ids

        try:
            ids = await asyncio.wrap_future(self.loop.submit(reserve))
        except NoKVSpaceError as e:
            self.streams.pop(request_id, None)
            return {"error": "no_kv_space", "message": str(e), **self._load()}
        except (ValueError, RuntimeError) as e:  # e.g. a request id in use, receiver closed
            log.warning("%s: reserve %s failed: %s", self.worker_id, request_id, e)
            self.streams.pop(request_id, None)
            return {"error": f"{type(e).__name__}: {e}", **self._load()}
        return {"address": self.receiver.address, "block_ids": ids, **self._load()}

    async def stream(self, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """Deltas until the request ends; the last item has `finished` (or `error`)."""
        q = self.streams.get(request_id)
        if q is None:
            yield {"finished": True, "error": f"request {request_id!r} is not reserved here"}
            return
        try:
            while True:
                item = await q.get()
                yield item
                if item.get("finished"):
                    return
        finally:
            self.streams.pop(request_id, None)

    async def abort(self, request_id: str) -> bool:
        """Client cancel / router failure: stop the request wherever it is, free its blocks."""
        if self.receiver.cancel(request_id):  # still waiting for KV: _on_transfer frees it
            return True

        def abort(e: LLMEngine) -> bool:
            if e.abort(request_id):
                return True
            try:  # reserved, transfer reported done but not yet committed
                e.cancel_reservation(request_id)
                return True
            except KeyError:
                return False

        found = await asyncio.wrap_future(self.loop.submit(abort))
        self._push(request_id, {"finished": True, "finish_reason": "abort", "token_ids": [],
                                "text": ""})
        return found

    async def stats(self) -> dict[str, Any]:
        def read(e: LLMEngine) -> dict[str, Any]:
            return {"worker_id": self.worker_id, **self._load(),
                    "num_blocks": e.block_manager.num_blocks,
                    "num_waiting": len(e.scheduler.waiting),
                    "step_s": self.loop.stats.ewma_step_s,
                    "batch": self.loop.stats.last_batch, "steps": self.loop.stats.steps}
        return await asyncio.wrap_future(self.loop.submit(read))

    async def check_integrity(self) -> dict[str, Any]:
        def check(e: LLMEngine) -> dict[str, Any]:
            e.check_integrity()
            return {"free_blocks": e.block_manager.num_free_blocks,
                    "num_blocks": e.block_manager.num_blocks, "requests": sorted(e.requests)}
        return await asyncio.wrap_future(self.loop.submit(check))

    def shutdown(self) -> None:
        self.receiver.close()
        self.loop.stop()

    # ---- transport / engine threads --------------------------------------------------------

    def _load(self) -> dict[str, int]:
        # Plain int reads: a slightly stale view is fine for placement.
        return {"free_blocks": self.engine.block_manager.num_free_blocks,
                "num_running": len(self.engine.scheduler.running)}

    def _on_transfer(self, result: TransferResult) -> None:
        rid = result.request_id
        if result.ok:
            control = result.control

            def commit(e: LLMEngine) -> None:
                self.kv_arrived[rid] = time.monotonic()
                e.commit_kv(rid, control.num_computed_tokens, control.output_token_ids)

            fut = self.loop.submit(commit)
        else:
            fut = self.loop.submit(lambda e: e.cancel_reservation(rid))
            self._push(rid, {"finished": True, "error": f"KV transfer failed: {result.error}",
                             "transfer_failed": True})
        # An abort may have beaten us to the reservation: then there is nothing to do.
        fut.add_done_callback(lambda f: f.exception() and log.debug(
            "%s: %s after transfer: %s", self.worker_id, rid, f.exception()))

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            item = {"token_ids": list(out.new_token_ids), "text": out.text,
                    "finished": out.finished, "finish_reason": out.finish_reason,
                    "num_output_tokens": out.num_output_tokens}
            if out.finished:
                arrived = self.kv_arrived.pop(out.request_id, None)
                item["decode_s"] = now - arrived if arrived is not None else 0.0
            self._push(out.request_id, item)

    def _push(self, request_id: str, item: dict[str, Any]) -> None:
        if self.aloop is None:
            return

        def put() -> None:
            q = self.streams.get(request_id)
            if q is not None:
                q.put_nowait(item)

        self.aloop.call_soon_threadsafe(put)
