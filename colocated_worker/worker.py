"""Colocated worker: the engine's colocated mode (prefill and decode in one engine) as a Ray
actor behind the same router. It is the baseline disaggregation is measured against
(`bench/pd_vs_colocated.py`), and a valid deployment on its own (`pdserve up --colocated N`).
"""

from __future__ import annotations

import logging

from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from pdserve_api.worker_protocol import ColocatedRequest, RefusalReason, Refused
from worker_host.actor import WorkerBase, prefill_timing
from worker_host.spec import WorkerSpec

log = logging.getLogger(__name__)


class ColocatedWorker(WorkerBase):
    mode = EngineMode.COLOCATED
    publishes_blocks = True

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self._start_loop()

    async def generate(self, req: ColocatedRequest) -> Refused | None:
        """Start the request: None, or Refused. Its token deltas come from `next_items`: the
        one with the first token carries the prefill's timing, the last is FINISHED."""
        self._open_stream(req.request_id)

        def start(e: LLMEngine) -> None:
            self._refuse_if_aborted(req.request_id)
            e.add_request(req.prompt_token_ids, req.sampling, req.request_id)

        try:
            await self.call(start)
        except ValueError as e:  # the router validated: a bug or a request id reused
            log.warning("%s: request %s refused: %s", self.worker_id, req.request_id, e)
            self.streams.pop(req.request_id, None)
            return Refused(RefusalReason.ERROR, f"{type(e).__name__}: {e}")
        return None

    async def abort(self, request_id: str) -> bool:
        def abort(e: LLMEngine) -> bool:
            if e.abort(request_id):
                return True
            self._note_aborted_early(request_id)
            return False

        found = await self.call(abort)
        self._end_stream(request_id)
        return found

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            first = out.num_output_tokens == 1 and bool(out.new_token_ids)
            self._push(out.request_id,
                       self._item(out, prefill_timing(out) if first else None))
