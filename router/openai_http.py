"""OpenAI-compatible HTTP front end, served by the router beside gRPC (aiohttp, same loop).

    POST /v1/completions         prompt: string, [string], token ids ([int]) or [[int]]
    POST /v1/chat/completions    messages with string or text-part content
    GET  /v1/models, /v1/models/{id}, /health, /metrics
    GET  /v1/timing_profile      the router's learnt timing models (`pdserve profile
                                 --from-cluster`; router/timing_profile.py format)

Both POST routes stream as server-sent events with `"stream": true` (ending `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk) or answer one JSON body. A body becomes one
`GenerateRequest` per prompt (router/openai_request.py), each run through `Router.generate`
exactly like a gRPC call, so validation, SLO scheduling and cancellation are the same. A list of
prompts runs concurrently, one choice per prompt (`index` its place in the list), usage summed;
if any prompt fails, the others are cancelled and the body gets that error. A client that
disconnects, streaming or not, cancels every request of its body (the handler task is
cancelled, or a write to the gone client fails, and each request's generator is closed), which
aborts them on their workers; a request that ran to its final message is read to its end, so it
is never counted as cancelled. pdserve extensions in the body: `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `priority`, `ttft_ms`, `tpot_ms`. Responses add a `pdserve`
key: `tokens` per stream chunk, and on each choice's last chunk (or the JSON body) `final` with
the per-phase timing and placement of the gRPC final message (router/openai_response.py).

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} (`code` a string or
null): 400 bad request (any body that cannot be read as JSON: a bad content encoding, an
unknown charset, nesting too deep to parse; a value out of OpenAI's range), 404
`model_not_found` for a model this server does not serve, 413 body too large, 429 overloaded
(with Retry-After), 503 no healthy worker. Framing errors aiohttp's HTTP parser rejects before a
handler runs (a Content-Length that is not a number, bytes left over after a short one) get its
own plain-text 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdserve_api import pdserve_pb2
from router.errors import RouterError
from router.openai_request import BadRequest, model_not_found, parse_body, read_json
from router.openai_response import (
    chunk,
    chunk_kind,
    completion_body,
    error_response,
    model_object,
    pdserve_final,
    router_error,
    router_error_response,
    usage,
)

if TYPE_CHECKING:  # router/server.py imports this module to serve it
    from router.server import Router

Responses = AsyncGenerator[pdserve_pb2.GenerateResponse, None]
# A body's requests merged into one stream: (choice index, message) in arrival order.
Merged = AsyncGenerator[tuple[int, pdserve_pb2.GenerateResponse], None]

log = logging.getLogger(__name__)


class OpenAIServer:
    def __init__(self, router: Router):
        self.router = router
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._ids = 0

    async def start(self, host: str, port: int,
                    tls: tuple[str, str, str | None] | None = None) -> int:
        """`tls`: (cert PEM path, key PEM path, client CA PEM path or None)."""
        app = web.Application(client_max_size=self.router.config.max_message_bytes)
        app.add_routes([
            web.post("/v1/completions", self.completions),
            web.post("/v1/chat/completions", self.chat_completions),
            web.get("/v1/models", self.models),
            # model ids may hold slashes (a checkpoint path, "org/name")
            web.get("/v1/models/{model:.+}", self.model),
            web.get("/v1/timing_profile", self.timing_profile),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
        ])
        # handler_cancellation: a client that disconnects cancels its handler, which is how a
        # non-streaming request (nothing written until the end) learns its client is gone.
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        ssl_context = None
        if tls is not None:
            cert, key, ca = tls
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(cert, key)
            if ca:
                ssl_context.load_verify_locations(ca)
                ssl_context.verify_mode = ssl.CERT_REQUIRED
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # ---- simple routes -----------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> web.Response | None:
        """None if the caller may proceed, else the error to answer with."""
        try:
            self.router.authorize(request.headers.get("Authorization"))
        except RouterError as e:
            return router_error_response(e)
        return None

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        m = self.router.model
        return web.json_response({"object": "list",
                                  "data": [model_object(m.name, m.max_model_len)]})

    async def model(self, request: web.Request) -> web.Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        m, wanted = self.router.model, request.match_info["model"]
        if wanted != m.name:
            e = model_not_found(wanted)
            return error_response(e.status, str(e), param=e.param, code=e.code)
        return web.json_response(model_object(m.name, m.max_model_len))

    async def timing_profile(self, request: web.Request) -> web.Response:
        """The router's learnt timing models as a profile (router/timing_profile.py), for
        `pdserve profile --from-cluster`."""
        if (denied := self._authorize(request)) is not None:
            return denied
        profile = self.router.slo.export_profile(model=self.router.model.name,
                                                 block_size=self.router.model.block_size)
        return web.Response(text=profile.to_json(), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        ok = self.router.pool.healthy()
        return web.json_response({"status": "ok" if ok else "no healthy workers"},
                                 status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.router.metrics.exposition(),
                            content_type="text/plain", charset="utf-8")

    # ---- generation --------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if (denied := self._authorize(request)) is not None:
            return denied
        try:
            body = await read_json(request)
        except web.HTTPRequestEntityTooLarge as e:
            return error_response(413, e.text or "body too large")
        except BadRequest as e:
            bad = error_response(e.status, str(e), param=e.param, code=e.code)
            bad.force_close()  # what follows an unreadable body on this connection is suspect
            return bad
        try:
            parsed = parse_body(body, chat=chat, served_model=self.router.model.name)
        except BadRequest as e:
            return error_response(e.status, str(e), param=e.param, code=e.code)
        self._ids += 1
        oid = f"{'chatcmpl' if chat else 'cmpl'}-{self._ids}-{time.time_ns() % 10**9}"
        shape = _Shape(oid, chat, self.router.model.name, int(time.time()))
        # Closing the merged stream early (an error, a disconnect) cancels every request of
        # the body, which aborts it everywhere.
        gens = [self.router.generate(msg) for msg in parsed.requests]
        async with contextlib.aclosing(_merge(gens)) as merged:
            if parsed.stream:
                return await _stream(request, merged, len(gens), shape, parsed.include_usage)
            return await _collect(merged, len(gens), shape)


class _Shape:
    """What every chunk and body of one response repeats."""

    def __init__(self, oid: str, chat: bool, model: str, created: int):
        self.oid, self.chat, self.model, self.created = oid, chat, model, created

    def chunk(self, index: int, text: str | None, finish: str | None, first: bool = False,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return chunk(self.oid, chat=self.chat, model=self.model, created=self.created,
                     index=index, text=text, finish=finish, first=first, extra=extra)


async def _merge(gens: list[Responses]) -> Merged:
    """The requests of one body run concurrently, their messages merged as (index, message);
    the first RouterError (or bug) of any request is raised here. Each request is read to its
    end, so one that finished is never counted as cancelled; closing this generator cancels
    every request still running. A single request is driven here directly, so closing this
    generator closes it where it stands (at a yield, as a gRPC cancel does), with no task
    in between."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as gen:
            async for msg in gen:
                yield 0, msg
        return
    queue: asyncio.Queue[tuple[int, pdserve_pb2.GenerateResponse | Exception | None]] = (
        asyncio.Queue())

    async def pump(index: int, gen: Responses) -> None:
        try:
            async with contextlib.aclosing(gen):
                async for msg in gen:
                    queue.put_nowait((index, msg))
        except Exception as e:  # handed to the consumer, which cancels the rest
            queue.put_nowait((index, e))
            return
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect(merged: Merged, n: int, shape: _Shape) -> web.Response:
    texts: list[list[str]] = [[] for _ in range(n)]
    finals: list[pdserve_pb2.FinalInfo | None] = [None] * n
    try:
        async for i, r in merged:
            texts[i].append(r.text)
            if r.HasField("final"):
                finals[i] = r.final
    except RouterError as e:
        return router_error_response(e)
    done = [f for f in finals if f is not None]
    if len(done) != n:  # the router ends every stream with one; a bug otherwise
        raise RuntimeError(f"{shape.oid}: a request's stream ended without a final message")
    return web.json_response(completion_body(
        shape.oid, chat=shape.chat, model=shape.model, created=shape.created,
        texts=["".join(t) for t in texts], finals=done))


