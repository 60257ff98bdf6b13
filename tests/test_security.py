"""API keys and (mutual) TLS on the public endpoints, against a real cluster (Ray, gRPC,
HTTP)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request

import grpc
import pytest

ray = pytest.importorskip("ray")

from cluster_helpers import ray_session, tiny_model

from engine.sampling_params import SamplingParams
from router.api import build_generate_request
from router.auth import ApiKeys, AuthError, new_key_line
from router.client import GenerateClient
from router.cluster import ClusterConfig, LocalCluster
from router.server import RouterConfig

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


def _certs(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now)
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    def write(stem, cert, key):
        (tmp_path / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return str(tmp_path / f"{stem}.pem"), str(tmp_path / f"{stem}.key")

    ca, ca_key = make("pdserve test CA", ca=True)
    server, server_key = make("router", ca, ca_key,
                              san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client, client_key = make("client", ca, ca_key)
    return (write("ca", ca, ca_key)[0], *write("server", server, server_key),
            *write("client", client, client_key))


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    model = tiny_model(tmp / "llama", seed=5)
    ca, cert, key, client_cert, client_key = _certs(tmp)
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
    assert json.load(err.value)["error"]["type"] == "authentication_error"
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
