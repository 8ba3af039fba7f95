"""The Sans-I/O client: the lifecycle plus everything around it that needs no I/O.

``ClientCore`` takes what happened (the application's calls, a socket's hello or close, a timer
firing, a text frame) and returns the effects the runtime must carry out. It owns:

- the ``Lifecycle`` machine, which makes every phase decision;
- the filter for late I/O: each socket and each timer carries a token, and an event from a socket
  that was already closed, or from a timer that was already cancelled, is ignored rather than fed
  to the strict machine (this is what makes ``force_reconnect()`` race-free);
- the heartbeat watchdog, a lazy deadline: it is armed once and, when it fires, compares the
  silence with the hello's interval instead of being re-armed on every message;
- statistics, recent attempts, the fallback reason and the bounded send queue;
- with ``version=2``, protocol v2's client side (``ClientDelivery``): the numbered outbox that
  replaces the queue, offsets and acks, the resume query, and the downgrade to v1 when a server
  refuses v2 with 4400.

It reads time only from the injected ``Clock`` and never touches a socket.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.classify import (
    Classification,
    CloseFailure,
    ErrorFailure,
    ErrorKind,
    Failure,
    classify,
)
from steadysocket.model.delivery import (
    ClientDelivery,
    DeliveryConfig,
    Inbound,
    ResumeOutcome,
    check_application_message,
    unnumber,
)
from steadysocket.model.effects import (
    CancelTimer,
    CloseSocket,
    Effect,
    OpenSocket,
    ResetBackoff,
    SendPing,
    StartTimer,
    Timer,
)
from steadysocket.model.lifecycle import (
    DEAD_AFTER,
    DEGRADED_AFTER,
    GRACEFUL_JITTER_MS,
    Lifecycle,
)
from steadysocket.model.logs import DedupLogger
from steadysocket.model.protocol import (
    CloseCode,
    Hello,
    InvalidMessage,
    ProtocolError,
    ack_text,
    build_client_url,
    decode_text,
    encode,
    format_timestamp,
    make_ping,
    make_pong,
)
from steadysocket.model.server_session import DEFAULT_MAX_MESSAGE_BYTES
from steadysocket.model.snapshot import (
    AttemptOutcome,
    ConnectionAttempt,
    ConnectionStats,
    DeliveryStats,
    Phase,
    WSState,
)

_logger = logging.getLogger(__name__)

RECENT_ATTEMPTS = 10
"""How many attempts ``recent_attempts`` keeps, newest first."""

SENDING_PHASES = frozenset({Phase.OPEN, Phase.DEGRADED})
QUEUEING_PHASES = frozenset({Phase.CONNECTING, Phase.RECONNECTING, Phase.FAILED})
INTERNAL_TYPES = frozenset({"hello", "ping", "pong"})
"""System messages the client consumes itself; everything else reaches the listeners."""
SESSION_ENDING_PHASES = frozenset({Phase.IDLE, Phase.FALLBACK})
"""Entering one of these ends a v2 session: what it holds unacknowledged is handed back."""
NOT_SENT = "not sent"
"""The reason given with messages handed back that were never written to a server."""
NOT_ACKNOWLEDGED = "not acknowledged"
"""The reason given with v2 messages handed back that were written but never acknowledged: the
server may or may not have handled them (never by a session the client can still reach)."""


class Clock(Protocol):
    """Time, injected: a monotonic clock in seconds and an aware UTC wall clock."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware."""


class Offer(StrEnum):
    """What ``ClientCore.offer`` decided for an outgoing message."""

    SEND = "send"
    QUEUED = "queued"
    REFUSED_PHASE = "refused_phase"
    REFUSED_FULL = "refused_full"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a client is configured with. Validated on construction."""

    base_url: str
    client_id: str
    version: int = 1
    role: str = "frontend"
    connection_timeout_ms: float = 10_000
    enable_heartbeat: bool = True
    fallback_probe_interval_ms: float | None = 60_000
    stable_after_ms: float = 5_000
    graceful_jitter_ms: float = GRACEFUL_JITTER_MS
    """After a graceful close (1001 with ``graceful_reconnect``) the reconnect waits a delay
    drawn uniformly from 0 to this many ms, so that a server's clients do not all dial at
    once; 0 reconnects at once."""
    send_queue_limit: int = 1000
    """v1: messages queued while no connection is open; v2: messages not yet acknowledged."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """The largest encoded message ``send()`` accepts; the server's default limit."""
    alternate_urls: tuple[str, ...] = ()
    """More base URLs (other servers of one cluster): after a failed attempt or a lost
    connection the next attempt dials the next URL, round the list, like Ably's fallback hosts."""
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    """v2's ack batching (``ack_every``, ``ack_interval_ms``); the rest is the server's."""

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client_id must be a non-empty string")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version!r}")
        if self.send_queue_limit < 0:
            raise ValueError(f"send_queue_limit must be >= 0, got {self.send_queue_limit!r}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be >= 1, got {self.max_message_bytes!r}")
        # Raises ValueError with the reason for a malformed URL.
        for base_url in (self.base_url, *self.alternate_urls):
            build_client_url(base_url, self.client_id, self.version, self.role)

    @property
    def url(self) -> str:
        """The URL dialled: the base path plus ``/ws/client`` and the query."""
        return build_client_url(self.base_url, self.client_id, self.version, self.role)


