"""``open_fast_websocket`` over real sockets on 127.0.0.1, and against ``open_websocket``.

The oracle is the default transport: every scenario of the agreement tables runs against both
openers, and the failures they report (how a connection ended, how an attempt failed) must be
equal, and equal to the expected row. Servers: a ``SteadyServer`` on port 0, a raw
``websockets.asyncio.server.serve`` for the edge cases, and a bare asyncio protocol for peers
websockets will not imitate (one that completes the upgrade and then ignores everything).

Every wait is bounded by a multiple of ``MS``; no test asserts how long something took.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.utils import accept_key

import steadysocket.runtime.fastws as fastws
import steadysocket.runtime.manager as manager_module
import steadysocket.runtime.transport as transport_module
from steadysocket.model.classify import CloseFailure, ErrorFailure, ErrorKind, Failure, HttpFailure
from steadysocket.model.snapshot import Phase
from steadysocket.runtime.fastws import FastTransport, open_fast_websocket
from steadysocket.runtime.manager import ServerError, WebSocketManager, WSError
from steadysocket.runtime.server import SteadyServer
from steadysocket.runtime.transport import (
    Opener,
    OpenFailed,
    Transport,
    TransportClosed,
    open_websocket,
)

MS = 0.001
TIMEOUT = 5_000 * MS
T = TypeVar("T")
OPENERS: dict[str, Callable[..., Awaitable[Transport]]] = {
    "websockets": open_websocket,
    "fast": open_fast_websocket,
}
HELLO = (
    '{"type":"hello","server_time":"2025-08-15T10:00:00.000Z","accepted_version":1,'
    '"features":[],"request_id":"r","client_id":"fast","heartbeat_interval_ms":60000}'
)

Handler = Callable[[ServerConnection], Awaitable[None]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(6 * TIMEOUT):
            return await coro

    return asyncio.run(bounded())


@asynccontextmanager
async def raw_server(handler: Handler, **kwargs: Any) -> AsyncIterator[str]:
    """A websockets server on 127.0.0.1 (no compression, no keepalive) running ``handler``."""
    kwargs.setdefault("compression", None)
    kwargs.setdefault("ping_interval", None)
    async with serve(handler, "127.0.0.1", 0, **kwargs) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


@asynccontextmanager
async def steady(**kwargs: Any) -> AsyncIterator[SteadyServer]:
    kwargs.setdefault("environ", {})
    async with SteadyServer("127.0.0.1", 0, **kwargs) as server:
        yield server


async def recv(transport: Transport) -> str | bytes:
    async with asyncio.timeout(TIMEOUT):
        return await transport.recv()


async def ended(transport: Transport) -> tuple[list[str | bytes], CloseFailure | ErrorFailure]:
    """Read until the connection ends: what arrived, and the failure it ended with."""
    frames: list[str | bytes] = []
    async with asyncio.timeout(TIMEOUT):
        for _ in range(1000):
            try:
                frames.append(await transport.recv())
            except TransportClosed as exc:
                return frames, exc.failure
    raise AssertionError("the connection did not end")


async def open_failure(opener: Callable[..., Awaitable[Transport]], url: str) -> Failure:
    try:
        async with asyncio.timeout(TIMEOUT):
            transport = await opener(url)
    except OpenFailed as exc:
        return exc.failure
    transport.abort()
    raise AssertionError("the connection opened")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- messages -----------------------------------------------------------------------------


def test_a_steady_server_says_hello_and_echoes_what_the_fast_transport_sends() -> None:
    async def body() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with steady() as server:
            transport = await open_fast_websocket(f"{server.url}/ws/client?client_id=c1")
            assert isinstance(transport, FastTransport)
            hello = json.loads(await recv(transport))
            echoes = []
            for i in range(3):
                await transport.send(json.dumps({"type": "chat", "n": i}))
                echoes.append(json.loads(await recv(transport)))
            await transport.close(1000, "bye")
            assert transport.closed
            return hello, echoes

    hello, echoes = run(body())
    assert hello["type"] == "hello"
    assert hello["client_id"] == "c1"
    assert [e["original_message"] for e in echoes] == [{"type": "chat", "n": i} for i in range(3)]


def test_large_fragmented_and_binary_messages_arrive_whole_both_ways() -> None:
    big = "é" * 300_000  # 600,000 bytes of UTF-8
    received_by_server: list[str | bytes] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send(big)
        await ws.send(["frag", "mented", " text"])
        # A two-byte character split across fragments.
        await ws.send([b"caf", b"\xc3", b"\xa9"], text=True)
        await ws.send(b"\x00\x01binary")
        await ws.send([b"\x02", b"\x03"])
        received_by_server.append(await ws.recv())
        await ws.send("done")
        await ws.wait_closed()

    async def body() -> list[str | bytes]:
        async with raw_server(handler) as url:
            transport = await open_fast_websocket(url)
            frames = [await recv(transport) for _ in range(5)]
            await transport.send("ü" * 200_000)
            frames.append(await recv(transport))
            await transport.close(1000, "")
            return frames

    frames = run(body())
    assert frames == [big, "fragmented text", "café", b"\x00\x01binary", b"\x02\x03", "done"]
    assert received_by_server == ["ü" * 200_000]


def test_a_server_ping_is_answered_by_the_protocol() -> None:
    async def handler(ws: ServerConnection) -> None:
        pong = await ws.ping(b"are you there")
        async with asyncio.timeout(TIMEOUT):
            await pong
        await ws.send("ponged")
        await ws.wait_closed()

    async def body() -> str | bytes:
        async with raw_server(handler) as url:
            transport = await open_fast_websocket(url)
            message = await recv(transport)
            await transport.close(1000, "")
            return message

    assert run(body()) == "ponged"


def test_headers_and_subprotocols_reach_the_server() -> None:
    seen: list[str | None] = []

    def process_request(connection: ServerConnection, request: Request) -> None:
        seen.append(request.headers.get("X-Token"))

    async def handler(ws: ServerConnection) -> None:
        await ws.send(str(ws.subprotocol))
        await ws.wait_closed()

    async def body() -> tuple[str | bytes, str | None]:
        async with raw_server(
            handler, process_request=process_request, subprotocols=["steady.v1"]
        ) as url:
            transport = await open_fast_websocket(
                url, headers={"X-Token": "secret"}, subprotocols=["other", "steady.v1"]
            )
            assert isinstance(transport, FastTransport)
            message = await recv(transport)
            await transport.close(1000, "")
            return message, transport.subprotocol

    assert run(body()) == ("steady.v1", "steady.v1")
    assert seen == ["secret"]


# ---- the agreement table: how a connection ends --------------------------------------------


def _reset(ws: ServerConnection) -> None:
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


async def _close_with(ws: ServerConnection, code: int, reason: str) -> None:
    await ws.close(code, reason)


async def _write_then_wait(ws: ServerConnection, data: bytes) -> None:
    ws.transport.write(data)
    await ws.wait_closed()


async def _drop_tcp(ws: ServerConnection) -> None:
    ws.transport.close()
    await ws.wait_closed()


async def _reset_after_go(ws: ServerConnection) -> None:
    await ws.send("one")
    await ws.send("two")
    await ws.recv()  # the client read both and asks for the reset
    _reset(ws)


@dataclass(frozen=True)
class Ending:
    """A way for the server to end a connection, and the failure a client must report."""

    name: str
    handler: Handler
    expected: CloseFailure | ErrorFailure
    frames: tuple[str, ...] = ()
    """Messages the client receives first; after them it sends "go"."""
    max_size: int | None = 1 << 20


def _closes(code: int, reason: str) -> Ending:
    return Ending(
        f"close {code}" + (f", {len(reason)}-byte reason" if len(reason) > 20 else ""),
        lambda ws: _close_with(ws, code, reason),
        CloseFailure(code, reason),
    )


def _lost(detail: str) -> ErrorFailure:
    return ErrorFailure(ErrorKind.NO_CLOSE_FRAME, detail)


ENDINGS = [
    _closes(1000, "bye"),
    _closes(1001, "restart"),
    _closes(1011, ""),
    _closes(4400, "bad hello"),
    _closes(4999, "r" * 123),
    Ending(
        "empty close frame (1005)",
        lambda ws: _write_then_wait(ws, b"\x88\x00"),
        CloseFailure(1005, ""),
    ),
    Ending(
        "TCP closed without a close frame",
        _drop_tcp,
        _lost("EOFError: unexpected end of stream"),
    ),
    Ending(
        "reset mid-stream",
        _reset_after_go,
        _lost("ConnectionResetError: [Errno 104] Connection reset by peer"),
        frames=("one", "two"),
    ),
    # In the next three the client fails the connection (close 1002, 1007, 1009) and reads
    # nothing more, not even the server's echo of its close frame.
    Ending(
        "protocol error from the server (reserved bits)",
        lambda ws: _write_then_wait(ws, b"\xf1\x00"),
        _lost("ProtocolError: reserved bits must be 0"),
    ),
    Ending(
        "invalid UTF-8 in a text frame",
        lambda ws: _write_then_wait(ws, b"\x81\x01\xff"),
        _lost(
            "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: "
            "invalid start byte"
        ),
    ),
    Ending(
        "message over max_size",
        lambda ws: ws.send("x" * 2000),
        _lost("PayloadTooBig: frame with 2000 bytes exceeds limit of 1024 bytes"),
        max_size=1024,
    ),
]


Outcome = tuple[
    list[str | bytes], CloseFailure | ErrorFailure, CloseFailure | ErrorFailure, bool, Any
]


async def _ending(ending: Ending, opener: Callable[..., Awaitable[Transport]]) -> Outcome:
    """Run one ending: the frames and failure ``recv()`` saw, what ``send()`` raised then, and
    the close code and reason the server received from the client."""
    server_saw: list[tuple[int | None, str | None]] = []

    async def handler(ws: ServerConnection) -> None:
        await ending.handler(ws)
        async with asyncio.timeout(TIMEOUT):
            await ws.wait_closed()
        server_saw.append((ws.close_code, ws.close_reason))

    async with raw_server(handler) as url:
        transport = await opener(url, max_size=ending.max_size)
        frames: list[str | bytes] = [await recv(transport) for _ in ending.frames]
        if ending.frames:
            await transport.send("go")
        more, failure = await ended(transport)
        try:
            async with asyncio.timeout(TIMEOUT):
                await transport.send("too late")
        except TransportClosed as exc:
            send_failure, written = exc.failure, exc.written
        else:
            raise AssertionError("send() on an ended connection did not raise")
        await transport.close(1000, "")
        transport.abort()
    return frames + more, failure, send_failure, written, server_saw


@pytest.mark.parametrize("ending", ENDINGS, ids=[e.name for e in ENDINGS])
def test_both_transports_report_the_same_ending(ending: Ending) -> None:
    async def body() -> dict[str, Outcome]:
        return {name: await _ending(ending, opener) for name, opener in OPENERS.items()}

    results = run(body())
    assert results["fast"] == results["websockets"]
    assert results["fast"][:4] == (list(ending.frames), ending.expected, ending.expected, False)


@pytest.mark.parametrize(("code", "reason"), [(1000, "bye"), (1001, ""), (4001, "custom")])
def test_both_transports_close_with_the_code_and_reason_asked_for(code: int, reason: str) -> None:
    async def body() -> dict[str, tuple[tuple[int | None, str | None], Failure]]:
        results: dict[str, tuple[tuple[int | None, str | None], Failure]] = {}
        for name, opener in OPENERS.items():
            server_saw: list[tuple[int | None, str | None]] = []

            async def handler(ws: ServerConnection) -> None:
                await ws.wait_closed()
                server_saw.append((ws.close_code, ws.close_reason))  # noqa: B023 - awaited below

            async with raw_server(handler) as url:
                transport = await opener(url)
                async with asyncio.timeout(TIMEOUT):
                    await transport.close(code, reason)
                _, failure = await ended(transport)
            results[name] = (server_saw[0], failure)
        return results

    expected = ((code, reason), CloseFailure(code, reason))
    assert run(body()) == {"websockets": expected, "fast": expected}


# ---- the agreement table: how an attempt fails ---------------------------------------------


def _respond(status: int) -> Callable[[ServerConnection, Request], Response]:
    def process_request(connection: ServerConnection, request: Request) -> Response:
        return connection.respond(status, f"status {status}\n")

    return process_request


async def _ignore(ws: ServerConnection) -> None:
    await ws.wait_closed()


@asynccontextmanager
async def tcp_server(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


class HangUp(asyncio.Protocol):
    """Accepts TCP and closes it at once: the handshake breaks off."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class NotHttp(asyncio.Protocol):
    """Answers the upgrade request with something that is not HTTP, and closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(self.transport, asyncio.Transport)
        self.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.transport.close()


@pytest.mark.parametrize("status", [403, 404, 503])
def test_both_transports_report_an_http_refusal_as_its_status(status: int) -> None:
    async def body() -> dict[str, Failure]:
        async with raw_server(_ignore, process_request=_respond(status)) as url:
            return {name: await open_failure(opener, url) for name, opener in OPENERS.items()}

    assert run(body()) == {"websockets": HttpFailure(status), "fast": HttpFailure(status)}


def test_both_transports_report_a_closed_port_as_refused() -> None:
    async def body() -> dict[str, Failure]:
        url = f"ws://127.0.0.1:{closed_port()}"
        return {name: await open_failure(opener, url) for name, opener in OPENERS.items()}

    failures = run(body())
    assert failures["fast"] == failures["websockets"]
    assert isinstance(failures["fast"], ErrorFailure)
    assert failures["fast"].kind is ErrorKind.REFUSED


@pytest.mark.parametrize(
    ("factory", "detail"),
    [
        (HangUp, "handshake broke off: did not receive a valid HTTP response"),
        (NotHttp, "handshake broke off: did not receive a valid HTTP response"),
    ],
    ids=["tcp closed", "not http"],
)
def test_both_transports_report_a_broken_handshake_alike(
    factory: Callable[[], asyncio.Protocol], detail: str
) -> None:
    async def body() -> dict[str, Failure]:
        async with tcp_server(factory) as url:
            return {name: await open_failure(opener, url) for name, opener in OPENERS.items()}

    expected = ErrorFailure(ErrorKind.NO_CLOSE_FRAME, detail)
    assert run(body()) == {"websockets": expected, "fast": expected}


def test_both_transports_follow_a_redirect() -> None:
    async def greet(ws: ServerConnection) -> None:
        await ws.send("over here")
        await ws.wait_closed()

    async def body() -> dict[str, str | bytes]:
        async with raw_server(greet) as target:

            def redirect(connection: ServerConnection, request: Request) -> Response:
                response = connection.respond(302, "moved\n")
                response.headers["Location"] = f"{target}/elsewhere"
                return response

            async with raw_server(_ignore, process_request=redirect) as url:
                greetings = {}
                for name, opener in OPENERS.items():
                    transport = await opener(url)
                    greetings[name] = await recv(transport)
                    await transport.close(1000, "")
                return greetings

    assert run(body()) == {"websockets": "over here", "fast": "over here"}


def test_both_transports_reject_a_url_that_is_not_a_websocket_url() -> None:
    async def body() -> list[str]:
        messages = []
        for opener in OPENERS.values():
            with pytest.raises(ValueError, match="invalid WebSocket URL") as info:
                await opener("http://127.0.0.1:1/")
            messages.append(str(info.value))
        return messages

    first, second = run(body())
    assert first == second


# ---- a peer that never answers the close frame, or stops reading ----------------------------


class Deaf(asyncio.Protocol):
    """Completes the upgrade, writes ``after`` (frames), then stops reading and never closes the
    TCP connection. Every transport it served is kept in ``served``."""

    served: list[asyncio.Transport]

    def __init__(self, after: bytes) -> None:
        self.after = after
        self.head = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        Deaf.served.append(transport)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        match = re.search(rb"sec-websocket-key: *(\S+)", self.head, re.IGNORECASE)
        assert match is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(match.group(1).decode()).encode() + b"\r\n\r\n"
            + self.after
        )  # fmt: skip
        self.upgraded = True
        self.transport.pause_reading()


def _text_frame(text: str) -> bytes:
    """An unmasked (server) text frame of up to 65,535 bytes."""
    data = text.encode()
    if len(data) < 126:
        return bytes((0x81, len(data))) + data
    return struct.pack("!BBH", 0x81, 126, len(data)) + data


@asynccontextmanager
async def deaf_server(after: bytes = b"") -> AsyncIterator[str]:
    Deaf.served = []
    try:
        async with tcp_server(lambda: Deaf(after)) as url:
            yield url
    finally:
        for transport in Deaf.served:
            transport.abort()


def test_a_close_to_a_peer_that_never_answers_ends_within_the_close_timeout_for_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "CLOSE_TIMEOUT_S", 50 * MS)
    monkeypatch.setattr(fastws, "CLOSE_TIMEOUT_S", 50 * MS)

    async def body() -> dict[str, tuple[bool, CloseFailure | ErrorFailure]]:
        results = {}
        async with deaf_server() as url:
            for name, opener in OPENERS.items():
                transport = await opener(url)
                async with asyncio.timeout(TIMEOUT):
                    await transport.close(1000, "bye")
                _, failure = await ended(transport)
                closed = not isinstance(transport, FastTransport) or transport.closed
                results[name] = (closed, failure)
        return results

    expected = (
        True,
        ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "TimeoutError: timed out while closing connection"),
    )
    assert run(body()) == {"websockets": expected, "fast": expected}


def test_a_close_frame_from_a_peer_that_keeps_tcp_open_ends_the_fast_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A difference from websockets, whose recv() waits for the TCP close for ever."""
    monkeypatch.setattr(fastws, "CLOSE_TIMEOUT_S", 50 * MS)
    close = b"\x88\x05" + struct.pack("!H", 1001) + b"bye"

    async def body() -> tuple[list[str | bytes], CloseFailure | ErrorFailure, bool]:
        async with deaf_server(_text_frame("hi") + close) as url:
            transport = await open_fast_websocket(url)
            frames, failure = await ended(transport)
            assert isinstance(transport, FastTransport)
            return frames, failure, transport.closed

    assert run(body()) == (["hi"], CloseFailure(1001, "bye"), True)


