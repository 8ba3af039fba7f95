"""Test fakes for the client runtime: a virtual clock and two scripted fake servers.

How to use them: ``from tests.runtime.fakes import InMemoryServer, Script, VirtualClock``.
pytest runs with ``--import-mode=importlib``; since pytest 8.1 that mode imports the test
directories as the namespace packages ``tests`` and ``tests.runtime`` rooted at the repository
(there is no ``__init__.py``), so this import works from any working directory, and mypy
(``--explicit-package-bases``, run from the repository root) resolves the same name. No conftest
and no ``sys.path`` change are involved.

- :class:`VirtualClock` is the ``clock`` *and* the ``sleep`` handed to ``WebSocketManager``.
  ``sleep`` parks a future in a heap; nothing wakes until a test calls :meth:`~VirtualClock.advance`
  (or :meth:`~VirtualClock.fire`), which wakes the due sleepers one at a time, in
  ``(due, registration order)`` order, and lets the event loop settle after each. It runs on one
  real event loop and is deterministic: a 76-second backoff schedule takes milliseconds.
- :class:`InMemoryServer` is an ``Opener``: ``WebSocketManager(opener=server.open, ...)``. Its
  transports are in-process queues, so no socket is involved and every exchange completes in a
  few event-loop iterations, which :meth:`VirtualClock.settle` waits for.
- :class:`LoopbackServer` runs the same :class:`Script` on a real ``websockets`` server bound to
  127.0.0.1 (port 0), for the manager's real default opener.

Both servers follow the current :class:`Script` for each new connection, answer client pings
with pongs unless the script is silent, and record every attempt, every frame received per
connection, and how each connection ended (:class:`ConnectionRecord`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
from collections import deque
from collections.abc import Callable, Sized
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
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
from steadysocket.runtime.manager import ServerError, WSError
from steadysocket.runtime.transport import OpenFailed, TransportClosed

__all__ = [
    "LATE_HELLO_OWNER",
    "AttemptRecord",
    "ConnState",
    "ConnectionRecord",
    "InMemoryServer",
    "LoopbackServer",
    "MemoryTransport",
    "Mode",
    "Script",
    "ScriptedServer",
    "VirtualClock",
]

LATE_HELLO_OWNER = "fake-server-late-hello"
"""The owner name of a late hello parked on the virtual clock (both servers)."""

# -------------------------------------------------------------------------------------------
# The virtual clock
# -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ClockEntry:
    """Something parked on the virtual clock: a sleeping task, or a callback."""

    due: float
    seq: int
    owner: str
    """The sleeping task's name (``steadysocket-timer-retry``, ...) or the callback's label."""
    delay: float
    future: asyncio.Future[None] | None = None
    callback: Callable[[], None] | None = None
    cancelled: bool = False

    @property
    def live(self) -> bool:
        """Still waiting: neither cancelled nor already woken."""
        if self.cancelled:
            return False
        if self.future is not None:
            return not self.future.done()
        return self.callback is not None

    def cancel(self) -> None:
        """Forget a callback (a sleeping task is cancelled through its task)."""
        self.cancelled = True
        self.callback = None


@dataclass(frozen=True, slots=True)
class SleepRecord:
    """One call of :meth:`VirtualClock.sleep` or :meth:`VirtualClock.call_later`."""

    owner: str
    delay: float
    start: float
    due: float


class VirtualClock:
    """Monotonic seconds and aware UTC wall time that move only when a test says so.

    Pass it as both ``clock=`` and ``sleep=clock.sleep`` to ``WebSocketManager``.
    """

    def __init__(
        self,
        start: float = 1_000.0,
        wall_start: datetime = datetime(2025, 1, 1, tzinfo=UTC),
    ) -> None:
        self._start = start
        self._now = start
        self._wall_start = wall_start
        self._heap: list[tuple[float, int, ClockEntry]] = []
        self._seq = itertools.count(1)
        self.history: list[SleepRecord] = []
        """Every sleep and callback ever parked, in order, with the task that parked it."""

    # -- the Clock protocol ----------------------------------------------------------------

    def monotonic(self) -> float:
        """Virtual seconds, never going backwards."""
        return self._now

    def now(self) -> datetime:
        """Virtual wall time, timezone-aware UTC."""
        return self._wall_start + timedelta(seconds=self._now - self._start)

    # -- parking ---------------------------------------------------------------------------

    async def sleep(self, delay: float) -> None:
        """Park the calling task until the clock reaches ``now + delay``."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.current_task()
        owner = task.get_name() if task is not None else "?"
        self._park(ClockEntry(self._now + max(delay, 0.0), next(self._seq), owner, delay, future))
        await future

    def call_later(self, delay: float, callback: Callable[[], None], owner: str) -> ClockEntry:
        """Run ``callback()`` when the clock reaches ``now + delay``; ``.cancel()`` forgets it."""
        entry = ClockEntry(
            self._now + max(delay, 0.0), next(self._seq), owner, delay, callback=callback
        )
        self._park(entry)
        return entry

    def _park(self, entry: ClockEntry) -> None:
        heapq.heappush(self._heap, (entry.due, entry.seq, entry))
        self.history.append(SleepRecord(entry.owner, entry.delay, self._now, entry.due))

    def pending(self) -> list[ClockEntry]:
        """The live entries, earliest first."""
        return [entry for _, _, entry in sorted(self._heap) if entry.live]

    def peek(self) -> ClockEntry | None:
        """The live entry that wakes next, or None."""
        while self._heap and not self._heap[0][2].live:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def fire(self, entry: ClockEntry) -> None:
        """Move the clock to ``entry.due`` and wake it (without letting the loop run)."""
        if entry is not self.peek():
            raise RuntimeError(f"{entry.owner} is not the next entry due")
        heapq.heappop(self._heap)
        self._now = max(self._now, entry.due)
        if entry.future is not None:
            entry.future.set_result(None)
        elif entry.callback is not None:
            callback, entry.callback = entry.callback, None
            callback()

    def jump_to(self, when: float) -> None:
        """Move the clock forward to ``when`` without waking anything (drivers that fire
        entries themselves use this once nothing is due before ``when``)."""
        nxt = self.peek()
        if nxt is not None and nxt.due < when:
            raise RuntimeError(f"{nxt.owner} is due at {nxt.due} before {when}")
        self._now = max(self._now, when)

    # -- driving the loop ------------------------------------------------------------------

    @staticmethod
    async def settle(max_rounds: int = 100_000) -> None:
        """Yield to the event loop until it has nothing ready to run.

        It reads the loop's ready queue (``_ready``, a CPython asyncio detail): when this task
        resumes with nothing else ready, every task woken so far has run up to its next real
        wait. In-memory transports never wait on I/O, so that is quiescence.
        """
        loop = asyncio.get_running_loop()
        ready: Sized = loop._ready  # type: ignore[attr-defined]
        for _ in range(max_rounds):
            await asyncio.sleep(0)
            if not ready:
                return
        raise RuntimeError("the event loop never went idle")

    async def run_until_idle(self) -> None:
        """Settle, then wake everything already due, until nothing is ready or due."""
        await self.settle()
        while (entry := self.peek()) is not None and entry.due <= self._now:
            self.fire(entry)
            await self.settle()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking each due entry in order and settling after
        each; entries due exactly at the end wake too."""
        target = self._now + seconds
        await self.run_until_idle()
        while (entry := self.peek()) is not None and entry.due <= target:
            self.fire(entry)
            await self.settle()
        self._now = max(self._now, target)
        await self.run_until_idle()

    async def advance_to(self, when: float) -> None:
        """Like :meth:`advance`, to an absolute monotonic time."""
        await self.advance(max(when - self._now, 0.0))


# -------------------------------------------------------------------------------------------
# Scripts and records, shared by both servers
# -------------------------------------------------------------------------------------------


class Mode(StrEnum):
    """What the server does with a new connection."""

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


SILENT_MODES = frozenset({Mode.SILENT, Mode.HANG})


@dataclass(frozen=True)
class Script:
    """How the server treats new connections (and whether open ones still answer pings)."""

    mode: Mode = Mode.ACCEPT
    heartbeat_interval_ms: int = 25_000
    features: tuple[str, ...] = FEATURES
    accepted_version: int | None = None
    """The version the hello accepts; None means the one the client asked for."""
    status: int = 503
    code: int = 1000
    reason: str = ""
    delay_ms: float = 0.0
    bad_text: str = '{"type": "hello", "accepted_version": 1}'
    echo: bool = False
    """Echo every data message (``{"type": "echo", "original_message": ...}``)."""
    close_delay_ms: float = 0.0
    """In memory only: a client's close takes this long (virtual) to complete."""

    @property
    def responsive(self) -> bool:
        """Whether the server answers pings (and echoes) on open connections."""
        return self.mode not in SILENT_MODES

    @classmethod
    def accept(
        cls,
        heartbeat_interval_ms: int = 25_000,
        *,
        features: tuple[str, ...] = FEATURES,
        echo: bool = False,
        close_delay_ms: float = 0.0,
    ) -> Script:
        return cls(
            Mode.ACCEPT,
            heartbeat_interval_ms,
            features,
            echo=echo,
            close_delay_ms=close_delay_ms,
        )

    @classmethod
    def late_hello(cls, delay_ms: float, heartbeat_interval_ms: int = 25_000) -> Script:
        return cls(Mode.LATE_HELLO, heartbeat_interval_ms, delay_ms=delay_ms)

    @classmethod
    def silent(cls) -> Script:
        return cls(Mode.SILENT)

    @classmethod
    def bad_hello(cls, text: str = '{"type": "hello", "accepted_version": 1}') -> Script:
        return cls(Mode.BAD_HELLO, bad_text=text)

    @classmethod
    def wrong_version(cls, version: int = 3, heartbeat_interval_ms: int = 25_000) -> Script:
        return cls(Mode.WRONG_VERSION, heartbeat_interval_ms, accepted_version=version)

    @classmethod
    def close(cls, code: int, reason: str = "") -> Script:
        return cls(Mode.CLOSE, code=code, reason=reason)

    @classmethod
    def drop(cls) -> Script:
        return cls(Mode.DROP)

    @classmethod
    def reject(cls, status: int) -> Script:
        return cls(Mode.REJECT, status=status)

    @classmethod
    def refuse(cls) -> Script:
        return cls(Mode.REFUSE)

    @classmethod
    def hang(cls) -> Script:
        return cls(Mode.HANG)


