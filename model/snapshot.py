"""Read-only views of a client connection, for programs and the diagnostics panel.

:class:`WSState` is the seed's ``WSState``: the :class:`Phase`, :class:`ConnectionStats` and the
recent :class:`ConnectionAttempt` records, plus what the server's hello announced. Every view is
a frozen dataclass that the runtime builds when the state is read, so ``current_uptime_ms`` is
fresh rather than a stale counter. ``to_dict()`` gives plain JSON-ready data (timestamps in
ISO 8601 UTC with a ``Z``), and :meth:`WSState.to_json` the same as text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from steadysocket.model.protocol import Hello, format_timestamp

__all__ = ["AttemptOutcome", "ConnectionAttempt", "ConnectionStats", "Phase", "WSState"]


class Phase(StrEnum):
    """The connection lifecycle phases (seed's ``WSConnectionPhase``, PROTOCOL Client point 3)."""

    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    DEGRADED = "degraded"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    FALLBACK = "fallback"


class AttemptOutcome(StrEnum):
    """The values of :attr:`ConnectionAttempt.outcome`."""

    IN_FLIGHT = "in_flight"
    OPEN = "open"
    FAILED = "failed"
    ABORTED = "aborted"


_OUTCOMES = frozenset(outcome.value for outcome in AttemptOutcome)


def _require_aware(name: str, value: datetime | None) -> None:
    # Fail where the bad value is made, not later inside to_dict().
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value!r}")


def _ts(value: datetime | None) -> str | None:
    return None if value is None else format_timestamp(value)


@dataclass(frozen=True)
class ConnectionAttempt:
    """One connection attempt within an outage, with the seed's field names.

    The seed's fields: ``attempt`` counts from 1 within the outage; ``timestamp`` is when it
    started; ``duration_ms`` how long it took to open or fail; ``close_code``, ``close_reason``
    and ``classification`` (a ``FailureKind`` value: ``network``, ``handshake``, ``timeout``...)
    say how it failed or, for an attempt that opened, how its connection ended later (then
    ``closed_at`` is set; a dead peer is ``timeout``; the application's own ``disconnect()``
    leaves ``classification`` None); ``next_retry_eta`` is when the backoff that followed it
    retries.

    Beside them: ``phase`` (the phase it ran in), ``outcome`` (``in_flight`` while it runs, then
    ``open``, ``failed`` or ``aborted``), ``ended_at``, ``retryable``, ``detail`` (the failure
    described) and ``next_retry_delay_ms``. The earlier names ``number``, ``started_at``,
    ``failure_kind`` and ``next_retry_at`` still read as properties.

    Raises:
        ValueError: ``outcome`` is not an :class:`AttemptOutcome` value, ``attempt`` is below 1,
            or a datetime is naive.
    """

    attempt: int
    phase: Phase
    timestamp: datetime
    ended_at: datetime | None = None
    duration_ms: float | None = None
    outcome: str = AttemptOutcome.IN_FLIGHT
    classification: str | None = None
    retryable: bool | None = None
    detail: str | None = None
    close_code: int | None = None
    close_reason: str | None = None
    next_retry_delay_ms: float | None = None
    next_retry_eta: datetime | None = None
    closed_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.attempt < 1:
            raise ValueError(f"attempt number counts from 1, got {self.attempt}")
        if self.outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}, got {self.outcome!r}")
        _require_aware("timestamp", self.timestamp)
        _require_aware("ended_at", self.ended_at)
        _require_aware("next_retry_eta", self.next_retry_eta)
        _require_aware("closed_at", self.closed_at)

    @property
    def number(self) -> int:
        """The earlier name of :attr:`attempt`."""
        return self.attempt

    @property
    def started_at(self) -> datetime:
        """The earlier name of :attr:`timestamp`."""
        return self.timestamp

    @property
    def failure_kind(self) -> str | None:
        """The earlier name of :attr:`classification`."""
        return self.classification

    @property
    def next_retry_at(self) -> datetime | None:
        """The earlier name of :attr:`next_retry_eta`."""
        return self.next_retry_eta

    def to_dict(self) -> dict[str, Any]:
        """Return the attempt as JSON-ready data, the seed's fields first; datetimes become
        ``...Z`` strings."""
        return {
            "attempt": self.attempt,
            "timestamp": format_timestamp(self.timestamp),
            "duration_ms": self.duration_ms,
            "close_code": None if self.close_code is None else int(self.close_code),
            "close_reason": self.close_reason,
            "classification": None if self.classification is None else str(self.classification),
            "next_retry_eta": _ts(self.next_retry_eta),
            "phase": str(self.phase),
            "outcome": str(self.outcome),
            "ended_at": _ts(self.ended_at),
            "closed_at": _ts(self.closed_at),
            "retryable": self.retryable,
            "detail": self.detail,
            "next_retry_delay_ms": self.next_retry_delay_ms,
        }


