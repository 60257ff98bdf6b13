"""Block accounting under random load, and the hash chain's exact-prefix guarantee."""

from __future__ import annotations

import random

from engine.block_manager import BlockManager, BlockRemoved, BlockStored
from engine.hashing import chain_hashes, hash_block
from engine.request import Request
from engine.scheduler import Scheduler
from pdserve_api.sampling import SamplingParams


def test_thousands_of_random_requests_with_aborts_leave_nothing_referenced():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=48,
                      long_prefill_token_threshold=20)
    prefixes = [[rng.randrange(100) for _ in range(rng.randint(4, 24))] for _ in range(5)]
    live: dict[str, Request] = {}
    finished = 0
    for i in range(3000):
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randint(1, 20))]
            req = Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 12)))
            live[req.request_id] = req
            sched.add(req)
        out = sched.schedule()
        for req in out.requests:  # stand-in for the model: compute, then "sample" a token
            req.num_computed_tokens += out.num_scheduled_tokens[req.request_id]
            bm.cache_computed_blocks(req)
            if req.num_computed_tokens == req.num_tokens:
                req.token_ids.append(rng.randrange(100))
                if req.num_output_tokens >= req.sampling.max_tokens:
                    sched.finish(req, req.status.FINISHED_LENGTH)
                    del live[req.request_id]
                    finished += 1
        if live and rng.random() < 0.1:  # abort anything, anywhere
            victim = live.pop(rng.choice(list(live)))
            sched.finish(victim, victim.status.FINISHED_ABORTED)
        bm.check_integrity(list(live.values()))
    for req in list(live.values()):
        sched.finish(req, req.status.FINISHED_ABORTED)
    bm.check_integrity([])
    assert bm.num_free_blocks == 64
    assert finished > 300
    assert len(set(bm.free_list)) == 64


def test_hash_chain_reuses_a_block_only_with_its_exact_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    assert bm.allocate_slots(a, 9) == []
    a.num_computed_tokens = 9
    bm.cache_computed_blocks(a)
    bm.free(a)
    # Same second block, different first block: no hit at all.
    b = Request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    assert bm.find_cached_prefix(b) == []
    # Same first block only.
    c = Request("c", [1, 2, 3, 4, 5, 6, 7, 0, 9], SamplingParams())
    assert len(bm.find_cached_prefix(c)) == 1
    d = Request("d", [1, 2, 3, 4, 5, 6, 7, 8, 10, 11], SamplingParams())
    assert len(bm.find_cached_prefix(d)) == 2
    # The hash alone is not trusted: corrupt a stored block's tokens and the hit is refused.
    bm.blocks[bm.cached[chain_hashes([1, 2, 3, 4], 4)[0]]].token_ids = (9, 9, 9, 9)
    assert bm.find_cached_prefix(d) == []


def test_eviction_is_least_recently_freed_and_emits_events():
    bm = BlockManager(num_blocks=4, block_size=2)
    reqs = []
    for i, toks in enumerate(([1, 2, 3], [4, 5, 6])):
        r = Request(str(i), toks, SamplingParams())
        bm.allocate_slots(r, 3)
        r.num_computed_tokens = 3
        bm.cache_computed_blocks(r)
        reqs.append(r)
    stored = [e for e in bm.drain_events() if isinstance(e, BlockStored)]
    assert [e.block_hashes for e in stored] == [(hash_block(0, [1, 2]),), (hash_block(0, [4, 5]),)]
    bm.free(reqs[0])
    bm.free(reqs[1])
    # Free order is tail before head within a request, requests in the order freed:
    # [tail0, head0=[1,2], tail1, head1=[4,5]]. Two blocks evict the older cached one only.
    r = Request("x", [7, 7, 7], SamplingParams())
    bm.allocate_slots(r, 3)
    assert bm.drain_events() == [BlockRemoved((hash_block(0, [1, 2]),))]
    # [4, 5] survives and is still revivable by a request with that prefix.
    assert len(bm.find_cached_prefix(Request("z", [4, 5, 9], SamplingParams()))) == 1
    r2 = Request("y", [8, 8, 8], SamplingParams())
    bm.allocate_slots(r2, 3)  # takes tail1 then head1: [4, 5] evicted last
    assert bm.drain_events() == [BlockRemoved((hash_block(0, [4, 5]),))]
    bm.check_integrity([r, r2])


def test_no_fit_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    r = Request("r", list(range(12)), SamplingParams())
    assert bm.allocate_slots(r, 12) is None
    assert r.block_table == [] and bm.num_free_blocks == 2
    bm.check_integrity([])
