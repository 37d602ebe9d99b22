"""Tests for relay.feedback_reports: bounces and complaints as providers send them.

The samples in ``fixtures/reports`` follow what Postfix, Google, Microsoft,
Exim, qmail, sendmail, Yahoo and Microsoft's JMRP actually send (addresses and
hosts replaced by documentation names); the ARF samples are RFC 5965 Appendix
B.1 and B.2 as published.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.dsn import FailedRecipient, build_dsn
from relay.feedback_reports import (
    MAX_DIAGNOSTIC_CHARS,
    MAX_REPORT_BYTES,
    Action,
    BounceFormat,
    BounceRecipient,
    BounceReport,
    ComplaintReport,
    OriginalHeaders,
    ReportError,
    ReportErrorReason,
    SkippedAddress,
    is_recipient_hard_bounce,
    parse_bounce,
    parse_complaint,
)
from storage.addresses import canonical_address

FIXTURES = Path(__file__).parent / "fixtures" / "reports"
BOUNCE_FIXTURES = sorted(
    p.name for p in FIXTURES.glob("*.eml") if not p.name.startswith("arf_")
)
COMPLAINT_FIXTURES = sorted(p.name for p in FIXTURES.glob("arf_*.eml"))


def load(name: str) -> bytes:
    """The fixture ``name`` as bytes, with its LF line endings."""
    return (FIXTURES / name).read_bytes()


def crlf(data: bytes) -> bytes:
    """``data`` with CRLF line endings, as it arrives over SMTP."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- RFC 3464 DSNs -----------------------------------------------------------


def test_postfix_dsn_with_rfc822_headers() -> None:
    assert parse_bounce(load("postfix_dsn.eml")) == BounceReport(
        format=BounceFormat.RFC3464,
        recipients=(
            BounceRecipient(
                recipient="bob@example.net",
                action=Action.FAILED,
                status="5.1.1",
                smtp_code=550,
                diagnostic="550 5.1.1 <bob@example.net>: Recipient address rejected:"
                " User unknown in virtual mailbox table",
                remote_mta="mx.example.net",
                original_recipient="bob@example.net",
            ),
        ),
        message_id="<20240305143005.4ABC123456@mail.example.org>",
        reporting_mta="mail.example.org",
        arrival_date=utc(2024, 3, 5, 14, 30, 1),
        original=OriginalHeaders(
            message_id="<spring-sale-1@shop.example.com>",
            return_path="<bounce+a1b2c3@bounces.relay.example.com>",
            from_="Example Shop <news@shop.example.com>",
            to="bob@example.net",
            subject="Spring sale",
            relay_id="q-7f3a2c9e",
        ),
    )


def test_gmail_dsn_with_returned_message() -> None:
    report = parse_bounce(load("gmail_dsn.eml"))
    assert report == BounceReport(
        format=BounceFormat.RFC3464,
        recipients=(
            BounceRecipient(
                recipient="no.such.person@gmail.com",
                action=Action.FAILED,
                status="5.1.1",
                smtp_code=550,
                diagnostic=(
                    "550-5.1.1 The email account that you tried to reach does not"
                    " exist. Please try 550-5.1.1 double-checking the recipient's"
                    " email address for typos or 550-5.1.1 unnecessary spaces."
                    " Learn more at 550 5.1.1"
                    " https://support.google.com/mail/?p=NoSuchUser"
                    " d9-20020a05600c3ac900b0041234567si1234567wmb.123 - gsmtp"
                ),
                # The comment after the host name and its final dot are dropped.
                remote_mta="gmail-smtp-in.l.google.com",
                last_attempt_date=utc(2024, 3, 5, 23, 2, 10),
            ),
        ),
        message_id="<65e7a9f2.050a0220.3c2b1.8d4fSMTPIN_ADDED_MISSING@mx.google.com>",
        reporting_mta="googlemail.com",
        arrival_date=utc(2024, 3, 5, 23, 2, 9),
        original=OriginalHeaders(
            message_id="<promo-77@shop.example.com>",
            return_path="<bounce+d4e5f6@bounces.relay.example.com>",
            from_="Example Shop <promo@shop.example.com>",
            to="no.such.person@gmail.com",
            subject="Café week \u2013 20% off",  # RFC 2047 decoded
            relay_id="q-0b1c2d3e",
        ),
    )
    assert report.recipients[0].is_recipient_hard_bounce


def test_outlook_dsn_recipient_not_found() -> None:
    report = parse_bounce(crlf(load("outlook_dsn.eml")))
    assert report == BounceReport(
        format=BounceFormat.RFC3464,
        recipients=(
            BounceRecipient(
                recipient="jane.doe@contoso.example",
                action=Action.FAILED,
                status="5.1.10",
                smtp_code=550,
                diagnostic="550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not"
                " found by SMTP address lookup",
            ),
        ),
        message_id=(
            "<4e1c2b3a-5d6e-4f70-8a9b-0c1d2e3f4a5b"
            "@DM6PR11MB1234.namprd11.prod.outlook.com>"
        ),
        reporting_mta="DM6PR11MB1234.namprd11.prod.outlook.com",
        arrival_date=utc(2024, 3, 6, 9, 15, 20),
        original=OriginalHeaders(
            message_id="<invoice-2024-03@shop.example.com>",
            return_path="bounce+0a0b0c@bounces.relay.example.com",
            from_='"Example Shop Billing" <billing@shop.example.com>',
            to="Jane Doe <jane.doe@contoso.example>",
            subject="Your March invoice",
            relay_id="q-0a0b0c0d",
        ),
    )
    assert report.recipients[0].is_recipient_hard_bounce


