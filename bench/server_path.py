"""6. The server message path: messages handled per second by ``SteadyServer``, v2 against v1.

The server under test runs alone in its own process, pinned to the server core: a
``SteadyServer`` with its defaults (permessage-deflate on, heartbeat 25 s, default
``DeliveryConfig``: acks every 32 ids or 50 ms) and two handlers, ``bench`` (counts) and
``bench_end`` (answers ``bench_done`` with ``client.send``). A load generator in a second
process on the other core (``bench.loadgen``, a bare asyncio protocol: far cheaper per message
than the server) opens a few connections with ``version=1`` or ``version=2``, reads the hello,
then writes on each connection, at once, a pre-encoded blob of masked frames: the same ~100-byte
``bench`` message (in v2 with its ``id``, 1 to M, first), then ``bench_end``. A run ends when
every connection has its ``bench_done``; the v2 run also checks that the server acknowledged
every id (the last ack may follow up to ``ack_interval_ms`` later, outside the timed span).

So every message costs the server a read, a decode, a handler run in order and, in v2, the
id check and its share of the batched acks. Runs alternate between v1 and v2 clients, on the
same server process.

Figures: messages handled per second (wall clock), and the server's CPU time per message, which
does not depend on what else the machine is doing.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import multiprocessing.connection
import time
from functools import partial
from typing import Any, ClassVar

from bench import wire
from bench.common import (
    CLIENT_CPU,
    SERVER_CPU,
    BenchError,
    Child,
    GcWatch,
    Inbox,
    OtherLoad,
    Row,
    Section,
    Sizes,
    fmt,
    median,
    proc_cpu_seconds,
    ratio,
    spread,
)
from bench.loadgen import LoadClient
from bench.profiling import render, top
from steadysocket.model.delivery import DeliveryConfig, number
from steadysocket.runtime.server import Client, SteadyServer

TIMESTAMP = "2025-01-01T00:00:00.000Z"
SEQ_BASE = 100_000
V2_MIN_RATIO = 0.9
V2_GOAL = "≥ 0.9x v1"
"""Issue 11 point 5: acks are batched, so v2 keeps at least 0.9x v1's throughput."""
FINAL_ACK_S = 5.0
"""How long a v2 run waits, after the last ``bench_done``, for the ack of the last id."""


def _text(seq: int) -> str:
    base = json.dumps(
        {"type": "bench", "seq": seq, "payload": "", "timestamp": TIMESTAMP},
        separators=(",", ":"),
    )
    return base.replace('"payload":""', '"payload":"' + "x" * (100 - len(base)) + '"')


MESSAGE_BYTES = len(_text(SEQ_BASE))


# -- the server -----------------------------------------------------------------------------


