"""A pytest plugin for long runs (``tox -e fuzz``): a line every minute while a test runs.

A hypothesis test in the fuzz profile runs for many minutes with nothing to show. Loaded with
``-p tests.progress`` (and ``-s``, so the line is not captured), this writes
``[progress] <test id>: running for M:SS`` to stderr each minute (``STEADYSOCKET_PROGRESS_S``
changes the interval) until the test ends. With ``-v`` pytest adds each test's name as it starts
and a percentage as it ends.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Generator
from threading import Event

import pytest

INTERVAL_S = float(os.environ.get("STEADYSOCKET_PROGRESS_S", "60"))


def progress_line(nodeid: str, elapsed_s: float) -> str:
    """The line written each interval."""
    minutes, seconds = divmod(int(elapsed_s), 60)
    return f"[progress] {nodeid}: running for {minutes}:{seconds:02d}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    stop = Event()
    start = time.monotonic()

    def beat() -> None:
        # The process's own stderr: -s leaves it uncaptured, and a test's redirection of
        # sys.stderr does not swallow the line.
        err = sys.__stderr__
        while not stop.wait(INTERVAL_S):
            if err is not None:
                err.write(f"\n{progress_line(item.nodeid, time.monotonic() - start)}\n")
                err.flush()

    thread = threading.Thread(target=beat, name="progress", daemon=True)
    thread.start()
    try:
        return (yield)
    finally:
        stop.set()
        thread.join()
