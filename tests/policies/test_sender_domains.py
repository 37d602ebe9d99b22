"""sender_domains: From, Sender, Reply-To and MAIL FROM name the account's domains."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import date
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import _headers, header_sanity
from policies.base import (
    AccountPolicy,
    MessageKind,
    Outcome,
    Policy,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
)
from policies.registry import PolicyFactory
from policies.sender_domains import SenderDomains, from_table, organisational_domain
from relay.message import MessageView
from tests.support.policies import NOW, FrozenClock, counting_registry

ACME = AccountPolicy(
    name="acme",
    domains={
        "acme.example": date(2024, 1, 1),
        "acme.co.uk": date(2024, 1, 1),
        "xn--bcher-kva.example": date(2024, 1, 1),  # bücher.example
        "fresh.example": date(2026, 11, 13),  # ten days before NOW
    },
    allowed_senders=frozenset({"help.example", "billing@partner.example"}),
)
BARE = AccountPolicy(name="bare")
ENV = PolicyEnv(accounts={"acme": ACME, "bare": BARE}, clock=FrozenClock())


def build(**table: Any) -> SenderDomains:
    return from_table(table, ENV)


def message(*headers: str | bytes) -> MessageView:
    """A message with these header lines (CRLF added) and a short body."""
    lines = [h if isinstance(h, bytes) else h.encode() for h in headers]
    return MessageView(b"".join(line + b"\r\n" for line in lines) + b"\r\nHi\r\n")


def check(
    *headers: str | bytes,
    policy: SenderDomains | None = None,
    account: str = "acme",
    mail_from: str = "news@acme.example",
    kind: MessageKind = MessageKind.MARKETING,
) -> Verdict:
    ctx = PolicyContext(
        stage=Stage.DATA,
        account=account,
        mail_from=mail_from,
        received_at=NOW,
        message=message(*headers),
        kind=kind,
    )
    return asyncio.run((policy or build()).check(ctx))


def reason(*headers: str | bytes, **kwargs: Any) -> str:
    verdict = check(*headers, **kwargs)
    assert (verdict.outcome is Outcome.PASS) == (verdict.reason == "")
    return verdict.reason


def test_the_accounts_own_address_is_accepted() -> None:
    verdict = check("From: Acme News <news@acme.example>", "Subject: Hi")
    assert verdict.outcome is Outcome.PASS


@pytest.mark.parametrize("kind", list(MessageKind))
def test_another_domain_in_from_is_refused_naming_it(kind: MessageKind) -> None:
    """Transactional and marketing mail are held to the same rule."""
    verdict = check("From: news@someone-else.example", kind=kind)
    assert verdict.outcome is Outcome.REFUSE
    assert verdict.reason == "from_domain_not_owned"
    assert verdict.detail == (
        "From domain someone-else.example is not a domain of account acme"
    )


def test_a_subdomain_aligns_when_relaxed_but_not_when_strict() -> None:
    header = "From: news@mail.acme.co.uk"
    assert reason(header) == ""
    assert reason(header, policy=build(alignment="relaxed")) == ""
    strict = check(header, policy=build(alignment="strict"))
    assert strict.reason == "from_domain_not_owned"
    assert "mail.acme.co.uk" in strict.detail
    assert "strict" in strict.detail


def test_a_sibling_under_a_public_suffix_does_not_align() -> None:
    """co.uk is a public suffix: other.co.uk is another organisation."""
    assert reason("From: news@other.co.uk") == "from_domain_not_owned"


@pytest.mark.parametrize(
    "address",
    ["NEWS@ACME.EXAMPLE", "News@Acme.Example", "news@aCmE.eXaMpLe"],
)
def test_upper_and_mixed_case_addresses_are_accepted(address: str) -> None:
    assert reason(f"From: {address}", mail_from="NEWS@Acme.Example") == ""


@pytest.mark.parametrize(
    "header",
    [
        "From: news@xn--bcher-kva.example",
        "From: news@XN--BCHER-KVA.EXAMPLE",
        "From: =?utf-8?q?B=C3=BCcher?= <news@bücher.example>",
        "From: news@BÜCHER.example",
    ],
)
def test_an_idn_matches_in_unicode_and_punycode(header: str) -> None:
    assert reason(header, mail_from="news@bücher.example") == ""


def test_a_young_domain_is_refused_with_its_age_and_the_minimum() -> None:
    verdict = check("From: news@fresh.example", mail_from="news@fresh.example")
    assert verdict.reason == "domain_too_young"
    assert "10 days old" in verdict.detail
    assert "30 days" in verdict.detail
    assert verdict.figures == {"age_days": 10, "min_age_days": 30}


def test_the_minimum_age_is_a_setting() -> None:
    policy = build(min_domain_age="7d")
    assert reason("From: news@fresh.example", policy=policy, mail_from="") == ""


def test_reply_to_at_a_free_mail_provider_is_refused_as_such() -> None:
    verdict = check("From: news@acme.example", "Reply-To: acme.support@gmail.com")
    assert verdict.reason == "reply_to_free_mail"
    assert "gmail.com" in verdict.detail


def test_the_free_mail_list_is_a_setting() -> None:
    policy = build(free_mail_domains=["mailbox.example"])
    headers = ("From: news@acme.example", "Reply-To: x@mailbox.example")
    assert reason(*headers, policy=policy) == "reply_to_free_mail"
    gmail = ("From: news@acme.example", "Reply-To: x@gmail.com")
    assert reason(*gmail, policy=policy) == "reply_to_domain_not_owned"


@pytest.mark.parametrize(
    "reply_to",
    [
        "Reply-To: Help <desk@help.example>",
        "Reply-To: desk@HELP.example",
        "Reply-To: billing@partner.example",
        "Reply-To: desk@acme.example, Help <desk@help.example>",
    ],
)
def test_reply_to_listed_in_allowed_senders_is_accepted(reply_to: str) -> None:
    assert reason("From: news@acme.example", reply_to) == ""


def test_only_the_listed_address_of_an_allowed_sender_domain_is_allowed() -> None:
    headers = ("From: news@acme.example", "Reply-To: sales@partner.example")
    assert reason(*headers) == "reply_to_domain_not_owned"


def test_every_reply_to_mailbox_must_be_owned_or_allowed() -> None:
    headers = ("From: news@acme.example", "Reply-To: a@acme.example, b@evil.example")
    verdict = check(*headers)
    assert verdict.reason == "reply_to_domain_not_owned"
    assert "evil.example" in verdict.detail


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("Sender: ops@acme.example", ""),
        ("Sender: ops@help.example", ""),
        ("Sender: ops@evil.example", "sender_domain_not_owned"),
        ("Sender: ops@yahoo.com", "sender_free_mail"),
        ("Sender: a@acme.example, b@acme.example", "sender_unparsable"),
        ("Sender: ops@", "sender_unparsable"),
    ],
)
def test_sender_aligns_like_from(sender: str, expected: str) -> None:
    assert reason("From: news@acme.example", sender) == expected


def test_an_unparsable_reply_to_is_refused() -> None:
    headers = ("From: news@acme.example", "Reply-To: <not an address")
    assert reason(*headers) == "reply_to_unparsable"


@pytest.mark.parametrize(
    "header",
    [
        'From: "support@paypal.com" <news@acme.example>',
        "From: PayPal.com Security <news@acme.example>",
        "From: =?utf-8?b?c3VwcG9ydEBwYXlwYWwuY29t?= <news@acme.example>",
        'From: "support\uff20paypal\uff0ecom" <news@acme.example>',
        "From: paypal\u3002com <news@acme.example>",
        "From: pay\u200bpal.com <news@acme.example>",
        "From: =?utf-8?q?p=D0=B0ypal=2Ecom?= <news@acme.example>",
        'From: "Alerts (security@someone-else.example)" <news@acme.example>',
    ],
)
def test_a_display_name_naming_another_domain_is_refused(header: str) -> None:
    verdict = check(header)
    assert verdict.reason == "display_name_spoofing", header
    assert "From display name" in verdict.detail


def test_the_fullwidth_at_sign_trick_names_the_normalised_domain() -> None:
    verdict = check("From: support\uff20paypal\uff0ecom <news@acme.example>")
    assert verdict.reason == "display_name_spoofing"
    assert "paypal.com" in verdict.detail


@pytest.mark.parametrize(
    "header",
    [
        "From: Acme News <news@acme.example>",
        "From: news@acme.example (Acme News)",
        'From: "news@acme.example" <news@acme.example>',
        "From: Acme.co.uk <news@acme.example>",
        "From: Shop at www.acme.co.uk <news@acme.example>",
        "From: Mr.Smith <news@acme.example>",
        "From: J. R. Smith of Acme Inc. <news@acme.example>",
        "From: Version 2.0 News <news@acme.example>",
    ],
)
def test_plain_and_own_display_names_are_accepted(header: str) -> None:
    assert reason(header) == ""


def test_a_display_name_may_name_an_own_subdomain_under_strict_alignment() -> None:
    header = "From: Shop at www.acme.example <news@acme.example>"
    assert reason(header, policy=build(alignment="strict")) == ""
    spoof = "From: Shop at paypal.com <news@acme.example>"
    assert reason(spoof, policy=build(alignment="strict")) == "display_name_spoofing"


def test_a_spoofing_display_name_in_reply_to_is_refused() -> None:
    headers = (
        "From: news@acme.example",
        'Reply-To: "security@bank.example.com" <desk@acme.example>',
    )
    assert reason(*headers) == "display_name_spoofing"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("From: a@acme.example, b@acme.example", "from_not_single_mailbox"),
        ("From: Team: a@acme.example;", "from_not_single_mailbox"),
        ("From: Team: a@acme.example, b@acme.example;", "from_not_single_mailbox"),
        ("From: undisclosed:;", "from_not_single_mailbox"),
        ("From:", "from_not_single_mailbox"),
        ("From: not an address", "from_unparsable"),
        ("From: news@", "from_unparsable"),
        ("From: <news@acme.example", "from_unparsable"),
        ("From: news@[192.0.2.1]", "from_unparsable"),
        ("From: news@acme", "from_unparsable"),
        ("From: support@paypal.com <news@acme.example>", "from_unparsable"),
    ],
)
def test_from_must_hold_exactly_one_readable_mailbox(
    header: str, expected: str
) -> None:
    assert reason(header) == expected


def test_a_missing_from_is_refused() -> None:
    assert reason("Subject: no sender") == "from_missing"


def test_several_from_fields_are_refused() -> None:
    headers = ("From: news@acme.example", "From: news@someone-else.example")
    verdict = check(*headers)
    assert verdict.reason == "from_duplicated"
    assert verdict.figures == {"count": 2}


def test_from_bytes_that_are_not_utf8_are_unparsable() -> None:
    assert reason(b"From: news@b\xfccher.example") == "from_unparsable"


def test_a_raw_utf8_from_is_read_as_text() -> None:
    """RFC 6532: an SMTPUTF8 message may carry UTF-8 in its headers."""
    assert reason("From: Bücher <news@bücher.example>".encode()) == ""


def test_a_misaligned_envelope_sender_is_refused() -> None:
    verdict = check("From: news@acme.example", mail_from="bounces@esp.example")
    assert verdict.reason == "envelope_domain_not_owned"
    assert "esp.example" in verdict.detail


def test_an_aligned_envelope_subdomain_is_accepted() -> None:
    headers = ("From: news@acme.example",)
    assert reason(*headers, mail_from="b-123@bounces.acme.example") == ""


def test_the_null_sender_is_exempt_from_envelope_alignment() -> None:
    assert reason("From: news@acme.example", mail_from="") == ""


def test_envelope_alignment_can_be_switched_off() -> None:
    policy = build(check_envelope=False)
    kwargs: dict[str, Any] = {"policy": policy, "mail_from": "x@esp.example"}
    assert reason("From: news@acme.example", **kwargs) == ""


def test_an_account_without_domains_is_refused_naming_the_setting() -> None:
    verdict = check("From: news@acme.example", account="bare")
    assert verdict.reason == "no_sender_domains"
    assert "[accounts.bare] domains is empty" in verdict.detail


def test_an_unknown_account_is_refused() -> None:
    assert reason("From: news@acme.example", account="ghost") == "unknown_account"


def test_it_is_a_data_stage_policy_the_registry_can_build() -> None:
    """The annotations make mypy prove conformance to the protocols."""
    factory: PolicyFactory = from_table
    policy: Policy = factory({}, ENV)
    assert isinstance(policy, SenderDomains)
    assert policy.stages == {Stage.DATA}


def test_defaults() -> None:
    settings_ = build().settings
    assert settings_.alignment == "relaxed"
    assert settings_.min_domain_age_seconds == 30 * 86400
    assert settings_.check_envelope is True
    assert {"gmail.com", "yahoo.com", "proton.me", "gmx.de"} <= (
        settings_.free_mail_domains
    )


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"alignmnet": "strict"}, "alignmnet"),
        ({"alignment": "loose"}, "alignment"),
        ({"min_domain_age": "soon"}, "min_domain_age"),
        ({"min_domain_age_seconds": 10}, "min_domain_age_seconds"),
        ({"check_envelope": "yes"}, "check_envelope"),
        ({"free_mail_domains": ["not a domain"]}, "free_mail_domains"),
    ],
)
def test_a_bad_or_unknown_setting_is_a_value_error_naming_the_key(
    table: Mapping[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{key}\b"):
        from_table(table, ENV)


HEADER_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=80
) | st.sampled_from(
    [
        "x@",
        "@",
        "<>",
        '"',
        "a@b@c",
        "=?utf-8?q?a=0Db?= <x@acme.example>",
        "=?utf-8?b?/w==?= <x@acme.example>",
        "g:;",
        "(comment",
        "\\",
        "x@[",
        "a@acme.example, ,, b@",
    ]
)


@settings(max_examples=300, deadline=None)
@given(from_=HEADER_TEXT, reply_to=HEADER_TEXT)
def test_any_from_or_reply_to_text_yields_a_verdict(from_: str, reply_to: str) -> None:
    verdict = check(f"From: {from_}", f"Reply-To: {reply_to}", f"Sender: {from_}")
    assert verdict.outcome in {Outcome.PASS, Outcome.REFUSE}


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=80).filter(lambda b: b"\r\n" not in b))
def test_any_from_bytes_yield_a_verdict(raw: bytes) -> None:
    verdict = check(b"From: " + raw, b"Reply-To: " + raw)
    assert verdict.outcome in {Outcome.PASS, Outcome.REFUSE}


# -- the fast address reading agrees with the header registry -------------------

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
ATOM = st.text(alphabet=ATEXT, min_size=1, max_size=6).filter(lambda a: "=?" not in a)
BLANKS = st.sampled_from(["", " ", "\t", "  ", " \t ", "\t\t"])
SOME_BLANKS = st.sampled_from([" ", "\t", "  ", " \t "])


def addr_specs(atom: st.SearchStrategy[str], label: str) -> st.SearchStrategy[str]:
    return st.builds(
        "{}@{}".format,
        st.lists(atom, min_size=1, max_size=3).map(".".join),
        st.lists(
            st.text(alphabet=label, min_size=1, max_size=5), min_size=1, max_size=3
        ).map(".".join),
    )


def mailboxes(
    addr_spec: st.SearchStrategy[str], word: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    name = st.lists(st.tuples(word, SOME_BLANKS), min_size=1, max_size=3).map(
        lambda parts: "".join(w + b for w, b in parts).rstrip(" \t")
    )
    return st.one_of(
        st.builds("{}{}{}".format, BLANKS, addr_spec, BLANKS),
        st.builds("{}<{}>{}".format, BLANKS, addr_spec, BLANKS),
        st.builds("{}{}{}<{}>{}".format, BLANKS, name, BLANKS, addr_spec, BLANKS),
    )


# Plain lists (the fast path) and lists with one odd piece (the registry).
PLAIN_MAILBOX = mailboxes(addr_specs(ATOM, "abZ09-"), ATOM)
ODD_MAILBOX = mailboxes(
    addr_specs(ATOM | st.sampled_from(["", '"q"', "a b", "\u00e9"]), "abZ09-_[]:"),
    ATOM | st.sampled_from(["J.", '"Q"', "(c)", "=?x?=", "a:b", "\u00e9", "<", "@"]),
)
ADDRESS_TEXT = st.one_of(
    st.lists(PLAIN_MAILBOX, min_size=1, max_size=3).map(",".join),
    st.lists(PLAIN_MAILBOX | ODD_MAILBOX, min_size=1, max_size=3).map(",".join),
    st.text(alphabet=' \t<>@.,"()\\:;[]=?aZ0-_!#\u00e9', max_size=30),
    st.text(max_size=30),
)


@settings(max_examples=600, deadline=None)
@given(
    name=st.sampled_from(["From", "Sender", "Reply-To", "To", "Cc", "Bcc"]),
    text=ADDRESS_TEXT,
)
def test_plain_address_lists_read_as_the_registry_reads_them(
    name: str, text: str
) -> None:
    fast = _headers.simple_mailboxes(text)
    if fast is not None:
        assert _headers.full_address_list(name, text) == _headers.AddressList(
            fast, grouped=False
        )
    # and whatever the path, the memoised reading is the registry's
    view = message(b"Subject: x")
    assert _headers.address_list(view, name, text) == _headers.full_address_list(
        name, text
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("news@acme.example", [("", "news@acme.example")]),
        ("<news@acme.example>", [("", "news@acme.example")]),
        ("Acme  News\t<news@acme.example>", [("Acme News", "news@acme.example")]),
        ("Acme<news@acme.example>", [("Acme", "news@acme.example")]),
        (
            "a@acme.example, Help <desk@help.example> ",
            [("", "a@acme.example"), ("Help", "desk@help.example")],
        ),
    ],
)
def test_plain_forms_take_the_fast_path(
    text: str, expected: list[tuple[str, str]]
) -> None:
    fast = _headers.simple_mailboxes(text)
    assert fast is not None
    assert [(m.display_name, m.addr_spec) for m in fast] == expected


@pytest.mark.parametrize(
    "text",
    [
        '"Acme" <news@acme.example>',
        "J. Smith <news@acme.example>",
        "news@acme.example (Acme)",
        "=?utf-8?q?Acme?= <news@acme.example>",
        "Team: a@acme.example;",
        "news@[192.0.2.1]",
        "a@acme.example,",
        "Bücher <news@bücher.example>",
        "a\\b@acme.example",
        "a..b@acme.example",
        "",
    ],
)
def test_anything_else_goes_to_the_registry(text: str) -> None:
    assert _headers.simple_mailboxes(text) is None


def run_both(view: MessageView) -> tuple[Verdict, Verdict]:
    ctx = PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="news@acme.example",
        received_at=NOW,
        message=view,
        kind=MessageKind.MARKETING,
    )
    sanity = header_sanity.from_table({}, ENV)
    return asyncio.run(sanity.check(ctx)), asyncio.run(build().check(ctx))


def headers_of(from_: str, reply_to: str) -> MessageView:
    return message(
        f"From: {from_}",
        "To: <jane@example.org>",
        f"Reply-To: {reply_to}",
        "Subject: Hello",
        "Date: Mon, 23 Nov 2026 09:58:00 +0000",
        "Message-ID: <1@acme.example>",
    )


def test_plain_sender_headers_need_no_registry_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = counting_registry(monkeypatch)
    view = headers_of("Acme News <news@acme.example>", "Help <desk@help.example>")
    verdicts = run_both(view)
    assert [v.outcome for v in verdicts] == [Outcome.PASS, Outcome.PASS]
    assert calls == []


def test_header_sanity_and_sender_domains_share_one_parse_per_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An encoded-word From is parsed once by the registry, for header_sanity's
    hostile-character scan and for sender_domains' mailbox."""
    calls = counting_registry(monkeypatch)
    from_ = "=?utf-8?q?B=C3=BCcher?= <news@acme.example>"
    reply_to = '"Acme Help" <desk@acme.example>'
    verdicts = run_both(headers_of(from_, reply_to))
    assert [v.outcome for v in verdicts] == [Outcome.PASS, Outcome.PASS]
    assert sorted(calls) == [("From", from_), ("Reply-To", reply_to)]


