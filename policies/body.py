"""The sender's own body text and links, decoded once per message and shared.

:func:`body_of` walks the MIME tree of the message (:mod:`policies._mime`: the
parts ``policy.default`` would give, split cheaply), decodes each
text/plain and text/html part (transfer encoding and charset), turns HTML into its
visible text and collects links: ``<a href>`` anchors with their visible text, and
bare URLs in plain text with their line. Attachments, non-text parts and attached
messages (``message/*``: someone else's mail) are skipped. Nothing here raises on
broken MIME: what could not be read is named in :attr:`Body.problems`.

:func:`extract` reads a tree of message objects; :func:`read_body` reads the usual
message from its bytes without building one (:func:`policies._mime.fast_parts`),
with the same result, and gives any other to :func:`extract`.

HTML is read by :mod:`policies._html`. Deciding what the text and links mean is
left to the checks (:mod:`policies.optout_link`,
:mod:`policies.content_categories`).
"""

from __future__ import annotations

import asyncio
import binascii
import re
import unicodedata
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from email.errors import MessageError
from email.message import Message
from typing import Any

from policies._html import (
    CONTEXT_CHARS,
    MAX_LINK_TEXT_CHARS,
    MAX_URL_CHARS,
    read_html,
    sanitize_html,
    squash,
)
from policies._mime import FastPart, content_type, disposition, fast_parts, mime_tree
from policies.base import MessageLike

__all__ = [
    "MAX_DEPTH",
    "MAX_LINKS",
    "MAX_PART_SOURCE_CHARS",
    "MAX_PART_TEXT_CHARS",
    "MAX_TOTAL_TEXT_CHARS",
    "MEMO_KEY",
    "THREAD_THRESHOLD_BYTES",
    "Body",
    "Link",
    "body_of",
    "extract",
    "fold",
    "load_body",
    "read_body",
    "sanitize_html",
]

MEMO_KEY = "body"

MAX_PART_TEXT_CHARS = 1024 * 1024
"""Visible text kept of one part; the rest is still read for links."""
MAX_TOTAL_TEXT_CHARS = 4 * 1024 * 1024
"""Visible text kept of the whole message."""
MAX_PART_SOURCE_CHARS = 8 * 1024 * 1024
"""Decoded source read of one part: beyond it, only its head and tail are read
(an opt-out footer sits at the end)."""
_SOURCE_TAIL_CHARS = 2 * 1024 * 1024
MAX_LINKS = 10_000
"""Links kept: the first half and the last half (footers again)."""
MAX_DEPTH = 64
"""MIME nesting read; deeper parts are skipped."""
THREAD_THRESHOLD_BYTES = 256 * 1024
"""Messages above this size are decoded in a worker thread (:func:`load_body`)."""

# Errors the stdlib email package and codecs raise on hostile input, per part.
# HeaderParseError is a MessageError; UnicodeError is a ValueError.
_PART_ERRORS = (
    LookupError,
    ValueError,
    TypeError,
    AttributeError,
    AssertionError,
    MessageError,
)

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_TEXT_TYPES = frozenset({"text/plain", "text/html"})
_BAD_BASE64 = frozenset(
    {
        "InvalidBase64PaddingDefect",
        "InvalidBase64CharactersDefect",
        "InvalidBase64LengthDefect",
    }
)


@dataclass(frozen=True, slots=True)
class Link:
    """A link as the reader sees it."""

    url: str
    """The href (HTML) or the URL found in plain text, at most 4096 characters."""
    text: str
    """Visible text of the anchor, with img ``alt`` and ``title`` inside it; for a
    URL in plain text, the line it is on. Whitespace collapsed."""
    context: str = ""
    """Visible text around the link in the same block (up to 120 characters each
    side; in plain text the line before and the line itself): "To unsubscribe,
    click <a>here</a>"."""
    hidden: bool = False
    """Inside an element hidden by CSS (``display:none`` ...) or ``hidden``."""
    html: bool = False
    """Found in an HTML part (what mail readers display when there is one)."""


@dataclass(frozen=True, slots=True)
class Body:
    """The decoded body of a message: visible texts, links, and what went wrong."""

    texts: tuple[str, ...] = ()
    """Visible text of each text/plain and text/html part, in MIME order."""
    links: tuple[Link, ...] = ()
    problems: tuple[str, ...] = ()
    """What could not be read, e.g. an unknown charset or a part cut at a cap."""
    html_parts: int = 0
    """How many text/html parts were read."""


