"""The lifecycle declaration against a reviewed expectation, row by row.

The expectation (``tests/model/lifecycle_expectation.py``) is written apart from
``model/lifecycle.py``. The generated tests compare every declared transition with it, and
every (phase, event, inputs) the expectation does not list must raise, so a transition that
is changed, added or deleted in one place only fails here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, get_args

import pytest
from statemachine.exceptions import TransitionNotAllowed

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.effects import (
    EFFECT_TYPES,
    Effect,
    OpenSocket,
    ResetBackoff,
    StartTimer,
    Timer,
)
from steadysocket.model.graph import Row, rows
from steadysocket.model.lifecycle import Lifecycle, phases
from steadysocket.model.snapshot import Phase
from tests.model.lifecycle_expectation import (
    ALL_INPUTS,
    EVENTS,
    EXPECTED,
    Expect,
    Inputs,
    expected,
    groups,
)

MAX_ATTEMPTS = 3
CONNECT_MS = 10_000.0
STABLE_MS = 5_000.0
PROBE_MS = 60_000.0
HEARTBEAT_MS = 1_000.0
FIRST_RETRY_MS = 1_000.0
GRACEFUL_MS = 800.0
DRAW = 0.25
"""What the pinned random source returns: a graceful delay is DRAW * GRACEFUL_MS."""


class Pinned:
    """A random source that always returns ``DRAW`` (the backoff has no jitter to draw)."""

    def random(self) -> float:
        return DRAW


class NoDraws:
    """A random source that must not be consulted."""

    def random(self) -> float:
        raise AssertionError("drew a random number")


def _machine(
    phase: Phase = Phase.IDLE, attempts: int = 0, graceful_jitter_ms: float = 0.0
) -> Lifecycle:
    backoff = BackoffStrategy(
        base_delays_ms=(FIRST_RETRY_MS, 2000),
        jitter_ratio=0.0,
        max_attempts=MAX_ATTEMPTS,
        rng=Pinned(),
    )
    return Lifecycle(
        backoff=backoff,
        connection_timeout_ms=CONNECT_MS,
        stable_after_ms=STABLE_MS,
        fallback_probe_interval_ms=PROBE_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
        graceful_jitter_ms=graceful_jitter_ms,
        start_phase=phase,
        attempts=attempts,
    )


# The guards' meanings in terms of the inputs. A guard missing here fails the generated tests,
# so a new guard cannot slip in unreviewed.
GUARDS: dict[str, Callable[[Inputs], bool]] = {
    "is_retryable": lambda inputs: inputs.retryable,
    "is_graceful": lambda inputs: inputs.graceful,
    "has_attempts_left": lambda inputs: inputs.attempts_left,
    "has_graceful_jitter": lambda inputs: inputs.graceful_jitter,
}


def _holds(guard: str, inputs: Inputs) -> bool:
    if not guard:
        return True
    return all(
        not GUARDS[term[4:]](inputs) if term.startswith("not ") else GUARDS[term](inputs)
        for term in guard.split(" and ")
    )


def _inputs_selecting(row: Row) -> list[Inputs]:
    """Inputs under which this row, and no earlier row for its source and event, applies."""
    earlier = [
        r for r in ROWS if (r.source, r.event) == (row.source, row.event) and r.order < row.order
    ]
    return [
        inputs
        for inputs in ALL_INPUTS
        if _holds(row.guard, inputs) and not any(_holds(r.guard, inputs) for r in earlier)
    ]


def _resolved(expect: Expect, attempts_before: int) -> tuple[list[Effect], int]:
    """The effects a machine built by ``_machine`` should hand out for ``expect``, with every
    number filled in by hand, and its attempt counter afterwards."""
    attempts = attempts_before
    out: list[Effect] = []
    for effect in expect.effects:
        match effect:
            case ResetBackoff():
                attempts = 0
            case OpenSocket(probe=probe):
                attempts += 0 if probe else 1
                effect = OpenSocket(probe=probe, attempt=attempts)
            case StartTimer(timer=timer, heartbeats=heartbeats):
                delay = {
                    Timer.CONNECT: CONNECT_MS,
                    Timer.RETRY: FIRST_RETRY_MS,
                    Timer.STABLE: STABLE_MS,
                    Timer.PROBE: PROBE_MS,
                    Timer.HEARTBEAT: (heartbeats or 0.0) * HEARTBEAT_MS,
                    Timer.GRACEFUL: DRAW * GRACEFUL_MS,
                }[timer]
                effect = StartTimer(timer, delay, heartbeats)
        out.append(effect)
    return out, attempts


def _check_against_expectation(source: Phase, event: str, inputs: Inputs) -> None:
    attempts = 1 if inputs.attempts_left else MAX_ATTEMPTS
    window = GRACEFUL_MS if inputs.graceful_jitter else 0.0
    machine = _machine(source, attempts=attempts, graceful_jitter_ms=window)
    expect = expected(source, event, inputs)
    where = f"{source} --{event}--> with {inputs}"
    if expect is None:
        with pytest.raises(TransitionNotAllowed):
            machine.send(event, retryable=inputs.retryable, graceful=inputs.graceful)
        assert machine.phase is source, where
        assert machine.drain() == [], where
        return
    machine.send(event, retryable=inputs.retryable, graceful=inputs.graceful)
    effects, attempts_after = _resolved(expect, attempts)
    assert machine.phase is expect.target, where
    assert machine.drain() == effects, where
    assert machine.attempts == attempts_after, where


ROWS = rows()
EXPECTED_GROUPS = sorted({(e.source, e.event) for e in EXPECTED})


def test_the_expectation_names_every_declared_event_and_is_unambiguous() -> None:
    assert set(EVENTS) == {row.event for row in ROWS}
    for source, event in groups():
        # expected() asserts that at most one row matches.
        listed = [expected(source, event, inputs) for inputs in ALL_INPUTS]
        if (source, event) in EXPECTED_GROUPS:
            assert None not in listed, f"{source} {event}: some inputs have no row"


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_declared_transition(row: Row) -> None:
    """Generated: each declared transition is the reviewed expectation's, for every input
    that selects it, in its declared effects and in what the machine hands out."""
    selecting = _inputs_selecting(row)
    assert selecting, f"{row.id} can never be selected: an earlier guard always wins"
    for inputs in selecting:
        expect = expected(row.source, row.event, inputs)
        assert expect is not None, f"{row.id} with {inputs} is not in the expectation"
        assert row.target is expect.target, f"{row.id} with {inputs}"
        assert row.effects == expect.effects, f"{row.id} with {inputs}"
        _check_against_expectation(row.source, row.event, inputs)


@pytest.mark.parametrize(("source", "event"), list(groups()), ids=[f"{s}-{e}" for s, e in groups()])
def test_every_phase_event_and_input_behaves_as_expected(source: Phase, event: str) -> None:
    """Generated over every pair, declared or not: a deleted transition fails here."""
    for inputs in ALL_INPUTS:
        _check_against_expectation(source, event, inputs)


def test_the_phases_are_the_seven_of_the_seed_in_order() -> None:
    assert [str(p) for p in phases()] == [
        "idle",
        "connecting",
        "open",
        "degraded",
        "reconnecting",
        "failed",
        "fallback",
    ]


def test_phase_is_a_string_valued_enum() -> None:
    as_text: str = Phase.OPEN
    assert as_text == "open"
    assert Phase("open") is Phase.OPEN
    assert _machine(Phase.OPEN).phase is Phase.OPEN


def test_every_phase_has_at_least_one_way_out() -> None:
    sources = {row.source for row in ROWS if row.target is not row.source}
    assert sources == set(Phase)


def test_an_event_the_phase_cannot_take_raises() -> None:
    machine = _machine(Phase.IDLE)
    with pytest.raises(TransitionNotAllowed):
        machine.send("handshake_succeeded")
    assert machine.phase is Phase.IDLE


def test_a_missing_guard_input_raises_instead_of_guessing() -> None:
    machine = _machine(Phase.CONNECTING, attempts=1)
    with pytest.raises(TypeError):
        machine.send("attempt_failed")


def test_exceptions_in_callbacks_propagate() -> None:
    class Exploding(Lifecycle):
        def is_retryable(self, retryable: bool) -> bool:
            raise RuntimeError("boom")

    machine = Exploding(start_phase=Phase.CONNECTING, attempts=1)
    with pytest.raises(RuntimeError, match="boom"):
        machine.send("attempt_failed", retryable=True)


def test_invalid_configuration_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="connection_timeout_ms"):
        Lifecycle(connection_timeout_ms=0)
    with pytest.raises(ValueError, match="fallback_probe_interval_ms"):
        Lifecycle(fallback_probe_interval_ms=-1)


@pytest.mark.parametrize(
    ("option", "smallest_valid", "largest_invalid"),
    [
        ("connection_timeout_ms", 0.001, 0.0),
        ("stable_after_ms", 0.0, -0.001),
        ("fallback_probe_interval_ms", 0.001, 0.0),
        ("graceful_jitter_ms", 0.0, -0.001),
    ],
)
def test_configuration_bounds_are_exact(
    option: str, smallest_valid: float, largest_invalid: float
) -> None:
    """Validation bounds: each option's edge is accepted or refused exactly as documented."""
    invalid: dict[str, Any] = {option: largest_invalid}
    valid: dict[str, Any] = {option: smallest_valid}
    with pytest.raises(ValueError, match=f"{option} must be"):
        Lifecycle(**invalid)
    assert getattr(Lifecycle(**valid), option) == smallest_valid


