"""Effects as plain data, and the short descriptions the docs table is made of."""

from __future__ import annotations

import pytest

from steadysocket.model.effects import (
    CancelTimer,
    CloseSocket,
    Effect,
    FlushQueue,
    OpenSocket,
    ResetBackoff,
    ReturnQueue,
    SendPing,
    StartTimer,
    Timer,
    describe,
)


@pytest.mark.parametrize(
    ("effect", "text"),
    [
        (OpenSocket(), "open socket"),
        (OpenSocket(attempt=3), "open socket"),
        (OpenSocket(probe=True), "open socket (probe)"),
        (CloseSocket(1000, "Client disconnect"), "close 1000 'Client disconnect'"),
        (StartTimer(Timer.RETRY, 1000.0), "start retry timer"),
        (CancelTimer(Timer.HEARTBEAT), "cancel heartbeat timer"),
        (SendPing(), "send ping"),
        (FlushQueue(), "flush queue"),
        (ReturnQueue(), "return queue"),
        (ResetBackoff(), "reset backoff"),
    ],
)
def test_every_effect_has_a_short_description(effect: Effect, text: str) -> None:
    assert describe(effect) == text


def test_effects_are_frozen_values() -> None:
    assert StartTimer(Timer.STABLE, 5.0) == StartTimer(Timer.STABLE, 5.0)
    assert len({CancelTimer(Timer.RETRY), CancelTimer(Timer.RETRY)}) == 1
    with pytest.raises(AttributeError):
        OpenSocket().probe = True  # type: ignore[misc]
