"""Tests for steadysocket.model.backoff: the seed's formula, presets, and determinism."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadysocket.model.backoff import MIN_DELAY_MS, BackoffStrategy, RandomSource, SplitMix64

PRODUCTION_BASES = [1000.0, 2000.0, 4000.0, 8000.0, 12000.0, 12000.0, 12000.0, 12000.0]


class CountingRandom:
    """A RandomSource that records how often it was asked for a number."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value
        self.calls = 0

    def random(self) -> float:
        self.calls += 1
        return self.value


def drain(strategy: BackoffStrategy) -> list[float]:
    delays: list[float] = []
    while (delay := strategy.next_delay()) is not None:
        delays.append(delay)
    return delays


def test_splitmix64_matches_the_reference_output_sequence() -> None:
    # Reference vectors from the published SplitMix64 C implementation.
    generator = SplitMix64(1234567)
    assert [generator.next_uint64() for _ in range(5)] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
        4593380528125082431,
        16408922859458223821,
    ]
    assert SplitMix64(0).next_uint64() == 0xE220A8397B1DCDAF


@given(seed=st.integers())
def test_splitmix64_floats_lie_in_the_half_open_unit_interval(seed: int) -> None:
    generator = SplitMix64(seed)
    for _ in range(50):
        assert 0.0 <= generator.random() < 1.0


def test_splitmix64_and_random_random_satisfy_the_random_source_protocol() -> None:
    sources: list[RandomSource] = [SplitMix64(1), random.Random(1)]
    assert all(0.0 <= source.random() < 1.0 for source in sources)


def test_the_same_seed_gives_the_same_delay_sequence() -> None:
    first = drain(BackoffStrategy(seed=42))
    second = drain(BackoffStrategy(seed=42))
    assert first == second
    assert len(first) == 8


def test_different_seeds_give_different_delay_sequences() -> None:
    assert drain(BackoffStrategy(seed=1)) != drain(BackoffStrategy(seed=2))


def test_an_injected_random_random_pins_exact_values_from_the_formula() -> None:
    strategy = BackoffStrategy(rng=random.Random(7))
    reference = random.Random(7)
    expected = []
    for base in PRODUCTION_BASES:
        jitter = base * 0.2
        expected.append(max(100.0, base + (2 * reference.random() - 1) * jitter))
    assert drain(strategy) == expected


def test_a_seed_draws_from_splitmix64_with_that_seed() -> None:
    strategy = BackoffStrategy(seed=99)
    reference = SplitMix64(99)
    expected = []
    for base in PRODUCTION_BASES:
        jitter = base * 0.2
        expected.append(base + (2 * reference.random() - 1) * jitter)
    assert drain(strategy) == expected


def test_zero_jitter_gives_exactly_the_base_delays_then_none() -> None:
    strategy = BackoffStrategy(jitter_ratio=0.0)
    assert drain(strategy) == [1000, 2000, 4000, 8000, 12000, 12000, 12000, 12000]
    assert strategy.next_delay() is None


def test_zero_jitter_draws_no_randomness() -> None:
    rng = CountingRandom()
    drain(BackoffStrategy(jitter_ratio=0.0, rng=rng))
    assert rng.calls == 0


def test_nonzero_jitter_draws_once_per_delay() -> None:
    rng = CountingRandom()
    drain(BackoffStrategy(rng=rng))
    assert rng.calls == 8


def test_the_cap_limits_every_base_delay() -> None:
    strategy = BackoffStrategy(
        base_delays_ms=[500, 3000, 9000], cap_delay_ms=2500, jitter_ratio=0.0, max_attempts=5
    )
    assert drain(strategy) == [500, 2500, 2500, 2500, 2500]


def test_the_cap_applies_before_jitter() -> None:
    # r = 0.999... puts the delay just under base + jitter, where base is the capped value.
    strategy = BackoffStrategy(
        base_delays_ms=[10000], cap_delay_ms=1000, jitter_ratio=0.5, rng=CountingRandom(0.999)
    )
    delay = strategy.next_delay()
    assert delay is not None
    assert 1000 < delay < 1500


def test_delays_never_fall_below_the_100ms_floor() -> None:
    strategy = BackoffStrategy(
        base_delays_ms=[0, 50, 120], cap_delay_ms=1000, jitter_ratio=1.0, rng=CountingRandom(0.0)
    )
    assert drain(strategy)[:3] == [100.0, 100.0, 100.0]


