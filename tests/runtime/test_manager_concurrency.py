"""``WebSocketManager`` under overlapping calls and misbehaving peers: one named regression test
per point of the runtime issue ("no wedge, no leak, no double send").

Most run on the in-memory server and the :class:`VirtualClock`; the socket-leak and double-send
tests run over real sockets on 127.0.0.1 (the loopback server, and the fault proxy for a peer
that never answers). ``tests/runtime/test_manager_interleaving.py`` draws the same overlaps and
faults at random.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import json
import math
import os
from datetime import UTC, datetime
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from steadysocket.model.classify import ErrorKind
from steadysocket.model.snapshot import AttemptOutcome, Phase, WSState
from steadysocket.runtime.faultproxy import FaultProxy, Mode
from steadysocket.runtime.manager import ManagerClosed, WebSocketManager, WSError
from steadysocket.runtime.transport import failure_from_exception
from tests.runtime.fakes import (
    ConnState,
    InMemoryServer,
    LoopbackServer,
    MemoryTransport,
    Script,
    VirtualClock,
    failures_into,
)
from tests.runtime.test_manager import BOUND, phase_of, rig, run, steadysocket_tasks


def _link(server: InMemoryServer) -> MemoryTransport:
    record = server.current()
    assert record is not None
    return server._links[record.index]


def _ids(frames: list[str]) -> list[int]:
    return [json.loads(f)["id"] for f in frames if '"data"' in f]


# -- 1. concurrent calls never wedge the manager ----------------------------------------------


def test_two_concurrent_connects_reach_open_with_one_attempt() -> None:
    async def main() -> None:
        clock, server, m = rig()
        await asyncio.gather(m.connect(), m.connect())
        await clock.settle()
        assert m.phase is Phase.OPEN
        assert m.get_state().stats.total_attempts == 1
        assert len(server.connections) == 1
        assert m.send({"type": "data", "id": 1})
        await clock.settle()
        assert _ids(server.connections[0].taken) == [1]
        await m.disconnect()
        assert steadysocket_tasks() == []

    run(main)


def test_connect_together_with_force_reconnect_reaches_open_on_one_live_connection() -> None:
    # The calls run one after the other, in call order: connect() starts an attempt, then
    # force_reconnect() drops it (or the connection it opened) and starts one fresh attempt, as
    # it promises. Never two live connections, and the manager is never wedged.
    async def main() -> None:
        clock, server, m = rig()
        await asyncio.gather(m.connect(), m.force_reconnect())
        await clock.settle()
        assert m.phase is Phase.OPEN
        assert [c.state for c in server.connections] == [ConnState.CLOSED, ConnState.OPEN]
        assert server.connections[0].close_reason == "Client reconnect"
        outcomes = [a.outcome for a in m.get_state().recent_attempts]
        assert outcomes.count(AttemptOutcome.IN_FLIGHT) == 0
        assert m.get_state().stats.total_attempts == 2
        assert m.send({"type": "data", "id": 1})
        await clock.settle()
        assert _ids(server.live()[0].taken) == [1]
        await m.destroy()
        assert steadysocket_tasks() == []

    run(main)


def _consistent(m: WebSocketManager, server: InMemoryServer) -> str:
    """Either idle with no task left, or open with a send() that really reaches the server."""
    if m.phase is Phase.IDLE:
        assert steadysocket_tasks() == []
        assert server.live() == []
        return "idle"
    assert m.phase is Phase.OPEN
    assert m._supervisor is not None
    assert not m._supervisor.done()
    return "open"


def test_disconnect_racing_connect_ends_idle_or_open_with_a_working_send() -> None:
    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        assert m.phase is Phase.OPEN
        await asyncio.gather(m.disconnect(), m.connect())
        await clock.settle()
        assert _consistent(m, server) == "open"
        assert m.send({"type": "data", "id": 7})
        await clock.settle()
        assert _ids(server.live()[0].taken) == [7]
        await m.disconnect()  # used to raise: the supervisor was gone
        assert _consistent(m, server) == "idle"

    run(main)


def test_a_state_listener_that_connects_on_idle_ends_open_with_a_working_send() -> None:
    async def main() -> None:
        clock, server, m = rig()
        started: list[asyncio.Task[None]] = []

        def on_state(state: WSState) -> None:
            if state.phase is Phase.IDLE and not started:
                started.append(asyncio.ensure_future(m.connect()))

        m.on_state_change(on_state)
        await m.connect()
        await clock.settle()
        await m.disconnect()
        await asyncio.gather(*started)
        await clock.settle()
        assert _consistent(m, server) == "open"
        assert m.send({"type": "data", "id": 3})
        await clock.settle()
        assert _ids(server.live()[0].taken) == [3]
        await m.destroy()
        assert steadysocket_tasks() == []

    run(main)


def test_two_concurrent_disconnects_both_return_with_no_task_or_socket_left() -> None:
    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        _link(server).answers_close = False  # the close handshake hangs until the abort
        first = asyncio.ensure_future(m.disconnect())
        second = asyncio.ensure_future(m.disconnect())
        await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        # Whichever returned first: nothing is left.
        assert steadysocket_tasks() == []
        assert server.live() == []
        await asyncio.gather(first, second)
        assert server.connections[0].closed_by == "lost"  # aborted after the close timeout

    run(main)


def test_connect_after_destroy_raises_manager_closed_and_nothing_else() -> None:
    async def main() -> None:
        clock, _server, m = rig()
        await m.connect()
        await clock.settle()
        results = await asyncio.gather(
            m.destroy(), m.connect(), m.force_reconnect(), m.disconnect(), return_exceptions=True
        )
        assert [type(r) for r in results] == [type(None), ManagerClosed, ManagerClosed, type(None)]
        with pytest.raises(ManagerClosed):
            await m.wait_for(Phase.OPEN, timeout=BOUND)
        assert steadysocket_tasks() == []

    run(main)


# -- 2. send() validates what it accepts ------------------------------------------------------


def _cyclic() -> dict[str, Any]:
    message: dict[str, Any] = {"type": "data"}
    message["me"] = message
    return message


@pytest.mark.parametrize(
    ("bad", "error", "named"),
    [
        ({"type": "data", "at": datetime(2025, 1, 1, tzinfo=UTC)}, TypeError, "datetime"),
        ({"type": "data", "fn": print}, TypeError, "builtin_function_or_method"),
        ({"type": "data", "x": math.nan}, ValueError, "Out of range float"),
        (_cyclic(), ValueError, "Circular reference"),
    ],
)
def test_send_raises_for_a_message_json_cannot_encode_and_the_connection_stays_up(
    bad: dict[str, Any], error: type[Exception], named: str
) -> None:
    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        with pytest.raises(error, match="message cannot be encoded as JSON") as raised:
            m.send(bad)
        assert named in str(raised.value)
        assert m.send({"type": "data", "id": 1})
        await clock.settle()
        assert m.phase is Phase.OPEN
        assert _ids(server.connections[0].received) == [1]  # type: ignore[arg-type]
        assert len(server.connections) == 1
        await m.destroy()

    run(main)


def test_send_raises_for_a_message_over_max_message_bytes_instead_of_a_1009() -> None:
    async def main() -> None:
        clock, server, m = rig(max_message_bytes=200, send_buffer_bytes=1000)
        await m.connect()
        await clock.settle()
        with pytest.raises(ValueError, match=r"over max_message_bytes \(200\)"):
            m.send({"type": "data", "blob": "x" * 300})
        assert m.get_state().stats.messages_sent == 0
        assert m.send({"type": "data", "id": 2})
        await clock.settle()
        assert m.phase is Phase.OPEN
        await m.destroy()
        assert server.connections[0].close_code == 1000

    run(main)


def test_the_default_max_message_bytes_matches_the_servers_default() -> None:
    from steadysocket.model.server_session import DEFAULT_MAX_MESSAGE_BYTES

    m = WebSocketManager("ws://127.0.0.1:1", "x", environ={})
    assert m._core.config.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    with pytest.raises(ValueError, match="send_buffer_bytes"):
        WebSocketManager("ws://127.0.0.1:1", "x", environ={}, send_buffer_bytes=10)


def test_the_unwritten_send_buffer_is_bounded_while_the_peer_stops_reading() -> None:
    async def main() -> None:
        clock, server, m = rig(max_message_bytes=100, send_buffer_bytes=300)
        await m.connect()
        await clock.settle()
        _link(server).stop_reading()
        accepted = [m.send({"type": "data", "id": n, "pad": "p" * 20}) for n in range(10)]
        await clock.settle()
        # One frame was taken by the blocked transport; the buffer then holds what fits.
        assert accepted.count(True) < 10
        assert accepted[-1] is False
        assert m._outgoing_bytes <= 300
        _link(server).resume_reading()
        await clock.settle()
        sent = [n for n, ok in enumerate(accepted) if ok]
        assert _ids(server.connections[0].received) == sent  # type: ignore[arg-type]
        assert m.send({"type": "data", "id": 99})
        await m.destroy()

    run(main)


# -- 3. exact accounting of every message -----------------------------------------------------


@pytest.mark.parametrize("teardown", ["disconnect", "destroy", "force_reconnect"])
def test_a_frame_being_written_at_teardown_is_written_once_and_never_also_handed_back(
    teardown: str,
) -> None:
    async def main() -> None:
        clock, server, m = rig()
        returned: list[dict[str, Any]] = []
        m.on_returned(returned.extend)
        await m.connect()
        await clock.settle()
        _link(server).stop_reading()
        for n in range(3):
            assert m.send({"type": "data", "id": n})
        await clock.settle()
        # id 0 is in the transport's hands, blocked; 1 and 2 wait in the buffer.
        await getattr(m, teardown)()
        await clock.settle()
        taken = [i for c in server.connections for i in _ids(c.taken)]
        handed_back = [r["id"] for r in returned]
        queued_or_later = taken + handed_back
        assert sorted(queued_or_later) == [0, 1, 2]  # each exactly once, none twice
        assert taken.count(0) == 1
        assert m.get_state().stats.messages_sent == len(taken)
        if teardown == "force_reconnect":
            assert m.phase is Phase.OPEN
            assert _ids(server.live()[0].taken) == [1, 2]
            await m.destroy()
        else:
            assert handed_back == [1, 2]
            assert steadysocket_tasks() == []

    run(main)


def test_force_reconnect_never_delivers_a_message_twice_to_a_slow_reader() -> None:
    # Real sockets: the server reads slowly, so frames sit in websockets' buffers when the
    # connection is replaced. Three runs, as the report reproduced it 3 times out of 3.
    async def one_run() -> None:
        async with LoopbackServer(script=Script.accept()) as server:
            m = WebSocketManager(server.url, "slow", environ={}, fallback_probe_interval_ms=None)
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            for n in range(200):
                assert m.send({"type": "data", "id": n, "pad": "x" * 2000})
            await asyncio.sleep(0)
            await m.force_reconnect()
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            for _ in range(200):
                if m.get_state().stats.messages_sent >= 200 or not m._outgoing:
                    break
                await asyncio.sleep(0.01)
            await m.disconnect()
            texts = [f for c in server.connections for f in c.received if isinstance(f, str)]
            received = _ids(texts)
            assert len(received) == len(set(received)), "a message reached the server twice"
            assert set(received) <= set(range(200))

    async def main() -> None:
        for _ in range(3):
            await one_run()

    run(main)


# -- 4. no socket outlives disconnect(), destroy() or a dead-peer detection -------------------


def _sockets_to(port: int) -> int:
    """This process's TCP sockets connected to 127.0.0.1:``port`` (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if inode in inodes and int(remote.split(":")[1], 16) == port and state != "0A":
                count += 1
    return count


