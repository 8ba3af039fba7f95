"""SteadyServer against real websockets clients on 127.0.0.1: a test per docs/protocol.md rule.

Each test starts its own server on port 0 with an empty environment. Every wait is bounded by
a multiple of ``MS``; no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from steadysocket.model.protocol import decode_text, parse_timestamp
from steadysocket.model.server_session import CloseRecord, ConfigError, GcPolicy, ServerConfig
from steadysocket.runtime.server import Client, Endpoints, SteadyServer
from tests.runtime.adapters import (
    MS,
    SEED_HELLO_FIELDS,
    TIMEOUT,
    closed_with,
    dial,
    hello_facts,
    hello_of,
    received_close,
    recv_json,
    recv_type,
    seed_hello,
    still_works,
)
from tests.runtime.adapters import run as run_bounded

run = partial(run_bounded, bound=4 * TIMEOUT)
"""Run one async test body, bounded by four ``TIMEOUT``s."""


@asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[SteadyServer]:
    kwargs.setdefault("environ", {})
    async with SteadyServer(port=0, **kwargs) as server:
        yield server


async def refused_with(server: SteadyServer, query: str) -> tuple[int, str]:
    async with dial(server.url, query) as ws:
        return await closed_with(ws)


# ---- PROTOCOL Server 1 and 2: close codes after the upgrade, checked in order --------------


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("client_id=c1&version=3", "Unsupported version '3'"),
        ("client_id=c1&version=abc", "Unsupported version 'abc'"),
        ("client_id=c1&version=1.0", "Unsupported version '1.0'"),
    ],
)
def test_a_bad_version_is_closed_with_4400_and_its_reason(query: str, reason: str) -> None:
    async def body() -> tuple[int, str]:
        async with running() as server:
            return await refused_with(server, query)

    assert run(body()) == (4400, reason)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("client_id=c1&role=Admin", "Invalid role 'Admin'"),
        ("client_id=c1&role=root", "Invalid role 'root'"),
        ("client_id=c1&role=", "Invalid role ''"),
    ],
)
def test_a_bad_role_is_closed_with_4401_and_its_reason(query: str, reason: str) -> None:
    async def body() -> tuple[int, str]:
        async with running() as server:
            return await refused_with(server, query)

    assert run(body()) == (4401, reason)


@pytest.mark.parametrize(
    "query", ["", "role=test", "client_id=", "client_id=has%20space", "client_id=" + "a" * 129]
)
def test_a_missing_or_malformed_client_id_is_closed_with_1008_invalid_client_id(
    query: str,
) -> None:
    async def body() -> tuple[int, str]:
        async with running() as server:
            return await refused_with(server, query)

    assert run(body()) == (1008, "Invalid client_id")


def test_version_is_checked_before_role_and_role_before_client_id() -> None:
    async def body() -> list[tuple[int, str]]:
        async with running() as server:
            return [
                await refused_with(server, "version=7&role=nope"),
                await refused_with(server, "role=nope"),
            ]

    assert run(body()) == [(4400, "Unsupported version '7'"), (4401, "Invalid role 'nope'")]


def test_an_error_while_preparing_the_hello_closes_with_4500_server_handshake_error() -> None:
    def broken_ids() -> str:
        raise RuntimeError("no entropy today")

    async def body() -> tuple[int, str]:
        async with running(request_id_factory=broken_ids) as server:
            return await refused_with(server, "client_id=c1")

    assert run(body()) == (4500, "Server handshake error")


# ---- PROTOCOL Server 3: the hello ---------------------------------------------------------------


def test_the_hello_has_exactly_the_seeds_seven_fields() -> None:
    client_id = str(uuid.uuid4())

    async def body() -> dict[str, Any]:
        async with (
            running(heartbeat_interval_ms=1234) as server,
            dial(server.url, f"client_id={client_id}&version=1&role=admin") as ws,
        ):
            return await hello_of(ws)

    hello = run(body())
    assert set(hello) == set(SEED_HELLO_FIELDS)
    assert hello_facts(hello) == seed_hello(client_id, 1234)


def test_the_hello_announces_the_heartbeat_interval_from_the_environment() -> None:
    async def body() -> int:
        async with (
            running(environ={"WS_HEARTBEAT_INTERVAL_MS": "4321"}) as server,
            dial(server.url) as ws,
        ):
            return int((await hello_of(ws))["heartbeat_interval_ms"])

    assert run(body()) == 4321


# ---- PROTOCOL Server 4: heartbeat and the dead-client rule -----------------------------------


def test_the_server_pings_every_interval_counting_from_zero() -> None:
    async def body() -> list[dict[str, Any]]:
        async with (
            running(heartbeat_interval_ms=50, connection_timeout_ms=5000) as server,
            dial(server.url, "client_id=beat") as ws,
        ):
            await hello_of(ws)
            pings = []
            for _ in range(4):
                pings.append(await recv_json(ws))
                await ws.send('{"type":"pong"}')
            return pings

    pings = run(body())
    assert [p["type"] for p in pings] == ["ping"] * 4
    assert [p["heartbeat_count"] for p in pings] == [0, 1, 2, 3]
    assert {p["client_id"] for p in pings} == {"beat"}
    assert all(set(p) == {"type", "timestamp", "heartbeat_count", "client_id"} for p in pings)
    stamps = [parse_timestamp(p["timestamp"]) for p in pings]
    assert stamps == sorted(stamps)


def test_the_heartbeat_starts_no_task_one_timer_handle_per_connection_sends_the_pings() -> None:
    """Ten connections pinged every 20 ms: the tasks are the same with the heartbeat on as with
    it off, and each connection's next ping is one ``asyncio.TimerHandle``. The pings and the
    hello went out directly (the client reads), so no connection started a writer task: the
    tasks are websockets' handler and the reader."""

    async def tasks_with(heartbeat_interval_ms: int) -> tuple[int, int, list[object]]:
        before = len(asyncio.all_tasks())
        async with running(
            heartbeat_interval_ms=heartbeat_interval_ms, connection_timeout_ms=5000
        ) as server:
            sockets = [await dial(server.url, f"client_id=t{n}") for n in range(10)]
            for ws in sockets:
                await hello_of(ws)
            pings = 0
            if heartbeat_interval_ms < 1000:
                for ws in sockets:
                    for _ in range(3):
                        assert (await recv_json(ws))["type"] == "ping"
                        await ws.send('{"type":"pong"}')
                        pings += 1
            tasks = len(asyncio.all_tasks()) - before
            timers: list[object] = [conn.timer for conn in server._conns]
            assert [conn.writer for conn in server._conns] == [None] * 10
            for ws in sockets:
                await ws.close()
        return tasks, pings, timers

    async def body() -> tuple[tuple[int, int, list[object]], tuple[int, int, list[object]]]:
        return await tasks_with(20), await tasks_with(600_000)

    (beating, pings, timers), (quiet, _, _) = run(body())
    assert pings == 30
    assert beating == quiet
    assert len(timers) == 10
    assert all(isinstance(timer, asyncio.TimerHandle) for timer in timers)


