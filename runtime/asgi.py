"""The steadysocket endpoints as a raw ASGI 3 application, for uvicorn, Starlette or FastAPI.

:class:`SteadyASGI` is an :class:`~steadysocket.runtime.server.Endpoints`: handlers, hooks,
``send_to``/``broadcast`` and the per-connection pump are the shared ones, and every protocol
decision is the model's :class:`~steadysocket.model.server_session.ServerSession`; protocol v2
(sessions, offsets, acks, resume; the ``delivery`` argument) and request/reply are the shared
pump's too, so both adapters answer alike. This module only carries frames between an ASGI
server and a :class:`~steadysocket.runtime.server.Link`. It
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
- ``http``: HTTP 426 ``Upgrade Required`` on the two WebSocket paths, HTTP 404 elsewhere (as
  SteadyServer answers).
- ``lifespan``: startup applies the garbage-collector policy (``gc_policy``, see
  :class:`~steadysocket.model.server_session.GcPolicy`; one ``call_later`` handle, no task) and
  completes; shutdown runs :meth:`close`, which closes every connection with 1001 ``Server
  shutting down`` and gives the collector back. Without lifespan events the collector is left
  alone.

Paths: the route is ``path`` with ``root_path`` removed, as Starlette's ``Mount`` sets them, so
the app can be mounted under a prefix (``Mount("/realtime", app=steady)`` serves
``/realtime/ws/client``). Routing uses ``raw_path`` (what arrived on the wire) so that
``match_route`` decodes each segment once, exactly as on SteadyServer.

Tasks: the ASGI server runs one task per connection; inside it the shared pump runs a TaskGroup
with a reader and a writer, and the handlers in the connection's task. Nothing else is started,
and :meth:`close` returns once every connection of this app has finished, within its bound.

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
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Unpack
from urllib.parse import quote, unquote

from steadysocket.model.protocol import CloseCode
from steadysocket.model.server_session import (
    SHUTDOWN,
    UPGRADE_REQUIRED,
    ClientRoute,
    CloseRecord,
    match_route,
    select_subprotocol,
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

_NOT_FOUND_BODY: Final = b"Not Found\n"
_HTTP_RESPONSE_EXTENSION: Final = "websocket.http.response"
_NO_STATUS: Final = 1005


def _route_target(scope: Scope) -> str:
    """The request target as :func:`match_route` expects it: the route path as it arrived on
    the wire (``raw_path``, percent-encoding intact, ``root_path`` removed) and the raw query.

    ``match_route`` decodes each segment once, so ``/ws/%63lient`` and ``/ws/a%2Fb`` mean the
    same here as on SteadyServer. A server that gives no ``raw_path`` (or one that does not
    decode to ``path``) gets ``path`` percent-encoded again.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    raw_bytes = scope.get("raw_path")
    raw = None if raw_bytes is None else bytes(raw_bytes).decode("latin-1")
    target: str | None = None
    if raw is not None and unquote(raw) == path:
        target = raw
        if root_path:
            target = _strip_raw_prefix(raw, root_path)
    if target is None:
        if root_path and path.startswith(root_path):
            rest = path[len(root_path) :]
            if rest == "" or rest.startswith("/"):
                path = rest
        target = quote(path, safe="/")
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return f"{target}?{query}" if query else target


def _strip_raw_prefix(raw: str, root_path: str) -> str | None:
    """``raw`` without the leading segments that decode to ``root_path``; None if none do."""
    segments = raw.split("/")
    for count in range(1, len(segments) + 1):
        if unquote("/".join(segments[:count])) == root_path:
            return "/" + "/".join(segments[count:]) if count < len(segments) else ""
    return None


def _origins(scope: Scope) -> list[str]:
    """The request's ``Origin`` header values (ASGI header names are lower-case bytes)."""
    return [
        value.decode("latin-1") for name, value in scope.get("headers", ()) if name == b"origin"
    ]


