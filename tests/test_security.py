"""API keys and (mutual) TLS on the public endpoints, against a real cluster (Ray, gRPC,
HTTP); and Ray's token authentication: `pdserve up --ray-address` joining a token-protected Ray
head started here (`ray start --head --block` in a session of its own, ended by its process
group, never `ray stop`), with the token from a file or the environment, and refused without
it. (The prefix index's Redis over TLS: test_redis_tls.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from cluster_helpers import ray_session, tiny_model
from tls_certs import make_certs

from launcher.client import GenerateClient
from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig
from launcher.ray_auth import configure_ray_auth
from launcher.redis_local import free_port
from pdserve_api.errors import ConfigError
from pdserve_api.messages import build_generate_request
from pdserve_api.sampling import SamplingParams
from router.auth import ApiKeys, AuthError, new_key_line
from router.config import RouterConfig

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_key_file_parsing_and_checks(tmp_path):
    alice, line_a = new_key_line("alice")
    bob, line_b = new_key_line("bob", rate_per_s=0.001)
    path = tmp_path / "keys"
    path.write_text(f"# comment\n{line_a}\n\n{line_b}  # limited\n")
    keys = ApiKeys.from_file(path)
    assert alice not in path.read_text()  # only hashes are stored
    assert keys.check(f"Bearer {alice}") == "alice"
    assert keys.check(alice) == "alice"
    assert keys.check(f"Bearer {bob}") == "bob"
    with pytest.raises(AuthError) as e:
        keys.check(f"Bearer {bob}")  # burst of 1 spent, refill takes 1000 s
    assert e.value.status == "rate_limited"
    for bad in (None, "", "Bearer ", f"Bearer {alice}x", "Bearer " + "0" * 64):
        with pytest.raises(AuthError) as e:
            keys.check(bad)
        assert e.value.status == "unauthenticated"
    path.write_text("alice nothex\n")
    with pytest.raises(ValueError, match="keys:1"):
        ApiKeys.from_file(path)


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    model = tiny_model(tmp / "llama", seed=5)
    ca, cert, key, client_cert, client_key = make_certs(tmp)
    alice, line_a = new_key_line("alice")
    bob, line_b = new_key_line("bob", rate_per_s=0.001)
    (tmp / "keys").write_text(f"{line_a}\n{line_b}\n")
    router = RouterConfig(api_keys_file=str(tmp / "keys"), tls_cert_file=cert,
                          tls_key_file=key, tls_client_ca_file=ca)  # mutual TLS
    cfg = ClusterConfig(model=str(model), start_redis=False, http_port=0, router=router,
                        engine={"num_kv_blocks": 64}, worker_num_cpus=0.25)
    with ray_session(), LocalCluster(cfg) as cluster:
        yield cluster, {"ca": ca, "alice": alice, "bob": bob,
                        "tls": {"tls_ca_file": ca, "tls_cert_file": client_cert,
                                "tls_key_file": client_key}}


def test_grpc_needs_a_valid_key_over_tls(secure_cluster):
    cluster, s = secure_cluster
    req = build_generate_request(token_ids=[5, 6, 7], sampling=GREEDY)
    for key in ("", "pds-wrong"):
        with GenerateClient(cluster.address, api_key=key, **s["tls"]) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate(req)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert c.health() == "SERVING"  # probes need no key
    with GenerateClient(cluster.address, api_key=s["alice"], **s["tls"]) as c:
        assert c.generate(req).final.completion_tokens == 4
    with GenerateClient(cluster.address, api_key=s["bob"], **s["tls"]) as c:
        assert c.generate(req).final.completion_tokens == 4
        with pytest.raises(grpc.RpcError) as err:
            c.generate(req)  # over bob's rate
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for others in ({}, {"tls_ca_file": s["ca"]}):  # plaintext; TLS without a client cert
        with GenerateClient(cluster.address, api_key=s["alice"], timeout_s=5, **others) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate(req)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_http_needs_a_valid_key_over_tls(secure_cluster):
    cluster, s = secure_cluster
    url = f"https://127.0.0.1:{cluster.router.http_port}/v1/completions"
    ctx = ssl.create_default_context(cafile=s["ca"])
    ctx.load_cert_chain(s["tls"]["tls_cert_file"], s["tls"]["tls_key_file"])
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}).encode()

    def post(key):
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(url, data=body, headers=headers)
        return urllib.request.urlopen(req, context=ctx, timeout=60)

    with pytest.raises(urllib.error.HTTPError) as err:
        post(None)
    assert err.value.code == 401
    error = json.load(err.value)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    with post(s["alice"]) as r:
        assert json.load(r)["usage"]["completion_tokens"] == 3
    models = urllib.request.Request(f"https://127.0.0.1:{cluster.router.http_port}/v1/models",
                                    headers={"Authorization": f"Bearer {s['alice']}"})
    with urllib.request.urlopen(models, context=ctx, timeout=10) as r:
        assert json.load(r)["data"]
    with pytest.raises(urllib.error.URLError):  # the CA is required to trust the server
        urllib.request.urlopen(models, context=ssl.create_default_context(), timeout=10)
    no_cert = ssl.create_default_context(cafile=s["ca"])
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        urllib.request.urlopen(models, context=no_cert, timeout=10)  # mutual TLS


# ---- Ray token authentication --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def test_ray_auth_settings_come_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    for var in RAY_AUTH_VARS:
        monkeypatch.delenv(var, raising=False)
    token = "tok-" + uuid.uuid4().hex
    path = tmp_path / "token"
    path.write_text(token)
    # Starting a private local Ray: disabled unless asked (as before); joining: Ray decides.
    assert configure_ray_auth(None, joining=False) == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert "default" in configure_ray_auth(None, joining=True)
    assert "RAY_AUTH_MODE" not in os.environ
    # A token in the environment means token mode.
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert configure_ray_auth(None, joining=True) == "token (from $RAY_AUTH_TOKEN)"
    assert os.environ["RAY_AUTH_MODE"] == "token"
    # The flag's file wins over $RAY_AUTH_TOKEN (which Ray would prefer): that one is dropped.
    how = configure_ray_auth(str(path), joining=True)
    assert how == f"token (from file {path})" and token not in how
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert "RAY_AUTH_TOKEN" not in os.environ
    # A token file Ray could not read would abort the process inside Ray: a clear error here.
    (tmp_path / "empty").write_text("")
    for bad, message in ((tmp_path / "missing", "cannot read"), (tmp_path / "empty", "empty")):
        with pytest.raises(ConfigError, match=message):
            configure_ray_auth(str(bad), joining=True)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH"):
        configure_ray_auth(None, joining=True)


class TokenRayHead:
    """A one-node Ray cluster with RAY_AUTH_MODE=token: `ray start --head --block` on
    127.0.0.1 and free ports, its temp dir (and so its address file) private, in a session of
    its own so that stop() ends exactly it and every process it started."""

    def __init__(self, token_file: Path):
        ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        self.temp_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")  # short socket paths
        self.gcs_port, self.client_port = free_port(), free_port()
        ports = {f"--{name}-port": str(free_port()) for name in (
            "node-manager", "object-manager", "dashboard-agent-listen",
            "dashboard-agent-grpc", "metrics-export", "runtime-env-agent")}
        # pdserve importable by every process of the node (Ray Client's server-side driver
        # too), as where the image installs it.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**_env_without_ray_auth(), "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(token_file), "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.gcs_port), "--ray-client-server-port", str(self.client_port),
             *[x for kv in ports.items() for x in kv], "--num-cpus", "4",
             "--include-dashboard", "false", "--disable-usage-stats",
             "--temp-dir", self.temp_dir],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 60
        for port in (self.gcs_port, self.client_port):
            while not _accepts(port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the Ray head did not start (exit {self.proc.poll()})")
                time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` shuts its node down on SIGTERM
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of its process group (it leads it: --block)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _env_without_ray_auth(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in RAY_AUTH_VARS and k != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def token_ray(tmp_path_factory):
    """(head, token, token file, model dir)."""
    tmp = tmp_path_factory.mktemp("ray-token")
    token = "ray-tok-" + uuid.uuid4().hex
    token_file = tmp / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    head = TokenRayHead(token_file)
    try:
        yield head, token, token_file, tiny_model(tmp / "llama", seed=21)
    finally:
        head.stop()


def _pdserve_up(model: Path, address: str, *flags: str, env: dict[str, str],
                timeout_s: float = 240) -> subprocess.CompletedProcess:
    """`pdserve -v up ... --prompt`: start a cluster on `address`, send one chat prompt, exit."""
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", "-v", "up", "--model", str(model),
         "--ray-address", address, *flags, "--no-redis", "--port", "0", "--http-port", "-1",
         "--kv-cache-mib", "1", "--drain-grace-s", "0", "--prompt", "hello", "--max-tokens",
         "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
        check=False)


@pytest.mark.parametrize("how", ["token file, GCS address", "$RAY_AUTH_TOKEN, Ray Client"])
def test_pdserve_up_joins_a_token_protected_ray_cluster(token_ray, how):
    head, token, token_file, model = token_ray
    if how.startswith("token file"):
        run = _pdserve_up(model, head.address, "--ray-auth-token-file", str(token_file),
                          env=_env_without_ray_auth())
        assert f"authentication token (from file {token_file})" in run.stderr, run.stderr
    else:  # the Helm chart's way: Ray Client, the token in the router's environment
        run = _pdserve_up(model, f"ray://127.0.0.1:{head.client_port}",
                          env=_env_without_ray_auth(RAY_AUTH_TOKEN=token))
        assert "authentication token (from $RAY_AUTH_TOKEN)" in run.stderr, run.stderr
    # In with the token: the workers were created on the cluster and came up.
    assert "worker prefill-0 ready" in run.stderr, run.stderr[-5000:]
    assert token not in run.stdout + run.stderr
    assert run.returncode == 0, run.stderr[-5000:]
    assert "[finish_reason=" in run.stderr  # one request served end to end
    if how.startswith("token file"):  # `pdserve down` joins the same way
        down = subprocess.run(
            [sys.executable, "-m", "launcher.cli", "down", "--ray-address", head.address,
             "--ray-auth-token-file", str(token_file), "--namespace", "pdserve-token-test"],
            cwd=ROOT, env=_env_without_ray_auth(), capture_output=True, text=True,
            timeout=120, check=False)
        assert down.returncode == 0 and "ended 0 detached workers" in down.stderr, down.stderr


def test_a_token_protected_ray_cluster_refuses_pdserve_without_the_token(token_ray, tmp_path):
    head, token, _, model = token_ray
    wrong = tmp_path / "wrong"
    wrong.write_text("not-" + token)
    # HOME without ~/.ray/auth_token; give up on the GCS after 2 s rather than Ray's 20 s.
    env = _env_without_ray_auth(HOME=str(tmp_path), RAY_gcs_server_port_wait_time_s="2")
    for flags in ((), ("--ray-auth-token-file", str(wrong))):
        run = _pdserve_up(model, head.address, *flags, env=env, timeout_s=120)
        assert run.returncode == 1, run.stderr[-3000:]
        assert f"pdserve: error: Ray at {head.address}: it refused the authentication " \
               "token" in run.stderr, run.stderr[-3000:]
        assert "--ray-auth-token-file" in run.stderr  # says what to give
        assert token not in run.stdout + run.stderr
    run = _pdserve_up(model, head.address, "--ray-auth-token-file", str(tmp_path / "nope"),
                      env=env, timeout_s=120)
    assert run.returncode == 1 and "cannot read the Ray token file" in run.stderr
