"""The server's security basics, pure: origin check, connection cap, rate limit, their codes.

Time is a number passed in, so the token bucket is checked exactly.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from steadysocket.model.classify import CloseFailure, FailureKind, classify
from steadysocket.model.server_session import (
    ORIGIN_FORBIDDEN,
    RATE_LIMITED,
    SERVER_FULL,
    Close,
    ConfigError,
    SendText,
    ServerConfig,
    ServerSession,
    SessionState,
    TokenBucket,
    admit,
    is_sendable_close_code,
    origin_allowed,
)

WALL = datetime(2025, 1, 1, tzinfo=UTC)
ALLOWED = frozenset({"https://app.example.com", "http://127.0.0.1:3000"})


@pytest.mark.parametrize(
    ("values", "allowed", "expected"),
    [
        ([], None, True),
        (["https://evil.example"], None, True),
        ([], ALLOWED, True),
        (["https://app.example.com"], ALLOWED, True),
        (["HTTPS://App.Example.COM"], ALLOWED, True),
        ([" http://127.0.0.1:3000 "], ALLOWED, True),
        (["http://127.0.0.1:3001"], ALLOWED, False),
        (["https://app.example.com.evil.example"], ALLOWED, False),
        (["null"], ALLOWED, False),
        (["null"], frozenset({"null"}), True),
        (["https://app.example.com", "https://app.example.com"], ALLOWED, False),
        ([""], ALLOWED, False),
    ],
)
def test_origin_allowed_by_the_list(
    values: list[str], allowed: frozenset[str] | None, expected: bool
) -> None:
    assert origin_allowed(values, allowed) is expected


def test_admit_checks_the_origin_before_the_cap() -> None:
    config = ServerConfig(allowed_origins=frozenset({"https://ok.example"}), max_connections=2)
    assert admit(config, ["https://ok.example"], 1) is None
    assert admit(config, ["https://ok.example"], 2) == SERVER_FULL
    assert admit(config, ["https://bad.example"], 0) == ORIGIN_FORBIDDEN
    assert admit(config, ["https://bad.example"], 5) == ORIGIN_FORBIDDEN
    assert (ORIGIN_FORBIDDEN.status, SERVER_FULL.status) == (403, 503)
    assert admit(ServerConfig(), ["anything"], 10**6) is None


def test_config_normalises_origins_and_validates_the_new_settings() -> None:
    config = ServerConfig.from_env(
        {}, allowed_origins=["HTTPS://A.example"], max_connections=3, rate_limit_messages=10
    )
    assert config.allowed_origins == frozenset({"https://a.example"})
    assert (config.max_connections, config.rate_limit_messages) == (3, 10)
    assert config.rate_limit_window_ms == 1000
    with pytest.raises(ConfigError, match="max_connections"):
        ServerConfig(max_connections=0)
    with pytest.raises(ConfigError, match="rate_limit_messages"):
        ServerConfig(rate_limit_messages=-1)
    with pytest.raises(ConfigError, match="rate_limit_window_ms"):
        ServerConfig(rate_limit_window_ms=0)
    with pytest.raises(ConfigError, match="allowed_origins"):
        ServerConfig.from_env({}, allowed_origins="https://a.example")
    with pytest.raises(ConfigError, match="allowed_origins"):
        ServerConfig(allowed_origins=frozenset({1}))  # type: ignore[arg-type]


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(capacity=4, window=1.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(5)] == [True, True, True, True, False]
    assert bucket.take(100.1) is False  # 0.4 of a token
    assert bucket.take(100.25) is True  # one token back after 1/4 s
    assert bucket.take(100.25) is False
    # Idle time refills to the capacity, never past it.
    assert [bucket.take(200.0) for _ in range(5)] == [True, True, True, True, False]
    # A clock that goes backwards gives nothing back.
    assert bucket.take(150.0) is False


def opened(config: ServerConfig, now: float = 0.0) -> ServerSession:
    session = ServerSession(config)
    actions = session.open("client_id=c1", now=now, wall=WALL, request_id="r")
    assert isinstance(actions[0], SendText)
    return session


def test_a_session_over_the_rate_limit_closes_with_4429() -> None:
    session = opened(ServerConfig(rate_limit_messages=3, rate_limit_window_ms=1000))
    replies = [session.receive_text('{"type":"ping"}', now=0.5, wall=WALL) for _ in range(3)]
    assert all(isinstance(r[0], SendText) for r in replies)
    assert session.receive_text('{"type":"ping"}', now=0.5, wall=WALL) == [RATE_LIMITED]
    assert session.state is SessionState.CLOSED
    assert session.receive_text('{"type":"ping"}', now=9.0, wall=WALL) == []


def test_every_frame_counts_against_the_rate_limit_malformed_and_binary_too() -> None:
    session = opened(ServerConfig(rate_limit_messages=2))
    assert session.receive_bytes(b"\x00", now=0.0, wall=WALL)[0] != RATE_LIMITED
    assert session.receive_text("not json", now=0.0, wall=WALL)[0] != RATE_LIMITED
    assert session.receive_bytes(b"\x00", now=0.0, wall=WALL) == [RATE_LIMITED]


def test_a_session_keeping_to_the_rate_stays_open() -> None:
    session = opened(ServerConfig(rate_limit_messages=2, rate_limit_window_ms=1000))
    for step in range(20):
        actions = session.receive_text('{"type":"pong"}', now=step * 0.5, wall=WALL)
        assert actions == []
    assert session.state is SessionState.OPEN


def test_without_a_rate_limit_a_flood_is_answered() -> None:
    session = opened(ServerConfig())
    for _ in range(10_000):
        assert session.receive_text('{"type":"pong"}', now=0.0, wall=WALL) == []
    assert session.state is SessionState.OPEN


def test_the_oversize_check_comes_before_the_rate_limit() -> None:
    session = opened(ServerConfig(max_message_bytes=8, rate_limit_messages=1))
    assert session.receive_text("x" * 9, now=0.0, wall=WALL)[0] == Close(1009, "Message too big")


def test_4429_is_sendable_and_a_client_retries_it_after_backoff() -> None:
    assert Close(4429, "Rate limit exceeded") == RATE_LIMITED
    assert is_sendable_close_code(RATE_LIMITED.code)
    classification = classify(CloseFailure(RATE_LIMITED.code, RATE_LIMITED.reason))
    assert (classification.kind, classification.retryable) == (FailureKind.UNKNOWN, True)


# ---- metering: Pings count, and the server's own pauses are credited (issue 16, point 4) ------


def test_a_protocol_ping_counts_against_the_rate_limit_and_is_a_sign_of_life() -> None:
    session = opened(
        ServerConfig(
            rate_limit_messages=2,
            rate_limit_window_ms=1000,
            heartbeat_interval_ms=1000,
            connection_timeout_ms=1000,
        )
    )
    session.handle_timer(now=1.0, wall=WALL)  # a ping: the dead-client clock starts
    assert session.receive_control(now=1.5) == []
    assert session.handle_timer(now=2.1, wall=WALL) != [Close(1011, "heartbeat timeout")]
    assert session.receive_control(now=1.5) == []
    assert session.receive_control(now=1.5) == [RATE_LIMITED]
    assert session.state is SessionState.CLOSED
    assert session.receive_control(now=9.0) == []


def test_a_paused_bucket_credits_the_paused_time_above_its_capacity() -> None:
    bucket = TokenBucket(capacity=10, window=1.0, now=0.0)
    for _ in range(10):
        assert bucket.take(0.0)
    bucket.pause(0.0)
    bucket.resume(3.0)  # 3 s not read: a client at the rate sent 30 frames meanwhile
    assert [bucket.take(3.0) for _ in range(31)] == [True] * 30 + [False]
    # The credit is spent; from now on the ordinary refill, capped at the capacity.
    assert [bucket.take(10.0) for _ in range(11)] == [True] * 10 + [False]


def test_a_paused_bucket_still_refuses_a_client_faster_than_the_rate() -> None:
    bucket = TokenBucket(capacity=2, window=1.0, now=0.0)
    bucket.pause(0.0)
    bucket.resume(1.0)  # credit: 2 frames for the second paused, plus the full bucket
    assert [bucket.take(1.0) for _ in range(5)] == [True, True, True, True, False]


def test_a_held_session_meters_what_it_reads_late_with_the_held_time_credited() -> None:
    session = opened(ServerConfig(rate_limit_messages=10, rate_limit_window_ms=1000))
    for step in range(10):  # ten frames in the first second, at the rate
        session.receive_text('{"type":"pong"}', now=step * 0.1, wall=WALL)
    session.hold(now=1.0)
    assert session.held
    session.release(now=3.0)
    # Twenty frames sent at the rate while the server was not reading, read in one burst.
    replies = [session.receive_text('{"type":"pong"}', now=3.0, wall=WALL) for _ in range(20)]
    assert replies == [[]] * 20
    assert session.state is SessionState.OPEN
