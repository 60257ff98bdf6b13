"""KV transfer: the header never misreads or crashes on bad bytes, every transport moves blocks
byte-identically from shuffled source ids into shuffled destination ids and touches nothing
else, a layout mismatch is refused before a byte is written, a sender killed mid-transfer is
reported to the receiver's owner (which frees the reservation) while the receiver keeps
serving, and two real engines (prefill -> decode) produce the colocated engine's tokens.
UCX runs wherever ucxx imports."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kv_transfer
from kv_transfer import (
    HeaderError,
    HeadSlice,
    KVControl,
    KVHeader,
    KVLayout,
    KVLayoutMismatch,
    KVPool,
    LocalHub,
    MsgKind,
    TransferError,
    available_transports,
    make_receiver,
    make_sender,
)
from kv_transfer.header import FIXED_SIZE, MAX_MODEL_ID_LEN

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = [t for t in ("ucx", "tcp", "local") if t in available_transports()]
SOCKET_TRANSPORTS = [t for t in TRANSPORTS if t != "local"]
TINY = {"model_id": "tiny", "block_size": 4, "num_layers": 2, "num_kv_heads": 2, "head_dim": 8}


def layout(**kw) -> KVLayout:
    args = {**TINY, "dtype": torch.float32, **kw}
    return KVLayout(args.pop("model_id"), args.pop("dtype"), **args)


def random_pool(lay: KVLayout, num_blocks: int = 16, seed: int = 0) -> KVPool:
    shape = (lay.num_layers, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
    g = torch.Generator().manual_seed(seed)
    return KVPool(torch.randn(shape, generator=g).to(lay.dtype),
                  torch.randn(shape, generator=g).to(lay.dtype), lay)


def endpoints(kind: str, rx_pool: KVPool, tx_pool: KVPool):
    hub = LocalHub()
    return make_receiver(kind, rx_pool, hub=hub), make_sender(kind, tx_pool, hub=hub)


# ---- header ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(MsgKind))
def test_header_round_trip(kind, dtype):
    lay = layout(dtype=dtype, model_id="Ünïcode/model", tp_rank=1, tp_size=2)
    h = KVHeader(kind, lay, "req-é-7", num_blocks=5, payload_len=1 << 33, layer=3)
    raw = h.encode()
    assert KVHeader.total_size(raw[:FIXED_SIZE]) == len(raw)
    assert KVHeader.decode(raw) == h


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_random_bytes_never_crash_the_header_parser(data):
    try:
        KVHeader.decode(data)
    except HeaderError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_headers_decode_or_fail_cleanly(flips):
    assert_corrupts_cleanly(KVHeader(MsgKind.BEGIN, layout(), "r1", 4, 32).encode(), flips)


def assert_corrupts_cleanly(encoded: bytes, flips: list[tuple[int, int]]) -> None:
    """With bytes overwritten, a header either fails with HeaderError or decodes to one that
    re-encodes to exactly those bytes (strict: no slack bits)."""
    raw = bytearray(encoded)
    for pos, value in flips:
        raw[pos % len(raw)] = value
    try:
        got = KVHeader.decode(bytes(raw))
    except HeaderError:
        return
    assert got.encode() == bytes(raw)[: KVHeader.total_size(raw)]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 1023), st.integers(0, 1023), st.integers(1, 1024),
       st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6))
def test_begin_head_slice_round_trips_and_corrupts_cleanly(src, dst, count, flips):
    try:
        heads = HeadSlice(src, dst, count)
    except ValueError:  # past MAX_KV_HEADS: cannot even be built
        assume(False)
    h = KVHeader(MsgKind.BEGIN, layout(tp_rank=1, tp_size=2), "r1", 4, 32, heads=heads)
    assert KVHeader.decode(h.encode()) == h
    assert_corrupts_cleanly(h.encode(), flips)


def test_head_fields_are_checked():
    begin = KVHeader(MsgKind.BEGIN, layout(), "r1", heads=HeadSlice(1, 2, 3)).encode()
    at = FIXED_SIZE - 12  # src_head, dst_head, head_count, reserved (u16 each)
    assert struct.unpack_from("!HHHH", begin, at) == (1, 2, 3, 0)
    for fields, match in [((1, 2, 3, 1), "reserved"), ((1, 0, 0, 0), "0 heads"),
                          ((0, 1020, 5, 0), "invalid head slice")]:
        raw = bytearray(begin)
        struct.pack_into("!HHHH", raw, at, *fields)
        with pytest.raises(HeaderError, match=match):
            KVHeader.decode(bytes(raw))
    layer = bytearray(KVHeader(MsgKind.LAYER, layout(), "r1", layer=0).encode())
    struct.pack_into("!HHHH", layer, at, 0, 0, 1, 0)
    with pytest.raises(HeaderError, match="BEGIN only"):
        KVHeader.decode(bytes(layer))
    with pytest.raises(HeaderError, match="BEGIN only"):
        KVHeader(MsgKind.END, layout(), "r1", heads=HeadSlice(0, 0, 1)).encode()
    with pytest.raises(ValueError):
        HeadSlice(0, 0, 0)


def test_oversized_lengths_refused_from_the_fixed_part():
    raw = bytearray(KVHeader(MsgKind.BEGIN, layout(), "r1").encode())
    struct.pack_into("!H", raw, FIXED_SIZE - 4, MAX_MODEL_ID_LEN + 1)
    with pytest.raises(HeaderError, match="exceed"):
        KVHeader.total_size(bytes(raw[:FIXED_SIZE]))
    with pytest.raises(HeaderError, match="magic"):
        KVHeader.decode(b"XXXX" + bytes(raw[4:]))


def test_layout_mismatch_names_every_differing_field():
    with pytest.raises(KVLayoutMismatch, match="head_dim: this side has 8, the peer has 16") as err:
        layout().check_compatible(layout(head_dim=16, dtype=torch.float16))
    assert err.value.fields == ("dtype", "head_dim")
    layout().check_compatible(layout())


def test_control_round_trip_and_bounds():
    c = KVControl("r", 37, (5, 2**31 - 1))
    assert KVControl.decode("r", c.encode()) == c
    with pytest.raises(HeaderError):
        KVControl.decode("r", c.encode()[:-1])


# ---- transports -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_shuffled_blocks_arrive_byte_identical(kind, dtype):
    lay = layout(dtype=dtype)
    src_pool, dst_pool = random_pool(lay, seed=1), random_pool(lay, seed=2)
    before_k, before_v = dst_pool.k.clone(), dst_pool.v.clone()
    rng = random.Random(3)
    src, dst = rng.sample(range(16), 7), rng.sample(range(16), 7)
    rx, tx = endpoints(kind, dst_pool, src_pool)
    try:
        results = []
        pending = rx.expect("r1", dst, on_done=results.append, lease_s=20)
        with tx.open(rx.address, "r1", src, dst, timeout_s=20) as session:
            for layer in reversed(range(lay.num_layers)):  # layer-wise, any order
                session.send_layer(layer)
            sent = session.finish(KVControl("r1", 27, (11,)))
        got = pending.wait(10)
        assert sent.ok and got.ok and results == [got]
        assert got.control == KVControl("r1", 27, (11,))
        assert got.num_bytes == 7 * lay.block_bytes
        for s, d in zip(src, dst):
            assert torch.equal(dst_pool.k[:, d], src_pool.k[:, s])
            assert torch.equal(dst_pool.v[:, d], src_pool.v[:, s])
        untouched = [b for b in range(16) if b not in dst]
        assert torch.equal(dst_pool.k[:, untouched], before_k[:, untouched])
        assert torch.equal(dst_pool.v[:, untouched], before_v[:, untouched])
        # The connection is reused for the next whole-request transfer.
        pending = rx.expect("r2", dst[:2], lease_s=20)
        assert tx.send(rx.address, KVControl("r2", 5), src[-2:], dst[:2]).ok
        assert pending.wait(10).ok
        assert torch.equal(dst_pool.k[:, dst[:2]], src_pool.k[:, src[-2:]])
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_connect_ahead_is_the_connection_the_first_transfer_uses(kind):
    lay = layout()
    src_pool, dst_pool = random_pool(lay, seed=1), random_pool(lay, seed=2)
    rx, tx = endpoints(kind, dst_pool, src_pool)
    try:
        tx.connect(rx.address)
        deadline = time.monotonic() + 5
        while len(rx._conns) != 1:  # the receiver accepts on its own thread
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pending = rx.expect("r1", [3], lease_s=20)
        assert tx.send(rx.address, KVControl("r1", 4), [5], [3]).ok
        assert pending.wait(10).ok
        assert torch.equal(dst_pool.k[:, 3], src_pool.k[:, 5])
        assert len(rx._conns) == 1  # no second handshake
        with pytest.raises(TransferError):
            tx.connect(f"{kind}://127.0.0.1:1")  # nothing listens there: a clear error
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("field, value", [("head_dim", 16), ("dtype", torch.float16),
                                          ("block_size", 8), ("model_id", "other-model")])
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_layout_mismatch_refused_and_nothing_written(kind, field, value):
    dst_pool = random_pool(layout(), seed=2)
    before = dst_pool.k.clone(), dst_pool.v.clone()
    bad_pool = random_pool(layout(**{field: value}), seed=1)
    rx, tx = endpoints(kind, dst_pool, bad_pool)
    try:
        owner = []
        pending = rx.expect("r1", [3, 4], on_done=owner.append, lease_s=20)
        with pytest.raises(KVLayoutMismatch, match=field):
            tx.send(rx.address, KVControl("r1", 8), [0, 1], [3, 4], timeout_s=20)
        result = pending.wait(5)
        assert result is not None and not result.ok and field in result.error
        assert owner == [result]  # the owner hears once, and can cancel its reservation
        assert torch.equal(dst_pool.k, before[0]) and torch.equal(dst_pool.v, before[1])
        # An unknown request is refused too; the receiver keeps serving good senders.
        good = make_sender(kind, random_pool(layout(), seed=5), hub=getattr(rx, "hub", None))
        with pytest.raises(TransferError, match="no reservation"):
            good.send(rx.address, KVControl("nope", 4), [0], [3])
        pending = rx.expect("r2", [3], lease_s=20)
        assert good.send(rx.address, KVControl("r2", 4), [0], [3]).ok
        assert pending.wait(10).ok
        good.close()
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_reservation_expires_when_no_sender_comes(kind):
    rx, tx = endpoints(kind, random_pool(layout()), random_pool(layout()))
    try:
        owner = []
        t0 = time.monotonic()
        pending = rx.expect("late", [1, 2], on_done=owner.append, lease_s=0.3)
        result = pending.wait(5)
        assert result is not None and not result.ok
        assert "prefill side silent for 0.3 s (no session opened)" in result.error
        assert time.monotonic() - t0 < 3 and owner == [result]
        with pytest.raises(TransferError):  # too late: the blocks are no longer reserved
            tx.send(rx.address, KVControl("late", 8), [0, 1], [1, 2])
    finally:
        tx.close()
        rx.close()


SENDER_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    from kv_transfer import KVLayout, KVPool, make_sender
    lay = KVLayout("tiny", torch.float32, 4, 4, 2, 8)
    g = torch.Generator().manual_seed(7)
    shape = (4, 64, 4, 2, 8)
    pool = KVPool(torch.randn(shape, generator=g), torch.randn(shape, generator=g), lay)
    tx = make_sender({kind!r}, pool)
    session = tx.open({address!r}, "victim", list(range(48)), {dst!r}, timeout_s=60)
    session.send_layer(0)   # part of the data: layer 0 of 4
    print("SENT", flush=True)
    time.sleep(60)          # killed here, mid-transfer
""")


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_sender_killed_mid_transfer_fails_fast_and_receiver_keeps_serving(kind):
    lay = layout(num_layers=4)
    dst_pool = random_pool(lay, num_blocks=64, seed=2)
    rx = make_receiver(kind, dst_pool)
    dst = random.Random(9).sample(range(64), 48)
    cancelled = []
    pending = rx.expect("victim", dst, on_done=cancelled.append, lease_s=60)
    proc = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT.format(
        root=str(ROOT), kind=kind, address=rx.address, dst=dst)], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env={**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"})
    try:
        assert proc.stdout.readline().strip() == b"SENT"
        # Mid-way: layer 0 lands (the child's pool is seeded, so we know its bytes)...
        g = torch.Generator().manual_seed(7)
        src_k = torch.randn((4, 64, 4, 2, 8), generator=g)
        deadline = time.monotonic() + 5
        while not torch.equal(dst_pool.k[0, dst], src_k[0, :48]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert torch.equal(dst_pool.k[0, dst], src_k[0, :48])
        assert not pending.done()  # ...and the transfer is still open
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        result = pending.wait(10)
        assert result is not None and not result.ok, result
        assert time.monotonic() - t0 < 5  # the socket's EOF, not the 60 s deadline
        assert cancelled == [result]  # the owner's callback ran: it frees the reservation
        # The receiver serves the next transfer into the same blocks.
        src_pool = random_pool(lay, num_blocks=64, seed=3)
        with make_sender(kind, src_pool) as tx:
            pending = rx.expect("next", dst[:5], lease_s=20)
            assert tx.send(rx.address, KVControl("next", 20), [60, 1, 2, 3, 9], dst[:5]).ok
            assert pending.wait(10).ok
        assert torch.equal(dst_pool.v[:, dst[:5]], src_pool.v[:, [60, 1, 2, 3, 9]])
    finally:
        proc.kill()
        proc.wait()
        rx.close()


def test_local_stalled_sender_stops_writing_once_timed_out():
    lay = layout()
    src_pool, dst_pool = random_pool(lay, seed=1), random_pool(lay, seed=2)
    before = dst_pool.k.clone()
    rx, tx = endpoints("local", dst_pool, src_pool)
    pending = rx.expect("slow", [5, 6], lease_s=0.2)
    session = tx.open(rx.address, "slow", [0, 1], [5, 6])
    session.send_layer(0)
    assert not pending.wait(3).ok
    with pytest.raises(TransferError, match="failed"):
        session.send_layer(1)
    assert torch.equal(dst_pool.k[1], before[1])  # nothing written after the failure
    rx.close()


def test_auto_picks_ucx_when_importable_else_tcp(monkeypatch, caplog):
    pool = random_pool(layout())
    caplog.set_level(logging.INFO, logger="kv_transfer")
    rx = make_receiver("auto", pool)
    expected = "ucx" if "ucx" in available_transports() else "tcp"
    assert rx.address.startswith(expected + "://")
    assert f"picked the {expected} transport" in caplog.text
    rx.close()
    monkeypatch.setattr(kv_transfer, "_ucx_importable", lambda: False)
    assert "ucx" not in kv_transfer.available_transports()
    rx = make_receiver("auto", pool)
    assert rx.address.startswith("tcp://")
    rx.close()
    with pytest.raises(ValueError, match="unknown KV transport"):
        make_sender("carrier-pigeon", pool)


# ---- two real engines -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_only(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("kvt") / "llama")


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_prefill_to_decode_engine_over_transport_matches_colocated(tiny_llama_only, kind):
    from engine.config import EngineConfig, EngineMode
    from engine.engine import LLMEngine
    from pdserve_api.sampling import SamplingParams

    def engine(mode, blocks):
        return LLMEngine(EngineConfig(model=str(tiny_llama_only), mode=mode,
                                      num_kv_blocks=blocks))

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 320) for _ in range(n)] for n in (37, 16, 5)]
    expected = [o.new_token_ids for o in engine(EngineMode.COLOCATED, 64).generate(prompts,
                                                                                    greedy)]
    prefill, decode = engine(EngineMode.PREFILL, 64), engine(EngineMode.DECODE, 48)
    # Occupy and free a few decode blocks so destination ids differ from the source ids.
    filler, _ = decode.reserve_kv(list(range(3, 40)), 37)
    rx = make_receiver(kind, KVPool.from_engine(decode))
    tx = make_sender(kind, KVPool.from_engine(prefill))
    try:
        first = {}
        ids = [prefill.add_request(p, greedy) for p in prompts]
        while prefill.has_unfinished():
            for out in prefill.step():
                assert out.finish_reason == "prefilled"
                first[out.request_id] = out.new_token_ids
        decode.cancel_reservation(filler)
        for rid, prompt in zip(ids, prompts):
            computed = prefill.requests[rid].num_computed_tokens
            _, dst = decode.reserve_kv(prompt, computed, greedy, request_id=rid)
            pending = rx.expect(rid, dst, lease_s=30)
            src = prefill.block_table(rid)[: len(dst)]
            tx.send(rx.address, KVControl(rid, computed, tuple(first[rid])), src, dst)
            result = pending.wait(10)
            assert result.ok, result
            prefill.release(rid)  # shipped: the prefill side drops its hold
            decode.commit_kv(rid, result.control.num_computed_tokens,
                             result.control.output_token_ids)
        rest = {rid: [] for rid in ids}
        while decode.has_unfinished():
            for out in decode.step():
                rest[out.request_id] += out.new_token_ids
        assert [first[r] + rest[r] for r in ids] == expected
        for e in (prefill, decode):
            e.check_integrity()
            assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    finally:
        tx.close()
        rx.close()


