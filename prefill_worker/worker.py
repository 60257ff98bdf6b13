"""Prefill worker: a Ray actor running the engine in prefill mode (DESIGN: request path 5).

`prefill()` takes a prompt and the decode side's reservation (its receivers' addresses, one per
decode TP rank, + block ids).
The engine batches and chunks prompts as usual and reuses this worker's cached prefix blocks.
In the step where a prompt's last chunk runs, a transfer session to the decode worker is
opened before the forward pass and each layer's blocks are shipped as soon as that layer has
written them (`LLMEngine.kv_layer_hook`), so the transfer overlaps the remaining layers. After
the first token is sampled the control message (token count + first token) completes the
transfer and the blocks are released (they stay here as evictable prefix cache). Under tensor
parallelism on either side, each prefill rank ships the KV heads it holds straight to the
decode ranks that own them (kv_transfer/shipment.py; ranks 1.. in worker_host/tp_follower.py).

Results come back as plain dicts: first token and text, cached token count, and timings
measured here (queued in this worker, prefill compute, transfer tail after compute).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from engine.scheduler import SchedulerOutput
from kv_transfer import KVControl, KVPool, make_sender
from kv_transfer.header import KVLayoutMismatch
from kv_transfer.shipment import KVShipment, routes_for_rank
from kv_transfer.transport import TransferError
from pdserve_api.sampling import SamplingParams
from worker_host.actor import WorkerBase
from worker_host.spec import WorkerSpec
from worker_host.tp_follower import follower_errors

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request_id: str
    shipment: KVShipment
    future: Future = field(default_factory=Future)
    received: float = field(default_factory=time.monotonic)
    started: float | None = None  # first scheduled
    computed: float | None = None  # first token sampled

    @property
    def error(self) -> str | None:
        return self.shipment.error


class PrefillWorker(WorkerBase):
    mode = EngineMode.PREFILL
    publishes_blocks = True

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.pool = KVPool.from_engine(self.engine, spec.model_id)
        self.sender = make_sender(spec.transport, self.pool, secret=spec.cluster_secret)
        self.transport = type(self.sender).__name__.removesuffix("Sender").lower()
        log.info("%s: KV transport %s, %d KV blocks", self.worker_id, self.transport,
                 self.pool.num_blocks)
        self.jobs: dict[str, _Job] = {}  # engine thread only
        self.num_kv_heads = self.engine.model_config.num_kv_heads
        self.followers = list(spec.tp_followers)  # TP ranks 1..: they ship their own heads
        self.engine.kv_layer_hook = self._layer_hook
        self._start_loop()

    # ---- actor methods ---------------------------------------------------------------------

    def _ready_extra(self) -> dict[str, Any]:
        return {"transport": self.transport, "tp_size": self.spec.tp_size}

    async def connect_decode(self, addresses: list[str]) -> dict[str, str]:
        """Open the KV connections to these decode workers now (TCP/UCX handshake, auth), on
        the engine thread that later sends on them; returns the errors by address."""
        def connect(_: Any) -> dict[str, str]:
            errors = {}
            for address in addresses:
                try:
                    self.sender.connect(address)
                except (TransferError, KVLayoutMismatch, OSError, ValueError) as e:
                    errors[address] = str(e)
            return errors
        return await self.call(connect)

    async def prefill(self, request_id: str, prompt_token_ids: list[int],
                      sampling: dict[str, Any], dst_addresses: list[str],
                      dst_block_ids: list[int]) -> dict[str, Any]:
        """Compute the prompt's KV into the decode worker's reserved blocks (dst_addresses:
        its receivers, one per decode TP rank); return the first token. Never raises for a
        request-level failure: the dict's `error` says what failed (`transfer_failed` true
        when a retry on another decode worker may succeed). Under TP the follower ranks ship
        their own heads (worker_host/tp_follower.py) and report before this returns."""
        try:
            routes = routes_for_rank(self.num_kv_heads, self.spec.tp_size, 0, dst_addresses)
            await self.plan_followers(request_id, dst_addresses, dst_block_ids)
        except Exception as e:  # noqa: BLE001 - a follower refusing or dying: this request fails
            return {"error": f"planning the TP KV transfer: {type(e).__name__}: {e}",
                    "transfer_failed": True}
        job = _Job(request_id, KVShipment(self.sender, request_id, routes, list(dst_block_ids),
                                          self.spec.kv_timeout_s))

        def start(engine: LLMEngine) -> None:
            engine.add_request(prompt_token_ids, SamplingParams(**sampling), request_id)
            self.jobs[request_id] = job

        try:
            await self.call(start)
        except ValueError as e:  # invalid request: the router validated, so a bug or race
            log.warning("%s: prefill %s refused: %s", self.worker_id, request_id, e)
            self.drop_followers(request_id)
            return {"error": f"{type(e).__name__}: {e}", "transfer_failed": False}
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.loop.submit(lambda e: self._abort(e, request_id, "cancelled"))
            self.drop_followers(request_id)
            raise
        return await self.follower_results(request_id, result)

    async def abort(self, request_id: str) -> bool:
        return await self.call(lambda e: self._abort(e, request_id, "aborted by the router"))

    async def plan_followers(self, request_id: str, dst_addresses: list[str],
                             dst_block_ids: list[int]) -> None:
        """Tell the follower ranks where their heads of this request go, before it is
        scheduled (their layer hooks open the sessions in the step it completes)."""
        if self.followers:
            await asyncio.gather(*(f.plan_send.remote(request_id, dst_addresses, dst_block_ids)
                                   for f in self.followers))

    def drop_followers(self, request_id: str) -> None:
        for f in self.followers:
            f.drop_send.remote(request_id)

    async def follower_results(self, request_id: str, result: dict[str, Any]
                               ) -> dict[str, Any]:
        """Rank 0's result, failed if any follower's part of the transfer failed."""
        if not self.followers:
            return result
        if result.get("error") or result.get("finished"):  # nothing more goes to decode
            self.drop_followers(request_id)
            return result
        replies = await asyncio.gather(*(f.send_result.remote(request_id)
                                         for f in self.followers), return_exceptions=True)
        errors = follower_errors(replies)
        if errors:
            return {**result, "error": f"a TP rank's KV transfer failed: {errors[0]}",
                    "transfer_failed": True}
        return result

    def _integrity_extra(self) -> dict[str, Any]:
        return {"jobs": sorted(self.jobs)}

    def _held_request_ids(self, e: LLMEngine) -> list[str]:
        return [*e.requests, *self.jobs]

    def shutdown(self) -> None:
        super().shutdown()
        self.sender.close()

    # ---- engine thread -------------------------------------------------------------------

    def _layer_hook(self, sched: SchedulerOutput):
        now = time.monotonic()
        shipments: list[KVShipment] = []
        for req in sched.requests:
            job = self.jobs.get(req.request_id)
            if job is None:
                continue
            if job.started is None:
                job.started = now
            finishing = (req.num_computed_tokens + sched.num_scheduled_tokens[req.request_id]
                         >= req.num_prompt_tokens)
            if finishing and not job.shipment.opened:
                job.shipment.open(self.engine.kv_handoff(job.request_id).block_ids)
                if job.error is None:
                    shipments.append(job.shipment)
        if not shipments:
            return None

        def on_layer(layer: int) -> None:
            if self.spec.fault_layer_delay_s:
                time.sleep(self.spec.fault_layer_delay_s)
            for shipment in shipments:
                shipment.send_layer(layer)
        return on_layer

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None or not out.finished:
                continue
            job.computed = time.monotonic()
            if out.finish_reason == "prefilled":
                self._complete(job, out)
            else:  # stop/length on the first token, or aborted: nothing goes to decode
                job.shipment.fail(f"request finished at prefill ({out.finish_reason})")
                self._resolve(job, out, finished=True, error=None)

    def _complete(self, job: _Job, out: RequestOutput) -> None:
        handoff = self.engine.kv_handoff(job.request_id)
        job.shipment.finish(KVControl(job.request_id, handoff.num_computed_tokens,
                                      (out.new_token_ids[0],)))
        transfer_s = time.monotonic() - job.computed
        self.metrics.transfer_bytes(self.transport, job.shipment.num_bytes)
        self.engine.release(job.request_id)
        self._resolve(job, out, finished=False, transfer_s=transfer_s, error=job.error)

    def _resolve(self, job: _Job, out: RequestOutput, finished: bool,
                 transfer_s: float = 0.0, error: str | None = None) -> None:
        self.jobs.pop(job.request_id, None)
        started = job.started if job.started is not None else job.computed
        result = {
            "worker_id": self.worker_id,
            "token_ids": list(out.new_token_ids),
            "text": out.text,
            "finished": finished,
            "finish_reason": out.finish_reason,
            "num_prompt_tokens": out.num_prompt_tokens,
            "num_cached_tokens": out.num_cached_tokens,
            "queued_s": started - job.received,
            "prefill_s": job.computed - started,
            "transfer_s": transfer_s,
            "error": error,
            "transfer_failed": error is not None,
            "transport": self.transport,
        }
        if not job.future.done():
            job.future.set_result(result)

    def _abort(self, engine: LLMEngine, request_id: str, reason: str) -> bool:
        job = self.jobs.pop(request_id, None)
        if job is not None:
            job.shipment.fail(reason)
            if not job.future.done():
                job.future.set_result({"worker_id": self.worker_id, "error": reason,
                                       "transfer_failed": False, "aborted": True})
        return engine.abort(request_id) or job is not None
