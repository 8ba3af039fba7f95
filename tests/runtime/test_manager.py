"""``WebSocketManager`` with the fakes: the Python API, the send queue, the environment, and one
named regression test per origin bug (docs/protocol.md, Client).

Most tests run on the in-memory server and a :class:`VirtualClock`, so a backoff schedule takes
no real time; a few run on the loopback server with the real clock and the default opener. No
test asserts how long something took: they assert orders and counts. Every wait is bounded by a
multiple of ``MS``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import pytest

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import AttemptOutcome, Phase, WSState
from steadysocket.runtime.manager import ManagerClosed, ServerError, WebSocketManager, WSError
from tests.runtime.fakes import (
    ConnState,
    InMemoryServer,
    LoopbackServer,
    MemoryTransport,
    Script,
    ScriptedServer,
    VirtualClock,
    failures_into,
)

MS = 0.001
BOUND = 5_000 * MS
"""The real-time bound on every test's body; in-memory exchanges take microseconds."""

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    """Run one test body on a fresh event loop, bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(BOUND):
            return await main()

    return asyncio.run(bounded())


def backoff(
    delays: tuple[float, ...] = (1000, 2000, 4000), *, max_attempts: int = 4, jitter: float = 0.0
) -> BackoffStrategy:
    return BackoffStrategy(
        base_delays_ms=delays,
        cap_delay_ms=max(delays),
        jitter_ratio=jitter,
        max_attempts=max_attempts,
        seed=7,
    )


def make_manager(server: ScriptedServer, clock: VirtualClock, **kwargs: Any) -> WebSocketManager:
    """A manager on the virtual clock and the in-memory server, with no environment."""
    assert isinstance(server, InMemoryServer)
    options: dict[str, Any] = {
        "connection_timeout_ms": 1_000,
        "backoff_strategy": backoff(),
        "clock": clock,
        "sleep": clock.sleep,
        "opener": server.open,
        "environ": {},
    }
    options.update(kwargs)
    return WebSocketManager(server.url, "test-client", **options)


def rig(
    script: Script | None = None, **kwargs: Any
) -> tuple[VirtualClock, InMemoryServer, WebSocketManager]:
    clock = VirtualClock()
    server = InMemoryServer(clock, script if script is not None else Script.accept())
    return clock, server, make_manager(server, clock, **kwargs)


def steadysocket_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("steadysocket")]


def phase_of(m: WebSocketManager) -> Phase:
    """The phase now (a call, so that mypy does not keep an earlier assert's narrowing)."""
    return m.phase


async def first_message(m: WebSocketManager) -> dict[str, Any]:
    """The next message from ``m.messages()``, closing the iterator (which unsubscribes)."""
    stream = m.messages()
    async with aclosing(stream):
        return await anext(stream)


def retry_delays(clock: VirtualClock) -> list[float]:
    """The retry timer's delays, in milliseconds, as the runtime slept them."""
    return [round(r.delay * 1000.0, 6) for r in clock.history if r.owner.endswith("-retry")]


# -------------------------------------------------------------------------------------------
# The Python API
# -------------------------------------------------------------------------------------------


def test_async_with_opens_after_the_hello_and_messages_iterates_what_arrives() -> None:
    async def main() -> None:
        clock = VirtualClock()
        server = InMemoryServer(clock, Script.accept(echo=True))
        async with make_manager(server, clock) as m:
            assert phase_of(m) is Phase.CONNECTING
            assert await m.wait_for(Phase.OPEN, timeout=BOUND) is Phase.OPEN
            assert m.send({"type": "chat", "text": "hi"})
            message = await first_message(m)
            assert message["type"] == "echo"
            assert message["original_message"]["text"] == "hi"
            assert m._message_listeners == []  # the iterator unsubscribed when closed
        assert phase_of(m) is Phase.IDLE
        record = server.connections[0]
        assert (record.closed_by, record.close_code, record.close_reason) == (
            "client",
            1000,
            "Client disconnect",
        )
        assert record.query["client_id"] == "test-client"

    run(main)


def test_wait_for_raises_timeout_error_when_the_phase_never_comes() -> None:
    async def main() -> None:
        _, _, m = rig(Script.silent())
        await m.connect()
        with pytest.raises(TimeoutError):
            await m.wait_for(Phase.OPEN, timeout=20 * MS)
        assert phase_of(m) is Phase.CONNECTING
        assert m._phase_waiters == []
        await m.disconnect()

    run(main)


def test_wait_for_returns_at_once_in_the_phase_and_needs_a_phase() -> None:
    async def main() -> None:
        _, _, m = rig()
        assert await m.wait_for("idle", Phase.OPEN, timeout=0) is Phase.IDLE
        with pytest.raises(ValueError, match="at least one phase"):
            await m.wait_for()
        with pytest.raises(ValueError, match="nowhere"):
            await m.wait_for("nowhere")

    run(main)


def test_state_listeners_see_every_phase_until_they_unsubscribe() -> None:
    async def main() -> None:
        clock, _, m = rig(Script.accept())
        seen: list[WSState] = []
        unsubscribe = m.on_state_change(seen.append)
        await m.connect()
        await clock.run_until_idle()
        assert [s.phase for s in seen] == [Phase.CONNECTING, Phase.OPEN]
        assert seen[-1].stats.successful_connections == 1
        unsubscribe()
        unsubscribe()  # harmless twice
        await m.force_reconnect()
        await clock.run_until_idle()
        assert phase_of(m) is Phase.OPEN
        assert len(seen) == 2
        await m.disconnect()

    run(main)


def test_message_listeners_get_application_messages_but_not_hello_ping_or_pong() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.accept())
        got: list[dict[str, Any]] = []
        unsubscribe = m.on_message(got.append)
        await m.connect()
        await clock.run_until_idle()
        await server.ping()
        await server.send('{"type":"news","n":1}')
        await clock.run_until_idle()
        unsubscribe()
        await server.send('{"type":"news","n":2}')
        await clock.run_until_idle()
        assert got == [{"type": "news", "n": 1}]
        assert m.get_state().stats.message_counts_by_type == {"hello": 1, "ping": 1, "news": 2}
        await m.disconnect()

    run(main)


