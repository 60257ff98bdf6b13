"""UCX plumbing shared by the UCX receiver and sender (ucx.py): context settings, the
worker with its progress thread, endpoints from worker addresses, request waits.

UCX settings (context options; an explicit UCX_<NAME> environment variable wins over these).
Loopback figures from bench/kv_transfer.py (2-core shared VM, SmolLM2 layout, 1024 blocks =
755 MB, pools in huge pages; noisy: +-30% run to run), `ucx_perftest -t tag_bw` under the
same settings in brackets:
- Plain ucxx endpoints (PEER error handling, UCX defaults): tcp/lo only, 0.7-0.9 GB/s [1.2].
  PEER mode only selects transports that advertise peer-failure handling; sysv/posix shared
  memory do not by default, and CMA was not picked for PEER endpoints by this UCX.
- Default here, `UcxConfig()`: PEER error handling + SYSV_ERROR_HANDLING=y,
  POSIX_ERROR_HANDLING=y (same as UCX_MM_ERROR_HANDLING=y): sysv shared memory, v2
  protocols' fragmented copy pipeline: 7.5-10 GB/s [7.4-11], 67-102% of perftest at >= 256
  blocks over several runs. A peer's death fails its endpoint; measured: receiver survives a
  SIGKILLed sender.
- PROTO_ENABLE=n on top (v1 protocols: bandwidth-lane active messages over sysv): 7.5-8 GB/s
  [7.7], erratic in perftest (0.25-10 GB/s); not the default.
- `UcxConfig(error_handling=False)`: sysv + CMA zero-copy rendezvous (process_vm_readv),
  9-12 GB/s [~12, perftest without -e]. But a peer SIGKILLed mid-transfer aborted the
  surviving process (cma_ep.c: "process_vm_readv ... No such process", SIGABRT): use it only
  where a peer crash may take this process down anyway.
- Huge pages matter for CMA: with torch's default 4 KiB pages the CMA path measured 4-6 GB/s;
  with THP_MEM_ALLOC_ENABLE=1 (torch allocates large tensors on 2 MiB pages) 10.5 GB/s.
  Worker processes should allocate the KV pool that way.
- Progress thread in blocking (epoll) mode; polling mode was slower on 2 cores. The thread
  also wakes every `epoll_timeout_ms` (1 ms): without it, two senders streaming layer by
  layer into one receiver at once left one sender's sends waiting ~20 s for a missed wakeup
  (UCX keepalive; rapidsai/ucxx#15), in every run; with it, no stall (bench: `--tp`).
- Across hosts (RDMA): UCX picks rc/dc verbs (zero-copy RDMA, with peer-failure support) when
  its build has them. The `libucx-cu12` wheel is configured `--without-verbs --without-rdmacm`
  (see `ucx_info -v`), so RDMA needs a system UCX built with verbs (MOFED/HPC-X or the
  distribution's libucx with rdma-core) and RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY=true so ucxx
  loads it. Then e.g. UCX_TLS=rc,sm,self (dc instead of rc for many peers) and
  UCX_NET_DEVICES=mlx5_0:1 to pin the NIC. Pool memory registration is cached by UCX's
  registration cache (UCX_RCACHE_ENABLE, on by default); the pool is one long-lived
  allocation, so it is registered once, not per transfer.
- ucxx sets UCX_RNDV_THRESH=8192 and UCX_RNDV_FRAG_MEM_TYPE=cuda in os.environ on import (its
  GPU-cluster defaults) and UCX_MEMTYPE_CACHE=n, which UCX 1.21 warns is unused
  (UCX_WARN_UNUSED_ENV_VARS=n silences it); pdserve leaves them.
- After a failed transfer, messages the dead or aborted sender had in flight stay in the
  receiving worker's unexpected queue (bounded by that transfer's eager messages).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kv_transfer.control import TransferError
from kv_transfer.header import HeaderError
from kv_transfer.pool import KVPool, Run
from kv_transfer.wire import Conn

log = logging.getLogger(__name__)

SAFE_OPTIONS = {
    "SYSV_ERROR_HANDLING": "y",  # let shared memory serve endpoints in PEER error mode
    "POSIX_ERROR_HANDLING": "y",
}


@dataclass(frozen=True)
class UcxConfig:
    """UCX context settings for one sender or receiver (see the module doc)."""

    error_handling: bool = True  # PEER mode: a dead peer fails the endpoint, not the process
    options: dict[str, str] | None = None  # None: SAFE_OPTIONS with error handling, else none
    polling: bool = False  # progress thread busy-polls (lower latency, burns a core)
    # Blocking mode: the progress thread also wakes after this many ms without an event (-1:
    # never). UCX's wakeup can be missed, and then a send waits for the next keepalive, ~20 s
    # (rapidsai/ucxx#15): measured here with two senders streaming layers into one receiver
    # at once, every time. 1 ms bounds that; it costs an idle worker ~2% of a core.
    epoll_timeout_ms: int = 1

    def context_options(self) -> dict[str, str]:
        opts = dict(SAFE_OPTIONS if self.error_handling else {}) if self.options is None \
            else dict(self.options)
        # An explicit environment variable is the operator's choice: it wins.
        return {k: v for k, v in opts.items() if f"UCX_{k}" not in os.environ}


class Ucx:
    """One UCX context + worker with its progress thread."""

    def __init__(self, config: UcxConfig, name: str):
        # Lazy: ucxx is an optional, heavy dependency (transport "ucx" only).
        import ucxx._lib.libucxx as ucx_api
        from ucxx._lib.arr import Array

        self.api, self.Array, self.config = ucx_api, Array, config
        self.ctx = ucx_api.UCXContext(
            config_dict=config.context_options(),
            feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP))
        self.worker = ucx_api.UCXWorker(self.ctx)
        self.worker.start_progress_thread(polling_mode=config.polling,
                                          epoll_timeout=config.epoll_timeout_ms)
        self.address = self.worker.address.tobytes()
        self._stopped = False
        log.info("%s: UCX context up (error handling %s, options %s)", name,
                 "peer" if config.error_handling else "none", config.context_options())

    def endpoint(self, peer_address: bytes):
        addr = self.api.UCXAddress.create_from_buffer(np.frombuffer(peer_address, np.uint8)
                                                      .copy())
        return self.api.UCXEndpoint.create_from_worker_address(
            self.worker, addr, self.config.error_handling)

    def buffer(self, pool: KVPool, kv: int, layer: int, start: int, count: int):
        if pool.device.type == "cpu":
            return self.Array(pool.run(kv, layer, start, count))
        return self.Array(pool.run_tensor(kv, layer, start, count))

    def tensor(self, t: torch.Tensor):
        """A UCX buffer over a contiguous tensor (staging), host or CUDA."""
        flat = t.view(-1).view(torch.uint8)
        return self.Array(flat.numpy() if flat.device.type == "cpu" else flat)

    def tag(self, slot: int, index: int):
        return self.api.UCXXTag((slot << 32) | index)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.worker.stop_progress_thread()


def close_ep(ep) -> None:
    """Close an endpoint, cancelling its in-flight requests now (plain `close` waits for a
    flush that a dead peer never answers)."""
    try:
        ep.close_blocking(period=10**8, max_attempts=5)
    except Exception as e:  # noqa: BLE001 - ucxx's UCXError: already failed or closed
        log.debug("closing UCX endpoint: %s", e)


def wait_requests(reqs: Sequence[Any], deadline: Callable[[], float], what: str) -> None:
    """Wait for UCX requests (completed by the progress thread) until `deadline()` (re-read:
    a lease may move on meanwhile)."""
    i, delay = 0, 1e-5
    while i < len(reqs):
        if reqs[i].completed:
            i += 1
            continue
        if time.monotonic() > deadline():
            raise TransferError(f"timed out waiting for {what} ({i} of {len(reqs)} done)")
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)
    try:
        for r in reqs:
            r.check_error()
    except Exception as e:  # ucxx raises its own UCX* error types
        raise TransferError(f"{what} failed: {type(e).__name__}: {e}") from e


def num_messages(layers: int, segs: list[Run]) -> int:
    n = 2 * layers * len(segs)
    if n >= 1 << 32:
        raise ValueError(f"{n} UCX messages do not fit the tag space")
    return n


@dataclass(eq=False)
class Peer:
    """Per-connection UCX state: the peer's worker address and our endpoint to it."""

    address: bytes
    ep: object | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, ucx: Ucx):
        with self.lock:
            if self.ep is None:
                self.ep = ucx.endpoint(self.address)
            return self.ep

    def close(self) -> None:
        """Close the endpoint (cancelling its requests); the next `get` makes a new one."""
        with self.lock:
            ep, self.ep = self.ep, None
        if ep is not None:
            close_ep(ep)


def peer_of(conn: Conn) -> Peer | None:
    return conn.extra.get("peer")


class UcxHandshake:
    """Both ends swap UCX worker addresses in the TCP HELLO, then build endpoints from them
    (that is what lets UCX pick shared memory; see the module docstring)."""

    _ucx: Ucx

    def _hello_payload(self, conn: Conn) -> bytes:
        return self._ucx.address

    def _on_hello(self, conn: Conn, payload: bytes) -> None:
        if not payload:
            raise HeaderError("UCX HELLO without a worker address")
        conn.extra["peer"] = Peer(payload)

    def _ep(self, conn: Conn):
        return conn.extra["peer"].get(self._ucx)
