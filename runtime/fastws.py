"""A faster ``Transport``: websockets' Sans-I/O client protocol inside a bare ``asyncio.Protocol``.

``open_fast_websocket`` is a drop-in ``Opener`` with the failure semantics of
``steadysocket.runtime.transport.open_websocket``: the same ``OpenFailed`` failures (they go
through ``failure_from_exception``) and the same ``TransportClosed`` failures (through
``_closed_failure``, fed the same ``ConnectionClosed`` that websockets' asyncio connection
would raise). What it leaves out is the machinery a general-purpose client needs and the
manager does not: the message assembler with its queue of futures, the ``send_context``
async context manager around every write, keepalive pings and ``latency``.

The pump (the shape of websockets' own runtimes, ``STYLE.md``): ``data_received`` feeds the
parser, writes what the protocol wants written (pongs, the echo of a close frame, EOF), and
appends each complete text or binary message to a deque; ``recv()`` pops from it without
suspending while it holds messages, and waits on one future only when it is empty. ``send()``
frames the text and hands it to ``transport.write()`` at once; it awaits only when asyncio's
flow control paused writing (the peer stopped reading).

Liveness is not this module's business: no protocol pings (as ``open_websocket``), and the
manager bounds every blocked send. Two timeouts are: the closing handshake (``CLOSE_TIMEOUT_S``
after a close frame was sent or received, the TCP connection is dropped) and nothing else; the
opening handshake is bounded by the caller, which cancels the opener.

Differences from ``WebsocketsTransport`` (none in what a failure reads as):

- a close frame received from a peer that then keeps the TCP connection open ends the
  connection after ``CLOSE_TIMEOUT_S`` (websockets' ``recv()`` waits for ever);
- ``send()`` on a connection that ``abort()`` or a write error already doomed refuses the frame
  (``written=False``), where websockets drops it silently and reports it written;
- reading pauses while more than ``READ_LIMIT_BYTES`` of received messages wait for ``recv()``
  (websockets counts 16 messages instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import struct
import urllib.parse
from collections import deque
from collections.abc import Sequence
from ssl import SSLContext
from typing import Any, NoReturn, cast

from websockets.asyncio.client import MAX_REDIRECTS
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.client import ClientProtocol
from websockets.datastructures import Headers, HeadersLike
from websockets.exceptions import (
    ConnectionClosed,
    InvalidStatus,
    InvalidURI,
    SecurityError,
    TooManyFragments,
)
from websockets.frames import BINARY, CONT, TEXT, CloseCode, Frame
from websockets.headers import validate_subprotocols
from websockets.http11 import USER_AGENT, Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI, parse_uri

from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind
from steadysocket.runtime.transport import (
    CLOSE_TIMEOUT_S,
    OpenFailed,
    Transport,
    TransportClosed,
    _closed_failure,
    failure_from_exception,
)

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets installed without its C extension
    from websockets.utils import apply_mask

__all__ = ["READ_LIMIT_BYTES", "WRITE_LIMIT_BYTES", "FastTransport", "open_fast_websocket"]

OPEN = State.OPEN
CLOSED = State.CLOSED

WRITE_LIMIT_BYTES = 1 << 15
"""asyncio's high-water mark for the write buffer: above it ``send()`` waits (websockets'
``write_limit`` default, so a peer that stops reading stalls the sender at the same point)."""

READ_LIMIT_BYTES = 1 << 20
"""Received bytes that may wait for ``recv()`` before reading pauses; it resumes once every
waiting message was taken."""

_MASK_POOL_BYTES = 4096
"""Masking keys are drawn from ``os.urandom`` this many bytes (1024 keys) at a time."""


class FastTransport(asyncio.Protocol):
    """``Transport`` over ``websockets.client.ClientProtocol`` and an asyncio transport.

    It is the asyncio protocol of its connection too; ``open_fast_websocket`` creates it.
    ``subprotocol`` is the one the server chose (None when none was asked for or chosen).
    """

    def __init__(self, protocol: ClientProtocol, close_timeout: float | None) -> None:
        self.protocol = protocol
        self.close_timeout = close_timeout
        self.subprotocol: Subprotocol | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._frames: deque[str | bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        """``recv()`` waiting for a message or the end."""
        self._unread = 0
        """Bytes received since ``recv()`` last found the deque empty."""
        self._reading_paused = False
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._fragmented_text = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        """``send()`` waiting for asyncio to resume writing."""
        self._response: asyncio.Future[None] = self._loop.create_future()
        """Done once the opening handshake succeeded or failed."""
        self._lost: asyncio.Future[None] = self._loop.create_future()
        """Done once the TCP connection is gone."""
        self._close_timer: asyncio.TimerHandle | None = None
        self._connection_exc: BaseException | None = None
        self._failure: CloseFailure | ErrorFailure | None = None
        """How the connection ended, once it has: every later call raises with it."""
        self._masks = b""
        self._mask_at = 0

    @property
    def closed(self) -> bool:
        """True once the TCP connection is gone (its socket closed)."""
        return self._lost.done()

    # -- Transport ------------------------------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next message; raises ``TransportClosed`` when the connection ended (after the
        messages received before the end)."""
        frames = self._frames
        if frames:
            return frames.popleft()
        return await self._wait_frame()

    async def send(self, text: str) -> None:
        """Write one text frame now; waits only while asyncio paused writing.

        Refused (``TransportClosed(..., written=False)``) when the connection is no longer
        open: then it waits for the end to know its failure, as websockets does.
        """
        transport = self._transport
        if self.protocol.state is not OPEN or transport is None or transport.is_closing():
            await self._refuse()
        try:
            payload = text.encode()
        except UnicodeEncodeError as exc:
            # websockets fails the connection here too (its send_context catches it).
            self._set_connection_exc(exc)
            self.abort()
            await asyncio.shield(self._lost)
            raise TransportClosed(self._ended(), written=True) from exc
        transport.write(self._text_frame(payload))
        if self._write_paused:
            await self._wait_writable()

    async def close(self, code: int, reason: str) -> None:
        """The closing handshake: send a close frame and wait until the server closes TCP,
        at most ``close_timeout`` (then the connection is dropped).

        Raises:
            websockets.exceptions.ProtocolError: ``code`` may not be sent.
        """
        transport = self._transport
        if self.protocol.state is OPEN and transport is not None and not transport.is_closing():
            self.protocol.send_close(code, reason)
            self._flush()
            self._arm_close_timer()
        if self._reading_paused and transport is not None:
            # The peer's close frame and its TCP close must be read to end the handshake.
            self._reading_paused = False
            transport.resume_reading()
        await asyncio.shield(self._lost)

    def abort(self) -> None:
        """Drop the TCP connection now; a no-op once it is gone."""
        transport = self._transport
        if transport is not None:
            transport.abort()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.set_write_buffer_limits(WRITE_LIMIT_BYTES)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        self._flush()  # pongs, the echo of a close frame, EOF
        if not self._response.done():
            events = self._handshake_events(events)
        frames = self._frames
        try:
            for frame in cast(list[Frame], events):
                opcode = frame.opcode
                if opcode is TEXT:
                    if frame.fin:
                        # The parser yields bytes or bytearray, never a memoryview.
                        frames.append(frame.data.decode())  # type: ignore[union-attr]
                    else:
                        self._fragments.append(frame.data)
                        self._fragmented_text = True
                elif opcode is BINARY:
                    if frame.fin:
                        frames.append(bytes(frame.data))
                    else:
                        self._fragments.append(frame.data)
                        self._fragmented_text = False
                elif opcode is CONT:
                    self._continuation(frame)
                # Pings were answered by the protocol; pongs and the close frame need nothing.
        except UnicodeDecodeError as exc:
            self._fail(exc, CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        except TooManyFragments as exc:
            self._fail(exc, CloseCode.MESSAGE_TOO_BIG, "too many fragments")
        if protocol.close_expected():
            self._arm_close_timer()
        if frames:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            self._unread += len(data)
            if self._unread > READ_LIMIT_BYTES and not self._reading_paused:
                assert self._transport is not None
                self._reading_paused = True
                self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        events = self.protocol.events_received()
        self._flush()
        if not self._response.done():
            # A response without Content-Length ends at EOF.
            self._handshake_events(events)
        # The WebSocket closing handshake is over (or broken): let asyncio close the socket.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # Idempotent; it brings the protocol to CLOSED and sets the parser's exception.
        self.protocol.receive_eof()
        self._set_connection_exc(exc)
        self._failure = self._ended()
        timer, self._close_timer = self._close_timer, None
        if timer is not None:
            timer.cancel()
        for future in (self._response, self._lost, self._waiter, self._writable):
            if future is not None and not future.done():
                future.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    # -- internals ------------------------------------------------------------------------

    async def _wait_frame(self) -> str | bytes:
        frames = self._frames
        while not frames:
            if self._failure is not None:
                raise TransportClosed(self._failure)
            if self._waiter is not None:
                raise RuntimeError("recv() is already waiting on this connection")
            self._unread = 0
            if self._reading_paused and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return frames.popleft()

    async def _refuse(self) -> NoReturn:
        """The connection is closing or closed: wait for its end (bounded by the close timer,
        or by asyncio delivering ``connection_lost``), then refuse the frame."""
        if not self._lost.done() and self.protocol.state is not OPEN:
            self._arm_close_timer()
        await asyncio.shield(self._lost)
        raise TransportClosed(self._ended(), written=False)

    async def _wait_writable(self) -> None:
        while self._write_paused and self._failure is None:
            writable = self._writable
            if writable is None:
                writable = self._writable = self._loop.create_future()
            await asyncio.shield(writable)
        if self._failure is not None:
            # The frame was in the buffer when the connection ended: written, maybe lost.
            raise TransportClosed(self._failure, written=True)

    def _text_frame(self, payload: bytes) -> bytes:
        """One masked, unfragmented text frame (RFC 6455 5.2).

        Framed here rather than by ``ClientProtocol.send_text``: that builds a ``Frame`` and a
        ``BytesIO`` per message (about 3 µs of the 5 it costs). The protocol's state is
        checked by ``send()``; this client never fragments, so the protocol's only other
        state for outgoing data frames (a fragmented message in progress) never changes.
        """
        at = self._mask_at
        if at >= len(self._masks):
            self._masks = os.urandom(_MASK_POOL_BYTES)
            at = 0
        mask = self._masks[at : at + 4]
        self._mask_at = at + 4
        length = len(payload)
        if length < 126:
            head = bytes((0x81, 0x80 | length))
        elif length < 65536:
            head = struct.pack("!BBH", 0x81, 0xFE, length)
        else:
            head = struct.pack("!BBQ", 0x81, 0xFF, length)
        return head + mask + apply_mask(payload, mask)

    def _continuation(self, frame: Frame) -> None:
        fragments = self._fragments
        if len(fragments) >= MAX_FRAGMENTS:
            raise TooManyFragments(MAX_FRAGMENTS)
        fragments.append(frame.data)
        if frame.fin:
            data = b"".join(fragments)
            fragments.clear()
            self._frames.append(data.decode() if self._fragmented_text else data)

    async def _handshake(self, extra: Headers | None) -> None:
        """Send the upgrade request and wait for the response; raises what websockets raises."""
        protocol = self.protocol
        request = protocol.connect()
        if extra is not None:
            request.headers.update(extra)
        request.headers.setdefault("User-Agent", USER_AGENT)
        protocol.send_request(request)
        self._flush()
        await asyncio.shield(self._response)
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        # Open, or already closing: a close frame right after the response is recv()'s news.

    def _handshake_events(self, events: list[Any]) -> list[Any]:
        """Take the handshake response off the events; the frames after it stay."""
        protocol = self.protocol
        if events and isinstance(events[0], Response):
            if protocol.handshake_exc is None:
                self.subprotocol = protocol.subprotocol
            self._response.set_result(None)
            return events[1:]
        if protocol.handshake_exc is not None:
            self._response.set_result(None)  # a response that did not parse
        return events

    def _flush(self) -> None:
        transport = self._transport
        assert transport is not None
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                # As websockets: the socket may be gone already.
                with contextlib.suppress(Exception):
                    transport.write_eof()
            else:
                transport.close()

    def _fail(self, exc: BaseException, code: int, reason: str) -> None:
        """Fail the WebSocket connection (RFC 6455 7.1.7), as websockets does for ``exc``."""
        self._set_connection_exc(exc)
        self._fragments.clear()
        if self.protocol.state is OPEN:
            self.protocol.fail(code, reason)
            self._flush()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self.close_timeout is not None and not self._lost.done():
            self._close_timer = self._loop.call_later(self.close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        self._set_connection_exc(TimeoutError("timed out while closing connection"))
        self.abort()

    def _set_connection_exc(self, exc: BaseException | None) -> None:
        if self._connection_exc is None:
            self._connection_exc = exc

    def _ended(self) -> CloseFailure | ErrorFailure:
        """The failure websockets would report: ``ConnectionClosed`` built the same way (the
        protocol's close frames, chained to the network error or else the parser's)."""
        if self._failure is not None:
            return self._failure
        protocol = self.protocol
        if protocol.state is not CLOSED:  # not reached: connection_lost closes the protocol
            return ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "")
        closed: ConnectionClosed = protocol.close_exc
        if self._connection_exc is not None:
            closed.__cause__ = self._connection_exc
        return _closed_failure(closed)


async def open_fast_websocket(
    url: str,
    *,
    max_size: int | None = 1 << 20,
    ssl: SSLContext | None = None,
    headers: HeadersLike | None = None,
    subprotocols: Sequence[str] | None = None,
) -> Transport:
    """Open a WebSocket connection to ``url`` on a :class:`FastTransport`; raises ``OpenFailed``.

    The arguments are ``open_websocket``'s: ``max_size`` bounds a received message (the
    connection fails with 1009 beyond it; None: no bound), ``ssl`` is the client context for
    ``wss://`` (by default the system's trusted certificates), ``headers`` are added to the
    handshake request (websockets' ``additional_headers``), ``subprotocols`` are offered in
    order of preference. No compression is negotiated. Redirects (3xx with a Location) are
    followed as websockets follows them. The opening handshake has no timeout of its own: the
    caller bounds it by cancelling (the half-open connection is then aborted).

    Raises:
        ValueError: ``url`` is not a WebSocket URL.
        OpenFailed: the connection could not be opened (``failure_from_exception``).
    """
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"invalid WebSocket URL {url!r}: {exc}") from exc
    try:
        return await _open(url, uri, max_size, ssl, headers, subprotocols)
    except Exception as exc:
        raise OpenFailed(failure_from_exception(exc)) from exc


