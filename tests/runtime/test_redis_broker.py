"""RedisBroker against a real redis-server: several servers (nodes) in one test process, each
with its own broker, as several processes would be. Cross-node broadcast, send_to, rooms,
presence and the client count; Redis faults and their documented outcomes."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from steadysocket.model.routing import PresencePolicy, Publication, Target
from steadysocket.runtime.broker import BrokerOverflow, BrokerUnavailable
from steadysocket.runtime.redis_broker import RedisBroker
from steadysocket.runtime.server import SteadyServer
from tests.runtime.adapters import dial, recv_type, run
from tests.runtime.redis_rig import OUTAGE, broker_of, node, redis_server


async def connect_all(
    stack: AsyncExitStack, server: SteadyServer, ids: list[str]
) -> list[ClientConnection]:
    sockets = [await stack.enter_async_context(dial(server.url, f"client_id={i}")) for i in ids]
    for ws in sockets:
        await recv_type(ws, "hello")
    return sockets


async def next_app(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a ping."""
    return await recv_type(ws, "news")


def test_broadcast_send_to_and_rooms_cross_nodes_exactly_once() -> None:
    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            (a1, a2) = await connect_all(stack, a, ["a1", "a2"])
            (b1,) = await connect_all(stack, b, ["b1"])
            # broadcast from either node reaches every client once, in order per publisher
            assert await a.broadcast({"type": "news", "n": 1}) == 2  # this node's count
            assert await b.broadcast({"type": "news", "n": 2}) == 1
            for ws in (a1, a2, b1):
                got = sorted([(await next_app(ws))["n"], (await next_app(ws))["n"]])
                assert got == [1, 2]
            # send_to reaches a client on the other node
            assert await a.send_to("b1", {"type": "news", "n": 3}) == 0
            assert (await next_app(b1))["n"] == 3
            # rooms and presence across nodes
            await a1.send(json.dumps({"type": "join", "room": "r"}))
            await b1.send(json.dumps({"type": "join", "room": "r"}))
            await recv_type(a1, "done")
            await recv_type(b1, "done")
            assert await a.presence("r") == {"a1", "b1"}
            assert await b.presence("r") == {"a1", "b1"}
            assert await b.publish("r", {"type": "news", "n": 4}) == 1
            assert (await next_app(a1))["n"] == 4
            assert (await next_app(b1))["n"] == 4
            # each node announces its own count before it reads the others'
            assert await b.client_count() == 3
            assert await a.client_count() == 3
            # a2 got nothing but the broadcasts: the next thing it sees is this one
            await a.send_to("a2", {"type": "news", "n": 5})
            assert (await next_app(a2))["n"] == 5
            await broker_of(a).wait_flushed()
            await broker_of(b).wait_flushed()
            assert broker_of(a).published == 3  # its broadcast and two send_to
            assert broker_of(b).published == 2  # its broadcast and the room's publication
            assert broker_of(a).delivered == 2  # b's two, each once

    run(body())


def test_a_closed_node_withdraws_its_presence_and_a_silent_one_expires() -> None:
    async def body() -> None:
        clock = [1_000_000.0]
        # A renewal period far beyond the test's length: no renewal races the clock's moves.
        policy = PresencePolicy(ttl_ms=100_000, refresh_ms=50_000)
        async with (
            redis_server() as redis,
            node(redis.url, presence=policy, wall_ms=lambda: clock[0]) as a,
        ):
            async with (
                node(redis.url, presence=policy, wall_ms=lambda: clock[0]) as b,
                dial(b.url, "client_id=x") as x,
            ):
                await recv_type(x, "hello")
                await x.send(json.dumps({"type": "join", "room": "r"}))
                await recv_type(x, "done")
                assert await a.presence("r") == {"x"}
                assert await b.client_count() == 1
                assert await a.client_count() == 1
                # b stops renewing (a process frozen or killed): its entries expire
                clock[0] += 100_000
                assert await a.presence("r") == frozenset()
                clock[0] -= 100_000
                assert await a.presence("r") == {"x"}
            # b closed: it withdrew its members and its count
            assert await a.presence("r") == frozenset()
            assert await a.client_count() == 0

    run(body())


