"""``WS_DEBUG=1``: the library's debug lines on stderr, in a program that set up no logging.

:func:`enable_debug_logging` sets the ``steadysocket`` logger to DEBUG and gives it one handler
of its own. Nothing else is touched: the root logger keeps its level and handlers, and other
libraries' loggers stay as they were. The handler writes only while the root logger has no
handlers, so in a program that configured logging (``logging.basicConfig()``, a framework's
setup, pytest's capture) the lines go through that configuration alone and are never written
twice.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOGGER_NAME", "disable_debug_logging", "enable_debug_logging"]

LOGGER_NAME = "steadysocket"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DebugHandler(logging.Handler):
    """Writes to the ``sys.stderr`` of the moment (so redirections and capture see it)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(FORMAT))

    def filter(self, record: logging.LogRecord) -> bool:
        package = logging.getLogger(LOGGER_NAME)
        if package.propagate and logging.getLogger().handlers:
            # The application configured logging: its handlers show the record.
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _installed(logger: logging.Logger) -> _DebugHandler | None:
    for handler in logger.handlers:
        if isinstance(handler, _DebugHandler):
            return handler
    return None


def enable_debug_logging() -> logging.Handler:
    """Make the ``steadysocket`` loggers' debug lines visible on stderr.

    Idempotent: a second call adds no second handler. Returns the handler.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    handler = _installed(logger)
    if handler is None:
        handler = _DebugHandler()
        logger.addHandler(handler)
    return handler


def disable_debug_logging() -> None:
    """Undo :func:`enable_debug_logging`: remove its handler and reset the logger's level."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = _installed(logger)
    if handler is not None:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