def test_the_server_manages_the_collector_while_it_runs_and_gives_it_back() -> None:
    """Generation 0's threshold is raised while the server runs and restored when it closes;
    the periodic freeze moves what the connections keep alive to the permanent generation; the
    last server to close unfreezes it. ``gc_policy=None`` leaves the collector alone."""
    policy = GcPolicy(freeze_interval_ms=20, gen0_threshold=12_345)

    async def body() -> tuple[int, int, int, tuple[int, ...], tuple[int, ...]]:
        gc.unfreeze()
        async with running(gc_policy=policy) as server:
            running_threshold = gc.get_threshold()[0]
            async with dial(server.url, "client_id=frozen") as ws:
                await hello_of(ws)
                await asyncio.sleep(100 * MS)
                frozen = gc.get_freeze_count()
        after = gc.get_freeze_count()
        async with running(gc_policy=None):
            untouched = gc.get_threshold()
        return running_threshold, frozen, after, untouched, gc.get_threshold()

    original = gc.get_threshold()
    threshold, frozen, after, untouched, restored = run(body())
    assert threshold == 12_345
    assert frozen > 0
    assert after == 0
    assert untouched == original
    assert restored == original


def test_the_collector_is_unfrozen_once_a_connection_sets_worth_has_closed() -> None:
    policy = GcPolicy(freeze_interval_ms=20, unfreeze_min_closed=3)

    async def body() -> tuple[int, int]:
        async with running(gc_policy=policy) as server, dial(server.url, "client_id=stay") as stay:
            await hello_of(stay)
            await asyncio.sleep(60 * MS)
            frozen = gc.get_freeze_count()
            for n in range(3):
                async with dial(server.url, f"client_id=churn{n}") as ws:
                    await hello_of(ws)
            for _ in range(100):  # until the closes are counted and a tick unfreezes
                if server._closed_since_unfreeze == 0:
                    break
                await asyncio.sleep(10 * MS)
            return frozen, server._closed_since_unfreeze

    frozen, closed = run(body())
    assert frozen > 0
    assert closed == 0


