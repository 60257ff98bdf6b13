"""A pool worker's Prometheus metrics, labelled by pool and worker and served by the worker
itself; the latency buckets the router's metrics share.

Request outcomes (success, SLO met, latencies) are the router's: a worker sees one phase of a
request and never its SLO.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from engine.native_heap import heap_in_use_bytes

# Latency buckets (seconds): sub-millisecond phases (transfer on one host) up to long decodes.
FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PHASE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
# Per output token (TPOT, inter-token latency): vLLM's range, which a loaded CPU box reaches
# the top of (seconds per token), with sub-10 ms buckets for a GPU.
TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
         0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)



def _heap_in_use_bytes() -> float:
    in_use = heap_in_use_bytes()
    return float("nan") if in_use is None else in_use


class WorkerMetrics:
    """One pool worker's metrics, labelled by pool and worker, served by the worker itself
    (`serve()` on a free port; the launcher lists every target)."""

    def __init__(self, pool: str, worker_id: str) -> None:
        r = self.registry = CollectorRegistry()
        labels = ["pool", "worker"]
        self._labels = (pool, worker_id)
        self.running = Gauge("pdserve:num_requests_running", "Requests in the running batch",
                             labels, registry=r).labels(*self._labels)
        self.waiting = Gauge("pdserve:num_requests_waiting", "Requests waiting in the engine",
                             labels, registry=r).labels(*self._labels)
        self.kv_usage = Gauge("pdserve:kv_cache_usage_perc",
                              "Fraction of KV blocks in use (0-1)", labels,
                              registry=r).labels(*self._labels)
        self.step = Histogram("pdserve:engine_step_seconds", "One engine step (forward pass)",
                              labels, buckets=FAST, registry=r).labels(*self._labels)
        self.prompt_tokens = Counter("pdserve:prompt_tokens_total",
                                     "Prompt tokens of requests whose first token was sampled "
                                     "here", labels, registry=r).labels(*self._labels)
        self.generation_tokens = Counter("pdserve:generation_tokens_total",
                                         "Tokens sampled here", labels,
                                         registry=r).labels(*self._labels)
        self._transfer_bytes = Counter("pdserve:kv_transfer_bytes_total",
                                       "KV bytes sent (prefill) or received (decode)",
                                       labels + ["transport"], registry=r)
        # RSS minus what the C heap holds but does not use tells allocator retention from a
        # leak (engine/native_heap.py); process_resident_memory_bytes comes with ProcessCollector
        ProcessCollector(registry=r)
        self.heap_in_use = Gauge("pdserve:native_heap_in_use_bytes",
                                 "Bytes the C heap has allocated and not freed (glibc)",
                                 labels, registry=r).labels(*self._labels)
        self.heap_in_use.set_function(_heap_in_use_bytes)
        self._server: Any = None  # prometheus_client's WSGIServer once serving
        self.port = 0

    def transfer_bytes(self, transport: str, n: int) -> None:
        self._transfer_bytes.labels(*self._labels, transport).inc(n)

    def serve(self, host: str, port: int = 0) -> str:
        """Start the /metrics HTTP server on host:port (0 = a free one); returns host:port."""
        self._server, _ = start_http_server(port, host, registry=self.registry)
        self.port = self._server.server_port
        return f"{host}:{self.port}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
