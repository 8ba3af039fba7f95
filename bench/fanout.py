"""Broadcast fan-out across processes: steadysocket on RedisBroker against python-socketio's
``AsyncServer`` with ``AsyncRedisManager``, same clients, same message, same machine, same run.

Setup: one ``redis-server`` (temporary directory, no persistence). For each server kind and
each process count P (1 and 2): P server processes share one Redis; N clients (light ones: the
bare asyncio protocol of ``bench.loadgen``, in two client processes) are spread evenly over the
P processes; process 0 publishes. steadysocket: ``SteadyServer(broker=RedisBroker(url),
compression=None)``, v1 clients, ``await server.broadcast(message)``. python-socketio:
``AsyncServer(async_mode="asgi", client_manager=AsyncRedisManager(url))`` under uvicorn, engine.io
over WebSocket only, ``await sio.emit("news", message)``. The message is about 100 bytes of JSON
carrying its send time.

A third kind, ``steady-v2``, is the same steadysocket servers with protocol v2 clients
(``version=2``): under RedisBroker their sessions are shared in Redis, so every numbered message
is written to Redis before it goes to the socket and every push reaches them through the Redis
stream, the publisher's own process included. Its rows have steadysocket's v1 figures as their
baseline and no goal: they show what sharing the sessions costs. The v2 clients take each
offset once, in order, and ack cumulatively (``bench.loadgen.V2LoadClient``); the rows say
if one saw a duplicate, a gap, an error or a close.

Two measurements per configuration:

- **throughput**: B broadcasts as fast as the publisher's API returns; delivered messages per
  second = N x B / (last delivery - first send), and the server processes' CPU per delivery.
- **latency at a fixed load**: broadcasts paced to offer a fixed number of deliveries per
  second (below both servers' capacity); p50 and p99 of delivery time minus send time (one
  machine, one clock).

Run it alone with ``python -m bench.fanout [--quick]``; ``run(sizes)`` returns the Section for
``bench/run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing.connection
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import wire
from bench.common import (
    BenchError,
    Child,
    Inbox,
    Row,
    Section,
    Sizes,
    fmt,
    median,
    percentile,
    proc_cpu_seconds,
    ratio,
    spread,
)
from bench.loadgen import LoadClient, V2LoadClient
from bench.report import section_markdown

KINDS = ("steady", "socketio", "steady-v2")
"""steadysocket with v1 clients, python-socketio, steadysocket with v2 clients."""
PAYLOAD = "x" * 40
"""Filler so that a message is about 100 bytes of JSON."""
CLIENT_PROCESSES = 2


# -- redis ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Redis:
    """A throwaway redis-server."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server is missing: apt-get install -y redis-server")
        self.directory = tempfile.TemporaryDirectory(prefix="bench-redis-")
        self.port = _free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.directory.name,
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 10
        for line in self.process.stdout:  # bounded by the deadline and the process's life
            if "Ready to accept connections" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise BenchError("redis-server did not start")
        self.process.stdout.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.directory.cleanup()


# -- servers --------------------------------------------------------------------------------


def _message(n: int) -> dict[str, Any]:
    return {"type": "news", "n": n, "t": time.time(), "pad": PAYLOAD}


