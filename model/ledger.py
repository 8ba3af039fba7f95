"""Protocol v2 sessions kept in a store shared by every process, Sans-I/O.

With a shared store (``RedisBroker``), a v2 session outlives the process that served it: a client
whose process died resumes on another one with nothing lost or doubled. Three rules make it so,
and this module is their one declaration (the runtime, ``runtime/session_ledger.py`` and
``runtime/redis_sessions.py``, only moves bytes):

1. **Write ahead** (:class:`WriteAhead`). A numbered message goes to the socket only once the
   store holds it, and a handled ``id`` is acknowledged only once the store holds it. What the
   client saw or was told is therefore always in the store, whichever process dies.
2. **One owner** (:class:`Claim`). Each resume claims the session in the store atomically; a
   write by a process that is no longer its owner is refused (fenced), so an old owner that is
   still running can never overwrite the new one.
3. **Catch up** (:class:`CatchUp`). Every push to a v2 session (``broadcast``, ``send_to``,
   ``publish``) reaches it through the cluster's publication stream, the owner's own included.
   The store keeps, with each session, the stream position up to which it has been offered
   every publication (``since``). A process that takes a session over offers it the
   publications after ``since`` (those made while no process served it), then the ones its own
   reader delivered meanwhile, each once, in stream order. If the stream was trimmed past
   ``since`` the session cannot be made whole and the resume is refused (``trimmed``).

Nothing here reads a clock, draws a random number or touches a socket.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from steadysocket.model.delivery import ServerSession
from steadysocket.model.routing import Publication, Target

STREAM_START = "0-0"
"""The position before every publication of the stream."""


def stream_position(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``"<ms>-<seq>"``) as a pair that sorts like the stream.

    Raises:
        ValueError: it is not a stream entry id.
    """
    ms, dash, seq = entry_id.partition("-")
    if not (dash and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        raise ValueError(f"not a stream entry id: {entry_id!r}")
    return int(ms), int(seq)


def stream_after(entry_id: str, since: str) -> bool:
    """Whether ``entry_id`` comes after ``since`` in the stream."""
    return stream_position(entry_id) > stream_position(since)


def reaches(publication: Publication, client_id: str, rooms: Iterable[str]) -> bool:
    """Whether ``publication`` is for the session of ``client_id``, a member of ``rooms``."""
    if publication.target is Target.ALL:
        return True
    if publication.target is Target.CLIENT:
        return publication.key == client_id
    return publication.key in rooms


# --------------------------------------------------------------------------------------------
# What the store holds of one session
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One session as the store holds it (its owner aside)."""

    session_id: str
    client_id: str
    role: str
    next_offset: int
    trimmed_upto: int
    handled: int
    since: str
    rooms: tuple[str, ...]
    history: tuple[tuple[int, str], ...]
    """The messages not acknowledged by the client, ``(offset, numbered text)``, oldest first."""

    FIELDS = ("client", "role", "next", "trimmed", "handled", "since", "rooms")

    @classmethod
    def decode(
        cls,
        session_id: str,
        fields: Mapping[str, str],
        history: Sequence[tuple[int, str]],
    ) -> SessionRecord:
        """Read a record back from the store's fields and history.

        Raises:
            ValueError: a field is missing or malformed (the record is unusable).
        """
        missing = [name for name in cls.FIELDS if name not in fields]
        if missing:
            raise ValueError(f"session record without {', '.join(missing)}")
        numbers: dict[str, int] = {}
        for name in ("next", "trimmed", "handled"):
            value = fields[name]
            if not (value.isascii() and value.isdigit()):
                raise ValueError(f"session record {name} is not a count: {value!r}")
            numbers[name] = int(value)
        stream_position(fields["since"])
        rooms = json.loads(fields["rooms"])
        if not isinstance(rooms, list) or not all(isinstance(room, str) for room in rooms):
            raise ValueError(f"session record rooms is not a list of names: {fields['rooms']!r}")
        if numbers["next"] < 1:
            raise ValueError(f"session record next is below 1: {numbers['next']}")
        ordered = tuple(sorted(history))
        if any(not numbers["trimmed"] < offset < numbers["next"] for offset, _ in ordered):
            raise ValueError("session record history holds an offset out of its range")
        return cls(
            session_id=session_id,
            client_id=fields["client"],
            role=fields["role"],
            next_offset=numbers["next"],
            trimmed_upto=numbers["trimmed"],
            handled=numbers["handled"],
            since=fields["since"],
            rooms=tuple(rooms),
            history=ordered,
        )

    def restore(self, session: ServerSession) -> None:
        """Make ``session`` (new, with this record's ids) carry the record's state."""
        session.next_offset = self.next_offset
        session.trimmed_upto = self.trimmed_upto
        session.history = deque(self.history)
        session.ids.last = session.ids.acked = self.handled


def rooms_field(rooms: Iterable[str]) -> str:
    """The ``rooms`` field of a record: the names, sorted, as JSON."""
    return json.dumps(sorted(rooms), ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# 1. Write ahead
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """One write of one session to the store: its state at one instant."""

    session_id: str
    client_id: str
    role: str
    owner: str
    """The writer's claim on the session (the store refuses the write under another one)."""
    create: bool
    """The session is not in the store yet: this write creates it (else it must own it)."""
    next_offset: int
    trimmed_upto: int
    handled: int
    floor: int
    """The store may drop its history up to here (acknowledged by the client, or trimmed)."""
    since: str
    rooms: str
    entries: tuple[tuple[int, str], ...]
    """The numbered messages the store does not hold yet, oldest first."""
    ttl_ms: int
    """The store forgets the session this long after this write, unless written again."""


class Written(IntEnum):
    """What became of one :class:`Write`."""

    GONE = -1
    """The store has no such session any more (expired, or restarted empty): it is lost."""
    FENCED = 0
    """Another process claimed the session since: this process no longer serves it."""
    LANDED = 1
    """The store holds it."""


@dataclass(frozen=True, slots=True)
class Released:
    """What a confirmed write lets out: numbered texts for the socket, and an ack."""

    texts: tuple[str, ...]
    ack: int | None
    """Acknowledge every id up to this one (None: nothing new is handled)."""


@dataclass(slots=True)
class WriteAhead:
    """The durability of one session: what the store holds, and so what may go out."""

    created: bool = False
    written_upto: int = 0
    """Every offset up to here is in the store (and may go to the socket)."""
    handled: int = 0
    """Every id up to here is handled in the store (and may be acknowledged)."""
    dirty: bool = False
    """Something changed since the last write was taken."""

    def adopt(self, record: SessionRecord) -> None:
        """The session was restored from ``record``: the store holds all of it."""
        self.created = True
        self.written_upto = record.next_offset - 1
        self.handled = record.handled

    def write(
        self,
        session: ServerSession,
        *,
        owner: str,
        since: str,
        rooms: Iterable[str],
        ttl_ms: int,
    ) -> Write:
        """The write that brings the store up to ``session`` now (and clears ``dirty``)."""
        self.dirty = False
        history = session.history
        floor = history[0][0] - 1 if history else session.next_offset - 1
        entries = tuple((offset, text) for offset, text in history if offset > self.written_upto)
        return Write(
            session_id=session.session_id,
            client_id=session.client_id,
            role=session.role,
            owner=owner,
            create=not self.created,
            next_offset=session.next_offset,
            trimmed_upto=session.trimmed_upto,
            handled=session.last_handled,
            floor=max(floor, session.trimmed_upto),
            since=since,
            rooms=rooms_field(rooms),
            entries=entries,
            ttl_ms=ttl_ms,
        )

    def confirmed(self, write: Write, session: ServerSession) -> Released:
        """The store took ``write``: the numbered texts that may go to the socket now, in
        order, and the ack now due. A text the history dropped meanwhile (full) is not let out:
        the client sees the gap, resumes, and is told ``trimmed``."""
        self.created = True
        upto = write.next_offset - 1
        texts = tuple(
            text for offset, text in session.history if self.written_upto < offset <= upto
        )
        self.written_upto = max(self.written_upto, upto)
        ack = write.handled if write.handled > self.handled else None
        self.handled = max(self.handled, write.handled)
        return Released(texts, ack)

    def may_send(self, offset: int) -> bool:
        """Whether the numbered message ``offset`` may go to the socket now."""
        return offset <= self.written_upto


# --------------------------------------------------------------------------------------------
# 2. One owner
# --------------------------------------------------------------------------------------------


class Claim(StrEnum):
    """What the store answered a resume's claim."""

    UNKNOWN = "unknown"
    """No such session in the store (never written, expired, or the store restarted empty)."""
    FOREIGN = "foreign"
    """The session belongs to another client id or role: not claimed."""
    KEPT = "kept"
    """This process owned it already, under the claim it holds: its own copy is current."""
    STALE_EPOCH = "epoch"
    """The store's epoch is not the one the claimant knew (it restarted empty): the claimant
    learns the new one, and the resume is told ``wrong_epoch``."""
    MOVED = "moved"
    """Claimed from another owner (or from one of this process's older claims): the store's
    record is the session now."""


# --------------------------------------------------------------------------------------------
# 3. Catch up
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CatchUp:
    """Offers a taken-over session the publications it missed, each once, in stream order.

    Feed it the stream from ``since`` on (:meth:`offer`), then the publications the process's
    reader delivered while that ran, in the order they came; it returns the texts to publish
    into the session and skips what it offered already.
    """

    client_id: str
    rooms: frozenset[str]
    since: str
    seen: dict[str, int] = field(default_factory=dict)
    """The last ``seq`` offered per origin (a publication written twice is offered once)."""

    def offer(self, entry_id: str, publication: Publication) -> str | None:
        """The text to publish into the session, or None (not for it, or offered already)."""
        if not stream_after(entry_id, self.since):
            return None
        self.since = entry_id
        if publication.seq <= self.seen.get(publication.origin, 0):
            return None
        self.seen[publication.origin] = publication.seq
        if not reaches(publication, self.client_id, self.rooms):
            return None
        return publication.text
