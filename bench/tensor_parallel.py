"""Tensor parallelism: TP=1 vs TP=2 engine step time, and how much of it is communication.

Each TP size runs in fresh processes, one per rank (rank 0: LLMEngine, others: TPFollower),
joined by torch.distributed on 127.0.0.1. Measured on rank 0, wall time per `engine.step()`:
- prefill: one request of --prompt-len tokens (one step computes the whole prompt);
- decode: --batch-sizes requests decoding together, --decode-steps steps each.
The communication share is the time rank 0 spends inside TPGroup's collectives (all-reduce,
all-gather of the logits, the step broadcast) over the step time; waiting for a slower rank
counts as communication. Followers report their own share too.

On CPU each rank gets --threads torch threads; "tp1_same_cores" is TP=1 with as many threads
as the largest TP group uses in all, the fair baseline on a machine with few cores.

Usage: python -m bench.tensor_parallel [--model PATH] [--tp-sizes 1,2] [--device cuda
       --backend nccl] [--out bench/out/tensor_parallel.json]
On CUDA, rank r uses cuda:r (one GPU per rank) and timing synchronises the device.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.parallel import CommTimer
from loadgen.report import write_json
from pdserve_api.sampling import SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(args: argparse.Namespace, rank: int, size: int) -> EngineConfig:
    return EngineConfig(
        model=args.model, device=_device(args, rank), dtype=args.dtype, tp_rank=rank,
        tp_size=size, num_kv_blocks=args.kv_blocks, enable_prefix_caching=False,
        max_num_seqs=max(args.batch_sizes), max_model_len=2 * args.prompt_len + 64,
        max_num_batched_tokens=max(args.prompt_len, max(args.batch_sizes) * args.decode_prompt),
    )


def _device(args: argparse.Namespace, rank: int) -> str:
    return f"cuda:{rank}" if args.device == "cuda" else args.device


def _phase(engine: LLMEngine, timer: CommTimer, steps: int, sync) -> dict:
    """Time `steps` engine steps; per-step median and the communication share."""
    timer.reset()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
    total = sum(times)
    return {
        "step_ms_median": round(1e3 * statistics.median(times), 2),
        "step_ms_mean": round(1e3 * total / steps, 2),
        "comm_share": round(timer.total_s / total, 3),
        "comm_ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in timer.seconds.items()},
    }


def _measure(engine: LLMEngine, timer: CommTimer, args: argparse.Namespace, sync) -> dict:
    rng = random.Random(args.seed)
    vocab = engine.model_config.vocab_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    greedy = {"temperature": 0.0, "ignore_eos": True}
    # Warm-up, and a correctness check across TP sizes: the same greedy tokens.
    check = engine.generate([prompt(24)], SamplingParams(max_tokens=16, **greedy))[0]
    prefill = []
    for _ in range(args.iters):
        engine.add_request(prompt(args.prompt_len), SamplingParams(max_tokens=1, **greedy))
        prefill.append(_phase(engine, timer, 1, sync))
    out = {"greedy_tokens": check.new_token_ids, "prefill": {
        "prompt_len": args.prompt_len,
        "step_ms_median": statistics.median(p["step_ms_median"] for p in prefill),
        "comm_share": round(statistics.median(p["comm_share"] for p in prefill), 3),
        "comm_ms_per_step": prefill[len(prefill) // 2]["comm_ms_per_step"],
    }}
    for b in args.batch_sizes:
        ids = [engine.add_request(prompt(args.decode_prompt),
                                  SamplingParams(max_tokens=args.decode_steps + 2, **greedy))
               for _ in range(b)]
        engine.step()  # every prompt in one prefill step
        out[f"decode_batch_{b}"] = _phase(engine, timer, args.decode_steps, sync)
        for rid in ids:
            engine.abort(rid)
        engine.step()
    return out


def _allreduce_latency_us(tp, hidden: int, device: str, n: int = 100) -> float:
    """Median time of one all-reduce of a decode step's activation ([1, hidden]): the floor
    under a TP decode step's 2 * num_layers + 1 all-reduces."""
    import torch.distributed as dist

    x = torch.ones(1, hidden, device=device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        dist.all_reduce(x, group=tp.group)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(1e6 * statistics.median(times), 1)


def _rank_main(rank: int, size: int, port: int, args: argparse.Namespace, threads: int,
               out_dir: str) -> None:
    from engine.tp_engine import TPFollower, destroy_tp_group, init_tp_group

    torch.set_num_threads(threads)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = CommTimer(sync=torch.cuda.synchronize if cuda else None)
    tp = None
    if size > 1:
        tp = init_tp_group(rank, size, f"tcp://127.0.0.1:{port}", args.backend,
                           timeout_s=300, timer=timer)
    cfg = _config(args, rank, size)
    if rank == 0:
        engine = LLMEngine(cfg, tp)
        result = _measure(engine, timer, args, sync)
        engine.close()
        hidden = engine.model_config.hidden_size
        del engine
        if tp is not None:
            result["allreduce_1xhidden_us_median"] = _allreduce_latency_us(
                tp, hidden, cfg.device)
    else:
        follower = TPFollower(cfg, tp)
        timer.reset()  # followers: the whole run, start-up excluded
        t0 = time.perf_counter()
        steps = follower.serve_forever()
        busy = time.perf_counter() - t0
        result = {"steps": steps, "comm_s_by_kind": {k: round(v, 3)
                                                     for k, v in timer.seconds.items()},
                  "comm_share_of_run": round(timer.total_s / busy, 3)}
        _allreduce_latency_us(tp, follower.runner.cfg.hidden_size, cfg.device)
        del follower
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if tp is not None:
        destroy_tp_group()
        del tp
    import gc

    gc.collect()  # free the process groups before interpreter shutdown (gloo may abort there)


def run_tp(args: argparse.Namespace, size: int, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, size, port, args, threads, out_dir))
                 for r in range(size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(args.timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        codes = [p.exitcode for p in procs]
        if codes != [0] * size:
            raise SystemExit(f"TP={size}: rank exit codes {codes}")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(size)]
    return {"tp": size, "threads_per_rank": threads, **ranks[0],
            "followers": ranks[1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the cached SmolLM2-135M")
    ap.add_argument("--tp-sizes", default="1,2")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5, help="prefill steps timed")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--decode-prompt", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per TP size")
    ap.add_argument("--out", default="bench/out/tensor_parallel.json")
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    sizes = [int(s) for s in args.tp_sizes.split(",")]
    if args.device == "cuda" and max(sizes) > torch.cuda.device_count():
        raise SystemExit(f"TP={max(sizes)} needs {max(sizes)} GPUs; "
                         f"{torch.cuda.device_count()} visible")

    load_before = os.getloadavg()
    t0 = time.time()
    runs = [run_tp(args, s, args.threads) for s in sizes]
    if args.device == "cpu" and max(sizes) > 1:
        same = run_tp(args, 1, args.threads * max(sizes))
        same["label"] = "tp1_same_cores"
        runs.append(same)
    reference = runs[0]["greedy_tokens"]  # TP=1 with --threads (sizes start at 1 by default)
    for run in runs:
        run["greedy_tokens_match_first"] = run.pop("greedy_tokens") == reference
    result = {
        "machine": (torch.cuda.get_device_name() if args.device == "cuda" else
                    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"),
        "device": args.device, "backend": args.backend, "dtype": args.dtype,
        "model": str(args.model or "SmolLM2-135M-Instruct (default)"),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.time() - t0, 1),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    write_json(result, Path(args.out))


if __name__ == "__main__":
    main()
