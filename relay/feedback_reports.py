"""Reading the reports mailbox providers send back: bounces and complaints.

This module owns the parsing of delivery status notifications (RFC 3464 inside an
RFC 6522 ``multipart/report``, RFC 6533 for UTF-8 addresses, and the plain-text
formats of Postfix, qmail and Exim) and of abuse reports (ARF, RFC 5965) into
value objects, and the table that says which bounce is a hard bounce of the
recipient address itself (:func:`is_recipient_hard_bounce`).

It does no I/O, keeps no state and decides nothing else: attributing a report to
an account (VERP token in Return-Path, the ``X-Relay-Id`` tracking header, the
Message-ID), counting it and suppressing addresses belong to the feedback intake;
building the relay's own DSNs belongs to :mod:`relay.dsn`.

Input is untrusted.  It is read with the stdlib's ``compat32`` policy, whose
parser keeps header values raw and does not raise on malformed mail; every loop
is bounded; text taken from the report is stripped of control characters and
capped in length.  Every failure is a :class:`ReportError` whose ``reason`` is
one of a small fixed set (fit for a metric label); nothing else escapes
:func:`parse_bounce` or :func:`parse_complaint`.
"""

from __future__ import annotations

import binascii
import codecs
import email.policy
import ipaddress
import quopri
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import (
    CloseBoundaryNotFoundDefect,
    MessageError,
    MissingHeaderBodySeparatorDefect,
)
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import TypeAlias

from storage.addresses import AddressError, canonical_address

__all__ = [
    "MAX_DIAGNOSTIC_CHARS",
    "MAX_REPORT_BYTES",
    "Action",
    "BounceFormat",
    "BounceRecipient",
    "BounceReport",
    "ComplaintReport",
    "OriginalHeaders",
    "ReportError",
    "ReportErrorReason",
    "SkippedAddress",
    "decode_words",
    "is_recipient_hard_bounce",
    "parse_bounce",
    "parse_complaint",
]

MAX_REPORT_BYTES = 4 * 1024 * 1024
"""Reports larger than this are refused unread (``too_large``)."""
MAX_DIAGNOSTIC_CHARS = 500
"""Length cap of a recipient's diagnostic text."""

_MAX_RECIPIENTS = 1000  # per report; further recipient blocks are ignored
_MAX_CONTAINERS = 128  # multipart and message/* parts in the whole input
_MAX_DEPTH = 4  # multipart nesting searched for the report's parts
_MAX_PARTS = 256  # parts looked at while searching
_MAX_PART_CHARS = 1024 * 1024  # text read from one part
_MAX_SCAN_CHARS = 256 * 1024  # plain-text bounce explanation scanned
_MAX_HEADER_CHARS = 256 * 1024  # header block of the returned message
_MAX_FIELD_CHARS = 4096  # one report field, unfolded
_MAX_VALUE_CHARS = 998  # a header value we hand out (RFC 5322 §2.1.1)
_MAX_NAME_CHARS = 255  # host names, user agents and such
_MAX_LIST_ITEMS = 100  # repeated ARF fields (Reported-URI, Original-Rcpt-To...)
_MAX_SKIPPED = 100
_MAX_DETAIL_LINES = 30  # lines of one recipient entry in a plain-text bounce
_MAX_LINE_CHARS = 2000  # of one line of a plain-text bounce
_HEURISTIC_WINDOW = 5  # lines between an address and the reply that names it

_PARSER = BytesParser(policy=email.policy.compat32)
_HEADER_PARSER = HeaderParser(policy=email.policy.compat32)

_CONTAINER = re.compile(rb"(?im)^content-type[ \t]*:[ \t]*(?:multipart|message)/")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# RFC 5322 §2.2: a field name is printable ASCII except ":".
_FIELD_LINE = re.compile(r"([!-9;-~]+)[ \t]*:(.*)")
# RFC 3463 §2: class "." subject "." detail; not part of a dotted number.
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d)(?!\.\d)")
# RFC 5321 §4.2: a reply code starts the reply, or follows "said:" and the like.
_REPLY_CODE = re.compile(r"(?:^|[\s:(])([245][0-5]\d)(?=[ -]|$)")
# RFC 6533 §3: EmbeddedUnicodeChar.
_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# RFC 3464 §2.1.2: address-type and diagnostic-type are atoms before ";".
_TYPED = re.compile(r"[ \t]*([A-Za-z0-9][A-Za-z0-9.+_-]*)[ \t]*;(.*)", re.DOTALL)
_COMMENT = re.compile(r"\([^()]*\)")  # RFC 5322 §3.2.2, one level
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_DSN_REPORT_TYPES = frozenset({"delivery-status", "global-delivery-status"})
_ORIGINAL_TYPES = frozenset(
    {
        "message/rfc822",
        "message/global",  # RFC 6532 §3.7
        "text/rfc822-headers",  # RFC 6522 §4
        "message/global-headers",  # RFC 6533 §6.3
        "message/rfc822-headers",  # seen in the wild
    }
)
_ENCODED_TRANSFER = frozenset({"base64", "quoted-printable"})

_Block: TypeAlias = list[tuple[str, str]]
"""One group of report fields: (lower-case name, unfolded value) pairs."""


class ReportErrorReason(StrEnum):
    """Why a report could not be read; a bounded metric label."""

    NOT_A_REPORT = "not_a_report"
    NO_RECIPIENTS = "no_recipients"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"


