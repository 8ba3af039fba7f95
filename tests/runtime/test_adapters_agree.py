"""SteadyServer and SteadyASGI (under a real uvicorn) given the same inputs give the same answers.

Each test runs once per adapter (``kind``) and compares against one expected answer, so the two
adapters agree with each other and with the README. Covers issue 16: bounded shutdown (1),
memory per connection (2), push that never waits on a peer (3), the rate limit's metering (4),
prompt closes from outside (5), hooks that do not starve the heartbeat (6), and one answer per
input (7). Time bounds are generous correctness bounds (``close()`` ends within its documented
bound plus a margin), never speed targets; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from steadysocket.runtime.asgi import Message, SteadyASGI
from steadysocket.runtime.server import Client, Endpoints
from tests.runtime.adapters import (
    KINDS,
    MS,
    TIMEOUT,
    Kind,
    close_frame,
    dial,
    http_get,
    recv_json,
    recv_type,
    run,
    served,
    stop_reading,
)

FORCE_MARGIN = 1.0 + 1.0
"""close() is documented to end within the close timeout plus 1 s (two forced steps of 0.5 s);
the second second is slack for a loaded CI machine."""


def code_of(frame: Close | None) -> int | None:
    return None if frame is None else frame.code


async def hello_of(ws: ClientConnection) -> dict[str, Any]:
    hello = await recv_json(ws)
    assert hello["type"] == "hello"
    return hello


class Seen(list[tuple[str, int | None]]):
    """What ``on_disconnect`` saw: (client_id, close_code) per call."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    async def wait_for(self, count: int = 1) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self) < count:
                self.changed.clear()
                await self.changed.wait()


def disconnect_log(app: Endpoints) -> Seen:
    """Register an on_disconnect hook recording (client_id, close_code); return the record."""
    seen = Seen()

    @app.on_disconnect
    async def record(client: Client) -> None:
        seen.append((client.client_id, client.close_code))
        seen.changed.set()

    return seen


# ---- 1. Shutdown is bounded ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stuck", ["handler", "on_connect", "on_disconnect"])
def test_close_returns_within_the_close_timeout_while_a_hook_or_handler_hangs(
    kind: Kind, stuck: str
) -> None:
    async def body() -> tuple[float, float, list[tuple[str, int | None]], int, str]:
        forever = asyncio.Event()
        started = asyncio.Event()
        async with served(kind, connection_timeout_ms=800) as srv:
            app = srv.app
            calls: list[tuple[str, int | None]] = []

            @app.on_message("work")
            async def work(message: dict[str, Any], client: Client) -> None:
                if stuck == "handler":
                    started.set()
                    await forever.wait()

            @app.on_connect
            async def joined(client: Client) -> None:
                if stuck == "on_connect":
                    started.set()
                    await forever.wait()

            @app.on_disconnect
            async def left(client: Client) -> None:
                calls.append((client.client_id, client.close_code))
                if stuck == "on_disconnect":
                    started.set()
                    await forever.wait()

            async with dial(srv.url, "client_id=stuck") as ws:
                await hello_of(ws)
                await ws.send('{"type":"work"}')
                if stuck == "on_disconnect":
                    await ws.close()
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
                loop = asyncio.get_running_loop()
                began = loop.time()
                await srv.close()
                took = loop.time() - began
                frame = await close_frame(ws)
            code = "none" if frame is None else str(frame.code)
            return took, app.config.close_timeout, calls, len(app.clients), code

    took, close_timeout, calls, left, code = run(body())
    assert took < close_timeout + FORCE_MARGIN
    assert calls == [("stuck", 1000 if stuck == "on_disconnect" else 1001)]
    assert left == 0
    assert code == ("1000" if stuck == "on_disconnect" else "1001")


