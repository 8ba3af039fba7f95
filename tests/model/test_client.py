"""``ClientCore`` driven the way a runtime drives it: events in, effects out, a hand-made clock.

Each test calls ``connect()`` and then feeds ``hello_received`` / ``attempt_failed`` / ``closed`` /
``timer_fired`` / ``received`` with the socket generation the core reports and the timer tokens
from the ``StartTimer`` effects it returned, exactly as ``runtime/manager.py`` does. Time moves
only when a test fires a timer (the clock jumps to the timer's due time) or calls ``advance``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.classify import (
    CloseFailure,
    ErrorFailure,
    ErrorKind,
    Failure,
    HttpFailure,
)
from steadysocket.model.client import (
    NOT_ACKNOWLEDGED,
    NOT_SENT,
    ClientConfig,
    ClientCore,
    Offer,
    Received,
)
from steadysocket.model.delivery import ClientDelivery, DeliveryConfig
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
from steadysocket.model.protocol import FEATURES, encode, make_hello
from steadysocket.model.snapshot import AttemptOutcome, Phase

T0 = datetime(2025, 8, 15, 10, 0, 0, tzinfo=UTC)
CLIENT_ID = "client-1"
BASE_URL = "ws://localhost:8000"

CONNECT_MS = 10_000.0
STABLE_MS = 5_000.0
PROBE_MS = 60_000.0
DELAYS = (1000.0, 2000.0, 4000.0, 8000.0, 12000.0)
MAX_ATTEMPTS = 3

HEARTBEAT_MS = 25_000
"""The interval the default hello announces: its watchdog (30 s) fires after STABLE (5 s)."""
SHORT_HEARTBEAT_MS = 2_500
"""For watchdog tests: 1.2x = 3000 ms and 2x = 5000 ms, exact in binary floating point."""

REFUSED = ErrorFailure(ErrorKind.REFUSED, "[Errno 111] Connection refused")
DROPPED = CloseFailure(1006)
REJECTED = CloseFailure(4401, "Invalid role 'x'")

CLIENT_DISCONNECT = CloseSocket(1000, "Client disconnect")
CLIENT_RECONNECT = CloseSocket(1000, "Client reconnect")
ATTEMPT_ABANDONED = CloseSocket(1000, "Attempt abandoned")
HEARTBEAT_TIMEOUT = CloseSocket(1000, "heartbeat timeout")
ALL_TIMERS_CANCELLED = [CancelTimer(t) for t in Timer]


class FakeClock:
    """Monotonic seconds advanced by hand; the aware UTC wall clock moves with them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.seconds)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


class Driver:
    """A runtime without I/O: keeps the armed timers and feeds the core what happened.

    After every call it checks that the timers it holds (from the effects) are exactly the
    timers the core says should be pending.
    """

    def __init__(self, core: ClientCore, clock: FakeClock) -> None:
        self.core = core
        self.clock = clock
        self.timers: dict[Timer, tuple[int, float]] = {}
        """Armed timers: token and due time on the monotonic clock (seconds)."""
        self.returned: list[dict[str, Any]] = []
        self.flushed: list[dict[str, Any]] = []

    def phase(self) -> Phase:
        """The core's phase (a call, so a type checker does not narrow it between events)."""
        return self.core.phase

    def apply(self, effects: list[Effect]) -> list[Effect]:
        for effect in effects:
            match effect:
                case StartTimer(timer=timer, delay_ms=delay, token=token):
                    assert delay is not None, effect
                    assert token is not None, effect
                    self.timers[timer] = (token, self.clock.monotonic() + delay / 1000.0)
                case CancelTimer(timer=timer):
                    self.timers.pop(timer, None)
                case ReturnQueue():
                    self.returned.extend(json.loads(t) for t in self.core.take_queue())
                case FlushQueue():
                    self.flushed.extend(json.loads(t) for t in self.core.take_queue())
        assert frozenset(self.timers) == self.core.pending_timers
        return effects

    # the application
    def connect(self) -> list[Effect]:
        return self.apply(self.core.connect())

    def disconnect(self) -> list[Effect]:
        return self.apply(self.core.disconnect())

    def force_reconnect(self) -> list[Effect]:
        return self.apply(self.core.force_reconnect())

    # the socket of the current generation
    def hello(self, **fields: Any) -> list[Effect]:
        return self.first_frame(hello_text(**fields))

    def first_frame(self, text: str) -> list[Effect]:
        return self.apply(self.core.hello_received(self.core.generation, text))

    def fail(self, failure: Failure) -> list[Effect]:
        return self.apply(self.core.attempt_failed(self.core.generation, failure))

    def close(self, failure: CloseFailure | ErrorFailure) -> list[Effect]:
        return self.apply(self.core.closed(self.core.generation, failure))

    def receive(self, text: str) -> Received:
        received = self.core.received(text)
        self.apply(received.effects)
        return received

    # time
    def token(self, timer: Timer) -> int:
        return self.timers[timer][0]

    def fire(self, timer: Timer) -> list[Effect]:
        """Let ``timer`` fire at its due time (the clock never goes backwards)."""
        token, due = self.timers.pop(timer)
        self.clock.seconds = max(self.clock.seconds, due)
        return self.apply(self.core.timer_fired(timer, token))


def hello_text(**fields: Any) -> str:
    data = make_hello(
        now=T0,
        client_id=CLIENT_ID,
        request_id="0b6a3c52-4f1e-4d7c-9a43-2f5d0c1e8b77",
        heartbeat_interval_ms=HEARTBEAT_MS,
    ).to_dict()
    data.update(fields)
    return json.dumps(data)


def client(*, max_attempts: int = MAX_ATTEMPTS, **config: Any) -> Driver:
    settings: dict[str, Any] = {
        "base_url": BASE_URL,
        "client_id": CLIENT_ID,
        "connection_timeout_ms": CONNECT_MS,
        "stable_after_ms": STABLE_MS,
        "fallback_probe_interval_ms": PROBE_MS,
        **config,
    }
    clock = FakeClock()
    backoff = BackoffStrategy(
        base_delays_ms=DELAYS, cap_delay_ms=12_000, jitter_ratio=0, max_attempts=max_attempts
    )
    return Driver(ClientCore(ClientConfig(**settings), clock, backoff), clock)


def plain(effects: list[Effect]) -> list[Effect]:
    """The effects with timer tokens blanked, to compare with a literal list."""
    return [replace(e, token=None) if isinstance(e, StartTimer) else e for e in effects]


def retry_delays(effects: list[Effect]) -> list[float | None]:
    return [e.delay_ms for e in effects if isinstance(e, StartTimer) and e.timer is Timer.RETRY]


def open_client(**config: Any) -> Driver:
    rt = client(**config)
    rt.connect()
    rt.hello()
    assert rt.phase() is Phase.OPEN
    return rt


def to_fallback(rt: Driver) -> None:
    rt.connect()
    rt.fail(REJECTED)
    assert rt.phase() is Phase.FALLBACK


OPEN_EFFECTS = [
    CancelTimer(Timer.CONNECT),
    StartTimer(Timer.HEARTBEAT, 1.2 * HEARTBEAT_MS, heartbeats=1.2),
    StartTimer(Timer.STABLE, STABLE_MS),
    FlushQueue(),
]
RETRY_AFTER_FAILED_ATTEMPT = [CancelTimer(Timer.CONNECT), ATTEMPT_ABANDONED]


# -- reaching every phase --------------------------------------------------------------------


def _reach(rt: Driver, where: str) -> None:
    """Drive a fresh client to ``where``: a phase name, or ``probing`` (fallback + probe)."""
    if where == "idle":
        return
    rt.connect()
    if where == "connecting":
        return
    if where in ("open", "degraded"):
        rt.hello()
        if where == "degraded":
            rt.fire(Timer.HEARTBEAT)
        return
    rt.fail(REFUSED)
    if where == "failed":
        return
    rt.fire(Timer.RETRY)
    if where == "reconnecting":
        return
    rt.fail(REJECTED)
    if where == "fallback":
        return
    assert where == "probing"
    rt.fire(Timer.PROBE)


PLACES: dict[str, Phase] = {
    "idle": Phase.IDLE,
    "connecting": Phase.CONNECTING,
    "open": Phase.OPEN,
    "degraded": Phase.DEGRADED,
    "reconnecting": Phase.RECONNECTING,
    "failed": Phase.FAILED,
    "fallback": Phase.FALLBACK,
    "probing": Phase.FALLBACK,
}
WITH_SOCKET = frozenset({"connecting", "open", "degraded", "reconnecting", "probing"})


@pytest.mark.parametrize("where", list(PLACES))
def test_the_test_driver_reaches_every_phase(where: str) -> None:
    rt = client()
    _reach(rt, where)
    assert rt.phase() is PLACES[where]
    assert (rt.core.live_generation is not None) == (where in WITH_SOCKET)


# -- handshake -------------------------------------------------------------------------------


