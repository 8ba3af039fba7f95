"""Scripted fake servers: a server that misbehaves on cue, in memory or on loopback (part of
:mod:`steadysocket.testing`).

- :class:`InMemoryServer` is an ``Opener``: ``WebSocketManager(opener=server.open, ...)``. Its
  transports are in-process queues, so no socket is involved and every exchange completes in a
  few event-loop iterations, which :meth:`VirtualClock.settle` waits for.
- :class:`LoopbackServer` runs the same :class:`Script` on a real ``websockets`` server bound to
  127.0.0.1 (port 0), for the manager's real default opener.

Both servers follow the current :class:`Script` for each new connection, answer client pings
with pongs unless the script is silent, and record every attempt (:class:`AttemptRecord`),
every frame received per connection, and how each connection ended (:class:`ConnectionRecord`).
They speak protocol version 1, as the original backend does: a client asking for version 2 is
closed with 4400 before the hello.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import json
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind, HttpFailure
from steadysocket.model.protocol import (
    FEATURES,
    Reject,
    encode,
    format_timestamp,
    make_hello,
    make_ping,
    make_pong,
    validate_query,
)
from steadysocket.runtime.transport import OpenFailed, TransportClosed

from ._clock import ClockEntry, VirtualClock

__all__ = [
    "LATE_HELLO_OWNER",
    "AttemptRecord",
    "ConnState",
    "ConnectionRecord",
    "InMemoryServer",
    "LoopbackServer",
    "MemoryTransport",
    "Script",
    "ScriptMode",
    "ScriptedServer",
]

LATE_HELLO_OWNER = "fake-server-late-hello"
"""The owner name of a late hello parked on the virtual clock (both servers)."""


class ScriptMode(StrEnum):
    """What a scripted server does with a new connection (see :class:`Script`)."""

    ACCEPT = "accept"
    """Upgrade, then send a valid hello at once."""
    LATE_HELLO = "late_hello"
    """Upgrade, then send the hello after ``delay_ms`` of (virtual) time."""
    SILENT = "silent"
    """Upgrade and never send anything; open connections stop answering pings too."""
    BAD_HELLO = "bad_hello"
    """Upgrade, then send ``bad_text`` (not a valid hello) first."""
    WRONG_VERSION = "wrong_version"
    """Upgrade, then send a hello whose ``accepted_version`` is not the one requested."""
    CLOSE = "close"
    """Upgrade, then close with ``code`` and ``reason`` before any hello (as for 4401)."""
    DROP = "drop"
    """Upgrade, then drop the connection without a close frame (the client sees 1006)."""
    REJECT = "reject"
    """Answer the upgrade request with HTTP ``status``."""
    REFUSE = "refuse"
    """Refuse the TCP connection (the loopback server stops listening)."""
    HANG = "hang"
    """In memory only: the opening handshake never completes (a black-holed SYN)."""


_SILENT_MODES = frozenset({ScriptMode.SILENT, ScriptMode.HANG})
_BAD_HELLO = '{"type": "hello", "accepted_version": 1}'


@dataclass(frozen=True)
class Script:
    """How a scripted server treats new connections (and whether open ones answer pings).

    Build one with a constructor named after its mode (:meth:`accept`, :meth:`drop`,
    :meth:`reject`, ...) and switch it at any time with ``await server.set_script(script)``:
    a script applies to the connections that open after the switch, except that a silent one
    (:meth:`silent`, :meth:`hang`) also stops the open connections answering pings and echoing.
    """

    mode: ScriptMode = ScriptMode.ACCEPT
    heartbeat_interval_ms: int = 25_000
    """The heartbeat interval the hello announces."""
    features: tuple[str, ...] = FEATURES
    """The features the hello announces."""
    accepted_version: int | None = None
    """The version the hello accepts; None means the one the client asked for."""
    status: int = 503
    """The HTTP status of ``REJECT``."""
    code: int = 1000
    """The close code of ``CLOSE``."""
    reason: str = ""
    """The close reason of ``CLOSE``."""
    delay_ms: float = 0.0
    """How long ``LATE_HELLO`` waits before the hello."""
    bad_text: str = _BAD_HELLO
    """The first frame of ``BAD_HELLO``."""
    echo: bool = False
    """Echo every data message (``{"type": "echo", "original_message": ...}``)."""
    close_delay_ms: float = 0.0
    """In memory only: a client's close takes this long (virtual) to complete."""

    @property
    def responsive(self) -> bool:
        """Whether the server answers pings (and echoes) on open connections."""
        return self.mode not in _SILENT_MODES

    @classmethod
    def accept(
        cls,
        heartbeat_interval_ms: int = 25_000,
        *,
        features: tuple[str, ...] = FEATURES,
        echo: bool = False,
        close_delay_ms: float = 0.0,
    ) -> Self:
        """Upgrade and send a valid hello at once: a healthy server (the default script)."""
        return cls(
            ScriptMode.ACCEPT,
            heartbeat_interval_ms,
            features,
            echo=echo,
            close_delay_ms=close_delay_ms,
        )

    @classmethod
    def late_hello(cls, delay_ms: float, heartbeat_interval_ms: int = 25_000) -> Self:
        """Upgrade, then send the hello ``delay_ms`` later (on the virtual clock if any)."""
        return cls(ScriptMode.LATE_HELLO, heartbeat_interval_ms, delay_ms=delay_ms)

    @classmethod
    def silent(cls) -> Self:
        """Upgrade and say nothing; open connections stop answering pings (a dead peer)."""
        return cls(ScriptMode.SILENT)

    @classmethod
    def bad_hello(cls, text: str = _BAD_HELLO) -> Self:
        """Upgrade, then send ``text`` where the hello should be."""
        return cls(ScriptMode.BAD_HELLO, bad_text=text)

    @classmethod
    def wrong_version(cls, version: int = 3, heartbeat_interval_ms: int = 25_000) -> Self:
        """Upgrade, then send a hello that accepts ``version`` whatever the client asked."""
        return cls(ScriptMode.WRONG_VERSION, heartbeat_interval_ms, accepted_version=version)

    @classmethod
    def close(cls, code: int, reason: str = "") -> Self:
        """Upgrade, then close with ``code`` and ``reason`` before any hello."""
        return cls(ScriptMode.CLOSE, code=code, reason=reason)

    @classmethod
    def drop(cls) -> Self:
        """Upgrade, then drop the connection without a close frame (1006)."""
        return cls(ScriptMode.DROP)

    @classmethod
    def reject(cls, status: int) -> Self:
        """Answer the upgrade request with HTTP ``status`` (401, 503, ...)."""
        return cls(ScriptMode.REJECT, status=status)

    @classmethod
    def refuse(cls) -> Self:
        """Refuse the TCP connection (the loopback server stops listening meanwhile)."""
        return cls(ScriptMode.REFUSE)

    @classmethod
    def hang(cls) -> Self:
        """In memory only: the opening handshake never completes."""
        return cls(ScriptMode.HANG)