def test_multi_recipient_dsn_failed_delayed_and_skipped() -> None:
    report = parse_bounce(load("multi_recipient_dsn.eml"))
    last_attempt = utc(2024, 3, 7, 5, 1, 12)
    assert report == BounceReport(
        format=BounceFormat.RFC3464,
        recipients=(
            BounceRecipient(
                # The type is case-insensitive; the domain is lower-cased, the
                # local part kept (RFC 5321 §2.4).
                recipient="Kim@example.com",
                action=Action.FAILED,
                status="5.2.2",
                smtp_code=552,
                diagnostic="552 5.2.2 <kim@example.com>... Mailbox full",
                remote_mta="mx.example.com",
                last_attempt_date=last_attempt,
            ),
            BounceRecipient(
                recipient="leo@example.net",
                action=Action.DELAYED,
                status="4.4.1",
                last_attempt_date=last_attempt,
            ),
        ),
        message_id="<202403070501.4275pCbq012345@mx2.example.org>",
        reporting_mta="mx2.example.org",
        original_envelope_id="QQ314159",
        arrival_date=utc(2024, 3, 7, 1, 0, 1),
        original=OriginalHeaders(
            message_id="<night-owls@shop.example.com>",
            return_path="<bounce+c3c3c3@bounces.relay.example.com>",
            from_="Example Shop <news@shop.example.com>",
            to="Kim <kim@example.com>, leo@example.net",
            subject="Night owls",
            relay_id="q-c3c3c3c3",
        ),
        skipped=(
            SkippedAddress(
                "Final-Recipient",
                "/G=Max/S=Mustermann/O=Example/C=DE/",
                "unsupported address type",
            ),
            SkippedAddress(
                "Final-Recipient",
                "not-an-address",
                "address needs a local part and a domain",
            ),
        ),
    )
    full, delayed = report.recipients
    assert (full.permanent, full.is_recipient_hard_bounce) == (True, False)
    assert (delayed.permanent, delayed.is_recipient_hard_bounce) == (False, False)


NOW = datetime(2024, 3, 5, 14, 30, 0, tzinfo=UTC)


def test_dsn_built_by_the_relay_parses_back() -> None:
    original = (
        b"Return-Path: <bounce+ff00ff@bounces.relay.example.com>\r\n"
        b"From: Alice <alice@example.org>\r\n"
        b"To: bob@example.net\r\n"
        b"Subject: Caf\xc3\xa9 news\r\n"  # raw UTF-8: the relay sends it as QP
        b"Message-ID: <newsletter-42@example.org>\r\n"
        b"X-Relay-Id: q-42424242\r\n"
        b"\r\nbody\r\n"
    )
    dsn = build_dsn(
        reporting_mta="relay.example.com",
        dsn_from="MAILER-DAEMON@relay.example.com",
        original_mail_from="alice@example.org",
        original_message=original,
        queue_id="Q1A2B3",
        arrival=NOW - timedelta(days=5),
        failures=[
            FailedRecipient(
                address="bob@example.net",
                status="5.1.1",
                diagnostic="5.1.1 <bob@example.net>: Recipient address rejected:"
                " User unknown",
                smtp_code=550,
                remote_mta="mx.example.net",
            ),
            FailedRecipient(
                address="carol@example.net",
                status="4.4.7",
                diagnostic="delivery time expired after 5 days (connection timed out)",
            ),
            # RFC 6533 utf-8 address type, written with \x{..} escapes.
            FailedRecipient(
                address="josé@exämple.com",
                status="5.1.1",
                diagnostic="no such user",
                smtp_code=550,
            ),
        ],
        now=NOW,
    )
    report = parse_bounce(dsn)
    assert report.format is BounceFormat.RFC3464
    assert report.reporting_mta == "relay.example.com"
    assert report.arrival_date == NOW - timedelta(days=5)
    assert report.message_id is not None
    assert report.message_id.endswith("@relay.example.com>")
    assert report.recipients == (
        BounceRecipient(
            recipient="bob@example.net",
            action=Action.FAILED,
            status="5.1.1",
            smtp_code=550,
            diagnostic="550 5.1.1 <bob@example.net>: Recipient address rejected:"
            " User unknown",
            remote_mta="mx.example.net",
            last_attempt_date=NOW,
        ),
        BounceRecipient(
            recipient="carol@example.net",
            action=Action.FAILED,
            status="4.4.7",
            diagnostic="delivery time expired after 5 days (connection timed out)",
            last_attempt_date=NOW,
        ),
        BounceRecipient(
            recipient="josé@xn--exmple-cua.com",
            action=Action.FAILED,
            status="5.1.1",
            smtp_code=550,
            diagnostic="550 no such user",
            last_attempt_date=NOW,
        ),
    )
    assert [r.is_recipient_hard_bounce for r in report.recipients] == [
        True,
        False,
        True,
    ]
    assert report.original == OriginalHeaders(
        message_id="<newsletter-42@example.org>",
        return_path="<bounce+ff00ff@bounces.relay.example.com>",
        from_="Alice <alice@example.org>",
        to="bob@example.net",
        subject="Café news",
        relay_id="q-42424242",
    )


def report(status_part: str, *, status_type: str = "message/delivery-status") -> bytes:
    """A minimal multipart/report around ``status_part`` (CRLF line ends)."""
    text = (
        "From: MAILER-DAEMON@mx.example.org\n"
        "To: bounce+x@bounces.relay.example.com\n"
        "Message-ID: <dsn-1@mx.example.org>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=B\n"
        "\n"
        "--B\n"
        "Content-Type: text/plain\n"
        "\n"
        "Delivery failed.\n"
        "--B\n"
        f"Content-Type: {status_type}\n"
        f"{status_part}"
        "--B--\n"
    )
    return crlf(text.encode("utf-8"))