def test_connect_starts_one_attempt_in_connecting_bounded_by_the_connect_timer() -> None:
    rt = client()
    effects = rt.connect()
    assert rt.phase() is Phase.CONNECTING
    assert plain(effects) == [
        ResetBackoff(),
        OpenSocket(attempt=1),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    assert rt.core.generation == 1
    assert rt.core.live_generation == 1
    attempt = rt.core.snapshot().current_attempt
    assert attempt is not None
    assert (attempt.number, attempt.phase, attempt.outcome) == (
        1,
        Phase.CONNECTING,
        AttemptOutcome.IN_FLIGHT,
    )


def test_client_opens_only_after_a_valid_hello() -> None:
    rt = client()
    rt.connect()
    rt.clock.advance(0.25)
    # The socket being up is not enough: until the hello, sends are queued, not sent.
    assert rt.core.offer(encode({"type": "chat"})) is Offer.QUEUED
    assert rt.phase() is Phase.CONNECTING

    effects = rt.hello()

    assert rt.phase() is Phase.OPEN
    assert plain(effects) == OPEN_EFFECTS
    state = rt.core.snapshot()
    assert state.stats.successful_connections == 1
    assert state.last_hello_message is not None
    assert state.last_hello_message.heartbeat_interval_ms == HEARTBEAT_MS
    assert state.connection_features == FEATURES
    assert state.current_attempt is None
    opened = state.recent_attempts[0]
    assert (opened.outcome, opened.duration_ms) == (AttemptOutcome.OPEN, 250.0)
    assert rt.flushed == [{"type": "chat"}]


MALFORMED_FIRST_FRAMES = {
    "not JSON": "hello?",
    "JSON but not an object": "[1, 2]",
    "an object without a type": '{"server_time": "2025-08-15T10:00:00.000Z"}',
    "not a hello first": json.dumps(
        {"type": "echo", "original_message": {}, "timestamp": "2025-08-15T10:00:00.000Z"}
    ),
    "a hello without heartbeat_interval_ms": json.dumps(
        {k: v for k, v in json.loads(hello_text()).items() if k != "heartbeat_interval_ms"}
    ),
    "a hello with a bad server_time": hello_text(server_time="yesterday"),
    "a hello with a zero heartbeat interval": hello_text(heartbeat_interval_ms=0),
    "a hello with a string version": hello_text(accepted_version="1"),
}


@pytest.mark.parametrize("text", MALFORMED_FIRST_FRAMES.values(), ids=MALFORMED_FIRST_FRAMES)
def test_a_malformed_or_unexpected_first_frame_is_a_retryable_handshake_failure(text: str) -> None:
    rt = client()
    rt.connect()

    effects = rt.first_frame(text)

    assert rt.phase() is Phase.FAILED
    assert plain(effects) == [*RETRY_AFTER_FAILED_ATTEMPT, StartTimer(Timer.RETRY, 1000.0)]
    attempt = rt.core.snapshot().recent_attempts[0]
    assert attempt.outcome == AttemptOutcome.FAILED
    assert (attempt.failure_kind, attempt.retryable) == ("handshake", True)
    assert attempt.detail is not None
    assert attempt.detail.startswith("invalid hello")
    assert rt.core.snapshot().stats.successful_connections == 0


def test_a_missing_hello_fails_the_attempt_when_the_connect_timer_fires() -> None:
    rt = client()
    rt.connect()

    effects = rt.fire(Timer.CONNECT)

    assert rt.phase() is Phase.FAILED
    assert plain(effects) == [*RETRY_AFTER_FAILED_ATTEMPT, StartTimer(Timer.RETRY, 1000.0)]
    attempt = rt.core.snapshot().recent_attempts[0]
    assert attempt.failure_kind == "timeout"
    assert attempt.duration_ms == CONNECT_MS
    assert attempt.detail == "connect timeout: no valid hello within 10000 ms"


def test_a_socket_closed_before_the_hello_is_a_failed_attempt() -> None:
    rt = client()
    rt.connect()
    effects = rt.fail(DROPPED)
    assert rt.phase() is Phase.FAILED
    assert retry_delays(effects) == [1000.0]
    assert rt.core.snapshot().recent_attempts[0].close_code == 1006


def test_an_accepted_version_mismatch_goes_to_fallback_in_one_attempt() -> None:
    rt = client()
    rt.connect()

    effects = rt.hello(accepted_version=3)

    assert rt.phase() is Phase.FALLBACK
    assert plain(effects) == [
        *RETRY_AFTER_FAILED_ATTEMPT,
        ReturnQueue(),
        StartTimer(Timer.PROBE, PROBE_MS),
    ]
    state = rt.core.snapshot()
    assert state.stats.total_attempts == 1
    assert state.stats.successful_connections == 0
    assert state.last_hello_message is None
    assert state.is_fallback_mode
    assert state.fallback_reason == (
        "protocol version mismatch: asked for version 1, server accepted 3 "
        "[handshake, not retryable]"
    )
    assert (state.recent_attempts[0].failure_kind, state.recent_attempts[0].retryable) == (
        "handshake",
        False,
    )


# -- phases, attempts and backoff -------------------------------------------------------------


def test_first_attempt_runs_in_connecting_later_ones_in_reconnecting_and_waiting_is_failed() -> (
    None
):
    rt = client()
    rt.connect()
    assert rt.phase() is Phase.CONNECTING

    rt.fail(REFUSED)
    assert rt.phase() is Phase.FAILED
    assert rt.core.snapshot().current_attempt is None

    effects = rt.fire(Timer.RETRY)
    assert rt.phase() is Phase.RECONNECTING
    assert plain(effects) == [OpenSocket(attempt=2), StartTimer(Timer.CONNECT, CONNECT_MS)]
    current = rt.core.snapshot().current_attempt
    assert current is not None
    assert (current.number, current.phase) == (2, Phase.RECONNECTING)

    rt.fail(REFUSED)
    assert rt.phase() is Phase.FAILED
    attempts = rt.core.snapshot().recent_attempts
    assert [(a.number, a.phase) for a in attempts] == [
        (2, Phase.RECONNECTING),
        (1, Phase.CONNECTING),
    ]


def test_client_goes_to_fallback_after_max_attempts_counting_the_first() -> None:
    rt = client(max_attempts=3)
    rt.connect()
    assert retry_delays(rt.fail(REFUSED)) == [1000.0]
    rt.fire(Timer.RETRY)
    assert retry_delays(rt.fail(HttpFailure(502))) == [2000.0]
    rt.fire(Timer.RETRY)

    effects = rt.fail(HttpFailure(503))

    assert rt.phase() is Phase.FALLBACK
    assert plain(effects) == [
        *RETRY_AFTER_FAILED_ATTEMPT,
        ReturnQueue(),
        StartTimer(Timer.PROBE, PROBE_MS),
    ]
    state = rt.core.snapshot()
    assert state.stats.total_attempts == 3
    assert [a.number for a in state.recent_attempts] == [3, 2, 1]
    # The reason names the last failure, not the first.
    assert state.fallback_reason == "HTTP 503 [server_error] after 3 of 3 attempts"


def test_max_attempts_of_one_means_the_first_failure_is_final() -> None:
    rt = client(max_attempts=1)
    rt.connect()
    rt.fail(REFUSED)
    assert rt.phase() is Phase.FALLBACK
    assert rt.core.fallback_reason is not None
    assert rt.core.fallback_reason.startswith("connection refused")


def test_each_failure_consumes_exactly_one_backoff_step_whatever_its_cause() -> None:
    rt = client(max_attempts=5)
    rt.connect()
    delays: list[float | None] = []
    failures: list[Callable[[], list[Effect]]] = [
        lambda: rt.fail(REFUSED),
        lambda: rt.fire(Timer.CONNECT),
        lambda: rt.first_frame("garbage"),
        lambda: rt.fail(CloseFailure(1011, "boom")),
    ]
    for fail in failures:
        delays += retry_delays(fail())
        rt.fire(Timer.RETRY)
    assert delays == [1000.0, 2000.0, 4000.0, 8000.0]
    assert rt.core.lifecycle.backoff.current_attempt == 4
    assert rt.core.lifecycle.attempts == 5


def test_a_connect_timeout_gives_exactly_one_retry_timer_with_the_next_delay() -> None:
    # Regression: the origin consumed two backoff steps on a timeout.
    rt = client(max_attempts=5)
    rt.connect()
    rt.fail(REFUSED)
    rt.fire(Timer.RETRY)

    effects = rt.fire(Timer.CONNECT)

    assert plain(effects) == [*RETRY_AFTER_FAILED_ATTEMPT, StartTimer(Timer.RETRY, 2000.0)]
    assert rt.core.lifecycle.backoff.current_attempt == 2
    # The abandoned socket reporting its own failure afterwards changes nothing.
    assert rt.apply(rt.core.attempt_failed(2, DROPPED)) == []
    assert rt.core.lifecycle.backoff.current_attempt == 2
    assert rt.phase() is Phase.FAILED


def test_there_is_never_more_than_one_retry_timer_or_attempt_pending() -> None:
    rt = client(max_attempts=5)
    rt.connect()
    for _ in range(3):
        rt.fail(REFUSED)
        assert rt.core.pending_timers == {Timer.RETRY}
        rt.fire(Timer.RETRY)
        assert rt.core.pending_timers == {Timer.CONNECT}
        assert rt.core.live_generation == rt.core.generation


# -- classification ----------------------------------------------------------------------------

NON_RETRYABLE: list[Failure] = [
    CloseFailure(4400, "Unsupported version 2"),
    CloseFailure(4401, "Invalid role 'x'"),
    CloseFailure(1008, "Invalid client_id"),
    HttpFailure(403),
    HttpFailure(404),
]
RETRYABLE: list[Failure] = [
    HttpFailure(503),
    HttpFailure(500),
    HttpFailure(408),
    HttpFailure(429),
    CloseFailure(1006),
    CloseFailure(1011, "heartbeat timeout"),
    CloseFailure(4500, "Server handshake error"),
    CloseFailure(1001, "Server shutting down"),
    ErrorFailure(ErrorKind.DNS, "no such host"),
    ErrorFailure(ErrorKind.NO_CLOSE_FRAME),
]


@pytest.mark.parametrize("failure", NON_RETRYABLE, ids=lambda f: f.describe())
def test_a_non_retryable_failure_goes_straight_to_fallback(failure: Failure) -> None:
    rt = client(max_attempts=8)
    rt.connect()

    effects = rt.fail(failure)

    assert rt.phase() is Phase.FALLBACK
    assert retry_delays(effects) == []
    assert rt.core.snapshot().stats.total_attempts == 1
    assert rt.core.fallback_reason is not None
    assert rt.core.fallback_reason.startswith(failure.describe())
    assert rt.core.fallback_reason.endswith("not retryable]")


@pytest.mark.parametrize("failure", RETRYABLE, ids=lambda f: f.describe())
def test_a_retryable_failure_waits_one_backoff_step_in_failed(failure: Failure) -> None:
    rt = client()
    rt.connect()
    effects = rt.fail(failure)
    assert rt.phase() is Phase.FAILED
    assert retry_delays(effects) == [1000.0]
    assert rt.core.snapshot().recent_attempts[0].retryable is True


@pytest.mark.parametrize("failure", NON_RETRYABLE[:3], ids=lambda f: f.describe())
def test_a_non_retryable_close_of_an_open_connection_goes_to_fallback(
    failure: CloseFailure,
) -> None:
    rt = open_client()
    effects = rt.close(failure)
    assert rt.phase() is Phase.FALLBACK
    assert plain(effects) == [
        CancelTimer(Timer.HEARTBEAT),
        CancelTimer(Timer.STABLE),
        ReturnQueue(),
        StartTimer(Timer.PROBE, PROBE_MS),
    ]


@pytest.mark.parametrize("where", ["open", "degraded"])
def test_a_normal_close_from_the_server_after_open_goes_idle_without_reconnecting(
    where: str,
) -> None:
    rt = client()
    _reach(rt, where)

    effects = rt.close(CloseFailure(1000, "bye"))

    assert rt.phase() is Phase.IDLE
    assert effects == [CancelTimer(Timer.HEARTBEAT), CancelTimer(Timer.STABLE)]
    assert rt.core.pending_timers == frozenset()
    assert rt.core.live_generation is None
    assert rt.core.offer(encode({"type": "chat"})) is Offer.REFUSED_PHASE


def test_a_going_away_close_with_graceful_reconnect_reconnects_at_once() -> None:
    rt = open_client(graceful_jitter_ms=0)  # no window: at once

    effects = rt.close(CloseFailure(1001, "Server shutting down"))

    assert rt.phase() is Phase.RECONNECTING
    assert plain(effects) == [
        CancelTimer(Timer.HEARTBEAT),
        CancelTimer(Timer.STABLE),
        OpenSocket(attempt=2),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    assert Timer.RETRY not in rt.core.pending_timers
    assert rt.core.live_generation == 2
    rt.hello()
    assert rt.phase() is Phase.OPEN


def test_a_reconnect_after_a_stable_connection_is_recorded_in_the_reconnecting_phase() -> None:
    # Regression (fixed in model/client.py): the record's phase came from the attempt number,
    # so attempt 1 of a new outage showed "connecting" while the client was reconnecting.
    rt = open_client(graceful_jitter_ms=0)
    rt.fire(Timer.STABLE)

    effects = rt.close(CloseFailure(1001, "Server shutting down"))

    assert OpenSocket(attempt=1) in effects
    state = rt.core.snapshot()
    assert state.phase is Phase.RECONNECTING
    assert state.current_attempt is not None
    assert (state.current_attempt.number, state.current_attempt.phase) == (
        1,
        Phase.RECONNECTING,
    )


def test_a_going_away_close_without_graceful_reconnect_waits_in_failed() -> None:
    rt = client()
    rt.connect()
    rt.hello(features=[f for f in FEATURES if f != "graceful_reconnect"])

    effects = rt.close(CloseFailure(1001, "Server shutting down"))

    assert rt.phase() is Phase.FAILED
    assert plain(effects) == [
        CancelTimer(Timer.HEARTBEAT),
        CancelTimer(Timer.STABLE),
        StartTimer(Timer.RETRY, 1000.0),
    ]


def test_an_abnormal_close_of_an_open_connection_waits_one_backoff_step() -> None:
    rt = open_client()
    effects = rt.close(DROPPED)
    assert rt.phase() is Phase.FAILED
    assert retry_delays(effects) == [1000.0]
    assert rt.core.snapshot().recent_attempts[0].next_retry_delay_ms == 1000.0
    rt.fire(Timer.RETRY)
    assert rt.phase() is Phase.RECONNECTING


# -- stable connections and the outage -------------------------------------------------------


def test_backoff_resets_only_after_the_stable_timer_fires() -> None:
    rt = client(max_attempts=8)
    rt.connect()
    assert retry_delays(rt.fail(REFUSED)) == [1000.0]
    rt.fire(Timer.RETRY)
    rt.hello()
    # Opening is not enough: the next loss continues the same outage.
    assert retry_delays(rt.close(DROPPED)) == [2000.0]
    rt.fire(Timer.RETRY)
    rt.hello()

    assert rt.fire(Timer.STABLE) == [ResetBackoff()]
    assert rt.phase() is Phase.OPEN
    assert rt.core.lifecycle.attempts == 0

    assert retry_delays(rt.close(DROPPED)) == [1000.0]
    # A new outage: its first retry is attempt 1 again.
    assert plain(rt.fire(Timer.RETRY)) == [
        OpenSocket(attempt=1),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    assert rt.phase() is Phase.RECONNECTING
    # The attempt is recorded in the phase it really runs in.
    current = rt.core.snapshot().current_attempt
    assert current is not None
    assert (current.number, current.phase) == (1, Phase.RECONNECTING)


def test_a_server_that_accepts_then_drops_at_once_exhausts_attempts_and_reaches_fallback() -> None:
    rt = client(max_attempts=3)
    rt.connect()
    delays: list[float | None] = []
    for _ in range(2):
        rt.hello()
        delays += retry_delays(rt.close(DROPPED))
        assert rt.phase() is Phase.FAILED
        rt.fire(Timer.RETRY)
    rt.hello()

    effects = rt.close(DROPPED)

    assert delays == [1000.0, 2000.0]
    assert rt.phase() is Phase.FALLBACK
    assert ReturnQueue() in effects
    assert rt.core.snapshot().stats.successful_connections == 3
    assert rt.core.fallback_reason == ("close 1006 [abnormal] after 3 of 3 attempts")


# -- heartbeat watchdog and degraded -----------------------------------------------------------


def heartbeat_client(**config: Any) -> Driver:
    rt = client(**config)
    rt.connect()
    rt.hello(heartbeat_interval_ms=SHORT_HEARTBEAT_MS)
    assert rt.core.timer_due(Timer.HEARTBEAT) == 3.0
    return rt


def test_silence_for_1_2_heartbeat_intervals_degrades_and_sends_a_ping() -> None:
    rt = heartbeat_client()

    effects = rt.fire(Timer.HEARTBEAT)

    assert rt.clock.monotonic() == 3.0
    assert rt.phase() is Phase.DEGRADED
    assert plain(effects) == [SendPing(), StartTimer(Timer.HEARTBEAT, 2000.0, heartbeats=0.8)]
    assert rt.core.snapshot().stats.heartbeats_sent == 1
    # Degraded still sends: the connection may be fine.
    assert rt.core.offer(encode({"type": "chat"})) is Offer.SEND
    assert json.loads(rt.core.ping_text())["type"] == "ping"


def test_any_traffic_in_degraded_returns_to_open() -> None:
    rt = heartbeat_client()
    rt.fire(Timer.HEARTBEAT)
    rt.clock.advance(0.5)

    received = rt.receive(json.dumps({"type": "pong", "timestamp": "2025-08-15T10:00:03.500Z"}))

    assert rt.phase() is Phase.OPEN
    assert received.message is None
    assert received.reply is None
    assert plain(received.effects) == [
        CancelTimer(Timer.HEARTBEAT),
        StartTimer(Timer.HEARTBEAT, 3000.0, heartbeats=1.2),
    ]
    assert rt.core.snapshot().stats.heartbeats_received == 1


def test_even_an_unparseable_frame_ends_degraded() -> None:
    rt = heartbeat_client()
    rt.fire(Timer.HEARTBEAT)
    received = rt.receive("{not json")
    assert received.message is None
    assert rt.phase() is Phase.OPEN


def test_a_binary_frame_is_traffic_too_and_ends_degraded() -> None:
    rt = heartbeat_client()
    rt.fire(Timer.HEARTBEAT)
    before = rt.core.messages_received
    rt.apply(rt.core.received_binary(3))
    assert rt.phase() is Phase.OPEN
    assert rt.core.messages_received == before + 1
    assert "binary" not in rt.core.snapshot().stats.message_counts_by_type


def test_two_heartbeat_intervals_of_silence_mean_a_dead_peer_and_a_reconnect() -> None:
    rt = heartbeat_client()
    rt.fire(Timer.HEARTBEAT)

    effects = rt.fire(Timer.HEARTBEAT)

    assert rt.clock.monotonic() == 5.0
    assert rt.phase() is Phase.RECONNECTING
    assert plain(effects) == [
        CancelTimer(Timer.HEARTBEAT),
        CancelTimer(Timer.STABLE),
        HEARTBEAT_TIMEOUT,
        OpenSocket(attempt=2),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    assert rt.core.last_failure == ErrorFailure(
        ErrorKind.HEARTBEAT_TIMEOUT, "nothing received for 5000 ms"
    )
    assert rt.core.live_generation == 2
    assert rt.core.snapshot().stats.current_uptime_ms == 0.0


def test_a_dead_peer_with_no_attempts_left_goes_to_fallback() -> None:
    rt = heartbeat_client(max_attempts=1)
    rt.fire(Timer.HEARTBEAT)
    effects = rt.fire(Timer.HEARTBEAT)
    assert rt.phase() is Phase.FALLBACK
    assert HEARTBEAT_TIMEOUT in effects
    assert rt.core.fallback_reason is not None
    assert rt.core.fallback_reason.startswith("heartbeat timeout: nothing received for 5000 ms")


def test_traffic_before_the_deadline_rearms_the_watchdog_instead_of_degrading() -> None:
    rt = heartbeat_client()
    rt.clock.advance(1.0)
    rt.receive(json.dumps({"type": "chat", "text": "hi"}))

    effects = rt.fire(Timer.HEARTBEAT)

    assert rt.phase() is Phase.OPEN
    assert plain(effects) == [StartTimer(Timer.HEARTBEAT, 1000.0)]
    assert rt.core.timer_due(Timer.HEARTBEAT) == 4.0
    # Still silent at the re-armed deadline: now it degrades.
    rt.fire(Timer.HEARTBEAT)
    assert rt.phase() is Phase.DEGRADED


def test_heartbeat_disabled_arms_no_watchdog() -> None:
    rt = client(enable_heartbeat=False)
    rt.connect()
    effects = rt.hello()
    assert plain(effects) == [
        CancelTimer(Timer.CONNECT),
        StartTimer(Timer.STABLE, STABLE_MS),
        FlushQueue(),
    ]
    assert rt.core.pending_timers == {Timer.STABLE}


# -- fallback and its exits -------------------------------------------------------------------


@pytest.mark.parametrize("exit_call", ["connect", "force_reconnect"])
def test_connect_or_force_reconnect_leave_fallback_with_a_fresh_backoff(exit_call: str) -> None:
    rt = client(max_attempts=3)
    rt.connect()
    for _ in range(2):
        rt.fail(REFUSED)
        rt.fire(Timer.RETRY)
    rt.fail(REFUSED)
    assert rt.phase() is Phase.FALLBACK

    effects = rt.connect() if exit_call == "connect" else rt.force_reconnect()

    assert rt.phase() is Phase.CONNECTING
    assert plain(effects) == [
        *ALL_TIMERS_CANCELLED,
        CLIENT_RECONNECT,
        ResetBackoff(),
        OpenSocket(attempt=1),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    state = rt.core.snapshot()
    assert not state.is_fallback_mode
    assert state.fallback_reason is None
    # The backoff starts again from its first step, and the attempts from one.
    assert retry_delays(rt.fail(REFUSED)) == [1000.0]


def test_the_probe_timer_makes_one_probe_attempt_that_stays_in_fallback() -> None:
    rt = client()
    to_fallback(rt)
    reason = rt.core.fallback_reason
    assert rt.core.timer_due(Timer.PROBE) == PROBE_MS / 1000.0

    effects = rt.fire(Timer.PROBE)

    assert rt.phase() is Phase.FALLBACK
    assert plain(effects) == [
        OpenSocket(probe=True, attempt=1),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    state = rt.core.snapshot()
    assert state.is_fallback_mode
    assert state.fallback_reason == reason
    assert state.current_attempt is not None
    assert state.current_attempt.phase is Phase.FALLBACK
    assert rt.core.offer(encode({"type": "chat"})) is Offer.REFUSED_PHASE
    # Probes are not counted against max_attempts.
    assert rt.core.lifecycle.attempts == 1
    assert state.stats.total_attempts == 2


def test_a_successful_probe_opens_and_clears_fallback_mode() -> None:
    rt = client()
    to_fallback(rt)
    rt.fire(Timer.PROBE)

    effects = rt.hello()

    assert rt.phase() is Phase.OPEN
    assert plain(effects) == OPEN_EFFECTS
    state = rt.core.snapshot()
    assert not state.is_fallback_mode
    assert state.fallback_reason is None
    assert rt.core.offer(encode({"type": "chat"})) is Offer.SEND


@pytest.mark.parametrize("how", ["failure", "connect timeout"])
def test_a_failed_probe_rearms_the_probe_timer(how: str) -> None:
    rt = client()
    to_fallback(rt)
    rt.fire(Timer.PROBE)

    effects = rt.fail(REFUSED) if how == "failure" else rt.fire(Timer.CONNECT)

    assert rt.phase() is Phase.FALLBACK
    assert plain(effects) == [*RETRY_AFTER_FAILED_ATTEMPT, StartTimer(Timer.PROBE, PROBE_MS)]
    assert rt.core.pending_timers == {Timer.PROBE}
    assert rt.core.snapshot().is_fallback_mode


def test_probing_disabled_arms_no_probe_timer() -> None:
    rt = client(fallback_probe_interval_ms=None)
    rt.connect()
    effects = rt.fail(REJECTED)
    assert rt.phase() is Phase.FALLBACK
    assert not any(isinstance(e, StartTimer) for e in effects)
    assert rt.core.pending_timers == frozenset()
    # The application can still get out.
    rt.connect()
    assert rt.phase() is Phase.CONNECTING


# -- disconnect and late events ---------------------------------------------------------------


@pytest.mark.parametrize("where", list(PLACES))
def test_disconnect_from_every_phase_goes_idle_with_no_timers_pending(where: str) -> None:
    rt = client()
    _reach(rt, where)

    effects = rt.disconnect()

    assert rt.phase() is Phase.IDLE
    assert rt.core.pending_timers == frozenset()
    assert rt.timers == {}
    assert rt.core.live_generation is None
    if where == "idle":
        assert effects == []
    else:
        assert effects == [*ALL_TIMERS_CANCELLED, CLIENT_DISCONNECT, ReturnQueue()]
    state = rt.core.snapshot()
    assert not state.is_fallback_mode
    assert state.fallback_reason is None
    assert state.current_attempt is None
    assert state.stats.current_uptime_ms == 0.0


@pytest.mark.parametrize("where", sorted(WITH_SOCKET))
def test_late_events_after_disconnect_are_ignored(where: str) -> None:
    rt = client()
    _reach(rt, where)
    generation = rt.core.generation
    tokens = {timer: token for timer, (token, _) in rt.timers.items()}
    assert tokens
    rt.disconnect()
    core = rt.core

    late: list[Callable[[], list[Effect]]] = [
        lambda: core.hello_received(generation, hello_text()),
        lambda: core.attempt_failed(generation, DROPPED),
        lambda: core.closed(generation, CloseFailure(1000, "Client disconnect")),
        lambda: core.closed(generation, DROPPED),
        *[lambda t=timer, k=token: core.timer_fired(t, k) for timer, token in tokens.items()],
    ]
    for event in late:
        assert event() == []
        assert rt.phase() is Phase.IDLE
        assert core.pending_timers == frozenset()
    assert core.snapshot().stats.successful_connections == (where in ("open", "degraded"))


def test_late_events_from_before_a_disconnect_do_not_touch_the_next_connection() -> None:
    rt = client()
    rt.connect()
    old_generation, old_connect = rt.core.generation, rt.token(Timer.CONNECT)
    rt.disconnect()
    rt.connect()
    assert rt.core.generation == old_generation + 1

    assert rt.core.hello_received(old_generation, hello_text()) == []
    assert rt.core.attempt_failed(old_generation, REFUSED) == []
    assert rt.core.timer_fired(Timer.CONNECT, old_connect) == []

    assert rt.phase() is Phase.CONNECTING
    assert rt.core.live_generation == rt.core.generation
    rt.hello()
    assert rt.phase() is Phase.OPEN


def test_the_old_socket_late_close_does_not_touch_the_new_connection_after_force_reconnect() -> (
    None
):
    # Regression: in the origin the old socket's close handler ran after the new attempt had
    # started, and the client ended idle with a dead socket.
    rt = open_client()
    old = rt.core.generation

    effects = rt.force_reconnect()

    assert rt.phase() is Phase.CONNECTING
    assert plain(effects) == [
        *ALL_TIMERS_CANCELLED,
        CLIENT_RECONNECT,
        ResetBackoff(),
        OpenSocket(attempt=1),
        StartTimer(Timer.CONNECT, CONNECT_MS),
    ]
    new = rt.core.generation
    assert new == old + 1
    assert rt.core.closed(old, CloseFailure(1000, "Client reconnect")) == []
    assert rt.phase() is Phase.CONNECTING
    assert rt.core.live_generation == new

    rt.clock.advance(0.5)
    rt.hello()
    rt.clock.advance(2.0)
    assert rt.core.closed(old, DROPPED) == []
    assert rt.phase() is Phase.OPEN
    assert rt.core.live_generation == new
    assert rt.core.snapshot().stats.current_uptime_ms == 2000.0


def test_force_reconnect_while_an_attempt_is_in_flight_records_it_as_aborted() -> None:
    rt = client()
    rt.connect()
    rt.force_reconnect()
    attempts = rt.core.snapshot().recent_attempts
    assert attempts[0].outcome == AttemptOutcome.ABORTED
    assert attempts[0].detail == "force_reconnect by the application"
    assert rt.core.attempt_failed(1, DROPPED) == []
    assert rt.phase() is Phase.CONNECTING


@pytest.mark.parametrize("where", ["connecting", "open", "degraded", "reconnecting"])
def test_connect_while_connecting_or_connected_does_nothing(where: str) -> None:
    rt = client()
    _reach(rt, where)
    generation = rt.core.generation
    assert rt.connect() == []
    assert rt.phase() is PLACES[where]
    assert rt.core.generation == generation


# -- the send queue ---------------------------------------------------------------------------

OFFERS = {
    "idle": Offer.REFUSED_PHASE,
    "connecting": Offer.QUEUED,
    "open": Offer.SEND,
    "degraded": Offer.SEND,
    "reconnecting": Offer.QUEUED,
    "failed": Offer.QUEUED,
    "fallback": Offer.REFUSED_PHASE,
    "probing": Offer.REFUSED_PHASE,
}


@pytest.mark.parametrize(("where", "expected"), OFFERS.items())
def test_offer_sends_queues_or_refuses_by_phase(where: str, expected: Offer) -> None:
    rt = client()
    _reach(rt, where)
    message = {"type": "chat", "n": 1}
    assert rt.core.offer(encode(message)) is expected
    assert list(rt.core.queue) == ([encode(message)] if expected is Offer.QUEUED else [])


def test_the_queue_refuses_when_full() -> None:
    rt = client(send_queue_limit=2)
    rt.connect()
    assert [rt.core.offer(encode({"n": n})) for n in range(3)] == [
        Offer.QUEUED,
        Offer.QUEUED,
        Offer.REFUSED_FULL,
    ]
    assert list(rt.core.queue) == [encode({"n": 0}), encode({"n": 1})]


def test_a_zero_queue_limit_refuses_everything_while_not_open() -> None:
    rt = client(send_queue_limit=0)
    rt.connect()
    assert rt.core.offer(encode({"n": 0})) is Offer.REFUSED_FULL


def test_prepare_adds_a_timestamp_only_when_missing_without_touching_the_message() -> None:
    rt = client()
    rt.clock.advance(1.5)
    original = {"type": "chat"}
    text = rt.core.prepare(original)
    assert json.loads(text) == {"type": "chat", "timestamp": "2025-08-15T10:00:01.500Z"}
    assert original == {"type": "chat"}
    kept = {"type": "chat", "timestamp": "mine"}
    assert rt.core.prepare(kept) == '{"type":"chat","timestamp":"mine"}'


@pytest.mark.parametrize("bad", [["type", "chat"], "chat", None, 42])
def test_prepare_rejects_a_non_mapping_with_a_type_error(bad: Any) -> None:
    rt = client()
    with pytest.raises(TypeError, match="a message must be a mapping, got"):
        rt.core.prepare(bad)


def _cycle() -> dict[str, Any]:
    looped: dict[str, Any] = {"type": "loop"}
    looped["self"] = looped
    return looped


@pytest.mark.parametrize(
    ("message", "error", "names"),
    [
        ({"type": "t", "at": datetime(2025, 1, 1)}, TypeError, "datetime"),
        ({"type": "t", "f": print}, TypeError, "builtin_function_or_method"),
        ({"type": "t", "x": float("nan")}, ValueError, "Out of range float"),
        ({"type": "t", "x": float("inf")}, ValueError, "Out of range float"),
        (_cycle(), ValueError, "Circular reference"),
        ({"type": "t", ("a", "b"): 1}, TypeError, "keys must be str"),
    ],
)
def test_prepare_names_what_cannot_be_encoded(
    message: dict[str, Any], error: type[Exception], names: str
) -> None:
    rt = client()
    with pytest.raises(error, match="message cannot be encoded as JSON") as raised:
        rt.core.prepare(message)
    assert names in str(raised.value)


def test_prepare_refuses_a_message_over_max_message_bytes() -> None:
    rt = client(max_message_bytes=100)
    body = "x" * 40
    text = rt.core.prepare({"type": "t", "timestamp": "t", "body": body})
    assert len(text) <= 100
    with pytest.raises(ValueError, match=r"over max_message_bytes \(100\)"):
        rt.core.prepare({"type": "t", "timestamp": "t", "body": body * 3})
    # Non-ASCII is escaped (ensure_ascii), so the text's length is the size on the wire.
    assert rt.core.prepare({"type": "t", "timestamp": "t", "b": "é"}).isascii()


def test_max_message_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_message_bytes must be >= 1"):
        client(max_message_bytes=0)


def test_take_queue_and_requeue_keep_the_order() -> None:
    rt = client(send_queue_limit=4)
    rt.connect()
    for n in (3, 4):
        rt.core.offer(encode({"n": n}))
    # Messages that were in flight go back in front of the queued ones, in their order.
    assert rt.core.requeue([encode({"n": 1}), encode({"n": 2})]) == []
    assert [json.loads(m)["n"] for m in rt.core.queue] == [1, 2, 3, 4]
    assert rt.core.requeue([encode({"n": 0})]) == [encode({"n": 0})]
    assert [json.loads(m)["n"] for m in rt.core.take_queue()] == [1, 2, 3, 4]
    assert rt.core.take_queue() == []


def test_requeue_hands_back_what_does_not_fit() -> None:
    rt = client(send_queue_limit=3)
    rt.connect()
    rt.core.offer(encode({"n": 9}))
    assert rt.core.requeue([encode({"n": n}) for n in (1, 2, 3)]) == [encode({"n": 3})]
    assert [json.loads(m)["n"] for m in rt.core.queue] == [1, 2, 9]


@pytest.mark.parametrize("where", ["idle", "open", "fallback"])
def test_requeue_outside_the_queueing_phases_hands_everything_back(where: str) -> None:
    rt = client()
    _reach(rt, where)
    messages = [encode({"n": 1}), encode({"n": 2})]
    assert rt.core.requeue(messages) == messages
    assert list(rt.core.queue) == []


def test_queued_messages_are_flushed_in_order_on_open() -> None:
    rt = client()
    rt.connect()
    rt.fail(REFUSED)
    for n in range(3):
        rt.core.offer(encode({"n": n}))
    rt.fire(Timer.RETRY)
    effects = rt.hello()
    assert FlushQueue() in effects
    assert rt.flushed == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert list(rt.core.queue) == []


@pytest.mark.parametrize("where", ["connecting", "failed", "reconnecting"])
def test_queued_messages_are_handed_back_on_disconnect(where: str) -> None:
    rt = client()
    _reach(rt, where)
    rt.core.offer(encode({"n": 1}))
    rt.core.offer(encode({"n": 2}))
    assert ReturnQueue() in rt.disconnect()
    assert rt.returned == [{"n": 1}, {"n": 2}]


def test_queued_messages_are_handed_back_on_entering_fallback() -> None:
    rt = client(max_attempts=2)
    rt.connect()
    rt.core.offer(encode({"n": 1}))
    rt.fail(REFUSED)
    rt.core.offer(encode({"n": 2}))
    rt.fire(Timer.RETRY)
    effects = rt.fail(REFUSED)
    assert rt.phase() is Phase.FALLBACK
    assert ReturnQueue() in effects
    assert rt.returned == [{"n": 1}, {"n": 2}]


def test_force_reconnect_keeps_the_queue_for_the_next_connection() -> None:
    rt = client()
    rt.connect()
    rt.core.offer(encode({"n": 1}))
    assert ReturnQueue() not in rt.force_reconnect()
    rt.hello()
    assert rt.flushed == [{"n": 1}]


# -- statistics -------------------------------------------------------------------------------


def test_current_uptime_is_computed_when_the_state_is_read() -> None:
    # Regression: the origin returned a stale 0.
    rt = open_client()
    assert rt.core.snapshot().stats.current_uptime_ms == 0.0
    rt.clock.advance(2.5)
    assert rt.core.snapshot().stats.current_uptime_ms == 2500.0
    rt.clock.advance(1.5)
    state = rt.core.snapshot()
    assert state.stats.current_uptime_ms == 4000.0
    assert state.stats.connection_start == T0
    rt.close(DROPPED)
    stats = rt.core.snapshot().stats
    assert stats.current_uptime_ms == 0.0
    assert stats.connection_start is None


def test_messages_received_counts_every_frame_and_counts_by_type_only_parsed_ones() -> None:
    rt = open_client()
    frames = [
        '{"type": "chat", "text": "a"}',
        "not json",
        '{"type": "chat", "text": "b"}',
        "[1]",
        '{"no_type": true}',
        '{"type": "news"}',
    ]
    received = [rt.receive(text) for text in frames]
    assert [r.message for r in received] == [
        {"type": "chat", "text": "a"},
        None,
        {"type": "chat", "text": "b"},
        None,
        None,
        {"type": "news"},
    ]
    stats = rt.core.snapshot().stats
    assert stats.messages_received == 1 + len(frames)
    assert dict(stats.message_counts_by_type) == {"hello": 1, "chat": 2, "news": 1}


def test_a_parsed_first_frame_that_is_not_a_hello_is_counted_by_type() -> None:
    rt = client()
    rt.connect()
    rt.first_frame('{"type": "echo"}')
    stats = rt.core.snapshot().stats
    assert stats.messages_received == 1
    assert dict(stats.message_counts_by_type) == {"echo": 1}


def test_a_server_ping_gets_a_pong_reply_and_counts_both_heartbeats() -> None:
    rt = open_client()
    rt.clock.advance(2.0)
    ping = {
        "type": "ping",
        "timestamp": "2025-08-15T10:00:02.000Z",
        "heartbeat_count": 0,
        "client_id": CLIENT_ID,
    }

    received = rt.receive(json.dumps(ping))

    assert received.message is None
    assert received.effects == []
    assert received.reply is not None
    assert json.loads(received.reply) == {
        "type": "pong",
        "timestamp": "2025-08-15T10:00:02.000Z",
        "client_id": CLIENT_ID,
    }
    stats = rt.core.snapshot().stats
    assert (stats.heartbeats_received, stats.heartbeats_sent) == (1, 1)
    assert stats.message_counts_by_type["ping"] == 1
    assert stats.last_activity == T0 + timedelta(seconds=2)


def test_recent_attempts_keep_the_newest_ten_newest_first() -> None:
    rt = client(max_attempts=20)
    rt.connect()
    failures: list[Failure] = [REFUSED, HttpFailure(503), CloseFailure(4500, "x"), DROPPED]
    for n in range(12):
        rt.clock.advance(0.125)
        rt.fail(failures[n % len(failures)])
        rt.fire(Timer.RETRY)

    attempts = rt.core.snapshot().recent_attempts

    assert len(attempts) == 10
    assert [a.number for a in attempts] == list(range(12, 2, -1))
    newest = attempts[0]
    assert newest.phase is Phase.RECONNECTING
    assert newest.outcome == AttemptOutcome.FAILED
    assert (newest.failure_kind, newest.retryable, newest.close_code) == ("abnormal", True, 1006)
    assert newest.duration_ms == 125.0
    assert newest.next_retry_delay_ms == 12000.0
    assert newest.ended_at is not None
    assert newest.next_retry_at == newest.ended_at + timedelta(seconds=12)
    second = attempts[1]
    assert (second.failure_kind, second.close_code, second.detail) == (
        "server_error",
        4500,
        "close 4500 (x)",
    )
    assert [a.next_retry_delay_ms for a in attempts][-3:] == [12000.0, 8000.0, 4000.0]
    assert rt.core.snapshot().stats.total_attempts == 13


@pytest.mark.parametrize("where", list(PLACES))
def test_the_snapshot_serialises_to_json_in_every_phase(where: str) -> None:
    rt = client()
    _reach(rt, where)
    rt.clock.advance(0.5)
    data = json.loads(rt.core.snapshot().to_json())
    assert data["phase"] == str(PLACES[where])
    assert data["client_id"] == CLIENT_ID
    assert data["url"] == rt.core.url
    assert data["is_fallback_mode"] == (PLACES[where] is Phase.FALLBACK)
    assert (data["current_attempt"] is not None) == (
        where in ("connecting", "reconnecting", "probing")
    )
    # Degraded was reached by letting the 30 s watchdog fire.
    uptime = {"open": 500.0, "degraded": 30_500.0}.get(where, 0.0)
    assert data["stats"]["current_uptime_ms"] == uptime


def test_the_client_logs_its_transitions_as_ws_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="steadysocket")
    rt = client()
    rt.connect()
    rt.hello()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("steadysocket")]
    assert "[WS] transition from idle to connecting" in lines
    assert "[WS] transition from connecting to open" in lines


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"base_url": "http://localhost:8000"}, "must start with ws:// or wss://"),
        ({"base_url": "localhost:8000"}, "must start with ws:// or wss://"),
        ({"base_url": "ws://"}, "has no host"),
        ({"base_url": "ws://h:99999"}, "invalid port"),
        ({"client_id": ""}, "client_id must be a non-empty string"),
        ({"send_queue_limit": -1}, "send_queue_limit must be >= 0, got -1"),
    ],
)
def test_client_config_rejects_bad_values_with_a_clear_message(
    overrides: dict[str, Any], message: str
) -> None:
    settings: dict[str, Any] = {"base_url": BASE_URL, "client_id": CLIENT_ID, **overrides}
    with pytest.raises(ValueError, match=message):
        ClientConfig(**settings)


