"""The connection lifecycle, declared once.

Everything that affects the client's phase lives in this file, in the class ``Lifecycle``: the
seven phases, every event, every guard, and the effects each transition asks for. The diagrams,
the docs' transition table, the model checker, the generated per-transition tests and the
runtime all read this declaration; none of them restates it.

The machine is strict (python-statemachine's ``StateMachine``): an event the current phase cannot
take raises ``TransitionNotAllowed``, and exceptions in callbacks propagate.

Events and their inputs (keyword arguments):

- ``connect``, ``disconnect``, ``force_reconnect``: the application.
- ``handshake_succeeded``: the socket is up and a valid hello arrived.
- ``attempt_failed(retryable)``: the attempt in flight failed (refused, rejected, bad hello,
  connect timeout, ...); ``retryable`` comes from ``classify``.
- ``retry_due``: the backoff timer fired in ``failed``.
- ``connection_lost(retryable, graceful)``: an open connection ended other than by a normal
  close; ``graceful`` is a 1001 from a server that advertised ``graceful_reconnect``. A graceful
  close reconnects without a backoff step: at once, or, with ``graceful_jitter_ms`` above 0,
  after a random delay within that window (the graceful timer), so that the clients of a
  server going away do not all dial at the same instant.
- ``reconnect_due``: the graceful timer fired in ``reconnecting``: the delayed attempt starts.
- ``closed_by_server``: the server closed an open connection with 1000.
- ``heartbeat_overdue``, ``traffic_resumed``, ``peer_dead``: the silence watchdog.
- ``stable``: the connection stayed open for the stable period, which ends the outage.
- ``probe_due``: the recovery probe's timer fired in ``fallback``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from statemachine import State, StateMachine

from steadysocket.model.backoff import BackoffStrategy
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

EFFECTS_ATTRIBUTE = "declared_effects"
"""Each transition's ``on`` callback carries its effects under this attribute."""

DEGRADED_AFTER = 1.2
"""Silence, in heartbeat intervals, after which an open connection counts as degraded."""
DEAD_AFTER = 2.0
"""Silence, in heartbeat intervals, after which the peer counts as dead."""
GRACEFUL_JITTER_MS = 1000.0
"""The default window a graceful reconnect's delay is drawn from: uniform over 0 to 1 s, so
the clients of a server going away do not all dial at the same instant (the recovery
benchmark measures the spread). 0 reconnects at once, as before the window existed."""

CLIENT_DISCONNECT = CloseSocket(1000, "Client disconnect")
CLIENT_RECONNECT = CloseSocket(1000, "Client reconnect")
ATTEMPT_ABANDONED = CloseSocket(1000, "Attempt abandoned")
HEARTBEAT_TIMEOUT = CloseSocket(1000, "heartbeat timeout")


def emits(*effects: Effect) -> Callable[..., None]:
    """Declare a transition's effects.

    python-statemachine wants a real function as an ``on`` callback, so the effects ride on one
    as an attribute. Introspection (``declared_effects``) reads them back without running.
    """

    def apply_effects(machine: Lifecycle) -> None:
        machine.emit(effects)

    setattr(apply_effects, EFFECTS_ATTRIBUTE, effects)
    return apply_effects


def _cancel(*timers: Timer) -> tuple[Effect, ...]:
    return tuple(CancelTimer(t) for t in timers)


