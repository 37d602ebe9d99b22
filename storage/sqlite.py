"""The SQLite backend (aiosqlite): WAL, ``synchronous=FULL``, group-committed writes.

Every write goes through one writer task. It takes all writes waiting at that moment,
applies them in one transaction and commits once, so transactions that complete
together share one fsync; each caller's await returns only after that commit.
Reads use a second connection, which WAL lets run beside the writer. The exclusion
list and consent ledger live in :mod:`storage.sqlite_lists`, mixed in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from storage.base import (
    AttemptRecord,
    BounceType,
    CounterBucket,
    Event,
    EventKind,
    NewMessage,
    QueuedMessage,
    QueueStats,
)
from storage.errors import StorageError, StorageFullError, StorageUnavailableError
from storage.sqlite_lists import SqliteLists
from storage.sqlite_reputation import SqliteReputation, count_row

log = structlog.get_logger(__name__)

_MAX_BATCH = 1024
_FREE_SPACE_CACHE_SECONDS = 1.0

_INSERT_MESSAGE = (
    "INSERT INTO messages (queue_id, account, mail_from, received_at, expires_at,"
    " next_attempt_at, size_bytes, smtputf8, generated, content)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RECIPIENT = (
    "INSERT OR IGNORE INTO recipients (queue_id, address, state)"
    " VALUES (?, ?, 'pending')"
)
_INSERT_SENT = (
    "INSERT OR REPLACE INTO sent_messages (queue_id, account, message_id,"
    " recipients, received_at, kind) VALUES (?, ?, ?, ?, ?, ?)"
)
_UPDATE_RECIPIENT = (
    "UPDATE recipients SET state = ?, smtp_code = ?, status = ?, detail = ?,"
    " updated_at = ? WHERE queue_id = ? AND address = ?"
)
_UPDATE_MESSAGE = (
    "UPDATE messages SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
    " WHERE queue_id = ?"
)
_DELETE_MESSAGE = "DELETE FROM messages WHERE queue_id = ?"
_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (kind, account, recipient, queue_id, occurred_at,"
    " source, smtp_code, status, detail, bounce_type, dedup_key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_MESSAGE_COLUMNS_M = (
    "m.queue_id, m.account, m.mail_from, m.received_at, m.expires_at,"
    " m.next_attempt_at, m.attempts, m.size_bytes, m.smtputf8, m.last_error"
)

Statement = tuple[str, tuple[Any, ...]]
Custom = Callable[[aiosqlite.Connection], Awaitable[Any]]


@dataclass(slots=True)
class _Write:
    """One caller's share of a group commit."""

    statements: list[Statement]
    custom: Custom | None
    done: asyncio.Future[Any]
    result: Any = field(default=None)
    started: bool = False
    """Taken into a transaction: from now on its outcome is the commit's."""
    abandoned: bool = False
    """The caller gave up before it started: it must never be applied."""


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _translate(exc: sqlite3.Error) -> StorageError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return StorageFullError("database or disk is full")
    return StorageUnavailableError(f"sqlite: {exc}")


def _message_rows(message: NewMessage) -> list[Statement]:
    rows: list[Statement] = [
        (
            _INSERT_MESSAGE,
            (
                message.queue_id,
                message.account,
                message.mail_from,
                _ts(message.received_at),
                _ts(message.expires_at),
                _ts(message.received_at),
                len(message.content),
                int(message.smtputf8),
                int(message.generated),
                message.content,
            ),
        )
    ]
    rows.extend(
        (_INSERT_RECIPIENT, (message.queue_id, rcpt)) for rcpt in message.recipients
    )
    if message.tracked and message.account is not None:
        rows.append(
            (
                _INSERT_SENT,
                (
                    message.queue_id,
                    message.account,
                    message.message_id,
                    "\n".join(message.recipients),
                    _ts(message.received_at),
                    message.kind,
                ),
            )
        )
    return rows


def _event_row(event: Event) -> Statement:
    return (
        _INSERT_EVENT,
        (
            event.kind.value,
            event.account,
            event.recipient,
            event.queue_id,
            _ts(event.occurred_at),
            event.source,
            event.smtp_code,
            event.status,
            event.detail,
            event.bounce_type.value if event.bounce_type else None,
            event.dedup_key,
        ),
    )


