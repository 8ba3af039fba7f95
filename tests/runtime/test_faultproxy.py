"""``FaultProxy`` against a plain TCP echo server on 127.0.0.1: every mode, switched at runtime.

No test asserts how long something took. Delay and drip are shown by orders and counts: a
delayed chunk arrives after one sent later on a direct connection, and a dripped payload
arrives in many small pieces. Every wait is bounded by a multiple of ``MS``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from steadysocket.testing import FaultProxy, Flap, Mode

MS = 0.001
TIMEOUT = 5_000 * MS
T = TypeVar("T")

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(4 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def echo_server() -> AsyncIterator[asyncio.Server]:
    """A TCP echo server on 127.0.0.1 that echoes every chunk as it arrives."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server


def port_of(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


@asynccontextmanager
async def rig(**kwargs: Any) -> AsyncIterator[tuple[asyncio.Server, FaultProxy]]:
    async with echo_server() as server, FaultProxy(port_of(server), **kwargs) as proxy:
        yield server, proxy


async def dial(port: int) -> Stream:
    async with asyncio.timeout(TIMEOUT):
        return await asyncio.open_connection("127.0.0.1", port)


async def read_exactly(stream: Stream, n: int) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return await stream[0].readexactly(n)


async def roundtrip(stream: Stream, data: bytes) -> bytes:
    stream[1].write(data)
    await stream[1].drain()
    return await read_exactly(stream, len(data))


async def outcome(stream: Stream, wait: float = 300 * MS) -> str:
    """What a connection sees next: ``data``, ``eof``, ``reset`` or ``nothing`` within ``wait``."""
    try:
        async with asyncio.timeout(wait):
            data = await stream[0].read(65536)
    except TimeoutError:
        return "nothing"
    except ConnectionResetError:
        return "reset"
    return "data" if data else "eof"


async def hang_up(stream: Stream) -> None:
    stream[1].close()
    with contextlib.suppress(OSError):
        await stream[1].wait_closed()


def test_pass_forwards_both_ways() -> None:
    async def body() -> bytes:
        async with rig() as (_, proxy):
            stream = await dial(proxy.port)
            echoed = await roundtrip(stream, b"hello through the proxy")
            await hang_up(stream)
            return echoed

    assert run(body()) == b"hello through the proxy"


def test_delay_holds_each_chunk_back_so_a_later_direct_chunk_arrives_first() -> None:
    async def body() -> list[str]:
        async with rig(delay_ms=400) as (server, proxy):
            delayed, direct = await dial(proxy.port), await dial(port_of(server))
            assert await roundtrip(delayed, b"warm") == b"warm"
            proxy.set_mode(Mode.DELAY, apply_to_current=True)
            arrivals: list[str] = []

            async def arrive(name: str, stream: Stream, data: bytes) -> None:
                assert await read_exactly(stream, len(data)) == data
                arrivals.append(name)

            delayed[1].write(b"first, via the delay")
            await asyncio.sleep(20 * MS)
            direct[1].write(b"second, direct")
            async with asyncio.TaskGroup() as group:
                group.create_task(arrive("delayed", delayed, b"first, via the delay"))
                group.create_task(arrive("direct", direct, b"second, direct"))
            # Back to pass at runtime: the same connection carries on.
            proxy.set_mode(Mode.PASS, apply_to_current=True)
            assert await roundtrip(delayed, b"undelayed") == b"undelayed"
            await hang_up(delayed)
            await hang_up(direct)
            return arrivals

    assert run(body()) == ["direct", "delayed"]


def test_delay_keeps_the_order_of_chunks() -> None:
    async def body() -> bytes:
        async with rig() as (_, proxy):
            proxy.set_mode(Mode.DELAY, delay_ms=30)
            stream = await dial(proxy.port)
            payload = b"".join(b"%03d," % i for i in range(100))
            for i in range(0, len(payload), 40):
                stream[1].write(payload[i : i + 40])
                await asyncio.sleep(MS)
            echoed = await read_exactly(stream, len(payload))
            await hang_up(stream)
            return echoed

    assert run(body()) == b"".join(b"%03d," % i for i in range(100))


def test_drip_delivers_a_payload_in_many_small_pieces() -> None:
    async def body() -> tuple[bytes, list[int]]:
        async with rig() as (_, proxy):
            proxy.set_mode(Mode.DRIP, drip_bytes=8, drip_interval_ms=10)
            stream = await dial(proxy.port)
            payload = bytes(range(256)) * 2
            stream[1].write(payload)
            pieces: list[int] = []
            received = b""
            async with asyncio.timeout(TIMEOUT):
                while len(received) < len(payload):
                    piece = await stream[0].read(65536)
                    assert piece
                    pieces.append(len(piece))
                    received += piece
            await hang_up(stream)
            return received, pieces

    received, pieces = run(body())
    assert received == bytes(range(256)) * 2
    # 512 bytes, 8 at a time both ways, 10 ms apart: far more than a few reads, however the
    # receiver's reads happen to line up with the drips.
    assert len(pieces) >= 8


def test_blackhole_keeps_tcp_open_and_forwards_nothing() -> None:
    async def body() -> tuple[str, str, bytes]:
        async with rig() as (_, proxy):
            old = await dial(proxy.port)
            assert await roundtrip(old, b"before") == b"before"
            proxy.set_mode(Mode.BLACKHOLE, apply_to_current=True)
            old[1].write(b"into the void")
            await old[1].drain()
            silent = await outcome(old)
            fresh = await dial(proxy.port)
            fresh[1].write(b"also swallowed")
            fresh_silent = await outcome(fresh)
            proxy.set_mode(Mode.PASS)
            newest = await dial(proxy.port)
            echoed = await roundtrip(newest, b"after")
            for stream in (old, fresh, newest):
                await hang_up(stream)
            return silent, fresh_silent, echoed

    assert run(body()) == ("nothing", "nothing", b"after")


def test_close_ends_current_connections_with_fin_and_closes_new_ones() -> None:
    async def body() -> tuple[str, str]:
        async with rig() as (_, proxy):
            old = await dial(proxy.port)
            assert await roundtrip(old, b"x") == b"x"
            proxy.set_mode(Mode.CLOSE, apply_to_current=True)
            current = await outcome(old, TIMEOUT)
            fresh = await dial(proxy.port)
            new = await outcome(fresh, TIMEOUT)
            await hang_up(old)
            await hang_up(fresh)
            return current, new

    assert run(body()) == ("eof", "eof")


def test_reset_aborts_current_connections_with_rst_and_resets_new_ones() -> None:
    async def body() -> tuple[str, str]:
        async with rig() as (_, proxy):
            old = await dial(proxy.port)
            assert await roundtrip(old, b"x") == b"x"
            proxy.set_mode("reset", apply_to_current=True)
            current = await outcome(old, TIMEOUT)
            fresh = await dial(proxy.port)
            new = await outcome(fresh, TIMEOUT)
            await hang_up(old)
            await hang_up(fresh)
            return current, new

    assert run(body()) == ("reset", "reset")


def test_set_mode_without_apply_to_current_leaves_open_connections_alone() -> None:
    async def body() -> tuple[bytes, str]:
        async with rig() as (_, proxy):
            old = await dial(proxy.port)
            assert await roundtrip(old, b"up") == b"up"
            proxy.set_mode(Mode.RESET)
            echoed = await roundtrip(old, b"still up")
            fresh = await dial(proxy.port)
            new = await outcome(fresh, TIMEOUT)
            await hang_up(old)
            await hang_up(fresh)
            return echoed, new

    assert run(body()) == (b"still up", "reset")


def test_flap_cycles_down_and_up_a_bounded_number_of_times_then_stays_up() -> None:
    async def body() -> tuple[list[str], int, Mode, bytes]:
        async with rig() as (_, proxy):
            old = await dial(proxy.port)
            assert await roundtrip(old, b"up") == b"up"
            proxy.set_mode(Mode.FLAP, flap=Flap(up_ms=150, down_ms=150, cycles=3))
            assert proxy.mode is Mode.FLAP
            seen: list[str] = []
            # The old connection is reset by the first down.
            seen.append(await outcome(old, TIMEOUT))
            # Watch the link go down and up: sample which state each fresh connection meets.
            async with asyncio.timeout(TIMEOUT):
                while not proxy.is_down:  # noqa: ASYNC110 - sampling the proxy's state
                    await asyncio.sleep(5 * MS)
                down = await dial(proxy.port)
                seen.append(await outcome(down, TIMEOUT))
                while proxy.is_down:  # noqa: ASYNC110
                    await asyncio.sleep(5 * MS)
            async with asyncio.timeout(TIMEOUT):
                await proxy.wait_flap_done()
            after = await dial(proxy.port)
            echoed = await roundtrip(after, b"up for good")
            for stream in (old, down, after):
                await hang_up(stream)
            return seen, proxy.flap_cycles_done, proxy.mode, echoed

    seen, cycles, mode, echoed = run(body())
    assert seen == ["reset", "reset"]
    assert cycles == 3
    assert mode is Mode.PASS
    assert echoed == b"up for good"


def test_switching_mode_stops_a_flap_in_progress() -> None:
    async def body() -> tuple[int, bool, bytes]:
        async with rig() as (_, proxy):
            proxy.set_mode(Mode.FLAP, flap=Flap(up_ms=5_000, down_ms=5_000, cycles=100))
            await asyncio.sleep(0)
            proxy.set_mode(Mode.PASS)
            async with asyncio.timeout(TIMEOUT):
                await proxy.wait_flap_done()
            stream = await dial(proxy.port)
            echoed = await roundtrip(stream, b"pass again")
            await hang_up(stream)
            return proxy.flap_cycles_done, proxy.is_down, echoed

    assert run(body()) == (0, False, b"pass again")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"up_ms": 10, "down_ms": 10, "cycles": 0},
        {"up_ms": 0, "down_ms": 10, "cycles": 1},
        {"up_ms": 10, "down_ms": -1, "cycles": 1},
        {"up_ms": 10, "down_ms": 10, "cycles": 1, "down_mode": Mode.DELAY},
    ],
)
def test_a_flap_must_be_bounded_and_go_down_by_a_fault(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="flap"):
        Flap(**kwargs)


