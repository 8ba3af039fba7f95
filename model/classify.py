"""Classification of connection failures (docs/protocol.md, Client 4 and 13).

The runtime turns whatever went wrong (a close frame, an HTTP rejection of the upgrade, or an
exception) into a :data:`Failure` value; :func:`classify` maps that value to a
:class:`FailureKind` for diagnostics and says whether retrying can help. It is pure and total:
every possible failure value gets a classification.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "ABNORMAL_CLOSE_CODES",
    "ABNORMAL_ERROR_KINDS",
    "HANDSHAKE_CLOSE_CODES",
    "NETWORK_CLOSE_CODES",
    "NETWORK_ERROR_KINDS",
    "NORMAL_CLOSE_CODES",
    "RETRYABLE_CLIENT_ERROR_STATUSES",
    "RETRYABLE_HANDSHAKE_CLOSE_CODES",
    "RETRYABLE_HANDSHAKE_ERROR_KINDS",
    "SERVER_ERROR_CLOSE_CODES",
    "TERMINAL_HANDSHAKE_ERROR_KINDS",
    "TIMEOUT_ERROR_KINDS",
    "Classification",
    "CloseFailure",
    "ErrorFailure",
    "ErrorKind",
    "Failure",
    "FailureKind",
    "HttpFailure",
    "classify",
]


class FailureKind(StrEnum):
    """The diagnostic category of a failure, as named in the seed."""

    NETWORK = "network"
    HANDSHAKE = "handshake"
    SERVER_ERROR = "server_error"
    ABNORMAL = "abnormal"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"


class ErrorKind(StrEnum):
    """Kinds of exception or local detection the runtime reports as an :class:`ErrorFailure`."""

    REFUSED = "refused"
    """The peer actively refused the TCP connection."""
    DNS = "dns"
    """The host name could not be resolved."""
    UNREACHABLE = "unreachable"
    """The host or network could not be reached."""
    CONNECT_TIMEOUT = "connect_timeout"
    """The socket and hello did not both arrive within the connection timeout."""
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    """Nothing arrived for twice the announced heartbeat interval."""
    INVALID_HELLO = "invalid_hello"
    """The first message was missing or was not a well-formed hello."""
    VERSION_MISMATCH = "version_mismatch"
    """The hello's ``accepted_version`` differs from the version requested."""
    NO_CLOSE_FRAME = "no_close_frame"
    """The connection ended without a close frame."""
    AUTH = "auth"
    """The client's ``auth`` callable raised, or returned something that is not credentials."""
    OTHER = "other"
    """Anything the runtime could not place more precisely."""


_ERROR_LABELS: dict[ErrorKind, str] = {
    ErrorKind.REFUSED: "connection refused",
    ErrorKind.DNS: "DNS lookup failed",
    ErrorKind.UNREACHABLE: "host unreachable",
    ErrorKind.CONNECT_TIMEOUT: "connect timeout",
    ErrorKind.HEARTBEAT_TIMEOUT: "heartbeat timeout",
    ErrorKind.INVALID_HELLO: "invalid hello",
    ErrorKind.VERSION_MISMATCH: "protocol version mismatch",
    ErrorKind.NO_CLOSE_FRAME: "connection lost without a close frame",
    ErrorKind.AUTH: "auth() failed",
    ErrorKind.OTHER: "error",
}


@dataclass(frozen=True, slots=True)
class CloseFailure:
    """The connection was closed with a close frame carrying ``code`` and ``reason``."""

    code: int
    reason: str = ""

    def describe(self) -> str:
        """Return a short human-readable description, such as ``close 4401 (Invalid role 'x')``."""
        return f"close {self.code} ({self.reason})" if self.reason else f"close {self.code}"


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """The server answered the upgrade request with a non-101 HTTP ``status``."""

    status: int

    def describe(self) -> str:
        """Return a short human-readable description, such as ``HTTP 503``."""
        return f"HTTP {self.status}"


@dataclass(frozen=True, slots=True)
class ErrorFailure:
    """An exception or local detection, reduced to its :class:`ErrorKind` and a detail text."""

    kind: ErrorKind
    detail: str = ""

    def describe(self) -> str:
        """Return a short human-readable description, such as ``connection refused: ...``."""
        label = _ERROR_LABELS[self.kind]
        return f"{label}: {self.detail}" if self.detail else label


Failure = CloseFailure | HttpFailure | ErrorFailure
"""Everything that can end a connection attempt or an open connection."""


@dataclass(frozen=True, slots=True)
class Classification:
    """The category of a failure and whether another attempt could succeed."""

    kind: FailureKind
    retryable: bool


HANDSHAKE_CLOSE_CODES: frozenset[int] = frozenset({4400, 4401, 1008, 4403})
"""The server rejected our query parameters (4400, 4401, 1008) or our credentials (4403); the
same request will be rejected again."""

