"""KV-transfer bandwidth on loopback: pdserve's transports vs a memcpy and UCX's ucx_perftest.

Ships N blocks of the default model's KV layout (SmolLM2-135M: 30 layers, 3 KV heads, head
dim 64, block size 16, fp32 = 720 KiB per block) from a sender in a child process into a
receiver's pool in this process, over each transport, and in the same run measures
- a single-thread copy of the same bytes (torch copy_, one thread): the memory-bandwidth roof;
- `ucx_perftest -t tag_bw` (server + client subprocesses on 127.0.0.1) at pdserve's UCX message
  size (a run of N blocks of one layer's K or V) under the same UCX settings as each UCX
  configuration: the target is pdserve's UCX path >= 80% of it.
Transports: ucx (default UcxConfig: peer error handling, shared memory), ucx-v1 (same with
UCX's legacy protocols), ucx-fast (error handling off: CMA zero-copy), ucx-peer-plain (peer
error handling with UCX's defaults: what a plain ucxx endpoint gets, TCP only), tcp, local
(same process; run copies between two pools).

    python bench/kv_transfer.py --blocks 64 256 1024 --out bench/out/kv_transfer.json

`--tp` compares prefill TP2 -> decode TP1 with TP1 -> TP1 for the same bytes (tcp and ucx by
default): two sender processes, prefill ranks 0 and 1 holding 2 and 1 of the 3 KV heads in
pools of 2 head slots (kv_transfer/tp_plan.py), each send their heads concurrently into one
receiver expecting 2 sessions; both sides of those sessions stage (pack) the sliced heads,
except rank 0's send, which is its whole region. Time: from handing the request to the
sender processes to the receiver's report (same clock for both set-ups).

    python bench/kv_transfer.py --tp --blocks 64 256 1024 --out bench/out/kv_transfer_tp.json

Bandwidth = KV bytes / time from `sender.open` to the receiver's DONE (handshake included).
ucx_perftest sends one buffer over and over: at small N that buffer stays in cache (it can
beat the memcpy roof), while a transfer reads and writes N distinct blocks; read its small-N
figures as a ceiling, the large-N ones as the comparison.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Transparent huge pages for torch's large CPU allocations (the KV pools), read by torch's
# allocator from the environment; spawned sender processes inherit it. CMA's
# process_vm_readv pins pages one by one: 2 MiB pages measured ~2x faster than 4 KiB here.
# `--no-thp` measures without (set before torch allocates anything).
if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_layout.heads import kv_head_shard, max_local_kv_heads
from kv_transfer import (
    HeadSlice,
    KVControl,
    KVLayout,
    KVPool,
    LocalHub,
    available_transports,
    make_receiver,
    make_sender,
    plan_head_routes,
)
from kv_transfer.ucx_context import SAFE_OPTIONS, UcxConfig
from loadgen.report import write_json

LAYOUT = KVLayout("SmolLM2-135M-Instruct", torch.float32, block_size=16, num_layers=30,
                  num_kv_heads=3, head_dim=64)
UCX_CONFIGS = {
    "ucx": UcxConfig(),  # pdserve's default: peer error handling, shm allowed to serve it
    "ucx-v1": UcxConfig(options={**SAFE_OPTIONS, "PROTO_ENABLE": "n"}),  # legacy protocols
    "ucx-fast": UcxConfig(error_handling=False),  # CMA zero-copy; a peer crash aborts us
    "ucx-peer-plain": UcxConfig(options={}),  # peer error handling, UCX defaults: tcp/lo only
}


def make_pool(num_blocks: int, seed: int) -> KVPool:
    shape = (LAYOUT.num_layers, num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads,
             LAYOUT.head_dim)
    g = torch.Generator().manual_seed(seed)
    return KVPool(torch.randn(shape, generator=g), torch.randn(shape, generator=g), LAYOUT)


def rank_pool(num_blocks: int, tp: int, rank: int) -> tuple[KVPool, int]:
    """Prefill rank `rank` of a TP `tp` worker: its heads of make_pool(seed=1) in slots
    [0, owned) of a pool with max_local_kv_heads slots. Returns (pool, owned)."""
    full = make_pool(num_blocks, seed=1)
    if tp == 1:
        return full, LAYOUT.num_kv_heads
    first, owned = kv_head_shard(LAYOUT.num_kv_heads, tp, rank)
    slots = max_local_kv_heads(LAYOUT.num_kv_heads, tp)
    lay = KVLayout(LAYOUT.model_id, LAYOUT.dtype, LAYOUT.block_size, LAYOUT.num_layers, slots,
                   LAYOUT.head_dim, rank, tp)
    shape = (lay.num_layers, num_blocks, lay.block_size, slots, lay.head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    k[:, :, :, :owned] = full.k[:, :, :, first : first + owned]
    v[:, :, :, :owned] = full.v[:, :, :, first : first + owned]
    return KVPool(k, v, lay), owned


def tp_sender_main(conn, num_blocks: int, tp: int, rank: int) -> None:
    """Child process: one prefill rank; sends head slices (or whole blocks) on request."""
    pool, owned = rank_pool(num_blocks, tp, rank)
    senders = {}
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        kind, address, rid, src, dst, heads = msg
        if kind not in senders:
            senders[kind] = make_sender(kind, pool)
        try:
            senders[kind].send(address, KVControl(rid, len(src) * LAYOUT.block_size), src, dst,
                               timeout_s=120, heads=None if heads is None else HeadSlice(*heads))
            idx = torch.tensor(src)
            conn.send(("ok", float(pool.k[:, idx, :, :owned].double().sum()
                                   + pool.v[:, idx, :, :owned].double().sum())))
        except Exception as e:  # noqa: BLE001  (report it, keep serving the benchmark)
            conn.send(("error", f"{type(e).__name__}: {e}"))
    for s in senders.values():
        s.close()


def bench_tp(kinds: list[str], sizes: list[int], repeat: int, scatter: bool) -> list[dict]:
    """TP2 -> TP1 against TP1 -> TP1, same bytes, same receiver pool (see the module doc)."""
    ctx, max_n = mp.get_context("spawn"), max(sizes)
    procs, pipes = {}, {}
    for tp, rank in ((1, 0), (2, 0), (2, 1)):
        parent, child_end = ctx.Pipe()
        procs[tp, rank] = ctx.Process(target=tp_sender_main, args=(child_end, max_n, tp, rank))
        procs[tp, rank].start()
        pipes[tp, rank] = parent
    for parent in pipes.values():
        assert parent.recv() == "ready"
    rx_pool, rows = make_pool(max_n, seed=2), []
    routes = {tp: plan_head_routes(LAYOUT.num_kv_heads, tp, 1) for tp in (1, 2)}

    def once(rx, kind: str, tp: int, rid: str, src: list[int], dst: list[int]
             ) -> tuple[float, bool]:
        pending = rx.expect(rid, dst, lease_s=120, num_senders=len(routes[tp]))
        t0 = time.perf_counter()
        for rt in routes[tp]:  # TP1: whole blocks (heads=None), today's path
            heads = None if tp == 1 else (rt.src_head, rt.dst_head, rt.count)
            pipes[tp, rt.src_rank].send((kind, rx.address, rid, src, dst, heads))
        result = pending.wait(120)
        elapsed = time.perf_counter() - t0
        replies = [pipes[tp, rt.src_rank].recv() for rt in routes[tp]]
        if result is None or not result.ok or any(status != "ok" for status, _ in replies):
            raise RuntimeError(f"{rid}: {replies} / {result}")
        want = sum(value for _, value in replies)
        return elapsed, abs(checksum(rx_pool, dst) - want) < 1e-6 * max(1, abs(want))

    try:
        for kind in kinds:
            rx = make_receiver(kind, rx_pool)
            try:
                for n in sizes:
                    times: dict[int, list[float]] = {1: [], 2: []}
                    correct = {1: True, 2: True}
                    # The set-ups alternate run by run, so both see the same machine load.
                    for r in range(repeat + 1):  # the first round warms up connections
                        src, dst = block_ids(n, scatter, 1 + r), block_ids(n, scatter, 100 + r)
                        for tp in (1, 2):
                            elapsed, ok = once(rx, kind, tp, f"{kind}-tp{tp}-{n}-{r}", src,
                                               dst)
                            correct[tp] &= ok
                            if r:
                                times[tp].append(elapsed)
                    for tp in (1, 2):
                        rows.append({**row(kind, n, times[tp], correct[tp]),
                                     "setup": f"tp{tp}->tp1", "sessions": len(routes[tp])})
            finally:
                rx.close()
    finally:
        for parent in pipes.values():
            parent.send(None)
        for proc in procs.values():
            proc.join(60)
    return rows


def print_tp_table(rows: list[dict]) -> None:
    print(f"{'transport':<10} {'setup':<10} {'blocks':>6} {'MB':>8} {'best GB/s':>10} "
          f"{'median GB/s':>12} {'median ms':>10} ok")
    for r in rows:
        print(f"{r['transport']:<10} {r['setup']:<10} {r['blocks']:>6} {r['bytes'] / 1e6:>8.1f} "
              f"{r['best_gbps']:>10.2f} {r['median_gbps']:>12.2f} "
              f"{1e3 * statistics.median(r['times_s']):>10.2f} {r['correct']}")


def block_ids(n: int, scatter: bool, seed: int) -> list[int]:
    ids = list(range(n))
    if scatter:
        random.Random(seed).shuffle(ids)
    return ids


def checksum(pool: KVPool, ids: list[int]) -> float:
    idx = torch.tensor(ids)
    return float(pool.k[:, idx].double().sum() + pool.v[:, idx].double().sum())


def sender_main(conn, num_blocks: int) -> None:
    """Child process: owns the source pool and one sender per transport."""
    pool = make_pool(num_blocks, seed=1)
    senders = {}
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            break
        kind, address, rid, src, dst = msg
        if kind not in senders:
            options = {"config": UCX_CONFIGS[kind]} if kind.startswith("ucx") else {}
            senders[kind] = make_sender(kind.split("-")[0], pool, **options)
        try:
            res = senders[kind].send(address, KVControl(rid, len(src) * LAYOUT.block_size),
                                     src, dst, timeout_s=120)
            conn.send(("ok", res.elapsed_s, checksum(pool, src)))
        except Exception as e:  # noqa: BLE001  (report it, keep serving the benchmark)
            conn.send(("error", f"{type(e).__name__}: {e}", 0.0))
    for s in senders.values():
        s.close()


def bench_transport(kind: str, child, rx_pool: KVPool, sizes: list[int], repeat: int,
                    scatter: bool) -> list[dict]:
    options = {"config": UCX_CONFIGS[kind]} if kind.startswith("ucx") else {}
    rx = make_receiver(kind.split("-")[0], rx_pool, **options)
    rows = []
    try:
        for n in sizes:
            times, ok_sum = [], True
            for r in range(repeat + 1):  # the first run warms up connections / registration
                rid = f"{kind}-{n}-{r}"
                src, dst = block_ids(n, scatter, 1 + r), block_ids(n, scatter, 100 + r)
                pending = rx.expect(rid, dst, lease_s=120)
                child.send((kind, rx.address, rid, src, dst))
                status, value, src_sum = child.recv()
                result = pending.wait(10)
                if status != "ok" or result is None or not result.ok:
                    raise RuntimeError(f"{kind} N={n}: {value} / {result}")
                if r == 1:
                    ok_sum = abs(checksum(rx_pool, dst) - src_sum) < 1e-6 * max(1, abs(src_sum))
                if r:
                    times.append(value)
            rows.append(row(kind, n, times, ok_sum))
    finally:
        rx.close()
    return rows


def bench_local(sizes: list[int], repeat: int, scatter: bool, max_n: int) -> list[dict]:
    hub = LocalHub()
    src_pool, dst_pool = make_pool(max_n, 1), make_pool(max_n, 2)
    rx, tx = make_receiver("local", dst_pool, hub=hub), make_sender("local", src_pool, hub=hub)
    rows = []
    for n in sizes:
        times = []
        for r in range(repeat + 1):
            src, dst = block_ids(n, scatter, 1 + r), block_ids(n, scatter, 100 + r)
            rx.expect(f"l{n}-{r}", dst)
            res = tx.send(rx.address, KVControl(f"l{n}-{r}", n), src, dst)
            if r:
                times.append(res.elapsed_s)
        rows.append(row("local", n, times, checksum(dst_pool, dst) == checksum(src_pool, src)))
    rx.close()
    return rows


def bench_memcpy(sizes: list[int], repeat: int, max_n: int) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = make_pool(max_n, 1), make_pool(max_n, 2)
    rows = []
    for n in sizes:
        times = []
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            b.k[:, :n].copy_(a.k[:, :n])
            b.v[:, :n].copy_(a.v[:, :n])
            times.append(time.perf_counter() - t0)
        rows.append(row("memcpy (1 thread)", n, times[1:], True))
    torch.set_num_threads(threads)
    return rows


def row(name: str, n: int, times: list[float], correct: bool) -> dict:
    nbytes = n * LAYOUT.block_bytes
    return {"transport": name, "blocks": n, "bytes": nbytes, "times_s": times,
            "best_gbps": nbytes / min(times) / 1e9,
            "median_gbps": nbytes / statistics.median(times) / 1e9, "correct": correct}


def perftest_binary() -> Path | None:
    try:
        import libucx
    except ImportError:
        return None
    exe = Path(libucx.__file__).parent / "bin" / "ucx_perftest"
    return exe if exe.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_perftest(exe: Path, msg_bytes: int, iters: int, error_handling: bool,
                 options: dict[str, str]) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parents[1] / "lib"))
    env.update({f"UCX_{k}": v for k, v in options.items()})
    port = free_port()
    args = ["-t", "tag_bw", "-s", str(msg_bytes), "-n", str(iters), "-w", str(max(2, iters // 10)),
            "-p", str(port)] + (["-e"] if error_handling else [])
    server = subprocess.Popen([str(exe), "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        out = ""
        for _ in range(50):  # the server needs a moment to listen
            time.sleep(0.1)
            proc = subprocess.run([str(exe), "127.0.0.1", *args], env=env, capture_output=True,
                                  text=True, timeout=120, check=False)
            out = proc.stdout + proc.stderr
            if "Final:" in out:
                break
        m = re.search(r"Final:\s+(\d+)\s+\S+\s+\S+\s+\S+\s+(\S+)\s+(\S+)", out)
        if not m:
            return {"error": out[-500:]}
        mib_s = float(m.group(3))  # overall bandwidth, MB/s in UCX's units (2^20 bytes)
        return {"msg_bytes": msg_bytes, "iters": iters, "gbps": mib_s * (1 << 20) / 1e9,
                "error_handling": error_handling, "env": {f"UCX_{k}": v for k, v in
                                                          options.items()}}
    finally:
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transports", default=None,
                    help="default ucx,ucx-v1,ucx-fast,ucx-peer-plain,tcp,local (ucx,tcp with --tp)")
    ap.add_argument("--scatter", action="store_true",
                    help="shuffled block ids (one message per block) instead of one run")
    ap.add_argument("--no-thp", action="store_true", help="pools in 4 KiB pages")
    ap.add_argument("--tp", action="store_true",
                    help="compare TP2 -> TP1 with TP1 -> TP1 (default transports ucx,tcp)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/out/kv_transfer.json (kv_transfer_tp.json with --tp)")
    args = ap.parse_args(argv)
    sizes, max_n = sorted(args.blocks), max(args.blocks)
    if args.tp:
        main_tp(args, sizes)
        return
    args.out = args.out or Path("bench/out/kv_transfer.json")
    kinds = (args.transports or "ucx,ucx-v1,ucx-fast,ucx-peer-plain,tcp,local").split(",")
    rows: list[dict] = bench_memcpy(sizes, args.repeat, max_n)
    if "local" in kinds:  # before the child process exists: same-process copies only
        rows += bench_local(sizes, args.repeat, args.scatter, max_n)

    remote = [k for k in kinds if k != "local"]
    if remote:
        parent, child_end = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(target=sender_main, args=(child_end, max_n))
        child.start()
        assert parent.recv() == "ready"
        rx_pool = make_pool(max_n, seed=2)
        for kind in remote:
            rows += bench_transport(kind, parent, rx_pool, sizes, args.repeat, args.scatter)
        parent.send(None)
        child.join(60)
        del rx_pool

    perftest = {}
    exe = perftest_binary()
    if exe is not None and not args.scatter:
        for name in [k for k in kinds if k.startswith("ucx")]:
            cfg = UCX_CONFIGS[name]
            for n in sizes:
                msg = n * LAYOUT.region_bytes  # one run of n blocks of one layer's K or V
                iters = max(20, min(2000, (4 << 30) // msg))
                # perftest swings as much as ours on a shared box: best of as many runs
                runs = [run_perftest(exe, msg, iters, cfg.error_handling, cfg.context_options())
                        for _ in range(args.repeat)]
                good = [r for r in runs if "gbps" in r]
                best = max(good, key=lambda r: r["gbps"]) if good else runs[0]
                perftest[f"{name}/{n}"] = {**best, "gbps_runs": [r["gbps"] for r in good]}
    print_table(rows, perftest)
    write_json({
        "layout": {"model": LAYOUT.model_id, "block_bytes": LAYOUT.block_bytes,
                   "region_bytes": LAYOUT.region_bytes},
        "scatter": args.scatter, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
        "load_avg": os.getloadavg(), "machine": platform.node(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "safe_ucx_options": SAFE_OPTIONS,
        "rows": rows, "ucx_perftest": perftest}, args.out)
    print(f"wrote {args.out}")


def main_tp(args: argparse.Namespace, sizes: list[int]) -> None:
    kinds = [k for k in (args.transports or "ucx,tcp").split(",")
             if k in ("ucx", "tcp") and k in available_transports()]
    rows = bench_tp(kinds, sizes, args.repeat, args.scatter)
    print_tp_table(rows)
    out = args.out or Path("bench/out/kv_transfer_tp.json")
    write_json({
        "layout": {"model": LAYOUT.model_id, "block_bytes": LAYOUT.block_bytes,
                   "num_kv_heads": LAYOUT.num_kv_heads},
        "routes_tp2_to_tp1": [vars(r) for r in plan_head_routes(LAYOUT.num_kv_heads, 2, 1)],
        "scatter": args.scatter, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
        "load_avg": os.getloadavg(), "machine": platform.node(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}, out)
    print(f"wrote {out}")


def print_table(rows: list[dict], perftest: dict) -> None:
    print(f"{'transport':<18} {'blocks':>6} {'MB':>8} {'best GB/s':>10} {'median GB/s':>12} "
          f"{'perftest GB/s':>14} {'% of perftest':>14} ok")
    for r in rows:
        pt = perftest.get(f"{r['transport']}/{r['blocks']}", {}).get("gbps")
        pct = f"{100 * r['best_gbps'] / pt:.0f}%" if pt else "-"
        print(f"{r['transport']:<18} {r['blocks']:>6} {r['bytes'] / 1e6:>8.1f} "
              f"{r['best_gbps']:>10.2f} {r['median_gbps']:>12.2f} "
              f"{pt if pt is None else round(pt, 2)!s:>14} {pct:>14} {r['correct']}")


if __name__ == "__main__":
    main()
