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

Results come back as a `PrefillResult` (pdserve_api/worker_protocol.py): first token and text,
and the prefill's cost from the engine's stamps on the request (queued here, compute) plus the
transfer tail after the compute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from engine.scheduler import SchedulerOutput
from kv_transfer import KVControl, KVPool, make_sender
from kv_transfer.prefill_connector import TRANSFER_ERRORS, PrefillConnector, ShipResult
from pdserve_api.worker_protocol import FailedSide, PrefillRequest, PrefillResult, SendPlan
from worker_host.actor import WorkerBase, prefill_timing
from worker_host.spec import WorkerSpec
from worker_host.tp_follower import follower_errors

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    """The caller waiting for a prompt's result (its timings are the engine request's
    stamps)."""

    request_id: str
    future: Future[PrefillResult] = field(default_factory=Future)
    shipping: bool = False  # the KV transfer is completing off the engine thread


class PrefillWorker(WorkerBase):
    mode = EngineMode.PREFILL
    publishes_blocks = True

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.pool = KVPool.from_engine(self.engine, spec.model_id)
        self.sender = make_sender(spec.transport, self.pool, secret=spec.cluster_secret)
        self.transport: str = type(self.sender).__name__.removesuffix("Sender").lower()
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

    async def connect_decode(self, addresses: list[str]) -> dict[str, str]:
        """Open the KV connections to these decode workers now (TCP/UCX handshake, auth), on
        the engine thread that later sends on them; returns the errors by address."""
        def connect(_: LLMEngine) -> dict[str, str]:
            errors = {}
            for address in addresses:
                try:
                    self.sender.connect(address)
                except TRANSFER_ERRORS as e:
                    errors[address] = str(e)
            return errors
        return await self.call(connect)

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Compute the prompt's KV into the decode worker's reserved blocks (dst_addresses:
        its receivers, one per decode TP rank); return the first token. Never raises for a
        request-level failure: the result's `error` says what failed (`retry_on` the side a
        retry should avoid). Under TP the follower ranks ship their own heads
        (worker_host/tp_follower.py) and report before this returns."""
        request_id = req.request_id
        try:
            self.kv.plan(request_id, req.dst_addresses, req.dst_block_ids)
            await self.plan_followers(SendPlan(request_id, req.dst_addresses,
                                               req.dst_block_ids))
        except Exception as e:  # noqa: BLE001 - a follower refusing or dying: this request fails
            self.kv.drop(request_id, "planning failed")
            self.drop_followers(request_id)
            return self._failed(request_id, f"planning the TP KV transfer: "
                                f"{type(e).__name__}: {e}", FailedSide.PREFILL)
        job = _Job(request_id)

        def start(engine: LLMEngine) -> None:
            self._refuse_if_aborted(request_id)
            engine.add_request(req.prompt_token_ids, req.sampling, request_id)
            self.jobs[request_id] = job

        try:
            await self.call(start)
        except ValueError as e:  # invalid request: the router validated, so a bug or race
            log.warning("%s: prefill %s refused: %s", self.worker_id, request_id, e)
            self.kv.drop(request_id, f"refused: {e}")
            self.drop_followers(request_id)
            return self._failed(request_id, f"{type(e).__name__}: {e}", None)
        try:
            result = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.loop.submit(lambda e: self._abort(e, request_id, "cancelled"))
            self.drop_followers(request_id)
            raise
        return await self.follower_results(request_id, result)

    async def abort(self, request_id: str) -> bool:
        return await self.call(lambda e: self._abort(e, request_id, "aborted by the router"))

    async def plan_followers(self, plan: SendPlan) -> None:
        """Tell the follower ranks where their heads of this request go, before it is
        scheduled (their layer hooks open the sessions in the step it completes)."""
        if self.followers:
            await asyncio.gather(*(f.plan_send.remote(plan) for f in self.followers))

    def drop_followers(self, request_id: str) -> None:
        for f in self.followers:
            f.drop_send.remote(request_id)

    async def follower_results(self, request_id: str, result: PrefillResult
                               ) -> PrefillResult:
        """Rank 0's result, failed if any follower's part of the transfer failed."""
        if not self.followers:
            return result
        if result.error or result.finished:  # nothing more goes to decode
            self.drop_followers(request_id)
            return result
        replies = await asyncio.gather(*(f.send_result.remote(request_id)
                                         for f in self.followers), return_exceptions=True)
        errors = follower_errors(replies)
        if errors:
            # A rank that did not answer is this worker's failure; one that reported an
            # error was failed by its receiver.
            dead = any(isinstance(r, BaseException) for r in replies)
            return dataclasses.replace(
                result, error=f"a TP rank's KV transfer failed: {errors[0]}",
                retry_on=FailedSide.PREFILL if dead else FailedSide.DECODE)
        return result

    def _failed(self, request_id: str, error: str, retry_on: FailedSide | None
                ) -> PrefillResult:
        return PrefillResult(request_id, self.worker_id, transport=self.transport,
                             error=error, retry_on=retry_on)

    def _unresolved_jobs(self) -> list[str]:
        return sorted({*self.jobs, *self.kv.planned()})

    def _held_request_ids(self, e: LLMEngine) -> list[str]:
        return [*e.requests, *self.jobs]

    def shutdown(self) -> None:
        super().shutdown()
        self.kv.close()
        self.sender.close()

    # ---- engine thread -------------------------------------------------------------------

    def _layer_hook(self, sched: SchedulerOutput):
        """Open the transfers of the prompts whose last chunk runs in this step."""
        finishing = []
        for req in sched.requests:
            job = self.jobs.get(req.request_id)
            if job is None:
                continue
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
        if out.finish_reason == "abort":  # the engine aborted it (e.g. a failed step)
            error = error or "the prefill worker aborted the request"
        result = PrefillResult(
            job.request_id, self.worker_id, token_ids=list(out.new_token_ids), text=out.text,
            finished=finished, finish_reason=out.finish_reason, timing=prefill_timing(out),
            transfer_s=transfer_s, transport=self.transport, error=error,
            # The receiving side failed the transfer: another decode worker may take it.
            retry_on=FailedSide.DECODE if error is not None and out.finish_reason != "abort"
            else None)
        if not job.future.done():
            job.future.set_result(result)

    def _abort(self, engine: LLMEngine, request_id: str, reason: str) -> bool:
        job = self.jobs.get(request_id)
        if job is not None and not job.future.done():
            job.future.set_result(self._failed(request_id, reason, None))
        if job is not None and job.shipping:  # completing off this thread: blocks go after
            return True
        self.jobs.pop(request_id, None)
        self.kv.drop(request_id, reason)
        if engine.abort(request_id) or job is not None:
            return True
        self._note_aborted_early(request_id)
        return False
