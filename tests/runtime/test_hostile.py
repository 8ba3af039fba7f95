"""Hostile input against a real ``steadysocket serve`` process on 127.0.0.1.

One server process serves the whole module (connection timeout 1 s, everything else default),
so its resident memory (``VmRSS`` in ``/proc/<pid>/status``) can be watched across every case.
Each case checks that it got its documented answer (docs/reliability.md); the expected answer
of a generated query or frame comes from the model itself (``match_route``/``validate_query``
and a ``ServerSession`` fed the same frame), so the test compares the running server with the
specification, not with a copy of it. After every case the server must still answer a normal
client; at the end it must still be alive, its RSS bounded, its log free of tracebacks, and it
must stop cleanly on SIGTERM.

Quick by default; ``STEADYSOCKET_RELIABILITY=heavy`` (``tox -e reliability``) runs more
examples, more connections and a longer slowloris.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from steadysocket.model.protocol import Accept, validate_query
from steadysocket.model.server_session import (
    ClientRoute,
    Close,
    Deliver,
    SendText,
    ServerConfig,
    ServerSession,
    match_route,
)
from tests.runtime.adapters import recv_json
from tests.runtime.fault_rig import HEAVY, MS, rss_kib, run, serve_command

TIMEOUT = 5_000 * MS
CONNECTION_TIMEOUT_MS = 1_000
EXAMPLES = 300 if HEAVY else 25
RSS_BOUND_KIB = 96 * 1024
"""How far the server's RSS may grow above its warmed-up baseline, over the whole module.
Its write and read limits bound a connection to a few MiB; this is far below what the cases
push at it (the non-reader alone offers 128 MiB)."""

WALL = datetime(2025, 1, 1, tzinfo=UTC)
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)")


@dataclass
class Hostile:
    """The server under attack: its process, port, log file, and RSS figures (KiB)."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    baseline_kib: int
    peak_kib: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def sample(self) -> int:
        rss = rss_kib(self.process.pid)
        self.peak_kib = max(self.peak_kib, rss)
        return rss


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    log = tmp_path_factory.mktemp("hostile") / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *serve_command(),
                "serve",
                "--port",
                "0",
                "--heartbeat-interval-ms",
                "60000",
                "--connection-timeout-ms",
                str(CONNECTION_TIMEOUT_MS),
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        deadline = time.monotonic() + 10
        while not (match := LISTENING.search(log.read_text())):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(10 * MS)
        port = int(match.group(1))
        server = Hostile(process, port, log, baseline_kib=0)
        run(answers_normally(server))  # warm up: imports and first connection done
        server.baseline_kib = server.peak_kib = rss_kib(process.pid)
        yield server
        assert process.poll() is None, "the server died"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def answers_normally(server: Hostile) -> bool:
    """A well-behaved client still gets its hello and a pong."""
    async with connect(
        f"{server.url}/ws/client?client_id=normal", proxy=None, open_timeout=TIMEOUT
    ) as ws:
        assert (await recv_json(ws))["type"] == "hello"
        await ws.send('{"type":"ping"}')
        assert (await recv_json(ws))["type"] == "pong"
    server.sample()
    return True


def after_the_case(server: Hostile) -> None:
    assert server.process.poll() is None, "the server died"
    assert run(answers_normally(server))
    assert server.sample() - server.baseline_kib < RSS_BOUND_KIB


# ---- generated query strings ------------------------------------------------------------------

_KEYS = st.sampled_from(["client_id", "version", "role", "x", "", "client%5Fid", "CLIENT_ID"])
_VALUES = st.one_of(
    st.sampled_from(["c1", "1", "frontend", "admin", "test", "", "2", "abc", "1.0"]),
    st.text(max_size=40),
    st.text(alphabet="abc-_.:9", min_size=120, max_size=140),
)
_ODD = st.sampled_from(["%", "%Z", "%zz", "%e9", "%00", "%0d%0a", "%c3%28", "%ff%fe", "%%", "+"])


