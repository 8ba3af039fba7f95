"""Protocol v2 end to end: a real ``SteadyServer`` and a ``WebSocketManager(version=2)`` on
127.0.0.1, through the ``FaultProxy`` while the link is reset every 100-500 ms, and across a
server restart.

The ledger is counted on both ends: every message the client's ``send()`` accepted is handled
by the server exactly once, in order, and every message the server sent reaches the client's
listeners exactly once, in order. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.delivery import DeliveryConfig
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import ResumeEvent, Returned, WebSocketManager
from steadysocket.runtime.server import Client, SteadyServer
from steadysocket.testing import FaultProxy, Mode

T = TypeVar("T")

MESSAGES = 10_000
"""Each way."""
BATCH = 25
"""Messages sent (each way) per pacing step, so the traffic spans many drops."""
PACE_S = 0.01
RUN_BOUND_S = 240.0
QUIET_BOUND_S = 60.0
CLIENT = "flappy"


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(RUN_BOUND_S):
            return await coro

    return asyncio.run(bounded())


def fast_backoff() -> BackoffStrategy:
    return BackoffStrategy(
        base_delays_ms=(20, 40, 80, 160), cap_delay_ms=200, jitter_ratio=0.2, max_attempts=1000
    )


class Ledger:
    """What each end saw."""

    def __init__(self) -> None:
        self.handled: list[int] = []
        self.received: list[int] = []
        self.returned: list[tuple[str, int]] = []
        self.resumes: list[ResumeEvent] = []

    def client(self, manager: WebSocketManager) -> None:
        manager.on_message(self._got)
        manager.on_returned(self._back)
        manager.on_resume(self.resumes.append)

    def server(self, server: SteadyServer) -> None:
        @server.on_message("up")
        async def handle(message: dict[str, Any], client: Client) -> None:
            self.handled.append(message["n"])

    def _got(self, message: dict[str, Any]) -> None:
        if message.get("type") == "down":
            self.received.append(message["n"])

    def _back(self, messages: Returned) -> None:
        self.returned.extend((messages.reason, m["n"]) for m in messages)


def v2_server(port: int = 0) -> SteadyServer:
    # The history holds every message the test publishes, so that "published within the
    # window" holds however long an outage lasts; the bound is the configuration's.
    return SteadyServer(
        "127.0.0.1",
        port,
        compression=None,
        delivery=DeliveryConfig(history_limit=MESSAGES + 1, window_ms=60_000),
    )


async def flap(proxy: FaultProxy, stop: asyncio.Event, rng: random.Random) -> int:
    """Reset the link every 100-500 ms until ``stop``; returns how many resets."""
    resets = 0
    for _ in range(10_000):  # bounded; about 60 s at the shortest spacing
        try:
            async with asyncio.timeout(rng.uniform(0.1, 0.5)):
                await stop.wait()
            return resets
        except TimeoutError:
            pass
        proxy.set_mode(Mode.RESET, apply_to_current=True)
        resets += 1
        await asyncio.sleep(0.01)
        proxy.set_mode(Mode.PASS)
    return resets


async def until(predicate: Any, bound_s: float, what: str) -> None:
    async with asyncio.timeout(bound_s):
        while not predicate():  # noqa: ASYNC110 - polls the ledgers, bounded by the timeout
            await asyncio.sleep(0.02)
    assert predicate(), what


def test_ten_thousand_messages_each_way_survive_a_link_reset_every_100_to_500_ms() -> None:
    async def body() -> tuple[Ledger, int, Any]:
        ledger = Ledger()
        rng = random.Random(2026)
        async with v2_server() as server, FaultProxy(server.port) as proxy:
            ledger.server(server)
            manager = WebSocketManager(
                proxy.url,
                CLIENT,
                version=2,
                backoff_strategy=fast_backoff(),
                send_queue_limit=MESSAGES,
                environ={},
            )
            ledger.client(manager)
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=10)
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                flapper = group.create_task(flap(proxy, stop, rng))
                sent = pushed = 0
                for _ in range(MESSAGES):  # bounded: each round sends up to BATCH each way
                    if sent >= MESSAGES and pushed >= MESSAGES:
                        break
                    for _ in range(BATCH):
                        if sent < MESSAGES and manager.send({"type": "up", "n": sent}):
                            sent += 1
                        if pushed < MESSAGES:
                            await server.send_to(CLIENT, {"type": "down", "n": pushed})
                            pushed += 1
                    await asyncio.sleep(PACE_S)
                stop.set()
            resets = flapper.result()
            await until(
                lambda: len(ledger.handled) >= MESSAGES and len(ledger.received) >= MESSAGES,
                QUIET_BOUND_S,
                "everything arrived once the link was quiet",
            )
            await asyncio.sleep(0.2)  # anything doubled would arrive now
            state = manager.get_state()
            await manager.destroy()
            return ledger, resets, state

    ledger, resets, state = run(body())
    print(
        f"\nv2 through resets: {resets} resets, {len(ledger.resumes)} resumes, "
        f"resent {state.delivery.resent}, replayed {state.delivery.replayed}, "
        f"duplicates dropped {state.delivery.duplicates_dropped}"
    )
    assert resets >= 5, f"the link was reset only {resets} times"
    assert ledger.handled == list(range(MESSAGES)), "client to server: once each, in order"
    assert ledger.received == list(range(MESSAGES)), "server to client: once each, in order"
    assert ledger.returned == []
    assert all(event.resumed for event in ledger.resumes), ledger.resumes
    assert len(ledger.resumes) >= 1


def test_a_server_restart_is_announced_and_hands_back_what_it_may_have_lost() -> None:
    async def body() -> tuple[Ledger, list[int]]:
        ledger = Ledger()
        first = v2_server()
        await first.start()
        port = first.port
        ledger.server(first)
        manager = WebSocketManager(
            first.url, CLIENT, version=2, backoff_strategy=fast_backoff(), environ={}
        )
        ledger.client(manager)
        await manager.connect()
        await manager.wait_for(Phase.OPEN, timeout=10)
        for n in range(200):
            manager.send({"type": "up", "n": n})
        await until(lambda: len(ledger.handled) >= 50, 10, "the first server handled some")
        await first.close()  # in-memory sessions are gone with it
        handled_by_first = list(ledger.handled)
        for n in range(200, 300):
            manager.send({"type": "up", "n": n})  # during the outage
        second = v2_server(port)
        ledger.server(second)
        async with second:
            await until(lambda: ledger.resumes != [], 10, "the client reconnected")
            await until(
                lambda: {n for _, n in ledger.returned} | set(ledger.handled) >= set(range(300)),
                10,
                "every message handled or handed back",
            )
            # destroy() ends the session too, handing back what is written and not yet
            # acknowledged: that is another story, so the ledger is read before it.
            returned_at_resume = list(ledger.returned)
            await manager.destroy()
        ledger.returned = returned_at_resume
        return ledger, handled_by_first

    ledger, handled_by_first = run(body())
    event = ledger.resumes[0]
    assert (event.resumed, event.outcome) == (False, "wrong_epoch")
    returned = [n for reason, n in ledger.returned if reason == "not acknowledged"]
    assert returned == [m["n"] for m in event.returned]
    handled = ledger.handled
    assert len(handled) == len(set(handled)), "nothing handled twice"
    assert set(handled) | set(returned) >= set(range(300)), "nothing lost silently"
    # What the second server handled is what the first never saw, in order.
    second = handled[len(handled_by_first) :]
    assert second == sorted(second)
    assert not set(second) & set(handled_by_first)
