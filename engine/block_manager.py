"""Paged KV block manager: free list, reference counts, prefix caching, LRU eviction, CoW.

Contract (vLLM v1 / nano-vllm):
- Queries never change state: `find_cached_prefix` and `can_allocate` only look.
- `allocate_slots` either covers the request's next tokens and returns the copy-on-write
  pairs the runner must apply, or returns None and changes nothing (the caller waits or
  preempts).
- Full, computed blocks get a chained content hash (engine/hashing.py); a block whose last
  reference is dropped keeps its hash on the free list and can be revived by a later request
  with the same prefix, until it is evicted (least recently freed first) for new content.
- A prefix hit is confirmed by comparing tokens, and always leaves at least one token to
  compute, so the request has logits to sample from.
- Events (`BlockStored`, `BlockRemoved`) report hash changes to the prefix index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.hashing import ROOT_HASH, chain_hashes
from engine.request import Request


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_hash: int


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the block's tokens, kept to confirm hash hits


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced blocks in eviction order (oldest first). Cached ones keep their hash.
        self.free_list: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.events: list[BlockStored | BlockRemoved] = []

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_list)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_list) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Block ids holding the longest cached run of req's full blocks. Does not change
        state. See `cached_tokens` for how many tokens they let the request skip."""
        if not self.enable_prefix_caching:
            return []
        tokens = req.token_ids
        max_blocks = len(tokens) // self.block_size
        hashes = chain_hashes(tokens[: max_blocks * self.block_size], self.block_size)
        hit: list[int] = []
        for i, h in enumerate(hashes):
            block_id = self.cached.get(h)
            start = i * self.block_size
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                tokens[start : start + self.block_size]
            ):
                break
            hit.append(block_id)
        return hit

    def cached_tokens(self, req: Request, cached: Sequence[int]) -> int:
        """Tokens a prefix hit skips: all of its blocks, but always one token is left to
        compute so the request has logits to sample from. When that token falls inside a
        shared block, `allocate_slots` copies the block first (copy-on-write)."""
        return min(len(cached) * self.block_size, req.num_tokens - 1)

    def can_allocate(self, num_blocks: int, cached: Sequence[int] = ()) -> bool:
        # Cached blocks sitting on the free list are taken from it, not in addition to it.
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        return num_blocks + revived <= len(self.free_list)

    # ---- state changes -------------------------------------------------------------------

    def allocate_slots(
        self, req: Request, num_new_tokens: int, cached: Sequence[int] = ()
    ) -> list[tuple[int, int]] | None:
        """Make req.block_table cover its computed tokens + cached + num_new_tokens.

        `cached` (from find_cached_prefix) is only given on first scheduling, when the request
        has no blocks. Returns copy-on-write (src, dst) pairs, or None (no state change) when
        the free list cannot cover it.
        """
        assert not cached or not req.block_table
        num_computed = req.num_computed_tokens + self.cached_tokens(req, cached)
        end = num_computed + num_new_tokens
        have = len(req.block_table) + len(cached)
        new_blocks = max(0, self.blocks_needed(end) - have)
        write_first = num_computed // self.block_size  # first block this step writes into
        table = list(req.block_table) + list(cached)
        cow = [i for i in range(write_first, min(have, self.blocks_needed(end)))
               if self._shared(table[i], i in range(len(req.block_table), have))]
        if not self.can_allocate(new_blocks + len(cow), cached):
            return None
        for block_id in cached:
            self._take(block_id)
        req.block_table.extend(cached)
        if cached:
            req.block_hashes = [self._hash_of(b) for b in cached]
            req.num_computed_tokens = num_computed
            req.num_cached_tokens = num_computed
        pairs = []
        for i in cow:
            src = req.block_table[i]
            dst = self._pop_free()
            self._release(src)
            req.block_table[i] = dst
            pairs.append((src, dst))
            del req.block_hashes[i:]  # the copy is not registered until recomputed
        for _ in range(new_blocks):
            req.block_table.append(self._pop_free())
        return pairs

    def _shared(self, block_id: int, just_taken: bool) -> bool:
        # A block about to be written is shared if anyone else references it; a cached block
        # taken this call will get one more reference from us.
        return self.blocks[block_id].ref_count + (1 if just_taken else 0) > 1

    def cache_computed_blocks(self, req: Request) -> None:
        """Register hashes of req's full blocks that are now computed."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        if num_full <= len(req.block_hashes):
            return
        start = len(req.block_hashes)
        hashes = chain_hashes(req.token_ids[: num_full * self.block_size], self.block_size,
                              known=req.block_hashes)
        stored = []
        for i in range(start, num_full):
            block = self.blocks[req.block_table[i]]
            h = hashes[i]
            if block.block_hash is None and h not in self.cached:
                block.block_hash = h
                first = i * self.block_size
                block.token_ids = tuple(req.token_ids[first:first + self.block_size])
                self.cached[h] = block.block_id
                stored.append(h)
        req.block_hashes = hashes
        if stored:
            parent = hashes[start - 1] if start else ROOT_HASH
            self.events.append(BlockStored(tuple(stored), parent))

    def free(self, req: Request) -> None:
        """Drop req's references; tail blocks first so the LRU evicts them before the head."""
        for block_id in reversed(req.block_table):
            self._release(block_id)
        req.block_table = []
        req.block_hashes = []

    def drain_events(self) -> list[BlockStored | BlockRemoved]:
        events, self.events = self.events, []
        return events

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.free_list):
            self._evict(self.blocks[block_id])

    def check_integrity(self, live: Sequence[Request] = ()) -> None:
        """Reference counts equal live block-table references; free list = unreferenced."""
        expected = [0] * len(self.blocks)
        for req in live:
            for block_id in req.block_table:
                expected[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == expected[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} != {expected[block.block_id]}"
            )
            assert (block.ref_count == 0) == (block.block_id in self.free_list), (
                f"block {block.block_id}: free-list membership wrong (ref {block.ref_count})"
            )
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) == block.block_id
        assert len(self.cached) == sum(b.block_hash is not None for b in self.blocks)

    # ---- internals -----------------------------------------------------------------------

    def _hash_of(self, block_id: int) -> int:
        """The hash of a block a prefix lookup found: such a block has one by construction."""
        block_hash = self.blocks[block_id].block_hash
        assert block_hash is not None, f"cached block {block_id} has no hash"
        return block_hash

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_list[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_list.popitem(last=False)
        block = self.blocks[block_id]
        self._evict(block)
        block.ref_count = 1
        return block_id

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            self.events.append(BlockRemoved((block.block_hash,)))
            block.block_hash = None
            block.token_ids = ()

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released more than taken"
        if block.ref_count == 0:
            self.free_list[block_id] = None
