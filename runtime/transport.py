"""The socket behind a client, behind a small interface the manager and the test fakes share.

``open_websocket`` is the real one, on ``websockets.asyncio.client``. It maps every way a
connection can fail to a ``steadysocket.model.classify`` failure, so classification stays pure.
Protocol-level keepalive pings are off: the application-level heartbeat and the lifecycle's
silence watchdog (``degraded``, dead peer) are the one liveness mechanism, with one set of
timings taken from the server's hello.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from ssl import SSLContext, SSLError
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.protocol import State

from steadysocket.model.classify import (
    CloseFailure,
    ErrorFailure,
    ErrorKind,
    Failure,
    HttpFailure,
)


class TransportClosed(Exception):
    """The connection ended; ``failure`` says how (a close frame, or no close frame).

    ``written`` is for ``Transport.send``: False when the frame was refused before anything
    was written (the connection was already closed), True when the connection ended after the
    frame was taken into the transport's buffer.
    """

    def __init__(self, failure: CloseFailure | ErrorFailure, *, written: bool = True) -> None:
        super().__init__(failure.describe())
        self.failure = failure
        self.written = written


class OpenFailed(Exception):
    """The connection could not be opened; ``failure`` says why."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.describe())
        self.failure = failure


class Transport(Protocol):
    """One open WebSocket connection."""

    async def recv(self) -> str | bytes:
        """The next frame; raises ``TransportClosed`` when the connection ends."""

    async def send(self, text: str) -> None:
        """Send one text frame; raises ``TransportClosed`` when the connection is gone.

        The frame must be taken into the transport's buffer before the first suspension, or
        refused with ``TransportClosed(..., written=False)``: the manager counts a frame whose
        ``send()`` began as written (at most once), and re-queues only a refused one.
        """

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason``; never raises for an already-closed connection."""

    def abort(self) -> None:
        """Drop the connection at once (no close handshake); a no-op once it is closed."""


Opener = Callable[[str], Awaitable[Transport]]
"""Opens a transport to a URL; raises ``OpenFailed``. Timeouts are the lifecycle's business."""


def _closed_failure(exc: ConnectionClosed) -> CloseFailure | ErrorFailure:
    if exc.rcvd is None:
        # The kind's label already says "connection lost without a close frame": the detail
        # adds only what websockets knows of the cause.
        cause = exc.__cause__
        return ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "" if cause is None else _reason(cause))
    return CloseFailure(exc.rcvd.code, exc.rcvd.reason)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WebsocketsTransport:
    """``Transport`` over a ``websockets`` client connection."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def recv(self) -> str | bytes:
        try:
            return await self.connection.recv()
        except ConnectionClosed as exc:
            raise TransportClosed(_closed_failure(exc)) from exc

    async def send(self, text: str) -> None:
        connection = self.connection
        # websockets writes an unfragmented frame to the transport before its first await
        # when the connection is open; otherwise it writes nothing and raises.
        written = connection.state is State.OPEN
        try:
            await connection.send(text)
        except ConnectionClosed as exc:
            raise TransportClosed(_closed_failure(exc), written=written) from exc

    async def close(self, code: int, reason: str) -> None:
        await self.connection.close(code, reason)

    def abort(self) -> None:
        transport = self.connection.transport
        if transport is not None:
            transport.abort()


def failure_from_exception(exc: BaseException) -> Failure:
    """Map an exception raised while opening a connection to a failure to classify."""
    # TimeoutError is an OSError: test it first.
    if isinstance(exc, TimeoutError):
        return ErrorFailure(ErrorKind.CONNECT_TIMEOUT, "opening handshake timed out")
    if isinstance(exc, InvalidStatus):
        return HttpFailure(exc.response.status_code)
    if isinstance(exc, ConnectionClosed):
        return _closed_failure(exc)
    if isinstance(exc, InvalidMessage | InvalidHandshake):
        return ErrorFailure(ErrorKind.NO_CLOSE_FRAME, f"handshake broke off: {exc}")
    if isinstance(exc, ConnectionRefusedError):
        return ErrorFailure(ErrorKind.REFUSED, str(exc))
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno in {errno.ECONNRESET, errno.EPIPE}
    ):
        # The peer accepted the connection and then dropped it: neither "refused" (what a
        # reset without an errno used to read as) nor "unreachable".
        return ErrorFailure(ErrorKind.NO_CLOSE_FRAME, f"connection reset: {_reason(exc)}")
    if isinstance(exc, SSLError):
        # An SSLError is an OSError too; without this a certificate the client does not trust
        # was reported as "connection refused" (network). PROTOCOL Client 13 has no TLS row,
        # so it is "anything else": unknown.
        return ErrorFailure(ErrorKind.OTHER, f"TLS: {exc}")
    if isinstance(exc, socket.gaierror):
        return ErrorFailure(ErrorKind.DNS, str(exc))
    if isinstance(exc, OSError) and exc.errno in {errno.EHOSTUNREACH, errno.ENETUNREACH}:
        return ErrorFailure(ErrorKind.UNREACHABLE, str(exc))
    if isinstance(exc, OSError):
        return ErrorFailure(ErrorKind.REFUSED, str(exc))
    return ErrorFailure(ErrorKind.OTHER, f"{type(exc).__name__}: {exc}")


CLOSE_TIMEOUT_S = 2.0
"""How long a closing handshake may take before the TCP connection is dropped."""


async def open_websocket(
    url: str, *, max_size: int | None = 1 << 20, ssl: SSLContext | None = None
) -> Transport:
    """Open a real WebSocket connection to ``url``; raises ``OpenFailed``.

    ``ssl`` is the client context for ``wss://`` (for a private CA:
    ``WebSocketManager(..., opener=functools.partial(open_websocket, ssl=context))``); by
    default a ``wss://`` URL uses the system's trusted certificates.
    """
    tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
    try:
        connection = await connect(
            url,
            proxy=None,
            open_timeout=None,
            ping_interval=None,
            # A dead peer never answers the close frame; drop TCP instead of lingering.
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=max_size,
            **tls,
        )
    except InvalidURI as exc:
        raise ValueError(f"invalid WebSocket URL {url!r}: {exc}") from exc
    except Exception as exc:
        raise OpenFailed(failure_from_exception(exc)) from exc
    return WebsocketsTransport(connection)