def test_global_delivery_status_with_raw_utf8_address() -> None:
    """RFC 6533: message/global-delivery-status carries UTF-8 as is."""
    content = report(
        "\n"
        "Reporting-MTA: dns; mx.example.org\n"
        "\n"
        "Final-Recipient: UTF-8;renée@exämple.com\n"
        "Action: FAILED\n"
        "Status: 5.2.1\n",
        status_type="message/global-delivery-status",
    )
    assert parse_bounce(content).recipients == (
        BounceRecipient(
            recipient="renée@xn--exmple-cua.com",
            action=Action.FAILED,
            status="5.2.1",
        ),
    )


def test_status_fields_run_together_and_action_missing() -> None:
    """No blank line after the per-message fields; Action derived from Status."""
    parsed = parse_bounce(
        report(
            "\n"
            "Reporting-MTA: dns; mx.example.org\n"
            "Final-Recipient: rfc822 ; <Nia@Example.org>\n"
            "Status: 5.1.1 (bad destination mailbox address)\n"
        )
    )
    assert parsed.reporting_mta == "mx.example.org"
    assert parsed.recipients == (
        BounceRecipient(
            recipient="Nia@example.org", action=Action.FAILED, status="5.1.1"
        ),
    )


def test_base64_encoded_status_part_is_decoded() -> None:
    """RFC 2046 §5.2 forbids it, some gateways do it anyway."""
    encoded = "UmVwb3J0aW5nLU1UQTogZG5zOyBteC5leGFtcGxlLm9yZwoKRmluYWwtUmVjaXBpZW50OiBy\nZmM4MjI7IG9tYXJAZXhhbXBsZS5vcmcKQWN0aW9uOiBmYWlsZWQKU3RhdHVzOiA1LjEuMQo=\n"
    parsed = parse_bounce(report(f"Content-Transfer-Encoding: base64\n\n{encoded}"))
    assert parsed.reporting_mta == "mx.example.org"
    assert parsed.recipients == (
        BounceRecipient(
            recipient="omar@example.org", action=Action.FAILED, status="5.1.1"
        ),
    )


def test_status_derived_from_reply_code_and_original_recipient_used() -> None:
    """Only "550" is known: the status is its class (RFC 3463 §3.1).  The
    Final-Recipient is unusable, so the Original-Recipient stands in."""
    parsed = parse_bounce(
        report(
            "\n"
            "Reporting-MTA: dns; mx.example.org\n"
            "\n"
            "Original-Recipient: rfc822;pat@example.org\n"
            "Final-Recipient: rfc822;pat\n"
            "Action: failed\n"
            "Status: unknown\n"
            "Diagnostic-Code: smtp; 550 Requested action not taken:\n"
            "  mailbox unavailable\x07\n"
        )
    )
    assert parsed.recipients == (
        BounceRecipient(
            recipient="pat@example.org",
            action=Action.FAILED,
            status="5.0.0",
            smtp_code=550,
            diagnostic="550 Requested action not taken: mailbox unavailable",
            original_recipient="pat@example.org",
        ),
    )
    assert parsed.recipients[0].is_recipient_hard_bounce


def test_untyped_diagnostic_keeps_its_reply_code() -> None:
    """No ``type;`` prefix: a ";" later in the text is no type separator."""
    parsed = parse_bounce(
        report(
            "\n"
            "Reporting-MTA: dns; mx.example.org\n"
            "\n"
            "Final-Recipient: <rosa@example.org>\n"
            "Action: failed\n"
            "Diagnostic-Code: 550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found\n"
        )
    )
    assert parsed.recipients == (
        BounceRecipient(
            recipient="rosa@example.org",
            action=Action.FAILED,
            status="5.1.10",
            smtp_code=550,
            diagnostic="550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found",
        ),
    )


def test_long_diagnostic_is_capped_and_cleaned() -> None:
    parsed = parse_bounce(
        report(
            "\n"
            "Reporting-MTA: dns; mx.example.org\n"
            "\n"
            "Final-Recipient: rfc822;quinn@example.org\n"
            "Action: failed\n"
            "Status: 5.7.1\n"
            "Diagnostic-Code: smtp; 554 5.7.1 " + "blocked\u202e " * 200 + "\n"
        )
    )
    (recipient,) = parsed.recipients
    assert recipient.diagnostic is not None
    assert len(recipient.diagnostic) == MAX_DIAGNOSTIC_CHARS
    assert recipient.diagnostic.startswith("554 5.7.1 blocked blocked ")
    assert recipient.diagnostic.endswith("...")
    assert "\u202e" not in recipient.diagnostic
    assert not recipient.is_recipient_hard_bounce


# --- plain-text bounces --------------------------------------------------------


