"""``steadysocket demo``: a server and a client in one process, narrating the whole lifecycle.

It runs the real code paths, with short timings so the story fits in seconds:

1. connect and hello;
2. messages both ways (an echo, a server push) and a heartbeat;
3. the network goes quiet (a proxy blackholes the connection): ``degraded``, then a dead peer
   and a reconnect;
4. the server restarts (1001): the client reconnects, with its backoff delays shown;
5. the server stays down: the attempts run out and the client enters ``fallback``;
6. the server returns: the recovery probe brings the client back to ``open``;

and ends with a summary. Narration goes through the ``narrate`` callback: formatting for people
is the CLI's job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.server_session import ServerConfig
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.manager import WebSocketManager, WSError
from steadysocket.runtime.server import SteadyServer
from steadysocket.testing import FaultProxy, Mode

Narrate = Callable[[str], None]

HEARTBEAT_MS = 400
STEP_TIMEOUT_S = 15.0
CLIENT_ID = "demo-client"
STABLE_AFTER_MS = 800


@dataclass
class DemoResult:
    """What the demo saw: every phase in order, and the final state."""

    phases: list[Phase] = field(default_factory=list)
    final_state: WSState | None = None


class _Story:
    def __init__(self, narrate: Narrate) -> None:
        self.narrate = narrate
        self.start = time.monotonic()
        self.result = DemoResult(phases=[Phase.IDLE])

    def say(self, text: str) -> None:
        self.narrate(f"[{time.monotonic() - self.start:6.2f}s] {text}")

    def chapter(self, title: str) -> None:
        self.narrate("")
        self.narrate(f"== {title}")


async def _start_server(port: int) -> SteadyServer:
    config = ServerConfig(heartbeat_interval_ms=HEARTBEAT_MS, connection_timeout_ms=2_000)
    server = SteadyServer(host="127.0.0.1", port=port, config=config)
    await server.start()
    return server


async def _wait(manager: WebSocketManager, *phases: Phase) -> Phase:
    return await manager.wait_for(*phases, timeout=STEP_TIMEOUT_S)


async def _wait_until(predicate: Callable[[], bool]) -> None:
    # Counters (heartbeats, uptime) have no change notification; poll them, bounded.
    async with asyncio.timeout(STEP_TIMEOUT_S):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _seen(manager: WebSocketManager, kind: str) -> int:
    return manager.get_state().stats.message_counts_by_type.get(kind, 0)


async def run_demo(narrate: Narrate) -> DemoResult:
    """Run the whole story; raises ``TimeoutError`` if a step does not happen in time."""
    story = _Story(narrate)
    server = await _start_server(0)
    port = server.port
    # The client talks through a local TCP proxy, so the demo can make the network go quiet.
    proxy = FaultProxy(port)
    await proxy.start()
    backoff = BackoffStrategy(
        base_delays_ms=(250, 500, 1000),
        cap_delay_ms=1000,
        jitter_ratio=0.2,
        max_attempts=4,
        seed=2026,
    )
    manager = WebSocketManager(
        f"ws://127.0.0.1:{proxy.port}",
        CLIENT_ID,
        backoff_strategy=backoff,
        connection_timeout_ms=2_000,
        fallback_probe_interval_ms=1_500,
        stable_after_ms=STABLE_AFTER_MS,
        environ={},
    )

    def on_state(state: WSState) -> None:
        previous = story.result.phases[-1]
        story.result.phases.append(state.phase)
        line = f"phase {previous} -> {state.phase}"
        latest = state.recent_attempts[0] if state.recent_attempts else None
        if state.phase is Phase.FAILED and latest and latest.next_retry_delay_ms is not None:
            line += (
                f"  (attempt {latest.number} of this outage failed;"
                f" retry in {latest.next_retry_delay_ms:.0f} ms)"
            )
        if state.phase is Phase.FALLBACK:
            line += f"  reason: {state.fallback_reason}"
        story.say(line)

    def on_message(message: dict[str, Any]) -> None:
        story.say(f"client received {message.get('type')}: {_short(message)}")

    def on_error(error: WSError | Exception) -> None:
        if isinstance(error, WSError):
            retry = "retryable" if error.retryable else "not retryable"
            story.say(f"failure: {error} ({retry})")

    manager.on_state_change(on_state)
    manager.on_message(on_message)
    manager.on_error(on_error)
    try:
        story.chapter("1. connect and hello")
        story.say(
            f"server on 127.0.0.1:{port}, proxy on 127.0.0.1:{proxy.port}; "
            f"connecting to {manager.url}"
        )
        story.say(
            "attempts are numbered per outage: #1 is the first attempt of each outage, and the "
            f"count restarts once a connection has stayed up {STABLE_AFTER_MS} ms; "
            f"{backoff.max_attempts} attempts per outage, then fallback"
        )
        await manager.connect()
        await _wait(manager, Phase.OPEN)
        hello = manager.get_state().last_hello_message
        assert hello is not None
        story.say(
            f"hello: version {hello.accepted_version}, heartbeat {hello.heartbeat_interval_ms} ms,"
            f" features {', '.join(hello.features)}"
        )

        story.chapter("2. messages both ways, and a heartbeat")
        manager.send({"type": "greeting", "text": "hello from the client"})
        await _wait_until(
            lambda: manager.get_state().stats.message_counts_by_type.get("echo", 0) > 0
        )
        await server.send_to(CLIENT_ID, {"type": "news", "text": "pushed by the server"})
        await _wait_until(
            lambda: manager.get_state().stats.message_counts_by_type.get("news", 0) > 0
        )
        await _wait_until(lambda: manager.get_state().stats.heartbeats_received > 0)
        stats = manager.get_state().stats
        story.say(
            f"heartbeat: server ping received, pong sent "
            f"(heartbeats received {stats.heartbeats_received}, sent {stats.heartbeats_sent})"
        )

        story.chapter("3. the network goes quiet: degraded, then a dead peer")
        proxy.set_mode(Mode.BLACKHOLE, apply_to_current=True)
        story.say("proxy blackholes the open connection (TCP stays up, nothing gets through)")
        await _wait(manager, Phase.DEGRADED)
        proxy.set_mode(Mode.PASS)
        story.say("new connections pass again; the old one stays silent")
        await _wait(manager, Phase.RECONNECTING)
        await _wait(manager, Phase.OPEN)
        await _wait_until(lambda: len(server.clients) == 1)
        story.say("the server dropped the silent connection too (its dead-client rule)")
        await _wait_until(lambda: manager.get_state().stats.current_uptime_ms > 900)

        story.chapter("4. the server restarts; the client reconnects")
        await server.close()
        story.say("server stopped (clients closed with 1001)")
        await _wait(manager, Phase.FAILED)
        await asyncio.sleep(0.3)
        server = await _start_server(port)
        story.say("server started again")
        await _wait(manager, Phase.OPEN)
        await _wait_until(lambda: manager.get_state().stats.current_uptime_ms > 1_000)
        story.say("connection stable again: the outage is over and the backoff reset")

        story.chapter("5. the server stays down; attempts run out")
        await server.close()
        story.say("server stopped, and stays down")
        await _wait(manager, Phase.FALLBACK)

        story.chapter("6. the server returns; the recovery probe reconnects")
        server = await _start_server(port)
        story.say("server started again; waiting for the probe")
        await _wait(manager, Phase.OPEN)
        manager.send({"type": "greeting", "text": "back again"})
        await _wait_until(
            lambda: manager.get_state().stats.message_counts_by_type.get("echo", 0) > 1
        )
        story.result.final_state = manager.get_state()
    finally:
        await manager.disconnect()
        await server.close()
        await proxy.close()
    story.chapter("summary")
    for line in summary_lines(story.result.final_state):
        story.narrate(line)
    return story.result


def _short(message: dict[str, Any], limit: int = 90) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in message.items() if k not in {"type", "timestamp"})
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_lines(state: WSState | None) -> list[str]:
    """The closing summary: stats and the attempts with their classification."""
    if state is None:
        return ["(no final state)"]
    stats = state.stats
    lines = [
        f"attempts {stats.total_attempts}, connections {stats.successful_connections}, "
        f"messages received {stats.messages_received}, sent {stats.messages_sent}, "
        f"heartbeats received {stats.heartbeats_received}, sent {stats.heartbeats_sent}",
        "message types: "
        + ", ".join(f"{k}={v}" for k, v in sorted(stats.message_counts_by_type.items())),
        "recent attempts (newest first; numbered per outage):",
    ]
    for attempt in state.recent_attempts:
        kind = attempt.failure_kind or "-"
        retry = (
            "" if attempt.retryable is None else (" retryable" if attempt.retryable else " final")
        )
        delay = (
            f", next retry in {attempt.next_retry_delay_ms:.0f} ms"
            if attempt.next_retry_delay_ms is not None
            else ""
        )
        lines.append(
            f"  #{attempt.number} {attempt.phase:<12} {attempt.outcome:<7} {kind}{retry}{delay}"
        )
    return lines