async def _respond(
    send: Send,
    prefix: str,
    status: int,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A plain-text HTTP response through ``http.response`` or ``websocket.http.response``."""
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *(extra or ()),
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
    raise on that). :meth:`abort` has no ASGI counterpart: it marks the link closed, and the
    pump stops reading it, so the connection's task returns and the server drops the socket.

    How the connection ended follows the model's :class:`CloseRecord`: the server's own close
    is recorded by the pump; a ``websocket.disconnect`` is the client's close with its code,
    except that a 1005 without a ``reason`` key is how uvicorn reports a lost connection (no
    close frame), which reads 1006 as on SteadyServer; a send that fails is a lost connection.
    """

    __slots__ = (
        "_close_started",
        "_closed",
        "_lock",
        "_receive",
        "_send",
        "close_record",
        "remote_address",
    )

    def __init__(self, receive: Receive, send: Send, *, remote_address: str) -> None:
        self._receive = receive
        self._send = send
        self._lock = asyncio.Lock()
        self._closed = False
        self._close_started = False
        self.close_record = CloseRecord()
        self.remote_address = remote_address

    def _disconnected(self, message: Message) -> None:
        code = int(message.get("code", _NO_STATUS))
        if code == _NO_STATUS and "reason" not in message:
            self.close_record.lost()
        else:
            self.close_record.peer_closed(code, message.get("reason") or "")
        self._closed = True

    async def receive(self) -> str | bytes | None:
        while not self._closed:
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
                self._disconnected(message)
        return None

    async def send(self, text: str) -> bool:
        if self._closed or self._close_started:
            return False
        async with self._lock:
            if self._closed or self._close_started:
                return False
            try:
                await self._send({"type": "websocket.send", "text": text})
            except OSError:
                # ASGI 2.4: a send on a connection the client closed raises an OSError.
                self.close_record.lost()
                return False
            except Exception:
                # Older servers raise other errors once they closed the socket themselves.
                logger.debug("send to %s failed", self.remote_address, exc_info=True)
                self.close_record.lost()
                return False
        return True

    async def close(self, code: int, reason: str) -> None:
        if self._close_started or self._closed:
            return
        self._close_started = True
        try:
            async with self._lock:
                if not self._closed:
                    message = {"type": "websocket.close", "code": int(code), "reason": reason}
                    await self._send(message)
        except OSError:
            self.close_record.lost()
        except Exception:
            logger.debug("close of %s failed", self.remote_address, exc_info=True)
            self.close_record.lost()

    def abort(self) -> None:
        self.close_record.lost()
        self._closed = True


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
        self._admitted = 0

    @property
    def closing(self) -> bool:
        """True from :meth:`close` until the next ``lifespan.startup``: upgrades get 1001."""
        return self._stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point.

        Raises:
            ValueError: a scope type other than ``websocket``, ``http`` or ``lifespan``.
        """
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise ValueError(f"unsupported ASGI scope type {kind!r}")

    async def close(self) -> None:
        """Close every connection with 1001 ``Server shutting down`` and wait until all ended.

        Bounded as :meth:`~steadysocket.runtime.server.Endpoints.close_clients` is: within the
        close timeout plus about 1 s, whatever the clients, hooks and handlers do. Upgrades that
        arrive afterwards are accepted and closed with 1001 too, until the next
        ``lifespan.startup``. Idempotent and safe to call concurrently; ``lifespan.shutdown``
        calls it. Called from one of this app's hooks or handlers, it returns normally once every
        other connection has ended; the caller's own connection (already sent 1001) ends when
        its hook or handler returns.
        """
        await self.close_clients()
        self.stop_gc()
        await self.stop_broker()

    # ---- scopes -----------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._stopping = False
                self.start_gc()
                await self.start_broker()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, send: Send) -> None:
        """A plain HTTP request: 426 on the WebSocket paths (as SteadyServer), else 404."""
        if match_route(_route_target(scope)) is None:
            await _respond(send, "http", 404, _NOT_FOUND_BODY)
        else:
            body = UPGRADE_REQUIRED.body.encode()
            await _respond(
                send, "http", UPGRADE_REQUIRED.status, body, [(b"upgrade", b"websocket")]
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        route = match_route(_route_target(scope))
        extensions = scope.get("extensions") or {}
        if route is None:
            if _HTTP_RESPONSE_EXTENSION in extensions:
                await _respond(send, "websocket.http", 404, _NOT_FOUND_BODY)
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
        # The check and the taking of the slot happen with no await in between.
        refusal = self.admission(_origins(scope), self._admitted)
        if refusal is not None:
            logger.info(
                "refused %s: HTTP %d %s",
                _describe_peer(scope),
                refusal.status,
                refusal.body.strip(),
            )
            if _HTTP_RESPONSE_EXTENSION in extensions:
                await _respond(send, "websocket.http", refusal.status, refusal.body.encode())
            else:
                # Without the extension the server can only turn this into HTTP 403.
                await send({"type": "websocket.close", "code": int(CloseCode.POLICY_VIOLATION)})
            return
        self._admitted += 1
        try:
            accept: Message = {"type": "websocket.accept"}
            subprotocol = select_subprotocol(scope.get("subprotocols") or (), self.subprotocols)
            if subprotocol is not None:
                accept["subprotocol"] = subprotocol
            try:
                await send(accept)
            except OSError:
                return  # the client left during the upgrade
            link = _ASGILink(receive, send, remote_address=_describe_peer(scope))
            if self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.close_timeout):
                        await link.close(SHUTDOWN.code, SHUTDOWN.reason)
            elif isinstance(route, ClientRoute):
                headers = [
                    (name.decode("latin-1"), value.decode("latin-1"))
                    for name, value in scope.get("headers") or ()
                ]
                await self.serve_client(link, route.query, headers=headers, subprotocol=subprotocol)
            else:
                await self.serve_legacy(link, route.client_id)
        finally:
            self._admitted -= 1
