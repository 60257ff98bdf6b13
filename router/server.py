"""The router: pdserve's front door (DESIGN: "A request's path", steps 1-7).

A gRPC asyncio server. Per request: validate and tokenize (chat template included), hash the
prompt's blocks, ask the prefix index once which prefill worker holds how much of it, admit or
reject early (router/slo.py), wait for a prefill slot in deadline-within-priority order,
reserve KV blocks on a decode worker, have the prefill worker compute and ship the KV into
them, stream the first token, then stream the decode worker's tokens. A failed KV transfer is
retried once on another decode worker; client cancel or deadline aborts the request on both
workers, which frees its blocks.

Workers are Ray actor handles (prefill_worker/worker.py, decode_worker/worker.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.hashing import chain_hashes
from engine.tokenizer import Tokenizer
from pdserve_api import pdserve_pb2, pdserve_pb2_grpc
from prefix_index.in_process import InProcessPrefixIndex
from prefix_index.interface import PrefixIndex
from router.api import (
    InvalidArgument,
    ParsedRequest,
    PhaseTimes,
    delta_response,
    final_response,
    parse_generate_request,
)
from router.metrics import RouterMetrics
from router.slo import PrefillPlacement, Rejected, RequestInfo, SLOScheduler

log = logging.getLogger(__name__)

SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["PDServe"].full_name


class RouterError(Exception):
    """How a request ended when it did not finish: a gRPC status and a message. The gRPC
    service aborts with it; the HTTP front end maps it to an HTTP status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class RequestFailed(RuntimeError):
    """A request that could not be served for a reason that is not the client's: a worker
    died, or the KV transfer failed twice. Maps to UNAVAILABLE."""


class WorkerDied(RequestFailed):
    """The worker serving a request died under it (a candidate for migration)."""


@dataclass
class RouterConfig:
    slots_per_prefill_worker: int = 4  # prompts in flight per prefill worker (it batches them)
    max_queue: int = 256  # requests waiting for a prefill slot before new ones are refused
    decode_wait_s: float = 30.0  # wait for decode KV space this long without a TTFT SLO
    kv_timeout_s: float = 30.0  # decode reservation lifetime without its KV
    stats_interval_s: float = 0.25  # worker stats / in-process index feed period
    index_ttl_s: float = 5.0  # in-process index: worker registration lifetime
    heartbeat_timeout_s: float = 10.0  # a worker's stats call slower than this is logged
    # Limits, enforced before any work is done (INVALID_ARGUMENT beyond them).
    max_prompt_tokens: int | None = None  # None: max_model_len - 1
    max_prompt_chars: int = 1_000_000  # text/chat checked before tokenizing
    max_output_tokens: int = 8192  # sampling.max_tokens
    max_stop_strings: int = 16
    max_message_bytes: int = 4 * 2**20  # one gRPC message / one HTTP body
    api_keys_file: str | None = None  # router/auth.py; None = no authentication
    tls_cert_file: str | None = None  # PEM; with tls_key_file: TLS on gRPC and HTTP
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # PEM CA: require client certificates (mTLS)
    restart_wait_s: float = 600.0  # how long a dead worker may take to be restarted by Ray


@dataclass
class ModelInfo:
    name: str  # what clients may put in GenerateRequest.model
    tokenizer: Tokenizer | None
    vocab_size: int
    max_model_len: int  # the smallest any worker accepts
    block_size: int


@dataclass(eq=False)
class _Run:
    """One request's progress, for timing and for cleanup on cancel."""

    request_id: str
    arrival: float
    prompt_tokens: int
    worker_rid: str = ""
    prefill_id: str | None = None
    decode_id: str | None = None
    timing: PhaseTimes = field(default_factory=lambda: PhaseTimes(0, 0, 0, 0, 0, 0))
    cached_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    transport: str = "none"
    done: bool = False
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None


