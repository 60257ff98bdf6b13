"""Hugging Face transformers as the oracle: greedy continuation and prompt logits, fp32."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def hf_model(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_prompt_logits(path, token_ids: list[int]) -> torch.Tensor:
    return hf_model(str(path))(torch.tensor([token_ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(path, token_ids: list[int], n: int) -> list[int]:
    """n greedy tokens, never stopping at EOS (a plain loop over the KV cache)."""
    model = hf_model(str(path))
    out = model(torch.tensor([token_ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
