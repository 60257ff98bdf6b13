"""Prefix-cache index: which worker holds which chained block hash (DESIGN: request path step 2).

Workers publish the hashes of the KV blocks they store and evict (engine/block_manager.py's
`BlockStored` / `BlockRemoved` events, hashes from engine/hashing.py); the router asks, for a
prompt's hash chain, how many LEADING blocks each live worker holds. Because hash i covers
blocks 0..i, holding block i without block i-1 cannot happen for one worker's consistent view,
but a stale or partial view can show it, so a worker's count stops at its first miss.

Contract (both implementations):
- `register_worker(id, info, ttl_s)` registers a worker for ttl_s seconds and starts it with
  no entries (a worker (re)starts with an empty cache, so entries left under its id are stale);
  `heartbeat(id, ttl_s)` extends it (re-registering with the last known info, keeping entries,
  when it has lapsed). A worker whose registration expired stops counting in `longest_prefix`
  and `live_workers` at once; its block entries linger but are ignored, and are deleted
  lazily (a bounded sweep on every heartbeat, by any worker).
  Register before publishing: entries of a worker with no registration may be swept.
- `heartbeat` returns True when the index's view of the worker is intact, False when the
  caller should republish its full cached set with `resync_worker(id, hashes)`: the
  registration had lapsed (expired, or Redis restarted and lost everything), or events were
  dropped while Redis was unreachable.
- `apply_events(id, stored, removed)` adds, then removes, hash -> worker membership. Net an
  ordered event list first with `events_to_changes`, or call `publish(id, drain_events())`.
- `longest_prefix(chain)` -> {worker: leading blocks held} for every live worker, in one
  round trip (a Lua script that stops as soon as every worker has missed).
- `unregister_worker(id)` drops the registration and all its entries.
- `live_workers()` -> {worker: info}.

The index is a hint (a stale entry costs a recompute, never a wrong answer). Degraded mode of
`RedisPrefixIndex` when Redis is unreachable or errors:
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

TLS (rediss://): the settings ride in the URL's query string, so that the one URL a launcher
hands every process (router, and each worker through WorkerSpec.redis_url) configures them
all: `rediss://:PASSWORD@host:6380/0?ssl_ca_certs=/etc/ca.pem[&ssl_certfile=..&ssl_keyfile=..]`
(`TLS_URL_OPTIONS`; the files must exist on every host that uses the URL). Keyword arguments
override the URL's. Unknown query options are refused by name, never echoing values.

Redis layout, all keys under the hash tag `{namespace}` so a Redis Cluster keeps them in one
slot (the scripts touch keys they cannot declare up front):
  {ns}:workers      set of worker ids that are registered or may still have entries
  {ns}:w:<id>       registration: JSON info, with a PX expiry (the TTL)
  {ns}:wb:<id>      set of hashes worker <id> holds (to drop them on unregister/expiry)
  {ns}:b:<hash>     set of worker ids holding block <hash>
Hashes are decimal strings of the unsigned 64-bit value: Lua numbers are doubles and would
round them. Needs Redis >= 6.2 (SMISMEMBER).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pdserve_api.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


class BlockChanges(NamedTuple):
    """Net effect of an ordered event list: disjoint hash lists (unpacks as a tuple)."""

    stored: list[int]
    removed: list[int]


def events_to_changes(events: Iterable[Any]) -> BlockChanges:
    """Net BlockStored/BlockRemoved events (in order) into (stored, removed).

    A hash stored then removed in one batch ends up removed, and removed then stored ends up
    stored, so applying the two lists in any order gives the same membership as replaying the
    events. Events are read by class name so this module need not import the engine.
    """
    last: dict[int, bool] = {}
    for ev in events:
        kind = type(ev).__name__
        if kind == "BlockStored":
            present = True
        elif kind == "BlockRemoved":
            present = False
        else:
            raise TypeError(f"not a block event: {ev!r}")
        for h in ev.block_hashes:
            last.pop(h, None)  # re-insert so the result keeps the last event's order
            last[h] = present
    return BlockChanges([h for h, p in last.items() if p], [h for h, p in last.items() if not p])


class PrefixIndex(ABC):
    """The interface both implementations share; see the module docstring for the contract."""

    @abstractmethod
    def register_worker(self, worker_id: str, info: dict[str, str], ttl_s: float) -> bool: ...

    @abstractmethod
    def heartbeat(self, worker_id: str, ttl_s: float) -> bool: ...

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> bool: ...

    @abstractmethod
    def apply_events(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int] = ()
    ) -> bool: ...

    @abstractmethod
    def resync_worker(self, worker_id: str, hashes: Iterable[int]) -> bool: ...

    @abstractmethod
    def longest_prefix(self, block_hashes: Sequence[int]) -> dict[str, int]: ...

    @abstractmethod
    def live_workers(self) -> dict[str, dict[str, str]]: ...

    @abstractmethod
    def check_integrity(self) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional: the in-process index holds nothing
        pass

    def publish(self, worker_id: str, events: Iterable[Any]) -> bool:
        """Apply a block manager's `drain_events()` output."""
        stored, removed = events_to_changes(events)
        if not stored and not removed:
            return True
        return self.apply_events(worker_id, stored, removed)


