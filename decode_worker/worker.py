"""Decode worker: a Ray actor running the engine in decode mode (DESIGN: request path 4 and 6).

`reserve()` allocates KV blocks for a prompt and tells the KV receiver to expect them; the
router hands the receiver's address and the block ids to a prefill worker, which writes
straight into them. When the transfer completes the request joins the continuous batch
(`commit_kv`); when it fails or times out the reservation is freed (`cancel_reservation`).
`stream()` is a Ray streaming generator of the request's token deltas; the last item carries
the finish reason and the decode time measured here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.config import EngineMode
from engine.engine import LLMEngine, NoKVSpaceError, RequestOutput
from engine.sampling_params import SamplingParams
from engine.worker_base import WorkerBase
from engine.worker_spec import WorkerSpec, node_host
from kv_transfer import KVPool, TransferResult, make_receiver

log = logging.getLogger(__name__)


class DecodeWorker(WorkerBase):
    mode = EngineMode.DECODE

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.pool = KVPool.from_engine(self.engine, spec.model_id)
        self.receiver = make_receiver(spec.transport, self.pool, host=node_host(),
                                      secret=spec.cluster_secret)
        self.transport = type(self.receiver).__name__.removesuffix("Receiver").lower()
        log.info("%s: KV receiver %s (%s), %d KV blocks", self.worker_id, self.receiver.address,
                 self.transport, self.pool.num_blocks)
        self.kv_arrived: dict[str, float] = {}  # engine thread only
        self._start_loop()

    # ---- actor methods ---------------------------------------------------------------------

    def _ready_extra(self) -> dict[str, Any]:
        return {"transport": self.transport, "address": self.receiver.address}

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      sampling: dict[str, Any], timeout_s: float | None = None
                      ) -> dict[str, Any]:
        """Reserve blocks for the prompt's KV. Returns {address, block_ids, free_blocks,
        num_running}, or {error: "no_kv_space" | message, ...} (nothing is held then)."""
        self._open_stream(request_id)
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
            ids = await self.call(reserve)
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
        async for item in self._drain_stream(request_id):
            yield item

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

        found = await self.call(abort)
        self._push(request_id, {"finished": True, "finish_reason": "abort", "token_ids": [],
                                "text": ""})
        return found

    def shutdown(self) -> None:
        self.receiver.close()
        super().shutdown()

    # ---- transport / engine threads --------------------------------------------------------

    def _on_transfer(self, result: TransferResult) -> None:
        rid = result.request_id
        if result.ok:
            self.metrics.transfer_bytes(self.transport, result.num_bytes)
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
            item = self._item(out)
            if out.finished:
                arrived = self.kv_arrived.pop(out.request_id, None)
                item["decode_s"] = now - arrived if arrived is not None else 0.0
            self._push(out.request_id, item)
