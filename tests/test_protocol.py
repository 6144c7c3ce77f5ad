"""The ring's wire format: malformed input raises ProtocolError only; valid messages round-trip.

Nothing from the wire may raise anything but ProtocolError while it is parsed
(`parse_header`, `decode_frame`, `SegmentMsg.from_frame`, `UpdateMsg.from_frame`): random
bytes, valid frames with bytes flipped, cut or appended, and frames with a valid header but
hostile metadata (wrong types, huge numbers, deep nesting, bad shapes and dtypes).
Valid segments (int64 token ids, bfloat16 / float32 activations, including NaN, inf and
subnormal bit patterns) and updates come back bit for bit.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowspec.runtime.protocol import (HEADER, HEADER_SIZE, MAGIC, MAX_META, VERSION, Frame, FrameType,
                                       ProtocolError, SegmentMsg, UpdateMsg, decode_frame, parse_header)

MAX_FRAME = 1 << 20
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_frame(ftype: int, meta: bytes = b"", payload: bytes = b"", *, version: int = VERSION,
              magic: bytes = MAGIC, mlen: int | None = None, plen: int | None = None, rid: int = 0,
              seq: int = 0) -> bytes:
    """A frame with a correct header checksum around arbitrary parts and lengths."""
    head = HEADER.pack(magic, version, ftype, rid, seq, len(meta) if mlen is None else mlen,
                       len(payload) if plen is None else plen, 0)
    head = head[:-4] + struct.pack("!I", zlib.crc32(head[:-4]))
    return head + meta + payload


def parse_all(data: bytes) -> Any:
    """Everything a node does with bytes from the wire; only ProtocolError may escape."""
    parse_header(data[:HEADER_SIZE], MAX_FRAME)
    f = decode_frame(data, MAX_FRAME)
    if f.type == FrameType.SEGMENT:
        return SegmentMsg.from_frame(f)
    if f.type == FrameType.UPDATE:
        return UpdateMsg.from_frame(f)
    # a message of the other kind must be refused too, not crash
    for cls in (SegmentMsg, UpdateMsg):
        try:
            cls.from_frame(f)
        except ProtocolError:
            pass
    return f


def only_protocol_errors(data: bytes) -> None:
    try:
        parse_all(data)
    except ProtocolError:
        pass


# ------------------------------------------------------------------------ valid frames
@st.composite
def segment_objs(draw: Any) -> Frame:
    n = draw(st.integers(0, 6))
    ids = [draw(INT64) for _ in range(3 * n)]
    kind = draw(st.sampled_from(["tokens", "bf16", "f32", "none"]))
    tokens = hidden = None
    if kind == "tokens":
        tokens = torch.tensor([draw(INT64) for _ in range(n)], dtype=torch.int64)
    elif kind != "none":
        width = draw(st.integers(1, 5))
        g = torch.Generator().manual_seed(draw(st.integers(0, 1 << 30)))
        hidden = torch.randn(n, width, generator=g).to(torch.bfloat16 if kind == "bf16" else torch.float32)
    msg = SegmentMsg(ids[:n], ids[n:2 * n], ids[2 * n:], tokens=tokens, hidden=hidden,
                     hops=[["stage1", 1.0, 2.0, 3.0, 4.0, 10, 20]], t_sent=draw(st.floats(0, 2e9)))
    return msg.to_frame(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)))


def update_objs() -> st.SearchStrategy[Frame]:
    return st.builds(lambda c, d: UpdateMsg(c, d).to_frame(1, 2),
                     st.lists(INT64, max_size=6), st.lists(INT64, max_size=6))


def segment_frames() -> st.SearchStrategy[bytes]:
    return segment_objs().map(Frame.encode)


def update_frames() -> st.SearchStrategy[bytes]:
    return update_objs().map(Frame.encode)


VALID_FRAMES = st.one_of(segment_frames(), update_frames(),
                         st.builds(lambda t: Frame(t, 3, 4, {"a": 1}, b"xy").encode(), st.sampled_from(list(FrameType))))


@st.composite
def mutated(draw: Any, frames: st.SearchStrategy[bytes] = VALID_FRAMES) -> bytes:
    data = bytearray(draw(frames))
    op = draw(st.sampled_from(["flip", "truncate", "append", "splice", "body"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif op == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif op == "append":
        data += draw(st.binary(min_size=1, max_size=32))
    elif op == "splice":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    else:  # corrupt meta or payload but keep a valid header (checksum and lengths): reaches the parsers
        body = bytearray(data[HEADER_SIZE:])
        if body:
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(body) - 1))
                body[i] = draw(st.integers(0, 255))
        ftype = data[3]
        mlen, plen = struct.unpack("!II", data[12:20])
        data = bytearray(raw_frame(ftype, bytes(body[:mlen]), bytes(body[mlen:])))
        del plen
    return bytes(data)


# ----------------------------------------------------------------- hostile metadata
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=5), inner, max_size=4)),
                    max_leaves=12)
FIELD_VALUES = st.one_of(
    JSON,
    st.sampled_from(["tokens", "hidden", "int64", "float32", "bfloat16", "float16", "int32", "uint8", "complex64"]),
    st.lists(st.integers(-2, 2**63), max_size=4),
    st.integers(-2, 8),
)
META_KEYS = ["n", "kind", "dtype", "shape", "hops", "t0", "c", "d"]


@st.composite
def hostile_frames(draw: Any) -> bytes:
    """A valid segment or update whose metadata has a few fields replaced or removed, and
    sometimes a payload of another size."""
    f = draw(st.one_of(segment_objs(), update_objs()))
    meta = dict(f.meta)
    for key in draw(st.lists(st.sampled_from(META_KEYS), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()) or key not in meta:
            meta[key] = draw(FIELD_VALUES)
        else:
            del meta[key]
    payload = f.payload
    if draw(st.integers(0, 3)) == 0:
        payload = draw(st.one_of(st.binary(max_size=96), st.integers(0, 12).map(lambda k: bytes(8 * k))))
    ftype = draw(st.sampled_from([int(f.type), int(FrameType.SEGMENT), int(FrameType.UPDATE)]))
    return raw_frame(ftype, json.dumps(meta, allow_nan=True).encode(), payload)


# ------------------------------------------------------------------------------- tests
@SETTINGS
@given(st.binary(max_size=200))
@example(b"")
@example(b"FS")
@example(MAGIC + bytes(22))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_all(data)  # random bytes essentially never carry a valid checksum


@SETTINGS
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_parse_header_random_raises_only_protocol_error(head: bytes) -> None:
    try:
        parse_header(head, MAX_FRAME)
    except ProtocolError:
        pass


@SETTINGS
@given(mutated())
def test_mutated_valid_frames_raise_only_protocol_error(data: bytes) -> None:
    only_protocol_errors(data)


@SETTINGS
@given(hostile_frames())
def test_hostile_metadata_raises_only_protocol_error(data: bytes) -> None:
    only_protocol_errors(data)


@pytest.mark.parametrize("meta", [
    b"[" * 4000,  # deep nesting: fits the pre-auth limit, exceeds json's recursion limit
    b'{"n":' + b"7" * 5000 + b"}",  # an integer beyond Python's digit limit
    b'{"n":0,"t0":' + b"9" * 400 + b"}",  # a send time too large for a float
    b'{"n":0,"t0":"soon"}',
    b'{"n":0,"t0":NaN}',
    b'{"n":0,"kind":"hidden","dtype":["float32"],"shape":[0,4]}',  # unhashable dtype
    b'{"n":0,"kind":"hidden","dtype":{},"shape":[0,4]}',
    b'{"n":1,"kind":"tokens","dtype":"int64","shape":[]}',  # a 0-d tensor
    b'{"n":0,"kind":"hidden","dtype":"float32","shape":[4294967296,4294967296]}',  # wraps to 0 in int64
    b'{"n":0,"kind":"hidden","dtype":"float32","shape":[4611686018427387904,4]}',
    b'{"n":0,"kind":"hidden","dtype":"float32","shape":[true,4]}',
    b'{"n":0,"kind":"hidden","dtype":"float32","shape":"4"}',
    b'{"n":0,"kind":"hidden","dtype":"float32","shape":[1,1,1,1,1,1,1,1,1,1,1]}',
    b'{"n":-1}',
    b'{"n":1.5}',
    b'{"n":1048577}',
    b'{"n":0,"hops":{"a":1}}',
    b'{"c":-1,"d":0}',
    b'{"c":1e300,"d":0}',
    b'{"c":1152921504606846976,"d":1152921504606846976}',
    b'\xff\xfe',
    b'"a string"',
    b'null',
])
def test_known_hostile_metadata(meta: bytes) -> None:
    for ftype in (FrameType.SEGMENT, FrameType.UPDATE):
        for payload in (b"", bytes(8), bytes(32)):  # 32: one node (24) and one int64 value
            with pytest.raises(ProtocolError):
                parse_all(raw_frame(int(ftype), meta, payload))


def test_segment_with_tokens_and_wrong_sizes() -> None:
    good = SegmentMsg([1, 2], [0, 1], [1, 2], tokens=torch.tensor([5, 6])).to_frame(1, 1)
    assert SegmentMsg.from_frame(decode_frame(good.encode())).tokens.tolist() == [5, 6]
    for payload in (good.payload[:-1], good.payload + b"\0", good.payload[:8]):
        with pytest.raises(ProtocolError):
            SegmentMsg.from_frame(Frame(FrameType.SEGMENT, 1, 1, good.meta, payload))
    for meta in (dict(good.meta, kind="hidden"), dict(good.meta, kind="bogus"), dict(good.meta, dtype="float32"),
                 dict(good.meta, shape=[3]), dict(good.meta, n=3)):
        with pytest.raises(ProtocolError):
            SegmentMsg.from_frame(Frame(FrameType.SEGMENT, 1, 1, meta, good.payload))


def test_segment_scores_targets_and_logprobs_round_trip_and_are_checked() -> None:
    """verify: last_stage: the score asks for logprobs ("lp"), the answer carries the chosen
    tokens and their logprobs; malformed ones are ProtocolErrors, never decoded."""
    score = {"from": 0, "t": 0.0, "p": 1.0, "k": 0, "s": 3, "lp": 2}
    back = SegmentMsg([1, 2], [0, 1], [1, 2], hidden=torch.zeros(2, 4), score=None, targets=[7, -1],
                      logprobs=[[-0.5, [[7, -0.5], [9, -1.25]]], None])
    got = SegmentMsg.from_frame(decode_frame(back.to_frame(1, 1).encode()))
    assert got.targets == [7, -1] and got.logprobs == [[-0.5, [[7, -0.5], [9, -1.25]]], None]
    out = SegmentMsg([1, 2], [0, 1], [1, 2], tokens=torch.tensor([5, 6]), score=score)
    assert SegmentMsg.from_frame(decode_frame(out.to_frame(1, 1).encode())).score == score
    good = back.to_frame(1, 1)
    for meta in (dict(good.meta, logprobs=[None]), dict(good.meta, logprobs=[["x", []], None]),
                 dict(good.meta, logprobs=[[-0.5, [[7]]], None]), dict(good.meta, logprobs=[[-0.5, [[-7, 0.0]]], None]),
                 dict(good.meta, logprobs=[[-0.5, [[7, 0.0]] * 21], None]), dict(good.meta, logprobs={})):
        with pytest.raises(ProtocolError):
            SegmentMsg.from_frame(Frame(FrameType.SEGMENT, 1, 1, meta, good.payload))
    for bad in (dict(score, lp=21), dict(score, lp=-1), dict(score, lp="2"), dict(score, x=1)):
        f = out.to_frame(1, 1)
        with pytest.raises(ProtocolError):
            SegmentMsg.from_frame(Frame(FrameType.SEGMENT, 1, 1, dict(f.meta, score=bad), f.payload))


def test_header_checks() -> None:
    # 3 since the RING frame (spares): a node of version 2 would take it for an unexpected frame, so it
    # is refused at its first frame instead, with "protocol version 2, this node speaks 3" (test_ring.py)
    assert VERSION == 3 and FrameType.RING == 15
    ok = raw_frame(int(FrameType.HEARTBEAT))
    assert decode_frame(ok).type == FrameType.HEARTBEAT
    bad = [
        (raw_frame(int(FrameType.HEARTBEAT), magic=b"XX"), "magic"),
        (raw_frame(int(FrameType.HEARTBEAT), version=VERSION + 1), "version"),
        (raw_frame(99), "unknown frame type"),
        (raw_frame(int(FrameType.PROBE), plen=MAX_FRAME), "exceeds"),
        (raw_frame(int(FrameType.PROBE), mlen=MAX_META + 1), "exceeds"),
        (ok[:-1] + bytes([ok[-1] ^ 1]), "checksum"),
        (ok[:10], "truncated"),
        (raw_frame(int(FrameType.PROBE), b"{}", b"abc", plen=2), "does not match"),
    ]
    for data, what in bad:
        with pytest.raises(ProtocolError, match=what):
            decode_frame(data, MAX_FRAME)


# ------------------------------------------------------------------------- round trips
def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a tensor (NaN == NaN, -0 != +0)."""
    return t.view({torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.int64: torch.int64}[t.dtype])


