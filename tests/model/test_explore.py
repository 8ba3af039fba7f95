"""The model check: exhaustive exploration, and broken variants it must reject."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import pytest

from steadysocket.model.effects import Effect, OpenSocket, ResetBackoff, StartTimer, Timer
from steadysocket.model.explore import (
    DEFAULT_CONFIGS,
    Config,
    Explorer,
    Input,
    Invariant,
    Report,
    Server,
    Socket,
    World,
    _event_for,
    check,
    initial_world,
)
from steadysocket.model.graph import rows
from steadysocket.model.lifecycle import (
    ATTEMPT_ABANDONED,
    CLIENT_DISCONNECT,
    CLIENT_RECONNECT,
    Lifecycle,
)
from steadysocket.model.snapshot import Phase

Summary = Callable[[str, str], None]


@pytest.fixture(scope="module")
def reports() -> list[Report]:
    return check()


def test_the_declared_lifecycle_satisfies_every_invariant(
    reports: list[Report], summary: Summary
) -> None:
    for report in reports:
        summary("model check (explicit-state, breadth-first)", report.summary())
        assert report.violations == [], "\n".join(str(v) for v in report.violations[:3])
        assert report.phases_reached == set(Phase)
    summary(
        "model check (explicit-state, breadth-first)",
        "invariants checked: " + "; ".join(f"{i.name}" for i in Invariant),
    )


def test_the_explorer_takes_every_declared_transition(reports: list[Report]) -> None:
    taken = set().union(*(r.transitions_taken for r in reports))
    declared = {(row.source, row.event, row.target) for row in rows()}
    assert declared - taken == set()


def test_the_explorer_reaches_a_sizeable_state_space() -> None:
    report = Explorer(Config(max_attempts=4)).run()
    assert report.states > 100
    assert report.edges > 5 * report.states


# -- deliberately broken variants --------------------------------------------------------


class NoConnectTimeout(Lifecycle):
    """Forgets the connect timer: a silent server leaves the attempt waiting forever."""

    def resolve(self, effect: Effect) -> Effect | None:
        if isinstance(effect, StartTimer) and effect.timer is Timer.CONNECT:
            return None
        return super().resolve(effect)


class RetrySkipsCounter(Lifecycle):
    """Retries without consulting the attempt counter."""

    def has_attempts_left(self) -> bool:
        return True


class LeavesFailedAttemptOpen(Lifecycle):
    """Abandons a timed-out attempt without closing its socket."""

    def resolve(self, effect: Effect) -> Effect | None:
        if effect == ATTEMPT_ABANDONED:
            return None
        return super().resolve(effect)


class GivesUpEarly(Lifecycle):
    """Goes to fallback on the first retryable failure."""

    def has_attempts_left(self) -> bool:
        return False


class IgnoresDisconnect(Lifecycle):
    """Keeps its retry timer running after disconnect()."""

    def resolve(self, effect: Effect) -> Effect | None:
        if getattr(effect, "timer", None) is Timer.RETRY and type(effect).__name__ == "CancelTimer":
            return None
        return super().resolve(effect)


class IdleIgnoresForceReconnect(Lifecycle):
    """Behaves as if ``idle --force_reconnect--> connecting`` were deleted: the application's
    call does nothing in idle."""

    def can(self, event: str) -> bool:
        if event == "force_reconnect" and self.phase is Phase.IDLE:
            return False
        return super().can(event)


class ForceReconnectKeepsTheCount(Lifecycle):
    """force_reconnect() starts its attempt without resetting the outage's counter."""

    def resolve(self, effect: Effect) -> Effect | None:
        if isinstance(effect, ResetBackoff) and self._outbox[-1:] == [CLIENT_RECONNECT]:
            return None
        return super().resolve(effect)


class DegradedGracefulWaits(Lifecycle):
    """Behaves as if ``degraded --connection_lost[is_graceful]--> reconnecting`` were deleted:
    a graceful 1001 while degraded waits a full backoff step."""

    def is_graceful(self, graceful: bool) -> bool:
        return graceful and self.phase is not Phase.DEGRADED


class OpenGracefulWaits(Lifecycle):
    """Never treats a close as graceful: a 1001 from open waits a backoff step too."""

    def is_graceful(self, graceful: bool) -> bool:
        return False


class IgnoresTheGracefulWindow(Lifecycle):
    """Behaves as if ``connection_lost[is_graceful and has_graceful_jitter]`` were deleted: a
    graceful close reconnects at once although a window is configured (the storm)."""

    def has_graceful_jitter(self) -> bool:
        return False


class SpreadsWithoutAWindow(Lifecycle):
    """Waits a graceful delay even with a window of 0, which must keep the old behaviour."""

    def has_graceful_jitter(self) -> bool:
        return True


