"""TLS both ways: STARTTLS for mailers, smtps and STARTTLS to the upstream."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme
from aiosmtpd.smtp import SMTP

from relay.app import Relay
from tests.conftest import ACCOUNT, PASSWORD, StartRelay, message
from tests.support.upstream import CaptureUpstream, _Handler


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throw-away certificate authority."""
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """A certificate and key for 127.0.0.1, as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "relay.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


async def test_starttls_then_auth_then_relay(
    start_relay: StartRelay,
    upstream: CaptureUpstream,
    cert_files: tuple[str, str],
    ca: trustme.CA,
) -> None:
    cert, key = cert_files
    relay = await start_relay(
        {
            "server": {
                "tls_cert_file": cert,
                "tls_key_file": key,
                "allow_cleartext_auth": False,
            }
        }
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.smtp.port,
        start_tls=False,
        tls_context=context,
        timeout=10,
    )
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("starttls")
    assert not smtp.supports_extension("auth")  # not before TLS
    await smtp.starttls()
    await smtp.ehlo()
    assert smtp.supports_extension("auth")
    await smtp.login(ACCOUNT, PASSWORD)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    await smtp.quit()
    (got,) = await upstream.wait_for(1)
    assert b"with ESMTPSA id" in got.content


async def test_require_tls_refuses_mail_before_starttls(
    start_relay: StartRelay, cert_files: tuple[str, str]
) -> None:
    cert, key = cert_files
    relay = await start_relay(
        {"server": {"tls_cert_file": cert, "tls_key_file": key, "require_tls": True}}
    )
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp.port, start_tls=False, timeout=10
    )
    await smtp.connect()
    await smtp.ehlo()
    response = await smtp.execute_command(b"MAIL", b"FROM:<news@acme.example>")
    assert response.code == 530
    assert response.message.startswith("5.7.0")
    smtp.close()


class _TlsUpstream:
    """A capture upstream that speaks implicit TLS (smtps) or STARTTLS."""

    def __init__(self, capture: CaptureUpstream, context: ssl.SSLContext) -> None:
        self.capture = capture
        self.context = context
        self.server: asyncio.AbstractServer | None = None

    async def start(self, implicit: bool) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(
                _Handler(self.capture),
                hostname="upstream.test",
                tls_context=None if implicit else self.context,
                loop=loop,
            ),
            host="127.0.0.1",
            port=0,
            ssl=self.context if implicit else None,
        )
        return int(self.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def tls_upstream(
    ca: trustme.CA, upstream: CaptureUpstream
) -> AsyncIterator[_TlsUpstream]:
    """A TLS-speaking upstream that records into the ``upstream`` capture."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = _TlsUpstream(upstream, context)
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("scheme", "implicit"), [("smtps", True), ("smtp+starttls", False)]
)
async def test_upstream_over_tls(
    start_relay: StartRelay,
    upstream: CaptureUpstream,
    tls_upstream: _TlsUpstream,
    relay_client_message: bytes,
    scheme: str,
    implicit: bool,
) -> None:
    port = await tls_upstream.start(implicit)
    relay: Relay = await start_relay(
        {"upstream": {"url": f"{scheme}://127.0.0.1:{port}", "tls_verify": False}}
    )
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.smtp.port, timeout=10)
    await smtp.connect()
    await smtp.login(ACCOUNT, PASSWORD)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], relay_client_message)
    await smtp.quit()
    (got,) = await upstream.wait_for(1)
    assert got.content.endswith(relay_client_message)


@pytest.fixture
def relay_client_message() -> bytes:
    """The message the TLS upstream tests send."""
    return message(subject="over TLS")