class ConnState(StrEnum):
    """A connection as a scripted server sees it."""

    OPENING = "opening"
    """The opening handshake has not completed (``ScriptMode.HANG``)."""
    OPEN = "open"
    """Upgraded, and nobody has started closing it."""
    CLOSING = "closing"
    """The client started closing and the close has not completed (``close_delay_ms``)."""
    CLOSED = "closed"
    """Ended; :attr:`ConnectionRecord.closed_by` says how."""


@dataclass(eq=False)
class ConnectionRecord:
    """One upgraded (or hanging) connection: what arrived, what was sent, how it ended.

    A server keeps them in :attr:`ScriptedServer.connections`, in the order they opened.
    """

    index: int
    """Its position in :attr:`ScriptedServer.connections`."""
    path: str
    """The request path (``/ws/client``)."""
    query: dict[str, str]
    """The query parameters (the first value of each)."""
    script: Script
    """The script that was current when it opened."""
    state: ConnState = ConnState.OPEN
    received: list[str | bytes] = field(default_factory=list)
    """Every frame the server read from the client, in order."""
    taken: list[str] = field(default_factory=list)
    """In-memory only: every text frame the client's transport took, whether the server read
    it (``received``) or it still waited behind a server that stopped reading."""
    sent: list[str | bytes] = field(default_factory=list)
    """Every frame the server sent to the client, in order (the hello first)."""
    closed_by: str | None = None
    """``client`` (a close frame from the client), ``server`` (a close frame from the server),
    ``drop`` (no close frame), ``abandoned`` (the client gave up during the opening handshake)
    or ``lost`` (the client went away without a close frame)."""
    close_code: int | None = None
    """The close code, when a close frame ended it (1006 for a drop)."""
    close_reason: str | None = None

    @property
    def live(self) -> bool:
        """Not closed yet (opening, open or closing)."""
        return self.state is not ConnState.CLOSED

    @property
    def client_id(self) -> str | None:
        """The ``client_id`` the client sent in its query, if any."""
        return self.query.get("client_id")

    def finish(self, by: str, code: int | None, reason: str | None) -> bool:
        """Record how the connection ended; False if it had already ended."""
        if self.state is ConnState.CLOSED:
            return False
        self.state = ConnState.CLOSED
        self.closed_by, self.close_code, self.close_reason = by, code, reason
        return True

    def received_json(self) -> list[dict[str, Any]]:
        """The text frames received that parse as JSON objects."""
        out: list[dict[str, Any]] = []
        for frame in self.received:
            if isinstance(frame, str):
                try:
                    data = json.loads(frame)
                except ValueError:
                    continue
                if isinstance(data, dict):
                    out.append(data)
        return out


