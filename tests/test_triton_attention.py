"""The Triton attention kernels against the torch reference in engine.attention.

Without CUDA the kernels run under the Triton interpreter, which is slow: shapes stay small,
larger ones are marked slow. With CUDA the same tests compile and run the real kernels.

Tolerances (vs the reference, which computes in fp32 and rounds once to the input dtype):
  fp32: atol = rtol = 1e-5   only the summation order differs ("ieee" dots, no tf32)
  fp16: atol = rtol = 2e-3   the kernel also rounds softmax weights to fp16 (2^-11) for P @ V
  bf16: atol = rtol = 1.6e-2 the same with bf16 weights (2^-8), plus 1 ulp (2^-7) on output
The cache store must be byte-exact.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, its own library's included, so
# the flag only works if set before the first `import triton` in the process.
TRITON_IMPORTED_TOO_EARLY = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import engine.triton_attention as ta
from engine import attention as ref
from engine.attention_backends import get_attention_backend

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and TRITON_IMPORTED_TOO_EARLY,
    reason="triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
    "on CPU: set the flag in tests/conftest.py or the environment, or run this file alone",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (num_heads, num_kv_heads): query heads per KV head 1, 2, 3, 4 and 8.
GQA = [(2, 2), (4, 2), (9, 3), (8, 2), (8, 1)]


# --------------------------------------------------------------------------- scenario helpers


@dataclass
class PagedCache:
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def make_block_tables(
    seq_lens: list[int], block_size: int, gen: torch.Generator, shared_blocks: int = 0
) -> tuple[torch.Tensor, int]:
    """Shuffled, non-contiguous block ids out of a pool with spare blocks.

    The first `shared_blocks` entries of every table are the same ids (a shared prefix).
    Unused entries are -1: the reference wraps them to the pool's last block, whose random
    content would show up in the output if a kernel read past a sequence's end.
    """
    need = [cdiv(n, block_size) for n in seq_lens]
    assert all(n >= shared_blocks for n in need)
    num_private = sum(n - shared_blocks for n in need)
    num_blocks = shared_blocks + num_private + 5
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    shared, private = ids[:shared_blocks], iter(ids[shared_blocks:])
    table = torch.full((len(seq_lens), max(need) + 1), -1, dtype=torch.int32)
    for i, n in enumerate(need):
        row = shared + [next(private) for _ in range(n - shared_blocks)]
        table[i, :n] = torch.tensor(row, dtype=torch.int32)
    return table, num_blocks


def make_paged_cache(
    seq_lens: list[int], kv_heads: int, head_dim: int, dtype: torch.dtype,
    gen: torch.Generator, block_size: int = 16, shared_blocks: int = 0,
) -> PagedCache:
    table, num_blocks = make_block_tables(seq_lens, block_size, gen, shared_blocks)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return PagedCache(k.to(DEVICE), v.to(DEVICE), table.to(DEVICE))


def randn(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def int32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == expected.dtype == dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


def assert_bytes_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# --------------------------------------------------------------------------- decode


def check_decode(
    seq_lens: list[int], num_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
    num_splits: int = 1, block_size: int = 16, shared_blocks: int = 0, seed: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    cache = make_paged_cache(seq_lens, kv_heads, head_dim, dtype, gen, block_size, shared_blocks)
    q = randn(len(seq_lens), num_heads, head_dim, dtype=dtype, gen=gen)
    lens = int32(seq_lens)
    scale = head_dim**-0.5
    out = ta.decode_attention(q, cache.k_cache, cache.v_cache, lens, cache.block_tables, scale,
                              num_splits=num_splits)
    expected = ref.decode_attention_ref(q, cache.k_cache, cache.v_cache, lens,
                                        cache.block_tables, scale)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("num_heads,kv_heads", GQA)
def test_decode_each_gqa_ratio(num_heads, kv_heads):
    check_decode([1, 17, 40], num_heads, kv_heads, 32, torch.float32)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_each_dtype_and_head_dim(dtype, head_dim):
    check_decode([1, 23, 70], 4, 2, head_dim, dtype)


@pytest.mark.parametrize("head_dim", [16, 80])
def test_decode_small_and_non_power_of_two_head_dim(head_dim):
    check_decode([5, 33], 4, 1, head_dim, torch.float16)


@pytest.mark.parametrize("block_size", [1, 8, 12, 32])
def test_decode_block_sizes_unrelated_to_tiles(block_size):
    check_decode([1, 31, 45], 4, 2, 32, torch.float32, block_size=block_size)


def test_decode_shared_prefix_blocks():
    check_decode([33, 40, 64], 6, 2, 32, torch.float16, shared_blocks=2)


@pytest.mark.parametrize("num_splits", [2, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_k(dtype, num_splits):
    # Length-1 and short sequences leave trailing splits empty; 517 is not a tile multiple.
    check_decode([1, 300, 517], 4, 2, 32, dtype, num_splits=num_splits)


def test_decode_split_k_gqa_and_shared_prefix():
    check_decode([400, 290], 9, 3, 64, torch.float16, num_splits=4, shared_blocks=3)


def test_decode_ignores_padding_rows_of_q():
    """The model runner may pad q; only len(seq_lens) rows are attended and written."""
    gen = torch.Generator().manual_seed(3)
    cache = make_paged_cache([9, 20], 2, 32, torch.float32, gen)
    q = randn(4, 4, 32, dtype=torch.float32, gen=gen)
    lens = int32([9, 20])
    out = torch.full_like(q, 7.0)
    ta.decode_attention(q, cache.k_cache, cache.v_cache, lens, cache.block_tables, 0.2, out=out)
    expected = ref.decode_attention_ref(q[:2], cache.k_cache, cache.v_cache, lens,
                                        cache.block_tables, 0.2)
    assert_close(out[:2], expected, torch.float32)
    assert (out[2:] == 7.0).all()


def test_choose_num_splits():
    sms = 132
    assert ta.choose_num_splits(64, 8, 32768, sms) == 1  # the batch fills the GPU already
    assert ta.choose_num_splits(1, 8, 512, sms) == 1  # short context: not worth a reduction
    n = ta.choose_num_splits(1, 8, 8192, sms)
    assert 1 < n <= ta.SPLIT_MAX and 8192 // n >= ta.SPLIT_MIN_TOKENS
    assert n * 8 >= sms  # enough programs to cover every SM
    assert ta.choose_num_splits(1, 1, 1 << 20, sms) == ta.SPLIT_MAX
    assert ta.choose_num_splits(1, 1, 2048, sms) == 2048 // ta.SPLIT_MIN_TOKENS


def test_backend_rejects_bad_num_splits():
    with pytest.raises(ValueError, match="decode_num_splits"):
        ta.TritonAttentionBackend(decode_num_splits=0)


# --------------------------------------------------------------------------- prefill


def check_prefill(
    specs: list[tuple[int, int]], num_heads: int, kv_heads: int, head_dim: int,
    dtype: torch.dtype, block_size: int = 16, shared_blocks: int = 0, seed: int = 0,
) -> None:
    """specs: (cached prefix length, new tokens) per sequence."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in specs]
    cache = make_paged_cache(seq_lens, kv_heads, head_dim, dtype, gen, block_size, shared_blocks)
    starts = [0]
    for _, n in specs:
        starts.append(starts[-1] + n)
    q = randn(starts[-1], num_heads, head_dim, dtype=dtype, gen=gen)
    qsl, lens = int32(starts), int32(seq_lens)
    scale = head_dim**-0.5
    out = ta.prefill_attention(q, cache.k_cache, cache.v_cache, qsl, lens, cache.block_tables,
                               scale, max_query_len=max(n for _, n in specs))
    expected = ref.prefill_attention_ref(q, cache.k_cache, cache.v_cache, qsl, lens,
                                         cache.block_tables, scale)
    assert_close(out, expected, dtype)