def test_client_config_url_keeps_the_base_path() -> None:
    config = ClientConfig(base_url="wss://example.com/api/", client_id=CLIENT_ID, role="admin")
    assert config.url == "wss://example.com/api/ws/client?client_id=client-1&version=1&role=admin"
    plain_config = ClientConfig(base_url="ws://h", client_id="c")
    assert plain_config.url == "ws://h/ws/client?client_id=c&version=1&role=frontend"
    assert ClientCore(config, FakeClock()).url == config.url


def test_client_core_rejects_a_non_positive_connection_timeout() -> None:
    config = ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID, connection_timeout_ms=0)
    with pytest.raises(ValueError, match="connection_timeout_ms must be > 0"):
        ClientCore(config, FakeClock())


# -- timer bookkeeping and the fallback reason (mutation survivors) ---------------------------


@pytest.mark.parametrize("timer", [Timer.CONNECT, Timer.RETRY, Timer.PROBE, Timer.STABLE])
def test_a_timer_that_fired_is_no_longer_pending_or_due(timer: Timer) -> None:
    """Timer bookkeeping after a timer fires: no stale due time is left behind."""
    rt = client()
    if timer is Timer.RETRY:
        rt.connect()
        rt.fail(REFUSED)
    elif timer is Timer.PROBE:
        to_fallback(rt)
    elif timer is Timer.STABLE:
        rt.connect()
        rt.hello()
    else:
        rt.connect()
    assert rt.core.timer_due(timer) is not None

    rt.fire(timer)

    assert timer not in rt.core.pending_timers
    assert rt.core.timer_due(timer) is None


