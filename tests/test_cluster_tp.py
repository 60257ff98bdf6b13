"""Tensor-parallel pool workers in a real cluster: each worker is a group of Ray actors (one per
rank, gloo on CPU) in a placement group. Oracle: the single-process colocated engine's greedy
tokens. Fault: a rank's process is SIGKILLed and the router replaces the whole group."""

from __future__ import annotations

import os
import time

import pytest
from cluster_helpers import ray_session as ray_session_cm
from cluster_helpers import tiny_model, wait_idle

from engine.config import EngineConfig
from engine.engine import LLMEngine
from launcher.client import GenerateClient, build_generate_request
from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig
from pdserve_api.sampling import SamplingParams

ENGINE = {"num_kv_blocks": 96, "max_num_seqs": 8, "max_num_batched_tokens": 128}
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10], list(range(20, 61)), [300, 3, 17] * 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 2 KV heads: TP=2 splits them, one per rank.
    return tiny_model(tmp_path_factory.mktemp("cluster_tp") / "llama", seed=5)


@pytest.fixture(scope="module")
def ray_session():
    with ray_session_cm():
        yield


@pytest.fixture(scope="module")
def expected(model_dir) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(model=str(model_dir), **ENGINE))
    return [o.new_token_ids for o in engine.generate(PROMPTS, GREEDY)]


def make_cluster(model_dir, **kw) -> LocalCluster:
    return LocalCluster(ClusterConfig(model=str(model_dir), engine=ENGINE, worker_num_cpus=0.2,
                                      start_redis=False, **kw))


def serve_all(cluster) -> list[list[int]]:
    with GenerateClient(cluster.address) as client:
        return [client.generate(build_generate_request(token_ids=p, sampling=GREEDY)).token_ids
                for p in PROMPTS]


def test_colocated_tp2_worker_matches_engine_and_is_replaced_when_a_rank_dies(
        model_dir, ray_session, expected):
    import ray

    cluster = make_cluster(model_dir, num_prefill=0, num_decode=0, num_colocated=1,
                           colocated_tp=2)
    try:
        cluster.start()
        assert serve_all(cluster) == expected
        wid = "colocated-0"
        old = cluster.tp_workers[wid].followers[0]
        os.kill(ray.get(old.ready.remote()).pid, 9)
        deadline = time.monotonic() + 60
        router = cluster.router
        # Seen dead by the heartbeat, routed around, then back as a fresh group.
        while wid in router.pool.prefill and router.pool.followers[wid][0] is old:
            assert time.monotonic() < deadline, "the dead rank was never noticed"
            time.sleep(0.1)
        while wid not in router.pool.prefill:
            assert time.monotonic() < deadline, "the group was never replaced"
            time.sleep(0.1)
        assert router.pool.followers[wid][0] is not old
        assert cluster.tp_workers[wid].replacements == 1
        assert serve_all(cluster) == expected
        wait_idle(cluster)
    finally:
        cluster.stop()


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2), (2, 2)])
def test_prefill_and_decode_tp_sizes_differ_output_matches_engine(
        model_dir, ray_session, expected, prefill_tp, decode_tp):
    """Each decode rank gets exactly its KV heads, rank to rank from the prefill ranks that
    hold them: the colocated engine's tokens, and every rank's blocks come back."""
    cluster = make_cluster(model_dir, num_prefill=1, num_decode=1, prefill_tp=prefill_tp,
                           decode_tp=decode_tp)
    try:
        cluster.start()
        assert serve_all(cluster) == expected
        assert serve_all(cluster) == expected  # again, now with prefix-cache hits
        wait_idle(cluster)
    finally:
        cluster.stop()


def test_decode_follower_rank_killed_mid_stream_request_ends_clearly_and_group_returns(
        model_dir, ray_session, expected):
    """SIGKILL decode rank 1 while a request streams: the request ends with a clear status
    (its only decode worker is gone), the group is replaced, and the cluster serves the
    engine's tokens again with nothing held on any worker."""
    import grpc
    import ray

    cluster = make_cluster(model_dir, num_prefill=1, num_decode=1, prefill_tp=2, decode_tp=2)
    try:
        cluster.start()
        wid = "decode-0"
        old = cluster.tp_workers[wid].followers[0]
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        with GenerateClient(cluster.address) as client:
            call = client.stream(build_generate_request(token_ids=PROMPTS[1], sampling=long),
                                 timeout_s=60)
            next(call)
            os.kill(ray.get(old.ready.remote()).pid, 9)
            try:
                items = list(call)
                assert items[-1].final.finish_reason == "length"  # done before the kill hit
            except grpc.RpcError as e:  # migration found no other decode worker
                assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        deadline = time.monotonic() + 60
        pool = cluster.router.pool
        while not (wid in pool.decode and pool.followers[wid][0] is not old):
            assert time.monotonic() < deadline, "the decode group was never replaced"
            time.sleep(0.1)
        assert serve_all(cluster) == expected
        wait_idle(cluster)
    finally:
        cluster.stop()
