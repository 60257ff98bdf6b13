"""SLO scheduler: the online timing model, TTFT prediction and prefill placement, waiter order,
cancellation and worker removal while waiting, early rejection, decode ranking, and release
idempotence. Pure asyncio on a fake clock; every scenario ends with check_integrity()."""

from __future__ import annotations

import asyncio
import json

import pytest

from router.slo import (
    NO_SLO_HORIZON_S,
    PrefillPlacement,
    Rejected,
    RequestInfo,
    SLOScheduler,
    TimingModel,
)

BLOCK = 16


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def req(rid: str, tokens: int = 128, **kw) -> RequestInfo:
    kw.setdefault("arrival", 100.0)
    return RequestInfo(rid, tokens, BLOCK, **kw)


def sched(prefill=("p0",), decode=(), **kw) -> SLOScheduler:
    kw.setdefault("clock", FakeClock())
    return SLOScheduler(list(prefill), list(decode), **kw)


async def settle() -> None:
    """Let every ready task run up to its next await."""
    for _ in range(5):
        await asyncio.sleep(0)


# -- TimingModel ----------------------------------------------------------------------------


def test_timing_model_recovers_noiseless_line():
    m = TimingModel(0.005, 0.0002, decay=0.9)
    for i in range(100):
        x = 50 + (i * 397) % 2000
        m.observe(x, 0.02 + 0.0007 * x)
    assert m.n == 100
    assert m.b == pytest.approx(0.0007, rel=1e-4)
    assert m.a == pytest.approx(0.02, abs=1e-5)
    assert m.predict(1000) == pytest.approx(0.72, rel=1e-4)


def test_timing_model_prior_damps_first_observation():
    m = TimingModel(0.005, 0.0002)
    prior = m.predict(1000)
    m.observe(1000, 10 * prior)
    # One point moves the prediction there partly, and cannot tell the slope.
    assert 2 * prior < m.predict(1000) < 5 * prior
    assert m.b == 0.0002


def test_timing_model_forgets_old_slope():
    m = TimingModel(0.005, 0.0002, decay=0.9)
    xs = [100 + (i * 211) % 1500 for i in range(100)]
    for x in xs:
        m.observe(x, 0.01 + 0.0002 * x)
    for x in xs:
        m.observe(x, 0.01 + 0.001 * x)  # the worker got 5x slower per token
    assert m.b == pytest.approx(0.001, rel=1e-3)
    assert m.a == pytest.approx(0.01, abs=1e-4)


def test_timing_model_equal_x_keeps_slope_prior_and_fits_level():
    m = TimingModel(0.005, 0.0002, decay=0.9)
    slopes = set()
    # Long enough for the prior's weight to underflow to zero, leaving only rounding noise in
    # the x spread (this x leaves a positive residue).
    for _ in range(10_000):
        m.observe(1234.567, 0.3)
        slopes.add(m.b)
    assert slopes == {0.0002}
    assert m.predict(1234.567) == pytest.approx(0.3, rel=1e-9)
    assert m.predict(2234.567) == pytest.approx(0.3 + 0.0002 * 1000, rel=1e-9)


def test_timing_model_never_predicts_negative_and_ignores_nan():
    m = TimingModel(0.005, 0.0002)
    for i in range(150):
        x = 200 + 13 * (i % 60)
        m.observe(x, -1.0 + 0.01 * x)  # a fit with a negative intercept
    m.observe(float("nan"), 1.0)
    assert m.n == 150 and m.a == pytest.approx(-1.0, abs=1e-3)
    assert m.predict(0) == 0.0
    assert m.predict(300) == pytest.approx(2.0, rel=1e-3)


def test_request_info_blocks_and_deadline():
    assert req("r", 33).num_blocks == 3
    assert req("r", 32).num_blocks == 2
    assert req("r", ttft_slo_s=0.5).deadline == 100.5
    assert req("r").deadline == 100.0 + NO_SLO_HORIZON_S
    assert req("r", 32).cached_tokens(5) == 31  # a full hit still recomputes one token


# -- TTFT prediction and placement ----------------------------------------------------------


