"""Feedback that arrives by mail: bounces, abuse reports, mailto unsubscribes.

Mail for the relay itself is taken without AUTH, and only for three kinds of
address (everything else still needs an account):

- ``anything@<[feedback] bounce_domain>``: a bounce (RFC 3464 DSN, or Postfix,
  qmail, Exim and other plain-text formats). The VERP token of the address names
  the message and the recipient; without one, the ``X-Relay-Id`` or Message-ID of
  the returned headers names the message, and the report's recipients that the
  message had are taken. Each failed recipient is a ``bounce`` event (hard for a
  5.x.x status, soft for 4.x.x); ``delayed`` and ``delivered`` notices count
  nothing.
- ``[feedback] fbl_address``: an abuse report (ARF, RFC 5965), attributed by the
  VERP token of its Original-Mail-From or returned Return-Path, by
  ``X-Relay-Id``, or by Message-ID. ``abuse`` and ``fraud`` reports are
  ``complaint`` events; other types (``not-spam``, ``virus``...) are logged only.
  When the consent ledger is in use (the ``consent`` check is configured), a
  complaint from a recipient the account holds no consent record for is
  unjustified mail: it also counts as a ``spamtrap_hit``.
- ``[feedback] unsubscribe_mailto``: the Subject (or the first lines of the body)
  carries ``unsubscribe <token>`` from the relay's List-Unsubscribe.

Reports are parsed off the event loop (:mod:`relay.feedback_reports`). Mail that
cannot be read or attributed is kept in the store for inspection
(``relay feedback list``) and logged, never dropped. Events are deduplicated by
message and recipient, so a report that arrives twice counts once. Each client
IP may send ``[feedback] intake_rate`` messages; above it the answer is
``451 4.7.1`` and the sender retries later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

import structlog

from config.models import FeedbackConfig
from policies.base import MessageKind
from relay import replies
from relay.accounts import TokenBucket
from relay.clock import Clock
from relay.feedback import Feedback
from relay.feedback_reports import (
    Action,
    BounceRecipient,
    BounceReport,
    ComplaintReport,
    OriginalHeaders,
    ReportError,
    decode_words,
    parse_bounce,
    parse_complaint,
)
from relay.metrics import Metrics
from relay.replies import SmtpReply
from relay.tokens import InvalidTokenError
from relay.tracking import TokenError, Tracker, message_id_key
from storage.base import BounceType, Event, EventKind, SentMessage, Store
from storage.errors import StorageError

log = structlog.get_logger(__name__)

MAX_KEPT_BYTES = 64 * 1024
"""Of feedback kept for inspection, this much is kept (reports are small; a
bounce that returns a whole large message is not)."""
_MAX_PEERS = 10_000
"""Client IPs whose intake allowance is remembered (least recently seen go)."""
_UNSUBSCRIBE = re.compile(r"(?i)\bunsubscribe[ \t]+([A-Za-z0-9_.=-]{8,2048})")
_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)")
_HEAD_SCAN = 64 * 1024
_BODY_SCAN = 4096


class Channel(StrEnum):
    """Which kind of feedback a recipient address takes."""

    DSN = "dsn"
    ARF = "arf"
    MAILTO = "mailto"


@dataclass(frozen=True, slots=True)
class _Traced:
    """Feedback traced to one message of an account (and maybe a recipient)."""

    sent: SentMessage
    recipient: str | None
    by: str  # verp, x-relay-id, message-id


RECORDED = SmtpReply(250, "2.0.0", "Feedback recorded, thank you")
KEPT = SmtpReply(250, "2.0.0", "Feedback kept for inspection")
IGNORED = SmtpReply(250, "2.0.0", "Feedback received; nothing to record")
UNSUBSCRIBED = SmtpReply(250, "2.0.0", "Unsubscribed")
INTAKE_BUSY = SmtpReply(
    451, "4.7.1", "Too much feedback from your address; try again later"
)
NO_TOKEN = SmtpReply(
    550,
    "5.7.1",
    "No valid unsubscribe token in the Subject; nothing was changed "
    "(use the address from the List-Unsubscribe header as it is)",
)


class FeedbackMail:
    """Reads feedback mail, traces it to its account and records it."""

    def __init__(
        self,
        config: FeedbackConfig,
        feedback: Feedback,
        store: Store,
        known_accounts: Callable[[], Iterable[str]],
        clock: Clock,
        metrics: Metrics,
        ledger_in_use: Callable[[], bool] = lambda: False,
    ) -> None:
        self._feedback = feedback
        self._store = store
        self._known_accounts = known_accounts
        self._ledger_in_use = ledger_in_use
        self._clock = clock
        self._metrics = metrics
        self._peers: OrderedDict[str, TokenBucket] = OrderedDict()
        self.configure(config)

    def configure(self, config: FeedbackConfig) -> None:
        """Use a new ``[feedback]`` section (a reload)."""
        self._config = config
        secret = config.secret
        self.tracker = (
            Tracker(secret.get_secret_value(), config.bounce_domain)
            if secret is not None and config.tracks
            else None
        )
        self._peers.clear()

    @property
    def enabled(self) -> bool:
        """True if any feedback address is configured."""
        return self._config.intake

    def channel_for(self, recipient: str) -> Channel | None:
        """The feedback channel of a canonical recipient address, if it is one."""
        config = self._config
        if config.unsubscribe_mailto is not None and _same(
            recipient, config.unsubscribe_mailto
        ):
            return Channel.MAILTO
        if config.fbl_address is not None and _same(recipient, config.fbl_address):
            return Channel.ARF
        if (
            config.bounce_domain is not None
            and recipient.rpartition("@")[2] == config.bounce_domain
        ):
            return Channel.DSN
        return None

    def admit(self, peer_ip: str) -> SmtpReply | None:
        """``None`` if ``peer_ip`` may send another feedback message now."""
        now = time.monotonic()
        peer = _network_of(peer_ip)
        bucket = self._peers.get(peer)
        if bucket is None:
            bucket = TokenBucket(self._config.intake_rate, now)
            self._peers[peer] = bucket
            if len(self._peers) > _MAX_PEERS:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer)
        if bucket.take(now):
            return None
        self._metrics.feedback_received_total.labels("smtp", "refused").inc()
        log.warning("feedback_intake_limited", peer_ip=peer_ip)
        return INTAKE_BUSY

    async def receive(
        self,
        channel: Channel,
        mail_from: str,
        recipients: tuple[str, ...],
        content: bytes,
    ) -> SmtpReply:
        """Read, trace and record one feedback message; the reply for DATA.

        A store failure answers ``451 4.3.0`` (the sender retries); anything
        else the relay cannot use is kept and answered 250.
        """
        try:
            if channel is Channel.MAILTO:
                return await self._mailto(content)
            if channel is Channel.DSN:
                return await self._bounce(mail_from, recipients, content)
            return await self._complaint(mail_from, recipients, content)
        except StorageError as exc:
            return self._not_stored(channel, exc)
        except Exception:
            # A fault of the relay's own: keep the mail rather than have the
            # sender retry (and fail) for days.
            log.exception("feedback_fault", channel=channel.value)
            try:
                return await self._keep(
                    channel, "internal error reading it", mail_from, recipients, content
                )
            except StorageError as exc:
                return self._not_stored(channel, exc)

    def _not_stored(self, channel: Channel, exc: StorageError) -> SmtpReply:
        self._metrics.storage_errors_total.labels("unavailable").inc()
        self._count(channel, "error")
        log.warning("feedback_not_recorded", channel=channel.value, error=str(exc))
        return replies.STORAGE_UNAVAILABLE

    # -- bounces -------------------------------------------------------------------

    async def _bounce(
        self, mail_from: str, recipients: tuple[str, ...], content: bytes
    ) -> SmtpReply:
        try:
            report = await asyncio.to_thread(parse_bounce, content)
        except ReportError as exc:
            return await self._keep(
                Channel.DSN, f"unreadable: {exc.reason}", mail_from, recipients, content
            )
        failed = [r for r in report.recipients if r.action is Action.FAILED]
        if not failed:
            self._count(Channel.DSN, "ignored")
            log.info(
                "bounce_ignored",
                actions=sorted({r.action.value for r in report.recipients}),
            )
            return IGNORED
        traced = await self._trace_bounce(recipients, report)
        if isinstance(traced, str):
            return await self._keep(Channel.DSN, traced, mail_from, recipients, content)
        now = self._clock.now()
        events = [
            _bounce_event(trace, recipient, entry, now)
            for trace, recipient, entry in traced
        ]
        # Only a VERP token proves which recipient bounced (its MAC covers the
        # address): a bounce traced by its headers counts for the account, but
        # excludes nobody.
        by = traced[0][0].by
        return await self._record(Channel.DSN, events, by, exclude=by == "verp")

    async def _trace_bounce(
        self, recipients: tuple[str, ...], report: BounceReport
    ) -> list[tuple[_Traced, str, BounceRecipient]] | str:
        """(trace, recipient, report entry) per failed recipient, or why not."""
        failed = [r for r in report.recipients if r.action is Action.FAILED]
        original = report.original or OriginalHeaders()
        why: list[str] = []
        trace = await self._first_verp((*recipients, original.return_path), why)
        if trace is not None and trace.recipient is not None:
            # The token names the recipient; the report says what happened.
            entry = next(
                (r for r in failed if trace.recipient in _addresses(r)), failed[0]
            )
            return [(trace, trace.recipient, entry)]
        found = await self._by_message(original, why)
        for sent, by in found:
            # Without VERP, anyone who saw the message could name any of its
            # recipients: only a copy for a single recipient says who it was.
            if len(sent.recipients) != 1:
                continue
            recipient = sent.recipients[0]
            named = next((r for r in failed if recipient in _addresses(r)), None)
            if named is not None:
                return [(_Traced(sent, recipient, by), recipient, named)]
        if found:
            why.append("the traced message had several recipients, or not the report's")
        return "; ".join(dict.fromkeys(why))

    # -- complaints ----------------------------------------------------------------

    async def _complaint(
        self, mail_from: str, recipients: tuple[str, ...], content: bytes
    ) -> SmtpReply:
        try:
            report = await asyncio.to_thread(parse_complaint, content)
        except ReportError as exc:
            return await self._keep(
                Channel.ARF, f"unreadable: {exc.reason}", mail_from, recipients, content
            )
        if not report.counts_as_complaint:
            self._count(Channel.ARF, "ignored")
            log.info("report_ignored", feedback_type=report.feedback_type)
            return IGNORED
        trace = await self._trace_complaint(recipients, report)
        if isinstance(trace, str):
            return await self._keep(Channel.ARF, trace, mail_from, recipients, content)
        sent = trace.sent
        # A report without its recipient counts once per copy of the message:
        # anyone who saw the message could send any number of them.
        who = trace.recipient or "?"
        event = Event(
            kind=EventKind.COMPLAINT,
            account=sent.account,
            recipient=trace.recipient or "",
            occurred_at=self._clock.now(),
            source="arf",
            queue_id=sent.queue_id,
            detail=report.feedback_type,
            dedup_key=f"arf:{sent.queue_id}:{who}",
        )
        events = [event]
        if await self._unjustified(sent, trace.recipient):
            # The sending policy counts it with the spamtrap hits.
            events.append(
                replace(
                    event,
                    kind=EventKind.SPAMTRAP_HIT,
                    detail="abuse complaint without a consent record",
                    dedup_key=f"unjustified:{sent.queue_id}:{who}",
                )
            )
        return await self._record(Channel.ARF, events, trace.by)

    async def _unjustified(self, sent: SentMessage, recipient: str | None) -> bool:
        """True for a complaint about marketing mail from a recipient the account
        holds no record for (neither consent nor a customer relationship), when
        the consent ledger is in use (the ``consent`` check is configured);
        without the ledger no complaint can be judged so."""
        if (
            recipient is None
            or sent.kind != MessageKind.MARKETING
            or not self._ledger_in_use()
        ):
            return False
        return await self._store.consent_for(sent.account, recipient) is None

    async def _trace_complaint(
        self, recipients: tuple[str, ...], report: ComplaintReport
    ) -> _Traced | str:
        original = report.original or OriginalHeaders()
        why: list[str] = []
        trace = await self._first_verp(
            (report.original_mail_from, original.return_path, *recipients), why
        )
        if trace is not None:
            return trace
        found = await self._by_message(original, why)
        if not found:
            return "; ".join(dict.fromkeys(why))
        for sent, by in found:
            # Only a copy for a single recipient says who complained: a report
            # could name any recipient of a message its sender saw.
            if len(sent.recipients) == 1:
                return _Traced(sent, sent.recipients[0], by)
        # The account is known, the recipient redacted: it still counts.
        sent, by = found[0]
        return _Traced(sent, None, by)

    # -- tracing -------------------------------------------------------------------

    async def _first_verp(
        self, addresses: Iterable[str | None], why: list[str]
    ) -> _Traced | None:
        """The trace of the first VERP address that traces; adds to ``why`` for
        each token that does not."""
        tracker = self.tracker
        if tracker is None:
            return None
        for address in addresses:
            token = tracker.token_in(address)
            if token is None:
                continue
            try:
                reference = tracker.read(token, self._clock.now().date())
            except TokenError as exc:
                why.append(f"VERP token: {exc}")
                continue
            sent = await self._store.sent_message(reference.queue_id)
            recipient = tracker.recipient(reference, sent) if sent is not None else None
            if sent is None:
                why.append("VERP token of a message the relay no longer knows")
            elif recipient is None:
                why.append("VERP token does not match (forged, or another relay's)")
            elif sent.account not in set(self._known_accounts()):
                why.append(f"account {sent.account!r} is not configured")
            else:
                return _Traced(sent, recipient, "verp")
        return None

    async def _by_message(
        self, original: OriginalHeaders, why: list[str]
    ) -> list[tuple[SentMessage, str]]:
        """The messages the returned headers name: by X-Relay-Id, else by
        Message-ID; adds to ``why`` when none."""
        tracker = self.tracker
        known = set(self._known_accounts())
        if tracker is not None and original.relay_id:
            try:
                reference = tracker.read(original.relay_id, self._clock.now().date())
            except TokenError as exc:
                why.append(f"X-Relay-Id: {exc}")
            else:
                sent = await self._store.sent_message(reference.queue_id)
                if sent is None or not tracker.names_message(reference, sent):
                    why.append("X-Relay-Id of no message the relay knows")
                elif sent.account not in known:
                    why.append(f"account {sent.account!r} is not configured")
                else:
                    return [(sent, "x-relay-id")]
        key = message_id_key(original.message_id)
        if key is None:
            why.append("no Message-ID to trace it by")
            return []
        found = [
            (sent, "message-id")
            for sent in await self._store.sent_messages_with_id(key)
            if sent.account in known
        ]
        if not found:
            why.append("Message-ID of no message the relay knows")
        return found

    # -- unsubscribes --------------------------------------------------------------

    async def _mailto(self, content: bytes) -> SmtpReply:
        end = content.find(b"\r\n\r\n", 0, _HEAD_SCAN)
        head = content[: end if end >= 0 else _HEAD_SCAN]
        subject = _SUBJECT.search(head)
        candidates = [_decoded(subject.group(1))] if subject is not None else []
        if end >= 0:
            body = content[end + 4 : end + 4 + _BODY_SCAN]
            candidates.append(body.decode("utf-8", "replace"))
        for text in candidates:
            for match in _UNSUBSCRIBE.finditer(text):
                try:
                    done = await self._feedback.unsubscribe_token(
                        match.group(1), "mailto"
                    )
                except InvalidTokenError as exc:
                    log.info("unsubscribe_refused", channel="mailto", reason=str(exc))
                    continue
                self._count(Channel.MAILTO, "recorded" if done.new else "duplicate")
                return UNSUBSCRIBED
        self._count(Channel.MAILTO, "invalid")
        return NO_TOKEN

    # -- recording -----------------------------------------------------------------

    async def _record(
        self, channel: Channel, events: list[Event], by: str, *, exclude: bool = True
    ) -> SmtpReply:
        new = await self._feedback.record(events, exclude=exclude)
        self._count(channel, "recorded" if new else "duplicate")
        for event in events:
            log.info(
                "feedback_recorded",
                channel=channel.value,
                kind=event.kind.value,
                account=event.account,
                queue_id=event.queue_id,
                status=event.status,
                traced_by=by,
                duplicate=event not in new,
            )
        return RECORDED

    async def _keep(
        self,
        channel: Channel,
        reason: str,
        mail_from: str,
        recipients: tuple[str, ...],
        content: bytes,
    ) -> SmtpReply:
        if len(content) > MAX_KEPT_BYTES:
            kib = MAX_KEPT_BYTES // 1024
            reason = f"{reason} (first {kib} KiB of {len(content)} bytes kept)"
        kept = await self._store.keep_unattributed(
            kind=channel.value,
            reason=reason,
            mail_from=mail_from,
            recipient=",".join(recipients),
            content=content[:MAX_KEPT_BYTES],
            now=self._clock.now(),
        )
        self._count(channel, "unattributed")
        log.warning(
            "feedback_unattributed",
            channel=channel.value,
            reason=reason,
            kept_id=kept,
            size=len(content),
        )
        return KEPT

    def _count(self, channel: Channel, result: str) -> None:
        self._metrics.feedback_received_total.labels(channel.value, result).inc()


def _decoded(raw: bytes) -> str:
    """A Subject value, unfolded, RFC 2047 words decoded where well formed."""
    return decode_words(raw.decode("utf-8", "replace").replace("\r\n", ""))


def _network_of(peer_ip: str) -> str:
    """The unit an intake allowance is kept for: the address, or its /64 for
    IPv6 (one host usually holds a whole /64)."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _same(address: str, configured: str) -> bool:
    local, _, domain = address.rpartition("@")
    c_local, _, c_domain = configured.rpartition("@")
    return domain == c_domain and local.lower() == c_local.lower()


def _addresses(entry: BounceRecipient) -> tuple[str, ...]:
    if entry.original_recipient and entry.original_recipient != entry.recipient:
        return (entry.recipient, entry.original_recipient)
    return (entry.recipient,)


def _bounce_event(
    trace: _Traced, recipient: str, entry: BounceRecipient, now: datetime
) -> Event:
    hard = entry.status is not None and entry.status.startswith("5.")
    return Event(
        kind=EventKind.BOUNCE,
        account=trace.sent.account,
        recipient=recipient,
        occurred_at=now,
        source="dsn",
        queue_id=trace.sent.queue_id,
        smtp_code=entry.smtp_code,
        status=entry.status,
        detail=(entry.diagnostic or "")[:500] or None,
        bounce_type=BounceType.HARD if hard else BounceType.SOFT,
        dedup_key=f"dsn:{trace.sent.queue_id}:{recipient}",
    )