@pytest.mark.parametrize(
    ("script", "kind", "retryable", "phase"),
    [
        (Script.close(4401, "Invalid role 'x'"), "handshake", False, Phase.FALLBACK),
        (Script.close(4400, "Unsupported version '2'"), "handshake", False, Phase.FALLBACK),
        (Script.close(1008, "Invalid client_id"), "handshake", False, Phase.FALLBACK),
        (Script.close(4500, "Server handshake error"), "server_error", True, Phase.FAILED),
        (Script.reject(403), "handshake", False, Phase.FALLBACK),
        (Script.reject(429), "handshake", True, Phase.FAILED),
        (Script.reject(503), "server_error", True, Phase.FAILED),
        (Script.refuse(), "network", True, Phase.FAILED),
        (Script.drop(), "abnormal", True, Phase.FAILED),
        (Script.bad_hello(), "handshake", True, Phase.FAILED),
        (Script.wrong_version(3), "handshake", False, Phase.FALLBACK),
    ],
    ids=[
        "close-4401",
        "close-4400",
        "close-1008",
        "close-4500",
        "http-403",
        "http-429",
        "http-503",
        "refused",
        "dropped",
        "bad-hello",
        "wrong-version",
    ],
)
def test_on_error_gets_a_wserror_with_kind_and_retryable(
    script: Script, kind: str, retryable: bool, phase: Phase
) -> None:
    async def main() -> None:
        clock, _, m = rig(script)
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.run_until_idle()
        assert phase_of(m) is phase
        assert len(errors) == 1
        error = errors[0]
        assert isinstance(error, WSError)
        assert (error.kind, error.retryable, error.phase) == (kind, retryable, Phase.CONNECTING)
        assert m.get_state().recent_attempts[0].failure_kind == kind
        await m.disconnect()

    run(main)


def test_on_error_hears_of_connect_timeouts_and_dead_peers() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.silent())
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.advance(1.0)
        assert phase_of(m) is Phase.FAILED
        await server.set_script(Script.accept(1000))
        await clock.advance(1.0)
        assert phase_of(m) is Phase.OPEN
        await server.set_script(Script.silent())
        await clock.advance(2.0)
        assert phase_of(m) is Phase.RECONNECTING
        assert [(e.kind, e.retryable, e.phase) for e in errors] == [
            ("timeout", True, Phase.CONNECTING),
            ("timeout", True, Phase.DEGRADED),
        ]
        await m.disconnect()

    run(main)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [(OSError("boom"), "network"), (RuntimeError("opener bug"), "unknown")],
    ids=["oserror", "runtimeerror"],
)
def test_an_opener_breaking_its_contract_is_a_failed_attempt_not_a_hang(
    exc: Exception, kind: str
) -> None:
    async def main() -> None:
        clock = VirtualClock()

        async def opener(url: str) -> MemoryTransport:
            raise exc

        m = WebSocketManager(
            "ws://opener.invalid",
            "c",
            backoff_strategy=backoff(max_attempts=2),
            clock=clock,
            sleep=clock.sleep,
            opener=opener,
            environ={},
        )
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.run_until_idle()
        assert phase_of(m) is Phase.FAILED
        await clock.advance(1.0)
        assert phase_of(m) is Phase.FALLBACK
        assert [(e.kind, e.retryable) for e in errors] == [(kind, True), (kind, True)]
        await m.disconnect()
        assert steadysocket_tasks() == []

    run(main)


