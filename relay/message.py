"""Parses DATA once into a read-only :class:`MessageView`. It makes no decisions.

The hot path only locates the header section and reads the one header it needs
(Content-Type) with a scan; the full stdlib parse (``email``, ``policy.default``)
happens once, on first use of :attr:`MessageView.headers`, so checks that need the
headers share one parse and messages that need none pay for none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any, TypeVar, cast

from policies._mime import boundary_of

T = TypeVar("T")

_PARSER = BytesParser(policy=policy.default)
# RFC 5322 §2.2: a header field is a name of printable ASCII except ":", then ":".
_FIELD_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
_CONTENT_TYPE = re.compile(rb"(?im)^content-type[ \t]*:((?:[^\r\n]*(?:\r\n[ \t])?)*)")
_MULTIPART = re.compile(rb"(?i)^\s*multipart\s*/")


_BLANKS_COLON = re.compile(rb"[ \t]*:")
_LF = ord("\n")


def header_block_end(content: bytes) -> int:
    """Offset of the body (just after the blank line), or ``len(content)``."""
    if content.startswith(b"\r\n"):
        return 2
    index = content.find(b"\r\n\r\n")
    return len(content) if index < 0 else index + 4


class MessageView:
    """A view of one message: its size, header section and structural problems."""

    __slots__ = (
        "_headers",
        "_lowered",
        "_memo",
        "_parsed",
        "body_offset",
        "content",
        "crlf_only",
        "problem",
        "size_bytes",
    )

    def __init__(self, content: bytes, *, checked: bool = False) -> None:
        """``checked``: the relay already found no problem in ``content`` (the
        checks of ``relay.smtp_handler.check_data``: no NUL, no bare CR or LF,
        and no structural :attr:`problem`; a policy worker gets only such
        messages): not looked again."""
        self.content = content
        self.size_bytes = len(content)
        self.body_offset = header_block_end(content)
        self._headers: EmailMessage | None = None
        self._parsed: EmailMessage | None = None
        self._lowered: bytes | None = None
        self._memo: dict[str, Any] = {}
        self.crlf_only = checked
        """Known to end every line with CRLF (``checked``); else not looked at."""
        self.problem = None if checked else self._find_problem()

    @classmethod
    def parse(cls, content: bytes) -> MessageView:
        """A view of ``content`` (CRLF line endings)."""
        return cls(content)

    @property
    def headers(self) -> EmailMessage:
        """The header section, parsed once with ``policy.default``."""
        if self._headers is None:
            block = self.content[: self.body_offset]
            self._headers = _PARSER.parsebytes(block, headersonly=True)
        return self._headers

    @property
    def parsed(self) -> EmailMessage:
        """The whole message (MIME tree and bodies), parsed once on first use."""
        if self._parsed is None:
            self._parsed = _PARSER.parsebytes(self.content)
        return self._parsed

    def memo(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` once per ``key``; checks share what they derive."""
        if key not in self._memo:
            self._memo[key] = build()
        return cast("T", self._memo[key])

    def header(self, name: str) -> str | None:
        """The unfolded value of the first ``name`` header, or ``None`` (a scan,
        not a parse: cheap enough for the hot path)."""
        block = self.content[: self.body_offset]
        end = self._value_start(block, name.encode("ascii"))
        if end < 0:
            return None
        value = bytearray()
        while True:
            line_end = block.find(b"\r\n", end)
            if line_end < 0:
                line_end = len(block)
            value += block[end:line_end]
            end = line_end + 2
            if block[end : end + 1] not in (b" ", b"\t"):
                break
        return bytes(value).decode("utf-8", "replace").strip()

    def _value_start(self, block: bytes, name: bytes) -> int:
        """Where the value of the first ``name`` field of ``block`` starts, or
        -1: the end of what ``(?im)^name[ \\t]*:`` finds, found with plain
        searches in the lower-cased block (a bytes pattern ignores the case of
        ASCII letters only, as ``bytes.lower`` changes them only)."""
        if self._lowered is None:
            self._lowered = block.lower()
        lowered = self._lowered
        needle = name.lower()
        at = lowered.find(needle)
        while at >= 0:
            if at == 0 or lowered[at - 1] == _LF:
                found = _BLANKS_COLON.match(block, at + len(needle))
                if found is not None:
                    return found.end()
            at = lowered.find(needle, at + 1)
        return -1

    def without_header(self, name: str) -> bytes:
        """The message with every ``name`` header (and its folded lines) removed."""
        block = self.content[: self.body_offset]
        pattern = (
            rb"(?im)^"
            + re.escape(name.encode("ascii"))
            + rb"[ \t]*:.*\r\n(?:[ \t].*\r\n)*"
        )
        stripped = re.sub(pattern, b"", block)
        if stripped == block:
            return self.content
        return stripped + self.content[self.body_offset :]

    def _find_problem(self) -> str | None:
        content = self.content
        if self.body_offset <= 2 or not _FIELD_LINE.match(content):
            return "malformed header section (RFC 5322 2.2)"
        block = content[: self.body_offset]
        for line in block.rstrip(b"\r\n").split(b"\r\n"):
            if line[:1] not in (b" ", b"\t") and not _FIELD_LINE.match(line):
                return "malformed header section (RFC 5322 2.2)"
        found = _CONTENT_TYPE.search(block)
        if found is None or not _MULTIPART.match(found.group(1)):
            return None
        return self._multipart_problem(found.group(1))

    def _multipart_problem(self, raw_type: bytes) -> str | None:
        try:
            boundary = boundary_of(raw_type.decode("utf-8", "surrogateescape"))
        except (ValueError, TypeError, LookupError):
            return "unparsable Content-Type header"
        if not boundary:
            return "multipart message without a boundary (RFC 2046 5.1.1)"
        delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
        body = self.content[self.body_offset :]
        if delimiter not in body:
            return "multipart boundary never appears in the body (RFC 2046 5.1.1)"
        if delimiter + b"--" not in body:
            return "multipart body is not closed by its final boundary (RFC 2046 5.1.1)"
        return None
