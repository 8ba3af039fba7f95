"""An in-memory protocol v2 server for the client's tests: ``opener=server.open``.

It keeps its sessions in the model's ``SessionStore`` (the environment a client meets: the
tests' expectations are the ledgers below, not these rules), and nothing moves on its own:

- the client's frames wait in ``link.to_server`` until the test calls :meth:`read`, which
  handles each application message (its payload's ``n`` goes into :attr:`handled`) and answers
  ``ack`` per the batching; :meth:`flush_acks` is the ack timer;
- :meth:`publish` numbers a message into the client's session and writes it if a link is up;
- :meth:`drop` ends the link without a close frame: whatever either side wrote and the other
  has not read yet is lost, so a drop between any two frames is a drop "at any byte";
- :meth:`restart` loses every session (a new epoch), as a restarted process does.

Every frame the client writes is recorded in ``link.taken`` and every frame delivered to it in
``link.delivered``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind
from steadysocket.model.delivery import DeliveryConfig, ServerSession, SessionStore
from steadysocket.model.protocol import (
    Accept,
    HelloSession,
    ack_text,
    encode,
    make_hello,
    make_pong,
    reply_text,
    validate_query,
)
from steadysocket.runtime.transport import TransportClosed
from tests.runtime.fakes import VirtualClock

HEARTBEAT_MS = 3_600_000
"""Announced in the hello: long enough that the watchdog never interferes."""


@dataclass(eq=False)
class Link:
    """One in-memory connection: the client's ``Transport`` and the server's view of it."""

    server: FakeV2Server
    session: ServerSession
    version: int = 2
    to_client: deque[str] = field(default_factory=deque)
    to_server: deque[str] = field(default_factory=deque)
    taken: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    ended: CloseFailure | ErrorFailure | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def recv(self) -> str | bytes:
        while True:
            if self.to_client:
                frame = self.to_client.popleft()
                self.delivered.append(frame)
                return frame
            if self.ended is not None:
                raise TransportClosed(self.ended)
            self.wake.clear()
            await self.wake.wait()

    async def send(self, text: str) -> None:
        if self.ended is not None:
            raise TransportClosed(self.ended, written=False)
        self.taken.append(text)
        self.to_server.append(text)

    async def close(self, code: int, reason: str) -> None:
        self.end(CloseFailure(code, reason))

    def abort(self) -> None:
        self.end(ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "aborted (in-memory)"))

    def push(self, text: str) -> None:
        if self.ended is None:
            self.to_client.append(text)
            self.wake.set()

    def end(self, failure: CloseFailure | ErrorFailure) -> None:
        if self.ended is not None:
            return
        self.ended = failure
        self.to_client.clear()
        self.to_server.clear()
        self.wake.set()
        self.server.link_ended(self)

    @property
    def live(self) -> bool:
        return self.ended is None


class FakeV2Server:
    """See the module docstring."""

    url = "ws://fake-v2.invalid"

    def __init__(
        self,
        clock: VirtualClock,
        *,
        config: DeliveryConfig | None = None,
        speaks_v2: bool = True,
        reply_to_requests: bool = True,
    ) -> None:
        self.clock = clock
        self.config = config if config is not None else DeliveryConfig(ack_every=3)
        self.speaks_v2 = speaks_v2
        self.reply_to_requests = reply_to_requests
        self._tokens = itertools.count(1)
        self.epoch = self._token("epoch")
        self.store = SessionStore(self.epoch, self.config)
        self.links: list[Link] = []
        self.handled: list[tuple[str, int]] = []
        """``(session_id, n)`` of every application message handled, in order."""
        self.refused_versions: list[str] = []
        self.overlap_replay = False
        """True: a resume replays the whole unacknowledged history, also what the client
        already has (an at-least-once server): the client must drop the duplicates."""

    def _token(self, kind: str) -> str:
        return f"{kind}{next(self._tokens)}"

    def _now_ms(self) -> float:
        return self.clock.monotonic() * 1000.0

    # -- the Opener ----------------------------------------------------------------------

    async def open(self, url: str) -> Link | _Refusal:
        query = urlsplit(url).query
        accepted = validate_query(query, accept_v2=self.speaks_v2)
        if not isinstance(accepted, Accept):
            self.refused_versions.append(parse_qs(query).get("version", ["?"])[0])
            return _Refusal(CloseFailure(int(accepted.code), accepted.reason))
        if accepted.version == 1:
            return self._open_v1(accepted)
        held = self.store.sessions.get(accepted.resume.get("session_id", ""))
        history = [text for _, text in held.history] if held is not None else []
        opened = self.store.open(
            accepted.client_id,
            str(accepted.role),
            accepted.resume,
            self._now_ms(),
            self._token("session"),
        )
        for old in self.links:
            if old.live and old.session is opened.session:
                old.end(ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "superseded (in-memory)"))
        hello = make_hello(
            now=self.clock.now(),
            client_id=accepted.client_id,
            request_id=self._token("request"),
            heartbeat_interval_ms=HEARTBEAT_MS,
            version=2,
            session=HelloSession(
                session_id=opened.session.session_id,
                epoch=self.epoch,
                resumed=opened.resumed,
                max_message_bytes=1_048_576,
                resume_outcome=str(opened.outcome),
                replayed=len(opened.replay),
            ),
        )
        link = Link(self, opened.session)
        self.links.append(link)
        link.push(hello.serialize())
        for text in history if self.overlap_replay and opened.resumed else opened.replay:
            link.push(text)
        return link

    def _open_v1(self, accepted: Accept) -> Link:
        """A v1 connection: no session (a throwaway one outside the store), no numbering."""
        link = Link(self, ServerSession("v1", accepted.client_id, str(accepted.role)), version=1)
        self.links.append(link)
        hello = make_hello(
            now=self.clock.now(),
            client_id=accepted.client_id,
            request_id=self._token("request"),
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        link.push(hello.serialize())
        return link

    def link_ended(self, link: Link) -> None:
        if (
            link.version == 2
            and link.session.connected
            and not any(other.live and other.session is link.session for other in self.links)
        ):
            self.store.disconnected(link.session, self._now_ms())

    # -- the server's actions ------------------------------------------------------------

    @property
    def current(self) -> Link | None:
        """The newest live link."""
        return next((link for link in reversed(self.links) if link.live), None)

    def publish(self, client_id: str, message: dict[str, Any]) -> bool:
        """Number ``message`` into the client's session (held for a resume if it is not
        connected); False when the client has no session."""
        self.store.expire(self._now_ms())
        sessions = self.store.of_client(client_id)
        if not sessions:
            return False
        session = sessions[-1]
        numbered = session.publish(encode(message))
        for link in self.links:
            if link.live and link.session is session:
                link.push(numbered)
        return True

    def read(self, limit: int | None = None) -> int:
        """Handle up to ``limit`` frames the client wrote on the current link; how many."""
        link = self.current
        if link is None:
            return 0
        count = 0
        while link.to_server and (limit is None or count < limit) and link.live:
            self._handle(link, link.to_server.popleft())
            count += 1
        return count

    def _handle(self, link: Link, text: str) -> None:
        data = json.loads(text)
        session = link.session
        kind = data.get("type")
        if kind == "ping":
            link.push(make_pong(self.clock.now(), session.client_id).serialize())
            return
        if link.version == 1:
            self.handled.append(("v1", data.get("n", -1)))
            if isinstance(data.get("id"), int) and self.reply_to_requests:
                link.push(reply_text(data["id"], {"n": data.get("n")}, "2025-01-01T00:00:00.000Z"))
            return
        if kind == "ack":
            assert session.client_acked(data["offset"]), f"ack of an offset never sent: {text}"
            return
        verdict, ack = session.inbound(data["id"])
        if str(verdict) == "deliver":
            self.handled.append((session.session_id, data.get("n", -1)))
            if data.get("request") and self.reply_to_requests:
                reply = reply_text(data["id"], {"n": data.get("n")}, "2025-01-01T00:00:00.000Z")
                link.push(session.publish(reply))
            ack = session.handled(data["id"])
        else:
            assert str(verdict) == "duplicate", f"{verdict} for {text}"
        if ack is not None:
            link.push(ack_text("id", ack, "2025-01-01T00:00:00.000Z"))

    def flush_acks(self) -> None:
        """The ack timer: acknowledge whatever was handled and not acknowledged yet."""
        link = self.current
        if link is not None and link.session.ids.last > link.session.ids.acked:
            link.push(ack_text("id", link.session.ids.flush(), "2025-01-01T00:00:00.000Z"))

    def drop(self) -> bool:
        """End the current link without a close frame; False if there is none."""
        link = self.current
        if link is None:
            return False
        link.end(ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "dropped (in-memory)"))
        return True

    def restart(self) -> None:
        """Lose every session: a new epoch, as a restarted process."""
        for link in self.links:
            link.end(ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "server restarted (in-memory)"))
        self.epoch = self._token("epoch")
        self.store = SessionStore(self.epoch, self.config)


@dataclass
class _Refusal:
    """A connection the server accepted only to close it (4400 for a v1-only server)."""

    failure: CloseFailure
    taken: list[str] = field(default_factory=list)

    async def recv(self) -> str | bytes:
        raise TransportClosed(self.failure)

    async def send(self, text: str) -> None:
        raise TransportClosed(self.failure, written=False)

    async def close(self, code: int, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None
