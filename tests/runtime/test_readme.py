"""The README's client example runs as written (against a real server on a free port)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path

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
    assert "received: {'type': 'echo'" in printed
    assert "phase: idle" in printed
