"""Conversions between the public gRPC messages (pdserve_api) and the router's internal types.

Contract: `parse_generate_request` is the only place a client's `GenerateRequest` is validated
field by field; anything it lets through is well-formed except what needs the model (token id
range, prompt length vs max_model_len), which the router checks after tokenizing. Every
rejection is an `InvalidArgument` whose message names the field, for `INVALID_ARGUMENT`.
The response builders (`final_response`, `delta_response`) are what the router writes; the
request builder clients use is `pdserve_api/messages.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pdserve_api import pdserve_pb2
from pdserve_api.errors import InvalidRequestError
from pdserve_api.messages import (
    SAMPLING_FLOATS,
    SAMPLING_OPTIONAL,
    SAMPLING_REPEATED,
    InvalidArgument,
)
from pdserve_api.sampling import SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")
FINISH_REASONS = ("stop", "length", "abort")
KV_TRANSPORTS = ("ucx", "tcp", "local", "none")
MAX_REQUEST_ID_LEN = 128
PRIORITY_RANGE = (-100, 100)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")

@dataclass
class ParsedRequest:
    """A validated `GenerateRequest` in the router's terms (read by the router's scheduler)."""

    request_id: str
    # text, chat [{"role", "content"}], or token ids
    prompt: str | list[dict[str, str]] | list[int]
    sampling: SamplingParams
    priority: int  # higher is served first
    ttft_slo_s: float | None  # None: no target
    tpot_slo_s: float | None


def _from_f32(x: float) -> float:
    # proto `float` is 32-bit, so 0.7 arrives as 0.699999988...; take the shortest decimal that
    # encodes to the same float32, i.e. the number the client wrote, so a request means the same
    # over gRPC as in process.
    return float(str(np.float32(x))) if math.isfinite(x) else x


def parse_generate_request(msg: pdserve_pb2.GenerateRequest, *, served_model: str,
                           new_request_id: Callable[[], str]) -> ParsedRequest:
    """Validate `msg` and convert it; raises InvalidArgument naming the first bad field."""
    if msg.model and msg.model != served_model:
        raise InvalidArgument(f"model={msg.model!r}: this server serves {served_model!r} "
                              "(leave model empty to use it)")
    return ParsedRequest(
        request_id=_parse_request_id(msg.request_id) if msg.request_id else new_request_id(),
        prompt=_parse_input(msg),
        sampling=_parse_sampling(msg.sampling),
        priority=_parse_priority(msg.priority),
        ttft_slo_s=_parse_slo_ms("slo.ttft_ms", msg.slo.ttft_ms),
        tpot_slo_s=_parse_slo_ms("slo.tpot_ms", msg.slo.tpot_ms),
    )


def _parse_request_id(rid: str) -> str:
    if len(rid) > MAX_REQUEST_ID_LEN:
        raise InvalidArgument(f"request_id: {len(rid)} chars, at most {MAX_REQUEST_ID_LEN}")
    if not _REQUEST_ID_RE.fullmatch(rid):
        raise InvalidArgument(f"request_id={rid!r}: only letters, digits and . _ : - allowed")
    return rid


def _parse_input(msg: pdserve_pb2.GenerateRequest) -> str | list[dict[str, str]] | list[int]:
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input: set one of text, chat, token_ids")
    if kind == "text":
        if not msg.text:
            raise InvalidArgument("text: must not be empty")
        return msg.text
    if kind == "token_ids":
        if not msg.token_ids.ids:
            raise InvalidArgument("token_ids: must not be empty")
        return list(msg.token_ids.ids)
    if not msg.chat.messages:
        raise InvalidArgument("chat: must contain at least one message")
    chat = []
    for i, m in enumerate(msg.chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"chat.messages[{i}].role={m.role!r}: must be one of "
                                  f"{', '.join(CHAT_ROLES)}")
        if not m.content:
            raise InvalidArgument(f"chat.messages[{i}].content: must not be empty")
        chat.append({"role": m.role, "content": m.content})
    return chat


def _parse_priority(priority: int) -> int:
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        raise InvalidArgument(f"priority={priority}: must be in [{lo}, {hi}]")
    return priority


def _parse_slo_ms(name: str, ms: float) -> float | None:
    if not math.isfinite(ms) or ms < 0:
        raise InvalidArgument(f"{name}={ms!r}: must be a finite number >= 0 (0 = no target)")
    return _from_f32(ms) / 1000.0 if ms > 0 else None


def _parse_sampling(sp: pdserve_pb2.SamplingParams) -> SamplingParams:
    # Only fields the client set are passed, so unset ones keep SamplingParams' defaults.
    kwargs: dict[str, Any] = {}
    for name in SAMPLING_OPTIONAL:
        if sp.HasField(name):
            value = getattr(sp, name)
            kwargs[name] = _from_f32(value) if name in SAMPLING_FLOATS else value
    for name in SAMPLING_REPEATED:
        if getattr(sp, name):
            kwargs[name] = list(getattr(sp, name))
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as e:
        raise InvalidArgument(str(e)) from None


@dataclass
class PhaseTimes:
    """Per-phase breakdown in milliseconds; see `PhaseTiming` in proto/pdserve.proto."""

    queued_ms: float = 0.0
    prefill_ms: float = 0.0
    transfer_ms: float = 0.0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0

    def to_proto(self) -> pdserve_pb2.PhaseTiming:
        return pdserve_pb2.PhaseTiming(**{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_proto(cls, msg: pdserve_pb2.PhaseTiming) -> PhaseTimes:
        return cls(**{f.name: getattr(msg, f.name) for f in fields(cls)})


def final_response(request_id: str, *, finish_reason: str, prompt_tokens: int,
                   cached_tokens: int, completion_tokens: int, timing: PhaseTimes,
                   prefill_worker: str, decode_worker: str, kv_transport: str, retries: int,
                   token_ids: Iterable[int] = (), text: str = "") -> pdserve_pb2.GenerateResponse:
    """The last message of a stream; it may also carry the last tokens."""
    # Clients switch on these strings; a typo here (or an engine-internal reason such as
    # "prefilled") would leak through the public API unnoticed.
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason={finish_reason!r}: must be one of {FINISH_REASONS}")
    if kv_transport not in KV_TRANSPORTS:
        raise ValueError(f"kv_transport={kv_transport!r}: must be one of {KV_TRANSPORTS}")
    final = pdserve_pb2.FinalInfo(
        finish_reason=finish_reason, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
        completion_tokens=completion_tokens, timing=timing.to_proto(),
        prefill_worker=prefill_worker, decode_worker=decode_worker, kv_transport=kv_transport,
        retries=retries)
    return pdserve_pb2.GenerateResponse(request_id=request_id, token_ids=list(token_ids),
                                        text=text, final=final)


def delta_response(request_id: str, token_ids: Iterable[int],
                   text: str) -> pdserve_pb2.GenerateResponse:
    """New tokens (and their text) since the previous message of the stream."""
    return pdserve_pb2.GenerateResponse(request_id=request_id, token_ids=list(token_ids),
                                        text=text)
