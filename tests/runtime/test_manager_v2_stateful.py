"""Stateful test of protocol v2's runtime: the message ledger in both directions, checked after
every step while the link drops at any point.

Hypothesis draws, in any order: application sends and requests (started as tasks, so they
interleave with everything else), ``force_reconnect()`` and ``disconnect()``/``connect()`` calls
(tasks too), server publications, the server reading some of the client's frames (so a drop
can fall between a frame written and read, or between a handler returning and its ack),
the server's ack timer, drops, server restarts (every session lost), and time passing on a
:class:`VirtualClock`.

The ledger is the expectation, written from docs/protocol.md's promises, not from the model:

- client to server: no message is handled twice (in any session), each session handles in the
  order of ``send()``; a message handed back "not sent" was never handled; one handed back
  "not acknowledged" was never handled by a session the server still holds; once the world is
  quiet every accepted message was handled or handed back;
- server to client (the fake server may replay more than the client asked for, so duplicates
  really arrive): within each server session, what the listeners got is exactly the first
  messages published into it, in order, once; a session is left only with an ``on_resume``
  event that says ``resumed: false`` (or by the application's own ``disconnect()``), so a gap
  is never silent; once quiet, everything published into the current session arrived;
- bounded: the outbox never exceeds ``send_queue_limit`` and no session's history exceeds its
  limit; every request ends with its reply or a documented error.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from steadysocket.model.delivery import DeliveryConfig
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import (
    ManagerClosed,
    RequestFailed,
    ResumeEvent,
    Returned,
    WebSocketManager,
)
from tests.runtime.fake_v2 import FakeV2Server
from tests.runtime.fakes import VirtualClock

CLIENT = "c1"
OUTBOX_LIMIT = 12
HISTORY_LIMIT = 8
STEP_TIMEOUT_S = 20.0


class DeliveryMachine(RuleBasedStateMachine):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = VirtualClock()
        self.server = FakeV2Server(
            self.clock, config=DeliveryConfig(ack_every=3, history_limit=HISTORY_LIMIT)
        )
        self.m = WebSocketManager(
            self.server.url,
            CLIENT,
            version=2,
            opener=self.server.open,
            clock=self.clock,
            sleep=self.clock.sleep,
            rng=random.Random(3),
            environ={},
            send_queue_limit=OUTBOX_LIMIT,
            delivery=DeliveryConfig(ack_every=2, ack_interval_ms=50),
            fallback_probe_interval_ms=1_000,
        )
        self.next_n = 0
        self.accepted: list[int] = []
        self.published: dict[str, list[int]] = {}
        """Server session id -> the payloads published into it, in order."""
        self.received: list[tuple[str, int]] = []
        """(server session id, payload) as the listeners got them."""
        self.returned: list[tuple[str, int]] = []
        self.resumes: list[ResumeEvent] = []
        self.left_sessions: set[str] = set()
        """Sessions the client left knowingly (a failed resume, or its own disconnect)."""
        self.session_of: dict[int, str] = {}
        self.requests: dict[int, asyncio.Task[Any]] = {}
        self.calls: list[asyncio.Task[None]] = []
        self.last_session: str | None = None
        self.left_by_disconnect = False
        self.m.on_message(self._got)
        self.m.on_returned(self._handed_back)
        self.m.on_resume(self._resumed)
        self.run(self._start())

    # -- plumbing --------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                result = await coro
                await self.clock.run_until_idle()
                return result

        return self.runner.run(bounded())

    async def _start(self) -> None:
        await self.m.connect()

    def _got(self, message: dict[str, Any]) -> None:
        if message.get("type") == "push":
            self.received.append((self.session_of[message["n"]], message["n"]))

    def _handed_back(self, messages: Returned) -> None:
        self.returned.extend((messages.reason, m["n"]) for m in messages if "n" in m)

    def _resumed(self, event: ResumeEvent) -> None:
        self.resumes.append(event)
        if not event.resumed:
            self.left_sessions.update(self.published)

    # -- the application -------------------------------------------------------------------

    @rule()
    def send(self) -> None:
        n = self.next_n
        self.next_n += 1
        if self.m.send({"type": "msg", "n": n}):
            self.accepted.append(n)

    @rule()
    def request(self) -> None:
        n = self.next_n
        self.next_n += 1
        self.accepted.append(n)  # if refused, it comes back as RequestFailed("refused")
        self.requests[n] = self.runner.get_loop().create_task(
            self.m.request({"type": "msg", "n": n, "request": True}, timeout=None)
        )
        self.run(self.clock.settle())

    @rule(call=st.sampled_from(["force_reconnect", "connect"]))
    def call(self, call: str) -> None:
        self.calls.append(self.runner.get_loop().create_task(getattr(self.m, call)()))
        self.run(self.clock.settle())

    @rule()
    def disconnect_and_connect(self) -> None:
        async def both() -> None:
            await asyncio.gather(self.m.disconnect(), self.m.connect())

        self.left_sessions.update(self.published)
        self.left_by_disconnect = True
        self.run(both())

    # -- the server ------------------------------------------------------------------------

    @rule()
    def publish(self) -> None:
        n = self.next_n
        self.next_n += 1
        sessions = self.server.store.of_client(CLIENT)
        if self.server.publish(CLIENT, {"type": "push", "n": n}):
            session_id = sessions[-1].session_id
            self.published.setdefault(session_id, []).append(n)
            self.session_of[n] = session_id
        self.run(self.clock.settle())

    @rule(limit=st.integers(1, 4))
    def server_reads(self, limit: int) -> None:
        self.server.read(limit)
        self.run(self.clock.settle())

    @rule()
    def server_ack_timer(self) -> None:
        self.server.flush_acks()
        self.run(self.clock.settle())

    @rule(overlap=st.booleans())
    def server_replays_with_overlap(self, overlap: bool) -> None:
        self.server.overlap_replay = overlap

    @rule()
    def drop(self) -> None:
        self.server.drop()
        self.run(self.clock.settle())

    @precondition(lambda self: len(self.server.links) < 40)
    @rule()
    def restart(self) -> None:
        self.server.restart()
        self.run(self.clock.settle())

    @rule(seconds=st.sampled_from([0.01, 0.06, 0.5, 2.0, 8.0]))
    def time_passes(self, seconds: float) -> None:
        self.run(self.clock.advance(seconds))

    # -- the ledger ------------------------------------------------------------------------

    @invariant()
    def client_to_server(self) -> None:
        handled = [n for _, n in self.server.handled]
        assert len(handled) == len(set(handled)), f"handled twice: {handled}"
        by_session: dict[str, list[int]] = {}
        for session_id, n in self.server.handled:
            by_session.setdefault(session_id, []).append(n)
        for session_id, ns in by_session.items():
            assert ns == sorted(ns), f"{session_id} handled out of order: {ns}"
        assert set(handled) <= set(self.accepted)
        live = set(self.server.store.sessions)
        for reason, n in self.returned:
            sessions = {s for s, h in self.server.handled if h == n}
            if reason == "not sent":
                assert not sessions, f"#{n} handed back 'not sent' but handled in {sessions}"
            else:
                assert reason == "not acknowledged", reason
                assert not sessions & live, f"#{n} handed back, handled in live {sessions}"

    @invariant()
    def server_to_client(self) -> None:
        got: dict[str, list[int]] = {}
        for session_id, n in self.received:
            got.setdefault(session_id, []).append(n)
        for session_id, ns in got.items():
            published = self.published[session_id]
            assert ns == published[: len(ns)], f"{session_id}: got {ns}, published {published}"
        # A session left with messages undelivered, while a later one delivered: the client
        # must have been told (resumed: false), or have left it itself.
        order = list(self.published)
        for index, session_id in enumerate(order):
            if len(got.get(session_id, [])) < len(self.published[session_id]):
                later = set(order[index + 1 :])
                if any(s in later for s, _ in self.received):
                    assert session_id in self.left_sessions, f"silent gap in {session_id}"

    @invariant()
    def a_new_session_is_announced(self) -> None:
        state = self.m.get_state().delivery
        assert state is not None
        session_id = state.session_id
        if session_id is None:
            return
        if self.last_session not in (None, session_id) and not self.left_by_disconnect:
            assert any(not e.resumed and e.session_id == session_id for e in self.resumes), (
                f"{self.last_session} -> {session_id} without a failed on_resume"
            )
        self.last_session, self.left_by_disconnect = session_id, False

    @invariant()
    def bounded(self) -> None:
        state = self.m.get_state().delivery
        assert state is not None
        assert state.unacknowledged <= OUTBOX_LIMIT
        for session in self.server.store.sessions.values():
            assert len(session.history) <= HISTORY_LIMIT

    @invariant()
    def requests_end_as_documented(self) -> None:
        for n, task in self.requests.items():
            if not task.done():
                continue
            error = task.exception()
            if error is None:
                assert task.result() == {"n": n} or task.result() is None
            else:
                assert isinstance(error, RequestFailed | ManagerClosed), repr(error)

    # -- the end ---------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.run(self._quiesce())
            self._check_quiet()
        finally:
            self.run(self._destroy())
            self.runner.close()

    async def _quiesce(self) -> None:
        """No more faults: let the client reconnect and every frame be read and acked."""
        await self.m.connect()
        for _ in range(40):
            await self.clock.advance(2.0)
            self.server.read()
            self.server.flush_acks()
            await self.clock.advance(0.1)
            state = self.m.get_state()
            link = self.server.current
            if (
                state.phase is Phase.OPEN
                and state.delivery is not None
                and state.delivery.unacknowledged == 0
                and link is not None
                and not link.to_server
                and not link.to_client
            ):
                return
        raise AssertionError(f"never quiet: {self.m.get_state().to_dict()}")

    def _check_quiet(self) -> None:
        handled = {n for _, n in self.server.handled}
        returned = {n for _, n in self.returned}
        failed = {
            n
            for n, task in self.requests.items()
            if task.done() and isinstance(task.exception(), RequestFailed)
        }
        missing = set(self.accepted) - handled - returned - failed
        assert not missing, f"neither handled nor handed back: {sorted(missing)}"
        link = self.server.current
        assert link is not None
        current = link.session.session_id
        got = [n for s, n in self.received if s == current]
        assert got == self.published.get(current, []), "the current session's messages"
        for n, task in self.requests.items():
            assert task.done(), f"request #{n} still waiting once quiet"

    async def _destroy(self) -> None:
        await self.m.destroy()
        for task in [*self.calls, *self.requests.values()]:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        current = asyncio.current_task()
        left = [
            t
            for t in asyncio.all_tasks()
            if t is not current and t.get_name().startswith("steadysocket")
        ]
        assert not left, f"tasks outlived destroy(): {left}"


class TestDeliveryStateful(DeliveryMachine.TestCase):  # type: ignore[misc,valid-type]
    """The machine, in memory; the examples and steps are bounded (CI has 2 cores)."""

    settings = settings(
        max_examples=60,
        stateful_step_count=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
