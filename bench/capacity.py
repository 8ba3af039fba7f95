"""2. Server capacity: N concurrent connections, each pinged every second.

The server under test runs alone in its own process, pinned to one core. It is either
``SteadyServer`` (``/ws/client``, heartbeat interval 1 s, everything else default, so
permessage-deflate is on) or a minimal raw websockets server that sends the same hello and the
same pings on the same schedule (one task per connection: ``recv`` bounded by the next ping's
due time, then the ping), with protocol keepalive off as on ``/ws/client``.

A load generator in a second process (the other core) opens N connections (offering
permessage-deflate, as browsers and the websockets client do; ``bench.loadgen``, a bare asyncio
protocol, so that the generator is never the bottleneck), answers every ping with a pong, and
records each ping's lateness two ways:

- **server lateness**: the ping's own ``timestamp`` minus its due time, both on the server's
  clock (due = the hello's ``server_time`` + (n + 1) x interval, skipping missed slots as the
  server does). This is how late the server's timer ran; it is ms-precise (the wire format).
- **arrival lateness**: when the client read the ping, minus the due time: adds the send, the
  loopback and the load generator's own delays.

Per window (several per N): server CPU % from ``/proc/<pid>/stat``; RSS per connection is
(RSS with N connections - RSS before the first) / N. The server process also records its
garbage collections (``gc.callbacks``): full collections and the longest pause.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import multiprocessing.connection
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

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
    percentile,
    proc_cpu_seconds,
    proc_rss_bytes,
    ratio,
)
from bench.loadgen import LoadClient
from bench.profiling import render, top
from steadysocket.model.protocol import FEATURES
from steadysocket.runtime.server import SteadyServer

INTERVAL_MS = 1000
CONNECTION_TIMEOUT_MS = 30_000
PONG_FRAME = wire.masked_constant(
    wire.OP_TEXT,
    b'{"type":"pong","timestamp":"2025-01-01T00:00:00.000Z","client_id":"c-000000"}',
)
"""What a steadysocket client answers a ping with (its size and shape), built once."""


def _iso(wall: datetime) -> str:
    return wall.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _parse(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


# -- the servers ----------------------------------------------------------------------------


async def _raw_handler(ws: ServerConnection, live: set[ServerConnection], interval_ms: int) -> None:
    assert ws.request is not None
    loop = asyncio.get_running_loop()
    interval = interval_ms / 1000.0
    client_id = parse_qs(urlsplit(ws.request.path).query).get("client_id", [""])[0]
    now, wall = loop.time(), datetime.now(UTC)
    live.add(ws)
    try:
        await ws.send(
            json.dumps(
                {
                    "type": "hello",
                    "server_time": _iso(wall),
                    "accepted_version": 1,
                    "features": list(FEATURES),
                    "request_id": str(uuid.uuid4()),
                    "client_id": client_id,
                    "heartbeat_interval_ms": interval_ms,
                }
            )
        )
        next_due = now + interval
        count = 0
        for _ in range(1 << 40):  # until the connection closes
            try:
                async with asyncio.timeout_at(next_due):
                    text = await ws.recv()
                json.loads(text)
                continue
            except TimeoutError:
                pass
            ping = {
                "type": "ping",
                "timestamp": _iso(datetime.now(UTC)),
                "heartbeat_count": count,
                "client_id": client_id,
            }
            await ws.send(json.dumps(ping))
            count += 1
            next_due += interval
            now = loop.time()
            if next_due <= now:
                next_due += ((now - next_due) // interval + 1) * interval
    except ConnectionClosed:
        pass
    finally:
        live.discard(ws)


def _server_main(
    conn: multiprocessing.connection.Connection,
    kind: str,
    freeze: bool,
    deflate: bool,
    interval_ms: int,
) -> None:
    async def main() -> None:
        watch = GcWatch()
        live: set[ServerConnection] = set()
        steady: SteadyServer | None = None
        if kind == "steady":
            steady = SteadyServer(
                "127.0.0.1",
                0,
                heartbeat_interval_ms=interval_ms,
                connection_timeout_ms=CONNECTION_TIMEOUT_MS,
                environ={},
                compression="deflate" if deflate else None,
            )
            await steady.start()
            port = steady.port
            server = None
        else:
            server = await serve(
                lambda ws: _raw_handler(ws, live, interval_ms),
                "127.0.0.1",
                0,
                ping_interval=None,
                ping_timeout=None,
                open_timeout=CONNECTION_TIMEOUT_MS / 1000,
                max_size=1 << 20,
                compression="deflate" if deflate else None,
            )
            port = server.sockets[0].getsockname()[1]
        freezer: asyncio.Task[None] | None = None
        if freeze:

            async def keep_frozen() -> None:
                for _ in range(100_000):
                    gc.freeze()
                    await asyncio.sleep(1.0)

            freezer = asyncio.create_task(keep_frozen())
        inbox = Inbox(conn)
        inbox.reply(port)
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "cpu":
                inbox.reply(time.process_time())
            elif command[0] == "gc":
                summary = watch.summary()
                summary["connections"] = len(steady.clients) if steady else len(live)
                watch.reset()
                inbox.reply(summary)
            elif command[0] == "profile":
                profile = cProfile.Profile()
                profile.enable()
                await asyncio.sleep(command[1])
                profile.disable()
                inbox.reply(top(profile, 14))
        if freezer is not None:
            freezer.cancel()
        inbox.close()

    asyncio.run(main())


# -- the load generator ---------------------------------------------------------------------


@dataclass
class _Recorder:
    recording: bool = False
    server_late: list[float] = field(default_factory=list)
    arrival_late: list[float] = field(default_factory=list)
    closed: int = 0


class _PingClient(LoadClient):
    """Answers every ping with a pong and records its lateness while recording."""

    def __init__(self, path: str, host: str, rec: _Recorder) -> None:
        super().__init__(path, host)
        self.rec = rec
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.interval = 0.0
        self.next_due = 0.0

    def on_text(self, payload: bytes) -> None:
        arrival = time.time()
        message = json.loads(payload)
        kind = message["type"]
        if kind == "ping":
            sent = _parse(message["timestamp"])
            next_due = self.next_due
            if self.rec.recording:
                self.rec.server_late.append(sent - next_due)
                self.rec.arrival_late.append(arrival - next_due)
            next_due += self.interval
            if next_due <= sent:
                next_due += ((sent - next_due) // self.interval + 1) * self.interval
            self.next_due = next_due
            assert self.transport is not None
            self.transport.write(PONG_FRAME)
        elif kind == "hello" and not self.hello.done():
            self.interval = message["heartbeat_interval_ms"] / 1000.0
            self.next_due = _parse(message["server_time"]) + self.interval
            self.hello.set_result(None)

    def on_lost(self) -> None:
        if self.hello.done():
            self.rec.closed += 1
        else:
            self.hello.cancel()


async def _open(
    port: int, i: int, gate: asyncio.Semaphore, rec: _Recorder, deadline: float
) -> _PingClient | None:
    loop = asyncio.get_running_loop()
    path = f"/ws/client?client_id=c-{i:06d}&version=1"
    client: _PingClient | None = None
    try:
        # The whole phase has one deadline: connections not open by then are given up.
        async with asyncio.timeout_at(deadline), gate:
            _, client = await loop.create_connection(
                lambda: _PingClient(path, f"127.0.0.1:{port}", rec), "127.0.0.1", port
            )
            await client.hello
    except (OSError, TimeoutError, asyncio.CancelledError):
        if client is not None:
            client.abort()
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the task itself is being cancelled, not just the hello
        return None
    return client


def _client_main(conn: multiprocessing.connection.Connection, port: int) -> None:
    async def main() -> None:
        # The load generator is not under test: keep its own collector out of the figures.
        gc.disable()
        rec = _Recorder()
        gate = asyncio.Semaphore(64)
        clients: list[_PingClient] = []
        inbox = Inbox(conn)
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "connect":
                n, timeout = command[1], command[2]
                start = time.monotonic()
                deadline = asyncio.get_running_loop().time() + timeout
                opened = await asyncio.gather(
                    *(_open(port, i, gate, rec, deadline) for i in range(n))
                )
                clients = [c for c in opened if c is not None]
                inbox.reply(
                    {
                        "connected": len(clients),
                        "failures": n - len(clients),
                        "seconds": time.monotonic() - start,
                    }
                )
            elif command[0] == "record":
                rec.server_late.clear()
                rec.arrival_late.clear()
                rec.recording = True
                await asyncio.sleep(command[1])
                rec.recording = False
                inbox.reply(
                    {
                        "server_late": list(rec.server_late),
                        "arrival_late": list(rec.arrival_late),
                        "closed": rec.closed,
                    }
                )
        for client in clients:
            client.abort()
        inbox.close()

    asyncio.run(main())


# -- the benchmark --------------------------------------------------------------------------


@dataclass
class Hold:
    """What one server held at one N."""

    kind: str
    n: int
    interval_ms: int = INTERVAL_MS
    connected: int = 0
    connect_s: float = 0.0
    rss_per_conn: float = float("nan")
    cpu: list[float] = field(default_factory=list)
    server_p50: list[float] = field(default_factory=list)
    server_p99: list[float] = field(default_factory=list)
    server_max: list[float] = field(default_factory=list)
    arrival_p50: list[float] = field(default_factory=list)
    arrival_p99: list[float] = field(default_factory=list)
    pings: list[int] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    cpu_per_ping_us: list[float] = field(default_factory=list)
    other_cores: list[float] = field(default_factory=list)
    gc_full: int = 0
    gc_longest: float = 0.0
    gc_share: float = 0.0
    """Share of the windows' wall time the server spent collecting garbage."""
    tracked: int = 0
    closed: int = 0
    profile: Any = None
    error: str = ""

    def ok(self) -> bool:
        """Every connection was held."""
        return not self.error and self.connected == self.n and self.closed == 0