def test_a_send_to_a_peer_that_stops_reading_waits_then_the_abort_ends_it() -> None:
    chunk = "x" * 200_000

    async def body() -> tuple[int, CloseFailure | ErrorFailure, bool]:
        async with deaf_server() as url:
            transport = await open_fast_websocket(url)
            blocked = None
            sent = 0
            for _ in range(1000):  # the kernel's buffers hold a few MB at most
                pending = asyncio.ensure_future(transport.send(chunk))
                await asyncio.wait([pending], timeout=100 * MS)
                if not pending.done():
                    blocked = pending
                    break
                pending.result()
                sent += 1
            assert blocked is not None, "send() never waited"
            transport.abort()
            try:
                async with asyncio.timeout(TIMEOUT):
                    await blocked
            except TransportClosed as exc:
                return sent, exc.failure, exc.written
            raise AssertionError("the blocked send() returned")

    sent, failure, written = run(body())
    assert sent > 0
    assert failure == ErrorFailure(ErrorKind.NO_CLOSE_FRAME, "EOFError: unexpected end of stream")
    assert written  # it was in the buffer: counted as written, never re-queued


def test_the_manager_catches_a_peer_that_stops_reading_through_the_fast_transport(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manager_module, "SEND_TIMEOUT_S", 200 * MS)
    monkeypatch.setattr(manager_module, "CLOSE_TIMEOUT_S", 200 * MS)

    async def body() -> tuple[list[str], Phase]:
        async with deaf_server(_text_frame(HELLO)) as url:
            m = WebSocketManager(
                url, "fast", opener=open_fast_websocket, environ={}, fallback_probe_interval_ms=None
            )
            errors: list[str] = []

            def on_error(error: WSError | ServerError) -> None:
                if isinstance(error, WSError):
                    errors.append(f"{error.kind}: {error}")

            m.on_error(on_error)
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            chunk = {"type": "bulk", "data": "x" * 50_000}
            for _ in range(2000):  # until the writer gives up on the stalled peer
                if m.phase is not Phase.OPEN:
                    break
                m.send(chunk)
                await asyncio.sleep(MS)
            phase = await m.wait_for(Phase.RECONNECTING, Phase.FAILED, timeout=TIMEOUT)
            await m.disconnect()
            return errors, phase

    errors, phase = run(body())
    assert phase in {Phase.RECONNECTING, Phase.FAILED}
    assert errors[0].startswith("timeout: ")
    assert "send blocked" in errors[0]


