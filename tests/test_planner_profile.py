"""The timing profile: least squares recovers known coefficients, the JSON round-trips and
refuses bad input with a message, the router's online TimingModel reads and writes the same
format, and a real (short) sweep of a tiny engine writes a profile whose models predict every
measured point within their reported error."""

from __future__ import annotations

import dataclasses
import json

import pytest

from launcher.cli import main
from planner.fit import fit_linear
from planner.profile import DECODE_FEATURES, MIXED_FEATURES, PREFILL_FEATURES
from router.timing_models import TimingModel
from router.timing_profile import PROFILE_VERSION, LinearModel, Profile, ProfileError


def synthetic(features, coef, rows):
    return [{**dict(zip(features[1:], row)),
             "y": coef[0] + sum(c * x for c, x in zip(coef[1:], row))} for row in rows]


def test_fit_recovers_known_coefficients_exactly():
    coef = (0.004, 2e-5, 3e-8)
    rows = [(u, u * (c + u)) for u in (16, 64, 256, 512) for c in (0, 128, 384)]
    model = fit_linear(PREFILL_FEATURES, synthetic(PREFILL_FEATURES, coef, rows))
    assert model.coef == pytest.approx(coef, rel=1e-9)
    assert model.rel_rmse == pytest.approx(0, abs=1e-9)
    assert model.max_rel_error == pytest.approx(0, abs=1e-9)
    assert model.n_points == len(rows)
    assert model.predict({"uncached_tokens": 100, "uncached_x_context": 100 * 300}) == \
        pytest.approx(0.004 + 2e-5 * 100 + 3e-8 * 30_000)


def test_fit_needs_more_points_than_features_and_positive_times():
    with pytest.raises(ProfileError, match="needs more than 3 points"):
        fit_linear(DECODE_FEATURES, synthetic(DECODE_FEATURES, (1, 1, 1), [(1, 2), (2, 3)]))
    with pytest.raises(ProfileError, match="positive"):
        fit_linear(DECODE_FEATURES, synthetic(DECODE_FEATURES, (-9, 1, 1),
                                              [(1, 2), (2, 3), (3, 1), (4, 4)]))


def make_profile() -> Profile:
    return Profile(model="m", source="sweep", block_size=16, kv_pool_blocks=100,
                   kv_bytes_per_token=4096,
                   prefill=LinearModel(PREFILL_FEATURES, (0.01, 1e-4, 1e-8), 0.05, 0.1, 12),
                   decode=LinearModel(DECODE_FEATURES, (0.02, 1e-3, 1e-6), 0.03, 0.07, 9),
                   transfer={"tcp": LinearModel(("1", "bytes"), (1e-4, 1e-9), 0.1, None, 4)},
                   points={"decode": [{"batch_size": 1.0, "context_tokens": 10.0, "y": 0.02}]},
                   hardware="test")


def test_profile_json_round_trips():
    p = make_profile()
    assert Profile.from_json(p.to_json()) == p
    assert json.loads(p.to_json())["version"] == PROFILE_VERSION


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: "not json", "not valid JSON"),
    (lambda raw: json.dumps({**raw, "version": 99}), "version 99"),
    (lambda raw: json.dumps({k: v for k, v in raw.items() if k != "block_size"}),
     "lacks the field 'block_size'"),
    (lambda raw: json.dumps({**raw, "decode": {**raw["decode"], "coef": [1.0]}}),
     "one coefficient per feature"),
    (lambda raw: json.dumps({**raw, "block_size": 0}), "block_size 0"),
])
def test_bad_profiles_are_refused_with_a_reason(mutate, message):
    raw = json.loads(make_profile().to_json())
    with pytest.raises(ProfileError, match=message):
        Profile.from_json(mutate(raw))


def test_a_model_asked_for_a_feature_it_was_not_given_says_so():
    with pytest.raises(ProfileError, match="needs feature 'context_tokens'"):
        make_profile().decode.predict({"batch_size": 2})


def test_online_timing_model_exports_and_imports_the_profile_format():
    online = TimingModel(0.005, 0.0005, decay=1.0)
    for x in (1, 2, 4, 8, 3, 5):
        online.observe(x, 0.01 + 0.002 * x)
    exported = online.export("batch_size")
    assert exported.features == ("1", "batch_size") and exported.n_points == 6
    assert exported.predict({"batch_size": 6}) == pytest.approx(online.predict(6))
    restored = LinearModel.from_dict(json.loads(json.dumps(dataclasses.asdict(exported))))
    assert restored == exported
    imported = TimingModel.from_linear(restored, "batch_size")
    assert (imported.a, imported.b) == pytest.approx((online.a, online.b))


def test_a_short_real_sweep_writes_a_profile_whose_models_hold_their_reported_error(
        tiny_llama, tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = main(["profile", "--model", str(tiny_llama), "--block-size", "8", "--kv-cache-mib", "1",
               "--out", str(out), "--prefill-tokens", "8,24,40,64", "--cached-tokens", "0,32",
               "--batch-sizes", "1,2,3", "--contexts", "16,40", "--mixed-chunks", "8,24,40",
               "--transfer-blocks", "1,4,16", "--repeats", "2"])
    assert rc == 0
    profile = Profile.from_json(out.read_text())
    assert profile.source == "sweep" and profile.block_size == 8
    # 1 MiB of fp32 KV for 2 layers x 2 KV heads x 16 dims: 1 MiB / (2*2*2*16*4 B * 8 tokens).
    assert profile.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert profile.kv_pool_blocks == 2**20 // (profile.kv_bytes_per_token * 8)
    assert {"tcp", "local"} <= set(profile.transfer)
    models = {"prefill": profile.prefill, "decode": profile.decode, "mixed": profile.mixed,
              **{f"transfer:{k}": m for k, m in profile.transfer.items()}}
    assert set(models) == set(profile.points)
    assert profile.prefill.features == PREFILL_FEATURES
    assert profile.mixed.features == MIXED_FEATURES
    # One point per prefill / mixed / transfer setting (the fastest of 2), decode per step.
    assert len(profile.points["prefill"]) == 8 and len(profile.points["decode"]) == 3 * 2 * 3
    assert len(profile.points["mixed"]) == 3 * 2 * 3
    assert all(len(profile.points[f"transfer:{k}"]) == 3 for k in profile.transfer)
    assert {p["cached_tokens"] for p in profile.points["prefill"]} == {0, 32}
    for name, model in models.items():
        points = profile.points[name]
        assert model.n_points == len(points) and model.rel_rmse >= 0
        for p in points:
            err = abs(model.predict(p) - p["y"]) / p["y"]
            assert err <= model.max_rel_error + 1e-9, (name, p)
    assert "held-out error" in capsys.readouterr().out
