"""Benchmark the Triton attention kernels on a GPU (not a test).

Decode: achieved bandwidth = bytes of K/V read / kernel time, for batch x context, against the
GPU's peak, torch scaled_dot_product_attention on the same K/V as padded dense tensors, and
FlashInfer's paged decode when `import flashinfer` works. The Triton kernel is timed twice:
with the split-K heuristic (`auto`) and forced single-pass (`nosplit`), to check the heuristic.
Prefill: TFLOP/s (useful causal FLOPs only) against SDPA.

    python -m bench.attention --out bench/out/attention.json [--peak-gbps 3350]

(from the repository root, or with the package installed, so that `engine` imports).

Times are medians of CUDA-event timings with the L2 cache flushed before every repetition;
they include launch overhead, which dominates the smallest cases (batch 1, context 512).
Record results in BENCHMARKS.md with the command, machine and date. Without CUDA it exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# Peak DRAM bandwidth in GB/s by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_GBPS = [
    ("GH200", 4000.0),  # before "H200", which it contains
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # 40GB
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
    ("T4", 320.0),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_HEADROOM = 0.85  # use at most this share of free GPU memory per case


@dataclass
class DecodeRow:
    batch: int
    context: int
    kv_bytes: int
    num_splits: int  # what the heuristic chose
    ms: dict[str, float] = field(default_factory=dict)  # implementation -> median ms
    gbps: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why
    max_abs_diff_vs_sdpa: float | None = None


@dataclass
class PrefillRow:
    num_seqs: int
    query_len: int
    prefix_len: int
    flops: float
    ms: dict[str, float] = field(default_factory=dict)
    tflops: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- timing


class CudaTimer:
    """Median kernel time with CUDA events; the L2 cache is flushed before each repetition so
    decode reads K/V from DRAM, as it does in serving."""

    def __init__(self, warmup: int, reps: int) -> None:
        self.warmup, self.reps = warmup, reps
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
        self.flush_buffer = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush_buffer.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def fits(nbytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return nbytes <= MEMORY_HEADROOM * free


def free_memory() -> None:
    """Return the previous case's blocks to the driver so `fits` sees them as free."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- inputs


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, blocks_per_seq] int32, shuffled block ids
    seq_lens: torch.Tensor  # [num_seqs] int32


def make_paged_kv(num_seqs: int, seq_len: int, args: argparse.Namespace) -> PagedKV:
    """Uniform-length sequences whose blocks are scattered over the pool, as after churn."""
    blocks_per_seq = math.ceil(seq_len / args.block_size)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    dtype = DTYPES[args.dtype]
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int64).to(torch.int32)
    tables = perm.view(num_seqs, blocks_per_seq)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device="cuda")
    return PagedKV(k_cache, v_cache, tables, seq_lens)


