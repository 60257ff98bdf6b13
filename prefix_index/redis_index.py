"""The prefix index in Redis, shared by every router and worker of a cluster.

The contract is in `interface.py`; the key layout and the scripts in `lua.py`; the URL's TLS
options in `url.py`.

The index is a hint (a stale entry costs a recompute, never a wrong answer). Degraded mode
when Redis is unreachable or errors:
- Reads never raise: `longest_prefix` and `live_workers` return {} (the router then routes
  on load only). After a failure, reads skip Redis for `retry_interval_s` so a dead Redis
  costs a routing decision nothing, not a socket timeout per request. `available` tells
  whether the last call succeeded (for metrics and health pages).
- Writes never raise either: `apply_events` DROPS the batch (no backlog: after an outage Redis
  has often restarted empty anyway) and marks the worker for resync, which the next
  successful `heartbeat` reports by returning False. `register_worker`/`heartbeat` return False.
- Recovery is automatic: heartbeats always try Redis (they are the probe), redis-py
  reconnects on the next call, and a lapsed registration is rewritten by the heartbeat.
- Connect/socket timeouts are short (0.3 s) and there is at most one immediate retry, so a
  call never blocks for long. The password (argument or URL) is never logged or repr'd.
- A refusal is not an outage: wrong credentials or a failed TLS handshake are logged as an
  error naming the fix, and `make_prefix_index` (the launcher's start-up) raises ConfigError
  for them instead of starting degraded.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pdserve_api.errors import ConfigError
from prefix_index import lua
from prefix_index.interface import PrefixIndex
from prefix_index.url import redact_url, redis_tls_options

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class _LocalWorker:
    """What this client remembers about a worker it registered (to re-register it)."""

    info_json: str
    ttl_ms: int
    dirty: bool = False  # events were dropped: the index's view of it is not intact


@dataclass
class RedisTimeouts:
    connect_s: float = 0.3
    socket_s: float = 0.3
    # After a failed call, reads skip Redis this long (heartbeats still probe).
    retry_interval_s: float = 1.0


class RedisPrefixIndex(PrefixIndex):
    """The prefix index in Redis, shared by every router and worker of a cluster.

    `url`: redis://[user[:password]@]host:port/db, or rediss:// for TLS (then `ssl_ca_certs`,
    `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs`, `ssl_check_hostname` apply, from these
    arguments or the URL's query). `password` and the TLS arguments override the URL's.
    """

    MAX_ARGS_PER_CALL = 10_000  # hashes per script call, so one call never holds Redis long
    SWEEP_BUDGET = 2_000  # stale entries dropped per heartbeat

    def __init__(
        self,
        url: str,
        namespace: str = "pdserve",
        password: str | None = None,
        *,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_cert_reqs: str | None = None,
        ssl_check_hostname: bool | None = None,
        timeouts: RedisTimeouts | None = None,
    ):
        if not namespace or "{" in namespace or "}" in namespace:
            raise ConfigError(f"namespace must be non-empty without braces, got {namespace!r}")
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss"):
            raise ConfigError(f"prefix index URL must be redis:// or rediss://, got {scheme}://")
        self._redacted_url = redact_url(url)  # the URL as given, TLS options and all
        url, tls = redis_tls_options(url, {
            "ssl_ca_certs": ssl_ca_certs, "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile, "ssl_cert_reqs": ssl_cert_reqs,
            "ssl_check_hostname": ssl_check_hostname})
        self.timeouts = timeouts or RedisTimeouts()
        self._prefix = "{" + namespace + "}:"
        self._workers_key = self._prefix + "workers"
        kwargs: dict[str, Any] = dict(
            socket_connect_timeout=self.timeouts.connect_s,
            socket_timeout=self.timeouts.socket_s,
            # One immediate retry: it reconnects a pooled socket that died with a restarted
            # server; the default (3 retries with backoff) would stall routing for seconds.
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
            **tls,
        )
        if password is not None:
            kwargs["password"] = password
        self._redis = redis.Redis.from_url(url, **kwargs)
        self._error_types: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._response_error: type[BaseException] = redis.ResponseError
        self._auth_errors: tuple[type[BaseException], ...] = (
            redis.AuthenticationError, redis.exceptions.AuthorizationError,
            redis.exceptions.AuthenticationWrongNumberOfArgsError)
        # Called as EVALSHA; redis-py reloads a script on NOSCRIPT (a restarted server).
        self._register_script = self._redis.register_script(lua.REGISTER)
        self._apply_script = self._redis.register_script(lua.APPLY)
        self._lookup_script = self._redis.register_script(lua.LONGEST_PREFIX)
        self._live_script = self._redis.register_script(lua.LIVE)
        self._drop_worker_script = self._redis.register_script(lua.DROP_WORKER)
        self._sweep_script = self._redis.register_script(lua.SWEEP)
        self._lock = threading.Lock()
        self._local: dict[str, _LocalWorker] = {}
        self._down_until = 0.0
        self.available = True

    def __repr__(self) -> str:
        return f"RedisPrefixIndex({self._redacted_url!r}, namespace={self._prefix[1:-2]!r})"

    # ---- registration ----------------------------------------------------------------------

    def register_worker(self, worker_id: str, info: dict[str, str], ttl_s: float) -> bool:
        local = _LocalWorker(json.dumps(dict(info), sort_keys=True), _ttl_ms(ttl_s))
        with self._lock:
            old = self._local.get(worker_id)
            local.dirty = old is not None and old.dirty
            self._local[worker_id] = local
        ok = self._call(lambda: self._register_script(
            keys=[self._workers_key, self._reg_key(worker_id)],
            args=[worker_id, local.ttl_ms, local.info_json]), None, probe=True)
        return ok is not None and self._drop_all(worker_id)

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        with self._lock:
            local = self._local.get(worker_id)
            if local is not None:
                local.ttl_ms = _ttl_ms(ttl_s)
        info_json = local.info_json if local is not None else ""
        existed = self._call(lambda: self._register_script(
            keys=[self._workers_key, self._reg_key(worker_id)],
            args=[worker_id, _ttl_ms(ttl_s), info_json]), None, probe=True)
        if existed is None:
            if local is not None:
                local.dirty = True
            return False
        self._call(lambda: self._sweep_script(
            keys=[self._workers_key], args=[self._prefix, self.SWEEP_BUDGET]), None)
        return bool(existed) and not (local is not None and local.dirty)

    def unregister_worker(self, worker_id: str) -> bool:
        with self._lock:
            self._local.pop(worker_id, None)
        if self._call(lambda: self._redis.delete(self._reg_key(worker_id)), None,
                      probe=True) is None:
            return False
        return self._drop_all(worker_id)

    # ---- block membership ------------------------------------------------------------------

    def apply_events(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int] = ()
    ) -> bool:
        stored_s = [_key_of(h) for h in stored]
        removed_s = [_key_of(h) for h in removed]
        local = self._local.get(worker_id)
        if self._skip_now():
            if local is not None:
                local.dirty = True
            return False
        info_json = local.info_json if local is not None else ""
        ttl_ms = local.ttl_ms if local is not None else 0
        intact = True
        keys = [self._workers_key, self._reg_key(worker_id), self._wb_key(worker_id)]
        for cs, cr in _chunks(stored_s, removed_s, self.MAX_ARGS_PER_CALL):
            args: list[str | int] = [self._prefix, worker_id, len(cs), ttl_ms, info_json,
                                     *cs, *cr]
            existed = self._call(partial(self._apply_script, keys=keys, args=args), None)
            if existed is None:
                if local is not None:
                    local.dirty = True
                return False
            intact = intact and bool(existed)
        if not intact and local is not None:
            local.dirty = True  # Redis had lost the worker: its older entries are gone too
        return True

    def resync_worker(self, worker_id: str, hashes: Iterable[int]) -> bool:
        """Replace the worker's entries with `hashes` (its full cached set); clears dirty."""
        hashes = list(hashes)
        local = self._local.get(worker_id)
        if local is not None:
            local.dirty = False
        if not self._drop_all(worker_id) or not self.apply_events(worker_id, hashes):
            if local is not None:
                local.dirty = True
            return False
        return True

    # ---- lookups ---------------------------------------------------------------------------

    def longest_prefix(self, block_hashes: Sequence[int]) -> dict[str, int]:
        if self._skip_now():
            return {}
        flat = self._call(lambda: self._lookup_script(
            keys=[self._workers_key], args=[self._prefix, *map(_key_of, block_hashes)]), None)
        if flat is None:
            return {}
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def live_workers(self) -> dict[str, dict[str, str]]:
        if self._skip_now():
            return {}
        flat = self._call(lambda: self._live_script(
            keys=[self._workers_key], args=[self._prefix]), None)
        if flat is None:
            return {}
        return {flat[i]: json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}

    def check_integrity(self) -> None:
        """Holder sets and per-worker sets mirror each other (test helper: SCANs the keys)."""
        r = self._redis  # decode_responses=True: every reply below is str
        workers = cast("set[str]", r.smembers(self._workers_key))
        per_worker = {w: cast("set[str]", r.smembers(self._wb_key(w))) for w in workers}
        for w, hashes in per_worker.items():
            for h in hashes:
                assert r.sismember(self._prefix + "b:" + h, w), f"block {h} misses holder {w}"
        for key in r.scan_iter(match=_glob_escape(self._prefix) + "b:*", count=1000):
            block = cast(str, key)[len(self._prefix) + 2:]
            for w in cast("set[str]", r.smembers(key)):
                assert block in per_worker.get(w, ()), f"{w} misses {block} in its set"
        for key in r.scan_iter(match=_glob_escape(self._prefix) + "wb:*", count=1000):
            w = cast(str, key)[len(self._prefix) + 3:]
            assert w in workers, f"worker {w} has entries but is not in the workers set"

    def close(self) -> None:
        self._redis.close()

    def verify(self) -> bool:
        """Ask Redis once (PING), at start-up. Raises ConfigError when Redis refuses us (the
        credentials, or the TLS handshake): a misconfiguration, which should stop a launcher
        rather than leave it routing on load only for good. Returns False, logged, when Redis
        is merely unreachable (degraded as usual, recovering on its own)."""
        try:
            self._redis.ping()
        except self._error_types as e:
            refusal = self._refusal(e)
            if refusal is not None:
                raise ConfigError(f"prefix index {self._redacted_url}: {refusal}") from None
            self._note_failure(e)
            return False
        self.available = True
        return True

    # ---- internals -------------------------------------------------------------------------

    def _reg_key(self, worker_id: str) -> str:
        return self._prefix + "w:" + worker_id

    def _wb_key(self, worker_id: str) -> str:
        return self._prefix + "wb:" + worker_id

    def _drop_all(self, worker_id: str) -> bool:
        while True:
            left = self._call(lambda: self._drop_worker_script(
                keys=[self._workers_key], args=[self._prefix, worker_id,
                                                self.MAX_ARGS_PER_CALL]), None, probe=True)
            if left is None:
                return False
            if left == 0:
                return True

    def _skip_now(self) -> bool:
        return time.monotonic() < self._down_until

    def _note_failure(self, e: BaseException) -> None:
        """Log a failed call (once per outage; always for server-side errors) and go degraded.
        redis-py's and the server's messages carry no credentials."""
        self._down_until = time.monotonic() + self.timeouts.retry_interval_s
        refusal = self._refusal(e)
        if isinstance(e, self._response_error):
            # A server-side error is a bug or a misconfiguration (e.g. Redis < 6.2), not
            # an outage: always say so.
            log.error("prefix index %s: %s: %s", self._redacted_url, type(e).__name__, e)
        elif refusal is not None and self.available:
            log.error("prefix index %s refused the connection: %s; routing on load only until "
                      "that is fixed", self._redacted_url, refusal)
        elif self.available:
            log.warning("prefix index %s unreachable (%s: %s); routing on load only until "
                        "it answers", self._redacted_url, type(e).__name__, e)
        self.available = False

    def _refusal(self, e: BaseException) -> str | None:
        """What the user must fix when Redis refused us (credentials, TLS); None for an
        outage (refused/reset TCP connection, timeout) or any other error."""
        if isinstance(e, self._auth_errors):
            return (f"Redis refused the credentials ({e}); check the user and password in "
                    "the URL")
        cause: BaseException | None = e
        for _ in range(8):  # the TLS error is the context of redis-py's ConnectionError
            if cause is None:
                break
            if isinstance(cause, ssl.SSLCertVerificationError):
                return (f"TLS: Redis's certificate did not verify ({cause.verify_message}); "
                        "give the CA that signed it as ?ssl_ca_certs=PATH in the URL")
            if isinstance(cause, ssl.SSLError):
                return (f"TLS handshake failed ({cause.reason or cause}); a Redis that "
                        "requires client certificates needs ?ssl_certfile=PATH&ssl_keyfile="
                        "PATH in the URL, a plaintext one a redis:// URL")
            cause = cause.__cause__ or cause.__context__
        return None

    def _call(self, fn: Callable[[], T], default: T, probe: bool = False) -> T:
        """Run one Redis call; on any Redis/socket error log once per outage, return default.

        `probe` calls (registration, heartbeats) always try; the others are skipped by
        `_skip_now` while a recent failure says Redis is down.
        """
        if not probe and self._skip_now():
            return default
        try:
            result = fn()
        except self._error_types as e:
            self._note_failure(e)
            return default
        if not self.available:
            log.warning("prefix index %s reachable again", self._redacted_url)
        self.available = True
        self._down_until = 0.0
        return result


def _ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    return max(1, round(ttl_s * 1000))


def _key_of(h: int) -> str:
    if not 0 <= h < 1 << 64:
        raise ValueError(f"block hash out of unsigned 64-bit range: {h}")
    return str(h)


def _chunks(
    stored: list[str], removed: list[str], n: int
) -> Iterable[tuple[list[str], list[str]]]:
    """Split (stored, removed) into calls of at most n hashes; always at least one call."""
    if len(stored) + len(removed) <= n:
        yield stored, removed
        return
    for i in range(0, len(stored), n):
        yield stored[i:i + n], []
    for i in range(0, len(removed), n):
        yield [], removed[i:i + n]


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
