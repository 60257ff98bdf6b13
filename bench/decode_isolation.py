"""Does a decode worker step at the engine's own speed, alone and while prefills run elsewhere?

Four measurements of the decode step at the same batch (`--batch` sequences) and context
(`--context` prompt tokens), repeated `--repeat` times back to back (medians reported, ratios
against the engine baseline of the same round):

- `engine`: the engine alone, in a Ray actor pinned to one core (the core the cluster's
  decode worker gets), stepping its decodes in a loop: the baseline.
- `engine+neighbour`: the same while a second pinned actor prefills fresh prompts without
  pause on the other core: what sharing the memory system costs, which pinning cannot remove.
- `cluster`: a 1P+1D cluster of isolated workers (`cpus_per_worker`), `--batch` streams of
  `--context`-token prompts; the decode worker's mean step (from its own step histogram) and
  the clients' median inter-token gap.
- `cluster+prefill`: the same while a client keeps the prefill worker busy with fresh
  `--context`-token prompts (max_tokens 1: their KV is still shipped to the decode worker,
  which reserves and frees it, but they never join its batch).

- `cluster+prefill/nice` (optional): `cluster+prefill` with the decode worker's engine
  thread at `--engine-nice` (a diagnosis, not a setting pdserve uses): if the step comes back
  to the baseline, what slowed it was CPU time other threads took on its core.

The engine phases also report the CPU time of each step (`time.thread_time`), which load on
the machine does not inflate the way it inflates wall time. For the cluster phases it reports
CPU per decode step of every thread of the decode worker (the engine thread by id, the rest
by Python or kernel thread name), of the router's process (this one, with the clients), of
the prefill worker and of this Ray session's own processes, and the share of its core the
engine thread got: so a cost outside the forward pass shows up by name.

    python -m bench.decode_isolation [--batch 3] [--context 480] [--tokens 40] [--repeat 3]
        [--phases engine,engine+neighbour,cluster,cluster+prefill,cluster+prefill/nice]
        [--engine-nice -10] [--transport auto] [--out bench/out/decode_isolation.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import statistics
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray

from loadgen.report import machine

TOKEN_LOW, TOKEN_HIGH = 16, 30000


class Prompts:
    """Fresh random token prompts: none shares a block with another (no prefix-cache hit)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def take(self, n: int) -> list[int]:
        return [self.rng.randrange(TOKEN_LOW, TOKEN_HIGH) for _ in range(n)]


# ---- in-process engine, pinned (Ray actors) ------------------------------------------------

class EngineProbe:
    """An engine in a process of its own, pinned to `core`, one torch thread."""

    def __init__(self, core: int, engine: dict[str, Any]):
        from engine.config import EngineConfig
        from engine.engine import LLMEngine
        from worker_host.placement import pin_process

        pin_process([core])
        self.engine = LLMEngine(EngineConfig(**engine))
        self.engine.warmup()
        self._stop = threading.Event()

    def decode_steps(self, prompts: list[list[int]], steps: int
                     ) -> tuple[list[float], list[float]]:
        """Prefill the prompts, then time `steps` decode steps of the whole batch: (wall
        seconds, CPU seconds of this thread) per step."""
        from pdserve_api.sampling import SamplingParams

        sampling = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
        ids = [self.engine.add_request(p, sampling) for p in prompts]
        while any(self.engine.requests[i].num_output_tokens == 0 for i in ids):
            self.engine.step()
        times, cpu = [], []
        for _ in range(steps):
            t, c = time.perf_counter(), time.thread_time()
            self.engine.step()
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        for i in ids:
            self.engine.abort(i)
        self.engine.block_manager.reset_prefix_cache()
        return times, cpu

    def prefill_forever(self, prompt_len: int, seed: int) -> int:
        """Prefill fresh prompts until `stop`; returns how many."""
        from pdserve_api.sampling import SamplingParams

        prompts, n = Prompts(seed), 0
        while not self._stop.is_set():
            self.engine.add_request(prompts.take(prompt_len), SamplingParams(max_tokens=1))
            while self.engine.has_unfinished():
                self.engine.step()
            self.engine.block_manager.reset_prefix_cache()
            n += 1
        self._stop.clear()
        return n

    def stop(self) -> None:
        self._stop.set()


