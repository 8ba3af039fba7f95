"""End to end: three server processes on one real Redis, 300 clients spread over them.

A broadcast from any process reaches all 300 exactly once; ``send_to`` crosses processes; rooms,
presence and the cluster-wide client count are right; after ``kill -9`` of one process, its v2
clients reconnect to the others and are told their session is gone (``resumed: false``,
``wrong_epoch``): v2 sessions live in their process (see ``runtime/redis_broker.py``), so the
move is never a silent gap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import ResumeEvent, WebSocketManager
from tests.runtime.adapters import TIMEOUT, recv_json, run
from tests.runtime.redis_rig import NodeProcess, redis_server

PER_NODE = 100
SENTINEL = 99


@asynccontextmanager
async def cluster(redis_url: str, size: int = 3) -> AsyncIterator[list[NodeProcess]]:
    nodes = list(await asyncio.gather(*(NodeProcess.start(redis_url) for _ in range(size))))
    try:
        yield nodes
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


async def open_client(
    stack: AsyncExitStack, node: NodeProcess, query: str
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await stack.enter_async_context(
        connect(
            f"{node.url}/ws/client?{query}",
            proxy=None,
            open_timeout=TIMEOUT,
            compression=None,
        )
    )
    hello = await recv_json(ws)
    assert hello["type"] == "hello", hello
    return ws, hello


async def next_of(ws: ClientConnection, *kinds: str) -> dict[str, Any]:
    """The next message of one of ``kinds``, skipping pings and replies to others' kinds."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            message = await recv_json(ws)
            if message["type"] in kinds:
                return message
            assert message["type"] in ("ping", "reply"), message


async def request(ws: ClientConnection, ref: int, **message: Any) -> Any:
    """A v1 request: the handler's return value."""
    await ws.send(json.dumps({**message, "id": ref}))
    async with asyncio.timeout(TIMEOUT):
        while True:
            answer = await recv_json(ws)
            if answer["type"] == "reply" and answer["id"] == ref:
                assert "error" not in answer, answer
                return answer["result"]


def test_three_processes_300_clients_broadcast_send_to_rooms_presence_and_count() -> None:
    async def body() -> None:
        async with (
            redis_server() as redis,
            cluster(redis.url) as nodes,
            AsyncExitStack() as stack,
        ):
            clients: dict[str, ClientConnection] = {}
            for k, node in enumerate(nodes):
                for i in range(PER_NODE):
                    ws, _ = await open_client(stack, node, f"client_id=n{k}-c{i}")
                    clients[f"n{k}-c{i}"] = ws
            assert len(clients) == 3 * PER_NODE

            # A broadcast from each process reaches all 300 once; a sentinel broadcast sent
            # after all of them arrived is the next message of every client (no duplicate).
            for k in range(3):
                await clients[f"n{k}-c0"].send(json.dumps({"type": "broadcast", "n": k}))
            for ws in clients.values():
                got = sorted([(await next_of(ws, "news"))["n"] for _ in range(3)])
                assert got == [0, 1, 2]
            await clients["n1-c1"].send(json.dumps({"type": "broadcast", "n": SENTINEL}))
            for ws in clients.values():
                assert (await next_of(ws, "news"))["n"] == SENTINEL

            # send_to crosses processes, both ways
            assert await request(clients["n0-c1"], 1, type="send_to", to="n2-c7", n=7) == 0
            assert (await next_of(clients["n2-c7"], "direct"))["n"] == 7
            assert await request(clients["n2-c1"], 2, type="send_to", to="n1-c8", n=8) == 0
            assert (await next_of(clients["n1-c8"], "direct"))["n"] == 8

            # rooms: ten members on each process; a publication reaches exactly them
            members = [f"n{k}-c{i}" for k in range(3) for i in range(10, 20)]
            for ref, name in enumerate(members, start=10):
                assert await request(clients[name], ref, type="join", room="r") is None
            assert await request(clients["n1-c0"], 3, type="presence", room="r") == sorted(members)
            # (the count is of the publishing process's own members)
            assert await request(clients["n2-c2"], 4, type="publish", room="r", n=5) == 10
            for name in members:
                assert (await next_of(clients[name], "room"))["n"] == 5
            await clients["n0-c2"].send(json.dumps({"type": "broadcast", "n": SENTINEL}))
            for name, ws in clients.items():
                message = await next_of(ws, "news", "room")
                assert (message["type"], message["n"]) == ("news", SENTINEL), name

            # the cluster-wide count: each process announces its own when its clients change;
            # ask until the three announcements are in (bounded), then it is exact
            count = 0
            for ref in range(100, 150):
                count = await request(clients["n0-c3"], ref, type="count")
                if count == 3 * PER_NODE:
                    break
            assert count == 3 * PER_NODE

    run(body(), bound=120)


