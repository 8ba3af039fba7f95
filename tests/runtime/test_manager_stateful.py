"""Stateful tests: a real ``WebSocketManager`` against a fake server, step by step vs a model.

Hypothesis draws user actions (connect, disconnect, force_reconnect, send, ping, and a send
that force_reconnect() or a drop catches before it is written), server faults (switch the
script: up, down, reject 4401 / HTTP 403 / 503, 4500, drop on accept, silent, hang, bad hello,
wrong version, late hello; go half-open; close an open connection with 1000/1001/1011/4401/4500;
drop it; send it a ping, a pong, a message or garbage) and time passing on a
:class:`VirtualClock` (drawn amounts, or exactly to the next deadline).

The model (:class:`ClientModel`) is a small discrete-event simulation of the client and the
fake server, written from docs/protocol.md: its own ``Lifecycle`` takes every phase decision
(the declaration is the spec), and the model itself tracks what the runtime must carry out
around it: which socket is live, which timers are pending and when they are due (its own
backoff, seeded like the runtime's, so even jittered delays are predicted exactly), the
heartbeat watchdog's silence arithmetic, the send queue, the stats, and what the server must
have received and how each connection must have ended.

Time passes in lockstep: the machine asks the clock for the next thing due and the model for
its next deadline; they must agree (time and owner: ``steadysocket-timer-retry``, ...), then
both fire it, the loop settles, and the whole observable state is compared. So every single
timer firing is checked, not only the state after a rule.

Invariants after every step: the runtime's phase, attempts, pending timers and their due times,
stats, uptime, fallback flags, phase history and every server-side record equal the model's;
at most one connection is open or opening on the server; at most one timer of each kind is
pending (core, manager tasks and clock agree); attempts never exceed ``max_attempts``; every
retry delay lies within ``BackoffStrategy.calculate_jitter_bounds``, and every graceful
reconnect's delay within its window (``graceful_jitter_ms``, drawn per run: 0 reconnects at
once); every ``send()`` returns
what the model predicts, and every one that returned True was delivered exactly once, in
order, or handed back, or is still queued; ``on_error`` heard of every failure, with its kind.
After ``disconnect()`` (a rule, and the teardown) no task of the manager is left and every
accepted message was delivered or handed back.

The same machine runs against the :class:`LoopbackServer` (real sockets, the default opener)
with fewer examples; there the loop cannot be observed to be idle, so each step waits (bounded)
until the observable state equals the model's before comparing again.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind, Failure, HttpFailure
from steadysocket.model.classify import classify as classify_failure
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
from steadysocket.model.lifecycle import DEAD_AFTER, DEGRADED_AFTER, Lifecycle
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import WebSocketManager, WSError
from tests.runtime.fakes import (
    LATE_HELLO_OWNER,
    ConnectionRecord,
    ConnState,
    InMemoryServer,
    LoopbackServer,
    Mode,
    Script,
    ScriptedServer,
    VirtualClock,
    failures_into,
    unexpected_server_errors,
)

HEARTBEAT_MS = 1000
CONNECT_TIMEOUT_MS = 1500.0
STABLE_AFTER_MS = (1777.0, 3333.0)
"""Drawn per run. 1.777 s is shorter than the 1.2 s to degraded plus the 0.8 s to dead, so a
connection silent from the start is degraded when it becomes stable (degraded --stable-->);
3.333 s is longer than the 2 s to dead, so a dead peer can end an outage at its last attempt
(degraded --peer_dead--> fallback)."""
PROBE_MS = 7770.0
BASE_DELAYS_MS = (500.0, 1000.0, 2000.0)
CAP_MS = 2000.0
JITTER = 0.3
GRACEFUL_JITTER_MS = (700.0, 0.0)
"""Drawn per run: a graceful 1001 waits a delay drawn within 700 ms, or reconnects at once."""
STEP_TIMEOUT_S = 10.0
"""Real seconds any one step may take before it counts as a hang."""

SENDING = frozenset({Phase.OPEN, Phase.DEGRADED})
QUEUEING = frozenset({Phase.CONNECTING, Phase.RECONNECTING, Phase.FAILED})

SCRIPTS: dict[str, Script] = {
    "up": Script.accept(HEARTBEAT_MS),
    "up without graceful_reconnect": Script.accept(HEARTBEAT_MS, features=("heartbeat",)),
    "down (refuse)": Script.refuse(),
    "reject 4401": Script.close(4401, "Invalid role 'x'"),
    "reject HTTP 503": Script.reject(503),
    "reject HTTP 403": Script.reject(403),
    "handshake error 4500": Script.close(4500, "Server handshake error"),
    "drop on accept": Script.drop(),
    "silent": Script.silent(),
    "hang": Script.hang(),
    "bad hello": Script.bad_hello(),
    "wrong version": Script.wrong_version(3, HEARTBEAT_MS),
    "late hello 400 ms": Script.late_hello(400, HEARTBEAT_MS),
    "late hello 2600 ms": Script.late_hello(2600, HEARTBEAT_MS),
}
# "up" four times and "silent" (the half-open connection) three times as likely as any other
# script, so runs reach open, and degraded, often enough to go somewhere from there.
SCRIPT_CHOICES = ["up", "up", "up", "silent", "silent", *SCRIPTS]
SERVER_FRAMES = {
    "ping": None,
    "custom": '{"type":"news","n":1}',
    "garbage": "this is not json",
    "pong": '{"type":"pong","timestamp":"2025-01-01T00:00:00Z"}',
}

# What all runs reached, for the end-of-run summary.
PHASES_REACHED: dict[str, set[str]] = {}
TRANSITIONS_TAKEN: dict[str, set[str]] = {}


def declared_transitions() -> set[str]:
    """Every (source, event, target) the declaration has, as ``src --event--> dst`` text."""
    out: set[str] = set()
    for state in Lifecycle.states:
        for transition in state.transitions:
            for name in transition.events:
                out.add(f"{state.value} --{name}--> {transition.target.value}")
    return out


def _kind(frame: str | bytes) -> str:
    """What the server received, as the model names it: ping, pong or msg:<id>."""
    import json

    if isinstance(frame, bytes):
        return "bytes"
    try:
        data = json.loads(frame)
    except ValueError:
        return "garbage"
    if not isinstance(data, dict):
        return "other"
    kind = data.get("type")
    if kind == "msg":
        return f"msg:{data.get('id')}"
    return str(kind)


# -------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ExpectedConnection:
    """The model's view of one server-side connection."""

    script: Script
    state: ConnState = ConnState.OPEN
    opened: bool = False
    """A valid hello was processed: the connection is (or was) the client's open one."""
    received: list[str] = field(default_factory=list)
    closed_by: str | None = None
    code: int | None = None
    reason: str | None = None
    late_hello: tuple[float, int] | None = None

    def finish(self, by: str, code: int | None, reason: str | None) -> None:
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSED
        self.closed_by, self.code, self.reason = by, code, reason
        self.late_hello = None

    def summary(self) -> tuple[object, ...]:
        return (str(self.state), self.closed_by, self.code, self.reason, tuple(self.received))