@pytest.mark.parametrize("teardown", ["disconnect", "destroy"])
def test_no_socket_outlives_teardown_when_the_peer_never_answers_close(teardown: str) -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept()) as server:
            proxy = FaultProxy(server.port)
            async with proxy:
                m = WebSocketManager(proxy.url, "deaf", environ={})
                await m.connect()
                await m.wait_for(Phase.OPEN, timeout=BOUND)
                assert _sockets_to(proxy.port) == 1
                proxy.set_mode(Mode.BLACKHOLE, apply_to_current=True)
                await getattr(m, teardown)()
                assert _sockets_to(proxy.port) == 0
                assert steadysocket_tasks() == []

    run(main)


def test_no_socket_outlives_dead_peer_detections_and_destroy() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept(heartbeat_interval_ms=100)) as server:
            proxy = FaultProxy(server.port)
            async with proxy:
                m = WebSocketManager(proxy.url, "dead", environ={}, fallback_probe_interval_ms=None)
                errors: list[WSError] = []
                m.on_error(failures_into(errors))
                await m.connect()
                for detection in range(3):
                    await m.wait_for(Phase.OPEN, timeout=BOUND)
                    proxy.set_mode(Mode.BLACKHOLE, apply_to_current=True)
                    await m.wait_for(Phase.RECONNECTING, Phase.FAILED, timeout=BOUND)
                    assert errors[-1].kind == "timeout", detection
                    proxy.set_mode(Mode.PASS)
                await m.wait_for(Phase.OPEN, timeout=BOUND)
                await m.destroy()
                assert _sockets_to(proxy.port) == 0

    run(main)


