"""OpenAI-compatible HTTP front end, served by the router beside gRPC (aiohttp, same loop).

    POST /v1/completions         prompt: string, [string], or token ids ([int] / [[int]])
    POST /v1/chat/completions    messages with string or text-part content
    GET  /v1/models, /health, /metrics
    GET  /v1/timing_profile      the router's learnt timing models (`pdserve profile
                                 --from-cluster`; router/timing_profile.py format)

Both POST routes stream as server-sent events with `"stream": true` (ending `data: [DONE]`;
`stream_options.include_usage` adds a usage chunk) or answer one JSON body. A body becomes a
`GenerateRequest` and runs through `Router.generate`, exactly like a gRPC call, so validation,
SLO scheduling and cancellation are the same: a client that disconnects, streaming or not,
cancels its request (the handler task is cancelled, or a write to the gone client fails, and
the request's generator is closed), which aborts it on its workers; a stream that ran to its
final message is read to its end, so it is never counted as cancelled. pdserve extensions in the
body: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `priority`, `ttft_ms`, `tpot_ms`.
Responses add a `pdserve` key: `tokens` per stream chunk, and on the last chunk (or the JSON
body) `final` with the per-phase timing and placement of the gRPC final message.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad request
(any body that cannot be read as JSON: a bad content encoding, an unknown charset, nesting too
deep to parse), 413 body too large, 429 overloaded (with Retry-After), 503 no healthy worker.
Framing errors aiohttp's HTTP parser rejects before a handler runs (a Content-Length that is not
a number, bytes left over after a short one) get its own plain-text 400.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from pdserve_api import pdserve_pb2
from pdserve_api.messages import InvalidArgument, build_generate_request
from router.errors import RouterError

if TYPE_CHECKING:  # router/server.py imports this module to serve it
    from router.server import Router

Responses = AsyncGenerator[pdserve_pb2.GenerateResponse, None]

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
}
RETRY_AFTER_S = "1"
# OpenAI body field -> pdserve SamplingParams field (None: same name).
SAMPLING_FIELDS = {"temperature": None, "top_p": None, "top_k": None, "min_p": None,
                   "seed": None, "presence_penalty": None, "frequency_penalty": None,
                   "repetition_penalty": None, "ignore_eos": None, "stop": None,
                   "skip_special_tokens": None}
UNSUPPORTED = {"logprobs": None, "echo": False, "suffix": None, "tools": None,
               "functions": None, "logit_bias": None, "best_of": 1, "top_logprobs": None,
               "response_format": None}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_response(status: int, kind: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _router_error(e: RouterError) -> web.Response:
    status, kind = HTTP_STATUS.get(e.code, (500, "internal_error"))
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return error_response(status, kind, e.message, headers=headers)


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

    async def models(self, request: web.Request) -> web.Response:
        try:
            self.router.authorize(request.headers.get("Authorization"))
        except RouterError as e:
            return _router_error(e)
        name = self.router.model.name
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
             "max_model_len": self.router.model.max_model_len}]})

    async def timing_profile(self, request: web.Request) -> web.Response:
        """The router's learnt timing models as a profile (router/timing_profile.py), for
        `pdserve profile --from-cluster`."""
        try:
            self.router.authorize(request.headers.get("Authorization"))
        except RouterError as e:
            return _router_error(e)
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
        try:
            self.router.authorize(request.headers.get("Authorization"))
        except RouterError as e:
            return _router_error(e)
        try:
            body = await _read_json(request)
        except web.HTTPRequestEntityTooLarge as e:
            return error_response(413, "invalid_request_error", e.text or "body too large")
        except BadRequest as e:
            bad = error_response(400, "invalid_request_error", str(e), e.param)
            bad.force_close()  # what follows an unreadable body on this connection is suspect
            return bad
        try:
            msg, stream, include_usage = self._to_request(body, chat)
        except BadRequest as e:
            return error_response(400, "invalid_request_error", str(e), e.param)
        self._ids += 1
        oid = f"{'chatcmpl' if chat else 'cmpl'}-{self._ids}-{time.time_ns() % 10**9}"
        # Closing the generator early (an error, a disconnect) aborts the request everywhere.
        async with contextlib.aclosing(self.router.generate(msg)) as responses:
            if stream:
                return await self._stream(request, responses, oid, chat, include_usage)
            return await self._collect(responses, oid, chat)

    def _to_request(self, body: Any, chat: bool
                    ) -> tuple[pdserve_pb2.GenerateRequest, bool, bool]:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        for key, default in UNSUPPORTED.items():
            if body.get(key, default) not in (default, None):
                raise BadRequest(f"{key} is not supported by pdserve", key)
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", "n")
        sampling: dict[str, Any] = {}
        for key, ours in SAMPLING_FIELDS.items():
            if body.get(key) is not None:
                sampling[ours or key] = body[key]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            sampling["max_tokens"] = max_tokens
        elif not chat:
            sampling["max_tokens"] = 16  # OpenAI's completions default
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        kwargs: dict[str, Any] = {"sampling": sampling, "model": _str(body, "model"),
                                  "priority": body.get("priority", 0),
                                  "ttft_ms": body.get("ttft_ms", 0),
                                  "tpot_ms": body.get("tpot_ms", 0)}
        if chat:
            kwargs["chat"] = _messages(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0],
                                                                           (str, list)):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str):
                kwargs["text"] = prompt
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                kwargs["token_ids"] = prompt
            else:
                raise BadRequest("prompt must be a string or a list of token ids (batches of "
                                 "more than one prompt are not supported)", "prompt")
        try:
            msg = build_generate_request(**kwargs)
        except (InvalidArgument, TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
        return msg, stream, bool(options.get("include_usage", False))

    async def _collect(self, responses: Responses, oid: str, chat: bool) -> web.Response:
        text: list[str] = []
        final: pdserve_pb2.FinalInfo | None = None
        try:
            async for r in responses:
                text.append(r.text)
                if r.HasField("final"):
                    final = r.final
        except RouterError as e:
            return _router_error(e)
        if final is None:  # the router ends every stream with one; a bug otherwise
            raise RuntimeError(f"{oid}: the request's stream ended without a final message")
        content = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": final.finish_reason,
                                  "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return web.json_response({
            "id": oid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.router.model.name,
            "choices": [choice], "usage": _usage(final),
            "pdserve": {"final": _pdserve_final(final)}})

    async def _stream(self, request: web.Request, responses: Responses, oid: str,
                      chat: bool, include_usage: bool) -> web.StreamResponse:
        created, model = int(time.time()), self.router.model.name
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "finish_reason": finish,
                          "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            out = {"id": oid, "object": kind, "created": created, "model": model,
                   "choices": [choice]}
            if extra:
                out["pdserve"] = extra
            return out

        # Pull the first message before committing to a 200: admission errors become a plain
        # HTTP error (429/400) that clients can retry on.
        it = responses.__aiter__()
        try:
            first = await it.__anext__()
        except RouterError as e:
            return _router_error(e)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            await resp.write(f"data: {data}\n\n".encode())

        msg, is_first = first, True
        try:
            while True:
                if msg.text or msg.token_ids or is_first:
                    await send(chunk(msg.text, None, first=is_first,
                                     extra={"tokens": len(msg.token_ids)}))
                    is_first = False
                if msg.HasField("final"):
                    async for _ in it:  # the generator ends after its final message
                        pass
                    await send(chunk(None, msg.final.finish_reason,
                                     extra={"final": _pdserve_final(msg.final)}))
                    if include_usage:
                        await send({"id": oid, "object": kind, "created": created,
                                    "model": model, "choices": [],
                                    "usage": _usage(msg.final)})
                    break
                msg = await it.__anext__()
            await send("[DONE]")
            await resp.write_eof()
        except RouterError as e:
            status, kind_ = HTTP_STATUS.get(e.code, (500, "internal_error"))
            with contextlib.suppress(ConnectionResetError):
                await send({"error": {"message": e.message, "type": kind_, "param": None,
                                      "code": status}})
                await send("[DONE]")
                await resp.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream: the caller closes the generator, a cancel.
            log.info("%s: client disconnected mid-stream; cancelling", oid)
        return resp


async def _read_json(request: web.Request) -> Any:
    """The body as JSON; BadRequest saying why it cannot be read (never an internal error)."""
    try:
        raw = await request.read()
    except RequestPayloadError:  # a Content-Encoding the body is not in
        encoding = request.headers.get("Content-Encoding", "")
        raise BadRequest(f"the body is not {encoding or 'in its Content-Encoding'}") from None
    charset = request.charset or "utf-8"
    try:
        text = raw.decode(codecs.lookup(charset).name)
    except LookupError:
        raise BadRequest(f"unknown charset {charset!r}") from None
    except UnicodeError as e:
        raise BadRequest(f"the body is not valid {charset}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("the body is not valid JSON: nested too deeply") from None


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key) or ""
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", key)
    return value


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", "messages")
        content = m.get("content")
        if isinstance(content, list):  # text parts; other part types are not supported
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                     "messages")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or text parts",
                             "messages")
        out.append({"role": str(m.get("role", "")), "content": content})
    return out


def _usage(final: pdserve_pb2.FinalInfo) -> dict[str, Any]:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens}}


def _pdserve_final(final: pdserve_pb2.FinalInfo) -> dict[str, Any]:
    """pdserve's extension to the OpenAI body (clients ignore unknown keys): the request's
    per-phase timing and placement, as the gRPC final message carries them."""
    t = final.timing
    return {"finish_reason": final.finish_reason, "prompt_tokens": final.prompt_tokens,
            "cached_tokens": final.cached_tokens,
            "completion_tokens": final.completion_tokens,
            "timing_ms": {"queued": t.queued_ms, "prefill": t.prefill_ms,
                          "transfer": t.transfer_ms, "decode": t.decode_ms, "ttft": t.ttft_ms,
                          "e2e": t.e2e_ms},
            "prefill_worker": final.prefill_worker, "decode_worker": final.decode_worker,
            "kv_transport": final.kv_transport, "retries": final.retries}
