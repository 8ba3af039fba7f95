"""4. The lifecycle: transitions, the model check, and stateful test steps.

Everything runs in one child process on one core; no sockets except the loopback stateful run.

- **One transition**, three ways, median of several runs of many cycles each:
  python-statemachine alone (a two-state ``StateMachine``, ``send("go")``/``send("back")``);
  ``Lifecycle.send`` + ``drain()`` (open ⇄ degraded: ``heartbeat_overdue`` and
  ``traffic_resumed``, whose effects resolve timers); and ``ClientCore`` (``connect()`` and
  ``disconnect()`` from idle: the event filter, the effects and their tokens, the attempt
  record and the log lines). Construction of each is timed too.
- **The model check**: ``steadysocket.model.explore.check()`` (every default configuration),
  its time and its state and edge counts.
- **Stateful test steps per second**: ``tests/runtime/test_manager_stateful.py``'s machine
  (a real ``WebSocketManager`` on the virtual clock against the in-memory server, every step
  compared with the model), run by hypothesis with a fixed seed; the same machine over real
  loopback sockets is the baseline.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing.connection
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from statemachine import State, StateMachine

from bench.common import CLIENT_CPU, Child, Row, Section, Sizes, fmt, median, ratio, spread
from steadysocket.model.client import ClientConfig, ClientCore
from steadysocket.model.explore import check
from steadysocket.model.lifecycle import Lifecycle
from steadysocket.model.snapshot import Phase


class Toggle(StateMachine):
    """The trivial machine: python-statemachine's own cost per transition."""

    a = State(initial=True)
    b = State()
    go = a.to(b)
    back = b.to(a)


class FakeClock:
    """A clock that does not move."""

    def __init__(self) -> None:
        self.wall = datetime(2025, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return 1000.0

    def now(self) -> datetime:
        return self.wall + timedelta(0)


def _per_call(fn: Callable[[int], None], cycles: int, per_cycle: int, repeats: int) -> list[float]:
    """Microseconds per operation, one figure per repeat."""
    fn(min(cycles, 200))  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(cycles)
        out.append((time.perf_counter() - start) / (cycles * per_cycle) * 1e6)
    return out


def _toggle(cycles: int) -> None:
    machine = Toggle()
    send = machine.send
    for _ in range(cycles):
        send("go")
        send("back")


def _lifecycle(cycles: int) -> None:
    machine = Lifecycle(start_phase=Phase.OPEN, heartbeat_interval_ms=1000.0)
    send, drain = machine.send, machine.drain
    for _ in range(cycles):
        send("heartbeat_overdue")
        drain()
        send("traffic_resumed")
        drain()


def _core(cycles: int) -> None:
    core = ClientCore(ClientConfig("ws://127.0.0.1:9", "bench"), FakeClock())
    for _ in range(cycles):
        core.connect()
        core.disconnect()


def _construct(make: Callable[[], object]) -> Callable[[int], None]:
    def run(cycles: int) -> None:
        for _ in range(cycles):
            make()

    return run


def _stateful(loopback: bool, examples: int, steps: int) -> dict[str, float]:
    from hypothesis import HealthCheck, settings
    from hypothesis import Phase as HPhase
    from hypothesis.stateful import invariant, run_state_machine_as_test

    # The test module is imported by name: it lives in the repository's tests/ (a namespace
    # package rooted at the working directory), and its types are the test suite's business.
    tests = importlib.import_module("tests.runtime.test_manager_stateful")
    counts = {"steps": 0, "runs": 0}
    base: Any = tests.LoopbackManagerMachine if loopback else tests.ManagerMachine

    class Counted(base):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            counts["runs"] += 1

        @invariant()
        def count_steps(self) -> None:
            counts["steps"] += 1

    start = time.perf_counter()
    run_state_machine_as_test(
        Counted,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[HPhase.generate],
            suppress_health_check=list(HealthCheck),
        ),
    )
    elapsed = time.perf_counter() - start
    # Invariants run once after the initial rule and once after every step.
    steps_run = counts["steps"] - counts["runs"]
    return {"steps": steps_run, "runs": counts["runs"], "seconds": elapsed}


