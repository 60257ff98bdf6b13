"""Prefill worker: a Ray actor running the engine in prefill mode (DESIGN: request path 5).

`prefill()` takes a prompt and the decode side's reservation (receiver address + block ids).
The engine batches and chunks prompts as usual and reuses this worker's cached prefix blocks.
In the step where a prompt's last chunk runs, a transfer session to the decode worker is
opened before the forward pass and each layer's blocks are shipped as soon as that layer has
written them (`LLMEngine.kv_layer_hook`), so the transfer overlaps the remaining layers. After
the first token is sampled the control message (token count + first token) completes the
transfer and the blocks are released (they stay here as evictable prefix cache).

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
from engine.sampling_params import SamplingParams
from engine.scheduler import SchedulerOutput
from engine.worker_base import WorkerBase
from engine.worker_spec import WorkerSpec
from kv_transfer import KVControl, KVPool, SendSession, make_sender
from kv_transfer.header import KVLayoutMismatch
from kv_transfer.transport import TransferError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Job:
    request_id: str
    dst_address: str
    dst_block_ids: list[int]
    future: Future = field(default_factory=Future)
    received: float = field(default_factory=time.monotonic)
    started: float | None = None  # first scheduled
    computed: float | None = None  # first token sampled
    session: SendSession | None = None
    error: str | None = None


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
        self.engine.kv_layer_hook = self._layer_hook
        self._start_loop()

    # ---- actor methods ---------------------------------------------------------------------

    def _ready_extra(self) -> dict[str, Any]:
        return {"transport": self.transport}

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
                      sampling: dict[str, Any], dst_address: str, dst_block_ids: list[int]
                      ) -> dict[str, Any]:
        """Compute the prompt's KV into the decode worker's reserved blocks; return the first
        token. Never raises for a request-level failure: the dict's `error` says what failed
        (`transfer_failed` true when a retry on another decode worker may succeed)."""
        job = _Job(request_id, dst_address, list(dst_block_ids))

        def start(engine: LLMEngine) -> None:
            engine.add_request(prompt_token_ids, SamplingParams(**sampling), request_id)
            self.jobs[request_id] = job

        try:
            await self.call(start)
        except ValueError as e:  # invalid request: the router validated, so a bug or race
            log.warning("%s: prefill %s refused: %s", self.worker_id, request_id, e)
            return {"error": f"{type(e).__name__}: {e}", "transfer_failed": False}
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.loop.submit(lambda e: self._abort(e, request_id, "cancelled"))
            raise

    async def abort(self, request_id: str) -> bool:
        return await self.call(lambda e: self._abort(e, request_id, "aborted by the router"))

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
        sessions: list[tuple[_Job, SendSession]] = []
        for req in sched.requests:
            job = self.jobs.get(req.request_id)
            if job is None:
                continue
            if job.started is None:
                job.started = now
            finishing = (req.num_computed_tokens + sched.num_scheduled_tokens[req.request_id]
                         >= req.num_prompt_tokens)
            if finishing and job.session is None and job.error is None:
                self._open(job)
                if job.session is not None:
                    sessions.append((job, job.session))
        if not sessions:
            return None

        def on_layer(layer: int) -> None:
            if self.spec.fault_layer_delay_s:
                time.sleep(self.spec.fault_layer_delay_s)
            for job, session in sessions:
                if job.error is not None:
                    continue
                try:
                    session.send_layer(layer)
                except Exception as e:  # noqa: BLE001 - any transport error: the step goes on
                    log.warning("%s: %s: sending layer %d failed: %s", self.worker_id,
                                job.request_id, layer, e)
                    self._fail_session(job, f"sending layer {layer}: {e}")
        return on_layer

    def _open(self, job: _Job) -> None:
        handoff = self.engine.kv_handoff(job.request_id)
        if len(handoff.block_ids) != len(job.dst_block_ids):
            job.error = (f"decode reserved {len(job.dst_block_ids)} blocks for a prompt of "
                         f"{len(handoff.block_ids)} blocks")
            return
        try:
            job.session = self.sender.open(job.dst_address, job.request_id, handoff.block_ids,
                                           job.dst_block_ids, timeout_s=self.spec.kv_timeout_s)
        except (TransferError, KVLayoutMismatch, OSError, ValueError) as e:
            job.error = f"opening the KV transfer to {job.dst_address}: {e}"

    def _fail_session(self, job: _Job, error: str) -> None:
        job.error = error
        if job.session is not None:
            try:
                job.session.abort(error)
            except Exception:  # the peer may be gone: the error above is what matters
                log.debug("abort of %s failed", job.request_id, exc_info=True)
            job.session = None

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            job = self.jobs.get(out.request_id)
            if job is None or not out.finished:
                continue
            job.computed = time.monotonic()
            if out.finish_reason == "prefilled":
                self._complete(job, out)
            else:  # stop/length on the first token, or aborted: nothing goes to decode
                if job.session is not None:
                    self._fail_session(job, f"request finished at prefill ({out.finish_reason})")
                    job.error = None
                self._resolve(job, out, finished=True)

    def _complete(self, job: _Job, out: RequestOutput) -> None:
        handoff = self.engine.kv_handoff(job.request_id)
        first = out.new_token_ids[0]
        transfer_s = 0.0
        if job.error is None and job.session is None:
            job.error = "the KV transfer was never opened"
        if job.error is None:
            try:
                result = job.session.finish(
                    KVControl(job.request_id, handoff.num_computed_tokens, (first,)))
                transfer_s = time.monotonic() - job.computed
                if not result.ok:
                    job.error = f"KV transfer failed: {result.error}"
                self.metrics.transfer_bytes(self.transport, result.num_bytes)
            except (TransferError, KVLayoutMismatch, OSError, ValueError) as e:
                job.error = f"KV transfer failed: {e}"
            job.session = None
        self.engine.release(job.request_id)
        self._resolve(job, out, finished=False, transfer_s=transfer_s)

    def _resolve(self, job: _Job, out: RequestOutput, finished: bool,
                 transfer_s: float = 0.0) -> None:
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
            "error": job.error,
            "transfer_failed": job.error is not None,
            "transport": self.transport,
        }
        if not job.future.done():
            job.future.set_result(result)

    def _abort(self, engine: LLMEngine, request_id: str, reason: str) -> bool:
        job = self.jobs.pop(request_id, None)
        if job is not None:
            self._fail_session(job, reason)
            if not job.future.done():
                job.future.set_result({"worker_id": self.worker_id, "error": reason,
                                       "transfer_failed": False, "aborted": True})
        return engine.abort(request_id) or job is not None
