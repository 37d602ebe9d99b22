"""Visible text and links of an HTML part, as a mail client shows them.

:func:`read_html` feeds one document to :class:`HtmlText`. The tokenizing is
``html.parser.HTMLParser``'s, with a fast path in front of it: the common markup of
mail (tags with plain attributes, text, ``<style>`` blocks) is tokenized with one
regular expression per tag and handed to the same callbacks, in the same order and
with the same arguments as HTMLParser would; at the first ``<`` that is not such a
tag, the rest of the document goes to HTMLParser itself. HTMLParser's state at a
tag boundary is only "not inside script or style", so the two halves read as one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser

LinkSink = Callable[[str, str, str, bool], None]
"""Called with url, text, context and hidden for each anchor with an href."""

MAX_URL_CHARS = 4096
MAX_LINK_TEXT_CHARS = 500
CONTEXT_CHARS = 120

# Markup HTMLParser would skip anyway (comments, CDATA, declarations, processing
# instructions), removed in one linear pass: left to HTMLParser, an unterminated
# one is rescanned to the end of the input at every "<" after it (quadratic; fixed
# upstream in CPython 3.13.4, gh-135462).
_MARKUP = re.compile(
    r"<!--.*?(?:--!?\s*>|\Z)|<!\[CDATA\[.*?(?:\]\]>|\Z)|<[!?][^>]*(?:>|\Z)",
    re.DOTALL,
)
_HIDING_STYLE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|mso-hide\s*:\s*all"
    r"|font-size\s*:\s*0(?![.\d]*[1-9])|opacity\s*:\s*0(?![.\d]*[1-9])"
    r"|color\s*:\s*transparent|max-height\s*:\s*0(?![.\d]*[1-9])",
    re.IGNORECASE,
)
INVISIBLE = re.compile("[\u00ad\u034f\u200b-\u200d\u2060\ufeff]")
"""Soft hyphen, zero-width and other invisible characters (all outside ASCII)."""

# The fast path's grammar: a subset of what HTMLParser reads, on which every
# HTMLParser version agrees. Whitespace inside tags is ASCII only, attribute names
# are plain, an unquoted value is HTMLParser's (up to whitespace or ">").
_WS = "[\t\n\r\f ]"
# Text runs up to the next "<" (a plain search finds its end); at a "<", a tag.
_TAG = re.compile(
    rf"<(?:/([a-zA-Z][-.:_a-zA-Z0-9]*){_WS}*>"  # end tag
    rf"|([a-zA-Z][-.:_a-zA-Z0-9]*)"  # start tag: name
    rf"((?:{_WS}+[a-zA-Z_:@][-.:_@a-zA-Z0-9]*"  # attribute name
    rf"(?:{_WS}*={_WS}*(?:\"[^\"]*\"|'[^']*'|[^\s\"'>=][^\s>]*))?)*)"  # value
    rf"{_WS}*(/?)>)"
)
_ATTR = re.compile(
    rf"{_WS}+([a-zA-Z_:@][-.:_@a-zA-Z0-9]*)"
    rf"(?:({_WS}*={_WS}*)(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>=][^\s>]*)))?"
)
# Elements whose content some HTMLParser version reads as raw text: the fast path
# only takes them when their content has no "<" (then every version agrees).
_RAW_TEXT_TAGS = frozenset({"script", "style"})  # content not unescaped
_RCDATA_TAGS = frozenset({"title", "textarea"})  # content unescaped
_LEAVE_TO_HTMLPARSER = frozenset(
    {"plaintext", "xmp", "iframe", "noembed", "noframes", "noscript"}
)

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


def squash(text: str) -> str:
    """``text`` with runs of whitespace as one space, stripped."""
    return " ".join(text.split())


def visible(text: str) -> str:
    """``text`` without invisible characters."""
    return text if text.isascii() else INVISIBLE.sub("", text)


def collapse(text: str) -> str:
    """Blocks of text as lines: whitespace runs within a line as one space, no
    blank lines, no spaces at either end of a line."""
    lines = (" ".join(line.split()) for line in visible(text).split("\n"))
    return "\n".join(line for line in lines if line)


@dataclass(frozen=True, slots=True)
class HtmlResult:
    text: str
    """The visible text, at most ``budget`` characters before collapsing."""
    capped: bool
    """Some visible text was left out (beyond the budget)."""
    stopped_early: bool
    """HTMLParser gave up on odd markup; what came before it was read."""


def read_html(source: str, budget: int, on_link: LinkSink) -> HtmlResult:
    """The visible text of the HTML document ``source`` (up to ``budget``
    characters kept) and its anchors, each given to ``on_link``."""
    document = sanitize_html(source)
    parser = HtmlText(budget, on_link, hidden_selectors(document))
    stopped = False
    try:
        parser.read(document)
    except AssertionError:  # HTMLParser's "should not get here" on odd markup
        stopped = True
    parser.finish()
    return HtmlResult(parser.text(), parser.capped, stopped)


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
        if self.size < MAX_LINK_TEXT_CHARS:
            self.parts.append(text)
            self.size += len(text)


class HtmlText(HTMLParser):
    """Visible text and anchors of one HTML document, as a mail client shows it.

    Skips script, style, head, title and template content and elements hidden by
    CSS; one stack of open elements tracks hiding (to 512 levels).
    """

    def __init__(
        self,
        budget: int,
        on_link: LinkSink,
        hidden: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(convert_charrefs=True)
        self._hidden_selectors = hidden
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

    def read(self, document: str) -> None:
        """Read the whole of ``document`` (as ``feed`` then ``close``)."""
        done = self.read_fast(document)
        if done < len(document):
            self.feed(document[done:])
        self.close()

    def read_fast(self, document: str) -> int:
        """Tokenize ``document`` from its start while it keeps to the fast path's
        grammar, calling the handlers as HTMLParser would; return where it
        stopped: the end of the document or the start of a tag (HTMLParser reads
        the rest with the same result as if it had read everything)."""
        match = _TAG.match
        find = document.find
        data = self.handle_data
        endtag = self.handle_endtag
        size = len(document)
        done = 0
        while done < size:
            if document[done] != "<":
                # Text, as much as there is (HTMLParser gives it whole); html's
                # unescape returns text without "&" as it is.
                end = find("<", done)
                if end < 0:
                    end = size
                text = document[done:end]
                data(unescape(text) if "&" in text else text)
                done = end
                continue
            token = match(document, done)
            if token is None:
                return done  # a "<" that does not start a tag of the grammar
            closed = token.group(1)
            if closed is not None:
                endtag(closed.lower())
                done = token.end()
                continue
            name, attributes, empty = token.group(2, 3, 4)
            name = name.lower()
            attrs = _attributes(attributes) if attributes else []
            if empty:
                self.handle_startendtag(name, attrs)
                done = token.end()
                continue
            if name in _LEAVE_TO_HTMLPARSER:
                return done
            if name not in _RAW_TEXT_TAGS and name not in _RCDATA_TAGS:
                self.handle_starttag(name, attrs)
                done = token.end()
                continue
            # Content up to the first "<", which must open the matching end tag.
            start = token.end()
            end = document.find("<", start)
            closing = f"</{name}>"
            if end < 0 or document[end : end + len(closing)].lower() != closing:
                return done
            self.handle_starttag(name, attrs)
            if start < end:
                content = document[start:end]
                data(content if name in _RAW_TEXT_TAGS else unescape(content))
            self.handle_endtag(name)
            done = end + len(closing)
        return size

    # HTMLParser callbacks

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._in_head and tag not in _HEAD_ONLY:
            self._in_head = False
        if tag in _BLOCK:
            self._break()
        if tag == "head":
            self._in_head = True
            return
        if tag in _RAW_TEXT_TAGS:
            self._raw = tag
            return
        if tag == "img":
            self._image(attrs)
            return
        if tag in _VOID:
            return
        if tag == "p" and self._open.get("p"):
            self._pop("p")  # a new paragraph closes the open one
        self._push(tag, tag in _ALWAYS_HIDDEN or _hides(attrs, self._hidden_selectors))
        if tag == "a":
            self._start_anchor(attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID or tag in _RAW_TEXT_TAGS or tag == "head":
            self.handle_starttag(tag, attrs)
            if tag in _RAW_TEXT_TAGS:
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
        if len(data) >= CONTEXT_CHARS:
            self._tail = data[-CONTEXT_CHARS:]
        else:
            self._tail = (self._tail + data)[-CONTEXT_CHARS:]
        if self._waiting:
            self._feed_waiting(data)

    # results

    def finish(self) -> None:
        """Close what the document left open."""
        self._end_anchor()
        self._break()

    def text(self) -> str:
        return collapse("".join(self._out))

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
        if self._waiting:
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
            url=href.strip()[:MAX_URL_CHARS],
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
        piece = data[:CONTEXT_CHARS]
        for anchor in self._waiting:
            anchor.after.append(piece)
            anchor.after_size += len(piece)
        done = 0
        for anchor in self._waiting:  # the oldest has seen the most
            if anchor.after_size < CONTEXT_CHARS:
                break
            self._emit(anchor)
            done += 1
        if done:
            del self._waiting[:done]

    def _emit(self, anchor: _Anchor) -> None:
        text = squash(visible("".join(anchor.parts)))
        following = "".join(anchor.after)[:CONTEXT_CHARS]
        context = squash(visible(f"{anchor.before} {text} {following}"))
        self._on_link(anchor.url, text[:MAX_LINK_TEXT_CHARS], context, anchor.hidden)


def _attributes(source: str) -> list[tuple[str, str | None]]:
    """The attributes of a start tag matched by ``_TAG``, as HTMLParser gives
    them: names lower-cased, values unquoted and unescaped, ``None`` without a
    value."""
    return [
        (
            name.lower(),
            (unescape(value) if "&" in value else value)
            if (value := double or single or bare)
            else ("" if equals else None),
        )
        for name, equals, double, single, bare in _ATTR.findall(source)
    ]


def _hides(
    attrs: list[tuple[str, str | None]], selectors: frozenset[str] = frozenset()
) -> bool:
    for name, value in attrs:
        if name == "hidden":
            return True
        if not value:
            continue
        if name == "style" and _HIDING_STYLE.search(value):
            return True
        if selectors and name == "class":
            if any(f".{word}" in selectors for word in value.split()):
                return True
        elif selectors and name == "id" and f"#{value.strip()}" in selectors:
            return True
    return False


_STYLE_BLOCK = re.compile(r"<style\b[^>]*>(.*?)(?:</style\s*>|\Z)", re.I | re.S)
_RULE = re.compile(r"([^{}]*)\{([^{}]*)\}")
_AT_BLOCK = re.compile(r"@[^{};]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}")
"""An ``@media`` (or other at-rule) block: what it hides, it hides only on some
screens (a desktop-only footer), so its rules are not read."""
_SIMPLE_SELECTOR = re.compile(r"[a-z0-9]*([.#][\w-]+)", re.I)


def hidden_selectors(document: str) -> frozenset[str]:
    """``.class`` and ``#id`` selectors that a ``<style>`` block hides
    (``.x { display: none }``, also ``td.x``): elements using them are hidden."""
    if "<style" not in document and "<STYLE" not in document:
        return frozenset()
    found = set()
    for block in _STYLE_BLOCK.findall(document):
        for selectors, declarations in _RULE.findall(_AT_BLOCK.sub("", block)):
            if not _HIDING_STYLE.search(declarations):
                continue
            for selector in selectors.split(","):
                simple = _SIMPLE_SELECTOR.fullmatch(selector.strip())
                if simple is not None:
                    found.add(simple.group(1))
    return frozenset(found)