def _server_main(
    conn: multiprocessing.connection.Connection, kind: str, redis_url: str, channel: str
) -> None:
    async def main() -> None:
        inbox = Inbox(conn)
        if kind.startswith("steady"):
            from steadysocket.runtime.redis_broker import RedisBroker
            from steadysocket.runtime.server import SteadyServer

            broker = RedisBroker(redis_url, prefix=channel)
            steady = SteadyServer(
                "127.0.0.1",
                0,
                compression=None,
                broker=broker,
                environ={},
                heartbeat_interval_ms=60_000,
                connection_timeout_ms=120_000,
            )
            await steady.start()
            async with asyncio.timeout(30):
                await broker.reading.wait()
            port = steady.port

            async def publish(message: dict[str, Any]) -> None:
                await steady.broadcast(message)

            async def close() -> None:
                await steady.close()
        else:
            import socketio
            import uvicorn

            manager = socketio.AsyncRedisManager(redis_url, channel=channel)
            sio = socketio.AsyncServer(
                async_mode="asgi",
                client_manager=manager,
                ping_interval=60,
                ping_timeout=60,
                transports=["websocket"],
            )
            app = socketio.ASGIApp(sio)
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                log_config=None,
                lifespan="off",
                ws_per_message_deflate=False,
            )
            uv = uvicorn.Server(config)
            task = asyncio.create_task(uv.serve())
            async with asyncio.timeout(30):
                while not uv.started:  # noqa: ASYNC110 - uvicorn offers no event for it
                    await asyncio.sleep(0.01)
            port = uv.servers[0].sockets[0].getsockname()[1]
            await sio.emit("warmup", {})  # starts the manager's Redis listener

            async def publish(message: dict[str, Any]) -> None:
                await sio.emit("news", message)

            async def close() -> None:
                uv.should_exit = True
                async with asyncio.timeout(30):
                    await task

        inbox.reply(port)
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "blast":
                _, count = command
                began = time.time()
                for n in range(count):
                    await publish(_message(n))
                inbox.reply(began)
            elif command[0] == "paced":
                _, count, interval = command
                loop = asyncio.get_running_loop()
                start = loop.time()
                began = time.time()
                for n in range(count):
                    delay = start + n * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    await publish(_message(n))
                inbox.reply(began)
        await close()
        inbox.close()

    asyncio.run(main())


# -- clients --------------------------------------------------------------------------------


class _Recorder:
    """What one client process received since the last reset."""

    def __init__(self) -> None:
        self.received = 0
        self.latencies: list[float] = []
        self.last = 0.0
        self.target = -1
        self.done = asyncio.Event()
        """Set once ``target`` messages were received."""

    def got(self, payload: bytes) -> None:
        sent = json.loads(payload)
        if isinstance(sent, list):  # socket.io: ["news", {...}]
            sent = sent[1]
        self.got_message(sent)

    def got_message(self, sent: dict[str, Any]) -> None:
        now = time.time()
        self.received += 1
        self.latencies.append(now - sent["t"])
        self.last = now
        if self.received == self.target:
            self.done.set()


class _SteadyClient(LoadClient):
    def __init__(self, path: str, host: str, recorder: _Recorder, ready: asyncio.Event) -> None:
        super().__init__(path, host, offer_deflate=False)
        self.recorder = recorder
        self.ready = ready

    def on_text(self, payload: bytes) -> None:
        if b'"news"' in payload:
            self.recorder.got(payload)
        elif b'"hello"' in payload:
            self.ready.set()
        elif b'"ping"' in payload and self.transport is not None:
            self.transport.write(wire.client_frame(wire.OP_TEXT, b'{"type":"pong"}'))


class _SteadyV2Client(V2LoadClient):
    """Counts each offset once (``V2LoadClient`` drops duplicates and stops at a gap)."""

    def __init__(self, path: str, host: str, recorder: _Recorder, ready: asyncio.Event) -> None:
        super().__init__(path, host, offer_deflate=False)
        self.recorder = recorder
        self.ready = ready

    def on_hello(self, hello: dict[str, Any]) -> None:
        if hello.get("accepted_version") == 2:
            self.ready.set()
        else:
            self.errors.append(f"hello without accepted_version 2: {hello!r}"[:200])
            self.abort()

    def on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") == "news":
            self.recorder.got_message(message)