def _encode(text: str, style: str) -> str:
    """Percent-encode ``text`` (``quoted``), or leave its non-ASCII raw and escape only what
    would break the request line (``raw``); the server sees the latter surrogate-escaped."""
    if style == "quoted":
        out = []
        for char in text:
            if char.isascii() and (char.isalnum() or char in "-_.~:"):
                out.append(char)
            else:
                out.extend(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
        return "".join(out)
    return "".join(f"%{ord(c):02X}" if c in " \r\n\t#" or ord(c) < 32 else c for c in text)


@st.composite
def queries(draw: st.DrawFn) -> str:
    """Query strings: repeated keys, unicode, odd percent-encoding, sometimes huge."""
    pairs = draw(st.lists(st.tuples(_KEYS, _VALUES, _ODD | st.just("")), max_size=8))
    style = draw(st.sampled_from(["quoted", "quoted", "raw"]))
    parts = [f"{_encode(key, 'quoted')}={_encode(value, style)}{odd}" for key, value, odd in pairs]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), "client_id=ok-1")
    query = "&".join(parts)
    if draw(st.integers(0, 9)) == 0:
        query += "&pad=" + "x" * draw(st.sampled_from([4_000, 7_900, 8_150, 9_000, 20_000]))
    return query


@dataclass(frozen=True)
class Outcome:
    """What a raw upgrade request got back."""

    kind: str  # "hello", "close", "http" or "dropped" (closed without a response)
    code: int = 0


async def raw_upgrade(port: int, target: bytes) -> Outcome:
    """Send an upgrade request for exactly ``target`` (bytes as they are), read the answer."""
    protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws/client"))
    request = protocol.connect().serialize()
    request = request.replace(b"GET /ws/client HTTP/1.1", b"GET " + target + b" HTTP/1.1", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(TIMEOUT):
            while data := await reader.read(65536):
                protocol.receive_data(data)
                for event in protocol.events_received():
                    if isinstance(event, Response):
                        if event.status_code != 101:
                            return Outcome("http", event.status_code)
                        continue
                    assert isinstance(event, Frame)
                    if event.opcode is Opcode.TEXT:
                        assert json.loads(bytes(event.data))["type"] == "hello"
                        return Outcome("hello")
                    if event.opcode is Opcode.CLOSE:
                        assert protocol.close_rcvd is not None
                        return Outcome("close", protocol.close_rcvd.code)
        return Outcome("dropped")
    finally:
        writer.transport.abort()


def expected_for(target: bytes) -> Outcome:
    """The documented answer to an upgrade for ``target``, from the model and websockets'
    request-line limits: 414 over 8 KiB, no response for non-ASCII bytes."""
    if len(target) + len(b"GET  HTTP/1.1\r\n") > 8192:  # websockets' MAX_LINE_LENGTH
        return Outcome("http", 414)
    if not target.isascii():
        return Outcome("dropped")
    route = match_route(target.decode("ascii"))
    assert isinstance(route, ClientRoute)
    decision = validate_query(route.query)
    if isinstance(decision, Accept):
        return Outcome("hello")
    return Outcome("close", int(decision.code))


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
@given(query=queries())
def test_generated_query_strings_get_their_documented_answer(hostile: Hostile, query: str) -> None:
    target = f"/ws/client?{query}".encode("utf-8", "surrogatepass")
    assert run(raw_upgrade(hostile.port, target)) == expected_for(target)
    assert hostile.process.poll() is None


def test_after_the_generated_queries_the_server_serves_normally(hostile: Hostile) -> None:
    after_the_case(hostile)


# ---- generated frames ---------------------------------------------------------------------------

MIB = 1 << 20


def _nested(depth: int) -> str:
    return '{"type":"deep","v":' + "[" * depth + "]" * depth + "}"


def _big_string(size: int) -> str:
    head = '{"type":"big","s":"'
    return head + "x" * (size - len(head) - 2) + '"}'


TEXT_FRAMES = st.one_of(
    st.text(max_size=200),
    st.builds(json.dumps, st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)),
    st.builds(
        lambda kind, extra: json.dumps({"type": kind, **extra}),
        st.text(max_size=12),
        st.dictionaries(st.text(max_size=5), st.integers() | st.floats(allow_nan=False)),
    ),
    st.integers(1, 3_000).map(_nested),
    st.integers(1, 12_000).map(lambda n: '{"type":"num","n":' + "9" * n + "}"),
    st.sampled_from(["1e999", "-1e999", "1e-999", "NaN", "Infinity", "-0", "1" * 5000]).map(
        lambda n: '{"type":"num","n":' + n + "}"
    ),
    st.sampled_from(['{"type":"ping"}', '{"type":"status"}', '{"type":"pong"}', "[]", "null"]),
    st.sampled_from([MIB - 1, MIB, MIB + 1, MIB + 4096]).map(_big_string),
)
FRAMES = st.one_of(TEXT_FRAMES, st.binary(max_size=2048), st.just(b"\x00" * (MIB + 1)))


