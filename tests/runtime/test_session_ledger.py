"""Protocol v2 sessions shared in Redis (``model/ledger.py``, ``runtime/session_ledger.py``)
through Redis faults and races, against a real ``redis-server`` and real servers in this process
(``SteadyServer`` nodes, and ``SteadyASGI`` under uvicorn), each on its own ``RedisBroker``.

Write ahead while Redis is killed or frozen; a session Redis lost is closed, never a silent gap;
v2 opens refused while Redis is unreachable (v1 served); two resumes of one session racing on two
nodes; an id handled once across a move from a SteadyServer to a SteadyASGI.
Every wait is bounded; no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.runtime.redis_broker import RedisBroker
from steadysocket.runtime.server import Client, Endpoints, SteadyServer
from tests.runtime.adapters import (
    KINDS,
    TIMEOUT,
    Kind,
    Served,
    dial,
    hello_of,
    recv_json,
    run,
    served,
)
from tests.runtime.redis_rig import (
    OUTAGE,
    broker_of,
    next_numbered,
    next_of,
    node,
    redis_server,
    resume_query,
)

STORE_UNREACHABLE = (1013, "Session store unreachable: try again")
SESSION_LOST = (1013, "Session lost by the store: resume to start again")
RESUMED_ELSEWHERE = (1000, "Session resumed elsewhere")


async def open_ws(
    stack: AsyncExitStack, url: str, query: str
) -> tuple[ClientConnection, dict[str, Any]]:
    """A connection to ``url`` with ``query``, and its hello."""
    ws = await stack.enter_async_context(dial(url, query, compression=None))
    return ws, await hello_of(ws)


async def heard_during(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """Everything ``ws`` receives in the next ``seconds`` (the length of a fault scenario)."""
    heard: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    for _ in range(1_000):
        left = end - loop.time()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left):
                heard.append(json.loads(await ws.recv()))
        except TimeoutError:
            break
    return heard


async def until_closed(
    ws: ClientConnection, bound: float = 2 * TIMEOUT
) -> tuple[list[dict[str, Any]], tuple[int, str]]:
    """What ``ws`` receives until its connection ends, and the close frame's code and reason."""
    heard: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(bound):
            for _ in range(10_000):
                heard.append(json.loads(await ws.recv()))
    except ConnectionClosed as exc:
        return heard, close_of(exc)
    except TimeoutError:
        pass
    raise AssertionError(f"still open after {heard}")


def close_of(closed: ConnectionClosed) -> tuple[int, str]:
    """The code and reason of the close frame the client received, which must be there."""
    if closed.rcvd is None:
        raise AssertionError("the connection ended without a close frame") from closed
    return closed.rcvd.code, closed.rcvd.reason


def numbered(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if "offset" in m]


async def until_restart_seen(*servers: SteadyServer) -> None:
    """Until every server's broker has noticed that Redis restarted empty (its new epoch)."""
    async with asyncio.timeout(2 * TIMEOUT):
        for _ in range(1_000):
            if all(broker_of(s).restarts_seen >= 1 for s in servers):
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the restart was not noticed")


@asynccontextmanager
async def quick_node(url: str, kind: Kind = "steady") -> AsyncIterator[Served]:
    """``kind`` on a RedisBroker whose reader has its cursor, with a 1 s connection timeout
    (what a v2 open may wait for the store)."""
    broker = RedisBroker(url)
    async with served(kind, broker=broker, connection_timeout_ms=1000) as app:
        async with asyncio.timeout(TIMEOUT):
            await broker.reading.wait()
        yield app


# ---- 1. Redis killed, or frozen, under a connected v2 client -------------------------------


