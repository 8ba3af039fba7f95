"""3. Connection setup: handshakes per second, hello included.

Two servers, each alone in its own process on the server core: ``SteadyServer`` with its
defaults, and a raw websockets server that accepts the same request and sends an equivalent
hello (``json.dumps`` of the same fields, a UUID4 and a timestamp), protocol keepalive off on
both. A load generator on the other core (``bench.loadgen``: far cheaper per connection than
either server) runs batches of connections, 32 in flight: TCP connect, upgrade (offering
permessage-deflate, as browsers do), read the hello, close with 1000, wait for TCP to close.
Batches alternate between the two servers.

Protocol v2: the same ``SteadyServer`` process also gets batches of clients asking
``version=2`` (a v2 hello: a new session, kept resumable for the window after the close, so
the server holds up to a batch's worth of sessions, one per client id), set against its v1
batches.

Figures: handshakes per second (wall clock), and the server's CPU time per handshake, which
does not depend on what else the machine is doing.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import multiprocessing.connection
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve

from bench.common import (
    CLIENT_CPU,
    SERVER_CPU,
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
from steadysocket.model.protocol import FEATURES
from steadysocket.runtime.server import SteadyServer

IN_FLIGHT = 32
HEARTBEAT_MS = 25_000


async def _raw_handler(ws: ServerConnection) -> None:
    assert ws.request is not None
    client_id = parse_qs(urlsplit(ws.request.path).query).get("client_id", [""])[0]
    wall = datetime.now(UTC)
    hello = {
        "type": "hello",
        "server_time": wall.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z",
        "accepted_version": 1,
        "features": list(FEATURES),
        "request_id": str(uuid.uuid4()),
        "client_id": client_id,
        "heartbeat_interval_ms": HEARTBEAT_MS,
    }
    await ws.send(json.dumps(hello))
    await ws.wait_closed()


def _server_main(conn: multiprocessing.connection.Connection, kind: str) -> None:
    async def main() -> None:
        watch = GcWatch()
        steady: SteadyServer | None = None
        if kind == "steady":
            steady = SteadyServer("127.0.0.1", 0, environ={})
            await steady.start()
            port = steady.port
            raw = None
        else:
            raw = await serve(_raw_handler, "127.0.0.1", 0, ping_interval=None, ping_timeout=None)
            port = raw.sockets[0].getsockname()[1]
        inbox = Inbox(conn)
        inbox.reply(port)
        profile: cProfile.Profile | None = None
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "gc":
                inbox.reply(watch.summary())
                watch.reset()
            elif command[0] == "profile_on":
                profile = cProfile.Profile()
                profile.enable()
                inbox.reply(True)
            elif command[0] == "profile_off" and profile is not None:
                profile.disable()
                inbox.reply(top(profile, 14))
        if steady is not None:
            await steady.close()
        if raw is not None:
            raw.close()
            await raw.wait_closed()
        inbox.close()

    asyncio.run(main())


class _HandshakeClient(LoadClient):
    """Upgrade, read the hello, close."""

    def __init__(self, path: str, host: str) -> None:
        super().__init__(path, host)
        self.hello_ok = False

    def on_text(self, payload: bytes) -> None:
        if not self.hello_ok:
            self.hello_ok = json.loads(payload).get("type") == "hello"
            self.send_close(1000)


async def _batch(port: int, count: int, limit_s: float, version: int = 1) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(IN_FLIGHT)
    host = f"127.0.0.1:{port}"
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        path = f"/ws/client?client_id=hs-{i}&version={version}&role=frontend"
        client: _HandshakeClient | None = None
        try:
            async with gate:
                _, client = await loop.create_connection(
                    lambda: _HandshakeClient(path, host), "127.0.0.1", port
                )
                await client.lost
            if not client.hello_ok:
                failures += 1
        except OSError:
            failures += 1

    cpu0 = time.process_time()
    start = time.perf_counter()
    async with asyncio.timeout(limit_s):
        await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - start
    return {
        "elapsed": elapsed,
        "failures": failures,
        "client_cpu": time.process_time() - cpu0,
    }


def _client_main(conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        inbox = Inbox(conn)
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            _, port, count, timeout, version = command
            inbox.reply(await _batch(port, count, timeout, version))
        inbox.close()

    asyncio.run(main())


def run(sizes: Sizes) -> Section:
    """Run benchmark 3 and report it."""
    count: int = sizes.pick(5_000, 300)
    repeats: int = sizes.pick(5, 3)
    section = Section(
        "handshakes",
        "3. Connection setup",
        f"Batches of {count:,} connections, {IN_FLIGHT} in flight: connect, upgrade, read the "
        f"hello, close 1000. Median of {repeats} batches per server, alternating, and as many "
        "batches of v2 clients (`version=2`) on the same SteadyServer process. Server and "
        "load generator in separate processes on separate cores.",
    )
    started = time.monotonic()
    timeout = 30 + count / 50
    names = ("steady", "raw", "steady-v2")
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu_us: dict[str, list[float]] = {name: [] for name in names}
    gc_us: dict[str, list[float]] = {name: [] for name in names}
    client_us: list[float] = []
    others: list[float] = []
    failures = 0
    profiles: dict[str, Any] = {}
    with (
        Child(_server_main, "steady", cpu=SERVER_CPU, name="steady-server") as steady,
        Child(_server_main, "raw", cpu=SERVER_CPU, name="raw-server") as raw,
        Child(_client_main, cpu=CLIENT_CPU, name="handshake-client") as client,
    ):
        steady_port = steady.receive(30)
        servers = {
            "steady": (steady, steady_port, 1),
            "raw": (raw, raw.receive(30), 1),
            "steady-v2": (steady, steady_port, 2),
        }
        for _, port, version in servers.values():  # warm-up
            client.call(("batch", port, min(count, 500), timeout, version), timeout + 30)
        for rep in range(repeats):
            order = ["raw", "steady", "steady-v2"]
            for name in order if rep % 2 == 0 else reversed(order):
                server, port, version = servers[name]
                other = OtherLoad()
                server.call(("gc",), 30)
                cpu0 = proc_cpu_seconds(server.pid)
                client_cpu0 = proc_cpu_seconds(client.pid)
                result = client.call(("batch", port, count, timeout, version), timeout + 30)
                cpu = proc_cpu_seconds(server.pid) - cpu0
                gc_us[name].append(server.call(("gc",), 30)["total_s"] / count * 1e6)
                others.append(other.cores(cpu + proc_cpu_seconds(client.pid) - client_cpu0))
                failures += result["failures"]
                rates[name].append(count / result["elapsed"])
                cpu_us[name].append(cpu / count * 1e6)
                client_us.append(result["client_cpu"] / count * 1e6)
        for name, (server, port, version) in servers.items():
            server.call(("profile_on",), 30)
            client.call(("batch", port, count, timeout, version), timeout + 30)
            profiles[name] = server.call(("profile_off",), 60)
    value, base = median(rates["steady"]), median(rates["raw"])
    r = ratio(value, base)
    v2 = median(rates["steady-v2"])
    v2_ratio = ratio(v2, value)
    section.rows = [
        Row(
            "handshakes per second, hello included",
            f"{fmt(value)} /s (runs {spread(rates['steady'])})",
            f"{fmt(base)} /s (runs {spread(rates['raw'])})",
            r,
            "≥ 0.9x raw",
            r is not None and r >= 0.9,
        ),
        Row(
            "server CPU per handshake",
            f"{fmt(median(cpu_us['steady']))} µs",
            f"{fmt(median(cpu_us['raw']))} µs",
            ratio(median(cpu_us["steady"]), median(cpu_us["raw"])),
        ),
        Row(
            "of which garbage collection",
            f"{fmt(median(gc_us['steady']), 1)} µs",
            f"{fmt(median(gc_us['raw']), 1)} µs",
            ratio(median(gc_us["steady"]), median(gc_us["raw"])),
        ),
        Row(
            "v2: handshakes per second, hello with a new session, against v1 (SteadyServer)",
            f"{fmt(v2)} /s (runs {spread(rates['steady-v2'])})",
            f"v1: {fmt(value)} /s (runs {spread(rates['steady'])})",
            v2_ratio,
            "≥ 0.9x v1",
            v2_ratio is not None and v2_ratio >= 0.9,
        ),
        Row(
            "v2: server CPU per handshake (of which garbage collection)",
            f"{fmt(median(cpu_us['steady-v2']))} µs ({fmt(median(gc_us['steady-v2']), 1)})",
            f"v1: {fmt(median(cpu_us['steady']))} µs ({fmt(median(gc_us['steady']), 1)})",
            ratio(median(cpu_us["steady-v2"]), median(cpu_us["steady"])),
        ),
        Row(
            "load generator CPU per handshake; failed handshakes; others' load",
            f"{fmt(median(client_us))} µs; {failures} failed; "
            f"{fmt(median(others), 2)} cores (median)",
        ),
    ]
    for name, profile in profiles.items():
        title = f"Profile of the {name} server during one batch"
        if name == "steady-v2":
            title = "Profile of the steady server during one batch of v2 clients"
        section.blocks.append(render(title, profile, count))
    section.seconds = time.monotonic() - started
    return section