def body_of(message: MessageLike) -> Body:
    """The body of ``message``, extracted on first use and shared by every check."""
    # A policy worker's view knows its lines end in CRLF (the relay refused
    # others): the split need not count line ends again.
    crlf_only = getattr(message, "crlf_only", False) is True
    return message.memo(
        MEMO_KEY, lambda: read_body(message.content, crlf_only=crlf_only)
    )


async def load_body(message: MessageLike) -> Body:
    """:func:`body_of`, in a worker thread when the message is large.

    Parsing several MiB of MIME and HTML takes long enough to stall the event loop;
    for ordinary messages the thread hop would cost more than the work. The memo
    is only ever filled by one caller at a time (checks run one after another).
    """
    if message.size_bytes > THREAD_THRESHOLD_BYTES:
        return await asyncio.to_thread(body_of, message)
    return body_of(message)


_FOLD_DROP = re.compile(
    "[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
    "\u00ad\u034f\u200b-\u200d\u2060\ufeff]"
)


_LOOKALIKES = str.maketrans(
    # Cyrillic and Greek letters that look like Latin ones: "payday" spelt with
    # a Cyrillic "a" (U+0430) must read as "payday" (a small part of Unicode
    # TR39's confusables; the terms and patterns matched are Latin).
    "аеіјорсухѕһԁԛԝӏкαοριυκνχ",
    "aeijopcyxshdqwlkaopiukvx",
)


def fold(text: str) -> str:
    """``text`` for matching: case folded, compatibility-decomposed (NFKD), with
    combining marks and invisible characters removed ("Désinscription" ->
    "desinscription"; fullwidth letters become ASCII) and Cyrillic or Greek
    look-alikes of Latin letters read as those letters."""
    if text.isascii():
        return text.lower()
    folded = unicodedata.normalize("NFKD", text.casefold()).translate(_LOOKALIKES)
    return _FOLD_DROP.sub("", folded)


def extract(msg: Message) -> Body:
    """The visible texts and links of ``msg``'s own text parts; never raises for
    broken MIME. ``msg`` may come from any policy: headers are read from their
    raw values, as ``policy.default`` reads them."""
    out = _Collector()
    stack: list[tuple[Message, int]] = [(msg, 0)]
    number = 0
    while stack:
        part, depth = stack.pop()
        number += 1
        try:
            children = _visit(part, depth, number, out)
        except _PART_ERRORS as exc:
            out.problem(f"part {number}: unreadable ({type(exc).__name__})")
            continue
        stack.extend((child, depth + 1) for child in reversed(children))
    return out.body()


def _visit(part: Message, depth: int, number: int, out: _Collector) -> list[Message]:
    """Read one part; return its children to walk."""
    ctype, charset = content_type(part)
    maintype = ctype.partition("/")[0]
    if maintype == "message":
        return []  # an attached message is someone else's body
    if part.is_multipart():
        payload = part.get_payload()
        if depth >= MAX_DEPTH:
            out.problem(f"part {number}: MIME nesting deeper than {MAX_DEPTH} levels")
            return []
        return [p for p in payload if isinstance(p, Message)]
    if maintype == "multipart":
        # No usable boundary (RFC 2046 5.1.1): the parser kept the body as text.
        out.problem(f"part {number}: {ctype} without parts, read as text/plain")
        ctype = "text/plain"
    elif ctype not in _TEXT_TYPES or disposition(part) == "attachment":
        return []
    label = f"part {number} ({ctype})"
    _read_source(_decode(part, charset, label, out), ctype, label, out)
    return []


def _read_source(source: str, ctype: str, label: str, out: _Collector) -> None:
    """Read the decoded text of a text/html or text/plain part."""
    if len(source) > MAX_PART_SOURCE_CHARS:
        out.problem(
            f"{label}: {len(source)} characters, only the first and last "
            f"{(MAX_PART_SOURCE_CHARS - _SOURCE_TAIL_CHARS) // 2**20} MiB and "
            f"{_SOURCE_TAIL_CHARS // 2**20} MiB read"
        )
        source = _head_and_tail(source, ctype)
    if ctype == "text/html":
        _read_html(source, label, out)
    else:
        _read_plain(source, label, out)


def _decode(part: Message, charset: str | None, label: str, out: _Collector) -> str:
    """The decoded text of a leaf part (Content-Transfer-Encoding, then charset)."""
    cte = part.get("Content-Transfer-Encoding")
    if cte is not None and str(cte) != str(cte).strip():
        # Mail readers decode "base64 " too; so must the checks, or the text
        # they score is not the text the reader sees.
        part.replace_header("Content-Transfer-Encoding", str(cte).strip())
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    defects = {type(d).__name__ for d in part.defects}
    return _text_of(raw, defects, charset, label, out)


