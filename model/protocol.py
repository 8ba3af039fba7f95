"""The `/ws/client` wire protocol, shared by the server and the client.

Every frame is a JSON object with a string ``type``. The system message types are:

============  =========  ======================================================================
``type``      direction  fields (besides ``type``)
============  =========  ======================================================================
``hello``     S → C      ``server_time``, ``accepted_version``, ``features``, ``request_id``,
                         ``client_id``, ``heartbeat_interval_ms`` (:class:`Hello`); in v2 also
                         ``session_id``, ``epoch``, ``resumed``, ``max_message_bytes`` and
                         ``resume_outcome``
``ping``      both       ``timestamp``; server pings add ``heartbeat_count``, ``client_id``
                         (:class:`Ping`)
``pong``      both       ``timestamp``, optional ``client_id`` (:class:`Pong`)
``status``    S → C      ``connection_uptime_seconds``, ``heartbeat_count``, ``last_heartbeat``,
                         ``client_id``, ``timestamp`` (:class:`Status`); a client asks for it
                         by sending ``{"type": "status", "timestamp": ...}``
``error``     S → C      ``error_code``, ``message``, ``timestamp`` (:class:`ErrorMessage`)
``echo``      S → C      ``original_message``, ``timestamp``, ``client_id`` (:class:`Echo`)
============  =========  ======================================================================

Any other ``type`` is an application message and travels as a plain ``dict``. Two more types
belong to the protocol without being parsed here, because in v1 an application may use them:
``ack`` (v2 only: ``{"type":"ack","id":N}`` from the server, ``{"type":"ack","offset":N}`` from
the client, see ``model/delivery.py``) and ``reply`` (the answer to a request, in both versions:
:func:`reply_text`).

Exceptions::

    ValueError
     └── ProtocolError          .error_code: ErrorCode
          ├── InvalidJSON       the text is not JSON (or is too deep / too large to decode)
          └── InvalidMessage    JSON, but not a valid message; the text names the field

Besides messages, this module holds the pure parts of the handshake: :func:`validate_query`
decides whether the server accepts a connection and with which close code it refuses, and
:func:`build_client_url` builds the URL a client dials. Nothing here performs I/O, reads a clock
or draws random numbers: callers pass ``now`` and ``request_id`` in.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit, urlunsplit

__all__ = [
    "CLIENT_ID_PATTERN",
    "FEATURES",
    "MAX_CLOSE_REASON_BYTES",
    "MAX_NESTING_DEPTH",
    "MAX_SESSION_TOKEN_LENGTH",
    "RESUME_PARAMS",
    "SUPPORTED_VERSIONS",
    "SYSTEM_MESSAGES",
    "Accept",
    "CloseCode",
    "Echo",
    "ErrorCode",
    "ErrorMessage",
    "Hello",
    "HelloSession",
    "InvalidJSON",
    "InvalidMessage",
    "MessageType",
    "Ping",
    "Pong",
    "ProtocolError",
    "Reject",
    "Role",
    "Status",
    "SystemMessage",
    "ack_text",
    "build_client_url",
    "decode_text",
    "encode",
    "format_timestamp",
    "is_session_token",
    "make_error",
    "make_hello",
    "make_ping",
    "make_pong",
    "parse_message",
    "parse_timestamp",
    "reply_error_text",
    "reply_text",
    "truncate_reason",
    "use_fast_json",
    "validate_query",
]


class CloseCode(IntEnum):
    """WebSocket close codes used by steadysocket (standard ones and the 4xxx private range)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNSUPPORTED_VERSION = 4400
    INVALID_ROLE = 4401
    AUTH_REFUSED = 4403
    """The server's ``authenticate`` hook refused the credentials: final, not retried."""
    AUTH_EXPIRED = 4419
    """The server's ``authenticate`` hook refused an expired token: retried with a fresh one."""
    HANDSHAKE_ERROR = 4500


class Role(StrEnum):
    """The roles a client may announce in the ``role`` query parameter."""

    FRONTEND = "frontend"
    ADMIN = "admin"
    TEST = "test"


class ErrorCode(StrEnum):
    """``error_code`` values of the server's ``error`` message."""

    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNSUPPORTED_DATA = "UNSUPPORTED_DATA"
    HANDLER_ERROR = "HANDLER_ERROR"
    """Only in a ``reply``: the handler of a request raised."""


class MessageType(StrEnum):
    """The system message types; every other ``type`` belongs to the application."""

    HELLO = "hello"
    PING = "ping"
    PONG = "pong"
    STATUS = "status"
    ERROR = "error"
    ECHO = "echo"


