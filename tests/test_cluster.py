"""The disaggregated cluster end to end: real Ray actors, real gRPC over sockets, a real
redis-server started here, UCX loopback where ucxx imports (else TCP).

Oracle: the colocated engine on the same tiny checkpoint (greedy). Leaks: every worker's
block accounting (`check_integrity`) and free-block count once requests are done.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from cluster_helpers import ray_session as ray_session_cm
from cluster_helpers import tiny_model, wait_idle
from redis_server import REDIS_SERVER, SKIP_REASON, start_redis_server, stop_redis_server

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.hashing import chain_hashes
from launcher.client import GenerateClient
from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig
from pdserve_api.messages import build_generate_request
from pdserve_api.sampling import SamplingParams
from router.config import RouterConfig

ENGINE = {"num_kv_blocks": 96, "max_num_seqs": 16, "max_num_batched_tokens": 256}
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("cluster") / "llama", seed=3)


@pytest.fixture(scope="module")
def ray_session():
    with ray_session_cm():
        yield


def make_cluster(model_dir, num_prefill=1, num_decode=1, **kw) -> LocalCluster:
    engine = {**ENGINE, **kw.pop("engine", {})}
    cfg = ClusterConfig(model=str(model_dir), num_prefill=num_prefill, num_decode=num_decode,
                        engine=engine, worker_num_cpus=0.25, **kw)
    return LocalCluster(cfg)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.choice([5, 17, 40, 70, 130]))]
            for _ in range(n)]


def colocated(model_dir, token_prompts, sampling=GREEDY) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE))
    return [o.new_token_ids for o in engine.generate(token_prompts, sampling)]


def run_all(address: str, requests) -> list:
    with GenerateClient(address) as client, ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(client.generate, requests))


@pytest.fixture(scope="module")
def cluster22(model_dir, ray_session, tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    port, proc = start_redis_server(tmp_path_factory.mktemp("redis22"))
    cluster = make_cluster(model_dir, 2, 2, redis_url=f"redis://127.0.0.1:{port}/0",
                           metrics_port=0, http_port=0)
    cluster.start()
    yield cluster
    cluster.stop()
    stop_redis_server(proc)


@pytest.mark.parametrize("topology", ["1P+1D", "2P+2D", "2 colocated"])
def test_greedy_output_matches_colocated(topology, model_dir, ray_session, request):
    token_prompts = prompts(8, seed=1)
    expected = colocated(model_dir, token_prompts)
    if topology == "1P+1D":
        cluster = make_cluster(model_dir, 1, 1, start_redis=False)  # in-process index
        cluster.start()
    elif topology == "2 colocated":  # the baseline behind the same router
        cluster = make_cluster(model_dir, 0, 0, num_colocated=2, start_redis=False)
        cluster.start()
    else:
        cluster = request.getfixturevalue("cluster22")
    try:
        reqs = [build_generate_request(token_ids=p, sampling=GREEDY) for p in token_prompts]
        results = run_all(cluster.address, reqs)
        assert [r.token_ids for r in results] == expected
        for r, p in zip(results, token_prompts):
            f = r.final
            assert f.finish_reason == "length"
            assert (f.prompt_tokens, f.completion_tokens) == (len(p), GREEDY.max_tokens)
            assert f.timing.e2e_ms >= f.timing.ttft_ms > 0
            if topology == "2 colocated":
                assert f.kv_transport == "none" and f.prefill_worker == f.decode_worker
            else:
                assert f.kv_transport in ("ucx", "tcp")
        if topology == "2P+2D":  # both pools were used
            assert len({r.final.prefill_worker for r in results}) == 2
            assert len({r.final.decode_worker for r in results}) == 2
        wait_idle(cluster)
    finally:
        if topology != "2P+2D":
            cluster.stop()


def test_text_and_chat_prompts_stream_text(cluster22, model_dir):
    engine = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE))
    chat = [{"role": "user", "content": "hello there"}]
    expected = engine.generate([chat], GREEDY)[0]
    with GenerateClient(cluster22.address) as client:
        got = client.generate(build_generate_request(chat=chat, sampling=GREEDY))
        assert got.token_ids == expected.new_token_ids
        assert got.text == expected.text
        assert client.health() == "SERVING"


def test_shared_prefix_routes_to_holder_and_skips_cached_tokens(cluster22):
    cluster = cluster22
    prefix = [7 + (i * 13) % 280 for i in range(160)]
    first = build_generate_request(token_ids=prefix + [11, 12, 13], sampling=GREEDY)
    with GenerateClient(cluster.address) as client:
        a = client.generate(first).final
        assert a.cached_tokens == 0
        # Wait until the holder's blocks are in the index (published after its step).
        hashes = chain_hashes(prefix, 16)
        deadline = time.monotonic() + 10
        while cluster.index.longest_prefix(hashes).get(a.prefill_worker, 0) < len(hashes):
            assert time.monotonic() < deadline, "prefix blocks never reached the index"
            time.sleep(0.05)
        second = build_generate_request(token_ids=prefix + [21, 22, 23, 24], sampling=GREEDY)
        b = client.generate(second).final
    assert b.prefill_worker == a.prefill_worker
    assert b.cached_tokens == 160  # all ten full prefix blocks came from the cache
    assert b.prompt_tokens == 164


def test_prometheus_metrics_count_each_request_in_every_phase(cluster22):
    """Each histogram counts the request once (ITL once per token after the first), with the
    time it took; counters move by what the request did. Values read over HTTP, before and
    after, so a metric that is registered but never observed fails."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{cluster22.router.metrics_port}/metrics"

    def scrape() -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    before = scrape()
    with GenerateClient(cluster22.address) as client:
        final = client.generate(build_generate_request(token_ids=[4, 5, 6], sampling=GREEDY)).final
    wait_idle(cluster22)
    after = scrape()

    def moved(name: str, **labels) -> float:
        key = (f"pdserve:{name}", tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    n = GREEDY.max_tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "prefill_time_seconds", "decode_time_seconds",
                 "time_per_output_token_seconds"):
        assert moved(f"{name}_count") == 1, name
        assert moved(f"{name}_sum") > 0, name
    assert moved("kv_transfer_seconds_count", transport=final.kv_transport) == 1
    assert moved("inter_token_latency_seconds_count") == n - 1
    assert moved("inter_token_latency_seconds_sum") > 0
    assert moved("kv_transfers_total", transport=final.kv_transport) == 1
    assert moved("request_success_total", finished_reason="length") == 1
    assert moved("request_slo_met_total") == 1  # no SLO counts as met
    assert moved("requests_cancelled_total") == 0
    assert moved("prefix_cache_queries_total") == 3
    # A CPU box sees TPOTs of seconds: the top finite bucket must be above them.
    tops = [float(dict(labels)["le"]) for name, labels in after
            if name == "pdserve:time_per_output_token_seconds_bucket"]
    assert max(t for t in tops if t != float("inf")) >= 10.0


