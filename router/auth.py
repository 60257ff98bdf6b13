"""API keys for the public endpoints: stored hashed, compared in constant time, each with its
own rate limit.

Key file (`--api-keys FILE` or $PDSERVE_API_KEYS_FILE), one key per line, `#` comments:

    NAME SHA256_HEX [RATE_PER_S [BURST]]

`pdserve api-key NAME` prints a new random key (give it to the client) and its line (store
it). Clients send `authorization: Bearer KEY` (gRPC metadata or HTTP header). Health checks,
reflection and /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path


class AuthError(Exception):
    """`status` is "unauthenticated" (no/unknown key) or "rate_limited"."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_line(name: str, rate_per_s: float | None = None) -> tuple[str, str]:
    """A fresh key and the line that stores its hash."""
    key = "pds-" + secrets.token_urlsafe(32)
    line = f"{name} {hash_key(key)}" + (f" {rate_per_s:g}" if rate_per_s else "")
    return key, line


@dataclass
class _Bucket:
    """Token bucket: `rate` requests/s sustained, `burst` at once."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class _Key:
    name: str
    digest: bytes
    bucket: _Bucket | None


class ApiKeys:
    def __init__(self, keys: list[_Key]):
        if not keys:
            raise ValueError("an API key file with no keys would lock everyone out")
        self._keys = keys

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        keys = []
        for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].split()
            if not line:
                continue
            if len(line) not in (2, 3, 4) or len(line[1]) != 64:
                raise ValueError(f"{path}:{n}: expected 'NAME SHA256_HEX [RATE [BURST]]'")
            try:
                digest = bytes.fromhex(line[1])
                rate = float(line[2]) if len(line) > 2 else 0.0  # 0: no limit
                burst = float(line[3]) if len(line) > 3 else max(1.0, rate)
            except ValueError:
                raise ValueError(f"{path}:{n}: bad hash or rate") from None
            keys.append(_Key(line[0], digest, _Bucket(rate, burst) if rate else None))
        return cls(keys)

    def check(self, authorization: str | None) -> str:
        """The key's name, or AuthError. Compares against every key (no early exit) with a
        constant-time comparison, so timing says nothing about which key was close."""
        presented = (authorization or "").strip()
        if presented.lower().startswith("bearer "):
            presented = presented[7:].strip()
        if not presented:
            raise AuthError("unauthenticated", "missing API key: send 'authorization: "
                                               "Bearer <key>'")
        digest = hashlib.sha256(presented.encode()).digest()
        match = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                match = key
        if match is None:
            raise AuthError("unauthenticated", "invalid API key")
        if match.bucket is not None and not match.bucket.take(time.monotonic()):
            raise AuthError("rate_limited", f"rate limit of key {match.name!r} exceeded "
                                            f"({match.bucket.rate:g} requests/s)")
        return match.name
