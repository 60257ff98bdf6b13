"""Text paths through the engine: chat prompts, streamed deltas, stop strings, stop tokens."""

from __future__ import annotations

import pytest
from tiny_models import add_tiny_tokenizer, make_tiny_checkpoint

from engine.config import EngineConfig
from engine.engine import LLMEngine
from pdserve_api.sampling import SamplingParams


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory) -> LLMEngine:
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("text") / "m", seed=11)
    add_tiny_tokenizer(path)
    return LLMEngine(EngineConfig(model=str(path), num_kv_blocks=128))


def run(engine, prompt, **kw):
    sp = SamplingParams(temperature=0.0, ignore_eos=True, **kw)
    return list(engine.stream(prompt, sp))


def test_streamed_text_is_the_decode_of_the_tokens(text_engine):
    outs = run(text_engine, "Hello world! How", max_tokens=40)
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == 40
    assert "".join(o.text for o in outs) == text_engine.tokenizer.decode(tokens)
    assert outs[-1].finish_reason == "length"


def test_stop_string_truncates_and_finishes(text_engine):
    full = run(text_engine, "Hello world! How", max_tokens=40)
    text = "".join(o.text for o in full)
    assert len(text) > 12
    stop = text[8:11]  # something the greedy continuation is known to produce
    first = text.find(stop)
    outs = run(text_engine, "Hello world! How", max_tokens=40, stop=[stop])
    assert outs[-1].finish_reason == "stop"
    assert "".join(o.text for o in outs) == text[:first]
    text_engine.check_integrity()


def test_stop_token_id(text_engine):
    full = run(text_engine, "The quick brown", max_tokens=20)
    tokens = [t for o in full for t in o.new_token_ids]
    outs = run(text_engine, "The quick brown", max_tokens=20, stop_token_ids=[tokens[5]])
    got = [t for o in outs for t in o.new_token_ids]
    assert got == tokens[: tokens.index(tokens[5]) + 1]
    assert outs[-1].finish_reason == "stop"


def test_chat_messages_use_the_template(text_engine):
    msgs = [{"role": "user", "content": "Hello world!"}]
    ids = text_engine.tokenize(msgs)
    tok = text_engine.tokenizer
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n")
    outs = run(text_engine, msgs, max_tokens=5)
    assert outs[0].num_prompt_tokens == len(ids)
