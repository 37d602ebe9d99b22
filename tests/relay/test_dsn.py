"""Tests for relay.dsn: DSNs parse back with the stdlib and are safe to send."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.dsn import FailedRecipient, build_dsn, is_delivery_report

NOW = datetime(2024, 3, 5, 14, 30, 0, tzinfo=UTC)
ARRIVAL = NOW - timedelta(days=5)
ORIGINAL_HEADERS = (
    b"Received: from client.example.org (client.example.org [192.0.2.7])\r\n"
    b"\tby relay.example.com with ESMTPSA id Q1A2B3\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net, carol@example.net\r\n"
    b"Subject: Quarterly newsletter\r\n"
    b"Message-ID: <newsletter-42@example.org>\r\n"
)
ORIGINAL = ORIGINAL_HEADERS + b"\r\nHello Bob,\r\n\r\nthe body is not returned.\r\n"
UNKNOWN_USER = FailedRecipient(
    address="bob@example.net",
    status="5.1.1",
    diagnostic="5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
    smtp_code=550,
    remote_mta="mx.example.net",
)
EXPIRED = FailedRecipient(
    address="carol@example.net",
    status="4.4.7",
    diagnostic="delivery time expired after 5 days (connection timed out)",
)


def build(**overrides: Any) -> bytes:
    """Call build_dsn with defaults for everything not given."""
    arguments: dict[str, Any] = {
        "reporting_mta": "relay.example.com",
        "dsn_from": "MAILER-DAEMON@relay.example.com",
        "original_mail_from": "alice@example.org",
        "original_message": ORIGINAL,
        "queue_id": "Q1A2B3",
        "arrival": ARRIVAL,
        "failures": [UNKNOWN_USER, EXPIRED],
        "now": NOW,
    }
    arguments.update(overrides)
    return build_dsn(**arguments)


def parse(raw: bytes) -> EmailMessage:
    """Parse ``raw`` the way a receiving MUA using the stdlib would."""
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(raw: bytes) -> list[EmailMessage]:
    """Return the three parts of the multipart/report in ``raw``."""
    payload = parse(raw).get_payload()
    assert isinstance(payload, list)
    return cast(list[EmailMessage], payload)


def status_blocks(raw: bytes) -> list[Message]:
    """Return the field groups of the message/delivery-status part."""
    status = parts(raw)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return cast(list[Message], blocks)


def returned_headers(raw: bytes) -> bytes:
    """Return the decoded content of the text/rfc822-headers part."""
    part = parts(raw)[2]
    assert part.get_content_type() == "text/rfc822-headers"
    content = part.get_payload(decode=True)
    assert isinstance(content, bytes)
    return content


def field(block: Message, name: str) -> str | None:
    """Return a DSN field's value, unfolded, or None."""
    value = block.get(name)
    return None if value is None else " ".join(str(value).split())


def assert_wire_safe(raw: bytes, *, seven_bit: bool = True) -> None:
    """Assert CRLF-only line endings and RFC 5322 line lengths."""
    assert raw.endswith(b"\r\n")
    without_crlf = raw.replace(b"\r\n", b"")
    assert b"\n" not in without_crlf, "bare LF"
    assert b"\r" not in without_crlf, "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    if seven_bit:
        assert raw.isascii()
        assert b"\x00" not in raw


# --- structure and headers -------------------------------------------------


def test_top_level_is_a_delivery_status_report() -> None:
    message = parse(build())

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message.get_boundary()
    assert message["MIME-Version"] == "1.0"
    assert [part.get_content_type() for part in parts(build())] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_envelope_headers() -> None:
    message = parse(build())

    sender = message["From"].addresses
    assert len(sender) == 1
    assert sender[0].display_name == "Mail Delivery System"
    assert sender[0].addr_spec == "MAILER-DAEMON@relay.example.com"
    assert [a.addr_spec for a in message["To"].addresses] == ["alice@example.org"]
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Date"].datetime == NOW
    assert message["Auto-Submitted"] == "auto-replied"
    message_id = str(message["Message-ID"])
    assert message_id.startswith("<")
    assert message_id.endswith("@relay.example.com>")


