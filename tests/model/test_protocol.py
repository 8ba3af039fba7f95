"""Tests for steadysocket.model.protocol: messages, decoding, handshake validation, client URL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadysocket.model.protocol import (
    CLIENT_ID_PATTERN,
    FEATURES,
    MAX_CLOSE_REASON_BYTES,
    MAX_NESTING_DEPTH,
    SUPPORTED_VERSIONS,
    SYSTEM_MESSAGES,
    Accept,
    CloseCode,
    Echo,
    ErrorCode,
    ErrorMessage,
    Hello,
    HelloSession,
    InvalidJSON,
    InvalidMessage,
    MessageType,
    Ping,
    Pong,
    ProtocolError,
    Reject,
    Role,
    Status,
    ack_text,
    build_client_url,
    decode_text,
    encode,
    format_timestamp,
    is_session_token,
    make_error,
    make_hello,
    make_ping,
    make_pong,
    parse_message,
    parse_timestamp,
    reply_error_text,
    reply_text,
    truncate_reason,
    use_fast_json,
    validate_query,
)

NOW = datetime(2025, 8, 15, 10, 0, 0, 123456, tzinfo=UTC)
TS = "2025-08-15T10:00:00.123Z"


def hello_dict(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "hello",
        "server_time": "2025-08-15T10:00:00Z",
        "accepted_version": 1,
        "features": list(FEATURES),
        "request_id": "5f0c6d0e-8a3b-4d7e-9a51-0b2f9b0c1d2e",
        "client_id": "client-1",
        "heartbeat_interval_ms": 25000,
    }
    data.update(overrides)
    return data


SAMPLE_MESSAGES = [
    make_hello(now=NOW, client_id="client-1", request_id="req-1", heartbeat_interval_ms=25000),
    Ping(timestamp=TS),
    Ping(timestamp=TS, heartbeat_count=0, client_id="client-1"),
    Pong(timestamp=TS),
    Pong(timestamp=TS, client_id="client-1"),
    Status(
        connection_uptime_seconds=12.5,
        heartbeat_count=3,
        last_heartbeat=TS,
        client_id="client-1",
        timestamp=TS,
    ),
    Status(
        connection_uptime_seconds=0.0,
        heartbeat_count=0,
        last_heartbeat=None,
        client_id="client-1",
        timestamp=TS,
    ),
    ErrorMessage(error_code=ErrorCode.INVALID_JSON, message="not valid JSON", timestamp=TS),
    Echo(original_message={"type": "chat", "text": "hi", "n": [1, 2]}, timestamp=TS, client_id="c"),
]


# --- enums and constants -------------------------------------------------------------------


def test_close_codes_have_the_documented_values() -> None:
    assert {code.name: int(code) for code in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "ABNORMAL": 1006,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "UNSUPPORTED_VERSION": 4400,
        "INVALID_ROLE": 4401,
        "AUTH_REFUSED": 4403,
        "AUTH_EXPIRED": 4419,
        "HANDSHAKE_ERROR": 4500,
    }


def test_string_enums_compare_equal_to_their_wire_values() -> None:
    assert [str(role) for role in Role] == ["frontend", "admin", "test"]
    assert [str(code) for code in ErrorCode] == [
        "INVALID_JSON",
        "INVALID_MESSAGE",
        "UNSUPPORTED_DATA",
        "HANDLER_ERROR",
    ]
    assert [str(kind) for kind in MessageType] == [
        "hello",
        "ping",
        "pong",
        "status",
        "error",
        "echo",
    ]
    assert MessageType.HELLO == "hello"  # type: ignore[comparison-overlap]


def test_versions_one_and_two_are_supported_and_features_match_the_seed() -> None:
    assert frozenset({1, 2}) == SUPPORTED_VERSIONS
    assert FEATURES == ("heartbeat", "structured_messages", "error_codes", "graceful_reconnect")


@pytest.mark.parametrize(
    "client_id", ["a", "A1", "abc-123", "x.y:z_w-1", str(uuid.uuid4()), "a" * 128]
)
def test_client_id_pattern_accepts_valid_ids(client_id: str) -> None:
    assert CLIENT_ID_PATTERN.fullmatch(client_id)


@pytest.mark.parametrize(
    "client_id", ["", "-a", ".a", "_a", "a b", "a/b", "a\n", "é", "a" * 129, "a?", "a%20"]
)
def test_client_id_pattern_rejects_invalid_ids(client_id: str) -> None:
    assert CLIENT_ID_PATTERN.fullmatch(client_id) is None


# --- timestamps ----------------------------------------------------------------------------


def test_format_timestamp_gives_utc_with_z_suffix_and_milliseconds() -> None:
    assert format_timestamp(NOW) == TS


def test_format_timestamp_converts_other_offsets_to_utc() -> None:
    plus_two = datetime(2025, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(plus_two) == "2025-01-01T10:00:00.000Z"


def test_format_timestamp_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2025, 1, 1))


def test_parse_timestamp_accepts_z_and_returns_aware_utc() -> None:
    parsed = parse_timestamp("2025-08-15T10:00:00Z")
    assert parsed == datetime(2025, 8, 15, 10, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(0)


def test_parse_timestamp_converts_numeric_offsets_to_utc() -> None:
    assert parse_timestamp("2025-08-15T12:00:00+02:00") == datetime(2025, 8, 15, 10, tzinfo=UTC)


def test_parse_timestamp_round_trips_format_timestamp_to_the_millisecond() -> None:
    assert parse_timestamp(format_timestamp(NOW)) == NOW.replace(microsecond=123000)


@pytest.mark.parametrize("text", ["2025-08-15T10:00:00", "yesterday", "", "2025-13-01T00:00:00Z"])
def test_parse_timestamp_rejects_naive_or_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        parse_timestamp(text)


@given(st.datetimes(timezones=st.timezones()))
def test_formatted_timestamps_always_end_with_z_and_parse_back(dt: datetime) -> None:
    text = format_timestamp(dt)
    assert text.endswith("Z")
    assert abs(parse_timestamp(text) - dt) < timedelta(milliseconds=1)


# --- message round trips -------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_system_message_round_trips_through_dict_and_text(message: Any) -> None:
    data = message.to_dict()
    assert data["type"] == type(message).TYPE
    assert type(message).from_dict(data) == message
    text = message.serialize()
    assert json.loads(text) == data
    assert parse_message(text) == message


@pytest.mark.parametrize("message", SAMPLE_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_system_message_is_hashable_and_frozen(message: Any) -> None:
    assert isinstance(hash(message), int)
    with pytest.raises(AttributeError):
        message.timestamp = "changed"


def test_serialize_is_compact_json() -> None:
    assert Pong(timestamp=TS, client_id="c").serialize() == (
        '{"type":"pong","timestamp":"2025-08-15T10:00:00.123Z","client_id":"c"}'
    )


def test_hello_has_exactly_the_seeds_seven_fields() -> None:
    hello = make_hello(now=NOW, client_id="c", request_id="r", heartbeat_interval_ms=25000)
    assert hello.to_dict() == {
        "type": "hello",
        "server_time": TS,
        "accepted_version": 1,
        "features": list(FEATURES),
        "request_id": "r",
        "client_id": "c",
        "heartbeat_interval_ms": 25000,
    }


@pytest.mark.parametrize("interval", [0, -1])
def test_make_hello_refuses_a_non_positive_heartbeat_interval(interval: int) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        make_hello(now=NOW, client_id="c", request_id="r", heartbeat_interval_ms=interval)


def test_client_ping_omits_server_only_fields_and_server_ping_carries_them() -> None:
    assert make_ping(NOW).to_dict() == {"type": "ping", "timestamp": TS}
    assert make_ping(NOW, heartbeat_count=0, client_id="c").to_dict() == {
        "type": "ping",
        "timestamp": TS,
        "heartbeat_count": 0,
        "client_id": "c",
    }


def test_make_pong_and_make_error_stamp_the_given_time() -> None:
    assert make_pong(NOW, "c").to_dict() == {"type": "pong", "timestamp": TS, "client_id": "c"}
    assert make_error(
        NOW, ErrorCode.UNSUPPORTED_DATA, "binary frames are not supported"
    ).to_dict() == {
        "type": "error",
        "error_code": "UNSUPPORTED_DATA",
        "message": "binary frames are not supported",
        "timestamp": TS,
    }


def test_status_reply_always_carries_last_heartbeat_even_when_null() -> None:
    status = Status(
        connection_uptime_seconds=1.0,
        heartbeat_count=0,
        last_heartbeat=None,
        client_id="c",
        timestamp=TS,
    )
    assert status.to_dict()["last_heartbeat"] is None
    assert "last_heartbeat" in json.loads(status.serialize())


def test_status_accepts_an_integer_uptime_as_a_float() -> None:
    data = Status(1.0, 0, None, "c", TS).to_dict() | {"connection_uptime_seconds": 3}
    status = Status.from_dict(data)
    assert status.connection_uptime_seconds == 3.0
    assert isinstance(status.connection_uptime_seconds, float)


def test_echo_hash_ignores_the_dict_but_equality_uses_it() -> None:
    first = Echo(original_message={"type": "a"}, timestamp=TS, client_id="c")
    second = Echo(original_message={"type": "b"}, timestamp=TS, client_id="c")
    assert hash(first) == hash(second)
    assert first != second


def test_echo_from_dict_copies_the_original_message() -> None:
    original = {"type": "chat"}
    echo = Echo.from_dict({"original_message": original, "timestamp": TS, "client_id": "c"})
    original["type"] = "changed"
    assert echo.original_message == {"type": "chat"}


def test_hello_from_dict_converts_features_to_a_tuple_and_ignores_extra_fields() -> None:
    hello = Hello.from_dict(hello_dict(extra="ignored"))
    assert hello.features == FEATURES
    assert "extra" not in hello.to_dict()


def test_from_dict_accepts_a_mapping_without_type() -> None:
    assert Pong.from_dict({"timestamp": TS}) == Pong(timestamp=TS)


def test_from_dict_refuses_a_mapping_of_another_type() -> None:
    with pytest.raises(InvalidMessage, match="expected a pong message, got type 'ping'"):
        Pong.from_dict({"type": "ping", "timestamp": TS})


def test_optional_fields_given_as_null_parse_as_none() -> None:
    ping = Ping.from_dict(
        {"type": "ping", "timestamp": TS, "heartbeat_count": None, "client_id": None}
    )
    assert ping == Ping(timestamp=TS)


# --- from_dict rejects wrong field types, naming the field ----------------------------------

GOOD = {
    Hello: hello_dict(),
    Ping: {"type": "ping", "timestamp": TS, "heartbeat_count": 1, "client_id": "c"},
    Pong: {"type": "pong", "timestamp": TS, "client_id": "c"},
    Status: {
        "type": "status",
        "connection_uptime_seconds": 1.5,
        "heartbeat_count": 2,
        "last_heartbeat": TS,
        "client_id": "c",
        "timestamp": TS,
    },
    ErrorMessage: {"type": "error", "error_code": "INVALID_JSON", "message": "m", "timestamp": TS},
    Echo: {"type": "echo", "original_message": {"type": "x"}, "timestamp": TS, "client_id": "c"},
}

BAD_FIELDS: list[tuple[type[Any], str, Any]] = [
    (Hello, "server_time", 123),
    (Hello, "server_time", "not a time"),
    (Hello, "server_time", "2025-08-15T10:00:00"),
    (Hello, "accepted_version", "1"),
    (Hello, "accepted_version", True),
    (Hello, "accepted_version", 1.0),
    (Hello, "features", "heartbeat"),
    (Hello, "features", ["heartbeat", 1]),
    (Hello, "features", None),
    (Hello, "request_id", None),
    (Hello, "client_id", 5),
    (Hello, "heartbeat_interval_ms", 0),
    (Hello, "heartbeat_interval_ms", -25000),
    (Hello, "heartbeat_interval_ms", True),
    (Hello, "heartbeat_interval_ms", 25000.0),
    (Hello, "heartbeat_interval_ms", "25000"),
    (Ping, "timestamp", None),
    (Ping, "timestamp", 17),
    (Ping, "heartbeat_count", "1"),
    (Ping, "heartbeat_count", False),
    (Ping, "heartbeat_count", -1),
    (Ping, "client_id", 7),
    (Pong, "timestamp", ["x"]),
    (Pong, "client_id", {"id": 1}),
    (Status, "connection_uptime_seconds", "1.5"),
    (Status, "connection_uptime_seconds", True),
    (Status, "connection_uptime_seconds", -1.0),
    (Status, "connection_uptime_seconds", float("nan")),
    (Status, "connection_uptime_seconds", float("inf")),
    (Status, "heartbeat_count", 1.5),
    (Status, "heartbeat_count", True),
    (Status, "last_heartbeat", 0),
    (Status, "client_id", None),
    (Status, "timestamp", 1),
    (ErrorMessage, "error_code", "NOT_A_CODE"),
    (ErrorMessage, "error_code", 1),
    (ErrorMessage, "message", None),
    (ErrorMessage, "timestamp", False),
    (Echo, "original_message", "text"),
    (Echo, "original_message", ["list"]),
    (Echo, "original_message", None),
    (Echo, "timestamp", 0),
    (Echo, "client_id", None),
]


@pytest.mark.parametrize("cls", list(GOOD), ids=lambda c: c.__name__)
def test_the_good_example_of_each_message_parses(cls: type[Any]) -> None:
    assert cls.from_dict(GOOD[cls]).to_dict() == GOOD[cls]


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    BAD_FIELDS,
    ids=lambda v: v.__name__ if isinstance(v, type) else repr(v),
)
def test_from_dict_rejects_a_wrong_field_type_naming_the_field(
    cls: type[Any], name: str, value: Any
) -> None:
    data = dict(GOOD[cls]) | {name: value}
    with pytest.raises(InvalidMessage, match=f"'{name}'") as info:
        cls.from_dict(data)
    assert info.value.error_code is ErrorCode.INVALID_MESSAGE


REQUIRED = [
    (Hello, "server_time"),
    (Hello, "accepted_version"),
    (Hello, "features"),
    (Hello, "request_id"),
    (Hello, "client_id"),
    (Hello, "heartbeat_interval_ms"),
    (Ping, "timestamp"),
    (Pong, "timestamp"),
    (Status, "connection_uptime_seconds"),
    (Status, "heartbeat_count"),
    (Status, "last_heartbeat"),
    (Status, "client_id"),
    (Status, "timestamp"),
    (ErrorMessage, "error_code"),
    (ErrorMessage, "message"),
    (ErrorMessage, "timestamp"),
    (Echo, "original_message"),
    (Echo, "timestamp"),
    (Echo, "client_id"),
]


@pytest.mark.parametrize(("cls", "name"), REQUIRED, ids=lambda v: getattr(v, "__name__", v))
def test_from_dict_rejects_a_missing_required_field_naming_it(cls: type[Any], name: str) -> None:
    data = {key: value for key, value in GOOD[cls].items() if key != name}
    with pytest.raises(InvalidMessage, match=f"field '{name}' is missing"):
        cls.from_dict(data)


@pytest.mark.parametrize("cls", list(GOOD), ids=lambda c: c.__name__)
def test_from_dict_rejects_something_that_is_not_a_mapping(cls: type[Any]) -> None:
    with pytest.raises(InvalidMessage, match="must be a JSON object"):
        cls.from_dict(["not", "a", "mapping"])


# --- decode_text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "{", "not json", "{'type': 'x'}", '{"type": "x",}', "NaN", "Infinity", "-Infinity"]
)
def test_decode_text_raises_invalid_json_for_text_that_is_not_json(text: str) -> None:
    with pytest.raises(InvalidJSON, match=r"^Invalid JSON format: ") as info:
        decode_text(text)
    assert info.value.error_code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[]", "array"),
        ("[1, 2]", "array"),
        ("42", "number"),
        ("1.5", "number"),
        ('"hello"', "string"),
        ("null", "null"),
        ("true", "boolean"),
    ],
)
def test_decode_text_raises_invalid_message_for_json_that_is_not_an_object(
    text: str, kind: str
) -> None:
    with pytest.raises(InvalidMessage, match=f"must be a JSON object, got {kind}") as info:
        decode_text(text)
    assert info.value.error_code is ErrorCode.INVALID_MESSAGE


def test_decode_text_raises_invalid_message_when_type_is_missing() -> None:
    with pytest.raises(InvalidMessage, match="no 'type' field"):
        decode_text('{"timestamp": "x"}')


@pytest.mark.parametrize("value", ["1", "null", "true", "[]", '{"a": 1}', "1.5"])
def test_decode_text_raises_invalid_message_when_type_is_not_a_string(value: str) -> None:
    with pytest.raises(InvalidMessage, match="field 'type' must be a string"):
        decode_text('{"type": ' + value + "}")


def test_decode_text_raises_invalid_message_when_type_is_empty() -> None:
    with pytest.raises(InvalidMessage, match="field 'type' must not be empty"):
        decode_text('{"type": ""}')


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, "[" * 100_000 + "]" * 100_000])
def test_decode_text_turns_pathological_nesting_into_invalid_json(text: str) -> None:
    with pytest.raises(InvalidJSON, match="nested too deeply"):
        decode_text(text)


def test_decode_text_accepts_nesting_up_to_the_limit_and_refuses_one_more() -> None:
    def nested(depth: int) -> str:
        # The outer object counts as one level.
        return '{"type":"x","v":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"

    assert decode_text(nested(MAX_NESTING_DEPTH))["type"] == "x"
    with pytest.raises(InvalidJSON, match="nested too deeply"):
        decode_text(nested(MAX_NESTING_DEPTH + 1))


def test_decode_text_turns_huge_integers_into_invalid_json() -> None:
    with pytest.raises(InvalidJSON, match="too many digits"):
        decode_text('{"type": "x", "n": ' + "9" * 10_000 + "}")


def test_decode_text_turns_out_of_range_floats_into_invalid_json() -> None:
    with pytest.raises(InvalidJSON, match="out of range"):
        decode_text('{"type": "x", "n": 1e999}')


def test_decode_text_returns_the_object_with_unicode_intact() -> None:
    assert decode_text('{"type": "chat", "text": "héllo ☃"}') == {"type": "chat", "text": "héllo ☃"}


@given(st.text())
def test_decode_text_raises_only_protocol_errors_on_arbitrary_text(text: str) -> None:
    error: ProtocolError | None = None
    try:
        result = decode_text(text)
    except ProtocolError as exc:
        error = exc
    if error is None:
        assert isinstance(result["type"], str)
        assert result["type"]
    else:
        assert type(error) in (InvalidJSON, InvalidMessage)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_decode_text_raises_only_protocol_errors_on_arbitrary_json(value: Any) -> None:
    error: ProtocolError | None = None
    try:
        result = decode_text(json.dumps(value))
    except ProtocolError as exc:
        error = exc
    if error is None:
        assert result == value
    else:
        assert type(error) in (InvalidJSON, InvalidMessage)


@given(st.dictionaries(st.text(), json_values, max_size=5), st.text(min_size=1))
def test_parse_message_on_any_object_gives_a_message_a_dict_or_invalid_message(
    fields: dict[str, Any], kind: str
) -> None:
    text = json.dumps(fields | {"type": kind})
    try:
        result = parse_message(text)
    except InvalidMessage:
        assert kind in SYSTEM_MESSAGES
    else:
        if kind in SYSTEM_MESSAGES:
            assert isinstance(result, SYSTEM_MESSAGES[kind])
        else:
            assert result == json.loads(text)


# --- parse_message and encode --------------------------------------------------------------


def test_parse_message_returns_application_messages_as_plain_dicts() -> None:
    assert parse_message('{"type":"chat","text":"hi"}') == {"type": "chat", "text": "hi"}


def test_parse_message_dispatches_every_system_type() -> None:
    assert set(SYSTEM_MESSAGES) == {str(kind) for kind in MessageType}
    for kind, cls in SYSTEM_MESSAGES.items():
        assert kind == cls.TYPE


def test_parse_message_rejects_a_bare_status_request_since_it_parses_server_replies() -> None:
    with pytest.raises(InvalidMessage, match="'connection_uptime_seconds' is missing"):
        parse_message('{"type":"status","timestamp":"' + TS + '"}')


def test_parse_message_accepts_a_client_ping_without_server_fields() -> None:
    assert parse_message('{"type":"ping","timestamp":"' + TS + '"}') == Ping(timestamp=TS)


def test_encode_is_compact_and_escapes_non_ascii() -> None:
    assert encode({"type": "chat", "text": "é"}) == '{"type":"chat","text":"\\u00e9"}'


def test_encode_refuses_nan_rather_than_emit_invalid_json() -> None:
    with pytest.raises(ValueError, match="JSON"):
        encode({"type": "x", "v": float("nan")})


def test_encoded_lone_surrogates_still_fit_in_a_utf8_frame() -> None:
    data = decode_text('{"type":"x","s":"\\ud800"}')
    encode(data).encode("utf-8")


# --- truncate_reason -----------------------------------------------------------------------


def test_truncate_reason_leaves_short_reasons_alone() -> None:
    assert truncate_reason("Invalid client_id") == "Invalid client_id"


def test_truncate_reason_keeps_a_reason_of_exactly_the_limit() -> None:
    text = "x" * MAX_CLOSE_REASON_BYTES
    assert truncate_reason(text) == text


def test_truncate_reason_cuts_long_reasons_and_marks_the_cut() -> None:
    result = truncate_reason("x" * 500)
    assert result == "x" * (MAX_CLOSE_REASON_BYTES - 3) + "…"
    assert len(result.encode("utf-8")) == MAX_CLOSE_REASON_BYTES


def test_truncate_reason_never_splits_a_multibyte_character() -> None:
    result = truncate_reason("€" * 100)  # three bytes each
    assert result == "€" * 40 + "…"
    assert len(result.encode("utf-8")) == 123


def test_truncate_reason_replaces_lone_surrogates_so_the_reason_can_be_sent() -> None:
    assert truncate_reason("bad \ud800 value") == "bad ? value"


@given(st.text(alphabet=st.characters(codec=None)), st.integers(min_value=0, max_value=200))
def test_truncated_reasons_always_fit_and_are_a_prefix(text: str, limit: int) -> None:
    result = truncate_reason(text, limit)
    encoded = result.encode("utf-8")
    assert len(encoded) <= limit
    safe = text.encode("utf-8", "replace").decode("utf-8")
    assert safe.startswith(result.removesuffix("…"))


# --- validate_query ------------------------------------------------------------------------

UUID = "0b8f3c8e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


def test_validate_query_accepts_a_full_valid_query() -> None:
    assert validate_query(f"client_id={UUID}&version=1&role=admin") == Accept(
        client_id=UUID, version=1, role=Role.ADMIN
    )


def test_validate_query_defaults_version_to_one_and_role_to_frontend() -> None:
    assert validate_query("client_id=abc") == Accept(client_id="abc", version=1, role=Role.FRONTEND)


def test_validate_query_tolerates_a_leading_question_mark() -> None:
    assert validate_query("?client_id=abc&role=test") == Accept("abc", 1, Role.TEST)


def test_validate_query_accepts_an_already_parsed_mapping() -> None:
    assert validate_query({"client_id": ["abc"], "role": ["admin"], "version": ["1"]}) == Accept(
        "abc", 1, Role.ADMIN
    )


def test_validate_query_reads_a_mapping_of_plain_strings_as_whole_values() -> None:
    params: Mapping[str, Any] = {"client_id": "abc", "role": "admin"}
    assert validate_query(params) == Accept("abc", 1, Role.ADMIN)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("3", "Unsupported version '3'"),
        ("0", "Unsupported version '0'"),
        ("02", "Unsupported version '02'"),
        ("abc", "Unsupported version 'abc'"),
        ("1.0", "Unsupported version '1.0'"),
        ("01", "Unsupported version '01'"),
        (" 1", "Unsupported version ' 1'"),
        ("", "Unsupported version ''"),
    ],
)
def test_validate_query_rejects_any_version_but_canonical_one_with_4400(
    value: str, reason: str
) -> None:
    assert validate_query(urlencode({"client_id": "abc", "version": value})) == Reject(
        CloseCode.UNSUPPORTED_VERSION, reason
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("user", "Invalid role 'user'"),
        ("Frontend", "Invalid role 'Frontend'"),
        ("ADMIN", "Invalid role 'ADMIN'"),
        ("frontend ", "Invalid role 'frontend '"),
        ("", "Invalid role ''"),
    ],
)
def test_validate_query_rejects_unknown_or_miscased_roles_with_4401(
    value: str, reason: str
) -> None:
    assert validate_query(urlencode({"client_id": "abc", "role": value})) == Reject(
        CloseCode.INVALID_ROLE, reason
    )


@pytest.mark.parametrize(
    "query",
    ["", "version=1", "client_id=", "client_id=-abc", "client_id=a%20b", "client_id=" + "a" * 129],
)
def test_validate_query_rejects_missing_empty_or_malformed_client_id_with_1008(query: str) -> None:
    assert validate_query(query) == Reject(CloseCode.POLICY_VIOLATION, "Invalid client_id")


def test_validate_query_checks_version_before_role() -> None:
    assert validate_query("client_id=abc&version=9&role=nope") == Reject(
        CloseCode.UNSUPPORTED_VERSION, "Unsupported version '9'"
    )


def test_validate_query_checks_role_before_client_id() -> None:
    assert validate_query("role=nope") == Reject(CloseCode.INVALID_ROLE, "Invalid role 'nope'")


def test_validate_query_uses_the_first_of_repeated_values() -> None:
    assert validate_query(
        "client_id=first&client_id=-bad&role=admin&role=x&version=1&version=2"
    ) == (Accept("first", 1, Role.ADMIN))
    assert validate_query("version=3&version=1&client_id=abc") == Reject(
        CloseCode.UNSUPPORTED_VERSION, "Unsupported version '3'"
    )


def test_validate_query_treats_an_empty_value_list_as_missing() -> None:
    assert validate_query({"client_id": ["abc"], "role": [], "version": []}) == Accept(
        "abc", 1, Role.FRONTEND
    )


def test_validate_query_accepts_many_generated_uuids() -> None:
    for _ in range(50):
        client_id = str(uuid.uuid4())
        assert validate_query({"client_id": [client_id]}) == Accept(client_id, 1, Role.FRONTEND)


def test_validate_query_truncates_a_long_bad_version_to_fit_a_close_frame() -> None:
    result = validate_query({"version": ["€" * 200], "client_id": ["abc"]})
    assert isinstance(result, Reject)
    assert result.code is CloseCode.UNSUPPORTED_VERSION
    assert result.reason.startswith("Unsupported version '€€")
    assert result.reason.endswith("…")
    assert len(result.reason.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES


@given(st.text())
def test_validate_query_never_raises_on_arbitrary_query_strings(query: str) -> None:
    result = validate_query(query)
    assert isinstance(result, Accept | Reject)
    if isinstance(result, Reject):
        assert len(result.reason.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES


@given(
    st.text(alphabet=st.characters(codec=None)),
    st.text(alphabet=st.characters(codec=None)),
    st.text(alphabet=st.characters(codec=None)),
)
def test_validate_query_reasons_fit_in_a_close_frame_for_any_unicode_values(
    version: str, role: str, client_id: str
) -> None:
    result = validate_query({"version": [version], "role": [role], "client_id": [client_id]})
    if isinstance(result, Reject):
        assert len(result.reason.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES
        if version not in ("1", "2"):
            assert result.code is CloseCode.UNSUPPORTED_VERSION
    else:
        assert version in ("1", "2")
        assert (int(version), client_id) == (result.version, result.client_id)
        assert role == result.role


# Surrogates are left out: a real query string arrives as bytes and cannot contain them.
@given(st.text(alphabet=st.characters(codec="utf-8")))
def test_validate_query_round_trips_urlencoded_unicode_values(value: str) -> None:
    result = validate_query(urlencode({"version": value, "client_id": "abc"}))
    if value in ("1", "2"):
        assert result == Accept("abc", int(value), Role.FRONTEND)
    else:
        assert isinstance(result, Reject)
        assert result.code is CloseCode.UNSUPPORTED_VERSION
        assert len(result.reason.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES


# --- build_client_url ----------------------------------------------------------------------


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_build_client_url_appends_the_endpoint_and_parameters() -> None:
    assert build_client_url("ws://localhost:8000", "abc-123") == (
        "ws://localhost:8000/ws/client?client_id=abc-123&version=1&role=frontend"
    )


@pytest.mark.parametrize(
    ("base", "path"),
    [
        ("ws://h", "/ws/client"),
        ("ws://h/", "/ws/client"),
        ("ws://h/api", "/api/ws/client"),
        ("ws://h/api/", "/api/ws/client"),
        ("ws://h/a/b//", "/a/b/ws/client"),
    ],
)
def test_build_client_url_keeps_the_base_path_without_double_slashes(base: str, path: str) -> None:
    assert urlsplit(build_client_url(base, "c")).path == path


def test_build_client_url_keeps_existing_query_parameters_verbatim() -> None:
    url = build_client_url("ws://h/api?token=a%20b&x=1", "c")
    assert url == "ws://h/api/ws/client?token=a%20b&x=1&client_id=c&version=1&role=frontend"


def test_build_client_url_replaces_parameters_it_owns_instead_of_repeating_them() -> None:
    url = build_client_url("ws://h/?version=2&role=admin&client_id=old&keep=1", "new", role="test")
    assert query_of(url) == {
        "keep": ["1"],
        "client_id": ["new"],
        "version": ["1"],
        "role": ["test"],
    }


def test_build_client_url_supports_wss_ports_and_custom_version_and_role() -> None:
    url = build_client_url("wss://example.com:8443/base", "c", version=2, role=Role.ADMIN)
    assert url == "wss://example.com:8443/base/ws/client?client_id=c&version=2&role=admin"


def test_build_client_url_urlencodes_the_client_id() -> None:
    url = build_client_url("ws://h", "a b&c=d")
    assert query_of(url)["client_id"] == ["a b&c=d"]


def test_build_client_url_drops_a_fragment() -> None:
    assert "#" not in build_client_url("ws://h/api#frag", "c")


def test_build_client_url_produces_a_query_the_server_accepts() -> None:
    client_id = str(uuid.uuid4())
    url = build_client_url("ws://h/api", client_id, role="admin")
    assert validate_query(urlsplit(url).query) == Accept(client_id, 1, Role.ADMIN)


@pytest.mark.parametrize(
    "base", ["http://h", "https://h/api", "h:8000", "localhost", "ftp://h", ""]
)
def test_build_client_url_rejects_a_scheme_other_than_ws_or_wss(base: str) -> None:
    with pytest.raises(ValueError, match="ws:// or wss://"):
        build_client_url(base, "c")


@pytest.mark.parametrize("base", ["ws://", "ws:///api", "wss://:8000/x"])
def test_build_client_url_rejects_a_url_without_host(base: str) -> None:
    with pytest.raises(ValueError, match="no host"):
        build_client_url(base, "c")


def test_build_client_url_rejects_an_invalid_port() -> None:
    with pytest.raises(ValueError, match="invalid port"):
        build_client_url("ws://h:99999", "c")


# -- error paths (coverage of model/ from tests/model) ----------------------------------------


@pytest.mark.parametrize("value", [None, 1700000000, b"2025-08-15T10:00:00Z"])
def test_parse_timestamp_rejects_a_value_that_is_not_a_string(value: Any) -> None:
    with pytest.raises(ValueError, match="timestamp must be a string"):
        parse_timestamp(value)


def test_decode_text_accepts_many_brackets_that_are_not_nested_deeply() -> None:
    """More brackets than the nesting limit, side by side: the walk finds them shallow."""
    text = json.dumps({"type": "x", "v": [[] for _ in range(MAX_NESTING_DEPTH)], "n": 1})
    assert text.count("[") > MAX_NESTING_DEPTH
    assert decode_text(text)["v"] == [[]] * MAX_NESTING_DEPTH


class _ExplodingMapping(Mapping[str, Any]):
    """A query mapping whose lookups raise, as a broken adapter's might."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("broken adapter")

    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("broken adapter")

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


