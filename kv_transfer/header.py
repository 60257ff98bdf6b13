"""The KV-transfer wire header and the pool layout it describes.

Every message a transport puts on a wire starts with one `KVHeader`: a fixed, versioned,
struct-packed record (network byte order, never pickle) followed by two bounded UTF-8 strings
(model id, request id). A receiver reads `FIXED_SIZE` bytes, calls `KVHeader.total_size` (which
checks magic, version and both string lengths), reads the rest, then `KVHeader.decode`. Every
length is checked against a hard bound before anything is allocated, so a hostile or corrupt
peer costs at most `MAX_HEADER_SIZE` bytes and a clean `HeaderError`.

Fixed part (56 bytes, version 3):
    magic "PDKV" | version u16 | kind u8 | dtype code u8 | block_size u32 | num_layers u32 |
    num_kv_heads u32 | head_dim u32 | tp_rank u16 | tp_size u16 | layer u32 | num_blocks u32 |
    payload_len u64 | src_head u16 | dst_head u16 | head_count u16 | reserved u16 (0) |
    model_id_len u16 | request_id_len u16
then model_id bytes, request_id bytes, then `payload_len` bytes of payload (kind-specific).
The head fields (version 2) carry a BEGIN's `HeadSlice`: head_count 0 means none (the whole
pool, layouts must match exactly; then src_head and dst_head are 0 too); any other message
kind carries none. Decoding is strict: bytes that decode re-encode to the same bytes.

`KVLayout` describes one worker's KV pool; two pools can exchange whole blocks only when
`check_compatible` passes (same model, dtype, block size, layer count, KV head layout, TP rank).
A `HeadSlice` transfer (pools of different TP sizes, kv_transfer/tp_plan.py) moves `count`
heads between pools that differ only in their head count and TP place (`HEAD_FIELDS`).
Who reads what: the receiver checks the sender's layout before writing a byte; the sender reads
the receiver's replies (kind, payload) only.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields

import torch

MAGIC = b"PDKV"
VERSION = 3  # 3: KEEPALIVE, and UCX marks each layer with an empty LAYER
_FIXED = struct.Struct("!4sHBBIIIIHHIIQHHHHHH")
FIXED_SIZE = _FIXED.size  # 56

# Hard bounds, checked before any allocation. Generous for real models, tiny for memory.
MAX_MODEL_ID_LEN = 256
MAX_REQUEST_ID_LEN = 256
MAX_HEADER_SIZE = FIXED_SIZE + MAX_MODEL_ID_LEN + MAX_REQUEST_ID_LEN
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_BLOCK_SIZE = 1 << 16
MAX_TP_SIZE = 1024
MAX_BLOCKS = 1 << 24
MAX_PAYLOAD = 1 << 40
NO_LAYER = 0xFFFFFFFF
# Layout fields a head-sliced transfer lets differ between the two pools.
HEAD_FIELDS = ("num_kv_heads", "tp_rank", "tp_size")


class HeaderError(ValueError):
    """Bytes that are not a valid header of this version; the message says which check failed."""


class KVLayoutMismatch(ValueError):
    """Two KV pools whose blocks cannot be exchanged; `fields` names what differs."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = fields


class MsgKind(enum.IntEnum):
    """What follows the header. S = sender (prefill side), R = receiver (decode side)."""

    HELLO = 1  # S->R and R->S once per connection: payload = transport address (UCX) or empty
    BEGIN = 2  # S->R: payload = src then dst block ids, int32 little-endian, num_blocks each;
    #            header's head fields = the HeadSlice, if any
    ACCEPT = 3  # R->S: payload = u64 transfer slot (UCX tags derive from it)
    REFUSE = 4  # R->S: payload = u8 reason code + UTF-8 message
    LAYER = 5  # S->R: TCP: payload = K bytes then V bytes of `layer` for every block; UCX:
    #            empty, a mark that the layer's sends are posted (the receiver renews the
    #            lease and unpacks a staged layer once its receives complete)
    END = 6  # S->R: payload = control message (tokens computed, first output tokens)
    ABORT = 7  # S->R: payload = UTF-8 reason; the transfer is void
    DONE = 8  # R->S: every byte landed and the owner was told
    FAILED = 9  # R->S: payload = UTF-8 reason
    AUTH = 10  # both ways before HELLO when the cluster has a secret (kv_transfer/auth.py)
    KEEPALIVE = 11  # S->R between transfers: payload = request ids, "\n"-separated UTF-8; the
    #                receiver renews those reservations' leases and answers nothing


