"""header_sanity: malformed, duplicated or hostile headers are refused."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email import policy
from email.headerregistry import BaseHeader, DateHeader
from email.message import EmailMessage
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import _headers
from policies.base import (
    MessageKind,
    MessageLike,
    Outcome,
    Policy,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
)
from policies.header_sanity import HeaderSanity, from_table
from policies.registry import PolicyFactory
from relay.message import MessageView
from tests.support.policies import NOW, FrozenClock, counting_registry

T = TypeVar("T")

ENV = PolicyEnv(accounts={}, clock=FrozenClock())

CLEAN = {
    "From": "Acme News <news@acme.example>",
    "To": "Jane <jane@example.org>",
    "Subject": "Hello",
    "Date": "Mon, 23 Nov 2026 09:58:00 +0000",
    "Message-ID": "<20261123.1@acme.example>",
}


def build(**table: Any) -> HeaderSanity:
    return from_table(table, ENV)


def check_raw(content: bytes, policy: HeaderSanity | None = None) -> Verdict:
    ctx = PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="news@acme.example",
        received_at=NOW,
        message=MessageView(content),
        kind=MessageKind.MARKETING,
    )
    return asyncio.run((policy or build()).check(ctx))


def check(
    *extra: str | bytes,
    drop: tuple[str, ...] = (),
    policy: HeaderSanity | None = None,
    headers: Mapping[str, str] | None = None,
    **replace: str,
) -> Verdict:
    """The clean message, with ``headers`` or ``replace`` values (``Message_ID``
    for Message-ID) set, ``drop`` headers dropped and ``extra`` lines added."""
    fields = dict(CLEAN)
    for key, value in {**(headers or {}), **replace}.items():
        fields[key.replace("_", "-")] = value
    lines = [f"{k}: {v}".encode() for k, v in fields.items() if k not in drop]
    lines += [x if isinstance(x, bytes) else x.encode() for x in extra]
    return check_raw(b"".join(line + b"\r\n" for line in lines) + b"\r\nHi\r\n", policy)


def reason(*extra: str | bytes, **kwargs: Any) -> str:
    verdict = check(*extra, **kwargs)
    assert (verdict.outcome is Outcome.PASS) == (verdict.reason == "")
    return verdict.reason


def test_a_clean_message_passes() -> None:
    assert check().outcome is Outcome.PASS


def test_folded_and_utf8_headers_pass() -> None:
    assert reason(
        "Cc: a@example.org,\r\n b@example.org",
        Subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?=\tand more\r\n folded",
        From="Bücher <news@bücher.example>",
    ) == ("")


@pytest.mark.parametrize(
    "name",
    [
        "From",
        "Sender",
        "Reply-To",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
    ],
)
def test_a_duplicated_singleton_header_is_refused(name: str) -> None:
    values = {
        "Date": "Mon, 23 Nov 2026 09:59:00 +0000",
        "Message-ID": "<2@acme.example>",
        "In-Reply-To": "<0@example.org>",
        "References": "<0@example.org>",
        "Subject": "Again",
    }
    value = values.get(name, "other@acme.example")
    extra = [f"{name.upper()}: {value}"]
    if name not in CLEAN:
        extra.append(f"{name}: {value}")
    verdict = check(*extra)
    assert verdict.reason == "duplicate_header"
    assert verdict.detail.startswith(f"{name} header appears 2 times")


def test_repeatable_headers_may_repeat() -> None:
    assert (
        reason("Received: from a", "Received: from b", "Comments: x", "Comments: y")
        == ""
    )


@pytest.mark.parametrize("name", ["Date", "Message-ID"])
def test_a_missing_required_header_is_refused(name: str) -> None:
    verdict = check(drop=(name,))
    assert verdict.reason == "missing_header"
    assert name in verdict.detail


def test_date_and_message_id_can_be_made_optional() -> None:
    policy = build(require_date=False, require_message_id=False)
    assert reason(drop=("Date", "Message-ID"), policy=policy) == ""


@pytest.mark.parametrize(
    "date", ["yesterday", "", "Mon, 32 Nov 2026 10:00:00 +0000", "2026-11-23T10:00:00Z"]
)
def test_an_unparsable_date_is_refused(date: str) -> None:
    assert reason(Date=date) == "invalid_date"


def test_a_date_without_a_zone_is_read_as_utc() -> None:
    assert reason(Date="Mon, 23 Nov 2026 10:00:00 -0000") == ""


@pytest.mark.parametrize(
    ("date", "direction"),
    [
        ("Wed, 02 Dec 2026 10:00:00 +0000", "9 days in the future"),
        ("Fri, 13 Nov 2026 10:00:00 +0000", "10 days in the past"),
    ],
)
def test_a_date_far_from_receipt_is_refused(date: str, direction: str) -> None:
    verdict = check(Date=date)
    assert verdict.reason == "date_out_of_range"
    assert direction in verdict.detail
    assert "7 days" in verdict.detail
    assert verdict.figures["max_skew_seconds"] == 7 * 86400


def test_the_date_skew_is_a_setting() -> None:
    policy = build(max_date_skew="30d")
    assert reason(Date="Fri, 13 Nov 2026 10:00:00 +0000", policy=policy) == ""


@pytest.mark.parametrize(
    "message_id",
    ["20261123.1@acme.example", "<20261123.1>", "<a@b> <c@d>", "<a b@c>", "<>", ""],
)
def test_a_malformed_message_id_is_refused(message_id: str) -> None:
    assert reason(Message_ID=message_id) == "invalid_message_id"


@pytest.mark.parametrize("message_id", ["<a.b@c.example>", " <x$y@[192.0.2.1]> "])
def test_well_formed_message_ids_pass(message_id: str) -> None:
    assert reason(Message_ID=message_id) == ""


def test_an_oversized_header_section_is_refused_with_its_size() -> None:
    verdict = check("X-Padding: " + "a" * 70_000)
    assert verdict.reason == "headers_too_large"
    assert "65536 bytes" in verdict.detail
    assert verdict.figures["max_bytes"] == 65536


def test_the_header_size_limit_is_a_setting() -> None:
    assert reason(
        "X-Padding: " + "a" * 2_000, policy=build(max_header_bytes="1KiB")
    ) == ("headers_too_large")
    assert (
        reason("X-Padding: " + "a" * 70_000, policy=build(max_header_bytes="1MiB"))
        == ""
    )


def test_raw_bytes_that_are_not_utf8_are_refused() -> None:
    verdict = check(b"X-Note: caf\xe9")
    assert verdict.reason == "invalid_header_encoding"
    assert "X-Note" in verdict.detail


def test_raw_utf8_is_accepted() -> None:
    assert reason("X-Note: café".encode()) == ""


@pytest.mark.parametrize(
    ("replace", "found"),
    [
        ({"Subject": "=?utf-8?q?hi=0D=0ABcc:_victim@example.org?="}, "U+000D"),
        ({"Subject": "=?utf-8?b?aGkKdGhlcmU=?="}, "U+000A"),
        ({"Subject": "=?utf-8?q?nul=00byte?="}, "U+0000"),
        ({"Subject": "=?iso-8859-1?q?bell=07?="}, "U+0007"),
        ({"Subject": "=?utf-8?q?invoice_=E2=80=AEfdp.exe?="}, "U+202E"),
        ({"Subject": "=?utf-8?q?=E2=81=A6isolate?="}, "U+2066"),
        ({"Subject": "raw \u202e override"}, "U+202E"),
        ({"From": "=?utf-8?q?Acme=0D=0A?= <news@acme.example>"}, "U+000D"),
        ({"From": "=?utf-8?q?Acme=E2=80=AA?= <news@acme.example>"}, "U+202A"),
        ({"To": '"=?utf-8?q?J=0Ane?=" <jane@example.org>'}, "U+000A"),
    ],
)
def test_encoded_words_hiding_control_or_bidi_characters_are_refused(
    replace: dict[str, str], found: str
) -> None:
    verdict = check(headers=replace)
    assert verdict.reason == "hostile_header"
    assert found in verdict.detail
    assert next(iter(replace)) in verdict.detail


def test_a_tab_in_an_encoded_word_is_harmless() -> None:
    assert reason(Subject="=?utf-8?q?a=09b?=") == ""


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("To", "jane@example.org <broken"),
        ("To", "jane@"),
        ("Cc", "a@example.org, not an address"),
        ("Cc", "x@["),
    ],
)
def test_a_malformed_recipient_header_is_refused(name: str, value: str) -> None:
    verdict = check(headers={name: value})
    assert verdict.reason == "invalid_address_header"
    assert verdict.detail.startswith(f"{name} header is malformed")


def test_obsolete_but_readable_recipient_syntax_passes() -> None:
    assert reason(To="J.R. Smith <jane@example.org>,, undisclosed:;") == ""


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"require_mesage_id": True}, "require_mesage_id"),
        ({"require_date": "no"}, "require_date"),
        ({"max_header_bytes": "lots"}, "max_header_bytes"),
        ({"max_header_bytes": 0}, "max_header_bytes"),
        ({"max_date_skew": "a week"}, "max_date_skew"),
    ],
)
def test_a_bad_or_unknown_setting_is_a_value_error_naming_the_key(
    table: Mapping[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{key}\b"):
        from_table(table, ENV)


def test_it_is_a_data_stage_policy_the_registry_can_build() -> None:
    """The annotations make mypy prove conformance to the protocols."""
    factory: PolicyFactory = from_table
    policy: Policy = factory({}, ENV)
    assert isinstance(policy, HeaderSanity)
    assert policy.stages == {Stage.DATA}


def test_defaults() -> None:
    settings_ = build().settings
    assert settings_.require_message_id is True
    assert settings_.require_date is True
    assert settings_.max_header_bytes == 64 * 1024
    assert settings_.max_date_skew_seconds == 7 * 86400


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(
        ["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID"]
    ),
    value=st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=80
    ),
)
def test_any_header_text_yields_a_verdict(name: str, value: str) -> None:
    verdict = check(headers={name: value})
    assert verdict.outcome in {Outcome.PASS, Outcome.REFUSE}


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_header_bytes_yield_a_verdict(raw: bytes) -> None:
    verdict = check_raw(b"Subject: " + raw + b"\r\nTo: " + raw + b"\r\n\r\nHi\r\n")
    assert verdict.outcome in {Outcome.PASS, Outcome.REFUSE}


# -- the cheap readings agree with the stdlib's ---------------------------------


class CountingView:
    """A MessageView that counts the full header-section parses it is asked for."""

    def __init__(self, content: bytes) -> None:
        self.view = MessageView(content)
        self.header_parses = 0
        self.content = self.view.content
        self.size_bytes = self.view.size_bytes

    def header(self, name: str) -> str | None:
        return self.view.header(name)

    @property
    def headers(self) -> EmailMessage:
        self.header_parses += 1
        return self.view.headers

    @property
    def parsed(self) -> EmailMessage:
        return self.view.parsed

    def memo(self, key: str, build: Callable[[], T]) -> T:
        return self.view.memo(key, build)


def check_view(view: MessageLike) -> Verdict:
    ctx = PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="news@acme.example",
        received_at=NOW,
        message=view,
        kind=MessageKind.MARKETING,
    )
    return asyncio.run(build().check(ctx))


def clean_message(**replace: str) -> bytes:
    fields = {**CLEAN, **replace}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\nHi\r\n"


def test_an_ordinary_message_needs_no_header_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plain values take the fast paths: no registry parse, no header-section
    parse (the raw header block is split instead)."""
    calls = counting_registry(monkeypatch)
    view = CountingView(
        clean_message(To="<jane@example.org>, Bob  Smith\t<bob@example.org>")
    )
    assert check_view(view).outcome is Outcome.PASS
    assert calls == []
    assert view.header_parses == 0


