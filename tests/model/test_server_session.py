"""Tests for steadysocket.model.server_session: pure, synchronous and byte-exact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadysocket.model.protocol import CLIENT_ID_PATTERN, FEATURES, CloseCode, make_ping
from steadysocket.model.server_session import (
    DEFAULT_CONNECTION_TIMEOUT_MS,
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_OUTBOX_BYTES,
    HANDSHAKE_ERROR,
    HEARTBEAT_TIMEOUT,
    MAX_INTERVAL_MS,
    MESSAGE_TOO_BIG,
    SHUTDOWN,
    UNSUPPORTED_LEGACY_DATA,
    Action,
    ClientRoute,
    Close,
    CloseRecord,
    ConfigError,
    Deliver,
    GcPolicy,
    GcStep,
    LegacyRoute,
    Outbox,
    SendText,
    ServerConfig,
    ServerSession,
    SessionState,
    TokenBucket,
    encode_server_message,
    gc_step,
    is_sendable_close_code,
    legacy_echo,
    legacy_reply,
    match_route,
    utf8_size,
)

WALL = datetime(2025, 8, 15, 10, 0, 0, 123456, tzinfo=UTC)
TS = "2025-08-15T10:00:00.123Z"
REQUEST_ID = "5f0c6d0e-8a3b-4d7e-9a51-0b2f9b0c1d2e"
CONFIG = ServerConfig(heartbeat_interval_ms=1000, connection_timeout_ms=3000)


def opened(
    config: ServerConfig = CONFIG, query: str = "client_id=c1", now: float = 0.0
) -> ServerSession:
    session = ServerSession(config)
    actions = session.open(query, now=now, wall=WALL, request_id=REQUEST_ID)
    assert isinstance(actions[0], SendText)
    return session


def only_text(actions: list[Action]) -> str:
    assert len(actions) == 1
    action = actions[0]
    assert isinstance(action, SendText)
    return action.text


def at(seconds: float) -> datetime:
    return WALL + timedelta(seconds=seconds)


# ---- query validation (PROTOCOL Server 1, 2) ------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code", "reason"),
    [
        ("client_id=c1&version=2", 4400, "Unsupported version '2'"),
        ("client_id=c1&version=abc", 4400, "Unsupported version 'abc'"),
        ("client_id=c1&role=Admin", 4401, "Invalid role 'Admin'"),
        ("client_id=c1&role=", 4401, "Invalid role ''"),
        ("", 1008, "Invalid client_id"),
        ("client_id=", 1008, "Invalid client_id"),
        ("client_id=-leading-dash", 1008, "Invalid client_id"),
    ],
)
def test_open_refuses_a_bad_query_with_its_close_code_and_reason(
    query: str, code: int, reason: str
) -> None:
    session = ServerSession(CONFIG)
    assert session.open(query, now=0.0, wall=WALL, request_id=REQUEST_ID) == [Close(code, reason)]
    assert session.state is SessionState.CLOSED
    assert session.next_deadline() is None


def test_version_is_checked_before_role_and_role_before_client_id() -> None:
    first = ServerSession(CONFIG).open("version=9&role=x", now=0, wall=WALL, request_id="r")
    second = ServerSession(CONFIG).open("role=x", now=0, wall=WALL, request_id="r")
    assert first == [Close(CloseCode.UNSUPPORTED_VERSION, "Unsupported version '9'")]
    assert second == [Close(CloseCode.INVALID_ROLE, "Invalid role 'x'")]


def test_open_accepts_a_uuid_client_id_with_the_default_version_and_role() -> None:
    session = ServerSession(CONFIG)
    actions = session.open(
        "client_id=0b7e3c2a-1f4d-4c8e-9a6b-2d5f8e1c3b7a", now=0, wall=WALL, request_id="r"
    )
    assert isinstance(actions[0], SendText)
    assert session.state is SessionState.OPEN
    assert (session.client_id, session.role, session.version) == (
        "0b7e3c2a-1f4d-4c8e-9a6b-2d5f8e1c3b7a",
        "frontend",
        1,
    )


def test_open_takes_an_already_parsed_query_mapping() -> None:
    session = ServerSession(CONFIG)
    session.open({"client_id": ["c1"], "role": ["admin"]}, now=0, wall=WALL, request_id="r")
    assert session.role == "admin"


def test_opening_a_session_twice_is_a_runtime_bug() -> None:
    session = opened()
    with pytest.raises(RuntimeError, match="open"):
        session.open("client_id=c1", now=0, wall=WALL, request_id="r")


def test_a_handshake_failure_closes_with_4500_server_handshake_error() -> None:
    session = ServerSession(CONFIG)
    assert session.fail_handshake() == [Close(4500, "Server handshake error")]
    assert session.fail_handshake() == []
    assert Close(CloseCode.HANDSHAKE_ERROR, "Server handshake error") == HANDSHAKE_ERROR


# ---- hello (PROTOCOL Server 3) ------------------------------------------------------------


def test_hello_is_byte_exact_with_the_seeds_seven_fields() -> None:
    session = ServerSession(ServerConfig(heartbeat_interval_ms=1234))
    text = only_text(
        session.open("client_id=c1&role=test", now=5.0, wall=WALL, request_id=REQUEST_ID)
    )
    assert text == (
        '{"type":"hello","server_time":"2025-08-15T10:00:00.123Z","accepted_version":1,'
        '"features":["heartbeat","structured_messages","error_codes","graceful_reconnect"],'
        '"request_id":"5f0c6d0e-8a3b-4d7e-9a51-0b2f9b0c1d2e","client_id":"c1",'
        '"heartbeat_interval_ms":1234}'
    )
    assert list(json.loads(text)["features"]) == list(FEATURES)
    assert session.request_id == REQUEST_ID


# ---- heartbeat schedule and dead-client rule (PROTOCOL Server 4) ----------------------------


def test_first_ping_is_due_one_interval_after_open() -> None:
    session = opened(now=10.0)
    assert session.next_deadline() == 11.0
    assert session.handle_timer(now=10.999, wall=WALL) == []


def test_pings_are_byte_exact_and_count_from_zero_every_interval() -> None:
    session = opened()
    texts = []
    for n in range(3):
        deadline = session.next_deadline()
        assert deadline == float(n + 1)
        texts.append(only_text(session.handle_timer(now=deadline, wall=at(deadline))))
        session.receive_text('{"type":"pong"}', now=deadline + 0.1, wall=WALL)
    assert texts == [
        '{"type":"ping","timestamp":"2025-08-15T10:00:01.123Z","heartbeat_count":0,"client_id":"c1"}',
        '{"type":"ping","timestamp":"2025-08-15T10:00:02.123Z","heartbeat_count":1,"client_id":"c1"}',
        '{"type":"ping","timestamp":"2025-08-15T10:00:03.123Z","heartbeat_count":2,"client_id":"c1"}',
    ]
    assert session.heartbeat_count == 3


def test_a_late_timer_sends_one_ping_and_skips_the_missed_slots() -> None:
    session = opened()
    actions = session.handle_timer(now=3.5, wall=WALL)
    assert json.loads(only_text(actions))["heartbeat_count"] == 0
    assert session.next_deadline() == 4.0


def test_a_silent_client_is_closed_with_1011_heartbeat_timeout_after_the_connection_timeout() -> (
    None
):
    session = opened()  # interval 1 s, timeout 3 s
    session.handle_timer(now=1.0, wall=WALL)  # ping 0; the clock starts here
    session.handle_timer(now=2.0, wall=WALL)
    session.handle_timer(now=3.0, wall=WALL)
    assert session.next_deadline() == 4.0
    assert session.handle_timer(now=3.99, wall=WALL) == []
    assert session.handle_timer(now=4.0, wall=WALL) == [Close(1011, "heartbeat timeout")]
    assert session.state is SessionState.CLOSED
    assert session.next_deadline() is None
    assert Close(CloseCode.INTERNAL_ERROR, "heartbeat timeout") == HEARTBEAT_TIMEOUT


def test_the_dead_client_deadline_comes_before_a_later_ping() -> None:
    session = opened(ServerConfig(heartbeat_interval_ms=10_000, connection_timeout_ms=2_000))
    session.handle_timer(now=10.0, wall=WALL)
    assert session.next_deadline() == 12.0


@pytest.mark.parametrize(
    "frame", ['{"type":"pong"}', "not json", "[1]", '{"type":"chat"}', b"\x00"], ids=repr
)
def test_anything_arriving_after_a_ping_keeps_the_client_alive(frame: str | bytes) -> None:
    session = opened()
    session.handle_timer(now=1.0, wall=WALL)
    if isinstance(frame, bytes):
        session.receive_bytes(frame, now=3.9, wall=WALL)
    else:
        session.receive_text(frame, now=3.9, wall=WALL)
    for tick in (2.0, 3.0, 4.0):
        assert Close(1011, "heartbeat timeout") not in session.handle_timer(now=tick, wall=WALL)
    assert session.state is SessionState.OPEN
    # Silence after the next ping (at 2.0) is measured from that ping.
    assert session.next_deadline() == 5.0
    assert session.handle_timer(now=5.0, wall=WALL) == [HEARTBEAT_TIMEOUT]


def test_activity_before_any_ping_arms_no_dead_client_deadline() -> None:
    session = opened()
    session.receive_text('{"type":"pong"}', now=0.5, wall=WALL)
    assert session.next_deadline() == 1.0


# ---- replies per message type (PROTOCOL Server 5) -----------------------------------------


def test_ping_is_answered_with_a_byte_exact_pong() -> None:
    session = opened()
    text = only_text(session.receive_text('{"type":"ping","timestamp":"x"}', now=1, wall=WALL))
    assert text == '{"type":"pong","timestamp":"2025-08-15T10:00:00.123Z","client_id":"c1"}'


def test_pong_gets_no_reply() -> None:
    assert opened().receive_text('{"type":"pong","timestamp":"x"}', now=1, wall=WALL) == []


def test_status_reports_uptime_pings_sent_and_the_last_ping_timestamp() -> None:
    session = opened(now=100.0)
    before = json.loads(only_text(session.receive_text('{"type":"status"}', now=100.5, wall=WALL)))
    assert before == {
        "type": "status",
        "connection_uptime_seconds": 0.5,
        "heartbeat_count": 0,
        "last_heartbeat": None,
        "client_id": "c1",
        "timestamp": TS,
    }
    session.handle_timer(now=101.0, wall=at(1))
    text = only_text(session.receive_text('{"type":"status"}', now=101.25, wall=at(1.25)))
    assert text == (
        '{"type":"status","connection_uptime_seconds":1.25,"heartbeat_count":1,'
        '"last_heartbeat":"2025-08-15T10:00:01.123Z","client_id":"c1",'
        '"timestamp":"2025-08-15T10:00:01.373Z"}'
    )


def test_invalid_json_gets_an_invalid_json_error_and_the_session_stays_open() -> None:
    session = opened()
    text = only_text(session.receive_text("{nope", now=1, wall=WALL))
    assert text == (
        '{"type":"error","error_code":"INVALID_JSON","message":"Invalid JSON format: '
        'Expecting property name enclosed in double quotes (line 1, column 2)",'
        '"timestamp":"2025-08-15T10:00:00.123Z"}'
    )
    assert session.state is SessionState.OPEN


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1,2]", "message must be a JSON object, got array [1, 2]"),
        ('"hi"', "message must be a JSON object, got string 'hi'"),
        ("{}", "message has no 'type' field"),
        ('{"type":7}', "field 'type' must be a string, got number 7"),
        ('{"type":""}', "field 'type' must not be empty"),
    ],
)
def test_json_that_is_not_a_message_gets_an_invalid_message_error_and_stays_open(
    text: str, message: str
) -> None:
    session = opened()
    reply = json.loads(only_text(session.receive_text(text, now=1, wall=WALL)))
    assert reply == {
        "type": "error",
        "error_code": "INVALID_MESSAGE",
        "message": message,
        "timestamp": TS,
    }
    assert session.state is SessionState.OPEN


def test_a_binary_frame_gets_an_unsupported_data_error_and_stays_open() -> None:
    session = opened()
    text = only_text(session.receive_bytes(b"\x01\x02", now=1, wall=WALL))
    assert text == (
        '{"type":"error","error_code":"UNSUPPORTED_DATA","message":"binary frames are not '
        'supported; send JSON text frames","timestamp":"2025-08-15T10:00:00.123Z"}'
    )
    assert session.state is SessionState.OPEN


def test_a_frame_over_the_size_limit_closes_with_1009() -> None:
    config = ServerConfig(max_message_bytes=16)
    text_session, bytes_session = opened(config), opened(config)
    # 15 characters but 19 UTF-8 bytes: the limit counts bytes.
    frame = '{"type":"' + "é" * 4 + '"}'
    assert (len(frame), len(frame.encode())) == (15, 19)
    assert text_session.receive_text(frame, now=1, wall=WALL) == [Close(1009, "Message too big")]
    assert bytes_session.receive_bytes(b"x" * 17, now=1, wall=WALL) == [MESSAGE_TOO_BIG]
    assert text_session.state is bytes_session.state is SessionState.CLOSED


def test_a_frame_exactly_at_the_size_limit_is_accepted() -> None:
    session = opened(ServerConfig(max_message_bytes=16))
    assert session.receive_text('{"type":"abcde"}', now=1, wall=WALL) == [
        Deliver({"type": "abcde"})
    ]


def test_any_other_type_is_delivered_to_the_application() -> None:
    session = opened()
    actions = session.receive_text('{"type":"chat","text":"hi"}', now=1, wall=WALL)
    assert actions == [Deliver({"type": "chat", "text": "hi"})]
    assert isinstance(actions[0], Deliver)
    assert actions[0].type == "chat"


def test_the_default_echo_is_byte_exact() -> None:
    session = opened()
    action = session.echo({"type": "chat", "n": 1}, wall=WALL)
    assert action == SendText(
        '{"type":"echo","original_message":{"type":"chat","n":1},'
        '"timestamp":"2025-08-15T10:00:00.123Z","client_id":"c1"}'
    )


@given(st.text(max_size=200))
def test_no_text_frame_makes_the_session_raise_or_close(text: str) -> None:
    session = opened()
    actions = session.receive_text(text, now=1, wall=WALL)
    assert len(actions) == 1
    assert isinstance(actions[0], SendText | Deliver)
    assert session.state is SessionState.OPEN


# ---- ending -------------------------------------------------------------------------------


def test_shutdown_closes_an_open_session_with_1001_server_shutting_down() -> None:
    session = opened()
    assert session.shutdown() == [Close(1001, "Server shutting down")]
    assert Close(CloseCode.GOING_AWAY, "Server shutting down") == SHUTDOWN
    assert session.shutdown() == []


def test_a_closed_session_ignores_all_input() -> None:
    session = opened()
    session.connection_lost()
    assert session.receive_text('{"type":"ping"}', now=1, wall=WALL) == []
    assert session.receive_bytes(b"x", now=1, wall=WALL) == []
    assert session.handle_timer(now=100, wall=WALL) == []
    assert session.next_deadline() is None


def test_an_unopened_session_ignores_input_and_has_no_deadline() -> None:
    session = ServerSession(CONFIG)
    assert session.receive_text('{"type":"ping"}', now=1, wall=WALL) == []
    assert session.next_deadline() is None
    assert session.shutdown() == []


def test_the_application_closes_with_its_code_and_a_reason_cut_to_123_bytes() -> None:
    session = opened()
    actions = session.close(4000, "é" * 100)
    assert len(actions) == 1
    close = actions[0]
    assert isinstance(close, Close)
    assert close.code == 4000
    assert len(close.reason.encode()) <= 123
    assert session.close(4000) == []


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000])
def test_the_application_cannot_close_with_a_reserved_code(code: int) -> None:
    assert not is_sendable_close_code(code)
    with pytest.raises(ValueError, match=str(code)):
        opened().close(code)


# ---- routing and legacy echo (PROTOCOL Server 7) ---------------------------------------------


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/ws/client", ClientRoute("")),
        ("/ws/client?client_id=a&role=test", ClientRoute("client_id=a&role=test")),
        ("/ws/abc", LegacyRoute("abc")),
        ("/ws/client-1?x=1", LegacyRoute("client-1")),
        ("/ws/a%20b", LegacyRoute("a b")),
        ("/ws/", None),
        ("/ws/a/b", None),
        ("/ws/client/", None),
        ("/", None),
        ("/ws", None),
        ("/other", None),
        ("/ws/v2/connect", None),
    ],
)
def test_request_targets_map_to_their_endpoint(
    target: str, route: ClientRoute | LegacyRoute | None
) -> None:
    assert match_route(target) == route


def test_the_legacy_route_never_shadows_the_client_endpoint() -> None:
    assert isinstance(match_route("/ws/client?client_id=x"), ClientRoute)


def test_the_legacy_echo_prefixes_the_text() -> None:
    assert legacy_echo("hi there") == SendText("Echo: hi there")


# ---- application messages -------------------------------------------------------------------


def test_a_server_message_without_timestamp_gets_one() -> None:
    assert encode_server_message({"type": "news", "n": 1}, WALL) == (
        '{"type":"news","n":1,"timestamp":"2025-08-15T10:00:00.123Z"}'
    )


def test_a_server_message_keeps_its_own_timestamp() -> None:
    assert encode_server_message({"type": "n", "timestamp": "t"}, WALL) == (
        '{"type":"n","timestamp":"t"}'
    )


@pytest.mark.parametrize("message", [{}, {"type": ""}, {"type": 3}])
def test_a_server_message_needs_a_type(message: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="type"):
        encode_server_message(message, WALL)


# ---- configuration --------------------------------------------------------------------------


def test_config_defaults_match_the_seed() -> None:
    config = ServerConfig.from_env({})
    assert config == ServerConfig(25_000, 30_000, 1 << 20)
    assert (DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_CONNECTION_TIMEOUT_MS) == (25_000, 30_000)
    assert DEFAULT_MAX_MESSAGE_BYTES == 1_048_576
    assert (config.heartbeat_interval, config.connection_timeout) == (25.0, 30.0)


def test_config_reads_both_environment_variables() -> None:
    env = {"WS_HEARTBEAT_INTERVAL_MS": "5000", "WS_CONNECTION_TIMEOUT_MS": " 7000 "}
    config = ServerConfig.from_env(env)
    assert (config.heartbeat_interval_ms, config.connection_timeout_ms) == (5000, 7000)


def test_an_explicit_argument_wins_over_the_environment() -> None:
    env = {"WS_HEARTBEAT_INTERVAL_MS": "5000", "WS_CONNECTION_TIMEOUT_MS": "7000"}
    config = ServerConfig.from_env(env, heartbeat_interval_ms=100, max_message_bytes=10)
    assert config == ServerConfig(100, 7000, 10)


def test_an_explicit_argument_wins_even_over_a_malformed_variable() -> None:
    config = ServerConfig.from_env({"WS_HEARTBEAT_INTERVAL_MS": "junk"}, heartbeat_interval_ms=9)
    assert config.heartbeat_interval_ms == 9


def test_an_empty_variable_counts_as_unset() -> None:
    assert ServerConfig.from_env({"WS_HEARTBEAT_INTERVAL_MS": ""}) == ServerConfig()


@pytest.mark.parametrize("value", ["abc", "0", "-5", "1.5", "25s", "1e3", "99999999999999"])
@pytest.mark.parametrize("variable", ["WS_HEARTBEAT_INTERVAL_MS", "WS_CONNECTION_TIMEOUT_MS"])
def test_a_malformed_variable_is_an_error_naming_the_variable_and_value(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env({variable: value})
    assert info.value.variable == variable
    assert info.value.value == value
    assert str(info.value).startswith(f"{variable} must be a positive integer")
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("heartbeat_interval_ms", 0),
        ("connection_timeout_ms", -1),
        ("max_message_bytes", 0),
        ("heartbeat_interval_ms", True),
        ("heartbeat_interval_ms", MAX_INTERVAL_MS + 1),
    ],
)
def test_a_bad_argument_is_an_error_naming_the_argument(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{name} must be a positive integer"):
        ServerConfig(**{name: value})  # type: ignore[arg-type]


# ---- percent-encoded targets are decoded once, segment by segment (issue 16, point 7) ----------


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/ws/%63lient?client_id=a", ClientRoute("client_id=a")),
        ("/ws/%63%6C%69%65%6E%74", ClientRoute("")),
        ("/%77s/client", ClientRoute("")),
        ("/ws/a%2Fb", LegacyRoute("a/b")),
        ("/ws/client%2F", LegacyRoute("client/")),
        ("/ws/%25", LegacyRoute("%")),
        ("/ws/%2563lient", LegacyRoute("%63lient")),
        ("/ws/%C3%A9", LegacyRoute("é")),
        ("/ws/%", LegacyRoute("%")),
        ("/ws%2Fclient", None),
        ("/ws/client/%2E", None),
    ],
)
def test_a_percent_encoded_target_is_decoded_once_per_segment(
    target: str, route: ClientRoute | LegacyRoute | None
) -> None:
    assert match_route(target) == route


@given(st.text(alphabet="abc/%2Fcilntw", max_size=16))
def test_an_encoded_client_path_is_never_the_legacy_echo(suffix: str) -> None:
    target = "/ws/" + "".join(f"%{ord(ch):02X}" for ch in "client")
    assert match_route(target + "?" + suffix.replace("#", "")) == ClientRoute(
        suffix.partition("#")[0]
    )


# ---- the legacy echo's size limit (issue 16, point 7) -----------------------------------------


def test_the_legacy_reply_is_the_echo_1009_over_the_limit_and_1003_for_binary() -> None:
    assert legacy_reply("hi", 10) == SendText("Echo: hi")
    assert legacy_reply("x" * 10, 10) == SendText("Echo: " + "x" * 10)
    assert legacy_reply("x" * 11, 10) == MESSAGE_TOO_BIG
    assert legacy_reply("é" * 6, 10) == MESSAGE_TOO_BIG  # 12 UTF-8 bytes
    assert legacy_reply(b"\x00", 10) == UNSUPPORTED_LEGACY_DATA
    assert legacy_reply(b"\x00" * 11, 10) == MESSAGE_TOO_BIG


# ---- the outbox: bounded, never waits (issue 16, points 2 and 3) ------------------------------


def test_the_outbox_queues_what_fits_in_order_and_refuses_the_rest() -> None:
    box = Outbox(10)
    assert box.offer("abcd")
    assert box.offer("éé")  # 4 UTF-8 bytes
    assert box.queued_bytes == 8
    assert not box.offer("abc")  # 11 > 10: refused, counted, nothing dropped
    assert box.refused == 1
    assert box.offer("ab")
    assert box.queued_bytes == 10
    assert [box.take(), box.take(), box.take(), box.take()] == ["abcd", "éé", "ab", None]
    assert box.queued_bytes == 0


def test_an_empty_outbox_takes_one_message_of_any_size() -> None:
    box = Outbox(10)
    assert box.offer("x" * 100)
    assert not box.offer("y")
    assert box.take() == "x" * 100
    assert box.offer("y")


def test_a_sealed_outbox_refuses_without_counting_and_keeps_what_it_has() -> None:
    box = Outbox(10)
    box.offer("a")
    box.seal()
    assert not box.offer("b")
    assert box.refused == 0
    assert box.take() == "a"
    assert box.clear() == 0


@given(st.lists(st.text(max_size=40), max_size=50), st.integers(1, 64))
def test_the_outbox_never_holds_more_than_its_limit_plus_one_message(
    texts: list[str], limit: int
) -> None:
    box = Outbox(limit)
    for text in texts:
        box.offer(text)
        largest = max(utf8_size(t) for t in texts)
        assert box.queued_bytes <= max(limit, largest)
    assert box.queued_bytes == sum(utf8_size(t) for t in iter(box.take, None))


def test_utf8_size_counts_bytes() -> None:
    assert [utf8_size(t) for t in ("", "abc", "é", "€", "😀", "\ud800")] == [0, 3, 2, 3, 4, 3]


def test_the_default_outbox_bound_is_4_mib_and_must_be_positive() -> None:
    assert ServerConfig().max_outbox_bytes == DEFAULT_MAX_OUTBOX_BYTES == 4 << 20
    assert ServerConfig.from_env({}, max_outbox_bytes=5).max_outbox_bytes == 5
    with pytest.raises(ConfigError, match="max_outbox_bytes"):
        ServerConfig(max_outbox_bytes=0)


def test_the_close_timeout_is_the_connection_timeout_capped_at_10_s() -> None:
    assert ServerConfig(connection_timeout_ms=800).close_timeout == 0.8
    assert ServerConfig().close_timeout == 10.0


# ---- how a connection ended: one rule for every adapter (issue 16, point 7) -------------------


def test_the_first_close_decides_the_code() -> None:
    server_first = CloseRecord()
    assert server_first.server_closed(1011, "heartbeat timeout")
    assert not server_first.peer_closed(1000, "")
    assert not server_first.lost()
    assert (server_first.code, server_first.reason) == (1011, "heartbeat timeout")

    peer_first = CloseRecord()
    assert peer_first.peer_closed(1000, "bye")
    assert not peer_first.server_closed(1001, "Server shutting down")
    assert not peer_first.lost()  # a push that fails after the client's close
    assert (peer_first.code, peer_first.reason) == (1000, "bye")

    lost = CloseRecord()
    assert (lost.code, lost.reason) == (None, "")
    assert lost.lost()
    assert not lost.server_closed(1001, "Server shutting down")
    assert (lost.code, lost.reason) == (1006, "")


# ---- the server not reading: hold and release (issue 16, point 6) -----------------------------


def test_a_held_session_is_not_closed_for_silence_and_release_counts_as_activity() -> None:
    session = opened()  # interval 1 s, timeout 3 s
    only_text(session.handle_timer(now=1.0, wall=at(1)))  # ping 0: dead at 4.0
    session.hold(now=1.5)
    assert session.next_deadline() == 2.0  # the next ping, not the dead-client close
    for t in (2.0, 3.0, 4.0, 5.0):
        assert json.loads(only_text(session.handle_timer(now=t, wall=at(t))))["type"] == "ping"
    session.release(now=5.5)
    assert not session.held
    # The silence is measured again from the first ping after the release.
    assert json.loads(only_text(session.handle_timer(now=6.0, wall=at(6))))["type"] == "ping"
    assert session.next_deadline() == 7.0
    assert session.handle_timer(now=9.0, wall=at(9)) == [HEARTBEAT_TIMEOUT]


# ---- the ping text, built without the message dataclass --------------------------------------


@given(
    client_id=st.from_regex(CLIENT_ID_PATTERN, fullmatch=True),
    beats=st.integers(min_value=1, max_value=5),
    micros=st.integers(min_value=0, max_value=10**6 - 1),
)
def test_the_ping_text_is_byte_for_byte_what_make_ping_serializes(
    client_id: str, beats: int, micros: int
) -> None:
    session = opened(query=f"client_id={client_id}")
    for n in range(beats):
        wall = at(n + 1) + timedelta(microseconds=micros)
        text = only_text(session.handle_timer(now=float(n + 1), wall=wall))
        expected = make_ping(wall, heartbeat_count=n, client_id=client_id).serialize()
        assert text == expected
        session.receive_text('{"type":"pong"}', now=n + 1.5, wall=wall)  # alive


# ---- the garbage-collector policy ------------------------------------------------------------


def test_the_gc_policy_defaults_freeze_every_second_and_raise_generation_0() -> None:
    policy = GcPolicy()
    assert policy.freeze_interval == 1.0
    assert policy.gen0_threshold == 20_000
    assert GcPolicy(freeze_interval_ms=None).freeze_interval is None


@pytest.mark.parametrize(
    ("kwargs", "variable"),
    [
        ({"freeze_interval_ms": 0}, "gc_freeze_interval_ms"),
        ({"gen0_threshold": -1}, "gc_gen0_threshold"),
        ({"unfreeze_min_closed": 0}, "gc_unfreeze_min_closed"),
    ],
)
def test_a_malformed_gc_policy_names_the_setting(kwargs: dict[str, Any], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GcPolicy(**kwargs)
    assert caught.value.variable == variable


def test_the_gc_step_freezes_after_opens_until_a_connection_sets_worth_has_closed() -> None:
    policy = GcPolicy(unfreeze_min_closed=100)

    def step(open_connections: int, opened: int, closed: int) -> GcStep:
        return gc_step(
            policy,
            open_connections=open_connections,
            opened_since_freeze=opened,
            closed_since_unfreeze=closed,
        )

    assert step(5000, 1, 0) is GcStep.FREEZE
    assert step(5000, 0, 0) is GcStep.NOTHING  # nothing new to freeze: no work at all
    assert step(5000, 7, 4999) is GcStep.FREEZE
    assert step(5000, 0, 5000) is GcStep.UNFREEZE
    # With few connections open, the minimum keeps it from unfreezing (and collecting) often.
    assert step(3, 1, 99) is GcStep.FREEZE
    assert step(3, 1, 100) is GcStep.UNFREEZE


def test_an_explicit_connection_timeout_needs_no_environment() -> None:
    assert ServerConfig.from_env({}, connection_timeout_ms=1234).connection_timeout == 1.234


def test_a_gc_policy_may_leave_the_thresholds_alone() -> None:
    assert GcPolicy(gen0_threshold=None).gen0_threshold is None


def test_pausing_twice_keeps_the_first_pause_and_resuming_unpaused_does_nothing() -> None:
    bucket = TokenBucket(capacity=2, window=1.0, now=0.0)
    bucket.resume(5.0)
    assert bucket.tokens == 2.0
    assert bucket.take(5.0)
    assert bucket.take(5.0)
    assert not bucket.take(5.0)
    bucket.pause(5.0)
    bucket.pause(6.0)
    bucket.resume(7.0)
    assert bucket.tokens == 4.0


def test_clearing_an_outbox_that_never_queued_drops_nothing() -> None:
    outbox = Outbox(limit=100)
    assert outbox.clear() == 0
    assert len(outbox) == 0


def test_release_without_hold_does_nothing() -> None:
    session = ServerSession(ServerConfig())
    session.release(now=1.0)
    assert session.state is SessionState.NEW


@pytest.mark.parametrize("code", [None, "1000", 1000.0, True])
def test_only_an_int_can_be_a_sendable_close_code(code: object) -> None:
    assert is_sendable_close_code(code) is False
