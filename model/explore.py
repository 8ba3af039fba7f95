"""An explicit-state model checker for the lifecycle declaration.

It explores, breadth first, every world reachable from ``idle``: the phase and attempt counter
held by a real ``Lifecycle`` instance, the socket and pending timers that its effects produced,
the server's behaviour (up, down, rejecting permanently, or silent) and whether the application
has disconnected. The edges are the application's actions, the server's reactions, changes of
server behaviour, and any pending timer firing. Time is abstract: any pending timer may fire next.

Each world is checked against the invariants below, and the graph as a whole against the
liveness ones. The checker drives the very class the runtime drives, with the very effects it
declares, so it cannot drift from what runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from statemachine.exceptions import TransitionNotAllowed

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.effects import (
    CancelTimer,
    CloseSocket,
    Effect,
    OpenSocket,
    StartTimer,
    Timer,
)
from steadysocket.model.lifecycle import Lifecycle
from steadysocket.model.snapshot import Phase


class Invariant(StrEnum):
    """The properties checked in every reachable world (or over the whole graph)."""

    ONE_IN_FLIGHT = "at most one attempt in flight and one timer of each kind pending"
    ATTEMPTS_BOUNDED = "attempts never exceed max_attempts; fallback only when due"
    STOP_MEANS_STOP = "after disconnect() no attempt starts until connect()"
    OPEN_AFTER_HELLO = "open and degraded only after a valid hello"
    DISCONNECT_REACHES_IDLE = "disconnect() reaches idle from every state"
    NO_STUCK_PHASE = "every phase but idle and open has an exit that needs no server"
    RECOVERS_WHEN_UP = "with the server up for good, every state leads to open"
    IO_EVENTS_ACCEPTED = "every event the world can produce is accepted or filtered"
    FRESH_FORCE_RECONNECT = "force_reconnect() from any phase starts exactly one fresh attempt"
    GRACEFUL_WITHOUT_BACKOFF = (
        "a graceful close from open or degraded reconnects without a backoff step"
    )
    GRACEFUL_SPREAD = (
        "with a graceful window, a graceful close waits a delay drawn within it, then makes "
        "one attempt"
    )


class Server(StrEnum):
    """How the fake server behaves right now."""

    UP = "up"
    DOWN = "down"
    REJECTING = "rejecting"
    SILENT = "silent"


class Socket(StrEnum):
    """The client's socket as its effects and the server left it."""

    NONE = "none"
    DIALING = "dialing"
    READY = "ready"


@dataclass(frozen=True, slots=True)
class World:
    """One explored state: the lifecycle's own state plus its environment."""

    phase: Phase
    attempts: int
    socket: Socket
    timers: frozenset[Timer]
    server: Server
    stopped: bool
    """disconnect() was called and connect() has not been since."""

    def __str__(self) -> str:
        timers = ",".join(sorted(self.timers)) or "-"
        return (
            f"{self.phase}(attempts={self.attempts}, socket={self.socket}, timers={timers}, "
            f"server={self.server}{', stopped' if self.stopped else ''})"
        )


class Input(StrEnum):
    """Everything that can happen to a world."""

    CONNECT = "connect"
    DISCONNECT = "disconnect"
    FORCE_RECONNECT = "force_reconnect"
    SERVER_UP = "server becomes up"
    SERVER_DOWN = "server goes down"
    SERVER_REJECTING = "server rejects permanently"
    SERVER_SILENT = "server goes silent"
    HELLO = "server sends a valid hello"
    REFUSED = "server refuses the attempt"
    REJECTED = "server rejects the attempt (4401)"
    DROPPED = "server drops the connection (1006)"
    GOING_AWAY = "server goes away (1001)"
    CLOSED_NORMALLY = "server closes normally (1000)"
    EVICTED = "server closes with a policy violation (1008)"
    CONNECT_TIMER = "connect timer fires"
    RETRY_TIMER = "retry timer fires"
    HEARTBEAT_TIMER = "heartbeat timer fires"
    PROBE_TIMER = "probe timer fires"
    STABLE_TIMER = "stable timer fires"
    GRACEFUL_TIMER = "graceful reconnect delay ends"