def test_a_stable_period_of_zero_arms_an_immediate_stable_timer() -> None:
    machine = Lifecycle(stable_after_ms=0, start_phase=Phase.CONNECTING, attempts=1)
    machine.send("handshake_succeeded")
    assert StartTimer(Timer.STABLE, 0.0) in machine.drain()


def test_every_declared_transition_carries_declared_effects_or_none() -> None:
    silent = [row.id for row in ROWS if not row.effects]
    assert silent == ["idle-disconnect-idle"]


def test_an_attempt_counts_and_a_reset_starts_the_outage_again() -> None:
    machine = _machine()
    machine.send("connect")
    assert machine.attempts == 1
    assert [e for e in machine.drain() if isinstance(e, OpenSocket)] == [
        OpenSocket(probe=False, attempt=1)
    ]
    machine.send("attempt_failed", retryable=True)
    machine.send("retry_due")
    assert machine.attempts == 2
    machine.send("handshake_succeeded")
    machine.send("stable")
    assert ResetBackoff() in machine.drain()
    assert machine.attempts == 0


def test_the_last_allowed_failure_goes_to_fallback() -> None:
    machine = _machine()
    machine.send("connect")
    for _ in range(MAX_ATTEMPTS - 1):
        machine.send("attempt_failed", retryable=True)
        assert machine.phase is Phase.FAILED
        machine.send("retry_due")
    machine.send("attempt_failed", retryable=True)
    assert machine.phase is Phase.FALLBACK
    assert machine.attempts == MAX_ATTEMPTS


