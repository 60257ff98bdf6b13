"""Shaping what the OpenAI front end (router/openai_http.py) sends: error bodies, completion
bodies, stream chunks, usage and pdserve's `pdserve` extension key.

Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with OpenAI's own
values: `type` is "invalid_request_error" for a request at fault (400, 401, 404, 413),
"requests" with code "rate_limit_exceeded" for 429 (OpenAI's rate-limit body), and
"server_error" for 5xx; `code` is a string or null, never the HTTP status.
"""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web

from pdserve_api import pdserve_pb2
from router.errors import RouterError

# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "requests", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", None),
}
INTERNAL = (500, "server_error", None)
RETRY_AFTER_S = "1"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, *, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return web.json_response(error_body(message, kind, param, code), status=status,
                             headers=headers)


def router_error(e: RouterError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for how the router ended a request."""
    status, kind, code = HTTP_STATUS.get(e.code, INTERNAL)
    return status, error_body(e.message, kind, None, code)


def router_error_response(e: RouterError) -> web.Response:
    status, body = router_error(e)
    error = body["error"]
    return error_response(status, error["message"], kind=error["type"], code=error["code"])


def model_object(name: str, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": max_model_len}


def usage(finals: list[pdserve_pb2.FinalInfo]) -> dict[str, Any]:
    """Summed over a body's prompts, as OpenAI reports a batch."""
    prompt = sum(f.prompt_tokens for f in finals)
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in finals)}}


def pdserve_final(final: pdserve_pb2.FinalInfo) -> dict[str, Any]:
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


def completion_body(oid: str, *, chat: bool, model: str, created: int, texts: list[str],
                    finals: list[pdserve_pb2.FinalInfo]) -> dict[str, Any]:
    """The non-streaming answer: one choice per prompt, `index` its place in the body.
    `pdserve.final` is the request's final info, or a list in choice order for a batch."""
    choices = []
    for i, (text, final) in enumerate(zip(texts, finals, strict=True)):
        choice: dict[str, Any] = {"index": i, "finish_reason": final.finish_reason,
                                  "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    ext = [pdserve_final(f) for f in finals]
    return {"id": oid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": choices, "usage": usage(finals),
            "pdserve": {"final": ext[0] if len(ext) == 1 else ext}}


def chunk(oid: str, *, chat: bool, model: str, created: int, index: int, text: str | None,
          finish: str | None, first: bool = False,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stream chunk for choice `index`; `extra` becomes its `pdserve` key."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish,
                  "logprobs": None}
    out = {"id": oid, "object": chunk_kind(chat), "created": created, "model": model,
           "choices": [choice]}
    if extra:
        out["pdserve"] = extra
    return out


def chunk_kind(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"
