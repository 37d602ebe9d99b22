"""Tests for relay.retry: the retry schedule with jitter and the lifetime cut-off."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.retry import next_attempt, retry_delay

SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)

schedules = st.lists(
    st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=10,
)
attempts = st.integers(min_value=1, max_value=100)
jitters = st.floats(min_value=0.0, max_value=0.5, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311 (reproducible jitter, not cryptography)


def step(attempt: int, schedule: list[float] | tuple[float, ...]) -> float:
    return schedule[min(attempt, len(schedule)) - 1]


def test_schedule_without_jitter() -> None:
    assert [retry_delay(n, SCHEDULE, 0.0) for n in range(1, 10)] == [
        *SCHEDULE,
        14400.0,
        14400.0,
    ]


def test_attempt_below_one_uses_first_step() -> None:
    assert retry_delay(0, SCHEDULE, 0.0) == 60.0
    assert retry_delay(-3, SCHEDULE, 0.0) == 60.0


def test_empty_schedule_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        retry_delay(1, [], 0.1)


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    first = [retry_delay(3, SCHEDULE, 0.1, rng(7)) for _ in range(3)]
    second = [retry_delay(3, SCHEDULE, 0.1, rng(7)) for _ in range(3)]
    assert first == second


@settings(max_examples=200)
@given(attempts, schedules, jitters, seeds)
def test_jitter_stays_within_bounds(
    attempt: int, schedule: list[float], jitter: float, seed: int
) -> None:
    base = step(attempt, schedule)
    delay = retry_delay(attempt, schedule, jitter, rng(seed))
    slack = base * 1e-9
    assert base * (1 - jitter) - slack <= delay <= base * (1 + jitter) + slack
    assert delay > 0


@settings(max_examples=100)
@given(schedules, st.integers(min_value=0, max_value=50), jitters, seeds)
def test_steps_beyond_schedule_repeat_last(
    schedule: list[float], beyond: int, jitter: float, seed: int
) -> None:
    last = schedule[-1]
    assert retry_delay(len(schedule) + beyond, schedule, 0.0) == last
    delay = retry_delay(len(schedule) + beyond, schedule, jitter, rng(seed))
    assert last * (1 - jitter) * (1 - 1e-9) <= delay <= last * (1 + jitter) * (1 + 1e-9)


@settings(max_examples=100)
@given(attempts, schedules)
def test_without_jitter_exactly_the_step(attempt: int, schedule: list[float]) -> None:
    assert retry_delay(attempt, schedule, 0.0) == step(attempt, schedule)
    assert retry_delay(attempt, schedule, -0.1) == step(attempt, schedule)


@settings(max_examples=100)
@given(schedules.map(sorted))
def test_without_jitter_non_decreasing_for_sorted_schedule(
    schedule: list[float],
) -> None:
    delays = [retry_delay(n, schedule, 0.0) for n in range(1, len(schedule) + 5)]
    assert delays == sorted(delays)


@settings(max_examples=200)
@given(
    offset=st.integers(min_value=-(10**6), max_value=10**7),
    attempt=attempts,
    lifetime=st.integers(min_value=0, max_value=10**7),
    schedule=schedules,
    jitter=jitters,
    seed=seeds,
)
def test_next_attempt_never_after_expiry(
    *,
    offset: int,
    attempt: int,
    lifetime: int,
    schedule: list[float],
    jitter: float,
    seed: int,
) -> None:
    now = T0 + timedelta(seconds=offset)
    expires_at = T0 + timedelta(seconds=lifetime)
    at = next_attempt(now, attempt, expires_at, schedule, jitter, rng(seed))
    if now >= expires_at:
        assert at is None
    else:
        assert at is not None
        assert now < at <= expires_at


def test_next_attempt_examples() -> None:
    expires_at = T0 + timedelta(hours=1)
    assert next_attempt(T0, 1, expires_at, SCHEDULE, 0.0) == T0 + timedelta(minutes=1)
    # The next step would pass expiry: one last try at expiry itself.
    late = T0 + timedelta(minutes=59)
    assert next_attempt(late, 2, expires_at, SCHEDULE, 0.0) == expires_at
    assert next_attempt(expires_at, 1, expires_at, SCHEDULE, 0.0) is None
    after = expires_at + timedelta(seconds=1)
    assert next_attempt(after, 1, expires_at, SCHEDULE, 0.0) is None
