"""End to end: a mailer logs in, the message reaches the upstream unchanged."""

from __future__ import annotations

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import ACCOUNT, PASSWORD, client, message, strip_received
from tests.support.upstream import CaptureUpstream


async def test_message_reaches_upstream_byte_identical_apart_from_received(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    body = message(body="Line one\r\n.leading dot survives\r\n\r\nend\r\n")
    smtp = await client(relay_server)
    errors, reply = await smtp.sendmail(
        "news@acme.example", ["jane@example.org", "joe@Example.ORG"], body
    )
    await smtp.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    (got,) = await upstream.wait_for(1)
    assert got.mail_from == "news@acme.example"
    assert got.rcpt_tos == ["jane@example.org", "joe@example.org"]
    assert got.content.startswith(b"Received: from ")
    queue_id = reply.rsplit(" ", 1)[1]
    received, rest = strip_received(got.content)
    assert f"by relay.test with ESMTPA id {queue_id};".encode() in received
    # Everything after the Received header is exactly what the mailer sent.
    assert rest == body


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_mechanisms_accept_valid_credentials(
    relay_server: Relay, mechanism: str
) -> None:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay_server.smtp.port, timeout=10
    )
    await smtp.connect()
    method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    response = await method(ACCOUNT, PASSWORD)
    assert response.code == 235
    await smtp.quit()


async def test_wrong_password_is_refused(relay_server: Relay) -> None:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay_server.smtp.port, timeout=10
    )
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
        await smtp.login(ACCOUNT, "wrong")
    assert info.value.code == 535
    assert info.value.message.startswith("5.7.8")
    await smtp.quit()
