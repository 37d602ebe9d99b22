"""Takes in feedback and turns it into events and exclusion-list entries.

Feedback is: one-click and page unsubscribes (``/unsubscribe/<token>``), events the
mailer's own tracking posts to ``/api/events`` (clicks, unsubscribes, complaints,
bounces), bounces at delivery, and (:mod:`relay.feedback_mail`) DSNs and ARF
reports mailed to the relay. Every piece becomes an :class:`~storage.base.Event`
with a de-duplication key, so the same unsubscribe, report or click arriving twice
counts once; new events go to the account's counters (:mod:`relay.accounts`).

Automatic exclusion, at once: an unsubscribe excludes the address from the
account's marketing mail (the exclusion is written before the event, so the next
RCPT already sees it); a complaint excludes it from everything the account sends;
a hard bounce of the address itself (:func:`relay.feedback_reports.
is_recipient_hard_bounce`: 5.1.x, 5.2.1, "user unknown"...) excludes it for every
account; a spamtrap hit is the spamtrap list's business, not the exclusion list's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from relay.accounts import Accounts
from relay.clock import Clock
from relay.feedback_reports import is_recipient_hard_bounce
from relay.list_unsubscribe import UNSUBSCRIBE
from relay.tokens import InvalidTokenError, TokenSigner
from storage.base import (
    AttemptRecord,
    BounceType,
    Event,
    EventKind,
    Store,
    Suppression,
    SuppressionReason,
)
from storage.errors import StorageError

log = structlog.get_logger(__name__)

TOKEN_MAX_AGE_DAYS = 400
"""How long an unsubscribe link keeps working (a year of old newsletters, and
more than the 30 days CAN-SPAM asks for)."""
MAX_OTHER_ADDRESSES = 10
"""Other addresses a person may add on the unsubscribe page at once."""


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """The result of an unsubscribe: who, from which account, and whether new."""

    account: str
    recipient: str
    new: bool


class Feedback:
    """Records feedback as events and exclusions, and tells the counters."""

    def __init__(
        self,
        store: Store,
        accounts: Accounts,
        clock: Clock,
        signer: TokenSigner | None,
    ) -> None:
        self._store = store
        self._accounts = accounts
        self._clock = clock
        self._signer = signer
        self._tasks: set[asyncio.Task[None]] = set()

    def set_signer(self, signer: TokenSigner | None) -> None:
        """Check tokens with a new secret from now on (a reload)."""
        self._signer = signer

    @property
    def accepts_tokens(self) -> bool:
        """True when ``[feedback] secret`` is set (tokens can be checked)."""
        return self._signer is not None

    # -- unsubscribes --------------------------------------------------------------

    def read_token(self, token: str) -> tuple[str, str, str]:
        """(account, recipient, message id) of a genuine unsubscribe token;
        raise InvalidTokenError for anything else."""
        if self._signer is None:
            raise InvalidTokenError("unsubscribe links are not enabled here")
        fields = self._signer.verify(
            UNSUBSCRIBE,
            token,
            now=self._clock.now(),
            max_age_days=TOKEN_MAX_AGE_DAYS,
        )
        if len(fields) != 3:
            raise InvalidTokenError("malformed token")
        account, recipient, message_id = fields
        return account, recipient, message_id

    async def unsubscribe_token(
        self, token: str, source: str, others: Sequence[str] = ()
    ) -> Unsubscribed:
        """Unsubscribe the token's recipient (and ``others``, canonical addresses
        of the same person) from the token's account."""
        account, recipient, message_id = self.read_token(token)
        done = await self.unsubscribe(account, recipient, message_id, source)
        extra = [a for a in others if a != recipient][:MAX_OTHER_ADDRESSES]
        if extra:
            await self._exclude(
                [
                    self._entry(address, account, SuppressionReason.UNSUBSCRIBE, source)
                    for address in extra
                ]
            )
            log.info("unsubscribed_other_addresses", account=account, count=len(extra))
        return done

    async def unsubscribe(
        self, account: str, recipient: str, reference: str, source: str
    ) -> Unsubscribed:
        """Exclude ``recipient`` from ``account``'s marketing mail, then count it."""
        now = self._clock.now()
        await self._exclude(
            [self._entry(recipient, account, SuppressionReason.UNSUBSCRIBE, source)]
        )
        event = Event(
            kind=EventKind.UNSUBSCRIBE,
            account=account,
            recipient=recipient,
            occurred_at=now,
            source=source,
            queue_id=reference or None,
            # One person leaving one account counts once, from whichever message.
            dedup_key=f"unsubscribe:{account}:{recipient}",
        )
        new = await self._store.add_events([event])
        self._accounts.recorded(new)
        log.info(
            "unsubscribed",
            account=account,
            source=source,
            duplicate=not new,
        )
        return Unsubscribed(account, recipient, bool(new))

    # -- any event -----------------------------------------------------------------

    async def record(
        self, events: Sequence[Event], *, exclude: bool = True
    ) -> list[Event]:
        """Store ``events`` (duplicates ignored), exclude what they call for
        (unless ``exclude`` is False: the source does not prove the recipient),
        count the new ones. Exclusions are written first."""
        exclusions = [
            entry
            for event in events
            if exclude and (entry := self._exclusion_for(event)) is not None
        ]
        await self._exclude(exclusions)
        new = await self._store.add_events(events)
        self._accounts.recorded(new)
        return new

    def _exclusion_for(self, event: Event) -> Suppression | None:
        if event.account is None or not event.recipient:
            return None  # a report that names no recipient excludes nobody
        if event.kind is EventKind.UNSUBSCRIBE:
            return self._entry(
                event.recipient,
                event.account,
                SuppressionReason.UNSUBSCRIBE,
                event.source,
            )
        if event.kind is EventKind.COMPLAINT:
            return self._entry(
                event.recipient,
                event.account,
                SuppressionReason.COMPLAINT,
                event.source,
            )
        if (
            event.kind is EventKind.BOUNCE
            and event.bounce_type is BounceType.HARD
            and is_recipient_hard_bounce(event.status, event.detail)
        ):
            return self._entry(
                event.recipient, None, SuppressionReason.HARD_BOUNCE, event.source
            )
        return None

    # -- delivery ------------------------------------------------------------------

    def attempts_recorded(self, records: Sequence[AttemptRecord]) -> None:
        """The queue committed these attempts: count them, exclude hard bounces."""
        self._accounts.attempts_recorded(records)
        entries = [
            entry
            for record in records
            for event in record.events
            if (entry := self._exclusion_for(event)) is not None
        ]
        if entries:
            task = asyncio.get_running_loop().create_task(self._exclude_logged(entries))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Wait (briefly) for exclusions still being written."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _exclude_logged(self, entries: list[Suppression]) -> None:
        try:
            await self._exclude(entries)
        except StorageError:
            log.exception("hard_bounce_exclusion_failed", count=len(entries))

    # -- helpers -------------------------------------------------------------------

    async def _exclude(self, entries: list[Suppression]) -> None:
        if entries:
            await self._store.add_suppressions(entries)
            for entry in entries:
                log.info(
                    "address_excluded",
                    reason=entry.reason.value,
                    account=entry.account,
                    source=entry.source,
                )

    def _entry(
        self,
        address: str,
        account: str | None,
        reason: SuppressionReason,
        source: str,
    ) -> Suppression:
        return Suppression(
            address=address,
            account=account,
            reason=reason,
            source=source[:200],
            created_at=self._now(),
            note="",
            expires_at=None,
        )

    def _now(self) -> datetime:
        return self._clock.now()
