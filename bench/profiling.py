"""cProfile, boiled down to a small table for BENCHMARKS.md.

Profiles are taken in separate passes, never during a timed run: cProfile slows Python code
several times over, so its figures say *where* the time goes, not how much there is.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import re
from dataclasses import dataclass

_IDLE = "'poll' of 'select.epoll'"
_STDLIB = re.compile(r"/lib/python3\.\d+/")


@dataclass(frozen=True)
class ProfileLine:
    """One function of a profile."""

    function: str
    calls: int
    own_s: float
    cumulative_s: float
    own_share: float
    """Share of the whole profile's own time, 0..1."""


def _short(filename: str, line: int, name: str) -> str:
    if filename == "~":
        return name  # a builtin, such as <method 'send' of '_socket.socket' objects>
    path = filename.replace(os.sep, "/")
    for marker in ("/steadysocket/", "/bench/", "/site-packages/", "/model/", "/runtime/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            prefix = marker.strip("/")
            if prefix in {"model", "runtime"}:
                path = f"{prefix}/{path}"
            break
    else:
        stdlib = _STDLIB.search(path)
        if stdlib is not None:
            path = path[stdlib.end() :]
    return f"{path}:{line}({name})"


@dataclass(frozen=True)
class Profile:
    """A profile boiled down: the busiest functions, and steadysocket's own by cumulative time."""

    total_s: float
    busiest: list[ProfileLine]
    ours: list[ProfileLine]


def top(profile: cProfile.Profile, limit: int = 14, ours: int = 10) -> Profile:
    """The ``limit`` functions with the most own time, and steadysocket's ``ours`` functions
    (``model/``, ``runtime/``) with the most cumulative time.

    Time spent waiting in ``epoll`` is idle time, not work: it is left out of the total and of
    the tables. Garbage collection has no entry of its own: cProfile charges it to whichever
    function allocated when a collection started.
    """
    stats = pstats.Stats(profile)
    raw = stats.stats  # type: ignore[attr-defined]
    entries = []
    total = 0.0
    for (filename, line, name), (_cc, calls, own, cumulative, _callers) in raw.items():
        if _IDLE in name:
            continue
        total += own
        entries.append((own, cumulative, calls, _short(filename, line, name)))

    def line_of(own: float, cumulative: float, calls: int, function: str) -> ProfileLine:
        return ProfileLine(function, calls, own, cumulative, own / total if total else 0.0)

    entries.sort(reverse=True)
    mine = [e for e in entries if e[3].startswith(("model/", "runtime/"))]
    mine.sort(key=lambda e: e[1], reverse=True)
    return Profile(
        total,
        [line_of(*e) for e in entries[:limit]],
        [line_of(*e) for e in mine[:ours]],
    )


def render(title: str, profile: Profile, per: int | None = None) -> str:
    """Markdown tables; ``per`` divides the times into microseconds per operation."""
    head = f"**{title}** (cProfile; busy time {profile.total_s:.2f} s, waiting in epoll left out"
    head += f", {per:,} operations)" if per else ")"
    out = [head, "", *_table(profile.busiest, per)]
    if profile.ours:
        out += ["", "steadysocket's own functions, by cumulative time:", ""]
        out += _table(profile.ours, per)
    return "\n".join(out)


def _table(lines: list[ProfileLine], per: int | None) -> list[str]:
    if per:
        out = ["| function | calls | own s | own % | own µs/op | cumulative µs/op |"]
    else:
        out = ["| function | calls | own s | own % | cumulative s |"]
    out.append("|" + "---|" * (out[-1].count("|") - 1))
    for p in lines:
        function = p.function.replace("|", "\\|")
        if per:
            out.append(
                f"| `{function}` | {p.calls:,} | {p.own_s:.3f} | {p.own_share:.1%} | "
                f"{p.own_s / per * 1e6:.2f} | {p.cumulative_s / per * 1e6:.2f} |"
            )
        else:
            out.append(
                f"| `{function}` | {p.calls:,} | {p.own_s:.3f} | {p.own_share:.1%} | "
                f"{p.cumulative_s:.3f} |"
            )
    return out
