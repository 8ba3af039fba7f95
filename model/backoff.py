"""Jittered, capped backoff between reconnection attempts.

The formula and presets follow the seed's "Adaptive Backoff Strategy": for attempt ``i`` the base
delay is ``min(cap, base_delays[min(i, len - 1)])``, a uniform jitter of ``±base * jitter_ratio``
is added, and the result is never below 100 ms. Unlike the origin, a ``jitter_ratio`` of 0 really
means no jitter (docs/protocol.md, Client 6).

Randomness is injected (any object with ``random() -> float``, such as ``random.Random``) or
derived from a seed through :class:`SplitMix64`, so tests can pin exact sequences and this module
stays free of the ``random`` module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "MIN_DELAY_MS",
    "BackoffStrategy",
    "RandomSource",
    "SplitMix64",
]

MIN_DELAY_MS = 100.0
"""Floor applied to every delay, jittered or not, as the seed's formula prescribes."""

_MASK64 = (1 << 64) - 1


class RandomSource(Protocol):
    """Anything that yields uniform floats in ``[0, 1)``; ``random.Random`` satisfies it."""

    def random(self) -> float:
        """Return the next uniform float in ``[0, 1)``."""
        ...


class SplitMix64:
    """A tiny deterministic PRNG (Steele, Lea and Flood's SplitMix64).

    It exists so that seeded backoff needs no ``random`` import in the Sans-I/O model. It is not
    suitable for cryptography. Any ``int`` is accepted as a seed; it is reduced modulo 2**64, so
    negative seeds are fine.
    """

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        """Start the generator from ``seed`` (reduced modulo 2**64)."""
        self._state = seed & _MASK64

    def next_uint64(self) -> int:
        """Return the next raw 64-bit output, matching the reference SplitMix64 sequence."""
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def random(self) -> float:
        """Return a uniform float in ``[0, 1)`` with 53 bits of precision."""
        # The top 53 bits fill a double's mantissa exactly, so 1.0 can never be produced.
        return (self.next_uint64() >> 11) * (1.0 / (1 << 53))

    def __repr__(self) -> str:
        return f"SplitMix64(state={self._state:#018x})"