async def _open(
    url: str,
    uri: WebSocketURI,
    max_size: int | None,
    ssl: SSLContext | None,
    headers: HeadersLike | None,
    subprotocols: Sequence[str] | None,
) -> FastTransport:
    if not uri.secure and ssl is not None:
        raise ValueError("ssl argument is incompatible with a ws:// URI")
    offered = None if subprotocols is None else [Subprotocol(s) for s in subprotocols]
    if offered is not None:
        validate_subprotocols(offered)
    extra = None if headers is None else Headers(headers)
    loop = asyncio.get_running_loop()
    for _ in range(MAX_REDIRECTS):
        protocol = ClientProtocol(uri, subprotocols=offered, max_size=max_size)
        tls: dict[str, Any] = {}
        if uri.secure:
            tls = {"ssl": ssl if ssl is not None else True, "server_hostname": uri.host}
        _, connection = await loop.create_connection(
            functools.partial(FastTransport, protocol, CLOSE_TIMEOUT_S), uri.host, uri.port, **tls
        )
        try:
            await connection._handshake(extra)
        except asyncio.CancelledError:
            connection.abort()
            raise
        except Exception as exc:
            connection.abort()
            target = _redirect(url, uri, exc)
            if target is None:
                raise
            url = target
            uri = parse_uri(target)
            if extra is not None and not _same_origin(uri, protocol.uri):
                # Credentials stay with their origin.
                extra = Headers(
                    (key, value)
                    for key, value in extra.raw_items()
                    if key.lower() not in ("authorization", "cookie", "proxy-authorization")
                )
            continue
        return connection
    raise SecurityError(f"more than {MAX_REDIRECTS} redirects")


def _same_origin(a: WebSocketURI, b: WebSocketURI) -> bool:
    return a.secure == b.secure and a.host == b.host and a.port == b.port


def _redirect(url: str, uri: WebSocketURI, exc: Exception) -> str | None:
    """The URL a 3xx response sends the client to, or None when ``exc`` is no redirect.

    Raises:
        SecurityError: a redirect from ``wss://`` to ``ws://``.
    """
    if not (
        isinstance(exc, InvalidStatus)
        and exc.response.status_code in (300, 301, 302, 303, 307, 308)
        and "Location" in exc.response.headers
    ):
        return None
    target = urllib.parse.urljoin(url, exc.response.headers["Location"])
    if uri.secure and not parse_uri(target).secure:
        raise SecurityError(f"cannot follow redirect to non-secure URI {target}") from exc
    return target
