"""Shared plumbing: sizes per mode, child processes with a command pipe, /proc readers, stats,
and the result types every benchmark returns.

Every child runs in its own process (``multiprocessing``, fork), pinned to one core when the
machine has two or more, with ``RLIMIT_NOFILE`` raised to its hard limit. The parent talks to a
child through a pipe; every wait on it is bounded, and a child that overruns is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import multiprocessing
import multiprocessing.connection
import os
import resource
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

SERVER_CPU = 0
"""The core the server under test is pinned to."""
CLIENT_CPU = 1
"""The core load generators and clients are pinned to."""

CHILD_LIFETIME_S = 900.0
"""No child lives longer than this, whatever the parent does."""


class BenchError(RuntimeError):
    """A benchmark could not run (a child failed, timed out, or a peer misbehaved)."""


@dataclass(frozen=True)
class Sizes:
    """How big and how long; ``quick`` is the CI smoke run."""

    quick: bool

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full


# -- results ------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure: steadysocket beside its baseline, with the goal and whether it is met."""

    metric: str
    value: str
    baseline: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    """None when the figure has no goal."""


@dataclass
class Section:
    """What one benchmark reports."""

    key: str
    title: str
    method: str
    rows: list[Row] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    """Extra markdown: histograms, profiles, per-run figures."""
    seconds: float = 0.0


def verdict(met: bool | None) -> str:
    """The table cell for a goal."""
    if met is None:
        return ""
    return "met" if met else "**missed**"


# -- statistics ---------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(value: float, baseline: float) -> float | None:
    """``value / baseline``, or None when it is undefined."""
    if not baseline or math.isnan(baseline) or math.isnan(value):
        return None
    return value / baseline


def fmt(value: float, digits: int = 0, unit: str = "") -> str:
    """A number with thousands separators and an optional unit."""
    if math.isnan(value):
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".strip()


def spread(values: Sequence[float], digits: int = 0) -> str:
    """``min..max`` of the runs, for the per-run columns."""
    if not values:
        return "n/a"
    return f"{min(values):,.{digits}f}..{max(values):,.{digits}f}"


# -- processes ----------------------------------------------------------------------------


def cpus() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def pin(index: int | None) -> None:
    """Pin this process to the ``index``-th allowed core (no-op on a one-core machine)."""
    allowed = cpus()
    if index is None or len(allowed) < 2 or not hasattr(os, "sched_setaffinity"):
        return
    os.sched_setaffinity(0, {allowed[index % len(allowed)]})


def raise_nofile() -> int:
    """Raise the soft file descriptor limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def proc_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields after the command: state is [0], utime is [11], stime is [12].
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    with open(f"/proc/{pid}/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE


class GcWatch:
    """Records garbage collections in this process: count per generation, longest pause."""

    def __init__(self) -> None:
        self.started = 0.0
        self.reset()
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        """Forget what was recorded."""
        self.counts = [0, 0, 0]
        self.full_pauses: list[float] = []
        self.total_s = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        elapsed = time.perf_counter() - self.started
        generation = int(info["generation"])
        self.counts[generation] += 1
        self.total_s += elapsed
        if generation == 2:
            self.full_pauses.append(elapsed)

    def summary(self) -> dict[str, Any]:
        """What was recorded since the last reset."""
        return {
            "counts": list(self.counts),
            "full_pauses": list(self.full_pauses),
            "total_s": self.total_s,
            "tracked_objects": len(gc.get_objects()) + gc.get_freeze_count(),
        }


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have been busy (anyone's work), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already counted in user time
    return (sum(fields[:8]) - idle) / CLK_TCK


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How much of the machine others used (in cores) between ``start`` and ``stop``.

    "Others" is everything but this process, its reaped children and the live ``pids`` given
    to ``stop``: on a shared machine that is the noise every figure carries.
    """

    def __init__(self) -> None:
        self.busy = machine_busy_seconds()
        self.own = own_cpu_seconds()
        self.wall = time.monotonic()

    def cores(self, live_cpu_seconds: float = 0.0) -> float:
        """Average cores used by others since construction."""
        elapsed = time.monotonic() - self.wall
        if elapsed <= 0:
            return math.nan
        busy = machine_busy_seconds() - self.busy
        own = own_cpu_seconds() - self.own + live_cpu_seconds
        return max(busy - own, 0.0) / elapsed


def _child_main(
    conn: multiprocessing.connection.Connection,
    cpu: int | None,
    target: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    pin(cpu)
    raise_nofile()
    # A child must never outlive a parent that died: the alarm ends it.
    import signal

    signal.alarm(int(CHILD_LIFETIME_S))
    try:
        target(conn, *args)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise


class Child:
    """A child process running ``target(conn, *args)``, and the parent's end of its pipe."""

    def __init__(
        self, target: Callable[..., Any], *args: Any, cpu: int | None = None, name: str = ""
    ) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_child_main, args=(child_conn, cpu, target, args), name=name, daemon=True
        )
        self.process.start()
        child_conn.close()
        self.name = name or getattr(target, "__name__", "child")

    @property
    def pid(self) -> int:
        """The child's process id."""
        pid = self.process.pid
        assert pid is not None
        return pid

    def receive(self, timeout: float) -> Any:
        """The child's next message; raises ``BenchError`` on timeout or a child's error."""
        if not self.conn.poll(timeout):
            raise BenchError(f"{self.name}: no answer within {timeout:g} s")
        try:
            message = self.conn.recv()
        except EOFError as exc:
            raise BenchError(f"{self.name}: exited ({self.process.exitcode})") from exc
        if isinstance(message, tuple) and message and message[0] == "error":
            raise BenchError(f"{self.name} failed:\n{message[1]}")
        return message

    def call(self, command: Any, timeout: float) -> Any:
        """Send a command and wait (bounded) for its answer."""
        self.conn.send(command)
        return self.receive(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to stop, then terminate or kill it if it does not."""
        if self.process.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(("stop",))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(3.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(3.0)
        self.conn.close()

    def kill(self) -> None:
        """SIGKILL the child at once (a crash), and reap it."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)
        self.conn.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Inbox:
    """The child's end of the pipe, readable from its event loop without blocking it."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._queue.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            # The parent is gone: behave as if it said stop.
            self._loop.remove_reader(self.conn.fileno())
            self._queue.put_nowait(("stop",))

    async def get(self) -> Any:
        """The next command (bounded: no child outlives ``CHILD_LIFETIME_S``)."""
        async with asyncio.timeout(CHILD_LIFETIME_S):
            return await self._queue.get()

    def reply(self, value: Any) -> None:
        """Answer the parent."""
        self.conn.send(value)

    def close(self) -> None:
        """Stop watching the pipe."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.conn.fileno())


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (a bounded loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