def test_exim_bounce() -> None:
    assert parse_bounce(load("exim_plain.eml")) == BounceReport(
        format=BounceFormat.EXIM,
        recipients=(
            BounceRecipient(
                recipient="dave@example.net",
                action=Action.FAILED,
                status="5.1.1",
                smtp_code=550,
                diagnostic="host mx.example.net [192.0.2.25] SMTP error from remote"
                " mail server after RCPT TO:<dave@example.net>: 550 5.1.1"
                " <dave@example.net>: Recipient address rejected: User unknown",
                remote_mta="mx.example.net",
            ),
            BounceRecipient(
                recipient="erin@example.net",
                action=Action.FAILED,
                status="5.2.2",
                smtp_code=552,
                diagnostic="host mx.example.net [192.0.2.25] SMTP error from remote"
                " mail server after end of data: 552 5.2.2 Mailbox full",
                remote_mta="mx.example.net",
            ),
        ),
        message_id="<E1rhXYZ-0001ab-EF@mx1.example.org>",
        original=OriginalHeaders(
            message_id="<weekly-5@shop.example.com>",
            return_path="<bounce+5e5e5e@bounces.relay.example.com>",
            from_="Example Shop <news@shop.example.com>",
            to="dave@example.net, erin@example.net",
            subject="Weekly picks",
            relay_id="q-5e5e5e5e",
        ),
        skipped=(
            SkippedAddress(
                "exim",
                "|/usr/local/bin/autoreply",
                "address needs a local part and a domain",
            ),
        ),
    )


def test_exim_delay_warning_is_delayed() -> None:
    content = crlf(
        b"From: Mail Delivery System <Mailer-Daemon@mx1.example.org>\n"
        b"To: bounce+5e5e5e@bounces.relay.example.com\n"
        b"Subject: Warning: message 1rhXYZ-0001ab-CD delayed 24 hours\n"
        b"\n"
        b"This message was created automatically by mail delivery software.\n"
        b"A message that you sent has not yet been delivered to one or more of its\n"
        b"recipients after more than 24 hours on the queue on mx1.example.org.\n"
        b"\n"
        b"The address to which the message has not yet been delivered is:\n"
        b"\n"
        b"  olga@example.net\n"
        b"    host mx.example.net [192.0.2.25]\n"
        b"    Delay reason: SMTP error from remote mail server after RCPT TO:\n"
        b"    451 4.7.1 Greylisted, please try again later\n"
        b"\n"
        b"No action is required on your part.\n"
    )
    assert parse_bounce(content).recipients == (
        BounceRecipient(
            recipient="olga@example.net",
            action=Action.DELAYED,
            status="4.7.1",
            smtp_code=451,
            diagnostic="host mx.example.net [192.0.2.25] Delay reason: SMTP error"
            " from remote mail server after RCPT TO: 451 4.7.1 Greylisted, please"
            " try again later",
            remote_mta="mx.example.net",
        ),
    )


def test_qmail_bounce() -> None:
    parsed = parse_bounce(load("qmail_plain.eml"))
    assert parsed == BounceReport(
        format=BounceFormat.QMAIL,
        recipients=(
            BounceRecipient(
                recipient="frank@example.net",
                action=Action.FAILED,
                status="5.1.1",
                smtp_code=550,
                diagnostic="192.0.2.25 does not like recipient. Remote host said: 550"
                " 5.1.1 <frank@example.net>: Recipient address rejected: User"
                " unknown Giving up on 192.0.2.25.",
                remote_mta="192.0.2.25",
            ),
            BounceRecipient(
                recipient="grace@example.org",
                action=Action.FAILED,
                status="5.1.1",  # qmail's "(#5.1.1)"
                diagnostic="Sorry, no mailbox here by that name. (#5.1.1)",
            ),
        ),
        message_id="<20240305170003.12345.qmail@mail.example.org>",
        original=OriginalHeaders(
            message_id="<monthly-3@shop.example.com>",
            return_path="<bounce+6f6f6f@bounces.relay.example.com>",
            from_="Example Shop <news@shop.example.com>",
            to="frank@example.net, grace@example.org",
            subject="Monthly digest",
            relay_id="q-6f6f6f6f",
        ),
    )
    assert all(r.is_recipient_hard_bounce for r in parsed.recipients)


def test_qmail_local_failure_without_code_is_permanent() -> None:
    """qmail says "This is a permanent error" and gives no code: 5.0.0."""
    content = crlf(
        b"From: MAILER-DAEMON@mail.example.org\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at mail.example.org.\n"
        b"I'm afraid I wasn't able to deliver your message to the following"
        b" addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        b"\n"
        b"<paul@example.org>:\n"
        b"This message is looping: it already has my Delivered-To line.\n"
    )
    (recipient,) = parse_bounce(content).recipients
    assert (recipient.recipient, recipient.status, recipient.permanent) == (
        "paul@example.org",
        "5.0.0",
        True,
    )
    assert not recipient.is_recipient_hard_bounce


def test_postfix_plain_text_bounce() -> None:
    parsed = parse_bounce(load("postfix_plain.eml"))
    assert parsed == BounceReport(
        format=BounceFormat.POSTFIX,
        recipients=(
            BounceRecipient(
                recipient="heidi@example.net",
                action=Action.FAILED,
                status="5.1.1",
                smtp_code=550,
                diagnostic="host mx.example.net[192.0.2.25] said: 550 5.1.1"
                " <heidi@example.net>: Recipient address rejected: User unknown in"
                " virtual mailbox table (in reply to RCPT TO command)",
                remote_mta="mx.example.net",
            ),
            BounceRecipient(
                recipient="ivan@example.com",
                action=Action.FAILED,
                status="5.7.1",
                smtp_code=554,
                diagnostic="host mx.example.com[203.0.113.9] said: 554 5.7.1 Service"
                " unavailable; Client host [198.51.100.7] blocked using"
                " zen.spamhaus.org (in reply to RCPT TO command)",
                remote_mta="mx.example.com",
            ),
        ),
        message_id="<20240305180000.1A2B3C4D5E@mail.example.org>",
    )
    assert [r.is_recipient_hard_bounce for r in parsed.recipients] == [True, False]


