"""Triton attention over the paged KV cache: cache store, paged decode (with split-K), prefill.

Contract: the same as `engine.attention` (read its docstring first). `TritonAttentionBackend`
has the torch backend's `forward(q, k, v, k_cache, v_cache, meta, scale)`, and each kernel
below has a torch oracle there:

    store_kv           <-> engine.attention.store_kv           (byte-exact)
    decode_attention   <-> engine.attention.decode_attention_ref
    prefill_attention  <-> engine.attention.prefill_attention_ref

Layouts: q/k/v [num_tokens, heads, head_dim] with a unit stride on head_dim (other strides are
free, so views of a fused qkv projection work); caches [num_blocks, block_size, num_kv_heads,
head_dim], one pair per layer. Block tables are int32, sequence lengths int32, slots int64.
A negative slot marks a padding token: `store_kv` skips it (the torch reference would wrap).

Design, shared by both attention kernels:
  * K/V are gathered token by token through the block table (page = table[pos // block_size]),
    so a tile of BLOCK_N keys may span several pages, shuffled or shared between sequences,
    and block_size needs no relation to the tile sizes.
  * Online softmax in fp32 with exp2 (scale * log2(e) folded into the scores); the output is
    normalised once at the end. Matmuls accumulate in fp32; fp32 inputs use "ieee" dot
    precision so they are not silently rounded to tf32.
  * head_dim is padded to a power of two (>= 16) and masked, so 64, 128 and odd sizes work.
  * Decode packs the query heads that share a KV head (GQA group) into the rows of one tile, so
    each KV byte is read once per group; rows are padded to 16 for tl.dot and masked.
  * Split-K decode (flash-decoding): each (sequence, KV head) context is cut into
    `num_splits` ranges computed in parallel, each writing a partial output and its
    log-sum-exp; a reduction kernel merges them. See `choose_num_splits` for when.
  * Prefill: one program per (query tile, sequence, query head); it attends to keys
    [0, prefix_len + row] of its sequence, where prefix_len = seq_len - q_len. A prefix-cache
    hit, a later chunk of a chunked prefill and a plain prompt (prefix_len = 0) are one case.

Import this module only through `engine.attention_backends.get_attention_backend("triton")`
(or directly in tests and benchmarks): it imports triton. Kernels run on CPU under
TRITON_INTERPRET=1, which must be set before triton is first imported in the process. Two
triton 3.x interpreter quirks are worked around (and cost nothing on a GPU): bf16 dots are
done in fp32 (`_dot`), and dtype conversion on store is done by torch (`store_kv`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from engine.attention import AttentionBackend, AttentionMetadata

LOG2E = 1.4426950408889634

# Split-K heuristic knobs (see choose_num_splits).
SPLIT_MIN_CONTEXT = 1024  # shorter contexts are read fast enough by one program
SPLIT_MIN_TOKENS = 256  # each split reads at least this many tokens
SPLIT_MAX = 32  # bounds the partial-output buffer and the reduction's width
SPLIT_WAVES = 2  # aim for about this many programs per SM


# --------------------------------------------------------------------------- kernels


@triton.jit
def _copy_token_kv(
    src_ptr, dst_ptr, token, block, offset,
    stride_st, stride_sh, stride_db, stride_ds, stride_dh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Copy one token's [heads, head_dim] from src into cache slot (block, offset), same dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = src_ptr + token * stride_st + offs_h[:, None] * stride_sh + offs_d[None, :]
    x = tl.load(src, mask=mask)
    dst = dst_ptr + block * stride_db + offset * stride_ds + offs_h[:, None] * stride_dh
    tl.store(dst + offs_d[None, :], x, mask=mask)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per new token: write its K and V into the slot slot_mapping names."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    _copy_token_kv(key_ptr, k_cache_ptr, token, block, offset,
                   stride_kt, stride_kh, stride_kcb, stride_kcs, stride_kch,
                   NUM_KV_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D)
    _copy_token_kv(value_ptr, v_cache_ptr, token, block, offset,
                   stride_vt, stride_vh, stride_vcb, stride_vcs, stride_vch,
                   NUM_KV_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter + bf16 only) multiplies in fp32: the
    triton 3.x interpreter keeps bf16 as raw uint16 and would multiply the bit patterns.
    bf16 -> fp32 is exact, so only the summation order differs from the GPU's bf16 dot."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_kv_tile(
    cache_ptr, table_ptr, pos, valid, kv_head, offs_d, d_mask,
    stride_b, stride_s, stride_h, BLOCK_SIZE: tl.constexpr,
):
    """Gather the cached vectors of positions `pos` ([BLOCK_N]) through the block table."""
    page = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    row = page * stride_b + (pos % BLOCK_SIZE) * stride_s + kv_head * stride_h
    return tl.load(cache_ptr + row[:, None] + offs_d[None, :],
                   mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _attend_range(
    q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head, start, end, qk_scale,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Online softmax of q ([ROWS, BLOCK_D], cache dtype) over key positions [start, end).

    Returns the unnormalised fp32 accumulator [ROWS, BLOCK_D], the running max m_i (log2
    domain) and the running sum l_i ([ROWS] each). With CAUSAL, row r sees keys <= q_pos[r].
    """
    ROWS: tl.constexpr = q.shape[0]
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # A finite floor instead of -inf: a row whose keys are all masked in a tile then gives
    # exp2(-inf - floor) = 0, never exp2(-inf - -inf) = nan.
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n
        valid = pos < end
        k = _load_kv_tile(k_cache_ptr, table_ptr, pos, valid, kv_head, offs_d, d_mask,
                          stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale  # [ROWS, BLOCK_N]
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_new[:, None])
        v = _load_kv_tile(v_cache_ptr, table_ptr, pos, valid, kv_head, offs_d, d_mask,
                          stride_vb, stride_vs, stride_vh, BLOCK_SIZE)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(
    q_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr, qk_scale, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Program (seq, kv_head, split): the GQA group's query heads over one context range.

    Without SPLIT the range is the whole context and the program writes the final output;
    with SPLIT it writes a normalised partial output and its log2-sum-exp for the reduction.
    """
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Splits cover whole tiles; trailing splits of a short sequence may be empty.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    row_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32)  # unused: decode sees its whole context
    acc, m_i, l_i = _attend_range(
        q, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, kv_head,
        start, end, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        False, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
    )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty split has l_i == 0
    if SPLIT:
        # part_out [num_seqs, num_heads, num_splits, HEAD_DIM] fp32, part_lse [.., num_splits]
        num_heads = tl.num_programs(1) * GROUP
        part = (seq * num_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_mask)
        # An empty split gets lse = -inf, i.e. weight 0 in the reduction.
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=offs_g < GROUP)
    else:
        dst = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (seq, head): merge the split partials, weighting each by exp2(its lse)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    weight = tl.math.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    mask = s_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    part = part_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    parts = tl.load(part, mask=mask, other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    dst = out_ptr + seq * stride_ot + head * stride_oh + offs_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, out_ptr, k_cache_ptr, v_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Program (query tile, seq, head): BLOCK_M new tokens of one sequence and query head."""
    tile = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest query in the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tokens = q_start + offs_m
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)
    q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = prefix_len + offs_m
    # Keys past this tile's last query are invisible to all its rows: stop there.
    end = tl.minimum(seq_len, prefix_len + (tile + 1) * BLOCK_M)
    acc, _, l_i = _attend_range(
        q, q_pos, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, head // GROUP,
        0, end, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        True, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
    )
    out = acc / l_i[:, None]  # every row sees key 0, so l_i > 0
    dst = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16


