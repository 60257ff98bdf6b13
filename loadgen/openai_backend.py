"""The OpenAI-compatible HTTP API as a loadgen backend: `/v1/completions` for token-id and
text prompts, `/v1/chat/completions` for chat, streamed as server-sent events.

Against pdserve, each chunk's `pdserve.tokens` gives the exact token count and the last
chunk's `pdserve.final` the server-side phases. Against another OpenAI-compatible server a
chunk with text counts as one token and the server phases are absent (None, and left out of
the report).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from loadgen.backends import Backend
from loadgen.record import BackendError, ServerFinal, StreamEvent
from loadgen.workloads import RequestSpec

# HTTP status -> the gRPC status name the report counts errors by (one vocabulary).
STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND",
                413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


def to_body(spec: RequestSpec, model: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens,
                            "temperature": spec.temperature, "ignore_eos": spec.ignore_eos,
                            "stream": True, "stream_options": {"include_usage": True},
                            "priority": spec.priority, "ttft_ms": spec.ttft_ms,
                            "tpot_ms": spec.tpot_ms}
    if spec.chat is not None:
        return "chat/completions", {**body, "messages": spec.chat}
    prompt = spec.token_ids if spec.token_ids is not None else spec.text
    return "completions", {**body, "prompt": prompt}


def from_final(final: dict[str, Any], usage: dict[str, Any] | None) -> ServerFinal:
    t = final.get("timing_ms") or {}  # absent: not pdserve; every timing stays None
    usage = usage or {}
    return ServerFinal(
        finish_reason=final.get("finish_reason", ""),
        prompt_tokens=final.get("prompt_tokens", usage.get("prompt_tokens", 0)),
        cached_tokens=final.get("cached_tokens", 0),
        completion_tokens=final.get("completion_tokens", usage.get("completion_tokens", 0)),
        queue_ms=t.get("queued"), prefill_ms=t.get("prefill"),
        transfer_ms=t.get("transfer"), decode_ms=t.get("decode"),
        ttft_ms=t.get("ttft"), e2e_ms=t.get("e2e"),
        prefill_worker=final.get("prefill_worker", ""),
        decode_worker=final.get("decode_worker", ""),
        kv_transport=final.get("kv_transport", ""), retries=final.get("retries", 0))


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, address: str, *, connect_timeout_s: float = 10.0,
                 api_key: str | None = None):
        base = address if "://" in address else f"http://{address}"
        self.base = base.rstrip("/") + ("" if base.rstrip("/").endswith("/v1") else "/v1")
        self.connect_timeout_s = connect_timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session: aiohttp.ClientSession | None = None
        self.model = ""

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(headers=self.headers,
                                             connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self.session.get(f"{self.base}/models", timeout=aiohttp.ClientTimeout(
                    total=self.connect_timeout_s)) as r:
                r.raise_for_status()
                self.model = (await r.json())["data"][0]["id"]
        except (aiohttp.ClientError, TimeoutError, KeyError, IndexError) as e:
            await self.close()
            raise BackendError("UNAVAILABLE", f"cannot use the OpenAI API at {self.base}: "
                               f"{type(e).__name__}: {e}") from None

    async def stream(self, spec: RequestSpec,
                     timeout_s: float | None) -> AsyncIterator[StreamEvent]:
        if self.session is None:
            raise RuntimeError("OpenAIBackend.stream() before start() or after close()")
        path, body = to_body(spec, self.model)
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.post(f"{self.base}/{path}", json=body,
                                         timeout=timeout) as r:
                if r.status != 200:
                    text = await r.text()
                    raise BackendError(STATUS_NAMES.get(r.status, f"HTTP_{r.status}"),
                                       text[:500])
                final: dict[str, Any] | None = None
                finish: str | None = None
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise BackendError(STATUS_NAMES.get(err.get("code"), "UNAVAILABLE"),
                                           err.get("message", ""))
                    ext = chunk.get("pdserve", {})
                    final = ext.get("final", final)
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                        content = (choice.get("text")
                                   or (choice.get("delta") or {}).get("content"))
                        n = ext.get("tokens", 1 if content else 0)
                        if n:
                            yield StreamEvent(n)
                    if chunk.get("usage") is not None:  # the last chunk (include_usage)
                        yield StreamEvent(0, from_final(final or {"finish_reason": finish},
                                                        chunk["usage"]))
                        return
                if finish is not None:  # no usage chunk: end on what was said
                    yield StreamEvent(0, from_final(final or {"finish_reason": finish}, None))
                    return
                raise BackendError("UNAVAILABLE", "the stream ended without a finish reason")
        except (aiohttp.ClientError, TimeoutError) as e:
            code = "DEADLINE_EXCEEDED" if isinstance(e, TimeoutError) else "UNAVAILABLE"
            raise BackendError(code, f"{type(e).__name__}: {e}") from None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
