"""UCX transport (ucxx bindings): TCP control socket, UCX tag messages for the block bytes.

Shape: the control protocol of tcp.py (HELLO / BEGIN / ACCEPT / END / DONE, same header and
checks) runs on a plain TCP socket; the HELLOs carry each side's UCX *worker address*, and each
side makes a UCX endpoint from the other's. After BEGIN passes its checks the receiver posts one
`tag_recv` per run of blocks consecutive on both sides (`pool.paired_runs`), per layer, for K
and V, directly into views of its pool, then sends ACCEPT with a fresh slot number; tag =
slot << 32 | message index, so transfers never cross. `send_layer` posts the matching
`tag_send`s from views of the sender's pool (host numpy views, or CUDA tensors by
`__cuda_array_interface__`; untested here, no GPU) and returns; `finish` waits for them,
sends END, and the receiver answers DONE once its receives have completed. Nothing is
staged or concatenated in Python for whole-region sessions.

After posting a layer's sends the sender puts an empty LAYER message on the control socket:
a sign of life that renews the reservation's lease (receiver_core.py), and the receiver's cue
to unpack that layer.

Head-sliced sessions (pool.py): message boundaries stay the paired runs, and a side whose
slice is not its whole region stages, in buffers from a StagingCache (staging.py) reused
across sessions. The sender gathers each layer into its slot of a per-session staging tensor
at `send_layer` and sends from it (kept until `finish`: the sends are asynchronous); the
receiver posts its receives into one staging tensor for every layer of the session (layers
may arrive in any order) and, at each LAYER mark, waits for that layer's receives and scatters
it into the pool, so unpacking overlaps the layers still in flight.

Why a TCP control socket instead of ucxx's listener/`create_endpoint`:
- UCX's client-server (sockaddr) connection establishment only wires up network transports:
  on one host it ran over tcp/lo (0.7-1.2 GB/s here), never shared memory. Endpoints created
  from a worker address get the full wireup (shared memory / CMA on one host, RDMA across).
- Peer death: the socket's EOF tells the receiver at once that the sender is gone; UCX's own
  keepalive over shared memory takes ~20 s. On failure the receiver closes its endpoint with
  `close_blocking`, which cancels every receive still posted into the pool, before the owner
  is told (so `cancel_reservation` never races a late write).

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
from kv_transfer.header import HeaderError, KVHeader, MsgKind
from kv_transfer.pool import KVPool, Run, paired_runs
from kv_transfer.staging import StagingCache
from kv_transfer.tcp_receiver import Incoming, TcpReceiver
from kv_transfer.tcp_sender import TcpSender, TcpSession
from kv_transfer.wire import Conn, send_message

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


class _Ucx:
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


def _close_ep(ep) -> None:
    """Close an endpoint, cancelling its in-flight requests now (plain `close` waits for a
    flush that a dead peer never answers)."""
    try:
        ep.close_blocking(period=10**8, max_attempts=5)
    except Exception as e:  # noqa: BLE001 - ucxx's UCXError: already failed or closed
        log.debug("closing UCX endpoint: %s", e)


def _wait(reqs: Sequence[Any], deadline: Callable[[], float], what: str) -> None:
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


def _messages(layers: int, segs: list[Run]) -> int:
    n = 2 * layers * len(segs)
    if n >= 1 << 32:
        raise ValueError(f"{n} UCX messages do not fit the tag space")
    return n


@dataclass(eq=False)
class _Peer:
    """Per-connection UCX state: the peer's worker address and our endpoint to it."""

    address: bytes
    ep: object | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, ucx: _Ucx):
        with self.lock:
            if self.ep is None:
                self.ep = ucx.endpoint(self.address)
            return self.ep

    def close(self) -> None:
        """Close the endpoint (cancelling its requests); the next `get` makes a new one."""
        with self.lock:
            ep, self.ep = self.ep, None
        if ep is not None:
            _close_ep(ep)


def _peer(conn: Conn) -> _Peer | None:
    return conn.extra.get("peer")


