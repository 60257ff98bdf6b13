"""Prefix-cache index: per-worker longest prefix, events, TTL expiry, unregister, a Redis
outage and recovery, and the one-round-trip lookup; in process and against a real
redis-server (started here on a free port, killed by pid)."""

from __future__ import annotations

import logging
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from redis_server import (
    REDIS_SERVER,
    SKIP_REASON,
    redis_port,  # noqa: F401 - the session fixture, used via getfixturevalue
    start_redis_server,
    stop_redis_server,
)

from engine.block_manager import BlockManager, BlockRemoved, BlockStored
from engine.hashing import chain_hashes
from engine.request import Request
from pdserve_api.sampling import SamplingParams
from prefix_index.factory import make_prefix_index
from prefix_index.in_process import InProcessPrefixIndex
from prefix_index.interface import PrefixIndex, events_to_changes
from prefix_index.redis_index import RedisPrefixIndex

BLOCK = 4
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)


def _redis_index(port: int, **kwargs) -> RedisPrefixIndex:
    # A fresh namespace per test keeps tests independent on the shared server.
    return RedisPrefixIndex(f"redis://127.0.0.1:{port}", namespace=f"t-{uuid.uuid4().hex[:8]}",
                            **kwargs)


@pytest.fixture(params=["inprocess", "redis"])
def index(request) -> Iterator[PrefixIndex]:
    if request.param == "inprocess":
        idx: PrefixIndex = make_prefix_index(None)
    else:
        idx = _redis_index(request.getfixturevalue("redis_port"))
    yield idx
    idx.check_integrity()
    idx.close()


def _tokens(n_blocks: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n_blocks * BLOCK + 1)]  # +1: a partial block


