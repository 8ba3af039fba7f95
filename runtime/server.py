"""The steadysocket server: a pump around the model's ServerSession, served by websockets.

Every protocol decision (routes, query checks, hello, ping schedule, dead-client rule, replies,
the outbox bound, how a connection's end is reported) is made by
:mod:`steadysocket.model.server_session`. This module carries out its actions over a
connection, runs the application's hooks, and owns the tasks. It has two layers:

- :class:`Endpoints`: the application-facing half (handlers, hooks, connected clients,
  ``send_to``/``broadcast``, bounded shutdown) and the per-connection pump, written against
  :class:`Link`, a small protocol any WebSocket transport can implement. The ASGI adapter
  subclasses it too.
- :class:`SteadyServer`: ``Endpoints`` on websockets' asyncio server, with routing, HTTP 404
  and 426, the open timeout, the size limit and graceful, bounded shutdown.

Tasks: websockets creates one handler task per connection. In it, an :class:`asyncio.TaskGroup`
runs a reader (every frame is read as it arrives) and, once needed, a writer (the connection's
outbox and the close frame), while the handler task itself runs ``on_connect`` and then the
message handlers in order. A push (or a ping) never waits: it is written at once when the
outbox is empty and the transport below its write-buffer limit, else queued into the bounded
outbox, and the writer is started the first time that happens. The heartbeat is one
``loop.call_at`` handle per connection, and the garbage-collector policy one ``call_later``
handle per server. Nothing else is started, so after :meth:`SteadyServer.close` nothing is
left running.

Endpoints:

- ``/ws/client?client_id=…&version=1&role=frontend``: the upgrade is always accepted first, so a
  refusal reaches any client as a close frame (4400, 4401, 1008, 4500);
- ``/ws/{client_id}``: the legacy plain-text echo (``Echo: <text>``), no hello;
- a plain HTTP request for either: HTTP 426 ``Upgrade Required``;
- anything else: HTTP 404.

Keepalive decision: websockets' protocol-level keepalive (Ping/Pong control frames) is **off**
on ``/ws/client``. The JSON ``ping`` heartbeat of the seed is the one liveness rule there, with
one documented outcome (1011 ``heartbeat timeout``); a second mechanism would race it with a
different reason and cost a task per connection. The legacy echo has no heartbeat of its own,
so it gets websockets' keepalive (a Ping every heartbeat interval, closed with 1011 if no Pong
within the connection timeout), the only way to notice a dead legacy peer.

Admission and limits (all off unless configured, see ``ServerConfig``): before the upgrade,
the model's ``admit()`` answers a forbidden ``Origin`` with HTTP 403 and a server at
``max_connections`` with HTTP 503; after it, the session closes a client that sends faster
than its rate limit with 4429 ``Rate limit exceeded`` (messages and protocol Pings count, as
they arrive). ``ssl=`` serves ``wss://``.

Slow readers: a push goes to the connection's outbox, bounded by ``max_outbox_bytes``; one that
does not fit is refused (``send()`` returns False). Each frame's write is bounded by the
connection timeout and a close by the close timeout; past either the connection is aborted, so
a client that stopped reading is dropped (1006) and its memory freed.

Protocol v2 (docs/protocol.md, "Protocol v2"; the rules are ``model/delivery.py``'s): a client
asking ``version=2`` gets a session from the server's ``SessionStore`` (one per server object,
its ``epoch`` and every ``session_id`` drawn with :func:`secrets.token_urlsafe`, 128 bits).
Right after the hello the server writes the resume's replay. Every application message to a
v2 client (``send``, ``echo``, ``send_to``, ``broadcast``, a request's reply) is numbered with
``offset`` and kept in the session's history until the client acks it; control frames (hello,
ping, pong, status, error, ack) are not. Every message from it carries ``id``: its handler runs
once per id, in order, and the cumulative ``{"type":"ack","id":N}`` is written after the
handler returned (batched: ``ack_every`` messages, or ``ack_interval_ms`` after the first, one
``call_later`` handle per session). Closes of its own:

- **1000** ``Session resumed elsewhere``: a newer connection resumed the session while this
  one still carried it (the server had not noticed it die); never two connections per session.
- **1013** ``Outbox full: resume to receive the rest``: the outbox refused a numbered message,
  which is in the history; the client resumes and gets the replay rather than a silent gap.

A disconnected session stays resumable for ``window_ms`` (one ``call_later`` handle per server
drops expired ones); ``send_to`` and ``broadcast`` reach it meanwhile, kept for the resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import http
import logging
import os
import secrets
import signal
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ssl import SSLContext
from types import MappingProxyType, TracebackType
from typing import (
    Any,
    ClassVar,
    Literal,
    Protocol,
    Self,
    TypedDict,
    TypeVar,
    Unpack,
    cast,
    runtime_checkable,
)
from urllib.parse import parse_qs

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, State
from websockets.typing import Subprotocol

from steadysocket.model.delivery import DeliveryConfig, Inbound, SessionStore
from steadysocket.model.delivery import ServerSession as DeliverySession
from steadysocket.model.ledger import Released, Written
from steadysocket.model.protocol import CloseCode, MessageType, ack_text, format_timestamp
from steadysocket.model.routing import Publication, Rooms, Target, check_room, route
from steadysocket.model.server_session import (
    OUTBOX_OVERFLOW,
    RATE_LIMITED,
    SESSION_LOST,
    SESSION_RESUMED_ELSEWHERE,
    SESSION_STORE_UNAVAILABLE,
    SHUTDOWN,
    UPGRADE_REQUIRED,
    Action,
    ClientRoute,
    Close,
    CloseRecord,
    Deliver,
    GcPolicy,
    GcStep,
    HttpRefusal,
    LegacyRoute,
    Outbox,
    SendText,
    ServerConfig,
    ServerSession,
    SessionState,
    TokenBucket,
    admit,
    encode_server_message,
    gc_step,
    legacy_reply,
    match_route,
    select_subprotocol,
)
from steadysocket.runtime.broker import Broker, BrokerUnavailable, MemoryBroker
from steadysocket.runtime.session_ledger import Ledger, LedgerSession, Prepared

__all__ = [
    "AuthenticateHook",
    "AuthenticationFailed",
    "Client",
    "ConnectHook",
    "DisconnectHook",
    "EndpointOptions",
    "Endpoints",
    "Link",
    "MessageHandler",
    "PingAware",
    "RequestHeaders",
    "SteadyServer",
    "TokenExpired",
    "WritesNow",
    "echo_handler",
    "serve_until_signalled",
]

logger = logging.getLogger(__name__)

MessageHandler = Callable[[dict[str, Any], "Client"], Awaitable[Any]]
"""``async def handler(message, client)``: one application message and the client it came from.

What it returns answers a request (docs/protocol.md, v2 point 8): a JSON value, sent back as
``{"type":"reply","id":N,"result":...}`` when the message was a request (v1: it carried an
integer ``id``; v2: any message, and only a value other than None is sent). Otherwise the
return value is ignored."""

ConnectHook = Callable[["Client"], Awaitable[None]]
"""``async def hook(client)``: after the hello was queued, before the first handler runs."""

DisconnectHook = Callable[["Client"], Awaitable[None]]
"""``async def hook(client)``: after the connection ended; ``client.close_code`` tells how."""

AuthenticateHook = Callable[["Client"], Awaitable[object]]
"""``async def authenticate(client)``: before the hello; what it returns is
``client.identity``, raising :class:`AuthenticationFailed` or :class:`TokenExpired` refuses."""

_H = TypeVar("_H", bound=MessageHandler)
_C = TypeVar("_C", bound=ConnectHook)
_A = TypeVar("_A", bound=AuthenticateHook)

_RESERVED_TYPES = frozenset({MessageType.PING, MessageType.PONG, MessageType.STATUS})
_INBOX_LIMIT = 16
"""Messages read but not yet handled, per connection; beyond it the reader waits (held)."""
_FORCE_GRACE = 0.5
_RENEW_MS = 5_000.0
"""With shared sessions: how often a connected session's place in the store is renewed."""
"""Seconds each forced step of a shutdown waits after cancelling (two steps at most)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _new_request_id() -> str:
    return str(uuid.uuid4())


def _new_token() -> str:
    """A session id or epoch: 128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


def _describe_exception(exc: BaseException) -> str:
    """``ExcType: message`` for a failed request's reply (a broken ``__str__`` included)."""
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _describe_close(link: Link) -> str:
    record = link.close_record
    if record.code is None or record.code == CloseCode.ABNORMAL:
        return "1006 (no close frame)"
    return f"{record.code} {record.reason}" if record.reason else str(record.code)


# --------------------------------------------------------------------------------------------
# What the pump needs from a transport
# --------------------------------------------------------------------------------------------


class Link(Protocol):
    """One accepted WebSocket connection, as :class:`Endpoints` drives it.

    A transport adapter implements this once (websockets here, ASGI elsewhere). None of the
    methods raises because the connection is closed; they report it instead. The pump calls
    :meth:`receive` from one task and :meth:`send` and :meth:`close` from another, one at a time,
    and bounds the time of each.
    """

    @property
    def remote_address(self) -> str:
        """``host:port`` of the peer, for logs."""
        ...

    @property
    def close_record(self) -> CloseRecord:
        """How the connection ended (the model's rule). The pump records the server's own closes
        and aborts; the link records the client's close frame and a lost connection."""
        ...

    async def receive(self) -> str | bytes | None:
        """The next frame (``str`` for text, ``bytes`` for binary), or None once closed."""
        ...

    async def send(self, text: str) -> bool:
        """Send a text frame; False if the connection is closed."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame with ``code`` and ``reason`` and run the closing handshake."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        ...


@runtime_checkable
class PingAware(Protocol):
    """A :class:`Link` that can report the client's protocol Ping frames as they arrive.

    Such frames are answered by the transport and never reach :meth:`Link.receive`; reporting
    them lets the rate limit count them (SteadyServer does; an ASGI server keeps them).
    """

    def on_ping(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously) for each Ping frame from now on."""
        ...


