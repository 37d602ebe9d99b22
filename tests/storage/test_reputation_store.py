"""Tests for the SQLite reputation tables (migration 0004): counting events by
trigger, ``sent`` counts from delivery attempts, the counter buckets, account
states and their audit trail, spamtraps and unattributed feedback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from policies.reputation import hour_of
from storage import (
    AttemptRecord,
    BounceType,
    Event,
    EventKind,
    NewMessage,
    RecipientResult,
    RecipientState,
    SqliteStore,
)
from storage.base import (
    AccountStanding,
    AccountState,
    AccountStateChange,
    CounterBucket,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)  # on the hour
H0 = int(T0.timestamp()) // 3600
CONTENT = b"From: news@acme.example\r\nSubject: hi\r\n\r\nHello\r\n"
K = EventKind


def event(
    kind: EventKind = K.BOUNCE,
    account: str | None = "acme",
    *,
    at: datetime = T0,
    key: str | None = None,
    recipient: str = "jane@example.org",
) -> Event:
    return Event(
        kind=kind,
        account=account,
        recipient=recipient,
        occurred_at=at,
        source="feedback",
        queue_id="Q1",
        smtp_code=550 if kind is K.BOUNCE else None,
        status="5.1.1" if kind is K.BOUNCE else None,
        bounce_type=BounceType.HARD if kind is K.BOUNCE else None,
        dedup_key=key,
    )


def new_message(
    queue_id: str, recipients: tuple[str, ...], account: str | None = "acme"
) -> NewMessage:
    return NewMessage(
        queue_id=queue_id,
        account=account,
        mail_from="news@acme.example",
        recipients=recipients,
        content=CONTENT,
        received_at=T0,
        expires_at=T0 + timedelta(days=5),
    )


def delivered(*addresses: str) -> tuple[RecipientResult, ...]:
    return tuple(
        RecipientResult(address, RecipientState.DELIVERED, 250, "2.0.0")
        for address in addresses
    )


async def buckets(store: SqliteStore, since_hour: int = 0) -> set[CounterBucket]:
    return set(await store.counter_buckets(since_hour))


# -- events count themselves ------------------------------------------------------


async def test_add_events_returns_only_the_new_events(store: SqliteStore) -> None:
    first = event(key="k1", recipient="a@example.org")
    second = event(K.COMPLAINT, key="k2", recipient="b@example.org")
    assert await store.add_events([]) == []
    assert await store.add_events([first, second, first]) == [first, second]
    third = event(K.UNSUBSCRIBE, key="k3", recipient="c@example.org")
    assert await store.add_events([second, third, first]) == [third]
    assert await store.add_events([first]) == []
    stored = await store.events()
    assert [e.dedup_key for e in stored] == ["k3", "k2", "k1"]


async def test_repeated_dedup_key_is_stored_and_counted_once(
    store: SqliteStore,
) -> None:
    bounce = event(key="Q1:jane:550")
    await store.add_events([bounce])
    await store.add_events([bounce])
    await store.add_events([bounce, bounce])
    assert await store.events() == [bounce]
    assert await buckets(store) == {CounterBucket("acme", H0, K.BOUNCE, 1)}


async def test_events_without_dedup_key_are_each_stored_and_counted(
    store: SqliteStore,
) -> None:
    click = event(K.CLICK)
    assert await store.add_events([click, click]) == [click, click]
    assert await store.add_events([click]) == [click]
    assert len(await store.events(kind=K.CLICK)) == 3
    assert await buckets(store) == {CounterBucket("acme", H0, K.CLICK, 3)}


async def test_events_without_account_are_stored_not_counted(
    store: SqliteStore,
) -> None:
    orphan = event(K.COMPLAINT, None, key="orphan")
    assert await store.add_events([orphan]) == [orphan]
    assert await store.events() == [orphan]
    assert await buckets(store) == set()


async def test_event_counts_land_in_their_hour_and_kind(store: SqliteStore) -> None:
    moments = {
        "start": T0,
        "end": T0 + timedelta(minutes=59, seconds=59, microseconds=999_000),
        "next": T0 + timedelta(hours=1),
        "before": T0 - timedelta(microseconds=1000),
        "days": T0 + timedelta(days=2, minutes=30),
    }
    events = [
        event(K.BOUNCE, at=moments["start"], key="b1"),
        event(K.BOUNCE, at=moments["end"], key="b2"),
        event(K.BOUNCE, at=moments["next"], key="b3"),
        event(K.COMPLAINT, at=moments["before"], key="c1"),
        event(K.UNSUBSCRIBE, at=moments["start"], key="u1"),
        event(K.SPAMTRAP_HIT, at=moments["days"], key="s1"),
        event(K.BLOCK, "zeta", at=moments["start"], key="z1"),
        event(K.CLICK, "zeta", at=moments["end"], key="z2"),
    ]
    assert await store.add_events(events) == events
    assert await buckets(store) == {
        CounterBucket("acme", H0, K.BOUNCE, 2),
        CounterBucket("acme", H0 + 1, K.BOUNCE, 1),
        CounterBucket("acme", H0 - 1, K.COMPLAINT, 1),
        CounterBucket("acme", H0, K.UNSUBSCRIBE, 1),
        CounterBucket("acme", H0 + 48, K.SPAMTRAP_HIT, 1),
        CounterBucket("zeta", H0, K.BLOCK, 1),
        CounterBucket("zeta", H0, K.CLICK, 1),
    }
    # The stored hour is the one the in-memory counters use.
    for found in events:
        assert found.account is not None
        hour = hour_of(found.occurred_at.timestamp())
        assert any(
            b.hour == hour and b.kind is found.kind and b.account == found.account
            for b in await buckets(store)
        )


async def test_block_events_from_enqueue_are_counted(store: SqliteStore) -> None:
    blocked = event(K.BLOCK, key="Q1:blocked@example.org", recipient="blocked")
    await store.enqueue(new_message("Q1", ("ok@example.org",)), events=[blocked])
    await store.enqueue(new_message("Q2", ("ok@example.org",)), events=[blocked])
    assert await buckets(store) == {CounterBucket("acme", H0, K.BLOCK, 1)}


# -- sent, from delivery attempts ---------------------------------------------------


async def test_record_attempts_adds_sent_to_the_attempt_hour(
    store: SqliteStore,
) -> None:
    await store.enqueue(
        new_message("Q1", ("a@example.org", "b@example.org", "c@example.org")),
        new_message("Q2", ("d@example.org", "e@example.org")),
        new_message("Q3", ("f@example.org",)),
    )
    await store.record_attempts(
        [
            AttemptRecord(
                "Q1",
                delivered("a@example.org", "b@example.org", "c@example.org"),
                T0 + timedelta(minutes=30),
                None,
                sent=3,
                account="acme",
            ),
            AttemptRecord(
                "Q2",
                delivered("d@example.org", "e@example.org"),
                T0 + timedelta(hours=1, minutes=5),
                None,
                sent=2,
                account="acme",
            ),
        ]
    )
    assert await buckets(store) == {
        CounterBucket("acme", H0, K.SENT, 3),
        CounterBucket("acme", H0 + 1, K.SENT, 2),
    }
    await store.record_attempt(
        AttemptRecord(
            "Q3",
            delivered("f@example.org"),
            T0 + timedelta(minutes=59),
            None,
            sent=1,
            account="acme",
        )
    )
    assert await buckets(store) == {
        CounterBucket("acme", H0, K.SENT, 4),
        CounterBucket("acme", H0 + 1, K.SENT, 2),
    }
    assert await store.list_messages() == []


async def test_attempt_counts_sent_and_its_bounces_together(
    store: SqliteStore,
) -> None:
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    await store.record_attempts(
        [
            AttemptRecord(
                "Q1",
                (
                    RecipientResult("a@example.org", RecipientState.BOUNCED, 550),
                    RecipientResult("b@example.org", RecipientState.PENDING, 451),
                ),
                T0 + timedelta(minutes=10),
                T0 + timedelta(minutes=20),  # still queued: counts all the same
                events=(event(K.BOUNCE, key="Q1:a", at=T0 + timedelta(minutes=10)),),
                sent=1,
                account="acme",
            )
        ]
    )
    assert await buckets(store) == {
        CounterBucket("acme", H0, K.SENT, 1),
        CounterBucket("acme", H0, K.BOUNCE, 1),
    }
    queued = await store.get_message("Q1")
    assert queued is not None
    assert queued.recipients == ("b@example.org",)


async def test_attempt_without_account_or_sent_adds_nothing(
    store: SqliteStore,
) -> None:
    await store.enqueue(
        new_message("DSN1", ("news@acme.example",), account=None),
        new_message("Q2", ("b@example.org",)),
    )
    await store.record_attempts(
        [
            AttemptRecord(
                "DSN1", delivered("news@acme.example"), T0, None, sent=5, account=None
            ),
            AttemptRecord(
                "Q2",
                (RecipientResult("b@example.org", RecipientState.PENDING, 451),),
                T0,
                T0 + timedelta(minutes=5),
                sent=0,
                account="acme",
            ),
        ]
    )
    assert await buckets(store) == set()
    assert await store.get_message("DSN1") is None


# -- the buckets --------------------------------------------------------------------


async def test_add_counts_adds_to_the_stored_counts(store: SqliteStore) -> None:
    await store.add_counts([])
    await store.add_events([event(K.BOUNCE, key="b1")])
    await store.add_counts(
        [
            CounterBucket("acme", H0, K.BOUNCE, 4),
            CounterBucket("acme", H0, K.SENT, 100),
            CounterBucket("acme", H0, K.SENT, 50),
            CounterBucket("zeta", H0 + 1, K.SENT, 7),
        ]
    )
    await store.add_counts([CounterBucket("acme", H0, K.SENT, 1)])
    assert await buckets(store) == {
        CounterBucket("acme", H0, K.BOUNCE, 5),
        CounterBucket("acme", H0, K.SENT, 151),
        CounterBucket("zeta", H0 + 1, K.SENT, 7),
    }


async def test_counter_buckets_since_hour(store: SqliteStore) -> None:
    await store.add_counts(
        [
            CounterBucket("acme", H0 + offset, K.SENT, 10 + offset)
            for offset in range(-3, 3)
        ]
    )
    found = await store.counter_buckets(H0)
    assert sorted(b.hour for b in found) == [H0, H0 + 1, H0 + 2]
    assert all(isinstance(b.kind, EventKind) for b in found)
    assert {b.count for b in found} == {10, 11, 12}
    assert len(await store.counter_buckets(H0 - 3)) == 6
    assert await store.counter_buckets(H0 + 3) == []


async def test_prune_counters_forgets_older_buckets(store: SqliteStore) -> None:
    await store.add_counts(
        [
            CounterBucket(account, H0 + offset, kind, 1)
            for account in ("acme", "zeta")
            for kind in (K.SENT, K.BOUNCE)
            for offset in (-2, -1, 0)
        ]
    )
    assert await store.prune_counters(H0 - 2) == 0
    assert await store.prune_counters(H0) == 8
    assert {b.hour for b in await buckets(store)} == {H0}
    assert len(await buckets(store)) == 4
    assert await store.prune_counters(H0) == 0


async def test_counts_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    first = SqliteStore(path)
    await first.open()
    await first.add_counts([CounterBucket("acme", H0, K.SENT, 9)])
    await first.add_events([event(key="b1")])
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await buckets(second) == {
            CounterBucket("acme", H0, K.SENT, 9),
            CounterBucket("acme", H0, K.BOUNCE, 1),
        }
        # Still counting once per key after the reopen.
        assert await second.add_events([event(key="b1")]) == []
        assert await buckets(second) == {
            CounterBucket("acme", H0, K.SENT, 9),
            CounterBucket("acme", H0, K.BOUNCE, 1),
        }
    finally:
        await second.close()


# -- account states ------------------------------------------------------------------


def standing(
    account: str = "acme",
    state: AccountState = AccountState.SUSPENDED,
    *,
    at: datetime = T0,
    by: str = "relay",
    statistic: str | None = "bounce_rate",
    judged_from: datetime | None = None,
    reason: str = "account acme suspended: bounce rate 9.4% over 30d exceeds 8.0%",
) -> AccountStanding:
    return AccountStanding(
        account=account,
        state=state,
        reason=reason,
        statistic=statistic,
        changed_at=at,
        changed_by=by,
        judged_from=judged_from,
    )


async def test_no_state_stored_at_first(store: SqliteStore) -> None:
    assert await store.account_standings() == []
    assert await store.account_state_changes("acme") == []


async def test_state_changes_are_stored_with_their_audit(store: SqliteStore) -> None:
    suspended = standing()
    await store.change_account_state(suspended, AccountState.OK)
    assert await store.account_standings() == [suspended]

    reinstated = standing(
        state=AccountState.OK,
        at=T0 + timedelta(hours=2, seconds=30),
        by="ops@example.org",
        statistic=None,
        judged_from=T0 + timedelta(hours=2, seconds=30),
        reason="reinstated after list clean-up",
    )
    await store.change_account_state(reinstated, AccountState.SUSPENDED)
    standings = await store.account_standings()
    assert standings == [reinstated]
    assert standings[0].judged_from == T0 + timedelta(hours=2, seconds=30)
    assert standings[0].changed_at.tzinfo is not None

    warned = standing(
        state=AccountState.WARNING,
        at=T0 + timedelta(hours=5),
        statistic="unsubscribe_rate",
        reason="account acme warning: unsubscribe rate 1.2% over 30d is within 1.4%",
    )
    await store.change_account_state(warned, AccountState.OK)
    assert await store.account_standings() == [warned]  # judged_from cleared

    changes = await store.account_state_changes("acme")
    assert changes == [
        AccountStateChange(
            "acme",
            AccountState.OK,
            AccountState.WARNING,
            warned.reason,
            "unsubscribe_rate",
            T0 + timedelta(hours=5),
            "relay",
        ),
        AccountStateChange(
            "acme",
            AccountState.SUSPENDED,
            AccountState.OK,
            "reinstated after list clean-up",
            None,
            T0 + timedelta(hours=2, seconds=30),
            "ops@example.org",
        ),
        AccountStateChange(
            "acme",
            AccountState.OK,
            AccountState.SUSPENDED,
            suspended.reason,
            "bounce_rate",
            T0,
            "relay",
        ),
    ]
    assert await store.account_state_changes("acme", limit=1) == changes[:1]
    assert await store.account_state_changes("acme", limit=2) == changes[:2]


async def test_states_are_per_account_ordered_by_name(store: SqliteStore) -> None:
    zeta = standing("zeta", AccountState.THROTTLED, statistic="block_rate")
    acme = standing("acme", AccountState.WARNING, at=T0 + timedelta(minutes=1))
    await store.change_account_state(zeta, AccountState.OK)
    await store.change_account_state(acme, AccountState.OK)
    assert await store.account_standings() == [acme, zeta]
    zeta_changes = await store.account_state_changes("zeta")
    assert [(c.account, c.new_state) for c in zeta_changes] == [
        ("zeta", AccountState.THROTTLED)
    ]
    assert await store.account_state_changes("nobody") == []


async def test_newest_first_even_with_equal_timestamps(store: SqliteStore) -> None:
    for state in (AccountState.WARNING, AccountState.THROTTLED, AccountState.SUSPENDED):
        await store.change_account_state(
            standing(state=state, reason=state.value), AccountState.OK
        )
    changes = await store.account_state_changes("acme")
    assert [c.new_state for c in changes] == [
        AccountState.SUSPENDED,
        AccountState.THROTTLED,
        AccountState.WARNING,
    ]


async def test_state_and_audit_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    kept = standing(
        state=AccountState.OK,
        by="ops@example.org",
        judged_from=T0 + timedelta(minutes=7, microseconds=250_000),
        reason="reinstated",
        statistic=None,
    )
    first = SqliteStore(path)
    await first.open()
    await first.change_account_state(standing(), AccountState.OK)
    await first.change_account_state(kept, AccountState.SUSPENDED)
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.account_standings() == [kept]
        changes = await second.account_state_changes("acme")
        assert [(c.old_state, c.new_state) for c in changes] == [
            (AccountState.SUSPENDED, AccountState.OK),
            (AccountState.OK, AccountState.SUSPENDED),
        ]
    finally:
        await second.close()


# -- spamtraps -----------------------------------------------------------------------


async def test_add_spamtraps_counts_only_new_addresses(store: SqliteStore) -> None:
    assert await store.count_spamtraps() == 0
    assert await store.add_spamtraps([], "feed", T0) == 0
    added = await store.add_spamtraps(
        ["trap@example.org", "TRAP@example.org", "other@example.net"], "feed", T0
    )
    assert added == 2
    assert await store.count_spamtraps() == 2
    again = await store.add_spamtraps(
        ["Trap@Example.ORG", "other@example.net", "new@example.com"], "feed2", T0
    )
    assert again == 1
    assert await store.count_spamtraps() == 3


async def test_is_spamtrap_ignores_case(store: SqliteStore) -> None:
    assert not await store.is_spamtrap("trap@example.org")
    await store.add_spamtraps(["Trap@Example.org"], "feed", T0)
    assert await store.is_spamtrap("trap@example.org")
    assert await store.is_spamtrap("TRAP@EXAMPLE.ORG")
    assert await store.is_spamtrap("Trap@Example.org")
    assert not await store.is_spamtrap("trap@example.org.evil")
    assert not await store.is_spamtrap("rap@example.org")
    assert not await store.is_spamtrap("")


async def test_spamtraps_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    first = SqliteStore(path)
    await first.open()
    assert await first.add_spamtraps(["trap@example.org"], "feed", T0) == 1
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.is_spamtrap("TRAP@example.org")
        assert await second.count_spamtraps() == 1
        assert await second.add_spamtraps(["trap@example.org"], "feed", T0) == 0
    finally:
        await second.close()


# -- unattributed feedback ------------------------------------------------------------


async def test_keep_unattributed(store: SqliteStore) -> None:
    assert await store.unattributed_count() == 0
    raw = b"From: abuse@isp.example\r\n\r\n\xff not an ARF report\r\n"
    await store.keep_unattributed(
        kind="arf",
        reason="no Original-Mail-From",
        mail_from="abuse@isp.example",
        recipient="fbl@relay.example",
        content=raw,
        now=T0,
    )
    await store.keep_unattributed(
        kind="dsn",
        reason="unknown queue id",
        mail_from="",
        recipient="bounces@relay.example",
        content=b"",
        now=T0 + timedelta(seconds=1),
    )
    assert await store.unattributed_count() == 2
    assert store._reader is not None
    async with store._reader.execute(
        "SELECT received_at, kind, reason, mail_from, recipient, content"
        " FROM unattributed_feedback ORDER BY id"
    ) as cursor:
        rows = [tuple(row) for row in await cursor.fetchall()]
    assert rows == [
        (
            T0.timestamp(),
            "arf",
            "no Original-Mail-From",
            "abuse@isp.example",
            "fbl@relay.example",
            raw,
        ),
        (
            T0.timestamp() + 1,
            "dsn",
            "unknown queue id",
            "",
            "bounces@relay.example",
            b"",
        ),
    ]


async def test_unattributed_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    first = SqliteStore(path)
    await first.open()
    await first.keep_unattributed(
        kind="arf",
        reason="unreadable",
        mail_from="abuse@isp.example",
        recipient="fbl@relay.example",
        content=b"x",
        now=T0,
    )
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.unattributed_count() == 1
    finally:
        await second.close()


async def test_migration_4_is_recorded(store: SqliteStore) -> None:
    assert store._reader is not None
    async with store._reader.execute("SELECT MAX(version) FROM schema_version") as cur:
        row = await cur.fetchone()
    assert row is not None
    assert row[0] >= 4
