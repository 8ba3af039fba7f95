"""Interleaving stateful test: overlapping API calls against misbehaving peers.

The other stateful test (``test_manager_stateful.py``) runs one call at a time against a model.
This one *starts* ``connect()``, ``disconnect()``, ``force_reconnect()`` and ``destroy()`` as
tasks without awaiting them, lets the event loop run a drawn number of steps in between, sends
messages (and messages that cannot be encoded) at any moment, and draws server faults: stop
reading, read again, never answer a close frame, drop, close with 1000/1001/1011, ping.

After every step:

- the phase agrees with the tasks that exist: a live supervisor whenever the manager is not
  idle; a socket task while connecting; a socket task or a retry timer while reconnecting; a
  retry timer while failed; a socket task and a transport while open or degraded;
- no public call raised anything but its documented exception (``ManagerClosed`` after
  ``destroy()``), so never an ``AssertionError`` or an ``ExceptionGroup``;
- the message ledger balances: every message ``send()`` accepted is exactly once in one of
  written (taken by a transport; in-memory only), still queued, still in the send buffer, or
  handed back; none was written twice, and the core's ``data_sent`` counts the written ones;
- once every started call has finished and the last one was ``disconnect()`` or ``destroy()``:
  no task and no server connection is left.

It runs on the virtual clock with the in-memory server (many examples), and over loopback with
the default opener against the scripted websockets server and against the real ``SteadyServer``
(fewer examples each). The overlaps and faults drawn are
printed in the run's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from websockets.exceptions import ConnectionClosed

import steadysocket.runtime.manager as manager_module
from steadysocket.model.effects import Timer
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import ManagerClosed, WebSocketManager
from steadysocket.runtime.server import Client, SteadyServer
from tests.runtime.fakes import (
    ConnState,
    InMemoryServer,
    LoopbackServer,
    Script,
    ScriptedServer,
    VirtualClock,
)

CALLS = ["connect", "disconnect", "force_reconnect", "connect", "disconnect", "destroy"]
"""Drawn uniformly: destroy() (which ends the run's usefulness) once in six."""
TEARDOWNS = frozenset({"disconnect", "destroy"})
STEP_BOUND_S = 10.0
"""The real-time bound on any one step (closes are aborted after the patched timeout)."""

OVERLAPS: dict[str, Counter[str]] = {}
FAULTS: dict[str, Counter[str]] = {}


def _alive(task: asyncio.Task[Any] | None) -> bool:
    return task is not None and not task.done()


def _data_ids(frames: list[str] | list[str | bytes]) -> list[int]:
    ids = []
    for frame in frames:
        if isinstance(frame, str):
            message = json.loads(frame)
            if message.get("type") == "data":
                ids.append(int(message["id"]))
    return ids


class InterleavingMachine(RuleBasedStateMachine):
    """A manager, its server, and the calls started but not awaited."""

    label: ClassVar[str] = "in-memory"
    loopback: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._saved = (manager_module.CLOSE_TIMEOUT_S, manager_module.SEND_TIMEOUT_S)
        # Real-time bounds, made short: a close never answered is aborted after 20 ms, a send
        # blocked 200 ms by a peer that stopped reading is a dead peer.
        manager_module.CLOSE_TIMEOUT_S = 0.02
        manager_module.SEND_TIMEOUT_S = 0.2
        self.runner = asyncio.Runner()
        self.clock = VirtualClock()
        self.server: ScriptedServer = self.make_server()
        self.m = self.make_manager()
        self.calls: list[tuple[str, asyncio.Task[None]]] = []
        self.last_started: str | None = None
        self.accepted: list[int] = []
        self.returned: list[int] = []
        self.next_id = 0
        self.m.on_returned(lambda messages: self.returned.extend(int(m["id"]) for m in messages))

    # -- plumbing --------------------------------------------------------------------------

    def make_server(self) -> ScriptedServer:
        return InMemoryServer(self.clock, Script.accept(heartbeat_interval_ms=1_000))

    def make_manager(self) -> WebSocketManager:
        assert isinstance(self.server, InMemoryServer)
        return WebSocketManager(
            self.server.url,
            "interleaved",
            environ={},
            connection_timeout_ms=1_000,
            clock=self.clock,
            sleep=self.clock.sleep,
            opener=self.server.open,
            send_queue_limit=5,
        )

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(STEP_BOUND_S):
                return await coro

        return self.runner.run(bounded())

    def note(self, store: dict[str, Counter[str]], what: str) -> None:
        event(what)
        store.setdefault(self.label, Counter())[what] += 1

    def pending(self) -> list[str]:
        return [kind for kind, task in self.calls if not task.done()]

    # -- the application -------------------------------------------------------------------

    @rule(kind=st.sampled_from(CALLS))
    def start_call(self, kind: str) -> None:
        running = self.pending()
        if running:
            self.note(OVERLAPS, f"{kind} while {' + '.join(sorted(set(running)))} running")
        else:
            self.note(OVERLAPS, f"{kind} alone")
        loop = self.runner.get_loop()
        self.calls.append((kind, loop.create_task(getattr(self.m, kind)())))
        self.last_started = kind

    @rule(steps=st.integers(min_value=0, max_value=25))
    def let_the_loop_run(self, steps: int) -> None:
        async def spin() -> None:
            for _ in range(steps):
                await asyncio.sleep(0)

        self.run(spin())

    @rule()
    def send(self) -> None:
        ident = self.next_id
        self.next_id += 1
        if self.m.send({"type": "data", "id": ident}):
            self.accepted.append(ident)

    @rule()
    def send_what_cannot_be_encoded(self) -> None:
        phase = self.m.phase
        try:
            self.m.send({"type": "data", "id": -1, "bad": float("nan")})
        except ValueError:
            pass
        else:
            raise AssertionError("send() accepted NaN")
        assert self.m.phase is phase

    @rule(seconds=st.sampled_from([0.05, 0.5, 1.0, 2.0, 5.0, 30.0]))
    def time_passes(self, seconds: float) -> None:
        if self.loopback:
            self.run(asyncio.sleep(min(seconds, 0.05)))
        else:
            self.run(self.clock.advance(seconds))

    @rule()
    def settle(self) -> None:
        """Wait (bounded) until every started call has finished."""
        tasks = [task for _, task in self.calls]
        if tasks:
            self.run(asyncio.wait(tasks))
        self.check_calls()
        if self.last_started in TEARDOWNS and not self.pending():
            self.note(FAULTS, f"settled after {self.last_started}")
            self.run(asyncio.sleep(0))
            leftover = [
                t.get_name()
                for t in asyncio.all_tasks(self.runner.get_loop())
                if t.get_name().startswith("steadysocket")
            ]
            assert leftover == [], leftover
            assert self.m.phase is Phase.IDLE
            if self.loopback:
                # The real server learns of the client's close or abort a moment later.
                self.run(self.server_forgets())
            assert self.server.live() == [], "a connection outlived the teardown"

    async def server_forgets(self) -> None:
        for _ in range(200):
            if not self.server.live():
                return
            await asyncio.sleep(0.005)

    # -- the server ------------------------------------------------------------------------

    @rule(fault=st.sampled_from(["stop_reading", "resume_reading", "deaf_to_close", "drop"]))
    def server_fault(self, fault: str) -> None:
        record = self.server.current()
        if record is None or record.state is not ConnState.OPEN:
            return
        self.note(FAULTS, fault)
        if fault == "drop":
            self.run(self.server.drop(record))
            return
        assert isinstance(self.server, InMemoryServer)
        link = self.server._links[record.index]
        if fault == "stop_reading":
            link.stop_reading()
        elif fault == "resume_reading":
            link.resume_reading()
        else:
            link.answers_close = False

    @rule(code=st.sampled_from([1000, 1001, 1011]))
    def server_closes(self, code: int) -> None:
        record = self.server.current()
        if record is None or record.state is not ConnState.OPEN:
            return
        self.note(FAULTS, f"close {code}")
        self.run(self.server.close(code, "drawn", record))

    @rule()
    def server_pings(self) -> None:
        record = self.server.current()
        if record is None or record.state is not ConnState.OPEN:
            return
        self.note(FAULTS, "ping")
        # Over loopback the client may have dropped the link a moment ago, before the server
        # noticed: then the ping does not land, which is no failure of the client's.
        with contextlib.suppress(ConnectionClosed):
            self.run(self.server.ping(record))

    # -- invariants ------------------------------------------------------------------------

    def check_calls(self) -> None:
        for kind, task in self.calls:
            if not task.done() or task.cancelled():
                continue
            error = task.exception()
            if error is None:
                continue
            assert isinstance(error, ManagerClosed), f"{kind}() raised {error!r}"
            assert kind in {"connect", "force_reconnect"}, f"{kind}() raised {error!r}"

    @invariant()
    def no_call_raised_an_undocumented_exception(self) -> None:
        self.check_calls()

    @invariant()
    def the_phase_agrees_with_the_tasks(self) -> None:
        m = self.m
        phase = m.phase
        socket = _alive(m._socket_task)
        # After a graceful close the next attempt waits its drawn delay on the graceful timer.
        retry = _alive(m._timers.get(Timer.RETRY)) or _alive(m._timers.get(Timer.GRACEFUL))
        if phase is not Phase.IDLE:
            assert _alive(m._supervisor), f"{phase} without a supervisor"
            assert not m._stop.is_set(), f"{phase} with the supervisor stopping"
        if phase is Phase.CONNECTING:
            assert socket, "connecting without an attempt in flight"
        elif phase is Phase.RECONNECTING:
            assert socket or retry, "reconnecting with neither an attempt nor a retry timer"
        elif phase is Phase.FAILED:
            assert retry, "failed without a retry timer"
        elif phase in {Phase.OPEN, Phase.DEGRADED}:
            assert socket, f"{phase} without its socket task"
            assert m._transport is not None, f"{phase} without a transport"
        elif phase is Phase.IDLE:
            assert not socket, "idle with a socket task"

    def written(self) -> list[int]:
        if self.loopback:
            return []
        return [i for record in self.server.connections for i in _data_ids(record.taken)]

    @invariant()
    def the_message_ledger_balances(self) -> None:
        m = self.m
        queued = [int(json.loads(t)["id"]) for t in m._core.queue]
        buffered = [int(json.loads(t)["id"]) for t in m._outgoing]
        sent = m._core.data_sent  # messages_sent also counts pings and pongs
        assert len(self.accepted) == sent + len(queued) + len(buffered) + len(self.returned), (
            f"accepted {len(self.accepted)} != sent {sent} + queued {len(queued)} "
            f"+ buffered {len(buffered)} + returned {len(self.returned)}"
        )
        received = [
            i
            for record in self.server.connections
            for i in _data_ids([f for f in record.received if isinstance(f, str)])
        ]
        assert len(received) == len(set(received)), "a message reached the server twice"
        if not self.loopback:
            written = self.written()
            assert len(written) == len(set(written)), "a message was written twice"
            assert len(written) == sent
            places = written + queued + buffered + self.returned
            assert sorted(places) == sorted(self.accepted), "a message is in two places or none"

    def teardown(self) -> None:
        try:

            async def finish() -> None:
                for _, task in self.calls:
                    if not task.done():
                        await asyncio.wait({task})
                await self.m.destroy()
                if isinstance(self.server, LoopbackServer | _SteadyRig):
                    await self.server.stop()

            self.run(finish())
            self.check_calls()
        finally:
            self.runner.close()
            manager_module.CLOSE_TIMEOUT_S, manager_module.SEND_TIMEOUT_S = self._saved


class LoopbackInterleavingMachine(InterleavingMachine):
    """The same over real sockets: the real server, the default opener, real time."""

    label = "loopback"
    loopback = True

    def make_server(self) -> ScriptedServer:
        server = LoopbackServer(script=Script.accept(heartbeat_interval_ms=1_000))
        self.runner.run(server.start())
        return server

    def make_manager(self) -> WebSocketManager:
        return WebSocketManager(
            self.server.url,
            "interleaved",
            environ={},
            connection_timeout_ms=1_000,
            send_queue_limit=5,
            fallback_probe_interval_ms=None,
        )

    @rule(fault=st.sampled_from(["drop"]))
    def server_fault(self, fault: str) -> None:
        super().server_fault(fault)


@dataclass(eq=False)
class _Seen:
    """What a SteadyServer connection received, for the ledger."""

    client: Client
    received: list[str | bytes] = field(default_factory=list)
    state: ConnState = ConnState.OPEN


class _SteadyRig:
    """The real ``SteadyServer`` behind the few calls the machine makes of its server."""

    def __init__(self) -> None:
        self.server = SteadyServer(
            "127.0.0.1", 0, heartbeat_interval_ms=1_000, connection_timeout_ms=1_000
        )
        self.connections: list[_Seen] = []
        by_client: dict[int, _Seen] = {}

        @self.server.on_connect
        async def opened(client: Client) -> None:
            seen = _Seen(client)
            by_client[id(client)] = seen
            self.connections.append(seen)

        @self.server.on_message("data")
        async def data(message: dict[str, Any], client: Client) -> None:
            by_client[id(client)].received.append(json.dumps(message))

        @self.server.on_disconnect
        async def closed(client: Client) -> None:
            by_client[id(client)].state = ConnState.CLOSED

    @property
    def url(self) -> str:
        return self.server.url

    def current(self) -> _Seen | None:
        live = self.live()
        return live[-1] if live else None

    def live(self) -> list[_Seen]:
        return [c for c in self.connections if c.state is not ConnState.CLOSED]

    async def close(self, code: int, reason: str, record: _Seen) -> None:
        await record.client.close(code, reason)

    async def stop(self) -> None:
        await self.server.close()


class SteadyInterleavingMachine(InterleavingMachine):
    """The same against the real ``SteadyServer``: real sockets, real time, its heartbeat."""

    label = "SteadyServer"
    loopback = True

    def make_server(self) -> ScriptedServer:
        rig = _SteadyRig()
        self.runner.run(rig.server.start())
        return rig  # type: ignore[return-value]

    def make_manager(self) -> WebSocketManager:
        return WebSocketManager(
            self.server.url,
            "interleaved",
            environ={},
            connection_timeout_ms=1_000,
            send_queue_limit=5,
            fallback_probe_interval_ms=None,
        )

    @rule(fault=st.sampled_from(["none"]))
    def server_fault(self, fault: str) -> None:
        """The real server has no fault switch: its closes are drawn by ``server_closes``."""

    @rule()
    def server_pings(self) -> None:
        """Its own heartbeat pings every second."""


def _summarise(label: str, summary: Callable[[str, str], None]) -> None:
    section = f"interleaving: overlapping calls and faults ({label})"
    for title, store in (("overlaps", OVERLAPS), ("faults", FAULTS)):
        drawn = store.get(label, Counter())
        summary(
            section,
            f"{title}: " + ", ".join(f"{what} x{n}" for what, n in sorted(drawn.items())),
        )


def _run(machine: type[InterleavingMachine], summary: Callable[[str, str], None]) -> None:
    """Run a machine with its budget: many long runs in memory, fewer over real sockets."""
    if machine.loopback:
        budget = settings(
            max_examples=max(settings().max_examples // 10, 10), stateful_step_count=30
        )
    else:
        budget = settings(stateful_step_count=max(settings().stateful_step_count, 60))
    run_state_machine_as_test(
        machine,
        settings=settings(budget, deadline=None, suppress_health_check=list(HealthCheck)),
    )
    _summarise(machine.label, summary)


def test_interleaved_calls_in_memory(summary: Callable[[str, str], None]) -> None:
    _run(InterleavingMachine, summary)


def test_interleaved_calls_over_loopback(summary: Callable[[str, str], None]) -> None:
    _run(LoopbackInterleavingMachine, summary)


def test_interleaved_calls_against_the_steady_server(summary: Callable[[str, str], None]) -> None:
    _run(SteadyInterleavingMachine, summary)
