"""``WebSocketManager``: the client runtime, a thin adapter around ``ClientCore``.

Every lifecycle decision is the model's. The manager feeds ``ClientCore`` what happened and
carries out the effects it returns: open a socket, close one, arm or cancel a timer, send a ping,
flush or hand back the queue. Handlers are synchronous and asyncio runs one task at a time, so
an event and its effects are applied together with nothing in between: no locks, no inbox.

Tasks: ``connect()`` starts one supervisor task that owns an ``asyncio.TaskGroup``; every
socket, timer and close runs in that group. ``disconnect()`` cancels them through the model's
effects and then ends the group, so no task or socket outlives it.

The message path does not touch the state machine: a received frame costs a JSON decode, a few
counter updates and the listener calls; ``send()`` appends to a deque that one writer task per
connection drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.classify import ErrorFailure, ErrorKind, Failure, classify
from steadysocket.model.client import ClientConfig, ClientCore, Offer
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
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.transport import (
    Opener,
    OpenFailed,
    Transport,
    TransportClosed,
    failure_from_exception,
)
from steadysocket.runtime.transport import open_websocket as _open_websocket

logger = logging.getLogger(__name__)

DEFAULT_URL = "ws://localhost:8000"
CLOSE_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 10.0

Sleep = Callable[[float], Awaitable[None]]
StateListener = Callable[[WSState], None]
MessageListener = Callable[[dict[str, Any]], None]
ErrorListener = Callable[["WSError | ServerError"], None]
ReturnListener = Callable[[list[dict[str, Any]]], None]


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


class ManagerClosed(RuntimeError):
    """The manager was destroyed; create a new one."""


class SystemClock:
    """The real clocks: ``time.monotonic`` and UTC wall time."""

    def monotonic(self) -> float:
        return time.monotonic()

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


class WebSocketManager:
    """Holds one connection to a steadysocket server through the declared lifecycle.

    ``base_url`` defaults to ``$WS_URL`` (else ``ws://localhost:8000``); ``client_id`` to a fresh
    UUID4. ``WEBSOCKET_ENABLED=false`` keeps the manager idle: ``connect()`` logs and returns.
    ``WS_DEBUG=1`` sets the ``steadysocket`` logger to DEBUG. Explicit arguments win over the
    environment; a malformed value raises ``ValueError`` here.

    ``clock``, ``sleep``, ``rng`` and ``opener`` are for tests: a virtual clock and sleep, a
    seeded ``random.Random``, and an in-memory transport. The defaults are the real ones.
    """

    def __init__(
        self,
        base_url: str | None = None,
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
        enabled: bool | None = None,
        clock: SystemClock | Any | None = None,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        opener: Opener | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        if _env_flag(env, "WS_DEBUG", False):
            logging.getLogger("steadysocket").setLevel(logging.DEBUG)
        self.enabled = enabled if enabled is not None else _env_flag(env, "WEBSOCKET_ENABLED", True)
        config = ClientConfig(
            base_url=base_url if base_url is not None else env.get("WS_URL", DEFAULT_URL),
            client_id=client_id if client_id is not None else str(uuid.uuid4()),
            version=version,
            role=role,
            connection_timeout_ms=connection_timeout_ms,
            enable_heartbeat=enable_heartbeat,
            fallback_probe_interval_ms=fallback_probe_interval_ms,
            stable_after_ms=stable_after_ms,
            send_queue_limit=send_queue_limit,
        )
        backoff = backoff_strategy or BackoffStrategy.create_production_strategy(
            rng=rng if rng is not None else random.Random()
        )
        self._clock = clock if clock is not None else SystemClock()
        self._sleep: Sleep = sleep if sleep is not None else asyncio.sleep
        self._opener: Opener = opener if opener is not None else _open_websocket
        self._core = ClientCore(config, self._clock, backoff)

        self._supervisor: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._stop: asyncio.Event | None = None
        self._timers: dict[Timer, asyncio.Task[None]] = {}
        self._socket_task: asyncio.Task[None] | None = None
        self._transport: Transport | None = None
        self._outgoing: deque[dict[str, Any]] = deque()
        self._outgoing_ready: asyncio.Event | None = None
        self._returned: list[dict[str, Any]] = []
        self._destroyed = False
        self._last_phase = self._core.phase

        self._state_listeners: list[StateListener] = []
        self._message_listeners: list[MessageListener] = []
        self._error_listeners: list[ErrorListener] = []
        self._return_listeners: list[ReturnListener] = []
        self._phase_waiters: list[tuple[frozenset[Phase], asyncio.Future[Phase]]] = []

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
        """
        self._check_alive()
        if not self.enabled:
            logger.info("[WS] WEBSOCKET_ENABLED is false: staying idle")
            return
        await self._ensure_supervisor()
        self._apply(self._core.connect())

    async def disconnect(self) -> None:
        """Close 1000 "Client disconnect", cancel every timer and task, and go ``idle``.

        Queued messages are handed back (``on_returned`` / ``take_returned()``). When this
        returns, no task or socket of this manager is left.
        """
        self._apply(self._core.disconnect())
        await self._stop_supervisor()

    async def force_reconnect(self) -> None:
        """Drop the current socket and start a fresh attempt with the backoff reset."""
        self._check_alive()
        if not self.enabled:
            logger.info("[WS] WEBSOCKET_ENABLED is false: staying idle")
            return
        await self._ensure_supervisor()
        self._apply(self._core.force_reconnect())
        # After the transition, not before: now connecting, so messages accepted while open but
        # not written yet are queued for the new connection rather than handed back (PROTOCOL
        # Client 10 hands back only what can no longer be sent: disconnect() or fallback).
        self._salvage_outgoing()

    async def destroy(self) -> None:
        """Disconnect and drop every listener; the manager cannot be used again."""
        await self.disconnect()
        self._destroyed = True
        self._state_listeners.clear()
        self._message_listeners.clear()
        self._error_listeners.clear()
        self._return_listeners.clear()

    def send(self, message: Mapping[str, Any]) -> bool:
        """Send a message (a JSON object); adds a ``timestamp`` if it has none.

        Sent at once while ``open`` or ``degraded``; queued (bounded by ``send_queue_limit``)
        while ``connecting``, ``reconnecting`` or ``failed`` and flushed in order on the next
        open. Returns False when refused: in ``idle`` or ``fallback``, or with the queue full.
        A queued message that can no longer be sent is handed back, never dropped.
        """
        stamped = self._core.stamp(message)
        decision = self._core.offer(stamped)
        if decision is Offer.SEND:
            self._outgoing.append(stamped)
            if self._outgoing_ready is not None:
                self._outgoing_ready.set()
            return True
        if decision is Offer.QUEUED:
            return True
        logger.info("[WS] send refused (%s) in phase %s", decision, self.phase)
        return False

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
        return self._subscribe(self._message_listeners, listener)

    def on_error(self, listener: ErrorListener) -> Callable[[], None]:
        """Call ``listener(error)`` on every failed attempt and lost connection (a ``WSError``)
        and on every ``error`` message from the server (a ``ServerError``)."""
        return self._subscribe(self._error_listeners, listener)

    def on_returned(self, listener: ReturnListener) -> Callable[[], None]:
        """Call ``listener(messages)`` with queued messages that can no longer be sent."""
        return self._subscribe(self._return_listeners, listener)

    async def wait_for(self, *phases: Phase | str, timeout: float | None = None) -> Phase:  # noqa: ASYNC109
        """Wait until the phase is one of ``phases``; raises ``TimeoutError`` after ``timeout``."""
        wanted = frozenset(Phase(p) for p in phases)
        if not wanted:
            raise ValueError("wait_for() needs at least one phase")
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

    async def messages(self) -> AsyncGenerator[dict[str, Any], None]:
        """Iterate over received messages (as ``on_message`` sees them) until the loop breaks."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        unsubscribe = self.on_message(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

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

    async def _ensure_supervisor(self) -> None:
        if self._supervisor is not None and not self._supervisor.done():
            return
        ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._outgoing_ready = asyncio.Event()
        self._supervisor = asyncio.create_task(self._supervise(ready), name="steadysocket")
        await ready.wait()

    async def _supervise(self, ready: asyncio.Event) -> None:
        assert self._stop is not None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                ready.set()
                await self._stop.wait()
        finally:
            self._group = None

    async def _stop_supervisor(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        assert self._stop is not None
        self._stop.set()
        await supervisor

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        assert self._group is not None, "effects applied without a running supervisor"
        return self._group.create_task(coro, name=name)

    # -- effects -------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case OpenSocket():
                    generation = self._core.generation
                    self._socket_task = self._spawn(
                        self._socket_main(generation), f"steadysocket-socket-{generation}"
                    )
                case CloseSocket(code=code, reason=reason):
                    self._drop_socket(code, reason)
                case StartTimer(timer=timer, delay_ms=delay, token=token):
                    self._cancel_timer(timer)
                    assert token is not None
                    assert delay is not None
                    self._timers[timer] = self._spawn(
                        self._timer_main(timer, token, delay / 1000.0),
                        f"steadysocket-timer-{timer}",
                    )
                case CancelTimer(timer=timer):
                    self._cancel_timer(timer)
                case SendPing():
                    self._send_control(self._core.ping_text())
                case FlushQueue():
                    self._outgoing.extend(self._core.take_queue())
                    if self._outgoing and self._outgoing_ready is not None:
                        self._outgoing_ready.set()
                case ReturnQueue():
                    self._salvage_outgoing()
                    self._hand_back(self._core.take_queue())
        self._notify_phase()

    def _cancel_timer(self, timer: Timer) -> None:
        task = self._timers.pop(timer, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _drop_socket(self, code: int, reason: str) -> None:
        task, self._socket_task = self._socket_task, None
        transport, self._transport = self._transport, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if transport is not None:
            self._spawn(self._close_transport(transport, code, reason), "steadysocket-close")

    async def _close_transport(self, transport: Transport, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await transport.close(code, reason)
        except (TimeoutError, OSError, TransportClosed) as exc:
            logger.debug("[WS] close did not complete cleanly: %r", exc)

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
            transport = await self._opener(self.url)
        except Exception as exc:
            # OpenFailed is the Opener contract. Anything else (a custom opener's bug, an error
            # nobody mapped) used to end the supervisor's TaskGroup: the manager stayed in
            # connecting with no timer, and disconnect() raised. It is a failed attempt too.
            failure = exc.failure if isinstance(exc, OpenFailed) else failure_from_exception(exc)
            self._report(failure)
            self._apply(self._core.attempt_failed(generation, failure))
            return
        if generation != self._core.live_generation:
            await self._close_transport(transport, 1000, "Attempt abandoned")
            return
        self._transport = transport
        try:
            first = await transport.recv()
        except TransportClosed as exc:
            self._report(exc.failure)
            self._forget(transport)
            self._apply(self._core.attempt_failed(generation, exc.failure))
            return
        if isinstance(first, bytes):
            failure = ErrorFailure(ErrorKind.INVALID_HELLO, "first frame was binary")
            self._report(failure)
            self._apply(self._core.attempt_failed(generation, failure))
            return
        phase, before = self.phase, self._core.last_failure
        effects = self._core.hello_received(generation, first)
        self._report_decided(phase, before)
        self._apply(effects)
        if generation != self._core.live_generation:
            return
        try:
            async with asyncio.TaskGroup() as connection:
                connection.create_task(self._writer(transport))
                await self._reader(transport)
        except* Exception as group:
            # TransportClosed is the Transport contract; anything else from a custom transport
            # ends the connection as a failure too, rather than the supervisor's TaskGroup.
            error = group.exceptions[0]
            closed = (
                error
                if isinstance(error, TransportClosed)
                else TransportClosed(
                    ErrorFailure(ErrorKind.OTHER, f"{type(error).__name__}: {error}")
                )
            )
            self._report(closed.failure)
            self._forget(transport)
            # Harmless if the peer already closed it; frees it if only our send gave up.
            self._spawn(
                self._close_transport(transport, 1000, "Connection lost"), "steadysocket-close"
            )
            self._apply(self._core.closed(generation, closed.failure))
            # After the transition: when the client retries (failed, reconnecting) the unsent
            # messages join the queue for the next connection; after a close 1000 (idle) they
            # are handed back; entering fallback already handed them back (ReturnQueue).
            self._salvage_outgoing()

    def _forget(self, transport: Transport) -> None:
        if self._transport is transport:
            self._transport = None
            self._socket_task = None

    async def _reader(self, transport: Transport) -> None:
        core = self._core
        while True:
            frame = await transport.recv()
            if isinstance(frame, bytes):
                binary_effects = core.received_binary(len(frame))
                if binary_effects:
                    self._apply(binary_effects)
                continue
            received = core.received(frame)
            if received.reply is not None:
                self._send_control(received.reply)
            if received.effects:
                self._apply(received.effects)
            message = received.message
            if message is not None:
                if message.get("type") == "error":
                    self._emit_error(
                        ServerError(str(message.get("error_code")), str(message.get("message")))
                    )
                for listener in tuple(self._message_listeners):
                    try:
                        listener(message)
                    except Exception:
                        logger.exception("[WS] message listener raised")

    async def _writer(self, transport: Transport) -> None:
        ready = self._outgoing_ready
        assert ready is not None
        outgoing = self._outgoing
        core = self._core
        loop = asyncio.get_running_loop()
        while True:
            await ready.wait()
            # One timeout scope per batch, pushed forward before each send: entering a new
            # asyncio.timeout() per message cost several µs in the client benchmark.
            async with asyncio.timeout(None) as deadline:
                while outgoing:
                    message = outgoing.popleft()
                    deadline.reschedule(loop.time() + SEND_TIMEOUT_S)
                    try:
                        await transport.send(core.encode(message))
                    except BaseException:
                        # Not sent: back to the front, for the next connection or the app.
                        outgoing.appendleft(message)
                        if deadline.expired():
                            # A peer that stops reading stalls the sender: a dead peer.
                            raise TransportClosed(
                                ErrorFailure(
                                    ErrorKind.HEARTBEAT_TIMEOUT,
                                    f"send blocked for {SEND_TIMEOUT_S:g} s",
                                )
                            ) from None
                        raise
                    core.messages_sent += 1
            ready.clear()

    def _send_control(self, text: str) -> None:
        """Pongs and pings jump the queue: they are about the connection, not the data."""
        transport = self._transport
        if transport is None:
            return
        self._spawn(self._send_text(transport, text), "steadysocket-control")

    async def _send_text(self, transport: Transport, text: str) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await transport.send(text)
        except (TransportClosed, TimeoutError, OSError) as exc:
            logger.debug("[WS] control frame not sent: %r", exc)

    def _salvage_outgoing(self) -> None:
        if not self._outgoing:
            return
        unsent = list(self._outgoing)
        self._outgoing.clear()
        self._hand_back(self._core.requeue(unsent))

    def _hand_back(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return
        logger.info("[WS] handing %d unsent message(s) back to the application", len(messages))
        if not self._return_listeners:
            self._returned.extend(messages)
            return
        for listener in tuple(self._return_listeners):
            try:
                listener(list(messages))
            except Exception:
                logger.exception("[WS] returned-message listener raised")

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
            except Exception:
                logger.exception("[WS] error listener raised")

    def _notify_phase(self) -> None:
        phase = self._core.phase
        if phase is self._last_phase:
            return
        self._last_phase = phase
        if self._state_listeners:
            state = self._core.snapshot()
            for listener in tuple(self._state_listeners):
                try:
                    listener(state)
                except Exception:
                    logger.exception("[WS] state listener raised")
        for wanted, future in tuple(self._phase_waiters):
            if phase in wanted and not future.done():
                future.set_result(phase)
