"""Decode worker: a Ray actor running the engine in decode mode (DESIGN: request path 4 and 6).

`reserve()` allocates KV blocks for a prompt and tells this rank's `DecodeConnector`
(kv_transfer/decode_connector.py) to expect them; the router hands the receivers' addresses
and the block ids to a prefill worker, which writes straight into them. The reservation is a
lease the prefill side renews while it makes progress (`--kv-timeout-s`). When the transfer
completes the request joins the continuous batch (`commit_kv`); when it fails or the prefill
side goes silent for a lease the reservation is freed (`cancel_reservation`). Under TP every
rank receives its own heads and rank 0 commits once the connector has merged their parts.
`next_items()` (a long poll, worker_host/actor.py) returns the request's token deltas; the
last item carries the finish reason and the decode time measured here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from typing import Any

import ray

from engine.config import EngineMode
from engine.engine import LLMEngine, NoKVSpaceError, RequestOutput
from kv_transfer import KVPool, TransferResult, make_receiver
from kv_transfer.decode_connector import DecodeConnector, PartReport
from pdserve_api.sampling import SamplingParams
from worker_host.actor import WorkerBase
from worker_host.spec import WorkerSpec, node_host

log = logging.getLogger(__name__)


class DecodeWorker(WorkerBase):
    mode = EngineMode.DECODE

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.pool = KVPool.from_engine(self.engine, spec.model_id)
        receiver = make_receiver(spec.transport, self.pool, host=node_host(),
                                 secret=spec.cluster_secret)
        self.kv = DecodeConnector(receiver, self.engine.model_config.num_kv_heads,
                                  spec.tp_size, 0, spec.kv_timeout_s)
        self.transport = type(receiver).__name__.removesuffix("Receiver").lower()
        log.info("%s: KV receiver %s (%s), %d KV blocks", self.worker_id, self.kv.address,
                 self.transport, self.pool.num_blocks)
        self.kv_arrived: dict[str, float] = {}  # engine thread only
        # TP ranks 1..: each receives its own heads; rank 0 commits once all have landed.
        self.followers = list(spec.tp_followers)
        self.addresses = [self.kv.address]
        if self.followers:  # constructed before this rank: their receivers are up
            self.addresses += [info["address"] for info in ray.get(
                [f.ready.remote() for f in self.followers], timeout=600)]
        self._start_loop()

    # ---- actor methods ---------------------------------------------------------------------

    def _ready_extra(self) -> dict[str, Any]:
        return {"transport": self.transport, "address": self.kv.address,
                "addresses": self.addresses, "tp_size": self.spec.tp_size}

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      sampling: dict[str, Any], timeout_s: float | None = None,
                      src_tp: int = 1) -> dict[str, Any]:
        """Reserve blocks for the prompt's KV, to come from a prefill worker of TP size
        src_tp. Returns {addresses (receivers by TP rank), block_ids, free_blocks,
        num_running}, or {error: "no_kv_space" | message, ...} (nothing is held then)."""
        self._open_stream(request_id)
        lease = timeout_s or self.spec.kv_timeout_s
        on_done = self._on_rank0_transfer if self.followers else self._on_transfer

        def reserve(e: LLMEngine) -> list[int]:
            senders = self.kv.senders(src_tp)
            rid, ids = e.reserve_kv(prompt_token_ids, len(prompt_token_ids),
                                    SamplingParams(**sampling), request_id)
            try:
                self.kv.expect(rid, ids, senders[0], on_done, lease)
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
        if self.followers:
            try:
                await asyncio.gather(*(f.expect_kv.remote(request_id, ids, n, lease) for f, n
                                       in zip(self.followers, self.kv.senders(src_tp)[1:])))
            except Exception as e:  # noqa: BLE001 - a dead rank: nothing may stay reserved
                await self.abort(request_id)
                self.streams.pop(request_id, None)
                return {"error": f"a TP rank could not expect the KV: {e}", **self._load()}
        return {"addresses": self.addresses, "block_ids": ids, **self._load()}

    async def abort(self, request_id: str) -> bool:
        """Client cancel / router failure: stop the request wherever it is, free its blocks."""
        if self.kv.cancel(request_id):  # still waiting for KV: _on_transfer frees it
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
        self.kv.close()
        super().shutdown()

    # ---- transport / engine threads --------------------------------------------------------

    def _on_rank0_transfer(self, result: TransferResult) -> None:
        """Under TP: rank 0's part landed (or failed); commit only once every rank's has."""
        assert self.aloop is not None  # set by reserve(), before any transfer is expected
        asyncio.run_coroutine_threadsafe(self._gather_ranks(result), self.aloop)

    async def _gather_ranks(self, own: TransferResult) -> None:
        rid = own.request_id
        parts: list[PartReport | BaseException] = []
        if own.ok:
            replies = await asyncio.gather(*(f.kv_result.remote(rid) for f in self.followers),
                                           return_exceptions=True)
            parts = [r if isinstance(r, BaseException) else
                     PartReport(r["ok"], r.get("num_bytes", 0), r.get("error"))
                     for r in replies]
        result = DecodeConnector.gather(own, parts)
        if not result.ok:
            for f in self.followers:
                f.cancel_kv.remote(rid)
        self._on_transfer(result)

    def _on_transfer(self, result: TransferResult) -> None:
        rid = result.request_id
        if result.ok and result.control is not None:
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
        def settled(f: Future[None]) -> None:
            # An abort may have beaten us to the reservation: then there is nothing to do.
            if f.exception() is not None:
                log.debug("%s: %s after transfer: %s", self.worker_id, rid, f.exception())
        fut.add_done_callback(settled)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            item = self._item(out)
            if out.finished:
                arrived = self.kv_arrived.pop(out.request_id, None)
                item["decode_s"] = now - arrived if arrived is not None else 0.0
            self._push(out.request_id, item)
