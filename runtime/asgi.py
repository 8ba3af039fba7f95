"""The steadysocket endpoints as a raw ASGI 3 application, for uvicorn, Starlette or FastAPI.

:class:`SteadyASGI` is an :class:`~steadysocket.runtime.server.Endpoints`: handlers, hooks,
``send_to``/``broadcast`` and the per-connection pump are the shared ones, and every protocol
decision is the model's :class:`~steadysocket.model.server_session.ServerSession`. This module
only carries frames between an ASGI server and a :class:`~steadysocket.runtime.server.Link`. It
imports nothing outside the standard library and steadysocket, so it needs no web framework.

Scopes:

- ``websocket``: the request target goes through
  :func:`~steadysocket.model.server_session.match_route`. ``/ws/client`` and the legacy
  ``/ws/{client_id}`` are accepted first (``websocket.accept``), so a refusal reaches every client
  as a close frame with its code and reason (``websocket.close`` with ``reason``, ASGI spec 2.3).
  Any other path is answered with HTTP 404 through the ``websocket.http.response`` extension when
  the server advertises it (uvicorn, Starlette's TestClient); otherwise it is closed before the
  accept, which servers turn into HTTP 403.
- admission (``allowed_origins``, ``max_connections``): a forbidden ``Origin`` gets HTTP 403 and
  a full app HTTP 503 through ``websocket.http.response``; a server without that extension can
  only turn the refusal into HTTP 403. The rate limit is the shared session's (close 4429).
- ``http``: HTTP 404 ``Not Found``, whatever the path.
- ``lifespan``: startup completes at once and starts nothing; shutdown runs :meth:`close`, which
  closes every connection with 1001 ``Server shutting down``.

Paths: the route is ``path`` with ``root_path`` removed, as Starlette's ``Mount`` sets them, so
the app can be mounted under a prefix (``Mount("/realtime", app=steady)`` serves
``/realtime/ws/client``). The decoded path is percent-encoded again before matching, so a legacy
``client_id`` is decoded exactly once.

Tasks: the ASGI server runs one task per connection; inside it the shared pump runs a TaskGroup
with a reader and a heartbeat task for ``/ws/client``. Nothing else is started, and :meth:`close`
returns once every connection of this app has finished.

What the ASGI server decides, not this module: the opening-handshake timeout, protocol-level
keepalive (uvicorn sends WebSocket Pings every 20 s by default, on every path; pass
``ws_ping_interval=None`` to leave the JSON heartbeat as the one liveness rule on ``/ws/client``),
the largest frame it reads at all (uvicorn's ``ws_max_size``, 16 MiB by default; frames between
``max_message_bytes`` and that limit are closed with 1009 here), and what happens to connections
when the server itself stops (uvicorn closes them with 1012 before it sends ``lifespan.shutdown``;
await :meth:`close` before that to send 1001, see the README).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Unpack
from urllib.parse import quote

from steadysocket.model.protocol import CloseCode
from steadysocket.model.server_session import (
    SHUTDOWN,
    ClientRoute,
    match_route,
)
from steadysocket.runtime.server import EndpointOptions, Endpoints

__all__ = ["Message", "Receive", "Scope", "Send", "SteadyASGI"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""

Message = MutableMapping[str, Any]
"""An ASGI event, sent or received."""

Receive = Callable[[], Awaitable[Message]]
"""The ASGI ``receive`` callable."""

Send = Callable[[Message], Awaitable[None]]
"""The ASGI ``send`` callable."""

_MAX_CLOSE_TIMEOUT: Final = 10.0
_NOT_FOUND_BODY: Final = b"Not Found\n"
_HTTP_RESPONSE_EXTENSION: Final = "websocket.http.response"
_NO_STATUS: Final = 1005


def _route_target(scope: Scope) -> str:
    """The request target as :func:`match_route` expects it: route path and raw query."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        rest = path[len(root_path) :]
        if rest == "" or rest.startswith("/"):
            path = rest
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    target = quote(path, safe="/")
    return f"{target}?{query}" if query else target


def _origins(scope: Scope) -> list[str]:
    """The request's ``Origin`` header values (ASGI header names are lower-case bytes)."""
    return [
        value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"origin"
    ]


