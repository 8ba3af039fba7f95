"""1. The client message path: WebSocketManager against a hand-written websockets loop.

One bench server (its own process, its own core) speaks just enough of the protocol: the
opening handshake, a valid hello (heartbeat interval 10 min, so no ping interferes), and two
commands. ``recv``: write N pre-encoded ~100-byte JSON messages and an end marker as fast as
the socket takes them. ``send``: count N data frames without decoding them, then answer
``bench_done``. It is written on a bare asyncio protocol so that it costs a small fraction of
what either client spends per message: the clients are measured, not the server.

It speaks protocol v2 to a client that asks ``version=2``, just as cheaply: a v2 hello (a new
session), ``recv`` frames pre-encoded with their ``offset`` (1 to N, then the end marker), the
client's offset acks read and ignored, and in ``send`` mode a cumulative ``{"type":"ack","id"}``
every 32 frames and at the end, counted rather than decoded (ids run from 1 in a session, and
the command itself is id 1).

The clients run in a second process, alternating raw and managed runs:

- raw: ``websockets.asyncio.client.connect`` and a loop doing ``json.loads`` per received
  message, or ``json.dumps`` + ``await ws.send`` per sent one;
- managed: ``WebSocketManager`` with a message listener attached (it counts) and its stats on
  (they always are); ``send()`` per message.

Both send the same dict per message (``type``, ``seq``, ``payload``, ``timestamp``). The
third row lets the manager add the timestamp itself (its default behaviour when a message has
none), against the same raw baseline.

The managed runs are repeated with ``version=2`` (default ``DeliveryConfig``: acks every 32
messages or 50 ms; outbox bounded by ``send_queue_limit``, 1000): every message sent gets its
``id`` and waits in the outbox for the server's ack, every message received has its ``offset``
checked and acked. Those rows are set against the managed v1 row of the same run.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import multiprocessing.connection
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import connect

from bench import wire
from bench.common import (
    CLIENT_CPU,
    SERVER_CPU,
    BenchError,
    Child,
    GcWatch,
    Inbox,
    Row,
    Section,
    Sizes,
    fmt,
    median,
    ratio,
    spread,
)
from bench.profiling import render, top
from steadysocket.model.delivery import number
from steadysocket.model.protocol import HelloSession, make_hello, use_fast_json
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import WebSocketManager

TIMESTAMP = "2025-01-01T00:00:00.000Z"
SEQ_BASE = 100_000
"""Sequence numbers start here, so every message has the same length (6 digits)."""
RUN_TIMEOUT_S = 120.0
MAX_OFFERS = 1_000_000
"""How many times the managed send loop offers one message before it gives up."""
ACK_EVERY = 32
V2_MIN_RATIO = 0.9
V2_GOAL = "≥ 0.9x v1"
"""Issue 11 point 5: acks are batched, so v2 keeps at least 0.9x v1's throughput."""
"""The bench server acks v2 ids every this many frames (the default ``ack_every``)."""


def _message(seq: int, payload: str, *, stamped: bool = True) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "bench", "seq": seq, "payload": payload}
    if stamped:
        message["timestamp"] = TIMESTAMP
    return message


def _payload() -> str:
    """Padding that makes one message exactly 100 bytes of compact JSON."""
    base = json.dumps(_message(SEQ_BASE, ""), separators=(",", ":"))
    return "x" * (100 - len(base))


PAYLOAD = _payload()
MESSAGE_BYTES = len(json.dumps(_message(SEQ_BASE, PAYLOAD), separators=(",", ":")))


# -- the bench server -----------------------------------------------------------------------


def _ack_frame(upto: int) -> bytes:
    """The server's cumulative v2 ack of ids up to ``upto``, framed."""
    text = f'{{"type":"ack","id":{upto},"timestamp":"{TIMESTAMP}"}}'
    return wire.server_frame(wire.OP_TEXT, text.encode())


