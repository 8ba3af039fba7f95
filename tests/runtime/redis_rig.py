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

import pytest

MS = 0.001
START_TIMEOUT = 10_000 * MS


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
