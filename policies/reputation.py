"""Turns events into rolling per-account rates and decides warn, throttle or suspend.

Counts are kept per account in hourly buckets (unix time // 3600) over ``[thresholds]
window``; the window's totals are kept up to date as buckets are added and as old
hours leave the window, so judging an account costs a handful of divisions, not a
walk over 720 buckets. Nothing here does I/O: :mod:`relay.accounts` loads the
buckets from the store, feeds new events in, stores the state changes and serves
the SMTP handler.

The statistics (DESIGN.md, the sending policy):

=====================  ===========================================  =================
statistic              value                                        judged when
=====================  ===========================================  =================
``bounce_rate``        bounces / sent                               sent >= min_volume
``unsubscribe_rate``   unsubscribes / delivered; the limit is       sent >= min_volume
                       ``unsubscribe_rate_without_clicks`` once
                       unsubscribes exceed clicks
``block_rate``         blocks / (sent + blocks)                     sent + blocks >=
                                                                    min_volume
``complaint_rate``     complaints / delivered                       sent >
                                                                    complaint_min_volume
``complaints_per_day`` complaints in the last 24 hours              always
``spamtrap_hits``      spamtrap hits in the window                  always
=====================  ===========================================  =================

``sent`` counts the recipients the relay finished sending (accepted upstream, or
bounced or expired at delivery); ``delivered`` is sent minus bounces. A value
*above* its limit breaches; above ``warn_at`` x the limit warns. The worst breach
decides the state through ``[thresholds.actions]``: ``warn`` -> warning, ``throttle``
-> throttled, ``suspend`` -> suspended. Warning and throttled follow the rates both
ways; suspended stays until an operator reinstates the account, after which rates
count only what happened after the reinstatement (the store moves the counts of
the reinstatement hour so far into the hour before: ``close_hour``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from config.models import BreachAction, ThresholdsConfig
from storage.base import AccountState, CounterBucket, EventKind

HOUR_SECONDS = 3600
DAY_HOURS = 24


class Statistic(StrEnum):
    """What the thresholds limit; also the metric label and the config key."""

    BOUNCE_RATE = "bounce_rate"
    UNSUBSCRIBE_RATE = "unsubscribe_rate"
    BLOCK_RATE = "block_rate"
    COMPLAINT_RATE = "complaint_rate"
    COMPLAINTS_PER_DAY = "complaints_per_day"
    SPAMTRAP_HITS = "spamtrap_hits"


_LABELS = {
    Statistic.BOUNCE_RATE: "bounce rate",
    Statistic.UNSUBSCRIBE_RATE: "unsubscribe rate",
    Statistic.BLOCK_RATE: "block rate",
    Statistic.COMPLAINT_RATE: "complaint rate",
    Statistic.COMPLAINTS_PER_DAY: "complaints in 24h",
    Statistic.SPAMTRAP_HITS: "spamtrap hits",
}
_RATES = frozenset(
    {
        Statistic.BOUNCE_RATE,
        Statistic.UNSUBSCRIBE_RATE,
        Statistic.BLOCK_RATE,
        Statistic.COMPLAINT_RATE,
    }
)
_STATE_OF_ACTION = {
    BreachAction.WARN: AccountState.WARNING,
    BreachAction.THROTTLE: AccountState.THROTTLED,
    BreachAction.SUSPEND: AccountState.SUSPENDED,
}
SEVERITY = {
    AccountState.OK: 0,
    AccountState.WARNING: 1,
    AccountState.THROTTLED: 2,
    AccountState.SUSPENDED: 3,
}
COUNTED_KINDS = (
    EventKind.SENT,
    EventKind.BOUNCE,
    EventKind.BLOCK,
    EventKind.UNSUBSCRIBE,
    EventKind.COMPLAINT,
    EventKind.CLICK,
    EventKind.SPAMTRAP_HIT,
)


def hour_of(timestamp: float) -> int:
    """The bucket of a unix time."""
    return math.floor(timestamp / HOUR_SECONDS)


def window_text(seconds: float) -> str:
    """``2592000`` -> ``30d``; ``7200`` -> ``2h``."""
    if seconds % 86400 == 0:
        return f"{int(seconds // 86400)}d"
    return f"{int(seconds // 3600)}h"


@dataclass(frozen=True, slots=True)
class Totals:
    """One account's counts over the window (and complaints over the last day)."""

    sent: int = 0
    bounces: int = 0
    blocks: int = 0
    unsubscribes: int = 0
    complaints: int = 0
    clicks: int = 0
    spamtrap_hits: int = 0
    complaints_24h: int = 0

    @property
    def delivered(self) -> int:
        """Sent and not bounced."""
        return max(0, self.sent - self.bounces)


