"""Chained content hashes of full KV blocks, shared by the engine and the router.

hash(block i) covers the tokens of blocks 0..i: it mixes the parent block's hash with this
block's token ids, so equal hashes mean equal prefixes (up to a 64-bit collision, which the
block manager rules out by also comparing tokens). Deterministic across processes and
machines (blake2b, not Python's salted hash()), so a router and a worker agree.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    h = hashlib.blake2b(parent_hash.to_bytes(8, "little"), digest_size=8)
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def chain_hashes(
    token_ids: Sequence[int], block_size: int, known: Sequence[int] = ()
) -> list[int]:
    """Hashes of every full block of token_ids; `known` is a prefix already computed."""
    hashes = list(known)
    parent = hashes[-1] if hashes else ROOT_HASH
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
