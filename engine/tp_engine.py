"""Tensor-parallel engine: rank 0 schedules and samples, every rank runs the forward pass.

Rank 0 is an ordinary `LLMEngine(config, tp)`: with tp.size > 1 its runner is a
TPDriverRunner, which broadcasts each step's StepInputs before running it. Every other rank
runs `TPFollower(config, tp).serve_forever()`, which receives StepInputs and runs the same
`ModelRunner.run` until rank 0 broadcasts a stop (`LLMEngine.close()`). Block ids are chosen
by rank 0's block manager and are the same on every rank; each rank's KV pool holds its own
KV heads (`runner.model.kv_head_shard`).

    tp = init_tp_group(rank, size, "tcp://127.0.0.1:PORT")   # every rank, same address
    config = EngineConfig(..., tp_rank=rank, tp_size=size)
    rank 0:  engine = LLMEngine(config, tp); ... engine.step() ...; engine.close()
    rank r:  TPFollower(config, tp).serve_forever()

Per step, rank 0 sends a header (HEADER_LEN int64 on CPU) over `tp.control` (gloo), then,
if the header says STEP, the payload (int64 on the runner's device) over `tp.group` (gloo or
NCCL). Followers wait for the header with a long timeout (rank 0 may be idle for hours); every
other collective has the short `timeout_s`.

Start-up: the runners' constructors end with a handshake, so a rank that fails to load its
shards (or has a different KV pool size) makes every rank raise TPError naming it.

Failure: an error or timeout inside a step (a peer died, raised or hung) raises TPError on the
rank that sees it, and that rank tears the process group down so that its peers fail at once
instead of waiting out their timeouts. A TP group that failed is not reused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import EngineConfig, ModelConfig, check_tp_config, resolve_max_model_len
from engine.default_model import resolve_model
from engine.model_runner import (
    CMD_STEP,
    CMD_STOP,
    H_CMD,
    H_PAYLOAD,
    HEADER_LEN,
    ModelRunner,
    StepInputs,
)
from engine.native_heap import TRIM_INTERVAL_S, HeapTrimmer
from engine.parallel import CommTimer, TPGroup

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 30 * 24 * 3600.0
# Ranks start at different times (a slow import, an actor scheduled late): joining waits this
# long for the others, whatever the (shorter) timeout of the collectives.
RENDEZVOUS_TIMEOUT_S = 300.0


class TPError(RuntimeError):
    """A tensor-parallel rank failed, died or timed out; the group is unusable."""


def init_tp_group(rank: int, size: int, init_method: str, backend: str = "gloo",
                  timeout_s: float = 60.0, idle_timeout_s: float = IDLE_TIMEOUT_S,
                  timer: CommTimer | None = None,
                  rendezvous_timeout_s: float = RENDEZVOUS_TIMEOUT_S) -> TPGroup:
    """Join this process to a TP group (one per process: torch.distributed's default group).
    `init_method` is a rendezvous address from config, e.g. "tcp://10.0.0.5:29511", the same
    on every rank. `backend` carries the model's collectives ("gloo" on CPU, "nccl" on GPU);
    step broadcasts always go over an extra gloo group. `timeout_s` bounds every collective
    except a follower's wait for the next step (`idle_timeout_s`); `rendezvous_timeout_s`
    bounds the wait for all ranks to join. With NCCL, select this rank's GPU
    (torch.cuda.set_device) first and give EngineConfig the same device."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r} not one of 'gloo', 'nccl'")
    # The default group only joins the ranks; the model's collectives get their own group
    # with the short timeout (the default group's timeout is also the rendezvous's).
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=timedelta(seconds=max(timeout_s, rendezvous_timeout_s)))
    group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    # Each rank applies its own timeout to its side: rank 0 sends with the short one.
    control_timeout = timeout_s if rank == 0 else idle_timeout_s
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout))
    return TPGroup(rank, size, group, control, timer)


def destroy_tp_group() -> None:
    """Leave the group (idempotent); after a failure this makes the peers' collectives fail."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - tearing down after a failure: best effort
            log.warning("destroying the TP process group: %s", e)


# ---- the per-step broadcast ----------------------------------------------------------------


def broadcast_step(tp: TPGroup, inputs: StepInputs) -> None:
    """Rank 0: send one step's inputs to the other ranks."""
    with tp.timed("broadcast"):
        dist.broadcast(torch.tensor(inputs.header, dtype=torch.int64), 0, group=tp.control)
        dist.broadcast(inputs.payload, 0, group=tp.group)


def broadcast_stop(tp: TPGroup) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[H_CMD] = CMD_STOP
    dist.broadcast(header, 0, group=tp.control)


def receive_step(tp: TPGroup, device: torch.device) -> StepInputs | None:
    """Ranks 1..: the next step's inputs from rank 0, or None when rank 0 says stop."""
    header_t = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header_t, 0, group=tp.control)
    header = header_t.tolist()
    if header[H_CMD] == CMD_STOP:
        return None
    if header[H_CMD] != CMD_STEP:
        raise TPError(f"rank {tp.rank}: unknown command {header[H_CMD]} from rank 0")
    with tp.timed("broadcast"):
        payload = torch.empty(header[H_PAYLOAD], dtype=torch.int64, device=device)
        dist.broadcast(payload, 0, group=tp.group)
    return StepInputs.unpack(header, payload)


