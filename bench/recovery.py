"""5. Recovery: server restarts, half-open connections, restart storms.

The server (``SteadyServer``, and for the half-open case a ``FaultProxy`` in front of it) runs
in its own process; the clients (``WebSocketManager``, default production backoff: 1 s first
delay, ±20 % jitter) in another. Times cross processes on ``time.monotonic()``, which on Linux
is one clock for the whole machine.

- **Restart → open**: the server closes (1001 ``Server shutting down``, every client told to
  reconnect gracefully), stays down for a fixed downtime, and listens again on the same port.
  The client goes straight to ``reconnecting``; that attempt is refused while the server is
  down, so the client waits one backoff step. Measured: from the start of the shutdown to
  ``open`` again, and from listening again to ``open``; against the first backoff delay.
- **Half-open**: the proxy starts swallowing everything on the open connection (``BLACKHOLE``),
  with TCP still up. Measured: from that moment to ``degraded`` and to the client giving the
  connection up (``peer_dead``), against the server's heartbeat interval.
- **Restart storm**: many clients on one server; the server process is killed (SIGKILL: no
  close frame) or shut down gracefully (1001), and a new one listens on the same port after a
  fixed downtime. With jitter (±20 % on the backoff, and a graceful reconnect's delay drawn
  within ``graceful_jitter_ms`` = 1000 ms) and with jitter 0 (same backoff delays, a graceful
  reconnect at once), attempts are counted per 100 ms in two views. *Observed*: every attempt
  as the load generator started it (a recording ``opener``). All clients share one Python
  process and one core there, so that process's own CPU smears every burst: it cannot notice
  1,000 closed sockets, or start 1,000 handshakes, in the same 100 ms. *Fleet*: what separate
  clients would do, all noticing the outage at the same instant: each client's graceful
  reconnect at the delay its lifecycle drew (at 0 without a window), and its first retry that
  much later plus the delay its own backoff drew (both recorded through the manager's
  ``sleep``). The goal is judged on the fleet view, the delays the runtime really drew, every
  attempt counted (the graceful reconnect included); the observed view is shown beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing.connection
import random
import time
from collections import Counter
from typing import Any

from bench.common import (
    CLIENT_CPU,
    SERVER_CPU,
    BenchError,
    Child,
    Inbox,
    Row,
    Section,
    Sizes,
    fmt,
    median,
    percentile,
    ratio,
)
from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.faultproxy import FaultProxy, Mode
from steadysocket.runtime.manager import Sleep, WebSocketManager
from steadysocket.runtime.server import SteadyServer
from steadysocket.runtime.transport import Opener, Transport, open_websocket

FIRST_DELAY_MS = BackoffStrategy.create_production_strategy(seed=0).base_delays_ms[0]
HALF_OPEN_HEARTBEAT_MS = 1000
DOWNTIME_S = 0.5
BUCKET_S = 0.1
RETRY_TASK = "steadysocket-timer-retry"
GRACEFUL_TASK = "steadysocket-timer-graceful"
GRACEFUL_JITTER_MS = 1000.0
"""The window a graceful reconnect's delay is drawn from in the storm's jittered runs."""


# -- servers --------------------------------------------------------------------------------


async def _bind(port: int, **settings: Any) -> SteadyServer:
    """A SteadyServer on ``port``, retrying briefly while the old socket lets go."""
    for attempt in range(50):
        server = SteadyServer("127.0.0.1", port, environ={}, **settings)
        try:
            await server.start()
            return server
        except OSError:
            if attempt == 49:
                raise
            await asyncio.sleep(0.02)
    raise AssertionError("unreachable")


def _server_main(conn: multiprocessing.connection.Connection, port: int, proxied: bool) -> None:
    """A SteadyServer (optionally behind a FaultProxy) that restarts or blackholes on command."""

    async def main() -> None:
        settings: dict[str, Any] = {}
        if proxied:
            settings["heartbeat_interval_ms"] = HALF_OPEN_HEARTBEAT_MS
        server = await _bind(port, **settings)
        proxy: FaultProxy | None = None
        if proxied:
            proxy = FaultProxy(server.port)
            await proxy.start()
        inbox = Inbox(conn)
        inbox.reply(proxy.port if proxy is not None else server.port)
        for _ in range(10_000):
            command = await inbox.get()
            if command[0] == "stop":
                break
            if command[0] == "restart":
                began = time.monotonic()
                await server.close()
                closed = time.monotonic()
                await asyncio.sleep(command[1])
                server = await _bind(server.port, **settings)
                inbox.reply({"began": began, "closed": closed, "listening": time.monotonic()})
            elif command[0] == "shutdown":
                began = time.monotonic()
                await server.close()
                inbox.reply({"began": began, "closed": time.monotonic()})
                break
            elif command[0] == "blackhole":
                assert proxy is not None
                began = time.monotonic()
                proxy.set_mode(Mode.BLACKHOLE, apply_to_current=True)
                proxy.set_mode(Mode.PASS)  # new connections (the reconnect) go through
                inbox.reply(began)
        if proxy is not None:
            await proxy.close()
        await server.close()
        inbox.close()

    asyncio.run(main())


# -- one client -----------------------------------------------------------------------------


def _one_client_main(conn: multiprocessing.connection.Connection, port: int) -> None:
    """One WebSocketManager; reports every phase change with its time."""

    async def main() -> None:
        events: list[tuple[float, Phase]] = []
        changed = asyncio.Event()

        def on_state(state: WSState) -> None:
            events.append((time.monotonic(), state.phase))
            changed.set()

        manager = WebSocketManager(
            f"ws://127.0.0.1:{port}", "recovery-client", stable_after_ms=300, environ={}
        )
        manager.on_state_change(on_state)
        inbox = Inbox(conn)
        try:
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=10)
            inbox.reply(True)
            for _ in range(10_000):
                command = await inbox.get()
                if command[0] == "stop":
                    break
                # ("until", since, phases, timeout): the first change after ``since`` into
                # one of ``phases``, and every change between.
                _, since, wanted, timeout = command
                deadline = time.monotonic() + timeout
                found: float | None = None
                for _ in range(100_000):
                    hits = [t for t, p in events if t > since and p in wanted]
                    if hits or time.monotonic() > deadline:
                        found = hits[0] if hits else None
                        break
                    changed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                            await changed.wait()
                trace = [(t, str(p)) for t, p in events if t > since]
                inbox.reply({"at": found, "trace": trace})
        finally:
            await manager.destroy()
            inbox.close()

    asyncio.run(main())


def _restart_to_open(restarts: int) -> tuple[list[float], list[float], int]:
    """Seconds from shutdown to open, and from listening to open, per restart."""
    from_down: list[float] = []
    from_up: list[float] = []
    failed = 0
    with Child(_server_main, 0, False, cpu=SERVER_CPU, name="restart-server") as server:
        port = server.receive(30)
        with Child(_one_client_main, port, cpu=CLIENT_CPU, name="restart-client") as client:
            client.receive(30)
            for _ in range(restarts):
                time.sleep(0.5)  # past the stable period: each restart is a fresh outage
                times = server.call(("restart", DOWNTIME_S), 30)
                answer = client.call(("until", times["began"], {Phase.OPEN}, 30.0), 60)
                if answer["at"] is None:
                    failed += 1
                    continue
                from_down.append(answer["at"] - times["began"])
                from_up.append(answer["at"] - times["listening"])
    return from_down, from_up, failed


def _half_open(repeats: int) -> tuple[list[float], list[float]]:
    """Seconds from blackhole to degraded, and to giving the connection up."""
    to_degraded: list[float] = []
    to_dead: list[float] = []
    gone = {Phase.RECONNECTING, Phase.FAILED, Phase.FALLBACK, Phase.CONNECTING}
    rng = random.Random(6)
    with Child(_server_main, 0, True, cpu=SERVER_CPU, name="half-open-server") as server:
        port = server.receive(30)
        with Child(_one_client_main, port, cpu=CLIENT_CPU, name="half-open-client") as client:
            client.receive(30)
            for _ in range(repeats):
                # A random offset from the heartbeat's phase, as a real outage would have.
                time.sleep(0.5 + rng.random() * HALF_OPEN_HEARTBEAT_MS / 1000)
                began = server.call(("blackhole",), 30)
                degraded = client.call(("until", began, {Phase.DEGRADED}, 20.0), 40)
                dead = client.call(("until", began, gone, 20.0), 40)
                if degraded["at"] is None or dead["at"] is None:
                    raise BenchError(f"half-open not detected: {dead['trace']}")
                to_degraded.append(degraded["at"] - began)
                to_dead.append(dead["at"] - began)
                back = client.call(("until", dead["at"], {Phase.OPEN}, 30.0), 60)
                if back["at"] is None:
                    raise BenchError(f"no reconnect after half-open: {back['trace']}")
    return to_degraded, to_dead


# -- the storm ------------------------------------------------------------------------------


def _storm_client_main(
    conn: multiprocessing.connection.Connection, port: int, count: int, jitter: bool
) -> None:
    async def main() -> None:
        attempts: list[list[float]] = [[] for _ in range(count)]
        retries: list[list[tuple[float, float]]] = [[] for _ in range(count)]
        graceful: list[list[tuple[float, float]]] = [[] for _ in range(count)]

        def recording(i: int) -> tuple[Opener, Sleep]:
            async def opener(url: str) -> Transport:
                attempts[i].append(time.monotonic())
                return await open_websocket(url)

            async def sleep(delay: float) -> None:
                # The manager names each timer's task after its timer (the stateful tests
                # rely on it too): record when each retry, and each graceful reconnect's
                # delay, was armed and for how long.
                task = asyncio.current_task()
                name = task.get_name() if task is not None else ""
                if name == RETRY_TASK:
                    retries[i].append((time.monotonic(), delay))
                elif name == GRACEFUL_TASK:
                    graceful[i].append((time.monotonic(), delay))
                await asyncio.sleep(delay)

            return opener, sleep

        managers = []
        for i in range(count):
            if jitter:
                backoff = BackoffStrategy.create_production_strategy(rng=random.Random(i))
            else:
                backoff = BackoffStrategy(jitter_ratio=0.0)  # same delays, no jitter
            opener, sleep = recording(i)
            managers.append(
                WebSocketManager(
                    f"ws://127.0.0.1:{port}",
                    f"storm-{i}",
                    backoff_strategy=backoff,
                    opener=opener,
                    sleep=sleep,
                    graceful_jitter_ms=GRACEFUL_JITTER_MS if jitter else 0.0,
                    environ={},
                )
            )
        inbox = Inbox(conn)

        async def all_open(limit_s: float) -> bool:
            deadline = time.monotonic() + limit_s
            for _ in range(100_000):
                if all(m.phase is Phase.OPEN for m in managers):
                    return True
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.05)
            return False

        try:
            for m in managers:
                await m.connect()
            inbox.reply(await all_open(60))
            command = await inbox.get()  # ("collect", since, timeout)
            if command[0] == "collect":
                _, since, timeout = command
                reopened = await all_open(timeout)
                done = time.monotonic()
                observed: list[float] = []
                fleet: list[float] = []
                for mine, armed, spread in zip(attempts, retries, graceful, strict=True):
                    after = [t - since for t in mine if t >= since]
                    observed += after
                    first_retry = next(((t, d) for t, d in armed if t >= since), None)
                    delayed = next((d for t, d in spread if t >= since), None)
                    # As a fleet of separate clients would dial: all notice the outage at
                    # once; the graceful reconnect at the delay the lifecycle drew, or an
                    # immediate attempt (one made before any retry was armed) at 0; then the
                    # first retry that much later, after the delay its own backoff drew.
                    retry_at = math.inf if first_retry is None else first_retry[0] - since
                    offset = 0.0
                    if delayed is not None:
                        offset = delayed
                        fleet.append(delayed)
                    elif any(t < retry_at for t in after):
                        fleet.append(0.0)
                    if first_retry is not None:
                        fleet.append(offset + first_retry[1])
                inbox.reply(
                    {
                        "attempts": observed,
                        "fleet": fleet,
                        "retried": sum(1 for r in retries if any(t >= since for t, _ in r)),
                        "delayed": sum(1 for g in graceful if any(t >= since for t, _ in g)),
                        "reopened": reopened,
                        "all_open_after": done - since,
                        "phases": dict(Counter(str(m.phase) for m in managers)),
                    }
                )
        finally:
            async with asyncio.timeout(60):
                await asyncio.gather(*(m.destroy() for m in managers))
            inbox.close()

    logging.getLogger("steadysocket").setLevel(logging.ERROR)
    asyncio.run(main())


def _storm(count: int, jitter: bool, crash: bool, timeout: float) -> dict[str, Any]:
    server = Child(_server_main, 0, False, cpu=SERVER_CPU, name="storm-server")
    client: Child | None = None
    try:
        port = server.receive(30)
        client = Child(_storm_client_main, port, count, jitter, cpu=CLIENT_CPU, name="storm")
        if not client.receive(90):
            raise BenchError(f"storm: {count} clients did not all open")
        time.sleep(0.5)
        if crash:
            since = time.monotonic()
            server.kill()
        else:
            since = server.call(("shutdown",), 30)["began"]
            server.stop()
        time.sleep(DOWNTIME_S)
        server = Child(_server_main, port, False, cpu=SERVER_CPU, name="storm-server-2")
        server.receive(30)
        result: dict[str, Any] = client.call(("collect", since, timeout), timeout + 60)
        return result
    finally:
        if client is not None:
            client.stop(timeout=90)
        server.stop()


def _histogram(attempts: list[float], until: float) -> list[int]:
    buckets = [0] * (int(until / BUCKET_S) + 1)
    for t in attempts:
        index = int(t / BUCKET_S)
        if 0 <= index < len(buckets):
            buckets[index] += 1
    return buckets


def _render_storm(
    title: str, on: dict[str, Any], off: dict[str, Any], count: int, graceful: bool
) -> str:
    views = [
        ("fleet", "the delays drawn, as separate clients would dial"),
        ("attempts", "attempts observed in the one load-generating process"),
    ]
    out = [
        f"**{title}**: attempts per 100 ms after the server went down ({count:,} clients; "
        f"down {DOWNTIME_S:g} s plus the new process's start). Left: {views[0][1]}. "
        f"Right: {views[1][1]}."
        + (
            f" With jitter, the graceful reconnect waits a delay drawn within "
            f"{GRACEFUL_JITTER_MS:g} ms (`graceful_jitter_ms`); with jitter 0 it dials at once."
            if graceful
            else ""
        ),
        "",
        "```",
        f"{'':>6}  {'fleet view':^27}  {'observed':^27}",
        f"{'t (s)':>6}  {'jitter ±20 %':>13} {'jitter 0':>13}  "
        f"{'jitter ±20 %':>13} {'jitter 0':>13}",
    ]
    until = max([*on["attempts"], *off["attempts"], *on["fleet"], *off["fleet"], 0.0])
    columns = [_histogram(run[key], until + BUCKET_S) for key, _ in views for run in (on, off)]
    for i, cells in enumerate(zip(*columns, strict=True)):
        if any(cells):
            a, b, c, d = (f"{n:>5} {_bar(n, count):<7}" if n else f"{'':13}" for n in cells)
            out.append(f"{i * BUCKET_S:>6.1f}  {a} {b}  {c} {d}")
    out.append("```")
    return "\n".join(out)


def _bar(n: int, count: int) -> str:
    return "#" * max(1, round(n / max(count, 1) * 7))


def _peak(attempts: list[float]) -> int:
    return max(_histogram(attempts, max(attempts, default=0.0) + BUCKET_S), default=0)


# -- the benchmark --------------------------------------------------------------------------


def run(sizes: Sizes) -> Section:
    """Run benchmark 5 and report it."""
    restarts: int = sizes.pick(25, 5)
    repeats: int = sizes.pick(10, 3)
    count: int = sizes.pick(1_000, 100)
    section = Section(
        "recovery",
        "5. Recovery",
        f"Restart → open over {restarts} restarts (downtime {DOWNTIME_S:g} s); half-open "
        f"detection over {repeats} blackholes (heartbeat {HALF_OPEN_HEARTBEAT_MS} ms); restart "
        f"storms with {count:,} clients. Server and clients in separate processes.",
    )
    started = time.monotonic()
    down, up, failed = _restart_to_open(restarts)
    first = FIRST_DELAY_MS / 1000
    section.rows += [
        Row(
            "restart → open, from the start of the shutdown: median (p99)",
            f"{fmt(median(down) * 1000)} ms ({fmt(percentile(down, 99) * 1000)} ms); "
            f"{len(down)} restarts" + (f", {failed} never reopened" if failed else ""),
            f"first backoff delay {FIRST_DELAY_MS:g} ms (±20 %: "
            f"{FIRST_DELAY_MS * 0.8:g}..{FIRST_DELAY_MS * 1.2:g})",
            ratio(median(down), first),
        ),
        Row(
            "restart → open, from the server listening again: median (p99)",
            f"{fmt(median(up) * 1000)} ms ({fmt(percentile(up, 99) * 1000)} ms)",
            f"first backoff delay - downtime: {FIRST_DELAY_MS - DOWNTIME_S * 1000:g} ms",
            ratio(median(up), first - DOWNTIME_S),
        ),
    ]
    degraded, dead = _half_open(repeats)
    interval = HALF_OPEN_HEARTBEAT_MS / 1000
    section.rows += [
        Row(
            "half-open: blackhole → degraded, median (max)",
            f"{fmt(median(degraded) * 1000)} ms ({fmt(max(degraded) * 1000)} ms)",
            f"heartbeat interval {HALF_OPEN_HEARTBEAT_MS} ms; degraded after 1.2x silence",
            ratio(median(degraded), interval),
        ),
        Row(
            "half-open: blackhole → connection given up (peer dead), median (max)",
            f"{fmt(median(dead) * 1000)} ms ({fmt(max(dead) * 1000)} ms)",
            f"heartbeat interval {HALF_OPEN_HEARTBEAT_MS} ms; dead after 2x silence",
            ratio(median(dead), interval),
        ),
    ]
    timeout = sizes.pick(40.0, 20.0)
    for crash in (True, False):
        on = _storm(count, True, crash, timeout)
        off = _storm(count, False, crash, timeout)
        # A graceful run may need no retry at all: with 1,000 clients the old server's close
        # takes long enough that the reconnects can find the new server listening. It must
        # show its reconnects instead: delayed with jitter, at t = 0 without.
        if crash and 0 in (on["retried"], off["retried"]):
            raise BenchError(f"no retry timer recorded (task {RETRY_TASK!r} renamed?)")
        if not crash and on["delayed"] == 0:
            raise BenchError(f"no graceful delay recorded (task {GRACEFUL_TASK!r} renamed?)")
        if not crash and 0.0 not in off["fleet"]:
            raise BenchError("no immediate graceful reconnect recorded with jitter 0")
        kind = "crash (SIGKILL, no close frame)" if crash else "graceful shutdown (1001)"
        # Every attempt counts, the graceful reconnect included: with jitter it waits a
        # delay drawn within the window; with jitter 0 it dials at once.
        fleet_on, fleet_off = _peak(on["fleet"]), _peak(off["fleet"])
        seen_on, seen_off = _peak(on["attempts"]), _peak(off["attempts"])
        what = "retries" if crash else "attempts (the graceful reconnect and retries)"
        jittered = (
            "jitter ±20 %"
            if crash
            else f"jitter ±20 % and graceful_jitter_ms={GRACEFUL_JITTER_MS:g}"
        )
        section.rows += [
            Row(
                f"storm, {kind}: peak {what} per 100 ms, fleet view",
                f"{fleet_on:,} with {jittered}",
                f"{fleet_off:,} with jitter 0",
                ratio(fleet_on, fleet_off),
                "peak visibly spread (≤ 0.5x jitter 0)",
                fleet_on * 2 <= fleet_off,
            ),
            Row(
                f"storm, {kind}: peak attempts per 100 ms, observed in one process",
                f"{seen_on:,} with jitter (all open after {on['all_open_after']:.1f} s"
                + ("" if on["reopened"] else f", NOT all reopened: {on['phases']}")
                + ")",
                f"{seen_off:,} with jitter 0 (all open after {off['all_open_after']:.1f} s"
                + ("" if off["reopened"] else f", NOT all reopened: {off['phases']}")
                + ")",
                ratio(seen_on, seen_off),
            ),
        ]
        if not crash:
            section.rows.append(
                Row(
                    f"storm, {kind}: graceful reconnects at t = 0 (not delayed), fleet view",
                    f"{sum(1 for t in on['fleet'] if t == 0.0):,} at t = 0 with jitter "
                    f"({on['delayed']:,} delayed)",
                    f"{sum(1 for t in off['fleet'] if t == 0.0):,} at t = 0 with jitter 0",
                )
            )
        section.blocks.append(
            _render_storm(f"Restart storm, {kind}", on, off, count, graceful=not crash)
        )
    section.seconds = time.monotonic() - started
    return section