def test_the_floor_applies_without_jitter_too() -> None:
    strategy = BackoffStrategy(base_delays_ms=[10], cap_delay_ms=5, jitter_ratio=0.0)
    assert strategy.next_delay() == MIN_DELAY_MS
    assert strategy.peek_next_delay() == MIN_DELAY_MS


def test_extreme_random_draws_hit_the_ends_of_the_jitter_range() -> None:
    low = BackoffStrategy(jitter_ratio=0.2, rng=CountingRandom(0.0)).next_delay()
    mid = BackoffStrategy(jitter_ratio=0.2, rng=CountingRandom(0.5)).next_delay()
    assert low == 800.0
    assert mid == 1000.0


@given(
    seed=st.integers(min_value=0, max_value=2**64 - 1),
    ratio=st.floats(min_value=0.0, max_value=1.0),
    bases=st.lists(st.floats(min_value=0.0, max_value=1e7), min_size=1, max_size=6),
    cap=st.floats(min_value=0.0, max_value=1e7),
)
def test_every_delay_lies_within_the_jitter_bounds(
    seed: int, ratio: float, bases: list[float], cap: float
) -> None:
    strategy = BackoffStrategy(
        base_delays_ms=bases, cap_delay_ms=cap, jitter_ratio=ratio, max_attempts=10, seed=seed
    )
    for index in range(10):
        base = min(cap, bases[min(index, len(bases) - 1)])
        low, high = BackoffStrategy.calculate_jitter_bounds(base, ratio)
        assert strategy.bounds_for(index) == (low, high)
        delay = strategy.next_delay()
        assert delay is not None
        assert low <= delay <= high
        assert delay >= MIN_DELAY_MS


def test_calculate_jitter_bounds_applies_the_ratio_and_the_floor() -> None:
    assert BackoffStrategy.calculate_jitter_bounds(1000, 0.2) == (800.0, 1200.0)
    assert BackoffStrategy.calculate_jitter_bounds(1000, 0.0) == (1000.0, 1000.0)
    assert BackoffStrategy.calculate_jitter_bounds(150, 0.5) == (100.0, 225.0)
    assert BackoffStrategy.calculate_jitter_bounds(50, 0.1) == (100.0, 100.0)


def test_next_delay_returns_none_after_max_attempts() -> None:
    strategy = BackoffStrategy(max_attempts=3, seed=1)
    assert [strategy.next_delay() is not None for _ in range(3)] == [True, True, True]
    assert strategy.has_exceeded_max_attempts()
    assert strategy.next_delay() is None
    assert strategy.next_delay() is None
    assert strategy.current_attempt == 3


def test_current_attempt_counts_handed_out_delays() -> None:
    strategy = BackoffStrategy(seed=1)
    assert strategy.current_attempt == 0
    assert not strategy.has_exceeded_max_attempts()
    strategy.next_delay()
    strategy.next_delay()
    assert strategy.current_attempt == 2


def test_reset_starts_the_sequence_from_the_first_delay_again() -> None:
    strategy = BackoffStrategy(jitter_ratio=0.0, max_attempts=2)
    assert drain(strategy) == [1000, 2000]
    strategy.reset()
    assert strategy.current_attempt == 0
    assert not strategy.has_exceeded_max_attempts()
    assert strategy.next_delay() == 1000


def test_peek_returns_the_unjittered_centre_without_advancing() -> None:
    strategy = BackoffStrategy(seed=5)
    assert strategy.peek_next_delay() == 1000
    assert strategy.peek_next_delay() == 1000
    assert strategy.current_attempt == 0
    strategy.next_delay()
    assert strategy.peek_next_delay() == 2000


def test_peek_does_not_consume_randomness() -> None:
    rng = CountingRandom()
    strategy = BackoffStrategy(rng=rng)
    for _ in range(5):
        strategy.peek_next_delay()
    assert rng.calls == 0

    peeked = BackoffStrategy(seed=11)
    plain = BackoffStrategy(seed=11)
    interleaved = []
    for _ in range(8):
        peeked.peek_next_delay()
        interleaved.append(peeked.next_delay())
    assert interleaved == drain(plain)


def test_peek_returns_none_once_attempts_are_spent() -> None:
    strategy = BackoffStrategy(max_attempts=1, seed=1)
    strategy.next_delay()
    assert strategy.peek_next_delay() is None


