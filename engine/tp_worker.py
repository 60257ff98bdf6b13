"""The follower ranks of a tensor-parallel pool worker, as Ray actors.

A pool worker with tp_size N is N actors in one placement group: rank 0 is the ordinary
PrefillWorker / DecodeWorker / ColocatedWorker (its engine's runner broadcasts every step), and
ranks 1..N-1 are TPFollowerWorker actors that hold their shards and run what rank 0 sends
(engine/tp_engine.py). All N join one torch.distributed group at `WorkerSpec.tp_init_method`,
picked by the launcher with `rendezvous_address` on rank 0's node.

A group is replaced as a whole, never repaired: a rank whose group fails exits (the peers'
collectives fail at once, so they exit too), the router sees rank 0 or a follower dead, kills
the rest and asks the launcher for a fresh group (router/cluster.py).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from engine.config import EngineMode
from engine.engine_loop import TP_FAILED_EXIT_CODE
from engine.tp_engine import TPError, TPFollower
from engine.worker_spec import WorkerSpec, node_host

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
        self.spec = spec
        self.worker_id = f"{spec.worker_id}/tp{spec.tp_rank}"
        config = spec.engine_config(EngineMode(mode))
        self.follower = TPFollower(config, spec.join_tp_group(config.device))
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

    def ready(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "tp_rank": self.spec.tp_rank,
                "num_blocks": self.follower.runner.num_blocks, "pid": os.getpid()}

    def alive(self) -> dict[str, Any]:
        """Heartbeat: answered off the stepping thread (it may be blocked in a collective)."""
        return {"worker_id": self.worker_id, "steps": self.follower.steps,
                "serving": not self.stopped.is_set()}