@runtime_checkable
class WritesNow(Protocol):
    """A :class:`Link` that can write a frame synchronously when that cannot wait.

    With it, a push or a ping to a connection whose outbox is empty and whose writer is idle is
    written at once, in the caller's step, instead of waking the connection's writer task: the
    common case costs no task switch and no timer. When the transport is above its write-buffer
    limit the frame is queued in the outbox as before, and the writer sends it, bounded.
    """

    @property
    def write_paused(self) -> bool:
        """True while the transport's write buffer is above its limit (a write would wait)."""
        ...

    def write_now(self, text: str) -> bool:
        """Write a text frame now if it can be done without waiting; False if it cannot."""
        ...

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its limit, or the connection ends."""
        ...


class _TrackedConnection(ServerConnection):
    """A websockets connection that records its close frames and reports Pings (see ``Link``)."""

    close_record: CloseRecord
    ping_listener: Callable[[], None] | None

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        if not isinstance(event, Frame):
            return
        if event.opcode is Opcode.PING:
            if self.ping_listener is not None:
                self.ping_listener()
        elif event.opcode is Opcode.CLOSE:
            rcvd = self.protocol.close_rcvd
            if rcvd is not None:
                self.close_record.peer_closed(rcvd.code, rcvd.reason)


class _WebSocketsLink:
    """:class:`Link` over a websockets ``ServerConnection``."""

    __slots__ = ("ws",)

    def __init__(self, ws: _TrackedConnection) -> None:
        self.ws = ws

    @property
    def remote_address(self) -> str:
        return _peer(self.ws)

    @property
    def close_record(self) -> CloseRecord:
        return self.ws.close_record

    def _settle(self) -> None:
        """The connection is closed: record what websockets did on its own (1009, keepalive)."""
        record, protocol = self.ws.close_record, self.ws.protocol
        sent, rcvd = protocol.close_sent, protocol.close_rcvd
        if sent is not None and not protocol.close_rcvd_then_sent:
            record.server_closed(sent.code, sent.reason)
        elif rcvd is not None:
            record.peer_closed(rcvd.code, rcvd.reason)
        else:
            record.lost()

    async def receive(self) -> str | bytes | None:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            self._settle()
            return None

    async def send(self, text: str) -> bool:
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)

    def abort(self) -> None:
        self.ws.transport.abort()

    def on_ping(self, listener: Callable[[], None]) -> None:
        self.ws.ping_listener = listener

    @property
    def write_paused(self) -> bool:
        return self.ws.paused

    def write_now(self, text: str) -> bool:
        # What ws.send() does for one text frame when it would not wait (see send_context):
        # the protocol frames (and compresses) it, send_data() hands it to the transport.
        ws = self.ws
        if (
            ws.paused
            or ws.send_in_progress is not None
            or ws.protocol.state is not State.OPEN
            or ws.transport.is_closing()
        ):
            return False
        ws.protocol.send_text(text.encode())
        ws.send_data()
        return True

    async def drain(self) -> None:
        with contextlib.suppress(Exception):  # the connection was lost: the reader reports it
            await self.ws.drain()


# --------------------------------------------------------------------------------------------
# The garbage collector (process-wide, shared by every running server)
# --------------------------------------------------------------------------------------------


class _Collector:
    """Applies the :class:`GcPolicy` of the running servers to the process's collector.

    The collector is one per process: the first server to start saves the thresholds, each
    applies its generation-0 threshold (the largest wins), and the last one to stop restores them
    and unfreezes the permanent generation, so nothing stays frozen once no server runs.
    """

    def __init__(self) -> None:
        self._users: list[GcPolicy] = []
        self._saved: tuple[int, int, int] | None = None

    def acquire(self, policy: GcPolicy) -> None:
        if not self._users:
            self._saved = gc.get_threshold()
        self._users.append(policy)
        if policy.gen0_threshold is not None:
            gen0, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(max(gen0, policy.gen0_threshold), gen1, gen2)

    def release(self, policy: GcPolicy) -> None:
        self._users.remove(policy)
        if not self._users and self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
            gc.unfreeze()


_COLLECTOR = _Collector()
DEFAULT_GC_POLICY = GcPolicy()
"""What a server does to the collector unless told otherwise (see :class:`GcPolicy`)."""


# --------------------------------------------------------------------------------------------
# One connection's runtime state
# --------------------------------------------------------------------------------------------


class _Flag:
    """The part of :class:`asyncio.Event` the pump uses, for a fraction of its memory.

    A connection holds five of them; an ``asyncio.Event`` allocates a deque (about 600 bytes)
    each, this a future only while someone waits.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self, *, is_set: bool = False) -> None:
        self._set = is_set
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class _Conn:
    """What the pump keeps per connection: the outbox and the inbox, and how it ends.

    Three parts work on it: the reader (reads every frame as it arrives and answers the protocol
    at once), the writer (sends the outbox in order, the pings, and the close frame) and the
    dispatcher (runs ``on_connect``, then the handlers in order, in the connection's own task).
    """

    __slots__ = (
        "body_scope",
        "bucket",
        "client",
        "close_deadline",
        "closing",
        "direct",
        "ended",
        "finished",
        "group",
        "inbox",
        "inbox_changed",
        "link",
        "live",
        "on_end",
        "outbox",
        "reader",
        "refusing",
        "send_scope",
        "session",
        "space",
        "stalled",
        "task_scope",
        "timer",
        "wake",
        "writer",
        "writing",
    )

    def __init__(self, link: Link, config: ServerConfig, session: ServerSession | None) -> None:
        self.link = link
        self.session = session
        self.client: Client | None = None
        self.bucket: TokenBucket | None = None
        self.outbox = Outbox(config.max_outbox_bytes)
        self.inbox: list[Deliver] = []
        """At most ``_INBOX_LIMIT`` messages: a list costs less than a deque here."""
        self.wake = _Flag()
        """The writer has something to do: a text queued, a close requested, the end."""
        self.inbox_changed = _Flag()
        """The dispatcher has something to do: a delivery, or the end."""
        self.space = _Flag()
        """The reader may go on: the inbox has room, or the connection is closing."""
        self.ended = _Flag()
        """The connection is over: nothing more will be read or written."""
        self.finished = _Flag()
        """The connection's task is done, ``on_disconnect`` included."""
        self.closing: Close | None = None
        self.close_deadline: float | None = None
        self.refusing = False
        # Not isinstance(link, WritesNow): a runtime-checkable protocol check costs about 80 µs
        # (typing walks the protocol's attributes), a tenth of a handshake.
        self.direct: WritesNow | None = (
            cast("WritesNow", link) if callable(getattr(link, "write_now", None)) else None
        )
        """The link, when it can write a frame without the writer task."""
        self.writing = False
        """The writer is sending a frame (a direct write now would overtake it)."""
        self.stalled = False
        """A direct write left the transport above its limit: the writer waits for it, bounded."""
        self.timer: asyncio.TimerHandle | None = None
        """The session's next deadline (a ping, or the dead-client close): one handle, no task."""
        self.reader: asyncio.Task[None] | None = None
        self.group: asyncio.TaskGroup | None = None
        """The connection's TaskGroup while it runs (where the writer is started)."""
        self.writer: asyncio.Task[None] | None = None
        """The writer, started the first time a frame cannot be written at once (or a close
        is due); a connection whose frames all go out directly never has one."""
        self.send_scope: asyncio.Timeout | None = None
        self.body_scope: asyncio.Timeout | None = None
        self.task_scope: asyncio.Timeout | None = None
        self.live: _LiveSession | None = None
        """v2: the session this connection carries (None in v1 and on the legacy echo)."""
        self.on_end: Callable[[], None] | None = None
        """Called once when the connection ends (a v2 connection detaches from its session)."""

    def mark_ended(self) -> None:
        if self.ended.is_set():
            return
        self.link.close_record.lost()  # a no-op when a close came first
        if self.session is not None:
            self.session.connection_lost()
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.outbox.seal()
        self.outbox.clear()
        self.ended.set()
        self.wake.set()
        self.inbox_changed.set()
        self.space.set()


@dataclass(slots=True, eq=False)
class _LiveSession(LedgerSession):
    """A v2 session (the model's rules) with what the runtime keeps beside them (its place in a
    shared store too, used when the broker shares sessions)."""

    conn: _Conn | None = None
    """The connection carrying the session now; None while it is disconnected."""
    idle: _Flag = field(default_factory=lambda: _Flag(is_set=True))
    """Set while no handler of the session runs (a resumed connection's BUSY waits on it)."""
    ack_timer: asyncio.TimerHandle | None = None
    """The batched ack's timer: one ``call_later`` handle per session, while connected."""


class _Store(SessionStore):
    """The server's sessions, made as :class:`_LiveSession`."""

    session_class: ClassVar[type[DeliverySession]] = _LiveSession


def _no_ping_listener() -> None:
    """The Ping listener of a connection that has ended."""


_CURRENT: contextvars.ContextVar[_Conn | None] = contextvars.ContextVar(
    "steadysocket_connection", default=None
)
"""The connection whose task (or child task) is running: hooks and handlers see their own."""


def _reschedule_now(scope: asyncio.Timeout | None) -> bool:
    """Expire ``scope`` at once (cancelling what runs inside it); False if it is not active."""
    if scope is None:
        return False
    try:
        scope.reschedule(asyncio.get_running_loop().time())
    except RuntimeError:  # already expired or exited
        return False
    return True


# --------------------------------------------------------------------------------------------
# The application's view of a client
# --------------------------------------------------------------------------------------------


class AuthenticationFailed(Exception):
    """Raised by an ``authenticate`` hook: the credentials are refused, for good.

    The connection is closed with **4403** and ``reason`` (``Authentication failed`` when
    empty); a steadysocket client classifies it ``handshake``, not retryable (fallback at once).
    """

    code: ClassVar[int] = CloseCode.AUTH_REFUSED

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or self.__class__.__name__)
        self.reason = reason


class TokenExpired(AuthenticationFailed):
    """Raised by an ``authenticate`` hook: the credentials were good but have expired.

    The connection is closed with **4419** and ``reason`` (``Token expired`` when empty); a
    steadysocket client classifies it ``handshake``, retryable, and its ``auth`` callable is
    asked for a fresh token before the next attempt.
    """

    code: ClassVar[int] = CloseCode.AUTH_EXPIRED


