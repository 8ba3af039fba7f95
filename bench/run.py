"""Run the benchmarks and write BENCHMARKS.md.

Usage (from the repository root)::

    python -m bench                  # the full suite; writes BENCHMARKS.md (about 20 minutes)
    python -m bench --quick          # CI smoke run: small N, few repeats; writes nothing
    python -m bench --only capacity,recovery --output /tmp/b.md

Exit status: 0 when every benchmark ran (whether or not it met its goals: benchmarks are not
tests), 1 when one could not run, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from bench import capacity, client_path, fanout, handshakes, lifecycle, recovery, server_path
from bench.common import OtherLoad, Row, Section, Sizes
from bench.report import RunInfo, commit, document, goals, now, section_markdown

BENCHMARKS: dict[str, Callable[[Sizes], Section]] = {
    "client_path": client_path.run,
    "capacity": capacity.run,
    "handshakes": handshakes.run,
    "lifecycle": lifecycle.run,
    "recovery": recovery.run,
    "server_path": server_path.run,
    "fanout": fanout.run,
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N, few repeats (for CI)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated benchmarks to run, of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the report (default: BENCHMARKS.md for a full run of every "
        "benchmark; nothing for --quick or --only)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="also save the figures as JSON here (to re-render the report later)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS",
        help="run nothing: re-render the report from saved figures (for instance after "
        "editing bench/ANALYSIS.md)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.names = names
    if args.output is None and not args.quick and not args.only:
        args.output = Path("BENCHMARKS.md")
    return args


def _save(path: Path, sections: list[Section], info: RunInfo) -> None:
    saved_info = dataclasses.asdict(info)
    saved_info["started"] = info.started.isoformat()
    data = {"info": saved_info, "sections": [dataclasses.asdict(s) for s in sections]}
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _load(path: Path) -> tuple[list[Section], RunInfo]:
    data = json.loads(path.read_text(encoding="utf-8"))
    info = data["info"]
    info["started"] = datetime.fromisoformat(info["started"])
    sections = []
    for raw in data["sections"]:
        raw["rows"] = [Row(**row) for row in raw["rows"]]
        sections.append(Section(**raw))
    return sections, RunInfo(**info)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; returns the exit status."""
    args = _parse(argv)
    if args.render is not None:
        saved, saved_info = _load(args.render)
        output = args.output or Path("BENCHMARKS.md")
        output.write_text(document(saved, saved_info), encoding="utf-8")
        print(f"wrote {output}")
        return 0
    # The library logs through "steadysocket"; an application would route that somewhere.
    # Here it goes nowhere, so stderr stays readable and no benchmark pays for terminal output.
    library_logger = logging.getLogger("steadysocket")
    library_logger.addHandler(logging.NullHandler())
    library_logger.propagate = False

    sizes = Sizes(quick=args.quick)
    measured = commit()
    started_at, started = now(), time.monotonic()
    other = OtherLoad()
    sections: list[Section] = []
    failed = 0
    for name in args.names:
        print(f"== {name} ...", flush=True)
        began = time.monotonic()
        try:
            section = BENCHMARKS[name](sizes)
        except Exception as exc:
            failed += 1
            section = Section(
                name,
                name,
                "**This benchmark could not run.**",
                [Row("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")],
            )
            traceback.print_exc()
        section.seconds = time.monotonic() - began
        sections.append(section)
        print(section_markdown(section), flush=True)

    info = RunInfo(
        command=shlex.join(
            ["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])]
        ),
        quick=args.quick,
        started=started_at,
        seconds=time.monotonic() - started,
        others=other.cores(),
        commit=measured,
    )
    if args.results is not None:
        _save(args.results, sections, info)
    if args.output is not None:
        args.output.write_text(document(sections, info), encoding="utf-8")
        print(f"wrote {args.output}")
    rows = goals(sections)
    met = sum(1 for _, row in rows if row.met)
    print(
        f"bench: {len(sections) - failed} of {len(sections)} benchmarks ran, "
        f"{met} of {len(rows)} goals met, {info.seconds:.0f} s "
        f"({'quick' if args.quick else 'full'})"
    )
    return 1 if failed else 0
