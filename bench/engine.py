"""Engine throughput vs Hugging Face transformers, measured in the same run on the same prompts.

1. 32 concurrent requests through the engine (continuous batching) vs transformers
   `generate` run one request at a time: output tokens/s, prefill included on both sides.
2. Single-stream decode tokens/s (prefill excluded): engine vs transformers `generate`.

Usage: python -m bench.engine [--model PATH] [--requests 32] [--output-len 64] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from pdserve_api.sampling import SamplingParams

TOPICS = ["the ocean", "a bicycle", "prime numbers", "coffee", "volcanoes", "the moon",
          "a library", "rain", "chess", "bread", "mountains", "a lighthouse"]


def make_prompts(engine: LLMEngine, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(2, 30)))
        text = f"Write a short paragraph about {topic}. Keywords: {words}."
        prompts.append(engine.tokenizer.encode_chat([{"role": "user", "content": text}]))
    return prompts


def engine_batch(engine: LLMEngine, prompts, out_len: int) -> float:
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp)
    dt = time.perf_counter() - t0
    assert all(len(o.new_token_ids) == out_len for o in outs)
    return len(prompts) * out_len / dt


def engine_decode_rate(engine: LLMEngine, prompt, out_len: int) -> float:
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    times = [time.perf_counter() for _ in engine.stream(prompt, sp)]
    return (out_len - 1) / (times[-1] - times[0])


def hf_generate(model, prompt, out_len: int) -> float:
    ids = torch.tensor([prompt], device=model.device)
    _sync(model.device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len,
                         min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    assert out.shape[1] - ids.shape[1] == out_len
    _sync(model.device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    """Honest timing on a GPU: wait for queued kernels before reading the clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--single-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="e.g. cuda (then the Triton backend)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--attention-backend", default=None, choices=["torch", "triton"],
                    help="default: triton on CUDA, torch on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import transformers

    engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=max(64, args.requests),
                                    device=args.device, dtype=args.dtype,
                                    attention_backend=args.attention_backend))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        engine.model_path, dtype=engine.config.torch_dtype).to(args.device).eval()
    prompts = make_prompts(engine, args.requests, args.seed)
    with torch.inference_mode():
        # Warm both sides up once.
        engine_batch(engine, prompts[:2], 4)
        hf_generate(hf, prompts[0], 4)
        engine.block_manager.reset_prefix_cache()  # no help from the warm-up's prefixes

        batch_tps = engine_batch(engine, prompts, args.output_len)
        hf_time = sum(hf_generate(hf, p, args.output_len) for p in prompts)
        hf_tps = len(prompts) * args.output_len / hf_time

        engine.block_manager.reset_prefix_cache()
        single = engine_decode_rate(engine, prompts[0], args.single_len)
        t_full = hf_generate(hf, prompts[0], args.single_len)
        t_one = hf_generate(hf, prompts[0], 1)
        hf_single = (args.single_len - 1) / (t_full - t_one)

    result = {
        "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                    f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} torch threads"),
        "device": args.device, "dtype": args.dtype,
        "attention_backend": engine.runner.backend.name,
        "model": str(engine.model_path.name),
        "requests": args.requests, "output_len": args.output_len,
        "mean_prompt_len": sum(map(len, prompts)) / len(prompts),
        "engine_concurrent_tok_s": round(batch_tps, 1),
        "hf_sequential_tok_s": round(hf_tps, 1),
        "concurrent_ratio": round(batch_tps / hf_tps, 2),
        "engine_single_decode_tok_s": round(single, 1),
        "hf_single_decode_tok_s": round(hf_single, 1),
        "single_ratio": round(single / hf_single, 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