def dense_kv(kv: PagedKV, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same K/V gathered into dense per-sequence tensors, seen as SDPA's
    [num_seqs, kv_heads, seq_len, head_dim] (a transposed view: no second copy)."""

    def gather(cache: torch.Tensor) -> torch.Tensor:
        blocks = cache[kv.block_tables.long()]  # [B, blocks, block_size, kvh, d]
        return blocks.flatten(1, 2)[:, :seq_len].transpose(1, 2)

    return gather(kv.k_cache), gather(kv.v_cache)


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """SDPA with fewer KV heads than query heads (torch >= 2.5 does it without copies)."""
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    except TypeError:  # older torch: expand the KV heads
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, v, **kw)


# --------------------------------------------------------------------------- decode


def flashinfer_decode(q: torch.Tensor, kv: PagedKV, args: argparse.Namespace) -> Callable:
    """A closure running FlashInfer's paged decode on the same cache (NHD = our layout)."""
    import flashinfer

    num_seqs, blocks_per_seq = kv.block_tables.shape
    indptr = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * blocks_per_seq
    indices = kv.block_tables.flatten().contiguous()
    last = (kv.seq_lens - 1) % args.block_size + 1
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    dims = (args.heads, args.kv_heads, args.head_dim, args.block_size)
    if hasattr(wrapper, "plan"):
        wrapper.plan(indptr, indices, last, *dims, pos_encoding_mode="NONE",
                     q_data_type=q.dtype, kv_data_type=q.dtype)
        return lambda: wrapper.run(q, (kv.k_cache, kv.v_cache))
    wrapper.begin_forward(indptr, indices, last, *dims, pos_encoding_mode="NONE",
                          data_type=q.dtype)  # flashinfer < 0.2
    return lambda: wrapper.forward(q, (kv.k_cache, kv.v_cache))


def time_sdpa_decode(
    q: torch.Tensor, kv: PagedKV, context: int, scale: float, timer: CudaTimer
) -> tuple[float, torch.Tensor]:
    """SDPA on a dense copy of the same K/V (freed on return): (median ms, output)."""
    k, v = dense_kv(kv, context)
    q4 = q.unsqueeze(2)  # [B, H, 1, d]
    ms = timer(lambda: sdpa_gqa(q4, k, v, scale=scale))
    return ms, sdpa_gqa(q4, k, v, scale=scale).squeeze(2)


def bench_decode_case(
    batch: int, context: int, args: argparse.Namespace, timer: CudaTimer
) -> DecodeRow | None:
    from engine import triton_attention as ta

    elem = torch.finfo(DTYPES[args.dtype]).bits // 8
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elem
    if not fits(kv_bytes):
        return None
    kv = make_paged_kv(batch, context, args)
    q = torch.randn(batch, args.heads, args.head_dim, dtype=DTYPES[args.dtype], device="cuda")
    scale = args.head_dim**-0.5
    splits = ta.choose_num_splits(batch, args.kv_heads, context, ta.device_num_sms(q.device))
    row = DecodeRow(batch, context, kv_bytes, splits)

    def run(n: int | None) -> Callable[[], torch.Tensor]:
        return lambda: ta.decode_attention(q, kv.k_cache, kv.v_cache, kv.seq_lens,
                                           kv.block_tables, scale, max_seq_len=context,
                                           num_splits=n)

    row.ms["triton_auto"] = timer(run(None))
    row.ms["triton_nosplit"] = timer(run(1))
    if fits(kv_bytes):  # the dense copy doubles the footprint
        row.ms["sdpa"], dense_out = time_sdpa_decode(q, kv, context, scale, timer)
        diff = (run(None)().float() - dense_out.float()).abs().max()
        row.max_abs_diff_vs_sdpa = diff.item()
        del dense_out
    else:
        row.skipped["sdpa"] = "dense copy does not fit"
    try:
        row.ms["flashinfer"] = timer(flashinfer_decode(q, kv, args))
    except Exception as exc:  # noqa: BLE001 - an optional baseline's failure is recorded
        row.skipped["flashinfer"] = f"{type(exc).__name__}: {exc}"[:200]
    row.gbps = {name: kv_bytes / (ms * 1e-3) / 1e9 for name, ms in row.ms.items()}
    return row


# --------------------------------------------------------------------------- prefill


def causal_flops(num_seqs: int, query_len: int, prefix_len: int, heads: int, dim: int) -> float:
    """QK^T and PV over the visible keys only: row i sees prefix_len + i + 1 keys."""
    visible = query_len * prefix_len + query_len * (query_len + 1) / 2
    return 4.0 * num_seqs * heads * dim * visible


def bench_prefill_case(
    num_seqs: int, query_len: int, prefix_len: int, args: argparse.Namespace, timer: CudaTimer
) -> PrefillRow:
    from engine import triton_attention as ta

    seq_len = prefix_len + query_len
    row = PrefillRow(num_seqs, query_len, prefix_len,
                     causal_flops(num_seqs, query_len, prefix_len, args.heads, args.head_dim))
    kv = make_paged_kv(num_seqs, seq_len, args)
    dtype = DTYPES[args.dtype]
    q = torch.randn(num_seqs * query_len, args.heads, args.head_dim, dtype=dtype, device="cuda")
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * query_len
    scale = args.head_dim**-0.5
    row.ms["triton"] = timer(lambda: ta.prefill_attention(
        q, kv.k_cache, kv.v_cache, qsl, kv.seq_lens, kv.block_tables, scale,
        max_query_len=query_len))

    k, v = dense_kv(kv, seq_len)
    q4 = q.view(num_seqs, query_len, args.heads, args.head_dim).transpose(1, 2)
    if prefix_len == 0:
        row.ms["sdpa"] = timer(lambda: sdpa_gqa(q4, k, v, is_causal=True, scale=scale))
    else:
        try:  # queries are the last query_len positions: bottom-right aligned causal mask
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(query_len, seq_len)
            row.ms["sdpa"] = timer(lambda: sdpa_gqa(q4, k, v, attn_mask=mask, scale=scale))
        except Exception as exc:  # noqa: BLE001 - an optional baseline's failure is recorded
            row.skipped["sdpa"] = f"{type(exc).__name__}: {exc}"[:200]
    row.tflops = {name: row.flops / (ms * 1e-3) / 1e12 for name, ms in row.ms.items()}
    return row


# --------------------------------------------------------------------------- report


def peak_gbps(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((gbps for key, gbps in PEAK_GBPS if key in device_name), None)


def print_decode(rows: list[DecodeRow], peak: float | None) -> None:
    names = ["triton_auto", "triton_nosplit", "sdpa", "flashinfer"]
    print(f"\nDecode attention, GB/s of K/V read (peak {peak or '?'} GB/s)")
    print(f"{'batch':>6} {'ctx':>6} {'splits':>6} " + " ".join(f"{n:>15}" for n in names)
          + f" {'auto %peak':>10}")
    for r in rows:
        cells = [f"{r.gbps[n]:15.0f}" if n in r.gbps else f"{'-':>15}" for n in names]
        pct = f"{100 * r.gbps['triton_auto'] / peak:9.1f}%" if peak else f"{'-':>10}"
        print(f"{r.batch:>6} {r.context:>6} {r.num_splits:>6} " + " ".join(cells) + f" {pct}")


def print_prefill(rows: list[PrefillRow]) -> None:
    print("\nPrefill attention, TFLOP/s (causal FLOPs only)")
    print(f"{'seqs':>5} {'q_len':>6} {'prefix':>6} {'triton':>8} {'sdpa':>8}")
    for r in rows:
        cells = [f"{r.tflops[n]:8.1f}" if n in r.tflops else f"{'-':>8}"
                 for n in ("triton", "sdpa")]
        print(f"{r.num_seqs:>5} {r.query_len:>6} {r.prefix_len:>6} " + " ".join(cells))


def environment(peak: float | None) -> dict:
    info = {"device": torch.cuda.get_device_name(0), "peak_gbps": peak,
            "torch": torch.__version__, "date": datetime.datetime.now().isoformat()}
    import triton

    info["triton"] = triton.__version__
    try:
        import flashinfer

        info["flashinfer"] = getattr(flashinfer, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - absent or broken: either way no baseline
        info["flashinfer"] = None
    return info


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/out/attention.json", help="JSON results path")
    p.add_argument("--peak-gbps", type=float, default=None, help="override the peak table")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--prefill", type=str, nargs="+",
                   default=["1x512+0", "1x2048+0", "4x2048+0", "1x8192+0", "1x2048+6144"],
                   help="prefill cases as SEQSxQUERY_LEN+PREFIX_LEN")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    return p.parse_args()


def parse_prefill_case(text: str) -> tuple[int, int, int]:
    seqs, rest = text.split("x")
    query_len, prefix_len = rest.split("+")
    return int(seqs), int(query_len), int(prefix_len)


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: bench/attention.py times GPU kernels; nothing to do")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it, interpreter timings mean nothing")
        return 2
    peak = peak_gbps(torch.cuda.get_device_name(0), args.peak_gbps)
    timer = CudaTimer(args.warmup, args.reps)

    decode_rows, skipped = [], []
    for batch in args.batches:
        for context in args.contexts:
            row = bench_decode_case(batch, context, args, timer)
            free_memory()
            if row is None:
                skipped.append({"batch": batch, "context": context, "why": "does not fit"})
            else:
                decode_rows.append(row)
    print_decode(decode_rows, peak)
    for s in skipped:
        print(f"skipped decode batch={s['batch']} context={s['context']}: {s['why']}")

    prefill_rows = []
    for case in args.prefill:
        prefill_rows.append(bench_prefill_case(*parse_prefill_case(case), args, timer))
        free_memory()
    print_prefill(prefill_rows)

    report = {"environment": environment(peak), "config": vars(args),
              "decode": [asdict(r) for r in decode_rows], "decode_skipped": skipped,
              "prefill": [asdict(r) for r in prefill_rows]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