@pytest.mark.parametrize("kind", KINDS)
def test_close_returns_within_its_bound_when_a_peer_never_answers_the_close(kind: Kind) -> None:
    async def body() -> tuple[float, float, list[tuple[str, int | None]]]:
        async with served(kind, connection_timeout_ms=800) as srv:
            seen = disconnect_log(srv.app)
            async with dial(srv.url, "client_id=deaf") as ws:
                await hello_of(ws)
                stop_reading(ws)
                loop = asyncio.get_running_loop()
                began = loop.time()
                await srv.close()
                took = loop.time() - began
                ws.transport.abort()
            return took, srv.app.config.close_timeout, seen

    took, close_timeout, seen = run(body())
    assert took < close_timeout + FORCE_MARGIN
    assert seen == [("deaf", 1001)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_handler_that_calls_close_returns_normally_and_every_client_gets_1001(
    kind: Kind,
) -> None:
    async def body() -> tuple[list[str], list[int | None], list[tuple[str, int | None]]]:
        outcome: list[str] = []
        async with served(kind, connection_timeout_ms=2000) as srv:
            seen = disconnect_log(srv.app)

            @srv.app.on_message("stop")
            async def stop(message: dict[str, Any], client: Client) -> None:
                try:
                    await srv.close()
                except BaseException as exc:
                    outcome.append(type(exc).__name__)
                    raise
                outcome.append("returned")

            async with (
                dial(srv.url, "client_id=boss") as boss,
                dial(srv.url, "client_id=other") as other,
            ):
                await hello_of(boss)
                await hello_of(other)
                await boss.send('{"type":"stop"}')
                frames = [await close_frame(boss), await close_frame(other)]
            await srv.close()  # from outside too: idempotent, bounded
            codes = [None if f is None else f.code for f in frames]
            return outcome, codes, sorted(seen)

    outcome, codes, seen = run(body())
    assert outcome == ["returned"]
    assert codes == [1001, 1001]
    assert seen == [("boss", 1001), ("other", 1001)]


# ---- 2. Memory per connection is bounded ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pushes_to_a_client_that_stops_reading_stay_within_the_outbox_bound(kind: Kind) -> None:
    chunk = {"type": "bulk", "data": "x" * 65_000}
    limit = 256 * 1024

    async def body() -> tuple[int, int, int, int]:
        async with served(
            kind,
            max_outbox_bytes=limit,
            heartbeat_interval_ms=60_000,
            connection_timeout_ms=3000,
            compression=None,
        ) as srv:
            async with dial(srv.url, "client_id=hog", compression=None, max_size=None) as hog:
                await hello_of(hog)
                stop_reading(hog)
                (client,) = srv.app.clients
                peak = accepted = 0
                for _ in range(400):  # 26 MB offered, every 5 ms
                    accepted += await srv.app.send_to("hog", chunk)
                    peak = max(peak, client._conn.outbox.queued_bytes)
                    await asyncio.sleep(5 * MS)
                refused = srv.app.refused_pushes
                hog.transport.abort()
            return peak, accepted, refused, len(json.dumps(chunk)) + 64

    peak, accepted, refused, one = run(body())
    assert peak <= limit + one
    assert refused > 0
    assert accepted + refused <= 400


# ---- 3. One slow or half-open peer never holds up a push -----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_broadcast_send_to_and_the_chat_sender_never_wait_on_a_stalled_or_closing_peer(
    kind: Kind,
) -> None:
    async def body() -> tuple[float, list[int], int, int]:
        async with served(kind, heartbeat_interval_ms=60_000, connection_timeout_ms=4000) as srv:
            app = srv.app

            @app.on_message("chat")
            async def chat(message: dict[str, Any], client: Client) -> None:
                await client.send({"type": "chat_ack"})
                await app.broadcast({"type": "chat", "text": message.get("text")})

            stalled = await dial(srv.url, "client_id=stalled").__aenter__()
            closing = await dial(srv.url, "client_id=closing").__aenter__()
            try:
                await hello_of(stalled)
                await hello_of(closing)
                stop_reading(stalled)
                stop_reading(closing)
                # Fill the stalled peer's socket buffers so its writer is blocked.
                for _ in range(40):
                    await app.send_to("stalled", {"type": "fill", "data": "z" * 60_000})
                # The other one is in a pending closing handshake it will never answer.
                (pending,) = [c for c in app.clients if c.client_id == "closing"]
                closer = asyncio.create_task(pending.close(4000, "bye"))
                loop = asyncio.get_running_loop()
                worst = 0.0
                counts = []
                async with dial(srv.url, "client_id=talker") as talker:
                    await hello_of(talker)
                    for n in range(20):
                        began = loop.time()
                        counts.append(await app.broadcast({"type": "news", "n": n}))
                        await app.send_to("stalled", {"type": "more"})
                        await app.send_to("closing", {"type": "more"})
                        worst = max(worst, loop.time() - began)
                    got = [(await recv_type(talker, "news"))["n"] for _ in range(20)]
                    await talker.send('{"type":"chat","text":"hi"}')
                    ack = await recv_type(talker, "chat_ack")
                    echo = await recv_type(talker, "chat")
                await closer
                return worst, counts, len(got) + (ack["type"] == "chat_ack"), echo["text"] == "hi"
            finally:
                stalled.transport.abort()
                closing.transport.abort()

    worst, counts, received, echoed = run(body())
    # Correctness bound: a push that waited on the stalled peer would take its 4 s timeout.
    assert worst < 1.0
    assert received == 21
    assert echoed
    assert all(count >= 1 for count in counts)


