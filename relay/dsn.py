"""Delivery status notifications: building bounces and recognising them.

This module owns the wire format of the failure reports the relay sends back to
the envelope sender (RFC 3464 ``message/delivery-status`` inside an RFC 6522
``multipart/report``) and the check that keeps the relay from bouncing a bounce.
It does no I/O: callers hand in what they know about the failed message and get
back bytes ready to queue.
"""

from __future__ import annotations

import binascii
import contextlib
import email.policy
import re
import textwrap
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import Message, MIMEPart
from email.parser import BytesHeaderParser, HeaderParser
from email.utils import format_datetime, make_msgid

__all__ = ["FailedRecipient", "build_dsn", "is_delivery_report"]

# SMTP line endings and 78-column folding (RFC 5322 §2.1.1), transfer encodings
# chosen as if the next hop lacked 8BITMIME so the report stays 7-bit, and
# header values that came from a parser written exactly as parsed: the DSN field
# blocks below are folded here, because the stdlib would treat them as
# unstructured text and RFC 2047-encode long words, which RFC 2047 §5 does not
# allow outside comments and phrases.
_POLICY = email.policy.SMTP.clone(cte_type="7bit", refold_source="none")
# The same, for a DSN whose To: address is itself UTF-8 (RFC 6532 §3.2): such a
# report can only be delivered over SMTPUTF8 anyway.
_UTF8_POLICY = _POLICY.clone(utf8=True)

_MAX_HEADER_BLOCK = 64 * 1024
# RFC 5322 §2.1.1: at most 998 octets per line; keep DSN field values well below
# that so even an unfoldable value fits on one line with its field name.
_MAX_FIELD_VALUE = 900
_MAX_TEXT = 2000
_FOLD_AT = 78
_MAX_RAW_LINE = 998

_STATUS = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")  # RFC 3463 §2
_PARTIAL_ESCAPE = re.compile(r"\\(?:x(?:\{[0-9A-F]*)?)?\Z")
_HOST_CHARS = re.compile(r"[^A-Za-z0-9.\-_]")
# RFC 5322 §3.4.1 dot-atom (\w admits UTF-8 letters, RFC 6532 §3.2) or
# domain-literal.
_DOMAIN = re.compile(
    r"[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*|\[[\x21-\x5a\x5e-\x7e]*\]"
)
_ADDRESS_LITERAL = re.compile(r"\[[A-Za-z0-9.:]+\]")  # RFC 5321 §4.1.3
# Unicode categories never kept in text taken from the outside: controls
# (including CR/LF), format characters such as bidi overrides, lone surrogates
# (which cannot be encoded) and the line/paragraph separators.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient the relay gave up on, as reported in a DSN."""

    address: str
    status: str
    diagnostic: str
    smtp_code: int | None = None
    remote_mta: str | None = None


def build_dsn(
    *,
    reporting_mta: str,
    dsn_from: str,
    original_mail_from: str,
    original_message: bytes,
    queue_id: str,
    arrival: datetime,
    failures: Sequence[FailedRecipient],
    now: datetime,
) -> bytes:
    """Return the DSN message as bytes with CRLF line endings, ready to queue.

    The report is a ``multipart/report; report-type=delivery-status`` (RFC 6522
    §3) with a human-readable explanation, the RFC 3464 status fields and the
    header block of ``original_message`` as ``text/rfc822-headers``.  Text from
    the outside (diagnostics, addresses, the original message) is sanitised
    rather than rejected, so odd input never makes this raise.  The output is
    7-bit unless ``original_mail_from`` or ``dsn_from`` is itself non-ASCII, in
    which case the address header carries UTF-8 (RFC 6532).

    Raises :class:`ValueError` only for caller errors: no ``failures``, or an
    empty ``original_mail_from`` (RFC 5321 §4.5.5: never send a DSN to the
    null reverse-path).
    """
    if not failures:
        raise ValueError("build_dsn needs at least one failed recipient")
    sender = _clean_address(original_mail_from)
    if not sender:
        raise ValueError("no DSN may be sent to the null reverse-path")
    mta = _hostname(reporting_mta) or "localhost"
    now_utc = _as_utc(now)
    arrival_utc = _as_utc(arrival)

    # MIMEPart throughout, not EmailMessage: the latter's set_content() would
    # give every part a MIME-Version header of its own.
    root = MIMEPart(policy=_POLICY)
    root["From"] = _address("Mail Delivery System", _clean_address(dsn_from))
    root["To"] = _address("", sender)
    root["Subject"] = "Undelivered Mail Returned to Sender"
    root["Date"] = now_utc
    root["Message-ID"] = make_msgid(domain=mta)
    root["Auto-Submitted"] = "auto-replied"  # RFC 3834 §5
    root["MIME-Version"] = "1.0"
    root["Content-Type"] = "multipart/report; report-type=delivery-status"
    root.preamble = "This is a MIME-encapsulated delivery status notification.\n"
    root.attach(_explanation_part(mta, _clean_text(queue_id), arrival_utc, failures))
    root.attach(_status_part(mta, arrival_utc, now_utc, failures))
    root.attach(_headers_part(original_message))

    utf8 = not (root["From"].isascii() and root["To"].isascii())
    return root.as_bytes(policy=_UTF8_POLICY if utf8 else _POLICY)