def _text_of(
    raw: bytes, defects: set[str], charset: str | None, label: str, out: _Collector
) -> str:
    """The text of a part's transfer-decoded payload ``raw``, by its charset;
    ``defects``: the names of those its transfer decoding met."""
    if defects & _BAD_BASE64:
        out.problem(f"{label}: damaged base64, decoded what could be")
        if "InvalidBase64LengthDefect" in defects:
            raw = _salvage_base64(raw)
    if charset is None or charset in {"us-ascii", "ascii"}:
        # Undeclared 8-bit text is UTF-8 far more often than anything else.
        if raw.isascii():
            return raw.decode("ascii")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    try:
        return raw.decode(charset, "replace")
    except (LookupError, ValueError):
        # LookupError: no such codec, or not a text codec ("base64", "zlib").
        out.problem(f"{label}: unknown charset {charset[:40]!r}, read as UTF-8")
        return raw.decode("utf-8", "replace")


def read_body(content: bytes, *, crlf_only: bool = False) -> Body:
    """``extract(mime_tree(content))``, the body of the message ``content``: the
    usual message read from the parts of :func:`policies._mime.fast_parts`
    (decoded and read as :func:`extract` does, with no message object), any
    other through the tree. ``crlf_only``: every line of ``content`` is known
    to end with CRLF."""
    text = content.decode("ascii", "surrogateescape")  # as BytesParser does
    parts = fast_parts(text, crlf_only=crlf_only)
    if parts is not None:
        found = _extract_parts(content, text, parts)
        if found is not None:
            return found
    return extract(mime_tree(content))


def _extract_parts(content: bytes, text: str, parts: list[FastPart]) -> Body | None:
    """:func:`extract` of the tree ``fast_tree(text)`` would give, from its
    parts; ``None`` for a Content-Transfer-Encoding value with 8-bit bytes (the
    tree reads it as a header object)."""
    out = _Collector()
    for number, part in enumerate(parts, 1):
        # _visit: attached messages, multiparts (their parts follow), other
        # types and attachments have no text to read.
        if part.ctype not in _TEXT_TYPES or part.disposition == "attachment":
            continue
        cte = part.cte
        if cte is not None and not cte.isascii():
            return None
        label = f"part {number} ({part.ctype})"
        try:
            # _decode: "base64 " reads as "base64", in any case.
            raw, defects = _transfer_decoded(
                content, text, part, "" if cte is None else cte.strip().lower()
            )
            source = _text_of(raw, defects, part.charset, label, out)
            _read_source(source, part.ctype, label, out)
        except _PART_ERRORS as exc:
            out.problem(f"part {number}: unreadable ({type(exc).__name__})")
    return out.body()


_TRANSFER_DECODED = frozenset(
    {"quoted-printable", "base64", "x-uuencode", "uuencode", "uue", "x-uue"}
)
"""The encodings ``Message.get_payload(decode=True)`` decodes; it gives the
payload's bytes as they are for any other."""


def _transfer_decoded(
    content: bytes, text: str, part: FastPart, cte: str
) -> tuple[bytes, set[str]]:
    """``get_payload(decode=True)`` of the leaf ``part`` (its bytes, decoded by
    the lower-cased ``cte``) and the names of the defects that registers."""
    if cte not in _TRANSFER_DECODED:
        return content[part.start : part.end], set()
    leaf = Message()
    leaf.set_raw("Content-Transfer-Encoding", cte)
    leaf.set_payload(text[part.start : part.end])
    raw: Any = leaf.get_payload(decode=True)
    return raw, {type(d).__name__ for d in leaf.defects}


def _salvage_base64(encoded: bytes) -> bytes:
    """What decodes of a base64 body cut mid-quantum (the stdlib then gives up
    and returns the encoded text, bpo-27397): whole quanta of its alphabet."""
    letters = _NOT_BASE64.sub(b"", encoded)
    return binascii.a2b_base64(letters[: len(letters) - len(letters) % 4])


def _head_and_tail(source: str, ctype: str) -> str:
    head = source[: MAX_PART_SOURCE_CHARS - _SOURCE_TAIL_CHARS]
    tail = source[-_SOURCE_TAIL_CHARS:]
    if ctype == "text/html":
        # Cut between tags, so that neither half starts or ends inside one.
        head = head[: head.rfind(">") + 1]
        start = tail.find("<")
        tail = tail[start:] if start >= 0 else ""
    return f"{head}\n{tail}"


