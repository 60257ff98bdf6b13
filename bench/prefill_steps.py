"""Prefill engine-thread time per step while KV transfers complete: does a transfer's tail
(waiting for the decode side's acknowledgement) hold up the next prefill step?

A real PrefillWorker (the Ray actor's class, run in this process without Ray) prefills N
prompts of the default model (SmolLM2-135M) and ships their KV over a real transport into a
receiver in this process, standing in for the decode worker. `--ack-delay-ms` makes the
receiver's owner take that long to take each result (its callback runs before the receiver
acknowledges), like a decode side that is busy or a network round trip away. The engine's
`step` is timed from outside: for each step, its compute time, and the engine thread's time
between the end of a step and the start of the next (output handling, where a transfer's tail
ran when it was completed on the engine thread).

    python -m bench.prefill_steps --transport ucx --requests 24 --prompt-len 64 \
        --ack-delay-ms 0 20

The same script runs against an older checkout (PYTHONPATH) for a before/after pair.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.default_model import resolve_model
from kv_transfer import KVPool, make_receiver
from loadgen.report import write_json
from prefill_worker.worker import PrefillWorker
from worker_host.spec import WorkerSpec


def timed_steps(worker: PrefillWorker, log: list[tuple[float, float, int]]) -> None:
    """Record (start, end, outputs) of every engine step."""
    step = worker.engine.step

    def timed():
        start = time.perf_counter()
        outputs = step()
        log.append((start, time.perf_counter(), len(outputs)))
        return outputs
    worker.engine.step = timed


async def run(worker: PrefillWorker, rx, rx_pool: KVPool, n: int, prompt_len: int,
              ack_delay_s: float) -> list[dict]:
    blocks = -(-prompt_len // worker.engine.config.block_size)

    def on_done(_result) -> None:
        if ack_delay_s:
            time.sleep(ack_delay_s)

    async def one(i: int) -> dict:
        rid = f"r{ack_delay_s}-{i}"
        dst = list(range(i * blocks, (i + 1) * blocks))
        rx.expect(rid, dst, on_done, 120.0)  # positional: the same call before and after
        prompt = [(7 * i + j) % 20000 + 100 for j in range(prompt_len)]
        return await worker.prefill(rid, prompt, {"max_tokens": 8}, [rx.address], dst)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return list(results)


def summary(log: list[tuple[float, float, int]]) -> dict:
    busy = [(s, e, k) for s, e, k in log if e - s > 1e-3]  # steps that ran a forward pass
    compute = [e - s for s, e, _ in busy]
    gaps = [log[i + 1][0] - log[i][1] for i in range(len(log) - 1) if log[i][2]]
    return {"steps": len(busy), "compute_ms_median": 1e3 * statistics.median(compute),
            "gap_after_output_ms_median": 1e3 * statistics.median(gaps),
            "gap_after_output_ms_max": 1e3 * max(gaps),
            "gap_after_output_ms_total": 1e3 * sum(gaps)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="ucx")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batch-prompts", type=int, default=1, help="prompts per prefill step")
    ap.add_argument("--ack-delay-ms", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/prefill_steps.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = resolve_model(None)
    spec = WorkerSpec("prefill-bench", str(model), model.name, transport=args.transport,
                      engine={"max_num_batched_tokens": args.batch_prompts * args.prompt_len})
    worker = PrefillWorker(spec)
    blocks = -(-args.prompt_len // worker.engine.config.block_size)
    k = torch.zeros((worker.pool.k.shape[0], args.requests * blocks, *worker.pool.k.shape[2:]))
    rx_pool = KVPool(k, torch.zeros_like(k), worker.pool.layout)
    rx = make_receiver(args.transport, rx_pool)
    rows = []
    try:
        asyncio.run(run(worker, rx, rx_pool, 2, args.prompt_len, 0.0))  # warm-up
        for ack in args.ack_delay_ms:
            log: list[tuple[float, float, int]] = []
            timed_steps(worker, log)
            worker.engine.block_manager.reset_prefix_cache()
            t0 = time.perf_counter()
            results = asyncio.run(run(worker, rx, rx_pool, args.requests, args.prompt_len,
                                      ack / 1e3))
            wall = time.perf_counter() - t0
            errors = [r["error"] for r in results if r.get("error")]
            row = {"ack_delay_ms": ack, "wall_s": wall, "errors": errors[:3],
                   "transfer_ms_median": 1e3 * statistics.median(r["transfer_s"]
                                                                 for r in results),
                   **summary(log)}
            rows.append(row)
            del worker.engine.step  # the class method again
            print(f"ack {ack:5.1f} ms: wall {wall:6.2f} s, {row['steps']} steps, compute "
                  f"median {row['compute_ms_median']:.1f} ms, engine-thread gap after an "
                  f"output step median {row['gap_after_output_ms_median']:.2f} ms / max "
                  f"{row['gap_after_output_ms_max']:.1f} ms / total "
                  f"{row['gap_after_output_ms_total']:.0f} ms, transfer tail median "
                  f"{row['transfer_ms_median']:.1f} ms, errors {len(errors)}")
    finally:
        rx.close()
        worker.shutdown()
    write_json({"transport": args.transport, "requests": args.requests,
                "prompt_len": args.prompt_len, "model": model.name,
                "machine": platform.node(), "cpus": os.cpu_count(),
                "load_avg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "rows": rows}, args.out)


if __name__ == "__main__":
    main()