def test_postfix_plain_delay_warning_is_delayed() -> None:
    content = crlf(
        b"From: MAILER-DAEMON@mail.example.org (Mail Delivery System)\n"
        b"Subject: Delayed Mail (still being retried)\n"
        b"\n"
        b"This is the mail system at host mail.example.org.\n"
        b"\n"
        b"####################################################################\n"
        b"# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\n"
        b"####################################################################\n"
        b"\n"
        b"<rita@example.net>: host mx.example.net[192.0.2.25] said: 452 4.2.2\n"
        b"    Mailbox full (in reply to RCPT TO command)\n"
    )
    parsed = parse_bounce(content)
    assert parsed.format is BounceFormat.POSTFIX
    assert parsed.recipients == (
        BounceRecipient(
            recipient="rita@example.net",
            action=Action.DELAYED,
            status="4.2.2",
            smtp_code=452,
            diagnostic="host mx.example.net[192.0.2.25] said: 452 4.2.2 Mailbox full"
            " (in reply to RCPT TO command)",
            remote_mta="mx.example.net",
        ),
    )


def test_sendmail_bounce_read_by_heuristic() -> None:
    assert parse_bounce(load("sendmail_plain.eml")) == BounceReport(
        format=BounceFormat.HEURISTIC,
        recipients=(
            BounceRecipient(
                recipient="judy@example.info",
                action=Action.FAILED,
                status="5.1.1",
                smtp_code=550,
                diagnostic="(reason: 550 5.1.1 <judy@example.info>... User unknown)",
            ),
        ),
        message_id="<202403051900.425J05ab001234@mail.example.info>",
    )


def test_heuristic_ignores_the_bounce_own_addresses() -> None:
    """The VERP address the bounce is sent to is never taken for a recipient."""
    content = crlf(
        b"From: postmaster@mail.example.info\n"
        b"To: bounce+8b8b8b@bounces.relay.example.com\n"
        b"Subject: Undeliverable\n"
        b"\n"
        b"Your message from <bounce+8b8b8b@bounces.relay.example.com> was refused:\n"
        b"sam@example.info: 550 5.7.1 message refused as spam\n"
    )
    parsed = parse_bounce(content)
    assert parsed.format is BounceFormat.HEURISTIC
    assert [(r.recipient, r.status, r.smtp_code) for r in parsed.recipients] == [
        ("sam@example.info", "5.7.1", 550)
    ]
    assert not parsed.recipients[0].is_recipient_hard_bounce


# --- complaints (ARF) --------------------------------------------------------------


def test_rfc5965_simple_example() -> None:
    complaint = parse_complaint(load("arf_rfc5965_b1.eml"))
    assert complaint == ComplaintReport(
        feedback_type="abuse",
        user_agent="SomeGenerator/1.0",
        version="1",
        original=OriginalHeaders(
            message_id="8787KJKJ3K4J3K4J3K4J3.mail@example.net",
            from_="<somespammer@example.net>",
            to="<Undisclosed Recipients>",
            subject="Earn money",
        ),
    )
    assert complaint.counts_as_complaint


def test_rfc5965_complete_example() -> None:
    """Appendix B.2 as published has a blank line after the returned message's
    Received field, which ends its header section: To, Subject and Message-ID
    are body text there, and must not be read as headers."""
    complaint = parse_complaint(crlf(load("arf_rfc5965_b2.eml")))
    assert complaint == ComplaintReport(
        feedback_type="abuse",
        user_agent="SomeGenerator/1.0",
        version="1",
        original_mail_from="somespammer@example.net",
        original_rcpt_to=("user@example.com",),
        arrival_date=utc(2005, 3, 8, 18, 0, 0),  # 14:00 EDT
        source_ip="192.0.2.1",
        reporting_mta="mail.example.com",
        reported_domains=("example.net",),
        reported_uris=(
            "http://example.net/earn_money.html",
            "mailto:user@example.com",
        ),
        authentication_results=(
            "mail.example.com; spf=fail smtp.mail=somespammer@example.com"
        ),
        original=OriginalHeaders(from_="<somespammer@example.net>"),
    )
    assert complaint.counts_as_complaint


def test_yahoo_report_with_redacted_recipient() -> None:
    complaint = parse_complaint(load("arf_yahoo.eml"))
    assert complaint == ComplaintReport(
        feedback_type="abuse",
        user_agent="Yahoo!-Mail-Feedback/2.0",
        version="1",
        original_mail_from="bounce+77aa88@bounces.relay.example.com",
        arrival_date=utc(2024, 3, 7, 11, 2, 10),
        source_ip="198.51.100.7",
        reported_domains=("shop.example.com",),
        authentication_results=(
            "mta1001.mail.bf1.yahoo.com; dkim=pass header.d=shop.example.com;"
            " spf=pass smtp.mailfrom=bounces.relay.example.com"
        ),
        original=OriginalHeaders(
            message_id="<spring-sale-9@shop.example.com>",
            return_path="<bounce+77aa88@bounces.relay.example.com>",
            from_="Example Shop <news@shop.example.com>",
            to="<xxxxxxxx>",
            subject="Spring sale",
            relay_id="q-11223344",
        ),
        message_id="<1709810431.4471.yahoo.arf@arf.mail.yahoo.com>",
    )
    assert complaint.original_rcpt_to == ()
    assert complaint.counts_as_complaint


