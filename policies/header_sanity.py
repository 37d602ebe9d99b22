"""Refuses malformed, duplicated or hostile header sections.

A message must have a header section of bounded size, with raw bytes that are
UTF-8 (RFC 6532), each RFC 5322 §3.6 singleton field at most once, a Date that
parses and lies near the time of receipt, a Message-ID of the form
``<left@right>``, recipient fields (To, Cc, Bcc) that parse cleanly, and no
encoded word (RFC 2047) that smuggles control or bidirectional-override
characters into the Subject or a display name. Whether the From, Sender and
Reply-To mailboxes belong to the account is :mod:`policies.sender_domains`'s
business; the two read the headers through :mod:`policies._headers`, once per
message for both.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from datetime import datetime
from email import errors
from email.header import decode_header
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from config.units import Bytes, Seconds
from policies._headers import (
    HeaderFields,
    Unreadable,
    address_list,
    as_text,
    header_fields,
    is_plain,
    parse_date,
    registry_header,
    settings_error,
)
from policies.base import (
    PASS,
    MessageLike,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
    refuse,
)

DAY_SECONDS = 86400.0

SINGLETON_HEADERS = (
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
)
"""Fields RFC 5322 §3.6 allows at most once, in the spelling used in details."""

RECIPIENT_HEADERS = ("To", "Cc", "Bcc")
"""Address fields this check parses (From, Sender, Reply-To: sender_domains)."""

SCANNED_HEADERS = ("Subject", "From", "Sender", "Reply-To", "To", "Cc", "Bcc")
"""Fields whose decoded text must be free of control and bidi characters."""

_SINGLETONS = tuple((name, name.lower()) for name in SINGLETON_HEADERS)
_SCANNED = frozenset(name.lower() for name in SCANNED_HEADERS)
_RECIPIENTS = {name.lower(): name for name in RECIPIENT_HEADERS}

# RFC 5322 §3.6.4 msg-id, without CFWS: "<" id-left "@" id-right ">", each part
# printable ASCII other than "<", ">" and "@" (dot-atom-text or no-fold-literal).
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f\x41-\x7e]+@[\x21-\x3b\x3d\x3f\x41-\x7e]+>")
# Unicode Cc (C0, DEL, C1) other than TAB, and the explicit embeddings,
# overrides and isolates that reorder text on screen (Unicode TR9 §2; the
# "Trojan Source" characters).
_HOSTILE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class Settings(BaseModel):
    """``[policies.header_sanity]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    require_message_id: StrictBool = True
    require_date: StrictBool = True
    max_header_bytes: Bytes = Field(default=64 * 1024, gt=0)
    max_date_skew_seconds: Seconds = Field(
        default=7 * DAY_SECONDS, alias="max_date_skew"
    )


class HeaderSanity:
    """The header section must be well formed, unduplicated and harmless."""

    name = "header_sanity"
    stages = frozenset({Stage.DATA})

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def check(self, ctx: PolicyContext) -> Verdict:
        """Refuse the message at the first header problem found."""
        message = ctx.message
        if message is None:
            return PASS
        size = _header_section_bytes(message.content)
        limit = self.settings.max_header_bytes
        if size > limit:
            return refuse(
                "headers_too_large",
                f"header section is {size} bytes, above the limit of {limit} bytes",
                size_bytes=size,
                max_bytes=limit,
            )
        fields = header_fields(message)
        return (
            _check_encoding(fields)
            or _check_duplicates(fields)
            or self._check_required(fields)
            or _check_hostile(message, fields)
            or self._check_date(fields, ctx.received_at)
            or _check_message_id(fields)
            or _check_recipients(message, fields)
            or PASS
        )

    def _check_required(self, fields: HeaderFields) -> Verdict | None:
        present = fields.by_name
        required = []
        if self.settings.require_date:
            required.append("Date")
        if self.settings.require_message_id:
            required.append("Message-ID")
        for name in required:
            if name.lower() not in present:
                return refuse("missing_header", f"message has no {name} header")
        return None

    def _check_date(
        self, fields: HeaderFields, received_at: datetime
    ) -> Verdict | None:
        raw = fields.first("Date")
        if raw is None:
            return None
        when = parse_date(raw)
        if when is None:
            return refuse(
                "invalid_date", "Date header is not an RFC 5322 date-time (3.3)"
            )
        offset = (when - received_at).total_seconds()
        skew = self.settings.max_date_skew_seconds
        if abs(offset) <= skew:
            return None
        direction = "in the future" if offset > 0 else "in the past"
        return refuse(
            "date_out_of_range",
            f"Date header is {_days(abs(offset))} {direction}; "
            f"at most {_days(skew)} either way is accepted",
            offset_seconds=offset,
            max_skew_seconds=skew,
        )