async def _respond(send: Send, prefix: str, status: int, body: bytes) -> None:
    """A plain-text HTTP response through ``http.response`` or ``websocket.http.response``."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})


def _describe_peer(scope: Scope) -> str:
    client = scope.get("client")
    if client is None:
        return "unknown"
    host, port = client[0], client[1]
    return f"{host}:{port}"


# --------------------------------------------------------------------------------------------
# The Link over ASGI
# --------------------------------------------------------------------------------------------


class _ASGILink:
    """:class:`~steadysocket.runtime.server.Link` over one accepted ASGI WebSocket.

    ASGI sends are serialised by a lock, and nothing is sent after ``websocket.close`` (servers
    raise on that). :meth:`abort` has no ASGI counterpart; it stops this link and cancels the
    connection's task, whose return makes the server drop the socket without a close frame.
    """

    __slots__ = (
        "_abort_requested",
        "_close_reason",
        "_close_started",
        "_close_timeout",
        "_closed",
        "_code",
        "_lock",
        "_receive",
        "_send",
        "_task",
        "finished",
        "remote_address",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        remote_address: str,
        close_timeout: float,
        task: asyncio.Task[Any] | None,
    ) -> None:
        self._receive = receive
        self._send = send
        self._close_timeout = close_timeout
        self._task = task
        self._lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._close_started = False
        self._abort_requested = False
        self._code: int | None = None
        self._close_reason: str | None = None
        self.remote_address = remote_address
        self.finished = asyncio.Event()
        """Set when the connection's handler has returned."""

    # ---- state ------------------------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        return self._code

    @property
    def close_reason(self) -> str | None:
        return self._close_reason

    @property
    def cancelled_its_task(self) -> bool:
        """Whether :meth:`abort` cancelled the connection's task (to be uncancelled once)."""
        return self._abort_requested

    def detach(self) -> None:
        """The connection's handler is returning: :meth:`abort` must no longer cancel it."""
        self._task = None
        self.finished.set()

    def _ended(self, code: int, reason: str) -> None:
        if self._code is None:
            self._code = code
            self._close_reason = reason
        self._closed.set()

    # ---- Link -------------------------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        while not self._closed.is_set():
            message = await self._receive()
            kind = message.get("type")
            if kind == "websocket.receive":
                text = message.get("text")
                if text is not None:
                    return str(text)
                data = message.get("bytes")
                if data is not None:
                    return bytes(data)
            elif kind == "websocket.disconnect":
                self._ended(int(message.get("code", _NO_STATUS)), message.get("reason") or "")
        return None

    async def send(self, text: str) -> bool:
        if self._closed.is_set():
            return False
        async with self._lock:
            if self._closed.is_set():
                return False
            try:
                await self._send({"type": "websocket.send", "text": text})
            except OSError:
                # ASGI 2.4: a send on a connection the client closed raises an OSError.
                self._ended(CloseCode.ABNORMAL, "")
                return False
            except Exception:
                # Older servers raise other errors once they closed the socket themselves.
                logger.warning("send to %s failed", self.remote_address, exc_info=True)
                self._ended(CloseCode.ABNORMAL, "")
                return False
        return True

    async def close(self, code: int, reason: str) -> None:
        if self._close_started or self._closed.is_set():
            return
        self._close_started = True
        try:
            async with asyncio.timeout(self._close_timeout), self._lock:
                if not self._closed.is_set():
                    message = {"type": "websocket.close", "code": int(code), "reason": reason}
                    await self._send(message)
        except TimeoutError:
            logger.warning("%s did not take its close frame; aborting", self.remote_address)
            self.abort()
            return
        except OSError:
            pass
        except Exception:
            logger.warning("close of %s failed", self.remote_address, exc_info=True)
        self._ended(code, reason)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def abort(self) -> None:
        self._ended(CloseCode.ABNORMAL, "")
        task = self._task
        if self._abort_requested or task is None or task.done():
            return
        if task is asyncio.current_task():
            # The connection's own task sees the closed link at its next receive and returns.
            return
        self._abort_requested = True
        task.cancel()


# --------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------


