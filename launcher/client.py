"""A small synchronous gRPC client for the router, and the body of `pdserve generate --address`.

Requests are built with `router.api.build_generate_request`; this module only moves them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve_api import pdserve_pb2, pdserve_pb2_grpc
from pdserve_api.messages import build_generate_request
from pdserve_api.sampling import SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Self


class ResponseStream(Protocol):
    """A Generate call in progress (a grpc call object): iterate it for the messages;
    `cancel()` aborts the request on the router."""

    def __iter__(self) -> Iterator[pdserve_pb2.GenerateResponse]: ...

    def __next__(self) -> pdserve_pb2.GenerateResponse: ...

    def cancel(self) -> bool: ...


# Exit codes of run_generate: bad input and "overloaded, retry later" are worth telling apart
# in scripts from every other failure.
EXIT_ERROR, EXIT_INVALID_ARGUMENT, EXIT_RESOURCE_EXHAUSTED = 1, 2, 3


@dataclass
class GenerateResult:
    """A whole reply: all deltas joined, plus the final message's summary."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    final: pdserve_pb2.FinalInfo | None = None


class GenerateClient:
    """One channel to a router. `timeout_s` is the default deadline per call (None: none).
    `api_key` (default $PDSERVE_API_KEY) goes out as `authorization: Bearer`; `tls_ca_file`
    switches to TLS against that CA, with `tls_cert_file`/`tls_key_file` for mutual TLS."""

    def __init__(self, address: str, timeout_s: float | None = None, *,
                 api_key: str | None = None, tls_ca_file: str | None = None,
                 tls_cert_file: str | None = None, tls_key_file: str | None = None):
        self.address = address
        self.timeout_s = timeout_s
        api_key = api_key if api_key is not None else os.environ.get("PDSERVE_API_KEY")
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        if tls_ca_file:
            def read(path: str | None) -> bytes | None:
                return Path(path).read_bytes() if path else None

            creds = grpc.ssl_channel_credentials(read(tls_ca_file), read(tls_key_file),
                                                 read(tls_cert_file))
            self._channel = grpc.secure_channel(address, creds)
        else:
            self._channel = grpc.insecure_channel(address)
        self._stub = pdserve_pb2_grpc.PDServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def stream(self, request: pdserve_pb2.GenerateRequest,
               timeout_s: float | None = None) -> ResponseStream:
        """The raw call: iterate it for the messages, `.cancel()` it to abort the request.
        Iterating raises grpc.RpcError on a failed call."""
        return self._stub.Generate(request, timeout=self._timeout(timeout_s),
                                   metadata=self._metadata)

    def generate(self, request: pdserve_pb2.GenerateRequest,
                 timeout_s: float | None = None) -> GenerateResult:
        """Run a request to completion; raises grpc.RpcError on a failed call."""
        result = GenerateResult(request_id=request.request_id)
        for msg in self.stream(request, timeout_s):
            result.request_id = msg.request_id or result.request_id
            result.token_ids.extend(msg.token_ids)
            result.text += msg.text
            if msg.HasField("final"):
                result.final = msg.final
        if result.final is None:
            raise RuntimeError(f"stream for request {result.request_id!r} from {self.address} "
                               "ended without a final message")
        return result

    def health(self, service: str = "", timeout_s: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" = the whole server), e.g. "SERVING"."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                  timeout=self._timeout(timeout_s))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s


def format_final(final: pdserve_pb2.FinalInfo) -> str:
    """One bracketed line: finish reason, token counts, per-phase times, placement."""
    t = final.timing
    phases = " ".join(f"{name}={getattr(t, name + '_ms'):.1f}ms"
                      for name in ("queued", "prefill", "transfer", "decode", "ttft", "e2e"))
    retries = f" retries={final.retries}" if final.retries else ""
    return (f"[finish_reason={final.finish_reason} prompt={final.prompt_tokens} "
            f"cached={final.cached_tokens} completion={final.completion_tokens} {phases} "
            f"prefill_worker={final.prefill_worker} decode_worker={final.decode_worker} "
            f"transport={final.kv_transport}{retries}]")


def _error_message(address: str, e: grpc.RpcError) -> str:
    code = e.code()
    details = e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return (f"pdserve: error: UNAVAILABLE: cannot reach the pdserve router at {address} "
                f"(is it running? check --address): {details}")
    return f"pdserve: error: {code.name}: {details}"


def run_generate(address: str, *, prompt: str, chat: bool, sampling: SamplingParams,
                 ttft_ms: float = 0.0, tpot_ms: float = 0.0, priority: int = 0,
                 out: TextIO | None = None, err: TextIO | None = None,
                 tls_ca_file: str | None = None) -> int:
    """Stream one reply to `out`, then a summary line to `err` (default: the current
    sys.stdout / sys.stderr); returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    request = build_generate_request(
        chat=[{"role": "user", "content": prompt}] if chat else None,
        text=None if chat else prompt,
        sampling=sampling, ttft_ms=ttft_ms, tpot_ms=tpot_ms, priority=priority)
    final, wrote = None, False
    with GenerateClient(address, tls_ca_file=tls_ca_file) as client:
        call = client.stream(request)
        try:
            for msg in call:
                if msg.text:
                    out.write(msg.text)
                    out.flush()
                    wrote = True
                if msg.HasField("final"):
                    final = msg.final
        except grpc.RpcError as e:
            if wrote:  # end the partial reply's line so the error starts on its own
                out.write("\n")
            print(_error_message(address, e), file=err)
            return {grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID_ARGUMENT,
                    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_RESOURCE_EXHAUSTED,
                    }.get(e.code(), EXIT_ERROR)
        except KeyboardInterrupt:
            call.cancel()  # tells the router to abort the request and free its KV blocks
            out.write("\n")
            print("pdserve: cancelled", file=err)
            return 130
    out.write("\n")
    if final is None:
        print(f"pdserve: error: the stream from {address} ended without a final message",
              file=err)
        return EXIT_ERROR
    print(format_final(final), file=err)
    return 0
