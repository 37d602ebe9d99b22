"""Tests for policies.reputation: the rates, the thresholds, the judgement and the
rolling hourly counters (with property tests against a brute-force model)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.models import BreachAction, ThresholdsConfig
from policies.reputation import (
    COUNTED_KINDS,
    SEVERITY,
    Counters,
    Judgement,
    Reading,
    Statistic,
    Totals,
    hour_of,
    judge,
    readings,
    window_text,
)
from storage.base import AccountState, CounterBucket, EventKind

DEFAULTS = ThresholdsConfig.model_validate({})
MONTH = 30 * 86400.0
S = Statistic
STATE_OF_ACTION = {
    BreachAction.WARN: AccountState.WARNING,
    BreachAction.THROTTLE: AccountState.THROTTLED,
    BreachAction.SUSPEND: AccountState.SUSPENDED,
}
# 2026-03-01 12:00 UTC, in hours: realistic bucket numbers.
BASE_HOUR = 1_772_366_400 // 3600


def thresholds(**values: Any) -> ThresholdsConfig:
    return ThresholdsConfig.model_validate(values)


def by_statistic(found: list[Reading]) -> dict[Statistic, Reading]:
    return {reading.statistic: reading for reading in found}


def reading_of(
    statistic: Statistic, totals: Totals, config: ThresholdsConfig = DEFAULTS
) -> Reading:
    return by_statistic(readings(totals, config))[statistic]


def judged(totals: Totals, config: ThresholdsConfig = DEFAULTS) -> Judgement:
    return judge(readings(totals, config))


def make_reading(
    statistic: Statistic,
    value: float,
    limit: float,
    action: BreachAction = BreachAction.SUSPEND,
    *,
    is_judged: bool = True,
    warn_at: float = 0.8,
) -> Reading:
    return Reading(statistic, value, limit, 0, 0, is_judged, action, warn_at)


# -- units and small helpers ---------------------------------------------------


def test_thresholds_defaults_are_the_policy() -> None:
    assert DEFAULTS.window_seconds == MONTH
    assert DEFAULTS.min_volume == 100
    assert DEFAULTS.warn_at == 0.8
    assert DEFAULTS.bounce_rate == 0.08
    assert DEFAULTS.unsubscribe_rate == 0.014
    assert DEFAULTS.unsubscribe_rate_without_clicks == 0.01
    assert DEFAULTS.block_rate == 0.30
    assert DEFAULTS.complaint_rate == 0.0008
    assert DEFAULTS.complaint_min_volume == 1000
    assert DEFAULTS.complaints_per_day == 50
    assert DEFAULTS.spamtrap_hits == 1
    assert DEFAULTS.actions.bounce_rate is BreachAction.SUSPEND
    assert DEFAULTS.actions.unsubscribe_rate is BreachAction.THROTTLE
    assert DEFAULTS.actions.block_rate is BreachAction.THROTTLE
    assert DEFAULTS.actions.complaint_rate is BreachAction.SUSPEND
    assert DEFAULTS.actions.complaints_per_day is BreachAction.SUSPEND
    assert DEFAULTS.actions.spamtrap_hits is BreachAction.SUSPEND


def test_thresholds_percentages_become_fractions() -> None:
    config = thresholds(
        bounce_rate="5%",
        block_rate=25,
        complaint_rate="0.08%",
        unsubscribe_rate_without_clicks="0.5 %",
        window="7d",
    )
    assert config.bounce_rate == 0.05
    assert config.block_rate == 0.25
    assert config.complaint_rate == pytest.approx(0.0008)
    assert config.unsubscribe_rate_without_clicks == 0.005
    assert config.window_seconds == 7 * 86400.0


@pytest.mark.parametrize(
    ("timestamp", "hour"),
    [
        (0.0, 0),
        (3599.999, 0),
        (3600.0, 1),
        (7199.5, 1),
        (1_772_366_400.0, BASE_HOUR),
        (1_772_366_399.9, BASE_HOUR - 1),
        (-0.5, -1),
    ],
)
def test_hour_of_is_the_floor_of_the_hour(timestamp: float, hour: int) -> None:
    assert hour_of(timestamp) == hour


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (MONTH, "30d"),
        (86400.0, "1d"),
        (7 * 86400, "7d"),
        (7200.0, "2h"),
        (3600, "1h"),
        (25 * 3600.0, "25h"),
    ],
)
def test_window_text(seconds: float, text: str) -> None:
    assert window_text(seconds) == text


def test_delivered_is_sent_minus_bounces_never_negative() -> None:
    assert Totals(sent=1000, bounces=94).delivered == 906
    assert Totals(sent=5, bounces=9).delivered == 0
    assert Totals().delivered == 0


def test_ratio_of_a_zero_limit() -> None:
    assert make_reading(S.SPAMTRAP_HITS, 1.0, 0.0).ratio == math.inf
    assert make_reading(S.SPAMTRAP_HITS, 0.0, 0.0).ratio == 0.0
    assert make_reading(S.BOUNCE_RATE, 0.04, 0.08).ratio == pytest.approx(0.5)


# -- the statistics --------------------------------------------------------------


def test_readings_cover_every_statistic_once() -> None:
    found = readings(Totals(), DEFAULTS)
    assert [r.statistic for r in found] == list(Statistic)


def test_bounce_rate_is_bounces_over_sent() -> None:
    bounce = reading_of(S.BOUNCE_RATE, Totals(sent=1000, bounces=94))
    assert bounce.value == pytest.approx(0.094)
    assert (bounce.count, bounce.base, bounce.limit) == (94, 1000, 0.08)
    assert bounce.judged
    assert bounce.breached
    assert bounce.action is BreachAction.SUSPEND
    assert bounce.ratio == pytest.approx(0.094 / 0.08)


@pytest.mark.parametrize(
    ("bounces", "state"),
    [
        (0, AccountState.OK),
        (63, AccountState.OK),  # 6.3% <= 0.8 x 8%
        (65, AccountState.WARNING),  # 6.5% > 6.4%
        (80, AccountState.WARNING),  # exactly 8%: not above the limit
        (81, AccountState.SUSPENDED),
        (1000, AccountState.SUSPENDED),
    ],
)
def test_bounce_rate_limit_is_strict(bounces: int, state: AccountState) -> None:
    result = judged(Totals(sent=1000, bounces=bounces))
    assert result.state is state
    assert reading_of(S.BOUNCE_RATE, Totals(sent=1000, bounces=bounces)).breached is (
        bounces > 80
    )


def test_no_rate_is_judged_below_min_volume() -> None:
    # 99 sent, every one bounced, unsubscribed and complained about.
    small = Totals(sent=99, bounces=50, unsubscribes=40, complaints=5, blocks=0)
    found = by_statistic(readings(small, DEFAULTS))
    for statistic in (S.BOUNCE_RATE, S.UNSUBSCRIBE_RATE, S.COMPLAINT_RATE):
        assert not found[statistic].judged, statistic
        assert not found[statistic].breached, statistic
        assert not found[statistic].warning, statistic
    assert judged(small).state is AccountState.OK

    enough = Totals(sent=100, bounces=9)
    assert reading_of(S.BOUNCE_RATE, enough).judged
    assert judged(enough).state is AccountState.SUSPENDED


def test_min_volume_is_configurable() -> None:
    config = thresholds(min_volume=1000)
    assert judged(Totals(sent=999, bounces=999), config).state is AccountState.OK
    assert judged(Totals(sent=1000, bounces=81), config).state is (
        AccountState.SUSPENDED
    )


# The 1% vs 1.4% unsubscribe rule: 1.2% unsubscribes breaches only when the
# unsubscribes outnumber the clicks.
@pytest.mark.parametrize(
    ("clicks", "limit", "breached", "state"),
    [
        (0, 0.01, True, AccountState.THROTTLED),
        (11, 0.01, True, AccountState.THROTTLED),
        (12, 0.014, False, AccountState.WARNING),  # 1.2% > 0.8 x 1.4%
        (13, 0.014, False, AccountState.WARNING),
        (500, 0.014, False, AccountState.WARNING),
    ],
)
def test_unsubscribe_limit_is_1_percent_when_unsubscribes_exceed_clicks(
    clicks: int, limit: float, breached: bool, state: AccountState
) -> None:
    totals = Totals(sent=1000, unsubscribes=12, clicks=clicks)
    unsubscribe = reading_of(S.UNSUBSCRIBE_RATE, totals)
    assert unsubscribe.value == pytest.approx(0.012)
    assert unsubscribe.limit == limit
    assert unsubscribe.breached is breached
    result = judged(totals)
    assert result.state is state
    assert result.decided_by is not None
    assert result.decided_by.statistic is S.UNSUBSCRIBE_RATE


def test_unsubscribe_limits_follow_the_configuration() -> None:
    config = thresholds(unsubscribe_rate="3%", unsubscribe_rate_without_clicks="2%")
    totals = Totals(sent=1000, unsubscribes=25, clicks=0)
    assert reading_of(S.UNSUBSCRIBE_RATE, totals, config).limit == 0.02
    assert judged(totals, config).state is AccountState.THROTTLED
    with_clicks = Totals(sent=1000, unsubscribes=25, clicks=25)
    assert reading_of(S.UNSUBSCRIBE_RATE, with_clicks, config).limit == 0.03
    assert judged(with_clicks, config).state is AccountState.WARNING


def test_unsubscribe_rate_is_over_delivered_not_sent() -> None:
    # 9 / 800 delivered = 1.125% breaches 1%; 9 / 1000 sent would not.
    totals = Totals(sent=1000, bounces=200, unsubscribes=9)
    unsubscribe = reading_of(S.UNSUBSCRIBE_RATE, totals)
    assert unsubscribe.base == 800
    assert unsubscribe.value == pytest.approx(9 / 800)
    assert unsubscribe.breached


def test_unsubscribe_rate_not_judged_when_nothing_was_delivered() -> None:
    totals = Totals(sent=100, bounces=100, unsubscribes=5)
    unsubscribe = reading_of(S.UNSUBSCRIBE_RATE, totals)
    assert not unsubscribe.judged
    assert unsubscribe.value == 0.0


def test_block_rate_is_blocks_over_submitted() -> None:
    # 301 / (700 + 301) = 30.07% breaches 30%; 300 / 1000 is exactly 30%.
    over = reading_of(S.BLOCK_RATE, Totals(sent=700, blocks=301))
    assert over.value == pytest.approx(301 / 1001)
    assert over.base == 1001
    assert over.breached
    assert judged(Totals(sent=700, blocks=301)).state is AccountState.THROTTLED
    at = reading_of(S.BLOCK_RATE, Totals(sent=700, blocks=300))
    assert at.value == pytest.approx(0.3)
    assert not at.breached
    assert judged(Totals(sent=700, blocks=300)).state is AccountState.WARNING


def test_block_rate_is_judged_on_submitted_volume() -> None:
    # The module's table: judged when sent + blocks >= min_volume.
    assert not reading_of(S.BLOCK_RATE, Totals(sent=0, blocks=99)).judged
    everything_blocked = reading_of(S.BLOCK_RATE, Totals(sent=0, blocks=100))
    assert everything_blocked.judged
    assert everything_blocked.value == 1.0
    assert everything_blocked.breached


@pytest.mark.parametrize(
    ("sent", "is_judged"), [(999, False), (1000, False), (1001, True)]
)
def test_complaint_rate_judged_only_above_complaint_min_volume(
    sent: int, is_judged: bool
) -> None:
    totals = Totals(sent=sent, complaints=5, complaints_24h=5)
    complaint = reading_of(S.COMPLAINT_RATE, totals)
    assert complaint.value == pytest.approx(5 / sent)
    assert complaint.judged is is_judged
    assert complaint.breached is is_judged
    result = judged(totals)
    if is_judged:
        assert result.state is AccountState.SUSPENDED
        assert result.reason("acme", MONTH) == (
            "account acme suspended: complaint rate 0.5% over 30d exceeds 0.08%"
        )
    else:
        assert result.state is AccountState.OK


def test_complaint_rate_is_over_delivered_and_strict() -> None:
    # 8 / 10000 is exactly 0.08%: within; 9 breaches.
    at = reading_of(S.COMPLAINT_RATE, Totals(sent=10_000, complaints=8))
    assert not at.breached
    assert at.warning
    assert reading_of(S.COMPLAINT_RATE, Totals(sent=10_000, complaints=9)).breached
    # 1 / 1000 delivered = 0.1% breaches; 1 / 2000 sent would be 0.05%.
    halved = reading_of(S.COMPLAINT_RATE, Totals(sent=2000, bounces=1000, complaints=1))
    assert halved.base == 1000
    assert halved.value == pytest.approx(0.001)
    assert halved.breached


@pytest.mark.parametrize("sent", [0, 10, 1_000_000])
def test_complaints_per_day_50_is_fine_51_breaches_whatever_the_volume(
    sent: int,
) -> None:
    fifty = reading_of(S.COMPLAINTS_PER_DAY, Totals(sent=sent, complaints_24h=50))
    assert fifty.judged
    assert not fifty.breached
    assert fifty.value == 50.0
    assert fifty.limit == 50.0
    fifty_one = Totals(sent=sent, complaints_24h=51)
    assert reading_of(S.COMPLAINTS_PER_DAY, fifty_one).breached
    result = judged(fifty_one)
    assert result.state is AccountState.SUSPENDED
    assert result.decided_by is not None
    assert result.decided_by.statistic is S.COMPLAINTS_PER_DAY
    assert result.reason("acme", MONTH) == (
        "account acme suspended: complaints in 24h 51 exceeds 50"
    )


def test_complaints_per_day_reads_the_24h_count_not_the_window() -> None:
    totals = Totals(sent=0, complaints=500, complaints_24h=3)
    per_day = reading_of(S.COMPLAINTS_PER_DAY, totals)
    assert (per_day.count, per_day.breached) == (3, False)


@pytest.mark.parametrize(
    ("hits", "state"),
    [(0, AccountState.OK), (1, AccountState.WARNING), (2, AccountState.SUSPENDED)],
)
def test_spamtrap_hits_the_second_breaches(hits: int, state: AccountState) -> None:
    totals = Totals(sent=0, spamtrap_hits=hits)
    hit = reading_of(S.SPAMTRAP_HITS, totals)
    assert hit.judged
    assert hit.breached is (hits >= 2)
    assert judged(totals).state is state


def test_spamtrap_hits_reason() -> None:
    result = judged(Totals(sent=5000, spamtrap_hits=2))
    assert result.reason("acme", MONTH) == (
        "account acme suspended: spamtrap hits 2 over 30d exceeds 1"
    )


def test_zero_spamtrap_hits_allowed_means_the_first_breaches() -> None:
    config = thresholds(spamtrap_hits=0)
    assert judged(Totals(spamtrap_hits=0), config).state is AccountState.OK
    assert judged(Totals(spamtrap_hits=1), config).state is AccountState.SUSPENDED


def test_configured_limit_equal_to_default_is_not_breached_at_the_limit() -> None:
    # 1.4 / 100 is 0.013999999999999999 in floats: "1.4%" must still be 0.014.
    config = thresholds(unsubscribe_rate="1.4%")
    assert config.unsubscribe_rate == 0.014
    totals = Totals(sent=1000, unsubscribes=14, clicks=14)  # exactly 1.4%
    assert not reading_of(S.UNSUBSCRIBE_RATE, totals, DEFAULTS).breached
    assert not reading_of(S.UNSUBSCRIBE_RATE, totals, config).breached
    assert judged(totals, config).state is AccountState.WARNING


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(0, 10_000),
    base=st.integers(1, 10_000),
    basis_points=st.integers(0, 10_000),
)
def test_configured_percent_limits_are_exact(
    count: int, base: int, basis_points: int
) -> None:
    # count / base breaches "p%" exactly when count / base > p / 100.
    config = thresholds(bounce_rate=f"{basis_points / 100}%", min_volume=1)
    bounce = reading_of(S.BOUNCE_RATE, Totals(sent=base, bounces=count), config)
    assert bounce.breached is (count * 10_000 > basis_points * base)


# -- actions and the judgement ------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "state"),
    [
        ("warn", AccountState.WARNING),
        ("throttle", AccountState.THROTTLED),
        ("suspend", AccountState.SUSPENDED),
    ],
)
def test_breach_action_decides_the_state(action: str, state: AccountState) -> None:
    config = thresholds(actions={"bounce_rate": action, "spamtrap_hits": action})
    assert judged(Totals(sent=1000, bounces=94), config).state is state
    assert judged(Totals(spamtrap_hits=2), config).state is state


def test_worst_breach_decides() -> None:
    # Unsubscribes (throttle) breached far more than bounces (suspend): suspend wins.
    totals = Totals(sent=1000, bounces=81, unsubscribes=100)
    result = judged(totals)
    assert result.state is AccountState.SUSPENDED
    assert result.decided_by is not None
    assert result.decided_by.statistic is S.BOUNCE_RATE
    assert [r.statistic for r in result.readings] == list(Statistic)


def test_ties_go_to_the_higher_ratio() -> None:
    low = make_reading(S.BOUNCE_RATE, 0.10, 0.08)  # ratio 1.25
    high = make_reading(S.COMPLAINT_RATE, 0.005, 0.0008)  # ratio 6.25
    for order in ([low, high], [high, low]):
        result = judge(order)
        assert result.state is AccountState.SUSPENDED
        assert result.decided_by is high


def test_ties_between_warnings_go_to_the_higher_ratio() -> None:
    low = make_reading(S.BOUNCE_RATE, 0.065, 0.08)  # ratio 0.81
    high = make_reading(S.BLOCK_RATE, 0.29, 0.30)  # ratio 0.97
    for order in ([low, high], [high, low]):
        result = judge(order)
        assert result.state is AccountState.WARNING
        assert result.decided_by is high


def test_breach_with_warn_action_beats_a_plain_warning() -> None:
    warned = make_reading(S.BLOCK_RATE, 0.29, 0.30)  # warning, ratio 0.97
    breached = make_reading(S.BOUNCE_RATE, 0.09, 0.08, BreachAction.WARN)
    result = judge([warned, breached])
    assert result.state is AccountState.WARNING
    assert result.decided_by is breached


def test_unjudged_readings_never_count() -> None:
    result = judge([make_reading(S.BOUNCE_RATE, 1.0, 0.08, is_judged=False)])
    assert result.state is AccountState.OK
    assert result.decided_by is None


def test_judge_of_nothing_is_ok() -> None:
    result = judge([])
    assert result == Judgement(AccountState.OK, None, ())
    assert result.reason("acme", MONTH) == "account acme ok: every rate within limits"


def test_reason_reads_like_the_policy() -> None:
    result = judged(Totals(sent=1000, bounces=94))
    assert result.reason("acme", 30 * 86400) == (
        "account acme suspended: bounce rate 9.4% over 30d exceeds 8.0%"
    )


def test_reason_of_a_throttle_names_the_window() -> None:
    result = judged(Totals(sent=1000, unsubscribes=12))
    assert result.reason("shop", 7200) == (
        "account shop throttled: unsubscribe rate 1.2% over 2h exceeds 1.0%"
    )


def test_describe_within_and_small_percentages() -> None:
    warning = reading_of(S.BOUNCE_RATE, Totals(sent=1000, bounces=70))
    assert warning.describe(MONTH) == "bounce rate 7.0% over 30d is within 8.0%"
    at_limit = reading_of(S.BOUNCE_RATE, Totals(sent=1000, bounces=80))
    assert at_limit.describe(MONTH) == "bounce rate 8.0% over 30d is within 8.0%"
    over = reading_of(S.BOUNCE_RATE, Totals(sent=1000, bounces=81))
    assert over.describe(MONTH) == "bounce rate 8.1% over 30d exceeds 8.0%"
    complaint = reading_of(S.COMPLAINT_RATE, Totals(sent=100_000, complaints=5))
    assert complaint.describe(86400) == (
        "complaint rate 0.005% over 1d is within 0.08%"
    )
    zero = reading_of(S.BLOCK_RATE, Totals(sent=1000))
    assert zero.describe(MONTH) == "block rate 0.0% over 30d is within 30.0%"
    per_day = reading_of(S.COMPLAINTS_PER_DAY, Totals(complaints_24h=7))
    assert per_day.describe(MONTH) == "complaints in 24h 7 is within 50"


# -- the counters --------------------------------------------------------------------


def test_window_hours_round_up() -> None:
    assert Counters(MONTH).window_hours == 720
    assert Counters(3600).window_hours == 1
    assert Counters(5400).window_hours == 2
    assert Counters(0).window_hours == 1


def test_counters_add_and_total() -> None:
    counters = Counters(MONTH)
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.SENT, BASE_HOUR, 1000)
    counters.add("acme", EventKind.BOUNCE, BASE_HOUR - 5, 90)
    counters.add("acme", EventKind.BOUNCE, BASE_HOUR, 4)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR - 1)
    counters.add("acme", EventKind.CLICK, BASE_HOUR, 0)  # ignored
    counters.add("zeta", EventKind.SPAMTRAP_HIT, BASE_HOUR)
    assert counters.accounts() == ["acme", "zeta"]
    assert counters.totals("acme") == Totals(
        sent=1000, bounces=94, complaints=1, complaints_24h=1
    )
    assert counters.totals("zeta") == Totals(spamtrap_hits=1)
    assert counters.totals("nobody") == Totals()
    assert counters.snapshot("acme") == {
        EventKind.SENT: 1000,
        EventKind.BOUNCE: 94,
        EventKind.COMPLAINT: 1,
    }
    assert counters.snapshot("nobody") == {}
    assert judge(readings(counters.totals("acme"), DEFAULTS)).reason("acme", MONTH) == (
        "account acme suspended: bounce rate 9.4% over 30d exceeds 8.0%"
    )


def test_counters_old_hours_leave_the_window() -> None:
    counters = Counters(3 * 3600)
    counters.advance(BASE_HOUR)
    for offset in (-3, -2, -1, 0):
        counters.add("acme", EventKind.SENT, BASE_HOUR + offset, 10 ** (offset + 3))
    # Hours BASE-2 .. BASE are in the window: 10 + 100 + 1000.
    assert counters.totals("acme").sent == 1110
    counters.advance(BASE_HOUR + 1)
    assert counters.totals("acme").sent == 1100
    counters.advance(BASE_HOUR)  # never backwards
    assert counters.totals("acme").sent == 1100
    counters.advance(BASE_HOUR + 3)
    assert counters.totals("acme").sent == 0
    counters.add("acme", EventKind.SENT, BASE_HOUR, 5)  # already left
    assert counters.totals("acme").sent == 0
    counters.add("acme", EventKind.SENT, BASE_HOUR + 1, 7)  # the window's first hour
    assert counters.totals("acme").sent == 7


def test_counters_future_hours_count() -> None:
    counters = Counters(3600)
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.SENT, BASE_HOUR + 2, 3)
    assert counters.totals("acme").sent == 3
    counters.advance(BASE_HOUR + 2)
    assert counters.totals("acme").sent == 3
    counters.advance(BASE_HOUR + 3)
    assert counters.totals("acme").sent == 0


def test_start_after_counts_only_later_hours() -> None:
    counters = Counters(MONTH)
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.BOUNCE, BASE_HOUR - 10, 50)
    counters.add("acme", EventKind.BOUNCE, BASE_HOUR - 2, 5)
    counters.add("other", EventKind.BOUNCE, BASE_HOUR - 10, 50)
    counters.start_after("acme", BASE_HOUR - 2)
    assert counters.totals("acme").bounces == 0
    assert counters.totals("other").bounces == 50
    counters.add("acme", EventKind.BOUNCE, BASE_HOUR - 2, 1)  # the reinstated hour
    counters.add("acme", EventKind.BOUNCE, BASE_HOUR - 1, 2)
    assert counters.totals("acme").bounces == 2
    counters.advance(BASE_HOUR + 1)
    assert counters.totals("acme").bounces == 2


def test_start_after_before_any_count_and_across_load() -> None:
    counters = Counters(MONTH)
    counters.start_after("acme", BASE_HOUR - 1)
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.SENT, BASE_HOUR - 1, 10)
    counters.add("acme", EventKind.SENT, BASE_HOUR, 20)
    assert counters.totals("acme").sent == 20
    counters.load(
        [
            CounterBucket("acme", BASE_HOUR - 1, EventKind.SENT, 100),
            CounterBucket("acme", BASE_HOUR, EventKind.SENT, 200),
        ],
        BASE_HOUR,
    )
    assert counters.totals("acme").sent == 200


def test_load_replaces_every_count() -> None:
    counters = Counters(2 * 86400)
    counters.advance(BASE_HOUR)
    counters.add("gone", EventKind.SENT, BASE_HOUR, 99)
    counters.add("acme", EventKind.SENT, BASE_HOUR, 99)
    counters.load(
        [
            CounterBucket("acme", BASE_HOUR, EventKind.SENT, 600),
            CounterBucket("acme", BASE_HOUR, EventKind.SENT, 400),  # summed
            CounterBucket("acme", BASE_HOUR - 1, EventKind.BOUNCE, 94),
            CounterBucket("acme", BASE_HOUR - 48, EventKind.BOUNCE, 1000),  # too old
            CounterBucket("acme", BASE_HOUR - 30, EventKind.COMPLAINT, 7),
            CounterBucket("acme", BASE_HOUR - 2, EventKind.COMPLAINT, 2),
        ],
        BASE_HOUR,
    )
    assert counters.accounts() == ["acme"]
    assert counters.totals("gone") == Totals()
    assert counters.totals("acme") == Totals(
        sent=1000, bounces=94, complaints=9, complaints_24h=2
    )


def test_complaints_older_than_24h_do_not_count_per_day() -> None:
    counters = Counters(MONTH)
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR - 24, 40)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR - 23, 50)
    totals = counters.totals("acme")
    assert (totals.complaints, totals.complaints_24h) == (90, 50)
    assert judge(readings(totals, DEFAULTS)).state is AccountState.WARNING
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR, 1)
    assert counters.totals("acme").complaints_24h == 51
    assert judge(readings(counters.totals("acme"), DEFAULTS)).state is (
        AccountState.SUSPENDED
    )
    counters.advance(BASE_HOUR + 1)
    assert counters.totals("acme").complaints_24h == 1


def test_complaints_per_day_respects_the_reinstatement() -> None:
    counters = Counters(MONTH)
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR - 3, 60)
    counters.start_after("acme", BASE_HOUR - 3)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR, 2)
    assert counters.totals("acme").complaints_24h == 2


def test_complaints_per_day_covers_24h_even_with_a_short_window() -> None:
    counters = Counters(3600)  # window = "1h", the smallest the config allows
    counters.advance(BASE_HOUR)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR - 5, 30)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR, 30)
    counters.add("acme", EventKind.COMPLAINT, BASE_HOUR - 24, 100)  # a day ago
    totals = counters.totals("acme")
    assert (totals.complaints, totals.complaints_24h) == (30, 60)
    counters.advance(BASE_HOUR + 1)
    assert counters.totals("acme").complaints_24h == 60
    assert counters.totals("acme").complaints == 0
    counters.load(
        [
            CounterBucket("acme", BASE_HOUR - 10, EventKind.COMPLAINT, 51),
            CounterBucket("acme", BASE_HOUR - 30, EventKind.COMPLAINT, 7),
        ],
        BASE_HOUR,
    )
    totals = counters.totals("acme")
    assert (totals.complaints, totals.complaints_24h) == (0, 51)
    assert judge(readings(totals, DEFAULTS)).state is AccountState.SUSPENDED


# -- property tests -------------------------------------------------------------------

KINDS = st.sampled_from(COUNTED_KINDS)
ACCOUNTS = st.sampled_from(["acme", "zeta"])
HOURS = st.integers(min_value=BASE_HOUR - 150, max_value=BASE_HOUR + 150)


@dataclass
class Model:
    """The brute force: every add kept, every total summed from scratch."""

    window_hours: int
    now: int = 0
    adds: list[tuple[str, EventKind, int, int]] = field(default_factory=list)
    floors: dict[str, int] = field(default_factory=dict)

    def first_hour(self, account: str) -> int:
        floor = self.floors.get(account)
        lowest = self.now - self.window_hours + 1
        return lowest if floor is None else max(lowest, floor + 1)

    def total(self, account: str, kind: EventKind, since: int) -> int:
        return sum(
            count
            for who, what, hour, count in self.adds
            if who == account and what == kind and hour >= since
        )

    def check(self, counters: Counters) -> None:
        for account in ("acme", "zeta"):
            got = counters.totals(account)
            since = self.first_hour(account)
            expected = Totals(
                sent=self.total(account, EventKind.SENT, since),
                bounces=self.total(account, EventKind.BOUNCE, since),
                blocks=self.total(account, EventKind.BLOCK, since),
                unsubscribes=self.total(account, EventKind.UNSUBSCRIBE, since),
                complaints=self.total(account, EventKind.COMPLAINT, since),
                clicks=self.total(account, EventKind.CLICK, since),
                spamtrap_hits=self.total(account, EventKind.SPAMTRAP_HIT, since),
                complaints_24h=got.complaints_24h,
            )
            assert got == expected, (account, self.now, self.floors)
            # The last 24 hours whatever the window, after any reinstatement.
            day = self.now - 23
            if account in self.floors:
                day = max(day, self.floors[account] + 1)
            assert got.complaints_24h == self.total(
                account, EventKind.COMPLAINT, day
            ), (account, self.now, self.floors)


ADD = st.tuples(st.just("add"), ACCOUNTS, KINDS, HOURS, st.integers(-1, 9))
ADVANCE = st.tuples(st.just("advance"), HOURS)
START_AFTER = st.tuples(st.just("start_after"), ACCOUNTS, HOURS)
LOAD = st.tuples(
    st.just("load"),
    st.lists(st.tuples(ACCOUNTS, KINDS, HOURS, st.integers(1, 9)), max_size=20),
    HOURS,
)
OPERATIONS = st.lists(
    st.one_of(ADD, ADD, ADD, ADVANCE, START_AFTER, LOAD), min_size=1, max_size=60
)


@settings(max_examples=400, deadline=None)
@given(window_hours=st.integers(1, 100), operations=OPERATIONS)
def test_counters_equal_brute_force(
    window_hours: int, operations: list[tuple[Any, ...]]
) -> None:
    counters = Counters(window_hours * 3600.0)
    assert counters.window_hours == window_hours
    model = Model(window_hours)
    model.check(counters)
    for operation in operations:
        match operation:
            case ("add", account, kind, hour, count):
                counters.add(account, kind, hour, count)
                if count > 0:
                    model.adds.append((account, kind, hour, count))
            case ("advance", hour):
                counters.advance(hour)
                model.now = max(model.now, hour)
            case ("start_after", account, hour):
                counters.start_after(account, hour)
                model.floors[account] = hour
            case ("load", rows, hour):
                counters.load([CounterBucket(a, h, k, c) for a, k, h, c in rows], hour)
                model.adds = list(rows)
                model.now = hour
        model.check(counters)


@st.composite
def consistent_totals(draw: st.DrawFn) -> Totals:
    sent = draw(st.integers(0, 1_000_000))
    bounces = draw(st.integers(0, sent))
    delivered = sent - bounces
    return Totals(
        sent=sent,
        bounces=bounces,
        blocks=draw(st.integers(0, 1_000_000)),
        unsubscribes=draw(st.integers(0, delivered)),
        complaints=draw(st.integers(0, delivered)),
        clicks=draw(st.integers(0, 1_000_000)),
        spamtrap_hits=draw(st.integers(0, 10)),
        complaints_24h=draw(st.integers(0, 200)),
    )


PERCENTS = st.integers(0, 10_000).map(lambda basis_points: f"{basis_points / 100}%")
ACTIONS = st.sampled_from([action.value for action in BreachAction])


@st.composite
def any_thresholds(draw: st.DrawFn) -> ThresholdsConfig:
    return ThresholdsConfig.model_validate(
        {
            "min_volume": draw(st.integers(1, 5000)),
            "warn_at": draw(st.sampled_from([0.5, 0.8, 0.9, 1.0])),
            "bounce_rate": draw(PERCENTS),
            "unsubscribe_rate": draw(PERCENTS),
            "unsubscribe_rate_without_clicks": draw(PERCENTS),
            "block_rate": draw(PERCENTS),
            "complaint_rate": draw(PERCENTS),
            "complaint_min_volume": draw(st.integers(0, 5000)),
            "complaints_per_day": draw(st.integers(0, 100)),
            "spamtrap_hits": draw(st.integers(0, 3)),
            "actions": {
                name: draw(ACTIONS)
                for name in (
                    "bounce_rate",
                    "unsubscribe_rate",
                    "block_rate",
                    "complaint_rate",
                    "complaints_per_day",
                    "spamtrap_hits",
                )
            },
        }
    )


RATES = (S.BOUNCE_RATE, S.UNSUBSCRIBE_RATE, S.BLOCK_RATE, S.COMPLAINT_RATE)


@settings(max_examples=300, deadline=None)
@given(totals=consistent_totals(), config=any_thresholds())
def test_rates_are_fractions_for_consistent_counts(
    totals: Totals, config: ThresholdsConfig
) -> None:
    for reading in readings(totals, config):
        assert reading.ratio >= 0
        if reading.statistic in RATES:
            assert 0.0 <= reading.value <= 1.0, reading
            assert reading.count <= reading.base or reading.base == 0, reading
        else:
            assert reading.value == reading.count


@settings(max_examples=300, deadline=None)
@given(totals=consistent_totals())
def test_no_rate_judged_below_min_volume_with_default_thresholds(
    totals: Totals,
) -> None:
    found = by_statistic(readings(totals, DEFAULTS))
    if totals.sent < DEFAULTS.min_volume:
        assert not found[S.BOUNCE_RATE].judged
        assert not found[S.UNSUBSCRIBE_RATE].judged
        assert not found[S.COMPLAINT_RATE].judged
    if totals.sent + totals.blocks < DEFAULTS.min_volume:
        assert not found[S.BLOCK_RATE].judged
    if totals.sent <= DEFAULTS.complaint_min_volume:
        assert not found[S.COMPLAINT_RATE].judged


@settings(max_examples=500, deadline=None)
@given(totals=consistent_totals(), config=any_thresholds(), data=st.data())
def test_judge_is_never_milder_than_a_breach(
    totals: Totals, config: ThresholdsConfig, data: st.DataObject
) -> None:
    found = readings(totals, config)
    result = judge(found)
    called_for = [
        STATE_OF_ACTION[r.action] if r.breached else AccountState.WARNING
        for r in found
        if r.breached or r.warning
    ]
    for state in called_for:
        assert SEVERITY[result.state] >= SEVERITY[state]
    # ... nor harsher than the worst of them.
    worst = max(called_for, key=SEVERITY.__getitem__, default=AccountState.OK)
    assert result.state is worst
    if result.decided_by is None:
        assert result.state is AccountState.OK
    else:
        decided = result.decided_by
        assert decided in found
        assert decided.breached or decided.warning
        ties = [
            r
            for r, state in zip(
                [r for r in found if r.breached or r.warning], called_for, strict=True
            )
            if state is worst
        ]
        assert decided.ratio == max(r.ratio for r in ties)
    # The order of the readings changes neither the state nor the deciding ratio.
    shuffled = judge(data.draw(st.permutations(found)))
    assert shuffled.state is result.state
    if result.decided_by is not None:
        assert shuffled.decided_by is not None
        assert shuffled.decided_by.ratio == result.decided_by.ratio