@dataclass(eq=False)
class Attempt:
    """One socket the client opened (``live_generation`` in the runtime)."""

    script: Script
    conn: ExpectedConnection | None = None


@dataclass(frozen=True)
class Params:
    max_attempts: int
    probe: bool
    queue_limit: int
    seed: int
    stable_after_ms: float
    graceful_jitter_ms: float

    def backoff(self) -> BackoffStrategy:
        return BackoffStrategy(
            base_delays_ms=BASE_DELAYS_MS,
            cap_delay_ms=CAP_MS,
            jitter_ratio=JITTER,
            max_attempts=self.max_attempts,
            rng=random.Random(self.seed),
        )


class ClientModel:
    """What the runtime and the fake server must show, predicted event by event."""

    def __init__(self, params: Params, script: Script, now: float) -> None:
        self.params = params
        self.lc = Lifecycle(
            backoff=params.backoff(),
            connection_timeout_ms=CONNECT_TIMEOUT_MS,
            stable_after_ms=params.stable_after_ms,
            fallback_probe_interval_ms=PROBE_MS if params.probe else None,
            graceful_jitter_ms=params.graceful_jitter_ms,
        )
        self.script = script
        self.now = now
        self.seq = 0
        self.timers: dict[Timer, tuple[float, int]] = {}
        self.live: Attempt | None = None
        self.transport: ExpectedConnection | None = None
        self.hanging: ExpectedConnection | None = None
        self.conns: list[ExpectedConnection] = []
        self.attempt_modes: list[Mode] = []
        self.pending: deque[Callable[[], None]] = deque()

        self.queue: list[int] = []
        self.outgoing: list[int] = []
        """Accepted while open but not written yet (only within one instant)."""
        self.delivered: list[int] = []
        self.returned: list[int] = []
        self.app_messages = 0
        self.errors: list[tuple[str, bool]] = []

        self.total_attempts = 0
        self.successful = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.heartbeats_sent = 0
        self.heartbeats_received = 0
        self.last_activity: float | None = None
        self.opened_at: float | None = None
        self.features: tuple[str, ...] = ()

        self.phase_history: list[Phase] = []
        self.transitions: list[tuple[Phase, str, Phase]] = []
        self.retry_delays: list[float] = []
        self.graceful_delays: list[float] = []
        self.backoff_steps = 0
        self.bad_delays: list[str] = []

    @property
    def phase(self) -> Phase:
        return self.lc.phase

    # -- driving ---------------------------------------------------------------------------

    def run(self, action: Callable[[], Any]) -> Any:
        """Apply one outside event, then everything it causes at the same instant."""
        result = action()
        while self.pending:
            self.pending.popleft()()
        return result

    def fire(self, name: str, **kwargs: Any) -> None:
        before = self.lc.phase
        self.lc.send(name, **kwargs)
        after = self.lc.phase
        self.transitions.append((before, name, after))
        if after is not before:
            self.phase_history.append(after)
        for effect in self.lc.drain():
            self.apply(effect)

    def apply(self, effect: Effect) -> None:
        match effect:
            case OpenSocket():
                self.open_socket()
            case CloseSocket(code=code, reason=reason):
                self.close_socket(code, reason)
            case StartTimer(timer=timer, delay_ms=delay):
                assert delay is not None
                self.start_timer(timer, delay)
                if timer is Timer.RETRY:
                    self.note_retry(delay)
                elif timer is Timer.GRACEFUL:
                    self.note_graceful(delay)
            case CancelTimer(timer=timer):
                self.timers.pop(timer, None)
            case SendPing():
                self.heartbeats_sent += 1
                self.client_sends("ping")
            case FlushQueue():
                queued, self.queue = self.queue, []
                for ident in queued:
                    self.deliver(ident)
            case ReturnQueue():
                self.salvage()
                self.returned.extend(self.queue)
                self.queue = []
            case ResetBackoff():
                self.backoff_steps = 0

    def start_timer(self, timer: Timer, delay_ms: float) -> None:
        self.seq += 1
        self.timers[timer] = (self.now + delay_ms / 1000.0, self.seq)

    def note_retry(self, delay_ms: float) -> None:
        self.retry_delays.append(delay_ms)
        # Independent of BackoffStrategy's own bookkeeping: one failure consumes one step, so
        # the step is the number of retry delays since the backoff was last reset.
        index = self.backoff_steps
        self.backoff_steps += 1
        base = min(CAP_MS, BASE_DELAYS_MS[min(index, len(BASE_DELAYS_MS) - 1)])
        low, high = BackoffStrategy.calculate_jitter_bounds(base, JITTER)
        if not low <= delay_ms <= high:
            self.bad_delays.append(
                f"retry delay {delay_ms} outside [{low}, {high}] for step {index}"
            )

    def note_graceful(self, delay_ms: float) -> None:
        self.graceful_delays.append(delay_ms)
        # Independent of the lifecycle: a graceful delay exists only with a window, lies
        # within it, and takes no backoff step (backoff_steps is left alone).
        window = self.params.graceful_jitter_ms
        if not 0 <= delay_ms <= window or window == 0:
            self.bad_delays.append(f"graceful delay {delay_ms} outside [0, {window}]")

    # -- the socket ------------------------------------------------------------------------

    def open_socket(self) -> None:
        self.total_attempts += 1
        script = self.script
        attempt = Attempt(script)
        self.live = attempt
        self.attempt_modes.append(script.mode)
        if script.mode is Mode.REFUSE:
            failure: Failure = ErrorFailure(ErrorKind.REFUSED)
            self.pending.append(lambda: self.attempt_failed(attempt, failure))
            return
        if script.mode is Mode.REJECT:
            rejection = HttpFailure(script.status)
            self.pending.append(lambda: self.attempt_failed(attempt, rejection))
            return
        conn = ExpectedConnection(script)
        attempt.conn = conn
        self.conns.append(conn)
        if script.mode is Mode.HANG:
            conn.state = ConnState.OPENING
            self.hanging = conn
            return
        self.transport = conn
        match script.mode:
            case Mode.ACCEPT:
                self.pending.append(lambda: self.hello(attempt))
            case Mode.LATE_HELLO:
                self.seq += 1
                conn.late_hello = (self.now + script.delay_ms / 1000.0, self.seq)
            case Mode.BAD_HELLO:
                self.pending.append(lambda: self.first_text(attempt, ErrorKind.INVALID_HELLO))
            case Mode.WRONG_VERSION:
                self.pending.append(lambda: self.first_text(attempt, ErrorKind.VERSION_MISMATCH))
            case Mode.CLOSE:
                conn.finish("server", script.code, script.reason)
                closed = CloseFailure(script.code, script.reason)
                self.pending.append(lambda: self.transport_closed(conn, closed))
            case Mode.DROP:
                conn.finish("drop", 1006, "")
                dropped = ErrorFailure(ErrorKind.NO_CLOSE_FRAME)
                self.pending.append(lambda: self.transport_closed(conn, dropped))
            case _:
                pass

    def close_socket(self, code: int, reason: str) -> None:
        self.live = None
        self.opened_at = None
        conn, self.transport = self.transport, None
        if conn is not None:
            conn.finish("client", code, reason)
        hanging, self.hanging = self.hanging, None
        if hanging is not None:
            hanging.finish("abandoned", None, None)

    def attempt_for(self, conn: ExpectedConnection) -> Attempt | None:
        live = self.live
        return live if live is not None and live.conn is conn else None

    def hello(self, attempt: Attempt) -> None:
        if self.live is not attempt or attempt.conn is None:
            return
        conn = attempt.conn
        self.messages_received += 1
        conn.opened = True
        self.features = attempt.script.features
        self.lc.heartbeat_interval_ms = float(attempt.script.heartbeat_interval_ms)
        self.last_activity = self.now
        self.opened_at = self.now
        self.successful += 1
        self.fire("handshake_succeeded")

    def first_text(self, attempt: Attempt, kind: ErrorKind) -> None:
        if self.live is not attempt:
            return
        self.messages_received += 1
        self.attempt_failed(attempt, ErrorFailure(kind))

    def attempt_failed(self, attempt: Attempt, failure: Failure) -> None:
        if self.live is not attempt:
            return
        self.live = None
        self.report_error(failure)
        self.fire("attempt_failed", retryable=classify_failure(failure).retryable)

    def transport_closed(
        self, conn: ExpectedConnection, failure: CloseFailure | ErrorFailure
    ) -> None:
        """The client's reader saw ``conn`` end (the server closed or dropped it)."""
        if self.transport is not conn:
            return
        self.transport = None
        attempt = self.attempt_for(conn)
        if attempt is None:
            return
        if not conn.opened:
            self.attempt_failed(attempt, failure)
            return
        self.live = None
        self.opened_at = None
        self.report_error(failure)
        if isinstance(failure, CloseFailure) and failure.code == 1000:
            self.fire("closed_by_server")
        else:
            graceful = (
                isinstance(failure, CloseFailure)
                and failure.code == 1001
                and "graceful_reconnect" in self.features
            )
            self.fire(
                "connection_lost", retryable=classify_failure(failure).retryable, graceful=graceful
            )
        self.salvage()

    def salvage(self) -> None:
        """Unwritten messages: queued again while the client retries, else handed back."""
        unsent, self.outgoing = self.outgoing, []
        if self.phase in QUEUEING:
            room = max(self.params.queue_limit - len(self.queue), 0)
            self.queue[0:0] = unsent[:room]
            self.returned.extend(unsent[room:])
        else:
            self.returned.extend(unsent)

    def report_error(self, failure: Failure) -> None:
        """on_error hears of every failed attempt and lost connection."""
        classification = classify_failure(failure)
        self.errors.append((str(classification.kind), classification.retryable))

    def client_sends(self, kind: str) -> None:
        conn = self.transport
        if conn is None:
            return
        conn.received.append(kind)
        if not kind.startswith("msg:"):
            self.messages_sent += 1  # pings and pongs count as frames written, as data does
        if kind == "ping" and self.script.responsive:
            self.pending.append(lambda: self.frame_arrives(conn, "pong"))

    def deliver(self, ident: int) -> None:
        self.client_sends(f"msg:{ident}")
        self.delivered.append(ident)
        self.messages_sent += 1

    def frame_arrives(self, conn: ExpectedConnection, kind: str) -> None:
        """A frame from the server reaches the client."""
        if self.transport is not conn:
            return
        if not conn.opened:
            attempt = self.attempt_for(conn)
            if attempt is not None:
                self.first_text(attempt, ErrorKind.INVALID_HELLO)
            return
        self.messages_received += 1
        self.last_activity = self.now
        if kind in {"ping", "pong"}:
            self.heartbeats_received += 1
        elif kind == "custom":
            self.app_messages += 1
        if self.phase is Phase.DEGRADED:
            self.fire("traffic_resumed")
        if kind == "ping":
            self.heartbeats_sent += 1
            self.client_sends("pong")

    # -- outside events --------------------------------------------------------------------

    def user(self, name: str) -> None:
        if self.lc.can(name):
            self.fire(name)

    def send(self, ident: int) -> bool:
        if self.phase in SENDING:
            self.deliver(ident)
            return True
        if self.phase in QUEUEING and len(self.queue) < self.params.queue_limit:
            self.queue.append(ident)
            return True
        return False

    def send_caught_by_drop(self, ident: int) -> bool:
        """send() while open, and the server drops the connection before it is written."""
        assert self.phase in SENDING
        self.outgoing.append(ident)
        self.server_drops()
        return True

    def send_then_force_reconnect(self, ident: int) -> bool:
        """send(), then force_reconnect() before the message is written."""
        if self.phase in SENDING:
            self.outgoing.append(ident)
            sent = True
        else:
            sent = self.send(ident)
        self.user("force_reconnect")
        self.salvage()
        return sent

    def ping(self) -> bool:
        if self.phase not in SENDING:
            return False
        self.client_sends("ping")
        self.heartbeats_sent += 1
        return True

    def open_conn(self) -> ExpectedConnection | None:
        """The connection the server would act on: the newest one open (upgraded)."""
        for conn in reversed(self.conns):
            if conn.state is ConnState.OPEN:
                return conn
        return None

    def server_closes(self, code: int, reason: str) -> None:
        conn = self.open_conn()
        assert conn is not None
        conn.finish("server", code, reason)
        closed = CloseFailure(code, reason)
        self.pending.append(lambda: self.transport_closed(conn, closed))

    def server_drops(self) -> None:
        conn = self.open_conn()
        assert conn is not None
        conn.finish("drop", 1006, "")
        dropped = ErrorFailure(ErrorKind.NO_CLOSE_FRAME)
        self.pending.append(lambda: self.transport_closed(conn, dropped))

    def server_sends(self, kind: str) -> None:
        conn = self.open_conn()
        assert conn is not None
        self.pending.append(lambda: self.frame_arrives(conn, kind))

    # -- time ------------------------------------------------------------------------------

    def next_due(self) -> tuple[float, int, str] | None:
        """The next deadline: (due, order, owner), owner named as the clock names it."""
        candidates = [
            (due, seq, f"steadysocket-timer-{timer}") for timer, (due, seq) in self.timers.items()
        ]
        candidates += [
            (c.late_hello[0], c.late_hello[1], LATE_HELLO_OWNER)
            for c in self.conns
            if c.late_hello is not None
        ]
        return min(candidates) if candidates else None

    def fire_due(self, due: float, owner: str) -> None:
        self.now = due
        if owner == LATE_HELLO_OWNER:
            for conn in self.conns:
                if conn.late_hello is not None and conn.late_hello[0] == due:
                    conn.late_hello = None
                    attempt = self.attempt_for(conn)
                    if attempt is not None:
                        self.hello(attempt)
                    return
            raise AssertionError("no late hello due")
        timer = Timer(owner.removeprefix("steadysocket-timer-"))
        del self.timers[timer]
        match timer:
            case Timer.CONNECT:
                self.live = None
                self.report_error(ErrorFailure(ErrorKind.CONNECT_TIMEOUT))
                self.fire("attempt_failed", retryable=True)
            case Timer.RETRY:
                self.fire("retry_due")
            case Timer.GRACEFUL:
                self.fire("reconnect_due")
            case Timer.PROBE:
                self.fire("probe_due")
            case Timer.STABLE:
                self.fire("stable")
            case Timer.HEARTBEAT:
                self.watchdog()

    def watchdog(self) -> None:
        # The same arithmetic as the runtime, so deadlines agree to the last bit.
        interval = self.lc.heartbeat_interval_ms
        assert interval is not None
        assert self.last_activity is not None
        silence_ms = (self.now - self.last_activity) * 1000.0
        if self.phase is Phase.OPEN:
            if silence_ms >= DEGRADED_AFTER * interval:
                self.fire("heartbeat_overdue")
            else:
                self.start_timer(Timer.HEARTBEAT, max(DEGRADED_AFTER * interval - silence_ms, 1.0))
            return
        if silence_ms >= DEAD_AFTER * interval:
            self.live = None
            self.opened_at = None
            self.report_error(ErrorFailure(ErrorKind.HEARTBEAT_TIMEOUT))
            self.fire("peer_dead")
        else:
            self.start_timer(Timer.HEARTBEAT, max(DEAD_AFTER * interval - silence_ms, 1.0))

    # -- expectations ----------------------------------------------------------------------

    def expected(self) -> dict[str, object]:
        return {
            "phase": self.phase,
            "attempts": self.lc.attempts,
            "timers": {str(t): due for t, (due, _) in sorted(self.timers.items())},
            "late hellos": sorted(c.late_hello[0] for c in self.conns if c.late_hello),
            "stats": {
                "total_attempts": self.total_attempts,
                "successful_connections": self.successful,
                "messages_received": self.messages_received,
                "messages_sent": self.messages_sent,
                "heartbeats_sent": self.heartbeats_sent,
                "heartbeats_received": self.heartbeats_received,
                "current_uptime_ms": (
                    (self.now - self.opened_at) * 1000.0
                    if self.opened_at is not None and self.phase in SENDING
                    else 0.0
                ),
            },
            "is_fallback_mode": self.phase is Phase.FALLBACK,
            "has_fallback_reason": self.phase is Phase.FALLBACK,
            "phase history": list(self.phase_history),
            "attempt modes": [m for m in self.attempt_modes if m is not Mode.REFUSE],
            "connections": [c.summary() for c in self.conns],
            "delivered": list(self.delivered),
            "returned": list(self.returned),
            "queued": list(self.queue),
            "app messages": self.app_messages,
            "errors": list(self.errors),
            # In seconds, as the runtime hands them to sleep().
            "retry delays": [delay / 1000.0 for delay in self.retry_delays],
            "graceful delays": [delay / 1000.0 for delay in self.graceful_delays],
        }