RETRYABLE_HANDSHAKE_CLOSE_CODES: frozenset[int] = frozenset({4419})
"""The server refused credentials that expired (4419): the next attempt asks the client's
``auth`` callable again, so it carries a fresh token."""

SERVER_ERROR_CLOSE_CODES: frozenset[int] = frozenset({4500, 1011})
"""The server failed on its side; it may recover."""

ABNORMAL_CLOSE_CODES: frozenset[int] = frozenset({1006})
"""Reported locally when the connection dropped without a close handshake."""

NETWORK_CLOSE_CODES: frozenset[int] = frozenset({1001})
"""The server is going away (for example shutting down); another instance may take over."""

NORMAL_CLOSE_CODES: frozenset[int] = frozenset({1000})
"""The server deliberately ended the session; reconnecting would go against its wish."""

RETRYABLE_CLIENT_ERROR_STATUSES: frozenset[int] = frozenset({408, 429})
"""4xx statuses that mean "not now" (request timeout, rate limited) rather than "never"."""

NETWORK_ERROR_KINDS: frozenset[ErrorKind] = frozenset(
    {ErrorKind.REFUSED, ErrorKind.DNS, ErrorKind.UNREACHABLE}
)
"""Transport-level failures that usually clear up on their own."""

TIMEOUT_ERROR_KINDS: frozenset[ErrorKind] = frozenset(
    {ErrorKind.CONNECT_TIMEOUT, ErrorKind.HEARTBEAT_TIMEOUT}
)
"""Nothing, or not enough, arrived in time."""

ABNORMAL_ERROR_KINDS: frozenset[ErrorKind] = frozenset({ErrorKind.NO_CLOSE_FRAME})
"""The connection ended without a close frame, the exception-side twin of close code 1006."""

RETRYABLE_HANDSHAKE_ERROR_KINDS: frozenset[ErrorKind] = frozenset(
    {ErrorKind.INVALID_HELLO, ErrorKind.AUTH}
)
"""A garbled or missing hello may be a transient server fault; an ``auth`` callable that
failed (its token service down) is called again before the next attempt."""

TERMINAL_HANDSHAKE_ERROR_KINDS: frozenset[ErrorKind] = frozenset({ErrorKind.VERSION_MISMATCH})
"""The server will keep offering the same version, so retrying cannot help."""


def classify(failure: Failure) -> Classification:
    """Return the :class:`Classification` of ``failure``.

    The rules are docs/protocol.md's Client points 4, 5 and 13. Anything they do not name is
    ``unknown`` and retryable, except close 1000, which is ``unknown`` and not retryable because
    a normal closure is the server asking us to stop.
    """
    match failure:
        case CloseFailure(code=code):
            return _classify_close(code)
        case HttpFailure(status=status):
            return _classify_http(status)
        case ErrorFailure(kind=kind):  # pragma: no branch - the match covers all of Failure
            return _classify_error(kind)


def _classify_close(code: int) -> Classification:
    if code in HANDSHAKE_CLOSE_CODES:
        return Classification(FailureKind.HANDSHAKE, retryable=False)
    if code in RETRYABLE_HANDSHAKE_CLOSE_CODES:
        return Classification(FailureKind.HANDSHAKE, retryable=True)
    if code in SERVER_ERROR_CLOSE_CODES:
        return Classification(FailureKind.SERVER_ERROR, retryable=True)
    if code in ABNORMAL_CLOSE_CODES:
        return Classification(FailureKind.ABNORMAL, retryable=True)
    if code in NETWORK_CLOSE_CODES:
        return Classification(FailureKind.NETWORK, retryable=True)
    if code in NORMAL_CLOSE_CODES:
        return Classification(FailureKind.UNKNOWN, retryable=False)
    return Classification(FailureKind.UNKNOWN, retryable=True)


def _classify_http(status: int) -> Classification:
    if 400 <= status <= 499:
        return Classification(
            FailureKind.HANDSHAKE, retryable=status in RETRYABLE_CLIENT_ERROR_STATUSES
        )
    if 500 <= status <= 599:
        return Classification(FailureKind.SERVER_ERROR, retryable=True)
    return Classification(FailureKind.UNKNOWN, retryable=True)


def _classify_error(kind: ErrorKind) -> Classification:
    if kind in NETWORK_ERROR_KINDS:
        return Classification(FailureKind.NETWORK, retryable=True)
    if kind in TIMEOUT_ERROR_KINDS:
        return Classification(FailureKind.TIMEOUT, retryable=True)
    if kind in ABNORMAL_ERROR_KINDS:
        return Classification(FailureKind.ABNORMAL, retryable=True)
    if kind in RETRYABLE_HANDSHAKE_ERROR_KINDS:
        return Classification(FailureKind.HANDSHAKE, retryable=True)
    if kind in TERMINAL_HANDSHAKE_ERROR_KINDS:
        return Classification(FailureKind.HANDSHAKE, retryable=False)
    return Classification(FailureKind.UNKNOWN, retryable=True)
