"""model/routing.py: rooms, publications, routing, dedup, the outgoing queue and presence expiry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadysocket.model.routing import (
    MAX_ROOM_BYTES,
    OriginDedup,
    Outgoing,
    PresencePolicy,
    Publication,
    Rooms,
    Route,
    Target,
    check_room,
    route,
)


def test_a_room_name_is_a_non_empty_string_of_at_most_256_bytes() -> None:
    assert check_room("lobby") == "lobby"
    assert check_room("é" * (MAX_ROOM_BYTES // 2)) == "é" * (MAX_ROOM_BYTES // 2)
    with pytest.raises(ValueError, match="1 to 256 bytes, got 0"):
        check_room("")
    with pytest.raises(ValueError, match="got 258"):
        check_room("é" * 129)
    with pytest.raises(TypeError, match="got int"):
        check_room(7)


def test_joining_twice_is_one_membership_and_leaving_twice_is_a_no_op() -> None:
    rooms = Rooms()
    assert rooms.join("a", "c1")
    assert not rooms.join("a", "c1")
    assert rooms.join("a", "c2")
    assert rooms.members("a") == {"c1", "c2"}
    assert rooms.rooms_of("c1") == {"a"}
    assert rooms.leave("a", "c1")
    assert not rooms.leave("a", "c1")
    assert not rooms.leave("nowhere", "c1")
    assert rooms.rooms_of("c1") == frozenset()
    assert rooms.members("a") == {"c2"}


def test_an_empty_room_disappears_and_a_gone_client_leaves_every_room() -> None:
    rooms = Rooms()
    rooms.join("b", "c1")
    rooms.join("a", "c1")
    rooms.join("a", "c2")
    assert list(rooms.memberships()) == [("a", "c1"), ("a", "c2"), ("b", "c1")]
    assert rooms.leave_all("c1") == ["a", "b"]
    assert list(rooms.memberships()) == [("a", "c2")]
    assert rooms.leave_all("c1") == []
    assert rooms.members("b") == frozenset()


def test_a_publication_survives_its_encoding_as_str_or_bytes_fields() -> None:
    pub = Publication(Target.ROOM, "lobby", '{"type":"x"}', "node-1", 7)
    fields = pub.encode()
    assert fields == {
        "target": "room",
        "key": "lobby",
        "text": '{"type":"x"}',
        "origin": "node-1",
        "seq": "7",
    }
    assert Publication.decode(fields) == pub
    assert Publication.decode({k.encode(): v.encode() for k, v in fields.items()}) == pub


@given(
    st.sampled_from(list(Target)),
    st.text(),
    st.text(),
    st.text(),
    st.integers(min_value=1, max_value=2**62),
)
def test_every_publication_round_trips(
    target: Target, key: str, text: str, origin: str, seq: int
) -> None:
    pub = Publication(target, key, text, origin, seq)
    assert Publication.decode(pub.encode()) == pub


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"seq": None}, "publication without seq"),
        ({"seq": "0"}, "positive integer, got '0'"),
        ({"seq": "-1"}, "positive integer"),
        ({"seq": "²"}, "positive integer"),
        ({"target": "everyone"}, "unknown publication target 'everyone'"),
        ({"origin": None, "key": None}, "publication without key, origin"),
    ],
)
def test_a_malformed_publication_is_refused(change: dict[str, str | None], error: str) -> None:
    fields = Publication(Target.ALL, "", "{}", "n", 1).encode()
    for name, value in change.items():
        if value is None:
            del fields[name]
        else:
            fields[name] = value
    with pytest.raises(ValueError, match=error):
        Publication.decode(fields)


def test_a_broadcast_reaches_everyone_send_to_one_client_a_room_its_local_members() -> None:
    rooms = Rooms()
    rooms.join("lobby", "c1")
    rooms.join("lobby", "c2")
    rooms.join("other", "c3")
    assert route(Publication(Target.ALL, "", "{}", "n", 1), rooms) == Route(everyone=True)
    assert route(Publication(Target.CLIENT, "c9", "{}", "n", 1), rooms) == Route(
        everyone=False, client_ids=frozenset({"c9"})
    )
    assert route(Publication(Target.ROOM, "lobby", "{}", "n", 1), rooms) == Route(
        everyone=False, client_ids=frozenset({"c1", "c2"})
    )
    assert route(Publication(Target.ROOM, "empty", "{}", "n", 1), rooms).client_ids == frozenset()


def test_a_node_delivers_each_origins_publications_once_and_never_its_own() -> None:
    dedup = OriginDedup("me")
    assert not dedup.accept(Publication(Target.ALL, "", "{}", "me", 1))
    assert dedup.accept(Publication(Target.ALL, "", "{}", "a", 1))
    assert dedup.accept(Publication(Target.ALL, "", "{}", "a", 2))
    assert not dedup.accept(Publication(Target.ALL, "", "{}", "a", 2))  # re-sent
    assert not dedup.accept(Publication(Target.ALL, "", "{}", "a", 1))
    assert dedup.accept(Publication(Target.ALL, "", "{}", "b", 1))
    assert dedup.last_seq == {"a": 2, "b": 1}


def test_the_outgoing_queue_numbers_in_order_keeps_until_written_and_refuses_when_full() -> None:
    out = Outgoing("me", limit=3)
    first = out.offer(Target.ALL, "", "1")
    assert first == Publication(Target.ALL, "", "1", "me", 1)
    out.offer(Target.CLIENT, "c", "2")
    out.offer(Target.ROOM, "r", "3")
    assert len(out) == 3
    assert out.offer(Target.ALL, "", "4") is None  # full: refused, not numbered
    assert [p.seq for p in out.batch(2)] == [1, 2]
    assert [p.seq for p in out.batch(10)] == [1, 2, 3]
    out.written(2)
    assert [p.seq for p in out.batch(10)] == [3]
    assert out.offer(Target.ALL, "", "5") == Publication(Target.ALL, "", "5", "me", 4)
    out.written(10)
    assert len(out) == 0
    assert out.batch(5) == []


def test_the_outgoing_limit_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="got 0"):
        Outgoing("me", limit=0)


def test_presence_expires_ttl_after_its_renewal_which_comes_more_often() -> None:
    policy = PresencePolicy(ttl_ms=3000, refresh_ms=1000)
    assert policy.expires_at(500) == 3500
    assert policy.is_live(3500, 3499)
    assert not policy.is_live(3500, 3500)
    with pytest.raises(ValueError, match="refresh_ms must be > 0"):
        PresencePolicy(refresh_ms=0)
    with pytest.raises(ValueError, match="must exceed refresh_ms"):
        PresencePolicy(ttl_ms=1000, refresh_ms=1000)
