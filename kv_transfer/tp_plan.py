"""Which prefill rank sends which KV heads to which decode rank when the two TP sizes differ.

Every TP rank of a worker has its own KV pool, [layers, blocks, block_size, slots, head_dim]
with slots = `max_local_kv_heads(num_kv_heads, tp)`; a rank that owns fewer heads than slots
uses slots [0, owned). Rank r owns the model's KV heads `kv_head_shard(num_kv_heads, tp, r)`
(kv_layout/heads.py), replicated on several ranks when tp > num_kv_heads. Block ids are the
same on every rank of a worker, so a route is only about heads:

    routes = plan_head_routes(num_kv_heads, prefill_tp, decode_tp)
    # decode rank d: rx[d].expect(rid, dst_ids, num_senders=senders_per_dst(routes, tp)[d])
    # prefill rank s: for r in routes_by_src(routes, prefill_tp)[s]:
    #     tx[s].send(address_of[r.dst_rank], control, src_ids, dst_ids, heads=r.heads)

Each route is one transfer session (rank to rank, no copy through rank 0) moving a contiguous
run of heads. Every destination rank's owned heads are covered exactly once.

Replicated source heads (prefill tp > num_kv_heads): head h is held by k = tp // num_kv_heads
consecutive source ranks. The destination ranks that need h, in rank order, take those
holders round-robin: the j-th of them reads from holder j % k. So each holder sends
ceil/floor(consumers / k) copies of h, and equal replicated TP sizes map rank r to rank r.
"""

from __future__ import annotations

from dataclasses import dataclass

from kv_layout.heads import kv_head_shard
from kv_transfer.header import HeadSlice

__all__ = ["HeadRoute", "HeadSlice", "plan_head_routes", "routes_by_src", "senders_per_dst"]


@dataclass(frozen=True)
class HeadRoute:
    """One session: `count` heads from `src_rank`'s pool slots [src_head, ...) into
    `dst_rank`'s pool slots [dst_head, ...)."""

    src_rank: int
    dst_rank: int
    src_head: int  # first head, in the source rank's local pool
    dst_head: int  # first head, in the destination rank's local pool
    count: int

    @property
    def heads(self) -> HeadSlice:
        """What the sender passes as `heads=` to open/send."""
        return HeadSlice(self.src_head, self.dst_head, self.count)


def _holders(num_kv_heads: int, tp: int) -> dict[int, list[int]]:
    """Model KV head -> the ranks holding it, in rank order."""
    out: dict[int, list[int]] = {}
    for rank in range(tp):
        first, count = kv_head_shard(num_kv_heads, tp, rank)
        for h in range(first, first + count):
            out.setdefault(h, []).append(rank)
    return out


def plan_head_routes(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadRoute]:
    """Routes covering every destination rank's heads once, ordered by (dst_rank, dst_head).
    Raises ValueError where kv_head_shard does (a TP size above the head count that is not a
    multiple of it)."""
    if num_kv_heads < 1 or src_tp < 1 or dst_tp < 1:
        raise ValueError(f"need num_kv_heads, src_tp, dst_tp >= 1, got {num_kv_heads}, "
                         f"{src_tp}, {dst_tp}")
    holders = _holders(num_kv_heads, src_tp)
    src_first = [kv_head_shard(num_kv_heads, src_tp, r)[0] for r in range(src_tp)]
    consumers: dict[int, int] = {}  # head -> destination ranks served so far
    routes: list[HeadRoute] = []
    for dst in range(dst_tp):
        first, count = kv_head_shard(num_kv_heads, dst_tp, dst)
        run: HeadRoute | None = None
        for h in range(first, first + count):
            j = consumers.get(h, 0)
            consumers[h] = j + 1
            src = holders[h][j % len(holders[h])]
            src_head, dst_head = h - src_first[src], h - first
            if (run is not None and run.src_rank == src
                    and run.src_head + run.count == src_head):
                run = HeadRoute(src, dst, run.src_head, run.dst_head, run.count + 1)
                continue
            if run is not None:
                routes.append(run)
            run = HeadRoute(src, dst, src_head, dst_head, 1)
        assert run is not None  # every rank owns at least one head
        routes.append(run)
    return routes


def senders_per_dst(routes: list[HeadRoute], dst_tp: int) -> list[int]:
    """How many sessions each destination rank receives: its `expect(num_senders=...)`."""
    counts = [0] * dst_tp
    for r in routes:
        counts[r.dst_rank] += 1
    return counts


def routes_by_src(routes: list[HeadRoute], src_tp: int) -> list[list[HeadRoute]]:
    """Each source rank's outgoing routes, in plan order."""
    out: list[list[HeadRoute]] = [[] for _ in range(src_tp)]
    for r in routes:
        out[r.src_rank].append(r)
    return out