@dataclass(eq=False)
class AttemptRecord:
    """One attempt the server saw (the loopback server cannot see refused ones)."""

    mode: ScriptMode
    """The mode of the script that was current."""
    path: str
    """The request path."""
    connection: ConnectionRecord | None = None
    """The connection it opened, if it was upgraded."""


def _query(raw: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(raw, keep_blank_values=True).items()}


@dataclass(frozen=True)
class _Opening:
    """What to do with a freshly upgraded connection."""

    frames: tuple[str, ...] = ()
    close: tuple[int, str] | None = None
    drop: bool = False
    late_hello_s: float | None = None


class ScriptedServer(abc.ABC):
    """What both scripted servers share: the script, the records, and the frames they write.

    Args:
        clock: the virtual clock for hello and ping timestamps and for a late hello; None
            means real time.
        script: the first script (default :meth:`Script.accept`).

    :attr:`script` is the current script, :attr:`attempts` every attempt seen and
    :attr:`connections` every connection opened, oldest first.
    """

    def __init__(self, clock: VirtualClock | None = None, script: Script | None = None) -> None:
        self.clock = clock
        self.script = script if script is not None else Script.accept()
        self.attempts: list[AttemptRecord] = []
        self.connections: list[ConnectionRecord] = []
        self._request_ids = itertools.count(1)
        self._heartbeats = itertools.count(0)

    # -- what each server implements -------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The base URL to hand to ``WebSocketManager``."""
        raise NotImplementedError

    @abc.abstractmethod
    async def set_script(self, script: Script) -> None:
        """Switch the script for new connections (and pings on open ones)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def send(self, frame: str | bytes, record: ConnectionRecord | None = None) -> None:
        """Send an arbitrary frame to the client (default: on the current connection)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def ping(self, record: ConnectionRecord | None = None) -> None:
        """Send a server heartbeat ``ping``."""
        raise NotImplementedError

    @abc.abstractmethod
    async def close(
        self, code: int = 1000, reason: str = "", record: ConnectionRecord | None = None
    ) -> None:
        """Close with a close frame carrying ``code`` and ``reason``."""
        raise NotImplementedError

    @abc.abstractmethod
    async def drop(self, record: ConnectionRecord | None = None) -> None:
        """Drop without a close frame (the client sees 1006)."""
        raise NotImplementedError

    # -- views -----------------------------------------------------------------------------

    def live(self) -> list[ConnectionRecord]:
        """Connections not closed yet (opening, open or closing)."""
        return [c for c in self.connections if c.live]

    def current(self) -> ConnectionRecord | None:
        """The newest open (upgraded, not closing) connection, or None."""
        for record in reversed(self.connections):
            if record.state is ConnState.OPEN:
                return record
        return None

    def received_json(self) -> list[dict[str, Any]]:
        """Every JSON object received, over all connections, in connection order."""
        return [message for record in self.connections for message in record.received_json()]

    # -- frames ----------------------------------------------------------------------------

    def _wall(self) -> datetime:
        return self.clock.now() if self.clock is not None else datetime.now(UTC)

    def hello_text(self, record: ConnectionRecord) -> str:
        """The hello this server sends on ``record`` (its script's interval and features)."""
        script = record.script
        requested = int(record.query.get("version", "1"))
        hello = make_hello(
            now=self._wall(),
            client_id=record.client_id or "",
            request_id=f"00000000-0000-4000-8000-{next(self._request_ids):012d}",
            heartbeat_interval_ms=script.heartbeat_interval_ms,
            version=requested if script.accepted_version is None else script.accepted_version,
        )
        return replace(hello, features=script.features).serialize()

    def ping_text(self, record: ConnectionRecord) -> str:
        """A server heartbeat ``ping`` for ``record``, numbered across the server's life."""
        return make_ping(
            self._wall(), heartbeat_count=next(self._heartbeats), client_id=record.client_id
        ).serialize()

    def _opening(self, record: ConnectionRecord) -> _Opening:
        # The scripted servers speak v1 only, as the original backend does: 4400 to version=2.
        rejected = validate_query(record.query, accept_v2=False)
        if isinstance(rejected, Reject):
            return _Opening(close=(int(rejected.code), rejected.reason))
        script = record.script
        match script.mode:
            case ScriptMode.ACCEPT | ScriptMode.WRONG_VERSION:
                return _Opening(frames=(self.hello_text(record),))
            case ScriptMode.LATE_HELLO:
                return _Opening(late_hello_s=script.delay_ms / 1000.0)
            case ScriptMode.BAD_HELLO:
                return _Opening(frames=(script.bad_text,))
            case ScriptMode.CLOSE:
                return _Opening(close=(script.code, script.reason))
            case ScriptMode.DROP:
                return _Opening(drop=True)
        return _Opening()

    def _reply(self, record: ConnectionRecord, frame: str | bytes) -> str | None:
        """The server's answer to a client frame, if any (pong; echo when scripted)."""
        if not self.script.responsive or not isinstance(frame, str):
            return None
        try:
            data = json.loads(frame)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        kind = data.get("type")
        if kind == "ping":
            return make_pong(self._wall(), record.client_id).serialize()
        if self.script.echo and kind not in {"pong", "status"}:
            return encode(
                {
                    "type": "echo",
                    "original_message": data,
                    "timestamp": format_timestamp(self._wall()),
                    "client_id": record.client_id,
                }
            )
        return None


