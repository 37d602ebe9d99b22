"""Pure functions for the retry schedule and message lifetime. No I/O."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime, timedelta


def retry_delay(
    attempt: int,
    schedule: Sequence[float],
    jitter: float,
    rand: random.Random | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    The schedule's last step repeats. Jitter spreads retries by up to ``±jitter`` of
    the step so that messages deferred together do not retry in lockstep.
    """
    if not schedule:
        raise ValueError("the retry schedule is empty")
    base = schedule[min(max(attempt, 1), len(schedule)) - 1]
    if jitter <= 0:
        return base
    source = rand if rand is not None else random
    return base * (1.0 + source.uniform(-jitter, jitter))


def next_attempt(
    now: datetime,
    attempt: int,
    expires_at: datetime,
    schedule: Sequence[float],
    jitter: float,
    rand: random.Random | None = None,
) -> datetime | None:
    """When to try again, or ``None`` if the message expires before then.

    A message whose next try would fall after its expiry gets one last try at the
    expiry time itself, so the full lifetime is used.
    """
    if now >= expires_at:
        return None
    at = now + timedelta(seconds=retry_delay(attempt, schedule, jitter, rand))
    return min(at, expires_at)