def test_openai_client_completions_and_chat(cluster22, model_dir):
    openai = pytest.importorskip("openai")
    engine = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster22.router.http_port}/v1",
                           api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    extra = {"ignore_eos": True}

    prompt = list(range(5, 40))
    want = engine.generate([prompt], GREEDY)[0]
    got = client.completions.create(model=model, prompt=prompt, max_tokens=12,
                                    temperature=0, extra_body=extra)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (35, 12)

    chat = [{"role": "user", "content": "hello there"}]
    want = engine.generate([chat], GREEDY)[0]
    stream = client.chat.completions.create(model=model, messages=chat, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body=extra)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[], max_tokens=3)
    assert "messages" in str(err.value)
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="other-model", prompt="hi", max_tokens=3)
    assert err.value.code == "model_not_found"


def test_every_metric_the_dashboard_and_rules_use_is_scraped(cluster22):
    import json
    import re
    import urllib.request
    from pathlib import Path

    import yaml

    with GenerateClient(cluster22.address) as client:  # so labelled series exist
        client.generate(build_generate_request(token_ids=[4, 5, 6, 7], sampling=GREEDY))
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    rules = yaml.safe_load((deploy / "prometheus" / "pdserve-rules.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads((deploy / "grafana" / "pdserve.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"pdserve:[A-Za-z0-9_:]+", e)} - recorded
    assert len(used) >= 15

    targets = cluster22.scrape_targets
    assert len(targets) == 1 + 4  # the router and each of the four workers
    scraped = set()
    for target in targets:
        text = urllib.request.urlopen(f"http://{target}/metrics", timeout=5).read().decode()
        scraped |= {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line.startswith("pdserve:")}
    missing = sorted(m for m in used if m not in scraped)
    assert not missing, f"dashboard/rules query metrics nobody exports: {missing}"


