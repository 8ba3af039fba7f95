"""Tests for the v2 and request/reply parts of steadysocket.model.server_session: pure and
byte-exact (docs/protocol.md, Protocol v2, points 1-4 and 8)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from steadysocket.model.delivery import DeliveryConfig, Inbound, ResumeOutcome, SessionStore
from steadysocket.model.protocol import FEATURES, CloseCode
from steadysocket.model.server_session import (
    MAX_REPLY_ERROR_CHARS,
    OUTBOX_OVERFLOW,
    SESSION_RESUMED_ELSEWHERE,
    Action,
    Close,
    Deliver,
    Outbox,
    SendText,
    ServerConfig,
    ServerSession,
    is_sendable_close_code,
)

WALL = datetime(2025, 8, 15, 10, 0, 0, 123456, tzinfo=UTC)
STAMP = "2025-08-15T10:00:00.123Z"
TS = "2025-08-15T10:00:00.123Z"
CONFIG = ServerConfig(heartbeat_interval_ms=1000, connection_timeout_ms=3000)
ERROR = '{{"type":"error","error_code":"INVALID_MESSAGE","message":{},"timestamp":"' + TS + '"}}'


def store(**config: Any) -> SessionStore:
    return SessionStore("EPOCH", DeliveryConfig(**config))


def v2(
    sessions: SessionStore, query: str = "client_id=c1&version=2", sid: str = "S1"
) -> tuple[ServerSession, list[Action]]:
    session = ServerSession(CONFIG)
    actions = session.open(
        query, now=1.0, wall=WALL, request_id="r", sessions=sessions, new_session_id=sid
    )
    return session, actions


def texts(actions: list[Action]) -> list[str]:
    out = []
    for action in actions:
        assert isinstance(action, SendText)
        out.append(action.text)
    return out


def error(problem: str) -> str:
    return ERROR.format(json.dumps(problem))


def deliver(session: ServerSession, text: str) -> Deliver:
    [action] = session.receive_text(text, now=1.0, wall=WALL)
    assert isinstance(action, Deliver)
    return action


# ---- the hello --------------------------------------------------------------------------------


def test_version_2_is_refused_with_4400_by_a_session_without_a_store() -> None:
    session = ServerSession(CONFIG)
    actions = session.open("client_id=c1&version=2", now=0, wall=WALL, request_id="r")
    assert actions == [Close(CloseCode.UNSUPPORTED_VERSION, "Unsupported version '2'")]
    assert session.delivery is None


def test_a_v2_hello_carries_the_session_fields_after_the_seven_v1_fields() -> None:
    sessions = store()
    session, actions = v2(sessions)
    [hello] = texts(actions)
    assert hello == (
        '{"type":"hello","server_time":"' + TS + '","accepted_version":2,'
        '"features":' + json.dumps(list(FEATURES), separators=(",", ":")) + ","
        '"request_id":"r","client_id":"c1","heartbeat_interval_ms":1000,'
        '"session_id":"S1","epoch":"EPOCH","resumed":false,"max_message_bytes":1048576,'
        '"resume_outcome":"new","replayed":0}'
    )
    assert session.version == 2
    assert session.delivery is sessions.sessions["S1"]
    assert session.resume_outcome is ResumeOutcome.NEW
    assert session.delivery.connected


def test_a_v1_session_has_no_delivery_even_with_a_store() -> None:
    session, actions = v2(store(), "client_id=c1")
    assert json.loads(texts(actions)[0])["accepted_version"] == 1
    assert (session.delivery, session.resume_outcome) == (None, None)


def test_a_resume_answers_the_hello_then_the_replay_after_the_offset_in_order() -> None:
    sessions = store()
    first, _ = v2(sessions)
    assert first.delivery is not None
    published = [first.delivery.publish(f'{{"type":"m","n":{n}}}') for n in (1, 2, 3)]
    sessions.disconnected(first.delivery, 2000)
    query = "client_id=c1&version=2&session_id=S1&epoch=EPOCH&offset=1"
    second, actions = v2(sessions, query, sid="S2")
    hello, *replay = texts(actions)
    assert json.loads(hello)["resumed"] is True
    assert json.loads(hello)["replayed"] == 2
    assert json.loads(hello)["session_id"] == "S1"
    assert (
        replay
        == published[1:]
        == ['{"offset":2,"type":"m","n":2}', '{"offset":3,"type":"m","n":3}']
    )
    assert second.delivery is first.delivery
    assert second.resume_outcome is ResumeOutcome.RESUMED


@pytest.mark.parametrize(
    ("resume", "outcome"),
    [
        ("session_id=S1&epoch=OTHER&offset=0", ResumeOutcome.WRONG_EPOCH),
        ("session_id=NOPE&epoch=EPOCH&offset=0", ResumeOutcome.UNKNOWN_SESSION),
        ("session_id=S1&epoch=EPOCH&offset=9", ResumeOutcome.FUTURE_OFFSET),
        ("session_id=S1&epoch=EPOCH&offset=%C2%B2", ResumeOutcome.FUTURE_OFFSET),  # "²"
        ("session_id=S1&epoch=EPOCH&offset=-1", ResumeOutcome.FUTURE_OFFSET),
        ("session_id=S1&epoch=EPOCH&offset=01", ResumeOutcome.FUTURE_OFFSET),
        ("session_id=S1&epoch=EPOCH", ResumeOutcome.FUTURE_OFFSET),
    ],
)
def test_a_refused_resume_gets_a_fresh_session_and_says_why(
    resume: str, outcome: ResumeOutcome
) -> None:
    sessions = store()
    first, _ = v2(sessions)
    assert first.delivery is not None
    sessions.disconnected(first.delivery, 2000)
    _, actions = v2(sessions, f"client_id=c1&version=2&{resume}", sid="S2")
    [hello] = texts(actions)
    fields = json.loads(hello)
    assert (fields["resumed"], fields["session_id"], fields["resume_outcome"]) == (
        False,
        "S2",
        outcome.value,
    )


# ---- what a v2 client sends ------------------------------------------------------------------


def test_a_v2_message_is_delivered_without_its_id_and_with_it_as_msg_id_and_reply_to() -> None:
    session, _ = v2(store())
    action = deliver(session, '{"id":1,"type":"chat","text":"hi"}')
    assert action == Deliver({"type": "chat", "text": "hi"}, msg_id=1, reply_to=1)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('{"type":"chat"}', "None"),
        ('{"type":"chat","id":"1"}', "'1'"),
        ('{"type":"chat","id":true}', "True"),
        ('{"type":"chat","id":0}', "0"),
        ('{"type":"chat","id":1.5}', "1.5"),
    ],
)
def test_a_v2_message_without_an_integer_id_of_at_least_1_is_an_error_and_dropped(
    text: str, shown: str
) -> None:
    session, _ = v2(store())
    problem = f"protocol v2: a 'chat' message needs an integer 'id' >= 1, got {shown}"
    assert texts(session.receive_text(text, now=1.0, wall=WALL)) == [error(problem)]


def test_an_error_quoting_a_huge_id_is_cut() -> None:
    session, _ = v2(store())
    [text] = texts(session.receive_text('{"type":"c","id":-' + "9" * 4000 + "}", now=1, wall=WALL))
    message = json.loads(text)["message"]
    assert len(message) == 200
    assert message.endswith("…")


def test_control_messages_of_a_v2_client_need_no_id() -> None:
    session, _ = v2(store())
    [pong] = texts(session.receive_text('{"type":"ping"}', now=1.0, wall=WALL))
    assert json.loads(pong)["type"] == "pong"
    assert session.receive_text('{"type":"pong"}', now=1.0, wall=WALL) == []


def test_a_client_ack_trims_the_history_and_answers_nothing() -> None:
    session, _ = v2(store())
    assert session.delivery is not None
    for n in range(3):
        session.delivery.publish(f'{{"type":"m","n":{n}}}')
    assert session.receive_text('{"type":"ack","offset":2}', now=1.0, wall=WALL) == []
    assert [offset for offset, _ in session.delivery.history] == [3]
    assert session.receive_text('{"type":"ack","offset":0}', now=1.0, wall=WALL) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"type":"ack"}', "protocol v2: an ack needs an integer 'offset' >= 0, got None"),
        (
            '{"type":"ack","offset":-1}',
            "protocol v2: an ack needs an integer 'offset' >= 0, got -1",
        ),
        (
            '{"type":"ack","offset":false}',
            "protocol v2: an ack needs an integer 'offset' >= 0, got False",
        ),
        (
            '{"type":"ack","offset":"1"}',
            "protocol v2: an ack needs an integer 'offset' >= 0, got '1'",
        ),
        (
            '{"type":"ack","offset":1}',
            "protocol v2: ack of offset 1, but the last offset sent is 0",
        ),
    ],
)
def test_a_bad_client_ack_is_an_error(text: str, problem: str) -> None:
    session, _ = v2(store())
    assert texts(session.receive_text(text, now=1.0, wall=WALL)) == [error(problem)]


def test_in_v1_an_ack_is_an_application_message() -> None:
    session, _ = v2(store(), "client_id=c1")
    assert deliver(session, '{"type":"ack","offset":7}') == Deliver({"type": "ack", "offset": 7})


# ---- v1 requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reply_to"),
    [
        ('{"type":"q","id":7}', 7),
        ('{"type":"q","id":-3}', -3),
        ('{"type":"q","id":true}', None),
        ('{"type":"q","id":"7"}', None),
        ('{"type":"q"}', None),
    ],
)
def test_a_v1_message_with_an_integer_id_is_a_request_and_keeps_its_id(
    text: str, reply_to: int | None
) -> None:
    session, _ = v2(store(), "client_id=c1")
    action = deliver(session, text)
    assert action.message == json.loads(text)
    assert (action.msg_id, action.reply_to) == (None, reply_to)


def test_v1_replies_answer_requests_only_and_null_too() -> None:
    session, _ = v2(store(), "client_id=c1")
    request = Deliver({"type": "q", "id": 7}, reply_to=7)
    assert session.reply(Deliver({"type": "q"}), 5, wall=WALL) is None
    assert session.reply(request, None, wall=WALL) == (
        f'{{"type":"reply","id":7,"result":null,"timestamp":"{STAMP}"}}'
    )
    assert session.reply(request, {"a": [1]}, wall=WALL) == (
        f'{{"type":"reply","id":7,"result":{{"a":[1]}},"timestamp":"{STAMP}"}}'
    )
    assert session.reply_error(Deliver({"type": "q"}), "boom", wall=WALL) is None
    assert session.reply_error(request, "ValueError: boom", wall=WALL) == (
        '{"type":"reply","id":7,"error":{"error_code":"HANDLER_ERROR",'
        f'"message":"ValueError: boom"}},"timestamp":"{STAMP}"}}'
    )


def test_a_v2_reply_is_sent_only_for_a_value() -> None:
    session, _ = v2(store())
    action = Deliver({"type": "q"}, msg_id=3, reply_to=3)
    assert session.reply(action, None, wall=WALL) is None
    assert session.reply(action, 0, wall=WALL) == (
        f'{{"type":"reply","id":3,"result":0,"timestamp":"{STAMP}"}}'
    )


def test_a_result_json_cannot_encode_raises_for_the_runtime_to_answer_with_an_error() -> None:
    session, _ = v2(store())
    action = Deliver({"type": "q"}, msg_id=3, reply_to=3)
    with pytest.raises(TypeError):
        session.reply(action, {1, 2}, wall=WALL)
    with pytest.raises(ValueError, match="Out of range"):
        session.reply(action, float("nan"), wall=WALL)


def test_a_long_error_message_is_cut() -> None:
    session, _ = v2(store())
    reply = session.reply_error(Deliver({"type": "q"}, reply_to=1), "x" * 5000, wall=WALL)
    assert reply is not None
    message = json.loads(reply)["error"]["message"]
    assert len(message) == MAX_REPLY_ERROR_CHARS
    assert message.endswith("…")


# ---- ids, acks and the ack timer ---------------------------------------------------------------


def ack(n: int) -> str:
    return f'{{"type":"ack","id":{n},"timestamp":"{TS}"}}'


def test_each_id_is_handled_once_in_order_with_batched_acks() -> None:
    session, _ = v2(store(ack_every=2))
    one, two = (Deliver({"type": "m"}, msg_id=n, reply_to=n) for n in (1, 2))
    assert session.check_id(one, wall=WALL) == (Inbound.DELIVER, None)
    assert session.check_id(two, wall=WALL) == (Inbound.BUSY, None)  # 1 still runs
    assert session.handled(one, wall=WALL) is None  # batched
    assert session.ack_timer_wanted
    session.ack_timer_armed(True)
    assert not session.ack_timer_wanted
    assert session.check_id(two, wall=WALL) == (Inbound.DELIVER, None)
    assert session.handled(two, wall=WALL) == SendText(ack(2))
    assert session.check_id(one, wall=WALL) == (Inbound.DUPLICATE, SendText(ack(2)))
    assert session.ack_due(wall=WALL) is None


def test_the_ack_timer_acknowledges_what_is_owed() -> None:
    session, _ = v2(store(ack_every=5))
    one = Deliver({"type": "m"}, msg_id=1, reply_to=1)
    session.check_id(one, wall=WALL)
    session.handled(one, wall=WALL)
    session.ack_timer_armed(True)
    assert session.ack_due(wall=WALL) == SendText(ack(1))
    session.ack_timer_armed(False)
    assert not session.ack_timer_wanted


def test_a_gap_is_an_error_naming_the_expected_id() -> None:
    session, _ = v2(store())
    verdict, answer = session.check_id(Deliver({"type": "m"}, msg_id=4, reply_to=4), wall=WALL)
    assert verdict is Inbound.GAP
    assert answer == SendText(error("protocol v2: id 4 skips ids (expected 1); dropped"))


def test_an_interrupted_handler_leaves_its_id_unhandled() -> None:
    session, _ = v2(store())
    one = Deliver({"type": "m"}, msg_id=1, reply_to=1)
    session.check_id(one, wall=WALL)
    session.interrupted(one)
    assert session.check_id(one, wall=WALL) == (Inbound.DELIVER, None)


def test_v1_messages_skip_the_id_rules() -> None:
    session, _ = v2(store(), "client_id=c1")
    action = Deliver({"type": "m", "id": 1}, reply_to=1)
    assert session.check_id(action, wall=WALL) == (Inbound.DELIVER, None)
    assert session.handled(action, wall=WALL) is None
    session.interrupted(action)
    session.ack_timer_armed(True)
    assert not session.ack_timer_wanted
    assert session.ack_due(wall=WALL) is None


# ---- closes and the outbox ---------------------------------------------------------------------


def test_the_v2_closes_are_sendable_and_fit_a_close_frame() -> None:
    assert (SESSION_RESUMED_ELSEWHERE.code, SESSION_RESUMED_ELSEWHERE.reason) == (
        1000,
        "Session resumed elsewhere",
    )
    assert OUTBOX_OVERFLOW.code == 1013
    for close in (SESSION_RESUMED_ELSEWHERE, OUTBOX_OVERFLOW):
        assert is_sendable_close_code(close.code)
        assert len(close.reason.encode()) <= 123


def test_put_queues_past_the_limit_but_not_once_sealed() -> None:
    box = Outbox(4)
    assert box.put("12345")
    assert box.put("678")
    assert not box.offer("9")  # offer still keeps the limit
    assert (len(box), box.queued_bytes, box.refused) == (2, 8, 1)
    assert [box.take(), box.take(), box.take()] == ["12345", "678", None]
    box.seal()
    assert not box.put("x")
    assert box.refused == 1


# ---- the store's expiry timer ------------------------------------------------------------------


def test_next_expiry_is_the_earliest_disconnect_plus_the_window() -> None:
    sessions = store(window_ms=100)
    assert sessions.next_expiry() is None
    a, _ = v2(sessions, "client_id=a&version=2", sid="A")
    b, _ = v2(sessions, "client_id=b&version=2", sid="B")
    assert sessions.next_expiry() is None  # both connected
    assert a.delivery is not None
    assert b.delivery is not None
    sessions.disconnected(b.delivery, 50)
    sessions.disconnected(a.delivery, 70)
    assert sessions.next_expiry() == 150
