"""The virtual clock: time that moves only when a test says so (part of
:mod:`steadysocket.testing`)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Sized
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["ClockEntry", "SleepRecord", "VirtualClock"]


@dataclass(eq=False)
class ClockEntry:
    """Something parked on a :class:`VirtualClock`: a sleeping task, or a callback."""

    due: float
    """The monotonic time it wakes at."""
    seq: int
    """Its registration order: entries due at the same time wake in this order."""
    owner: str
    """The sleeping task's name (``steadysocket-timer-retry``, ...) or the callback's label."""
    delay: float
    """The delay it was parked with, in seconds."""
    future: asyncio.Future[None] | None = None
    """What a sleeping task awaits (None for a callback)."""
    callback: Callable[[], None] | None = None
    """What a callback entry runs (None for a sleeping task)."""
    cancelled: bool = False

    @property
    def live(self) -> bool:
        """Still waiting: neither cancelled nor already woken."""
        if self.cancelled:
            return False
        if self.future is not None:
            return not self.future.done()
        return self.callback is not None

    def cancel(self) -> None:
        """Forget a callback (a sleeping task is cancelled through its task)."""
        self.cancelled = True
        self.callback = None


@dataclass(frozen=True, slots=True)
class SleepRecord:
    """One call of :meth:`VirtualClock.sleep` or :meth:`VirtualClock.call_later`."""

    owner: str
    """The task (or callback label) that parked it."""
    delay: float
    """The delay asked for, in seconds."""
    start: float
    """The monotonic time it was parked at."""
    due: float
    """The monotonic time it was due to wake at."""


class VirtualClock:
    """Monotonic seconds and aware UTC wall time that move only when a test says so.

    Pass it as both ``clock=`` and ``sleep=`` to
    :class:`~steadysocket.runtime.manager.WebSocketManager`::

        clock = VirtualClock()
        manager = WebSocketManager(url, clock=clock, sleep=clock.sleep, opener=server.open)

    :meth:`sleep` parks the calling task; nothing wakes until the test calls :meth:`advance`
    (or :meth:`advance_to`, :meth:`run_until_idle`, :meth:`fire`), which wakes the due entries
    one at a time, in ``(due, registration order)`` order, and lets the event loop settle after
    each. It runs on one real event loop and is deterministic: a 76-second backoff schedule
    takes milliseconds, and a test can assert exact virtual times.

    Args:
        start: the monotonic time to start at, in seconds.
        wall_start: the wall time (:meth:`now`) at ``start``; timezone-aware.
    """

    def __init__(
        self,
        start: float = 1_000.0,
        wall_start: datetime = datetime(2025, 1, 1, tzinfo=UTC),
    ) -> None:
        if wall_start.tzinfo is None:
            raise ValueError("wall_start must be timezone-aware")
        self._start = start
        self._now = start
        self._wall_start = wall_start
        self._heap: list[tuple[float, int, ClockEntry]] = []
        self._seq = itertools.count(1)
        self.history: list[SleepRecord] = []
        """Every sleep and callback ever parked, in order, with the task that parked it."""

    # -- the Clock protocol ----------------------------------------------------------------

    def monotonic(self) -> float:
        """Virtual seconds, never going backwards."""
        return self._now

    def now(self) -> datetime:
        """Virtual wall time, timezone-aware UTC."""
        return self._wall_start + timedelta(seconds=self._now - self._start)

    # -- parking ---------------------------------------------------------------------------

    async def sleep(self, delay: float) -> None:
        """Park the calling task until the clock reaches ``now + delay`` (a ``Sleep``)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.current_task()
        owner = task.get_name() if task is not None else "?"
        self._park(ClockEntry(self._now + max(delay, 0.0), next(self._seq), owner, delay, future))
        await future

    def call_later(self, delay: float, callback: Callable[[], None], owner: str) -> ClockEntry:
        """Run ``callback()`` when the clock reaches ``now + delay``; ``.cancel()`` forgets it.

        ``owner`` labels the entry in :meth:`pending` and :attr:`history`.
        """
        entry = ClockEntry(
            self._now + max(delay, 0.0), next(self._seq), owner, delay, callback=callback
        )
        self._park(entry)
        return entry

    def _park(self, entry: ClockEntry) -> None:
        heapq.heappush(self._heap, (entry.due, entry.seq, entry))
        self.history.append(SleepRecord(entry.owner, entry.delay, self._now, entry.due))

    def pending(self) -> list[ClockEntry]:
        """The live entries, earliest first."""
        return [entry for _, _, entry in sorted(self._heap) if entry.live]

    def peek(self) -> ClockEntry | None:
        """The live entry that wakes next, or None."""
        while self._heap and not self._heap[0][2].live:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    def fire(self, entry: ClockEntry) -> None:
        """Move the clock to ``entry.due`` and wake it (without letting the loop run).

        For tests that choose the order of events themselves; most use :meth:`advance`.

        Raises:
            RuntimeError: ``entry`` is not the next one due (:meth:`peek`).
        """
        if entry is not self.peek():
            raise RuntimeError(f"{entry.owner} is not the next entry due")
        heapq.heappop(self._heap)
        self._now = max(self._now, entry.due)
        if entry.future is not None:
            entry.future.set_result(None)
        elif entry.callback is not None:
            callback, entry.callback = entry.callback, None
            callback()

    def jump_to(self, when: float) -> None:
        """Move the clock forward to ``when`` without waking anything (drivers that fire
        entries themselves use this once nothing is due before ``when``).

        Raises:
            RuntimeError: an entry is due before ``when``.
        """
        nxt = self.peek()
        if nxt is not None and nxt.due < when:
            raise RuntimeError(f"{nxt.owner} is due at {nxt.due} before {when}")
        self._now = max(self._now, when)

    # -- driving the loop ------------------------------------------------------------------

    @staticmethod
    async def settle(max_rounds: int = 100_000) -> None:
        """Yield to the event loop until it has nothing ready to run.

        When this returns, every task woken so far has run up to its next real wait. With the
        in-memory server nothing waits on I/O, so that is quiescence: every exchange that can
        complete without time passing has completed.

        CPython-specific: it reads the ready queue of asyncio's own event loop (``_ready``, an
        implementation detail of ``asyncio.BaseEventLoop``, the loop ``asyncio.run`` and pytest
        use). Other loops (uvloop, for one) do not expose it; there it raises rather than guess.

        Raises:
            RuntimeError: the running loop has no ready queue to read, or it never went idle
                within ``max_rounds`` iterations (something keeps rescheduling itself).
        """
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        if not isinstance(ready, Sized):
            raise RuntimeError(
                f"VirtualClock.settle() needs asyncio's own event loop, not {type(loop).__name__}"
            )
        for _ in range(max_rounds):
            await asyncio.sleep(0)
            if not ready:
                return
        raise RuntimeError("the event loop never went idle")

    async def run_until_idle(self) -> None:
        """Settle, then wake everything already due, until nothing is ready or due."""
        await self.settle()
        while (entry := self.peek()) is not None and entry.due <= self._now:
            self.fire(entry)
            await self.settle()

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking each due entry in order and settling after
        each; entries due exactly at the end wake too."""
        target = self._now + seconds
        await self.run_until_idle()
        while (entry := self.peek()) is not None and entry.due <= target:
            self.fire(entry)
            await self.settle()
        self._now = max(self._now, target)
        await self.run_until_idle()

    async def advance_to(self, when: float) -> None:
        """Like :meth:`advance`, to an absolute monotonic time (never backwards)."""
        await self.advance(max(when - self._now, 0.0))
