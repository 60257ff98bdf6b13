"""router.api: what the router accepts from a GenerateRequest, what it rejects (naming the field),
and that the builders clients use produce messages the router reads back unchanged."""

from __future__ import annotations

import io
import socket
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.client import format_final, run_generate
from pdserve_api import pdserve_pb2
from pdserve_api.errors import InvalidRequestError
from pdserve_api.messages import InvalidArgument, build_generate_request, sampling_to_proto
from pdserve_api.sampling import SamplingParams
from router.api import (
    ParsedRequest,
    PhaseTimes,
    delta_response,
    final_response,
    parse_generate_request,
)

SERVED = "smollm2-135m-instruct"


def parse(msg: pdserve_pb2.GenerateRequest) -> ParsedRequest:
    # Through the wire format, as the server sees it.
    wire = pdserve_pb2.GenerateRequest.FromString(msg.SerializeToString())
    return parse_generate_request(wire, served_model=SERVED, new_request_id=lambda: "gen-1")


def req(**kw) -> pdserve_pb2.GenerateRequest:
    """A valid text request unless another input is given."""
    if not {"chat", "token_ids"} & kw.keys():
        kw.setdefault("text", "hello")
    return build_generate_request(**kw)


# --- valid requests convert exactly ---------------------------------------------------------

def test_text_request_with_defaults():
    p = parse(build_generate_request(text="Hello, world"))
    assert p == ParsedRequest(request_id="gen-1", prompt="Hello, world", sampling=SamplingParams(),
                              priority=0, ttft_slo_s=None, tpot_slo_s=None)


def test_chat_request_keeps_roles_and_order():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"},
            {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "{}"}]
    assert parse(build_generate_request(chat=chat)).prompt == chat


def test_token_ids_request():
    p = parse(build_generate_request(token_ids=[1, 15, 2**31 - 1, 0]))
    assert p.prompt == [1, 15, 2**31 - 1, 0]


def test_unset_sampling_fields_keep_engine_defaults():
    p = parse(build_generate_request(text="x", sampling={"max_tokens": 5, "temperature": 0.0}))
    assert p.sampling == SamplingParams(max_tokens=5, temperature=0.0)
    assert p.sampling.greedy  # an explicit 0 is "set", not "default 1.0"


def test_float32_sampling_values_come_back_as_the_decimal_sent():
    # proto floats are 32-bit; 0.7 must not turn into 0.699999988 on the way in.
    p = parse(build_generate_request(text="x", sampling={"temperature": 0.7, "top_p": 0.9,
                                                         "min_p": 0.05,
                                                         "repetition_penalty": 1.1}))
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.min_p,
            p.sampling.repetition_penalty) == (0.7, 0.9, 0.05, 1.1)


def test_slo_ms_to_seconds_and_zero_means_no_target():
    p = parse(build_generate_request(text="x", ttft_ms=250, tpot_ms=35.1))
    assert (p.ttft_slo_s, p.tpot_slo_s) == (0.25, 0.0351)
    p = parse(build_generate_request(text="x", ttft_ms=500))
    assert (p.ttft_slo_s, p.tpot_slo_s) == (0.5, None)


def test_request_id_kept_when_given_and_generated_when_empty():
    assert parse(req(request_id="client.7:a_b-C")).request_id == "client.7:a_b-C"
    assert parse(req(request_id="x" * 128)).request_id == "x" * 128
    assert parse(req()).request_id == "gen-1"


def test_model_may_be_empty_or_the_served_one():
    assert parse(req(model="")).prompt == "hello"
    assert parse(req(model=SERVED)).prompt == "hello"


@pytest.mark.parametrize("priority", [-100, 0, 100])
def test_priority_bounds_are_inclusive(priority):
    assert parse(req(priority=priority)).priority == priority


# --- invalid requests: InvalidArgument naming the field -------------------------------------

def _raw(**kw) -> pdserve_pb2.GenerateRequest:
    """A request built field by field, for what build_generate_request will not write."""
    return pdserve_pb2.GenerateRequest(**kw)


