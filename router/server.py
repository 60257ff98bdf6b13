"""The router's front door: pdserve's gRPC service (DESIGN: "A request's path", steps 1-2).

`Router` serves gRPC (plus health checking and reflection, optional TLS/mTLS and API keys),
the OpenAI-compatible HTTP API (router/openai_http.py) and Prometheus metrics. Per request
(`Router.generate`, shared by both APIs): refuse while draining, validate and tokenize
(router/api.py, router/admission.py), ask the prefix index once which prefill worker holds
how much of the prompt, admit or reject early (router/slo.py), then hand the request as one
`RouterRequest` (router/request.py) to the request flow (router/flow.py). The pools live in
the pool manager (router/pool.py).

Contract: the caller of `generate` gets deltas then a final message, or a `RouterError`;
cancelling it (client gone, deadline) frees whatever the request holds on its workers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from pdserve_api import pdserve_pb2, pdserve_pb2_grpc
from pdserve_api.errors import InvalidRequestError
from pdserve_api.messages import InvalidArgument
from pdserve_api.worker_protocol import ReadyInfo
from prefix_index.interface import PrefixIndex
from router.admission import tokenize
from router.api import parse_generate_request
from router.auth import ApiKeys, AuthError
from router.config import ModelInfo, RouterConfig
from router.errors import RequestFailed, RouterError
from router.flow import RequestFlow
from router.metrics import RouterMetrics
from router.openai_http import OpenAIServer
from router.pool import Actor, ReplaceGroup, WorkerPool
from router.request import RouterRequest
from router.slo import Rejected, RequestInfo, SLOScheduler

log = logging.getLogger(__name__)

SERVICE_NAME = pdserve_pb2.DESCRIPTOR.services_by_name["PDServe"].full_name
Responses = AsyncGenerator[pdserve_pb2.GenerateResponse, None]


class Router:
    def __init__(self, model: ModelInfo, prefill: Mapping[str, Actor],
                 decode: Mapping[str, Actor], index: PrefixIndex,
                 config: RouterConfig | None = None, colocated: bool = False,
                 followers: Mapping[str, list[Actor]] | None = None,
                 replace_group: ReplaceGroup | None = None,
                 infos: Mapping[str, ReadyInfo] | None = None):
        self.model = model
        self.config = config or RouterConfig()
        self.metrics = RouterMetrics()
        self.slo = SLOScheduler(list(prefill), list(decode),
                                slots_per_worker=self.config.slots_per_prefill_worker,
                                max_queue=self.config.max_queue)
        self.pool = WorkerPool(prefill, decode, index, self.slo, self.metrics, self.config,
                               colocated=colocated, followers=followers,
                               replace_group=replace_group, infos=infos)
        self.flow = RequestFlow(self.pool, self.slo, self.metrics, self.config)
        self.api_keys = (ApiKeys.from_file(self.config.api_keys_file)
                         if self.config.api_keys_file else None)
        self._ids = itertools.count()
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.http: OpenAIServer | None = None
        self.http_port = 0
        self._metrics_server: WSGIServer | None = None
        self.metrics_port = 0
        self.draining = False
        self._in_flight = 0

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    metrics_port: int | None = None, http_port: int | None = None) -> int:
        """Serve gRPC on host:port (0 = a free port); returns the bound port. With
        metrics_port, Prometheus metrics on host:metrics_port/metrics; with http_port, the
        OpenAI-compatible API (router/openai_http.py) on host:http_port."""
        server = self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.config.max_message_bytes)])
        # Registered by hand so that the request arrives as bytes: an undecodable message is
        # the client's error (INVALID_ARGUMENT), not gRPC's "Unexpected DecodeError" (UNKNOWN).
        service = _Service(self)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Generate": grpc.unary_stream_rpc_method_handler(
                service.generate_bytes,
                response_serializer=pdserve_pb2.GenerateResponse.SerializeToString)}),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        tls = self._tls_files()
        bound: int
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            cert, key, ca = tls
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                 require_client_auth=ca is not None)
            bound = server.add_secure_port(f"{host}:{port}", creds)
        if bound == 0:
            raise OSError(f"could not bind the router to {host}:{port}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.pool.start()
        if http_port is not None:
            self.http = OpenAIServer(self)
            c = self.config
            tls_paths = None
            if tls is not None and c.tls_cert_file and c.tls_key_file:  # as _tls_files read
                tls_paths = (c.tls_cert_file, c.tls_key_file, c.tls_client_ca_file)
            self.http_port = await self.http.start(host, http_port, tls_paths)
        if metrics_port is not None:
            self._metrics_server, _ = start_http_server(metrics_port, host,
                                                        registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        log.info("router serving on %s:%d (%d prefill, %d decode workers, index %s)", host,
                 bound, len(self.pool.prefill), len(self.pool.decode),
                 type(self.pool.index).__name__)
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
        self.pool.stop()
        if self.server is not None:
            await self.server.stop(0.5)
        if self.http is not None:
            await self.http.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def _tls_files(self) -> tuple[bytes, bytes, bytes | None] | None:
        c = self.config
        if not c.tls_cert_file and not c.tls_key_file:
            if c.tls_client_ca_file:
                raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
            return None
        if not (c.tls_cert_file and c.tls_key_file):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        ca = Path(c.tls_client_ca_file).read_bytes() if c.tls_client_ca_file else None
        return Path(c.tls_cert_file).read_bytes(), Path(c.tls_key_file).read_bytes(), ca

    # ---- one request -------------------------------------------------------------------------

    def authorize(self, authorization: str | None) -> str | None:
        """The caller's key name (None without key checking), or RouterError:
        UNAUTHENTICATED for a missing/unknown key, RESOURCE_EXHAUSTED over its rate."""
        if self.api_keys is None:
            return None
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

    async def generate(self, request: pdserve_pb2.GenerateRequest) -> Responses:
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
            token_ids = tokenize(req, self.model, self.config)
        except (InvalidArgument, InvalidRequestError) as e:
            self.metrics.rejected.labels("invalid_argument").inc()
            raise RouterError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        hits = await self.pool.lookup_prefix(token_ids, self.model.block_size)
        info = RequestInfo(req.request_id, len(token_ids), self.model.block_size,
                           req.priority, req.ttft_slo_s, req.tpot_slo_s, arrival)
        try:
            self.slo.admit(info, hits)
        except Rejected as e:
            self.metrics.rejected.labels("resource_exhausted").inc()
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        rr = RouterRequest(req, token_ids, info, hits, arrival)
        self.metrics.running.inc()
        self._in_flight += 1
        clock = self.metrics.token_clock()
        try:
            async for response in self.flow.serve(rr):
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
            if not rr.done:
                self.flow.abort_everywhere(rr)


class _Service(pdserve_pb2_grpc.PDServeServicer):
    def __init__(self, router: Router):
        self.router = router

    async def generate_bytes(self, raw: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
                             ) -> Responses:
        try:
            request = pdserve_pb2.GenerateRequest.FromString(raw)
        except DecodeError as e:
            self.router.metrics.rejected.labels("invalid_argument").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid pdserve.v1.GenerateRequest: {e}")
        async for response in self.Generate(request, context):
            yield response

    async def Generate(self, request: pdserve_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext[bytes, bytes]) -> Responses:
        try:
            self.router.authorize(dict(context.invocation_metadata() or ()).get("authorization"))
            async for response in self.router.generate(request):
                yield response
        except RouterError as e:
            await context.abort(e.code, e.message)
