"""Framed streams over TCP: limits, timeouts, byte counts, mutual HMAC authentication, and
after it every frame sealed with per-session keys (seal.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from typing import Any

from ..errors import FlowSpecError
from .protocol import HEADER_SIZE, PRE_AUTH_MAX, VERSION, Frame, FrameType, ProtocolError, parse_header, parse_meta
from .seal import LENGTH, LENGTH_SIZE, TAG, LinkCipher

log = logging.getLogger(__name__)

NONCE = 32


class AuthError(FlowSpecError):
    """The peer does not know the cluster key (or is not a FlowSpec node)."""


class HandshakeError(FlowSpecError):
    """The peer is a FlowSpec node of another cluster, model or ring layout."""


class PeerGone(FlowSpecError):
    """The connection closed or timed out."""


class FrameStream:
    """One TCP connection carrying frames, with a frame-size limit and read timeouts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int, read_timeout: float, label: str = "peer") -> None:
        self.reader, self.writer = reader, writer
        self.max_frame = max_frame  # the limit after authentication
        self.read_timeout = read_timeout  # seconds a read may wait for the next frame
        self.label = label  # for log messages: which peer this is
        self.authenticated = False
        self.cipher: LinkCipher | None = None  # set once the handshake succeeds: every later frame is sealed
        self.bytes_in = 0
        self.bytes_out = 0
        self.last_seen = time.monotonic()  # when the last frame arrived
        self._wlock = asyncio.Lock()

    @property
    def peer(self) -> str:
        p = self.writer.get_extra_info("peername")
        return f"{p[0]}:{p[1]}" if p else "?"

    async def send(self, frame: Frame) -> int:
        data = frame.encode()
        async with self._wlock:
            self._write(data)
            await self._drain()
        return len(data)

    def send_nowait(self, frame: Frame) -> int:
        """Queue a frame without waiting for the socket buffer (callers drain later)."""
        data = frame.encode()
        self._write(data)
        return len(data)

    async def drain(self) -> None:
        async with self._wlock:
            await self._drain()

    def _write(self, data: bytes) -> None:
        """Write or raise ConnectionResetError: a closed link is never written to (uvloop
        would raise RuntimeError, asyncio would drop the bytes silently)."""
        if self.writer.is_closing():
            raise ConnectionResetError(f"the link to {self.label} is closed")
        if self.cipher is not None:  # sealed here, synchronously: nonces follow the order of bytes
            data = self.cipher.seal(data)
        try:
            self.writer.write(data)
        except RuntimeError as e:
            raise ConnectionResetError(f"the link to {self.label} is closed ({e})") from None
        self.bytes_out += len(data)

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except RuntimeError as e:
            raise ConnectionResetError(f"the link to {self.label} is closed ({e})") from None

    async def recv(self, timeout: float | None = None) -> Frame:
        limit = self.max_frame if self.authenticated else PRE_AUTH_MAX
        t = self.read_timeout if timeout is None else timeout
        try:
            if self.cipher is not None:
                return await self._recv_sealed(limit, t)
            head = await asyncio.wait_for(self.reader.readexactly(HEADER_SIZE), t)
            ftype, rid, seq, mlen, plen = parse_header(head, limit)
            body = await asyncio.wait_for(self.reader.readexactly(mlen + plen), t)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ProtocolError(f"connection closed inside a frame ({len(e.partial)} bytes)") from None
            raise PeerGone(f"{self.label} closed the connection") from None
        except asyncio.TimeoutError:
            raise PeerGone(f"{self.label} sent nothing for {t:.0f} s") from None
        except (ConnectionError, OSError) as e:
            raise PeerGone(f"{self.label}: {e}") from None
        self._arrived(HEADER_SIZE + len(body))
        return Frame(ftype, rid, seq, parse_meta(body[:mlen]), bytes(body[mlen:]))

    async def _recv_sealed(self, limit: int, t: float) -> Frame:
        assert self.cipher is not None
        head = await asyncio.wait_for(self.reader.readexactly(LENGTH_SIZE), t)
        (n,) = LENGTH.unpack(head)
        if n > limit + TAG or n < HEADER_SIZE + TAG:
            raise ProtocolError(f"sealed frame of {n} bytes is outside the limits "
                                f"({HEADER_SIZE + TAG}..{limit + TAG})")
        body = await asyncio.wait_for(self.reader.readexactly(n), t)
        data = self.cipher.open(head, body, self.label)
        ftype, rid, seq, mlen, plen = parse_header(data[:HEADER_SIZE], limit)
        if len(data) != HEADER_SIZE + mlen + plen:
            raise ProtocolError(f"sealed frame of {len(data)} bytes does not match its header "
                                f"({HEADER_SIZE + mlen + plen})")
        self._arrived(LENGTH_SIZE + n)
        return Frame(ftype, rid, seq, parse_meta(data[HEADER_SIZE:HEADER_SIZE + mlen]),
                     bytes(data[HEADER_SIZE + mlen:]))

    def _arrived(self, n: int) -> None:
        self.bytes_in += n
        self.last_seen = time.monotonic()

    async def close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (Exception, asyncio.CancelledError):  # closing a broken socket is not an error
            pass


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