# ---- 4. The rate limit counts what the docs say --------------------------------------------------


def test_protocol_pings_count_against_the_rate_limit_on_steadyserver() -> None:
    async def body() -> tuple[int | None, list[tuple[str, int | None]]]:
        async with served("steady", rate_limit_messages=10, rate_limit_window_ms=1000) as srv:
            seen = disconnect_log(srv.app)
            async with dial(srv.url, "client_id=pinger") as ws:
                await hello_of(ws)
                try:
                    for _ in range(2000):
                        await ws.ping()
                except ConnectionClosed:
                    pass
                frame = await close_frame(ws)
            await seen.wait_for()
            return code_of(frame), seen

    code, seen = run(body())
    assert code == 4429
    assert seen == [("pinger", 4429)]


@pytest.mark.parametrize("kind", KINDS)
def test_frames_are_metered_as_they_arrive_so_a_slow_handler_does_not_cause_4429(
    kind: Kind,
) -> None:
    async def body() -> tuple[int, bool]:
        handled: list[int] = []
        all_done = asyncio.Event()
        async with served(kind, rate_limit_messages=20, rate_limit_window_ms=1000) as srv:

            @srv.app.on_message("job")
            async def job(message: dict[str, Any], client: Client) -> None:
                if not handled:
                    await asyncio.sleep(2.0)  # the server's own slowness, not the client's
                handled.append(message["n"])
                if len(handled) == 30:
                    all_done.set()

            async with dial(srv.url, "client_id=steady") as ws:
                await hello_of(ws)
                for n in range(30):  # 10 per second: half the limit
                    await ws.send(json.dumps({"type": "job", "n": n}))
                    await asyncio.sleep(100 * MS)
                async with asyncio.timeout(TIMEOUT):
                    await all_done.wait()
                await ws.send('{"type":"ping"}')
                alive = (await recv_type(ws, "pong"))["type"] == "pong"
            return len(handled), alive

    assert run(body()) == (30, True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fragmented_message_counts_once_against_the_rate_limit(kind: Kind) -> None:
    async def body() -> str:
        async with (
            served(kind, rate_limit_messages=3, rate_limit_window_ms=60_000) as srv,
            dial(srv.url, "client_id=frag") as ws,
        ):
            await hello_of(ws)
            await ws.send(['{"type":', '"status"', "}"])  # one message, three frames
            status = await recv_type(ws, "status")
            await ws.send('{"type":"ping"}')
            await recv_type(ws, "pong")
            return str(status["type"])

    assert run(body()) == "status"


# ---- 5. Closing from outside is prompt -----------------------------------------------------------


async def busy_reader(ws: ClientConnection, queued: int = 40) -> None:
    """Occupy the connection's handler and queue ``queued`` frames behind it (more than 16 and
    the server stops reading the connection until its handler frees up)."""
    await ws.send('{"type":"busy"}')
    for n in range(queued):
        await ws.send(json.dumps({"type": "queued", "n": n}))


def register_busy(app: Endpoints, release: asyncio.Event, started: asyncio.Event) -> None:
    @app.on_message("busy")
    async def busy(message: dict[str, Any], client: Client) -> None:
        started.set()
        async with asyncio.timeout(TIMEOUT):
            await release.wait()


@pytest.mark.parametrize("kind", KINDS)
def test_client_close_from_another_task_is_prompt_behind_a_busy_reader(kind: Kind) -> None:
    async def body() -> tuple[float, float, int | None, list[tuple[str, int | None]]]:
        release, started = asyncio.Event(), asyncio.Event()
        async with served(kind, connection_timeout_ms=4000) as srv:
            register_busy(srv.app, release, started)
            seen = disconnect_log(srv.app)
            async with dial(srv.url, "client_id=busy") as ws:
                await hello_of(ws)
                await busy_reader(ws)
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
                (client,) = srv.app.clients
                loop = asyncio.get_running_loop()
                began = loop.time()
                await client.close(4000, "bye")
                took = loop.time() - began
                frame = await close_frame(ws)
                release.set()
            await seen.wait_for()
            return took, srv.app.config.close_timeout, code_of(frame), seen

    took, close_timeout, code, seen = run(body())
    assert took < close_timeout / 2  # correctness: it did not sit out the close timeout
    assert code == 4000
    assert seen == [("busy", 4000)]


@pytest.mark.parametrize("kind", KINDS)
def test_heartbeat_1011_behind_a_busy_reader_reaches_the_client_and_on_disconnect(
    kind: Kind,
) -> None:
    async def body() -> tuple[int | None, list[tuple[str, int | None]]]:
        release, started = asyncio.Event(), asyncio.Event()
        async with served(kind, heartbeat_interval_ms=200, connection_timeout_ms=400) as srv:
            register_busy(srv.app, release, started)
            seen = disconnect_log(srv.app)
            async with dial(srv.url, "client_id=quiet") as ws:
                await hello_of(ws)
                await busy_reader(ws, queued=10)
                # Then silence: pings go unanswered, but the client keeps reading.
                frame = await close_frame(ws)
                release.set()
            await seen.wait_for()
            return code_of(frame), seen

    assert run(body()) == (1011, [("quiet", 1011)])


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_1001_behind_a_busy_reader_reaches_the_client_and_on_disconnect(
    kind: Kind,
) -> None:
    async def body() -> tuple[float, int | None, list[tuple[str, int | None]]]:
        release, started = asyncio.Event(), asyncio.Event()
        async with served(kind, connection_timeout_ms=4000) as srv:
            register_busy(srv.app, release, started)
            seen = disconnect_log(srv.app)
            async with dial(srv.url, "client_id=busy") as ws:
                await hello_of(ws)
                await busy_reader(ws)
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
                closer = asyncio.create_task(srv.close())
                frame = await close_frame(ws)
                loop = asyncio.get_running_loop()
                began = loop.time()
                release.set()
                await closer
                took = loop.time() - began
            return took, code_of(frame), seen

    took, code, seen = run(body())
    assert code == 1001
    assert seen == [("busy", 1001)]
    assert took < 4.0


# ---- 6. on_connect does not starve the heartbeat -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slow", ["on_connect", "handler"])
def test_a_client_answering_every_ping_is_not_closed_while_a_hook_runs_long(
    kind: Kind, slow: str
) -> None:
    async def body() -> tuple[int, str, list[tuple[str, int | None]]]:
        async with served(kind, heartbeat_interval_ms=150, connection_timeout_ms=300) as srv:
            seen = disconnect_log(srv.app)

            @srv.app.on_connect
            async def joined(client: Client) -> None:
                if slow == "on_connect":
                    await asyncio.sleep(1.5)

            @srv.app.on_message("slow")
            async def slow_one(message: dict[str, Any], client: Client) -> None:
                await asyncio.sleep(1.5)
                await client.send({"type": "done"})

            async with dial(srv.url, "client_id=ponger") as ws:
                await hello_of(ws)
                if slow == "handler":
                    await ws.send('{"type":"slow"}')
                pongs = 0
                loop = asyncio.get_running_loop()
                end = loop.time() + 2.0
                async with asyncio.timeout(TIMEOUT):
                    while loop.time() < end:  # bounded in time and by the pings that arrive
                        message = await recv_json(ws)
                        if message["type"] == "ping":
                            await ws.send('{"type":"pong"}')
                            pongs += 1
                await ws.send('{"type":"status"}')
                status = await recv_type(ws, "status")
            return pongs, str(status["type"]), seen

    pongs, status, seen = run(body())
    assert pongs >= 5
    assert status == "status"
    assert seen == [("ponger", 1000)]


# ---- 7. One answer per input ---------------------------------------------------------------------


async def ended_with(kind: Kind, case: str) -> tuple[int | None, int | None]:
    """Run one input; return (what on_disconnect saw, the close code the client received)."""
    options: dict[str, Any] = {"heartbeat_interval_ms": 150, "connection_timeout_ms": 400}
    if case == "rate":
        options.update(rate_limit_messages=2, rate_limit_window_ms=60_000)
    if case == "too-big":
        options.update(max_message_bytes=1000)
    async with served(kind, **options) as srv:
        seen = disconnect_log(srv.app)
        ws = await dial(srv.url, "client_id=x", max_size=None).__aenter__()
        received: int | None = None
        try:
            await hello_of(ws)
            if case == "rst":
                ws.transport.abort()
            elif case == "client-1000-then-push":
                await ws.close(1000)
                await srv.app.send_to("x", {"type": "late"})
            elif case == "client-4000":
                await ws.close(4000, "mine")
            elif case == "no-status":
                ws.protocol.send_close()  # a close frame with no status code
                ws.send_data()
                await close_frame(ws)
            elif case == "too-big":
                await ws.send("x" * 2000)
            elif case == "silent":
                pass  # it reads (below) but never answers the JSON pings
            elif case == "rate":
                for _ in range(3):
                    await ws.send('{"type":"pong"}')
            elif case == "shutdown":
                await asyncio.sleep(50 * MS)
                closer = asyncio.create_task(srv.close())
                frame = await close_frame(ws)
                await closer
                received = code_of(frame)
            if case in ("too-big", "silent", "rate"):
                frame = await close_frame(ws)
                received = code_of(frame)
        finally:
            ws.transport.abort()
        await seen.wait_for()
        assert len(seen) == 1
        return seen[0][1], received


EXPECTED_ENDS = {
    "rst": (1006, None),
    "client-1000-then-push": (1000, None),
    "client-4000": (4000, None),
    "no-status": (1005, None),
    "too-big": (1009, 1009),
    "silent": (1011, 1011),
    "rate": (4429, 4429),
    "shutdown": (1001, 1001),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", sorted(EXPECTED_ENDS))
def test_on_disconnect_sees_the_same_close_code_on_both_adapters(kind: Kind, case: str) -> None:
    assert run(ended_with(kind, case)) == EXPECTED_ENDS[case]


@pytest.mark.parametrize("kind", KINDS)
def test_the_legacy_echo_closes_a_frame_over_the_size_limit_with_1009(kind: Kind) -> None:
    async def body() -> tuple[str, int | None]:
        async with (
            served(kind, max_message_bytes=1 << 20) as srv,
            dial(srv.url, "", path="/ws/legacy", max_size=None) as ws,
        ):
            await ws.send("small")
            async with asyncio.timeout(TIMEOUT):
                echo = str(await ws.recv())
            await ws.send("y" * (2 << 20))
            frame = await close_frame(ws)
        return echo, code_of(frame)

    assert run(body()) == ("Echo: small", 1009)


@pytest.mark.parametrize("kind", KINDS)
def test_percent_encoded_paths_are_decoded_once_the_same_way(kind: Kind) -> None:
    async def body() -> tuple[str, str, str]:
        async with served(kind) as srv:
            async with dial(srv.url, "client_id=a", path="/ws/%63lient") as ws:
                encoded_client = str((await recv_json(ws))["type"])
            async with dial(srv.url, "", path="/ws/a%2Fb") as ws:
                await ws.send("hi")
                async with asyncio.timeout(TIMEOUT):
                    slash = str(await ws.recv())
            async with dial(srv.url, "", path="/ws/%C3%A9t%C3%A9") as ws:
                await ws.send("x")
                async with asyncio.timeout(TIMEOUT):
                    unicode = str(await ws.recv())
        return encoded_client, slash, unicode

    assert run(body()) == ("hello", "Echo: hi", "Echo: x")


@pytest.mark.parametrize("kind", KINDS)
def test_plain_http_gets_426_on_the_websocket_paths_and_404_elsewhere(kind: Kind) -> None:
    async def body() -> list[bytes]:
        async with served(kind) as srv:
            return [
                (await http_get(srv.url, path)).split(b"\r\n", 1)[0]
                for path in ("/ws/client?client_id=a", "/ws/legacy", "/nope", "/ws/a/b")
            ]

    status_lines = run(body())
    assert [line.split(b" ")[1] for line in status_lines] == [b"426", b"426", b"404", b"404"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_connection_cap_is_exact_under_a_burst_of_upgrades(kind: Kind) -> None:
    cap = 5

    async def one(url: str, n: int) -> str:
        try:
            ws = await dial(url, f"client_id=b{n}").__aenter__()
        except InvalidStatus as exc:
            return str(exc.response.status_code)
        await hello_of(ws)
        return "open"

    async def body() -> list[str]:
        async with served(kind, max_connections=cap) as srv:
            results = await asyncio.gather(*(one(srv.url, n) for n in range(40)))
            opened = len(srv.app.clients)
            assert opened == cap
            for client in srv.app.clients:
                await client.close()
        return sorted(results)

    results = run(body())
    assert results.count("open") == cap
    assert results.count("503") == 40 - cap


def test_asgi_takes_the_admission_slot_before_awaiting_the_accept() -> None:
    """Three upgrades race through an accept that yields; the cap of one must hold."""

    async def body() -> list[str]:
        app = SteadyASGI(environ={}, max_connections=1)
        answers: list[str] = []
        gate = asyncio.Event()
        release = asyncio.Event()

        async def connection(n: int) -> None:
            first = True

            async def receive() -> dict[str, Any]:
                nonlocal first
                if first:
                    first = False
                    return {"type": "websocket.connect"}
                await release.wait()
                return {"type": "websocket.disconnect", "code": 1000}

            async def send(message: Message) -> None:
                if message["type"] == "websocket.accept":
                    answers.append("accept")
                    await gate.wait()  # the server yields here
                elif message["type"] == "websocket.http.response.start":
                    answers.append(str(message["status"]))

            scope = {
                "type": "websocket",
                "path": f"/ws/u{n}",
                "query_string": b"",
                "headers": [],
                "client": ("127.0.0.1", 4000 + n),
                "extensions": {"websocket.http.response": {}},
            }
            await app(scope, receive, send)

        async with asyncio.TaskGroup() as group:
            for n in range(3):
                group.create_task(connection(n))
            await asyncio.sleep(20 * MS)
            gate.set()
            await asyncio.sleep(20 * MS)
            release.set()
        return sorted(answers)

    assert run(body()) == ["503", "503", "accept"]
