"""`pdserve profile`: measure the engine on this hardware and fit its timing models.

A short sweep of the real engine (`engine.engine.LLMEngine`, colocated mode, greedy, EOS
ignored) times whole engine steps (schedule, forward, sampling: what serving pays):

- prefill: one request of `u` uncached tokens after a cached prefix of `c` tokens (the prefix
  is computed first by another request, so the hit comes from the real prefix cache);
- decode: `B` sequences of the same prompt (one prefill, the rest hit the cache, so setting
  up a large batch costs one prompt) decoding together, one point per step;
- mixed: a fresh prompt of `u` tokens scheduled in the same step as those `B` decodes;
- KV transfer: `n` blocks of the engine's pool sent by each available transport's real
  sender to its real receiver (a second pool in this process), connection already open;
- the KV pool size in blocks for the configured memory.

Each prefill, mixed and transfer point is the fastest of `repeats` measurements: on a shared
machine other load only adds time, so the minimum is the estimate of what the hardware does
(decode points are single steps at growing contexts). Each family is fitted by
`planner.fit.fit_linear` on the features of router/timing_profile.py and written as a
`Profile` (source "sweep") with its measured points. `SweepGrid` sizes the sweep: the default
computes about 7,000 prompt tokens in about 80 engine steps (the default model spends ~0.27
GFLOP a token, so on a 2-core CPU that is minutes, not hours); the profile's `notes` record
how long it took.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import kv_transfer
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.model_runner import kv_block_bytes
from kv_transfer import KVControl, KVPool, LocalHub
from pdserve_api.errors import ConfigError
from pdserve_api.sampling import SamplingParams
from planner.fit import fit_linear
from router.timing_profile import Profile

log = logging.getLogger(__name__)

PREFILL_FEATURES = ("1", "uncached_tokens", "uncached_x_context")
DECODE_FEATURES = ("1", "batch_size", "context_tokens")
MIXED_FEATURES = PREFILL_FEATURES + DECODE_FEATURES[1:]
TRANSFER_FEATURES = ("1", "bytes")

Point = dict[str, float]


@dataclass(frozen=True)
class SweepGrid:
    """What the sweep measures. Cached prefixes are rounded down to whole blocks."""

    prefill_tokens: tuple[int, ...] = (32, 128, 384)
    cached_tokens: tuple[int, ...] = (0, 256)
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    contexts: tuple[int, ...] = (128, 384)  # per decoding sequence
    mixed_chunks: tuple[int, ...] = (32, 128)
    decode_steps: int = 3  # timed decode steps per (batch, context)
    repeats: int = 2  # measurements per prefill / mixed / transfer point (the fastest kept)
    transfer_blocks: tuple[int, ...] = (1, 8, 32, 128)
    transports: tuple[str, ...] | None = None  # None: every available one

    def __post_init__(self) -> None:
        sizes = (self.prefill_tokens, self.batch_sizes, self.contexts, self.mixed_chunks,
                 self.transfer_blocks)
        if not all(sizes) or min(min(s) for s in sizes) < 1 or min(self.cached_tokens) < 0:
            raise ConfigError(f"sweep grid sizes must be non-empty and positive: {self}")
        if self.decode_steps < 1 or self.repeats < 1:
            raise ConfigError("decode_steps and repeats must be >= 1")

    def longest_sequence(self) -> int:
        return max(max(self.prefill_tokens) + max(self.cached_tokens),
                   max(self.contexts) + self.decode_steps + len(self.mixed_chunks)
                   * self.repeats + 2)


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


class _Sweep:
    """The engine under measurement and fresh (never cached) prompt tokens."""

    def __init__(self, engine: LLMEngine, grid: SweepGrid, seed: int):
        self.engine, self.grid = engine, grid
        self.bs = engine.config.block_size
        self.sync = _sync(engine.config.device)
        self.rng = random.Random(seed)
        # Token 0..2 are often BOS/EOS/pad; EOS is ignored anyway, but keep prompts plain.
        self.vocab = range(3, engine.model_config.vocab_size)

    def tokens(self, n: int) -> list[int]:
        return [self.rng.choice(self.vocab) for _ in range(n)]

    def timed_step(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        self.engine.step()
        self.sync()
        return time.perf_counter() - t0

    def add(self, prompt: list[int], max_tokens: int) -> str:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return self.engine.add_request(prompt, sp)

    def prefill(self) -> list[Point]:
        points = []
        for cached in self.grid.cached_tokens:
            cached -= cached % self.bs
            for u in self.grid.prefill_tokens:
                ys = []
                for _ in range(self.grid.repeats):
                    self.engine.block_manager.reset_prefix_cache()
                    prefix = self.tokens(cached)
                    if cached:  # compute the prefix once, so the real cache holds it
                        self.engine.generate([prefix + self.tokens(1)],
                                             SamplingParams(max_tokens=1, temperature=0.0))
                    rid = self.add(prefix + self.tokens(u), 1)
                    req = self.engine.requests[rid]
                    ys.append(self.timed_step())
                    if req.num_cached_tokens != cached or req.num_computed_tokens != cached + u:
                        raise RuntimeError(f"prefill point ({u}, {cached}) was not one step "
                                           f"with that hit: {req}")
                points.append({"uncached_tokens": u, "cached_tokens": cached,
                               "uncached_x_context": u * (cached + u), "y": min(ys)})
        return points

    def decode_and_mixed(self) -> tuple[list[Point], list[Point]]:
        decode, mixed = [], []
        g = self.grid
        steps = g.decode_steps + len(g.mixed_chunks) * g.repeats + 2
        for batch in g.batch_sizes:
            for ctx in g.contexts:
                self.engine.block_manager.reset_prefix_cache()
                prompt = self.tokens(ctx)
                ids = [self.add(prompt, steps)]
                self.engine.step()  # the one real prefill; the rest hit its blocks
                ids += [self.add(prompt, steps) for _ in range(batch - 1)]
                self.engine.step()
                running = [self.engine.requests[i] for i in ids]
                for _ in range(g.decode_steps):
                    context = sum(r.num_tokens for r in running)
                    decode.append({"batch_size": batch, "context_tokens": context,
                                   "y": self.timed_step()})
                for u in g.mixed_chunks:
                    tries = []  # (seconds, context tokens): decodes grow a token a step
                    for _ in range(g.repeats):
                        context = sum(r.num_tokens for r in running)
                        rid = self.add(self.tokens(u), 1)
                        tries.append((self.timed_step(), context))
                        if rid in self.engine.requests:
                            raise RuntimeError(f"mixed point ({batch}, {ctx}, {u}): the chunk "
                                               "did not ride with the decodes in one step")
                    y, context = min(tries)
                    mixed.append({"uncached_tokens": u, "uncached_x_context": u * u,
                                  "batch_size": batch, "context_tokens": context, "y": y})
                for i in ids:
                    self.engine.abort(i)
                self.engine.step()  # drains the abort outputs
        return decode, mixed

    def transfer(self) -> dict[str, list[Point]]:
        src = KVPool.from_engine(self.engine)
        most = min(max(self.grid.transfer_blocks), src.num_blocks)
        shape = (src.k.shape[0], most, *src.k.shape[2:])
        dst = KVPool(torch.empty(shape, dtype=src.k.dtype, device=src.k.device),
                     torch.empty(shape, dtype=src.k.dtype, device=src.k.device), src.layout)
        block_bytes = src.k[:, 0].numel() * src.k.element_size() * 2
        kinds = self.grid.transports or tuple(kv_transfer.available_transports())
        out: dict[str, list[Point]] = {}
        for kind in kinds:
            hub = LocalHub()
            rx = kv_transfer.make_receiver(kind, dst, hub=hub)
            tx = kv_transfer.make_sender(kind, src, hub=hub)
            try:
                points = []
                for n in sorted({min(b, most) for b in self.grid.transfer_blocks}):
                    ids, ys = list(range(n)), []
                    for r in range(self.grid.repeats + 1):  # the first opens the connection
                        rid = f"profile-{kind}-{n}-{r}"
                        pending = rx.expect(rid, ids, lease_s=60)
                        t0 = time.perf_counter()
                        tx.send(rx.address, KVControl(rid, n * self.bs), ids, ids, 60)
                        result = pending.wait(60)
                        y = time.perf_counter() - t0
                        if result is None or not result.ok:
                            raise RuntimeError(f"{kind} transfer of {n} blocks failed: {result}")
                        if r:
                            ys.append(y)
                    points.append({"bytes": n * block_bytes, "y": min(ys)})
                out[kind] = points
            finally:
                tx.close()
                rx.close()
        return out


def run_sweep(config: EngineConfig, grid: SweepGrid | None = None, *, seed: int = 0,
              progress: Callable[[str], None] = log.info) -> Profile:
    """Measure `config`'s engine on this machine and fit the profile (see module doc)."""
    grid = grid or SweepGrid()
    need = grid.longest_sequence() + 1
    budget = max(config.max_num_batched_tokens, max(grid.prefill_tokens),
                 max(grid.batch_sizes) + max(grid.mixed_chunks))
    # Every point is one step, and a batch plus a chunk fit together.
    config = dataclasses.replace(config, max_num_batched_tokens=budget,
                                 max_num_seqs=max(config.max_num_seqs,
                                                  max(grid.batch_sizes) + 1))
    started = time.perf_counter()
    engine = LLMEngine(config)
    try:
        if engine.max_model_len < need:
            raise ConfigError(f"the sweep needs sequences of {need} tokens; this engine allows "
                              f"{engine.max_model_len} (shrink the grid)")
        engine.warmup()
        sweep = _Sweep(engine, grid, seed)
        progress("profile: prefill")
        prefill = sweep.prefill()
        progress("profile: decode and mixed steps")
        decode, mixed = sweep.decode_and_mixed()
        progress("profile: KV transfer")
        transfer = sweep.transfer()
        engine.check_integrity()
        block_bytes = kv_block_bytes(engine.model_config, config.block_size,
                                     config.torch_dtype)
        points = {"prefill": prefill, "decode": decode, "mixed": mixed,
                  **{f"transfer:{k}": v for k, v in transfer.items()}}
        profile = Profile(
            model=str(config.model or engine.model_path.name), source="sweep",
            block_size=config.block_size, kv_pool_blocks=engine.runner.num_blocks,
            kv_bytes_per_token=block_bytes // config.block_size,
            prefill=fit_linear(PREFILL_FEATURES, prefill),
            decode=fit_linear(DECODE_FEATURES, decode),
            mixed=fit_linear(MIXED_FEATURES, mixed),
            transfer={k: fit_linear(TRANSFER_FEATURES, v) for k, v in transfer.items()},
            points=points, hardware=_hardware(config),
            notes=f"sweep of {sum(len(v) for v in points.values())} points in "
                  f"{time.perf_counter() - started:.0f} s; {config.dtype}, "
                  f"{torch.get_num_threads()} torch threads")
    finally:
        engine.close()
    return profile


def _hardware(config: EngineConfig) -> str:
    if config.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(config.device))
    return f"{platform.machine()} {platform.processor() or 'cpu'}, " \
           f"{torch.get_num_threads()} threads"
