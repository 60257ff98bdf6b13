"""The follower ranks of a tensor-parallel pool worker, as Ray actors.

A pool worker with tp_size N is N actors in one placement group: rank 0 is the ordinary
PrefillWorker / DecodeWorker / ColocatedWorker (its engine's runner broadcasts every step), and
ranks 1..N-1 are TPFollowerWorker actors that hold their shards and run what rank 0 sends
(engine/tp_engine.py). All N join one torch.distributed group at `WorkerSpec.tp_init_method`,
picked by the launcher with `rendezvous_address` on rank 0's node.

KV transfer is rank to rank, through the same connectors rank 0 uses: a prefill follower's
`PrefillConnector` ships the KV heads it holds to the decode ranks that own them (`plan_send`,
then its step's layer hook; the completion runs off the stepping thread), a decode follower's
`DecodeConnector` receives its own heads (`expect_kv`, `kv_result`); rank 0 of each side
drives them by Ray calls per request (prefill_worker/worker.py, decode_worker/worker.py).

A group is replaced as a whole, never repaired: a rank whose group fails exits (the peers'
collectives fail at once, so they exit too), the router sees rank 0 or a follower dead, kills
the rest and asks the launcher for a fresh group (launcher/cluster.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from engine.config import EngineMode
from engine.model_runner import StepInputs
from engine.tp_engine import TPError, TPFollower
from kv_transfer import KVControl, KVPool, make_receiver, make_sender
from kv_transfer.decode_connector import DecodeConnector
from kv_transfer.prefill_connector import PrefillConnector, ShipResult
from pdserve_api.worker_protocol import (
    ExpectKV,
    FollowerAlive,
    FollowerReady,
    RankTransfer,
    SendPlan,
)
from worker_host.engine_loop import TP_FAILED_EXIT_CODE
from worker_host.placement import pin_process
from worker_host.spec import WorkerSpec, node_host

log = logging.getLogger(__name__)


def rendezvous_address() -> str:
    """A tcp:// address on this node with a port free now, for a TP group's rendezvous (run
    as a Ray task on the node of rank 0's bundle)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{node_host()}:{port}"