def test_status_counts_the_pings_sent_and_names_the_last_one() -> None:
    async def body() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        async with (
            running(heartbeat_interval_ms=50, connection_timeout_ms=5000) as server,
            dial(server.url) as ws,
        ):
            await hello_of(ws)
            pings = [await recv_json(ws), await recv_json(ws)]
            await ws.send('{"type":"status"}')
            while (message := await recv_json(ws))["type"] == "ping":
                pings.append(message)  # sent before the reply, so counted in it
            return pings, message

    pings, status = run(body())
    assert set(status) == {
        "type",
        "connection_uptime_seconds",
        "heartbeat_count",
        "last_heartbeat",
        "client_id",
        "timestamp",
    }
    assert status["type"] == "status"
    assert status["heartbeat_count"] == len(pings)
    assert status["last_heartbeat"] == pings[-1]["timestamp"]
    assert status["client_id"] == "c1"
    assert status["connection_uptime_seconds"] > 0


def test_a_client_silent_after_a_ping_is_closed_with_1011_heartbeat_timeout() -> None:
    async def body() -> tuple[int, str, int]:
        async with (
            running(heartbeat_interval_ms=50, connection_timeout_ms=150) as server,
            dial(server.url) as ws,
        ):
            await hello_of(ws)
            pings = 0
            rcvd: Close | None = None
            try:
                async with asyncio.timeout(TIMEOUT):
                    while True:  # read, never send
                        pings += json.loads(await ws.recv())["type"] == "ping"
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
            assert rcvd is not None
            return rcvd.code, rcvd.reason, pings

    code, reason, pings = run(body())
    assert (code, reason) == (1011, "heartbeat timeout")
    assert pings >= 1


def test_a_client_that_answers_pings_is_never_closed_for_silence() -> None:
    async def body() -> bool:
        async with (
            running(heartbeat_interval_ms=25, connection_timeout_ms=250) as server,
            dial(server.url) as ws,
        ):
            await hello_of(ws)
            for expected in range(20):  # 20 intervals span twice the connection timeout
                ping = await recv_json(ws)
                assert ping["heartbeat_count"] == expected
                await ws.send('{"type":"pong"}')
            return await still_works(ws)

    assert run(body())


# ---- PROTOCOL Server 5: every message type ------------------------------------------------------


def test_ping_is_answered_with_a_pong() -> None:
    async def body() -> dict[str, Any]:
        async with running() as server, dial(server.url, "client_id=pinger") as ws:
            await hello_of(ws)
            await ws.send('{"type":"ping","timestamp":"2025-08-15T10:00:00Z"}')
            return await recv_json(ws)

    pong = run(body())
    assert set(pong) == {"type", "timestamp", "client_id"}
    assert (pong["type"], pong["client_id"]) == ("pong", "pinger")
    assert pong["timestamp"].endswith("Z")


def test_pong_gets_no_reply() -> None:
    async def body() -> dict[str, Any]:
        async with running() as server, dial(server.url) as ws:
            await hello_of(ws)
            await ws.send('{"type":"pong"}')
            await ws.send('{"type":"ping"}')
            return await recv_json(ws)

    assert run(body())["type"] == "pong"


def test_invalid_json_gets_an_invalid_json_error_and_the_connection_stays_open() -> None:
    async def body() -> tuple[dict[str, Any], bool]:
        async with running() as server, dial(server.url) as ws:
            await hello_of(ws)
            await ws.send("{not json")
            return await recv_json(ws), await still_works(ws)

    error, works = run(body())
    assert set(error) == {"type", "error_code", "message", "timestamp"}
    assert (error["type"], error["error_code"]) == ("error", "INVALID_JSON")
    assert works


