"""The sender's own body text and links, decoded once per message and shared.

:func:`body_of` walks the MIME tree of :attr:`MessageLike.parsed`, decodes each
text/plain and text/html part (transfer encoding and charset), turns HTML into its
visible text and collects links: ``<a href>`` anchors with their visible text, and
bare URLs in plain text with their line. Attachments, non-text parts and attached
messages (``message/*``: someone else's mail) are skipped. Nothing here raises on
broken MIME: what could not be read is named in :attr:`Body.problems`.

Deciding what the text and links mean is left to the checks
(:mod:`policies.optout_link`, :mod:`policies.content_categories`).
"""

from __future__ import annotations

import asyncio
import binascii
import re
import unicodedata
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.errors import MessageError
from email.message import EmailMessage, Message
from html.parser import HTMLParser

from policies.base import MessageLike

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

_MAX_URL_CHARS = 4096
_MAX_LINK_TEXT_CHARS = 500
_CONTEXT_CHARS = 120

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


@dataclass(frozen=True, slots=True)
class Body:
    """The decoded body of a message: visible texts, links, and what went wrong."""

    texts: tuple[str, ...] = ()
    """Visible text of each text/plain and text/html part, in MIME order."""
    links: tuple[Link, ...] = ()
    problems: tuple[str, ...] = ()
    """What could not be read, e.g. an unknown charset or a part cut at a cap."""


def body_of(message: MessageLike) -> Body:
    """The body of ``message``, extracted on first use and shared by every check."""
    return message.memo(MEMO_KEY, lambda: extract(message.parsed))


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


def fold(text: str) -> str:
    """``text`` for matching: case folded, compatibility-decomposed (NFKD), with
    combining marks and invisible characters removed ("Désinscription" ->
    "desinscription"; fullwidth letters become ASCII)."""
    if text.isascii():
        return text.lower()
    return _FOLD_DROP.sub("", unicodedata.normalize("NFKD", text.casefold()))


def extract(msg: EmailMessage) -> Body:
    """The visible texts and links of ``msg``'s own text parts; never raises for
    broken MIME."""
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
    ctype, charset = _content_type(part)
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
    elif ctype not in _TEXT_TYPES or part.get_content_disposition() == "attachment":
        return []
    label = f"part {number} ({ctype})"
    source = _decode(part, charset, label, out)
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
    return []


def _content_type(part: Message) -> tuple[str, str | None]:
    """The content type (as ``get_content_type``) and charset of ``part``, from
    one parse of its Content-Type header (each ``get_*`` call parses it again)."""
    header = part.get("content-type")
    if header is None:
        return part.get_default_type(), None
    ctype = str(header).partition(";")[0].strip().lower()
    if ctype.count("/") != 1:
        return "text/plain", None  # RFC 2045 5.2: invalid means text/plain
    params = getattr(header, "params", None)
    charset = params.get("charset") if isinstance(params, Mapping) else None
    if not isinstance(charset, str) or not charset.strip():
        return ctype, None
    return ctype, charset.strip().lower()


def _decode(part: Message, charset: str | None, label: str, out: _Collector) -> str:
    """The decoded text of a leaf part (Content-Transfer-Encoding, then charset)."""
    raw = part.get_payload(decode=True)
    if not isinstance(raw, bytes):
        return ""
    defects = {type(d).__name__ for d in part.defects}
    if defects & _BAD_BASE64:
        out.problem(f"{label}: damaged base64, decoded what could be")
        if "InvalidBase64LengthDefect" in defects:
            raw = _salvage_base64(part)
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


def _salvage_base64(part: Message) -> bytes:
    """What decodes of a base64 body cut mid-quantum (the stdlib then gives up
    and returns the encoded text, bpo-27397): whole quanta of its alphabet."""
    payload = part.get_payload()
    if not isinstance(payload, str):
        return b""
    letters = _NOT_BASE64.sub(b"", payload.encode("ascii", "ignore"))
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
    for found in _URL.finditer(text):
        start, end = found.span()
        url = text[start : min(end, start + _MAX_URL_CHARS)].rstrip(_URL_TRAILER)
        out.link(_plain_link(text, url, start, end))


def _plain_link(text: str, url: str, start: int, end: int) -> Link:
    """A URL in plain text, with its line as text and the line before as context.

    Every search is bounded to a window around the URL, so a megabyte-long line
    full of URLs still costs linear time.
    """
    half = _MAX_LINK_TEXT_CHARS // 2
    floor = max(0, start - half)
    newline = text.rfind("\n", floor, start)
    line_start = newline + 1 if newline >= 0 else floor
    whole_line = newline >= 0 or floor == 0
    ceiling = min(len(text), min(end, start + _MAX_URL_CHARS) + half)
    newline = text.find("\n", end, ceiling)
    line_end = newline if newline >= 0 else ceiling
    line = _squash(text[line_start:line_end])
    before = _previous_line(text, line_start) if whole_line else ""
    return Link(url=url, text=line, context=_squash(f"{before} {line}"))


