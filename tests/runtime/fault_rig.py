"""Shared rig for the reliability tests (``test_faults.py``, ``test_hostile.py``).

- :func:`run`: one bounded event loop per test (no pytest-asyncio).
- :class:`ServeProcess`: ``steadysocket serve`` as a real subprocess, whose port, RSS and
  stderr the test can read, and which can be killed with SIGKILL or stopped with SIGTERM.
- :class:`Recorder`: a ``WebSocketManager`` with its phase sequence and errors recorded.
- :data:`HEAVY`: ``STEADYSOCKET_RELIABILITY=heavy`` (``tox -e reliability``) runs the heavy
  variants: more clients, more cycles, more examples. The default is the quick mode.

Every wait is bounded; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.manager import ServerError, WebSocketManager, WSError

MS = 0.001
TIMEOUT = 10_000 * MS
T = TypeVar("T")

HEAVY = os.environ.get("STEADYSOCKET_RELIABILITY", "quick") == "heavy"
"""Heavy variants (``tox -e reliability``); the default run stays quick."""

_LISTENING = re.compile(r"listening on wss?://127\.0\.0\.1:(\d+)")


def run(coro: Coroutine[Any, Any, T], bound: float = 6 * TIMEOUT) -> T:
    """Run one async test body on a fresh event loop, bounded by ``bound`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(bound):
            return await coro

    return asyncio.run(bounded())


def serve_command() -> list[str]:
    """The installed console script, or the module when run from a bare checkout."""
    script = Path(sys.executable).with_name("steadysocket")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "steadysocket.runtime.cli"]


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServeProcess:
    """``steadysocket serve`` in a subprocess; ``async with ServeProcess(...) as server``.

    ``port`` 0 picks a free one (read :attr:`port` after start). The stderr log is collected
    in :attr:`lines` by a reader task, so the pipe never fills.
    """

    def __init__(self, *args: str, port: int = 0) -> None:
        self.args = args
        self.requested_port = port
        self.port = 0
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> Self:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WS_")}
        self.process = await asyncio.create_subprocess_exec(
            *serve_command(),
            "serve",
            "--port",
            str(self.requested_port),
            *self.args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        stderr = self.process.stderr
        assert stderr is not None
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = (await stderr.readline()).decode()
                assert line, f"serve exited early: {self.lines}"
                self.lines.append(line)
                if match := _LISTENING.search(line):
                    self.port = int(match.group(1))
                    break
        self._reader = asyncio.create_task(self._collect(stderr), name="serve-stderr")
        return self

    async def _collect(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            self.lines.append(line.decode())

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGKILL for a crash) and wait for the exit; returns the exit code."""
        process = self.process
        assert process is not None
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        try:
            async with asyncio.timeout(TIMEOUT):
                code = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            if self._reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    async with asyncio.timeout(TIMEOUT):
                        await self._reader
        return code

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.stop(signal.SIGKILL)


def backoff(
    delays: tuple[float, ...] = (50, 100),
    *,
    jitter: float = 0.0,
    seed: int = 7,
    max_attempts: int = 1000,
) -> BackoffStrategy:
    """A fast backoff, by default with a large attempt budget: recovery, not fallback."""
    return BackoffStrategy(
        base_delays_ms=delays,
        cap_delay_ms=max(delays),
        jitter_ratio=jitter,
        max_attempts=max_attempts,
        seed=seed,
    )


@dataclass
class Recorder:
    """A manager and what it went through: phases (with loop times), errors, returned ids."""

    manager: WebSocketManager
    phases: list[Phase] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    errors: list[WSError] = field(default_factory=list)
    returned: list[dict[str, Any]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error_kinds(self) -> list[str]:
        return [str(e.kind) for e in self.errors]

    def phases_since(self, index: int) -> list[Phase]:
        return self.phases[index:]


def recorded(url: str, client_id: str, **kwargs: Any) -> Recorder:
    """A ``WebSocketManager`` on ``url`` with everything it reports recorded."""
    options: dict[str, Any] = {
        "backoff_strategy": backoff(),
        "connection_timeout_ms": 2_000,
        "stable_after_ms": 200,
        "fallback_probe_interval_ms": None,
        "environ": {},
    }
    options.update(kwargs)
    manager = WebSocketManager(url, client_id, **options)
    rec = Recorder(manager, [manager.phase], [asyncio.get_running_loop().time()])

    def on_state(state: WSState) -> None:
        rec.phases.append(state.phase)
        rec.times.append(asyncio.get_running_loop().time())

    def on_error(error: WSError | ServerError) -> None:
        if isinstance(error, WSError):  # the server's error messages come here too
            rec.errors.append(error)

    manager.on_state_change(on_state)
    manager.on_error(on_error)
    manager.on_returned(rec.returned.extend)
    manager.on_message(rec.received.append)
    return rec


async def wait_until(
    predicate: Callable[[], bool], bound: float = TIMEOUT, step: float = 5 * MS
) -> None:
    """Poll ``predicate()`` until true; ``TimeoutError`` after ``bound`` seconds."""
    async with asyncio.timeout(bound):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event
            await asyncio.sleep(step)


def alternates_failed_reconnecting(phases: list[Phase]) -> bool:
    """Whether ``phases`` is a run of failed/reconnecting retries (possibly empty)."""
    return all(p in {Phase.FAILED, Phase.RECONNECTING} for p in phases) and all(
        a is not b for a, b in itertools.pairwise(phases)
    )
