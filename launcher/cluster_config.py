"""What `pdserve up` starts (`ClusterConfig`): pool sizes, TP per pool, transport, index,
placement and the router's settings, checked as a whole at construction (`ConfigError`
naming the flag), before anything starts. `launcher/cluster.py` starts it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve_api.errors import ConfigError
from router.config import RouterConfig


@dataclass
class ClusterConfig:
    model: str | None = None  # checkpoint dir or .gguf; None = the default model
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0  # > 0: the baseline, colocated workers only (prefill = decode = 0)
    # None: start a local redis-server if on PATH, else in process. May hold a password: no repr
    redis_url: str | None = field(default=None, repr=False)
    start_redis: bool = True
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    metrics_port: int | None = None  # Prometheus /metrics of the router (0 = a free port)
    http_port: int | None = None  # OpenAI-compatible HTTP API (0 = a free port)
    worker_metrics_port: int = 0  # each worker's /metrics (fixed: one worker per pod)
    transport: str = "auto"  # KV transport: ucx | tcp | auto (ucx where ucxx imports)
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig overrides
    worker_num_cpus: float = 0.25
    worker_num_gpus: float = 0.0
    # > 0: isolated workers. Every worker actor (every TP rank) gets this many whole Ray CPUs
    # and owns as many cores of this host alone (worker_host/placement.py); replaces
    # worker_num_cpus. 0: fractional CPUs, no pinning.
    cpus_per_worker: int = 0
    ray_address: str | None = None  # join this Ray cluster instead of starting one
    # Ray token authentication (launcher/ray_auth.py): the token's file; None = Ray's own
    # sources ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) when joining.
    ray_auth_token_file: str | None = None
    # KubeRay: place each pool on its worker group, which advertises the custom resource
    # pdserve_prefill / pdserve_decode / pdserve_colocated (rayStartParams.resources).
    pool_resources: bool = False
    heartbeat_s: float = 1.0
    ttl_s: float = 5.0
    router: RouterConfig = field(default_factory=RouterConfig)
    start_timeout_s: float = 600.0
    drain_grace_s: float = 0.0  # stop(): let in-flight requests finish this long first
    worker_max_restarts: int = 3  # Ray restarts a crashed worker this often (-1: always)
    # Workers outlive the router (named, detached actors in `namespace`): a restarted router
    # adopts the live ones, aborting what its predecessor left in flight, instead of loading
    # the model again. `stop()` then leaves them running; `pdserve down` ends them.
    detached_workers: bool = False
    namespace: str = "pdserve"
    # Tensor-parallel ranks per worker, per pool (worker_host/tp_follower.py); independent, so that
    # prefill and decode can shard differently (KV heads are routed rank to rank).
    prefill_tp: int = 1
    decode_tp: int = 1
    colocated_tp: int = 1
    fault_layer_delay_s: float = 0.0  # tests: slow prefill's KV shipping to kill peers mid-way
    fault_reserve_delay_s: float = 0.0  # tests: slow decode reservations to cancel during one

    def __post_init__(self) -> None:
        if self.num_colocated:
            if self.num_colocated < 0 or self.num_prefill or self.num_decode:
                raise ConfigError(f"colocated workers ({self.num_colocated}) replace the "
                                  f"prefill/decode pools: set both to 0, got --prefill "
                                  f"{self.num_prefill} --decode {self.num_decode}")
        elif self.num_prefill < 1 or self.num_decode < 1:
            raise ConfigError(f"need at least one prefill and one decode worker (or "
                              f"--colocated N), got --prefill {self.num_prefill} --decode "
                              f"{self.num_decode}")
        if self.transport not in ("ucx", "tcp", "auto"):
            raise ConfigError(f"transport {self.transport!r}: a cluster's workers are separate "
                              "processes, choose ucx, tcp or auto")
        if {"mode", "model", "tp_rank", "tp_size"} & set(self.engine):
            raise ConfigError("engine overrides may not set mode, model, tp_rank or tp_size "
                              "(use prefill_tp / decode_tp / colocated_tp)")
        if self.detached_workers and self.redis_url is None and self.start_redis:
            raise ConfigError("detached workers outlive this process, so a Redis it starts "
                              "would not: give --redis URL, or --no-redis")
        for name in ("prefill_tp", "decode_tp", "colocated_tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker < 0:
            raise ConfigError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.cpus_per_worker and self.pool_resources:
            raise ConfigError("--cpus-per-worker pins workers to this host's cores; with "
                              "--pool-resources each worker runs on a pod of its own: size "
                              "the pods instead")

    def tp_size(self, pool: str) -> int:
        return getattr(self, f"{pool}_tp")

    def pools(self) -> dict[str, int]:
        """Workers per pool, in start order."""
        if self.num_colocated:
            return {"colocated": self.num_colocated}
        return {"prefill": self.num_prefill, "decode": self.num_decode}

    def rank_names(self) -> list[str]:
        """Every worker process (every TP rank) this config starts, by its actor name."""
        return [follower_name(wid, r) if r else wid
                for pool, n in self.pools().items() for wid in (f"{pool}-{i}" for i in range(n))
                for r in range(self.tp_size(pool))]

    @property
    def cpus_per_rank(self) -> float:
        return self.cpus_per_worker or self.worker_num_cpus



def follower_name(worker_id: str, rank: int) -> str:
    return f"{worker_id}/tp{rank}"