@SETTINGS
@given(n=st.integers(0, 8), data=st.data())
def test_segment_tokens_round_trip(n: int, data: st.DataObject) -> None:
    ids, parents, pos = (data.draw(st.lists(INT64, min_size=n, max_size=n)) for _ in range(3))
    toks = torch.tensor(data.draw(st.lists(INT64, min_size=n, max_size=n)), dtype=torch.int64)
    hops = data.draw(st.lists(st.lists(st.one_of(st.text(max_size=4), st.integers(0, 10**9),
                                                 st.floats(0, 1e10)), max_size=7), max_size=3))
    t0 = data.draw(st.floats(0, 2e9))
    rid, seq = data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, 2**32 - 1))
    f = decode_frame(SegmentMsg(ids, parents, pos, tokens=toks, hops=hops, t_sent=t0).to_frame(rid, seq).encode())
    assert (f.type, f.request_id, f.seq) == (FrameType.SEGMENT, rid, seq)
    m = SegmentMsg.from_frame(f)
    assert (m.node_ids, m.parent_ids, m.positions, m.hops, m.t_sent) == (ids, parents, pos, hops, t0)
    assert m.hidden is None and m.tokens is not None and m.tokens.dtype == torch.int64
    assert torch.equal(m.tokens, toks)


@SETTINGS
@given(n=st.integers(0, 6), width=st.integers(1, 9), dtype=st.sampled_from(["bfloat16", "float32"]),
       data=st.data())