NAN, INF = float("nan"), float("inf")
BAD = [
    (_raw(), "input", "set one of text, chat, token_ids"),
    (_raw(text=""), "text", "empty"),
    (_raw(chat=pdserve_pb2.ChatMessages()), "chat", "at least one message"),
    (req(chat=[{"role": "robot", "content": "hi"}]), "chat.messages[0].role", "robot"),
    (req(chat=[{"role": "", "content": "hi"}]), "chat.messages[0].role", "one of system"),
    (req(chat=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]),
     "chat.messages[1].content", "empty"),
    (_raw(token_ids=pdserve_pb2.TokenIds()), "token_ids", "empty"),
    (req(model="llama-70b"), "model", SERVED),
    (req(ttft_ms=-1), "slo.ttft_ms", ">= 0"),
    (req(tpot_ms=NAN), "slo.tpot_ms", "finite"),
    (req(ttft_ms=INF), "slo.ttft_ms", "finite"),
    (req(request_id="x" * 129), "request_id", "at most 128"),
    (req(request_id="has space"), "request_id", "letters, digits"),
    (req(request_id="a/b"), "request_id", "letters, digits"),
    (req(request_id="é"), "request_id", "letters, digits"),
    (req(priority=101), "priority", "[-100, 100]"),
    (req(priority=-101), "priority", "[-100, 100]"),
    (req(sampling={"max_tokens": 0}), "max_tokens", ">= 1"),
    (req(sampling={"temperature": -0.5}), "temperature", "[0, 100]"),
    (req(sampling={"temperature": NAN}), "temperature", "[0, 100]"),
    (req(sampling={"top_k": -1}), "top_k", ">= 0"),
    (req(sampling={"top_p": 0.0}), "top_p", "(0, 1]"),
    (req(sampling={"min_p": 1.5}), "min_p", "[0, 1]"),
    (req(sampling={"repetition_penalty": 0.0}), "repetition_penalty", "(0, 10]"),
    (req(sampling={"presence_penalty": 2.5}), "presence_penalty", "[-2, 2]"),
    (req(sampling={"frequency_penalty": -INF}), "frequency_penalty", "[-2, 2]"),
    (req(sampling={"stop": ["ok", ""]}), "stop", "non-empty"),
    (req(sampling={"stop": ["s"] * 17}), "stop", "at most 16"),
    (req(sampling={"stop_token_ids": [3, -1]}), "stop_token_ids", "non-negative"),
]


@pytest.mark.parametrize("msg,field,why", BAD, ids=[f"{b[1]}:{b[2]}" for b in BAD])
def test_invalid_request_names_the_field(msg, field, why):
    with pytest.raises(InvalidArgument) as exc:
        parse(msg)
    assert str(exc.value).startswith(field) and why in str(exc.value), str(exc.value)


def test_sampling_error_message_is_the_engines():
    with pytest.raises(InvalidRequestError) as engine_err:
        SamplingParams(top_k=-3)
    with pytest.raises(InvalidArgument) as api_err:
        parse(req(sampling={"top_k": -3}))
    assert str(api_err.value) == str(engine_err.value)


def test_token_ids_range_is_left_to_the_router():
    # Only the router knows the vocabulary size; parsing passes ids through untouched.
    assert parse(build_generate_request(token_ids=[-5, 10**9])).prompt == [-5, 10**9]


# --- builders ------------------------------------------------------------------------------

@pytest.mark.parametrize("inputs", [{}, {"text": "a", "token_ids": [1]},
                                    {"text": "a", "chat": [], "token_ids": [1]}])
def test_build_needs_exactly_one_input(inputs):
    with pytest.raises(InvalidArgument, match="exactly one of text, chat, token_ids"):
        build_generate_request(**inputs)


def test_build_rejects_unknown_sampling_field():
    with pytest.raises(InvalidArgument, match="sampling.logprobs"):
        build_generate_request(text="x", sampling={"logprobs": 2})
    with pytest.raises(InvalidArgument, match="sampling.logprobs"):
        sampling_to_proto(SamplingParams(logprobs=2))


def test_build_with_sampling_dict_sets_only_given_fields():
    msg = build_generate_request(text="x", sampling={"max_tokens": 3, "stop": "END"})
    assert msg.sampling.HasField("max_tokens") and not msg.sampling.HasField("temperature")
    assert list(msg.sampling.stop) == ["END"]  # a bare string is one stop string


def test_build_writes_every_top_level_field():
    msg = build_generate_request(token_ids=[4, 5], ttft_ms=100, tpot_ms=20, priority=7,
                                 request_id="r1", model=SERVED)
    assert msg.WhichOneof("input") == "token_ids" and list(msg.token_ids.ids) == [4, 5]
    assert (msg.slo.ttft_ms, msg.slo.tpot_ms, msg.priority, msg.request_id, msg.model) == (
        100, 20, 7, "r1", SERVED)


def _decimals(lo: str, hi: str, places: int):
    # Decimals with at most 6 significant digits survive float32 exactly, as a client's
    # hand-written values do.
    return st.decimals(lo, hi, places=places, allow_nan=False).map(float)