def test_failed_transfer_cancel_leaks_no_engine_blocks(tiny_llama_only):
    from engine.config import EngineConfig, EngineMode
    from engine.engine import LLMEngine

    decode = LLMEngine(EngineConfig(model=str(tiny_llama_only), mode=EngineMode.DECODE,
                                    num_kv_blocks=16))
    rx = make_receiver("tcp", KVPool.from_engine(decode))
    rid, dst = decode.reserve_kv(list(range(3, 40)), 37)
    failed = []
    rx.expect(rid, dst, on_done=failed.append, lease_s=0.2).wait(5)
    assert failed and not failed[0].ok
    decode.cancel_reservation(rid)  # what the owner's callback hands to the engine loop
    decode.check_integrity()
    assert decode.block_manager.num_free_blocks == 16
    rx.close()


def test_pool_rejects_non_matching_tensors():
    lay = layout()
    k = torch.zeros(2, 16, 4, 2, 8)
    with pytest.raises(ValueError, match="does not match"):
        KVPool(k, torch.zeros(2, 16, 4, 2, 4), lay)
    with pytest.raises(ValueError, match="contiguous"):
        KVPool(k.transpose(3, 4).contiguous().transpose(3, 4), k.clone(), lay)
    assert dataclasses.replace(lay, tp_rank=0) == lay


