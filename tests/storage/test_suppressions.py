"""Tests for the SQLite exclusion list: scope, expiry, upsert, audited removal,
all-or-nothing writes, keyset pagination, the indexed lookup, and BLOCK events."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage import (
    Event,
    EventKind,
    SqliteStore,
    StorageError,
    Suppression,
    SuppressionReason,
    SuppressionRemoval,
    canonical_address,
    parse_suppressions_csv,
    write_suppressions_csv,
)
from storage.sqlite_lists import LOOKUP_SUPPRESSIONS

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
R = SuppressionReason


def entry(
    address: str = "jane@example.org",
    account: str | None = None,
    reason: SuppressionReason = R.UNSUBSCRIBE,
    *,
    note: str = "",
    expires_at: datetime | None = None,
    created_at: datetime = T0,
    source: str = "test",
) -> Suppression:
    return Suppression(
        address=address,
        account=account,
        reason=reason,
        source=source,
        created_at=created_at,
        note=note,
        expires_at=expires_at,
    )


def key(item: Suppression) -> tuple[str, str, str]:
    return (item.address, item.account or "", item.reason.value)


# -- scope and expiry ----------------------------------------------------------


async def test_global_entry_applies_to_every_account(store: SqliteStore) -> None:
    await store.add_suppressions([entry(reason=R.HARD_BOUNCE)])
    for account in ("acme", "globex"):
        found = await store.suppressions_for("jane@example.org", account, T0)
        assert found == [entry(reason=R.HARD_BOUNCE)]
        assert found[0].account is None


async def test_account_entry_applies_to_that_account_only(store: SqliteStore) -> None:
    await store.add_suppressions([entry(account="acme")])
    assert await store.suppressions_for("jane@example.org", "acme", T0) == [
        entry(account="acme")
    ]
    assert await store.suppressions_for("jane@example.org", "globex", T0) == []
    assert await store.suppressions_for("bob@example.org", "acme", T0) == []


async def test_lookup_returns_global_and_own_entries(store: SqliteStore) -> None:
    own = entry(account="acme", reason=R.MANUAL)
    everyone = entry(reason=R.COMPLAINT)
    other = entry(account="globex", reason=R.UNSUBSCRIBE)
    await store.add_suppressions([own, everyone, other])
    assert await store.suppressions_for("jane@example.org", "acme", T0) == [
        everyone,
        own,
    ]


async def test_expired_entries_are_not_returned(store: SqliteStore) -> None:
    expiring = entry(reason=R.SOFT_BOUNCE, expires_at=T0 + timedelta(days=1))
    lasting = entry(reason=R.MANUAL)
    await store.add_suppressions([expiring, lasting])
    before = await store.suppressions_for("jane@example.org", "acme", T0)
    assert before == [lasting, expiring]
    at_expiry = T0 + timedelta(days=1)
    assert await store.suppressions_for("jane@example.org", "acme", at_expiry) == [
        lasting
    ]
    # Expired entries stay listed and counted until removed.
    assert await store.count_suppressions() == 2


async def test_lookup_ignores_the_case_of_the_local_part(store: SqliteStore) -> None:
    await store.add_suppressions([entry("Jane@example.org")])
    for spelling in ("jane@example.org", "JANE@example.org", "Jane@example.org"):
        found = await store.suppressions_for(spelling, "acme", T0)
        assert [item.address for item in found] == ["Jane@example.org"]
    assert await store.suppressions_for("jane.doe@example.org", "acme", T0) == []


async def test_imported_mixed_case_domain_matches_lookup_in_another_case(
    store: SqliteStore,
) -> None:
    text = "address,reason\nJane@EXAMPLE.Org,unsubscribe\nbob@BÜCHER.example,manual\n"
    entries = parse_suppressions_csv(io.StringIO(text), source="import", now=T0)
    await store.add_suppressions(entries)
    jane = canonical_address("Jane@example.ORG")
    bob = canonical_address("bob@xn--bcher-kva.EXAMPLE")
    assert len(await store.suppressions_for(jane, "acme", T0)) == 1
    assert len(await store.suppressions_for(bob, "acme", T0)) == 1


# -- writing -------------------------------------------------------------------


async def test_same_key_is_replaced(store: SqliteStore) -> None:
    assert await store.add_suppressions([entry(note="first", source="cli")]) == 1
    later = entry(note="second", source="api", created_at=T0 + timedelta(hours=1))
    assert await store.add_suppressions([later]) == 1
    assert await store.count_suppressions() == 1
    assert await store.suppressions_for("jane@example.org", "acme", T0) == [later]


async def test_same_key_twice_in_one_batch_keeps_the_last(store: SqliteStore) -> None:
    first = entry(reason=R.SOFT_BOUNCE, expires_at=T0 + timedelta(days=1))
    last = entry(reason=R.SOFT_BOUNCE, expires_at=T0 + timedelta(days=9))
    assert await store.add_suppressions([first, last]) == 2
    assert await store.list_suppressions() == [last]


async def test_different_reasons_and_scopes_are_separate_entries(
    store: SqliteStore,
) -> None:
    await store.add_suppressions(
        [entry(), entry(reason=R.MANUAL), entry(account="acme"), entry("b@example.org")]
    )
    assert await store.count_suppressions() == 4


async def test_empty_batch_writes_nothing(store: SqliteStore) -> None:
    before = store.commits
    assert await store.add_suppressions([]) == 0
    assert store.commits == before


@pytest.mark.parametrize(
    "bad",
    [
        entry(reason=R.UNSUBSCRIBE, expires_at=T0 + timedelta(days=1)),
        entry(reason=R.COMPLAINT, expires_at=T0 + timedelta(days=1)),
        entry(account=""),
        entry(address=""),
        entry(created_at=datetime(2026, 3, 1)),  # noqa: DTZ001 (naive on purpose)
    ],
    ids=[
        "unsubscribe-expiring",
        "complaint-expiring",
        "empty-account",
        "no-address",
        "naive-time",
    ],
)
async def test_invalid_entry_rejects_the_whole_batch(
    store: SqliteStore, bad: Suppression
) -> None:
    await store.add_suppressions([entry("kept@example.org")])
    batch = [entry(f"u{i}@example.org") for i in range(5)] + [bad]
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        await store.add_suppressions(batch)
    assert await store.list_suppressions() == [entry("kept@example.org")]


async def test_failure_inside_the_transaction_writes_nothing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that fails at the database, after earlier chunks ran, rolls them back."""
    monkeypatch.setattr("storage.sqlite_lists._CHUNK_ROWS", 3)
    good = [entry(f"u{i:02}@example.org") for i in range(10)]
    unbindable = entry("zz@example.org", note=object())  # type: ignore[arg-type]
    with pytest.raises(StorageError):
        await store.add_suppressions([*good, unbindable])
    assert await store.count_suppressions() == 0
    # The writer carries on.
    assert await store.add_suppressions(good) == 10
    assert await store.count_suppressions() == 10


