"""Tensor parallelism on CPU with gloo, in real processes joined on 127.0.0.1.

TP=2 (rank 0: LLMEngine, rank 1: TPFollower) against TP=1 on tiny checkpoints of every family
plus the head layouts only TP cares about (one KV head replicated on both ranks; 3 KV heads
split 2 + 1): prompt logits within 1e-4 and identical greedy tokens through chunked prefill,
prefix-cache hits and a copy-on-write full-prompt hit. A rank that raises, dies or hangs makes
rank 0 fail with TPError instead of hanging; each rank loads only its slices.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_engine_vs_hf import GREEDY, random_prompts
from tiny_models import FAMILIES, TP_HEAD_LAYOUTS, make_tiny_checkpoint

from engine.config import EngineConfig
from engine.engine import LLMEngine
from pdserve_api.sampling import SamplingParams

CASES = [*FAMILIES, *TP_HEAD_LAYOUTS]
JOIN_TIMEOUT_S = 120  # a hang fails the test instead of blocking the run


def engine_config(path: Path, rank: int = 0, size: int = 1, **kw) -> EngineConfig:
    # Small chunks (32 tokens) and a 64-token step budget: long prompts are chunked and mixed
    # with decodes of others.
    kw = {"num_kv_blocks": 64, "max_num_batched_tokens": 64, "long_prefill_token_threshold": 32,
          **kw}
    return EngineConfig(model=str(path), tp_rank=rank, tp_size=size, **kw)


def scenario(engine: LLMEngine) -> dict:
    """The same operations on any engine; returns what TP=1 and TP=2 must agree on."""
    sp = SamplingParams(max_tokens=12, **GREEDY)
    # 1. Prompt logits of three short prompts in one batched step.
    for p in random_prompts(3, 320, seed=11, lo=3, hi=20):
        engine.add_request(p, SamplingParams(max_tokens=1, **GREEDY))
    sched = engine.scheduler.schedule()
    assert len(sched.requests) == 3
    logits, _ = engine.runner.execute(sched, all_logits=True)
    for req in sched.requests:
        engine.abort(req.request_id)
    engine.step()
    # 2. Mixed lengths: the 45- and 70-token prompts are prefilled in chunks.
    prompts = [p[:n] for p, n in zip(random_prompts(4, 320, seed=12, lo=70, hi=70),
                                      (5, 45, 70, 17))]
    tokens = [o.new_token_ids for o in engine.generate(prompts, sp)]
    # 3. A prefix-cache hit: 40 shared tokens = 2 cached blocks.
    hit = engine.generate([prompts[2][:40] + [7, 8, 9]], sp)[0]
    # 4. A full-prompt hit while the first request still holds its blocks: the last block is
    # copied (CoW) and its last token recomputed.
    full = prompts[1][:32]
    holder = engine.add_request(full, SamplingParams(max_tokens=100, **GREEDY))
    for _ in range(3):
        engine.step()
    cow = engine.generate([full], sp)[0]
    engine.abort(holder)
    engine.step()
    engine.check_integrity()
    return {"logits": logits, "tokens": tokens + [hit.new_token_ids, cow.new_token_ids],
            "cached": [hit.num_cached_tokens, cow.num_cached_tokens]}


# ---- the ranks (spawned processes) ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fault_hook(fault: str | None, at_step: int = 2):
    """A follower kv_layer_hook that misbehaves at one step: raise, die or hang."""
    if fault is None:
        return None
    steps = iter(range(10**9))

    def hook(inputs) -> None:  # returns no per-layer callback
        if next(steps) != at_step:
            return
        if fault == "raise":
            raise RuntimeError("injected follower failure")
        if fault == "exit":
            os._exit(17)
        if fault == "hang":
            time.sleep(60)

    return hook


def _record_step(log: list[dict], ids, sampled) -> Callable[[int], None]:
    """A kv_layer_hook's record of one step: its requests and the layers reported."""
    log.append({"ids": sorted(ids), "sampled": sorted(sampled), "layers": []})
    return log[-1]["layers"].append


def _rank0_recorder(log: list[dict]):
    def hook(sched):
        n_of = sched.num_scheduled_tokens
        return _record_step(log, [r.request_id for r in sched.requests],
                            [r.request_id for r in sched.requests
                             if r.num_computed_tokens + n_of[r.request_id] == r.num_tokens])
    return hook


def _follower_recorder(log: list[dict]):
    return lambda inputs: _record_step(log, inputs.request_ids, inputs.sampled_request_ids)