def test_a_rearmed_watchdog_is_due_at_its_new_time_only() -> None:
    rt = heartbeat_client()
    rt.clock.advance(2.0)
    rt.receive(json.dumps({"type": "chat"}))
    rt.fire(Timer.HEARTBEAT)
    assert rt.core.timer_due(Timer.HEARTBEAT) == 5.0


def test_a_watchdog_firing_early_in_degraded_rearms_for_the_rest_of_the_silence() -> None:
    """A timer the runtime fired before its deadline (a coarse clock) is not a dead peer."""
    rt = heartbeat_client()
    rt.fire(Timer.HEARTBEAT)
    assert rt.phase() is Phase.DEGRADED
    token, _ = rt.timers.pop(Timer.HEARTBEAT)
    rt.clock.advance(1.5)

    effects = rt.apply(rt.core.timer_fired(Timer.HEARTBEAT, token))

    assert rt.phase() is Phase.DEGRADED
    assert plain(effects) == [StartTimer(Timer.HEARTBEAT, 500.0)]
    assert rt.core.timer_due(Timer.HEARTBEAT) == 5.0


@pytest.mark.parametrize("how", ["refused", "connect timeout", "rejected"])
def test_failed_probes_keep_the_reason_fallback_was_entered_with(how: str) -> None:
    """The fallback reason names what ended the outage, not the latest probe's failure."""
    rt = client()
    to_fallback(rt)
    reason = rt.core.fallback_reason
    assert reason is not None
    assert "4401" in reason

    for _ in range(2):
        rt.fire(Timer.PROBE)
        if how == "connect timeout":
            rt.fire(Timer.CONNECT)
        else:
            rt.fail(REFUSED if how == "refused" else CloseFailure(1008, "Invalid client_id"))
        assert rt.phase() is Phase.FALLBACK
        assert rt.core.fallback_reason == reason
        assert rt.core.snapshot().fallback_reason == reason