# -- 5. any exception from any send ends that connection, never the manager -------------------


class _Broken(MemoryTransport):
    """Sends of control frames (a pong) and the close raise AttributeError."""

    async def send(self, text: str) -> None:
        if '"pong"' in text:
            raise AttributeError("'NoneType' object has no attribute 'write'")
        await super().send(text)

    async def close(self, code: int, reason: str) -> None:
        raise AttributeError("'NoneType' object has no attribute 'close'")


def over(
    transport_cls: type[MemoryTransport], **options: Any
) -> tuple[VirtualClock, InMemoryServer, WebSocketManager]:
    """A manager whose in-memory transports are ``transport_cls`` (a misbehaving subclass)."""
    clock = VirtualClock()
    server = InMemoryServer(clock, Script.accept())

    async def opener(url: str) -> MemoryTransport:
        transport = await server.open(url)
        odd = transport_cls(server, transport.record)
        odd._inbox = transport._inbox
        server._links[transport.record.index] = odd
        return odd

    options = {"clock": clock, "sleep": clock.sleep, "opener": opener, **options}
    return clock, server, WebSocketManager(server.url, "odd", environ={}, **options)


def test_an_error_from_a_control_frame_or_the_close_ends_the_connection_not_the_manager() -> None:
    async def main() -> None:
        clock, server, m = over(_Broken, fallback_probe_interval_ms=None)
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.settle()
        assert m.phase is Phase.OPEN
        await server.ping()  # the pong reply raises
        await clock.settle()
        assert errors
        assert errors[-1].failure.kind is ErrorKind.OTHER  # type: ignore[union-attr]
        assert "AttributeError" in str(errors[-1])
        assert phase_of(m) in {Phase.RECONNECTING, Phase.FAILED}
        await clock.advance(30)
        assert phase_of(m) is Phase.OPEN  # the manager lives on
        await m.destroy()  # the close raises too: aborted, no exception
        assert steadysocket_tasks() == []

    run(main)


