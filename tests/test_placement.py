"""Isolated workers (`--cpus-per-worker`): disjoint core sets from the launcher, and each
worker process pinned to its own, seen from inside the worker over a real Ray call; a
machine too small for what was asked is a clear error before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import ray
from cluster_helpers import ray_session as ray_session_cm
from cluster_helpers import tiny_model, wait_idle

from launcher.client import GenerateClient
from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig
from pdserve_api.messages import build_generate_request
from pdserve_api.sampling import SamplingParams
from worker_host.placement import InsufficientCoresError, assign_cores, observed

TWO_CORES = sorted(os.sched_getaffinity(0))[:2]


def test_cores_are_disjoint_whole_sets_per_rank():
    cfg = ClusterConfig(num_prefill=1, num_decode=2, prefill_tp=2, cpus_per_worker=2)
    ranks = cfg.rank_names()
    assert ranks == ["prefill-0", "prefill-0/tp1", "decode-0", "decode-1"]
    cores = assign_cores(ranks, 2, available=range(8))
    assert list(cores) == ranks
    assert all(len(c) == 2 for c in cores.values())
    flat = [core for c in cores.values() for core in c]
    assert sorted(flat) == list(range(8))  # every core once: none shared


def test_more_cores_than_the_machine_has_is_an_error():
    with pytest.raises(InsufficientCoresError, match=r"3 worker processes x 1 cores = 3 "
                                                     r"cores, but this machine has 2"):
        assign_cores(["prefill-0", "prefill-1", "decode-0"], 1, available=[0, 1])
    with pytest.raises(ValueError, match="must be >= 1"):
        assign_cores(["decode-0"], 0, available=[0, 1])


@pytest.mark.skipif(len(TWO_CORES) < 2, reason="needs two cores")
def test_pdserve_up_asking_for_too_many_cores_fails_before_starting():
    """3 workers x 1 core, with the launcher confined to 2 cores. The model path does not
    exist: the core check must come first, before the model, Ray or any actor."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "up", "--prefill", "2", "--decode", "1",
         "--cpus-per-worker", "1", "--model", "/nonexistent/model", "--no-redis",
         "--port", "0", "--http-port", "-1"],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, TWO_CORES),
        env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 1, proc.stderr
    assert "pdserve: error: 3 worker processes x 1 cores = 3 cores, but this machine has " \
           "2 usable" in proc.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("placement") / "llama", seed=5)


@pytest.mark.skipif(len(TWO_CORES) < 2, reason="needs two cores")
def test_prefill_and_decode_workers_each_own_one_core(model_dir):
    engine = {"num_kv_blocks": 64, "max_num_seqs": 8, "max_num_batched_tokens": 128}
    with ray_session_cm(), LocalCluster(ClusterConfig(
            model=str(model_dir), engine=engine, cpus_per_worker=1, start_redis=False,
            http_port=None)) as cluster:
        workers = {**cluster.prefill, **cluster.decode}
        seen = dict(zip(workers, ray.get([a.call.remote(observed) for a in workers.values()],
                                         timeout=60)))
        for wid, placement in seen.items():
            assert len(placement["cores"]) == 1, (wid, placement)
            # every thread of the process, not only the engine's, stays on that core
            assert placement["process_cores"] == placement["cores"], (wid, placement)
            assert placement["threads"] == 1, (wid, placement)
        assert not set(seen["prefill-0"]["cores"]) & set(seen["decode-0"]["cores"])
        # and the pinned workers serve
        with GenerateClient(cluster.address) as client:
            reply = client.generate(build_generate_request(
                token_ids=list(range(5, 40)),
                sampling=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
        assert len(reply.token_ids) == 6 and reply.final.finish_reason == "length"
        wait_idle(cluster)