def engine_phase(args, engine: dict[str, Any], cores: list[int], neighbour: bool,
                 prompts: Prompts) -> tuple[list[float], list[float]]:
    probe_cls = ray.remote(EngineProbe).options(num_cpus=1, max_concurrency=2)
    probe = probe_cls.remote(cores[1], engine)
    other = probe_cls.remote(cores[0], engine) if neighbour else None
    try:
        if other is not None:
            busy = other.prefill_forever.remote(args.context, prompts.rng.randrange(1 << 30))
            time.sleep(1.0)  # let it get going
        times = ray.get(probe.decode_steps.remote(
            [prompts.take(args.context) for _ in range(args.batch)], args.tokens))
        if other is not None:
            ray.get(other.stop.remote())
            ray.get(busy)
        return times
    finally:
        for a in (probe, other):
            if a is not None:
                ray.kill(a)


# ---- the cluster -----------------------------------------------------------------------------

def engine_thread(_engine: object) -> tuple[int, int, dict[int, str]]:
    """Run on a worker's engine thread: (pid, the thread's kernel id, kernel id -> name of
    every Python thread)."""
    return (os.getpid(), threading.get_native_id(),
            {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})


def renice_engine_thread(nice: int):
    """A function for a worker's `call`: give its engine thread this nice value (a diagnosis:
    negative values need CAP_SYS_NICE). Returns the value now in effect."""
    def apply(_engine: object) -> int:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    return apply


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Kernel thread id -> (name, CPU seconds so far) for every thread of a local process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_by_thread(before: dict, after: dict, engine_tid: int, per: float,
                  names: dict[int, str]) -> dict[str, float]:
    """CPU seconds / `per` each thread (grouped by name: Python's, else the kernel's) used
    in the window."""
    use: dict[str, float] = defaultdict(float)
    for tid, (name, cpu) in after.items():
        label = "engine thread" if tid == engine_tid else names.get(tid, name)
        use[label] += (cpu - before.get(tid, (name, 0.0))[1]) / per
    return dict(sorted(((k, round(v, 4)) for k, v in use.items() if v * per >= 0.005),
                       key=lambda kv: -kv[1]))


def session_pids() -> list[int]:
    """This Ray session's own processes (GCS, raylet, agents), found by session name."""
    session = ray._private.worker._global_node.session_name
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if session.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def process_cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group of processes."""
    out = {}
    for group, members in pids.items():
        out[group] = sum(cpu for pid in members
                         for _, cpu in thread_cpu(pid).values() if os.path.exists(f"/proc/{pid}"))
    return out


def step_histogram(metrics_address: str) -> tuple[float, float]:
    """(sum, count) of a worker's engine step histogram, from its /metrics."""
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read()
    total = count = 0.0
    for line in text.decode().splitlines():
        if line.startswith("pdserve:engine_step_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("pdserve:engine_step_seconds_count"):
            count = float(line.split()[-1])
    return total, count


class Stream:
    """One long request whose token messages are timestamped; `cancel()` ends it."""

    def __init__(self, client, prompt: list[int], max_tokens: int):
        from pdserve_api.messages import build_generate_request
        from pdserve_api.sampling import SamplingParams

        self.call = client.stream(build_generate_request(
            token_ids=prompt, sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                      ignore_eos=True)))
        self.arrivals: list[tuple[float, int]] = []  # (time, tokens in the message)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import grpc

        try:
            for msg in self.call:
                if msg.token_ids:
                    self.arrivals.append((time.perf_counter(), len(msg.token_ids)))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def gaps(self, t0: float, t1: float) -> list[float]:
        """Per-token gaps of messages that arrived within [t0, t1]."""
        out = []
        for (a, _), (b, n) in zip(self.arrivals, self.arrivals[1:]):
            if t0 <= a and b <= t1:
                out += [(b - a) / n] * n
        return out

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(30)