def is_delivery_report(message: bytes) -> bool:
    """True if the message's top-level Content-Type is multipart/report with
    report-type=delivery-status (RFC 3464/6522), so the relay never sends a DSN
    about a DSN.

    Only the header block (up to the first empty line) is looked at, and
    garbage gives False rather than an exception.  RFC 6533
    ``global-delivery-status`` reports count as delivery reports too.
    """
    headers = _header_block(message)
    if b"content-type" not in headers.lower():
        return False
    parser = BytesHeaderParser(policy=email.policy.default)
    try:
        parsed = parser.parsebytes(headers)
        content_type = parsed.get_content_type()
        report_type = parsed.get_param("report-type")
    # The stdlib's header parser is not total: some malformed parameters make
    # it raise IndexError or AttributeError (e.g. b"multipart/report; \x00*"
    # on CPython 3.11), and this check must answer rather than fail.
    except Exception:  # noqa: BLE001
        return False
    if content_type != "multipart/report" or not isinstance(report_type, str):
        return False
    return report_type.strip().lower() in {"delivery-status", "global-delivery-status"}


# --- the three parts -------------------------------------------------------


def _explanation_part(
    mta: str, queue_id: str, arrival: datetime, failures: Sequence[FailedRecipient]
) -> MIMEPart:
    """Build the human-readable first part (RFC 6522 §3)."""
    recipients = (
        "one of its recipients" if len(failures) == 1 else "some of its recipients"
    )
    lines = [
        f"This is the mail delivery system at {mta}.",
        "",
        *_wrap(
            f"Your message could not be delivered to {recipients}. The details"
            " are below; the header of your message is attached."
        ),
        "",
        f"Queue ID: {queue_id or 'unknown'}",
        f"Arrival date: {format_datetime(arrival)}",
    ]
    for failure in failures:
        status = _status(failure.status)
        lines += ["", f"<{_clean_text(failure.address)}>"]
        lines += _wrap(f"Status: {status} ({_describe(status)})", indent="    ")
        remote = _hostname(failure.remote_mta or "")
        if remote:
            lines += _wrap(f"Remote server: {remote}", indent="    ")
        diagnostic = _clean_text(failure.diagnostic)
        code = _smtp_code(failure.smtp_code)
        if code is not None:
            lines += _wrap(f"Reply: {_with_code(code, diagnostic)}", indent="    ")
        elif diagnostic:
            lines += _wrap(f"Reason: {diagnostic}", indent="    ")
    part = MIMEPart(policy=_POLICY)
    # With the 7-bit policy the stdlib picks 7bit, quoted-printable or base64.
    part.set_content("\n".join(lines) + "\n", charset="utf-8")
    return part


def _status_part(
    mta: str, arrival: datetime, now: datetime, failures: Sequence[FailedRecipient]
) -> MIMEPart:
    """Build the ``message/delivery-status`` part (RFC 3464 §2.1).

    The stdlib models this body as a list of header-only messages, one per
    field group, and its generator separates them with blank lines.
    """
    per_message = [
        ("Reporting-MTA", f"dns; {mta}"),  # RFC 3464 §2.2.2
        ("Arrival-Date", format_datetime(arrival)),  # RFC 3464 §2.2.5
    ]
    blocks: list[Message[str, str] | str] = [_field_block(per_message)]
    last_attempt = format_datetime(now)
    for failure in failures:
        fields = [
            ("Final-Recipient", _final_recipient(failure.address)),  # §2.3.2
            ("Action", "failed"),  # §2.3.3
            ("Status", _status(failure.status)),  # §2.3.4
        ]
        remote = _hostname(failure.remote_mta or "")
        if remote:
            fields.append(("Remote-MTA", f"dns; {remote}"))  # §2.3.5
        diagnostic = _clean_text(failure.diagnostic)
        code = _smtp_code(failure.smtp_code)
        # §2.3.6: "smtp" when an SMTP server replied, else a private X- type.
        if code is not None:
            fields.append(
                ("Diagnostic-Code", f"smtp; {_ascii(_with_code(code, diagnostic))}")
            )
        elif diagnostic:
            fields.append(("Diagnostic-Code", f"X-Relay; {_ascii(diagnostic)}"))
        fields.append(("Last-Attempt-Date", last_attempt))  # §2.3.7
        blocks.append(_field_block(fields))
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    return part


