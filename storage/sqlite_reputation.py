"""The SQLite reputation tables, as a mixin of ``SqliteStore``.

It owns the SQL for ``counter_buckets``, ``account_states``,
``account_state_changes``, ``spamtraps`` and ``unattributed_feedback``
(migration 0004). Event rows count themselves into ``counter_buckets`` by trigger;
this mixin adds the counts that have no rows (``sent``) and reads them back.
Connections, the group-commit writer and error translation stay in
:mod:`storage.sqlite`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiosqlite

from storage.base import (
    AccountStanding,
    AccountState,
    AccountStateChange,
    CounterBucket,
    EventKind,
    KeptFeedback,
    SentMessage,
)

_ADD_COUNT = (
    "INSERT INTO counter_buckets (account, hour, kind, count) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (account, hour, kind) DO UPDATE SET count = count + excluded.count"
)
_UPSERT_STANDING = (
    "INSERT INTO account_states (account, state, reason, statistic, changed_at,"
    " changed_by, judged_from) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (account) DO UPDATE SET state = excluded.state,"
    " reason = excluded.reason, statistic = excluded.statistic,"
    " changed_at = excluded.changed_at, changed_by = excluded.changed_by,"
    " judged_from = excluded.judged_from"
)
_INSERT_CHANGE = (
    "INSERT INTO account_state_changes (account, old_state, new_state, reason,"
    " statistic, changed_at, changed_by) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
IS_SPAMTRAP = "SELECT 1 FROM spamtraps WHERE address = ?"
_SENT_SELECT = (
    "SELECT queue_id, account, message_id, recipients, received_at, kind"
    " FROM sent_messages"
)
MAX_KEPT_FEEDBACK = 10_000
"""Unattributed feedback kept at most (the newest)."""

_Statement = tuple[str, tuple[Any, ...]]
_Custom = Callable[[aiosqlite.Connection], Awaitable[Any]]


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _sent(row: Sequence[Any]) -> SentMessage:
    return SentMessage(
        queue_id=row[0],
        account=row[1],
        message_id=row[2],
        recipients=tuple(row[3].split("\n")) if row[3] else (),
        received_at=_dt(row[4]),
        kind=row[5],
    )


def count_row(bucket: CounterBucket) -> _Statement:
    """The statement that adds ``bucket`` to the stored count."""
    return (
        _ADD_COUNT,
        (bucket.account, bucket.hour, bucket.kind.value, bucket.count),
    )


class SqliteReputation:
    """``CounterStore``, ``AccountStateStore`` and ``SpamtrapStore`` on SQLite."""

    if TYPE_CHECKING:
        # Provided by SqliteStore.
        async def _submit(
            self, statements: list[_Statement], custom: _Custom | None = None
        ) -> Any: ...

        async def _fetch(
            self, sql: str, params: Iterable[Any] = ()
        ) -> list[sqlite3.Row]: ...

        def _lookup(self, sql: str, params: tuple[Any, ...]) -> list[Any]: ...

    # -- CounterStore ------------------------------------------------------------

    async def counter_buckets(self, since_hour: int) -> list[CounterBucket]:
        """Every bucket from ``since_hour`` on (an index search on the hour)."""
        rows = await self._fetch(
            "SELECT account, hour, kind, count FROM counter_buckets WHERE hour >= ?",
            (since_hour,),
        )
        known = {kind.value: kind for kind in EventKind}
        return [
            CounterBucket(row[0], row[1], known[row[2]], row[3])
            for row in rows
            if row[2] in known
        ]

    async def add_counts(self, buckets: Sequence[CounterBucket]) -> None:
        """Add to the stored counts, in one commit."""
        if buckets:
            await self._submit([count_row(bucket) for bucket in buckets])

    async def close_hour(self, account: str, hour: int) -> None:
        """Move ``account``'s counts of ``hour`` into the hour before, in one
        transaction: a reinstatement judges from ``hour`` on, and what was counted
        earlier in that hour belongs to the time before it."""

        async def run(db: aiosqlite.Connection) -> None:
            await db.execute(
                "INSERT INTO counter_buckets (account, hour, kind, count)"
                " SELECT account, hour - 1, kind, count FROM counter_buckets"
                " WHERE account = ? AND hour = ? AND true"
                " ON CONFLICT (account, hour, kind)"
                " DO UPDATE SET count = count + excluded.count",
                (account, hour),
            )
            await db.execute(
                "DELETE FROM counter_buckets WHERE account = ? AND hour = ?",
                (account, hour),
            )

        await self._submit([], run)

    async def prune_counters(self, before_hour: int) -> int:
        """Forget buckets older than ``before_hour``."""

        async def run(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "DELETE FROM counter_buckets WHERE hour < ?", (before_hour,)
            )
            return cur.rowcount

        removed: int = await self._submit([], run)
        return removed

    # -- AccountStateStore ---------------------------------------------------------

    async def account_standings(self) -> list[AccountStanding]:
        """Every stored state."""
        rows = await self._fetch(
            "SELECT account, state, reason, statistic, changed_at, changed_by,"
            " judged_from FROM account_states ORDER BY account"
        )
        return [
            AccountStanding(
                account=row[0],
                state=AccountState(row[1]),
                reason=row[2],
                statistic=row[3],
                changed_at=_dt(row[4]),
                changed_by=row[5],
                judged_from=_dt(row[6]) if row[6] is not None else None,
            )
            for row in rows
        ]

    async def change_account_state(
        self, standing: AccountStanding, old_state: AccountState
    ) -> None:
        """The new state and its audit record, in one transaction."""
        changed_at = _ts(standing.changed_at)
        await self._submit(
            [
                (
                    _UPSERT_STANDING,
                    (
                        standing.account,
                        standing.state.value,
                        standing.reason,
                        standing.statistic,
                        changed_at,
                        standing.changed_by,
                        _ts(standing.judged_from) if standing.judged_from else None,
                    ),
                ),
                (
                    _INSERT_CHANGE,
                    (
                        standing.account,
                        old_state.value,
                        standing.state.value,
                        standing.reason,
                        standing.statistic,
                        changed_at,
                        standing.changed_by,
                    ),
                ),
            ]
        )

    async def account_state_changes(
        self, account: str, limit: int = 20
    ) -> list[AccountStateChange]:
        """Newest first."""
        rows = await self._fetch(
            "SELECT account, old_state, new_state, reason, statistic, changed_at,"
            " changed_by FROM account_state_changes WHERE account = ?"
            " ORDER BY id DESC LIMIT ?",
            (account, limit),
        )
        return [
            AccountStateChange(
                account=row[0],
                old_state=AccountState(row[1]),
                new_state=AccountState(row[2]),
                reason=row[3],
                statistic=row[4],
                changed_at=_dt(row[5]),
                changed_by=row[6],
            )
            for row in rows
        ]

    # -- SpamtrapStore -------------------------------------------------------------

    async def add_spamtraps(
        self, addresses: Sequence[str], source: str, now: datetime
    ) -> int:
        """Add canonical addresses (all or none); returns how many were new."""
        rows = [(address, source, _ts(now)) for address in addresses]

        async def run(db: aiosqlite.Connection) -> int:
            before = db.total_changes
            await db.executemany(
                "INSERT OR IGNORE INTO spamtraps (address, source, added_at)"
                " VALUES (?, ?, ?)",
                rows,
            )
            return db.total_changes - before

        added: int = await self._submit([], run)
        return added

    async def is_spamtrap(self, address: str) -> bool:
        """One primary-key lookup, in place (RCPT time)."""
        return bool(self._lookup(IS_SPAMTRAP, (address,)))

    async def count_spamtraps(self) -> int:
        """How many traps are listed."""
        rows = await self._fetch("SELECT COUNT(*) FROM spamtraps")
        return int(rows[0][0])

    # -- unattributed feedback -----------------------------------------------------

    async def keep_unattributed(
        self,
        *,
        kind: str,
        reason: str,
        mail_from: str,
        recipient: str,
        content: bytes,
        now: datetime,
    ) -> int:
        """Keep feedback mail the relay could not read or attribute; beyond the
        newest MAX_KEPT_FEEDBACK, the oldest go (a flood cannot fill the disk)."""

        async def run(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "INSERT INTO unattributed_feedback (received_at, kind, reason,"
                " mail_from, recipient, content) VALUES (?, ?, ?, ?, ?, ?)",
                (_ts(now), kind, reason, mail_from[:320], recipient[:320], content),
            )
            new_id = int(cur.lastrowid or 0)
            await db.execute(
                "DELETE FROM unattributed_feedback WHERE id <= ?",
                (new_id - MAX_KEPT_FEEDBACK,),
            )
            return new_id

        kept: int = await self._submit([], run)
        return kept

    async def unattributed(self, limit: int = 100) -> list[KeptFeedback]:
        """Kept feedback, newest first."""
        rows = await self._fetch(
            "SELECT id, received_at, kind, reason, mail_from, recipient,"
            " length(content) FROM unattributed_feedback ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [
            KeptFeedback(
                id=int(row[0]),
                received_at=_dt(row[1]),
                kind=row[2],
                reason=row[3],
                mail_from=row[4],
                recipient=row[5],
                size_bytes=int(row[6]),
            )
            for row in rows
        ]

    async def unattributed_content(self, feedback_id: int) -> bytes | None:
        """The mail as received, or ``None``."""
        rows = await self._fetch(
            "SELECT content FROM unattributed_feedback WHERE id = ?", (feedback_id,)
        )
        return bytes(rows[0][0]) if rows else None

    async def unattributed_count(self) -> int:
        """How many pieces of feedback are kept for inspection."""
        rows = await self._fetch("SELECT COUNT(*) FROM unattributed_feedback")
        return int(rows[0][0])

    # -- tracking ------------------------------------------------------------------

    async def sent_message(self, queue_id: str) -> SentMessage | None:
        """One primary-key lookup."""
        rows = await self._fetch(_SENT_SELECT + " WHERE queue_id = ?", (queue_id,))
        return _sent(rows[0]) if rows else None

    async def sent_messages_with_id(self, message_id: str) -> list[SentMessage]:
        """By the partial index on message_id (a handful of rows at most)."""
        rows = await self._fetch(
            _SENT_SELECT + " WHERE message_id = ? ORDER BY queue_id LIMIT 100",
            (message_id,),
        )
        return [_sent(row) for row in rows]

    async def prune_sent_messages(self, before: datetime) -> int:
        """Forget tracking rows received before ``before``."""

        async def run(db: aiosqlite.Connection) -> int:
            cur = await db.execute(
                "DELETE FROM sent_messages WHERE received_at < ?", (_ts(before),)
            )
            return int(cur.rowcount)

        pruned: int = await self._submit([], run)
        return pruned
