"""``WebSocketManager``: the client runtime, a thin adapter around ``ClientCore``.

Every lifecycle decision is the model's. The manager feeds ``ClientCore`` what happened and
carries out the effects it returns: open a socket, close one, arm or cancel a timer, send a ping,
flush or hand back the queue. Handlers are synchronous and asyncio runs one task at a time, so
an event and its effects are applied together with nothing in between.

Concurrency: the public coroutines (``connect``, ``disconnect``, ``force_reconnect``,
``destroy``) take one lock, so two calls never interleave their steps. Each runs to the end
before the next starts, in the order they were called; a state listener that schedules
``connect()`` while ``disconnect()`` runs gets its turn after the disconnect has finished.

Tasks: while the manager is in use, one supervisor task owns an ``asyncio.TaskGroup``; every
socket, timer and close runs in that group. ``disconnect()`` cancels them through the model's
effects, then stops the supervisor and waits for it, so no task or socket outlives it. A new
supervisor starts only after the old one has ended (the handoff in ``_ensure_supervisor``).

The message path does not touch the state machine. ``send()`` validates and encodes a message
once, and appends the text to a bounded buffer that one writer task per connection drains,
control frames (pongs, pings) first. A received frame costs a JSON decode, a few counter
updates and the listener calls.

Delivery (protocol v1, at most once): a message ``send()`` accepted ends in exactly one place:
written once to a socket (counted in ``messages_sent``), still queued, or handed back through
``on_returned`` / ``take_returned()``. A frame counts as written once the transport took it into
its buffer; if the connection then drops, it may be lost, and it is never sent again.

Delivery (protocol v2, ``version=2``, exactly once per session): a message ``send()`` accepted
stays in the model's outbox (``ClientDelivery``) until the server acknowledges it, and is
written again, with its id, after a resume; received messages are delivered in offset order,
once. When a resume is refused, ``on_resume`` listeners hear it and what was written but not
acknowledged is handed back with the reason "not acknowledged".
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from ssl import SSLContext
from types import TracebackType
from typing import Any, Self

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind, Failure, classify
from steadysocket.model.client import (
    NOT_ACKNOWLEDGED,
    NOT_SENT,
    ClientConfig,
    ClientCore,
    Offer,
    ResumeReport,
)
from steadysocket.model.delivery import DeliveryConfig, number
from steadysocket.model.effects import (
    CancelTimer,
    CloseSocket,
    Effect,
    FlushQueue,
    OpenSocket,
    ReturnQueue,
    SendPing,
    StartTimer,
    Timer,
)
from steadysocket.model.lifecycle import GRACEFUL_JITTER_MS
from steadysocket.model.server_session import DEFAULT_MAX_MESSAGE_BYTES
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.debuglog import enable_debug_logging
from steadysocket.runtime.fastws import open_fast_websocket
from steadysocket.runtime.transport import CLOSE_TIMEOUT_S as CLOSE_TIMEOUT_S
from steadysocket.runtime.transport import (
    AuthCallable,
    ConnectOptions,
    HeadersLike,
    Opener,
    OpenFailed,
    Transport,
    TransportClosed,
    failure_from_exception,
    open_attempt,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "ws://localhost:8000"
SEND_TIMEOUT_S = 10.0
"""How long one write may stay blocked by a peer that stopped reading: then it is dead."""
DEFAULT_SEND_BUFFER_BYTES = 4 * DEFAULT_MAX_MESSAGE_BYTES
"""Bytes ``send()`` accepts while open that may wait for the writer (``send_buffer_bytes``)."""
DEFAULT_STREAM_BUFFER = 1000
"""Messages one ``messages()`` stream holds for a slow consumer before it drops new ones."""

DEFAULT_REQUEST_TIMEOUT_S = 30.0
"""How long ``request()`` waits for the reply unless told otherwise."""

Sleep = Callable[[float], Awaitable[None]]
StateListener = Callable[[WSState], None]
MessageListener = Callable[[dict[str, Any]], None]
ErrorListener = Callable[["WSError | ServerError"], None]
ReturnListener = Callable[["Returned"], None]
ResumeListener = Callable[["ResumeEvent"], None]


class Returned(list[dict[str, Any]]):
    """Messages handed back to the application (a list), with the ``reason``:

    - ``"not sent"``: never written to any server;
    - ``"not acknowledged"`` (v2): written, but the session that could have acknowledged them
      is gone; the server may or may not have handled them.
    """

    def __init__(self, messages: list[dict[str, Any]], reason: str) -> None:
        super().__init__(messages)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ResumeEvent:
    """What ``on_resume`` listeners hear after each v2 reconnect: whether the session resumed.

    When ``resumed`` is False, the server's state for the old session is gone (``outcome``
    says why: ``wrong_epoch`` after a server restart, ``unknown_session`` after the window,
    ``trimmed`` when the history overflowed, ...): messages sent to the client in the gap are
    lost, and ``returned`` holds what the client had written and not seen acknowledged (also
    handed back through ``on_returned``). Resynchronise the application's state here.
    """

    resumed: bool
    outcome: str
    session_id: str
    replayed: int
    """Messages the server replays after this resume (0 when not resumed)."""
    returned: tuple[dict[str, Any], ...]


class WSError(Exception):
    """A failure the manager reports to ``on_error`` listeners (it is never raised at you).

    ``failure`` is what happened (``steadysocket.model.classify``), ``kind`` and ``retryable``
    its classification, ``phase`` the phase it happened in.
    """

    def __init__(self, failure: Failure, phase: Phase) -> None:
        classification = classify(failure)
        super().__init__(f"{failure.describe()} [{classification.kind}]")
        self.failure = failure
        self.kind = classification.kind
        self.retryable = classification.retryable
        self.phase = phase


class ServerError(Exception):
    """The server sent an ``error`` message (``error_code``, ``message``)."""

    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(f"{error_code}: {message}")
        self.error_code = error_code
        self.message = message


class RequestFailed(ConnectionError):
    """``request()`` got no reply and never will. ``reason`` says why: "refused" (``send()``
    would have returned False), "closed" (the manager went idle or into fallback before the
    reply), "not acknowledged" (v2: the session was not resumed), or "connection lost" (v1:
    written, then its connection dropped; it may or may not have been handled)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request failed: {reason}")
        self.reason = reason


