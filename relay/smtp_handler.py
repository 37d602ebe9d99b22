"""The aiosmtpd hooks: the only module that knows aiosmtpd's hook API.

Turns AUTH, MAIL, RCPT and DATA into decisions and replies (text from
:mod:`relay.replies`), writes each accepted message to the durable queue before
answering 250, and emits one ``transaction_completed`` line per transaction.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import secrets
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import MISSING, Envelope, Session

from policies.base import (
    PASS,
    MessageKind,
    Mode,
    Outcome,
    PolicyContext,
    Stage,
    Verdict,
)
from policies.classify import CATEGORY_HEADER, CategoryError, classify
from policies.pipeline import Observation, Pipeline, StageResult
from relay import replies
from relay.accounts import Accounts
from relay.auth import Authenticator
from relay.clock import Clock
from relay.dsn import FailedRecipient
from relay.feedback_mail import Channel, FeedbackMail
from relay.list_unsubscribe import ListUnsubscribe
from relay.message import MessageView
from relay.metrics import Metrics
from relay.queue import Queue, new_queue_id
from relay.replies import SmtpReply
from relay.tracking import message_id_key
from storage.addresses import AddressError, canonical_address, domain_of
from storage.base import Event, EventKind, EventStore, NewMessage
from storage.errors import StorageError, StorageFullError, StorageUnavailableError

if TYPE_CHECKING:
    from relay.smtp_server import RelaySMTP

log = structlog.get_logger(__name__)
_ROOT_LOGGER = logging.getLogger()
"""Its level is the one relay.logs configured (structlog filters by the same)."""

_NULL_SENDER = "<>"
PASSED = StageResult(PASS)
_MAX_LINE = 998
_CORE = "smtp"
_MAX_FEEDBACK_RECIPIENTS = 10
"""Feedback addresses one transaction may name (a report concerns one message)."""
_COPIES_BUDGET = 4
"""Per-recipient copies may total this many times the size limit."""


@dataclass(slots=True)
class Transaction:
    """What one MAIL ... DATA transaction has gathered so far."""

    mail_from: str
    started: float
    smtputf8: bool
    recipients: list[str] = field(default_factory=list)
    refused: int = 0
    kind: MessageKind | None = None
    kind_reason: str | None = None
    txn_id: str = field(default_factory=lambda: secrets.token_hex(6))
    notes: dict[str, Any] = field(default_factory=dict)
    """The checks' per-transaction notes (``PolicyContext.notes``)."""
    channel: Channel | None = None
    """Set when the transaction carries feedback for the relay itself."""