# -- 6. messages() is a stream a person can rely on -------------------------------------------


def test_messages_subscribes_at_the_call_so_nothing_before_the_first_anext_is_lost() -> None:
    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        stream = m.messages()
        await server.send('{"type":"news","n":1}')
        await clock.settle()
        assert (await anext(stream))["n"] == 1
        await m.destroy()

    run(main)


def test_messages_buffer_is_bounded_and_counts_what_it_drops() -> None:
    async def main() -> None:
        clock, server, m = rig()
        seen: list[dict[str, Any]] = []
        m.on_message(seen.append)
        await m.connect()
        await clock.settle()
        stream = m.messages(maxsize=3)
        for n in range(5):
            await server.send(json.dumps({"type": "news", "n": n}))
        await clock.settle()
        assert stream.dropped == 2
        assert len(seen) == 5  # listeners still see everything
        await m.disconnect()
        assert [message["n"] async for message in stream] == [0, 1, 2]
        with pytest.raises(ValueError, match="maxsize"):
            m.messages(maxsize=0)

    run(main)


def test_messages_keeps_going_across_reconnects_and_ends_on_disconnect_or_destroy() -> None:
    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        stream = m.messages()
        await server.drop()
        await clock.advance(5)
        assert m.phase is Phase.OPEN
        await server.send('{"type":"news","n":2}')
        await clock.settle()
        assert (await anext(stream))["n"] == 2
        consumer = asyncio.ensure_future(anext(stream))
        await clock.settle()
        await m.disconnect()
        with pytest.raises(StopAsyncIteration):
            await consumer
        await m.connect()
        await clock.settle()
        async with m:
            later = m.messages()
        assert later.ended  # the async with destroyed the manager
        assert [x async for x in later] == []
        assert [x async for x in m.messages()] == []

    run(main)


