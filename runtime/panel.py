"""The diagnostics panel: the seed's React panel as plain text for a terminal.

``render(state, ...)`` is a pure function from a ``WSState`` snapshot to the panel's text, so it
can be tested and captured without a terminal. ``steadysocket connect`` redraws it at least once a
second and on every change.

During an outage the panel shows the attempt, how many are left and when the client will give up
(enter ``fallback``) if none connects: the wait for the next attempt plus the backoff delays
between the ones left, as a range when the delays are jittered. Attempts that time out rather
than fail at once add their time on top. When the client is switched off
(``WEBSOCKET_ENABLED=false``) the panel says why it stays idle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime, timedelta

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import ConnectionAttempt, Phase, WSState

KEYS_HELP = "keys: [c]onnect  [d]isconnect  [r]econnect  [p]ing  [q]uit"
WIDTH = 78


def _duration(ms: float) -> str:
    seconds = ms / 1000.0
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%H:%M:%S")


def _attempt_line(attempt: ConnectionAttempt, now: datetime) -> str:
    parts = [f"#{attempt.number:<2} {attempt.phase:<12} {attempt.outcome:<9}"]
    if attempt.duration_ms is not None:
        parts.append(f"{attempt.duration_ms:7.0f} ms")
    if attempt.failure_kind:
        retry = "retryable" if attempt.retryable else "final"
        parts.append(f"{attempt.failure_kind} ({retry})")
    if attempt.next_retry_at is not None:
        eta = (attempt.next_retry_at - now).total_seconds()
        parts.append(f"retry in {max(eta, 0.0):.1f}s" if eta > 0 else "retried")
    line = "  ".join(parts)
    if attempt.detail:
        line += f"\n      {attempt.detail}"
    return line


def _clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


_OUTAGE_PHASES = frozenset({Phase.CONNECTING, Phase.RECONNECTING, Phase.FAILED})


def outage_lines(state: WSState, *, now: datetime, backoff: BackoffStrategy) -> list[str]:
    """During an outage: the attempt, the attempts left, and when the client gives up.

    ``backoff`` is the strategy the client was built with (its ``max_attempts`` and delays).
    Returns no lines outside an outage.
    """
    if state.phase not in _OUTAGE_PHASES:
        return []
    in_flight = state.current_attempt
    latest = in_flight or (state.recent_attempts[0] if state.recent_attempts else None)
    if latest is None:
        return []
    total = backoff.max_attempts
    left = max(total - latest.number, 0)
    lines = [f"outage     attempt {latest.number} of {total}, {left} left"]
    if left == 0:
        if in_flight is not None:
            lines.append("gives up   if this attempt fails")
        return lines
    # The wait already scheduled (after a failed attempt), then one delay after each attempt
    # but the last. Delay i (0-based) follows attempt i + 1.
    low = high = 0.0
    first_delay = latest.number - 1
    if in_flight is None:
        first_delay = latest.number
        if latest.next_retry_at is not None:
            low = high = max((latest.next_retry_at - now).total_seconds(), 0.0)
    for index in range(first_delay, total - 1):
        lo_ms, hi_ms = backoff.bounds_for(index)
        low += lo_ms / 1000.0
        high += hi_ms / 1000.0
    digits = 1 if high < 10 else 0
    low_text, high_text = f"{low:.{digits}f}", f"{high:.{digits}f}"
    span = f"{low_text}s" if low_text == high_text else f"{low_text}-{high_text}s"
    by = _when(now + timedelta(seconds=math.ceil(high)))
    lines.append(f"gives up   in {span} (by {by}) if no attempt connects")
    return lines


def render(
    state: WSState,
    *,
    now: datetime,
    recent_messages: Iterable[dict[str, object]] = (),
    notice: str | None = None,
    backoff: BackoffStrategy | None = None,
    idle_reason: str | None = None,
) -> str:
    """The panel as text. ``now`` makes the ETAs and ages deterministic in tests.

    ``backoff`` (the client's strategy) adds the outage lines; ``idle_reason`` says why the
    client stays idle (shown while it is idle).
    """
    stats = state.stats
    lines = [
        "steadysocket diagnostics".ljust(WIDTH - 8) + _when(now),
        "=" * WIDTH,
        f"phase      {str(state.phase).upper()}"
        + ("   (fallback mode)" if state.is_fallback_mode else ""),
        _clip(f"url        {state.url}"),
        f"client_id  {state.client_id}",
        f"uptime     {_duration(stats.current_uptime_ms)}"
        f"   since {_when(stats.connection_start)}   last activity {_when(stats.last_activity)}",
    ]
    if state.fallback_reason:
        lines.append(_clip(f"fallback   {state.fallback_reason}"))
    if idle_reason and state.phase is Phase.IDLE:
        lines.append(_clip(f"idle       {idle_reason}: it will not connect"))
    if backoff is not None:
        lines += [_clip(line) for line in outage_lines(state, now=now, backoff=backoff)]
    lines += [
        "",
        "stats",
        f"  attempts {stats.total_attempts}   connections {stats.successful_connections}"
        f"   received {stats.messages_received}   sent {stats.messages_sent}",
        f"  heartbeats received {stats.heartbeats_received}   sent {stats.heartbeats_sent}",
    ]
    counts = ", ".join(f"{k}={v}" for k, v in sorted(stats.message_counts_by_type.items()))
    lines.append(_clip(f"  by type  {counts or '-'}"))
    features = ", ".join(state.connection_features) or "-"
    lines += ["", "server features", _clip(f"  {features}")]
    if state.last_hello_message is not None:
        lines.append(f"  heartbeat every {state.last_hello_message.heartbeat_interval_ms} ms")
    lines += ["", "recent attempts"]
    if state.current_attempt is not None:
        lines.append("  " + _attempt_line(state.current_attempt, now))
    if not state.recent_attempts and state.current_attempt is None:
        lines.append("  -")
    for attempt in state.recent_attempts:
        for part in _attempt_line(attempt, now).splitlines():
            lines.append(_clip("  " + part))
    lines += ["", "last messages"]
    shown = list(recent_messages)
    if not shown:
        lines.append("  -")
    for message in shown:
        lines.append(_clip("  " + json.dumps(message, separators=(",", ":"), default=str)))
    lines += ["", KEYS_HELP]
    if notice:
        lines.append(_clip(notice))
    return "\n".join(lines) + "\n"