@pytest.mark.parametrize("text", ["[1,2,3]", "42", '"text"', "null"])
def test_json_that_is_not_an_object_gets_invalid_message_and_the_connection_stays_open(
    text: str,
) -> None:
    async def body() -> tuple[dict[str, Any], bool]:
        async with running() as server, dial(server.url) as ws:
            await hello_of(ws)
            await ws.send(text)
            return await recv_json(ws), await still_works(ws)

    error, works = run(body())
    assert (error["type"], error["error_code"]) == ("error", "INVALID_MESSAGE")
    assert works


@pytest.mark.parametrize("text", ["{}", '{"kind":"chat"}', '{"type":5}', '{"type":null}'])
def test_an_object_without_a_string_type_gets_invalid_message_and_the_connection_stays_open(
    text: str,
) -> None:
    async def body() -> tuple[dict[str, Any], bool]:
        async with running() as server, dial(server.url) as ws:
            await hello_of(ws)
            await ws.send(text)
            return await recv_json(ws), await still_works(ws)

    error, works = run(body())
    assert (error["type"], error["error_code"]) == ("error", "INVALID_MESSAGE")
    assert works


def test_a_binary_frame_gets_unsupported_data_and_the_connection_stays_open() -> None:
    async def body() -> tuple[dict[str, Any], bool]:
        async with running() as server, dial(server.url) as ws:
            await hello_of(ws)
            await ws.send(b'{"type":"ping"}')
            return await recv_json(ws), await still_works(ws)

    error, works = run(body())
    assert (error["type"], error["error_code"]) == ("error", "UNSUPPORTED_DATA")
    assert works


def test_a_frame_over_the_size_limit_closes_with_1009() -> None:
    async def body() -> tuple[int, bool]:
        async with running(max_message_bytes=1024) as server:
            async with dial(server.url) as ws:
                await hello_of(ws)
                await ws.send(json.dumps({"type": "chat", "pad": "x" * 2000}))
                code, _ = await closed_with(ws)
            # The server itself is unaffected.
            async with dial(server.url) as other:
                await hello_of(other)
                return code, await still_works(other)

    assert run(body()) == (1009, True)


def test_a_frame_at_the_size_limit_is_accepted() -> None:
    message = json.dumps({"type": "chat", "pad": ""})
    message = json.dumps({"type": "chat", "pad": "x" * (1024 - len(message))})
    assert len(message.encode()) == 1024

    async def body() -> dict[str, Any]:
        async with running(max_message_bytes=1024) as server, dial(server.url) as ws:
            await hello_of(ws)
            await ws.send(message)
            return await recv_json(ws)

    assert run(body())["type"] == "echo"


def test_the_default_handler_echoes_an_application_message() -> None:
    async def body() -> dict[str, Any]:
        async with running() as server, dial(server.url, "client_id=echoer") as ws:
            await hello_of(ws)
            await ws.send('{"type":"test_message","payload":{"test":"data"}}')
            return await recv_json(ws)

    echo = run(body())
    assert set(echo) == {"type", "original_message", "timestamp", "client_id"}
    assert echo["type"] == "echo"
    assert echo["original_message"] == {"type": "test_message", "payload": {"test": "data"}}
    assert echo["client_id"] == "echoer"


# ---- application hooks and server push ---------------------------------------------------------


def test_a_registered_handler_gets_the_message_and_can_reply() -> None:
    seen: list[tuple[dict[str, Any], str]] = []

    async def body() -> dict[str, Any]:
        async with running() as server:

            @server.on_message("chat")
            async def chat(message: dict[str, Any], client: Client) -> None:
                seen.append((message, client.client_id))
                await client.send({"type": "chat_ack", "n": message["n"]})

            async with dial(server.url, "client_id=talker") as ws:
                await hello_of(ws)
                await ws.send('{"type":"chat","n":3}')
                return await recv_json(ws)

    ack = run(body())
    assert seen == [({"type": "chat", "n": 3}, "talker")]
    assert ack["type"] == "chat_ack"
    assert ack["n"] == 3
    assert ack["timestamp"].endswith("Z")


def test_a_handler_that_raises_is_logged_and_the_connection_stays_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> bool:
        async with running() as server:

            @server.on_message("boom")
            async def boom(message: dict[str, Any], client: Client) -> None:
                raise RuntimeError("handler bug")

            async with dial(server.url) as ws:
                await hello_of(ws)
                await ws.send('{"type":"boom"}')
                return await still_works(ws)

    with caplog.at_level(logging.ERROR, logger="steadysocket.runtime.server"):
        assert run(body())
    assert "handler for 'boom' failed" in caplog.text
    assert "handler bug" in caplog.text


