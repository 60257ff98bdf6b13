"""The engine against Hugging Face transformers (fp32, CPU) on tiny checkpoints of every family:
prompt logits within 1e-4 and identical greedy tokens for batched requests of mixed lengths."""

from __future__ import annotations

import random

import pytest
import torch
from hf_oracle import hf_greedy, hf_prompt_logits
from tiny_models import FAMILIES

from engine.config import EngineConfig
from engine.engine import LLMEngine
from pdserve_api.sampling import SamplingParams

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def make_engine(path, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(EngineConfig(model=str(path), **kw))


def random_prompts(n: int, vocab: int, seed: int, lo: int = 3, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prompt_logits_match_transformers(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    engine = make_engine(path)
    prompts = random_prompts(3, 320, seed=1)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=1, **GREEDY))
    sched = engine.scheduler.schedule()
    assert len(sched.requests) == 3  # one batched step
    logits, ordered = engine.runner.execute(sched, all_logits=True)
    offset = 0
    for req in ordered:
        n = req.num_prompt_tokens
        ref = hf_prompt_logits(path, req.prompt_token_ids)
        torch.testing.assert_close(logits[offset:offset + n], ref, atol=1e-4, rtol=0)
        offset += n


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_match_transformers_batched(tiny_checkpoints, family):
    path = tiny_checkpoints[family]
    engine = make_engine(path)
    prompts = random_prompts(4, 320, seed=2)
    outs = engine.generate(prompts, SamplingParams(max_tokens=40, **GREEDY))
    for prompt, out in zip(prompts, outs):
        assert out.finish_reason == "length"
        assert out.new_token_ids == hf_greedy(path, prompt, 40)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