def test_prepare_refuses_a_message_nested_too_deeply_to_encode() -> None:
    rt = client()
    message: dict[str, Any] = {"type": "deep"}
    inner = message
    for _ in range(100_000):
        inner["v"] = {}
        inner = inner["v"]
    with pytest.raises(ValueError, match="nested too deeply"):
        rt.core.prepare(message)


# -- behaviour the mutation run showed untested ------------------------------------------------


def test_the_client_config_defaults_are_the_documented_ones() -> None:
    config = ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID)
    assert config.connection_timeout_ms == 10_000
    assert config.enable_heartbeat is True
    assert config.fallback_probe_interval_ms == 60_000
    assert config.stable_after_ms == 5_000
    assert config.send_queue_limit == 1000


def test_a_fresh_core_reports_zero_everywhere() -> None:
    stats = client().core.snapshot().stats
    assert (stats.total_attempts, stats.successful_connections) == (0, 0)
    assert (stats.messages_received, stats.messages_sent) == (0, 0)
    assert (stats.heartbeats_received, stats.heartbeats_sent) == (0, 0)


def test_max_message_bytes_of_one_is_valid_and_a_message_of_exactly_the_limit_fits() -> None:
    assert ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID, max_message_bytes=1)
    text = '{"type":"chat","timestamp":"mine"}'
    rt = client(max_message_bytes=len(text))
    assert rt.core.prepare({"type": "chat", "timestamp": "mine"}) == text
    with pytest.raises(ValueError, match="over max_message_bytes"):
        client(max_message_bytes=len(text) - 1).core.prepare({"type": "chat", "timestamp": "mine"})