class RequestHeaders(Mapping[str, str]):
    """The headers of a connection's upgrade request, read-only.

    Names are case-insensitive (iterated in lower case). A header sent more than once reads as
    its values joined with ``", "`` (RFC 9110, 5.3); :meth:`get_all` lists them one by one.
    """

    __slots__ = ("_index",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        index: dict[str, list[str]] = {}
        for name, value in pairs:
            index.setdefault(name.lower(), []).append(value)
        self._index = index

    def __getitem__(self, name: str) -> str:
        if not isinstance(name, str):
            raise KeyError(name)
        return ", ".join(self._index[name.lower()])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name``, in the order received (``[]`` when absent)."""
        return list(self._index.get(name.lower(), ()))

    def __repr__(self) -> str:
        return f"RequestHeaders({sorted(self._index)!r})"


_NO_PAIRS: tuple[tuple[str, str], ...] = ()


class _Request:
    """What a ``/ws/client`` connection's upgrade request said, parsed when first read."""

    __slots__ = ("_headers", "_query", "identity", "raw_headers", "raw_query", "subprotocol")

    def __init__(
        self,
        raw_query: str = "",
        raw_headers: Iterable[tuple[str, str]] = _NO_PAIRS,
        subprotocol: str | None = None,
    ) -> None:
        self.raw_query = raw_query
        self.raw_headers = raw_headers
        self.subprotocol = subprotocol
        self.identity: object = None
        self._query: Mapping[str, str] | None = None
        self._headers: RequestHeaders | None = None

    @property
    def query(self) -> Mapping[str, str]:
        if self._query is None:
            raw = self.raw_query[1:] if self.raw_query.startswith("?") else self.raw_query
            # As the protocol's query checks read it: the first value of a repeated name counts.
            parsed = parse_qs(raw, keep_blank_values=True)
            self._query = MappingProxyType({name: values[0] for name, values in parsed.items()})
        return self._query

    @property
    def headers(self) -> RequestHeaders:
        if self._headers is None:
            self._headers = RequestHeaders(self.raw_headers)
        return self._headers


class Client:
    """One connected ``/ws/client`` peer, as hooks and handlers see it.

    Several connections may share a ``client_id`` (two browser tabs); each is its own
    :class:`Client`. The ``authenticate`` hook sees the same object before the hello
    (``request_id`` still empty, ``session_id`` None).
    """

    __slots__ = ("_conn", "_endpoints", "_request", "_session")

    def __init__(
        self,
        endpoints: Endpoints,
        conn: _Conn,
        session: ServerSession,
        request: _Request | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._conn = conn
        self._session = session
        self._request = _Request() if request is None else request

    @property
    def query(self) -> Mapping[str, str]:
        """The upgrade request's query parameters, read-only (``client_id``, ``version`` and
        ``role`` included); for a repeated name the first value, as the protocol's checks."""
        return self._request.query

    @property
    def headers(self) -> RequestHeaders:
        """The upgrade request's headers, read-only and case-insensitive (``Authorization``,
        ``Cookie``, ``Origin``, ...)."""
        return self._request.headers

    @property
    def subprotocol(self) -> str | None:
        """The subprotocol negotiated for this connection (the server's ``subprotocols`` in
        its order of preference, the first the client offered), or None."""
        return self._request.subprotocol

    @property
    def identity(self) -> object:
        """What the server's ``authenticate`` hook returned for this connection (the user, its
        claims, ...); None without a hook."""
        return self._request.identity

    @property
    def client_id(self) -> str:
        """The validated ``client_id`` from the query."""
        return self._session.client_id

    @property
    def role(self) -> str:
        """``frontend``, ``admin`` or ``test``."""
        return self._session.role

    @property
    def request_id(self) -> str:
        """The ``request_id`` of this connection's hello."""
        return self._session.request_id

    @property
    def version(self) -> int:
        """The protocol version this connection speaks: 1 or 2."""
        return self._session.version

    @property
    def session_id(self) -> str | None:
        """v2: the session this connection carries (its hello's ``session_id``); None in v1."""
        delivery = self._session.delivery
        return None if delivery is None else delivery.session_id

    @property
    def remote_address(self) -> str:
        """``host:port`` of the peer."""
        return self._conn.link.remote_address

    @property
    def close_code(self) -> int | None:
        """How the connection ended, once it has (None before); see ``CloseRecord``.

        The first close wins: the code the server closed with (1001 shutdown, 1011 heartbeat,
        1009, 4429, or the application's), or the one the client closed with,
        or 1006 when the connection was lost with no close frame either way.
        """
        return self._conn.link.close_record.code if self._conn.ended.is_set() else None

    @property
    def close_reason(self) -> str | None:
        """The reason that goes with :attr:`close_code`, once the connection has ended."""
        return self._conn.link.close_record.reason if self._conn.ended.is_set() else None

    async def send(self, message: Mapping[str, Any]) -> bool:
        """Queue an application message for this client; a ``timestamp`` is added if it has none.

        Never waits for the client: the message goes to the connection's outbox, which its own
        writer sends in order (this coroutine only yields to the event loop once, so writers
        get to run between pushes). Returns whether it was queued: ``False`` when the connection
        is closing or closed, or when its outbox is full (``max_outbox_bytes``; counted in
        ``refused_pushes``).

        In v2 the message is numbered (``offset``) and kept in the session's history until the
        client acknowledges it, and it goes to whichever connection carries the session now
        (a resume moves it). Returns True when it was kept: it is delivered on this connection
        or, after a drop, on the resume within the window. A full outbox then closes the
        connection with 1013 (the resume replays it); False only once the session is gone
        (expired, or replaced by a fresh session of the same client id) and disconnected.

        Raises:
            ValueError: the message has no string ``type``, or holds NaN or a cycle.
            TypeError: the message holds something that is not JSON.
        """
        text = encode_server_message(message, self._endpoints._wall_clock())
        queued = self._endpoints._send_app(self._conn, text)
        await asyncio.sleep(0)
        return queued

    async def echo(self, message: Mapping[str, Any]) -> bool:
        """Queue the default handler's ``echo`` of ``message``; as :meth:`send`."""
        action = self._session.echo(message, wall=self._endpoints._wall_clock())
        queued = self._endpoints._send_app(self._conn, action.text)
        await asyncio.sleep(0)
        return queued

    async def join(self, room: str) -> None:
        """Put this client id in ``room``: :meth:`Endpoints.publish` to the room reaches it, in
        whichever process it is connected, and :meth:`Endpoints.presence` lists it.

        Membership belongs to the client id in this process: its other connections here are
        members too, and it lasts until the client id has no connection left here (v2: and
        no resumable session, so publications during an outage are replayed on resume).
        Returns once the broker announced it (a no-op when it already was a member).

        Raises:
            ValueError, TypeError: a bad room name (1 to 256 bytes of UTF-8).
        """
        await self._endpoints._join(self.client_id, room)

    async def leave(self, room: str) -> None:
        """Take this client id out of ``room`` (a no-op if it is not a member).

        Raises:
            ValueError, TypeError: a bad room name.
        """
        self._endpoints._leave(self.client_id, room)
        await asyncio.sleep(0)

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this client id is in, in this process."""
        return self._endpoints._rooms.rooms_of(self.client_id)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close this connection with ``code`` and ``reason`` (cut to 123 bytes).

        What was queued before is sent first. Returns once the connection has ended, within
        the close timeout (after which it is aborted) plus a small margin; safe to call from
        this client's own handler or hooks, and more than once.

        Raises:
            ValueError: a server may not send ``code``.
        """
        endpoints = self._endpoints
        for action in self._session.close(code, reason):
            endpoints._carry_out(self._conn, [action])
        try:
            async with asyncio.timeout(endpoints.config.close_timeout + _FORCE_GRACE):
                await self._conn.ended.wait()
        except TimeoutError:
            endpoints._abort(self._conn)

    def __repr__(self) -> str:
        return f"<Client {self.client_id!r} {self.role} {self.remote_address}>"


async def echo_handler(message: dict[str, Any], client: Client) -> None:
    """The default handler: ``{"type":"echo","original_message",...}`` back to the sender
    (returns None: in v2 a request it answers is resolved by the ack)."""
    await client.echo(message)


# --------------------------------------------------------------------------------------------
# Endpoints: hooks, push, and the per-connection pump, for any transport
# --------------------------------------------------------------------------------------------


class EndpointOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Endpoints`, which every transport adapter passes on."""

    config: ServerConfig | None
    heartbeat_interval_ms: int | None
    connection_timeout_ms: int | None
    max_message_bytes: int | None
    allowed_origins: Iterable[str] | None
    max_connections: int | None
    rate_limit_messages: int | None
    rate_limit_window_ms: int | None
    max_outbox_bytes: int | None
    delivery: DeliveryConfig | None
    broker: Broker | None
    subprotocols: Sequence[str] | None
    gc_policy: GcPolicy | None
    environ: Mapping[str, str] | None
    default_handler: MessageHandler
    request_id_factory: Callable[[], str]
    wall_clock: Callable[[], datetime]


class Endpoints:
    """Handlers, hooks, connected clients, server push, and the pump for each connection.

    A transport adapter accepts a connection, wraps it in a :class:`Link`, looks the request
    target up with :func:`~steadysocket.model.server_session.match_route`, and awaits
    :meth:`serve_client` or :meth:`serve_legacy` until the connection ends. Its shutdown awaits
    :meth:`close_clients`.

    Per connection, in the task that awaits ``serve_client``: a reader task reads every frame as
    it arrives (so pongs, Pings, close frames and the rate limit are seen at once, whatever the
    application is doing), a writer task (started when first needed) sends the connection's
    outbox and the close frame, and the connection's own task runs ``on_connect`` and then the
    handlers, in order. A push (:meth:`send_to`, :meth:`broadcast`, :meth:`Client.send`) or a
    ping is written at once when that cannot wait (a :class:`WritesNow` link, nothing queued),
    else queued into the outbox; it never waits on a peer.

    Configuration: pass ``config``, or any of ``heartbeat_interval_ms``,
    ``connection_timeout_ms``, ``max_message_bytes``, ``allowed_origins``, ``max_connections``,
    ``rate_limit_messages``, ``rate_limit_window_ms``, ``max_outbox_bytes`` (see
    :class:`~steadysocket.model.server_session.ServerConfig`); what is not given comes from
    ``WS_HEARTBEAT_INTERVAL_MS`` / ``WS_CONNECTION_TIMEOUT_MS``, then the defaults. The origin
    check and the connection cap happen before the upgrade, so they are the transport adapter's
    to carry out (:meth:`admission`); the rate limit is the session's.

    Protocol v2 (docs/protocol.md, "Protocol v2"): a client asking ``version=2`` gets a
    session from :attr:`sessions` (one per server object, under one random ``epoch``): every
    application message to it is numbered and kept until acknowledged, every message from it is
    handled once per ``id`` and acknowledged after its handler returned, and a reconnect within
    the window resumes (replay, then go on). v1 clients are served exactly as before.

    Args:
        config: complete settings; not combinable with the individual settings.
        delivery: v2's window, history length and ack batching
            (:class:`~steadysocket.model.delivery.DeliveryConfig`; its defaults when None).
        broker: how pushes reach the clients of other processes, and where presence lives
            (:mod:`steadysocket.runtime.broker`; a ``MemoryBroker``, this process only, when
            None). ``broadcast``, ``send_to`` and :meth:`publish` go through it.
        subprotocols: the subprotocols this server speaks, in its order of preference; a
            connection gets the first one its client offered (``client.subprotocol``), or none
            (never a refusal: an :meth:`authenticate` hook may refuse a client without one).
        environ: where to read the variables (``os.environ`` by default).
        default_handler: handler for types with no :meth:`on_message` registration;
            :func:`echo_handler` by default.
        request_id_factory: makes each hello's ``request_id`` (a UUID4 by default).
        wall_clock: the aware datetime stamped on messages (UTC now by default).

    Raises:
        ConfigError: a setting or variable is malformed (a ``ValueError``).
        TypeError: both ``config`` and individual settings were given.
    """

    def __init__(
        self,
        *,
        config: ServerConfig | None = None,
        heartbeat_interval_ms: int | None = None,
        connection_timeout_ms: int | None = None,
        max_message_bytes: int | None = None,
        allowed_origins: Iterable[str] | None = None,
        max_connections: int | None = None,
        rate_limit_messages: int | None = None,
        rate_limit_window_ms: int | None = None,
        max_outbox_bytes: int | None = None,
        delivery: DeliveryConfig | None = None,
        broker: Broker | None = None,
        subprotocols: Sequence[str] | None = None,
        gc_policy: GcPolicy | None = DEFAULT_GC_POLICY,
        environ: Mapping[str, str] | None = None,
        default_handler: MessageHandler = echo_handler,
        request_id_factory: Callable[[], str] = _new_request_id,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        explicit = (
            heartbeat_interval_ms,
            connection_timeout_ms,
            max_message_bytes,
            allowed_origins,
            max_connections,
            rate_limit_messages,
            rate_limit_window_ms,
            max_outbox_bytes,
        )
        if config is None:
            config = ServerConfig.from_env(
                os.environ if environ is None else environ,
                heartbeat_interval_ms=heartbeat_interval_ms,
                connection_timeout_ms=connection_timeout_ms,
                max_message_bytes=max_message_bytes,
                allowed_origins=allowed_origins,
                max_connections=max_connections,
                rate_limit_messages=rate_limit_messages,
                rate_limit_window_ms=rate_limit_window_ms,
                max_outbox_bytes=max_outbox_bytes,
            )
        elif any(value is not None for value in explicit):
            raise TypeError("pass either config or individual settings, not both")
        self.config = config
        self._default_handler = default_handler
        self._request_id_factory = request_id_factory
        self._wall_clock = wall_clock
        self._handlers: dict[str, MessageHandler] = {}
        self._connect_hooks: list[ConnectHook] = []
        self._disconnect_hooks: list[DisconnectHook] = []
        self._authenticate: AuthenticateHook | None = None
        if isinstance(subprotocols, str) or not all(
            isinstance(name, str) and name for name in subprotocols or ()
        ):
            raise ValueError(f"subprotocols: give a list of non-empty names, got {subprotocols!r}")
        self.subprotocols: tuple[str, ...] = tuple(subprotocols or ())
        """The subprotocols this server speaks, in its order of preference (none by default)."""
        self._clients: dict[str, set[Client]] = {}
        self._conns: set[_Conn] = set()
        self._stopping = False
        self.gc_policy = gc_policy
        """How this server manages the collector while it runs; None: it leaves it alone."""
        self._gc_timer: asyncio.TimerHandle | None = None
        self._gc_acquired = False
        self._closed_since_unfreeze = 0
        self._opened_since_freeze = 0
        self.refused_pushes = 0
        """Pushes refused because the connection's outbox was full (``max_outbox_bytes``)."""
        self.delivery = DeliveryConfig() if delivery is None else delivery
        """Protocol v2's bounds and ack batching (``model/delivery.py``)."""
        self.sessions: SessionStore = _Store(_new_token(), self.delivery)
        """The v2 sessions of this server, under one ``epoch`` drawn at construction (a new
        server object is a new epoch: no session of another one resumes here)."""
        self._expiry_timer: asyncio.TimerHandle | None = None
        self.broker: Broker = MemoryBroker() if broker is None else broker
        """How this server reaches the clients of other processes (``runtime/broker.py``);
        a :class:`~steadysocket.runtime.broker.MemoryBroker` (this process only) by default."""
        self._rooms = Rooms()
        self._broker_started = False
        self._ledger: Ledger | None = None

    # ---- registration -------------------------------------------------------------------

    def on_message(self, message_type: str) -> Callable[[_H], _H]:
        """Register the handler for one application ``type``; use as a decorator.

        ``@server.on_message("chat")`` above ``async def chat(message, client): ...``. Handlers
        run in their connection's own task, after ``on_connect``, one at a time and in order; a
        slow handler delays that connection's later messages only. Meanwhile the connection's
        frames are still read (pongs keep it alive); after 16 unhandled messages the server
        stops reading it, and that pause counts neither as the client's silence nor against its
        rate limit. An exception is logged and the connection stays open.

        Request / reply: a handler may return a JSON value. For a request (v1: a message with
        an integer ``id``, which the handler sees; v2: every message, seen without its ``id``)
        the server answers ``{"type":"reply","id":N,"result":R}`` once the handler returned
        (v1 always, ``null`` included; v2 only for a value other than None, as a numbered
        message; otherwise the ack covering ``id`` answers it). A handler that raises, or
        returns what JSON cannot encode, is answered ``{"type":"reply","id":N,"error":
        {"error_code":"HANDLER_ERROR","message":"<ExcType>: <text>"}}`` and logged. In v2 a
        handler runs once per ``id``: a re-sent message it already handled is only acked.

        Raises:
            ValueError: ``ping``, ``pong`` and ``status`` are answered by the protocol itself.
        """
        if message_type in _RESERVED_TYPES:
            raise ValueError(f"{message_type!r} is a system message the server answers itself")

        def register(handler: _H) -> _H:
            self._handlers[message_type] = handler
            return handler

        return register

    def on_connect(self, hook: _C) -> _C:
        """Register a hook run for each accepted ``/ws/client`` connection; a decorator.

        It runs after the hello, before the first handler; the connection's frames are read
        (and pings answered) meanwhile.
        """
        self._connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: _C) -> _C:
        """Register a hook run once when an accepted ``/ws/client`` connection ends; a decorator.

        ``client.close_code`` tells how it ended (see :attr:`Client.close_code`).
        """
        self._disconnect_hooks.append(hook)
        return hook

    def authenticate(self, hook: _A) -> _A:
        """Register the hook that admits each ``/ws/client`` connection; a decorator.

        ``async def authenticate(client)`` runs after the query checks and **before the hello**,
        with the :class:`Client` (``client.query``, ``client.headers``,
        ``client.subprotocol``, ``client_id``, ``role``, ``version``). What it returns becomes
        ``client.identity``. To refuse, raise :class:`AuthenticationFailed` (close **4403**:
        the client goes to fallback at once) or :class:`TokenExpired` (close **4419**: the
        client retries with a fresh token from its ``auth`` callable), with a reason. A hook
        that raises anything else, or runs past the connection timeout, closes with **4500**
        ``Server handshake error`` (retryable) and is logged. A refused connection never
        reaches ``on_connect``, the handlers or ``on_disconnect``.

        Raises:
            RuntimeError: a hook is already registered (there is one).
        """
        if self._authenticate is not None:
            raise RuntimeError(
                f"an authenticate hook is already registered: {self._authenticate!r}"
            )
        self._authenticate = hook
        return hook

    # ---- admission ----------------------------------------------------------------------

    def admission(self, origins: list[str], open_connections: int) -> HttpRefusal | None:
        """The model's :func:`~steadysocket.model.server_session.admit` with this config."""
        return admit(self.config, origins, open_connections)

    # ---- server push --------------------------------------------------------------------

    @property
    def clients(self) -> tuple[Client, ...]:
        """The connected ``/ws/client`` peers, in no particular order."""
        return tuple(client for group in self._clients.values() for client in group)

    async def send_to(self, client_id: str, message: Mapping[str, Any]) -> int:
        """Queue ``message`` for every connection of ``client_id``; returns how many took it.

        A ``timestamp`` is added if the message has none. Never waits on a peer (see
        :meth:`Client.send`). The count is the v1 connections that queued it plus the v2
        sessions that kept it: a v2 session counts once, connected or not, since a session
        disconnected but within the window keeps the message and delivers it on resume.

        Raises:
            ValueError, TypeError: the message cannot be encoded (see :meth:`Client.send`).
        """
        text = encode_server_message(message, self._wall_clock())
        queued = self._push_to(client_id, text)
        await self.broker.publish(Target.CLIENT, client_id, text)
        await asyncio.sleep(0)
        return queued

    async def broadcast(self, message: Mapping[str, Any]) -> int:
        """Queue ``message`` for every ``/ws/client`` peer; returns how many took it.

        Each connection has its own bounded outbox and writer, so this returns at once: a
        stalled, slow or half-open peer holds up neither the caller nor the other clients. As
        :meth:`send_to`, v2 sessions disconnected but within the window are reached too (kept
        for the resume), and the count is v1 connections plus v2 sessions.

        Raises:
            ValueError, TypeError: the message cannot be encoded (see :meth:`Client.send`).
        """
        text = encode_server_message(message, self._wall_clock())
        queued = self._push_local(self.clients, tuple(self.sessions.sessions.values()), text)
        await self.broker.publish(Target.ALL, "", text)
        await asyncio.sleep(0)  # let the writers run between broadcasts
        return queued

    # ---- rooms, presence and the other processes (runtime/broker.py) ---------------------

    async def publish(self, room: str, message: Mapping[str, Any]) -> int:
        """Queue ``message`` for every member of ``room``, in every process of the cluster.

        Returns how many of *this* process's connections (v1) and sessions (v2) took it, as
        :meth:`send_to`; the broker carries it to the other processes, which deliver it to
        their members. A ``timestamp`` is added if the message has none.

        Raises:
            ValueError, TypeError: a bad room name, or a message that cannot be encoded.
            BrokerOverflow: the broker's store is unreachable and its queue is full; the
                local members got the message, the other processes will not.
        """
        check_room(room)
        text = encode_server_message(message, self._wall_clock())
        queued = sum(self._push_to(client_id, text) for client_id in self._rooms.members(room))
        await self.broker.publish(Target.ROOM, room, text)
        await asyncio.sleep(0)
        return queued

    async def presence(self, room: str) -> frozenset[str]:
        """The client ids in ``room``, in every live process of the cluster.

        Raises:
            ValueError, TypeError: a bad room name.
            BrokerUnavailable: the broker's store cannot be reached.
        """
        return await self.broker.presence(check_room(room))

    async def client_count(self) -> int:
        """The ``/ws/client`` connections of every live process of the cluster.

        Raises:
            BrokerUnavailable: the broker's store cannot be reached.
        """
        return await self.broker.client_count()

    @property
    def rooms(self) -> Rooms:
        """The room memberships of this process's client ids (read it, do not change it)."""
        return self._rooms

    @property
    def local_client_count(self) -> int:
        """The ``/ws/client`` connections of this process."""
        return sum(len(group) for group in self._clients.values())

    def deliver(self, publication: Publication, entry_id: str, *, own: bool) -> None:
        """Deliver a publication read from the broker's store to this process's clients (the
        broker calls it; the routing decision is ``model/routing.py``'s). The v1 connections
        got this process's own publications when they were made; with shared sessions, the v2
        sessions get every publication here, in the store's order (``model/ledger.py``)."""
        reach = route(publication, self._rooms)
        text = publication.text
        ledger = self._ledger
        if ledger is None:  # each process keeps its sessions: they got their own at once
            if own:
                return
            if reach.everyone:
                self._push_all(self.clients, tuple(self.sessions.sessions.values()), text)
            else:
                for client_id in reach.client_ids:
                    self._push_to(client_id, text)
            return
        if not own:
            if reach.everyone:
                self._push_v1(self.clients, text)
            else:
                for client_id in reach.client_ids:
                    self._push_v1(tuple(self._clients.get(client_id, ())), text)
        if reach.everyone:
            sessions: Iterable[DeliverySession] = tuple(self.sessions.sessions.values())
        else:
            sessions = [s for c in reach.client_ids for s in self.sessions.of_client(c)]
        for session in sessions:
            assert isinstance(session, _LiveSession)
            if ledger.offer(session, entry_id, publication):
                self._publish(session, text)

    async def start_broker(self) -> None:
        """Start the broker (a transport adapter calls it when it starts serving)."""
        if not self._broker_started:
            self._broker_started = True
            await self.broker.start(self)
            shared = self.broker.shared_sessions
            if shared is not None:
                self._ledger = Ledger(
                    shared, self, self.broker.node_id, self.delivery, renew_ms=_RENEW_MS
                )
                self._ledger.start()

    async def stop_broker(self) -> None:
        """Stop the broker (a transport adapter calls it once its clients are closed)."""
        if self._broker_started:
            self._broker_started = False
            ledger, self._ledger = self._ledger, None
            if ledger is not None:
                await ledger.close()
            await self.broker.close()

    def _push_to(self, client_id: str, text: str) -> int:
        peers = tuple(self._clients.get(client_id, ()))
        return self._push_local(peers, self.sessions.of_client(client_id), text)

    def _push_local(
        self, clients: Iterable[Client], sessions: Iterable[DeliverySession], text: str
    ) -> int:
        """A push made here: v1 connections at once; v2 sessions at once too, unless the
        sessions are shared, when they get it through the store (:meth:`deliver`), counted
        here all the same."""
        if self._ledger is None:
            return self._push_all(clients, sessions, text)
        return self._push_v1(clients, text) + len({id(session) for session in sessions})

    def _push_v1(self, clients: Iterable[Client], text: str) -> int:
        """Push to each v1 connection among ``clients`` (a v2 one is reached by its session)."""
        return sum(self._push(c._conn, text) for c in clients if c._conn.live is None)

    async def _join(self, client_id: str, room: str) -> None:
        if self._rooms.join(check_room(room), client_id):
            await self.broker.joined(room, client_id)

    def _leave(self, client_id: str, room: str) -> None:
        if self._rooms.leave(check_room(room), client_id):
            self.broker.left(room, client_id)

    def _forget_rooms(self, client_id: str) -> None:
        """``client_id`` is gone from this process (no connection, no resumable v2 session):
        it leaves its rooms here."""
        if client_id in self._clients or self.sessions.of_client(client_id):
            return
        for room in self._rooms.leave_all(client_id):
            self.broker.left(room, client_id)

    def _push_all(
        self, clients: Iterable[Client], sessions: Iterable[DeliverySession], text: str
    ) -> int:
        """Push to each v1 connection, publish into each v2 session once (a session's live
        connection may have been replaced by a fresh session, and is then not in the store)."""
        queued = 0
        live: dict[int, _LiveSession] = {}
        for client in clients:
            conn = client._conn
            if conn.live is None:
                queued += self._push(conn, text)
            else:
                live[id(conn.live)] = conn.live
        for session in sessions:
            assert isinstance(session, _LiveSession)
            live[id(session)] = session
        return queued + sum(self._publish(session, text) for session in live.values())

    # ---- the garbage collector -----------------------------------------------------------

    def start_gc(self) -> None:
        """Apply :attr:`gc_policy` (a transport adapter calls it when it starts serving).

        Idempotent; :meth:`stop_gc` undoes it. The freezes run from one ``call_later`` handle,
        not a task.
        """
        policy = self.gc_policy
        if policy is None or self._gc_acquired:
            return
        self._gc_acquired = True
        _COLLECTOR.acquire(policy)
        self._closed_since_unfreeze = 0
        interval = policy.freeze_interval
        if interval is not None:
            self._gc_timer = asyncio.get_running_loop().call_later(interval, self._gc_tick)

    def stop_gc(self) -> None:
        """Stop managing the collector; the last server to stop restores it. Idempotent."""
        if self._gc_timer is not None:
            self._gc_timer.cancel()
            self._gc_timer = None
        if self._gc_acquired:
            self._gc_acquired = False
            assert self.gc_policy is not None
            _COLLECTOR.release(self.gc_policy)

    def _gc_tick(self) -> None:
        policy = self.gc_policy
        assert policy is not None
        step = gc_step(
            policy,
            open_connections=len(self._conns),
            opened_since_freeze=self._opened_since_freeze,
            closed_since_unfreeze=self._closed_since_unfreeze,
        )
        if step is GcStep.UNFREEZE:
            logger.debug("gc: unfreezing after %d connections closed", self._closed_since_unfreeze)
            gc.unfreeze()
            self._closed_since_unfreeze = 0
        elif step is GcStep.FREEZE:
            self._opened_since_freeze = 0
            # Collect the young generations first (bounded by their thresholds, a few ms), so
            # that recent cyclic garbage is reclaimed instead of frozen with the live objects.
            gc.collect(1)
            gc.freeze()
        interval = policy.freeze_interval
        assert interval is not None
        self._gc_timer = asyncio.get_running_loop().call_later(interval, self._gc_tick)

    # ---- shutdown -----------------------------------------------------------------------

    async def close_clients(self) -> None:
        """Close every connection, legacy ones included, with 1001 ``Server shutting down``.

        Connections that arrive afterwards get 1001 at once. Returns when every connection has
        ended and its ``on_disconnect`` hooks have run, at most the close timeout
        (``min(connection_timeout, 10 s)``) plus 1 s later: what is still running at the close
        timeout (a handler, a hook, a peer that does not answer) is cancelled and its socket
        aborted, and 0.5 s later cancelled once more. Called from a hook or handler, it does not
        wait for its own connection, which ends once that hook or handler returns.
        """
        self._stopping = True
        self._stop_expiry()
        loop = asyncio.get_running_loop()
        own = _CURRENT.get()
        for conn in tuple(self._conns):
            self._shutdown_conn(conn)

        def others() -> list[_Conn]:
            return [conn for conn in self._conns if conn is not own]

        if await self._wait_finished(others(), loop.time() + self.config.close_timeout):
            return
        # What is left runs past its bound: cancel the connection's body (handlers, reader,
        # writer); its on_disconnect hooks still run.
        for conn in others():
            if not _reschedule_now(conn.body_scope):
                _reschedule_now(conn.task_scope)
        if await self._wait_finished(others(), loop.time() + _FORCE_GRACE):
            return
        for conn in others():  # an on_disconnect hook that hangs
            _reschedule_now(conn.task_scope)
        if await self._wait_finished(others(), loop.time() + _FORCE_GRACE):
            return
        logger.warning("%d connection(s) ignored cancellation at shutdown", len(others()))

    @staticmethod
    async def _wait_finished(conns: list[_Conn], deadline: float) -> bool:
        try:
            async with asyncio.timeout_at(deadline):
                for conn in conns:
                    await conn.finished.wait()
        except TimeoutError:
            return False
        return True

    def _shutdown_conn(self, conn: _Conn) -> None:
        if conn.session is not None:
            conn.session.shutdown()
        self._request_close(conn, SHUTDOWN)

    # ---- carrying out actions (all synchronous: nothing here waits on a peer) -------------

    def _send_app(self, conn: _Conn, text: str) -> bool:
        """An application message to this connection's client: v1 pushed, v2 published."""
        if conn.live is None:
            return self._push(conn, text)
        return self._publish(conn.live, text)

    def _publish(self, session: _LiveSession, text: str) -> bool:
        """Number ``text`` in a v2 session, keep it in its history and write it to the
        connection carrying the session, if any. False when the session is gone (no longer
        in the store, and disconnected): nothing could ever deliver it."""
        target = session.conn
        if target is None and self.sessions.sessions.get(session.session_id) is not session:
            return False
        numbered = session.publish(text)
        if self._ledger is not None:  # written ahead: it goes out once the store holds it
            self._ledger.touch(session)
            return True
        self._write_numbered(session, numbered)
        return True

    def _write_numbered(self, session: _LiveSession, numbered: str) -> None:
        """Write a numbered message to the connection carrying ``session``, if any; a full
        outbox closes it (1013): the message stays in the history and the resume replays it."""
        target = session.conn
        if (
            target is not None
            and target.closing is None
            and not target.ended.is_set()
            and not self._push(target, numbered)
        ):
            # In the history, but not on its way: close rather than leave a silent gap; the
            # client resumes and gets the replay.
            logger.warning(
                "closing %s (session %s): its outbox is full; it resumes to catch up",
                target.link.remote_address,
                session.session_id[:6],
            )
            self._close_with(target, OUTBOX_OVERFLOW)

    def _send_control(self, session: _LiveSession, text: str) -> None:
        """A v2 control frame (an ack) to the connection carrying ``session``, if any; not kept
        (a lost ack is asked for again by the client's re-send)."""
        if session.conn is not None:
            self._push(session.conn, text)

    def _close_with(self, conn: _Conn, close: Close) -> None:
        """Close a ``/ws/client`` connection on the server's own initiative."""
        if conn.session is not None:
            conn.session.close(close.code, close.reason)
        self._request_close(conn, close)

    def _push(self, conn: _Conn, text: str, *, force: bool = False) -> bool:
        """Write ``text`` at once or queue it; ``force`` queues it past the outbox's limit (a
        v2 replay, whose texts the history holds anyway)."""
        if conn.closing is not None or conn.ended.is_set():
            return False
        direct = conn.direct
        if direct is not None and not conn.writing and not conn.outbox and direct.write_now(text):
            # Written in this step; nothing was waiting, so the order is kept.
            conn.refusing = False
            if direct.write_paused:  # over the transport's limit: the writer waits, bounded
                conn.stalled = True
                self._start_writer(conn)
                conn.wake.set()
            return True
        if conn.outbox.put(text) if force else conn.outbox.offer(text):
            conn.refusing = False
            self._start_writer(conn)
            conn.wake.set()
            return True
        self.refused_pushes += 1
        if not conn.refusing:  # one line per run of refusals, not one per push
            conn.refusing = True
            logger.warning(
                "push to %s refused: %d bytes already wait in its outbox (until it drains, "
                "further pushes to it are refused silently and counted)",
                conn.link.remote_address,
                conn.outbox.queued_bytes,
            )
        return False

    def _start_writer(self, conn: _Conn) -> None:
        """Start the connection's writer if it has none (it then runs until the end)."""
        if conn.writer is not None or conn.group is None or conn.ended.is_set():
            return  # before the body starts, _run_body starts it if there is work
        coro = self._write_loop(conn)
        try:
            conn.writer = conn.group.create_task(coro)
        except RuntimeError:  # the group is shutting down: the connection is ending anyway
            coro.close()

    def _arm_timer(self, conn: _Conn) -> None:
        """Schedule the session's next deadline: one ``call_at`` handle, no task."""
        session = conn.session
        deadline = None if session is None or conn.ended.is_set() else session.next_deadline()
        if deadline is None:
            conn.timer = None
            return
        conn.timer = asyncio.get_running_loop().call_at(deadline, self._on_timer, conn)

    def _on_timer(self, conn: _Conn) -> None:
        """The session's deadline: the ping (written at once when it can be) or the 1011."""
        conn.timer = None
        session = conn.session
        if session is None or conn.ended.is_set():
            return
        try:
            now = asyncio.get_running_loop().time()
            self._carry_out(conn, session.handle_timer(now=now, wall=self._wall_clock()))
        except Exception:
            # A bug (or a failing wall clock): never let the connection live without a heartbeat.
            logger.exception("heartbeat of %s failed; aborting it", conn.link.remote_address)
            self._abort(conn)
            return
        self._arm_timer(conn)

    def _carry_out(self, conn: _Conn, actions: list[Action]) -> None:
        """Carry out a session's SendText and Close actions (Deliver is the reader's)."""
        for action in actions:
            if isinstance(action, SendText):
                self._push(conn, action.text)
            elif isinstance(action, Close):
                self._request_close(conn, action)

    def _request_close(self, conn: _Conn, close: Close) -> None:
        """Start closing: the writer sends what is queued, then the close frame, all within the
        close timeout, after which the connection is aborted."""
        if conn.closing is not None or conn.ended.is_set():
            return
        conn.closing = close
        conn.link.close_record.server_closed(close.code, close.reason)
        conn.outbox.seal()
        deadline = asyncio.get_running_loop().time() + self.config.close_timeout
        conn.close_deadline = deadline
        scope = conn.send_scope
        if scope is not None:
            when = scope.when()
            if when is None or when > deadline:
                scope.reschedule(deadline)
        self._start_writer(conn)
        conn.wake.set()
        conn.space.set()
        conn.inbox_changed.set()

    def _abort(self, conn: _Conn) -> None:
        """Drop the connection now (a stalled send, a close that timed out)."""
        conn.link.close_record.lost()
        conn.link.abort()
        reader = conn.reader
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()  # a TaskGroup ignores a child cancelled from outside
        conn.mark_ended()

    async def _deliver(self, conn: _Conn, client: Client, action: Deliver) -> None:
        """Run the handler of one message; in v2 once per id, acked after it returned; answer
        a request with its result (docs/protocol.md, v2 points 3 and 8)."""
        session = conn.session
        assert session is not None
        live = conn.live if action.msg_id is not None else None
        if live is not None:
            while True:
                verdict, answer = session.check_id(action, wall=self._wall_clock())
                if verdict is not Inbound.BUSY:
                    break
                # A handler of this session, started on the connection this one replaced,
                # still runs: the next id waits for it (it may be this one's duplicate).
                await live.idle.wait()
            if answer is not None:
                if verdict is Inbound.DUPLICATE and self._ledger is not None:
                    # Acknowledge only what the store holds as handled; the rest is acked
                    # when the write holding it lands.
                    if live.wal.handled >= (action.msg_id or 0):
                        stamp = format_timestamp(self._wall_clock())
                        self._send_control(live, ack_text("id", live.wal.handled, stamp))
                    else:
                        self._ledger.touch(live)
                elif verdict is Inbound.DUPLICATE:
                    self._send_control(live, answer.text)
                else:
                    logger.info("%s: %s", client.client_id, verdict.value)
                    self._push(conn, answer.text)
            if verdict is not Inbound.DELIVER:
                return
            live.idle.clear()
        handler = self._handlers.get(action.type, self._default_handler)
        reply: str | None
        try:
            result = await handler(action.message, client)
        except Exception as exc:
            logger.exception("handler for %r failed (client %s)", action.type, client.client_id)
            wall = self._wall_clock()
            reply = session.reply_error(action, _describe_exception(exc), wall=wall)
        except BaseException:
            if live is not None:  # cancelled before it returned: not handled
                session.interrupted(action)
                live.idle.set()
            raise
        else:
            # One reading of the clock for what follows the handler (its reply and its ack).
            wall = self._wall_clock()
            try:
                reply = session.reply(action, result, wall=wall)
            except (TypeError, ValueError) as exc:
                logger.error(
                    "handler for %r returned a value JSON cannot encode (client %s): %s",
                    action.type,
                    client.client_id,
                    _describe_exception(exc),
                )
                problem = f"the handler's result is not JSON: {_describe_exception(exc)}"
                reply = session.reply_error(action, problem, wall=wall)
        if reply is not None:
            self._send_app(conn, reply)
        if live is not None:
            ack = session.handled(action, wall=wall)
            if self._ledger is not None:  # acknowledged once the store holds it
                self._ledger.touch(live)
            elif ack is not None:
                self._send_control(live, ack.text)
            elif session.ack_timer_wanted:
                self._arm_ack_timer(live)
            live.idle.set()

    # ---- v2 sessions: attach, detach, ack timers, expiry ----------------------------------

    def _attach(self, conn: _Conn, session: ServerSession) -> None:
        """A v2 connection opened on ``session.delivery``: it now carries the session. A
        connection still carrying it (its death not yet noticed) is closed first."""
        live = session.delivery
        assert isinstance(live, _LiveSession)
        old = live.conn
        if old is not None and old is not conn:
            logger.info(
                "session %s resumed from %s: closing its older connection from %s",
                live.session_id[:6],
                conn.link.remote_address,
                old.link.remote_address,
            )
            self._close_with(old, SESSION_RESUMED_ELSEWHERE)
            old.on_end = None  # it no longer carries the session
            self._cancel_ack_timer(live)
        live.conn = conn
        conn.live = live
        conn.on_end = lambda: self._detach(conn)

    def _detach(self, conn: _Conn) -> None:
        """The connection carrying a v2 session ended: the session stays resumable for the
        window (if it is still the store's), and the expiry timer is armed."""
        live = conn.live
        if live is None or live.conn is not conn:
            return
        live.conn = None
        self._cancel_ack_timer(live)
        if self.sessions.sessions.get(live.session_id) is live:
            self.sessions.disconnected(live, asyncio.get_running_loop().time() * 1000)
            self._arm_expiry()
            if self._ledger is not None:  # kept in the store for the window, from now
                self._ledger.touch(live)

    def _arm_ack_timer(self, live: _LiveSession) -> None:
        if live.conn is None:
            return  # the client re-sends what is unacknowledged, and gets the ack then
        self._cancel_ack_timer(live)
        delay = self.delivery.ack_interval_ms / 1000
        live.ack_timer = asyncio.get_running_loop().call_later(delay, self._on_ack_timer, live)
        live.ids.timer_armed = True

    def _cancel_ack_timer(self, live: _LiveSession) -> None:
        if live.ack_timer is not None:
            live.ack_timer.cancel()
            live.ack_timer = None
        live.ids.timer_armed = False

    def _on_ack_timer(self, live: _LiveSession) -> None:
        live.ack_timer = None
        conn = live.conn
        if conn is None or conn.session is None:
            live.ids.timer_armed = False
            return
        ack = conn.session.ack_due(wall=self._wall_clock())
        if ack is not None:
            self._send_control(live, ack.text)

    def _arm_expiry(self) -> None:
        """One ``call_later`` handle per server, due when the first disconnected session
        passes its window; not while the server stops."""
        if self._stopping or self._expiry_timer is not None:
            return
        due = self.sessions.next_expiry()
        if due is None:
            return
        loop = asyncio.get_running_loop()
        # The window is strict (expired once *more* than window_ms passed): 1 ms after it.
        delay = max(0.0, (due + 1) / 1000 - loop.time())
        self._expiry_timer = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expiry_timer = None
        gone = self.sessions.expire(asyncio.get_running_loop().time() * 1000)
        if gone:
            logger.debug("%d v2 session(s) expired after the window", len(gone))
        for session in gone:
            self._forget_rooms(session.client_id)
        self._arm_expiry()

    def _stop_expiry(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None

    async def _run_hooks(self, hooks: list[ConnectHook], client: Client, what: str) -> None:
        for hook in hooks:
            try:
                await hook(client)
            except Exception:
                logger.exception("%s hook %r failed (client %s)", what, hook, client.client_id)

    # ---- the pump -------------------------------------------------------------------------

    async def serve_client(
        self,
        link: Link,
        query: str,
        *,
        headers: Iterable[tuple[str, str]] = _NO_PAIRS,
        subprotocol: str | None = None,
    ) -> None:
        """Run one accepted ``/ws/client`` connection until it ends.

        Runs the :meth:`authenticate` hook (if any), sends the hello or the refusal, then runs
        the reader, the writer and the handlers, with the hooks around them. ``query`` is the
        raw query string (``ClientRoute.query``), ``headers`` the upgrade request's headers as
        ``(name, value)`` pairs, ``subprotocol`` the one the adapter accepted
        (:func:`~steadysocket.model.server_session.select_subprotocol`).
        """
        conn = _Conn(link, self.config, ServerSession(self.config))
        request = _Request(query, headers, subprotocol)
        await self._run_connection(conn, self._client_body(conn, request))

    async def serve_legacy(self, link: Link, client_id: str) -> None:
        """Run one accepted legacy ``/ws/{client_id}`` connection until it ends."""
        conn = _Conn(link, self.config, None)
        await self._run_connection(conn, self._legacy_body(conn, client_id))

    async def _run_connection(self, conn: _Conn, body: Coroutine[Any, Any, None]) -> None:
        token = _CURRENT.set(conn)
        self._conns.add(conn)
        self._opened_since_freeze += 1
        if callable(getattr(conn.link, "on_ping", None)):  # PingAware, without the costly check
            cast("PingAware", conn.link).on_ping(lambda: self._on_ping(conn))
        try:
            async with asyncio.timeout(None) as conn.task_scope:
                await body
        except TimeoutError:
            if conn.task_scope is None or not conn.task_scope.expired():
                raise
            logger.warning("%s still running at shutdown; cancelled", conn.link.remote_address)
            self._abort(conn)
        finally:
            conn.task_scope = None
            # Break the reference cycles through the connection (the transport's Ping listener
            # and the connection's Client hold it), so that a closed connection is freed by
            # reference counting at once instead of waiting for a (full) garbage collection.
            if callable(getattr(conn.link, "on_ping", None)):
                cast("PingAware", conn.link).on_ping(_no_ping_listener)
            conn.client = None
            conn.reader = None
            self._conns.discard(conn)
            self._closed_since_unfreeze += 1
            conn.finished.set()
            _CURRENT.reset(token)

    async def _run_body(self, conn: _Conn, reader: Coroutine[Any, Any, None]) -> None:
        """The reader and the writer in a TaskGroup, the dispatcher (if any) in this task."""
        try:
            async with asyncio.timeout(None) as conn.body_scope, asyncio.TaskGroup() as group:
                conn.group = group
                conn.reader = group.create_task(reader)
                if conn.direct is None or conn.outbox or conn.closing or conn.stalled:
                    self._start_writer(conn)
                if conn.client is not None:
                    await self._dispatch(conn, conn.client)
        except TimeoutError:
            if conn.body_scope is None or not conn.body_scope.expired():
                raise
            logger.warning("%s still running at shutdown; cancelled", conn.link.remote_address)
            self._abort(conn)
        finally:
            conn.body_scope = None
            conn.group = None
            conn.mark_ended()

    async def _authenticated(
        self, conn: _Conn, session: ServerSession, request: _Request
    ) -> tuple[list[Action], Client | None]:
        """The query checks, then the :meth:`authenticate` hook: ``([], client)`` when the hello
        may follow, else the refusal (4400/4401/1008, 4403, 4419, or 4500) and None."""
        hook = self._authenticate
        assert hook is not None
        refusal = session.check(request.raw_query)
        if refusal:
            return refusal, None
        client = Client(self, conn, session, request)
        try:
            async with asyncio.timeout(self.config.connection_timeout):
                request.identity = await hook(client)
        except AuthenticationFailed as exc:
            return session.refuse(exc.reason, expired=isinstance(exc, TokenExpired)), None
        except TimeoutError:
            logger.warning(
                "authenticate hook %r did not return within %g s (client %s)",
                hook,
                self.config.connection_timeout,
                client.client_id,
            )
            return session.fail_handshake(), None
        except Exception:
            logger.exception("authenticate hook %r failed (client %s)", hook, client.client_id)
            return session.fail_handshake(), None
        return [], client

    async def _client_body(self, conn: _Conn, request: _Request) -> None:
        loop = asyncio.get_running_loop()
        session, link = conn.session, conn.link
        assert session is not None
        client: Client | None = None
        actions: list[Action] = []
        if self._authenticate is not None:
            actions, client = await self._authenticated(conn, session, request)
        prepared: Prepared | None = None
        if self._ledger is not None and not actions:
            actions, prepared = await self._prepare_shared(session, request)
        try:
            if not actions and session.state is SessionState.NEW:
                actions = session.open(
                    request.raw_query,
                    now=loop.time(),
                    wall=self._wall_clock(),
                    request_id=self._request_id_factory(),
                    sessions=self.sessions,
                    new_session_id=_new_token(),
                )
        except Exception:
            logger.exception("handshake with %s failed", link.remote_address)
            actions = session.fail_handshake()
        if self._ledger is not None and session.delivery is not None:
            actions = await self._created(session, actions)
            live = session.delivery
            if session.state is SessionState.OPEN and isinstance(live, _LiveSession):
                # Written ahead: the replay holds only what the store has; the rest goes out
                # when the write holding it lands (Ledger's release).
                replay = [SendText(t) for o, t in live.history if live.wal.may_send(o)]
                actions = [*actions[:1], *replay]
        if session.delivery is not None:
            self._attach(conn, session)
        if self._stopping:
            session.shutdown()
            actions = [SHUTDOWN]
        # The hello, then (v2) the replay, queued past the outbox's limit: its texts stay in
        # the history until acknowledged anyway, and a refused one would close the connection.
        for action in actions:
            if isinstance(action, SendText):
                self._push(conn, action.text, force=True)
            elif isinstance(action, Close):
                self._request_close(conn, action)
        if conn.live is not None and self._ledger is not None:
            self._ledger.touch(conn.live)
            if prepared is not None:
                self._ledger.catch_up(prepared, session.resume_outcome)
        elif conn.live is not None and session.ack_timer_wanted:
            self._arm_ack_timer(conn.live)
        if session.state is not SessionState.OPEN:
            for action in actions:
                if isinstance(action, Close):
                    logger.info(
                        "refused %s: %d %s", link.remote_address, action.code, action.reason
                    )
            await self._run_body(conn, self._read_loop(conn))
            return
        if client is None:
            client = Client(self, conn, session, request)
        conn.client = client
        self._clients.setdefault(session.client_id, set()).add(client)
        self.broker.clients_changed()
        self._arm_timer(conn)
        if conn.live is None:
            logger.info(
                "client %s connected from %s (role %s)",
                client.client_id,
                link.remote_address,
                client.role,
            )
        else:
            logger.info(
                "client %s connected from %s (role %s, v2 session %s: %s, %d replayed)",
                client.client_id,
                link.remote_address,
                client.role,
                conn.live.session_id[:6],
                session.resume_outcome,
                len(actions) - 1,
            )
        try:
            await self._run_body(conn, self._read_loop(conn))
        finally:
            peers = self._clients.get(session.client_id)
            if peers is not None:
                peers.discard(client)
                if not peers:
                    del self._clients[session.client_id]
            self.broker.clients_changed()
            self._forget_rooms(session.client_id)
            logger.info("client %s disconnected: %s", client.client_id, _describe_close(link))
            await self._run_hooks(self._disconnect_hooks, client, "on_disconnect")

    async def _prepare_shared(
        self, session: ServerSession, request: _Request
    ) -> tuple[list[Action], Prepared | None]:
        """Shared sessions, before the hello: the query checks (unless the authenticate hook
        ran them), then a v2 resume's claim in the store (``runtime/session_ledger.py``).
        ``([], prepared)`` when the hello may follow, else the refusal: the query's, or 1013
        while the store cannot be reached (the client tries again)."""
        ledger = self._ledger
        assert ledger is not None
        if session.version == 0:  # not checked yet (no authenticate hook)
            refusal = session.check(request.raw_query)
            if refusal:
                return refusal, None
        if session.version != 2:
            return [], None
        epoch = ledger.epoch
        try:
            if epoch is None:
                raise BrokerUnavailable("the session store was never reached")
            self.sessions.epoch = epoch
            resume = session.resume_query
            timeout = self.config.connection_timeout
            async with asyncio.timeout(timeout):
                prepared = await ledger.prepare(
                    session.client_id, session.role, resume, within_ms=timeout * 1000
                )
            self.sessions.epoch = ledger.epoch or epoch  # a claim may have found a new one
        except (BrokerUnavailable, TimeoutError) as exc:
            logger.warning("v2 client %s refused for now: %s", session.client_id, exc)
            return session.fail_handshake(SESSION_STORE_UNAVAILABLE), None
        return [], prepared

    async def _created(self, session: ServerSession, actions: list[Action]) -> list[Action]:
        """Shared sessions: a new session is in the store before its hello goes out (so that
        it resumes on any process); 1013 if the store cannot take it in time."""
        ledger, live = self._ledger, session.delivery
        assert ledger is not None
        assert isinstance(live, _LiveSession)
        for peer in tuple(self._clients.get(live.client_id, ())):
            older = peer._conn.live
            if older is not None and self.sessions.sessions.get(older.session_id) is not older:
                self.lost(older, Written.FENCED)  # superseded: one session per client id
        if live.wal.created:
            return actions
        if not ledger.reachable:  # the writer is failing now: refuse at once, not at timeout
            self.sessions.discard(live)
            return session.fail_handshake(SESSION_STORE_UNAVAILABLE)
        try:
            async with asyncio.timeout(self.config.connection_timeout):
                if await ledger.created(live):
                    return actions
        except TimeoutError:
            pass
        logger.warning("v2 client %s refused for now: its session was not stored", live.client_id)
        self.sessions.discard(live)
        return session.fail_handshake(SESSION_STORE_UNAVAILABLE)

    # ---- shared sessions: what the ledger asks of the server (LedgerHost) ----------------

    def session_connected(self, session: LedgerSession) -> bool:
        """Whether a connection carries ``session`` now."""
        return isinstance(session, _LiveSession) and session.conn is not None

    def released(self, session: LedgerSession, released: Released) -> None:
        """A write of ``session`` landed: its numbered texts and its ack go out."""
        assert isinstance(session, _LiveSession)
        for numbered in released.texts:
            self._write_numbered(session, numbered)
        if released.ack is not None:
            self._send_control(
                session, ack_text("id", released.ack, format_timestamp(self._wall_clock()))
            )

    def lost(self, session: LedgerSession, written: Written) -> None:
        """``session`` is another process's now, or gone from the store: its connection here
        (if any) is closed, ``Session resumed elsewhere`` or 1013 (resume: ``resumed: false``)."""
        assert isinstance(session, _LiveSession)
        conn = session.conn
        if conn is None:
            return
        logger.info(
            "session %s %s: closing its connection from %s",
            session.session_id[:6],
            "was taken over by another process" if written is Written.FENCED else "is lost",
            conn.link.remote_address,
        )
        close = SESSION_RESUMED_ELSEWHERE if written is Written.FENCED else SESSION_LOST
        self._close_with(conn, close)
        conn.on_end = None  # it no longer carries the session
        self._cancel_ack_timer(session)
        session.conn = None

    async def rejoin(self, client_id: str, rooms: tuple[str, ...]) -> None:
        """A session moved here: its client is in ``rooms`` again (it was on its last process)."""
        for room in rooms:
            await self._join(client_id, room)

    def publish_into(self, session: LedgerSession, text: str) -> None:
        """Number ``text`` in ``session`` (written ahead, as every v2 message)."""
        assert isinstance(session, _LiveSession)
        self._publish(session, text)

    async def _legacy_body(self, conn: _Conn, client_id: str) -> None:
        link = conn.link
        conn.bucket = self.config.new_bucket(asyncio.get_running_loop().time())
        logger.info("legacy client %s connected from %s", client_id, link.remote_address)
        if self._stopping:
            self._request_close(conn, SHUTDOWN)
        try:
            await self._run_body(conn, self._legacy_read_loop(conn))
        finally:
            logger.info("legacy client %s disconnected: %s", client_id, _describe_close(link))

    def _on_ping(self, conn: _Conn) -> None:
        """A protocol Ping arrived (the transport answered it): meter it."""
        now = asyncio.get_running_loop().time()
        if conn.session is not None:
            self._carry_out(conn, conn.session.receive_control(now=now))
        elif conn.bucket is not None and not conn.bucket.take(now):
            self._request_close(conn, RATE_LIMITED)

    async def _read_loop(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        session, link = conn.session, conn.link
        assert session is not None
        try:
            while (data := await link.receive()) is not None:
                if isinstance(data, str):
                    actions = session.receive_text(data, now=loop.time(), wall=self._wall_clock())
                else:
                    actions = session.receive_bytes(data, now=loop.time(), wall=self._wall_clock())
                for action in actions:
                    if isinstance(action, Deliver):
                        await self._enqueue(conn, session, action)
                    else:
                        self._carry_out(conn, [action])
        finally:
            conn.mark_ended()

    async def _enqueue(self, conn: _Conn, session: ServerSession, action: Deliver) -> None:
        """Hand a message to the dispatcher; while its inbox is full, stop reading (held)."""
        if len(conn.inbox) >= _INBOX_LIMIT:
            loop = asyncio.get_running_loop()
            session.hold(now=loop.time())
            try:
                while len(conn.inbox) >= _INBOX_LIMIT and conn.closing is None:
                    if conn.ended.is_set():
                        return
                    conn.space.clear()
                    await conn.space.wait()
            finally:
                session.release(now=loop.time())
            if conn.closing is not None:
                return  # the connection is closing: nothing more is handled
        conn.inbox.append(action)
        conn.inbox_changed.set()

    async def _dispatch(self, conn: _Conn, client: Client) -> None:
        """``on_connect``, then every delivered message in order, until the connection ends."""
        await self._run_hooks(self._connect_hooks, client, "on_connect")
        while True:
            if conn.inbox and conn.live is not None and (conn.closing or conn.ended.is_set()):
                # v2: what this connection did not handle is re-sent on the resume (and on a
                # replaced connection it would race the one that resumed).
                conn.inbox.clear()
                conn.space.set()
            if conn.inbox:
                action = conn.inbox.pop(0)
                conn.space.set()
                await self._deliver(conn, client, action)
                continue
            if conn.ended.is_set():
                return
            conn.inbox_changed.clear()
            await conn.inbox_changed.wait()

    async def _legacy_read_loop(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        link = conn.link
        try:
            while (data := await link.receive()) is not None:
                if conn.closing is not None:
                    continue  # closing: read (and drop) until the handshake is over
                if conn.bucket is not None and not conn.bucket.take(loop.time()):
                    self._request_close(conn, RATE_LIMITED)
                    continue
                reply = legacy_reply(data, self.config.max_message_bytes)
                if isinstance(reply, SendText):
                    self._push(conn, reply.text)
                else:
                    self._request_close(conn, reply)
        finally:
            conn.mark_ended()

    async def _write_loop(self, conn: _Conn) -> None:
        """Send the outbox in order, then the close frame; all bounded. (Pings come from the
        session's timer, :meth:`_on_timer`, through the outbox or a direct write.)"""
        outbox = conn.outbox
        while not conn.ended.is_set():
            text = outbox.take()
            if text is not None:
                if not await self._send_bounded(conn, text):
                    return
                continue
            if conn.closing is not None:
                await self._close_bounded(conn, conn.closing)
                return
            if conn.stalled:
                conn.stalled = False
                if not await self._send_bounded(conn, None):
                    return
                continue
            conn.wake.clear()
            await conn.wake.wait()

    async def _send_bounded(self, conn: _Conn, text: str | None) -> bool:
        """Send ``text`` (None: wait for a direct write's buffer to drain) within the connection
        timeout (and the close deadline); past it the connection is aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connection_timeout
        if conn.close_deadline is not None:
            deadline = min(deadline, conn.close_deadline)
        scope = asyncio.timeout_at(deadline)
        conn.writing = True
        try:
            async with scope:
                conn.send_scope = scope
                if text is None:
                    assert conn.direct is not None
                    await conn.direct.drain()
                    return True
                return await conn.link.send(text)
        except TimeoutError:
            if not scope.expired():
                raise
            logger.warning(
                "%s did not take a frame within %.1f s; aborting its connection",
                conn.link.remote_address,
                self.config.connection_timeout,
            )
            self._abort(conn)
            return False
        finally:
            conn.send_scope = None
            conn.writing = False

    async def _close_bounded(self, conn: _Conn, close: Close) -> None:
        deadline = conn.close_deadline
        assert deadline is not None
        try:
            async with asyncio.timeout_at(deadline):
                await conn.link.close(close.code, close.reason)
                await conn.ended.wait()  # the reader sees the end of the handshake
        except TimeoutError:
            logger.info(
                "%s did not complete the closing handshake (%d); aborting",
                conn.link.remote_address,
                close.code,
            )
            self._abort(conn)


# --------------------------------------------------------------------------------------------
# The websockets server
# --------------------------------------------------------------------------------------------


def _tracking_connection_class(
    live: set[ServerConnection], admitted: set[ServerConnection]
) -> type[_TrackedConnection]:
    """A connection class that records itself in ``live`` from TCP accept to TCP close.

    websockets only tracks connections that completed the upgrade; a TCP connection that never
    sends its request would hold :meth:`SteadyServer.close` up for the whole open timeout.
    ``admitted`` holds those whose upgrade request passed admission, until TCP close; it is
    what the connection cap counts.
    """

    class _LiveConnection(_TrackedConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.close_record = CloseRecord()
            self.ping_listener = None
            live.add(self)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self)
            admitted.discard(self)
            super().connection_lost(exc)

    return _LiveConnection


def _is_upgrade(request: Request) -> bool:
    """Whether the request asks for a WebSocket (``Upgrade: websocket``, any case)."""
    return any(
        token.strip().lower() == "websocket"
        for value in request.headers.get_all("Upgrade")
        for token in value.split(",")
    )


class SteadyServer(Endpoints):
    """The ``/ws/client`` and legacy endpoints, served by websockets.

    Use it as ``async with SteadyServer(...) as server:``, or ``await server.start()`` and
    ``await server.close()``. The other arguments are those of :class:`Endpoints`.

    Args:
        host: interface to bind; ``127.0.0.1`` by default.
        port: TCP port; 0 picks a free one, readable from :attr:`port` after :meth:`start`.
        compression: ``"deflate"`` (permessage-deflate, the default) or ``None``.
        ssl: serve ``wss://`` with this server-side context (certificate loaded); ``None``
            serves plain ``ws://``.

    Raises:
        ConfigError: a setting or variable is malformed (a ``ValueError``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        compression: Literal["deflate"] | None = "deflate",
        ssl: SSLContext | None = None,
        reuse_port: bool = False,
        **options: Unpack[EndpointOptions],
    ) -> None:
        super().__init__(**options)
        self._reuse_port = reuse_port
        self.host = host
        self._requested_port = port
        self._compression = compression
        self._ssl = ssl
        self._ws_server: Server | None = None
        self._live: set[ServerConnection] = set()
        self._admitted: set[ServerConnection] = set()
        self._port: int | None = None
        self._closing = False

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start serving.

        Raises:
            OSError: the address cannot be bound (for instance, the port is in use).
            RuntimeError: the server was already started.
        """
        if self._ws_server is not None:
            raise RuntimeError("SteadyServer.start() called twice")
        # The broker first: a publication from another process must reach the first client.
        await self.start_broker()
        try:
            self._ws_server = await self._serve()
        except BaseException:
            await self.stop_broker()
            raise
        self._port = self._ws_server.sockets[0].getsockname()[1]
        self.start_gc()
        logger.info("listening on %s", self.url)

    async def _serve(self) -> Server:
        timeout = self.config.connection_timeout
        return await serve(
            self._handle,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            compression=self._compression,
            open_timeout=timeout,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=self.config.close_timeout,
            max_size=self.config.max_message_bytes,
            create_connection=_tracking_connection_class(self._live, self._admitted),
            ssl=self._ssl,
            select_subprotocol=self._select_subprotocol if self.subprotocols else None,
            reuse_port=self._reuse_port or None,
        )

    async def close(self) -> None:
        """Close every client with 1001 ``Server shutting down`` and stop; idempotent.

        Returns when every connection and every task of this server has finished, within the
        close timeout (``min(connection_timeout, 10 s)``) plus about 1.5 s, whatever the
        clients, hooks and handlers do: what still runs at the close timeout is cancelled and
        its socket aborted (see :meth:`Endpoints.close_clients`). Safe to call concurrently;
        called from one of this server's hooks or handlers, it returns once every *other*
        connection has ended, and the caller's own connection (already sent 1001) ends when
        its hook or handler returns.
        """
        server = self._ws_server
        if server is None:
            return
        if not self._closing:
            self._closing = True
            # Stop listening first, let connections accepted just now register, then drop the
            # ones still before their upgrade: they would otherwise hold shutdown up for the
            # whole open timeout. (websockets answers a request that arrives now with 503.)
            server.server.close()
            await asyncio.sleep(0)
            for connection in list(self._live):
                if connection.protocol.state is State.CONNECTING:
                    connection.transport.abort()
        await self.close_clients()
        self.stop_gc()  # every connection has ended: the collector is the process's again
        await self.stop_broker()
        if _CURRENT.get() is not None:
            return  # a hook or handler of ours: its own connection is still running
        server.close(close_connections=False)
        try:
            async with asyncio.timeout(_FORCE_GRACE):
                await server.wait_closed()
        except TimeoutError:
            for connection in list(self._live):
                connection.transport.abort()
            logger.warning("server on %s: connections aborted after shutdown", self.url)
            async with asyncio.timeout(_FORCE_GRACE):
                await server.wait_closed()
        logger.info("server on %s closed", self.url)

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished (from another task)."""
        if self._ws_server is not None:
            await self._ws_server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        """The bound port (the first socket's, if the host resolved to several).

        Raises:
            RuntimeError: the server is not started.
        """
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port`` (``wss://`` with TLS), the base URL clients dial."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "ws" if self._ssl is None else "wss"
        return f"{scheme}://{host}:{self.port}"

    # ---- connections --------------------------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if match_route(request.path) is None:
            return ws.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        if not _is_upgrade(request):
            response = ws.respond(http.HTTPStatus(UPGRADE_REQUIRED.status), UPGRADE_REQUIRED.body)
            response.headers["Upgrade"] = "websocket"
            return response
        # The check and the taking of the slot happen with no await in between.
        refusal = self.admission(request.headers.get_all("Origin"), len(self._admitted))
        if refusal is not None:
            logger.info(
                "refused %s: HTTP %d %s",
                _peer(ws),
                refusal.status,
                refusal.body.strip(),
            )
            return ws.respond(http.HTTPStatus(refusal.status), refusal.body)
        self._admitted.add(ws)
        return None

    def _select_subprotocol(
        self, ws: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        """The model's choice, never websockets' HTTP 400 for a client that offers none."""
        chosen = select_subprotocol(offered, self.subprotocols)
        return None if chosen is None else Subprotocol(chosen)

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake succeeded
        assert isinstance(ws, _TrackedConnection)
        route = match_route(ws.request.path)
        link = _WebSocketsLink(ws)
        try:
            if isinstance(route, ClientRoute):
                await self.serve_client(
                    link,
                    route.query,
                    # An iterator over websockets' own list, read (once) only if a hook asks:
                    # no copy per connection.
                    headers=ws.request.headers.raw_items(),
                    subprotocol=ws.subprotocol,
                )
            elif isinstance(route, LegacyRoute):
                # Protocol keepalive for this endpoint only: see the module docstring.
                ws.ping_interval = self.config.heartbeat_interval
                ws.ping_timeout = self.config.connection_timeout
                ws.start_keepalive()
                await self.serve_legacy(link, route.client_id)
        finally:
            if ws.protocol.state is not State.CLOSED:
                # Never hand websockets an open connection: its own close() is unbounded.
                ws.transport.abort()


async def serve_until_signalled(
    host: str,
    port: int,
    config: ServerConfig,
    *,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ssl: SSLContext | None = None,
    gc_policy: GcPolicy | None = DEFAULT_GC_POLICY,
    delivery: DeliveryConfig | None = None,
    broker: Broker | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until one of ``signals`` arrives, then shut down gracefully (1001 to every client).

    ``delivery`` is protocol v2's configuration and ``broker`` how it reaches other processes
    (see :class:`Endpoints`); ``reuse_port`` binds with ``SO_REUSEPORT``, so that several
    processes share the port (``steadysocket serve --workers N``).

    The handlers are installed before the socket is bound, so a signal sent as soon as the
    server says it is listening is never lost.

    Raises:
        OSError: the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    installed = list(signals)
    for sig in installed:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with SteadyServer(
            host,
            port,
            config=config,
            ssl=ssl,
            gc_policy=gc_policy,
            delivery=delivery,
            broker=broker,
            reuse_port=reuse_port,
        ):
            await stop.wait()
            logger.info("%s received, shutting down", received[0].name)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
