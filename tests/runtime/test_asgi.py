"""SteadyASGI through a real uvicorn on 127.0.0.1, against real websockets clients.

Each test starts uvicorn on port 0 inside its own event loop (``serve()`` as a task, stopped
with ``should_exit``) with an empty environment. One test drives the lifespan in process, by
hand: uvicorn closes its WebSockets before it sends ``lifespan.shutdown`` (see
``test_without_the_shutdown_recipe_uvicorn_itself_closes_clients_with_1012``). Starlette's
TestClient is not used: starlette 1.x needs the ``httpx2`` package for it. Every wait is
bounded by a multiple of ``MS``; no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import uvicorn
import uvicorn.config
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from steadysocket.model.server_session import GcPolicy
from steadysocket.runtime.asgi import Message, SteadyASGI
from steadysocket.runtime.server import Client
from tests.runtime.adapters import (
    SEED_HELLO_FIELDS,
    TIMEOUT,
    GracefulServer,
    closed_with,
    dial,
    hello_facts,
    hello_of,
    http_get,
    recv_json,
    recv_type,
    seed_hello,
    still_works,
    uvicorn_config,
    uvicorn_port,
)
from tests.runtime.adapters import run as run_bounded

run = partial(run_bounded, bound=4 * TIMEOUT)
"""Run one async test body, bounded by four ``TIMEOUT``s."""


def steady(**kwargs: Any) -> SteadyASGI:
    kwargs.setdefault("environ", {})
    return SteadyASGI(**kwargs)


@asynccontextmanager
async def serving(app: ASGIApp, graceful: SteadyASGI | None = None) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free port; yield ``ws://127.0.0.1:<port>``."""
    config = uvicorn_config(app)
    server = uvicorn.Server(config) if graceful is None else GracefulServer(config, graceful)
    async with uvicorn_port(server, stop_bound=TIMEOUT) as port:
        yield f"ws://127.0.0.1:{port}"


async def refusals(base: str, queries: list[str]) -> list[tuple[int, str]]:
    result = []
    for query in queries:
        async with dial(base, query) as ws:
            result.append(await closed_with(ws))
    return result


# ---- PROTOCOL Server 1 and 2: close codes after the upgrade --------------------------------------


def test_a_bad_version_is_closed_with_4400_and_its_reason() -> None:
    async def body() -> list[tuple[int, str]]:
        async with serving(steady()) as base:
            return await refusals(base, ["client_id=c1&version=3", "client_id=c1&version=abc"])

    assert run(body()) == [(4400, "Unsupported version '3'"), (4400, "Unsupported version 'abc'")]


def test_a_bad_role_is_closed_with_4401_and_its_reason() -> None:
    async def body() -> list[tuple[int, str]]:
        async with serving(steady()) as base:
            return await refusals(base, ["client_id=c1&role=Admin", "client_id=c1&role=x"])

    assert run(body()) == [(4401, "Invalid role 'Admin'"), (4401, "Invalid role 'x'")]


def test_a_missing_or_malformed_client_id_is_closed_with_1008_invalid_client_id() -> None:
    async def body() -> list[tuple[int, str]]:
        async with serving(steady()) as base:
            return await refusals(base, ["", "client_id=", "client_id=-x", "client_id=a%20b"])

    assert run(body()) == [(1008, "Invalid client_id")] * 4


def test_version_is_checked_before_role_and_role_before_client_id() -> None:
    async def body() -> list[tuple[int, str]]:
        async with serving(steady()) as base:
            return await refusals(base, ["version=9&role=x", "role=x"])

    assert run(body()) == [(4400, "Unsupported version '9'"), (4401, "Invalid role 'x'")]


# ---- PROTOCOL Server 3 and 4: hello and heartbeat ------------------------------------------------