class SteadyASGI(Endpoints):
    """``/ws/client`` and the legacy ``/ws/{client_id}`` as an ASGI 3 application.

    Serve it directly (``uvicorn.run(SteadyASGI(...))``) or mount it in Starlette or FastAPI
    (``app.mount("/", steady)``). Handlers, hooks, ``send_to``, ``broadcast`` and ``clients`` are
    those of :class:`~steadysocket.runtime.server.Endpoints`; the arguments are too.

    Raises:
        ConfigError: a setting or variable is malformed (a ``ValueError``).
        TypeError: both ``config`` and individual settings were given.
    """

    def __init__(self, **options: Unpack[EndpointOptions]) -> None:
        super().__init__(**options)
        self._links: set[_ASGILink] = set()
        self._closing = False

    @property
    def closing(self) -> bool:
        """True from :meth:`close` until the next ``lifespan.startup``: upgrades get 1001."""
        return self._closing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point.

        Raises:
            ValueError: a scope type other than ``websocket``, ``http`` or ``lifespan``.
        """
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._not_found(send, "http")
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def close(self) -> None:
        """Close every connection with 1001 ``Server shutting down`` and wait until all ended.

        Upgrades that arrive afterwards are accepted and closed with 1001 too, until the next
        ``lifespan.startup``. Connections that do not finish within the close timeout are
        aborted. Idempotent; ``lifespan.shutdown`` calls it.
        """
        self._closing = True
        await self.close_clients()
        # Connections still sending their hello are not in ``clients`` yet.
        async with asyncio.TaskGroup() as group:
            for link in tuple(self._links):
                group.create_task(link.close(SHUTDOWN.code, SHUTDOWN.reason))
        if await self._all_finished():
            return
        for link in tuple(self._links):
            link.abort()
        if not await self._all_finished():
            logger.warning("%d connection(s) still running after close()", len(self._links))

    async def _all_finished(self) -> bool:
        try:
            async with asyncio.timeout(self._close_timeout):
                for link in tuple(self._links):
                    await link.finished.wait()
        except TimeoutError:
            return False
        return True

    # ---- scopes -----------------------------------------------------------------------------

    @property
    def _close_timeout(self) -> float:
        return min(self.config.connection_timeout, _MAX_CLOSE_TIMEOUT)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._closing = False
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _not_found(self, send: Send, prefix: str) -> None:
        await _respond(send, prefix, 404, _NOT_FOUND_BODY)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        route = match_route(_route_target(scope))
        if route is None:
            if _HTTP_RESPONSE_EXTENSION in (scope.get("extensions") or {}):
                await self._not_found(send, "websocket.http")
            else:
                # Before the accept a close is an HTTP 403; the code never reaches the client.
                await send(
                    {
                        "type": "websocket.close",
                        "code": int(CloseCode.POLICY_VIOLATION),
                        "reason": "Not Found",
                    }
                )
            return
        refusal = self.admission(_origins(scope), len(self._links))
        if refusal is not None:
            logger.info(
                "refused %s: HTTP %d %s",
                _describe_peer(scope),
                refusal.status,
                refusal.body.strip(),
            )
            if _HTTP_RESPONSE_EXTENSION in (scope.get("extensions") or {}):
                await _respond(send, "websocket.http", refusal.status, refusal.body.encode())
            else:
                # Without the extension the server can only turn this into HTTP 403.
                await send({"type": "websocket.close", "code": int(CloseCode.POLICY_VIOLATION)})
            return
        try:
            await send({"type": "websocket.accept"})
        except OSError:
            return  # the client left during the upgrade
        task = asyncio.current_task()
        link = _ASGILink(
            receive,
            send,
            remote_address=_describe_peer(scope),
            close_timeout=self._close_timeout,
            task=task,
        )
        self._links.add(link)
        try:
            if self._closing:
                await link.close(SHUTDOWN.code, SHUTDOWN.reason)
            elif isinstance(route, ClientRoute):
                await self.serve_client(link, route.query)
            else:
                await self.serve_legacy(link, route.client_id)
        except asyncio.CancelledError:
            # abort() cancelled this task: the connection is over, not the server.
            if task is None or not link.cancelled_its_task or task.uncancel() > 0:
                raise
        finally:
            link.detach()
            self._links.discard(link)
