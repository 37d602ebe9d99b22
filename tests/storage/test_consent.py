"""Tests for the SQLite consent ledger: round trip, upsert, ordering, all or none."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from storage import (
    ConsentRecord,
    ConsentSource,
    OptInType,
    SqliteStore,
    parse_consents,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def record(
    account: str = "acme",
    address: str = "jane@example.org",
    *,
    opt_in: OptInType = OptInType.DOUBLE,
    recorded_at: datetime | None = None,
    **changes: object,
) -> ConsentRecord:
    base = ConsentRecord(
        account=account,
        address=address,
        collected_at=T0,
        source=ConsentSource.NEWSLETTER,
        opt_in=opt_in,
        collection_url="https://acme.example/signup",
        ip="192.0.2.7",
        confirmed_at=T0 + timedelta(minutes=5),
        statement="Send me the weekly newsletter.",
        relationship="",
        recorded_at=recorded_at,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_record_round_trips_with_recorded_at_set(store: SqliteStore) -> None:
    before = datetime.now(UTC)
    assert await store.add_consents([record()]) == 1
    after = datetime.now(UTC)
    found = await store.consent_for("acme", "jane@example.org")
    assert found is not None
    assert found.recorded_at is not None
    assert before - timedelta(milliseconds=1) <= found.recorded_at <= after
    assert found == record(recorded_at=found.recorded_at)


async def test_given_recorded_at_is_kept(store: SqliteStore) -> None:
    stored = record(recorded_at=T0 + timedelta(days=1))
    await store.add_consents([stored])
    assert await store.consent_for("acme", "jane@example.org") == stored


async def test_optional_fields_may_be_empty(store: SqliteStore) -> None:
    bare = ConsentRecord(
        account="acme",
        address="jane@example.org",
        collected_at=T0,
        source=ConsentSource.PURCHASE,
        opt_in=OptInType.SINGLE,
        relationship="customer since 2021",
        recorded_at=T0,
    )
    await store.add_consents([bare])
    assert await store.consent_for("acme", "jane@example.org") == bare


async def test_record_is_per_account(store: SqliteStore) -> None:
    await store.add_consents([record("acme", recorded_at=T0)])
    assert await store.consent_for("globex", "jane@example.org") is None
    assert await store.consent_for("acme", "bob@example.org") is None


async def test_same_account_and_address_is_replaced(store: SqliteStore) -> None:
    await store.add_consents([record(recorded_at=T0)])
    newer = record(
        opt_in=OptInType.SINGLE,
        confirmed_at=None,
        source=ConsentSource.EVENT,
        statement="Trade fair badge scan.",
        recorded_at=T0 + timedelta(days=1),
    )
    await store.add_consents([newer])
    assert await store.consents_of("jane@example.org") == [newer]


async def test_consents_of_lists_every_account_by_name(store: SqliteStore) -> None:
    records = [record(name, recorded_at=T0) for name in ("globex", "acme", "initech")]
    await store.add_consents([*records, record("acme", "bob@example.org")])
    found = await store.consents_of("jane@example.org")
    assert [item.account for item in found] == ["acme", "globex", "initech"]
    assert await store.consents_of("nobody@example.org") == []


async def test_invalid_record_rejects_the_whole_batch(store: SqliteStore) -> None:
    await store.add_consents([record("kept", recorded_at=T0)])
    naive = record("bad", collected_at=datetime(2026, 3, 1))  # noqa: DTZ001
    batch = [record(f"a{i}") for i in range(3)] + [naive]
    with pytest.raises(ValueError, match="aware"):
        await store.add_consents(batch)
    assert [item.account for item in await store.consents_of("jane@example.org")] == [
        "kept"
    ]


async def test_large_batch_is_checked_off_the_loop_all_or_nothing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("storage.sqlite_lists._THREAD_ROWS", 2)
    good = [record(f"a{i}", recorded_at=T0) for i in range(5)]
    naive = record("bad", confirmed_at=datetime(2026, 3, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="confirmed_at"):
        await store.add_consents([*good, naive])
    assert await store.consents_of("jane@example.org") == []
    assert await store.add_consents(good) == 5
    assert await store.consents_of("jane@example.org") == good


async def test_empty_batch_writes_nothing(store: SqliteStore) -> None:
    before = store.commits
    assert await store.add_consents([]) == 0
    assert store.commits == before


async def test_imported_jsonl_is_stored_and_found_by_canonical_address(
    store: SqliteStore,
) -> None:
    lines = [
        '{"account": "acme", "address": "Jane@EXAMPLE.org", "collected_at":'
        ' "2026-03-01T12:00:00", "source": "newsletter", "opt_in": "confirmed",'
        ' "confirmed_at": "2026-03-01T13:00:00+01:00"}\n'
    ]
    await store.add_consents(parse_consents(lines, fmt="jsonl"))
    found = await store.consent_for("acme", "Jane@example.org")
    assert found is not None
    assert found.collected_at == T0
    assert found.confirmed_at == T0


async def test_consents_of_searches_the_primary_key(store: SqliteStore) -> None:
    assert store._reader is not None
    async with store._reader.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM consents WHERE address = ? ORDER BY account",
        ("a@example.org",),
    ) as cursor:
        plan = " | ".join(row[3] for row in await cursor.fetchall())
    assert "USING PRIMARY KEY (address=?)" in plan
    assert "SCAN" not in plan
    assert "TEMP B-TREE" not in plan