class TPFollowerWorker:
    """Rank > 0 of a pool worker: its model shard and KV heads, stepping in lockstep with
    rank 0 on a thread of its own. Answers `ready` and `alive` for the router's heartbeat."""

    def __init__(self, spec: WorkerSpec, mode: str):
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if spec.cores:
            pin_process(spec.cores)
        self.spec = spec
        self.mode = EngineMode(mode)
        self.worker_id = f"{spec.worker_id}/tp{spec.tp_rank}"
        config = spec.engine_config(self.mode)
        self.follower = TPFollower(config, spec.join_tp_group(config.device),
                                   self._layer_hook if self.mode == EngineMode.PREFILL else None)
        runner = self.follower.runner
        self.pool = KVPool.from_runner(runner, config, spec.model_id)
        num_kv_heads = runner.cfg.num_kv_heads
        self.receiving: DecodeConnector | None = None
        self.shipping: PrefillConnector | None = None
        if self.mode == EngineMode.DECODE:
            self.receiving = DecodeConnector(
                make_receiver(spec.transport, self.pool, host=node_host(),
                              secret=spec.cluster_secret),
                num_kv_heads, spec.tp_size, spec.tp_rank, spec.kv_timeout_s)
        elif self.mode == EngineMode.PREFILL:
            # Completions run on the connector's threads, off the stepping thread: a receiver
            # confirms only once every rank's part has landed, and rank 0's needs a step this
            # rank takes part in.
            self.shipping = PrefillConnector(
                make_sender(spec.transport, self.pool, secret=spec.cluster_secret),
                num_kv_heads, spec.tp_size, spec.tp_rank, spec.kv_timeout_s,
                spec.fault_layer_delay_s, f"{self.worker_id}-kv")
            self.shipped: dict[str, Future[ShipResult]] = {}
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{self.worker_id}-tp",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.follower.serve_forever()
        except TPError:
            log.critical("%s: tensor-parallel group failed; exiting", self.worker_id,
                         exc_info=True)
            os._exit(TP_FAILED_EXIT_CODE)
        log.info("%s: rank 0 stopped the group after %d steps", self.worker_id,
                 self.follower.steps)
        self.stopped.set()

    def ready(self) -> FollowerReady:
        return FollowerReady(
            worker_id=self.worker_id, tp_rank=self.spec.tp_rank,
            num_blocks=self.follower.runner.num_blocks, pid=os.getpid(),
            kv_address=self.receiving.address if self.receiving is not None else None)

    def alive(self) -> FollowerAlive:
        """Heartbeat: answered off the stepping thread (it may be blocked in a collective)."""
        return FollowerAlive(worker_id=self.worker_id, steps=self.follower.steps,
                             serving=not self.stopped.is_set())

    # ---- decode side: receive this rank's heads ------------------------------------------

    def expect_kv(self, expect: ExpectKV) -> None:
        """Rank 0 reserved blocks (the same ids here) for a prefill worker whose TP size makes
        `num_senders` sessions to this rank."""
        assert self.receiving is not None
        self.receiving.expect(expect.request_id, expect.block_ids, expect.num_senders,
                              lease_s=expect.timeout_s)

    async def kv_result(self, request_id: str) -> RankTransfer:
        """This rank's part of a transfer, once it is over (ok, failed, cancelled or its
        lease ran out: the receiver reports by the end of the lease)."""
        assert self.receiving is not None
        report = await asyncio.to_thread(self.receiving.part, request_id)
        return RankTransfer(error=None if report.ok else f"{self.worker_id}: {report.error}",
                            num_bytes=report.num_bytes)

    def cancel_kv(self, request_id: str) -> None:
        assert self.receiving is not None
        self.receiving.cancel(request_id)

    # ---- prefill side: ship this rank's heads --------------------------------------------

    def plan_send(self, plan: SendPlan) -> None:
        """Before rank 0 schedules the request: where this rank's heads go."""
        assert self.shipping is not None
        self.shipped[plan.request_id] = Future()
        self.shipping.plan(plan.request_id, plan.dst_addresses, plan.dst_block_ids)

    def drop_send(self, request_id: str) -> None:
        """Rank 0 gave up on the request (finished at prefill, aborted, failed)."""
        assert self.shipping is not None
        self.shipping.drop(request_id, "dropped by rank 0")
        self.shipped.pop(request_id, None)

    async def send_result(self, request_id: str) -> RankTransfer:
        assert self.shipping is not None
        done = self.shipped.get(request_id)
        if done is None:
            return RankTransfer(error=f"{self.worker_id}: no shipment for {request_id}")
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(done), self.spec.kv_timeout_s)
        except asyncio.TimeoutError:
            self.shipping.drop(request_id, "timed out")
            return RankTransfer(error=f"{self.worker_id}: no transfer result "
                                      f"{self.spec.kv_timeout_s:g} s after rank 0's")
        finally:
            self.shipped.pop(request_id, None)
        return RankTransfer(error=result.error, num_bytes=result.num_bytes)

    def _layer_hook(self, inputs: StepInputs):
        """Open the transfers of the prompts that complete in this step, ship each layer as
        it is written, and finish them once the step's last layer is queued."""
        assert self.shipping is not None
        kv = self.shipping
        prompts = {rid: prefill_blocks(inputs, rid, self.pool.layout.block_size)
                   for rid in inputs.sampled_request_ids if rid in self.shipped}
        on_layer = kv.begin_step([(rid, blocks) for rid, (blocks, _) in prompts.items()])
        if on_layer is None:
            return None
        last = self.pool.layout.num_layers - 1

        def ship(layer: int) -> None:
            on_layer(layer)
            if layer == last:
                for rid, (_, num_tokens) in prompts.items():
                    done = self.shipped.get(rid)
                    if done is not None:  # rank 0 alone has the sampled token
                        kv.finish(rid, KVControl(rid, num_tokens), _settle(done))
        return ship


def follower_errors(replies: Sequence[RankTransfer | BaseException]) -> list[str]:
    """What went wrong on follower ranks, from their replies to one call each (gathered with
    return_exceptions): a Ray error (a dead rank) or the reply's `error`."""
    errors = []
    for r in replies:
        if isinstance(r, BaseException):
            errors.append(f"{type(r).__name__}: {r}")
        elif r.error:
            errors.append(r.error)
    return errors


def _settle(done: Future[ShipResult]):
    def settle(result: ShipResult) -> None:
        if not done.done():
            done.set_result(result)
    return settle


def prefill_blocks(inputs: StepInputs, request_id: str, block_size: int) -> tuple[list[int], int]:
    """A prompt finishing in this step: its block ids and its length, from the broadcast
    block table (the same ids on every rank)."""
    index = inputs.request_ids.index(request_id)
    meta = inputs.meta
    if index >= meta.num_prefills:
        raise ValueError(f"{request_id} is not a prefill of this step")
    seq_len = int(meta.prefill_seq_lens[index])
    num_blocks = -(-seq_len // block_size)
    return meta.prefill_block_tables[index, :num_blocks].tolist(), seq_len