def test_an_encoded_word_is_parsed_once_for_every_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The To header is both scanned for hostile characters and checked as an
    address list: one registry parse serves both."""
    calls = counting_registry(monkeypatch)
    to = "=?utf-8?q?J=C3=A4ne?= <jane@example.org>"
    assert check_view(CountingView(clean_message(To=to))).outcome is Outcome.PASS
    assert calls == [("To", to)]


def test_a_header_block_the_split_cannot_read_plainly_is_parsed() -> None:
    """A bare LF ends a line for the email package: the stdlib reads it."""
    view = CountingView(clean_message(Subject="a\nb"))
    check_view(view)
    assert view.header_parses == 1


def reference_fields(content: bytes) -> list[tuple[str, str]]:
    """What the check read before: ``message.headers.raw_items()``, unfolded."""
    view = MessageView(content)
    return [
        (name, re.sub(r"\r?\n(?=[ \t])", "", str(value)))
        for name, value in view.headers.raw_items()
    ]


HEADER_LINE = st.one_of(
    st.sampled_from(
        [
            b"From: Acme <news@acme.example>",
            b"To: a@example.org,",
            b" b@example.org",
            b"\tfolded",
            b" ",
            b"Subject:",
            b"Subject:  \t spaced",
            b"X-Empty:",
            b"From nobody Mon Nov 23 10:00:00 2026",
            b"Subject : spaced name",
            b":no name",
            b"no colon",
            b"X-Bare: a\rb",
            b"X-Bare: a\nb",
            b"X-8bit: caf\xc3\xa9 \xe9",
            b"X-Odd-!#$%: value",
            b"X-Nul: a\x00b",
        ]
    ),
    st.binary(max_size=30).map(lambda raw: b"X-Raw: " + raw),
    st.binary(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(HEADER_LINE, max_size=8))
def test_splitting_the_header_block_reads_what_the_email_package_reads(
    lines: list[bytes],
) -> None:
    content = b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n"
    fast = _headers.split_header_block(content)
    expected = reference_fields(content)
    if fast is not None:
        assert list(fast) == expected
    assert list(_headers.read_fields(MessageView(content))) == expected


def test_ordinary_header_blocks_are_split_without_the_parser() -> None:
    content = (
        b"From: Acme <news@acme.example>\r\nCc:\r\n a@example.org,\r\n\tb@x.example"
        b"\r\nX-Note: caf\xc3\xa9\r\n\r\nbody"
    )
    fast = _headers.split_header_block(content)
    assert fast is not None
    assert list(fast) == reference_fields(content)
    assert fast[1] == ("Cc", " a@example.org,\tb@x.example")


def reference_date(raw: str) -> datetime | None:
    """How the check read a Date before: through the header registry."""
    try:
        header: object = policy.default.header_factory("Date", raw)
    except _headers.PARSE_FAULTS:
        return None
    if isinstance(header, BaseHeader) and header.defects:
        return None
    if not isinstance(header, DateHeader) or header.datetime is None:
        return None
    when = header.datetime
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


ZONES = st.sampled_from(
    [
        "+0000",
        "-0000",
        "+0130",
        "-2359",
        "+2400",
        "+9999",
        "GMT",
        "UT",
        "EST",
        "PDT",
        "Z",
        "",
        "+99999999999999999999",
        "-0",
        "+05",
        "a",
    ]
)
MONTHS = st.sampled_from(["Jan", "Feb", "Nov", "nov", "November", "Dec", "Foo"])
DATE_TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(  # mostly well formed
        "{}{} {} {} {:02d}:{:02d}:{:02d} {}".format,
        st.sampled_from(["", "Mon, ", "Tue,", "Xyz, "]),
        st.integers(1, 31),
        MONTHS,
        st.integers(1900, 2100) | st.integers(0, 99),
        st.integers(0, 23),
        st.integers(0, 59),
        st.integers(0, 60),
        ZONES,
    ),
    st.builds(  # loosely formed
        "{}{} {} {} {}:{}:{} {}".format,
        st.sampled_from(["", "Mon, ", "Tue,", "Xyz, ", "mon "]),
        st.integers(-1, 40).map(str) | st.sampled_from(["", "07", "x"]),
        MONTHS,
        st.integers(-10, 100_000).map(str) | st.sampled_from(["26", "99", "0"]),
        st.integers(0, 99).map(str),
        st.integers(0, 99).map(str),
        st.integers(0, 99).map(str) | st.just("00.5"),
        ZONES,
    ),
)


@settings(max_examples=500, deadline=None)
@given(raw=DATE_TEXT)
def test_the_date_is_read_as_the_header_registry_reads_it(raw: str) -> None:
    assert _headers.parse_date(raw) == reference_date(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "Mon, 23 Nov 2026 09:58:00 +0000",
        "23 Nov 2026 09:58 -0000",
        "Mon, 23 Nov 26 09:58:00 EST",
        "Mon, 23 Nov 2026 09:58:00 +2400",
        "Mon, 31 Feb 2026 09:58:00 +0000",
        "Mon, 23 Nov 2026 09:58:00 +99999999999999999999",
        "",
    ],
)
def test_these_dates_read_as_the_registry_reads_them(raw: str) -> None:
    assert _headers.parse_date(raw) == reference_date(raw)


def test_an_address_the_stdlib_parser_trips_over_is_malformed() -> None:
    """CPython 3.11 raises UnboundLocalError on "x@[ ": a fault of the input."""
    assert reason(To="jane@[ ") == "invalid_address_header"
    assert reason(From="news@[ ") == ""  # From is sender_domains' business
