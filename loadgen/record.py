"""What one request measured: the client-side timeline and the server's own breakdown.

The runner fills a `RequestRecord` from a backend's `StreamEvent`s, timestamping each with
`time.perf_counter` as it arrives:
- TTFT: send -> the first message carrying tokens.
- ITL: one value per output token after the first. A message carrying k tokens, g ms after the
  previous token-carrying message, adds k values of g/k (the tokens it batched arrived
  together); extra tokens in the first message add zeros. So the values sum to the time from
  the first to the last token and there are `output_tokens - 1` of them.
- e2e: send -> the end of the stream (the final message).
- TPOT: (e2e - ttft) / (output_tokens - 1); undefined (None) for one output token.
Server-side phases (queue, prefill, transfer, decode) come from the final message; a server
that does not report them (any OpenAI server but pdserve) leaves them None, never 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OK = "OK"  # status of a request that ended with a final message


@dataclass(slots=True)
class ServerFinal:
    """The final stream message's summary, backend-neutral (milliseconds; a timing is None
    when the server did not report it)."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queue_ms: float | None
    prefill_ms: float | None
    transfer_ms: float | None
    decode_ms: float | None
    ttft_ms: float | None
    e2e_ms: float | None
    prefill_worker: str = ""
    decode_worker: str = ""
    kv_transport: str = ""
    retries: int = 0


@dataclass(slots=True)
class StreamEvent:
    """One message of a reply stream, as a backend yields it."""

    num_tokens: int  # output tokens this message carries
    final: ServerFinal | None = None  # set on the last message


class BackendError(Exception):
    """A request the server (or the transport) failed; `code` is a status name such as
    INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


@dataclass(slots=True)
class RequestRecord:
    index: int
    traffic_class: str
    warmup: bool
    ttft_slo_ms: float = 0.0  # 0 = no target
    tpot_slo_ms: float = 0.0
    input_tokens_sent: int | None = None  # prompt length when sent as token ids
    send_s: float = 0.0  # seconds since the run started
    end_s: float = 0.0
    status: str = OK  # OK, or a status name (see BackendError) / NO_FINAL / CLIENT_ERROR
    error: str = ""
    output_tokens: int = 0
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    server: ServerFinal | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def tpot_ms(self) -> float | None:
        if not self.ok or self.ttft_ms is None or self.e2e_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    @property
    def prompt_tokens(self) -> int:
        if self.server is not None:
            return self.server.prompt_tokens
        return self.input_tokens_sent or 0

    @property
    def met_ttft(self) -> bool:
        """Succeeded and, when there is a TTFT target, met it."""
        if not self.ok:
            return False
        return self.ttft_slo_ms <= 0 or (self.ttft_ms is not None
                                         and self.ttft_ms <= self.ttft_slo_ms)

    @property
    def met_tpot(self) -> bool:
        """Succeeded and, when there is a TPOT target, met it (one output token: no TPOT,
        nothing to miss)."""
        if not self.ok:
            return False
        tpot = self.tpot_ms
        return self.tpot_slo_ms <= 0 or tpot is None or tpot <= self.tpot_slo_ms

    @property
    def met_slo(self) -> bool:
        return self.met_ttft and self.met_tpot

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_ms"] = self.tpot_ms
        return d
