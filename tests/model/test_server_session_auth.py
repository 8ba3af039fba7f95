"""Tests for the authentication step of steadysocket.model.server_session: ``check()`` (the
query checks alone), ``refuse()`` (4403, 4419) and ``select_subprotocol``; pure and synchronous.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from steadysocket.model.classify import CloseFailure, classify
from steadysocket.model.delivery import DeliveryConfig, SessionStore
from steadysocket.model.protocol import MAX_CLOSE_REASON_BYTES, CloseCode
from steadysocket.model.server_session import (
    AUTH_EXPIRED_REASON,
    AUTH_REFUSED_REASON,
    Close,
    SendText,
    ServerConfig,
    ServerSession,
    SessionState,
    select_subprotocol,
)

WALL = datetime(2025, 8, 15, 10, 0, 0, tzinfo=UTC)
CONFIG = ServerConfig(heartbeat_interval_ms=1000, connection_timeout_ms=3000)
UNSUPPORTED = CloseCode.UNSUPPORTED_VERSION


def store() -> SessionStore:
    return SessionStore("EPOCH", DeliveryConfig())


def test_check_accepts_a_valid_query_and_names_the_client_before_the_hello() -> None:
    session = ServerSession(CONFIG)
    assert session.check("client_id=tab-1&role=admin&version=2") == []
    assert (session.client_id, session.role, session.version) == ("tab-1", "admin", 2)
    assert session.state is SessionState.NEW
    assert session.request_id == ""


@pytest.mark.parametrize(
    ("query", "accept_v2", "expected"),
    [
        ("client_id=c1&version=3", True, Close(UNSUPPORTED, "Unsupported version '3'")),
        ("client_id=c1&version=2", False, Close(UNSUPPORTED, "Unsupported version '2'")),
        ("client_id=c1&role=root", True, Close(CloseCode.INVALID_ROLE, "Invalid role 'root'")),
        ("client_id=", True, Close(CloseCode.POLICY_VIOLATION, "Invalid client_id")),
    ],
)
def test_check_refuses_a_bad_query_as_open_would(
    query: str, accept_v2: bool, expected: Close
) -> None:
    session = ServerSession(CONFIG)
    assert session.check(query, accept_v2=accept_v2) == [expected]
    assert session.state is SessionState.CLOSED
    reference = ServerSession(CONFIG)
    sessions = store() if accept_v2 else None
    assert reference.open(query, now=0.0, wall=WALL, request_id="r", sessions=sessions) == [
        expected
    ]


def test_open_after_check_sends_the_hello_of_the_checked_query() -> None:
    session = ServerSession(CONFIG)
    assert session.check("client_id=c1") == []
    actions = session.open("client_id=c1", now=0.0, wall=WALL, request_id="r-1")
    assert len(actions) == 1
    assert isinstance(actions[0], SendText)
    hello = json.loads(actions[0].text)
    assert (hello["type"], hello["client_id"], hello["request_id"]) == ("hello", "c1", "r-1")
    assert session.state is SessionState.OPEN


def test_open_after_check_in_v2_opens_a_session_from_the_store() -> None:
    session = ServerSession(CONFIG)
    assert session.check("client_id=c1&version=2") == []
    actions = session.open(
        "client_id=c1&version=2",
        now=0.0,
        wall=WALL,
        request_id="r",
        sessions=store(),
        new_session_id="s-1",
    )
    assert isinstance(actions[0], SendText)
    assert json.loads(actions[0].text)["session_id"] == "s-1"
    assert session.delivery is not None


def test_open_without_sessions_after_check_accepted_v2_is_a_runtime_bug() -> None:
    session = ServerSession(CONFIG)
    assert session.check("client_id=c1&version=2") == []
    with pytest.raises(RuntimeError, match="without sessions"):
        session.open("client_id=c1&version=2", now=0.0, wall=WALL, request_id="r")


def test_check_twice_or_after_open_is_a_runtime_bug() -> None:
    session = ServerSession(CONFIG)
    assert session.check("client_id=c1") == []
    with pytest.raises(RuntimeError, match="check"):
        session.check("client_id=c1")
    opened = ServerSession(CONFIG)
    opened.open("client_id=c1", now=0.0, wall=WALL, request_id="r")
    with pytest.raises(RuntimeError, match="open"):
        opened.check("client_id=c1")


def test_refuse_closes_4403_final_and_4419_retryable_with_default_reasons() -> None:
    refused = ServerSession(CONFIG)
    refused.check("client_id=c1")
    assert refused.refuse() == [Close(CloseCode.AUTH_REFUSED, AUTH_REFUSED_REASON)]
    assert refused.state is SessionState.CLOSED
    expired = ServerSession(CONFIG)
    expired.check("client_id=c1")
    assert expired.refuse(expired=True) == [Close(CloseCode.AUTH_EXPIRED, AUTH_EXPIRED_REASON)]
    # What a steadysocket client makes of them.
    assert not classify(CloseFailure(CloseCode.AUTH_REFUSED)).retryable
    assert classify(CloseFailure(CloseCode.AUTH_EXPIRED)).retryable


def test_refuse_keeps_the_hooks_reason_cut_to_a_close_frame() -> None:
    session = ServerSession(CONFIG)
    session.check("client_id=c1")
    [close] = session.refuse("é" * 200)
    assert isinstance(close, Close)
    assert close.code == CloseCode.AUTH_REFUSED
    assert len(close.reason.encode()) <= MAX_CLOSE_REASON_BYTES
    assert close.reason.startswith("éé")


def test_refuse_on_a_closed_session_does_nothing() -> None:
    session = ServerSession(CONFIG)
    session.check("client_id=c1")
    session.refuse("no")
    assert session.refuse("again", expired=True) == []


@pytest.mark.parametrize(
    ("offered", "supported", "expected"),
    [
        (["steady.v1"], ["steady.v1"], "steady.v1"),
        (["b", "a"], ["a", "b"], "a"),  # the server's order of preference
        (["x"], ["a"], None),  # nothing shared: no subprotocol, never a refusal
        ([], ["a"], None),  # a client that offers none is served without one
        (["a"], [], None),  # a server that supports none ignores the offer
    ],
)
def test_select_subprotocol_picks_the_servers_first_choice_the_client_offered(
    offered: list[str], supported: list[str], expected: str | None
) -> None:
    assert select_subprotocol(offered, supported) == expected