def expected_reply(frame: str | bytes) -> tuple[str, str | int | None]:
    """The documented answer to ``frame``, from a fresh ServerSession fed the same frame:
    ``("reply", type or error code)`` or ``("close", code)``; ``("none", None)`` for a pong."""
    session = ServerSession(ServerConfig())
    session.open("client_id=h", now=0.0, wall=WALL, request_id="r")
    if isinstance(frame, str):
        actions = session.receive_text(frame, now=0.0, wall=WALL)
    else:
        actions = session.receive_bytes(frame, now=0.0, wall=WALL)
    if not actions:
        return ("none", None)
    action = actions[0]
    if isinstance(action, Close):
        return ("close", action.code)
    if isinstance(action, Deliver):
        return ("reply", "echo")  # the default handler
    assert isinstance(action, SendText)
    reply = json.loads(action.text)
    return ("reply", reply.get("error_code", reply["type"]))


async def send_frame(url: str, frame: str | bytes) -> tuple[str, str | int | None]:
    async with connect(
        f"{url}/ws/client?client_id=h", proxy=None, open_timeout=TIMEOUT, max_size=4 * MIB
    ) as ws:
        assert (await recv_json(ws))["type"] == "hello"
        await ws.send(frame)
        # A marker after the frame: whatever comes before its echo is the frame's answer.
        with contextlib.suppress(ConnectionClosed):
            await ws.send('{"type":"marker-9f2c"}')
        rcvd = None
        try:
            first = await recv_json(ws)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
        if rcvd is not None:
            return ("close", rcvd.code)
        if first["type"] == "echo" and first["original_message"] == {"type": "marker-9f2c"}:
            return ("none", None)
        return ("reply", first.get("error_code", first["type"]))


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
@given(frame=FRAMES)
def test_generated_frames_get_their_documented_answer(hostile: Hostile, frame: str | bytes) -> None:
    assert run(send_frame(hostile.url, frame)) == expected_reply(frame)
    assert hostile.process.poll() is None


@pytest.mark.parametrize(
    ("frame", "answer"),
    [
        (_nested(100_000), ("reply", "INVALID_JSON")),
        ('{"type":"num","n":' + "9" * 100_000 + "}", ("reply", "INVALID_JSON")),
        ('{"type":"num","n":1e999}', ("reply", "INVALID_JSON")),
        (_big_string(MIB), ("reply", "echo")),
        (_big_string(MIB + 1), ("close", 1009)),
        (b"\xff" * 1000, ("reply", "UNSUPPORTED_DATA")),
    ],
    ids=["nested-100k", "100k-digits", "1e999", "1MiB-string", "1MiB+1", "binary"],
)
def test_the_hand_picked_hostile_frames_get_their_documented_answer(
    hostile: Hostile, frame: str | bytes, answer: tuple[str, str | int]
) -> None:
    assert expected_reply(frame) == answer
    assert run(send_frame(hostile.url, frame)) == answer
    after_the_case(hostile)