class BackoffStrategy:
    """Delays between the connection attempts of one outage.

    Args:
        base_delays_ms: Delay per attempt index; the last entry repeats for later attempts.
        cap_delay_ms: Upper bound applied to each base delay before jitter.
        jitter_ratio: Fraction of the base delay used as a symmetric jitter range, in ``[0, 1]``.
            ``0`` disables jitter and draws no randomness.
        max_attempts: How many delays :meth:`next_delay` hands out before returning ``None``.
        seed: Seed for a :class:`SplitMix64` source, for reproducible sequences.
        rng: An explicit random source; mutually exclusive with ``seed``.

    With neither ``seed`` nor ``rng``, a :class:`SplitMix64` is seeded from
    ``int.from_bytes(os.urandom(8), "big")`` so that independent clients do not retry in lockstep.

    Raises:
        ValueError: On empty or negative base delays, a negative cap, a ``jitter_ratio`` outside
            ``[0, 1]``, ``max_attempts < 1``, or when both ``seed`` and ``rng`` are given.
    """

    def __init__(
        self,
        base_delays_ms: Sequence[float] = (1000, 2000, 4000, 8000, 12000),
        cap_delay_ms: float = 12000,
        jitter_ratio: float = 0.2,
        max_attempts: int = 8,
        seed: int | None = None,
        rng: RandomSource | None = None,
    ) -> None:
        delays = tuple(float(d) for d in base_delays_ms)
        if not delays:
            raise ValueError("base_delays_ms must contain at least one delay")
        for delay in delays:
            if math.isnan(delay) or delay < 0:
                raise ValueError(f"base_delays_ms must be non-negative numbers, got {delay!r}")
        cap = float(cap_delay_ms)
        if math.isnan(cap) or cap < 0:
            raise ValueError(f"cap_delay_ms must be a non-negative number, got {cap_delay_ms!r}")
        ratio = float(jitter_ratio)
        # Written as a negated range check so that NaN is rejected too.
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"jitter_ratio must be within [0, 1], got {jitter_ratio!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts!r}")
        if seed is not None and rng is not None:
            raise ValueError("pass either seed or rng, not both")

        self._base_delays_ms = delays
        self._cap_delay_ms = cap
        self._jitter_ratio = ratio
        self._max_attempts = max_attempts
        self._current_attempt = 0
        self._rng: RandomSource
        if rng is not None:
            self._rng = rng
        elif seed is not None:
            self._rng = SplitMix64(seed)
        else:
            self._rng = SplitMix64(int.from_bytes(os.urandom(8), "big"))

    @classmethod
    def create_production_strategy(
        cls, *, seed: int | None = None, rng: RandomSource | None = None
    ) -> BackoffStrategy:
        """The seed's default: 1, 2, 4, 8, 12 s, capped at 12 s, ±20 % jitter, 8 attempts."""
        return cls(
            base_delays_ms=(1000, 2000, 4000, 8000, 12000),
            cap_delay_ms=12000,
            jitter_ratio=0.2,
            max_attempts=8,
            seed=seed,
            rng=rng,
        )

    @classmethod
    def create_aggressive_strategy(
        cls, *, seed: int | None = None, rng: RandomSource | None = None
    ) -> BackoffStrategy:
        """Faster reconnection: 0.25 to 4 s, capped at 4 s, ±20 % jitter, 10 attempts."""
        return cls(
            base_delays_ms=(250, 500, 1000, 2000, 4000),
            cap_delay_ms=4000,
            jitter_ratio=0.2,
            max_attempts=10,
            seed=seed,
            rng=rng,
        )

    @classmethod
    def create_immediate_strategy(
        cls, *, seed: int | None = None, rng: RandomSource | None = None
    ) -> BackoffStrategy:
        """For tests: a fixed 100 ms delay with no jitter, 5 attempts."""
        return cls(
            base_delays_ms=(100,),
            cap_delay_ms=100,
            jitter_ratio=0.0,
            max_attempts=5,
            seed=seed,
            rng=rng,
        )

    @staticmethod
    def calculate_jitter_bounds(base: float, ratio: float) -> tuple[float, float]:
        """Return the ``(low, high)`` range a delay centred on ``base`` can take.

        Both ends carry the 100 ms floor, so the range may collapse to ``(100, 100)``.
        """
        jitter = base * ratio
        return (max(MIN_DELAY_MS, base - jitter), max(MIN_DELAY_MS, base + jitter))

    @property
    def current_attempt(self) -> int:
        """How many delays have been handed out since construction or the last :meth:`reset`."""
        return self._current_attempt

    @property
    def max_attempts(self) -> int:
        """How many delays :meth:`next_delay` hands out before it returns ``None``."""
        return self._max_attempts

    @property
    def jitter_ratio(self) -> float:
        """Fraction of the base delay used as the symmetric jitter range."""
        return self._jitter_ratio

    @property
    def base_delays_ms(self) -> tuple[float, ...]:
        """The configured base delays, in milliseconds."""
        return self._base_delays_ms

    @property
    def cap_delay_ms(self) -> float:
        """The upper bound applied to each base delay before jitter."""
        return self._cap_delay_ms

    def has_exceeded_max_attempts(self) -> bool:
        """Return whether :meth:`next_delay` would now return ``None``."""
        return self._current_attempt >= self._max_attempts

    def next_delay(self) -> float | None:
        """Return the jittered delay for the next attempt and advance, or ``None`` when spent."""
        if self.has_exceeded_max_attempts():
            return None
        delay = self._delay_for(self._current_attempt)
        self._current_attempt += 1
        return delay

    def peek_next_delay(self) -> float | None:
        """Return the un-jittered delay :meth:`next_delay` would centre on, or ``None``.

        Neither advances the attempt counter nor draws randomness, so peeking never changes the
        sequence that follows.
        """
        if self.has_exceeded_max_attempts():
            return None
        return max(MIN_DELAY_MS, self._base_for(self._current_attempt))

    def bounds_for(self, index: int) -> tuple[float, float]:
        """Return the ``(low, high)`` range of the delay for attempt ``index`` (0-based)."""
        if index < 0:
            raise ValueError(f"attempt index must be non-negative, got {index!r}")
        return self.calculate_jitter_bounds(self._base_for(index), self._jitter_ratio)

    def reset(self) -> None:
        """Start counting attempts from zero again, as after a stable connection."""
        self._current_attempt = 0

    def spread_delay(self, window_ms: float) -> float:
        """Return a delay drawn uniformly from ``[0, window_ms)``, taking no backoff step.

        It spreads an immediate reconnect (after a graceful close) over a small window, from
        the same random source as the jitter, so one seed or ``rng`` pins both. A window of 0
        returns 0 and draws nothing, leaving the jitter sequence that follows untouched.

        Raises:
            ValueError: When ``window_ms`` is negative or not a number.
        """
        window = float(window_ms)
        # Written as a negated range check so that NaN is rejected too.
        if not 0.0 <= window < math.inf:
            raise ValueError(f"window_ms must be a finite number >= 0, got {window_ms!r}")
        if window == 0.0:
            return 0.0
        return window * self._rng.random()

    def _base_for(self, index: int) -> float:
        step = self._base_delays_ms[min(index, len(self._base_delays_ms) - 1)]
        return min(self._cap_delay_ms, step)

    def _delay_for(self, index: int) -> float:
        base = self._base_for(index)
        if self._jitter_ratio == 0.0:
            # No draw here, so a zero ratio leaves a shared rng's sequence untouched.
            return max(MIN_DELAY_MS, base)
        jitter = base * self._jitter_ratio
        r = self._rng.random()
        return max(MIN_DELAY_MS, base + (2.0 * r - 1.0) * jitter)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_delays_ms={self._base_delays_ms!r}, "
            f"cap_delay_ms={self._cap_delay_ms!r}, jitter_ratio={self._jitter_ratio!r}, "
            f"max_attempts={self._max_attempts!r}, current_attempt={self._current_attempt!r})"
        )