# -------------------------------------------------------------------------------------------
# In memory
# -------------------------------------------------------------------------------------------


class MemoryTransport:
    """The client's end of an in-memory connection: a
    :class:`~steadysocket.runtime.transport.Transport` that :meth:`InMemoryServer.open` returns.

    The client uses ``recv``, ``send``, ``close`` and ``abort``. A test reaches it through
    :meth:`InMemoryServer.transport` to make the server side misbehave in ways a script does
    not cover: :meth:`stop_reading` (flow control: the client's sends block),
    :meth:`resume_reading`, and :attr:`answers_close` (False: a close handshake hangs).
    """

    def __init__(self, server: InMemoryServer, record: ConnectionRecord) -> None:
        self.server = server
        """The server this connection belongs to."""
        self.record = record
        """What the server records of this connection."""
        self._inbox: deque[str | bytes] = deque()
        self._ended: CloseFailure | ErrorFailure | None = None
        self._wakeup = asyncio.Event()
        self._late: ClockEntry | asyncio.TimerHandle | None = None
        self.reading = True
        """False: the server stopped reading, so a send blocks until it reads again."""
        self.answers_close = True
        """False: the server never answers a close frame (only an abort ends the link)."""
        self._unread: deque[str] = deque()
        self._flow = asyncio.Event()
        self._gone = asyncio.Event()

    # -- Transport -------------------------------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next frame from the server; raises ``TransportClosed`` once it has ended."""
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._ended is not None:
                raise TransportClosed(self._ended)
            self._wakeup.clear()
            await self._wakeup.wait()

    async def send(self, text: str) -> None:
        """Hand one text frame to the server (it reads it at once, unless it stopped reading);
        raises ``TransportClosed`` once the connection has ended."""
        if self._ended is not None:
            raise TransportClosed(self._ended, written=False)
        # Taken before the first suspension, as the Transport contract asks.
        self.record.taken.append(text)
        if not self.reading:
            self._unread.append(text)
            self._flow.clear()
            await self._flow.wait()
            if self._ended is not None:
                raise TransportClosed(self._ended)
            return
        self._read(text)

    def _read(self, text: str) -> None:
        self.record.received.append(text)
        reply = self.server._reply(self.record, text)
        if reply is not None:
            self.push(reply)

    def stop_reading(self) -> None:
        """The server stops reading: the client's next send blocks (flow control)."""
        self.reading = False

    def resume_reading(self) -> None:
        """The server reads what waited, in order, and every blocked send completes."""
        self.reading = True
        while self._unread and self._ended is None:
            self._read(self._unread.popleft())
        self._flow.set()

    async def close(self, code: int, reason: str) -> None:
        """The client's close handshake: completes at once, after the script's
        ``close_delay_ms`` (virtual), or never while :attr:`answers_close` is False."""
        if self._ended is not None or self.record.state is ConnState.CLOSING:
            return
        if not self.answers_close:
            self.record.state = ConnState.CLOSING
            await self._gone.wait()
            return
        delay = self.record.script.close_delay_ms
        if delay > 0 and self.server.clock is not None:
            self.record.state = ConnState.CLOSING
            await self.server.clock.sleep(delay / 1000.0)
            if self._ended is not None:  # dropped by the server meanwhile
                return
        self._end(CloseFailure(code, reason), "client", code, reason)

    def abort(self) -> None:
        """The client drops the connection without a close handshake (``lost``)."""
        self._end(
            ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "connection aborted (in-memory)"),
            "lost",
            1006,
            "",
        )

    # -- the server's side -----------------------------------------------------------------

    def push(self, frame: str | bytes) -> bool:
        """Deliver a frame to the client; False when the connection has ended."""
        if self._ended is not None:
            return False
        self._inbox.append(frame)
        self.record.sent.append(frame)
        self._wakeup.set()
        return True

    def _end(
        self, failure: CloseFailure | ErrorFailure, by: str, code: int | None, reason: str | None
    ) -> None:
        if self._ended is not None:
            return
        self._ended = failure
        self._flow.set()
        self._gone.set()
        self.record.finish(by, code, reason)
        if self._late is not None:
            self._late.cancel()
            self._late = None
        self._wakeup.set()

    def server_close(self, code: int, reason: str) -> None:
        """The server closes with a close frame carrying ``code`` and ``reason``."""
        self._end(CloseFailure(code, reason), "server", code, reason)

    def server_drop(self) -> None:
        """The server drops the connection without a close frame (the client sees 1006)."""
        self._end(
            ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "connection dropped (in-memory)"),
            "drop",
            1006,
            "",
        )