class Router:
    def __init__(self, model: ModelInfo, prefill: dict[str, Any], decode: dict[str, Any],
                 index: PrefixIndex, config: RouterConfig | None = None,
                 colocated: bool = False, followers: dict[str, list[Any]] | None = None,
                 replace_group: Callable[[str], tuple[Any, list[Any]]] | None = None,
                 infos: dict[str, dict[str, Any]] | None = None):
        self.model = model
        self.config = config or RouterConfig()
        # worker id -> Ray actor handle. Colocated mode: `prefill` holds the colocated
        # workers (they are the prefill candidates, scheduled the same way) and `decode` is
        # empty; each request runs start to finish on one worker.
        self.prefill = dict(prefill)
        self.decode = dict(decode)
        self.colocated = colocated
        # Tensor-parallel workers: worker id -> its follower rank actors, heartbeated too; a
        # dead rank fails the whole worker, which `replace_group` (the launcher's) restarts.
        self.followers = dict(followers or {})
        self.replace_group = replace_group
        self.index = index
        self.index_in_process = isinstance(index, InProcessPrefixIndex)
        self.slo = SLOScheduler(list(self.prefill), list(self.decode),
                                slots_per_worker=self.config.slots_per_prefill_worker,
                                max_queue=self.config.max_queue)
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.server: grpc.aio.Server | None = None
        self.metrics = RouterMetrics()
        self._metrics_server = None
        self.http = None
        self.api_keys = None
        if self.config.api_keys_file:
            from router.auth import ApiKeys

            self.api_keys = ApiKeys.from_file(self.config.api_keys_file)
        self.draining = False
        self._in_flight = 0
        self._kv_addresses: dict[str, list[str]] = {}  # decode id -> its receivers by TP rank
        self._prefill_tp: dict[str, int] = {}  # prefill id -> its TP size (decode plans by it)
        # What each worker's `ready` said (the launcher asked already): its KV addresses.
        for wid, info in (infos or {}).items():
            self._note_worker("decode" if wid in self.decode else "prefill", wid, info)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    metrics_port: int | None = None, http_port: int | None = None) -> int:
        """Serve gRPC on host:port (0 = a free port); returns the bound port. With
        metrics_port, Prometheus metrics on host:metrics_port/metrics; with http_port, the
        OpenAI-compatible API (router/openai_http.py) on host:http_port."""
        if self.index_in_process:
            for wid in self.prefill:
                self.index.register_worker(wid, {"role": "prefill"}, self.config.index_ttl_s)
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.config.max_message_bytes)])
        # Registered by hand so that the request arrives as bytes: an undecodable message is
        # the client's error (INVALID_ARGUMENT), not gRPC's "Unexpected DecodeError" (UNKNOWN).
        service = _Service(self)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Generate": grpc.unary_stream_rpc_method_handler(
                service.generate_bytes,
                response_serializer=pdserve_pb2.GenerateResponse.SerializeToString)}),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        tls = self._tls_files()
        if tls is None:
            bound = self.server.add_insecure_port(f"{host}:{port}")
        else:
            cert, key, ca = tls
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                 require_client_auth=ca is not None)
            bound = self.server.add_secure_port(f"{host}:{port}", creds)
        if bound == 0:
            raise OSError(f"could not bind the router to {host}:{port}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._count_workers()
        await self._connect_kv(self.prefill, self._all_kv_addresses())
        self._tasks.append(asyncio.create_task(self._watch_workers()))
        if http_port is not None:
            from router.openai_http import OpenAIServer

            self.http = OpenAIServer(self)
            c = self.config
            self.http_port = await self.http.start(
                host, http_port, None if tls is None else
                (c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file))
        if metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_server, _ = start_http_server(metrics_port, host,
                                                        registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        log.info("router serving on %s:%d (%d prefill, %d decode workers, index %s)", host,
                 bound, len(self.prefill), len(self.decode), type(self.index).__name__)
        return bound

    async def drain(self, grace_s: float) -> int:
        """Stop taking requests (health NOT_SERVING, new ones get UNAVAILABLE) and wait up to
        grace_s for those in flight to finish. Returns how many were still running."""
        self.draining = True
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight:
            log.warning("drain: %d requests still running after %.1f s", self._in_flight,
                        grace_s)
        return self._in_flight

    async def stop(self, grace_s: float = 0.0) -> None:
        """Drain for grace_s (0: cancel what is running), then stop serving."""
        await self.drain(grace_s)
        for task in self._tasks:
            task.cancel()
        if self.server is not None:
            await self.server.stop(0.5)
        if self.http is not None:
            await self.http.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    # ---- one request -------------------------------------------------------------------------

    def _tls_files(self) -> tuple[bytes, bytes, bytes | None] | None:
        c = self.config
        if not c.tls_cert_file and not c.tls_key_file:
            if c.tls_client_ca_file:
                raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
            return None
        if not (c.tls_cert_file and c.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        from pathlib import Path

        ca = Path(c.tls_client_ca_file).read_bytes() if c.tls_client_ca_file else None
        return Path(c.tls_cert_file).read_bytes(), Path(c.tls_key_file).read_bytes(), ca

    def authorize(self, authorization: str | None) -> str | None:
        """The caller's key name (None without key checking), or RouterError:
        UNAUTHENTICATED for a missing/unknown key, RESOURCE_EXHAUSTED over its rate."""
        if self.api_keys is None:
            return None
        from router.auth import AuthError

        try:
            return self.api_keys.check(authorization)
        except AuthError as e:
            reason = "unauthenticated" if e.status == "unauthenticated" else "rate_limited"
            self.metrics.rejected.labels(reason).inc()
            code = (grpc.StatusCode.UNAUTHENTICATED if e.status == "unauthenticated"
                    else grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise RouterError(code, str(e)) from None

    def new_request_id(self) -> str:
        return f"r{next(self._ids)}-{time.time_ns() % 10**9:09d}"

    def check_limits(self, req: ParsedRequest) -> None:
        """The configured limits that need no tokenizing (RouterConfig)."""
        c = self.config
        if req.sampling.max_tokens > c.max_output_tokens:
            raise InvalidArgument(f"sampling.max_tokens={req.sampling.max_tokens}: at most "
                                  f"{c.max_output_tokens} on this cluster")
        if len(req.sampling.stop) > c.max_stop_strings:
            raise InvalidArgument(f"sampling.stop: {len(req.sampling.stop)} strings, at most "
                                  f"{c.max_stop_strings}")
        if isinstance(req.prompt, str):
            chars = len(req.prompt)
        elif req.prompt and isinstance(req.prompt[0], dict):
            chars = sum(len(m["content"]) for m in req.prompt)
        else:
            chars = 0
        if chars > c.max_prompt_chars:
            raise InvalidArgument(f"prompt is {chars} characters; at most "
                                  f"{c.max_prompt_chars}")

    def tokenize(self, req: ParsedRequest) -> list[int]:
        self.check_limits(req)
        tok = self.model.tokenizer
        if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], dict)):
            if tok is None:
                raise InvalidArgument("this model has no tokenizer: send token_ids")
            ids = tok.encode(req.prompt) if isinstance(req.prompt, str) else tok.encode_chat(
                list(req.prompt))
        else:
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
            if bad:
                raise InvalidArgument(f"token_ids {bad[:5]} outside the vocabulary "
                                      f"[0, {self.model.vocab_size})")
        if req.sampling.stop and tok is None:
            raise InvalidArgument("sampling.stop needs a tokenizer: use stop_token_ids")
        limit = self.model.max_model_len - 1
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens)
        if not ids:
            raise InvalidArgument("the prompt tokenizes to nothing")
        if len(ids) > limit:
            raise InvalidArgument(f"prompt is {len(ids)} tokens; this cluster serves at most "
                                  f"{limit} prompt tokens (max_model_len "
                                  f"{self.model.max_model_len})")
        return ids

    async def lookup_prefix(self, token_ids: list[int]) -> dict[str, int]:
        """One round trip to the index: leading cached blocks per live prefill worker."""
        hashes = chain_hashes(token_ids, self.model.block_size)
        if not hashes:
            return {}
        if self.index_in_process:  # in memory and touched only on this loop
            return self.index.longest_prefix(hashes)
        return await asyncio.to_thread(self.index.longest_prefix, hashes)

    async def generate(self, request: pdserve_pb2.GenerateRequest
                       ) -> AsyncGenerator[pdserve_pb2.GenerateResponse, None]:
        """One request, start to end, for any front end: deltas then a final message, or
        RouterError. Cancelling the consumer (client gone, deadline) aborts the request on
        its workers, which frees its blocks."""
        arrival = time.monotonic()
        if self.draining:
            self.metrics.rejected.labels("unavailable").inc()
            raise RouterError(grpc.StatusCode.UNAVAILABLE,
                              "this router is draining for shutdown; retry on another")
        try:
            req = parse_generate_request(request, served_model=self.model.name,
                                         new_request_id=self.new_request_id)
            token_ids = self.tokenize(req)
        except InvalidArgument as e:
            self.metrics.rejected.labels("invalid_argument").inc()
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        hits = await self.lookup_prefix(token_ids)
        info = RequestInfo(req.request_id, len(token_ids), self.model.block_size,
                           req.priority, req.ttft_slo_s, req.tpot_slo_s, arrival)
        try:
            self.slo.admit(info, hits)
        except Rejected as e:
            self.metrics.rejected.labels("resource_exhausted").inc()
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        run = _Run(req.request_id, arrival, len(token_ids), ttft_slo_s=req.ttft_slo_s,
                   tpot_slo_s=req.tpot_slo_s)
        self.metrics.running.inc()
        self._in_flight += 1
        clock = self.metrics.token_clock()
        try:
            async for response in self.serve(req, token_ids, info, hits, run):
                clock.sent(len(response.token_ids))
                yield response
        except Rejected as e:
            self.metrics.rejected.labels("resource_exhausted").inc()
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except RequestFailed as e:
            self.metrics.rejected.labels("unavailable").inc()
            raise RouterError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.cancelled.inc()
            raise
        finally:
            self.metrics.running.dec()
            self._in_flight -= 1
            if not run.done:
                self.abort_everywhere(run)

    async def serve(self, req: ParsedRequest, token_ids: list[int], info: RequestInfo,
                    hits: dict[str, int], run: _Run
                    ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        if self.colocated:
            async for response in self._serve_colocated(req, token_ids, info, hits, run):
                yield response
            return
        sampling = dataclasses.asdict(req.sampling)
        exclude: set[str] = set()  # decode workers that failed this request
        generated: list[int] = []  # tokens the client already has
        retries = {"transfer": 0, "migration": 0}
        segment_start = run.arrival
        while True:
            # A retry or migration continues the request: the prompt plus what was streamed
            # is prefilled again on a healthy pair and decoding picks up after it.
            prompt = token_ids + generated
            seg = {**sampling, "max_tokens": sampling["max_tokens"] - len(generated)}
            seg_info = dataclasses.replace(info, num_prompt_tokens=len(prompt))
            n = sum(retries.values())
            run.worker_rid = run.request_id if n == 0 else f"{run.request_id}#{n}"
            placement = await self.slo.acquire(seg_info, hits)
            run.prefill_id = placement.worker_id
            result: dict[str, Any] = {}
            try:
                run.decode_id, resv = await self._reserve_decode(
                    seg_info, prompt, seg, run.worker_rid, exclude,
                    self._prefill_tp[placement.worker_id])
                sent = time.monotonic()
                result = await self._prefill(placement, run.worker_rid, prompt, seg, resv)
                if result.get("finish_reason") == "abort" and not result.get("error"):
                    result["error"] = "the prefill worker aborted the request"
            finally:
                # Served: the first token came back (an exception leaves `result` empty).
                self.slo.release(placement,
                                 served="prefill_s" in result and not result.get("error"))
            if result.get("error"):
                self._abort_decode(run)
                if result.get("transfer_failed") and self._may_retry(req, run, retries,
                                                                     "transfer"):
                    log.warning("request %s: %s; retrying once on another decode worker",
                                run.request_id, result["error"])
                    exclude.add(run.decode_id)
                    segment_start = time.monotonic()  # the failed attempt is not queueing
                    continue
                raise RequestFailed(f"prefill on {placement.worker_id}: {result['error']}")
            run.transport = result["transport"]
            if not generated:
                run.cached_tokens = result["num_cached_tokens"]
                run.timing.ttft_ms = 1e3 * (time.monotonic() - run.arrival)
            run.timing.queued_ms += 1e3 * (sent - segment_start + result["queued_s"])
            run.timing.prefill_ms += 1e3 * result["prefill_s"]
            run.timing.transfer_ms += 1e3 * result["transfer_s"]
            generated += result["token_ids"]
            run.completion_tokens += len(result["token_ids"])
            if result["finished"]:  # the first token ended it: free the decode reservation
                self._abort_decode(run)
                yield self._final(run, result["finish_reason"], result["token_ids"],
                                  result["text"])
                return
            yield delta_response(run.request_id, result["token_ids"], result["text"])
            try:
                async for item in self._decode_stream(run):
                    if item.get("error"):
                        raise RequestFailed(f"decode on {run.decode_id}: {item['error']}")
                    generated += item["token_ids"]
                    response, last = self._relay(run, item)
                    if response is not None:
                        yield response
                    if last:
                        return
            except WorkerDied as e:
                if not self._may_retry(req, run, retries, "migration"):
                    raise RequestFailed(str(e)) from None
                log.warning("request %s: %s; migrating it (%d tokens streamed) to a healthy "
                            "pair", run.request_id, e, len(generated))
                exclude.add(run.decode_id)
                segment_start = time.monotonic()
                continue
            raise RequestFailed(f"decode stream from {run.decode_id} ended without a finish")

    def _may_retry(self, req: ParsedRequest, run: _Run, retries: dict[str, int],
                   kind: str) -> bool:
        """Once per kind. A migration re-prefills streamed tokens as prompt, which keeps the
        output the same only when sampling does not depend on the earlier draws: no seed and
        no presence/frequency penalties (those count output tokens only)."""
        sp = req.sampling
        if retries[kind] >= 1:
            return False
        if kind == "migration" and (sp.seed is not None or sp.presence_penalty
                                    or sp.frequency_penalty):
            return False
        retries[kind] += 1
        run.retries += 1
        self.metrics.retries.inc()
        return True

    async def _serve_colocated(self, req: ParsedRequest, token_ids: list[int],
                               info: RequestInfo, hits: dict[str, int], run: _Run
                               ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        """The baseline: one worker prefills and decodes; its prefill slot is held until the
        first token, like a prefill worker's."""
        import ray

        placement = await self.slo.acquire(info, hits)
        run.prefill_id = run.decode_id = placement.worker_id
        run.worker_rid = run.request_id
        sent = time.monotonic()
        released = False
        try:
            actor = self.prefill[placement.worker_id]
            refused = await actor.generate.remote(run.worker_rid, token_ids,
                                                  dataclasses.asdict(req.sampling))
            if refused is not None:
                raise RequestFailed(f"worker {placement.worker_id}: {refused['error']}")
            async for item in self._poll_items(actor, run.worker_rid):
                if item.get("error"):
                    raise RequestFailed(f"worker {placement.worker_id}: {item['error']}")
                if "prefill_s" in item:
                    run.cached_tokens = item["num_cached_tokens"]
                    run.timing.queued_ms = 1e3 * (sent - run.arrival + item["queued_s"])
                    run.timing.prefill_ms = 1e3 * item["prefill_s"]
                    run.timing.ttft_ms = 1e3 * (time.monotonic() - run.arrival)
                    self.slo.release(placement, served=True)
                    released = True
                response, last = self._relay(run, item)
                if response is not None:
                    yield response
                if last:
                    return
        except ray.exceptions.RayActorError as e:
            self._worker_died("prefill", placement.worker_id, e)
            raise RequestFailed(f"worker {placement.worker_id} died mid-request") from None
        finally:
            if not released:
                self.slo.release(placement)
        raise RequestFailed(f"stream from {placement.worker_id} ended without a finish")

    def _relay(self, run: _Run, item: dict[str, Any]
               ) -> tuple[pdserve_pb2.GenerateResponse | None, bool]:
        """A worker's stream item as the client's next message (None: nothing to say), and
        whether it was the last."""
        run.completion_tokens += len(item["token_ids"])
        if item["finished"]:
            run.timing.decode_ms = 1e3 * item.get("decode_s", 0.0)
            return self._final(run, item["finish_reason"], item["token_ids"], item["text"]), True
        if item["token_ids"] or item["text"]:
            return delta_response(run.request_id, item["token_ids"], item["text"]), False
        return None, False

    def _final(self, run: _Run, reason: str, token_ids=(), text: str = ""
               ) -> pdserve_pb2.GenerateResponse:
        run.done = True
        run.timing.e2e_ms = 1e3 * (time.monotonic() - run.arrival)
        response = final_response(
            run.request_id, finish_reason=reason, prompt_tokens=run.prompt_tokens,
            cached_tokens=run.cached_tokens, completion_tokens=run.completion_tokens,
            timing=run.timing, prefill_worker=run.prefill_id or "",
            decode_worker=run.decode_id or "", kv_transport=run.transport,
            retries=run.retries, token_ids=token_ids, text=text)
        self.metrics.observe_final(response.final, run.transport, run.ttft_slo_s,
                                   run.tpot_slo_s)
        return response

    async def _reserve_decode(self, info: RequestInfo, token_ids: list[int],
                              sampling: dict[str, Any], worker_rid: str,
                              exclude: set[str], src_tp: int = 1
                              ) -> tuple[str, dict[str, Any]]:
        import ray

        wait_until = (info.deadline if info.ttft_slo_s else
                      info.arrival + self.config.decode_wait_s)
        while True:
            candidates = self.slo.rank_decode(info, exclude)
            if not candidates and not (set(self.decode) - exclude):
                raise RequestFailed("no live decode worker")
            for wid in candidates:
                # Count the reservation before awaiting it, so that concurrent requests see
                # this worker's load and spread out; its reply then gives the true figures.
                self.slo.note_decode_reserved(wid, info.num_blocks)
                try:
                    r = await self.decode[wid].reserve.remote(
                        worker_rid, token_ids, sampling, self.config.kv_timeout_s, src_tp)
                except ray.exceptions.RayActorError as e:
                    self._worker_died("decode", wid, e)
                    continue
                self.slo.update_decode(wid, free_blocks=r["free_blocks"],
                                       num_running=r["num_running"])
                if "error" not in r:
                    return wid, r
                if r["error"] != "no_kv_space":
                    raise RequestFailed(f"decode worker {wid} refused: {r['error']}")
            if time.monotonic() >= wait_until:
                raise Rejected(f"no decode worker has room for {info.num_blocks} KV blocks")
            await asyncio.sleep(0.02)

    async def _prefill(self, placement: PrefillPlacement, worker_rid: str,
                       token_ids: list[int], sampling: dict[str, Any], resv: dict[str, Any]
                       ) -> dict[str, Any]:
        import ray

        actor = self.prefill[placement.worker_id]
        try:
            return await actor.prefill.remote(worker_rid, token_ids, sampling,
                                              resv["addresses"], resv["block_ids"])
        except ray.exceptions.RayActorError as e:
            self._worker_died("prefill", placement.worker_id, e)
            return {"error": f"prefill worker {placement.worker_id} died", "transfer_failed": True}
        except asyncio.CancelledError:
            actor.abort.remote(worker_rid)
            raise

    async def _decode_stream(self, run: _Run) -> AsyncIterator[dict[str, Any]]:
        import ray

        try:
            async for item in self._poll_items(self.decode[run.decode_id], run.worker_rid):
                yield item
        except ray.exceptions.RayActorError as e:
            self._worker_died("decode", run.decode_id, e)
            raise WorkerDied(f"decode worker {run.decode_id} died mid-stream") from None

    @staticmethod
    async def _poll_items(actor: Any, worker_rid: str) -> AsyncIterator[dict[str, Any]]:
        """A request's items from its worker (`next_items` long polls) until `finished`."""
        while True:
            for item in await actor.next_items.remote(worker_rid):
                yield item
                if item.get("finished"):
                    return

    def _abort_decode(self, run: _Run) -> None:
        if run.decode_id in self.decode:
            self.decode[run.decode_id].abort.remote(run.worker_rid)

    def abort_everywhere(self, run: _Run) -> None:
        """Client cancel/deadline or a failure: free whatever the request holds, both sides."""
        if run.prefill_id in self.prefill:
            self.prefill[run.prefill_id].abort.remote(run.worker_rid)
        if not self.colocated:
            self._abort_decode(run)

    # ---- workers -----------------------------------------------------------------------------

    def _worker_died(self, role: str, wid: str, error: BaseException) -> None:
        """Route around a dead worker at once; take it back if Ray restarts it."""
        pool = self.prefill if role == "prefill" else self.decode
        actor = pool.pop(wid, None)
        if actor is None:
            return
        log.error("%s worker %s is gone (%s); routing around it", role, wid,
                  type(error).__name__)
        if role == "prefill":
            self.slo.remove_prefill_worker(wid)
            self.index.unregister_worker(wid)
        else:
            self.slo.remove_decode_worker(wid)
        self._count_workers()
        if wid in self.followers:
            self._tasks.append(asyncio.create_task(self._replace_tp_worker(role, wid)))
        else:
            self._tasks.append(asyncio.create_task(self._await_restart(role, wid, actor)))

    async def _replace_tp_worker(self, role: str, wid: str) -> None:
        """A TP worker lost a rank: the launcher starts a fresh group; it rejoins once its
        rank 0 answers `ready` (which needs every rank's shards loaded)."""
        if self.replace_group is None:
            log.error("%s worker %s lost a tensor-parallel rank and nothing can replace it",
                      role, wid)
            return
        try:
            actor, followers = await asyncio.to_thread(self.replace_group, wid)
            info = await asyncio.wait_for(actor.ready.remote(), self.config.restart_wait_s)
        except Exception as e:  # noqa: BLE001 - any failure to start: the worker stays out
            log.error("%s worker %s could not be replaced: %s: %s", role, wid,
                      type(e).__name__, e)
            return
        self.followers[wid] = followers
        await self._rejoin(role, wid, actor, info)

    async def _await_restart(self, role: str, wid: str, actor: Any) -> None:
        """A restarted actor (max_restarts) answers `ready` again with a fresh engine."""
        import ray

        deadline = time.monotonic() + self.config.restart_wait_s
        while True:
            try:
                info = await asyncio.wait_for(actor.ready.remote(),
                                              max(0.1, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                if time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    continue
                error = "still unavailable"
            except ray.exceptions.RayActorError as e:  # dead for good (no restarts left)
                error = type(e).__name__
            except asyncio.TimeoutError:
                error = "timed out"
            log.error("%s worker %s did not come back (%s)", role, wid, error)
            return
        await self._rejoin(role, wid, actor, info)

    async def _rejoin(self, role: str, wid: str, actor: Any, info: dict[str, Any]) -> None:
        """Take a restarted or replaced worker back into its pool."""
        self._note_worker(role, wid, info)
        if role == "prefill":
            await self._connect_kv({wid: actor}, self._all_kv_addresses())
            self.prefill[wid] = actor
            self.slo.add_prefill_worker(wid)
            if self.index_in_process:
                self.index.register_worker(wid, {"role": "prefill"}, self.config.index_ttl_s)
        else:
            await self._connect_kv(self.prefill, info["addresses"])
            self.decode[wid] = actor
            self.slo.add_decode_worker(wid)
        self._count_workers()
        log.warning("%s worker %s restarted (pid %s) and is back in the pool", role, wid,
                    info.get("pid"))

    def _note_worker(self, role: str, wid: str, info: dict[str, Any]) -> None:
        """Record what routing needs from a worker's `ready` reply."""
        if self.colocated:
            return
        if role == "prefill":
            self._prefill_tp[wid] = info["tp_size"]
        else:
            self._kv_addresses[wid] = info["addresses"]

    def _all_kv_addresses(self) -> list[str]:
        return [a for addresses in self._kv_addresses.values() for a in addresses]

    async def _connect_kv(self, prefill: dict[str, Any], addresses: list[str]) -> None:
        """Have prefill workers open their KV connections to decode workers before traffic:
        the handshake then stays out of the first requests' TTFT (and out of the timing
        models fitted on it). A failure here is logged; the transfer itself retries."""
        import ray

        if not addresses:
            return
        replies = await asyncio.gather(*(a.connect_decode.remote(addresses)
                                         for a in prefill.values()), return_exceptions=True)
        for wid, reply in zip(prefill, replies):
            if isinstance(reply, ray.exceptions.RayError):
                log.warning("prefill worker %s could not pre-connect its KV links: %s", wid,
                            reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                for address, error in reply.items():
                    log.warning("prefill worker %s: KV link to %s: %s", wid, address, error)

    def _count_workers(self) -> None:
        self.metrics.workers.labels("colocated" if self.colocated else "prefill").set(
            len(self.prefill))
        if not self.colocated:
            self.metrics.workers.labels("decode").set(len(self.decode))

    async def _poll(self, role: str, wid: str, actor: Any, method: str) -> Any:
        """One heartbeat call; None when the worker is dead (and now routed around) or did
        not answer in time (left in place: a long step can delay it)."""
        import ray

        try:
            return await asyncio.wait_for(getattr(actor, method).remote(),
                                          self.config.heartbeat_timeout_s)
        except ray.exceptions.RayActorError as e:
            self._worker_died(role, wid, e)
        except asyncio.TimeoutError:
            log.warning("%s worker %s did not answer %s within %.0f s", role, wid, method,
                        self.config.heartbeat_timeout_s)
        return None

    async def _poll_followers(self) -> None:
        """A TP worker whose follower rank died is dead as a whole (its next step would fail,
        and an idle one would not notice): route around it now and have it replaced."""
        import ray

        for wid, followers in list(self.followers.items()):
            role = "decode" if wid in self.decode else "prefill"
            if wid not in self.decode and wid not in self.prefill:
                continue  # already out, being replaced
            replies = await asyncio.gather(*(asyncio.wait_for(
                f.alive.remote(), self.config.heartbeat_timeout_s) for f in followers),
                return_exceptions=True)
            dead = [r for r in replies if isinstance(r, ray.exceptions.RayActorError)]
            if dead:
                self._worker_died(role, wid, dead[0])

    async def _watch_workers(self) -> None:
        """Heartbeat every worker: decode load for placement, liveness of all, and (in-process
        index) the prefill workers' block events."""
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            self.metrics.waiting.set(self.slo.queue_length)
            decode = list(self.decode.items())
            stats = await asyncio.gather(*(self._poll("decode", w, a, "stats")
                                           for w, a in decode))
            for (wid, _), s in zip(decode, stats):
                if s is not None:
                    self.slo.update_decode(wid, free_blocks=s["free_blocks"],
                                           num_running=s["num_running"],
                                           step_s=s["step_s"] if s["steps"] else None)
            await self._poll_followers()
            prefill = list(self.prefill.items())
            method = "take_index_events" if self.index_in_process else "stats"
            replies = await asyncio.gather(*(self._poll("prefill", w, a, method)
                                             for w, a in prefill))
            if self.index_in_process:
                for (wid, _), events in zip(prefill, replies):
                    if events is not None:
                        self.index.heartbeat(wid, self.config.index_ttl_s)
                        self.index.publish(wid, events)


class _Service(pdserve_pb2_grpc.PDServeServicer):
    def __init__(self, router: Router):
        self.router = router

    async def generate_bytes(self, raw: bytes, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        from google.protobuf.message import DecodeError

        try:
            request = pdserve_pb2.GenerateRequest.FromString(raw)
        except DecodeError as e:
            self.router.metrics.rejected.labels("invalid_argument").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid pdserve.v1.GenerateRequest: {e}")
        async for response in self.Generate(request, context):
            yield response

    async def Generate(self, request: pdserve_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        try:
            self.router.authorize(dict(context.invocation_metadata()).get("authorization"))
            async for response in self.router.generate(request):
                yield response
        except RouterError as e:
            await context.abort(e.code, e.message)
