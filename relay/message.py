"""Parses DATA once into a read-only :class:`MessageView`. It makes no decisions.

Only the header section is parsed on the hot path (stdlib ``email``,
``policy.default``); bodies are parsed when a check asks for them. ``problem``
reports a header section or top-level MIME structure too broken to pass on.
"""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.errors import MissingHeaderBodySeparatorDefect
from email.message import EmailMessage
from email.parser import BytesParser

_PARSER = BytesParser(policy=policy.default)


def header_block_end(content: bytes) -> int:
    """Offset of the body (just after the blank line), or ``len(content)``."""
    if content.startswith(b"\r\n"):
        return 2
    index = content.find(b"\r\n\r\n")
    return len(content) if index < 0 else index + 4


@dataclass(frozen=True, slots=True)
class MessageView:
    """A parsed view of one message: its headers, size and structural problems."""

    headers: EmailMessage
    size_bytes: int
    body_offset: int
    problem: str | None

    @classmethod
    def parse(cls, content: bytes) -> MessageView:
        """Parse the header section of ``content`` (CRLF line endings)."""
        body_offset = header_block_end(content)
        headers = _PARSER.parsebytes(content[:body_offset], headersonly=True)
        return cls(
            headers=headers,
            size_bytes=len(content),
            body_offset=body_offset,
            problem=_problem(headers, content, body_offset),
        )


def _problem(headers: EmailMessage, content: bytes, body_offset: int) -> str | None:
    if len(headers) == 0 or any(
        isinstance(d, MissingHeaderBodySeparatorDefect) for d in headers.defects
    ):
        return "malformed header section (RFC 5322 2.2)"
    try:
        maintype = headers.get_content_maintype()
        boundary = headers.get_boundary() if maintype == "multipart" else None
    except (ValueError, TypeError, LookupError):
        return "unparsable Content-Type header"
    if maintype != "multipart":
        return None
    if not boundary:
        return "multipart message without a boundary (RFC 2046 5.1.1)"
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    body = content[body_offset:]
    if delimiter not in body:
        return "multipart boundary never appears in the body (RFC 2046 5.1.1)"
    if delimiter + b"--" not in body:
        return "multipart body is not closed by its final boundary (RFC 2046 5.1.1)"
    return None
