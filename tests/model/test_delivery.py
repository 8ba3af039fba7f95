"""Protocol v2's delivery rules (``model/delivery.py``), one behaviour per test, written from
the protocol text (``docs/protocol.md``, "Protocol v2") rather than from the code."""

from __future__ import annotations

import json

import pytest

from steadysocket.model.delivery import (
    AckBatch,
    ClientDelivery,
    DeliveryConfig,
    Inbound,
    ResumeOutcome,
    ServerSession,
    SessionStore,
    check_application_message,
    number,
)


def outcome_of(client: ClientDelivery) -> ResumeOutcome | None:
    """A call, so that mypy does not keep an earlier assert's narrowing."""
    return client.last_outcome


def texts(n: int) -> list[str]:
    return [json.dumps({"type": "t", "n": i}, separators=(",", ":")) for i in range(1, n + 1)]


# -- configuration and helpers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("window_ms", -1.0), ("history_limit", 0), ("ack_every", 0), ("ack_interval_ms", -0.5)],
)
def test_delivery_config_refuses_values_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DeliveryConfig(**{field: value})  # type: ignore[arg-type]


def test_delivery_config_defaults_are_the_documented_ones() -> None:
    config = DeliveryConfig()
    assert (config.window_ms, config.history_limit) == (120_000.0, 1000)


def test_number_puts_the_field_first_without_re_encoding() -> None:
    assert number('{"type":"t"}', "id", 7) == '{"id":7,"type":"t"}'
    assert number("{}", "offset", 1) == '{"offset":1}'


def test_application_messages_may_not_carry_id_or_offset() -> None:
    check_application_message({"type": "t", "text": "fine"})
    with pytest.raises(ValueError, match="id, offset"):
        check_application_message({"type": "t", "id": 1, "offset": 2})


def test_acks_are_batched_by_count_and_by_timer() -> None:
    batch = AckBatch(every=3)
    assert batch.note(1) is None
    assert batch.timer_wanted
    batch.timer_armed = True
    assert not batch.timer_wanted
    assert batch.note(2) is None
    assert batch.note(3) == 3  # the third message acks at once, cumulatively
    assert not batch.timer_wanted
    assert batch.due() is None  # nothing owed when the timer fires late
    batch.note(4)
    assert batch.due() == 4
    batch.reset()
    assert (batch.last, batch.acked, batch.timer_wanted) == (0, 0, False)


# -- client -> server -------------------------------------------------------------------------


def test_the_client_numbers_messages_from_one_and_keeps_them_until_acked() -> None:
    client = ClientDelivery(outbox_limit=3)
    sent = [client.accept(t) for t in texts(3)]
    assert [p.id for p in sent] == [1, 2, 3]
    assert json.loads(sent[0].text) == {"id": 1, "type": "t", "n": 1}
    assert client.full
    assert [p.id for p in client.to_write()] == [1, 2, 3]
    assert list(client.to_write()) == []  # each is written once per connection
    assert [p.id for p in client.acked(2)] == [1, 2]
    assert [p.id for p in client.outbox] == [3]
    assert not client.full


def test_after_a_resume_every_unacked_message_is_written_again_with_its_id() -> None:
    client = ClientDelivery()
    assert client.resume_query() == {}
    assert client.opened("s1", "e1", resumed=False) == []
    assert client.last_outcome is ResumeOutcome.NEW
    for text in texts(3):
        client.accept(text)
    list(client.to_write())
    client.acked(1)
    client.received(1)
    client.closed()
    assert client.resume_query() == {"session_id": "s1", "epoch": "e1", "offset": "1"}
    assert client.opened("s1", "e1", resumed=True, replayed=4) == []
    assert outcome_of(client) is ResumeOutcome.RESUMED
    assert client.resent == 2
    assert client.replayed == 4
    assert [p.id for p in client.to_write()] == [2, 3]


def test_a_refused_resume_hands_back_what_was_written_and_renumbers_the_rest() -> None:
    client = ClientDelivery()
    client.opened("s1", "e1", resumed=False)
    first, second = texts(2)
    client.accept(first)
    list(client.to_write())  # #1 written, never acked: the old session may have handled it
    client.closed()
    client.accept(second)  # accepted during the outage, never written anywhere
    client.received(1)
    lost = client.opened("s2", "e2", resumed=False)
    assert [json.loads(p.text)["n"] for p in lost] == [1]
    assert client.last_outcome is ResumeOutcome.UNKNOWN_SESSION
    assert [(p.id, json.loads(p.text)["n"]) for p in client.outbox] == [(1, 2)]
    assert client.renumbered == {2: 1}
    assert client.last_offset == 0
    assert client.resume_query()["session_id"] == "s2"