def test_kill_9_of_a_process_moves_its_v2_clients_to_the_others_with_no_silent_gap() -> None:
    async def body() -> None:
        async with (
            redis_server() as redis,
            cluster(redis.url) as nodes,
            AsyncExitStack() as stack,
        ):
            (survivor_a, survivor_b, doomed) = nodes
            hellos: dict[str, dict[str, Any]] = {}
            for i in range(30):
                _, hello = await open_client(stack, doomed, f"client_id=v{i}&version=2")
                hellos[f"v{i}"] = hello
            watcher, _ = await open_client(stack, survivor_a, "client_id=watcher")
            await watcher.send(json.dumps({"type": "broadcast", "n": 1}))
            await next_of(watcher, "news")
            await doomed.kill()
            moved: dict[str, ClientConnection] = {}
            for i in range(30):
                hello = hellos[f"v{i}"]
                target = (survivor_a, survivor_b)[i % 2]
                query = (
                    f"client_id=v{i}&version=2&session_id={hello['session_id']}"
                    f"&epoch={hello['epoch']}&offset=1"
                )
                ws, again = await open_client(stack, target, query)
                assert again["resumed"] is False
                assert again["resume_outcome"] == "wrong_epoch"
                moved[f"v{i}"] = ws
            await watcher.send(json.dumps({"type": "broadcast", "n": 2}))
            assert (await next_of(watcher, "news"))["n"] == 2
            for ws in moved.values():
                message = await next_of(ws, "news")
                assert (message["offset"], message["n"]) == (1, 2)  # a new session, from 1

    run(body(), bound=120)


def test_kill_9_moves_managers_with_a_url_list_to_the_next_process_told_resumed_false() -> None:
    """WebSocketManager([doomed, a, b], version=2): after kill -9 of the process it was on,
    each manager dials the next URL, is told its session is gone (on_resume: resumed False,
    ``wrong_epoch``) and then receives the cluster's broadcasts in its new session."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            cluster(redis.url) as nodes,
            AsyncExitStack() as stack,
        ):
            (a, b, doomed) = nodes
            managers: list[WebSocketManager] = []
            events: list[ResumeEvent] = []
            resumed = asyncio.Event()
            streams = []
            for i in range(10):
                manager = WebSocketManager(
                    [doomed.url, a.url, b.url],
                    f"m{i}",
                    version=2,
                    backoff_strategy=BackoffStrategy(
                        base_delays_ms=(20, 50), jitter_ratio=0.0, max_attempts=20
                    ),
                    environ={},
                )

                def heard(event: ResumeEvent) -> None:
                    events.append(event)
                    if len(events) == 10:
                        resumed.set()

                manager.on_resume(heard)
                await stack.enter_async_context(manager)
                streams.append(manager.messages())
                managers.append(manager)
            for manager in managers:
                await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
                assert doomed.url in manager.get_state().url
            await doomed.kill()
            async with asyncio.timeout(TIMEOUT):
                await resumed.wait()
            assert {(e.resumed, e.outcome) for e in events} == {(False, "wrong_epoch")}
            for manager in managers:
                await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
                assert doomed.url not in manager.get_state().url
            watcher, _ = await open_client(stack, a, "client_id=watcher")
            await watcher.send(json.dumps({"type": "broadcast", "n": 3}))
            for stream in streams:
                async with asyncio.timeout(TIMEOUT):
                    async for message in stream:
                        if message.get("type") == "news":
                            assert message["n"] == 3
                            break

    run(body(), bound=120)