def _child(conn: multiprocessing.connection.Connection, quick: bool) -> None:
    cycles = 2_000 if quick else 10_000
    repeats = 3 if quick else 5
    result: dict[str, Any] = {
        "toggle": _per_call(_toggle, cycles, 2, repeats),
        "lifecycle": _per_call(_lifecycle, cycles, 2, repeats),
        "core": _per_call(_core, cycles // 2, 2, repeats),
        "new_toggle": _per_call(_construct(Toggle), cycles // 10, 1, repeats),
        "new_lifecycle": _per_call(_construct(Lifecycle), cycles // 10, 1, repeats),
        "new_core": _per_call(
            _construct(lambda: ClientCore(ClientConfig("ws://127.0.0.1:9", "b"), FakeClock())),
            cycles // 10,
            1,
            repeats,
        ),
    }
    check_runs = []
    reports = []
    for _ in range(1 if quick else 3):
        gc.collect()
        start = time.perf_counter()
        reports = check()
        check_runs.append(time.perf_counter() - start)
    result["check_s"] = check_runs
    result["check"] = [(str(r.config), r.states, r.edges, len(r.violations)) for r in reports]
    result["stateful"] = _stateful(False, 10 if quick else 60, 50)
    result["stateful_loopback"] = _stateful(True, 2 if quick else 5, 20)
    conn.send(result)


def run(sizes: Sizes) -> Section:
    """Run benchmark 4 and report it."""
    section = Section(
        "lifecycle",
        "4. Lifecycle",
        "One child process on one core. Transition costs are the median of several runs of "
        "many cycles (µs per transition); the stateful runs use hypothesis with a fixed seed "
        "(`derandomize=True`), so every run draws the same steps.",
    )
    started = time.monotonic()
    with Child(_child, sizes.quick, cpu=CLIENT_CPU, name="lifecycle") as child:
        r = child.receive(sizes.pick(900, 300))
    toggle, lifecycle, core = median(r["toggle"]), median(r["lifecycle"]), median(r["core"])
    section.rows = [
        Row(
            "one transition: Lifecycle.send + drain (open ⇄ degraded)",
            f"{fmt(lifecycle, 1)} µs (runs {spread(r['lifecycle'], 1)})",
            f"{fmt(toggle, 1)} µs: python-statemachine alone (runs {spread(r['toggle'], 1)})",
            ratio(lifecycle, toggle),
        ),
        Row(
            "one transition through ClientCore (connect / disconnect from idle)",
            f"{fmt(core, 1)} µs (runs {spread(r['core'], 1)})",
            f"{fmt(toggle, 1)} µs: python-statemachine alone",
            ratio(core, toggle),
        ),
        Row(
            "construct: Lifecycle / ClientCore",
            f"{fmt(median(r['new_lifecycle']), 0)} µs / {fmt(median(r['new_core']), 0)} µs",
            f"{fmt(median(r['new_toggle']), 0)} µs: trivial StateMachine",
            ratio(median(r["new_lifecycle"]), median(r["new_toggle"])),
        ),
    ]
    check_s = median(r["check_s"])
    states = sum(c[1] for c in r["check"])
    edges = sum(c[2] for c in r["check"])
    section.rows.append(
        Row(
            "model check: check(), every default configuration",
            f"{check_s:.2f} s for {states:,} states and {edges:,} edges "
            f"({states / check_s:,.0f} states/s; runs {spread(r['check_s'], 2)})",
        )
    )
    for config, n_states, n_edges, violations in r["check"]:
        section.rows.append(
            Row(
                f"  {config}",
                f"{n_states:,} states, {n_edges:,} edges, {violations} violations",
            )
        )
    virtual, loop = r["stateful"], r["stateful_loopback"]
    v_rate = virtual["steps"] / virtual["seconds"]
    l_rate = loop["steps"] / loop["seconds"]
    section.rows.append(
        Row(
            "stateful test steps per second (virtual clock, in-memory server)",
            f"{fmt(v_rate)} steps/s ({virtual['steps']:,} steps in {virtual['runs']} runs, "
            f"{virtual['seconds']:.1f} s)",
            f"{fmt(l_rate)} steps/s over real loopback sockets ({loop['steps']:,} steps in "
            f"{loop['runs']} runs, {loop['seconds']:.1f} s)",
            ratio(v_rate, l_rate),
        )
    )
    section.seconds = time.monotonic() - started
    return section