def test_the_servers_error_messages_reach_on_error_as_server_errors() -> None:
    async def main() -> None:
        clock, server, m = rig()
        errors: list[WSError | ServerError] = []
        m.on_error(errors.append)
        await m.connect()
        await clock.run_until_idle()
        await server.send(
            '{"type":"error","error_code":"INVALID_JSON","message":"bad","timestamp":"x"}'
        )
        await clock.run_until_idle()
        assert len(errors) == 1
        error = errors[0]
        assert isinstance(error, ServerError)
        assert (error.error_code, error.message) == ("INVALID_JSON", "bad")
        assert phase_of(m) is Phase.OPEN
        await m.disconnect()

    run(main)


def test_a_listener_that_raises_does_not_stop_the_others() -> None:
    async def main() -> None:
        clock, _, m = rig()

        def broken(_: WSState) -> None:
            raise RuntimeError("listener bug")

        seen: list[Phase] = []
        m.on_state_change(broken)
        m.on_state_change(lambda s: seen.append(s.phase))
        await m.connect()
        await clock.run_until_idle()
        assert seen == [Phase.CONNECTING, Phase.OPEN]
        await m.disconnect()

    run(main)


# -------------------------------------------------------------------------------------------
# Sending
# -------------------------------------------------------------------------------------------


def test_the_send_queue_flushes_in_order_on_open() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.late_hello(500))
        await m.connect()
        await clock.run_until_idle()
        assert phase_of(m) is Phase.CONNECTING
        assert m.send({"type": "msg", "n": 1})
        assert m.send({"type": "msg", "n": 2, "timestamp": "kept"})
        assert m.send({"type": "msg", "n": 3})
        await clock.run_until_idle()
        assert server.connections[0].received == []
        await clock.advance(0.5)
        assert phase_of(m) is Phase.OPEN
        received = server.connections[0].received_json()
        assert [r["n"] for r in received] == [1, 2, 3]
        assert received[0]["timestamp"] == "2025-01-01T00:00:00.000Z"
        assert received[1]["timestamp"] == "kept"
        assert m.get_state().stats.messages_sent == 3
        await m.disconnect()

    run(main)


def test_queued_messages_are_handed_back_on_disconnect() -> None:
    async def main() -> None:
        _, _, m = rig(Script.silent())
        returned: list[list[dict[str, Any]]] = []
        m.on_returned(returned.append)
        await m.connect()
        assert m.send({"type": "msg", "n": 1})
        assert m.send({"type": "msg", "n": 2})
        await m.disconnect()
        assert [[r["n"] for r in batch] for batch in returned] == [[1, 2]]
        assert m.take_returned() == []

    run(main)


def test_without_a_listener_handed_back_messages_wait_in_take_returned() -> None:
    async def main() -> None:
        _, _, m = rig(Script.silent())
        await m.connect()
        assert m.send({"type": "msg", "n": 1})
        await m.disconnect()
        assert [r["n"] for r in m.take_returned()] == [1]
        assert m.take_returned() == []

    run(main)


def test_queued_messages_are_handed_back_on_entering_fallback() -> None:
    async def main() -> None:
        clock, _, m = rig(Script.silent(), backoff_strategy=backoff(max_attempts=1))
        returned: list[dict[str, Any]] = []
        m.on_returned(returned.extend)
        await m.connect()
        assert m.send({"type": "msg", "n": 1})
        await clock.advance(1.0)
        assert phase_of(m) is Phase.FALLBACK
        assert [r["n"] for r in returned] == [1]
        assert not m.send({"type": "msg", "n": 2})
        assert len(returned) == 1
        await m.disconnect()

    run(main)


def test_a_message_caught_by_a_dropped_connection_goes_out_on_the_next_one() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.accept())
        await m.connect()
        await clock.run_until_idle()
        # Accepted while open, but the connection drops before the writer gets to run.
        assert m.send({"type": "msg", "n": 1})
        await server.drop()
        await clock.run_until_idle()
        assert phase_of(m) is Phase.FAILED
        assert server.connections[0].received == []
        assert m.take_returned() == []
        await clock.advance(1.0)
        assert phase_of(m) is Phase.OPEN
        assert [r["n"] for r in server.connections[1].received_json()] == [1]
        await m.disconnect()

    run(main)