def hold(
    kind: str,
    n: int,
    windows: int,
    window_s: float,
    *,
    connect_s: float,
    freeze: bool = False,
    deflate: bool = True,
    profile_s: float = 0,
    interval_ms: int = INTERVAL_MS,
) -> Hold:
    """Hold ``n`` connections on one server and measure ``windows`` windows."""
    label = kind + ("" if deflate else ", no deflate") + (" + gc.freeze()" if freeze else "")
    result = Hold(label, n, interval_ms)
    server = Child(
        _server_main, kind, freeze, deflate, interval_ms, cpu=SERVER_CPU, name=f"{kind}-server"
    )
    client: Child | None = None
    try:
        port = server.receive(30)
        time.sleep(0.5)
        rss0 = proc_rss_bytes(server.pid)
        client = Child(_client_main, port, cpu=CLIENT_CPU, name="load-generator")
        answer = client.call(("connect", n, connect_s), connect_s + 30)
        result.connected, result.connect_s = answer["connected"], answer["seconds"]
        if result.connected < n:
            result.error = f"only {result.connected} of {n} connected ({answer['failures']} failed)"
        time.sleep(2.0)  # every schedule running
        server.call(("gc",), 30)
        for _ in range(windows):
            other = OtherLoad()
            client0 = proc_cpu_seconds(client.pid)
            cpu0, t0 = server.call(("cpu",), 30), time.monotonic()
            samples = client.call(("record", window_s), window_s + 60)
            cpu1, t1 = server.call(("cpu",), 30), time.monotonic()
            client1 = proc_cpu_seconds(client.pid)
            result.other_cores.append(other.cores(cpu1 - cpu0 + client1 - client0))
            result.cpu.append((cpu1 - cpu0) / (t1 - t0) * 100)
            late = [x * 1000 for x in samples["server_late"]]
            arrival = [x * 1000 for x in samples["arrival_late"]]
            result.server_p50.append(percentile(late, 50))
            result.server_p99.append(percentile(late, 99))
            result.server_max.append(max(late, default=float("nan")))
            result.arrival_p50.append(percentile(arrival, 50))
            result.arrival_p99.append(percentile(arrival, 99))
            result.pings.append(len(late))
            result.cpu_per_ping_us.append((cpu1 - cpu0) / max(len(late), 1) * 1e6)
            result.expected.append(result.connected * window_s * 1000 / interval_ms)
            result.closed = samples["closed"]
        gc_summary = server.call(("gc",), 60)
        result.gc_full = len(gc_summary["full_pauses"])
        result.gc_longest = max(gc_summary["full_pauses"], default=0.0) * 1000
        result.gc_share = gc_summary["total_s"] / (windows * window_s)
        result.tracked = gc_summary["tracked_objects"]
        result.rss_per_conn = (proc_rss_bytes(server.pid) - rss0) / max(result.connected, 1)
        if profile_s:
            result.profile = server.call(("profile", profile_s), profile_s + 60)
    except BenchError as exc:
        result.error = str(exc).splitlines()[0]
    finally:
        # The server goes first: its side takes the TIME_WAITs, not the client's ports.
        server.kill()
        if client is not None:
            client.stop(timeout=30)
    return result