def test_a_refused_resume_keeps_the_reason_the_server_gave() -> None:
    client = ClientDelivery()
    client.opened("s1", "e1", resumed=False)
    client.opened("s2", "e2", resumed=False, outcome=ResumeOutcome.WRONG_EPOCH)
    assert outcome_of(client) is ResumeOutcome.WRONG_EPOCH
    # A server claiming "resumed" for a session it did not resume is not believed.
    client.opened("s3", "e3", resumed=False, outcome=ResumeOutcome.RESUMED)
    assert client.last_outcome is ResumeOutcome.UNKNOWN_SESSION
    assert client.renumbered == {}


def test_abandon_ends_the_session_and_returns_what_is_unacknowledged() -> None:
    client = ClientDelivery()
    client.opened("s1", "e1", resumed=False)
    for text in texts(2):
        client.accept(text)
    assert [p.id for p in client.abandon()] == [1, 2]
    assert client.resume_query() == {}
    assert client.next_id == 1


def test_the_client_delivers_offsets_in_order_drops_duplicates_and_refuses_gaps() -> None:
    client = ClientDelivery(DeliveryConfig(ack_every=2))
    assert client.received(1) == (Inbound.DELIVER, None)
    assert client.received(2) == (Inbound.DELIVER, 2)  # the second acks the batch
    assert client.received(2) == (Inbound.DUPLICATE, 2)  # acked again, not delivered
    assert client.duplicates_dropped == 1
    assert client.received(4) == (Inbound.GAP, None)
    assert client.last_offset == 2


# -- the server's session ---------------------------------------------------------------------


def session(**config: float) -> ServerSession:
    return ServerSession("s1", "c", "frontend", DeliveryConfig(**config))  # type: ignore[arg-type]


def test_the_server_runs_each_id_once_in_order_and_acks_after_the_handler() -> None:
    s = session(ack_every=1)
    assert s.inbound(1) == (Inbound.DELIVER, None)  # no ack before the handler returned
    assert s.handled(1) == 1
    assert s.inbound(1) == (Inbound.DUPLICATE, 1)  # a re-send: dropped, acked again
    assert s.inbound(3) == (Inbound.GAP, None)
    assert s.last_handled == 1


def test_an_id_whose_handler_still_runs_waits_and_an_interrupted_one_runs_again() -> None:
    s = session()
    assert s.inbound(1) == (Inbound.DELIVER, None)
    assert s.inbound(1) == (Inbound.BUSY, None)  # the same id from a newer connection
    assert s.inbound(2) == (Inbound.BUSY, None)  # or the next: one handler at a time
    s.interrupted(2)  # not the running one: nothing changes
    assert s.handling == 1
    s.interrupted(1)
    assert s.inbound(1) == (Inbound.DELIVER, None)
    assert s.handled(1) is None  # batched (ack_every 32 by default)
    assert s.ids.timer_wanted


def test_published_messages_carry_offsets_and_stay_until_the_client_acks() -> None:
    s = session(history_limit=10)
    numbered = [s.publish(t) for t in texts(3)]
    assert [json.loads(t)["offset"] for t in numbered] == [1, 2, 3]
    assert s.client_acked(2)
    assert [o for o, _ in s.history] == [3]
    assert not s.client_acked(4)  # never sent: a protocol error


def test_replay_resumes_from_any_offset_still_in_the_history() -> None:
    s = session(history_limit=2)
    for text in texts(3):
        s.publish(text)
    # The history kept offsets 2 and 3; offset 1 was trimmed unacknowledged.
    assert s.replay_from(0) is ResumeOutcome.TRIMMED
    assert s.replay_from(1) is ResumeOutcome.RESUMED
    assert s.replay_from(3) is ResumeOutcome.RESUMED
    assert s.replay_from(4) is ResumeOutcome.FUTURE_OFFSET
    assert [json.loads(t)["offset"] for t in s.replay(1)] == [2, 3]


# -- the store --------------------------------------------------------------------------------


def store(**config: float) -> SessionStore:
    return SessionStore("e1", DeliveryConfig(**config))  # type: ignore[arg-type]


def test_a_first_connection_gets_a_new_session() -> None:
    st = store()
    opened = st.open("c", "frontend", {}, 0.0, "s1")
    assert (opened.outcome, opened.resumed, opened.replay) == (ResumeOutcome.NEW, False, ())
    assert opened.session.connected