class ConnState(StrEnum):
    """A connection as the server sees it."""

    OPENING = "opening"
    """The opening handshake has not completed (``Mode.HANG``)."""
    OPEN = "open"
    CLOSING = "closing"
    """The client started closing and the close has not completed (``close_delay_ms``)."""
    CLOSED = "closed"


@dataclass(eq=False)
class ConnectionRecord:
    """One upgraded (or hanging) connection: what arrived, what was sent, how it ended."""

    index: int
    path: str
    query: dict[str, str]
    script: Script
    state: ConnState = ConnState.OPEN
    received: list[str | bytes] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    """In-memory only: every text frame the client's transport took, whether the server read
    it (``received``) or it still waited behind a server that stopped reading."""
    sent: list[str | bytes] = field(default_factory=list)
    closed_by: str | None = None
    """``client`` (a close frame from the client), ``server`` (a close frame from the server),
    ``drop`` (no close frame), ``abandoned`` (the client gave up during the opening handshake)
    or ``lost`` (the client went away without a close frame)."""
    close_code: int | None = None
    close_reason: str | None = None

    @property
    def live(self) -> bool:
        """Not closed yet (opening, open or closing)."""
        return self.state is not ConnState.CLOSED

    @property
    def client_id(self) -> str | None:
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

    mode: Mode
    path: str
    connection: ConnectionRecord | None = None