USER_INPUTS = frozenset({Input.CONNECT, Input.DISCONNECT, Input.FORCE_RECONNECT})
SERVER_CHANGES = {
    Input.SERVER_UP: Server.UP,
    Input.SERVER_DOWN: Server.DOWN,
    Input.SERVER_REJECTING: Server.REJECTING,
    Input.SERVER_SILENT: Server.SILENT,
}
_TIMER_INPUTS = {
    Timer.CONNECT: Input.CONNECT_TIMER,
    Timer.RETRY: Input.RETRY_TIMER,
    Timer.HEARTBEAT: Input.HEARTBEAT_TIMER,
    Timer.PROBE: Input.PROBE_TIMER,
    Timer.STABLE: Input.STABLE_TIMER,
    Timer.GRACEFUL: Input.GRACEFUL_TIMER,
}
# Reactions a server that simply stays up never produces; excluded from the liveness graph.
_SERVER_INITIATED_CLOSES = frozenset({Input.GOING_AWAY, Input.CLOSED_NORMALLY, Input.EVICTED})


@dataclass(frozen=True, slots=True)
class Violation:
    """An invariant broken in a world, with the shortest trace that reaches it."""

    invariant: Invariant
    world: World
    detail: str
    trace: tuple[str, ...] = ()

    def __str__(self) -> str:
        steps = "\n  ".join(self.trace) or "(initial world)"
        return f"{self.invariant.name}: {self.detail}\n  in {self.world}\n  after:\n  {steps}"


@dataclass(frozen=True, slots=True)
class Config:
    """The lifecycle configuration a run explores."""

    max_attempts: int = 3
    probe: bool = True
    graceful_jitter_ms: float = 0.0
    """The window a graceful reconnect's delay is drawn from; 0 reconnects at once."""


@dataclass(slots=True)
class Report:
    """What a run found."""

    config: Config
    states: int = 0
    edges: int = 0
    violations: list[Violation] = field(default_factory=list)
    phases_reached: set[Phase] = field(default_factory=set)
    transitions_taken: set[tuple[Phase, str, Phase]] = field(default_factory=set)

    @property
    def broken(self) -> set[Invariant]:
        """The invariants with at least one violation."""
        return {v.invariant for v in self.violations}

    def summary(self) -> str:
        """One line for test output and the docs."""
        status = "ok" if not self.violations else f"{len(self.violations)} violations"
        return (
            f"max_attempts={self.config.max_attempts} probe={self.config.probe} "
            f"graceful_jitter_ms={self.config.graceful_jitter_ms:g}: "
            f"{self.states} states, {self.edges} edges, "
            f"{len(self.transitions_taken)} transitions taken, {status}"
        )


MachineFactory = Callable[..., Lifecycle]


@dataclass(frozen=True, slots=True)
class Step:
    """The outcome of one input applied to one world."""

    world: World
    event: str | None
    source: Phase
    effects: tuple[Effect, ...]
    problems: tuple[tuple[Invariant, str], ...]


def initial_world() -> World:
    """Where every client starts: idle, nothing pending, the server up."""
    return World(Phase.IDLE, 0, Socket.NONE, frozenset(), Server.UP, stopped=False)


def inputs(world: World) -> Iterator[Input]:
    """Every input that can happen in this world."""
    yield from USER_INPUTS
    for inp, server in SERVER_CHANGES.items():
        if world.server is not server:
            yield inp
    if world.socket is Socket.DIALING:
        if world.server is Server.UP:
            yield Input.HELLO
        elif world.server is Server.DOWN:
            yield Input.REFUSED
        elif world.server is Server.REJECTING:
            yield Input.REJECTED
    elif world.socket is Socket.READY:
        if world.server is Server.DOWN:
            yield Input.DROPPED
        elif world.server is Server.UP:
            yield Input.GOING_AWAY
            yield Input.CLOSED_NORMALLY
        elif world.server is Server.REJECTING:
            yield Input.EVICTED
    for timer in sorted(world.timers):
        yield _TIMER_INPUTS[timer]


