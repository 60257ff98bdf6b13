"""Which decode worker takes a request's KV (DESIGN: request path step 3, the decode side).

Pure bookkeeping on the router's event loop, like router/slo.py beside it.

Contract:
- `rank(num_blocks, tpot_slo_s, exclude)` orders the decode workers that have room for the
  prompt's blocks (+1 spare for the first decoded tokens): those whose predicted step time at
  one more sequence meets the TPOT SLO first, then by free blocks (most first), then by batch
  size. A worker not heard from yet counts as having plenty of room.
- The router keeps it fresh with `update` (each worker's stats, and its step time, which a
  `TimingModel` per worker learns against batch size) and `note_reserved` (what it reserved
  itself between two stats reports).
- A removed worker is dropped at once; a late report for it is ignored, so it cannot come
  back that way. Re-adding it starts it with a fresh model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from router.timing_models import TimingModel


@dataclass(slots=True)
class _DecodeWorker:
    worker_id: str
    step: TimingModel  # step seconds against the batch size
    free_blocks: int | None = None  # None until the first update: treated as plenty
    num_running: int = 0


class DecodeRanking:
    def __init__(self, workers: Sequence[str], prior: tuple[float, float], decay: float):
        self._prior, self._decay = prior, decay
        self._workers: dict[str, _DecodeWorker] = {}
        for w in workers:
            self.add_worker(w)

    def add_worker(self, worker_id: str) -> None:
        if worker_id not in self._workers:
            a, b = self._prior
            self._workers[worker_id] = _DecodeWorker(worker_id, TimingModel(a, b, self._decay))

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def update(self, worker_id: str, *, free_blocks: int, num_running: int,
               step_s: float | None = None) -> None:
        """Latest stats of a decode worker (unknown ones are ignored, see the module doc)."""
        w = self._workers.get(worker_id)
        if w is None:
            return
        w.free_blocks, w.num_running = free_blocks, num_running
        if step_s is not None:
            w.step.observe(num_running, step_s)

    def note_reserved(self, worker_id: str, num_blocks: int) -> None:
        w = self._workers.get(worker_id)
        if w is None:
            return
        if w.free_blocks is not None:
            w.free_blocks = max(0, w.free_blocks - num_blocks)
        w.num_running += 1

    def rank(self, num_blocks: int, tpot_slo_s: float | None,
             exclude: Collection[str] = ()) -> list[str]:
        need = num_blocks + 1  # one spare block for the first decoded tokens

        def free(w: _DecodeWorker) -> float:
            return math.inf if w.free_blocks is None else w.free_blocks

        def meets(w: _DecodeWorker) -> bool:
            return tpot_slo_s is None or w.step.predict(w.num_running + 1) <= tpot_slo_s

        fits = [w for wid, w in self._workers.items() if wid not in exclude and free(w) >= need]
        fits.sort(key=lambda w: (not meets(w), -free(w), w.num_running))  # stable: add order
        return [w.worker_id for w in fits]

    def most_observed_model(self) -> TimingModel | None:
        """The step model that has seen the most steps (None: no worker has seen one)."""
        best = max(self._workers.values(), key=lambda w: w.step.n, default=None)
        return best.step if best is not None and best.step.n else None

    def snapshot(self) -> dict[str, Any]:
        return {wid: {"free_blocks": w.free_blocks, "num_running": w.num_running,
                      "step_model": w.step.as_dict()}
                for wid, w in self._workers.items()}