def test_a_resume_within_the_window_replays_what_the_client_missed() -> None:
    st = store(window_ms=1_000)
    s1 = st.open("c", "frontend", {}, 0.0, "s1").session
    s1.publish(texts(1)[0])
    st.disconnected(s1, 100.0)
    s1.publish(texts(2)[1])  # sent while the client was away: kept for it
    resume = {"session_id": "s1", "epoch": "e1", "offset": "1"}
    opened = st.open("c", "frontend", resume, 900.0, "unused")
    assert opened.resumed
    assert [json.loads(t)["n"] for t in opened.replay] == [2]
    assert opened.session is s1
    assert s1.connected


@pytest.mark.parametrize(
    ("resume", "client", "outcome"),
    [
        ({"session_id": "s1", "epoch": "e0", "offset": "0"}, "c", ResumeOutcome.WRONG_EPOCH),
        (
            {"session_id": "forged", "epoch": "e1", "offset": "0"},
            "c",
            ResumeOutcome.UNKNOWN_SESSION,
        ),
        (
            {"session_id": "s1", "epoch": "e1", "offset": "0"},
            "other",
            ResumeOutcome.FOREIGN_SESSION,
        ),
        ({"session_id": "s1", "epoch": "e1", "offset": "9"}, "c", ResumeOutcome.FUTURE_OFFSET),
        ({"session_id": "s1", "epoch": "e1", "offset": "-1"}, "c", ResumeOutcome.FUTURE_OFFSET),
        ({"session_id": "s1", "epoch": "e1", "offset": "01"}, "c", ResumeOutcome.FUTURE_OFFSET),
        ({"session_id": "s1", "epoch": "e1", "offset": "9" * 19}, "c", ResumeOutcome.FUTURE_OFFSET),
        ({"session_id": "s1", "epoch": "e1"}, "c", ResumeOutcome.FUTURE_OFFSET),
    ],
)
def test_an_impossible_resume_gets_a_fresh_session_never_another_history(
    resume: dict[str, str], client: str, outcome: ResumeOutcome
) -> None:
    st = store()
    s1 = st.open("c", "frontend", {}, 0.0, "s1").session
    s1.publish(texts(1)[0])
    st.disconnected(s1, 0.0)
    opened = st.open(client, "frontend", resume, 10.0, "s2")
    assert opened.outcome is outcome
    assert not opened.resumed
    assert opened.session.session_id == "s2"
    assert opened.replay == ()
    assert (opened.session.client_id, opened.session.next_offset) == (client, 1)


def test_a_session_expires_after_the_window_and_a_new_one_supersedes_the_old() -> None:
    st = store(window_ms=1_000)
    s1 = st.open("c", "frontend", {}, 0.0, "s1").session
    st.disconnected(s1, 0.0)
    assert st.expire(999.0) == []
    assert [s.session_id for s in st.expire(1_001.0)] == ["s1"]
    resume = {"session_id": "s1", "epoch": "e1", "offset": "0"}
    assert st.open("c", "frontend", resume, 1_002.0, "s2").outcome is ResumeOutcome.UNKNOWN_SESSION
    st.open("c", "frontend", {}, 1_003.0, "s3")
    assert [s.session_id for s in st.of_client("c")] == ["s3"]  # one session per client id


# -- bounds, batching and bookkeeping at their edges ------------------------------------------


def test_the_batching_defaults_are_32_messages_or_50_ms() -> None:
    config = DeliveryConfig()
    assert (config.ack_every, config.ack_interval_ms) == (32, 50.0)


def test_the_edges_of_a_valid_delivery_config_are_accepted_and_it_is_frozen() -> None:
    config = DeliveryConfig(window_ms=0, history_limit=1, ack_every=1, ack_interval_ms=0)
    assert config.history_limit == 1
    with pytest.raises(AttributeError):
        config.window_ms = 5  # type: ignore[misc]


def test_an_ack_sent_or_due_disarms_the_timer() -> None:
    for settle in ("flush", "due", "reset"):
        batch = AckBatch(every=10)
        batch.note(1)
        batch.timer_armed = True
        getattr(batch, settle)()
        batch.note(2)
        assert batch.timer_wanted, settle


def test_acked_messages_leave_the_written_count_too() -> None:
    client = ClientDelivery()
    for text in texts(3):
        client.accept(text)
    assert [p.id for p in client.to_write()] == [1, 2, 3]
    client.acked(2)
    assert client.written == 1
    client.accept(texts(4)[3])
    assert [p.id for p in client.to_write()] == [4]  # 3 stays written, 4 is new


def test_a_resume_needs_both_the_session_and_its_epoch() -> None:
    client = ClientDelivery(session_id="s1")
    assert client.resume_query() == {}


def test_a_new_connection_or_session_writes_the_outbox_from_the_start() -> None:
    client = ClientDelivery()
    client.opened("s1", "e1", resumed=False)
    client.accept(texts(1)[0])
    list(client.to_write())
    client.closed()
    assert client.written == 0
    list(client.to_write())
    assert client.opened("s1", "e1", resumed=True) == []
    assert client.written == 0
    list(client.to_write())
    client.abandon()
    assert (client.written, client.ever_written) == (0, 0)