@dataclass(frozen=True)
class ConnectionStats:
    """Counters of the seed's ``WSConnectionStats``.

    ``messages_received`` and ``messages_sent`` count the same kinds: every frame, pings, pongs,
    the hello and v2's acks included (unparseable frames too); ``heartbeats_*`` count the pings
    and pongs among them. ``message_counts_by_type`` is stored as a read-only copy, so a stats
    value never changes after it is built. That field is left out of the hash (a mapping proxy
    is unhashable) but still takes part in equality.
    """

    total_attempts: int = 0
    successful_connections: int = 0
    current_uptime_ms: float = 0.0
    messages_received: int = 0
    messages_sent: int = 0
    heartbeats_received: int = 0
    heartbeats_sent: int = 0
    last_activity: datetime | None = None
    connection_start: datetime | None = None
    message_counts_by_type: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    def __post_init__(self) -> None:
        _require_aware("last_activity", self.last_activity)
        _require_aware("connection_start", self.connection_start)
        # Copy even a proxy: the dict behind someone else's proxy may still change.
        frozen = MappingProxyType(dict(self.message_counts_by_type))
        object.__setattr__(self, "message_counts_by_type", frozen)

    def to_dict(self) -> dict[str, Any]:
        """Return the stats as JSON-ready data; datetimes become ``...Z`` strings."""
        return {
            "total_attempts": self.total_attempts,
            "successful_connections": self.successful_connections,
            "current_uptime_ms": self.current_uptime_ms,
            "messages_received": self.messages_received,
            "messages_sent": self.messages_sent,
            "heartbeats_received": self.heartbeats_received,
            "heartbeats_sent": self.heartbeats_sent,
            "last_activity": _ts(self.last_activity),
            "connection_start": _ts(self.connection_start),
            "message_counts_by_type": dict(self.message_counts_by_type),
        }


@dataclass(frozen=True)
class DeliveryStats:
    """Protocol v2's delivery figures (``WSState.delivery``); see ``docs/protocol.md``.

    ``unacknowledged`` counts messages ``send()`` accepted that the server has not acknowledged
    yet (written or waiting); ``resent`` those written again after a resume; ``duplicates_dropped``
    received messages dropped because their offset was already delivered; ``replayed`` messages
    the server replayed on resumes; ``last_resume_outcome`` what became of the session on the
    last hello (``new``, ``resumed``, ``wrong_epoch``, ``trimmed``, ...).
    """

    unacknowledged: int = 0
    resent: int = 0
    duplicates_dropped: int = 0
    replayed: int = 0
    last_resume_outcome: str | None = None
    session_id: str | None = None
    last_offset: int = 0
    """The last contiguous offset delivered to the application."""

    def to_dict(self) -> dict[str, Any]:
        """Return the figures as JSON-ready data."""
        return {
            "unacknowledged": self.unacknowledged,
            "resent": self.resent,
            "duplicates_dropped": self.duplicates_dropped,
            "replayed": self.replayed,
            "last_resume_outcome": self.last_resume_outcome,
            "session_id": self.session_id,
            "last_offset": self.last_offset,
        }


@dataclass(frozen=True)
class WSState:
    """A snapshot of the whole client state, with the seed's ``WSState`` field names.

    ``recent_attempts`` is newest first. ``connection_features`` is what the last hello
    advertised. ``is_fallback_mode`` is true only while the phase is ``fallback``.
    ``protocol_version`` is the version in use (a v2 client refused by a v1-only server runs
    v1), and ``delivery`` holds v2's figures (None in v1).
    """

    phase: Phase
    client_id: str
    url: str
    stats: ConnectionStats = field(default_factory=ConnectionStats)
    current_attempt: ConnectionAttempt | None = None
    recent_attempts: tuple[ConnectionAttempt, ...] = ()
    fallback_reason: str | None = None
    last_hello_message: Hello | None = None
    connection_features: tuple[str, ...] = ()
    is_fallback_mode: bool = False
    protocol_version: int = 1
    delivery: DeliveryStats | None = None

    def __post_init__(self) -> None:
        # Callers may hand in lists; tuples keep the snapshot immutable and hashable.
        object.__setattr__(self, "recent_attempts", tuple(self.recent_attempts))
        object.__setattr__(self, "connection_features", tuple(self.connection_features))

    def to_dict(self) -> dict[str, Any]:
        """Return the state as JSON-ready data (the hello via :meth:`Hello.to_dict`)."""
        return {
            "phase": str(self.phase),
            "client_id": self.client_id,
            "url": self.url,
            "stats": self.stats.to_dict(),
            "current_attempt": (
                None if self.current_attempt is None else self.current_attempt.to_dict()
            ),
            "recent_attempts": [attempt.to_dict() for attempt in self.recent_attempts],
            "fallback_reason": self.fallback_reason,
            "last_hello_message": (
                None if self.last_hello_message is None else self.last_hello_message.to_dict()
            ),
            "connection_features": list(self.connection_features),
            "is_fallback_mode": self.is_fallback_mode,
            "protocol_version": self.protocol_version,
            "delivery": None if self.delivery is None else self.delivery.to_dict(),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """Return :meth:`to_dict` as JSON text; compact unless ``indent`` is given."""
        separators = (",", ":") if indent is None else (",", ": ")
        return json.dumps(self.to_dict(), indent=indent, separators=separators, allow_nan=False)
