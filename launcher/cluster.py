"""Local cluster launcher (`pdserve up`): Ray, the prefill and decode pools, the prefix index
(a local `redis-server` when one is on PATH and no URL was given, else in process) and the
router, all started here and all stopped by `stop()`.

    with LocalCluster(ClusterConfig(num_prefill=1, num_decode=1)) as cluster:
        print(cluster.address)          # host:port of the gRPC API

The router runs on an asyncio loop in a thread of this process (the Ray driver); workers are
Ray actors with fractional CPUs, so a 2-core box holds a small cluster, or, with
`cpus_per_worker`, actors that each own whole cores of this host (worker_host/placement.py).
A worker with tensor parallelism (prefill_tp / decode_tp / colocated_tp > 1) is a group of
actors, one per rank, in a placement group of its own (one bundle per rank, packed on one node
when it fits); the router replaces such a group as a whole when any rank dies (`replace_group`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing_extensions import Self

from engine.config import ModelConfig
from engine.default_model import resolve_model
from engine.tokenizer import Tokenizer
from launcher.cluster_config import ClusterConfig, follower_name
from launcher.preflight import check_engine_config
from launcher.ray_auth import ray_init
from launcher.redis_local import start_redis_server, stop_redis_server
from pdserve_api.worker_protocol import ReadyInfo
from prefix_index.factory import make_prefix_index
from prefix_index.interface import PrefixIndex
from prefix_index.url import redact_url
from router.config import ModelInfo
from router.server import Router
from worker_host.placement import assign_cores
from worker_host.spec import WorkerSpec

log = logging.getLogger(__name__)


@dataclass
class _TPWorker:
    """The actors and placement group of one tensor-parallel worker."""

    cls: type
    pool: str
    placement_group: Any
    followers: list[Any]
    replacements: int = 0


def end_detached_workers(namespace: str) -> list[str]:
    """Kill this namespace's pdserve workers and remove their placement groups (`pdserve
    down`); returns the actor names ended. Needs a connected Ray."""
    import ray
    from ray.util.placement_group import get_placement_group, remove_placement_group

    ended = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] != namespace or not name.startswith(
                ("prefill-", "decode-", "colocated-")):
            continue
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        ended.append(name)
    for worker in {n.split("/")[0] for n in ended}:
        try:
            remove_placement_group(get_placement_group(f"pdserve-{worker}"))
        except ValueError:
            pass  # tp 1: no placement group
    return sorted(ended)


class LocalCluster:
    def __init__(self, config: ClusterConfig | None = None):
        self.config = config or ClusterConfig()
        self.prefill: dict[str, Any] = {}
        self.decode: dict[str, Any] = {}
        self.router: Router | None = None
        self.address = ""
        self.redis_url: str | None = None
        self.worker_metrics: list[str] = []
        self._redis_proc: subprocess.Popen | None = None
        self._redis_dir: str | None = None
        self._started_ray = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.tp_workers: dict[str, _TPWorker] = {}  # worker id -> its follower ranks
        self.adopted: set[str] = set()  # detached workers a previous router started
        self._detached: dict[str, list[Any]] = {}  # adopted worker id -> [rank 0, followers]
        self._secret = secrets.token_bytes(32)  # KV connections: this cluster's workers only
        self._model_path: Path | None = None
        self._cores: dict[str, tuple[int, ...]] = {}  # rank name -> its cores (isolated)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> str:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> str:
        import ray

        cfg = self.config
        if cfg.cpus_per_worker:  # a machine too small fails here, before anything starts
            self._cores = assign_cores(cfg.rank_names(), cfg.cpus_per_worker)
        model_path = resolve_model(cfg.model)  # fetch/import once, here, not in every worker
        model_cfg = ModelConfig.from_dir(model_path)
        pools = {"--prefill-tp": (cfg.num_prefill, cfg.prefill_tp),
                 "--decode-tp": (cfg.num_decode, cfg.decode_tp),
                 "--colocated-tp": (cfg.num_colocated, cfg.colocated_tp)}
        check_engine_config(cfg.engine, model_path, model_cfg,
                            {flag: tp for flag, (n, tp) in pools.items() if n})
        self.redis_url = cfg.redis_url or self._maybe_start_redis()
        index = make_prefix_index(self.redis_url)
        log.info("prefix index: %s", redact_url(self.redis_url) if self.redis_url
                 else "in process")
        if not ray.is_initialized():
            n = len(cfg.rank_names())
            ray_init(address=cfg.ray_address, include_dashboard=False, namespace=cfg.namespace,
                     auth_token_file=cfg.ray_auth_token_file,
                     num_cpus=None if cfg.ray_address else max(os.cpu_count() or 1,
                                                               n * cfg.cpus_per_rank + 1),
                     logging_level=logging.WARNING, log_to_driver=True,
                     runtime_env={"env_vars": {
                         # huge pages: faster shared-memory KV copies between workers
                         "THP_MEM_ALLOC_ENABLE": "1", "UCX_WARN_UNUSED_ENV_VARS": "n"}})
            self._started_ray = True
        self.prefill, self.decode = self._start_workers(model_path)
        infos: list[ReadyInfo] = ray.get(
            [a.adopt.remote() if wid in self.adopted else a.ready.remote()
             for wid, a in [*self.prefill.items(), *self.decode.items()]],
            timeout=cfg.start_timeout_s)
        for info in infos:
            log.info("worker %s ready (KV transport %s)", info.worker_id, info.transport)
        self.worker_metrics = [info.metrics for info in infos]
        tokenizer = (Tokenizer.from_dir(model_path)
                     if (Path(model_path) / "tokenizer.json").is_file() else None)
        max_len = min(i.max_model_len for i in infos)
        model = ModelInfo(name=Path(model_path).name, tokenizer=tokenizer,
                          vocab_size=model_cfg.vocab_size, max_model_len=max_len,
                          block_size=infos[0].block_size)
        self.router = Router(model, self.prefill, self.decode, index, cfg.router,
                             colocated=cfg.num_colocated > 0,
                             followers={w: g.followers for w, g in self.tp_workers.items()},
                             replace_group=self.replace_group,
                             infos={i.worker_id: i for i in infos})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router",
                                        daemon=True)
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(
            self.router.start(cfg.host, cfg.port, cfg.metrics_port, cfg.http_port),
            self._loop).result(60)
        self.address = f"{cfg.host}:{port}"
        return self.address

    @property
    def scrape_targets(self) -> list[str]:
        """host:port of every /metrics endpoint of this cluster: the router's (when
        metrics_port is set) and each worker's. One Prometheus static_configs list."""
        router = []
        if self.router is not None and self.config.metrics_port is not None:
            router = [f"{self.config.host}:{self.router.metrics_port}"]
        elif self.router is not None and self.router.http is not None:  # /metrics there too
            router = [f"{self.config.host}:{self.router.http_port}"]
        return router + list(self.worker_metrics)

    def _maybe_start_redis(self) -> str | None:
        if not self.config.start_redis or shutil.which("redis-server") is None:
            return None
        self._redis_dir = tempfile.mkdtemp(prefix="pdserve-redis-")
        port, proc = start_redis_server(Path(self._redis_dir))
        self._redis_proc = proc
        log.info("started redis-server (pid %d) on 127.0.0.1:%d", proc.pid, port)
        return f"redis://127.0.0.1:{port}/0"

    def _start_workers(self, model_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from colocated_worker.worker import ColocatedWorker
        from decode_worker.worker import DecodeWorker
        from prefill_worker.worker import PrefillWorker

        cfg = self.config
        self._model_path = model_path
        if cfg.detached_workers:
            self._find_detached()

        def start(cls: type, pool: str, n: int) -> dict[str, Any]:
            return {f"{pool}-{i}": self._start_worker(cls, pool, f"{pool}-{i}")
                    for i in range(n)}

        if cfg.num_colocated:
            return start(ColocatedWorker, "colocated", cfg.num_colocated), {}
        return (start(PrefillWorker, "prefill", cfg.num_prefill),
                start(DecodeWorker, "decode", cfg.num_decode))

    def _find_detached(self) -> None:
        """Workers a previous router left running in this namespace: adopt the complete
        ones (every TP rank alive), sharing their KV secret with any started anew."""
        import ray

        cfg = self.config
        for pool, n in cfg.pools().items():
            for i in range(n):
                wid = f"{pool}-{i}"
                names = [wid] + [follower_name(wid, r) for r in range(1, cfg.tp_size(pool))]
                try:
                    actors = [ray.get_actor(name, namespace=cfg.namespace) for name in names]
                    secret = ray.get(actors[0].kv_secret.remote(), timeout=30)
                except (ValueError, ray.exceptions.RayError):
                    continue  # not there (or dying): started anew
                self._detached[wid] = actors
                self._secret = secret
        self.adopted = set(self._detached)
        if self.adopted:
            log.info("adopting %d live detached workers: %s", len(self.adopted),
                     sorted(self.adopted))

    def _spec(self, worker_id: str, tp_rank: int = 0, tp_size: int = 1,
              tp_init_method: str | None = None) -> WorkerSpec:
        cfg, path = self.config, self._model_path
        assert path is not None, "_start_workers sets the model path first"
        return WorkerSpec(
            worker_id, str(path), Path(path).name, cfg.engine, cfg.transport, self.redis_url,
            cfg.heartbeat_s, cfg.ttl_s, cfg.router.kv_timeout_s, cfg.fault_layer_delay_s,
            cfg.model, self._secret, cfg.worker_metrics_port, tp_size, tp_rank, tp_init_method,
            cores=self._cores.get(follower_name(worker_id, tp_rank) if tp_rank else worker_id,
                                  ()),
            fault_reserve_delay_s=cfg.fault_reserve_delay_s)

    def _actor_options(self, pool: str, share: float = 1.0, name: str | None = None
                       ) -> dict[str, Any]:
        cfg = self.config
        options: dict[str, Any] = {"num_cpus": cfg.cpus_per_rank,
                                   "num_gpus": cfg.worker_num_gpus, "max_concurrency": 1000}
        if cfg.detached_workers and name is not None:
            options.update(name=name, namespace=cfg.namespace, lifetime="detached")
        if cfg.pool_resources:  # a pod advertising pdserve_<pool>: 1 hosts one whole worker
            options["resources"] = {f"pdserve_{pool}": share}
        return options

    def _start_worker(self, cls: type, pool: str, worker_id: str) -> Any:
        """One pool worker: an actor that Ray restarts on a crash, or, with tensor
        parallelism, a placement group of rank actors replaced as a whole."""
        import ray

        tp = self.config.tp_size(pool)
        if tp == 1:
            if worker_id in self._detached:
                return self._detached[worker_id][0]
            return ray.remote(cls).options(
                max_restarts=self.config.worker_max_restarts,
                **self._actor_options(pool, name=worker_id)).remote(self._spec(worker_id))
        from ray.util.placement_group import get_placement_group, placement_group

        pg_name = f"pdserve-{worker_id}"
        if worker_id in self._detached:
            rank0, *followers = self._detached[worker_id]
            self.tp_workers[worker_id] = _TPWorker(cls, pool, get_placement_group(pg_name),
                                                   followers)
            return rank0
        options = self._actor_options(pool, share=1.0 / tp)
        bundle = {"CPU": options["num_cpus"], **({"GPU": options["num_gpus"]}
                                                 if options["num_gpus"] else {}),
                  **options.get("resources", {})}
        detached = {"lifetime": "detached"} if self.config.detached_workers else {}
        try:  # a detached group whose ranks died: its placement group may still be there
            pg = get_placement_group(pg_name) if detached else None
        except ValueError:
            pg = None
        if pg is None:
            pg = placement_group([bundle] * tp, strategy="PACK", name=pg_name, **detached)
        ray.get(pg.ready(), timeout=self.config.start_timeout_s)
        self.tp_workers[worker_id] = _TPWorker(cls, pool, pg, [])
        return self._start_tp_ranks(worker_id)

    def _start_tp_ranks(self, worker_id: str) -> Any:
        """Rank 0 and the followers of a TP worker, in its placement group, joined at a
        fresh rendezvous address on rank 0's node. Returns rank 0."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from worker_host.tp_follower import TPFollowerWorker, rendezvous_address

        group = self.tp_workers[worker_id]
        tp = self.config.tp_size(group.pool)

        def on(rank: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(group.placement_group,
                                                    placement_group_bundle_index=rank)

        init = ray.get(ray.remote(rendezvous_address).options(
            num_cpus=0, scheduling_strategy=on(0)).remote(), timeout=60)

        def options(rank: int) -> dict[str, Any]:
            o = self._actor_options(group.pool, share=1.0 / tp,
                                    name=follower_name(worker_id, rank) if rank else worker_id)
            o.pop("resources", None)  # the bundle holds them
            return {**o, "max_restarts": 0, "scheduling_strategy": on(rank)}

        group.followers = [
            ray.remote(TPFollowerWorker).options(**options(r)).remote(
                self._spec(worker_id, r, tp, init), group.pool)
            for r in range(1, tp)]
        spec = self._spec(worker_id, 0, tp, init)
        spec.tp_followers = list(group.followers)  # rank 0 drives their KV transfers
        return ray.remote(group.cls).options(**options(0)).remote(spec)

    def replace_group(self, worker_id: str) -> tuple[Any, list[Any]]:
        """The router's call when a rank of a TP worker died: kill what is left of the group
        and start a fresh one in the same placement group. Returns (rank 0, followers);
        raises RuntimeError once the worker has used up worker_max_restarts."""
        import ray

        group = self.tp_workers[worker_id]
        limit = self.config.worker_max_restarts
        if 0 <= limit <= group.replacements:
            raise RuntimeError(f"{worker_id} was replaced {group.replacements} times "
                               f"(worker_max_restarts {limit})")
        group.replacements += 1
        old = [self.prefill.get(worker_id) or self.decode.get(worker_id), *group.followers]
        for actor in old:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        rank0 = self._start_tp_ranks(worker_id)
        pool = self.decode if group.pool == "decode" else self.prefill
        pool[worker_id] = rank0
        return rank0, group.followers

    # ---- stop --------------------------------------------------------------------------------

    def stop(self, keep_workers: bool | None = None) -> None:
        """Stop everything this cluster started, in reverse order; safe to call twice.
        `keep_workers` (default: detached_workers) leaves the workers running for the next
        router to adopt."""
        import ray

        if keep_workers is None:
            keep_workers = self.config.detached_workers

        if self.router is not None and self._loop is not None:
            try:
                grace = self.config.drain_grace_s
                asyncio.run_coroutine_threadsafe(self.router.stop(grace),
                                                 self._loop).result(grace + 15)
            except Exception:
                log.warning("router did not stop cleanly", exc_info=True)
            self.router = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop = None
        actors = [*self.prefill.values(), *self.decode.values()]
        if actors and ray.is_initialized() and not keep_workers:
            try:
                ray.get([a.shutdown.remote() for a in actors], timeout=10)
            except Exception:  # a dead worker has nothing to shut down
                log.debug("worker shutdown", exc_info=True)
            for a in actors + [f for g in self.tp_workers.values() for f in g.followers]:
                ray.kill(a)
            from ray.util.placement_group import remove_placement_group

            for g in self.tp_workers.values():
                remove_placement_group(g.placement_group)
        self.prefill, self.decode, self.tp_workers = {}, {}, {}
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False
        if self._redis_proc is not None:
            stop_redis_server(self._redis_proc)
            self._redis_proc = None
        if self._redis_dir is not None:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
            self._redis_dir = None

    @property
    def index(self) -> PrefixIndex | None:
        return self.router.pool.index if self.router is not None else None

    def call(self, coro) -> Any:
        """Run a coroutine on the router's loop (tests: inspect router state)."""
        assert self._loop is not None, "the cluster is not running"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)
