"""The checks a tokenized prompt must pass, shared by the router (before any work is placed)
and the engine (`LLMEngine.add_request` / `reserve_kv`), so both refuse the same prompts with
the same words. Raises `InvalidRequestError`; the router answers it with INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve_api.errors import InvalidRequestError


def check_prompt(token_ids: Sequence[int], *, vocab_size: int, max_model_len: int,
                 max_prompt_tokens: int | None = None) -> None:
    """Not empty, at most min(max_model_len - 1, max_prompt_tokens) tokens (one position is
    left for the first output token), every id in [0, vocab_size)."""
    if not token_ids:
        raise InvalidRequestError("the prompt is empty (it has no tokens)")
    limit = max_model_len - 1
    if max_prompt_tokens is not None:
        limit = min(limit, max_prompt_tokens)
    if len(token_ids) > limit:
        raise InvalidRequestError(
            f"the prompt has {len(token_ids)} tokens; the limit is {limit} prompt tokens "
            f"(max_model_len {max_model_len} leaves room for one output token)")
    bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token ids {bad[:5]} outside the vocabulary "
                                  f"[0, {vocab_size})")
