"""Tests for the SQLite tracking rows (migration 0005) and the unattributed
feedback kept for inspection: what ``enqueue`` writes to ``sent_messages``, how
it is read back and pruned, and the cap on kept feedback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import storage.sqlite_reputation
from storage import (
    AttemptRecord,
    NewMessage,
    RecipientResult,
    RecipientState,
    SqliteStore,
)
from storage.base import SentMessage

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
CONTENT = b"From: news@acme.example\r\nSubject: hi\r\n\r\nHello\r\n"
MESSAGE_ID = "<m1@acme.example>"
RCPTS = ("jane@example.org", "bob@example.net", "amy@example.org")


def new_message(
    queue_id: str,
    recipients: tuple[str, ...] = RCPTS,
    *,
    account: str | None = "acme",
    tracked: bool = True,
    message_id: str | None = MESSAGE_ID,
    received_at: datetime = T0,
) -> NewMessage:
    return NewMessage(
        queue_id=queue_id,
        account=account,
        mail_from="news@acme.example",
        recipients=recipients,
        content=CONTENT,
        received_at=received_at,
        expires_at=received_at + timedelta(days=5),
        tracked=tracked,
        message_id=message_id,
    )


async def keep(store: SqliteStore, n: int, *, at: datetime = T0) -> int:
    return await store.keep_unattributed(
        kind="bounce",
        reason=f"reason {n}",
        mail_from=f"mailer-daemon{n}@example.org",
        recipient="bounce+x@bounces.relay.example",
        content=b"x" * n,
        now=at,
    )


# -- sent_messages ---------------------------------------------------------------------


async def test_tracked_message_writes_a_sent_row(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1"))
    expected = SentMessage(
        queue_id="Q1",
        account="acme",
        message_id=MESSAGE_ID,
        recipients=RCPTS,
        received_at=T0,
    )
    assert await store.sent_message("Q1") == expected
    assert await store.sent_messages_with_id(MESSAGE_ID) == [expected]


async def test_recipients_keep_their_order(store: SqliteStore) -> None:
    order = tuple(f"user{n}@example.org" for n in (5, 1, 9, 3, 7))
    await store.enqueue(new_message("Q1", order))
    found = await store.sent_message("Q1")
    assert found is not None
    assert found.recipients == order


async def test_a_tracked_message_without_message_id(store: SqliteStore) -> None:
    await store.enqueue(new_message("Q1", message_id=None))
    found = await store.sent_message("Q1")
    assert found is not None
    assert found.message_id is None
    assert found.recipients == RCPTS


async def test_all_copies_with_one_message_id_are_found(store: SqliteStore) -> None:
    await store.enqueue(
        new_message("Q1", (RCPTS[0],)),
        new_message("Q1.2", (RCPTS[1],)),
        new_message("Q1.3", (RCPTS[2],)),
        new_message("Q2", message_id="<other@acme.example>"),
    )
    found = await store.sent_messages_with_id(MESSAGE_ID)
    assert [(s.queue_id, s.recipients) for s in found] == [
        ("Q1", (RCPTS[0],)),
        ("Q1.2", (RCPTS[1],)),
        ("Q1.3", (RCPTS[2],)),
    ]
    assert await store.sent_messages_with_id("<nobody@acme.example>") == []


@pytest.mark.parametrize(
    ("account", "tracked"), [("acme", False), (None, True), (None, False)]
)
async def test_untracked_or_generated_message_writes_no_sent_row(
    store: SqliteStore, account: str | None, tracked: bool
) -> None:
    await store.enqueue(new_message("Q1", account=account, tracked=tracked))
    assert await store.get_message("Q1") is not None
    assert await store.sent_message("Q1") is None
    assert await store.sent_messages_with_id(MESSAGE_ID) == []


async def test_unknown_queue_id_has_no_sent_row(store: SqliteStore) -> None:
    assert await store.sent_message("nope") is None


async def test_sent_row_outlives_the_message_in_the_queue(
    store: SqliteStore,
) -> None:
    await store.enqueue(new_message("Q1"))
    await store.record_attempt(
        AttemptRecord(
            queue_id="Q1",
            results=tuple(
                RecipientResult(rcpt, RecipientState.DELIVERED, 250, "2.0.0")
                for rcpt in RCPTS
            ),
            attempted_at=T0 + timedelta(seconds=5),
            next_attempt_at=None,
            sent=len(RCPTS),
            account="acme",
        )
    )
    assert await store.get_message("Q1") is None
    found = await store.sent_message("Q1")
    assert found is not None
    assert found.recipients == RCPTS
    assert [s.queue_id for s in await store.sent_messages_with_id(MESSAGE_ID)] == ["Q1"]


async def test_sent_row_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    first = SqliteStore(path)
    await first.open()
    await first.enqueue(new_message("Q1"))
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        found = await second.sent_message("Q1")
        assert found is not None
        assert found.recipients == RCPTS
    finally:
        await second.close()


async def test_prune_removes_only_older_rows(store: SqliteStore) -> None:
    await store.enqueue(
        new_message("OLD1", received_at=T0 - timedelta(days=40)),
        new_message("OLD2", received_at=T0 - timedelta(days=31)),
        new_message("EDGE", received_at=T0 - timedelta(days=30)),
        new_message("NEW", received_at=T0),
    )
    assert await store.prune_sent_messages(T0 - timedelta(days=30)) == 2
    assert await store.sent_message("OLD1") is None
    assert await store.sent_message("OLD2") is None
    assert await store.sent_message("EDGE") is not None
    assert await store.sent_message("NEW") is not None
    assert [s.queue_id for s in await store.sent_messages_with_id(MESSAGE_ID)] == [
        "EDGE",
        "NEW",
    ]
    assert await store.prune_sent_messages(T0 - timedelta(days=30)) == 0
    # The queue itself is left alone.
    assert await store.get_message("OLD1") is not None


# -- unattributed feedback -------------------------------------------------------------


async def test_kept_feedback_ids_increase(store: SqliteStore) -> None:
    ids = [await keep(store, n) for n in range(1, 6)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


async def test_unattributed_lists_newest_first_with_size(store: SqliteStore) -> None:
    first = await keep(store, 3, at=T0)
    second = await keep(store, 7, at=T0 + timedelta(minutes=1))
    third = await keep(store, 0, at=T0 + timedelta(minutes=2))
    kept = await store.unattributed()
    assert [k.id for k in kept] == [third, second, first]
    assert [k.size_bytes for k in kept] == [0, 7, 3]
    assert kept[1].received_at == T0 + timedelta(minutes=1)
    assert kept[1].kind == "bounce"
    assert kept[1].reason == "reason 7"
    assert kept[1].mail_from == "mailer-daemon7@example.org"
    assert kept[1].recipient == "bounce+x@bounces.relay.example"
    assert [k.id for k in await store.unattributed(limit=2)] == [third, second]


async def test_unattributed_content_is_the_mail_as_received(
    store: SqliteStore,
) -> None:
    mail = b"Return-Path: <>\r\nSubject: \xff\x00 binary\r\n\r\nbody\r\n"
    kept_id = await store.keep_unattributed(
        kind="arf",
        reason="unparseable report",
        mail_from="",
        recipient="abuse@relay.example",
        content=mail,
        now=T0,
    )
    assert await store.unattributed_content(kept_id) == mail
    assert await store.unattributed_content(kept_id + 1) is None
    assert await store.unattributed_content(-1) is None


async def test_long_envelope_addresses_are_cut_to_320(store: SqliteStore) -> None:
    await store.keep_unattributed(
        kind="bounce",
        reason="r",
        mail_from="m" * 1000,
        recipient="r" * 1000,
        content=b"",
        now=T0,
    )
    (kept,) = await store.unattributed()
    assert kept.mail_from == "m" * 320
    assert kept.recipient == "r" * 320


async def test_only_the_newest_feedback_is_kept(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.sqlite_reputation, "MAX_KEPT_FEEDBACK", 3)
    ids = [await keep(store, n) for n in range(1, 8)]
    assert await store.unattributed_count() == 3
    assert [k.id for k in await store.unattributed()] == ids[:-4:-1]
    for dropped in ids[:4]:
        assert await store.unattributed_content(dropped) is None
    assert await store.unattributed_content(ids[-1]) == b"x" * 7
    newer = await keep(store, 8)
    assert newer > ids[-1]
    assert [k.id for k in await store.unattributed()] == [newer, ids[-1], ids[-2]]


async def test_unattributed_count(store: SqliteStore) -> None:
    assert await store.unattributed_count() == 0
    assert await store.unattributed() == []
    for n in range(4):
        await keep(store, n)
    assert await store.unattributed_count() == 4
