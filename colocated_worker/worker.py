"""Colocated worker: the engine's colocated mode (prefill and decode in one engine) as a Ray
actor behind the same router. It is the baseline disaggregation is measured against
(`bench/pd_vs_colocated.py`), and a valid deployment on its own (`pdserve up --colocated N`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from engine.config import EngineMode
from engine.engine import LLMEngine, RequestOutput
from engine.scheduler import SchedulerOutput
from pdserve_api.sampling import SamplingParams
from worker_host.actor import WorkerBase
from worker_host.spec import WorkerSpec

log = logging.getLogger(__name__)


class ColocatedWorker(WorkerBase):
    mode = EngineMode.COLOCATED
    publishes_blocks = True

    def __init__(self, spec: WorkerSpec):
        super().__init__(spec)
        self.timing: dict[str, list[float | None]] = {}  # engine thread: received, scheduled
        self.engine.kv_layer_hook = self._note_scheduled
        self._start_loop()

    def _ready_extra(self) -> dict[str, Any]:
        return {"transport": "none"}

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling: dict[str, Any]) -> dict[str, Any] | None:
        """Start the request: None, or an item with `error` if refused. Its token deltas come
        from `next_items`: the first carries queued_s/prefill_s measured here, the last has
        `finished`."""
        self._open_stream(request_id)

        def start(e: LLMEngine) -> None:
            e.add_request(prompt_token_ids, SamplingParams(**sampling), request_id)
            self.timing[request_id] = [time.monotonic(), None]

        try:
            await self.call(start)
        except ValueError as e:  # the router validated: a bug or a request id reused
            log.warning("%s: request %s refused: %s", self.worker_id, request_id, e)
            self.streams.pop(request_id, None)
            return {"finished": True, "error": f"{type(e).__name__}: {e}"}
        return None

    async def abort(self, request_id: str) -> bool:
        found = await self.call(lambda e: e.abort(request_id))
        self._push(request_id, {"finished": True, "finish_reason": "abort", "token_ids": [],
                                "text": ""})
        return found

    def _note_scheduled(self, sched: SchedulerOutput) -> None:
        now = time.monotonic()
        for req in sched.requests:
            t = self.timing.get(req.request_id)
            if t is not None and t[1] is None:
                t[1] = now

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            item = self._item(out)
            t = self.timing.get(out.request_id)
            if t is not None and len(t) == 2 and out.new_token_ids:  # the first token
                scheduled = t[1] if t[1] is not None else now
                item.update(queued_s=scheduled - t[0], prefill_s=now - scheduled)
                t.append(now)  # first token time, for decode_s
            if out.finished:
                t = self.timing.pop(out.request_id, None)
                if t is not None and len(t) > 2:
                    item["decode_s"] = now - t[2]
            self._push(out.request_id, item)