def test_validate_query_treats_a_mapping_that_raises_as_missing_values() -> None:
    verdict = validate_query(_ExplodingMapping())
    assert verdict == Reject(CloseCode.POLICY_VIOLATION, "Invalid client_id")


def test_validate_query_reads_a_scalar_value_as_the_value_itself() -> None:
    assert validate_query({"client_id": 7}) == Reject(  # type: ignore[dict-item]
        CloseCode.POLICY_VIOLATION, "Invalid client_id"
    )
    # Only the text "1" is version one; the number is not.
    assert validate_query({"client_id": "abc", "version": 1}) == Reject(  # type: ignore[dict-item]
        CloseCode.UNSUPPORTED_VERSION, "Unsupported version 1"
    )


# --- protocol v2 on the wire -------------------------------------------------------------------


def test_a_v1_only_server_refuses_version_two_with_4400() -> None:
    assert validate_query("client_id=abc&version=2", accept_v2=False) == Reject(
        CloseCode.UNSUPPORTED_VERSION, "Unsupported version '2'"
    )
    assert validate_query("client_id=abc&version=1", accept_v2=False) == Accept(
        "abc", 1, Role.FRONTEND
    )


def test_validate_query_hands_a_v2_clients_resume_parameters_on_unjudged() -> None:
    accepted = validate_query("client_id=abc&version=2&session_id=S&epoch=E&offset=007&x=1")
    assert accepted == Accept(
        "abc", 2, Role.FRONTEND, {"session_id": "S", "epoch": "E", "offset": "007"}
    )
    assert validate_query("client_id=abc&version=2&offset=3") == Accept(
        "abc", 2, Role.FRONTEND, {"offset": "3"}
    )
    # A v1 client's resume parameters mean nothing and are not passed on.
    assert validate_query("client_id=abc&session_id=S") == Accept("abc", 1, Role.FRONTEND)