def cluster_phase(args, cluster, prompts: Prompts, with_prefill: bool) -> dict[str, Any]:
    """`--batch` long streams on the decode worker; measures `--tokens` of its steps once all
    are in its batch, then cancels them."""
    from launcher.client import GenerateClient
    from pdserve_api.messages import build_generate_request
    from pdserve_api.sampling import SamplingParams

    decode = cluster.decode["decode-0"]
    pid, engine_tid, names = ray.get(decode.call.remote(engine_thread))
    prefill_pid, _, _ = ray.get(cluster.prefill["prefill-0"].call.remote(engine_thread))
    groups = {"router+clients (this process)": [os.getpid()], "prefill worker": [prefill_pid],
              "ray system": [p for p in session_pids() if p not in (pid, prefill_pid)]}
    decode_metrics = cluster.worker_metrics[-1]  # prefill first, then decode (launcher order)
    stop = threading.Event()
    background = 0

    def keep_prefill_busy() -> None:
        nonlocal background
        with GenerateClient(cluster.address) as client:
            while not stop.is_set():
                client.generate(build_generate_request(
                    token_ids=prompts.take(args.context),
                    sampling=SamplingParams(max_tokens=1)))
                background += 1

    def stats() -> dict[str, Any]:
        return ray.get(decode.stats.remote())

    with GenerateClient(cluster.address) as client:
        streams = [Stream(client, prompts.take(args.context), 4096)
                   for _ in range(args.batch)]
        deadline = time.monotonic() + 600
        while stats()["num_running"] < args.batch:
            if time.monotonic() > deadline:
                raise RuntimeError("the batch never formed on the decode worker")
            time.sleep(0.1)
        loader = threading.Thread(target=keep_prefill_busy, daemon=True)
        if with_prefill:
            loader.start()
            time.sleep(2.0)  # the prefill worker busy before the window opens
        first = stats()["steps"]
        h0, cpu0, t0 = step_histogram(decode_metrics), thread_cpu(pid), time.perf_counter()
        other0 = process_cpu(groups)
        while stats()["steps"] < first + args.tokens:
            time.sleep(0.1)
        h1, cpu1, t1 = step_histogram(decode_metrics), thread_cpu(pid), time.perf_counter()
        other1 = process_cpu(groups)
        stop.set()
        for s in streams:
            s.cancel()
        if with_prefill:
            loader.join()
    steps = h1[1] - h0[1]
    gaps = [g for s in streams for g in s.gaps(t0, t1)]
    per_step = steps / 1e3  # CPU seconds / per_step = CPU ms per decode step
    return {"mean_step_ms": 1e3 * (h1[0] - h0[0]) / steps if steps else None,
            "steps": steps, "itl_p50_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "background_prefills": background,
            "decode_core_share": cpu_by_thread(cpu0, cpu1, engine_tid, t1 - t0, names),
            "cpu_ms_per_step": {
                **{f"decode: {k}": v for k, v in
                   cpu_by_thread(cpu0, cpu1, engine_tid, per_step, names).items()},
                **{k: round((other1[k] - other0[k]) / per_step, 1) for k in groups}}}


