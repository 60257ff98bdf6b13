"""How a model's KV heads are split over tensor-parallel ranks.

The one piece of layout math both the engine (which shards attention by it) and kv_transfer
(which routes head slices between workers of different TP sizes) need, kept below both so
that neither imports the other.
"""

from __future__ import annotations


def kv_head_shard(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """(first, count): the KV heads `rank` holds. tp_size <= num_kv_heads: contiguous runs,
    the first num_kv_heads % tp_size ranks one head longer; tp_size > num_kv_heads: one head,
    each replicated on tp_size // num_kv_heads consecutive ranks. This is the ownership map KV
    transfer needs to route heads between different TP sizes."""
    if tp_size > num_kv_heads:
        if tp_size % num_kv_heads:
            raise ValueError(f"tp_size {tp_size} > kv heads {num_kv_heads} must be a multiple")
        return rank // (tp_size // num_kv_heads), 1
    base, extra = divmod(num_kv_heads, tp_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def max_local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """The most KV heads any rank holds: every rank sizes its KV pool by this, so all ranks
    have the same number of blocks (block ids are shared, chosen by rank 0)."""
    return max(kv_head_shard(num_kv_heads, tp_size, r)[1] for r in range(tp_size))