@dataclass(frozen=True, slots=True)
class Reading:
    """One statistic of one account against its threshold."""

    statistic: Statistic
    value: float
    """A fraction for the rates, a count for the others."""
    limit: float
    count: int
    """The numerator (bounces, complaints, hits...)."""
    base: int
    """The denominator of a rate (0 for the counts)."""
    judged: bool
    """False below the volume the statistic needs."""
    action: BreachAction
    warn_at: float

    @property
    def ratio(self) -> float:
        """value / limit (the metric ``relay_account_rate_ratio``)."""
        if self.limit > 0:
            return self.value / self.limit
        return math.inf if self.value > 0 else 0.0

    @property
    def breached(self) -> bool:
        """Judged, and above its limit."""
        return self.judged and self.value > self.limit

    @property
    def warning(self) -> bool:
        """Judged, and above ``warn_at`` x its limit."""
        return self.judged and self.value > self.warn_at * self.limit

    def describe(self, window_seconds: float) -> str:
        """``bounce rate 9.4% over 30d exceeds 8.0%``."""
        label = _LABELS[self.statistic]
        verb = "exceeds" if self.value > self.limit else "is within"
        if self.statistic in _RATES:
            value, limit = _percent(self.value), _percent(self.limit)
            if value == limit and self.value != self.limit:
                value, limit = _percent(self.value, 3), _percent(self.limit, 3)
            return f"{label} {value} over {window_text(window_seconds)} {verb} {limit}"
        span = (
            ""
            if self.statistic is Statistic.COMPLAINTS_PER_DAY
            else f" over {window_text(window_seconds)}"
        )
        return f"{label} {self.count}{span} {verb} {int(self.limit)}"


def _percent(fraction: float, decimals: int = 1) -> str:
    percent = fraction * 100
    if percent == 0 or percent >= 0.1:
        return f"{percent:.{decimals}f}%"
    return f"{percent:.{decimals + 1}g}%"


def readings(totals: Totals, thresholds: ThresholdsConfig) -> list[Reading]:
    """Every statistic of ``totals`` against ``thresholds``."""
    t = thresholds
    actions = t.actions
    delivered = totals.delivered
    unsubscribe_limit = (
        t.unsubscribe_rate_without_clicks
        if totals.unsubscribes > totals.clicks
        else t.unsubscribe_rate
    )
    submitted = totals.sent + totals.blocks
    return [
        Reading(
            Statistic.BOUNCE_RATE,
            _ratio(totals.bounces, totals.sent),
            t.bounce_rate,
            totals.bounces,
            totals.sent,
            totals.sent >= t.min_volume,
            actions.bounce_rate,
            t.warn_at,
        ),
        Reading(
            Statistic.UNSUBSCRIBE_RATE,
            _ratio(totals.unsubscribes, delivered),
            unsubscribe_limit,
            totals.unsubscribes,
            delivered,
            totals.sent >= t.min_volume and delivered > 0,
            actions.unsubscribe_rate,
            t.warn_at,
        ),
        Reading(
            Statistic.BLOCK_RATE,
            _ratio(totals.blocks, submitted),
            t.block_rate,
            totals.blocks,
            submitted,
            submitted >= t.min_volume,
            actions.block_rate,
            t.warn_at,
        ),
        Reading(
            Statistic.COMPLAINT_RATE,
            _ratio(totals.complaints, delivered),
            t.complaint_rate,
            totals.complaints,
            delivered,
            totals.sent > t.complaint_min_volume
            and totals.sent >= t.min_volume
            and delivered > 0,
            actions.complaint_rate,
            t.warn_at,
        ),
        Reading(
            Statistic.COMPLAINTS_PER_DAY,
            float(totals.complaints_24h),
            float(t.complaints_per_day),
            totals.complaints_24h,
            0,
            True,
            actions.complaints_per_day,
            t.warn_at,
        ),
        Reading(
            Statistic.SPAMTRAP_HITS,
            float(totals.spamtrap_hits),
            float(t.spamtrap_hits),
            totals.spamtrap_hits,
            0,
            True,
            actions.spamtrap_hits,
            t.warn_at,
        ),
    ]


def _ratio(count: int, base: int) -> float:
    return count / base if base > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Judgement:
    """The state the readings call for, and the reading that decided it."""

    state: AccountState
    decided_by: Reading | None
    readings: tuple[Reading, ...]

    def reason(self, account: str, window_seconds: float) -> str:
        """``account acme suspended: bounce rate 9.4% over 30d exceeds 8.0%``."""
        if self.decided_by is None:
            return f"account {account} {self.state.value}: every rate within limits"
        return (
            f"account {account} {self.state.value}: "
            f"{self.decided_by.describe(window_seconds)}"
        )