def test_microsoft_jmrp_report() -> None:
    complaint = parse_complaint(load("arf_jmrp.eml"))
    assert complaint == ComplaintReport(
        feedback_type="abuse",
        user_agent="Hotmail FBL",
        version="0.1",
        original_mail_from="bounce+99cc00@bounces.relay.example.com",
        original_rcpt_to=("carol@hotmail.com",),
        arrival_date=utc(2024, 3, 8, 16, 1, 30),
        source_ip="198.51.100.7",
        incidents=1,
        original=OriginalHeaders(
            message_id="<last-chance-3@shop.example.com>",
            return_path="bounce+99cc00@bounces.relay.example.com",
            from_="Example Shop \u2013 News <news@shop.example.com>",
            to="redacted",
            subject="Last chance",
            relay_id="q-99cc0011",
        ),
        message_id=(
            "<b1c5f7e2-9a4d-4c3b-8e21-0f6a7d9c3e11"
            "@BL2FFO11FD012.protection.outlook.com>"
        ),
        skipped=(
            SkippedAddress(
                "Original-Rcpt-To",
                "redacted",
                "address needs a local part and a domain",
            ),
        ),
    )


def test_not_spam_report_is_no_complaint() -> None:
    complaint = parse_complaint(load("arf_not_spam.eml"))
    assert complaint == ComplaintReport(
        feedback_type="not-spam",
        user_agent="ExampleISP-FBL/3.1",
        version="1",
        original_rcpt_to=("Mallory@isp.example",),
        arrival_date=utc(2024, 3, 9, 9, 58, 0),
        source_ip="2001:db8::7",
        original=OriginalHeaders(
            message_id="<receipt-1@shop.example.com>",
            return_path="<bounce+ab12cd@bounces.relay.example.com>",
            from_="Example Shop <news@shop.example.com>",
            to="Mallory <mallory@isp.example>",
            subject="Receipt",
            relay_id="q-ab12cd34",
        ),
        message_id="<notspam-20240309-1@isp.example>",
    )
    assert not complaint.counts_as_complaint


@pytest.mark.parametrize(
    ("feedback_type", "expected_type", "counts"),
    [
        ("abuse", "abuse", True),
        ("Fraud", "fraud", True),
        ("virus", "virus", False),
        ("other", "other", False),
        ("not-spam", "not-spam", False),
        ("auth-failure", "auth-failure", False),
        ("abuse (reported by user)", "abuse", True),
    ],
)
def test_feedback_types(feedback_type: str, expected_type: str, counts: bool) -> None:
    content = load("arf_rfc5965_b1.eml").replace(
        b"Feedback-Type: abuse", f"Feedback-Type: {feedback_type}".encode()
    )
    complaint = parse_complaint(content)
    assert (complaint.feedback_type, complaint.counts_as_complaint) == (
        expected_type,
        counts,
    )


# --- the hard-bounce table ---------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "diagnostic", "hard"),
    [
        ("5.1.1", "550 5.1.1 user unknown", True),
        ("5.1.2", "bad destination system address", True),
        ("5.1.3", "bad address syntax", True),
        ("5.1.4", "ambiguous", True),
        ("5.1.6", "mailbox has moved", True),
        ("5.1.10", "RESOLVER.ADR.RecipientNotFound", True),
        ("5.1.0", "Address rejected", True),
        ("5.1.0", "550 5.1.0 Sender address rejected", False),
        ("5.2.1", "mailbox disabled", True),
        ("5.1.5", "destination address valid", False),
        ("5.1.7", "bad sender's mailbox address syntax", False),
        ("5.1.8", "bad sender's system address", False),
        ("5.1.9", "message relayed to non-compliant mailer", False),
        ("5.2.0", "mailbox does not exist", True),
        ("5.2.0", "mailbox status unknown", False),
        ("5.2.2", "mailbox full", False),
        ("5.2.3", "message too long", False),
        ("5.3.4", "message too big for system", False),
        ("5.4.1", "Recipient address rejected: Access denied", False),
        ("5.4.4", "unable to route", False),
        ("5.5.0", "syntax error", False),
        ("5.7.1", "user unknown", False),
        ("5.7.1", "blocked by policy", False),
        ("5.7.26", "unauthenticated email is not accepted", False),
        ("4.1.1", "user unknown", False),
        ("4.2.2", "over quota", False),
        ("4.0.0", "no such user", False),
        ("2.0.0", "delivered", False),
        ("5.0.0", "550 User unknown", True),
        ("5.0.0", "550 No such user here", True),
        ("5.0.0", "550 Requested action not taken: mailbox unavailable", True),
        ("5.0.0", "550 The account does not exist", True),
        ("5.0.0", "550 unknown recipient", True),
        ("5.0.0", "550 Service unavailable", False),
        ("5.0.0", "550 mailbox unavailable: blocked by spam filter", False),
        ("5.0.0", "550 mailbox unavailable, over quota", False),
        ("5.0.0", "550 5.1.1 bad mailbox", True),  # refined to 5.1.1
        ("5.0.0", "550 5.7.1 user unknown or spam", False),  # refined to 5.7.1
        ("5.0.0", "450 4.1.1 user unknown", True),  # other class: not refined
        (None, "550 5.1.1 user unknown", True),
        (None, "550 user unknown", True),
        (None, "451 user unknown", False),
        (None, "", False),
        (None, None, False),
        ("5.01.001", "", True),  # leading zeros
        ("garbage", "no such user", False),
    ],
)
def test_hard_bounce_table(
    status: str | None, diagnostic: str | None, hard: bool
) -> None:
    assert is_recipient_hard_bounce(status, diagnostic) is hard


@pytest.mark.parametrize(
    ("action", "status", "permanent", "hard"),
    [
        (Action.FAILED, "5.1.1", True, True),
        (Action.DELAYED, "5.1.1", False, False),
        (Action.FAILED, "4.4.7", False, False),
        (Action.FAILED, None, False, False),
        (Action.DELIVERED, "2.0.0", False, False),
    ],
)
def test_permanent_needs_failed_action_and_class_5(
    action: Action, status: str | None, permanent: bool, hard: bool
) -> None:
    recipient = BounceRecipient(recipient="a@example.com", action=action, status=status)
    assert (recipient.permanent, recipient.is_recipient_hard_bounce) == (
        permanent,
        hard,
    )