def test_a_message_sent_just_before_force_reconnect_goes_out_on_the_new_connection() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.accept())
        await m.connect()
        await clock.run_until_idle()
        assert m.send({"type": "msg", "n": 1})
        await m.force_reconnect()
        await clock.run_until_idle()
        assert [r["n"] for r in server.connections[1].received_json()] == [1]
        assert server.connections[0].received == []
        assert m.take_returned() == []
        await m.disconnect()

    run(main)


def test_a_message_caught_by_a_close_1000_is_handed_back() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.accept())
        await m.connect()
        await clock.run_until_idle()
        assert m.send({"type": "msg", "n": 1})
        await server.close(1000, "bye")
        await clock.run_until_idle()
        assert phase_of(m) is Phase.IDLE
        assert [r["n"] for r in m.take_returned()] == [1]

    run(main)


def test_send_is_refused_in_idle_and_when_the_queue_is_full() -> None:
    async def main() -> None:
        _, _, m = rig(Script.silent(), send_queue_limit=2)
        assert not m.send({"type": "msg"})
        await m.connect()
        assert m.send({"type": "msg", "n": 1})
        assert m.send({"type": "msg", "n": 2})
        assert not m.send({"type": "msg", "n": 3})
        with pytest.raises(TypeError):
            m.send(["not", "a", "mapping"])  # type: ignore[arg-type]
        await m.disconnect()
        assert [r["n"] for r in m.take_returned()] == [1, 2]

    run(main)


# -------------------------------------------------------------------------------------------
# Environment and construction
# -------------------------------------------------------------------------------------------


def test_websocket_enabled_false_keeps_the_manager_idle() -> None:
    async def main() -> None:
        clock = VirtualClock()
        server = InMemoryServer(clock)
        m = make_manager(server, clock, environ={"WEBSOCKET_ENABLED": "false"})
        await m.connect()
        await m.force_reconnect()
        await clock.advance(60.0)
        assert phase_of(m) is Phase.IDLE
        assert server.attempts == []
        assert steadysocket_tasks() == []
        assert not m.send({"type": "msg"})
        # An explicit argument wins over the environment.
        on = make_manager(server, clock, environ={"WEBSOCKET_ENABLED": "0"}, enabled=True)
        await on.connect()
        await clock.run_until_idle()
        assert phase_of(on) is Phase.OPEN
        await on.disconnect()

    run(main)


def test_ws_url_is_the_default_base_url_and_client_id_a_fresh_uuid4() -> None:
    m = WebSocketManager(environ={})
    assert m.url.startswith("ws://localhost:8000/ws/client?client_id=")
    assert uuid.UUID(m.client_id).version == 4
    assert WebSocketManager(environ={}).client_id != m.client_id
    from_env = WebSocketManager(client_id="c", environ={"WS_URL": "ws://example.test:9000/api"})
    assert (
        from_env.url == "ws://example.test:9000/api/ws/client?client_id=c&version=1&role=frontend"
    )
    explicit = WebSocketManager("ws://other.test", "c", environ={"WS_URL": "ws://example.test"})
    assert explicit.url.startswith("ws://other.test/ws/client?")


@pytest.mark.parametrize(
    "environ",
    [
        {"WEBSOCKET_ENABLED": "maybe"},
        {"WS_DEBUG": "loud"},
        {"WS_URL": "http://example.test"},
        {"WS_URL": "ws://"},
    ],
)
def test_a_malformed_environment_is_a_startup_error(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"WEBSOCKET_ENABLED|WS_DEBUG|URL"):
        WebSocketManager(client_id="c", environ=environ)


def test_ws_debug_turns_on_debug_logging() -> None:
    log = logging.getLogger("steadysocket")
    level = log.level
    try:
        WebSocketManager(client_id="c", environ={"WS_DEBUG": "1"})
        assert log.level == logging.DEBUG
    finally:
        log.setLevel(level)


def test_destroy_makes_the_manager_unusable() -> None:
    async def main() -> None:
        clock, _, m = rig()
        seen: list[Phase] = []
        m.on_state_change(lambda s: seen.append(s.phase))
        async with m:
            await clock.run_until_idle()
            assert phase_of(m) is Phase.OPEN
            await m.destroy()
            assert phase_of(m) is Phase.IDLE
            with pytest.raises(ManagerClosed):
                await m.connect()
            with pytest.raises(ManagerClosed):
                await m.force_reconnect()
        # destroy() disconnected (idle) and then dropped the listeners: nothing after that.
        assert seen == [Phase.CONNECTING, Phase.OPEN, Phase.IDLE]
        assert steadysocket_tasks() == []

    run(main)