async def test_large_batch_is_checked_off_the_loop_all_or_nothing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("storage.sqlite_lists._THREAD_ROWS", 2)
    good = [entry(f"u{i}@example.org") for i in range(5)]
    bad = entry("x@example.org", reason=R.COMPLAINT, expires_at=T0)
    with pytest.raises(ValueError, match="never expire"):
        await store.add_suppressions([*good, bad])
    assert await store.count_suppressions() == 0
    assert await store.add_suppressions(good) == 5
    assert await store.list_suppressions() == sorted(good, key=key)


async def test_entries_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    first = SqliteStore(path)
    await first.open()
    stored = [
        entry(account="acme", note="asked by phone", source="cli"),
        entry(reason=R.SOFT_BOUNCE, expires_at=T0 + timedelta(days=3, microseconds=7)),
    ]
    await first.add_suppressions(stored)
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        assert await second.list_suppressions() == sorted(stored, key=key)
    finally:
        await second.close()


# -- removal -------------------------------------------------------------------


async def test_removal_is_audited_and_returned(store: SqliteStore) -> None:
    global_entries = [entry(reason=R.UNSUBSCRIBE), entry(reason=R.HARD_BOUNCE)]
    own = entry(account="acme", reason=R.UNSUBSCRIBE)
    await store.add_suppressions([*global_entries, own])
    when = T0 + timedelta(days=2)

    removed = await store.remove_suppressions(
        "jane@example.org",
        None,
        reason=None,
        removed_by="ops@acme.example",
        why="ticket 42: address re-confirmed",
        now=when,
    )

    assert removed == sorted(global_entries, key=key)
    assert await store.suppressions_for("jane@example.org", "acme", when) == [own]
    removals = await store.suppression_removals("jane@example.org")
    assert sorted(removals, key=lambda r: r.reason) == [
        SuppressionRemoval(
            address="jane@example.org",
            account=None,
            reason=reason,
            removed_by="ops@acme.example",
            removed_at=when,
            why="ticket 42: address re-confirmed",
        )
        for reason in sorted([R.HARD_BOUNCE, R.UNSUBSCRIBE])
    ]


async def test_removal_of_one_reason_in_one_scope(store: SqliteStore) -> None:
    await store.add_suppressions(
        [entry(account="acme"), entry(account="acme", reason=R.MANUAL), entry()]
    )
    removed = await store.remove_suppressions(
        "jane@example.org",
        "acme",
        reason=R.MANUAL,
        removed_by="cli",
        why="entered by mistake",
        now=T0,
    )
    assert removed == [entry(account="acme", reason=R.MANUAL)]
    assert await store.list_suppressions() == [entry(), entry(account="acme")]
    [audit] = await store.suppression_removals()
    assert (audit.account, audit.reason) == ("acme", R.MANUAL)


async def test_removing_nothing_returns_nothing_and_audits_nothing(
    store: SqliteStore,
) -> None:
    await store.add_suppressions([entry(account="acme")])
    removed = await store.remove_suppressions(
        "jane@example.org", None, reason=None, removed_by="cli", why="x", now=T0
    )
    assert removed == []
    assert await store.suppression_removals() == []
    assert await store.count_suppressions() == 1