# --- errors ---------------------------------------------------------------------

PLAIN_MAIL = crlf(
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net\n"
    b"Subject: Lunch?\n"
    b"\n"
    b"Hi Bob, lunch at 12:30? Call me at 555 1234.\n"
)
OUT_OF_OFFICE = crlf(
    b"From: Bob <bob@example.net>\n"
    b"To: bounce+1@bounces.relay.example.com\n"
    b"Subject: Automatic reply: Spring sale\n"
    b"Auto-Submitted: auto-replied\n"
    b"\n"
    b"I am out of the office until 25 March. For urgent matters write to\n"
    b"carol@example.net.\n"
)
MDN = crlf(
    b"From: bob@example.net\n"
    b"Subject: Read: Spring sale\n"
    b"Content-Type: multipart/report; report-type=disposition-notification;"
    b" boundary=M\n"
    b"\n"
    b"--M\n"
    b"Content-Type: text/plain\n"
    b"\n"
    b"Your message to bob@example.net was displayed: 550 5.1.1 lookalike.\n"
    b"--M\n"
    b"Content-Type: message/disposition-notification\n"
    b"\n"
    b"Final-Recipient: rfc822; bob@example.net\n"
    b"Disposition: manual-action/MDN-sent-manually; displayed\n"
    b"--M--\n"
)
NO_STATUS_PART = crlf(
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\n"
    b"\n"
    b"--B\n"
    b"Content-Type: text/plain\n"
    b"\n"
    b"<bob@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1 unknown\n"
    b"--B--\n"
)
NO_USABLE_RECIPIENT = report(
    "\n"
    "Reporting-MTA: dns; mx.example.org\n"
    "\n"
    "Final-Recipient: rfc822; undisclosed-recipients\n"
    "Action: failed\n"
    "Status: 5.1.1\n"
)
NO_RECIPIENT_BLOCK = report("\nReporting-MTA: dns; mx.example.org\n\n")
QMAIL_WITHOUT_ADDRESSES = crlf(
    b"Subject: failure notice\n"
    b"\n"
    b"Hi. This is the qmail-send program at mail.example.org.\n"
    b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
)
NESTED = b"".join(
    b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
    for i in range(500)
)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", ReportErrorReason.NOT_A_REPORT),
        (b"\r\n \r\n", ReportErrorReason.NOT_A_REPORT),
        (b"\x00\xff\xfe garbage \x80\x81", ReportErrorReason.NOT_A_REPORT),
        (PLAIN_MAIL, ReportErrorReason.NOT_A_REPORT),
        (OUT_OF_OFFICE, ReportErrorReason.NOT_A_REPORT),
        (MDN, ReportErrorReason.NOT_A_REPORT),
        (load("arf_yahoo.eml"), ReportErrorReason.NOT_A_REPORT),
        (NO_STATUS_PART, ReportErrorReason.MALFORMED),
        (NESTED, ReportErrorReason.MALFORMED),
        (NO_USABLE_RECIPIENT, ReportErrorReason.NO_RECIPIENTS),
        (NO_RECIPIENT_BLOCK, ReportErrorReason.NO_RECIPIENTS),
        (QMAIL_WITHOUT_ADDRESSES, ReportErrorReason.NO_RECIPIENTS),
        (load("postfix_dsn.eml")[:2000], ReportErrorReason.TRUNCATED),
        (crlf(load("gmail_dsn.eml"))[:-40], ReportErrorReason.TRUNCATED),
        (b"x" * (MAX_REPORT_BYTES + 1), ReportErrorReason.TOO_LARGE),
    ],
    ids=[
        "empty",
        "blank",
        "garbage",
        "plain-mail",
        "out-of-office",
        "mdn",
        "arf",
        "no-status-part",
        "nested",
        "no-usable-recipient",
        "no-recipient-block",
        "qmail-without-addresses",
        "truncated-postfix",
        "truncated-gmail",
        "too-large",
    ],
)
def test_bounce_errors(content: bytes, reason: ReportErrorReason) -> None:
    with pytest.raises(ReportError) as caught:
        parse_bounce(content)
    assert caught.value.reason is reason
    assert str(caught.value).startswith(f"{reason.value}: ")


NO_FEEDBACK_TYPE = load("arf_rfc5965_b1.eml").replace(
    b"Feedback-Type: abuse\n", b"Feedback-Typ: abuse\n"
)
NO_FEEDBACK_PART = load("arf_rfc5965_b1.eml").replace(
    b"Content-Type: message/feedback-report", b"Content-Type: text/plain"
)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", ReportErrorReason.NOT_A_REPORT),
        (PLAIN_MAIL, ReportErrorReason.NOT_A_REPORT),
        (load("postfix_dsn.eml"), ReportErrorReason.NOT_A_REPORT),
        (NO_FEEDBACK_TYPE, ReportErrorReason.MALFORMED),
        (NO_FEEDBACK_PART, ReportErrorReason.MALFORMED),
        (load("arf_jmrp.eml")[:1500], ReportErrorReason.TRUNCATED),
        (b"y" * (MAX_REPORT_BYTES + 1), ReportErrorReason.TOO_LARGE),
    ],
    ids=[
        "empty",
        "plain-mail",
        "dsn",
        "no-feedback-type",
        "no-feedback-part",
        "truncated",
        "too-large",
    ],
)
def test_complaint_errors(content: bytes, reason: ReportErrorReason) -> None:
    with pytest.raises(ReportError) as caught:
        parse_complaint(content)
    assert caught.value.reason is reason