def _attempt_rows(record: AttemptRecord) -> list[Statement]:
    statements: list[Statement]
    if record.next_attempt_at is None:
        # Nothing left pending: the message leaves the queue (its recipient rows
        # with it, by trigger); what needs keeping is in the events.
        statements = [(_DELETE_MESSAGE, (record.queue_id,))]
    else:
        attempted = _ts(record.attempted_at)
        statements = [
            (
                _UPDATE_RECIPIENT,
                (
                    result.state.value,
                    result.smtp_code,
                    result.status,
                    result.detail,
                    attempted,
                    record.queue_id,
                    result.address,
                ),
            )
            for result in record.results
        ]
        statements.append(
            (
                _UPDATE_MESSAGE,
                (_ts(record.next_attempt_at), record.last_error, record.queue_id),
            )
        )
    statements.extend(_event_row(event) for event in record.events)
    if record.sent and record.account is not None:
        statements.append(
            count_row(
                CounterBucket(
                    record.account,
                    int(_ts(record.attempted_at) // 3600),
                    EventKind.SENT,
                    record.sent,
                )
            )
        )
    for followup in record.followups:
        statements.extend(_message_rows(followup))
    return statements


class SqliteStore(SqliteLists, SqliteReputation):
    """The embedded store: one database file, WAL, group-committed writes."""

    def __init__(
        self,
        path: str | Path,
        *,
        timeout_seconds: float = 10.0,
        min_free_space_bytes: int = 0,
    ) -> None:
        self._path = Path(path)
        self._timeout = timeout_seconds
        self._min_free = min_free_space_bytes
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._point: sqlite3.Connection | None = None
        self._pending: asyncio.Queue[_Write] = asyncio.Queue()
        self._writer_task: asyncio.Task[None] | None = None
        self._free_checked_at = -_FREE_SPACE_CACHE_SECONDS
        self._free_ok = True
        self.commits = 0
        """Number of commits so far (group commit makes it smaller than writes)."""

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- lifetime -------------------------------------------------------------

    async def open(self) -> None:
        """Open both connections, set WAL and FULL sync, apply migrations."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            # "IMMEDIATE": the sqlite3 module opens the write transaction itself at
            # the first statement of a batch, which saves a round trip per commit.
            self._writer = await aiosqlite.connect(
                self._path, isolation_level="IMMEDIATE"
            )
            await self._configure(self._writer)
            await self._migrate(self._writer)
            self._reader = await aiosqlite.connect(self._path, isolation_level=None)
            await self._configure(self._reader)
            self._point = self._connect_point()
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StorageUnavailableError(f"cannot open {self._path}: {exc}") from exc
        self._writer_task = asyncio.create_task(
            self._write_loop(), name="sqlite-writer"
        )

    def open_lookups(self) -> None:
        """Open only the read-only connection of the point lookups
        (``suppressions_for``, ``consent_for``), for a process that checks mail
        but never writes: a policy worker. The relay has created the database."""
        try:
            self._point = self._connect_point()
        except sqlite3.Error as exc:
            raise StorageUnavailableError(f"cannot open {self._path}: {exc}") from exc

    def _connect_point(self) -> sqlite3.Connection:
        point = sqlite3.connect(
            f"{self._path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            # It runs on the event loop: never wait long for a lock (a WAL
            # reader hardly ever meets one); a busy store defers the mail.
            timeout=0.05,
        )
        point.execute("PRAGMA query_only=1")
        return point

    async def close(self) -> None:
        """Finish queued writes, stop the writer, close the connections."""
        if self._writer_task is not None:
            # Let writes already queued commit before stopping (bounded).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await self._pending.join()
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        if self._point is not None:
            self._point.close()
            self._point = None
        for conn in (self._reader, self._writer):
            if conn is not None:
                try:
                    await conn.close()
                except sqlite3.Error:
                    log.warning("sqlite_close_failed", path=str(self._path))
        self._reader = self._writer = None

    @staticmethod
    async def _configure(conn: aiosqlite.Connection) -> None:
        # RFC-free but essential: WAL lets readers run beside the one writer, and
        # synchronous=FULL fsyncs the WAL at every commit, so a committed message
        # survives a power cut (https://sqlite.org/pragma.html#pragma_synchronous).
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=FULL")
        await conn.execute("PRAGMA busy_timeout=5000")

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
        )
        async with conn.execute("SELECT MAX(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        current = row[0] if row and row[0] is not None else 0
        folder = resources.files("storage.migrations").joinpath("sqlite")
        scripts = sorted(
            (entry.name, entry.read_text(encoding="utf-8"))
            for entry in folder.iterdir()
            if entry.name.endswith(".sql")
        )
        for name, sql in scripts:
            version = int(name.split("_", 1)[0])
            if version <= current:
                continue
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{sql}\n"
                f"INSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
            )
            log.info("storage_migrated", version=version, path=str(self._path))

    # -- the writer -----------------------------------------------------------

    async def _submit(
        self, statements: list[Statement], custom: Custom | None = None
    ) -> Any:
        if self._writer_task is None:
            raise StorageUnavailableError("store is not open")
        write = _Write(statements, custom, asyncio.get_running_loop().create_future())
        self._pending.put_nowait(write)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(write.done)
        except TimeoutError as exc:
            if write.started:
                # Already inside a transaction: answering "failed" now could be
                # untrue (it may still commit), so its commit decides.
                return await write.done
            write.abandoned = True
            raise StorageUnavailableError("store write timed out") from exc

    async def _write_loop(self) -> None:
        while True:
            taken = [await self._pending.get()]
            while len(taken) < _MAX_BATCH and not self._pending.empty():
                taken.append(self._pending.get_nowait())
            batch = [write for write in taken if not write.abandoned]
            for write in batch:
                write.started = True
            try:
                if batch:
                    await self._commit(batch)
            finally:
                for _ in taken:
                    self._pending.task_done()

    async def _commit(self, batch: list[_Write]) -> None:
        try:
            await self._apply(batch)
        except StorageError as exc:
            if len(batch) == 1 or isinstance(exc, StorageFullError):
                self._fail(batch, exc)
                return
            # One bad write must not fail its neighbours: apply each alone.
            for write in batch:
                try:
                    await self._apply([write])
                except StorageError as single:
                    self._fail([write], single)
                else:
                    self.commits += 1
                    self._succeed([write])
            return
        self.commits += 1
        self._succeed(batch)

    @staticmethod
    def _fail(batch: list[_Write], exc: StorageError) -> None:
        for write in batch:
            if not write.done.done():
                write.done.set_exception(exc)

    @staticmethod
    def _succeed(batch: list[_Write]) -> None:
        for write in batch:
            if not write.done.done():
                write.done.set_result(write.result)

    async def _apply(self, batch: list[_Write]) -> None:
        db = self._writer
        if db is None:
            raise StorageUnavailableError("store is not open")
        grouped: dict[str, list[tuple[Any, ...]]] = {}
        for write in batch:
            for sql, params in write.statements:
                grouped.setdefault(sql, []).append(params)
        try:
            try:
                for sql, rows in grouped.items():
                    await db.executemany(sql, rows)
                for write in batch:
                    if write.custom is not None:
                        write.result = await write.custom(db)
                await db.commit()
            except BaseException:
                # SQLite may already have rolled back by itself (e.g. SQLITE_FULL).
                if db.in_transaction:
                    await db.rollback()
                raise
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        except ValueError as exc:  # aiosqlite: the connection is closed
            raise StorageUnavailableError(f"sqlite: {exc}") from exc

    # -- QueueStore -----------------------------------------------------------

    async def enqueue(
        self, *messages: NewMessage, events: Sequence[Event] = ()
    ) -> None:
        """Make the messages and events durable; returns after the shared commit."""
        if not await self.free_space_ok():
            raise StorageFullError("free disk space below the configured minimum")
        statements = [row for message in messages for row in _message_rows(message)]
        statements.extend(_event_row(event) for event in events)
        await self._submit(statements)

    async def record_attempt(self, record: AttemptRecord) -> None:
        """Apply one attempt's per-recipient results, events and DSNs together."""
        await self._submit(_attempt_rows(record))

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Apply several attempts in one write (and one commit)."""
        statements: list[Statement] = []
        for record in records:
            statements.extend(_attempt_rows(record))
        await self._submit(statements)

    async def retry_now(self, queue_id: str, now: datetime) -> bool:
        """Make a queued message due at once."""

        async def run(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(
                "UPDATE messages SET next_attempt_at = ? WHERE queue_id = ?",
                (_ts(now), queue_id),
            )
            return cur.rowcount > 0

        return bool(await self._submit([], run))

    async def delete(self, queue_id: str) -> bool:
        """Drop a queued message and its recipients."""

        async def run(db: aiosqlite.Connection) -> bool:
            cur = await db.execute(_DELETE_MESSAGE, (queue_id,))
            return cur.rowcount > 0  # the trigger takes the recipients along

        return bool(await self._submit([], run))

    # -- EventStore -----------------------------------------------------------

    async def add_events(self, events: Sequence[Event]) -> list[Event]:
        """Record events in one commit; a repeated ``dedup_key`` is ignored (and
        not counted: the counting trigger fires only for rows inserted)."""
        if not events:
            return []
        rows = [_event_row(event) for event in events]

        async def run(db: aiosqlite.Connection) -> list[Event]:
            new = []
            for event, (sql, params) in zip(events, rows, strict=True):
                cur = await db.execute(sql, params)
                if cur.rowcount > 0:
                    new.append(event)
            return new

        recorded: list[Event] = await self._submit([], run)
        return recorded

    # -- reads ----------------------------------------------------------------

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StorageUnavailableError("store is not open")
        try:
            async with asyncio.timeout(self._timeout):
                async with self._reader.execute(sql, tuple(params)) as cur:
                    return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        except ValueError as exc:  # aiosqlite: the connection is closed
            raise StorageUnavailableError(f"sqlite: {exc}") from exc
        except TimeoutError as exc:
            raise StorageUnavailableError("store read timed out") from exc

    def _lookup(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """A point lookup on a primary key, run on the event loop's own thread.

        The RCPT checks make one or two per recipient. Through aiosqlite each
        costs a thread hop (~100-200 us, and a wait for the GIL while checks run);
        an indexed search of a WAL database whose pages are cached takes 5-10 us,
        and WAL readers never wait for the writer, so here it is done in place.
        """
        if self._point is None:
            raise StorageUnavailableError("store is not open")
        try:
            return self._point.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def _messages(
        self, select: str, order: str, params: tuple[Any, ...]
    ) -> list[QueuedMessage]:
        # One statement, so one snapshot: a message and its pending recipients
        # are read together even while the writer commits. ``select`` picks the
        # messages (indexed, limited) before the join.
        rows = await self._fetch(
            f"SELECT {_MESSAGE_COLUMNS_M}, group_concat(r.address, char(31))"  # noqa: S608
            f" FROM (SELECT * FROM messages {select}) m JOIN recipients r"
            " ON r.queue_id = m.queue_id AND r.state = 'pending'"
            f" GROUP BY m.queue_id ORDER BY {order}",
            params,
        )
        pending = {row[0]: tuple(row[10].split("\x1f")) for row in rows}
        return [
            QueuedMessage(
                queue_id=row[0],
                account=row[1],
                mail_from=row[2],
                recipients=tuple(pending[row[0]]),
                received_at=_dt(row[3]),
                expires_at=_dt(row[4]),
                next_attempt_at=_dt(row[5]),
                attempts=row[6],
                size_bytes=row[7],
                smtputf8=bool(row[8]),
                last_error=row[9],
            )
            for row in rows
        ]

    async def due(self, now: datetime, limit: int) -> list[QueuedMessage]:
        """Messages due for an attempt, the longest-waiting first."""
        return await self._messages(
            "WHERE next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
            "m.next_attempt_at",
            (_ts(now), limit),
        )

    async def content(self, queue_id: str) -> bytes | None:
        """The stored message bytes."""
        rows = await self._fetch(
            "SELECT content FROM messages WHERE queue_id = ?", (queue_id,)
        )
        return bytes(rows[0][0]) if rows else None

    async def list_messages(self, limit: int = 1000) -> list[QueuedMessage]:
        """Queued messages, oldest first."""
        return await self._messages(
            "ORDER BY received_at LIMIT ?", "m.received_at", (limit,)
        )

    async def get_message(self, queue_id: str) -> QueuedMessage | None:
        """One queued message."""
        found = await self._messages("WHERE queue_id = ?", "m.queue_id", (queue_id,))
        return found[0] if found else None

    async def stats(self) -> QueueStats:
        """Depth and oldest age of the queue."""
        rows = await self._fetch("SELECT COUNT(*), MIN(received_at) FROM messages")
        rcpts = await self._fetch(
            "SELECT COUNT(*) FROM recipients WHERE state = 'pending'"
        )
        count, oldest = rows[0]
        return QueueStats(
            messages=count,
            recipients=rcpts[0][0],
            oldest_received_at=_dt(oldest) if oldest is not None else None,
        )

    async def events(
        self,
        kind: EventKind | None = None,
        account: str | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        """Recorded events, newest first."""
        clauses, params = [], []
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind.value)
        if account is not None:
            clauses.append("account = ?")
            params.append(account)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self._fetch(
            "SELECT kind, account, recipient, occurred_at, source, queue_id, smtp_code,"  # noqa: S608 (fixed text)
            f" status, detail, bounce_type, dedup_key FROM events {where}"
            " ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [
            Event(
                kind=EventKind(row[0]),
                account=row[1],
                recipient=row[2],
                occurred_at=_dt(row[3]),
                source=row[4],
                queue_id=row[5],
                smtp_code=row[6],
                status=row[7],
                detail=row[8],
                bounce_type=BounceType(row[9]) if row[9] else None,
                dedup_key=row[10],
            )
            for row in rows
        ]

    async def free_space_ok(self) -> bool:
        """False when the database's file system is below the free-space minimum."""
        if self._min_free <= 0:
            return True
        now = time.monotonic()
        if now - self._free_checked_at >= _FREE_SPACE_CACHE_SECONDS:
            self._free_checked_at = now
            try:
                free = shutil.disk_usage(self._path.parent).free
            except OSError:
                free = 0
            self._free_ok = free >= self._min_free
        return self._free_ok