def test_predict_ttft_grows_with_inflight_and_shrinks_with_cache():
    async def main():
        s = sched(["p0"])
        r = req("r", 1024)
        cold, warm = s.predict_ttft("p0", r, 0), s.predict_ttft("p0", r, 768)
        assert warm < cold
        assert cold - warm == pytest.approx(768 * 0.0002)
        p = await s.acquire(req("load", 2000), {})
        loaded = s.predict_ttft("p0", r, 0)
        assert loaded == pytest.approx(cold + 0.005 + 2000 * 0.0002)
        s.release(p, req("load", 2000))
        assert s.predict_ttft("p0", r, 0) == pytest.approx(cold)
        s.check_integrity()

    asyncio.run(main())


def test_predict_ttft_counts_only_waiters_served_first():
    async def main():
        s = sched(["p0", "p1"], slots_per_worker=1)
        held = [await s.acquire(req(f"h{i}", 64), {}) for i in range(2)]
        assert {p.worker_id for p in held} == {"p0", "p1"}
        waiter = asyncio.create_task(s.acquire(req("w", 1000, priority=0), {}))
        await settle()
        low, high = req("low", 128), req("high", 128, priority=1)
        # The queued 1000-token request is ahead of `low` only; its work spreads over 2 workers.
        extra = (0.005 + 0.0002 * 1000) / 2
        assert s.predict_ttft("p0", low, 0) == pytest.approx(
            s.predict_ttft("p0", high, 0) + extra)
        waiter.cancel()
        await settle()
        s.check_integrity()

    asyncio.run(main())


def test_placement_prefers_prefix_holder_at_equal_load():
    async def main():
        s = sched(["p0", "p1", "p2"])
        r = req("r", 512)
        p = await s.acquire(r, {"p1": 20, "ghost": 32})  # unknown workers are ignored
        assert (p.worker_id, p.cached_tokens) == ("p1", 320)
        assert p.granted_at == 100.0
        assert p.predicted_ttft_s == pytest.approx(s.predict_ttft("p2", r, 0) - 320 * 0.0002)
        s.check_integrity()

    asyncio.run(main())


def test_placement_avoids_badly_overloaded_prefix_holder():
    async def main():
        s = sched(["p0"])
        for i in range(3):
            await s.acquire(req(f"big{i}", 4000), {})
        s.add_prefill_worker("p1")
        # p0 holds most of the prompt but has ~2.4 s of work ahead; p1 is idle.
        p = await s.acquire(req("r", 512), {"p0": 30})
        assert p.worker_id == "p1" and p.cached_tokens == 0
        # With only light load on p0 the prefix still wins.
        s2 = sched(["p0", "p1"])
        await s2.acquire(req("small", 32), {"p0": 1})
        assert (await s2.acquire(req("r", 512), {"p0": 30})).worker_id == "p0"
        s.check_integrity()
        s2.check_integrity()

    asyncio.run(main())


# -- waiting, ordering, cancellation --------------------------------------------------------


async def grant_order(s: SLOScheduler, holder, tasks: dict[str, asyncio.Task]) -> list[str]:
    """Release the held slot, then each granted waiter in turn, recording the grant order."""
    order: list[str] = []
    current, current_req = holder
    while True:
        s.release(current, current_req)
        await settle()
        done = [rid for rid, t in tasks.items() if t.done() and rid not in order]
        if not done:
            return order
        assert len(done) == 1, done  # one slot: one grant per release
        order.append(done[0])
        current, current_req = tasks[done[0]].result(), req(done[0])


def test_waiters_granted_by_priority_then_deadline_then_arrival():
    async def main():
        s = sched(["p0"], slots_per_worker=1)
        holder_req = req("holder")
        holder = await s.acquire(holder_req, {})
        specs = {  # request id: (priority, ttft SLO)
            "low-early": (0, 1.0),
            "high-late": (1, 10.0),
            "no-slo": (0, None),
            "low-late": (0, 5.0),
            "high-early": (1, 2.0),
            "low-early-2": (0, 1.0),  # same deadline as low-early, arrives after it
        }
        tasks = {}
        for rid, (prio, slo) in specs.items():
            tasks[rid] = asyncio.create_task(
                s.acquire(req(rid, priority=prio, ttft_slo_s=slo), {}))
            await settle()
        assert s.queue_length == 6
        s.check_integrity()
        order = await grant_order(s, (holder, holder_req), tasks)
        assert order == ["high-early", "high-late", "low-early", "low-early-2", "low-late",
                         "no-slo"]
        assert s.queue_length == 0
        s.check_integrity()

    asyncio.run(main())