SUPPORTED_VERSIONS: frozenset[int] = frozenset({1, 2})
"""Protocol versions the server accepts."""

FEATURES: tuple[str, ...] = (
    "heartbeat",
    "structured_messages",
    "error_codes",
    "graceful_reconnect",
)
"""Features the server advertises in its hello, in this order."""

CLIENT_ID_PATTERN: re.Pattern[str] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
"""A valid ``client_id``; use ``CLIENT_ID_PATTERN.fullmatch(value)``."""

MAX_CLOSE_REASON_BYTES = 123
"""RFC 6455 caps a close frame's payload at 125 bytes, two of which hold the code."""

MAX_NESTING_DEPTH = 128
"""Deepest array/object nesting :func:`decode_text` accepts.

The json module's own limit depends on how deep the caller's stack already is, so a message that
decodes in one place could fail to re-encode (for instance inside an echo) in another. A fixed,
generous limit makes the outcome the same everywhere.
"""

_ELLIPSIS = "…"
_ERROR_CODES = frozenset(code.value for code in ErrorCode)
_REPR_LIMIT = 60


# --------------------------------------------------------------------------------------------
# Timestamps
# --------------------------------------------------------------------------------------------


def format_timestamp(dt: datetime) -> str:
    """Format an aware datetime as ISO 8601 UTC with millisecond precision and a ``Z`` suffix.

    The output looks like ``2025-08-15T10:00:00.000Z``, the same shape as JavaScript's
    ``Date.prototype.toISOString()``; sub-millisecond digits are truncated.

    Raises:
        ValueError: ``dt`` is naive; the protocol never guesses a time zone.
    """
    if dt.utcoffset() is None:
        raise ValueError(f"timestamp must be timezone-aware, got naive {dt!r}")
    utc = dt.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def parse_timestamp(s: str) -> datetime:
    """Parse an ISO 8601 timestamp with a ``Z`` or numeric UTC offset into an aware UTC datetime.

    Raises:
        ValueError: ``s`` is not a string, not ISO 8601, or carries no UTC offset.
    """
    if not isinstance(s, str):
        raise ValueError(f"timestamp must be a string, got {type(s).__name__}")
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"not an ISO 8601 timestamp: {_short_repr(s)}") from None
    if dt.utcoffset() is None:
        raise ValueError(f"timestamp has no UTC offset (expected a 'Z' suffix): {_short_repr(s)}")
    return dt.astimezone(UTC)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """The peer sent something the protocol does not allow.

    ``error_code`` is what the server puts in the ``error`` message it answers with.
    """

    error_code: ErrorCode = ErrorCode.INVALID_MESSAGE


class InvalidJSON(ProtocolError):
    """The text could not be decoded as JSON (within the nesting and integer-size limits)."""

    error_code = ErrorCode.INVALID_JSON


class InvalidMessage(ProtocolError):
    """The text is JSON but not a valid message; the exception text names the offending field."""

    error_code = ErrorCode.INVALID_MESSAGE


def _short_repr(value: object) -> str:
    # Bound the size of anything echoed from the peer so error texts stay readable.
    text = repr(value)
    if len(text) > _REPR_LIMIT:
        return text[: _REPR_LIMIT - 1] + _ELLIPSIS
    return text


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------
# Field validators for from_dict
# --------------------------------------------------------------------------------------------

_MISSING: Any = object()


def _get(data: Mapping[str, Any], msg: MessageType, name: str) -> Any:
    value = data.get(name, _MISSING)
    if value is _MISSING:
        raise InvalidMessage(f"{msg} message: field {name!r} is missing")
    return value


def _bad(msg: MessageType, name: str, expected: str, value: object) -> InvalidMessage:
    return InvalidMessage(
        f"{msg} message: field {name!r} must be {expected}, "
        f"got {_type_name(value)} {_short_repr(value)}"
    )


def _str(data: Mapping[str, Any], msg: MessageType, name: str) -> str:
    value = _get(data, msg, name)
    if not isinstance(value, str):
        raise _bad(msg, name, "a string", value)
    return value


def _opt_str(data: Mapping[str, Any], msg: MessageType, name: str) -> str | None:
    # Absent and null both mean "not given": JSON producers differ on which they emit.
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(msg, name, "a string or null", value)
    return value


