"""Tests for storage.sqlite: durability, group commit, attempts, events, full disk."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage import (
    AttemptRecord,
    BounceType,
    Event,
    EventKind,
    NewMessage,
    QueueStats,
    RecipientResult,
    RecipientState,
    SqliteStore,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
LIFETIME = timedelta(days=5)
CONTENT = b"From: news@acme.example\r\nSubject: hi\r\n\r\nHello\r\n"


def new_message(
    queue_id: str,
    recipients: tuple[str, ...] = ("jane@example.org",),
    *,
    received_at: datetime = T0,
    content: bytes = CONTENT,
    account: str | None = "acme",
) -> NewMessage:
    return NewMessage(
        queue_id=queue_id,
        account=account,
        mail_from="news@acme.example",
        recipients=recipients,
        content=content,
        received_at=received_at,
        expires_at=received_at + LIFETIME,
        smtputf8=False,
    )


def bounce(recipient: str, dedup_key: str | None, queue_id: str = "Q1") -> Event:
    return Event(
        kind=EventKind.BOUNCE,
        account="acme",
        recipient=recipient,
        occurred_at=T0,
        source="upstream",
        queue_id=queue_id,
        smtp_code=550,
        status="5.1.1",
        detail="no such user",
        bounce_type=BounceType.HARD,
        dedup_key=dedup_key,
    )


async def pragma(store: SqliteStore, name: str) -> object:
    assert store._writer is not None
    async with store._writer.execute(f"PRAGMA {name}") as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return row[0]


# -- opening and durability ----------------------------------------------------


async def test_open_creates_wal_database_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "relay.db"
    store = SqliteStore(path)
    await store.open()
    try:
        assert path.exists()
        assert store.path == path
        assert await pragma(store, "journal_mode") == "wal"
        assert await pragma(store, "synchronous") == 2
    finally:
        await store.close()


async def test_enqueued_message_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    first = SqliteStore(path)
    await first.open()
    await first.enqueue(new_message("Q1", ("jane@example.org", "bob@example.net")))
    await first.close()

    second = SqliteStore(path)
    await second.open()
    try:
        messages = await second.list_messages()
        assert [m.queue_id for m in messages] == ["Q1"]
        queued = messages[0]
        assert set(queued.recipients) == {"jane@example.org", "bob@example.net"}
        assert queued.account == "acme"
        assert queued.mail_from == "news@acme.example"
        assert queued.received_at == T0
        assert queued.expires_at == T0 + LIFETIME
        assert queued.next_attempt_at == T0
        assert queued.attempts == 0
        assert queued.size_bytes == len(CONTENT)
        assert queued.last_error is None
        assert await second.content("Q1") == CONTENT
        assert await second.get_message("Q1") == queued
    finally:
        await second.close()


async def test_reopen_does_not_rerun_migrations(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    for _ in range(3):
        store = SqliteStore(path)
        await store.open()
        await store.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert store._reader is not None
        async with store._reader.execute("SELECT version FROM schema_version") as cur:
            versions = [row[0] for row in await cur.fetchall()]
        assert versions == sorted(set(versions))
    finally:
        await store.close()


async def test_concurrent_enqueues_share_commits(store: SqliteStore) -> None:
    before = store.commits
    await asyncio.gather(*(store.enqueue(new_message(f"G{i:03}")) for i in range(200)))
    commits = store.commits - before
    assert 1 <= commits < 50
    assert len(await store.list_messages(limit=500)) == 200
    assert (await store.stats()).messages == 200


async def test_unknown_message_reads(store: SqliteStore) -> None:
    assert await store.content("nope") is None
    assert await store.get_message("nope") is None
    assert await store.list_messages() == []


# -- attempts ------------------------------------------------------------------


async def test_all_delivered_removes_message(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(
                RecipientResult(
                    "a@example.org", RecipientState.DELIVERED, 250, "2.0.0"
                ),
                RecipientResult(
                    "b@example.org", RecipientState.DELIVERED, 250, "2.0.0"
                ),
            ),
            attempted_at=T0 + timedelta(seconds=1),
            next_attempt_at=None,
        )
    )
    assert await store.list_messages() == []
    assert await store.get_message("Q1") is None
    assert await store.content("Q1") is None
    assert await store.stats() == QueueStats(0, 0, None)


async def test_delivered_and_bounced_removes_message(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(
                RecipientResult("a@example.org", RecipientState.DELIVERED, 250),
                RecipientResult("b@example.org", RecipientState.BOUNCED, 550, "5.1.1"),
            ),
            attempted_at=T0,
            next_attempt_at=None,
            events=(bounce("b@example.org", "Q1:b"),),
        )
    )
    assert await store.list_messages() == []
    assert len(await store.events()) == 1


async def test_partial_attempt_keeps_pending_recipient(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    retry_at = T0 + timedelta(minutes=5)
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(
                RecipientResult(
                    "a@example.org", RecipientState.DELIVERED, 250, "2.0.0"
                ),
                RecipientResult(
                    "b@example.org", RecipientState.PENDING, 451, "4.3.0", "try later"
                ),
            ),
            attempted_at=T0 + timedelta(seconds=1),
            next_attempt_at=retry_at,
            last_error="451 4.3.0 try later",
        )
    )
    queued = await store.get_message("Q1")
    assert queued is not None
    assert queued.recipients == ("b@example.org",)
    assert queued.attempts == 1
    assert queued.next_attempt_at == retry_at
    assert queued.last_error == "451 4.3.0 try later"
    assert await store.content("Q1") == CONTENT
    stats = await store.stats()
    assert (stats.messages, stats.recipients) == (1, 1)

    # A second failed attempt counts again.
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(RecipientResult("b@example.org", RecipientState.PENDING),),
            attempted_at=retry_at,
            next_attempt_at=retry_at + timedelta(minutes=15),
        )
    )
    queued = await store.get_message("Q1")
    assert queued is not None
    assert queued.attempts == 2
    assert queued.recipients == ("b@example.org",)


async def test_due_returns_only_due_messages_in_order(store: SqliteStore) -> None:
    await store.enqueue(new_message("LATE", received_at=T0 + timedelta(minutes=10)))
    await store.enqueue(new_message("SECOND", received_at=T0 + timedelta(seconds=2)))
    await store.enqueue(new_message("FIRST", received_at=T0))
    await store.enqueue(new_message("DEFERRED", received_at=T0 - timedelta(minutes=1)))
    await store.record_attempt(
        AttemptRecord(
            queue_id="DEFERRED",
            results=(RecipientResult("jane@example.org", RecipientState.PENDING),),
            attempted_at=T0 - timedelta(minutes=1),
            next_attempt_at=T0 + timedelta(hours=1),
        )
    )
    now = T0 + timedelta(minutes=5)
    due = await store.due(now, limit=10)
    assert [m.queue_id for m in due] == ["FIRST", "SECOND"]
    assert all(m.next_attempt_at <= now for m in due)
    assert [m.queue_id for m in await store.due(now, limit=1)] == ["FIRST"]
    later = await store.due(T0 + timedelta(hours=2), limit=10)
    assert [m.queue_id for m in later] == ["FIRST", "SECOND", "LATE", "DEFERRED"]


async def test_events_stored_and_deduplicated(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    event = bounce("a@example.org", "Q1:a:550")
    for _ in range(2):
        await store.record_attempt(
            AttemptRecord(
                queue_id="Q1",
                results=(),
                attempted_at=T0,
                next_attempt_at=T0 + timedelta(minutes=1),
                events=(event,),
            )
        )
    # Same key twice in one record too.
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(),
            attempted_at=T0,
            next_attempt_at=T0 + timedelta(minutes=1),
            events=(bounce("b@example.org", "Q1:b"), bounce("b@example.org", "Q1:b")),
        )
    )
    events = await store.events()
    assert len(events) == 2
    assert events[0].recipient == "b@example.org"  # newest first
    assert events[1] == event


async def test_events_without_dedup_key_all_kept(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1"))
    sent = Event(
        kind=EventKind.SENT,
        account="other",
        recipient="jane@example.org",
        occurred_at=T0,
        source="delivery",
    )
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(),
            attempted_at=T0,
            next_attempt_at=T0,
            events=(sent, sent, bounce("jane@example.org", None)),
        )
    )
    assert len(await store.events()) == 3
    assert len(await store.events(kind=EventKind.SENT)) == 2
    assert len(await store.events(account="acme")) == 1
    assert await store.events(kind=EventKind.SENT, account="acme") == []
    assert len(await store.events(limit=1)) == 1


async def test_followups_enqueued_with_attempt(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1"))
    dsn = new_message(
        "DSN1", ("news@acme.example",), account=None, content=b"DSN\r\n\r\nbody\r\n"
    )
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(
                RecipientResult(
                    "jane@example.org", RecipientState.BOUNCED, 550, "5.1.1"
                ),
            ),
            attempted_at=T0,
            next_attempt_at=None,
            events=(bounce("jane@example.org", "Q1:jane"),),
            followups=(dsn,),
        )
    )
    messages = await store.list_messages()
    assert [m.queue_id for m in messages] == ["DSN1"]
    assert messages[0].account is None
    assert messages[0].recipients == ("news@acme.example",)
    assert await store.content("DSN1") == dsn.content
    assert len(await store.events()) == 1


async def test_failed_followup_rolls_back_whole_attempt(store: SqliteStore) -> None:
    """Results, events and follow-ups share one transaction: all or nothing."""
    await store.enqueue(new_message("Q1"))
    await store.enqueue(new_message("TAKEN"))
    with pytest.raises(StorageUnavailableError):
        await store.record_attempt(
            AttemptRecord(
                queue_id="Q1",
                results=(
                    RecipientResult("jane@example.org", RecipientState.DELIVERED),
                ),
                attempted_at=T0,
                next_attempt_at=None,
                events=(bounce("x@example.org", "k1"),),
                followups=(new_message("TAKEN"),),  # queue id already used
            )
        )
    queued = await store.get_message("Q1")
    assert queued is not None
    assert queued.recipients == ("jane@example.org",)
    assert queued.attempts == 0
    assert await store.events() == []
    # The store still works after the failed transaction.
    await store.enqueue(new_message("Q2"))
    assert await store.get_message("Q2") is not None


# -- admin operations ----------------------------------------------------------


async def test_retry_now(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1"))
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=(RecipientResult("jane@example.org", RecipientState.PENDING),),
            attempted_at=T0,
            next_attempt_at=T0 + timedelta(hours=1),
        )
    )
    now = T0 + timedelta(minutes=1)
    assert await store.due(now, 10) == []
    assert await store.retry_now("Q1", now) is True
    assert [m.queue_id for m in await store.due(now, 10)] == ["Q1"]
    assert await store.retry_now("nope", now) is False


async def test_delete(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    await store.enqueue(new_message("Q2"))
    assert await store.delete("Q1") is True
    assert await store.get_message("Q1") is None
    assert await store.content("Q1") is None
    assert await store.delete("Q1") is False
    assert await store.delete("nope") is False
    stats = await store.stats()
    assert (stats.messages, stats.recipients) == (1, 1)


async def test_stats(store: SqliteStore) -> None:
    assert await store.stats() == QueueStats(0, 0, None)
    await store.enqueue(new_message("Q1", ("a@example.org", "b@example.org")))
    await store.enqueue(
        new_message("Q0", ("c@example.org",), received_at=T0 - timedelta(hours=1))
    )
    assert await store.stats() == QueueStats(
        messages=2, recipients=3, oldest_received_at=T0 - timedelta(hours=1)
    )


# -- full disk and closed store ------------------------------------------------


async def cap_database(store: SqliteStore) -> None:
    assert store._writer is not None
    pages = await pragma(store, "page_count")
    await store._writer.execute(f"PRAGMA max_page_count = {pages}")


async def uncap_database(store: SqliteStore) -> None:
    assert store._writer is not None
    await store._writer.execute("PRAGMA max_page_count = 1073741823")


async def test_database_full_raises_storage_full(store: SqliteStore) -> None:
    await store.enqueue(new_message("SMALL"))
    await cap_database(store)
    with pytest.raises(StorageFullError):
        await store.enqueue(new_message("BIG", content=b"x" * 65536))


async def test_store_works_after_database_full(store: SqliteStore) -> None:
    await store.enqueue(new_message("SMALL"))
    await cap_database(store)
    with pytest.raises(StorageError):
        await store.enqueue(new_message("BIG", content=b"x" * 65536))
    assert await store.get_message("BIG") is None
    await uncap_database(store)
    await store.enqueue(new_message("BIG", content=b"x" * 65536))
    assert await store.content("BIG") == b"x" * 65536
    assert {m.queue_id for m in await store.list_messages()} == {"SMALL", "BIG"}


async def test_low_free_space_refuses_enqueue(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relay.db", min_free_space_bytes=2**62)
    await store.open()
    try:
        assert await store.free_space_ok() is False
        with pytest.raises(StorageFullError):
            await store.enqueue(new_message("Q1"))
        assert await store.list_messages() == []
    finally:
        await store.close()


async def test_free_space_ok_with_small_minimum(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relay.db", min_free_space_bytes=1)
    await store.open()
    try:
        assert await store.free_space_ok() is True
    finally:
        await store.close()


async def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relay.db")
    await store.open()
    await store.enqueue(new_message("Q1"))
    await store.close()
    record = AttemptRecord("Q1", (), T0, None)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.enqueue(new_message("Q2")),
        lambda: store.record_attempt(record),
        lambda: store.due(T0, 10),
        lambda: store.content("Q1"),
        store.list_messages,
        lambda: store.get_message("Q1"),
        lambda: store.retry_now("Q1", T0),
        lambda: store.delete("Q1"),
        store.stats,
        store.events,
    ]
    for call in calls:
        with pytest.raises(StorageUnavailableError):
            await call()


async def test_never_opened_store_is_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "relay.db")
    with pytest.raises(StorageUnavailableError):
        await store.enqueue(new_message("Q1"))
    with pytest.raises(StorageUnavailableError):
        await store.list_messages()
    await store.close()  # closing a store that never opened is harmless


async def test_open_failure_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SqliteStore(blocker / "relay.db")
    with pytest.raises(StorageUnavailableError):
        await store.open()