# -- 7. labels say what happened --------------------------------------------------------------


def test_a_connection_reset_without_an_errno_is_not_reported_as_refused() -> None:
    for exc in (
        ConnectionResetError(),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        BrokenPipeError(),
    ):
        failure = failure_from_exception(exc)
        assert failure.kind is ErrorKind.NO_CLOSE_FRAME  # type: ignore[union-attr]
        assert "refused" not in failure.describe()
        assert "reset" in failure.describe()


def test_the_failure_text_of_a_dropped_connection_does_not_repeat_itself() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept()) as server:
            m = WebSocketManager(server.url, "drop", environ={}, fallback_probe_interval_ms=None)
            errors: list[WSError] = []
            m.on_error(failures_into(errors))
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            await server.drop()
            await m.wait_for(Phase.RECONNECTING, Phase.FAILED, timeout=BOUND)
            text = str(errors[-1])
            label = "connection lost without a close frame"
            assert text.count(label) == 1, text
            await m.destroy()

    run(main)


def test_a_websockets_server_that_closes_during_overlapping_calls_leaves_nothing() -> None:
    # Real sockets: overlapping calls while a real server closes every connection at once.
    async def handler(ws: ServerConnection) -> None:
        await ws.send(
            '{"type":"hello","server_time":"2025-08-15T10:00:00.000Z","accepted_version":1,'
            '"features":[],"request_id":"r","client_id":"x","heartbeat_interval_ms":60000}'
        )
        await ws.close(1011, "boom")

    async def main() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            m = WebSocketManager(f"ws://127.0.0.1:{port}", "x", environ={})
            calls = [m.connect(), m.force_reconnect(), m.disconnect(), m.connect()]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(r is None for r in results), results
            await asyncio.sleep(0.05)
            await m.destroy()
            assert steadysocket_tasks() == []
            assert _sockets_to(port) == 0

    run(main)


# -- found by an adversarial review ------------------------------------------------------------