# -------------------------------------------------------------------------------------------
# No task left behind
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "advance", "phase"),
    [
        (Script.accept(1000), 0.0, Phase.OPEN),
        (Script.silent(), 0.0, Phase.CONNECTING),
        (Script.hang(), 0.0, Phase.CONNECTING),
        (Script.refuse(), 0.0, Phase.FAILED),
        (Script.silent(), 2.0, Phase.RECONNECTING),
        (Script.close(4401), 0.0, Phase.FALLBACK),
        (Script.accept(1000, close_delay_ms=300), 0.0, Phase.OPEN),
    ],
    ids=["open", "connecting", "hanging", "failed", "reconnecting", "fallback", "slow-close"],
)
def test_no_task_is_left_after_disconnect(script: Script, advance: float, phase: Phase) -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        clock, server, m = rig(script)
        await m.connect()
        await clock.advance(advance)
        assert phase_of(m) is phase
        if script.close_delay_ms:
            # disconnect() waits for the close; let the virtual close time pass meanwhile.
            disconnecting = asyncio.create_task(m.disconnect())
            await clock.advance(script.close_delay_ms / 1000.0)
            await disconnecting
        else:
            await m.disconnect()
        assert asyncio.all_tasks() == before
        assert [e.owner for e in clock.pending()] == []
        assert server.live() == []

    run(main)


def test_no_task_is_left_after_disconnect_over_real_sockets() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept(echo=True)) as server:
            before = asyncio.all_tasks()
            m = WebSocketManager(server.url, "real-client", environ={})
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            assert m.send({"type": "chat"})
            assert (await first_message(m))["type"] == "echo"
            await m.disconnect()
            assert steadysocket_tasks() == []
            while server.live():  # noqa: ASYNC110 - the server's handler finishing its close
                await asyncio.sleep(MS)
            assert asyncio.all_tasks() == before
            record = server.connections[0]
            assert (record.closed_by, record.close_code) == ("client", 1000)

    run(main)


# -------------------------------------------------------------------------------------------
# Regressions: each origin bug fixed by docs/protocol.md (Client) gets a named test
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("late_event", ["close completes", "old socket drops"])
def test_regression_force_reconnect_late_close_of_the_old_socket_leaves_the_new_one_alone(
    late_event: str,
) -> None:
    """Origin: the old socket's onclose ran after force_reconnect and left the client idle with
    a dead socket. Here the old socket's close takes (virtual) time to complete."""

    async def main() -> None:
        clock, server, m = rig(Script.accept(25_000, close_delay_ms=300))
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await clock.run_until_idle()
        old = server.connections[0]
        await m.force_reconnect()
        await clock.run_until_idle()
        new = server.connections[1]
        assert old.state is ConnState.CLOSING
        assert new.state is ConnState.OPEN
        assert phase_of(m) is Phase.OPEN
        if late_event == "old socket drops":
            await server.drop(old)
        await clock.advance(0.3)
        assert old.live is False
        assert phase_of(m) is Phase.OPEN
        assert new.state is ConnState.OPEN
        assert errors == []
        assert m.send({"type": "msg", "n": 1})
        await clock.run_until_idle()
        assert [r["n"] for r in new.received_json()] == [1]
        assert m.get_state().stats.successful_connections == 2
        disconnecting = asyncio.create_task(m.disconnect())
        await clock.advance(0.3)
        await disconnecting

    run(main)


def test_regression_a_connect_timeout_consumes_exactly_one_backoff_step() -> None:
    """Origin: a timeout consumed two backoff steps (1 s, then 4 s instead of 2 s)."""

    async def main() -> None:
        clock, _, m = rig(Script.silent(), backoff_strategy=backoff(max_attempts=4))
        await m.connect()
        for _ in range(3):
            await clock.advance(1.0)  # the connect timeout
            assert phase_of(m) is Phase.FAILED
            await clock.advance_to(clock.pending()[0].due)  # the retry
            assert phase_of(m) is Phase.RECONNECTING
        assert retry_delays(clock) == [1000.0, 2000.0, 4000.0]
        state = m.get_state()
        assert [a.next_retry_delay_ms for a in state.recent_attempts] == [4000.0, 2000.0, 1000.0]
        await clock.advance(1.0)
        assert phase_of(m) is Phase.FALLBACK
        assert m.get_state().stats.total_attempts == 4
        await m.disconnect()

    run(main)


def test_regression_a_manual_ping_counts_in_heartbeats_sent() -> None:
    """Origin: ping() sent a ping without counting it."""

    async def main() -> None:
        clock, server, m = rig()
        assert not m.ping()
        await m.connect()
        await clock.run_until_idle()
        assert m.ping()
        await clock.run_until_idle()
        stats = m.get_state().stats
        assert (stats.heartbeats_sent, stats.heartbeats_received) == (1, 1)  # the pong
        assert [r["type"] for r in server.connections[0].received_json()] == ["ping"]
        await m.disconnect()

    run(main)


