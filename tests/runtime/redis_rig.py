"""A real ``redis-server`` for the tests: on a free port of 127.0.0.1, in a temporary directory,
no persistence (``--save '' --appendonly no``), stopped afterwards.

No Redis test is skipped: without the ``redis-server`` binary (Debian's ``redis-server``
package, installed by ``.ci/run``) the test fails with the command that installs it.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from steadysocket.runtime.redis_broker import RedisBroker
from steadysocket.runtime.server import Client, SteadyServer
from tests.runtime.adapters import TIMEOUT, recv_json

MS = 0.001
START_TIMEOUT = 10_000 * MS
ROOT = Path(__file__).resolve().parents[2]
"""The project root: ``python -m tests.runtime.redis_rig`` runs from there."""


def redis_binary() -> str:
    """The ``redis-server`` executable; a failure (never a skip) when it is missing."""
    found = shutil.which("redis-server")
    if found is None:
        pytest.fail("redis-server is missing: apt-get install -y redis-server (see .ci/run)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RedisServer:
    """One ``redis-server`` process; :meth:`start` again after :meth:`kill` restarts it empty
    on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = free_port() if port is None else port
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it and return once it accepts connections (its own log line says so)."""
        self.process = await asyncio.create_subprocess_exec(
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--logfile",
            "",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        seen: list[str] = []
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                line = (await self.process.stdout.readline()).decode(errors="replace")
                if not line:
                    raise RuntimeError(f"redis-server exited at start: {''.join(seen)}")
                seen.append(line)
                if "Ready to accept connections" in line:
                    break
        # Keep draining its log so that it never blocks on a full pipe.
        self._drain = asyncio.create_task(self._drain_log(self.process.stdout))

    @staticmethod
    async def _drain_log(stream: asyncio.StreamReader) -> None:
        while await stream.readline():
            pass

    async def kill(self) -> None:
        """``kill -9``: everything it held is gone."""
        await self._end(signal.SIGKILL)

    def freeze(self) -> None:
        """``SIGSTOP``: it holds its connections and data but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        await self._end(signal.SIGTERM)

    async def _end(self, sig: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(sig)
        async with asyncio.timeout(START_TIMEOUT):
            await process.wait()
            await self._drain


@asynccontextmanager
async def redis_server() -> AsyncIterator[RedisServer]:
    """A started ``redis-server``, stopped (and its directory removed) afterwards."""
    with tempfile.TemporaryDirectory(prefix="steadysocket-redis-") as directory:
        server = RedisServer(Path(directory))
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


# ---- helpers the Redis test files share -------------------------------------------------------

OUTAGE = 2.0
"""Seconds Redis stays down in the fault tests (the scenario's length, not a wait for a state)."""


def rooms_by_message(server: SteadyServer) -> None:
    """A ``join`` message puts its client in ``room`` and answers ``{"type": "done"}``."""

    async def join(message: dict[str, Any], client: Client) -> None:
        await client.join(message["room"])
        await client.send({"type": "done"})

    server.on_message("join")(join)


@asynccontextmanager
async def node(url: str, **broker_options: Any) -> AsyncIterator[SteadyServer]:
    """A SteadyServer in this process on a RedisBroker whose reader has its cursor."""
    broker = RedisBroker(url, **broker_options)
    async with SteadyServer("127.0.0.1", 0, broker=broker, environ={}) as server:
        rooms_by_message(server)
        async with asyncio.timeout(TIMEOUT):
            await broker.reading.wait()
        yield server


def broker_of(server: SteadyServer) -> RedisBroker:
    assert isinstance(server.broker, RedisBroker)
    return server.broker


async def next_of(ws: ClientConnection, *kinds: str) -> dict[str, Any]:
    """The next message of one of ``kinds``, skipping pings and replies to others' kinds."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await recv_json(ws)
            if message["type"] in kinds:
                return message
            assert message["type"] in ("ping", "reply"), message


async def next_numbered(ws: ClientConnection) -> dict[str, Any]:
    """The next v2 application message (it has an ``offset``), skipping pings and acks."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await recv_json(ws)
            if "offset" in message:
                return message
            assert message["type"] in ("ping", "ack"), message


def resume_query(client_id: str, hello: dict[str, Any], offset: int) -> str:
    """The query of a v2 resume of ``hello``'s session from ``offset``."""
    return (
        f"client_id={client_id}&version=2&session_id={hello['session_id']}"
        f"&epoch={hello['epoch']}&offset={offset}"
    )


# ---- a cluster node process for the end-to-end tests ------------------------------------------


def _node_app(server: Any) -> None:
    """Handlers that let a test drive a node through its clients (v1 requests get replies)."""
    from steadysocket.runtime.server import SteadyServer

    assert isinstance(server, SteadyServer)

    async def broadcast(message: dict[str, Any], client: Client) -> int:
        return await server.broadcast({"type": "news", "n": message["n"]})

    async def send_to(message: dict[str, Any], client: Client) -> int:
        return await server.send_to(message["to"], {"type": "direct", "n": message["n"]})

    async def join(message: dict[str, Any], client: Client) -> None:
        await client.join(message["room"])

    async def publish(message: dict[str, Any], client: Client) -> int:
        return await server.publish(message["room"], {"type": "room", "n": message["n"]})

    async def presence(message: dict[str, Any], client: Client) -> list[str]:
        return sorted(await server.presence(message["room"]))

    async def count(message: dict[str, Any], client: Client) -> int:
        return await server.client_count()

    async def tally(message: dict[str, Any], client: Client) -> None:
        """A message the test counts: reported to room ``audit`` with who sent it."""
        await server.publish("audit", {"type": "tally", "by": client.client_id, "n": message["n"]})

    for name, handler in (
        ("broadcast", broadcast),
        ("send_to", send_to),
        ("join", join),
        ("publish", publish),
        ("presence", presence),
        ("count", count),
        ("tally", tally),
    ):
        server.on_message(name)(handler)


async def _serve_node(redis_url: str) -> None:
    """One node: a SteadyServer on a RedisBroker on a free port; prints ``READY <port>`` once
    its broker reads the stream, and serves until SIGTERM."""
    import signal as signals
    import sys

    from steadysocket.runtime.redis_broker import RedisBroker
    from steadysocket.runtime.server import SteadyServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signals.SIGTERM, stop.set)
    broker = RedisBroker(redis_url)
    async with SteadyServer(
        "127.0.0.1", 0, broker=broker, environ={}, heartbeat_interval_ms=60_000
    ) as server:
        _node_app(server)
        await broker.reading.wait()
        sys.stdout.write(f"READY {server.port}\n")
        sys.stdout.flush()
        await stop.wait()


class NodeProcess:
    """A node in its own process (``python -m tests.runtime.redis_rig URL``)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, redis_url: str) -> NodeProcess:
        import sys

        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.runtime.redis_rig",
            redis_url,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        assert process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT):
            line = (await process.stdout.readline()).decode()
        if not line.startswith("READY "):
            process.kill()
            await process.wait()
            raise RuntimeError(f"the node did not start: {line!r}")
        return cls(process, int(line.split()[1]))

    async def kill(self) -> None:
        """``kill -9``."""
        if self.process.returncode is None:
            self.process.kill()
        async with asyncio.timeout(START_TIMEOUT):
            await self.process.wait()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self.process.wait()
        except TimeoutError:
            await self.kill()


if __name__ == "__main__":
    import sys

    asyncio.run(_serve_node(sys.argv[1]))
