"""``tests.progress``, the plugin ``tox -e fuzz`` loads: a line per interval while a test runs."""

from __future__ import annotations

import io
import sys
import threading
from typing import Any

import pytest

from tests import progress


def test_the_line_names_the_test_and_the_time_it_has_run() -> None:
    assert progress.progress_line("t.py::test_x", 754.9) == (
        "[progress] t.py::test_x: running for 12:34"
    )


def test_the_hook_writes_one_line_per_interval_and_stops_with_the_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []

    class TwoIntervals(threading.Event):
        # The first interval passes (a line), the second is cut short by the test's end.
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            return len(waits) > 1

    err = io.StringIO()
    monkeypatch.setattr(progress, "Event", TwoIntervals)
    monkeypatch.setattr(sys, "__stderr__", err)
    item: Any = type("Item", (), {"nodeid": "t.py::test_long"})()
    hook = progress.pytest_runtest_call(item)
    next(hook)
    with pytest.raises(StopIteration) as done:
        hook.send("outcome")
    assert done.value.value == "outcome"
    assert waits == [progress.INTERVAL_S, progress.INTERVAL_S]
    assert err.getvalue() == "\n[progress] t.py::test_long: running for 0:00\n"