def test_redis_down_local_clients_served_publications_buffered_then_delivered() -> None:
    """Redis is killed for 2 s during a stream of broadcasts from node a and restarted empty.

    Documented outcome: a's own clients get every broadcast at once; the broadcasts for node b
    wait in a's bounded queue and are delivered after the restart, in order, exactly once;
    both nodes notice that Redis restarted empty."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            (local,) = await connect_all(stack, a, ["local"])
            (remote,) = await connect_all(stack, b, ["remote"])
            for n in range(1, 21):
                await a.broadcast({"type": "news", "n": n})
            for n in range(1, 21):
                assert (await next_app(local))["n"] == n
                assert (await next_app(remote))["n"] == n
            await redis.kill()
            for n in range(21, 41):
                await a.broadcast({"type": "news", "n": n})
                assert (await next_app(local))["n"] == n  # served during the outage
            with pytest.raises(BrokerUnavailable):
                await a.presence("r")
            assert broker_of(a).buffered > 0
            await asyncio.sleep(OUTAGE)
            await redis.start()  # same port, empty
            for n in range(21, 41):
                assert (await next_app(remote))["n"] == n
            await broker_of(a).wait_flushed()
            assert broker_of(a).restarts_seen + broker_of(b).restarts_seen >= 1
            assert broker_of(a).failures > 0
            # nothing more arrives: a marker sent now is the next message
            await a.broadcast({"type": "news", "n": 99})
            assert (await next_app(remote))["n"] == 99
            assert (await next_app(local))["n"] == 99

    run(body())


def test_redis_frozen_2_s_local_clients_served_publications_delivered_after() -> None:
    """Redis stops answering for 2 s (SIGSTOP: connections open, data kept) during a stream of
    broadcasts from node a: a's clients are served throughout; b's get every broadcast once,
    in order, after Redis answers again; nothing is seen as a restart."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            (local,) = await connect_all(stack, a, ["local"])
            (remote,) = await connect_all(stack, b, ["remote"])
            await a.broadcast({"type": "news", "n": 0})
            assert (await next_app(local))["n"] == 0
            assert (await next_app(remote))["n"] == 0
            redis.freeze()
            try:
                for n in range(1, 31):
                    await a.broadcast({"type": "news", "n": n})
                    assert (await next_app(local))["n"] == n  # served while Redis is frozen
                await asyncio.sleep(OUTAGE)
            finally:
                redis.thaw()
            for n in range(1, 31):
                assert (await next_app(remote))["n"] == n
            await broker_of(a).wait_flushed()
            assert broker_of(a).restarts_seen == broker_of(b).restarts_seen == 0

    run(body())


def test_a_publication_beyond_the_outage_queue_is_raised_to_the_publisher() -> None:
    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url, outgoing_limit=5) as a,
            AsyncExitStack() as stack,
        ):
            (local,) = await connect_all(stack, a, ["local"])
            await redis.kill()
            for n in range(5):
                await a.broadcast({"type": "news", "n": n})
            with pytest.raises(BrokerOverflow) as raised:
                await a.broadcast({"type": "news", "n": 5})
            assert raised.value.limit == 5
            with pytest.raises(BrokerOverflow):
                await a.publish("r", {"type": "news", "n": 6})
            with pytest.raises(BrokerOverflow):
                await a.send_to("local", {"type": "news", "n": 7})
            # the local client got all of them anyway (delivered before the broker refused)
            for n in range(6):
                assert (await next_app(local))["n"] == n
            assert (await next_app(local))["n"] == 7  # not in room r: 6 reached no one here

    run(body())


def test_a_broker_that_never_reached_redis_closes_promptly() -> None:
    async def body() -> None:
        async with redis_server() as redis:
            url = redis.url
        broker = RedisBroker(url)  # nothing listens there any more
        async with SteadyServer("127.0.0.1", 0, broker=broker, environ={}) as server:
            await server.broadcast({"type": "news"})
            with pytest.raises(BrokerUnavailable):
                await server.client_count()
            with pytest.raises(RuntimeError, match="twice"):
                await broker.start(server)
        assert not broker.reading.is_set()
        assert broker.buffered == 1  # dropped with the broker: it never reached Redis

    run(body())


def test_malformed_stream_entries_are_skipped() -> None:
    async def body() -> None:
        async with redis_server() as redis, node(redis.url) as a, AsyncExitStack() as stack:
            (ws,) = await connect_all(stack, a, ["c"])
            other = RedisBroker(redis.url)
            await other._cmd("XADD", "steadysocket:fanout", "*", "target", "nonsense")
            await other._cmd(
                "XADD",
                "steadysocket:fanout",
                "*",
                *[x for kv in _fields(Target.ALL, '{"type":"news","n":1}') for x in kv],
            )
            assert (await next_app(ws))["n"] == 1
            await other._redis.aclose()

    run(body())


def _fields(target: Target, text: str) -> list[tuple[str, str]]:
    return [
        ("target", target.value),
        ("key", ""),
        ("text", text),
        ("origin", "elsewhere"),
        ("seq", "1"),
    ]


def test_a_delivery_that_raises_is_logged_and_the_next_publications_still_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            (ws,) = await connect_all(stack, b, ["c"])
            original = b.deliver
            calls = 0

            def flaky(publication: Publication, entry_id: str, *, own: bool) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("a bug in delivery")
                original(publication, entry_id, own=own)

            b.deliver = flaky  # type: ignore[method-assign]
            await a.broadcast({"type": "news", "n": 1})
            await a.broadcast({"type": "news", "n": 2})
            assert (await next_app(ws))["n"] == 2

    run(body())
    assert "delivering publication" in caplog.text


def test_a_retried_publication_write_lands_in_the_stream_once() -> None:
    """The writer's append is idempotent by the publisher's seq: a batch retried after a lost
    reply (which had landed) adds nothing, so readers and a moved v2 session's catch-up see each
    publication once; the next seq is appended."""

    async def body() -> None:
        async with redis_server() as redis:
            broker = RedisBroker(redis.url)
            keys = ["steadysocket:fanout", f"steadysocket:seq:{broker.node_id}"]
            fields = [x for kv in _fields(Target.ALL, '{"type":"news","n":1}') for x in kv]
            try:
                for seq in (1, 1, 2, 1):  # the first write, its retry, the next, a late retry
                    await broker._append(keys=keys, args=[seq, 100, 60_000, *fields])
                assert await broker._cmd("XLEN", "steadysocket:fanout") == 2
            finally:
                await broker._redis.aclose()

    run(body())