def test_a_hello_whose_numbers_overflow_fails_the_attempt_not_the_manager() -> None:
    big = (
        '{"type":"hello","server_time":"2025-01-01T00:00:00Z","accepted_version":1,'
        '"features":[],"request_id":"r","client_id":"test-client","heartbeat_interval_ms":1'
        + "0" * 400
        + "}"
    )

    async def main() -> None:
        clock, server, m = rig(Script.bad_hello(big))
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.settle()
        assert errors[0].failure.kind is ErrorKind.INVALID_HELLO  # type: ignore[union-attr]
        assert m.phase in {Phase.RECONNECTING, Phase.FAILED}
        await server.set_script(Script.accept())
        await clock.advance(30)
        assert phase_of(m) is Phase.OPEN
        await m.destroy()
        assert steadysocket_tasks() == []

    run(main)


def test_a_manager_moves_to_a_new_event_loop_once_it_stopped_on_the_old_one() -> None:
    m: WebSocketManager | None = None

    async def once() -> list[int]:
        nonlocal m
        async with LoopbackServer(script=Script.accept()) as server:
            if m is None:
                m = WebSocketManager(server.url, "loops", environ={})
            else:  # the same manager; the new loop's server listens on another port
                m._core.config = dataclasses.replace(m._core.config, base_url=server.url)
            await asyncio.gather(m.disconnect(), m.connect())
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            for n in range(3):
                assert m.send({"type": "data", "id": n})
            await asyncio.sleep(0.05)
            await m.disconnect()
            return _ids([f for c in server.connections for f in c.received if isinstance(f, str)])

    assert run(once) == [0, 1, 2]
    assert run(once) == [0, 1, 2]


def test_a_stream_left_with_break_stops_taking_messages() -> None:
    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        for n in range(3):
            await server.send(json.dumps({"type": "news", "n": n}))
            async for message in m.messages():
                if message["n"] == n:
                    break
        gc.collect()
        assert len(m._streams) == 0
        await m.destroy()

    run(main)


@pytest.mark.parametrize("teardown", ["disconnect", "destroy"])
def test_a_cancelled_teardown_still_ends_the_streams_and_the_waiters(teardown: str) -> None:
    async def main() -> None:
        clock, _server, m = rig(Script.accept(close_delay_ms=5_000))
        await m.connect()
        await clock.settle()
        stream = m.messages()
        consumer = asyncio.ensure_future(anext(stream, "END"))
        waiter = asyncio.ensure_future(m.wait_for(Phase.FALLBACK))
        await clock.settle()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(getattr(m, teardown)(), 0.001)
        await clock.advance(10)
        assert await consumer == "END"
        if teardown == "destroy":
            with pytest.raises(ManagerClosed):
                await waiter
        else:
            waiter.cancel()
        await m.destroy()
        assert steadysocket_tasks() == []

    run(main)


class _CancelsOnSend(MemoryTransport):
    async def send(self, text: str) -> None:
        if '"data"' in text:
            raise asyncio.CancelledError
        await super().send(text)


def test_a_stray_cancelled_error_from_the_transport_ends_the_connection() -> None:
    async def main() -> None:
        clock, _server, m = over(_CancelsOnSend, enable_heartbeat=False)
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.settle()
        assert m.send({"type": "data", "id": 1})
        await clock.settle()
        assert "CancelledError" in str(errors[-1])
        assert phase_of(m) in {Phase.RECONNECTING, Phase.FAILED}
        await m.destroy()
        assert steadysocket_tasks() == []

    run(main)


def test_two_consumers_of_one_stream_both_end_on_disconnect() -> None:
    async def main() -> None:
        clock, _server, m = rig()
        await m.connect()
        await clock.settle()
        stream = m.messages()
        first = asyncio.ensure_future(anext(stream, "END"))
        second = asyncio.ensure_future(anext(stream, "END"))
        await clock.settle()
        await m.disconnect()
        assert list(await asyncio.gather(first, second)) == ["END", "END"]

    run(main)


def test_wait_for_after_destroy_raises_even_for_the_current_phase() -> None:
    async def main() -> None:
        _clock, _server, m = rig()
        await m.destroy()
        with pytest.raises(ManagerClosed):
            await m.wait_for(Phase.IDLE)

    run(main)
