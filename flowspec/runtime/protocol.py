"""Binary frames of the ring protocol and their encoding.

Every frame is a fixed 24-byte header followed by a JSON metadata block and a raw
payload:

    magic "FS" | version u8 | type u8 | request id u32 | sequence u32 |
    meta length u32 | payload length u32 | header checksum u32      (network byte order)

Metadata is JSON (never pickle): small dictionaries of numbers and strings. Payloads
are raw little-endian arrays: int64 node ids, parent ids and positions, then the
activations with the dtype and shape named in the metadata. Nothing from the wire is
ever executed or unpickled; anything that does not parse raises ProtocolError and the
connection is closed.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import torch

from ..errors import FlowSpecError
from ..speculative.params import MAX_TOP_LOGPROBS

MAGIC = b"FS"
# 2: every frame after the handshake is sealed (seal.py); 3: the RING frame and ring plans in HELLO,
# REJECT and FORM (spares, ring_plan.py). A peer of another version is refused at its first frame,
# with a message naming both versions.
VERSION = 3
HEADER = struct.Struct("!2sBBIIIII")
HEADER_SIZE = HEADER.size  # 24
MAX_META = 1 << 20  # metadata is small; 1 MiB is generous
PRE_AUTH_MAX = 4096  # bytes a frame may have before the peer has authenticated


class ProtocolError(FlowSpecError):
    """A frame that does not follow the protocol."""


class FrameType(IntEnum):
    CHALLENGE = 1  # server -> client: nonce
    AUTH = 2  # client -> server: nonce + HMAC
    AUTH_OK = 3  # server -> client: HMAC proving the server knows the key too
    HELLO = 4  # both ways after auth: protocol, cluster, fingerprint, name, role, layers
    REJECT = 5  # handshake refused, with a reason
    SEGMENT = 10  # tree nodes + token ids or activations, forward along the ring
    UPDATE = 11  # commit ids + drop ids, in band, forward along the ring
    RESET = 12  # a request starts: every stage opens a fresh KV cache for its request id
    FORM = 13  # ring formation probe: each stage appends its description
    FREE = 14  # a request ended (done, failed or cancelled): its KV caches are freed
    RING = 15  # the ring's order changed (a spare took a dead stage's place): ring_plan.py, failover.py
    HEARTBEAT = 20  # liveness, both directions of every link
    PROBE = 21  # profiler probe: passes around the ring untouched (payload of any size)
    ERROR = 30  # a node reports a failure (travels toward the source)
    REQUEST = 40  # client -> source: a generation request (JSON)
    TOKENS = 41  # source -> client: newly generated tokens and text
    DONE = 42  # source -> client: the request ended, with stats
    STATUS = 43  # client <-> source: ring status query and answer
    CANCEL = 44  # client -> source: stop the current request


_TYPES = {int(t) for t in FrameType}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Frame:
    type: FrameType
    request_id: int = 0
    seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def encode(self) -> bytes:
        meta = json.dumps(self.meta, separators=(",", ":")).encode() if self.meta else b""
        head = HEADER.pack(MAGIC, VERSION, int(self.type), self.request_id & 0xFFFFFFFF,
                           self.seq & 0xFFFFFFFF, len(meta), len(self.payload), 0)
        crc = zlib.crc32(head[:-4])
        head = head[:-4] + struct.pack("!I", crc)
        return head + meta + self.payload


def parse_header(data: bytes, max_frame: int) -> tuple[FrameType, int, int, int, int]:
    """(type, request id, seq, meta length, payload length) of a header, or ProtocolError."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"truncated header ({len(data)} of {HEADER_SIZE} bytes)")
    magic, version, ftype, rid, seq, mlen, plen, crc = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic: the peer does not speak the FlowSpec protocol")
    if zlib.crc32(data[:-4]) != crc:
        raise ProtocolError("header checksum mismatch")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this node speaks {VERSION}; upgrade the older node")
    if ftype not in _TYPES:
        raise ProtocolError(f"unknown frame type {ftype}")
    if mlen > MAX_META or HEADER_SIZE + mlen + plen > max_frame:
        raise ProtocolError(f"frame of {HEADER_SIZE + mlen + plen} bytes exceeds the limit of {max_frame}")
    return FrameType(ftype), rid, seq, mlen, plen


