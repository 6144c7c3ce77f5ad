"""Frame protection on an authenticated link: per-direction session keys and an AEAD.

After the mutual HMAC handshake both ends know the cluster key and both nonces. From them
HKDF-SHA256 derives one 256-bit key per direction (client -> server, server -> client), so
a session's keys are fresh even when the cluster key is years old, and a frame recorded on
one link or in one direction is worthless on any other.

Every later frame travels as

    sealed length u32 (network byte order) | sealed body

and is protected by ChaCha20-Poly1305 (RFC 8439) with the frame's position in its direction
(0, 1, 2, ...) as the nonce and the length prefix as associated data. With
``encrypt=True`` the body is the ciphertext of the whole frame plus the 16-byte tag; with
``encrypt=False`` (authentication only, to measure what encryption costs) the frame travels
in clear followed by a tag over the length prefix and the frame. Either way a frame that is
altered, replayed, reordered, dropped, cut short or sent on another link fails to open:
the receiver raises TamperedFrame and never decodes it.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .protocol import ProtocolError

TAG = 16  # Poly1305 tag bytes
LENGTH = struct.Struct("!I")  # the sealed length prefix
LENGTH_SIZE = LENGTH.size
_INFO = b"flowspec link v1 "


class TamperedFrame(ProtocolError):
    """A frame failed authentication: it was altered, replayed, reordered or dropped."""


def session_keys(key: bytes, server_nonce: bytes, client_nonce: bytes, encrypt: bool) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key) of one link session. The mode is part of
    the derivation, so two ends that disagree on `encrypt` cannot open each other's frames."""
    info = _INFO + (b"encrypt" if encrypt else b"authenticate")
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=server_nonce + client_nonce,
                    info=info).derive(key)
    return material[:32], material[32:]


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


class LinkCipher:
    """Seals the frames one end sends and opens the frames it receives, in order."""

    def __init__(self, key: bytes, server_nonce: bytes, client_nonce: bytes, is_client: bool,
                 encrypt: bool) -> None:
        c2s, s2c = session_keys(key, server_nonce, client_nonce, encrypt)
        send, recv = (c2s, s2c) if is_client else (s2c, c2s)
        self.encrypt = encrypt  # True: confidential and authentic; False: authentic only
        self._send = ChaCha20Poly1305(send)
        self._recv = ChaCha20Poly1305(recv)
        self.sent = 0  # frames sealed so far (the next one's nonce)
        self.received = 0  # frames opened so far (the nonce the next one must carry)

    def seal(self, frame: bytes) -> bytes:
        """The wire bytes of one frame: length prefix and sealed body."""
        head = LENGTH.pack(len(frame) + TAG)
        nonce = _nonce(self.sent)
        self.sent += 1
        if self.encrypt:
            return head + self._send.encrypt(nonce, frame, head)
        return head + frame + self._send.encrypt(nonce, b"", head + frame)

    def open(self, head: bytes, body: bytes, peer: str) -> bytes:
        """The frame inside a sealed body, or TamperedFrame."""
        nonce = _nonce(self.received)
        try:
            if len(body) < TAG:
                raise InvalidTag()
            if self.encrypt:
                frame = self._recv.decrypt(nonce, body, head)
            else:
                frame = body[:-TAG]
                self._recv.decrypt(nonce, body[-TAG:], head + frame)
        except InvalidTag:
            raise TamperedFrame(
                f"frame {self.received} from {peer} failed authentication: it was altered, replayed, "
                "reordered or dropped on the way (or the peer uses another security.encrypt setting); "
                "the link is closed and the frame was not decoded") from None
        self.received += 1
        return frame