def test_system_types_cannot_be_given_a_handler() -> None:
    server = SteadyServer(port=0, environ={})
    for kind in ("ping", "pong", "status"):
        with pytest.raises(ValueError, match=kind):
            server.on_message(kind)


def test_connect_and_disconnect_hooks_run_once_per_connection() -> None:
    events: list[tuple[str, str, int | None]] = []

    async def body() -> None:
        gone = asyncio.Event()
        async with running() as server:

            @server.on_connect
            async def connected(client: Client) -> None:
                events.append(("connect", client.client_id, client.close_code))
                await client.send({"type": "welcome"})

            @server.on_disconnect
            async def disconnected(client: Client) -> None:
                events.append(("disconnect", client.client_id, client.close_code))
                gone.set()

            async with dial(server.url, "client_id=hooked") as ws:
                await hello_of(ws)
                assert (await recv_json(ws))["type"] == "welcome"
            async with asyncio.timeout(TIMEOUT):
                await gone.wait()

    run(body())
    assert events == [("connect", "hooked", None), ("disconnect", "hooked", 1000)]


def test_hooks_that_raise_are_logged_and_do_not_break_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> bool:
        async with running() as server:

            @server.on_connect
            async def bad_connect(client: Client) -> None:
                raise RuntimeError("connect hook bug")

            @server.on_disconnect
            async def bad_disconnect(client: Client) -> None:
                raise RuntimeError("disconnect hook bug")

            async with dial(server.url) as ws:
                await hello_of(ws)
                works = await still_works(ws)
            async with dial(server.url) as ws:
                await hello_of(ws)
                return works and await still_works(ws)

    with caplog.at_level(logging.ERROR, logger="steadysocket.runtime.server"):
        assert run(body())
    assert "connect hook bug" in caplog.text
    assert "disconnect hook bug" in caplog.text


def test_send_to_reaches_every_connection_of_that_client_id_only() -> None:
    async def body() -> tuple[int, int, list[dict[str, Any]], bool]:
        async with (
            running() as server,
            dial(server.url, "client_id=alice") as a1,
            dial(server.url, "client_id=alice") as a2,
            dial(server.url, "client_id=bob") as bob,
        ):
            for ws in (a1, a2, bob):
                await hello_of(ws)
            sent = await server.send_to("alice", {"type": "note", "text": "hi"})
            nobody = await server.send_to("carol", {"type": "note"})
            got = [await recv_json(a1), await recv_json(a2)]
            await bob.send('{"type":"ping"}')
            bob_next_is_pong = (await recv_json(bob))["type"] == "pong"
            return sent, nobody, got, bob_next_is_pong

    sent, nobody, got, bob_next_is_pong = run(body())
    assert (sent, nobody) == (2, 0)
    assert [m["text"] for m in got] == ["hi", "hi"]
    assert all(m["type"] == "note" and m["timestamp"].endswith("Z") for m in got)
    assert bob_next_is_pong


def test_broadcast_reaches_every_client_but_not_the_legacy_echo() -> None:
    async def body() -> tuple[int, list[str], str]:
        async with (
            running() as server,
            dial(server.url, "client_id=a") as a,
            dial(server.url, "client_id=b") as b,
            dial(server.url, "", path="/ws/legacy") as legacy,
        ):
            await hello_of(a)
            await hello_of(b)
            count = await server.broadcast({"type": "news", "timestamp": "fixed"})
            texts = [(await recv_json(ws))["type"] for ws in (a, b)]
            await legacy.send("after")
            async with asyncio.timeout(TIMEOUT):
                legacy_reply = await legacy.recv()
            assert isinstance(legacy_reply, str)
            return count, texts, legacy_reply

    assert run(body()) == (2, ["news", "news"], "Echo: after")