def test_the_hello_has_exactly_the_seeds_seven_fields() -> None:
    client_id = str(uuid.uuid4())

    async def body() -> dict[str, Any]:
        app = steady(environ={"WS_HEARTBEAT_INTERVAL_MS": "4321"})
        async with (
            serving(app) as base,
            dial(base, f"client_id={client_id}&version=1&role=admin") as ws,
        ):
            return await hello_of(ws)

    hello = run(body())
    assert set(hello) == set(SEED_HELLO_FIELDS)
    assert hello_facts(hello) == seed_hello(client_id, 4321)


def test_the_server_pings_every_interval_counting_from_zero() -> None:
    async def body() -> list[dict[str, Any]]:
        app = steady(heartbeat_interval_ms=50, connection_timeout_ms=5000)
        async with serving(app) as base, dial(base, "client_id=beat") as ws:
            await hello_of(ws)
            pings = []
            for _ in range(3):
                pings.append(await recv_json(ws))
                await ws.send('{"type":"pong"}')
            return pings

    pings = run(body())
    assert [p["type"] for p in pings] == ["ping"] * 3
    assert [p["heartbeat_count"] for p in pings] == [0, 1, 2]
    assert {p["client_id"] for p in pings} == {"beat"}
    assert all(set(p) == {"type", "timestamp", "heartbeat_count", "client_id"} for p in pings)


def test_a_client_silent_after_a_ping_is_closed_with_1011_heartbeat_timeout() -> None:
    async def body() -> tuple[int, str]:
        app = steady(heartbeat_interval_ms=50, connection_timeout_ms=150)
        async with serving(app) as base, dial(base, "client_id=quiet") as ws:
            await hello_of(ws)
            return await closed_with(ws)

    assert run(body()) == (1011, "heartbeat timeout")


# ---- PROTOCOL Server 5: bad input, handlers ------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "error_code"),
    [
        ("{not json", "INVALID_JSON"),
        ("[1, 2]", "INVALID_MESSAGE"),
        ('"text"', "INVALID_MESSAGE"),
        ('{"payload": 1}', "INVALID_MESSAGE"),
        (b"\x00\x01", "UNSUPPORTED_DATA"),
    ],
    ids=["invalid-json", "array", "string", "no-type", "binary"],
)
def test_bad_input_gets_an_error_and_the_connection_keeps_working(
    frame: str | bytes, error_code: str
) -> None:
    async def body() -> tuple[dict[str, Any], bool]:
        async with serving(steady()) as base, dial(base, "client_id=bad") as ws:
            await hello_of(ws)
            await ws.send(frame)
            error = await recv_type(ws, "error")
            return error, await still_works(ws)

    error, works = run(body())
    assert error["error_code"] == error_code
    assert set(error) == {"type", "error_code", "message", "timestamp"}
    assert works


def test_a_frame_over_the_size_limit_closes_with_1009() -> None:
    async def body() -> tuple[int, str]:
        async with serving(steady(max_message_bytes=64)) as base, dial(base) as ws:
            await hello_of(ws)
            await ws.send(json.dumps({"type": "chat", "text": "x" * 64}))
            return await closed_with(ws)

    assert run(body()) == (1009, "Message too big")


def test_a_registered_handler_replies_and_other_types_get_the_default_echo() -> None:
    seen: list[tuple[dict[str, Any], str]] = []

    async def body() -> tuple[dict[str, Any], dict[str, Any]]:
        app = steady()

        @app.on_message("chat")
        async def chat(message: dict[str, Any], client: Client) -> None:
            seen.append((message, client.client_id))
            await client.send({"type": "chat_ack", "n": message["n"]})

        async with serving(app) as base, dial(base, "client_id=talker") as ws:
            await hello_of(ws)
            await ws.send('{"type":"chat","n":3}')
            ack = await recv_type(ws, "chat_ack")
            await ws.send('{"type":"test_message","payload":{"test":"data"}}')
            return ack, await recv_type(ws, "echo")

    ack, echo = run(body())
    assert seen == [({"type": "chat", "n": 3}, "talker")]
    assert ack["n"] == 3
    assert ack["timestamp"].endswith("Z")
    assert set(echo) == {"type", "original_message", "timestamp", "client_id"}
    assert echo["original_message"] == {"type": "test_message", "payload": {"test": "data"}}
    assert echo["client_id"] == "talker"