def test_reflection_lists_the_services(cluster22):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster22.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"pdserve.v1.PDServe", "grpc.health.v1.Health"} <= names


def test_cli_generate_streams_from_the_cluster(cluster22, capsys):
    from launcher.cli import main

    assert main(["generate", "--address", cluster22.address, "--prompt", "hi there",
                 "--max-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert "prefill_worker=prefill-" in out.err and "finish_reason=" in out.err
    assert main(["generate", "--address", cluster22.address,
                 "--prompt", "hello " * 2000]) == 2  # longer than max_model_len
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "max_model_len" in err


def test_client_deadline_frees_blocks_on_both_sides(cluster22):
    long = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
    with GenerateClient(cluster22.address) as client, pytest.raises(grpc.RpcError) as err:
        client.generate(build_generate_request(token_ids=list(range(9, 50)), sampling=long),
                        timeout_s=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(cluster22)


def test_cancel_mid_stream_frees_blocks_on_both_sides(cluster22):
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    with GenerateClient(cluster22.address) as client:
        call = client.stream(build_generate_request(token_ids=list(range(5, 60)), sampling=long))
        got = 0
        for resp in call:
            got += len(resp.token_ids)
            if got >= 3:
                break
        call.cancel()
    wait_idle(cluster22)
    metrics = cluster22.router.metrics.registry
    assert metrics.get_sample_value("pdserve:requests_cancelled_total") >= 1


def test_adopting_workers_aborts_what_the_previous_router_left_in_flight(cluster22):
    """What a restarted router does to detached workers (tests/test_router_restart.py runs
    the whole restart): a request mid-decode is aborted and every block comes back."""
    import ray

    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    with GenerateClient(cluster22.address) as client:
        call = client.stream(build_generate_request(token_ids=list(range(5, 60)), sampling=long))
        first = next(call)
        workers = [*cluster22.prefill.values(), *cluster22.decode.values()]
        held = [ray.get(w.check_integrity.remote()).requests for w in workers]
        assert any(held)  # the request is still decoding somewhere
        infos = ray.get([w.adopt.remote() for w in workers])
        assert {i.worker_id for i in infos} == set(cluster22.prefill) | set(cluster22.decode)
        rest = list(call)
        assert rest[-1].final.finish_reason == "abort"
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) < 400
    wait_idle(cluster22, timeout_s=2)


@pytest.mark.parametrize("bad, words", [
    ({"token_ids": []}, "token_ids"),
    ({"token_ids": [1, 2, 10**6]}, "vocabulary"),
    ({"token_ids": list(range(3, 300)) * 10}, "prompt"),
    ({"text": "hi", "model": "no-such-model"}, "model"),
    ({"text": "hi", "sampling": {"temperature": -1.0}}, "temperature"),
])
def test_bad_requests_get_invalid_argument(cluster22, bad, words):
    with GenerateClient(cluster22.address) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(build_generate_request(**bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.value.details()
        ok = client.generate(build_generate_request(token_ids=[5, 6, 7], sampling=GREEDY))
        assert ok.final.finish_reason == "length"


def test_overload_is_rejected_early_while_admitted_requests_complete(model_dir, ray_session):
    router = RouterConfig(slots_per_prefill_worker=1, max_queue=2)
    with make_cluster(model_dir, 1, 1, start_redis=False, router=router,
                      http_port=0) as cluster:
        sampling = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
        reqs = [build_generate_request(token_ids=p, sampling=sampling)
                for p in prompts(16, seed=4)]
        outcomes: list[tuple[str, float]] = [None] * len(reqs)  # type: ignore[list-item]

        def one(i: int) -> None:
            start = time.monotonic()
            if i % 2:  # half of them over the OpenAI HTTP API: 429 with Retry-After there
                outcomes[i] = (http_completion(cluster, reqs[i]), time.monotonic() - start)
                return
            try:
                client.generate(reqs[i])
                outcomes[i] = ("ok", time.monotonic() - start)
            except grpc.RpcError as e:
                outcomes[i] = (e.code().name, time.monotonic() - start)

        with GenerateClient(cluster.address) as client:
            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        codes = [c for c, _ in outcomes]
        assert set(codes) <= {"ok", "RESOURCE_EXHAUSTED"}
        assert codes.count("RESOURCE_EXHAUSTED") >= 1 and codes.count("ok") >= 3
        # Rejection happens at admission: every refusal came back before any admitted
        # request finished.
        assert (max(t for c, t in outcomes if c != "ok")
                < min(t for c, t in outcomes if c == "ok"))
        wait_idle(cluster)


def http_completion(cluster: LocalCluster, req) -> str:
    """POST the request's token ids to /v1/completions: "ok" or the gRPC-style status name."""
    import json
    import urllib.error
    import urllib.request

    body = {"prompt": list(req.token_ids.ids), "max_tokens": req.sampling.max_tokens,
            "temperature": 0, "ignore_eos": True}
    http = urllib.request.Request(
        f"http://127.0.0.1:{cluster.router.http_port}/v1/completions",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http, timeout=120) as r:
            assert json.load(r)["usage"]["completion_tokens"] == req.sampling.max_tokens
            return "ok"
    except urllib.error.HTTPError as e:
        assert e.code == 429 and e.headers["Retry-After"], (e.code, e.read())
        error = json.load(e)["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        return "RESOURCE_EXHAUSTED"


def _holder(cluster: LocalCluster, pool: str, timeout_s: float = 10.0) -> str:
    """The worker of `pool` serving the one request in flight, once its KV transfer is open
    (the decode side holds the reservation and prefill is shipping layers)."""
    async def busy_prefill() -> list[str]:
        snap = cluster.router.slo.snapshot()["prefill"]
        return [wid for wid, w in snap.items() if w["slots_busy"]]

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reserved = [wid for wid, a in cluster.decode.items()
                    if ray.get(a.check_integrity.remote()).requests]
        if reserved:
            time.sleep(0.2)  # inside the first layer's (fault-injected) send delay
            return reserved[0] if pool == "decode" else cluster.call(busy_prefill())[0]
        time.sleep(0.01)
    pytest.fail("no decode worker reserved blocks for the request")


@pytest.mark.parametrize("victim", ["decode", "prefill"])
def test_peer_killed_mid_transfer_is_retried_without_leaks(victim, model_dir, ray_session):
    with make_cluster(model_dir, 2, 2, start_redis=False, fault_layer_delay_s=0.4) as cluster:
        req = build_generate_request(token_ids=list(range(3, 90)), sampling=GREEDY)
        expected = colocated(model_dir, [list(range(3, 90))])[0]
        with GenerateClient(cluster.address) as client:
            call = ThreadPoolExecutor(1).submit(client.generate, req)
            wid = _holder(cluster, victim)
            ray.kill((cluster.prefill if victim == "prefill" else cluster.decode)[wid])
            result = call.result(120)
        assert result.token_ids == expected
        assert result.final.retries == 1
        alive = [w for w in (cluster.prefill if victim == "prefill" else cluster.decode)
                 if w != wid]
        assert (result.final.prefill_worker if victim == "prefill"
                else result.final.decode_worker) in alive
        del (cluster.prefill if victim == "prefill" else cluster.decode)[wid]
        wait_idle(cluster)


def test_prefill_slower_than_the_kv_lease_still_completes(model_dir, ray_session):
    """Shipping each of the model's layers takes 1.5 KV leases: the reservation lives on
    because the prefill side renews it (a fixed deadline from the reservation expired)."""
    with make_cluster(model_dir, 1, 1, start_redis=False, fault_layer_delay_s=3.0,
                      router=RouterConfig(kv_timeout_s=2.0)) as cluster:
        tokens = list(range(3, 60))
        with GenerateClient(cluster.address) as client:
            result = client.generate(build_generate_request(token_ids=tokens, sampling=GREEDY))
        assert result.token_ids == colocated(model_dir, [tokens])[0]
        assert result.final.retries == 0
        wait_idle(cluster)


def test_dead_prefill_worker_is_retried_on_the_same_healthy_decode_worker(model_dir,
                                                                          ray_session):
    """SIGKILL the prefill worker's process while it ships the KV to the only decode worker:
    the retry avoids the side that failed (the prefill worker), so it runs on the other
    prefill worker and the same decode worker, with the exact tokens and nothing held."""
    prompt = list(range(3, 90))
    expected = colocated(model_dir, [prompt])[0]
    with make_cluster(model_dir, 2, 1, start_redis=False, fault_layer_delay_s=0.4) as cluster:
        with GenerateClient(cluster.address) as client:
            call = ThreadPoolExecutor(1).submit(
                client.generate, build_generate_request(token_ids=prompt, sampling=GREEDY))
            victim = _holder(cluster, "prefill")
            os.kill(ray.get(cluster.prefill[victim].ready.remote()).pid, 9)
            result = call.result(120)
        assert result.token_ids == expected
        assert result.final.retries == 1
        assert result.final.prefill_worker != victim
        assert result.final.decode_worker == "decode-0"
        del cluster.prefill[victim]  # Ray restarts it; its fresh engine holds nothing
        wait_idle(cluster)


def test_cancel_during_the_decode_reservation_frees_it_within_a_step(model_dir, ray_session):
    """The client cancels while the decode worker is making the request's reservation (its
    engine thread held 2 s by fault injection, the cancel comes once the request is placed):
    the reservation is freed as soon as it is made, not when the KV deadline (here 10
    minutes) expires."""
    router = RouterConfig(kv_timeout_s=600)
    with make_cluster(model_dir, 1, 1, start_redis=False, router=router,
                      fault_reserve_delay_s=2.0) as cluster:
        async def prefill_slot_taken() -> bool:
            return any(w["slots_busy"] for w in cluster.router.slo.snapshot()["prefill"].values())

        with GenerateClient(cluster.address) as client:
            prompt = [3 + i % 300 for i in range(400)]
            call = client.stream(build_generate_request(token_ids=prompt, sampling=GREEDY))
            deadline = time.monotonic() + 10
            while not cluster.call(prefill_slot_taken()):  # placed: reserving on decode
                assert time.monotonic() < deadline, "the request was never placed"
                time.sleep(0.01)
            call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == grpc.StatusCode.CANCELLED
        wait_idle(cluster, timeout_s=10)
        with GenerateClient(cluster.address) as client:  # and the worker still serves
            again = client.generate(build_generate_request(token_ids=[5, 6, 7],
                                                           sampling=GREEDY))
        assert again.final.finish_reason == "length"
        wait_idle(cluster)


def test_redis_stopped_and_restarted_cluster_keeps_serving(model_dir, ray_session, tmp_path):
    port, proc = start_redis_server(tmp_path / "redis")
    cluster = make_cluster(model_dir, 2, 1, redis_url=f"redis://127.0.0.1:{port}/0",
                           heartbeat_s=0.2, ttl_s=1.0)
    try:
        cluster.start()
        with GenerateClient(cluster.address) as client:
            def serve_one(p):
                return client.generate(build_generate_request(token_ids=p, sampling=GREEDY))

            assert serve_one(list(range(3, 40))).final.finish_reason == "length"
            stop_redis_server(proc, kill=True)
            for p in prompts(3, seed=9):  # routing on load alone
                assert serve_one(p).final.finish_reason == "length"
            assert cluster.index.live_workers() == {}
            port, proc = start_redis_server(tmp_path / "redis", port=port)
            deadline = time.monotonic() + 15
            while set(cluster.index.live_workers()) != {"prefill-0", "prefill-1"}:
                assert time.monotonic() < deadline, "workers never re-registered"
                time.sleep(0.1)
            # Blocks computed before the outage are republished: a shared prefix hits again.
            prefix = list(range(3, 40))[:32]
            deadline = time.monotonic() + 15
            while max(cluster.index.longest_prefix(chain_hashes(prefix, 16)).values(),
                      default=0) < 2:
                assert time.monotonic() < deadline, "cached blocks never republished"
                time.sleep(0.1)
            again = serve_one(prefix + [250, 251])
            assert again.final.cached_tokens == 32
        wait_idle(cluster)
    finally:
        cluster.stop()
        stop_redis_server(proc)


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(model_dir, ray_session):
    cluster = make_cluster(model_dir, 1, 1, start_redis=False, drain_grace_s=60)
    cluster.start()
    router = cluster.router
    long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    with GenerateClient(cluster.address) as client, ThreadPoolExecutor(2) as pool:
        call = client.stream(build_generate_request(token_ids=list(range(5, 30)), sampling=long))
        first = next(call)  # admitted and streaming
        stopper = pool.submit(cluster.stop)
        deadline = time.monotonic() + 10
        while not router.draining:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:
            client.generate(build_generate_request(token_ids=[5, 6, 7], sampling=GREEDY))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(call)
        assert rest[-1].final.finish_reason == "length"
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 150
        stopper.result(120)


def test_decode_worker_killed_mid_decode_migrates_and_is_restarted(model_dir, ray_session):
    """SIGKILL the decode worker's process mid-stream: the request continues on the other
    pair without repeating or losing a token, and Ray restarts the worker, which the router
    takes back into the pool."""
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    prompt = list(range(11, 41))
    expected = colocated(model_dir, [prompt], long)[0]
    with make_cluster(model_dir, 2, 2, start_redis=False) as cluster:
        with GenerateClient(cluster.address) as client:
            call = client.stream(build_generate_request(token_ids=prompt, sampling=long))
            tokens = list(next(call).token_ids)
            victim = next(wid for wid, a in cluster.decode.items()
                          if ray.get(a.check_integrity.remote()).requests)
            pid = ray.get(cluster.decode[victim].ready.remote()).pid
            os.kill(pid, 9)
            rest = list(call)
        tokens += [t for r in rest for t in r.token_ids]
        final = rest[-1].final
        assert tokens == expected
        assert final.retries == 1 and final.decode_worker != victim
        assert final.completion_tokens == 120
        deadline = time.monotonic() + 120
        while victim not in cluster.router.pool.decode:  # restarted by Ray, re-admitted
            assert time.monotonic() < deadline, "the killed worker never came back"
            time.sleep(0.2)
        assert ray.get(cluster.decode[victim].ready.remote()).pid != pid
        wait_idle(cluster)


@pytest.mark.parametrize("flags, words", [
    (["--max-model-len", "9000"], "max_model_len 9000 exceeds the model's limit 512"),
    (["--prefill-tp", "3"], "num_attention_heads 4 is not divisible by --prefill-tp 3"),
])
def test_up_with_a_config_the_model_cannot_take_is_a_one_line_error(model_dir, flags, words):
    """Checked by the launcher before any worker starts: no Ray actor dies, no traceback."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", "--model", str(model_dir), "--no-redis",
         "--http-port", "-1", "--port", "0", *flags],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "ActorDiedError" not in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1] == f"pdserve: error: {words}", run.stderr[-3000:]


def test_sigterm_drains_a_real_pdserve_up(model_dir, tmp_path):
    """`pdserve up` as its own process: SIGTERM mid-request lets the request finish, then the
    process exits cleanly (what a rolling update relies on)."""
    import signal
    import subprocess
    import sys

    from redis_server import free_port

    port = free_port()
    with open(tmp_path / "up.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "up", "--model", str(model_dir), "--port",
             str(port), "--http-port", "-1", "--no-redis", "--drain-grace-s", "60"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 180
        while "serving; Ctrl-C" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "pdserve up never came up"
            time.sleep(0.2)
        long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
        with GenerateClient(f"127.0.0.1:{port}") as client:
            call = client.stream(build_generate_request(token_ids=list(range(5, 30)),
                                                        sampling=long))
            first = next(call)
            proc.send_signal(signal.SIGTERM)
            rest = list(call)
        assert rest[-1].final.finish_reason == "length"
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 150
        assert proc.wait(120) == 0
        assert "draining" in (tmp_path / "up.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_overload_refuses_batch_while_interactive_with_the_same_slo_is_admitted(
        model_dir, ray_session):
    """Requests of middle priority (5, no SLO, so never refused) flood the only prefill slot;
    then a batch (priority 0) and an interactive (priority 10) request with the same TTFT SLO
    arrive together. The batch one would wait behind the whole flood and is refused at once;
    the interactive one goes ahead of it and is served. The SLO is a multiple of this
    machine's own unloaded TTFT, so the test does not depend on its speed."""
    import random

    router = RouterConfig(slots_per_prefill_worker=1, max_queue=64)
    rng = random.Random(9)
    # Distinct prompts: a cached prefix would make a request almost no prefill work.
    fresh = iter([[rng.randrange(3, 300) for _ in range(130)] for _ in range(40)])
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with make_cluster(model_dir, 1, 1, start_redis=False, router=router) as cluster, \
            GenerateClient(cluster.address) as client, ThreadPoolExecutor(24) as pool:
        unloaded = []
        for _ in range(4):  # also teaches the router this worker's speed
            start = time.monotonic()
            next(client.stream(build_generate_request(token_ids=next(fresh),
                                                      sampling=sampling)))
            unloaded.append(time.monotonic() - start)
        slo_ms = 1e3 * 5 * max(unloaded)

        def run(prompt: list[int], priority: int, ttft_ms: float = 0) -> str:
            req = build_generate_request(token_ids=prompt, sampling=sampling,
                                         priority=priority, ttft_ms=ttft_ms)
            try:
                list(client.stream(req))
                return "ok"
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"

        flood = [pool.submit(run, next(fresh), 5) for _ in range(20)]
        deadline = time.monotonic() + 30
        while cluster.router.slo.queue_length < 12:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        batch = pool.submit(run, next(fresh), 0, slo_ms)
        interactive = pool.submit(run, next(fresh), 10, slo_ms)
        assert interactive.result(60) == "ok"
        assert batch.result(60).startswith("RESOURCE_EXHAUSTED"), batch.result()
        # Refused by the TTFT prediction: a finite one over the budget ("predicted TTFT"), or
        # an infinite wait when the flood's rate exceeds the worker's measured throughput (a
        # loaded machine); both say "prefill saturated", unlike a full queue.
        assert "prefill saturated" in batch.result(), batch.result()
        assert [f.result(60) for f in flood] == ["ok"] * len(flood)
        wait_idle(cluster)


def test_interactive_priority_overtakes_queued_batch_requests(model_dir, ray_session):
    """Overload with batch traffic (priority 0), then send interactive requests (priority 10):
    they are prefilled before batch requests that were already waiting."""
    router = RouterConfig(slots_per_prefill_worker=1, max_queue=64)
    with make_cluster(model_dir, 1, 1, start_redis=False, router=router) as cluster, \
            GenerateClient(cluster.address) as client, ThreadPoolExecutor(16) as pool:
        first_token_at: dict[str, float] = {}

        def run(name: str, priority: int) -> None:
            req = build_generate_request(token_ids=list(range(5, 120)), priority=priority,
                                         sampling=SamplingParams(max_tokens=8,
                                                                 temperature=0.0,
                                                                 ignore_eos=True))
            call = client.stream(req)
            next(call)
            first_token_at[name] = time.monotonic()
            list(call)

        batch = [pool.submit(run, f"batch-{i}", 0) for i in range(10)]
        deadline = time.monotonic() + 30
        while cluster.router.slo.queue_length < 6:  # batch requests are waiting
            assert time.monotonic() < deadline
            time.sleep(0.01)
        interactive = [pool.submit(run, f"interactive-{i}", 10) for i in range(3)]
        for f in batch + interactive:
            f.result(120)
    last_interactive = max(t for n, t in first_token_at.items() if n.startswith("inter"))
    batch_times = sorted(t for n, t in first_token_at.items() if n.startswith("batch"))
    # At least the last three batch requests (still queued when the interactive ones came)
    # got their first token after every interactive request.
    assert last_interactive < batch_times[-3]