def test_new_arrival_cannot_take_a_slot_freed_for_a_waiter():
    async def main():
        s = sched(["p0"], slots_per_worker=1)
        first = await s.acquire(req("first"), {})
        waiter = asyncio.create_task(s.acquire(req("waiter"), {}))
        await settle()
        s.release(first, req("first"))
        # Before the waiter's task has even resumed, a new request of equal rank arrives.
        late = asyncio.create_task(s.acquire(req("late"), {}))
        await settle()
        assert waiter.done() and not late.done()
        s.release(waiter.result(), req("waiter"))
        await settle()
        assert late.done()
        s.release(late.result(), req("late"))
        s.check_integrity()

    asyncio.run(main())


def test_cancelled_waiter_leaves_queue_without_leaking_a_slot():
    async def main():
        s = sched(["p0"], slots_per_worker=1)
        holder = await s.acquire(req("holder"), {})
        a = asyncio.create_task(s.acquire(req("a", priority=1), {}))
        b = asyncio.create_task(s.acquire(req("b"), {}))
        await settle()
        a.cancel()
        await settle()
        assert a.cancelled() and s.queue_length == 1
        s.check_integrity()
        s.release(holder, req("holder"))
        await settle()
        assert b.done() and b.result().worker_id == "p0"
        s.release(b.result(), req("b"))
        assert s.snapshot()["prefill"]["p0"]["slots_busy"] == 0
        s.check_integrity()

    asyncio.run(main())


def test_waiter_cancelled_right_after_its_grant_gives_the_slot_back():
    async def main():
        s = sched(["p0"], slots_per_worker=1)
        holder = await s.acquire(req("holder", 100), {})
        a = asyncio.create_task(s.acquire(req("a", 300), {}))
        b = asyncio.create_task(s.acquire(req("b", 200), {}))
        await settle()
        s.release(holder, req("holder", 100))  # grants a's future synchronously...
        a.cancel()  # ...but a is cancelled before it resumes
        await settle()
        assert a.cancelled()
        assert b.done() and b.result().worker_id == "p0"
        snap = s.snapshot()["prefill"]["p0"]
        assert snap["slots_busy"] == 1 and snap["inflight_tokens"] == 200
        s.check_integrity()

    asyncio.run(main())


def test_removed_worker_is_never_granted_and_added_worker_wakes_waiters():
    async def main():
        s = sched(["p0", "p1"], slots_per_worker=1)
        on = {p.worker_id: p for p in [await s.acquire(req(f"h{i}"), {}) for i in range(2)]}
        w = asyncio.create_task(s.acquire(req("w"), {"p0": 8}))
        await settle()
        s.remove_prefill_worker("p0")
        s.release(on["p0"], req("h0"))  # the dead worker's slot must not come back
        await settle()
        assert not w.done()
        assert "p0" not in s.snapshot()["prefill"]
        s.add_prefill_worker("p2")
        await settle()
        assert w.done() and w.result().worker_id == "p2"
        s.release(on["p1"], req("h1"))
        s.release(w.result(), req("w"))
        s.check_integrity()
        assert all(v["slots_busy"] == 0 for v in s.snapshot()["prefill"].values())

    asyncio.run(main())


# -- admission ------------------------------------------------------------------------------


def test_admit_rejects_without_prefill_workers():
    s = sched([])
    with pytest.raises(Rejected, match="no prefill worker"):
        s.admit(req("r"), {})


def test_admit_rejects_when_queue_full():
    async def main():
        s = sched(["p0"], slots_per_worker=1, max_queue=2)
        await s.acquire(req("holder"), {})
        s.admit(req("r"), {})  # saturated, but no SLO and the queue has room
        tasks = [asyncio.create_task(s.acquire(req(f"w{i}"), {})) for i in range(2)]
        await settle()
        with pytest.raises(Rejected, match=r"queue full \(2 waiting, max_queue=2\)"):
            s.admit(req("r"), {})
        for t in tasks:
            t.cancel()
        await settle()
        s.admit(req("r"), {})
        s.check_integrity()

    asyncio.run(main())


