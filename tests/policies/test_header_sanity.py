"""header_sanity: malformed, duplicated or hostile headers are refused."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import (
    MessageKind,
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

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


class FrozenClock:
    """A clock stopped at ``NOW``."""

    def now(self) -> datetime:
        return NOW

    def monotonic(self) -> float:
        return 0.0


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
