"""Prefill worker: a Ray actor running the engine in prefill mode (DESIGN: request path 5).

`prefill()` takes a prompt and the decode side's reservation (its receivers' addresses, one per
decode TP rank, + block ids).
The engine batches and chunks prompts as usual and reuses this worker's cached prefix blocks.
The KV goes through this rank's `PrefillConnector` (kv_transfer/prefill_connector.py): planned
when the request arrives (its reservation's lease is renewed from then on), opened in the step
where the prompt's last chunk runs, each layer shipped as soon as that layer has written it
(`LLMEngine.kv_layer_hook`), so the transfer overlaps the remaining layers. After the first
token is sampled the control message (token count + first token) completes the transfer off
the engine thread, so the next step does not wait for it; once the receivers confirm, the
blocks are released on the engine thread (they stay here as evictable prefix cache). Under
tensor parallelism on either side, each prefill rank ships the KV heads it holds straight to
the decode ranks that own them (ranks 1.. in worker_host/tp_follower.py, with the same
connector).

Results come back as plain dicts: first token and text, cached token count, and timings
measured here (queued in this worker, prefill compute, transfer tail after compute).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from engine.scheduler import SchedulerOutput
from kv_transfer import KVControl, KVPool, make_sender
from kv_transfer.prefill_connector import TRANSFER_ERRORS, PrefillConnector, ShipResult
from pdserve_api.sampling import SamplingParams
from worker_host.actor import WorkerBase
from worker_host.spec import WorkerSpec
from worker_host.tp_follower import follower_errors

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request_id: str
    future: Future = field(default_factory=Future)
    received: float = field(default_factory=time.monotonic)
    started: float | None = None  # first scheduled
    computed: float | None = None  # first token sampled
    shipping: bool = False  # the KV transfer is completing off the engine thread


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
        self.kv = PrefillConnector(self.sender, self.engine.model_config.num_kv_heads,
                                   spec.tp_size, 0, spec.kv_timeout_s,
                                   spec.fault_layer_delay_s, f"{self.worker_id}-kv")
        self.jobs: dict[str, _Job] = {}  # engine thread only
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
                except TRANSFER_ERRORS as e:
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
            self.kv.plan(request_id, dst_addresses, dst_block_ids)
            await self.plan_followers(request_id, dst_addresses, dst_block_ids)
        except Exception as e:  # noqa: BLE001 - a follower refusing or dying: this request fails
            self.kv.drop(request_id, "planning failed")
            self.drop_followers(request_id)
            return {"error": f"planning the TP KV transfer: {type(e).__name__}: {e}",
                    "transfer_failed": True}
        job = _Job(request_id)

        def start(engine: LLMEngine) -> None:
            engine.add_request(prompt_token_ids, SamplingParams(**sampling), request_id)
            self.jobs[request_id] = job

        try:
            await self.call(start)
        except ValueError as e:  # invalid request: the router validated, so a bug or race
            log.warning("%s: prefill %s refused: %s", self.worker_id, request_id, e)
            self.kv.drop(request_id, f"refused: {e}")
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
        return {"jobs": sorted({*self.jobs, *self.kv.planned()})}

    def _held_request_ids(self, e: LLMEngine) -> list[str]:
        return [*e.requests, *self.jobs]

    def shutdown(self) -> None:
        super().shutdown()
        self.kv.close()
        self.sender.close()

    # ---- engine thread -------------------------------------------------------------------

    def _layer_hook(self, sched: SchedulerOutput):
        """Open the transfers of the prompts whose last chunk runs in this step."""
        now = time.monotonic()
        finishing = []
        for req in sched.requests:
            job = self.jobs.get(req.request_id)
            if job is None:
                continue
            if job.started is None:
                job.started = now
            if (req.num_computed_tokens + sched.num_scheduled_tokens[req.request_id]
                    >= req.num_prompt_tokens):
                finishing.append((job.request_id,
                                  self.engine.kv_handoff(job.request_id).block_ids))
        return self.kv.begin_step(finishing) if finishing else None

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None or not out.finished or job.shipping:
                continue
            job.computed = time.monotonic()
            if out.finish_reason == "prefilled":
                handoff = self.engine.kv_handoff(job.request_id)
                control = KVControl(job.request_id, handoff.num_computed_tokens,
                                    (out.new_token_ids[0],))
                job.shipping = True
                self.kv.finish(job.request_id, control, self._on_shipped(job, out))
            else:  # stop/length on the first token, or aborted: nothing goes to decode
                self.kv.drop(job.request_id, f"request finished at prefill ({out.finish_reason})")
                self._resolve(job, out, finished=True, error=None)

    def _on_shipped(self, job: _Job, out: RequestOutput) -> Callable[[ShipResult], None]:
        def shipped(result: ShipResult) -> None:
            """A finisher thread: the transfer is over. Release the blocks on the engine
            thread, then answer."""
            self.metrics.transfer_bytes(self.transport, result.num_bytes)

            def release(engine: LLMEngine) -> None:
                try:
                    engine.release(job.request_id)
                finally:
                    self._resolve(job, out, finished=False, transfer_s=result.transfer_s,
                                  error=result.error)
            self.loop.submit(release)
        return shipped

    def _resolve(self, job: _Job, out: RequestOutput, finished: bool,
                 transfer_s: float = 0.0, error: str | None = None) -> None:
        self.jobs.pop(job.request_id, None)
        computed = job.computed if job.computed is not None else time.monotonic()
        started = job.started if job.started is not None else computed
        result = {
            "worker_id": self.worker_id,
            "token_ids": list(out.new_token_ids),
            "text": out.text,
            "finished": finished,
            "finish_reason": out.finish_reason,
            "num_prompt_tokens": out.num_prompt_tokens,
            "num_cached_tokens": out.num_cached_tokens,
            "queued_s": started - job.received,
            "prefill_s": computed - started,
            "transfer_s": transfer_s,
            "error": error,
            "transfer_failed": error is not None,
            "transport": self.transport,
        }
        if not job.future.done():
            job.future.set_result(result)

    def _abort(self, engine: LLMEngine, request_id: str, reason: str) -> bool:
        job = self.jobs.get(request_id)
        if job is not None and not job.future.done():
            job.future.set_result({"worker_id": self.worker_id, "error": reason,
                                   "transfer_failed": False, "aborted": True})
        if job is not None and job.shipping:  # completing off this thread: blocks go after
            return True
        self.jobs.pop(request_id, None)
        self.kv.drop(request_id, reason)
        return engine.abort(request_id) or job is not None
