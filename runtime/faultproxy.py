"""A TCP proxy on 127.0.0.1 that can misbehave on command, for the demo and fault tests.

Modes, switchable at any time with ``set_mode``:

- ``PASS``: forward both ways;
- ``BLACKHOLE``: keep TCP open and forward nothing (a half-open connection);
- ``CLOSE``: close connections cleanly (FIN), and close new ones at once;
- ``RESET``: abort connections (RST), and reset new ones at once.

``set_mode`` affects new connections; ``apply_to_current=True`` also switches the connections
already open. Every connection is a pair of pump tasks in one ``asyncio.TaskGroup`` owned by the
proxy; ``close()`` ends them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

CHUNK = 65536


class Mode(StrEnum):
    """How the proxy treats traffic."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    CLOSE = "close"
    RESET = "reset"


@dataclass(eq=False)
class _Link:
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    mode: Mode
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``, faults on command."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int = 0):
        self.target_host = target_host
        self.target_port = target_port
        self._port = port
        self.mode = Mode.PASS
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._group: asyncio.TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def port(self) -> int:
        """The port the proxy listens on (after ``start()``)."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        ready = asyncio.Event()
        self._supervisor = asyncio.create_task(self._supervise(ready), name="faultproxy")
        await ready.wait()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._port)

    async def _supervise(self, ready: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            ready.set()
            await self._stop.wait()
            for link in list(self._links):
                self._abort(link)
        self._group = None

    async def close(self) -> None:
        """Stop listening and end every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._stop.set()
        if self._supervisor is not None:
            await self._supervisor

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

    def set_mode(self, mode: Mode | str, *, apply_to_current: bool = False) -> None:
        """Switch the mode for new connections, and optionally for the open ones."""
        self.mode = Mode(mode)
        logger.info(
            "fault proxy: %s%s", self.mode, " (current connections too)" if apply_to_current else ""
        )
        if apply_to_current:
            for link in list(self._links):
                self._switch(link, self.mode)

    def _switch(self, link: _Link, mode: Mode) -> None:
        link.mode = mode
        if mode is Mode.RESET:
            self._abort(link)
        elif mode is Mode.CLOSE:
            for _, writer in (link.client, link.upstream):
                writer.close()
        link.changed.set()

    @staticmethod
    def _abort(link: _Link) -> None:
        for _, writer in (link.client, link.upstream):
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    # SO_LINGER 0: close sends RST instead of FIN.
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
            transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._group is None or self.mode in {Mode.CLOSE, Mode.RESET}:
            if self.mode is Mode.RESET:
                writer.transport.abort()
            else:
                writer.close()
            return
        try:
            upstream = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            # The target is down: the client sees the connection drop, as it would.
            writer.transport.abort()
            return
        link = _Link((reader, writer), upstream, self.mode)
        self._links.add(link)
        self._group.create_task(self._pump(link, link.client[0], link.upstream[1]))
        self._group.create_task(self._pump(link, link.upstream[0], link.client[1]))

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.mode is Mode.BLACKHOLE:
                    continue
                if link.mode is not Mode.PASS:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side has gone: a blackhole keeps TCP open only while both sides are up.
            for _, end in (link.client, link.upstream):
                end.close()
            self._links.discard(link)
