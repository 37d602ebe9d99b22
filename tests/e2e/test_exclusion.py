"""The exclusion list and the consent ledger, enforced through real SMTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from storage.base import (
    ConsentRecord,
    ConsentSource,
    EventKind,
    OptInType,
    Suppression,
    SuppressionReason,
)
from tests.conftest import ACCOUNT, PASSWORD_HASH, StartRelay, client, message
from tests.support.upstream import CaptureUpstream

MARKETING = "X-Relay-Category: marketing\r\n"
NOW = datetime.now(UTC)


def policies(*order: str, **tables: Any) -> dict[str, Any]:
    """Overrides for the relay's ``[policies]``."""
    return {"policies": {"order": list(order), **tables}}


def default_category(kind: str) -> dict[str, Any]:
    return {"accounts": {ACCOUNT: {"default_category": kind}}}


async def suppress(
    relay: Relay,
    address: str,
    reason: SuppressionReason,
    *,
    account: str | None = None,
    expires_at: datetime | None = None,
) -> None:
    await relay.store.add_suppressions(
        [
            Suppression(
                address=address,
                account=account,
                reason=reason,
                source="test",
                created_at=NOW - timedelta(days=1),
                expires_at=expires_at,
            )
        ]
    )


def refused(relay: Relay, reason: str, policy: str = "exclusion") -> float:
    value = relay.metrics.registry.get_sample_value(
        "relay_recipients_refused_total",
        {"account": ACCOUNT, "policy": policy, "reason": reason},
    )
    return value or 0.0