# ---- hand-made: fragments, floods, a client that never reads, slowloris -------------------------


def test_fragmented_frames_are_reassembled_and_an_oversize_total_is_1009(hostile: Hostile) -> None:
    async def body() -> tuple[dict[str, Any], int | None]:
        async with connect(f"{hostile.url}/ws/client?client_id=frag", proxy=None) as ws:
            await recv_json(ws)
            pieces = ['{"type":"frag",', '"text":"', "a" * 1000, "b" * 1000, '"}']
            await ws.send(iter(pieces))
            echo = await recv_json(ws)
            half = "x" * (600 * 1024)
            await ws.send(iter(['{"type":"frag","text":"', half, half, '"}']))
            rcvd = None
            try:
                await recv_json(ws)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
            return echo, None if rcvd is None else rcvd.code

    echo, code = run(body())
    assert echo["type"] == "echo"
    assert echo["original_message"]["text"] == "a" * 1000 + "b" * 1000
    assert code == 1009
    after_the_case(hostile)


def test_a_ping_flood_is_answered_in_full_and_the_connection_stays_open(hostile: Hostile) -> None:
    count = 20_000 if HEAVY else 2_000

    async def body() -> tuple[int, int, str]:
        async with connect(f"{hostile.url}/ws/client?client_id=flood", proxy=None) as ws:
            await recv_json(ws)
            waiters = [await ws.ping() for _ in range(count)]  # protocol-level Ping frames
            for _ in range(count):
                await ws.send('{"type":"ping"}')  # JSON pings
            pongs = 0
            async with asyncio.timeout(4 * TIMEOUT):
                while pongs < count:
                    if (await recv_json(ws))["type"] == "pong":
                        pongs += 1
                done = sum(1 for w in await asyncio.gather(*waiters) if w is not None)
            await ws.send('{"type":"status"}')
            return pongs, done, (await recv_json(ws))["type"]

    assert run(body()) == (count, count, "status")
    after_the_case(hostile)


def test_a_client_that_never_reads_is_dropped_with_its_pushes_refused_and_memory_bounded(
    hostile: Hostile,
) -> None:
    """It asks for echoes of 64 KiB and reads nothing for three connection timeouts. The
    echoes pile up in its connection's outbox until the next one does not fit (4 MiB by
    default) and is refused; the writer's frame stalls, and after the connection timeout the
    server aborts the connection (no close frame could reach a client that does not read). Its
    RSS stays bounded.

    The silent window is timed from the first request, not by the requests: the server reads
    and refuses faster than the client writes, so all 2,048 can be sent in well under the
    connection timeout, and a client that reads again within that bound is a slow reader the
    server rightly keeps, not one that never reads."""
    offered = 2_048  # 128 MiB of echo requests

    async def body() -> tuple[int, int, int | None, bool]:
        payload = json.dumps({"type": "hog", "s": "y" * 65_000})
        # No compression: 64 KiB of one letter would deflate to almost nothing.
        async with connect(
            f"{hostile.url}/ws/client?client_id=hog",
            proxy=None,
            max_size=None,
            compression=None,
        ) as ws:
            await recv_json(ws)
            sent = 0
            loop = asyncio.get_running_loop()
            silent_until = loop.time() + 3 * CONNECTION_TIMEOUT_MS * MS
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                async with asyncio.timeout_at(silent_until):
                    for _ in range(offered):
                        await ws.send(payload)
                        sent += 1
                        if sent % 64 == 0:
                            hostile.sample()
            # Still not reading until the window is over, however early the sends finished.
            while (left := silent_until - loop.time()) > 0:
                hostile.sample()
                await asyncio.sleep(min(left, 100 * MS))
            peak = hostile.sample()
            # Now read: what the server managed to send, then the abort (no close frame).
            rcvd_code: int | None = -1
            try:
                async with asyncio.timeout(4 * TIMEOUT):
                    while True:
                        await ws.recv()
            except ConnectionClosed as exc:
                rcvd_code = None if exc.rcvd is None else exc.rcvd.code
            return sent, peak, rcvd_code, hostile.process.poll() is None

    sent, peak, code, alive = run(body())
    assert alive
    assert sent > 0
    assert peak - hostile.baseline_kib < RSS_BOUND_KIB
    assert code is None  # aborted: no close frame could reach a client that does not read
    log = hostile.log.read_text()
    assert "refused: " in log
    assert "did not take a frame within" in log
    after_the_case(hostile)