def _wait_until(cond: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _abc_setup(idx: PrefixIndex, ttl_a: float = 30.0) -> list[int]:
    """A holds leading blocks 0..2, B holds 0, 1 and 3, C holds only block 1."""
    chain = chain_hashes(_tokens(5, seed=1), BLOCK)
    assert len(chain) == 5
    idx.register_worker("A", {"addr": "a:1"}, ttl_a)
    idx.register_worker("B", {"addr": "b:1"}, 30.0)
    idx.register_worker("C", {"addr": "c:1"}, 30.0)
    assert idx.apply_events("A", chain[:3], [])
    assert idx.apply_events("B", [chain[0], chain[1], chain[3]], [])
    assert idx.apply_events("C", [chain[1]], [])
    return chain


def test_longest_prefix_counts_leading_blocks_per_worker(index):
    chain = _abc_setup(index)
    assert index.longest_prefix(chain) == {"A": 3, "B": 2, "C": 0}
    # A shorter chain caps the count; an unrelated prompt's chain hits nobody.
    assert index.longest_prefix(chain[:2]) == {"A": 2, "B": 2, "C": 0}
    assert index.longest_prefix(chain_hashes(_tokens(4, seed=2), BLOCK)) == {
        "A": 0, "B": 0, "C": 0}
    assert index.longest_prefix([]) == {"A": 0, "B": 0, "C": 0}
    # A prompt extending A's prefix: the shared leading blocks still count.
    tokens = _tokens(5, seed=1)[: 3 * BLOCK] + _tokens(3, seed=3)
    assert index.longest_prefix(chain_hashes(tokens, BLOCK))["A"] == 3
    assert index.live_workers() == {"A": {"addr": "a:1"}, "B": {"addr": "b:1"},
                                    "C": {"addr": "c:1"}}


def test_entries_of_an_unregistered_worker_do_not_count(index):
    chain = _abc_setup(index)
    index.apply_events("ghost", chain, [])  # publishes, never registered
    assert "ghost" not in index.longest_prefix(chain)


def test_removal_events_shrink_the_answer(index):
    chain = _abc_setup(index)
    assert index.apply_events("A", [], [chain[1]])
    assert index.apply_events("B", [], [chain[0]])
    assert index.longest_prefix(chain) == {"A": 1, "B": 0, "C": 0}
    assert index.apply_events("A", [chain[1]], [])  # stored again
    assert index.longest_prefix(chain)["A"] == 3


def test_block_manager_events_round_trip_through_the_index(index):
    bm = BlockManager(num_blocks=8, block_size=BLOCK)
    prompt = _tokens(3, seed=4)
    req = Request("r", list(prompt), SamplingParams(max_tokens=1))
    req.token_ids = list(prompt)
    assert bm.allocate_slots(req, len(prompt)) == []
    req.num_computed_tokens = len(prompt)
    bm.cache_computed_blocks(req)
    index.register_worker("W", {}, 30.0)
    events = bm.drain_events()
    assert [type(e) for e in events] == [BlockStored]
    assert index.publish("W", events)
    chain = chain_hashes(prompt, BLOCK)
    assert index.longest_prefix(chain) == {"W": 3}
    bm.free(req)
    bm.reset_prefix_cache()  # evicts all three: BlockRemoved events
    assert index.publish("W", bm.drain_events())
    assert index.longest_prefix(chain) == {"W": 0}


def test_events_to_changes_nets_an_ordered_event_list():
    events = [BlockStored((1, 2, 3), 0), BlockRemoved((2,)), BlockRemoved((4,)),
              BlockStored((4,), 3), BlockRemoved((1,))]
    stored, removed = events_to_changes(events)
    assert sorted(stored) == [3, 4] and sorted(removed) == [1, 2]
    with pytest.raises(TypeError):
        events_to_changes([object()])


def test_expired_registration_stops_counting_and_is_swept(index):
    chain = _abc_setup(index, ttl_a=0.5)
    assert index.longest_prefix(chain)["A"] == 3
    assert _wait_until(lambda: "A" not in index.longest_prefix(chain)), "A never expired"
    assert index.longest_prefix(chain) == {"B": 2, "C": 0}
    assert "A" not in index.live_workers()
    # Another worker's heartbeat sweeps A's lingering entries (lazy cleanup); B's stay. A's
    # own heartbeat then re-registers it (keeping entries, had there been any left).
    assert index.heartbeat("B", 30.0)
    assert not index.heartbeat("A", 30.0)
    assert index.longest_prefix(chain) == {"A": 0, "B": 2, "C": 0}


def test_heartbeat_keeps_a_short_ttl_alive_and_reports_a_lapse(index):
    index.register_worker("A", {"addr": "a:1"}, 0.5)
    index.apply_events("A", [7], [])
    for _ in range(4):  # 1.2 s in all, well past the TTL, heartbeating every 0.3 s
        time.sleep(0.3)
        assert index.heartbeat("A", 0.5)
    assert index.longest_prefix([7]) == {"A": 1}
    assert _wait_until(lambda: index.longest_prefix([7]) == {})
    # Lapsed: the heartbeat re-registers (same info) but says the view is not intact.
    assert not index.heartbeat("A", 30.0)
    assert index.live_workers() == {"A": {"addr": "a:1"}}
    assert index.resync_worker("A", [7, 8])
    assert index.heartbeat("A", 30.0)
    assert index.longest_prefix([7, 8]) == {"A": 2}


def test_register_starts_a_worker_with_no_entries(index):
    chain = _abc_setup(index)
    index.register_worker("A", {"addr": "a:2"}, 30.0)  # a restarted worker: empty cache
    assert index.longest_prefix(chain) == {"A": 0, "B": 2, "C": 0}
    assert index.live_workers()["A"] == {"addr": "a:2"}


def test_unregister_drops_registration_and_entries(index):
    chain = _abc_setup(index)
    assert index.unregister_worker("A")
    assert index.longest_prefix(chain) == {"B": 2, "C": 0}
    assert "A" not in index.live_workers()
    index.register_worker("A", {}, 30.0)  # back, but it holds nothing now
    assert index.longest_prefix(chain)["A"] == 0


def test_resync_replaces_a_workers_entries(index):
    chain = _abc_setup(index)
    assert index.resync_worker("A", [chain[0], chain[1], chain[2], chain[3], chain[4]])
    assert index.longest_prefix(chain)["A"] == 5
    assert index.resync_worker("A", [chain[1]])
    assert index.longest_prefix(chain)["A"] == 0


def test_in_process_index_follows_an_injected_clock():
    now = [100.0]
    idx = InProcessPrefixIndex(clock=lambda: now[0])
    idx.register_worker("A", {}, 5.0)
    idx.apply_events("A", [1, 2], [])
    now[0] += 4.9
    assert idx.longest_prefix([1, 2]) == {"A": 2}
    now[0] += 0.2
    assert idx.longest_prefix([1, 2]) == {}
    idx.heartbeat("B", 5.0)  # sweeps A's entries
    idx.check_integrity()
    assert idx._worker_blocks == {} and idx._blocks == {}


@needs_redis
def test_lookup_is_one_round_trip_and_stops_early(request):
    import redis

    port = request.getfixturevalue("redis_port")
    idx = _redis_index(port)
    chain = chain_hashes(_tokens(64, seed=5), BLOCK)
    assert len(chain) == 64
    for i, depth in enumerate([40, 10, 0, 25]):
        idx.register_worker(f"w{i}", {}, 30.0)
        idx.apply_events(f"w{i}", chain[:depth] + chain[depth + 1:], [])  # a hole at depth
    expected = {"w0": 40, "w1": 10, "w2": 0, "w3": 25}
    assert idx.longest_prefix(chain) == expected  # warm: connection open, script loaded

    probe = redis.Redis(port=port, decode_responses=True)

    def calls() -> dict[str, int]:
        return {k: v["calls"] for k, v in probe.info("commandstats").items()}

    before = calls()
    assert idx.longest_prefix(chain) == expected
    after = calls()
    delta = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    delta.pop("cmdstat_info", None)  # our own probe
    # commandstats also counts the commands the script runs inside Redis; those are not
    # round trips. Everything else is what the client sent.
    inside = {"cmdstat_smembers", "cmdstat_exists", "cmdstat_smismember"}
    sent = {k: n for k, n in delta.items() if k not in inside}
    assert sum(sent.values()) <= 2, delta
    assert sent == {"cmdstat_evalsha": 1}, delta
    # It stopped at the deepest worker's miss (block 40), not at the chain's end (64).
    assert delta["cmdstat_smismember"] == 41, delta
    probe.close()
    idx.close()


@needs_redis
def test_redis_outage_degrades_to_empty_answers_then_recovers(tmp_path, caplog):
    port, proc = start_redis_server(tmp_path)
    idx = RedisPrefixIndex(f"redis://127.0.0.1:{port}", namespace="outage")
    try:
        chain = _abc_setup(idx)
        assert idx.longest_prefix(chain) == {"A": 3, "B": 2, "C": 0}
        stop_redis_server(proc, kill=True)  # SIGKILL: no goodbye to the client

        caplog.set_level(logging.WARNING, logger="prefix_index.redis_index")
        t0 = time.monotonic()
        assert idx.longest_prefix(chain) == {}
        assert idx.live_workers() == {}
        assert not idx.apply_events("A", [chain[3]], [])  # dropped, A marked for resync
        assert not idx.heartbeat("B", 30.0)
        assert time.monotonic() - t0 < 2.0, "a dead Redis must not stall routing"
        assert not idx.available
        assert "unreachable" in caplog.text

        port2, proc = start_redis_server(tmp_path, port=port)  # same address, empty
        assert port2 == port
        # The heartbeat probes Redis, re-registers, and reports that the view was lost.
        assert not idx.heartbeat("A", 30.0)
        assert idx.available
        assert idx.longest_prefix(chain) == {"A": 0}
        assert idx.resync_worker("A", chain[:4])
        assert idx.heartbeat("A", 30.0)
        assert not idx.heartbeat("B", 30.0)  # B's registration was lost with the data too
        idx.resync_worker("B", [chain[0]])
        assert idx.longest_prefix(chain) == {"A": 4, "B": 1}
        idx.check_integrity()
    finally:
        idx.close()
        stop_redis_server(proc)


@needs_redis
def test_password_is_used_and_never_logged(tmp_path, caplog):
    secret = "s3cret-" + uuid.uuid4().hex
    port, proc = start_redis_server(tmp_path, password=secret)
    caplog.set_level(logging.DEBUG)
    try:
        good = RedisPrefixIndex(f"redis://:{secret}@127.0.0.1:{port}", namespace="pw")
        assert good.register_worker("A", {}, 30.0)
        assert good.longest_prefix([1]) == {"A": 0}
        assert secret not in repr(good)
        bad = RedisPrefixIndex(f"redis://127.0.0.1:{port}", namespace="pw", password="wrong")
        assert bad.longest_prefix([1]) == {}  # auth failure degrades like an outage
        assert not bad.available
        stop_redis_server(proc, kill=True)
        assert good.longest_prefix([1]) == {}
        assert secret not in caplog.text and "wrong" not in caplog.text
        assert "***" in caplog.text  # the URL was logged, redacted
        good.close()
        bad.close()
    finally:
        stop_redis_server(proc)


def test_factory_and_config_errors():
    assert isinstance(make_prefix_index(None), InProcessPrefixIndex)
    assert isinstance(make_prefix_index(""), InProcessPrefixIndex)
    with pytest.raises(ValueError, match="redis://"):
        make_prefix_index("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="rediss://"):
        make_prefix_index("redis://127.0.0.1:6379", ssl_ca_certs="/ca.pem")
    with pytest.raises(ValueError, match="namespace"):
        make_prefix_index("redis://127.0.0.1:6379", namespace="a{b}")


@needs_redis
def test_a_hung_redis_costs_a_short_timeout_not_a_stall(tmp_path):
    """SIGSTOP: connections are accepted but never answered, the case timeouts exist for."""
    port, proc = start_redis_server(tmp_path)
    idx = RedisPrefixIndex(f"redis://127.0.0.1:{port}", namespace="hung")
    try:
        chain = _abc_setup(idx)
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        assert idx.longest_prefix(chain) == {}
        assert time.monotonic() - t0 < 2.0, "a hung Redis must not stall routing"
        t0 = time.monotonic()
        for _ in range(20):  # later lookups skip Redis for retry_interval_s: no timeout each
            assert idx.longest_prefix(chain) == {}
        assert time.monotonic() - t0 < 0.5
        proc.send_signal(signal.SIGCONT)
        # Heartbeats probe even inside the skip window; nothing was lost or dropped, so the
        # view is intact and lookups answer again at once.
        assert idx.heartbeat("B", 30.0)
        assert idx.available
        assert idx.longest_prefix(chain) == {"A": 3, "B": 2, "C": 0}
    finally:
        proc.send_signal(signal.SIGCONT)
        idx.close()
        stop_redis_server(proc)
