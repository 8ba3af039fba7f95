"""Logging with duplicate suppression, for the ``[WS] ...`` lines of the seed.

Reconnect loops repeat themselves. Consecutive identical lines are counted instead of written,
and one summary line reports how many were suppressed as soon as the run of repeats ends: when a
different line is logged, or when an input to the client ends without repeating the line (the
driver calls :meth:`DedupLogger.end_step` after each input). So the summary comes out next to
the repeats it counts, not later beside an unrelated line. Records go through ordinary
``logging`` loggers; nothing here configures handlers.
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
        self._seen_in_step = False

    def log(self, level: int, msg: str, *args: Any) -> None:
        """Log ``msg % args`` at ``level`` unless it repeats the previous line."""
        if not self.logger.isEnabledFor(level):
            return
        text = msg % args if args else msg
        key = (level, text)
        self._seen_in_step = True
        if key == self._last:
            self._suppressed += 1
            return
        self.flush()
        self._last = key
        self.logger.log(level, "%s", text)

    def flush(self) -> None:
        """End the current run of repeats now: write its summary, if any was suppressed.

        The next line is written even if it equals the last one (it starts a new run).
        """
        if self._suppressed and self._last is not None:
            last_level, last_text = self._last
            self.logger.log(
                last_level,
                "[WS] previous message repeated %d more time%s: %s",
                self._suppressed,
                "" if self._suppressed == 1 else "s",
                last_text,
            )
        self._suppressed = 0
        self._last = None

    def end_step(self) -> None:
        """Mark the end of one input to the client (a call, an event, a timer).

        An input that logged nothing (at an enabled level) ends the run of repeats, and its
        summary is written now. An input that repeated the line again keeps the run going.
        """
        if not self._seen_in_step:
            self.flush()
        self._seen_in_step = False

    def debug(self, msg: str, *args: Any) -> None:
        """Log at DEBUG with suppression."""
        self.log(logging.DEBUG, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        """Log at INFO with suppression."""
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        """Log at WARNING with suppression."""
        self.log(logging.WARNING, msg, *args)