def _server_main(conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        watch = GcWatch()
        server = SteadyServer("127.0.0.1", 0, environ={}, delivery=DeliveryConfig())
        handled = {"count": 0}

        @server.on_message("bench")
        async def bench(message: dict[str, Any], client: Client) -> None:
            handled["count"] += 1

        @server.on_message("bench_end")
        async def bench_end(message: dict[str, Any], client: Client) -> None:
            await client.send({"type": "bench_done", "handled": handled["count"]})

        await server.start()
        inbox = Inbox(conn)
        inbox.reply(server.port)
        profile: cProfile.Profile | None = None
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "gc":
                inbox.reply({**watch.summary(), "handled": handled["count"]})
                watch.reset()
            elif command[0] == "profile_on":
                profile = cProfile.Profile()
                profile.enable()
                inbox.reply(True)
            elif command[0] == "profile_off" and profile is not None:
                profile.disable()
                inbox.reply(top(profile, 14))
        await server.close()
        inbox.close()

    asyncio.run(main())


# -- the load generator ---------------------------------------------------------------------


class _BlastClient(LoadClient):
    """Read the hello, write the blob, wait for ``bench_done`` (and in v2 the last ack)."""

    blobs: ClassVar[dict[tuple[int, int], bytes]] = {}

    def __init__(self, path: str, host: str, version: int, count: int) -> None:
        super().__init__(path, host)
        loop = asyncio.get_running_loop()
        self.version, self.count = version, count
        self.hello: asyncio.Future[bool] = loop.create_future()
        self.done: asyncio.Future[float] = loop.create_future()
        """Resolves to the perf_counter time ``bench_done`` arrived."""
        self.acked = 0
        self.all_acked: asyncio.Future[None] = loop.create_future()

    def on_text(self, payload: bytes) -> None:
        if not self.hello.done():
            self.hello.set_result(json.loads(payload).get("type") == "hello")
            return
        if payload.startswith(b'{"type":"ack"'):
            self.acked = int(json.loads(payload)["id"])
            if self.acked >= self.count + 1 and not self.all_acked.done():
                self.all_acked.set_result(None)
        elif b'"bench_done"' in payload and not self.done.done():
            self.done.set_result(time.perf_counter())

    def on_lost(self) -> None:
        for future in (self.hello, self.done):
            if not future.done():
                future.set_exception(BenchError("the server closed the connection"))

    def blast(self) -> None:
        """Write every message and the end marker at once."""
        assert self.transport is not None
        self.transport.write(self.blob(self.version, self.count))

    @classmethod
    def blob(cls, version: int, count: int) -> bytes:
        """``count`` bench messages and ``bench_end``, masked; ids 1 to count + 1 in v2."""
        blob = cls.blobs.get((version, count))
        if blob is None:
            texts = [_text(SEQ_BASE + i % 900_000) for i in range(count)]
            texts.append(f'{{"type":"bench_end","timestamp":"{TIMESTAMP}"}}')
            if version == 2:
                texts = [number(text, "id", i + 1) for i, text in enumerate(texts)]
            blob = b"".join(wire.masked_constant(wire.OP_TEXT, t.encode()) for t in texts)
            cls.blobs[(version, count)] = blob
        return blob


async def _run(port: int, version: int, connections: int, count: int, limit_s: float) -> Any:
    loop = asyncio.get_running_loop()
    host = f"127.0.0.1:{port}"
    clients: list[_BlastClient] = []
    _BlastClient.blob(version, count)  # built before the clock starts
    try:
        async with asyncio.timeout(limit_s):
            for i in range(connections):
                path = f"/ws/client?client_id=sp-{i}&version={version}&role=frontend"
                _, client = await loop.create_connection(
                    partial(_BlastClient, path, host, version, count), "127.0.0.1", port
                )
                clients.append(client)
            for client in clients:
                if not await client.hello:
                    raise BenchError("no hello")
            cpu0 = time.process_time()
            start = time.perf_counter()
            for client in clients:
                client.blast()
            ends = [await client.done for client in clients]
            elapsed = max(ends) - start
            client_cpu = time.process_time() - cpu0
            if version == 2:
                for client in clients:
                    async with asyncio.timeout(FINAL_ACK_S):
                        await client.all_acked
    finally:
        for client in clients:
            client.send_close(1000)
        for client in clients:
            try:
                async with asyncio.timeout(5):
                    await client.lost
            except TimeoutError:
                client.abort()
    return {"elapsed": elapsed, "client_cpu": client_cpu}


def _client_main(conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        inbox = Inbox(conn)
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            _, port, version, connections, count, limit_s = command
            inbox.reply(await _run(port, version, connections, count, limit_s))
        inbox.close()

    asyncio.run(main())


# -- the benchmark --------------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    """Run benchmark 6 and report it."""
    connections: int = sizes.pick(8, 4)
    count: int = sizes.pick(25_000, 2_500)
    repeats: int = sizes.pick(5, 3)
    total = connections * count
    limit_s = 30.0 + total / 2_000
    section = Section(
        "server_path",
        "6. Server message path: protocol v2 against v1",
        f"{connections} connections, each writing {count:,} ~{MESSAGE_BYTES}-byte messages at "
        f"once ({total:,} per run), each handled by a `SteadyServer` handler; v2 messages carry "
        "their `id` and the server acks them (batched, every 32 or 50 ms). Median of "
        f"{repeats} runs per version, alternating, on one server process. Server and load "
        "generator in separate processes on separate cores.",
    )
    started = time.monotonic()
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu_us: dict[int, list[float]] = {1: [], 2: []}
    gc_us: dict[int, list[float]] = {1: [], 2: []}
    client_us: list[float] = []
    others: list[float] = []
    profiles: dict[int, Any] = {}
    with (
        Child(_server_main, cpu=SERVER_CPU, name="steady-server") as server,
        Child(_client_main, cpu=CLIENT_CPU, name="message-load") as client,
    ):
        port = server.receive(30)

        def one(version: int, n: int) -> tuple[dict[str, Any], float, dict[str, Any]]:
            server.call(("gc",), 30)
            cpu0 = proc_cpu_seconds(server.pid)
            result = client.call(("run", port, version, connections, n, limit_s), limit_s + 30)
            cpu = proc_cpu_seconds(server.pid) - cpu0
            summary = server.call(("gc",), 30)
            return result, cpu, summary

        for version in (1, 2):  # warm-up
            one(version, min(count, 1_000))
        for rep in range(repeats):
            for version in (1, 2) if rep % 2 == 0 else (2, 1):
                other = OtherLoad()
                client_cpu0 = proc_cpu_seconds(client.pid)
                handled0 = server.call(("gc",), 30)["handled"]
                result, cpu, summary = one(version, count)
                if summary["handled"] - handled0 != total:
                    raise BenchError(
                        f"v{version}: {summary['handled'] - handled0} of {total} handled"
                    )
                others.append(other.cores(cpu + proc_cpu_seconds(client.pid) - client_cpu0))
                rates[version].append(total / result["elapsed"])
                cpu_us[version].append(cpu / total * 1e6)
                gc_us[version].append(summary["total_s"] / total * 1e6)
                client_us.append(result["client_cpu"] / total * 1e6)
        for version in (1, 2):
            server.call(("profile_on",), 30)
            client.call(("run", port, version, connections, count, limit_s), limit_s + 30)
            profiles[version] = server.call(("profile_off",), 60)
    value, base = median(rates[2]), median(rates[1])
    r = ratio(value, base)
    cpu_ratio = ratio(median(cpu_us[2]), median(cpu_us[1]))
    section.rows = [
        Row(
            "messages handled per second, v2 clients (acks included) against v1 clients",
            f"{fmt(value)} msgs/s (runs {spread(rates[2])})",
            f"v1: {fmt(base)} msgs/s (runs {spread(rates[1])})",
            r,
            V2_GOAL,
            r is not None and r >= V2_MIN_RATIO,
        ),
        Row(
            "server CPU per message handled",
            f"{fmt(median(cpu_us[2]), 1)} µs",
            f"v1: {fmt(median(cpu_us[1]), 1)} µs",
            cpu_ratio,
        ),
        Row(
            "of which garbage collection",
            f"{fmt(median(gc_us[2]), 2)} µs",
            f"v1: {fmt(median(gc_us[1]), 2)} µs",
            ratio(median(gc_us[2]), median(gc_us[1])),
        ),
        Row(
            "load generator CPU per message; others' load",
            f"{fmt(median(client_us), 1)} µs; {fmt(median(others), 2)} cores (median)",
        ),
    ]
    for version, profile in profiles.items():
        title = f"Profile of the server handling {total:,} messages from v{version} clients"
        section.blocks.append(render(title, profile, total))
    section.seconds = time.monotonic() - started
    return section