def test_regression_uptime_is_computed_when_the_state_is_read() -> None:
    """Origin: current_uptime_ms was a counter that stayed 0."""

    async def main() -> None:
        clock, _, m = rig()
        assert m.get_state().stats.current_uptime_ms == 0.0
        await m.connect()
        await clock.run_until_idle()
        await clock.advance(2.5)
        assert m.get_state().stats.current_uptime_ms == 2500.0
        await clock.advance(1.0)
        assert m.get_state().stats.current_uptime_ms == 3500.0
        await m.disconnect()
        assert m.get_state().stats.current_uptime_ms == 0.0

    run(main)


@pytest.mark.parametrize("way_out", ["connect()", "force_reconnect()", "recovery probe"])
def test_regression_is_fallback_mode_is_cleared_when_leaving_fallback(way_out: str) -> None:
    """Origin: is_fallback_mode was set on entering fallback and never cleared."""

    async def main() -> None:
        clock, server, m = rig(Script.close(4401, "Invalid role 'x'"))
        await m.connect()
        await clock.run_until_idle()
        state = m.get_state()
        assert (state.phase, state.is_fallback_mode) == (Phase.FALLBACK, True)
        assert state.stats.total_attempts == 1  # not retryable: one attempt
        assert state.fallback_reason is not None
        assert "4401" in state.fallback_reason
        await server.set_script(Script.accept())
        if way_out == "connect()":
            await m.connect()
            await clock.run_until_idle()
        elif way_out == "force_reconnect()":
            await m.force_reconnect()
            await clock.run_until_idle()
        else:
            await clock.advance(60.0)
        state = m.get_state()
        assert (state.phase, state.is_fallback_mode, state.fallback_reason) == (
            Phase.OPEN,
            False,
            None,
        )
        await m.disconnect()

    run(main)


def test_regression_close_codes_reach_the_client_and_close_1000_means_idle() -> None:
    """Close 1000 from the server: idle, and no reconnect however long one waits."""

    async def main() -> None:
        clock, server, m = rig()
        await m.connect()
        await clock.run_until_idle()
        await server.close(1000, "bye")
        await clock.advance(120.0)
        assert phase_of(m) is Phase.IDLE
        assert len(server.attempts) == 1
        await m.disconnect()

    run(main)


def test_close_1001_with_graceful_reconnect_retries_at_once() -> None:
    async def main() -> None:
        clock, server, m = rig(graceful_jitter_ms=0)  # no window: at once
        seen: list[Phase] = []
        m.on_state_change(lambda s: seen.append(s.phase))
        await m.connect()
        await clock.run_until_idle()
        await server.close(1001, "Server shutting down")
        await clock.run_until_idle()
        assert seen == [Phase.CONNECTING, Phase.OPEN, Phase.RECONNECTING, Phase.OPEN]
        assert retry_delays(clock) == []
        await m.disconnect()

    run(main)


def test_a_half_open_connection_goes_degraded_then_reconnects() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.accept(1000))
        await m.connect()
        await clock.run_until_idle()
        await server.set_script(Script.silent())
        await clock.advance(1.2)
        assert phase_of(m) is Phase.DEGRADED
        assert [r["type"] for r in server.connections[0].received_json()] == ["ping"]
        await clock.advance(0.8)
        assert phase_of(m) is Phase.RECONNECTING
        record = server.connections[0]
        assert (record.closed_by, record.close_code, record.close_reason) == (
            "client",
            1000,
            "heartbeat timeout",
        )

        await m.disconnect()

    run(main)


def test_any_message_ends_a_degraded_spell() -> None:
    async def main() -> None:
        clock, server, m = rig(Script.accept(1000))
        await m.connect()
        await clock.run_until_idle()
        await server.set_script(Script.silent())
        await clock.advance(1.5)
        assert phase_of(m) is Phase.DEGRADED
        await server.send("not json at all")
        await clock.run_until_idle()
        assert phase_of(m) is Phase.OPEN
        stats = m.get_state().stats
        assert stats.messages_received == 2  # the hello and the unparseable one
        assert stats.message_counts_by_type == {"hello": 1}
        await m.disconnect()

    run(main)


