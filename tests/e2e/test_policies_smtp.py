"""Each DATA-stage check, accepting and refusing, through the running relay."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.list_unsubscribe import UNSUBSCRIBE
from relay.tokens import TokenSigner
from tests.conftest import ACCOUNT, StartRelay, client, message, strip_received
from tests.support.upstream import CaptureUpstream

OLD = date(2024, 1, 15)


def config(
    *order: str, domains: dict[str, date] | None = None, **extra: Any
) -> dict[str, Any]:
    """Overrides: these checks enforced, the account owning acme.example."""
    account: dict[str, Any] = {"domains": domains or {"acme.example": OLD}}
    account.update(extra.pop("account", {}))
    return {
        "policies": {"order": list(order), **extra},
        "accounts": {ACCOUNT: account},
    }


async def send(
    relay: Relay,
    content: bytes,
    *,
    sender: str = "news@acme.example",
    to: str = "jane@example.org",
) -> str:
    """Send ``content``; return the final reply text (raises on refusal)."""
    smtp = await client(relay)
    try:
        _, reply = await smtp.sendmail(sender, [to], content)
    finally:
        await smtp.quit()
    return reply


async def refused(relay: Relay, content: bytes, **kwargs: str) -> str:
    """Send ``content`` and return the 550 text it must get at DATA."""
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(relay, content, **kwargs)
    assert info.value.code == 550
    return info.value.message


async def test_honest_sender_is_accepted(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(config("header_sanity", "sender_domains"))
    reply = await send(
        relay,
        message(
            sender='"Acme News" <News@Mail.ACME.example>',
            extra_headers="Reply-To: help@acme.example\r\n",
        ),
    )
    assert reply.startswith("2.0.0 Ok: queued as")
    await upstream.wait_for(1)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            {"sender": "news@someone-else.example"},
            "5.7.1 Refused by policy sender_domains: From domain "
            "someone-else.example is not a domain of account acme",
        ),
        (
            {"sender": '"support@paypal.com" <news@acme.example>'},
            "5.7.1 Refused by policy sender_domains:",
        ),
        (
            {"sender": "a@acme.example, b@acme.example"},
            "5.7.1 Refused by policy sender_domains:",
        ),
        (
            {"extra_headers": "Reply-To: acme.support@gmail.com\r\n"},
            "5.7.1 Refused by policy sender_domains:",
        ),
    ],
)
async def test_dishonest_senders_are_refused_naming_the_rule(
    start_relay: StartRelay,
    upstream: CaptureUpstream,
    headers: dict[str, str],
    expected: str,
) -> None:
    relay = await start_relay(config("sender_domains"))
    text = await refused(relay, message(**headers))
    assert text.startswith(expected)
    assert upstream.messages == []


async def test_young_domain_is_refused_with_its_age(
    start_relay: StartRelay,
) -> None:
    young = datetime.now(UTC).date() - timedelta(days=10)
    relay = await start_relay(config("sender_domains", domains={"acme.example": young}))
    text = await refused(relay, message())
    assert "sender_domains" in text
    assert "10" in text and "30" in text


async def test_envelope_sender_must_align(start_relay: StartRelay) -> None:
    relay = await start_relay(config("sender_domains"))
    text = await refused(relay, message(), sender="bounce@elsewhere.example")
    assert "elsewhere.example" in text


async def test_header_sanity_refuses_a_duplicated_from(start_relay: StartRelay) -> None:
    relay = await start_relay(config("header_sanity"))
    text = await refused(relay, message(extra_headers="From: other@acme.example\r\n"))
    assert text.startswith("5.7.1 Refused by policy header_sanity:")


async def test_monitor_mode_delivers_what_it_would_refuse(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        config("sender_domains", sender_domains={"mode": "monitor"})
    )
    await send(relay, message(sender="news@someone-else.example"))
    await upstream.wait_for(1)
    verdicts = relay.metrics.registry.get_sample_value(
        "relay_policy_verdicts_total",
        {
            "policy": "sender_domains",
            "stage": "data",
            "outcome": "refuse",
            "mode": "monitor",
        },
    )
    assert verdicts == 1


SECRET = "a-feedback-secret-of-at-least-32-characters"
LINK_BODY = (
    "Our autumn collection is here.\r\n\r\n"
    "Unsubscribe: https://acme.example/unsubscribe?u=42\r\n"
)


def marketing(**extra: Any) -> dict[str, Any]:
    """Opt-out link enforced for a marketing account, List-Unsubscribe added."""
    overrides = config(
        "optout_link", account={"default_category": "marketing"}, **extra
    )
    overrides["feedback"] = {"secret": SECRET}
    overrides["http"] = {"public_url": "https://relay.example"}
    return overrides


async def test_marketing_without_an_optout_link_is_refused(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing())
    text = await refused(relay, message(body="Buy our autumn collection!\r\n"))
    assert text.startswith(
        "5.7.1 Refused by policy optout_link: marketing message has no visible "
        "opt-out link"
    )
    assert upstream.messages == []


async def test_transactional_mail_needs_no_optout_link(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing())
    await send(
        relay,
        message(
            body="Your password reset code is 123456.\r\n",
            extra_headers="X-Relay-Category: transactional\r\n",
        ),
    )
    (got,) = await upstream.wait_for(1)
    assert b"List-Unsubscribe" not in got.content


async def test_relay_adds_a_signed_list_unsubscribe_per_recipient(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing())
    smtp = await client(relay)
    _, reply = await smtp.sendmail(
        "news@acme.example",
        ["jane@example.org", "john@example.org"],
        message(body=LINK_BODY),
    )
    await smtp.quit()
    queue_id = reply.rsplit(" ", 1)[1]
    await upstream.wait_for(2)
    signer = TokenSigner(SECRET)
    for rcpt in ("jane@example.org", "john@example.org"):
        (got,) = upstream.to(rcpt)
        assert got.rcpt_tos == [rcpt]
        parsed = message_from_bytes(got.content, policy=policy.default)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = str(parsed["List-Unsubscribe"]).strip("<>")
        assert url.startswith("https://relay.example/unsubscribe/")
        token = url.rsplit("/", 1)[1]
        assert signer.verify(UNSUBSCRIBE, token) == (ACCOUNT, rcpt, queue_id)
        # Added above the mailer's headers, below the relay's Received.
        _, rest = strip_received(got.content)
        assert rest.startswith(b"List-Unsubscribe: <https://relay.example/")


async def test_a_mailers_own_list_unsubscribe_is_kept(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing())
    own = "List-Unsubscribe: <mailto:leave@acme.example>\r\n"
    await send(relay, message(body=LINK_BODY, extra_headers=own))
    (got,) = await upstream.wait_for(1)
    assert got.content.count(b"List-Unsubscribe:") == 1
    assert own.encode() in got.content


async def test_refuse_mode_requires_the_mailers_list_unsubscribe(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(marketing(optout_link={"list_unsubscribe": "refuse"}))
    text = await refused(relay, message(body=LINK_BODY))
    assert "List-Unsubscribe" in text


PAYDAY = (
    "Need money before payday? Get a payday loan today: no credit check, "
    "guaranteed approval, fast cash.\r\n"
)


async def test_prohibited_content_is_refused_naming_category_and_terms(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(config("content_categories"))
    text = await refused(relay, message(subject="Cash today", body=PAYDAY))
    assert text.startswith("5.7.1 Refused by policy content_categories:")
    assert "payday_loans" in text
    assert "payday loan" in text
    assert upstream.messages == []


async def test_an_account_allowed_the_category_may_send_it(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        config("content_categories", account={"allowed_content": ["payday_loans"]})
    )
    await send(relay, message(subject="Cash today", body=PAYDAY))
    await upstream.wait_for(1)


async def test_spam_subject_phrases_warn_without_refusing(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(config("content_categories"))
    await send(relay, message(subject="Act now: limited time offer"))
    await upstream.wait_for(1)
    warned = relay.metrics.registry.get_sample_value(
        "relay_spam_subject_warnings_total", {"account": ACCOUNT}
    )
    assert warned == 1


ALL = (
    "exclusion",
    "header_sanity",
    "sender_domains",
    "optout_link",
    "content_categories",
)
HEAD = (
    "To: jane@example.org\r\nSubject: News\r\n"
    "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@acme.example>\r\n"
    "X-Relay-Category: marketing\r\n"
)
UNSUB_HTML = '<p>News.</p><a href="https://acme.example/u?x=1">Se d&eacute;sabonner</a>'


def nested(depth: int) -> str:
    """A multipart nested ``depth`` levels deep around one HTML part."""
    if depth == 0:
        return f"Content-Type: text/html; charset=utf-8\r\n\r\n{UNSUB_HTML}\r\n"
    return (
        f'Content-Type: multipart/mixed; boundary="b{depth}"\r\n\r\n'
        f"--b{depth}\r\n{nested(depth - 1)}--b{depth}--\r\n"
    )


BAD_INPUT = {
    "unparsable From": (
        "From: <<<@@>\r\n" + HEAD + "\r\nhi\r\n",
        "sender_domains",
    ),
    "two From mailboxes": (
        "From: a@acme.example, b@acme.example\r\n" + HEAD + "\r\nhi\r\n",
        "sender_domains",
    ),
    "encoded-word display name hiding an address": (
        "From: =?utf-8?b?c3VwcG9ydEBwYXlwYWwuY29t?= <news@acme.example>\r\n"
        + HEAD
        + "\r\nhi\r\n",
        "sender_domains",
    ),
    "punycode From domain": (
        "From: news@xn--bcher-kva.example\r\n"
        + HEAD
        + f"Content-Type: text/html\r\n\r\n{UNSUB_HTML}\r\n",
        None,
    ),
    "upper-case From": (
        "From: NEWS@ACME.EXAMPLE\r\n"
        + HEAD
        + f"Content-Type: text/html\r\n\r\n{UNSUB_HTML}\r\n",
        None,
    ),
    "HTML without a text part and no link": (
        "From: news@acme.example\r\n"
        + HEAD
        + "Content-Type: text/html\r\n\r\n<p>Sale!</p>\r\n",
        "optout_link",
    ),
    "huge HTML": (
        "From: news@acme.example\r\n"
        + HEAD
        + "Content-Type: text/html\r\n\r\n"
        + "<div><p>Lorem ipsum dolor sit amet.</p></div>\r\n" * 60_000
        + f"{UNSUB_HTML}\r\n",
        None,
    ),
    "nested multiparts": (
        "From: news@acme.example\r\n" + HEAD + "MIME-Version: 1.0\r\n" + nested(12),
        None,
    ),
    "wrong charset": (
        "From: news@acme.example\r\n"
        + HEAD
        + "Content-Type: text/plain; charset=no-such-charset\r\n\r\n"
        + "Caf\xe9 news. Unsubscribe: https://acme.example/u\r\n",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_hostile_and_odd_messages_get_a_verdict_never_a_fault(
    start_relay: StartRelay, upstream: CaptureUpstream, case: str
) -> None:
    text, refused_by = BAD_INPUT[case]
    relay = await start_relay(
        {
            **config(
                *ALL,
                domains={"acme.example": OLD, "bücher.example": OLD},
            ),
            "server": {"max_message_size": "8MiB"},
            "feedback": {"secret": SECRET},
            "http": {"public_url": "https://relay.example"},
        }
    )
    content = text.encode("utf-8")
    if refused_by is None:
        reply = await send(relay, content, sender="news@acme.example")
        assert reply.startswith("2.0.0 Ok: queued as")
    else:
        assert (await refused(relay, content)).startswith(
            f"5.7.1 Refused by policy {refused_by}:"
        )
    sample = relay.metrics.registry.get_sample_value
    assert all(
        not sample("relay_policy_errors_total", {"policy": name}) for name in ALL
    )


async def test_per_recipient_copies_are_bounded(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing())  # 64 KiB limit: copies up to 256 KiB
    big = message(body=LINK_BODY + ("x" * 70 + "\r\n") * 800)  # ~57 KiB
    recipients = [f"r{n}@example.org" for n in range(5)]
    smtp = await client(relay)
    with pytest.raises(aiosmtplib.SMTPResponseException) as info:
        await smtp.sendmail("news@acme.example", recipients, big)
    assert info.value.code == 552
    assert info.value.message.startswith(
        "5.3.4 Message too large for 5 recipients: each gets its own copy"
    )
    # Four recipients fit, and each gets a copy of its own.
    _, reply = await smtp.sendmail("news@acme.example", recipients[:4], big)
    await smtp.quit()
    assert reply.startswith("2.0.0 Ok: queued as")
    await upstream.wait_for(4)
    assert all(len(got.rcpt_tos) == 1 for got in upstream.messages)
