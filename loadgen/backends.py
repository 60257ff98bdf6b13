"""The request driver interface: how a spec becomes a stream of events, per protocol.

A backend turns a `RequestSpec` into the reply's `StreamEvent`s and raises `BackendError`
with a status name when the request fails; it does no timing (the runner timestamps events as
they arrive) and no statistics. `grpc` is the pdserve streaming API; `openai` the
OpenAI-compatible HTTP API (SSE chunks -> events; loadgen/openai_backend.py);
`backend_factory.make_backend` builds one by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from loadgen.record import StreamEvent
from loadgen.workloads import RequestSpec

BACKENDS = ("grpc", "openai")


class Backend(ABC):
    name: str

    @abstractmethod
    async def start(self) -> None:
        """Connect (inside the running event loop); raise BackendError if the server cannot be
        reached, so a run fails up front instead of counting every request as an error."""

    @abstractmethod
    def stream(self, spec: RequestSpec, timeout_s: float | None) -> AsyncIterator[StreamEvent]:
        """Send one request and yield its messages; the last carries `final`. Raises
        BackendError on failure. Cancelling the consuming task cancels the request."""

    @abstractmethod
    async def close(self) -> None: ...
