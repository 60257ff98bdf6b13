"""The simulator: the real router scheduler and engine scheduler on simulated time, reported
in `pdserve bench`'s format. Hand-computable cases match exactly, a queue builds when arrivals
outrun the profile's capacity (and not below it), prefix hits come from the real block hashes,
a run is deterministic, and bad configurations are refused with a reason."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.runner import BenchConfig
from loadgen.stats import summarize
from loadgen.workloads import TrafficClass, WorkloadConfig
from pdserve_api.errors import ConfigError
from planner.sim_inputs import SimRequest, from_bench_config
from planner.simulator import SimConfig, simulate
from router.timing_profile import LinearModel, Profile, ProfileError

PREFILL_S, DECODE_S, TRANSFER_S = 0.1, 0.01, 0.05


def fixed_profile(prefill_per_token: float = 0.0) -> Profile:
    """Fixed step times: a prefill step PREFILL_S (+ per uncached token), a decode step
    DECODE_S, a mixed step both, a transfer TRANSFER_S."""
    prefill = LinearModel(("1", "uncached_tokens"), (PREFILL_S, prefill_per_token))
    return Profile(model="fixed", source="sweep", block_size=16, kv_pool_blocks=256,
                   kv_bytes_per_token=1024, prefill=prefill,
                   decode=LinearModel(("1",), (DECODE_S,)),
                   mixed=LinearModel(("1", "uncached_tokens"),
                                     (PREFILL_S + DECODE_S, prefill_per_token)),
                   transfer={"tcp": LinearModel(("1",), (TRANSFER_S,))})


def fixed_requests(n: int, gap_s: float, prompt: int = 32, output: int = 5,
                   **kw) -> list[SimRequest]:
    return [SimRequest(i, i * gap_s, tuple(range(1000 * i + 3, 1000 * i + 3 + prompt)), output,
                       **kw) for i in range(n)]


def report(records, **config):
    return summarize(records, {"label": "sim", **config})


@pytest.mark.parametrize("colocated", [True, False])
def test_spaced_requests_match_the_hand_computed_timeline(colocated):
    """One request at a time on idle workers: TTFT = prefill (+ transfer), then one decode
    step per further token; nothing waits."""
    cfg = (SimConfig(fixed_profile(), num_colocated=1) if colocated
           else SimConfig(fixed_profile(), num_prefill=1, num_decode=1))
    records = simulate(cfg, fixed_requests(3, gap_s=1.0))
    ttft = PREFILL_S + (0 if colocated else TRANSFER_S)
    for r in records:
        assert r.ok and r.output_tokens == 5
        assert r.ttft_ms == pytest.approx(1e3 * ttft)
        assert r.itl_ms == pytest.approx([1e3 * DECODE_S] * 4)
        assert r.tpot_ms == pytest.approx(1e3 * DECODE_S)
        assert r.e2e_ms == pytest.approx(1e3 * (ttft + 4 * DECODE_S))
        s = r.server
        assert (s.queue_ms, s.prefill_ms) == pytest.approx((0.0, 1e3 * PREFILL_S))
        assert s.transfer_ms == pytest.approx(0 if colocated else 1e3 * TRANSFER_S)
        assert s.decode_ms == pytest.approx(1e3 * 4 * DECODE_S)
    rep = report(records)
    assert rep["counts"]["succeeded"] == 3
    window = 2.0 + ttft + 4 * DECODE_S  # first arrival to the last request's end
    assert rep["throughput"]["window_s"] == pytest.approx(window)
    assert rep["goodput"]["requests_per_s"] == pytest.approx(3 / window)
    assert rep["phases"]["ttft"]["p99"] == pytest.approx(1e3 * ttft)


def test_two_requests_at_once_batch_their_prefill_and_decode_together():
    """Both arrive at 0 on one colocated worker: one prefill step serves both (the engine
    scheduler batches them), then they decode in the same steps."""
    reqs = fixed_requests(2, gap_s=0.0)
    records = simulate(SimConfig(fixed_profile(), num_colocated=1), reqs)
    for r in records:
        assert r.ttft_ms == pytest.approx(1e3 * PREFILL_S)
        assert r.e2e_ms == pytest.approx(1e3 * (PREFILL_S + 4 * DECODE_S))


def test_a_queue_builds_when_arrivals_outrun_capacity():
    """Prefill-only work (one output token) of 100 tokens at 1 ms a token: about 10 req/s a
    worker. At 20 req/s the queue grows request after request; at 4 req/s nothing waits."""
    profile = fixed_profile(prefill_per_token=0.001)
    slow = simulate(SimConfig(profile, num_colocated=1), fixed_requests(40, 0.25, 100, 1))
    assert all(r.server.queue_ms == 0 for r in slow)
    fast = simulate(SimConfig(profile, num_colocated=1, max_queue=1000),
                    fixed_requests(40, 0.05, 100, 1))
    queue = [r.server.queue_ms for r in fast]
    assert all(r.ok for r in fast)
    assert queue[-1] > queue[20] > queue[5] > 0
    assert queue[-1] > 500  # twice the capacity for 2 s: about a second of backlog
    rep = report(fast)
    assert rep["throughput"]["requests_per_s"] < 20 * 0.75  # served below the offered rate


def test_overload_with_a_ttft_slo_is_refused_by_the_real_admission_check():
    profile = fixed_profile(prefill_per_token=0.001)
    reqs = fixed_requests(60, 0.02, 100, 1, ttft_slo_ms=300.0)
    records = simulate(SimConfig(profile, num_colocated=1), reqs)
    statuses = {r.status for r in records}
    assert statuses == {"OK", "RESOURCE_EXHAUSTED"}
    rep = report(records)
    assert rep["errors"]["RESOURCE_EXHAUSTED"] > 10


def test_shared_prefixes_hit_the_real_prefix_cache():
    """loadgen's shared-prefix workload: after each group's first request, later ones reuse
    the group's prefix blocks (real chained hashes), and those prefills are shorter."""
    bench = BenchConfig(
        arrival=ArrivalConfig(kind="burst", burst_size=1, burst_interval_s=1.0),
        limits=Limits(num_requests=8), seed=3,
        workload=WorkloadConfig(kind="shared-prefix", num_groups=2, prefix_len=64,
                                suffix_len=8, output_len="fixed:2", group_order="round-robin"))
    reqs = from_bench_config(bench)
    assert reqs[0].token_ids[:64] == reqs[2].token_ids[:64] != reqs[1].token_ids[:64]
    profile = fixed_profile(prefill_per_token=0.001)
    records = simulate(SimConfig(profile, num_prefill=1, num_decode=1), reqs)
    cached = [r.server.cached_tokens for r in records]
    assert cached[:2] == [0, 0] and cached[2:] == [64] * 6
    assert records[2].server.prefill_ms == pytest.approx(1e3 * (PREFILL_S + 0.001 * 8))


