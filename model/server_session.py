"""The server side of one ``/ws/client`` connection, pure: time and ids in, actions out.

Everything docs/protocol.md (Server) decides about a connection lives here: which path is
which endpoint, the query checks and their close codes, the hello, the ping schedule, the
dead-client rule, the reply to each message type, and what the legacy echo answers. A runtime
(the websockets server in ``steadysocket.runtime.server``, or an ASGI adapter) is a pump:

1. :func:`match_route` on the request target: :class:`ClientRoute`, :class:`LegacyRoute`, or
   ``None`` (HTTP 404).
2. For ``/ws/client``, accept the upgrade first, then call :meth:`ServerSession.open`. It returns
   the hello, or the :class:`Close` that refuses the connection.
3. Feed every frame to :meth:`ServerSession.receive_text` or :meth:`ServerSession.receive_bytes`,
   and call :meth:`ServerSession.handle_timer` whenever :meth:`ServerSession.next_deadline`
   passes. Carry out the returned actions in order:

   - :class:`SendText`: send a text frame;
   - :class:`Close`: close the WebSocket with that code and reason;
   - :class:`Deliver`: hand the message to the application's handler for its ``type``.

4. :meth:`ServerSession.connection_lost` when the socket ends, :meth:`ServerSession.shutdown`
   when the server stops.

Time is always an input: ``now`` is monotonic seconds (any origin; it only schedules) and
``wall`` an aware datetime for timestamps on the wire. A session costs a few attributes to
build, so a server can afford one per connection; the connection lifecycle machine in
:mod:`steadysocket.model.lifecycle` is deliberately not used here.

Exceptions::

    ValueError
     └── ConfigError            .variable, .value: a bad setting, named
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Final, TypeGuard
from urllib.parse import unquote

from steadysocket.model.delivery import Inbound, ResumeOutcome, SessionStore
from steadysocket.model.delivery import ServerSession as DeliverySession
from steadysocket.model.protocol import (
    Accept,
    CloseCode,
    Echo,
    ErrorCode,
    HelloSession,
    MessageType,
    ProtocolError,
    Status,
    ack_text,
    decode_text,
    encode,
    format_timestamp,
    make_error,
    make_hello,
    make_pong,
    reply_error_text,
    reply_text,
    truncate_reason,
    validate_query,
)

__all__ = [
    "AUTH_EXPIRED_REASON",
    "AUTH_REFUSED_REASON",
    "CLIENT_PATH",
    "DEFAULT_CONNECTION_TIMEOUT_MS",
    "DEFAULT_GC_FREEZE_INTERVAL_MS",
    "DEFAULT_GC_GEN0_THRESHOLD",
    "DEFAULT_GC_UNFREEZE_MIN_CLOSED",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MAX_OUTBOX_BYTES",
    "DEFAULT_RATE_LIMIT_WINDOW_MS",
    "ENV_CONNECTION_TIMEOUT_MS",
    "ENV_HEARTBEAT_INTERVAL_MS",
    "HANDSHAKE_ERROR",
    "HEARTBEAT_TIMEOUT",
    "MAX_CLOSE_TIMEOUT_MS",
    "MAX_INTERVAL_MS",
    "MAX_REPLY_ERROR_CHARS",
    "MESSAGE_TOO_BIG",
    "ORIGIN_FORBIDDEN",
    "OUTBOX_OVERFLOW",
    "RATE_LIMITED",
    "SERVER_FULL",
    "SESSION_LOST",
    "SESSION_RESUMED_ELSEWHERE",
    "SESSION_STORE_UNAVAILABLE",
    "SHUTDOWN",
    "UNSUPPORTED_LEGACY_DATA",
    "UPGRADE_REQUIRED",
    "Action",
    "ClientRoute",
    "Close",
    "CloseRecord",
    "ConfigError",
    "Deliver",
    "GcPolicy",
    "GcStep",
    "HttpRefusal",
    "LegacyRoute",
    "Outbox",
    "SendText",
    "ServerConfig",
    "ServerSession",
    "SessionState",
    "TokenBucket",
    "admit",
    "encode_server_message",
    "gc_step",
    "is_sendable_close_code",
    "legacy_echo",
    "legacy_reply",
    "match_route",
    "normalize_origins",
    "origin_allowed",
    "select_subprotocol",
    "utf8_size",
]


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendText:
    """Send ``text`` in a text frame."""

    text: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with ``code`` and ``reason`` (at most 123 UTF-8 bytes).

    ``code`` is a :class:`CloseCode` for the protocol's own closes; an application may close
    with any code a server may send.
    """

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand ``message`` to the application's handler for ``message["type"]``.

    The dict is the decoded frame (in v2 without its ``id``); the session keeps no reference to
    it. ``msg_id`` is the message's ``id`` in a v2 session: before running the handler the
    runtime asks :meth:`ServerSession.check_id`, after it :meth:`ServerSession.handled`.
    ``reply_to`` is the request id (docs/protocol.md v2 point 8): the handler's return value is
    answered with :meth:`ServerSession.reply` (v1: a message with an integer ``id``; v2: every
    application message).
    """

    message: dict[str, Any] = field(hash=False)
    msg_id: int | None = None
    reply_to: int | None = None

    @property
    def type(self) -> str:
        """The message's ``type``, always a non-empty string."""
        kind: str = self.message["type"]
        return kind


Action = SendText | Close | Deliver
"""What a session asks its runtime to do."""

HANDSHAKE_ERROR: Final = Close(CloseCode.HANDSHAKE_ERROR, "Server handshake error")
"""Any exception while accepting or sending the hello (PROTOCOL Server 2)."""

HEARTBEAT_TIMEOUT: Final = Close(CloseCode.INTERNAL_ERROR, "heartbeat timeout")
"""Nothing arrived within the connection timeout after a ping (PROTOCOL Server 4)."""

MESSAGE_TOO_BIG: Final = Close(CloseCode.MESSAGE_TOO_BIG, "Message too big")
"""A frame over ``max_message_bytes`` (PROTOCOL Server 5)."""

SHUTDOWN: Final = Close(CloseCode.GOING_AWAY, "Server shutting down")
"""Graceful shutdown (PROTOCOL Server 6)."""

UNSUPPORTED_LEGACY_DATA: Final = Close(1003, "Text frames only")
"""The legacy echo's answer to a binary frame: 1003 (unsupported data) is RFC 6455's code."""

SESSION_RESUMED_ELSEWHERE: Final = Close(CloseCode.NORMAL, "Session resumed elsewhere")
"""A v2 connection whose session was resumed by a newer connection (the server had not yet
noticed the old one die): never two connections on one session. 1000, so a client that still
holds this connection goes idle instead of resuming again (two holders would take the session
from each other forever); the client that resumed is on the new connection."""