class InMemoryServer(ScriptedServer):
    """A scripted server in process: ``WebSocketManager(opener=server.open, ...)``.

    Everything happens through queues on the running loop, with no socket: every exchange
    completes in a few event-loop iterations (:meth:`VirtualClock.settle`). A late hello is a
    callback on the virtual clock (owner ``LATE_HELLO_OWNER``), or on real time without one.

    Args:
        clock: the virtual clock (timestamps, late hellos, ``close_delay_ms``); None means
            real time.
        script: the first script (default :meth:`Script.accept`).
    """

    base_url = "ws://fake.invalid"
    """What :attr:`url` returns: any URL works, only its path is checked (``/ws/client``)."""

    def __init__(self, clock: VirtualClock | None = None, script: Script | None = None) -> None:
        super().__init__(clock, script)
        self._links: dict[int, MemoryTransport] = {}

    @property
    def url(self) -> str:
        """The base URL to hand to ``WebSocketManager`` (never dialled: ``open`` is)."""
        return self.base_url

    async def set_script(self, script: Script) -> None:
        """Switch the script for new connections (and pings on open ones)."""
        self.script = script

    async def open(self, url: str) -> MemoryTransport:
        """The ``Opener``: opens a connection as the current script says.

        Raises:
            OpenFailed: the script refuses or rejects it, or the path is not ``/ws/client``
                (HTTP 404), with the failure the real opener would report.
        """
        script = self.script
        parts = urlsplit(url)
        attempt = AttemptRecord(script.mode, parts.path)
        self.attempts.append(attempt)
        if script.mode is ScriptMode.REFUSE:
            raise OpenFailed(
                ErrorFailure(ErrorKind.REFUSED, "[Errno 111] Connect call failed (in-memory)")
            )
        if script.mode is ScriptMode.REJECT:
            raise OpenFailed(HttpFailure(script.status))
        if not parts.path.endswith("/ws/client"):
            raise OpenFailed(HttpFailure(404))
        record = ConnectionRecord(len(self.connections), parts.path, _query(parts.query), script)
        attempt.connection = record
        self.connections.append(record)
        if script.mode is ScriptMode.HANG:
            record.state = ConnState.OPENING
            try:
                await asyncio.get_running_loop().create_future()
            finally:
                record.finish("abandoned", None, None)
        transport = MemoryTransport(self, record)
        self._links[record.index] = transport
        opening = self._opening(record)
        for frame in opening.frames:
            transport.push(frame)
        if opening.close is not None:
            transport.server_close(*opening.close)
        elif opening.drop:
            transport.server_drop()
        elif opening.late_hello_s is not None:
            if self.clock is not None:
                transport._late = self.clock.call_later(
                    opening.late_hello_s, lambda: self._late_hello(transport), LATE_HELLO_OWNER
                )
            else:
                transport._late = asyncio.get_running_loop().call_later(
                    opening.late_hello_s, self._late_hello, transport
                )
        return transport

    def _late_hello(self, transport: MemoryTransport) -> None:
        transport._late = None
        transport.push(self.hello_text(transport.record))

    def transport(self, record: ConnectionRecord | None = None) -> MemoryTransport:
        """The client's transport of ``record`` (default: the :meth:`current` connection), to
        stop the server reading or answering a close.

        Raises:
            LookupError: no record given and no connection is open.
        """
        record = record if record is not None else self.current()
        if record is None:
            raise LookupError("no open connection")
        return self._links[record.index]

    # -- actions on open connections (async to match the loopback server) ------------------

    async def send(self, frame: str | bytes, record: ConnectionRecord | None = None) -> None:
        """Send an arbitrary frame to the client."""
        self.transport(record).push(frame)

    async def ping(self, record: ConnectionRecord | None = None) -> None:
        """Send a server heartbeat ``ping``."""
        link = self.transport(record)
        link.push(self.ping_text(link.record))

    async def close(
        self, code: int = 1000, reason: str = "", record: ConnectionRecord | None = None
    ) -> None:
        """Close with a close frame carrying ``code`` and ``reason``."""
        self.transport(record).server_close(code, reason)

    async def drop(self, record: ConnectionRecord | None = None) -> None:
        """Drop without a close frame (the client sees 1006)."""
        link = self.transport(record) if record is not None else None
        if link is None:
            for candidate in reversed(self.connections):
                if candidate.state in {ConnState.OPEN, ConnState.CLOSING}:
                    link = self._links[candidate.index]
                    break
        if link is None:
            raise LookupError("no connection to drop")
        link.server_drop()


