"""Account states, rates and sending limits, between the store and the SMTP handler.

It owns the running relay's reputation counters (:class:`policies.reputation.
Counters`): loaded from the store at start, fed every event the relay records once
its commit succeeded, and read again from the store every
:data:`RECONCILE_SECONDS` (which also brings in what other processes wrote: the
CLI's reinstatements, feedback recorded elsewhere). After new counts it judges the
account; a change of state is applied at once (the next MAIL or RCPT sees it) and
stored with its audit record.

It answers the SMTP handler: a suspended account's MAIL gets ``550 5.7.1`` naming
the statistic, its value, the window and the threshold; a throttled account's
recipients beyond ``[thresholds] throttle_rate``, and any account's beyond its
``[accounts.NAME] rate``, get ``451 4.7.1``. Rates count recipients, per token
bucket. Mail the relay generates itself (DSNs) never passes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from config.models import RelayConfig, ThresholdsConfig
from config.units import RateLimit
from policies.reputation import (
    COUNTED_KINDS,
    DAY_HOURS,
    SEVERITY,
    Counters,
    Judgement,
    Totals,
    hour_of,
    judge,
    readings,
)
from relay.clock import Clock
from relay.metrics import Metrics
from relay.replies import SmtpReply
from relay.tracking import MAX_AGE_DAYS
from storage.base import (
    AccountStanding,
    AccountState,
    AccountStateChange,
    AttemptRecord,
    Event,
    EventKind,
    Store,
)
from storage.errors import StorageError

log = structlog.get_logger(__name__)

RECONCILE_SECONDS = 2.0
"""How often counts and states are read back from the store."""
COUNTS_RELOAD_SECONDS = 30.0
"""How often the counters are rebuilt from the store (corrects any drift)."""
PRUNE_SECONDS = 3600.0
"""How often counts that left every window are deleted from the store."""
RELAY = "relay"
"""``changed_by`` of the relay's own state changes."""


class TokenBucket:
    """``limit.count`` tokens, refilled evenly over ``limit.per_seconds``."""

    __slots__ = ("_limit", "_tokens", "_updated")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self._limit = limit
        self._tokens = float(limit.count)
        self._updated = now

    @property
    def limit(self) -> RateLimit:
        """The rate it enforces."""
        return self._limit

    def take(self, now: float) -> bool:
        """Take one token; False if none is left."""
        elapsed = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(
            float(self._limit.count), self._tokens + elapsed * self._limit.per_second
        )
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True, slots=True)
class AccountStatus:
    """Everything ``relay accounts status NAME`` shows."""

    account: str
    standing: AccountStanding | None
    judgement: Judgement
    totals: Totals
    window_seconds: float
    changes: tuple[AccountStateChange, ...] = ()

    @property
    def state(self) -> AccountState:
        """The stored state (``ok`` when none)."""
        return self.standing.state if self.standing else AccountState.OK


