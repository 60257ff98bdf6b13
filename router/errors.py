"""How a request ends when it does not finish, shared by the request flow, the gRPC service
and the OpenAI HTTP front end (router/openai_http.py)."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    """How a request ended when it did not finish: a gRPC status and a message. The gRPC
    service aborts with it; the HTTP front end maps it to an HTTP status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class RequestFailed(RuntimeError):
    """A request that could not be served for a reason that is not the client's: a worker
    died, or the KV transfer failed twice. Maps to UNAVAILABLE."""


class WorkerDied(RequestFailed):
    """The worker serving a request died under it (a candidate for migration)."""