SESSION_STORE_UNAVAILABLE: Final = Close(1013, "Session store unreachable: try again")
"""Shared v2 sessions (``model/ledger.py``): the store cannot be reached to open or claim the
session, so the hello cannot promise anything yet. 1013 (try again later): the client retries."""

SESSION_LOST: Final = Close(1013, "Session lost by the store: resume to start again")
"""Shared v2 sessions: the store no longer holds the session (it expired, or the store restarted
empty). The client resumes and is told ``resumed: false``; its unacknowledged messages are
handed back to it."""

OUTBOX_OVERFLOW: Final = Close(1013, "Outbox full: resume to receive the rest")
"""A v2 connection's outbox refused a numbered message: the message is in the session's
history, so rather than leave a silent gap the connection is closed with 1013 (Try Again
Later, retryable), and the client's resume replays everything it has not acknowledged."""

MAX_REPLY_ERROR_CHARS: Final = 500
"""A failed request's ``error.message`` is cut to this many characters."""

RATE_LIMITED: Final = Close(4429, "Rate limit exceeded")
"""A client sent frames faster than ``rate_limit_messages`` per ``rate_limit_window_ms``.

4429 mirrors HTTP 429 in the private range. Not 1008: a steadysocket client treats 1008 as a
rejected query and stops for good, while a client that was merely too fast may come back after
its backoff. ``classify`` files it under ``unknown``, retryable, so the client waits one backoff
step before it reconnects (never an immediate retry)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

ENV_HEARTBEAT_INTERVAL_MS: Final = "WS_HEARTBEAT_INTERVAL_MS"
ENV_CONNECTION_TIMEOUT_MS: Final = "WS_CONNECTION_TIMEOUT_MS"
DEFAULT_HEARTBEAT_INTERVAL_MS: Final = 25_000
DEFAULT_CONNECTION_TIMEOUT_MS: Final = 30_000
DEFAULT_MAX_MESSAGE_BYTES: Final = 1 << 20
DEFAULT_RATE_LIMIT_WINDOW_MS: Final = 1000
DEFAULT_MAX_OUTBOX_BYTES: Final = 4 << 20

MAX_INTERVAL_MS: Final = 2**31 - 1
"""Largest accepted interval or timeout: a browser's ``setTimeout`` overflows above it, and a
client arms its own timers from the hello's ``heartbeat_interval_ms``."""

MAX_CLOSE_TIMEOUT_MS: Final = 10_000
"""The close timeout is the connection timeout, but never more than this."""

_DIGITS = re.compile(r"[0-9]+")


class ConfigError(ValueError):
    """A setting is malformed; ``variable`` names the env var or argument, ``value`` is as given."""

    def __init__(self, variable: str, value: object, expected: str) -> None:
        self.variable = variable
        self.value = value
        super().__init__(f"{variable} must be {expected}, got {value!r}")


