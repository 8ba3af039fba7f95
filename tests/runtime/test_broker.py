"""Rooms, publish, presence and the client count on the default MemoryBroker, for SteadyServer
and SteadyASGI alike (one process: the broker adds nothing to what the server did before)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from steadysocket.model.routing import Target
from steadysocket.runtime.broker import BrokerOverflow, BrokerUnavailable, MemoryBroker
from steadysocket.runtime.server import Client, Endpoints
from tests.runtime.adapters import KINDS, TIMEOUT, Kind, dial, recv_type, run, served


def with_room_handlers(app: Endpoints) -> asyncio.Queue[str]:
    """``join``/``leave`` messages put their client in or out of ``room``; answered ``done``.
    Returns a queue of the client ids whose connection ended (``on_disconnect`` has run)."""
    ended: asyncio.Queue[str] = asyncio.Queue()

    async def gone(client: Client) -> None:
        ended.put_nowait(client.client_id)

    async def join(message: dict[str, Any], client: Client) -> None:
        await client.join(message["room"])
        await client.send({"type": "done", "rooms": sorted(client.rooms)})

    async def leave(message: dict[str, Any], client: Client) -> None:
        await client.leave(message["room"])
        await client.send({"type": "done", "rooms": sorted(client.rooms)})

    app.on_message("join")(join)
    app.on_message("leave")(leave)
    app.on_disconnect(gone)
    return ended


async def ask(ws: Any, kind: str, room: str) -> list[str]:
    await ws.send(json.dumps({"type": kind, "room": room}))
    rooms: list[str] = (await recv_type(ws, "done"))["rooms"]
    return rooms


@pytest.mark.parametrize("kind", KINDS)
def test_a_room_publication_reaches_its_members_only_and_presence_lists_them(kind: Kind) -> None:
    async def body() -> None:
        async with served(kind) as srv:
            app = srv.app
            ended = with_room_handlers(app)
            assert isinstance(app.broker, MemoryBroker)
            assert app.broker.node_id == "local"
            async with dial(srv.url, "client_id=a") as a, dial(srv.url, "client_id=b") as b:
                await recv_type(a, "hello")
                await recv_type(b, "hello")
                assert await ask(a, "join", "lobby") == ["lobby"]
                assert await ask(a, "join", "lobby") == ["lobby"]  # twice is once
                assert await ask(b, "join", "other") == ["other"]
                assert await app.presence("lobby") == {"a"}
                assert await app.presence("nobody") == frozenset()
                assert await app.client_count() == 2
                assert app.local_client_count == 2
                assert await app.publish("lobby", {"type": "news", "n": 1}) == 1
                assert await app.publish("other", {"type": "news", "n": 2}) == 1
                assert (await recv_type(a, "news"))["n"] == 1
                assert (await recv_type(b, "news"))["n"] == 2
                assert await ask(a, "leave", "lobby") == []
                assert await app.presence("lobby") == frozenset()
                assert await app.publish("lobby", {"type": "news", "n": 3}) == 0
                # b's last connection ends: it leaves its rooms in this process.
                await b.close()
                async with asyncio.timeout(TIMEOUT):
                    assert await ended.get() == "b"
                assert app.rooms.rooms_of("b") == frozenset()
                assert await app.presence("other") == frozenset()

    run(body())


@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_and_send_to_are_unchanged_with_the_default_broker(kind: Kind) -> None:
    async def body() -> None:
        async with (
            served(kind) as srv,
            dial(srv.url, "client_id=a") as a,
            dial(srv.url, "client_id=b") as b,
        ):
            await recv_type(a, "hello")
            await recv_type(b, "hello")
            assert await srv.app.broadcast({"type": "all"}) == 2
            assert await srv.app.send_to("b", {"type": "one"}) == 1
            assert await srv.app.send_to("nobody", {"type": "one"}) == 0
            await recv_type(a, "all")
            await recv_type(b, "all")
            await recv_type(b, "one")

    run(body())


def test_a_v2_member_stays_in_its_room_while_its_session_is_resumable() -> None:
    async def body() -> None:
        async with served("steady") as srv:
            app = srv.app
            ended = with_room_handlers(app)
            async with dial(srv.url, "client_id=v&version=2") as ws:
                hello = await recv_type(ws, "hello")
                await ws.send(json.dumps({"id": 1, "type": "join", "room": "r"}))
                await recv_type(ws, "done")
            async with asyncio.timeout(TIMEOUT):
                assert await ended.get() == "v"
            assert await app.presence("r") == {"v"}
            # Published while v is away: kept in its session and replayed on resume.
            assert await app.publish("r", {"type": "news"}) == 1
            query = (
                f"client_id=v&version=2&session_id={hello['session_id']}"
                f"&epoch={hello['epoch']}&offset=1"
            )
            async with dial(srv.url, query) as ws:
                again = await recv_type(ws, "hello")
                assert again["resumed"] is True
                news = await recv_type(ws, "news")
                assert news["offset"] == 2

    run(body())


def test_a_bad_room_name_is_refused() -> None:
    async def body() -> None:
        async with served("steady") as srv:
            with pytest.raises(ValueError, match="1 to 256 bytes"):
                await srv.app.publish("", {"type": "x"})
            with pytest.raises(ValueError, match="1 to 256 bytes"):
                await srv.app.presence("x" * 257)

    run(body())


def test_a_memory_broker_before_start_knows_no_one_and_overflow_is_unavailability() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        assert await broker.presence("r") == frozenset()
        assert await broker.client_count() == 0
        await broker.publish(Target.ALL, "", "{}")
        await broker.close()
        error = BrokerOverflow(7)
        assert isinstance(error, BrokerUnavailable)
        assert isinstance(error, ConnectionError)
        assert error.limit == 7
        assert "7 publications" in str(error)

    run(body())


def test_redis_broker_without_redis_py_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from steadysocket.runtime.redis_broker import RedisBroker

    # None in sys.modules makes "import redis..." raise ImportError, as if it were absent.
    for name in ("redis", "redis.asyncio", "redis.asyncio.retry", "redis.backoff"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'steadysocket\[redis\]'"):
        RedisBroker("redis://127.0.0.1:1")
