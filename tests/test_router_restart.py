"""The router restarted on its own: `pdserve up --detached-workers` processes against a Ray
cluster (this test's), the first SIGKILLed mid-stream. The client gets a clear status at once;
the workers live on; a second router adopts them (same processes, no model reload), frees
what the dead one left in flight, and serves."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cluster_helpers import ray_session, tiny_model

from engine.config import EngineConfig
from engine.engine import LLMEngine
from launcher.client import GenerateClient, build_generate_request
from launcher.cluster import end_detached_workers
from pdserve_api.sampling import SamplingParams
from pdserve_api.worker_protocol import IntegrityReport

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "pdserve-restart-test"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = list(range(10, 45))


class RouterProcess:
    """One `pdserve up` process; `address` once it serves."""

    def __init__(self, model: Path, ray_address: str):
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher.cli", "-v", "up", "--model", str(model),
             "--ray-address", ray_address, "--detached-workers", "--namespace", NAMESPACE,
             "--no-redis", "--port", "0", "--http-port", "-1", "--kv-cache-mib", "1",
             "--drain-grace-s", "0"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = self._wait_for("pdserve: gRPC API on ").split()[4]
        self._wait_for("pdserve: serving")

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)

    def _wait_for(self, prefix: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "router exited:\n" + "".join(self.log)
                continue
            self.log.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no {prefix!r} line in time:\n" + "".join(self.log))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("restart") / "llama", seed=11)


def worker_state(name: str) -> tuple[IntegrityReport, int]:
    """A worker's block accounting, and its pid."""
    import ray

    actor = ray.get_actor(name, namespace=NAMESPACE)
    return (ray.get(actor.check_integrity.remote(), timeout=30),
            ray.get(actor.ready.remote(), timeout=30).pid)


def test_router_killed_mid_stream_restarts_and_adopts_its_workers(model_dir):
    import ray

    expected = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=64)).generate(
        [PROMPT], GREEDY)[0].new_token_ids
    with ray_session():
        gcs = ray.get_runtime_context().gcs_address
        first = second = None
        try:
            first = RouterProcess(model_dir, gcs)
            pids = {w: worker_state(w)[1] for w in ("prefill-0", "decode-0")}
            with GenerateClient(first.address) as client:
                long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
                call = client.stream(build_generate_request(token_ids=PROMPT, sampling=long),
                                     timeout_s=60)
                next(call)  # admitted and streaming
                killed = time.monotonic()
                first.stop(signal.SIGKILL)
                with pytest.raises(grpc.RpcError) as err:
                    for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - killed < 10  # a clear status, not a hang
            # The workers outlived the router; the orphaned request is still decoding.
            assert {w: worker_state(w)[1] for w in pids} == pids
            second = RouterProcess(model_dir, gcs)
            assert any("adopting 2 live detached workers" in line for line in second.log)
            with GenerateClient(second.address) as client:
                out = client.generate(build_generate_request(token_ids=PROMPT,
                                                             sampling=GREEDY))
            assert out.token_ids == expected
            assert {w: worker_state(w)[1] for w in pids} == pids  # adopted, not reloaded
            deadline = time.monotonic() + 20
            while True:  # nothing held: the dead router's request was aborted on adoption
                states = [worker_state(w)[0] for w in pids]
                if all(s.free_blocks == s.num_blocks and not s.requests and not s.jobs
                       for s in states):
                    break
                assert time.monotonic() < deadline, states
                time.sleep(0.2)
        finally:
            for router in (first, second):
                if router is not None:
                    router.stop()
            end_detached_workers(NAMESPACE)