def _previous_line(text: str, line_start: int) -> str:
    """The last 120 characters of the nearest non-blank line before ``line_start``."""
    end = line_start - 1
    for _ in range(3):  # skip a blank line or two
        if end <= 0:
            return ""
        floor = max(0, end - _CONTEXT_CHARS)
        start = text.rfind("\n", floor, end) + 1 or floor
        line = text[start:end].strip()
        if line:
            return line
        end = start - 1
    return ""


def _squash(text: str) -> str:
    return " ".join(text.split())


# -- HTML ---------------------------------------------------------------------

# Markup HTMLParser would skip anyway (comments, CDATA, declarations, processing
# instructions), removed in one linear pass: left to HTMLParser, an unterminated
# one is rescanned to the end of the input at every "<" after it (quadratic; fixed
# upstream in CPython 3.13.4, gh-135462).
_MARKUP = re.compile(
    r"<!--.*?(?:--!?\s*>|\Z)|<!\[CDATA\[.*?(?:\]\]>|\Z)|<[!?][^>]*(?:>|\Z)",
    re.DOTALL,
)
_HIDING_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|mso-hide\s*:\s*all", re.IGNORECASE
)
_SPACES = re.compile(r"[^\S\n]+")
_BREAKS = re.compile(r" ?\n[\s]*")
_INVISIBLE = re.compile("[\u00ad\u034f\u200b-\u200d\u2060\ufeff]")

# fmt: off
_VOID = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
    "param", "source", "track", "wbr",
})
_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "body", "br", "center", "dd", "div",
    "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3",
    "h4", "h5", "h6", "header", "hr", "html", "li", "main", "nav", "ol", "p", "pre",
    "section", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
})
# fmt: on
_HEAD_ONLY = frozenset({"base", "link", "meta", "style", "script", "title", "head"})
_RAW_TEXT = frozenset({"script", "style"})
_ALWAYS_HIDDEN = frozenset({"template", "title"})
_MAX_STACK = 512
_MAX_WAITING = 64


def sanitize_html(source: str) -> str:
    """``source`` with comments and declarations removed, and any ``<`` after the
    last ``>`` escaped: HTMLParser then reads it in linear time."""
    source = _MARKUP.sub("", source)
    last = source.rfind(">")
    rest = source[last + 1 :]
    if "<" in rest:
        source = source[: last + 1] + rest.replace("<", "&lt;")
    return source


def _read_html(source: str, label: str, out: _Collector) -> None:
    parser = _HtmlText(out.budget(), out.link)
    try:
        parser.feed(sanitize_html(source))
        parser.close()
    except AssertionError:  # HTMLParser's "should not get here" on odd markup
        out.problem(f"{label}: HTML parsing stopped early")
    parser.finish()
    _keep_text(parser.text(), label, out, capped=parser.capped)


@dataclass(slots=True)
class _Anchor:
    url: str
    hidden: bool
    before: str
    parts: list[str] = field(default_factory=list)
    size: int = 0
    after: list[str] = field(default_factory=list)
    after_size: int = 0

    def add(self, text: str) -> None:
        if self.size < _MAX_LINK_TEXT_CHARS:
            self.parts.append(text)
            self.size += len(text)