def _nullable_str(data: Mapping[str, Any], msg: MessageType, name: str) -> str | None:
    value = _get(data, msg, name)
    if value is not None and not isinstance(value, str):
        raise _bad(msg, name, "a string or null", value)
    return value


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but true/false is never a count or a version on the wire.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(
    data: Mapping[str, Any],
    msg: MessageType,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    value = _get(data, msg, name)
    if (
        not _is_int(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        if maximum is not None:
            expected += f" and <= {maximum}"
        raise _bad(msg, name, expected, value)
    return int(value)


def _opt_int(
    data: Mapping[str, Any], msg: MessageType, name: str, *, minimum: int | None = None
) -> int | None:
    if data.get(name) is None:
        return None
    return _int(data, msg, name, minimum=minimum)


def _number(data: Mapping[str, Any], msg: MessageType, name: str) -> float:
    value = _get(data, msg, name)
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < 0:
        raise _bad(msg, name, "a non-negative number", value)
    return float(value)


def _check_type(cls: type[_Message], data: Mapping[str, Any]) -> None:
    if not isinstance(data, Mapping):
        raise InvalidMessage(
            f"{cls.TYPE} message must be a JSON object, got {_type_name(data)} {_short_repr(data)}"
        )
    # A missing "type" is tolerated so callers can build a message from its fields alone.
    kind = data.get("type", cls.TYPE)
    if kind != cls.TYPE:
        raise InvalidMessage(f"expected a {cls.TYPE!s} message, got type {_short_repr(kind)}")


# allow_nan=False: NaN/Infinity are not JSON and other peers' parsers reject them.
# ensure_ascii stays on: a lone surrogate decoded from a peer's "\ud800" escape could not be
# encoded as UTF-8 for the frame, while its \u escape always can. It also makes the text's
# length its size in bytes on the wire. One encoder for every message: json.dumps() with
# arguments builds a new JSONEncoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(obj: Any) -> str:
    return _ENCODER.encode(obj)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class _Message:
    """Behaviour shared by the system messages; each subclass is a frozen dataclass."""

    TYPE: ClassVar[MessageType]

    def to_dict(self) -> dict[str, Any]:
        """Return the message as a JSON-ready dict, ``type`` included."""
        raise NotImplementedError

    def serialize(self) -> str:
        """Return the message as compact JSON text, ready for a text frame."""
        return _dumps(self.to_dict())


MAX_HEARTBEAT_INTERVAL_MS = 86_400_000
"""The longest heartbeat interval a hello may announce (a day); beyond it, the hello is invalid
(a 400-digit number would overflow the client's timer arithmetic)."""


@dataclass(frozen=True)
class Hello(_Message):
    """The server's first message after accepting a connection.

    In v1 it has exactly the seed's seven fields. ``request_id`` is a UUID4 string that the
    caller generates, because the model does not draw random numbers. A v2 hello
    (``accepted_version`` 2) adds the session: :class:`HelloSession`.
    """

    TYPE: ClassVar[MessageType] = MessageType.HELLO

    server_time: str
    accepted_version: int
    features: tuple[str, ...]
    request_id: str
    client_id: str
    heartbeat_interval_ms: int
    session: HelloSession | None = None
    """The v2 fields; None in a v1 hello."""

    def to_dict(self) -> dict[str, Any]:
        """Return the hello as a JSON-ready dict (``features`` becomes a list)."""
        data: dict[str, Any] = {
            "type": str(self.TYPE),
            "server_time": self.server_time,
            "accepted_version": self.accepted_version,
            "features": list(self.features),
            "request_id": self.request_id,
            "client_id": self.client_id,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
        }
        if self.session is not None:
            data.update(self.session.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate and build a hello.

        ``server_time`` must be an ISO 8601 timestamp with an offset, because a client treats a
        malformed hello as a failed handshake. Unknown extra fields are ignored.

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        _check_type(cls, data)
        msg = cls.TYPE
        server_time = _str(data, msg, "server_time")
        try:
            parse_timestamp(server_time)
        except ValueError:
            raise _bad(msg, "server_time", "an ISO 8601 timestamp", server_time) from None
        raw_features = _get(data, msg, "features")
        if not isinstance(raw_features, list | tuple) or not all(
            isinstance(item, str) for item in raw_features
        ):
            raise _bad(msg, "features", "a list of strings", raw_features)
        version = _int(data, msg, "accepted_version")
        return cls(
            server_time=server_time,
            accepted_version=version,
            features=tuple(raw_features),
            request_id=_str(data, msg, "request_id"),
            client_id=_str(data, msg, "client_id"),
            heartbeat_interval_ms=_int(
                data, msg, "heartbeat_interval_ms", minimum=1, maximum=MAX_HEARTBEAT_INTERVAL_MS
            ),
            session=HelloSession.from_dict(data) if version == 2 else None,
        )


MAX_SESSION_TOKEN_LENGTH = 128
"""The longest ``session_id`` or ``epoch`` accepted, in the hello and in the query."""


@dataclass(frozen=True)
class HelloSession:
    """The fields a v2 hello adds (``docs/protocol.md``, "Protocol v2", point 1).

    ``resume_outcome`` says why ``resumed`` is what it is (a ``ResumeOutcome`` value of
    ``model/delivery.py``: ``new``, ``resumed``, ``wrong_epoch``, ...), for diagnostics.
    """

    session_id: str
    epoch: str
    resumed: bool
    max_message_bytes: int
    resume_outcome: str
    replayed: int = 0
    """How many messages the server replays right after this hello (0 unless resumed)."""

    def to_dict(self) -> dict[str, Any]:
        """The v2 fields, as they are added to the hello."""
        return {
            "session_id": self.session_id,
            "epoch": self.epoch,
            "resumed": self.resumed,
            "max_message_bytes": self.max_message_bytes,
            "resume_outcome": self.resume_outcome,
            "replayed": self.replayed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate the v2 fields of a hello.

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        msg = MessageType.HELLO
        resumed = _get(data, msg, "resumed")
        if not isinstance(resumed, bool):
            raise _bad(msg, "resumed", "a boolean", resumed)
        return cls(
            session_id=_token(data, msg, "session_id"),
            epoch=_token(data, msg, "epoch"),
            resumed=resumed,
            max_message_bytes=_int(data, msg, "max_message_bytes", minimum=1),
            resume_outcome=_str(data, msg, "resume_outcome"),
            replayed=_opt_int(data, msg, "replayed", minimum=0) or 0,
        )


def _token(data: Mapping[str, Any], msg: MessageType, name: str) -> str:
    value = _get(data, msg, name)
    if not is_session_token(value):
        expected = f"a token of 1 to {MAX_SESSION_TOKEN_LENGTH} URL-safe characters"
        raise _bad(msg, name, expected, value)
    return str(value)


_TOKEN_PATTERN = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_SESSION_TOKEN_LENGTH}}}$")


def is_session_token(value: object) -> bool:
    """Whether ``value`` can be a ``session_id`` or ``epoch`` (URL-safe, 1 to 128 characters)."""
    return isinstance(value, str) and _TOKEN_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True)
class Ping(_Message):
    """A heartbeat ping.

    Server pings carry ``heartbeat_count`` (from 0) and ``client_id``; client pings carry only
    ``timestamp``. Fields that are ``None`` are left out of :meth:`to_dict`.
    """

    TYPE: ClassVar[MessageType] = MessageType.PING

    timestamp: str
    heartbeat_count: int | None = None
    client_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the ping as a JSON-ready dict, without the fields that are ``None``."""
        out: dict[str, Any] = {"type": str(self.TYPE), "timestamp": self.timestamp}
        if self.heartbeat_count is not None:
            out["heartbeat_count"] = self.heartbeat_count
        if self.client_id is not None:
            out["client_id"] = self.client_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate and build a ping; absent or null optional fields become ``None``.

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        _check_type(cls, data)
        msg = cls.TYPE
        return cls(
            timestamp=_str(data, msg, "timestamp"),
            heartbeat_count=_opt_int(data, msg, "heartbeat_count", minimum=0),
            client_id=_opt_str(data, msg, "client_id"),
        )


@dataclass(frozen=True)
class Pong(_Message):
    """The answer to a ping. The server's pong names the client; a client's may omit it."""

    TYPE: ClassVar[MessageType] = MessageType.PONG

    timestamp: str
    client_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the pong as a JSON-ready dict, without ``client_id`` when it is ``None``."""
        out: dict[str, Any] = {"type": str(self.TYPE), "timestamp": self.timestamp}
        if self.client_id is not None:
            out["client_id"] = self.client_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate and build a pong.

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        _check_type(cls, data)
        msg = cls.TYPE
        return cls(
            timestamp=_str(data, msg, "timestamp"), client_id=_opt_str(data, msg, "client_id")
        )


@dataclass(frozen=True)
class Status(_Message):
    """The server's reply to a client's ``{"type": "status"}`` request.

    ``last_heartbeat`` is the timestamp of the server's latest ping, or ``None`` before the
    first one; the key is always present on the wire.
    """

    TYPE: ClassVar[MessageType] = MessageType.STATUS

    connection_uptime_seconds: float
    heartbeat_count: int
    last_heartbeat: str | None
    client_id: str
    timestamp: str

    def to_dict(self) -> dict[str, Any]:
        """Return the status reply as a JSON-ready dict."""
        return {
            "type": str(self.TYPE),
            "connection_uptime_seconds": self.connection_uptime_seconds,
            "heartbeat_count": self.heartbeat_count,
            "last_heartbeat": self.last_heartbeat,
            "client_id": self.client_id,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate and build a status reply (not the client's bare request).

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        _check_type(cls, data)
        msg = cls.TYPE
        return cls(
            connection_uptime_seconds=_number(data, msg, "connection_uptime_seconds"),
            heartbeat_count=_int(data, msg, "heartbeat_count", minimum=0),
            last_heartbeat=_nullable_str(data, msg, "last_heartbeat"),
            client_id=_str(data, msg, "client_id"),
            timestamp=_str(data, msg, "timestamp"),
        )


@dataclass(frozen=True)
class ErrorMessage(_Message):
    """The server's report that a frame from the client was rejected; the connection stays open."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR

    error_code: ErrorCode
    message: str
    timestamp: str

    def to_dict(self) -> dict[str, Any]:
        """Return the error as a JSON-ready dict."""
        return {
            "type": str(self.TYPE),
            "error_code": str(self.error_code),
            "message": self.message,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate and build an error message; ``error_code`` must be an :class:`ErrorCode`.

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        _check_type(cls, data)
        msg = cls.TYPE
        raw_code = _get(data, msg, "error_code")
        if not isinstance(raw_code, str) or raw_code not in _ERROR_CODES:
            expected = "one of " + ", ".join(code.value for code in ErrorCode)
            raise _bad(msg, "error_code", expected, raw_code)
        return cls(
            error_code=ErrorCode(raw_code),
            message=_str(data, msg, "message"),
            timestamp=_str(data, msg, "timestamp"),
        )


@dataclass(frozen=True)
class Echo(_Message):
    """The default server handler's reply to an application message: the message sent back.

    ``original_message`` is a dict, so it is excluded from the hash (``hash=False``) while still
    taking part in equality; ``hash(echo)`` therefore works. The dataclass is frozen but the dict
    itself is not: treat it as read-only.
    """

    TYPE: ClassVar[MessageType] = MessageType.ECHO

    original_message: dict[str, Any] = field(hash=False, compare=True)
    timestamp: str
    client_id: str

    def to_dict(self) -> dict[str, Any]:
        """Return the echo as a JSON-ready dict (``original_message`` is copied)."""
        return {
            "type": str(self.TYPE),
            "original_message": dict(self.original_message),
            "timestamp": self.timestamp,
            "client_id": self.client_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Validate and build an echo; ``original_message`` must be a JSON object.

        Raises:
            InvalidMessage: a field is missing or has the wrong type; the text names it.
        """
        _check_type(cls, data)
        msg = cls.TYPE
        original = _get(data, msg, "original_message")
        if not isinstance(original, Mapping):
            raise _bad(msg, "original_message", "a JSON object", original)
        return cls(
            original_message=dict(original),
            timestamp=_str(data, msg, "timestamp"),
            client_id=_str(data, msg, "client_id"),
        )


SystemMessage = Hello | Ping | Pong | Status | ErrorMessage | Echo
"""Any parsed system message."""

SYSTEM_MESSAGES: Mapping[str, type[SystemMessage]] = MappingProxyType(
    {cls.TYPE: cls for cls in (Hello, Ping, Pong, Status, ErrorMessage, Echo)}
)
"""Message ``type`` → the class :func:`parse_message` builds for it."""


# --------------------------------------------------------------------------------------------
# Decoding and encoding
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise InvalidJSON(f"Invalid JSON format: {name} is not a JSON number")


def _parse_float(literal: str) -> float:
    value = float(literal)
    # 1e999 parses as inf, which could never be encoded back to JSON.
    if not math.isfinite(value):
        raise InvalidJSON(f"Invalid JSON format: number {_short_repr(literal)} is out of range")
    return value


# One decoder for every frame: json.loads() with hooks builds a new JSONDecoder per call, which
# cost about 1.5 µs a message in the client benchmark.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def _nesting_exceeds(value: Any, limit: int) -> bool:
    # Iterative on purpose: a recursive walk could itself hit the recursion limit.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


_TOO_DEEP = f"Invalid JSON format: nested too deeply (limit {MAX_NESTING_DEPTH} levels)"


def _decode_standard(text: str) -> Any:
    """The standard library's decoder, with the protocol's limits and error texts."""
    try:
        return _DECODER.decode(text)
    except InvalidJSON:
        raise
    except RecursionError:
        raise InvalidJSON(
            f"Invalid JSON format: nested too deeply (limit {MAX_NESTING_DEPTH} levels)"
        ) from None
    except json.JSONDecodeError as exc:
        raise InvalidJSON(
            f"Invalid JSON format: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError:
        # Python refuses integers of more than 4300 digits with a plain ValueError, whose
        # advice about sys.set_int_max_str_digits() means nothing to a remote peer.
        raise InvalidJSON("Invalid JSON format: an integer has too many digits") from None


_orjson_loads: Callable[[str], Any] | None
try:  # steadysocket[fast]: orjson decodes a message several times faster
    from orjson import loads as _orjson_loads
except ImportError:  # pragma: no cover - the test environment installs orjson
    _orjson_loads = None

_fast_loads: Callable[[str], Any] | None = _orjson_loads
# orjson reads an integer beyond 64 bits as a float: such texts go to the standard decoder.
_LONG_NUMBER = re.compile(r"[0-9]{19}")


def use_fast_json(enabled: bool) -> bool:
    """Decode with orjson (``steadysocket[fast]``) when it is installed and ``enabled``; the
    default when it is installed. Returns whether it is now in use. Results and errors are the
    same either way: whatever orjson refuses or could read differently (integers beyond 64
    bits, lone surrogates, NaN) goes to the standard decoder."""
    global _fast_loads
    _fast_loads = _orjson_loads if enabled else None
    return _fast_loads is not None


def decode_text(text: str) -> dict[str, Any]:
    """Decode a text frame into a message dict with a non-empty string ``type``.

    Raises:
        InvalidJSON: not JSON; also ``NaN``/``Infinity``, integers too long for Python to
            parse, and nesting deeper than :data:`MAX_NESTING_DEPTH`.
        InvalidMessage: JSON that is not an object, or whose ``type`` is missing, not a
            string, or empty.

    No other exception escapes for any ``str`` input.
    """
    fast = _fast_loads
    if fast is not None and _LONG_NUMBER.search(text) is None:
        try:
            value = fast(text)
        except ValueError:  # anything orjson refuses, the standard decoder judges
            value = _decode_standard(text)
    else:
        value = _decode_standard(text)
    # Each level needs a bracket, so a short text cannot nest too deeply; for a longer one,
    # counting brackets is C-speed and almost always proves the walk unnecessary.
    if (
        len(text) > MAX_NESTING_DEPTH
        and text.count("[") + text.count("{") > MAX_NESTING_DEPTH
        and _nesting_exceeds(value, MAX_NESTING_DEPTH)
    ):
        raise InvalidJSON(
            f"Invalid JSON format: nested too deeply (limit {MAX_NESTING_DEPTH} levels)"
        )
    if not isinstance(value, dict):
        raise InvalidMessage(
            f"message must be a JSON object, got {_json_kind(value)} {_short_repr(value)}"
        )
    if "type" not in value:
        raise InvalidMessage("message has no 'type' field")
    kind = value["type"]
    if not isinstance(kind, str):
        raise InvalidMessage(
            f"field 'type' must be a string, got {_json_kind(kind)} {_short_repr(kind)}"
        )
    if not kind:
        raise InvalidMessage("field 'type' must not be empty")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_message(text: str) -> Hello | Ping | Pong | Status | ErrorMessage | Echo | dict[str, Any]:
    """Decode a text frame; system types become their dataclass, others stay a plain dict.

    This parses messages as the *server* sends them. A server reading client frames should call
    :func:`decode_text` and dispatch on ``type`` itself, because a client's ``status`` request
    is a bare ``{"type": "status", ...}`` that is not a :class:`Status` reply. (Client ``ping``
    and ``pong`` do parse, since their server-only fields are optional.)

    Raises:
        InvalidJSON: see :func:`decode_text`.
        InvalidMessage: see :func:`decode_text`, or a system message with a bad field.
    """
    data = decode_text(text)
    cls = SYSTEM_MESSAGES.get(data["type"])
    if cls is None:
        return data
    return cls.from_dict(data)


def encode(message: Mapping[str, Any]) -> str:
    """Encode an application message as compact JSON text.

    Raises:
        TypeError: a value is not JSON-serializable.
        ValueError: a value is NaN or infinite, or the structure is circular.
    """
    return _ENCODER.encode(message if isinstance(message, dict) else dict(message))


# --------------------------------------------------------------------------------------------
# Message constructors
# --------------------------------------------------------------------------------------------


def make_hello(
    *,
    now: datetime,
    client_id: str,
    request_id: str,
    heartbeat_interval_ms: int,
    version: int = 1,
    session: HelloSession | None = None,
) -> Hello:
    """Build the server's hello with :data:`FEATURES`; a v2 hello passes its ``session``.

    The caller passes ``request_id``, normally ``str(uuid.uuid4())``, because the model draws no
    random numbers.

    Raises:
        ValueError: ``heartbeat_interval_ms`` is not a positive integer, or ``now`` is naive.
    """
    if not _is_int(heartbeat_interval_ms) or heartbeat_interval_ms <= 0:
        raise ValueError(
            f"heartbeat_interval_ms must be a positive integer, got {heartbeat_interval_ms!r}"
        )
    return Hello(
        server_time=format_timestamp(now),
        accepted_version=version,
        features=FEATURES,
        request_id=request_id,
        client_id=client_id,
        heartbeat_interval_ms=heartbeat_interval_ms,
        session=session,
    )


def make_ping(
    now: datetime, *, heartbeat_count: int | None = None, client_id: str | None = None
) -> Ping:
    """Build a ping: a server passes ``heartbeat_count`` and ``client_id``, a client neither."""
    return Ping(
        timestamp=format_timestamp(now), heartbeat_count=heartbeat_count, client_id=client_id
    )


def make_pong(now: datetime, client_id: str | None) -> Pong:
    """Build the pong that answers a ping."""
    return Pong(timestamp=format_timestamp(now), client_id=client_id)


def make_error(now: datetime, code: ErrorCode, message: str) -> ErrorMessage:
    """Build the server's ``error`` message for a rejected frame."""
    return ErrorMessage(error_code=code, message=message, timestamp=format_timestamp(now))


def ack_text(name: str, value: int, timestamp: str) -> str:
    """A v2 cumulative ack: ``name`` is ``"id"`` (server to client) or ``"offset"`` (client to
    server), ``timestamp`` an already formatted timestamp."""
    return f'{{"type":"ack","{name}":{value},"timestamp":"{timestamp}"}}'


def reply_text(request_id: int, result: Any, timestamp: str) -> str:
    """The answer to a request: ``{"type":"reply","id":N,"result":R,"timestamp":T}``.

    Raises:
        TypeError, ValueError: ``result`` cannot be encoded as JSON.
    """
    return _dumps({"type": "reply", "id": request_id, "result": result, "timestamp": timestamp})


def reply_error_text(request_id: int, code: ErrorCode, message: str, timestamp: str) -> str:
    """A request failed: ``{"type":"reply","id":N,"error":{"error_code","message"},
    "timestamp":T}``."""
    error = {"error_code": str(code), "message": message}
    return _dumps({"type": "reply", "id": request_id, "error": error, "timestamp": timestamp})


# --------------------------------------------------------------------------------------------
# Handshake: query validation and client URL
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """:func:`validate_query` accepts the connection with these parameters."""

    client_id: str
    version: int
    role: Role
    resume: Mapping[str, str] = field(default_factory=dict)
    """v2 only: whichever of ``session_id``, ``epoch`` and ``offset`` the query gave (as
    strings, unchecked: ``SessionStore.open`` judges them, and answers a bad one with
    ``resumed: false``)."""


@dataclass(frozen=True)
class Reject:
    """:func:`validate_query` refuses the connection: close with ``code`` and ``reason``.

    ``reason`` is at most :data:`MAX_CLOSE_REASON_BYTES` bytes in UTF-8.
    """

    code: CloseCode
    reason: str


def truncate_reason(text: str, limit: int = MAX_CLOSE_REASON_BYTES) -> str:
    """Fit ``text`` into ``limit`` UTF-8 bytes, for a close frame's reason.

    The cut falls on a character boundary and ``…`` marks it. Characters that UTF-8 cannot
    encode (lone surrogates) become ``?`` so the result can always be sent.
    """
    safe = text.encode("utf-8", "replace").decode("utf-8")
    if len(safe.encode("utf-8")) <= limit:
        return safe
    marker = _ELLIPSIS if len(_ELLIPSIS.encode("utf-8")) <= limit else ""
    budget = limit - len(marker.encode("utf-8"))
    used = 0
    end = 0
    # The text is over the limit, so it is over the budget too: the loop always breaks.
    for char in safe:  # pragma: no branch
        size = len(char.encode("utf-8"))
        if used + size > budget:
            break
        used += size
        end += 1
    return safe[:end] + marker


def _first(params: Mapping[str, Any], name: str) -> object:
    """The first value given for ``name``, or ``_MISSING``; never raises."""
    try:
        values = params.get(name, _MISSING)
    except Exception:
        return _MISSING
    if values is _MISSING or values is None:
        return _MISSING
    # A bare str is itself a Sequence[str]; indexing it would yield its first character.
    if isinstance(values, str):
        return values
    if isinstance(values, Sequence):
        return values[0] if len(values) > 0 else _MISSING
    return values


_ROLES: Mapping[str, Role] = MappingProxyType({role.value: role for role in Role})


def validate_query(
    query: str | Mapping[str, Sequence[str]], *, accept_v2: bool = True
) -> Accept | Reject:
    """Decide whether the server accepts a ``/ws/client`` connection (PROTOCOL Server point 2).

    ``query`` is the raw query string (a leading ``?`` is allowed) or an already parsed mapping
    of name → values. For a repeated parameter the first value counts. Checks run in order and
    the first failure decides:

    1. ``version``: absent means 1; anything but exactly ``"1"`` or ``"2"`` → 4400
       ``Unsupported version '<value>'``. Only the canonical spelling is accepted, so ``01``,
       `` 1`` and ``1.0`` are refused: a version is an identifier, not a number to normalise.
       ``accept_v2=False`` refuses ``"2"`` too, as a v1-only server does.
    2. ``role``: absent means ``frontend``; anything but exactly ``frontend``, ``admin`` or
       ``test`` → 4401 ``Invalid role '<value>'``.
    3. ``client_id``: absent, empty or not matching :data:`CLIENT_ID_PATTERN` → 1008
       ``Invalid client_id``.

    Never raises; every reason fits in :data:`MAX_CLOSE_REASON_BYTES`.
    """
    params: Mapping[str, Any]
    if isinstance(query, str):
        raw = query[1:] if query.startswith("?") else query
        try:
            params = parse_qs(raw, keep_blank_values=True)
        except Exception:  # pragma: no cover - parse_qs raises for no str (errors="replace")
            params = {}
    else:
        params = query

    version = _first(params, "version")
    accepted = ("1", "2") if accept_v2 else ("1",)
    if version is not _MISSING and version not in accepted:
        return Reject(
            CloseCode.UNSUPPORTED_VERSION, truncate_reason(f"Unsupported version {version!r}")
        )

    role_value = _first(params, "role")
    if role_value is _MISSING:
        role = Role.FRONTEND
    elif isinstance(role_value, str) and role_value in _ROLES:
        role = _ROLES[role_value]
    else:
        return Reject(CloseCode.INVALID_ROLE, truncate_reason(f"Invalid role {role_value!r}"))

    client_id = _first(params, "client_id")
    if not isinstance(client_id, str) or CLIENT_ID_PATTERN.fullmatch(client_id) is None:
        return Reject(CloseCode.POLICY_VIOLATION, "Invalid client_id")

    if version != "2":
        return Accept(client_id=client_id, version=1, role=role)
    resume = {
        name: value for name in RESUME_PARAMS if isinstance(value := _first(params, name), str)
    }
    return Accept(client_id=client_id, version=2, role=role, resume=resume)


RESUME_PARAMS = ("session_id", "epoch", "offset")
"""The query parameters a v2 client adds to resume its session."""
_CLIENT_PATH = "/ws/client"
_CLIENT_PARAMS = frozenset({"client_id", "version", "role", *RESUME_PARAMS})


def build_client_url(
    base_url: str,
    client_id: str,
    version: int = 1,
    role: str = "frontend",
    resume: Mapping[str, str] | None = None,
) -> str:
    """Build the URL a client dials: ``<base>/ws/client?…&client_id=…&version=…&role=…``.

    The base path is kept (``ws://h/api/`` → ``ws://h/api/ws/client``). Other query parameters
    of the base are kept verbatim; any ``client_id``, ``version``, ``role`` or resume parameter
    (``resume``: a v2 client's ``session_id``, ``epoch`` and ``offset``) already there is
    replaced, since the server only reads the first value of a repeated parameter. A fragment is
    dropped: WebSocket URLs cannot carry one. The parameters are not validated here, so a client
    can still be pointed at a server with values it will refuse.

    Raises:
        ValueError: the scheme is not ``ws`` or ``wss``, the host is missing, or the port is
            invalid.
    """
    url = base_url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"WebSocket URL must start with ws:// or wss://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"WebSocket URL has no host: {url!r}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"WebSocket URL has an invalid port: {url!r} ({exc})") from None

    path = parts.path.rstrip("/") + _CLIENT_PATH
    kept = [
        piece
        for piece in parts.query.split("&")
        if piece and unquote_plus(piece.split("=", 1)[0]) not in _CLIENT_PARAMS
    ]
    ours = urlencode(
        {"client_id": client_id, "version": str(version), "role": str(role), **(resume or {})}
    )
    query = "&".join([*kept, ours])
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))
