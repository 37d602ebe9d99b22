"""Feedback by mail, end to end: real SMTP in and out of the running relay.

Mail leaves with a VERP envelope sender and ``X-Relay-Id``; bounces (DSNs) and
abuse reports (ARF) built from what the upstream received are sent back to the
relay's SMTP port without AUTH, as a mailbox provider would, and the account's
counters, state and the exclusion list move. Reports that cannot be read or
traced are kept, never dropped; forged tokens change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import re
import sys
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from relay.app import Relay
from storage.base import (
    AccountState,
    ConsentRecord,
    ConsentSource,
    EventKind,
    OptInType,
    SuppressionReason,
)
from tests.conftest import ACCOUNT, PASSWORD, StartRelay, client, merge
from tests.e2e.test_reputation import (
    OTHER,
    REPO,
    SECRET,
    SENDER,
    cli,
    mail_reply,
    parse_reply,
    sample,
    settings,
    totals,
    until,
    write_toml,
)
from tests.support.smtp import RawClient
from tests.support.upstream import CaptureUpstream, Received

BOUNCES = "bounces.relay.example"
FBL = "fbl@relay.example"
UNSUB = "unsubscribe@relay.example"
_VERP = re.compile(r"news\+([a-z2-7]{37})@bounces\.relay\.example")


def feedback_settings(**sections: Any) -> dict[str, Any]:
    """Feedback intake on: VERP to BOUNCES, reports to FBL."""
    return settings(
        **merge(
            {
                "feedback": {
                    "secret": SECRET,
                    "bounce_domain": BOUNCES,
                    "fbl_address": FBL,
                }
            },
            sections,
        )
    )


def outgoing(to: str, message_id: str, subject: str = "Autumn news") -> bytes:
    return (
        f"From: Acme News <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: {message_id}\r\n\r\nHello,\r\nour news.\r\n"
    ).encode()


async def send(relay: Relay, recipients: list[str], message_id: str) -> None:
    """One message from acme to ``recipients``; it must be queued."""
    smtp = await client(relay)
    try:
        errors, reply = await smtp.sendmail(
            SENDER, recipients, outgoing(recipients[0], message_id)
        )
        assert errors == {}, errors
        assert reply.startswith("2.0.0 Ok: queued as"), reply
    finally:
        await smtp.quit()


def header_block(received: Received) -> str:
    """The delivered message's header, with the Return-Path the final MTA adds."""
    head = received.content.split(b"\r\n\r\n", 1)[0].decode()
    return f"Return-Path: <{received.mail_from}>\r\n{head}\r\n"


def dsn(
    to: str,
    recipient: str,
    original: str,
    *,
    status: str = "5.1.1",
    action: str = "failed",
    diagnostic: str = "550 5.1.1 <{r}>: Recipient address rejected: User unknown",
    message_id: str = "<20261123.4ABC@mx.example.net>",
) -> bytes:
    """An RFC 3464 bounce from a remote MTA, as Postfix writes it."""
    diag = diagnostic.format(r=recipient)
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-Id: {message_id}\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="B1"\r\n\r\n'
        "--B1\r\nContent-Type: text/plain\r\n\r\n"
        f"<{recipient}>: host mx.example.net said: {diag}\r\n\r\n"
        "--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\n"
        "Remote-MTA: dns; mx.example.net\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n"
        "--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{original}\r\n"
        "--B1--\r\n"
    ).encode()


def arf(
    original: str,
    *,
    feedback_type: str = "abuse",
    rcpt_to: str | None = None,
    mail_from: str | None = None,
    report_id: str = "<arf-1@fbl.example.net>",
) -> bytes:
    """An RFC 5965 abuse report quoting ``original`` (a header block)."""
    fields = [
        f"Feedback-Type: {feedback_type}",
        "User-Agent: TestFBL/1.0",
        "Version: 1",
    ]
    if mail_from is not None:
        fields.append(f"Original-Mail-From: <{mail_from}>")
    if rcpt_to is not None:
        fields.append(f"Original-Rcpt-To: <{rcpt_to}>")
    return (
        "From: fbl@fbl.example.net\r\n"
        f"To: {FBL}\r\n"
        "Subject: FW: Autumn news\r\n"
        f"Message-ID: {report_id}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=feedback-report;\r\n"
        '\tboundary="A1"\r\n\r\n'
        "--A1\r\nContent-Type: text/plain\r\n\r\n"
        "This is an email abuse report.\r\n\r\n"
        "--A1\r\nContent-Type: message/feedback-report\r\n\r\n"
        + "\r\n".join(fields)
        + "\r\n\r\n--A1\r\nContent-Type: message/rfc822\r\n\r\n"
        f"{original}\r\nHello,\r\nour news.\r\n\r\n"
        "--A1--\r\n"
    ).encode()


