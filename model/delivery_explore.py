"""An explicit-state model checker for protocol v2's delivery rules (``model/delivery.py``).

It explores, breadth first, every world reachable with a few application messages each way: the
client's :class:`ClientDelivery`, the server's :class:`SessionStore`, one connection with the
frames in flight in each direction, and a handler that may be running. The edges are: the
application sends; the server publishes; a frame arrives at either end; a handler returns or is
cancelled; a batched ack falls due on either side; the client connects (resuming if it can);
the connection drops (at any point: between a handler returning and its ack, between a replay
and the client's ack, ...); the server restarts and loses every session (a new epoch); a
disconnected session expires. It drives the very classes the runtime drives.

Invariants, checked in every world:

- ``C2S_EXACTLY_ONCE``: no message is handled twice, and messages are handled in the order they
  were sent. A message handed back ("not acknowledged") was never handled by a session that
  still exists; once the world is quiet, every message is handled or handed back (never both
  within a session, never neither).
- ``S2C_EXACTLY_ONCE``: no publication reaches the client's listeners twice or out of order, and
  once the world is quiet every publication of a session that still exists was delivered.
- ``NO_SILENT_GAP``: a publication is skipped only after the client was told ``resumed: false``.
- ``BOUNDED``: the history, the outbox and the dedup state never exceed their bounds.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from steadysocket.model.delivery import (
    ClientDelivery,
    DeliveryConfig,
    Inbound,
    Pending,
    ResumeOutcome,
    ServerSession,
    SessionStore,
    number,
)


class Invariant(StrEnum):
    """The delivery properties checked in every reachable world."""

    C2S_EXACTLY_ONCE = "client to server: each message handled once, in order, or handed back"
    S2C_EXACTLY_ONCE = "server to client: each publication delivered once, in order"
    NO_SILENT_GAP = "a skipped publication only after resumed: false"
    BOUNDED = "history, outbox and dedup state within their bounds"
    NO_PROTOCOL_ERROR = "neither side ever sees a gap or an offset that was never sent"


@dataclass(frozen=True, slots=True)
class Bounds:
    """How much the explorer lets happen in one run."""

    messages: int = 2
    """Application messages the client sends."""
    publications: int = 2
    """Messages the server publishes to the client."""
    drops: int = 2
    restarts: int = 1
    expiries: int = 1
    history_limit: int = 2
    outbox_limit: int = 2
    ack_every: int = 2


@dataclass
class World:
    """Everything the explorer tracks (mutable; copied per edge)."""

    client: ClientDelivery
    store: SessionStore
    epochs: int = 1
    connected: bool = False
    hello_seen: bool = False
    session: str | None = None
    """The server-side session of the current connection."""
    c2s: deque[str] = field(default_factory=deque)
    s2c: deque[str] = field(default_factory=deque)
    conn: int = 0
    """The number of the current (or last) connection."""
    handler: tuple[str, int, int, int] | None = None
    """The running handler: (session id, connection, message id, message number)."""
    sent: int = 0
    published: int = 0
    drops: int = 0
    restarts: int = 0
    expiries: int = 0
    handled: list[tuple[str, int]] = field(default_factory=list)
    """(session id, message number) for every handler that returned."""
    handed_back: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    published_to: dict[int, str] = field(default_factory=dict)
    """Publication number -> the session it was published in."""
    told_gap: bool = False
    """The client heard resumed: false since its last delivery."""
    sessions_made: int = 0
    protocol_error: str | None = None

    def clone(self) -> World:
        """A copy to apply one edge to (``copy.deepcopy`` costs ten times as much)."""
        client = copy.copy(self.client)
        client.outbox = deque(self.client.outbox)
        client.offsets = copy.copy(self.client.offsets)
        store = copy.copy(self.store)
        store.sessions = {}
        for sid, session in self.store.sessions.items():
            twin = copy.copy(session)
            twin.history = deque(session.history)
            twin.ids = copy.copy(session.ids)
            store.sessions[sid] = twin
        twin_world = copy.copy(self)
        twin_world.client, twin_world.store = client, store
        twin_world.c2s, twin_world.s2c = deque(self.c2s), deque(self.s2c)
        twin_world.handled = list(self.handled)
        twin_world.handed_back = list(self.handed_back)
        twin_world.delivered = list(self.delivered)
        twin_world.published_to = dict(self.published_to)
        return twin_world

    def key(self) -> tuple[object, ...]:
        c = self.client
        sessions = tuple(
            sorted(
                (
                    s.session_id,
                    s.next_offset,
                    tuple(o for o, _ in s.history),
                    s.trimmed_upto,
                    s.ids.last,
                    s.ids.acked,
                    s.handling,
                    s.connected,
                )
                for s in self.store.sessions.values()
            )
        )
        return (
            c.session_id,
            c.epoch,
            c.next_id,
            tuple(p.text for p in c.outbox),
            c.written,
            c.ever_written,
            c.offsets.last,
            c.offsets.acked,
            self.store.epoch,
            sessions,
            self.connected,
            self.hello_seen,
            self.session,
            tuple(self.c2s),
            tuple(self.s2c),
            self.conn,
            self.handler,
            self.sent,
            self.published,
            self.drops,
            self.restarts,
            self.expiries,
            tuple(self.handled),
            tuple(self.handed_back),
            tuple(self.delivered),
            tuple(sorted(self.published_to.items())),
            self.told_gap,
            self.protocol_error,
        )


@dataclass(frozen=True, slots=True)
class Violation:
    """An invariant broken in a world, with the shortest trace that reaches it."""

    invariant: Invariant
    detail: str
    trace: tuple[str, ...]

    def __str__(self) -> str:
        steps = "\n  ".join(self.trace) or "(initial world)"
        return f"{self.invariant.name}: {self.detail}\n  after:\n  {steps}"


@dataclass(slots=True)
class Report:
    """What a run found."""

    bounds: Bounds
    states: int = 0
    edges: int = 0
    quiet: int = 0
    complete: bool = False
    """Every reachable world was explored (not cut short by ``max_states``)."""
    violations: list[Violation] = field(default_factory=list)

    @property
    def broken(self) -> set[Invariant]:
        """The invariants with at least one violation."""
        return {v.invariant for v in self.violations}

    def summary(self) -> str:
        """One line for the test output."""
        status = "ok" if not self.violations else f"{len(self.violations)} violations"
        b = self.bounds
        return (
            f"{b.messages} messages each way, {b.drops} drops, {b.restarts} restart, "
            f"{b.expiries} expiry: {self.states} states, {self.edges} edges, "
            f"{self.quiet} quiet, {status}"
        )


def _increasing(numbers: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(numbers))


def _field(text: str, name: str) -> int:
    value = json.loads(text)[name]
    assert isinstance(value, int)
    return value


class Explorer:
    """Breadth-first search over worlds; ``store_cls``, ``client_cls`` and ``ack_on_arrival``
    (acknowledge an id when it arrives, before its handler ran) make broken variants."""

    def __init__(
        self,
        bounds: Bounds | None = None,
        *,
        store_cls: type[SessionStore] = SessionStore,
        client_cls: type[ClientDelivery] = ClientDelivery,
        ack_on_arrival: bool = False,
    ) -> None:
        self.bounds = bounds or Bounds()
        self.config = DeliveryConfig(
            history_limit=self.bounds.history_limit, ack_every=self.bounds.ack_every
        )
        self.store_cls = store_cls
        self.client_cls = client_cls
        self.ack_on_arrival = ack_on_arrival

    def initial(self) -> World:
        client = self.client_cls(self.config, outbox_limit=self.bounds.outbox_limit)
        return World(client, self.store_cls("e1", self.config))

    # -- edges -----------------------------------------------------------------------------

    def edges(self, w: World) -> Iterator[tuple[str, Callable[[World], None]]]:
        if w.protocol_error is not None:
            return
        b = self.bounds
        if w.sent < b.messages and not w.client.full:
            yield "app sends", self.app_sends
        if w.published < b.publications and self._client_session(w) is not None:
            yield "server publishes", self.server_publishes
        if not w.connected:
            yield "client connects", self.connect
        else:
            if w.c2s and self._server_reads(w):
                yield f"server reads {w.c2s[0]}", self.server_reads
            if w.s2c:
                yield f"client reads {w.s2c[0]}", self.client_reads
            if w.drops < b.drops:
                yield "connection drops", self.drop
            if w.hello_seen and w.client.offsets.timer_wanted:
                yield "client ack timer", self.client_ack_timer
            session = self._current(w)
            if session is not None and session.ids.timer_wanted:
                yield "server ack timer", self.server_ack_timer
        if w.handler is not None:
            yield "handler returns", self.handler_returns
            if not (w.connected and w.conn == w.handler[1]):
                # Only a handler whose connection ended is cancelled (or the process died).
                yield "handler cancelled", self.handler_cancelled
        if w.restarts < b.restarts:
            yield "server restarts", self.restart
        if w.expiries < b.expiries and any(not s.connected for s in w.store.sessions.values()):
            yield "session expires", self.expire

    def _current(self, w: World) -> ServerSession | None:
        return None if w.session is None else w.store.sessions.get(w.session)

    def _client_session(self, w: World) -> ServerSession | None:
        sessions = w.store.of_client("c")
        return sessions[0] if sessions else None

    def _server_reads(self, w: World) -> bool:
        # A connection reads one message at a time: not while a handler it started runs. (A
        # handler started by an earlier connection of the session may still run: BUSY.)
        return not (w.handler is not None and w.handler[1] == w.conn)

    def app_sends(self, w: World) -> None:
        number = w.sent + 1
        w.sent = number
        w.client.accept(json.dumps({"n": number}, separators=(",", ":")))
        if w.hello_seen:
            self._client_writes(w)

    def _client_writes(self, w: World) -> None:
        for pending in w.client.to_write():
            w.c2s.append(pending.text)

    def server_publishes(self, w: World) -> None:
        session = self._client_session(w)
        assert session is not None
        number = w.published + 1
        w.published = number
        text = session.publish(json.dumps({"p": number}, separators=(",", ":")))
        w.published_to[number] = session.session_id
        if session.connected and w.session == session.session_id:
            w.s2c.append(text)

    def connect(self, w: World) -> None:
        w.sessions_made += 1
        opened = w.store.open("c", "r", w.client.resume_query(), 0.0, f"s{w.sessions_made}")
        # A resumed session may still be held by a connection the server has not seen end.
        w.connected, w.hello_seen, w.session = True, False, opened.session.session_id
        w.conn += 1
        w.c2s.clear()
        w.s2c.clear()
        hello = json.dumps(
            {
                "type": "hello",
                "session_id": opened.session.session_id,
                "epoch": w.store.epoch,
                "resumed": opened.resumed,
            }
        )
        w.s2c.append(hello)
        w.s2c.extend(self._replay(opened.session, w.client.last_offset, opened.replay))

    def _replay(self, session: ServerSession, offset: int, replay: tuple[str, ...]) -> list[str]:
        return list(replay)

    def server_reads(self, w: World) -> None:
        text = w.c2s.popleft()
        session = self._current(w)
        assert session is not None, "a connected world has its session"
        message = json.loads(text)
        if message.get("type") == "ack":
            if not session.client_acked(int(message["offset"])):
                self._protocol_error(w, f"client acked unsent offset {message['offset']}")
            return
        msg_id = int(message["id"])
        outcome, ack = session.inbound(msg_id)
        if outcome is Inbound.DELIVER:
            w.handler = (session.session_id, w.conn, msg_id, int(message["n"]))
            if self.ack_on_arrival:
                session.ids.note(msg_id)
                w.s2c.append(json.dumps({"type": "ack", "id": session.ids.flush()}))
        elif outcome is Inbound.DUPLICATE:
            assert ack is not None
            w.s2c.append(json.dumps({"type": "ack", "id": ack}))
        elif outcome is Inbound.BUSY:
            w.c2s.appendleft(text)  # read again once the handler returned
        else:
            self._protocol_error(w, f"server saw a gap at id {msg_id}")

    def handler_returns(self, w: World) -> None:
        assert w.handler is not None
        session_id, _, msg_id, number = w.handler
        w.handler = None
        session = w.store.sessions.get(session_id)
        w.handled.append((session_id, number))
        if session is None:
            return
        ack = session.handled(msg_id)
        if ack is not None and w.connected and w.session == session_id:
            w.s2c.append(json.dumps({"type": "ack", "id": ack}))

    def handler_cancelled(self, w: World) -> None:
        assert w.handler is not None
        session_id, _, msg_id, _ = w.handler
        w.handler = None
        session = w.store.sessions.get(session_id)
        if session is not None:
            session.interrupted(msg_id)

    def client_reads(self, w: World) -> None:
        text = w.s2c.popleft()
        message = json.loads(text)
        kind = message.get("type")
        client = w.client
        if kind == "hello":
            lost = client.opened(message["session_id"], message["epoch"], message["resumed"])
            if not message["resumed"]:
                w.told_gap = True
            w.handed_back.extend(_field(p.text, "n") for p in lost)
            w.hello_seen = True
            self._client_writes(w)
        elif kind == "ack":
            client.acked(int(message["id"]))
        else:
            outcome, ack = client.received(_field(text, "offset"))
            if outcome is Inbound.DELIVER:
                w.delivered.append(_field(text, "p"))
                w.told_gap = False
            elif outcome is Inbound.GAP:
                self._protocol_error(w, f"client saw a gap at offset {message['offset']}")
                return
            if ack is not None:
                w.c2s.append(json.dumps({"type": "ack", "offset": ack}))

    def client_ack_timer(self, w: World) -> None:
        ack = w.client.offsets.due()  # offered only when an ack is owed
        w.c2s.append(json.dumps({"type": "ack", "offset": ack}))

    def server_ack_timer(self, w: World) -> None:
        session = self._current(w)
        assert session is not None
        ack = session.ids.due()  # offered only when an ack is owed
        w.s2c.append(json.dumps({"type": "ack", "id": ack}))

    def _protocol_error(self, w: World, detail: str) -> None:
        # Never in a correct run: the world is marked, checked, and explored no further.
        w.protocol_error = detail
        self._end_connection(w)

    def drop(self, w: World) -> None:
        w.drops += 1
        self._end_connection(w)

    def _end_connection(self, w: World) -> None:
        session = self._current(w)
        assert session is not None, "a connected world has its session"
        w.store.disconnected(session, 0.0)
        w.connected, w.hello_seen, w.session = False, False, None
        w.c2s.clear()
        w.s2c.clear()
        w.client.closed()

    def restart(self, w: World) -> None:
        if w.connected:
            self._end_connection(w)
        w.restarts += 1
        w.epochs += 1
        w.store = self.store_cls(f"e{w.epochs}", self.config)
        w.handler = None  # the process died with its handler

    def expire(self, w: World) -> None:
        w.expiries += 1
        # One session per client (a new one supersedes), and the edge is offered only while
        # it is disconnected: the window passes for it.
        w.store.expire(self.config.window_ms + 1.0)

    # -- invariants ------------------------------------------------------------------------

    def quiet(self, w: World) -> bool:
        """Nothing left to happen but new faults: the ledgers must be complete."""
        b = self.bounds
        session = self._current(w)
        return (
            w.sent == b.messages
            and w.published == b.publications
            and w.connected
            and w.hello_seen
            and not w.c2s
            and not w.s2c
            and w.handler is None
            and not w.client.offsets.timer_wanted
            and (session is None or not session.ids.timer_wanted)
        )

    def problems(self, w: World) -> list[tuple[Invariant, str]]:
        out: list[tuple[Invariant, str]] = []
        if w.protocol_error is not None:
            out.append((Invariant.NO_PROTOCOL_ERROR, w.protocol_error))
        numbers = [n for _, n in w.handled]
        if not _increasing(numbers):
            out.append((Invariant.C2S_EXACTLY_ONCE, f"handled twice or out of order: {numbers}"))
        live = set(w.store.sessions)
        for session_id, n in w.handled:
            if n in w.handed_back and session_id in live:
                out.append(
                    (
                        Invariant.C2S_EXACTLY_ONCE,
                        f"#{n} handled in live {session_id} and handed back",
                    )
                )
        if not _increasing(w.delivered):
            out.append(
                (Invariant.S2C_EXACTLY_ONCE, f"delivered twice or out of order: {w.delivered}")
            )
        b = self.bounds
        for s in w.store.sessions.values():
            if len(s.history) > b.history_limit:
                out.append((Invariant.BOUNDED, f"history of {len(s.history)}"))
        if len(w.client.outbox) > b.outbox_limit:
            out.append((Invariant.BOUNDED, f"outbox of {len(w.client.outbox)}"))
        if self.quiet(w):
            outcome = (
                set(numbers) | set(w.handed_back) | {_field(p.text, "n") for p in w.client.outbox}
            )
            missing = set(range(1, b.messages + 1)) - outcome
            if missing:
                out.append(
                    (Invariant.C2S_EXACTLY_ONCE, f"neither handled nor handed back: {missing}")
                )
            lost = [p for p, s in w.published_to.items() if s in live and p not in w.delivered]
            if lost:
                out.append((Invariant.S2C_EXACTLY_ONCE, f"published, never delivered: {lost}"))
        return out

    def check_gap(self, before: World, after: World) -> list[tuple[Invariant, str]]:
        if len(after.delivered) > len(before.delivered):
            new = after.delivered[-1]
            previous = before.delivered[-1] if before.delivered else 0
            if new > previous + 1 and not before.told_gap:
                return [(Invariant.NO_SILENT_GAP, f"delivered #{new} after #{previous}, untold")]
        return []

    # -- search ----------------------------------------------------------------------------

    def run(self, max_states: int = 2_000_000, *, stop_at_first: bool = False) -> Report:
        """Explore every reachable world (up to ``max_states``); ``stop_at_first`` ends the
        search at the first violation (still with a shortest trace: the search is breadth
        first)."""
        report = Report(self.bounds)
        start = self.initial()
        seen: dict[tuple[object, ...], tuple[tuple[object, ...], str] | None] = {start.key(): None}
        queue: deque[World] = deque([start])
        broken: set[Invariant] = set()
        while queue and report.states < max_states:
            world = queue.popleft()
            report.states += 1
            key = world.key()
            if self.quiet(world):
                report.quiet += 1
            for label, action in self.edges(world):
                nxt = world.clone()
                action(nxt)
                report.edges += 1
                nkey = nxt.key()
                if nkey in seen:
                    continue
                seen[nkey] = (key, label)
                for invariant, detail in self.check_gap(world, nxt) + self.problems(nxt):
                    if invariant not in broken:
                        broken.add(invariant)
                        trace = _trace(seen, nkey)
                        report.violations.append(Violation(invariant, detail, trace))
                        if stop_at_first:
                            return report
                queue.append(nxt)
        report.complete = not queue
        return report


def _trace(
    seen: dict[tuple[object, ...], tuple[tuple[object, ...], str] | None], key: tuple[object, ...]
) -> tuple[str, ...]:
    steps: list[str] = []
    entry = seen[key]
    while entry is not None:
        parent, label = entry
        steps.append(label)
        entry = seen[parent]
    return tuple(reversed(steps))


# -- broken variants, each rejected by the invariant it breaks ----------------------------------


class _NoDedupSession(ServerSession):
    """Handles a re-sent id again."""

    def inbound(self, msg_id: int) -> tuple[Inbound, int | None]:
        if msg_id <= self.ids.last and self.handling is None:
            self.handling = msg_id
            return Inbound.DELIVER, None
        return ServerSession.inbound(self, msg_id)


class _NoDedupStore(SessionStore):
    session_class = _NoDedupSession


class _WrongReplayExplorer(Explorer):
    """Replays from the wrong offset: the newest missed message is left out."""

    def _replay(self, session: ServerSession, offset: int, replay: tuple[str, ...]) -> list[str]:
        return list(replay[:-1])


class _SkipFirstReplayExplorer(Explorer):
    """Replays from the wrong offset: the oldest missed message is left out."""

    def _replay(self, session: ServerSession, offset: int, replay: tuple[str, ...]) -> list[str]:
        return list(replay[1:])


class _NoReplayExplorer(Explorer):
    """Resumes the session but replays nothing."""

    def _replay(self, session: ServerSession, offset: int, replay: tuple[str, ...]) -> list[str]:
        return []


class _EarlyReplaySession(ServerSession):
    """Replays its whole history, also what the client already has but did not ack yet."""

    def replay(self, offset: int) -> list[str]:
        return [text for _, text in self.history]


class _EarlyReplayStore(SessionStore):
    session_class = _EarlyReplaySession


class _TrustingClient(ClientDelivery):
    """Delivers every offset it receives: no duplicate check, no gap check."""

    def received(self, offset: int) -> tuple[Inbound, int | None]:
        return Inbound.DELIVER, self.offsets.note(offset)


class _HandsBackAlwaysClient(ClientDelivery):
    """Hands back what was written even when the session resumed."""

    def opened(
        self,
        session_id: str,
        epoch: str,
        resumed: bool,
        outcome: ResumeOutcome | None = None,
        replayed: int = 0,
    ) -> list[Pending]:
        written = [p for p in self.outbox if p.id <= self.ever_written]
        ClientDelivery.opened(self, session_id, epoch, resumed, outcome, replayed)
        return written


class _UnboundedClient(ClientDelivery):
    """Never reports its outbox full."""

    @property
    def full(self) -> bool:
        return False


class _UntrimmedSession(ServerSession):
    """Keeps every published message, whatever the history limit."""

    def publish(self, text: str) -> str:
        offset = self.next_offset
        self.next_offset += 1
        numbered = number(text, "offset", offset)
        self.history.append((offset, numbered))
        return numbered


class _UntrimmedStore(SessionStore):
    session_class = _UntrimmedSession


def variants() -> dict[str, Explorer]:
    """Broken variants the checker must reject, by name (the first three are the issue's)."""
    s2c = Bounds(messages=0, publications=3, drops=2, restarts=0, expiries=0)
    return {
        "ack before the handler runs": Explorer(ack_on_arrival=True),
        "replay from the wrong offset": _WrongReplayExplorer(),
        "no dedup on re-send": Explorer(store_cls=_NoDedupStore),
        "resume replays nothing": _NoReplayExplorer(),
        "no duplicate check on the client": Explorer(
            store_cls=_EarlyReplayStore, client_cls=_TrustingClient
        ),
        "replay of what the client has (dropped by its check)": Explorer(
            s2c, store_cls=_EarlyReplayStore
        ),
        "a gap delivered silently": _SkipFirstReplayExplorer(
            Bounds(messages=0, publications=3, drops=1, restarts=0, expiries=0),
            client_cls=_TrustingClient,
        ),
        "hands back after a resume too": Explorer(client_cls=_HandsBackAlwaysClient),
        "outbox without a bound": Explorer(
            Bounds(messages=3, publications=0, drops=0, restarts=0, expiries=0, outbox_limit=2),
            client_cls=_UnboundedClient,
        ),
        "history without a bound": Explorer(s2c, store_cls=_UntrimmedStore),
    }
