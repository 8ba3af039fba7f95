"""The diagnostics panel renders every field the seed's panel shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.protocol import FEATURES, Hello
from steadysocket.model.snapshot import ConnectionAttempt, ConnectionStats, Phase, WSState
from steadysocket.runtime.panel import KEYS_HELP, outage_lines, render

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


def _state(**overrides: object) -> WSState:
    hello = Hello(
        server_time="2026-11-26T11:59:00.000Z",
        accepted_version=1,
        features=FEATURES,
        request_id="req-1",
        client_id="panel-client",
        heartbeat_interval_ms=25000,
    )
    failed = ConnectionAttempt(
        attempt=2,
        phase=Phase.RECONNECTING,
        timestamp=NOW - timedelta(seconds=3),
        ended_at=NOW - timedelta(seconds=2),
        duration_ms=1000.0,
        outcome="failed",
        classification="network",
        retryable=True,
        detail="connection refused",
        next_retry_delay_ms=4000.0,
        next_retry_eta=NOW + timedelta(seconds=2),
    )
    fields: dict[str, object] = {
        "phase": Phase.FAILED,
        "client_id": "panel-client",
        "url": "ws://127.0.0.1:8000/ws/client?client_id=panel-client&version=1&role=frontend",
        "stats": ConnectionStats(
            total_attempts=2,
            successful_connections=1,
            current_uptime_ms=0.0,
            messages_received=7,
            messages_sent=3,
            heartbeats_received=2,
            heartbeats_sent=2,
            message_counts_by_type={"echo": 3, "ping": 2},
        ),
        "recent_attempts": (failed,),
        "last_hello_message": hello,
        "connection_features": FEATURES,
    }
    fields.update(overrides)
    return WSState(**fields)  # type: ignore[arg-type]


def test_the_panel_shows_phase_stats_attempts_features_and_messages() -> None:
    text = render(_state(), now=NOW, recent_messages=[{"type": "echo", "n": 1}])
    assert "phase      FAILED" in text
    assert "attempts 2   connections 1   received 7   sent 3" in text
    assert "heartbeats received 2   sent 2" in text
    assert "by type  echo=3, ping=2" in text
    assert "heartbeat, structured_messages, error_codes, graceful_reconnect" in text
    assert "heartbeat every 25000 ms" in text
    assert "network (retryable)" in text
    assert "retry in 2.0s" in text
    assert "connection refused" in text
    assert '{"type":"echo","n":1}' in text
    assert KEYS_HELP in text


def test_the_panel_shows_the_fallback_reason_and_mode() -> None:
    text = render(
        _state(
            phase=Phase.FALLBACK,
            fallback_reason="close 4401 (Invalid role) [handshake]",
            is_fallback_mode=True,
        ),
        now=NOW,
    )
    assert "phase      FALLBACK   (fallback mode)" in text
    assert "fallback   close 4401 (Invalid role) [handshake]" in text


def test_the_panel_shows_uptime_for_an_open_connection() -> None:
    stats = ConnectionStats(current_uptime_ms=125_000.0, connection_start=NOW)
    text = render(_state(phase=Phase.OPEN, stats=stats), now=NOW)
    assert "uptime     2m05s" in text


def test_a_fresh_client_renders_placeholders_not_errors() -> None:
    state = WSState(phase=Phase.IDLE, client_id="c", url="ws://h/ws/client?client_id=c")
    text = render(state, now=NOW, notice="connecting…")
    assert "phase      IDLE" in text
    assert "server features\n  -\n" in text
    assert text.rstrip().endswith("connecting…")


def test_long_lines_are_clipped_to_the_panel_width() -> None:
    text = render(_state(), now=NOW, recent_messages=[{"type": "x", "blob": "y" * 500}])
    assert max(len(line) for line in text.splitlines()) <= 78


def _attempt(number: int, **fields: object) -> ConnectionAttempt:
    return ConnectionAttempt(
        attempt=number,
        phase=Phase.RECONNECTING,
        timestamp=NOW - timedelta(seconds=1),
        **fields,  # type: ignore[arg-type]
    )


NO_JITTER = BackoffStrategy(base_delays_ms=(1000, 2000, 4000), jitter_ratio=0.0, max_attempts=5)


def test_after_a_failed_attempt_the_panel_shows_attempts_left_and_when_it_gives_up() -> None:
    failed = _attempt(2, outcome="failed", next_retry_eta=NOW + timedelta(seconds=1.5))
    state = _state(phase=Phase.FAILED, recent_attempts=(failed,))
    text = render(state, now=NOW, backoff=NO_JITTER)
    # 1.5 s to attempt 3, then the delays after attempts 3 and 4 (4 s each): 9.5 s.
    assert "outage     attempt 2 of 5, 3 left" in text
    assert "gives up   in 9.5s (by 12:00:10) if no attempt connects" in text


def test_while_an_attempt_runs_its_own_delay_still_counts() -> None:
    running = _attempt(1)
    state = _state(phase=Phase.CONNECTING, current_attempt=running, recent_attempts=())
    lines = outage_lines(state, now=NOW, backoff=NO_JITTER)
    # Delays after attempts 1 to 4: 1 + 2 + 4 + 4 s.
    assert lines == [
        "outage     attempt 1 of 5, 4 left",
        "gives up   in 11s (by 12:00:11) if no attempt connects",
    ]


def test_jittered_delays_give_a_range() -> None:
    failed = _attempt(2, outcome="failed", next_retry_eta=NOW + timedelta(seconds=2))
    state = _state(phase=Phase.FAILED, recent_attempts=(failed,))
    lines = outage_lines(state, now=NOW, backoff=BackoffStrategy.create_production_strategy())
    # 2 s, then the delays after attempts 3 to 7: 4 + 8 + 12 + 12 + 12 s, each ±20 %.
    assert lines == [
        "outage     attempt 2 of 8, 6 left",
        "gives up   in 40-60s (by 12:01:00) if no attempt connects",
    ]


def test_the_last_attempt_gives_up_if_it_fails() -> None:
    state = _state(phase=Phase.RECONNECTING, current_attempt=_attempt(5), recent_attempts=())
    assert outage_lines(state, now=NOW, backoff=NO_JITTER) == [
        "outage     attempt 5 of 5, 0 left",
        "gives up   if this attempt fails",
    ]
    failed = _attempt(5, outcome="failed")
    spent = _state(phase=Phase.FAILED, recent_attempts=(failed,))
    assert outage_lines(spent, now=NOW, backoff=NO_JITTER) == ["outage     attempt 5 of 5, 0 left"]


def test_outside_an_outage_there_are_no_outage_lines() -> None:
    for phase in (Phase.IDLE, Phase.OPEN, Phase.DEGRADED, Phase.FALLBACK):
        assert outage_lines(_state(phase=phase), now=NOW, backoff=NO_JITTER) == []
    fresh = _state(phase=Phase.CONNECTING, recent_attempts=())
    assert outage_lines(fresh, now=NOW, backoff=NO_JITTER) == []
    assert "outage" not in render(_state(phase=Phase.OPEN), now=NOW, backoff=NO_JITTER)


def test_an_idle_reason_is_shown_only_while_idle() -> None:
    idle = WSState(phase=Phase.IDLE, client_id="c", url="ws://h/ws/client?client_id=c")
    text = render(idle, now=NOW, idle_reason="WEBSOCKET_ENABLED is false")
    assert "idle       WEBSOCKET_ENABLED is false: it will not connect" in text
    assert "WEBSOCKET_ENABLED" not in render(
        _state(phase=Phase.OPEN), now=NOW, idle_reason="WEBSOCKET_ENABLED is false"
    )