def test_max_attempts_reaches_fallback_with_a_reason_naming_the_last_failure() -> None:
    async def main() -> None:
        clock, _, m = rig(Script.refuse(), backoff_strategy=backoff(max_attempts=3))
        await m.connect()
        await clock.advance(60.0)
        state = m.get_state()
        assert state.phase is Phase.FALLBACK
        assert state.stats.total_attempts == 3
        assert [a.phase for a in reversed(state.recent_attempts)] == [
            Phase.CONNECTING,
            Phase.RECONNECTING,
            Phase.RECONNECTING,
        ]
        assert state.recent_attempts[0].outcome == AttemptOutcome.FAILED
        assert state.fallback_reason is not None
        assert "connection refused" in state.fallback_reason
        assert "3 of 3" in state.fallback_reason
        await m.disconnect()

    run(main)


def test_the_backoff_resets_only_after_a_stable_connection() -> None:
    async def main() -> None:
        clock, server, m = rig(
            Script.accept(), backoff_strategy=backoff(max_attempts=5), stable_after_ms=5_000
        )
        await m.connect()
        await clock.run_until_idle()
        await server.drop()  # open, dropped at once: step 1
        await clock.advance(1.0)
        assert phase_of(m) is Phase.OPEN
        await server.drop()  # again before it was stable: step 2, not step 1
        await clock.advance(2.0)
        assert phase_of(m) is Phase.OPEN
        await clock.advance(5.0)  # stable: the outage is over
        await server.drop()
        await clock.run_until_idle()
        assert retry_delays(clock) == [1000.0, 2000.0, 1000.0]
        await m.disconnect()

    run(main)


# -------------------------------------------------------------------------------------------
# Over real sockets, on real time (short timings; orders and counts only)
# -------------------------------------------------------------------------------------------


def real_manager(server: LoopbackServer, **kwargs: Any) -> WebSocketManager:
    options: dict[str, Any] = {
        "connection_timeout_ms": 2_000,
        "backoff_strategy": backoff((100,), max_attempts=3),
        "environ": {},
    }
    options.update(kwargs)
    return WebSocketManager(server.url, "real-client", **options)


@pytest.mark.parametrize(
    ("script", "kind"),
    [
        (Script.close(4401, "Invalid role 'x'"), "handshake"),
        (Script.reject(403), "handshake"),
        (Script.wrong_version(3), "handshake"),
    ],
    ids=["close-4401", "http-403", "wrong-version"],
)
def test_over_real_sockets_a_permanent_rejection_reaches_fallback_in_one_attempt(
    script: Script, kind: str
) -> None:
    async def main() -> None:
        async with LoopbackServer(script=script) as server:
            m = real_manager(server)
            errors: list[WSError] = []
            m.on_error(failures_into(errors))
            await m.connect()
            await m.wait_for(Phase.FALLBACK, timeout=BOUND)
            assert m.get_state().stats.total_attempts == 1
            assert [(e.kind, e.retryable) for e in errors] == [(kind, False)]
            await m.disconnect()

    run(main)


def test_over_real_sockets_the_close_code_and_reason_reach_the_client() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.close(4401, "Invalid role 'x'")) as server:
            m = real_manager(server)
            await m.connect()
            await m.wait_for(Phase.FALLBACK, timeout=BOUND)
            attempt = m.get_state().recent_attempts[0]
            assert attempt.close_code == 4401
            assert attempt.detail == "close 4401 (Invalid role 'x')"
            await m.disconnect()

    run(main)


def test_over_real_sockets_a_dropped_connection_reconnects() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept()) as server:
            m = real_manager(server)
            seen: list[Phase] = []
            m.on_state_change(lambda s: seen.append(s.phase))
            errors: list[WSError] = []
            m.on_error(failures_into(errors))
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            await server.drop()
            await m.wait_for(Phase.FAILED, timeout=BOUND)
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            assert seen == [
                Phase.CONNECTING,
                Phase.OPEN,
                Phase.FAILED,
                Phase.RECONNECTING,
                Phase.OPEN,
            ]
            assert [(e.kind, e.retryable) for e in errors] == [("abnormal", True)]
            await m.disconnect()

    run(main)


def test_over_real_sockets_refused_then_back_up_recovers() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept()) as server:
            await server.set_script(Script.refuse())
            m = real_manager(server, backoff_strategy=backoff((100,), max_attempts=50))
            errors: list[WSError] = []
            m.on_error(failures_into(errors))
            await m.connect()
            await m.wait_for(Phase.FAILED, timeout=BOUND)
            await server.set_script(Script.late_hello(20))
            await m.wait_for(Phase.OPEN, timeout=BOUND)
            assert errors
            assert {(e.kind, e.retryable) for e in errors} == {("network", True)}
            await m.disconnect()

    run(main)


