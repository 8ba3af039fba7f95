"""Mutation testing of ``model/`` against ``tests/model``: ``python -m tests.mutation``.

Every module in ``model/`` is mutated unless ``EXCLUDED`` names it with a reason, so a new
model (such as a delivery model) is picked up without configuration. For each mutant:

1. a first run of ``tests/model`` under coverage, with one coverage context per test, tells
   which tests execute the mutated line (lines run only at import, such as the lifecycle
   declaration, select every test that executes the module);
2. a child process forked from this one (pytest and hypothesis already imported, nothing of
   ``steadysocket`` yet) imports the mutated module from the AST through an import hook, and
   runs the selected tests, fastest first, stopping at the first failure. Nothing is written to
   ``model/``, so a run never disturbs the working tree;
3. a failure, an import error or a timeout kills the mutant; passing tests let it survive.

The score is killed / (mutants - reviewed equivalents). ``equivalent.toml`` lists the
equivalent mutants, each with its reason; a listed mutant that gets killed, or that no longer
exists, is reported so the list stays true. The run prints every survivor and exits 1 when the
score is below ``--min-score`` (95 %).
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType

import hypothesis
import pytest
import statemachine

from tests.mutation.mutants import MODEL_DIR, PACKAGE, ROOT, Mutant, compile_mutant, generate

TESTS = ROOT / "tests" / "model"
EQUIVALENT_FILE = Path(__file__).with_name("equivalent.toml")

EXCLUDED: dict[str, str] = {
    "__init__": "empty package marker",
    "explore": "the model checker is test machinery; its own check is rejecting the broken "
    "variants in tests/model/test_explore.py",
    "*_explore": "model checkers of other models, test machinery like explore",
    "graph": "renders the declaration; its output is compared byte for byte with the committed "
    "docs and diagrams (steadysocket diagrams --check)",
    "effects": "plain data types and describe(), rendering for the docs table",
    "snapshot": "frozen views and their JSON form, no decisions",
    "logs": "log-line de-duplication, no lifecycle decision",
    "protocol": "wire format shared with the server side; mutate it explicitly with "
    "--module protocol",
    "server_session": "the server's session (another owner's tests); mutate it explicitly with "
    "--module server_session",
}
"""Modules of ``model/`` left out by default (names or ``fnmatch`` patterns), with reasons."""

MIN_TIMEOUT_S = 30.0
IMPORT_CONTEXT = "import"


@dataclass(frozen=True, slots=True)
class Equivalent:
    """A reviewed equivalent mutant."""

    id: str
    reason: str


@dataclass(slots=True)
class Outcome:
    """What happened to one mutant."""

    mutant: Mutant
    status: str
    """killed, timeout, survived, not covered, or error (pytest could not run: exit 3 to 5)."""
    seconds: float = 0.0
    tests: int = 0


def excluded(module: str) -> str | None:
    """Why ``module`` is not mutated by default, or None."""
    for pattern, reason in EXCLUDED.items():
        if fnmatch.fnmatchcase(module, pattern):
            return reason
    return None


def default_modules() -> list[str]:
    """Every module of ``model/`` that ``EXCLUDED`` does not name: a new one is included."""
    return [p.stem for p in sorted(MODEL_DIR.glob("*.py")) if excluded(p.stem) is None]


def load_equivalents(path: Path = EQUIVALENT_FILE) -> list[Equivalent]:
    """The reviewed list; every entry needs an id and a non-empty reason."""
    data = tomllib.loads(path.read_text("utf-8"))
    entries = data.get("equivalent", [])
    result: list[Equivalent] = []
    for entry in entries:
        mutant_id, reason = str(entry["id"]), str(entry.get("reason", "")).strip()
        if not reason:
            raise ValueError(f"{path}: equivalent mutant {mutant_id!r} has no reason")
        result.append(Equivalent(mutant_id, reason))
    return result


# -- in the child -----------------------------------------------------------------------------


class _MutantImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports one module from a mutated code object instead of its file."""

    def __init__(self, name: str, code: CodeType, path: Path) -> None:
        self.name = name
        self.code = code
        self.path = path

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=str(self.path))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(self.code, module.__dict__)