def test_redis_killed_v2_messages_wait_then_the_lost_session_is_closed_never_a_gap() -> None:
    """Redis is killed for 2 s while node a broadcasts, then restarted empty. The v1 client gets
    every broadcast at once; the v2 client gets none while Redis is down (write ahead). Its
    session died with Redis's memory: it is closed with 1013 ``Session lost by the store``,
    with no numbered message before the close, and its resume is told resumed: false
    (``wrong_epoch``), on any node."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            v1, _ = await open_ws(stack, a.url, "client_id=plain")
            v2, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            for n in (1, 2, 3):
                await a.broadcast({"type": "news", "n": n})
            for n in (1, 2, 3):
                assert (await next_of(v1, "news"))["n"] == n
                message = await next_numbered(v2)
                assert (message["n"], message["offset"]) == (n, n)
            await redis.kill()
            for n in range(4, 9):
                await a.broadcast({"type": "news", "n": n})
                assert (await next_of(v1, "news"))["n"] == n  # v1: served during the outage
            assert numbered(await heard_during(v2, OUTAGE)) == []  # v2: nothing unwritten
            await redis.start()  # same port, empty
            heard, close = await until_closed(v2)
            assert numbered(heard) == [], heard
            assert close == SESSION_LOST
            await until_restart_seen(a, b)  # both nodes have the new epoch
            for target in (b, a):
                ws, again = await open_ws(stack, target.url, resume_query("s", hello, 3))
                assert (again["resumed"], again["resume_outcome"]) == (False, "wrong_epoch")
                assert again["session_id"] != hello["session_id"]
                assert again["epoch"] != hello["epoch"]
                await ws.close()

    run(body())


def test_redis_frozen_v2_messages_arrive_after_in_order_once_and_the_session_moves() -> None:
    """Redis stops answering for 2 s (SIGSTOP: data kept) while node a broadcasts: nothing
    numbered reaches the v2 client meanwhile; afterwards every broadcast arrives in order,
    offsets contiguous, each once; the session then resumes on node b with nothing lost."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            ws, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            await a.broadcast({"type": "news", "n": 1})
            assert (await next_numbered(ws))["offset"] == 1
            redis.freeze()
            try:
                for n in range(2, 12):
                    await a.broadcast({"type": "news", "n": n})
                during = await heard_during(ws, OUTAGE)
            finally:
                redis.thaw()
            assert numbered(during) == []
            got = [await next_numbered(ws) for _ in range(2, 12)]
            assert [(m["n"], m["offset"]) for m in got] == [(n, n) for n in range(2, 12)]
            await a.broadcast({"type": "news", "n": 12})  # the next one: nothing doubled
            message = await next_numbered(ws)
            assert (message["n"], message["offset"]) == (12, 12)
            await ws.close()
            moved, again = await open_ws(stack, b.url, resume_query("s", hello, 12))
            assert (again["resumed"], again["replayed"]) == (True, 0)
            assert again["session_id"] == hello["session_id"]
            await a.broadcast({"type": "news", "n": 13})
            message = await next_numbered(moved)
            assert (message["n"], message["offset"]) == (13, 13)

    run(body())