class _UcxHandshake:
    """Both ends swap UCX worker addresses in the TCP HELLO, then build endpoints from them
    (that is what lets UCX pick shared memory; see the module docstring)."""

    _ucx: _Ucx

    def _hello_payload(self, conn: Conn) -> bytes:
        return self._ucx.address

    def _on_hello(self, conn: Conn, payload: bytes) -> None:
        if not payload:
            raise HeaderError("UCX HELLO without a worker address")
        conn.extra["peer"] = _Peer(payload)

    def _ep(self, conn: Conn):
        return conn.extra["peer"].get(self._ucx)


class UcxReceiver(_UcxHandshake, TcpReceiver):
    scheme = "ucx"

    def __init__(self, pool: KVPool, host: str = "127.0.0.1", port: int = 0,
                 name: str | None = None, config: UcxConfig | None = None,
                 secret: bytes | None = None):
        self._ucx = _Ucx(config or UcxConfig(), name or "ucx-rx")
        self._orphans: list[torch.Tensor] = []  # staging posted to after a failure: kept
        self._device_staging = StagingCache(pool.device)
        super().__init__(pool, host, port, name, secret)

    def _prepare(self, conn: Conn, inc: Incoming) -> None:
        lay, ucx = self.pool.layout, self._ucx
        segs = paired_runs(inc.src, inc.dst)
        per_layer = 2 * len(segs)
        _messages(lay.num_layers, segs)
        stage = None
        if not inc.whole(self.pool):  # a head slice: into staging, unpacked layer by layer
            stage = inc.extra["stage"] = self._device_staging.take(
                self.pool.staging_shape(len(inc.dst), len(inc.heads), lay.num_layers),
                lay.dtype)
        ep = self._ep(conn)
        reqs: list[Any] = []
        inc.extra["reqs"], inc.extra["per_layer"] = reqs, per_layer
        try:
            for layer in range(lay.num_layers):
                for kv in (0, 1):
                    at = 0
                    for seg in segs:
                        if stage is None:
                            buf = ucx.buffer(self.pool, kv, layer, seg.dst, seg.count)
                        else:
                            buf = ucx.tensor(stage[layer, kv, at : at + seg.count])
                        at += seg.count
                        reqs.append(ep.tag_recv(buf, ucx.tag(inc.slot, len(reqs))))
        except Exception as e:
            raise TransferError(f"posting UCX receives: {type(e).__name__}: {e}") from e

    def _recv_layer(self, conn: Conn, inc: Incoming, header: KVHeader) -> None:
        """A LAYER mark: the sender posted this layer's sends. A staged session unpacks the
        layer once its receives complete; a whole-region one has nothing to do (its bytes
        land in the pool directly)."""
        if header.payload_len:
            raise HeaderError("a UCX transfer carries no LAYER data on its control socket")
        stage = inc.extra.get("stage")
        if stage is None:
            return
        n, layer = inc.extra["per_layer"], header.layer
        _wait(inc.extra["reqs"][layer * n : (layer + 1) * n], lambda: inc.pt.deadline,
              f"layer {layer} of {inc.pt.request_id}")
        self.pool.scatter_heads(layer, inc.dst, inc.heads, stage[layer])

    def _await_data(self, conn: Conn, inc: Incoming) -> None:
        missing = set(range(self.pool.layout.num_layers)) - inc.layers
        if missing:
            raise TransferError(f"END before the marks of layers {sorted(missing)[:8]}")
        _wait(inc.extra["reqs"], lambda: inc.pt.deadline, f"the KV of {inc.pt.request_id}")

    def _wake(self, conn: Conn) -> None:
        if (peer := _peer(conn)) is not None:
            peer.close()  # cancels the receives still posted (the thread then reports)
        conn.shutdown()

    def _abandon(self, conn: Conn, inc: Incoming) -> None:
        if (peer := _peer(conn)) is not None:
            peer.close()  # cancels the receives still posted into the pool
        deadline = time.monotonic() + 2.0
        for r in inc.extra.get("reqs", ()):
            while not r.completed and time.monotonic() < deadline:
                time.sleep(1e-3)

    def _release(self, inc: Incoming) -> None:
        stage = inc.extra.pop("stage", None)
        if stage is None:
            return
        if all(r.completed for r in inc.extra.get("reqs", ())):
            self._device_staging.give(stage)
        else:
            self._orphans.append(stage)  # a receive may still land there

    def _drop(self, conn: Conn) -> None:
        if (peer := _peer(conn)) is not None:
            peer.close()

    def close(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # endpoints first, while the progress thread still runs
            self._drop(conn)
        super().close()
        self._ucx.stop()


class UcxSender(_UcxHandshake, TcpSender):
    scheme = "ucx"

    def __init__(self, pool: KVPool, connect_timeout_s: float = 5.0,
                 config: UcxConfig | None = None, secret: bytes | None = None):
        self._ucx = _Ucx(config or UcxConfig(), "ucx-tx")
        self._orphans: list[torch.Tensor] = []  # staging a cancelled send may still read
        super().__init__(pool, connect_timeout_s, secret)

    def _staging_device(self) -> torch.device:
        return self.pool.device  # UCX sends from device memory as well

    def connect(self, address: str) -> None:
        conn = self._connect(address)
        try:
            self._ep(conn)  # the endpoint too: built lazily, it would cost the first request
        except Exception as e:  # ucxx raises its own UCX* error types
            self._discard(conn)
            raise TransferError(f"UCX endpoint to {address}: {type(e).__name__}: {e}") from e
        self._release(address, conn)

    def _send_layer_data(self, session: TcpSession, layer: int) -> None:
        ucx, lay = self._ucx, self.pool.layout
        segs = session.extra.get("segs")
        if segs is None:
            segs = session.extra["segs"] = paired_runs(session.src, session.dst)
            _messages(lay.num_layers, segs)
            session.extra["reqs"] = []
        reqs = session.extra["reqs"]
        index = layer * 2 * len(segs)
        stage = None
        if not session.whole:  # a head slice: pack this layer; it must live until finish
            stage = self._stage(session, lay.num_layers)[layer]
            self.pool.gather_heads(layer, session.src, session.heads, stage)
            self.pool.sync()
        try:
            ep = self._ep(session._conn)  # endpoint creation fails if the peer just died
            for kv in (0, 1):
                at = 0
                for seg in segs:
                    if stage is None:
                        buf = ucx.buffer(self.pool, kv, layer, seg.src, seg.count)
                    else:
                        buf = ucx.tensor(stage[kv, at : at + seg.count])
                    at += seg.count
                    reqs.append(ep.tag_send(buf, ucx.tag(session.slot, index)))
                    index += 1
        except Exception as e:
            raise TransferError(f"posting UCX sends: {type(e).__name__}: {e}") from e
        # The mark: renews the receiver's lease and lets it unpack this layer.
        send_message(session._conn.sock, MsgKind.LAYER, lay, session.request_id,
                     num_blocks=len(session.src), layer=layer)

    def _before_end(self, session: TcpSession) -> None:
        _wait(session.extra.get("reqs", []), lambda: session.deadline,
              f"sends of {session.request_id}")

    def _abandon(self, session: TcpSession) -> None:
        if (peer := _peer(session._conn)) is not None and session.extra.get("reqs"):
            peer.close()  # cancels sends still in flight

    def _release_staging(self, session: TcpSession) -> None:
        stage = session.extra.pop("stage", None)
        if stage is None:
            return
        if all(r.completed for r in session.extra.get("reqs", ())):
            self._staging.give(stage)
        else:
            self._orphans.append(stage)  # a cancelled send may still read it

    def _drop(self, conn: Conn) -> None:
        if (peer := _peer(conn)) is not None:
            peer.close()

    def close(self) -> None:
        super().close()
        self._ucx.stop()