def _event_for(world: World, inp: Input) -> tuple[str | None, dict[str, Any]]:
    """Map an input to the lifecycle event it produces (None: no event), with its arguments."""
    match inp:
        case Input.CONNECT | Input.DISCONNECT | Input.FORCE_RECONNECT:
            return inp.value, {}
        case Input.HELLO:
            return "handshake_succeeded", {}
        case Input.REFUSED | Input.CONNECT_TIMER:
            return "attempt_failed", {"retryable": True}
        case Input.REJECTED:
            return "attempt_failed", {"retryable": False}
        case Input.DROPPED:
            return "connection_lost", {"retryable": True, "graceful": False}
        case Input.EVICTED:
            return "connection_lost", {"retryable": False, "graceful": False}
        case Input.GOING_AWAY:
            return "connection_lost", {"retryable": True, "graceful": True}
        case Input.CLOSED_NORMALLY:
            return "closed_by_server", {}
        case Input.RETRY_TIMER:
            return "retry_due", {}
        case Input.GRACEFUL_TIMER:
            return "reconnect_due", {}
        case Input.PROBE_TIMER:
            return "probe_due", {}
        case Input.STABLE_TIMER:
            return "stable", {}
        case Input.HEARTBEAT_TIMER:
            # A server that is up keeps talking, so the watchdog finds recent traffic.
            if world.server is Server.UP:
                return ("traffic_resumed" if world.phase is Phase.DEGRADED else None), {}
            return ("peer_dead" if world.phase is Phase.DEGRADED else "heartbeat_overdue"), {}
        case _:
            # A change of server behaviour is no lifecycle event.
            return None, {}