# ---- 2. v2 opens refused while Redis is unreachable, v1 served -----------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_v2_opens_are_refused_while_redis_is_killed_and_v1_is_served(kind: Kind) -> None:
    """Redis killed: a new v2 connection, and the resume of a session opened before, get 1013
    ``Session store unreachable: try again`` (the new one once its session could not be stored
    within the connection timeout); a v1 client is served. Redis back: v2 opens again."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            quick_node(redis.url, kind) as app,
            AsyncExitStack() as stack,
        ):
            first, hello = await open_ws(stack, app.url, "client_id=old&version=2")
            assert hello["accepted_version"] == 2
            await first.close()
            await redis.kill()
            for query in ("client_id=new&version=2", resume_query("old", hello, 0)):
                async with dial(app.url, query) as ws:
                    assert await until_closed(ws) == ([], STORE_UNREACHABLE), query
            plain, v1_hello = await open_ws(stack, app.url, "client_id=plain")
            assert v1_hello["accepted_version"] == 1
            await plain.send(json.dumps({"type": "echo", "n": 1}))
            assert (await next_of(plain, "echo"))["original_message"]["n"] == 1
            await redis.start()  # empty: the old session is gone with it
            again: dict[str, Any] | None = None
            for _ in range(50):  # as a client's backoff: refused until the store answers
                async with dial(app.url, "client_id=new&version=2") as ws:
                    with contextlib.suppress(ConnectionClosed):  # refused: 1013 again
                        again = await recv_json(ws)
                        break
                await asyncio.sleep(0.1)
            assert again is not None
            assert again["type"] == "hello"
            assert (again["accepted_version"], again["resumed"]) == (2, False)

    run(body())


def test_v2_opens_are_refused_while_redis_is_frozen_and_the_session_resumes_after() -> None:
    """Redis frozen: the resume on node b of a session last served by node a, and a new v2
    connection, are refused with 1013 once the connection timeout is spent; v1 is served.
    After the thaw the session resumes on b, and what a broadcast during the freeze arrives
    once, at the next offset."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            quick_node(redis.url) as a,
            quick_node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            ws, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            await a.app.broadcast({"type": "news", "n": 1})
            assert (await next_numbered(ws))["offset"] == 1
            await ws.close()
            redis.freeze()
            try:
                await a.app.broadcast({"type": "news", "n": 2})
                for query in (resume_query("s", hello, 1), "client_id=new&version=2"):
                    async with dial(b.url, query) as refused:
                        assert await until_closed(refused) == ([], STORE_UNREACHABLE), query
                plain, _ = await open_ws(stack, b.url, "client_id=plain")
                await plain.send(json.dumps({"type": "echo", "n": 1}))
                assert (await next_of(plain, "echo"))["original_message"]["n"] == 1
            finally:
                redis.thaw()
            moved, again = await open_ws(stack, b.url, resume_query("s", hello, 1))
            assert (again["resumed"], again["session_id"]) == (True, hello["session_id"])
            message = await next_numbered(moved)  # replayed, or caught up from the stream
            assert (message["n"], message["offset"]) == (2, 2)
            await a.app.broadcast({"type": "news", "n": 3})  # the next one: nothing doubled
            message = await next_numbered(moved)
            assert (message["n"], message["offset"]) == (3, 3)

    run(body())


# ---- 3. Two resumes of one session racing on two nodes -------------------------------------


