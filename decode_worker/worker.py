"""Decode worker: a Ray actor running the engine in decode mode (DESIGN: request path 4 and 6).

`reserve()` allocates KV blocks for a prompt and tells this rank's `DecodeConnector`
(kv_transfer/decode_connector.py) to expect them; the router hands the receivers' addresses
and the block ids to a prefill worker, which writes straight into them. The reservation is a
lease the prefill side renews while it makes progress (`--kv-timeout-s`). When the transfer
completes the request joins the continuous batch (`commit_kv`); when it fails or the prefill
side goes silent for a lease the reservation is freed (`cancel_reservation`). Under TP every
rank receives its own heads and rank 0 commits once the connector has merged their parts.
`next_items()` (a long poll, worker_host/actor.py) returns the request's token deltas; the
last item carries the finish reason and the decode time (KV arrival to finish, from the
engine's stamps). An `abort` at any moment (before, during or after the reservation) frees
whatever the request holds here. Messages: pdserve_api/worker_protocol.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future

import ray

from engine.config import EngineMode
from engine.engine import LLMEngine, NoKVSpaceError, RequestOutput
from kv_transfer import KVPool, TransferResult, make_receiver
from kv_transfer.decode_connector import DecodeConnector, PartReport
from pdserve_api.worker_protocol import (
    ExpectKV,
    FollowerReady,
    RankTransfer,
    RefusalReason,
    Refused,
    Reservation,
    ReserveRequest,
    StreamItem,
    StreamKind,
)
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
        self.transport: str = type(receiver).__name__.removesuffix("Receiver").lower()
        log.info("%s: KV receiver %s (%s), %d KV blocks", self.worker_id, self.kv.address,
                 self.transport, self.pool.num_blocks)
        # TP ranks 1..: each receives its own heads; rank 0 commits once all have landed.
        self.followers = list(spec.tp_followers)
        self.addresses = [self.kv.address]
        if self.followers:  # constructed before this rank: their receivers are up
            ready: list[FollowerReady] = ray.get([f.ready.remote() for f in self.followers],
                                                 timeout=600)
            self.addresses += [info.kv_address for info in ready if info.kv_address]
        self._start_loop()

    # ---- actor methods ---------------------------------------------------------------------

    def _kv_addresses(self) -> list[str]:
        return list(self.addresses)

    async def reserve(self, req: ReserveRequest) -> Reservation | Refused:
        """Reserve blocks for the prompt's KV, to come from a prefill worker of TP size
        req.src_tp; or Refused (NO_KV_SPACE: try elsewhere or later), holding nothing."""
        request_id, src_tp = req.request_id, req.src_tp
        self._open_stream(request_id)
        lease = req.kv_timeout_s or self.spec.kv_timeout_s
        on_done = self._on_rank0_transfer if self.followers else self._on_transfer

        def reserve(e: LLMEngine) -> list[int]:
            if self.spec.fault_reserve_delay_s:
                time.sleep(self.spec.fault_reserve_delay_s)
            self._refuse_if_aborted(request_id)
            senders = self.kv.senders(src_tp)
            rid, ids = e.reserve_kv(req.prompt_token_ids, len(req.prompt_token_ids),
                                    req.sampling, request_id)
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
            return Refused(RefusalReason.NO_KV_SPACE, str(e), self._load())
        except (ValueError, RuntimeError) as e:  # e.g. a request id in use, receiver closed
            log.warning("%s: reserve %s failed: %s", self.worker_id, request_id, e)
            self.streams.pop(request_id, None)
            return Refused(RefusalReason.ERROR, f"{type(e).__name__}: {e}", self._load())
        if self.followers:
            try:
                await asyncio.gather(*(f.expect_kv.remote(ExpectKV(request_id, ids, n, lease))
                                       for f, n in zip(self.followers,
                                                       self.kv.senders(src_tp)[1:])))
            except Exception as e:  # noqa: BLE001 - a dead rank: nothing may stay reserved
                await self.abort(request_id)
                self.streams.pop(request_id, None)
                return Refused(RefusalReason.ERROR, f"a TP rank could not expect the KV: {e}",
                               self._load())
        return Reservation(addresses=list(self.addresses), block_ids=ids, load=self._load())

    async def abort(self, request_id: str) -> bool:
        """Client cancel / router failure: stop the request wherever it is and free its
        blocks, within one engine step. On the engine thread, so that it runs after a
        `reserve` of the same id already submitted there (a cancel during the reservation);
        one that comes first leaves a mark that makes the reservation refuse."""
        def abort(e: LLMEngine) -> bool:
            if self.kv.cancel(request_id):  # waiting for KV: _on_transfer frees it
                return True
            if e.abort(request_id):
                return True
            try:  # reserved, transfer reported done but not yet committed
                e.cancel_reservation(request_id)
                return True
            except KeyError:
                self._note_aborted_early(request_id)
                return False

        found = await self.call(abort)
        self._end_stream(request_id)
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
            replies: list[RankTransfer | BaseException] = await asyncio.gather(
                *(f.kv_result.remote(rid) for f in self.followers), return_exceptions=True)
            parts = [r if isinstance(r, BaseException) else
                     PartReport(r.error is None, r.num_bytes, r.error) for r in replies]
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
                e.commit_kv(rid, control.num_computed_tokens, control.output_token_ids)

            fut = self.loop.submit(commit)
        else:
            fut = self.loop.submit(lambda e: e.cancel_reservation(rid))
            self._push(rid, StreamItem(StreamKind.ERROR,
                                       error=f"KV transfer failed: {result.error}"))
        def settled(f: Future[None]) -> None:
            # An abort may have beaten us to the reservation: then there is nothing to do.
            if f.exception() is not None:
                log.debug("%s: %s after transfer: %s", self.worker_id, rid, f.exception())
        fut.add_done_callback(settled)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._push(out.request_id, self._item(out))
