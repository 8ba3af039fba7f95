"""Just enough of RFC 6455 for load generators and a bench server that cost next to nothing.

A benchmark must not be limited by its own load generator. The client path benchmark needs a
server that is much faster than either client it measures, and the handshake benchmark needs a
client much faster than either server. Both are written here directly on asyncio protocols:
the opening handshake, unmasked server frames, masked client frames, and an incremental frame
parser. No extension is negotiated unless the caller offers one (the handshake client offers
permessage-deflate as browsers do, and only needs to find frame boundaries, never to inflate).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from websockets.utils import apply_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MAX_HEAD_BYTES = 16_384
"""Largest HTTP head accepted; anything longer is a broken peer."""


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode("ascii") + GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def new_key() -> str:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def upgrade_request(path: str, host: str, key: str, *, offer_deflate: bool) -> bytes:
    """The client's opening handshake for ``path``."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "User-Agent: steadysocket-bench",
    ]
    if offer_deflate:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def upgrade_response(key: str) -> bytes:
    """The server's 101 answer, with no extension."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode("ascii")


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The request or status line and the headers (lower-cased names) of an HTTP head."""
    text = head.decode("latin-1")
    first, _, rest = text.partition("\r\n")
    headers: dict[str, str] = {}
    for line in rest.split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return first, headers


def _header(opcode: int, length: int, *, masked: bool, rsv1: bool = False) -> bytes:
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return struct.pack("!BB", first, mask_bit | length)
    if length < 1 << 16:
        return struct.pack("!BBH", first, mask_bit | 126, length)
    return struct.pack("!BBQ", first, mask_bit | 127, length)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked frame, as a server sends it."""
    return _header(opcode, len(payload), masked=False) + payload


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked frame, as a client sends it."""
    mask = os.urandom(4)
    return _header(opcode, len(payload), masked=True) + mask + apply_mask(payload, mask)


def masked_constant(opcode: int, payload: bytes) -> bytes:
    """A masked client frame built once and reused (a fixed masking key: fine on loopback)."""
    return client_frame(opcode, payload)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame."""
    return struct.pack("!H", code) + reason.encode("utf-8")


class FrameParser:
    """Incremental parser for complete frames; ``feed`` bytes, then ``next`` until None.

    ``want_payload=False`` skips unmasking and copying of data frames (payload None); control
    frames always carry their payload. Fragmented messages are not reassembled: the peers here
    never fragment.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self, *, want_payload: bool = True) -> tuple[int, bool, bytes | None] | None:
        """The next complete frame as ``(opcode, rsv1, payload)``, or None if incomplete.

        ``rsv1`` marks a permessage-deflate compressed message.
        """
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        opcode = b0 & 0x0F
        masked = b1 & 0x80
        length = b1 & 0x7F
        offset = 2
        if length == 126:
            if available < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, pos + 2)
            offset = 4
        elif length == 127:
            if available < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, pos + 2)
            offset = 10
        mask_at = offset
        if masked:
            offset += 4
        end = offset + length
        if available < end:
            return None
        self._pos = pos + end
        rsv1 = bool(b0 & 0x40)
        if not want_payload and opcode < OP_CLOSE:
            return opcode, rsv1, None
        payload = bytes(buf[pos + offset : pos + end])
        if masked:
            payload = apply_mask(payload, bytes(buf[pos + mask_at : pos + mask_at + 4]))
        return opcode, rsv1, payload
