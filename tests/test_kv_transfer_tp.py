"""KV transfer between TP workers of different sizes: the head routes cover every decode rank's
heads exactly once from ranks that hold them (spreading replicated heads), each decode rank's
pool receives byte-identical heads from the prefill ranks' pools over every transport (and
nothing else changes), a request with several senders reports once and fails as a whole when
one of them fails (no byte lands after the report, and the receiver keeps serving), and head
slices that overlap or do not fit are refused before a byte is written."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
import torch

from kv_layout.heads import kv_head_shard, max_local_kv_heads
from kv_transfer import (
    HeadSlice,
    KVControl,
    KVLayout,
    KVLayoutMismatch,
    KVPool,
    LocalHub,
    TransferError,
    available_transports,
    make_receiver,
    make_sender,
    plan_head_routes,
    routes_by_src,
    senders_per_dst,
)
from kv_transfer.tp_plan import HeadRoute

TRANSPORTS = [t for t in ("ucx", "tcp", "local") if t in available_transports()]
SOCKET_TRANSPORTS = [t for t in TRANSPORTS if t != "local"]
LAYERS, BLOCKS, BLOCK_SIZE, HEAD_DIM = 2, 12, 4, 8


def valid_tp(num_kv_heads: int, tp: int) -> bool:
    try:
        kv_head_shard(num_kv_heads, tp, 0)
    except ValueError:
        return False
    return True


GRID = [(h, s, d) for h in range(1, 9) for s in range(1, 5) for d in range(1, 5)
        if valid_tp(h, s) and valid_tp(h, d)]


# ---- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads, src_tp, dst_tp", GRID)
def test_routes_cover_each_destination_head_once_from_a_rank_that_holds_it(num_kv_heads,
                                                                          src_tp, dst_tp):
    routes = plan_head_routes(num_kv_heads, src_tp, dst_tp)
    src_slots = max_local_kv_heads(num_kv_heads, src_tp)
    for dst in range(dst_tp):
        first, owned = kv_head_shard(num_kv_heads, dst_tp, dst)
        covered = []
        for r in (r for r in routes if r.dst_rank == dst):
            assert r.count >= 1 and 0 <= r.src_rank < src_tp
            src_first, src_owned = kv_head_shard(num_kv_heads, src_tp, r.src_rank)
            # The source reads slots it really holds, and they are the heads the dst wants.
            assert 0 <= r.src_head and r.src_head + r.count <= src_owned <= src_slots
            for i in range(r.count):
                assert src_first + r.src_head + i == first + r.dst_head + i
            covered += range(r.dst_head, r.dst_head + r.count)
        assert sorted(covered) == list(range(owned))  # every owned slot, exactly once
    assert sum(senders_per_dst(routes, dst_tp)) == len(routes)
    by_src = routes_by_src(routes, src_tp)
    assert sorted((r for rs in by_src for r in rs), key=routes.index) == routes
    assert all(r.src_rank == s for s, rs in enumerate(by_src) for r in rs)
    if src_tp <= num_kv_heads:  # no replication: one maximal run per (src, dst) pair
        assert len({(r.src_rank, r.dst_rank) for r in routes}) == len(routes)
    assert plan_head_routes(num_kv_heads, src_tp, dst_tp) == routes  # deterministic


@pytest.mark.parametrize("num_kv_heads, src_tp, dst_tp",
                         [(h, s, d) for h, s, d in GRID if s > h])
def test_replicated_heads_spread_their_sends_over_every_holder(num_kv_heads, src_tp, dst_tp):
    routes = plan_head_routes(num_kv_heads, src_tp, dst_tp)
    for head in range(num_kv_heads):
        holders = [s for s in range(src_tp) if kv_head_shard(num_kv_heads, src_tp, s)[0] == head]
        sends = Counter({s: 0 for s in holders})
        for r in routes:
            if kv_head_shard(num_kv_heads, src_tp, r.src_rank)[0] == head:
                sends[r.src_rank] += 1
        assert set(sends) == set(holders)
        assert max(sends.values()) - min(sends.values()) <= 1


def test_route_examples():
    assert plan_head_routes(4, 1, 1) == [HeadRoute(0, 0, 0, 0, 4)]  # one route, all heads
    assert plan_head_routes(3, 2, 1) == [HeadRoute(0, 0, 0, 0, 2), HeadRoute(1, 0, 0, 2, 1)]
    assert plan_head_routes(3, 1, 2) == [HeadRoute(0, 0, 0, 0, 2), HeadRoute(0, 1, 2, 0, 1)]
    # Equal replicated TP: rank r -> rank r.  More decode ranks: holders taken in turn.
    assert [(r.src_rank, r.dst_rank) for r in plan_head_routes(2, 4, 4)] == [
        (0, 0), (1, 1), (2, 2), (3, 3)]
    assert [r.src_rank for r in plan_head_routes(1, 2, 4)] == [0, 1, 0, 1]
    assert senders_per_dst(plan_head_routes(3, 2, 1), 1) == [2]
    assert plan_head_routes(3, 2, 1)[1].heads == HeadSlice(0, 2, 1)
    with pytest.raises(ValueError):
        plan_head_routes(3, 2, 4)  # kv_head_shard: TP above the head count must divide


# ---- pools of one TP worker -------------------------------------------------------------------


def rank_layout(num_kv_heads: int, tp: int, rank: int, dtype=torch.float32) -> KVLayout:
    return KVLayout("tiny", dtype, BLOCK_SIZE, LAYERS, max_local_kv_heads(num_kv_heads, tp),
                    HEAD_DIM, rank, tp)


def reference(num_kv_heads: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The full KV of every head: [layers, blocks, block_size, num_kv_heads, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    shape = (LAYERS, BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def worker_pools(num_kv_heads: int, tp: int, seed: int, full=None,
                 dtype=torch.float32) -> list[KVPool]:
    """One pool per rank, random everywhere; with `full`, each rank's owned heads in slots
    [0, owned) are taken from it (slots past them stay random: nobody may read them)."""
    pools = []
    for rank in range(tp):
        lay = rank_layout(num_kv_heads, tp, rank, dtype)
        g = torch.Generator().manual_seed(seed * 100 + rank)
        shape = (LAYERS, BLOCKS, BLOCK_SIZE, lay.num_kv_heads, HEAD_DIM)
        k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        if full is not None:
            first, owned = kv_head_shard(num_kv_heads, tp, rank)
            k[:, :, :, :owned] = full[0][:, :, :, first : first + owned]
            v[:, :, :, :owned] = full[1][:, :, :, first : first + owned]
        pools.append(KVPool(k.to(dtype), v.to(dtype), lay))
    return pools


class Worker:
    """Receivers (decode) or senders (prefill), one per rank, on one transport."""

    def __init__(self, kind: str, pools: list[KVPool], hub: LocalHub, receive: bool):
        make = make_receiver if receive else make_sender
        self.pools = pools
        self.ends = [make(kind, p, hub=hub) for p in pools]

    def close(self) -> None:
        for end in self.ends:
            end.close()


def endpoints(kind: str, src_pools, dst_pools):
    hub = LocalHub()
    return Worker(kind, src_pools, hub, False), Worker(kind, dst_pools, hub, True)


# ---- byte equality ----------------------------------------------------------------------------

CASES = {  # name: (num_kv_heads, src_tp, dst_tp)
    "tp2->tp1": (2, 2, 1),
    "tp1->tp2": (2, 1, 2),
    "tp2->tp4 replicated": (2, 2, 4),
    "3 heads tp2->tp1": (3, 2, 1),
    "3 heads tp1->tp2": (3, 1, 2),
    "tp4->tp2": (4, 4, 2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_each_decode_rank_receives_exactly_its_heads_byte_identical(kind, case):
    num_kv_heads, src_tp, dst_tp = CASES[case]
    dtype = torch.bfloat16 if "3 heads" in case else torch.float32
    full = reference(num_kv_heads)
    src_pools = worker_pools(num_kv_heads, src_tp, seed=1, full=full, dtype=dtype)
    dst_pools = worker_pools(num_kv_heads, dst_tp, seed=2, dtype=dtype)
    before = [(p.k.clone(), p.v.clone()) for p in dst_pools]
    rng = random.Random(3)
    src, dst = rng.sample(range(BLOCKS), 5), rng.sample(range(BLOCKS), 5)
    routes = plan_head_routes(num_kv_heads, src_tp, dst_tp)
    tx, rx = endpoints(kind, src_pools, dst_pools)
    try:
        reports = [[] for _ in range(dst_tp)]
        pending = [r.expect("r1", dst, on_done=reports[d].append, lease_s=20,
                            num_senders=n)
                   for d, (r, n) in enumerate(zip(rx.ends, senders_per_dst(routes, dst_tp)))]
        control = KVControl("r1", 17, (5,))

        def prefill_rank(s: int) -> None:  # each prefill rank sends its routes itself
            for route in routes_by_src(routes, src_tp)[s]:
                sent = tx.ends[s].send(rx.ends[route.dst_rank].address, control, src, dst,
                                       timeout_s=20, heads=route.heads)
                assert sent.ok and sent.num_bytes == (
                    len(src) * 2 * LAYERS * route.count * src_pools[s].layout.head_region_bytes)

        errors = []
        threads = [threading.Thread(target=lambda s=s: _record(errors, prefill_rank, s))
                   for s in range(src_tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        for d, pool in enumerate(dst_pools):
            result = pending[d].wait(10)
            assert result is not None and result.ok, result
            assert reports[d] == [result] and result.control == control
            first, owned = kv_head_shard(num_kv_heads, dst_tp, d)
            assert result.num_bytes == len(dst) * 2 * LAYERS * owned * (
                pool.layout.head_region_bytes)
            for kv, (t, old) in enumerate(zip((pool.k, pool.v), before[d])):
                want = full[kv][:, src][:, :, :, first : first + owned].to(dtype)
                assert torch.equal(t[:, dst, :, :owned], want)  # byte equality, every head
                assert torch.equal(t[:, dst, :, owned:], old[:, dst, :, owned:])  # spare slots
                untouched = [b for b in range(BLOCKS) if b not in dst]
                assert torch.equal(t[:, untouched], old[:, untouched])
    finally:
        tx.close()
        rx.close()


def _record(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (the test thread asserts on it)
        errors.append(e)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_all_heads_slice_matches_a_whole_block_transfer(kind):
    """heads = every head of equal layouts (the zero-copy path) moves what heads=None does."""
    full = reference(2)
    src_pool = worker_pools(2, 1, seed=1, full=full)[0]
    dst_pool = worker_pools(2, 1, seed=2)[0]
    tx, rx = endpoints(kind, [src_pool], [dst_pool])
    try:
        for rid, heads in (("a", HeadSlice(0, 0, 2)), ("b", None)):
            pending = rx.ends[0].expect(rid, [4, 5, 9], lease_s=20)
            assert tx.ends[0].send(rx.ends[0].address, KVControl(rid, 3), [0, 1, 2],
                                   [4, 5, 9], heads=heads).ok
            assert pending.wait(10).ok
            assert torch.equal(dst_pool.k[:, [4, 5, 9]], full[0][:, [0, 1, 2]])
            assert torch.equal(dst_pool.v[:, [4, 5, 9]], full[1][:, [0, 1, 2]])
            dst_pool.k.zero_()
    finally:
        tx.close()
        rx.close()


# ---- several senders, one fails ---------------------------------------------------------------


def failure_modes():
    for kind in TRANSPORTS:
        yield kind, "abort"
        if kind != "local":
            yield kind, "socket dies"


@pytest.mark.parametrize("kind, how", list(failure_modes()))
def test_one_of_two_senders_failing_fails_the_request_once_and_stops_the_other(kind, how):
    full = reference(2)
    src_pools = worker_pools(2, 2, seed=1, full=full)
    dst_pool = worker_pools(2, 1, seed=2)[0]
    routes = plan_head_routes(2, 2, 1)
    tx, rx = endpoints(kind, src_pools, [dst_pool])
    receiver = rx.ends[0]
    try:
        reports, snapshot = [], []

        def on_done(result):  # what the pool holds when the owner hears
            snapshot.append((dst_pool.k.clone(), dst_pool.v.clone()))
            reports.append(result)

        dst = [7, 2, 3]
        pending = receiver.expect("r1", dst, on_done=on_done, lease_s=20, num_senders=2)
        a, b = (tx.ends[r.src_rank].open(receiver.address, "r1", [0, 1, 2], dst,
                                         timeout_s=10, heads=r.heads) for r in routes)
        a.send_layer(0)
        b.send_layer(0)
        if kind == "tcp":  # b's receiving thread has written layer 0 and waits for more
            deadline = time.monotonic() + 5
            while not torch.equal(dst_pool.k[0, dst, :, 1], full[0][0, :3, :, 1]):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        if how == "abort":
            a.abort("prefill rank 0 gave up")
        else:  # the connection breaks under the session (peer process gone)
            a._conn.close()
        result = pending.wait(10)
        assert result is not None and not result.ok, result
        assert "gave up" in result.error if how == "abort" else result.error
        with pytest.raises(TransferError):  # the other sender is stopped...
            b.send_layer(1)
            b.finish(KVControl("r1", 12))
        # ...and nothing of it lands after the owner was told, who was told once.
        time.sleep(0.2)
        assert reports == [result]
        assert torch.equal(dst_pool.k, snapshot[0][0]) and torch.equal(dst_pool.v, snapshot[0][1])
        # The receiver serves the next request (both sessions) byte-identically.
        pending = receiver.expect("r2", [5, 6], lease_s=20, num_senders=2)
        for r in routes:
            assert tx.ends[r.src_rank].send(receiver.address, KVControl("r2", 8), [3, 4],
                                            [5, 6], heads=r.heads).ok
        assert pending.wait(10).ok
        assert torch.equal(dst_pool.k[:, [5, 6]], full[0][:, [3, 4]])
        assert torch.equal(dst_pool.v[:, [5, 6]], full[1][:, [3, 4]])
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_senders_disagreeing_on_the_control_fail_the_request(kind):
    src_pools, dst_pool = worker_pools(2, 2, seed=1), worker_pools(2, 1, seed=2)[0]
    tx, rx = endpoints(kind, src_pools, [dst_pool])
    try:
        pending = rx.ends[0].expect("r1", [1], lease_s=20, num_senders=2)
        routes = plan_head_routes(2, 2, 1)
        assert tx.ends[0].send(rx.ends[0].address, KVControl("r1", 4), [0], [1],
                               heads=routes[0].heads).ok
        with pytest.raises(TransferError):
            tx.ends[1].send(rx.ends[0].address, KVControl("r1", 5), [0], [1],
                            heads=routes[1].heads)
        result = pending.wait(10)
        assert not result.ok and "disagree" in result.error
    finally:
        tx.close()
        rx.close()


# ---- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_head_slices_that_do_not_fit_or_overlap_are_refused_with_nothing_written(kind):
    src_pools = worker_pools(2, 2, seed=1)  # two ranks, one head slot each
    dst_pool = worker_pools(2, 1, seed=2)[0]  # two head slots
    before = dst_pool.k.clone(), dst_pool.v.clone()
    tx, rx = endpoints(kind, src_pools, [dst_pool])
    receiver, addr = rx.ends[0], rx.ends[0].address
    try:
        def unchanged() -> bool:
            return torch.equal(dst_pool.k, before[0]) and torch.equal(dst_pool.v, before[1])

        # Reads past the sender's own slots: refused before anything is sent.
        pending = receiver.expect("r1", [3], lease_s=20)
        with pytest.raises(ValueError, match="head slots"):
            tx.ends[0].open(addr, "r1", [0], [3], heads=HeadSlice(1, 0, 1))
        assert not pending.done()
        # Writes past the receiver's slots: the receiver refuses, the reservation fails.
        with pytest.raises(KVLayoutMismatch, match=r"writes slots \[2, 3\)"):
            tx.ends[0].send(addr, KVControl("r1", 4), [0], [3], heads=HeadSlice(0, 2, 1))
        assert not pending.wait(5).ok and unchanged()
        # Whole blocks between different layouts: refused as ever.
        pending = receiver.expect("r2", [3], lease_s=20)
        with pytest.raises(KVLayoutMismatch, match="num_kv_heads"):
            tx.ends[0].send(addr, KVControl("r2", 4), [0], [3])
        assert not pending.wait(5).ok and unchanged()
        # A head slice still needs the rest of the layout to agree.
        odd = KVPool(torch.zeros(LAYERS, BLOCKS, 8, 1, HEAD_DIM),
                     torch.zeros(LAYERS, BLOCKS, 8, 1, HEAD_DIM),
                     KVLayout("tiny", torch.float32, 8, LAYERS, 1, HEAD_DIM, 0, 2))
        with make_sender(kind, odd, hub=getattr(receiver, "hub", None)) as stranger:
            pending = receiver.expect("r3", [3], lease_s=20)
            with pytest.raises(KVLayoutMismatch, match="block_size"):
                stranger.send(addr, KVControl("r3", 4), [0], [3], heads=HeadSlice(0, 0, 1))
            assert not pending.wait(5).ok and unchanged()
        # Two sessions over the same slot: the second is refused, the request fails, and the
        # first (mid-transfer) stops: nothing lands after the owner hears.
        reports = []
        pending = receiver.expect("r4", [3, 4], on_done=reports.append, lease_s=20,
                                  num_senders=2)
        first = tx.ends[0].open(addr, "r4", [0, 1], [3, 4], timeout_s=10,
                                heads=HeadSlice(0, 1, 1))
        first.send_layer(0)
        with pytest.raises(TransferError, match="overlap"):
            tx.ends[1].send(addr, KVControl("r4", 4), [0, 1], [3, 4], heads=HeadSlice(0, 1, 1))
        result = pending.wait(10)
        assert not result.ok and "overlap" in result.error
        at_report = dst_pool.k.clone(), dst_pool.v.clone()
        with pytest.raises(TransferError):
            first.send_layer(1)
            first.finish(KVControl("r4", 4))
        time.sleep(0.1)
        assert reports == [result]
        assert torch.equal(dst_pool.k, at_report[0]) and torch.equal(dst_pool.v, at_report[1])
        assert torch.equal(dst_pool.k[:, :, :, 0], before[0][:, :, :, 0])  # slot 0 never
        # More sessions than expected: the extra one is refused, the transfer goes on.
        pending = receiver.expect("r5", [5], lease_s=20)
        s = tx.ends[0].open(addr, "r5", [0], [5], heads=HeadSlice(0, 0, 1))
        with pytest.raises(TransferError, match="active"):
            tx.ends[1].open(addr, "r5", [0], [5], heads=HeadSlice(0, 1, 1))
        s.send_layer(0)
        s.send_layer(1)
        assert s.finish(KVControl("r5", 4)).ok and pending.wait(10).ok
        assert torch.equal(dst_pool.k[:, 5, :, 0], src_pools[0].k[:, 0, :, 0])
    finally:
        tx.close()
        rx.close()


def test_expect_validates_num_senders():
    pool = worker_pools(2, 1, seed=2)[0]
    rx = make_receiver("local", pool, hub=LocalHub())
    try:
        with pytest.raises(ValueError, match="num_senders"):
            rx.expect("r", [1], num_senders=0)
    finally:
        rx.close()
