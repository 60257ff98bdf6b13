"""Throwaway PEM files for the TLS tests (gRPC/HTTP endpoints, Redis): a CA, a server
certificate for 127.0.0.1 and a client certificate, all signed by the CA, valid for a day."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import NamedTuple


class Certs(NamedTuple):
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_certs(directory: Path) -> Certs:
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
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return str(directory / f"{stem}.pem"), str(directory / f"{stem}.key")

    directory = Path(directory)
    ca, ca_key = make("pdserve test CA", ca=True)
    server, server_key = make("server", ca, ca_key,
                              san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client, client_key = make("client", ca, ca_key)
    return Certs(write("ca", ca, ca_key)[0], *write("server", server, server_key),
                 *write("client", client, client_key))
