"""``steadysocket serve`` as a real subprocess: start, serve a client, stop on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from steadysocket.runtime.cli import build_parser, main
from tests.runtime.adapters import clean_env, steadysocket_command
from tests.runtime.redis_rig import redis_server

MS = 0.001
TIMEOUT = 10_000 * MS
T = TypeVar("T")
LISTENING = re.compile(r"listening on ws://127\.0\.0\.1:(\d+)")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(2 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


async def start_serve(*args: str) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """Start ``steadysocket serve --port 0`` and wait for its listening line."""
    process = await asyncio.create_subprocess_exec(
        *steadysocket_command(),
        "serve",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    assert process.stderr is not None
    lines: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            line = (await process.stderr.readline()).decode()
            assert line, f"serve exited early: {lines}"
            lines.append(line)
            if match := LISTENING.search(line):
                return process, int(match.group(1)), lines


async def rest_of_stderr(process: asyncio.subprocess.Process) -> list[str]:
    assert process.stderr is not None
    async with asyncio.timeout(TIMEOUT):
        data = await process.stderr.read()
        await process.wait()
    return data.decode().splitlines()


async def serve_then_signal(sig: signal.Signals) -> tuple[str, Close, int, list[str]]:
    process, port, lines = await start_serve("--heartbeat-interval-ms", "60000")
    try:
        async with connect(f"ws://127.0.0.1:{port}/ws/client?client_id=cli-test", proxy=None) as ws:
            async with asyncio.timeout(TIMEOUT):
                hello = await ws.recv()
            assert isinstance(hello, str)
            process.send_signal(sig)
            rcvd: Close | None = None
            try:
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await ws.recv()
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
            assert rcvd is not None
        lines += await rest_of_stderr(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return hello, rcvd, process.returncode, lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_serve_accepts_a_client_and_a_signal_closes_it_with_1001_and_exits_zero(
    sig: signal.Signals,
) -> None:
    hello, rcvd, returncode, lines = run(serve_then_signal(sig))
    assert '"type":"hello"' in hello
    assert '"heartbeat_interval_ms":60000' in hello
    assert (rcvd.code, rcvd.reason) == (1001, "Server shutting down")
    assert returncode == 0
    text = "".join(f"{line}\n" for line in lines)
    assert "Traceback" not in text


def test_serve_logs_one_info_line_per_connection_opened_and_closed() -> None:
    async def body() -> list[str]:
        process, port, lines = await start_serve()
        try:
            for query in ("client_id=first", "client_id=second"):
                async with connect(f"ws://127.0.0.1:{port}/ws/client?{query}", proxy=None) as ws:
                    async with asyncio.timeout(TIMEOUT):
                        await ws.recv()
            process.send_signal(signal.SIGTERM)
            return lines + await rest_of_stderr(process)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    lines = run(body())
    opened = [line for line in lines if " connected from " in line]
    closed = [line for line in lines if " disconnected: " in line]
    assert [" INFO " in line for line in opened + closed] == [True] * 4
    assert ["client first" in opened[0], "client second" in opened[1]] == [True, True]
    assert ["client first" in closed[0], "client second" in closed[1]] == [True, True]
    assert all(line.rstrip().endswith("disconnected: 1000") for line in closed)


def test_serve_on_a_port_in_use_prints_one_line_and_exits_non_zero() -> None:
    async def body() -> tuple[int, str]:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            process = await asyncio.create_subprocess_exec(
                *steadysocket_command(),
                "serve",
                "--port",
                str(port),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=clean_env(),
            )
            async with asyncio.timeout(TIMEOUT):
                _, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, err.decode()

    returncode, err = run(body())
    assert returncode != 0
    assert err.count("\n") == 1
    assert err.startswith("steadysocket: cannot serve on 127.0.0.1:")
    assert "address already in use" in err
    assert "Traceback" not in err


def test_serve_with_a_malformed_environment_variable_names_it_and_exits_two() -> None:
    async def body() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *steadysocket_command(),
            "serve",
            "--port",
            "0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(WS_HEARTBEAT_INTERVAL_MS="fast"),
        )
        async with asyncio.timeout(TIMEOUT):
            _, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, err.decode()

    returncode, err = run(body())
    assert returncode == 2
    assert err == (
        "steadysocket: WS_HEARTBEAT_INTERVAL_MS must be a positive integer of milliseconds "
        "(1..2147483647), got 'fast'\n"
    )


def test_serve_options_default_to_none_so_the_environment_can_fill_them() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert args.heartbeat_interval_ms is None
    assert args.connection_timeout_ms is None
    assert args.max_message_bytes is None
    explicit = build_parser().parse_args(
        ["serve", "--heartbeat-interval-ms", "5", "--max-message-bytes", "9"]
    )
    assert (explicit.heartbeat_interval_ms, explicit.max_message_bytes) == (5, 9)


def test_serve_takes_the_outbox_bound_and_the_collector_policy() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.max_outbox_bytes is None
    assert (args.gc_freeze_interval_ms, args.gc_gen0_threshold, args.no_gc) == (None, None, False)
    explicit = build_parser().parse_args(
        [
            "serve",
            "--max-outbox-bytes",
            "65536",
            "--gc-freeze-interval-ms",
            "0",
            "--gc-gen0-threshold",
            "5000",
            "--no-gc",
        ]
    )
    assert explicit.max_outbox_bytes == 65536
    assert (explicit.gc_freeze_interval_ms, explicit.gc_gen0_threshold) == (0, 5000)
    assert explicit.no_gc


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-outbox-bytes", "0", "max_outbox_bytes must be a positive integer, got 0"),
        ("--gc-gen0-threshold", "-5", "gc_gen0_threshold must be a positive integer, got -5"),
        (
            "--gc-freeze-interval-ms",
            "-1",
            "gc_freeze_interval_ms must be a positive integer no larger than 2147483647, got -1",
        ),
    ],
)
def test_serve_with_a_malformed_outbox_or_gc_option_names_it_and_exits_two(
    option: str, value: str, message: str
) -> None:
    async def body() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *steadysocket_command(),
            "serve",
            "--port",
            "0",
            option,
            value,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )
        async with asyncio.timeout(TIMEOUT):
            _, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, err.decode()

    assert run(body()) == (2, f"steadysocket: {message}\n")


def test_sigterm_ends_serve_within_the_close_timeout_even_when_clients_never_answer() -> None:
    """Issue 16, point 1: one client stops reading after its hello, another floods echo requests
    without reading; SIGTERM still ends the process within the close timeout (1 s here) plus
    the documented 1.5 s, with exit status 0."""

    async def body() -> tuple[float, int, list[str]]:
        process, port, lines = await start_serve(
            "--heartbeat-interval-ms", "60000", "--connection-timeout-ms", "1000"
        )
        url = f"ws://127.0.0.1:{port}"
        try:
            deaf = await connect(f"{url}/ws/client?client_id=deaf", proxy=None)
            hog = await connect(f"{url}/ws/client?client_id=hog", proxy=None, compression=None)
            try:
                async with asyncio.timeout(TIMEOUT):
                    await deaf.recv()
                    await hog.recv()
                deaf.transport.pause_reading()
                hog.transport.pause_reading()
                payload = '{"type":"hog","s":"' + "y" * 60_000 + '"}'
                try:
                    async with asyncio.timeout(2.0):
                        for _ in range(200):  # bounded; TCP pushes back long before the end
                            await hog.send(payload)
                except (TimeoutError, ConnectionClosed):
                    pass
                loop = asyncio.get_running_loop()
                began = loop.time()
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(TIMEOUT):
                    await process.wait()
                took = loop.time() - began
            finally:
                deaf.transport.abort()
                hog.transport.abort()
            lines += await rest_of_stderr(process)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return took, process.returncode, lines

    took, returncode, lines = run(body())
    assert took < 1.0 + 1.5 + 2.0  # close timeout, forced steps, slack for a loaded machine
    assert returncode == 0
    assert "Traceback" not in "".join(lines)


# ---- serve --workers N --redis URL -----------------------------------------------------------

WORKER_LISTENING = re.compile(r"\[worker (\d+) \d+\].*listening on ws://127\.0\.0\.1:(\d+)")
WORKER_CONNECTED = re.compile(r"\[worker (\d+) \d+\].*client (\S+) connected from")


def test_serve_refuses_workers_without_redis_with_a_clear_error() -> None:
    async def body() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *steadysocket_command(),
            "serve",
            "--port",
            "0",
            "--workers",
            "2",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )
        async with asyncio.timeout(TIMEOUT):
            _, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, err.decode()

    returncode, err = run(body())
    assert returncode == 2
    assert err == (
        "steadysocket: --workers 2 needs --redis URL: without a shared broker each worker "
        "would keep its own rooms, presence and broadcasts, and they would silently split\n"
    )


def test_serve_workers_below_one_are_refused() -> None:
    args = build_parser().parse_args(["serve", "--workers", "3", "--redis", "redis://h:1/0"])
    assert (args.workers, args.redis) == (3, "redis://h:1/0")
    assert build_parser().parse_args(["serve"]).workers == 1
    assert main(["serve", "--workers", "0"]) == 2


def test_serve_runs_n_workers_on_one_port_spreads_clients_and_stops_them_all() -> None:
    async def body() -> tuple[set[str], int, list[str], list[int]]:
        async with redis_server() as redis:
            process = await asyncio.create_subprocess_exec(
                *steadysocket_command(),
                "serve",
                "--port",
                "0",
                "--workers",
                "3",
                "--redis",
                redis.url,
                "--heartbeat-interval-ms",
                "60000",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=clean_env(),
            )
            assert process.stderr is not None
            lines: list[str] = []
            try:
                ports: dict[str, int] = {}
                async with asyncio.timeout(3 * TIMEOUT):
                    while len(ports) < 3:
                        line = (await process.stderr.readline()).decode()
                        assert line, f"serve exited early: {lines}"
                        lines.append(line)
                        if match := WORKER_LISTENING.search(line):
                            ports[match.group(1)] = int(match.group(2))
                assert len(set(ports.values())) == 1
                port = next(iter(ports.values()))
                async with contextlib.AsyncExitStack() as stack:
                    sockets = []
                    for i in range(30):
                        url = f"ws://127.0.0.1:{port}/ws/client?client_id=w{i}"
                        ws = await stack.enter_async_context(connect(url, proxy=None))
                        async with asyncio.timeout(TIMEOUT):
                            await ws.recv()  # the hello
                        sockets.append(ws)
                    workers: set[str] = set()
                    async with asyncio.timeout(TIMEOUT):
                        seen = 0
                        while seen < 30:
                            line = (await process.stderr.readline()).decode()
                            assert line, f"serve exited early: {lines}"
                            lines.append(line)
                            if match := WORKER_CONNECTED.search(line):
                                workers.add(match.group(1))
                                seen += 1
                    process.send_signal(signal.SIGTERM)
                    codes = []
                    for ws in sockets:
                        try:
                            async with asyncio.timeout(TIMEOUT):
                                while True:
                                    await ws.recv()
                        except ConnectionClosed as exc:
                            codes.append(-1 if exc.rcvd is None else exc.rcvd.code)
                lines += await rest_of_stderr(process)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode is not None
            return workers, process.returncode, lines, codes

    workers, returncode, lines, codes = run(body())
    assert len(workers) >= 2  # SO_REUSEPORT spread 30 connections over the 3 workers
    assert codes == [1001] * 30
    assert returncode == 0
    assert "Traceback" not in "".join(lines)


def test_serve_with_redis_alone_runs_one_process_on_a_redis_broker() -> None:
    async def body() -> tuple[str, str, int, list[str]]:
        async with redis_server() as redis:
            process, port, lines = await start_serve("--redis", redis.url)
            try:
                url = f"ws://127.0.0.1:{port}/ws/client?client_id=solo"
                async with connect(url, proxy=None) as ws:
                    async with asyncio.timeout(TIMEOUT):
                        hello = await ws.recv()
                    assert isinstance(hello, str)
                    async with asyncio.timeout(TIMEOUT):
                        generation = await redis_get(redis.url, "steadysocket:generation")
                process.send_signal(signal.SIGTERM)
                lines += await rest_of_stderr(process)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode is not None
            return hello, generation, process.returncode, lines

    hello, generation, returncode, lines = run(body())
    assert '"type":"hello"' in hello
    assert generation  # the broker reached Redis and took its cursor
    assert returncode == 0
    assert "Traceback" not in "".join(lines)


async def redis_get(url: str, key: str) -> str:
    from redis.asyncio import Redis

    client = Redis.from_url(url, decode_responses=True)
    try:
        value = await client.get(key)
    finally:
        await client.aclose()
    return "" if value is None else str(value)
