"""Greedy output is unchanged by every engine mechanism: prefix-cache hits (incl. copy-on-write),
chunked prefill, preemption and resume, and KV export in one engine then import in another.
The oracle is transformers' greedy continuation."""

from __future__ import annotations

import pytest
from hf_oracle import hf_greedy
from test_engine_vs_hf import GREEDY, make_engine, random_prompts

from engine.config import EngineConfig, EngineMode
from engine.engine import LLMEngine, NoKVSpaceError
from pdserve_api.errors import InvalidRequestError
from pdserve_api.sampling import SamplingParams

N = 32


def greedy(n=N, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, **GREEDY, **kw)


def test_prefix_cache_hit_same_tokens_and_fewer_computed(tiny_llama):
    engine = make_engine(tiny_llama)
    shared = random_prompts(1, 320, seed=3, lo=50, hi=50)[0]
    first = engine.generate([shared + [7, 8, 9]], greedy())[0]
    assert first.num_cached_tokens == 0
    second_prompt = shared + [11, 12]
    second = engine.generate([second_prompt], greedy())[0]
    assert second.num_cached_tokens == 48  # 3 full blocks of 16 shared
    assert second.new_token_ids == hf_greedy(tiny_llama, second_prompt, N)
    engine.check_integrity()


def test_full_prompt_hit_recomputes_last_token_with_copy_on_write(tiny_llama):
    engine = make_engine(tiny_llama)
    prompt = random_prompts(1, 320, seed=4, lo=32, hi=32)[0]  # exactly 2 blocks
    # Keep the first request's blocks referenced while the second shares them.
    rid = engine.add_request(prompt, greedy(n=200))
    for _ in range(3):
        engine.step()
    out = engine.generate([prompt], greedy())[0]
    assert out.num_cached_tokens == 31  # all but the last token: one left to compute
    assert out.new_token_ids == hf_greedy(tiny_llama, prompt, N)
    engine.abort(rid)
    engine.step()
    engine.check_integrity()


@pytest.mark.parametrize("chunk", [1, 5, 16, 23])
def test_chunked_prefill_same_tokens(tiny_llama, chunk):
    engine = make_engine(tiny_llama, max_num_batched_tokens=max(chunk, 8),
                         long_prefill_token_threshold=chunk)
    prompts = random_prompts(3, 320, seed=5, lo=20, hi=60)
    outs = engine.generate(prompts, greedy())
    for p, o in zip(prompts, outs):
        assert o.new_token_ids == hf_greedy(tiny_llama, p, N)


def test_preemption_and_resume_same_tokens(tiny_llama):
    # 12 blocks of 16 = 192 tokens for 4 requests that need ~75 each: some must be preempted.
    engine = make_engine(tiny_llama, num_kv_blocks=12, enable_prefix_caching=False)
    prompts = random_prompts(4, 320, seed=6, lo=30, hi=40)
    reqs = [engine.add_request(p, greedy(n=40)) for p in prompts]
    outputs: dict[str, list[int]] = {r: [] for r in reqs}
    preempted = False
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        preempted |= any(r.num_preemptions for r in engine.requests.values())
    assert preempted
    for p, r in zip(prompts, reqs):
        assert outputs[r] == hf_greedy(tiny_llama, p, 40)
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == 12


def test_export_then_import_in_another_engine_continues(tiny_llama):
    prefill = make_engine(tiny_llama, mode=EngineMode.PREFILL)
    decode = make_engine(tiny_llama, mode=EngineMode.DECODE)
    prompts = random_prompts(3, 320, seed=7)
    ids = [prefill.add_request(p, greedy()) for p in prompts]
    first: dict[str, list[int]] = {}
    while prefill.has_unfinished():
        for out in prefill.step():
            assert out.finish_reason == "prefilled"
            first[out.request_id] = out.new_token_ids
    for rid in ids:
        kv = prefill.export_kv(rid)
        prefill.release(rid)
        decode.import_kv(kv, greedy())
    rest = {rid: [] for rid in ids}
    while decode.has_unfinished():
        for out in decode.step():
            rest[out.request_id] += out.new_token_ids
    for rid, prompt in zip(ids, prompts):
        assert first[rid] + rest[rid] == hf_greedy(tiny_llama, prompt, N)
    prefill.check_integrity()
    decode.check_integrity()
    assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks
    assert prefill.block_manager.num_free_blocks == prefill.block_manager.num_blocks


