"""Both server adapters behind one face, for tests that run the same input against each.

``served("steady", ...)`` starts a :class:`SteadyServer` on 127.0.0.1 port 0; ``served("asgi",
...)`` starts a :class:`SteadyASGI` under a real uvicorn (``websockets-sansio``, protocol
keepalive off so the JSON heartbeat is the one liveness rule, as the README advises) on a free
port. Both yield a :class:`Served`: the ``Endpoints`` (hooks, push, clients), the base URL, and
``close()``, the adapter's own shutdown. Every wait is bounded by a multiple of ``MS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import uvicorn
import uvicorn.config
from starlette.types import ASGIApp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from steadysocket.model.protocol import FEATURES, parse_timestamp
from steadysocket.runtime.asgi import SteadyASGI
from steadysocket.runtime.server import Endpoints, SteadyServer

MS = 0.001
TIMEOUT = 5000 * MS
KINDS = ("steady", "asgi")
Kind = Literal["steady", "asgi"]
T = TypeVar("T")
WS_IMPL = (
    "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "websockets"
)


def run(coro: Coroutine[Any, Any, T], bound: float = 6 * TIMEOUT) -> T:
    """Run one async test body with an overall bound."""

    async def bounded() -> T:
        async with asyncio.timeout(bound):
            return await coro

    return asyncio.run(bounded())


@dataclass
class Served:
    """One running adapter."""

    kind: Kind
    app: Endpoints
    url: str

    async def close(self) -> None:
        """The adapter's shutdown: ``SteadyServer.close()`` or ``SteadyASGI.close()``."""
        if isinstance(self.app, SteadyServer):
            await self.app.close()
        else:
            assert isinstance(self.app, SteadyASGI)
            await self.app.close()


class GracefulServer(uvicorn.Server):
    """The README's recipe: 1001 to every client before uvicorn's own shutdown (1012)."""

    def __init__(self, config: uvicorn.Config, app: SteadyASGI) -> None:
        super().__init__(config)
        self.steady = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.steady.close()
        await super().shutdown(sockets)


def uvicorn_config(app: ASGIApp, **options: Any) -> uvicorn.Config:
    """uvicorn on 127.0.0.1, a free port, lifespan on, quiet, ``WS_IMPL``; plus ``options``."""
    return uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_level="warning",
        log_config=None,
        ws=WS_IMPL,
        **options,
    )


@asynccontextmanager
async def uvicorn_port(
    server: uvicorn.Server, stop_bound: float = 3 * TIMEOUT
) -> AsyncIterator[int]:
    """Run ``server`` as a task; yield its port once it has started; stop it on exit."""
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()  # raises why it could not start
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(10 * MS)
        port: int = server.servers[0].sockets[0].getsockname()[1]
        yield port
    finally:
        server.should_exit = True
        async with asyncio.timeout(stop_bound):
            await task


@asynccontextmanager
async def served(kind: Kind, **options: Any) -> AsyncIterator[Served]:
    """Start ``kind`` with ``options`` (``Endpoints`` arguments, and ``compression``: "deflate"
    or None) and an empty environment."""
    options.setdefault("environ", {})
    compression = options.pop("compression", "deflate")
    if kind == "steady":
        async with SteadyServer("127.0.0.1", 0, compression=compression, **options) as server:
            yield Served(kind, server, server.url)
        return
    app = SteadyASGI(**options)
    config = uvicorn_config(
        app, ws_ping_interval=None, ws_per_message_deflate=compression is not None
    )
    async with uvicorn_port(GracefulServer(config, app)) as port:
        yield Served(kind, app, f"ws://127.0.0.1:{port}")


def dial(base: str, query: str = "client_id=c1", path: str = "/ws/client", **kw: Any) -> Any:
    """``websockets.connect`` to ``base + path + ?query`` with no proxy and a bounded open."""
    target = f"{base}{path}" + (f"?{query}" if query else "")
    return connect(target, proxy=None, open_timeout=TIMEOUT, **kw)


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        message = await ws.recv()
    assert isinstance(message, str)
    data: dict[str, Any] = json.loads(message)
    return data


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next message of type ``kind``, skipping server pings."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await recv_json(ws)
            if message["type"] == kind:
                return message
            assert message["type"] == "ping", message


async def close_frame(ws: ClientConnection, bound: float = TIMEOUT) -> Close | None:
    """Read until the connection ends; the close frame the client received (None: none)."""
    try:
        async with asyncio.timeout(bound):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd


async def http_get(base: str, path: str) -> bytes:
    """A plain HTTP/1.1 GET; the whole raw response."""
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


def stop_reading(ws: ClientConnection) -> None:
    """Make ``ws`` a client that never reads again (TCP pushes back on the server)."""
    ws.transport.pause_reading()


def steadysocket_command() -> list[str]:
    """The installed ``steadysocket`` console script, or the module from a bare checkout."""
    script = Path(sys.executable).with_name("steadysocket")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "steadysocket.runtime.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``WS_*`` and ``WEBSOCKET_*``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WS_", "WEBSOCKET_"))}
    env.update(extra)
    return env


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def received_close(ws: ClientConnection, bound: float = TIMEOUT) -> Close:
    """Read until the connection ends; the close frame received, which must be there."""
    rcvd = await close_frame(ws, bound)
    assert rcvd is not None, "the connection ended without a close frame"
    return rcvd


async def closed_with(ws: ClientConnection, bound: float = TIMEOUT) -> tuple[int, str]:
    """Read until the connection ends; the code and reason of the close frame received."""
    rcvd = await received_close(ws, bound)
    return rcvd.code, rcvd.reason


async def hello_of(ws: ClientConnection) -> dict[str, Any]:
    """The next message, which must be the server's hello."""
    hello = await recv_json(ws)
    assert hello["type"] == "hello"
    return hello


SEED_HELLO_FIELDS = (
    "type",
    "server_time",
    "accepted_version",
    "features",
    "request_id",
    "client_id",
    "heartbeat_interval_ms",
)
"""The seed's hello fields, in the order the servers send them."""


def hello_facts(hello: dict[str, Any]) -> dict[str, Any]:
    """What a test checks of a seed hello (whose fields are ``SEED_HELLO_FIELDS``), to compare
    with ``seed_hello(...)``: the forms of ``server_time`` and ``request_id``, the rest's values."""
    stamp = hello["server_time"]
    return {
        "server_time_is_utc_z": stamp.endswith("Z") and parse_timestamp(stamp).tzinfo is not None,
        "accepted_version": hello["accepted_version"],
        "features": hello["features"],
        "request_id_uuid_version": uuid.UUID(hello["request_id"]).version,
        "client_id": hello["client_id"],
        "heartbeat_interval_ms": hello["heartbeat_interval_ms"],
    }


def seed_hello(client_id: str, heartbeat_interval_ms: int) -> dict[str, Any]:
    """The ``hello_facts`` of a version-1 hello to ``client_id``."""
    return {
        "server_time_is_utc_z": True,
        "accepted_version": 1,
        "features": list(FEATURES),
        "request_id_uuid_version": 4,
        "client_id": client_id,
        "heartbeat_interval_ms": heartbeat_interval_ms,
    }


async def still_works(ws: ClientConnection) -> bool:
    """A ping on ``ws`` is answered with a pong that names the client."""
    await ws.send('{"type":"ping"}')
    pong = await recv_type(ws, "pong")
    return bool(pong["client_id"])
