"""Shared v2 sessions (``model/ledger.py``): write ahead, one owner, catch up; and what the shared
store adds to ``model/delivery.py`` (``SessionStore.adopt``/``discard``) and to
``model/server_session.py`` (``fail_handshake(close)``, ``resume_query``, the two 1013 closes).

Written from the module's rules and ``docs/protocol.md`` (v2 point 10). The last part is a
hypothesis machine that runs the rules end to end: three nodes share one client's session
through an in-memory store that treats writes and claims as ``runtime/redis_sessions.py``'s Lua
scripts do, and a publication stream; the client must get every publication meant for it exactly
once, in order, whichever node dies.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from steadysocket.model.delivery import (
    DeliveryConfig,
    Inbound,
    ResumeOutcome,
    ServerSession,
    SessionStore,
)
from steadysocket.model.ledger import (
    STREAM_START,
    CatchUp,
    Claim,
    Released,
    SessionRecord,
    Write,
    WriteAhead,
    Written,
    reaches,
    rooms_field,
    stream_after,
    stream_position,
)
from steadysocket.model.routing import Publication, Target
from steadysocket.model.server_session import (
    SESSION_LOST,
    SESSION_STORE_UNAVAILABLE,
    Close,
    ServerConfig,
    SessionState,
)
from steadysocket.model.server_session import ServerSession as Connection


def text(n: int) -> str:
    """An encoded application message."""
    return f'{{"n":{n}}}'


def numbered(offset: int, n: int) -> str:
    """``text(n)`` as a session numbers it (``"offset"`` first)."""
    return f'{{"offset":{offset},"n":{n}}}'


def published(count: int, **config: int) -> ServerSession:
    """A session of client ``c1`` that published ``text(1)`` .. ``text(count)``."""
    session = ServerSession("S1", "c1", "frontend", DeliveryConfig(**config))
    for n in range(1, count + 1):
        session.publish(text(n))
    return session


def pub(target: Target, key: str, n: int, origin: str = "n1", seq: int = 1) -> Publication:
    return Publication(target, key, text(n), origin, seq)


# -- stream positions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry_id", "position"),
    [("0-0", (0, 0)), ("1-0", (1, 0)), ("1700000000000-12", (1_700_000_000_000, 12))],
)
def test_a_stream_entry_id_is_its_milliseconds_and_sequence(
    entry_id: str, position: tuple[int, int]
) -> None:
    assert stream_position(entry_id) == position


@pytest.mark.parametrize("entry_id", ["0", "a-1", "1-", "-1", "", "1-2-3", "1-٣", "²-0", " 1-0"])
def test_anything_else_is_not_a_stream_entry_id(entry_id: str) -> None:
    with pytest.raises(ValueError, match="not a stream entry id"):
        stream_position(entry_id)


@pytest.mark.parametrize(
    ("entry_id", "since", "after"),
    [
        ("2-0", "1-5", True),  # the milliseconds decide first
        ("1-5", "2-0", False),
        ("1-10", "1-9", True),  # numbers, not strings ("1-10" < "1-9" as text)
        ("10-0", "9-0", True),
        ("1-9", "1-10", False),
        ("3-4", "3-4", False),  # not after itself
        ("0-1", STREAM_START, True),
        (STREAM_START, STREAM_START, False),
    ],
)
def test_stream_after_orders_entries_as_the_stream_does(
    entry_id: str, since: str, after: bool
) -> None:
    assert stream_after(entry_id, since) is after


# -- who a publication is for, and the rooms field --------------------------------------------


@pytest.mark.parametrize(
    ("publication", "rooms", "expected"),
    [
        (pub(Target.ALL, "", 1), (), True),
        (pub(Target.CLIENT, "c1", 1), (), True),
        (pub(Target.CLIENT, "c2", 1), ("c2",), False),  # another client, whatever the rooms
        (pub(Target.CLIENT, "lobby", 1), ("lobby",), False),  # a client id, not a room
        (pub(Target.ROOM, "lobby", 1), ("attic", "lobby"), True),
        (pub(Target.ROOM, "attic", 1), ("lobby",), False),
        (pub(Target.ROOM, "c1", 1), (), False),  # a room named like the client: not a member
    ],
)
def test_reaches_the_session_of_its_client_or_of_a_member_of_its_room(
    publication: Publication, rooms: tuple[str, ...], expected: bool
) -> None:
    assert reaches(publication, "c1", rooms) is expected


def test_the_rooms_field_is_the_sorted_names_as_compact_json() -> None:
    assert rooms_field({"lobby", "attic", "été"}) == '["attic","lobby","été"]'
    assert rooms_field([]) == "[]"


# -- the session record -----------------------------------------------------------------------


FIELDS = {
    "client": "c1",
    "role": "frontend",
    "next": "6",
    "trimmed": "2",
    "handled": "4",
    "since": "17-3",
    "rooms": '["lobby","attic"]',
}
HISTORY = [(5, numbered(5, 5)), (3, numbered(3, 3)), (4, numbered(4, 4))]


def test_a_record_is_read_back_from_its_fields_and_history_oldest_first() -> None:
    record = SessionRecord.decode("S1", FIELDS, HISTORY)
    assert record == SessionRecord(
        session_id="S1",
        client_id="c1",
        role="frontend",
        next_offset=6,
        trimmed_upto=2,
        handled=4,
        since="17-3",
        rooms=("lobby", "attic"),
        history=((3, numbered(3, 3)), (4, numbered(4, 4)), (5, numbered(5, 5))),
    )


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"since": None, "rooms": None}, "session record without since, rooms"),
        ({"client": None}, "session record without client"),
        ({"next": "x"}, "next is not a count: 'x'"),
        ({"trimmed": "-1"}, "trimmed is not a count: '-1'"),
        ({"handled": ""}, "handled is not a count: ''"),
        ({"handled": "٣"}, "handled is not a count"),  # a digit int() would take, not ASCII
        ({"since": "17"}, "not a stream entry id: '17'"),
        ({"rooms": '{"lobby":1}'}, "rooms is not a list of names"),
        ({"rooms": '"lobby"'}, "rooms is not a list of names"),
        ({"rooms": '["lobby",1]'}, "rooms is not a list of names"),
        ({"next": "0", "trimmed": "0"}, "next is below 1: 0"),
    ],
)
def test_a_malformed_record_is_refused(changes: dict[str, str | None], match: str) -> None:
    fields = {**FIELDS, **changes}
    kept = {name: value for name, value in fields.items() if value is not None}
    with pytest.raises(ValueError, match=match):
        SessionRecord.decode("S1", kept, HISTORY)


def test_rooms_that_are_not_json_are_refused() -> None:
    with pytest.raises(ValueError, match="Expecting value"):  # json's own ValueError
        SessionRecord.decode("S1", {**FIELDS, "rooms": "lobby"}, HISTORY)


@pytest.mark.parametrize(
    "offset",
    [2, 6, 0],  # at or below trimmed (2), at or past next (6)
)
def test_a_history_offset_outside_trimmed_and_next_is_refused(offset: int) -> None:
    history = [*HISTORY, (offset, numbered(offset, offset))]
    with pytest.raises(ValueError, match="history holds an offset out of its range"):
        SessionRecord.decode("S1", FIELDS, history)


def test_a_record_with_nothing_sent_yet_is_valid() -> None:
    fields = {**FIELDS, "next": "1", "trimmed": "0", "handled": "0", "rooms": "[]"}
    record = SessionRecord.decode("S1", fields, [])
    assert (record.next_offset, record.trimmed_upto, record.rooms, record.history) == (1, 0, (), ())


def test_a_restored_session_carries_the_record_and_behaves_as_its_original() -> None:
    session = ServerSession("S1", "c1", "frontend")
    SessionRecord.decode("S1", FIELDS, HISTORY).restore(session)
    assert session.next_offset == 6
    assert session.trimmed_upto == 2
    assert list(session.history) == [(3, numbered(3, 3)), (4, numbered(4, 4)), (5, numbered(5, 5))]
    assert (session.last_handled, session.ids.acked) == (4, 4)  # nothing owed: all acked once
    assert not session.ids.timer_wanted
    # It resumes as the process that wrote it would have resumed it ...
    assert session.replay_from(1) is ResumeOutcome.TRIMMED
    assert session.replay_from(6) is ResumeOutcome.FUTURE_OFFSET
    assert session.replay_from(3) is ResumeOutcome.RESUMED
    assert session.replay(3) == [numbered(4, 4), numbered(5, 5)]
    # ... numbers the next message 6, and runs id 5 but not id 4 again.
    assert session.publish(text(6)) == numbered(6, 6)
    assert session.inbound(4) == (Inbound.DUPLICATE, 4)
    assert session.inbound(5) == (Inbound.DELIVER, None)


# -- 1. write ahead ---------------------------------------------------------------------------


def test_a_write_is_the_session_now_with_what_the_store_does_not_hold_yet() -> None:
    session = published(3)
    assert session.client_acked(1)
    session.inbound(1)
    session.handled(1)
    wal = WriteAhead(dirty=True)
    write = wal.write(session, owner="n1:7", since="9-0", rooms=["lobby", "attic"], ttl_ms=5000)
    assert write == Write(
        session_id="S1",
        client_id="c1",
        role="frontend",
        owner="n1:7",
        create=True,
        next_offset=4,
        trimmed_upto=0,
        handled=1,
        floor=1,  # the client acknowledged offset 1: the store may drop it
        since="9-0",
        rooms='["attic","lobby"]',
        entries=((2, numbered(2, 2)), (3, numbered(3, 3))),
        ttl_ms=5000,
    )
    assert not wal.dirty
    assert not wal.may_send(2)  # taken is not written


def test_the_create_flag_stays_until_the_first_write_is_confirmed() -> None:
    session = published(1)
    wal = WriteAhead()
    first = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    again = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert (first.create, again.create) == (True, True)  # nothing confirmed yet
    wal.confirmed(first, session)
    assert wal.created
    assert not wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1).create


def test_a_confirmed_write_releases_its_texts_in_order_and_none_published_after_it() -> None:
    session = published(2)
    wal = WriteAhead()
    first = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    session.publish(text(3))  # after the write was taken: not in it
    assert wal.confirmed(first, session) == Released((numbered(1, 1), numbered(2, 2)), None)
    assert (wal.may_send(1), wal.may_send(2), wal.may_send(3)) == (True, True, False)
    second = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert second.entries == ((3, numbered(3, 3)),)  # only what the store does not hold
    assert wal.confirmed(second, session) == Released((numbered(3, 3),), None)
    assert wal.may_send(3)
    third = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert third.entries == ()
    assert wal.confirmed(third, session) == Released((), None)  # nothing twice


def test_a_text_the_history_dropped_before_the_write_landed_is_not_released() -> None:
    session = published(3, history_limit=2)  # offset 1 trimmed: history 2, 3
    wal = WriteAhead()
    write = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert write.entries == ((2, numbered(2, 2)), (3, numbered(3, 3)))
    assert (write.trimmed_upto, write.floor) == (1, 1)
    session.publish(text(4))  # history 3, 4: offset 2 dropped while the write was out
    released = wal.confirmed(write, session)
    assert released.texts == (numbered(3, 3),)  # not 2 (dropped), not 4 (not written)
    assert wal.may_send(3)
    assert not wal.may_send(4)


def test_a_write_that_lands_after_a_newer_one_takes_nothing_back() -> None:
    session = published(1)
    wal = WriteAhead()
    older = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    session.publish(text(2))
    newer = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert wal.confirmed(newer, session).texts == (numbered(1, 1), numbered(2, 2))
    assert wal.confirmed(older, session) == Released((), None)
    assert wal.may_send(2)  # still: the store holds it


def test_an_id_is_acknowledged_once_a_write_holding_it_handled_lands() -> None:
    session = published(0)
    wal = WriteAhead()
    session.inbound(1)
    session.handled(1)
    older = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    session.inbound(2)
    session.handled(2)
    newer = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert wal.confirmed(newer, session).ack == 2
    assert wal.handled == 2
    assert wal.confirmed(older, session).ack is None  # it landed late: nothing new
    assert wal.handled == 2
    same = wal.write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert wal.confirmed(same, session).ack is None  # nothing handled since


def test_the_floor_is_what_the_client_acknowledged_or_what_was_trimmed() -> None:
    session = published(5)
    assert session.client_acked(2)
    wal = WriteAhead()
    assert wal.write(session, owner="o", since=STREAM_START, rooms=(), ttl_ms=1).floor == 2
    assert session.client_acked(5)  # nothing left unacknowledged: all of it may go
    assert wal.write(session, owner="o", since=STREAM_START, rooms=(), ttl_ms=1).floor == 5
    # A session that cannot be made whole is marked trimmed up to next (the runtime does so
    # when the stream was trimmed past its since): everything it ever sent may go.
    session.trimmed_upto = session.next_offset
    assert wal.write(session, owner="o", since=STREAM_START, rooms=(), ttl_ms=1).floor == 6


def test_a_session_restored_from_the_store_may_send_all_it_holds_and_nothing_else() -> None:
    record = SessionRecord.decode("S1", FIELDS, HISTORY)
    session = ServerSession("S1", "c1", "frontend")
    record.restore(session)
    wal = WriteAhead()
    assert not wal.may_send(1)  # a fresh write-ahead holds nothing
    wal.adopt(record)
    assert (wal.created, wal.written_upto, wal.handled) == (True, 5, 4)
    assert wal.may_send(5)
    assert not wal.may_send(6)
    session.publish(text(6))
    write = wal.write(session, owner="n2:1", since="17-3", rooms=(), ttl_ms=1)
    assert not write.create
    assert write.entries == ((6, numbered(6, 6)),)
    assert wal.confirmed(write, session) == Released((numbered(6, 6),), None)


def test_what_a_write_became_and_what_a_claim_answered_are_the_store_scripts_replies() -> None:
    # runtime/redis_sessions.py reads these from its Lua scripts' replies.
    assert [Written(-1), Written(0), Written(1)] == [Written.GONE, Written.FENCED, Written.LANDED]
    assert [Claim(v) for v in ("unknown", "foreign", "kept", "epoch", "moved")] == [
        Claim.UNKNOWN,
        Claim.FOREIGN,
        Claim.KEPT,
        Claim.STALE_EPOCH,
        Claim.MOVED,
    ]


# -- 3. catch up ------------------------------------------------------------------------------


def test_catch_up_skips_entries_at_or_before_since_and_moves_since_on() -> None:
    catch_up = CatchUp("c1", frozenset(), since="5-0")
    assert catch_up.offer("4-9", pub(Target.ALL, "", 1, seq=1)) is None
    assert catch_up.offer("5-0", pub(Target.ALL, "", 2, seq=2)) is None
    assert catch_up.since == "5-0"
    assert catch_up.seen == {}  # skipped entries are not remembered
    assert catch_up.offer("5-1", pub(Target.ALL, "", 3, seq=3)) == text(3)
    assert catch_up.since == "5-1"
    assert catch_up.offer("5-1", pub(Target.ALL, "", 4, seq=4)) is None  # the same entry again


def test_catch_up_offers_a_publication_written_twice_once() -> None:
    catch_up = CatchUp("c1", frozenset(), since=STREAM_START)
    assert catch_up.offer("1-0", pub(Target.ALL, "", 1, origin="n1", seq=1)) == text(1)
    assert catch_up.offer("2-0", pub(Target.ALL, "", 1, origin="n1", seq=1)) is None  # re-sent
    assert catch_up.since == "2-0"
    assert catch_up.offer("3-0", pub(Target.ALL, "", 7, origin="n2", seq=1)) == text(7)
    assert catch_up.offer("4-0", pub(Target.ALL, "", 2, origin="n1", seq=2)) == text(2)
    assert catch_up.seen == {"n1": 2, "n2": 1}


def test_catch_up_skips_what_is_not_for_the_client_but_still_moves_since_on() -> None:
    catch_up = CatchUp("c1", frozenset({"lobby"}), since=STREAM_START)
    assert catch_up.offer("1-0", pub(Target.CLIENT, "c2", 1, seq=1)) is None
    assert catch_up.since == "1-0"
    assert catch_up.offer("2-0", pub(Target.ROOM, "attic", 2, seq=2)) is None
    assert catch_up.since == "2-0"
    assert catch_up.offer("3-0", pub(Target.ROOM, "lobby", 3, seq=3)) == text(3)
    assert catch_up.offer("4-0", pub(Target.CLIENT, "c1", 4, seq=4)) == text(4)
    assert catch_up.offer("5-0", pub(Target.ALL, "", 5, seq=5)) == text(5)
    assert catch_up.since == "5-0"


def test_catch_up_then_the_readers_deliveries_offer_each_once_in_stream_order() -> None:
    # The stream read from since, then what the process's reader delivered meanwhile, which
    # overlaps it: the overlap is skipped, the rest follows in order.
    catch_up = CatchUp("c1", frozenset(), since="10-0")
    read = [("11-0", pub(Target.ALL, "", 11, "n1", 1)), ("12-0", pub(Target.ALL, "", 12, "n2", 1))]
    reader = [
        ("12-0", pub(Target.ALL, "", 12, "n2", 1)),
        ("13-0", pub(Target.ALL, "", 13, "n1", 2)),
        ("13-1", pub(Target.ALL, "", 14, "n2", 2)),
    ]
    offered = [catch_up.offer(entry_id, p) for entry_id, p in [*read, *reader]]
    assert offered == [text(11), text(12), None, text(13), text(14)]


# -- the process's sessions: adopt and discard (model/delivery.py) ----------------------------


def test_an_adopted_session_replaces_the_clients_session_here_disconnected() -> None:
    sessions = SessionStore("E1", DeliveryConfig(window_ms=1000))
    older = sessions.open("c1", "frontend", {}, 0.0, "S0").session
    sessions.disconnected(older, 0.0)
    moved = ServerSession("S1", "c1", "frontend", connected=True, disconnected_at=3.0)
    moved.publish(text(1))
    sessions.adopt(moved)
    assert sessions.sessions == {"S1": moved}
    assert sessions.of_client("c1") == [moved]
    assert (moved.connected, moved.disconnected_at) == (False, None)
    assert sessions.next_expiry() is None  # the replaced session's expiry went with it
    assert sessions.expire(1e9) == []
    resume = {"session_id": "S1", "epoch": "E1", "offset": "0"}
    opened = sessions.open("c1", "frontend", resume, 5.0, "unused")
    assert (opened.outcome, opened.session, opened.replay) == (
        ResumeOutcome.RESUMED,
        moved,
        (numbered(1, 1),),
    )


def test_an_adopted_session_replaces_whatever_this_process_held_under_its_id() -> None:
    sessions = SessionStore("E1")
    sessions.open("c2", "frontend", {}, 0.0, "S1")
    moved = ServerSession("S1", "c1", "frontend")
    sessions.adopt(moved)
    assert sessions.sessions == {"S1": moved}
    assert sessions.of_client("c2") == []
    assert sessions.of_client("c1") == [moved]


def test_discard_drops_the_stores_session_and_ignores_a_stale_copy() -> None:
    sessions = SessionStore("E1")
    stale = sessions.open("c1", "frontend", {}, 0.0, "S1").session
    sessions.disconnected(stale, 0.0)
    current = ServerSession("S1", "c1", "frontend")
    sessions.adopt(current)
    sessions.discard(stale)  # no longer the store's: nothing happens
    assert sessions.sessions == {"S1": current}
    assert sessions.of_client("c1") == [current]
    sessions.disconnected(current, 1.0)
    sessions.discard(current)
    assert sessions.sessions == {}
    assert sessions.of_client("c1") == []
    assert sessions.next_expiry() is None
    sessions.discard(current)  # twice: nothing
    assert sessions.sessions == {}


# -- the connection: refusals for the store, and the resume query (model/server_session.py) ---


CONFIG = ServerConfig(heartbeat_interval_ms=1000, connection_timeout_ms=3000)


def test_the_store_closes_are_1013_with_the_documented_reasons() -> None:
    assert Close(1013, "Session store unreachable: try again") == SESSION_STORE_UNAVAILABLE
    assert Close(1013, "Session lost by the store: resume to start again") == SESSION_LOST


def test_a_handshake_the_store_could_not_serve_closes_with_the_close_given() -> None:
    connection = Connection(CONFIG)
    assert connection.check("client_id=c1&version=2") == []
    assert connection.fail_handshake(SESSION_STORE_UNAVAILABLE) == [SESSION_STORE_UNAVAILABLE]
    assert connection.state is SessionState.CLOSED
    assert connection.fail_handshake(SESSION_STORE_UNAVAILABLE) == []  # closed once


def test_the_resume_query_is_what_the_checked_v2_query_gave() -> None:
    connection = Connection(CONFIG)
    assert connection.resume_query == {}  # not checked yet
    query = "client_id=c1&version=2&session_id=S1&epoch=E1&offset=3&extra=x"
    assert connection.check(query) == []
    assert connection.resume_query == {"session_id": "S1", "epoch": "E1", "offset": "3"}
    connection.resume_query["offset"] = "9"  # a copy: the checked query is unchanged
    assert connection.resume_query["offset"] == "3"
    fresh = Connection(CONFIG)
    assert fresh.check("client_id=c1&version=2&session_id=S1") == []
    assert fresh.resume_query == {"session_id": "S1"}  # only those it gave
    v1 = Connection(CONFIG)
    assert v1.check("client_id=c1&session_id=S1") == []
    assert v1.resume_query == {}


# -- the rules end to end ---------------------------------------------------------------------


CLIENT, ROLE, SID, EPOCH = "c1", "frontend", "S1", "E1"
ROOMS = ("lobby",)
NODES = 3
TARGETS = (
    # (target, key, whether it is for c1, a member of "lobby" and of nothing else)
    (Target.ALL, "", True),
    (Target.CLIENT, "c1", True),
    (Target.CLIENT, "c2", False),
    (Target.ROOM, "lobby", True),
    (Target.ROOM, "attic", False),
    (Target.ROOM, "c1", False),
)


@dataclass
class FakeStore:
    """The store's copy of session S1, written and claimed as runtime/redis_sessions.py's Lua
    scripts do: one owner, a write lands whole under it or is fenced. Their epoch, deadline and
    newest-session checks are left out: here the store never restarts, a claim is never late,
    and the client has one session."""

    owner: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    history: dict[int, str] = field(default_factory=dict)

    def write(self, write: Write) -> Written:
        assert write.session_id == SID
        if write.create and self.owner is None:
            self.owner = write.owner
            self.fields.update(client=write.client_id, role=write.role)
        if self.owner is None:
            return Written.GONE
        if self.owner != write.owner:
            return Written.FENCED
        self.fields.update(
            next=str(write.next_offset),
            trimmed=str(write.trimmed_upto),
            handled=str(write.handled),
            since=write.since,
            rooms=write.rooms,
        )
        self.history.update(write.entries)
        self.history = {o: t for o, t in self.history.items() if o > write.floor}
        return Written.LANDED

    def claim(
        self, client_id: str, role: str, owner: str, held: str
    ) -> tuple[Claim, SessionRecord | None]:
        if self.owner is None:
            return Claim.UNKNOWN, None
        if (self.fields["client"], self.fields["role"]) != (client_id, role):
            return Claim.FOREIGN, None
        if self.owner == held:
            return Claim.KEPT, None
        self.owner = owner
        return Claim.MOVED, SessionRecord.decode(SID, self.fields, sorted(self.history.items()))


def test_the_fake_store_refuses_what_the_scripts_refuse() -> None:
    store = FakeStore()
    session = published(1)
    write = WriteAhead().write(session, owner="n1:1", since=STREAM_START, rooms=(), ttl_ms=1)
    assert store.claim("c1", "frontend", "n2:1", "") == (Claim.UNKNOWN, None)
    assert store.write(replace(write, create=False)) is Written.GONE
    assert store.write(write) is Written.LANDED
    assert store.write(replace(write, owner="n9:9")) is Written.FENCED
    assert store.claim("c2", "frontend", "n2:1", "") == (Claim.FOREIGN, None)
    assert store.claim("c1", "backend", "n2:1", "") == (Claim.FOREIGN, None)
    assert store.claim("c1", "frontend", "n1:2", "n1:1") == (Claim.KEPT, None)
    assert store.claim("c1", "frontend", "n2:1", "n1:0")[0] is Claim.MOVED
    assert store.write(write) is Written.FENCED  # the old owner is fenced off


def test_a_session_written_to_a_store_and_read_back_is_the_same_session() -> None:
    original = published(5)
    assert original.client_acked(2)
    for msg_id in (1, 2, 3):
        original.inbound(msg_id)
        original.handled(msg_id)
    write = WriteAhead().write(
        original, owner="n1:1", since="40-2", rooms={"lobby", "attic"}, ttl_ms=1000
    )
    store = FakeStore()
    assert store.write(write) is Written.LANDED
    outcome, record = store.claim("c1", "frontend", "n2:1", "")
    assert outcome is Claim.MOVED
    assert record is not None
    assert (record.since, record.rooms) == ("40-2", ("attic", "lobby"))
    copy = ServerSession("S1", "c1", "frontend")
    record.restore(copy)
    assert (copy.next_offset, copy.trimmed_upto, copy.last_handled) == (6, 0, 3)
    assert list(copy.history) == [(3, numbered(3, 3)), (4, numbered(4, 4)), (5, numbered(5, 5))]


@dataclass
class Copy:
    """One node's copy of the session."""

    session: ServerSession
    wal: WriteAhead
    claim: str
    feed: CatchUp
    """Offers the copy the stream, once each and in order (``since``: how far it was offered)."""
    pending: Write | None = None
    """A write taken and not landed yet."""


