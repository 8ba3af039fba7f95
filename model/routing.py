"""Scale-out routing, Sans-I/O: rooms, publications between processes, dedup, presence expiry.

A server process (a *node*) delivers a push to its own clients at once and hands it to its
broker, which carries it to the other nodes. Everything that decides *who gets what* lives
here; the runtime (``runtime/broker.py``, ``runtime/redis_broker.py``, ``runtime/server.py``)
only moves bytes:

- :class:`Rooms`: which local client ids are in which room (``client.join(room)``).
- :class:`Publication`: one push that crosses processes (``broadcast``, ``send_to``,
  ``publish``), with its encoding as stream fields; :func:`route` says which local clients a
  publication reaches.
- :class:`OriginDedup`: a publication is delivered at most once per node, even when a broker
  re-sends it after a reconnect (each origin numbers its publications ``1, 2, 3…``), and never
  back on the node that sent it (that node delivered it itself).
- :class:`Outgoing`: the bounded queue of publications not yet handed to the broker's store.
  While the store is unreachable publications wait here, in order; when it is full,
  :meth:`Outgoing.offer` refuses and the publisher is told (never a silent loss).
- :class:`PresencePolicy`: when a node's announcement of its members and client count
  expires, and how often it is renewed.

Nothing here reads a clock, draws a random number or touches a socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

MAX_ROOM_BYTES = 256
"""A room name is 1 to 256 bytes of UTF-8."""
DEFAULT_OUTGOING_LIMIT = 10_000
"""Publications that may wait for the broker's store (a Redis outage) before publish raises."""
DEFAULT_PRESENCE_TTL_MS = 15_000.0
"""A node's presence announcement expires this long after it was last renewed."""
DEFAULT_PRESENCE_REFRESH_MS = 5_000.0
"""A node renews its presence announcement this often."""


class Target(StrEnum):
    """Whom a publication is for."""

    ALL = "all"
    """``broadcast()``: every client of every node."""
    CLIENT = "client"
    """``send_to(client_id)``: the connections and sessions of one client id, wherever they are."""
    ROOM = "room"
    """``publish(room)``: the members of one room, wherever they are."""