def _headers_part(original: bytes) -> MIMEPart:
    """Build the ``text/rfc822-headers`` part (RFC 6522 §4).

    The header block is kept byte for byte apart from line endings, which
    become CRLF.  If it is not plain 7-bit text with short lines it is sent
    quoted-printable, which decodes back to the same bytes.
    """
    block = _header_block(original)
    part = MIMEPart(policy=_POLICY)
    if _is_7bit_text(block):
        part.set_content(block, "text", "rfc822-headers", cte="7bit")
    else:
        # set_content() encodes bytes with istext=False, which turns every line
        # break into "=0D=0A"; text mode keeps the lines readable.
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = "quoted-printable"
        part.set_payload(binascii.b2a_qp(block, istext=True).decode("ascii"))
    return part


# --- DSN fields ------------------------------------------------------------


def _field_block(fields: Sequence[tuple[str, str]]) -> Message[str, str]:
    """Return one DSN field group as a header-only message.

    Values are folded here (RFC 5322 §2.2.3, only at spaces, so unfolding gives
    the value back) and parsed, so that the generator writes them unchanged.
    """
    text = "".join(_fold(name, value) for name, value in fields)
    return HeaderParser(policy=_POLICY).parsestr(text)


def _fold(name: str, value: str) -> str:
    """Return ``name: value`` folded at spaces to 78 columns, CRLF-terminated."""
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        if len(current) > len(name) + 1 and len(current) + 1 + len(word) > _FOLD_AT:
            lines.append(current)
            current = f" {word}"
        else:
            current = f"{current} {word}"
    lines.append(current)
    return "\r\n".join(lines) + "\r\n"


def _final_recipient(address: str) -> str:
    """Return the value of a Final-Recipient field for ``address``.

    ASCII addresses use the ``rfc822`` type.  Others use RFC 6533 §3's ``utf-8``
    type in its 7-bit ``utf-8-addr-xtext`` form, which message/delivery-status
    requires.
    """
    clean = _clean_address(address)
    if clean.isascii():
        return f"rfc822; {_truncate(clean)}"
    return f"utf-8; {_truncate(''.join(_xtext_chars(clean)))}"


def _xtext_chars(address: str) -> Iterator[str]:
    r"""Yield ``address`` as RFC 6533 utf-8-addr-xtext pieces.

    QCHAR is printable ASCII except SP, "\", "+" and "="; everything else is an
    EmbeddedUnicodeChar ``\x{HEX}``.
    """
    for char in address:
        if "!" <= char <= "~" and char not in "\\+=":
            yield char
        else:
            yield _embedded(char)


def _ascii(text: str) -> str:
    """Return ``text`` (already cleaned) as printable ASCII, capped in length.

    Non-ASCII characters become RFC 6533 EmbeddedUnicodeChar escapes, the only
    7-bit spelling of Unicode defined for DSN fields.
    """
    return _truncate("".join(c if c.isascii() else _embedded(c) for c in text))


def _embedded(char: str) -> str:
    """Return ``char`` as an RFC 6533 EmbeddedUnicodeChar, e.g. ``\\x{E9}``."""
    return f"\\x{{{ord(char):02X}}}"


def _truncate(value: str) -> str:
    """Cap an ASCII field value so that no line can exceed 998 octets."""
    if len(value) <= _MAX_FIELD_VALUE:
        return value
    # Do not leave half an EmbeddedUnicodeChar behind.
    return _PARTIAL_ESCAPE.sub("", value[: _MAX_FIELD_VALUE - 3]) + "..."


# --- cleaning outside input ------------------------------------------------


def _clean_text(text: str) -> str:
    """Return ``text`` without control/format characters, whitespace collapsed.

    Multi-line SMTP replies become one line; the result is capped in length.
    """
    kept = (
        " " if unicodedata.category(c) in _DROPPED_CATEGORIES else c
        for c in text[: _MAX_TEXT * 4]
    )
    cleaned = " ".join("".join(kept).split())
    if len(cleaned) > _MAX_TEXT:
        cleaned = cleaned[: _MAX_TEXT - 3] + "..."
    return cleaned


