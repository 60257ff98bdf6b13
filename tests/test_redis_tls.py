"""The prefix index over TLS, against a real TLS-only redis-server with a password (started
here on 127.0.0.1, stopped by its pid): the index itself, the refusals a misconfiguration
meets (each with an error that names the fix, and the password in no log line, error or
repr), and a real cluster whose router and workers all reach Redis through one rediss:// URL
whose query carries the CA (the workers get nothing else)."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from redis_server import REDIS_SERVER, SKIP_REASON, RedisTLS, start_redis_server, stop_redis_server
from tls_certs import make_certs

from engine.block_manager import BlockStored
from engine.hashing import chain_hashes
from pdserve_api.errors import ConfigError
from prefix_index.factory import make_prefix_index
from prefix_index.redis_index import RedisPrefixIndex
from prefix_index.url import redact_url

pytest.importorskip("redis")
pytest.importorskip("cryptography")
if REDIS_SERVER is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

PASSWORD = "tls-pw-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("redis-certs"))


def _start(work_dir, tls: RedisTLS) -> tuple[int, object]:
    try:
        return start_redis_server(work_dir, password=PASSWORD, tls=tls)
    except RuntimeError as e:
        if "TLS" in str(e) or "tls" in str(e):
            pytest.skip(f"this redis-server cannot serve TLS: {e}")
        raise


@pytest.fixture(scope="module")
def tls_redis(certs, tmp_path_factory):
    """Port of a TLS-only redis-server (server certificate for 127.0.0.1, no client
    certificates asked) with a password."""
    port, proc = _start(tmp_path_factory.mktemp("redis-tls"),
                        RedisTLS(certs.server_cert, certs.server_key, certs.ca))
    yield port
    stop_redis_server(proc)


def _url(port: int, password: str | None = PASSWORD, **query: str) -> str:
    auth = f":{password}@" if password is not None else ""
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"rediss://{auth}127.0.0.1:{port}/0" + (f"?{q}" if q else "")


def test_index_over_tls_publishes_and_looks_up(tls_redis, certs, caplog):
    caplog.set_level(logging.DEBUG)
    url = _url(tls_redis, ssl_ca_certs=certs.ca)
    idx = make_prefix_index(url, namespace="tls-a")  # verifies: PING over TLS with AUTH
    reader = RedisPrefixIndex(url, namespace="tls-a")  # a second process's view
    try:
        assert idx.register_worker("A", {"role": "prefill"}, 30.0)
        assert idx.publish("A", [BlockStored((11, 12, 13), 0)])
        assert reader.longest_prefix([11, 12, 99]) == {"A": 2}
        assert reader.live_workers() == {"A": {"role": "prefill"}}
        assert idx.heartbeat("A", 30.0) and idx.available and reader.available
        idx.check_integrity()
        assert PASSWORD not in repr(idx) and "***" in repr(idx)
        assert "ssl_ca_certs" in repr(idx)  # the redacted URL keeps its (harmless) options
    finally:
        idx.unregister_worker("A")
        idx.close()
        reader.close()
    assert PASSWORD not in caplog.text


def test_mutual_tls_takes_the_client_certificate_from_the_url(certs, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    port, proc = _start(tmp_path, RedisTLS(certs.server_cert, certs.server_key, certs.ca,
                                           client_cert=certs.client_cert,
                                           client_key=certs.client_key))
    try:
        url = _url(port, ssl_ca_certs=certs.ca, ssl_certfile=certs.client_cert,
                   ssl_keyfile=certs.client_key)
        idx = make_prefix_index(url, namespace="mtls")
        assert idx.register_worker("A", {}, 30.0)
        assert idx.longest_prefix([1]) == {"A": 0}
        idx.close()
        with pytest.raises(ConfigError, match="TLS handshake failed.*ssl_certfile"):
            make_prefix_index(_url(port, ssl_ca_certs=certs.ca), namespace="mtls")
    finally:
        stop_redis_server(proc)
    assert PASSWORD not in caplog.text


def test_refusals_name_the_fix_and_never_show_the_password(tls_redis, certs, caplog):
    caplog.set_level(logging.DEBUG)
    refusals = [
        ("certificate did not verify.*ssl_ca_certs", _url(tls_redis)),  # no CA: not trusted
        ("refused the credentials", _url(tls_redis, password="not-" + PASSWORD,
                                         ssl_ca_certs=certs.ca)),
        ("refused the credentials", _url(tls_redis, password=None, ssl_ca_certs=certs.ca)),
    ]
    for pattern, url in refusals:
        with pytest.raises(ConfigError, match=pattern) as err:
            make_prefix_index(url, namespace="tls-b")  # the launcher stops, clearly
        assert PASSWORD not in str(err.value)
    # A running index meeting a refusal degrades (reads answer {}), and says why once, as an
    # error rather than as an outage.
    bad = RedisPrefixIndex(_url(tls_redis, password="not-" + PASSWORD, ssl_ca_certs=certs.ca),
                           namespace="tls-b")
    assert bad.longest_prefix([1, 2]) == {} and not bad.available
    assert not bad.register_worker("A", {}, 30.0)
    bad.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR
              and "refused the connection" in r.getMessage()]
    assert len(errors) == 1, caplog.text
    # A plaintext client on the TLS port cannot tell a refusal from an outage: degraded.
    plain = make_prefix_index(f"redis://:{PASSWORD}@127.0.0.1:{tls_redis}/0",
                              namespace="tls-b")
    assert not plain.available and plain.longest_prefix([1]) == {}
    plain.close()
    assert PASSWORD not in caplog.text
    assert "not-" + PASSWORD not in caplog.text


def test_url_options_are_checked_before_any_connection(certs, tmp_path):
    base = "rediss://:pw@127.0.0.1:1/0"
    with pytest.raises(ConfigError, match="no such file"):
        RedisPrefixIndex(f"{base}?ssl_ca_certs={tmp_path}/missing.pem")
    with pytest.raises(ConfigError, match="need a rediss:// URL"):
        RedisPrefixIndex(f"redis://127.0.0.1:1/0?ssl_ca_certs={certs.ca}")
    with pytest.raises(ConfigError, match="both ssl_certfile and ssl_keyfile"):
        RedisPrefixIndex(f"{base}?ssl_ca_certs={certs.ca}&ssl_certfile={certs.client_cert}")
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        RedisPrefixIndex(f"{base}?ssl_cert_reqs=sometimes")
    with pytest.raises(ConfigError, match="ssl_check_hostname"):
        RedisPrefixIndex(f"{base}?ssl_check_hostname=maybe")
    # An option redis-py does not know, or a password in the query, is refused by name only.
    with pytest.raises(ConfigError, match="unknown query option.*password") as err:
        RedisPrefixIndex("rediss://127.0.0.1:1/0?password=hunter2-secret")
    assert "hunter2" not in str(err.value)
    assert redact_url("rediss://u:hunter2@h:1/0?password=hunter2&ssl_ca_certs=/ca.pem") == \
        "rediss://u:***@h:1/0?password=***&ssl_ca_certs=/ca.pem"
    # The keyword arguments override the URL's options (and pass the same checks).
    with pytest.raises(ConfigError, match="no such file"):
        RedisPrefixIndex(f"{base}?ssl_ca_certs={certs.ca}", ssl_ca_certs=f"{tmp_path}/nope")


def test_cluster_workers_and_router_share_the_index_over_tls(tls_redis, certs, tmp_path,
                                                            capfd):
    """Two prefill workers publish their blocks over TLS (the URL is all they get); the
    router finds the holder over TLS and the second request reuses its cached prefix."""
    pytest.importorskip("ray")
    from cluster_helpers import ray_session, tiny_model, wait_idle

    from launcher.client import GenerateClient
    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig
    from pdserve_api.messages import build_generate_request
    from pdserve_api.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    model = tiny_model(tmp_path / "llama", seed=9)
    url = _url(tls_redis, ssl_ca_certs=certs.ca)
    cfg = ClusterConfig(model=str(model), num_prefill=2, num_decode=1, redis_url=url,
                        engine={"num_kv_blocks": 96, "max_num_batched_tokens": 256},
                        worker_num_cpus=0.25)
    prefix = [7 + (i * 13) % 280 for i in range(160)]
    hashes = chain_hashes(prefix, 16)
    with ray_session(), LocalCluster(cfg) as cluster:
        deadline = time.monotonic() + 20
        while set(cluster.index.live_workers()) != {"prefill-0", "prefill-1"}:
            assert time.monotonic() < deadline, "the workers never registered over TLS"
            time.sleep(0.05)
        with GenerateClient(cluster.address) as client:
            a = client.generate(build_generate_request(token_ids=prefix + [11, 12, 13],
                                                       sampling=greedy)).final
            assert a.cached_tokens == 0
            deadline = time.monotonic() + 10
            while cluster.index.longest_prefix(hashes).get(a.prefill_worker, 0) < len(hashes):
                assert time.monotonic() < deadline, "prefix blocks never reached the index"
                time.sleep(0.05)
            b = client.generate(build_generate_request(token_ids=prefix + [21, 22, 23, 24],
                                                       sampling=greedy)).final
        assert b.prefill_worker == a.prefill_worker
        assert b.cached_tokens == 160
        assert cluster.index.available
        wait_idle(cluster)
    out, err = capfd.readouterr()  # this process's output and the workers' forwarded logs
    assert PASSWORD not in out + err