async def send(
    relay: Relay, recipients: list[str], extra_headers: str = ""
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    smtp = await client(relay)
    try:
        return await smtp.sendmail(
            "news@acme.example", recipients, message(extra_headers=extra_headers)
        )
    finally:
        await smtp.quit()


async def test_suppressed_recipient_refused_at_rcpt_while_others_are_delivered(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        {**policies("exclusion"), **default_category("marketing")}
    )
    await suppress(relay, "Gone@Example.ORG", SuppressionReason.UNSUBSCRIBE)
    errors, _ = await send(relay, ["stay@example.org", "gone@EXAMPLE.org"])
    refusal = errors["gone@EXAMPLE.org"]
    assert refusal.code == 550
    assert refusal.message.startswith(
        "5.7.1 Refused by policy exclusion: recipient is on the exclusion list "
        "(unsubscribe, for every account, since"
    )
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["stay@example.org"]
    assert refused(relay, "excluded_unsubscribe") == 1
    (block,) = await relay.store.events(EventKind.BLOCK)
    assert (block.account, block.recipient, block.detail) == (
        ACCOUNT,
        "gone@example.org",
        "excluded_unsubscribe",
    )


async def test_unsubscribed_person_still_gets_transactional_mail(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(policies("exclusion"))
    await suppress(relay, "jane@example.org", SuppressionReason.UNSUBSCRIBE)
    errors, reply = await send(relay, ["jane@example.org"])
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as")
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["jane@example.org"]


@pytest.mark.parametrize(
    "reason",
    [
        SuppressionReason.HARD_BOUNCE,
        SuppressionReason.COMPLAINT,
        SuppressionReason.SPAMTRAP,
    ],
)
async def test_bounces_complaints_and_traps_refuse_every_kind(
    start_relay: StartRelay, reason: SuppressionReason
) -> None:
    relay = await start_relay(policies("exclusion"))
    await suppress(relay, "jane@example.org", reason)
    smtp = await client(relay)
    await smtp.mail("news@acme.example")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
        await smtp.rcpt("jane@example.org")
    await smtp.quit()
    assert info.value.code == 550
    assert f"({reason.value}, for every account" in info.value.message


async def test_marketing_found_at_data_drops_the_excluded_recipient_with_a_dsn(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(policies("exclusion"))
    await suppress(relay, "gone@example.org", SuppressionReason.UNSUBSCRIBE)
    errors, reply = await send(
        relay, ["stay@example.org", "gone@example.org"], MARKETING
    )
    assert errors == {}  # both passed RCPT: the kind was not known yet
    assert "1 recipient(s) refused by policy, reported in a DSN" in reply
    await upstream.wait_for(2)
    (delivered,) = upstream.to("stay@example.org")
    assert b"X-Relay-Category" not in delivered.content
    (dsn,) = upstream.to("news@acme.example")
    assert dsn.mail_from == ""
    report = message_from_bytes(dsn.content).as_string()
    assert "Final-Recipient: rfc822; gone@example.org" in report
    assert "Status: 5.7.1" in report
    assert "exclusion list" in report
    assert not upstream.to("gone@example.org")
    assert refused(relay, "excluded_unsubscribe") == 1
    (block,) = await relay.store.events(EventKind.BLOCK)
    assert block.recipient == "gone@example.org"


async def test_marketing_to_excluded_recipients_only_is_refused_at_data(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(policies("exclusion"))
    await suppress(relay, "gone@example.org", SuppressionReason.MANUAL)
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(relay, ["gone@example.org"], MARKETING)
    assert info.value.code == 550
    assert "exclusion list (manual" in info.value.message
    assert upstream.messages == []
    (block,) = await relay.store.events(EventKind.BLOCK)
    assert (block.recipient, block.detail) == ("gone@example.org", "excluded_manual")


async def test_an_account_entry_binds_that_account_only(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        {
            **policies("exclusion"),
            "accounts": {
                ACCOUNT: {"default_category": "marketing"},
                "other": {"password_hash": PASSWORD_HASH},
            },
        }
    )
    await suppress(
        relay, "jane@example.org", SuppressionReason.UNSUBSCRIBE, account="other"
    )
    errors, _ = await send(relay, ["jane@example.org"])
    assert errors == {}
    await upstream.wait_for(1)


async def test_an_expired_entry_no_longer_refuses(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        {**policies("exclusion"), **default_category("marketing")}
    )
    await suppress(
        relay,
        "jane@example.org",
        SuppressionReason.SOFT_BOUNCE,
        expires_at=NOW - timedelta(minutes=1),
    )
    errors, _ = await send(relay, ["jane@example.org"])
    assert errors == {}
    await upstream.wait_for(1)


async def test_monitor_mode_counts_but_delivers(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        {
            **policies("exclusion", exclusion={"mode": "monitor"}),
            **default_category("marketing"),
        }
    )
    await suppress(relay, "jane@example.org", SuppressionReason.UNSUBSCRIBE)
    errors, _ = await send(relay, ["jane@example.org"])
    assert errors == {}
    await upstream.wait_for(1)
    verdicts = relay.metrics.registry.get_sample_value(
        "relay_policy_verdicts_total",
        {
            "policy": "exclusion",
            "stage": "rcpt",
            "outcome": "refuse",
            "mode": "monitor",
        },
    )
    assert verdicts == 1
    assert await relay.store.events(EventKind.BLOCK) == []


def consent(address: str, opt_in: OptInType, relationship: str = "") -> ConsentRecord:
    return ConsentRecord(
        account=ACCOUNT,
        address=address,
        collected_at=NOW - timedelta(days=30),
        source=ConsentSource.NEWSLETTER,
        opt_in=opt_in,
        collection_url="https://acme.example/signup",
        ip="192.0.2.7",
        confirmed_at=NOW - timedelta(days=29) if opt_in != OptInType.SINGLE else None,
        statement="Yes, send me the Acme newsletter",
        relationship=relationship,
    )


async def test_consent_required_for_marketing_recipients(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        {
            **policies("consent", consent={"require": "confirmed"}),
            **default_category("marketing"),
        }
    )
    await relay.store.add_consents(
        [
            consent("double@example.org", OptInType.DOUBLE),
            consent("single@example.org", OptInType.SINGLE),
            consent("customer@example.org", OptInType.SINGLE, "customer since 2021"),
        ]
    )
    errors, _ = await send(
        relay,
        [
            "double@example.org",
            "single@example.org",
            "customer@example.org",
            "stranger@example.org",
        ],
    )
    assert set(errors) == {"single@example.org", "stranger@example.org"}
    assert errors["single@example.org"].message.startswith(
        "5.7.1 Refused by policy consent: consent is single opt-in; "
        "marketing needs confirmed"
    )
    assert errors["stranger@example.org"].message.startswith(
        "5.7.1 Refused by policy consent: no consent record"
    )
    (got,) = await upstream.wait_for(1)
    assert sorted(got.rcpt_tos) == ["customer@example.org", "double@example.org"]
    assert refused(relay, "no_consent", "consent") == 1
    assert refused(relay, "consent_too_weak", "consent") == 1


async def test_consent_is_not_asked_of_transactional_mail(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(policies("consent"))
    errors, _ = await send(relay, ["stranger@example.org"])
    assert errors == {}
    await upstream.wait_for(1)
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await send(relay, ["stranger@example.org"], MARKETING)
    assert info.value.code == 550
    assert "no consent record" in info.value.message