def test_two_concurrent_resumes_on_two_nodes_one_connection_carries_the_session() -> None:
    """A session opened on a is resumed at the same moment on b and on c. Exactly one of the
    two connections ends up carrying it: the other is closed with ``Session resumed
    elsewhere`` (whatever it got before is what the survivor got at the same offsets); the
    survivor receives every later broadcast once, offsets contiguous; only its node holds the
    session, which resumes whole on a afterwards."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url) as a,
            node(redis.url) as b,
            node(redis.url) as c,
            AsyncExitStack() as stack,
        ):
            first, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            await a.broadcast({"type": "news", "n": 1})
            assert (await next_numbered(first))["offset"] == 1
            await first.close()
            query = resume_query("s", hello, 1)
            opened = await asyncio.gather(
                open_ws(stack, b.url, query), open_ws(stack, c.url, query)
            )
            for _, again in opened:
                assert again["session_id"] == hello["session_id"]
                assert again["resumed"] is True, again
            for n in range(2, 7):
                await a.broadcast({"type": "news", "n": n})

            async def watch(ws: ClientConnection) -> tuple[list[dict[str, Any]], Any]:
                """Its numbered messages until the five broadcasts arrived, or it closed."""
                got: list[dict[str, Any]] = []
                try:
                    async with asyncio.timeout(2 * TIMEOUT):
                        while len(got) < 5:
                            got.append(await next_numbered(ws))
                except ConnectionClosed as exc:
                    return got, close_of(exc)
                return got, None

            watched = await asyncio.gather(*(watch(ws) for ws, _ in opened))
            closes = [close for _, close in watched]
            assert closes.count(None) == 1, closes
            survivor = closes.index(None)
            assert closes[1 - survivor] == RESUMED_ELSEWHERE
            kept, lost = watched[survivor][0], watched[1 - survivor][0]
            assert [(m["n"], m["offset"]) for m in kept] == [(n, n) for n in range(2, 7)]
            assert lost == kept[: len(lost)]  # never a history of its own
            holders = [s for s in (b, c) if hello["session_id"] in s.sessions.sessions]
            assert holders == [(b, c)[survivor]]
            ws = opened[survivor][0]
            await a.broadcast({"type": "news", "n": 7})  # the next one: nothing doubled
            message = await next_numbered(ws)
            assert (message["n"], message["offset"]) == (7, 7)
            await ws.close()
            back, third = await open_ws(stack, a.url, resume_query("s", hello, 5))
            assert (third["resumed"], third["replayed"]) == (True, 2)
            replay = [await next_numbered(back) for _ in range(2)]
            assert [(m["n"], m["offset"]) for m in replay] == [(6, 6), (7, 7)]

    run(body())


# ---- 4. An id handled once across a move (SteadyServer to SteadyASGI) ----------------------


def test_an_id_handled_on_one_node_is_a_duplicate_after_the_move_to_another() -> None:
    """Id 1 is handled on node a (SteadyServer) and acknowledged; the client moves to node b
    (SteadyASGI under uvicorn), gets the reply replayed, and re-sends id 1: it is acknowledged
    as a duplicate and not handled again; id 2 is handled on b, once."""

    handled: list[tuple[str, int]] = []

    def count_on(server: Endpoints, name: str) -> None:
        async def count(message: dict[str, Any], client: Client) -> int:
            handled.append((name, message["n"]))
            return int(message["n"]) * 10

        server.on_message("count")(count)

    async def exchange(ws: ClientConnection, msg_id: int, n: int) -> list[dict[str, Any]]:
        """Send ``count`` with ``msg_id``; what arrives up to its ack (pings aside)."""
        await ws.send(json.dumps({"id": msg_id, "type": "count", "n": n}))
        got: list[dict[str, Any]] = []
        for _ in range(10):
            message = await next_of(ws, "ack", "reply")
            got.append(message)
            if message["type"] == "ack":
                return got
        raise AssertionError(f"no ack: {got}")

    async def body() -> None:
        async with redis_server() as redis, node(redis.url) as a, AsyncExitStack() as stack:
            broker = RedisBroker(redis.url)
            b = await stack.enter_async_context(served("asgi", broker=broker))
            async with asyncio.timeout(TIMEOUT):
                await broker.reading.wait()
            count_on(a, "a")
            count_on(b.app, "b")
            ws, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            got = await exchange(ws, 1, 1)
            assert [(m["type"], m.get("offset"), m.get("result")) for m in got[:-1]] == [
                ("reply", 1, 10)
            ]
            assert got[-1]["id"] == 1
            assert handled == [("a", 1)]
            await ws.close()
            moved, again = await open_ws(stack, b.url, resume_query("s", hello, 0))
            assert (again["resumed"], again["replayed"]) == (True, 1)
            replay = await next_numbered(moved)
            assert (replay["offset"], replay["type"], replay["result"]) == (1, "reply", 10)
            assert [(m["type"], m["id"]) for m in await exchange(moved, 1, 1)] == [("ack", 1)]
            got = await exchange(moved, 2, 2)
            assert [(m["type"], m.get("offset"), m.get("result")) for m in got[:-1]] == [
                ("reply", 2, 20)
            ]
            assert got[-1]["id"] == 2
            assert handled == [("a", 1), ("b", 2)]

    run(body())


# ---- regressions: each failed before its fix (found by an adversarial review) ---------------


def test_a_resume_after_the_stream_was_trimmed_past_the_session_is_refused_trimmed() -> None:
    """The session's process stops; 300 broadcasts overflow a 10-entry stream. A resume on
    another process cannot catch up, so it is refused (``trimmed``), never a silent gap."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url, stream_maxlen=10) as b,
            AsyncExitStack() as stack,
        ):
            async with node(redis.url, stream_maxlen=10) as a:
                ws, hello = await open_ws(stack, a.url, "client_id=s&version=2")
                await b.broadcast({"type": "news", "n": 1})
                assert (await next_numbered(ws))["offset"] == 1
            for n in range(2, 302):
                await b.broadcast({"type": "news", "n": n})
            await broker_of(b).wait_flushed()
            assert await broker_of(b)._cmd("XLEN", "steadysocket:fanout") < 300  # trimmed
            _, again = await open_ws(stack, b.url, resume_query("s", hello, 1))
            assert (again["resumed"], again["resume_outcome"]) == (False, "trimmed")

    run(body())


