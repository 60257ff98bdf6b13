"""Attention over the paged KV cache: the metadata contract and the torch reference backend.

Cache layout (shared by every backend, the block manager and KV transfer):
    k_cache, v_cache for one layer: [num_blocks, block_size, num_kv_heads, head_dim]
    A token at position p of a sequence lives in block block_table[p // block_size],
    offset p % block_size; its "slot" is block_id * block_size + offset.

A step's batch is flattened: prefill sequences first (tokens [0, num_prefill_tokens)), then
decode sequences (one token each). A "prefill" sequence is any sequence computing more than
one token this step; its new tokens attend causally to themselves and fully to the sequence's
already-cached prefix (prefix-cache hit or earlier chunks). Backends read every key, new ones
included, from the cache: the new K/V are stored first (`store_kv`), then attended to.

The torch reference here is the oracle for the Triton kernels: keep it simple and obviously
right rather than fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step batch description; built once per step by the model runner, read by backends."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    num_prefills: int
    num_prefill_tokens: int
    # Prefill sequences (the first num_prefills sequences of the batch).
    query_start_loc: torch.Tensor  # [num_prefills + 1] int32: cumulative new-token counts
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32: context length incl. new tokens
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    max_prefill_query_len: int
    max_prefill_seq_len: int
    # Decode sequences (one new token each), after the prefills.
    decode_seq_lens: torch.Tensor  # [num_decodes] int32: context length incl. the new token
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    max_decode_seq_len: int

    @property
    def num_decodes(self) -> int:
        return int(self.decode_seq_lens.shape[0])


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Write new tokens' K/V into their cache slots."""
    num_blocks, block_size = k_cache.shape[:2]
    num_slots = num_blocks * block_size
    k_cache.view(num_slots, *k_cache.shape[2:])[slot_mapping] = key.to(k_cache.dtype)
    v_cache.view(num_slots, *v_cache.shape[2:])[slot_mapping] = value.to(v_cache.dtype)


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first seq_len cached positions of one sequence: [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, kvh, d]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def _attend(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]
    k: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the last q_len positions of a seq_len context, in fp32."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qf = q.float().transpose(0, 1)  # [H, q_len, d]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, seq_len, d]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=q.device).unsqueeze(0)
    mask = k_pos <= q_pos  # [q_len, seq_len]
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def prefill_attention_ref(
    q: torch.Tensor,  # [num_prefill_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        k = gather_context(k_cache, block_tables[i], seq_len)
        v = gather_context(v_cache, block_tables[i], seq_len)
        out[s:e] = _attend(q[s:e], k, v, scale)
    return out


def decode_attention_ref(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Batched: gather each sequence's blocks into a padded [B, max_len] context, mask the pad.
    Query heads are grouped per KV head ([B, kv_heads, group, d]) so K/V are not repeated."""
    num_decodes, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].long()
    k = k_cache[table].reshape(num_decodes, -1, num_kv_heads, head_dim)[:, :max_len].float()
    v = v_cache[table].reshape(num_decodes, -1, num_kv_heads, head_dim)[:, :max_len].float()
    qg = q.float().view(num_decodes, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    pad = torch.arange(max_len, device=q.device)[None, :] >= seq_lens[:, None].to(q.device)
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgl,blhd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(num_decodes, num_heads, head_dim).to(q.dtype)


class AttentionBackend:
    """What the model calls once per layer: store the new K/V, then attend. Backends supply
    the three steps; the split of the batch into prefills and decodes lives here, once."""

    name = "base"

    def store(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        raise NotImplementedError

    def prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                out: torch.Tensor) -> None:
        raise NotImplementedError

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               out: torch.Tensor) -> None:
        raise NotImplementedError

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self.store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        n = meta.num_prefill_tokens
        if meta.num_prefills:
            self.prefill(q[:n], k_cache, v_cache, meta, scale, out[:n])
        if meta.num_decodes:
            self.decode(q[n:], k_cache, v_cache, meta, scale, out[n:])
        return out


class TorchAttentionBackend(AttentionBackend):
    """The reference backend."""

    name = "torch"

    def store(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k_cache, v_cache, meta, scale, out) -> None:
        out.copy_(prefill_attention_ref(q, k_cache, v_cache, meta.query_start_loc,
                                        meta.prefill_seq_lens, meta.prefill_block_tables, scale))

    def decode(self, q, k_cache, v_cache, meta, scale, out) -> None:
        out.copy_(decode_attention_ref(q, k_cache, v_cache, meta.decode_seq_lens,
                                       meta.decode_block_tables, scale))