_ALL_TIMERS = tuple(Timer)
_START_ATTEMPT: tuple[Effect, ...] = (OpenSocket(), StartTimer(Timer.CONNECT))
_ENTER_OPEN: tuple[Effect, ...] = (
    CancelTimer(Timer.CONNECT),
    StartTimer(Timer.HEARTBEAT, heartbeats=DEGRADED_AFTER),
    StartTimer(Timer.STABLE),
    FlushQueue(),
)
_ABANDON_ATTEMPT: tuple[Effect, ...] = (CancelTimer(Timer.CONNECT), ATTEMPT_ABANDONED)
_GIVE_UP_ATTEMPT = (*_ABANDON_ATTEMPT, ReturnQueue(), StartTimer(Timer.PROBE))
_LEAVE_OPEN: tuple[Effect, ...] = _cancel(Timer.HEARTBEAT, Timer.STABLE)
_GIVE_UP_OPEN = (*_LEAVE_OPEN, ReturnQueue(), StartTimer(Timer.PROBE))
_DISCONNECT = (*_cancel(*_ALL_TIMERS), CLIENT_DISCONNECT, ReturnQueue())
_FORCE = (*_cancel(*_ALL_TIMERS), CLIENT_RECONNECT, ResetBackoff(), *_START_ATTEMPT)
_SPREAD = ["is_graceful", "has_graceful_jitter"]
"""A graceful close, with a window to spread its reconnect over."""


