"""The server side of protocol v2 and of request/reply, over real sockets, on both adapters.

A real ``SteadyServer`` (127.0.0.1, port 0) or ``SteadyASGI`` under uvicorn, and raw
``websockets`` clients that speak v2 by hand (docs/protocol.md, "Protocol v2"): the hello's
session fields, offsets on application messages only, ids handled once and acked after the
handler returned, batching, replay on resume, messages kept during an outage, every refused
resume answered with ``resumed: false`` and a fresh session, one connection per session,
request/reply in v1 and v2, and v1 unchanged. Every wait is an awaited event or frame, bounded
by ``TIMEOUT``; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import ClientConnection

from steadysocket.model.delivery import DeliveryConfig
from steadysocket.model.protocol import FEATURES, is_session_token
from steadysocket.runtime.server import Client, Endpoints
from tests.runtime.adapters import (
    KINDS,
    SEED_HELLO_FIELDS,
    TIMEOUT,
    Kind,
    close_frame,
    dial,
    recv_json,
    run,
    served,
    stop_reading,
)

QUIET = DeliveryConfig(ack_every=1)
"""One ack per handled message: every test sees the ack right after the handler's frames."""


async def frame(ws: ClientConnection) -> dict[str, Any]:
    """The next frame, skipping server heartbeat pings (none come at the default interval)."""
    for _ in range(100):
        message = await recv_json(ws)
        if message["type"] != "ping":
            return message
    raise AssertionError("only pings")


def query(client_id: str = "c1", **resume: str) -> str:
    return urlencode({"client_id": client_id, "version": "2", **resume})


def resume_of(hello: dict[str, Any], offset: int | str) -> dict[str, str]:
    return {"session_id": hello["session_id"], "epoch": hello["epoch"], "offset": str(offset)}