def test_a_spoofing_display_name_is_refused_on_the_fast_path_too() -> None:
    assert _headers.simple_mailboxes("PayPal.com <news@acme.example>") is None
    assert _headers.simple_mailboxes("paypal-com <news@acme.example>") is not None
    assert reason("From: Shop at paypal.com <news@acme.example>") == (
        "display_name_spoofing"
    )


def test_domain_lookups_are_remembered() -> None:
    organisational_domain.cache_clear()
    assert organisational_domain("mail.acme.co.uk") == "acme.co.uk"
    assert organisational_domain("mail.acme.co.uk") == "acme.co.uk"
    assert organisational_domain.cache_info().hits == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("From: news@[ ", "from_unparsable"),
        ("From: a@acme.example, b@[ ", "from_unparsable"),
        ("Reply-To: desk@[ ", "reply_to_unparsable"),
    ],
)
def test_an_address_the_stdlib_parser_trips_over_is_unparsable(
    header: str, expected: str
) -> None:
    """CPython 3.11 raises UnboundLocalError on "x@[ ": a fault of the input."""
    extra = () if header.startswith("From") else ("From: news@acme.example",)
    assert reason(*extra, header) == expected


def test_a_comment_naming_another_domain_is_spoofing() -> None:
    verdict = check("From: x@acme.example (support@paypal.com)")
    assert verdict.reason == "display_name_spoofing"
    assert "paypal.com" in verdict.detail
    assert reason("From: x@acme.example (Acme News)") == ""