class Explorer:
    """Breadth-first exploration of one configuration of a lifecycle class."""

    def __init__(self, config: Config | None = None, machine: type[Lifecycle] = Lifecycle):
        self.config = config or Config()
        self.machine = machine

    def _build(self, world: World) -> Lifecycle:
        # No jitter, and a fixed seed: the random source is drawn from only for the graceful
        # delay, and its value is checked against the window, not explored.
        backoff = BackoffStrategy(
            base_delays_ms=(1000, 2000),
            jitter_ratio=0.0,
            max_attempts=self.config.max_attempts,
            seed=0,
        )
        return self.machine(
            backoff=backoff,
            heartbeat_interval_ms=1000,
            fallback_probe_interval_ms=60_000 if self.config.probe else None,
            graceful_jitter_ms=self.config.graceful_jitter_ms,
            start_phase=world.phase,
            attempts=world.attempts,
        )

    def step(self, world: World, inp: Input) -> Step:
        """Apply one input to one world, carrying out the effects as a runtime would."""
        problems: list[tuple[Invariant, str]] = []
        if inp in SERVER_CHANGES:
            after = replace(world, server=SERVER_CHANGES[inp])
            return Step(after, None, world.phase, (), ())
        timers = set(world.timers)
        socket = world.socket
        stopped = world.stopped
        for timer, timer_input in _TIMER_INPUTS.items():
            if inp is timer_input:
                timers.discard(timer)
        if inp in _SERVER_INITIATED_CLOSES or inp in {Input.REFUSED, Input.REJECTED, Input.DROPPED}:
            socket = Socket.NONE
        elif inp is Input.HELLO:
            socket = Socket.READY
        if inp is Input.DISCONNECT:
            stopped = True
        elif inp in {Input.CONNECT, Input.FORCE_RECONNECT}:
            stopped = False

        event, kwargs = _event_for(world, inp)
        machine = self._build(world)
        effects: tuple[Effect, ...] = ()
        if event is not None:
            if inp in USER_INPUTS and not machine.can(event):
                # The runtime treats a user action the phase cannot take as a no-op.
                if inp is Input.FORCE_RECONNECT:
                    problems.append((Invariant.FRESH_FORCE_RECONNECT, f"ignored in {world.phase}"))
                return Step(world, None, world.phase, (), tuple(problems))
            try:
                machine.send(event, **kwargs)
            except TransitionNotAllowed:
                problems.append(
                    (Invariant.IO_EVENTS_ACCEPTED, f"{event!r} not accepted in {world.phase}")
                )
                return Step(world, event, world.phase, (), tuple(problems))
            effects = tuple(machine.drain())
        else:
            # Only the watchdog fires without an event (server changes returned above):
            # traffic arrived in time, and the runtime re-arms it.
            timers.add(Timer.HEARTBEAT)

        for effect in effects:
            match effect:
                case OpenSocket():
                    if socket is not Socket.NONE:
                        problems.append(
                            (Invariant.ONE_IN_FLIGHT, f"{event}: opens a socket while {socket}")
                        )
                    if stopped:
                        problems.append((Invariant.STOP_MEANS_STOP, f"{event}: opens a socket"))
                    socket = Socket.DIALING
                case CloseSocket():
                    socket = Socket.NONE
                case StartTimer(timer=timer):
                    if timer in timers:
                        problems.append(
                            (Invariant.ONE_IN_FLIGHT, f"{event}: starts a second {timer} timer")
                        )
                    timers.add(timer)
                case CancelTimer(timer=timer):
                    timers.discard(timer)
        phase = machine.phase
        if inp is Input.FORCE_RECONNECT:
            problems.extend(self._fresh_attempt_problems(effects, phase, socket, timers))
        if (
            inp is Input.GOING_AWAY
            and world.phase in {Phase.OPEN, Phase.DEGRADED}
            and world.attempts < self.config.max_attempts
        ):
            problems.extend(self._graceful_problems(effects, phase, timers, machine))
        if inp is Input.GRACEFUL_TIMER:
            problems.extend(self._graceful_attempt_problems(world, effects, phase, machine))
        if machine.attempts > self.config.max_attempts:
            problems.append(
                (Invariant.ATTEMPTS_BOUNDED, f"{event}: attempt {machine.attempts} started")
            )
        if (
            phase is Phase.FALLBACK
            and world.phase is not Phase.FALLBACK
            and kwargs.get("retryable", True)
            and world.attempts < self.config.max_attempts
        ):
            problems.append(
                (
                    Invariant.ATTEMPTS_BOUNDED,
                    f"{event}: fallback after {world.attempts} of {self.config.max_attempts} "
                    "attempts with a retryable failure",
                )
            )
        after = World(phase, machine.attempts, socket, frozenset(timers), world.server, stopped)
        return Step(after, event, world.phase, effects, tuple(problems))

    @staticmethod
    def _fresh_attempt_problems(
        effects: tuple[Effect, ...], phase: Phase, socket: Socket, timers: set[Timer]
    ) -> list[tuple[Invariant, str]]:
        """FRESH_FORCE_RECONNECT: one counted attempt, numbered 1, and nothing else pending."""
        attempts = [e.attempt for e in effects if isinstance(e, OpenSocket) and not e.probe]
        if (
            attempts == [1]
            and phase is Phase.CONNECTING
            and socket is Socket.DIALING
            and timers == {Timer.CONNECT}
        ):
            return []
        return [
            (
                Invariant.FRESH_FORCE_RECONNECT,
                f"force_reconnect: attempts opened {attempts}, then {phase} with the socket "
                f"{socket} and timers {sorted(timers)}",
            )
        ]

    def _graceful_problems(
        self, effects: tuple[Effect, ...], phase: Phase, timers: set[Timer], machine: Lifecycle
    ) -> list[tuple[Invariant, str]]:
        """A graceful close with attempts left: reconnecting, no backoff step; then at once
        (no window) or after a delay within the window (GRACEFUL_SPREAD)."""
        problems: list[tuple[Invariant, str]] = []
        opened = any(isinstance(e, OpenSocket) for e in effects)
        window = self.config.graceful_jitter_ms
        if (
            phase is not Phase.RECONNECTING
            or Timer.RETRY in timers
            or machine.backoff.current_attempt != 0
            or (window == 0 and not opened)
        ):
            problems.append(
                (
                    Invariant.GRACEFUL_WITHOUT_BACKOFF,
                    f"graceful close: went to {phase} with timers {sorted(timers)} and "
                    f"{machine.backoff.current_attempt} backoff steps taken instead of "
                    + ("reconnecting at once" if window == 0 else "waiting the graceful delay"),
                )
            )
        if window > 0:
            delays = [
                e.delay_ms
                for e in effects
                if isinstance(e, StartTimer) and e.timer is Timer.GRACEFUL
            ]
            if (
                opened
                or Timer.GRACEFUL not in timers
                or len(delays) != 1
                or not 0 <= (delays[0] or 0.0) <= window
            ):
                problems.append(
                    (
                        Invariant.GRACEFUL_SPREAD,
                        f"graceful close: opened a socket: {opened}, graceful delays {delays} "
                        f"for a window of {window:g} ms, timers {sorted(timers)}",
                    )
                )
        return problems

    @staticmethod
    def _graceful_attempt_problems(
        world: World, effects: tuple[Effect, ...], phase: Phase, machine: Lifecycle
    ) -> list[tuple[Invariant, str]]:
        """The graceful delay ended: exactly the one counted attempt it held back, no step."""
        attempts = [e.attempt for e in effects if isinstance(e, OpenSocket) and not e.probe]
        if (
            attempts == [world.attempts + 1]
            and phase is Phase.RECONNECTING
            and machine.backoff.current_attempt == 0
        ):
            return []
        return [
            (
                Invariant.GRACEFUL_SPREAD,
                f"reconnect_due: attempts opened {attempts} after {world.attempts}, then "
                f"{phase} with {machine.backoff.current_attempt} backoff steps taken",
            )
        ]

    def world_problems(self, world: World) -> list[tuple[Invariant, str]]:
        """The per-state invariants."""
        problems: list[tuple[Invariant, str]] = []
        if world.phase in {Phase.OPEN, Phase.DEGRADED} and world.socket is not Socket.READY:
            problems.append((Invariant.OPEN_AFTER_HELLO, f"{world.phase} without a hello"))
        if world.attempts > self.config.max_attempts:
            problems.append((Invariant.ATTEMPTS_BOUNDED, f"{world.attempts} attempts"))
        needs_exit = world.phase not in {Phase.IDLE, Phase.OPEN}
        probe_disabled_fallback = world.phase is Phase.FALLBACK and not self.config.probe
        if needs_exit and not world.timers and not probe_disabled_fallback:
            problems.append((Invariant.NO_STUCK_PHASE, f"{world.phase} with no timer pending"))
        return problems

    def run(self) -> Report:
        """Explore every reachable world and check every invariant."""
        report = Report(self.config)
        start = initial_world()
        parent: dict[World, tuple[World, Input] | None] = {start: None}
        graph: dict[World, list[tuple[Input, World]]] = {}
        queue = deque([start])
        while queue:
            world = queue.popleft()
            report.phases_reached.add(world.phase)
            for invariant, detail in self.world_problems(world):
                report.violations.append(
                    Violation(invariant, world, detail, self._trace(parent, world))
                )
            edges: list[tuple[Input, World]] = []
            for inp in inputs(world):
                step = self.step(world, inp)
                report.edges += 1
                if step.event is not None and not step.problems:
                    report.transitions_taken.add((step.source, step.event, step.world.phase))
                for invariant, detail in step.problems:
                    report.violations.append(
                        Violation(invariant, world, f"{inp}: {detail}", self._trace(parent, world))
                    )
                if inp is Input.DISCONNECT and (
                    step.world.phase is not Phase.IDLE
                    or step.world.socket is not Socket.NONE
                    or step.world.timers
                ):
                    report.violations.append(
                        Violation(
                            Invariant.DISCONNECT_REACHES_IDLE,
                            world,
                            f"disconnect leaves {step.world}",
                            self._trace(parent, world),
                        )
                    )
                edges.append((inp, step.world))
                if step.world not in parent:
                    parent[step.world] = (world, inp)
                    # A broken machine can count without bound; its violation is recorded
                    # when the world is visited, and exploring past it would never end.
                    if step.world.attempts <= self.config.max_attempts + 1:
                        queue.append(step.world)
            graph[world] = edges
        report.states = len(graph)
        report.violations.extend(self._liveness(graph, parent))
        return report

    def _liveness(
        self,
        graph: dict[World, list[tuple[Input, World]]],
        parent: dict[World, tuple[World, Input] | None],
    ) -> list[Violation]:
        """RECOVERS_WHEN_UP, by graph analysis over the worlds where the server stays up."""

        def up_edges(world: World) -> Iterator[World]:
            for inp, target in graph.get(world, ()):
                if inp in SERVER_CHANGES or inp in _SERVER_INITIATED_CLOSES:
                    continue
                if inp in USER_INPUTS and inp is not Input.CONNECT:
                    continue
                yield target

        up_worlds = [w for w in graph if w.server is Server.UP]
        reverse: dict[World, list[World]] = {w: [] for w in up_worlds}
        for world in up_worlds:
            for target in up_edges(world):
                reverse.setdefault(target, []).append(world)
        # Backward reachability from every open world: who can get there?
        good = {w for w in up_worlds if w.phase is Phase.OPEN}
        queue = deque(good)
        while queue:
            for pred in reverse.get(queue.popleft(), ()):
                if pred not in good:
                    good.add(pred)
                    queue.append(pred)
        violations = [
            Violation(
                Invariant.RECOVERS_WHEN_UP,
                w,
                "no path to open with the server up",
                self._trace(parent, w),
            )
            for w in up_worlds
            if w not in good
        ]
        # Without the application's help, every run must reach open: no cycle that avoids it.
        violations.extend(self._cycles_avoiding_open(up_worlds, graph, parent))
        return violations

    def _cycles_avoiding_open(
        self,
        up_worlds: list[World],
        graph: dict[World, list[tuple[Input, World]]],
        parent: dict[World, tuple[World, Input] | None],
    ) -> list[Violation]:
        def automatic(world: World) -> list[World]:
            return [
                target
                for inp, target in graph.get(world, ())
                if inp not in USER_INPUTS
                and inp not in SERVER_CHANGES
                and inp not in _SERVER_INITIATED_CLOSES
                # Fairness: a server that is up answers within the connect timeout.
                and not (inp is Input.CONNECT_TIMER and world.socket is Socket.DIALING)
                and target != world
            ]

        candidates = {
            w for w in up_worlds if w.phase not in {Phase.OPEN, Phase.IDLE} and not w.stopped
        }
        # Kahn-style peeling: a world whose automatic successors all leave the candidate set
        # (or that has none) cannot be on a cycle; what remains is cyclic.
        out_degree = {w: sum(1 for t in automatic(w) if t in candidates) for w in candidates}
        preds: dict[World, list[World]] = {w: [] for w in candidates}
        for w in candidates:
            for t in automatic(w):
                if t in candidates:
                    preds[t].append(w)
        queue = deque(w for w, d in out_degree.items() if d == 0)
        removed: set[World] = set()
        while queue:
            w = queue.popleft()
            removed.add(w)
            for p in preds[w]:
                out_degree[p] -= 1
                if out_degree[p] == 0:
                    queue.append(p)
        return [
            Violation(
                Invariant.RECOVERS_WHEN_UP,
                w,
                "on a cycle that never reaches open",
                self._trace(parent, w),
            )
            for w in sorted(candidates - removed, key=str)[:5]
        ]

    @staticmethod
    def _trace(parent: dict[World, tuple[World, Input] | None], world: World) -> tuple[str, ...]:
        steps: list[str] = []
        link = parent.get(world)
        while link is not None:
            prev, inp = link
            steps.append(f"{prev.phase} --{inp}-->")
            link = parent.get(prev)
        return tuple(reversed(steps))


DEFAULT_CONFIGS = (
    Config(max_attempts=1, probe=True),
    Config(max_attempts=4, probe=True),
    Config(max_attempts=4, probe=False),
    Config(max_attempts=1, probe=True, graceful_jitter_ms=1000.0),
    Config(max_attempts=4, probe=True, graceful_jitter_ms=1000.0),
)


def check(
    machine: type[Lifecycle] = Lifecycle, configs: tuple[Config, ...] = DEFAULT_CONFIGS
) -> list[Report]:
    """Explore each configuration of ``machine`` and return the reports."""
    return [Explorer(config, machine).run() for config in configs]
