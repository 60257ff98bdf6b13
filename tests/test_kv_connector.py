"""The per-role KV connectors over real transports: a request's blocks arrive byte-equal, the
completion runs off the caller's (engine) thread, TP ranks' parts merge, and the reservation
is a lease the prefill side renews (alive while the prefill makes progress, freed one lease
after it goes silent, with an error that says so)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kv_layout.heads import kv_head_shard, max_local_kv_heads
from kv_transfer import (
    KVControl,
    KVLayout,
    KVPool,
    LocalHub,
    TransferResult,
    available_transports,
    make_receiver,
    make_sender,
)
from kv_transfer.decode_connector import DecodeConnector, PartReport
from kv_transfer.prefill_connector import PrefillConnector, ShipResult

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = [t for t in ("ucx", "tcp", "local") if t in available_transports()]
SOCKET_TRANSPORTS = [t for t in TRANSPORTS if t != "local"]


def pool(num_heads: int = 3, num_layers: int = 4, num_blocks: int = 16, seed: int = 0,
         tp_rank: int = 0, tp_size: int = 1) -> KVPool:
    lay = KVLayout("tiny", torch.float32, 4, num_layers, num_heads, 8, tp_rank, tp_size)
    shape = (num_layers, num_blocks, 4, num_heads, 8)
    g = torch.Generator().manual_seed(seed)
    return KVPool(torch.randn(shape, generator=g), torch.randn(shape, generator=g), lay)


class Outcome:
    """Collects one callback's value and the thread it ran on."""

    def __init__(self) -> None:
        self.value = None
        self.thread: threading.Thread | None = None
        self.event = threading.Event()

    def __call__(self, value) -> None:
        self.value, self.thread = value, threading.current_thread()
        self.event.set()

    def wait(self, timeout: float = 20.0):
        assert self.event.wait(timeout), "no report"
        return self.value


def ship(kv: PrefillConnector, rid: str, src: list[int], num_layers: int, control: KVControl
         ) -> Outcome:
    """What an engine step does: open, one callback per layer, then finish."""
    on_layer = kv.begin_step([(rid, src)])
    assert on_layer is not None
    for layer in range(num_layers):
        on_layer(layer)
    done = Outcome()
    kv.finish(rid, control, done)
    return done


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_blocks_arrive_byte_equal_and_completion_runs_off_the_callers_thread(kind):
    src_pool, dst_pool = pool(seed=1), pool(seed=2)
    hub = LocalHub()
    decode = DecodeConnector(make_receiver(kind, dst_pool, hub=hub), num_kv_heads=3)
    prefill = PrefillConnector(make_sender(kind, src_pool, hub=hub), num_kv_heads=3)
    try:
        src, dst = [3, 4, 5, 9], [12, 0, 1, 7]
        landed = Outcome()
        decode.expect("r1", dst, decode.senders(1)[0], landed)
        prefill.plan("r1", [decode.address], dst)
        assert prefill.planned() == ["r1"]
        shipped = ship(prefill, "r1", src, 4, KVControl("r1", 16, (42,))).wait()
        assert isinstance(shipped, ShipResult) and shipped.error is None
        assert shipped.num_bytes == 2 * 4 * 4 * dst_pool.layout.region_bytes
        result = landed.wait()
        assert result.ok and result.control == KVControl("r1", 16, (42,))
        assert torch.equal(dst_pool.k[:, dst], src_pool.k[:, src])
        assert torch.equal(dst_pool.v[:, dst], src_pool.v[:, src])
        assert prefill.planned() == []  # reported once, then forgotten
    finally:
        prefill.close()
        prefill.sender.close()
        decode.close()


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_tp2_prefill_ranks_fill_a_tp1_decode_worker_through_their_connectors(kind):
    full = pool(num_heads=3, seed=5)
    ranks = []
    for rank in (0, 1):
        first, owned = kv_head_shard(3, 2, rank)
        p = pool(num_heads=max_local_kv_heads(3, 2), seed=9, tp_rank=rank, tp_size=2)
        p.k[:, :, :, :owned] = full.k[:, :, :, first : first + owned]
        p.v[:, :, :, :owned] = full.v[:, :, :, first : first + owned]
        ranks.append(PrefillConnector(make_sender(kind, p), 3, tp_size=2, tp_rank=rank))
    dst_pool = pool(num_heads=3, seed=6)
    decode = DecodeConnector(make_receiver(kind, dst_pool), num_kv_heads=3)
    try:
        src, dst = [0, 1, 2, 8, 9], [5, 6, 7, 1, 3]
        landed = Outcome()
        decode.expect("tp", dst, decode.senders(2)[0], landed)
        assert decode.senders(2) == [2]
        for kv in ranks:
            kv.plan("tp", [decode.address], dst)
        reports = [ship(kv, "tp", src, 4, KVControl("tp", 20, (7,) if i == 0 else ()))
                   for i, kv in enumerate(ranks)]
        assert [r.wait().error for r in reports] == [None, None]
        result = landed.wait()
        assert result.ok and result.control == KVControl("tp", 20, (7,))
        assert torch.equal(dst_pool.k[:, dst], full.k[:, src])
        assert torch.equal(dst_pool.v[:, dst], full.v[:, src])
    finally:
        for kv in ranks:
            kv.close()
            kv.sender.close()
        decode.close()


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_reservation_outlives_a_prefill_slower_than_the_lease(kind):
    """The prefill queues for 2.5 leases before its session opens, then sends each of its 4
    layers 0.7 leases apart: keepalives and layers keep the reservation alive."""
    src_pool, dst_pool = pool(seed=1), pool(seed=2)
    lease = 1.0
    decode = DecodeConnector(make_receiver(kind, dst_pool), 3, lease_s=lease)
    prefill = PrefillConnector(make_sender(kind, src_pool), 3, lease_s=lease,
                               layer_delay_s=0.7 * lease)
    try:
        landed = Outcome()
        decode.expect("slow", [1, 2], 1, landed)
        prefill.plan("slow", [decode.address], [1, 2])
        time.sleep(2.5 * lease)  # queued behind other prompts: only keepalives
        assert not landed.event.is_set()
        shipped = ship(prefill, "slow", [6, 7], 4, KVControl("slow", 8, (1,))).wait()
        assert shipped.error is None, shipped
        assert landed.wait().ok
        assert torch.equal(dst_pool.k[:, [1, 2]], src_pool.k[:, [6, 7]])
    finally:
        prefill.close()
        prefill.sender.close()
        decode.close()


PREFILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from kv_transfer import KVLayout, KVPool, make_sender
    from kv_transfer.prefill_connector import PrefillConnector
    lay = KVLayout("tiny", torch.float32, 4, 4, 3, 8)
    shape = (4, 16, 4, 3, 8)
    pool = KVPool(torch.zeros(shape), torch.zeros(shape), lay)
    kv = PrefillConnector(make_sender({kind!r}, pool), 3, lease_s={lease!r})
    kv.plan("victim", [{address!r}], [1, 2])
    print("PLANNED", flush=True)
    time.sleep(120)          # killed here, while the request "queues"
""")


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_dead_prefill_frees_the_reservation_one_lease_after_its_last_word(kind):
    lease = 1.0
    decode = DecodeConnector(make_receiver(kind, pool(seed=2)), 3, lease_s=lease)
    landed = Outcome()
    proc = subprocess.Popen([sys.executable, "-c", PREFILL_SCRIPT.format(
        root=str(ROOT), kind=kind, lease=lease, address=decode.address)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"})
    try:
        assert proc.stdout.readline().strip() == b"PLANNED"
        # Reserved once the prefill side runs (what the router's order guarantees).
        decode.expect("victim", [1, 2], 1, landed)
        time.sleep(3 * lease)  # alive and renewing: still reserved
        assert not landed.event.is_set()
        proc.send_signal(signal.SIGKILL)
        result = landed.wait()
        assert isinstance(result, TransferResult) and not result.ok
        assert result.error == f"prefill side silent for {lease:g} s (no session opened)"
    finally:
        proc.kill()
        proc.wait()
        decode.close()


def test_dropped_request_aborts_its_sessions_and_the_decode_side_fails_once():
    hub = LocalHub()
    decode = DecodeConnector(make_receiver("local", pool(seed=2), hub=hub), 3)
    prefill = PrefillConnector(make_sender("local", pool(seed=1), hub=hub), 3)
    try:
        landed = Outcome()
        decode.expect("gone", [4], 1, landed)
        prefill.plan("gone", [decode.address], [4])
        on_layer = prefill.begin_step([("gone", [0])])
        assert on_layer is not None
        on_layer(0)
        prefill.drop("gone", "aborted by the router")
        result = landed.wait()
        assert not result.ok and "aborted by the router" in result.error
        assert prefill.planned() == []
        late = Outcome()
        prefill.finish("gone", KVControl("gone", 4), late)  # nothing planned any more
        assert late.wait().error == "no KV transfer planned for gone"
    finally:
        prefill.close()
        decode.close()


def test_gather_is_ok_only_when_every_rank_part_is():
    own = TransferResult("r", True, KVControl("r", 8, (3,)), None, 100)
    merged = DecodeConnector.gather(own, [PartReport(True, 50), PartReport(True, 25)])
    assert merged.ok and merged.num_bytes == 175 and merged.control == own.control
    failed = DecodeConnector.gather(own, [PartReport(True, 50), RuntimeError("rank died")])
    assert not failed.ok and failed.control is None
    assert failed.error == "a TP rank's part: RuntimeError: rank died"
    lost = TransferResult("r", False, None, "prefill side silent for 30 s (no session opened)")
    assert DecodeConnector.gather(lost, []) is lost
