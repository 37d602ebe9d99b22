"""The durable queue as the relay sees it: enqueue, hand out work, record results.

``enqueue`` returns once the message is committed (the SMTP handler replies 250
after it, never before) and hands the fresh message straight to the delivery
workers, body in memory. Messages waiting for a retry, or left over from before a
restart, are found by a poller that asks the store what is due. A message is
leased to one worker at a time: it is "in flight" from hand-out until the store has
committed that attempt's results.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from config.models import QueueConfig
from relay.clock import Clock
from relay.dsn import FailedRecipient, build_dsn, is_delivery_report
from relay.metrics import Metrics
from storage.base import AttemptRecord, Event, NewMessage, QueuedMessage, QueueStore
from storage.errors import StorageError

log = structlog.get_logger(__name__)


class _QueueIds:
    """Queue ids: 11 hex digits of milliseconds, then a 24-bit sequence.

    The sequence starts at a random point in each new millisecond and counts up
    within it, so ids made by one process never repeat (a purely random suffix
    collides within a busy millisecond) and sort in the order they were made.
    A clock that steps back keeps the last millisecond until it catches up.
    """

    _START_BITS = 22  # random start in the lower quarter: 12 M ids of headroom

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._millis = 0
        self._sequence = 0

    def __call__(self) -> str:
        now = int(time.time() * 1000)
        with self._lock:
            if now > self._millis:
                self._millis, self._sequence = now, secrets.randbits(self._START_BITS)
            elif self._sequence < 0xFFFFFF:
                self._sequence += 1
            else:
                self._millis += 1
                self._sequence = secrets.randbits(self._START_BITS)
            millis, sequence = self._millis, self._sequence
        return f"{millis:011X}{sequence:06X}"


new_queue_id = _QueueIds()
"""A short, unique, time-ordered queue id (e.g. ``0193F2A4C1DA1B3C4``)."""


@dataclass(frozen=True, slots=True)
class Job:
    """One delivery attempt's worth of work, leased to one worker."""

    queue_id: str
    account: str | None
    mail_from: str
    recipients: tuple[str, ...]
    received_at: datetime
    expires_at: datetime
    attempts: int
    smtputf8: bool
    content: bytes | None = None
    """The message, when it is still in memory (fresh messages); else loaded."""

    @classmethod
    def from_queued(cls, message: QueuedMessage) -> Job:
        """A job for a message found in the store."""
        return cls(
            queue_id=message.queue_id,
            account=message.account,
            mail_from=message.mail_from,
            recipients=message.recipients,
            received_at=message.received_at,
            expires_at=message.expires_at,
            attempts=message.attempts,
            smtputf8=message.smtputf8,
        )

    @classmethod
    def from_new(cls, message: NewMessage) -> Job:
        """A job for a message just accepted."""
        return cls(
            queue_id=message.queue_id,
            account=message.account,
            mail_from=message.mail_from,
            recipients=message.recipients,
            received_at=message.received_at,
            expires_at=message.expires_at,
            attempts=0,
            smtputf8=message.smtputf8,
            content=message.content,
        )


