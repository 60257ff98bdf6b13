"""Redis URLs: the TLS settings a rediss:// URL carries, and redaction for logs and repr.

TLS (rediss://): the settings ride in the URL's query string, so that the one URL a launcher
hands every process (router, and each worker through WorkerSpec.redis_url) configures them
all: `rediss://:PASSWORD@host:6380/0?ssl_ca_certs=/etc/ca.pem[&ssl_certfile=..&ssl_keyfile=..]`
(`TLS_URL_OPTIONS`; the files must exist on every host that uses the URL). Keyword arguments
override the URL's. Unknown query options are refused by name, never echoing values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from pdserve_api.errors import ConfigError

# TLS settings a rediss:// URL may carry in its query string (see the module docstring).
TLS_URL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                   "ssl_check_hostname")
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
_SECRET_QUERY_KEYS = ("password", "ssl_password")  # redact_url hides these too


def redact_url(url: str) -> str:
    """The URL with any password (user info, or a password query option) replaced by '***',
    for logs and repr."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k in _SECRET_QUERY_KEYS for k, _ in query):
        parts = parts._replace(query=urlencode(
            [(k, "***" if k in _SECRET_QUERY_KEYS else v) for k, v in query], safe="/*"))
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"{user}:***@{host}")
    return urlunsplit(parts)


def _url_tls_options(url: str) -> tuple[str, dict[str, Any]]:
    """Split the TLS_URL_OPTIONS off a Redis URL's query: (the rest of the URL, options).

    Other query options pass through only when redis-py knows them (db, timeouts...); any
    other name is refused, by name only (a value may be a secret).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    unknown = sorted({k for k, _ in query
                      if k not in TLS_URL_OPTIONS and k not in URL_QUERY_ARGUMENT_PARSERS})
    if unknown:
        raise ConfigError(f"prefix index URL: unknown query option(s) {', '.join(unknown)} "
                          f"(TLS options: {', '.join(TLS_URL_OPTIONS)}; a password goes in "
                          "the URL's user info: rediss://:PASSWORD@host:port/db)")
    options: dict[str, Any] = {k: v for k, v in query if k in TLS_URL_OPTIONS}
    if "ssl_check_hostname" in options:
        value = options["ssl_check_hostname"].lower()
        if value not in ("true", "false", "yes", "no", "1", "0"):
            raise ConfigError(f"prefix index URL: ssl_check_hostname must be true or false, "
                              f"got {options['ssl_check_hostname']!r}")
        options["ssl_check_hostname"] = value in ("true", "yes", "1")
    rest = urlencode([(k, v) for k, v in query if k not in TLS_URL_OPTIONS], safe="/")
    return urlunsplit(parts._replace(query=rest)), options


def redis_tls_options(url: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split and check a Redis URL's TLS settings: (the URL without them, redis-py's TLS
    keyword arguments). `overrides` that are not None win over the URL's options.

    ConfigError for an unknown query option, a bad value, a missing file, half a client
    certificate, or TLS options on a plaintext redis:// URL.
    """
    scheme = urlsplit(url).scheme
    url, tls = _url_tls_options(url)
    tls.update({k: v for k, v in overrides.items() if v is not None})
    if scheme == "rediss":
        tls.setdefault("ssl_cert_reqs", "required")
        if tls["ssl_cert_reqs"] not in ("required", "optional", "none"):
            raise ConfigError(f"ssl_cert_reqs must be required, optional or none, got "
                              f"{tls['ssl_cert_reqs']!r}")
        for key in TLS_FILES:
            if key in tls and not Path(tls[key]).is_file():
                raise ConfigError(f"prefix index TLS: {key} {tls[key]}: no such file")
        if ("ssl_certfile" in tls) != ("ssl_keyfile" in tls):
            raise ConfigError("prefix index TLS: a client certificate needs both "
                              "ssl_certfile and ssl_keyfile")
    elif tls:
        raise ConfigError(f"TLS options ({', '.join(sorted(tls))}) need a rediss:// URL")
    return url, tls