# -------------------------------------------------------------------------------------------
# The machine
# -------------------------------------------------------------------------------------------


def _track(store: dict[str, set[str]], key: str, value: str) -> None:
    store.setdefault(key, set()).add(value)


class ManagerMachine(RuleBasedStateMachine):
    """Drives a ``WebSocketManager`` on a virtual clock against an in-memory fake server."""

    loopback: ClassVar[bool] = False
    label: ClassVar[str] = "in-memory"

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = VirtualClock()
        self.server: ScriptedServer
        self.manager: WebSocketManager | None = None
        self.model: ClientModel
        self.next_id = 0
        self.accepted: list[int] = []
        self.returned: list[int] = []
        self.seen_phases: list[Phase] = []
        self.errors: list[WSError] = []
        self._kind_cache: dict[int, list[str]] = {}
        self.reported = 0
        self.broken = False

    # -- plumbing --------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                return await coro

        try:
            return self.runner.run(bounded())
        except BaseException:
            self.broken = True
            raise

    @property
    def m(self) -> WebSocketManager:
        assert self.manager is not None
        return self.manager

    def observe(self) -> dict[str, object]:
        m = self.m
        core = m._core
        state = m.get_state()
        stats = state.stats
        delivered = self._delivered()
        return {
            "phase": m.phase,
            "attempts": core.lifecycle.attempts,
            "timers": {str(t): core.timer_due(t) for t in sorted(core.pending_timers, key=str)},
            "late hellos": sorted(
                e.due for e in self.clock.pending() if e.owner == LATE_HELLO_OWNER
            ),
            "stats": {
                "total_attempts": stats.total_attempts,
                "successful_connections": stats.successful_connections,
                "messages_received": stats.messages_received,
                "messages_sent": stats.messages_sent,
                "heartbeats_sent": stats.heartbeats_sent,
                "heartbeats_received": stats.heartbeats_received,
                "current_uptime_ms": stats.current_uptime_ms,
            },
            "is_fallback_mode": state.is_fallback_mode,
            "has_fallback_reason": state.fallback_reason is not None,
            "phase history": list(self.seen_phases),
            "attempt modes": [a.mode for a in self.server.attempts if a.mode is not Mode.REFUSE],
            "connections": [self._summary(r) for r in self.server.connections],
            "delivered": delivered,
            "returned": list(self.returned),
            "queued": [int(json.loads(q)["id"]) for q in core.queue],
            "app messages": self.app_messages,
            "errors": [(str(e.kind), e.retryable) for e in self.errors],
            "retry delays": [
                r.delay for r in self.clock.history if r.owner == "steadysocket-timer-retry"
            ],
            "graceful delays": [
                r.delay for r in self.clock.history if r.owner == "steadysocket-timer-graceful"
            ],
        }

    def _kinds(self, record: ConnectionRecord) -> list[str]:
        """What ``record`` received, as the model names it (parsed once per frame)."""
        kinds = self._kind_cache.setdefault(record.index, [])
        kinds.extend(_kind(frame) for frame in record.received[len(kinds) :])
        return kinds

    def _delivered(self) -> list[int]:
        return [
            int(k.removeprefix("msg:"))
            for record in self.server.connections
            for k in self._kinds(record)
            if k.startswith("msg:")
        ]

    def _summary(self, record: ConnectionRecord) -> tuple[object, ...]:
        received = tuple(self._kinds(record))
        return (
            str(record.state),
            record.closed_by,
            record.close_code,
            record.close_reason,
            received,
        )

    async def sync(self) -> None:
        """Let the runtime catch up with the model's instant, then compare everything."""
        if not self.loopback:
            await self.clock.settle()
        else:
            expected = self.model.expected()
            try:
                async with asyncio.timeout(5.0):
                    while self.observe() != expected or len(self.server.live()) > 1:  # noqa: ASYNC110
                        # Real sockets: nothing to wait on but the state itself.
                        await asyncio.sleep(0.002)
            except TimeoutError:
                pass  # compare() below says what differs
            # Anything extra the runtime does would show up by now.
            for _ in range(3):
                await asyncio.sleep(0.002)
        self.compare()

    def compare(self) -> None:
        observed, expected = self.observe(), self.model.expected()
        for key, value in expected.items():
            assert observed[key] == value, (
                f"{key}: runtime {observed[key]!r} != model {value!r}\n"
                f"runtime phase {observed['phase']}, model phase {expected['phase']}"
            )
        self.report()

    def report(self) -> None:
        for source, name, target in self.model.transitions[self.reported :]:
            label = f"{source} --{name}--> {target}"
            event(f"transition {label}")
            _track(TRANSITIONS_TAKEN, self.label, label)
            _track(PHASES_REACHED, self.label, str(target))
        self.reported = len(self.model.transitions)
        event(f"phase {self.model.phase}")
        _track(PHASES_REACHED, self.label, str(self.model.phase))

    def _stamp_phase(self, phase: Phase) -> None:
        self.seen_phases.append(phase)

    # -- setup -----------------------------------------------------------------------------

    def make_server(self) -> ScriptedServer:
        return InMemoryServer(self.clock, SCRIPTS["up"])

    @initialize(
        max_attempts=st.integers(1, 4),
        probe=st.booleans(),
        queue_limit=st.sampled_from([1, 3]),
        seed=st.integers(0, 2**32 - 1),
        stable_after_ms=st.sampled_from(STABLE_AFTER_MS),
        graceful_jitter_ms=st.sampled_from(GRACEFUL_JITTER_MS),
    )
    def start(
        self,
        max_attempts: int,
        probe: bool,
        queue_limit: int,
        seed: int,
        stable_after_ms: float,
        graceful_jitter_ms: float,
    ) -> None:
        params = Params(max_attempts, probe, queue_limit, seed, stable_after_ms, graceful_jitter_ms)
        note(f"{self.label}: {params}")
        event(f"graceful window {params.graceful_jitter_ms:g} ms")
        self.server = self.make_server()
        if isinstance(self.server, LoopbackServer):
            self.run(self.server.start())
        opener = self.server.open if isinstance(self.server, InMemoryServer) else None
        self.manager = WebSocketManager(
            self.server.url,
            "stateful-client",
            connection_timeout_ms=CONNECT_TIMEOUT_MS,
            backoff_strategy=params.backoff(),
            fallback_probe_interval_ms=PROBE_MS if probe else None,
            send_queue_limit=queue_limit,
            stable_after_ms=params.stable_after_ms,
            graceful_jitter_ms=params.graceful_jitter_ms,
            clock=self.clock,
            sleep=self.clock.sleep,
            opener=opener,
            environ={},
        )
        self.app_messages = 0
        self.m.on_state_change(lambda s: self._stamp_phase(s.phase))
        self.m.on_returned(lambda msgs: self.returned.extend(int(m["id"]) for m in msgs))
        self.m.on_message(lambda _: self._count_message())
        self.m.on_error(failures_into(self.errors))
        self.model = ClientModel(params, self.server.script, self.clock.monotonic())

    def _count_message(self) -> None:
        self.app_messages += 1

    # -- user actions ----------------------------------------------------------------------

    @rule()
    def connect(self) -> None:
        note(f"connect() in {self.m.phase}")

        async def act() -> None:
            await self.m.connect()
            self.model.run(lambda: self.model.user("connect"))
            await self.sync()

        self.run(act())

    @rule()
    def disconnect(self) -> None:
        note(f"disconnect() in {self.m.phase}")

        async def act() -> None:
            await self.m.disconnect()
            self.model.run(lambda: self.model.user("disconnect"))
            await self.sync()
            # Nothing of the manager's is left: no task, no timer on the clock.
            mine = [t for t in asyncio.all_tasks() if t.get_name().startswith("steadysocket")]
            assert mine == [], mine
            parked = [e.owner for e in self.clock.pending() if e.owner.startswith("steadysocket")]
            assert parked == [], parked
            # Every accepted message has been delivered or handed back by now.
            assert sorted(self.model.delivered + self.model.returned) == sorted(self.accepted)

        self.run(act())

    @rule()
    def force_reconnect(self) -> None:
        note(f"force_reconnect() in {self.m.phase}")

        async def act() -> None:
            await self.m.force_reconnect()
            self.model.run(lambda: self.model.user("force_reconnect"))
            await self.sync()

        self.run(act())

    @rule()
    def send(self) -> None:
        ident = self.next_id
        self.next_id += 1

        async def act() -> bool:
            sent = self.m.send({"type": "msg", "id": ident})
            predicted = self.model.run(lambda: self.model.send(ident))
            assert sent == predicted, f"send() returned {sent}, model says {predicted}"
            await self.sync()
            return sent

        sent = self.run(act())
        note(f"send(#{ident}) in {self.m.phase} -> {sent}")
        if sent:
            self.accepted.append(ident)

    @rule()
    def ping(self) -> None:
        async def act() -> bool:
            sent = self.m.ping()
            predicted = self.model.run(self.model.ping)
            assert sent == predicted, f"ping() returned {sent}, model says {predicted}"
            await self.sync()
            return sent

        note(f"ping() -> {self.run(act())}")

    @rule()
    def send_then_force_reconnect(self) -> None:
        ident = self.next_id
        self.next_id += 1

        async def act() -> bool:
            sent = self.m.send({"type": "msg", "id": ident})
            await self.m.force_reconnect()
            predicted = self.model.run(lambda: self.model.send_then_force_reconnect(ident))
            assert sent == predicted, f"send() returned {sent}, model says {predicted}"
            await self.sync()
            return sent

        note(f"send(#{ident}) then at once force_reconnect() in {self.m.phase}")
        if self.run(act()):
            self.accepted.append(ident)

    @rule()
    def send_as_the_server_drops(self) -> None:
        # In memory only: over a real socket the write may reach the kernel before the reset
        # does, and TCP then loses it with no one the wiser; that is no runtime decision.
        if self.loopback or self.model.phase not in SENDING:
            note("(no send caught by a drop: loopback, or not open)")
            return
        ident = self.next_id
        self.next_id += 1

        async def act() -> None:
            assert self.m.send({"type": "msg", "id": ident})
            await self.server.drop()
            self.model.run(lambda: self.model.send_caught_by_drop(ident))
            await self.sync()

        note(f"send(#{ident}) and the server drops the connection before it is written")
        self.run(act())
        self.accepted.append(ident)

    # -- server faults ---------------------------------------------------------------------

    @rule(name=st.sampled_from(SCRIPT_CHOICES))
    def server_switches_script(self, name: str) -> None:
        script = SCRIPTS[name]
        if self.loopback and script.mode is Mode.HANG:
            # A real server cannot leave the opening handshake hanging; the nearest is silent.
            name, script = "silent (for hang)", SCRIPTS["silent"]
        note(f"server script -> {name}")

        async def act() -> None:
            await self.server.set_script(script)
            self.model.script = script
            await self.sync()

        self.run(act())

    @rule()
    def server_goes_half_open(self) -> None:
        """The server stops sending (and answering) but keeps the connection: the half-open
        case the watchdog exists for. Time then passes, deadline by deadline, until the client
        notices (degraded), so that what happens *in* degraded gets drawn often enough."""
        self.server_switches_script("silent")
        for _ in range(5):
            due = self.model.next_due()
            if self.model.phase is not Phase.OPEN or due is None:
                break
            note(f"time passes to the next deadline ({due[2]})")
            self.run(self._advance(due[0]))

    # The server's actions on its connection are no-ops without one (rather than
    # preconditions, which make hypothesis retry and clutter the statistics).

    @rule(code=st.sampled_from([1000, 1001, 1011, 4401, 4500]))
    def server_closes(self, code: int) -> None:
        if self.model.open_conn() is None:
            note(f"(no connection for the server to close with {code})")
            return
        note(f"server closes its connection with {code}")

        async def act() -> None:
            await self.server.close(code, f"scripted {code}")
            self.model.run(lambda: self.model.server_closes(code, f"scripted {code}"))
            await self.sync()

        self.run(act())

    @rule()
    def server_goes_away_gracefully(self) -> None:
        """The server closes with 1001 (graceful, if its hello advertised graceful_reconnect),
        then time passes to the graceful delay's end if one was drawn: so that the delayed
        attempt (reconnecting --reconnect_due-->) is drawn often enough."""
        if self.model.open_conn() is None:
            note("(no connection for the server to close gracefully)")
            return
        self.server_closes(1001)
        due = self.model.next_due()
        if due is not None and due[2] == f"steadysocket-timer-{Timer.GRACEFUL}":
            note("time passes to the end of the graceful delay")
            self.run(self._advance(due[0]))

    @rule()
    def server_drops(self) -> None:
        if self.model.open_conn() is None:
            note("(no connection for the server to drop)")
            return
        note("server drops its connection (no close frame)")

        async def act() -> None:
            await self.server.drop()
            self.model.run(self.model.server_drops)
            await self.sync()

        self.run(act())

    @rule(kind=st.sampled_from(sorted(SERVER_FRAMES)))
    def server_sends(self, kind: str) -> None:
        if self.model.open_conn() is None:
            note(f"(no connection for the server to send a {kind} frame on)")
            return
        note(f"server sends a {kind} frame")

        async def act() -> None:
            if kind == "ping":
                await self.server.ping()
            else:
                text = SERVER_FRAMES[kind]
                assert text is not None
                await self.server.send(text)
            self.model.run(lambda: self.model.server_sends(kind))
            await self.sync()

        self.run(act())

    # -- time ------------------------------------------------------------------------------

    async def _advance(self, target: float) -> None:
        while True:
            entry = self.clock.peek()
            due = self.model.next_due()
            if entry is None or entry.due > target:
                assert due is None or due[0] > target, f"model expects {due} by {target}"
                break
            assert due is not None, f"runtime has {entry.owner} at {entry.due}, model nothing"
            assert (entry.due, entry.owner) == (due[0], due[2]), (
                f"runtime next: {entry.owner} at {entry.due}; model next: {due[2]} at {due[0]}"
            )
            note(f"  t={entry.due - self.clock._start:.4f}: {entry.owner}")
            self.clock.fire(entry)
            when, owner = due[0], due[2]
            self.model.run(lambda: self.model.fire_due(when, owner))  # noqa: B023
            await self.sync()
        self.clock.jump_to(target)
        self.model.now = target
        await self.sync()

    @rule(
        seconds=st.one_of(
            st.sampled_from([0.05, 0.1, 0.25, 0.4, 0.6, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 8.0, 61.0]),
            st.floats(0.001, 20.0),
        )
    )
    def time_passes(self, seconds: float) -> None:
        note(f"time passes: {seconds:.4f} s")
        self.run(self._advance(self.clock.monotonic() + seconds))

    @rule()
    def time_reaches_the_next_deadline(self) -> None:
        due = self.model.next_due()
        if due is None:
            note("(no deadline pending)")
            return
        note(f"time passes exactly to the next deadline ({due[2]})")
        self.run(self._advance(due[0]))

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def runtime_matches_model(self) -> None:
        if self.manager is not None:
            self.compare()

    @invariant()
    def no_unexpected_server_error_reached_on_error(self) -> None:
        assert unexpected_server_errors == []

    @invariant()
    def at_most_one_connection_in_flight(self) -> None:
        if self.manager is not None:
            live = self.server.live()
            assert len(live) <= 1, [self._summary(r) for r in live]

    @invariant()
    def at_most_one_timer_of_each_kind(self) -> None:
        if self.manager is None:
            return
        core = self.m._core
        tasks = {t: task for t, task in self.m._timers.items() if not task.done()}
        assert set(tasks) == set(core.pending_timers)
        owners = [e.owner for e in self.clock.pending() if e.owner.startswith("steadysocket")]
        assert sorted(owners) == sorted(f"steadysocket-timer-{t}" for t in core.pending_timers)

    @invariant()
    def attempts_never_exceed_the_maximum(self) -> None:
        if self.manager is not None:
            assert 0 <= self.m._core.lifecycle.attempts <= self.model.params.max_attempts

    @invariant()
    def every_retry_and_graceful_delay_lies_within_its_bounds(self) -> None:
        if self.manager is not None:
            assert self.model.bad_delays == []

    @invariant()
    def no_message_is_lost(self) -> None:
        if self.manager is None:
            return
        delivered = self._delivered()
        queued = [int(json.loads(q)["id"]) for q in self.m._core.queue]
        outgoing = [int(json.loads(q)["id"]) for q in self.m._outgoing]
        everything = delivered + self.returned + queued + outgoing
        assert sorted(everything) == sorted(self.accepted), "lost or duplicated"
        assert delivered == sorted(delivered), "delivered out of order"
        assert self.m.take_returned() == []

    # -- teardown --------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.manager is not None and not self.broken:

                async def finish() -> None:
                    await self.m.disconnect()
                    self.model.run(lambda: self.model.user("disconnect"))
                    await self.sync()
                    mine = [
                        t for t in asyncio.all_tasks() if t.get_name().startswith("steadysocket")
                    ]
                    assert mine == []
                    assert sorted(self.model.delivered + self.model.returned) == sorted(
                        self.accepted
                    )
                    if isinstance(self.server, LoopbackServer):
                        await self.server.stop()

                self.run(finish())
            elif self.manager is not None and isinstance(self.server, LoopbackServer):
                self.run(self.server.stop())
        finally:
            self.runner.close()


