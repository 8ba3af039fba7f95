"""``WebSocketManager(version=2)`` against the in-memory v2 server (``fake_v2.py``), case by case.

Each test names one promise of protocol v2 (docs/protocol.md, "Protocol v2") and checks it from
the outside: what the server handled, what the client's listeners got, what was handed back.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from steadysocket.model.delivery import DeliveryConfig
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.manager import (
    RequestFailed,
    ResumeEvent,
    Returned,
    ServerError,
    WebSocketManager,
)
from tests.runtime.fake_v2 import FakeV2Server
from tests.runtime.fakes import VirtualClock

BOUND_S = 30.0
CLIENT = "c1"


class Rig:
    """A manager on a virtual clock, its fake v2 server, and what its listeners heard."""

    def __init__(self, *, server_config: DeliveryConfig | None = None, **options: Any) -> None:
        self.clock = VirtualClock()
        self.server = FakeV2Server(self.clock, config=server_config, **_server_options(options))
        settings: dict[str, Any] = {
            "version": 2,
            "opener": self.server.open,
            "clock": self.clock,
            "sleep": self.clock.sleep,
            "rng": random.Random(7),
            "environ": {},
            "delivery": DeliveryConfig(ack_every=2, ack_interval_ms=50),
            **options,
        }
        self.m = WebSocketManager(self.server.url, CLIENT, **settings)
        self.received: list[dict[str, Any]] = []
        self.returned: list[Returned] = []
        self.resumes: list[ResumeEvent] = []
        self.m.on_message(self.received.append)
        self.m.on_returned(self.returned.append)
        self.m.on_resume(self.resumes.append)

    async def open(self) -> None:
        await self.m.connect()
        await self.clock.run_until_idle()
        assert self.m.phase is Phase.OPEN

    async def reconnect_after_drop(self) -> None:
        """The link drops; time passes until the manager is open again."""
        assert self.server.drop()
        await self.clock.run_until_idle()
        for _ in range(20):
            if self.m.phase is Phase.OPEN and self.server.current is not None:
                return
            await self.clock.advance(1.0)
        raise AssertionError(f"not open again: {self.m.phase}")

    async def round_trip(self) -> None:
        """The server reads everything, acks, and the client reads everything."""
        for _ in range(5):
            await self.clock.run_until_idle()
            self.server.read()
            self.server.flush_acks()
            await self.clock.advance(0.1)  # the client's ack timer

    def handled(self) -> list[int]:
        return [n for _, n in self.server.handled]

    def payloads(self) -> list[int]:
        return [message["n"] for message in self.received if "n" in message]


def _server_options(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("speaks_v2", "reply_to_requests")
    return {key: options.pop(key) for key in keys if key in options}


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(BOUND_S):
            await main()

    asyncio.run(bounded())


def test_messages_carry_ids_are_handled_once_and_leave_the_outbox_when_acknowledged() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        for n in range(5):
            assert rig.m.send({"type": "msg", "n": n})
        await rig.round_trip()
        assert rig.handled() == [0, 1, 2, 3, 4]
        link = rig.server.current
        assert link is not None
        assert [json.loads(t)["id"] for t in link.taken if '"msg"' in t] == [1, 2, 3, 4, 5]
        state = rig.m.get_state()
        assert state.protocol_version == 2
        assert state.delivery is not None
        assert state.delivery.unacknowledged == 0
        assert state.delivery.last_resume_outcome == "new"
        await rig.m.destroy()

    run(main)


def test_a_message_handled_before_the_drop_but_never_acked_is_not_handled_again() -> None:
    async def main() -> None:
        rig = Rig(server_config=DeliveryConfig(ack_every=100))
        await rig.open()
        for n in range(3):
            rig.m.send({"type": "msg", "n": n})
        await rig.clock.run_until_idle()
        assert rig.server.read() == 3  # handled; the batched ack is not written yet
        await rig.reconnect_after_drop()
        await rig.round_trip()
        assert rig.handled() == [0, 1, 2]
        state = rig.m.get_state().delivery
        assert state is not None
        assert (state.resent, state.unacknowledged) == (3, 0)
        assert [event.resumed for event in rig.resumes] == [True]
        assert rig.returned == []
        await rig.m.destroy()

    run(main)


def test_what_the_server_sends_during_an_outage_arrives_on_resume_once_in_order() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        assert rig.server.publish(CLIENT, {"type": "push", "n": 0})
        await rig.clock.run_until_idle()
        assert rig.server.drop()
        for n in range(1, 4):
            assert rig.server.publish(CLIENT, {"type": "push", "n": n})
        await rig.clock.advance(5.0)
        await rig.round_trip()
        assert rig.payloads() == [0, 1, 2, 3]
        assert "offset" not in rig.received[0]
        assert rig.resumes[0].replayed == 3
        state = rig.m.get_state().delivery
        assert state is not None
        assert (state.replayed, state.last_offset) == (3, 4)
        await rig.m.destroy()

    run(main)


def test_duplicate_offsets_are_dropped_and_a_gap_makes_the_client_resume() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        link = rig.server.current
        assert link is not None
        link.push('{"offset":1,"type":"push","n":1}')
        link.push('{"offset":1,"type":"push","n":1}')
        await rig.clock.run_until_idle()
        assert rig.payloads() == [1]
        state = rig.m.get_state().delivery
        assert state is not None
        assert state.duplicates_dropped == 1
        link.push('{"offset":5,"type":"push","n":5}')  # never published: a gap
        await rig.clock.run_until_idle()
        assert not link.live  # the client dropped the broken link...
        await rig.clock.advance(5.0)
        assert rig.m.phase is Phase.OPEN  # ...and came back
        assert rig.payloads() == [1]
        await rig.m.destroy()

    run(main)


def test_a_server_restart_is_told_and_hands_back_what_may_be_lost() -> None:
    async def main() -> None:
        rig = Rig(server_config=DeliveryConfig(ack_every=100))
        await rig.open()
        rig.m.send({"type": "msg", "n": 1})
        await rig.clock.run_until_idle()  # written, never acknowledged
        rig.server.restart()
        assert rig.m.send({"type": "msg", "n": 2})  # during the outage: never written
        await rig.clock.advance(5.0)
        await rig.round_trip()
        assert [(e.resumed, e.outcome) for e in rig.resumes] == [(False, "wrong_epoch")]
        assert [m["n"] for m in rig.resumes[0].returned] == [1]
        assert [(r.reason, [m["n"] for m in r]) for r in rig.returned] == [
            ("not acknowledged", [1])
        ]
        assert "id" not in rig.returned[0][0]
        # The message never written goes to the new session, as its first.
        assert rig.server.handled[-1][1] == 2
        state = rig.m.get_state().delivery
        assert state is not None
        assert state.last_resume_outcome == "wrong_epoch"
        await rig.m.destroy()

    run(main)


def test_a_v1_only_server_gets_one_retry_in_v1() -> None:
    async def main() -> None:
        rig = Rig(speaks_v2=False)
        await rig.m.connect()
        assert rig.m.send({"type": "msg", "n": 1})  # queued while connecting
        await rig.clock.advance(10.0)
        assert rig.m.phase is Phase.OPEN
        assert rig.server.refused_versions == ["2"]
        await rig.round_trip()
        assert rig.server.handled == [("v1", 1)]
        state = rig.m.get_state()
        assert (state.protocol_version, state.delivery) == (1, None)
        await rig.m.destroy()

    run(main)


def test_disconnect_hands_back_with_reasons_and_fails_waiting_requests() -> None:
    async def main() -> None:
        rig = Rig(reply_to_requests=False, server_config=DeliveryConfig(ack_every=100))
        await rig.open()
        rig.m.send({"type": "msg", "n": 1})
        request = asyncio.create_task(rig.m.request({"type": "q", "n": 2}))
        await rig.clock.run_until_idle()
        await rig.m.disconnect()
        with pytest.raises(RequestFailed, match="closed") as failed:
            await request
        assert failed.value.reason == "closed"
        assert [(r.reason, [m["n"] for m in r]) for r in rig.returned] == [
            ("not acknowledged", [1, 2])
        ]

    run(main)


def test_a_v2_message_may_not_carry_id_or_offset() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        with pytest.raises(ValueError, match="remove the field"):
            rig.m.send({"type": "msg", "offset": 3})
        with pytest.raises(ValueError, match="remove the field"):
            await rig.m.request({"type": "msg", "id": 3})
        await rig.m.destroy()

    run(main)


# -- request() ---------------------------------------------------------------------------------


def test_a_v2_request_gets_its_reply_across_a_drop() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        request = asyncio.create_task(rig.m.request({"type": "q", "n": 7, "request": True}))
        await rig.clock.run_until_idle()
        await rig.reconnect_after_drop()  # written, never read: re-sent on resume
        await rig.round_trip()
        assert await request == {"n": 7}
        assert rig.handled() == [7]
        assert rig.received == []  # a reply goes to its request, not to the listeners
        await rig.m.destroy()

    run(main)


def test_a_v2_request_whose_handler_returned_nothing_resolves_with_the_ack() -> None:
    async def main() -> None:
        rig = Rig(reply_to_requests=False)
        await rig.open()
        request = asyncio.create_task(rig.m.request({"type": "q", "n": 1}))
        await rig.round_trip()
        assert await request is None
        await rig.m.destroy()

    run(main)


def test_concurrent_v2_requests_each_get_their_own_reply_through_drops() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        requests = [
            asyncio.create_task(rig.m.request({"type": "q", "n": n, "request": True}))
            for n in range(6)
        ]
        await rig.clock.run_until_idle()
        rig.server.read(2)
        await rig.reconnect_after_drop()
        requests += [
            asyncio.create_task(rig.m.request({"type": "q", "n": n, "request": True}))
            for n in range(6, 9)
        ]
        rig.server.read(3)
        await rig.reconnect_after_drop()
        await rig.round_trip()
        assert [await r for r in requests] == [{"n": n} for n in range(9)]
        assert rig.handled() == list(range(9))
        await rig.m.destroy()

    run(main)


def test_a_request_written_into_a_lost_session_fails_not_acknowledged() -> None:
    async def main() -> None:
        rig = Rig()
        await rig.open()
        lost = asyncio.create_task(rig.m.request({"type": "q", "n": 1, "request": True}))
        await rig.clock.run_until_idle()
        rig.server.restart()
        kept = asyncio.create_task(rig.m.request({"type": "q", "n": 2, "request": True}))
        await rig.clock.advance(5.0)
        await rig.round_trip()
        with pytest.raises(RequestFailed, match="not acknowledged"):
            await lost
        assert await kept == {"n": 2}  # renumbered into the new session, answered there
        await rig.m.destroy()

    run(main)


def test_a_request_times_out_and_a_refused_one_fails_at_once() -> None:
    async def main() -> None:
        rig = Rig(reply_to_requests=False, server_config=DeliveryConfig(ack_every=100))
        with pytest.raises(RequestFailed, match="refused"):
            await rig.m.request({"type": "q"})  # idle
        await rig.open()
        with pytest.raises(TimeoutError):
            await rig.m.request({"type": "q"}, timeout=0.01)
        await rig.m.destroy()

    run(main)


def test_v1_requests_are_numbered_answered_and_fail_when_their_connection_drops() -> None:
    async def main() -> None:
        rig = Rig(speaks_v2=False, version=1)
        await rig.m.connect()
        await rig.clock.run_until_idle()
        assert rig.m.phase is Phase.OPEN
        answered = asyncio.create_task(rig.m.request({"type": "q", "n": 3}))
        await rig.clock.run_until_idle()
        rig.server.read()
        await rig.clock.run_until_idle()
        assert await answered == {"n": 3}
        with pytest.raises(ValueError, match="remove the field id"):
            await rig.m.request({"type": "q", "id": 1})
        lost = asyncio.create_task(rig.m.request({"type": "q", "n": 4}))
        await rig.clock.run_until_idle()
        assert rig.server.drop()
        await rig.clock.run_until_idle()
        with pytest.raises(RequestFailed, match="connection lost"):
            await lost
        await rig.m.destroy()

    run(main)


def test_a_reply_with_an_error_raises_the_servers_error() -> None:
    async def main() -> None:
        rig = Rig(speaks_v2=False, version=1, reply_to_requests=False)
        await rig.m.connect()
        await rig.clock.run_until_idle()
        request = asyncio.create_task(rig.m.request({"type": "q"}))
        await rig.clock.run_until_idle()
        link = rig.server.current
        assert link is not None
        link.push('{"type":"reply","id":1,"error":{"error_code":"HANDLER_ERROR","message":"boom"}}')
        with pytest.raises(ServerError, match="boom") as raised:
            await request
        assert raised.value.error_code == "HANDLER_ERROR"
        # A reply nobody waits for is an ordinary message for the listeners.
        link.push('{"type":"reply","id":99,"result":1}')
        await rig.clock.run_until_idle()
        assert rig.received[-1] == {"type": "reply", "id": 99, "result": 1}
        await rig.m.destroy()

    run(main)


def test_destroy_fails_a_waiting_request_with_manager_closed() -> None:
    async def main() -> None:
        from steadysocket.runtime.manager import ManagerClosed

        rig = Rig(reply_to_requests=False, server_config=DeliveryConfig(ack_every=100))
        await rig.open()
        request = asyncio.create_task(rig.m.request({"type": "q"}))
        await rig.clock.run_until_idle()
        await rig.m.destroy()
        with pytest.raises(ManagerClosed):
            await request

    run(main)