class _Collector:
    """Texts, links and problems of one message, within the caps."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.kept = 0
        self._links: list[Link] = []
        self._tail: deque[Link] = deque(maxlen=MAX_LINKS // 2)
        self._dropped = 0
        self._problems: list[str] = []
        self.html_parts = 0

    def problem(self, text: str) -> None:
        self._problems.append(text)

    def budget(self) -> int:
        """Characters of text the next part may keep."""
        return max(0, min(MAX_PART_TEXT_CHARS, MAX_TOTAL_TEXT_CHARS - self.kept))

    def text(self, text: str) -> None:
        self.kept += len(text)
        self.texts.append(text)

    def link(self, link: Link) -> None:
        if len(self._links) < MAX_LINKS // 2:
            self._links.append(link)
            return
        if len(self._tail) == self._tail.maxlen:
            self._dropped += 1
        self._tail.append(link)

    def body(self) -> Body:
        problems = list(self._problems)
        if self._dropped:
            problems.append(
                f"{self._dropped} link(s) in the middle of the message not kept "
                f"(at most {MAX_LINKS})"
            )
        return Body(
            texts=tuple(self.texts),
            links=(*self._links, *self._tail),
            problems=tuple(problems),
            html_parts=self.html_parts,
        )


def _keep_text(text: str, label: str, out: _Collector, capped: bool) -> None:
    budget = out.budget()
    if capped or len(text) > budget:
        out.problem(f"{label}: text cut at {budget} characters")
        text = text[:budget]
    out.text(text)


# -- plain text ---------------------------------------------------------------

# RFC 3986 has no delimiter for URLs in running text; stop at whitespace, quotes
# and angle brackets (RFC 3986 appendix C), then drop trailing punctuation.
_URL = re.compile(r"(?:https?://|mailto:)[^\s<>\"'`]+", re.IGNORECASE)
_URL_TRAILER = ".,;:!?)]}*"


def _read_plain(source: str, label: str, out: _Collector) -> None:
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    _keep_text(text, label, out, capped=False)
    for start, end in _urls(text):
        url = text[start : min(end, start + MAX_URL_CHARS)].rstrip(_URL_TRAILER)
        out.link(_plain_link(text, url, start, end))


def _urls(text: str) -> Iterator[tuple[int, int]]:
    """The spans ``_URL.finditer(text)`` gives, found from the colons of ``text``
    (a URL has one right after its scheme): far fewer places to try a match at
    than every character, unless colons are most of the text."""
    if text.count(":") > len(text) // 32:
        for found in _URL.finditer(text):
            yield found.span()
        return
    match = _URL.match
    end = 0
    colon = text.find(":")
    while colon >= 0:
        # "mailto:", "https://", "http://": the scheme is 6, 5 or 4 characters
        # (case-insensitive matching maps no character to two).
        for start in (colon - 6, colon - 5, colon - 4):
            if start >= end:
                at = match(text, start)
                if at is not None:
                    end = at.end()
                    yield start, end
                    break
        colon = text.find(":", max(colon + 1, end))


def _plain_link(text: str, url: str, start: int, end: int) -> Link:
    """A URL in plain text, with its line as text and the line before as context.

    Every search is bounded to a window around the URL, so a megabyte-long line
    full of URLs still costs linear time.
    """
    half = MAX_LINK_TEXT_CHARS // 2
    floor = max(0, start - half)
    newline = text.rfind("\n", floor, start)
    line_start = newline + 1 if newline >= 0 else floor
    whole_line = newline >= 0 or floor == 0
    ceiling = min(len(text), min(end, start + MAX_URL_CHARS) + half)
    newline = text.find("\n", end, ceiling)
    line_end = newline if newline >= 0 else ceiling
    line = squash(text[line_start:line_end])
    before = _previous_line(text, line_start) if whole_line else ""
    return Link(url=url, text=line, context=squash(f"{before} {line}"))


def _previous_line(text: str, line_start: int) -> str:
    """The last 120 characters of the nearest non-blank line before ``line_start``."""
    end = line_start - 1
    for _ in range(3):  # skip a blank line or two
        if end <= 0:
            return ""
        floor = max(0, end - CONTEXT_CHARS)
        start = text.rfind("\n", floor, end) + 1 or floor
        line = text[start:end].strip()
        if line:
            return line
        end = start - 1
    return ""


# -- HTML ---------------------------------------------------------------------


def _read_html(source: str, label: str, out: _Collector) -> None:
    def on_link(url: str, text: str, context: str, hidden: bool) -> None:
        out.link(Link(url=url, text=text, context=context, hidden=hidden, html=True))

    out.html_parts += 1
    found = read_html(source, out.budget(), on_link)
    if found.stopped_early:
        out.problem(f"{label}: HTML parsing stopped early")
    _keep_text(found.text, label, out, capped=found.capped)
