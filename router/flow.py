"""The request flow: one admitted `RouterRequest` (router/request.py) driven through its
workers to its final message (DESIGN: "A request's path", steps 3-7).

P/D: wait for a prefill slot (router/slo.py), reserve KV blocks on a decode worker, have the
prefill worker compute the prompt and ship its KV into them, relay the first token, then the
decode worker's tokens. A failed KV transfer is retried once, avoiding the side that failed
(`PrefillResult.retry_on`); a decode worker dying mid-stream is migrated once (the streamed
tokens are prefilled again as prompt on a healthy pair). Colocated: one worker prefills and
decodes; its slot is held until the first token, like a prefill worker's.

Cleanup contract: every worker that may hold something for the request is recorded on it
before the call that could make it hold it is sent (`RouterRequest.prefill_id`, `decode_id`),
so `abort_everywhere` frees it whatever moment a cancel or failure comes at. Messages are the
typed worker protocol (pdserve_api/worker_protocol.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import ray

from pdserve_api import pdserve_pb2
from pdserve_api.sampling import SamplingParams
from pdserve_api.worker_protocol import (
    ColocatedRequest,
    FailedSide,
    PrefillRequest,
    PrefillResult,
    RefusalReason,
    Refused,
    Reservation,
    ReserveRequest,
    StreamItem,
    StreamKind,
)
from router.api import delta_response
from router.config import RouterConfig
from router.errors import RequestFailed, WorkerDied
from router.metrics import RouterMetrics
from router.pool import Actor, WorkerPool
from router.request import Phase, RetryKind, RouterRequest
from router.slo import PrefillPlacement, Rejected, RequestInfo, SLOScheduler

log = logging.getLogger(__name__)

Responses = AsyncIterator[pdserve_pb2.GenerateResponse]


class RequestFlow:
    def __init__(self, pool: WorkerPool, slo: SLOScheduler, metrics: RouterMetrics,
                 config: RouterConfig):
        self.pool, self.slo, self.metrics, self.config = pool, slo, metrics, config

    def serve(self, rr: RouterRequest) -> Responses:
        """Deltas then a final message, or RequestFailed / Rejected. The caller frees what
        the request holds (`abort_everywhere`) unless it finished."""
        return self._colocated(rr) if self.pool.colocated else self._disaggregated(rr)

    def abort_everywhere(self, rr: RouterRequest) -> None:
        """Client cancel/deadline or a failure: free whatever the request holds, both sides
        (a worker that never got it remembers the abort and refuses it if it comes)."""
        if rr.phase is not Phase.ABORTED:
            rr.advance(Phase.ABORTED)
        prefill = self.pool.prefill.get(rr.prefill_id or "")
        if prefill is not None:
            prefill.abort.remote(rr.worker_rid)
        if not self.pool.colocated:
            self._abort_decode(rr)

    # ---- P/D ---------------------------------------------------------------------------------

    async def _disaggregated(self, rr: RouterRequest) -> Responses:
        while True:
            rr.advance(Phase.PLACE)
            info = dataclasses.replace(rr.info, num_prompt_tokens=len(rr.prompt))
            sp = rr.parsed.sampling
            sampling = dataclasses.replace(sp, max_tokens=sp.max_tokens - len(rr.generated))
            placement = await self.slo.acquire(info, rr.hits)
            rr.prefill_id = placement.worker_id
            result: PrefillResult | None = None
            try:
                rr.advance(Phase.RESERVE)
                resv = await self._reserve_decode(rr, info, sampling)
                rr.advance(Phase.PREFILL)
                sent = time.monotonic()
                result = await self._prefill(rr, placement, sampling, resv)
            finally:
                # Served: the first token came back (the models learn from its timing).
                self.slo.release(placement, served=result is not None and result.error is None)
            if result.error is not None:
                self._abort_decode(rr)
                if result.retry_on is not None and self._may_retry(rr, RetryKind.TRANSFER):
                    log.warning("request %s: %s; retrying once, avoiding the failed %s side",
                                rr.request_id, result.error, result.retry_on.value)
                    if result.retry_on is FailedSide.DECODE and rr.decode_id is not None:
                        rr.excluded_decode.add(rr.decode_id)
                    rr.retry(RetryKind.TRANSFER)
                    continue
                raise RequestFailed(f"prefill on {placement.worker_id}: {result.error}")
            self._note_prefill(rr, result, sent)
            if result.finished:  # the first token ended it: free the decode reservation
                self._abort_decode(rr)
                yield self._final(rr, result.finish_reason or "stop", result.token_ids,
                                  result.text)
                return
            rr.advance(Phase.STREAM)
            yield delta_response(rr.request_id, result.token_ids, result.text)
            try:
                async for item in self._decode_stream(rr):
                    if item.kind is StreamKind.ERROR:
                        raise RequestFailed(f"decode on {rr.decode_id}: {item.error}")
                    response = self._relay(rr, item)
                    if response is not None:
                        yield response
                    if item.last:
                        return
            except WorkerDied as e:
                if not self._may_retry(rr, RetryKind.MIGRATION):
                    raise RequestFailed(str(e)) from None
                log.warning("request %s: %s; migrating it (%d tokens streamed) to a healthy "
                            "pair", rr.request_id, e, len(rr.generated))
                if rr.decode_id is not None:
                    rr.excluded_decode.add(rr.decode_id)
                rr.retry(RetryKind.MIGRATION)
                continue
            raise RequestFailed(f"decode stream from {rr.decode_id} ended without a finish")

    def _note_prefill(self, rr: RouterRequest, result: PrefillResult, sent: float) -> None:
        """The first token of an attempt is here: its timings and tokens."""
        rr.transport = result.transport
        timing = result.timing
        if not rr.generated:
            rr.cached_tokens = timing.num_cached_tokens if timing is not None else 0
            rr.timing.ttft_ms = 1e3 * (time.monotonic() - rr.arrival)
        queued_s = timing.queued_s if timing is not None else 0.0
        rr.timing.queued_ms += 1e3 * (sent - rr.segment_start + queued_s)
        rr.timing.prefill_ms += 1e3 * (timing.prefill_s if timing is not None else 0.0)
        rr.timing.transfer_ms += 1e3 * result.transfer_s
        rr.generated += result.token_ids

    def _may_retry(self, rr: RouterRequest, kind: RetryKind) -> bool:
        """Once per kind. A migration re-prefills streamed tokens as prompt, which keeps the
        output the same only when sampling does not depend on the earlier draws: no seed and
        no presence/frequency penalties (those count output tokens only)."""
        sp = rr.parsed.sampling
        if rr.retries.get(kind, 0) >= 1:
            return False
        if kind is RetryKind.MIGRATION and (sp.seed is not None or sp.presence_penalty
                                            or sp.frequency_penalty):
            return False
        self.metrics.retries.inc()
        return True

    async def _reserve_decode(self, rr: RouterRequest, info: RequestInfo,
                              sampling: SamplingParams) -> Reservation:
        wait_until = (info.deadline if info.ttft_slo_s else
                      info.arrival + self.config.decode_wait_s)
        request = ReserveRequest(rr.worker_rid, rr.prompt, sampling, self.config.kv_timeout_s,
                                 self.pool.prefill_tp.get(rr.prefill_id or "", 1))
        while True:
            candidates = self.slo.decode.rank(info.num_blocks, info.tpot_slo_s,
                                                rr.excluded_decode)
            if not candidates and not (set(self.pool.decode) - rr.excluded_decode):
                raise RequestFailed("no live decode worker")
            for wid in candidates:
                actor = self.pool.decode.get(wid)
                if actor is None:  # died since the ranking
                    continue
                # Count the reservation before awaiting it, so that concurrent requests see
                # this worker's load and spread out; its reply then gives the true figures.
                self.slo.decode.note_reserved(wid, info.num_blocks)
                rr.decode_id = wid  # before the call: a cancel during it must free it
                try:
                    reply: Reservation | Refused = await actor.reserve.remote(request)
                except ray.exceptions.RayActorError as e:
                    rr.decode_id = None
                    self.pool.worker_died("decode", wid, e)
                    continue
                if reply.load is not None:
                    self.slo.decode.update(wid, free_blocks=reply.load.free_blocks,
                                           num_running=reply.load.num_running)
                if isinstance(reply, Reservation):
                    return reply
                rr.decode_id = None
                if reply.reason is not RefusalReason.NO_KV_SPACE:
                    raise RequestFailed(f"decode worker {wid} refused: {reply.message}")
            if time.monotonic() >= wait_until:
                raise Rejected(f"no decode worker has room for {info.num_blocks} KV blocks")
            await asyncio.sleep(0.02)

    async def _prefill(self, rr: RouterRequest, placement: PrefillPlacement,
                       sampling: SamplingParams, resv: Reservation) -> PrefillResult:
        wid = placement.worker_id
        actor = self.pool.prefill.get(wid)
        if actor is None:
            return PrefillResult(rr.worker_rid, wid, error=f"prefill worker {wid} died",
                                 retry_on=FailedSide.PREFILL)
        request = PrefillRequest(rr.worker_rid, rr.prompt, sampling, resv.addresses,
                                 resv.block_ids)
        try:
            result: PrefillResult = await actor.prefill.remote(request)
            return result
        except ray.exceptions.RayActorError as e:
            # The prefill side failed: the decode worker is fine, a retry may use it again.
            self.pool.worker_died("prefill", wid, e)
            return PrefillResult(rr.worker_rid, wid, error=f"prefill worker {wid} died",
                                 retry_on=FailedSide.PREFILL)
        except asyncio.CancelledError:
            actor.abort.remote(rr.worker_rid)
            raise

    async def _decode_stream(self, rr: RouterRequest) -> AsyncIterator[StreamItem]:
        wid = rr.decode_id or ""
        actor = self.pool.decode.get(wid)
        if actor is None:
            raise WorkerDied(f"decode worker {wid} died before its stream began")
        try:
            async for item in _poll_items(actor, rr.worker_rid):
                yield item
        except ray.exceptions.RayActorError as e:
            self.pool.worker_died("decode", wid, e)
            raise WorkerDied(f"decode worker {wid} died mid-stream") from None

    def _abort_decode(self, rr: RouterRequest) -> None:
        actor = self.pool.decode.get(rr.decode_id or "")
        if actor is not None:
            actor.abort.remote(rr.worker_rid)

    # ---- colocated ---------------------------------------------------------------------------

    async def _colocated(self, rr: RouterRequest) -> Responses:
        rr.advance(Phase.PLACE)
        placement = await self.slo.acquire(rr.info, rr.hits)
        wid = rr.prefill_id = rr.decode_id = placement.worker_id
        rr.advance(Phase.PREFILL)
        sent = time.monotonic()
        released = False
        try:
            actor = self.pool.prefill.get(wid)
            if actor is None:
                raise RequestFailed(f"worker {wid} died before the request reached it")
            request = ColocatedRequest(rr.worker_rid, rr.token_ids, rr.parsed.sampling)
            refused: Refused | None = await actor.generate.remote(request)
            if refused is not None:
                raise RequestFailed(f"worker {wid}: {refused.message}")
            async for item in _poll_items(actor, rr.worker_rid):
                if item.kind is StreamKind.ERROR:
                    raise RequestFailed(f"worker {wid}: {item.error}")
                if item.timing is not None:  # the first token: the prefill is over
                    rr.cached_tokens = item.timing.num_cached_tokens
                    rr.timing.queued_ms = 1e3 * (sent - rr.arrival + item.timing.queued_s)
                    rr.timing.prefill_ms = 1e3 * item.timing.prefill_s
                    rr.timing.ttft_ms = 1e3 * (time.monotonic() - rr.arrival)
                    self.slo.release(placement, served=True)
                    released = True
                    rr.advance(Phase.STREAM)
                response = self._relay(rr, item)
                if response is not None:
                    yield response
                if item.last:
                    return
        except ray.exceptions.RayActorError as e:
            self.pool.worker_died("prefill", wid, e)
            raise RequestFailed(f"worker {wid} died mid-request") from None
        finally:
            if not released:
                self.slo.release(placement)
        raise RequestFailed(f"stream from {wid} ended without a finish")

    # ---- the client's messages ---------------------------------------------------------------

    def _relay(self, rr: RouterRequest, item: StreamItem
               ) -> pdserve_pb2.GenerateResponse | None:
        """A worker's stream item as the client's next message (None: nothing to say)."""
        rr.generated += item.token_ids
        if item.kind is StreamKind.FINISHED:
            rr.timing.decode_ms = 1e3 * item.decode_s
            return self._final(rr, item.finish_reason or "abort", item.token_ids, item.text)
        if item.token_ids or item.text:
            return delta_response(rr.request_id, item.token_ids, item.text)
        return None

    def _final(self, rr: RouterRequest, reason: str, token_ids: list[int], text: str
               ) -> pdserve_pb2.GenerateResponse:
        response = rr.final(reason, token_ids, text)
        self.metrics.observe_final(response.final, rr.transport, rr.parsed.ttft_slo_s,
                                   rr.parsed.tpot_slo_s)
        return response


async def _poll_items(actor: Actor, worker_rid: str) -> AsyncIterator[StreamItem]:
    """A request's items from its worker (`next_items` long polls) until the last."""
    while True:
        items: list[StreamItem] = await actor.next_items.remote(worker_rid)
        for item in items:
            yield item
            if item.last:
                return
