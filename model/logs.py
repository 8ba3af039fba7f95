"""Logging with duplicate suppression, for the ``[WS] ...`` lines of the seed.

Reconnect loops repeat themselves. Consecutive identical lines are counted instead of written,
and when a different line follows, one summary line reports how many were suppressed. Records go
through ordinary ``logging`` loggers; nothing here configures handlers.
"""

from __future__ import annotations

import logging
from typing import Any


class DedupLogger:
    """Wraps a ``logging.Logger``; suppresses a line equal to the one logged just before it."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._last: tuple[int, str] | None = None
        self._suppressed = 0

    def log(self, level: int, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at ``level`` unless it repeats the previous line."""
        if not self.logger.isEnabledFor(level):
            return
        text = msg % args if args else msg
        key = (level, text)
        if key == self._last:
            self._suppressed += 1
            return
        if self._suppressed:
            last_level, last_text = self._last or (level, "")
            self.logger.log(
                last_level,
                "[WS] previous message repeated %d more time%s: %s",
                self._suppressed,
                "" if self._suppressed == 1 else "s",
                last_text,
            )
            self._suppressed = 0
        self._last = key
        self.logger.log(level, "%s", text)

    def debug(self, msg: str, *args: Any) -> None:
        """Log at DEBUG with suppression."""
        self.log(logging.DEBUG, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        """Log at INFO with suppression."""
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        """Log at WARNING with suppression."""
        self.log(logging.WARNING, msg, *args)
