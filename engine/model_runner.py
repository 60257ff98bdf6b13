"""Owns the model and the KV pool; turns a SchedulerOutput into one forward pass.

A step has two halves so that tensor-parallel ranks share one code path: `prepare(sched)`
(rank 0 only: it reads the scheduler's requests) packs everything the forward pass needs into
a StepInputs, a small header of ints plus one flat int64 tensor; `run(inputs)` (every rank)
applies the copy-on-write block copies and runs the model. engine/tp_engine.py broadcasts the
header and the tensor from rank 0 to the other ranks between the two halves.

The KV pool is two preallocated tensors, K and V, each
[num_layers, num_blocks, block_size, local_kv_heads, head_dim]: one (layer, block) region is
contiguous, which is what KV export/import and transports move. Under tensor parallelism each
rank's pool holds its own KV heads (`model.kv_head_shard`); block ids are the same on every
rank, chosen by rank 0's block manager.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata
from engine.attention_backends import get_attention_backend
from engine.config import EngineConfig, ModelConfig
from engine.loader import load_weights
from engine.model import LlamaModel
from engine.parallel import TPGroup
from engine.request import Request
from engine.scheduler import SchedulerOutput
from kv_layout.heads import max_local_kv_heads


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                   local_kv_heads: int | None = None) -> int:
    """Bytes of K and V for one block across all layers."""
    heads = local_kv_heads or cfg.num_kv_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * heads * cfg.head_dim * elem


# StepInputs.header: a fixed-length list of ints, broadcast first so that the other ranks
# know the payload's length and how to split it.
HEADER_LEN = 16
(H_CMD, H_TOKENS, H_PREFILLS, H_DECODES, H_PREFILL_WIDTH, H_DECODE_WIDTH, H_COPIES, H_SAMPLED,
 H_PREFILL_TOKENS, H_MAX_PREFILL_QUERY, H_MAX_PREFILL_SEQ, H_MAX_DECODE_SEQ, H_ID_BYTES,
 H_PAYLOAD) = range(14)
CMD_STOP, CMD_STEP = 0, 1


def _segment_sizes(h: list[int]) -> list[int]:
    """Payload segments, in order: input ids, positions, slots [T each]; query start locations
    [P+1], prefill seq lens [P], prefill block tables [P*PW]; decode seq lens [D], decode block
    tables [D*DW]; CoW sources, destinations [C each]; sample rows, their request indices [S
    each]; request id lengths [P+D], request id bytes [ceil(B/8) words]."""
    t, p, d = h[H_TOKENS], h[H_PREFILLS], h[H_DECODES]
    c, s = h[H_COPIES], max(h[H_SAMPLED], 0)
    return [t, t, t, p + 1, p, p * h[H_PREFILL_WIDTH], d, d * h[H_DECODE_WIDTH], c, c, s, s,
            p + d, -(-h[H_ID_BYTES] // 8)]


@dataclass
class StepInputs:
    """One forward pass's inputs. `header` and `payload` are what rank 0 broadcasts; every
    tensor field is a view (or an int32 copy) of `payload`, on the runner's device."""

    header: list[int]
    payload: torch.Tensor  # [header[H_PAYLOAD]] int64
    input_ids: torch.Tensor  # [num_tokens] int64, prefills' tokens first, then decodes'
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    copy_src: torch.Tensor  # [num_copies] int64: copy block copy_src[i] to copy_dst[i] first
    copy_dst: torch.Tensor
    sample_rows: torch.Tensor | None  # [num_sampled] rows whose logits run() returns; None: all
    sampled_index: torch.Tensor  # [num_sampled] int64: each sampled row's index in request_ids
    # Rank 0 only, not broadcast: the requests whose logits run() returns, in row order.
    sampled: list[Request] = field(default_factory=list)
    _request_ids: tuple[str, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return self.header[H_TOKENS]

    @property
    def request_ids(self) -> tuple[str, ...]:
        """The batch's requests in order (prefills, then decodes); for per-layer hooks."""
        if self._request_ids is None:
            segs = self.payload.split(_segment_sizes(self.header))
            lens, words = segs[-2].tolist(), segs[-1].cpu()
            raw = words.numpy().tobytes()[: self.header[H_ID_BYTES]]
            ids, at = [], 0
            for n in lens:
                ids.append(raw[at : at + n].decode())
                at += n
            self._request_ids = tuple(ids)
        return self._request_ids

    @property
    def sampled_request_ids(self) -> tuple[str, ...]:
        """Requests that reach the end of their known tokens this step (a prefill finishing)."""
        ids = self.request_ids
        if self.sample_rows is None:
            return ids
        return tuple(ids[i] for i in self.sampled_index.tolist())

    @classmethod
    def unpack(cls, header: list[int], payload: torch.Tensor, **local) -> StepInputs:
        (ids, pos, slots, qsl, p_lens, p_tab, d_lens, d_tab, c_src, c_dst, rows, rows_index,
         _, _) = payload.split(_segment_sizes(header))
        i32 = torch.int32
        p, d = header[H_PREFILLS], header[H_DECODES]
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_prefills=p,
            num_prefill_tokens=header[H_PREFILL_TOKENS],
            query_start_loc=qsl.to(i32),
            prefill_seq_lens=p_lens.to(i32),
            prefill_block_tables=p_tab.to(i32).view(p, header[H_PREFILL_WIDTH]),
            max_prefill_query_len=header[H_MAX_PREFILL_QUERY],
            max_prefill_seq_len=header[H_MAX_PREFILL_SEQ],
            decode_seq_lens=d_lens.to(i32),
            decode_block_tables=d_tab.to(i32).view(d, header[H_DECODE_WIDTH]),
            max_decode_seq_len=header[H_MAX_DECODE_SEQ],
        )
        return cls(header, payload, ids, pos, meta, c_src, c_dst,
                   rows if header[H_SAMPLED] >= 0 else None, rows_index, **local)


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, config: EngineConfig, model_path,
                 max_model_len: int, tp: TPGroup | None = None):
        self.cfg = model_cfg
        self.config = config
        self.tp = tp or TPGroup()
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        assert config.attention_backend is not None  # EngineConfig.__post_init__ resolves it
        self.backend = get_attention_backend(config.attention_backend)
        with torch.device(self.device):
            self.model = LlamaModel(model_cfg, self.backend, self.tp, max_positions=max_model_len)
        self.model.to(self.dtype)
        load_weights(self.model, model_path, self.dtype)
        self.model.eval()
        self.block_size = config.block_size
        # Sized by the largest rank's share so that every rank has the same number of blocks.
        block_bytes = kv_block_bytes(model_cfg, self.block_size, self.dtype,
                                     max_local_kv_heads(model_cfg.num_kv_heads, self.tp.size))
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_memory_bytes // block_bytes)
        heads = self.model.local_kv_heads
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
            self._copy_blocks(src, dst)

    def _copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

    def execute(self, sched: SchedulerOutput, all_logits: bool = False,
                on_layer: Callable[[int], None] | None = None
                ) -> tuple[torch.Tensor, list[Request]]:
        """Run one forward pass. Returns logits for the requests that reached the end of
        their known tokens this step (those get a sampled token), and those requests.
        `all_logits` (tests) returns every token's logits instead, prefills first."""
        inputs = self.prepare(sched, all_logits)
        return self.run(inputs, on_layer).cpu(), inputs.sampled

    def prepare(self, sched: SchedulerOutput, all_logits: bool = False) -> StepInputs:
        """Pack a schedule into StepInputs (rank 0; no model work, no communication)."""
        n_of = sched.num_scheduled_tokens
        prefills = [r for r in sched.requests if n_of[r.request_id] > 1]
        decodes = [r for r in sched.requests if n_of[r.request_id] == 1]
        ordered = prefills + decodes
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_index: list[int] = []
        sampled: list[Request] = []
        bs = self.block_size
        for i, req in enumerate(ordered):
            start, n = req.num_computed_tokens, n_of[req.request_id]
            input_ids.extend(req.token_ids[start : start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if start + n == req.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_index.append(i)
                sampled.append(req)
        q_lens = [n_of[r.request_id] for r in prefills]
        p_lens = [r.num_computed_tokens + n for r, n in zip(prefills, q_lens)]
        d_lens = [r.num_computed_tokens + 1 for r in decodes]
        query_starts = [0]
        for n in q_lens:
            query_starts.append(query_starts[-1] + n)
        p_width, p_tables = self._tables(prefills, p_lens)
        d_width, d_tables = self._tables(decodes, d_lens)
        id_bytes = [r.request_id.encode() for r in ordered]
        raw = b"".join(id_bytes)
        if all_logits:
            sample_rows, sample_index, sampled = [], [], ordered
        pairs = sched.copy_pairs
        ints = (input_ids + positions + slots + query_starts + p_lens + p_tables + d_lens
                + d_tables + [s for s, _ in pairs] + [d for _, d in pairs] + sample_rows
                + sample_index + [len(b) for b in id_bytes])
        words = torch.frombuffer(bytearray(raw + bytes(-len(raw) % 8)), dtype=torch.int64) \
            if raw else torch.empty(0, dtype=torch.int64)
        payload = torch.cat([torch.tensor(ints, dtype=torch.int64), words])
        header = [0] * HEADER_LEN
        header[H_CMD] = CMD_STEP
        header[H_TOKENS] = len(input_ids)
        header[H_PREFILLS], header[H_DECODES] = len(prefills), len(decodes)
        header[H_PREFILL_WIDTH], header[H_DECODE_WIDTH] = p_width, d_width
        header[H_COPIES] = len(pairs)
        header[H_SAMPLED] = -1 if all_logits else len(sample_rows)
        header[H_PREFILL_TOKENS] = query_starts[-1]
        header[H_MAX_PREFILL_QUERY] = max(q_lens, default=0)
        header[H_MAX_PREFILL_SEQ] = max(p_lens, default=0)
        header[H_MAX_DECODE_SEQ] = max(d_lens, default=0)
        header[H_ID_BYTES] = len(raw)
        header[H_PAYLOAD] = payload.numel()
        return StepInputs.unpack(header, payload.to(self.device), sampled=sampled,
                                 _request_ids=tuple(r.request_id for r in ordered))

    def _tables(self, reqs: list[Request], lens: list[int]) -> tuple[int, list[int]]:
        """Block tables covering `lens` tokens, zero-padded to one width, flattened."""
        width = max((-(-n // self.block_size) for n in lens), default=0)
        flat: list[int] = []
        for r in reqs:
            row = r.block_table[:width]
            flat.extend(row)
            flat.extend([0] * (width - len(row)))
        return width, flat

    @torch.inference_mode()
    def run(self, inputs: StepInputs, on_layer: Callable[[int], None] | None = None
            ) -> torch.Tensor:
        """The forward pass on this rank: CoW copies, the model, then the logits of the
        sample rows (all rows when sample_rows is None), [rows, vocab] fp32 on the device.
        Under TP every rank must run the same inputs: the layers' collectives pair up."""
        if inputs.copy_src.numel():
            self._copy_blocks(inputs.copy_src, inputs.copy_dst)
        hidden = self.model(inputs.input_ids, inputs.positions, self.k_cache, self.v_cache,
                            inputs.meta, on_layer)
        if inputs.sample_rows is not None:
            if not inputs.sample_rows.numel():  # a chunk that ends mid-prompt: nothing to sample
                return torch.empty((0, self.cfg.vocab_size), device=self.device)
            hidden = hidden[inputs.sample_rows]
        return self.model.compute_logits(hidden)

    def close(self) -> None:
        """Release what the runner holds beyond memory (the TP runner stops its followers)."""
