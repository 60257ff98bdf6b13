"""Tensor-parallel building blocks: linear layers and embeddings that hold this rank's shard.

With tp_size == 1 each layer is an ordinary linear/embedding; with tp_size > 1 the same code
holds a slice and communicates over the torch.distributed group. Each parameter carries a
`weight_loader(param, tensor_slice, shard_id=None)` (`set_weight_loader`, `weight_loader_of`)
that copies the rank's part of a full checkpoint tensor, reading only that part
(`tensor_slice` is a safetensors slice or a tensor).

Splits follow Megatron/vLLM: column-parallel QKV and gate/up (output dim split), row-parallel
O and down (input dim split, then all-reduce), vocab-parallel embedding and LM head. Attention
heads are split along KV-head groups (`kv_head_shard`): a rank owns a contiguous run of KV
heads and the query heads that read them. When TP exceeds the KV head count, KV heads are
replicated: rank r holds KV head r // (tp_size // num_kv_heads). When the KV head count is not
a multiple of TP (SmolLM2-135M: 3 KV heads, TP=2) the runs differ by one head between ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kv_layout.heads import kv_head_shard


@dataclass
class CommTimer:
    """Wall time spent inside collectives, by kind (benchmarks; off unless TPGroup.timer set).
    On CUDA, `sync` (torch.cuda.synchronize) runs before and after each collective so the
    time is the collective's, not queued compute."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    sync: Any = None

    def add(self, kind: str, seconds: float) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in a tensor-parallel group. `group` carries the model's collectives
    (gloo or NCCL); `control` (gloo, CPU) carries the per-step broadcast from rank 0, with a
    long timeout on followers, which wait there while rank 0 is idle."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup when size > 1
    control: Any = None  # gloo ProcessGroup for step broadcasts (engine/tp_engine.py)
    timer: CommTimer | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            with self.timed("all_reduce"):
                dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        with self.timed("all_gather"):
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Adds the block's wall time to `timer` under `kind` (no-op without a timer)."""
        timer = self.timer
        if timer is None:
            yield
            return
        if timer.sync is not None:
            timer.sync()
        start = time.perf_counter()
        yield
        if timer.sync is not None:
            timer.sync()
        timer.add(kind, time.perf_counter() - start)


def read_slice(src: Any, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows/cols [start, start+size) along dim 0 or 1 of a safetensors slice or a tensor."""
    if dim == 0:
        part = src[start : start + size]
    else:
        part = src[:, start : start + size]
    return part if isinstance(part, torch.Tensor) else torch.as_tensor(part)


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} != {tuple(param.shape)}")
    param.data.copy_(loaded)


# (param, full checkpoint tensor or safetensors slice, shard id or None) -> copies this rank's
# part into param.
WeightLoader = Callable[[torch.Tensor, Any, Any], None]
_LOADER_ATTR = "weight_loader"  # vLLM's name for it


def set_weight_loader(param: torch.Tensor, loader: WeightLoader) -> None:
    """Attach to `param` the loader that engine/loader.py calls for its checkpoint tensors."""
    setattr(param, _LOADER_ATTR, loader)


def weight_loader_of(param: torch.Tensor) -> WeightLoader:
    return getattr(param, _LOADER_ATTR)


def replicated_loader(param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
    full = src if isinstance(src, torch.Tensor) else src[:]
    _copy_checked(param, torch.as_tensor(full), "replicated weight")


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__()
        if out_features % tp.size:
            raise ValueError(f"output size {out_features} not divisible by tp_size {tp.size}")
        self.tp = tp
        self.out_per_rank = out_features // tp.size
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_per_rank), requires_grad=False)
            set_weight_loader(self.bias, self.weight_loader)

    def weight_loader(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        start = self.tp.rank * self.out_per_rank
        _copy_checked(param, read_slice(src, 0, start, self.out_per_rank), "column shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (gate and up) in one matmul; shard_id picks the part."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TPGroup):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def weight_loader(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        per_rank = self.out_sizes[shard_id] // self.tp.size
        offset = sum(self.out_sizes[:shard_id]) // self.tp.size
        part = read_slice(src, 0, self.tp.rank * per_rank, per_rank)
        _copy_checked(param.data.narrow(0, offset, per_rank), part, f"merged shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q/K/V projection over this rank's heads (`kv_head_shard`): its KV heads and the
    query heads that read them. KV heads are replicated across ranks when tp > num_kv_heads."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
        tp: TPGroup,
    ):
        self.kv_first, self.local_kv_heads = kv_head_shard(num_kv_heads, tp.size, tp.rank)
        if tp.size > num_kv_heads:
            if num_heads % tp.size:
                raise ValueError(f"num_heads {num_heads} not divisible by tp_size {tp.size}")
            self.local_heads = num_heads // tp.size
            self.q_first = tp.rank * self.local_heads
        else:
            group = num_heads // num_kv_heads
            self.q_first, self.local_heads = self.kv_first * group, self.local_kv_heads * group
        self.head_dim = head_dim
        local_out = (self.local_heads + 2 * self.local_kv_heads) * head_dim
        # The fused weight is already this rank's size; the loader places each shard.
        super().__init__(hidden, local_out, bias, TPGroup(0, 1))
        self.tp = tp
        self.q_size = self.local_heads * head_dim
        self.kv_size = self.local_kv_heads * head_dim

    def weight_loader(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.q_first * self.head_dim
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, self.kv_first * self.head_dim
        _copy_checked(param.data.narrow(0, offset, size), read_slice(src, 0, start, size),
                      f"qkv shard {shard_id}")


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split; partial sums are all-reduced, bias added once.
    `shard` (start, size) overrides the even split (O projection over uneven head runs)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup,
                 shard: tuple[int, int] | None = None):
        super().__init__()
        if shard is None:
            if in_features % tp.size:
                raise ValueError(f"input size {in_features} not divisible by tp_size {tp.size}")
            shard = (tp.rank * (in_features // tp.size), in_features // tp.size)
        self.tp = tp
        self.in_start, self.in_per_rank = shard
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            set_weight_loader(self.bias, replicated_loader)

    def weight_loader(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        _copy_checked(param, read_slice(src, 1, self.in_start, self.in_per_rank), "row shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split across ranks; out-of-shard ids contribute zeros."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = (vocab_size + tp.size - 1) // tp.size
        self.start = tp.rank * self.per_rank
        self.local_vocab = max(0, min(vocab_size - self.start, self.per_rank))
        # Padded to per_rank rows so every rank's logits shard has the same width.
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: torch.Tensor, src: Any, shard_id: Any = None) -> None:
        part = read_slice(src, 0, self.start, self.local_vocab)
        _copy_checked(param.data[: self.local_vocab], part, "vocab shard")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        in_shard = (local >= 0) & (local < self.local_vocab)
        out = F.embedding(local.clamp(0, max(self.local_vocab - 1, 0)), self.weight)
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary: each rank computes its vocab shard, then all-gather."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