class _HtmlText(HTMLParser):
    """Visible text and anchors of one HTML document, as a mail client shows it.

    Skips script, style, head, title and template content and elements hidden by
    CSS; one stack of open elements tracks hiding (to 512 levels).
    """

    def __init__(self, budget: int, on_link: Callable[[Link], None]) -> None:
        super().__init__(convert_charrefs=True)
        self._budget = budget
        self._on_link = on_link
        self._out: list[str] = []
        self._kept = 0
        self.capped = False
        self._raw: str | None = None
        self._in_head = False
        self._stack: list[tuple[str, bool]] = []
        self._open: dict[str, int] = {}
        self._hidden = 0
        self._tail = ""  # visible text of the current block, last 120 chars
        self._anchor: _Anchor | None = None
        self._waiting: list[_Anchor] = []  # closed links wanting after-context

    # HTMLParser callbacks

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._in_head and tag not in _HEAD_ONLY:
            self._in_head = False
        if tag in _BLOCK:
            self._break()
        if tag == "head":
            self._in_head = True
            return
        if tag in _RAW_TEXT:
            self._raw = tag
            return
        if tag == "img":
            self._image(attrs)
            return
        if tag in _VOID:
            return
        if tag == "p" and self._open.get("p"):
            self._pop("p")  # a new paragraph closes the open one
        self._push(tag, tag in _ALWAYS_HIDDEN or _hides(attrs))
        if tag == "a":
            self._start_anchor(attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID or tag in _RAW_TEXT or tag == "head":
            self.handle_starttag(tag, attrs)
            if tag in _RAW_TEXT:
                self._raw = None
            if tag == "head":
                self._in_head = False
            return
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self._raw is not None:
            if tag == self._raw:
                self._raw = None
            return
        if tag in _BLOCK:
            self._break()
        if tag == "head":
            self._in_head = False
            return
        if tag == "a":
            self._end_anchor()
        if self._open.get(tag):
            self._pop(tag)

    def handle_data(self, data: str) -> None:
        if self._raw is not None:
            return
        if self._in_head:
            if self._hidden or not data.strip():
                return
            self._in_head = False  # text outside <title>: the body has begun
        anchor = self._anchor
        if self._hidden:
            if anchor is not None and anchor.hidden:
                anchor.add(data)
            return
        data = data.replace("\r", " ").replace("\n", " ").replace("\t", " ")
        if anchor is not None:
            anchor.add(data)
        if not self.capped:
            room = self._budget - self._kept
            if len(data) > room:
                self.capped = True
                data_kept = data[: max(room, 0)]
            else:
                data_kept = data
            self._out.append(data_kept)
            self._kept += len(data_kept)
        self._tail = (self._tail + data)[-_CONTEXT_CHARS:]
        if self._waiting:
            self._feed_waiting(data)

    # results

    def finish(self) -> None:
        """Close what the document left open."""
        self._end_anchor()
        self._break()

    def text(self) -> str:
        text = _INVISIBLE.sub("", "".join(self._out))
        text = _BREAKS.sub("\n", _SPACES.sub(" ", text))
        return text.strip()

    # internals

    def _push(self, tag: str, hides: bool) -> None:
        if len(self._stack) >= _MAX_STACK:
            return
        self._stack.append((tag, hides))
        self._open[tag] = self._open.get(tag, 0) + 1
        if hides:
            self._hidden += 1

    def _pop(self, tag: str) -> None:
        """Close the nearest open ``tag`` and everything opened inside it."""
        while self._stack:
            name, hides = self._stack.pop()
            self._open[name] -= 1
            if hides:
                self._hidden -= 1
            if name == "a":
                self._end_anchor()
            if name == tag:
                return

    def _break(self) -> None:
        """A block boundary: text on either side is on separate lines."""
        if self._out and not self.capped:
            self._out.append("\n")
            self._kept += 1
        self._tail = ""
        for anchor in self._waiting:
            self._emit(anchor)
        self._waiting.clear()

    def _image(self, attrs: list[tuple[str, str | None]]) -> None:
        if self._anchor is None:
            return
        alt = dict(attrs).get("alt")
        if alt and (not self._hidden or self._anchor.hidden):
            self._anchor.add(f" {alt} ")

    def _start_anchor(self, attrs: list[tuple[str, str | None]]) -> None:
        self._end_anchor()  # anchors do not nest
        values = dict(attrs)
        href = values.get("href")
        if href is None:
            return
        self._anchor = _Anchor(
            url=href.strip()[:_MAX_URL_CHARS],
            hidden=self._hidden > 0,
            before=self._tail,
        )
        title = values.get("title")
        if title:
            self._anchor.add(f" {title} ")

    def _end_anchor(self) -> None:
        anchor, self._anchor = self._anchor, None
        if anchor is None:
            return
        if len(self._waiting) >= _MAX_WAITING:
            self._emit(self._waiting.pop(0))
        self._waiting.append(anchor)

    def _feed_waiting(self, data: str) -> None:
        """Give ``data`` to the links waiting for their after-context."""
        piece = data[:_CONTEXT_CHARS]
        for anchor in self._waiting:
            anchor.after.append(piece)
            anchor.after_size += len(piece)
        done = 0
        for anchor in self._waiting:  # the oldest has seen the most
            if anchor.after_size < _CONTEXT_CHARS:
                break
            self._emit(anchor)
            done += 1
        if done:
            del self._waiting[:done]

    def _emit(self, anchor: _Anchor) -> None:
        text = _squash(_INVISIBLE.sub("", "".join(anchor.parts)))
        following = "".join(anchor.after)[:_CONTEXT_CHARS]
        context = _squash(_INVISIBLE.sub("", f"{anchor.before} {text} {following}"))
        self._on_link(
            Link(
                url=anchor.url,
                text=text[:_MAX_LINK_TEXT_CHARS],
                context=context,
                hidden=anchor.hidden,
            )
        )


def _hides(attrs: list[tuple[str, str | None]]) -> bool:
    for name, value in attrs:
        if name == "hidden":
            return True
        if name == "style" and value and _HIDING_STYLE.search(value):
            return True
    return False
