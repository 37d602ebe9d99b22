"""The storage interface: role protocols and the records they exchange. No SQL.

Backends (``sqlite.py`` now, ``postgres.py`` later) implement :class:`Store`. Every
method may raise :class:`~storage.errors.StorageUnavailableError` or
:class:`~storage.errors.StorageFullError`; none raises a driver error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class RecipientState(StrEnum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"


class EventKind(StrEnum):
    """Kinds of per-recipient events the reputation counters read."""

    SENT = "sent"
    """Counted, never stored as a row: recipients the relay finished sending
    (accepted upstream, or bounced or expired at delivery)."""
    BOUNCE = "bounce"
    BLOCK = "block"
    """A recipient the relay itself refused (excluded, no consent, ...)."""
    UNSUBSCRIBE = "unsubscribe"
    COMPLAINT = "complaint"
    """An abuse or fraud report (ARF) about mail the account sent."""
    CLICK = "click"
    SPAMTRAP_HIT = "spamtrap_hit"


class BounceType(StrEnum):
    """A permanent refusal (hard), or a temporary one that outlived the message."""

    HARD = "hard"
    SOFT = "soft"


class SuppressionReason(StrEnum):
    """Why an address is on the exclusion list."""

    UNSUBSCRIBE = "unsubscribe"
    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE = "soft_bounce"
    COMPLAINT = "complaint"
    SPAMTRAP = "spamtrap"
    MANUAL = "manual"
    ERASURE = "erasure"


REFUSES_EVERY_CATEGORY = frozenset(
    {
        SuppressionReason.HARD_BOUNCE,
        SuppressionReason.COMPLAINT,
        SuppressionReason.SPAMTRAP,
    }
)
"""Reasons that refuse transactional mail too; the others refuse marketing only."""

NEVER_EXPIRES = frozenset({SuppressionReason.UNSUBSCRIBE, SuppressionReason.COMPLAINT})
"""Reasons whose entries may not carry an expiry."""


@dataclass(frozen=True, slots=True)
class Suppression:
    """One exclusion-list entry; ``(address, account, reason)`` identifies it."""

    address: str
    """Canonical form (``storage.addresses.canonical_address``)."""
    account: str | None
    """The account it applies to; ``None`` for every account (global)."""
    reason: SuppressionReason
    source: str
    """Where it came from: ``cli``, ``api``, ``import``, ``bounce``, ... (free text)."""
    created_at: datetime
    note: str = ""
    expires_at: datetime | None = None

    def active(self, now: datetime) -> bool:
        """True while the entry has not expired."""
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class SuppressionRemoval:
    """The audit record of one removed entry: who, when and why."""

    address: str
    account: str | None
    reason: SuppressionReason
    removed_by: str
    removed_at: datetime
    why: str


class OptInType(StrEnum):
    """How consent was collected, weakest first."""

    SINGLE = "single"
    CONFIRMED = "confirmed"
    DOUBLE = "double"

    @property
    def rank(self) -> int:
        """0 for single, 1 for confirmed, 2 for double."""
        return list(OptInType).index(self)


class ConsentSource(StrEnum):
    """Where consent was collected."""

    NEWSLETTER = "newsletter"
    PURCHASE = "purchase"
    SWEEPSTAKES = "sweepstakes"
    EVENT = "event"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """The proof of consent one account holds for one address."""

    account: str
    address: str
    """Canonical form."""
    collected_at: datetime
    source: ConsentSource
    opt_in: OptInType
    collection_url: str = ""
    ip: str = ""
    confirmed_at: datetime | None = None
    statement: str = ""
    """The wording the person agreed to."""
    relationship: str = ""
    """For existing customers: the relationship (e.g. "customer since 2021")."""
    recorded_at: datetime | None = None
    """When the relay stored it (set by the store)."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message accepted by the relay, to be made durable before the 250."""

    queue_id: str
    account: str | None
    """The sending account; ``None`` for mail the relay generates itself (DSNs)."""
    mail_from: str
    """Canonical envelope sender; ``""`` is the null sender."""
    recipients: tuple[str, ...]
    content: bytes
    received_at: datetime
    expires_at: datetime
    smtputf8: bool = False
    tracked: bool = False
    """Keep a :class:`SentMessage` row, so feedback can be traced back to it."""
    message_id: str | None = None
    """The Message-ID header (``<...>``), kept with the tracking row."""
    kind: str | None = None
    """``marketing`` or ``transactional`` (kept with the tracking row)."""

    @property
    def generated(self) -> bool:
        """True for mail the relay wrote itself (it counts against no account)."""
        return self.account is None