# Empty prefix (plain prompt, incl. a 1-token one), block-aligned prefix (prefix-cache hit),
# unaligned prefix (a later chunk of a chunked prefill) and a query spanning two fp32 tiles.
MIXED_PREFILL = [(0, 1), (0, 19), (32, 5), (21, 40), (7, 1)]


@pytest.mark.parametrize("num_heads,kv_heads", GQA)
def test_prefill_each_gqa_ratio(num_heads, kv_heads):
    check_prefill([(0, 11), (21, 6)], num_heads, kv_heads, 32, torch.float32)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_each_dtype_and_head_dim(dtype, head_dim):
    check_prefill(MIXED_PREFILL, 2, 1, head_dim, dtype)


def test_prefill_query_longer_than_one_tile():
    check_prefill([(0, 70), (13, 66)], 2, 2, 32, torch.float16)


@pytest.mark.parametrize("block_size", [1, 12])
def test_prefill_block_sizes_unrelated_to_tiles(block_size):
    check_prefill([(0, 9), (17, 8)], 2, 1, 16, torch.float32, block_size=block_size)


def test_prefill_shared_prefix_blocks():
    # Two prompts hit the same 2 cached blocks and add different suffixes.
    check_prefill([(32, 9), (40, 3)], 4, 2, 32, torch.float16, shared_blocks=2)