def test_decode_reservation_refused_when_full_and_cancel_frees(tiny_llama):
    decode = make_engine(tiny_llama, mode=EngineMode.DECODE, num_kv_blocks=4)
    rid, blocks = decode.reserve_kv(list(range(3, 50)), 47)
    assert len(blocks) == 3
    with pytest.raises(NoKVSpaceError):
        decode.reserve_kv(list(range(3, 40)), 37)
    decode.cancel_reservation(rid)
    decode.check_integrity()
    assert decode.block_manager.num_free_blocks == 4


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], {}, "empty"),
        ([5] * 600, {}, "limit"),
        ([5, 999999], {}, "vocabulary"),
        ([5, -1], {}, "vocabulary"),
        ([5], {"temperature": -1.0}, "temperature"),
        ([5], {"top_p": 0.0}, "top_p"),
        ([5], {"max_tokens": 0}, "max_tokens"),
        ([5], {"top_k": -3}, "top_k"),
        ([5], {"min_p": 2.0}, "min_p"),
        ([5], {"repetition_penalty": 0.0}, "repetition_penalty"),
        ([5], {"frequency_penalty": 1e9}, "frequency_penalty"),
        ([5], {"logprobs": 10**6}, "logprobs"),
    ],
)
def test_bad_inputs_rejected_engine_keeps_serving(tiny_llama, prompt, params, match):
    engine = make_engine(tiny_llama)
    good = engine.add_request([5, 6, 7], greedy(n=8))
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(prompt, SamplingParams(**params) if params else None)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == good]
    assert sum(len(o.new_token_ids) for o in outs) == 8
    engine.check_integrity()


def test_bad_config_is_a_clear_error(tiny_llama, tmp_path):
    from pdserve_api.errors import ConfigError

    with pytest.raises(ConfigError, match="attention_backend"):
        EngineConfig(model=str(tiny_llama), attention_backend="cuda-magic")
    with pytest.raises(ConfigError, match="max_model_len"):
        LLMEngine(EngineConfig(model=str(tiny_llama), max_model_len=10**7))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ConfigError, match="unsupported architecture"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_abort_mid_decode_frees_blocks(tiny_llama):
    engine = make_engine(tiny_llama)
    a = engine.add_request(random_prompts(1, 320, 8)[0], greedy(n=100))
    b = engine.add_request(random_prompts(1, 320, 9)[0], greedy(n=10))
    for _ in range(4):
        engine.step()
    assert engine.abort(a)
    seen = {}
    while engine.has_unfinished():
        for o in engine.step():
            seen.setdefault(o.request_id, []).append(o)
    assert seen[a][-1].finish_reason == "abort"
    assert seen[b][-1].finish_reason == "length"
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("mode", list(EngineMode))
def test_warmup_leaves_no_trace(tiny_llama, mode):
    """A worker warms its engine before serving: afterwards nothing of the dummy request is
    left (blocks, prefix-cache hashes, index events, requests) and the mode is unchanged."""
    engine = make_engine(tiny_llama, mode=mode)
    engine.warmup()
    bm = engine.block_manager
    assert engine.config.mode == mode
    assert bm.num_free_blocks == bm.num_blocks and not bm.cached
    assert bm.drain_events() == [] and engine.requests == {} and not engine.has_unfinished()
    engine.check_integrity()
    if mode != EngineMode.DECODE:
        prompt = random_prompts(1, 320, seed=21, lo=40, hi=40)[0]
        out = engine.generate([prompt], greedy(n=1 if mode == EngineMode.PREFILL else N))[0]
        assert out.num_cached_tokens == 0
        assert out.new_token_ids == hf_greedy(tiny_llama, prompt, len(out.new_token_ids))


def test_a_request_whose_sampling_fails_ends_alone(tiny_llama):
    """An error tied to one request (here a sampling field corrupted after validation, as a
    bug or a numerically hostile value would) aborts that request only; its batch mates run
    to the end with the tokens they get alone."""
    import dataclasses

    prompts = random_prompts(2, 320, seed=12)
    sampled = SamplingParams(max_tokens=N, temperature=0.8, seed=5, ignore_eos=True)
    alone = make_engine(tiny_llama)
    want_greedy = alone.generate([prompts[0]], greedy())[0].new_token_ids
    want_sampled = alone.generate([prompts[1]], sampled)[0].new_token_ids

    engine = make_engine(tiny_llama)
    good = engine.add_request(prompts[0], greedy())
    mate = engine.add_request(prompts[1], sampled)
    bad = engine.add_request(prompts[1], dataclasses.replace(sampled, seed=6))
    seen: dict[str, list[int]] = {good: [], mate: [], bad: []}
    reasons = {}
    for o in engine.step():
        seen[o.request_id] += o.new_token_ids
    object.__setattr__(engine.requests[bad].sampling, "top_k", "not a number")
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert reasons == {good: "length", mate: "length", bad: "abort"}
    assert seen[good] == want_greedy
    assert seen[mate] == want_sampled
    engine.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
