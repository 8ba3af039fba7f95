"""The socket behind a client, behind a small interface the manager and the test fakes share.

``open_websocket`` is the real one, on ``websockets.asyncio.client``. It maps every way a
connection can fail to a ``steadysocket.model.classify`` failure, so classification stays pure.
Protocol-level keepalive pings are off: the application-level heartbeat and the lifecycle's
silence watchdog (``degraded``, dead peer) are the one liveness mechanism, with one set of
timings taken from the server's hello.

Per-attempt options (``ConnectOptions``: extra headers, subprotocols, a TLS context, and the
``auth`` callable asked for credentials before every attempt) reach the opener through
``open_attempt``; the :data:`Opener` docstring states the contract.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ssl import SSLContext, SSLError
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.protocol import State
from websockets.typing import Subprotocol

from steadysocket.model.classify import (
    CloseFailure,
    ErrorFailure,
    ErrorKind,
    Failure,
    HttpFailure,
)

logger = logging.getLogger(__name__)


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


Opener = Callable[..., Awaitable[Transport]]
"""Opens a transport to a URL; raises ``OpenFailed``. Timeouts are the lifecycle's business.

The contract: the manager calls ``await opener(url)`` when it has no per-attempt options, so
an opener that takes only the URL (a test's in-memory server) keeps working. Otherwise it
calls ``await opener(url, **options)`` with only the options that are set, each as a keyword:

- ``headers``: a tuple of ``(name, value)`` pairs, the manager's ``headers`` and what its
  ``auth`` callable returned for this attempt (``Authorization: Bearer <token>`` for a token);
- ``subprotocols``: a tuple of subprotocol names to offer, in order of preference;
- ``ssl``: the ``SSLContext`` for a ``wss://`` URL (never passed for ``ws://``).

:func:`open_websocket` takes all three.
"""

Credentials = str | Mapping[str, str] | None
"""What an ``auth`` callable returns: a token (sent as ``Authorization: Bearer <token>``), a
mapping of headers to send as they are, or None (nothing to add this time)."""

AuthCallable = Callable[[], Credentials | Awaitable[Credentials]]
"""``auth``: called, and awaited if it returns an awaitable, before every attempt."""

HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]
"""Extra headers: a mapping, or ``(name, value)`` pairs (a name may repeat)."""


def _header_problem(pairs: Iterable[tuple[object, object]]) -> str | None:
    """Why these header pairs cannot go into a request, or None when they can."""
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            kinds = f"{type(name).__name__}, {type(value).__name__}"
            return f"a header that is not a pair of strings ({kinds})"
        if not name or any(c in name for c in ":\r\n \t"):
            return f"an invalid header name {name!r}"
        if "\r" in value or "\n" in value or "\0" in value:
            return f"a header value with a line break or NUL ({name})"
    return None


def _merge(
    base: Sequence[tuple[str, str]], extra: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    """``base`` without the names ``extra`` sets (any case), then ``extra``."""
    replaced = {name.lower() for name, _ in extra}
    return (*(pair for pair in base if pair[0].lower() not in replaced), *extra)


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """What a manager adds to every attempt (``WebSocketManager(headers=, subprotocols=, ssl=,
    auth=)``); build it with :meth:`build`, which checks it."""

    headers: tuple[tuple[str, str], ...] = ()
    subprotocols: tuple[str, ...] = ()
    ssl: SSLContext | None = None
    auth: AuthCallable | None = None

    @classmethod
    def build(
        cls,
        *,
        headers: HeadersLike | None = None,
        subprotocols: Sequence[str] | None = None,
        ssl: SSLContext | None = None,
        auth: AuthCallable | None = None,
        urls: Sequence[str] = (),
    ) -> ConnectOptions:
        """Check and freeze the options; ``urls`` are the base URLs they will be used with.

        Raises:
            ValueError: a header is not a pair of strings, has an invalid name, or a line
                break in its value; a subprotocol is empty or not a string; ``ssl`` was given
                but none of ``urls`` is ``wss://`` (it would silently go unused).
            TypeError: ``ssl`` is not an ``SSLContext``, or ``auth`` is not callable.
        """
        pairs: tuple[tuple[str, str], ...] = ()
        if headers is not None:
            items = headers.items() if isinstance(headers, Mapping) else headers
            pairs = tuple(cast("Iterable[tuple[str, str]]", (tuple(item) for item in items)))
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("headers: give a mapping or (name, value) pairs")
            problem = _header_problem(pairs)
            if problem is not None:
                raise ValueError(f"headers: {problem}")
        offered: tuple[str, ...] = ()
        if subprotocols is not None:
            if isinstance(subprotocols, str):
                raise ValueError("subprotocols: give a list of names, not one string")
            offered = tuple(subprotocols)
            if not all(isinstance(name, str) and name for name in offered):
                raise ValueError(f"subprotocols: each must be a non-empty string: {offered!r}")
        if ssl is not None:
            if not isinstance(ssl, SSLContext):
                raise TypeError(f"ssl must be an ssl.SSLContext, got {type(ssl).__name__}")
            if urls and not any(_is_secure(url) for url in urls):
                raise ValueError("ssl= is for wss:// URLs, and no URL given is wss://")
        if auth is not None and not callable(auth):
            raise TypeError(f"auth must be a callable, got {type(auth).__name__}")
        return cls(pairs, offered, ssl, auth)

    @property
    def empty(self) -> bool:
        """No option is set: the opener is called with the URL alone."""
        return not self.headers and not self.subprotocols and self.ssl is None and self.auth is None


def _is_secure(url: str) -> bool:
    return urlsplit(url).scheme.lower() == "wss"


async def _credentials(auth: AuthCallable) -> tuple[tuple[str, str], ...]:
    """Ask ``auth`` for this attempt's credentials, as headers; raises ``OpenFailed`` (AUTH)."""
    try:
        result = auth()
        if inspect.isawaitable(result):
            result = await result
    except Exception as exc:
        raise OpenFailed(ErrorFailure(ErrorKind.AUTH, f"auth() raised {_reason(exc)}")) from exc
    if result is None:
        return ()
    if isinstance(result, str):
        if not result:
            raise OpenFailed(ErrorFailure(ErrorKind.AUTH, "auth() returned an empty token"))
        pairs: tuple[tuple[object, object], ...] = (("Authorization", f"Bearer {result}"),)
    elif isinstance(result, Mapping):
        pairs = tuple(result.items())
    else:
        raise OpenFailed(
            ErrorFailure(
                ErrorKind.AUTH,
                f"auth() returned {type(result).__name__}, not a token (str), "
                "headers (a mapping) or None",
            )
        )
    problem = _header_problem(pairs)
    if problem is not None:
        raise OpenFailed(ErrorFailure(ErrorKind.AUTH, f"auth() returned {problem}"))
    return cast("tuple[tuple[str, str], ...]", pairs)


async def open_attempt(opener: Opener, url: str, options: ConnectOptions) -> Transport:
    """One attempt's opening: ``options.auth()`` first (when set), then ``opener``.

    The opener gets the URL alone when there is nothing to add, else the options that are set
    as keywords (see :data:`Opener`). Headers from ``auth`` replace ``options.headers`` of the
    same name (any case). ``auth`` runs inside the attempt, so the connection timeout bounds
    it too: an ``auth`` still running then is cancelled with the attempt (a connect timeout).

    Raises:
        OpenFailed: ``auth`` raised or returned no credentials (``ErrorKind.AUTH``), or the
            opener failed.
    """
    if options.empty:
        return await opener(url)
    headers = options.headers
    if options.auth is not None:
        try:
            credentials = await _credentials(options.auth)
        except asyncio.CancelledError:
            logger.info("[WS] attempt abandoned while auth() was running (%s)", url)
            raise
        headers = _merge(headers, credentials)
    keywords: dict[str, Any] = {}
    if headers:
        keywords["headers"] = headers
    if options.subprotocols:
        keywords["subprotocols"] = options.subprotocols
    if options.ssl is not None and _is_secure(url):
        keywords["ssl"] = options.ssl
    return await opener(url, **keywords)


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
    url: str,
    *,
    max_size: int | None = 1 << 20,
    ssl: SSLContext | None = None,
    headers: Iterable[tuple[str, str]] | None = None,
    subprotocols: Sequence[str] | None = None,
) -> Transport:
    """Open a real WebSocket connection to ``url``; raises ``OpenFailed``.

    ``ssl`` is the client context for ``wss://`` (for a private CA, pass
    ``WebSocketManager(..., ssl=context)``, which hands it here); by default a ``wss://`` URL
    uses the system's trusted certificates. ``headers`` go into the upgrade request as they are
    (websockets' ``additional_headers``), ``subprotocols`` are offered in order.
    """
    tls: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
    offered = None if not subprotocols else [Subprotocol(name) for name in subprotocols]
    try:
        connection = await connect(
            url,
            proxy=None,
            open_timeout=None,
            ping_interval=None,
            # A dead peer never answers the close frame; drop TCP instead of lingering.
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=max_size,
            additional_headers=None if headers is None else list(headers),
            subprotocols=offered,
            **tls,
        )
    except InvalidURI as exc:
        raise ValueError(f"invalid WebSocket URL {url!r}: {exc}") from exc
    except Exception as exc:
        raise OpenFailed(failure_from_exception(exc)) from exc
    return WebsocketsTransport(connection)