def test_a_flood_of_connections_opened_and_dropped_leaves_the_server_serving(
    hostile: Hostile,
) -> None:
    total = 3_000 if HEAVY else 300
    batch = 50

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
        try:
            if i % 3 == 1:  # half a request, then gone
                writer.write(b"GET /ws/client?client_id=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            elif i % 3 == 2:  # a full upgrade, then gone without a close frame
                protocol = ClientProtocol(
                    parse_uri(f"ws://127.0.0.1:{hostile.port}/ws/client?client_id=f{i}")
                )
                protocol.send_request(protocol.connect())
                writer.write(b"".join(protocol.data_to_send()))
                async with asyncio.timeout(TIMEOUT):
                    await reader.read(1)
            await writer.drain()
        finally:
            writer.transport.abort()

    async def body() -> None:
        for start in range(0, total, batch):
            async with asyncio.TaskGroup() as group:
                for i in range(start, min(total, start + batch)):
                    group.create_task(one(i))
            hostile.sample()

    run(body())
    after_the_case(hostile)

    # Every upgraded connection also ended: the log pairs each connect with a disconnect.
    def pairs() -> tuple[int, int]:
        text = hostile.log.read_text()
        return text.count(" connected from "), text.count(" disconnected: ")

    deadline = time.monotonic() + 10
    while (counts := pairs())[0] != counts[1] and time.monotonic() < deadline:
        time.sleep(10 * MS)
    assert counts[0] == counts[1]


def test_slowloris_connections_are_dropped_at_the_handshake_timeout_while_others_are_served(
    hostile: Hostile,
) -> None:
    """Each trickles its upgrade request a byte every 50 ms and would need about 10 s; the
    server drops each one at its opening-handshake timeout (the connection timeout, 1 s here),
    and serves a normal client meanwhile."""
    count = 300 if HEAVY else 40
    request = (
        b"GET /ws/client?client_id=slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Padding: " + b"p" * 40 + b"\r\n\r\n"
    )

    async def trickle() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
        sent = 0
        try:
            async with asyncio.timeout(4 * TIMEOUT):
                for byte in request:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    sent += 1
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(50 * MS):
                            data = await reader.read(65536)
                            return sent, "eof" if not data else data[:12].decode("latin-1")
            return sent, "completed"
        except (ConnectionResetError, BrokenPipeError):
            return sent, "reset"
        finally:
            writer.transport.abort()

    async def body() -> tuple[list[tuple[int, str]], bool]:
        async with asyncio.TaskGroup() as group:
            slow = [group.create_task(trickle()) for _ in range(count)]
            await asyncio.sleep(200 * MS)
            served = await answers_normally(hostile)
        return [task.result() for task in slow], served

    results, served = run(body())
    assert served
    assert all(outcome in {"eof", "reset"} for _, outcome in results), results
    assert max(sent for sent, _ in results) < len(request)
    after_the_case(hostile)


def test_after_all_of_it_the_server_is_alive_and_its_memory_bounded(
    hostile: Hostile, summary: Any
) -> None:
    after_the_case(hostile)
    summary(
        "hostile: server memory",
        f"RSS baseline {hostile.baseline_kib // 1024} MiB, peak {hostile.peak_kib // 1024} MiB "
        f"(bound: baseline + {RSS_BOUND_KIB // 1024} MiB); {EXAMPLES} examples per generator",
    )
    assert hostile.peak_kib - hostile.baseline_kib < RSS_BOUND_KIB
