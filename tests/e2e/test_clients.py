"""Real mail clients (swaks, msmtp) hand mail to the relay as an operator's would."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from relay.app import Relay
from tests.conftest import ACCOUNT, PASSWORD
from tests.support.upstream import CaptureUpstream


async def _run(*argv: str, stdin: bytes = b"") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate(stdin)
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_sends_through_the_relay(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    code, out = await _run(
        "swaks",
        "--server",
        f"127.0.0.1:{relay_server.smtp.port}",
        "--auth",
        "PLAIN",
        "--auth-user",
        ACCOUNT,
        "--auth-password",
        PASSWORD,
        "--from",
        "news@acme.example",
        "--to",
        "jane@example.org",
        "--header",
        "Subject: from swaks",
    )
    assert code == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["jane@example.org"]
    assert b"Subject: from swaks" in got.content


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
async def test_swaks_with_wrong_password_is_refused(relay_server: Relay) -> None:
    code, out = await _run(
        "swaks",
        "--server",
        f"127.0.0.1:{relay_server.smtp.port}",
        "--auth",
        "LOGIN",
        "--auth-user",
        ACCOUNT,
        "--auth-password",
        "nope",
        "--from",
        "news@acme.example",
        "--to",
        "jane@example.org",
    )
    assert code != 0
    assert "535 5.7.8" in out


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed")
async def test_msmtp_sends_through_the_relay(
    relay_server: Relay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "account relay\nhost 127.0.0.1\n"
        f"port {relay_server.smtp.port}\nauth plain\nuser {ACCOUNT}\n"
        f"password {PASSWORD}\ntls off\nfrom news@acme.example\n"
        "account default : relay\n",
        encoding="utf-8",
    )
    rc.chmod(0o600)
    # msmtp takes a message with LF line endings and sends CRLF, as mailers do.
    message = (
        b"From: news@acme.example\nTo: jane@example.org\nSubject: via msmtp\n\nhi\n"
    )
    code, out = await _run("msmtp", "-C", str(rc), "jane@example.org", stdin=message)
    assert code == 0, out
    (got,) = await upstream.wait_for(1)
    assert got.mail_from == "news@acme.example"
    assert got.content.endswith(b"Subject: via msmtp\r\n\r\nhi\r\n")