@dataclass(frozen=True, slots=True)
class Received:
    """What one incoming text frame amounted to."""

    message: dict[str, Any] | None
    """The decoded message for the listeners, or None (unparseable, or consumed internally)."""
    reply: str | None
    """Text to send back at once (a pong, a v2 ack), or None."""
    effects: list[Effect]
    """Lifecycle effects (only when the frame ended a degraded spell)."""
    acked: int | None = None
    """v2: the server acknowledged every id up to this one."""
    violation: str | None = None
    """v2: the frame broke the protocol (an offset gap): the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class ResumeReport:
    """What a v2 hello did to the session (``on_resume``)."""

    outcome: ResumeOutcome
    """``resumed``, or why not (``wrong_epoch``, ``unknown_session``, ``trimmed``, ...)."""
    session_id: str
    replayed: int
    """Messages the server replays after the hello."""
    returned: tuple[str, ...]
    """Encoded messages handed back "not acknowledged" because the resume was refused."""

    @property
    def resumed(self) -> bool:
        """Whether the session continued (nothing was lost)."""
        return self.outcome is ResumeOutcome.RESUMED


class ClientCore:
    """The client's decisions, without I/O. See the module docstring."""

    def __init__(
        self,
        config: ClientConfig,
        clock: Clock,
        backoff: BackoffStrategy | None = None,
    ) -> None:
        self.log = DedupLogger(_logger)
        """Per client, so one client's repeated lines are not interleaved with another's."""
        self.config = config
        self.clock = clock
        self._monotonic = clock.monotonic
        self.version = config.version
        """The protocol version in use: 2 falls back to 1 when a server refuses it."""
        self.delivery: ClientDelivery | None = (
            ClientDelivery(config.delivery, outbox_limit=config.send_queue_limit)
            if config.version == 2
            else None
        )
        self.max_message_bytes = config.max_message_bytes
        """The configured limit, lowered to what a v2 server's hello says it accepts."""
        self._returns: list[tuple[str, list[str]]] = []
        self._resume_report: ResumeReport | None = None
        self._url_index = 0
        self.lifecycle = Lifecycle(
            backoff=backoff if backoff is not None else BackoffStrategy(),
            connection_timeout_ms=config.connection_timeout_ms,
            stable_after_ms=config.stable_after_ms,
            graceful_jitter_ms=config.graceful_jitter_ms,
            fallback_probe_interval_ms=config.fallback_probe_interval_ms,
        )
        self._phase = self.lifecycle.phase
        self.generation = 0
        """Number of the newest socket; each OpenSocket effect makes a new one."""
        self.live_generation: int | None = None
        """The socket whose events are still wanted; None once it was closed or failed."""
        self._timer_tokens: dict[Timer, int] = {}
        self._next_token = 0
        self._timer_due: dict[Timer, float] = {}

        self._stamp_key = -1
        self._stamp_text = ""
        self.queue: deque[str] = deque()
        """Encoded messages accepted while no connection is open, oldest first."""
        self.hello: Hello | None = None
        self.fallback_reason: str | None = None
        self.last_failure: Failure | None = None

        self.total_attempts = 0
        self.successful_connections = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.data_sent = 0
        """Application messages written (``messages_sent`` less pings, pongs and acks)."""
        self.heartbeats_received = 0
        self.heartbeats_sent = 0
        self.message_counts: Counter[str] = Counter()
        self._last_activity: float | None = None
        self._opened_at: float | None = None
        self._connection_start: datetime | None = None
        self._current: ConnectionAttempt | None = None
        self._current_started: float = 0.0
        self._recent: deque[ConnectionAttempt] = deque(maxlen=RECENT_ATTEMPTS)

    # -- state -----------------------------------------------------------------------------

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The base URLs dialled in turn: ``base_url``, then ``alternate_urls``."""
        return (self.config.base_url, *self.config.alternate_urls)

    @property
    def url(self) -> str:
        """The URL the next attempt dials (in v2 with the resume query, once there is a
        session)."""
        resume = self.delivery.resume_query() if self.delivery is not None else None
        config = self.config
        return build_client_url(
            self.base_urls[self._url_index % len(self.base_urls)],
            config.client_id,
            self.version,
            config.role,
            resume=resume,
        )

    @property
    def phase(self) -> Phase:
        """The current phase."""
        # Kept by _fire(): the message path reads it per frame, and converting the machine's
        # state value to a Phase each time showed up in the client benchmark's profile.
        return self._phase

    @property
    def pending_timers(self) -> frozenset[Timer]:
        """The timers the runtime should have armed right now."""
        return frozenset(self._timer_tokens)

    def timer_due(self, timer: Timer) -> float | None:
        """When a pending timer is due, on the monotonic clock (seconds)."""
        return self._timer_due.get(timer)

    # -- the application -------------------------------------------------------------------

    def connect(self) -> list[Effect]:
        """Start connecting from ``idle`` or ``fallback``; elsewhere a logged no-op."""
        return self._user("connect")

    def disconnect(self) -> list[Effect]:
        """Close 1000, cancel everything, go ``idle``. Works from any phase."""
        return self._user("disconnect")

    def force_reconnect(self) -> list[Effect]:
        """Drop the current socket, reset the backoff, and start a fresh attempt."""
        return self._user("force_reconnect")

    def _user(self, event: str) -> list[Effect]:
        if not self.lifecycle.can(event):
            self.log.info("[WS] %s ignored in phase %s", event, self.phase)
            return []
        aborted = self._current is not None and self._current.outcome == AttemptOutcome.IN_FLIGHT
        if aborted:
            self._finish_attempt(AttemptOutcome.ABORTED, detail=f"{event} by the application")
        effects = self._fire(event)
        for effect in effects:
            if isinstance(effect, CloseSocket) and not aborted:
                self._connection_ended(None, code=effect.code, reason=effect.reason)
        return effects

    # -- the socket ------------------------------------------------------------------------

    def _stale(self, generation: int, what: str) -> bool:
        if generation != self.live_generation:
            self.log.debug("[WS] ignoring %s from closed socket #%d", what, generation)
            return True
        return False

    def hello_received(self, generation: int, text: str) -> list[Effect]:
        """The first frame of socket ``generation``: a valid hello opens the connection."""
        if self._stale(generation, "hello"):
            return []
        self._count_received(text)
        try:
            data = decode_text(text)
            # Count every parsed frame by type (PROTOCOL Client 12), the hello as well as a
            # wrong first message or a hello that fails validation below.
            self.message_counts[str(data["type"])] += 1
            if data.get("type") != "hello":
                raise InvalidMessage(f"expected a hello first, got type {data.get('type')!r}")
            hello = Hello.from_dict(data)
        except ProtocolError as exc:
            return self.attempt_failed(generation, ErrorFailure(ErrorKind.INVALID_HELLO, str(exc)))
        if hello.accepted_version != self.version:
            return self.attempt_failed(
                generation,
                ErrorFailure(
                    ErrorKind.VERSION_MISMATCH,
                    f"asked for version {self.version}, server accepted {hello.accepted_version}",
                ),
            )
        if hello.session is not None and self.delivery is not None:
            self._opened_session(hello)
        self.hello = hello
        self.lifecycle.heartbeat_interval_ms = (
            float(hello.heartbeat_interval_ms) if self.config.enable_heartbeat else None
        )
        now = self.clock.monotonic()
        self._last_activity = now
        self._opened_at = now
        self._connection_start = self.clock.now()
        self.successful_connections += 1
        self._finish_attempt(AttemptOutcome.OPEN)
        self.log.info("[WS] Received hello message from server")
        return self._fire("handshake_succeeded")

    def _opened_session(self, hello: Hello) -> None:
        session, delivery = hello.session, self.delivery
        assert session is not None
        assert delivery is not None
        try:
            told: ResumeOutcome | None = ResumeOutcome(session.resume_outcome)
        except ValueError:
            told = None
        lost = delivery.opened(
            session.session_id, session.epoch, session.resumed, told, session.replayed
        )
        outcome = delivery.last_outcome
        assert outcome is not None
        returned = [unnumber(p.text) for p in lost]
        if returned:
            self._returns.append((NOT_ACKNOWLEDGED, returned))
        if outcome is not ResumeOutcome.NEW:
            self._resume_report = ResumeReport(
                outcome, session.session_id, session.replayed, tuple(returned)
            )
            if outcome is ResumeOutcome.RESUMED:
                self.log.info("[WS] session resumed (%d replayed)", session.replayed)
            else:
                self.log.warning(
                    "[WS] session not resumed (%s): %d message(s) handed back",
                    outcome,
                    len(returned),
                )
        self.max_message_bytes = min(self.config.max_message_bytes, session.max_message_bytes)

    def take_resume_report(self) -> ResumeReport | None:
        """The report of the last v2 hello that asked to resume, once (None otherwise)."""
        report, self._resume_report = self._resume_report, None
        return report

    def take_returns(self) -> list[tuple[str, list[str]]]:
        """Encoded messages the model handed back since the last call, with their reason."""
        returns, self._returns = self._returns, []
        return returns

    def attempt_failed(self, generation: int, failure: Failure) -> list[Effect]:
        """The attempt on socket ``generation`` failed before a valid hello.

        A v2 client refused with 4400 (a server that speaks only v1) runs v1 from then on and
        retries: at most once delivery, reported in ``WSState.protocol_version``.
        """
        if self._stale(generation, f"failure ({failure.describe()})"):
            return []
        self.live_generation = None
        downgrade = (
            self.delivery is not None
            and isinstance(failure, CloseFailure)
            and failure.code == CloseCode.UNSUPPORTED_VERSION
        )
        if downgrade:
            self._downgrade()
        return self._failed(failure, retry=downgrade)

    def _downgrade(self) -> None:
        delivery = self.delivery
        assert delivery is not None
        self.log.warning("[WS] the server refused protocol v2: running v1 (at most once)")
        written = delivery.ever_written
        pending = delivery.abandon()
        lost = [unnumber(p.text) for p in pending if p.id <= written]
        if lost:
            self._returns.append((NOT_ACKNOWLEDGED, lost))
        self.queue.extend(unnumber(p.text) for p in pending if p.id > written)
        self.delivery = None
        self.version = 1

    def _next_url(self) -> None:
        """A failure: the next attempt dials the next base URL (round the list)."""
        if len(self.base_urls) > 1:
            self._url_index = (self._url_index + 1) % len(self.base_urls)
            self.log.info("[WS] next attempt goes to %s", self.base_urls[self._url_index])

    def _failed(self, failure: Failure, *, retry: bool = False) -> list[Effect]:
        self._next_url()
        classification = classify(failure)
        self.last_failure = failure
        # A failure that is retried is news, not a fault: INFO. WARNING is for what gives up
        # (a failure not retried; entering fallback logs its own warning).
        self.log.log(
            logging.INFO if classification.retryable or retry else logging.WARNING,
            "[WS] Connection failed: %s (%s)",
            failure.describe(),
            classification.kind,
        )
        self._finish_attempt(AttemptOutcome.FAILED, failure=failure, classification=classification)
        effects = self._fire("attempt_failed", retryable=classification.retryable or retry)
        self._note_retry(effects)
        return effects

    def closed(self, generation: int, failure: CloseFailure | ErrorFailure) -> list[Effect]:
        """Socket ``generation`` ended after it was open."""
        if self._stale(generation, f"close ({failure.describe()})"):
            return []
        self.live_generation = None
        self._opened_at = None
        self.last_failure = failure
        self._connection_ended(failure)
        self._next_url()
        if isinstance(failure, CloseFailure) and failure.code == 1000:
            self.log.info("[WS] server closed the connection normally")
            return self._fire("closed_by_server")
        classification = classify(failure)
        graceful = (
            isinstance(failure, CloseFailure)
            and failure.code == 1001
            and self.hello is not None
            and "graceful_reconnect" in self.hello.features
        )
        self.log.log(
            logging.INFO if classification.retryable else logging.WARNING,
            "[WS] Connection lost: %s (%s)",
            failure.describe(),
            classification.kind,
        )
        return self._lost("connection_lost", failure, classification, graceful=graceful)

    def _lost(
        self, event: str, failure: Failure, classification: Classification, *, graceful: bool
    ) -> list[Effect]:
        effects = self._fire(event, retryable=classification.retryable, graceful=graceful)
        self._note_retry(effects)
        return effects

    # -- timers ----------------------------------------------------------------------------

    def timer_fired(self, timer: Timer, token: int) -> list[Effect]:
        """A timer the runtime armed has fired; a cancelled or superseded one is ignored."""
        if self._timer_tokens.get(timer) != token:
            self.log.debug("[WS] ignoring stale %s timer", timer)
            return []
        del self._timer_tokens[timer]
        self._timer_due.pop(timer, None)
        match timer:
            case Timer.CONNECT:
                assert self.live_generation is not None, "connect timer without an attempt"
                timeout = ErrorFailure(
                    ErrorKind.CONNECT_TIMEOUT,
                    f"no valid hello within {self.config.connection_timeout_ms:g} ms",
                )
                self.live_generation = None
                return self._failed(timeout)
            case Timer.RETRY:
                return self._fire("retry_due")
            case Timer.GRACEFUL:
                return self._fire("reconnect_due")
            case Timer.PROBE:
                self.log.info("[WS] fallback recovery probe")
                return self._fire("probe_due")
            case Timer.STABLE:
                self.log.debug("[WS] connection stable: outage over, backoff reset")
                return self._fire("stable")
            case Timer.HEARTBEAT:  # pragma: no branch - the match covers every Timer
                return self._watchdog()

    def _watchdog(self) -> list[Effect]:
        interval = self.lifecycle.heartbeat_interval_ms
        assert interval is not None
        assert self._last_activity is not None
        silence_ms = (self.clock.monotonic() - self._last_activity) * 1000.0
        if self.phase is Phase.OPEN:
            if silence_ms >= DEGRADED_AFTER * interval:
                self.log.info("[WS] nothing received for %.0f ms: degraded", silence_ms)
                effects = self._fire("heartbeat_overdue")
                self.heartbeats_sent += sum(isinstance(e, SendPing) for e in effects)
                return effects
            return self._rearm_watchdog(DEGRADED_AFTER * interval - silence_ms)
        if silence_ms >= DEAD_AFTER * interval:
            failure = ErrorFailure(
                ErrorKind.HEARTBEAT_TIMEOUT, f"nothing received for {silence_ms:.0f} ms"
            )
            self.last_failure = failure
            self.live_generation = None
            self._opened_at = None
            self._connection_ended(failure)
            self._next_url()
            self.log.info("[WS] peer dead: %s", failure.describe())
            effects = self._fire("peer_dead")
            self._note_retry(effects)
            return effects
        return self._rearm_watchdog(DEAD_AFTER * interval - silence_ms)

    def _rearm_watchdog(self, delay_ms: float) -> list[Effect]:
        # Traffic arrived since the timer was armed: not a lifecycle event, just a later check.
        return self._resolve([StartTimer(Timer.HEARTBEAT, max(delay_ms, 1.0))])

    # -- data ------------------------------------------------------------------------------

    def received(self, text: str) -> Received:
        """A text frame on the open connection. Cheap: no lifecycle event unless degraded."""
        result = self.received_fast(text)
        if isinstance(result, dict):
            return Received(result, None, [])
        return result

    def received_fast(self, text: str) -> dict[str, Any] | Received:
        """:meth:`received` for the runtime's hot path: a plain application message on a
        connection that is not degraded comes back as the decoded dict itself (nothing to
        send, no effect); anything else as a :class:`Received`."""
        self.messages_received += 1
        self._last_activity = self._monotonic()
        try:
            data = decode_text(text)
        except ProtocolError as exc:
            self.log.debug("[WS] unparseable message: %s", exc)
            return Received(None, None, self._resume())
        kind = data["type"]
        self.message_counts[kind] += 1
        if kind in INTERNAL_TYPES:
            reply = None
            if kind == "ping":
                self.heartbeats_received += 1
                reply = make_pong(self.clock.now(), self.config.client_id).serialize()
                self.heartbeats_sent += 1
            elif kind == "pong":
                self.heartbeats_received += 1
            return Received(None, reply, self._resume())
        if self._phase is Phase.DEGRADED:
            return Received(data, None, self._resume())
        return data

    def received_v2(self, text: str) -> Received:
        """A text frame on an open v2 connection: offsets put in order, acks taken.

        A message with an ``offset`` reaches the listeners (without the field) only if it is
        the next in order; a duplicate is dropped and acknowledged again; a gap is a
        violation. ``{"type":"ack","id":N}`` acknowledges the outbox up to ``N``.
        """
        result = self.received_v2_fast(text)
        if isinstance(result, dict):
            return Received(result, None, [])
        return result

    def received_v2_fast(self, text: str) -> dict[str, Any] | Received:
        """:meth:`received_v2` for the runtime's hot path: the next message in order, with no
        ack due and no effect, comes back as the dict itself; anything else as a
        :class:`Received`."""
        result = self.received_fast(text)
        delivery = self.delivery
        if delivery is None:
            return result
        effects: list[Effect] | None = None
        if isinstance(result, dict):
            message = result
        else:
            if result.message is None:
                return result
            message, effects = result.message, result.effects
        if message["type"] == "ack":
            upto = message.get("id")
            if not isinstance(upto, int) or not _is_count(upto):
                return Received(None, None, effects or [], violation=f"bad ack {text[:60]!r}")
            delivery.acked(upto)
            return Received(None, None, effects or [], acked=upto)
        offset = message.pop("offset", None)
        if offset is None:
            return result  # a control message (error, status): not numbered
        if not isinstance(offset, int) or not _is_count(offset):
            return Received(None, None, effects or [], violation=f"bad offset {offset!r}")
        verdict, upto = delivery.received(offset)
        if verdict is Inbound.DELIVER:
            if upto is None and effects is None:
                return message
            ack = None if upto is None else ack_text("offset", upto, self.timestamp())
            return Received(message, ack, effects or [])
        if verdict is Inbound.DUPLICATE:
            self.log.debug("[WS] dropped duplicate offset %d", offset)
            ack = None if upto is None else ack_text("offset", upto, self.timestamp())
            return Received(None, ack, effects or [])
        return Received(
            None,
            None,
            effects or [],
            violation=f"offset {offset} after {delivery.last_offset}: a gap",
        )

    def ack_timer_wanted(self) -> float | None:
        """v2: the delay (ms) of an ack timer the runtime should arm now, or None; call it
        after a frame was delivered, and :meth:`ack_due` when the timer fires."""
        delivery = self.delivery
        if delivery is None or not delivery.offsets.timer_wanted:
            return None
        delivery.offsets.timer_armed = True
        return delivery.config.ack_interval_ms

    def ack_due(self) -> str | None:
        """v2: the ack timer fired: the ack to send, or None if nothing is owed."""
        delivery = self.delivery
        upto = None if delivery is None else delivery.offsets.due()
        return None if upto is None else ack_text("offset", upto, self.timestamp())

    def received_binary(self, size: int) -> list[Effect]:
        """A binary frame on the open connection: not part of the protocol, so it reaches no
        listener, but it is traffic all the same (it counts, and it ends a degraded spell)."""
        self._count_received("")
        self.log.debug("[WS] ignoring a binary frame of %d bytes", size)
        return self._resume()

    def _count_received(self, text: str) -> None:
        self.messages_received += 1
        self._last_activity = self._monotonic()

    def _resume(self) -> list[Effect]:
        if self.phase is Phase.DEGRADED:
            self.log.info("[WS] traffic resumed")
            return self._fire("traffic_resumed")
        return []

    def ping_text(self) -> str:
        """A client ping, counted in ``heartbeats_sent`` once the runtime sends it."""
        return make_ping(self.clock.now()).serialize()

    def prepare(self, message: Mapping[str, Any]) -> str:
        """Encode an application message for the wire, adding a ``timestamp`` if it has none.

        This is where a message is validated, once, before anything accepts it.

        Raises:
            TypeError: ``message`` is not a mapping, or holds a value JSON cannot encode (a
                ``datetime``, a function, a tuple as a key...; int, float,
                bool and None keys become strings, as in JSON).
            ValueError: a value is NaN or infinite, the structure is circular or nested too
                deeply, or the encoded text is longer than ``max_message_bytes``.
        """
        if not isinstance(message, Mapping):
            raise TypeError(f"a message must be a mapping, got {type(message).__name__}")
        if self.delivery is not None:
            check_application_message(message)
        if "timestamp" not in message:
            # The only copy on this path, and only when the timestamp is missing.
            message = {**message, "timestamp": self.timestamp()}
        try:
            text = encode(message)
        except TypeError as exc:
            raise TypeError(f"message cannot be encoded as JSON: {exc}") from None
        except RecursionError:
            raise ValueError("message cannot be encoded as JSON: nested too deeply") from None
        except ValueError as exc:
            raise ValueError(f"message cannot be encoded as JSON: {exc}") from None
        # ASCII-only JSON (ensure_ascii): the length is the size in bytes.
        if len(text) > self.max_message_bytes:
            raise ValueError(
                f"message is {len(text)} bytes encoded, over max_message_bytes "
                f"({self.max_message_bytes})"
            )
        return text

    def timestamp(self) -> str:
        """The wall time now, as the wire writes it; formatted once per millisecond (the wire's
        precision), since a busy sender stamps many messages within one."""
        now = self.clock.now()
        key = int(now.timestamp() * 1000)
        if key != self._stamp_key:
            self._stamp_key, self._stamp_text = key, format_timestamp(now)
        return self._stamp_text

    def offer(self, text: str) -> Offer:
        """Decide what happens to an encoded outgoing message in the current phase.

        In v2 an accepted message joins the outbox (bounded by ``send_queue_limit``) whatever
        the phase, and stays there until the server acknowledges it.
        """
        phase = self.phase
        delivery = self.delivery
        if delivery is not None:
            if phase not in SENDING_PHASES and phase not in QUEUEING_PHASES:
                return Offer.REFUSED_PHASE
            if delivery.full:
                return Offer.REFUSED_FULL
            delivery.accept(text)
            return Offer.SEND if phase in SENDING_PHASES else Offer.QUEUED
        if phase in SENDING_PHASES:
            return Offer.SEND
        if phase in QUEUEING_PHASES:
            if len(self.queue) >= self.config.send_queue_limit:
                return Offer.REFUSED_FULL
            self.queue.append(text)
            return Offer.QUEUED
        return Offer.REFUSED_PHASE

    def requeue(self, messages: list[str]) -> list[str]:
        """Put unsent messages back at the front of the queue, in order, when the phase queues.

        Returns those that could not be kept (phase or limit), for the application.
        """
        if self.phase not in QUEUEING_PHASES:
            return messages
        room = max(self.config.send_queue_limit - len(self.queue), 0)
        kept, rest = messages[:room], messages[room:]
        self.queue.extendleft(reversed(kept))
        return rest

    def take_queue(self) -> list[str]:
        """Empty the queue (for FlushQueue or ReturnQueue)."""
        items = list(self.queue)
        self.queue.clear()
        return items

    # -- the machine -----------------------------------------------------------------------

    def _fire(self, event: str, **kwargs: Any) -> list[Effect]:
        before = self._phase
        self.lifecycle.send(event, **kwargs)
        after = self._phase = self.lifecycle.phase
        effects = self._resolve(self.lifecycle.drain())
        if after is Phase.FALLBACK and before is not Phase.FALLBACK:
            self.fallback_reason = self._reason()
            self.log.warning("[WS] Entering fallback mode: %s", self.fallback_reason)
        elif after is not Phase.FALLBACK:
            self.fallback_reason = None
        if after is not before:
            self.log.info("[WS] transition from %s to %s", before, after)
            if after in SESSION_ENDING_PHASES and self.delivery is not None:
                self._end_session()
        return effects

    def _end_session(self) -> None:
        """Idle or fallback ends a v2 session: its outbox goes back to the application."""
        delivery = self.delivery
        assert delivery is not None
        written = delivery.ever_written
        pending = delivery.abandon()
        lost = [unnumber(p.text) for p in pending if p.id <= written]
        unsent = [unnumber(p.text) for p in pending if p.id > written]
        if lost:
            self._returns.append((NOT_ACKNOWLEDGED, lost))
        if unsent:
            self._returns.append((NOT_SENT, unsent))

    def _resolve(self, effects: list[Effect]) -> list[Effect]:
        out: list[Effect] = []
        now = self.clock.monotonic()
        for effect in effects:
            match effect:
                case OpenSocket():
                    self.generation += 1
                    self.live_generation = self.generation
                    self.total_attempts += 1
                    self._begin_attempt(effect)
                    if self.delivery is not None:
                        self.delivery.closed()  # nothing is written on the new socket yet
                case CloseSocket():
                    self.live_generation = None
                    self._opened_at = None
                case StartTimer(timer=timer, delay_ms=delay):
                    self._next_token += 1
                    self._timer_tokens[timer] = self._next_token
                    self._timer_due[timer] = now + (delay or 0.0) / 1000.0
                    effect = replace(effect, token=self._next_token)
                case CancelTimer(timer=timer):
                    self._timer_tokens.pop(timer, None)
                    self._timer_due.pop(timer, None)
                case ResetBackoff():
                    pass
            out.append(effect)
        return out

    def _reason(self) -> str:
        failure = self.last_failure
        # Every way into fallback (a failed attempt, a lost connection, a dead peer) records
        # its failure first.
        assert failure is not None, "fallback entered without a failure"
        classification = classify(failure)
        if not classification.retryable:
            return f"{failure.describe()} [{classification.kind}, not retryable]"
        return (
            f"{failure.describe()} [{classification.kind}] after "
            f"{self.lifecycle.attempts} of {self.lifecycle.max_attempts} attempts"
        )

    def _note_retry(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, StartTimer) and effect.timer in _NEXT_ATTEMPT_TIMERS:
                delay = effect.delay_ms or 0.0
                self.log.info(_NEXT_ATTEMPT_TIMERS[effect.timer], delay)
                # After a lost connection the retry is noted on the attempt that opened it:
                # the panel's next-retry ETA reads the newest attempt. A retry (or graceful)
                # timer only follows a finished attempt (failed, or the one that opened the
                # connection), so there is one.
                self._recent[0] = replace(
                    self._recent[0],
                    next_retry_delay_ms=delay,
                    next_retry_eta=self.clock.now() + timedelta(milliseconds=delay),
                )

    # -- attempts --------------------------------------------------------------------------

    def _begin_attempt(self, effect: OpenSocket) -> None:
        self.log.info("[WS] Attempting WebSocket connection")
        self._current_started = self.clock.monotonic()
        # Effects are resolved after the transition, so self.phase is the phase the attempt runs
        # in (fallback for a probe). Deriving it from the attempt number, as before, recorded
        # "connecting" for the first retry after a stable connection was lost, although the
        # client was reconnecting (the outage's counter had been reset).
        self._current = ConnectionAttempt(
            attempt=max(effect.attempt or 1, 1), phase=self.phase, timestamp=self.clock.now()
        )

    def _finish_attempt(
        self,
        outcome: AttemptOutcome,
        *,
        failure: Failure | None = None,
        classification: Classification | None = None,
        detail: str | None = None,
    ) -> None:
        if self._current is None:  # pragma: no cover - every caller has an attempt in flight
            return
        finished = replace(
            self._current,
            ended_at=self.clock.now(),
            duration_ms=(self.clock.monotonic() - self._current_started) * 1000.0,
            outcome=outcome,
            classification=None if classification is None else str(classification.kind),
            retryable=None if classification is None else classification.retryable,
            detail=detail if failure is None else failure.describe(),
            close_code=failure.code if isinstance(failure, CloseFailure) else None,
            close_reason=failure.reason if isinstance(failure, CloseFailure) else None,
        )
        self._recent.appendleft(finished)
        self._current = None

    def _connection_ended(
        self, failure: Failure | None, *, code: int | None = None, reason: str | None = None
    ) -> None:
        """Record on the attempt that opened the connection how the connection ended: a
        failure (with its classification), or the application's own close (``code``)."""
        if not self._recent or self._recent[0].outcome != AttemptOutcome.OPEN:
            return
        opened = self._recent[0]
        if opened.closed_at is not None:
            return
        if failure is None:
            self._recent[0] = replace(
                opened, closed_at=self.clock.now(), close_code=code, close_reason=reason
            )
            return
        classification = classify(failure)
        self._recent[0] = replace(
            opened,
            closed_at=self.clock.now(),
            close_code=failure.code if isinstance(failure, CloseFailure) else None,
            close_reason=failure.reason if isinstance(failure, CloseFailure) else None,
            classification=str(classification.kind),
            retryable=classification.retryable,
            detail=failure.describe(),
        )

    # -- views -----------------------------------------------------------------------------

    def uptime_ms(self) -> float:
        """Milliseconds since the current connection opened; 0 when not connected."""
        if self._opened_at is None or self.phase not in SENDING_PHASES:
            return 0.0
        return (self.clock.monotonic() - self._opened_at) * 1000.0

    def snapshot(self) -> WSState:
        """A fresh, immutable view of the whole state."""
        now_mono = self.clock.monotonic()
        now_wall = self.clock.now()
        last_activity = (
            None
            if self._last_activity is None
            else now_wall - timedelta(seconds=now_mono - self._last_activity)
        )
        stats = ConnectionStats(
            total_attempts=self.total_attempts,
            successful_connections=self.successful_connections,
            current_uptime_ms=self.uptime_ms(),
            messages_received=self.messages_received,
            messages_sent=self.messages_sent,
            heartbeats_received=self.heartbeats_received,
            heartbeats_sent=self.heartbeats_sent,
            last_activity=last_activity,
            connection_start=self._connection_start if self._opened_at is not None else None,
            message_counts_by_type=dict(self.message_counts),
        )
        return WSState(
            phase=self.phase,
            client_id=self.config.client_id,
            url=self.url,
            stats=stats,
            current_attempt=self._current,
            recent_attempts=tuple(self._recent),
            fallback_reason=self.fallback_reason,
            last_hello_message=self.hello,
            connection_features=self.hello.features if self.hello is not None else (),
            is_fallback_mode=self.phase is Phase.FALLBACK,
            protocol_version=self.version,
            delivery=self._delivery_stats(),
        )

    def _delivery_stats(self) -> DeliveryStats | None:
        delivery = self.delivery
        if delivery is None:
            return None
        outcome = delivery.last_outcome
        return DeliveryStats(
            unacknowledged=len(delivery.outbox),
            resent=delivery.resent,
            duplicates_dropped=delivery.duplicates_dropped,
            replayed=delivery.replayed,
            last_resume_outcome=None if outcome is None else str(outcome),
            session_id=delivery.session_id,
            last_offset=delivery.last_offset,
        )


_NEXT_ATTEMPT_TIMERS = {
    Timer.RETRY: "[WS] retrying in %.0f ms",
    Timer.GRACEFUL: "[WS] graceful reconnect in %.0f ms",
}
"""The timers that end in the outage's next attempt, with the line that announces each."""


def _is_count(value: object) -> bool:
    """A positive wire integer (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