# ---- wss:// ---------------------------------------------------------------------------------


# The throwaway CA and certificate are tests/runtime/conftest.py's shared fixtures.


def test_wss_with_a_trusted_certificate_says_hello_and_echoes(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async def body() -> tuple[str, dict[str, Any], dict[str, Any]]:
        async with steady(ssl=server_context) as server:
            transport = await open_fast_websocket(
                f"{server.url}/ws/client?client_id=c1", ssl=client_context
            )
            hello = json.loads(await recv(transport))
            await transport.send('{"type":"chat","text":"over tls"}')
            echo = json.loads(await recv(transport))
            await transport.close(1000, "")
            return server.url, hello, echo

    url, hello, echo = run(body())
    assert url.startswith("wss://127.0.0.1:")
    assert hello["type"] == "hello"
    assert echo["original_message"]["text"] == "over tls"


def test_both_transports_report_an_untrusted_certificate_as_the_same_tls_failure(
    server_context: ssl.SSLContext,
) -> None:
    async def body() -> dict[str, Failure]:
        async with steady(ssl=server_context) as server:
            failures = {}
            for name, opener in OPENERS.items():
                # Trusts only the system's CAs, not ours.
                bound = functools.partial(opener, ssl=ssl.create_default_context())
                failures[name] = await open_failure(bound, server.url)
            return failures

    failures = run(body())
    assert failures["fast"] == failures["websockets"]
    assert isinstance(failures["fast"], ErrorFailure)
    assert failures["fast"].kind is ErrorKind.OTHER
    assert failures["fast"].detail.startswith("TLS: ")


# ---- the manager on the fast transport -------------------------------------------------------


def test_a_manager_on_the_fast_transport_reconnects_on_demand_and_leaves_nothing_behind() -> None:
    opened: list[FastTransport] = []

    async def opener(url: str) -> Transport:
        transport = await open_fast_websocket(url)
        assert isinstance(transport, FastTransport)
        opened.append(transport)
        return transport

    async def echo_of(m: WebSocketManager, got: list[dict[str, Any]], text: str) -> str:
        assert m.send({"type": "chat", "text": text})
        async with asyncio.timeout(TIMEOUT):
            while not any(  # noqa: ASYNC110 - waiting for the echo
                g.get("original_message", {}).get("text") == text for g in got
            ):
                await asyncio.sleep(MS)
        return text

    async def body() -> tuple[list[str], list[Phase], set[str], int]:
        async with steady() as server:
            before = {t.get_name() for t in asyncio.all_tasks()}
            assert not any(name.startswith("steadysocket") for name in before)
            m = WebSocketManager(server.url, "fast-client", opener=opener, environ={})
            phases: list[Phase] = []
            m.on_state_change(lambda state: phases.append(state.phase))
            got: list[dict[str, Any]] = []
            m.on_message(got.append)
            await m.connect()
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            echoes = [await echo_of(m, got, "first")]
            await m.force_reconnect()
            await m.wait_for(Phase.OPEN, timeout=TIMEOUT)
            echoes.append(await echo_of(m, got, "second"))
            await m.disconnect()
            after = {t.get_name() for t in asyncio.all_tasks()}
            async with asyncio.timeout(TIMEOUT):
                while server.local_client_count:  # noqa: ASYNC110 - the server's side ending
                    await asyncio.sleep(MS)
            return echoes, phases, after, len(opened)

    echoes, phases, after, count = run(body())
    assert echoes == ["first", "second"]
    assert phases[0] is Phase.CONNECTING
    assert phases.count(Phase.OPEN) == 2
    assert phases[-1] is Phase.IDLE
    assert {name for name in after if name.startswith("steadysocket")} == set()
    assert count == 2
    assert all(transport.closed for transport in opened)


def test_a_manager_on_the_fast_transport_reports_an_http_refusal_like_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def attempt(url: str, opener: Opener) -> tuple[str, bool]:
        m = WebSocketManager(url, "c", opener=opener, environ={}, fallback_probe_interval_ms=None)
        errors: list[WSError] = []
        m.on_error(lambda e: errors.append(e) if isinstance(e, WSError) else None)
        await m.connect()
        await m.wait_for(Phase.FAILED, Phase.FALLBACK, timeout=TIMEOUT)
        await m.disconnect()
        return str(errors[0]), errors[0].retryable

    async def body() -> dict[str, tuple[str, bool]]:
        async with raw_server(_ignore, process_request=_respond(403)) as url:
            return {name: await attempt(url, opener) for name, opener in OPENERS.items()}

    results = run(body())
    assert results["fast"] == results["websockets"]
    assert "403" in results["fast"][0]


def test_headers_accept_websockets_headers_objects_too() -> None:
    seen: list[list[str]] = []

    def process_request(connection: ServerConnection, request: Request) -> None:
        seen.append(request.headers.get_all("X-Multi"))

    async def body() -> None:
        async with raw_server(_ignore, process_request=process_request) as url:
            headers = Headers([("X-Multi", "a"), ("X-Multi", "b")])
            transport = await open_fast_websocket(url, headers=headers)
            await transport.close(1000, "")

    run(body())
    assert seen == [["a", "b"]]


def test_a_cancelled_opening_handshake_aborts_the_half_open_connection() -> None:
    lost: list[asyncio.Future[None]] = []

    class Mute(asyncio.Protocol):
        """Accepts TCP, reads the upgrade request and never answers it."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            lost.append(asyncio.get_running_loop().create_future())

        def connection_lost(self, exc: Exception | None) -> None:
            lost[-1].set_result(None)

    async def body() -> bool:
        async with tcp_server(Mute) as url:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(50 * MS):
                    await open_fast_websocket(url)
            async with asyncio.timeout(TIMEOUT):
                await lost[0]  # the server saw the client drop the connection
            return len(lost) == 1

    assert run(body())


def test_reading_pauses_while_much_waits_for_recv_and_resumes_when_it_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastws, "READ_LIMIT_BYTES", 10_000)
    count = 200

    async def handler(ws: ServerConnection) -> None:
        for i in range(count):
            await ws.send(f"{i:04d}" + "x" * 996)
        await ws.wait_closed()

    async def body() -> tuple[bool, list[str | bytes]]:
        async with raw_server(handler) as url:
            transport = await open_fast_websocket(url)
            assert isinstance(transport, FastTransport)
            async with asyncio.timeout(TIMEOUT):
                while not transport._reading_paused:  # noqa: ASYNC110 - nobody calls recv()
                    await asyncio.sleep(MS)
            paused = transport._reading_paused
            frames = [await recv(transport) for _ in range(count)]
            await transport.close(1000, "")
            return paused, frames

    paused, frames = run(body())
    assert paused
    assert [f[:4] for f in frames] == [f"{i:04d}" for i in range(count)]