# ---- cluster membership (shared secret) -------------------------------------------------------


@pytest.mark.parametrize("kind", SOCKET_TRANSPORTS)
def test_only_cluster_members_can_write_or_read_blocks(kind):
    """A receiver with the cluster secret takes blocks from a member, and refuses a sender
    with no secret, a wrong one, or a raw socket skipping the handshake: nothing is written,
    the reservation stays pending, and the stranger never sees a HELLO (no UCX address)."""
    import socket as socketlib

    from kv_transfer.header import KVHeader
    from kv_transfer.wire import encode_ids, parse_address

    lay = layout()
    src_pool, dst_pool = random_pool(lay, seed=1), random_pool(lay, seed=2)
    before_k = dst_pool.k.clone()
    secret = b"s" * 32
    rx = make_receiver(kind, dst_pool, secret=secret)
    try:
        pending = rx.expect("r1", [3, 4], lease_s=30)
        for stranger in (make_sender(kind, src_pool),
                         make_sender(kind, src_pool, secret=b"x" * 32)):
            with stranger, pytest.raises(TransferError):
                stranger.send(rx.address, KVControl("r1", 8), [1, 2], [3, 4])
        host, port = parse_address(rx.address, kind)
        with socketlib.create_connection((host, port), timeout=5) as raw:  # no AUTH at all
            begin = encode_ids([1, 2], [3, 4])
            raw.sendall(KVHeader(MsgKind.HELLO, lay).encode()
                        + KVHeader(MsgKind.BEGIN, lay, "r1", 2, len(begin)).encode() + begin)
            raw.settimeout(5)
            assert raw.recv(4096) == b""  # closed without a word
        assert not pending.done()
        assert torch.equal(dst_pool.k, before_k)
        with make_sender(kind, src_pool, secret=secret) as member:
            assert member.send(rx.address, KVControl("r1", 8), [1, 2], [3, 4]).ok
        assert pending.wait(10).ok
        assert torch.equal(dst_pool.k[:, [3, 4]], src_pool.k[:, [1, 2]])
    finally:
        rx.close()