def test_admit_rejects_only_when_saturated_and_slo_unmeetable():
    async def main():
        clock = FakeClock(100.0)
        s = sched(["p0"], slots_per_worker=1, clock=clock)
        impossible = req("r", 512, ttft_slo_s=0.001)  # prefill alone is predicted ~0.11 s
        s.admit(impossible, {})  # a free slot: not saturated, so it is admitted anyway
        await s.acquire(req("holder", 2000), {})
        with pytest.raises(Rejected, match=r"predicted TTFT .* ms on p0 exceeds"):
            s.admit(impossible, {})
        s.admit(req("r", 512, ttft_slo_s=2.0), {})  # meetable even behind the holder
        s.admit(req("r", 512), {})  # no SLO: never rejected for load
        # The budget is what is left of the SLO now, not the whole SLO.
        clock.t = 101.9
        with pytest.raises(Rejected):
            s.admit(req("r", 512, ttft_slo_s=2.0), {})
        s.check_integrity()

    asyncio.run(main())


# -- release --------------------------------------------------------------------------------


def test_release_is_idempotent_and_learns_only_from_given_timings():
    async def main():
        s = sched(["p0"], slots_per_worker=2)
        r1, r2 = req("r1", 1000), req("r2", 300)
        p1 = await s.acquire(r1, {})
        p2 = await s.acquire(r2, {})
        s.release(p1, r1, prefill_s=0.5, transfer_s=0.05)
        s.release(p1, r1, prefill_s=0.5, transfer_s=0.05)  # no-op
        snap = s.snapshot()["prefill"]["p0"]
        assert snap["slots_busy"] == 1 and snap["inflight_tokens"] == 300
        assert snap["prefill_model"]["n"] == 1 and snap["transfer_model"]["n"] == 1
        s.release(p2, r2)  # a failure: no timings, nothing learnt
        snap = s.snapshot()["prefill"]["p0"]
        assert snap["slots_busy"] == 0 and snap["prefill_model"]["n"] == 1
        # A placement the scheduler never granted is ignored too.
        s.release(PrefillPlacement("p0", 0, 0.0, 0.0), r2)
        s.check_integrity()
        json.dumps(s.snapshot())

    asyncio.run(main())


# -- decode ranking -------------------------------------------------------------------------


def test_rank_decode_orders_by_free_blocks_then_batch_and_drops_misfits():
    s = sched(decode=["d1", "d2", "d3", "d4", "fresh"])
    r = req("r", 128)  # 8 blocks, so a worker needs 9 free
    s.update_decode("d1", free_blocks=100, num_running=2)
    s.update_decode("d2", free_blocks=100, num_running=1)
    s.update_decode("d3", free_blocks=8, num_running=0)
    s.update_decode("d4", free_blocks=50, num_running=0)
    assert s.rank_decode(r) == ["fresh", "d2", "d1", "d4"]  # never updated = optimistic
    assert s.rank_decode(r, exclude={"d2", "fresh"}) == ["d1", "d4"]
    s.remove_decode_worker("fresh")
    s.update_decode("fresh", free_blocks=1000, num_running=0)  # a late report: ignored
    assert s.rank_decode(r) == ["d2", "d1", "d4"]
    s.note_decode_reserved("d2", 60)
    assert s.rank_decode(r) == ["d1", "d4", "d2"]
    assert s.snapshot()["decode"]["d2"] == {
        "free_blocks": 40, "num_running": 2, "step_model": {"a": 0.005, "b": 0.0005, "n": 0}}


def test_rank_decode_puts_workers_meeting_tpot_first():
    s = sched(decode=["big-busy", "small-idle"])
    s.update_decode("big-busy", free_blocks=500, num_running=30)  # ~0.0205 s per step
    s.update_decode("small-idle", free_blocks=40, num_running=1)  # ~0.006 s per step
    assert s.rank_decode(req("r")) == ["big-busy", "small-idle"]
    assert s.rank_decode(req("r", tpot_slo_s=0.01)) == ["small-idle", "big-busy"]
    # Observed step times make the idle worker slow: no one meets the SLO, free blocks decide.
    for _ in range(50):
        s.update_decode("small-idle", free_blocks=40, num_running=1, step_s=0.05)
    assert s.rank_decode(req("r", tpot_slo_s=0.01)) == ["big-busy", "small-idle"]
