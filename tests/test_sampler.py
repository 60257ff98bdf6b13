"""Sampling parameters do what they say, checked on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler
from pdserve_api.sampling import SamplingParams


def req(rid="r", prompt=(1,), out=(), **kw) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**kw))
    r.token_ids += list(out)
    return r


def draws(logits, n=400, **kw) -> set[int]:
    s = Sampler(seed=1)
    return {s(logits.clone().unsqueeze(0), [req(**kw)]).token_ids[0] for _ in range(n)}


LOGITS = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])


def test_greedy_is_argmax():
    assert draws(LOGITS, n=5, temperature=0.0) == {0}


def test_top_k_top_p_min_p_restrict_support():
    assert draws(LOGITS, top_k=2) == {0, 1}
    p = torch.softmax(LOGITS, 0)
    # top_p just above the mass of the first two tokens keeps exactly three.
    assert draws(LOGITS, top_p=float(p[:2].sum()) + 1e-3) == {0, 1, 2}
    assert draws(LOGITS, min_p=float(p[2] / p[0]) - 1e-4) == {0, 1, 2}
    assert len(draws(LOGITS)) == 6


def test_low_temperature_concentrates_high_spreads():
    assert draws(LOGITS, temperature=0.05) == {0}
    assert len(draws(LOGITS, temperature=5.0)) == 6


def test_seed_reproducible_and_independent_of_batch():
    logits = torch.randn(3, 50)
    a = Sampler(seed=1)([logits[0:1].clone()][0], [req("a", seed=7)]).token_ids
    batch = Sampler(seed=99)(logits.clone(), [req("x"), req("a", seed=7), req("y")])
    b = Sampler(seed=1)(logits[0:1].clone(), [req("a", seed=7)]).token_ids
    assert a == b
    assert Sampler(seed=5)(logits[1:2].clone(), [req("a", seed=7)]).token_ids[0] == \
        batch.token_ids[1]


def test_penalties():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    # Repetition penalty over prompt tokens: token 0 (in prompt) divided by 2 -> token 1 wins.
    r = req(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits.clone(), [r]).token_ids == [1]
    # Presence/frequency act on output tokens only.
    r = req(prompt=[5], out=[0, 0], temperature=0.0, frequency_penalty=0.1)
    assert Sampler()(logits.clone(), [r]).token_ids == [1]
    r = req(prompt=[0], temperature=0.0, presence_penalty=2.0)
    assert Sampler()(logits.clone(), [r]).token_ids == [0]


def test_logprobs_are_log_softmax():
    r = req(temperature=0.0, logprobs=2)
    res = Sampler()(LOGITS.clone().unsqueeze(0), [r])
    lp, top = res.logprobs[0]
    expected = torch.log_softmax(LOGITS, 0)
    assert math.isclose(lp, float(expected[0]), rel_tol=1e-6)
    assert [t for t, _ in top] == [0, 1]


@pytest.mark.parametrize("bad", [{"temperature": float("nan")}, {"top_k": 1.5}, {"stop": [""]},
                                 {"stop_token_ids": [-2]}, {"seed": "x"}])
def test_invalid_params(bad):
    from pdserve_api.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


EXTREMES = [{"temperature": 1e-40}, {"temperature": 5e-324}, {"temperature": 100.0},
            {"repetition_penalty": 1e-30}, {"repetition_penalty": 10.0},
            {"presence_penalty": -2.0, "frequency_penalty": -2.0},
            {"temperature": 1e-40, "top_p": 1e-30, "min_p": 1.0, "top_k": 1}]


@pytest.mark.parametrize("params", EXTREMES)
def test_every_admitted_value_samples_a_token(params):
    """Validation admits these; the draw must neither raise nor pick a token outside the
    vocabulary (temperature 1e-40 used to overflow `logits / temperature` to inf and NaN)."""
    logits = torch.tensor([[30.0, 29.0, -5.0, 0.0, 1e4, -1e4]])
    r = req(prompt=[4, 0], out=[4, 4, 1], **params)
    for _ in range(20):
        token = Sampler(seed=3)(logits.clone(), [r]).token_ids[0]
        assert 0 <= token < logits.shape[1]
    if params.get("temperature", 1.0) < 1e-30:  # a vanishing temperature is greedy
        assert token == 4


def test_vanishing_temperature_picks_among_tied_maxima_only():
    logits = torch.tensor([[2.0, 7.0, 7.0, -1.0]])
    got = {Sampler(seed=s)(logits.clone(), [req(temperature=1e-40)]).token_ids[0]
           for s in range(30)}
    assert got <= {1, 2}