def test_the_production_preset_matches_the_seed() -> None:
    strategy = BackoffStrategy.create_production_strategy(seed=1)
    assert strategy.base_delays_ms == (1000, 2000, 4000, 8000, 12000)
    assert strategy.cap_delay_ms == 12000
    assert strategy.jitter_ratio == 0.2
    assert strategy.max_attempts == 8


def test_the_default_constructor_is_the_production_preset() -> None:
    default = BackoffStrategy(seed=3)
    production = BackoffStrategy.create_production_strategy(seed=3)
    assert drain(default) == drain(production)


def test_the_aggressive_preset_has_a_4s_cap_and_10_attempts() -> None:
    strategy = BackoffStrategy.create_aggressive_strategy(seed=1)
    assert strategy.base_delays_ms == (250, 500, 1000, 2000, 4000)
    assert strategy.cap_delay_ms == 4000
    assert strategy.jitter_ratio == 0.2
    assert strategy.max_attempts == 10
    assert len(drain(strategy)) == 10


def test_the_immediate_preset_gives_five_exact_100ms_delays() -> None:
    strategy = BackoffStrategy.create_immediate_strategy()
    assert strategy.base_delays_ms == (100,)
    assert strategy.cap_delay_ms == 100
    assert strategy.jitter_ratio == 0.0
    assert strategy.max_attempts == 5
    assert drain(strategy) == [100.0] * 5


def test_presets_accept_an_injected_rng() -> None:
    strategy = BackoffStrategy.create_aggressive_strategy(rng=random.Random(7))
    reference = random.Random(7)
    assert strategy.next_delay() == 250 + (2 * reference.random() - 1) * 50


def test_an_unseeded_strategy_still_produces_valid_delays() -> None:
    strategy = BackoffStrategy()
    for index, delay in enumerate(drain(strategy)):
        low, high = strategy.bounds_for(index)
        assert low <= delay <= high


def test_repr_shows_the_configuration_and_progress() -> None:
    strategy = BackoffStrategy(base_delays_ms=[1, 2], cap_delay_ms=5, max_attempts=3, seed=1)
    strategy.next_delay()
    text = repr(strategy)
    assert text.startswith("BackoffStrategy(")
    assert "base_delays_ms=(1.0, 2.0)" in text
    assert "cap_delay_ms=5.0" in text
    assert "jitter_ratio=0.2" in text
    assert "max_attempts=3" in text
    assert "current_attempt=1" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"base_delays_ms": []}, "at least one delay", id="empty-base-delays"),
        pytest.param({"base_delays_ms": [100, -1]}, "non-negative", id="negative-base-delay"),
        pytest.param({"base_delays_ms": [float("nan")]}, "non-negative", id="nan-base-delay"),
        pytest.param({"cap_delay_ms": -1}, "cap_delay_ms", id="negative-cap"),
        pytest.param({"jitter_ratio": -0.1}, "jitter_ratio", id="ratio-below-zero"),
        pytest.param({"jitter_ratio": 1.5}, "jitter_ratio", id="ratio-above-one"),
        pytest.param({"jitter_ratio": float("nan")}, "jitter_ratio", id="ratio-nan"),
        pytest.param({"max_attempts": 0}, "max_attempts", id="zero-max-attempts"),
        pytest.param({"seed": 1, "rng": random.Random(1)}, "not both", id="seed-and-rng"),
    ],
)
def test_invalid_configuration_raises_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackoffStrategy(**kwargs)


def test_bounds_for_rejects_a_negative_index() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        BackoffStrategy(seed=1).bounds_for(-1)


def test_bounds_for_repeats_the_last_base_delay() -> None:
    strategy = BackoffStrategy(seed=1)
    assert strategy.bounds_for(0) == (800.0, 1200.0)
    assert strategy.bounds_for(4) == strategy.bounds_for(20) == (9600.0, 14400.0)


# -- distribution and exact bounds (mutation survivors) ---------------------------------------


def test_splitmix64_draws_cover_the_whole_unit_interval_evenly() -> None:
    """A fixed seed, 4,000 draws: every tenth of [0, 1) gets its share (600 is over 8
    standard deviations from the mean of 400), so a generator that halved its range or
    leaned to one side fails."""
    generator = SplitMix64(20250815)
    deciles = [0] * 10
    for _ in range(4000):
        deciles[int(generator.random() * 10)] += 1
    assert min(deciles) > 250
    assert max(deciles) < 600