def _rank_main(rank: int, size: int, port: int, paths: dict[str, str], out: str,
               fault: str | None, timeout_s: float) -> None:
    from engine.tp_engine import TPError, TPFollower, destroy_tp_group, init_tp_group

    torch.set_num_threads(1)
    out_dir = Path(out)
    if fault == "late_rank0" and rank == 0:
        time.sleep(2 * timeout_s)  # longer than the collectives' timeout
    try:
        tp = init_tp_group(rank, size, f"tcp://127.0.0.1:{port}", timeout_s=timeout_s)
        for name, path in paths.items():
            blocks = 32 if fault == "pool_mismatch" and rank == 1 else 64
            cfg = engine_config(Path(path), rank, size, num_kv_blocks=blocks)
            hooks: list[dict] = []
            if rank == 0:
                engine = LLMEngine(cfg, tp)
                engine.kv_layer_hook = _rank0_recorder(hooks)
                start = time.monotonic()
                try:
                    result = scenario(engine)
                except TPError as e:
                    (out_dir / "rank0.tperror").write_text(
                        f"{time.monotonic() - start:.2f}\n{e}")
                    break
                engine.close()
                torch.save({**result, "hooks": hooks}, out_dir / f"{name}.pt")
                del engine
            else:
                hook = _fault_hook(fault) or _follower_recorder(hooks)
                TPFollower(cfg, tp, hook).serve_forever()
                (out_dir / f"{name}.rank{rank}.hooks.json").write_text(json.dumps(hooks))
        destroy_tp_group()
        # Free the process groups now: left to interpreter shutdown, gloo can abort the process
        # ("terminate called without an active exception").
        del tp
        gc.collect()
    except BaseException as e:  # noqa: BLE001 - any failure: reported, then the exit code
        (out_dir / f"rank{rank}.error").write_text(f"{type(e).__name__}: {e}\n"
                                                   + traceback.format_exc())
        # Exit at once, as a serving rank does on a fatal TPError: interpreter teardown with
        # gloo's threads still around can abort (-6) and hide the error's exit code.
        destroy_tp_group()
        os._exit(1)


def run_ranks(paths: dict[str, Path], out: Path, fault: str | None = None,
              timeout_s: float = 20.0, size: int = 2) -> list[int | None]:
    """Spawn `size` ranks, wait (bounded) for all; returns their exit codes."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(r, size, port, {k: str(v) for k, v in paths.items()}, str(out),
                               fault, timeout_s))
             for r in range(size)]
    for p in procs:
        p.start()
    # Rank 0 within the deadline; then the others get a short grace (a hung follower is
    # killed once rank 0 has given up on it).
    procs[0].join(JOIN_TIMEOUT_S)
    for p in procs[1:]:
        p.join(5)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return codes


# ---- TP=2 equals TP=1 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_checkpoints(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_tiny")
    extra = {name: make_tiny_checkpoint(fam, root / name, seed=100 + i, **overrides)
             for i, (name, (fam, overrides)) in enumerate(TP_HEAD_LAYOUTS.items())}
    return {**tiny_checkpoints, **extra}


@pytest.fixture(scope="module")
def tp2_results(tp_checkpoints, tmp_path_factory) -> dict[str, dict]:
    """One TP=2 group (two processes) runs the scenario on every case; TP=1 runs here."""
    out = tmp_path_factory.mktemp("tp2_out")
    codes = run_ranks({c: tp_checkpoints[c] for c in CASES}, out)
    errors = {p.name: p.read_text() for p in out.glob("rank*.error")}
    assert codes == [0, 0] and not errors, f"exit codes {codes}, errors {errors}"
    return {c: {**torch.load(out / f"{c}.pt"),
                "follower_hooks": json.loads((out / f"{c}.rank1.hooks.json").read_text())}
            for c in CASES}


@pytest.mark.parametrize("case", CASES)
def test_tp2_logits_and_greedy_tokens_equal_tp1(tp_checkpoints, tp2_results, case):
    tp2 = tp2_results[case]
    torch.set_num_threads(1)
    tp1 = scenario(LLMEngine(engine_config(tp_checkpoints[case])))
    torch.testing.assert_close(tp2["logits"], tp1["logits"], atol=1e-4, rtol=0)
    assert tp2["cached"] == tp1["cached"] == [32, 31]  # the prefix and full-prompt hits
    assert tp2["tokens"] == tp1["tokens"]


def test_follower_layer_hook_sees_every_step_and_layer(tp2_results):
    """A follower's kv_layer_hook gets each step's requests (and which ones finish their
    known tokens) and is called once per layer, in order, as on rank 0."""
    res = tp2_results["llama"]
    rank0, follower = res["hooks"], res["follower_hooks"]
    # The scenario's first step runs the runner directly (all logits): no rank-0 hook there.
    assert len(follower) == len(rank0) + 1 and follower[0]["sampled"] == follower[0]["ids"]
    assert follower[1:] == rank0
    assert all(step["layers"] == [0, 1] for step in follower)
    assert any(len(step["sampled"]) < len(step["ids"]) for step in rank0)  # chunked steps


# ---- failures fail rank 0 instead of hanging ------------------------------------------------


@pytest.mark.parametrize("fault", ["raise", "exit", "hang"])
def test_failed_follower_fails_rank0_with_tperror(tiny_llama, tmp_path, fault):
    start = time.monotonic()
    codes = run_ranks({"llama": tiny_llama}, tmp_path, fault=fault, timeout_s=3.0)
    elapsed = time.monotonic() - start
    err = (tmp_path / "rank0.tperror").read_text()
    took, message = err.split("\n", 1)
    assert "tensor-parallel rank 0 of 2" in message and "torn down" in message
    assert float(took) < 10  # the gloo timeout (3 s) at most, not a hang
    assert codes[0] == 0
    if fault == "exit":
        assert codes[1] == 17
    elif fault == "raise":  # the follower itself reports the failure and exits non-zero
        assert codes[1] != 0
        assert "injected follower failure" in (tmp_path / "rank1.error").read_text()
    assert elapsed < 60


def test_a_rank_joining_later_than_the_collective_timeout_still_forms_the_group(
        tiny_llama, tmp_path):
    """Ranks start at different times (a slow import on a busy machine, an actor scheduled
    late): joining waits for them, however short the collectives' timeout."""
    codes = run_ranks({"llama": tiny_llama}, tmp_path, fault="late_rank0", timeout_s=2.0)
    errors = {p.name: p.read_text() for p in tmp_path.glob("rank*.error")}
    assert codes == [0, 0] and not errors, (codes, errors)
    assert (tmp_path / "llama.pt").exists()


