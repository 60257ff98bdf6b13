"""The pdserve gRPC streaming API (`pdserve.v1.PDServe/Generate`) as a loadgen backend.

One asyncio process keeps hundreds of streams in flight over `channels` HTTP/2 connections
(requests round-robin over them).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from loadgen.backends import Backend
from loadgen.record import BackendError, ServerFinal, StreamEvent
from loadgen.workloads import RequestSpec
from pdserve_api import pdserve_pb2, pdserve_pb2_grpc
from pdserve_api.messages import build_generate_request


def to_request(spec: RequestSpec) -> pdserve_pb2.GenerateRequest:
    sampling = {"max_tokens": spec.max_tokens, "temperature": spec.temperature,
                "ignore_eos": spec.ignore_eos}
    return build_generate_request(token_ids=spec.token_ids, text=spec.text, chat=spec.chat,
                                  sampling=sampling, ttft_ms=spec.ttft_ms, tpot_ms=spec.tpot_ms,
                                  priority=spec.priority)


def from_final(final: pdserve_pb2.FinalInfo) -> ServerFinal:
    t = final.timing
    return ServerFinal(
        finish_reason=final.finish_reason, prompt_tokens=final.prompt_tokens,
        cached_tokens=final.cached_tokens, completion_tokens=final.completion_tokens,
        queue_ms=t.queued_ms, prefill_ms=t.prefill_ms, transfer_ms=t.transfer_ms,
        decode_ms=t.decode_ms, ttft_ms=t.ttft_ms, e2e_ms=t.e2e_ms,
        prefill_worker=final.prefill_worker, decode_worker=final.decode_worker,
        kv_transport=final.kv_transport, retries=final.retries)


class GrpcBackend(Backend):
    name = "grpc"

    def __init__(self, address: str, *, channels: int = 1, connect_timeout_s: float = 10.0):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.address = address
        self.num_channels = channels
        self.connect_timeout_s = connect_timeout_s
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pdserve_pb2_grpc.PDServeStub] = []
        self._next = itertools.count()

    async def start(self) -> None:
        # Distinct channel args keep gRPC from sharing one subchannel (connection) among them.
        self._channels = [grpc.aio.insecure_channel(self.address,
                                                    options=[("grpc.channel_id", i)])
                          for i in range(self.num_channels)]
        self._stubs = [pdserve_pb2_grpc.PDServeStub(c) for c in self._channels]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(c.channel_ready() for c in self._channels)),
                self.connect_timeout_s)
        except asyncio.TimeoutError:
            await self.close()
            raise BackendError("UNAVAILABLE", f"cannot reach the pdserve router at "
                               f"{self.address} within {self.connect_timeout_s:g} s "
                               "(is it running? check --address)") from None

    async def stream(self, spec: RequestSpec,
                     timeout_s: float | None) -> AsyncIterator[StreamEvent]:
        stub = self._stubs[next(self._next) % len(self._stubs)]
        call = stub.Generate(to_request(spec), timeout=timeout_s)
        try:
            async for msg in call:
                final = from_final(msg.final) if msg.HasField("final") else None
                yield StreamEvent(len(msg.token_ids), final)
        except grpc.aio.AioRpcError as e:
            raise BackendError(e.code().name, e.details() or "") from None
        finally:
            if not call.done():
                call.cancel()

    async def close(self) -> None:
        for c in self._channels:
            await c.close()
        self._channels, self._stubs = [], []
