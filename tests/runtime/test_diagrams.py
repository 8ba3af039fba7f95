"""Generated files: fresh, deterministic, and checked by ``steadysocket diagrams --check``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from steadysocket.model.graph import markdown_table, mermaid, overview_edges, rows
from steadysocket.runtime import diagrams

ROOT = Path(__file__).resolve().parents[2]


def test_committed_generated_files_match_the_declaration() -> None:
    stale = diagrams.check(ROOT)
    assert stale == [], "run `steadysocket diagrams`:\n" + "".join(s.diff for s in stale)


def test_dot_and_mermaid_text_are_byte_identical_from_run_to_run() -> None:
    assert diagrams.dot_graph().source == diagrams.dot_graph().source
    assert mermaid() == mermaid()
    assert markdown_table() == markdown_table()


def test_dot_text_embeds_no_object_ids() -> None:
    source = diagrams.dot_graph().source
    assert "0x" not in source
    assert "__initial" not in source


def test_every_transition_appears_in_the_table_and_the_diagrams() -> None:
    table = markdown_table()
    dot = diagrams.dot_graph().source
    for row in rows():
        assert f"| `{row.source}` | `{row.event}` |" in table
        assert f"{row.source} --> {row.target}: {row.event}" in mermaid()
        assert row.event in dot


def test_the_svg_renders_every_phase() -> None:
    svg = diagrams.render_svg(diagrams.dot_graph())
    for phase in ("idle", "connecting", "open", "degraded", "reconnecting", "failed", "fallback"):
        assert f">{phase}</text>" in svg


def test_write_then_check_is_clean_and_an_edit_is_reported_stale(tmp_path: Path) -> None:
    written = diagrams.write(tmp_path)
    assert {p.relative_to(tmp_path) for p in written} == {
        diagrams.OVERVIEW_DOT_PATH,
        diagrams.OVERVIEW_SVG_PATH,
        diagrams.DOT_PATH,
        diagrams.SVG_PATH,
        diagrams.MERMAID_PATH,
        diagrams.TABLE_PATH,
    }
    assert diagrams.check(tmp_path) == []
    table = tmp_path / diagrams.TABLE_PATH
    table.write_text(table.read_text().replace("`connect`", "`konnect`", 1))
    [stale] = diagrams.check(tmp_path)
    assert stale.path == diagrams.TABLE_PATH
    assert "-| 1 | `idle` | `konnect`" in stale.diff


def test_a_missing_file_is_reported_stale(tmp_path: Path) -> None:
    diagrams.write(tmp_path)
    (tmp_path / diagrams.MERMAID_PATH).unlink()
    assert [s.path for s in diagrams.check(tmp_path)] == [diagrams.MERMAID_PATH]


def test_a_missing_dot_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("dot") is None
    with pytest.raises(diagrams.DiagramError, match="apt-get install graphviz"):
        diagrams.render_svg(diagrams.dot_graph())


def _svg_width_pt(svg: str) -> float:
    match = re.search(r'<svg width="([\d.]+)pt"', svg)
    assert match is not None
    return float(match.group(1))


def test_the_overview_has_every_phase_one_edge_per_pair_and_fits_a_readme() -> None:
    graph = diagrams.overview_graph()
    source = graph.source
    # No guards: the detailed diagram and the table have them.
    for guard in ("has_attempts_left", "is_retryable", "is_graceful"):
        assert guard not in source
        assert guard in diagrams.dot_graph().source
    for edge in overview_edges():
        tail = diagrams.ANY_PHASE if edge.source is None else str(edge.source)
        assert source.count(f"\t{_dot_id(tail)} -> {edge.target} [") == 1
    svg = diagrams.render_svg(graph)
    for phase in ("idle", "connecting", "open", "degraded", "reconnecting", "failed", "fallback"):
        assert f">{phase}</text>" in svg
    assert ">any phase</text>" in svg
    # README columns are about 700 pt wide: the overview shrinks a little, the detailed
    # diagram (every guard on its own line) more than twice as much.
    detailed = diagrams.render_svg(diagrams.dot_graph())
    assert _svg_width_pt(svg) < 1000 < 2 * 1000 < _svg_width_pt(detailed)


def _dot_id(name: str) -> str:
    return f'"{name}"' if " " in name else name


def test_the_readme_shows_the_overview_and_links_the_detailed_diagram() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"]({diagrams.OVERVIEW_SVG_PATH})" in readme
    assert f"]({diagrams.SVG_PATH})" in readme