class RelaySession(Session):
    """aiosmtpd's session plus the relay's per-connection state."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.session_id = secrets.token_hex(4)
        self.peer_ip = "-"
        self.account: str | None = None
        self.helo = ""
        self.transaction: Transaction | None = None
        self.ended_with = "disconnected"


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    """What the hooks need from relay.toml."""

    hostname: str
    max_recipients: int
    max_message_size_bytes: int
    max_sessions: int
    default_categories: Mapping[str, MessageKind] = field(default_factory=dict)
    """Account name -> its default kind of mail, where relay.toml sets one."""


class RelayHandler:
    """aiosmtpd handler: AUTH, MAIL, RCPT, DATA for the sending accounts."""

    def __init__(
        self,
        settings: HandlerSettings,
        authenticator: Authenticator,
        queue: Queue,
        metrics: Metrics,
        clock: Clock,
        *,
        free_space_ok: Any,
        events: EventStore | None = None,
    ) -> None:
        self._settings = settings
        self._events = events
        self._auth = authenticator
        self._queue = queue
        self._metrics = metrics
        self._clock = clock
        self._free_space_ok = free_space_ok
        self.active_sessions = 0
        self.active_transactions = 0
        self.draining = False
        self.pipeline = Pipeline((), self.observe, self.observe_pass)
        """The checks; replaced as a whole (a transaction keeps the one it read)."""
        self.data_checks: Callable[[PolicyContext], Awaitable[StageResult]] | None = (
            None
        )
        """Runs the DATA stage instead of ``pipeline`` (the policy workers)."""
        self._verdict_metrics: dict[
            tuple[str, Stage, Outcome, Mode], tuple[Any, Any]
        ] = {}
        self.accounts: Accounts | None = None
        """Account states and sending limits (the running relay sets it)."""
        self.feedback_mail: FeedbackMail | None = None
        """Takes bounces, abuse reports and mailto unsubscribes (also without
        AUTH) when ``[feedback]`` names their addresses; its tracker stamps
        outgoing mail with ``X-Relay-Id`` and keeps the rows that trace it."""
        self.list_unsubscribe: ListUnsubscribe | None = None
        """Set when ``[policies.optout_link] list_unsubscribe = "add"``: marketing
        mail without the header gets the relay's own, one copy per recipient."""
        self.connections: set[RelaySMTP] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- sessions -------------------------------------------------------------

    def session_opened(
        self, server: RelaySMTP, session: RelaySession
    ) -> SmtpReply | None:
        """Count a new connection; return a refusal if the relay is full."""
        peer: Any = session.peer
        session.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "-"
        structlog.contextvars.bind_contextvars(
            session_id=session.session_id, peer_ip=session.peer_ip
        )
        if self.active_sessions >= self._settings.max_sessions:
            self._metrics.smtp_sessions_total.labels("refused_busy").inc()
            log.warning("session_refused", reason="too_many_sessions")
            return replies.TOO_MANY_SESSIONS
        self.active_sessions += 1
        self.connections.add(server)
        self._metrics.smtp_sessions_active.inc()
        log.debug("session_started")
        return None

    def session_closed(self, server: RelaySMTP, session: RelaySession) -> None:
        """Count the end of a connection; log a transaction it left unfinished."""
        self.connections.discard(server)
        if session.transaction is not None:
            self._end_transaction(session, "aborted", None, reason="disconnected")
        self.active_sessions -= 1
        self._metrics.smtp_sessions_active.dec()
        self._metrics.smtp_sessions_total.labels(session.ended_with).inc()
        log.debug("session_ended", result=session.ended_with)
        structlog.contextvars.clear_contextvars()

    def data_refused_by_protocol(self, session: RelaySession, line: str) -> None:
        """aiosmtpd refused the data itself (size, line length): end the transaction."""
        code = int(line[:3]) if line[:3].isdigit() else 500
        status = line[4:].split(" ", 1)[0] if len(line) > 4 else "5.0.0"
        reply = SmtpReply(code, status, line[4 + len(status) + 1 :])
        reason = (
            "too_large"
            if code == 552
            else "line_too_long"
            if code == 500
            else "protocol"
        )
        self._refuse_message(session.account or "-", reason, reply)
        self._end_transaction(session, "refused", reply, reason=reason)

    async def wait_idle(self) -> None:
        """Return once no transaction is between MAIL and its final reply."""
        await self._idle.wait()

    # -- hooks ----------------------------------------------------------------

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Remember the client's name; keep aiosmtpd's extension list."""
        session.helo = hostname
        session.host_name = hostname  # aiosmtpd leaves this to the hook when one exists
        self._reset(session)
        return responses

    async def handle_HELO(  # noqa: N802
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        hostname: str,
    ) -> str:
        """Plain SMTP greeting (no AUTH, so no relaying)."""
        session.helo = hostname
        session.host_name = hostname
        self._reset(session)
        return f"250 {self._settings.hostname}"

    async def handle_AUTH(  # noqa: N802
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        args: list[str],
    ) -> str | None:
        """AUTH PLAIN and LOGIN against the accounts, off the event loop."""
        if session.transaction is not None:
            # RFC 4954 §4: not during a mail transaction (a transaction begun
            # without AUTH is feedback for the relay, and stays so).
            return replies.AUTH_IN_TRANSACTION.render(session.session_id)
        remaining = self._auth.lockout_remaining(session.peer_ip)
        if remaining > 0:
            self._metrics.auth_attempts_total.labels("locked_out").inc()
            log.warning(
                "auth_refused", reason="locked_out", retry_in_seconds=round(remaining)
            )
            return replies.auth_locked_out(remaining).render(session.session_id)
        credentials = await self._read_credentials(server, args)
        if credentials is None:
            return None  # aiosmtpd already answered (aborted or undecodable)
        if isinstance(credentials, SmtpReply):
            return credentials.render(session.session_id)
        username, password = credentials
        account = await self._auth.verify(username, password, session.peer_ip)
        if account is None:
            self._metrics.auth_attempts_total.labels("failure").inc()
            log.info("auth_failed", mechanism=args[0].upper())
            return replies.AUTH_INVALID.render(session.session_id)
        session.authenticated = True
        session.account = account
        structlog.contextvars.bind_contextvars(account=account)
        self._metrics.auth_attempts_total.labels("success").inc()
        log.info("auth_succeeded", mechanism=args[0].upper())
        return replies.AUTH_OK.render()

    async def _read_credentials(
        self, server: RelaySMTP, args: list[str]
    ) -> tuple[str, bytes] | SmtpReply | None:
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            if len(args) == 1:
                answer = await server.challenge_auth("")
                if not isinstance(answer, bytes):
                    return None  # aborted; aiosmtpd has answered
                blob = answer
            else:
                try:
                    blob = b64decode(args[1], validate=True)
                except binascii.Error:
                    return replies.AUTH_MALFORMED
            # RFC 4616 §2: [authzid] NUL authcid NUL passwd
            parts = blob.split(b"\x00")
            if len(parts) != 3:
                return replies.AUTH_MALFORMED
            user, password = parts[1], parts[2]
        elif mechanism == "LOGIN":
            if len(args) == 1:
                answer = await server.challenge_auth("Username:")
                if not isinstance(answer, bytes):
                    return None
                user = answer
            else:
                try:
                    user = b64decode(args[1], validate=True)
                except binascii.Error:
                    return replies.AUTH_MALFORMED
            answer = await server.challenge_auth("Password:")
            if not isinstance(answer, bytes):
                return None
            password = answer
        else:
            return SmtpReply(504, "5.5.4", "Unrecognized authentication type")
        try:
            return user.decode("utf-8"), password
        except UnicodeDecodeError:
            return replies.AUTH_MALFORMED

    def configure(self, settings: HandlerSettings) -> None:
        """Use new settings from the next command on (a reload)."""
        self._settings = settings

    async def handle_MAIL(  # noqa: N802
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Start a transaction: authenticated accounts, or (without AUTH) feedback
        for the relay itself; never while draining."""
        ref = session.session_id
        account = session.account or "-"
        if self.draining:
            server.close_after_reply()
            self._refuse_message(account, "draining", replies.SHUTTING_DOWN)
            return replies.SHUTTING_DOWN.render(ref)
        if session.account is None:
            intake = self.feedback_mail
            if intake is None or not intake.enabled:
                self._refuse_message(account, "auth_required", replies.AUTH_REQUIRED)
                return replies.AUTH_REQUIRED.render(ref)
            busy = intake.admit(session.peer_ip)
            if busy is not None:
                self._refuse_message(account, "feedback_rate", busy)
                return busy.render(ref)
        if address == _NULL_SENDER:
            sender = ""
        else:
            try:
                sender = canonical_address(address)
            except AddressError as exc:
                reply = replies.bad_address("sender", exc.reason)
                self._refuse_message(account, "invalid_sender", reply)
                return reply.render(ref)
            if not address.isascii() and not envelope.smtp_utf8:
                reply = SmtpReply(
                    553, "5.6.7", "Non-ASCII sender address needs SMTPUTF8"
                )
                self._refuse_message(account, "smtputf8_required", reply)
                return reply.render(ref)
        if self.accounts is not None and session.account is not None:
            suspended = self.accounts.mail_refusal(session.account)
            if suspended is not None:
                self._refuse_message(account, "account_suspended", suspended)
                return suspended.render(ref)
        if not await self._free_space_ok():
            self._metrics.storage_errors_total.labels("full").inc()
            self._refuse_message(account, "storage_full", replies.STORAGE_FULL)
            return replies.STORAGE_FULL.render(ref)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        session.transaction = Transaction(sender, time.monotonic(), envelope.smtp_utf8)
        self.active_transactions += 1
        self._idle.clear()
        return replies.SENDER_OK.render()

    async def handle_RCPT(  # noqa: N802
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Take one recipient, canonicalised once; the relay uses that form after."""
        ref = session.session_id
        txn = session.transaction
        account = session.account or "-"
        if txn is None:  # pragma: no cover - aiosmtpd checks MAIL first
            return "503 5.5.1 Need MAIL command first"
        try:
            rcpt = canonical_address(address)
        except AddressError as exc:
            if session.account is not None:
                await self._record_blocks(
                    session.account, txn, {address[:320]: "invalid_recipient"}
                )
            return self._refuse_rcpt(
                txn,
                account,
                "invalid_recipient",
                replies.bad_address("recipient", exc.reason),
                ref,
            )
        if not address.isascii() and not txn.smtputf8:
            reply = SmtpReply(
                553, "5.6.7", "Non-ASCII recipient address needs SMTPUTF8"
            )
            return self._refuse_rcpt(txn, account, "smtputf8_required", reply, ref)
        intake = self.feedback_mail
        channel = intake.channel_for(rcpt) if intake is not None else None
        if channel is not None:
            return self._feedback_rcpt(
                txn, envelope, account, session.peer_ip, rcpt, channel, ref
            )
        if session.account is None:
            return self._refuse_rcpt(
                txn, account, "relay_denied", replies.RELAY_DENIED, ref
            )
        if txn.channel is not None:
            return self._refuse_rcpt(
                txn, account, "mixed_feedback", replies.SEPARATE_FEEDBACK, ref
            )
        if rcpt in txn.recipients:
            return replies.RECIPIENT_OK.render()
        if len(txn.recipients) >= self._settings.max_recipients:
            return self._refuse_rcpt(
                txn, account, "too_many_recipients", replies.TOO_MANY_RECIPIENTS, ref
            )
        accounts = self.accounts
        if accounts is not None:
            try:
                trap = await accounts.is_spamtrap(rcpt)
            except StorageError as exc:
                # Fail closed: the recipient is deferred, never let through unseen.
                self._metrics.storage_errors_total.labels("unavailable").inc()
                log.warning("spamtrap_lookup_failed", error=str(exc))
                return self._refuse_rcpt(
                    txn,
                    account,
                    "storage_unavailable",
                    replies.STORAGE_UNAVAILABLE,
                    ref,
                )
            if trap:
                await self._record_spamtrap_hit(session.account, txn, rcpt)
                return self._refuse_rcpt(
                    txn, account, "spamtrap", replies.SPAMTRAP, ref, policy="spamtrap"
                )
        pipeline = self.pipeline
        decided = (
            PASSED
            if not pipeline.runs_at(Stage.RCPT)
            else await pipeline.run(
                PolicyContext(
                    stage=Stage.RCPT,
                    account=session.account,
                    mail_from=txn.mail_from,
                    received_at=self._clock.now(),
                    peer_ip=session.peer_ip,
                    tls=server.tls_active,
                    recipient=rcpt,
                    recipients=tuple(txn.recipients),
                    kind=self._settings.default_categories.get(session.account),
                    notes=txn.notes,
                )
            )
        )
        if not decided.passed:
            if decided.verdict.outcome is Outcome.REFUSE:
                await self._record_blocks(
                    session.account, txn, {rcpt: decided.verdict.reason}
                )
            return self._refuse_rcpt(
                txn,
                account,
                decided.verdict.reason,
                replies.policy_refusal(decided.policy or "-", decided.verdict),
                ref,
                policy=decided.policy or "-",
            )
        if accounts is not None:
            # Last: a recipient refused for another reason uses no allowance.
            limited = accounts.recipient_refusal(session.account)
            if limited is not None:
                return self._refuse_rcpt(txn, account, limited[1], limited[0], ref)
        txn.recipients.append(rcpt)
        envelope.rcpt_tos.append(rcpt)
        self._metrics.recipients_accepted_total.labels(account).inc()
        log.debug("recipient_accepted", rcpt_domain=domain_of(rcpt))
        return replies.RECIPIENT_OK.render()

    def _feedback_rcpt(
        self,
        txn: Transaction,
        envelope: Envelope,
        account: str,
        peer_ip: str,
        rcpt: str,
        channel: Channel,
        ref: str,
    ) -> str:
        """A feedback address: no account, limit or policy applies to it."""
        if txn.recipients and txn.channel is not channel:
            return self._refuse_rcpt(
                txn, account, "mixed_feedback", replies.SEPARATE_FEEDBACK, ref
            )
        if rcpt in txn.recipients:
            return replies.RECIPIENT_OK.render()
        if not txn.recipients and account != "-" and self.feedback_mail is not None:
            # A logged-in client sending feedback is held to the same allowance.
            busy = self.feedback_mail.admit(peer_ip)
            if busy is not None:
                return self._refuse_rcpt(txn, account, "feedback_rate", busy, ref)
        if len(txn.recipients) >= _MAX_FEEDBACK_RECIPIENTS:
            return self._refuse_rcpt(
                txn, account, "too_many_recipients", replies.TOO_MANY_RECIPIENTS, ref
            )
        txn.channel = channel
        txn.recipients.append(rcpt)
        envelope.rcpt_tos.append(rcpt)
        return replies.RECIPIENT_OK.render()

    async def handle_DATA(  # noqa: N802
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> str:
        """Check the data, queue it durably, and only then answer 250."""
        started = time.monotonic()
        ref = session.session_id
        txn = session.transaction
        account = session.account
        if txn is not None and txn.channel is not None and self.feedback_mail:
            return await self._feedback_data(
                session, txn, txn.channel, self.feedback_mail, envelope
            )
        if txn is None or account is None:  # pragma: no cover - guarded by MAIL
            return replies.INTERNAL_ERROR.render(ref)
        content: bytes = envelope.original_content or b""
        reply, reason, view = self._check_data(content)
        policy = _CORE
        if reply is None and view is not None:
            try:
                classified = classify(
                    view.header, self._settings.default_categories.get(account)
                )
            except CategoryError as exc:
                reply, reason = replies.malformed_message(str(exc)), "bad_category"
            else:
                txn.kind, txn.kind_reason = classified.kind, classified.reason
                if classified.reason == "header":
                    # The mailer's instruction to the relay: consumed, never forwarded.
                    content = view.without_header(CATEGORY_HEADER)
        dropped: Mapping[str, tuple[str, Verdict]] = {}
        if reply is None and view is not None and self.pipeline.runs_at(Stage.DATA):
            decided = await (self.data_checks or self.pipeline.run)(
                PolicyContext(
                    stage=Stage.DATA,
                    account=account,
                    mail_from=txn.mail_from,
                    received_at=self._clock.now(),
                    peer_ip=session.peer_ip,
                    tls=server.tls_active,
                    recipients=tuple(txn.recipients),
                    message=view,
                    kind=txn.kind,
                    notes=txn.notes,
                )
            )
            if not decided.passed:
                policy = decided.policy or "-"
                reply = replies.policy_refusal(policy, decided.verdict)
                reason = decided.verdict.reason
                if decided.verdict.outcome is Outcome.REFUSE:
                    # Recipients refused on their own (excluded, no consent),
                    # whether they were dropped first or decided the message.
                    blocked = {r: v.reason for r, (_, v) in decided.dropped.items()}
                    blocked.update(dict.fromkeys(decided.verdict.recipients, reason))
                    await self._record_blocks(account, txn, blocked)
            dropped = decided.dropped
        if reply is not None or view is None:
            reply = reply or replies.INTERNAL_ERROR
            self._refuse_message(account, reason, reply, policy)
            self._end_transaction(
                session, "refused", reply, size=len(content), reason=reason
            )
            return reply.render(ref)
        return await self._accept(session, server, txn, view, content, dropped, started)

    async def _feedback_data(
        self,
        session: RelaySession,
        txn: Transaction,
        channel: Channel,
        intake: FeedbackMail,
        envelope: Envelope,
    ) -> str:
        """Feedback for the relay itself: read and recorded (or kept) before the
        reply, so a 250 means it is durable."""
        content: bytes = envelope.original_content or b""
        reply = await intake.receive(
            channel, txn.mail_from, tuple(txn.recipients), content
        )
        outcome = "accepted" if reply.code < 400 else "refused"
        self._end_transaction(
            session, outcome, reply, size=len(content), reason=channel.value
        )
        return reply.render(session.session_id)

    async def _accept(
        self,
        session: RelaySession,
        server: RelaySMTP,
        txn: Transaction,
        view: MessageView,
        content: bytes,
        dropped: Mapping[str, tuple[str, Verdict]],
        started: float,
    ) -> str:
        """Queue the message (per-recipient copies where the relay adds its
        List-Unsubscribe, a DSN for recipients refused at DATA) in one commit."""
        account = session.account or "-"
        base_id = new_queue_id()
        recipients = tuple(r for r in txn.recipients if r not in dropped)
        stamper = self.list_unsubscribe if self._stamps(txn, view) else None
        copies = len(recipients) if stamper is not None else 1
        budget = _COPIES_BUDGET * self._settings.max_message_size_bytes
        if copies > 1 and copies * len(content) > budget:
            reply = replies.too_many_copies(len(recipients), budget)
            self._refuse_message(account, "too_many_copies", reply)
            self._end_transaction(
                session, "refused", reply, size=len(content), reason="too_many_copies"
            )
            return reply.render(session.session_id)
        messages = self._copies(
            session, server, txn, view, stamper, content, base_id, recipients
        )
        events: list[Event] = []
        if dropped:
            failures = []
            for rcpt, (policy, verdict) in dropped.items():
                refusal = replies.policy_refusal(policy, verdict)
                failures.append(
                    FailedRecipient(
                        address=rcpt,
                        status=refusal.status,
                        diagnostic=f"{refusal.status} {refusal.text}",
                        smtp_code=refusal.code,
                    )
                )
                self._refuse_rcpt(
                    txn, account, verdict.reason, refusal, session.session_id, policy
                )
                events.append(self._block_event(account, txn, rcpt, verdict.reason))
            dsn = self._queue.new_dsn(
                hostname=self._settings.hostname,
                account=account,
                mail_from=txn.mail_from,
                content=content,
                queue_id=base_id,
                arrival=self._clock.now(),
                failures=failures,
            )
            if dsn is not None:
                self._metrics.dsn_generated_total.inc()
                messages.append(dsn)
        try:
            await self._queue.enqueue(*messages, events=events)
            if events and self.accounts is not None:
                self.accounts.recorded(events)
        except StorageFullError as exc:
            self._metrics.storage_errors_total.labels("full").inc()
            return self._store_failed(
                exc, session, account, "storage_full", replies.STORAGE_FULL, content
            )
        except StorageUnavailableError as exc:
            self._metrics.storage_errors_total.labels("unavailable").inc()
            return self._store_failed(
                exc,
                session,
                account,
                "storage_unavailable",
                replies.STORAGE_UNAVAILABLE,
                content,
            )
        size = len(messages[0].content)
        self._metrics.accept_duration_seconds.observe(time.monotonic() - started)
        self._metrics.messages_received_total.labels(account).inc()
        self._metrics.message_size_bytes.observe(size)
        reply = replies.queued(base_id)
        if dropped:
            reply = SmtpReply(
                250,
                "2.0.0",
                f"{reply.text}; {len(dropped)} recipient(s) refused by policy, "
                "reported in a DSN",
            )
        self._end_transaction(session, "accepted", reply, size=size, queue_id=base_id)
        return reply.render()

    def _copies(
        self,
        session: RelaySession,
        server: RelaySMTP,
        txn: Transaction,
        view: MessageView,
        stamper: ListUnsubscribe | None,
        content: bytes,
        base_id: str,
        recipients: tuple[str, ...],
    ) -> list[NewMessage]:
        """The message as queued: one copy, or one per recipient when ``stamper``
        adds the relay's own List-Unsubscribe (its token names the recipient)."""
        account = session.account or "-"
        today = self._clock.now().date()
        intake = self.feedback_mail
        tracker = intake.tracker if intake is not None else None
        message_id = (
            message_id_key(view.header("Message-ID")) if tracker is not None else None
        )

        def copy(queue_id: str, rcpts: tuple[str, ...], extra: bytes) -> NewMessage:
            if tracker is not None:
                extra += tracker.header(queue_id, account, today)
            return self._queue.new_message(
                account=account,
                mail_from=txn.mail_from,
                recipients=rcpts,
                content=self._received_header(session, server, queue_id, txn)
                + extra
                + content,
                smtputf8=txn.smtputf8,
                queue_id=queue_id,
                tracked=tracker is not None,
                message_id=message_id,
                kind=txn.kind.value if txn.kind is not None else None,
            )

        if stamper is None:
            return [copy(base_id, recipients, b"")]
        return [
            copy(
                base_id if index == 0 else f"{base_id}.{index + 1}",
                (rcpt,),
                stamper.headers(account, rcpt, base_id, today),
            )
            for index, rcpt in enumerate(recipients)
        ]

    def _stamps(self, txn: Transaction, view: MessageView) -> bool:
        """True if the relay adds its own List-Unsubscribe to this message."""
        return (
            self.list_unsubscribe is not None
            and txn.kind is MessageKind.MARKETING
            and view.header("List-Unsubscribe") is None
        )

    def _block_event(
        self, account: str, txn: Transaction, rcpt: str, reason: str
    ) -> Event:
        return Event(
            kind=EventKind.BLOCK,
            account=account,
            recipient=rcpt,
            occurred_at=self._clock.now(),
            source="smtp",
            detail=reason,
            dedup_key=f"block:{txn.txn_id}:{rcpt}",
        )

    async def _record_blocks(
        self, account: str, txn: Transaction, refused: Mapping[str, str]
    ) -> None:
        """Record refused recipients as ``block`` events for the reputation
        counters; a store failure is logged, the refusal stands either way."""
        if self._events is None:
            return
        events = [
            self._block_event(account, txn, rcpt, reason)
            for rcpt, reason in refused.items()
        ]
        try:
            new = await self._events.add_events(events)
        except StorageError as exc:
            self._metrics.storage_errors_total.labels("unavailable").inc()
            log.warning("block_event_not_recorded", error=str(exc))
            return
        if self.accounts is not None:
            self.accounts.recorded(new)

    async def _record_spamtrap_hit(
        self, account: str, txn: Transaction, rcpt: str
    ) -> None:
        """A recipient on the spamtrap list: a ``spamtrap_hit`` and a ``block``."""
        log.warning("spamtrap_hit", account=account, rcpt_domain=domain_of(rcpt))
        if self._events is None:
            return
        block = self._block_event(account, txn, rcpt, "spamtrap")
        hit = replace(
            block,
            kind=EventKind.SPAMTRAP_HIT,
            dedup_key=f"spamtrap:{block.dedup_key}",
        )
        try:
            new = await self._events.add_events([hit, block])
        except StorageError as exc:
            self._metrics.storage_errors_total.labels("unavailable").inc()
            log.warning("spamtrap_hit_not_recorded", error=str(exc))
            return
        if self.accounts is not None:
            self.accounts.recorded(new)

    async def handle_RSET(  # noqa: N802
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> Any:
        """Abandon the open transaction, if any."""
        self._reset(session)
        return MISSING

    async def handle_QUIT(  # noqa: N802
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope
    ) -> Any:
        """The client said goodbye."""
        session.ended_with = "completed"
        self._reset(session)
        return MISSING

    async def handle_VRFY(  # noqa: N802
        self, server: RelaySMTP, session: RelaySession, envelope: Envelope, address: str
    ) -> str:
        """Never confirm or deny addresses (RFC 5321 §3.5.3)."""
        return "252 2.5.0 Cannot VRFY user; send the message and it will be tried"

    def fault(self, session: RelaySession | None, error: Exception) -> str:
        """A fault in a hook: log it once, end the transaction, answer 451 4.3.0."""
        log.error("smtp_fault", exc_info=error)
        if session is None:
            return replies.INTERNAL_ERROR.render()
        if session.transaction is not None:
            self._end_transaction(
                session, "deferred", replies.INTERNAL_ERROR, reason="internal_error"
            )
        return replies.INTERNAL_ERROR.render(session.session_id)

    def observe(self, seen: Observation) -> None:
        """Every verdict of the pipeline: a metric and a log line (passes at debug)."""
        verdict = seen.verdict
        # Stage, Outcome and Mode are StrEnums: as labels they read as their values.
        self._metrics.policy_verdicts.add(
            (seen.policy, seen.stage, verdict.outcome, seen.mode),
            seen.duration_seconds,
        )
        if seen.error is not None:
            self._metrics.policy_errors_total.labels(seen.policy).inc()
            log.error(
                "policy_failed",
                policy=seen.policy,
                stage=seen.stage.value,
                exc_info=seen.error,
            )
        if verdict.outcome is Outcome.PASS:
            if not _ROOT_LOGGER.isEnabledFor(logging.DEBUG):
                return  # most verdicts: skip building a line nobody keeps
            emit = log.debug
        else:
            emit = log.info
        emit(
            "policy_verdict",
            policy=seen.policy,
            stage=seen.stage.value,
            outcome=verdict.outcome.value,
            mode=seen.mode.value,
            reason=verdict.reason or None,
            detail=verdict.detail or None,
        )

    def observe_pass(
        self, policy: str, stage: Stage, mode: Mode, seconds: float
    ) -> None:
        """A plain pass (:data:`~policies.pipeline.PassCounter`): what
        :meth:`observe` does with one, without an :class:`Observation`."""
        if _ROOT_LOGGER.isEnabledFor(logging.DEBUG):
            self.observe(Observation(policy, stage, PASS, mode, seconds))
            return
        self._metrics.policy_verdicts.add((policy, stage, Outcome.PASS, mode), seconds)

    def spam_subject_warning(self, account: str, phrases: list[str]) -> None:
        """Spam-trigger phrases in a Subject: a warning, never a refusal."""
        self._metrics.spam_subject_warnings_total.labels(account).inc()
        log.warning("spam_subject_phrases", phrases=phrases[:5])

    def protocol_error(self, reason: str, line: str) -> None:
        """aiosmtpd refused a command itself: a log line and a metric."""
        self._metrics.smtp_protocol_errors_total.labels(reason).inc()
        log.info("command_refused", reason=reason, smtp_code=int(line[:3]))

    def mail_refused_by_protocol(self, session: RelaySession, line: str) -> None:
        """aiosmtpd refused MAIL FROM itself (SIZE above the limit): count it."""
        if line.startswith("552"):
            self._refuse_message(session.account or "-", "too_large", replies.TOO_LARGE)

    # -- helpers --------------------------------------------------------------

    def _check_data(
        self, content: bytes
    ) -> tuple[SmtpReply | None, str, MessageView | None]:
        return check_data(content, self._settings.max_message_size_bytes)

    def _received_header(
        self, session: RelaySession, server: RelaySMTP, queue_id: str, txn: Transaction
    ) -> bytes:
        # RFC 5321 §4.4 trace field; protocol names from RFC 3848 / RFC 6531.
        proto = "UTF8SMTP" if txn.smtputf8 else "ESMTP"
        if server.tls_active:
            proto += "S"
        if session.account is not None:
            proto += "A"
        helo = (
            "".join(ch for ch in session.helo if 33 <= ord(ch) < 127)[:255] or "unknown"
        )
        date = format_datetime(self._clock.now())
        return (
            f"Received: from {helo} ([{session.peer_ip}])\r\n"
            f"\tby {self._settings.hostname} with {proto} id {queue_id};\r\n"
            f"\t{date}\r\n"
        ).encode("utf-8", "surrogateescape")

    def _store_failed(
        self,
        exc: Exception,
        session: RelaySession,
        account: str,
        reason: str,
        reply: SmtpReply,
        content: bytes,
    ) -> str:
        log.error("message_not_queued", reason=reason, error=str(exc))
        self._refuse_message(account, reason, reply)
        self._end_transaction(
            session, "deferred", reply, size=len(content), reason=reason
        )
        return reply.render(session.session_id)

    def _refuse_message(
        self, account: str, reason: str, reply: SmtpReply, policy: str = _CORE
    ) -> None:
        self._metrics.messages_refused_total.labels(account, policy, reason).inc()
        if reason not in {"storage_full", "storage_unavailable"}:
            log.info(
                "message_refused",
                policy=policy,
                reason=reason,
                smtp_code=reply.code,
                smtp_status=reply.status,
            )

    def _refuse_rcpt(
        self,
        txn: Transaction,
        account: str,
        reason: str,
        reply: SmtpReply,
        ref: str,
        policy: str = _CORE,
    ) -> str:
        txn.refused += 1
        self._metrics.recipients_refused_total.labels(account, policy, reason).inc()
        log.info(
            "recipient_refused",
            policy=policy,
            reason=reason,
            smtp_code=reply.code,
            smtp_status=reply.status,
        )
        return reply.render(ref)

    def _reset(self, session: RelaySession) -> None:
        if session.transaction is not None:
            self._end_transaction(session, "aborted", None, reason="reset")

    def _end_transaction(
        self,
        session: RelaySession,
        outcome: str,
        reply: SmtpReply | None,
        *,
        size: int | None = None,
        queue_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        txn = session.transaction
        if txn is None:
            return
        session.transaction = None
        self.active_transactions -= 1
        if self.active_transactions == 0:
            self._idle.set()
        log.info(
            "transaction_completed",
            queue_id=queue_id,
            account=session.account,
            rcpt_count=len(txn.recipients),
            rcpt_refused=txn.refused,
            kind=txn.kind.value if txn.kind else None,
            kind_reason=txn.kind_reason,
            size_bytes=size,
            outcome=outcome,
            reason=reason,
            smtp_code=reply.code if reply else None,
            smtp_status=reply.status if reply else None,
            reply=reply.render() if reply else None,
            duration_seconds=round(time.monotonic() - txn.started, 4),
        )


def check_data(
    content: bytes, max_size: int
) -> tuple[SmtpReply | None, str, MessageView | None]:
    """The relay's own checks of DATA (also run by ``relay check``): a refusal
    with its reason token, or the parsed view."""
    if b"\x00" in content:
        return replies.NUL_IN_DATA, "nul_byte", None
    # RFC 5321 §2.3.8: lines end with CRLF only. A bare CR or LF could end the
    # data early at a less careful server (SMTP smuggling), so refuse it here.
    crlf = content.count(b"\r\n")
    if content.count(b"\n") != crlf or content.count(b"\r") != crlf:
        return replies.BARE_LINE_ENDING, "bare_line_ending", None
    if len(content) > max_size:
        return replies.TOO_LARGE, "too_large", None
    # RFC 5321 §4.5.3.1.6: 998 octets plus CRLF. aiosmtpd allows one more on the
    # wire for a transparency dot, which it has removed by now.
    if len(content) > _MAX_LINE and max(map(len, content.split(b"\r\n"))) > _MAX_LINE:
        return replies.LINE_TOO_LONG, "line_too_long", None
    view = MessageView.parse(content)
    if view.problem is not None:
        return replies.malformed_message(view.problem), "malformed_message", None
    return None, "", view
