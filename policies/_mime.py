"""The MIME tree of a message for reading its bodies, built cheaply.

:func:`mime_tree` returns the tree ``BytesParser(policy=policy.default)`` would
for the purpose of :mod:`policies.body` (the same parts, in the same order, with
the same raw headers and leaf payloads) at a fraction of the cost:

* its parts are plain ``compat32`` messages (:class:`Part`), whose headers stay
  raw strings; only the content type and the boundary, which decide the shape of
  the tree, are read as ``policy.default`` reads them (:func:`content_type`,
  :func:`boundary`: the usual values with a regular expression, others with the
  ``policy.default`` header classes);
* the common shape of mail (CRLF line ends, plain header fields, multipart bodies
  whose delimiter lines are well placed) is split with a few string searches
  (:func:`fast_tree`); anything else goes to the stdlib's line-by-line feed parser,
  making :class:`Part` objects.

Preambles, epilogues and the content of ``message/*`` parts are not kept by the
fast split (their payload is ``None``): nobody reads them here.

:func:`fast_parts` is the same split without the tree: for the usual message (the
shape :func:`fast_tree` splits, with Content-Type and Content-Disposition values
of the usual shape) it lists the parts with what :mod:`policies.body` reads of
them, and where their payloads lie, building no message object.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from email import policy
from email.message import EmailMessage, Message
from email.parser import Parser
from itertools import pairwise
from typing import NamedTuple, TypeVar, overload

_T = TypeVar("_T")
_MAX_FAST_DEPTH = 8
"""Nesting the fast path splits; deeper messages go to the stdlib parser."""
_TEXT_TYPES = frozenset({"text/plain", "text/html"})
"""The parts whose text is read (their disposition matters)."""
_CACHE_SIZE = 1024
"""Distinct Content-Type values remembered across messages."""

# A header field: a name of printable ASCII but ":" (what the feed parser takes
# for one; no "From " line), then its value lines.
_FIELD = re.compile(r"([!-9;-~]+):([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)")
# The same, or one character that cannot start one (the split then gives up).
_FIELD_OR_JUNK = re.compile(
    r"([!-9;-~]+):([^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)|(.)", re.DOTALL
)


# Content-Type and Content-Disposition values of the usual shape, read here as
# the policy.default header classes would (exactly: the tests compare them);
# anything else is left to those classes. Tokens are RFC 2045's, without the
# characters of RFC 2231 (*, ', %) and of encoded words (=, ?).
_FWS = r"(?:\r?\n)?[ \t]"
_CHARS = r"[-!#$&+.^_`{|}~0-9A-Za-z]+"
_VALUE = rf'(?:{_CHARS}|"[^"\\\r\n]*")'
_PLAIN_CONTENT_TYPE = re.compile(
    rf"{_FWS}*({_CHARS}/{_CHARS}){_FWS}*"
    rf"((?:;{_FWS}*{_CHARS}{_FWS}*={_FWS}*{_VALUE}{_FWS}*)*)(?:;{_FWS}*)?"
)
_PARAMETER = re.compile(rf";{_FWS}*({_CHARS}){_FWS}*={_FWS}*({_VALUE})")
_PLAIN_DISPOSITION = re.compile(rf"{_FWS}*({_CHARS}){_FWS}*(?:;[ -~\t\r\n]*)?")


def raw_header(part: Message, name: str) -> str | None:
    """The value of the first ``name`` header of ``part`` as stored (``name``
    in lower case): the raw value, or a header object a program set."""
    for key, value in part.raw_items():
        if key.lower() == name:
            found: object = value  # a str, or an email.header.Header
            return found if isinstance(found, str) else str(found)
    return None


Parameters = tuple[tuple[str, str], ...]
"""(name, unquoted value) pairs, names in lower case, in order."""


def _plain_parameters(raw: str) -> tuple[str, Parameters] | None:
    """The content type and (name, unquoted value) parameters of a Content-Type
    value of the usual shape, or ``None``."""
    if hasattr(raw, "params"):
        return None  # a policy.default header object, already parsed
    return _plain_content_type(str(raw))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _plain_content_type(raw: str) -> tuple[str, Parameters] | None:
    """:func:`_plain_parameters` of a string, remembered: a mailer writes the
    same few Content-Type values on every message (boundaries aside)."""
    plain = _PLAIN_CONTENT_TYPE.fullmatch(raw)
    if plain is None:
        return None
    params = tuple(
        (name.lower(), value[1:-1] if value.startswith('"') else value)
        for name, value in _PARAMETER.findall(plain.group(2))
    )
    return plain.group(1).lower(), params


def _only(params: Parameters, name: str) -> tuple[bool, str | None]:
    """(True, value) if parameter ``name`` is there at most once."""
    values = [value for key, value in params if key == name]
    return len(values) <= 1, values[0] if values else None


def content_type(part: Message) -> tuple[str, str | None]:
    """The content type (as ``get_content_type``) and charset (stripped, lower
    case, ``None`` if empty) of ``part``, as ``policy.default`` reads them."""
    raw = raw_header(part, "content-type")
    if raw is None:
        return part.get_default_type(), None
    plain = _plain_parameters(raw)
    if plain is not None:
        ctype, params = plain
        single, charset = _only(params, "charset")
        if single:
            return ctype, _charset_name(charset)
    header = policy.default.header_fetch_parse("Content-Type", raw)
    ctype = str(header).partition(";")[0].strip().lower()
    if ctype.count("/") != 1:
        return "text/plain", None  # RFC 2045 5.2: invalid means text/plain
    params_of = getattr(header, "params", None)
    value = params_of.get("charset") if isinstance(params_of, Mapping) else None
    return ctype, _charset_name(value if isinstance(value, str) else None)


def _charset_name(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    return value.strip().lower()


def boundary(part: Message) -> str | None:
    """``part.get_boundary()`` as under ``policy.default``."""
    raw = raw_header(part, "content-type")
    if raw is None:
        return None
    return boundary_of(raw)


def boundary_of(raw: str) -> str | None:
    """The boundary parameter of the Content-Type value ``raw`` (as stored, folds
    included) as ``policy.default`` reads it; a regex for the usual shape."""
    plain = _plain_parameters(raw)
    if plain is not None:
        single, value = _only(plain[1], "boundary")
        if single and value:
            return value.rstrip()
    reference = EmailMessage()
    reference.set_raw("Content-Type", raw)
    return reference.get_boundary()


def disposition(part: Message) -> str | None:
    """``part.get_content_disposition()`` as under ``policy.default``."""
    raw = raw_header(part, "content-disposition")
    if raw is None:
        return None
    plain = None if hasattr(raw, "params") else _PLAIN_DISPOSITION.fullmatch(raw)
    if plain is not None:
        return plain.group(1).lower()
    header = policy.default.header_fetch_parse("Content-Disposition", raw)
    return str(header).partition(";")[0].strip().lower()


class Part(Message):
    """A ``compat32`` message part whose content type and boundary, which decide
    the shape of the tree, read as under ``policy.default``."""

    def get_content_type(self) -> str:
        return content_type(self)[0]

    @overload
    def get_boundary(self, failobj: None = None) -> str | None: ...
    @overload
    def get_boundary(self, failobj: _T) -> str | _T: ...
    def get_boundary(self, failobj: object = None) -> object:
        found = boundary(self)
        return failobj if found is None else found


_PARSER = Parser(Part, policy=policy.compat32)


def mime_tree(content: bytes) -> Message:
    """The MIME tree of ``content``, as described above."""
    text = content.decode("ascii", "surrogateescape")
    tree = fast_tree(text)
    return tree if tree is not None else _PARSER.parsestr(text)


def fast_tree(text: str) -> Part | None:
    """The tree of ``text`` (bytes decoded as ASCII with surrogateescape, as the
    stdlib's BytesParser does), or ``None`` when the message is not of the shape
    the fast path splits exactly as the stdlib would."""
    lines = text.count("\n")
    if text.count("\r") != lines or text.count("\r\n") != lines:
        return None  # a bare CR or LF: lines the fast path would not see
    return _part(text, 0, len(text), 0)


def _part(text: str, start: int, end: int, depth: int) -> Part | None:
    """The part in ``text[start:end]``: at the top (depth 0) the whole message;
    below, what lies between two delimiter lines (ending with CRLF)."""
    msg = Part()
    if text.startswith("\r\n", start, end):
        body = start + 2
    else:
        blank = text.find("\r\n\r\n", start, end)
        if blank < 0:
            return None  # no header/body separator
        stop = blank + 2
        at = start
        while at < stop:
            field = _FIELD.match(text, at, stop)
            if field is None:
                return None
            value = field.group(2).lstrip(" \t").rstrip("\r\n")
            msg.set_raw(field.group(1), value)
            at = field.end()
        body = blank + 4
    ctype = msg.get_content_type()
    maintype = ctype.partition("/")[0]
    if maintype == "message":
        return msg
    if maintype == "multipart":
        if ctype == "multipart/digest" or depth >= _MAX_FAST_DEPTH:
            return None  # parts default to message/rfc822; too deep
        return _multipart(msg, text, body, end, depth)
    payload = text[body:end]
    if depth and payload.endswith("\r\n"):
        payload = payload[:-2]  # RFC 2046 5.1.1: the CRLF belongs to the delimiter
    msg.set_payload(payload)
    return msg


def _multipart(msg: Part, text: str, body: int, end: int, depth: int) -> Part | None:
    boundary = msg.get_boundary()
    if not boundary or "\r" in boundary or "\n" in boundary:
        return None
    delimiters = _delimiters(text, "--" + boundary, body, end)
    if delimiters is None:
        return None
    for (_, after), (before, _) in pairwise(delimiters):
        part = _part(text, after, before, depth + 1)
        if part is None:
            return None
        msg.attach(part)
    return msg


def _delimiters(
    text: str, dash_boundary: str, start: int, end: int
) -> list[tuple[int, int]] | None:
    """(start, end) of each delimiter line of ``dash_boundary`` in
    ``text[start:end]`` up to the close delimiter, which ends the list; ``None``
    unless there are parts between them, each of one line or more, and a close
    delimiter ends them. ``start`` is the start of a line, after a line end."""
    found: list[tuple[int, int]] = []
    needle = "\n" + dash_boundary  # only at the start of a line
    size = len(dash_boundary)
    at = start - 1
    while True:
        index = text.find(needle, at, end) + 1
        if index == 0:
            return None  # no close delimiter
        at = index
        after = index + size
        close = text.startswith("--", after, end)
        if close:
            after += 2
        while after < end and text[after] in " \t":
            after += 1
        if after < end and not text.startswith("\r\n", after, end):
            continue  # a longer line that begins like a delimiter
        line_end = min(after + 2, end)
        if found and found[-1][1] == index:
            return None  # two delimiter lines in a row
        found.append((index, line_end))
        if close:
            return found if len(found) > 1 else None
        if line_end == end:
            return None  # a delimiter that ends the input


# -- the split without the tree ---------------------------------------------------


class FastPart(NamedTuple):
    """One part of :func:`fast_parts`: what ``policies.body.extract`` reads of it."""

    ctype: str
    """``get_content_type()``: a ``multipart/*`` or ``message/*`` part has no
    payload here (its parts follow it; an attached message is not read)."""
    charset: str | None
    """As :func:`content_type` gives it."""
    disposition: str | None
    """:func:`disposition`, for text parts only (``None`` for the others)."""
    cte: str | None
    """The raw Content-Transfer-Encoding value as stored, or ``None``."""
    start: int
    end: int
    """``text[start:end]`` is the payload, as ``fast_tree`` stores it."""


# The headers read of each part, by the length of their names: a cheap first test.
_READ_NAMES = {
    12: "content-type",
    19: "content-disposition",
    25: "content-transfer-encoding",
}


def fast_parts(text: str, *, crlf_only: bool = False) -> list[FastPart] | None:
    """The parts :func:`fast_tree` splits ``text`` into, depth first and parents
    first (the order ``policies.body.extract`` reads them), or ``None`` when it
    would not split ``text``, or when a Content-Type or Content-Disposition value
    is not of the usual shape (read through :func:`mime_tree` then).
    ``crlf_only``: the caller knows that no line of ``text`` ends otherwise."""
    if not crlf_only:
        lines = text.count("\n")
        if text.count("\r") != lines or text.count("\r\n") != lines:
            return None
    found: list[FastPart] = []
    return found if _fast_part(text, 0, len(text), 0, found) else None


def _fast_part(
    text: str, start: int, end: int, depth: int, out: list[FastPart]
) -> bool:
    """:func:`_part` without the ``Part``: append the part (and its parts) to
    ``out``; False where ``_part`` gives ``None`` (or a value is unusual)."""
    read: dict[str, str] = {}
    if text.startswith("\r\n", start, end):
        body = start + 2
    else:
        blank = text.find("\r\n\r\n", start, end)
        if blank < 0:
            return False
        for name, value, junk in _FIELD_OR_JUNK.findall(text, start, blank + 2):
            if junk:
                return False
            wanted = _READ_NAMES.get(len(name))
            if wanted is not None and wanted not in read and name.lower() == wanted:
                read[wanted] = value.lstrip(" \t").rstrip("\r\n")
        body = blank + 4
    raw_type = read.get("content-type")
    params: Parameters = ()
    if raw_type is None:
        ctype, charset = "text/plain", None  # Part's default type
    else:
        plain = _plain_parameters(raw_type)
        if plain is None:
            return False
        ctype, params = plain
        single, charset = _only(params, "charset")
        if not single:
            return False
        charset = _charset_name(charset)
    maintype = ctype.partition("/")[0]
    if maintype == "message":
        out.append(FastPart(ctype, charset, None, None, 0, 0))
        return True
    if maintype == "multipart":
        if ctype == "multipart/digest" or depth >= _MAX_FAST_DEPTH:
            return False
        single, boundary = _only(params, "boundary")
        if not single or not boundary:
            return False  # the stdlib's reading decides (see boundary_of)
        boundary = boundary.rstrip()
        if not boundary or "\r" in boundary or "\n" in boundary:
            return False
        delimiters = _delimiters(text, "--" + boundary, body, end)
        if delimiters is None:
            return False
        out.append(FastPart(ctype, charset, None, None, 0, 0))
        return all(
            _fast_part(text, after, before, depth + 1, out)
            for (_, after), (before, _) in pairwise(delimiters)
        )
    dispose = None
    if ctype in _TEXT_TYPES:
        raw_disposition = read.get("content-disposition")
        if raw_disposition is not None:
            plain_disposition = _PLAIN_DISPOSITION.fullmatch(raw_disposition)
            if plain_disposition is None:
                return False
            dispose = plain_disposition.group(1).lower()
    if depth and end - body >= 2 and text.startswith("\r\n", end - 2, end):
        end -= 2  # RFC 2046 5.1.1: the CRLF belongs to the delimiter
    out.append(
        FastPart(
            ctype, charset, dispose, read.get("content-transfer-encoding"), body, end
        )
    )
    return True
