"""Shared v2 sessions, the server's side: write ahead, claim on resume, catch up after a move.

Active when the server's broker shares its sessions (``RedisBroker``; ``MemoryBroker`` does
not). The rules are ``model/ledger.py``'s; this module runs them:

- **Writer** (one task per server): the sessions that changed are written to the store in
  batches, one round trip per batch. What a landed write lets out (numbered texts for the socket,
  the ack of handled ids) goes to the session's connection; a fenced write means another process
  took the session over (its connection here is closed: ``Session resumed elsewhere``); a write
  that finds the session gone (expired, or the store restarted empty) closes it with 1013, and
  the client's resume is told ``resumed: false``. While the store is unreachable the writer
  retries with the broker's backoff; the sessions' messages wait (nothing is lost, nothing goes
  out unwritten). Every ``renew_ms`` each connected session is written again, which keeps it in
  the store for the window after its process dies.
- **Claim**: a v2 resume first claims the session in the store. If another process (or an older
  claim of this one) had it, the store's record replaces this process's copy, and the session
  catches up on the publications it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Protocol

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.delivery import DeliveryConfig, ResumeOutcome, SessionStore
from steadysocket.model.delivery import ServerSession as DeliverySession
from steadysocket.model.ledger import (
    CatchUp,
    Claim,
    Released,
    SessionRecord,
    Write,
    WriteAhead,
    Written,
    stream_after,
)
from steadysocket.model.routing import Publication, Rooms
from steadysocket.runtime.broker import BrokerUnavailable, SharedSessions

__all__ = ["Ledger", "LedgerHost", "LedgerSession"]

logger = logging.getLogger(__name__)

BATCH = 200
"""At most this many sessions per write round trip."""
CATCH_UP_PAGE = 1000
"""Stream entries per catch-up read."""


@dataclass(slots=True, eq=False)
class LedgerSession(DeliverySession):
    """A v2 session with its place in the shared store."""

    wal: WriteAhead = field(default_factory=WriteAhead)
    claim: str = ""
    """This process's claim on the session in the store ('' before its first write)."""
    catch_up: CatchUp | None = None
    """Set after a move, while publications may still arrive that the catch-up offered."""
    buffered: list[tuple[str, Publication]] | None = None
    """While the catch-up reads: what the process's reader delivered to the session meanwhile."""


class LedgerHost(Protocol):
    """What the ledger needs from the server it serves (``Endpoints`` implements it)."""

    @property
    def sessions(self) -> SessionStore:
        """The server's v2 sessions."""

    @property
    def rooms(self) -> Rooms:
        """The room memberships of the server's clients."""

    def session_connected(self, session: LedgerSession) -> bool:
        """Whether a connection carries ``session`` now."""

    def released(self, session: LedgerSession, released: Released) -> None:
        """A write of ``session`` landed: send what it lets out."""

    def lost(self, session: LedgerSession, written: Written) -> None:
        """``session`` is no longer this process's (FENCED) or no longer exists (GONE)."""

    async def rejoin(self, client_id: str, rooms: tuple[str, ...]) -> None:
        """A session moved here: its client's rooms, as the store recorded them."""

    def publish_into(self, session: LedgerSession, text: str) -> None:
        """Number ``text`` in ``session`` and keep it (it goes out once written)."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a claim left for the resume: the moved session to catch up, if any."""

    moved: LedgerSession | None = None
    entries: tuple[tuple[str, Publication], ...] = ()


