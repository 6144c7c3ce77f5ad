"""Frame protection after the handshake (runtime/seal.py), through FrameStream's real read path.

Every frame is sealed with ChaCha20-Poly1305 under per-direction session keys; these tests
check that a frame survives the trip exactly, that the ciphertext hides it (encrypt mode),
and that every kind of interference (a flipped bit anywhere, a replayed, reordered, dropped
or truncated frame, another session's or direction's frame, a disagreement on the mode) is
refused with TamperedFrame or ProtocolError before anything is decoded.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec.runtime.protocol import Frame, FrameType, ProtocolError
from flowspec.runtime.seal import LENGTH_SIZE, TAG, LinkCipher, TamperedFrame, session_keys
from flowspec.runtime.transport import FrameStream, PeerGone

KEY = b"k" * 32
NS, NC = os.urandom(32), os.urandom(32)


def pair(encrypt: bool = True, ns: bytes = NS, nc: bytes = NC) -> tuple[LinkCipher, LinkCipher]:
    """(client, server) ciphers of one session."""
    return (LinkCipher(KEY, ns, nc, is_client=True, encrypt=encrypt),
            LinkCipher(KEY, ns, nc, is_client=False, encrypt=encrypt))


def receive(cipher: LinkCipher, wire: bytes, n: int = 1) -> list[Frame]:
    """Read n frames from wire bytes through a FrameStream holding `cipher` (the real path)."""

    async def run() -> list[Frame]:
        r = asyncio.StreamReader()
        r.feed_data(wire)
        r.feed_eof()
        s = FrameStream(r, None, 1 << 20, 1.0, "peer")  # type: ignore[arg-type]  # never writes
        s.authenticated, s.cipher = True, cipher
        return [await s.recv() for _ in range(n)]

    return asyncio.run(run())


def sample(i: int = 0) -> Frame:
    return Frame(FrameType.SEGMENT, 7, i, {"n": 3, "note": "The capital of France"}, bytes(range(200)))


@pytest.mark.parametrize("encrypt", [True, False])
def test_frames_cross_exactly_and_in_order(encrypt: bool) -> None:
    client, server = pair(encrypt)
    frames = [sample(i) for i in range(5)] + [Frame(FrameType.HEARTBEAT)]
    wire = b"".join(client.seal(f.encode()) for f in frames)
    assert receive(server, wire, len(frames)) == frames
    back = Frame(FrameType.ERROR, 0, 0, {"message": "x"})
    assert receive(client, server.seal(back.encode())) == [back]  # the other direction has its own key


def test_encryption_hides_the_frame_and_authentication_only_does_not() -> None:
    raw = sample().encode()
    hidden = pair(True)[0].seal(raw)
    shown = pair(False)[0].seal(raw)
    assert b"France" not in hidden and raw[8:] not in hidden
    assert raw in shown and len(shown) == len(hidden) == LENGTH_SIZE + len(raw) + TAG


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encrypt=st.booleans(), where=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(encrypt: bool, where: int, bit: int) -> None:
    client, server = pair(encrypt)
    wire = bytearray(client.seal(sample().encode()))
    wire[where % len(wire)] ^= 1 << bit
    with pytest.raises((ProtocolError, PeerGone)):  # a longer length prefix leaves the read short
        receive(server, bytes(wire))


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=600), encrypt=st.booleans())
def test_random_bytes_after_the_handshake_are_refused(junk: bytes, encrypt: bool) -> None:
    with pytest.raises((ProtocolError, PeerGone)):
        receive(pair(encrypt)[1], junk)


def test_replayed_reordered_dropped_frames_are_refused() -> None:
    client, server = pair()
    a, b, c = (client.seal(sample(i).encode()) for i in range(3))
    with pytest.raises(TamperedFrame, match="frame 1 from peer failed authentication"):
        receive(server, a + a, 2)  # replay
    client, server = pair()
    a, b, c = (client.seal(sample(i).encode()) for i in range(3))
    with pytest.raises(TamperedFrame):
        receive(server, b + a, 1)  # reordered
    client, server = pair()
    a, b, c = (client.seal(sample(i).encode()) for i in range(3))
    with pytest.raises(TamperedFrame, match="frame 1"):
        receive(server, a + c, 2)  # b dropped


def test_frames_of_another_session_direction_or_mode_are_refused() -> None:
    client, _ = pair()
    wire = client.seal(sample().encode())
    with pytest.raises(TamperedFrame):  # the same session, the sender's own direction
        receive(LinkCipher(KEY, NS, NC, is_client=True, encrypt=True), wire)
    with pytest.raises(TamperedFrame):  # another session (new nonces)
        receive(pair(True, os.urandom(32), os.urandom(32))[1], wire)
    with pytest.raises(TamperedFrame):  # the receiver only authenticates
        receive(pair(False)[1], pair(True)[0].seal(sample().encode()))
    with pytest.raises(TamperedFrame):  # another cluster key
        receive(LinkCipher(b"x" * 32, NS, NC, is_client=False, encrypt=True), wire)


def test_truncated_and_oversized_sealed_frames() -> None:
    client, server = pair()
    wire = client.seal(sample().encode())
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        receive(server, wire[:-5])
    huge = (2 << 20).to_bytes(4, "big") + b"\0" * 64
    with pytest.raises(ProtocolError, match="outside the limits"):
        receive(pair()[1], huge)


def test_session_keys_are_fresh_and_per_direction() -> None:
    c2s, s2c = session_keys(KEY, NS, NC, True)
    assert c2s != s2c and len(c2s) == len(s2c) == 32
    assert session_keys(KEY, NS, NC, True) == (c2s, s2c)
    assert session_keys(KEY, os.urandom(32), NC, True)[0] != c2s
    assert session_keys(KEY, NS, NC, False)[0] != c2s