def test_a_disconnected_session_is_not_connected_and_expires_just_after_the_window() -> None:
    st = SessionStore("e1", DeliveryConfig(window_ms=1_000))
    s1 = st.open("c", "frontend", {}, 0.0, "s1").session
    st.disconnected(s1, 500.0)
    assert not s1.connected
    assert st.expire(1_500.0) == []  # exactly the window: still resumable
    assert st.expire(1_501.0) == [s1]


def test_opening_expires_what_the_window_left_behind() -> None:
    st = SessionStore("e1", DeliveryConfig(window_ms=1_000))
    s1 = st.open("c", "frontend", {}, 0.0, "s1").session
    st.disconnected(s1, 0.0)
    st.open("other", "frontend", {}, 2_000.0, "s2")  # no expire() call in between
    assert "s1" not in st.sessions


def test_an_offset_with_thousands_of_digits_is_refused_without_parsing_it() -> None:
    st = SessionStore("e1")
    s1 = st.open("c", "frontend", {}, 0.0, "s1").session
    st.disconnected(s1, 0.0)
    resume = {"session_id": "s1", "epoch": "e1", "offset": "9" * 5_000}
    assert st.open("c", "frontend", resume, 1.0, "s2").outcome is ResumeOutcome.FUTURE_OFFSET


def test_an_ack_timer_that_fires_with_nothing_owed_is_disarmed() -> None:
    batch = AckBatch(every=10)
    batch.timer_armed = True
    assert batch.due() is None
    assert not batch.timer_armed


def test_values_handed_around_are_frozen_and_the_defaults_documented() -> None:
    pending = ClientDelivery().accept(texts(1)[0])
    with pytest.raises(AttributeError):
        pending.id = 9  # type: ignore[misc]
    opened = SessionStore("e1").open("c", "frontend", {}, 0.0, "s1")
    with pytest.raises(AttributeError):
        opened.replay = ()  # type: ignore[misc]
    assert ClientDelivery().outbox_limit == 1000
    assert not ServerSession("s", "c", "frontend").connected


def test_messages_accepted_before_the_first_hello_are_kept_for_the_first_session() -> None:
    client = ClientDelivery()
    client.accept(texts(1)[0])
    assert client.opened("s1", "e1", resumed=False) == []
    assert [p.id for p in client.outbox] == [1]


def test_acking_everything_written_leaves_nothing_counted_as_written() -> None:
    client = ClientDelivery()
    for text in texts(2):
        client.accept(text)
    list(client.to_write())
    client.acked(2)
    assert client.written == 0


def test_the_store_expires_the_oldest_disconnects_first_and_finds_a_client_at_once() -> None:
    st = store(window_ms=1_000)
    sessions = [st.open(f"c{n}", "frontend", {}, 0.0, f"s{n}").session for n in range(4)]
    for n, session in enumerate(sessions[:3]):
        st.disconnected(session, 100.0 * n)  # c0 at 0, c1 at 100, c2 at 200
    assert st.next_expiry() == 1_000.0
    assert st.of_client("c1") == [sessions[1]]
    assert st.of_client("nobody") == []
    # c0 comes back: it leaves the queue of disconnected sessions.
    st.open("c0", "frontend", {"session_id": "s0", "epoch": "e1", "offset": "0"}, 500.0, "x")
    assert st.next_expiry() == 1_100.0
    assert [s.session_id for s in st.expire(1_150.0)] == ["s1"]
    assert [s.session_id for s in st.expire(5_000.0)] == ["s2"]  # every disconnected one
    assert st.next_expiry() is None
    assert sorted(st.sessions) == ["s0", "s3"]
    # A session the store no longer holds (superseded) is not queued for expiry.
    st.open("c3", "frontend", {}, 5_000.0, "s3b")
    st.disconnected(sessions[3], 5_000.0)
    assert st.next_expiry() is None


def test_the_store_rebuilds_its_indexes_when_its_sessions_are_replaced() -> None:
    st = store(window_ms=1_000)
    first = st.open("c1", "frontend", {}, 0.0, "s1").session
    st.disconnected(first, 10.0)
    twin = store(window_ms=1_000)
    twin.sessions = dict(st.sessions)  # as the explorer copies a world
    assert twin.of_client("c1") == [first]
    assert twin.next_expiry() == 1_010.0
    # A session marked connected behind the store's back is skipped, then forgotten.
    first.disconnected_at = None
    assert twin.next_expiry() is None
    assert twin.expire(10_000.0) == []