async def deliver_feedback(
    relay: Relay, mail_from: str, to: str, content: bytes
) -> str:
    """Send ``content`` to ``to`` without AUTH, as a mailbox provider does; the
    reply to DATA."""
    raw = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await raw.cmd("EHLO mx.example.net")).startswith("250")
        reply = await raw.cmd(f"MAIL FROM:<{mail_from}>")
        if not reply.startswith("250"):
            return reply
        reply = await raw.cmd(f"RCPT TO:<{to}>")
        if not reply.startswith("250"):
            return reply
        stuffed = re.sub(rb"(?m)^\.", b"..", content)
        if not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        return await raw.send_data(stuffed + b".\r\n")
    finally:
        await raw.close()


async def delivered(upstream: CaptureUpstream, count: int) -> list[Received]:
    return await upstream.wait_for(count)


def received(relay: Relay, channel: str, result: str) -> float:
    return sample(
        relay, "relay_feedback_received_total", channel=channel, result=result
    )


async def excluded(relay: Relay, address: str, account: str = ACCOUNT) -> list[Any]:
    return await relay.store.suppressions_for(address, account, datetime.now(UTC))


# -- VERP and the tracking header ------------------------------------------------


async def test_each_recipient_leaves_with_its_own_verp_sender_and_x_relay_id(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    await send(relay, ["a@example.org", "b@example.org"], "<m1@acme.example>")
    got = await delivered(upstream, 2)
    assert sorted(r for m in got for r in m.rcpt_tos) == [
        "a@example.org",
        "b@example.org",
    ]
    senders = [m.mail_from for m in got]
    assert all(_VERP.fullmatch(s) for s in senders), senders
    assert senders[0] != senders[1]
    assert all(len(s.partition("@")[0]) <= 64 for s in senders)
    for m in got:
        parsed = message_from_bytes(m.content, policy=policy.default)
        assert re.fullmatch(r"[a-z2-7]{37}", str(parsed["X-Relay-Id"]))
        assert parsed["Message-ID"] == "<m1@acme.example>"
    (row,) = await relay.store.sent_messages_with_id("<m1@acme.example>")
    assert (row.account, row.recipients) == (
        ACCOUNT,
        ("a@example.org", "b@example.org"),
    )


async def test_an_upstream_that_refuses_the_bounce_domain_gets_the_own_sender(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    upstream.refused_sender_domains.add(BOUNCES)
    relay = await start_relay(feedback_settings())
    await send(relay, ["a@example.org", "b@example.org"], "<f1@acme.example>")
    got = await delivered(upstream, 2)
    assert sorted((m.mail_from, m.rcpt_tos[0]) for m in got) == [
        (SENDER, "a@example.org"),
        (SENDER, "b@example.org"),
    ]

    async def settled() -> bool:
        return (await totals(relay)).sent == 2

    await until(settled, "both recipients counted")
    assert (await totals(relay)).bounces == 0


async def test_without_a_bounce_domain_the_envelope_sender_is_kept(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(settings())
    await send(relay, ["a@example.org", "b@example.org"], "<m2@acme.example>")
    (got,) = await delivered(upstream, 1)
    assert (got.mail_from, got.rcpt_tos) == (SENDER, ["a@example.org", "b@example.org"])
    assert b"X-Relay-Id" not in got.content


async def test_null_sender_mail_is_never_verp_rewritten(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    smtp = await client(relay)
    try:
        errors, _ = await smtp.sendmail(
            "", ["a@example.org"], outgoing("a@example.org", "<m3@acme.example>")
        )
        assert errors == {}
    finally:
        await smtp.quit()
    (got,) = await delivered(upstream, 1)
    assert got.mail_from == ""


# -- bounces ---------------------------------------------------------------------


async def test_a_dsn_to_the_verp_address_counts_excludes_and_suspends(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        feedback_settings(thresholds={"min_volume": 10, "bounce_rate": "8%"})
    )
    recipients = [f"r{n}@example.org" for n in range(10)]
    for n, rcpt in enumerate(recipients):
        await send(relay, [rcpt], f"<b{n}@acme.example>")
    got = await delivered(upstream, 10)

    async def all_sent() -> bool:
        return (await totals(relay)).sent >= 10

    await until(all_sent, "10 recipients sent")
    assert relay.accounts.state_of(ACCOUNT) is AccountState.OK
    gone = next(m for m in got if m.rcpt_tos == ["r3@example.org"])

    bounce = dsn(gone.mail_from, "r3@example.org", header_block(gone))
    reply = await deliver_feedback(relay, "", gone.mail_from, bounce)
    assert reply == "250 2.0.0 Feedback recorded, thank you"

    counted = await totals(relay)
    assert (counted.sent, counted.bounces) == (10, 1)
    (entry,) = await excluded(relay, "r3@example.org", OTHER)
    assert (entry.account, entry.reason, entry.source) == (
        None,
        SuppressionReason.HARD_BOUNCE,
        "dsn",
    )
    (event,) = await relay.store.events(EventKind.BOUNCE)
    assert (event.account, event.recipient, event.status, event.source) == (
        ACCOUNT,
        "r3@example.org",
        "5.1.1",
        "dsn",
    )
    reason = "account acme suspended: bounce rate 10.0% over 30d exceeds 8.0%"
    assert parse_reply(await mail_reply(relay)) == (550, "5.7.1", reason)
    assert received(relay, "dsn", "recorded") == 1

    # The same DSN again (a provider retrying): accepted, counted once.
    reply = await deliver_feedback(relay, "", gone.mail_from, bounce)
    assert reply.startswith("250 ")
    assert (await totals(relay)).bounces == 1
    assert received(relay, "dsn", "duplicate") == 1


async def test_a_soft_bounce_counts_without_excluding_and_a_delay_counts_nothing(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    await send(relay, ["full@example.org"], "<s1@acme.example>")
    (got,) = await delivered(upstream, 1)
    delay = dsn(
        got.mail_from,
        "full@example.org",
        header_block(got),
        status="4.2.2",
        action="delayed",
        diagnostic="452 4.2.2 Mailbox full",
    )
    assert await deliver_feedback(relay, "", got.mail_from, delay) == (
        "250 2.0.0 Feedback received; nothing to record"
    )
    assert (await totals(relay)).bounces == 0
    soft = dsn(
        got.mail_from,
        "full@example.org",
        header_block(got),
        status="4.2.2",
        diagnostic="452 4.2.2 Mailbox full",
        message_id="<later@mx.example.net>",
    )
    assert (await deliver_feedback(relay, "", got.mail_from, soft)).startswith("250 ")
    assert (await totals(relay)).bounces == 1
    (event,) = await relay.store.events(EventKind.BOUNCE)
    assert (event.bounce_type, event.status) == ("soft", "4.2.2")
    assert await excluded(relay, "full@example.org") == []


async def test_a_bounce_without_verp_is_traced_by_x_relay_id_or_message_id(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    await send(relay, ["x@example.org"], "<x1@acme.example>")
    await send(relay, ["y@example.org"], "<y1@acme.example>")
    got = await delivered(upstream, 2)
    by_rcpt = {m.rcpt_tos[0]: m for m in got}
    # A forwarding host bounced to a plain address at the bounce domain, with the
    # returned headers (X-Relay-Id among them) but the Return-Path lost.
    headers = header_block(by_rcpt["x@example.org"]).split("\r\n", 1)[1]
    first = dsn(f"postmaster@{BOUNCES}", "x@example.org", headers)
    assert (
        await deliver_feedback(relay, "", f"postmaster@{BOUNCES}", first)
    ).startswith("250 2.0.0 Feedback recorded")
    # Only the Message-ID survived.
    second = dsn(
        f"postmaster@{BOUNCES}",
        "y@example.org",
        "Message-ID: <y1@acme.example>\r\nSubject: Autumn news\r\n",
        message_id="<other@mx.example.net>",
    )
    assert (
        await deliver_feedback(relay, "", f"postmaster@{BOUNCES}", second)
    ).startswith("250 2.0.0 Feedback recorded")
    events = await relay.store.events(EventKind.BOUNCE)
    assert sorted((e.account, e.recipient) for e in events) == [
        (ACCOUNT, "x@example.org"),
        (ACCOUNT, "y@example.org"),
    ]
    # Only a VERP token proves the recipient: these count, but exclude nobody.
    for rcpt in ("x@example.org", "y@example.org"):
        assert await excluded(relay, rcpt, OTHER) == []


async def test_a_co_recipient_cannot_bounce_or_complain_for_the_others(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    await send(relay, ["a@example.org", "b@example.org"], "<ab@acme.example>")
    got = {m.rcpt_tos[0]: m for m in await delivered(upstream, 2)}
    # a@ takes its own copy's headers, drops the Return-Path and names b@.
    headers = header_block(got["a@example.org"]).split("\r\n", 1)[1]
    forged = dsn(f"postmaster@{BOUNCES}", "b@example.org", headers)
    reply = await deliver_feedback(relay, "", f"postmaster@{BOUNCES}", forged)
    assert reply == "250 2.0.0 Feedback kept for inspection"
    report = arf(headers, rcpt_to="b@example.org", report_id="<arf-ab@fbl>")
    reply = await deliver_feedback(relay, "fbl@fbl.example.net", FBL, report)
    assert reply.startswith("250 2.0.0 Feedback recorded"), reply
    (complaint,) = await relay.store.events(EventKind.COMPLAINT)
    assert complaint.recipient == ""  # counted for the account, naming nobody
    assert await relay.store.events(EventKind.BOUNCE) == []
    assert await excluded(relay, "b@example.org") == []
    assert await excluded(relay, "b@example.org", OTHER) == []


async def test_unreadable_or_untraceable_bounces_are_kept_and_listed(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    overrides = feedback_settings()
    relay = await start_relay(overrides)
    toml = write_toml(tmp_path, upstream, overrides)
    await send(relay, ["v@example.org"], "<v1@acme.example>")
    (got,) = await delivered(upstream, 1)
    token = _VERP.fullmatch(got.mail_from)
    assert token is not None
    # One character of the token's MAC changed: forged.
    text = token.group(1)
    forged_token = text[:30] + ("a" if text[30] != "a" else "b") + text[31:]
    forged = f"news+{forged_token}@{BOUNCES}"
    bounce = dsn(forged, "v@example.org", f"Return-Path: <{forged}>\r\n")
    assert await deliver_feedback(relay, "", forged, bounce) == (
        "250 2.0.0 Feedback kept for inspection"
    )
    garbage = b"Subject: hello\r\n\r\nJust some text, no report.\r\n"
    assert await deliver_feedback(relay, "", f"x@{BOUNCES}", garbage) == (
        "250 2.0.0 Feedback kept for inspection"
    )
    assert await relay.store.events(EventKind.BOUNCE) == []
    assert await excluded(relay, "v@example.org") == []
    assert (await totals(relay)).bounces == 0
    assert received(relay, "dsn", "unattributed") == 2

    code, out, err = await cli(toml, "feedback", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert re.fullmatch(
        rf"2  \S+ \S+  dsn     from <> to x@{BOUNCES}  \(\d+ bytes\): "
        r"unreadable: not_a_report",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("1  ")
    assert lines[1].endswith(
        "VERP token does not match (forged, or another relay's); "
        "no Message-ID to trace it by"
    ), lines[1]
    assert err.strip() == "2 messages kept"
    code, out, err = await cli(toml, "feedback", "show", "2")
    assert (code, out) == (0, garbage.decode()), err
    code, out, err = await cli(toml, "feedback", "show", "99")
    assert (code, err.strip()) == (1, "error: no kept feedback with id 99")


async def test_of_a_large_unreadable_message_the_first_64_kib_are_kept(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(feedback_settings(server={"max_message_size": "1MiB"}))
    line = b"x" * 78 + b"\r\n"
    big = b"Subject: returned\r\n\r\n" + line * 5000  # 400,000 bytes of body
    assert await deliver_feedback(relay, "", f"x@{BOUNCES}", big) == (
        "250 2.0.0 Feedback kept for inspection"
    )
    (kept,) = await relay.store.unattributed()
    assert kept.size_bytes == 64 * 1024
    assert kept.reason == (
        f"unreadable: not_a_report (first 64 KiB of {len(big)} bytes kept)"
    )
    content = await relay.store.unattributed_content(kept.id)
    assert content == big[: 64 * 1024]


# -- abuse reports ---------------------------------------------------------------


async def test_abuse_reports_count_as_complaints_however_they_are_traced(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings(thresholds={"complaints_per_day": 2}))
    rcpts = ["c1@example.org", "c2@example.org", "c3@example.org"]
    for n, rcpt in enumerate(rcpts):
        await send(relay, [rcpt], f"<c{n}@acme.example>")
    got = {m.rcpt_tos[0]: m for m in await delivered(upstream, 3)}

    # 1. Return-Path (VERP) in the quoted message, the recipient redacted.
    first = header_block(got["c1@example.org"]).replace(
        "To: c1@example.org", "To: redacted"
    )
    assert await deliver_feedback(relay, "fbl@fbl.example.net", FBL, arf(first)) == (
        "250 2.0.0 Feedback recorded, thank you"
    )
    # 2. X-Relay-Id only (Return-Path stripped), recipient named by the report.
    second = header_block(got["c2@example.org"]).split("\r\n", 1)[1]
    report = arf(second, rcpt_to="c2@example.org", report_id="<arf-2@fbl>")
    assert (
        await deliver_feedback(relay, "fbl@fbl.example.net", FBL, report)
    ).startswith("250 2.0.0 Feedback recorded")
    assert relay.accounts.state_of(ACCOUNT) is not AccountState.SUSPENDED
    # 3. The Message-ID alone; the message had one recipient, so it is that one.
    third = "Message-ID: <c2@acme.example>\r\nSubject: Autumn news\r\n"
    report = arf(third, report_id="<arf-3@fbl>")
    assert (
        await deliver_feedback(relay, "fbl@fbl.example.net", FBL, report)
    ).startswith("250 2.0.0 Feedback recorded")
    events = await relay.store.events(EventKind.COMPLAINT)
    assert sorted(e.recipient for e in events) == rcpts
    for rcpt in rcpts:
        (entry,) = await excluded(relay, rcpt)
        assert (entry.account, entry.reason) == (ACCOUNT, SuppressionReason.COMPLAINT)
        assert await excluded(relay, rcpt, OTHER) == []
    assert parse_reply(await mail_reply(relay)) == (
        550,
        "5.7.1",
        "account acme suspended: complaints in 24h 3 exceeds 2",
    )


async def test_a_complaint_without_a_consent_record_counts_as_a_spamtrap_hit(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    # The ledger is in use (monitor mode lets the unconsented mail out).
    relay = await start_relay(
        feedback_settings(
            policies={"order": ["consent"], "consent": {"mode": "monitor"}},
            accounts={ACCOUNT: {"default_category": "marketing"}},
        )
    )
    now = datetime.now(UTC)
    await relay.store.add_consents(
        [
            ConsentRecord(
                account=ACCOUNT,
                address="opted@example.org",
                collected_at=now,
                source=ConsentSource.NEWSLETTER,
                opt_in=OptInType.SINGLE,
            )
        ]
    )
    await send(relay, ["opted@example.org"], "<j1@acme.example>")
    await send(relay, ["never@example.org"], "<j2@acme.example>")
    # A password reset to someone without consent: transactional, justified.
    smtp = await client(relay)
    try:
        reset = outgoing("reset@example.org", "<j3@acme.example>").replace(
            b"Subject:", b"X-Relay-Category: transactional\r\nSubject:", 1
        )
        errors, _ = await smtp.sendmail(SENDER, ["reset@example.org"], reset)
        assert errors == {}
    finally:
        await smtp.quit()
    got = {m.rcpt_tos[0]: m for m in await delivered(upstream, 3)}
    for n, rcpt in enumerate(sorted(got)):
        report = arf(header_block(got[rcpt]), report_id=f"<arf-j{n}@fbl>")
        reply = await deliver_feedback(relay, "fbl@fbl.example.net", FBL, report)
        assert reply.startswith("250 2.0.0 Feedback recorded"), reply
    complaints = await relay.store.events(EventKind.COMPLAINT)
    assert sorted(e.recipient for e in complaints) == sorted(got)
    (hit,) = await relay.store.events(EventKind.SPAMTRAP_HIT)
    assert (hit.recipient, hit.detail) == (
        "never@example.org",
        "abuse complaint without a consent record",
    )
    assert (await totals(relay)).spamtrap_hits == 1


async def test_reports_that_name_no_recipient_count_once_per_message(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    await send(relay, ["p@example.org", "q@example.org"], "<pq@acme.example>")
    await delivered(upstream, 2)
    quoted = "Message-ID: <pq@acme.example>\r\nTo: undisclosed-recipients:;\r\n"
    for n in range(3):
        report = arf(quoted, report_id=f"<arf-pq{n}@fbl>")
        reply = await deliver_feedback(relay, "fbl@fbl.example.net", FBL, report)
        assert reply.startswith("250 2.0.0 Feedback recorded"), reply
    (event,) = await relay.store.events(EventKind.COMPLAINT)
    assert (event.account, event.recipient) == (ACCOUNT, "")
    assert (await totals(relay)).complaints == 1
    assert received(relay, "arf", "duplicate") == 2
    # Nobody is excluded on a report that names nobody.
    for rcpt in ("p@example.org", "q@example.org"):
        assert await excluded(relay, rcpt) == []


async def test_not_spam_reports_change_nothing_and_reports_elsewhere_need_auth(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    await send(relay, ["n@example.org"], "<n1@acme.example>")
    (got,) = await delivered(upstream, 1)
    report = arf(header_block(got), feedback_type="not-spam")
    assert await deliver_feedback(relay, "fbl@fbl.example.net", FBL, report) == (
        "250 2.0.0 Feedback received; nothing to record"
    )
    assert await relay.store.events(EventKind.COMPLAINT) == []
    assert received(relay, "arf", "ignored") == 1
    # Without AUTH only the feedback addresses take mail.
    reply = await deliver_feedback(relay, "x@example.net", "jane@example.org", b"x")
    assert parse_reply(reply) == (
        554,
        "5.7.1",
        "Relay access denied: authenticate with AUTH to send mail",
    )


async def test_feedback_and_other_mail_go_in_separate_transactions(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(feedback_settings())
    raw = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await raw.login(ACCOUNT, PASSWORD)).startswith("235")
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert (await raw.cmd("RCPT TO:<jane@example.org>")).startswith("250")
        code, status, _ = parse_reply(await raw.cmd(f"RCPT TO:<{FBL}>"))
        assert (code, status) == (452, "4.5.3")
    finally:
        await raw.close()


async def test_auth_is_refused_inside_a_transaction_begun_without_it(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(feedback_settings())
    raw = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await raw.cmd("EHLO mx.example.net")).startswith("250")
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        token = base64.b64encode(f"\0{ACCOUNT}\0{PASSWORD}".encode()).decode()
        code, status, text = parse_reply(await raw.cmd(f"AUTH PLAIN {token}"))
        assert (code, status, text) == (
            503,
            "5.5.1",
            "AUTH is not permitted during a mail transaction",
        )
        reply = await raw.cmd("RCPT TO:<victim@example.org>")
        assert parse_reply(reply)[:2] == (554, "5.7.1")
    finally:
        await raw.close()
    assert upstream.messages == []


async def test_without_feedback_addresses_mail_without_auth_is_refused_at_mail(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(settings())
    reply = await deliver_feedback(relay, "", f"x@{BOUNCES}", b"x")
    assert parse_reply(reply) == (
        530,
        "5.7.0",
        "Authentication required: log in with AUTH first",
    )


async def test_a_flood_of_feedback_from_one_address_is_deferred(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(feedback_settings(feedback={"intake_rate": "2/h"}))
    garbage = b"Subject: x\r\n\r\nnot a report\r\n"
    for _ in range(2):
        reply = await deliver_feedback(relay, "", f"x@{BOUNCES}", garbage)
        assert reply.startswith("250 ")
    reply = await deliver_feedback(relay, "", f"x@{BOUNCES}", garbage)
    assert parse_reply(reply) == (
        451,
        "4.7.1",
        "Too much feedback from your address; try again later",
    )
    assert await relay.store.unattributed_count() == 2
    assert received(relay, "smtp", "refused") == 1


async def test_odd_feedback_gets_an_answer_never_an_internal_error(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(feedback_settings(feedback={"unsubscribe_mailto": UNSUB}))
    bad_charset = "Subject: unsubscribe =?\u00e9?q?x?=\r\n\r\nhi\r\n".encode()
    reply = await deliver_feedback(relay, "m@example.org", UNSUB, bad_charset)
    assert parse_reply(reply)[:2] == (550, "5.7.1")
    # Above the 4 MiB a report may have: refused while reading, nothing kept.
    line = b"y" * 998 + b"\r\n"
    huge = b"Subject: returned\r\n\r\n" + line * 4300
    reply = await deliver_feedback(relay, "", f"x@{BOUNCES}", huge)
    assert reply.startswith("552 "), reply
    assert await relay.store.unattributed_count() == 0


# -- mailto unsubscribe ----------------------------------------------------------


async def test_the_mailto_unsubscribe_excludes_at_once(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        settings(
            policies={"order": ["exclusion", "optout_link"]},
            accounts={ACCOUNT: {"default_category": "marketing"}},
            feedback={"secret": SECRET, "unsubscribe_mailto": UNSUB},
            http={"public_url": "https://relay.example"},
        )
    )
    body = "News.\r\n\r\nUnsubscribe: https://acme.example/unsubscribe?u=1\r\n"
    smtp = await client(relay)
    try:
        content = outgoing("m@example.org", "<u1@acme.example>").replace(
            b"Hello,\r\nour news.\r\n", body.encode()
        )
        errors, _ = await smtp.sendmail(SENDER, ["m@example.org"], content)
        assert errors == {}
    finally:
        await smtp.quit()
    (got,) = await delivered(upstream, 1)
    header = str(
        message_from_bytes(got.content, policy=policy.default)["List-Unsubscribe"]
    )
    mailto = re.search(r"<mailto:([^?>]+)\?subject=([^>]+)>", header)
    assert mailto is not None, header
    assert mailto.group(1) == UNSUB
    subject = unquote(mailto.group(2))

    bad = b"Subject: unsubscribe not-a-token-at-all\r\n\r\n\r\n"
    reply = await deliver_feedback(relay, "m@example.org", UNSUB, bad)
    assert parse_reply(reply)[:2] == (550, "5.7.1")
    assert await excluded(relay, "m@example.org") == []

    # As a mail program writes it: the long Subject folded (and encoded).
    mail = EmailMessage(policy=policy.SMTP)
    mail["From"] = "m@example.org"
    mail["To"] = UNSUB
    mail["Subject"] = subject
    mail.set_content("Please unsubscribe me.")
    request = mail.as_bytes()
    assert b"\r\n " in request.split(b"\r\n\r\n", 1)[0]  # it is folded
    reply = await deliver_feedback(relay, "m@example.org", UNSUB, request)
    assert reply == "250 2.0.0 Unsubscribed"
    (entry,) = await excluded(relay, "m@example.org")
    assert (entry.reason, entry.source) == (SuppressionReason.UNSUBSCRIBE, "mailto")
    raw = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await raw.login(ACCOUNT, PASSWORD)).startswith("235")
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        code, status, _ = parse_reply(await raw.cmd("RCPT TO:<m@example.org>"))
        assert (code, status) == (550, "5.7.1")
    finally:
        await raw.close()
    assert (await totals(relay)).unsubscribes == 1


# -- a real client: swaks --------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="swaks is installed by CI on Linux")
async def test_swaks_delivers_a_bounce_file_to_the_relay(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    import shutil

    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed")
    relay = await start_relay(feedback_settings())
    await send(relay, ["w@example.org"], "<w1@acme.example>")
    (got,) = await delivered(upstream, 1)
    path = tmp_path / "bounce.eml"
    path.write_bytes(dsn(got.mail_from, "w@example.org", header_block(got)))
    proc = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"127.0.0.1:{relay.smtp.port}",
        "--from",
        "<>",
        "--to",
        got.mail_from,
        "--data",
        f"@{path}",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert "250 2.0.0 Feedback recorded" in out.decode()
    (event,) = await relay.store.events(EventKind.BOUNCE)
    assert event.recipient == "w@example.org"
