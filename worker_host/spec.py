"""What a pool worker (prefill or decode Ray actor) is told at start, and how it builds its
engine and KV pool from that. Plain data, so it crosses Ray's process boundary as is."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, EngineMode
from engine.default_model import resolve_model
from engine.tp_engine import init_tp_group


@dataclass
class WorkerSpec:
    worker_id: str  # e.g. "prefill-0"; also its id in the prefix index
    model_path: str  # resolved local checkpoint directory (the launcher fetches once)
    model_id: str  # stable model name for KV headers: both sides must agree
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig overrides
    transport: str = "auto"  # KV transport: ucx | tcp | local | auto
    # Prefix index; None = the router keeps it in process. May hold a password and TLS file
    # paths (prefix_index/url.py): kept out of repr, like the secret below.
    redis_url: str | None = field(default=None, repr=False)
    heartbeat_s: float = 1.0  # index registration heartbeat
    ttl_s: float = 5.0  # index registration lifetime without heartbeats
    # KV reservation lease (`pdserve up --kv-timeout-s`): decode frees blocks reserved for a
    # prompt once the prefill side has been silent this long; prefill renews every third.
    kv_timeout_s: float = 30.0
    # Fault injection (tests): prefill sleeps this long before shipping each layer, so that a
    # peer can be killed while a transfer is in flight.
    fault_layer_delay_s: float = 0.0
    # What the user asked for (--model; None = the default model): a worker on another host,
    # where model_path does not exist, resolves it into its own cache.
    model_source: str | None = None
    # KV connections between workers authenticate with it (kv_transfer/auth.py): only this
    # cluster's workers can write into or read from a pool. The launcher makes a fresh one.
    cluster_secret: bytes | None = field(default=None, repr=False)
    metrics_port: int = 0  # this worker's /metrics (0 = a free port; fixed on Kubernetes)
    # Tensor parallelism: this actor is rank tp_rank of a worker spanning tp_size actors, which
    # rendezvous at tp_init_method ("tcp://HOST:PORT", chosen by the launcher).
    tp_size: int = 1
    tp_rank: int = 0
    tp_init_method: str | None = None
    tp_followers: list[Any] = field(default_factory=list)  # rank 0: actors of ranks 1..
    # CPU cores this process owns alone (worker_host/placement.py); () = not pinned.
    cores: tuple[int, ...] = ()
    # Fault injection (tests): decode holds its engine thread this long before reserving, so
    # that a cancel can land while a reservation is being made.
    fault_reserve_delay_s: float = 0.0

    def engine_config(self, mode: EngineMode) -> EngineConfig:
        model = self.model_path
        if not Path(model).exists():
            model = str(resolve_model(self.model_source))
        return EngineConfig(**{**self.engine, "model": model, "mode": mode,
                               "tp_rank": self.tp_rank, "tp_size": self.tp_size})

    def join_tp_group(self, device: str):
        """Join this worker's TP group (None without TP): gloo on CPU, NCCL on GPU."""
        if self.tp_size == 1:
            return None
        if self.tp_init_method is None:
            raise ValueError(f"{self.worker_id}: tp_size {self.tp_size} needs tp_init_method")
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        return init_tp_group(self.tp_rank, self.tp_size, self.tp_init_method, backend)


def node_host() -> str:
    """The address other hosts reach this worker's KV receiver on (loopback on one host)."""
    try:  # lazily: the launcher imports this module before it sets Ray's auth environment
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())
