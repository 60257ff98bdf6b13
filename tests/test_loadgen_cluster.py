"""loadgen against a real tiny cluster (Ray actors, gRPC router over a socket): a complete
report with every request accounted for, and server errors landing in the error counts.

The router is sized to overload on purpose (one prefill slot, a wait queue of one), so that a
burst is answered with RESOURCE_EXHAUSTED; closed-loop runs at concurrency 2 never exceed
slot + queue, so they see no rejection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from cluster_helpers import ray_session, tiny_model, wait_idle

from launcher.cli import main as launcher_main
from launcher.cluster import LocalCluster
from launcher.cluster_config import ClusterConfig
from loadgen.arrivals import ArrivalConfig, Limits
from loadgen.cli import main as loadgen_main
from loadgen.runner import BenchConfig, run_bench
from loadgen.stats import PHASES, STATS, summarize
from loadgen.workloads import TrafficClass, WorkloadConfig, make_workload
from router.config import RouterConfig
from router.timing_profile import Profile

VOCAB = 320  # tiny_models' vocabulary
ENGINE = {"num_kv_blocks": 96, "max_num_seqs": 16, "max_num_batched_tokens": 256}
WORKLOAD = WorkloadConfig(input_len="uniform:8:64", output_len="uniform:2:6",
                          token_id_low=16, token_id_high=VOCAB,
                          classes=[TrafficClass("chat", 3, ttft_ms=10_000, tpot_ms=5_000,
                                                priority=1),
                                   TrafficClass("bulk", 1)])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = tiny_model(tmp_path_factory.mktemp("loadgen") / "llama", seed=3)
    cfg = ClusterConfig(model=str(model), num_prefill=1, num_decode=1, start_redis=False,
                        engine=ENGINE, worker_num_cpus=0.25, http_port=0,
                        router=RouterConfig(slots_per_prefill_worker=1, max_queue=1))
    with ray_session(), LocalCluster(cfg) as c:
        yield c


@pytest.fixture(autouse=True)
def no_leaks(cluster):
    """After each run: every worker's block accounting holds and nothing is left held (the
    rejected, invalid and finished requests all freed their blocks)."""
    yield
    wait_idle(cluster)


def bench(address: str, **kw) -> BenchConfig:
    kw.setdefault("workload", WORKLOAD)
    return BenchConfig(address=address, seed=kw.pop("seed", 2), **kw)  # seed 2: both classes


def assert_accounted(report: dict, sent: int, warmup: int) -> None:
    c = report["counts"]
    assert c["sent"] == sent and c["warmup"] == warmup
    assert c["succeeded"] + c["errored"] == c["sent"]
    assert sum(report["errors"].values()) == c["errored"]



def poisoned(cfg, every_third: int, bad_token: int):
    """The workload with request i's last token replaced by bad_token (out of the vocabulary)
    where i % 3 == every_third."""
    for spec in make_workload(cfg.workload, 0):
        if spec.index % 3 == every_third:
            spec = dataclasses.replace(spec, token_ids=[*spec.token_ids[:-1], bad_token])
        yield spec


def test_run_produces_a_complete_report(cluster):
    cfg = bench(cluster.address, arrival=ArrivalConfig(kind="concurrency", concurrency=2),
                limits=Limits(num_requests=12, warmup_requests=2))
    result = asyncio.run(run_bench(cfg))
    report = summarize(result.records, cfg.to_json())
    assert_accounted(report, sent=12, warmup=2)
    assert report["errors"] == {} and report["counts"]["succeeded"] == 12
    for phase in PHASES:  # every phase measured, every statistic a number
        row = report["phases"][phase]
        assert set(row) == set(STATS)
        assert all(isinstance(row[s], float) for s in STATS), (phase, row)
        assert row["p50"] <= row["p90"] <= row["p95"] <= row["p99"] <= row["max"]
    measured = [r for r in result.records if not r.warmup]
    for r in measured:  # the client saw what the server says it sent
        assert r.output_tokens == r.server.completion_tokens
        assert len(r.itl_ms) == r.output_tokens - 1
        assert r.prompt_tokens == r.input_tokens_sent
        assert r.server.finish_reason == "length"
    out_tokens = sum(r.output_tokens for r in measured)
    t = report["throughput"]
    assert t["output_tokens_per_s"] * t["window_s"] == pytest.approx(out_tokens)
    assert report["slo_attainment"]["both"] == 1.0  # generous SLOs on a tiny model
    assert set(report["classes"]) == {"chat", "bulk"}
    assert report["config"]["seed"] == 2


def test_openai_http_backend_reports_the_same_phases(cluster):
    """The OpenAI HTTP endpoint as the driver: exact token counts and server phases come
    from pdserve's extension to the SSE chunks; HTTP errors are counted by status name."""
    address = f"127.0.0.1:{cluster.router.http_port}"
    cfg = dataclasses.replace(
        bench(address, arrival=ArrivalConfig(kind="concurrency", concurrency=2),
              limits=Limits(num_requests=9, warmup_requests=1)), backend="openai")

    result = asyncio.run(run_bench(cfg, workload=poisoned(cfg, 2, VOCAB + 7)))
    report = summarize(result.records, cfg.to_json())
    assert_accounted(report, sent=9, warmup=1)
    assert report["errors"] == {"INVALID_ARGUMENT": 3}
    ok = [r for r in result.records if r.status == "OK" and not r.warmup]
    assert len(ok) == 6
    for r in ok:  # the client counted what the server says it sent
        assert r.output_tokens == r.server.completion_tokens > 0
        assert len(r.itl_ms) == r.output_tokens - 1
        assert r.prompt_tokens == r.input_tokens_sent
        assert r.server.prefill_ms > 0 and r.server.kv_transport in ("ucx", "tcp")
    for phase in PHASES:
        assert isinstance(report["phases"][phase]["p99"], float), phase


