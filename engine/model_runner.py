"""Owns the model and the KV pool; turns a SchedulerOutput into one forward pass.

The KV pool is two preallocated tensors, K and V, each
[num_layers, num_blocks, block_size, num_kv_heads, head_dim]: one (layer, block) region is
contiguous, which is what KV export/import and transports move.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata, get_attention_backend
from engine.config import EngineConfig, ModelConfig
from engine.loader import load_weights
from engine.model import LlamaModel
from engine.parallel import TPGroup
from engine.request import Request
from engine.scheduler import SchedulerOutput


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                   local_kv_heads: int | None = None) -> int:
    """Bytes of K and V for one block across all layers."""
    heads = local_kv_heads or cfg.num_kv_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, config: EngineConfig, model_path,
                 max_model_len: int, tp: TPGroup | None = None):
        self.cfg = model_cfg
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.backend = get_attention_backend(config.attention_backend)
        with torch.device(self.device):
            self.model = LlamaModel(model_cfg, self.backend, tp, max_positions=max_model_len)
        self.model.to(self.dtype)
        load_weights(self.model, model_path, self.dtype)
        self.model.eval()
        self.block_size = config.block_size
        heads = self.model.local_kv_heads
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_memory_bytes
            // kv_block_bytes(model_cfg, self.block_size, self.dtype, heads)
        )
        shape = (model_cfg.num_layers, num_blocks, self.block_size, heads, model_cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src = torch.tensor([s for s, _ in pairs], device=self.device)
            dst = torch.tensor([d for _, d in pairs], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, all_logits: bool = False,
                on_layer: Callable[[int], None] | None = None
                ) -> tuple[torch.Tensor, list[Request]]:
        """Run one forward pass. Returns logits for the requests that reached the end of
        their known tokens this step (those get a sampled token), and those requests.
        `all_logits` (tests) returns every token's logits instead, prefills first."""
        self.copy_blocks(sched.copy_pairs)
        n_of = sched.num_scheduled_tokens
        prefills = [r for r in sched.requests if n_of[r.request_id] > 1]
        decodes = [r for r in sched.requests if n_of[r.request_id] == 1]
        ordered = prefills + decodes
        input_ids, positions, slots, sample_rows, to_sample = [], [], [], [], []
        bs = self.block_size
        for req in ordered:
            start, n = req.num_computed_tokens, n_of[req.request_id]
            input_ids.extend(req.token_ids[start : start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if start + n == req.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                to_sample.append(req)
        meta = self._metadata(prefills, decodes, n_of, slots)
        dev = self.device
        hidden = self.model(
            torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev),
            self.k_cache, self.v_cache, meta, on_layer,
        )
        if all_logits:
            return self.model.compute_logits(hidden).cpu(), ordered
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, dtype=torch.long, device=dev)])
        return logits.cpu(), to_sample

    def _metadata(self, prefills, decodes, n_of, slots) -> AttentionMetadata:
        dev, i32 = self.device, torch.int32
        q_lens = [n_of[r.request_id] for r in prefills]
        p_lens = [r.num_computed_tokens + n for r, n in zip(prefills, q_lens)]
        d_lens = [r.num_computed_tokens + 1 for r in decodes]
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_prefills=len(prefills),
            num_prefill_tokens=starts[-1],
            query_start_loc=torch.tensor(starts, dtype=i32, device=dev),
            prefill_seq_lens=torch.tensor(p_lens, dtype=i32, device=dev),
            prefill_block_tables=self._tables(prefills, p_lens),
            max_prefill_query_len=max(q_lens, default=0),
            max_prefill_seq_len=max(p_lens, default=0),
            decode_seq_lens=torch.tensor(d_lens, dtype=i32, device=dev),
            decode_block_tables=self._tables(decodes, d_lens),
            max_decode_seq_len=max(d_lens, default=0),
        )

    def _tables(self, reqs: list[Request], lens: list[int]) -> torch.Tensor:
        width = max((-(-n // self.block_size) for n in lens), default=0)
        rows = [r.block_table[:width] + [0] * (width - len(r.block_table[:width])) for r in reqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(reqs), width)
