"""The delivery workers: lease a job, send it upstream, record each recipient's fate.

Each worker owns one :class:`~relay.upstream.UpstreamConnection` and reuses it for
many messages. Per recipient: 2xx is delivered; 4xx, timeouts and connection
failures are retried on the ``[queue]`` schedule; 5xx (and the end of the message's
lifetime) is a bounce, recorded as an event and reported to the envelope sender
with an RFC 3464 DSN unless the message had the null sender or was itself a DSN.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import structlog

from config.models import QueueConfig, UpstreamConfig
from relay.clock import Clock
from relay.dsn import FailedRecipient
from relay.errors import TemporaryError
from relay.metrics import Metrics
from relay.queue import Job, Queue
from relay.retry import next_attempt
from relay.tracking import Tracker, trackable
from relay.upstream import Outcome, RecipientOutcome, UpstreamConnection
from storage.addresses import domain_of
from storage.base import (
    AttemptRecord,
    BounceType,
    Event,
    EventKind,
    NewMessage,
    QueueStore,
    RecipientResult,
    RecipientState,
)
from storage.errors import StorageError

log = structlog.get_logger(__name__)

_UNREACHABLE = "4.4.1"
_FAULT = "4.3.0"


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """What the workers need from relay.toml."""

    hostname: str
    upstream: UpstreamConfig
    queue: QueueConfig


class Delivery:
    """A pool of workers that forward queued mail to the upstream."""

    def __init__(
        self,
        queue: Queue,
        store: QueueStore,
        settings: DeliverySettings,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._queue = queue
        self._store = store
        self._settings = settings
        self._clock = clock
        self._metrics = metrics
        self._stopping = asyncio.Event()
        self._busy = 0
        self._all_idle = asyncio.Event()
        self._all_idle.set()
        self._idle_timeout = settings.upstream.idle_timeout_seconds
        self.tracker: Tracker | None = None
        """Set when ``[feedback] bounce_domain`` is: an account's mail leaves with
        a VERP envelope sender, one upstream transaction per recipient."""

    @property
    def busy(self) -> int:
        """Workers in the middle of an attempt."""
        return self._busy

    async def wait_idle(self) -> None:
        """Return once no worker is in the middle of an attempt."""
        await self._all_idle.wait()

    def stop(self) -> None:
        """Let each worker finish its current attempt, then end."""
        self._stopping.set()

    async def run_worker(self, number: int) -> None:
        """One worker: lease, attempt, record; until :meth:`stop`."""
        connection = UpstreamConnection(
            self._settings.upstream, self._settings.hostname
        )
        try:
            while not self._stopping.is_set():
                job = await self._next(connection)
                if job is None:
                    continue
                self._busy += 1
                self._all_idle.clear()
                try:
                    await self._attempt(job, connection)
                except Exception:
                    log.exception(
                        "delivery_crashed", queue_id=job.queue_id, worker=number
                    )
                    self._queue.release(job.queue_id)
                finally:
                    self._busy -= 1
                    if self._busy == 0:
                        self._all_idle.set()
        finally:
            await asyncio.shield(connection.close())

    async def _next(self, connection: UpstreamConnection) -> Job | None:
        """The next job; ``None`` after closing an idle connection or when stopping.

        An idle worker simply waits on the job queue; at shutdown the relay cancels
        the waiting ones, while busy ones finish their attempt first.
        """
        job = self._queue.next_job_nowait()
        if job is None:
            timeout = self._idle_timeout if connection.connected else None
            try:
                async with asyncio.timeout(timeout):
                    job = await self._queue.next_job()
            except TimeoutError:  # idle: give the upstream its connection back
                await connection.close()
                return None
        if self._stopping.is_set():
            self._queue.release(job.queue_id)
            return None
        return job

    async def _attempt(self, job: Job, connection: UpstreamConnection) -> None:
        content = job.content
        if content is None:
            try:
                content = await self._store.content(job.queue_id)
            except StorageError as exc:
                log.warning(
                    "delivery_load_failed", queue_id=job.queue_id, error=str(exc)
                )
                self._queue.release(job.queue_id)
                return
            if content is None:  # deleted meanwhile (relay queue delete)
                self._queue.release(job.queue_id)
                return
        started = time.monotonic()
        attempt = job.attempts + 1
        tracker = self.tracker
        if (
            tracker is not None
            and tracker.bounce_domain is not None
            and job.account is not None
            and job.mail_from
            and trackable(job.queue_id)
        ):
            outcomes = await self._send_verp(
                connection, job, job.account, content, tracker
            )
        else:
            outcomes = await self._send(
                connection, job, job.mail_from, job.recipients, content
            )
        duration = time.monotonic() - started
        self._metrics.delivery_duration_seconds.observe(duration)
        record, result = self._judge(job, outcomes, content, attempt)
        self._queue.finish(record)
        self._metrics.delivery_attempts_total.labels(result).inc()
        if record.next_attempt_at is None:
            self._metrics.queue_time_seconds.observe(
                (self._clock.now() - job.received_at).total_seconds()
            )
        first = outcomes[0]
        log.info(
            "delivery_attempted",
            queue_id=job.queue_id,
            account=job.account,
            attempt=attempt,
            rcpt_count=len(job.recipients),
            outcome=result,
            upstream=connection.name,
            smtp_code=first.code,
            smtp_status=first.status,
            reply=first.text[:200],
            delivered=sum(o.outcome is Outcome.DELIVERED for o in outcomes),
            duration_seconds=round(duration, 4),
            retry_in_seconds=(
                round((record.next_attempt_at - record.attempted_at).total_seconds())
                if record.next_attempt_at
                else None
            ),
        )

    async def _send_verp(
        self,
        connection: UpstreamConnection,
        job: Job,
        account: str,
        content: bytes,
        tracker: Tracker,
    ) -> list[RecipientOutcome]:
        """One transaction per recipient, each with its own VERP sender."""
        today = self._clock.now().date()
        outcomes: list[RecipientOutcome] = []
        for index, rcpt in enumerate(job.recipients):
            if index and self._stopping.is_set():
                # Shutting down: what is sent is recorded, the rest stays queued.
                outcomes.extend(
                    RecipientOutcome(
                        r, Outcome.TEMPORARY, None, "4.3.2", "relay stopping"
                    )
                    for r in job.recipients[index:]
                )
                break
            sender = tracker.return_path(
                job.mail_from, job.queue_id, account, rcpt, today
            )
            sent = (await self._send(connection, job, sender, (rcpt,), content))[0]
            if sent.outcome is Outcome.PERMANENT and sent.at_mail:
                # The upstream will not take the bounce domain as a sender: a
                # setup problem of the relay, not the account's bounce.
                log.warning(
                    "verp_sender_refused",
                    queue_id=job.queue_id,
                    smtp_code=sent.code,
                    reply=sent.text[:200],
                )
                sent = (
                    await self._send(connection, job, job.mail_from, (rcpt,), content)
                )[0]
            outcomes.append(sent)
            if sent.code is None and sent.status in (_UNREACHABLE, _FAULT):
                # No connection: the others would fare the same now.
                outcomes.extend(
                    replace(sent, address=other)
                    for other in job.recipients[index + 1 :]
                )
                break
        return outcomes

    async def _send(
        self,
        connection: UpstreamConnection,
        job: Job,
        sender: str,
        recipients: Sequence[str],
        content: bytes,
    ) -> list[RecipientOutcome]:
        """One upstream transaction; a failure to connect or a fault is a
        temporary outcome for each recipient."""
        try:
            return await connection.send(
                sender, recipients, content, smtputf8=job.smtputf8
            )
        except TemporaryError as exc:
            return [
                RecipientOutcome(rcpt, Outcome.TEMPORARY, None, _UNREACHABLE, str(exc))
                for rcpt in recipients
            ]
        except Exception:
            # Counted as an attempt so that the schedule and the expiry still apply.
            log.exception("delivery_fault", queue_id=job.queue_id)
            await connection.close()
            return [
                RecipientOutcome(
                    rcpt, Outcome.TEMPORARY, None, _FAULT, "internal error"
                )
                for rcpt in recipients
            ]

    def _judge(
        self,
        job: Job,
        outcomes: Sequence[RecipientOutcome],
        content: bytes,
        attempt: int,
    ) -> tuple[AttemptRecord, str]:
        now = self._clock.now()
        cfg = self._settings.queue
        retry_at = next_attempt(
            now, attempt, job.expires_at, cfg.retry_schedule_seconds, cfg.retry_jitter
        )
        results: list[RecipientResult] = []
        events: list[Event] = []
        failures: list[FailedRecipient] = []
        pending = 0
        # The relay's own DSNs carry no account: they never count against the
        # account whose mail caused them. An account's own null-sender mail does.
        counted = job.account
        counts: dict[str, int] = {}
        for out in outcomes:
            if out.outcome is Outcome.DELIVERED:
                state = RecipientState.DELIVERED
            elif out.outcome is Outcome.PERMANENT:
                state = RecipientState.BOUNCED
            elif retry_at is None:
                state = RecipientState.EXPIRED
            else:
                state = RecipientState.PENDING
                pending += 1
            counts[state.value] = counts.get(state.value, 0) + 1
            self._metrics.delivery_recipients_total.labels(
                "deferred" if state is RecipientState.PENDING else state.value
            ).inc()
            results.append(
                RecipientResult(out.address, state, out.code, out.status, out.text)
            )
            if state in (RecipientState.BOUNCED, RecipientState.EXPIRED):
                bounce_type = (
                    BounceType.HARD
                    if state is RecipientState.BOUNCED
                    else BounceType.SOFT
                )
                events.append(
                    Event(
                        kind=EventKind.BOUNCE,
                        account=counted,
                        recipient=out.address,
                        occurred_at=now,
                        source="delivery",
                        queue_id=job.queue_id,
                        smtp_code=out.code,
                        status=out.status
                        if bounce_type is BounceType.HARD
                        else "4.4.7",
                        detail=out.text,
                        bounce_type=bounce_type,
                        dedup_key=f"delivery:{job.queue_id}:{out.address}",
                    )
                )
                self._metrics.bounces_total.labels(
                    job.account or "-", bounce_type.value
                ).inc()
                failures.append(
                    FailedRecipient(
                        address=out.address,
                        status=out.status
                        if state is RecipientState.BOUNCED
                        else "4.4.7",
                        diagnostic=(
                            f"{out.status} {out.text}"
                            if state is RecipientState.BOUNCED
                            else f"message expired after retrying: {out.text}"
                        ),
                        smtp_code=out.code,
                        remote_mta=self._settings.upstream.host if out.code else None,
                    )
                )
                log.info(
                    "recipient_bounced",
                    queue_id=job.queue_id,
                    account=job.account,
                    rcpt_domain=domain_of(out.address),
                    bounce_type=bounce_type.value,
                    smtp_code=out.code,
                    smtp_status=out.status,
                )
        followups = self._dsn(job, content, failures)
        record = AttemptRecord(
            queue_id=job.queue_id,
            results=tuple(results),
            attempted_at=now,
            next_attempt_at=retry_at if pending else None,
            last_error=None
            if not pending
            else next(
                (o.text for o in outcomes if o.outcome is Outcome.TEMPORARY), None
            ),
            events=tuple(events),
            followups=followups,
            sent=len(outcomes) - pending,
            account=counted,
        )
        if len(counts) > 1:
            result = "partial"
        else:
            result = {
                "delivered": "delivered",
                "pending": "deferred",
                "bounced": "bounced",
                "expired": "expired",
            }[next(iter(counts))]
        return record, result

    def _dsn(
        self,
        job: Job,
        content: bytes,
        failures: Sequence[FailedRecipient],
    ) -> tuple[NewMessage, ...]:
        dsn = self._queue.new_dsn(
            hostname=self._settings.hostname,
            account=job.account,
            mail_from=job.mail_from,
            content=content,
            queue_id=job.queue_id,
            arrival=job.received_at,
            failures=failures,
        )
        if dsn is None:
            return ()
        self._metrics.dsn_generated_total.inc()
        return (dsn,)