def test_a_run_is_deterministic():
    bench = BenchConfig(arrival=ArrivalConfig(kind="poisson", rate=30.0),
                        limits=Limits(num_requests=50), seed=7,
                        workload=WorkloadConfig(input_len="uniform:16:200",
                                                output_len="uniform:1:20"))
    cfg = SimConfig(fixed_profile(0.0005), num_prefill=2, num_decode=1)
    a = [r.to_json() for r in simulate(cfg, from_bench_config(bench))]
    cfg = SimConfig(fixed_profile(0.0005), num_prefill=2, num_decode=1)
    assert a == [r.to_json() for r in simulate(cfg, from_bench_config(bench))]


def test_decode_pool_capacity_holds_requests_back():
    """A decode pool of 3 blocks holds one 32-token prompt and its output (3 blocks of 16) at a
    time: the second request waits for the first to finish before its prefill starts."""
    cfg = SimConfig(fixed_profile(), num_prefill=1, num_decode=1, num_kv_blocks=3)
    first, second = simulate(cfg, fixed_requests(2, gap_s=0.0))
    assert first.server.queue_ms == 0
    assert second.server.queue_ms == pytest.approx(first.e2e_ms)


def test_bad_configurations_are_refused_with_a_reason():
    with pytest.raises(ConfigError, match="at least one prefill and one decode"):
        SimConfig(fixed_profile(), num_prefill=1, num_decode=0)
    with pytest.raises(ProfileError, match="no ucx transfer model"):
        SimConfig(fixed_profile(), transport="ucx")
    empty = Profile(model="x", source="cluster", block_size=16, kv_pool_blocks=10,
                    kv_bytes_per_token=0)
    with pytest.raises(ProfileError, match="no prefill model"):
        simulate(SimConfig(empty, num_colocated=1), fixed_requests(1, 1.0))
    with pytest.raises(ConfigError, match="closed loop"):
        from_bench_config(BenchConfig(arrival=ArrivalConfig(kind="concurrency")))


def test_cli_simulates_a_bench_config_and_compare_reads_it(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text(fixed_profile(0.0005).to_json())
    bench = BenchConfig(arrival=ArrivalConfig(kind="poisson", rate=5.0),
                        limits=Limits(num_requests=20), seed=1,
                        workload=WorkloadConfig(input_len="fixed:64", output_len="fixed:4",
                                                classes=[TrafficClass(ttft_ms=1000,
                                                                      tpot_ms=100)]))
    measured = tmp_path / "measured" / "report.json"
    measured.parent.mkdir()
    measured.write_text(json.dumps({"config": bench.to_json()}))
    out = tmp_path / "sim"
    assert main(["simulate", "--profile", str(profile), "--bench-config", str(measured),
                 "--prefill", "1", "--decode", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["counts"]["sent"] == 20 and rep["slo_attainment"]["both"] == 1.0
    assert len((out / "requests.jsonl").read_text().splitlines()) == 20
    assert main(["bench", "compare", str(out / "report.json"), str(out / "report.json")]) == 0
    assert "goodput req/s" in capsys.readouterr().out
    trace = tmp_path / "trace"
    assert main(["simulate", "--profile", str(profile), "--trace",
                 str(out / "requests.jsonl"), "--colocated", "1", "--out", str(trace)]) == 0
    assert json.loads((trace / "report.json").read_text())["counts"]["sent"] == 20


def test_one_slot_and_fixed_service_is_an_md1_queue():
    """Poisson arrivals, one prefill slot, a fixed service time D: an M/D/1 queue, whose mean
    wait is rho*D / (2*(1 - rho)) (Pollaczek-Khinchine). At rho = 0.5 that is D/2; a long
    run's sample mean is within a few percent of it."""
    service, rho, n = PREFILL_S, 0.5, 4000
    bench = BenchConfig(arrival=ArrivalConfig(kind="poisson", rate=rho / service),
                        limits=Limits(num_requests=n), seed=11,
                        workload=WorkloadConfig(input_len="fixed:16", output_len="fixed:1"))
    cfg = SimConfig(fixed_profile(), num_colocated=1, slots_per_worker=1, max_queue=n)
    records = simulate(cfg, from_bench_config(bench))
    waits = [r.server.queue_ms / 1e3 for r in records]
    assert all(r.ok for r in records)
    assert sum(waits) / n == pytest.approx(rho * service / (2 * (1 - rho)), rel=0.1)
