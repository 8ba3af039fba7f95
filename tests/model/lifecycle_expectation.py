"""The reviewed expectation of the lifecycle: an oracle written apart from the declaration.

``model/lifecycle.py`` declares the lifecycle once, and the diagrams, the docs and the runtime
read that declaration. Tests that build their expectations from it cannot notice a transition
that was changed or deleted, so this file says again, by hand and on purpose, what every phase
does with every event: for each (phase, event) and each combination of the event's inputs, the
target phase and the effects in the order the runtime carries them out.

Nothing here is imported from ``steadysocket.model.lifecycle``. Changing the lifecycle means
changing both places, and the diff of this file is what a reviewer reads.
``tests/model/test_lifecycle.py`` compares the declaration against it, row by row, and checks
that every (phase, event, inputs) not listed here raises ``TransitionNotAllowed``.

The inputs a guard can read:

- ``retryable``: the failure can be fixed by retrying (``classify``);
- ``graceful``: a 1001 from a server that advertised ``graceful_reconnect``;
- ``attempts_left``: another counted attempt fits within ``max_attempts``;
- ``graceful_jitter``: the configuration has a window (``graceful_jitter_ms`` > 0) that a
  graceful reconnect's delay is drawn from.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from steadysocket.model.effects import (
    CancelTimer,
    CloseSocket,
    Effect,
    FlushQueue,
    OpenSocket,
    ResetBackoff,
    ReturnQueue,
    SendPing,
    StartTimer,
    Timer,
)
from steadysocket.model.snapshot import Phase

IDLE = Phase.IDLE
CONNECTING = Phase.CONNECTING
OPEN = Phase.OPEN
DEGRADED = Phase.DEGRADED
RECONNECTING = Phase.RECONNECTING
FAILED = Phase.FAILED
FALLBACK = Phase.FALLBACK

EVENTS = (
    "connect",
    "disconnect",
    "force_reconnect",
    "handshake_succeeded",
    "attempt_failed",
    "retry_due",
    "reconnect_due",
    "connection_lost",
    "closed_by_server",
    "heartbeat_overdue",
    "traffic_resumed",
    "peer_dead",
    "stable",
    "probe_due",
)
"""Every event of the lifecycle (the module docstring of ``model/lifecycle.py`` names them)."""


@dataclass(frozen=True, slots=True)
class Inputs:
    """One combination of what the guards can read."""

    retryable: bool
    graceful: bool
    attempts_left: bool
    graceful_jitter: bool

    def __str__(self) -> str:
        return (
            f"retryable={self.retryable} graceful={self.graceful} "
            f"attempts_left={self.attempts_left} graceful_jitter={self.graceful_jitter}"
        )


ALL_INPUTS = tuple(Inputs(*combo) for combo in itertools.product((True, False), repeat=4))


@dataclass(frozen=True, slots=True)
class When:
    """Which inputs a row applies to; None means "either"."""

    retryable: bool | None = None
    graceful: bool | None = None
    attempts_left: bool | None = None
    graceful_jitter: bool | None = None

    def matches(self, inputs: Inputs) -> bool:
        """Whether this condition holds for ``inputs``."""
        return all(
            wanted is None or wanted is actual
            for wanted, actual in (
                (self.retryable, inputs.retryable),
                (self.graceful, inputs.graceful),
                (self.attempts_left, inputs.attempts_left),
                (self.graceful_jitter, inputs.graceful_jitter),
            )
        )


ALWAYS = When()


@dataclass(frozen=True, slots=True)
class Expect:
    """One row of the expectation."""

    source: Phase
    event: str
    when: When
    target: Phase
    effects: tuple[Effect, ...]


# -- the effects, spelled out ----------------------------------------------------------------

CANCEL_EVERY_TIMER: tuple[Effect, ...] = (
    CancelTimer(Timer.CONNECT),
    CancelTimer(Timer.RETRY),
    CancelTimer(Timer.HEARTBEAT),
    CancelTimer(Timer.PROBE),
    CancelTimer(Timer.STABLE),
    CancelTimer(Timer.GRACEFUL),
)
NEW_ATTEMPT: tuple[Effect, ...] = (OpenSocket(), StartTimer(Timer.CONNECT))
ENTER_OPEN: tuple[Effect, ...] = (
    CancelTimer(Timer.CONNECT),
    StartTimer(Timer.HEARTBEAT, heartbeats=1.2),
    StartTimer(Timer.STABLE),
    FlushQueue(),
)
ABANDON_ATTEMPT: tuple[Effect, ...] = (
    CancelTimer(Timer.CONNECT),
    CloseSocket(1000, "Attempt abandoned"),
)
LEAVE_OPEN: tuple[Effect, ...] = (CancelTimer(Timer.HEARTBEAT), CancelTimer(Timer.STABLE))
GIVE_UP: tuple[Effect, ...] = (ReturnQueue(), StartTimer(Timer.PROBE))
WAIT_ONE_STEP: tuple[Effect, ...] = (StartTimer(Timer.RETRY),)
WAIT_GRACEFUL_DELAY: tuple[Effect, ...] = (StartTimer(Timer.GRACEFUL),)
DISCONNECT: tuple[Effect, ...] = (
    *CANCEL_EVERY_TIMER,
    CloseSocket(1000, "Client disconnect"),
    ReturnQueue(),
)
FRESH_ATTEMPT: tuple[Effect, ...] = (
    *CANCEL_EVERY_TIMER,
    CloseSocket(1000, "Client reconnect"),
    ResetBackoff(),
    *NEW_ATTEMPT,
)
HEARTBEAT_TIMEOUT = CloseSocket(1000, "heartbeat timeout")

NOT_RETRYABLE = When(retryable=False)
NONE_LEFT = When(retryable=True, attempts_left=False)
RETRY = When(retryable=True, attempts_left=True)


def _attempt_failed(source: Phase) -> list[Expect]:
    """A failed attempt while connecting or reconnecting."""
    return [
        Expect(source, "attempt_failed", NOT_RETRYABLE, FALLBACK, (*ABANDON_ATTEMPT, *GIVE_UP)),
        Expect(source, "attempt_failed", NONE_LEFT, FALLBACK, (*ABANDON_ATTEMPT, *GIVE_UP)),
        Expect(source, "attempt_failed", RETRY, FAILED, (*ABANDON_ATTEMPT, *WAIT_ONE_STEP)),
    ]


def _connection_lost(source: Phase) -> list[Expect]:
    """An open (or degraded) connection ended other than by a normal close."""
    spread = When(retryable=True, graceful=True, attempts_left=True, graceful_jitter=True)
    at_once = When(retryable=True, graceful=True, attempts_left=True, graceful_jitter=False)
    abrupt = When(retryable=True, graceful=False, attempts_left=True)
    return [
        Expect(source, "connection_lost", NOT_RETRYABLE, FALLBACK, (*LEAVE_OPEN, *GIVE_UP)),
        Expect(source, "connection_lost", NONE_LEFT, FALLBACK, (*LEAVE_OPEN, *GIVE_UP)),
        # A graceful 1001 reconnects with no backoff step, from open and degraded: after a
        # random delay when a window is configured (reconnecting, no attempt yet), else at once.
        Expect(
            source, "connection_lost", spread, RECONNECTING, (*LEAVE_OPEN, *WAIT_GRACEFUL_DELAY)
        ),
        Expect(source, "connection_lost", at_once, RECONNECTING, (*LEAVE_OPEN, *NEW_ATTEMPT)),
        Expect(source, "connection_lost", abrupt, FAILED, (*LEAVE_OPEN, *WAIT_ONE_STEP)),
        Expect(source, "closed_by_server", ALWAYS, IDLE, LEAVE_OPEN),
        Expect(source, "stable", ALWAYS, source, (ResetBackoff(),)),
    ]


def _application_exits(source: Phase) -> list[Expect]:
    """disconnect() goes idle and force_reconnect() starts a fresh attempt, from anywhere."""
    return [
        Expect(source, "disconnect", ALWAYS, IDLE, DISCONNECT),
        Expect(source, "force_reconnect", ALWAYS, CONNECTING, FRESH_ATTEMPT),
    ]


EXPECTED: tuple[Expect, ...] = (
    # idle
    Expect(IDLE, "connect", ALWAYS, CONNECTING, (ResetBackoff(), *NEW_ATTEMPT)),
    Expect(IDLE, "disconnect", ALWAYS, IDLE, ()),
    Expect(IDLE, "force_reconnect", ALWAYS, CONNECTING, FRESH_ATTEMPT),
    # connecting: the first attempt of an outage
    Expect(CONNECTING, "handshake_succeeded", ALWAYS, OPEN, ENTER_OPEN),
    *_attempt_failed(CONNECTING),
    *_application_exits(CONNECTING),
    # open
    *_connection_lost(OPEN),
    Expect(
        OPEN,
        "heartbeat_overdue",
        ALWAYS,
        DEGRADED,
        (SendPing(), StartTimer(Timer.HEARTBEAT, heartbeats=0.8)),
    ),
    *_application_exits(OPEN),
    # degraded: open, but silent for 1.2 heartbeat intervals
    *_connection_lost(DEGRADED),
    Expect(
        DEGRADED,
        "traffic_resumed",
        ALWAYS,
        OPEN,
        (CancelTimer(Timer.HEARTBEAT), StartTimer(Timer.HEARTBEAT, heartbeats=1.2)),
    ),
    Expect(
        DEGRADED,
        "peer_dead",
        When(attempts_left=False),
        FALLBACK,
        (HEARTBEAT_TIMEOUT, *LEAVE_OPEN, *GIVE_UP),
    ),
    Expect(
        DEGRADED,
        "peer_dead",
        When(attempts_left=True),
        RECONNECTING,
        (*LEAVE_OPEN, HEARTBEAT_TIMEOUT, *NEW_ATTEMPT),
    ),
    *_application_exits(DEGRADED),
    # reconnecting: every later attempt of an outage
    Expect(RECONNECTING, "handshake_succeeded", ALWAYS, OPEN, ENTER_OPEN),
    # the graceful delay is over: the attempt it held back starts, still no backoff step
    Expect(RECONNECTING, "reconnect_due", ALWAYS, RECONNECTING, NEW_ATTEMPT),
    *_attempt_failed(RECONNECTING),
    *_application_exits(RECONNECTING),
    # failed: waiting one backoff step
    Expect(FAILED, "retry_due", ALWAYS, RECONNECTING, NEW_ATTEMPT),
    *_application_exits(FAILED),
    # fallback: gave up; the recovery probe runs inside it
    Expect(FALLBACK, "connect", ALWAYS, CONNECTING, FRESH_ATTEMPT),
    Expect(FALLBACK, "probe_due", ALWAYS, FALLBACK, (OpenSocket(probe=True), *NEW_ATTEMPT[1:])),
    Expect(FALLBACK, "handshake_succeeded", ALWAYS, OPEN, ENTER_OPEN),
    Expect(
        FALLBACK,
        "attempt_failed",
        ALWAYS,
        FALLBACK,
        (*ABANDON_ATTEMPT, StartTimer(Timer.PROBE)),
    ),
    *_application_exits(FALLBACK),
)


def expected(source: Phase, event: str, inputs: Inputs) -> Expect | None:
    """The row for this phase, event and inputs, or None: the phase does not take the event."""
    matching = [
        row
        for row in EXPECTED
        if (row.source, row.event) == (source, event) and row.when.matches(inputs)
    ]
    assert len(matching) <= 1, f"the expectation is ambiguous for {source} {event} {inputs}"
    return matching[0] if matching else None


def groups() -> Iterator[tuple[Phase, str]]:
    """Every (phase, event) pair, listed or not."""
    return itertools.product(Phase, EVENTS)
