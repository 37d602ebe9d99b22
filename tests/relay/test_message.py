"""Tests for relay.message: MessageView's structural problems, and robustness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.message import MessageView, header_block_end

GOOD = (
    b"From: news@acme.example\r\nTo: jane@example.org\r\nSubject: Hello\r\n"
    b"\r\nHello Jane,\r\n"
)
MULTIPART = (
    b"From: news@acme.example\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\npreamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nHi\r\n"
    b"--b1\r\nContent-Type: text/html\r\n\r\n<p>Hi</p>\r\n--b1--\r\n"
)


def multipart(content_type: bytes, body: bytes) -> bytes:
    return (
        b"From: news@acme.example\r\nContent-Type: " + content_type + b"\r\n\r\n" + body
    )


@pytest.mark.parametrize(
    "content",
    [
        GOOD,
        MULTIPART,
        b"From: news@acme.example\r\nSubject: no body\r\n",
        b"From: news@acme.example\r\nSubject: empty body\r\n\r\n",
        b"From: a@x.org\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n",
    ],
    ids=["good", "multipart", "no-body", "empty-body", "text"],
)
def test_good_messages_have_no_problem(content: bytes) -> None:
    view = MessageView.parse(content)
    assert view.problem is None
    assert view.size_bytes == len(content)
    assert view.headers["From"]


def test_view_fields() -> None:
    view = MessageView.parse(GOOD)
    assert view.headers["Subject"] == "Hello"
    assert view.body_offset == GOOD.index(b"\r\n\r\n") + 4
    assert GOOD[view.body_offset :] == b"Hello Jane,\r\n"
    assert header_block_end(b"\r\nbody") == 2
    assert header_block_end(b"A: b\r\n") == len(b"A: b\r\n")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "header section"),
        (b"\r\nbody only\r\n", "header section"),
        (b"this is not a header\r\nFrom: a@x.org\r\n\r\nbody\r\n", "header section"),
        (b"\x00\xff\xfe garbage\r\n\r\nbody\r\n", "header section"),
        (multipart(b"multipart/mixed", b"hi\r\n"), "without a boundary"),
        (multipart(b'multipart/mixed; boundary=""', b"hi\r\n"), "without a boundary"),
        (multipart(b"multipart/mixed; boundary=XYZ", b"hi\r\n"), "never appears"),
        (
            multipart(b"multipart/mixed; boundary=XYZ", b"--XYZ\r\n\r\nhi\r\n"),
            "not closed",
        ),
    ],
    ids=[
        "empty",
        "no-headers",
        "garbage-first-line",
        "binary-first-line",
        "no-boundary",
        "empty-boundary",
        "boundary-absent",
        "not-closed",
    ],
)
def test_problems(content: bytes, words: str) -> None:
    problem = MessageView.parse(content).problem
    assert problem is not None
    assert words in problem


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_parse_never_raises_on_bytes(content: bytes) -> None:
    view = MessageView.parse(content)
    assert view.size_bytes == len(content)
    assert 0 <= view.body_offset <= len(content)
    assert view.problem is None or isinstance(view.problem, str)


header_lines = st.lists(
    st.sampled_from(
        [
            b"From: a@x.org",
            b"Content-Type: multipart/mixed; boundary=",
            b'Content-Type: multipart/mixed; boundary="',
            b"Content-Type: text/plain; charset=\xff",
            b"Content-Type: ;;;",
            b"Subject: =?utf-8?b?AAA?=",
            b"Content-Type: multipart/mixed; boundary*0*=utf-8''%ff",
            b"Content-Type: multipart/x; boundary=\xc3\xa9",
            b" folded",
            b"X: \x00",
        ]
    ),
    max_size=6,
)


@settings(max_examples=200)
@given(header_lines, st.binary(max_size=80))
def test_parse_never_raises_on_header_like_bytes(
    lines: list[bytes], body: bytes
) -> None:
    content = b"\r\n".join(lines) + b"\r\n\r\n" + body
    view = MessageView.parse(content)
    assert view.size_bytes == len(content)