def test_a_second_hello_on_an_open_connection_reaches_no_listener() -> None:
    rt = open_client()
    received = rt.receive(hello_text())
    assert received.message is None
    assert received.reply is None


def test_a_first_frame_of_another_type_fails_naming_what_came_instead() -> None:
    rt = client()
    rt.connect()
    rt.first_frame(json.dumps({"type": "chat", "text": "hi"}))
    assert rt.core.last_failure == ErrorFailure(
        ErrorKind.INVALID_HELLO, "expected a hello first, got type 'chat'"
    )


def test_the_first_attempt_is_recorded_as_attempt_one() -> None:
    rt = client()
    rt.connect()
    current = rt.core.snapshot().current_attempt
    assert current is not None
    assert current.number == 1


def test_a_cancelled_timer_is_no_longer_due() -> None:
    rt = client()
    rt.connect()
    assert rt.core.timer_due(Timer.CONNECT) == CONNECT_MS / 1000.0
    rt.hello()
    assert rt.core.timer_due(Timer.CONNECT) is None


def test_a_zero_stable_period_is_due_at_once() -> None:
    rt = client(stable_after_ms=0)
    rt.connect()
    rt.clock.advance(0.25)
    rt.hello()
    assert rt.core.timer_due(Timer.STABLE) == 0.25


def test_a_watchdog_rearm_is_never_shorter_than_one_millisecond() -> None:
    rt = heartbeat_client()
    rt.fire(Timer.HEARTBEAT)
    token, due = rt.timers.pop(Timer.HEARTBEAT)
    rt.clock.seconds = due - 0.00025  # a quarter of a millisecond early

    effects = rt.apply(rt.core.timer_fired(Timer.HEARTBEAT, token))

    assert plain(effects) == [StartTimer(Timer.HEARTBEAT, 1.0)]


def test_disconnect_from_open_forgets_when_the_connection_started() -> None:
    rt = open_client()
    assert rt.core.snapshot().stats.connection_start is not None
    rt.disconnect()
    assert rt.core.snapshot().stats.connection_start is None


def test_last_activity_is_the_wall_time_of_the_last_frame() -> None:
    rt = open_client()
    rt.clock.advance(2.0)
    rt.receive(json.dumps({"type": "chat"}))
    rt.clock.advance(3.0)
    assert rt.core.snapshot().stats.last_activity == T0 + timedelta(seconds=2)


def test_a_probe_after_a_stable_connection_is_recorded_as_attempt_one() -> None:
    """The outage's counter was reset by the stable period, so the probe carries attempt 0."""
    rt = open_client()
    rt.fire(Timer.STABLE)
    rt.close(REJECTED)
    assert rt.phase() is Phase.FALLBACK
    assert rt.core.lifecycle.attempts == 0
    rt.fire(Timer.PROBE)
    current = rt.core.snapshot().current_attempt
    assert current is not None
    assert current.number == 1


def test_configuration_and_received_frames_are_frozen_values() -> None:
    from dataclasses import FrozenInstanceError

    config = ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID)
    received = Received(None, None, [])
    for value, field in ((config, "client_id"), (received, "reply")):
        # A frozen slots dataclass raises FrozenInstanceError, or TypeError on Python 3.11.
        with pytest.raises((FrozenInstanceError, TypeError)):
            setattr(value, field, "changed")
    assert hash(config) == hash(ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID))


def test_the_timestamp_is_formatted_once_per_millisecond_and_moves_with_the_clock() -> None:
    rt = client()
    assert rt.core.timestamp() == "2025-08-15T10:00:00.000Z"
    rt.clock.advance(0.0004)
    assert rt.core.timestamp() == "2025-08-15T10:00:00.000Z"  # the same millisecond
    rt.clock.advance(0.0007)
    assert rt.core.timestamp() == "2025-08-15T10:00:00.001Z"


# -- protocol v2: the client's side of a session ---------------------------------------------------


def v2_hello(session_id: str = "S1", **session: Any) -> str:
    fields: dict[str, Any] = {
        "accepted_version": 2,
        "session_id": session_id,
        "epoch": "E1",
        "resumed": False,
        "max_message_bytes": 1_048_576,
        "resume_outcome": "new",
        **session,
    }
    return hello_text(**fields)


def v2_client(**config: Any) -> Driver:
    rt = client(version=2, **config)
    rt.connect()
    rt.first_frame(v2_hello())
    assert rt.phase() is Phase.OPEN
    return rt


