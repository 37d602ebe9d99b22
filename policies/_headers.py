"""Header reading shared by :mod:`policies.header_sanity` and
:mod:`policies.sender_domains`: each header field read once per message, each
address or date header parsed at most once, and the stdlib's slow header
registry (``policy.default``) spared for the values that need it.

* :func:`header_fields` lists every field as (name, unfolded raw value), exactly
  as ``message.headers.raw_items()`` would, by splitting the raw header block
  (a few microseconds instead of the 50 of a ``policy.default`` parse); any
  block the email package might read differently (bare CR or LF, a line that is
  neither a field nor a continuation, a Unix "From " line) goes to that parse.
* :func:`address_list` reads the plain forms ``local@domain``, ``<local@domain>``
  and ``Display Name <local@domain>`` (display names of atoms and blanks only,
  printable ASCII, no encoded word) with one strict regex, each mailbox as the
  registry would read it; everything else is parsed by the registry, once per
  message for both checks.
* :func:`parse_date` is the registry's ``DateHeader`` without the registry.

Private to the two checks: the results are theirs to interpret.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import errors, policy
from email.headerregistry import AddressHeader, BaseHeader
from email.utils import parsedate_to_datetime
from typing import Final

from pydantic import ValidationError

from policies.base import MessageLike
from policies.settings import describe

# The stdlib header parser raises these (besides HeaderParseError) on some
# malformed input, e.g. IndexError for "x@", AttributeError for "x@[",
# UnboundLocalError for "x@[ " (CPython 3.11's get_domain_literal) and
# ValueError for an encoded word that decodes to CR or LF in a display name.
# They are faults of the input, not of the relay: "unparsable" verdicts.
PARSE_FAULTS = (
    errors.MessageError,
    ValueError,
    LookupError,
    TypeError,
    AttributeError,
    ArithmeticError,
    UnboundLocalError,
)

# Obsolete syntax (RFC 5322 §4: "must" be accepted, e.g. an unquoted "." in a
# display name) and UTF-8 local parts (RFC 6532 §3.2) still parse unambiguously.
TOLERATED_DEFECTS = (errors.ObsoleteHeaderDefect, errors.NonASCIILocalPartDefect)

NOT_AN_ADDRESS_LIST: Final = "it is not an RFC 5322 address list"

_DATE_CACHE_SIZE = 256
"""Distinct Date values remembered across messages (datetimes are immutable)."""
_ADDRESS_CACHE_SIZE = 4096
"""Distinct plain address lists remembered across messages (tuples of frozen
mailboxes)."""

FIELDS_MEMO: Final = "policies._headers.fields"
PARSED_MEMO: Final = "policies._headers.parsed"

_HEADER_FOLD = re.compile(r"\r?\n(?=[ \t])")
# A field the email package's feed parser reads as such (its headerRE without
# the empty name it drops and the "From " envelope line it sets aside): its name,
# and its value after the blanks that follow the colon, up to the CRLF that ends
# its last continuation line. Anything else, a bare CR or LF included, is junk.
_FIELD_OR_JUNK = re.compile(
    r"([\x21-\x39\x3b-\x7e]+):[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n|(.)",
    re.DOTALL,
)
# Printable ASCII and TAB: nothing that decodes or renders as anything else.
_PLAIN = re.compile(r"[\t\x20-\x7e]*")
# RFC 5322 §3.2.3 atext, §3.4.1 dot-atom local part; the domain in LDH labels.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDR_SPEC = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_MAILBOX = re.compile(
    rf"[ \t]*(?:(?P<bare>{_ADDR_SPEC})"
    rf"|(?P<name>{_ATEXT}+(?:[ \t]+{_ATEXT}+)*)?[ \t]*<(?P<angle>{_ADDR_SPEC})>)"
    r"[ \t]*"
)
_BLANKS = re.compile(r"[ \t]+")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """One mailbox as the header registry reads it (``Address``)."""

    display_name: str
    addr_spec: str


@dataclass(frozen=True, slots=True)
class AddressList:
    """An address header that parsed without defects (tolerated ones aside)."""

    mailboxes: tuple[Mailbox, ...]
    """Every mailbox, inside groups or not."""
    grouped: bool
    """Some mailboxes (or none) were written with group syntax."""


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Why a header or an address cannot be read, in a few words."""

    why: str