@dataclass(frozen=True, slots=True)
class SentMessage:
    """What the relay keeps of an account's message to trace feedback back to it
    (VERP tokens, ``X-Relay-Id``, Message-ID), for the reputation window."""

    queue_id: str
    account: str
    message_id: str | None
    recipients: tuple[str, ...]
    received_at: datetime
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class KeptFeedback:
    """Feedback mail the relay could not read or attribute, kept for inspection."""

    id: int
    received_at: datetime
    kind: str
    reason: str
    mail_from: str
    recipient: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message in the queue with the recipients still pending."""

    queue_id: str
    account: str | None
    mail_from: str
    recipients: tuple[str, ...]
    received_at: datetime
    expires_at: datetime
    next_attempt_at: datetime
    attempts: int
    size_bytes: int
    smtputf8: bool
    last_error: str | None


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What became of one recipient after a delivery attempt."""

    address: str
    state: RecipientState
    smtp_code: int | None = None
    status: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One per-recipient event (a bounce, a send), kept for the reputation counters."""

    kind: EventKind
    account: str | None
    recipient: str
    occurred_at: datetime
    source: str
    queue_id: str | None = None
    smtp_code: int | None = None
    status: str | None = None
    detail: str | None = None
    bounce_type: BounceType | None = None
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """Everything one delivery attempt changes, written in one transaction.

    ``next_attempt_at`` is ``None`` when no recipient is left pending; the message
    then leaves the queue. ``followups`` are messages the attempt produced (DSNs).
    """

    queue_id: str
    results: tuple[RecipientResult, ...]
    attempted_at: datetime
    next_attempt_at: datetime | None
    last_error: str | None = None
    events: tuple[Event, ...] = ()
    followups: tuple[NewMessage, ...] = ()
    sent: int = 0
    """Recipients this attempt finished for ``account`` (the ``sent`` counter)."""
    account: str | None = None
    """The account the attempt counts for; ``None`` for mail the relay itself
    generated (DSNs), which never counts against an account."""


@dataclass(frozen=True, slots=True)
class CounterBucket:
    """How many events of one kind an account had in one hour."""

    account: str
    hour: int
    """Unix time // 3600."""
    kind: EventKind
    count: int


class AccountState(StrEnum):
    """Where an account stands; ``ok`` accounts have no stored state."""

    OK = "ok"
    WARNING = "warning"
    THROTTLED = "throttled"
    SUSPENDED = "suspended"


@dataclass(frozen=True, slots=True)
class AccountStanding:
    """An account's current state, why, and since when."""

    account: str
    state: AccountState
    reason: str
    statistic: str | None
    changed_at: datetime
    changed_by: str
    """``relay`` for an automatic change, else who the operator said they are."""
    judged_from: datetime | None = None
    """Rates count only the hours after this (set by a reinstatement)."""


