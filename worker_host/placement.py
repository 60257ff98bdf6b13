"""Isolated workers on CPU: each worker process (each TP rank) owns whole cores of its own.

The launcher splits the cores it may use (`os.sched_getaffinity(0)`) into disjoint sets, one
per worker rank (`assign_cores`), before any actor starts, and hands each rank its set in
`WorkerSpec.cores`; the rank's first act is `pin_process(cores)`: every thread of the process
is confined to those cores, and torch's intra-op pool gets exactly that many threads. So a
prefill on one worker's cores cannot preempt another worker's decode step, and no worker runs
more compute threads than it has cores (a thread pool larger than its core set makes the
threads wait on each other at every parallel region).

What is *not* placed: the router, Redis and Ray's own processes (GCS, raylet, agents) float
on every core, the workers' cores included; the kernel schedules them like any process.

Contract: `assign_cores` raises `InsufficientCoresError` when the workers ask for more cores
than there are; cores are never shared between two sets. `pin_process` raises it too when the
process cannot use the cores it was given (e.g. a worker started on another host).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)


class InsufficientCoresError(RuntimeError):
    """More cores asked for than the machine (or this process's CPU set) has."""


def assign_cores(ranks: Sequence[str], cores_per_rank: int,
                 available: Iterable[int] | None = None) -> dict[str, tuple[int, ...]]:
    """Disjoint core sets, `cores_per_rank` each, for the named ranks, in order, from
    `available` (default: the cores this process may run on)."""
    if cores_per_rank < 1:
        raise ValueError(f"cores per worker must be >= 1, got {cores_per_rank}")
    cores = sorted(set(os.sched_getaffinity(0) if available is None else available))
    need = len(ranks) * cores_per_rank
    if need > len(cores):
        raise InsufficientCoresError(
            f"{len(ranks)} worker processes x {cores_per_rank} cores = {need} cores, but this "
            f"machine has {len(cores)} usable ({_span(cores)}): lower --cpus-per-worker or the "
            f"number of workers / TP ranks")
    return {rank: tuple(cores[i * cores_per_rank:(i + 1) * cores_per_rank])
            for i, rank in enumerate(ranks)}


def pin_process(cores: Sequence[int]) -> None:
    """Confine every thread of this process to `cores` and size torch's intra-op pool to
    them. Threads started later inherit the mask from the thread that starts them."""
    import torch

    wanted = set(cores)
    allowed = os.sched_getaffinity(0)  # before pinning: what the process was started with
    if not wanted <= allowed:
        raise InsufficientCoresError(
            f"assigned cores {_span(sorted(wanted))} but this process may use only "
            f"{_span(sorted(allowed))} (--cpus-per-worker places workers on the launcher's "
            f"host)")
    # sched_setaffinity(0) sets the calling thread only; Ray's threads already exist.
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, wanted)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    torch.set_num_threads(len(wanted))
    # Inter-op threads serve only torch.jit forks, which the engine does not use; their pool
    # size can be set once, before first use, so it is left as it is.
    log.info("pinned to cores %s, %d torch threads", _span(sorted(wanted)), len(wanted))


def observed(_engine: object = None) -> dict[str, list[int] | int]:
    """What placement is in effect, as seen from the calling thread (the engine thread when
    run through a worker's `call`): its cores, the union over all threads of the process,
    and torch's intra-op thread count."""
    import torch

    return {"cores": sorted(os.sched_getaffinity(0)), "process_cores": sorted(_all_cores()),
            "threads": torch.get_num_threads()}


def _thread_ids() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


def _all_cores() -> set[int]:
    cores: set[int] = set()
    for tid in _thread_ids():
        try:
            cores |= os.sched_getaffinity(tid)
        except ProcessLookupError:
            pass
    return cores


def _span(cores: Sequence[int]) -> str:
    return ",".join(map(str, cores)) or "none"