# Stable wire codes; never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
}
CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class KVLayout:
    """How one worker's KV pool is laid out. Pools exchange blocks only if these agree."""

    model_id: str
    dtype: torch.dtype
    block_size: int
    num_layers: int
    num_kv_heads: int  # heads held by this rank (after TP sharding)
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no KV wire code; "
                             f"supported: {sorted(str(d) for d in DTYPE_CODES)}")
        if len(self.model_id.encode()) > MAX_MODEL_ID_LEN:
            raise ValueError(f"model id longer than {MAX_MODEL_ID_LEN} bytes: "
                             f"{self.model_id[:40]!r}...")
        for name, hi in (("block_size", MAX_BLOCK_SIZE), ("num_layers", MAX_LAYERS),
                         ("num_kv_heads", MAX_KV_HEADS), ("head_dim", MAX_HEAD_DIM),
                         ("tp_size", MAX_TP_SIZE)):
            value = getattr(self, name)
            if not 0 < value <= hi:
                raise ValueError(f"{name}={value} outside (0, {hi}]")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={self.tp_rank} outside [0, tp_size={self.tp_size})")

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def region_bytes(self) -> int:
        """Bytes of one (layer, block) region of K (or of V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return 2 * self.num_layers * self.region_bytes

    @property
    def head_region_bytes(self) -> int:
        """Bytes of one KV head of one (layer, block) region of K (or of V)."""
        return self.block_size * self.head_dim * self.element_size

    def check_compatible(self, other: KVLayout, ignore: tuple[str, ...] = ()) -> None:
        """Raise KVLayoutMismatch naming every field where `other` (the peer) differs, except
        those in `ignore` (a head-sliced transfer ignores HEAD_FIELDS)."""
        diffs = [f.name for f in fields(self) if f.name not in ignore
                 and getattr(self, f.name) != getattr(other, f.name)]
        if diffs:
            detail = "; ".join(f"{name}: this side has {getattr(self, name)!r}, "
                               f"the peer has {getattr(other, name)!r}" for name in diffs)
            raise KVLayoutMismatch(f"KV layout mismatch ({detail})", tuple(diffs))


@dataclass(frozen=True)
class HeadSlice:
    """Which KV heads one transfer session moves: heads [src_head, src_head + count) of every
    (layer, block) region of the sender's pool into heads [dst_head, dst_head + count) of the
    receiver's. Head indices are local pool slots (kv_transfer/tp_plan.py maps a model's KV
    heads to them). Written by the sender into its BEGIN; read by the receiver's checks."""

    src_head: int
    dst_head: int
    count: int

    def __post_init__(self) -> None:
        if not (0 < self.count and 0 <= self.src_head and 0 <= self.dst_head
                and self.src_head + self.count <= MAX_KV_HEADS
                and self.dst_head + self.count <= MAX_KV_HEADS):
            raise ValueError(f"head slice src {self.src_head} dst {self.dst_head} count "
                             f"{self.count}: need count > 0 and heads in [0, {MAX_KV_HEADS}]")

    @property
    def dst_range(self) -> range:
        return range(self.dst_head, self.dst_head + self.count)


