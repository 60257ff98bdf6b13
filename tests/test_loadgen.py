"""loadgen without a cluster: statistics against numpy, arrival processes, workloads, the
report's shape, the CLI's config and compare. The run against a real cluster is in
test_loadgen_cluster.py."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadgen.arrivals import ArrivalConfig, Limits, LimitState, open_loop_schedule
from loadgen.backends import Backend
from loadgen.cli import add_bench_parser, config_from_args
from loadgen.distributions import LengthDist
from loadgen.record import BackendError, RequestRecord, ServerFinal, StreamEvent
from loadgen.report import format_compare, format_report, load_report
from loadgen.runner import BenchConfig, run_bench
from loadgen.stats import PHASES, STATS, summarize, summarize_values
from loadgen.workloads import TrafficClass, WorkloadConfig, load_sharegpt, make_workload


def numpy_stats(values) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(np.mean(a)), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(np.max(a))}


def server(queue=1.0, prefill=2.0, transfer=0.5, decode=10.0, prompt=10, cached=0,
           completion=4) -> ServerFinal:
    return ServerFinal("length", prompt, cached, completion, queue, prefill, transfer, decode,
                       queue + prefill + transfer, queue + prefill + transfer + decode)


def ok_record(i: int, ttft: float, e2e: float, itl: list[float], *, warmup=False, ttft_slo=0.0,
              tpot_slo=0.0, send=0.0, end=1.0, cls="default", **srv) -> RequestRecord:
    return RequestRecord(index=i, traffic_class=cls, warmup=warmup, ttft_slo_ms=ttft_slo,
                         tpot_slo_ms=tpot_slo, send_s=send, end_s=end, output_tokens=len(itl) + 1,
                         ttft_ms=ttft, e2e_ms=e2e, itl_ms=itl,
                         server=server(completion=len(itl) + 1, **srv))


def error_record(i: int, code: str, *, warmup=False, send=0.0, end=0.1) -> RequestRecord:
    return RequestRecord(index=i, traffic_class="default", warmup=warmup, send_s=send,
                         end_s=end, status=code, error="injected")


# ---- statistics ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1,
                max_size=300))
def test_summarize_values_is_numpy_linear_percentiles(values):
    assert summarize_values(values) == numpy_stats(values)


def test_summarize_values_of_nothing_is_all_none():
    assert summarize_values([]) == dict.fromkeys(STATS)


def test_report_phases_match_numpy_over_measured_successes_only():
    rng = np.random.default_rng(7)
    recs, expect = [], {p: [] for p in PHASES}
    for i in range(40):
        n_out = int(rng.integers(1, 9))
        itl = rng.exponential(5.0, n_out - 1).tolist()
        ttft = float(rng.uniform(10, 100))
        e2e = ttft + sum(itl) + float(rng.uniform(0, 2))
        q, pf, tr, dc = (float(x) for x in rng.uniform(0, 50, 4))
        recs.append(ok_record(i, ttft, e2e, itl, queue=q, prefill=pf, transfer=tr, decode=dc))
        for p, v in (("queue", q), ("prefill", pf), ("transfer", tr), ("decode", dc),
                     ("ttft", ttft), ("e2e", e2e)):
            expect[p].append(v)
        expect["itl"].extend(itl)
        if n_out > 1:
            expect["tpot"].append((e2e - ttft) / (n_out - 1))
    # Neither warm-up requests nor errors may leak into the latency figures.
    recs.append(ok_record(100, 1e6, 2e6, [1e6, 1e6], warmup=True, queue=1e6))
    recs.append(error_record(101, "UNAVAILABLE"))
    report = summarize(recs, {"workload": {"classes": []}})
    assert set(report["phases"]) == set(PHASES)
    for p in PHASES:
        assert set(report["phases"][p]) == set(STATS)
        assert report["phases"][p] == numpy_stats(expect[p]), p


def test_tpot_itl_and_single_token_requests():
    rec = ok_record(0, ttft=20.0, e2e=50.0, itl=[10.0, 10.0, 8.0])
    assert rec.tpot_ms == pytest.approx(30.0 / 3)
    one = ok_record(1, ttft=20.0, e2e=21.0, itl=[])
    assert one.tpot_ms is None  # nothing to average
    report = summarize([rec, one], {})
    assert report["phases"]["tpot"]["max"] == pytest.approx(10.0)
    assert report["phases"]["itl"] == numpy_stats([10.0, 10.0, 8.0])


def test_goodput_and_slo_attainment_from_known_latencies():
    recs = [
        # meets both (ttft 50 <= 100, tpot (90-50)/4 = 10 <= 20)
        ok_record(0, 50.0, 90.0, [10.0] * 4, ttft_slo=100, tpot_slo=20, send=0.0, end=1.0),
        # misses TTFT only
        ok_record(1, 150.0, 190.0, [10.0] * 4, ttft_slo=100, tpot_slo=20, send=0.5, end=1.5),
        # misses TPOT only: (250-50)/4 = 50 > 20
        ok_record(2, 50.0, 250.0, [50.0] * 4, ttft_slo=100, tpot_slo=20, send=1.0, end=2.0),
        # no SLO: counts as met
        ok_record(3, 5000.0, 9000.0, [1000.0] * 4, send=1.5, end=3.0),
        # exactly at the targets: met
        ok_record(4, 100.0, 180.0, [20.0] * 4, ttft_slo=100, tpot_slo=20, send=2.0, end=3.5),
        # one output token: no TPOT to miss
        ok_record(5, 40.0, 41.0, [], ttft_slo=100, tpot_slo=1, send=2.5, end=3.9),
        # errors never meet an SLO, with or without targets
        error_record(6, "RESOURCE_EXHAUSTED", send=3.0, end=3.1),
        error_record(7, "INVALID_ARGUMENT", send=3.5, end=4.0),
        # warm-up: excluded everywhere, including the window
        ok_record(8, 1.0, 2.0, [1.0], ttft_slo=100, warmup=True, send=-5.0, end=10.0),
    ]
    report = summarize(recs, {})
    window = 4.0 - 0.0
    met = 4  # records 0, 3, 4, 5
    assert report["throughput"]["window_s"] == window
    assert report["goodput"] == {"requests_per_s": met / window, "requests": met}
    assert report["slo_attainment"] == {"both": met / 8, "ttft": 5 / 8, "tpot": 5 / 8}
    assert report["throughput"]["requests_per_s"] == 6 / window
    assert report["throughput"]["output_tokens_per_s"] == (5 * 5 + 1) / window
    assert report["throughput"]["input_tokens_per_s"] == 6 * 10 / window
    assert report["errors"] == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1}
    assert report["counts"] == {"sent": 8, "succeeded": 6, "errored": 2, "warmup": 1,
                                "warmup_errored": 0}


def test_per_class_goodput_adds_up_to_total():
    recs = [ok_record(i, 10.0 * i, 10.0 * i + 30, [10.0] * 3, ttft_slo=35,
                      cls="a" if i % 2 else "b", send=i * 0.1, end=i * 0.1 + 1)
            for i in range(10)]
    cfg = {"workload": {"classes": [{"name": "a", "ttft_ms": 35, "tpot_ms": 0, "priority": 2},
                                    {"name": "b", "ttft_ms": 35, "tpot_ms": 0, "priority": 0}]}}
    report = summarize(recs, cfg)
    classes = report["classes"]
    assert set(classes) == {"a", "b"}
    assert classes["a"]["slo"] == {"ttft_ms": 35, "tpot_ms": 0, "priority": 2}
    total = sum(c["goodput"]["requests"] for c in classes.values())
    assert total == report["goodput"]["requests"] == 4  # ttft 0, 10, 20, 30
    assert sum(c["counts"]["sent"] for c in classes.values()) == report["counts"]["sent"]


# ---- arrivals -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [2.0, 50.0])
def test_poisson_schedule_count_rate_and_reproducibility(rate):
    n = 4000
    limits = Limits(num_requests=n, warmup_requests=20)
    sched = open_loop_schedule(ArrivalConfig(kind="poisson", rate=rate), limits, seed=11)
    assert len(sched) == n + 20
    assert [a.warmup for a in sched] == [True] * 20 + [False] * n
    offsets = np.array([a.offset_s for a in sched])
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    gaps = np.diff(offsets)
    # mean gap of n exponential gaps: 1/rate with standard error (1/rate)/sqrt(n); 4 sigma
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / math.sqrt(len(gaps))
    # coefficient of variation of exponential gaps is 1 (a fixed-interval bug would give 0)
    assert 0.9 < gaps.std() / gaps.mean() < 1.1
    again = open_loop_schedule(ArrivalConfig(kind="poisson", rate=rate), limits, seed=11)
    assert again == sched
    other = open_loop_schedule(ArrivalConfig(kind="poisson", rate=rate), limits, seed=12)
    assert [a.offset_s for a in other] != [a.offset_s for a in sched]


def test_poisson_schedule_bounded_by_duration_after_warmup():
    rate, duration, warm = 100.0, 20.0, 1.5
    sched = open_loop_schedule(ArrivalConfig(kind="poisson", rate=rate),
                               Limits(num_requests=None, duration_s=duration, warmup_s=warm),
                               seed=3)
    warmups = [a for a in sched if a.warmup]
    measured = [a for a in sched if not a.warmup]
    assert all(a.offset_s < warm for a in warmups)
    assert all(warm <= a.offset_s < warm + duration for a in measured)
    expected = rate * duration  # Poisson count: sd sqrt(expected)
    assert abs(len(measured) - expected) < 4 * math.sqrt(expected)
    # the count bound wins when it comes first
    short = open_loop_schedule(ArrivalConfig(kind="poisson", rate=rate),
                               Limits(num_requests=30, duration_s=duration), seed=3)
    assert len(short) == 30


def test_burst_schedule():
    sched = open_loop_schedule(ArrivalConfig(kind="burst", burst_size=5, burst_interval_s=0.5),
                               Limits(num_requests=12), seed=0)
    assert [a.offset_s for a in sched] == [0.0] * 5 + [0.5] * 5 + [1.0] * 2


def test_closed_loop_limits():
    state = LimitState(Limits(num_requests=3, warmup_requests=2))
    assert [state.claim(0.0) for _ in range(6)] == [True, True, False, False, False, None]
    timed = LimitState(Limits(num_requests=None, duration_s=1.0, warmup_s=0.5))
    assert timed.claim(0.1) is True
    assert timed.claim(0.6) is False
    assert timed.claim(1.49) is False  # the window runs from the warm-up's end, 0.5 s
    assert timed.claim(1.5) is None


def test_limits_need_a_bound():
    with pytest.raises(ValueError, match="bound"):
        Limits(num_requests=None, duration_s=None)


# ---- workloads ----------------------------------------------------------------------------


def take(workload, n):
    it = iter(workload)
    return [next(it) for _ in range(n)]


def test_length_distributions_parse_sample_and_round_trip():
    rng = np.random.default_rng(0)
    for spec, lo, hi in (("fixed:7", 7, 7), ("uniform:3:9", 3, 9),
                         ("normal:50:20:10:60", 10, 60), ("lognormal:100:1:1:400", 1, 400)):
        d = LengthDist.parse(spec)
        assert str(d) == spec and LengthDist.parse(str(d)) == d
        xs = [d.sample(rng) for _ in range(2000)]
        assert min(xs) >= lo and max(xs) <= hi
    xs = [LengthDist.parse("uniform:3:9").sample(rng) for _ in range(2000)]
    assert set(xs) == set(range(3, 10))
    xs = [LengthDist.parse("lognormal:100:0.5").sample(rng) for _ in range(20000)]
    assert abs(np.mean(xs) - 100) < 3
    for bad in ("gauss:1:2", "uniform:9:3", "fixed:0", "normal:1", "uniform:a:b"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_random_workload_is_seeded_and_follows_the_distributions():
    cfg = WorkloadConfig(input_len="uniform:5:20", output_len="fixed:6", token_id_low=10,
                         token_id_high=50)
    a = take(make_workload(cfg, 1), 200)
    assert a == take(make_workload(cfg, 1), 200)
    assert a != take(make_workload(cfg, 2), 200)
    assert [s.index for s in a] == list(range(200))
    assert all(5 <= len(s.token_ids) <= 20 and s.max_tokens == 6 for s in a)
    assert all(10 <= t < 50 for s in a for t in s.token_ids)
    text = take(make_workload(WorkloadConfig(prompt_format="text", input_len="fixed:12"), 0), 5)
    assert all(s.token_ids is None and len(s.text.split()) == 12 for s in text)


def test_shared_prefix_groups():
    cfg = WorkloadConfig(kind="shared-prefix", num_groups=3, prefix_len=40, suffix_len=5,
                         group_order="round-robin", output_len="fixed:2")
    specs = take(make_workload(cfg, 0), 9)
    prefixes = [tuple(s.token_ids[:40]) for s in specs]
    assert all(len(s.token_ids) == 45 for s in specs)
    assert len(set(prefixes)) == 3
    assert prefixes[:3] == prefixes[3:6] == prefixes[6:9]  # round robin over the groups
    assert len({tuple(s.token_ids[40:]) for s in specs}) == 9  # fresh suffixes


def test_traffic_class_mix_weights_and_slos():
    classes = [TrafficClass.parse("chat:weight=3,ttft_ms=200,tpot_ms=50,priority=2,"
                                  "output_len=fixed:4"),
               TrafficClass.parse("batch:weight=1,input_len=fixed:100")]
    cfg = WorkloadConfig(input_len="fixed:10", output_len="fixed:30", classes=classes)
    specs = take(make_workload(cfg, 5), 4000)
    chat = [s for s in specs if s.traffic_class == "chat"]
    batch = [s for s in specs if s.traffic_class == "batch"]
    assert len(chat) + len(batch) == 4000
    share = len(chat) / 4000  # binomial: sd sqrt(p(1-p)/n) ~ 0.007
    assert abs(share - 0.75) < 0.03
    assert all((s.ttft_ms, s.tpot_ms, s.priority, s.max_tokens, len(s.token_ids))
               == (200, 50, 2, 4, 10) for s in chat)
    assert all((s.ttft_ms, s.tpot_ms, s.priority, s.max_tokens, len(s.token_ids))
               == (0, 0, 0, 30, 100) for s in batch)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        TrafficClass.parse("x:ttft=3")


def test_sharegpt_file(tmp_path):
    data = [
        {"id": "a", "conversations": [{"from": "system", "value": "Be brief."},
                                      {"from": "human", "value": "Hi there"},
                                      {"from": "gpt", "value": "x" * 41},
                                      {"from": "human", "value": "more"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "no question"}]},  # unusable
        {"id": "c", "conversations": [{"from": "human", "value": "long " * 100},
                                      {"from": "gpt", "value": "y" * 4000}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    convs = load_sharegpt(path)
    assert convs[0] == ([{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi there"}], 11)  # ceil(41 / 4)
    assert len(convs) == 2
    assert len(load_sharegpt(path, max_prompt_chars=100)) == 1
    cfg = WorkloadConfig(kind="sharegpt", dataset=str(path), output_cap=64)
    specs = take(make_workload(cfg, 0), 4)
    assert {s.max_tokens for s in specs} == {11, 64}  # the long reply is capped
    assert all(s.chat and s.token_ids is None for s in specs)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no conversation"):
        load_sharegpt(tmp_path / "empty.json")


# ---- the runner's accounting, on a scripted backend -----------------------------------------


class ScriptedBackend(Backend):
    """Streams `max_tokens` tokens, `chunk` per message; the requests whose index is in
    `fail` fail with that status, and one asking for 999 tokens hangs until cancelled."""

    name = "scripted"

    def __init__(self, fail: dict[int, str] | None = None, chunk: int = 1):
        self.fail = fail or {}
        self.chunk = chunk

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, spec, timeout_s):
        if spec.index in self.fail:
            raise BackendError(self.fail[spec.index], "scripted failure")
        if spec.max_tokens == 999:
            await asyncio.sleep(3600)
        sent = 0
        while sent < spec.max_tokens:
            k = min(self.chunk, spec.max_tokens - sent)
            await asyncio.sleep(0.001)
            sent += k
            final = None
            if sent == spec.max_tokens:
                final = ServerFinal("length", len(spec.token_ids), 0, sent, 0, 0, 0, 0, 0, 0)
            yield StreamEvent(k, final)


def scripted_config(**kw) -> BenchConfig:
    wl = WorkloadConfig(input_len="fixed:4", output_len=kw.pop("output_len", "fixed:7"))
    return BenchConfig(address="scripted", workload=wl, **kw)


@pytest.mark.parametrize("chunk", [1, 3])
def test_itl_counts_every_token_and_errors_are_counted(chunk):
    cfg = scripted_config(arrival=ArrivalConfig(kind="concurrency", concurrency=3),
                          limits=Limits(num_requests=10, warmup_requests=2))
    backend = ScriptedBackend(fail={3: "INVALID_ARGUMENT", 5: "RESOURCE_EXHAUSTED",
                                    7: "RESOURCE_EXHAUSTED"}, chunk=chunk)
    result = asyncio.run(run_bench(cfg, backend=backend))
    recs = result.records
    assert len(recs) == 12 and [r.warmup for r in recs] == [True] * 2 + [False] * 10
    for r in recs:
        if r.ok:
            assert r.output_tokens == 7 and len(r.itl_ms) == 6
            # the ITLs cover first token -> last token, so they sum to less than e2e - ttft
            assert sum(r.itl_ms) <= r.e2e_ms - r.ttft_ms + 1e-6
            if chunk == 3:  # 3 + 3 + 1: two zeros, then 3 equal shares, then one
                assert r.itl_ms[:2] == [0.0, 0.0] and len(set(r.itl_ms[2:5])) == 1
    report = summarize(recs, cfg.to_json())
    assert report["counts"] == {"sent": 10, "succeeded": 7, "errored": 3, "warmup": 2,
                                "warmup_errored": 0}
    assert report["errors"] == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 2}


@pytest.mark.parametrize("arrival", [ArrivalConfig(kind="burst", burst_size=4),
                                     ArrivalConfig(kind="concurrency", concurrency=4)])
def test_drain_timeout_cancels_and_counts_stragglers(arrival):
    cfg = scripted_config(arrival=arrival, limits=Limits(num_requests=4),
                          output_len="fixed:999", drain_timeout_s=0.2)
    result = asyncio.run(run_bench(cfg, backend=ScriptedBackend()))
    report = summarize(result.records, cfg.to_json())
    assert report["counts"]["sent"] == 4
    assert report["errors"] == {"CANCELLED": 4}


# ---- report, CLI, compare -------------------------------------------------------------------


def test_report_json_shape_and_console_table(tmp_path):
    cfg = scripted_config(arrival=ArrivalConfig(kind="poisson", rate=200.0),
                          limits=Limits(num_requests=6), seed=9)
    result = asyncio.run(run_bench(cfg, backend=ScriptedBackend(fail={2: "UNAVAILABLE"})))
    report = summarize(result.records, cfg.to_json())
    assert {"phases", "throughput", "goodput", "slo_attainment", "errors", "counts",
            "config"} <= set(report)
    assert report["config"]["seed"] == 9 and report["config"]["arrival"]["rate"] == 200.0
    assert report["config"]["workload"]["input_len"] == "fixed:4"
    for p in PHASES:
        assert set(report["phases"][p]) == set(STATS)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert load_report(path) == json.loads(json.dumps(report))  # JSON-clean
    table = format_report(report)
    assert "UNAVAILABLE 1" in table and all(p in table for p in PHASES)


def test_compare_prints_ratios():
    def rep(ttft_p99, goodput):
        phases = {p: dict.fromkeys(STATS, 10.0) for p in PHASES}
        phases["ttft"]["p99"] = ttft_p99
        return {"phases": phases,
                "throughput": {"requests_per_s": 2.0, "input_tokens_per_s": 100.0,
                               "output_tokens_per_s": 50.0, "window_s": 1.0},
                "goodput": {"requests_per_s": goodput, "requests": 1},
                "slo_attainment": {"both": 0.5, "ttft": 0.5, "tpot": 1.0},
                "errors": {}, "counts": {"sent": 4, "succeeded": 4, "errored": 0},
                "config": {}}

    out = format_compare(rep(40.0, 1.0), rep(10.0, 3.0), "P/D", "colocated")
    ttft_row = next(line for line in out.splitlines() if line.startswith("ttft p99"))
    assert ttft_row.split()[-3:] == ["40.0", "10.0", "0.25x"]
    goodput_row = next(line for line in out.splitlines() if line.startswith("goodput"))
    assert goodput_row.split()[-1] == "3.00x"


def test_cli_builds_the_config():
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "--address", "h:1", "--burst", "5", "--burst-interval", "0.5",
         "--duration", "10", "--warmup-s", "2", "--seed", "4", "--workload", "shared-prefix",
         "--prefix-len", "90", "--suffix-len", "10", "--output-len", "normal:20:5:1:40",
         "--traffic-class", "chat:weight=3,ttft_ms=200", "--traffic-class", "bulk"])
    cfg = config_from_args(args)
    assert cfg.arrival == ArrivalConfig(kind="burst", burst_size=5, burst_interval_s=0.5)
    assert cfg.limits == Limits(num_requests=None, duration_s=10.0, warmup_s=2.0)
    assert cfg.workload.kind == "shared-prefix" and cfg.workload.prefix_len == 90
    assert cfg.workload.output_len == "normal:20:5:1:40"
    assert [c.name for c in cfg.workload.classes] == ["chat", "bulk"]
    assert cfg.seed == 4 and args.func.__name__ == "cmd_bench"
    sweep = config_from_args(parser.parse_args(["bench", "--address", "h:1",
                                                "--sweep", "1,2.5,4"]))
    assert sweep.rates == [1.0, 2.5, 4.0] and sweep.limits.num_requests == 100
    cmp = parser.parse_args(["bench", "compare", "a.json", "b.json"])
    assert cmp.func.__name__ == "cmd_compare"


# ---- against another OpenAI-compatible server ----------------------------------------------


async def _other_openai_server() -> tuple[object, int]:
    """A minimal OpenAI-compatible server on 127.0.0.1 that, like vLLM, sends no pdserve
    timing: three text chunks, a finish reason, a usage chunk when asked."""
    from aiohttp import web

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "other-model"}]})

    async def completions(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            choice = {"index": 0, "text": "x", "finish_reason": "length" if i == n - 1 else None}
            chunk = {"id": "c", "object": "text_completion", "choices": [choice]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.002)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def test_bench_against_another_openai_server_reports_no_server_phases():
    """Server-side phases are absent from the report (not 0.0) and the report says so, so a
    comparison with vLLM does not show pdserve's queue/prefill/transfer/decode against zeros."""
    from loadgen.openai_backend import OpenAIBackend
    from loadgen.stats import CLIENT_PHASES, SERVER_PHASES

    cfg = scripted_config(arrival=ArrivalConfig(kind="concurrency", concurrency=2),
                          limits=Limits(num_requests=4), output_len="fixed:5")

    async def run():
        runner, port = await _other_openai_server()
        try:
            return await run_bench(cfg, backend=OpenAIBackend(f"127.0.0.1:{port}"))
        finally:
            await runner.cleanup()

    result = asyncio.run(run())
    report = summarize(result.records, cfg.to_json())
    assert report["counts"]["succeeded"] == 4
    assert set(report["phases"]) == set(CLIENT_PHASES)
    assert report["phases"]["tpot"]["p50"] > 0
    assert report["server_phases"] == {"reported": False, "phases": list(SERVER_PHASES)}
    table = format_report(report)
    assert "server-side phases (queue, prefill, transfer, decode): not reported" in table
    assert not any(line.startswith(p) for line in table.splitlines() for p in SERVER_PHASES)

    pdserve = summarize(asyncio.run(run_bench(cfg, backend=ScriptedBackend())).records,
                        cfg.to_json())
    assert pdserve["server_phases"]["reported"] and set(pdserve["phases"]) == set(PHASES)
    compared = format_compare(pdserve, report, "pdserve", "other")
    prefill = next(line for line in compared.splitlines() if line.startswith("prefill p99"))
    assert prefill.split()[-2:] == ["-", "-"]  # nothing to set against pdserve's figure
    assert "other does not report server-side phases" in compared
