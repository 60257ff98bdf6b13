"""The C heap's accounting and trimming (engine/native_heap.py), and that the engine loop trims
while it serves."""

from __future__ import annotations

import ctypes
import threading

import psutil
import pytest
from test_engine_vs_hf import make_engine

from engine.native_heap import HeapTrimmer, heap_in_use_bytes, trim
from pdserve_api.sampling import SamplingParams
from worker_host.engine_loop import EngineLoop

pytestmark = pytest.mark.skipif(heap_in_use_bytes() is None, reason="needs glibc >= 2.33")

CHUNK = 64 * 1024  # below glibc's mmap threshold: these come from the arena
COUNT = 1024  # 64 MiB


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _touched_chunks(libc: ctypes.CDLL) -> list[int]:
    ptrs = [libc.malloc(CHUNK) for _ in range(COUNT)]
    assert all(ptrs)
    for p in ptrs:
        ctypes.memset(p, 1, CHUNK)  # resident, not just reserved
    return ptrs


def test_heap_in_use_counts_what_is_allocated_and_freed():
    libc = _libc()
    before = heap_in_use_bytes()
    ptrs = _touched_chunks(libc)
    during = heap_in_use_bytes()
    for p in ptrs:
        libc.free(p)
    after = heap_in_use_bytes()
    assert during - before >= COUNT * CHUNK
    assert during - after >= COUNT * CHUNK * 0.99


def test_trim_gives_fragmented_free_pages_back():
    """Free 7 of every 8 chunks: the survivors pin the arena, so free() alone cannot shrink
    it and RSS stays; trim() hands the free pages in between back."""
    libc = _libc()
    proc = psutil.Process()
    ptrs = _touched_chunks(libc)
    kept = ptrs[7::8]
    for i, p in enumerate(ptrs):
        if i % 8 != 7:
            libc.free(p)
    freed = COUNT * CHUNK * 7 / 8
    held = proc.memory_info().rss
    assert trim()
    released = held - proc.memory_info().rss
    for p in kept:
        libc.free(p)
    assert released >= freed * 0.5, (released, freed)


def test_trimmer_trims_only_when_due_and_after_work():
    now = [0.0]
    trimmer = HeapTrimmer(10.0, clock=lambda: now[0])
    now[0] = 60.0
    assert not trimmer.maybe_trim()  # idle since the start: nothing to give back
    trimmer.worked()
    assert trimmer.maybe_trim() and trimmer.trims == 1
    trimmer.worked()
    now[0] = 65.0
    assert not trimmer.maybe_trim()  # 5 s since the last trim
    now[0] = 70.0
    assert trimmer.maybe_trim() and trimmer.trims == 2
    now[0] = 100.0
    assert not trimmer.maybe_trim()  # no steps since

    off = HeapTrimmer(0.0, clock=lambda: now[0])
    off.worked()
    now[0] = 1e6
    assert not off.maybe_trim() and off.trims == 0


def test_engine_loop_trims_the_heap_while_serving(tiny_llama):
    engine = make_engine(tiny_llama)
    done = threading.Event()

    def on_outputs(outputs):
        if any(o.finished for o in outputs):
            done.set()

    loop = EngineLoop(engine, on_outputs, heap_trim_interval_s=1e-6)
    try:
        loop.submit(lambda e: e.add_request(list(range(5, 40)),
                                            SamplingParams(max_tokens=8, ignore_eos=True)))
        assert done.wait(60)
        assert loop.heap_trimmer.trims >= 1
    finally:
        loop.stop()
