"""Security basics over real sockets on 127.0.0.1: allowed origins (403), the connection cap
(503), the per-connection rate limit (close 4429), and ``wss://`` with a certificate made at
test time by the ``openssl`` command (the fixtures in ``tests/runtime/conftest.py``).

Each server starts on port 0 with an empty environment. Every wait is bounded by a multiple of
``MS``; no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
import uvicorn.config
from websockets.exceptions import ConnectionClosed, InvalidStatus

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.asgi import SteadyASGI
from steadysocket.runtime.cli import main as cli_main
from steadysocket.runtime.manager import ServerError, WebSocketManager, WSError
from steadysocket.runtime.server import SteadyServer
from steadysocket.runtime.transport import open_websocket
from tests.runtime.adapters import closed_with, dial, recv_json
from tests.runtime.fault_rig import ServeProcess

MS = 0.001
TIMEOUT = 5_000 * MS
T = TypeVar("T")
WS_IMPL = (
    "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "websockets"
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(4 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[SteadyServer]:
    kwargs.setdefault("environ", {})
    async with SteadyServer(port=0, **kwargs) as server:
        yield server


async def status_of(base: str, **kwargs: Any) -> int:
    """101 if the upgrade succeeded (and the hello came), else the HTTP status refusing it."""
    try:
        async with dial(base, **kwargs) as ws:
            assert (await recv_json(ws))["type"] == "hello"
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def manager(url: str, **kwargs: Any) -> tuple[WebSocketManager, list[Phase], list[WSError]]:
    options: dict[str, Any] = {
        "backoff_strategy": BackoffStrategy(
            base_delays_ms=(50,), cap_delay_ms=50, jitter_ratio=0.0, max_attempts=50, seed=1
        ),
        "connection_timeout_ms": 2_000,
        "stable_after_ms": 100,
        "environ": {},
    }
    options.update(kwargs)
    m = WebSocketManager(url, "secure-client", **options)
    phases = [m.phase]
    errors: list[WSError] = []

    def record(state: WSState) -> None:
        phases.append(state.phase)

    m.on_state_change(record)

    def on_error(error: WSError | ServerError) -> None:
        if isinstance(error, WSError):
            errors.append(error)

    m.on_error(on_error)
    return m, phases, errors


# ---- allowed origins --------------------------------------------------------------------------


def test_an_origin_not_in_the_list_gets_http_403_and_listed_ones_connect() -> None:
    async def body() -> list[int]:
        async with running(allowed_origins=["https://app.example.com"]) as server:
            return [
                await status_of(server.url, origin="https://app.example.com"),
                await status_of(server.url, origin="https://APP.example.com"),
                await status_of(server.url, origin="https://evil.example"),
                await status_of(server.url, origin="null"),
                await status_of(server.url),  # no Origin: not a browser
                await status_of(
                    server.url,
                    additional_headers=[
                        ("Origin", "https://app.example.com"),
                        ("Origin", "https://evil.example"),
                    ],
                ),
                await status_of(server.url, path="/ws/legacy", origin="https://evil.example"),
            ]

    assert run(body()) == [101, 101, 403, 403, 101, 403, 403]


def test_without_an_origin_list_every_origin_connects() -> None:
    async def body() -> int:
        async with running() as server:
            return await status_of(server.url, origin="https://anywhere.example")

    assert run(body()) == 101


# ---- the connection cap ---------------------------------------------------------------------


def test_the_connection_cap_answers_503_until_a_slot_frees() -> None:
    async def body() -> list[int]:
        async with running(max_connections=2) as server:
            statuses: list[int] = []
            async with dial(server.url, "client_id=a") as a, dial(server.url, path="/ws/b"):
                await recv_json(a)
                statuses.append(await status_of(server.url, query="client_id=c"))
            async with asyncio.timeout(TIMEOUT):
                while server.clients:  # noqa: ASYNC110 - the server noticing the closes
                    await asyncio.sleep(MS)
            statuses.append(await status_of(server.url, query="client_id=d"))
            return statuses

    assert run(body()) == [503, 101]


def test_a_manager_refused_by_a_full_server_retries_and_opens_when_a_slot_frees() -> None:
    async def body() -> tuple[list[Phase], list[tuple[str, bool]]]:
        async with running(max_connections=1) as server:
            async with dial(server.url, "client_id=holder") as holder:
                await recv_json(holder)
                m, phases, errors = manager(server.url)
                await m.connect()
                await m.wait_for(Phase.FAILED, timeout=TIMEOUT)
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            await m.disconnect()
            return phases, [(str(e.kind), e.retryable) for e in errors]

    phases, errors = run(body())
    assert phases[:3] == [Phase.IDLE, Phase.CONNECTING, Phase.FAILED]
    assert phases[-2:] == [Phase.OPEN, Phase.IDLE]
    assert set(phases[3:-2]) <= {Phase.RECONNECTING, Phase.FAILED}
    assert errors
    assert set(errors) == {("server_error", True)}


# ---- the rate limit ---------------------------------------------------------------------------


def test_a_client_over_the_rate_limit_is_closed_with_4429_after_its_burst() -> None:
    """Also a regression: the close used to wait out the 10 s close timeout, longer than this
    test's bound, because the server's only reader was the task awaiting it and the client's
    answering close frame sat behind the unread burst (see ``Endpoints._close_from_reader``)."""

    async def body() -> tuple[int, tuple[int, str]]:
        async with (
            running(rate_limit_messages=5, rate_limit_window_ms=60_000) as server,
            dial(server.url) as ws,
        ):
            await recv_json(ws)
            for _ in range(50):
                await ws.send('{"type":"ping"}')
            pongs = 0
            try:
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        if (json.loads(await ws.recv()))["type"] == "pong":
                            pongs += 1
            except ConnectionClosed:
                pass
            return pongs, await closed_with(ws)

    assert run(body()) == (5, (4429, "Rate limit exceeded"))


def test_the_legacy_echo_has_the_same_rate_limit() -> None:
    async def body() -> tuple[int, str]:
        async with (
            running(rate_limit_messages=3, rate_limit_window_ms=60_000) as server,
            dial(server.url, path="/ws/legacy", query="") as ws,
        ):
            for i in range(10):
                await ws.send(f"m{i}")
            return await closed_with(ws)

    assert run(body()) == (4429, "Rate limit exceeded")


def test_a_rate_limited_manager_backs_off_and_reconnects() -> None:
    async def body() -> tuple[list[Phase], list[tuple[str, bool, int | None]]]:
        async with running(rate_limit_messages=3, rate_limit_window_ms=60_000) as server:
            m, phases, errors = manager(server.url)
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            for i in range(10):
                m.send({"type": "chat", "n": i})
            await m.wait_for(Phase.FAILED, timeout=TIMEOUT)
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            await m.disconnect()
            codes = [(str(e.kind), e.retryable, getattr(e.failure, "code", None)) for e in errors]
            return phases, codes

    phases, codes = run(body())
    assert phases == [
        Phase.IDLE,
        Phase.CONNECTING,
        Phase.OPEN,
        Phase.FAILED,
        Phase.RECONNECTING,
        Phase.OPEN,
        Phase.IDLE,
    ]
    assert codes == [("unknown", True, 4429)]


# ---- wss:// -----------------------------------------------------------------------------------


def test_wss_serves_the_protocol_to_a_client_that_trusts_the_certificate(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def body() -> tuple[str, dict[str, Any], dict[str, Any]]:
        async with (
            running(ssl=server_context) as server,
            dial(server.url, ssl=client_context) as ws,
        ):
            hello = await recv_json(ws)
            await ws.send('{"type":"chat","text":"over tls"}')
            return server.url, hello, await recv_json(ws)

    url, hello, echo = run(body())
    assert url.startswith("wss://127.0.0.1:")
    assert hello["type"] == "hello"
    assert echo["original_message"]["text"] == "over tls"


def test_a_manager_over_wss_opens_and_exchanges_messages(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def body() -> tuple[list[Phase], str]:
        async with running(ssl=server_context) as server:
            opener = functools.partial(open_websocket, ssl=client_context)
            m, phases, _ = manager(server.url, opener=opener)
            received: list[dict[str, Any]] = []
            m.on_message(received.append)
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            m.send({"type": "chat", "text": "secure"})
            async with asyncio.timeout(TIMEOUT):
                while not received:  # noqa: ASYNC110 - waiting for the echo
                    await asyncio.sleep(MS)
            await m.disconnect()
            return phases, received[0]["original_message"]["text"]

    assert run(body()) == ([Phase.IDLE, Phase.CONNECTING, Phase.OPEN, Phase.IDLE], "secure")


def test_an_untrusted_certificate_is_a_tls_failure_not_a_refused_connection(
    server_context: ssl.SSLContext,
) -> None:
    async def body() -> tuple[Phase, list[tuple[str, str]]]:
        async with running(ssl=server_context) as server:
            # Trusts only the system's CAs, not ours.
            opener = functools.partial(open_websocket, ssl=ssl.create_default_context())
            m, _, errors = manager(server.url, opener=opener)
            await m.connect()
            await m.wait_for(Phase.FAILED, timeout=TIMEOUT)
            phase = m.phase
            await m.disconnect()
            return phase, [(str(e.kind), str(e)) for e in errors]

    phase, errors = run(body())
    assert phase is Phase.FAILED
    assert errors[0][0] == "unknown"
    assert "TLS" in errors[0][1]


def test_serve_command_rejects_bad_security_flags_with_exit_2(
    certificates: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["serve", "--port", "0", "--max-connections", "0"]) == 2
    assert cli_main(["serve", "--port", "0", "--rate-limit", "-3"]) == 2
    assert cli_main(["serve", "--port", "0", "--keyfile", str(certificates["key"])]) == 2
    assert cli_main(["serve", "--port", "0", "--certfile", str(certificates["ca"])]) == 2
    err = capsys.readouterr().err
    assert "max_connections must be a positive integer" in err
    assert "rate_limit_messages" in err
    assert "--keyfile needs --certfile" in err
    assert "cannot load the certificate" in err


def test_serve_command_serves_wss_with_the_security_options(
    certificates: dict[str, Path], client_context: ssl.SSLContext
) -> None:
    async def body() -> tuple[list[int], tuple[int, str]]:
        async with ServeProcess(
            "--certfile", str(certificates["cert"]), "--keyfile", str(certificates["key"]),
            "--allowed-origin", "https://ok.example", "--max-connections", "1",
            "--rate-limit", "3",
        ) as server:  # fmt: skip
            url = f"wss://127.0.0.1:{server.port}"
            tls = client_context
            statuses = [await status_of(url, ssl=tls, origin="https://evil.example")]
            async with dial(url, ssl=tls, origin="https://ok.example") as ws:
                await recv_json(ws)
                statuses.append(await status_of(url, ssl=tls))
                for _ in range(10):
                    await ws.send('{"type":"ping"}')
                closed = await closed_with(ws)
            await server.stop()
            return statuses, closed

    assert run(body()) == ([403, 503], (4429, "Rate limit exceeded"))


# ---- the same admission under ASGI (uvicorn) ----------------------------------------------


@asynccontextmanager
async def uvicorn_serving(app: SteadyASGI) -> AsyncIterator[str]:
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", log_config=None,
        ws=WS_IMPL,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:
                assert not task.done(), "uvicorn stopped before it started"
                await asyncio.sleep(10 * MS)
        yield f"ws://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(TIMEOUT):
            await task


def test_asgi_answers_a_forbidden_origin_with_403_and_a_full_app_with_503() -> None:
    async def body() -> list[int]:
        app = SteadyASGI(environ={}, allowed_origins=["https://app.example.com"], max_connections=1)
        async with uvicorn_serving(app) as base:
            statuses = [await status_of(base, origin="https://evil.example")]
            async with dial(base, origin="https://app.example.com") as ws:
                await recv_json(ws)
                statuses.append(await status_of(base, query="client_id=c2"))
            await app.close()
            return statuses

    assert run(body()) == [403, 503]