def test_a_client_that_stops_reading_gets_pushes_refused_then_is_dropped_with_1006() -> None:
    chunk = {"type": "bulk", "data": uuid.uuid4().hex * 16384}  # 512 KiB

    async def body() -> tuple[bool, int, bool, list[tuple[str, int | None]]]:
        codes: list[tuple[str, int | None]] = []
        slow_gone = asyncio.Event()
        async with running(
            compression=None, heartbeat_interval_ms=60_000, connection_timeout_ms=500
        ) as server:

            @server.on_disconnect
            async def gone(client: Client) -> None:
                codes.append((client.client_id, client.close_code))
                if client.client_id == "slow":
                    slow_gone.set()

            stalled = await connect(
                f"{server.url}/ws/client?client_id=slow",
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
                        sent = await server.send_to("slow", chunk) == 1
                async with dial(server.url, "client_id=fine") as fine:
                    await hello_of(fine)
                    works = await still_works(fine)
                    async with asyncio.timeout(TIMEOUT):
                        await slow_gone.wait()
                    return sent, server.refused_pushes, works, codes
            finally:
                stalled.transport.abort()

    sent, refused, works, codes = run(body())
    assert not sent
    assert refused >= 1
    assert works
    assert codes[0] == ("slow", 1006)


# ---- PROTOCOL Server 7: legacy echo and 404 ---------------------------------------------------


def test_the_legacy_route_echoes_text_without_a_hello() -> None:
    async def body() -> list[Any]:
        async with running() as server, dial(server.url, "", path="/ws/abc-123") as ws:
            replies = []
            for text in ("hello", '{"type":"ping"}'):
                await ws.send(text)
                async with asyncio.timeout(TIMEOUT):
                    replies.append(await ws.recv())
            return replies

    assert run(body()) == ["Echo: hello", 'Echo: {"type":"ping"}']


def test_the_legacy_route_closes_with_1003_on_a_binary_frame() -> None:
    async def body() -> int:
        async with running() as server, dial(server.url, "", path="/ws/abc") as ws:
            await ws.send(b"\x00\x01")
            return (await received_close(ws)).code

    assert run(body()) == 1003


def test_the_legacy_route_never_shadows_the_client_endpoint() -> None:
    async def body() -> str:
        async with running() as server, dial(server.url, "client_id=c1") as ws:
            return str((await recv_json(ws))["type"])

    assert run(body()) == "hello"


@pytest.mark.parametrize(
    "path", ["/", "/nope", "/ws", "/ws/", "/ws/a/b", "/ws/client/", "/ws/v2/connect"]
)
def test_every_other_path_gets_http_404(path: str) -> None:
    async def body() -> int:
        async with running() as server:
            with pytest.raises(InvalidStatus) as info:
                async with dial(server.url, "", path=path):
                    pass
            return info.value.response.status_code

    assert run(body()) == 404


# ---- capacity, the opening handshake, shutdown ------------------------------------------------


def test_two_hundred_clients_are_served_concurrently() -> None:
    count = 200
    connected_at_once: list[int] = []

    async def one(server: SteadyServer, all_in: asyncio.Barrier, n: int) -> str:
        async with dial(server.url, f"client_id=client-{n}") as ws:
            await hello_of(ws)
            if await all_in.wait() == 0:
                connected_at_once.append(len(server.clients))
            await ws.send('{"type":"ping"}')
            return str((await recv_type(ws, "pong"))["client_id"])

    async def body() -> list[str]:
        all_in = asyncio.Barrier(count)
        async with running() as server, asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(server, all_in, n)) for n in range(count)]
        return [t.result() for t in tasks]

    assert run(body()) == [f"client-{n}" for n in range(count)]
    assert connected_at_once == [count]


def test_a_tcp_connection_that_never_upgrades_is_dropped() -> None:
    async def body() -> bytes:
        async with running(connection_timeout_ms=200) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                async with asyncio.timeout(TIMEOUT):
                    return await reader.read()
            except ConnectionResetError:
                return b""
            finally:
                writer.close()

    assert run(body()) == b""


def test_shutdown_closes_every_client_with_1001_and_leaves_no_task_behind() -> None:
    async def body() -> tuple[list[tuple[int, str]], set[asyncio.Task[Any]], bytes]:
        before = asyncio.all_tasks()
        server = SteadyServer(port=0, environ={}, heartbeat_interval_ms=50)
        await server.start()
        clients = [await dial(server.url, f"client_id=s{n}") for n in range(3)]
        for ws in clients:
            await hello_of(ws)
        legacy = await dial(server.url, "", path="/ws/old")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        await server.close()
        frames = [await closed_with(ws) for ws in [*clients, legacy]]
        async with asyncio.timeout(TIMEOUT):
            raw = await reader.read()
        writer.close()
        await server.close()  # idempotent
        left = asyncio.all_tasks() - before
        return frames, left, raw

    frames, left, raw = run(body())
    assert frames == [(1001, "Server shutting down")] * 4
    assert left == set()
    assert raw == b""


