"""A simulated worker: the real engine scheduler and block manager on simulated time.

`SimWorker` owns an `engine.scheduler.Scheduler` over an `engine.block_manager.BlockManager`
(prefix caching by the real chained block hashes) and real `engine.request.Request`s. One step
is what `LLMEngine.step` does without the model: `schedule()`, a duration from the profile
(`StepCost`), then the same update (computed tokens, `cache_computed_blocks`, one token per
request that reached the end of its tokens). The simulator calls `start_step(now)` when the
worker is idle and has work, and `finish_step()` at now + the returned duration.

Roles, as the engine's modes: "prefill" (a request is done at its first token and keeps its
blocks until `release`), "decode" (`reserve` then `commit` a prompt's KV, then decode) and
"colocated" (both). Output tokens are a fixed id: what a model would sample does not change
the timing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler, SchedulerOutput
from router.timing_profile import LinearModel, Profile, ProfileError

SIM_TOKEN = 0  # the token every simulated step "samples"
ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class StepCost:
    """Seconds of one engine step from a profile: the prefill model for prefill chunks alone,
    the decode model for decodes alone, the mixed model for both (or the sum of the two when
    the profile has no mixed model, e.g. one learnt by a router)."""

    profile: Profile

    def __post_init__(self) -> None:
        if self.profile.prefill is None or self.profile.decode is None:
            raise ProfileError(f"profile of {self.profile.model} has no "
                               f"{'prefill' if self.profile.prefill is None else 'decode'} "
                               "model: a simulation needs both")

    def seconds(self, prefill_tokens: int, prefill_attention: int, batch: int,
                context: int) -> float:
        values = {"uncached_tokens": prefill_tokens, "uncached_x_context": prefill_attention,
                  "tokens_in_flight": prefill_tokens, "batch_size": batch,
                  "context_tokens": context}
        p, d = self.profile.prefill, self.profile.decode
        assert p is not None and d is not None  # checked at construction
        if not batch:
            return p.predict(values)
        if not prefill_tokens:
            return d.predict(values)
        mixed: LinearModel | None = self.profile.mixed
        return mixed.predict(values) if mixed is not None else p.predict(values) + d.predict(
            values)


@dataclass
class StepResult:
    """What a finished step produced: the requests that sampled a token, and those of them
    that finished here (prefill role: at their first token, blocks held for the transfer)."""

    tokens: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)


class SimWorker:
    def __init__(self, worker_id: str, role: str, cost: StepCost, engine: EngineConfig,
                 num_blocks: int):
        if role not in ROLES:
            raise ValueError(f"role {role!r} not one of {ROLES}")
        self.worker_id, self.role, self.cost = worker_id, role, cost
        self.block_manager = BlockManager(num_blocks, engine.block_size,
                                          engine.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, engine.max_num_seqs,
                                   engine.max_num_batched_tokens,
                                   engine.long_prefill_token_threshold)
        self.max_tokens: dict[str, int] = {}
        self.busy = False
        self._step: SchedulerOutput | None = None
        self.scheduled: list[Request] = []  # the running step's requests

    # -- requests in ---------------------------------------------------------------------------

    def cached_blocks(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of a prompt (its chained block hashes, engine/hashing.py) this
        worker holds: what the router's prefix index answers, from the same hashes."""
        cached = self.block_manager.cached
        n = 0
        for h in block_hashes:
            if h not in cached:
                break
            n += 1
        return n

    def add(self, req: Request, max_tokens: int) -> None:
        """A prompt to prefill (prefill and colocated roles)."""
        self.max_tokens[req.request_id] = max_tokens
        self.scheduler.add(req)

    def reserve(self, req: Request, max_tokens: int) -> bool:
        """Decode role: blocks for req's prompt KV, as `LLMEngine.reserve_kv`; False (nothing
        changed) when the pool is short."""
        if self.block_manager.allocate_slots(req, req.num_prompt_tokens) is None:
            return False
        req.status = RequestStatus.WAITING_FOR_KV
        self.max_tokens[req.request_id] = max_tokens
        return True

    def commit(self, req: Request, first_token: int = SIM_TOKEN) -> None:
        """Decode role: the KV landed; decode from the prefill side's first token on."""
        req.num_computed_tokens = req.num_prompt_tokens
        req.token_ids.append(first_token)
        self.block_manager.cache_computed_blocks(req)
        self.scheduler.add_running(req)

    def cancel(self, req: Request) -> None:
        """Decode role: drop a reservation that will not be used (the first token ended it)."""
        self.block_manager.free(req)
        self.max_tokens.pop(req.request_id, None)

    def release(self, req: Request) -> None:
        """Prefill role: the KV has been shipped; free the held blocks (they stay cached)."""
        self.block_manager.free(req)

    # -- steps ---------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def start_step(self) -> float | None:
        """Schedule one step; its duration in seconds, or None when nothing can run."""
        sched = self.scheduler.schedule()
        if not sched.requests:
            return None
        prefill_tokens = attention = batch = context = 0
        for req in sched.requests:
            n = sched.num_scheduled_tokens[req.request_id]
            if req.num_computed_tokens >= req.num_prompt_tokens:
                batch += 1  # a decode: the prompt is in the cache
                context += req.num_tokens
            else:  # a prompt chunk, attending to what is computed before it and itself
                prefill_tokens += n
                attention += n * (req.num_computed_tokens + n)
        self._step, self.busy, self.scheduled = sched, True, list(sched.requests)
        return self.cost.seconds(prefill_tokens, attention, batch, context)

    def finish_step(self) -> StepResult:
        sched, self._step, self.busy, self.scheduled = self._step, None, False, []
        assert sched is not None, "finish_step without start_step"
        out = StepResult()
        for req in sched.requests:
            req.num_computed_tokens += sched.num_scheduled_tokens[req.request_id]
            self.block_manager.cache_computed_blocks(req)
            if req.num_computed_tokens < req.num_tokens:
                continue  # a chunk of a longer prompt: no token yet
            req.token_ids.append(SIM_TOKEN)
            out.tokens.append(req)
            if req.num_output_tokens >= self.max_tokens[req.request_id]:
                self.scheduler.finish(req, RequestStatus.FINISHED_LENGTH)
                out.finished.append(req)
            elif self.role == "prefill":
                self.scheduler.finish(req, RequestStatus.FINISHED_PREFILLED, keep_blocks=True)
                out.finished.append(req)
        for req in out.finished:
            self.max_tokens.pop(req.request_id, None)
        return out