def test_invalid_requests_counted_as_invalid_argument(cluster):
    """Every third request carries a token id outside the vocabulary: the router answers
    INVALID_ARGUMENT, and exactly those show up in the error counts."""
    cfg = bench(cluster.address, arrival=ArrivalConfig(kind="concurrency", concurrency=2),
                limits=Limits(num_requests=9, warmup_requests=3))

    result = asyncio.run(run_bench(cfg, workload=poisoned(cfg, 1, VOCAB + 1000)))
    report = summarize(result.records, cfg.to_json())
    assert_accounted(report, sent=9, warmup=3)
    bad = [r for r in result.records if r.index % 3 == 1]
    assert all(r.status == "INVALID_ARGUMENT" for r in bad)
    assert report["errors"] == {"INVALID_ARGUMENT": sum(not r.warmup for r in bad)} == \
        {"INVALID_ARGUMENT": 3}
    assert report["counts"]["warmup_errored"] == 1
    assert report["counts"]["succeeded"] == 6
    assert report["goodput"]["requests"] == 6  # an error never meets its SLO


def test_overload_counted_as_resource_exhausted(cluster):
    """Bursts far beyond one prefill slot + a queue of one: the router rejects early, and the
    rejections are counted, not dropped."""
    cfg = bench(cluster.address, arrival=ArrivalConfig(kind="burst", burst_size=12,
                                                       burst_interval_s=0.2),
                limits=Limits(num_requests=24))
    result = asyncio.run(run_bench(cfg))
    report = summarize(result.records, cfg.to_json())
    assert_accounted(report, sent=24, warmup=0)
    assert set(report["errors"]) == {"RESOURCE_EXHAUSTED"}
    assert report["errors"]["RESOURCE_EXHAUSTED"] >= 1
    assert report["counts"]["succeeded"] >= 1


def test_capacity_and_overload_figures_account_for_every_request(cluster):
    """bench/overload.py's figures from a real overloaded run: every refusal counted with its
    latency, per class and in total, the rest admitted; and the capacity a closed loop gets."""
    from bench.overload import phase_figures
    from loadgen.bench import measure_capacity

    assert measure_capacity(cluster.address, WORKLOAD, concurrency=2, num_requests=6) > 0
    cfg = bench(cluster.address, arrival=ArrivalConfig(kind="burst", burst_size=12,
                                                       burst_interval_s=0.2),
                limits=Limits(num_requests=24))
    result = asyncio.run(run_bench(cfg))
    errors = summarize(result.records, cfg.to_json())["errors"]
    figures = phase_figures(result.records)
    total = figures["all"]
    assert total["refused"] == errors["RESOURCE_EXHAUSTED"] >= 1
    assert total["admitted"] + total["refused"] + total["num_other_errors"] == 24
    assert total["refusal_ms"]["p99"] is not None and total["ttft_ms"]["p99"] is not None
    assert {"chat", "bulk"} <= set(figures)
    assert sum(figures[c]["refused"] for c in ("chat", "bulk")) == total["refused"]
    assert sum(figures[c]["admitted"] for c in ("chat", "bulk")) == total["admitted"]


def test_cli_sweep_writes_reports_plots_and_compares(cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = loadgen_main(["bench", "--address", cluster.address, "--sweep", "20,40",
                       "--num-requests", "4", "--input-len", "uniform:8:32",
                       "--output-len", "fixed:3", "--token-id-range", f"16:{VOCAB}",
                       "--ttft-ms", "10000", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["rate"] for r in summary["runs"]] == [20.0, 40.0]
    for r in summary["runs"]:
        report = json.loads((out / r["report"]).read_text())
        assert_accounted(report, sent=4, warmup=0)
        assert set(report["phases"]) == set(PHASES)
        assert report["config"]["arrival"] == {**report["config"]["arrival"], "kind": "poisson",
                                               "rate": r["rate"]}
        assert (out / r["report"]).with_name("latency_cdf.png").stat().st_size > 0
        assert (out / r["report"]).with_name("requests.jsonl").read_text().count("\n") == 4
    assert (out / "sweep.png").stat().st_size > 0
    capsys.readouterr()
    rc = loadgen_main(["bench", "compare", str(out / "rate_20/report.json"),
                       str(out / "rate_40/report.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "ttft p99" in text and "goodput" in text and "x" in text


def test_profile_from_cluster_is_the_routers_learnt_models(cluster, tmp_path):
    """`pdserve profile --from-cluster` reads the router's online timing models over HTTP
    (GET /v1/timing_profile) in the profile format: the same lines the scheduler predicts with."""
    cfg = bench(cluster.address, arrival=ArrivalConfig(kind="concurrency", concurrency=1),
                limits=Limits(num_requests=3, warmup_requests=0))
    asyncio.run(run_bench(cfg))
    out = tmp_path / "cluster.json"
    assert launcher_main(["profile", "--from-cluster", f"127.0.0.1:{cluster.router.http_port}",
                          "--out", str(out)]) == 0
    profile = Profile.from_json(out.read_text())
    assert profile.source == "cluster" and profile.block_size == cluster.router.model.block_size
    snap = cluster.router.slo.snapshot()
    (service,) = [w["service_model"] for w in snap["prefill"].values()]
    assert profile.prefill.features == ("1", "tokens_in_flight")
    assert profile.prefill.coef == pytest.approx((service["a"], service["b"]))
    assert profile.prefill.n_points == service["n"] >= 3
    (step,) = [w["step_model"] for w in snap["decode"].values()]
    if step["n"]:
        assert profile.decode.coef == pytest.approx((step["a"], step["b"]))
    else:
        assert profile.decode is None