@asynccontextmanager
async def v2(
    url: str, client_id: str = "c1", resume: dict[str, str] | None = None
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    """A raw v2 connection and its hello."""
    async with dial(url, query(client_id, **(resume or {}))) as ws:
        hello = await frame(ws)
        assert hello["type"] == "hello", hello
        yield ws, hello


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


class Departures:
    """``on_disconnect`` calls: (client_id, close_code, close_reason), awaited by count."""

    def __init__(self, app: Endpoints) -> None:
        self.seen: list[tuple[str, int | None, str | None]] = []
        self.changed = asyncio.Event()

        @app.on_disconnect
        async def left(client: Client) -> None:
            self.seen.append((client.client_id, client.close_code, client.close_reason))
            self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()


class Calls:
    """A handler that records what it was given (and returns nothing)."""

    def __init__(self, app: Endpoints, kind: str = "work") -> None:
        self.messages: list[dict[str, Any]] = []

        @app.on_message(kind)
        async def work(message: dict[str, Any], client: Client) -> None:
            self.messages.append(message)


def ack(n: int) -> tuple[str, int]:
    return ("ack", n)


def brief(message: dict[str, Any]) -> tuple[Any, ...]:
    """A frame reduced to what a test compares: acks by id, numbered ones by offset and type."""
    if message["type"] == "ack":
        return ack(message["id"])
    return (message.get("offset"), message["type"])


# ---- the hello --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_v2_hello_carries_a_fresh_session_and_the_servers_limits(kind: Kind) -> None:
    async def body() -> tuple[dict[str, Any], dict[str, Any], str, int | None]:
        async with (
            served(kind, max_message_bytes=4096) as srv,
            v2(srv.url, "tab-1") as (_, first),
            v2(srv.url, "tab-2") as (_, second),
        ):
            client = next(c for c in srv.app.clients if c.client_id == "tab-1")
            return first, second, client.session_id or "", client.version

    first, second, session_id, version = run(body())
    assert list(first) == [
        *SEED_HELLO_FIELDS,
        "session_id",
        "epoch",
        "resumed",
        "max_message_bytes",
        "resume_outcome",
        "replayed",
    ]
    assert first["accepted_version"] == 2
    assert first["features"] == list(FEATURES)
    assert (first["resumed"], first["resume_outcome"], first["replayed"]) == (False, "new", 0)
    assert first["max_message_bytes"] == 4096
    assert is_session_token(first["session_id"])
    assert len(first["session_id"]) >= 22  # 128 random bits, URL-safe base64
    assert first["session_id"] != second["session_id"]
    assert first["epoch"] == second["epoch"]
    assert (session_id, version) == (first["session_id"], 2)


def test_each_server_object_has_its_own_epoch() -> None:
    async def body() -> tuple[str, str]:
        async with (
            served("steady") as one,
            served("steady") as two,
            v2(one.url) as (_, a),
            v2(two.url) as (_, b),
        ):
            return a["epoch"], b["epoch"]

    a, b = run(body())
    assert a != b


# ---- offsets on application messages only -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_application_message_is_numbered_and_no_control_frame_is(kind: Kind) -> None:
    async def body() -> list[dict[str, Any]]:
        async with served(kind, delivery=QUIET) as srv:

            @srv.app.on_message("ask")
            async def ask(message: dict[str, Any], client: Client) -> int:
                await client.send({"type": "note"})
                return 42

            async with v2(srv.url) as (ws, _):
                frames = []
                await send(ws, {"id": 1, "type": "chat"})  # echo, then ack
                frames += [await frame(ws), await frame(ws)]
                await send(ws, {"id": 2, "type": "ask"})  # note, reply, ack
                frames += [await frame(ws), await frame(ws), await frame(ws)]
                assert await srv.app.send_to("c1", {"type": "direct"}) == 1
                frames.append(await frame(ws))
                assert await srv.app.broadcast({"type": "all"}) == 1
                frames.append(await frame(ws))
                for control in ({"type": "ping"}, {"type": "status"}, {"type": "x"}):
                    await send(ws, control)  # pong, status, error (no id)
                    frames.append(await frame(ws))
                return frames

    frames = run(body())
    assert [brief(f) for f in frames] == [
        (1, "echo"),
        ack(1),
        (2, "note"),
        (3, "reply"),
        ack(2),
        (4, "direct"),
        (5, "all"),
        (None, "pong"),
        (None, "status"),
        (None, "error"),
    ]
    assert [next(iter(f)) for f in frames if "offset" in f] == ["offset"] * 5  # first field
    assert frames[1] == {"type": "ack", "id": 1, "timestamp": frames[1]["timestamp"]}
    assert frames[0]["original_message"] == {"type": "chat"}  # without its id
    assert untimed(frames[3]) == {"offset": 3, "type": "reply", "id": 2, "result": 42}
    assert frames[9]["error_code"] == "INVALID_MESSAGE"
    assert "needs an integer 'id'" in frames[9]["message"]


# ---- ids: handled once, in order, acked after the handler ---------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_ack_comes_only_after_the_handler_returned(kind: Kind) -> None:
    async def body() -> list[tuple[Any, ...]]:
        started, release = asyncio.Event(), asyncio.Event()
        async with served(kind, delivery=QUIET) as srv:

            @srv.app.on_message("slow")
            async def slow(message: dict[str, Any], client: Client) -> None:
                started.set()
                await release.wait()
                await client.send({"type": "done"})

            async with v2(srv.url) as (ws, _):
                await send(ws, {"id": 1, "type": "slow"})
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
                await send(ws, {"type": "ping"})
                seen = [brief(await frame(ws))]  # the pong: no ack went before it
                release.set()
                seen += [brief(await frame(ws)), brief(await frame(ws))]
                return seen

    assert run(body()) == [(None, "pong"), (1, "done"), ack(1)]


@pytest.mark.parametrize("kind", KINDS)
def test_acks_are_batched_by_count_and_by_time(kind: Kind) -> None:
    async def body() -> list[tuple[Any, ...]]:
        handled = asyncio.Event()
        config = DeliveryConfig(ack_every=3, ack_interval_ms=60_000)
        async with served(kind, delivery=config) as srv:

            @srv.app.on_message("work")
            async def work(message: dict[str, Any], client: Client) -> None:
                handled.set()

            seen = []
            async with v2(srv.url) as (ws, _):
                for n in (1, 2):
                    handled.clear()
                    await send(ws, {"id": n, "type": "work"})
                    async with asyncio.timeout(TIMEOUT):
                        await handled.wait()
                await send(ws, {"type": "ping"})
                seen.append(brief(await frame(ws)))  # no ack for 1 and 2 yet
                await send(ws, {"id": 3, "type": "work"})
                seen.append(brief(await frame(ws)))  # the third: ack 3
        timed = DeliveryConfig(ack_every=100, ack_interval_ms=20)
        async with served(kind, delivery=timed) as srv, v2(srv.url) as (ws, _):
            await send(ws, {"id": 1, "type": "work"})
            seen.append(brief(await frame(ws)))  # echo
            seen.append(brief(await frame(ws)))  # the timer's ack
        return seen

    assert run(body()) == [(None, "pong"), ack(3), (1, "echo"), ack(1)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_resent_id_is_not_handled_again_and_is_acked_again(kind: Kind) -> None:
    async def body() -> tuple[list[tuple[Any, ...]], list[dict[str, Any]], bool]:
        async with served(kind, delivery=QUIET) as srv:
            calls = Calls(srv.app)
            gone = Departures(srv.app)
            seen = []
            async with v2(srv.url) as (ws, hello):
                for n in (1, 2):
                    await send(ws, {"id": n, "type": "work", "n": n})
                    seen.append(brief(await frame(ws)))
            await gone.wait_for(1)
            async with v2(srv.url, resume=resume_of(hello, 0)) as (ws, again):
                for n in (1, 2, 3):
                    await send(ws, {"id": n, "type": "work", "n": n})
                    seen.append(brief(await frame(ws)))
            return seen, calls.messages, again["resumed"]

    seen, messages, resumed = run(body())
    assert resumed
    assert seen == [ack(1), ack(2), ack(2), ack(2), ack(3)]
    assert messages == [
        {"type": "work", "n": 1},
        {"type": "work", "n": 2},
        {"type": "work", "n": 3},
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_a_gap_or_a_missing_id_is_an_error_and_the_connection_stays(kind: Kind) -> None:
    async def body() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with served(kind, delivery=QUIET) as srv:
            calls = Calls(srv.app)
            async with v2(srv.url) as (ws, _):
                frames = []
                for message in (
                    {"id": 2, "type": "work"},
                    {"type": "work"},
                    {"id": "1", "type": "work"},
                    {"id": True, "type": "work"},
                    {"id": 0, "type": "work"},
                    {"type": "ack", "offset": 5},
                    {"type": "ack", "offset": -1},
                    {"type": "ack"},
                ):
                    await send(ws, message)
                    frames.append(await frame(ws))
                await send(ws, {"id": 1, "type": "work"})
                frames.append(await frame(ws))
                return frames, calls.messages

    frames, messages = run(body())
    assert [f["type"] for f in frames] == ["error"] * 8 + ["ack"]
    assert {f["error_code"] for f in frames[:8]} == {"INVALID_MESSAGE"}
    assert "id 2 skips ids (expected 1)" in frames[0]["message"]
    assert "ack of offset 5, but the last offset sent is 0" in frames[5]["message"]
    assert messages == [{"type": "work"}]


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_while_the_old_connections_handler_runs_waits_for_it(kind: Kind) -> None:
    async def body() -> tuple[list[tuple[Any, ...]], int]:
        started, release = asyncio.Event(), asyncio.Event()
        runs = 0
        async with served(kind, delivery=QUIET) as srv:

            @srv.app.on_message("slow")
            async def slow(message: dict[str, Any], client: Client) -> str:
                nonlocal runs
                runs += 1
                started.set()
                await release.wait()
                return "done"

            gone = Departures(srv.app)
            async with v2(srv.url) as (ws, hello):
                await send(ws, {"id": 1, "type": "slow"})
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
            async with v2(srv.url, resume=resume_of(hello, 0)) as (ws, again):
                assert again["resumed"]
                await send(ws, {"id": 1, "type": "slow"})  # BUSY: waits for the first run
                await send(ws, {"type": "ping"})
                seen = [brief(await frame(ws))]  # the pong; the re-send is still waiting
                release.set()
                seen += [brief(await frame(ws)), brief(await frame(ws))]
                await gone.wait_for(1)
                return seen, runs

    seen, runs = run(body())
    assert runs == 1
    # The first run's reply goes to the connection carrying the session now, then the ack.
    assert seen == [(None, "pong"), (1, "reply"), ack(1)]


def test_a_handler_cancelled_at_shutdown_leaves_its_id_unhandled() -> None:
    async def body() -> tuple[int | None, int, int]:
        started = asyncio.Event()
        async with served("steady", connection_timeout_ms=300, delivery=QUIET) as srv:

            @srv.app.on_message("stuck")
            async def stuck(message: dict[str, Any], client: Client) -> None:
                started.set()
                await asyncio.Event().wait()

            async with v2(srv.url) as (ws, hello):
                await send(ws, {"id": 1, "type": "stuck"})
                async with asyncio.timeout(TIMEOUT):
                    await started.wait()
                await srv.close()  # cancels the handler after the close timeout
            session = srv.app.sessions.sessions[hello["session_id"]]
            return session.handling, session.last_handled, session.next_offset

    # Not handled, so a re-send (in a resume) runs it; and nothing was replied.
    assert run(body()) == (None, 0, 1)


# ---- server -> client: replay, outage, one connection per session -------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_replays_everything_after_the_clients_offset_including_the_outage(
    kind: Kind,
) -> None:
    async def body() -> tuple[list[int], dict[str, Any], list[dict[str, Any]], int]:
        async with served(kind, delivery=QUIET) as srv:
            app = srv.app
            gone = Departures(app)
            counts = []
            async with v2(srv.url) as (ws, hello), v2(srv.url, "other") as (other, _):
                for n in (1, 2, 3):
                    counts.append(await app.send_to("c1", {"type": "m", "n": n}))
                for _ in range(3):
                    await frame(ws)
                await send(ws, {"type": "ack", "offset": 1})
                await send(ws, {"type": "ping"})
                await frame(ws)  # the ack was read before the pong
                await other.close()
                await gone.wait_for(1)
            await gone.wait_for(2)
            counts.append(await app.send_to("c1", {"type": "m", "n": 4}))
            counts.append(await app.broadcast({"type": "m", "n": 5}))  # c1's and other's
            counts.append(await app.send_to("nobody", {"type": "m", "n": 6}))
            async with v2(srv.url, resume=resume_of(hello, 2)) as (ws, again):
                replayed = [await frame(ws) for _ in range(again["replayed"])]
                await send(ws, {"id": 1, "type": "after"})
                replayed.append(await frame(ws))
                return counts, again, replayed, len(app.sessions.sessions)

    counts, again, replayed, sessions = run(body())
    assert counts == [1, 1, 1, 1, 2, 0]
    assert (again["resumed"], again["resume_outcome"], again["replayed"]) == (True, "resumed", 3)
    assert [(f["offset"], f["n"]) for f in replayed[:3]] == [(3, 3), (4, 4), (5, 5)]
    assert brief(replayed[3]) == (6, "echo")  # and it goes on from there
    assert sessions == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_second_connection_resuming_a_live_session_closes_the_first(kind: Kind) -> None:
    async def body() -> tuple[Any, list[tuple[Any, ...]], list[tuple[str, int | None, str | None]]]:
        async with served(kind, delivery=QUIET) as srv:
            gone = Departures(srv.app)
            async with v2(srv.url) as (first, hello):
                await send(first, {"id": 1, "type": "chat"})
                await frame(first)
                await frame(first)
                async with v2(srv.url, resume=resume_of(hello, 0)) as (second, _):
                    closed = await close_frame(first)
                    seen = [brief(await frame(second))]  # the echo, replayed
                    await gone.wait_for(1)
                    assert len(srv.app.clients) == 1
                    await srv.app.send_to("c1", {"type": "m"})
                    seen.append(brief(await frame(second)))
                    return closed, seen, list(gone.seen)

    closed, seen, departures = run(body())
    assert closed is not None
    assert (closed.code, closed.reason) == (1000, "Session resumed elsewhere")
    assert seen == [(1, "echo"), (2, "m")]
    assert departures == [("c1", 1000, "Session resumed elsewhere")]


# ---- refused resumes: resumed false, the outcome, a new session ---------------------------------


def refusals() -> list[tuple[str, str]]:
    """(what the client sends as resume parameters, the outcome), one per refusal."""
    return [
        ("epoch", "wrong_epoch"),
        ("forged", "unknown_session"),
        ("foreign", "foreign_session"),
        ("future", "future_offset"),
        ("-1", "future_offset"),
        ("1e3", "future_offset"),
        ("", "future_offset"),
        ("01", "future_offset"),
        ("+1", "future_offset"),
        (" 1", "future_offset"),
        ("²", "future_offset"),
        ("9" * 40, "future_offset"),
        ("no offset", "future_offset"),
        ("no epoch", "wrong_epoch"),
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_every_refused_resume_answers_resumed_false_with_its_outcome_and_a_new_session(
    kind: Kind,
) -> None:
    async def body() -> list[tuple[str, bool, str, bool, tuple[Any, ...]]]:
        results = []
        async with served(kind, delivery=QUIET) as srv:
            gone = Departures(srv.app)
            async with v2(srv.url, "someone-else") as (_, foreign):
                pass
            await gone.wait_for(1)
            left = 1
            for case, _ in refusals():
                async with v2(srv.url) as (ws, hello):
                    await srv.app.send_to("c1", {"type": "m"})
                    await frame(ws)
                left += 1
                await gone.wait_for(left)
                resume = resume_of(hello, 1)
                if case == "epoch":
                    resume["epoch"] = "x" + hello["epoch"][1:]
                elif case == "forged":
                    resume["session_id"] = "A" * 22
                elif case == "foreign":
                    resume["session_id"] = foreign["session_id"]
                elif case == "future":
                    resume["offset"] = "2"
                elif case == "no offset":
                    del resume["offset"]
                elif case == "no epoch":
                    del resume["epoch"]
                else:
                    resume["offset"] = case
                async with v2(srv.url, resume=resume) as (ws, again):
                    await send(ws, {"id": 1, "type": "chat"})  # the new session works
                    works = brief(await frame(ws))
                results.append(
                    (
                        case,
                        again["resumed"],
                        again["resume_outcome"],
                        again["session_id"] != hello["session_id"],
                        works,
                    )
                )
                left += 1
                await gone.wait_for(left)
        return results

    assert run(body(), bound=12 * TIMEOUT) == [
        (case, False, outcome, True, (1, "echo")) for case, outcome in refusals()
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_after_the_window_or_past_the_history_is_refused(kind: Kind) -> None:
    async def body() -> list[tuple[bool, str, int]]:
        results = []
        # window_ms=0: expired as soon as any time passed since the disconnect.
        for config in (DeliveryConfig(window_ms=0), DeliveryConfig(history_limit=2)):
            async with served(kind, delivery=config) as srv:
                gone = Departures(srv.app)
                async with v2(srv.url) as (ws, hello):
                    for n in range(3):
                        await srv.app.send_to("c1", {"type": "m", "n": n})
                        await frame(ws)
                await gone.wait_for(1)
                async with v2(srv.url, resume=resume_of(hello, 0)) as (ws, again):
                    fresh = await srv.app.send_to("c1", {"type": "m"})
                    offset = (await frame(ws))["offset"]
                    results.append((again["resumed"], again["resume_outcome"], offset + fresh))
        return results

    assert run(body()) == [(False, "unknown_session", 2), (False, "trimmed", 2)]


@pytest.mark.parametrize("kind", KINDS)
def test_disconnected_sessions_are_dropped_after_the_window_without_new_connections(
    kind: Kind,
) -> None:
    async def body() -> tuple[int, int, int]:
        async with served(kind, delivery=DeliveryConfig(window_ms=30)) as srv:
            app = srv.app
            gone = Departures(app)
            async with v2(srv.url, "a"), v2(srv.url, "b"):
                held = len(app.sessions.sessions)
            await gone.wait_for(2)
            # The expiry timer is the thing under test: poll (bounded) for its effect.
            for _ in range(500):
                if not app.sessions.sessions:
                    break
                await asyncio.sleep(0.01)
            left = len(app.sessions.sessions)
            kept = await app.broadcast({"type": "m"})
        return held, left, kept

    assert run(body()) == (2, 0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_session_supersedes_the_client_ids_older_one_which_keeps_its_connection(
    kind: Kind,
) -> None:
    async def body() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], int, bool, str]:
        async with served(kind, delivery=QUIET) as srv:
            app = srv.app
            gone = Departures(app)
            async with v2(srv.url) as (first, old), v2(srv.url) as (second, _):
                count = await app.send_to("c1", {"type": "m"})  # both sessions: one each
                seen_first = [brief(await frame(first))]
                seen_second = [brief(await frame(second))]
                await send(first, {"id": 1, "type": "chat"})  # the old one still works
                seen_first += [brief(await frame(first)), brief(await frame(first))]
            await gone.wait_for(2)
            async with v2(srv.url, resume=resume_of(old, 2)) as (_, again):
                return seen_first, seen_second, count, again["resumed"], again["resume_outcome"]

    first, second, count, resumed, outcome = run(body())
    assert count == 2
    assert first == [(1, "m"), (2, "echo"), ack(1)]
    assert second == [(1, "m")]
    assert (resumed, outcome) == (False, "unknown_session")


@pytest.mark.parametrize("kind", KINDS)
def test_a_full_outbox_closes_a_v2_connection_with_1013_and_the_resume_replays_all(
    kind: Kind,
) -> None:
    async def body() -> tuple[int, list[tuple[str, int | None, str | None]], list[int], bool]:
        config = DeliveryConfig(history_limit=100_000)
        async with served(kind, compression=None, delivery=config, max_outbox_bytes=4096) as srv:
            app = srv.app
            gone = Departures(app)
            async with v2(srv.url) as (ws, hello):
                stop_reading(ws)
                published = 0
                for _ in range(20_000):  # until the socket buffers and the outbox are full
                    await app.send_to("c1", {"type": "bulk", "data": "x" * 1000})
                    published += 1
                    if app.refused_pushes:
                        break
                ws.transport.abort()
            await gone.wait_for(1)
            async with v2(srv.url, resume=resume_of(hello, 0)) as (ws, again):
                offsets = [(await frame(ws))["offset"] for _ in range(again["replayed"])]
                return published, list(gone.seen), offsets, again["resumed"]

    published, departures, offsets, resumed = run(body())
    assert departures == [("c1", 1013, "Outbox full: resume to receive the rest")]
    assert resumed
    assert offsets == list(range(1, published + 1))


# ---- request / reply ----------------------------------------------------------------------------


def register_requests(app: Endpoints, seen: list[dict[str, Any]]) -> None:
    @app.on_message("add")
    async def add(message: dict[str, Any], client: Client) -> Any:
        seen.append(message)
        return message["a"] + message["b"]

    @app.on_message("fail")
    async def fail(message: dict[str, Any], client: Client) -> None:
        raise RuntimeError("boom")

    @app.on_message("odd")
    async def odd(message: dict[str, Any], client: Client) -> object:
        return {1, 2}

    @app.on_message("quiet")
    async def quiet(message: dict[str, Any], client: Client) -> None:
        return None


@pytest.mark.parametrize("kind", KINDS)
def test_v1_requests_get_replies_and_other_messages_none(kind: Kind) -> None:
    async def body() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []
        async with served(kind) as srv:
            register_requests(srv.app, seen)
            async with dial(srv.url, "client_id=c1") as ws:
                await frame(ws)
                for message in (
                    {"type": "add", "id": 1, "a": 1, "b": 2},
                    {"type": "fail", "id": 2},
                    {"type": "odd", "id": 3},
                    {"type": "quiet", "id": 4},
                    {"type": "add", "a": 5, "b": 5},  # no id: no reply
                    {"type": "add", "id": True, "a": 0, "b": 1},  # not an integer id
                    {"type": "chat", "id": 5},  # echo, then the echo handler's None
                ):
                    await send(ws, message)
                frames = [await frame(ws) for _ in range(6)]
                return frames, seen

    frames, seen = run(body())
    assert untimed(frames[0]) == {"type": "reply", "id": 1, "result": 3}
    assert untimed(frames[1]) == {
        "type": "reply",
        "id": 2,
        "error": {"error_code": "HANDLER_ERROR", "message": "RuntimeError: boom"},
    }
    assert frames[2]["id"] == 3
    assert frames[2]["error"]["error_code"] == "HANDLER_ERROR"
    assert "not JSON" in frames[2]["error"]["message"]
    assert untimed(frames[3]) == {"type": "reply", "id": 4, "result": None}
    assert frames[4]["type"] == "echo"
    assert frames[4]["original_message"] == {"type": "chat", "id": 5}
    assert untimed(frames[5]) == {"type": "reply", "id": 5, "result": None}
    assert seen == [
        {"type": "add", "id": 1, "a": 1, "b": 2},  # v1: the handler sees the id
        {"type": "add", "a": 5, "b": 5},
        {"type": "add", "id": True, "a": 0, "b": 1},
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_v2_replies_are_numbered_and_a_handler_returning_none_is_answered_by_the_ack(
    kind: Kind,
) -> None:
    async def body() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []
        async with served(kind, delivery=QUIET) as srv:
            register_requests(srv.app, seen)
            async with v2(srv.url) as (ws, _):
                requests: list[dict[str, Any]] = [
                    {"type": "add", "a": 1, "b": 2},
                    {"type": "fail"},
                    {"type": "odd"},
                    {"type": "quiet"},
                ]
                for n, message in enumerate(requests, start=1):
                    await send(ws, {"id": n, **message})
                frames = [await frame(ws) for _ in range(7)]
                return frames, seen

    frames, seen = run(body())
    assert untimed(frames[0]) == {"offset": 1, "type": "reply", "id": 1, "result": 3}
    assert brief(frames[1]) == ack(1)
    assert untimed(frames[2]) == {
        "offset": 2,
        "type": "reply",
        "id": 2,
        "error": {"error_code": "HANDLER_ERROR", "message": "RuntimeError: boom"},
    }
    assert brief(frames[3]) == ack(2)
    assert (frames[4]["offset"], frames[4]["id"]) == (3, 3)
    assert "not JSON" in frames[4]["error"]["message"]
    assert [brief(f) for f in frames[5:]] == [ack(3), ack(4)]
    assert seen == [{"type": "add", "a": 1, "b": 2}]  # v2: without the id


# ---- v1 unchanged -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("params", ["client_id=seed", "client_id=seed&version=1&role=frontend"])
def test_a_v1_client_sees_what_it_saw_before(kind: Kind, params: str) -> None:
    async def body() -> list[dict[str, Any]]:
        async with served(kind) as srv, dial(srv.url, params) as ws:
            frames = [await frame(ws)]
            for message in (
                {"type": "chat", "text": "hi"},
                {"type": "ack", "offset": 3},  # an application type in v1
                {"type": "ping"},
            ):
                await send(ws, message)
                frames.append(await frame(ws))
            return frames

    hello, echo, ack_echo, pong = run(body())
    assert len(hello) == 7
    assert hello["accepted_version"] == 1
    assert "session_id" not in hello
    assert set(echo) == {"type", "original_message", "timestamp", "client_id"}
    assert echo["original_message"] == {"type": "chat", "text": "hi"}
    assert ack_echo["original_message"] == {"type": "ack", "offset": 3}
    assert set(pong) == {"type", "timestamp", "client_id"}


def untimed(frame: dict[str, Any]) -> dict[str, Any]:
    """A reply without its ``timestamp`` (checked to be one), to compare the rest exactly."""
    rest = dict(frame)
    stamp = rest.pop("timestamp")
    assert isinstance(stamp, str)
    assert stamp.endswith("Z")
    return rest
