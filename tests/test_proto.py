"""The checked-in stubs are exactly what proto/pdserve.proto generates, and the messages
round-trip through the wire format with every field intact."""

from __future__ import annotations

import difflib
from importlib import metadata

import pytest

from pdserve_api import pdserve_pb2, pdserve_pb2_grpc
from pdserve_api.regenerate import GENERATED, PACKAGE, REPO, generate


def test_checked_in_stubs_match_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the [dev] extra) regenerates stubs")
    fresh = generate(tmp_path)
    problems = []
    for name in GENERATED:
        want, have = (fresh / name).read_bytes(), (REPO / PACKAGE / name)
        if not have.exists():
            problems.append(f"{PACKAGE}/{name} is missing")
        elif have.read_bytes() != want:
            diff = difflib.unified_diff(have.read_text().splitlines(), want.decode().splitlines(),
                                        f"checked-in {PACKAGE}/{name}", "regenerated",
                                        lineterm="", n=1)
            problems.append(f"{PACKAGE}/{name} differs:\n" + "\n".join(list(diff)[:30]))
    if problems:
        # A different grpcio-tools writes different bytes from the same .proto.
        tools = metadata.version("grpcio-tools")
        pinned = pdserve_pb2_grpc.GRPC_GENERATED_VERSION
        note = "" if tools == pinned else (
            f"\n(note: grpcio-tools {tools} is installed; the stubs were made by {pinned})")
        pytest.fail("stubs are out of date with proto/pdserve.proto; "
                    "run `python -m pdserve_api.regenerate`" + note + "\n\n"
                    + "\n\n".join(problems), pytrace=False)


def test_generate_is_server_streaming():
    method = pdserve_pb2.DESCRIPTOR.services_by_name["PDServe"].methods_by_name["Generate"]
    assert method.input_type.full_name == "pdserve.v1.GenerateRequest"
    assert method.output_type.full_name == "pdserve.v1.GenerateResponse"
    assert method.server_streaming and not method.client_streaming


def _full_request() -> pdserve_pb2.GenerateRequest:
    sampling = pdserve_pb2.SamplingParams(
        max_tokens=64, temperature=0.5, top_k=40, top_p=0.75, min_p=0.125, seed=2**40 + 7,
        repetition_penalty=1.25, presence_penalty=-0.5, frequency_penalty=0.25,
        stop_token_ids=[2, 7], stop=["\n\n", "</s>"], ignore_eos=True, skip_special_tokens=False)
    return pdserve_pb2.GenerateRequest(
        chat=pdserve_pb2.ChatMessages(messages=[
            pdserve_pb2.ChatMessage(role="system", content="Be brief."),
            pdserve_pb2.ChatMessage(role="user", content="héllo ✓")]),
        sampling=sampling, slo=pdserve_pb2.SLO(ttft_ms=250.0, tpot_ms=50.0), priority=-3,
        request_id="req-1.a:b_c", model="smollm2-135m")


def test_generate_request_round_trips():
    msg = _full_request()
    back = pdserve_pb2.GenerateRequest.FromString(msg.SerializeToString())
    assert back == msg
    assert back.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in back.chat.messages] == [
        ("system", "Be brief."), ("user", "héllo ✓")]
    s = back.sampling
    assert (s.max_tokens, s.temperature, s.top_k, s.top_p, s.min_p, s.seed) == (
        64, 0.5, 40, 0.75, 0.125, 2**40 + 7)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.25, -0.5, 0.25)
    assert list(s.stop_token_ids) == [2, 7] and list(s.stop) == ["\n\n", "</s>"]
    assert s.ignore_eos is True and s.skip_special_tokens is False
    assert (back.slo.ttft_ms, back.slo.tpot_ms, back.priority) == (250.0, 50.0, -3)
    assert (back.request_id, back.model) == ("req-1.a:b_c", "smollm2-135m")


def test_optional_sampling_fields_keep_presence_on_the_wire():
    # `optional` is what lets the router tell "temperature 0 (greedy)" from "not set".
    msg = pdserve_pb2.GenerateRequest(text="x", sampling=pdserve_pb2.SamplingParams(
        temperature=0.0, ignore_eos=False))
    back = pdserve_pb2.GenerateRequest.FromString(msg.SerializeToString())
    assert back.sampling.HasField("temperature") and back.sampling.HasField("ignore_eos")
    assert not back.sampling.HasField("max_tokens") and not back.sampling.HasField("seed")


@pytest.mark.parametrize("field,value", [("text", ""), ("token_ids", pdserve_pb2.TokenIds()),
                                         ("chat", pdserve_pb2.ChatMessages())])
def test_empty_input_still_selects_its_oneof_case(field, value):
    # The router must see "empty text", not "no input", to give the right error.
    msg = pdserve_pb2.GenerateRequest(**{field: value})
    assert pdserve_pb2.GenerateRequest.FromString(msg.SerializeToString()).WhichOneof(
        "input") == field


def test_generate_response_round_trips():
    timing = pdserve_pb2.PhaseTiming(queued_ms=1.25, prefill_ms=30.5, transfer_ms=0.375,
                                     decode_ms=120.0, ttft_ms=35.0, e2e_ms=160.125)
    final = pdserve_pb2.FinalInfo(finish_reason="length", prompt_tokens=12, cached_tokens=8,
                                  completion_tokens=20, timing=timing, prefill_worker="prefill-0",
                                  decode_worker="decode-1", kv_transport="ucx", retries=1)
    msg = pdserve_pb2.GenerateResponse(request_id="r", token_ids=[5, 6, 2**31 - 1],
                                       text="end ✓", final=final)
    back = pdserve_pb2.GenerateResponse.FromString(msg.SerializeToString())
    assert back == msg
    assert list(back.token_ids) == [5, 6, 2**31 - 1] and back.text == "end ✓"
    assert back.HasField("final") and back.final == final
    assert back.final.timing.e2e_ms == 160.125

    delta = pdserve_pb2.GenerateResponse(request_id="r", token_ids=[5], text="a")
    assert not pdserve_pb2.GenerateResponse.FromString(delta.SerializeToString()).HasField(
        "final")
