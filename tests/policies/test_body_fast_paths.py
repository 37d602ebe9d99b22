"""The fast paths of body extraction read exactly what the slow ones read.

Each shortcut of :mod:`policies.body` has a reference it must agree with:

* the MIME split of :mod:`policies._mime` with the stdlib's feed parser;
* the whole body from that tree with :func:`extract` of ``MessageView.parsed``
  (``policy.default``, what body extraction read before);
* Content-Type, boundary and Content-Disposition read from raw values with
  ``policy.default``'s header classes;
* the HTML tokenizer of :mod:`policies._html` with ``html.parser.HTMLParser``;
* the colon-driven URL scan and the whitespace collapsing with the regular
  expressions they replace.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser, Parser

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from policies import _html, _mime
from policies import body as body_module
from policies._mime import Part, fast_tree, mime_tree
from policies.body import Body, body_of, extract
from relay.message import MessageView

STDLIB = Parser(Part, policy=policy.compat32)
"""The feed parser the fast split stands in for (and falls back to)."""
DEFAULT = BytesParser(policy=policy.default)
"""The parse of ``MessageView.parsed``, whose tree ``mime_tree`` gives."""
HEAD = "From: news@acme.example\r\nTo: jane@example.org\r\nSubject: Hi\r\n"


# -- references -------------------------------------------------------------------


def shape(msg: Message) -> object:
    """What body extraction reads of a tree: raw headers, parts, leaf payloads
    (not the content of message/* parts, not preambles or epilogues)."""
    items = [(name, str(value)) for name, value in msg.raw_items()]
    if msg.get_content_maintype() == "message":
        return (items, "message")
    if msg.is_multipart():
        children = msg.get_payload()
        assert isinstance(children, list)
        return (
            items,
            [shape(child) for child in children if isinstance(child, Message)],
        )
    # As stored: get_payload() would decode 8-bit text with the charset parameter.
    return (items, vars(msg)["_payload"])


def full_path(content: bytes) -> Body:
    """The body as read before the fast paths: the policy.default parse."""
    return extract(MessageView(content).parsed)


def outcome(read: Callable[[str], object], value: str) -> object:
    """What ``read(value)`` returns, or the type of what it raises (the stdlib's
    header classes raise on some hostile values; body extraction then names the
    part unreadable, before as now)."""
    try:
        return read(value)
    except Exception as exc:  # noqa: BLE001 - compared, not handled
        return type(exc)


def with_content_type(value: str) -> Message:
    msg = Message()
    msg.set_raw("Content-Type", value)
    return msg


def with_disposition(value: str) -> Message:
    msg = Message()
    msg.set_raw("Content-Disposition", value)
    return msg


def reference_content_type(value: str) -> tuple[str, str | None]:
    """What body extraction read from ``part.get("content-type")`` of a
    ``policy.default`` message."""
    header = policy.default.header_fetch_parse("Content-Type", value)
    ctype = str(header).partition(";")[0].strip().lower()
    if ctype.count("/") != 1:
        return "text/plain", None
    charset = header.params.get("charset")
    if not isinstance(charset, str) or not charset.strip():
        return ctype, None
    return ctype, charset.strip().lower()


def reference_disposition(value: str) -> str | None:
    msg = EmailMessage()
    msg.set_raw("Content-Disposition", value)
    return msg.get_content_disposition()


def reference_boundary(value: str) -> str | None:
    msg = EmailMessage()
    msg.set_raw("Content-Type", value)
    return msg.get_boundary()


_OLD_SPACES = re.compile(r"[^\S\n]+")
_OLD_BREAKS = re.compile(r" ?\n[\s]*")


def reference_collapse(text: str) -> str:
    text = _html.INVISIBLE.sub("", text)
    return _OLD_BREAKS.sub("\n", _OLD_SPACES.sub(" ", text)).strip()


class Events(_html.HtmlText):
    """The HTMLParser callbacks, recorded."""

    def __init__(self) -> None:
        super().__init__(10**6, lambda url, text, context, hidden: None)
        self.events: list[tuple[object, ...]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("start", tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.events.append(("startend", tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        self.events.append(("end", tag))

    def handle_data(self, data: str) -> None:
        self.events.append(("data", data))


def html_events(document: str, *, fast: bool) -> list[tuple[object, ...]]:
    parser = Events()
    try:
        if fast:
            parser.read(document)
        else:
            parser.feed(document)
            parser.close()
    except AssertionError:
        parser.events.append(("stopped",))
    return parser.events


# -- a corpus of messages ---------------------------------------------------------

NEWSLETTER_HTML = (
    "<!DOCTYPE html>\r\n<html><head><title>Weekly &amp; offers</title>"
    '<meta charset="utf-8"><style type="text/css">p { color: red; }</style></head>\r\n'
    "<body>\r\n<!--[if mso]><table><tr><td><![endif]-->\r\n"
    '<div style="display:none">preheader</div>\r\n'
    '<table width=600 align=center><tr><td class="x" valign=top>\r\n'
    "<p>Hello&nbsp;Jane,</p>\r\n<p>Our <b>spring</b> sale&hellip; starts now.<br/>\r\n"
    "<a href=\"https://acme.example/shop?a=1&amp;b=2\" title='Shop'>Shop now</a></p>\r\n"
    '<img src=https://acme.example/p.gif width=1 height=1 alt="">\r\n'
    "</td></tr></table>\r\n"
    "<p>To stop these emails, "
    "<a href=https://acme.example/u?id=1&t=2>unsubscribe</a> here.</p>\r\n"
    "</body></html>\r\n"
)
NEWSLETTER_TEXT = (
    "Hello Jane,\r\n\r\nOur spring sale starts now: https://acme.example/shop\r\n"
    "\r\nTo stop these emails:\r\nhttps://acme.example/u?id=1.\r\n"
)


def multipart(boundary: str, *parts: str, subtype: str = "alternative") -> str:
    body = "".join(f"--{boundary}\r\n{part}\r\n" for part in parts)
    return (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n'
        f"This is a multi-part message in MIME format.\r\n\r\n{body}--{boundary}--\r\n"
    )


def leaf(ctype: str, body: str, cte: str = "7bit", extra: str = "") -> str:
    return (
        f"Content-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n{extra}\r\n"
        f"{body}"
    )


def b64(text: str) -> str:
    return base64.encodebytes(text.encode()).decode().replace("\n", "\r\n")


CORPUS: dict[str, str] = {
    "plain": HEAD + "\r\nHello https://acme.example/unsubscribe\r\n",
    "no headers": "\r\nHello https://acme.example/u\r\n",
    "html only, base64": HEAD
    + leaf("text/html; charset=utf-8", b64(NEWSLETTER_HTML), "base64"),
    "alternative": HEAD
    + "MIME-Version: 1.0\r\n"
    + multipart(
        "=_bench_1",
        leaf("text/plain; charset=us-ascii", NEWSLETTER_TEXT),
        leaf("text/html; charset=us-ascii", NEWSLETTER_HTML),
    ),
    "folded headers": HEAD
    + 'Content-Type: multipart/alternative;\r\n\tboundary="----=_Part_7_1.2"\r\n\r\n'
    '------=_Part_7_1.2\r\nContent-Type: text/plain;\r\n charset="ISO-8859-1"\r\n'
    "Content-Transfer-Encoding: quoted-printable\r\n\r\nSe=F1or M=FCller, "
    "abmelden: https://acme.example/a=\r\nbmelden\r\n------=_Part_7_1.2--\r\n",
    "mixed with attachments": HEAD
    + multipart(
        "outer",
        multipart(
            "inner",
            leaf("text/plain; charset=utf-8", "Grüße, https://acme.example/u\r\n"),
            leaf("text/html; charset=utf-8", "<p>Grüße</p>"),
        ),
        leaf(
            "text/plain; name=notes.txt",
            "attached https://file.example/x",
            extra='Content-Disposition: attachment; filename="notes.txt"\r\n',
        ),
        leaf("image/png", b64("PNG...."), "base64"),
        "Content-Type: message/rfc822\r\n\r\nSubject: fwd\r\n\r\n"
        "Someone else's https://other.example/unsubscribe\r\n",
        leaf("text/plain", "inline part", extra="Content-Disposition: inline\r\n"),
        subtype="mixed",
    ),
    "delimiter-like lines": HEAD
    + 'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain\r\n\r\n"
    "--b is not alone\r\n x --b\r\n--bb\r\n--b--x\r\n-- b\r\n"
    "--b \t\r\nContent-Type: text/plain\r\n\r\n--b  x\r\n"
    "--b--\t\r\n",
    "epilogue and preamble with delimiters": HEAD
    + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    "preamble\r\n--bx\r\n--b\r\n\r\none\r\n--b--\r\n--b\r\nepilogue\r\n",
    "empty parts": HEAD
    + 'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\n--b\r\n'
    "Content-Type: text/plain\r\n\r\n\r\n--b--",
    "unquoted boundary with =": HEAD
    + "Content-Type: multipart/mixed; boundary=----=_x\r\n\r\n"
    "------=_x\r\n\r\nhello\r\n------=_x--\r\n",
    "odd content types": HEAD
    + multipart(
        "z",
        leaf('text/plain; charset="utf-8" (comment)', "comment charset"),
        leaf("text/plain; charset*=utf-8''utf%2D8", "rfc 2231 charset"),
        leaf("text/plain; charset=utf-8; charset=latin-1", "two charsets"),
        leaf("TEXT/HTML; CHARSET=Windows-1252", "<p>caps</p>"),
        leaf('text/plain; charset=""', "empty charset"),
        leaf("text/plain; charset=no-such-charset", "unknown charset"),
        leaf("text", "no subtype"),
        leaf("text/plain; format=flowed; delsp=yes", "flowed"),
        leaf("text/plain", "attachment?", extra="Content-Disposition: ATTACHMENT\r\n"),
        leaf(
            "text/plain",
            "encoded disposition",
            extra="Content-Disposition: =?utf-8?q?attachment?=\r\n",
        ),
        subtype="mixed",
    ),
    "bare LF": HEAD.replace("\r\n", "\n") + "\nHello https://acme.example/u\n",
    "no close delimiter": HEAD
    + 'Content-Type: multipart/alternative; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n',
    "digest": HEAD + 'Content-Type: multipart/digest; boundary="d"\r\n\r\n--d\r\n\r\n'
    "Subject: in digest\r\n\r\nhttps://acme.example/u\r\n--d--\r\n",
    "8-bit headers": HEAD
    + 'Content-Type: text/plain; charset=utf-8; name="Grüße.txt"\r\n'
    'Content-Disposition: inline; filename="Grüße.txt"\r\n\r\nGrüße\r\n',
    "From line": "From someone Mon Jan  1 00:00:00 2024\r\n" + HEAD + "\r\nbody\r\n",
    "header without colon": HEAD + "Not a header\r\n\r\nbody\r\n",
    "no body": HEAD.rstrip("\r\n"),
}

FAST = {
    "plain",
    "no headers",
    "html only, base64",
    "alternative",
    "folded headers",
    "mixed with attachments",
    "delimiter-like lines",
    "epilogue and preamble with delimiters",
    "empty parts",
    "odd content types",
    "8-bit headers",
}
"""The corpus messages the fast MIME split takes (the others go to the stdlib)."""


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_mime_split_is_the_stdlib_s(name: str) -> None:
    text = CORPUS[name]
    tree = fast_tree(text)
    assert (tree is not None) == (name in FAST)
    if tree is not None:
        assert shape(tree) == shape(STDLIB.parsestr(text))
    assert shape(mime_tree(text.encode())) == shape(DEFAULT.parsebytes(text.encode()))


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_body_is_the_one_the_full_parse_gives(name: str) -> None:
    content = CORPUS[name].encode()
    assert body_of(MessageView(content)) == full_path(content)


def test_the_newsletter_reads_as_before() -> None:
    found = body_of(MessageView(CORPUS["alternative"].encode()))
    assert found.texts == (
        NEWSLETTER_TEXT.replace("\r\n", "\n"),
        "Hello Jane,\nOur spring sale\u2026 starts now.\nShop now\n"
        "To stop these emails, unsubscribe here.",
    )
    assert [(link.url, link.text, link.context) for link in found.links] == [
        (
            "https://acme.example/shop",
            "Our spring sale starts now: https://acme.example/shop",
            "Hello Jane, Our spring sale starts now: https://acme.example/shop",
        ),
        (
            "https://acme.example/u?id=1",
            "https://acme.example/u?id=1.",
            "To stop these emails: https://acme.example/u?id=1.",
        ),
        ("https://acme.example/shop?a=1&b=2", "Shop Shop now", "Shop Shop now"),
        (
            "https://acme.example/u?id=1&t=2",
            "unsubscribe",
            "To stop these emails, unsubscribe here.",
        ),
    ]
    assert found.problems == ()


def test_the_newsletter_html_takes_the_fast_tokenizer_to_its_end() -> None:
    document = _html.sanitize_html(NEWSLETTER_HTML)
    assert Events().read_fast(document) == len(document)


# -- generated messages -------------------------------------------------------------

_BOUNDARIES = ["b", "b1", "bb", "=_Part_1", "----=_x", "a b", "x:y", "b--", "B"]
_LINES = [
    "",
    "hello https://acme.example/unsubscribe",
    "--b",
    "--b--",
    "--b1",
    "--b \t",
    "-- b",
    " --b",
    "From me",
    "Subject: not a header",
    '<p>Hi <a href="https://acme.example/u">Unsubscribe</a></p>',
    "Gr=C3=BC=C3=9Fe=",
    "aGVsbG8gaHR0cHM6Ly9hLmV4YW1wbGUv",
    "Grüße",
    "\tindented",
]
_CTYPES = [
    "text/plain",
    "text/plain; charset=utf-8",
    'text/html; charset="iso-8859-1"',
    "text/html;\r\n\tcharset=utf-8",
    "text/plain; charset=utf-8 (c)",
    "image/png",
    "message/rfc822",
    "application/octet-stream",
    "text",
]
_CTES = [None, "7bit", "base64", "quoted-printable", "Base64", "base64 "]
_DISPOSITIONS = [None, "inline", "attachment", 'attachment; filename="a.txt"']


@dataclass(frozen=True)
class Leaf:
    ctype: str | None
    cte: str | None
    disposition: str | None
    lines: list[str]

    def render(self, crlf: str) -> str:
        headers = ""
        if self.ctype is not None:
            headers += f"Content-Type: {self.ctype}{crlf}"
        if self.cte is not None:
            headers += f"Content-Transfer-Encoding: {self.cte}{crlf}"
        if self.disposition is not None:
            headers += f"Content-Disposition: {self.disposition}{crlf}"
        return headers + crlf + crlf.join(self.lines)


@dataclass(frozen=True)
class Multi:
    subtype: str
    boundary: str
    quoted: bool
    children: list[Leaf | Multi]
    preamble: list[str]
    epilogue: list[str]
    close: bool
    padding: str

    def render(self, crlf: str) -> str:
        value = f'"{self.boundary}"' if self.quoted else self.boundary
        out = f"Content-Type: multipart/{self.subtype};{crlf} boundary={value}{crlf}"
        out += crlf + "".join(line + crlf for line in self.preamble)
        for child in self.children:
            out += f"--{self.boundary}{self.padding}{crlf}{child.render(crlf)}{crlf}"
        if self.close:
            out += f"--{self.boundary}--{self.padding}{crlf}"
        return out + crlf.join(self.epilogue)


leaves = st.builds(
    Leaf,
    st.sampled_from([None, *_CTYPES]),
    st.sampled_from(_CTES),
    st.sampled_from(_DISPOSITIONS),
    st.lists(st.sampled_from(_LINES), max_size=4),
)
trees = st.recursive(
    leaves,
    lambda children: st.builds(
        Multi,
        st.sampled_from(["alternative", "mixed", "related", "digest"]),
        st.sampled_from(_BOUNDARIES),
        st.booleans(),
        st.lists(children, max_size=3),
        st.lists(st.sampled_from(_LINES), max_size=2),
        st.lists(st.sampled_from(_LINES), max_size=2),
        st.booleans(),
        st.sampled_from(["", "", " ", "\t "]),
    ),
    max_leaves=6,
)


@st.composite
def messages(draw: st.DrawFn) -> str:
    tree = draw(trees)
    crlf = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    text = HEAD.replace("\r\n", crlf) + tree.render(crlf)
    if draw(st.booleans()):  # a stray line end somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["\n", "\r", "\r\n"])) + text[at:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_generated_messages_split_as_the_stdlib_does(text: str) -> None:
    content = text.encode()
    decoded = content.decode("ascii", "surrogateescape")  # as BytesParser does
    tree = fast_tree(decoded)
    event("fast" if tree is not None else "stdlib")
    expected = shape(STDLIB.parsestr(decoded))
    if tree is not None:
        assert shape(tree) == expected
    assert shape(mime_tree(content)) == expected == shape(DEFAULT.parsebytes(content))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_generated_messages_give_the_body_of_the_full_parse(text: str) -> None:
    content = text.encode()
    assert body_of(MessageView(content)) == full_path(content)


# -- the split without the tree ---------------------------------------------------

_USUAL_CTYPES = [
    "text/plain",
    "text/plain; charset=utf-8",
    "TEXT/PLAIN; CHARSET=UTF-8",
    'text/html; charset="iso-8859-1"',
    "text/html;\r\n\tcharset=utf-8",
    "text/html; charset=windows-1252; format=flowed",
    'text/plain; charset=""',
    "text/plain; charset=no-such-charset",
    "text/plain; charset=base64",
    "image/png",
    "message/rfc822",
    "application/octet-stream",
]
_USUAL_CTES = [
    None,
    "7bit",
    "8bit",
    "base64",
    "quoted-printable",
    "Base64",
    "base64 ",
    " Quoted-Printable\r\n ",
    "x-uue",
    "binary",
    "bäse64",
]
_USUAL_DISPOSITIONS = [None, "inline", "attachment", 'attachment; filename="a.txt"']
_USUAL_LINES = [
    *_LINES,
    "aGVsbG8gaHR0cHM6Ly9hLmV4YW1wbGUv=",
    "aGVsbG8",
    "aGVs!bG8=",
    "=E9t=E9 https://acme.example/d=C3=A9sabonner",
    "caf\xe9",
]
usual_leaves = st.builds(
    Leaf,
    st.sampled_from([None, *_USUAL_CTYPES]),
    st.sampled_from(_USUAL_CTES),
    st.sampled_from(_USUAL_DISPOSITIONS),
    st.lists(st.sampled_from(_USUAL_LINES), max_size=4),
)
usual_trees = st.recursive(
    usual_leaves,
    lambda children: st.builds(
        Multi,
        st.sampled_from(["alternative", "mixed", "related"]),
        st.sampled_from(["b", "b1", "=_Part_1", "----=_x", "B"]),
        st.booleans(),
        st.lists(children, min_size=1, max_size=3),
        st.lists(st.sampled_from(_LINES), max_size=2),
        st.lists(st.sampled_from(_LINES), max_size=2),
        st.booleans() | st.just(True),
        st.sampled_from(["", "", " "]),
    ),
    max_leaves=6,
)


@st.composite
def usual_messages(draw: st.DrawFn) -> bytes:
    """Messages mostly of the shape :func:`fast_parts` reads, 8-bit bytes too."""
    text = HEAD + draw(usual_trees).render("\r\n")
    return text.encode("utf-8") if draw(st.booleans()) else text.encode("latin-1")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usual_messages())
def test_the_body_read_without_the_tree_is_the_body_of_the_tree(content: bytes) -> None:
    decoded = content.decode("ascii", "surrogateescape")
    parts = _mime.fast_parts(decoded)
    event("fast" if parts is not None else "tree")
    if parts is not None:
        assert fast_tree(decoded) is not None
    assert body_module.read_body(content) == extract(mime_tree(content))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_the_parts_read_without_the_tree_are_the_tree_s(text: str) -> None:
    content = text.encode()
    decoded = content.decode("ascii", "surrogateescape")
    parts = _mime.fast_parts(decoded)
    if parts is not None:
        assert fast_tree(decoded) is not None
    assert body_module.read_body(content) == extract(mime_tree(content))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usual_messages())
def test_a_policy_worker_s_view_reads_the_body_of_the_full_parse(
    content: bytes,
) -> None:
    """A worker's view (``checked``: lines end in CRLF, the relay refused the
    others) skips counting line ends; the body is the same."""
    assert body_of(MessageView(content, checked=True)) == full_path(content)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_corpus_reads_the_same_without_the_tree(name: str) -> None:
    content = CORPUS[name].encode()
    assert body_module.read_body(content) == extract(mime_tree(content))


def test_the_newsletter_is_read_without_the_tree() -> None:
    parts = _mime.fast_parts(CORPUS["alternative"])
    assert parts is not None
    assert [part.ctype for part in parts] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]


# -- headers ----------------------------------------------------------------------

_CONTENT_TYPE_PIECES = [
    "text",
    "/",
    "plain",
    "html",
    "multipart",
    "mixed",
    ";",
    " ",
    "\t",
    "\r\n ",
    "\r\n\t",
    "charset",
    "CharSet",
    "=",
    "utf-8",
    "ISO-8859-1",
    '"',
    "\\",
    "(",
    ")",
    "*",
    "'",
    "%41",
    "name",
    "boundary",
    "=?utf-8?q?x?=",
    "é",
    "{",
    "@",
    ",",
]


@pytest.mark.parametrize(
    "value",
    [
        "text/plain",
        "TEXT/Plain; CHARSET=UTF-8",
        'text/html; charset="utf-8"',
        'text/html; charset=" utf-8 "',
        "text/html;\r\n\tcharset=iso-8859-1;\r\n format=flowed",
        "text/plain; charset=utf-8;",
        "text/plain; charset=utf-8 (comment)",
        "text/plain; charset*=utf-8''%75tf-8",
        "text/plain; charset=utf-8; charset=latin-1",
        "text/plain; Charset=utf-8; charset=latin-1",
        'text/plain; charset=""',
        "text/plain; charset=",
        "text/plain;; charset=utf-8",
        "text / plain",
        "text",
        "/",
        "multipart/mixed; boundary=----=_x",
        "text/plain; charset=utf-8; name*0=a; name*1=b",
        "text/plain; charset=é",
        "multipart/mixed; boundary==_Part_1",
        'multipart/mixed; boundary="a b "',
        'multipart/mixed; boundary=" a"',
        "multipart/mixed; boundary=a(b)",
        'multipart/mixed; boundary="x" (c)',
        "multipart/mixed; boundary=x;boundary=y",
        "multipart/mixed; Boundary=x; boundary=y",
        "multipart/mixed; boundary*=us-ascii''a%20b",
        'multipart/mixed; boundary=""',
        "multipart/mixed (c); boundary=x",
    ],
)
def test_content_type_reads_as_policy_default(value: str) -> None:
    msg = Message()
    msg.set_raw("Content-Type", value)
    assert _mime.content_type(msg) == reference_content_type(value)
    assert _mime.boundary(msg) == reference_boundary(value)
    part, reference = Part(), EmailMessage()
    part.set_raw("Content-Type", value)
    reference.set_raw("Content-Type", value)
    assert part.get_content_type() == reference.get_content_type()
    assert part.get_boundary() == reference.get_boundary()


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(_CONTENT_TYPE_PIECES), max_size=14).map("".join))
def test_any_content_type_reads_as_policy_default(value: str) -> None:
    assert outcome(lambda v: _mime.content_type(with_content_type(v)), value) == (
        outcome(reference_content_type, value)
    )
    assert outcome(lambda v: _mime.boundary(with_content_type(v)), value) == (
        outcome(reference_boundary, value)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "attachment",
                "inline",
                "ATTACHMENT",
                ";",
                " ",
                "\r\n ",
                "filename",
                "=",
                '"a;b"',
                "(c)",
                "=?utf-8?q?attachment?=",
                "é",
                "x",
            ]
        ),
        max_size=8,
    ).map("".join)
)
def test_any_content_disposition_reads_as_policy_default(value: str) -> None:
    assert outcome(lambda v: _mime.disposition(with_disposition(v)), value) == (
        outcome(reference_disposition, value)
    )


# -- HTML -------------------------------------------------------------------------

_HTML_PIECES = [
    "<p>",
    "</p>",
    "<P CLASS=x>",
    "<br/>",
    "<br />",
    "<br>",
    '<a href="https://acme.example/u">',
    "<a href=https://acme.example/u?a=1&amp;b=2>",
    "<a href='x' title=\"T &amp; C\">",
    "<a href=x/>",
    "<a hidden>",
    '<a href="">',
    "<a href= x>",
    "<a href==x>",
    "<a\thref\n=\n'y'>",
    '<a href="x"title="y">',
    '<a href="x" / >',
    "<a b\xa0c>",
    "<a href=x\xa0y>",
    "</a>",
    "</a >",
    "</ a>",
    "</a x>",
    "<img src=x.png alt='Unsubscribe'>",
    '<div style="display:none">',
    "</div>",
    "<style>p { color: red }</style>",
    "<STYLE type=text/css>a{}</Style>",
    "<style>",
    "</style>",
    "<script>if (a < b) {}</script>",
    "<script>x</script >",
    "<title>T &amp; C</title>",
    "<textarea>x</textarea>",
    "<xmp><p>raw</p></xmp>",
    "<o:p>",
    "<v:rect xmlns:v='urn:x'>",
    "<h1>",
    "<td valign=top width=100%>",
    "<!-- c -->",
    "<!DOCTYPE html>",
    "<?xml?>",
    "<![CDATA[x]]>",
    "<",
    "< p>",
    "<3",
    "<a",
    "<a href='",
    "&",
    "&amp;",
    "&nbsp;",
    "&#",
    "&#x41;",
    "&unknown;",
    "Hello ",
    "unsubscribe",
    " \r\n\t",
    "\u200b",
    "é",
    ">",
    "/",
    "=",
    '"',
    "'",
]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_HTML_PIECES), max_size=25).map("".join))
def test_the_fast_tokenizer_gives_htmlparser_s_events(document: str) -> None:
    assert html_events(document, fast=True) == html_events(document, fast=False)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("<>/!-?&#;=\"' abpsx\n\u00e9"), max_size=200))
def test_the_fast_tokenizer_gives_htmlparser_s_events_on_noise(document: str) -> None:
    assert html_events(document, fast=True) == html_events(document, fast=False)


# -- plain text and whitespace ----------------------------------------------------


@settings(max_examples=800, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "http",
                "https",
                "HTTPS",
                "mailto",
                "MAILTO",
                "ma\u0131lto",
                "http\u017f",
                ":",
                "//",
                "x",
                ".",
                " ",
                "\n",
                "<",
                ">",
                '"',
                "a.example",
                "ftp",
                "::",
                "é",
            ]
        ),
        max_size=30,
    ).map("".join)
)
def test_the_url_scan_finds_what_the_regex_finds(text: str) -> None:
    expected = [found.span() for found in body_module._URL.finditer(text)]
    assert list(body_module._urls(text)) == expected


def test_the_url_scan_with_colons_everywhere_uses_the_regex() -> None:
    text = "::" * 1000 + "https://a.example/x " + "::" * 1000
    assert list(body_module._urls(text)) == [(2000, 2019)]


@settings(max_examples=500, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(" \n\t\x0b\x0c\x1c\x85\xa0\u2028\u3000\u200bab"),
        max_size=60,
    )
)
def test_collapse_is_the_regex_collapse(text: str) -> None:
    assert _html.collapse(text) == reference_collapse(text)