def test_closing_a_server_that_never_started_does_nothing() -> None:
    run(SteadyServer(port=0, environ={}).close())


def test_starting_a_server_twice_is_an_error() -> None:
    async def body() -> None:
        async with running() as server:
            with pytest.raises(RuntimeError, match="twice"):
                await server.start()

    run(body())


def test_port_zero_binds_a_free_port_and_reports_it() -> None:
    async def body() -> tuple[int, str]:
        async with running() as server:
            return server.port, server.url

    port, url = run(body())
    assert port > 0
    assert url == f"ws://127.0.0.1:{port}"


def test_a_port_in_use_fails_start_with_an_os_error() -> None:
    async def body() -> None:
        async with running() as first:
            second = SteadyServer(port=first.port, environ={})
            with pytest.raises(OSError, match="address already in use"):
                await second.start()
            await second.close()

    run(body())


# ---- configuration -----------------------------------------------------------------------------


def test_explicit_arguments_win_over_the_environment() -> None:
    env = {"WS_HEARTBEAT_INTERVAL_MS": "111", "WS_CONNECTION_TIMEOUT_MS": "222"}
    server = SteadyServer(environ=env, heartbeat_interval_ms=333)
    assert server.config == ServerConfig(heartbeat_interval_ms=333, connection_timeout_ms=222)


def test_a_malformed_environment_variable_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"WS_CONNECTION_TIMEOUT_MS must be .* got '30s'"):
        SteadyServer(environ={"WS_CONNECTION_TIMEOUT_MS": "30s"})


def test_a_config_and_individual_settings_cannot_be_combined() -> None:
    with pytest.raises(TypeError, match="either config"):
        SteadyServer(config=ServerConfig(), max_message_bytes=5)


# ---- Endpoints over another transport -------------------------------------------------------


class MemoryLink:
    """A Link with no socket: what an adapter for another transport (ASGI) provides."""

    remote_address = "memory"

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.closed_with: tuple[int, str] | None = None
        self.close_record = CloseRecord()
        self._closed = asyncio.Event()

    async def receive(self) -> str | bytes | None:
        return None if self._closed.is_set() else await self.inbox.get()

    async def send(self, text: str) -> bool:
        if self._closed.is_set():
            return False
        self.outbox.put_nowait(text)
        return True

    async def close(self, code: int, reason: str) -> None:
        if self.closed_with is None:
            self.closed_with = (code, reason)
            self._closed.set()
            self.inbox.put_nowait(None)

    def abort(self) -> None:
        self.close_record.lost()
        self.closed_with = self.closed_with or (1006, "")
        self._closed.set()
        self.inbox.put_nowait(None)


def test_endpoints_drive_any_link_and_close_clients_sends_1001_to_every_one() -> None:
    wall = datetime(2025, 8, 15, 10, 0, tzinfo=UTC)

    async def next_out(link: MemoryLink) -> str:
        async with asyncio.timeout(TIMEOUT):
            return await link.outbox.get()

    async def body() -> tuple[list[str], tuple[int, str] | None, tuple[int, str] | None]:
        endpoints = Endpoints(
            environ={}, request_id_factory=lambda: "req-1", wall_clock=lambda: wall
        )
        client, legacy = MemoryLink(), MemoryLink()
        async with asyncio.TaskGroup() as group:
            group.create_task(endpoints.serve_client(client, "client_id=m1&role=test"))
            group.create_task(endpoints.serve_legacy(legacy, "old"))
            out = [await next_out(client)]
            for frame in ('{"type":"ping"}', '{"type":"chat"}', b"\x00"):
                client.inbox.put_nowait(frame)
                out.append(await next_out(client))
            legacy.inbox.put_nowait("hi")
            out.append(await next_out(legacy))
            await endpoints.close_clients()
        return out, client.closed_with, legacy.closed_with

    out, client_close, legacy_close = run(body())
    assert out == [
        '{"type":"hello","server_time":"2025-08-15T10:00:00.000Z","accepted_version":1,'
        '"features":["heartbeat","structured_messages","error_codes","graceful_reconnect"],'
        '"request_id":"req-1","client_id":"m1","heartbeat_interval_ms":25000}',
        '{"type":"pong","timestamp":"2025-08-15T10:00:00.000Z","client_id":"m1"}',
        '{"type":"echo","original_message":{"type":"chat"},'
        '"timestamp":"2025-08-15T10:00:00.000Z","client_id":"m1"}',
        '{"type":"error","error_code":"UNSUPPORTED_DATA","message":"binary frames are not '
        'supported; send JSON text frames","timestamp":"2025-08-15T10:00:00.000Z"}',
        "Echo: hi",
    ]
    assert client_close == (1001, "Server shutting down")
    assert legacy_close == (1001, "Server shutting down")


