"""The lifecycle declaration: strictness, phases, and one generated test per declared transition."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import get_args

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

MAX_ATTEMPTS = 3


def _machine(phase: Phase = Phase.IDLE, attempts: int = 0) -> Lifecycle:
    backoff = BackoffStrategy(
        base_delays_ms=(1000, 2000), jitter_ratio=0.0, max_attempts=MAX_ATTEMPTS
    )
    return Lifecycle(
        backoff=backoff, heartbeat_interval_ms=1000, start_phase=phase, attempts=attempts
    )


# The guards' meanings, in terms of the inputs a test controls. A guard missing here fails the
# generated tests, so a new guard cannot slip in untested.
Env = Mapping[str, object]
GUARDS: dict[str, Callable[[Env], bool]] = {
    "is_retryable": lambda env: bool(env["retryable"]),
    "is_graceful": lambda env: bool(env["graceful"]),
    "has_attempts_left": lambda env: int(str(env["attempts"])) < MAX_ATTEMPTS,
}
ENVIRONMENTS: list[dict[str, object]] = [
    {"retryable": r, "graceful": g, "attempts": a}
    for r, g, a in itertools.product((True, False), (True, False), (1, MAX_ATTEMPTS))
]


def _holds(guard: str, env: Env) -> bool:
    if not guard:
        return True
    return all(
        not GUARDS[term[4:]](env) if term.startswith("not ") else GUARDS[term](env)
        for term in guard.split(" and ")
    )


def _environment_selecting(row: Row) -> Env:
    """Inputs under which this row, and no earlier row for the same source and event, applies."""
    earlier = [
        r for r in ROWS if (r.source, r.event) == (row.source, row.event) and r.order < row.order
    ]
    for env in ENVIRONMENTS:
        if _holds(row.guard, env) and not any(_holds(r.guard, env) for r in earlier):
            return env
    raise AssertionError(f"{row.id} can never be selected: an earlier guard always wins")


ROWS = rows()


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


def test_every_declared_transition_carries_declared_effects_or_none() -> None:
    silent = [row.id for row in ROWS if not row.effects]
    assert silent == ["idle-disconnect-idle"]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_declared_transition(row: Row) -> None:
    """Generated: each declared transition fires under its guard and emits its effects."""
    env = _environment_selecting(row)
    attempts = int(str(env["attempts"])) if row.source is not Phase.IDLE else 0
    machine = _machine(row.source, attempts=attempts)
    machine.send(row.event, retryable=env["retryable"], graceful=env["graceful"])
    assert machine.phase is row.target
    emitted = machine.drain()
    assert [type(e) for e in emitted] == [type(e) for e in row.effects]
    for declared, resolved in zip(row.effects, emitted, strict=True):
        if isinstance(declared, StartTimer):
            assert isinstance(resolved, StartTimer)
            assert resolved.timer is declared.timer
            assert resolved.delay_ms is not None
            assert resolved.delay_ms > 0
        elif isinstance(declared, OpenSocket):
            assert isinstance(resolved, OpenSocket)
            assert resolved.probe is declared.probe
        else:
            assert resolved == declared


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