def test_hooks_send_to_and_broadcast_work_through_uvicorn() -> None:
    events: list[tuple[str, str, int | None]] = []

    async def body() -> tuple[int, int, list[str], str]:
        app = steady()
        gone = asyncio.Event()

        @app.on_connect
        async def connected(client: Client) -> None:
            events.append(("connect", client.client_id, client.close_code))

        @app.on_disconnect
        async def disconnected(client: Client) -> None:
            events.append(("disconnect", client.client_id, client.close_code))
            gone.set()

        async with serving(app) as base:
            async with (
                dial(base, "client_id=alice") as alice,
                dial(base, "client_id=bob") as bob,
                dial(base, "", path="/ws/old") as legacy,
            ):
                await hello_of(alice)
                await hello_of(bob)
                to_alice = await app.send_to("alice", {"type": "note", "text": "hi"})
                note = (await recv_type(alice, "note"))["text"]
                everyone = await app.broadcast({"type": "news"})
                kinds = [(await recv_type(ws, "news"))["type"] for ws in (alice, bob)]
                await legacy.send("after")
                async with asyncio.timeout(TIMEOUT):
                    legacy_reply = str(await legacy.recv())
                await bob.close()
                async with asyncio.timeout(TIMEOUT):
                    await gone.wait()
            return to_alice, everyone, [note, *kinds], legacy_reply

    assert run(body()) == (1, 2, ["hi", "news", "news"], "Echo: after")
    assert sorted(events)[:2] == [("connect", "alice", None), ("connect", "bob", None)]
    assert ("disconnect", "bob", 1000) in events