def query(rt: Driver) -> dict[str, list[str]]:
    return parse_qs(urlsplit(rt.core.url).query)


def write(rt: Driver, text: str) -> ClientDelivery:
    """Accept ``text`` on an open v2 client and write it (the outbox's pending entries)."""
    delivery = rt.core.delivery
    assert delivery is not None
    assert rt.core.offer(text) is Offer.SEND
    list(delivery.to_write())
    return delivery


def test_version_must_be_one_or_two() -> None:
    with pytest.raises(ValueError, match="version must be 1 or 2, got 3"):
        client(version=3)


def test_a_v2_client_asks_for_v2_and_resumes_with_its_session_and_offset() -> None:
    rt = client(version=2)
    assert query(rt)["version"] == ["2"]
    assert "session_id" not in query(rt)
    rt.connect()
    rt.first_frame(v2_hello())
    rt.core.received_v2(json.dumps({"offset": 1, "type": "chat"}))
    rt.close(DROPPED)
    assert {k: query(rt)[k] for k in ("session_id", "epoch", "offset")} == {
        "session_id": ["S1"],
        "epoch": ["E1"],
        "offset": ["1"],
    }
    state = rt.core.snapshot()
    assert state.protocol_version == 2
    assert state.delivery is not None
    assert (state.delivery.session_id, state.delivery.last_offset) == ("S1", 1)
    assert state.delivery.last_resume_outcome == "new"


def test_a_v2_client_keeps_every_accepted_message_until_it_is_acknowledged() -> None:
    rt = client(version=2, send_queue_limit=2)
    assert rt.core.offer('{"type":"a"}') is Offer.REFUSED_PHASE  # idle: nothing accepted
    rt.connect()
    assert rt.core.offer('{"type":"a"}') is Offer.QUEUED
    rt.first_frame(v2_hello())
    assert rt.core.offer('{"type":"b"}') is Offer.SEND
    assert rt.core.offer('{"type":"c"}') is Offer.REFUSED_FULL
    delivery = rt.core.delivery
    assert delivery is not None
    assert [json.loads(p.text) for p in delivery.to_write()] == [
        {"id": 1, "type": "a"},
        {"id": 2, "type": "b"},
    ]
    received = rt.core.received_v2('{"type":"ack","id":1,"timestamp":"t"}')
    assert (received.message, received.acked, received.violation) == (None, 1, None)
    assert [p.id for p in delivery.outbox] == [2]
    state = rt.core.snapshot().delivery
    assert state is not None
    assert state.unacknowledged == 1


def test_a_v2_message_may_not_carry_the_fields_v2_numbers_with() -> None:
    rt = v2_client()
    with pytest.raises(ValueError, match="remove the field"):
        rt.core.prepare({"type": "t", "id": 4})
    # v1 does not number messages: there the field is the application's.
    assert json.loads(open_client().core.prepare({"type": "t", "id": 4}))["id"] == 4


def test_v2_offsets_are_delivered_in_order_once_and_acknowledged_in_batches() -> None:
    rt = v2_client(delivery=DeliveryConfig(ack_every=2, ack_interval_ms=40))
    first = rt.core.received_v2('{"offset":1,"type":"chat","n":1}')
    assert (first.message, first.reply) == ({"type": "chat", "n": 1}, None)
    assert rt.core.ack_timer_wanted() == 40
    assert rt.core.ack_timer_wanted() is None  # armed once
    second = rt.core.received_v2('{"offset":2,"type":"chat","n":2}')
    assert second.message == {"type": "chat", "n": 2}
    assert second.reply is not None
    assert json.loads(second.reply)["offset"] == 2  # the batch is full: ack at once
    assert rt.core.ack_due() is None  # the timer finds nothing owed
    again = rt.core.received_v2('{"offset":1,"type":"chat","n":1}')
    assert again.message is None
    assert again.reply is not None
    assert json.loads(again.reply) == {"type": "ack", "offset": 2, "timestamp": ANY_TIME}
    rt.core.received_v2('{"offset":3,"type":"chat"}')
    assert rt.core.ack_timer_wanted() == 40
    due = rt.core.ack_due()
    assert due is not None
    assert json.loads(due)["offset"] == 3
    state = rt.core.snapshot().delivery
    assert state is not None
    assert (state.duplicates_dropped, state.last_offset, state.unacknowledged) == (1, 3, 0)


class _AnyTime:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.startswith("2025-08-15T")

    def __hash__(self) -> int:  # pragma: no cover - never hashed
        return 0


ANY_TIME: Any = _AnyTime()


@pytest.mark.parametrize(
    ("text", "violation"),
    [
        ('{"offset":3,"type":"chat"}', "offset 3 after 0: a gap"),
        ('{"offset":0,"type":"chat"}', "bad offset 0"),
        ('{"offset":"1","type":"chat"}', "bad offset '1'"),
        ('{"offset":true,"type":"chat"}', "bad offset True"),
        ('{"type":"ack","id":"x"}', "bad ack"),
        ('{"type":"ack"}', "bad ack"),
    ],
)
def test_a_v2_frame_that_breaks_the_numbering_is_a_violation(text: str, violation: str) -> None:
    rt = v2_client()
    received = rt.core.received_v2(text)
    assert received.message is None
    assert received.violation is not None
    assert received.violation.startswith(violation)


def test_v2_control_messages_and_unparseable_frames_pass_unnumbered() -> None:
    rt = v2_client()
    error = '{"type":"error","error_code":"INVALID_JSON","message":"m","timestamp":"t"}'
    assert rt.core.received_v2(error).message == json.loads(error)
    assert rt.core.received_v2("not json").message is None
    assert rt.core.received_v2('{"type":"ping","timestamp":"t"}').reply is not None
    # v1 keeps its ack and offset fields: they are the application's.
    v1 = open_client()
    assert v1.core.received_v2('{"type":"ack","id":"x"}').message == {"type": "ack", "id": "x"}


def test_a_refused_resume_is_reported_once_and_hands_back_what_was_written() -> None:
    rt = v2_client()
    delivery = write(rt, '{"type":"a"}')
    rt.close(DROPPED)
    rt.fire(Timer.RETRY)
    rt.core.offer('{"type":"b"}')  # accepted during the outage, never written
    rt.first_frame(v2_hello("S2", epoch="E2", resume_outcome="wrong_epoch"))
    report = rt.core.take_resume_report()
    assert report is not None
    assert (report.outcome, report.resumed, report.session_id) == ("wrong_epoch", False, "S2")
    assert report.returned == ('{"type":"a"}',)
    assert rt.core.take_resume_report() is None
    assert rt.core.take_returns() == [(NOT_ACKNOWLEDGED, ['{"type":"a"}'])]
    assert rt.core.take_returns() == []
    assert [p.text for p in delivery.outbox] == ['{"id":1,"type":"b"}']


def test_a_resumed_session_reports_its_replay_and_loses_nothing() -> None:
    rt = v2_client()
    write(rt, '{"type":"a"}')
    rt.close(DROPPED)
    rt.fire(Timer.RETRY)
    rt.first_frame(v2_hello(resumed=True, resume_outcome="resumed", replayed=3))
    report = rt.core.take_resume_report()
    assert report is not None
    assert (report.resumed, report.replayed, report.returned) == (True, 3, ())
    assert rt.core.take_returns() == []
    state = rt.core.snapshot().delivery
    assert state is not None
    assert (state.resent, state.replayed, state.unacknowledged) == (1, 3, 1)


def test_an_unknown_resume_outcome_from_the_server_reads_as_an_unknown_session() -> None:
    rt = v2_client()
    rt.close(DROPPED)
    rt.fire(Timer.RETRY)
    rt.first_frame(v2_hello("S2", resume_outcome="something-new"))
    report = rt.core.take_resume_report()
    assert report is not None
    assert report.outcome == "unknown_session"


def test_a_v2_hello_lowers_the_largest_message_to_what_the_server_accepts() -> None:
    rt = client(version=2)
    rt.connect()
    rt.first_frame(v2_hello(max_message_bytes=64))
    with pytest.raises(ValueError, match=r"over max_message_bytes \(64\)"):
        rt.core.prepare({"type": "t", "text": "x" * 64})


def test_a_server_that_refuses_v2_with_4400_gets_a_v1_retry() -> None:
    rt = v2_client()
    write(rt, '{"type":"written"}')
    rt.close(DROPPED)
    rt.core.offer('{"type":"unsent"}')
    rt.fire(Timer.RETRY)
    effects = rt.fail(CloseFailure(4400, "Unsupported version '2'"))
    assert retry_delays(effects)  # retried, although 4400 is not retryable for a v1 client
    assert rt.phase() is Phase.FAILED
    assert rt.core.version == 1
    assert rt.core.delivery is None
    assert query(rt)["version"] == ["1"]
    assert "session_id" not in query(rt)
    assert rt.core.take_returns() == [(NOT_ACKNOWLEDGED, ['{"type":"written"}'])]
    assert list(rt.core.queue) == ['{"type":"unsent"}']
    state = rt.core.snapshot()
    assert (state.protocol_version, state.delivery) == (1, None)
    # From now on a 4400 is what it is for v1: not retryable.
    rt.fire(Timer.RETRY)
    rt.fail(CloseFailure(4400, "Unsupported version '1'"))
    assert rt.phase() is Phase.FALLBACK


def test_a_downgrade_with_nothing_written_hands_nothing_back() -> None:
    rt = client(version=2)
    rt.connect()
    rt.core.offer('{"type":"a"}')
    rt.fail(CloseFailure(4400, "Unsupported version '2'"))
    assert rt.core.take_returns() == []
    assert list(rt.core.queue) == ['{"type":"a"}']