@settings(max_examples=200, deadline=None)
@given(max_tokens=st.integers(1, 2**31 - 1), temperature=_decimals("0", "100", 3),
       top_k=st.integers(0, 2**31 - 1), top_p=_decimals("0.001", "1", 3),
       min_p=_decimals("0", "1", 4),
       seed=st.none() | st.integers(-(2**63), 2**63 - 1),
       repetition_penalty=_decimals("0.001", "10", 3), presence_penalty=_decimals("-2", "2", 4),
       frequency_penalty=_decimals("-2", "2", 4),
       stop_token_ids=st.lists(st.integers(0, 2**31 - 1), max_size=4),
       stop=st.lists(st.text(min_size=1, max_size=8), max_size=4),
       ignore_eos=st.booleans(), skip_special_tokens=st.booleans())
def test_sampling_params_round_trip_through_the_api(**kw):
    sp = SamplingParams(**kw)
    p = parse(build_generate_request(text="x", sampling=sp))
    assert p.sampling == sp, (asdict(p.sampling), asdict(sp))


def test_full_request_round_trip():
    sp = SamplingParams(max_tokens=64, temperature=0.8, top_k=50, top_p=0.95, seed=1234,
                        stop=["\n\n"], stop_token_ids=[2], ignore_eos=True)
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    msg = build_generate_request(chat=chat, sampling=sp, ttft_ms=300, tpot_ms=40, priority=-5,
                                 request_id="abc", model=SERVED)
    assert parse(msg) == ParsedRequest(request_id="abc", prompt=chat, sampling=sp, priority=-5,
                                       ttft_slo_s=0.3, tpot_slo_s=0.04)


# --- responses -----------------------------------------------------------------------------

TIMES = PhaseTimes(queued_ms=1.2, prefill_ms=30.1, transfer_ms=0.4, decode_ms=120.0,
                   ttft_ms=35.0, e2e_ms=160.2)


def _final(**over) -> pdserve_pb2.GenerateResponse:
    kw = {"finish_reason": "stop", "prompt_tokens": 12, "cached_tokens": 0,
          "completion_tokens": 20, "timing": TIMES, "prefill_worker": "prefill-0",
          "decode_worker": "decode-1", "kv_transport": "ucx", "retries": 0}
    return final_response("r9", **(kw | over))


def test_final_response_fields():
    msg = pdserve_pb2.GenerateResponse.FromString(
        _final(token_ids=[7, 2], text="!", cached_tokens=16, retries=1).SerializeToString())
    f = msg.final
    assert (msg.request_id, list(msg.token_ids), msg.text) == ("r9", [7, 2], "!")
    assert (f.finish_reason, f.prompt_tokens, f.cached_tokens, f.completion_tokens) == (
        "stop", 12, 16, 20)
    assert (f.prefill_worker, f.decode_worker, f.kv_transport, f.retries) == (
        "prefill-0", "decode-1", "ucx", 1)
    assert PhaseTimes.from_proto(f.timing) == TIMES  # proto doubles: exact


def test_final_response_without_tokens():
    msg = _final(finish_reason="abort", kv_transport="none")
    assert list(msg.token_ids) == [] and msg.text == "" and msg.final.finish_reason == "abort"


@pytest.mark.parametrize("over", [{"finish_reason": "prefilled"}, {"kv_transport": "rdma"}])
def test_final_response_rejects_values_outside_the_public_api(over):
    with pytest.raises(ValueError, match=next(iter(over))):
        _final(**over)


def test_delta_response_has_no_final():
    msg = delta_response("r9", [11, 12], "ab")
    assert (msg.request_id, list(msg.token_ids), msg.text) == ("r9", [11, 12], "ab")
    assert not msg.HasField("final")


# --- client helpers that need no server ----------------------------------------------------

def test_format_final_summary_line():
    assert format_final(_final().final) == (
        "[finish_reason=stop prompt=12 cached=0 completion=20 queued=1.2ms prefill=30.1ms "
        "transfer=0.4ms decode=120.0ms ttft=35.0ms e2e=160.2ms prefill_worker=prefill-0 "
        "decode_worker=decode-1 transport=ucx]")


def test_run_generate_names_the_address_when_nothing_listens():
    with socket.socket() as s:  # a port that was just free; nothing listens on it
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    out, err = io.StringIO(), io.StringIO()
    code = run_generate(address, prompt="hi", chat=False, sampling=SamplingParams(),
                        out=out, err=err)
    assert code == 1 and out.getvalue() == ""
    assert err.getvalue().startswith("pdserve: error: UNAVAILABLE:") and address in err.getvalue()