def test_retry_delays_follow_the_backoff_one_step_per_failure() -> None:
    machine = _machine()
    machine.send("connect")
    delays = []
    for _ in range(MAX_ATTEMPTS - 1):
        machine.drain()
        machine.send("attempt_failed", retryable=True)
        delays += [
            e.delay_ms
            for e in machine.drain()
            if isinstance(e, StartTimer) and e.timer is Timer.RETRY
        ]
        machine.send("retry_due")
    assert delays == [1000.0, 2000.0]


def test_heartbeat_timers_scale_with_the_hello_interval() -> None:
    machine = _machine(Phase.CONNECTING, attempts=1)
    machine.send("handshake_succeeded")
    [heartbeat] = [
        e for e in machine.drain() if isinstance(e, StartTimer) and e.timer is Timer.HEARTBEAT
    ]
    assert heartbeat.delay_ms == pytest.approx(1200.0)
    machine.send("heartbeat_overdue")
    [dead] = [
        e for e in machine.drain() if isinstance(e, StartTimer) and e.timer is Timer.HEARTBEAT
    ]
    assert dead.delay_ms == pytest.approx(800.0)


def test_without_a_heartbeat_interval_no_watchdog_is_armed() -> None:
    machine = Lifecycle(start_phase=Phase.CONNECTING, attempts=1)
    machine.send("handshake_succeeded")
    assert not [
        e for e in machine.drain() if isinstance(e, StartTimer) and e.timer is Timer.HEARTBEAT
    ]


