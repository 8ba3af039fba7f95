"""Effects: what a lifecycle transition asks the runtime to do, as plain data.

The lifecycle declaration (``steadysocket.model.lifecycle``) names these effects on each
transition. The model resolves the numbers a runtime needs (a timer's delay, an attempt's
number) and hands the runtime a list of resolved effects. The model checker explores exactly
the same list, so what is checked is what runs.

Effects are idempotent on purpose: cancelling a timer that is not pending, or closing when no
socket exists, does nothing. That lets every exit from a phase clean up everything the phase may
hold without the declaration having to know which sub-situation it is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Timer(StrEnum):
    """The timers a client can have pending; at most one of each kind at a time."""

    CONNECT = "connect"
    """Bounds one attempt: socket up and a valid hello within ``connection_timeout_ms``."""
    RETRY = "retry"
    """The backoff delay spent in ``failed`` before the next attempt."""
    HEARTBEAT = "heartbeat"
    """The silence watchdog while ``open`` or ``degraded``."""
    PROBE = "probe"
    """The recovery probe's interval while in ``fallback``."""
    STABLE = "stable"
    """Fires once a connection has stayed open long enough to end the outage."""
    GRACEFUL = "graceful"
    """The random delay, within ``graceful_jitter_ms``, spent in ``reconnecting`` after a
    graceful close (1001 with ``graceful_reconnect``) before its attempt: so that the clients
    of a server going away do not all dial at the same instant."""


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Start one connection attempt: a socket task dials the URL and waits for the hello.

    ``probe`` attempts (from fallback) are not counted against max_attempts.
    """

    probe: bool = False
    attempt: int | None = None
    """Resolved: the attempt's number within the outage (probes keep the last number)."""


@dataclass(frozen=True, slots=True)
class CloseSocket:
    """Close the current socket, if any, with this code and reason; its task is cancelled and
    the closing handshake is bounded, so a dead peer cannot hold it open."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartTimer:
    """Arm a timer: a task sleeps ``delay_ms`` on the injected clock, then reports the firing.

    ``delay_ms`` is None in the declaration and resolved by the model.

    ``heartbeats`` declares a heartbeat timer's length in heartbeat intervals, since the
    interval itself is only known from the server's hello.
    """

    timer: Timer
    delay_ms: float | None = None
    heartbeats: float | None = None
    token: int | None = None
    """Resolved by the client core: a firing reports it back, so a stale firing is ignored."""


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Disarm a timer if it is pending (its task is cancelled; a late firing is ignored)."""

    timer: Timer


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send the client's own application-level ``ping`` (the probe on entering degraded)."""


@dataclass(frozen=True, slots=True)
class FlushQueue:
    """Send every queued message, in order, on the new connection (before anything newer)."""


@dataclass(frozen=True, slots=True)
class ReturnQueue:
    """Hand every queued message back to the application (``on_returned`` listeners or
    ``take_returned()``): it can no longer be sent, and it is never dropped silently."""


@dataclass(frozen=True, slots=True)
class ResetBackoff:
    """End the outage: the attempt counter and the backoff start again from the first step."""


Effect = (
    OpenSocket
    | CloseSocket
    | StartTimer
    | CancelTimer
    | SendPing
    | FlushQueue
    | ReturnQueue
    | ResetBackoff
)

EFFECT_TYPES: tuple[type[Effect], ...] = (
    OpenSocket,
    CloseSocket,
    StartTimer,
    CancelTimer,
    SendPing,
    FlushQueue,
    ReturnQueue,
    ResetBackoff,
)
"""Every effect type, in the order the docs list them."""


def describe(effect: Effect) -> str:
    """A short human-readable form, used by the generated transition table and diagrams."""
    match effect:
        case OpenSocket(probe=True):
            return "open socket (probe)"
        case OpenSocket():
            return "open socket"
        case CloseSocket(code=code, reason=reason):
            return f"close {code} {reason!r}"
        case StartTimer(timer=timer):
            return f"start {timer} timer"
        case CancelTimer(timer=timer):
            return f"cancel {timer} timer"
        case SendPing():
            return "send ping"
        case FlushQueue():
            return "flush queue"
        case ReturnQueue():
            return "return queue"
        case ResetBackoff():  # pragma: no branch - the match covers every Effect
            return "reset backoff"