class _SioClient(LoadClient):
    def __init__(self, path: str, host: str, recorder: _Recorder, ready: asyncio.Event) -> None:
        super().__init__(path, host, offer_deflate=False)
        self.recorder = recorder
        self.ready = ready

    def on_text(self, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if payload.startswith(b'42["news"'):
            self.recorder.got(payload[2:])
        elif payload.startswith(b"0{"):  # engine.io open: connect the default namespace
            transport.write(wire.client_frame(wire.OP_TEXT, b"40"))
        elif payload.startswith(b"40"):
            self.ready.set()
        elif payload == b"2":
            transport.write(wire.client_frame(wire.OP_TEXT, b"3"))


def _client_main(conn: multiprocessing.connection.Connection) -> None:
    async def main() -> None:
        inbox = Inbox(conn)
        loop = asyncio.get_running_loop()
        recorder = _Recorder()
        clients: list[LoadClient] = []
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "connect":
                _, kind, ports, count, first = command
                events = []
                for i in range(count):
                    port = ports[i % len(ports)]
                    ready = asyncio.Event()
                    events.append(ready)
                    if kind == "steady":
                        path = f"/ws/client?client_id=f{first + i}"

                        def factory(
                            p: str = path, r: asyncio.Event = ready, rec: _Recorder = recorder
                        ) -> LoadClient:
                            return _SteadyClient(p, "127.0.0.1", rec, r)
                    elif kind == "steady-v2":
                        path = f"/ws/client?client_id=f{first + i}&version=2"

                        def factory(
                            p: str = path, r: asyncio.Event = ready, rec: _Recorder = recorder
                        ) -> LoadClient:
                            return _SteadyV2Client(p, "127.0.0.1", rec, r)
                    else:
                        path = "/socket.io/?EIO=4&transport=websocket"

                        def factory(
                            p: str = path, r: asyncio.Event = ready, rec: _Recorder = recorder
                        ) -> LoadClient:
                            return _SioClient(p, "127.0.0.1", rec, r)

                    _, client = await loop.create_connection(factory, "127.0.0.1", port)
                    clients.append(client)
                async with asyncio.timeout(60):
                    for event in events:
                        await event.wait()
                inbox.reply(len(clients))
            elif command[0] == "reset":
                recorder = _Recorder()
                for client in clients:
                    assert isinstance(client, _SteadyClient | _SteadyV2Client | _SioClient)
                    client.recorder = recorder
                inbox.reply(True)
            elif command[0] == "expect":
                _, total, limit = command
                recorder.target = total
                if recorder.received >= total:
                    recorder.done.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(limit):
                        await recorder.done.wait()
                inbox.reply(
                    {
                        "received": recorder.received,
                        "last": recorder.last,
                        "latencies": recorder.latencies,
                    }
                )
            elif command[0] == "health":
                inbox.reply(_health(clients))
            elif command[0] == "close":
                for client in clients:
                    client.abort()
                clients = []
                inbox.reply(True)
        inbox.close()

    asyncio.run(main())


def _health(clients: Sequence[LoadClient]) -> dict[str, Any]:
    """What went wrong on the connections so far: v2 duplicates, gaps and errors, closes."""
    closes: dict[str, int] = {}
    for client in clients:
        if client.lost.done() or client.close_code is not None:
            key = f"{client.close_code} {client.close_reason}".strip()
            closes[key] = closes.get(key, 0) + 1
    v2 = [c for c in clients if isinstance(c, V2LoadClient)]
    return {
        "duplicates": sum(c.duplicates for c in v2),
        "gaps": sum(c.gaps for c in v2),
        "errors": [e for c in v2 for e in c.errors][:5],
        "error_count": sum(len(c.errors) for c in v2),
        "closes": closes,
    }


# -- the run --------------------------------------------------------------------------------


def _measure(
    redis: _Redis, kind: str, processes: int, sizes: Sizes, round_: int, problems: list[str]
) -> dict[str, float]:
    """One configuration's figures; what went wrong on the connections goes to ``problems``."""
    clients: int = sizes.pick(1000, 100)
    blast: int = sizes.pick(200, 20)
    paced: int = sizes.pick(40, 10)
    offered: float = sizes.pick(4000.0, 4000.0)
    """Deliveries per second offered in the latency run."""
    channel = f"bench-{kind}-{processes}-{round_}-{os.getpid()}"
    servers = [
        Child(_server_main, kind, redis.url, channel, name=f"{kind}-server-{i}")
        for i in range(processes)
    ]
    loaders = [Child(_client_main, name=f"fanout-clients-{i}") for i in range(CLIENT_PROCESSES)]
    try:
        ports = [server.receive(60) for server in servers]
        share = clients // CLIENT_PROCESSES
        for i, loader in enumerate(loaders):
            # Each loader spreads its clients over the ports, so every process gets N / P.
            loader.call(("connect", kind, ports, share, i * share), 120)
        total_clients = share * CLIENT_PROCESSES
        results: dict[str, float] = {}
        # throughput
        for loader in loaders:
            loader.call(("reset",), 30)
        cpu0 = sum(proc_cpu_seconds(s.pid) for s in servers)
        began = servers[0].call(("blast", blast), 300)
        got = [loader.call(("expect", share * blast, 120), 150) for loader in loaders]
        cpu = sum(proc_cpu_seconds(s.pid) for s in servers) - cpu0
        received = sum(g["received"] for g in got)
        last = max(g["last"] for g in got)
        results["delivered"] = received / (total_clients * blast)
        results["rate"] = received / (last - began) if last > began else float("nan")
        results["cpu_us"] = cpu / max(received, 1) * 1e6
        # latency at a fixed offered load
        for loader in loaders:
            loader.call(("reset",), 30)
        interval = total_clients / offered
        servers[0].call(("paced", paced, interval), 300 + paced * interval)
        got = [loader.call(("expect", share * paced, 120), 150) for loader in loaders]
        latencies = [x for g in got for x in g["latencies"]]
        results["paced_delivered"] = len(latencies) / (total_clients * paced)
        results["p50_ms"] = percentile(latencies, 50) * 1000
        results["p99_ms"] = percentile(latencies, 99) * 1000
        health = [loader.call(("health",), 30) for loader in loaders]
        results["duplicates"] = sum(h["duplicates"] for h in health)
        results["gaps"] = sum(h["gaps"] for h in health)
        results["errors"] = sum(h["error_count"] for h in health)
        results["closed"] = sum(sum(h["closes"].values()) for h in health)
        notes = [f"{e} (error)" for h in health for e in h["errors"]]
        notes += [f"{n} x closed: {why}" for h in health for why, n in h["closes"].items()]
        if notes:
            label = f"{kind}, {processes} process(es), round {round_ + 1}"
            problems.append(f"{label}: " + "; ".join(notes))
        for loader in loaders:
            loader.call(("close",), 30)
        return results
    finally:
        for child in loaders + servers:
            child.stop()


def run(sizes: Sizes) -> Section:
    """Run the fan-out comparison and report it."""
    clients: int = sizes.pick(1000, 100)
    repeats: int = sizes.pick(3, 1)
    section = Section(
        "fanout",
        "7. Broadcast fan-out across processes on Redis",
        f"{clients:,} light clients (bare asyncio protocol, {CLIENT_PROCESSES} client "
        "processes) spread evenly over 1 or 2 server processes sharing one redis-server; "
        "process 0 broadcasts ~100-byte JSON. Throughput: "
        f"{sizes.pick(200, 20)} broadcasts as fast as the API returns, delivered messages per "
        "second from the first send to the last delivery, and the server processes' CPU per "
        "delivery. Latency: broadcasts paced to offer 4,000 deliveries/s, p50/p99 of "
        "delivery time minus send time. steadysocket: SteadyServer + RedisBroker (stream), "
        "v1 clients, no compression. Baseline: python-socketio AsyncServer + AsyncRedisManager "
        f"(pub/sub) under uvicorn, WebSocket transport only. The last rows measure the same "
        "steadysocket servers with protocol v2 clients, whose sessions RedisBroker keeps in "
        "Redis (each numbered message written there before it goes out, pushes read back "
        "from the stream); the clients take each offset once and ack cumulatively every 32 "
        "messages or 50 ms. Their baseline is steadysocket's v1 figure, with no goal. "
        f"Median of {repeats} round(s), kinds alternating; no process pinned (2 cores: "
        "servers, clients and Redis share them).",
    )
    redis = _Redis()
    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    problems: list[str] = []
    try:
        for round_ in range(repeats):
            order = list(KINDS) if round_ % 2 == 0 else list(reversed(KINDS))
            for processes in (1, 2):
                for kind in order:
                    figures.setdefault((kind, processes), []).append(
                        _measure(redis, kind, processes, sizes, round_, problems)
                    )
    finally:
        redis.close()

    def med(kind: str, processes: int, key: str) -> float:
        return median([f[key] for f in figures[(kind, processes)]])

    def runs(kind: str, processes: int, key: str) -> list[float]:
        return [f[key] for f in figures[(kind, processes)]]

    def complete(processes: int, key: str) -> bool:
        """Whether steadysocket delivered every message in every round (a figure over lost
        messages meets no goal)."""
        return all(x >= 1.0 for x in runs("steady", processes, key))

    for processes in (1, 2):
        label = f"{processes} process{'es' if processes > 1 else ''}"
        value, base = med("steady", processes, "rate"), med("socketio", processes, "rate")
        r = ratio(value, base)
        section.rows.append(
            Row(
                f"broadcast deliveries per second, {label}",
                f"{fmt(value)} /s (runs {spread(runs('steady', processes, 'rate'))}; "
                f"{fmt(med('steady', processes, 'delivered') * 100, 1)} % delivered)",
                f"{fmt(base)} /s (runs {spread(runs('socketio', processes, 'rate'))}; "
                f"{fmt(med('socketio', processes, 'delivered') * 100, 1)} % delivered)",
                r,
                "≥ 2x python-socketio, every message delivered",
                r is not None and r >= 2 and complete(processes, "delivered"),
            )
        )
        section.rows.append(
            Row(
                f"server CPU per delivery, {label}",
                f"{fmt(med('steady', processes, 'cpu_us'), 1)} µs",
                f"{fmt(med('socketio', processes, 'cpu_us'), 1)} µs",
                ratio(med("steady", processes, "cpu_us"), med("socketio", processes, "cpu_us")),
            )
        )
        p99, base99 = med("steady", processes, "p99_ms"), med("socketio", processes, "p99_ms")
        section.rows.append(
            Row(
                f"delivery latency p50 / p99 at 4,000 deliveries/s, {label}",
                f"{fmt(med('steady', processes, 'p50_ms'), 1)} / {fmt(p99, 1)} ms "
                f"({fmt(med('steady', processes, 'paced_delivered') * 100, 1)} % delivered)",
                f"{fmt(med('socketio', processes, 'p50_ms'), 1)} / {fmt(base99, 1)} ms "
                f"({fmt(med('socketio', processes, 'paced_delivered') * 100, 1)} % delivered)",
                ratio(p99, base99),
                "lower p99, every message delivered",
                p99 < base99 and complete(processes, "paced_delivered"),
            )
        )
    for processes in (1, 2):
        label = f"{processes} process{'es' if processes > 1 else ''}"
        v2, v1 = "steady-v2", "steady"
        value, base = med(v2, processes, "rate"), med(v1, processes, "rate")
        section.rows.append(
            Row(
                f"steadysocket, v2 clients (sessions in Redis): broadcast deliveries per second, "
                f"{label}",
                f"{fmt(value)} /s (runs {spread(runs(v2, processes, 'rate'))}; "
                f"{fmt(med(v2, processes, 'delivered') * 100, 1)} % delivered"
                f"{_faults(runs, v2, processes)})",
                f"v1: {fmt(base)} /s",
                ratio(value, base),
            )
        )
        p99, base99 = med(v2, processes, "p99_ms"), med(v1, processes, "p99_ms")
        section.rows.append(
            Row(
                "steadysocket, v2 clients (sessions in Redis): delivery latency p50 / p99 at "
                f"4,000 deliveries/s, {label}",
                f"{fmt(med(v2, processes, 'p50_ms'), 1)} / {fmt(p99, 1)} ms "
                f"({fmt(med(v2, processes, 'paced_delivered') * 100, 1)} % delivered)",
                f"v1: {fmt(med(v1, processes, 'p50_ms'), 1)} / {fmt(base99, 1)} ms",
                ratio(p99, base99),
            )
        )
    if problems:
        section.blocks.append(
            "**What went wrong on the clients' connections** (before the benchmark closed them)"
            "\n\n" + "\n".join(f"- {p}" for p in problems)
        )
    return section


def _faults(runs: Callable[[str, int, str], list[float]], kind: str, processes: int) -> str:
    """``; 3 duplicates, ...`` summed over the rounds, or nothing when all went well."""
    parts = [
        f"{fmt(sum(runs(kind, processes, key)))} {name}"
        for key, name in (
            ("duplicates", "duplicate(s)"),
            ("gaps", "gap(s)"),
            ("errors", "error(s)"),
            ("closed", "connection(s) lost"),
        )
        if sum(runs(kind, processes, key))
    ]
    return "; " + ", ".join(parts) if parts else ""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.fanout [--quick]``: run it alone and print its table."""
    parser = argparse.ArgumentParser(prog="python -m bench.fanout")
    parser.add_argument("--quick", action="store_true", help="100 clients, few broadcasts")
    args = parser.parse_args(argv)
    started = time.monotonic()
    section = run(Sizes(quick=args.quick))
    section.seconds = time.monotonic() - started
    print(section_markdown(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
