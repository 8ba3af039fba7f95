"""A hypothesis state machine against a running server, once per adapter (issue 16, point 8).

Each run starts ``SteadyServer`` or ``SteadyASGI`` under uvicorn (``tests/runtime/adapters.py``)
and draws: peers that are healthy, stalled (stop reading, keep answering), half-open (silent
both ways) or slow (read one frame per step); slow ``on_connect`` hooks and slow handlers;
pushes of various sizes; closes by the client, by the server, and TCP resets; pauses; and
shutdown at any step. A small model records, per connection, which close codes the model's
rules allow (the first terminating action, 1011 for a silent peer, 1006 for a write that
stalls). After every step it checks:

- every connection's outbox is within ``max_outbox_bytes`` plus one message;
- no push waited on a peer (each returns far below the write bound);
- ``close()`` ended within its documented bound;
- ``on_disconnect`` ran at most once per connection, with an allowed code, and, after the
  shutdown, exactly once for every connection.

Both adapters are held to the same model, so they agree with each other. One event loop per
run (hypothesis has no async rules); every wait is bounded. The CI profile runs a few examples
per adapter; ``HYPOTHESIS_PROFILE=fuzz`` (``tox -e fuzz``) runs many more.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from steadysocket.runtime.server import Client
from tests.runtime.adapters import MS, TIMEOUT, Kind, Served, dial, served

OUTBOX = 64 * 1024
LARGEST_PUSH = 20_000
HEARTBEAT_MS = 200
CONNECTION_TIMEOUT_MS = 1000
CLOSE_BOUND = CONNECTION_TIMEOUT_MS * MS + 1.5 + 2.0  # documented bound, plus CI slack
PUSH_BOUND = 0.5  # a push that waited on a stalled peer would take the 1 s write bound
PEERS = ("healthy", "stalled", "halfopen", "slow")

_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = 4 if _PROFILE in ("ci", "dev") else 30
STEPS = 10 if _PROFILE in ("ci", "dev") else 25


@dataclass
class Peer:
    """One client connection and what the model allows its end to be."""

    name: str
    kind: str
    ws: ClientConnection
    allowed: set[int] = field(default_factory=set)
    ended_by_us: int | None = None


class ServerMachine(RuleBasedStateMachine):
    kind: Kind = "steady"

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.stack = contextlib.AsyncExitStack()
        self.peers: dict[str, Peer] = {}
        self.seen: dict[str, list[int | None]] = {}
        self.counter = 0
        self.shut = False
        self.srv: Served = self.runner.run(self._start())

    async def _start(self) -> Served:
        srv = await self.stack.enter_async_context(
            served(
                self.kind,
                heartbeat_interval_ms=HEARTBEAT_MS,
                connection_timeout_ms=CONNECTION_TIMEOUT_MS,
                max_outbox_bytes=OUTBOX,
                compression=None,
            )
        )
        app = srv.app

        @app.on_connect
        async def joined(client: Client) -> None:
            if client.client_id.startswith("slowhook"):
                await asyncio.sleep(0.3)

        @app.on_message("work")
        async def work(message: dict[str, Any], client: Client) -> None:
            await asyncio.sleep(float(message.get("delay", 0)))
            await client.send({"type": "worked"})

        @app.on_disconnect
        async def left(client: Client) -> None:
            self.seen.setdefault(client.client_id, []).append(client.close_code)

        return srv

    def _run(self, coro: Any) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(3 * TIMEOUT):
                return await coro

        return self.runner.run(bounded())

    # ---- peers ------------------------------------------------------------------------------

    @precondition(lambda self: not self.shut and len(self.peers) < 6)
    @rule(kind=st.sampled_from(PEERS), slow_hook=st.booleans())
    def connect(self, kind: str, slow_hook: bool) -> None:
        self.counter += 1
        name = f"{'slowhook' if slow_hook else 'p'}{self.counter}"
        note(f"connect {name} as {kind}")

        async def go() -> ClientConnection:
            ws: ClientConnection = await dial(
                self.srv.url, f"client_id={name}", compression=None, max_size=None
            ).__aenter__()
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()  # the hello
            if kind in ("stalled", "halfopen"):
                ws.transport.pause_reading()
            return ws

        ws = self._run(go())
        # Anything may end it at shutdown; a silent peer may be closed for silence, and a peer
        # that does not read may have a write stall (1006) under pushes.
        allowed = {1001}
        if kind == "halfopen":
            allowed |= {1011, 1006}
        if kind in ("stalled", "slow"):
            allowed |= {1006}
        self.peers[name] = Peer(name, kind, ws, allowed)

    def _live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.ended_by_us is None]

    @precondition(lambda self: not self.shut)
    @rule(data=st.data(), how=st.sampled_from(["client-close", "server-close", "reset"]))
    def end_one(self, data: st.DataObject, how: str) -> None:
        live = self._live()
        if not live:
            return
        peer = data.draw(st.sampled_from(live))
        code = data.draw(st.integers(4000, 4099))
        note(f"{how} {peer.name} ({code})")
        if how == "client-close":
            if peer.kind in ("stalled", "halfopen"):
                peer.ws.transport.resume_reading()
            peer.ended_by_us = code
            self._run(self._client_close(peer.ws, code))
        elif how == "server-close":
            peer.ended_by_us = code
            clients = [c for c in self.srv.app.clients if c.client_id == peer.name]
            for client in clients:
                self._run(client.close(code, "bye"))
        else:
            peer.ended_by_us = 1006
            peer.ws.transport.abort()
        peer.allowed.add(peer.ended_by_us)

    @staticmethod
    async def _client_close(ws: ClientConnection, code: int) -> None:
        with contextlib.suppress(TimeoutError, ConnectionClosed):
            async with asyncio.timeout(2 * CONNECTION_TIMEOUT_MS * MS):
                await ws.close(code, "mine")

    # ---- traffic ------------------------------------------------------------------------------

    @precondition(lambda self: not self.shut)
    @rule(size=st.integers(10, LARGEST_PUSH), broadcast=st.booleans(), data=st.data())
    def push(self, size: int, broadcast: bool, data: st.DataObject) -> None:
        message = {"type": "news", "data": "n" * size}
        app = self.srv.app
        target = None
        if not broadcast and self.peers:
            target = data.draw(st.sampled_from(sorted(self.peers)))
        note(f"push {size} B to {target or 'everyone'}")

        async def go() -> float:
            loop = asyncio.get_running_loop()
            began = loop.time()
            if target is None:
                await app.broadcast(message)
            else:
                await app.send_to(target, message)
            return loop.time() - began

        took = self._run(go())
        assert took < PUSH_BOUND, f"a push took {took:.3f} s: it waited on a peer"

    @precondition(lambda self: not self.shut)
    @rule(data=st.data(), delay=st.sampled_from([0.0, 0.05, 0.4]))
    def ask_for_work(self, data: st.DataObject, delay: float) -> None:
        live = [p for p in self._live() if p.kind != "halfopen"]
        if not live:
            return
        peer = data.draw(st.sampled_from(live))
        note(f"{peer.name} asks for work taking {delay} s")

        async def go() -> None:
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                async with asyncio.timeout(TIMEOUT):
                    await peer.ws.send(f'{{"type":"work","delay":{delay}}}')

        self._run(go())

    @precondition(lambda self: not self.shut)
    @rule(ms=st.sampled_from([20, 100, 300]))
    def pause(self, ms: int) -> None:
        note(f"pause {ms} ms")
        self._run(asyncio.sleep(ms * MS))

    def _service_peers(self) -> None:
        """What the peers do on their own between steps: healthy ones read everything and
        answer pings; slow ones read one frame; stalled ones only send a pong."""

        async def one(peer: Peer) -> None:
            if peer.kind == "halfopen":
                return
            budget = {"healthy": 200, "slow": 1, "stalled": 0}[peer.kind]
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                for _ in range(budget):  # until nothing more is waiting
                    async with asyncio.timeout(5 * MS):
                        await peer.ws.recv()
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                async with asyncio.timeout(TIMEOUT):
                    await peer.ws.send('{"type":"pong"}')

        async def all_of_them() -> None:
            async with asyncio.TaskGroup() as group:
                for peer in self._live():
                    group.create_task(one(peer))

        self._run(all_of_them())

    # ---- shutdown -----------------------------------------------------------------------------

    @precondition(lambda self: not self.shut)
    @rule()
    def shutdown(self) -> None:
        note("shutdown")
        self._shutdown()

    @precondition(lambda self: self.shut)
    @rule()
    def push_after_shutdown(self) -> None:
        note("push after shutdown")
        assert self._run(self.srv.app.broadcast({"type": "late"})) == 0

    def _shutdown(self) -> None:
        async def go() -> float:
            loop = asyncio.get_running_loop()
            began = loop.time()
            await self.srv.close()
            return loop.time() - began

        took = self._run(go())
        self.shut = True
        assert took < CLOSE_BOUND, f"close() took {took:.2f} s"
        assert self.srv.app.clients == ()

    # ---- invariants ---------------------------------------------------------------------------

    @invariant()
    def outboxes_stay_within_their_bound(self) -> None:
        if not self.shut:
            self._service_peers()
        for client in self.srv.app.clients:
            assert client._conn.outbox.queued_bytes <= OUTBOX + LARGEST_PUSH + 100

    @invariant()
    def on_disconnect_runs_at_most_once_with_an_allowed_code(self) -> None:
        for name, codes in self.seen.items():
            assert len(codes) == 1, f"{name}: on_disconnect ran {len(codes)} times: {codes}"
            peer = self.peers[name]
            assert codes[0] in peer.allowed | {peer.ended_by_us}, (
                f"{name} ({peer.kind}) ended with {codes[0]}, allowed {sorted(peer.allowed)}"
            )

    def teardown(self) -> None:
        try:
            if not self.shut:
                self._shutdown()
            self.on_disconnect_runs_at_most_once_with_an_allowed_code()
            missing = set(self.peers) - set(self.seen)
            assert not missing, f"on_disconnect never ran for {sorted(missing)}"
        finally:
            for peer in self.peers.values():
                peer.ws.transport.abort()
            self.runner.run(self.stack.aclose())
            self.runner.close()


STATEFUL_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class SteadyServerMachine(ServerMachine):
    kind: Kind = "steady"


class AsgiMachine(ServerMachine):
    kind: Kind = "asgi"


TestSteadyServerUnderStalledPeersAndShutdown = SteadyServerMachine.TestCase
TestSteadyServerUnderStalledPeersAndShutdown.settings = STATEFUL_SETTINGS
TestSteadyASGIUnderStalledPeersAndShutdown = AsgiMachine.TestCase
TestSteadyASGIUnderStalledPeersAndShutdown.settings = STATEFUL_SETTINGS