def _query(raw: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(raw, keep_blank_values=True).items()}


@dataclass(frozen=True)
class _Opening:
    """What to do with a freshly upgraded connection."""

    frames: tuple[str, ...] = ()
    close: tuple[int, str] | None = None
    drop: bool = False
    late_hello_s: float | None = None


class ScriptedServer:
    """What both fake servers share: the script, the records, and the frames they write."""

    def __init__(self, clock: VirtualClock | None = None, script: Script | None = None) -> None:
        self.clock = clock
        self.script = script if script is not None else Script.accept()
        self.attempts: list[AttemptRecord] = []
        self.connections: list[ConnectionRecord] = []
        self._request_ids = itertools.count(1)
        self._heartbeats = itertools.count(0)

    # -- what each server implements -------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to hand to ``WebSocketManager``."""
        raise NotImplementedError

    async def set_script(self, script: Script) -> None:
        """Switch the script for new connections (and pings on open ones)."""
        raise NotImplementedError

    async def send(self, frame: str | bytes, record: ConnectionRecord | None = None) -> None:
        """Send an arbitrary frame to the client (default: on the current connection)."""
        raise NotImplementedError

    async def ping(self, record: ConnectionRecord | None = None) -> None:
        """Send a server heartbeat ``ping``."""
        raise NotImplementedError

    async def close(
        self, code: int = 1000, reason: str = "", record: ConnectionRecord | None = None
    ) -> None:
        """Close with a close frame carrying ``code`` and ``reason``."""
        raise NotImplementedError

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
        return make_ping(
            self._wall(), heartbeat_count=next(self._heartbeats), client_id=record.client_id
        ).serialize()

    def _opening(self, record: ConnectionRecord) -> _Opening:
        # The scripted servers speak v1 only, as the seed's backend does: 4400 to version=2.
        rejected = validate_query(record.query, accept_v2=False)
        if isinstance(rejected, Reject):
            return _Opening(close=(int(rejected.code), rejected.reason))
        script = record.script
        match script.mode:
            case Mode.ACCEPT | Mode.WRONG_VERSION:
                return _Opening(frames=(self.hello_text(record),))
            case Mode.LATE_HELLO:
                return _Opening(late_hello_s=script.delay_ms / 1000.0)
            case Mode.BAD_HELLO:
                return _Opening(frames=(script.bad_text,))
            case Mode.CLOSE:
                return _Opening(close=(script.code, script.reason))
            case Mode.DROP:
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
    """The client's end of an in-memory connection (a ``Transport``)."""

    def __init__(self, server: InMemoryServer, record: ConnectionRecord) -> None:
        self.server = server
        self.record = record
        self._inbox: deque[str | bytes] = deque()
        self._ended: CloseFailure | ErrorFailure | None = None
        self._wakeup = asyncio.Event()
        self._late: ClockEntry | None = None
        self.reading = True
        """False: the server stopped reading, so a send blocks until it reads again."""
        self.answers_close = True
        """False: the server never answers a close frame (only an abort ends the link)."""
        self._unread: deque[str] = deque()
        self._flow = asyncio.Event()
        self._gone = asyncio.Event()

    # -- Transport -------------------------------------------------------------------------

    async def recv(self) -> str | bytes:
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if self._ended is not None:
                raise TransportClosed(self._ended)
            self._wakeup.clear()
            await self._wakeup.wait()

    async def send(self, text: str) -> None:
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
        self._end(CloseFailure(code, reason), "server", code, reason)

    def server_drop(self) -> None:
        self._end(
            ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "connection dropped (in-memory)"),
            "drop",
            1006,
            "",
        )


