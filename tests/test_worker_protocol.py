"""The router <-> worker protocol (pdserve_api/worker_protocol.py): every message survives
Ray's serializer unchanged, and every Ray method of the worker actors is typed with these
messages, never an untyped dict."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
import ray
import ray.cloudpickle as cloudpickle
from cluster_helpers import ray_session

from colocated_worker.worker import ColocatedWorker
from decode_worker.worker import DecodeWorker
from pdserve_api import worker_protocol as wp
from pdserve_api.sampling import SamplingParams
from prefill_worker.worker import PrefillWorker
from worker_host.actor import WorkerBase
from worker_host.tp_follower import TPFollowerWorker

SAMPLING = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=11, stop=["x"],
                          stop_token_ids=[2])
LOAD = wp.WorkerLoad(free_blocks=12, num_running=3)
TIMING = wp.PrefillTiming(num_cached_tokens=16, queued_s=0.25, prefill_s=0.5)

MESSAGES = [
    wp.ReadyInfo("decode-0", "decode", 96, 16, 512, "127.0.0.1:9000", 4242, "ucx", 2,
                 ["ucx://a", "ucx://b"]),
    wp.WorkerStats("prefill-1", 10, 2, 96, 1, 3, 0.01, 4, 100),
    wp.IntegrityReport(90, 96, ["r1"], ["r1"]),
    LOAD,
    TIMING,
    wp.ReserveRequest("r1#1", [5, 6, 7], SAMPLING, 30.0, 2),
    wp.Reservation(["tcp://x:1"], [3, 4], LOAD),
    wp.Refused(wp.RefusalReason.NO_KV_SPACE, "no room", LOAD),
    wp.Refused(wp.RefusalReason.ERROR, "bad"),
    wp.PrefillRequest("r1", [5, 6, 7], SAMPLING, ["tcp://x:1"], [3, 4]),
    wp.PrefillResult("r1", "prefill-0", [9], "a", False, "prefilled", TIMING, 0.1, "tcp"),
    wp.PrefillResult("r1", "prefill-0", error="died", retry_on=wp.FailedSide.PREFILL),
    wp.StreamItem(wp.StreamKind.TOKENS, [1, 2], "ab", timing=TIMING),
    wp.StreamItem(wp.StreamKind.FINISHED, [3], "c", finish_reason="length", decode_s=1.5),
    wp.StreamItem(wp.StreamKind.ERROR, error="KV transfer failed"),
    wp.ColocatedRequest("r2", [1, 2, 3], SAMPLING),
    wp.FollowerReady("decode-0/tp1", 1, 96, 4343, "ucx://b"),
    wp.FollowerAlive("decode-0/tp1", 12, True),
    wp.SendPlan("r1", ["ucx://a"], [1, 2]),
    wp.ExpectKV("r1", [1, 2], 2, 30.0),
    wp.RankTransfer(None, 4096),
]


def test_every_message_is_covered_here():
    defined = {obj for obj in vars(wp).values()
               if dataclasses.is_dataclass(obj) and obj.__module__ == wp.__name__}
    assert defined == {type(m) for m in MESSAGES}
    for cls in defined:  # slotted: no per-instance __dict__ to grow by accident
        assert "__slots__" in vars(cls), cls.__name__


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trips_through_rays_serializer(message):
    back = cloudpickle.loads(cloudpickle.dumps(message))
    assert back == message and type(back) is type(message)
    if hasattr(message, "sampling"):
        assert back.sampling == SAMPLING and type(back.sampling) is SamplingParams


def test_messages_round_trip_through_a_ray_object_store():
    with ray_session():
        assert ray.get(ray.put(MESSAGES)) == MESSAGES


ACTORS = [PrefillWorker, DecodeWorker, ColocatedWorker, TPFollowerWorker]


def _untyped_dicts(annotation: object) -> list[str]:
    """The dict types inside an annotation whose values are untyped (bare dict or Any)."""
    found = []
    origin = typing.get_origin(annotation)
    if annotation is dict or (origin is dict and (not typing.get_args(annotation) or
                                                  typing.get_args(annotation)[1] is typing.Any)):
        found.append(repr(annotation))
    if annotation is typing.Any:
        found.append("Any")
    for arg in typing.get_args(annotation):
        found += _untyped_dicts(arg)
    return found


@pytest.mark.parametrize("cls", ACTORS, ids=lambda c: c.__name__)
def test_worker_methods_take_and_return_typed_messages(cls):
    """Every public method a Ray caller can reach is fully annotated, and no parameter or
    return type is a dict of untyped values (the protocol's messages replace them)."""
    bad = {}
    methods = [(n, f) for n, f in inspect.getmembers(cls, inspect.isfunction)
               if not n.startswith("_")]
    assert methods
    for name, fn in methods:
        hints = typing.get_type_hints(fn)
        # `_ray_trace_ctx`: Ray adds it to an actor class's method signatures in place once
        # the class has been made an actor (an earlier test in the same process may have).
        params = [p for p in inspect.signature(fn).parameters
                  if p not in ("self", "_ray_trace_ctx")]
        missing = [p for p in [*params, "return"] if p not in hints]
        untyped = [u for h in hints.values() for u in _untyped_dicts(h)]
        if missing or untyped:
            bad[name] = {"missing": missing, "untyped": untyped}
    assert bad == {}, f"{cls.__name__}: {bad}"


def test_the_annotation_check_catches_an_untyped_dict():
    def reply(x: dict[str, typing.Any]) -> dict:  # what the protocol replaced
        return x

    hints = typing.get_type_hints(reply)
    assert _untyped_dicts(hints["x"]) and _untyped_dicts(hints["return"])
    assert not _untyped_dicts(dict[str, str]) and not _untyped_dicts(list[wp.StreamItem])
    assert issubclass(PrefillWorker, WorkerBase)