def test_with_probing_disabled_fallback_arms_no_probe_timer() -> None:
    machine = Lifecycle(start_phase=Phase.CONNECTING, attempts=1, fallback_probe_interval_ms=None)
    machine.send("attempt_failed", retryable=False)
    assert machine.phase is Phase.FALLBACK
    assert not [e for e in machine.drain() if isinstance(e, StartTimer)]


def test_every_effect_type_is_listed_and_documented_for_the_table() -> None:
    assert set(EFFECT_TYPES) == set(get_args(Effect))
    for effect_type in EFFECT_TYPES:
        assert effect_type.__doc__
        assert len(effect_type.__doc__.split()) >= 5


def test_the_lifecycle_defaults_are_the_documented_ones() -> None:
    machine = Lifecycle()
    assert machine.phase is Phase.IDLE
    assert machine.attempts == 0
    assert machine.connection_timeout_ms == 10_000
    assert machine.stable_after_ms == 5_000
    assert machine.fallback_probe_interval_ms == 60_000
    assert machine.heartbeat_interval_ms is None
    assert machine.graceful_jitter_ms == 1000  # a server's clients spread over a second


# -- the graceful reconnect's delay ------------------------------------------------------------


def test_a_graceful_close_with_a_window_waits_a_delay_drawn_from_the_backoffs_source() -> None:
    backoff = BackoffStrategy(jitter_ratio=0.2, rng=random.Random(7))
    machine = Lifecycle(
        backoff=backoff, graceful_jitter_ms=1000, start_phase=Phase.OPEN, attempts=1
    )
    machine.send("connection_lost", retryable=True, graceful=True)
    assert machine.phase is Phase.RECONNECTING
    assert machine.attempts == 1
    [delay] = [e for e in machine.drain() if isinstance(e, StartTimer)]
    assert delay == StartTimer(Timer.GRACEFUL, 1000 * random.Random(7).random())
    machine.send("reconnect_due")
    assert machine.phase is Phase.RECONNECTING
    assert machine.drain() == [OpenSocket(attempt=2), StartTimer(Timer.CONNECT, 10_000)]


def test_a_graceful_delay_takes_no_backoff_step() -> None:
    machine = _machine(Phase.OPEN, attempts=1, graceful_jitter_ms=GRACEFUL_MS)
    machine.send("connection_lost", retryable=True, graceful=True)
    machine.send("reconnect_due")
    machine.send("attempt_failed", retryable=True)
    assert machine.backoff.current_attempt == 1
    assert StartTimer(Timer.RETRY, FIRST_RETRY_MS) in machine.drain()


def test_graceful_delays_lie_within_the_window() -> None:
    backoff = BackoffStrategy(jitter_ratio=0.0, rng=random.Random(3))
    delays = []
    for _ in range(200):
        machine = Lifecycle(
            backoff=backoff, graceful_jitter_ms=250, start_phase=Phase.DEGRADED, attempts=1
        )
        machine.send("connection_lost", retryable=True, graceful=True)
        delays += [e.delay_ms for e in machine.drain() if isinstance(e, StartTimer)]
    assert len(delays) == 200
    assert all(delay is not None and 0 <= delay < 250 for delay in delays)
    assert len(set(delays)) == 200


def test_without_a_window_a_graceful_close_draws_nothing_and_reconnects_at_once() -> None:
    backoff = BackoffStrategy(jitter_ratio=0.0, rng=NoDraws())
    machine = Lifecycle(backoff=backoff, start_phase=Phase.OPEN, attempts=1, graceful_jitter_ms=0)
    machine.send("connection_lost", retryable=True, graceful=True)
    assert OpenSocket(attempt=2) in machine.drain()


@pytest.mark.parametrize("window", [-1.0, math.nan, math.inf])
def test_a_graceful_window_must_be_a_finite_number_of_at_least_zero(window: float) -> None:
    with pytest.raises(ValueError, match="graceful_jitter_ms must be a finite number >= 0"):
        Lifecycle(graceful_jitter_ms=window)
