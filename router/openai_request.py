"""Reading an OpenAI request body (router/openai_http.py's front end): the raw bytes to JSON,
and the JSON to one `GenerateRequest` per prompt, with the checks the OpenAI API (and vLLM)
make before anything runs.

Contract: `read_json` and `parse_body` raise only `BadRequest`, which carries the HTTP status,
the offending field (`param`) and OpenAI's string `code` (or None) for the error body.
Validation that gRPC clients need too (ranges the sampler needs, prompt limits) stays in the
router (router/api.py); what is checked here is what the OpenAI API itself defines:
`temperature` in [0, 2], `top_p` in (0, 1], `n` (only 1 for now), the model name (404
`model_not_found`), and `prompt` as a string, token ids, or a list of either.
"""

from __future__ import annotations

import codecs
import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from pdserve_api import pdserve_pb2
from pdserve_api.messages import InvalidArgument, build_generate_request

# OpenAI body field -> pdserve SamplingParams field (None: same name).
SAMPLING_FIELDS = {"temperature": None, "top_p": None, "top_k": None, "min_p": None,
                   "seed": None, "presence_penalty": None, "frequency_penalty": None,
                   "repetition_penalty": None, "ignore_eos": None, "stop": None,
                   "skip_special_tokens": None}
UNSUPPORTED = {"logprobs": None, "echo": False, "suffix": None, "tools": None,
               "functions": None, "logit_bias": None, "best_of": 1, "top_logprobs": None,
               "response_format": None}
# OpenAI's documented ranges: (low, high, whether low itself is allowed).
RANGES = {"temperature": (0.0, 2.0, True), "top_p": (0.0, 1.0, False)}
# Each prompt of a body is its own request, all running at once; admission control bounds
# the work, this bounds the tasks one body can create before admission sees them.
MAX_PROMPTS = 128


class BadRequest(ValueError):
    """A body the front end refuses: HTTP `status`, the field at fault, OpenAI's `code`."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class OpenAIRequest:
    requests: list[pdserve_pb2.GenerateRequest]  # one per prompt, in choice order
    stream: bool
    include_usage: bool


async def read_json(request: web.Request) -> Any:
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


def model_not_found(model: str) -> BadRequest:
    return BadRequest(f"The model `{model}` does not exist.", "model", status=404,
                      code="model_not_found")


def parse_body(body: Any, *, chat: bool, served_model: str) -> OpenAIRequest:
    """One `GenerateRequest` per prompt (chat: one), or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    model = _str(body, "model")
    if model and model != served_model:  # empty: the served model, as over gRPC
        raise model_not_found(model)
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None):
            raise BadRequest(f"{key} is not supported by pdserve", key)
    _check_n(body.get("n"))
    sampling: dict[str, Any] = {}
    for key, ours in SAMPLING_FIELDS.items():
        if body.get(key) is not None:
            sampling[ours or key] = _in_range(key, body[key])
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    elif not chat:
        sampling["max_tokens"] = 16  # OpenAI's completions default
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    common: dict[str, Any] = {"sampling": sampling, "model": model,
                              "priority": body.get("priority", 0),
                              "ttft_ms": body.get("ttft_ms", 0),
                              "tpot_ms": body.get("tpot_ms", 0)}
    inputs = [{"chat": _messages(body.get("messages"))}] if chat else _prompts(body.get("prompt"))
    try:
        requests = [build_generate_request(**common, **one) for one in inputs]
    except (InvalidArgument, TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    return OpenAIRequest(requests, bool(body.get("stream", False)),
                         bool(options.get("include_usage", False)))


def _check_n(n: Any) -> None:
    if n is None or (type(n) is int and n == 1):
        return
    if type(n) is not int or n < 1:
        raise BadRequest(f"n={n!r}: must be a positive integer", "n")
    raise BadRequest(f"n={n}: more than one choice per prompt is not supported yet; "
                     "send n=1 (or the request n times)", "n")


def _in_range(key: str, value: Any) -> Any:
    if key not in RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # a wrong type is the router's to name (router/api.py)
    low, high, low_ok = RANGES[key]
    above_low = low <= value if low_ok else low < value
    if not (math.isfinite(value) and above_low and value <= high):
        bracket = "[" if low_ok else "("
        raise BadRequest(f"{key}={value}: must be in {bracket}{low:g}, {high:g}]", key)
    return value


def _prompts(prompt: Any) -> list[dict[str, Any]]:
    """`prompt` as build_generate_request inputs: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [{"text": prompt}]
    if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return [{"token_ids": prompt}]
    if isinstance(prompt, list) and prompt:
        if len(prompt) > MAX_PROMPTS:
            raise BadRequest(f"prompt: {len(prompt)} prompts, at most {MAX_PROMPTS} per "
                             "request", "prompt")
        if all(isinstance(p, str) for p in prompt):
            return [{"text": p} for p in prompt]
        if all(isinstance(p, list) and all(_is_token(t) for t in p) for p in prompt):
            return [{"token_ids": p} for p in prompt]
    raise BadRequest("prompt must be a string, a list of token ids, or a non-empty list of "
                     "either (one kind)", "prompt")


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


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