def test_message_ids_are_unique() -> None:
    ids = {str(parse(build())["Message-ID"]) for _ in range(20)}

    assert len(ids) == 20


def test_non_utc_and_naive_times_are_reported_in_utc() -> None:
    local = NOW.astimezone(UTC).replace(tzinfo=None)

    message = parse(build(now=local))

    assert message["Date"].datetime == NOW
    assert field(status_blocks(build(now=local))[1], "Last-Attempt-Date") == (
        "Tue, 05 Mar 2024 14:30:00 +0000"
    )


# --- message/delivery-status ----------------------------------------------


def test_per_message_fields() -> None:
    blocks = status_blocks(build())

    assert len(blocks) == 3
    assert field(blocks[0], "Reporting-MTA") == "dns; relay.example.com"
    assert field(blocks[0], "Arrival-Date") == "Thu, 29 Feb 2024 14:30:00 +0000"
    assert field(blocks[0], "Final-Recipient") is None


def test_per_recipient_fields_for_an_smtp_rejection() -> None:
    block = status_blocks(build())[1]

    assert field(block, "Final-Recipient") == "rfc822; bob@example.net"
    assert field(block, "Action") == "failed"
    assert field(block, "Status") == "5.1.1"
    assert field(block, "Remote-MTA") == "dns; mx.example.net"
    assert field(block, "Diagnostic-Code") == (
        "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown"
    )
    assert field(block, "Last-Attempt-Date") == "Tue, 05 Mar 2024 14:30:00 +0000"
    assert field(block, "Original-Recipient") is None


def test_per_recipient_fields_for_an_expiry() -> None:
    block = status_blocks(build())[2]

    assert field(block, "Final-Recipient") == "rfc822; carol@example.net"
    assert field(block, "Action") == "failed"
    assert field(block, "Status") == "4.4.7"
    assert field(block, "Remote-MTA") is None
    assert field(block, "Diagnostic-Code") == (
        "X-Relay; delivery time expired after 5 days (connection timed out)"
    )


def test_no_diagnostic_code_without_code_or_text() -> None:
    failure = FailedRecipient("dave@example.net", "4.4.1", "")

    block = status_blocks(build(failures=[failure]))[1]

    assert field(block, "Diagnostic-Code") is None
    assert field(block, "Status") == "4.4.1"


def test_smtp_code_without_text() -> None:
    failure = FailedRecipient("dave@example.net", "5.0.0", "", smtp_code=554)

    block = status_blocks(build(failures=[failure]))[1]

    assert field(block, "Diagnostic-Code") == "smtp; 554"


def test_reply_code_is_not_repeated() -> None:
    failure = FailedRecipient("d@example.net", "5.7.1", "550 5.7.1 Spam", 550)

    block = status_blocks(build(failures=[failure]))[1]

    assert field(block, "Diagnostic-Code") == "smtp; 550 5.7.1 Spam"


def test_one_block_per_failure_in_order() -> None:
    failures = [
        FailedRecipient(f"user{i}@example.net", "5.1.1", f"no user {i}", 550)
        for i in range(7)
    ]

    blocks = status_blocks(build(failures=failures))

    assert len(blocks) == 8
    assert [field(b, "Final-Recipient") for b in blocks[1:]] == [
        f"rfc822; user{i}@example.net" for i in range(7)
    ]


def test_diagnostic_control_characters_are_stripped() -> None:
    failure = FailedRecipient(
        "bob@example.net",
        "5.1.1",
        "550-first line\r\n550 second\x00line\x1b[31m\u202eevil\nInjected: yes",
        550,
    )

    raw = build(failures=[failure])
    block = status_blocks(raw)[1]

    assert field(block, "Diagnostic-Code") == (
        "smtp; 550-first line 550 second line [31m evil Injected: yes"
    )
    assert field(block, "Injected") is None
    assert_wire_safe(raw)


