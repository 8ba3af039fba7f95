"""1. The client message path: WebSocketManager against a hand-written websockets loop.

One bench server (its own process, its own core) speaks just enough of the protocol: the
opening handshake, a valid hello (heartbeat interval 10 min, so no ping interferes), and two
commands. ``recv``: write N pre-encoded ~100-byte JSON messages and an end marker as fast as
the socket takes them. ``send``: count N data frames without decoding them, then answer
``bench_done``. It is written on a bare asyncio protocol so that it costs a small fraction of
what either client spends per message: the clients are measured, not the server.

The clients run in a second process, alternating raw and managed runs:

- raw: ``websockets.asyncio.client.connect`` and a loop doing ``json.loads`` per received
  message, or ``json.dumps`` + ``await ws.send`` per sent one;
- managed: ``WebSocketManager`` with a message listener attached (it counts) and its stats on
  (they always are); ``send()`` per message.

Both send the same dict per message (``type``, ``seq``, ``payload``, ``timestamp``). The
third row lets the manager add the timestamp itself (its default behaviour when a message has
none), against the same raw baseline.
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
from steadysocket.model.protocol import make_hello
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import WebSocketManager

TIMESTAMP = "2025-01-01T00:00:00.000Z"
SEQ_BASE = 100_000
"""Sequence numbers start here, so every message has the same length (6 digits)."""
RUN_TIMEOUT_S = 120.0
MAX_OFFERS = 1_000_000
"""How many times the managed send loop offers one message before it gives up."""


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


class _BlastProtocol(asyncio.Protocol):
    """One connection to the bench server."""

    blobs: ClassVar[dict[int, bytes]] = {}

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upgraded = False
        self.parser = wire.FrameParser()
        self.remaining = 0

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
            hello = make_hello(
                now=datetime.now(UTC),
                client_id=query.get("client_id", ["bench"])[0],
                request_id=str(uuid.uuid4()),
                heartbeat_interval_ms=600_000,
            ).serialize()
            self.transport.write(
                wire.upgrade_response(headers["sec-websocket-key"])
                + wire.server_frame(wire.OP_TEXT, hello.encode())
            )
            data = rest
        self.parser.feed(data)
        self._frames()

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
                if not self.remaining:
                    self.transport.write(wire.server_frame(wire.OP_TEXT, b'{"type":"bench_done"}'))
                continue
            assert payload is not None
            command = json.loads(payload)
            if command.get("type") != "bench_start":
                continue
            count = int(command["count"])
            if command["mode"] == "recv":
                self.transport.write(self._blob(count))
            else:
                self.remaining = count

    @classmethod
    def _blob(cls, count: int) -> bytes:
        blob = cls.blobs.get(count)
        if blob is None:
            frames = [
                wire.server_frame(
                    wire.OP_TEXT,
                    json.dumps(_message(SEQ_BASE + i, PAYLOAD), separators=(",", ":")).encode(),
                )
                for i in range(count)
            ]
            frames.append(wire.server_frame(wire.OP_TEXT, b'{"type":"bench_end"}'))
            blob = cls.blobs[count] = b"".join(frames)
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
    url: str, body: Callable[[WebSocketManager, asyncio.Event], Awaitable[float]]
) -> float:
    manager = WebSocketManager(url, "bench-client", environ={})
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
        return await body(manager, finished)
    finally:
        await manager.destroy()


async def _managed_recv(url: str, count: int) -> float:
    async def body(manager: WebSocketManager, finished: asyncio.Event) -> float:
        before = manager.get_state().stats.messages_received
        start = time.perf_counter()
        assert manager.send({"type": "bench_start", "mode": "recv", "count": count})
        await finished.wait()
        elapsed = time.perf_counter() - start
        received = manager.get_state().stats.messages_received - before
        assert received == count + 1, (received, count)
        return count / elapsed

    return await _managed(url, body)


async def _managed_send(url: str, count: int, stamped: bool) -> float:
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

    return await _managed(url, body)


RUNNERS: dict[str, Callable[[str, int], Awaitable[float]]] = {
    "recv/raw": _raw_recv,
    "recv/managed": _managed_recv,
    "send/raw": lambda url, n: _raw_send(url, n, True),
    "send/managed": lambda url, n: _managed_send(url, n, True),
    "send-stamp/managed": lambda url, n: _managed_send(url, n, False),
}


def _client_main(
    conn: multiprocessing.connection.Connection,
    port: int,
    count: int,
    repeats: int,
    profile_count: int,
) -> None:
    url = f"ws://127.0.0.1:{port}"

    watch = GcWatch()
    gc_us: dict[str, list[float]] = {name: [] for name in RUNNERS}

    async def one(name: str, n: int) -> float:
        watch.reset()
        async with asyncio.timeout(RUN_TIMEOUT_S):
            rate = await RUNNERS[name](url, n)
        gc_us[name].append(watch.total_s / n * 1e6)
        return rate

    async def main() -> dict[str, Any]:
        # Warm up both paths (imports, caches, the server's blob).
        for name in RUNNERS:
            await one(name, min(count, 2000))
        for figures in gc_us.values():
            figures.clear()
        rates: dict[str, list[float]] = {name: [] for name in RUNNERS}
        names = list(RUNNERS)
        for r in range(repeats):
            # Alternate the order, so a drift in machine load hits both sides alike.
            for name in names if r % 2 == 0 else reversed(names):
                rates[name].append(await one(name, count))
        timed_gc_us = {name: list(figures) for name, figures in gc_us.items()}
        profiles = {}
        for name in ("recv/managed", "send/managed", "recv/raw", "send/raw"):
            profile = cProfile.Profile()
            profile.enable()
            await one(name, profile_count)
            profile.disable()
            profiles[name] = top(profile, 14)
        return {"rates": rates, "profiles": profiles, "gc_us": timed_gc_us}

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
        "client is the bottleneck. No compression (the bench server negotiates none).",
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

    section.rows = [
        row("received, listener attached", "recv/managed", "recv/raw"),
        row("sent, message has its timestamp", "send/managed", "send/raw"),
        row("sent, manager adds the timestamp", "send-stamp/managed", "send/raw"),
    ]
    gc_us: dict[str, list[float]] = result["gc_us"]
    section.rows.append(
        Row(
            "garbage collection per message: received / sent / sent, stamped",
            " / ".join(
                f"{median(gc_us[n]):.2f} µs"
                for n in ("recv/managed", "send/managed", "send-stamp/managed")
            ),
            " / ".join(f"{median(gc_us[n]):.2f} µs" for n in ("recv/raw", "send/raw", "send/raw")),
        )
    )
    for name, profile in result["profiles"].items():
        section.blocks.append(render(f"Profile of one `{name}` run", profile, profile_count))
    section.seconds = time.monotonic() - started
    return section