def _v2_hello(**session: Any) -> dict[str, Any]:
    fields = {
        "session_id": "s3ss10n_-",
        "epoch": "ep",
        "resumed": False,
        "max_message_bytes": 1024,
        "resume_outcome": "new",
    }
    fields.update(session)
    hello = make_hello(
        now=datetime(2026, 1, 2, tzinfo=UTC),
        client_id="c",
        request_id="r",
        heartbeat_interval_ms=5,
        version=2,
    ).to_dict()
    hello.update(fields)
    return hello


def test_a_v2_hello_carries_the_session_and_round_trips() -> None:
    session = HelloSession("s3ss10n_-", "ep", True, 1024, "resumed")
    hello = make_hello(
        now=datetime(2026, 1, 2, tzinfo=UTC),
        client_id="c",
        request_id="r",
        heartbeat_interval_ms=5,
        version=2,
        session=session,
    )
    data = hello.to_dict()
    assert {k: data[k] for k in ("session_id", "epoch", "resumed", "max_message_bytes")} == {
        "session_id": "s3ss10n_-",
        "epoch": "ep",
        "resumed": True,
        "max_message_bytes": 1024,
    }
    assert data["resume_outcome"] == "resumed"
    assert data["replayed"] == 0
    assert Hello.from_dict(json.loads(hello.serialize())) == hello
    replaying = HelloSession("s", "e", True, 1, "resumed", replayed=7)
    assert HelloSession.from_dict(replaying.to_dict()) == replaying
    # An older v2 server may leave "replayed" out: it reads as 0.
    without = {k: v for k, v in replaying.to_dict().items() if k != "replayed"}
    assert HelloSession.from_dict(without).replayed == 0
    # A v1 hello never parses a session, whatever extra fields it carries.
    v1 = dict(data, accepted_version=1)
    assert Hello.from_dict(v1).session is None


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("session_id", None, "session_id"),
        ("session_id", "", "session_id"),
        ("session_id", "a b", "session_id"),
        ("epoch", "x" * 129, "epoch"),
        ("epoch", 7, "epoch"),
        ("resumed", "false", "resumed"),
        ("resumed", 0, "resumed"),
        ("max_message_bytes", 0, "max_message_bytes"),
        ("max_message_bytes", True, "max_message_bytes"),
        ("resume_outcome", None, "resume_outcome"),
        ("replayed", -1, "replayed"),
        ("replayed", "3", "replayed"),
    ],
)
def test_a_v2_hello_with_a_bad_session_field_is_invalid_and_names_it(
    field: str, value: object, expected: str
) -> None:
    with pytest.raises(InvalidMessage, match=expected):
        Hello.from_dict(_v2_hello(**{field: value}))


