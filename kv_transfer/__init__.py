"""Moving paged KV blocks between workers' pools (see transport.py for the contract).

    pool = KVPool.from_engine(engine)                       # or KVPool(k, v, KVLayout(...))
    rx = make_receiver("auto", pool)                        # decode side; rx.address
    pending = rx.expect(request_id, dst_block_ids, on_done) # after engine.reserve_kv
    tx = make_sender("auto", pool)                          # prefill side
    tx.send(rx.address, KVControl(request_id, n_computed, (first_token,)), src_ids, dst_ids)

Workers do not drive transports by hand: each role has one connector over them, used the same
way by every TP rank. `PrefillConnector` (prefill_connector.py) plans a request's routes,
keeps its reservation's lease alive, opens its sessions in the step its prompt completes,
ships each layer as it is written and finishes off the engine thread, reporting each request
once. `DecodeConnector` (decode_connector.py) expects reservations with the receiver and
reports each once, ok (commit) or failed (cancel), and merges the TP ranks' parts.

Different prefill and decode TP sizes: every rank has its own pool, receiver and sender;
`plan_head_routes` (tp_plan.py) says which prefill rank sends which heads to which decode
rank, each route one session `tx.send(..., heads=route.heads)` into a receiver that expects
`num_senders` of them.

Transports: "ucx" (ucxx bindings; shared memory on one host, RDMA verbs across hosts where
the UCX build has them), "tcp" (sockets), "local" (same process, needs a LocalHub). "auto"
picks UCX where `ucxx` imports, else TCP, and logs the choice. Both ends of a transfer must use
the same kind (addresses carry it: ucx://, tcp://, local://).
"""

from __future__ import annotations

import logging

from kv_transfer.control import KVControl, TransferError, TransferResult
from kv_transfer.header import (
    HeaderError,
    HeadSlice,
    KVHeader,
    KVLayout,
    KVLayoutMismatch,
    MsgKind,
)
from kv_transfer.local import LocalHub, LocalReceiver, LocalSender
from kv_transfer.pool import KVPool
from kv_transfer.receiver_core import PendingTransfer
from kv_transfer.tcp_receiver import TcpReceiver
from kv_transfer.tcp_sender import TcpSender
from kv_transfer.tp_plan import HeadRoute, plan_head_routes, routes_by_src, senders_per_dst
from kv_transfer.transport import KVReceiver, KVSender, SendSession

log = logging.getLogger(__name__)

__all__ = [
    "HeadRoute", "HeadSlice", "HeaderError", "KVControl", "KVHeader", "KVLayout",
    "KVLayoutMismatch", "KVPool", "KVReceiver", "KVSender", "LocalHub", "MsgKind",
    "PendingTransfer", "SendSession", "TransferError", "TransferResult", "available_transports",
    "make_receiver", "make_sender", "plan_head_routes", "routes_by_src", "senders_per_dst",
]


def _ucx_importable() -> bool:
    try:
        import ucxx  # noqa: F401  (lazy: an optional, heavy dependency)
    except (ImportError, OSError) as e:  # absent, or a native library that fails to load
        log.debug("ucxx unavailable: %s", e)
        return False
    return True


def available_transports() -> list[str]:
    """Transports usable in this process, best first."""
    return (["ucx"] if _ucx_importable() else []) + ["tcp", "local"]


def _resolve(kind: str) -> str:
    if kind == "auto":
        picked = "ucx" if _ucx_importable() else "tcp"
        log.info("KV transfer: 'auto' picked the %s transport", picked)
        return picked
    if kind not in ("ucx", "tcp", "local"):
        raise ValueError(f"unknown KV transport {kind!r}; choose ucx, tcp, local or auto")
    if kind == "ucx" and not _ucx_importable():
        raise ValueError("the ucx KV transport needs the ucxx package (pip install ucxx-cu12)")
    return kind


def make_receiver(kind: str, pool: KVPool, *, host: str = "127.0.0.1", port: int = 0,
                  hub: LocalHub | None = None, **options) -> KVReceiver:
    """A receiver bound to `pool`, listening on host:port (0 = any free port). `options` go to
    the transport (UCX: `config=UcxConfig(...)`)."""
    kind = _resolve(kind)
    if kind == "local":
        if hub is None:
            raise ValueError("the local transport needs a LocalHub shared with the sender")
        return LocalReceiver(pool, hub, **options)
    if kind == "tcp":
        return TcpReceiver(pool, host, port, **options)
    from kv_transfer.ucx import UcxReceiver  # lazy: imports ucxx, optional and heavy

    return UcxReceiver(pool, host, port, **options)


def make_sender(kind: str, pool: KVPool, *, hub: LocalHub | None = None,
                **options) -> KVSender:
    """A sender reading from `pool`."""
    kind = _resolve(kind)
    if kind == "local":
        if hub is None:
            raise ValueError("the local transport needs a LocalHub shared with the receiver")
        return LocalSender(pool, hub)
    if kind == "tcp":
        return TcpSender(pool, **options)
    from kv_transfer.ucx import UcxSender  # lazy: imports ucxx, optional and heavy

    return UcxSender(pool, **options)