# -- fields ---------------------------------------------------------------------


class HeaderFields:
    """Every header field of a message as (name, unfolded raw value), in order,
    and indexed by lower-cased name. Raw 8-bit bytes are surrogate-escaped, as
    the email package gives them."""

    __slots__ = ("by_name", "items", "names")

    def __init__(self, items: tuple[tuple[str, str], ...]) -> None:
        self.items = items
        self.names = tuple([name.lower() for name, _ in items])
        """The lower-cased names, in the order of ``items``."""
        by_name: dict[str, tuple[str, ...]] = {}
        repeated: dict[str, list[str]] = {}
        for name, (_, value) in zip(self.names, items, strict=True):
            if name not in by_name:
                by_name[name] = (value,)
            elif name in repeated:
                repeated[name].append(value)
            else:
                repeated[name] = [*by_name[name], value]
        for name, values in repeated.items():
            by_name[name] = tuple(values)
        self.by_name = by_name

    def values(self, name: str) -> tuple[str, ...]:
        """Every ``name`` field's value, in order."""
        return self.by_name.get(name.lower(), ())

    def first(self, name: str) -> str | None:
        """The first ``name`` field's value, or ``None``."""
        values = self.by_name.get(name.lower())
        return values[0] if values else None


def header_fields(message: MessageLike) -> HeaderFields:
    """The message's header fields, read without parsing any; once per message."""
    return message.memo(FIELDS_MEMO, lambda: HeaderFields(read_fields(message)))


def read_fields(message: MessageLike) -> tuple[tuple[str, str], ...]:
    """Every header field as (name, unfolded raw value), as
    ``message.headers.raw_items()`` gives them, usually without that parse."""
    fields = split_header_block(message.content)
    if fields is None:
        fields = tuple(
            (name, _HEADER_FOLD.sub("", str(value)))
            for name, value in message.headers.raw_items()
        )
    return fields


def split_header_block(content: bytes) -> tuple[tuple[str, str], ...] | None:
    """The fields of ``content``'s header section as ``message.headers.raw_items()``
    reads them (values unfolded), or ``None`` when the block is not plainly a
    sequence of CRLF-terminated fields and continuation lines."""
    if content.startswith(b"\r\n"):
        return ()
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return None
    fields = []
    for name, value, junk in _FIELD_OR_JUNK.findall(
        content[: end + 2].decode("ascii", "surrogateescape")
    ):
        if junk:
            # A continuation first, a line without a name, a bare CR or LF:
            # the parser reads those otherwise.
            return None
        # Unfolded: the CRLFs of the folds go, the blanks after them stay.
        fields.append((name, value.replace("\r\n", "") if "\r" in value else value))
    return tuple(fields)


def as_text(raw: str) -> str | None:
    """The raw value with its surrogate-escaped bytes read as UTF-8 (RFC 6532),
    or ``None`` when they are not UTF-8."""
    if raw.isascii():
        return raw
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return None


def is_plain(text: str) -> bool:
    """True if ``text`` is printable ASCII (and TAB) without an encoded word:
    it reads, decodes and renders as itself."""
    return "=?" not in text and _PLAIN.fullmatch(text) is not None


# -- parses ---------------------------------------------------------------------


def registry_header(message: MessageLike, name: str, text: str) -> BaseHeader | None:
    """``policy.default.header_factory(name, text)``, once per message for both
    checks, or ``None`` if it raised a parse fault."""
    cache = _cache(message).registry
    key = (name.lower(), text)
    if key in cache:
        return cache[key]
    header: BaseHeader | None
    try:
        header = policy.default.header_factory(name, text)
    except PARSE_FAULTS:
        header = None
    cache[key] = header
    return header


