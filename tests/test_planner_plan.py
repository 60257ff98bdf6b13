"""`pdserve plan`: the search recommends colocation where prefill is negligible, P/D where
prefills stall a colocated worker's decodes past a tight TPOT, and says so when the SLO
cannot be met at all; bad input is an error with a reason."""

from __future__ import annotations

import json

import pytest

from launcher.cli import main
from loadgen.arrivals import Limits
from loadgen.runner import BenchConfig
from loadgen.workloads import TrafficClass, WorkloadConfig
from pdserve_api.errors import ConfigError
from planner.plan import candidates, plan
from planner.simulator import SimConfig
from router.timing_profile import LinearModel, Profile

PER_SEQ_S = 0.002  # decode step time per sequence in the batch


def profile(prefill_s: float, per_token_s: float, decode_s: float) -> Profile:
    prefill = LinearModel(("1", "uncached_tokens"), (prefill_s, per_token_s))
    return Profile(model="synthetic", source="sweep", block_size=16, kv_pool_blocks=4096,
                   kv_bytes_per_token=1024, prefill=prefill,
                   decode=LinearModel(("1", "batch_size"), (decode_s, PER_SEQ_S)),
                   mixed=LinearModel(("1", "uncached_tokens", "batch_size"),
                                     (prefill_s + decode_s, per_token_s, PER_SEQ_S)),
                   transfer={"tcp": LinearModel(("1", "bytes"), (0.001, 1e-9))})


def bench(input_len: str, output_len: str, ttft_ms: float, tpot_ms: float) -> BenchConfig:
    return BenchConfig(limits=Limits(num_requests=40), seed=5, workload=WorkloadConfig(
        input_len=input_len, output_len=output_len,
        classes=[TrafficClass(ttft_ms=ttft_ms, tpot_ms=tpot_ms)]))


def test_negligible_prefill_means_colocate():
    p = profile(prefill_s=0.001, per_token_s=0.0, decode_s=0.02)
    result = plan(SimConfig(p, num_colocated=1), bench("fixed:16", "fixed:32", 2000, 40),
                  devices=2)
    assert [o.candidate.describe() for o in result.outcomes] == ["colocated x2", "1P:1D"]
    assert not result.disaggregate and result.best.candidate.colocated == 2
    assert "recommendation: colocate" in result.table()


def test_prefill_that_stalls_decodes_past_a_tight_tpot_means_disaggregate():
    p = profile(prefill_s=0.3, per_token_s=0.0005, decode_s=0.01)
    result = plan(SimConfig(p, num_colocated=1), bench("fixed:256", "fixed:8", 5000, 40),
                  devices=2)
    assert result.disaggregate and result.best.candidate.describe() == "1P:1D"
    colocated, pd = result.outcomes
    assert pd.goodput_per_device > colocated.goodput_per_device
    assert json.loads(json.dumps(result.to_json()))["recommendation"]["disaggregate"]


def test_an_impossible_slo_is_reported_not_recommended():
    p = profile(prefill_s=0.5, per_token_s=0.0, decode_s=0.01)
    result = plan(SimConfig(p, num_colocated=1), bench("fixed:16", "fixed:4", 100, 0),
                  devices=2)
    assert result.best is None and "SLO is impossible" in result.table()


def test_bad_plans_are_errors():
    with pytest.raises(ConfigError, match="at least one device"):
        candidates(0)
    p = profile(0.01, 0.0, 0.01)
    with pytest.raises(ConfigError, match="attainment"):
        plan(SimConfig(p, num_colocated=1), bench("fixed:16", "fixed:4", 0, 0), 2,
             attainment=0)


def test_cli_plan_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(profile(0.001, 0.0, 0.02).to_json())
    out = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(path), "--devices", "2", "--ttft-ms", "2000",
                 "--tpot-ms", "40", "--input-len", "fixed:16", "--output-len", "fixed:32",
                 "--num-requests", "40", "--json", str(out)]) == 0
    assert "recommendation: colocate" in capsys.readouterr().out
    assert json.loads(out.read_text())["recommendation"]["colocated"] == 2