def _handshake(tp: TPGroup, device: torch.device, num_blocks: int,
               error: BaseException | None) -> None:
    """Every rank reports (loaded?, KV pool blocks); all raise TPError if any rank failed or
    the pools differ. Over the model's group, so a rank that never arrives is a timeout."""
    table = torch.zeros(tp.size, 2, dtype=torch.int64, device=device)
    table[tp.rank, 0] = 1 if error is None else 2
    table[tp.rank, 1] = num_blocks
    try:
        dist.all_reduce(table, group=tp.group)
    except RuntimeError as e:
        destroy_tp_group()
        raise TPError(f"rank {tp.rank}: TP start-up handshake failed (a rank died or did not "
                      f"start within the timeout): {e}") from e
    table = table.cpu()
    failed = [r for r in range(tp.size) if table[r, 0] != 1]
    blocks = table[:, 1].tolist()
    if failed or len(set(blocks)) > 1:
        # Every rank reached the same verdict; leaving the group now, rather than at
        # interpreter exit, spares gloo's "terminate called without an active exception".
        destroy_tp_group()
    if failed:
        raise TPError(f"rank {tp.rank}: TP rank(s) {failed} failed to start"
                      + (f": {error}" if error is not None else "")) from error
    if len(set(blocks)) > 1:
        raise TPError(f"TP ranks disagree on the KV pool size (blocks per rank: {blocks}); "
                      "give every rank the same EngineConfig")


def _failed(tp: TPGroup, what: str, e: BaseException) -> TPError:
    destroy_tp_group()
    return TPError(f"tensor-parallel rank {tp.rank} of {tp.size}: {what} failed, the TP group "
                   f"is torn down (a rank died, raised or timed out): {e}")


# ---- rank 0 ---------------------------------------------------------------------------------


class TPDriverRunner(ModelRunner):
    """Rank 0's runner: broadcasts each step's inputs, then runs its own shard."""

    def __init__(self, model_cfg: ModelConfig, config: EngineConfig, model_path,
                 max_model_len: int, tp: TPGroup):
        try:
            check_tp_config(config, tp)
            super().__init__(model_cfg, config, model_path, max_model_len, tp)
        except Exception as e:
            _handshake(tp, torch.device(config.device), 0, e)
            raise
        _handshake(tp, self.device, self.num_blocks, None)
        self.error: TPError | None = None
        self.closed = False

    def run(self, inputs: StepInputs, on_layer: Callable[[int], None] | None = None
            ) -> torch.Tensor:
        if self.error is not None:
            raise TPError(f"the TP group failed earlier: {self.error}")
        if self.closed:
            raise TPError("the TP engine is closed (its followers have stopped)")
        try:
            broadcast_step(self.tp, inputs)
            return super().run(inputs, on_layer)
        except Exception as e:
            self.error = _failed(self.tp, "a step", e)
            raise self.error from e

    def close(self) -> None:
        if self.closed or self.error is not None:
            return
        self.closed = True
        try:
            broadcast_stop(self.tp)
        except RuntimeError as e:
            self.error = _failed(self.tp, "stopping the followers", e)
            raise self.error from e


# ---- ranks 1.. ------------------------------------------------------------------------------


class TPFollower:
    """A rank > 0: holds its shard of the model and its KV heads, runs what rank 0 sends.

    `kv_layer_hook(inputs)` mirrors LLMEngine.kv_layer_hook: called with each step's inputs
    before the forward pass, it may return `on_layer(layer)`, called once this rank has
    written that layer's KV (its own heads). `inputs.request_ids` and
    `inputs.sampled_request_ids` (requests whose prompt completes this step) say what the
    step computes; `runner.k_cache`/`v_cache` are this rank's pool."""

    def __init__(self, config: EngineConfig, tp: TPGroup,
                 kv_layer_hook: Callable[[StepInputs], Callable[[int], None] | None]
                 | None = None):
        if tp.rank == 0 or tp.size < 2:
            raise ValueError(f"TPFollower is for ranks 1..size-1; got rank {tp.rank} of "
                             f"{tp.size} (rank 0 runs LLMEngine)")
        self.config, self.tp = config, tp
        self.kv_layer_hook = kv_layer_hook
        self.steps = 0
        self.heap_trimmer = HeapTrimmer(TRIM_INTERVAL_S)
        try:
            check_tp_config(config, tp)
            torch.manual_seed(config.seed)
            path = resolve_model(config.model)
            model_config = ModelConfig.from_dir(path)
            self.runner = ModelRunner(model_config, config, path,
                                      resolve_max_model_len(model_config, config), tp)
        except Exception as e:
            _handshake(tp, torch.device(config.device), 0, e)
            raise
        _handshake(tp, self.runner.device, self.runner.num_blocks, None)

    def serve_forever(self) -> int:
        """Run steps until rank 0 stops; returns the number of steps run. Raises TPError
        (after tearing the group down) if a step fails here or on a peer."""
        while True:
            try:
                inputs = receive_step(self.tp, self.runner.device)
                if inputs is None:
                    return self.steps
                on_layer = self.kv_layer_hook(inputs) if self.kv_layer_hook else None
                self.runner.run(inputs, on_layer)
                self.heap_trimmer.worked()
                self.heap_trimmer.maybe_trim()
            except Exception as e:
                log.error("TP rank %d: step %d failed: %s", self.tp.rank, self.steps, e)
                raise _failed(self.tp, f"step {self.steps}", e) from e
            self.steps += 1