def judge(found: Iterable[Reading]) -> Judgement:
    """The worst state among the breaches (warnings count as ``warning``)."""
    every = tuple(found)
    state, decided = AccountState.OK, None
    for reading in every:
        if reading.breached:
            candidate = _STATE_OF_ACTION[reading.action]
        elif reading.warning:
            candidate = AccountState.WARNING
        else:
            continue
        if SEVERITY[candidate] > SEVERITY[state] or (
            SEVERITY[candidate] == SEVERITY[state]
            and decided is not None
            and reading.ratio > decided.ratio
        ):
            state, decided = candidate, reading
    return Judgement(state, decided, every)


@dataclass(slots=True)
class _Account:
    buckets: dict[int, dict[EventKind, int]] = field(default_factory=dict)
    totals: dict[EventKind, int] = field(default_factory=dict)
    first_hour: int = 0
    """Hours before this are outside the judged window (or before a reinstatement)."""


class Counters:
    """Hourly buckets per account, with the window's totals kept current."""

    def __init__(self, window_seconds: float) -> None:
        self._window_hours = max(1, math.ceil(window_seconds / HOUR_SECONDS))
        self._accounts: dict[str, _Account] = {}
        self._floors: dict[str, int] = {}
        self._now_hour = 0

    @property
    def window_hours(self) -> int:
        """Hours in the window (the current hour included)."""
        return self._window_hours

    def accounts(self) -> list[str]:
        """Accounts with counts."""
        return sorted(self._accounts)

    def start_after(self, account: str, hour: int) -> None:
        """Judge ``account`` only on the hours after ``hour`` (a reinstatement)."""
        self._floors[account] = hour + 1
        found = self._accounts.get(account)
        if found is not None:
            self._recount(found, account)

    def load(self, buckets: Iterable[CounterBucket], now_hour: int) -> None:
        """Replace every count with ``buckets`` (from the store)."""
        self._accounts = {}
        self._now_hour = now_hour
        for bucket in buckets:
            entry = self._accounts.setdefault(bucket.account, _Account())
            counts = entry.buckets.setdefault(bucket.hour, {})
            counts[bucket.kind] = counts.get(bucket.kind, 0) + bucket.count
        for account, entry in self._accounts.items():
            self._recount(entry, account)

    def add(self, account: str, kind: EventKind, hour: int, count: int = 1) -> None:
        """``count`` more events of ``kind`` in ``hour``."""
        if count <= 0:
            return
        entry = self._accounts.get(account)
        if entry is None:
            entry = self._accounts[account] = _Account()
            self._recount(entry, account)
        counts = entry.buckets.setdefault(hour, {})
        counts[kind] = counts.get(kind, 0) + count
        if hour >= entry.first_hour:
            entry.totals[kind] = entry.totals.get(kind, 0) + count

    def advance(self, now_hour: int) -> None:
        """Move the window to end at ``now_hour``: old hours leave the totals."""
        if now_hour <= self._now_hour:
            return
        self._now_hour = now_hour
        for account, entry in self._accounts.items():
            self._recount(entry, account)

    def _recount(self, entry: _Account, account: str) -> None:
        entry.first_hour = max(
            self._now_hour - self._window_hours + 1, self._floors.get(account, 0)
        )
        # Complaints are judged over the last 24 hours even in a shorter window.
        oldest = self._now_hour - max(self._window_hours, DAY_HOURS)
        for hour in [h for h in entry.buckets if h < oldest]:
            del entry.buckets[hour]  # outside any window from now on
        totals: dict[EventKind, int] = {}
        for hour, counts in entry.buckets.items():
            if hour >= entry.first_hour:
                for kind, count in counts.items():
                    totals[kind] = totals.get(kind, 0) + count
        entry.totals = totals

    def totals(self, account: str) -> Totals:
        """The account's window totals."""
        entry = self._accounts.get(account)
        if entry is None:
            return Totals()
        t = entry.totals
        day_from = max(self._now_hour - DAY_HOURS + 1, self._floors.get(account, 0))
        buckets = entry.buckets
        complaints_24h = sum(
            buckets[hour].get(EventKind.COMPLAINT, 0)
            for hour in range(day_from, self._now_hour + 1)
            if hour in buckets
        ) + sum(  # hours ahead of the clock (a skewed sender) count as now
            counts.get(EventKind.COMPLAINT, 0)
            for hour, counts in buckets.items()
            if hour > self._now_hour and hour >= day_from
        )
        return Totals(
            sent=t.get(EventKind.SENT, 0),
            bounces=t.get(EventKind.BOUNCE, 0),
            blocks=t.get(EventKind.BLOCK, 0),
            unsubscribes=t.get(EventKind.UNSUBSCRIBE, 0),
            complaints=t.get(EventKind.COMPLAINT, 0),
            clicks=t.get(EventKind.CLICK, 0),
            spamtrap_hits=t.get(EventKind.SPAMTRAP_HIT, 0),
            complaints_24h=complaints_24h,
        )

    def snapshot(self, account: str) -> Mapping[EventKind, int]:
        """The window totals by kind (for status output)."""
        entry = self._accounts.get(account)
        return dict(entry.totals) if entry is not None else {}
