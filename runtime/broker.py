"""Brokers: how a server process reaches the clients of the other processes.

A server (:class:`~steadysocket.runtime.server.Endpoints`) is one *node*. Every push it makes
(``broadcast``, ``send_to``, ``publish`` to a room) goes to its own clients at once, then to its
broker, which carries it to the other nodes; each of them delivers it to its own clients. Room
memberships are kept by each node for its clients (``model/routing.py``'s :class:`Rooms`); the
broker announces them, and the node's client count, to the cluster (presence).

Two brokers, one interface (:class:`Broker`):

- :class:`MemoryBroker`, the default: one process, no dependency. Publications stay in the
  process (there is no other node); presence and the client count are the process's own. The
  server behaves exactly as it did before brokers existed.
- :class:`~steadysocket.runtime.redis_broker.RedisBroker` (the ``steadysocket[redis]`` extra):
  any number of processes on any number of machines, through one Redis.

Errors::

    ConnectionError
    └── BrokerUnavailable       the broker's store cannot be reached (presence, client count)
        └── BrokerOverflow      publish(): too many publications already wait for the store
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.ledger import Claim, SessionRecord, Write, Written
from steadysocket.model.routing import Publication, Rooms, Target

__all__ = [
    "Broker",
    "BrokerOverflow",
    "BrokerUnavailable",
    "MemoryBroker",
    "Node",
    "SharedSessions",
]


class BrokerUnavailable(ConnectionError):
    """The broker's store (Redis) cannot be reached now; the caller may retry later."""


class BrokerOverflow(BrokerUnavailable):
    """A publication was refused: ``limit`` publications already wait for the store.

    The publishing process delivered it to its own clients; the other processes never get it.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} publications already wait for the broker's store: this one reached "
            "this process's clients only"
        )
        self.limit = limit


class Node(Protocol):
    """What a broker needs from the server it serves (``Endpoints`` implements it)."""

    @property
    def rooms(self) -> Rooms:
        """The room memberships of this node's clients."""

    @property
    def local_client_count(self) -> int:
        """How many ``/ws/client`` connections this node holds."""

    def deliver(self, publication: Publication, entry_id: str, *, own: bool) -> None:
        """Deliver a publication read from the store at ``entry_id`` to this node's clients
        (never waits). ``own``: this node published it, and delivered it to its v1
        connections already; with shared sessions its v2 sessions get it only now."""


class SharedSessions(Protocol):
    """A store that holds the v2 sessions of every node (``model/ledger.py``'s rules).

    Every coroutine raises :class:`BrokerUnavailable` when the store cannot be reached.
    """

    @property
    def epoch(self) -> str | None:
        """The cluster's epoch (None until the store was reached once)."""

    @property
    def cursor(self) -> str:
        """The stream position up to which this node's reader delivered publications."""

    @property
    def queued(self) -> int:
        """The number (``seq``) of this node's last publication so far."""

    async def published(self, seq: int) -> None:
        """Wait until this node's publications up to ``seq`` are in the store (a handler's
        publications are, before its message is acknowledged)."""

    def backoff(self) -> BackoffStrategy:
        """A fresh reconnect strategy for a task that retries the store."""

    async def write(self, writes: Sequence[Write]) -> list[Written]:
        """Carry out ``writes``, in one round trip; what became of each."""

    async def claim(
        self, session_id: str, client_id: str, role: str, owner: str, held: str, within_ms: float
    ) -> tuple[Claim, SessionRecord | None]:
        """Claim a session for ``owner`` (``held``: this node's current claim, or ''); a claim
        the store carries out more than ``within_ms`` from now takes nothing over.

        Raises:
            BrokerUnavailable: the store cannot be reached, or carried the claim out too late.
            ValueError: the store's record of it is malformed.
        """

    async def trimmed_past(self, since: str) -> bool:
        """Whether the publication stream dropped an entry after ``since``."""

    async def read_after(self, since: str, count: int) -> list[tuple[str, Publication | None]]:
        """Up to ``count`` publications after ``since`` (None: a malformed entry)."""


class Broker(Protocol):
    """How a node reaches the others. Started by the server it serves, closed with it."""

    @property
    def node_id(self) -> str:
        """This node's name in the cluster (random per process)."""

    @property
    def shared_sessions(self) -> SharedSessions | None:
        """The store of every node's v2 sessions; None: each node keeps its own."""

    async def start(self, node: Node) -> None:
        """Start serving ``node`` (connect, start reading the other nodes' publications)."""

    async def close(self) -> None:
        """Stop; what is still queued for the store is dropped (bounded, never hangs)."""

    async def publish(self, target: Target, key: str, text: str) -> None:
        """Carry a publication to the other nodes; the caller already delivered it locally.

        Raises:
            BrokerOverflow: the store is unreachable and the queue for it is full.
        """

    async def joined(self, room: str, client_id: str) -> None:
        """``client_id`` joined ``room`` on this node: announce it (the node's rooms hold it)."""

    def left(self, room: str, client_id: str) -> None:
        """``client_id`` left ``room`` on this node: withdraw it (soon; never waits)."""

    def clients_changed(self) -> None:
        """This node's client count changed: announce it (soon; never waits)."""

    async def presence(self, room: str) -> frozenset[str]:
        """The client ids in ``room`` on every live node.

        Raises:
            BrokerUnavailable: the store cannot be reached.
        """

    async def client_count(self) -> int:
        """How many ``/ws/client`` connections every live node holds.

        Raises:
            BrokerUnavailable: the store cannot be reached.
        """


class MemoryBroker:
    """The one-process broker: nothing to carry, presence and count are the node's own."""

    def __init__(self) -> None:
        self._node: Node | None = None

    @property
    def node_id(self) -> str:
        """Always ``"local"``: there is no other node."""
        return "local"

    @property
    def shared_sessions(self) -> None:
        """None: the server keeps its v2 sessions itself."""
        return None

    async def start(self, node: Node) -> None:
        """Remember the node whose rooms and clients answer presence."""
        self._node = node

    async def close(self) -> None:
        """Nothing to stop."""

    async def publish(self, target: Target, key: str, text: str) -> None:
        """No other node: the local delivery was all of it."""

    async def joined(self, room: str, client_id: str) -> None:
        """The node's rooms are the presence."""

    def left(self, room: str, client_id: str) -> None:
        """The node's rooms are the presence."""

    def clients_changed(self) -> None:
        """The node's clients are the count."""

    async def presence(self, room: str) -> frozenset[str]:
        """The client ids in ``room`` on this node."""
        return frozenset() if self._node is None else self._node.rooms.members(room)

    async def client_count(self) -> int:
        """The ``/ws/client`` connections of this node."""
        return 0 if self._node is None else self._node.local_client_count