def _check_positive(name: str, value: object, maximum: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    if ok and maximum is not None:
        assert isinstance(value, int)
        ok = value <= maximum
    if not ok:
        expected = "a positive integer" + (f" no larger than {maximum}" if maximum else "")
        raise ConfigError(name, value, expected)


def _from_environ(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        # Set-but-empty means unset, as `VAR= command` and compose files commonly produce it.
        return None
    text = raw.strip()
    if _DIGITS.fullmatch(text) is None or len(text) > 12:
        raise ConfigError(name, raw, f"a positive integer of milliseconds (1..{MAX_INTERVAL_MS})")
    value = int(text)
    if not 0 < value <= MAX_INTERVAL_MS:
        raise ConfigError(name, raw, f"a positive integer of milliseconds (1..{MAX_INTERVAL_MS})")
    return value


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Server settings. Construction validates them.

    Attributes:
        heartbeat_interval_ms: how often the server pings, announced in the hello.
        connection_timeout_ms: how long a client may stay silent after a ping before it is closed
            with 1011; it also bounds the opening handshake and every send.
        max_message_bytes: largest frame accepted from a client; a larger one closes with 1009.
        allowed_origins: the ``Origin`` values a browser may connect from (``scheme://host[:port]``,
            compared case-insensitively); an upgrade from any other origin gets HTTP 403. A
            request without ``Origin`` (not a browser) is allowed. ``None``: any origin.
        max_connections: how many WebSocket connections may be open at once; an upgrade beyond
            that gets HTTP 503. ``None``: no cap.
        rate_limit_messages: how many frames a connection may send per ``rate_limit_window_ms``
            (a token bucket: bursts up to this many, refilled evenly over the window); a faster
            client is closed with 4429 ``Rate limit exceeded``. ``None``: no limit.
        rate_limit_window_ms: the window of the rate limit (1000 ms by default).
        max_outbox_bytes: how many bytes of messages (UTF-8) may wait, per connection, to be
            written to the client (4 MiB by default). A push that does not fit is refused (see
            :class:`Outbox`); the connection stays open.

    Raises:
        ConfigError: a value is not a positive integer (intervals at most :data:`MAX_INTERVAL_MS`),
            or ``allowed_origins`` is not a collection of strings.
    """

    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    connection_timeout_ms: int = DEFAULT_CONNECTION_TIMEOUT_MS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    allowed_origins: frozenset[str] | None = None
    max_connections: int | None = None
    rate_limit_messages: int | None = None
    rate_limit_window_ms: int = DEFAULT_RATE_LIMIT_WINDOW_MS
    max_outbox_bytes: int = DEFAULT_MAX_OUTBOX_BYTES

    def __post_init__(self) -> None:
        _check_positive("heartbeat_interval_ms", self.heartbeat_interval_ms, MAX_INTERVAL_MS)
        _check_positive("connection_timeout_ms", self.connection_timeout_ms, MAX_INTERVAL_MS)
        _check_positive("max_message_bytes", self.max_message_bytes, None)
        if self.max_connections is not None:
            _check_positive("max_connections", self.max_connections, None)
        if self.rate_limit_messages is not None:
            _check_positive("rate_limit_messages", self.rate_limit_messages, None)
        _check_positive("rate_limit_window_ms", self.rate_limit_window_ms, MAX_INTERVAL_MS)
        _check_positive("max_outbox_bytes", self.max_outbox_bytes, None)
        if self.allowed_origins is not None:
            if isinstance(self.allowed_origins, str) or not all(
                isinstance(o, str) for o in self.allowed_origins
            ):
                raise ConfigError(
                    "allowed_origins", self.allowed_origins, "a collection of origin strings"
                )
            # Stored normalised, so a comparison is one set lookup.
            object.__setattr__(self, "allowed_origins", normalize_origins(self.allowed_origins))

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str],
        *,
        heartbeat_interval_ms: int | None = None,
        connection_timeout_ms: int | None = None,
        max_message_bytes: int | None = None,
        allowed_origins: Iterable[str] | None = None,
        max_connections: int | None = None,
        rate_limit_messages: int | None = None,
        rate_limit_window_ms: int | None = None,
        max_outbox_bytes: int | None = None,
    ) -> ServerConfig:
        """Build a config: an explicit argument wins, then the environment, then the default.

        ``None`` means "not given". ``environ`` is passed in (normally ``os.environ``) so the
        model reads nothing itself. An empty variable counts as unset. The security settings
        (origins, connection cap, rate limit) have no variables; they are off unless given.

        Raises:
            ConfigError: a variable or argument is malformed; the message names it and the value.
        """
        if heartbeat_interval_ms is None:
            heartbeat_interval_ms = _from_environ(environ, ENV_HEARTBEAT_INTERVAL_MS)
        if connection_timeout_ms is None:
            connection_timeout_ms = _from_environ(environ, ENV_CONNECTION_TIMEOUT_MS)
        if isinstance(allowed_origins, str):
            raise ConfigError("allowed_origins", allowed_origins, "a collection of origin strings")
        return cls(
            heartbeat_interval_ms=(
                DEFAULT_HEARTBEAT_INTERVAL_MS
                if heartbeat_interval_ms is None
                else heartbeat_interval_ms
            ),
            connection_timeout_ms=(
                DEFAULT_CONNECTION_TIMEOUT_MS
                if connection_timeout_ms is None
                else connection_timeout_ms
            ),
            max_message_bytes=(
                DEFAULT_MAX_MESSAGE_BYTES if max_message_bytes is None else max_message_bytes
            ),
            allowed_origins=None if allowed_origins is None else frozenset(allowed_origins),
            max_connections=max_connections,
            rate_limit_messages=rate_limit_messages,
            rate_limit_window_ms=(
                DEFAULT_RATE_LIMIT_WINDOW_MS
                if rate_limit_window_ms is None
                else rate_limit_window_ms
            ),
            max_outbox_bytes=(
                DEFAULT_MAX_OUTBOX_BYTES if max_outbox_bytes is None else max_outbox_bytes
            ),
        )

    @property
    def rate_limit_window(self) -> float:
        """The rate limit's window in seconds."""
        return self.rate_limit_window_ms / 1000

    def new_bucket(self, now: float) -> TokenBucket | None:
        """A full rate-limit bucket for a new connection, or ``None`` when there is no limit."""
        if self.rate_limit_messages is None:
            return None
        return TokenBucket(self.rate_limit_messages, self.rate_limit_window, now)

    @property
    def close_timeout(self) -> float:
        """How long a closing handshake may take before the connection is aborted (seconds).

        The connection timeout, at most 10 s: a shutdown waits this long for its connections.
        """
        return min(self.connection_timeout, MAX_CLOSE_TIMEOUT_MS / 1000)

    @property
    def heartbeat_interval(self) -> float:
        """The heartbeat interval in seconds."""
        return self.heartbeat_interval_ms / 1000

    @property
    def connection_timeout(self) -> float:
        """The connection timeout in seconds."""
        return self.connection_timeout_ms / 1000


# --------------------------------------------------------------------------------------------
# Garbage collection
# --------------------------------------------------------------------------------------------

DEFAULT_GC_FREEZE_INTERVAL_MS: Final = 1000
DEFAULT_GC_GEN0_THRESHOLD: Final = 20_000
DEFAULT_GC_UNFREEZE_MIN_CLOSED: Final = 1000


@dataclass(frozen=True, slots=True)
class GcPolicy:
    """How a server manages CPython's cyclic garbage collector while it runs.

    A server holding thousands of connections keeps about a hundred GC-tracked objects per
    connection alive for as long as the connection lasts. CPython's full collections walk every
    one of them: at 5,000 connections a full collection pauses the event loop for about 0.4 s,
    and every ping due meanwhile is that late. The policy keeps them out of the collector's way:

    - every ``freeze_interval_ms`` in which connections were opened, the server collects the
      young generations (``gc.collect(1)``, bounded by their thresholds, so recent cyclic
      garbage is reclaimed rather than frozen) and calls :func:`gc.freeze`, which moves every
      object still tracked into the permanent generation (an O(1) list splice): long-lived
      connection state is never scanned again;
    - ``gen0_threshold`` replaces generation 0's threshold (CPython's default is 700), so the
      young collections that still run are rarer; each scans at most that many objects;
    - frozen objects that later become cyclic garbage (a closed connection's task, futures and
      exceptions) are not reclaimed while frozen. Once ``max(unfreeze_min_closed, open
      connections)`` connections have closed since the last unfreeze, the server calls
      :func:`gc.unfreeze`, so the collector's next full collection (one pause) reclaims them.
      Memory therefore stays bounded under churn, at the cost of one full collection per
      turnover of the connection set.

    The collector is process-wide: when several servers of one process run at once, the
    settings are applied while the first runs and the previous thresholds come back (and the
    permanent generation is unfrozen) when the last one closes. ``None`` for either setting
    leaves that part alone; pass ``gc_policy=None`` to a server to leave the collector alone.

    Raises:
        ConfigError: a setting is not a positive integer.
    """

    freeze_interval_ms: int | None = DEFAULT_GC_FREEZE_INTERVAL_MS
    gen0_threshold: int | None = DEFAULT_GC_GEN0_THRESHOLD
    unfreeze_min_closed: int = DEFAULT_GC_UNFREEZE_MIN_CLOSED

    def __post_init__(self) -> None:
        if self.freeze_interval_ms is not None:
            _check_positive("gc_freeze_interval_ms", self.freeze_interval_ms, MAX_INTERVAL_MS)
        if self.gen0_threshold is not None:
            _check_positive("gc_gen0_threshold", self.gen0_threshold, None)
        _check_positive("gc_unfreeze_min_closed", self.unfreeze_min_closed, None)

    @property
    def freeze_interval(self) -> float | None:
        """The freeze interval in seconds, or None when the server does not freeze."""
        return None if self.freeze_interval_ms is None else self.freeze_interval_ms / 1000


class GcStep(Enum):
    """What the server does to the collector at one tick of its GC timer."""

    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    NOTHING = "nothing"


def gc_step(
    policy: GcPolicy,
    *,
    open_connections: int,
    opened_since_freeze: int,
    closed_since_unfreeze: int,
) -> GcStep:
    """The step due at one tick (see :class:`GcPolicy`): unfreeze once a connection set's worth
    of connections (at least ``unfreeze_min_closed``) closed since the last unfreeze; else
    freeze if connections opened since the last freeze (their state is what is worth freezing);
    else nothing, so a server whose connections do not change pays nothing."""
    if closed_since_unfreeze >= max(policy.unfreeze_min_closed, open_connections):
        return GcStep.UNFREEZE
    if opened_since_freeze > 0:
        return GcStep.FREEZE
    return GcStep.NOTHING


# --------------------------------------------------------------------------------------------
# Admission: origins, and the per-connection rate limit
# --------------------------------------------------------------------------------------------


def normalize_origins(origins: Iterable[str]) -> frozenset[str]:
    """Origins as compared: stripped and lower-cased (scheme and host are case-insensitive)."""
    return frozenset(origin.strip().lower() for origin in origins)


def origin_allowed(values: Sequence[str], allowed: frozenset[str] | None) -> bool:
    """Whether an upgrade carrying these ``Origin`` header values may proceed.

    ``allowed`` is :attr:`ServerConfig.allowed_origins` (normalised); ``None`` allows all.
    Otherwise: no ``Origin`` at all is allowed (only browsers send it, and a cross-site page
    cannot suppress it); exactly one value must be in ``allowed`` (``null``, sent by sandboxed
    frames and ``file:`` pages, only if listed); several ``Origin`` headers are refused.
    """
    if allowed is None or not values:
        return True
    if len(values) != 1:
        return False
    return values[0].strip().lower() in allowed


@dataclass(frozen=True, slots=True)
class HttpRefusal:
    """Answer the upgrade request with this HTTP ``status`` and plain-text ``body``."""

    status: int
    body: str


ORIGIN_FORBIDDEN: Final = HttpRefusal(403, "Origin not allowed\n")
"""The request's ``Origin`` is not in :attr:`ServerConfig.allowed_origins`."""

SERVER_FULL: Final = HttpRefusal(503, "Too many connections\n")
""":attr:`ServerConfig.max_connections` connections are already open."""

UPGRADE_REQUIRED: Final = HttpRefusal(426, "Upgrade Required\n")
"""A plain HTTP request (no ``Upgrade: websocket``) for one of the WebSocket paths. Sent with an
``Upgrade: websocket`` header; every other path is 404 whatever the request."""


def admit(
    config: ServerConfig, origins: Sequence[str], open_connections: int
) -> HttpRefusal | None:
    """Whether an upgrade request may proceed: ``None``, or the HTTP answer refusing it.

    ``origins`` are the request's ``Origin`` header values; ``open_connections`` how many
    WebSocket connections the server has open besides this one. These checks run before the
    upgrade, unlike the query checks: a browser must not open a socket from a foreign origin at
    all, and a full server must not spend a connection saying so. The origin is checked first,
    since its answer never changes on retry (403); a full server answers 503, which a client
    retries after its backoff.
    """
    if not origin_allowed(origins, config.allowed_origins):
        return ORIGIN_FORBIDDEN
    cap = config.max_connections
    if cap is not None and open_connections >= cap:
        return SERVER_FULL
    return None


class TokenBucket:
    """A token bucket: ``capacity`` tokens, refilled at ``capacity`` per ``window`` seconds.

    Pure: time comes in as ``now`` (monotonic seconds). :meth:`take` spends one token and says
    whether there was one, so a client may burst ``capacity`` frames and then keep to the rate.

    Between :meth:`pause` and :meth:`resume` the server is not reading (its application has not
    taken what was read), so frames the client sent meanwhile are read later in a burst. The
    bucket credits the paused time in full, above ``capacity``: a client keeping to the rate is
    never closed because the server was slow to read it. The credit above capacity is spent
    first and never refilled.
    """

    __slots__ = ("_paused_at", "_rate", "_updated", "capacity", "tokens")

    def __init__(self, capacity: int, window: float, now: float) -> None:
        self.capacity = float(capacity)
        self._rate = capacity / window
        self.tokens = float(capacity)
        self._updated = now
        self._paused_at: float | None = None

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            if self.tokens < self.capacity:
                self.tokens = min(self.capacity, self.tokens + elapsed * self._rate)
            self._updated = now

    def take(self, now: float) -> bool:
        """Spend one token at ``now``; False when the bucket is empty (the frame is too many)."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def pause(self, now: float) -> None:
        """The server stops reading at ``now`` (until :meth:`resume`); idempotent."""
        if self._paused_at is None:
            self._refill(now)
            self._paused_at = now

    def resume(self, now: float) -> None:
        """The server reads again: credit the paused time at the full rate, above capacity."""
        if self._paused_at is None:
            return
        paused = max(0.0, now - self._paused_at)
        self._paused_at = None
        self._refill(now - paused)
        self.tokens += paused * self._rate
        self._updated = max(self._updated, now)


# --------------------------------------------------------------------------------------------
# Routing and the legacy echo
# --------------------------------------------------------------------------------------------

CLIENT_PATH: Final = "/ws/client"


@dataclass(frozen=True, slots=True)
class ClientRoute:
    """The canonical endpoint; ``query`` is the raw query string, without ``?``."""

    query: str


@dataclass(frozen=True, slots=True)
class LegacyRoute:
    """The legacy ``/ws/{client_id}`` echo; ``client_id`` is the percent-decoded segment."""

    client_id: str


def match_route(target: str) -> ClientRoute | LegacyRoute | None:
    """Map a request target (path and optional query) to an endpoint; ``None`` means HTTP 404.

    The path is split on ``/`` first, then each segment is percent-decoded exactly once, so
    ``/ws/%63lient`` is ``/ws/client`` (never the legacy echo of a client called ``client``),
    while ``%2F`` inside a segment stays part of it. Every adapter passes the target as it
    arrived on the wire (``raw_path`` under ASGI), so both decode the same way.

    ``/ws/client`` is matched first, so the legacy route can never shadow it (the origin's route
    order did). The legacy route takes exactly one non-empty segment: ``/ws/abc`` matches,
    ``/ws/``, ``/ws/a/b`` and ``/ws/client/`` do not. No slash collapsing or case folding.
    """
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    segments = [unquote(segment, errors="replace") for segment in path.split("/")]
    if len(segments) == 3 and segments[0] == "" and segments[1] == "ws":
        if segments[2] == "client":
            return ClientRoute(query.partition("#")[0])
        if segments[2]:
            return LegacyRoute(segments[2])
    return None


def legacy_echo(text: str) -> SendText:
    """The legacy endpoint's reply to a text frame: ``Echo: <text>``, as the origin sent it."""
    return SendText(f"Echo: {text}")


def legacy_reply(data: str | bytes, max_message_bytes: int) -> SendText | Close:
    """The legacy endpoint's answer to one frame: the echo, 1009 when it is over
    ``max_message_bytes`` (checked first, as for ``/ws/client``), 1003 for a binary frame."""
    if isinstance(data, bytes):
        if len(data) > max_message_bytes:
            return MESSAGE_TOO_BIG
        return UNSUPPORTED_LEGACY_DATA
    if _utf8_length_exceeds(data, max_message_bytes):
        return MESSAGE_TOO_BIG
    return legacy_echo(data)


def utf8_size(text: str) -> int:
    """The UTF-8 length of ``text``, counted without encoding it when it is ASCII."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


class Outbox:
    """What the server has pushed to one connection and not yet written to it.

    A FIFO of text frames bounded in UTF-8 bytes by ``limit``
    (:attr:`ServerConfig.max_outbox_bytes`). A push never waits: :meth:`offer` queues the text
    and returns True, or refuses it and returns False. The policy:

    - a text that fits (queued bytes + its size <= ``limit``) is queued;
    - into an empty outbox any one text is queued, however large, so a message the server may
      send at all can always be sent to a client that keeps up;
    - anything else is refused and counted (:attr:`refused`); what is queued stays, in order,
      and the connection stays open. The caller learns it from the False (``send()`` returns
      it, ``broadcast()`` does not count that client).

    Memory per connection therefore stays below ``limit`` plus one message, whatever the client
    does. A client that stops reading altogether is not this class's business: the writer
    bounds each frame's write by the connection timeout and aborts the connection past it.

    After :meth:`seal` (the connection is closing) every offer is refused, uncounted.
    """

    __slots__ = ("_items", "limit", "queued_bytes", "refused", "sealed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[tuple[str, int]] | None = None
        """Created on the first offer: an empty deque costs about 600 bytes, and most
        connections' outboxes never hold anything (their frames are written at once)."""
        self.queued_bytes = 0
        """The UTF-8 bytes waiting."""
        self.refused = 0
        """How many offers did not fit."""
        self.sealed = False
        """True once :meth:`seal` was called: no more offers are taken."""

    def __len__(self) -> int:
        return 0 if self._items is None else len(self._items)

    def offer(self, text: str) -> bool:
        """Queue ``text`` if it fits; False if it does not (see the class) or the box is sealed."""
        if self.sealed:
            return False
        size = utf8_size(text)
        items = self._items
        if items is None:
            items = self._items = deque()
        elif items and self.queued_bytes + size > self.limit:
            self.refused += 1
            return False
        items.append((text, size))
        self.queued_bytes += size
        return True

    def put(self, text: str) -> bool:
        """Queue ``text`` whatever the limit (False only once sealed, uncounted).

        For texts the server holds anyway, so queuing them costs no copy: a v2 replay, whose
        texts stay in the session's history until the client acknowledges them.
        """
        if self.sealed:
            return False
        if self._items is None:
            self._items = deque()
        size = utf8_size(text)
        self._items.append((text, size))
        self.queued_bytes += size
        return True

    def take(self) -> str | None:
        """The oldest queued text, removed; None when empty."""
        if not self._items:
            return None
        text, size = self._items.popleft()
        self.queued_bytes -= size
        return text

    def clear(self) -> int:
        """Drop everything queued; returns how many texts were dropped."""
        dropped = len(self)
        if self._items is not None:
            self._items.clear()
        self.queued_bytes = 0
        return dropped

    def seal(self) -> None:
        """Refuse every later offer (what is queued stays, to be flushed before the close)."""
        self.sealed = True


class CloseRecord:
    """How a connection ended, as ``on_disconnect`` and ``Client.close_code`` report it.

    The first close of the connection wins, whichever side made it:

    - the server decided to close (its own protocol close, the application's
      ``client.close()``, shutdown): the code and reason it closed with, even if
      the client never answered or the close frame could not be written;
    - the client's close frame arrived first: its code and reason (1005 if it had no code);
    - neither, and the connection was lost (TCP reset or EOF, a write stalled past the
      connection timeout and aborted): 1006.

    Every transport adapter feeds the same three events, so both adapters give one answer for
    one input.
    """

    __slots__ = ("code", "reason")

    def __init__(self) -> None:
        self.code: int | None = None
        """The code decided so far; None while nothing has happened."""
        self.reason = ""

    def server_closed(self, code: int, reason: str) -> bool:
        """The server starts closing; False if the connection had already ended or closed."""
        return self._first(code, reason)

    def peer_closed(self, code: int, reason: str) -> bool:
        """The client's close frame arrived; False if something came first."""
        return self._first(code, reason)

    def lost(self) -> bool:
        """The connection ended without a close frame either way; False if something came first."""
        return self._first(CloseCode.ABNORMAL, "")

    def _first(self, code: int, reason: str) -> bool:
        if self.code is not None:
            return False
        self.code = int(code)
        self.reason = reason
        return True


def encode_server_message(message: Mapping[str, Any], wall: datetime) -> str:
    """Encode an application message the server sends, adding ``timestamp`` if it has none.

    PROTOCOL Server 3: every server message besides the hello carries a timestamp. The message
    must have a non-empty string ``type``.

    Raises:
        ValueError: no string ``type``; or a value is NaN, infinite or circular.
        TypeError: a value is not JSON-serializable.
    """
    kind = message.get("type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a server message needs a non-empty string 'type', got {kind!r}")
    if "timestamp" in message:
        return encode(message)
    return encode({**message, "timestamp": format_timestamp(wall)})


# --------------------------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------------------------


class SessionState(Enum):
    """Where a session is: before :meth:`~ServerSession.open`, open, or done."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


_NO_ACTIONS: Final[list[Action]] = []
_BINARY_TEXT = "binary frames are not supported; send JSON text frames"


AUTH_REFUSED_REASON: Final = "Authentication failed"
"""The reason of a 4403 refusal (:meth:`ServerSession.refuse`) when the hook gave none."""

AUTH_EXPIRED_REASON: Final = "Token expired"
"""The reason of a 4419 refusal (:meth:`ServerSession.refuse`) when the hook gave none."""


def select_subprotocol(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """The subprotocol a server answers with: the first of its ``supported`` ones (its order of
    preference) that the client ``offered``; None when they share none.

    Never a refusal: a client that offers none (a browser of the seed) is served without a
    subprotocol, and an ``authenticate`` hook that needs one refuses with a close code
    (``client.subprotocol`` is None), which every client can read, unlike an HTTP 400.
    """
    for name in supported:
        if name in offered:
            return name
    return None


def _utf8_length_exceeds(text: str, limit: int) -> bool:
    # len(text) <= UTF-8 length <= 4 * len(text): encode only when the bounds disagree.
    if len(text) > limit:
        return True
    if 4 * len(text) <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


class ServerSession:
    """One ``/ws/client`` connection's protocol state. See the module docstring for the pump.

    Every method returns a new list of actions (possibly empty) and never raises for anything
    the peer sends. After a :class:`Close` action the session is :attr:`SessionState.CLOSED`
    and ignores further input.

    Args:
        config: the server's settings; only the heartbeat interval, the connection timeout and
            the message size limit are read.
    """

    __slots__ = (
        "_bucket",
        "_checked",
        "_client_id_json",
        "_config",
        "_dead_at",
        "_held",
        "_interval",
        "_last_heartbeat",
        "_next_ping_at",
        "_opened_at",
        "_timeout",
        "client_id",
        "delivery",
        "heartbeat_count",
        "request_id",
        "resume_outcome",
        "role",
        "state",
        "version",
    )

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._interval = config.heartbeat_interval
        self._timeout = config.connection_timeout
        self.state = SessionState.NEW
        self.client_id = ""
        """The validated ``client_id``; empty until :meth:`open` accepts."""
        self.role = ""
        """The validated role, as a string; empty until :meth:`open` accepts."""
        self.version = 0
        """The accepted protocol version; 0 until :meth:`open` accepts."""
        self.request_id = ""
        """The hello's ``request_id``."""
        self.heartbeat_count = 0
        """How many pings have been sent; the next ping carries this number."""
        self._opened_at = 0.0
        self._next_ping_at = 0.0
        self._dead_at: float | None = None
        self._last_heartbeat: str | None = None
        self._bucket: TokenBucket | None = None
        self._held = False
        self._client_id_json = '""'
        self.delivery: DeliverySession | None = None
        """v2: the delivery session this connection carries (``model/delivery.py``); shared
        with the connection that resumes it. None in v1."""
        self.resume_outcome: ResumeOutcome | None = None
        """v2: what became of the session asked for when this connection opened."""
        self._checked: Accept | None = None
        """The query :meth:`check` accepted, for :meth:`open` to use."""

    # ---- opening ---------------------------------------------------------------------------

    def open(
        self,
        query: str | Mapping[str, Sequence[str]],
        *,
        now: float,
        wall: datetime,
        request_id: str,
        sessions: SessionStore | None = None,
        new_session_id: str = "",
    ) -> list[Action]:
        """Validate the query of an accepted upgrade; answer with the hello or a refusal.

        Call it right after the WebSocket upgrade has been accepted, so that a refusal reaches
        the client as a close frame (PROTOCOL Server 1). Returns ``[SendText(hello)]`` and
        starts the ping schedule at ``now``, or ``[Close(code, reason)]`` (4400, 4401, 1008).

        Protocol v2 is accepted only with ``sessions``, the server's :class:`SessionStore`
        (without it ``version=2`` is refused with 4400, as a v1-only server does). A v2 client
        gets its session from :meth:`SessionStore.open` (``now`` in ms is its clock; a fresh
        session is named ``new_session_id``, a random token the caller drew): the hello carries
        its fields, and the actions after the hello are the replay, in order, which the runtime
        writes before anything else. :attr:`delivery` and :attr:`resume_outcome` tell the rest.

        After :meth:`check` accepted the query (a server that authenticates first), ``open``
        uses that decision instead of checking again.

        Raises:
            RuntimeError: the session was already opened; a bug in the runtime, not the peer.
        """
        if self.state is not SessionState.NEW:
            raise RuntimeError(f"open() on a session that is {self.state.value}")
        checked = self._checked
        if checked is not None and checked.version == 2 and sessions is None:
            raise RuntimeError("open() without sessions after check() accepted version 2")
        if checked is None:
            decision = validate_query(query, accept_v2=sessions is not None)
        else:
            decision = checked
        if not isinstance(decision, Accept):
            self.state = SessionState.CLOSED
            return [Close(decision.code, decision.reason)]
        hello_session: HelloSession | None = None
        replay: tuple[str, ...] = ()
        if decision.version == 2:
            assert sessions is not None  # validate_query refuses version 2 without a store
            opened = sessions.open(
                decision.client_id,
                str(decision.role),
                decision.resume,
                now_ms=now * 1000,
                new_session_id=new_session_id,
            )
            self.delivery, self.resume_outcome, replay = (
                opened.session,
                opened.outcome,
                opened.replay,
            )
            hello_session = HelloSession(
                session_id=opened.session.session_id,
                epoch=sessions.epoch,
                resumed=opened.resumed,
                max_message_bytes=self._config.max_message_bytes,
                resume_outcome=opened.outcome.value,
                replayed=len(replay),
            )
        hello = make_hello(
            now=wall,
            client_id=decision.client_id,
            request_id=request_id,
            heartbeat_interval_ms=self._config.heartbeat_interval_ms,
            version=decision.version,
            session=hello_session,
        )
        self.state = SessionState.OPEN
        self.client_id = decision.client_id
        self._client_id_json = json.dumps(decision.client_id)
        self.role = str(decision.role)
        self.version = decision.version
        self.request_id = request_id
        self._opened_at = now
        self._next_ping_at = now + self._interval
        self._bucket = self._config.new_bucket(now)
        return [SendText(hello.serialize()), *(SendText(text) for text in replay)]

    def check(
        self, query: str | Mapping[str, Sequence[str]], *, accept_v2: bool = True
    ) -> list[Action]:
        """The query checks of :meth:`open` alone, for a server that authenticates the client
        between the checks and the hello (``@server.authenticate``).

        Returns ``[]`` when the query passes: :attr:`client_id`, :attr:`role` and
        :attr:`version` are set, the session stays :attr:`SessionState.NEW`, and the runtime
        then calls :meth:`open` (same ``query``; ``sessions`` given when ``accept_v2``) or
        :meth:`refuse`. Otherwise ``[Close(code, reason)]``, as :meth:`open` would refuse.

        Raises:
            RuntimeError: the session was already checked or opened; a bug in the runtime.
        """
        if self.state is not SessionState.NEW or self._checked is not None:
            raise RuntimeError(f"check() on a session that is {self.state.value} or checked")
        decision = validate_query(query, accept_v2=accept_v2)
        if not isinstance(decision, Accept):
            self.state = SessionState.CLOSED
            return [Close(decision.code, decision.reason)]
        self._checked = decision
        self.client_id = decision.client_id
        self.role = str(decision.role)
        self.version = decision.version
        return []

    def refuse(self, reason: str = "", *, expired: bool = False) -> list[Action]:
        """The server's ``authenticate`` hook refused the client's credentials, before the hello.

        Closes with **4403** (``reason``, else ``Authentication failed``), which a client
        classifies as final (no retry), or with ``expired`` **4419** (else ``Token expired``),
        which it retries after one backoff step, with fresh credentials. The reason is cut to
        123 UTF-8 bytes. ``[]`` when the session is already closed.
        """
        if self.state is SessionState.CLOSED:
            return []
        self.state = SessionState.CLOSED
        if expired:
            return [Close(CloseCode.AUTH_EXPIRED, truncate_reason(reason or AUTH_EXPIRED_REASON))]
        return [Close(CloseCode.AUTH_REFUSED, truncate_reason(reason or AUTH_REFUSED_REASON))]

    def fail_handshake(self, close: Close = HANDSHAKE_ERROR) -> list[Action]:
        """The runtime failed while accepting or sending the hello: close with 4500 (or
        ``close``, such as :data:`SESSION_STORE_UNAVAILABLE`)."""
        if self.state is SessionState.CLOSED:
            return []
        self.state = SessionState.CLOSED
        return [close]

    @property
    def resume_query(self) -> dict[str, str]:
        """After :meth:`check` accepted a v2 query: its ``session_id``, ``epoch`` and ``offset``
        (those it gave); empty otherwise."""
        return {} if self._checked is None else dict(self._checked.resume)

    # ---- input -----------------------------------------------------------------------------

    def receive_text(self, text: str, *, now: float, wall: datetime) -> list[Action]:
        """A text frame arrived: reply per PROTOCOL Server 5.

        - ``ping`` → pong; ``pong`` → nothing (its arrival is the activity that counts);
          ``status`` → the status reply;
        - not JSON → error ``INVALID_JSON``; not an object, or no non-empty string ``type`` →
          error ``INVALID_MESSAGE``; the connection stays open;
        - over ``max_message_bytes`` → close 1009;
        - over the rate limit (any frame counts, malformed or not) → close 4429;
        - any other ``type`` → :class:`Deliver`; in v1 a message with an integer ``id`` is a
          request (``reply_to``) and keeps its ``id``.

        In v2 (docs/protocol.md, Protocol v2, points 3, 4, 8): ``ack`` is the client's
        cumulative ack of ``offset`` (trims the history; an offset never sent, or no
        non-negative integer ``offset``, is error ``INVALID_MESSAGE``); every other application
        message must carry an integer ``id`` >= 1 (else error ``INVALID_MESSAGE``, the message
        is dropped) and is delivered without it, with ``msg_id`` and ``reply_to`` set.

        Any frame, even a malformed one, counts as a sign of life for the dead-client rule.
        """
        if self.state is not SessionState.OPEN:
            return []
        self._dead_at = None
        if _utf8_length_exceeds(text, self._config.max_message_bytes):
            self.state = SessionState.CLOSED
            return [MESSAGE_TOO_BIG]
        if self._bucket is not None and not self._bucket.take(now):
            self.state = SessionState.CLOSED
            return [RATE_LIMITED]
        try:
            message = decode_text(text)
        except ProtocolError as exc:
            return [SendText(make_error(wall, exc.error_code, str(exc)).serialize())]
        kind = message["type"]
        if kind == MessageType.PING:
            return [SendText(make_pong(wall, self.client_id).serialize())]
        if kind == MessageType.PONG:
            return []
        if kind == MessageType.STATUS:
            return [SendText(self.status(now=now, wall=wall).serialize())]
        msg_id = message.get("id")
        if self.delivery is None:
            return [Deliver(message, reply_to=msg_id if _is_int(msg_id) else None)]
        if kind == "ack":
            return self._client_ack(message.get("offset"), wall)
        if not _is_int(msg_id) or msg_id < 1:
            problem = f"protocol v2: a {kind!r} message needs an integer 'id' >= 1, got {msg_id!r}"
            return [self._error(wall, _cut(problem))]
        del message["id"]
        return [Deliver(message, msg_id=msg_id, reply_to=msg_id)]

    def _client_ack(self, offset: object, wall: datetime) -> list[Action]:
        assert self.delivery is not None
        if not _is_int(offset) or offset < 0:
            problem = f"protocol v2: an ack needs an integer 'offset' >= 0, got {offset!r}"
            return [self._error(wall, _cut(problem))]
        if not self.delivery.client_acked(offset):
            last = self.delivery.next_offset - 1
            problem = f"protocol v2: ack of offset {offset}, but the last offset sent is {last}"
            return [self._error(wall, _cut(problem))]
        return []

    @staticmethod
    def _error(wall: datetime, problem: str) -> SendText:
        return SendText(make_error(wall, ErrorCode.INVALID_MESSAGE, problem).serialize())

    def receive_bytes(self, data: bytes, *, now: float, wall: datetime) -> list[Action]:
        """A binary frame arrived: error ``UNSUPPORTED_DATA``; stays open (1009 if oversize,
        4429 over the rate limit)."""
        if self.state is not SessionState.OPEN:
            return []
        self._dead_at = None
        if len(data) > self._config.max_message_bytes:
            self.state = SessionState.CLOSED
            return [MESSAGE_TOO_BIG]
        if self._bucket is not None and not self._bucket.take(now):
            self.state = SessionState.CLOSED
            return [RATE_LIMITED]
        error = make_error(wall, ErrorCode.UNSUPPORTED_DATA, _BINARY_TEXT)
        return [SendText(error.serialize())]

    def receive_control(self, *, now: float) -> list[Action]:
        """A protocol-level Ping arrived (the transport answers it): it counts against the rate
        limit like any frame (4429 when over) and is a sign of life."""
        if self.state is not SessionState.OPEN:
            return []
        self._dead_at = None
        if self._bucket is not None and not self._bucket.take(now):
            self.state = SessionState.CLOSED
            return [RATE_LIMITED]
        return []

    # ---- the server not reading -------------------------------------------------------------

    def hold(self, *, now: float) -> None:
        """The runtime stops reading at ``now``: the application has not yet taken the messages
        already read (its handler or ``on_connect`` hook is still running).

        While held, the client's silence is the server's doing, so the dead-client rule does not
        close it, and the rate limit credits the held time (:meth:`TokenBucket.pause`).
        """
        self._held = True
        if self._bucket is not None:
            self._bucket.pause(now)

    def release(self, *, now: float) -> None:
        """The runtime reads again. Frames were waiting to be read, so this counts as activity."""
        if not self._held:
            return
        self._held = False
        self._dead_at = None
        if self._bucket is not None:
            self._bucket.resume(now)

    @property
    def held(self) -> bool:
        """Whether the runtime is between :meth:`hold` and :meth:`release`."""
        return self._held

    # ---- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` has work next, in the ``now`` timescale; ``None`` if never.

        Calling :meth:`handle_timer` earlier is harmless; calling it late delays the work.
        """
        if self.state is not SessionState.OPEN:
            return None
        if self._dead_at is not None and self._dead_at < self._next_ping_at and not self._held:
            return self._dead_at
        return self._next_ping_at

    def handle_timer(self, *, now: float, wall: datetime) -> list[Action]:
        """Do what is due at ``now``: the dead-client close, or the next ping.

        Ping ``n`` (from 0) is due at ``opened + (n + 1) * interval``. A late call sends one ping
        and skips the slots it missed, so a stalled loop never bursts. After a ping, if nothing
        arrives within ``connection_timeout`` the next call closes with 1011
        ``heartbeat timeout``; the clock starts at the first ping not yet answered by any
        arrival, so each silent stretch is measured from its first ping.
        """
        if self.state is not SessionState.OPEN:
            return []
        if self._dead_at is not None and now >= self._dead_at and not self._held:
            self.state = SessionState.CLOSED
            return [HEARTBEAT_TIMEOUT]
        if now < self._next_ping_at:
            return []
        stamp = format_timestamp(wall)
        # The text of make_ping(...).serialize(), built without the dataclass, its dict and a
        # JSON encoding per ping: only the timestamp and the count change, and neither needs
        # escaping (the client_id was JSON-encoded once, at open). Tested byte for byte.
        text = (
            f'{{"type":"ping","timestamp":"{stamp}","heartbeat_count":{self.heartbeat_count},'
            f'"client_id":{self._client_id_json}}}'
        )
        self.heartbeat_count += 1
        self._last_heartbeat = stamp
        if self._dead_at is None:
            self._dead_at = now + self._timeout
        self._next_ping_at += self._interval
        if self._next_ping_at <= now:
            missed = (now - self._next_ping_at) // self._interval + 1
            self._next_ping_at += missed * self._interval
        return [SendText(text)]

    # ---- v2: ids in, acks out ---------------------------------------------------------------

    def check_id(self, action: Deliver, *, wall: datetime) -> tuple[Inbound, SendText | None]:
        """Whether to run the handler of a v2 message now (before each attempt to).

        ``DELIVER``: run it, then call :meth:`handled` (or :meth:`interrupted`).
        ``DUPLICATE``: already handled; do not run it, write the ack returned, at once.
        ``GAP``: an id was skipped; write the ``INVALID_MESSAGE`` error returned, drop it.
        ``BUSY``: a handler of this session (started on a connection it replaced) still runs;
        wait for it to return, then ask again. A v1 message (no ``msg_id``) is always DELIVER.
        """
        if self.delivery is None or action.msg_id is None:
            return Inbound.DELIVER, None
        verdict, ack = self.delivery.inbound(action.msg_id)
        if verdict is Inbound.DUPLICATE:
            assert ack is not None
            return verdict, self._ack(ack, wall)
        if verdict is Inbound.GAP:
            expected = self.delivery.last_handled + 1
            problem = f"protocol v2: id {action.msg_id} skips ids (expected {expected}); dropped"
            return verdict, self._error(wall, _cut(problem))
        return verdict, None

    def handled(self, action: Deliver, *, wall: datetime) -> SendText | None:
        """The handler of a v2 message returned (or raised): the ack to write now, after
        anything it sent, or None (batched: arm the ack timer if :attr:`ack_timer_wanted`)."""
        if self.delivery is None or action.msg_id is None:
            return None
        ack = self.delivery.handled(action.msg_id)
        return None if ack is None else self._ack(ack, wall)

    def interrupted(self, action: Deliver) -> None:
        """The handler of a v2 message was cancelled before it returned: not handled, so its
        re-send runs it."""
        if self.delivery is not None and action.msg_id is not None:
            self.delivery.interrupted(action.msg_id)

    @property
    def ack_timer_wanted(self) -> bool:
        """v2: an ack is owed and no timer runs for it: arm one for ``ack_interval_ms`` and
        call :meth:`ack_due` when it fires."""
        return self.delivery is not None and self.delivery.ids.timer_wanted

    def ack_timer_armed(self, armed: bool) -> None:
        """The runtime armed (True) or dropped (False) the ack timer."""
        if self.delivery is not None:
            self.delivery.ids.timer_armed = armed

    def ack_due(self, *, wall: datetime) -> SendText | None:
        """The ack timer fired: the ack to write, or None if nothing is owed."""
        if self.delivery is None:
            return None
        ack = self.delivery.ids.due()
        return None if ack is None else self._ack(ack, wall)

    @staticmethod
    def _ack(upto: int, wall: datetime) -> SendText:
        return SendText(ack_text("id", upto, format_timestamp(wall)))

    # ---- request / reply (docs/protocol.md, v2 point 8; both versions) ----------------------

    def reply(self, action: Deliver, result: object, *, wall: datetime) -> str | None:
        """The reply to a request whose handler returned ``result``, or None when none is due:
        the message was no request, or (v2) the handler returned None (the ack covering its
        id answers it). In v1 a request is always answered, ``"result": null`` included.

        Raises:
            TypeError, ValueError: ``result`` cannot be encoded as JSON (answer with
                :meth:`reply_error` instead).
        """
        if action.reply_to is None or (result is None and action.msg_id is not None):
            return None
        return reply_text(action.reply_to, result, format_timestamp(wall))

    def reply_error(self, action: Deliver, problem: str, *, wall: datetime) -> str | None:
        """The reply to a request whose handler raised (or returned what JSON cannot encode):
        ``{"type":"reply","id":N,"error":{"error_code":"HANDLER_ERROR","message":...}}``, the
        message cut to :data:`MAX_REPLY_ERROR_CHARS`; None when the message was no request."""
        if action.reply_to is None:
            return None
        if len(problem) > MAX_REPLY_ERROR_CHARS:
            problem = problem[: MAX_REPLY_ERROR_CHARS - 1] + "…"
        return reply_error_text(
            action.reply_to, ErrorCode.HANDLER_ERROR, problem, format_timestamp(wall)
        )

    # ---- replies the application asks for ---------------------------------------------------

    def status(self, *, now: float, wall: datetime) -> Status:
        """The status reply: uptime (ms precision), pings sent, the latest ping's timestamp."""
        return Status(
            connection_uptime_seconds=round(max(0.0, now - self._opened_at), 3),
            heartbeat_count=self.heartbeat_count,
            last_heartbeat=self._last_heartbeat,
            client_id=self.client_id,
            timestamp=format_timestamp(wall),
        )

    def echo(self, message: Mapping[str, Any], *, wall: datetime) -> SendText:
        """The default handler's reply: ``{"type":"echo","original_message",...}``."""
        reply = Echo(
            original_message=dict(message),
            timestamp=format_timestamp(wall),
            client_id=self.client_id,
        )
        return SendText(reply.serialize())

    # ---- ending ----------------------------------------------------------------------------

    def shutdown(self) -> list[Action]:
        """The server is stopping: close with 1001 ``Server shutting down`` if still open."""
        if self.state is not SessionState.OPEN:
            self.state = SessionState.CLOSED
            return []
        self.state = SessionState.CLOSED
        return [SHUTDOWN]

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> list[Action]:
        """The application closes the connection; ``reason`` is cut to 123 UTF-8 bytes.

        Raises:
            ValueError: ``code`` is not one a server may send (1000-1003, 1007-1014,
                3000-4999); that is the caller's mistake, not the peer's.
        """
        if not is_sendable_close_code(code):
            raise ValueError(f"a server cannot close with code {code!r}")
        if self.state is SessionState.CLOSED:
            return []
        self.state = SessionState.CLOSED
        return [Close(code, truncate_reason(reason))]

    def connection_lost(self) -> None:
        """The socket is gone, however it ended; the session stops scheduling."""
        self.state = SessionState.CLOSED


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but true/false is never an id or an offset.
    return isinstance(value, int) and not isinstance(value, bool)


_PROBLEM_LIMIT: Final = 200


def _cut(problem: str) -> str:
    """Bound an error text that quotes what the peer sent (an id of 4,000 digits)."""
    return problem if len(problem) <= _PROBLEM_LIMIT else problem[: _PROBLEM_LIMIT - 1] + "…"


def is_sendable_close_code(code: object) -> bool:
    """Whether a server may put ``code`` in a close frame (RFC 6455 §7.4)."""
    if not isinstance(code, int) or isinstance(code, bool):
        return False
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
