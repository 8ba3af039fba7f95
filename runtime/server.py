"""The steadysocket server: a pump around the model's ServerSession, served by websockets.

Every protocol decision (routes, query checks, hello, ping schedule, dead-client rule, replies)
is made by :class:`steadysocket.model.server_session.ServerSession`. This module carries out its
actions over a connection, runs the application's hooks, and owns the tasks. It has two layers:

- :class:`Endpoints`: the application-facing half (handlers, hooks, connected clients,
  ``send_to``/``broadcast``) and the per-connection pump, written against :class:`Link`, a
  small protocol any WebSocket transport can implement. An ASGI adapter subclasses it too.
- :class:`SteadyServer`: ``Endpoints`` on websockets' asyncio server, with routing, HTTP 404,
  the open timeout, the size limit and graceful shutdown.

Tasks: websockets creates one handler task per connection; inside it, an
:class:`asyncio.TaskGroup` runs a reader and a heartbeat task for ``/ws/client``. Broadcasts run
their sends in a TaskGroup too. Nothing else is started, so after :meth:`SteadyServer.close`
nothing is left running.

Endpoints:

- ``/ws/client?client_id=…&version=1&role=frontend``: the upgrade is always accepted first, so a
  refusal reaches any client as a close frame (4400, 4401, 1008, 4500);
- ``/ws/{client_id}``: the legacy plain-text echo (``Echo: <text>``), no hello;
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
than its rate limit with 4429 ``Rate limit exceeded``. ``ssl=`` serves ``wss://``.

Slow readers: every send is bounded by the connection timeout. A client whose send does not
complete in time has stopped reading; its connection is aborted (a close frame could not reach
it anyway) and it ends like any lost connection.
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from ssl import SSLContext
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypedDict, TypeVar, Unpack

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from steadysocket.model.protocol import CloseCode, MessageType
from steadysocket.model.server_session import (
    RATE_LIMITED,
    SHUTDOWN,
    UNSUPPORTED_LEGACY_DATA,
    Action,
    ClientRoute,
    Close,
    Deliver,
    HttpRefusal,
    LegacyRoute,
    SendText,
    ServerConfig,
    ServerSession,
    SessionState,
    admit,
    encode_server_message,
    legacy_echo,
    match_route,
)

__all__ = [
    "Client",
    "ConnectHook",
    "DisconnectHook",
    "Endpoints",
    "Link",
    "MessageHandler",
    "SteadyServer",
    "echo_handler",
    "serve_until_signalled",
]

logger = logging.getLogger(__name__)

MessageHandler = Callable[[dict[str, Any], "Client"], Awaitable[None]]
"""``async def handler(message, client)``: one application message and the client it came from."""

ConnectHook = Callable[["Client"], Awaitable[None]]
"""``async def hook(client)``: after the hello was sent, before the first message is read."""

DisconnectHook = Callable[["Client"], Awaitable[None]]
"""``async def hook(client)``: after the connection ended; ``client.close_code`` tells how."""

_H = TypeVar("_H", bound=MessageHandler)
_C = TypeVar("_C", bound=ConnectHook)

_RESERVED_TYPES = frozenset({MessageType.PING, MessageType.PONG, MessageType.STATUS})
_MAX_CLOSE_TIMEOUT = 10.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _new_request_id() -> str:
    return str(uuid.uuid4())


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _describe_close(link: Link) -> str:
    code, reason = link.close_code, link.close_reason
    if code is None or code == CloseCode.ABNORMAL:
        return "1006 (no close frame)"
    return f"{code} {reason}" if reason else str(code)


# --------------------------------------------------------------------------------------------
# What the pump needs from a transport
# --------------------------------------------------------------------------------------------


class Link(Protocol):
    """One accepted WebSocket connection, as :class:`Endpoints` drives it.

    A transport adapter implements this once (websockets here, ASGI elsewhere). None of the
    methods raises because the connection is closed; they report it instead.
    """

    @property
    def remote_address(self) -> str:
        """``host:port`` of the peer, for logs."""
        ...

    @property
    def close_code(self) -> int | None:
        """The close code once closed (1006 when no close frame was exchanged), else None."""
        ...

    @property
    def close_reason(self) -> str | None:
        """The close reason once closed, else None."""
        ...

    async def receive(self) -> str | bytes | None:
        """The next frame (``str`` for text, ``bytes`` for binary), or None once closed."""
        ...

    async def send(self, text: str) -> bool:
        """Send a text frame; False if the connection is closed. The caller bounds the time."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Run the closing handshake with ``code`` and ``reason``; idempotent."""
        ...

    async def wait_closed(self) -> None:
        """Return once the connection is closed."""
        ...

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake."""
        ...


class _WebSocketsLink:
    """:class:`Link` over a websockets ``ServerConnection``."""

    __slots__ = ("ws",)

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    @property
    def remote_address(self) -> str:
        return _peer(self.ws)

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self.ws.close_reason

    async def receive(self) -> str | bytes | None:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            return None

    async def send(self, text: str) -> bool:
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            return False
        return True

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)

    async def wait_closed(self) -> None:
        await self.ws.wait_closed()

    def abort(self) -> None:
        self.ws.transport.abort()


# --------------------------------------------------------------------------------------------
# The application's view of a client
# --------------------------------------------------------------------------------------------


class Client:
    """One connected ``/ws/client`` peer, as hooks and handlers see it.

    Several connections may share a ``client_id`` (two browser tabs); each is its own
    :class:`Client`.
    """

    __slots__ = ("_endpoints", "_link", "_reader", "_session")

    def __init__(self, endpoints: Endpoints, link: Link, session: ServerSession) -> None:
        self._endpoints = endpoints
        self._link = link
        self._session = session
        self._reader: asyncio.Task[None] | None = None

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
    def remote_address(self) -> str:
        """``host:port`` of the peer."""
        return self._link.remote_address

    @property
    def close_code(self) -> int | None:
        """The close code once the connection has ended (1006 when no close frame arrived)."""
        return self._link.close_code

    @property
    def close_reason(self) -> str | None:
        """The close reason once the connection has ended."""
        return self._link.close_reason

    async def send(self, message: Mapping[str, Any]) -> bool:
        """Send an application message; a ``timestamp`` is added if it has none.

        Returns whether it was sent: ``False`` when the connection is closed, or was aborted
        because the client stopped reading.

        Raises:
            ValueError: the message has no string ``type``, or holds NaN or a cycle.
            TypeError: the message holds something that is not JSON.
        """
        text = encode_server_message(message, self._endpoints._wall_clock())
        return await self._endpoints._send(self._link, text)

    async def echo(self, message: Mapping[str, Any]) -> bool:
        """Send the default handler's ``echo`` of ``message`` back."""
        action = self._session.echo(message, wall=self._endpoints._wall_clock())
        return await self._endpoints._send(self._link, action.text)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close this connection with ``code`` and ``reason`` (cut to 123 bytes).

        Raises:
            ValueError: a server may not send ``code``.
        """
        await self._endpoints._perform(self, self._session.close(code, reason))

    def __repr__(self) -> str:
        return f"<Client {self.client_id!r} {self.role} {self.remote_address}>"


async def echo_handler(message: dict[str, Any], client: Client) -> None:
    """The default handler: ``{"type":"echo","original_message",...}`` back to the sender."""
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
    environ: Mapping[str, str] | None
    default_handler: MessageHandler
    request_id_factory: Callable[[], str]
    wall_clock: Callable[[], datetime]


class Endpoints:
    """Handlers, hooks, connected clients, server push, and the pump for each connection.

    A transport adapter accepts a connection, wraps it in a :class:`Link`, looks the request
    target up with :func:`~steadysocket.model.server_session.match_route`, and awaits
    :meth:`serve_client` or :meth:`serve_legacy` until the connection ends.

    Configuration: pass ``config``, or any of ``heartbeat_interval_ms``,
    ``connection_timeout_ms``, ``max_message_bytes``, ``allowed_origins``, ``max_connections``,
    ``rate_limit_messages``, ``rate_limit_window_ms`` (see
    :class:`~steadysocket.model.server_session.ServerConfig`); what is not given comes from
    ``WS_HEARTBEAT_INTERVAL_MS`` / ``WS_CONNECTION_TIMEOUT_MS``, then the defaults. The origin
    check and the connection cap happen before the upgrade, so they are the transport adapter's
    to carry out (:meth:`admission`); the rate limit is the session's.

    Args:
        config: complete settings; not combinable with the three individual settings.
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
        self._clients: dict[str, set[Client]] = {}
        self._legacy: set[Link] = set()

    # ---- registration -------------------------------------------------------------------

    def on_message(self, message_type: str) -> Callable[[_H], _H]:
        """Register the handler for one application ``type``; use as a decorator.

        ``@server.on_message("chat")`` above ``async def chat(message, client): ...``. A
        handler runs inside its connection's reader, so messages of one connection are handled
        in order; a slow handler slows that connection only. An exception is logged and the
        connection stays open.

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
        """Register a hook run for each accepted ``/ws/client`` connection; a decorator."""
        self._connect_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: _C) -> _C:
        """Register a hook run when an accepted ``/ws/client`` connection ends; a decorator."""
        self._disconnect_hooks.append(hook)
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
        """Send ``message`` to every connection of ``client_id``; returns how many got it.

        A ``timestamp`` is added if the message has none.

        Raises:
            ValueError, TypeError: the message cannot be encoded (see :meth:`Client.send`).
        """
        text = encode_server_message(message, self._wall_clock())
        return await self._send_all(tuple(self._clients.get(client_id, ())), text)

    async def broadcast(self, message: Mapping[str, Any]) -> int:
        """Send ``message`` to every connected ``/ws/client`` peer; returns how many got it.

        Sends run concurrently, each bounded by the connection timeout, so one slow reader
        does not hold up the others.

        Raises:
            ValueError, TypeError: the message cannot be encoded (see :meth:`Client.send`).
        """
        text = encode_server_message(message, self._wall_clock())
        return await self._send_all(self.clients, text)

    async def close_clients(self) -> None:
        """Close every connection, legacy ones included, with 1001 ``Server shutting down``.

        For adapters whose transport has no shutdown of its own; :class:`SteadyServer` lets
        websockets do it, which also covers connections still in their handshake.
        """
        async with asyncio.TaskGroup() as group:
            for client in self.clients:
                group.create_task(self._perform(client, client._session.shutdown()))
            for link in tuple(self._legacy):
                group.create_task(link.close(SHUTDOWN.code, SHUTDOWN.reason))

    async def _send_all(self, clients: Iterable[Client], text: str) -> int:
        targets = list(clients)
        if len(targets) == 1:
            return int(await self._send(targets[0]._link, text))
        async with asyncio.TaskGroup() as group:
            sends = [group.create_task(self._send(client._link, text)) for client in targets]
        return sum(task.result() for task in sends)

    # ---- carrying out actions -------------------------------------------------------------

    async def _send(self, link: Link, text: str) -> bool:
        try:
            async with asyncio.timeout(self.config.connection_timeout):
                return await link.send(text)
        except TimeoutError:
            logger.warning("%s stopped reading; aborting its connection", link.remote_address)
            link.abort()
            return False

    async def _perform(self, client: Client, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendText):
                await self._send(client._link, action.text)
            elif isinstance(action, Close):
                if asyncio.current_task() is client._reader:
                    await self._close_from_reader(client._link, action)
                else:
                    await client._link.close(action.code, action.reason)
            else:
                await self._deliver(client, action)

    @staticmethod
    async def _close_from_reader(link: Link, action: Close) -> None:
        """Close ``link`` from the one task that reads it (a reply, a handler, the legacy echo).

        Bug fixed here: websockets stops reading the socket while its queue of unread frames is
        full (flow control), so the peer's answering close frame waits behind those frames. A
        close awaited by the only reader therefore sat out the whole close timeout (10 s) for
        any client that had sent a burst, a rate-limited one above all. Reading, and dropping,
        frames until the closing handshake is over lets the close frame through.
        """

        async def drain() -> None:
            while await link.receive() is not None:
                pass

        async with asyncio.TaskGroup() as group:
            drainer = group.create_task(drain())
            await link.close(action.code, action.reason)
            drainer.cancel()

    async def _deliver(self, client: Client, action: Deliver) -> None:
        handler = self._handlers.get(action.type, self._default_handler)
        try:
            await handler(action.message, client)
        except Exception:
            logger.exception("handler for %r failed (client %s)", action.type, client.client_id)

    async def _run_hooks(self, hooks: list[ConnectHook], client: Client, what: str) -> None:
        for hook in hooks:
            try:
                await hook(client)
            except Exception:
                logger.exception("%s hook %r failed (client %s)", what, hook, client.client_id)

    # ---- the pump -------------------------------------------------------------------------

    async def serve_client(self, link: Link, query: str) -> None:
        """Run one accepted ``/ws/client`` connection until it ends.

        Sends the hello or the refusal, then runs the reader and the heartbeat in a TaskGroup,
        with the hooks around them. ``query`` is the raw query string (``ClientRoute.query``).
        """
        loop = asyncio.get_running_loop()
        session = ServerSession(self.config)
        client = Client(self, link, session)
        try:
            actions = session.open(
                query,
                now=loop.time(),
                wall=self._wall_clock(),
                request_id=self._request_id_factory(),
            )
            if session.state is SessionState.OPEN:
                # A failed hello send is a handshake error too (PROTOCOL Server 2).
                hello = actions[0]
                assert isinstance(hello, SendText)
                async with asyncio.timeout(self.config.connection_timeout):
                    if not await link.send(hello.text):
                        return
        except Exception:
            logger.exception("handshake with %s failed", link.remote_address)
            actions = session.fail_handshake()
        if session.state is not SessionState.OPEN:
            for action in actions:
                if isinstance(action, Close):
                    logger.info(
                        "refused %s: %d %s", link.remote_address, action.code, action.reason
                    )
                    await link.close(action.code, action.reason)
            return

        self._clients.setdefault(session.client_id, set()).add(client)
        logger.info(
            "client %s connected from %s (role %s)",
            client.client_id,
            link.remote_address,
            client.role,
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read_loop(client))
                group.create_task(self._heartbeat_loop(client))
        finally:
            session.connection_lost()
            peers = self._clients.get(session.client_id)
            if peers is not None:
                peers.discard(client)
                if not peers:
                    del self._clients[session.client_id]
            logger.info("client %s disconnected: %s", client.client_id, _describe_close(link))
            await self._run_hooks(self._disconnect_hooks, client, "on_disconnect")

    async def _read_loop(self, client: Client) -> None:
        client._reader = asyncio.current_task()
        await self._run_hooks(self._connect_hooks, client, "on_connect")
        loop = asyncio.get_running_loop()
        session, link = client._session, client._link
        try:
            while (data := await link.receive()) is not None:
                if isinstance(data, str):
                    actions = session.receive_text(data, now=loop.time(), wall=self._wall_clock())
                else:
                    actions = session.receive_bytes(data, now=loop.time(), wall=self._wall_clock())
                await self._perform(client, actions)
        finally:
            session.connection_lost()

    async def _heartbeat_loop(self, client: Client) -> None:
        loop = asyncio.get_running_loop()
        session, link = client._session, client._link
        while (deadline := session.next_deadline()) is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await link.wait_closed()
                return
            except TimeoutError:
                pass
            actions = session.handle_timer(now=loop.time(), wall=self._wall_clock())
            await self._perform(client, actions)

    async def serve_legacy(self, link: Link, client_id: str) -> None:
        """Run one accepted legacy ``/ws/{client_id}`` connection until it ends."""
        self._legacy.add(link)
        logger.info("legacy client %s connected from %s", client_id, link.remote_address)
        loop = asyncio.get_running_loop()
        bucket = self.config.new_bucket(loop.time())
        try:
            while (data := await link.receive()) is not None:
                if bucket is not None and not bucket.take(loop.time()):
                    await self._close_from_reader(link, RATE_LIMITED)
                elif isinstance(data, str):
                    await self._send(link, legacy_echo(data).text)
                else:
                    await self._close_from_reader(link, UNSUPPORTED_LEGACY_DATA)
        finally:
            self._legacy.discard(link)
        logger.info("legacy client %s disconnected: %s", client_id, _describe_close(link))


# --------------------------------------------------------------------------------------------
# The websockets server
# --------------------------------------------------------------------------------------------


def _tracking_connection_class(
    live: set[ServerConnection], admitted: set[ServerConnection]
) -> type[ServerConnection]:
    """A ServerConnection that records itself in ``live`` from TCP accept to TCP close.

    websockets only tracks connections that completed the upgrade; a TCP connection that never
    sends its request would hold :meth:`SteadyServer.close` up for the whole open timeout.
    ``admitted`` holds those whose upgrade request passed admission, until TCP close; it is
    what the connection cap counts.
    """

    class _TrackedConnection(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            live.add(self)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self)
            admitted.discard(self)
            super().connection_lost(exc)

    return _TrackedConnection


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
        **options: Unpack[EndpointOptions],
    ) -> None:
        super().__init__(**options)
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
        timeout = self.config.connection_timeout
        self._ws_server = await serve(
            self._handle,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            compression=self._compression,
            open_timeout=timeout,
            ping_interval=None,
            ping_timeout=None,
            close_timeout=min(timeout, _MAX_CLOSE_TIMEOUT),
            max_size=self.config.max_message_bytes,
            create_connection=_tracking_connection_class(self._live, self._admitted),
            ssl=self._ssl,
        )
        self._port = self._ws_server.sockets[0].getsockname()[1]
        logger.info("listening on %s", self.url)

    async def close(self) -> None:
        """Close every client with 1001 ``Server shutting down`` and stop; idempotent.

        Returns when every connection and every task of this server has finished.
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
            for client in self.clients:
                # Stops the ping schedule; websockets sends the close frames just below.
                client._session.shutdown()
            server.close(code=SHUTDOWN.code, reason=SHUTDOWN.reason)
        await server.wait_closed()
        if server.close_task is not None:
            await server.close_task
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

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake succeeded
        route = match_route(ws.request.path)
        link = _WebSocketsLink(ws)
        if isinstance(route, ClientRoute):
            await self.serve_client(link, route.query)
        elif isinstance(route, LegacyRoute):
            # Protocol keepalive for this endpoint only: see the module docstring.
            ws.ping_interval = self.config.heartbeat_interval
            ws.ping_timeout = self.config.connection_timeout
            ws.start_keepalive()
            await self.serve_legacy(link, route.client_id)


async def serve_until_signalled(
    host: str,
    port: int,
    config: ServerConfig,
    *,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    ssl: SSLContext | None = None,
) -> None:
    """Serve until one of ``signals`` arrives, then shut down gracefully (1001 to every client).

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
        async with SteadyServer(host, port, config=config, ssl=ssl):
            await stop.wait()
            logger.info("%s received, shutting down", received[0].name)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