def test_a_v2_hello_without_its_session_fields_is_invalid() -> None:
    hello = _v2_hello()
    del hello["epoch"]
    with pytest.raises(InvalidMessage, match="'epoch' is missing"):
        Hello.from_dict(hello)


def test_session_tokens_are_url_safe_and_bounded() -> None:
    assert is_session_token("A-z_09")
    assert is_session_token("x" * 128)
    assert not is_session_token("x" * 129)
    assert not is_session_token("")
    assert not is_session_token("a/b")
    assert not is_session_token(None)


def test_acks_and_replies_have_their_documented_shape() -> None:
    assert json.loads(ack_text("id", 7, "T")) == {"type": "ack", "id": 7, "timestamp": "T"}
    assert json.loads(ack_text("offset", 0, "T")) == {"type": "ack", "offset": 0, "timestamp": "T"}
    assert json.loads(reply_text(3, {"a": [1]}, "T")) == {
        "type": "reply",
        "id": 3,
        "result": {"a": [1]},
        "timestamp": "T",
    }
    assert json.loads(reply_text(4, None, "T"))["result"] is None
    assert json.loads(reply_error_text(5, ErrorCode.HANDLER_ERROR, "boom", "T")) == {
        "type": "reply",
        "id": 5,
        "error": {"error_code": "HANDLER_ERROR", "message": "boom"},
        "timestamp": "T",
    }
    with pytest.raises(TypeError):
        reply_text(1, object(), "T")
    with pytest.raises(ValueError, match="JSON"):
        reply_text(1, float("nan"), "T")


