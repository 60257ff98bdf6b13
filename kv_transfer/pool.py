"""A worker's KV pool as transports see it: the engine's K and V tensors, their layout, and
byte views of contiguous runs of blocks.

Pool tensors are [num_layers, num_blocks, block_size, num_kv_heads, head_dim] (see
engine/model_runner.py); one (layer, block) region is contiguous, and so is a run of
consecutive block ids within one layer. Transports move runs, never gathered copies: `run()`
returns a uint8 view that aliases the pool memory, so a socket `recv_into` or a UCX receive
writes straight into the pool.

A head-sliced transfer (some of a region's heads: pools of different TP sizes) is strided in
memory, [block_size, heads, head_dim] out of [block_size, num_kv_heads, head_dim]. The side
whose slice is not the whole region packs it: `gather_heads` copies one layer's slice of
every block into a staging tensor [2 (K, V), blocks, block_size, heads, head_dim], and
`scatter_heads` copies one back. Packed, the bytes are in the same order as whole regions (K
of every block in list order, then V), so a side whose slice is the whole region still moves
it zero-copy while the other side stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_transfer.header import KVLayout


@dataclass(frozen=True)
class Run:
    """`count` consecutive blocks starting at `src` in the sending pool and at `dst` in the
    receiving pool (either may be -1 where only one side matters)."""

    src: int
    dst: int
    count: int


def runs(ids: Sequence[int]) -> list[Run]:
    """Maximal runs of consecutive ids (dst = -1): what one side reads or writes in one go."""
    out: list[Run] = []
    for i in ids:
        if out and out[-1].src + out[-1].count == i:
            last = out[-1]
            out[-1] = Run(last.src, -1, last.count + 1)
        else:
            out.append(Run(i, -1, 1))
    return out


def paired_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[Run]:
    """Maximal runs consecutive on both sides: the message boundaries of a transport whose
    messages must land whole in one destination buffer (UCX tags). Both peers compute the
    same list from the same id lists."""
    out: list[Run] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if out and out[-1].src + out[-1].count == s and out[-1].dst + out[-1].count == d:
            last = out[-1]
            out[-1] = Run(last.src, last.dst, last.count + 1)
        else:
            out.append(Run(s, d, 1))
    return out


class KVPool:
    """K and V pool tensors plus their layout. Holds views, never copies."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, layout: KVLayout):
        expected = (layout.num_layers, k.shape[1] if k.dim() == 5 else 0, layout.block_size,
                    layout.num_kv_heads, layout.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != expected or t.dtype != layout.dtype:
                raise ValueError(f"{name} pool {tuple(t.shape)} {t.dtype} does not match layout "
                                 f"{expected} {layout.dtype}")
            if not t.is_contiguous():
                raise ValueError(f"{name} pool must be contiguous: transports address it as "
                                 "(layer, block) regions")
        if k.device != v.device:
            raise ValueError(f"K on {k.device} but V on {v.device}")
        self.k, self.v, self.layout = k, v, layout
        rb = layout.region_bytes
        # uint8 views [layers, blocks, region_bytes] aliasing the pool memory.
        self.k_bytes = k.view(-1).view(torch.uint8).view(layout.num_layers, self.num_blocks, rb)
        self.v_bytes = v.view(-1).view(torch.uint8).view(layout.num_layers, self.num_blocks, rb)
        # numpy aliases for the buffer protocol (socket.recv_into, ucxx Array) on host pools.
        self._np = ((self.k_bytes.numpy(), self.v_bytes.numpy())
                    if k.device.type == "cpu" else None)

    @classmethod
    def from_engine(cls, engine, model_id: str | None = None) -> KVPool:
        """The pool of an `engine.engine.LLMEngine` (its runner's k_cache / v_cache). The model
        id defaults to the engine's configured model (name or path): pass a stable name where
        prefill and decode workers load the same checkpoint from different paths."""
        return cls.from_runner(engine.runner, engine.config, model_id)

    @classmethod
    def from_runner(cls, runner, config, model_id: str | None = None) -> KVPool:
        """The pool of an `engine.model_runner.ModelRunner` built from EngineConfig `config`
        (a TP follower rank has a runner but no LLMEngine)."""
        k = runner.k_cache
        layout = KVLayout(model_id or str(config.model), k.dtype, config.block_size,
                          k.shape[0], k.shape[3], k.shape[4], config.tp_rank, config.tp_size)
        return cls(runner.k_cache, runner.v_cache, layout)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.num_blocks]
        if bad:
            raise ValueError(f"{what} block ids {bad[:5]} outside the pool [0, {self.num_blocks})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{what} block ids repeat: {list(ids)[:16]}")

    def run_tensor(self, kv: int, layer: int, start: int, count: int) -> torch.Tensor:
        """uint8 tensor view of blocks [start, start+count) of K (kv=0) or V (kv=1) in one layer;
        on CUDA pools this is what UCX gets (it exposes __cuda_array_interface__)."""
        src = self.k_bytes if kv == 0 else self.v_bytes
        return src[layer, start : start + count].view(-1)

    def staging_shape(self, num_blocks: int, num_heads: int,
                      layers: int | None = None) -> tuple[int, ...]:
        """The packed staging shape for `num_heads` heads of `num_blocks` blocks:
        [2, blocks, block_size, heads, head_dim], with a leading layer dim if `layers`
        (buffers come from a StagingCache, staging.py)."""
        lay = self.layout
        shape = (2, num_blocks, lay.block_size, num_heads, lay.head_dim)
        return ((layers,) if layers else ()) + shape

    def gather_heads(self, layer: int, ids: Sequence[int], heads: range,
                     out: torch.Tensor) -> None:
        """out[kv, i] = head slots `heads` of block ids[i] of `layer` (K: kv=0, V: kv=1)."""
        i = 0
        for r in runs(ids):
            for kv, t in enumerate((self.k, self.v)):
                out[kv, i : i + r.count].copy_(
                    t[layer, r.src : r.src + r.count, :, heads.start : heads.stop])
            i += r.count

    def scatter_heads(self, layer: int, ids: Sequence[int], heads: range,
                      stage: torch.Tensor) -> None:
        """Head slots `heads` of block ids[i] of `layer` = stage[kv, i]; waits for the copy
        (on CUDA) so that nothing lands later."""
        i = 0
        for r in runs(ids):
            for kv, t in enumerate((self.k, self.v)):
                t[layer, r.src : r.src + r.count, :, heads.start : heads.stop].copy_(
                    stage[kv, i : i + r.count])
            i += r.count
        self.sync()

    def sync(self) -> None:
        """Wait for the copies this thread queued into or out of the pool (its current CUDA
        stream only, not the whole device; no-op on host pools)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def run(self, kv: int, layer: int, start: int, count: int):
        """Host buffer (numpy uint8, 1-D) aliasing a run: for sockets and host UCX transfers.
        Raises on device pools (callers stage through host memory there)."""
        if self._np is None:
            raise ValueError(f"pool on {self.device} has no host view; stage through host memory")
        return self._np[kv][layer, start : start + count].reshape(-1)