def test_mismatched_kv_pools_fail_at_start(tiny_llama, tmp_path):
    codes = run_ranks({"llama": tiny_llama}, tmp_path, fault="pool_mismatch", timeout_s=10.0)
    assert codes == [1, 1]
    for r in (0, 1):
        assert "disagree on the KV pool size" in (tmp_path / f"rank{r}.error").read_text()


# ---- sharded loading (in process: loading needs no communication) ---------------------------


@pytest.mark.parametrize("case", ["qwen2", "llama_gqa_kv1", "llama_kv3_uneven"])
def test_each_rank_loads_only_its_slices(tp_checkpoints, monkeypatch, case):
    """Rank r's parameters are its slices of the checkpoint (together the ranks' shards
    rebuild every tensor), and loading reads no more elements than the rank holds."""
    from safetensors.torch import load_file

    from engine import loader
    from engine.attention import TorchAttentionBackend
    from engine.config import ModelConfig
    from engine.model import LlamaModel
    from engine.parallel import TPGroup

    path = tp_checkpoints[case]
    cfg = ModelConfig.from_dir(path)
    full = load_file(str(path / "model.safetensors"))
    read: list[torch.Tensor] = []
    orig = loader._DtypeSlice.__getitem__
    monkeypatch.setattr(loader._DtypeSlice, "__getitem__",
                        lambda self, idx: read.append(orig(self, idx)) or read[-1])
    models = []
    for r in range(2):
        read.clear()
        model = LlamaModel(cfg, TorchAttentionBackend(), TPGroup(r, 2))
        loader.load_weights(model, path, torch.float32)
        assert sum(t.numel() for t in read) <= sum(p.numel() for p in model.parameters())
        models.append(model)
    expected_kv = {"llama_gqa_kv1": [(0, 1), (0, 1)], "llama_kv3_uneven": [(0, 2), (2, 1)],
                   "qwen2": [(0, 1), (1, 1)]}[case]
    assert [m.kv_head_shard for m in models] == expected_kv
    d = cfg.head_dim

    def whole(name: str, parts: list[torch.Tensor], dim: int = 0) -> None:
        torch.testing.assert_close(torch.cat(parts, dim), full[name], rtol=0, atol=0)

    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}."
        qkv = [m.layers[i].self_attn.qkv_proj for m in models]
        split = [m.weight.split([m.q_size, m.kv_size, m.kv_size]) for m in qkv]
        whole(hf + "self_attn.q_proj.weight", [q for q, _, _ in split])
        for m, (_, k, v) in zip(qkv, split):
            rows = slice(m.kv_first * d, (m.kv_first + m.local_kv_heads) * d)
            torch.testing.assert_close(k, full[hf + "self_attn.k_proj.weight"][rows])
            torch.testing.assert_close(v, full[hf + "self_attn.v_proj.weight"][rows])
        whole(hf + "self_attn.o_proj.weight",
              [m.layers[i].self_attn.o_proj.weight for m in models], dim=1)
        whole(hf + "mlp.down_proj.weight", [m.layers[i].mlp.down_proj.weight for m in models],
              dim=1)
        gate_up = [m.layers[i].mlp.gate_up_proj.weight.chunk(2) for m in models]
        whole(hf + "mlp.gate_proj.weight", [g for g, _ in gate_up])
        whole(hf + "mlp.up_proj.weight", [u for _, u in gate_up])
    emb = torch.cat([m.embed_tokens.weight for m in models])[: cfg.vocab_size]
    torch.testing.assert_close(emb, full["model.embed_tokens.weight"], rtol=0, atol=0)
