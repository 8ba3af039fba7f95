"""The test suite's fakes: the public ones of :mod:`steadysocket.testing` under their old names,
and the helpers only this suite needs.

How to use them: ``from tests.runtime.fakes import InMemoryServer, Script, VirtualClock``.
pytest runs with ``--import-mode=importlib``; since pytest 8.1 that mode imports the test
directories as the namespace packages ``tests`` and ``tests.runtime`` rooted at the repository
(there is no ``__init__.py``), so this import works from any working directory, and mypy
(``--explicit-package-bases``, run from the repository root) resolves the same name. No conftest
and no ``sys.path`` change are involved.

The virtual clock and the scripted servers moved to :mod:`steadysocket.testing` (its module
docstring says how they work) so that users can test their own applications with them. They are
re-exported here unchanged, the script's mode under its old name ``Mode``
(``steadysocket.testing.ScriptMode``; ``steadysocket.testing.Mode`` is the fault proxy's).
What stays here is test-suite specific: :func:`failures_into` and
:data:`unexpected_server_errors`.
"""

from __future__ import annotations

from collections.abc import Callable

from steadysocket.runtime.manager import ServerError, WSError
from steadysocket.testing import (
    LATE_HELLO_OWNER,
    AttemptRecord,
    ClockEntry,
    ConnectionRecord,
    ConnState,
    InMemoryServer,
    LoopbackServer,
    MemoryTransport,
    Script,
    ScriptedServer,
    SleepRecord,
    VirtualClock,
)
from steadysocket.testing import ScriptMode as Mode

__all__ = [
    "LATE_HELLO_OWNER",
    "AttemptRecord",
    "ClockEntry",
    "ConnState",
    "ConnectionRecord",
    "InMemoryServer",
    "LoopbackServer",
    "MemoryTransport",
    "Mode",
    "Script",
    "ScriptedServer",
    "SleepRecord",
    "VirtualClock",
    "failures_into",
    "unexpected_server_errors",
]


def failures_into(target: list[WSError]) -> Callable[[WSError | ServerError], None]:
    """An ``on_error`` listener that keeps the connection failures (``WSError``).

    The fake servers never send ``error`` messages, so a ``ServerError`` here would be a bug in
    the test set-up: it is kept apart in ``unexpected_server_errors`` for the test to check.
    """

    def collect(error: WSError | ServerError) -> None:
        if isinstance(error, WSError):
            target.append(error)
        else:
            unexpected_server_errors.append(error)

    return collect


unexpected_server_errors: list[ServerError] = []