def test_long_diagnostic_is_folded_and_capped() -> None:
    words = " ".join(f"word{i}" for i in range(1000))
    failure = FailedRecipient("bob@example.net", "5.0.0", "x" * 1500 + " " + words, 550)

    raw = build(failures=[failure])
    value = field(status_blocks(raw)[1], "Diagnostic-Code")

    assert value is not None
    assert value.startswith("smtp; 550 xxxx")
    assert value.endswith("...")
    assert_wire_safe(raw)


def test_invalid_status_becomes_undefined_permanent_failure() -> None:
    failure = FailedRecipient("bob@example.net", "550 no", "nope", 550)

    block = status_blocks(build(failures=[failure]))[1]

    assert field(block, "Status") == "5.0.0"


def test_non_ascii_recipient_uses_utf8_address_type() -> None:
    failure = FailedRecipient("jösé+tag@exämple.net", "5.1.1", "unknown ☃", 550)

    raw = build(failures=[failure])
    block = status_blocks(raw)[1]

    # RFC 6533 utf-8-addr-xtext: non-ASCII and "+" become \x{HEX}.
    assert field(block, "Final-Recipient") == (
        r"utf-8; j\x{F6}s\x{E9}\x{2B}tag@ex\x{E4}mple.net"
    )
    assert field(block, "Diagnostic-Code") == r"smtp; 550 unknown \x{2603}"
    assert_wire_safe(raw)
    text = parts(raw)[0].get_content()
    assert "jösé+tag@exämple.net" in text
    assert "unknown ☃" in text


def test_non_ascii_sender_is_addressed_in_utf8() -> None:
    raw = build(original_mail_from="álice@exämple.org")

    assert_wire_safe(raw, seven_bit=False)
    # RFC 6532 header: read it as UTF-8 text, as an SMTPUTF8 MUA would.
    message = email.message_from_string(
        raw.decode("utf-8"), policy=email.policy.default
    )
    assert [a.addr_spec for a in message["To"].addresses] == ["álice@exämple.org"]
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert body.isascii()


def test_odd_sender_syntax_is_quoted() -> None:
    message = parse(build(original_mail_from="<john doe@example.org>"))

    assert [a.addr_spec for a in message["To"].addresses] == ['"john doe"@example.org']