async def _stream(request: web.Request, merged: Merged, n: int, shape: _Shape,
                  include_usage: bool) -> web.StreamResponse:
    # Pull every request's first message before committing to a 200: admission errors become
    # a plain HTTP error (429/400) that clients can retry on.
    it = merged.__aiter__()
    early: list[tuple[int, pdserve_pb2.GenerateResponse]] = []
    try:
        while len({i for i, _ in early}) < n:
            early.append(await it.__anext__())
    except RouterError as e:
        return router_error_response(e)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await resp.write(f"data: {data}\n\n".encode())

    async def messages() -> Merged:
        for item in early:
            yield item
        async for item in it:
            yield item

    started: set[int] = set()
    finals: list[pdserve_pb2.FinalInfo] = []
    try:
        async for i, msg in messages():
            first = i not in started
            if msg.text or msg.token_ids or first:
                await send(shape.chunk(i, msg.text, None, first=first,
                                       extra={"tokens": len(msg.token_ids)}))
                started.add(i)
            if msg.HasField("final"):
                finals.append(msg.final)
                await send(shape.chunk(i, None, msg.final.finish_reason,
                                       extra={"final": pdserve_final(msg.final)}))
        if include_usage:
            await send({"id": shape.oid, "object": chunk_kind(shape.chat),
                        "created": shape.created, "model": shape.model, "choices": [],
                        "usage": usage(finals)})
        await send("[DONE]")
        await resp.write_eof()
    except RouterError as e:
        with contextlib.suppress(ConnectionResetError):
            await send(router_error(e)[1])
            await send("[DONE]")
            await resp.write_eof()
    except ConnectionResetError:
        # The client went away mid-stream: the caller closes the merged stream, a cancel.
        log.info("%s: client disconnected mid-stream; cancelling", shape.oid)
    return resp