def _dot_args(cache_dtype: torch.dtype) -> dict:
    """DOT_PRECISION / DOT_UPCAST constexprs for the attention kernels."""
    # tf32 would round fp32 inputs to 10 mantissa bits; 16-bit inputs ignore the setting.
    precision = "ieee" if cache_dtype == torch.float32 else "tf32"
    upcast = cache_dtype == torch.bfloat16 and _interpreted()
    return {"DOT_PRECISION": precision, "DOT_UPCAST": upcast}


def _interpreted() -> bool:
    # Decided when the kernels were decorated, i.e. by TRITON_INTERPRET at import time.
    return isinstance(_prefill_kernel, InterpretedFunction)


def _key_tile(cache_dtype: torch.dtype) -> int:
    # fp32 tiles are twice the bytes: halve them to stay within shared memory.
    return 32 if cache_dtype == torch.float32 else 64


def _check_unit_stride(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"head_dim must have unit stride, got strides {t.stride()}")


@functools.cache
def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the split-K heuristic's unit of work)."""
    if device.type != "cuda":
        return 1  # interpreter: parallelism buys nothing, so the heuristic never splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many ranges to cut each decode context into (1 = no split-K).

    Unsplit decode runs batch * num_kv_heads programs. When that already fills the GPU, or
    contexts are short, splitting only adds the partial writes and a reduction launch. Else
    split so that about SPLIT_WAVES programs run per SM, each reading >= SPLIT_MIN_TOKENS.
    """
    programs = batch * num_kv_heads
    if programs >= num_sms or max_seq_len < SPLIT_MIN_CONTEXT:
        return 1
    wanted = triton.cdiv(SPLIT_WAVES * num_sms, programs)
    return max(1, min(wanted, max_seq_len // SPLIT_MIN_TOKENS, SPLIT_MAX))


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Write new tokens' K/V into their cache slots (cast to the cache dtype)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.dtype != k_cache.dtype or value.dtype != v_cache.dtype:
        # Rare (the cache normally has the model's dtype). Converting with torch keeps the
        # rounding identical to the reference; the triton 3.x interpreter truncates fp32 ->
        # bf16 instead of rounding to nearest even. The kernel then only moves bytes.
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    _check_unit_stride(key, value, k_cache, v_cache)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def decode_attention(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,  # [num_decodes] int32, incl. the new token
    block_tables: torch.Tensor,  # [num_decodes, max_blocks] int32
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged decode attention. num_splits: None = choose_num_splits, 1 = never split, n = n.

    max_seq_len only feeds the heuristic; pass it (the metadata has it) to avoid a host sync.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_decodes = seq_lens.shape[0]  # q may carry padding tokens after the real ones
    out = torch.empty_like(q) if out is None else out
    if num_decodes == 0:
        return out
    _check_unit_stride(q, out, k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_sms = device_num_sms(q.device)
        num_splits = choose_num_splits(num_decodes, num_kv_heads, max_seq_len, num_sms)
    group = num_heads // num_kv_heads
    split = num_splits > 1
    if split:
        part_out = torch.empty(num_decodes, num_heads, num_splits, head_dim,
                               dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_decodes, num_heads, num_splits,
                               dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel without SPLIT
    _decode_kernel[(num_decodes, num_kv_heads, num_splits)](
        q, out, part_out, part_lse, k_cache, v_cache, seq_lens, block_tables,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=_key_tile(k_cache.dtype),
        BLOCK_D=_block_d(head_dim), SPLIT=split, **_dot_args(k_cache.dtype), num_warps=4,
    )
    if split:
        _decode_reduce_kernel[(num_decodes, num_heads)](
            out, part_out, part_lse, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out


def prefill_attention(
    q: torch.Tensor,  # [num_prefill_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [num_prefills + 1] int32
    seq_lens: torch.Tensor,  # [num_prefills] int32, incl. the new tokens
    block_tables: torch.Tensor,  # [num_prefills, max_blocks] int32
    scale: float,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention of new tokens over their cached prefix and themselves."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_prefills = seq_lens.shape[0]
    out = torch.empty_like(q) if out is None else out
    if num_prefills == 0:
        return out
    _check_unit_stride(q, out, k_cache, v_cache)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_m = block_n = _key_tile(k_cache.dtype)
    grid = (triton.cdiv(max_query_len, block_m), num_prefills, num_heads)
    _prefill_kernel[grid](
        q, out, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        **_dot_args(k_cache.dtype), num_warps=4, num_stages=2,
    )
    return out


class TritonAttentionBackend(AttentionBackend):
    """Triton backend; the batch split and call order come from AttentionBackend.forward.

    decode_num_splits: None picks split-K by `choose_num_splits`; 1 forces the single-pass
    decode kernel, n > 1 forces n splits (tests and benchmarks use this to pin a path).
    """

    name = "triton"

    def __init__(self, decode_num_splits: int | None = None) -> None:
        if decode_num_splits is not None and decode_num_splits < 1:
            raise ValueError(f"decode_num_splits must be >= 1 or None, got {decode_num_splits}")
        self.decode_num_splits = decode_num_splits

    def store(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        store_kv(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, out) -> None:
        prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.prefill_seq_lens,
            meta.prefill_block_tables, scale, max_query_len=meta.max_prefill_query_len, out=out,
        )

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale, out) -> None:
        decode_attention(
            q, k_cache, v_cache, meta.decode_seq_lens, meta.decode_block_tables, scale,
            max_seq_len=meta.max_decode_seq_len, num_splits=self.decode_num_splits, out=out,
        )