def test_idle_or_fallback_ends_the_session_and_hands_back_its_outbox_with_reasons() -> None:
    rt = v2_client()
    write(rt, '{"type":"written"}')
    rt.core.offer('{"type":"unsent"}')
    rt.disconnect()
    assert rt.core.take_returns() == [
        (NOT_ACKNOWLEDGED, ['{"type":"written"}']),
        (NOT_SENT, ['{"type":"unsent"}']),
    ]
    assert "session_id" not in query(rt)
    # Fallback from the first attempts: nothing was ever written, all of it is "not sent".
    fresh = client(version=2)
    fresh.connect()
    fresh.core.offer('{"type":"q"}')
    fresh.fail(REJECTED)
    assert fresh.phase() is Phase.FALLBACK
    assert fresh.core.take_returns() == [(NOT_SENT, ['{"type":"q"}'])]
    # An empty session ends without handing anything back.
    empty = v2_client()
    empty.disconnect()
    assert empty.core.take_returns() == []


def test_a_retried_loss_is_info_and_giving_up_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="steadysocket")
    rt = open_client()
    rt.close(DROPPED)  # retried
    rt.fire(Timer.RETRY)
    rt.fail(REFUSED)  # retried
    rt.fire(Timer.RETRY)
    rt.fail(REJECTED)  # 4401: not retryable, so fallback
    levels = {
        r.getMessage().split(":")[0]: r.levelname
        for r in caplog.records
        if "Connection" in r.getMessage() or "fallback mode" in r.getMessage()
    }
    assert levels == {
        "[WS] Connection lost": "INFO",
        "[WS] Connection failed": "WARNING",  # the last one, 4401, is not retried
        "[WS] Entering fallback mode": "WARNING",
    }
    retried = [
        r.levelname for r in caplog.records if r.getMessage().startswith("[WS] Connection failed")
    ]
    assert retried == ["INFO", "WARNING"]


def test_an_attempt_that_opened_records_how_its_connection_ended() -> None:
    rt = open_client()
    rt.clock.advance(3)
    rt.close(CloseFailure(4500, "Server handshake error"))
    opened = rt.core.snapshot().recent_attempts[0]
    assert opened.outcome == "open"
    assert (opened.close_code, opened.close_reason) == (4500, "Server handshake error")
    assert (opened.classification, opened.retryable) == ("server_error", True)
    assert opened.closed_at == T0 + timedelta(seconds=3)
    assert opened.to_dict()["closed_at"] == "2025-08-15T10:00:03.000Z"
    assert opened.next_retry_eta is not None  # the retry that followed, on the same entry


def test_a_dead_peer_is_recorded_as_a_timeout_and_a_disconnect_as_the_clients_close() -> None:
    rt = open_client(connection_timeout_ms=CONNECT_MS)
    rt.fire(Timer.STABLE)
    rt.fire(Timer.HEARTBEAT)  # degraded
    rt.fire(Timer.HEARTBEAT)  # dead
    dead = rt.core.snapshot().recent_attempts[0]
    assert (dead.classification, dead.close_code, dead.closed_at is not None) == (
        "timeout",
        None,
        True,
    )
    mine = open_client()
    mine.disconnect()
    closed = mine.core.snapshot().recent_attempts[0]
    assert (closed.close_code, closed.close_reason, closed.classification) == (
        1000,
        "Client disconnect",
        None,
    )
    # A later close does not overwrite how the connection ended.
    mine.core._connection_ended(DROPPED)
    assert mine.core.snapshot().recent_attempts[0] == closed


def test_several_base_urls_are_dialled_in_turn_after_each_failure() -> None:
    rt = client(alternate_urls=("ws://b:8000", "ws://c:8000/api"))
    hosts = [urlsplit(rt.core.url).netloc]
    rt.connect()
    rt.fail(REFUSED)
    hosts.append(urlsplit(rt.core.url).netloc)
    rt.fire(Timer.RETRY)
    rt.hello()
    rt.close(DROPPED)  # a lost connection moves on too
    hosts.append(urlsplit(rt.core.url).netloc)
    assert urlsplit(rt.core.url).path == "/api/ws/client"
    rt.fire(Timer.RETRY)
    rt.hello()
    rt.fire(Timer.STABLE)
    rt.fire(Timer.HEARTBEAT)
    rt.fire(Timer.HEARTBEAT)  # a dead peer as well, round the list
    hosts.append(urlsplit(rt.core.url).netloc)
    assert hosts == ["localhost:8000", "b:8000", "c:8000", "localhost:8000"]
    with pytest.raises(ValueError, match="ws:// or wss://"):
        client(alternate_urls=("http://nope",))


def test_one_base_url_stays_put() -> None:
    rt = open_client()
    rt.close(DROPPED)
    assert urlsplit(rt.core.url).netloc == "localhost:8000"


def test_a_message_on_a_degraded_connection_is_delivered_and_ends_the_spell() -> None:
    rt = open_client()
    rt.fire(Timer.STABLE)
    rt.fire(Timer.HEARTBEAT)
    assert rt.phase() is Phase.DEGRADED
    received = rt.receive('{"type":"chat"}')
    assert received.message == {"type": "chat"}
    assert rt.phase() is Phase.OPEN
    v2 = v2_client()
    v2.fire(Timer.STABLE)
    v2.fire(Timer.HEARTBEAT)
    assert v2.phase() is Phase.DEGRADED
    numbered = v2.core.received_v2('{"offset":1,"type":"chat"}')
    v2.apply(numbered.effects)
    assert numbered.message == {"type": "chat"}
    assert v2.phase() is Phase.OPEN


# -- the graceful reconnect's random delay (graceful_jitter_ms) --------------------------------

GRACEFUL_WINDOW_MS = 1000.0
GRACEFUL_DRAW = 0.375
"""What the pinned source returns: the drawn delay is GRACEFUL_DRAW * GRACEFUL_WINDOW_MS."""


class PinnedRandom:
    """The backoff's random source, pinned: every draw returns ``GRACEFUL_DRAW``."""

    def __init__(self) -> None:
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return GRACEFUL_DRAW


def graceful_client(window_ms: float = GRACEFUL_WINDOW_MS) -> tuple[Driver, PinnedRandom]:
    """An open client whose graceful reconnect waits a delay drawn within ``window_ms``."""
    clock = FakeClock()
    source = PinnedRandom()
    backoff = BackoffStrategy(
        base_delays_ms=DELAYS, jitter_ratio=0, max_attempts=MAX_ATTEMPTS, rng=source
    )
    config = ClientConfig(
        base_url=BASE_URL,
        client_id=CLIENT_ID,
        connection_timeout_ms=CONNECT_MS,
        stable_after_ms=STABLE_MS,
        graceful_jitter_ms=window_ms,
    )
    rt = Driver(ClientCore(config, clock, backoff), clock)
    rt.connect()
    rt.hello()
    assert rt.phase() is Phase.OPEN
    return rt, source


def test_the_graceful_window_defaults_to_a_second_and_is_validated() -> None:
    assert ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID).graceful_jitter_ms == 1000
    config = ClientConfig(base_url=BASE_URL, client_id=CLIENT_ID, graceful_jitter_ms=-1)
    with pytest.raises(ValueError, match="graceful_jitter_ms"):
        ClientCore(config, FakeClock())


def test_a_going_away_close_with_a_graceful_window_waits_a_drawn_delay_then_reconnects() -> None:
    rt, source = graceful_client()
    delay = GRACEFUL_DRAW * GRACEFUL_WINDOW_MS

    effects = rt.close(CloseFailure(1001, "Server shutting down"))

    assert rt.phase() is Phase.RECONNECTING
    assert plain(effects) == [
        CancelTimer(Timer.HEARTBEAT),
        CancelTimer(Timer.STABLE),
        StartTimer(Timer.GRACEFUL, delay),
    ]
    assert source.draws == 1
    assert rt.core.pending_timers == frozenset({Timer.GRACEFUL})
    assert rt.core.timer_due(Timer.GRACEFUL) == pytest.approx(delay / 1000.0)
    assert rt.core.live_generation is None
    # While it waits, the client queues as it does in every reconnecting phase.
    assert rt.core.offer(encode({"type": "chat"})) is Offer.QUEUED

    effects = rt.fire(Timer.GRACEFUL)

    assert rt.phase() is Phase.RECONNECTING
    assert plain(effects) == [OpenSocket(attempt=2), StartTimer(Timer.CONNECT, CONNECT_MS)]
    assert rt.core.live_generation == 2
    rt.hello()
    assert rt.phase() is Phase.OPEN
    assert rt.flushed == [{"type": "chat"}]


def test_the_graceful_delay_takes_no_backoff_step() -> None:
    rt, _ = graceful_client()
    rt.close(CloseFailure(1001, "Server shutting down"))
    rt.fire(Timer.GRACEFUL)

    effects = rt.fail(REFUSED)

    assert rt.phase() is Phase.FAILED
    assert retry_delays(effects) == [DELAYS[0]]


def test_the_graceful_delay_is_logged_and_noted_as_the_next_attempts_eta(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="steadysocket")
    rt, _ = graceful_client()
    delay = GRACEFUL_DRAW * GRACEFUL_WINDOW_MS

    rt.close(CloseFailure(1001, "Server shutting down"))

    lines = [r.getMessage() for r in caplog.records if r.name.startswith("steadysocket")]
    assert f"[WS] graceful reconnect in {delay:.0f} ms" in lines
    opened = rt.core.snapshot().recent_attempts[0]
    assert opened.next_retry_delay_ms == delay
    assert opened.next_retry_eta == T0 + timedelta(milliseconds=delay)


def test_disconnect_during_the_graceful_delay_cancels_it() -> None:
    rt, _ = graceful_client()
    rt.close(CloseFailure(1001, "Server shutting down"))
    token = rt.token(Timer.GRACEFUL)

    effects = rt.disconnect()

    assert rt.phase() is Phase.IDLE
    assert CancelTimer(Timer.GRACEFUL) in effects
    assert rt.core.pending_timers == frozenset()
    assert rt.core.timer_fired(Timer.GRACEFUL, token) == []
    assert rt.phase() is Phase.IDLE


def test_with_a_window_of_zero_a_graceful_close_draws_nothing_and_reconnects_at_once() -> None:
    rt, source = graceful_client(window_ms=0)

    effects = rt.close(CloseFailure(1001, "Server shutting down"))

    assert OpenSocket(attempt=2) in effects
    assert Timer.GRACEFUL not in rt.core.pending_timers
    assert source.draws == 0
