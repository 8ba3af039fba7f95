"""Shared pytest configuration: hypothesis profiles.

``ci`` is the default; ``fuzz`` runs the stateful tests with far more examples (``tox -e fuzz``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=100, deadline=None)
settings.register_profile(
    "fuzz",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Figures worth reading in the test output (explorer counts, stateful statistics) are collected
# here and printed once at the end of the run, since pytest captures output of passing tests.
_SUMMARY: dict[str, list[str]] = {}


def record_summary(section: str, line: str) -> None:
    """Add a line to a titled section of the end-of-run summary."""
    _SUMMARY.setdefault(section, []).append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for section, lines in _SUMMARY.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def summary() -> Callable[[str, str], None]:
    """``summary(section, line)`` prints ``line`` under ``section`` at the end of the run."""
    return record_summary