def _clean_address(address: str) -> str:
    """Return an envelope address without controls, whitespace ends or <>."""
    clean = "".join(
        c for c in address if unicodedata.category(c) not in _DROPPED_CATEGORIES
    ).strip()
    if clean.startswith("<") and clean.endswith(">"):
        clean = clean[1:-1].strip()
    return clean


def _address(display_name: str, address: str) -> Address:
    """Return a header Address for an envelope address, whatever its syntax.

    Building from the parts rather than parsing an addr-spec makes the stdlib
    quote odd local parts (``"a b"@example.com``) instead of refusing them.
    The domain must be a dot-atom (UTF-8 allowed, RFC 6532 §3.2) or a domain
    literal (RFC 5322 §3.4.1).
    """
    local, at, domain = address.rpartition("@")
    if not (at and local and _DOMAIN.fullmatch(domain)):
        # The stdlib does not check domains (and crashes on some, e.g. "a@[");
        # an address it cannot split is quoted whole as a local part.
        local, domain = address, ""
    return Address(display_name=display_name, username=local, domain=domain)


def _hostname(name: str) -> str:
    """Return ``name`` as an ASCII host name or address literal, or ``""``.

    Non-ASCII names are IDNA-encoded; characters that cannot appear in a host
    name are dropped (the stdlib header parser crashes on some, e.g. a lone
    "[" in a Message-ID domain).
    """
    name = name.strip()
    if _ADDRESS_LITERAL.fullmatch(name):
        return name
    if not name.isascii():
        # On failure the unusable characters are dropped below.
        with contextlib.suppress(UnicodeError):
            name = name.encode("idna").decode("ascii")
    return _HOST_CHARS.sub("", name).strip(".")[:255]


def _status(status: str) -> str:
    """Return ``status`` if it is an RFC 3463 code, else "5.0.0" (§3.1)."""
    status = status.strip()
    return status if _STATUS.fullmatch(status) else "5.0.0"


def _describe(status: str) -> str:
    """Return a short English reading of an RFC 3463 status class."""
    if status.startswith("5."):
        return "permanent failure"
    if status == "4.4.7":
        return "delivery time expired"
    if status.startswith("4."):
        return "gave up after temporary failures"
    return "failed"


def _smtp_code(code: int | None) -> int | None:
    """Return ``code`` if it is a plausible SMTP reply code (RFC 5321 §4.2)."""
    if code is None or isinstance(code, bool) or not 200 <= code <= 599:
        return None
    return code


def _with_code(code: int, diagnostic: str) -> str:
    """Return ``"<code> <diagnostic>"``, not repeating a code already there."""
    if re.match(rf"{code}(?:[ -]|$)", diagnostic):
        return diagnostic
    return f"{code} {diagnostic}".rstrip()


def _as_utc(moment: datetime) -> datetime:
    """Return ``moment`` in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _wrap(text: str, indent: str = "") -> list[str]:
    """Wrap ``text`` for the explanation part without splitting long words."""
    return textwrap.wrap(
        text,
        width=76,
        initial_indent=indent,
        subsequent_indent=indent + "  " if indent else "",
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


# --- the original header block ---------------------------------------------


def _header_block(message: bytes) -> bytes:
    """Return the header block of ``message`` with CRLF line endings.

    The block is everything before the first empty line (all of ``message`` if
    there is none).  CRLF, bare LF and bare CR all end a line.  The result is
    capped at 64 KiB, cut at a line boundary where possible.
    """
    window = bytes(message[:_MAX_HEADER_BLOCK])
    lines: list[bytes] = []
    for line in window.splitlines():
        if not line:
            break
        lines.append(line)
    block = b"".join(line + b"\r\n" for line in lines)
    if len(block) > _MAX_HEADER_BLOCK:
        cut = block.rfind(b"\r\n", 0, _MAX_HEADER_BLOCK - 1)
        block = (
            block[: cut + 2] if cut > 0 else block[: _MAX_HEADER_BLOCK - 2] + b"\r\n"
        )
    return block


def _is_7bit_text(block: bytes) -> bool:
    """True if ``block`` can go as 7bit (RFC 2045 §2.7): short ASCII lines."""
    return all(
        len(line) <= _MAX_RAW_LINE and all(32 <= b < 127 or b == 9 for b in line)
        for line in block.split(b"\r\n")
    )