async def test_removals_listed_newest_first_with_limit(store: SqliteStore) -> None:
    addresses = [f"u{i}@example.org" for i in range(4)]
    await store.add_suppressions([entry(address) for address in addresses])
    for i, address in enumerate(addresses):
        await store.remove_suppressions(
            address,
            None,
            reason=R.UNSUBSCRIBE,
            removed_by="cli",
            why=f"case {i}",
            now=T0 + timedelta(minutes=i),
        )
    newest = await store.suppression_removals(limit=2)
    assert [r.why for r in newest] == ["case 3", "case 2"]
    only = await store.suppression_removals("u1@example.org")
    assert [r.why for r in only] == ["case 1"]


# -- listing -------------------------------------------------------------------


async def test_keyset_pagination_walks_every_entry_once_in_order(
    store: SqliteStore,
) -> None:
    stored = [
        entry(f"u{i % 7}@example.org", account, reason)
        for i, (account, reason) in enumerate(
            (account, reason)
            for account in (None, "acme", "globex")
            for reason in (R.UNSUBSCRIBE, R.MANUAL, R.HARD_BOUNCE)
        )
    ] + [entry(f"p{i}@example.org") for i in range(14)]
    await store.add_suppressions(stored)
    pages: list[list[Suppression]] = []
    after: tuple[str, str, str] | None = None
    while page := await store.list_suppressions(after=after, limit=4):
        pages.append(page)
        after = key(page[-1])
    walked = [item for page in pages for item in page]
    assert walked == sorted(stored, key=key)
    assert all(len(page) == 4 for page in pages[:-1])
    assert len(walked) == await store.count_suppressions()


async def test_listing_filters_by_account_and_reason(store: SqliteStore) -> None:
    await store.add_suppressions(
        [
            entry("a@example.org"),
            entry("b@example.org", "acme"),
            entry("c@example.org", "acme", R.MANUAL),
            entry("d@example.org", "globex"),
        ]
    )
    acme = await store.list_suppressions(account="acme")
    assert [item.address for item in acme] == ["b@example.org", "c@example.org"]
    manual = await store.list_suppressions(account="acme", reason=R.MANUAL)
    assert [item.address for item in manual] == ["c@example.org"]
    unsubscribed = await store.list_suppressions(reason=R.UNSUBSCRIBE)
    assert [item.address for item in unsubscribed] == [
        "a@example.org",
        "b@example.org",
        "d@example.org",
    ]
    page = await store.list_suppressions(account="acme", after=key(acme[0]))
    assert page == acme[1:]


async def test_export_then_import_round_trips(store: SqliteStore) -> None:
    stored = [
        entry("a@example.org", note='said "stop", twice\nby phone'),
        entry("b@example.org", "acme", R.SOFT_BOUNCE, expires_at=T0 + timedelta(7)),
        entry("c@example.org", "acme", R.ERASURE, source="gdpr request"),
    ]
    await store.add_suppressions(stored)
    out = io.StringIO(newline="")
    assert write_suppressions_csv(await store.list_suppressions(), out) == 3
    back = parse_suppressions_csv(
        io.StringIO(out.getvalue(), newline=""), source="import", now=T0
    )
    assert back == stored


# -- the lookup's plan ---------------------------------------------------------


async def test_lookup_searches_the_primary_key(store: SqliteStore) -> None:
    assert store._reader is not None
    async with store._reader.execute(
        f"EXPLAIN QUERY PLAN {LOOKUP_SUPPRESSIONS}", ("a@example.org", "acme", 0.0)
    ) as cursor:
        plan = " | ".join(row[3] for row in await cursor.fetchall())
    assert "SEARCH suppressions USING PRIMARY KEY (address=? AND scope=?)" in plan
    assert "SCAN" not in plan


# -- BLOCK events --------------------------------------------------------------


async def test_block_events_are_added_once_and_read_back(store: SqliteStore) -> None:
    block = Event(
        kind=EventKind.BLOCK,
        account="acme",
        recipient="jane@example.org",
        occurred_at=T0,
        source="exclusion",
        detail="unsubscribe",
        dedup_key="block:Q1:jane@example.org",
    )
    await store.add_events([block])
    await store.add_events([block])
    assert await store.events(kind=EventKind.BLOCK) == [block]
    assert await store.events(kind=EventKind.BOUNCE) == []
    assert await store.events(account="acme") == [block]


async def test_no_events_means_no_write(store: SqliteStore) -> None:
    before = store.commits
    await store.add_events([])
    assert store.commits == before


async def test_lookups_work_in_a_directory_with_uri_characters(tmp_path: Path) -> None:
    odd = SqliteStore(tmp_path / "we?ird #dir%20" / "relay.db")
    await odd.open()
    try:
        await odd.add_suppressions([entry("jane@example.org")])
        assert len(await odd.suppressions_for("jane@example.org", "acme", T0)) == 1
    finally:
        await odd.close()
