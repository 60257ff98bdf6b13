"""Conversions between the public gRPC messages (pdserve_api) and the router's internal types.

Contract: `parse_generate_request` is the only place a client's `GenerateRequest` is validated
field by field; anything it lets through is well-formed except what needs the model (token id
range, prompt length vs max_model_len), which the router checks after tokenizing. Every
rejection is an `InvalidArgument` whose message names the field, for `INVALID_ARGUMENT`.
The builders (`build_generate_request`, `final_response`, `delta_response`) are what the router
server, clients and tests use to write messages, so field names live in one module.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve_api import pdserve_pb2

CHAT_ROLES = ("system", "user", "assistant", "tool")
FINISH_REASONS = ("stop", "length", "abort")
KV_TRANSPORTS = ("ucx", "tcp", "local", "none")
MAX_REQUEST_ID_LEN = 128
PRIORITY_RANGE = (-100, 100)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")

# proto `optional` scalars of SamplingParams; the repeated ones (stop, stop_token_ids) have no
# presence and count as set when non-empty.
_SAMPLING_OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                      "repetition_penalty", "presence_penalty", "frequency_penalty",
                      "ignore_eos", "skip_special_tokens")
_SAMPLING_FLOATS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty",
                              "presence_penalty", "frequency_penalty"})
_SAMPLING_REPEATED = ("stop_token_ids", "stop")


class InvalidArgument(ValueError):
    """A request the router rejects with INVALID_ARGUMENT; the message names the field and why."""


@dataclass
class ParsedRequest:
    """A validated `GenerateRequest` in the router's terms (read by the router's scheduler)."""

    request_id: str
    prompt: str | list[dict] | list[int]  # text, chat [{"role", "content"}], or token ids
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


def _parse_input(msg: pdserve_pb2.GenerateRequest) -> str | list[dict] | list[int]:
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
    for name in _SAMPLING_OPTIONAL:
        if sp.HasField(name):
            value = getattr(sp, name)
            kwargs[name] = _from_f32(value) if name in _SAMPLING_FLOATS else value
    for name in _SAMPLING_REPEATED:
        if getattr(sp, name):
            kwargs[name] = list(getattr(sp, name))
    try:
        return SamplingParams(**kwargs)
    except InvalidRequestError as e:
        raise InvalidArgument(str(e)) from None


def sampling_to_proto(sp: SamplingParams) -> pdserve_pb2.SamplingParams:
    """Every field explicitly set (seed only when given), so the server's defaults cannot
    silently differ from the client's."""
    if sp.logprobs is not None:
        raise InvalidArgument("sampling.logprobs: not supported by the gRPC API")
    msg = pdserve_pb2.SamplingParams()
    for name in _SAMPLING_OPTIONAL:
        value = getattr(sp, name)
        if value is not None:
            setattr(msg, name, value)
    msg.stop_token_ids.extend(sp.stop_token_ids)
    msg.stop.extend(sp.stop)
    return msg


def _sampling_from_dict(d: Mapping[str, Any]) -> pdserve_pb2.SamplingParams:
    # Not validated here on purpose: tests send out-of-range values to check the server's
    # INVALID_ARGUMENT. Only the given keys are set; the rest stay unset (server defaults).
    known = set(_SAMPLING_OPTIONAL) | set(_SAMPLING_REPEATED)
    msg = pdserve_pb2.SamplingParams()
    for name, value in d.items():
        if name not in known:
            raise InvalidArgument(f"sampling.{name}: not a field of the gRPC SamplingParams "
                                  f"(fields: {', '.join(sorted(known))})")
        if name in _SAMPLING_REPEATED:
            # a bare string would otherwise be split into one stop string per character
            getattr(msg, name).extend([value] if isinstance(value, str) else value)
        elif value is not None:
            setattr(msg, name, value)
    return msg


def build_generate_request(*, text: str | None = None,
                           chat: Iterable[Mapping[str, str]] | None = None,
                           token_ids: Iterable[int] | None = None,
                           sampling: SamplingParams | Mapping[str, Any] | None = None,
                           ttft_ms: float = 0, tpot_ms: float = 0, priority: int = 0,
                           request_id: str = "", model: str = "") -> pdserve_pb2.GenerateRequest:
    """A `GenerateRequest` from exactly one of text / chat ([{"role", "content"}]) / token_ids.

    Content is not validated (an empty text or a bad role is sent as given), so tests can check
    the server's answer to bad input; `parse_generate_request` is the validator.
    """
    given = [name for name, v in (("text", text), ("chat", chat), ("token_ids", token_ids))
             if v is not None]
    if len(given) != 1:
        raise InvalidArgument(f"input: set exactly one of text, chat, token_ids (got {given})")
    msg = pdserve_pb2.GenerateRequest(slo=pdserve_pb2.SLO(ttft_ms=ttft_ms, tpot_ms=tpot_ms),
                                      priority=priority, request_id=request_id, model=model)
    if text is not None:
        msg.text = text
    elif chat is not None:
        msg.chat.SetInParent()  # an empty list still selects `chat` in the oneof
        msg.chat.messages.extend(pdserve_pb2.ChatMessage(role=m["role"], content=m["content"])
                                 for m in chat)
    else:
        msg.token_ids.SetInParent()
        msg.token_ids.ids.extend(token_ids)
    if isinstance(sampling, SamplingParams):
        msg.sampling.CopyFrom(sampling_to_proto(sampling))
    elif sampling is not None:
        msg.sampling.CopyFrom(_sampling_from_dict(sampling))
    return msg


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