def test_jittered_delays_fall_on_both_sides_of_the_base_delay() -> None:
    """The jitter lengthens as often as it shortens: with a fixed seed, 2,000 draws around a
    1000 ms base split about evenly and reach close to both ends of the ±20 % range."""
    strategy = BackoffStrategy(base_delays_ms=(1000,), jitter_ratio=0.2, max_attempts=1, seed=7)
    delays: list[float] = []
    for _ in range(2000):
        strategy.reset()
        delay = strategy.next_delay()
        assert delay is not None
        delays.append(delay)
    longer = sum(d > 1000 for d in delays)
    assert 850 < longer < 1150
    assert min(delays) < 810
    assert max(delays) > 1190
    assert all(800 <= d <= 1200 for d in delays)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"base_delays_ms": [0]}, id="zero-base-delay"),
        pytest.param({"cap_delay_ms": 0}, id="zero-cap"),
        pytest.param({"jitter_ratio": 0.0}, id="ratio-zero"),
        pytest.param({"jitter_ratio": 1.0}, id="ratio-one"),
        pytest.param({"max_attempts": 1}, id="one-attempt"),
    ],
)
def test_the_edges_of_the_valid_configuration_are_accepted(kwargs: dict[str, Any]) -> None:
    """Validation bounds: each documented edge is valid, one step past it is not (above)."""
    strategy = BackoffStrategy(seed=1, **kwargs)
    assert strategy.next_delay() is not None


def test_zero_delays_are_raised_to_the_floor() -> None:
    strategy = BackoffStrategy(base_delays_ms=[0], cap_delay_ms=0, jitter_ratio=1.0, seed=3)
    assert strategy.next_delay() == 100.0


def test_splitmix64_repr_shows_its_state() -> None:
    generator = SplitMix64(1)
    assert repr(generator) == "SplitMix64(state=0x0000000000000001)"
    generator.next_uint64()
    assert repr(generator) == "SplitMix64(state=0x9e3779b97f4a7c16)"


def test_the_defaults_are_the_documented_production_values() -> None:
    strategy = BackoffStrategy(seed=1)
    assert strategy.base_delays_ms == (1000.0, 2000.0, 4000.0, 8000.0, 12000.0)
    assert strategy.cap_delay_ms == 12000.0
    assert strategy.jitter_ratio == 0.2
    assert strategy.max_attempts == 8


# -- the spread delay (a graceful reconnect's) ----------------------------------------------


def test_a_spread_delay_scales_one_draw_from_the_injected_source() -> None:
    source = CountingRandom(0.25)
    strategy = BackoffStrategy(rng=source)
    assert strategy.spread_delay(1000) == 250.0
    assert source.calls == 1


def test_a_spread_delay_takes_no_backoff_step() -> None:
    strategy = BackoffStrategy(jitter_ratio=0.0, seed=5)
    strategy.spread_delay(1000)
    assert strategy.current_attempt == 0
    assert strategy.next_delay() == 1000.0


def test_a_spread_window_of_zero_draws_nothing() -> None:
    source = CountingRandom()
    strategy = BackoffStrategy(rng=source)
    assert strategy.spread_delay(0) == 0.0
    assert source.calls == 0


def test_a_seeded_strategy_pins_spread_delays_and_the_jitter_after_them() -> None:
    first, second = BackoffStrategy(seed=11), BackoffStrategy(seed=11)
    assert [first.spread_delay(500), first.next_delay()] == [
        second.spread_delay(500),
        second.next_delay(),
    ]
    mirror = random.Random(4)
    strategy = BackoffStrategy(rng=random.Random(4))
    assert strategy.spread_delay(1000) == 1000 * mirror.random()


@given(st.floats(0.0, 1e7), st.integers(0, 2**32))
def test_spread_delays_stay_within_the_window(window: float, seed: int) -> None:
    delay = BackoffStrategy(seed=seed).spread_delay(window)
    assert 0.0 <= delay <= window


@pytest.mark.parametrize("window", [-0.001, float("nan"), float("inf")])
def test_a_spread_window_must_be_a_finite_number_of_at_least_zero(window: float) -> None:
    with pytest.raises(ValueError, match="window_ms must be a finite number >= 0"):
        BackoffStrategy(seed=1).spread_delay(window)
