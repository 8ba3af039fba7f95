"""The neutral view of the declaration (rows) and its text renderings: Mermaid and Markdown."""

from __future__ import annotations

from pathlib import Path

from steadysocket.model.effects import EFFECT_TYPES, CancelTimer, ResetBackoff, SendPing, Timer
from steadysocket.model.graph import (
    GENERATED_NOTICE,
    Row,
    markdown_table,
    mermaid,
    overview_edges,
    rows,
)
from steadysocket.model.snapshot import Phase

DOCS_TABLE = Path(__file__).resolve().parents[2] / "docs" / "transitions.md"


def _row(*effects: object, source: Phase = Phase.OPEN, target: Phase = Phase.OPEN) -> Row:
    return Row(source, "stable", "", target, tuple(effects), 0)  # type: ignore[arg-type]


def test_a_row_is_internal_only_when_it_stays_in_its_phase() -> None:
    assert _row().internal
    assert not _row(target=Phase.DEGRADED).internal


def test_effects_text_merges_a_run_of_cancels_into_one_phrase() -> None:
    row = _row(CancelTimer(Timer.HEARTBEAT), CancelTimer(Timer.STABLE), SendPing())
    assert row.effects_text == "cancel heartbeat/stable timers, send ping"
    single = _row(CancelTimer(Timer.RETRY), ResetBackoff(), CancelTimer(Timer.PROBE))
    assert single.effects_text == "cancel retry timer, reset backoff, cancel probe timer"
    assert _row().effects_text == "-"


def test_row_ids_name_source_event_guard_and_target() -> None:
    ids = [row.id for row in rows()]
    assert "open-connection_lost[is_graceful]-reconnecting" in ids
    assert "open-connection_lost[is_graceful and has_graceful_jitter]-reconnecting" in ids
    assert "degraded-peer_dead[not has_attempts_left]-fallback" in ids
    assert len(ids) == len(set(ids))


def test_mermaid_has_the_notice_the_start_and_one_edge_per_row() -> None:
    lines = mermaid().splitlines()
    assert lines[:3] == [f"%% {GENERATED_NOTICE}", "stateDiagram-v2", "    [*] --> idle"]
    edges = lines[3:]
    assert len(edges) == len(rows())
    assert "    open --> reconnecting: connection_lost [is_graceful]" in edges
    assert "    failed --> reconnecting: retry_due" in edges
    assert "    reconnecting --> reconnecting: reconnect_due" in edges


def test_the_markdown_table_numbers_every_row_and_documents_every_effect() -> None:
    table = markdown_table()
    lines = table.splitlines()
    assert lines[0] == "# Lifecycle transition table"
    assert f"<!-- {GENERATED_NOTICE} -->" in lines
    numbered = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert len(numbered) == len(rows())
    assert numbered[0].startswith("| 1 | `idle` | `connect` |  | `connecting` | reset backoff")
    assert (
        "| 12 | `open` | `connection_lost` | `is_graceful and has_graceful_jitter` "
        "| `reconnecting` | cancel heartbeat/stable timers, start graceful timer |"
    ) in lines
    assert (
        "| 13 | `open` | `connection_lost` | `is_graceful` | `reconnecting` "
        "| cancel heartbeat/stable timers, open socket, start connect timer |"
    ) in lines
    for effect_type in EFFECT_TYPES:
        assert any(line.startswith(f"| `{effect_type.__name__}` | ") for line in lines)
    assert table.endswith("\n")


def test_the_committed_docs_table_is_what_the_declaration_renders() -> None:
    """The docs are generated: a lifecycle change must regenerate and commit them."""
    assert DOCS_TABLE.read_text(encoding="utf-8") == markdown_table()


def test_the_overview_draws_the_applications_any_phase_actions_once() -> None:
    edges = overview_edges()
    anywhere = {edge.target: edge.events for edge in edges if edge.source is None}
    assert anywhere == {Phase.IDLE: ("disconnect",), Phase.CONNECTING: ("force_reconnect",)}


def test_the_overview_merges_parallel_edges_and_names_their_events_once() -> None:
    edges = {(edge.source, edge.target): edge.events for edge in overview_edges()}
    # Two guarded connection_lost rows and a peer_dead row lead from degraded to fallback.
    assert edges[(Phase.DEGRADED, Phase.FALLBACK)] == ("connection_lost", "peer_dead")
    assert edges[(Phase.IDLE, Phase.CONNECTING)] == ("connect",)
    assert len(edges) == len(overview_edges())  # one edge per pair


def test_the_overview_covers_every_transition_that_changes_phase_and_nothing_else() -> None:
    edges = overview_edges()
    drawn = {(edge.source, edge.target, event) for edge in edges for event in edge.events}
    anywhere = {
        (edge.target, event) for edge in edges if edge.source is None for event in edge.events
    }
    for row in rows():
        if (row.target, row.event) in anywhere:
            continue
        assert ((row.source, row.target, row.event) in drawn) is not row.internal, row.id
    assert all(edge.source is not edge.target for edge in edges)
    assert sum(len(edge.events) for edge in edges) < len(rows())
