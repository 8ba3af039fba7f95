"""The mutator behind ``tox -e mutation``: which mutants it makes, how it picks and runs tests,
how it scores, and that the reviewed list of equivalent mutants stays true."""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mutation.mutants import MODEL_DIR, Mutant, compile_mutant, generate, mutated_tree
from tests.mutation.run import (
    EXCLUDED,
    IMPORT_CONTEXT,
    Equivalent,
    Outcome,
    _MutantImporter,
    default_modules,
    excluded,
    load_equivalents,
    report,
    select_tests,
)

SAMPLE = textwrap.dedent(
    '''
    """A module docstring is never mutated."""
    import logging

    _logger = logging.getLogger(__name__)
    LIMIT = 3
    CODES = frozenset({1000, 1001})


    def check(attempts: int, flag: bool) -> bool:
        """Neither is a function docstring."""
        _logger.info("attempt %d of %d", attempts, LIMIT)
        assert attempts >= 0
        if flag:
            return attempts < LIMIT and True
        return not flag
    '''
)


def _ids(source: str) -> list[str]:
    return [m.id for m in generate("sample", source)]


def test_the_mutants_of_a_sample_cover_each_operator_and_skip_what_no_decision_reads() -> None:
    ids = _ids(SAMPLE)
    assert "sample:check:compare: attempts < LIMIT -> attempts <= LIMIT" in ids
    assert "sample:check:compare: attempts < LIMIT -> attempts > LIMIT" in ids
    assert "sample:check:boolop: attempts < LIMIT and True -> attempts < LIMIT or True" in ids
    assert "sample:check:bool: True -> False" in ids
    assert "sample:check:not: not flag -> flag" in ids
    assert "sample:check:negate: flag -> not (flag)" in ids
    assert "sample:<module>:number: 3 -> 4" in ids
    assert "sample:<module>:drop-element: {1000, 1001} -> without 1000" in ids
    # The log call, the assert and the docstrings are left alone.
    assert not any("attempt %d" in i or ">= 0" in i or "docstring" in i for i in ids)
    assert not any(":delete: _logger.info" in i for i in ids)


def test_repeated_changes_in_one_scope_get_numbered_ids() -> None:
    source = "def f(a: int) -> int:\n    return (a + 1) + (a + 1)\n"
    ids = _ids(source)
    assert "sample:f:number: 1 -> 2" in ids
    assert "sample:f:number: 1 -> 2 #2" in ids
    assert len(ids) == len(set(ids))


def test_a_transition_declaration_gets_deletions_and_guard_changes() -> None:
    source = textwrap.dedent(
        """
        class Machine:
            go = a.to(b, cond="ready") | a.to(c)
            on = emits(first(), second())
        """
    )
    ids = _ids(source)
    assert "sample:Machine:drop-operand: a.to(c) -> deleted" in ids
    assert "sample:Machine:drop-operand: a.to(b, cond='ready') -> deleted" in ids
    assert "sample:Machine:guard: cond='ready' -> unless='ready'" in ids
    assert "sample:Machine:guard: cond='ready' -> no guard" in ids
    assert "sample:Machine:drop-element: emits(first(), second()) -> without first()" in ids


def test_an_enum_member_becomes_the_next_one() -> None:
    ids = _ids("def f(t):\n    return t is Timer.RETRY\n")
    assert "sample:f:enum: Timer.RETRY -> Timer.HEARTBEAT" in ids


def test_a_mutant_keeps_the_line_numbers_of_its_file() -> None:
    [mutant] = [m for m in generate("sample", SAMPLE) if m.after == "attempts <= LIMIT"]
    tree = mutated_tree(mutant, SAMPLE)
    [compare] = [
        n for n in ast.walk(tree) if isinstance(n, ast.Compare) and n.lineno == mutant.line
    ]
    assert isinstance(compare.ops[0], ast.LtE)
    assert (
        compare.lineno
        == mutant.line
        == SAMPLE.splitlines().index("        return attempts < LIMIT and True") + 1
    )


def test_a_changed_source_is_refused_rather_than_mutated_elsewhere() -> None:
    [mutant] = [m for m in generate("sample", SAMPLE) if m.after == "attempts <= LIMIT"]
    with pytest.raises(AssertionError, match="source changed"):
        mutated_tree(mutant, SAMPLE.replace("attempts < LIMIT", "attempts == LIMIT"))


@pytest.fixture
def scratch_module() -> Iterator[str]:
    name = "steadysocket_mutation_scratch"
    yield name
    sys.modules.pop(name, None)