class GracefulDelayTakesABackoffStep(Lifecycle):
    """Draws the graceful delay as the next backoff step instead of from the window."""

    def _delay_for(self, timer: Timer, heartbeats: float | None) -> float | None:
        if timer is Timer.GRACEFUL:
            return self.backoff.next_delay()
        return super()._delay_for(timer, heartbeats)


class GracefulDelayBeyondTheWindow(Lifecycle):
    """Waits twice the configured window."""

    def _delay_for(self, timer: Timer, heartbeats: float | None) -> float | None:
        if timer is Timer.GRACEFUL:
            return 2 * self.graceful_jitter_ms
        return super()._delay_for(timer, heartbeats)


class GracefulDelayEndsInNoAttempt(Lifecycle):
    """Forgets the attempt when the graceful delay ends (re-arms the delay instead)."""

    def resolve(self, effect: Effect) -> Effect | None:
        if isinstance(effect, OpenSocket) and self.phase is Phase.RECONNECTING:
            return StartTimer(Timer.GRACEFUL, self.graceful_jitter_ms)
        return super().resolve(effect)


class OpensWithoutHello(Lifecycle):
    """Counts every new attempt as a successful handshake, before any hello arrived."""

    def resolve(self, effect: Effect) -> Effect | None:
        if isinstance(effect, OpenSocket) and not effect.probe:
            self.send("handshake_succeeded")
        return super().resolve(effect)


class ReconnectsAfterDisconnect(Lifecycle):
    """Starts a new attempt right after closing for disconnect()."""

    def emit(self, effects: Iterable[Effect]) -> None:
        effects = tuple(effects)
        if CLIENT_DISCONNECT in effects:
            effects = (*effects, OpenSocket())
        super().emit(effects)