class ManagerClosed(RuntimeError):
    """The manager was destroyed; create a new one."""


class SystemClock:
    """The real clocks: ``time.monotonic`` and UTC wall time."""

    # The builtin itself, not a method calling it: one Python frame less per received frame.
    monotonic = staticmethod(time.monotonic)

    def now(self) -> datetime:
        return datetime.now(UTC)


def _env_flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be true or false (or 1/0), got {raw!r}")


def _failure_of(exc: BaseException) -> CloseFailure | ErrorFailure:
    """How a connection ended, from what its transport raised.

    ``TransportClosed`` is the Transport contract; anything else (a custom transport's bug)
    ends the connection as a failure too, never the manager.
    """
    if isinstance(exc, TransportClosed):
        return exc.failure
    return ErrorFailure(ErrorKind.OTHER, f"{type(exc).__name__}: {exc}")


class MessageStream:
    """Received messages as an async iterator: ``async for message in manager.messages()``.

    It is subscribed from the moment ``messages()`` returns, so nothing that arrives before the
    first ``__anext__`` is missed, and until it ends or is no longer referenced (leaving an
    ``async for`` with ``break`` lets it go). It keeps going across automatic reconnects and
    ends (after yielding what it already holds) when the application calls ``disconnect()``
    or ``destroy()``, when the manager's ``async with`` exits, or on ``aclose()``.

    Its buffer holds ``maxsize`` messages. When a consumer falls that far behind, newer
    messages are not added to this stream: each one is counted in ``dropped`` and logged as a
    warning (``on_message`` listeners still see every message).
    """

    def __init__(self, manager: WebSocketManager, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self.dropped = 0
        """Messages this stream could not hold because its buffer was full."""
        self._buffer: deque[dict[str, Any]] = deque()
        self._waiters: list[asyncio.Future[None]] = []
        self._ended = False
        self._manager = manager
        # Held weakly: a stream left with ``break`` is collected and stops taking messages.
        self._ref = weakref.ref(self, manager._forget_stream)
        manager._streams.append(self._ref)

    @property
    def ended(self) -> bool:
        """True once the stream takes no more messages."""
        return self._ended

    def _put(self, message: dict[str, Any]) -> None:
        if self._ended:
            return
        if len(self._buffer) >= self.maxsize:
            self.dropped += 1
            logger.warning(
                "[WS] messages() buffer full (%d): dropped a message for this stream (%d so far)",
                self.maxsize,
                self.dropped,
            )
            return
        self._buffer.append(message)
        self._wake()

    def _end(self) -> None:
        self._ended = True
        self._manager._forget_stream(self._ref)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._buffer:
            if self._ended:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self._buffer.popleft()

    async def aclose(self) -> None:
        """Stop receiving; what is buffered is dropped and iteration ends."""
        self._buffer.clear()
        self._end()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class WebSocketManager:
    """Holds one connection to a steadysocket server through the declared lifecycle.

    ``base_url`` defaults to ``$WS_URL`` (else ``ws://localhost:8000``); a list of base URLs
    (servers of one cluster) is dialled in turn, the next after each failed attempt or lost
    connection (protocol v2 resumes the session on whichever serves it). ``client_id`` to a fresh
    UUID4. ``WEBSOCKET_ENABLED=false`` keeps the manager idle: ``connect()`` logs and returns.
    ``WS_DEBUG=1`` shows the ``steadysocket`` logger's debug lines on stderr, also in a program
    that set up no logging (``steadysocket.runtime.debuglog``). Explicit arguments win over the
    environment; a malformed value raises ``ValueError`` here.

    ``max_message_bytes`` is the largest encoded message ``send()`` accepts (the server's
    default limit); ``send_buffer_bytes`` bounds what ``send()`` accepts while open that the
    writer has not written yet (``send()`` returns False beyond it).

    ``version=2`` asks for protocol v2 (exactly once per session, see the module docstring);
    ``delivery`` sets its ack batching. ``send_queue_limit`` then bounds the messages not yet
    acknowledged. A server that refuses v2 (4400) gets one retry in v1, and the manager runs v1
    from then on (``WSState.protocol_version``).

    Connection options, used by every attempt: ``headers`` (extra HTTP headers of the upgrade
    request, a mapping or ``(name, value)`` pairs), ``subprotocols`` (offered in order of
    preference), ``ssl`` (the ``ssl.SSLContext`` for ``wss://`` URLs, for a private CA; by
    default the system's trusted certificates), and ``auth``, a callable, sync or async, called
    before **every** attempt for fresh credentials: a token (str) is sent as
    ``Authorization: Bearer <token>``, a mapping as headers (replacing ``headers`` of the same
    name), None adds nothing. So a token refused as expired (close 4419, retried) is replaced
    on the next attempt. An ``auth`` that raises or returns anything else fails that attempt
    (``ErrorKind.AUTH``: ``handshake``, retryable); one still running at the connection timeout
    is cancelled with its attempt (a connect timeout). A sync ``auth`` must not block the loop.

    ``clock``, ``sleep``, ``rng`` and ``opener`` are for tests: a virtual clock and sleep, a
    seeded ``random.Random``, and an in-memory transport. The defaults are the real ones. The
    ``opener`` gets the URL alone unless one of the connection options is set (then also those
    options as keywords: see ``steadysocket.runtime.transport.Opener``).

    Every coroutine may be called concurrently from any task; see the module docstring.
    """

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        client_id: str | None = None,
        *,
        connection_timeout_ms: float = 10_000,
        enable_heartbeat: bool = True,
        version: int = 1,
        role: str = "frontend",
        backoff_strategy: BackoffStrategy | None = None,
        fallback_probe_interval_ms: float | None = 60_000,
        send_queue_limit: int = 1000,
        stable_after_ms: float = 5_000,
        graceful_jitter_ms: float = GRACEFUL_JITTER_MS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        send_buffer_bytes: int = DEFAULT_SEND_BUFFER_BYTES,
        delivery: DeliveryConfig | None = None,
        headers: HeadersLike | None = None,
        subprotocols: Sequence[str] | None = None,
        ssl: SSLContext | None = None,
        auth: AuthCallable | None = None,
        enabled: bool | None = None,
        clock: SystemClock | Any | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        opener: Opener | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        if _env_flag(env, "WS_DEBUG", False):
            enable_debug_logging()
        if send_buffer_bytes < max_message_bytes:
            raise ValueError(
                f"send_buffer_bytes ({send_buffer_bytes}) must hold at least one message "
                f"of max_message_bytes ({max_message_bytes})"
            )
        self.enabled = enabled if enabled is not None else _env_flag(env, "WEBSOCKET_ENABLED", True)
        if base_url is None:
            base_url = env.get("WS_URL", DEFAULT_URL)
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        if not urls:
            raise ValueError("base_url: give at least one URL")
        config = ClientConfig(
            base_url=urls[0],
            alternate_urls=urls[1:],
            client_id=client_id if client_id is not None else str(uuid.uuid4()),
            version=version,
            role=role,
            connection_timeout_ms=connection_timeout_ms,
            enable_heartbeat=enable_heartbeat,
            fallback_probe_interval_ms=fallback_probe_interval_ms,
            stable_after_ms=stable_after_ms,
            graceful_jitter_ms=graceful_jitter_ms,
            send_queue_limit=send_queue_limit,
            max_message_bytes=max_message_bytes,
            delivery=delivery if delivery is not None else DeliveryConfig(),
        )
        backoff = backoff_strategy or BackoffStrategy.create_production_strategy(
            rng=rng if rng is not None else random.Random()
        )
        self._clock = clock if clock is not None else SystemClock()
        self._sleep: Sleep = sleep if sleep is not None else asyncio.sleep
        # The default is the fast transport (websockets' Sans-I/O protocol on a bare asyncio
        # Protocol), with open_websocket's failure semantics; opener=open_websocket takes
        # websockets' asyncio client instead.
        self._opener: Opener = opener if opener is not None else open_fast_websocket
        self._connect_options = ConnectOptions.build(
            headers=headers, subprotocols=subprotocols, ssl=ssl, auth=auth, urls=urls
        )
        """What every attempt adds: headers, subprotocols, TLS context, auth()."""
        self._core = ClientCore(config, self._clock, backoff)
        self._send_buffer_bytes = send_buffer_bytes

        # The lifetime: one lock for the public coroutines, one supervisor at a time.
        self._lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._children: set[asyncio.Task[Any]] = set()
        """Tasks cancelled when the supervisor stops (all but the bounded closes)."""

        self._timers: dict[Timer, asyncio.Task[None]] = {}
        self._socket_task: asyncio.Task[None] | None = None
        self._transport: Transport | None = None
        self._outgoing: deque[str] = deque()
        """Encoded messages accepted while open, not yet written."""
        self._outgoing_bytes = 0
        self._control: deque[str] = deque()
        """Pongs and pings for the current connection; the writer sends them first."""
        self._wake = asyncio.Event()
        self._returned: list[dict[str, Any]] = []
        self._destroyed = False
        self._last_phase = self._core.phase

        self._state_listeners: list[StateListener] = []
        self._message_listeners: list[MessageListener] = []
        self._message_tuple: tuple[MessageListener, ...] = ()
        """The listeners as the reader iterates them, rebuilt on (un)subscribe, not per frame."""
        self._error_listeners: list[ErrorListener] = []
        self._return_listeners: list[ReturnListener] = []
        self._resume_listeners: list[ResumeListener] = []
        self._requests: dict[int, asyncio.Future[Any]] = {}
        """Requests waiting for their reply, by id (v2: the message id, renumbered with it)."""
        self._v1_requests: dict[int, str] = {}
        """v1: the encoded text of each waiting request, to tell written from still queued."""
        self._next_request = 1
        self._ack_timer: asyncio.Task[None] | None = None
        """v2: the batched ack of received offsets, at most ``ack_interval_ms`` late."""
        self._phase_waiters: list[tuple[frozenset[Phase], asyncio.Future[Phase]]] = []
        self._streams: list[weakref.ref[MessageStream]] = []
        """Held weakly, so that a stream left with ``break`` is collected (and forgotten);
        a list, not a WeakSet, whose ``len()`` showed up per frame in the profile."""
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """The client id sent to the server."""
        return self._core.config.client_id

    @property
    def url(self) -> str:
        """The URL dialled."""
        return self._core.url

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._core.phase

    def get_state(self) -> WSState:
        """A fresh snapshot: phase, stats (uptime computed now), attempts, hello, fallback."""
        return self._core.snapshot()

    async def connect(self) -> None:
        """Start connecting (from ``idle`` or ``fallback``); returns once the attempt started.

        Use ``wait_for(Phase.OPEN)`` to wait for the handshake. Elsewhere a logged no-op.

        Raises:
            ManagerClosed: the manager was destroyed.
        """
        self._check_alive()
        if not self.enabled:
            logger.info("[WS] WEBSOCKET_ENABLED is false: staying idle")
            return
        self._bind_loop()
        async with self._lock:
            self._check_alive()
            await self._ensure_supervisor()
            self._apply(self._core.connect())

    async def disconnect(self) -> None:
        """Close 1000 "Client disconnect", cancel every timer and task, and go ``idle``.

        Queued messages are handed back (``on_returned`` / ``take_returned()``), and every
        ``messages()`` stream ends. When this returns, no task or socket of this manager is
        left, also when the peer never answers the close frame (it is aborted after
        ``CLOSE_TIMEOUT_S``) and when another call was running at the same time.
        """
        self._bind_loop()
        async with self._lock:
            await self._disconnect_locked()

    async def force_reconnect(self) -> None:
        """Drop the current socket and start a fresh attempt with the backoff reset.

        Raises:
            ManagerClosed: the manager was destroyed.
        """
        self._check_alive()
        if not self.enabled:
            logger.info("[WS] WEBSOCKET_ENABLED is false: staying idle")
            return
        self._bind_loop()
        async with self._lock:
            self._check_alive()
            await self._ensure_supervisor()
            self._apply(self._core.force_reconnect())
            # After the transition, not before: now connecting, so messages accepted while open
            # but not written yet are queued for the new connection rather than handed back
            # (PROTOCOL Client 10 hands back only what can no longer be sent).
            self._salvage_outgoing()

    async def destroy(self) -> None:
        """Disconnect and drop every listener; the manager cannot be used again.

        Calls of ``connect()`` or ``force_reconnect()`` waiting behind it raise
        ``ManagerClosed``, and so does a pending ``wait_for()``.
        """
        self._bind_loop()
        async with self._lock:
            self._destroyed = True
            self._fail_requests(lambda: ManagerClosed("the WebSocketManager was destroyed"))
            self._end_session()
            # All of this before the first await, so a cancelled destroy() still does it.
            self._state_listeners.clear()
            self._message_listeners.clear()
            self._message_tuple = ()
            self._error_listeners.clear()
            self._return_listeners.clear()
            for _, future in self._phase_waiters:
                if not future.done():
                    future.set_exception(ManagerClosed("the WebSocketManager was destroyed"))
            self._resume_listeners.clear()
            await self._stop_supervisor()

    def send(self, message: Mapping[str, Any]) -> bool:
        """Send a message (a JSON object); adds a ``timestamp`` if it has none.

        The message is validated and encoded here, once. Sent at once while ``open`` or
        ``degraded`` (unless ``send_buffer_bytes`` of earlier messages still wait for the
        writer); queued (bounded by ``send_queue_limit``) while ``connecting``,
        ``reconnecting`` or ``failed`` and flushed in order on the next open. Returns False
        when refused: in ``idle`` or ``fallback``, or with the queue or buffer full. A message
        that can no longer be sent is handed back, never dropped.

        Raises:
            TypeError: ``message`` is not a mapping, or holds a value JSON cannot encode.
            ValueError: a value is NaN or infinite, the structure is circular, or the encoded
                message is longer than ``max_message_bytes``.
        """
        text = self._core.prepare(message)
        return self._offer(text)

    def _offer(self, text: str) -> bool:
        if self._core.delivery is not None:
            decision = self._core.offer(text)
            if decision is Offer.SEND:
                self._wake.set()
            elif decision is not Offer.QUEUED:
                logger.info("[WS] send refused (%s) in phase %s", decision, self.phase)
            return decision is Offer.SEND or decision is Offer.QUEUED
        decision = self._core.offer(text)
        if decision is Offer.SEND:
            if self._outgoing_bytes + len(text) > self._send_buffer_bytes:
                logger.info("[WS] send refused: %d bytes wait for the writer", self._outgoing_bytes)
                return False
            self._outgoing.append(text)
            self._outgoing_bytes += len(text)
            self._wake.set()
            return True
        if decision is Offer.QUEUED:
            return True
        logger.info("[WS] send refused (%s) in phase %s", decision, self.phase)
        return False

    async def request(
        self,
        message: Mapping[str, Any],
        *,
        timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,  # noqa: ASYNC109 - PROTOCOL point 8
    ) -> Any:
        """Send ``message`` and return what the server's handler for it returned.

        The server answers ``{"type":"reply","id":N,"result":R}``, correlated by ``id``: in v1
        the manager adds ``id`` to the request (so the message may not carry one); in v2 every
        message has its id, and a handler that returned None is answered by the ack alone. The
        request is sent like ``send()`` sends: queued while reconnecting; in v2 re-sent after a
        resume and handled once. Safe to call concurrently, from any task.

        Raises:
            ServerError: the handler raised (``error_code`` ``HANDLER_ERROR``).
            TimeoutError: no reply within ``timeout`` seconds (None waits for ever). In v1 the
                request may or may not have been handled.
            RequestFailed: the request was refused (idle, fallback, queue full) or can no
                longer be answered (handed back, or in v1 its connection dropped after it
                was written).
            ManagerClosed: the manager was (or is) destroyed.
            TypeError, ValueError: as for ``send()``; a v1 request with an ``id`` field.
        """
        self._check_alive()
        self._bind_loop()
        core = self._core
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if core.delivery is None:
            if "id" in message:
                raise ValueError("request() numbers the message itself: remove the field id")
            request_id = self._next_request
            text = number(core.prepare(message), "id", request_id)
            if not self._offer(text):
                raise RequestFailed("refused")
            self._next_request += 1
            self._v1_requests[request_id] = text
        else:
            text = core.prepare(message)
            if not self._offer(text):
                raise RequestFailed("refused")
            request_id = core.delivery.outbox[-1].id
        self._requests[request_id] = future
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            for key, waiting in tuple(self._requests.items()):
                if waiting is future:
                    del self._requests[key]
                    self._v1_requests.pop(key, None)

    def ping(self) -> bool:
        """Send a client ``ping`` now (counted in ``heartbeats_sent``); False when not open."""
        if self.phase not in {Phase.OPEN, Phase.DEGRADED}:
            return False
        self._send_control(self._core.ping_text())
        self._core.heartbeats_sent += 1
        return True

    def take_returned(self) -> list[dict[str, Any]]:
        """Messages handed back while no ``on_returned`` listener was registered."""
        items, self._returned = self._returned, []
        return items

    def on_state_change(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(state)`` on every phase change; returns an unsubscribe callable."""
        return self._subscribe(self._state_listeners, listener)

    def on_message(self, listener: MessageListener) -> Callable[[], None]:
        """Call ``listener(message)`` for every message but hello, ping and pong."""
        unsubscribe = self._subscribe(self._message_listeners, listener)
        self._message_tuple = tuple(self._message_listeners)

        def unsubscribe_message() -> None:
            unsubscribe()
            self._message_tuple = tuple(self._message_listeners)

        return unsubscribe_message

    def on_error(self, listener: ErrorListener) -> Callable[[], None]:
        """Call ``listener(error)`` on every failed attempt and lost connection (a ``WSError``)
        and on every ``error`` message from the server (a ``ServerError``)."""
        return self._subscribe(self._error_listeners, listener)

    def on_returned(self, listener: ReturnListener) -> Callable[[], None]:
        """Call ``listener(messages)`` with messages that can no longer be sent (a
        :class:`Returned` list: its ``reason`` is "not sent" or, in v2, "not acknowledged")."""
        return self._subscribe(self._return_listeners, listener)

    def on_resume(self, listener: ResumeListener) -> Callable[[], None]:
        """v2: call ``listener(event)`` (a :class:`ResumeEvent`) after every reconnect that
        asked to resume its session, resumed or not; when ``event.resumed`` is False,
        messages may have been lost in the gap: resynchronise."""
        return self._subscribe(self._resume_listeners, listener)

    async def wait_for(self, *phases: Phase | str, timeout: float | None = None) -> Phase:  # noqa: ASYNC109
        """Wait until the phase is one of ``phases``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
            ManagerClosed: the manager was (or is) destroyed.
        """
        wanted = frozenset(Phase(p) for p in phases)
        if not wanted:
            raise ValueError("wait_for() needs at least one phase")
        self._check_alive()
        if self.phase in wanted:
            return self.phase
        future: asyncio.Future[Phase] = asyncio.get_running_loop().create_future()
        entry = (wanted, future)
        self._phase_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            if entry in self._phase_waiters:
                self._phase_waiters.remove(entry)

    def messages(self, *, maxsize: int = DEFAULT_STREAM_BUFFER) -> MessageStream:
        """Received messages (as ``on_message`` sees them) as an async iterator.

        Subscribed from this call on; see :class:`MessageStream` for its buffer and its end.
        """
        stream = MessageStream(self, maxsize)
        if self._destroyed:
            stream._end()
        return stream

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.destroy()

    # -- supervisor ----------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._destroyed:
            raise ManagerClosed("this WebSocketManager was destroyed; create a new one")

    def _bind_loop(self) -> None:
        """Use the running loop: a manager may move to a new loop (``asyncio.run`` twice) once
        it is not running on the old one.

        Raises:
            RuntimeError: the manager is still running on another, open, event loop.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            if not supervisor.get_loop().is_closed():
                raise RuntimeError(
                    "this WebSocketManager runs on another event loop; disconnect() it there first"
                )
            # The old loop closed under a running manager: what it held is gone with it.
            logger.warning("[WS] the event loop closed under a running manager; starting over")
            self._supervisor = self._group = None
            self._children.clear()
            self._timers.clear()
            self._apply(self._core.disconnect())
            self._salvage_outgoing()
            self._hand_back(self._core.take_queue())
        self._loop = loop
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()

    async def _disconnect_locked(self) -> None:
        self._end_session()
        await self._stop_supervisor()

    def _end_session(self) -> None:
        """The synchronous part of a disconnect: go idle, hand back, end the streams."""
        self._apply(self._core.disconnect())
        # Whatever the phase was, nothing accepted stays behind: unwritten and queued messages
        # go back to the application.
        self._salvage_outgoing()
        self._hand_back(self._core.take_queue())
        for ref in tuple(self._streams):
            stream = ref()
            if stream is not None:
                stream._end()
        self._streams.clear()

    async def _ensure_supervisor(self) -> None:
        """Start the supervisor unless one is running; called with the lock held."""
        old = self._supervisor
        if old is not None and not old.done() and not self._stop.is_set():
            return
        if old is not None:
            # The handoff: a supervisor told to stop (its disconnect() was cancelled while it
            # waited) finishes its bounded closes before a new one starts.
            await self._stop_supervisor()
        ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._supervisor = asyncio.create_task(
            self._supervise(ready, self._stop), name="steadysocket"
        )
        await ready.wait()

    async def _supervise(self, ready: asyncio.Event, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                ready.set()
                await stop.wait()
                self._group = None
                for task in tuple(self._children):
                    task.cancel()
        except Exception:
            # Unreachable by design (every child handles its own errors); never let it escape
            # into a public call as an ExceptionGroup.
            logger.exception("[WS] supervisor ended with an error")
        finally:
            self._group = None
            ready.set()

    async def _stop_supervisor(self) -> None:
        """Stop the supervisor and wait until every task it owns has ended (lock held)."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        self._stop.set()
        # Shielded: if this call is cancelled, the supervisor still finishes its bounded
        # closes, and the next _ensure_supervisor() waits for it.
        await asyncio.shield(supervisor)
        if self._supervisor is supervisor:
            self._supervisor = None

    def _spawn(
        self, job: Callable[[], Coroutine[Any, Any, None]], name: str, *, bounded: bool = False
    ) -> asyncio.Task[None] | None:
        """Run ``coro`` in the supervisor's group; ``bounded`` tasks (closes) are not cancelled
        when the supervisor stops, the rest are. An exception in one of them is logged and
        never ends the group (which would cancel every other task of the manager)."""
        group = self._group
        if group is None:
            logger.debug("[WS] no supervisor: %s not started", name)
            return None
        task = group.create_task(_guarded(job, name), name=name)
        if not bounded:
            self._children.add(task)
            task.add_done_callback(self._children.discard)
        return task

    # -- effects -------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case OpenSocket():
                    generation = self._core.generation
                    self._socket_task = self._spawn(
                        partial(self._socket_main, generation),
                        f"steadysocket-socket-{generation}",
                    )
                case CloseSocket(code=code, reason=reason):
                    self._drop_socket(code, reason)
                case StartTimer(timer=timer, delay_ms=delay, token=token):
                    self._cancel_timer(timer)
                    task = self._spawn(
                        partial(self._timer_main, timer, token or 0, (delay or 0.0) / 1000.0),
                        f"steadysocket-timer-{timer}",
                    )
                    if task is not None:
                        self._timers[timer] = task
                case CancelTimer(timer=timer):
                    self._cancel_timer(timer)
                case SendPing():
                    self._send_control(self._core.ping_text())
                case FlushQueue():
                    if self._core.delivery is not None:
                        self._wake.set()  # the writer starts on the outbox
                    for text in self._core.take_queue():
                        self._outgoing.append(text)
                        self._outgoing_bytes += len(text)
                    if self._outgoing:
                        self._wake.set()
                case ReturnQueue():
                    self._salvage_outgoing()
                    self._hand_back(self._core.take_queue())
        for reason, texts in self._core.take_returns():
            self._hand_back(texts, reason)
        report = self._core.take_resume_report()
        if report is not None:
            self._resumed(report)
        self._core.log.end_step()
        self._notify_phase()

    def _cancel_timer(self, timer: Timer) -> None:
        task = self._timers.pop(timer, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _drop_socket(self, code: int, reason: str) -> None:
        task, self._socket_task = self._socket_task, None
        transport, self._transport = self._transport, None
        self._control.clear()
        self._connection_gone()
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if transport is not None:
            self._close(transport, code, reason)

    def _close(self, transport: Transport, code: int, reason: str) -> None:
        closing = partial(self._close_transport, transport, code, reason)
        if self._spawn(closing, "steadysocket-close", bounded=True) is None:
            _abort(transport)

    async def _close_transport(self, transport: Transport, code: int, reason: str) -> None:
        """The closing handshake, bounded; then the connection is aborted whatever happened,
        so no socket outlives it even when the peer never answers or stopped reading."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await transport.close(code, reason)
        except Exception as exc:
            logger.debug("[WS] close did not complete cleanly: %r", exc)
        finally:
            _abort(transport)

    async def _timer_main(self, timer: Timer, token: int, delay_s: float) -> None:
        await self._sleep(delay_s)
        if self._timers.get(timer) is asyncio.current_task():
            del self._timers[timer]
        phase, before = self.phase, self._core.last_failure
        effects = self._core.timer_fired(timer, token)
        self._report_decided(phase, before)
        self._apply(effects)

    # -- the socket ----------------------------------------------------------------------

    async def _socket_main(self, generation: int) -> None:
        try:
            await self._socket(generation)
        except Exception as exc:
            # Unreachable by design (every path of _socket handles what it expects); whatever
            # escapes fails this connection or attempt, never the manager.
            logger.exception("[WS] socket #%d failed unexpectedly", generation)
            if generation != self._core.live_generation:
                return
            failure = ErrorFailure(ErrorKind.OTHER, f"{type(exc).__name__}: {exc}")
            self._report(failure)
            if self._transport is not None:
                self._release(self._transport, 1000, "Connection lost")
            if self.phase in {Phase.OPEN, Phase.DEGRADED}:
                self._apply(self._core.closed(generation, failure))
            else:
                self._apply(self._core.attempt_failed(generation, failure))
            self._salvage_outgoing()

    async def _socket(self, generation: int) -> None:
        try:
            # Awaited directly, no task in between: if this task is cancelled, the opener
            # sees the cancellation itself (websockets aborts a half-open handshake).
            transport = await open_attempt(self._opener, self.url, self._connect_options)
        except Exception as exc:
            # OpenFailed is the Opener contract; anything else is a failed attempt too.
            failure = exc.failure if isinstance(exc, OpenFailed) else failure_from_exception(exc)
            self._report(failure)
            self._apply(self._core.attempt_failed(generation, failure))
            return
        if generation != self._core.live_generation:
            self._close(transport, 1000, "Attempt abandoned")
            return
        self._transport = transport
        self._control.clear()
        try:
            first = await transport.recv()
        except asyncio.CancelledError:
            if _cancelling():
                raise
            self._attempt_failed(generation, transport, _failure_of(_spurious_cancel()))
            return
        except Exception as exc:
            self._attempt_failed(generation, transport, _failure_of(exc))
            return
        if isinstance(first, bytes):
            failure = ErrorFailure(ErrorKind.INVALID_HELLO, "first frame was binary")
            self._attempt_failed(generation, transport, failure)
            return
        phase, before = self.phase, self._core.last_failure
        effects = self._core.hello_received(generation, first)
        self._report_decided(phase, before)
        self._apply(effects)
        if generation != self._core.live_generation:
            self._release(transport, 1000, "Attempt abandoned")
            return
        try:
            async with asyncio.TaskGroup() as connection:
                connection.create_task(
                    _transport_io(self._write(transport)), name="steadysocket-writer"
                )
                await _transport_io(self._read(transport))
        except* Exception as group:
            failure = _failure_of(group.exceptions[0])
            self._report(failure)
            # Harmless if the peer already closed it; frees it if only our send gave up.
            self._release(transport, 1000, "Connection lost")
            self._apply(self._core.closed(generation, failure))
            # After the transition: when the client retries (failed, reconnecting) the unsent
            # messages join the queue for the next connection; after a close 1000 (idle) they
            # are handed back; entering fallback already handed them back (ReturnQueue).
            self._salvage_outgoing()

    def _attempt_failed(self, generation: int, transport: Transport, failure: Failure) -> None:
        self._report(failure)
        self._release(transport, 1000, "Attempt failed")
        self._apply(self._core.attempt_failed(generation, failure))

    def _release(self, transport: Transport, code: int, reason: str) -> None:
        """Close ``transport`` once, unless a CloseSocket effect already took it."""
        if self._transport is transport:
            self._transport = None
            self._socket_task = None
            self._control.clear()
            self._connection_gone()
            self._close(transport, code, reason)

    def _connection_gone(self) -> None:
        """The connection ended: its ack timer stops, and a v1 request written on it can no
        longer be answered (one still queued or unwritten goes out on the next connection)."""
        timer, self._ack_timer = self._ack_timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        if not self._v1_requests:
            return
        queue, outgoing = self._core.queue, self._outgoing
        for request_id, text in tuple(self._v1_requests.items()):
            if text not in queue and text not in outgoing:
                del self._v1_requests[request_id]
                future = self._requests.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(RequestFailed("connection lost"))

    async def _read(self, transport: Transport) -> None:
        core = self._core
        v2 = core.delivery is not None
        receive = core.received_v2_fast if v2 else core.received_fast
        end_step = core.log.end_step  # a run of repeated log lines ends with a frame without it
        deliver = self._deliver
        while True:
            frame = await transport.recv()
            if isinstance(frame, bytes):
                binary_effects = core.received_binary(len(frame))
                if binary_effects:
                    self._apply(binary_effects)
                continue
            received = receive(frame)
            end_step()
            if isinstance(received, dict):  # the hot path: an application message, nothing else
                if v2 and self._ack_timer is None:
                    self._arm_ack_timer()
                deliver(received)
                continue
            if received.reply is not None:
                self._send_control(received.reply)
            if received.effects:
                self._apply(received.effects)
            if v2:
                if received.violation is not None:
                    raise TransportClosed(
                        ErrorFailure(ErrorKind.OTHER, f"protocol v2: {received.violation}")
                    )
                if received.acked is not None:
                    self._acked(received.acked)
                if self._ack_timer is None:
                    self._arm_ack_timer()
            message = received.message
            if message is not None:
                self._deliver(message)

    def _deliver(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "error":
            self._emit_error(
                ServerError(
                    str(message.get("error_code", "error")), str(message.get("message", ""))
                )
            )
        elif kind == "reply" and self._requests and self._answer(message):
            return
        for listener in self._message_tuple:
            try:
                listener(message)
            except (Exception, asyncio.CancelledError):
                logger.exception("[WS] message listener raised")
        if self._streams:
            self._to_streams(message)

    def _answer(self, reply: dict[str, Any]) -> bool:
        """Settle the request a ``reply`` answers; False if none waits for it (a request that
        timed out, or an application message of type "reply": the listeners get it)."""
        request_id = reply.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            return False
        future = self._requests.pop(request_id, None)
        if future is None:
            return False
        self._v1_requests.pop(request_id, None)
        if future.done():
            return True
        error = reply.get("error")
        if isinstance(error, Mapping):
            code, text = error.get("error_code", "error"), error.get("message", "")
            future.set_exception(ServerError(str(code), str(text)))
        else:
            future.set_result(reply.get("result"))
        return True

    def _acked(self, upto: int) -> None:
        """v2: the server acknowledged every id up to ``upto``: a request among them that got
        no reply has its answer, None (its handler returned None)."""
        for request_id in [key for key in self._requests if key <= upto]:
            future = self._requests.pop(request_id)
            if not future.done():
                future.set_result(None)

    def _arm_ack_timer(self) -> None:
        """v2: start the batched ack's timer if one is owed and none runs."""
        delay = self._core.ack_timer_wanted()
        if delay is not None:
            self._ack_timer = self._spawn(
                partial(self._ack_main, delay / 1000.0), "steadysocket-ack"
            )

    async def _ack_main(self, delay_s: float) -> None:
        await self._sleep(delay_s)
        self._ack_timer = None
        text = self._core.ack_due()
        if text is not None:
            self._send_control(text)

    def _resumed(self, report: ResumeReport) -> None:
        """A v2 hello that asked to resume: requests follow their messages (renumbered into
        a new session, or failed with them), then ``on_resume`` listeners hear it."""
        delivery = self._core.delivery
        if not report.resumed and self._requests and delivery is not None:
            requests, self._requests = self._requests, {}
            for old_id, future in requests.items():
                new_id = delivery.renumbered.get(old_id)
                if new_id is not None:
                    self._requests[new_id] = future
                elif not future.done():
                    future.set_exception(RequestFailed(NOT_ACKNOWLEDGED))
        event = ResumeEvent(
            resumed=report.resumed,
            outcome=str(report.outcome),
            session_id=report.session_id,
            replayed=report.replayed,
            returned=tuple(json.loads(text) for text in report.returned),
        )
        for listener in tuple(self._resume_listeners):
            try:
                listener(event)
            except (Exception, asyncio.CancelledError):
                logger.exception("[WS] resume listener raised")

    def _fail_requests(self, error: Callable[[], BaseException]) -> None:
        requests, self._requests = self._requests, {}
        self._v1_requests.clear()
        for future in requests.values():
            if not future.done():
                future.set_exception(error())

    def _to_streams(self, message: dict[str, Any]) -> None:
        # A method of its own: a loop variable in the reader's frame would keep the last
        # stream alive after its consumer let it go.
        for ref in tuple(self._streams):
            stream = ref()
            if stream is not None:
                stream._put(message)

    def _forget_stream(self, ref: weakref.ref[MessageStream]) -> None:
        if ref in self._streams:
            self._streams.remove(ref)

    async def _write(self, transport: Transport) -> None:
        """Write control frames, then data, in order; any error ends the connection.

        A data frame leaves the buffer when its ``send()`` begins and counts as written then
        (the transport takes it before suspending); only a frame the transport refused
        unwritten goes back to the front. So a frame is never both re-queued and counted.
        """
        wake = self._wake
        outgoing = self._outgoing
        control = self._control
        core = self._core
        delivery = core.delivery
        loop = asyncio.get_running_loop()
        while True:
            await wake.wait()
            wake.clear()
            # One stall deadline per batch, pushed forward at most once a second rather than
            # per frame: a peer that stops reading is still caught within SEND_TIMEOUT_S + 1 s.
            deadline = asyncio.timeout_at(loop.time() + SEND_TIMEOUT_S)
            try:
                async with deadline:
                    while (
                        control
                        or outgoing
                        or (delivery is not None and delivery.written < len(delivery.outbox))
                    ):
                        now = loop.time()
                        if now + SEND_TIMEOUT_S - (deadline.when() or now) > 1.0:
                            deadline.reschedule(now + SEND_TIMEOUT_S)
                        if control:
                            # Counted like data: messages_sent and messages_received both
                            # count every frame, pings, pongs and acks included.
                            core.messages_sent += 1
                            await transport.send(control.popleft())
                            continue
                        if delivery is not None:
                            # v2: the message stays in the outbox until acknowledged; a
                            # refused write is written again on the next connection.
                            pending = delivery.next_to_write()
                            if pending is not None:
                                core.messages_sent += 1
                                core.data_sent += 1
                                await transport.send(pending.text)
                            continue
                        text = outgoing.popleft()
                        self._outgoing_bytes -= len(text)
                        # Written from here on (at most once), even while the send waits for
                        # the peer to read: the ledger never sees it in two places or none.
                        core.messages_sent += 1
                        core.data_sent += 1
                        try:
                            await transport.send(text)
                        except TransportClosed as exc:
                            if not exc.written:  # refused before anything was written
                                core.messages_sent -= 1
                                core.data_sent -= 1
                                outgoing.appendleft(text)
                                self._outgoing_bytes += len(text)
                            raise
            except TimeoutError:
                if not deadline.expired():
                    raise
                # A peer that stops reading stalls the sender: a dead peer.
                raise TransportClosed(
                    ErrorFailure(
                        ErrorKind.HEARTBEAT_TIMEOUT, f"send blocked for {SEND_TIMEOUT_S:g} s"
                    )
                ) from None

    def _send_control(self, text: str) -> None:
        """Pongs and pings jump the data queue: they are about the connection, not the data."""
        if self._transport is None:
            return
        self._control.append(text)
        self._wake.set()

    def _salvage_outgoing(self) -> None:
        if not self._outgoing:
            return
        unsent = list(self._outgoing)
        self._outgoing.clear()
        self._outgoing_bytes = 0
        self._hand_back(self._core.requeue(unsent))

    def _hand_back(self, texts: list[str], reason: str = NOT_SENT) -> None:
        if not texts:
            return
        logger.info("[WS] handing %d message(s) back to the application (%s)", len(texts), reason)
        # Decoded from the text that would have been sent: the message as the server would
        # have seen it, timestamp included.
        messages: list[dict[str, Any]] = [json.loads(text) for text in texts]
        if self._v1_requests:
            self._fail_handed_back(texts)
        if not self._return_listeners:
            self._returned.extend(messages)
            return
        for listener in tuple(self._return_listeners):
            try:
                listener(Returned(messages, reason))
            except (Exception, asyncio.CancelledError):
                logger.exception("[WS] returned-message listener raised")

    def _fail_handed_back(self, texts: list[str]) -> None:
        handed = set(texts)
        for request_id, text in tuple(self._v1_requests.items()):
            if text in handed:
                del self._v1_requests[request_id]
                future = self._requests.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(RequestFailed("closed"))

    # -- listeners -----------------------------------------------------------------------

    @staticmethod
    def _subscribe(listeners: list[Any], listener: Any) -> Callable[[], None]:
        listeners.append(listener)

        def unsubscribe() -> None:
            if listener in listeners:
                listeners.remove(listener)

        return unsubscribe

    def _report(self, failure: Failure) -> None:
        self._emit_error(WSError(failure, self.phase))

    def _report_decided(self, phase: Phase, before: Failure | None) -> None:
        """Report a failure the core decided on while handling an event (an invalid hello, a
        version mismatch, a connect timeout, a dead peer).

        The socket paths call _report() for what they see on the wire, but these failures
        only show up as ``last_failure`` changing, and on_error promises every failed attempt
        and lost connection. Reported before the effects apply, like the socket paths do.
        """
        failure = self._core.last_failure
        if failure is not None and failure is not before:
            self._emit_error(WSError(failure, phase))

    def _emit_error(self, error: WSError | ServerError) -> None:
        for listener in tuple(self._error_listeners):
            try:
                listener(error)
            except (Exception, asyncio.CancelledError):
                logger.exception("[WS] error listener raised")

    def _notify_phase(self) -> None:
        phase = self._core.phase
        if phase is self._last_phase:
            return
        self._last_phase = phase
        if self._requests and phase in (Phase.IDLE, Phase.FALLBACK):
            self._fail_requests(lambda: RequestFailed("closed"))
        if self._state_listeners:
            state = self._core.snapshot()
            for listener in tuple(self._state_listeners):
                try:
                    listener(state)
                except (Exception, asyncio.CancelledError):
                    logger.exception("[WS] state listener raised")
        for wanted, future in tuple(self._phase_waiters):
            if phase in wanted and not future.done():
                future.set_result(phase)


async def _guarded(job: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
    # The coroutine is made here, not by the caller: a task cancelled before it started never
    # runs this body, and there is then no coroutine left unawaited.
    try:
        await job()
    except Exception:
        logger.exception("[WS] task %s failed", name)


def _cancelling() -> bool:
    """Whether the current task was asked to stop (as opposed to a stray CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _transport_io(io: Coroutine[Any, Any, None]) -> None:
    """Run the reader or the writer; a CancelledError nobody asked for (raised by a transport)
    ends the connection as a failure instead of silently ending the loop."""
    try:
        await io
    except asyncio.CancelledError:
        if _cancelling():
            raise
        raise _spurious_cancel() from None


def _spurious_cancel() -> TransportClosed:
    """A transport raised CancelledError that nobody asked for: the connection is broken."""
    return TransportClosed(ErrorFailure(ErrorKind.OTHER, "the transport raised CancelledError"))


def _abort(transport: Transport) -> None:
    try:
        transport.abort()
    except Exception as exc:
        logger.debug("[WS] abort failed: %r", exc)
