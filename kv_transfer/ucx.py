"""UCX transport (ucxx bindings): TCP control socket, UCX tag messages for the block bytes.

Shape: the control protocol of tcp_receiver.py (HELLO / BEGIN / ACCEPT / LAYER / END / DONE,
same header and checks) runs on a plain TCP socket; the HELLOs carry each side's UCX *worker
address*, and each side makes a UCX endpoint from the other's. After BEGIN passes its checks
the receiver posts one `tag_recv` per run of blocks consecutive on both sides
(`pool.paired_runs`), per layer, for K and V, directly into views of its pool, then sends
ACCEPT with a fresh slot number; tag = slot << 32 | message index, so transfers never cross.
`send_layer` posts the matching `tag_send`s from views of the sender's pool (host numpy views,
or CUDA tensors by `__cuda_array_interface__`; untested here, no GPU) and returns; `finish`
waits for them, sends END, and the receiver answers DONE once its receives have completed.
Nothing is staged or concatenated in Python for whole-region sessions.

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

UCX context settings and their measurements: ucx_context.py.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kv_transfer.control import TransferError
from kv_transfer.header import HeaderError, KVHeader, MsgKind
from kv_transfer.pool import KVPool, paired_runs
from kv_transfer.staging import StagingCache
from kv_transfer.tcp_receiver import Incoming, TcpReceiver
from kv_transfer.tcp_sender import TcpSender, TcpSession
from kv_transfer.ucx_context import (
    Ucx,
    UcxConfig,
    UcxHandshake,
    num_messages,
    peer_of,
    wait_requests,
)
from kv_transfer.wire import Conn, send_message


class UcxReceiver(UcxHandshake, TcpReceiver):
    scheme = "ucx"

    def __init__(self, pool: KVPool, host: str = "127.0.0.1", port: int = 0,
                 name: str | None = None, config: UcxConfig | None = None,
                 secret: bytes | None = None):
        self._ucx = Ucx(config or UcxConfig(), name or "ucx-rx")
        self._orphans: list[torch.Tensor] = []  # staging posted to after a failure: kept
        self._device_staging = StagingCache(pool.device)
        super().__init__(pool, host, port, name, secret)

    def _prepare(self, conn: Conn, inc: Incoming) -> None:
        lay, ucx = self.pool.layout, self._ucx
        segs = paired_runs(inc.src, inc.dst)
        per_layer = 2 * len(segs)
        num_messages(lay.num_layers, segs)
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
        wait_requests(inc.extra["reqs"][layer * n : (layer + 1) * n], lambda: inc.pt.deadline,
              f"layer {layer} of {inc.pt.request_id}")
        self.pool.scatter_heads(layer, inc.dst, inc.heads, stage[layer])

    def _await_data(self, conn: Conn, inc: Incoming) -> None:
        missing = set(range(self.pool.layout.num_layers)) - inc.layers
        if missing:
            raise TransferError(f"END before the marks of layers {sorted(missing)[:8]}")
        wait_requests(inc.extra["reqs"], lambda: inc.pt.deadline, f"the KV of {inc.pt.request_id}")

    def _wake(self, conn: Conn) -> None:
        if (peer := peer_of(conn)) is not None:
            peer.close()  # cancels the receives still posted (the thread then reports)
        conn.shutdown()

    def _abandon(self, conn: Conn, inc: Incoming) -> None:
        if (peer := peer_of(conn)) is not None:
            peer.close()  # cancels the receives still posted into the pool
        deadline = time.monotonic() + 2.0
        for r in inc.extra.get("reqs", ()):
            while not r.completed and time.monotonic() < deadline:
                time.sleep(1e-3)

    def _release(self, inc: Incoming) -> None:
        _return_staging(inc.extra, self._device_staging, self._orphans)

    def _drop(self, conn: Conn) -> None:
        if (peer := peer_of(conn)) is not None:
            peer.close()

    def close(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # endpoints first, while the progress thread still runs
            self._drop(conn)
        super().close()
        self._ucx.stop()


class UcxSender(UcxHandshake, TcpSender):
    scheme = "ucx"

    def __init__(self, pool: KVPool, connect_timeout_s: float = 5.0,
                 config: UcxConfig | None = None, secret: bytes | None = None):
        self._ucx = Ucx(config or UcxConfig(), "ucx-tx")
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
            num_messages(lay.num_layers, segs)
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
        wait_requests(session.extra.get("reqs", []), lambda: session.deadline,
              f"sends of {session.request_id}")

    def _abandon(self, session: TcpSession) -> None:
        if (peer := peer_of(session._conn)) is not None and session.extra.get("reqs"):
            peer.close()  # cancels sends still in flight

    def _release_staging(self, session: TcpSession) -> None:
        _return_staging(session.extra, self._staging, self._orphans)

    def _drop(self, conn: Conn) -> None:
        if (peer := peer_of(conn)) is not None:
            peer.close()

    def close(self) -> None:
        super().close()
        self._ucx.stop()


def _return_staging(extra: dict[str, Any], cache: StagingCache,
                    orphans: list[torch.Tensor]) -> None:
    """A session's staging buffer back to its cache once every UCX request posted on it has
    completed; otherwise kept aside for good, since a receive may still land in it or a
    cancelled send still read it."""
    stage = extra.pop("stage", None)
    if stage is None:
        return
    if all(r.completed for r in extra.get("reqs", ())):
        cache.give(stage)
    else:
        orphans.append(stage)