def test_build_client_url_adds_and_replaces_the_resume_parameters() -> None:
    url = build_client_url(
        "ws://h/?offset=9&keep=1&session_id=old",
        "c",
        2,
        resume={"session_id": "S", "epoch": "E", "offset": "4"},
    )
    assert parse_qs(urlsplit(url).query) == {
        "keep": ["1"],
        "client_id": ["c"],
        "version": ["2"],
        "role": ["frontend"],
        "session_id": ["S"],
        "epoch": ["E"],
        "offset": ["4"],
    }


# --- steadysocket[fast]: orjson decodes, with the standard decoder's results ----------------------


EDGE_TEXTS = [
    '{"type":"x","n":12345678901234567890123}',  # beyond 64 bits: orjson would give a float
    '{"type":"x","n":9223372036854775808}',
    '{"type":"x","f":1e999}',
    '{"type":"x","s":"\\ud800"}',  # a lone surrogate escape
    '{"type":"x","v":NaN}',
    '{"type":"x","a":1,"a":2}',
    '{"type":"x","d":' + "[" * 2000 + "]" * 2000 + "}",
    '{"type":"x",}',
    '{"type":"x","f":-0.0,"g":1.5e-300,"h":"\\u00e9\\n"}',
    "[1]",
    '{"type":""}',
]


def _outcome(text: str) -> object:
    try:
        return ("ok", decode_text(text))
    except ProtocolError as exc:
        return (type(exc).__name__, str(exc))


def _with_and_without_orjson(text: str) -> tuple[object, object]:
    """What decoding ``text`` gives with orjson, then with the standard decoder alone."""
    assert use_fast_json(True)
    try:
        fast = _outcome(text)
        assert not use_fast_json(False)
        return fast, _outcome(text)
    finally:
        use_fast_json(True)


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_decoding_with_orjson_gives_what_the_standard_decoder_gives(text: str) -> None:
    fast, standard = _with_and_without_orjson(text)
    assert fast == standard


@given(json_values)  # the strategy of the arbitrary-JSON test above
def test_any_message_decodes_the_same_with_and_without_orjson(value: Any) -> None:
    fast, standard = _with_and_without_orjson(json.dumps({"type": "x", "v": value}))
    assert fast == standard