class Accounts:
    """The running relay's view of each account's reputation and limits."""

    def __init__(
        self, config: RelayConfig, store: Store, clock: Clock, metrics: Metrics
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._thresholds = config.thresholds
        self._queue_lifetime = config.queue.max_lifetime_seconds
        self._names = frozenset(config.accounts)
        self._rates = {
            name: account.rate
            for name, account in config.accounts.items()
            if account.rate is not None
        }
        self._counters = Counters(config.thresholds.window_seconds)
        self._standings: dict[str, AccountStanding] = {}
        self._limit_buckets: dict[str, TokenBucket] = {}
        self._throttle_buckets: dict[str, TokenBucket] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._counts_loaded_at = 0.0
        self._pruned_at = 0.0

    # -- lifetime ------------------------------------------------------------------

    async def start(self) -> None:
        """Load the counters and states from the store; judge every account."""
        await self._load_counts()
        await self._load_standings()
        for account in self._all_accounts():
            self._judge(account)

    async def run(self) -> None:
        """Read counts and states back from the store, forever."""
        while True:
            await asyncio.sleep(RECONCILE_SECONDS)
            try:
                if time.monotonic() - self._counts_loaded_at >= COUNTS_RELOAD_SECONDS:
                    await self._load_counts()
                if time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
                    self._pruned_at = time.monotonic()
                    keep = max(self._counters.window_hours, DAY_HOURS) + 1
                    await self._store.prune_counters(self._now_hour() - keep)
                    # Feedback is traced for the window, and at least as long
                    # as a tracking token is honoured (dated when a message
                    # that waited in the queue was finally sent).
                    traced = (
                        max(keep * 3600, MAX_AGE_DAYS * 86400) + self._queue_lifetime
                    )
                    await self._store.prune_sent_messages(
                        self._now() - timedelta(seconds=traced)
                    )
                await self._load_standings()
            except StorageError as exc:
                log.warning("account_state_reload_failed", error=str(exc))
                continue
            for account in self._all_accounts():
                self._judge(account)

    async def stop(self) -> None:
        """Wait for state changes still being written."""
        if self._writes:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*self._writes, return_exceptions=True)

    def configure(self, config: RelayConfig) -> None:
        """Take new thresholds, accounts and rates (a reload); counts stay."""
        window_changed = (
            config.thresholds.window_seconds != self._thresholds.window_seconds
        )
        self._thresholds = config.thresholds
        self._names = frozenset(config.accounts)
        self._rates = {
            name: account.rate
            for name, account in config.accounts.items()
            if account.rate is not None
        }
        self._limit_buckets = {
            name: bucket
            for name, bucket in self._limit_buckets.items()
            if self._rates.get(name) == bucket.limit
        }
        self._throttle_buckets = {
            name: bucket
            for name, bucket in self._throttle_buckets.items()
            if bucket.limit == config.thresholds.throttle_rate
        }
        if window_changed:
            self._counters = Counters(config.thresholds.window_seconds)
            self._counts_loaded_at = 0.0  # the next reconcile reloads them
        for account in self._all_accounts():
            self._judge(account)

    @property
    def thresholds(self) -> ThresholdsConfig:
        """The thresholds in force."""
        return self._thresholds

    # -- the SMTP handler's questions ----------------------------------------------

    def mail_refusal(self, account: str) -> SmtpReply | None:
        """``550 5.7.1`` for a suspended account, else ``None``."""
        standing = self._standings.get(account)
        if standing is not None and standing.state is AccountState.SUSPENDED:
            return SmtpReply(550, "5.7.1", standing.reason)
        return None

    def recipient_refusal(self, account: str) -> tuple[SmtpReply, str] | None:
        """``451 4.7.1`` (and a metric reason) when a rate is exhausted."""
        now = time.monotonic()
        standing = self._standings.get(account)
        if standing is not None and standing.state is AccountState.THROTTLED:
            limit = self._thresholds.throttle_rate
            bucket = self._throttle_buckets.get(account)
            if bucket is None:
                bucket = self._throttle_buckets[account] = TokenBucket(limit, now)
            if not bucket.take(now):
                return (
                    SmtpReply(
                        451,
                        "4.7.1",
                        f"{standing.reason}; sending limited to {limit} recipients",
                    ),
                    "account_throttled",
                )
        rate = self._rates.get(account)
        if rate is not None:
            bucket = self._limit_buckets.get(account)
            if bucket is None:
                bucket = self._limit_buckets[account] = TokenBucket(rate, now)
            if not bucket.take(now):
                return (
                    SmtpReply(
                        451,
                        "4.7.1",
                        f"account {account} reached its sending rate of {rate} "
                        "recipients; try again later",
                    ),
                    "rate_limited",
                )
        return None

    async def is_spamtrap(self, address: str) -> bool:
        """``address`` (canonical) is a spamtrap: one indexed lookup."""
        return await self._store.is_spamtrap(address)

    # -- counting ------------------------------------------------------------------

    def recorded(self, events: Iterable[Event]) -> None:
        """Events the store has just recorded as new: count them, judge."""
        self._counters.advance(self._now_hour())
        for account in self._count(events):
            self._judge(account)

    def attempts_recorded(self, records: Sequence[AttemptRecord]) -> None:
        """Delivery attempts the store has just committed: sent counts, bounces;
        each account touched is judged once."""
        self._counters.advance(self._now_hour())
        touched = self._count(event for record in records for event in record.events)
        for record in records:
            if record.account is not None and record.sent:
                self._counters.add(
                    record.account,
                    EventKind.SENT,
                    hour_of(record.attempted_at.timestamp()),
                    record.sent,
                )
                self._metrics.feedback_events_total.labels(
                    record.account, EventKind.SENT.value
                ).inc(record.sent)
                touched.add(record.account)
        for account in touched:
            self._judge(account)

    def _count(self, events: Iterable[Event]) -> set[str]:
        """Add ``events`` to the counters; the accounts they concern."""
        touched: set[str] = set()
        for event in events:
            if event.account is None or event.kind not in COUNTED_KINDS:
                continue
            self._counters.add(
                event.account, event.kind, hour_of(event.occurred_at.timestamp())
            )
            self._metrics.feedback_events_total.labels(
                event.account, event.kind.value
            ).inc()
            touched.add(event.account)
        return touched

    # -- operators -----------------------------------------------------------------

    async def reinstate(self, account: str, reason: str, by: str) -> AccountStanding:
        """Back to ``ok``; rates count afresh from now. Stored first."""
        standing = await reinstate_in_store(
            self._store, account, reason, by, self._now()
        )
        self._adopt(standing)
        await self._load_counts()  # the hour's earlier counts moved back
        return standing

    async def status(self, account: str, changes: int = 10) -> AccountStatus:
        """The account's state, rates and recent changes."""
        totals = self._counters.totals(account)
        history = await self._store.account_state_changes(account, changes)
        return AccountStatus(
            account=account,
            standing=self._standings.get(account),
            judgement=judge(readings(totals, self._thresholds)),
            totals=totals,
            window_seconds=self._thresholds.window_seconds,
            changes=tuple(history),
        )

    def state_of(self, account: str) -> AccountState:
        """The current state (``ok`` when none is stored)."""
        standing = self._standings.get(account)
        return standing.state if standing else AccountState.OK

    # -- internals -----------------------------------------------------------------

    def _now(self) -> datetime:
        return self._clock.now()

    def _now_hour(self) -> int:
        return hour_of(self._now().timestamp())

    def _all_accounts(self) -> set[str]:
        return set(self._names) | set(self._standings) | set(self._counters.accounts())

    async def _load_counts(self) -> None:
        now_hour = self._now_hour()
        since = now_hour - max(self._counters.window_hours, DAY_HOURS)
        buckets = await self._store.counter_buckets(since)
        self._counters.load(buckets, now_hour)
        for account, standing in self._standings.items():
            if standing.judged_from is not None:
                self._counters.start_after(
                    account, hour_of(standing.judged_from.timestamp()) - 1
                )
        self._counts_loaded_at = time.monotonic()

    async def _load_standings(self) -> None:
        fresh_start = False
        for standing in await self._store.account_standings():
            known = self._standings.get(standing.account)
            if known is None or standing.changed_at > known.changed_at:
                fresh_start |= standing.judged_from is not None and (
                    known is None or known.judged_from != standing.judged_from
                )
                self._adopt(standing)
        if fresh_start:  # a reinstatement elsewhere moved counts: read them again
            await self._load_counts()

    def _adopt(self, standing: AccountStanding) -> None:
        old = self._standings.get(standing.account)
        self._standings[standing.account] = standing
        if standing.judged_from is not None and (
            old is None or old.judged_from != standing.judged_from
        ):
            self._counters.start_after(
                standing.account, hour_of(standing.judged_from.timestamp()) - 1
            )
        if standing.state is not AccountState.THROTTLED:
            self._throttle_buckets.pop(standing.account, None)
        self._export_state(standing.account, standing.state)

    def _judge(self, account: str) -> None:
        totals = self._counters.totals(account)
        judgement = judge(readings(totals, self._thresholds))
        for reading in judgement.readings:
            self._metrics.account_rate_ratio.labels(
                account, reading.statistic.value
            ).set(min(reading.ratio, 1e9))
        current = self._standings.get(account)
        state = current.state if current else AccountState.OK
        wanted = judgement.state
        if state is AccountState.SUSPENDED or wanted is state:
            self._export_state(account, state)
            return  # suspended stays until an operator reinstates the account
        reason = judgement.reason(account, self._thresholds.window_seconds)
        standing = AccountStanding(
            account=account,
            state=wanted,
            reason=reason,
            statistic=(
                judgement.decided_by.statistic.value if judgement.decided_by else None
            ),
            changed_at=self._now(),
            changed_by=RELAY,
            judged_from=current.judged_from if current else None,
        )
        self._adopt(standing)
        emit = log.warning if SEVERITY[wanted] > SEVERITY[state] else log.info
        emit(
            "account_state_changed",
            account=account,
            old_state=state.value,
            new_state=wanted.value,
            reason=reason,
            statistic=standing.statistic,
        )
        task = asyncio.get_running_loop().create_task(
            self._store_change(standing, state)
        )
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store_change(self, standing: AccountStanding, old: AccountState) -> None:
        try:
            await self._store.change_account_state(standing, old)
        except StorageError:
            # Kept in memory; the next judgement after a restart decides again.
            log.exception("account_state_not_stored", account=standing.account)

    def _export_state(self, account: str, state: AccountState) -> None:
        for each in AccountState:
            self._metrics.account_state.labels(account, each.value).set(
                1 if each is state else 0
            )


async def reinstate_in_store(
    store: Store, account: str, reason: str, by: str, now: datetime
) -> AccountStanding:
    """Store a reinstatement (the CLI does this with the relay running or not)."""
    current = {s.account: s for s in await store.account_standings()}.get(account)
    # Rates count from this hour on; what this hour counted so far moves back.
    await store.close_hour(account, hour_of(now.timestamp()))
    standing = AccountStanding(
        account=account,
        state=AccountState.OK,
        reason=f"reinstated: {reason}",
        statistic=None,
        changed_at=now,
        changed_by=by,
        judged_from=now,
    )
    await store.change_account_state(
        standing, current.state if current else AccountState.OK
    )
    return standing
