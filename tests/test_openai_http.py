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

from launcher.cluster import ClusterConfig, LocalCluster

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