async def server_auth(s: FrameStream, key: bytes, timeout: float = 5.0, encrypt: bool = True) -> None:
    """Accepting side: challenge the client, check its proof, prove ourselves; then seal."""
    ns = os.urandom(NONCE)
    await s.send(Frame(FrameType.CHALLENGE, meta={"encrypt": encrypt}, payload=ns))
    f = await s.recv(timeout)
    if f.type == FrameType.REJECT:
        raise AuthError(f"{s.peer} gave up the handshake: {f.meta.get('reason', 'no reason given')}")
    if f.type != FrameType.AUTH or len(f.payload) != NONCE + 32:
        raise AuthError(f"{s.peer} did not answer the challenge")
    nc, proof = f.payload[:NONCE], f.payload[NONCE:]
    if not hmac.compare_digest(proof, _mac(key, b"client", ns, nc, _mode(encrypt))):
        raise AuthError(f"{s.peer} failed authentication: wrong cluster key")
    await s.send(Frame(FrameType.AUTH_OK, payload=_mac(key, b"server", nc, ns, _mode(encrypt))))
    s.authenticated = True
    s.cipher = LinkCipher(key, ns, nc, is_client=False, encrypt=encrypt)


async def client_auth(s: FrameStream, key: bytes, timeout: float = 5.0, encrypt: bool = True) -> None:
    """Connecting side: answer the challenge, check the server's proof; then seal.

    Both proofs cover the protection mode, so a challenge altered on the way (say, to turn
    encryption off) fails authentication; an honest disagreement gets a clear message."""
    f = await s.recv(timeout)
    if f.type != FrameType.CHALLENGE or len(f.payload) != NONCE:
        raise AuthError(f"{s.label} at {s.peer} did not send a FlowSpec challenge")
    theirs = f.meta.get("encrypt")
    if theirs is not None and theirs != encrypt:
        reason = (f"security.encrypt is {str(encrypt).lower()} here but {str(theirs).lower()} on "
                  f"{s.label}; start every node and client from the same topology")
        try:
            await s.send(Frame(FrameType.REJECT, meta={"reason": reason}))
        except Exception:  # the peer may be gone already
            pass
        raise HandshakeError(reason)
    ns, nc = f.payload, os.urandom(NONCE)
    await s.send(Frame(FrameType.AUTH, payload=nc + _mac(key, b"client", ns, nc, _mode(encrypt))))
    f = await s.recv(timeout)
    if f.type == FrameType.REJECT:
        raise AuthError(f"{s.label} refused us: {f.meta.get('reason', 'wrong cluster key')}")
    if f.type != FrameType.AUTH_OK or not hmac.compare_digest(f.payload, _mac(key, b"server", nc, ns,
                                                                             _mode(encrypt))):
        raise AuthError(f"{s.label} at {s.peer} failed authentication: wrong cluster key")
    s.authenticated = True
    s.cipher = LinkCipher(key, ns, nc, is_client=True, encrypt=encrypt)


def _mode(encrypt: bool) -> bytes:
    return b"encrypt" if encrypt else b"authenticate"


def hello_meta(cluster: str, fingerprint: str, name: str, role: str, layers: tuple[int, int] | None,
               **extra: Any) -> dict[str, Any]:
    return {"protocol": VERSION, "cluster": cluster, "fingerprint": fingerprint, "name": name,
            "role": role, "layers": list(layers) if layers else None, **extra}


def check_hello(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Both ends of a link must agree on cluster and model; the message names both nodes.
    ``model.stage_weights`` is in the fingerprint too; compared first for a message that says so
    (a node that does not send it stores its weights as they are: "same")."""
    a, b = mine.get("name"), theirs.get("name")
    ours, their = mine.get("stage_weights", "same"), theirs.get("stage_weights", "same")
    if ours != their and theirs.get("role") != "client":
        raise HandshakeError(
            f"model.stage_weights mismatch: node {a!r} runs {ours!r} but node {b!r} runs {their!r}; "
            "every node of a ring must store the stages' weights alike (start them from the same topology)"
        )
    for field, what in (("cluster", "cluster name"), ("fingerprint", "model fingerprint (architecture and weights)")):
        if theirs.get(field) != mine.get(field) and theirs.get("role") != "client":
            raise HandshakeError(
                f"{what} mismatch: node {a!r} has {mine.get(field)!r} but node {b!r} has "
                f"{theirs.get(field)!r}; start every node from the same topology and model"
            )


async def open_stream(host: str, port: int, max_frame: int, read_timeout: float, label: str,
                      timeout: float = 5.0) -> FrameStream:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        raise PeerGone(f"{label} at {host}:{port} did not accept the connection in {timeout:.0f} s") from None
    except OSError as e:
        raise PeerGone(f"cannot connect to {label} at {host}:{port}: {e.strerror or e}") from None
    return FrameStream(r, w, max_frame, read_timeout, label)
