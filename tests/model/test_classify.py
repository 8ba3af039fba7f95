"""Tests for steadysocket.model.classify: one case per row of docs/protocol.md Client 4, 13."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import Any, NamedTuple, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadysocket.model.classify import (
    Classification,
    CloseFailure,
    ErrorFailure,
    ErrorKind,
    Failure,
    FailureKind,
    HttpFailure,
    classify,
)

HANDSHAKE = FailureKind.HANDSHAKE
SERVER_ERROR = FailureKind.SERVER_ERROR
ABNORMAL = FailureKind.ABNORMAL
NETWORK = FailureKind.NETWORK
TIMEOUT = FailureKind.TIMEOUT
UNKNOWN = FailureKind.UNKNOWN


class Row(NamedTuple):
    id: str
    failure: Failure
    expected: Classification


def case(failure: Failure, kind: FailureKind, retryable: bool, case_id: str) -> Row:
    return Row(case_id, failure, Classification(kind, retryable))


ROWS: list[Row] = [
    # handshake, not retryable: the same request would be rejected again
    case(CloseFailure(4400, "Unsupported version"), HANDSHAKE, False, "close-4400"),
    case(CloseFailure(4401, "Invalid role"), HANDSHAKE, False, "close-4401"),
    case(CloseFailure(1008, "Invalid client_id"), HANDSHAKE, False, "close-1008"),
    case(CloseFailure(4403, "Authentication failed"), HANDSHAKE, False, "close-4403"),
    case(HttpFailure(400), HANDSHAKE, False, "http-400"),
    case(HttpFailure(401), HANDSHAKE, False, "http-401"),
    case(HttpFailure(403), HANDSHAKE, False, "http-403"),
    case(HttpFailure(404), HANDSHAKE, False, "http-404"),
    case(HttpFailure(499), HANDSHAKE, False, "http-499"),
    case(ErrorFailure(ErrorKind.VERSION_MISMATCH), HANDSHAKE, False, "version-mismatch"),
    # handshake, retryable
    case(HttpFailure(408), HANDSHAKE, True, "http-408"),
    case(HttpFailure(429), HANDSHAKE, True, "http-429"),
    case(ErrorFailure(ErrorKind.INVALID_HELLO), HANDSHAKE, True, "invalid-hello"),
    # an expired token, or an auth() that failed: auth() is asked again before the next attempt
    case(CloseFailure(4419, "Token expired"), HANDSHAKE, True, "close-4419"),
    case(ErrorFailure(ErrorKind.AUTH, "auth() raised OSError"), HANDSHAKE, True, "auth-error"),
    # server_error, retryable
    case(CloseFailure(4500, "Server handshake error"), SERVER_ERROR, True, "close-4500"),
    case(CloseFailure(1011, "heartbeat timeout"), SERVER_ERROR, True, "close-1011"),
    case(HttpFailure(500), SERVER_ERROR, True, "http-500"),
    case(HttpFailure(503), SERVER_ERROR, True, "http-503"),
    case(HttpFailure(599), SERVER_ERROR, True, "http-599"),
    # abnormal, retryable
    case(CloseFailure(1006), ABNORMAL, True, "close-1006"),
    case(ErrorFailure(ErrorKind.NO_CLOSE_FRAME), ABNORMAL, True, "no-close-frame"),
    # network, retryable
    case(ErrorFailure(ErrorKind.REFUSED, "[Errno 111]"), NETWORK, True, "refused"),
    case(ErrorFailure(ErrorKind.DNS, "Name or service not known"), NETWORK, True, "dns"),
    case(ErrorFailure(ErrorKind.UNREACHABLE), NETWORK, True, "unreachable"),
    case(CloseFailure(1001, "Server shutting down"), NETWORK, True, "close-1001"),
    # timeout, retryable
    case(ErrorFailure(ErrorKind.CONNECT_TIMEOUT), TIMEOUT, True, "connect-timeout"),
    case(ErrorFailure(ErrorKind.HEARTBEAT_TIMEOUT), TIMEOUT, True, "heartbeat-timeout"),
    # normal closure: the server asked us to stop
    case(CloseFailure(1000, "bye"), UNKNOWN, False, "close-1000"),
    # anything else: unknown, retryable
    case(CloseFailure(1002), UNKNOWN, True, "close-1002-other-standard-code"),
    case(CloseFailure(1009), UNKNOWN, True, "close-1009-message-too-big"),
    case(CloseFailure(4000), UNKNOWN, True, "close-4000-other-private-code"),
    case(CloseFailure(0), UNKNOWN, True, "close-0-out-of-range"),
    case(HttpFailure(100), UNKNOWN, True, "http-100"),
    case(HttpFailure(200), UNKNOWN, True, "http-200"),
    case(HttpFailure(302), UNKNOWN, True, "http-302"),
    case(HttpFailure(600), UNKNOWN, True, "http-600"),
    case(ErrorFailure(ErrorKind.OTHER, "boom"), UNKNOWN, True, "other-error"),
]


@pytest.mark.parametrize(
    ("failure", "expected"), [pytest.param(row.failure, row.expected, id=row.id) for row in ROWS]
)
def test_each_failure_is_classified_as_the_protocol_says(
    failure: Failure, expected: Classification
) -> None:
    assert classify(failure) == expected


def test_every_error_kind_has_a_row() -> None:
    covered = {row.failure.kind for row in ROWS if isinstance(row.failure, ErrorFailure)}
    assert covered == set(ErrorKind)


def test_every_failure_kind_is_reachable() -> None:
    reached = {row.expected.kind for row in ROWS}
    assert reached == set(FailureKind)


failures = st.one_of(
    st.builds(CloseFailure, st.integers(), st.text()),
    st.builds(HttpFailure, st.integers()),
    st.builds(ErrorFailure, st.sampled_from(ErrorKind), st.text()),
)


@given(failure=failures)
def test_classify_is_total_over_arbitrary_failures(failure: Failure) -> None:
    result = classify(failure)
    assert isinstance(result, Classification)
    assert result.kind in set(FailureKind)
    assert isinstance(result.retryable, bool)
    assert isinstance(failure.describe(), str)


@given(code=st.integers(), reason=st.text())
def test_only_handshake_codes_and_1000_stop_retrying_after_a_close(code: int, reason: str) -> None:
    result = classify(CloseFailure(code, reason))
    assert result.retryable == (code not in {4400, 4401, 1008, 4403, 1000})
    # The reason is for humans; it never changes the classification.
    assert result == classify(CloseFailure(code))


@given(status=st.integers())
def test_http_statuses_follow_their_class(status: int) -> None:
    result = classify(HttpFailure(status))
    if 400 <= status <= 499:
        assert result == Classification(HANDSHAKE, retryable=status in {408, 429})
    elif 500 <= status <= 599:
        assert result == Classification(SERVER_ERROR, retryable=True)
    else:
        assert result == Classification(UNKNOWN, retryable=True)


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        pytest.param(
            CloseFailure(4401, "Invalid role 'x'"),
            "close 4401 (Invalid role 'x')",
            id="close-with-reason",
        ),
        pytest.param(CloseFailure(1006), "close 1006", id="close-without-reason"),
        pytest.param(HttpFailure(503), "HTTP 503", id="http"),
        pytest.param(
            ErrorFailure(ErrorKind.REFUSED, "[Errno 111] Connect call failed"),
            "connection refused: [Errno 111] Connect call failed",
            id="error-with-detail",
        ),
        pytest.param(
            ErrorFailure(ErrorKind.HEARTBEAT_TIMEOUT), "heartbeat timeout", id="error-bare"
        ),
    ],
)
def test_describe_gives_a_short_human_readable_text(failure: Failure, text: str) -> None:
    assert failure.describe() == text


def test_every_error_kind_has_a_description() -> None:
    for kind in ErrorKind:
        assert ErrorFailure(kind).describe()
        assert ErrorFailure(kind, "why").describe().endswith(": why")


def test_failure_values_are_frozen() -> None:
    # Typed as Any so the assignment reaches runtime instead of being rejected by mypy.
    failure: Any = CloseFailure(1000)
    with pytest.raises(AttributeError):
        failure.code = 1001
    assert failure.code == 1000


def test_kinds_serialise_as_lower_case_strings() -> None:
    assert [str(kind) for kind in FailureKind] == [
        "network",
        "handshake",
        "server_error",
        "abnormal",
        "timeout",
        "unknown",
    ]
    assert all(kind.value == kind.value.lower() for kind in ErrorKind)
    assert str(ErrorKind.VERSION_MISMATCH) == "version_mismatch"


def test_failures_and_classifications_are_frozen_values() -> None:
    values: list[Any] = [
        CloseFailure(1006),
        HttpFailure(503),
        ErrorFailure(ErrorKind.REFUSED),
        Classification(FailureKind.NETWORK, retryable=True),
    ]
    for value in values:
        fields = [getattr(value, name) for name in value.__dataclass_fields__]
        assert hash(value) == hash(type(value)(*fields))
        # A frozen slots dataclass raises FrozenInstanceError, or TypeError on Python 3.11.
        with pytest.raises((FrozenInstanceError, TypeError)):
            setattr(value, next(iter(value.__dataclass_fields__)), fields[0])


def test_failure_names_every_kind_of_failure() -> None:
    assert get_args(Failure) == (CloseFailure, HttpFailure, ErrorFailure)