def address_list(
    message: MessageLike, name: str, text: str
) -> AddressList | Unreadable:
    """The address header ``name`` (already decoded text) as the registry reads
    it, or why it cannot be read; once per message for both checks."""
    cache = _cache(message).addresses
    key = (name.lower(), text)
    found = cache.get(key)
    if found is None:
        fast = simple_mailboxes(text)
        if fast is not None:
            found = AddressList(fast, grouped=False)
        else:
            found = _address_list_of(registry_header(message, name, text))
        cache[key] = found
    return found


@functools.lru_cache(maxsize=_ADDRESS_CACHE_SIZE)
def simple_mailboxes(text: str) -> tuple[Mailbox, ...] | None:
    """The mailboxes of a plain address list (``a@x.example, Name <b@y.example>``)
    as the registry reads them, or ``None`` when ``text`` is anything else.
    Remembered: a sender writes the same From on every message."""
    if not is_plain(text):
        return None
    mailboxes = []
    for item in text.split(","):
        found = _SIMPLE_MAILBOX.fullmatch(item)
        if found is None:
            return None
        bare, name, angle = found.group("bare", "name", "angle")
        if bare is not None:
            mailboxes.append(Mailbox("", bare))
        else:
            mailboxes.append(Mailbox(_BLANKS.sub(" ", name) if name else "", angle))
    return tuple(mailboxes)


def full_address_list(name: str, text: str) -> AddressList | Unreadable:
    """The registry's reading of an address header, with no fast path and no
    memo (the reference :func:`address_list` must agree with)."""
    try:
        header: object = policy.default.header_factory(name, text)
    except PARSE_FAULTS:
        header = None
    return _address_list_of(header)


def _address_list_of(header: object) -> AddressList | Unreadable:
    if header is None:
        return Unreadable(NOT_AN_ADDRESS_LIST)
    defects = header.defects if isinstance(header, BaseHeader) else ()
    for defect in defects:
        if not isinstance(defect, TOLERATED_DEFECTS):
            return Unreadable(str(defect).lower() or "malformed address")
    if not isinstance(header, AddressHeader):
        return Unreadable("it is not an address header")
    return AddressList(
        tuple(Mailbox(a.display_name, a.addr_spec) for a in header.addresses),
        grouped=any(group.display_name is not None for group in header.groups),
    )


@functools.lru_cache(maxsize=_DATE_CACHE_SIZE)
def parse_date(raw: str) -> datetime | None:
    """The Date as an aware datetime (no zone, "-0000", read as UTC), or ``None``.

    What ``policy.default``'s DateHeader reads, without the registry: it calls
    ``parsedate_to_datetime`` (a ValueError is its InvalidDateDefect), then only
    renders the result (``format_datetime``, which cannot fail on a datetime
    from ``parsedate_to_datetime``: whole-minute offsets under a day).
    Remembered: a mailer sending many messages a second writes the same Date
    on each of them.
    """
    if not raw:
        return None  # HeaderMissingRequiredValue
    try:
        when = parsedate_to_datetime(raw)
    except PARSE_FAULTS:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class _Parsed:
    """One message's parses, keyed by (lower-cased name, decoded value)."""

    __slots__ = ("addresses", "registry")

    def __init__(self) -> None:
        self.registry: dict[tuple[str, str], BaseHeader | None] = {}
        self.addresses: dict[tuple[str, str], AddressList | Unreadable] = {}


def _cache(message: MessageLike) -> _Parsed:
    return message.memo(PARSED_MEMO, _Parsed)


# -- settings -------------------------------------------------------------------


def settings_error(exc: ValidationError) -> ValueError:
    """A pydantic error as ``"<key>: <reason>"`` lines joined by "; "."""
    return ValueError(describe(exc))