def make_prefix_index(url: str | None, *, verify: bool = True, **kwargs: Any) -> PrefixIndex:
    """Redis index for a redis:// or rediss:// URL; the in-process one for None or "".

    `verify` asks Redis once (`RedisPrefixIndex.verify`): ConfigError when it refuses the
    credentials or the TLS handshake; an unreachable Redis only degrades, as at any time.
    """
    if not url:
        return InProcessPrefixIndex()
    index = RedisPrefixIndex(url, **kwargs)
    if verify:
        try:
            index.verify()
        except BaseException:
            index.close()
            raise
    return index


# ---- in process ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Registration:
    info: dict[str, str]
    expires_at: float


class InProcessPrefixIndex(PrefixIndex):
    """Same semantics as RedisPrefixIndex, in one process (a single router, no Redis).

    Thread-safe (one lock). `clock` is injectable for tests; it defaults to time.monotonic.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._regs: dict[str, _Registration] = {}
        self._blocks: dict[int, set[str]] = {}  # hash -> workers holding it
        self._worker_blocks: dict[str, set[int]] = {}  # worker -> hashes it holds

    def register_worker(self, worker_id: str, info: dict[str, str], ttl_s: float) -> bool:
        with self._lock:
            self._regs[worker_id] = _Registration(dict(info), self._clock() + ttl_s)
            self._drop_blocks(worker_id)
            return True

    def heartbeat(self, worker_id: str, ttl_s: float) -> bool:
        with self._lock:
            now = self._clock()
            reg = self._regs.get(worker_id)
            intact = reg is not None and reg.expires_at > now
            if reg is None:
                reg = self._regs[worker_id] = _Registration({}, now)
            reg.expires_at = now + ttl_s
            self._sweep_expired(now)
            return intact

    def unregister_worker(self, worker_id: str) -> bool:
        with self._lock:
            self._regs.pop(worker_id, None)
            self._drop_blocks(worker_id)
            return True

    def apply_events(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int] = ()
    ) -> bool:
        with self._lock:
            mine = self._worker_blocks.setdefault(worker_id, set())
            for h in stored:
                self._blocks.setdefault(h, set()).add(worker_id)
                mine.add(h)
            for h in removed:
                holders = self._blocks.get(h)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del self._blocks[h]
                mine.discard(h)
            if not mine:
                del self._worker_blocks[worker_id]
            return True

    def resync_worker(self, worker_id: str, hashes: Iterable[int]) -> bool:
        with self._lock:
            self._drop_blocks(worker_id)
        return self.apply_events(worker_id, list(hashes))

    def longest_prefix(self, block_hashes: Sequence[int]) -> dict[str, int]:
        with self._lock:
            now = self._clock()
            active = [w for w, r in self._regs.items() if r.expires_at > now]
            result: dict[str, int] = {}
            for depth, h in enumerate(block_hashes):
                if not active:
                    break
                holders = self._blocks.get(h, set())
                for w in active:
                    if w not in holders:
                        result[w] = depth
                active = [w for w in active if w in holders]
            for w in active:
                result[w] = len(block_hashes)
            return result

    def live_workers(self) -> dict[str, dict[str, str]]:
        with self._lock:
            now = self._clock()
            return {w: dict(r.info) for w, r in self._regs.items() if r.expires_at > now}

    def check_integrity(self) -> None:
        with self._lock:
            for h, holders in self._blocks.items():
                assert holders, f"empty holder set for {h}"
                for w in holders:
                    assert h in self._worker_blocks.get(w, ()), f"{w} misses {h} in its set"
            for w, hashes in self._worker_blocks.items():
                assert hashes, f"empty block set for {w}"
                for h in hashes:
                    assert w in self._blocks.get(h, ()), f"block {h} misses holder {w}"

    # The caller holds the lock.
    def _drop_blocks(self, worker_id: str) -> None:
        for h in self._worker_blocks.pop(worker_id, ()):
            holders = self._blocks[h]
            holders.discard(worker_id)
            if not holders:
                del self._blocks[h]

    def _sweep_expired(self, now: float) -> None:
        for w in [w for w, r in self._regs.items() if r.expires_at <= now]:
            del self._regs[w]
            self._drop_blocks(w)
        # Entries of workers that never registered (or whose registration was swept) too.
        for w in [w for w in self._worker_blocks if w not in self._regs]:
            self._drop_blocks(w)


# ---- Redis ---------------------------------------------------------------------------------

# Shared Lua helper: drop up to `budget` of worker w's entries; returns how many it dropped.
_LUA_DROP = """
local function drop(prefix, w, budget)
  local hashes = redis.call('SPOP', prefix .. 'wb:' .. w, budget)
  for _, h in ipairs(hashes) do
    redis.call('SREM', prefix .. 'b:' .. h, w)
  end
  return #hashes