@pytest.mark.parametrize(
    ("given", "reported"),
    [
        ("[", "localhost"),
        ("relay.example.com.", "relay.example.com"),
        ("re lay:25.example.com", "relay25.example.com"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_odd_host_names_are_cleaned(given: str, reported: str) -> None:
    failure = FailedRecipient("bob@example.net", "5.1.1", "no", 550, remote_mta=given)

    raw = build(reporting_mta=given, failures=[failure])
    blocks = status_blocks(raw)

    assert field(blocks[0], "Reporting-MTA") == f"dns; {reported}"
    assert str(parse(raw)["Message-ID"]).endswith(f"@{reported}>")
    if reported != "localhost":
        assert field(blocks[1], "Remote-MTA") == f"dns; {reported}"
    else:
        assert field(blocks[1], "Remote-MTA") is None


@pytest.mark.parametrize(
    "sender", ["a@[", "a@[1.2.3.4", "a@b;c", "a@b>", "@b", "a@", '"', "é", "a@b(c"]
)
def test_unparseable_senders_still_give_one_to_address(sender: str) -> None:
    raw = build(original_mail_from=sender, dsn_from=sender)

    assert_wire_safe(raw, seven_bit=sender.isascii())
    message = email.message_from_string(
        raw.decode("utf-8"), policy=email.policy.default
    )
    assert len(message["To"].addresses) == 1
    assert len(message["From"].addresses) == 1


@pytest.mark.parametrize("sender", ["", "<>", "  "])
def test_null_sender_is_refused(sender: str) -> None:
    with pytest.raises(ValueError, match="null reverse-path"):
        build(original_mail_from=sender)


def test_no_failures_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build(failures=[])


# --- human-readable part ---------------------------------------------------


def test_explanation_names_recipients_reasons_and_queue_id() -> None:
    text = parts(build())[0]

    assert text.get_content_type() == "text/plain"
    content = " ".join(text.get_content().split())
    assert "Q1A2B3" in content
    assert "<bob@example.net>" in content
    assert "Recipient address rejected: User unknown" in content
    assert "mx.example.net" in content
    assert "<carol@example.net>" in content
    assert "delivery time expired after 5 days" in content


# --- text/rfc822-headers -----------------------------------------------------


def test_returned_headers_are_the_original_header_block() -> None:
    assert returned_headers(build()) == ORIGINAL_HEADERS


def test_body_is_not_returned() -> None:
    assert b"the body is not returned" not in build()


def test_bare_lf_original_is_returned_with_crlf() -> None:
    original = ORIGINAL.replace(b"\r\n", b"\n")

    raw = build(original_message=original)

    assert returned_headers(raw) == ORIGINAL_HEADERS
    assert_wire_safe(raw)


def test_original_without_blank_line_is_all_headers() -> None:
    assert returned_headers(build(original_message=ORIGINAL_HEADERS)) == (
        ORIGINAL_HEADERS
    )
    unterminated = ORIGINAL_HEADERS.rstrip(b"\r\n")
    assert returned_headers(build(original_message=unterminated)) == (ORIGINAL_HEADERS)


@pytest.mark.parametrize("original", [b"", b"\r\n", b"\r\n\r\nbody only\r\n"])
def test_original_without_headers(original: bytes) -> None:
    raw = build(original_message=original)

    assert returned_headers(raw) == b""
    assert_wire_safe(raw)


def test_eight_bit_and_long_header_lines_survive_exactly() -> None:
    headers = (
        b"Subject: caf\xc3\xa9 \xff\xfe\r\n"
        b"X-Long: " + b"y" * 3000 + b"\r\n"
        b"X-Trailing-Space: a  \r\n"
        b"X-Nul: a\x00b\r\n"
    )

    raw = build(original_message=headers + b"\r\nbody\r\n")

    assert parts(raw)[2]["Content-Transfer-Encoding"] == "quoted-printable"
    assert returned_headers(raw) == headers
    assert_wire_safe(raw)


def test_returned_headers_are_capped_at_64_kib() -> None:
    line = b"X-Filler: " + b"z" * 90 + b"\r\n"
    original = line * 2000 + b"\r\nbody\r\n"

    headers = returned_headers(build(original_message=original))

    assert len(headers) <= 64 * 1024
    assert len(headers) > 60 * 1024
    assert headers.endswith(b"\r\n")
    assert original.startswith(headers)


def test_giant_single_line_original_is_capped() -> None:
    raw = build(original_message=b"x" * 200_000)

    headers = returned_headers(raw)
    assert len(headers) == 64 * 1024
    assert headers.endswith(b"x\r\n")
    assert_wire_safe(raw)


def test_whole_output_is_crlf_and_short_lines() -> None:
    assert_wire_safe(build())


# --- is_delivery_report ----------------------------------------------------


def test_own_output_is_a_delivery_report() -> None:
    assert is_delivery_report(build())


def test_ordinary_message_is_not_a_delivery_report() -> None:
    assert not is_delivery_report(ORIGINAL)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\r\n\r\n",
        b"\x00\xff\xfe garbage \x80\r\n",
        b"Content-Type: \r\n\r\n",
        b"Content-Type: multipart/report\r\n\r\n",
        b"Content-Type: multipart/report; report-type=disposition-notification\r\n",
        b"Content-Type: multipart/mixed; report-type=delivery-status\r\n",
        b'Content-Type: ;;;==="\r\n\r\n',
        b"Content-Type: multipart/report; report-type*=''\r\n",
        b"Content-Type: [\r\n",
        # This one crashes the stdlib's header parser (IndexError) on 3.11.
        b"Content-Type: multipart/report; \x00*\r\n",
    ],
)
def test_other_messages_are_not_delivery_reports(message: bytes) -> None:
    assert not is_delivery_report(message)


@pytest.mark.parametrize(
    "message",
    [
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\n",
        b'content-type: Multipart/Report;\n report-type="Delivery-Status"\n\nx',
        b"Subject: x\r\nContent-Type: multipart/report; boundary=b;\r\n"
        b"\treport-type=delivery-status\r\n",
        b"Content-Type: multipart/report; report-type=global-delivery-status\r\n",
    ],
)
def test_delivery_report_headers_are_recognised(message: bytes) -> None:
    assert is_delivery_report(message)


def test_only_the_header_block_is_looked_at() -> None:
    message = (
        b"Subject: forwarded bounce\r\n\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status\r\n"
    )

    assert not is_delivery_report(message)


# --- properties --------------------------------------------------------------

# Text as hostile as Python strings get: controls, surrogates, any code point.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=300)
FAILURES = st.lists(
    st.builds(
        FailedRecipient,
        address=st.one_of(st.emails(), ANY_TEXT),
        status=st.one_of(
            st.from_regex(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True), ANY_TEXT
        ),
        diagnostic=ANY_TEXT,
        smtp_code=st.one_of(st.none(), st.integers(-1000, 100_000)),
        remote_mta=st.one_of(st.none(), ANY_TEXT),
    ),
    min_size=1,
    max_size=4,
)


def check_report(raw: bytes, failures: Sequence[FailedRecipient]) -> None:
    """Assert the invariants every DSN we build must satisfy."""
    assert_wire_safe(raw)
    assert is_delivery_report(raw)
    blocks = status_blocks(raw)
    assert len(blocks) == 1 + len(failures)
    for block in blocks[1:]:
        assert field(block, "Action") == "failed"
        assert field(block, "Final-Recipient") is not None


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(original=st.binary(max_size=4000), diagnostic=ANY_TEXT)
def test_any_original_and_diagnostic_give_a_valid_report(
    original: bytes, diagnostic: str
) -> None:
    failures = [FailedRecipient("bob@example.net", "5.1.1", diagnostic, 550)]

    raw = build(original_message=original, failures=failures)

    check_report(raw, failures)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    original=st.one_of(
        st.binary(max_size=2000),
        st.lists(st.sampled_from([b"A: b", b"\r\n", b"\n", b"\r", b" x", b"\xff"])).map(
            b"".join
        ),
    ),
    failures=FAILURES,
    queue_id=ANY_TEXT,
    reporting_mta=ANY_TEXT,
)
def test_any_failures_give_a_valid_report(
    original: bytes,
    failures: list[FailedRecipient],
    queue_id: str,
    reporting_mta: str,
) -> None:
    raw = build(
        original_message=original,
        failures=failures,
        queue_id=queue_id,
        reporting_mta=reporting_mta,
    )

    check_report(raw, failures)