class _Select:
    """Keeps the selected tests only, in the given order."""

    def __init__(self, nodeids: Sequence[str]) -> None:
        self.order = {nodeid: position for position, nodeid in enumerate(nodeids)}

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        kept = sorted(
            (i for i in items if i.nodeid in self.order), key=lambda i: self.order[i.nodeid]
        )
        dropped = [i for i in items if i.nodeid not in self.order]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept


class _Record:
    """Baseline run: one coverage context per test, and each test's duration."""

    def __init__(self, coverage: object) -> None:
        self.coverage = coverage
        self.durations: dict[str, float] = {}
        self.failed: list[str] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and report.nodeid not in self.failed:
            self.failed.append(report.nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> object:
        self.coverage.switch_context(item.nodeid)  # type: ignore[attr-defined]
        start = time.perf_counter()
        yield
        self.durations[item.nodeid] = time.perf_counter() - start
        self.coverage.switch_context(IMPORT_CONTEXT)  # type: ignore[attr-defined]


def _quiet(log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _pytest_args(files: Iterable[str]) -> list[str]:
    return [*sorted(set(files)), "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]


def _baseline_child(workdir: Path) -> int:
    import coverage

    _quiet(workdir / "baseline.log")
    cov = coverage.Coverage(
        data_file=str(workdir / "coverage"),
        source_pkgs=[PACKAGE],
    )
    cov.start()
    cov.switch_context(IMPORT_CONTEXT)
    recorder = _Record(cov)
    pytest.main(
        [str(TESTS), "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)], plugins=[recorder]
    )
    cov.stop()
    cov.save()
    durations = {k: v for k, v in recorder.durations.items() if k not in recorder.failed}
    result = {"durations": durations, "failed": recorder.failed}
    (workdir / "baseline.json").write_text(json.dumps(result), "utf-8")
    return 0


def _mutant_child(mutant: Mutant, code: CodeType, nodeids: Sequence[str], log: Path) -> int:
    _quiet(log)
    sys.meta_path.insert(0, _MutantImporter(mutant.qualified_module, code, mutant.path))
    files = {nodeid.split("::", 1)[0] for nodeid in nodeids}
    return int(pytest.main(_pytest_args(files), plugins=[_Select(nodeids)]))


def _fork(target: object, *args: object) -> int:
    sys.stdout.flush()  # or the child inherits, and prints again, what is still buffered
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's status is what the parent reads
        status = 3
        try:
            status = target(*args)  # type: ignore[operator]
        finally:
            os._exit(status)
    return pid


# -- in the parent ----------------------------------------------------------------------------


def _setup_hypothesis() -> None:
    hypothesis.settings.register_profile(
        "mutation",
        # Fewer examples than the ci profile (100): a survivor runs every selected test, and
        # derandomized examples keep each run reproducible.
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    os.environ["HYPOTHESIS_PROFILE"] = "mutation"


def run_baseline(workdir: Path) -> tuple[dict[str, float], dict[str, dict[int, set[str]]]]:
    """Run tests/model once; return each passing test's duration and, per model file, which
    tests executed each line (``IMPORT_CONTEXT`` for lines run while importing).

    A test that fails without any mutant (someone's work in progress in a shared tree) could
    kill nothing honestly: it is listed and left out, which can only lower the score.
    """
    import coverage

    pid = _fork(_baseline_child, workdir)
    _, status = os.waitpid(pid, 0)
    result_file = workdir / "baseline.json"
    if os.waitstatus_to_exitcode(status) != 0 or not result_file.exists():
        log = (workdir / "baseline.log").read_text("utf-8", "replace")
        raise SystemExit(f"tests/model could not run without any mutant:\n{log[-4000:]}")
    result = json.loads(result_file.read_text("utf-8"))
    durations: dict[str, float] = result["durations"]
    for nodeid in result["failed"]:
        print(f"  WARNING: fails without any mutant, left out: {nodeid}")
    data = coverage.CoverageData(basename=str(workdir / "coverage"))
    data.read()
    lines: dict[str, dict[int, set[str]]] = {}
    for measured in data.measured_files():
        by_line = data.contexts_by_lineno(measured)
        lines[Path(measured).stem] = {line: set(ctx) for line, ctx in by_line.items()}
    return durations, lines


def select_tests(
    mutant: Mutant, durations: dict[str, float], lines: dict[str, dict[int, set[str]]]
) -> list[list[str]]:
    """The tests that execute the mutant's line, in stages (none: not covered).

    The module's own test file (``test_client.py`` for ``client.py``) is the first stage: its
    tests are the likeliest to kill, and collecting one file is cheap. The other tests follow
    only if the mutant survived it. Within a stage, the fastest tests run first.
    """
    by_line = lines.get(mutant.module, {})
    contexts = by_line.get(mutant.line, set())
    tests = {c for c in contexts if c in durations}
    own = f"tests/model/test_{mutant.module}.py::"
    if IMPORT_CONTEXT in contexts or (contexts and not tests):
        # A declaration (a class body, a constant, a decorator): every test that runs the
        # module, and the whole of its own test file, whose tests may only touch what the
        # declaration generates (a dataclass's __init__, a union's members).
        tests = {c for ctx in by_line.values() for c in ctx if c in durations}
        tests |= {t for t in durations if t.startswith(own)}
    ordered = sorted(tests, key=lambda t: (durations[t], t))
    stages = [
        [t for t in ordered if t.startswith(own)],
        [t for t in ordered if not t.startswith(own)],
    ]
    return [stage for stage in stages if stage]


KILLED_CODES = frozenset({pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.INTERRUPTED})
"""A test failed, or collection failed because the mutated module does not import."""


@dataclass(slots=True)
class _Job:
    outcome: Outcome
    code: CodeType
    stages: list[list[str]]
    stage: int = 0
    started: float = 0.0
    budget: float = 0.0


def run_mutants(
    mutants: Sequence[tuple[Mutant, CodeType]],
    durations: dict[str, float],
    lines: dict[str, dict[int, set[str]]],
    workdir: Path,
    jobs: int,
) -> list[Outcome]:
    """Run every mutant in up to ``jobs`` children at a time, stage after stage."""
    pending: list[_Job] = []
    done: list[Outcome] = []
    for mutant, code in mutants:
        stages = select_tests(mutant, durations, lines)
        if stages:
            pending.append(_Job(Outcome(mutant, ""), code, stages))
        else:
            done.append(Outcome(mutant, "not covered"))
    running: dict[int, _Job] = {}
    total = len(mutants)
    forks = 0
    while pending or running:
        while pending and len(running) < jobs:
            job = pending.pop(0)
            tests = job.stages[job.stage]
            job.budget = max(MIN_TIMEOUT_S, 10.0 + 5.0 * sum(durations[t] for t in tests))
            job.started = time.monotonic()
            job.outcome.tests += len(tests)
            forks += 1
            log = workdir / f"mutant-{forks}.log"
            running[_fork(_mutant_child, job.outcome.mutant, job.code, tests, log)] = job
        finished = False
        for pid, job in list(running.items()):
            waited, status = os.waitpid(pid, os.WNOHANG)
            elapsed = time.monotonic() - job.started
            if waited == 0 and elapsed <= job.budget:
                continue
            del running[pid]
            finished = True
            job.outcome.seconds += elapsed
            if waited == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                job.outcome.status = "timeout"
            else:
                exit_code = os.waitstatus_to_exitcode(status)
                if exit_code == 0 and job.stage + 1 < len(job.stages):
                    job.stage += 1
                    pending.insert(0, job)
                    continue
                job.outcome.status = (
                    "survived"
                    if exit_code == 0
                    else "killed"
                    if exit_code in KILLED_CODES
                    else f"error (exit {exit_code})"
                )
            done.append(job.outcome)
            if len(done) % 25 == 0 or len(done) == total:
                survivors = sum(o.status not in {"killed", "timeout"} for o in done)
                print(f"  {len(done)}/{total} mutants run, {survivors} survived", flush=True)
        if not finished:
            time.sleep(0.02)
    return done


def report(outcomes: list[Outcome], equivalents: list[Equivalent], min_score: float) -> int:
    """Print the score, every survivor and the equivalent list's state; the exit status."""
    reviewed = {e.id: e for e in equivalents}
    by_id = {o.mutant.id: o for o in outcomes}
    survivors = [
        o for o in outcomes if o.status not in {"killed", "timeout"} and o.mutant.id not in reviewed
    ]
    equivalent_killed = [
        o for o in outcomes if o.mutant.id in reviewed and o.status in {"killed", "timeout"}
    ]
    equivalent_survived = [
        o for o in outcomes if o.mutant.id in reviewed and o not in equivalent_killed
    ]
    killed = sum(o.status in {"killed", "timeout"} for o in outcomes)
    considered = len(outcomes) - len(equivalent_survived)
    score = 100.0 * killed / considered if considered else 100.0

    print()
    print("mutation testing of model/ against tests/model")
    modules = Counter(o.mutant.module for o in outcomes)
    for module, count in sorted(modules.items()):
        module_killed = sum(
            o.status in {"killed", "timeout"} for o in outcomes if o.mutant.module == module
        )
        print(f"  {module}: {count} mutants, {module_killed} killed")
    timeouts = sum(o.status == "timeout" for o in outcomes)
    print(
        f"  {len(outcomes)} mutants, {len(equivalent_survived)} reviewed as equivalent, "
        f"{killed} killed ({timeouts} by timeout), {len(survivors)} survived"
    )
    print(f"  score: {killed}/{considered} non-equivalent mutants killed = {score:.1f} %")
    if survivors:
        print(f"\nsurvivors ({len(survivors)}):")
        for outcome in sorted(survivors, key=lambda o: (o.mutant.module, o.mutant.line)):
            note = "" if outcome.status == "survived" else f" ({outcome.status})"
            print(f"  {outcome.mutant}{note}\n    id: {outcome.mutant.id}")
    if equivalent_survived:
        print(f"\nreviewed equivalent mutants ({len(equivalent_survived)}):")
        for outcome in sorted(equivalent_survived, key=lambda o: (o.mutant.module, o.mutant.line)):
            print(f"  {outcome.mutant}\n    reason: {reviewed[outcome.mutant.id].reason}")
    failed = False
    if equivalent_killed:
        failed = True
        print("\nlisted as equivalent in equivalent.toml, but killed (remove them):")
        for outcome in equivalent_killed:
            print(f"  {outcome.mutant.id}")
    stale = [e.id for e in equivalents if e.id not in by_id]
    if stale:
        print("\nlisted in equivalent.toml but not generated in this run (stale or not selected):")
        for mutant_id in stale:
            print(f"  {mutant_id}")
    if score < min_score:
        failed = True
        print(f"\nFAILED: score {score:.1f} % is below {min_score:g} %")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__)
    parser.add_argument(
        "--module",
        action="append",
        help="mutate this module of model/ (repeatable); default: every module not excluded",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--min-score", type=float, default=95.0)
    parser.add_argument("--match", help="run only mutants whose id contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)

    modules = args.module or default_modules()
    print("modules mutated: " + ", ".join(modules))
    for path in sorted(MODEL_DIR.glob("*.py")):
        reason = excluded(path.stem)
        if path.stem not in modules and reason is not None:
            print(f"  not mutated: {path.stem} ({reason})")
    # One snapshot of each source: the mutants are compiled from it before anything runs.
    sources = {module: (MODEL_DIR / f"{module}.py").read_text("utf-8") for module in modules}
    mutants = [m for module in modules for m in generate(module, sources[module])]
    if args.match:
        mutants = [m for m in mutants if args.match in m.id]
    if args.list:
        for mutant in mutants:
            print(f"{mutant}\n    id: {mutant.id}")
        return 0
    equivalents = load_equivalents()
    _setup_hypothesis()
    # Imported here so the children start with them loaded; steadysocket itself is not.
    assert statemachine is not None
    assert not any(name.startswith(PACKAGE) for name in sys.modules), "model imported too early"
    with tempfile.TemporaryDirectory(prefix="steadysocket-mutation-") as tmp:
        workdir = Path(tmp)
        started = time.monotonic()
        print(
            f"baseline: tests/model under coverage, one context per test ({len(mutants)} mutants)"
        )
        durations, lines = run_baseline(workdir)
        print(f"  {len(durations)} tests in {time.monotonic() - started:.0f} s")
        compiled = [(m, compile_mutant(m, sources[m.module])) for m in mutants]
        outcomes = run_mutants(compiled, durations, lines, workdir, max(1, args.jobs))
        print(f"  done in {time.monotonic() - started:.0f} s")
    return report(outcomes, equivalents, args.min_score)
