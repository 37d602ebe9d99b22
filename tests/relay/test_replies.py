"""Tests for relay.replies: enhanced status codes on every reply, and rendering."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.replies import (
    AUTH_OK,
    RECIPIENT_OK,
    STORAGE_FULL,
    TOO_LARGE,
    SmtpReply,
    auth_locked_out,
    bad_address,
    queued,
    with_enhanced_code,
)

ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3}")
HAS_CODE = re.compile(r"^\d\d\d [245]\.\d{1,3}\.\d{1,3}(?: |$)")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("250 OK", "250 2.0.0 Ok"),
        ("500 Error: bad syntax", "500 5.5.2 Syntax error"),
        ("503 Error: need RCPT command", "503 5.5.1 Need RCPT command first"),
        ("503 Error: need MAIL command", "503 5.5.1 Need MAIL command first"),
        ("552 Error: Too much mail data", TOO_LARGE.render()),
        ("221 Bye", "221 2.0.0 Bye"),
        ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ],
)
def test_builtin_lines_rewritten(line: str, expected: str) -> None:
    assert with_enhanced_code(line) == expected


@pytest.mark.parametrize(
    ("line", "status"),
    [
        ("501 Syntax: MAIL FROM: <address>", "5.5.4"),
        ("599 whatever", "5.0.0"),
        ("451 local problem", "4.0.0"),
        ("251 forwarded", "2.0.0"),
    ],
)
def test_other_lines_get_a_default_code(line: str, status: str) -> None:
    out = with_enhanced_code(line)
    assert out == f"{line[:3]} {status} {line[4:]}"
    assert ENHANCED.match(out)


@pytest.mark.parametrize(
    "line",
    [
        "250 2.1.0 Sender ok",
        "553 5.1.3 Error: malformed address",
        "530 5.7.0 Authentication required",
        "504 5.5.4 Unrecognized authentication type",
        "450 4.2.0",
        "235 2.7.0 Authentication successful",
    ],
)
def test_lines_with_a_code_unchanged(line: str) -> None:
    assert with_enhanced_code(line) == line


@pytest.mark.parametrize(
    "line",
    [
        "354 End data with <CR><LF>.<CR><LF>",
        "334 VXNlcm5hbWU6",
        "334 ",
        "",
        "25",
        "abc def",
    ],
)
def test_non_final_and_non_reply_lines_unchanged(line: str) -> None:
    assert with_enhanced_code(line) == line


@pytest.mark.parametrize(
    "line",
    ["220 relay.test ESMTP compliance-relay", "220 mx.example.org Service ready"],
)
def test_greeting_unchanged(line: str) -> None:
    # RFC 5321 4.3.1: Greeting = "220 " Domain [SP textstring]; no status code
    # may come before the domain (and RFC 2034 codes need EHLO first).
    assert with_enhanced_code(line) == line


reply_codes = st.integers(min_value=200, max_value=599).filter(
    lambda c: c // 100 != 3 and c != 220
)
reply_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
)


@settings(max_examples=300)
@given(reply_codes, st.sampled_from([" ", ""]), reply_text)
def test_every_final_reply_gets_an_enhanced_code(
    code: int, sep: str, text: str
) -> None:
    line = f"{code}{sep}{text}"
    out = with_enhanced_code(line)
    assert ENHANCED.match(out), out
    if not HAS_CODE.match(line):
        # A code the relay adds is of the basic code's class.
        assert out[0] == out[4], out


@settings(max_examples=100)
@given(reply_codes, reply_text)
def test_with_enhanced_code_is_idempotent(code: int, text: str) -> None:
    once = with_enhanced_code(f"{code} {text}")
    assert with_enhanced_code(once) == once


def test_render_ref_only_on_failures() -> None:
    assert RECIPIENT_OK.render("ABC123") == "250 2.1.5 Recipient ok"
    assert AUTH_OK.render("ABC123") == "235 2.7.0 Authentication successful"
    assert STORAGE_FULL.render("ABC123") == (
        "452 4.3.1 Insufficient system storage, try again later [ref ABC123]"
    )
    assert bad_address("sender", "x").render("R1").endswith(" [ref R1]")
    assert SmtpReply(550, "5.7.1", "No").render() == "550 5.7.1 No"
    assert SmtpReply(550, "5.7.1", "No").render(None) == "550 5.7.1 No"
    assert SmtpReply(550, "5.7.1", "No").render("") == "550 5.7.1 No"


@settings(max_examples=100)
@given(
    st.integers(min_value=200, max_value=599),
    st.from_regex(r"\A[A-Za-z0-9]{1,12}\Z"),
)
def test_render_ref_property(code: int, ref: str) -> None:
    reply = SmtpReply(code, f"{code // 100}.0.0", "text")
    rendered = reply.render(ref)
    assert rendered.startswith(f"{code} {code // 100}.0.0 text")
    assert rendered.endswith(f" [ref {ref}]") == (code >= 400)
    assert reply.permanent == (code >= 500)


def test_catalogue_helpers() -> None:
    assert queued("Q1").render() == "250 2.0.0 Ok: queued as Q1"
    assert bad_address("sender", "bad").status == "5.1.7"
    assert bad_address("recipient", "bad").status == "5.1.3"
    assert auth_locked_out(0.2).render().startswith("454 4.7.0 ")
    assert "try again in 1s" in auth_locked_out(0.2).text
    assert "try again in 90s" in auth_locked_out(90.4).text