class LoopbackManagerMachine(ManagerMachine):
    """The same machine over real sockets: ``LoopbackServer`` and the default opener."""

    loopback = True
    label = "loopback"

    def make_server(self) -> ScriptedServer:
        return LoopbackServer(self.clock, SCRIPTS["up"])


def _summarise(label: str, summary: Callable[[str, str], None]) -> None:
    if label not in PHASES_REACHED:
        summary(f"stateful: manager vs model ({label})", "not run in this session")
        return
    phases = PHASES_REACHED[label]
    taken = TRANSITIONS_TAKEN.get(label, set())
    declared = declared_transitions()
    order = [str(p) for p in Phase]
    summary(
        f"stateful: manager vs model ({label})",
        f"phases reached: {', '.join(p for p in order if p in phases)} "
        f"({len(phases)} of {len(order)})",
    )
    summary(
        f"stateful: manager vs model ({label})",
        f"transitions taken: {len(taken & declared)} of {len(declared)} declared",
    )
    missing = sorted(declared - taken)
    if missing:
        summary(f"stateful: manager vs model ({label})", f"not taken: {'; '.join(missing)}")


# Run as hypothesis's own TestCases, so that ``--hypothesis-show-statistics`` reports the phases
# reached and transitions taken (``event()``); the summary test below then prints the union.
class TestStatefulManagerInMemory(ManagerMachine.TestCase):  # type: ignore[misc,valid-type]
    """The profile's examples (``ci``: 100, ``fuzz``: 2000) of at least 100 steps each: the
    paths through degraded need long runs."""

    settings = settings(
        deadline=None,
        stateful_step_count=max(settings().stateful_step_count, 100),
        suppress_health_check=list(HealthCheck),
    )


class TestStatefulManagerOverLoopback(LoopbackManagerMachine.TestCase):  # type: ignore[misc,valid-type]
    """Real sockets cost real time: few examples, short runs."""

    settings = settings(
        max_examples=10,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def test_stateful_summary_of_phases_and_transitions(summary: Callable[[str, str], None]) -> None:
    """Print what the stateful runs above reached (they run first, in file order)."""
    for label in (ManagerMachine.label, LoopbackManagerMachine.label):
        _summarise(label, summary)