def _header_section_bytes(content: bytes) -> int:
    """Bytes up to and including the last header line's CRLF."""
    if content.startswith(b"\r\n"):
        return 0
    end = content.find(b"\r\n\r\n")
    return len(content) if end < 0 else end + 2


def _check_encoding(fields: HeaderFields) -> Verdict | None:
    for name, value in fields.items:
        if as_text(value) is None:
            return refuse(
                "invalid_header_encoding",
                f"{name} header holds raw bytes that are not valid UTF-8 (RFC 6532)",
            )
    return None


def _check_duplicates(fields: HeaderFields) -> Verdict | None:
    for name, key in _SINGLETONS:
        count = len(fields.by_name.get(key, ()))
        if count > 1:
            return refuse(
                "duplicate_header",
                f"{name} header appears {count} times; RFC 5322 3.6 allows it once",
                count=count,
            )
    return None


def _check_hostile(message: MessageLike, fields: HeaderFields) -> Verdict | None:
    for key, (name, value) in zip(fields.names, fields.items, strict=True):
        if key not in _SCANNED:
            continue
        text = as_text(value) or value
        if is_plain(text):
            continue  # printable ASCII, no encoded word: it renders as itself
        for rendering in _renderings(message, name, text):
            found = _HOSTILE.search(rendering)
            if found is not None:
                return refuse(
                    "hostile_header",
                    f"{name} header decodes to a {_describe(found.group())}",
                )
    return None


def _renderings(message: MessageLike, name: str, value: str) -> Iterator[str]:
    """The value as written, with its encoded words decoded the liberal way
    (``email.header``), and as ``policy.default`` decodes it for readers."""
    yield value
    yield _decode_words(value)
    header = registry_header(message, name, value)
    if header is None:
        return  # a CR or LF in a display name lands here; the above found it
    yield str(header)
    for address in getattr(header, "addresses", ()):
        yield address.display_name


def _decode_words(value: str) -> str:
    try:
        chunks = decode_header(value)
    except errors.HeaderParseError:
        return ""
    parts = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            parts.append(chunk)
        elif charset is None:
            parts.append(chunk.decode("raw-unicode-escape", "replace"))
        else:
            try:
                parts.append(chunk.decode(charset, "replace"))
            except LookupError:  # unknown charset: Latin-1 still shows controls
                parts.append(chunk.decode("latin-1"))
    return "".join(parts)


def _describe(char: str) -> str:
    code = f"U+{ord(char):04X}"
    if unicodedata.category(char) == "Cc":
        return f"control character ({code})"
    return f"bidirectional formatting character {unicodedata.name(char)} ({code})"


def _check_message_id(fields: HeaderFields) -> Verdict | None:
    raw = fields.first("Message-ID")
    if raw is None or _MSG_ID.fullmatch(raw.strip()):
        return None
    return refuse(
        "invalid_message_id",
        "Message-ID header is not of the form <left@right> (RFC 5322 3.6.4)",
    )


def _check_recipients(message: MessageLike, fields: HeaderFields) -> Verdict | None:
    for key, (_, value) in zip(fields.names, fields.items, strict=True):
        name = _RECIPIENTS.get(key)
        if name is None:
            continue
        parsed = address_list(message, name, as_text(value) or value)
        if isinstance(parsed, Unreadable):
            return refuse(
                "invalid_address_header", f"{name} header is malformed: {parsed.why}"
            )
    return None


def _days(seconds: float) -> str:
    days = round(seconds / DAY_SECONDS, 1)
    return f"{days:g} days"


def from_table(table: Mapping[str, Any], env: PolicyEnv) -> HeaderSanity:
    """Build the check from ``[policies.header_sanity]``; ``ValueError`` names
    the key of a bad or unknown setting."""
    del env  # the check needs nothing but the message and its time of receipt
    try:
        settings = Settings.model_validate(dict(table))
    except ValidationError as exc:
        raise settings_error(exc) from None
    return HeaderSanity(settings)