@pytest.mark.parametrize(
    ("variant", "invariant"),
    [
        (OpensWithoutHello, Invariant.OPEN_AFTER_HELLO),
        (ReconnectsAfterDisconnect, Invariant.STOP_MEANS_STOP),
        (NoConnectTimeout, Invariant.NO_STUCK_PHASE),
        (RetrySkipsCounter, Invariant.ATTEMPTS_BOUNDED),
        (LeavesFailedAttemptOpen, Invariant.ONE_IN_FLIGHT),
        (GivesUpEarly, Invariant.ATTEMPTS_BOUNDED),
        (IgnoresDisconnect, Invariant.DISCONNECT_REACHES_IDLE),
        (IdleIgnoresForceReconnect, Invariant.FRESH_FORCE_RECONNECT),
        (ForceReconnectKeepsTheCount, Invariant.FRESH_FORCE_RECONNECT),
        (DegradedGracefulWaits, Invariant.GRACEFUL_WITHOUT_BACKOFF),
        (OpenGracefulWaits, Invariant.GRACEFUL_WITHOUT_BACKOFF),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_the_explorer_rejects_a_broken_variant_and_names_the_invariant(
    variant: type[Lifecycle], invariant: Invariant, summary: Summary
) -> None:
    reports = check(variant, (Config(max_attempts=3),))
    broken = set().union(*(r.broken for r in reports))
    summary(
        "model check: broken variants rejected",
        f"{variant.__name__}: " + ", ".join(sorted(i.name for i in broken)),
    )
    assert invariant in broken


def test_a_violation_carries_the_trace_that_reaches_it() -> None:
    [report] = check(NoConnectTimeout, (Config(max_attempts=2),))
    stuck = next(v for v in report.violations if v.invariant is Invariant.NO_STUCK_PHASE)
    assert stuck.trace[0].startswith("idle --")
    assert "NO_STUCK_PHASE" in str(stuck)


# -- the step function on its own ---------------------------------------------------------


def test_a_user_action_the_phase_cannot_take_is_a_no_op() -> None:
    explorer = Explorer()
    world = initial_world()
    step = explorer.step(world, Input.DISCONNECT)
    assert step.world.phase is Phase.IDLE
    connected = explorer.step(world, Input.CONNECT).world
    again = explorer.step(connected, Input.CONNECT)
    assert again.world == connected
    assert again.event is None


def test_a_silent_server_is_left_by_the_connect_timer() -> None:
    explorer = Explorer(Config(max_attempts=2))
    world = explorer.step(initial_world(), Input.CONNECT).world
    world = explorer.step(world, Input.SERVER_SILENT).world
    assert world.socket is Socket.DIALING
    assert world.timers == frozenset({Timer.CONNECT})
    step = explorer.step(world, Input.CONNECT_TIMER)
    assert step.world.phase is Phase.FAILED
    assert step.world.socket is Socket.NONE
    assert step.world.timers == frozenset({Timer.RETRY})


def test_disconnect_from_open_leaves_nothing_behind() -> None:
    explorer = Explorer()
    world = World(
        Phase.OPEN,
        1,
        Socket.READY,
        frozenset({Timer.HEARTBEAT, Timer.STABLE}),
        Server.UP,
        stopped=False,
    )
    step = explorer.step(world, Input.DISCONNECT)
    assert step.world == World(Phase.IDLE, 1, Socket.NONE, frozenset(), Server.UP, stopped=True)
    assert any(isinstance(e, OpenSocket) for e in step.effects) is False


def test_default_configs_cover_single_attempt_and_disabled_probe() -> None:
    assert Config(max_attempts=1, probe=True) in DEFAULT_CONFIGS
    assert any(not c.probe for c in DEFAULT_CONFIGS)


def test_a_change_of_server_behaviour_is_no_lifecycle_event() -> None:
    explorer = Explorer()
    world = explorer.step(initial_world(), Input.CONNECT).world
    step = explorer.step(world, Input.SERVER_DOWN)
    assert step.event is None
    assert step.effects == ()
    assert step.world == replace(world, server=Server.DOWN)
    assert _event_for(world, Input.SERVER_SILENT) == (None, {})


def _up(phase: Phase, attempts: int) -> World:
    return World(phase, attempts, Socket.NONE, frozenset({Timer.RETRY}), Server.UP, stopped=False)


def test_the_cycle_finder_reports_a_cycle_even_beside_a_dead_end() -> None:
    """A world with one automatic way into a dead end and one into a cycle that never opens:
    peeling the dead end leaves the cycle, which is reported."""
    explorer = Explorer()
    start, dead_end, loop = _up(Phase.FAILED, 1), _up(Phase.FALLBACK, 1), _up(Phase.FAILED, 2)
    graph = {
        start: [(Input.RETRY_TIMER, dead_end), (Input.PROBE_TIMER, loop)],
        dead_end: [],
        loop: [(Input.RETRY_TIMER, start)],
    }
    parent: dict[World, tuple[World, Input] | None] = {start: None, dead_end: None, loop: None}
    violations = explorer._cycles_avoiding_open(list(graph), graph, parent)
    assert {v.world for v in violations} == {start, loop}
    assert all(v.invariant is Invariant.RECOVERS_WHEN_UP for v in violations)


WINDOW = Config(max_attempts=3, graceful_jitter_ms=1000.0)


@pytest.mark.parametrize(
    ("variant", "config", "invariant"),
    [
        (IgnoresTheGracefulWindow, WINDOW, Invariant.GRACEFUL_SPREAD),
        (SpreadsWithoutAWindow, Config(max_attempts=3), Invariant.GRACEFUL_WITHOUT_BACKOFF),
        (GracefulDelayTakesABackoffStep, WINDOW, Invariant.GRACEFUL_WITHOUT_BACKOFF),
        (GracefulDelayBeyondTheWindow, WINDOW, Invariant.GRACEFUL_SPREAD),
        (GracefulDelayEndsInNoAttempt, WINDOW, Invariant.GRACEFUL_SPREAD),
        (DegradedGracefulWaits, WINDOW, Invariant.GRACEFUL_WITHOUT_BACKOFF),
    ],
    ids=lambda v: getattr(v, "__name__", None) or "",
)
def test_the_explorer_rejects_a_broken_graceful_delay_and_names_the_invariant(
    variant: type[Lifecycle], config: Config, invariant: Invariant, summary: Summary
) -> None:
    reports = check(variant, (config,))
    broken = set().union(*(r.broken for r in reports))
    summary(
        "model check: broken variants rejected",
        f"{variant.__name__} (graceful_jitter_ms={config.graceful_jitter_ms:g}): "
        + ", ".join(sorted(i.name for i in broken)),
    )
    assert invariant in broken


def test_default_configs_cover_a_graceful_window() -> None:
    assert any(c.graceful_jitter_ms > 0 and c.max_attempts == 1 for c in DEFAULT_CONFIGS)
    assert any(c.graceful_jitter_ms > 0 and c.max_attempts > 1 for c in DEFAULT_CONFIGS)


def test_a_graceful_close_with_a_window_waits_in_reconnecting_then_attempts() -> None:
    explorer = Explorer(WINDOW)
    world = World(
        Phase.OPEN,
        1,
        Socket.READY,
        frozenset({Timer.HEARTBEAT, Timer.STABLE}),
        Server.UP,
        stopped=False,
    )
    step = explorer.step(world, Input.GOING_AWAY)
    assert step.problems == ()
    assert step.world == World(
        Phase.RECONNECTING, 1, Socket.NONE, frozenset({Timer.GRACEFUL}), Server.UP, False
    )
    [delay] = [e.delay_ms for e in step.effects if isinstance(e, StartTimer)]
    assert delay is not None
    assert 0 <= delay <= 1000.0
    assert _event_for(step.world, Input.GRACEFUL_TIMER) == ("reconnect_due", {})
    after = explorer.step(step.world, Input.GRACEFUL_TIMER)
    assert after.problems == ()
    assert after.world == World(
        Phase.RECONNECTING, 2, Socket.DIALING, frozenset({Timer.CONNECT}), Server.UP, False
    )