class ReportError(ValueError):
    """The input is not a report this module can read.

    ``reason`` is a :class:`ReportErrorReason`; ``detail`` is one short sentence
    for the log line, naming no address and quoting no input.
    """

    def __init__(self, reason: ReportErrorReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Action(StrEnum):
    """The action value of a DSN recipient (RFC 3464 §2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


class BounceFormat(StrEnum):
    """Which format a bounce was read in."""

    RFC3464 = "rfc3464"
    POSTFIX = "postfix"
    QMAIL = "qmail"
    EXIM = "exim"
    HEURISTIC = "heuristic"


@dataclass(frozen=True, slots=True)
class OriginalHeaders:
    """Headers of the message a report returns, as unfolded text (or None).

    ``from_``, ``to`` and ``subject`` are RFC 2047-decoded; the others are
    given as written, angle brackets included.  Providers often redact ``to``.
    """

    message_id: str | None = None
    return_path: str | None = None
    from_: str | None = None
    to: str | None = None
    subject: str | None = None
    relay_id: str | None = None
    """The relay's ``X-Relay-Id`` tracking header."""


@dataclass(frozen=True, slots=True)
class SkippedAddress:
    """An address a report named that could not be used, and why."""

    field: str
    """The report field (``Final-Recipient``, ``Original-Rcpt-To``...) or the
    plain-text format it came from."""
    value: str
    """The value as found, cleaned and capped."""
    reason: str


@dataclass(frozen=True, slots=True)
class BounceRecipient:
    """What a bounce says about one recipient."""

    recipient: str
    """Canonical address (Final-Recipient; Original-Recipient if that is unusable)."""
    action: Action
    status: str | None
    """RFC 3463 code; ``"5.0.0"``/``"4.0.0"`` when only a reply code was given."""
    smtp_code: int | None = None
    diagnostic: str | None = None
    remote_mta: str | None = None
    original_recipient: str | None = None
    last_attempt_date: datetime | None = None

    @property
    def permanent(self) -> bool:
        """The delivery failed for good: action failed, status class 5."""
        return (
            self.action is Action.FAILED
            and self.status is not None
            and self.status.startswith("5.")
        )

    @property
    def is_recipient_hard_bounce(self) -> bool:
        """A permanent failure that says the address itself is unusable."""
        return self.permanent and is_recipient_hard_bounce(self.status, self.diagnostic)


@dataclass(frozen=True, slots=True)
class BounceReport:
    """A delivery status notification, read."""

    format: BounceFormat
    recipients: tuple[BounceRecipient, ...]
    message_id: str | None = None
    """The DSN's own Message-ID, for spotting a DSN that arrives twice."""
    reporting_mta: str | None = None
    original_envelope_id: str | None = None
    arrival_date: datetime | None = None
    original: OriginalHeaders | None = None
    skipped: tuple[SkippedAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class ComplaintReport:
    """An abuse report (ARF, RFC 5965), read.  Everything but the type is
    optional: providers redact what identifies their user."""

    feedback_type: str
    """Lower case: ``abuse``, ``fraud``, ``virus``, ``other``, ``not-spam``
    (RFC 6430), ``auth-failure`` (RFC 6591), or an unregistered token."""
    user_agent: str | None = None
    version: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: tuple[str, ...] = ()
    arrival_date: datetime | None = None
    source_ip: str | None = None
    reporting_mta: str | None = None
    reported_domains: tuple[str, ...] = ()
    reported_uris: tuple[str, ...] = ()
    authentication_results: str | None = None
    incidents: int | None = None
    original: OriginalHeaders | None = None
    message_id: str | None = None
    """The report's own Message-ID."""
    skipped: tuple[SkippedAddress, ...] = ()

    @property
    def counts_as_complaint(self) -> bool:
        """True for the ``abuse`` and ``fraud`` feedback types."""
        return self.feedback_type in {"abuse", "fraud"}


# --- hard bounces ----------------------------------------------------------

# RFC 3463 codes that say the recipient address itself is unusable.
_HARD_STATUSES = frozenset(
    {
        "5.1.1",  # bad destination mailbox address
        "5.1.2",  # bad destination system address
        "5.1.3",  # bad destination mailbox address syntax
        "5.1.4",  # destination mailbox address ambiguous
        "5.1.6",  # destination mailbox has moved, no forwarding address
        "5.1.10",  # recipient address has null MX (RFC 7505 §4.2)
        "5.2.1",  # mailbox disabled, not accepting messages
    }
)
# Generic codes: a hard bounce only when the text says the mailbox is gone.
_HARD_IF_TEXT_SAYS = frozenset({"5.0.0", "5.1.0", "5.2.0"})
_MAILBOX_GONE = re.compile(
    r"\b(?:user|recipient|mailbox|address|account|addressee)s?(?: is)?"
    r" (?:unknown|not found|invalid|does(?: not|n't) exist|no longer exists?)\b"
    r"|\bunknown (?:user|recipient|mailbox|address|account)\b"
    r"|\bno such (?:user|mailbox|recipient|address|account|person)\b"
    r"|\bdoes(?: not|n't) exist\b"
    r"|\bmailbox (?:is )?unavailable\b"
    r"|\binvalid (?:recipient|mailbox|user|address)\b"
    r"|\bno mailbox\b",
    re.IGNORECASE,
)
# Words that show the refusal is about policy, the sender or the mailbox's
# state, not about the address existing.
_NOT_ABOUT_ADDRESS = re.compile(
    r"\b(?:spam\w*|block(?:ed|ing|list\w*)?|black ?list\w*|deny ?list\w*"
    r"|polic(?:y|ies)|reputation|quota|full|rate.?limit\w*|too many|sender"
    r"|spf|dkim|dmarc|relay(?:ing)?|not authori[sz]ed|access denied|virus"
    r"|malware|temporar\w*)\b",
    re.IGNORECASE,
)


def is_recipient_hard_bounce(status: str | None, diagnostic: str | None = None) -> bool:
    """True if ``status`` (with ``diagnostic``) says the address itself is bad.

    This decides whether the relay suppresses the address, so it answers True
    only when the receiving system said the mailbox cannot exist or take mail:

    ==================  ======  ==============================================
    status (RFC 3463)   result  why
    ==================  ======  ==============================================
    5.1.1, 5.1.2,       True    bad mailbox, bad domain, bad syntax,
    5.1.3, 5.1.4,               ambiguous, moved without forwarding, null MX
    5.1.6, 5.1.10               (RFC 7505)
    5.2.1               True    mailbox disabled
    5.1.0               True    other address status, unless the text names
                                the sender, a policy, spam or a quota
    5.0.0, 5.2.0        text    True only if the text says the mailbox does
                                not exist ("user unknown", "no such user",
                                "mailbox unavailable", "does not exist",
                                "unknown recipient"...) and names no policy,
                                spam, sender or quota reason
    5.1.5, 5.1.7,       False   not about the recipient: a "valid" code, the
    5.1.8, 5.1.9                sender's address, a non-compliant relay
    5.2.2, 5.2.3        False   mailbox full, message too big: the address
                                works
    5.3.x, 5.4.x,       False   system, routing, protocol, content and policy
    5.5.x, 5.6.x,               (spam, reputation, authentication) refusals
    5.7.x
    4.x.x, 2.x.x        False   not permanent
    ==================  ======  ==============================================

    A generic status of the form ``X.0.0`` is first refined by an enhanced code
    of the same class in ``diagnostic`` (``5.0.0`` with "550 5.1.1 ..." reads
    as 5.1.1).  Without ``status`` the code comes from ``diagnostic``: its
    enhanced code, else the class of its reply code (550 reads as 5.0.0).
    """
    text = diagnostic or ""
    code = _status_code(status) if status else None
    if code is None or code.endswith(".0.0"):
        refined = _enhanced_code(text)
        if refined is not None and (code is None or refined[0] == code[0]):
            code = refined
    if code is None:
        code = _class_code(_reply_code(text))
    if code in _HARD_IF_TEXT_SAYS:
        if code == "5.1.0":
            return not _NOT_ABOUT_ADDRESS.search(text)
        return bool(_MAILBOX_GONE.search(text)) and not _NOT_ABOUT_ADDRESS.search(text)
    return code in _HARD_STATUSES


# --- public parsers ----------------------------------------------------------


def parse_bounce(content: bytes) -> BounceReport:
    """Read a bounce: an RFC 3464 DSN, or a known plain-text format.

    A ``multipart/report`` with a ``message/delivery-status`` part (or RFC 6533
    ``message/global-delivery-status``) is read as RFC 3464.  Without one, the
    first ``text/plain`` part is read as an Exim, qmail or Postfix bounce, and
    failing those by a heuristic: a line with an address and an SMTP reply code
    or RFC 3463 status (or an address alone, then such a line within a few
    lines).  Recipients whose address cannot be canonicalised are left out and
    listed in ``skipped``.

    Raises :class:`ReportError`, and nothing else, when the input is no bounce,
    is truncated or malformed, names no usable recipient, or is too large.
    """
    root = _parse(content)
    parts = _walk(root)
    _check_complete(parts)
    original = _original(parts)
    message_id = _header(root, "message-id")
    status_part = next(
        (p for p in parts if p.get_content_type() in _STATUS_TYPES), None
    )
    if status_part is not None:
        return _read_dsn(status_part, original, message_id)
    for part in parts:
        if part.get_content_type() != "multipart/report":
            continue
        report_type = _report_type(part)
        if report_type in _DSN_REPORT_TYPES:
            raise ReportError(
                ReportErrorReason.MALFORMED,
                "multipart/report without its delivery-status part",
            )
        if report_type is not None:
            raise ReportError(
                ReportErrorReason.NOT_A_REPORT,
                "a multipart/report of another type than delivery-status",
            )
    return _read_plain_text(root, parts, original, message_id)


def parse_complaint(content: bytes) -> ComplaintReport:
    """Read an ARF abuse report (RFC 5965).

    The ``message/feedback-report`` part gives the type and the optional
    fields; the returned message (``message/rfc822`` or ``text/rfc822-headers``)
    gives :class:`OriginalHeaders`.  Addresses that cannot be canonicalised
    (providers write ``redacted``) are left out and listed in ``skipped``.

    Raises :class:`ReportError`, and nothing else, when the input is no
    feedback report, lacks the Feedback-Type field (RFC 5965 §3.1), is
    truncated or malformed, or is too large.
    """
    root = _parse(content)
    parts = _walk(root)
    _check_complete(parts)
    feedback = next(
        (p for p in parts if p.get_content_type() == "message/feedback-report"), None
    )
    if feedback is None:
        if any(
            p.get_content_type() == "multipart/report"
            and _report_type(p) == "feedback-report"
            for p in parts
        ):
            raise ReportError(
                ReportErrorReason.MALFORMED,
                "multipart/report without its feedback-report part",
            )
        raise ReportError(ReportErrorReason.NOT_A_REPORT, "no feedback-report part")
    # RFC 5965 §3.1: the part is one block of fields; tolerate stray blank lines.
    fields = [field for block in _field_blocks(_part_text(feedback)) for field in block]
    token = _TOKEN.match(_first(fields, "feedback-type") or "")
    if token is None:
        raise ReportError(
            ReportErrorReason.MALFORMED, "feedback report without a Feedback-Type"
        )
    skipped: list[SkippedAddress] = []
    mail_from = _first(fields, "original-mail-from")
    rcpt_to: list[str] = []
    for value in _all(fields, "original-rcpt-to"):
        address = _address_field("Original-Rcpt-To", value, skipped)
        if address is not None and address not in rcpt_to:
            rcpt_to.append(address)
    return ComplaintReport(
        feedback_type=token.group().lower()[:64],
        user_agent=_clean(_first(fields, "user-agent"), _MAX_NAME_CHARS),
        version=_clean(_first(fields, "version"), _MAX_NAME_CHARS),
        original_mail_from=(
            _address_field("Original-Mail-From", mail_from, skipped)
            if mail_from is not None
            else None
        ),
        original_rcpt_to=tuple(rcpt_to),
        # RFC 5965 §3.2: Arrival-Date; Received-Date is the draft-era name.
        arrival_date=_date(
            _first(fields, "arrival-date") or _first(fields, "received-date")
        ),
        source_ip=_ip(_first(fields, "source-ip")),
        reporting_mta=_typed_name(_first(fields, "reporting-mta")),
        reported_domains=_cleaned_list(_all(fields, "reported-domain"), lower=True),
        reported_uris=_cleaned_list(_all(fields, "reported-uri")),
        authentication_results=_clean(
            _first(fields, "authentication-results"), _MAX_VALUE_CHARS
        ),
        incidents=_incidents(_first(fields, "incidents")),
        original=_original(parts),
        message_id=_header(root, "message-id"),
        skipped=tuple(skipped[:_MAX_SKIPPED]),
    )


# --- the MIME structure ------------------------------------------------------


def _parse(content: bytes) -> Message:
    """Parse ``content`` with ``compat32`` after the size and nesting checks."""
    if len(content) > MAX_REPORT_BYTES:
        raise ReportError(
            ReportErrorReason.TOO_LARGE,
            f"report of {len(content)} bytes, over {MAX_REPORT_BYTES}",
        )
    if not bytes(content).strip():
        raise ReportError(ReportErrorReason.NOT_A_REPORT, "empty input")
    for count, _ in enumerate(_CONTAINER.finditer(content), start=1):
        if count > _MAX_CONTAINERS:
            raise ReportError(ReportErrorReason.MALFORMED, "too many nested parts")
    try:
        return _PARSER.parsebytes(bytes(content))
    except RecursionError as exc:
        # The feed parser recurses once per nesting level; the count above
        # catches the usual spelling, this the folded ones.
        raise ReportError(
            ReportErrorReason.MALFORMED, "parts nested too deeply"
        ) from exc


def _walk(root: Message) -> list[Message]:
    """Return ``root`` and the parts of its multiparts, in document order.

    The content of ``message/*`` parts (the returned original) is not entered:
    its own MIME structure is the sender's, not the report's.
    """
    found: list[Message] = []
    stack: list[tuple[Message, int]] = [(root, 0)]
    while stack and len(found) < _MAX_PARTS:
        part, depth = stack.pop()
        found.append(part)
        if depth >= _MAX_DEPTH or part.get_content_maintype() != "multipart":
            continue
        children = part.get_payload()
        if isinstance(children, list):
            stack.extend(
                (child, depth + 1)
                for child in reversed(children[:_MAX_PARTS])
                if isinstance(child, Message)
            )
    return found


def _check_complete(parts: Iterable[Message]) -> None:
    """Refuse a report whose multipart lacks its close delimiter (RFC 2046
    §5.1.1): the rest of it, recipients included, may be missing."""
    for part in parts:
        if any(isinstance(d, CloseBoundaryNotFoundDefect) for d in part.defects):
            raise ReportError(
                ReportErrorReason.TRUNCATED, "multipart body ends before its boundary"
            )


def _report_type(part: Message) -> str | None:
    """The ``report-type`` parameter (RFC 6522 §3), lower case, or None."""
    value = part.get_param("report-type")
    if isinstance(value, tuple):
        value = value[2]
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


def _transfer_encoding(part: Message) -> str:
    return _text(part.get("content-transfer-encoding", "")).strip().lower()


def _part_text(part: Message) -> str:
    """The decoded text of ``part``, whatever the stdlib made of it.

    ``message/delivery-status`` comes back as a list of header-only messages,
    other ``message/*`` types as one message, the rest as a string; all are
    turned back into text.  A transfer encoding is undone even where RFC 2046
    §5.2 forbids one, since some providers use it.
    """
    if part.is_multipart():  # compat32: any list payload, message/* included
        blocks = part.get_payload()
        if not isinstance(blocks, list):
            blocks = []
        raw = "\n\n".join(
            _message_text(block)
            for block in blocks[: _MAX_RECIPIENTS + 1]
            if isinstance(block, Message)
        )
        data = _raw_bytes(raw[:_MAX_PART_CHARS])
        encoding = _transfer_encoding(part)
        if encoding == "base64":
            data = _base64(data)
        elif encoding == "quoted-printable":
            data = quopri.decodestring(data)
    else:
        data = _body_bytes(part)[:_MAX_PART_CHARS]
    return _decode(data, _charset(part))


def _body_bytes(part: Message) -> bytes:
    """The body of a single part as bytes, its transfer encoding undone.

    ``get_payload(decode=True)`` is the one stdlib path that neither decodes
    with the declared charset (which raises on names such as "us\\0ascii")
    nor refuses odd input.
    """
    body = part.get_payload(decode=True)
    return body if isinstance(body, bytes) else b""


def _charset(part: Message) -> str | None:
    """The charset parameter, unquoted, or None (RFC 2231 form included)."""
    value = part.get_param("charset")
    if isinstance(value, tuple):
        value = value[2]
    return value.strip().lower() if isinstance(value, str) and value.strip() else None


def _message_text(message: Message) -> str:
    """A parsed (header-only) message turned back into its lines."""
    head = "\n".join(
        f"{name}: {_raw_text(value)}"
        for name, value in list(message.raw_items())[: _MAX_LIST_ITEMS * 10]
    )
    if message.is_multipart():
        return head
    body = _body_bytes(message).decode("utf-8", "surrogateescape")
    if not body:
        return head
    if not head:
        return body
    # Without a blank line the parser ended the block at a line that was no
    # field; that line and what follows still belong to the same block.
    missing = any(
        isinstance(d, MissingHeaderBodySeparatorDefect) for d in message.defects
    )
    return head + ("\n" if missing else "\n\n") + body


def _base64(data: bytes) -> bytes:
    cleaned = re.sub(rb"[^A-Za-z0-9+/=]", b"", data)
    try:
        return binascii.a2b_base64(cleaned)
    except binascii.Error:
        # Bad padding: decode the whole groups only.
        cleaned = cleaned.replace(b"=", b"")
        return binascii.a2b_base64(cleaned[: len(cleaned) - len(cleaned) % 4])


def _decode(data: bytes, charset: str | None) -> str:
    """``data`` as text in ``charset``; UTF-8 (lenient) when unknown or ASCII."""
    name = "utf-8"
    if charset:
        try:
            info = codecs.lookup(charset)
        except (LookupError, ValueError):
            info = None
        # Only text encodings: "base64" or "rot13" are codecs too.
        if info is not None and getattr(info, "_is_text_encoding", True):
            name = "utf-8" if info.name == "ascii" else info.name
    try:
        return data.decode(name, "replace")
    except (LookupError, UnicodeError, ValueError):
        return data.decode("utf-8", "replace")


def _original(parts: Sequence[Message]) -> OriginalHeaders | None:
    """The headers of the returned message, from the first part that has them."""
    for part in parts:
        if part.get_content_type() in _ORIGINAL_TYPES:
            return _original_headers(_header_source(part))
    return None


def _header_source(part: Message) -> Message:
    """The returned message's headers as a (header-only) message."""
    payload = part.get_payload()
    if (
        isinstance(payload, list)
        and payload
        and isinstance(payload[0], Message)
        and _transfer_encoding(part) not in _ENCODED_TRANSFER
    ):
        inner: Message = payload[0]
        return inner
    return _headers_of_text(_part_text(part))


def _headers_of_text(text: str) -> Message:
    block = text.lstrip("\r\n")[:_MAX_HEADER_CHARS]
    return _HEADER_PARSER.parsestr(block, headersonly=True)


def _original_headers(headers: Message) -> OriginalHeaders:
    return OriginalHeaders(
        message_id=_header(headers, "message-id"),
        return_path=_header(headers, "return-path"),
        from_=_header(headers, "from", decode=True),
        to=_header(headers, "to", decode=True),
        subject=_header(headers, "subject", decode=True),
        relay_id=_header(headers, "x-relay-id"),
    )


def _header(message: Message, name: str, *, decode: bool = False) -> str | None:
    """The first ``name`` header of ``message``, unfolded and cleaned, or None."""
    for key, value in message.raw_items():
        if key.strip().lower() == name:
            text = _text(value)
            return _clean(decode_words(text) if decode else text, _MAX_VALUE_CHARS)
    return None


def decode_words(value: str) -> str:
    """``value`` with RFC 2047 encoded words decoded; as is if they are bad."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value[:_MAX_FIELD_CHARS])))
    # The decoder is not total: a bad charset name raises CharsetError (a
    # MessageError), bad bytes in a known one UnicodeError.
    except (MessageError, LookupError, UnicodeError, ValueError):
        return value


# --- RFC 3464 --------------------------------------------------------------


def _read_dsn(
    status_part: Message, original: OriginalHeaders | None, message_id: str | None
) -> BounceReport:
    """Read the fields of a delivery-status part (RFC 3464 §2.1)."""
    blocks = _field_blocks(_part_text(status_part))
    if not blocks:
        raise ReportError(ReportErrorReason.MALFORMED, "empty delivery-status part")
    # §2.2: the per-message fields come first.  Some MTAs run them into the
    # first recipient's block, so they are looked up in the first block
    # whatever it holds; a recipient block is one that names a recipient.
    head = blocks[0]
    recipients: list[BounceRecipient] = []
    skipped: list[SkippedAddress] = []
    for block in blocks:
        if not (
            _first(block, "final-recipient") or _first(block, "original-recipient")
        ):
            continue
        if len(recipients) + len(skipped) >= _MAX_RECIPIENTS:
            break
        _dsn_recipient(block, recipients, skipped)
    if not recipients:
        detail = "delivery-status part names no usable recipient"
        raise ReportError(ReportErrorReason.NO_RECIPIENTS, detail)
    return BounceReport(
        format=BounceFormat.RFC3464,
        recipients=tuple(recipients),
        message_id=message_id,
        reporting_mta=_typed_name(_first(head, "reporting-mta")),
        original_envelope_id=_clean(
            _first(head, "original-envelope-id"), _MAX_NAME_CHARS
        ),
        arrival_date=_date(_first(head, "arrival-date")),
        original=original,
        skipped=tuple(skipped[:_MAX_SKIPPED]),
    )


def _dsn_recipient(
    block: _Block, recipients: list[BounceRecipient], skipped: list[SkippedAddress]
) -> None:
    """Read one per-recipient block (§2.3) into ``recipients`` or ``skipped``."""
    final = _first(block, "final-recipient")
    original_field = _first(block, "original-recipient")
    problems: list[SkippedAddress] = []
    final_address = _address_field("Final-Recipient", final, problems)
    original_address = _address_field("Original-Recipient", original_field, [])
    address = final_address or original_address
    if address is None:
        skipped.extend(problems[:1])
        return
    diagnostic = _typed_value(_first(block, "diagnostic-code"))
    text = _clean(_unembed(diagnostic), MAX_DIAGNOSTIC_CHARS) if diagnostic else None
    code = _reply_code(text or "")
    status = (
        _status_code(_first(block, "status"))
        or _enhanced_code(text or "")
        or _class_code(code)
    )
    action = _action(_first(block, "action")) or _action_of(status)
    if action is None:
        skipped.append(
            SkippedAddress("Action", address, "neither Action nor Status given")
        )
        return
    recipients.append(
        BounceRecipient(
            recipient=address,
            action=action,
            status=status,
            smtp_code=code,
            diagnostic=text,
            remote_mta=_typed_name(_first(block, "remote-mta")),
            original_recipient=original_address,
            last_attempt_date=_date(_first(block, "last-attempt-date")),
        )
    )


def _field_blocks(text: str) -> list[_Block]:
    """Split RFC 822-style field groups separated by blank lines (RFC 3464
    §2.1).  Names are lower case; values are unfolded (RFC 5322 §2.2.3) and
    capped; lines that are no field are ignored."""
    blocks: list[_Block] = []
    current: _Block = []
    for line in _LINE_BREAK.split(text[:_MAX_PART_CHARS]):
        if not line.strip(" \t"):
            if current:
                blocks.append(current)
                current = []
                if len(blocks) > _MAX_RECIPIENTS:
                    return blocks
            continue
        if line[0] in " \t":
            if current and len(current[-1][1]) < _MAX_FIELD_CHARS:
                name, value = current[-1]
                joined = f"{value} {line.strip()}" if value else line.strip()
                current[-1] = (name, joined[:_MAX_FIELD_CHARS])
            continue
        field = _FIELD_LINE.match(line)
        if field is not None:
            current.append((field[1].lower(), field[2].strip()[:_MAX_FIELD_CHARS]))
    if current:
        blocks.append(current)
    return blocks


def _first(block: _Block, name: str) -> str | None:
    return next((value for key, value in block if key == name), None)


def _all(block: _Block, name: str) -> list[str]:
    return [value for key, value in block if key == name][:_MAX_LIST_ITEMS]


def _split_type(value: str) -> tuple[str | None, str]:
    """``(type, rest)`` of a typed field (RFC 3464 §2.1.2: ``atom ";" text``);
    no type when what precedes the first ";" is no atom (``550 x; y``)."""
    typed = _TYPED.match(value)
    if typed is None:
        return None, value.strip()
    return typed[1].lower(), typed[2].strip()


def _typed_value(value: str | None) -> str | None:
    """The part after ``type;``, or all of the value without a type."""
    return None if value is None else _split_type(value)[1]


def _typed_name(value: str | None) -> str | None:
    """The host in an MTA-name field (RFC 3464 §2.2.2, §2.3.5) such as
    ``dns; mx.example.com. (192.0.2.1)``: comments and a final dot dropped."""
    rest = _typed_value(value)
    if rest is None:
        return None
    words = _COMMENT.sub(" ", rest).split()
    return _clean(words[0].rstrip(".") if words else None, _MAX_NAME_CHARS)


def _address_field(
    field: str, value: str | None, skipped: list[SkippedAddress]
) -> str | None:
    """The canonical address in a typed address field, or None (noted in
    ``skipped`` unless the field is absent or the null path ``<>``).

    RFC 3464 §2.1.2: ``rfc822; user@example.com``, the type case-insensitive;
    RFC 6533 §3: ``utf-8; ...`` with ``\\x{HEX}`` escapes.  ARF fields carry a
    bare address, often in angle brackets; a missing type is read as rfc822.
    """
    if value is None:
        return None
    kind, address = _split_type(value)
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if not address:
        return None
    shown = _clean(address, _MAX_NAME_CHARS) or ""
    if kind == "utf-8":
        address = _unembed(address)
    elif kind not in {None, "rfc822"}:
        skipped.append(SkippedAddress(field, shown, "unsupported address type"))
        return None
    try:
        return canonical_address(address)
    except AddressError as exc:
        skipped.append(SkippedAddress(field, shown, exc.reason))
        return None


def _unembed(text: str) -> str:
    """Decode RFC 6533 §3 EmbeddedUnicodeChar escapes (``\\x{E9}``)."""

    def char(match: re.Match[str]) -> str:
        point = int(match[1], 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            return match[0]
        return chr(point)

    return _EMBEDDED.sub(char, text) if "\\x{" in text else text


def _status_code(value: str | None) -> str | None:
    """The RFC 3463 code a Status field starts with, without leading zeros."""
    if value is None:
        return None
    found = _ENHANCED.match(value.strip())
    return _normal_status(found) if found else None


def _enhanced_code(text: str) -> str | None:
    """The first RFC 3463 code in free text (``550 5.1.1``, qmail ``#5.1.1``)."""
    found = _ENHANCED.search(text)
    return _normal_status(found) if found else None


def _normal_status(found: re.Match[str]) -> str:
    return f"{found[1]}.{int(found[2])}.{int(found[3])}"


def _reply_code(text: str) -> int | None:
    """The first SMTP reply code (RFC 5321 §4.2) in ``text``, or None."""
    found = _REPLY_CODE.search(text)
    return int(found[1]) if found else None


def _class_code(code: int | None) -> str | None:
    """RFC 3463 §3.1: only the class is known from a bare reply code."""
    if code is None:
        return None
    return f"{code // 100}.0.0"


def _action(value: str | None) -> Action | None:
    token = _TOKEN.match((value or "").strip())
    if token is None:
        return None
    try:
        return Action(token.group().lower())
    except ValueError:
        return None


def _action_of(status: str | None) -> Action | None:
    """The action a status implies, for a block that lacks a usable Action."""
    if status is None:
        return None
    return {"5": Action.FAILED, "4": Action.DELAYED, "2": Action.DELIVERED}[status[0]]


# --- plain-text bounces ------------------------------------------------------

# An address in free text.  It starts only after a delimiter and its parts are
# bounded (RFC 5321 §4.5.3.1) and possessive, so a long token costs one pass.
_ADDRESS_CHAR = r"[^\s<>()\[\]\"',;:@]"
_ADDRESS = rf"(?<!{_ADDRESS_CHAR}){_ADDRESS_CHAR}{{1,64}}+@{_ADDRESS_CHAR}{{1,255}}+"
# A line after which a plain-text bounce quotes the returned message.
_MARKER_LINE = re.compile(r"(?m)^[ \t]*-{2,}[^\r\n]{0,300}")
_MARKER_WORDS = re.compile(
    r"(?i)\b(?:copy of the (?:message|original)|original message"
    r"|undelivered message|below this line)\b"
)
_WARNING = re.compile(
    r"(?i)this is a warning only|will be retried|still being retried"
    r"|has not yet been delivered"
)
_PERMANENT = re.compile(r"(?i)\bpermanent (?:error|failure)|failed permanently")
_EXIM_FAILED = re.compile(r"(?i)the following address(?:\(es\)|es)? failed:")
_EXIM_DELAYED = re.compile(
    r"(?i)address(?:\(es\)|es)? to which the message has not yet been delivered"
    r"|has not yet been delivered to the following address"
)
_QMAIL = re.compile(r"(?i)qmail-send program|wasn't able to deliver your message")
_QMAIL_ENTRY = re.compile(rf"<({_ADDRESS})>:[ \t]*")
_POSTFIX_ENTRY = re.compile(rf"<({_ADDRESS})>:[ \t]+(\S.*)")
_ADDRESS_IN_TEXT = re.compile(rf"<?({_ADDRESS})>?")
_ADDRESS_ALONE = re.compile(rf"[ \t]*<?({_ADDRESS})>?:?[ \t]*")
_REMOTE = (
    re.compile(r"\bhost ([A-Za-z0-9][A-Za-z0-9.-]*)[ \t]?\["),  # Postfix, Exim
    re.compile(r"^([A-Za-z0-9.:-]+?)\.? does not like recipient"),  # qmail
    re.compile(r"\b(?:Connected to|Giving up on) ([A-Za-z0-9.:-]+?)\.?(?:\s|$)"),
)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One recipient as a plain-text bounce lists it."""

    address: str
    detail: str


@dataclass(frozen=True, slots=True)
class _Found:
    format: BounceFormat
    entries: list[_Entry]
    action: Action | None  # None: decided per entry


def _read_plain_text(
    root: Message,
    parts: Sequence[Message],
    original: OriginalHeaders | None,
    message_id: str | None,
) -> BounceReport:
    """Read the first text/plain part as one of the known plain formats."""
    explanation = next((p for p in parts if p.get_content_type() == "text/plain"), None)
    if explanation is None:
        raise ReportError(
            ReportErrorReason.NOT_A_REPORT, "no delivery-status part and no text"
        )
    text = _part_text(explanation)[:_MAX_SCAN_CHARS]
    marker = _marker(text)
    body = text[: marker[0]] if marker else text
    if original is None and marker is not None:
        headers = _headers_of_text(text[marker[1] :])
        original = _original_headers(headers) if headers.keys() else None
    lines = [line[:_MAX_LINE_CHARS] for line in _LINE_BREAK.split(body)]
    recognised = False
    # Postfix and qmail say only in the text whether they gave up or will retry.
    action = Action.DELAYED if _WARNING.search(body) else Action.FAILED
    for found in (
        _exim(lines),
        _qmail(body, lines, action),
        _postfix(lines, action),
        _heuristic(lines, _own_addresses(root)),
    ):
        if found is None:
            continue
        recognised = True
        recipients, skipped = _plain_recipients(found, body)
        if recipients:
            return BounceReport(
                format=found.format,
                recipients=tuple(recipients),
                message_id=message_id,
                original=original,
                skipped=tuple(skipped[:_MAX_SKIPPED]),
            )
    if recognised:
        raise ReportError(
            ReportErrorReason.NO_RECIPIENTS, "plain-text bounce names no usable address"
        )
    raise ReportError(
        ReportErrorReason.NOT_A_REPORT, "no delivery-status part and no known format"
    )


def _marker(text: str) -> tuple[int, int] | None:
    """Start and end of the line that introduces the returned message
    ("------ This is a copy of the message", qmail's "--- Below this line")."""
    for found in _MARKER_LINE.finditer(text):
        if _MARKER_WORDS.search(found.group()[:_MAX_LINE_CHARS]):
            end = text.find("\n", found.end())
            return found.start(), len(text) if end < 0 else end + 1
    return None


def _plain_recipients(
    found: _Found, body: str
) -> tuple[list[BounceRecipient], list[SkippedAddress]]:
    warning = bool(_WARNING.search(body))
    # qmail and Exim say "permanent error" without a code for local failures.
    fallback = "5.0.0" if _PERMANENT.search(body) and not warning else None
    recipients: list[BounceRecipient] = []
    skipped: list[SkippedAddress] = []
    seen: set[str] = set()
    for entry in found.entries[:_MAX_RECIPIENTS]:
        problems: list[SkippedAddress] = []
        address = _address_field(found.format.value, entry.address, problems)
        if address is None:
            skipped.extend(problems)
            continue
        if address in seen:
            continue
        seen.add(address)
        text = _clean(entry.detail, MAX_DIAGNOSTIC_CHARS)
        code = _reply_code(entry.detail)
        status = _enhanced_code(entry.detail) or _class_code(code) or fallback
        action = found.action
        if action is None:
            # The heuristic cannot tell a final 4xx failure from a delay
            # warning; "delayed" counts nothing against the address.
            failed = not warning and status is not None and status[0] == "5"
            action = Action.FAILED if failed else Action.DELAYED
        recipients.append(
            BounceRecipient(
                recipient=address,
                action=action,
                status=status,
                smtp_code=code,
                diagnostic=text,
                remote_mta=_remote(entry.detail),
            )
        )
    return recipients, skipped


def _exim(lines: Sequence[str]) -> _Found | None:
    """Exim: a trigger line, then two-space-indented addresses, each followed
    by more deeply indented detail lines."""
    start = None
    action = Action.FAILED
    for index, line in enumerate(lines):
        if _EXIM_FAILED.search(line):
            start = index + 1
            break
        if _EXIM_DELAYED.search(line):
            start, action = index + 1, Action.DELAYED
            break
    if start is None:
        return None
    entries: list[_Entry] = []
    address: str | None = None
    detail: list[str] = []
    address_indent: int | None = None
    for line in lines[start : start + _MAX_RECIPIENTS * _MAX_DETAIL_LINES]:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" \t"))
        if indent == 0:
            break  # the list is over
        if address_indent is None:
            address_indent = indent
        if indent <= address_indent:
            if address is not None:
                entries.append(_Entry(address, " ".join(detail)))
            address, detail = line.split()[0].rstrip(":"), []
        elif len(detail) < _MAX_DETAIL_LINES:
            detail.append(line.strip())
    if address is not None:
        entries.append(_Entry(address, " ".join(detail)))
    return _Found(BounceFormat.EXIM, entries, action)


def _qmail(body: str, lines: Sequence[str], action: Action) -> _Found | None:
    """qmail: ``<address>:`` alone on a line, the detail on the next lines up
    to a blank line (qmail-send's bounce format)."""
    entries: list[_Entry] = []
    index = 0
    while index < len(lines) and len(entries) < _MAX_RECIPIENTS:
        entry = _QMAIL_ENTRY.fullmatch(lines[index])
        index += 1
        if entry is None:
            continue
        detail: list[str] = []
        while index < len(lines) and lines[index].strip():
            if len(detail) < _MAX_DETAIL_LINES:
                detail.append(lines[index].strip())
            index += 1
        entries.append(_Entry(entry[1], " ".join(detail)))
    if not entries and not _QMAIL.search(body):
        return None
    return _Found(BounceFormat.QMAIL, entries, action)


def _postfix(lines: Sequence[str], action: Action) -> _Found | None:
    """Postfix (bounce(8) text): ``<address>: reason`` with indented
    continuation lines."""
    entries: list[_Entry] = []
    index = 0
    while index < len(lines) and len(entries) < _MAX_RECIPIENTS:
        entry = _POSTFIX_ENTRY.fullmatch(lines[index].rstrip())
        index += 1
        if entry is None:
            continue
        detail = [entry[2].strip()]
        while (
            index < len(lines)
            and lines[index][:1] in (" ", "\t")
            and lines[index].strip()
        ):
            if len(detail) < _MAX_DETAIL_LINES:
                detail.append(lines[index].strip())
            index += 1
        entries.append(_Entry(entry[1], " ".join(detail)))
    if not entries:
        return None
    return _Found(BounceFormat.POSTFIX, entries, action)


def _heuristic(lines: Sequence[str], ignored: set[str]) -> _Found | None:
    """Any line with an address and a 4xx/5xx reply code or status; or an
    address alone on a line followed within a few lines by such a code."""
    entries: list[_Entry] = []
    pending: tuple[str, int] | None = None
    for index, line in enumerate(lines):
        if len(entries) >= _MAX_RECIPIENTS:
            break
        # "user@example.com..." (sendmail): the dots end the sentence.
        addresses = [
            a.rstrip(".")
            for a in _ADDRESS_IN_TEXT.findall(line)[:_MAX_LIST_ITEMS]
            if _canonical_or_none(a) not in ignored
        ]
        coded = _failure_code(line)
        if addresses and coded:
            entries.append(_Entry(addresses[0], line))
            pending = None
        elif addresses and _ADDRESS_ALONE.fullmatch(line):
            pending = (addresses[0], index)
        elif coded and pending is not None and index - pending[1] <= _HEURISTIC_WINDOW:
            entries.append(_Entry(pending[0], line))
            pending = None
    if not entries:
        return None
    return _Found(BounceFormat.HEURISTIC, entries, None)


def _failure_code(line: str) -> bool:
    code = _reply_code(line)
    status = _enhanced_code(line)
    return (code is not None and code >= 400) or (
        status is not None and status[0] in "45"
    )


def _own_addresses(root: Message) -> set[str]:
    """Addresses in the bounce's own envelope headers, never its recipients."""
    own: set[str] = set()
    for name in ("from", "to", "return-path", "reply-to", "sender"):
        value = _header(root, name) or ""
        for address in _ADDRESS_IN_TEXT.findall(value)[:_MAX_LIST_ITEMS]:
            canonical = _canonical_or_none(address)
            if canonical is not None:
                own.add(canonical)
    return own


def _canonical_or_none(address: str) -> str | None:
    try:
        return canonical_address(address.rstrip("."))
    except AddressError:
        return None


def _remote(detail: str) -> str | None:
    for pattern in _REMOTE:
        found = pattern.search(detail)
        if found is not None:
            return _clean(found[1], _MAX_NAME_CHARS)
    return None


# --- values ------------------------------------------------------------------


def _text(value: object) -> str:
    """A raw header value as text: compat32 keeps 8-bit bytes as surrogate
    escapes, which are read back as UTF-8 (RFC 6532) here."""
    text = value if isinstance(value, str) else str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8", "replace")


def _raw_text(value: object) -> str:
    """A raw header value kept as the parser stored it (surrogate escapes)."""
    return value if isinstance(value, str) else str(value)


def _raw_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _clean(value: str | None, limit: int) -> str | None:
    """``value`` without controls, format characters or line breaks, white
    space collapsed, capped at ``limit``; None if nothing is left."""
    if value is None:
        return None
    kept = (
        " " if unicodedata.category(c) in _DROPPED_CATEGORIES else c
        for c in value[: limit * 4]
    )
    cleaned = " ".join("".join(kept).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3] + "..."
    return cleaned or None


def _cleaned_list(values: Iterable[str], *, lower: bool = False) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        cleaned = _clean(value, _MAX_VALUE_CHARS)
        if cleaned is not None:
            found.append(cleaned.lower() if lower else cleaned)
    return tuple(found[:_MAX_LIST_ITEMS])


def _date(value: str | None) -> datetime | None:
    """An RFC 5322 date-time as an aware UTC datetime, or None.

    RFC 5322 §3.3: ``-0000`` (which the stdlib returns naive) means UTC.
    """
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value[:_MAX_NAME_CHARS])
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def _ip(value: str | None) -> str | None:
    """The Source-IP field (RFC 5965 §3.3) as a normalised address, or None."""
    if value is None:
        return None
    text = value.strip().strip("[]")
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text[:64]))
    except ValueError:
        return None


def _incidents(value: str | None) -> int | None:
    """The Incidents field (RFC 5965 §3.2), a count, or None."""
    text = (value or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)
