"""The OpenAI-compatible HTTP front end against a live 1P+1D cluster (real Ray actors, real
sockets, the official `openai` client): a client that goes away cancels its request on both
workers, streaming or not; a completed stream is not a cancel; one request's hostile sampling
values do not touch the request beside it."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_helpers import ray_session, tiny_model, wait_idle

from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig

openai = pytest.importorskip("openai")

LONG = {"max_tokens": 400, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tiny_model(tmp_path_factory.mktemp("openai_http") / "llama", seed=5)
    cfg = ClusterConfig(model=str(path), start_redis=False, http_port=0,
                        engine={"num_kv_blocks": 96, "max_num_seqs": 8},
                        worker_num_cpus=0.25)
    with ray_session(), LocalCluster(cfg) as c:
        yield c


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.router.http_port}/v1",
                         api_key="unused", max_retries=0)


def sample(cluster, name: str) -> float:
    return cluster.router.metrics.registry.get_sample_value(f"pdserve:{name}") or 0.0


def wait_for(cond, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def released(cluster) -> None:
    """Nothing running at the router, and every block back on both workers."""
    wait_for(lambda: sample(cluster, "num_requests_running") == 0, "running back to 0")
    wait_idle(cluster)


def test_streaming_client_that_disconnects_cancels_its_request(cluster):
    cancelled = sample(cluster, "requests_cancelled_total")
    stream = client(cluster).completions.create(model="", prompt=list(range(5, 60)),
                                                stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the client goes away mid-stream
    released(cluster)
    assert sample(cluster, "requests_cancelled_total") == cancelled + 1


def test_non_streaming_client_that_disconnects_cancels_its_request(cluster):
    cancelled = sample(cluster, "requests_cancelled_total")
    body = json.dumps({"prompt": list(range(7, 70)), "max_tokens": 400, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", cluster.router.http_port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: sample(cluster, "num_requests_running") == 1, "the request to run")
    released(cluster)  # the socket closed before the answer
    assert sample(cluster, "requests_cancelled_total") == cancelled + 1


def test_completed_requests_are_not_counted_as_cancelled(cluster):
    cancelled = sample(cluster, "requests_cancelled_total")
    c = client(cluster)
    for chat in (False, True):
        kw = {"model": "", "max_tokens": 4, "stream": True, "extra_body": {"ignore_eos": True}}
        if chat:
            chunks = list(c.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], **kw))
        else:
            chunks = list(c.completions.create(prompt="hi", **kw))
        assert chunks[-1].choices[0].finish_reason == "length"
    c.completions.create(model="", prompt="hi", max_tokens=2)
    released(cluster)
    assert sample(cluster, "requests_cancelled_total") == cancelled


def test_vanishing_temperature_beside_a_well_formed_request(cluster):
    """temperature=1e-40 passes validation; it used to overflow the sampler and the failed
    step aborted its batch mate too. Both now finish, the first as greedy."""
    c = client(cluster)
    prompt = list(range(11, 50))

    def run(temperature: float) -> tuple[str, str | None]:
        got = c.completions.create(model="", prompt=prompt, max_tokens=24,
                                   temperature=temperature,
                                   extra_body={"ignore_eos": True})
        return got.choices[0].text, got.choices[0].finish_reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, [1e-40, 0.7, 1e-40, 0.0]))
    assert [reason for _, reason in results] == ["length"] * 4
    assert results[0][0] == results[2][0] == results[3][0]  # greedy
    released(cluster)


# ---- the OpenAI surface: model names, error shape, ranges, lists of prompts -----------------


def served(cluster) -> str:
    return cluster.router.model.name


def test_unknown_model_is_404_model_not_found(cluster):
    c = client(cluster)
    for create in (lambda: c.completions.create(model="no-such", prompt="hi", max_tokens=2),
                   lambda: c.chat.completions.create(
                       model="no-such", messages=[{"role": "user", "content": "hi"}],
                       max_tokens=2),
                   lambda: c.models.retrieve("no-such")):
        with pytest.raises(openai.NotFoundError) as err:
            create()
        assert err.value.code == "model_not_found"
        assert err.value.body["type"] == "invalid_request_error"
        assert "no-such" in err.value.body["message"]
    got = c.models.retrieve(served(cluster))  # the id may hold slashes (a checkpoint path)
    assert (got.id, got.object) == (served(cluster), "model")
    assert [m.id for m in c.models.list().data] == [served(cluster)]
    # The served name, and the empty name (the served model, as over gRPC), both run.
    for model in (served(cluster), ""):
        assert c.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].text


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5), ("n", 2),
    ("n", 0)])
def test_values_outside_openais_ranges_get_400_naming_the_field(cluster, field, value):
    c = client(cluster)
    kw = {"model": "", "max_tokens": 2, field: value}
    for create in (lambda: c.completions.create(prompt="hi", **kw),
                   lambda: c.chat.completions.create(
                       messages=[{"role": "user", "content": "hi"}], **kw)):
        with pytest.raises(openai.BadRequestError) as err:
            create()
        body = err.value.body
        assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", field,
                                                               None)
        assert field in body["message"]
    if (field, value) == ("n", 2):
        assert "not supported yet" in body["message"]


def test_the_ends_of_openais_ranges_are_served(cluster):
    c = client(cluster)
    for kw in ({"temperature": 2.0, "top_p": 1.0}, {"temperature": 0.0, "top_p": 1e-6},
               {"n": 1}):
        got = c.completions.create(model="", prompt="hi", max_tokens=2, **kw)
        assert got.choices[0].finish_reason in ("length", "stop")


def test_error_codes_are_strings_or_null(cluster):
    """Every error body this front end writes: bad JSON, bad field, unknown model, auth-free
    routes; `code` never the HTTP status."""
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{cluster.router.http_port}/v1"
    bodies = [b"{not json", json.dumps({"prompt": 5}).encode(),
              json.dumps({"prompt": "hi", "model": "x"}).encode(),
              json.dumps({"prompt": [10**9]}).encode()]  # outside the vocabulary
    statuses = []
    for body in bodies:
        req = urllib.request.Request(f"{base}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        error = json.load(err.value)["error"]
        assert error["code"] is None or isinstance(error["code"], str), error
        statuses.append(err.value.code)
    assert statuses == [400, 400, 404, 400]


PROMPTS = {"text": ["The quick brown fox", "hello there", "a b c d e f g"],
           "token ids": [list(range(5, 30)), list(range(40, 52)), [7, 8, 9, 10, 11, 12, 13]]}


@pytest.mark.parametrize("kind", list(PROMPTS))
def test_a_list_of_prompts_gets_one_choice_each_as_greedy_as_alone(cluster, kind):
    c = client(cluster)
    prompts = PROMPTS[kind]
    kw = {"model": "", "max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [c.completions.create(prompt=p, **kw) for p in prompts]
    want = [a.choices[0].text for a in alone]

    got = c.completions.create(prompt=prompts, **kw)
    assert [ch.index for ch in got.choices] == [0, 1, 2]
    assert [ch.text for ch in got.choices] == want
    assert [ch.finish_reason for ch in got.choices] == ["length"] * 3
    assert got.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert got.usage.completion_tokens == 30

    chunks = list(c.completions.create(prompt=prompts, stream=True,
                                       stream_options={"include_usage": True}, **kw))
    texts, finish = ["", "", ""], [None, None, None]
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.text
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == want and finish == ["length"] * 3
    assert chunks[-1].usage.completion_tokens == 30
    released(cluster)


def test_a_client_that_leaves_cancels_every_prompt_of_its_list(cluster):
    c = client(cluster)
    prompts = [list(range(5, 40)), list(range(50, 70)), list(range(80, 95))]
    cancelled = sample(cluster, "requests_cancelled_total")
    stream = c.completions.create(model="", prompt=prompts, stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 6:
            break
    stream.close()
    released(cluster)
    assert sample(cluster, "requests_cancelled_total") == cancelled + 3

    body = json.dumps({"prompt": prompts, "max_tokens": 400, "temperature": 0,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", cluster.router.http_port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: sample(cluster, "num_requests_running") == 3, "the requests to run")
    released(cluster)
    assert sample(cluster, "requests_cancelled_total") == cancelled + 6


def test_one_bad_prompt_fails_its_whole_list(cluster):
    """The good prompt beside a bad one is cancelled (wherever it stands, its decode
    reservation included) and the body gets the bad one's 400."""
    cancelled = sample(cluster, "requests_cancelled_total")
    with pytest.raises(openai.BadRequestError) as err:
        client(cluster).completions.create(model="", prompt=[list(range(5, 40)), [10**9]],
                                           **LONG)
    assert "vocabulary" in err.value.body["message"]
    released(cluster)
    assert sample(cluster, "requests_cancelled_total") == cancelled + 1
