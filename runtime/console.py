"""``steadysocket connect``: the live diagnostics panel, or JSON snapshots for scripts.

This is command-line code: it owns the terminal (raw key input, redraws) and prints. The panel's
content comes from ``steadysocket.runtime.panel.render``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import termios
import tty
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.manager import WebSocketManager
from steadysocket.runtime.panel import render

REFRESH_S = 0.5
CLEAR = "\x1b[H\x1b[2J"


DISABLED_NOTICE = (
    "WEBSOCKET_ENABLED is false: the client stays idle and ignores connect; "
    "unset it (or set it to true) to connect"
)


class Unreachable(Exception):
    """The first outage ended in fallback before the connection ever opened."""


class NeedsTerminal(Exception):
    """The panel was asked for, but standard output is not a terminal."""


@dataclass
class ConnectOptions:
    """What ``steadysocket connect`` was asked to do."""

    url: str | None
    client_id: str | None
    role: str
    version: int
    json: bool
    stay: bool
    max_attempts: int = 8


async def dispatch_key(manager: WebSocketManager, key: str) -> str | None:
    """Carry out one key of the panel; returns a notice to show, or None to quit."""
    key = key.strip().lower()[:1]
    if key == "q":
        return None
    if key in {"c", "r"} and not manager.enabled:
        return DISABLED_NOTICE
    if key == "c":
        await manager.connect()
        return "connect requested"
    if key == "d":
        await manager.disconnect()
        return "disconnected"
    if key == "r":
        await manager.force_reconnect()
        return "reconnect forced"
    if key == "p":
        return "ping sent" if manager.ping() else "ping refused: not connected"
    return f"unknown key {key!r}" if key else ""


@contextlib.contextmanager
def _cbreak(stream: TextIO) -> Iterator[None]:
    if not stream.isatty():
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_connect(
    options: ConnectOptions, out: TextIO, keys: TextIO, err: TextIO | None = None
) -> int:
    """Run the panel (or the JSON stream) until ``q``, SIGINT/SIGTERM or end of input.

    ``err`` (standard error by default) gets the one-line notes of JSON mode.
    """
    # The production delays, with the attempt limit the user chose.
    backoff = BackoffStrategy(max_attempts=options.max_attempts)
    manager = WebSocketManager(
        options.url,
        options.client_id,
        role=options.role,
        version=options.version,
        backoff_strategy=backoff,
    )
    recent: deque[dict[str, Any]] = deque(maxlen=5)
    # One queue wakes the loop: a key (its character), a change ("") or the end (None).
    wakeups: asyncio.Queue[str | None] = asyncio.Queue()
    ever_open = False
    emitted = 0
    notice: str | None = "connecting…" if manager.enabled else DISABLED_NOTICE

    def on_state(state: WSState) -> None:
        nonlocal ever_open, emitted
        ever_open = ever_open or state.phase is Phase.OPEN
        if options.json:
            emitted += 1
            _emit(state.to_json())
        if state.phase is Phase.FALLBACK and not ever_open and not options.stay:
            wakeups.put_nowait(None)
        wakeups.put_nowait("")

    def _emit(line: str) -> None:
        try:
            out.write(line + "\n")
            out.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): stop quietly.
            wakeups.put_nowait(None)

    def on_message(message: dict[str, Any]) -> None:
        recent.appendleft(message)
        wakeups.put_nowait("")

    manager.on_state_change(on_state)
    manager.on_message(on_message)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, wakeups.put_nowait, None)
    stop_reading = None if options.json else _watch_keys(loop, keys, wakeups.put_nowait)
    try:
        with _cbreak(keys) if stop_reading else contextlib.nullcontext():
            if options.json and not manager.enabled:
                (err if err is not None else sys.stderr).write(f"steadysocket: {DISABLED_NOTICE}\n")
            await manager.connect()
            if options.json and not emitted:
                # Nothing changed (the client stays idle): print where it stands, once.
                _emit(manager.get_state().to_json())
            running = True
            while running:
                item: str | None = ""
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REFRESH_S):
                        item = await wakeups.get()
                if item is None:
                    running = False
                elif item:
                    result = await dispatch_key(manager, item)
                    running = result is not None
                    notice = result or notice
                if not options.json:
                    out.write(
                        CLEAR
                        + render(
                            manager.get_state(),
                            now=datetime.now(UTC),
                            recent_messages=recent,
                            notice=notice,
                            backoff=backoff,
                            idle_reason=None if manager.enabled else "WEBSOCKET_ENABLED is false",
                        )
                    )
                    out.flush()
    finally:
        if stop_reading is not None:
            stop_reading()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        state = manager.get_state()
        await manager.destroy()
    if not ever_open and state.phase is Phase.FALLBACK and not options.stay:
        raise Unreachable(f"cannot connect to {state.url}: {state.fallback_reason}")
    return 0


def _watch_keys(
    loop: asyncio.AbstractEventLoop,
    keys: TextIO,
    on_key: Callable[[str | None], None],
) -> Callable[[], None] | None:
    """Feed characters from ``keys`` to ``on_key``; returns a function that stops watching."""
    try:
        fd = keys.fileno()
    except (OSError, ValueError):
        return None

    def readable() -> None:
        data = os.read(fd, 64).decode(errors="replace")
        if not data:
            # End of input (a pipe ran dry): finish after the keys already read.
            loop.remove_reader(fd)
            on_key(None)
            return
        for char in data:
            if not char.isspace():
                on_key(char)

    try:
        loop.add_reader(fd, readable)
    except OSError:
        # A regular file (or /dev/null) cannot be polled: it is all readable now.
        for char in os.read(fd, 4096).decode(errors="replace"):
            if not char.isspace():
                on_key(char)
        on_key(None)
        return None

    def stop() -> None:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)

    return stop


def main_connect(options: ConnectOptions) -> int:
    """Run ``steadysocket connect``; the CLI turns exceptions into one-line errors.

    Raises:
        NeedsTerminal: the panel was asked for but standard output is not a terminal (it
            redraws with terminal escapes). ``--json`` is the form for scripts and pipes.
        Unreachable: the first outage ended in fallback before the connection opened.
    """
    if not options.json and not sys.stdout.isatty():
        raise NeedsTerminal(
            "the diagnostics panel needs a terminal; use --json for one JSON snapshot per "
            "state change"
        )
    return asyncio.run(run_connect(options, sys.stdout, sys.stdin))
