"""The delivery model check: exhaustive exploration of protocol v2, and the broken variants it
must reject, each with the invariant it breaks and a shortest trace."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from steadysocket.model.delivery_explore import (
    Bounds,
    Explorer,
    Invariant,
    Report,
    Violation,
    World,
    variants,
)

Summary = Callable[[str, str], None]
SECTION = "delivery model check (protocol v2, breadth-first)"


@pytest.fixture(scope="module")
def report() -> Report:
    return Explorer().run()


def test_the_delivery_rules_satisfy_every_invariant(report: Report, summary: Summary) -> None:
    summary(SECTION, report.summary())
    summary(SECTION, "invariants checked: " + "; ".join(i.name for i in Invariant))
    assert report.complete, "the search was cut short"
    assert report.violations == [], "\n".join(str(v) for v in report.violations)
    # The bounds are the documented "a few messages each way, a few drops at any point".
    assert Bounds() == Bounds(messages=2, publications=2, drops=2, restarts=1, expiries=1)
    # Quiet worlds (everything sent, nothing in flight) are where "never neither" is checked;
    # thousands of them are reached by different interleavings.
    assert report.quiet > 1_000


# Each variant, the invariant it must break. The first three are the issue's; those with the
# default bounds stop at their first violation (a shortest trace: the search is breadth first),
# the small ones are explored whole.
EXPECTED = {
    "ack before the handler runs": Invariant.C2S_EXACTLY_ONCE,
    "replay from the wrong offset": Invariant.NO_PROTOCOL_ERROR,
    "no dedup on re-send": Invariant.C2S_EXACTLY_ONCE,
    "resume replays nothing": Invariant.NO_PROTOCOL_ERROR,
    "no duplicate check on the client": Invariant.S2C_EXACTLY_ONCE,
    "hands back after a resume too": Invariant.C2S_EXACTLY_ONCE,
    "a gap delivered silently": Invariant.NO_SILENT_GAP,
    "outbox without a bound": Invariant.BOUNDED,
    "history without a bound": Invariant.BOUNDED,
}
EXPLORED_WHOLE = {"a gap delivered silently", "outbox without a bound", "history without a bound"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_broken_variant_is_rejected_with_a_shortest_trace(name: str, summary: Summary) -> None:
    whole = name in EXPLORED_WHOLE
    found = variants()[name].run(stop_at_first=not whole)
    assert EXPECTED[name] in found.broken
    violation = next(v for v in found.violations if v.invariant is EXPECTED[name])
    assert violation.trace, "a trace leads to it"
    summary(f"{SECTION}: broken variants rejected", f"{name}: {violation.invariant.name}")
    summary(f"{SECTION}: broken variants rejected", "  " + " / ".join(violation.trace))


def test_a_replay_of_what_the_client_already_has_is_dropped_by_its_duplicate_check() -> None:
    found = variants()["replay of what the client has (dropped by its check)"].run()
    assert found.complete
    assert found.violations == []


def test_the_ack_before_the_handler_variant_loses_a_message() -> None:
    violation = variants()["ack before the handler runs"].run(stop_at_first=True).violations[0]
    # Acked on arrival, its handler then lost with the process: the client dropped it from
    # its outbox on the ack, so it is neither handled nor handed back.
    assert "neither handled nor handed back: {1}" in violation.detail
    assert 'client reads {"type": "ack", "id": 1}' in violation.trace
    assert "server restarts" in violation.trace


def test_the_no_dedup_variant_handles_a_re_sent_id_twice() -> None:
    violation = variants()["no dedup on re-send"].run(stop_at_first=True).violations[0]
    assert "handled twice" in violation.detail
    assert "connection drops" in violation.trace


def test_a_violation_reads_with_its_trace() -> None:
    text = str(Violation(Invariant.BOUNDED, "history of 3", ("app sends", "client connects")))
    assert text.splitlines() == [
        "BOUNDED: history of 3",
        "  after:",
        "  app sends",
        "  client connects",
    ]
    assert str(Violation(Invariant.BOUNDED, "x", ())).endswith("(initial world)")


def test_a_search_cut_short_says_so() -> None:
    cut = Explorer(Bounds(messages=1, publications=1, drops=1)).run(max_states=10)
    assert not cut.complete
    assert cut.states == 10


def _connected() -> tuple[Explorer, World]:
    explorer = Explorer()
    world = explorer.initial()
    explorer.connect(world)
    return explorer, world


def test_a_protocol_error_ends_the_connection_and_the_exploration_there() -> None:
    explorer, world = _connected()
    world.c2s.append('{"type":"ack","offset":5}')  # an offset the server never sent
    explorer.server_reads(world)
    assert world.protocol_error == "client acked unsent offset 5"
    assert not world.connected
    assert list(explorer.edges(world)) == []
    assert (Invariant.NO_PROTOCOL_ERROR, "client acked unsent offset 5") in explorer.problems(world)


def test_the_server_refuses_an_id_after_a_gap() -> None:
    explorer, world = _connected()
    world.c2s.append('{"id":3,"n":3}')
    explorer.server_reads(world)
    assert world.protocol_error == "server saw a gap at id 3"
