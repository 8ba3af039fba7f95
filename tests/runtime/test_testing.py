"""steadysocket.testing as its users see it: the import paths, the virtual clock, and the scripted
servers driving a real WebSocketManager through a drop and a rejection.

(The manager's own tests use the same tools through tests/runtime/fakes.py; this file checks the
public surface itself, imported from where the README says.)
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

import steadysocket.testing
from steadysocket import BackoffStrategy, Phase, ServerError, WebSocketManager, WSError
from steadysocket.model.classify import HttpFailure
from steadysocket.runtime.transport import OpenFailed, TransportClosed
from steadysocket.testing import (
    LATE_HELLO_OWNER,
    ConnState,
    InMemoryServer,
    LoopbackServer,
    Mode,
    Script,
    ScriptedServer,
    ScriptMode,
    VirtualClock,
)
from tests.runtime import fakes

MS = 0.001
"""One millisecond: every real-time bound here is a multiple of it."""
BOUND = 10_000 * MS


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND):
            await main()

    asyncio.run(bounded())


def in_memory(
    script: Script | None = None, **options: object
) -> tuple[VirtualClock, InMemoryServer, WebSocketManager]:
    """The set-up the README shows: the in-memory server, the virtual clock, no environment."""
    clock = VirtualClock()
    server = InMemoryServer(clock, script)
    manager = WebSocketManager(
        server.url,
        "app-under-test",
        opener=server.open,
        clock=clock,
        sleep=clock.sleep,
        environ={},
        **options,  # type: ignore[arg-type]
    )
    return clock, server, manager


def keep_failures(errors: list[WSError]) -> Callable[[WSError | ServerError], None]:
    """An ``on_error`` listener that keeps the connection failures (the fakes send no errors)."""

    def keep(error: WSError | ServerError) -> None:
        assert isinstance(error, WSError), error
        errors.append(error)

    return keep


# -- import paths ---------------------------------------------------------------------------


PUBLIC = {
    "AttemptRecord",
    "ClockEntry",
    "ConnState",
    "ConnectionRecord",
    "FaultProxy",
    "Flap",
    "InMemoryServer",
    "LATE_HELLO_OWNER",
    "LoopbackServer",
    "MemoryTransport",
    "Mode",
    "Script",
    "ScriptMode",
    "ScriptedServer",
    "SleepRecord",
    "VirtualClock",
}


def test_the_public_names_are_all_and_import_from_steadysocket_testing() -> None:
    assert set(steadysocket.testing.__all__) == PUBLIC
    namespace: dict[str, object] = {}
    exec(f"from steadysocket.testing import {', '.join(sorted(PUBLIC))}", namespace)
    assert all(namespace[name] is getattr(steadysocket.testing, name) for name in PUBLIC)


def test_every_public_class_and_its_public_methods_have_docstrings() -> None:
    undocumented = []
    for name in sorted(PUBLIC):
        value = getattr(steadysocket.testing, name)
        if not inspect.isclass(value):
            continue
        if not inspect.getdoc(value):
            undocumented.append(name)
        for attribute, member in vars(value).items():
            if attribute.startswith("_") or not callable(getattr(member, "__func__", member)):
                continue
            if not inspect.getdoc(getattr(value, attribute)):
                undocumented.append(f"{name}.{attribute}")
    assert undocumented == []


def test_the_scripts_mode_is_not_the_fault_proxys_mode() -> None:
    assert (ScriptMode.__name__, Mode.__name__) == ("ScriptMode", "Mode")
    assert {"drop", "reject", "hang"} <= {m.value for m in ScriptMode} - {m.value for m in Mode}
    assert Script.drop().mode is ScriptMode.DROP


def test_the_test_suites_fakes_are_the_public_names_under_their_old_names() -> None:
    assert fakes.Mode is ScriptMode
    for name in set(fakes.__all__) - {"Mode", "failures_into", "unexpected_server_errors"}:
        assert getattr(fakes, name) is getattr(steadysocket.testing, name), name


def test_the_old_fault_proxy_path_still_names_the_same_classes() -> None:
    from steadysocket.runtime import faultproxy

    assert faultproxy.FaultProxy is steadysocket.testing.FaultProxy
    assert faultproxy.Mode is steadysocket.testing.Mode


def test_scripted_server_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ScriptedServer()  # type: ignore[abstract]


# -- the clock ------------------------------------------------------------------------------


def test_the_clock_stands_still_until_advanced_then_wakes_sleepers_at_their_times() -> None:
    async def main() -> None:
        clock = VirtualClock(start=50.0, wall_start=datetime(2030, 5, 1, tzinfo=UTC))
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, delay: float) -> None:
            await clock.sleep(delay)
            woke.append((name, clock.monotonic()))

        tasks = [
            asyncio.create_task(sleeper("late", 3.0), name="late"),
            asyncio.create_task(sleeper("first", 1.0), name="first"),
            asyncio.create_task(sleeper("tie", 1.0), name="tie"),
        ]
        await clock.settle()
        assert woke == []
        assert [(e.owner, e.due) for e in clock.pending()] == [
            ("first", 51.0),
            ("tie", 51.0),
            ("late", 53.0),
        ]
        await clock.advance(2.0)
        assert woke == [("first", 51.0), ("tie", 51.0)]  # due order, then registration order
        assert clock.monotonic() == 52.0
        assert clock.now() == datetime(2030, 5, 1, 0, 0, 2, tzinfo=UTC)
        await clock.advance_to(53.0)
        assert woke[-1] == ("late", 53.0)
        assert [(r.owner, r.delay, r.start, r.due) for r in clock.history] == [
            ("late", 3.0, 50.0, 53.0),
            ("first", 1.0, 50.0, 51.0),
            ("tie", 1.0, 50.0, 51.0),
        ]
        await asyncio.gather(*tasks)

    run(main)


def test_a_callback_runs_at_its_time_and_a_cancelled_one_never_does() -> None:
    async def main() -> None:
        clock = VirtualClock()
        ran: list[str] = []
        clock.call_later(0.5, lambda: ran.append("kept"), "kept")
        dropped = clock.call_later(0.25, lambda: ran.append("dropped"), "dropped")
        dropped.cancel()
        assert [e.owner for e in clock.pending()] == ["kept"]
        await clock.advance(0.4)
        assert ran == []
        await clock.advance(0.1)  # due exactly at the end: it runs
        assert ran == ["kept"]
        assert clock.peek() is None

    run(main)


def test_fire_and_jump_to_refuse_to_skip_an_entry_that_is_due_first() -> None:
    async def main() -> None:
        clock = VirtualClock(start=0.0)
        first = clock.call_later(1.0, lambda: None, "first")
        second = clock.call_later(2.0, lambda: None, "second")
        with pytest.raises(RuntimeError, match="second is not the next entry due"):
            clock.fire(second)
        with pytest.raises(RuntimeError, match=r"first is due at 1\.0 before 1\.5"):
            clock.jump_to(1.5)
        clock.fire(first)
        clock.jump_to(1.5)
        assert clock.monotonic() == 1.5
        assert clock.peek() is second

    run(main)


def test_the_wall_time_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        VirtualClock(wall_start=datetime(2030, 1, 1))


def test_settle_refuses_an_event_loop_it_cannot_see_into(monkeypatch: pytest.MonkeyPatch) -> None:
    class OtherLoop:
        """A loop without asyncio's ready queue (as uvloop's)."""

    async def main() -> None:
        with monkeypatch.context() as patch:
            patch.setattr(asyncio, "get_running_loop", OtherLoop)
            with pytest.raises(RuntimeError, match="needs asyncio's own event loop, not OtherLoop"):
                await VirtualClock.settle()

    run(main)


# -- the in-memory server -------------------------------------------------------------------


def test_the_in_memory_server_drops_the_link_and_the_manager_reconnects_on_virtual_time() -> None:
    async def main() -> None:
        clock, server, manager = in_memory(Script.accept(echo=True))
        phases: list[Phase] = []
        manager.on_state_change(lambda state: phases.append(state.phase))
        errors: list[WSError] = []
        manager.on_error(keep_failures(errors))
        async with manager:
            await clock.run_until_idle()
            first = server.current()
            assert first is not None
            assert first.client_id == "app-under-test"
            assert first.received_json() == []
            await server.drop()
            await clock.run_until_idle()
            assert manager.phase is Phase.FAILED
            assert (first.state, first.closed_by, first.close_code) == (
                ConnState.CLOSED,
                "drop",
                1006,
            )
            started = clock.monotonic()
            await clock.advance(2.0)
            assert manager.get_state().phase is Phase.OPEN
            retry = [r for r in clock.history if r.owner.endswith("-retry")]
            assert len(retry) == 1
            assert retry[0].start == started
            assert 0.8 <= retry[0].delay <= 1.2  # the production backoff: 1 s, ±20 %
            assert manager.send({"type": "note"})
            await clock.run_until_idle()
            assert server.current() is server.connections[1]
            assert [m["type"] for m in server.received_json()] == ["note"]
        assert phases == ["connecting", "open", "failed", "reconnecting", "open", "idle"]
        assert [(e.kind, e.retryable) for e in errors] == [("abnormal", True)]
        assert [a.mode for a in server.attempts] == [ScriptMode.ACCEPT, ScriptMode.ACCEPT]
        assert [a.connection for a in server.attempts] == server.connections
        assert server.connections[1].closed_by == "client"
        assert server.live() == []

    run(main)


def test_a_scripted_rejection_is_reported_and_retried_until_the_server_accepts() -> None:
    async def main() -> None:
        clock, server, manager = in_memory(
            Script.reject(503), backoff_strategy=BackoffStrategy.create_immediate_strategy()
        )
        errors: list[WSError] = []
        manager.on_error(keep_failures(errors))
        async with manager:
            await clock.run_until_idle()
            assert manager.phase is Phase.FAILED
            await clock.advance(0.1)  # the immediate strategy retries after 100 ms
            assert len(server.attempts) == 2
            assert all(
                a.mode is ScriptMode.REJECT and a.connection is None for a in server.attempts
            )
            assert server.connections == []
            await server.set_script(Script.accept())
            await clock.advance(0.1)
            assert manager.get_state().phase is Phase.OPEN
        assert [(e.failure, e.kind, e.retryable) for e in errors] == [
            (HttpFailure(503), "server_error", True),
            (HttpFailure(503), "server_error", True),
        ]
        assert len(server.connections) == 1

    run(main)


def test_a_permanent_rejection_sends_the_manager_to_fallback_in_one_attempt() -> None:
    async def main() -> None:
        clock, server, manager = in_memory(Script.close(4401, "Invalid role 'x'"))
        async with manager:
            await clock.run_until_idle()
            assert manager.phase is Phase.FALLBACK
            (record,) = server.connections
            assert (record.closed_by, record.close_code, record.close_reason) == (
                "server",
                4401,
                "Invalid role 'x'",
            )

    run(main)


def test_open_reports_what_the_real_opener_would() -> None:
    async def main() -> None:
        server = InMemoryServer()
        with pytest.raises(OpenFailed) as wrong_path:
            await server.open("ws://fake.invalid/elsewhere")
        assert wrong_path.value.failure == HttpFailure(404)
        await server.set_script(Script.refuse())
        with pytest.raises(OpenFailed, match="refused"):
            await server.open(server.url + "/ws/client")
        assert [a.mode for a in server.attempts] == [ScriptMode.ACCEPT, ScriptMode.REFUSE]

    run(main)


def test_the_transport_lets_a_test_stop_the_server_reading() -> None:
    async def main() -> None:
        server = InMemoryServer()
        transport = await server.open(server.url + "/ws/client?client_id=c")
        assert server.transport() is transport
        assert '"type":"hello"' in str(await transport.recv())
        transport.stop_reading()
        blocked = asyncio.create_task(transport.send('{"type": "note"}'))
        await VirtualClock.settle()
        assert not blocked.done()
        assert (transport.record.taken, transport.record.received) == (['{"type": "note"}'], [])
        transport.resume_reading()
        await blocked
        assert transport.record.received == ['{"type": "note"}']
        await server.close(1001, "going away")
        with pytest.raises(TransportClosed, match="1001"):
            await transport.recv()
        with pytest.raises(LookupError):
            server.transport()

    run(main)


def test_a_late_hello_waits_on_the_virtual_clock_and_on_real_time_without_one() -> None:
    async def main() -> None:
        clock = VirtualClock()
        server = InMemoryServer(clock, Script.late_hello(500))
        transport = await server.open(server.url + "/ws/client?client_id=c")
        assert [(e.owner, e.due - clock.monotonic()) for e in clock.pending()] == [
            (LATE_HELLO_OWNER, 0.5)
        ]
        await clock.advance(0.5)
        assert '"type":"hello"' in str(await transport.recv())

        real = InMemoryServer(None, Script.late_hello(20))
        transport = await real.open(real.url + "/ws/client?client_id=c")
        started = asyncio.get_running_loop().time()
        assert '"type":"hello"' in str(await transport.recv())
        assert asyncio.get_running_loop().time() - started >= 10 * MS

    run(main)


# -- the loopback server --------------------------------------------------------------------


def test_the_loopback_server_drops_a_real_connection_and_the_manager_reconnects() -> None:
    async def main() -> None:
        async with LoopbackServer(script=Script.accept(echo=True)) as server:
            assert server.url.startswith("ws://127.0.0.1:")
            manager = WebSocketManager(
                server.url,
                backoff_strategy=BackoffStrategy.create_immediate_strategy(),
                environ={},
            )
            async with manager:
                await manager.wait_for(Phase.OPEN, timeout=BOUND)
                await server.drop()
                await manager.wait_for(Phase.FAILED, timeout=BOUND)
                await manager.wait_for(Phase.OPEN, timeout=BOUND)
            first, second = server.connections
            assert first.closed_by == "drop"
            assert second.closed_by == "client"

    run(main)


def test_the_loopback_server_cannot_hang_a_handshake() -> None:
    async def main() -> None:
        async with LoopbackServer() as server:
            with pytest.raises(ValueError, match="cannot hang"):
                await server.set_script(Script.hang())

    run(main)


def test_the_clock_offsets_the_wall_time_by_the_virtual_seconds() -> None:
    clock = VirtualClock()
    assert clock.now() - datetime(2025, 1, 1, tzinfo=UTC) == timedelta(0)