@dataclass(frozen=True, slots=True)
class AccountStateChange:
    """One change of an account's state (the audit trail)."""

    account: str
    old_state: AccountState
    new_state: AccountState
    reason: str
    statistic: str | None
    changed_at: datetime
    changed_by: str


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Queue depth and age, for the metrics."""

    messages: int
    recipients: int
    oldest_received_at: datetime | None


class QueueStore(Protocol):
    """The durable queue.

    ``enqueue`` returns only once the message and its recipients are durable (the
    caller answers 250 after it and never before). Concurrent calls share commits.
    The caller owns leasing: it never hands the same queue id to two workers.
    """

    async def enqueue(
        self, *messages: NewMessage, events: Sequence[Event] = ()
    ) -> None:
        """Make every message (and the events) durable in one transaction, or
        raise StorageFullError / StorageUnavailableError."""
        ...

    async def due(self, now: datetime, limit: int) -> list[QueuedMessage]:
        """Messages whose next attempt is due at ``now``, oldest first."""
        ...

    async def content(self, queue_id: str) -> bytes | None:
        """The stored message, or ``None`` once it has left the queue."""
        ...

    async def record_attempt(self, record: AttemptRecord) -> None:
        """Apply one attempt's results, events and follow-up messages atomically."""
        ...

    async def record_attempts(self, records: Sequence[AttemptRecord]) -> None:
        """Apply several attempts atomically, in one write."""
        ...

    async def list_messages(self, limit: int = 1000) -> list[QueuedMessage]:
        """Every queued message (up to ``limit``), oldest first."""
        ...

    async def get_message(self, queue_id: str) -> QueuedMessage | None:
        """One queued message, or ``None``."""
        ...

    async def retry_now(self, queue_id: str, now: datetime) -> bool:
        """Make the message due at once; False if it is not queued."""
        ...

    async def delete(self, queue_id: str) -> bool:
        """Remove the message without delivering it; False if it is not queued."""
        ...

    async def stats(self) -> QueueStats:
        """Current queue depth and oldest message."""
        ...


