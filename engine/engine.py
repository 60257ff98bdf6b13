"""The engine: requests in, token/text deltas out. One step = schedule -> execute -> update.

Modes (engine/config.py EngineMode):
- colocated: prefill and decode here; the built-in baseline.
- prefill: a request computes its prompt's KV and samples the first token, then finishes as
  PREFILLED with its blocks held until `export_kv` + `release` (the KV-transfer layer calls
  these) or an abort.
- decode: `reserve_kv` allocates blocks for a prompt, the transfer layer writes them (in
  process: `write_kv`), `commit_kv` starts decoding. `import_kv` does all three.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch

from engine.block_manager import BlockManager
from engine.config import (
    EngineConfig,
    EngineMode,
    ModelConfig,
    check_tp_config,
    resolve_max_model_len,
)
from engine.default_model import resolve_model
from engine.model_runner import ModelRunner
from engine.parallel import TPGroup
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from engine.tp_engine import TPDriverRunner
from pdserve_api.errors import ConfigError, InvalidRequestError
from pdserve_api.sampling import SamplingParams
from pdserve_api.validation import check_prompt

log = logging.getLogger(__name__)


class NoKVSpaceError(RuntimeError):
    """Decode mode: not enough free KV blocks to reserve for a request right now."""


@dataclass
class RequestOutput:
    """One step's news for one request. Text and tokens are deltas since the last output."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | prefilled
    logprobs: list = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    # The request's stamps (engine/request.py), so workers report queued / prefill / decode
    # times from the engine's own clock readings, also once the request is forgotten here.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class KVExport:
    """A request's KV blocks as tensors, plus what a decode engine needs to continue."""

    request_id: str
    token_ids: list[int]  # prompt + output tokens so far (output = the first token)
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV the blocks hold
    block_size: int
    k: torch.Tensor  # [num_layers, num_blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor


@dataclass(frozen=True)
class KVHandoff:
    """The prompt's KV blocks of a prefill-mode request, in order, and what rides with them."""

    block_ids: list[int]  # covers the prompt's tokens; later slots are not shipped
    num_computed_tokens: int  # the prompt's tokens
    output_token_ids: tuple[int, ...]  # sampled so far (the first token once prefilled)
    num_cached_tokens: int  # prompt tokens that came from this worker's prefix cache


@dataclass
class _Stream:
    """Per-request text state: incremental detokenizer plus stop-string hold-back."""

    detok: IncrementalDetokenizer | None
    emitted_chars: int = 0


