"""Hostile input against a live cluster: thousands of generated Generate requests, OpenAI HTTP
bodies and raw byte blobs. Every one gets a clear answer (a defined status, never an internal
error), no process dies, no KV block leaks, and the cluster serves a normal request after."""

from __future__ import annotations

import gzip
import json
import os
import socket
import urllib.error
import urllib.request
import zlib

import grpc
import pytest
from cluster_helpers import ray_session, tiny_model, wait_idle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.client import GenerateClient
from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig
from pdserve_api import pdserve_pb2
from router.config import RouterConfig

EXAMPLES = int(os.environ.get("PDSERVE_FUZZ_EXAMPLES", "1000"))
ALLOWED_GRPC = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tiny_model(tmp_path_factory.mktemp("fuzz") / "llama", seed=7)
    router = RouterConfig(max_output_tokens=8, max_prompt_tokens=200,
                          max_message_bytes=64 * 1024)
    cfg = ClusterConfig(model=str(path), start_redis=False, http_port=0, router=router,
                        engine={"num_kv_blocks": 64}, worker_num_cpus=0.25)
    with ray_session(), LocalCluster(cfg) as c:
        yield c


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 1.0, -1.0, 1e30]))
ints = st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-3, 12))


@st.composite
def generate_requests(draw) -> pdserve_pb2.GenerateRequest:
    msg = pdserve_pb2.GenerateRequest()
    which = draw(st.sampled_from(["text", "chat", "token_ids", "none"]))
    if which == "text":
        msg.text = draw(st.text(max_size=300))
    elif which == "chat":
        for _ in range(draw(st.integers(0, 3))):
            m = msg.chat.messages.add()
            m.role = draw(st.sampled_from(["user", "system", "assistant", "tool", "", "x"]))
            m.content = draw(st.text(max_size=80))
    elif which == "token_ids":
        msg.token_ids.ids.extend(draw(st.lists(ints, max_size=260)))
    sp = msg.sampling
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if draw(st.booleans()):
            setattr(sp, name, draw(floats))
    for name in ("max_tokens", "top_k"):
        if draw(st.booleans()):
            setattr(sp, name, draw(ints))
    if draw(st.booleans()):
        sp.seed = draw(st.integers(-2**63, 2**63 - 1))
    sp.stop.extend(draw(st.lists(st.text(max_size=300), max_size=20)))
    sp.stop_token_ids.extend(draw(st.lists(ints, max_size=4)))
    msg.slo.ttft_ms = draw(floats)
    msg.slo.tpot_ms = draw(floats)
    msg.priority = draw(ints)
    msg.request_id = draw(st.one_of(st.just(""), st.text(max_size=140)))
    msg.model = draw(st.sampled_from(["", "llama", "other"]))
    return msg


@st.composite
def plausible_requests(draw) -> pdserve_pb2.GenerateRequest:
    """Mostly well-formed requests with the odd bad field: they reach admission, scheduling
    and the workers, not just validation."""
    msg = pdserve_pb2.GenerateRequest()
    if draw(st.booleans()):
        msg.token_ids.ids.extend(draw(st.lists(st.integers(0, 330), min_size=1, max_size=40)))
    else:
        msg.text = draw(st.text(min_size=1, max_size=60))
    msg.sampling.max_tokens = draw(st.integers(0, 9))
    msg.sampling.temperature = draw(st.sampled_from([0.0, 0.7, 1.0, -0.5]))
    msg.sampling.ignore_eos = draw(st.booleans())
    msg.sampling.stop.extend(draw(st.lists(st.text(min_size=1, max_size=4), max_size=2)))
    msg.slo.ttft_ms = draw(st.sampled_from([0.0, 1.0, 5000.0]))
    msg.priority = draw(st.integers(-1, 1))
    return msg


def test_fuzzed_generate_requests_get_clear_statuses(cluster):
    seen: set[grpc.StatusCode] = set()
    with GenerateClient(cluster.address, timeout_s=60) as client:

        @FUZZ
        @given(st.one_of(plausible_requests(), generate_requests()))
        def one(msg):
            try:
                client.generate(msg)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert e.details(), "an error without a message"
            assert code in ALLOWED_GRPC, (code, msg)
            seen.add(code)

        one()
        channel = grpc.insecure_channel(cluster.address)
        raw = channel.unary_stream("/pdserve.v1.PDServe/Generate")  # bytes in, bytes out

        @FUZZ
        @given(st.binary(max_size=512))
        def blob(data):
            try:
                list(raw(data, timeout=30))
            except grpc.RpcError as e:  # undecodable or not, the client is told why
                assert e.code() in ALLOWED_GRPC, e
                assert e.details()

        blob()
        channel.close()
    assert grpc.StatusCode.INVALID_ARGUMENT in seen and grpc.StatusCode.OK in seen
    _still_serving(cluster)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=12), children, max_size=4), max_leaves=12)


@st.composite
def openai_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["completion", "chat", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    body = {"max_tokens": draw(st.one_of(ints, st.none(), st.text(max_size=3))),
            "temperature": draw(st.one_of(st.floats(-5, 5), st.none(), st.text(max_size=2))),
            "stream": draw(st.booleans()),
            "stop": draw(st.one_of(st.none(), st.text(max_size=5),
                                   st.lists(st.text(max_size=5), max_size=20)))}
    if kind == "completion":
        body["prompt"] = draw(st.one_of(st.text(max_size=100), st.lists(ints, max_size=30),
                                        json_values))
    else:
        body["messages"] = draw(st.one_of(
            st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "bogus"]),
                                            "content": st.one_of(st.text(max_size=40),
                                                                 json_values)}), max_size=3),
            json_values))
    body.update(draw(st.dictionaries(st.sampled_from(
        ["n", "logprobs", "echo", "model", "stream_options", "top_p", "seed", "priority"]),
        json_values, max_size=3)))
    return json.dumps(body, allow_nan=False).encode()


