"""``steadysocket connect``: keys drive the manager, the panel and JSON show the state, errors
are one line. Every test talks to a real SteadyServer on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from steadysocket.model.snapshot import Phase
from steadysocket.runtime.console import (
    DISABLED_NOTICE,
    ConnectOptions,
    Unreachable,
    dispatch_key,
    run_connect,
)
from steadysocket.runtime.manager import WebSocketManager
from steadysocket.runtime.server import SteadyServer
from tests.runtime.adapters import clean_env, closed_port, steadysocket_command

TIMEOUT = 10.0
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(2 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


def test_the_keys_drive_the_manager() -> None:
    async def body() -> list[tuple[str, str | None, Phase]]:
        async with SteadyServer("127.0.0.1", 0, heartbeat_interval_ms=5_000) as server:
            manager = WebSocketManager(server.url, "keys", environ={})
            await manager.connect()
            await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
            seen = []
            for key in ("p", "d", "c", "r", "x", "q"):
                notice = await dispatch_key(manager, key)
                if key in {"c", "r"}:
                    await manager.wait_for(Phase.OPEN, timeout=TIMEOUT)
                seen.append((key, notice, manager.phase))
            sent = manager.get_state().stats.heartbeats_sent
            await manager.destroy()
            assert sent >= 1
            return seen

    assert run(body()) == [
        ("p", "ping sent", Phase.OPEN),
        ("d", "disconnected", Phase.IDLE),
        ("c", "connect requested", Phase.OPEN),
        ("r", "reconnect forced", Phase.OPEN),
        ("x", "unknown key 'x'", Phase.OPEN),
        ("q", None, Phase.OPEN),
    ]


def test_the_panel_draws_the_open_connection_and_quits_on_q() -> None:
    async def body() -> str:
        async with SteadyServer("127.0.0.1", 0, heartbeat_interval_ms=5_000) as server:
            read_fd, write_fd = os.pipe()
            out = io.StringIO()
            options = ConnectOptions(
                url=server.url, client_id="panel", role="admin", version=1, json=False, stay=False
            )
            with os.fdopen(read_fd) as keys:
                task = asyncio.create_task(run_connect(options, out, keys))
                async with asyncio.timeout(TIMEOUT):
                    while "phase      OPEN" not in out.getvalue():  # noqa: ASYNC110
                        await asyncio.sleep(0.02)
                os.write(write_fd, b"pq")
                os.close(write_fd)
                assert await task == 0
            return out.getvalue()

    text = run(body())
    assert "phase      OPEN" in text
    assert "role=admin" in text
    assert "graceful_reconnect" in text
    assert "ping sent" in text


def test_json_mode_prints_one_snapshot_per_state_change_and_stops_on_sigint() -> None:
    async def body() -> tuple[list[dict[str, Any]], int]:
        async with SteadyServer("127.0.0.1", 0, heartbeat_interval_ms=5_000) as server:
            process = await asyncio.create_subprocess_exec(
                *steadysocket_command(),
                "connect",
                server.url,
                "--json",
                "--client-id",
                "json-client",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=clean_env(),
            )
            assert process.stdout is not None
            snapshots: list[dict[str, Any]] = []
            async with asyncio.timeout(TIMEOUT):
                while not snapshots or snapshots[-1]["phase"] != "open":
                    snapshots.append(json.loads(await process.stdout.readline()))
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(TIMEOUT):
                await process.communicate()
            assert process.returncode is not None
            return snapshots, process.returncode

    snapshots, code = run(body())
    assert code == 0
    assert [s["phase"] for s in snapshots][-2:] == ["connecting", "open"]
    assert snapshots[-1]["client_id"] == "json-client"
    assert snapshots[-1]["last_hello_message"]["accepted_version"] == 1


def _run_cli(*args: str) -> tuple[int, str]:
    async def body() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *steadysocket_command(),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
        )
        async with asyncio.timeout(TIMEOUT):
            _, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, err.decode()

    return run(body())


def test_an_unreachable_server_is_a_one_line_error_and_exit_one() -> None:
    code, err = _run_cli(
        "connect", f"ws://127.0.0.1:{closed_port()}", "--json", "--max-attempts", "1"
    )
    assert code == 1
    assert err.startswith("steadysocket: cannot connect to ws://127.0.0.1:")
    assert "connection refused" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_bad_url_is_a_one_line_error_and_exit_two() -> None:
    code, err = _run_cli("connect", "http://example.invalid", "--json")
    assert code == 2
    assert err.strip() == (
        "steadysocket: WebSocket URL must start with ws:// or wss://, got 'http://example.invalid'"
    )


def test_the_panel_without_a_terminal_refuses_at_once_and_points_to_json() -> None:
    # stdout is not a terminal here (DEVNULL): the panel would print escapes into a file.
    code, err = _run_cli("connect", f"ws://127.0.0.1:{closed_port()}")
    assert code == 2
    assert err.strip() == (
        "steadysocket: the diagnostics panel needs a terminal; use --json for one JSON "
        "snapshot per state change"
    )


def test_json_mode_prints_the_first_snapshot_once() -> None:
    async def body() -> list[str]:
        async with SteadyServer("127.0.0.1", 0, heartbeat_interval_ms=5_000) as server:
            out = io.StringIO()
            options = ConnectOptions(
                url=server.url, client_id="once", role="frontend", version=1, json=True, stay=False
            )
            task = asyncio.create_task(run_connect(options, out, io.StringIO()))
            async with asyncio.timeout(TIMEOUT):
                while '"phase":"open"' not in out.getvalue().replace(" ", ""):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
            assert await task == 0
            return out.getvalue().splitlines()

    phases = [json.loads(line)["phase"] for line in run(body())]
    assert phases == ["connecting", "open", "idle"]  # idle: the manager destroyed on exit


def test_with_websocket_enabled_false_the_panel_says_why_it_stays_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEBSOCKET_ENABLED", "false")

    async def body() -> str:
        read_fd, write_fd = os.pipe()
        out = io.StringIO()
        options = ConnectOptions(
            url=f"ws://127.0.0.1:{closed_port()}",
            client_id="off",
            role="frontend",
            version=1,
            json=False,
            stay=False,
        )
        with os.fdopen(read_fd) as keys:
            task = asyncio.create_task(run_connect(options, out, keys))
            async with asyncio.timeout(TIMEOUT):
                while "phase      IDLE" not in out.getvalue():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            os.write(write_fd, b"cq")
            os.close(write_fd)
            assert await task == 0
        return out.getvalue()

    text = run(body())
    assert "idle       WEBSOCKET_ENABLED is false: it will not connect" in text
    assert DISABLED_NOTICE.startswith("WEBSOCKET_ENABLED is false: the client stays idle")
    assert DISABLED_NOTICE[:70] in text  # the notice (clipped), also after the c key
    assert "phase      CONNECTING" not in text


def test_with_websocket_enabled_false_json_mode_says_why_and_prints_the_idle_snapshot() -> None:
    async def body() -> tuple[list[dict[str, Any]], str]:
        process = await asyncio.create_subprocess_exec(
            *steadysocket_command(),
            "connect",
            f"ws://127.0.0.1:{closed_port()}",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**clean_env(), "WEBSOCKET_ENABLED": "false"},
        )
        assert process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            first = json.loads(await process.stdout.readline())
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(TIMEOUT):
            rest, err = await process.communicate()
        assert process.returncode == 0
        return [first, *(json.loads(line) for line in rest.splitlines())], err.decode()

    snapshots, err = run(body())
    assert [s["phase"] for s in snapshots] == ["idle"]
    assert err == f"steadysocket: {DISABLED_NOTICE}\n"


def test_while_the_client_gives_up_the_panel_shows_attempts_left_and_when() -> None:
    async def body() -> tuple[str, Exception | None]:
        out = io.StringIO()
        options = ConnectOptions(
            url=f"ws://127.0.0.1:{closed_port()}",
            client_id="giving-up",
            role="frontend",
            version=1,
            json=False,
            stay=False,
            max_attempts=2,
        )
        read_fd, write_fd = os.pipe()
        with os.fdopen(read_fd) as keys:
            try:
                await run_connect(options, out, keys)
            except Unreachable as exc:
                return out.getvalue(), exc
            finally:
                os.close(write_fd)
        return out.getvalue(), None

    text, error = run(body())
    assert isinstance(error, Unreachable)
    assert "outage     attempt 1 of 2, 1 left" in text
    # The production strategy's first delay is 1 s ± 20 %.
    assert re.search(
        r"gives up   in 0\.\d-1\.2s \(by \d\d:\d\d:\d\d\) if no attempt connects", text
    )
