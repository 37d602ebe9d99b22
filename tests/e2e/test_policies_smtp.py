"""Each DATA-stage check, accepting and refusing, through the running relay."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import ACCOUNT, StartRelay, client, message
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