def test_prefill_non_power_of_two_head_dim():
    check_prefill([(5, 7)], 2, 1, 80, torch.float32)


# --------------------------------------------------------------------------- store


@pytest.mark.parametrize(
    "src_dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16),
     (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
     (torch.float32, torch.bfloat16)],
)
def test_store_kv_byte_exact(src_dtype, cache_dtype):
    gen = torch.Generator().manual_seed(1)
    num_tokens, kv_heads, head_dim, block_size, num_blocks = 11, 3, 24, 4, 6
    # K and V as views of one fused projection: strided tokens, unit-stride head_dim.
    fused = randn(num_tokens, 2 * kv_heads + 1, head_dim, dtype=src_dtype, gen=gen)
    key, value = fused[:, :kv_heads], fused[:, kv_heads + 1:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = randn(*shape, dtype=cache_dtype, gen=gen)
    v_cache = randn(*shape, dtype=cache_dtype, gen=gen)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    ref.store_kv(key, value, k_expected, v_expected, slots)
    ta.store_kv(key, value, k_cache, v_cache, slots)
    assert_bytes_equal(k_cache, k_expected)
    assert_bytes_equal(v_cache, v_expected)


def test_store_kv_skips_padding_slots():
    gen = torch.Generator().manual_seed(2)
    key = randn(3, 1, 16, dtype=torch.float16, gen=gen)
    k_cache = torch.zeros(2, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, -1, 0], dtype=torch.int64, device=DEVICE)
    ta.store_kv(key, key, k_cache, v_cache, slots)
    flat = k_cache.view(8, 1, 16)
    assert torch.equal(flat[5], key[0]) and torch.equal(flat[0], key[2])
    assert flat[[1, 2, 3, 4, 6, 7]].abs().sum() == 0


# --------------------------------------------------------------------------- backend


