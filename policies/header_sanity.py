"""Refuses malformed, duplicated or hostile header sections.

A message must have a header section of bounded size, with raw bytes that are
UTF-8 (RFC 6532), each RFC 5322 §3.6 singleton field at most once, a Date that
parses and lies near the time of receipt, a Message-ID of the form
``<left@right>``, recipient fields (To, Cc, Bcc) that parse cleanly, and no
encoded word (RFC 2047) that smuggles control or bidirectional-override
characters into the Subject or a display name. Whether the From, Sender and
Reply-To mailboxes belong to the account is :mod:`policies.sender_domains`'s
business.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from email import errors, policy
from email.header import decode_header
from email.headerregistry import BaseHeader, DateHeader
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from config.units import Bytes, Seconds
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

# The stdlib header parser raises these (besides HeaderParseError) on some
# malformed input, e.g. IndexError for "x@", AttributeError for "x@[" and
# ValueError for an encoded word that decodes to CR or LF in a display name:
# faults of the input, not ours.
_PARSE_FAULTS = (
    errors.MessageError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    ArithmeticError,
)
# Obsolete syntax (RFC 5322 §4) and UTF-8 local parts (RFC 6532 §3.2) still parse.
_TOLERATED_DEFECTS = (errors.ObsoleteHeaderDefect, errors.NonASCIILocalPartDefect)

_HEADER_FOLD = re.compile(r"\r?\n(?=[ \t])")
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
        fields = _fields(message)
        return (
            _check_encoding(fields)
            or _check_duplicates(fields)
            or self._check_required(fields)
            or _check_hostile(fields)
            or self._check_date(fields, ctx.received_at)
            or _check_message_id(fields)
            or _check_recipients(fields)
            or PASS
        )

    def _check_required(self, fields: list[tuple[str, str]]) -> Verdict | None:
        present = {name.lower() for name, _ in fields}
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
        self, fields: list[tuple[str, str]], received_at: datetime
    ) -> Verdict | None:
        raw = _first(fields, "Date")
        if raw is None:
            return None
        when = _parse_date(raw)
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


def _fields(message: MessageLike) -> list[tuple[str, str]]:
    """Every header field as (name, unfolded raw value), without parsing any."""
    return [
        (name, _HEADER_FOLD.sub("", str(value)))
        for name, value in message.headers.raw_items()
    ]


def _first(fields: list[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    return next((value for key, value in fields if key.lower() == wanted), None)


def _as_text(raw: str) -> str | None:
    """The raw value with its surrogate-escaped bytes read as UTF-8, or ``None``
    when they are not UTF-8."""
    if raw.isascii():
        return raw
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return None


def _check_encoding(fields: list[tuple[str, str]]) -> Verdict | None:
    for name, value in fields:
        if _as_text(value) is None:
            return refuse(
                "invalid_header_encoding",
                f"{name} header holds raw bytes that are not valid UTF-8 (RFC 6532)",
            )
    return None


def _check_duplicates(fields: list[tuple[str, str]]) -> Verdict | None:
    counts = Counter(name.lower() for name, _ in fields)
    for name in SINGLETON_HEADERS:
        count = counts[name.lower()]
        if count > 1:
            return refuse(
                "duplicate_header",
                f"{name} header appears {count} times; RFC 5322 3.6 allows it once",
                count=count,
            )
    return None


def _check_hostile(fields: list[tuple[str, str]]) -> Verdict | None:
    scanned = {name.lower() for name in SCANNED_HEADERS}
    for name, value in fields:
        if name.lower() not in scanned:
            continue
        for text in _renderings(name, _as_text(value) or value):
            found = _HOSTILE.search(text)
            if found is not None:
                return refuse(
                    "hostile_header",
                    f"{name} header decodes to a {_describe(found.group())}",
                )
    return None


def _renderings(name: str, value: str) -> Iterator[str]:
    """The value as written, with its encoded words decoded the liberal way
    (``email.header``), and as ``policy.default`` decodes it for readers."""
    yield value
    yield _decode_words(value)
    try:
        header: object = policy.default.header_factory(name, value)
    except _PARSE_FAULTS:
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


def _parse_date(raw: str) -> datetime | None:
    """The Date as an aware datetime (no zone, "-0000", read as UTC), or ``None``."""
    try:
        header: object = policy.default.header_factory("Date", raw)
    except _PARSE_FAULTS:
        return None
    if isinstance(header, BaseHeader) and header.defects:
        return None
    if not isinstance(header, DateHeader) or header.datetime is None:
        return None
    when = header.datetime
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _check_message_id(fields: list[tuple[str, str]]) -> Verdict | None:
    raw = _first(fields, "Message-ID")
    if raw is None or _MSG_ID.fullmatch(raw.strip()):
        return None
    return refuse(
        "invalid_message_id",
        "Message-ID header is not of the form <left@right> (RFC 5322 3.6.4)",
    )


def _check_recipients(fields: list[tuple[str, str]]) -> Verdict | None:
    wanted = {name.lower(): name for name in RECIPIENT_HEADERS}
    for key, value in fields:
        name = wanted.get(key.lower())
        if name is None:
            continue
        problem = _address_problem(name, _as_text(value) or value)
        if problem is not None:
            return refuse(
                "invalid_address_header", f"{name} header is malformed: {problem}"
            )
    return None


def _address_problem(name: str, value: str) -> str | None:
    try:
        header: object = policy.default.header_factory(name, value)
    except _PARSE_FAULTS:
        return "it is not an RFC 5322 address list"
    defects = header.defects if isinstance(header, BaseHeader) else ()
    for defect in defects:
        if not isinstance(defect, _TOLERATED_DEFECTS):
            return str(defect).lower() or "malformed address"
    return None


def _days(seconds: float) -> str:
    days = round(seconds / DAY_SECONDS, 1)
    return f"{days:g} days"


def _settings_error(exc: ValidationError) -> ValueError:
    """A pydantic error as ``"<key>: <reason>"`` lines joined by "; "."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            reason = "unknown setting"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{key}: {reason}")
    return ValueError("; ".join(problems))


def from_table(table: Mapping[str, Any], env: PolicyEnv) -> HeaderSanity:
    """Build the check from ``[policies.header_sanity]``; ``ValueError`` names
    the key of a bad or unknown setting."""
    del env  # the check needs nothing but the message and its time of receipt
    try:
        settings = Settings.model_validate(dict(table))
    except ValidationError as exc:
        raise _settings_error(exc) from None
    return HeaderSanity(settings)