# ---- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=3, help="decoding sequences")
    ap.add_argument("--context", type=int, default=480, help="prompt tokens of each")
    ap.add_argument("--tokens", type=int, default=40, help="decode steps measured")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transport", default="auto")
    ap.add_argument("--phases", default="engine,engine+neighbour,cluster,cluster+prefill")
    ap.add_argument("--engine-nice", type=int, default=-10,
                    help="diagnosis, phases ending /nice (e.g. cluster+prefill/nice): the "
                         "decode worker's engine thread at this nice value (negative needs "
                         "CAP_SYS_NICE), to see whether CPU taken by other threads and "
                         "processes on its core is what slows it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/decode_isolation.json")
    args = ap.parse_args(argv)
    phases = args.phases.split(",")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from engine.default_model import resolve_model
    from launcher.cluster import LocalCluster
    from launcher.cluster_config import ClusterConfig
    from router.server import RouterConfig
    from worker_host.placement import assign_cores

    model = str(resolve_model(args.model))
    cores = [c[0] for c in assign_cores(["prefill-0", "decode-0"], 1).values()]
    engine = {"model": model, "max_num_seqs": 16}
    prompts = Prompts(args.seed)
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"UCX_WARN_UNUSED_ENV_VARS": "n"}})
    rounds: list[dict[str, Any]] = []
    try:
        cluster = None
        if any(p.startswith("cluster") for p in phases):
            cluster = LocalCluster(ClusterConfig(
                model=model, start_redis=False, cpus_per_worker=1, transport=args.transport,
                engine={"max_num_seqs": 16}, http_port=None,
                # a loaded box may queue a prefill longer than the default reservation life
                router=RouterConfig(kv_timeout_s=600.0)))
            cluster.start()
        for r in range(args.repeat):
            row: dict[str, Any] = {}
            for phase in phases:
                if phase.startswith("engine"):
                    times, cpu = engine_phase(args, engine, cores,
                                              phase == "engine+neighbour", prompts)
                    row[phase] = {"median_step_ms": 1e3 * statistics.median(times),
                                  "median_step_cpu_ms": 1e3 * statistics.median(cpu)}
                else:
                    # "<phase>/nice": the same with the engine thread at --engine-nice
                    decode = cluster.decode["decode-0"]
                    if phase.endswith("/nice"):
                        ray.get(decode.call.remote(renice_engine_thread(args.engine_nice)))
                    row[phase] = cluster_phase(args, cluster, prompts,
                                               phase.startswith("cluster+prefill"))
                    ray.get(decode.call.remote(renice_engine_thread(0)))
                print(f"round {r} {phase}: {json.dumps(row[phase])}", file=sys.stderr)
            rounds.append(row)
        if cluster is not None:
            cluster.stop()
    finally:
        ray.shutdown()

    def med(phase: str, key: str) -> float | None:
        vals = [row[phase][key] for row in rounds if row[phase].get(key) is not None]
        return statistics.median(vals) if vals else None

    base = "engine" if "engine" in phases else None
    summary: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "load_avg_at_end": os.getloadavg(),
        "command": "python -m bench.decode_isolation " + " ".join(argv or sys.argv[1:]),
        "batch": args.batch, "context": args.context, "engine_nice": args.engine_nice,
        "rounds": rounds, "medians": {}}
    print(f"\ndecode step, batch {args.batch} x {args.context} tokens; medians of "
          f"{args.repeat} rounds (ratio: / engine baseline, per round, then median)")
    for phase in phases:
        key = "median_step_ms" if phase.startswith("engine") else "mean_step_ms"
        value = med(phase, key)
        ratio = (statistics.median(row[phase][key] / row[base]["median_step_ms"]
                                   for row in rounds)
                 if base and value is not None else None)
        extra = (f"  client ITL p50 {med(phase, 'itl_p50_ms'):.1f} ms"
                 if phase.startswith("cluster") else "")
        summary["medians"][phase] = {"step_ms": value, "ratio_vs_engine": ratio}
        print(f"{phase:>18}: step {value:7.1f} ms" +
              (f"  ({ratio:.2f}x engine)" if ratio else "") + extra)
    for phase in phases:
        if phase.startswith("cluster"):
            print(f"{phase}: CPU ms per decode step (last round): "
                  f"{rounds[-1][phase]['cpu_ms_per_step']}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