@dataclass(frozen=True)
class KVHeader:
    kind: MsgKind
    layout: KVLayout
    request_id: str = ""
    num_blocks: int = 0
    payload_len: int = 0
    layer: int = NO_LAYER
    heads: HeadSlice | None = None  # BEGIN only: the heads this session moves

    def encode(self) -> bytes:
        lay = self.layout
        model = lay.model_id.encode()
        rid = self.request_id.encode()
        if len(rid) > MAX_REQUEST_ID_LEN:
            raise HeaderError(f"request id longer than {MAX_REQUEST_ID_LEN} bytes")
        if not 0 <= self.num_blocks <= MAX_BLOCKS or not 0 <= self.payload_len <= MAX_PAYLOAD:
            raise HeaderError(f"num_blocks {self.num_blocks} or payload {self.payload_len} "
                              "out of bounds")
        if self.heads is not None and self.kind != MsgKind.BEGIN:
            raise HeaderError(f"a head slice rides on BEGIN only, not {self.kind.name}")
        h = self.heads
        src, dst, count = (h.src_head, h.dst_head, h.count) if h is not None else (0, 0, 0)
        fixed = _FIXED.pack(MAGIC, VERSION, int(self.kind), DTYPE_CODES[lay.dtype],
                            lay.block_size, lay.num_layers, lay.num_kv_heads, lay.head_dim,
                            lay.tp_rank, lay.tp_size, self.layer, self.num_blocks,
                            self.payload_len, src, dst, count, 0, len(model), len(rid))
        return fixed + model + rid

    @staticmethod
    def total_size(prefix: bytes | bytearray | memoryview) -> int:
        """Size of the whole header given its first FIXED_SIZE bytes (checks magic, version
        and string lengths, so the caller may then read exactly that many bytes)."""
        if len(prefix) < FIXED_SIZE:
            raise HeaderError(f"header needs {FIXED_SIZE} bytes, got {len(prefix)}")
        magic, version = struct.unpack_from("!4sH", prefix)
        if magic != MAGIC:
            raise HeaderError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a pdserve "
                              "KV transfer")
        if version != VERSION:
            raise HeaderError(f"KV header version {version}, this side speaks {VERSION}")
        model_len, rid_len = struct.unpack_from("!HH", prefix, FIXED_SIZE - 4)
        if model_len > MAX_MODEL_ID_LEN or rid_len > MAX_REQUEST_ID_LEN:
            raise HeaderError(f"string lengths {model_len}/{rid_len} exceed bounds "
                              f"{MAX_MODEL_ID_LEN}/{MAX_REQUEST_ID_LEN}")
        return FIXED_SIZE + model_len + rid_len

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> KVHeader:
        """Parse one header; raises HeaderError (only) on anything malformed."""
        size = cls.total_size(buf)
        if len(buf) < size:
            raise HeaderError(f"header is {size} bytes, got {len(buf)}")
        (_, _, kind, dtype_code, block_size, num_layers, num_kv_heads, head_dim, tp_rank,
         tp_size, layer, num_blocks, payload_len, src_head, dst_head, head_count, reserved,
         model_len, _) = _FIXED.unpack_from(buf)
        try:
            kind = MsgKind(kind)
        except ValueError:
            raise HeaderError(f"unknown message kind {kind}") from None
        if dtype_code not in CODE_DTYPES:
            raise HeaderError(f"unknown dtype code {dtype_code}")
        if num_blocks > MAX_BLOCKS or payload_len > MAX_PAYLOAD:
            raise HeaderError(f"num_blocks {num_blocks} or payload {payload_len} out of bounds")
        heads = _decode_heads(kind, src_head, dst_head, head_count, reserved)
        raw = bytes(buf[FIXED_SIZE:size])
        try:
            model_id = raw[:model_len].decode()
            request_id = raw[model_len:].decode()
        except UnicodeDecodeError as e:
            raise HeaderError(f"model or request id is not UTF-8: {e}") from None
        try:
            layout = KVLayout(model_id, CODE_DTYPES[dtype_code], block_size, num_layers,
                              num_kv_heads, head_dim, tp_rank, tp_size)
        except ValueError as e:
            raise HeaderError(f"invalid layout in header: {e}") from None
        return cls(kind, layout, request_id, num_blocks, payload_len, layer, heads)


def _decode_heads(kind: MsgKind, src: int, dst: int, count: int, reserved: int
                  ) -> HeadSlice | None:
    if reserved:
        raise HeaderError(f"reserved header field is {reserved}, not 0")
    if count == 0:
        if src or dst:
            raise HeaderError(f"head slice of 0 heads with src {src} / dst {dst}")
        return None
    if kind != MsgKind.BEGIN:
        raise HeaderError(f"{kind.name} carries a head slice (BEGIN only)")
    try:
        return HeadSlice(src, dst, count)
    except ValueError as e:
        raise HeaderError(f"invalid head slice in header: {e}") from None
