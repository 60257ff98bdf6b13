"""The router's Prometheus metrics, named in vLLM's style with our prefix (`pdserve:`).

One registry per Router, so that several routers (tests) can live in one process; `pdserve
up --metrics-port P` serves it over HTTP for Prometheus to scrape.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pdserve_api import pdserve_pb2
from worker_host.metrics import E2E, FAST, PHASE, TOKEN


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("pdserve:time_to_first_token_seconds",
                              "Arrival at the router to the first token sent", buckets=PHASE,
                              registry=r)
        self.tpot = Histogram("pdserve:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              buckets=TOKEN, registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds",
                             "Time between successive output tokens sent to the client (a "
                             "message of k tokens counts its gap k times, each 1/k of it)",
                             buckets=TOKEN, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds",
                             "Arrival to the final message", buckets=E2E, registry=r)
        self.queue = Histogram("pdserve:request_queue_time_seconds",
                               "Arrival until a prefill worker starts computing",
                               buckets=PHASE, registry=r)
        self.prefill = Histogram("pdserve:prefill_time_seconds",
                                 "Prefill compute of the uncached prompt tokens",
                                 buckets=PHASE, registry=r)
        self.transfer = Histogram("pdserve:kv_transfer_seconds",
                                  "KV transfer time left after prefill compute (layer-wise "
                                  "streaming hides the rest)", ["transport"], buckets=FAST,
                                  registry=r)
        self.decode = Histogram("pdserve:decode_time_seconds", "KV arrival to finish",
                                buckets=E2E, registry=r)
        self.transfers = Counter("pdserve:kv_transfers_total",
                                 "Requests whose KV moved, by transport", ["transport"],
                                 registry=r)
        self.retries = Counter("pdserve:kv_transfer_retries_total",
                               "Requests retried after a failed KV transfer or a dead worker",
                               registry=r)
        self.success = Counter("pdserve:request_success_total", "Finished requests",
                               ["finished_reason"], registry=r)
        self.rejected = Counter("pdserve:requests_rejected_total",
                                "Requests refused: invalid_argument, resource_exhausted, "
                                "unavailable", ["reason"], registry=r)
        self.cancelled = Counter("pdserve:requests_cancelled_total",
                                 "Requests the client cancelled or let pass their deadline",
                                 registry=r)
        self.prefix_queries = Counter("pdserve:prefix_cache_queries_total",
                                      "Prompt tokens routed", registry=r)
        self.prefix_hits = Counter("pdserve:prefix_cache_hits_total",
                                   "Prompt tokens served from a worker's prefix cache",
                                   registry=r)
        self.slo_met = Counter("pdserve:request_slo_met_total",
                               "Finished requests that met their TTFT and TPOT SLO (no SLO "
                               "counts as met): rate() of it is goodput", registry=r)
        self.waiting = Gauge("pdserve:num_requests_waiting",
                             "Requests waiting for a prefill slot", registry=r)
        self.running = Gauge("pdserve:num_requests_running",
                             "Requests admitted and not finished", registry=r)
        self.workers = Gauge("pdserve:workers", "Live workers by pool", ["pool"], registry=r)
        # Series exist from the start (at 0), so rates and alerts work before the first event.
        for reason in ("invalid_argument", "resource_exhausted", "unavailable",
                       "unauthenticated", "rate_limited"):
            self.rejected.labels(reason)
        for reason in ("stop", "length", "abort"):
            self.success.labels(reason)

    def observe_final(self, final: pdserve_pb2.FinalInfo, transport: str,
                      ttft_slo_s: float | None = None, tpot_slo_s: float | None = None
                      ) -> None:
        """Record one finished request from its final message (FinalInfo) and its SLO."""
        t = final.timing
        self.ttft.observe(t.ttft_ms / 1e3)
        self.e2e.observe(t.e2e_ms / 1e3)
        self.queue.observe(t.queued_ms / 1e3)
        self.prefill.observe(t.prefill_ms / 1e3)
        self.decode.observe(t.decode_ms / 1e3)
        tpot = None
        if final.completion_tokens > 1:
            tpot = (t.e2e_ms - t.ttft_ms) / 1e3 / (final.completion_tokens - 1)
            self.tpot.observe(tpot)
        if ((ttft_slo_s is None or t.ttft_ms / 1e3 <= ttft_slo_s)
                and (tpot_slo_s is None or tpot is None or tpot <= tpot_slo_s)):
            self.slo_met.inc()
        if transport != "none":
            self.transfer.labels(transport).observe(t.transfer_ms / 1e3)
            self.transfers.labels(transport).inc()
        self.success.labels(final.finish_reason).inc()
        self.prefix_queries.inc(final.prompt_tokens)
        self.prefix_hits.inc(final.cached_tokens)

    def token_clock(self) -> TokenClock:
        """One request's inter-token clock: `sent(n)` as each message with n tokens goes."""
        return TokenClock(self.itl)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class TokenClock:
    """Observes the gaps between one request's output tokens as they are sent."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._last: float | None = None  # when the previous token went out

    def sent(self, num_tokens: int) -> None:
        if not num_tokens:
            return
        now = time.monotonic()
        if self._last is not None:
            gap = (now - self._last) / num_tokens
            for _ in range(num_tokens):
                self._histogram.observe(gap)
        self._last = now