def make_step(
    prefill_specs: list[tuple[int, int]], decode_lens: list[int], num_heads: int, kv_heads: int,
    head_dim: int, dtype: torch.dtype, gen: torch.Generator, block_size: int = 16,
):
    """A mixed step: prefills (prefix, new) then decodes; q/k/v are views of a fused qkv."""
    specs = prefill_specs + [(n - 1, 1) for n in decode_lens]
    seq_lens = [p + n for p, n in specs]
    cache = make_paged_cache(seq_lens, kv_heads, head_dim, dtype, gen, block_size)
    table = cache.block_tables.cpu()
    slots, starts = [], [0]
    for i, (prefix, new) in enumerate(specs):
        for pos in range(prefix, prefix + new):
            slots.append(int(table[i, pos // block_size]) * block_size + pos % block_size)
        starts.append(starts[-1] + new)
    num_prefills, num_tokens = len(prefill_specs), len(slots)
    qkv = randn(num_tokens, num_heads + 2 * kv_heads, head_dim, dtype=dtype, gen=gen)
    q, k, v = qkv.split([num_heads, kv_heads, kv_heads], dim=1)
    meta = ref.AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        num_prefills=num_prefills,
        num_prefill_tokens=starts[num_prefills],
        query_start_loc=int32(starts[: num_prefills + 1]),
        prefill_seq_lens=int32(seq_lens[:num_prefills]),
        prefill_block_tables=cache.block_tables[:num_prefills],
        max_prefill_query_len=max((n for _, n in prefill_specs), default=0),
        max_prefill_seq_len=max(seq_lens[:num_prefills], default=0),
        decode_seq_lens=int32(decode_lens),
        decode_block_tables=cache.block_tables[num_prefills:],
        max_decode_seq_len=max(decode_lens, default=0),
    )
    return q, k, v, cache, meta


@pytest.mark.parametrize(
    "prefill_specs,decode_lens,num_splits",
    [([(0, 9), (20, 14)], [1, 18, 37], None), ([], [5, 150], 3), ([(3, 6)], [], None)],
    ids=["mixed", "decode-only-split", "prefill-only"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_forward_matches_torch_backend(dtype, prefill_specs, decode_lens, num_splits):
    gen = torch.Generator().manual_seed(4)
    q, k, v, cache, meta = make_step(prefill_specs, decode_lens, 6, 2, 32, dtype, gen)
    k_expected, v_expected = cache.k_cache.clone(), cache.v_cache.clone()
    expected = ref.TorchAttentionBackend().forward(q, k, v, k_expected, v_expected, meta, 0.17)
    backend = ta.TritonAttentionBackend(decode_num_splits=num_splits)
    out = backend.forward(q, k, v, cache.k_cache, cache.v_cache, meta, 0.17)
    assert backend.name == "triton"
    assert_bytes_equal(cache.k_cache, k_expected)
    assert_bytes_equal(cache.v_cache, v_expected)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("seed", range(10))
def test_random_steps_match_torch_backend(seed):
    """Seeded random mixes of every knob: dtype, GQA ratio, head_dim, block size, batch
    composition, prefix lengths and split count."""
    rng = random.Random(seed)
    dtype = rng.choice(DTYPES)
    num_heads, kv_heads = rng.choice(GQA)
    head_dim = rng.choice([16, 32, 48, 64])
    block_size = rng.choice([4, 8, 16])
    num_prefills = rng.randint(0, 3)
    num_decodes = rng.randint(0 if num_prefills else 1, 4)
    prefill_specs = [(rng.choice([0, rng.randint(1, 60)]), rng.randint(1, 40))
                     for _ in range(num_prefills)]
    decode_lens = [rng.randint(1, 120) for _ in range(num_decodes)]
    num_splits = rng.choice([None, 1, 2, 5])
    gen = torch.Generator().manual_seed(seed)
    q, k, v, cache, meta = make_step(prefill_specs, decode_lens, num_heads, kv_heads, head_dim,
                                     dtype, gen, block_size)
    k_expected, v_expected = cache.k_cache.clone(), cache.v_cache.clone()
    scale = head_dim**-0.5
    expected = ref.TorchAttentionBackend().forward(q, k, v, k_expected, v_expected, meta, scale)
    backend = ta.TritonAttentionBackend(decode_num_splits=num_splits)
    out = backend.forward(q, k, v, cache.k_cache, cache.v_cache, meta, scale)
    assert_bytes_equal(cache.k_cache, k_expected)
    assert_bytes_equal(cache.v_cache, v_expected)
    assert_close(out, expected, dtype)


def test_get_attention_backend_returns_triton():
    assert get_attention_backend("triton").name == "triton"


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_context_split_k_slow(dtype):
    check_decode([8192, 3000, 1], 32, 4, 128, dtype, num_splits=16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_long_prefix_slow(dtype):
    check_prefill([(1024, 200), (0, 300), (333, 129)], 8, 2, 128, dtype)


def test_engine_with_triton_backend_matches_torch_backend(tiny_checkpoints):
    """The whole engine (tiny model, interpreted kernels): the same greedy tokens with the
    Triton backend as with the torch reference, through prefill, prefix hit and decode."""
    from engine.config import EngineConfig
    from engine.engine import LLMEngine
    from pdserve_api.sampling import SamplingParams

    path = tiny_checkpoints["qwen3"]
    prompts = [list(range(3, 40)), list(range(3, 30)) + [7, 8], [5]]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(model=str(path), num_kv_blocks=64,
                                        attention_backend=backend))
        assert engine.runner.backend.name == backend
        results[backend] = [o.new_token_ids for o in engine.generate(prompts, sp)]
        engine.check_integrity()
    assert results["triton"] == results["torch"]
