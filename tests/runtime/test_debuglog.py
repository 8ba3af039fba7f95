"""``enable_debug_logging()`` (what ``WS_DEBUG=1`` calls): debug lines on stderr without any
logging setup, through one handler on the ``steadysocket`` logger and nowhere else."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from steadysocket.runtime.debuglog import disable_debug_logging, enable_debug_logging

EMIT = (
    "import logging\n"
    "logging.getLogger('steadysocket.runtime.manager').debug('[WS] a debug line')\n"
    "logging.getLogger('other.library').debug('not ours')\n"
    "logging.getLogger('other.library').warning('their warning')\n"
)


def stderr_of(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("steadysocket")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    disable_debug_logging()
    logger.setLevel(level)
    assert logger.handlers == handlers


def test_without_logging_setup_nothing_debug_shows() -> None:
    assert stderr_of(EMIT) == ["their warning"]


def test_enabled_the_debug_lines_show_and_other_loggers_stay_as_they_were() -> None:
    lines = stderr_of(
        "import logging\n"
        "from steadysocket.runtime.debuglog import enable_debug_logging\n"
        "enable_debug_logging()\n"
        "enable_debug_logging()\n"
        "root = logging.getLogger()\n"
        "assert root.handlers == [] and root.level == logging.WARNING, root\n" + EMIT
    )
    assert len(lines) == 2, lines
    assert lines[0].endswith(" DEBUG steadysocket.runtime.manager: [WS] a debug line")
    assert lines[1] == "their warning"


def test_with_logging_configured_each_line_is_written_once_by_the_applications_handler() -> None:
    lines = stderr_of(
        "import logging\n"
        "from steadysocket.runtime.debuglog import enable_debug_logging\n"
        "logging.basicConfig(format='app %(name)s %(message)s')\n"
        "enable_debug_logging()\n" + EMIT
    )
    assert lines == [
        "app steadysocket.runtime.manager [WS] a debug line",
        "app other.library their warning",
    ]


def test_a_package_logger_that_does_not_propagate_still_shows_its_lines() -> None:
    lines = stderr_of(
        "import logging\n"
        "from steadysocket.runtime.debuglog import enable_debug_logging\n"
        "logging.basicConfig(format='app %(name)s %(message)s')\n"
        "logging.getLogger('steadysocket').propagate = False\n"
        "enable_debug_logging()\n" + EMIT
    )
    assert lines[0].endswith(" DEBUG steadysocket.runtime.manager: [WS] a debug line")
    assert lines[1:] == ["app other.library their warning"]


def test_enabling_twice_adds_one_handler_to_the_package_logger_only(
    package_logger: logging.Logger,
) -> None:
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    first = enable_debug_logging()
    second = enable_debug_logging()
    assert first is second
    assert package_logger.handlers.count(first) == 1
    assert package_logger.level == logging.DEBUG
    assert root.handlers == root_handlers
    assert root.level == root_level


def test_disabling_removes_the_handler_and_the_level(package_logger: logging.Logger) -> None:
    handler = enable_debug_logging()
    disable_debug_logging()
    assert handler not in package_logger.handlers
    assert package_logger.level == logging.NOTSET
    disable_debug_logging()  # a second time does nothing
    assert package_logger.level == logging.NOTSET


def test_a_failing_stderr_is_reported_by_logging_not_raised(
    package_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = enable_debug_logging()
    errors: list[logging.LogRecord] = []
    monkeypatch.setattr(handler, "handleError", errors.append)

    class Broken:
        def write(self, text: str) -> int:
            raise OSError("stderr is gone")

    monkeypatch.setattr(sys, "stderr", Broken())
    record = logging.LogRecord("steadysocket", logging.DEBUG, __file__, 1, "x", None, None)
    handler.emit(record)
    assert errors == [record]
