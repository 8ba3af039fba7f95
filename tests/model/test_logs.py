"""``DedupLogger``: consecutive identical lines are suppressed and counted (PROTOCOL Client 14)."""

from __future__ import annotations

import logging

import pytest

from steadysocket.model.logs import DedupLogger

LOGGER = "steadysocket.tests.logs"


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> DedupLogger:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return DedupLogger(logging.getLogger(LOGGER))


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER]


class CountingArg:
    """A log argument that counts how often it is turned into text."""

    def __init__(self) -> None:
        self.formatted = 0

    def __str__(self) -> str:
        self.formatted += 1
        return "arg"


def test_consecutive_identical_lines_are_written_once(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        log.info("[WS] Attempting WebSocket connection")
    assert lines(caplog) == [("INFO", "[WS] Attempting WebSocket connection")]


def test_the_suppressed_count_is_reported_when_a_different_line_follows(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        log.warning("[WS] Connection failed: %s", "refused")
    log.info("[WS] retrying in %.0f ms", 1000.0)
    assert lines(caplog) == [
        ("WARNING", "[WS] Connection failed: refused"),
        ("WARNING", "[WS] previous message repeated 2 more times: [WS] Connection failed: refused"),
        ("INFO", "[WS] retrying in 1000 ms"),
    ]


def test_one_suppressed_line_is_reported_in_the_singular(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("a")
    log.info("a")
    log.info("b")
    assert lines(caplog) == [
        ("INFO", "a"),
        ("INFO", "[WS] previous message repeated 1 more time: a"),
        ("INFO", "b"),
    ]


def test_a_line_that_repeats_nothing_gets_no_summary(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("a")
    log.info("b")
    log.info("a")
    assert lines(caplog) == [("INFO", "a"), ("INFO", "b"), ("INFO", "a")]


def test_the_count_restarts_after_each_summary(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    for text in ("a", "a", "a", "b", "b", "a"):
        log.info(text)
    assert lines(caplog) == [
        ("INFO", "a"),
        ("INFO", "[WS] previous message repeated 2 more times: a"),
        ("INFO", "b"),
        ("INFO", "[WS] previous message repeated 1 more time: b"),
        ("INFO", "a"),
    ]


def test_the_same_text_at_different_levels_is_different_lines(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("[WS] same")
    log.warning("[WS] same")
    log.debug("[WS] same")
    assert lines(caplog) == [
        ("INFO", "[WS] same"),
        ("WARNING", "[WS] same"),
        ("DEBUG", "[WS] same"),
    ]


def test_lines_are_compared_after_formatting(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("[WS] attempt %d", 1)
    log.info("[WS] attempt %d", 2)
    log.info("[WS] attempt 2")
    assert lines(caplog) == [("INFO", "[WS] attempt 1"), ("INFO", "[WS] attempt 2")]


def test_a_line_without_arguments_is_not_percent_formatted(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("100% done")
    assert lines(caplog) == [("INFO", "100% done")]


def test_a_percent_in_an_argument_reaches_the_handler_verbatim(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("[WS] reason: %s", "50% %s %d")
    assert lines(caplog) == [("INFO", "[WS] reason: 50% %s %d")]


def test_disabled_levels_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = DedupLogger(logging.getLogger(LOGGER))
    arg = CountingArg()

    for _ in range(3):
        log.debug("[WS] ignoring %s", arg)

    assert arg.formatted == 0
    assert lines(caplog) == []
    log.info("[WS] %s", arg)
    assert arg.formatted == 1
    assert lines(caplog) == [("INFO", "[WS] arg")]


def test_a_disabled_line_does_not_break_a_run_of_repeats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = DedupLogger(logging.getLogger(LOGGER))
    log.info("a")
    log.debug("hidden")
    log.info("a")
    log.info("b")
    assert lines(caplog) == [
        ("INFO", "a"),
        ("INFO", "[WS] previous message repeated 1 more time: a"),
        ("INFO", "b"),
    ]


def test_each_dedup_logger_tracks_its_own_last_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = DedupLogger(logging.getLogger(LOGGER))
    second = DedupLogger(logging.getLogger(LOGGER))
    first.info("a")
    second.info("a")
    first.info("a")
    assert lines(caplog) == [("INFO", "a"), ("INFO", "a")]


def test_the_summary_comes_out_when_the_run_ends_not_beside_the_next_line(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    # Three inputs each log the same line; the fourth logs nothing: the run ended there.
    for _ in range(3):
        log.warning("[WS] Connection failed: %s", "refused")
        log.end_step()
    assert lines(caplog) == [("WARNING", "[WS] Connection failed: refused")]
    log.end_step()
    summary = (
        "WARNING",
        "[WS] previous message repeated 2 more times: [WS] Connection failed: refused",
    )
    assert lines(caplog) == [("WARNING", "[WS] Connection failed: refused"), summary]
    log.info("[WS] transition from failed to reconnecting")
    assert lines(caplog)[-2:] == [summary, ("INFO", "[WS] transition from failed to reconnecting")]


def test_an_input_that_repeats_the_line_keeps_the_run_going(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("a")
    log.end_step()
    log.info("a")
    log.info("a")
    log.end_step()
    log.info("a")
    log.end_step()
    assert lines(caplog) == [("INFO", "a")]
    log.end_step()
    assert lines(caplog) == [
        ("INFO", "a"),
        ("INFO", "[WS] previous message repeated 3 more times: a"),
    ]


def test_after_a_quiet_input_the_same_line_starts_a_new_run(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.info("a")
    log.end_step()
    log.end_step()
    log.info("a")
    log.end_step()
    assert lines(caplog) == [("INFO", "a"), ("INFO", "a")]


def test_an_input_with_only_disabled_lines_ends_the_run(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = DedupLogger(logging.getLogger(LOGGER))
    log.info("a")
    log.info("a")
    log.end_step()
    log.debug("hidden")
    log.end_step()
    assert lines(caplog) == [
        ("INFO", "a"),
        ("INFO", "[WS] previous message repeated 1 more time: a"),
    ]


def test_flush_writes_the_pending_summary_once_and_nothing_when_none_is_pending(
    log: DedupLogger, caplog: pytest.LogCaptureFixture
) -> None:
    log.flush()
    assert lines(caplog) == []
    log.info("a")
    log.flush()
    assert lines(caplog) == [("INFO", "a")]
    log.info("a")
    log.info("a")
    log.flush()
    log.flush()
    assert lines(caplog) == [
        ("INFO", "a"),
        ("INFO", "a"),
        ("INFO", "[WS] previous message repeated 1 more time: a"),
    ]