def test_the_importer_loads_the_mutated_code_under_the_module_name(scratch_module: str) -> None:
    [mutant] = [
        m for m in generate("classify") if m.id.endswith(":bool: False -> True #2")
    ] or pytest.fail("no such mutant of classify")
    importer = _MutantImporter(scratch_module, compile_mutant(mutant), mutant.path)
    sys.meta_path.insert(0, importer)
    try:
        spec = importlib.util.find_spec(scratch_module)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[scratch_module] = module
        assert spec.loader is not None
        spec.loader.exec_module(module)
    finally:
        sys.meta_path.remove(importer)
    assert module.__file__ == str(MODEL_DIR / "classify.py")
    assert hasattr(module, "classify")


def test_every_module_of_model_is_mutated_unless_excluded_with_a_reason() -> None:
    stems = {p.stem for p in MODEL_DIR.glob("*.py")}
    assert set(default_modules()) == {s for s in stems if excluded(s) is None}
    assert {"lifecycle", "client", "backoff", "classify"} <= set(default_modules())
    assert excluded("delivery") is None
    assert excluded("delivery_explore") is not None
    assert all(len(reason.split()) >= 2 for reason in EXCLUDED.values())


def test_every_reviewed_equivalent_mutant_exists_and_has_a_reason() -> None:
    generated = {m.id for module in default_modules() for m in generate(module)}
    for equivalent in load_equivalents():
        assert equivalent.id in generated, f"stale entry in equivalent.toml: {equivalent.id}"
        assert len(equivalent.reason.split()) >= 4


def test_an_equivalent_without_a_reason_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "equivalent.toml"
    path.write_text('[[equivalent]]\nid = "x:y:z: a -> b"\nreason = ""\n', "utf-8")
    with pytest.raises(ValueError, match="has no reason"):
        load_equivalents(path)


def _mutant(line: int, module: str = "client") -> Mutant:
    return Mutant(f"{module}:f:number: {line}", module, line, "number", "1", "2", 0, 0)


def test_tests_are_selected_by_line_own_file_first_and_fastest_first() -> None:
    durations = {
        "tests/model/test_client.py::slow": 2.0,
        "tests/model/test_client.py::fast": 0.1,
        "tests/model/test_client.py::frozen": 0.2,
        "tests/model/test_explore.py::other": 0.01,
    }
    lines = {
        "client": {
            10: set(durations) - {"tests/model/test_client.py::frozen"},
            11: {IMPORT_CONTEXT},
            12: {"tests/model/test_explore.py::other"},
        }
    }
    assert select_tests(_mutant(10), durations, lines) == [
        ["tests/model/test_client.py::fast", "tests/model/test_client.py::slow"],
        ["tests/model/test_explore.py::other"],
    ]
    # A line run only at import selects every test that runs the module, and its own test
    # file whole (a test of a frozen dataclass runs no line of the module).
    assert select_tests(_mutant(11), durations, lines) == [
        [
            "tests/model/test_client.py::fast",
            "tests/model/test_client.py::frozen",
            "tests/model/test_client.py::slow",
        ],
        ["tests/model/test_explore.py::other"],
    ]
    assert select_tests(_mutant(12), durations, lines) == [["tests/model/test_explore.py::other"]]
    assert select_tests(_mutant(13), durations, lines) == []


def test_the_score_counts_equivalents_out_and_fails_below_the_minimum(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes = [Outcome(_mutant(n), "killed") for n in range(19)]
    outcomes.append(Outcome(_mutant(100), "survived"))
    outcomes.append(Outcome(_mutant(101), "survived"))
    equivalents = [Equivalent(_mutant(101).id, "the same behaviour either way")]

    assert report(outcomes, equivalents, 95.0) == 0
    out = capsys.readouterr().out
    assert "score: 19/20 non-equivalent mutants killed = 95.0 %" in out
    assert "reason: the same behaviour either way" in out
    assert report(outcomes, [], 95.0) == 1
    out = capsys.readouterr().out
    assert "score: 19/21 non-equivalent mutants killed = 90.5 %" in out
    assert "FAILED: score 90.5 % is below 95 %" in out
    assert "model/client.py:100 [number] 1 -> 2" in out


def test_a_listed_equivalent_that_gets_killed_fails_the_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outcomes = [Outcome(_mutant(n), "killed") for n in range(5)]
    equivalents = [Equivalent(_mutant(1).id, "thought to be the same behaviour")]
    assert report(outcomes, equivalents, 0.0) == 1
    assert "listed as equivalent in equivalent.toml, but killed" in capsys.readouterr().out
