"""The real ``relay serve`` process: kill -9 after a 250, SIGTERM drain, CLI errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ACCOUNT, PASSWORD, PASSWORD_HASH, message
from tests.support.smtp import RawClient
from tests.support.upstream import CaptureUpstream

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(tmp: Path, smtp_port: int, http_port: int, upstream_port: int) -> Path:
    """A relay.toml for a subprocess relay on fixed loopback ports."""
    path = tmp / "relay.toml"
    path.write_text(
        f"""
[server]
hostname = "relay.test"
listen = "127.0.0.1:{smtp_port}"
allow_cleartext_auth = true
shutdown_grace = "10s"
[http]
listen = "127.0.0.1:{http_port}"
[storage]
url = "sqlite:///{tmp}/relay.db"
min_free_space = 0
[upstream]
url = "smtp://127.0.0.1:{upstream_port}"
pool_size = 2
connect_timeout = "2s"
[queue]
retry_schedule = ["200ms"]
retry_jitter = 0
poll_interval = "100ms"
[log]
level = "info"
format = "json"
[accounts.{ACCOUNT}]
password_hash = "{PASSWORD_HASH}"
""",
        encoding="utf-8",
    )
    return path


class RelayProcess:
    """``python -m relay serve`` as a child process."""

    def __init__(self, config: Path, http_port: int, smtp_port: int) -> None:
        self.config = config
        self.http_port = http_port
        self.smtp_port = smtp_port
        self.log = config.parent / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start and wait (bounded) until /readyz says ready."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    async with http.get(
                        f"http://127.0.0.1:{self.http_port}/readyz"
                    ) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("relay did not become ready:\n" + self.log.read_text())

    async def ready(self) -> bool:
        """What /readyz says now."""
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            return r.status == 200

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait (bounded) for the child to exit; return its exit code."""
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop(self) -> None:
        """Kill the child if it still runs (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_lines(self) -> list[dict[str, object]]:
        """The JSON log lines written so far."""
        return [
            json.loads(raw)
            for raw in self.log.read_text().splitlines()
            if raw.startswith("{")
        ]


@pytest.fixture
def ports() -> tuple[int, int, int]:
    """SMTP, HTTP and upstream ports for one test."""
    return free_port(), free_port(), free_port()


async def _submit(smtp_port: int) -> str:
    client = await RawClient.connect("127.0.0.1", smtp_port)
    assert (await client.login(ACCOUNT, PASSWORD)).startswith("235")
    assert (await client.cmd("MAIL FROM:<news@acme.example>")).startswith("250")
    assert (await client.cmd("RCPT TO:<jane@example.org>")).startswith("250")
    reply = await client.send_data(message() + b".\r\n")
    await client.close()
    return reply


async def test_message_survives_kill_9_right_after_250(
    tmp_path: Path, ports: tuple[int, int, int]
) -> None:
    smtp_port, http_port, upstream_port = ports
    config = write_config(tmp_path, smtp_port, http_port, upstream_port)
    relay = RelayProcess(config, http_port, smtp_port)
    await relay.start()
    try:
        reply = await _submit(smtp_port)
        relay.signal(signal.SIGKILL)
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        assert await relay.wait() == -signal.SIGKILL
        upstream = CaptureUpstream(port=upstream_port)
        await upstream.start()
        try:
            await relay.start()
            (got,) = await upstream.wait_for(1, timeout=15)
            assert got.rcpt_tos == ["jane@example.org"]
            assert reply.rsplit(" ", 1)[1].encode() in got.content
        finally:
            await upstream.stop()
    finally:
        relay.stop()


async def test_sigterm_drains_in_flight_transaction_and_refuses_new_ones(
    tmp_path: Path, ports: tuple[int, int, int]
) -> None:
    smtp_port, http_port, upstream_port = ports
    upstream = CaptureUpstream(port=upstream_port)
    await upstream.start()
    config = write_config(tmp_path, smtp_port, http_port, upstream_port)
    relay = RelayProcess(config, http_port, smtp_port)
    await relay.start()
    busy = await RawClient.connect("127.0.0.1", smtp_port)
    idle = await RawClient.connect("127.0.0.1", smtp_port)
    try:
        assert (await busy.login(ACCOUNT, PASSWORD)).startswith("235")
        assert (await idle.login(ACCOUNT, PASSWORD)).startswith("235")
        assert (await busy.cmd("MAIL FROM:<news@acme.example>")).startswith("250")
        assert (await busy.cmd("RCPT TO:<jane@example.org>")).startswith("250")
        assert (await busy.cmd("DATA")).startswith("354")
        busy.writer.write(message()[:40])  # half a message
        await busy.writer.drain()

        relay.signal(signal.SIGTERM)
        for _ in range(100):  # bounded: until the relay reports not ready
            if not await relay.ready():
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("relay stayed ready after SIGTERM")

        # A new transaction on an existing session is turned away...
        refused = await idle.cmd("MAIL FROM:<news@acme.example>")
        assert refused.startswith("421 4.3.2"), refused
        # ...and new connections are not accepted at all.
        with pytest.raises(ConnectionRefusedError):
            await RawClient.connect("127.0.0.1", smtp_port)
        # The transaction in flight finishes and is queued durably.
        busy.writer.write(message()[40:] + b".\r\n")
        await busy.writer.drain()
        accepted = await busy.reply()
        assert accepted.startswith("250 2.0.0"), accepted
        assert await relay.wait() == 0
        queue_id = accepted.rsplit(" ", 1)[1]
        delivered = [m for m in upstream.messages if queue_id.encode() in m.content]
        if not delivered:  # not lost: still queued for the next start
            listed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "queue",
                    "list",
                    "--json",
                    "-c",
                    str(config),
                ],
                capture_output=True,
                check=True,
                text=True,
            ).stdout
            assert queue_id in listed
        events = [line["event"] for line in relay.log_lines()]
        assert "relay_draining" in events and events[-1] == "relay_stopped"
    finally:
        await busy.close()
        await idle.close()
        relay.stop()
        await upstream.stop()


def test_check_config_reports_every_error_with_its_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[server]\nlisten = "nowhere"\nidle_timeout = "5 fortnights"\nbogus = 1\n'
        '[upstream]\nurl = "ftp://x"\n[accounts.acme]\npassword_hash = "plain"\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "-c", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    for path in (
        "server.listen",
        "server.idle_timeout",
        "server.bogus",
        "upstream.url",
        "accounts.acme.password_hash",
    ):
        assert path in result.stderr, result.stderr
    assert "unknown key" in result.stderr


def test_serve_refuses_to_start_on_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[queue]\nmax_lifetime = "forever"\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={**os.environ},
    )
    assert result.returncode == 2
    assert "queue.max_lifetime" in result.stderr


async def test_json_logs_have_one_line_per_transaction_and_attempt_without_secrets(
    tmp_path: Path, ports: tuple[int, int, int]
) -> None:
    smtp_port, http_port, upstream_port = ports
    upstream = CaptureUpstream(port=upstream_port)
    await upstream.start()
    relay = RelayProcess(
        write_config(tmp_path, smtp_port, http_port, upstream_port),
        http_port,
        smtp_port,
    )
    await relay.start()
    try:
        reply = await _submit(smtp_port)
        await upstream.wait_for(1)
        relay.signal(signal.SIGINT)  # SIGINT drains like SIGTERM
        assert await relay.wait() == 0
    finally:
        relay.stop()
        await upstream.stop()
    queue_id = reply.rsplit(" ", 1)[1]
    lines = relay.log_lines()
    (txn,) = [line for line in lines if line["event"] == "transaction_completed"]
    assert txn["queue_id"] == queue_id
    assert txn["account"] == ACCOUNT
    assert txn["peer_ip"] == "127.0.0.1"
    assert txn["rcpt_count"] == 1
    assert txn["outcome"] == "accepted"
    assert txn["smtp_code"] == 250
    assert isinstance(txn["size_bytes"], int)
    assert isinstance(txn["session_id"], str)
    (attempt,) = [line for line in lines if line["event"] == "delivery_attempted"]
    assert attempt["queue_id"] == queue_id
    assert attempt["outcome"] == "delivered"
    text = relay.log.read_text()
    assert PASSWORD not in text
    assert "this is a test" not in text  # the body
    assert "jane@example.org" not in text  # full addresses only at debug
