"""What a transfer says besides the blocks: the control message that completes it, the
result each side reports, and the receiver's refusals.

`KVControl` rides in the END message (prefill side -> decode side) and is read by the decode
side's owner for `commit_kv`. `TransferResult` is what a receiver reports to its owner once
per reservation, and what a sender's `finish` returns. A refusal travels as REFUSE(code, why)
and becomes `KVLayoutMismatch` or `TransferError` on the sender.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kv_transfer.header import HeaderError, KVLayoutMismatch

MAX_OUTPUT_TOKENS = 4096
_CTRL = struct.Struct("!II")


class TransferError(RuntimeError):
    """A transfer did not complete: refused by the receiver, peer gone, or timed out."""


@dataclass(frozen=True)
class KVControl:
    """Rides with the blocks. Read by the decode side's owner for `commit_kv`."""

    request_id: str
    num_computed_tokens: int  # tokens whose KV the blocks hold
    output_token_ids: tuple[int, ...] = ()  # tokens the prefill side already sampled

    def encode(self) -> bytes:
        if len(self.output_token_ids) > MAX_OUTPUT_TOKENS:
            raise ValueError(f"more than {MAX_OUTPUT_TOKENS} output tokens in a KV control")
        toks = struct.pack(f"<{len(self.output_token_ids)}i", *self.output_token_ids)
        return _CTRL.pack(self.num_computed_tokens, len(self.output_token_ids)) + toks

    @classmethod
    def decode(cls, request_id: str, payload: bytes) -> KVControl:
        if len(payload) < _CTRL.size:
            raise HeaderError(f"control message of {len(payload)} bytes is too short")
        computed, n = _CTRL.unpack_from(payload)
        if n > MAX_OUTPUT_TOKENS or len(payload) != _CTRL.size + 4 * n:
            raise HeaderError(f"control message says {n} tokens in {len(payload)} bytes")
        tokens = struct.unpack_from(f"<{n}i", payload, _CTRL.size)
        return cls(request_id, computed, tuple(tokens))


@dataclass(frozen=True)
class TransferResult:
    """One transfer's outcome. Receiver side: handed to the owner once per `expect`."""

    request_id: str
    ok: bool
    control: KVControl | None = None  # set when ok
    error: str | None = None  # set when not ok: why
    num_bytes: int = 0  # KV bytes moved
    elapsed_s: float = 0.0  # receiver: first header to completion; sender: open to finish


class RefuseCode(enum.IntEnum):
    LAYOUT = 1
    UNKNOWN_REQUEST = 2
    BAD_BLOCKS = 3
    STATE = 4


class Refused(Exception):
    """Receiver-side refusal of a BEGIN; transports put it on the wire as REFUSE."""

    def __init__(self, code: RefuseCode, message: str):
        super().__init__(message)
        self.code = code


def refusal_error(code: int, message: str) -> Exception:
    """The sender-side exception for a receiver's refusal."""
    if code == RefuseCode.LAYOUT:
        return KVLayoutMismatch(f"receiver refused: {message}")
    return TransferError(f"receiver refused: {message}")