def test_segment_hidden_round_trip_is_bit_exact(n: int, width: int, dtype: str, data: st.DataObject) -> None:
    ids = data.draw(st.lists(INT64, min_size=n, max_size=n))
    if dtype == "bfloat16":  # every 16-bit pattern: NaNs, infinities, subnormals, -0
        raw = data.draw(st.lists(st.integers(-(1 << 15), (1 << 15) - 1), min_size=n * width, max_size=n * width))
        hidden = torch.tensor(raw, dtype=torch.int16).view(torch.bfloat16).reshape(n, width)
    else:
        raw = data.draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), min_size=n * width, max_size=n * width))
        hidden = torch.tensor(raw, dtype=torch.int32).view(torch.float32).reshape(n, width)
    msg = SegmentMsg(ids, ids[::-1], list(range(n)), hidden=hidden)
    m = SegmentMsg.from_frame(decode_frame(msg.to_frame(7, 8).encode()))
    assert m.tokens is None and m.hidden is not None
    assert m.hidden.dtype == hidden.dtype and m.hidden.shape == hidden.shape
    assert torch.equal(bits(m.hidden), bits(hidden))
    assert m.node_ids == ids


@SETTINGS
@given(st.lists(INT64, max_size=20), st.lists(INT64, max_size=20))
def test_update_round_trip(commit: list[int], drop: list[int]) -> None:
    f = decode_frame(UpdateMsg(commit, drop).to_frame(3, 9).encode())
    assert (f.type, f.request_id, f.seq) == (FrameType.UPDATE, 3, 9)
    u = UpdateMsg.from_frame(f)
    assert (u.commit, u.drop) == (commit, drop)


def test_realistic_hidden_round_trip() -> None:
    for dt in (torch.bfloat16, torch.float32):
        h = (torch.randn(16, 576, generator=torch.Generator().manual_seed(0)) * 30).to(dt)
        msg = SegmentMsg(list(range(16)), list(range(-1, 15)), list(range(100, 116)), hidden=h)
        m = SegmentMsg.from_frame(decode_frame(msg.to_frame(1, 1).encode()))
        assert torch.equal(bits(m.hidden), bits(h))
