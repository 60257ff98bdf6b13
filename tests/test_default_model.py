"""The real default model (SmolLM2-135M-Instruct, imported from its GGUF): the engine's greedy
output equals transformers' on the same imported checkpoint, for a few chat prompts."""

from __future__ import annotations

import pytest
from hf_oracle import hf_greedy

from engine.config import EngineConfig
from engine.engine import LLMEngine
from pdserve_api.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


def test_greedy_chat_output_matches_transformers():
    engine = LLMEngine(EngineConfig())  # the default model
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = engine.generate(chats, SamplingParams(max_tokens=48, temperature=0.0,
                                                 ignore_eos=True))
    for chat, out in zip(chats, outs):
        ids = engine.tokenize(chat)
        assert out.new_token_ids == hf_greedy(engine.model_path, ids, 48)
    assert "Paris" in outs[0].text
    engine.check_integrity()
