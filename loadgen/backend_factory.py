"""Build a loadgen backend by name (`BACKENDS`): the one place that knows every protocol."""

from __future__ import annotations

import os

from loadgen.backends import BACKENDS, Backend
from loadgen.grpc_backend import GrpcBackend
from loadgen.openai_backend import OpenAIBackend


def make_backend(name: str, address: str, *, channels: int = 1,
                 connect_timeout_s: float = 10.0) -> Backend:
    """`channels` applies to gRPC; the OpenAI backend sends `$PDSERVE_API_KEY` when set."""
    if name == "grpc":
        return GrpcBackend(address, channels=channels, connect_timeout_s=connect_timeout_s)
    if name == "openai":
        return OpenAIBackend(address, connect_timeout_s=connect_timeout_s,
                             api_key=os.environ.get("PDSERVE_API_KEY"))
    raise ValueError(f"backend {name!r}: must be one of {', '.join(BACKENDS)}")