def _is_chat(prompt: Sequence[int] | list[dict]) -> TypeGuard[Sequence[dict[str, Any]]]:
    """Chat messages ([{role, content}]) rather than token ids."""
    return bool(prompt) and isinstance(prompt[0], dict)


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, tp: TPGroup | None = None):
        self.config = config or EngineConfig()
        torch.manual_seed(self.config.seed)
        self.model_path: Path = resolve_model(self.config.model)
        self.model_config = ModelConfig.from_dir(self.model_path)
        self.tokenizer = (Tokenizer.from_dir(self.model_path)
                          if (self.model_path / "tokenizer.json").is_file() else None)
        self.max_model_len = resolve_max_model_len(self.model_config, self.config)
        self.runner = self._make_runner(tp)
        capacity = self.runner.num_blocks * self.config.block_size
        if capacity < self.max_model_len:
            log.warning("KV pool holds %d tokens < max_model_len %d; lowering max_model_len",
                        capacity, self.max_model_len)
            self.max_model_len = capacity
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens,
                                   self.config.long_prefill_token_threshold)
        self.sampler = Sampler(self.config.seed)
        self.requests: dict[str, Request] = {}
        self.streams: dict[str, _Stream] = {}
        self.pending_outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = eos
        # Prefill mode: called with each step's schedule before the forward pass; may return
        # a per-layer callback (model.forward's `on_layer`) that ships finished layers' KV.
        self.kv_layer_hook: Callable[[SchedulerOutput], Callable[[int], None] | None] | None = None

    def _make_runner(self, tp: TPGroup | None) -> ModelRunner:
        """A plain ModelRunner, or under tensor parallelism (rank 0 only) one that broadcasts
        each step to the follower ranks (engine/tp_engine.py)."""
        if tp is None or tp.size == 1:
            check_tp_config(self.config, tp)
            return ModelRunner(self.model_config, self.config, self.model_path,
                               self.max_model_len, tp)
        if tp.rank != 0:
            raise ConfigError(f"LLMEngine runs on TP rank 0 only; rank {tp.rank} runs "
                              "engine.tp_engine.TPFollower")
        return TPDriverRunner(self.model_config, self.config, self.model_path,
                              self.max_model_len, tp)

    def close(self) -> None:
        """Under tensor parallelism, tell the follower ranks to leave their loop; otherwise a
        no-op. The engine takes no more steps afterwards."""
        self.runner.close()

    # ---- requests in ---------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Sequence[int] | list[dict],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request. `prompt` is text, token ids, or chat messages ([{role, content}]).
        Raises InvalidRequestError with a message naming the problem."""
        req = self._new_request(prompt, sampling, request_id)
        if self.config.mode == EngineMode.DECODE:
            raise InvalidRequestError("a decode-mode engine takes requests with their KV "
                                      "(import_kv / reserve_kv), not bare prompts")
        self._admit(req)
        self.scheduler.add(req)
        return req.request_id

    def _new_request(self, prompt, sampling, request_id) -> Request:
        sampling = sampling or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        self._validate(token_ids, sampling)
        return Request(request_id, token_ids, sampling)

    def tokenize(self, prompt: str | Sequence[int] | list[dict]) -> list[int]:
        if isinstance(prompt, str) or _is_chat(prompt):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer; send token ids")
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            return self.tokenizer.encode_chat(list(prompt))
        # Token ids; _validate rejects anything else.
        return list(cast("Sequence[int]", prompt))

    def _validate(self, token_ids: list[int], sampling: SamplingParams) -> None:
        check_prompt(token_ids, vocab_size=self.model_config.vocab_size,
                     max_model_len=self.max_model_len)
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; use stop_token_ids")

    def _admit(self, req: Request) -> None:
        self.requests[req.request_id] = req
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                           req.sampling.skip_special_tokens)
        self.streams[req.request_id] = _Stream(detok)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if unknown/finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        self.pending_outputs.append(self._final(req, "abort"))
        return True

    # ---- the step ------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or bool(self.pending_outputs)

    def step(self) -> list[RequestOutput]:
        outputs, self.pending_outputs = self.pending_outputs, []
        sched = self.scheduler.schedule()
        if not sched.requests:
            return outputs
        on_layer = self.kv_layer_hook(sched) if self.kv_layer_hook is not None else None
        logits, to_sample = self.runner.execute(sched, on_layer=on_layer)
        for req in sched.requests:
            req.num_computed_tokens += sched.num_scheduled_tokens[req.request_id]
            self.block_manager.cache_computed_blocks(req)
        for req, token, lp in self._sample(logits, to_sample):
            outputs.append(self._append_token(req, token, lp))
        return outputs

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[tuple]:
        """(request, token, logprob) per request. Sampling is the per-request part of a step:
        if the batch draw fails, each row is drawn alone and a request whose draw fails is
        aborted by itself, so one request can never fail its batch mates."""
        if not requests:
            return []
        try:
            result = self.sampler(logits, requests)
            return list(zip(requests, result.token_ids, result.logprobs))
        except Exception:  # noqa: BLE001 - narrowed to the failing request below
            log.warning("batch sampling failed; drawing its %d requests one by one",
                        len(requests), exc_info=True)
        drawn = []
        for i, req in enumerate(requests):
            try:
                result = self.sampler(logits[i:i + 1], [req])
            except Exception as e:  # noqa: BLE001 - this request's fault: end it alone
                log.error("request %s: sampling failed (%s: %s); aborting it",
                          req.request_id, type(e).__name__, e)
                self.abort(req.request_id)
                continue
            drawn.append((req, result.token_ids[0], result.logprobs[0]))
        return drawn

    def _append_token(self, req: Request, token: int, logprob) -> RequestOutput:
        req.token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        stream = self.streams[req.request_id]
        reason = self._stop_reason(req, token)
        if stream.detok is not None:
            stream.detok.add(token)
            if reason is not None:
                stream.detok.flush()  # release a held-back partial character at the end
        out = RequestOutput(req.request_id, [token], logprobs=[logprob] if logprob else [],
                            num_prompt_tokens=req.num_prompt_tokens,
                            num_cached_tokens=req.num_cached_tokens,
                            arrival_time=req.arrival_time,
                            first_scheduled_time=req.first_scheduled_time,
                            first_token_time=req.first_token_time)
        if stream.detok is not None:
            full = stream.detok.text
            end, stopped = self._visible_end(full, req.sampling.stop, reason is not None)
            if stopped:
                reason = "stop"
            out.text = full[stream.emitted_chars:end]
            stream.emitted_chars = max(stream.emitted_chars, end)
        out.num_output_tokens = req.num_output_tokens
        if reason is not None:
            self._finish(req, RequestStatus(reason))
            out.finished, out.finish_reason = True, reason
        elif self.config.mode == EngineMode.PREFILL:
            self._finish(req, RequestStatus.FINISHED_PREFILLED, keep_blocks=True)
            out.finished, out.finish_reason = True, "prefilled"
        return out

    def _stop_reason(self, req: Request, token: int) -> str | None:
        sp = req.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if req.num_output_tokens >= sp.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _visible_end(text: str, stops: list[str], finishing: bool) -> tuple[int, bool]:
        """How much of text may be streamed: up to a stop string (which ends the request), or,
        while running, all but a tail that could still be the start of a stop string."""
        if not stops:
            return len(text), False
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return min(hits), True
        if finishing:
            return len(text), False
        return max(0, len(text) - (max(map(len, stops)) - 1)), False

    def _finish(self, req: Request, status: RequestStatus, keep_blocks: bool = False) -> None:
        self.scheduler.finish(req, status, keep_blocks)
        self.sampler.forget(req.request_id)
        if not keep_blocks:
            self._forget(req.request_id)

    def _forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
        self.streams.pop(request_id, None)

    def _final(self, req: Request, reason: str) -> RequestOutput:
        self.sampler.forget(req.request_id)
        self._forget(req.request_id)
        return RequestOutput(req.request_id, finished=True, finish_reason=reason,
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_cached_tokens=req.num_cached_tokens,
                             num_output_tokens=req.num_output_tokens,
                             arrival_time=req.arrival_time,
                             first_scheduled_time=req.first_scheduled_time,
                             first_token_time=req.first_token_time)

    # ---- KV export (prefill mode) / import (decode mode) -----------------------------------

    def export_kv(self, request_id: str) -> KVExport:
        """Copies of a prefilled request's KV blocks (tensor copies; transports read the pool
        directly through `block_table`)."""
        req = self._held(request_id)
        ids = torch.tensor(req.block_table, device=self.runner.device)
        return KVExport(request_id, list(req.token_ids), req.num_prompt_tokens,
                        req.num_computed_tokens, self.config.block_size,
                        self.runner.k_cache[:, ids].clone(), self.runner.v_cache[:, ids].clone())

    def block_table(self, request_id: str) -> list[int]:
        return list(self._held(request_id).block_table)

    def kv_handoff(self, request_id: str) -> KVHandoff:
        """Prefill mode: what a transport ships for a prefilled (or finishing) request."""
        req = self.requests.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} is not known here")
        n_blocks = self.block_manager.blocks_needed(req.num_prompt_tokens)
        return KVHandoff(req.block_table[:n_blocks], req.num_prompt_tokens,
                         tuple(req.output_token_ids), req.num_cached_tokens)

    def release(self, request_id: str) -> None:
        """Prefill mode: the KV has been shipped; drop the held blocks (they stay cached)."""
        req = self._held(request_id)
        self.block_manager.free(req)
        self._forget(request_id)

    def _held(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.status not in (RequestStatus.FINISHED_PREFILLED,
                                             RequestStatus.WAITING_FOR_KV):
            raise KeyError(f"request {request_id!r} holds no KV blocks here")
        return req

    def reserve_kv(self, prompt_token_ids: Sequence[int], num_computed_tokens: int,
                   sampling: SamplingParams | None = None,
                   request_id: str | None = None) -> tuple[str, list[int]]:
        """Decode mode: allocate blocks for a prompt's KV before it arrives. Raises
        NoKVSpaceError when the pool is short (the caller picks another worker or waits)."""
        req = self._new_request(list(prompt_token_ids), sampling, request_id)
        if not 0 < num_computed_tokens <= req.num_prompt_tokens:
            raise InvalidRequestError(f"num_computed_tokens {num_computed_tokens} outside "
                                      f"(0, {req.num_prompt_tokens}]")
        if self.block_manager.allocate_slots(req, num_computed_tokens) is None:
            raise NoKVSpaceError(f"no room for {num_computed_tokens} tokens of KV "
                                 f"({self.block_manager.num_free_blocks} free blocks)")
        req.status = RequestStatus.WAITING_FOR_KV
        self._admit(req)
        return req.request_id, list(req.block_table)

    def write_kv(self, request_id: str, k: torch.Tensor, v: torch.Tensor) -> None:
        req = self._held(request_id)
        expected = (self.runner.k_cache.shape[0], len(req.block_table),
                    *self.runner.k_cache.shape[2:])
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise InvalidRequestError(f"KV shape {tuple(k.shape)} != expected {expected}")
        ids = torch.tensor(req.block_table, device=self.runner.device)
        self.runner.k_cache[:, ids] = k.to(self.runner.k_cache)
        self.runner.v_cache[:, ids] = v.to(self.runner.v_cache)

    def commit_kv(self, request_id: str, num_computed_tokens: int,
                  output_token_ids: Sequence[int]) -> None:
        """The reserved blocks now hold the prompt's KV: start decoding after the output tokens
        the prefill side already produced (its first token)."""
        req = self._held(request_id)
        req.num_computed_tokens = num_computed_tokens
        req.first_token_time = time.monotonic()  # it came with the KV: decoding starts now
        stream = self.streams[request_id]
        for token in output_token_ids:
            req.token_ids.append(token)
            if stream.detok is not None:
                stream.detok.add(token)  # already streamed by the prefill side
        if stream.detok is not None:
            # The prefill side streamed exactly this much: the same detokenizer and stop-string
            # hold-back over the same tokens (it would have finished the request on a stop).
            stream.emitted_chars, _ = self._visible_end(stream.detok.text, req.sampling.stop,
                                                        False)
        self.block_manager.cache_computed_blocks(req)
        self.scheduler.add_running(req)

    def cancel_reservation(self, request_id: str) -> None:
        """A transfer failed: give the reserved blocks back."""
        req = self._held(request_id)
        self.block_manager.free(req)
        self._forget(request_id)

    def import_kv(self, kv: KVExport, sampling: SamplingParams | None = None) -> str:
        if kv.block_size != self.config.block_size:
            raise InvalidRequestError(f"KV block size {kv.block_size} != {self.config.block_size}")
        request_id, _ = self.reserve_kv(kv.token_ids[: kv.num_prompt_tokens],
                                        kv.num_computed_tokens, sampling, kv.request_id)
        try:
            self.write_kv(request_id, kv.k, kv.v)
        except Exception:
            self.cancel_reservation(request_id)
            raise
        self.commit_kv(request_id, kv.num_computed_tokens, kv.token_ids[kv.num_prompt_tokens:])
        return request_id

    # ---- conveniences --------------------------------------------------------------------

    def stream(self, prompt, sampling: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Run one request to the end, yielding its deltas (other requests keep stepping)."""
        request_id = self.add_request(prompt, sampling)
        while True:
            for out in self.step():
                if out.request_id == request_id:
                    yield out
                    if out.finished:
                        return

    def generate(self, prompts: Sequence, sampling: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one merged output (all tokens, all text) per prompt."""
        params = sampling if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        merged = {i: RequestOutput(i) for i in ids}
        while self.has_unfinished():
            for out in self.step():
                m = merged.get(out.request_id)
                if m is None:
                    continue
                m.new_token_ids += out.new_token_ids
                m.text += out.text
                m.logprobs += out.logprobs
                m.finished, m.finish_reason = out.finished, out.finish_reason
                m.num_prompt_tokens, m.num_cached_tokens = (out.num_prompt_tokens,
                                                            out.num_cached_tokens)
                m.num_output_tokens = out.num_output_tokens
        return [merged[i] for i in ids]

    def warmup(self) -> None:
        """Run one short request through prefill and decode before serving, then forget it.

        A worker's first forward pass pays one-time costs (allocator growth, kernel dispatch
        caches) several times a normal step; without this the first user request pays them,
        and the router's per-worker timing model starts from that outlier.
        """
        mode = self.config.mode
        self.config.mode = EngineMode.COLOCATED  # a full request in any mode; restored below
        try:
            vocab = self.model_config.vocab_size
            prompt = [i % vocab for i in range(1, 2 * self.config.block_size + 2)]
            self.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0,
                                                   ignore_eos=True))
        finally:
            self.config.mode = mode
        self.block_manager.reset_prefix_cache()
        self.block_manager.drain_events()  # nothing of the warmup reaches the prefix index

    def check_integrity(self) -> None:
        live = [r for r in self.requests.values()]
        self.block_manager.check_integrity(live)