def test_report_error_detail_names_no_address() -> None:
    with pytest.raises(ReportError) as caught:
        parse_bounce(NO_USABLE_RECIPIENT)
    assert caught.value.detail == "delivery-status part names no usable recipient"
    assert "@" not in str(caught.value)


@pytest.mark.parametrize("name", BOUNCE_FIXTURES)
def test_bounce_fixtures_read_the_same_with_crlf(name: str) -> None:
    assert parse_bounce(crlf(load(name))) == parse_bounce(load(name))


@pytest.mark.parametrize("name", COMPLAINT_FIXTURES)
def test_complaint_fixtures_read_the_same_with_crlf(name: str) -> None:
    assert parse_complaint(crlf(load(name))) == parse_complaint(load(name))


# --- only ReportError or a sane result, whatever the input -------------------------

SAMPLES = [load(name) for name in BOUNCE_FIXTURES + COMPLAINT_FIXTURES]
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _assert_sane(result: BounceReport | ComplaintReport) -> None:
    """The invariants every result keeps, whatever it was read from."""
    if isinstance(result, BounceReport):
        assert result.recipients
        for recipient in result.recipients:
            assert canonical_address(recipient.recipient) == recipient.recipient
            assert recipient.status is None or _STATUS.fullmatch(recipient.status)
            if recipient.diagnostic is not None:
                assert 0 < len(recipient.diagnostic) <= MAX_DIAGNOSTIC_CHARS
                assert not _CONTROL.search(recipient.diagnostic)
            assert recipient.smtp_code is None or 200 <= recipient.smtp_code < 600
            for moment in (recipient.last_attempt_date, result.arrival_date):
                assert moment is None or moment.tzinfo is UTC
    else:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", result.feedback_type)
        for address in result.original_rcpt_to:
            assert canonical_address(address) == address
        assert result.arrival_date is None or result.arrival_date.tzinfo is UTC
    if result.original is not None:
        for value in (
            result.original.message_id,
            result.original.return_path,
            result.original.from_,
            result.original.to,
            result.original.subject,
            result.original.relay_id,
        ):
            assert value is None or not _CONTROL.search(value)


def _outcome(
    parse: Callable[[bytes], BounceReport | ComplaintReport], data: bytes
) -> BounceReport | ComplaintReport | ReportError:
    try:
        return parse(data)
    except ReportError as exc:
        return exc


def _only_report_error(data: bytes) -> None:
    for parse in (parse_bounce, parse_complaint):
        outcome = _outcome(parse, data)
        if isinstance(outcome, ReportError):
            assert outcome.reason in set(ReportErrorReason)
            assert len(outcome.detail) <= 80
        else:
            _assert_sane(outcome)


@st.composite
def mutated_reports(draw: st.DrawFn) -> bytes:
    """A sample report, truncated, spliced, with bytes changed or lines lost."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    if draw(st.booleans()):
        data = bytearray(crlf(bytes(data)))
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(data)))
        operation = draw(
            st.sampled_from(["truncate", "delete", "insert", "replace", "repeat"])
        )
        if operation == "truncate":
            del data[at:]
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 200))]
        elif operation == "insert":
            data[at:at] = draw(
                st.one_of(
                    st.binary(max_size=40),
                    st.sampled_from(
                        [
                            b"\n\n",
                            b"\r\n--",
                            b"Content-Type: message/delivery-status\n\n",
                            b"Content-Transfer-Encoding: base64\n",
                            b"Final-Recipient: utf-8; \\x{D800}@\\x{110000}\n",
                            b"Status: 5.999.999\n",
                            b'; charset="us\\x00ascii"',
                            b"=?utf-8?b?/w==?=",
                            b"\xc3\x28\xed\xa0\x80",
                        ]
                    ),
                )
            )
        elif operation == "replace" and data:
            index = min(at, len(data) - 1)
            data[index] = draw(st.integers(0, 255))
        elif operation == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 300))]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_only_report_errors(data: bytes) -> None:
    _only_report_error(data)


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_reports())
def test_mutated_reports_give_a_sane_result_or_report_error(data: bytes) -> None:
    _only_report_error(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "Content-Type: multipart/report; report-type=delivery-status;"
                " boundary=B",
                "Content-Type: message/delivery-status",
                "Content-Type: message/feedback-report",
                "Content-Type: text/rfc822-headers",
                "Content-Type: message/rfc822",
                "Content-Transfer-Encoding: quoted-printable",
                "--B",
                "--B--",
                "",
                "Final-Recipient: rfc822; a@example.com",
                "Final-Recipient: utf-8; b\\x{E9}@example.com",
                "Original-Rcpt-To: <c@example.com>",
                "Feedback-Type: abuse",
                "Action: failed",
                "Status: 5.1.1",
                "Diagnostic-Code: smtp; 550 5.1.1 user unknown",
                "Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT",
                "Arrival-Date: Thu, 8 Mar 99999 99:00:00 +9999",
                " folded continuation",
                "<d@example.com>: host mx.example.com[192.0.2.1] said: 550 5.1.1",
                "<e@example.com>:",
                "The following address(es) failed:",
                "  f@example.com",
                "    550 5.1.1 unknown",
                "g@example.com 451 4.7.1 later",
            ]
        ),
        max_size=40,
    )
)
def test_report_shaped_lines_give_only_report_errors(lines: list[str]) -> None:
    _only_report_error("\r\n".join(lines).encode("utf-8"))
