"""A WebSocket client on a bare asyncio protocol, for load generators.

A websockets client costs about as much per connection and per message as the server it
talks to, so a load generator built on it saturates its own core before a server under test
saturates its. This one does the opening handshake, finds frame boundaries, inflates
permessage-deflate messages with zlib (offering the extension, as browsers do, so the server
compresses as it would in production), sends uncompressed masked frames (which
permessage-deflate allows), and answers close and ping frames. Subclasses handle text.

:class:`V2LoadClient` adds the minimum of protocol v2 (``docs/protocol.md``) a receiving client
needs: it takes each application message's ``offset`` once, in order, and acks cumulatively.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

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
        self.close_code: int | None = None
        """The code of the server's close frame, once one arrived (None without a code)."""
        self.close_reason = ""

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
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.close_reason = payload[2:].decode("utf-8", "replace")
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


ACK_EVERY = 32
"""A v2 client acks once this many messages are unacknowledged (the protocol's batch)..."""
ACK_INTERVAL_S = 0.05
"""... or this long after the first of them, whichever comes first."""


class V2LoadClient(LoadClient):
    """A protocol v2 client that receives: connect with ``version=2`` in the query.

    Each application message (it carries an integer ``offset``) is taken once: offset *last + 1*
    goes to :meth:`on_message`; a lower one is a duplicate (counted, not delivered, acked again
    at once); a higher one is a gap (counted; the client drops the connection, as the protocol
    says, and does not resume). Acks are cumulative, ``{"type":"ack","offset":N}``, sent once
    ``ACK_EVERY`` messages are unacknowledged or ``ACK_INTERVAL_S`` after the first of them.
    The server's ``error`` messages are counted; pings are answered.
    """

    def __init__(self, path: str, host: str, *, offer_deflate: bool = True) -> None:
        super().__init__(path, host, offer_deflate=offer_deflate)
        self.hello: dict[str, Any] | None = None
        self.last_offset = 0
        """The last offset taken (contiguous from 1)."""
        self.acked = 0
        self.ack_timer: asyncio.TimerHandle | None = None
        self.duplicates = 0
        self.gaps = 0
        self.errors: list[str] = []

    def on_text(self, payload: bytes) -> None:
        message = json.loads(payload)
        offset = message.get("offset")
        if isinstance(offset, int) and not isinstance(offset, bool):
            if offset == self.last_offset + 1:
                self.last_offset = offset
                self.on_message(message)
                if self.last_offset - self.acked >= ACK_EVERY:
                    self.send_ack()
                elif self.ack_timer is None:
                    loop = asyncio.get_running_loop()
                    self.ack_timer = loop.call_later(ACK_INTERVAL_S, self.send_ack)
            elif 0 < offset <= self.last_offset:
                self.duplicates += 1
                self.send_ack(force=True)
            else:
                self.gaps += 1
                self.abort()
            return
        kind = message.get("type")
        if kind == "hello":
            self.hello = message
            self.on_hello(message)
        elif kind == "ping" and self.transport is not None:
            self.transport.write(wire.client_frame(wire.OP_TEXT, b'{"type":"pong"}'))
        elif kind == "error":
            self.errors.append(str(message.get("message", ""))[:200])

    def send_ack(self, *, force: bool = False) -> None:
        """Ack every offset taken so far (if any is unacknowledged, or ``force``)."""
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.last_offset > self.acked or force:
            self.acked = self.last_offset
            text = b'{"type":"ack","offset":%d}' % self.last_offset
            self.transport.write(wire.client_frame(wire.OP_TEXT, text))

    def on_lost(self) -> None:
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None

    # -- for subclasses ------------------------------------------------------------------

    def on_hello(self, hello: dict[str, Any]) -> None:
        """The hello arrived."""

    def on_message(self, message: dict[str, Any]) -> None:
        """An application message arrived, the first time its offset did (``offset`` kept)."""