class EventStore(Protocol):
    """Per-recipient events, deduplicated on ``dedup_key``."""

    async def events(
        self,
        kind: EventKind | None = None,
        account: str | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        """Recorded events, newest first."""
        ...

    async def add_events(self, events: Sequence[Event]) -> list[Event]:
        """Record events durably (one commit) and count them (``counter_buckets``);
        a repeated ``dedup_key`` is neither stored nor counted again. Returns the
        events that were new."""
        ...


class CounterStore(Protocol):
    """The reputation counters: events per account, hour and kind."""

    async def counter_buckets(self, since_hour: int) -> list[CounterBucket]:
        """Every bucket from ``since_hour`` on."""
        ...

    async def add_counts(self, buckets: Sequence[CounterBucket]) -> None:
        """Add each bucket's count to the stored one."""
        ...

    async def prune_counters(self, before_hour: int) -> int:
        """Forget buckets older than ``before_hour``; returns how many."""
        ...

    async def close_hour(self, account: str, hour: int) -> None:
        """Move the account's counts of ``hour`` into the hour before (counts
        from now on start a fresh bucket: a reinstatement)."""
        ...


class FeedbackStore(Protocol):
    """What traces feedback to its mail, and feedback kept for inspection."""

    async def sent_message(self, queue_id: str) -> SentMessage | None:
        """The tracking row of ``queue_id`` (one primary-key lookup)."""
        ...

    async def sent_messages_with_id(self, message_id: str) -> list[SentMessage]:
        """The tracking rows whose Message-ID is ``message_id`` (indexed)."""
        ...

    async def prune_sent_messages(self, before: datetime) -> int:
        """Forget tracking rows received before ``before``; returns how many."""
        ...

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
        """Keep feedback mail the relay could not read or attribute (the oldest
        beyond the newest MAX_KEPT_FEEDBACK go); returns its id."""
        ...

    async def unattributed(self, limit: int = 100) -> list[KeptFeedback]:
        """Kept feedback, newest first."""
        ...

    async def unattributed_content(self, feedback_id: int) -> bytes | None:
        """The mail as received, or ``None`` if there is no such id."""
        ...

    async def unattributed_count(self) -> int:
        """How many pieces of feedback are kept."""
        ...


class AccountStateStore(Protocol):
    """Account states and their audit trail."""

    async def account_standings(self) -> list[AccountStanding]:
        """Every account with a stored state."""
        ...

    async def change_account_state(
        self, standing: AccountStanding, old_state: AccountState
    ) -> None:
        """Store ``standing`` and its audit record in one transaction."""
        ...

    async def account_state_changes(
        self, account: str, limit: int = 20
    ) -> list[AccountStateChange]:
        """The account's changes, newest first."""
        ...


class SpamtrapStore(Protocol):
    """Spamtrap addresses."""

    async def add_spamtraps(
        self, addresses: Sequence[str], source: str, now: datetime
    ) -> int:
        """Add canonical addresses in one transaction; returns how many are new."""
        ...

    async def is_spamtrap(self, address: str) -> bool:
        """One indexed lookup."""
        ...

    async def count_spamtraps(self) -> int:
        """How many traps are listed."""
        ...


class SuppressionStore(Protocol):
    """The exclusion list, global or per account, with audited removals."""

    async def add_suppressions(self, entries: Sequence[Suppression]) -> int:
        """Write every entry in one transaction (all or none); an entry with the
        same address, account and reason is replaced. Returns the count written."""
        ...

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
        """Remove the entries for ``address`` in that scope (one reason, or all),
        each with an audit record; returns what was removed."""
        ...

    async def suppressions_for(
        self, address: str, account: str, now: datetime
    ) -> list[Suppression]:
        """Active entries that apply to ``address`` sent by ``account`` (global ones
        and the account's own): one indexed lookup."""
        ...

    async def list_suppressions(
        self,
        *,
        account: str | None = None,
        reason: SuppressionReason | None = None,
        after: tuple[str, str, str] | None = None,
        limit: int = 1000,
    ) -> list[Suppression]:
        """Entries ordered by (address, account or "", reason), after that key;
        ``account`` filters to one account's entries (global ones excluded)."""
        ...

    async def count_suppressions(self) -> int:
        """Number of entries, expired ones included."""
        ...

    async def suppression_removals(
        self, address: str | None = None, limit: int = 100
    ) -> list[SuppressionRemoval]:
        """Audit records, newest first."""
        ...


class ConsentStore(Protocol):
    """The consent ledger: one record per account and address."""

    async def add_consents(self, records: Sequence[ConsentRecord]) -> int:
        """Write every record in one transaction (all or none), replacing the
        record for the same account and address. Returns the count written."""
        ...

    async def consent_for(self, account: str, address: str) -> ConsentRecord | None:
        """The record ``account`` holds for ``address``."""
        ...

    async def consents_of(self, address: str) -> list[ConsentRecord]:
        """Every account's record for ``address``, by account name."""
        ...


class Store(
    QueueStore,
    EventStore,
    CounterStore,
    AccountStateStore,
    SpamtrapStore,
    FeedbackStore,
    SuppressionStore,
    ConsentStore,
    Protocol,
):
    """Everything the relay keeps, behind one object with a lifetime."""

    async def open(self) -> None:
        """Connect, migrate and get ready; raise StorageUnavailableError on failure."""
        ...

    async def close(self) -> None:
        """Flush pending writes and release every resource."""
        ...

    async def free_space_ok(self) -> bool:
        """False when the disk is below the configured minimum of free space."""
        ...


__all__: Sequence[str] = [
    "NEVER_EXPIRES",
    "REFUSES_EVERY_CATEGORY",
    "AccountStanding",
    "AccountState",
    "AccountStateChange",
    "AccountStateStore",
    "AttemptRecord",
    "BounceType",
    "ConsentRecord",
    "ConsentSource",
    "ConsentStore",
    "CounterBucket",
    "CounterStore",
    "Event",
    "EventKind",
    "EventStore",
    "FeedbackStore",
    "KeptFeedback",
    "NewMessage",
    "OptInType",
    "QueueStats",
    "QueueStore",
    "QueuedMessage",
    "RecipientResult",
    "RecipientState",
    "SentMessage",
    "SpamtrapStore",
    "Store",
    "Suppression",
    "SuppressionReason",
    "SuppressionRemoval",
    "SuppressionStore",
]
