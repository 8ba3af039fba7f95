"""The README's examples run as written (against a real server on a free port), and every
steadysocket name the README uses imports from the path the README gives."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import io
import re
import textwrap
from pathlib import Path

import pytest

from steadysocket.runtime.server import SteadyServer

README = Path(__file__).resolve().parents[2] / "README.md"


def _client_example() -> str:
    match = re.search(r"## The client\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None, "README has no client example"
    return match.group(1)


def test_the_readme_client_example_connects_sends_and_receives_the_echo() -> None:
    source = _client_example()
    assert "ws://127.0.0.1:8000" in source

    async def body() -> str:
        async with SteadyServer("127.0.0.1", 0, heartbeat_interval_ms=5_000) as server:
            code = source.replace("ws://127.0.0.1:8000", server.url).replace(
                "asyncio.run(main())", ""
            )
            namespace: dict[str, object] = {}
            exec(compile(code, "README.md", "exec"), namespace)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                async with asyncio.timeout(20):
                    await namespace["main"]()  # type: ignore[operator]
            return out.getvalue()

    printed = asyncio.run(body())
    assert "phase: open" in printed
    # The listeners were registered before the first attempt, so they saw it.
    assert printed.index("phase: connecting") < printed.index("phase: open")
    assert "received: {'type': 'echo'" in printed
    assert "phase: idle" in printed


def _python_blocks() -> list[str]:
    """Every ```python block of the README, dedented (some are inside list items)."""
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", README.read_text(), re.S | re.M)
    return [textwrap.dedent(body) for _, body in blocks]


def _readme_imports() -> list[tuple[str, str | None]]:
    """(module, name) for each steadysocket import in the README's Python blocks."""
    found: list[tuple[str, str | None]] = []
    for block in _python_blocks():
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("steadysocket"):
                found += [(node.module or "", alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [(a.name, None) for a in node.names if a.name.startswith("steadysocket")]
    return found


def _readme_dotted_names() -> list[str]:
    """Every ``steadysocket.a.b`` the README's prose names."""
    return sorted(
        set(re.findall(r"\bsteadysocket(?:\.[A-Za-z_][A-Za-z0-9_]*)+", README.read_text()))
    )


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted``, then look up the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            value = getattr(value, part)
        return value
    raise ModuleNotFoundError(dotted)


def test_the_readme_uses_steadysocket_names_in_code_and_prose() -> None:
    assert ("steadysocket", "WebSocketManager") in _readme_imports()
    assert "steadysocket.testing" in _readme_dotted_names()


@pytest.mark.parametrize(("module", "name"), _readme_imports(), ids=lambda v: str(v))
def test_every_readme_import_works(module: str, name: str | None) -> None:
    imported = importlib.import_module(module)
    if name is not None:
        assert getattr(imported, name) is not None


@pytest.mark.parametrize("dotted", _readme_dotted_names())
def test_every_steadysocket_name_in_the_readme_exists(dotted: str) -> None:
    assert _resolve(dotted) is not None


def _testing_example() -> str:
    match = re.search(
        r"## Testing your application\n.*?```python\n(.*?)```", README.read_text(), re.S
    )
    assert match is not None, "README has no example for steadysocket.testing"
    return match.group(1)


def test_the_readme_testing_example_drops_the_link_and_its_test_passes() -> None:
    source = _testing_example()
    assert "Mode.RESET" in source
    namespace: dict[str, object] = {}
    exec(compile(source, "README.md", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0]()  # type: ignore[operator]


def _in_memory_example() -> str:
    """The example of the testing section that uses the in-memory server."""
    section = re.search(r"## Testing your application\n(.*?)\n## ", README.read_text(), re.S)
    assert section is not None, "README has no section on testing your application"
    blocks: list[str] = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    found = [block for block in blocks if "InMemoryServer" in block]
    assert len(found) == 1, "README has no (or more than one) in-memory testing example"
    return found[0]


def test_the_readme_in_memory_example_drops_the_link_and_its_test_passes() -> None:
    source = _in_memory_example()
    assert "server.drop()" in source
    assert "clock.advance(" in source
    namespace: dict[str, object] = {"__name__": "readme_in_memory_example"}
    exec(compile(source, "README.md", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 1
    tests[0]()  # type: ignore[operator]


def test_every_relative_link_in_the_readme_points_to_a_file_in_the_repository() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    relative = [link for link in links if "://" not in link]
    assert "docs/protocol.md" in relative
    missing = [link for link in relative if not (README.parent / link).exists()]
    assert missing == []