class Ledger:
    """Runs one server's shared v2 sessions (see the module docstring)."""

    def __init__(
        self,
        store: SharedSessions,
        host: LedgerHost,
        node_id: str,
        delivery: DeliveryConfig,
        *,
        renew_ms: float,
    ) -> None:
        self._store = store
        self._host = host
        self._node_id = node_id
        self._delivery = delivery
        self._renew_ms = renew_ms
        self._claims = itertools.count(1)
        self._dirty: dict[str, LedgerSession] = {}
        self._wake = asyncio.Event()
        self._landed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.writes = 0
        """Session writes that landed."""
        self.failures = 0
        """Failed write round trips (each followed by a backoff delay)."""
        self.reachable = True
        """False from a failed write round trip until one succeeds."""

    @property
    def epoch(self) -> str | None:
        """The cluster's epoch (None until the store was reached)."""
        return self._store.epoch

    @property
    def pending(self) -> int:
        """Sessions with changes not yet written."""
        return len(self._dirty)

    # ---- writes ---------------------------------------------------------------------------

    def new_claim(self) -> str:
        """A claim token unique to this process and this claim."""
        return f"{self._node_id}:{next(self._claims)}"

    def touch(self, session: LedgerSession) -> None:
        """``session`` changed: write it soon (its new messages wait for that write)."""
        if not session.claim:
            session.claim = self.new_claim()
        if not session.wal.dirty:
            session.wal.dirty = True
            self._dirty[session.session_id] = session
        self._wake.set()

    def start(self) -> None:
        """Start the writer."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="steadysocket-session-writer")

    async def close(self, *, flush_timeout: float = 1.0) -> None:
        """Stop the writer, then write what changed since its last write, within
        ``flush_timeout`` seconds (best effort: the server is stopping; what is not written is
        what no client was sent)."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(BrokerUnavailable, TimeoutError):
            async with asyncio.timeout(flush_timeout):
                while taken := self._take():
                    await self._store.published(self._store.queued)
                    results = await self._store.write([write for _, write in taken])
                    for (session, write), result in zip(taken, results, strict=True):
                        self._confirm(session, write, result)

    def _renew(self) -> None:
        for session in list(self._host.sessions.sessions.values()):
            if isinstance(session, LedgerSession) and self._host.session_connected(session):
                self.touch(session)

    def _take(self) -> list[tuple[LedgerSession, Write]]:
        taken: list[tuple[LedgerSession, Write]] = []
        cursor = self._store.cursor
        while self._dirty and len(taken) < BATCH:
            session_id = next(iter(self._dirty))
            session = self._dirty.pop(session_id)
            if self._host.sessions.sessions.get(session_id) is not session:
                session.wal.dirty = False  # dropped here: nothing to write
                continue
            if session.buffered is not None:  # catching up: written once it is whole
                session.wal.dirty = False
                continue
            since = cursor
            if session.catch_up is not None and stream_after(session.catch_up.since, cursor):
                since = session.catch_up.since
            connected = self._host.session_connected(session)
            ttl = self._delivery.window_ms + (2 * self._renew_ms if connected else 0)
            write = session.wal.write(
                session,
                owner=session.claim,
                since=since,
                rooms=self._host.rooms.rooms_of(session.client_id),
                ttl_ms=int(ttl) + 1,
            )
            taken.append((session, write))
        return taken

    async def _run(self) -> None:
        strategy = self._store.backoff()
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._dirty:
                self._wake.clear()
                timer = loop.call_later(self._renew_ms / 1000, self._renew)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                continue
            taken = self._take()
            if not taken:
                continue
            # What the handlers of the ids in these writes published goes first: an id is
            # acknowledged only once its handler's publications are in the store too.
            await self._store.published(self._store.queued)
            try:
                results = await self._store.write([write for _, write in taken])
            except BrokerUnavailable as exc:
                self.failures += 1
                self.reachable = False
                for session, _ in taken:
                    self.touch(session)
                await self._pause(strategy, exc)
                continue
            strategy.reset()
            self.reachable = True
            for (session, write), result in zip(taken, results, strict=True):
                self._confirm(session, write, result)
            async with self._landed:
                self._landed.notify_all()

    async def created(self, session: LedgerSession) -> bool:
        """Wait until the store holds ``session`` (its first write landed), so that the hello's
        ``session_id`` can be resumed on any process; False if the store refused it."""
        self.touch(session)
        async with self._landed:
            await self._landed.wait_for(
                lambda: (
                    session.wal.created
                    or self._host.sessions.sessions.get(session.session_id) is not session
                )
            )
        return session.wal.created

    def _confirm(self, session: LedgerSession, write: Write, result: Written) -> None:
        if result is not Written.LANDED:
            if self._host.sessions.sessions.get(session.session_id) is session:
                self._host.sessions.discard(session)
            self._host.lost(session, result)
            return
        self.writes += 1
        released = session.wal.confirmed(write, session)
        if released.texts or released.ack is not None:
            self._host.released(session, released)

    async def _pause(self, strategy: BackoffStrategy, exc: BaseException) -> None:
        delay = strategy.next_delay()
        if delay is None:  # spent: start again (the writer never gives up)
            strategy.reset()
            delay = strategy.next_delay()
            assert delay is not None
        logger.info("writing v2 sessions failed (%s); retrying in %.0f ms", exc, delay)
        await asyncio.sleep(delay / 1000)

    # ---- claims and catch-up --------------------------------------------------------------

    async def prepare(
        self, client_id: str, role: str, resume: dict[str, str], *, within_ms: float
    ) -> Prepared:
        """Before a v2 connection opens: claim the session it resumes, if it names one of this
        epoch, so that the store's record (not a stale copy) is what resumes. A claim the store
        carries out more than ``within_ms`` from now takes nothing over.

        Raises:
            BrokerUnavailable: the store cannot be reached (the client should try again).
        """
        sessions = self._host.sessions
        session_id = resume.get("session_id")
        if session_id is None or resume.get("epoch") != self.epoch:
            return Prepared()
        local = sessions.sessions.get(session_id)
        held = local.claim if isinstance(local, LedgerSession) else ""
        claim = self.new_claim()
        try:
            outcome, record = await self._store.claim(
                session_id, client_id, role, claim, held, within_ms
            )
        except ValueError as exc:
            logger.warning("session %s: its record is unusable (%s)", session_id[:6], exc)
            outcome, record = Claim.UNKNOWN, None
        if outcome is Claim.KEPT or outcome is Claim.FOREIGN:
            return Prepared()
        if outcome is Claim.UNKNOWN and isinstance(local, LedgerSession) and not local.wal.created:
            return Prepared()  # not written yet: this process's copy is the only one
        if local is not None and sessions.sessions.get(session_id) is local:
            sessions.discard(local)  # stale: the store's record is the session now
            if isinstance(local, LedgerSession):
                self._host.lost(local, Written.FENCED)
        if record is None:
            return Prepared()
        moved = self._install(record, claim)
        try:
            entries = await self._read_missed(record.since)
        except BaseException:
            moved.buffered = None
            raise
        if entries is None:  # the stream no longer holds what it missed
            moved.trimmed_upto = moved.next_offset
            moved.buffered = None
            return Prepared()
        await self._host.rejoin(client_id, record.rooms)
        return Prepared(moved, entries)

    def _install(self, record: SessionRecord, claim: str) -> LedgerSession:
        sessions = self._host.sessions
        moved = sessions.session_class(
            record.session_id, record.client_id, record.role, self._delivery
        )
        assert isinstance(moved, LedgerSession)  # the server's sessions are LedgerSessions
        record.restore(moved)
        moved.wal.adopt(record)
        moved.claim = claim
        moved.catch_up = CatchUp(record.client_id, frozenset(record.rooms), record.since)
        moved.buffered = []
        for other in sessions.of_client(record.client_id):
            if other is not moved and isinstance(other, LedgerSession):
                # The store says this one is the client's newest: any other here is older.
                sessions.discard(other)
                self._host.lost(other, Written.FENCED)
        sessions.adopt(moved)
        return moved

    async def _read_missed(self, since: str) -> tuple[tuple[str, Publication], ...] | None:
        if await self._store.trimmed_past(since):
            return None
        read: list[tuple[str, Publication]] = []
        position = since
        for _ in range(1_000):  # bounded: 1,000 pages of 1,000 entries
            page = await self._store.read_after(position, CATCH_UP_PAGE)
            for entry_id, publication in page:
                position = entry_id
                if publication is not None:
                    read.append((entry_id, publication))
            if len(page) < CATCH_UP_PAGE:
                return tuple(read)
        return None

    def catch_up(self, prepared: Prepared, outcome: ResumeOutcome | None) -> int:
        """After the resume opened: publish what the moved session missed, then what the reader
        delivered to it meanwhile, each once, in order. Returns how many were published."""
        moved = prepared.moved
        if moved is None:
            return 0
        buffered, moved.buffered = moved.buffered or [], None
        catch_up = moved.catch_up
        if outcome is not ResumeOutcome.RESUMED or catch_up is None:
            return 0
        published = 0
        for entry_id, publication in itertools.chain(prepared.entries, buffered):
            text = catch_up.offer(entry_id, publication)
            if text is not None:
                self._host.publish_into(moved, text)
                published += 1
        self.touch(moved)
        return published

    def offer(self, session: LedgerSession, entry_id: str, publication: Publication) -> bool:
        """The reader delivers ``publication`` to ``session``: whether to publish it into the
        session now (False: buffered for the catch-up, or offered by it already)."""
        if session.buffered is not None:
            session.buffered.append((entry_id, publication))
            return False
        catch_up = session.catch_up
        if catch_up is None:
            return True
        if not stream_after(catch_up.since, self._store.cursor):
            session.catch_up = None  # the reader has passed what the catch-up read
        return catch_up.offer(entry_id, publication) is not None