end
"""

# KEYS: workers set, registration key. ARGV: worker id, ttl ms, info JSON or '' (unknown here:
# only extend, so a heartbeat from another process does not clobber the info).
# Returns 1 if the registration existed before this call.
_LUA_REGISTER = """
local existed = redis.call('EXISTS', KEYS[2])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
elseif existed == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], '{}', 'PX', ARGV[2])
end
redis.call('SADD', KEYS[1], ARGV[1])
return existed
"""

# KEYS: workers set, registration key, worker's hash set. ARGV: prefix, worker id, #stored,
# ttl ms, info JSON or '', then the stored hashes followed by the removed ones.
# Returns 1 if the worker was registered (its view is intact).
_LUA_APPLY = """
local prefix, w, ns = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('SADD', KEYS[1], w)
for i = 6, 5 + ns do
  redis.call('SADD', prefix .. 'b:' .. ARGV[i], w)
  redis.call('SADD', KEYS[3], ARGV[i])
end
for i = 6 + ns, #ARGV do
  redis.call('SREM', prefix .. 'b:' .. ARGV[i], w)
  redis.call('SREM', KEYS[3], ARGV[i])
end
local existed = redis.call('EXISTS', KEYS[2])
if existed == 0 and ARGV[5] ~= '' then
  -- Redis lost the registration (restart): rewrite it so these entries are not swept.
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
end
return existed
"""

# KEYS: workers set. ARGV: prefix, then the chain's hashes. Returns a flat
# [worker, count, worker, count, ...] for every registered worker. Walks the chain once,
# asking each block's holder set about all still-matching workers at once (SMISMEMBER), and
# stops as soon as no worker matches any more.
_LUA_LONGEST_PREFIX = """
local prefix = ARGV[1]
local active, out = {}, {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', prefix .. 'w:' .. w) == 1 then
    active[#active + 1] = w
  end
end
local n = #ARGV - 1
local depth = 0
while #active > 0 and depth < n do
  local flags = redis.call('SMISMEMBER', prefix .. 'b:' .. ARGV[depth + 2], unpack(active))
  local still = {}
  for i, w in ipairs(active) do
    if flags[i] == 1 then
      still[#still + 1] = w
    else
      out[#out + 1] = w
      out[#out + 1] = depth
    end
  end
  active = still
  depth = depth + 1
end
for _, w in ipairs(active) do
  out[#out + 1] = w
  out[#out + 1] = depth
end
return out
"""

# KEYS: workers set. ARGV: prefix. Returns flat [worker, info JSON, ...] of registered workers.
_LUA_LIVE = """
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. 'w:' .. w)
  if info then
    out[#out + 1] = w
    out[#out + 1] = info
  end
end
return out
"""

# KEYS: workers set. ARGV: prefix, worker id, budget. Drops up to budget of the worker's
# entries (registered or not: unregister and resync use it); once none are left and the
# worker is unregistered, forgets its id. Returns how many entries are left.
_LUA_DROP_WORKER = _LUA_DROP + """
local prefix, w = ARGV[1], ARGV[2]
drop(prefix, w, tonumber(ARGV[3]))
local left = redis.call('SCARD', prefix .. 'wb:' .. w)
if left == 0 and redis.call('EXISTS', prefix .. 'w:' .. w) == 0 then
  redis.call('SREM', KEYS[1], w)
end
return left
"""

# KEYS: workers set. ARGV: prefix, budget. The lazy cleanup: drops up to budget entries of
# workers whose registration expired, forgetting a worker once it has none left.
# Returns how many entries it dropped.
_LUA_SWEEP = _LUA_DROP + """
local prefix, budget = ARGV[1], tonumber(ARGV[2])
local dropped = 0
for _, w in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if dropped >= budget then break end
  if redis.call('EXISTS', prefix .. 'w:' .. w) == 0 then
    dropped = dropped + drop(prefix, w, budget - dropped)
    if redis.call('SCARD', prefix .. 'wb:' .. w) == 0 then
      redis.call('SREM', KEYS[1], w)
    end
  end
end
return dropped
"""


# TLS settings a rediss:// URL may carry in its query string (see the module docstring).
TLS_URL_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                   "ssl_check_hostname")
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
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
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

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
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if not namespace or "{" in namespace or "}" in namespace:
            raise ConfigError(f"namespace must be non-empty without braces, got {namespace!r}")
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss"):
            raise ConfigError(f"prefix index URL must be redis:// or rediss://, got {scheme}://")
        self._redacted_url = redact_url(url)  # the URL as given, TLS options and all
        url, tls = _url_tls_options(url)
        given = {"ssl_ca_certs": ssl_ca_certs, "ssl_certfile": ssl_certfile,
                 "ssl_keyfile": ssl_keyfile, "ssl_cert_reqs": ssl_cert_reqs,
                 "ssl_check_hostname": ssl_check_hostname}
        tls.update({k: v for k, v in given.items() if v is not None})
        if scheme == "rediss":
            tls.setdefault("ssl_cert_reqs", "required")
            if tls["ssl_cert_reqs"] not in ("required", "optional", "none"):
                raise ConfigError(f"ssl_cert_reqs must be required, optional or none, got "
                                  f"{tls['ssl_cert_reqs']!r}")
            for key in _TLS_FILES:
                if key in tls and not Path(tls[key]).is_file():
                    raise ConfigError(f"prefix index TLS: {key} {tls[key]}: no such file")
            if ("ssl_certfile" in tls) != ("ssl_keyfile" in tls):
                raise ConfigError("prefix index TLS: a client certificate needs both "
                                  "ssl_certfile and ssl_keyfile")
        elif tls:
            raise ConfigError(f"TLS options ({', '.join(sorted(tls))}) need a rediss:// URL")
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
        self._register_script = self._redis.register_script(_LUA_REGISTER)
        self._apply_script = self._redis.register_script(_LUA_APPLY)
        self._lookup_script = self._redis.register_script(_LUA_LONGEST_PREFIX)
        self._live_script = self._redis.register_script(_LUA_LIVE)
        self._drop_worker_script = self._redis.register_script(_LUA_DROP_WORKER)
        self._sweep_script = self._redis.register_script(_LUA_SWEEP)
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