# -------------------------------------------------------------------------------------------
# Loopback: a real websockets server on 127.0.0.1
# -------------------------------------------------------------------------------------------


class LoopbackServer(ScriptedServer):
    """The same scripts on a real ``websockets`` server on 127.0.0.1, port 0.

    ``async with LoopbackServer() as server:`` then dial ``server.url`` with the manager's
    real opener. ``ScriptMode.REFUSE`` stops listening (existing connections stay) and the next
    other script listens again on the same port. ``ScriptMode.HANG`` is not supported, and
    ``close_delay_ms`` has no effect. With a ``clock`` the late hello waits on it; without one,
    on real time.

    Args:
        clock: a virtual clock for timestamps and the late hello; None means real time.
        script: the first script (default :meth:`Script.accept`).
        host: the address to listen on.
    """

    def __init__(
        self,
        clock: VirtualClock | None = None,
        script: Script | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(clock, script)
        self.host = host
        self.port = 0
        self._servers: list[Server] = []
        self._listening: Server | None = None
        self._links: dict[int, ServerConnection] = {}
        self._promised: dict[int, Script] = {}

    @property
    def url(self) -> str:
        """``ws://host:port``, the base URL to dial (the port is known once started)."""
        return f"ws://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._listening is not None:
            return
        server = await serve(
            self._handler,
            self.host,
            self.port,
            process_request=self._process_request,
            ping_interval=None,
            reuse_address=True,
        )
        self.port = server.sockets[0].getsockname()[1]
        self._servers.append(server)
        self._listening = server

    def _stop_listening(self) -> None:
        if self._listening is not None:
            # Only the listening socket: open connections carry on, as behind a real
            # restart of the accept loop.
            self._listening.server.close()
            self._listening = None

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        self._stop_listening()
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def set_script(self, script: Script) -> None:
        """Switch the script for new connections (and pings on open ones); ``REFUSE`` stops
        listening and any other script listens again.

        Raises:
            ValueError: ``ScriptMode.HANG``, which only the in-memory server can do.
        """
        if script.mode is ScriptMode.HANG:
            raise ValueError("the loopback server cannot hang an opening handshake")
        self.script = script
        if script.mode is ScriptMode.REFUSE:
            self._stop_listening()
        else:
            await self.start()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        script = self.script
        self.attempts.append(AttemptRecord(script.mode, urlsplit(request.path).path))
        self._promised[id(connection)] = script
        if script.mode is ScriptMode.REJECT:
            return connection.respond(script.status, "Rejected by the test script\n")
        if not urlsplit(request.path).path.endswith("/ws/client"):
            return connection.respond(404, "Not Found\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        script = self._promised.pop(id(ws), self.script)
        parts = urlsplit(ws.request.path if ws.request is not None else "")
        record = ConnectionRecord(len(self.connections), parts.path, _query(parts.query), script)
        for attempt in reversed(self.attempts):
            if attempt.connection is None and attempt.mode is script.mode:
                attempt.connection = record
                break
        self.connections.append(record)
        self._links[record.index] = ws
        late: asyncio.Task[None] | None = None
        try:
            opening = self._opening(record)
            for text in opening.frames:
                record.sent.append(text)
                await ws.send(text)
            if opening.close is not None:
                record.finish("server", *opening.close)
                await ws.close(*opening.close)
                return
            if opening.drop:
                record.finish("drop", 1006, "")
                ws.transport.abort()
                return
            if opening.late_hello_s is not None:
                late = asyncio.create_task(
                    self._late_hello(ws, record, opening.late_hello_s), name=LATE_HELLO_OWNER
                )
            async for frame in ws:
                record.received.append(frame)
                reply = self._reply(record, frame)
                if reply is not None:
                    record.sent.append(reply)
                    await ws.send(reply)
        except ConnectionClosed:
            pass
        finally:
            if late is not None:
                late.cancel()
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                record.finish("client", rcvd.code, rcvd.reason)
            else:
                record.finish("lost", None, None)

    async def _late_hello(
        self, ws: ServerConnection, record: ConnectionRecord, delay: float
    ) -> None:
        if self.clock is not None:
            await self.clock.sleep(delay)
        else:
            await asyncio.sleep(delay)
        text = self.hello_text(record)
        record.sent.append(text)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    def _ws(self, record: ConnectionRecord | None) -> tuple[ConnectionRecord, ServerConnection]:
        record = record if record is not None else self.current()
        if record is None:
            raise LookupError("no open connection")
        return record, self._links[record.index]

    async def send(self, frame: str | bytes, record: ConnectionRecord | None = None) -> None:
        """Send an arbitrary frame to the client."""
        record, ws = self._ws(record)
        record.sent.append(frame)
        await ws.send(frame)

    async def ping(self, record: ConnectionRecord | None = None) -> None:
        """Send a server heartbeat ``ping``."""
        record, _ = self._ws(record)
        await self.send(self.ping_text(record), record)

    async def close(
        self, code: int = 1000, reason: str = "", record: ConnectionRecord | None = None
    ) -> None:
        """Close with a close frame carrying ``code`` and ``reason``."""
        record, ws = self._ws(record)
        record.finish("server", code, reason)
        await ws.close(code, reason)

    async def drop(self, record: ConnectionRecord | None = None) -> None:
        """Drop without a close frame (the client sees 1006)."""
        record, ws = self._ws(record)
        record.finish("drop", 1006, "")
        ws.transport.abort()
