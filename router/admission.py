"""The front door's checks that need the model or the cluster's limits: a parsed request
(router/api.py) is checked against `RouterConfig`'s limits before tokenizing (cheap checks
first), then tokenized (chat template included) and its token ids checked by the one prompt
validator the engine uses too (pdserve_api/validation.py).

Raises `InvalidArgument` or `InvalidRequestError`; the router answers both with
INVALID_ARGUMENT."""

from __future__ import annotations

from typing import Any, cast

from pdserve_api.messages import InvalidArgument
from pdserve_api.validation import check_prompt
from router.api import ParsedRequest
from router.config import ModelInfo, RouterConfig


def check_limits(req: ParsedRequest, config: RouterConfig) -> None:
    """The configured limits that need no tokenizing."""
    if req.sampling.max_tokens > config.max_output_tokens:
        raise InvalidArgument(f"sampling.max_tokens={req.sampling.max_tokens}: at most "
                              f"{config.max_output_tokens} on this cluster")
    if len(req.sampling.stop) > config.max_stop_strings:
        raise InvalidArgument(f"sampling.stop: {len(req.sampling.stop)} strings, at most "
                              f"{config.max_stop_strings}")
    if isinstance(req.prompt, str):
        chars = len(req.prompt)
    else:  # chat messages count their content; token ids count nothing here
        chars = sum(len(m["content"]) for m in req.prompt if isinstance(m, dict))
    if chars > config.max_prompt_chars:
        raise InvalidArgument(f"prompt is {chars} characters; at most "
                              f"{config.max_prompt_chars}")


def tokenize(req: ParsedRequest, model: ModelInfo, config: RouterConfig) -> list[int]:
    """The request's prompt as token ids, checked for this model and cluster."""
    check_limits(req, config)
    tok = model.tokenizer
    chat = bool(req.prompt) and isinstance(req.prompt[0], dict)
    if isinstance(req.prompt, str) or chat:
        if tok is None:
            raise InvalidArgument("this model has no tokenizer: send token_ids")
        ids = (tok.encode(req.prompt) if isinstance(req.prompt, str)
               else tok.encode_chat(cast(list[dict[str, Any]], req.prompt)))
    else:
        ids = list(cast(list[int], req.prompt))
    if req.sampling.stop and tok is None:
        raise InvalidArgument("sampling.stop needs a tokenizer: use stop_token_ids")
    check_prompt(ids, vocab_size=model.vocab_size, max_model_len=model.max_model_len,
                 max_prompt_tokens=config.max_prompt_tokens)
    return ids
