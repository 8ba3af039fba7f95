"""Auth and connection options, end to end over real sockets on 127.0.0.1, ``ws://`` and
``wss://`` (the throwaway CA of ``tests/runtime/conftest.py``).

The client: ``WebSocketManager(headers=, subprotocols=, ssl=, auth=)``, with ``auth()`` asked
before every attempt. The server: ``@server.authenticate`` before the hello, ``client.query``,
``client.headers``, ``client.subprotocol``, ``client.identity``, ``subprotocols=``; refusals
4403 (final: fallback at once) and 4419 (retried with a fresh token). The same refusals through
SteadyASGI under uvicorn. Every wait is bounded by a multiple of ``MS``; no test asserts how
long something took.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind, FailureKind
from steadysocket.model.snapshot import Phase, WSState
from steadysocket.runtime.manager import ServerError, WebSocketManager, WSError
from steadysocket.runtime.server import (
    AuthenticationFailed,
    Client,
    Endpoints,
    RequestHeaders,
    SteadyServer,
    TokenExpired,
)
from steadysocket.runtime.transport import ConnectOptions, OpenFailed, Transport, open_attempt
from tests.runtime.adapters import KINDS, Kind, closed_with, dial, recv_json, served

MS = 0.001
TIMEOUT = 5_000 * MS
SCHEMES = ("ws", "wss")


def run(coro: Any) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(6 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


@dataclass
class Tls:
    """The scheme under test, with the contexts ``wss://`` needs (None for ``ws://``)."""

    scheme: str
    server: ssl.SSLContext | None = None
    client: ssl.SSLContext | None = None


@pytest.fixture(params=SCHEMES)
def tls(request: pytest.FixtureRequest) -> Tls:
    if request.param == "ws":
        return Tls("ws")
    return Tls(
        "wss", request.getfixturevalue("server_context"), request.getfixturevalue("client_context")
    )


@asynccontextmanager
async def serving(tls: Tls, **options: Any) -> AsyncIterator[SteadyServer]:
    options.setdefault("environ", {})
    async with SteadyServer("127.0.0.1", 0, ssl=tls.server, **options) as server:
        assert server.url.startswith(f"{tls.scheme}://127.0.0.1:")
        yield server


@dataclass
class Seen:
    """What the server's ``authenticate`` hook saw, one entry per call."""

    clients: list[Client] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, client: Client) -> None:
        self.clients.append(client)
        self.authorizations.append(client.headers.get("Authorization"))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.clients) < count:
                self.changed.clear()
                await self.changed.wait()


def token_check(app: Endpoints, seen: Seen) -> None:
    """The hook of these tests: ``Bearer good-*`` passes (identity: the token), ``Bearer
    expired-*`` is expired (4419), anything else is refused (4403), ``Bearer boom`` raises."""

    @app.authenticate
    async def authenticate(client: Client) -> str:
        seen.add(client)
        header = client.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ")
        if token.startswith("good"):
            return f"user:{token}"
        if token.startswith("expired"):
            raise TokenExpired("Token expired at 10:00")
        if token == "boom":
            raise RuntimeError("the hook's own bug")
        raise AuthenticationFailed(f"Unknown token {token!r}")