def test_a_superseded_session_cannot_be_resumed_and_the_fresh_one_is_not_orphaned() -> None:
    """As in one process: once the client opened a fresh session, its older one is unknown.
    One session per client id in the cluster: the session that answer opens is the client's
    newest, and the connection of the one before is closed (never left silent)."""

    async def body() -> None:
        async with redis_server() as redis, node(redis.url) as a, AsyncExitStack() as stack:
            old, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            await old.close()
            await asyncio.sleep(0.3)  # let a write the disconnect (the record stays claimable)
            fresh, _ = await open_ws(stack, a.url, "client_id=s&version=2")
            newest, again = await open_ws(stack, a.url, resume_query("s", hello, 0))
            assert (again["resumed"], again["resume_outcome"]) == (False, "unknown_session")
            await a.broadcast({"type": "news", "n": 1})
            assert (await next_numbered(newest))["n"] == 1
            heard, close = await until_closed(fresh)
            assert close == RESUMED_ELSEWHERE
            assert numbered(heard) == []

    run(body())


def test_a_session_made_just_after_redis_restarted_empty_has_the_new_epoch() -> None:
    """Redis restarts empty while the process's reader sleeps in its backoff: the session's
    next write finds the new generation, so the resume is told ``wrong_epoch`` and the new
    session (under the new epoch) resumes later."""
    made: list[BackoffStrategy] = []

    def slow() -> BackoffStrategy:
        """The reader's strategy (the broker's first) waits 2 s; every other task's 50 ms."""
        delay = 2000 if not made else 50
        made.append(BackoffStrategy(base_delays_ms=(delay,), jitter_ratio=0.0, max_attempts=99))
        return made[-1]

    async def body() -> None:
        async with (
            redis_server() as redis,
            node(redis.url, backoff=slow) as a,
            AsyncExitStack() as stack,
        ):
            ws, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            await redis.kill()
            await asyncio.sleep(0.3)
            await redis.start()  # empty; a's reader is asleep in its backoff
            await ws.send(json.dumps({"id": 1, "type": "x"}))
            assert (await until_closed(ws))[1] == SESSION_LOST
            again = await served_hello(stack, a.url, resume_query("s", hello, 0))
            await until_restart_seen(a)
            third = await served_hello(stack, a.url, resume_query("s", again, 0))
            assert (again["resume_outcome"], third["resume_outcome"]) == (
                "wrong_epoch",
                "resumed",
            )

    run(body())


async def served_hello(stack: AsyncExitStack, url: str, query: str) -> dict[str, Any]:
    """The hello of the first attempt not refused with 1013 (as a client retries)."""
    for _ in range(20):
        ws = await stack.enter_async_context(dial(url, query))
        try:
            reply = json.loads(await ws.recv())
        except ConnectionClosed:
            await asyncio.sleep(0.05)
            continue
        if reply["type"] == "hello":
            return dict(reply)
    raise AssertionError("refused 20 times")


def test_a_resume_refused_while_redis_was_frozen_takes_nothing_over() -> None:
    """A claim sent while Redis is frozen and refused at the connection timeout must not take
    the session over when Redis thaws and runs it late."""

    async def body() -> None:
        async with (
            redis_server() as redis,
            quick_node(redis.url) as a,
            quick_node(redis.url) as b,
            AsyncExitStack() as stack,
        ):
            other, other_hello = await open_ws(stack, a.url, "client_id=o&version=2")
            await other.close()  # an ordinary move first: the claim script is in Redis
            _, moved = await open_ws(stack, b.url, resume_query("o", other_hello, 0))
            assert moved["resumed"] is True
            ws, hello = await open_ws(stack, a.url, "client_id=s&version=2")
            redis.freeze()
            try:
                async with dial(b.url, resume_query("s", hello, 0)) as refused:
                    assert await until_closed(refused) == ([], STORE_UNREACHABLE)
            finally:
                redis.thaw()
            await a.app.broadcast({"type": "news", "n": 1})
            message = await next_numbered(ws)
            assert (message["n"], message["offset"]) == (1, 1)

    run(body())
