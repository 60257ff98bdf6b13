"""Runs an LLMEngine on a thread of its own, for workers that serve requests concurrently.

The engine is not thread-safe. Everything that touches it goes through `submit`: the call runs
on the engine thread between two steps, in submission order, and its result comes back as a
concurrent Future (`asyncio.wrap_future` it from an event loop). Step outputs are handed to
`on_outputs` on the engine thread, so that callback may call engine methods directly.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from engine.engine import LLMEngine, RequestOutput
from engine.native_heap import TRIM_INTERVAL_S, HeapTrimmer
from engine.tp_engine import TPError

log = logging.getLogger(__name__)
T = TypeVar("T")
TP_FAILED_EXIT_CODE = 70  # a TP rank whose group failed (distinct in Ray's death cause)


@dataclass
class StepStats:
    """The last step, and a smoothed step time, for the router's timing models."""

    steps: int = 0
    last_step_s: float = 0.0
    last_batch: int = 0
    ewma_step_s: float = 0.0

    def record(self, seconds: float, batch: int) -> None:
        self.steps += 1
        self.last_step_s, self.last_batch = seconds, batch
        self.ewma_step_s = seconds if self.steps == 1 else 0.8 * self.ewma_step_s + 0.2 * seconds


class EngineLoop:
    def __init__(self, engine: LLMEngine,
                 on_outputs: Callable[[list[RequestOutput]], None],
                 after_step: Callable[[], None] | None = None, name: str = "engine",
                 heap_trim_interval_s: float = TRIM_INTERVAL_S):
        self.engine = engine
        self.stats = StepStats()
        self.heap_trimmer = HeapTrimmer(heap_trim_interval_s)
        self._on_outputs = on_outputs
        self._after_step = after_step
        self._calls: queue.SimpleQueue[tuple[Callable[[LLMEngine], object], Future]] = (
            queue.SimpleQueue())
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self.name = name
        self._thread = threading.Thread(target=self._run, name=f"{name}-loop", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run fn(engine) on the engine thread before the next step."""
        fut: Future[T] = Future()
        if self._stopped.is_set():
            fut.set_exception(RuntimeError("the engine loop has stopped"))
            return fut
        self._calls.put((fn, fut))
        self._wake.set()
        return fut

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - delivered to the submitter, not fatal here
                fut.set_exception(e)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._run_calls()
            self.heap_trimmer.maybe_trim()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                start = time.perf_counter()
                batch = len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)
                outputs = self.engine.step()
                elapsed = time.perf_counter() - start
                self.heap_trimmer.worked()
                if outputs or elapsed > 1e-3:
                    self.stats.record(elapsed, batch)
                if outputs:
                    self._on_outputs(outputs)
                elif elapsed < 1e-3:
                    # Nothing could be scheduled (e.g. waiting for free blocks): don't spin.
                    self._wake.wait(0.005)
                    self._wake.clear()
                if self._after_step is not None:
                    self._after_step()
            except TPError:
                # The TP group is gone (a rank died or timed out): this process can never step
                # again. Exit so that the owner sees a dead worker and replaces the group.
                log.critical("%s: tensor-parallel group failed; exiting", self.name,
                             exc_info=True)
                os._exit(TP_FAILED_EXIT_CODE)
            except Exception:
                # A failure of the step itself (the forward pass), which no single request
                # owns (one request's sampling failure ends only that request, inside
                # LLMEngine.step); it would fail again with the same batch: abort what was in
                # it (owners see finish_reason "abort") and keep the worker serving.
                log.exception("engine step failed; aborting its requests")
                sched = self.engine.scheduler
                for req in list(sched.running) + list(sched.waiting):
                    self.engine.abort(req.request_id)
        self._run_calls()
