"""Building the public API's request messages: what clients (the CLI, the load generator,
tests) use to write a `GenerateRequest`, so field names live in one module. The router's
validator (`router/api.py`) reads the same field lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pdserve_api import pdserve_pb2
from pdserve_api.sampling import SamplingParams

# proto `optional` scalars of SamplingParams; the repeated ones (stop, stop_token_ids) have no
# presence and count as set when non-empty.
SAMPLING_OPTIONAL = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                      "repetition_penalty", "presence_penalty", "frequency_penalty",
                      "ignore_eos", "skip_special_tokens")
SAMPLING_FLOATS = frozenset({"temperature", "top_p", "min_p", "repetition_penalty",
                              "presence_penalty", "frequency_penalty"})
SAMPLING_REPEATED = ("stop_token_ids", "stop")



class InvalidArgument(ValueError):
    """A request the router rejects with INVALID_ARGUMENT; the message names the field and why."""


def sampling_to_proto(sp: SamplingParams) -> pdserve_pb2.SamplingParams:
    """Every field explicitly set (seed only when given), so the server's defaults cannot
    silently differ from the client's."""
    if sp.logprobs is not None:
        raise InvalidArgument("sampling.logprobs: not supported by the gRPC API")
    msg = pdserve_pb2.SamplingParams()
    for name in SAMPLING_OPTIONAL:
        value = getattr(sp, name)
        if value is not None:
            setattr(msg, name, value)
    msg.stop_token_ids.extend(sp.stop_token_ids)
    msg.stop.extend(sp.stop)
    return msg


def _sampling_from_dict(d: Mapping[str, Any]) -> pdserve_pb2.SamplingParams:
    # Not validated here on purpose: tests send out-of-range values to check the server's
    # INVALID_ARGUMENT. Only the given keys are set; the rest stay unset (server defaults).
    known = set(SAMPLING_OPTIONAL) | set(SAMPLING_REPEATED)
    msg = pdserve_pb2.SamplingParams()
    for name, value in d.items():
        if name not in known:
            raise InvalidArgument(f"sampling.{name}: not a field of the gRPC SamplingParams "
                                  f"(fields: {', '.join(sorted(known))})")
        if name in SAMPLING_REPEATED:
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