class Lifecycle(StateMachine):
    """The client connection lifecycle: phases, events, guards and effects.

    The instance also holds the few counters its guards read (attempts in the current outage)
    and resolves declared effects into concrete ones (a retry timer's jittered delay, a graceful
    reconnect's random delay, both drawn from the backoff's injected random source). It never
    reads a clock and never touches a socket; call ``drain()`` after each event to collect the
    effects the runtime must carry out.
    """

    idle = State("idle", value=Phase.IDLE, initial=True)
    connecting = State("connecting", value=Phase.CONNECTING)
    open = State("open", value=Phase.OPEN)
    degraded = State("degraded", value=Phase.DEGRADED)
    reconnecting = State("reconnecting", value=Phase.RECONNECTING)
    failed = State("failed", value=Phase.FAILED)
    fallback = State("fallback", value=Phase.FALLBACK)

    connect = idle.to(connecting, on=emits(ResetBackoff(), *_START_ATTEMPT)) | fallback.to(
        connecting, on=emits(*_FORCE)
    )

    handshake_succeeded = (
        connecting.to(open, on=emits(*_ENTER_OPEN))
        | reconnecting.to(open, on=emits(*_ENTER_OPEN))
        | fallback.to(open, on=emits(*_ENTER_OPEN))
    )

    attempt_failed = (
        connecting.to(fallback, unless="is_retryable", on=emits(*_GIVE_UP_ATTEMPT))
        | connecting.to(fallback, unless="has_attempts_left", on=emits(*_GIVE_UP_ATTEMPT))
        | connecting.to(failed, on=emits(*_ABANDON_ATTEMPT, StartTimer(Timer.RETRY)))
        | reconnecting.to(fallback, unless="is_retryable", on=emits(*_GIVE_UP_ATTEMPT))
        | reconnecting.to(fallback, unless="has_attempts_left", on=emits(*_GIVE_UP_ATTEMPT))
        | reconnecting.to(failed, on=emits(*_ABANDON_ATTEMPT, StartTimer(Timer.RETRY)))
        | fallback.to.itself(on=emits(*_ABANDON_ATTEMPT, StartTimer(Timer.PROBE)))
    )

    retry_due = failed.to(reconnecting, on=emits(*_START_ATTEMPT))

    reconnect_due = reconnecting.to.itself(on=emits(*_START_ATTEMPT))

    connection_lost = (
        open.to(fallback, unless="is_retryable", on=emits(*_GIVE_UP_OPEN))
        | open.to(fallback, unless="has_attempts_left", on=emits(*_GIVE_UP_OPEN))
        | open.to(reconnecting, cond=_SPREAD, on=emits(*_LEAVE_OPEN, StartTimer(Timer.GRACEFUL)))
        | open.to(reconnecting, cond="is_graceful", on=emits(*_LEAVE_OPEN, *_START_ATTEMPT))
        | open.to(failed, on=emits(*_LEAVE_OPEN, StartTimer(Timer.RETRY)))
        | degraded.to(fallback, unless="is_retryable", on=emits(*_GIVE_UP_OPEN))
        | degraded.to(fallback, unless="has_attempts_left", on=emits(*_GIVE_UP_OPEN))
        | degraded.to(
            reconnecting, cond=_SPREAD, on=emits(*_LEAVE_OPEN, StartTimer(Timer.GRACEFUL))
        )
        | degraded.to(reconnecting, cond="is_graceful", on=emits(*_LEAVE_OPEN, *_START_ATTEMPT))
        | degraded.to(failed, on=emits(*_LEAVE_OPEN, StartTimer(Timer.RETRY)))
    )

    closed_by_server = open.to(idle, on=emits(*_LEAVE_OPEN)) | degraded.to(
        idle, on=emits(*_LEAVE_OPEN)
    )

    heartbeat_overdue = open.to(
        degraded,
        on=emits(SendPing(), StartTimer(Timer.HEARTBEAT, heartbeats=DEAD_AFTER - DEGRADED_AFTER)),
    )
    traffic_resumed = degraded.to(
        open,
        on=emits(
            CancelTimer(Timer.HEARTBEAT), StartTimer(Timer.HEARTBEAT, heartbeats=DEGRADED_AFTER)
        ),
    )
    peer_dead = degraded.to(
        fallback, unless="has_attempts_left", on=emits(HEARTBEAT_TIMEOUT, *_GIVE_UP_OPEN)
    ) | degraded.to(reconnecting, on=emits(*_LEAVE_OPEN, HEARTBEAT_TIMEOUT, *_START_ATTEMPT))

    stable = open.to.itself(internal=True, on=emits(ResetBackoff())) | degraded.to.itself(
        internal=True, on=emits(ResetBackoff())
    )

    probe_due = fallback.to.itself(on=emits(OpenSocket(probe=True), StartTimer(Timer.CONNECT)))

    disconnect = (
        idle.to.itself(internal=True)
        | connecting.to(idle, on=emits(*_DISCONNECT))
        | open.to(idle, on=emits(*_DISCONNECT))
        | degraded.to(idle, on=emits(*_DISCONNECT))
        | reconnecting.to(idle, on=emits(*_DISCONNECT))
        | failed.to(idle, on=emits(*_DISCONNECT))
        | fallback.to(idle, on=emits(*_DISCONNECT))
    )

    force_reconnect = (
        idle.to(connecting, on=emits(*_FORCE))
        | connecting.to.itself(on=emits(*_FORCE))
        | open.to(connecting, on=emits(*_FORCE))
        | degraded.to(connecting, on=emits(*_FORCE))
        | reconnecting.to(connecting, on=emits(*_FORCE))
        | failed.to(connecting, on=emits(*_FORCE))
        | fallback.to(connecting, on=emits(*_FORCE))
    )

    def __init__(
        self,
        *,
        backoff: BackoffStrategy | None = None,
        connection_timeout_ms: float = 10_000,
        stable_after_ms: float = 5_000,
        fallback_probe_interval_ms: float | None = 60_000,
        heartbeat_interval_ms: float | None = None,
        graceful_jitter_ms: float = GRACEFUL_JITTER_MS,
        start_phase: Phase = Phase.IDLE,
        attempts: int = 0,
    ) -> None:
        if connection_timeout_ms <= 0:
            raise ValueError(f"connection_timeout_ms must be > 0, got {connection_timeout_ms!r}")
        if stable_after_ms < 0:
            raise ValueError(f"stable_after_ms must be >= 0, got {stable_after_ms!r}")
        if fallback_probe_interval_ms is not None and fallback_probe_interval_ms <= 0:
            raise ValueError(
                "fallback_probe_interval_ms must be > 0 or None (disabled), "
                f"got {fallback_probe_interval_ms!r}"
            )
        # Written as a negated range check so that NaN is rejected too.
        if not 0 <= graceful_jitter_ms < math.inf:
            raise ValueError(
                f"graceful_jitter_ms must be a finite number >= 0, got {graceful_jitter_ms!r}"
            )
        self.backoff = backoff if backoff is not None else BackoffStrategy()
        self.connection_timeout_ms = connection_timeout_ms
        self.stable_after_ms = stable_after_ms
        self.fallback_probe_interval_ms = fallback_probe_interval_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        """Set from the hello before ``handshake_succeeded``; None disables the watchdog."""
        self.graceful_jitter_ms = graceful_jitter_ms
        """The window a graceful reconnect's delay is drawn from; 0 reconnects at once."""
        self.attempts = attempts
        """Counted attempts started in the current outage, the first included."""
        self._outbox: list[Effect] = []
        super().__init__(start_value=Phase(start_phase))

    # -- guards -------------------------------------------------------------------------

    @property
    def max_attempts(self) -> int:
        """Attempts allowed in one outage, the first included (from the backoff strategy)."""
        return self.backoff.max_attempts

    def is_retryable(self, retryable: bool) -> bool:
        """Guard: the failure is one that a retry can fix (see ``classify``)."""
        return retryable

    def is_graceful(self, graceful: bool) -> bool:
        """Guard: the server said it is going away (1001) and advertised graceful reconnect."""
        return graceful

    def has_graceful_jitter(self) -> bool:
        """Guard: a graceful reconnect waits a random delay (``graceful_jitter_ms`` > 0)."""
        return self.graceful_jitter_ms > 0

    def has_attempts_left(self) -> bool:
        """Guard: another counted attempt fits within ``max_attempts``."""
        return self.attempts < self.max_attempts

    # -- effects ------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return Phase(self.current_state_value)

    def emit(self, effects: Iterable[Effect]) -> None:
        """Resolve declared effects and queue them for ``drain()``; called by transitions."""
        for effect in effects:
            resolved = self.resolve(effect)
            if resolved is not None:
                self._outbox.append(resolved)

    def resolve(self, effect: Effect) -> Effect | None:
        """Fill in what a declared effect leaves open, and keep the guard counters in step.

        Returns None for an effect that does not apply under this configuration: a probe timer
        with probing disabled, or a heartbeat timer before any heartbeat interval is known.
        """
        match effect:
            case OpenSocket(probe=probe):
                if not probe:
                    self.attempts += 1
                return OpenSocket(probe=probe, attempt=self.attempts)
            case ResetBackoff():
                self.attempts = 0
                self.backoff.reset()
                return effect
            case StartTimer(timer=timer, heartbeats=heartbeats):
                delay = self._delay_for(timer, heartbeats)
                return None if delay is None else StartTimer(timer, delay, heartbeats)
        return effect

    def _delay_for(self, timer: Timer, heartbeats: float | None) -> float | None:
        match timer:
            case Timer.CONNECT:
                return self.connection_timeout_ms
            case Timer.RETRY:
                # One failure consumes exactly one backoff step; attempts < max_attempts here,
                # so the strategy cannot be exhausted yet.
                delay = self.backoff.next_delay()
                return delay if delay is not None else self.backoff.cap_delay_ms
            case Timer.STABLE:
                return self.stable_after_ms
            case Timer.PROBE:
                return self.fallback_probe_interval_ms
            case Timer.GRACEFUL:
                # Drawn from the backoff's random source, without taking a backoff step.
                return self.backoff.spread_delay(self.graceful_jitter_ms)
            case Timer.HEARTBEAT:  # pragma: no branch - the match covers every Timer
                if self.heartbeat_interval_ms is None or heartbeats is None:
                    return None
                return heartbeats * self.heartbeat_interval_ms

    def can(self, event: str) -> bool:
        """Whether the current phase declares ``event`` (guards aside)."""
        return any(e.id == event for e in self.allowed_events)

    def drain(self) -> list[Effect]:
        """Return and clear the effects produced since the last call."""
        out, self._outbox = self._outbox, []
        return out


def declared_effects(callback: object) -> tuple[Effect, ...] | None:
    """The effects a transition's ``on`` callback declares, or None for another callback."""
    value = getattr(callback, EFFECTS_ATTRIBUTE, None)
    return value if isinstance(value, tuple) else None


def phases() -> Sequence[Phase]:
    """The declared phases, in declaration order."""
    return [Phase(state.value) for state in Lifecycle.states]