class Tokens:
    """An ``auth`` callable (async) that hands out the next of ``tokens`` each call."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


def manager(
    url: str, tls: Tls, **kwargs: Any
) -> tuple[WebSocketManager, list[Phase], list[WSError]]:
    options: dict[str, Any] = {
        "backoff_strategy": BackoffStrategy(
            base_delays_ms=(20,), cap_delay_ms=20, jitter_ratio=0.0, max_attempts=5, seed=1
        ),
        "connection_timeout_ms": 2_000,
        "fallback_probe_interval_ms": None,
        "environ": {},
        "ssl": tls.client,
    }
    options.update(kwargs)
    m = WebSocketManager(url, "auth-client", **options)
    phases = [m.phase]
    errors: list[WSError] = []

    def record(state: WSState) -> None:
        if state.phase != phases[-1]:
            phases.append(state.phase)

    m.on_state_change(record)

    def on_error(error: WSError | ServerError) -> None:
        if isinstance(error, WSError):
            errors.append(error)

    m.on_error(on_error)
    return m, phases, errors


# ---- what reaches the server's Client ----------------------------------------------------------


def test_headers_subprotocol_query_and_token_reach_the_servers_client(tls: Tls) -> None:
    async def body() -> tuple[Client, object]:
        seen = Seen()
        connected: list[object] = []
        async with serving(tls, subprotocols=["steady.v2", "steady.v1"]) as server:
            token_check(server, seen)

            @server.on_connect
            async def on_connect(client: Client) -> None:
                connected.append(client.identity)

            m, _, _ = manager(
                f"{server.url}/?tenant=acme",
                tls,
                headers={"X-App": "demo", "Authorization": "Basic overridden"},
                subprotocols=["other", "steady.v1"],
                auth=lambda: "good-1",  # a sync auth
            )
            async with m:
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            return seen.clients[0], connected[0]

    client, identity = run(body())
    assert client.query["tenant"] == "acme"
    assert (client.query["client_id"], client.query["version"]) == ("auth-client", "1")
    assert client.headers["x-app"] == client.headers["X-APP"] == "demo"
    # auth()'s Authorization replaces the one in headers=, whatever its case.
    assert client.headers.get_all("authorization") == ["Bearer good-1"]
    assert client.subprotocol == "steady.v1"  # the server's preference among those offered
    assert identity == client.identity == "user:good-1"
    assert (client.client_id, client.role, client.version) == ("auth-client", "frontend", 1)


def test_auth_returning_headers_sends_them_and_a_client_offering_no_subprotocol_gets_none(
    tls: Tls,
) -> None:
    async def body() -> Client:
        seen = Seen()
        async with serving(tls, subprotocols=["steady.v1"]) as server:

            @server.authenticate
            async def authenticate(client: Client) -> None:
                seen.add(client)

            async def auth() -> dict[str, str]:
                return {"X-Api-Key": "k-1", "Cookie": "session=abc"}

            m, _, _ = manager(server.url, tls, auth=auth)
            async with m:
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            return seen.clients[0]

    client = run(body())
    assert client.headers["x-api-key"] == "k-1"
    assert client.headers["cookie"] == "session=abc"
    assert "Authorization" not in client.headers
    assert client.subprotocol is None  # served without one: no HTTP 400
    assert client.identity is None


# ---- auth() before every attempt ---------------------------------------------------------------


def test_auth_is_called_before_every_attempt_across_a_forced_reconnect_and_a_drop(
    tls: Tls,
) -> None:
    async def body() -> tuple[int, list[str | None], list[Phase]]:
        seen = Seen()
        async with serving(tls) as server:
            token_check(server, seen)
            auth = Tokens("good-1", "good-2", "good-3")
            m, phases, _ = manager(server.url, tls, auth=auth)
            async with m:
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                await m.force_reconnect()
                await seen.wait_for(2)
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                # A drop: the server ends the connection (1012, retryable).
                await seen.clients[1].close(1012, "Service restart")
                await seen.wait_for(3)
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                return auth.calls, seen.authorizations, list(phases)

    calls, authorizations, phases = run(body())
    assert calls == 3
    assert authorizations == ["Bearer good-1", "Bearer good-2", "Bearer good-3"]
    assert phases[:3] == [Phase.IDLE, Phase.CONNECTING, Phase.OPEN]
    assert phases[-1] is Phase.OPEN


# ---- refusals ----------------------------------------------------------------------------------


def test_refused_credentials_go_to_fallback_in_one_attempt_not_retried_with_the_reason(
    tls: Tls,
) -> None:
    async def body() -> tuple[WSState, list[Phase], list[WSError], int, int]:
        seen = Seen()
        async with serving(tls) as server:
            token_check(server, seen)
            auth = Tokens("stolen")
            m, phases, errors = manager(server.url, tls, auth=auth)
            async with m:
                await m.wait_for(Phase.FALLBACK, timeout=TIMEOUT)
                return m.get_state(), list(phases), errors, auth.calls, len(server.clients)

    state, phases, errors, calls, connected = run(body())
    assert phases[:3] == [Phase.IDLE, Phase.CONNECTING, Phase.FALLBACK]
    assert calls == 1
    assert connected == 0  # never reached on_connect or the client list
    [error] = errors
    assert error.failure == CloseFailure(4403, "Unknown token 'stolen'")
    assert (error.kind, error.retryable) == (FailureKind.HANDSHAKE, False)
    assert state.stats.total_attempts == 1
    assert state.fallback_reason is not None
    assert "4403" in state.fallback_reason
    attempt = state.recent_attempts[0]
    assert (attempt.close_code, attempt.close_reason) == (4403, "Unknown token 'stolen'")
    assert (attempt.classification, attempt.retryable) == ("handshake", False)


def test_an_expired_token_is_retried_and_a_fresh_token_fetched_then_it_opens(tls: Tls) -> None:
    async def body() -> tuple[list[Phase], list[WSError], int, list[str | None]]:
        seen = Seen()
        async with serving(tls) as server:
            token_check(server, seen)
            auth = Tokens("expired-1", "good-2")
            m, phases, errors = manager(server.url, tls, auth=auth)
            async with m:
                await seen.wait_for(2)
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                return list(phases), errors, auth.calls, seen.authorizations

    phases, errors, calls, authorizations = run(body())
    assert calls == 2
    assert authorizations == ["Bearer expired-1", "Bearer good-2"]
    [error] = errors
    assert error.failure == CloseFailure(4419, "Token expired at 10:00")
    assert (error.kind, error.retryable) == (FailureKind.HANDSHAKE, True)
    assert phases == [Phase.IDLE, Phase.CONNECTING, Phase.FAILED, Phase.RECONNECTING, Phase.OPEN]


def test_a_hook_that_raises_closes_4500_and_the_client_retries(tls: Tls) -> None:
    async def body() -> tuple[list[WSError], list[str | None]]:
        seen = Seen()
        async with serving(tls) as server:
            token_check(server, seen)
            m, _, errors = manager(server.url, tls, auth=Tokens("boom", "good-2"))
            async with m:
                await seen.wait_for(2)
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                return errors, seen.authorizations

    errors, authorizations = run(body())
    assert authorizations == ["Bearer boom", "Bearer good-2"]
    [error] = errors
    assert error.failure == CloseFailure(4500, "Server handshake error")
    assert (error.kind, error.retryable) == (FailureKind.SERVER_ERROR, True)


# ---- an auth() that fails ----------------------------------------------------------------------


def test_an_auth_that_raises_fails_the_attempt_classified_and_the_manager_keeps_working(
    tls: Tls,
) -> None:
    async def body() -> tuple[list[Phase], list[WSError], int, list[str | None]]:
        seen = Seen()
        calls = 0

        def auth() -> str:  # sync, raising on its first call
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("token service down")
            return "good-2"

        async with serving(tls) as server:
            token_check(server, seen)
            m, phases, errors = manager(server.url, tls, auth=auth)
            async with m:
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                assert m.send({"type": "chat", "text": "still working"})
                return list(phases), errors, calls, seen.authorizations

    phases, errors, calls, authorizations = run(body())
    assert calls == 2
    assert authorizations == ["Bearer good-2"]  # the failed attempt never dialled
    [error] = errors
    assert error.failure == ErrorFailure(
        ErrorKind.AUTH, "auth() raised ConnectionError: token service down"
    )
    assert (error.kind, error.retryable) == (FailureKind.HANDSHAKE, True)
    assert str(error).startswith("auth() failed: auth() raised ConnectionError")
    assert phases == [Phase.IDLE, Phase.CONNECTING, Phase.FAILED, Phase.RECONNECTING, Phase.OPEN]


def test_an_auth_that_never_returns_is_cancelled_with_its_attempt_and_the_next_one_opens(
    tls: Tls,
) -> None:
    async def body() -> tuple[list[WSError], bool, list[str | None]]:
        seen = Seen()
        cancelled = False
        calls = 0

        async def auth() -> str:
            nonlocal calls, cancelled
            calls += 1
            if calls == 1:
                try:
                    await asyncio.Event().wait()  # hangs until the attempt gives up
                except asyncio.CancelledError:
                    cancelled = True
                    raise
            return "good-2"

        async with serving(tls) as server:
            token_check(server, seen)
            m, _, errors = manager(server.url, tls, auth=auth, connection_timeout_ms=1_000)
            async with m:
                await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
                return errors, cancelled, seen.authorizations

    errors, cancelled, authorizations = run(body())
    assert cancelled
    assert authorizations == ["Bearer good-2"]
    [error] = errors
    assert isinstance(error.failure, ErrorFailure)
    assert error.failure.kind is ErrorKind.CONNECT_TIMEOUT
    assert (error.kind, error.retryable) == (FailureKind.TIMEOUT, True)


@pytest.mark.parametrize(
    ("returned", "detail"),
    [
        (42, "auth() returned int, not a token (str), headers (a mapping) or None"),
        ("", "auth() returned an empty token"),
        ("a\r\nX-Injected: 1", "auth() returned a header value with a line break or NUL"),
        ({"Bad Name": "v"}, "auth() returned an invalid header name 'Bad Name'"),
    ],
)
def test_auth_returning_no_credentials_fails_the_attempt_before_dialling(
    returned: object, detail: str
) -> None:
    async def opener(url: str, **options: Any) -> Transport:
        raise AssertionError("never dialled")

    async def body() -> OpenFailed:
        options = ConnectOptions.build(auth=lambda: returned)  # type: ignore[arg-type,return-value]
        with pytest.raises(OpenFailed) as caught:
            await open_attempt(opener, "ws://127.0.0.1:1/ws/client", options)
        return caught.value

    failure = run(body()).failure
    assert isinstance(failure, ErrorFailure)
    assert failure.kind is ErrorKind.AUTH
    assert failure.detail.startswith(detail)


# ---- the Opener contract -----------------------------------------------------------------------


def test_an_opener_gets_the_url_alone_without_options_and_the_set_ones_as_keywords(
    tls: Tls,
) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def url_only(url: str) -> Transport:
        calls.append((url, {}))
        raise OpenFailed(ErrorFailure(ErrorKind.REFUSED))

    async def with_options(url: str, **options: Any) -> Transport:
        calls.append((url, options))
        raise OpenFailed(ErrorFailure(ErrorKind.REFUSED))

    url = f"{tls.scheme}://127.0.0.1:1/ws/client"
    context = ssl.create_default_context()

    async def body() -> None:
        for opener, options in [
            (url_only, ConnectOptions.build()),
            (with_options, ConnectOptions.build(subprotocols=["p"])),
            (
                with_options,
                ConnectOptions.build(
                    headers=[("X-A", "1"), ("X-A", "2")], ssl=context, auth=lambda: None
                ),
            ),
        ]:
            with pytest.raises(OpenFailed):
                await open_attempt(opener, url, options)

    run(body())
    secure = {"ssl": context} if tls.scheme == "wss" else {}  # never passed for ws://
    assert calls == [
        (url, {}),
        (url, {"subprotocols": ("p",)}),
        (url, {"headers": (("X-A", "1"), ("X-A", "2")), **secure}),
    ]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"headers": {"X-A": 1}}, ValueError),
        ({"headers": [("X A", "1")]}, ValueError),
        ({"headers": {"X-A": "1\n2"}}, ValueError),
        ({"headers": [("X-A",)]}, ValueError),
        ({"subprotocols": "steady.v1"}, ValueError),
        ({"subprotocols": [""]}, ValueError),
        ({"ssl": "yes"}, TypeError),
        ({"auth": "token"}, TypeError),
    ],
)
def test_bad_connection_options_raise_at_construction(
    options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        WebSocketManager("ws://127.0.0.1:1", "c1", environ={}, **options)


def test_ssl_without_any_wss_url_raises_at_construction() -> None:
    context = ssl.create_default_context()
    with pytest.raises(ValueError, match="wss://"):
        WebSocketManager("ws://127.0.0.1:1", "c1", environ={}, ssl=context)
    # One wss:// URL among several is enough; ws:// attempts then go without TLS.
    WebSocketManager(["ws://127.0.0.1:1", "wss://127.0.0.1:2"], "c1", environ={}, ssl=context)


# ---- the server side's own rules ---------------------------------------------------------------


def test_request_headers_are_read_only_case_insensitive_and_keep_repeats() -> None:
    headers = RequestHeaders([("Origin", "a"), ("X-Tag", "1"), ("x-tag", "2")])
    assert headers["ORIGIN"] == "a"
    assert headers["x-tag"] == "1, 2"
    assert headers.get_all("X-Tag") == ["1", "2"]
    assert headers.get_all("missing") == []
    assert sorted(headers) == ["origin", "x-tag"]
    assert len(headers) == 2
    assert "Origin" in headers
    not_a_name: Any = 3
    assert not_a_name not in headers
    assert headers.get(not_a_name) is None
    assert not hasattr(headers, "__setitem__")
    assert "origin" in repr(headers)


def test_only_one_authenticate_hook_may_be_registered() -> None:
    server = SteadyServer("127.0.0.1", 0, environ={})

    @server.authenticate
    async def first(client: Client) -> None:
        return None

    with pytest.raises(RuntimeError, match="already registered"):
        server.authenticate(first)


def test_server_subprotocols_must_be_a_list_of_names() -> None:
    with pytest.raises(ValueError, match="subprotocols"):
        SteadyServer("127.0.0.1", 0, environ={}, subprotocols="steady.v1")
    with pytest.raises(ValueError, match="subprotocols"):
        SteadyServer("127.0.0.1", 0, environ={}, subprotocols=[""])


# ---- both adapters: the same refusals ----------------------------------------------------------


def authorization(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


@pytest.mark.parametrize("kind", KINDS)
def test_both_adapters_refuse_and_admit_alike(kind: Kind) -> None:
    """Raw websockets clients against SteadyServer and SteadyASGI: the same close codes and
    reasons, the same hello, the same view of the request."""

    async def body() -> tuple[list[tuple[int, str]], dict[str, Any], Client]:
        seen = Seen()
        async with served(kind, subprotocols=["steady.v1"]) as app:
            token_check(app.app, seen)
            closes = []
            for token in ("stolen", "expired-1", "boom"):
                async with dial(app.url, additional_headers=authorization(token)) as ws:
                    closes.append(await closed_with(ws))
            async with dial(
                app.url,
                query="client_id=c1&tenant=acme",
                additional_headers=[*authorization("good-1"), ("X-Tag", "1"), ("X-Tag", "2")],
                subprotocols=["steady.v1"],
            ) as ws:
                hello = await recv_json(ws)
                assert ws.subprotocol == "steady.v1"
            return closes, hello, seen.clients[-1]

    closes, hello, client = run(body())
    assert closes == [
        (4403, "Unknown token 'stolen'"),
        (4419, "Token expired at 10:00"),
        (4500, "Server handshake error"),
    ]
    assert (hello["type"], hello["client_id"]) == ("hello", "c1")
    assert client.query["tenant"] == "acme"
    assert client.headers.get_all("x-tag") == ["1", "2"]
    assert client.subprotocol == "steady.v1"
    assert client.identity == "user:good-1"


@pytest.mark.parametrize("kind", KINDS)
def test_a_manager_against_either_adapter_falls_back_on_4403_and_retries_4419(kind: Kind) -> None:
    async def body() -> tuple[list[Phase], list[Phase], list[tuple[int, bool]]]:
        seen = Seen()
        async with served(kind) as app:
            token_check(app.app, seen)
            refused, refused_phases, refused_errors = manager(
                app.url, Tls("ws"), auth=Tokens("stolen")
            )
            async with refused:
                await refused.wait_for(Phase.FALLBACK, timeout=TIMEOUT)
            expired, expired_phases, expired_errors = manager(
                app.url, Tls("ws"), auth=Tokens("expired-1", "good-2")
            )
            async with expired:
                await expired.wait_for(Phase.OPEN, timeout=TIMEOUT)
            codes = [
                (e.failure.code, e.retryable)
                for e in (*refused_errors, *expired_errors)
                if isinstance(e.failure, CloseFailure)
            ]
            return refused_phases, expired_phases, codes

    refused_phases, expired_phases, codes = run(body())
    assert refused_phases[:3] == [Phase.IDLE, Phase.CONNECTING, Phase.FALLBACK]
    assert expired_phases[:5] == [
        Phase.IDLE,
        Phase.CONNECTING,
        Phase.FAILED,
        Phase.RECONNECTING,
        Phase.OPEN,
    ]
    assert codes == [(4403, False), (4419, True)]