def test_a_client_that_stops_reading_gets_pushes_refused_then_is_dropped_with_1006(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chunk = {"type": "bulk", "data": uuid.uuid4().hex * 16384}  # 512 KiB

    async def body() -> tuple[bool, int, bool, list[tuple[str, int | None]]]:
        codes: list[tuple[str, int | None]] = []
        slow_gone = asyncio.Event()
        app = steady(heartbeat_interval_ms=60_000, connection_timeout_ms=500)

        @app.on_disconnect
        async def gone(client: Client) -> None:
            codes.append((client.client_id, client.close_code))
            if client.client_id == "slow":
                slow_gone.set()

        async with serving(app) as base:
            stalled = await connect(
                f"{base}/ws/client?client_id=slow",
                proxy=None,
                max_queue=1,
                compression=None,
                max_size=None,
            )
            try:
                await hello_of(stalled)
                sent = True
                async with asyncio.timeout(TIMEOUT):
                    while sent:  # bounded: the outbox holds 4 MiB at most
                        sent = await app.send_to("slow", chunk) == 1
                async with dial(base, "client_id=fine") as fine:
                    await hello_of(fine)
                    works = await still_works(fine)
                    async with asyncio.timeout(TIMEOUT):
                        await slow_gone.wait()
                return sent, app.refused_pushes, works, codes
            finally:
                stalled.transport.abort()

    with caplog.at_level(logging.WARNING):
        sent, refused, works, codes = run(body())
    assert not sent
    assert refused >= 1
    assert works
    assert codes[0] == ("slow", 1006)
    assert "Exception in ASGI application" not in caplog.text


# ---- PROTOCOL Server 7: legacy echo and unknown paths --------------------------------------------


def test_the_legacy_route_echoes_text_without_a_hello() -> None:
    async def body() -> list[Any]:
        async with serving(steady()) as base, dial(base, "", path="/ws/abc-123") as ws:
            replies = []
            for text in ("hello", "", "ünïcode"):
                await ws.send(text)
                async with asyncio.timeout(TIMEOUT):
                    replies.append(await ws.recv())
            return replies

    assert run(body()) == ["Echo: hello", "Echo: ", "Echo: ünïcode"]


def test_the_legacy_route_never_shadows_the_client_endpoint() -> None:
    async def body() -> str:
        async with serving(steady()) as base, dial(base, "client_id=c1") as ws:
            return str((await recv_json(ws))["type"])

    assert run(body()) == "hello"


def test_unknown_paths_get_http_404_for_websockets_and_plain_http() -> None:
    paths = ["/", "/nope", "/ws", "/ws/", "/ws/a/b", "/ws/client/", "/ws/v2/connect"]

    async def body() -> tuple[list[int], bytes]:
        statuses = []
        async with serving(steady()) as base:
            for path in paths:
                with pytest.raises(InvalidStatus) as info:
                    async with dial(base, "", path=path):
                        pass
                statuses.append(info.value.response.status_code)
            raw = await http_get(base, "/nope")
        return statuses, raw

    statuses, raw = run(body())
    assert statuses == [404] * len(paths)
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert raw.endswith(b"\r\n\r\nNot Found\n")


# ---- PROTOCOL Server 6: shutdown -----------------------------------------------------------------


def test_shutdown_closes_every_client_with_1001_and_leaves_no_task_behind() -> None:
    async def body() -> tuple[list[tuple[int, str]], set[asyncio.Task[Any]], int]:
        before = asyncio.all_tasks()
        app = steady(heartbeat_interval_ms=50)
        async with serving(app, graceful=app) as base:
            clients = [await dial(base, f"client_id=s{n}") for n in range(3)]
            for ws in clients:
                await hello_of(ws)
            legacy = await dial(base, "", path="/ws/old")
        frames = [await closed_with(ws) for ws in [*clients, legacy]]
        for ws in [*clients, legacy]:
            async with asyncio.timeout(TIMEOUT):
                await ws.wait_closed()
        await asyncio.sleep(0)
        left = asyncio.all_tasks() - before
        return frames, left, len(app.clients)

    frames, left, connected = run(body())
    assert frames == [(1001, "Server shutting down")] * 4
    assert left == set()
    assert connected == 0


def test_without_the_shutdown_recipe_uvicorn_itself_closes_clients_with_1012() -> None:
    """Why the README's recipe exists: uvicorn closes WebSockets before lifespan.shutdown."""

    async def body() -> tuple[int, str]:
        app = steady()
        async with serving(app) as base:
            ws = await dial(base)
            await hello_of(ws)
        return await closed_with(ws)

    assert run(body()) == (1012, "")


def test_lifespan_shutdown_closes_open_connections_with_1001_and_later_upgrades_too() -> None:
    """The lifespan driven by hand, as a server that sends it with connections open would."""

    async def get(queue: asyncio.Queue[Message]) -> Message:
        async with asyncio.timeout(TIMEOUT):
            return await queue.get()

    async def body() -> list[Message]:
        app = steady()
        life_in: asyncio.Queue[Message] = asyncio.Queue()
        life_out: asyncio.Queue[Message] = asyncio.Queue()
        ws_in: asyncio.Queue[Message] = asyncio.Queue()
        ws_out: asyncio.Queue[Message] = asyncio.Queue()
        late_in: asyncio.Queue[Message] = asyncio.Queue()
        late_out: asyncio.Queue[Message] = asyncio.Queue()
        scope = {
            "type": "websocket",
            "path": "/ws/client",
            "root_path": "",
            "query_string": b"client_id=life",
            "client": ("127.0.0.1", 50000),
        }
        seen: list[Message] = []
        async with asyncio.TaskGroup() as group:
            group.create_task(app({"type": "lifespan"}, life_in.get, life_out.put))
            life_in.put_nowait({"type": "lifespan.startup"})
            seen.append(await get(life_out))
            group.create_task(app(dict(scope), ws_in.get, ws_out.put))
            ws_in.put_nowait({"type": "websocket.connect"})
            seen.append(await get(ws_out))  # accept
            assert json.loads((await get(ws_out))["text"])["type"] == "hello"
            life_in.put_nowait({"type": "lifespan.shutdown"})
            seen.append(await get(ws_out))  # close
            ws_in.put_nowait({"type": "websocket.disconnect", "code": 1001})
            seen.append(await get(life_out))  # shutdown complete
            group.create_task(app(dict(scope), late_in.get, late_out.put))
            late_in.put_nowait({"type": "websocket.connect"})
            seen.append(await get(late_out))  # accept
            seen.append(await get(late_out))  # close
        return seen

    assert run(body()) == [
        {"type": "lifespan.startup.complete"},
        {"type": "websocket.accept"},
        {"type": "websocket.close", "code": 1001, "reason": "Server shutting down"},
        {"type": "lifespan.shutdown.complete"},
        {"type": "websocket.accept"},
        {"type": "websocket.close", "code": 1001, "reason": "Server shutting down"},
    ]


def test_the_lifespan_applies_the_gc_policy_and_shutdown_gives_the_collector_back() -> None:
    async def body() -> tuple[int, tuple[int, int, int]]:
        app = steady(gc_policy=GcPolicy(gen0_threshold=23_456))
        life_in: asyncio.Queue[Message] = asyncio.Queue()
        life_out: asyncio.Queue[Message] = asyncio.Queue()
        async with asyncio.TaskGroup() as group:
            group.create_task(app({"type": "lifespan"}, life_in.get, life_out.put))
            life_in.put_nowait({"type": "lifespan.startup"})
            async with asyncio.timeout(TIMEOUT):
                await life_out.get()
            during = gc.get_threshold()[0]
            life_in.put_nowait({"type": "lifespan.shutdown"})
            async with asyncio.timeout(TIMEOUT):
                await life_out.get()
        return during, gc.get_threshold()

    original = gc.get_threshold()
    during, after = run(body())
    assert during == 23_456
    assert after == original


# ---- mounted in Starlette ------------------------------------------------------------------------


def test_mounted_in_starlette_a_real_client_still_reads_4401_and_the_hello() -> None:
    async def body() -> tuple[list[tuple[int, str]], str, str]:
        app = steady()
        site = Starlette(routes=[Mount("/", app=app)])
        async with serving(site) as base:
            refused = await refusals(base, ["client_id=c1&role=x"])
            async with dial(base, "client_id=m1") as ws:
                hello = await hello_of(ws)
            async with dial(base, "", path="/ws/legacy") as ws:
                await ws.send("hi")
                async with asyncio.timeout(TIMEOUT):
                    echo = str(await ws.recv())
        return refused, hello["client_id"], echo

    assert run(body()) == ([(4401, "Invalid role 'x'")], "m1", "Echo: hi")


def test_mounted_under_a_prefix_the_endpoints_move_with_it() -> None:
    async def body() -> tuple[str, int]:
        app = steady()
        site = Starlette(routes=[Mount("/realtime", app=app)])
        async with serving(site) as base:
            async with dial(base, "client_id=p1", path="/realtime/ws/client") as ws:
                hello = await hello_of(ws)
            with pytest.raises(InvalidStatus) as info:
                async with dial(base, "client_id=p1", path="/realtime/nope"):
                    pass
        return hello["client_id"], info.value.response.status_code

    assert run(body()) == ("p1", 404)


def test_other_scope_types_are_refused() -> None:
    async def never() -> Message:
        raise AssertionError("not called")

    async def ignore(message: Message) -> None:
        raise AssertionError("not called")

    with pytest.raises(ValueError, match="'webtransport'"):
        run(steady()({"type": "webtransport"}, never, ignore))