# ---- fuzzing against one running server ---------------------------------------------------------

DOCUMENTED_CLOSES = {1008, 1009, 4400, 4401, 4500}
FUZZ_LIMIT = 512

random_params = st.lists(
    st.tuples(
        st.sampled_from(["client_id", "version", "role", "extra"]),
        st.one_of(
            st.sampled_from(["1", "2", "abc", "frontend", "admin", "test", "Admin", "c-1", ""]),
            st.text(max_size=20),
        ),
    ),
    max_size=4,
)
# Half the examples get past the checks, so the frames are exercised too.
query_params = st.one_of(
    st.builds(
        lambda cid: [("client_id", cid)],
        st.from_regex(r"[a-z0-9][a-z0-9._:-]{0,10}", fullmatch=True),
    ),
    random_params,
)
json_messages = st.builds(
    lambda kind, extra: json.dumps({"type": kind, **extra}),
    st.one_of(st.sampled_from(["ping", "pong", "status", "chat", "hello", "error"]), st.text()),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=10), max_size=3),
)
frames = st.lists(
    st.one_of(
        json_messages,
        st.text(max_size=60),
        st.binary(max_size=60),
        st.just("x" * (FUZZ_LIMIT + 1)),
    ),
    max_size=6,
)


def expected_replies(frame: str | bytes) -> int:
    """How many messages the server answers a frame with (the oversize case is handled apart)."""
    if isinstance(frame, bytes):
        return 1
    try:
        return 0 if decode_text(frame)["type"] == "pong" else 1
    except ValueError:
        return 1


async def fuzz_one(server: SteadyServer, params: list[tuple[str, str]], sent: list[Any]) -> str:
    """Returns how the connection ended: ``"open"`` (still working) or ``"closed <code>"``."""
    async with dial(server.url, urlencode(params)) as ws:
        rcvd: Close | None = None
        try:
            assert (await recv_json(ws))["type"] == "hello"
            for frame in sent:
                await ws.send(frame)
                for _ in range(expected_replies(frame)):
                    reply = await recv_json(ws)
                    assert reply["type"] in {"error", "pong", "status", "echo"}
            assert await still_works(ws)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
        else:
            return "open"
    assert rcvd is not None, "closed without a close frame"
    assert rcvd.code in DOCUMENTED_CLOSES, rcvd
    return f"closed {rcvd.code}"


def test_fuzzed_queries_and_frames_never_crash_the_server(
    caplog: pytest.LogCaptureFixture, summary: Callable[[str, str], None]
) -> None:
    outcomes: list[str] = []
    with asyncio.Runner() as runner, caplog.at_level(logging.ERROR):
        server = SteadyServer(port=0, environ={}, max_message_bytes=FUZZ_LIMIT)
        runner.run(server.start())
        try:

            @settings(max_examples=50, deadline=None)
            @given(params=query_params, sent=frames)
            def probe(params: list[tuple[str, str]], sent: list[str | bytes]) -> None:
                async def bounded() -> str:
                    async with asyncio.timeout(TIMEOUT):
                        return await fuzz_one(server, params, sent)

                outcome = runner.run(bounded())
                oversize = any(len(f) > FUZZ_LIMIT for f in sent)
                if outcome == "open":
                    assert not oversize
                outcomes.append(outcome)

            probe()

            async def healthy() -> bool:
                async with dial(server.url) as ws:
                    await hello_of(ws)
                    return await still_works(ws)

            assert runner.run(healthy())
        finally:
            runner.run(server.close())
    assert "open" in outcomes
    counts = Counter(outcomes)
    summary("server fuzz", ", ".join(f"{k}: {counts[k]}" for k in sorted(counts)))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
