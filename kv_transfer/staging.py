"""Staging buffers for head-sliced transfers, kept for reuse.

A head slice is strided in the pool, so the side whose slice is not its whole region packs or
unpacks it through a contiguous staging buffer (pool.py). Allocating one per transfer costs
more than the copy itself: fresh pages fault in on first touch (measured 160-500 ms for a
session of 1024 blocks on the 2-core VM). A cache keeps released buffers and hands them out
again; it holds at most `max_bytes` of idle buffers (a larger one is dropped on release).

Thread-safe: sessions on different threads take and give concurrently.
"""

from __future__ import annotations

import threading

import torch

DEFAULT_MAX_BYTES = 1 << 30


class StagingCache:
    def __init__(self, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES):
        self.device = device
        self.max_bytes = max_bytes
        self._idle: list[torch.Tensor] = []  # flat uint8 buffers, smallest first
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> the buffer behind a take
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` (contents undefined): the smallest idle buffer that
        fits, else a new one. Give it back with `give` once no transfer uses it."""
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        with self._lock:
            i = next((i for i, b in enumerate(self._idle) if b.numel() >= nbytes), None)
            buf = self._idle.pop(i) if i is not None else None
        if buf is None:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def give(self, t: torch.Tensor) -> None:
        """Return a tensor from `take` for reuse (a second give, or a tensor not from here,
        is ignored)."""
        with self._lock:
            buf = self._lent.pop(t.data_ptr(), None)
            if buf is None:
                return
            if sum(b.numel() for b in self._idle) + buf.numel() > self.max_bytes:
                return
            self._idle.append(buf)
            self._idle.sort(key=lambda b: b.numel())