def parse_meta(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, huge integers
        raise ProtocolError(f"metadata is not JSON: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("metadata must be a JSON object")
    return meta


def decode_frame(data: bytes, max_frame: int = 1 << 26) -> Frame:
    """A whole frame from bytes (used by tests and tools; streams use read_frame)."""
    ftype, rid, seq, mlen, plen = parse_header(data[:HEADER_SIZE], max_frame)
    if len(data) != HEADER_SIZE + mlen + plen:
        raise ProtocolError(f"frame length {len(data)} does not match its header "
                            f"({HEADER_SIZE + mlen + plen})")
    meta = parse_meta(data[HEADER_SIZE : HEADER_SIZE + mlen])
    return Frame(ftype, rid, seq, meta, bytes(data[HEADER_SIZE + mlen :]))


# ----------------------------------------------------------------------- tensors
def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def tensor_from(buf: bytes | memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ProtocolError(f"unknown tensor dtype {str(dtype)[:50]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 1 << 31 for s in shape):
        raise ProtocolError(f"bad tensor shape {str(shape)[:100]}")
    tdt = _DTYPES[dtype]
    n = math.prod(shape)  # exact (numpy's product would wrap around)
    need = n * torch.empty((), dtype=tdt).element_size()
    if len(buf) != need:
        raise ProtocolError(f"tensor of shape {shape} and dtype {dtype} needs {need} bytes, got {len(buf)}")
    if need == 0:
        return torch.empty(shape, dtype=tdt)
    return torch.frombuffer(bytearray(buf), dtype=tdt).reshape(shape)


def ids_bytes(*arrays: list[int]) -> bytes:
    return b"".join(np.asarray(a, dtype="<i8").tobytes() for a in arrays)


def ids_from(buf: bytes | memoryview, offset: int, n: int) -> list[int]:
    end = offset + 8 * n
    if n < 0 or end > len(buf):
        raise ProtocolError("id array runs past the end of the payload")
    return np.frombuffer(buf, dtype="<i8", count=n, offset=offset).tolist()


# ----------------------------------------------------------------- messages
@dataclass
class SegmentMsg:
    """A segment on the wire: ids, parents, positions and token ids or activations."""

    node_ids: list[int]
    parent_ids: list[int]
    positions: list[int]
    tokens: torch.Tensor | None = None  # long [n]
    hidden: torch.Tensor | None = None  # [n, hidden]
    hops: list[list[Any]] = field(default_factory=list)  # per-stage timing records
    t_sent: float = 0.0  # when the source sent it (source clock)
    # the last stage chooses the target's token after rows[from:] (decoding.verify:
    # last_stage): {"from": row, "t": temperature, "p": top_p, "k": top_k, "s": seed}, and
    # "lp": n when the request wants each chosen token's logprob with n alternatives
    score: dict[str, Any] | None = None
    targets: list[int] | None = None  # on the way back: the token after each row, -1 = not chosen
    # on the way back, with "lp": per row None or [logprob, [[token, logprob], ...]] of the chosen token
    logprobs: list[Any] | None = None

    def to_frame(self, request_id: int, seq: int) -> Frame:
        n = len(self.node_ids)
        if not (len(self.parent_ids) == len(self.positions) == n):
            raise ProtocolError("segment arrays differ in length")
        t = self.tokens if self.tokens is not None else self.hidden
        meta: dict[str, Any] = {"n": n, "kind": "tokens" if self.tokens is not None else "hidden",
                                "hops": self.hops, "t0": self.t_sent}
        if self.score is not None:
            meta["score"] = self.score
        if self.targets is not None:
            if len(self.targets) != n:
                raise ProtocolError("segment: one target token per row")
            meta["targets"] = self.targets
        if self.logprobs is not None:
            if len(self.logprobs) != n:
                raise ProtocolError("segment: one logprob entry per row")
            meta["logprobs"] = self.logprobs
        body = ids_bytes(self.node_ids, self.parent_ids, self.positions)
        if t is not None:
            t = t.to(torch.int64) if self.tokens is not None else t
            meta["dtype"] = _DTYPE_NAMES[t.dtype]
            meta["shape"] = list(t.shape)
            body += tensor_bytes(t)
        return Frame(FrameType.SEGMENT, request_id, seq, meta, body)

    @classmethod
    def from_frame(cls, f: Frame) -> "SegmentMsg":
        m = f.meta
        n = m.get("n")
        if not isinstance(n, int) or n < 0 or n > 1 << 20:
            raise ProtocolError("segment: bad node count")
        ids = ids_from(f.payload, 0, n)
        parents = ids_from(f.payload, 8 * n, n)
        positions = ids_from(f.payload, 16 * n, n)
        rest = memoryview(f.payload)[24 * n :]
        kind = m.get("kind")
        hops = m.get("hops") or []
        if not isinstance(hops, list):
            raise ProtocolError("segment: bad hops")
        t0 = m.get("t0") or 0.0
        if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not -1e18 < t0 < 1e18:
            raise ProtocolError("segment: bad send time")
        msg = cls(ids, parents, positions, hops=hops, t_sent=float(t0), score=_score(m.get("score"), n),
                  targets=_targets(m.get("targets"), n), logprobs=_row_logprobs(m.get("logprobs"), n))
        if "dtype" in m:
            t = tensor_from(rest, m["dtype"], m.get("shape"))
            if t.dim() == 0 or t.shape[0] != n:
                raise ProtocolError("segment: tensor rows differ from the node count")
            if kind == "tokens":
                if t.dtype != torch.int64 or t.dim() != 1:
                    raise ProtocolError("segment: token ids must be a 1-D int64 array")
                msg.tokens = t
            elif kind == "hidden":
                if t.dim() != 2:
                    raise ProtocolError("segment: activations must be 2-D")
                msg.hidden = t
            else:
                raise ProtocolError(f"segment: unknown kind {kind!r}")
        elif len(rest):
            raise ProtocolError("segment: trailing bytes")
        return msg


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _score(v: Any, n: int) -> dict[str, Any] | None:
    """A segment's scoring request, checked (see SegmentMsg.score)."""
    if v is None:
        return None
    ok = (isinstance(v, dict) and set(v) - {"lp"} == {"from", "t", "p", "k", "s"}
          and _int(v.get("lp", 0), 0, MAX_TOP_LOGPROBS) and _int(v["from"], 0, max(n - 1, 0))
          and all(isinstance(v[x], (int, float)) and not isinstance(v[x], bool) and math.isfinite(v[x])
                  for x in ("t", "p")) and 0 <= v["t"] <= 1e6 and 0 < v["p"] <= 1
          and _int(v["k"], 0, 1 << 31) and _int(v["s"], -(1 << 63), (1 << 63) - 1))
    if not ok:
        raise ProtocolError(f"segment: bad scoring request {str(v)[:120]}")
    return v


def _row_logprobs(v: Any, n: int) -> list[Any] | None:
    """The chosen tokens' logprobs of a returned segment, checked (see SegmentMsg.logprobs)."""
    if v is None:
        return None

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def entry(e: Any) -> bool:
        return e is None or (isinstance(e, list) and len(e) == 2 and number(e[0]) and isinstance(e[1], list)
                             and len(e[1]) <= MAX_TOP_LOGPROBS and all(
                                 isinstance(t, list) and len(t) == 2 and _int(t[0], 0, 1 << 31) and number(t[1])
                                 for t in e[1]))

    if not isinstance(v, list) or len(v) != n or not all(entry(e) for e in v):
        raise ProtocolError("segment: logprobs must be null or [logprob, [[token, logprob], ...]] per row")
    return v


def _targets(v: Any, n: int) -> list[int] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != n or not all(_int(t, -1, 1 << 31) for t in v):
        raise ProtocolError("segment: target tokens must be one integer >= -1 per row")
    return v


@dataclass
class UpdateMsg:
    """A tree update: commit these ids (in order), drop those."""

    commit: list[int]
    drop: list[int]

    def to_frame(self, request_id: int, seq: int) -> Frame:
        return Frame(FrameType.UPDATE, request_id, seq, {"c": len(self.commit), "d": len(self.drop)},
                     ids_bytes(self.commit, self.drop))

    @classmethod
    def from_frame(cls, f: Frame) -> "UpdateMsg":
        c, d = f.meta.get("c"), f.meta.get("d")
        if not isinstance(c, int) or not isinstance(d, int) or c < 0 or d < 0:
            raise ProtocolError("update: bad counts")
        if len(f.payload) != 8 * (c + d):
            raise ProtocolError("update: payload size does not match the counts")
        return cls(ids_from(f.payload, 0, c), ids_from(f.payload, 8 * c, d))