@dataclass
class Node:
    """One server process: its sessions, its reader of the stream, its publications."""

    name: str
    sessions: SessionStore = field(default_factory=lambda: SessionStore(EPOCH))
    read: int = 0
    """How many stream entries its reader delivered."""
    published: int = 0
    copy: Copy | None = None


@dataclass
class Client:
    """What the client saw and was told."""

    node: int | None = None
    """The node its connection is on (None: disconnected)."""
    was: int = 0
    """The node its last connection was on."""
    last: int = 0
    """Its last offset received."""
    got: list[int] = field(default_factory=list)
    """The publications (their number) it received, in order."""
    next_id: int = 1
    outbox: list[int] = field(default_factory=list)
    """The ids it sent and that were not acknowledged."""
    acked: int = 0


NODE = st.integers(0, NODES - 1)


def seen(what: str) -> None:
    """An event for ``--hypothesis-show-statistics`` (when hypothesis runs the machine)."""
    if currently_in_test_context():
        event(what)


class LedgerMachine(RuleBasedStateMachine):
    """Nodes share one client's session through ``FakeStore`` and a stream of publications.

    A node's copy of the session is offered the stream by the node's reader through a
    ``CatchUp`` (each publication once, in stream order), written by the node's writer, which
    takes a write and later lands it (``WriteAhead``), and replaced by the store's record when
    the client resumes on the node and the claim moves the session there. The client only ever
    gets what a landed write released, or the replay of a resume (what the store holds after
    its last offset).
    """

    def __init__(self) -> None:
        super().__init__()
        self.store = FakeStore()
        self.stream: list[tuple[str, Publication]] = []
        self.for_client: list[int] = []
        """The publications meant for the client (labelled by hand in TARGETS), in order."""
        self.nodes = [Node(f"n{i}") for i in range(NODES)]
        self.claims = 0
        self.client = Client()
        # The session opens on node 0 and is in the store before its hello goes out.
        node = self.nodes[0]
        opened = node.sessions.open(CLIENT, ROLE, {}, now_ms=0.0, new_session_id=SID)
        assert opened.outcome is ResumeOutcome.NEW
        feed = CatchUp(CLIENT, frozenset(ROOMS), STREAM_START)
        node.copy = Copy(opened.session, WriteAhead(), self.new_claim(node), feed)
        self.take_write(0)
        self.land_write(0)
        self.client.node = 0

    def new_claim(self, node: Node) -> str:
        self.claims += 1
        return f"{node.name}:{self.claims}"

    def unread(self) -> list[int]:
        """The nodes whose reader has entries left to read."""
        return [i for i, node in enumerate(self.nodes) if node.read < len(self.stream)]

    def holding(self) -> list[int]:
        """The nodes with a copy of the session (current or stale)."""
        return [i for i, node in enumerate(self.nodes) if node.copy is not None]

    # -- the rules (few, so that each comes often) --------------------------------------------

    @rule(node=NODE, to=st.sampled_from(TARGETS))
    def publish(self, node: int, to: tuple[Target, str, bool]) -> None:
        """A node publishes (broadcast, send_to or publish): one entry at the stream's end."""
        kind, key, for_client = to
        origin = self.nodes[node]
        origin.published += 1
        number = len(self.stream) + 1
        message = json.dumps({"p": number})
        publication = Publication(kind, key, message, origin.name, origin.published)
        self.stream.append((f"{number}-0", publication))
        if for_client:
            self.for_client.append(number)

    @precondition(lambda self: self.unread())
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        self.read_next(data.draw(st.sampled_from(self.unread()), label="node"))

    @precondition(lambda self: self.holding())
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        """A node's writer takes a write, or the store carries out the one it took."""
        node = data.draw(st.sampled_from(self.holding()), label="node")
        copy = self.nodes[node].copy
        assert copy is not None
        if copy.pending is None:
            self.take_write(node)
        else:
            self.land_write(node)

    def owner(self) -> int | None:
        """The node whose copy is the store's (None: that node died)."""
        for i, node in enumerate(self.nodes):
            if node.copy is not None and node.copy.claim == self.store.owner:
                return i
        return None

    @precondition(lambda self: self.owner() is not None)
    @rule()
    def kill(self) -> None:
        """The owner's process dies."""
        owner = self.owner()
        assert owner is not None
        self.kill_node(owner)

    @precondition(lambda self: self.client.node is not None)
    @rule(does=st.sampled_from(("send", "ack", "disconnect", "reconnect")))
    def client_does(self, does: str) -> None:
        """The client sends a message, acknowledges what it received, or loses its connection
        (and resumes on the same node at once, when it reconnects)."""
        node = self.client.node
        assert node is not None
        holder = self.nodes[node]
        assert holder.copy is not None  # the node its connection is on serves the session
        if does == "send":
            msg_id = self.client.next_id
            self.client.next_id += 1
            self.client.outbox.append(msg_id)
            self.handle(node, msg_id)
        elif does == "ack":
            assert holder.copy.session.client_acked(self.client.last)
        else:
            holder.sessions.disconnected(holder.copy.session, 0.0)
            self.client.node = None
            if does == "reconnect":
                self.resume(node)

    @precondition(lambda self: self.client.node is None)
    @rule(node=NODE)
    def resume(self, node: int) -> None:
        """The client resumes on ``node``: a claim, then (moved) the store's record replaces any
        copy there and catches up on the stream from its since."""
        holder = self.nodes[node]
        local = holder.copy
        claim = self.new_claim(holder)
        held = "" if local is None else local.claim
        outcome, record = self.store.claim(CLIENT, ROLE, claim, held)
        seen(f"claim {outcome.value}" + ("" if local is None else " (a copy here)"))
        if outcome is Claim.MOVED:
            assert record is not None
            session = ServerSession(record.session_id, record.client_id, record.role)
            record.restore(session)
            wal = WriteAhead()
            wal.adopt(record)
            feed = CatchUp(record.client_id, frozenset(record.rooms), record.since)
            holder.sessions.adopt(session)
            holder.copy = local = Copy(session, wal, claim, feed)
        else:
            assert outcome is Claim.KEPT, outcome  # the store never loses the session here
            assert local is not None
        query = {"session_id": SID, "epoch": EPOCH, "offset": str(self.client.last)}
        opened = holder.sessions.open(CLIENT, ROLE, query, now_ms=0.0, new_session_id="S2")
        assert opened.outcome is ResumeOutcome.RESUMED, opened.outcome
        self.client.node = self.client.was = node
        for replayed in opened.replay:  # write ahead: the rest goes out once it is written
            if local.wal.may_send(json.loads(replayed)["offset"]):
                self.receive(replayed)
            else:
                seen("resume: a replayed text waits for its write")
        if outcome is Claim.MOVED:  # what was published after since, read from the stream
            start = int(local.feed.since.partition("-")[0])  # entry "k-0" is stream[k - 1]
            before = local.session.next_offset
            for entry_id, publication in self.stream[start:]:
                self.offer(local, entry_id, publication)
            seen("catch-up: " + ("some" if local.session.next_offset > before else "nothing"))
        for msg_id in list(self.client.outbox):  # written again, with their ids
            self.handle(node, msg_id)

    # -- what the rules do --------------------------------------------------------------------

    def read_next(self, node: int) -> None:
        """The node's reader delivers the next stream entry to the node's copy."""
        reader = self.nodes[node]
        entry_id, publication = self.stream[reader.read]
        reader.read += 1
        if reader.copy is not None:
            self.offer(reader.copy, entry_id, publication)

    @staticmethod
    def offer(copy: Copy, entry_id: str, publication: Publication) -> None:
        offered = copy.feed.offer(entry_id, publication)
        if offered is not None:
            copy.session.publish(offered)  # it goes out once a write holding it lands

    def take_write(self, node: int) -> None:
        copy = self.nodes[node].copy
        assert copy is not None
        assert copy.pending is None
        copy.pending = copy.wal.write(
            copy.session, owner=copy.claim, since=copy.feed.since, rooms=ROOMS, ttl_ms=1
        )

    def land_write(self, node: int) -> None:
        holder = self.nodes[node]
        copy = holder.copy
        assert copy is not None
        assert copy.pending is not None
        write, copy.pending = copy.pending, None
        written = self.store.write(write)
        seen(f"write {written.name}")
        assert written is not Written.GONE  # nothing expires here
        if written is Written.FENCED:  # another node took the session: this copy is stale
            holder.sessions.discard(copy.session)
            holder.copy = None
            if self.client.node == node:  # "Session resumed elsewhere"
                self.client.node = None
            return
        if copy.session.next_offset > write.next_offset:
            seen("write: a text was published after it was taken")
        released = copy.wal.confirmed(write, copy.session)
        # What it lets out is in the store, whether or not a connection carries it now.
        offsets = [json.loads(numbered_text)["offset"] for numbered_text in released.texts]
        assert all(offset in self.store.history for offset in offsets), offsets
        assert (released.ack or 0) <= int(self.store.fields["handled"]), released.ack
        if self.client.node == node:
            for numbered_text in released.texts:
                self.receive(numbered_text)
            if released.ack is not None:
                self.ack(released.ack)

    def kill_node(self, node: int) -> None:
        """The node dies with what it did not write; a new process takes its place (a new
        origin, its reader at the stream's end)."""
        dead = self.nodes[node]
        self.nodes[node] = Node(dead.name + "'", read=len(self.stream))
        if self.client.node == node:
            self.client.node = None

    def receive(self, numbered_text: str) -> None:
        message = json.loads(numbered_text)
        offset, number = message["offset"], message["p"]
        assert offset == self.client.last + 1, f"offset {offset} after {self.client.last}"
        assert number not in self.client.got, f"publication {number} twice"
        assert not self.client.got or number > self.client.got[-1], "out of stream order"
        self.client.last = offset
        self.client.got.append(number)

    def ack(self, upto: int) -> None:
        self.client.acked = max(self.client.acked, upto)
        self.client.outbox = [msg_id for msg_id in self.client.outbox if msg_id > upto]

    def handle(self, node: int, msg_id: int) -> None:
        """The client's message ``msg_id`` reaches the node's copy."""
        copy = self.nodes[node].copy
        assert copy is not None
        verdict, again = copy.session.inbound(msg_id)
        if verdict is Inbound.DELIVER:
            assert msg_id > self.client.acked, f"id {msg_id} was acknowledged, and runs again"
            copy.session.handled(msg_id)  # acknowledged once a write holding it lands
            return
        assert verdict is Inbound.DUPLICATE, verdict
        assert again is not None
        # Acknowledged again, as far as the store holds it handled (write ahead).
        if min(again, copy.wal.handled) > self.client.acked:
            self.ack(min(again, copy.wal.handled))

    @rule()
    def settle(self) -> None:
        """Resume if disconnected, read the rest of the stream, write everything: then the
        client has every publication meant for it, once, in order, and every id it sent is
        acknowledged. (Also after the last step: see ``teardown``.)

        The writer takes a write before the reader delivers the rest, as it may at any time:
        what the reader delivers meanwhile must wait for the next write."""
        if self.client.node is None:
            self.resume(self.client.was)
        node = self.client.node
        assert node is not None
        copy = self.nodes[node].copy
        assert copy is not None
        if copy.pending is None:
            self.take_write(node)
        while self.nodes[node].read < len(self.stream):
            self.read_next(node)
        self.land_write(node)
        self.take_write(node)
        self.land_write(node)
        assert self.client.got == self.for_client
        assert self.client.outbox == []

    def teardown(self) -> None:
        if sys.exc_info()[0] is None:  # not on top of a failure a step raised already
            self.settle()

    # -- what must hold -----------------------------------------------------------------------

    @invariant()
    def the_store_holds_what_the_client_saw_and_was_told(self) -> None:
        assert self.client.last < int(self.store.fields["next"])
        assert self.client.acked <= int(self.store.fields["handled"])

    @invariant()
    def the_store_can_replay_what_the_owner_holds_unacknowledged(self) -> None:
        owner = self.owner()
        if owner is not None:
            copy = self.nodes[owner].copy
            assert copy is not None
            below = int(self.store.fields["next"])
            for offset, numbered_text in copy.session.history:
                assert offset >= below or self.store.history.get(offset) == numbered_text, offset


class TestLedgerStateful(LedgerMachine.TestCase):  # type: ignore[misc,valid-type]
    """The profile's examples (``ci``: 100) of 40 steps."""

    settings = settings(deadline=None, stateful_step_count=40)
