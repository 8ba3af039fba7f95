"""The diagnostics panel renders every field the seed's panel shows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from steadysocket.model.protocol import FEATURES, Hello
from steadysocket.model.snapshot import ConnectionAttempt, ConnectionStats, Phase, WSState
from steadysocket.runtime.panel import KEYS_HELP, render

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
        number=2,
        phase=Phase.RECONNECTING,
        started_at=NOW - timedelta(seconds=3),
        ended_at=NOW - timedelta(seconds=2),
        duration_ms=1000.0,
        outcome="failed",
        failure_kind="network",
        retryable=True,
        detail="connection refused",
        next_retry_delay_ms=4000.0,
        next_retry_at=NOW + timedelta(seconds=2),
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