def test_over_real_sockets_a_bad_hello_is_a_retryable_handshake_failure() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.bad_hello()) as server:
            m = real_manager(server)
            errors: list[WSError] = []
            m.on_error(failures_into(errors))
            await m.connect()
            await m.wait_for(Phase.FAILED, timeout=BOUND)
            assert [(e.kind, e.retryable) for e in errors] == [("handshake", True)]
            await m.disconnect()
            record = server.connections[0]
            while record.live:  # noqa: ASYNC110 - the server's handler finishing its close
                await asyncio.sleep(MS)
            assert (record.closed_by, record.close_code, record.close_reason) == (
                "client",
                1000,
                "Attempt abandoned",
            )

    run(main)


def test_a_send_that_blocks_past_the_send_timeout_is_a_dead_peer_and_the_frame_counts_as_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import steadysocket.runtime.manager as manager_module

    monkeypatch.setattr(manager_module, "SEND_TIMEOUT_S", 0.05)
    hello = (
        '{"type":"hello","server_time":"2025-08-15T10:00:00.000Z","accepted_version":1,'
        '"features":[],"request_id":"r","client_id":"stall","heartbeat_interval_ms":60000}'
    )

    class Stalling:
        """Answers the hello, then never reads: every send blocks."""

        def __init__(self) -> None:
            self.frames = [hello]
            self.never = asyncio.Event()

        async def recv(self) -> str | bytes:
            if self.frames:
                return self.frames.pop()
            await self.never.wait()
            raise AssertionError("unreachable")

        async def send(self, text: str) -> None:
            await self.never.wait()

        async def close(self, code: int, reason: str) -> None:
            self.never.set()

        def abort(self) -> None:
            self.never.set()

    async def opener(url: str) -> Stalling:
        return Stalling()

    async def main() -> None:
        m = WebSocketManager(
            "ws://127.0.0.1:1",
            "stall",
            opener=opener,
            environ={},
            fallback_probe_interval_ms=None,
        )
        errors: list[WSError] = []
        m.on_error(failures_into(errors))
        await m.connect()
        await m.wait_for(Phase.OPEN, timeout=BOUND)
        assert m.send({"type": "stuck", "id": 1})
        await m.wait_for(Phase.RECONNECTING, Phase.FAILED, timeout=BOUND)
        assert [e.kind for e in errors] == ["timeout"]
        assert "send blocked" in str(errors[0])
        # The transport took the frame before it blocked: written (at most once, PROTOCOL v1),
        # so it is neither re-queued for the next connection nor handed back.
        state = m.get_state()
        assert state.stats.messages_sent == 1
        await m.disconnect()
        assert m.take_returned() == []

    run(main)


def test_ws_debug_shows_debug_lines_through_a_handler_on_the_steadysocket_logger_only() -> None:
    from steadysocket.runtime.debuglog import disable_debug_logging

    package = logging.getLogger("steadysocket")
    root_handlers = list(logging.getLogger().handlers)
    try:
        WebSocketManager("ws://127.0.0.1:1", "dbg", environ={"WS_DEBUG": "1"})
        assert package.level == logging.DEBUG
        assert len(package.handlers) == 1
        WebSocketManager("ws://127.0.0.1:1", "dbg2", environ={"WS_DEBUG": "1"})
        assert len(package.handlers) == 1  # one handler, however many managers
        assert logging.getLogger().handlers == root_handlers
    finally:
        disable_debug_logging()
    assert package.handlers == []


def test_a_run_of_repeated_log_lines_is_summed_up_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[str]:
        caplog.set_level(logging.DEBUG, logger="steadysocket")
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        for _ in range(3):
            await server.send("not json")  # the same debug line, three times
        await server.send('{"type": "chat"}')  # the run ends with this frame
        await clock.settle()
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("steadysocket")]
        await m.destroy()
        return lines

    lines = run(main)
    unparseable = [i for i, line in enumerate(lines) if line.startswith("[WS] unparseable")]
    assert len(unparseable) == 1
    summary = lines[unparseable[0] + 1]
    assert summary.startswith("[WS] previous message repeated 2 more times: [WS] unparseable")


def test_messages_sent_and_received_count_the_same_kinds_of_frames() -> None:
    async def main() -> tuple[int, int, int, int]:
        clock, server, m = rig()
        await m.connect()
        await clock.settle()
        await server.ping()  # received: a ping; sent: its pong
        await clock.settle()
        assert m.ping()  # sent: a ping; received: its pong
        m.send({"type": "chat"})  # sent: data
        await clock.settle()
        stats = m.get_state().stats
        await m.destroy()
        return (
            stats.messages_received,
            stats.messages_sent,
            stats.heartbeats_received,
            stats.heartbeats_sent,
        )

    # received: hello, ping, pong; sent: pong, ping, chat. Pings and pongs count on both sides.
    assert run(main) == (3, 3, 2, 2)
