"""A WebSocket client on a bare asyncio protocol, for load generators.

A websockets client costs about as much per connection and per message as the server it
talks to, so a load generator built on it saturates its own core before a server under test
saturates its. This one does the opening handshake, finds frame boundaries, inflates
permessage-deflate messages with zlib (offering the extension, as browsers do, so the server
compresses as it would in production), sends uncompressed masked frames (which
permessage-deflate allows), and answers close and ping frames. Subclasses handle text.
"""

from __future__ import annotations

import asyncio
import zlib

from bench import wire

_TAIL = b"\x00\x00\xff\xff"


class LoadClient(asyncio.Protocol):
    """One client connection. ``opened`` resolves on the 101, ``lost`` when TCP closes."""

    def __init__(self, path: str, host: str, *, offer_deflate: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.request = wire.upgrade_request(path, host, wire.new_key(), offer_deflate=offer_deflate)
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upgraded = False
        self.parser = wire.FrameParser()
        self.inflater: zlib._Decompress | None = None
        self.fresh_inflater = False
        self.opened: asyncio.Future[bool] = loop.create_future()
        """True once upgraded; False if the upgrade failed or TCP closed first."""
        self.lost: asyncio.Future[None] = loop.create_future()
        self.close_sent = False

    # -- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_lost()

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > wire.MAX_HEAD_BYTES:
                    self.abort()
                return
            status, headers = wire.parse_head(bytes(self.head[:end]))
            data = bytes(self.head[end + 4 :])
            if " 101 " not in status + " ":
                self.opened.set_result(False)
                self.abort()
                return
            extensions = headers.get("sec-websocket-extensions", "")
            if "permessage-deflate" in extensions:
                self.inflater = zlib.decompressobj(wbits=-15)
                self.fresh_inflater = "server_no_context_takeover" in extensions
            self.upgraded = True
            self.opened.set_result(True)
        self.parser.feed(data)
        self._frames()

    def _frames(self) -> None:
        transport = self.transport
        assert transport is not None
        for _ in range(1 << 30):  # bounded: ends when no complete frame is buffered
            frame = self.parser.next()
            if frame is None:
                return
            opcode, compressed, payload = frame
            assert payload is not None
            if opcode == wire.OP_TEXT:
                if compressed:
                    payload = self._inflate(payload)
                self.on_text(payload)
            elif opcode == wire.OP_CLOSE:
                if not self.close_sent:
                    self.close_sent = True
                    transport.write(wire.client_frame(wire.OP_CLOSE, payload[:2]))
                self.on_close_frame()
            elif opcode == wire.OP_PING:
                transport.write(wire.client_frame(wire.OP_PONG, payload))

    def _inflate(self, payload: bytes) -> bytes:
        if self.fresh_inflater or self.inflater is None:
            self.inflater = zlib.decompressobj(wbits=-15)
        return self.inflater.decompress(payload + _TAIL)

    # -- for subclasses ------------------------------------------------------------------

    def on_text(self, payload: bytes) -> None:
        """A text message arrived (inflated)."""

    def on_close_frame(self) -> None:
        """The server's close frame arrived (already answered)."""

    def on_lost(self) -> None:
        """TCP closed."""

    def send_close(self, code: int = 1000) -> None:
        """Start the closing handshake."""
        if self.transport is not None and not self.close_sent:
            self.close_sent = True
            self.transport.write(wire.client_frame(wire.OP_CLOSE, wire.close_payload(code)))

    def abort(self) -> None:
        """Drop the connection."""
        if self.transport is not None:
            self.transport.abort()
