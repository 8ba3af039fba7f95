"""A neutral view of the lifecycle declaration, and its text renderings.

``rows()`` reads ``Lifecycle`` by introspection (states, each state's transitions, their guards and
declared effects). The Mermaid diagram and the Markdown transition table are rendered from those
rows here; the DOT/SVG renderer in ``steadysocket.runtime.diagrams`` reads the same rows. All
output is deterministic, so a freshness check can compare bytes.

``overview_edges()`` is the same rows reduced for a picture that stays readable at README width:
one edge per pair of phases naming its events (guards left out), an event that leads to one phase
from every phase drawn once from "any phase", and transitions that stay in their phase left out.
The detailed diagram and the table keep everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from steadysocket.model.effects import EFFECT_TYPES, CancelTimer, Effect, describe
from steadysocket.model.lifecycle import Lifecycle, declared_effects
from steadysocket.model.snapshot import Phase

GENERATED_NOTICE = (
    "Generated from steadysocket.model.lifecycle by `steadysocket diagrams`; do not edit."
)


@dataclass(frozen=True, slots=True)
class Row:
    """One declared transition."""

    source: Phase
    event: str
    guard: str
    target: Phase
    effects: tuple[Effect, ...]
    order: int
    """Position among the source's transitions for this event: guards are tried in order."""

    @property
    def internal(self) -> bool:
        """A self-transition that leaves the phase as it is."""
        return self.source is self.target

    @property
    def effects_text(self) -> str:
        """The effects as a comma-separated phrase; a run of cancels reads as one."""
        parts: list[str] = []
        cancelled: list[str] = []
        for effect in (*self.effects, None):
            if isinstance(effect, CancelTimer):
                cancelled.append(str(effect.timer))
                continue
            if cancelled:
                plural = "s" if len(cancelled) > 1 else ""
                parts.append(f"cancel {'/'.join(cancelled)} timer{plural}")
                cancelled = []
            if effect is not None:
                parts.append(describe(effect))
        return ", ".join(parts) or "-"

    @property
    def id(self) -> str:
        """A stable identifier, used as a pytest id."""
        guard = f"[{self.guard}]" if self.guard else ""
        return f"{self.source}-{self.event}{guard}-{self.target}"


def _guard_text(transition: object) -> str:
    parts = []
    for spec in getattr(transition, "cond", ()):
        name = str(spec.attr_name)
        parts.append(name if spec.expected_value else f"not {name}")
    return " and ".join(parts)


def rows(machine: type[Lifecycle] = Lifecycle) -> list[Row]:
    """Every declared transition, in declaration order of states and then of events."""
    result: list[Row] = []
    for state in machine.states:
        seen: dict[str, int] = {}
        for transition in state.transitions:
            effects: tuple[Effect, ...] = ()
            for spec in transition.on:
                declared = declared_effects(spec.func)
                if declared is not None:
                    effects = declared
            for event in transition.events:
                name = str(event)
                order = seen.get(name, 0)
                seen[name] = order + 1
                result.append(
                    Row(
                        source=Phase(state.value),
                        event=name,
                        guard=_guard_text(transition),
                        target=Phase(transition.target.value),
                        effects=effects,
                        order=order,
                    )
                )
    return result


@dataclass(frozen=True, slots=True)
class OverviewEdge:
    """One edge of the overview: every event that leads from ``source`` to ``target``.

    ``source`` is ``None`` for an event that leads to ``target`` from every phase.
    """

    source: Phase | None
    target: Phase
    events: tuple[str, ...]


def overview_edges(machine: type[Lifecycle] = Lifecycle) -> list[OverviewEdge]:
    """The declaration's transitions merged for the overview, in declaration order."""
    declared = rows(machine)
    phases = {Phase(state.value) for state in machine.states}
    sources: dict[tuple[str, Phase], set[Phase]] = {}
    for row in declared:
        sources.setdefault((row.event, row.target), set()).add(row.source)
    merged: dict[tuple[Phase | None, Phase], list[str]] = {}
    for row in declared:
        if sources[(row.event, row.target)] == phases:
            key: tuple[Phase | None, Phase] = (None, row.target)
        elif row.internal:
            continue
        else:
            key = (row.source, row.target)
        events = merged.setdefault(key, [])
        if row.event not in events:
            events.append(row.event)
    return [
        OverviewEdge(source, target, tuple(events)) for (source, target), events in merged.items()
    ]


def mermaid(machine: type[Lifecycle] = Lifecycle) -> str:
    """The lifecycle as a Mermaid state diagram."""
    lines = ["%% " + GENERATED_NOTICE, "stateDiagram-v2"]
    lines.append(f"    [*] --> {Phase.IDLE}")
    for row in rows(machine):
        label = row.event + (f" [{row.guard}]" if row.guard else "")
        lines.append(f"    {row.source} --> {row.target}: {label}")
    return "\n".join(lines) + "\n"


def markdown_table(machine: type[Lifecycle] = Lifecycle) -> str:
    """The transition table for the docs: source, event, guard, target and effects."""
    out = [
        "# Lifecycle transition table",
        "",
        f"<!-- {GENERATED_NOTICE} -->",
        "",
        "Guards are tried in the order listed; the first that holds picks the transition. An",
        "event a phase does not list raises `TransitionNotAllowed`. The effects column is what",
        "the runtime carries out, in order (see `steadysocket.model.effects`).",
        "",
        "| # | source | event | guard | target | effects |",
        "|---|---|---|---|---|---|",
    ]
    for number, row in enumerate(rows(machine), start=1):
        guard = f"`{row.guard}`" if row.guard else ""
        out.append(
            f"| {number} | `{row.source}` | `{row.event}` | {guard} | `{row.target}` "
            f"| {row.effects_text} |"
        )
    out += [
        "",
        "## What the runtime does for each effect",
        "",
        "`steadysocket.runtime.manager.WebSocketManager` carries out each effect as follows",
        "(from the effect types' own documentation in `steadysocket.model.effects`):",
        "",
        "| effect | the runtime |",
        "|---|---|",
    ]
    for effect_type in EFFECT_TYPES:
        doc = " ".join((effect_type.__doc__ or "").split())
        out.append(f"| `{effect_type.__name__}` | {doc} |")
    return "\n".join(out) + "\n"