def check_room(room: object) -> str:
    """Return ``room`` if it is a valid room name.

    Raises:
        TypeError: it is not a string.
        ValueError: it is empty or longer than :data:`MAX_ROOM_BYTES` bytes of UTF-8.
    """
    if not isinstance(room, str):
        raise TypeError(f"a room name is a string, got {type(room).__name__}")
    size = len(room.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= MAX_ROOM_BYTES:
        raise ValueError(f"a room name is 1 to {MAX_ROOM_BYTES} bytes, got {size}")
    return room


@dataclass(slots=True)
class Rooms:
    """The room memberships of one node's client ids."""

    _members: dict[str, set[str]] = field(default_factory=dict)
    _rooms_of: dict[str, set[str]] = field(default_factory=dict)

    def join(self, room: str, client_id: str) -> bool:
        """Put ``client_id`` in ``room``; False if it was already there."""
        members = self._members.setdefault(room, set())
        if client_id in members:
            return False
        members.add(client_id)
        self._rooms_of.setdefault(client_id, set()).add(room)
        return True

    def leave(self, room: str, client_id: str) -> bool:
        """Take ``client_id`` out of ``room``; False if it was not there."""
        members = self._members.get(room)
        if members is None or client_id not in members:
            return False
        members.discard(client_id)
        if not members:
            del self._members[room]
        rooms = self._rooms_of[client_id]
        rooms.discard(room)
        if not rooms:
            del self._rooms_of[client_id]
        return True

    def leave_all(self, client_id: str) -> list[str]:
        """Take ``client_id`` out of every room (it is gone from this node); the rooms it left."""
        left = sorted(self._rooms_of.get(client_id, ()))
        for room in left:
            self.leave(room, client_id)
        return left

    def members(self, room: str) -> frozenset[str]:
        """The client ids in ``room`` on this node."""
        return frozenset(self._members.get(room, ()))

    def rooms_of(self, client_id: str) -> frozenset[str]:
        """The rooms ``client_id`` is in on this node."""
        return frozenset(self._rooms_of.get(client_id, ()))

    def memberships(self) -> Iterator[tuple[str, str]]:
        """Every ``(room, client_id)`` of this node, rooms in name order."""
        for room in sorted(self._members):
            for client_id in sorted(self._members[room]):
                yield room, client_id


@dataclass(frozen=True, slots=True)
class Publication:
    """One push that crosses processes.

    ``text`` is the encoded application message (timestamp included, no ``offset``: each node
    numbers it in its own v2 sessions). ``origin`` names the node that published it and ``seq``
    its place in that node's publications (from 1), which is how nodes drop a re-sent one.
    """

    target: Target
    key: str
    """The client id (``CLIENT``), the room (``ROOM``), or empty (``ALL``)."""
    text: str
    origin: str
    seq: int

    FIELDS = ("target", "key", "text", "origin", "seq")

    def encode(self) -> dict[str, str]:
        """The publication as string fields (a Redis stream entry)."""
        return {
            "target": self.target.value,
            "key": self.key,
            "text": self.text,
            "origin": self.origin,
            "seq": str(self.seq),
        }

    @classmethod
    def decode(cls, fields: Mapping[str, str] | Mapping[bytes, bytes]) -> Publication:
        """Read a publication back from :meth:`encode`'s fields (str or UTF-8 bytes).

        Raises:
            ValueError: a field is missing or malformed.
        """
        values: dict[str, str] = {}
        for name, value in fields.items():
            key = name.decode() if isinstance(name, bytes) else name
            values[key] = value.decode() if isinstance(value, bytes) else value
        missing = [name for name in cls.FIELDS if name not in values]
        if missing:
            raise ValueError(f"publication without {', '.join(missing)}")
        seq = values["seq"]
        if not (seq.isascii() and seq.isdigit()) or int(seq) < 1:
            raise ValueError(f"publication seq must be a positive integer, got {seq!r}")
        try:
            target = Target(values["target"])
        except ValueError:
            raise ValueError(f"unknown publication target {values['target']!r}") from None
        return cls(target, values["key"], values["text"], values["origin"], int(seq))


@dataclass(frozen=True, slots=True)
class Route:
    """The local reach of a publication: every client, or these client ids."""

    everyone: bool
    client_ids: frozenset[str] = frozenset()


def route(publication: Publication, rooms: Rooms) -> Route:
    """Which of this node's clients ``publication`` reaches."""
    if publication.target is Target.ALL:
        return Route(everyone=True)
    if publication.target is Target.CLIENT:
        return Route(everyone=False, client_ids=frozenset((publication.key,)))
    return Route(everyone=False, client_ids=rooms.members(publication.key))


@dataclass(slots=True)
class OriginDedup:
    """Deliver each origin's publications once, and none of this node's own."""

    node_id: str
    last_seq: dict[str, int] = field(default_factory=dict)

    def accept(self, publication: Publication) -> bool:
        """Whether to deliver ``publication`` here (and remember it was)."""
        if publication.origin == self.node_id:
            return False  # the publishing node delivered it to its own clients already
        if publication.seq <= self.last_seq.get(publication.origin, 0):
            return False  # a re-send after a reconnect: delivered already
        self.last_seq[publication.origin] = publication.seq
        return True


@dataclass(slots=True)
class Outgoing:
    """Publications numbered and waiting to be written to the broker's store, in order."""

    node_id: str
    limit: int = DEFAULT_OUTGOING_LIMIT
    next_seq: int = 1
    queue: deque[Publication] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"the outgoing limit must be >= 1, got {self.limit!r}")

    def offer(self, target: Target, key: str, text: str) -> Publication | None:
        """Number a publication and queue it; None (nothing queued) when the queue is full."""
        if len(self.queue) >= self.limit:
            return None
        publication = Publication(target, key, text, self.node_id, self.next_seq)
        self.next_seq += 1
        self.queue.append(publication)
        return publication

    def batch(self, size: int) -> list[Publication]:
        """The oldest ``size`` publications at most, left queued until :meth:`written`."""
        return [self.queue[i] for i in range(min(size, len(self.queue)))]

    def written(self, count: int) -> None:
        """The first ``count`` publications of the queue are in the store."""
        for _ in range(min(count, len(self.queue))):
            self.queue.popleft()

    def __len__(self) -> int:
        return len(self.queue)


@dataclass(frozen=True, slots=True)
class PresencePolicy:
    """How long a node's presence announcement lives and how often it is renewed."""

    ttl_ms: float = DEFAULT_PRESENCE_TTL_MS
    refresh_ms: float = DEFAULT_PRESENCE_REFRESH_MS

    def __post_init__(self) -> None:
        if self.refresh_ms <= 0:
            raise ValueError(f"refresh_ms must be > 0, got {self.refresh_ms!r}")
        if self.ttl_ms <= self.refresh_ms:
            raise ValueError(
                f"ttl_ms ({self.ttl_ms!r}) must exceed refresh_ms ({self.refresh_ms!r}), "
                "or presence would lapse between renewals"
            )

    def expires_at(self, now_ms: float) -> float:
        """When an announcement renewed at ``now_ms`` expires."""
        return now_ms + self.ttl_ms

    def is_live(self, expires_at_ms: float, now_ms: float) -> bool:
        """Whether an announcement that expires at ``expires_at_ms`` still counts."""
        return expires_at_ms > now_ms