class InMemoryServer(ScriptedServer):
    """A scripted server in process: ``WebSocketManager(opener=server.open, ...)``.

    Everything happens through queues on the running loop, with no socket. A late hello is a
    callback on the virtual clock (``LATE_HELLO_OWNER``), so it needs ``clock``.
    """

    base_url = "ws://fake.invalid"

    def __init__(self, clock: VirtualClock | None = None, script: Script | None = None) -> None:
        super().__init__(clock, script)
        self._links: dict[int, MemoryTransport] = {}

    @property
    def url(self) -> str:
        return self.base_url

    async def set_script(self, script: Script) -> None:
        """Switch the script for new connections (and pings on open ones)."""
        self.script = script

    async def open(self, url: str) -> MemoryTransport:
        """The ``Opener``: raises ``OpenFailed`` like the real one does."""
        script = self.script
        parts = urlsplit(url)
        attempt = AttemptRecord(script.mode, parts.path)
        self.attempts.append(attempt)
        if script.mode is Mode.REFUSE:
            raise OpenFailed(
                ErrorFailure(ErrorKind.REFUSED, "[Errno 111] Connect call failed (in-memory)")
            )
        if script.mode is Mode.REJECT:
            raise OpenFailed(HttpFailure(script.status))
        if not parts.path.endswith("/ws/client"):
            raise OpenFailed(HttpFailure(404))
        record = ConnectionRecord(len(self.connections), parts.path, _query(parts.query), script)
        attempt.connection = record
        self.connections.append(record)
        if script.mode is Mode.HANG:
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
            assert self.clock is not None, "a late hello needs the virtual clock"
            transport._late = self.clock.call_later(
                opening.late_hello_s,
                lambda: self._late_hello(transport),
                LATE_HELLO_OWNER,
            )
        return transport

    def _late_hello(self, transport: MemoryTransport) -> None:
        transport._late = None
        transport.push(self.hello_text(transport.record))

    def _link(self, record: ConnectionRecord | None) -> MemoryTransport:
        record = record if record is not None else self.current()
        if record is None:
            raise LookupError("no open connection")
        return self._links[record.index]

    # -- actions on open connections (async to match the loopback server) ------------------

    async def send(self, frame: str | bytes, record: ConnectionRecord | None = None) -> None:
        """Send an arbitrary frame to the client."""
        self._link(record).push(frame)

    async def ping(self, record: ConnectionRecord | None = None) -> None:
        """Send a server heartbeat ``ping``."""
        link = self._link(record)
        link.push(self.ping_text(link.record))

    async def close(
        self, code: int = 1000, reason: str = "", record: ConnectionRecord | None = None
    ) -> None:
        """Close with a close frame carrying ``code`` and ``reason``."""
        self._link(record).server_close(code, reason)

    async def drop(self, record: ConnectionRecord | None = None) -> None:
        """Drop without a close frame (the client sees 1006)."""
        link = self._link(record) if record is not None else None
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

    ``async with LoopbackServer(clock) as server:`` then dial ``server.url``. ``Mode.REFUSE``
    stops listening (existing connections stay) and the next other script listens again on the
    same port. ``Mode.HANG`` is not supported. With a ``clock`` the late hello waits on it;
    without one, on real time.
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
        return f"ws://{self.host}:{self.port}"

    async def __aenter__(self) -> LoopbackServer:
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
        if script.mode is Mode.HANG:
            raise ValueError("the loopback server cannot hang an opening handshake")
        self.script = script
        if script.mode is Mode.REFUSE:
            self._stop_listening()
        else:
            await self.start()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        script = self.script
        self.attempts.append(AttemptRecord(script.mode, urlsplit(request.path).path))
        self._promised[id(connection)] = script
        if script.mode is Mode.REJECT:
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
        record, ws = self._ws(record)
        record.sent.append(frame)
        await ws.send(frame)

    async def ping(self, record: ConnectionRecord | None = None) -> None:
        record, _ = self._ws(record)
        await self.send(self.ping_text(record), record)

    async def close(
        self, code: int = 1000, reason: str = "", record: ConnectionRecord | None = None
    ) -> None:
        record, ws = self._ws(record)
        record.finish("server", code, reason)
        await ws.close(code, reason)

    async def drop(self, record: ConnectionRecord | None = None) -> None:
        record, ws = self._ws(record)
        record.finish("drop", 1006, "")
        ws.transport.abort()


def failures_into(target: list[WSError]) -> Callable[[WSError | ServerError], None]:
    """An ``on_error`` listener that keeps the connection failures (``WSError``).

    The fake servers never send ``error`` messages, so a ``ServerError`` here would be a bug in
    the test set-up: it is kept apart in ``unexpected_server_errors`` for the test to check.
    """

    def collect(error: WSError | ServerError) -> None:
        if isinstance(error, WSError):
            target.append(error)
        else:
            unexpected_server_errors.append(error)

    return collect


unexpected_server_errors: list[ServerError] = []
