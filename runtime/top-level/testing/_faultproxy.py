"""The fault proxy: a real TCP link that fails on cue (part of :mod:`steadysocket.testing`).

:class:`FaultProxy` is a TCP proxy on 127.0.0.1 that sits between your client and a server (a
:class:`~steadysocket.runtime.server.SteadyServer` on port 0 works well) and misbehaves when told
to: it drops, resets, stalls or slows the connections going through it, or flaps them. Point
your :class:`~steadysocket.runtime.manager.WebSocketManager` at :attr:`FaultProxy.url` and switch
the mode in the middle of a test::

    async with SteadyServer("127.0.0.1", 0) as server, FaultProxy(server.port) as proxy:
        async with WebSocketManager(proxy.url, environ={}) as manager:
            await manager.wait_for(Phase.OPEN, timeout=10)
            proxy.set_mode(Mode.RESET, apply_to_current=True)   # the link drops
            await manager.wait_for(Phase.FAILED, timeout=10)
            proxy.set_mode(Mode.PASS)                           # and comes back
            await manager.wait_for(Phase.OPEN, timeout=10)

The steadysocket demo and the project's own fault tests use the same proxy.

Modes, switchable at any time with ``set_mode``:

- ``PASS``: forward both ways;
- ``DELAY``: forward both ways, each chunk ``delay_ms`` after it arrived (latency, in order;
  chunks are not serialised behind each other's delay, up to ``QUEUE_CHUNKS`` in flight per
  direction);
- ``DRIP``: a slow link: forward ``drip_bytes`` every ``drip_interval_ms`` in each direction;
- ``BLACKHOLE``: keep TCP open and forward nothing (a half-open connection);
- ``CLOSE``: close connections cleanly (FIN), and close new ones at once;
- ``RESET``: abort connections (RST), and reset new ones at once;
- ``FLAP``: cycle down and up a bounded number of times (:class:`Flap`): each cycle is
  ``down_ms`` in the down mode (``RESET`` by default) and then ``up_ms`` of ``PASS``. After the
  last cycle the proxy stays in ``PASS``. Await :meth:`FaultProxy.wait_flap_done`.

``set_mode`` affects new connections; ``apply_to_current=True`` also switches the connections
already open (``FLAP`` always applies to them: a flapping link takes every connection down).
Switching to another mode stops a flap in progress.

Every connection is two directions, each a reader and a writer task joined by a small bounded
queue (so a slow link pushes back on the sender through TCP, as a real one does). All of them
run in one ``asyncio.TaskGroup`` owned by the proxy; ``close()`` ends them all.
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

__all__ = ["FaultProxy", "Flap", "Mode"]

logger = logging.getLogger("steadysocket.testing")

CHUNK = 65536
QUEUE_CHUNKS = 16
"""Chunks buffered per direction before the proxy stops reading from the sender."""


class Mode(StrEnum):
    """How the proxy treats traffic."""

    PASS = "pass"
    DELAY = "delay"
    DRIP = "drip"
    BLACKHOLE = "blackhole"
    CLOSE = "close"
    RESET = "reset"
    FLAP = "flap"


_DOWN_MODES = frozenset({Mode.BLACKHOLE, Mode.CLOSE, Mode.RESET})


@dataclass(frozen=True, slots=True)
class Flap:
    """A bounded flap: ``cycles`` times ``down_ms`` in ``down_mode``, then ``up_ms`` of PASS.

    Raises:
        ValueError: a non-positive count or duration, or a down mode that is not a fault.
    """

    up_ms: float
    down_ms: float
    cycles: int
    down_mode: Mode = Mode.RESET

    def __post_init__(self) -> None:
        if self.cycles < 1 or self.up_ms <= 0 or self.down_ms <= 0:
            raise ValueError(f"a flap needs positive cycles and durations, got {self!r}")
        if Mode(self.down_mode) not in _DOWN_MODES:
            raise ValueError(f"a flap goes down by blackhole, close or reset, not {self.down_mode}")


@dataclass(eq=False)
class _Link:
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    mode: Mode
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    tasks: int = 4


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``, faults on command.

    Args:
        target_port: where to forward.
        target_host: the target's address (127.0.0.1 by default).
        port: the port to listen on; 0 picks a free one (see :attr:`port`).
        delay_ms: the latency of ``DELAY`` mode.
        drip_bytes, drip_interval_ms: the rate of ``DRIP`` mode.

    Counters for tests: :attr:`accepted` (connections accepted) and :attr:`forwarded`
    (connections that reached the target).
    """

    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        port: int = 0,
        delay_ms: float = 100.0,
        drip_bytes: int = 16,
        drip_interval_ms: float = 10.0,
    ):
        self.target_host = target_host
        self.target_port = target_port
        self._port = port
        self.mode = Mode.PASS
        self.delay_ms = delay_ms
        self.drip_bytes = drip_bytes
        self.drip_interval_ms = drip_interval_ms
        self.flap: Flap | None = None
        self.flap_cycles_done = 0
        self.accepted = 0
        self.forwarded = 0
        self._effective = Mode.PASS
        self._flapper: asyncio.Task[None] | None = None
        self._flap_done = asyncio.Event()
        self._flap_done.set()
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

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:port``, the base URL a client dials to go through the proxy."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def link_count(self) -> int:
        """How many proxied connections are open now."""
        return sum(1 for link in self._links if not link.ended)

    @property
    def flapping(self) -> bool:
        """Whether a flap is running now."""
        return not self._flap_done.is_set()

    @property
    def is_down(self) -> bool:
        """Whether traffic is being refused or dropped now (in a fault mode or a flap's down)."""
        return self._effective in _DOWN_MODES

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
            self._stop_flap()
            for link in list(self._links):
                self._abort(link)
        self._group = None

    async def close(self) -> None:
        """Stop listening and end every connection."""
        if self._server is not None:
            self._server.close()
        self._stop.set()
        if self._supervisor is not None:
            await self._supervisor
        # Only now: since Python 3.12 wait_closed() also waits for the accepted connections,
        # which the supervisor has just ended.
        if self._server is not None:
            await self._server.wait_closed()

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

    # ---- modes ----------------------------------------------------------------------------

    def set_mode(
        self,
        mode: Mode | str,
        *,
        apply_to_current: bool = False,
        delay_ms: float | None = None,
        drip_bytes: int | None = None,
        drip_interval_ms: float | None = None,
        flap: Flap | None = None,
    ) -> None:
        """Switch the mode for new connections, and optionally for the open ones.

        ``delay_ms``, ``drip_bytes`` and ``drip_interval_ms`` update the settings of those modes
        (they apply at once, also to chunks already waiting). ``FLAP`` needs ``flap`` (or one
        given earlier) and starts it now; the proxy must be started.

        Raises:
            ValueError: ``FLAP`` without a :class:`Flap`, or a non-positive setting.
            RuntimeError: ``FLAP`` before :meth:`start`.
        """
        mode = Mode(mode)
        if delay_ms is not None:
            if delay_ms < 0:
                raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
            self.delay_ms = delay_ms
        if drip_bytes is not None:
            if drip_bytes < 1:
                raise ValueError(f"drip_bytes must be positive, got {drip_bytes}")
            self.drip_bytes = drip_bytes
        if drip_interval_ms is not None:
            if drip_interval_ms <= 0:
                raise ValueError(f"drip_interval_ms must be positive, got {drip_interval_ms}")
            self.drip_interval_ms = drip_interval_ms
        if mode is Mode.FLAP:
            self.flap = flap if flap is not None else self.flap
            if self.flap is None:
                raise ValueError("Mode.FLAP needs a Flap(up_ms, down_ms, cycles)")
            if self._group is None:
                raise RuntimeError("start the proxy before flapping it")
        self._stop_flap()
        self.mode = mode
        logger.info(
            "fault proxy: %s%s", self.mode, " (current connections too)" if apply_to_current else ""
        )
        if mode is Mode.FLAP:
            assert self._group is not None
            assert self.flap is not None
            self.flap_cycles_done = 0
            self._flap_done.clear()
            self._flapper = self._group.create_task(self._run_flap(self.flap), name="faultflap")
            return
        self._enter(mode, apply_to_current)

    def _enter(self, mode: Mode, apply_to_current: bool) -> None:
        self._effective = mode
        if apply_to_current:
            for link in list(self._links):
                self._switch(link, mode)

    async def _run_flap(self, flap: Flap) -> None:
        try:
            for _ in range(flap.cycles):
                self._enter(Mode(flap.down_mode), True)
                await asyncio.sleep(flap.down_ms / 1000)
                self._enter(Mode.PASS, True)
                await asyncio.sleep(flap.up_ms / 1000)
                self.flap_cycles_done += 1
        finally:
            if self._flapper is asyncio.current_task():
                self._flapper = None
                self.mode = Mode.PASS
                self._enter(Mode.PASS, False)
                self._flap_done.set()

    def _stop_flap(self) -> None:
        flapper, self._flapper = self._flapper, None
        if flapper is not None:
            flapper.cancel()
        self._flap_done.set()

    async def wait_flap_done(self) -> None:
        """Return once no flap is running (at once if none was started)."""
        await self._flap_done.wait()

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
        link.ended = True
        link.changed.set()
        for _, writer in (link.client, link.upstream):
            _reset(writer.transport)

    # ---- connections ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        mode = self._effective
        if self._group is None or mode in {Mode.CLOSE, Mode.RESET}:
            if mode is Mode.RESET:
                _reset(writer.transport)
            else:
                writer.close()
            return
        try:
            upstream = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            # The target is down: the client sees the connection drop, as it would.
            writer.transport.abort()
            return
        if self._group is None:
            upstream[1].transport.abort()
            writer.transport.abort()
            return
        self.forwarded += 1
        # The mode may have changed while the upstream connection was opening.
        link = _Link((reader, writer), upstream, self._effective)
        self._links.add(link)
        if link.mode in {Mode.CLOSE, Mode.RESET}:
            self._switch(link, link.mode)
        for source, sink in (
            (link.client[0], link.upstream[1]),
            (link.upstream[0], link.client[1]),
        ):
            queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
            self._group.create_task(self._read(link, source, queue))
            self._group.create_task(self._write(link, queue, sink))

    async def _read(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[float, bytes] | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not link.ended:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.mode is Mode.BLACKHOLE:
                    continue
                if link.mode in {Mode.CLOSE, Mode.RESET}:
                    break
                await queue.put((loop.time(), data))
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                queue.put_nowait(None)
            except asyncio.QueueFull:
                # The writer is stuck behind a full queue: end the link rather than wait.
                self._end(link)
                queue.get_nowait()
                queue.put_nowait(None)
            self._task_done(link)

    async def _write(
        self,
        link: _Link,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (item := await queue.get()) is not None:
                arrived, data = item
                mode = link.mode
                if mode is Mode.BLACKHOLE:
                    continue
                if mode in {Mode.CLOSE, Mode.RESET}:
                    break
                while link.mode is Mode.DELAY and not link.ended:
                    wait = arrived + self.delay_ms / 1000 - loop.time()
                    if wait <= 0:
                        break
                    await _pause(link, wait)
                if link.ended:
                    break
                if link.mode is Mode.DRIP:
                    await self._drip(link, data, writer)
                elif link.mode not in _DOWN_MODES:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side has gone: a blackhole keeps TCP open only while both sides are up.
            self._end(link)
            # Unblock a reader waiting for room in the queue; it sees the link ended.
            while not queue.empty():
                queue.get_nowait()
            self._task_done(link)

    async def _drip(self, link: _Link, data: bytes, writer: asyncio.StreamWriter) -> None:
        view = memoryview(data)
        while view and link.mode is Mode.DRIP and not link.ended:
            size = self.drip_bytes
            writer.write(bytes(view[:size]))
            view = view[size:]
            await writer.drain()
            await _pause(link, self.drip_interval_ms / 1000)
        if view and link.mode not in _DOWN_MODES and not link.ended:
            writer.write(bytes(view))
            await writer.drain()

    def _end(self, link: _Link) -> None:
        # Closing flushes what was already written, then sends FIN; the link stays in
        # ``_links`` (so ``close()`` can still abort it) until all four of its tasks are done.
        link.ended = True
        link.changed.set()
        for _, end in (link.client, link.upstream):
            end.close()

    def _task_done(self, link: _Link) -> None:
        link.tasks -= 1
        if link.tasks == 0:
            self._links.discard(link)


async def _pause(link: _Link, seconds: float) -> None:
    """Sleep ``seconds``, or less if the link's mode changes or it ends meanwhile."""
    link.changed.clear()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await link.changed.wait()


def _reset(transport: asyncio.WriteTransport) -> None:
    """Drop a connection with RST (SO_LINGER 0) rather than FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    transport.abort()