class _BlastProtocol(asyncio.Protocol):
    """One connection to the bench server."""

    blobs: ClassVar[dict[tuple[int, bool], bytes]] = {}

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upgraded = False
        self.parser = wire.FrameParser()
        self.remaining = 0
        self.v2 = False
        self.counted = 0
        """v2 ``send`` mode: data frames counted so far (each one id after the command's)."""
        self.command_id = 0
        """v2: the id of the last command, which the ids of the data frames follow."""
        self.next_offset = 1
        """v2: the offset of the next application message this connection sends."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.upgraded:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > wire.MAX_HEAD_BYTES:
                    self.transport.abort()
                return
            first, headers = wire.parse_head(bytes(self.head[:end]))
            rest = bytes(self.head[end + 4 :])
            self.upgraded = True
            query = parse_qs(urlsplit(first.split(" ")[1]).query)
            self.v2 = query.get("version", ["1"])[0] == "2"
            session = None
            if self.v2:
                session = HelloSession(
                    session_id=uuid.uuid4().hex,
                    epoch="bench",
                    resumed=False,
                    max_message_bytes=1 << 20,
                    resume_outcome="new",
                )
            hello = make_hello(
                now=datetime.now(UTC),
                client_id=query.get("client_id", ["bench"])[0],
                request_id=str(uuid.uuid4()),
                heartbeat_interval_ms=600_000,
                version=2 if self.v2 else 1,
                session=session,
            ).serialize()
            self.transport.write(
                wire.upgrade_response(headers["sec-websocket-key"])
                + wire.server_frame(wire.OP_TEXT, hello.encode())
            )
            data = rest
        self.parser.feed(data)
        self._frames()

    def _reply(self, text: str) -> bytes:
        """An application message to the client, numbered in v2."""
        assert self.transport is not None
        if self.v2:
            text = number(text, "offset", self.next_offset)
            self.next_offset += 1
        return wire.server_frame(wire.OP_TEXT, text.encode())

    def _frames(self) -> None:
        assert self.transport is not None
        for _ in range(1 << 30):  # bounded: ends when the buffer has no complete frame
            frame = self.parser.next(want_payload=self.remaining == 0)
            if frame is None:
                return
            opcode, _, payload = frame
            if opcode == wire.OP_CLOSE:
                assert payload is not None
                self.transport.write(wire.server_frame(wire.OP_CLOSE, payload[:2]))
                self.transport.close()
                return
            if opcode == wire.OP_PING:
                self.transport.write(wire.server_frame(wire.OP_PONG, payload or b""))
                continue
            if opcode != wire.OP_TEXT:
                continue
            if self.remaining:
                self.remaining -= 1
                if self.v2:
                    # Ids follow the command's, one per frame: ack by count, no decoding.
                    self.counted += 1
                    if self.counted % ACK_EVERY == 0 or not self.remaining:
                        self.transport.write(_ack_frame(self.command_id + self.counted))
                if not self.remaining:
                    self.transport.write(self._reply('{"type":"bench_done"}'))
                continue
            assert payload is not None
            command = json.loads(payload)  # a command, or (v2) the client's offset ack
            if command.get("type") != "bench_start":
                continue
            count = int(command["count"])
            if self.v2:
                self.command_id = int(command["id"])
                self.transport.write(_ack_frame(self.command_id))
            if command["mode"] == "recv":
                if self.next_offset != 1:  # the blob's offsets start at 1
                    raise BenchError("recv must be the first command on a v2 connection")
                self.transport.write(self._blob(count, self.v2))
                self.next_offset += count + 1
            else:
                self.remaining = count
                self.counted = 0

    @classmethod
    def _blob(cls, count: int, v2: bool) -> bytes:
        """``count`` messages and the end marker, with offsets 1 to count + 1 in v2 (the
        command of a fresh connection: nothing was numbered before it)."""
        blob = cls.blobs.get((count, v2))
        if blob is None:
            texts = [
                json.dumps(_message(SEQ_BASE + i, PAYLOAD), separators=(",", ":"))
                for i in range(count)
            ]
            texts.append('{"type":"bench_end"}')
            if v2:
                texts = [number(text, "offset", i + 1) for i, text in enumerate(texts)]
            frames = [wire.server_frame(wire.OP_TEXT, text.encode()) for text in texts]
            blob = cls.blobs[(count, v2)] = b"".join(frames)
        return blob


def _server_main(conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_BlastProtocol, "127.0.0.1", 0)
        inbox = Inbox(conn)
        inbox.reply(server.sockets[0].getsockname()[1])
        for _ in range(1000):
            command = await inbox.get()
            if command[0] == "stop":
                break
        server.close()
        inbox.close()

    asyncio.run(main())


# -- the clients ----------------------------------------------------------------------------


async def _raw_recv(url: str, count: int) -> float:
    async with connect(url, proxy=None, ping_interval=None, open_timeout=10) as ws:
        json.loads(await ws.recv())  # the hello
        await ws.send(json.dumps({"type": "bench_start", "mode": "recv", "count": count}))
        received = 0
        start = time.perf_counter()
        for _ in range(count + 1):
            message = json.loads(await ws.recv())
            if message["type"] == "bench_end":
                break
            received += 1
        elapsed = time.perf_counter() - start
    assert received == count, (received, count)
    return count / elapsed


async def _raw_send(url: str, count: int, stamped: bool) -> float:
    del stamped  # the baseline always sends the same message
    async with connect(url, proxy=None, ping_interval=None, open_timeout=10) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "bench_start", "mode": "send", "count": count}))
        start = time.perf_counter()
        for i in range(count):
            await ws.send(json.dumps(_message(SEQ_BASE + i, PAYLOAD), separators=(",", ":")))
        done = json.loads(await ws.recv())
        elapsed = time.perf_counter() - start
    assert done["type"] == "bench_done", done
    return count / elapsed


async def _managed(
    url: str,
    body: Callable[[WebSocketManager, asyncio.Event], Awaitable[float]],
    version: int,
) -> float:
    manager = WebSocketManager(url, "bench-client", environ={}, version=version)
    finished = asyncio.Event()
    counts = {"received": 0}

    def listener(message: dict[str, Any]) -> None:
        if message["type"] in {"bench_end", "bench_done"}:
            finished.set()
        else:
            counts["received"] += 1

    manager.on_message(listener)
    try:
        await manager.connect()
        await manager.wait_for(Phase.OPEN, timeout=10)
        running = manager.get_state().protocol_version
        if running != version:
            raise BenchError(f"asked for protocol v{version}, runs v{running}")
        return await body(manager, finished)
    finally:
        await manager.destroy()


async def _managed_recv(url: str, count: int, version: int = 1) -> float:
    async def body(manager: WebSocketManager, finished: asyncio.Event) -> float:
        before = manager.get_state().stats.messages_received
        start = time.perf_counter()
        assert manager.send({"type": "bench_start", "mode": "recv", "count": count})
        await finished.wait()
        elapsed = time.perf_counter() - start
        received = manager.get_state().stats.messages_received - before
        # Frames: the messages and the end marker; in v2 also the server's ack of the command.
        assert received == count + (1 if version == 1 else 2), (received, count)
        return count / elapsed

    return await _managed(url, body, version)


async def _managed_send(url: str, count: int, stamped: bool, version: int = 1) -> float:
    async def body(manager: WebSocketManager, finished: asyncio.Event) -> float:
        assert manager.send({"type": "bench_start", "mode": "send", "count": count})
        start = time.perf_counter()
        send = manager.send
        for i in range(count):
            message = _message(SEQ_BASE + i, PAYLOAD, stamped=stamped)
            # send() refuses (False) while send_buffer_bytes wait for the writer: yield to it and
            # offer again, as the raw loop's `await ws.send()` waits for the socket.
            for _ in range(MAX_OFFERS):
                if send(message):
                    break
                await asyncio.sleep(0)
            else:
                raise BenchError(f"send() refused message {i} {MAX_OFFERS} times")
        await finished.wait()
        elapsed = time.perf_counter() - start
        assert manager.get_state().stats.messages_sent >= count
        return count / elapsed

    return await _managed(url, body, version)


RUNNERS: dict[str, Callable[[str, int], Awaitable[float]]] = {
    "recv/raw": _raw_recv,
    "recv/managed": _managed_recv,
    "send/raw": lambda url, n: _raw_send(url, n, True),
    "send/managed": lambda url, n: _managed_send(url, n, True),
    "send-stamp/managed": lambda url, n: _managed_send(url, n, False),
    "recv/v2": lambda url, n: _managed_recv(url, n, 2),
    "send/v2": lambda url, n: _managed_send(url, n, True, 2),
    "send-stamp/v2": lambda url, n: _managed_send(url, n, False, 2),
    "recv/orjson": lambda url, n: _with_fast_json(_managed_recv(url, n)),
}


async def _with_fast_json(run: Awaitable[float]) -> float:
    """One run with orjson decoding (steadysocket[fast]); every other run goes without it."""
    use_fast_json(True)
    try:
        return await run
    finally:
        use_fast_json(False)


def _client_main(
    conn: multiprocessing.connection.Connection,
    port: int,
    count: int,
    repeats: int,
    profile_count: int,
) -> None:
    url = f"ws://127.0.0.1:{port}"
    # The goals hold without orjson: only the recv/orjson run decodes with it.
    has_orjson = use_fast_json(True)
    use_fast_json(False)
    if not has_orjson:
        del RUNNERS["recv/orjson"]

    watch = GcWatch()
    gc_us: dict[str, list[float]] = {name: [] for name in RUNNERS}
    cpu_us: dict[str, list[float]] = {name: [] for name in RUNNERS}

    async def one(name: str, n: int) -> float:
        watch.reset()
        cpu0 = time.process_time()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            rate = await RUNNERS[name](url, n)
        # The whole run (connect and close included), so a little above the loop's own cost.
        cpu_us[name].append((time.process_time() - cpu0) / n * 1e6)
        gc_us[name].append(watch.total_s / n * 1e6)
        return rate

    async def main() -> dict[str, Any]:
        # Warm up both paths (imports, caches, the server's blob).
        for name in RUNNERS:
            await one(name, min(count, 2000))
        for figures in (*gc_us.values(), *cpu_us.values()):
            figures.clear()
        rates: dict[str, list[float]] = {name: [] for name in RUNNERS}
        names = list(RUNNERS)
        for r in range(repeats):
            # Alternate the order, so a drift in machine load hits both sides alike.
            for name in names if r % 2 == 0 else reversed(names):
                rates[name].append(await one(name, count))
        timed_gc_us = {name: list(figures) for name, figures in gc_us.items()}
        timed_cpu_us = {name: list(figures) for name, figures in cpu_us.items()}
        profiles = {}
        for name in ("recv/managed", "send/managed", "recv/v2", "send/v2", "recv/raw", "send/raw"):
            profile = cProfile.Profile()
            profile.enable()
            await one(name, profile_count)
            profile.disable()
            profiles[name] = top(profile, 14)
        return {
            "rates": rates,
            "profiles": profiles,
            "gc_us": timed_gc_us,
            "cpu_us": timed_cpu_us,
        }

    conn.send(asyncio.run(main()))


# -- the benchmark --------------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    """Run benchmark 1 and report it."""
    count: int = sizes.pick(100_000, 5_000)
    repeats: int = sizes.pick(5, 3)
    profile_count: int = sizes.pick(50_000, 3_000)
    section = Section(
        "client_path",
        "1. Client message path",
        f"~{MESSAGE_BYTES}-byte JSON messages over one loopback connection, client and bench "
        f"server in separate processes pinned to separate cores. {count:,} messages per run, "
        f"median of {repeats} runs per figure, raw and managed runs alternating. The bench "
        "server is a bare asyncio protocol (no websockets, no JSON on the data path), so the "
        "client is the bottleneck. No compression (the bench server negotiates none). The v2 "
        "rows run the managed client with `version=2` (ids acked by the bench server every 32 "
        "frames, offsets acked by the client) and are set against the managed v1 rows.",
    )
    started = time.monotonic()
    with Child(_server_main, cpu=SERVER_CPU, name="client-path-server") as server:
        port = server.receive(15)
        with Child(
            _client_main, port, count, repeats, profile_count, cpu=CLIENT_CPU, name="clients"
        ) as clients:
            result = clients.receive(60 + repeats * len(RUNNERS) * RUN_TIMEOUT_S)
    rates: dict[str, list[float]] = result["rates"]

    def row(label: str, managed: str, raw: str) -> Row:
        value, base = median(rates[managed]), median(rates[raw])
        r = ratio(value, base)
        return Row(
            label,
            f"{fmt(value)} msgs/s ({1e6 / value:.1f} µs/msg; runs {spread(rates[managed])})",
            f"{fmt(base)} msgs/s ({1e6 / base:.1f} µs/msg; runs {spread(rates[raw])})",
            r,
            "≥ 1.0x raw",
            r is not None and r >= 1.0,
        )

    cpu_us: dict[str, list[float]] = result["cpu_us"]

    def v2_row(label: str, v2: str, v1: str, raw: str) -> Row:
        value, base = median(rates[v2]), median(rates[v1])
        r = ratio(value, base)
        versus_raw = ratio(value, median(rates[raw]))
        return Row(
            label,
            f"{fmt(value)} msgs/s ({1e6 / value:.1f} µs/msg; runs {spread(rates[v2])}; "
            f"{'n/a' if versus_raw is None else f'{versus_raw:.2f}x'} raw; "
            f"client CPU {median(cpu_us[v2]):.1f} µs/msg)",
            f"v1: {fmt(base)} msgs/s ({1e6 / base:.1f} µs/msg; runs {spread(rates[v1])}; "
            f"client CPU {median(cpu_us[v1]):.1f} µs/msg)",
            r,
            V2_GOAL,
            r is not None and r >= V2_MIN_RATIO,
        )

    with_orjson = []
    if "recv/orjson" in rates:
        value, base = median(rates["recv/orjson"]), median(rates["recv/raw"])
        runs = spread(rates["recv/orjson"])
        with_orjson.append(
            Row(
                "received, listener attached, with orjson (steadysocket[fast])",
                f"{fmt(value)} msgs/s ({1e6 / value:.1f} µs/msg; runs {runs})",
                f"{fmt(base)} msgs/s ({1e6 / base:.1f} µs/msg)",
                ratio(value, base),
            )
        )
    section.rows = [
        row("received, listener attached", "recv/managed", "recv/raw"),
        *with_orjson,
        row("sent, message has its timestamp", "send/managed", "send/raw"),
        row("sent, manager adds the timestamp", "send-stamp/managed", "send/raw"),
        v2_row("v2: received, offsets checked and acked", "recv/v2", "recv/managed", "recv/raw"),
        v2_row(
            "v2: sent, message has its timestamp, ids acked",
            "send/v2",
            "send/managed",
            "send/raw",
        ),
        v2_row(
            "v2: sent, manager adds the timestamp, ids acked",
            "send-stamp/v2",
            "send-stamp/managed",
            "send/raw",
        ),
    ]
    gc_us: dict[str, list[float]] = result["gc_us"]
    section.rows.append(
        Row(
            "garbage collection per message: received / sent / sent, stamped (v2 in brackets)",
            " / ".join(
                f"{median(gc_us[n]):.2f} µs ({median(gc_us[n.replace('managed', 'v2')]):.2f})"
                for n in ("recv/managed", "send/managed", "send-stamp/managed")
            ),
            " / ".join(f"{median(gc_us[n]):.2f} µs" for n in ("recv/raw", "send/raw", "send/raw")),
        )
    )
    for name, profile in result["profiles"].items():
        section.blocks.append(render(f"Profile of one `{name}` run", profile, profile_count))
    section.seconds = time.monotonic() - started
    return section