class Queue:
    """Enqueue durably, lease jobs to workers, apply their results."""

    def __init__(
        self,
        store: QueueStore,
        config: QueueConfig,
        clock: Clock,
        metrics: Metrics,
        *,
        capacity: int,
    ) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._jobs: asyncio.Queue[Job] = asyncio.Queue(maxsize=capacity)
        self._results: asyncio.Queue[AttemptRecord] = asyncio.Queue()
        self._in_flight: set[str] = set()
        # Lease ends, numbered: a poll that read the store before a lease ended
        # must not re-lease that message from its (now stale) snapshot.
        self._lease_epoch = 0
        self._ended: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.on_recorded: Callable[[Sequence[AttemptRecord]], None] | None = None
        """Called with each batch of attempts once it is committed."""

    @property
    def in_flight(self) -> int:
        """Messages leased to workers or waiting for a worker."""
        return len(self._in_flight)

    def new_message(
        self,
        *,
        account: str | None,
        mail_from: str,
        recipients: tuple[str, ...],
        content: bytes,
        smtputf8: bool,
        queue_id: str | None = None,
        tracked: bool = False,
        message_id: str | None = None,
        kind: str | None = None,
    ) -> NewMessage:
        """A message record stamped with an id, arrival and expiry; ``tracked``
        keeps the row that traces feedback back to it (:mod:`relay.tracking`)."""
        now = self._clock.now()
        return NewMessage(
            queue_id=queue_id or new_queue_id(),
            account=account,
            mail_from=mail_from,
            recipients=recipients,
            content=content,
            received_at=now,
            expires_at=now + timedelta(seconds=self._config.max_lifetime_seconds),
            smtputf8=smtputf8,
            tracked=tracked,
            message_id=message_id,
            kind=kind,
        )

    def new_dsn(
        self,
        *,
        hostname: str,
        account: str | None,
        mail_from: str,
        content: bytes,
        queue_id: str,
        arrival: datetime,
        failures: Sequence[FailedRecipient],
    ) -> NewMessage | None:
        """The DSN (RFC 3464) telling ``mail_from`` of ``failures``, or ``None``
        where none may be sent: DSNs off, the null sender, or a message that is
        itself generated or a delivery report (RFC 3464 §4, RFC 5321 §6.1)."""
        cfg = self._config
        if (
            not failures
            or not cfg.send_dsn
            or not mail_from
            or account is None
            or is_delivery_report(content)
        ):
            return None
        dsn_from = (
            cfg.dsn_sender if "@" in cfg.dsn_sender else f"{cfg.dsn_sender}@{hostname}"
        )
        body = build_dsn(
            reporting_mta=hostname,
            dsn_from=dsn_from,
            original_mail_from=mail_from,
            original_message=content,
            queue_id=queue_id,
            arrival=arrival,
            failures=failures,
            now=self._clock.now(),
        )
        return self.new_message(
            account=None,
            mail_from="",
            recipients=(mail_from,),
            content=body,
            smtputf8=not mail_from.isascii(),
        )

    async def enqueue(
        self, *messages: NewMessage, events: Sequence[Event] = ()
    ) -> None:
        """Commit the messages (and events) together; on return they are durable
        and offered to the workers."""
        await self._store.enqueue(*messages, events=events)
        for message in messages:
            self._offer(Job.from_new(message))

    def _offer(self, job: Job) -> bool:
        if self._stopping or job.queue_id in self._in_flight or self._jobs.full():
            return False  # the poller will find it in the store later
        self._in_flight.add(job.queue_id)
        self._jobs.put_nowait(job)
        return True

    async def next_job(self) -> Job:
        """Wait for the next leased job."""
        return await self._jobs.get()

    def next_job_nowait(self) -> Job | None:
        """The next leased job if one is waiting, else ``None``."""
        try:
            return self._jobs.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def finish(self, record: AttemptRecord) -> None:
        """Hand an attempt's results to the recorder; the lease ends once committed."""
        self._results.put_nowait(record)

    def release(self, queue_id: str) -> None:
        """End a lease without recording anything (the attempt did not happen)."""
        self._in_flight.discard(queue_id)

    def wake(self) -> None:
        """Ask the poller to look for due messages now."""
        self._wake.set()

    def stop_accepting_work(self) -> None:
        """Hand out no further jobs (draining); queued ones stay in the store."""
        self._stopping = True
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            self._in_flight.discard(job.queue_id)

    async def run_poller(self) -> None:
        """Find due messages in the store and lease them, forever."""
        while True:
            room = self._jobs.maxsize - self._jobs.qsize()
            if room > 0 and not self._stopping:
                started = self._lease_epoch
                try:
                    due = await self._store.due(
                        self._clock.now(), room + len(self._in_flight)
                    )
                except StorageError as exc:
                    self._metrics.storage_errors_total.labels("poll").inc()
                    log.warning("queue_poll_failed", error=str(exc))
                    due = []
                except Exception:
                    log.exception("queue_poll_crashed")
                    due = []
                for message in due:
                    if message.queue_id in self._in_flight:
                        continue
                    if self._ended.get(message.queue_id, 0) > started:
                        continue  # its lease ended after our snapshot was taken
                    if not message.recipients:
                        continue
                    if not self._offer(Job.from_queued(message)):
                        break
                self._ended = {q: e for q, e in self._ended.items() if e > started}
            self._wake.clear()
            try:
                async with asyncio.timeout(self._config.poll_interval_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run_recorder(self) -> None:
        """Commit attempt results in batches, then end their leases, forever."""
        while True:
            batch = [await self._results.get()]
            while not self._results.empty():
                batch.append(self._results.get_nowait())
            await self._record(batch)

    async def drain_results(self) -> None:
        """Commit every result handed in so far (at shutdown)."""
        batch = []
        while not self._results.empty():
            batch.append(self._results.get_nowait())
        if batch:
            await self._record(batch, retry=False)

    async def _record(self, batch: list[AttemptRecord], *, retry: bool = True) -> None:
        delay = 0.5
        recorded = False
        while True:
            try:
                await self._store.record_attempts(batch)
                recorded = True
                break
            except StorageError as exc:
                self._metrics.storage_errors_total.labels("record").inc()
                log.warning(
                    "attempts_not_recorded",
                    queue_ids=[record.queue_id for record in batch][:20],
                    error=str(exc),
                    retry_in_seconds=delay if retry else None,
                )
                if not retry:
                    break
                # Keep the leases: releasing them now would let the poller send
                # the same messages again while the store cannot record anything.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if recorded and self.on_recorded is not None:
            try:
                self.on_recorded(batch)
            except Exception:  # a counting fault must not stop deliveries
                log.exception("attempts_not_counted")
        self._lease_epoch += 1
        for record in batch:
            self._in_flight.discard(record.queue_id)
            self._ended[record.queue_id] = self._lease_epoch
        if any(record.followups for record in batch):
            self._wake.set()
