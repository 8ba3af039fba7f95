"""Protocol v2's delivery rules, Sans-I/O: ids, offsets, acknowledgements, resume and dedup.

This module is the one declaration of how v2 delivers messages exactly once per session in both
directions (``docs/protocol.md``, "Protocol v2"). The runtime (client and server) and the
delivery model checker (``model/delivery_explore.py``) both drive these classes; neither
restates a rule.

- :class:`ClientDelivery` is the client's side of one session: the outbox of messages not yet
  acknowledged (each with its ``id``), the last contiguous ``offset`` delivered to the
  application, duplicate and gap handling, and batched acks of offsets.
- :class:`ServerSession` is the server's side of one session: the last ``id`` handled, the
  history of messages sent with their ``offset`` (bounded by count), replay from an offset, and
  batched acks of ids. A :class:`SessionStore` holds the sessions of one server process, under
  one ``epoch``, and expires them after the window.

Everything is driven by calls and returns decisions; nothing here reads a clock, draws a random
number or touches a socket: times and fresh tokens are passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

DEFAULT_WINDOW_MS = 120_000.0
"""How long a disconnected session stays resumable (socket.io's ``maxDisconnectionDuration``)."""
DEFAULT_HISTORY_LIMIT = 1000
"""How many unacknowledged messages a session keeps for replay."""
DEFAULT_ACK_EVERY = 32
"""An ack goes out at the latest after this many unacknowledged messages..."""
DEFAULT_ACK_INTERVAL_MS = 50.0
"""...or this long after the first of them, whichever comes first."""

RESERVED_FIELDS = frozenset({"id", "offset"})
"""Fields v2 adds to application messages; an application message may not carry them."""


class ResumeOutcome(StrEnum):
    """What became of a session when a connection opened (the hello's ``resumed`` and why)."""

    NEW = "new"
    """No session was asked for: a fresh one (the first connection)."""
    RESUMED = "resumed"
    """The session continued: missed messages are replayed, unacknowledged ones re-sent."""
    UNKNOWN_SESSION = "unknown_session"
    """The session does not exist here (expired after the window, never existed, forged)."""
    FOREIGN_SESSION = "foreign_session"
    """The session belongs to another client id or role."""
    WRONG_EPOCH = "wrong_epoch"
    """The server restarted (a new epoch): its sessions and histories are gone."""
    TRIMMED = "trimmed"
    """Messages after the client's offset were already dropped from the history."""
    FUTURE_OFFSET = "future_offset"
    """The client claims an offset the server never sent: a protocol error."""


class Inbound(StrEnum):
    """What the receiving side does with a numbered message."""

    DELIVER = "deliver"
    """The next in order: deliver (or handle) it now."""
    DUPLICATE = "duplicate"
    """Already delivered (a re-send or a replay overlap): drop it, acknowledge again."""
    GAP = "gap"
    """A number was skipped: a protocol error; never deliver past a gap."""
    BUSY = "busy"
    """A handler of the session still runs (started by a connection the session replaced):
    wait for it to return, then ask again."""


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The bounds and batching of v2. Validated on construction."""

    window_ms: float = DEFAULT_WINDOW_MS
    history_limit: int = DEFAULT_HISTORY_LIMIT
    ack_every: int = DEFAULT_ACK_EVERY
    ack_interval_ms: float = DEFAULT_ACK_INTERVAL_MS

    def __post_init__(self) -> None:
        if self.window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {self.window_ms!r}")
        if self.history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, got {self.history_limit!r}")
        if self.ack_every < 1:
            raise ValueError(f"ack_every must be >= 1, got {self.ack_every!r}")
        if self.ack_interval_ms < 0:
            raise ValueError(f"ack_interval_ms must be >= 0, got {self.ack_interval_ms!r}")


@dataclass(slots=True)
class AckBatch:
    """Cumulative acks, batched: at most every ``ack_every`` messages or ``ack_interval_ms``.

    ``note(n)`` records that everything up to ``n`` was handled or delivered and says whether
    to acknowledge now; otherwise the caller arms a timer for ``ack_interval_ms`` when
    ``timer_wanted`` and calls ``due()`` when it fires.
    """

    every: int
    last: int = 0
    """The highest number handled or delivered."""
    acked: int = 0
    """The highest number acknowledged to the peer."""
    timer_armed: bool = False

    def note(self, upto: int) -> int | None:
        """Everything up to ``upto`` is done; the number to acknowledge now, or None."""
        self.last = max(self.last, upto)
        if self.last - self.acked >= self.every:
            return self.flush()
        return None

    @property
    def timer_wanted(self) -> bool:
        """An ack is owed and no timer is armed for it yet."""
        return self.last > self.acked and not self.timer_armed

    def due(self) -> int | None:
        """The ack timer fired: the number to acknowledge, or None if nothing is owed."""
        self.timer_armed = False
        return self.flush() if self.last > self.acked else None

    def flush(self) -> int:
        """Acknowledge everything owed now (also when a duplicate asks for the ack again)."""
        self.acked = self.last
        self.timer_armed = False
        return self.acked

    def reset(self) -> None:
        """A new session: nothing handled, nothing owed."""
        self.last = self.acked = 0
        self.timer_armed = False


def check_application_message(message: Mapping[str, Any]) -> None:
    """Refuse an application message that carries a field v2 numbers messages with.

    Raises:
        ValueError: the message has an ``id`` or ``offset`` field.
    """
    if "id" not in message and "offset" not in message:  # the common case, two lookups
        return
    names = ", ".join(sorted(RESERVED_FIELDS.intersection(message)))
    raise ValueError(f"protocol v2 numbers messages itself: remove the field(s) {names}")


def number(text: str, name: str, value: int) -> str:
    """Add ``"name": value`` first in the encoded JSON object ``text`` (no re-encoding)."""
    if text == "{}":
        return f'{{"{name}":{value}}}'
    return f'{{"{name}":{value},{text[1:]}'


def unnumber(text: str) -> str:
    """Undo :func:`number` (the field is first, so it is a prefix)."""
    _, _, rest = text.partition(",")
    return "{" + rest if rest else "{}"


# --------------------------------------------------------------------------------------------
# The client's side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pending:
    """A message in the client's outbox: its id in the session and its wire text."""

    id: int
    text: str


@dataclass(slots=True)
class ClientDelivery:
    """The client's side of a v2 session. See the module docstring."""

    config: DeliveryConfig = field(default_factory=DeliveryConfig)
    outbox_limit: int = 1000
    session_id: str | None = None
    epoch: str | None = None
    next_id: int = 1
    outbox: deque[Pending] = field(default_factory=deque)
    """Accepted and not acknowledged, in id order (written or not yet)."""
    written: int = 0
    """How many of the outbox's first entries were written on the current connection."""
    ever_written: int = 0
    """The highest id ever written in this session (ids are written in order)."""
    offsets: AckBatch = field(init=False)
    last_outcome: ResumeOutcome | None = None
    resent: int = 0
    duplicates_dropped: int = 0
    replayed: int = 0
    renumbered: dict[int, int] = field(default_factory=dict)
    """After a refused resume: old id -> new id of the messages carried into the new session."""

    def __post_init__(self) -> None:
        self.offsets = AckBatch(self.config.ack_every)

    # -- what the client sends -------------------------------------------------------------

    @property
    def last_offset(self) -> int:
        """The last contiguous offset delivered to the application."""
        return self.offsets.last

    @property
    def full(self) -> bool:
        """The outbox holds ``outbox_limit`` unacknowledged messages: refuse more."""
        return len(self.outbox) >= self.outbox_limit

    def accept(self, text: str) -> Pending:
        """Give an encoded application message the next id and keep it until acknowledged."""
        pending = Pending(self.next_id, number(text, "id", self.next_id))
        self.next_id += 1
        self.outbox.append(pending)
        return pending

    def to_write(self) -> Iterator[Pending]:
        """The outbox entries not yet written on this connection, in order; each is counted
        as written as it is taken."""
        while (pending := self.next_to_write()) is not None:
            yield pending

    def next_to_write(self) -> Pending | None:
        """The next outbox entry not yet written on this connection, counted as written now;
        None when every entry was written."""
        if self.written >= len(self.outbox):
            return None
        pending = self.outbox[self.written]
        self.written += 1
        self.ever_written = max(self.ever_written, pending.id)
        return pending

    def acked(self, upto: int) -> list[Pending]:
        """The server acknowledged every id up to ``upto``: those leave the outbox."""
        done: list[Pending] = []
        while self.outbox and self.outbox[0].id <= upto:
            done.append(self.outbox.popleft())
        self.written = max(self.written - len(done), 0)
        return done

    def resume_query(self) -> dict[str, str]:
        """What a reconnect adds to the query to resume, or nothing before the first hello."""
        if self.session_id is None or self.epoch is None:
            return {}
        return {"session_id": self.session_id, "epoch": self.epoch, "offset": str(self.last_offset)}

    def opened(
        self,
        session_id: str,
        epoch: str,
        resumed: bool,
        outcome: ResumeOutcome | None = None,
        replayed: int = 0,
    ) -> list[Pending]:
        """A v2 hello arrived. Returns the messages to hand back to the application (reason
        "not acknowledged") when a resume was asked for and refused: those written in the
        old session and never acknowledged, which it may or may not have handled.

        After a resume, every unacknowledged message is written again, in order, with its id
        (the server drops the ids it already handled). A new session starts from id 1 and
        offset 0; messages never written in the old one are renumbered and sent in the new
        (``renumbered`` maps their old ids to the new ones). ``outcome`` is the hello's
        ``resume_outcome`` when the server gave a known one, ``replayed`` its count of replays.
        """
        asked = self.session_id is not None
        self.written = 0
        self.renumbered = {}
        if resumed and asked and session_id == self.session_id:
            self.resent += sum(1 for p in self.outbox if p.id <= self.ever_written)
            self.replayed += replayed
            # The resume query told the server the offset: that is an ack.
            self.offsets.acked = self.offsets.last
            self.last_outcome = ResumeOutcome.RESUMED
            return []
        lost = [p for p in self.outbox if p.id <= self.ever_written]
        kept = [p for p in self.outbox if p.id > self.ever_written]
        self._new_session(session_id, epoch)
        for pending in kept:
            self.renumbered[pending.id] = self.accept(unnumber(pending.text)).id
        if outcome is None or outcome is ResumeOutcome.RESUMED:
            outcome = ResumeOutcome.UNKNOWN_SESSION if asked else ResumeOutcome.NEW
        self.last_outcome = outcome
        return lost

    def _new_session(self, session_id: str | None, epoch: str | None) -> None:
        self.outbox.clear()
        self.written = self.ever_written = 0
        self.next_id = 1
        self.offsets.reset()
        self.session_id, self.epoch = session_id, epoch

    def closed(self) -> None:
        """The connection ended: nothing is written on the next one yet, and no ack timer
        runs (the next hello's resume query carries the offset)."""
        self.written = 0
        self.offsets.timer_armed = False

    def abandon(self) -> list[Pending]:
        """The application disconnected: the session ends; what is unacknowledged goes back."""
        lost = list(self.outbox)
        self._new_session(None, None)
        return lost

    # -- what the client receives ----------------------------------------------------------

    def received(self, offset: int) -> tuple[Inbound, int | None]:
        """A numbered message arrived: deliver it or not, and the offset to ack now (or None)."""
        expected = self.offsets.last + 1
        if offset == expected:
            return Inbound.DELIVER, self.offsets.note(offset)
        if offset < expected:
            self.duplicates_dropped += 1
            return Inbound.DUPLICATE, self.offsets.flush()
        return Inbound.GAP, None


# --------------------------------------------------------------------------------------------
# The server's side
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ServerSession:
    """The server's side of one v2 session. See the module docstring."""

    session_id: str
    client_id: str
    role: str
    config: DeliveryConfig = field(default_factory=DeliveryConfig)
    next_offset: int = 1
    history: deque[tuple[int, str]] = field(default_factory=deque)
    """Messages sent and not acknowledged by the client, ``(offset, text)``, oldest first."""
    trimmed_upto: int = 0
    """Offsets up to here were dropped unacknowledged when the history was full."""
    ids: AckBatch = field(init=False)
    handling: int | None = None
    """The id whose handler is running (never two at once)."""
    connected: bool = False
    disconnected_at: float | None = None

    def __post_init__(self) -> None:
        self.ids = AckBatch(self.config.ack_every)

    # -- client -> server ------------------------------------------------------------------

    @property
    def last_handled(self) -> int:
        """The last id whose handler returned."""
        return self.ids.last

    def inbound(self, msg_id: int) -> tuple[Inbound, int | None]:
        """A message with ``msg_id`` arrived: run its handler, drop it (and the id to ack
        again), or refuse a gap."""
        if self.handling is not None:
            return Inbound.BUSY, None
        expected = self.ids.last + 1
        if msg_id == expected and self.handling is None:
            self.handling = msg_id
            return Inbound.DELIVER, None
        if msg_id <= self.ids.last:
            return Inbound.DUPLICATE, self.ids.flush()
        return Inbound.GAP, None

    def handled(self, msg_id: int) -> int | None:
        """The handler for ``msg_id`` returned: the id to ack now, or None (batched)."""
        self.handling = None
        return self.ids.note(msg_id)

    def interrupted(self, msg_id: int) -> None:
        """The handler for ``msg_id`` was cancelled before it returned: it is not handled."""
        if self.handling == msg_id:
            self.handling = None

    # -- server -> client ------------------------------------------------------------------

    def publish(self, text: str) -> str:
        """Number an encoded application message and keep it for replay until acknowledged."""
        offset = self.next_offset
        self.next_offset += 1
        numbered = number(text, "offset", offset)
        self.history.append((offset, numbered))
        if len(self.history) > self.config.history_limit:
            dropped, _ = self.history.popleft()
            self.trimmed_upto = dropped
        return numbered

    def client_acked(self, offset: int) -> bool:
        """The client acknowledged every offset up to ``offset``; False if it claims an offset
        never sent (a protocol error)."""
        if offset >= self.next_offset:
            return False
        while self.history and self.history[0][0] <= offset:
            self.history.popleft()
        return True

    def replay_from(self, offset: int) -> ResumeOutcome:
        """Whether a client whose last contiguous offset is ``offset`` can resume here."""
        if offset >= self.next_offset:
            return ResumeOutcome.FUTURE_OFFSET
        if offset < self.trimmed_upto:
            return ResumeOutcome.TRIMMED
        return ResumeOutcome.RESUMED

    def replay(self, offset: int) -> list[str]:
        """The messages after ``offset``, in order (after ``replay_from`` said RESUMED)."""
        self.client_acked(offset)
        return [text for _, text in self.history]


@dataclass(frozen=True, slots=True)
class Opened:
    """What the store decided for a new connection."""

    session: ServerSession
    outcome: ResumeOutcome
    replay: tuple[str, ...]

    @property
    def resumed(self) -> bool:
        """The hello's ``resumed`` field."""
        return self.outcome is ResumeOutcome.RESUMED


@dataclass(slots=True)
class SessionStore:
    """The v2 sessions of one server process, under one ``epoch``.

    Indexed so that a connection, a ``send_to`` and an expiry cost the same with ten sessions
    or ten thousand: by client id (one session per client id), and the disconnected sessions
    in the order they disconnected (``now_ms`` is a monotonic clock, so the oldest is first).
    ``sessions`` stays the record; the indexes are rebuilt when it was replaced.
    """

    epoch: str
    config: DeliveryConfig = field(default_factory=DeliveryConfig)
    sessions: dict[str, ServerSession] = field(default_factory=dict)
    session_class: ClassVar[type[ServerSession]] = ServerSession
    _by_client: dict[str, ServerSession] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _idle: dict[str, ServerSession] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _indexed: dict[str, ServerSession] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def _index(self) -> None:
        """Rebuild the indexes if ``sessions`` was replaced (a copy of the store) or resized
        behind the store's back."""
        if self._indexed is self.sessions and len(self._by_client) == len(self.sessions):
            return
        self._by_client = {s.client_id: s for s in self.sessions.values()}
        idle = [s for s in self.sessions.values() if s.disconnected_at is not None]
        idle.sort(key=lambda s: s.disconnected_at or 0.0)
        self._idle = {s.session_id: s for s in idle}
        self._indexed = self.sessions

    def open(
        self,
        client_id: str,
        role: str,
        resume: Mapping[str, str],
        now_ms: float,
        new_session_id: str,
    ) -> Opened:
        """A v2 connection opened, with the query's ``session_id``/``epoch``/``offset`` (any
        may be missing). Resume if the rules allow it, else a fresh session under
        ``new_session_id`` (a random token the caller drew)."""
        self.expire(now_ms)
        outcome = self._check(client_id, role, resume)
        if outcome is ResumeOutcome.RESUMED:
            session = self.sessions[resume["session_id"]]
            offset = int(resume["offset"])
            session.connected, session.disconnected_at = True, None
            self._idle.pop(session.session_id, None)
            return Opened(session, outcome, tuple(session.replay(offset)))
        # One session per client id: a fresh one supersedes the client's older sessions (the
        # client cannot resume them any more, so their histories would never be delivered).
        for old in self.of_client(client_id):
            self._drop(old)
        session = self.session_class(new_session_id, client_id, role, self.config, connected=True)
        self.sessions[new_session_id] = session
        self._by_client[client_id] = session
        return Opened(session, outcome, ())

    def adopt(self, session: ServerSession) -> None:
        """Take in ``session``, restored from a shared store (``model/ledger.py``), in place of
        any session of its client id here; it is disconnected until a connection resumes it."""
        self._index()
        for old in self.of_client(session.client_id):
            self._drop(old)
        stale = self.sessions.get(session.session_id)
        if stale is not None:
            self._drop(stale)
        session.connected, session.disconnected_at = False, None
        self.sessions[session.session_id] = session
        self._by_client[session.client_id] = session

    def discard(self, session: ServerSession) -> None:
        """Drop ``session`` from the store now (a shared store says it is another process's,
        or gone); nothing if it is not the store's."""
        self._index()
        if self.sessions.get(session.session_id) is session:
            self._drop(session)

    def _drop(self, session: ServerSession) -> None:
        del self.sessions[session.session_id]
        self._idle.pop(session.session_id, None)
        self._by_client.pop(session.client_id, None)  # one session per client id

    def _check(self, client_id: str, role: str, resume: Mapping[str, str]) -> ResumeOutcome:
        session_id = resume.get("session_id")
        if session_id is None:
            return ResumeOutcome.NEW
        if resume.get("epoch") != self.epoch:
            return ResumeOutcome.WRONG_EPOCH
        session = self.sessions.get(session_id)
        if session is None:
            return ResumeOutcome.UNKNOWN_SESSION
        if (session.client_id, session.role) != (client_id, role):
            return ResumeOutcome.FOREIGN_SESSION
        raw = resume.get("offset", "")
        # isascii(): str.isdigit() also accepts digits int() refuses, such as "²".
        canonical = raw.isascii() and raw.isdigit() and (len(raw) == 1 or raw[0] != "0")
        if not canonical or len(raw) > 18:
            return ResumeOutcome.FUTURE_OFFSET
        return session.replay_from(int(raw))

    def disconnected(self, session: ServerSession, now_ms: float) -> None:
        """The session's connection ended: it stays resumable for the window."""
        self._index()
        session.connected = False
        session.disconnected_at = now_ms
        if self.sessions.get(session.session_id) is session:
            self._idle.pop(session.session_id, None)
            self._idle[session.session_id] = session  # the newest disconnect goes last

    def expire(self, now_ms: float) -> list[ServerSession]:
        """Drop the sessions disconnected for longer than the window (the oldest first)."""
        self._index()
        # Only the head of the disconnect order is looked at (no copy of every idle session:
        # this runs on every v2 open): the sessions connected again since, and the expired.
        head: list[ServerSession] = []
        for session in self._idle.values():
            at = session.disconnected_at
            if at is not None and now_ms - at <= self.config.window_ms:
                break
            head.append(session)
        gone: list[ServerSession] = []
        for session in head:
            if session.disconnected_at is None:  # connected again since
                del self._idle[session.session_id]
            else:
                gone.append(session)
                self._drop(session)
        return gone

    def of_client(self, client_id: str) -> list[ServerSession]:
        """The live or resumable session of ``client_id`` (a list: none or one)."""
        self._index()
        session = self._by_client.get(client_id)
        return [] if session is None else [session]

    def next_expiry(self) -> float | None:
        """When :meth:`expire` next has a session to drop (``now_ms`` timescale): the earliest
        ``disconnected_at + window_ms`` of a disconnected session; None while none is."""
        self._index()
        for session in self._idle.values():
            if session.disconnected_at is not None:
                return session.disconnected_at + self.config.window_ms
        return None