@settings(deadline=None, max_examples=150)
@given(
    # Anything with a letter or digit survives cleaning, so is not a null sender.
    sender=ANY_TEXT.filter(lambda text: any(c.isalnum() for c in text)),
    dsn_from=st.one_of(st.emails(), ANY_TEXT),
)
def test_any_sender_gives_a_report(sender: str, dsn_from: str) -> None:
    raw = build(original_mail_from=sender, dsn_from=dsn_from)

    without_crlf = raw.replace(b"\r\n", b"")
    assert b"\n" not in without_crlf
    assert b"\r" not in without_crlf
    message = email.message_from_string(
        raw.decode("utf-8"), policy=email.policy.default
    )
    assert len(message["To"].addresses) == 1
    assert is_delivery_report(raw)


@settings(deadline=None, max_examples=300)
@given(message=st.binary(max_size=2000))
def test_is_delivery_report_never_raises(message: bytes) -> None:
    assert isinstance(is_delivery_report(message), bool)


@settings(deadline=None, max_examples=150)
@given(header=st.text(st.characters(codec="ascii"), max_size=200))
def test_is_delivery_report_never_raises_on_content_type_values(header: str) -> None:
    message = b"Content-Type: " + header.encode("ascii") + b"\r\n\r\n"

    assert isinstance(is_delivery_report(message), bool)