def test_fuzzed_openai_bodies_get_clear_http_errors(cluster):
    base = f"http://127.0.0.1:{cluster.router.http_port}/v1"
    seen: set[int] = set()

    @FUZZ
    @given(st.sampled_from(["completions", "chat/completions"]), openai_bodies())
    def one(path, body):
        req = urllib.request.Request(f"{base}/{path}", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, payload = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
            error = json.loads(payload)["error"]  # the OpenAI error shape, always
            assert error["message"] and error["type"]
            assert error["code"] is None or isinstance(error["code"], str), error
        # 404: a fuzzed model name this server does not serve
        assert status in (200, 400, 404, 429), (status, body, payload[:300])
        seen.add(status)

    one()
    assert 400 in seen
    _still_serving(cluster)


def _post_raw(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """One POST written byte by byte (urllib would fix Content-Length and the encoding); the
    status and body of the first response, read until the server closes."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    data = (f"POST /v1/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{head}\r\n"
            .encode("latin-1") + body)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks)
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _openai_error(payload: bytes) -> dict:
    error = json.loads(payload)["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error
    return error


VALID = json.dumps({"prompt": [5, 6, 7], "max_tokens": 2}).encode()
MALFORMED = {
    "nested 30000 deep": ({}, b"[" * 30_000 + b"]" * 30_000),
    "charset that does not exist": ({"Content-Type": "application/json; charset=no-such"}, VALID),
    "gzip that is not gzip": ({"Content-Encoding": "gzip"}, VALID),
    "deflate that is not deflate": ({"Content-Encoding": "deflate"}, VALID),
    "utf-8 that is not": ({"Content-Type": "application/json; charset=utf-8"}, b'{"p": "\xff"}'),
    "Content-Length shorter than the body": ({"Content-Length": "5"}, VALID[:20]),
}


# aiohttp's HTTP parser refuses some framing with its own plain-text 400 before any handler
# runs: bytes left over after a short Content-Length, an encoding it has no decoder for (br,
# zstd), and a compressed body that arrived with its headers and does not decompress (one that
# arrives later reaches the handler, which answers in the OpenAI shape).
PARSER_MAY_REJECT = {"gzip that is not gzip", "deflate that is not deflate",
                     "Content-Length shorter than the body"}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_http_bodies_get_400_in_the_openai_shape(cluster, case):
    headers, body = MALFORMED[case]
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    status, payload = _post_raw(cluster.router.http_port, "completions", body, headers)
    assert status == 400, payload[:300]
    if case not in PARSER_MAY_REJECT or payload.startswith(b"{"):
        _openai_error(payload)


CHARSETS = ["utf-8", "UTF-8", "utf-16", "latin-1", "ascii", "no-such", "utf-7", "", "\u00e9"]
ENCODINGS = ["", "identity", "gzip", "deflate", "br", "zstd", "x-unknown", "gzip, gzip"]

COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}


@st.composite
def http_requests(draw) -> tuple[dict[str, str], bytes, bool]:
    """A body with fuzzed headers: charset (and whether the body is really in it), content
    encoding (and whether the body is really encoded), and a Content-Length that may be too
    short. Returns (headers, body, whether the framing is honest)."""
    text = json.dumps({"prompt": draw(st.text(max_size=20)), "max_tokens": 2})
    charset = draw(st.sampled_from(CHARSETS))
    try:
        body = text.encode(charset) if draw(st.booleans()) else text.encode()
    except (LookupError, UnicodeError):
        body = text.encode()
    if draw(st.booleans()):
        body = draw(st.binary(max_size=60))
    encoding = draw(st.sampled_from(ENCODINGS))
    if encoding in COMPRESS and draw(st.booleans()):
        body = COMPRESS[encoding](body)
    headers = {"Content-Type": "application/json" + (f"; charset={charset}" if charset else "")}
    if encoding:
        headers["Content-Encoding"] = encoding
    honest = draw(st.booleans()) or not body
    headers["Content-Length"] = str(len(body) if honest else draw(st.integers(0, len(body) - 1)))
    return headers, body, honest


def test_fuzzed_http_headers_get_clear_http_errors(cluster):
    port, seen = cluster.router.http_port, set()

    @FUZZ
    @given(st.sampled_from(["completions", "chat/completions"]), http_requests())
    def one(path, request):
        headers, body, honest = request
        status, payload = _post_raw(port, path, body, headers)
        assert status in (200, 400, 429), (status, headers, body, payload[:300])
        parser_may_reject = not honest or "Content-Encoding" in headers
        if status != 200 and not (parser_may_reject and not payload.startswith(b"{")):
            _openai_error(payload)
        seen.add(status)

    one()
    assert {200, 400} <= seen
    _still_serving(cluster)


def _still_serving(cluster) -> None:
    """No process died, no block leaked, and a normal request is served."""
    from pdserve_api.messages import build_generate_request
    from pdserve_api.sampling import SamplingParams

    with GenerateClient(cluster.address) as client:
        ok = client.generate(build_generate_request(
            token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=3, temperature=0.0,
                                                         ignore_eos=True)))
    assert ok.final.completion_tokens == 3
    wait_idle(cluster)
