"""The prefill side of KV transfer, for one TP rank: a request's KV leaves this rank's pool for
the decode worker's reserved blocks. Rank 0 (prefill_worker/worker.py) and the follower ranks
(worker_host/tp_follower.py) use it the same way:

    kv = PrefillConnector(sender, num_kv_heads, tp_size, tp_rank, lease_s)
    kv.plan(request_id, dst_addresses, dst_block_ids)   # when the request arrives
    on_layer = kv.begin_step([(request_id, src_block_ids), ...])  # engine thread, before the
    #   forward pass of the step where those prompts complete; on_layer(i) after layer i
    kv.finish(request_id, control, on_done)             # once the step is over; on_done(result)
    kv.drop(request_id, reason)                         # gave up (aborted, finished at prefill)

`plan` works out the routes: without tensor parallelism one session to the decode worker's
receiver with every head; with it, the KV heads this rank holds go straight to the decode ranks
that own them (`plan_head_routes`), each route a session carrying a `HeadSlice`. The first
error wins: the other sessions are aborted, so the decode side fails the whole transfer once.

Threads. Nothing here touches the network on the engine thread. `begin_step` and `on_layer`
only queue work for the connector's shipping thread, which opens the sessions, waits for each
layer's kernels (on CUDA: an event recorded after the layer, synchronised by that thread
alone, not the device) and posts the layer to the transport. `finish` queues the completion
behind the request's layers; the shipping thread hands it to a finisher thread, which waits
for the receiver's acknowledgement and calls `on_done(ShipResult)` there. So a prefill step
never waits for an earlier request's transfer tail. The owner keeps the request's blocks until
`on_done` (the sender reads them until then) and releases them on its engine thread.

Lease: from `plan` until the request is reported, a keepalive thread renews the reservation
at every receiver of the request at once and then every `lease_s / 3` (each layer sent renews
it as well), so
a prefill that queues or computes for longer than the lease keeps it; a dead prefill stops
renewing and the decode side frees the blocks one lease later.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kv_transfer.control import KVControl, TransferError
from kv_transfer.header import HeadSlice, KVLayoutMismatch
from kv_transfer.tp_plan import plan_head_routes, routes_by_src
from kv_transfer.transport import KVSender, SendSession

log = logging.getLogger(__name__)

TRANSFER_ERRORS = (TransferError, KVLayoutMismatch, OSError, ValueError)
FINISHER_THREADS = 4


@dataclass(frozen=True)
class KVRoute:
    address: str  # a decode rank's KV receiver
    heads: HeadSlice | None = None  # None: every head, both pools unsharded alike


def routes_for_rank(num_kv_heads: int, src_tp: int, src_rank: int,
                    dst_addresses: Sequence[str]) -> list[KVRoute]:
    """The sessions prefill rank `src_rank` opens for one request (dst_addresses: the decode
    worker's receivers, by rank: their count is its TP size)."""
    dst_tp = len(dst_addresses)
    if src_tp == dst_tp == 1:
        return [KVRoute(dst_addresses[0])]
    plan = plan_head_routes(num_kv_heads, src_tp, dst_tp)
    return [KVRoute(dst_addresses[r.dst_rank], r.heads)
            for r in routes_by_src(plan, src_tp)[src_rank]]


@dataclass(frozen=True)
class ShipResult:
    """One request's transfer from this rank, reported once to `finish`'s on_done."""

    request_id: str
    error: str | None  # None: every session's bytes landed and the receivers confirmed
    num_bytes: int = 0
    transfer_s: float = 0.0  # from `finish` to the receivers' confirmation


@dataclass(eq=False)
class _Shipment:
    """Shipping-thread state of one request (its sessions are touched there and by the one
    finisher that completes them, never both at once)."""

    request_id: str
    routes: list[KVRoute]
    dst_block_ids: list[int]
    opened: bool = False  # begin_step took it (engine thread)
    finishing: bool = False  # finish was called: no keepalives, no drop of the sessions
    sessions: list[SendSession] = field(default_factory=list)
    error: str | None = None
    num_bytes: int = 0

    def fail(self, error: str) -> None:
        """Abort the sessions still open (the receiver fails the transfer once)."""
        if self.error is None:
            self.error = error
        sessions, self.sessions = self.sessions, []
        for session in sessions:
            try:
                session.abort(error)
            except Exception:  # noqa: BLE001 - the peer may be gone: the error is what matters
                log.debug("abort of %s failed", self.request_id, exc_info=True)


class PrefillConnector:
    def __init__(self, sender: KVSender, num_kv_heads: int, tp_size: int = 1,
                 tp_rank: int = 0, lease_s: float = 30.0, layer_delay_s: float = 0.0,
                 name: str = "kv"):
        self.sender = sender
        self.num_kv_heads, self.tp_size, self.tp_rank = num_kv_heads, tp_size, tp_rank
        self.lease_s = lease_s
        self.layer_delay_s = layer_delay_s  # fault injection (tests): slow every layer
        self.name = name
        self._cuda = sender.pool.device.type == "cuda"
        self._jobs: dict[str, _Shipment] = {}
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._renew_now = threading.Event()
        self._finishers = ThreadPoolExecutor(FINISHER_THREADS,
                                             thread_name_prefix=f"{name}-finish")
        self._shipper = threading.Thread(target=self._ship_loop, name=f"{name}-ship",
                                         daemon=True)
        self._keeper = threading.Thread(target=self._keepalive_loop, name=f"{name}-lease",
                                        daemon=True)
        self._shipper.start()
        self._keeper.start()

    # ---- any thread ----------------------------------------------------------------------

    def plan(self, request_id: str, dst_addresses: Sequence[str],
             dst_block_ids: Sequence[int]) -> None:
        """Where this rank's part of the request goes; from now on its reservation is kept
        alive. Raises ValueError for a plan that cannot be (TP sizes, a request id in use)."""
        routes = routes_for_rank(self.num_kv_heads, self.tp_size, self.tp_rank, dst_addresses)
        job = _Shipment(request_id, routes, list(dst_block_ids))
        with self._lock:
            if request_id in self._jobs:
                raise ValueError(f"request {request_id!r} is already planned here")
            self._jobs[request_id] = job
        self._renew_now.set()  # the first renewal at once: the reservation's clock runs

    def drop(self, request_id: str, reason: str) -> None:
        """Give up on the request: its open sessions are aborted (the decode side frees the
        reservation at once). A transfer already finishing completes and reports as usual."""
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None or job.finishing:
                return
            del self._jobs[request_id]
        self._work.put(lambda: job.fail(reason))

    def planned(self) -> list[str]:
        """The requests planned and not yet reported (owners' integrity checks)."""
        with self._lock:
            return sorted(self._jobs)

    # ---- engine thread -------------------------------------------------------------------

    def begin_step(self, prompts: Sequence[tuple[str, Sequence[int]]]
                   ) -> Callable[[int], None] | None:
        """Prompts whose last chunk runs in this step, with their source block ids: their
        sessions open now (on the shipping thread). Returns the forward pass's per-layer
        callback, or None if none of them is planned here."""
        jobs = []
        with self._lock:
            for rid, src in prompts:
                job = self._jobs.get(rid)
                if job is not None and not job.opened:
                    job.opened = True
                    jobs.append((job, list(src)))
        if not jobs:
            return None
        self._work.put(lambda: self._open_all(jobs))
        shipping = [job for job, _ in jobs]

        def on_layer(layer: int) -> None:
            # On CUDA the layer's kernels may still run: the shipping thread waits for them.
            done = torch.cuda.Event() if self._cuda else None
            if done is not None:
                done.record()
            self._work.put(lambda: self._send_layer(shipping, layer, done))
        return on_layer

    def finish(self, request_id: str, control: KVControl,
               on_done: Callable[[ShipResult], None]) -> None:
        """Complete the request's transfer with its control message, after the layers already
        queued. `on_done` runs once, on a finisher thread (or here if the request is not
        planned), when the receivers have every byte or the transfer failed."""
        with self._lock:
            job = self._jobs.get(request_id)
            if job is not None:
                job.finishing = True
        if job is None:
            on_done(ShipResult(request_id, f"no KV transfer planned for {request_id}"))
            return
        queued = time.monotonic()

        def hand_over() -> None:  # behind the request's layers, on the shipping thread
            self._finishers.submit(self._complete, job, control, queued, on_done)
        self._work.put(hand_over)

    def close(self) -> None:
        self._stop.set()
        self._renew_now.set()
        self._work.put(None)
        self._shipper.join(5.0)
        self._finishers.shutdown(wait=False, cancel_futures=True)

    # ---- shipping thread -----------------------------------------------------------------

    def _ship_loop(self) -> None:
        while (work := self._work.get()) is not None:
            try:
                work()
            except Exception:  # noqa: BLE001 - a bug in one request must not stop shipping
                log.exception("%s: KV shipping step failed", self.name)

    def _open_all(self, jobs: list[tuple[_Shipment, list[int]]]) -> None:
        for job, src in jobs:
            self._open(job, src)

    def _open(self, job: _Shipment, src_block_ids: list[int]) -> None:
        if job.error is not None:  # dropped before it opened
            return
        if len(src_block_ids) != len(job.dst_block_ids):
            job.error = (f"decode reserved {len(job.dst_block_ids)} blocks for a prompt of "
                         f"{len(src_block_ids)} blocks")
            return
        for route in job.routes:
            try:
                job.sessions.append(self.sender.open(
                    route.address, job.request_id, src_block_ids, job.dst_block_ids,
                    timeout_s=self.lease_s, heads=route.heads))
            except TRANSFER_ERRORS as e:
                job.fail(f"opening the KV transfer to {route.address}: {e}")
                return

    def _send_layer(self, jobs: list[_Shipment], layer: int,
                    done: torch.cuda.Event | None) -> None:
        if done is not None:
            done.synchronize()
        if self.layer_delay_s:
            time.sleep(self.layer_delay_s)
        for job in jobs:
            for session in job.sessions:
                if job.error is not None:
                    break
                try:
                    session.send_layer(layer)
                except Exception as e:  # noqa: BLE001 - any transport error fails this request
                    log.warning("%s: %s: sending layer %d failed: %s", self.name,
                                job.request_id, layer, e)
                    job.fail(f"sending layer {layer}: {e}")

    # ---- finisher threads ----------------------------------------------------------------

    def _complete(self, job: _Shipment, control: KVControl, queued: float,
                  on_done: Callable[[ShipResult], None]) -> None:
        if job.error is None and not job.sessions:
            job.error = "the KV transfer was never opened"
        for session in job.sessions:
            if job.error is not None:
                break
            try:
                result = session.finish(control)
            except TRANSFER_ERRORS as e:
                job.fail(f"KV transfer failed: {e}")
                break
            job.num_bytes += result.num_bytes
            if not result.ok:
                job.fail(f"KV transfer failed: {result.error}")
        if job.error is not None:
            job.fail(job.error)  # abort what is left open
        job.sessions = []
        with self._lock:
            self._jobs.pop(job.request_id, None)
        try:
            on_done(ShipResult(job.request_id, job.error, job.num_bytes,
                               time.monotonic() - queued))
        except Exception:  # noqa: BLE001 - the owner's bug must not kill a finisher
            log.exception("%s: on_done for %s raised", self.name, job.request_id)

    # ---- keepalive thread ----------------------------------------------------------------

    def _keepalive_loop(self) -> None:
        while not self._stop.is_set():
            self._renew_now.wait(self.lease_s / 3)
            self._renew_now.clear()
            by_address: dict[str, list[str]] = {}
            with self._lock:
                for job in self._jobs.values():  # open sessions renew by their layers too
                    for route in job.routes:
                        by_address.setdefault(route.address, []).append(job.request_id)
            for address, ids in by_address.items():
                try:
                    self.sender.keepalive(address, ids)
                except TRANSFER_ERRORS as e:
                    log.warning("%s: keepalive to %s failed: %s", self.name, address, e)
