"""WebSocketManager against the real SteadyServer on 127.0.0.1: the whole lifecycle end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.faultproxy import FaultProxy, Mode
from steadysocket.runtime.manager import WebSocketManager
from steadysocket.runtime.server import SteadyServer
from tests.runtime.adapters import closed_port
from tests.runtime.fakes import LoopbackServer, Script

TIMEOUT = 10.0
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(3 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


def _manager(url: str | list[str], **kwargs: Any) -> tuple[WebSocketManager, list[Phase]]:
    options: dict[str, Any] = {
        "backoff_strategy": BackoffStrategy(
            base_delays_ms=(50, 100), jitter_ratio=0.0, max_attempts=3
        ),
        "fallback_probe_interval_ms": 200,
        "stable_after_ms": 100,
        "connection_timeout_ms": 2_000,
        "environ": {},
    }
    options.update(kwargs)
    manager = WebSocketManager(url, "e2e", **options)
    phases = [manager.phase]

    def record(state: WSState) -> None:
        phases.append(state.phase)

    manager.on_state_change(record)
    return manager, phases


def _server(port: int = 0, heartbeat_ms: int = 5_000) -> SteadyServer:
    return SteadyServer(
        "127.0.0.1", port, heartbeat_interval_ms=heartbeat_ms, connection_timeout_ms=2_000
    )


def test_the_client_connects_and_opens_only_after_the_hello() -> None:
    async def body() -> tuple[list[Phase], WSState]:
        async with _server() as server:
            manager, phases = _manager(server.url)
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            state = manager.get_state()
            await manager.disconnect()
            return phases, state

    phases, state = run(body())
    assert phases == [Phase.IDLE, Phase.CONNECTING, Phase.OPEN, Phase.IDLE]
    assert state.last_hello_message is not None
    assert state.last_hello_message.client_id == "e2e"
    assert "graceful_reconnect" in state.connection_features
    assert state.stats.successful_connections == 1


def test_the_client_reconnects_after_a_server_restart() -> None:
    async def body() -> list[Phase]:
        server = _server()
        await server.start()
        port = server.port
        manager, phases = _manager(server.url)
        await manager.connect()
        await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
        await server.close()
        await manager.wait_for(Phase.RECONNECTING, Phase.FAILED, timeout=TIMEOUT)
        server = _server(port)
        await server.start()
        try:
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
        finally:
            await manager.disconnect()
            await server.close()
        return phases

    phases = run(body())
    assert phases[:4] == [Phase.IDLE, Phase.CONNECTING, Phase.OPEN, Phase.RECONNECTING]
    assert phases[-2:] == [Phase.OPEN, Phase.IDLE]


def test_a_server_that_stays_down_leads_to_fallback_and_the_probe_recovers() -> None:
    async def body() -> tuple[list[Phase], WSState, WSState]:
        server = _server()
        await server.start()
        port = server.port
        manager, phases = _manager(server.url)
        await manager.connect()
        await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
        await asyncio.sleep(0.2)  # past stable_after_ms: the next outage starts from zero
        await server.close()
        await manager.wait_for(Phase.FALLBACK, timeout=TIMEOUT)
        in_fallback = manager.get_state()
        server = _server(port)
        await server.start()
        try:
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            recovered = manager.get_state()
        finally:
            await manager.disconnect()
            await server.close()
        return phases, in_fallback, recovered

    phases, in_fallback, recovered = run(body())
    assert in_fallback.is_fallback_mode
    assert in_fallback.fallback_reason is not None
    assert "after 3 of 3 attempts" in in_fallback.fallback_reason
    failed_attempts = [a for a in in_fallback.recent_attempts if a.outcome == "failed"]
    assert [a.number for a in failed_attempts[:3]] == [3, 2, 1]
    assert phases.index(Phase.FALLBACK) < len(phases) - 2
    assert phases[-2:] == [Phase.OPEN, Phase.IDLE]
    assert not recovered.is_fallback_mode
    assert recovered.fallback_reason is None


def test_a_permanent_rejection_reaches_fallback_in_one_attempt() -> None:
    async def body() -> tuple[list[Phase], WSState]:
        async with _server() as server:
            manager, phases = _manager(server.url, role="intruder", fallback_probe_interval_ms=None)
            await manager.connect()
            await manager.wait_for(Phase.FALLBACK, timeout=TIMEOUT)
            state = manager.get_state()
            await manager.disconnect()
            return phases, state

    phases, state = run(body())
    assert phases == [Phase.IDLE, Phase.CONNECTING, Phase.FALLBACK, Phase.IDLE]
    assert state.stats.total_attempts == 1
    [attempt] = state.recent_attempts
    assert attempt.close_code == 4401
    assert attempt.failure_kind == "handshake"
    assert attempt.retryable is False
    assert state.fallback_reason is not None
    assert "4401" in state.fallback_reason


def test_a_version_no_server_speaks_is_refused_before_any_attempt() -> None:
    with pytest.raises(ValueError, match="version must be 1 or 2, got 3"):
        _manager("ws://127.0.0.1:1", version=3)


def test_a_v2_client_of_a_v1_only_server_runs_v1_after_one_4400() -> None:
    async def body() -> WSState:
        async with LoopbackServer(script=Script.accept()) as server:
            manager, _ = _manager(server.url, version=2, fallback_probe_interval_ms=None)
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            state = manager.get_state()
            await manager.disconnect()
            return state

    state = run(body())
    assert state.protocol_version == 1
    assert state.delivery is None
    assert [a.close_code for a in state.recent_attempts] == [None, 4400]
    assert state.recent_attempts[0].outcome == "open"


def test_a_half_open_connection_goes_degraded_then_reconnects() -> None:
    async def body() -> list[Phase]:
        async with _server(heartbeat_ms=200) as server, FaultProxy(server.port) as proxy:
            manager, phases = _manager(f"ws://127.0.0.1:{proxy.port}")
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            proxy.set_mode(Mode.BLACKHOLE, apply_to_current=True)
            await manager.wait_for(Phase.DEGRADED, timeout=TIMEOUT)
            proxy.set_mode(Mode.PASS)
            await manager.wait_for(Phase.RECONNECTING, timeout=TIMEOUT)
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            await manager.disconnect()
            return phases

    phases = run(body())
    assert phases == [
        Phase.IDLE,
        Phase.CONNECTING,
        Phase.OPEN,
        Phase.DEGRADED,
        Phase.RECONNECTING,
        Phase.OPEN,
        Phase.IDLE,
    ]


def test_no_task_is_left_after_disconnect() -> None:
    async def body() -> tuple[set[str], set[str]]:
        async with _server() as server:
            before = {t.get_name() for t in asyncio.all_tasks()}
            manager, _ = _manager(server.url)
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            manager.send({"type": "x"})
            during = {t.get_name() for t in asyncio.all_tasks()}
            await manager.disconnect()
            after = {t.get_name() for t in asyncio.all_tasks()}
            assert any(name.startswith("steadysocket") for name in during)
            return before, after

    before, after = run(body())
    assert not any(name.startswith("steadysocket") for name in before)
    assert {name for name in after if name.startswith("steadysocket")} == set()


def test_a_list_of_urls_is_dialled_in_turn_until_one_serves() -> None:
    async def body() -> tuple[str, int, list[str | None]]:
        async with _server() as server:
            down = f"ws://127.0.0.1:{closed_port()}"
            manager, _ = _manager([down, server.url])
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            state = manager.get_state()
            await manager.disconnect()
            return state.url, server.port, [a.classification for a in state.recent_attempts]

    url, port, classifications = run(body())
    assert url.startswith(f"ws://127.0.0.1:{port}/ws/client?")
    assert classifications == [None, "network"]  # opened on the second, after the first


def test_an_empty_list_of_urls_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one URL"):
        WebSocketManager([], "e2e", environ={})
