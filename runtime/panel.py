"""The diagnostics panel: the seed's React panel as plain text for a terminal.

``render(state, ...)`` is a pure function from a ``WSState`` snapshot to the panel's text, so it
can be tested and captured without a terminal. ``steadysocket connect`` redraws it at least once a
second and on every change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

from steadysocket.model.snapshot import ConnectionAttempt, WSState

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


def render(
    state: WSState,
    *,
    now: datetime,
    recent_messages: Iterable[dict[str, object]] = (),
    notice: str | None = None,
) -> str:
    """The panel as text. ``now`` makes the ETAs and ages deterministic in tests."""
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