def test_flap_needs_its_settings_and_a_started_proxy() -> None:
    proxy = FaultProxy(1)
    with pytest.raises(ValueError, match="Flap"):
        proxy.set_mode(Mode.FLAP)
    with pytest.raises(RuntimeError, match="start"):
        proxy.set_mode(Mode.FLAP, flap=Flap(up_ms=1, down_ms=1, cycles=1))
    with pytest.raises(ValueError, match="drip_bytes"):
        proxy.set_mode(Mode.DRIP, drip_bytes=0)


def test_a_target_that_is_down_drops_the_client_connection() -> None:
    async def body() -> str:
        async with echo_server() as server:
            port = port_of(server)
        async with FaultProxy(port) as proxy:
            stream = await dial(proxy.port)
            result = await outcome(stream, TIMEOUT)
            await hang_up(stream)
            return result

    assert run(body()) in {"eof", "reset"}


def test_close_ends_every_task_even_with_links_stuck_in_every_mode() -> None:
    async def body() -> tuple[set[asyncio.Task[Any]], set[asyncio.Task[Any]], int, int]:
        before = asyncio.all_tasks()
        async with echo_server() as server:
            proxy = FaultProxy(port_of(server))
            await proxy.start()
            streams = []
            for mode in (Mode.PASS, Mode.DELAY, Mode.DRIP, Mode.BLACKHOLE):
                proxy.set_mode(mode, delay_ms=10_000, drip_interval_ms=10_000)
                stream = await dial(proxy.port)
                stream[1].write(b"x" * 100_000)
                streams.append(stream)
            async with asyncio.timeout(TIMEOUT):
                while proxy.forwarded < 4:  # noqa: ASYNC110 - the proxy accepting
                    await asyncio.sleep(MS)
            links = proxy.link_count
            accepted = proxy.accepted
            await proxy.close()
            for stream in streams:
                await hang_up(stream)
        return before, asyncio.all_tasks(), links, accepted

    before, after, links, accepted = run(body())
    assert (links, accepted) == (4, 4)
    assert after == before