def _table(holds: list[Hold]) -> str:
    out = [
        "| server | N | interval ms | held | connect s | RSS/conn | CPU % | CPU µs/ping "
        "| server late p50 / p99 / max ms | arrival late p50 / p99 ms | pings seen / due "
        "| GC share, full GCs (longest ms) | others' load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in holds:
        held = f"{h.connected:,}" + (f" ⚠ {h.error}" if h.error else "")
        out.append(
            f"| {h.kind} | {h.n:,} | {h.interval_ms:,} | {held} | {h.connect_s:.1f} "
            f"| {fmt(h.rss_per_conn / 1024, 1, 'KiB')} | {fmt(median(h.cpu))} "
            f"| {fmt(median(h.cpu_per_ping_us))} | {fmt(median(h.server_p50), 1)} / "
            f"{fmt(median(h.server_p99), 1)} / {fmt(median(h.server_max))} "
            f"| {fmt(median(h.arrival_p50), 1)} / {fmt(median(h.arrival_p99), 1)} "
            f"| {sum(h.pings):,} / {sum(h.expected):,.0f} "
            f"| {h.gc_share:.0%}, {h.gc_full} ({h.gc_longest:.0f}) "
            f"| {fmt(median(h.other_cores), 2)} |"
        )
    return "\n".join(out)


LONG_INTERVAL_MS = 2000
"""The heartbeat of the 10,000-connection goal (issue 13: 10,000 held at 2000 ms on one core)."""


def run(sizes: Sizes) -> Section:
    """Run benchmark 2 and report it."""
    ns: list[int] = sizes.pick([1_000, 5_000], [200])
    long_n: int = sizes.pick(10_000, 400)
    profile_n: int = sizes.pick(5_000, 200)
    windows: int = sizes.pick(3, 2)
    window_s: float = sizes.pick(5.0, 2.0)
    connect_s: float = sizes.pick(60.0, 20.0)
    goal_n = ns[-1]
    section = Section(
        "capacity",
        "2. Server capacity",
        f"N connections held, heartbeat every {INTERVAL_MS} ms (and {long_n:,} at "
        f"{LONG_INTERVAL_MS} ms), each ping answered with a pong. "
        f"{windows} windows of {window_s:g} s per server and N; each figure is the median of the "
        "windows' figures. Server and load generator in separate processes, pinned to separate "
        f"cores; the server is one asyncio process on one core. Connections are opened 64 at a "
        f"time, for at most {connect_s:g} s. Lateness goals apply at N = {goal_n:,} "
        f"({INTERVAL_MS} ms) and N = {long_n:,} ({LONG_INTERVAL_MS} ms). Lateness is ms-precise "
        "(the wire's timestamps). CPU µs/ping is the server's CPU time per ping sent (the ping, "
        "its pong, the timers): it does not depend on how busy the machine is, so it gives the "
        "ceiling 1 s / (µs per ping) connections per core at this heartbeat. steadysocket runs "
        "with its defaults, so it manages the collector itself (`GcPolicy`: gc.freeze() every "
        "second, generation-0 threshold 20,000); the raw server leaves the collector alone, "
        "except in the rows marked gc.freeze(), where the application freezes every second.",
    )
    started = time.monotonic()
    pairs: list[tuple[Hold, Hold]] = []
    for n, interval_ms in [*((n, INTERVAL_MS) for n in ns), (long_n, LONG_INTERVAL_MS)]:
        profile_s = 3.0 if n == profile_n and interval_ms == INTERVAL_MS else 0.0
        raw, steady = (
            hold(
                kind,
                n,
                windows,
                window_s,
                connect_s=connect_s,
                profile_s=profile_s,
                interval_ms=interval_ms,
            )
            for kind in ("raw", "steady")
        )
        pairs.append((steady, raw))
    freeze_n = profile_n
    frozen = hold("steady", freeze_n, windows, window_s, connect_s=connect_s, freeze=True)
    frozen_raw = hold("raw", freeze_n, windows, window_s, connect_s=connect_s, freeze=True)
    lean = hold(
        "steady", freeze_n, windows, window_s, connect_s=connect_s, freeze=True, deflate=False
    )
    lean_raw = hold(
        "raw", freeze_n, windows, window_s, connect_s=connect_s, freeze=True, deflate=False
    )
    section.blocks.append(
        _table([h for pair in pairs for h in pair] + [frozen, frozen_raw, lean, lean_raw])
    )

    for steady, raw in pairs:
        n = steady.n
        every = f"every {steady.interval_ms} ms"
        late_goal = n == goal_n or steady.interval_ms == LONG_INTERVAL_MS
        held_goal = steady.interval_ms == LONG_INTERVAL_MS
        rss_goal = n == goal_n
        rss_ratio = ratio(steady.rss_per_conn, raw.rss_per_conn)
        p99 = median(steady.server_p99)
        held = steady.ok() and sum(steady.pings) >= 0.99 * sum(steady.expected)
        section.rows += [
            Row(
                f"N = {n:,}, {every}: connections held, every ping sent",
                f"{steady.connected:,} held, {sum(steady.pings):,} of "
                f"{sum(steady.expected):,.0f} pings; CPU {fmt(median(steady.cpu))} %",
                f"{raw.connected:,} held, {sum(raw.pings):,} of {sum(raw.expected):,.0f} "
                f"pings; CPU {fmt(median(raw.cpu))} %",
                None,
                f"{n:,} held on one core" if held_goal else "",
                held if held_goal else None,
            ),
            Row(
                f"N = {n:,}, {every}: ping lateness p99 (p50), server clock",
                f"{fmt(p99, 1)} ms ({fmt(median(steady.server_p50), 1)})",
                f"{fmt(median(raw.server_p99), 1)} ms ({fmt(median(raw.server_p50), 1)})",
                ratio(p99, median(raw.server_p99)),
                "< 100 ms" if late_goal else "",
                (p99 < 100) if late_goal else None,
            ),
            Row(
                f"N = {n:,}, {every}: RSS per connection",
                fmt(steady.rss_per_conn / 1024, 1, "KiB"),
                fmt(raw.rss_per_conn / 1024, 1, "KiB"),
                rss_ratio,
                "≤ 1.1x raw" if rss_goal else "",
                (rss_ratio is not None and rss_ratio <= 1.1) if rss_goal else None,
            ),
            Row(
                f"N = {n:,}, {every}: server CPU per ping",
                f"{fmt(median(steady.cpu_per_ping_us))} µs",
                f"{fmt(median(raw.cpu_per_ping_us))} µs",
                ratio(median(steady.cpu_per_ping_us), median(raw.cpu_per_ping_us)),
            ),
        ]
    ceiling = next(p for p in pairs if p[0].n == profile_n and p[0].interval_ms == INTERVAL_MS)
    per_ping, per_ping_raw = (median(h.cpu_per_ping_us) for h in ceiling)
    ceiling_ratio = ratio(per_ping_raw, per_ping)
    section.rows.append(
        Row(
            f"ceiling: connections one core can ping every {INTERVAL_MS} ms "
            f"(from CPU µs/ping at N = {profile_n:,})",
            fmt(1e6 / per_ping),
            fmt(1e6 / per_ping_raw),
            ceiling_ratio,
            "≥ 1.0x raw",
            ceiling_ratio is not None and ceiling_ratio >= 1.0,
        )
    )
    p99f = median(frozen.server_p99)
    section.rows.append(
        Row(
            f"N = {freeze_n:,}, application calls gc.freeze() every 1 s: lateness p99 (p50)",
            f"{fmt(p99f, 1)} ms ({fmt(median(frozen.server_p50), 1)}); full GCs {frozen.gc_full}",
            f"{fmt(median(frozen_raw.server_p99), 1)} ms "
            f"({fmt(median(frozen_raw.server_p50), 1)}); full GCs {frozen_raw.gc_full}",
            ratio(p99f, median(frozen_raw.server_p99)),
        )
    )
    lean_us, lean_raw_us = median(lean.cpu_per_ping_us), median(lean_raw.cpu_per_ping_us)
    section.rows.append(
        Row(
            f"N = {freeze_n:,}, compression off (SteadyServer(compression=None)) and gc.freeze(): "
            "CPU per ping, ceiling per core, lateness p99",
            f"{fmt(lean_us)} µs, ceiling {fmt(1e6 / lean_us)}, p99 "
            f"{fmt(median(lean.server_p99), 1)} ms, RSS/conn "
            f"{fmt(lean.rss_per_conn / 1024, 1, 'KiB')}",
            f"{fmt(lean_raw_us)} µs, ceiling {fmt(1e6 / lean_raw_us)}, p99 "
            f"{fmt(median(lean_raw.server_p99), 1)} ms, RSS/conn "
            f"{fmt(lean_raw.rss_per_conn / 1024, 1, 'KiB')}",
            ratio(lean_us, lean_raw_us),
        )
    )
    for steady, raw in pairs:
        for h in (steady, raw):
            if h.profile is not None:
                section.blocks.append(
                    render(
                        f"Profile of the {h.kind} server holding {h.n:,} connections for 3 s "
                        f"(about {h.connected * 3:,} pings)",
                        h.profile,
                        h.connected * 3,
                    )
                )
    section.seconds = time.monotonic() - started
    return section
