"""The SQLite exclusion list and consent ledger, as a mixin of ``SqliteStore``.

It owns the SQL for the ``suppressions``, ``suppression_removals`` and
``consents`` tables (migration 0003). Connections, the group-commit writer and
error translation stay in :mod:`storage.sqlite`; this mixin reaches them only
through ``_submit``, ``_fetch`` and ``_lookup`` (the RCPT-time point lookups).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiosqlite

from storage.base import (
    NEVER_EXPIRES,
    ConsentRecord,
    ConsentSource,
    OptInType,
    Suppression,
    SuppressionReason,
    SuppressionRemoval,
)

_CHUNK_ROWS = 50_000
"""Rows per ``executemany`` call of a bulk write (still one transaction)."""
_THREAD_ROWS = 10_000
"""Larger batches are checked and sorted in a worker thread, off the event loop."""

_SUPPRESSION_COLUMNS = "address, scope, reason, source, created_at, note, expires_at"
_UPSERT_SUPPRESSION = (
    f"INSERT INTO suppressions ({_SUPPRESSION_COLUMNS})"  # noqa: S608 (fixed text)
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (address, scope, reason) DO UPDATE SET source = excluded.source,"
    " created_at = excluded.created_at, note = excluded.note,"
    " expires_at = excluded.expires_at"
)
LOOKUP_SUPPRESSIONS = (
    f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions"  # noqa: S608 (fixed text)
    " WHERE address = ? AND scope IN ('', ?)"
    " AND (expires_at IS NULL OR expires_at > ?) ORDER BY scope, reason"
)
"""The RCPT-time lookup: one search of the primary key (tests check the plan)."""
_INSERT_REMOVAL = (
    "INSERT INTO suppression_removals"
    " (address, scope, reason, removed_by, removed_at, why) VALUES (?, ?, ?, ?, ?, ?)"
)
_CONSENT_COLUMNS = (
    "account, address, collected_at, source, opt_in, collection_url, ip,"
    " confirmed_at, statement, relationship, recorded_at"
)
_UPSERT_CONSENT = (
    f"INSERT INTO consents ({_CONSENT_COLUMNS})"  # noqa: S608 (fixed text)
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (address, account) DO UPDATE SET"
    " collected_at = excluded.collected_at, source = excluded.source,"
    " opt_in = excluded.opt_in, collection_url = excluded.collection_url,"
    " ip = excluded.ip, confirmed_at = excluded.confirmed_at,"
    " statement = excluded.statement, relationship = excluded.relationship,"
    " recorded_at = excluded.recorded_at"
)

# The same shapes as in storage.sqlite, which imports this module.
_Statement = tuple[str, tuple[Any, ...]]
_Custom = Callable[[aiosqlite.Connection], Awaitable[Any]]


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _scope(account: str | None) -> str:
    return account or ""


def _aware(name: str, moment: datetime | None) -> None:
    # A naive datetime would be read as local time by ``timestamp()``.
    if moment is not None and moment.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {moment!r}")


def _suppression_params(entry: Suppression) -> tuple[Any, ...]:
    """Check one entry (ValueError) and return its row."""
    if not entry.address:
        raise ValueError("suppression without an address")
    if entry.account == "":
        raise ValueError("account must be a name, or None for every account")
    reason = SuppressionReason(entry.reason)
    if reason in NEVER_EXPIRES and entry.expires_at is not None:
        raise ValueError(f"{reason.value} entries never expire: {entry.address}")
    _aware("created_at", entry.created_at)
    _aware("expires_at", entry.expires_at)
    return (
        entry.address,
        _scope(entry.account),
        reason.value,
        entry.source,
        _ts(entry.created_at),
        entry.note,
        _ts(entry.expires_at) if entry.expires_at is not None else None,
    )


def _suppression_rows(entries: Sequence[Suppression]) -> list[tuple[Any, ...]]:
    rows = [_suppression_params(entry) for entry in entries]
    # Key order makes the B-tree inserts sequential: far fewer page splits and
    # cache misses on a large import.
    rows.sort(key=lambda row: row[:3])
    return rows


def _suppression(row: sqlite3.Row) -> Suppression:
    return Suppression(
        address=row[0],
        account=row[1] or None,
        reason=SuppressionReason(row[2]),
        source=row[3],
        created_at=_dt(row[4]),
        note=row[5],
        expires_at=_dt(row[6]) if row[6] is not None else None,
    )


def _consent_params(record: ConsentRecord, now: datetime) -> tuple[Any, ...]:
    """Check one record (ValueError) and return its row."""
    if not record.account or not record.address:
        raise ValueError("consent record needs an account and an address")
    for name in ("collected_at", "confirmed_at", "recorded_at"):
        _aware(name, getattr(record, name))
    recorded = record.recorded_at or now
    return (
        record.account,
        record.address,
        _ts(record.collected_at),
        ConsentSource(record.source).value,
        OptInType(record.opt_in).value,
        record.collection_url,
        record.ip,
        _ts(record.confirmed_at) if record.confirmed_at is not None else None,
        record.statement,
        record.relationship,
        _ts(recorded),
    )


def _consent_rows(records: Sequence[ConsentRecord]) -> list[tuple[Any, ...]]:
    now = datetime.now(UTC)
    rows = [_consent_params(record, now) for record in records]
    rows.sort(key=lambda row: (row[1], row[0]))
    return rows


def _consent(row: sqlite3.Row) -> ConsentRecord:
    return ConsentRecord(
        account=row[0],
        address=row[1],
        collected_at=_dt(row[2]),
        source=ConsentSource(row[3]),
        opt_in=OptInType(row[4]),
        collection_url=row[5],
        ip=row[6],
        confirmed_at=_dt(row[7]) if row[7] is not None else None,
        statement=row[8],
        relationship=row[9],
        recorded_at=_dt(row[10]),
    )


async def _executemany_chunked(
    db: aiosqlite.Connection, sql: str, rows: list[tuple[Any, ...]]
) -> None:
    for start in range(0, len(rows), _CHUNK_ROWS):
        await db.executemany(sql, rows[start : start + _CHUNK_ROWS])


class SqliteLists:
    """``SuppressionStore`` and ``ConsentStore`` on SQLite (mixed into SqliteStore).

    Bulk writes are checked in full before anything is written, then applied as
    one custom write of the group-commit writer: one transaction, all or none.
    """

    if TYPE_CHECKING:
        # Provided by SqliteStore.
        async def _submit(
            self, statements: list[_Statement], custom: _Custom | None = None
        ) -> Any: ...

        async def _fetch(
            self, sql: str, params: Iterable[Any] = ()
        ) -> list[sqlite3.Row]: ...

        def _lookup(self, sql: str, params: tuple[Any, ...]) -> list[Any]: ...

    # -- SuppressionStore ------------------------------------------------------

    async def add_suppressions(self, entries: Sequence[Suppression]) -> int:
        """Upsert every entry in one transaction; ValueError before any write.

        Entries repeating a key within ``entries`` count each; the last one stays.
        """
        if not entries:
            return 0
        if len(entries) > _THREAD_ROWS:
            rows = await asyncio.to_thread(_suppression_rows, entries)
        else:
            rows = _suppression_rows(entries)

        async def run(db: aiosqlite.Connection) -> int:
            await _executemany_chunked(db, _UPSERT_SUPPRESSION, rows)
            return len(rows)

        return int(await self._submit([], run))

    async def remove_suppressions(
        self,
        address: str,
        account: str | None,
        *,
        reason: SuppressionReason | None,
        removed_by: str,
        why: str,
        now: datetime,
    ) -> list[Suppression]:
        """Delete the matching entries and audit each, in one transaction."""
        _aware("now", now)
        sql = (
            "DELETE FROM suppressions WHERE address = ? AND scope = ?"  # noqa: S608 (fixed text)
            + (" AND reason = ?" if reason is not None else "")
            + f" RETURNING {_SUPPRESSION_COLUMNS}"
        )
        params: tuple[Any, ...] = (address, _scope(account))
        if reason is not None:
            params += (SuppressionReason(reason).value,)

        async def run(db: aiosqlite.Connection) -> list[Suppression]:
            async with db.execute(sql, params) as cur:
                removed = [_suppression(row) for row in await cur.fetchall()]
            await db.executemany(
                _INSERT_REMOVAL,
                [
                    (
                        entry.address,
                        _scope(entry.account),
                        entry.reason.value,
                        removed_by,
                        _ts(now),
                        why,
                    )
                    for entry in removed
                ],
            )
            return sorted(removed, key=lambda entry: entry.reason.value)

        result: list[Suppression] = await self._submit([], run)
        return result

    async def suppressions_for(
        self, address: str, account: str, now: datetime
    ) -> list[Suppression]:
        """Active global and ``account`` entries for ``address``: one index search."""
        rows = self._lookup(LOOKUP_SUPPRESSIONS, (address, account, _ts(now)))
        return [_suppression(row) for row in rows]

    async def list_suppressions(
        self,
        *,
        account: str | None = None,
        reason: SuppressionReason | None = None,
        after: tuple[str, str, str] | None = None,
        limit: int = 1000,
    ) -> list[Suppression]:
        """One page in key order; pass the last entry's key as ``after``."""
        clauses: list[str] = []
        params: list[Any] = []
        if account is not None:
            clauses.append("scope = ?")
            params.append(account)
        if reason is not None:
            clauses.append("reason = ?")
            params.append(SuppressionReason(reason).value)
        if after is not None:
            clauses.append("(address, scope, reason) > (?, ?, ?)")
            params.extend(after)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetch(
            f"SELECT {_SUPPRESSION_COLUMNS} FROM suppressions {where}"  # noqa: S608 (fixed text)
            " ORDER BY address, scope, reason LIMIT ?",
            (*params, limit),
        )
        return [_suppression(row) for row in rows]

    async def count_suppressions(self) -> int:
        """Number of entries, expired ones included (counts the whole table)."""
        rows = await self._fetch("SELECT COUNT(*) FROM suppressions")
        return int(rows[0][0])

    async def suppression_removals(
        self, address: str | None = None, limit: int = 100
    ) -> list[SuppressionRemoval]:
        """Audit records, newest first; for one address if given."""
        where = "WHERE address = ?" if address is not None else ""
        params: tuple[Any, ...] = (address,) if address is not None else ()
        rows = await self._fetch(
            "SELECT address, scope, reason, removed_by, removed_at, why"  # noqa: S608 (fixed text)
            f" FROM suppression_removals {where} ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [
            SuppressionRemoval(
                address=row[0],
                account=row[1] or None,
                reason=SuppressionReason(row[2]),
                removed_by=row[3],
                removed_at=_dt(row[4]),
                why=row[5],
            )
            for row in rows
        ]

    # -- ConsentStore ----------------------------------------------------------

    async def add_consents(self, records: Sequence[ConsentRecord]) -> int:
        """Upsert every record in one transaction; ``recorded_at`` defaults to now."""
        if not records:
            return 0
        if len(records) > _THREAD_ROWS:
            rows = await asyncio.to_thread(_consent_rows, records)
        else:
            rows = _consent_rows(records)

        async def run(db: aiosqlite.Connection) -> int:
            await _executemany_chunked(db, _UPSERT_CONSENT, rows)
            return len(rows)

        return int(await self._submit([], run))

    async def consent_for(self, account: str, address: str) -> ConsentRecord | None:
        """The record ``account`` holds for ``address``, if any."""
        rows = self._lookup(
            f"SELECT {_CONSENT_COLUMNS} FROM consents"  # noqa: S608 (fixed text)
            " WHERE address = ? AND account = ?",
            (address, account),
        )
        return _consent(rows[0]) if rows else None

    async def consents_of(self, address: str) -> list[ConsentRecord]:
        """Every account's record for ``address``, by account name."""
        rows = await self._fetch(
            f"SELECT {_CONSENT_COLUMNS} FROM consents"  # noqa: S608 (fixed text)
            " WHERE address = ? ORDER BY account",
            (address,),
        )
        return [_consent(row) for row in rows]
