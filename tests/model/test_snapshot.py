"""Tests for steadysocket.model.snapshot: the read-only state views and their JSON form."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from steadysocket.model.protocol import FEATURES, make_hello
from steadysocket.model.snapshot import (
    AttemptOutcome,
    ConnectionAttempt,
    ConnectionStats,
    DeliveryStats,
    Phase,
    WSState,
)

T0 = datetime(2025, 8, 15, 10, 0, 0, tzinfo=UTC)


def failed_attempt(number: int = 1) -> ConnectionAttempt:
    return ConnectionAttempt(
        attempt=number,
        phase=Phase.CONNECTING if number == 1 else Phase.RECONNECTING,
        timestamp=T0,
        ended_at=T0 + timedelta(milliseconds=250),
        duration_ms=250.0,
        outcome=AttemptOutcome.FAILED,
        classification="network",
        retryable=True,
        detail="connection refused",
        close_code=None,
        next_retry_delay_ms=1000.0,
        next_retry_eta=T0 + timedelta(milliseconds=1250),
    )


def full_state() -> WSState:
    hello = make_hello(now=T0, client_id="c-1", request_id="req", heartbeat_interval_ms=25000)
    stats = ConnectionStats(
        total_attempts=3,
        successful_connections=1,
        current_uptime_ms=1234.5,
        messages_received=7,
        messages_sent=4,
        heartbeats_received=2,
        heartbeats_sent=1,
        last_activity=T0 + timedelta(seconds=1),
        connection_start=T0,
        message_counts_by_type={"hello": 1, "ping": 2, "chat": 4},
    )
    return WSState(
        phase=Phase.OPEN,
        client_id="c-1",
        url="ws://h/ws/client?client_id=c-1&version=1&role=frontend",
        stats=stats,
        current_attempt=None,
        recent_attempts=(failed_attempt(2), failed_attempt(1)),
        fallback_reason=None,
        last_hello_message=hello,
        connection_features=hello.features,
        is_fallback_mode=False,
    )


def test_phase_values_are_the_seeds_lowercase_names() -> None:
    # mypy's strict equality does not know a StrEnum member equals its value; runtime does.
    assert Phase.OPEN == "open"  # type: ignore[comparison-overlap]
    assert [str(phase) for phase in Phase] == [
        "idle",
        "connecting",
        "open",
        "degraded",
        "reconnecting",
        "failed",
        "fallback",
    ]


def test_an_in_flight_attempt_needs_only_number_phase_and_start() -> None:
    attempt = ConnectionAttempt(attempt=1, phase=Phase.CONNECTING, timestamp=T0)
    assert attempt.outcome == "in_flight"
    data = attempt.to_dict()
    # The seed's field names first (its ConnectionAttempt), then steadysocket's extras.
    assert list(data)[:7] == [
        "attempt",
        "timestamp",
        "duration_ms",
        "close_code",
        "close_reason",
        "classification",
        "next_retry_eta",
    ]
    assert data == {
        "attempt": 1,
        "timestamp": "2025-08-15T10:00:00.000Z",
        "duration_ms": None,
        "close_code": None,
        "close_reason": None,
        "classification": None,
        "next_retry_eta": None,
        "phase": "connecting",
        "outcome": "in_flight",
        "ended_at": None,
        "closed_at": None,
        "retryable": None,
        "detail": None,
        "next_retry_delay_ms": None,
    }


def test_the_earlier_attempt_field_names_still_read() -> None:
    attempt = failed_attempt(2)
    assert (attempt.number, attempt.started_at, attempt.failure_kind) == (2, T0, "network")
    assert attempt.next_retry_at == T0 + timedelta(milliseconds=1250)


def test_a_failed_attempt_serializes_its_times_with_z_suffix() -> None:
    data = failed_attempt().to_dict()
    assert data["ended_at"] == "2025-08-15T10:00:00.250Z"
    assert data["next_retry_eta"] == "2025-08-15T10:00:01.250Z"
    assert data["outcome"] == "failed"
    assert data["classification"] == "network"
    assert json.loads(json.dumps(data)) == data


def test_attempt_accepts_a_plain_string_outcome() -> None:
    assert ConnectionAttempt(1, Phase.OPEN, T0, outcome="open").outcome == AttemptOutcome.OPEN


def test_attempt_rejects_an_unknown_outcome() -> None:
    with pytest.raises(ValueError, match="outcome must be one of"):
        ConnectionAttempt(1, Phase.CONNECTING, T0, outcome="exploded")


def test_attempt_numbers_count_from_one() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        ConnectionAttempt(0, Phase.CONNECTING, T0)


def test_attempt_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timestamp must be timezone-aware"):
        ConnectionAttempt(1, Phase.CONNECTING, datetime(2025, 1, 1))


def test_stats_default_to_zero_and_serialize() -> None:
    assert ConnectionStats().to_dict() == {
        "total_attempts": 0,
        "successful_connections": 0,
        "current_uptime_ms": 0.0,
        "messages_received": 0,
        "messages_sent": 0,
        "heartbeats_received": 0,
        "heartbeats_sent": 0,
        "last_activity": None,
        "connection_start": None,
        "message_counts_by_type": {},
    }


def test_stats_keep_a_private_read_only_copy_of_the_counts() -> None:
    counts = {"chat": 1}
    stats = ConnectionStats(message_counts_by_type=counts)
    counts["chat"] = 99
    assert stats.message_counts_by_type == {"chat": 1}
    with pytest.raises(TypeError):
        stats.message_counts_by_type["chat"] = 5  # type: ignore[index]


def test_stats_are_hashable_and_compare_by_counts() -> None:
    first = ConnectionStats(message_counts_by_type={"a": 1})
    assert hash(first) == hash(ConnectionStats(message_counts_by_type={"a": 2}))
    assert first == ConnectionStats(message_counts_by_type={"a": 1})
    assert first != ConnectionStats(message_counts_by_type={"a": 2})


def test_state_to_dict_is_json_serializable_and_uses_the_seeds_field_names() -> None:
    data = full_state().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert list(data) == [
        "phase",
        "client_id",
        "url",
        "stats",
        "current_attempt",
        "recent_attempts",
        "fallback_reason",
        "last_hello_message",
        "connection_features",
        "is_fallback_mode",
        "protocol_version",
        "delivery",
    ]
    assert data["phase"] == "open"
    assert data["stats"]["message_counts_by_type"] == {"hello": 1, "ping": 2, "chat": 4}
    assert data["stats"]["connection_start"] == "2025-08-15T10:00:00.000Z"
    assert [attempt["attempt"] for attempt in data["recent_attempts"]] == [2, 1]
    assert data["last_hello_message"]["type"] == "hello"
    assert data["last_hello_message"]["heartbeat_interval_ms"] == 25000
    assert data["connection_features"] == list(FEATURES)


def test_state_to_json_matches_to_dict() -> None:
    state = full_state()
    assert json.loads(state.to_json()) == state.to_dict()
    assert json.loads(state.to_json(indent=2)) == state.to_dict()
    assert "\n" in state.to_json(indent=2)
    assert "\n" not in state.to_json()


def test_a_minimal_idle_state_serializes_with_empty_defaults() -> None:
    state = WSState(phase=Phase.IDLE, client_id="c", url="ws://h/ws/client")
    data = json.loads(state.to_json())
    assert data["phase"] == "idle"
    assert data["current_attempt"] is None
    assert data["recent_attempts"] == []
    assert data["last_hello_message"] is None
    assert data["is_fallback_mode"] is False
    assert data["protocol_version"] == 1
    assert data["delivery"] is None


def test_a_v2_state_carries_its_delivery_figures() -> None:
    delivery = DeliveryStats(
        unacknowledged=3,
        resent=2,
        duplicates_dropped=1,
        replayed=4,
        last_resume_outcome="resumed",
        session_id="S",
        last_offset=9,
    )
    state = WSState(phase=Phase.OPEN, client_id="c", url="u", protocol_version=2, delivery=delivery)
    data = json.loads(state.to_json())
    assert data["protocol_version"] == 2
    assert data["delivery"] == {
        "unacknowledged": 3,
        "resent": 2,
        "duplicates_dropped": 1,
        "replayed": 4,
        "last_resume_outcome": "resumed",
        "session_id": "S",
        "last_offset": 9,
    }


def test_a_fallback_state_reports_its_reason_and_in_flight_attempt() -> None:
    probe = ConnectionAttempt(attempt=1, phase=Phase.FALLBACK, timestamp=T0)
    state = WSState(
        phase=Phase.FALLBACK,
        client_id="c",
        url="ws://h/ws/client",
        current_attempt=probe,
        fallback_reason="handshake: close 4401 Invalid role 'x'",
        is_fallback_mode=True,
    )
    data = state.to_dict()
    assert data["fallback_reason"] == "handshake: close 4401 Invalid role 'x'"
    assert data["current_attempt"]["outcome"] == "in_flight"
    assert data["is_fallback_mode"] is True


def test_state_turns_lists_into_tuples_so_it_stays_hashable() -> None:
    state = WSState(
        phase=Phase.OPEN,
        client_id="c",
        url="u",
        recent_attempts=[failed_attempt()],  # type: ignore[arg-type]
        connection_features=["heartbeat"],  # type: ignore[arg-type]
    )
    assert state.recent_attempts == (failed_attempt(),)
    assert state.connection_features == ("heartbeat",)
    assert isinstance(hash(state), int)
    assert isinstance(hash(full_state()), int)


def test_state_is_frozen() -> None:
    state = full_state()
    with pytest.raises(AttributeError):
        state.phase = Phase.IDLE  # type: ignore[misc]
