"""Shared fixtures: a capture upstream and the relay itself, both on loopback."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from config import RelayConfig, parse_config
from relay.app import Relay
from relay.auth import hash_password
from storage.sqlite import SqliteStore
from tests.support.upstream import CaptureUpstream

ACCOUNT = "acme"
PASSWORD = "correct horse battery"
PASSWORD_HASH = hash_password(PASSWORD)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def config_dict(db_path: Path, upstream_url: str) -> dict[str, Any]:
    """A relay.toml as a dict: loopback, port 0, fast retries, one account."""
    return {
        "server": {
            "hostname": "relay.test",
            "listen": "127.0.0.1:0",
            "allow_cleartext_auth": True,
            "shutdown_grace": "5s",
            "max_recipients": 5,
            "max_message_size": "64KiB",
        },
        "http": {"listen": "127.0.0.1:0"},
        "storage": {"url": f"sqlite:///{db_path}", "min_free_space": 0},
        "upstream": {
            "url": upstream_url,
            "pool_size": 2,
            "connect_timeout": "2s",
            "command_timeout": "5s",
        },
        "queue": {
            "retry_schedule": ["200ms"],
            "retry_jitter": 0,
            "poll_interval": "50ms",
            "max_lifetime": "1h",
        },
        "accounts": {ACCOUNT: {"password_hash": PASSWORD_HASH}},
        # In process, so that a test's clock reaches the checks; the worker
        # processes have tests of their own.
        "policies": {"workers": 0},
    }


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store in a fresh file, closed after the test."""
    opened = SqliteStore(tmp_path / "relay.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def upstream() -> AsyncIterator[CaptureUpstream]:
    """A capture upstream on a free loopback port."""
    server = CaptureUpstream()
    await server.start()
    yield server
    await server.stop()


StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(
    tmp_path: Path, upstream: CaptureUpstream
) -> AsyncIterator[StartRelay]:
    """Start relays as in production (in this process); all stop at teardown."""
    started: list[Relay] = []

    async def start(overrides: dict[str, Any] | None = None) -> Relay:
        raw = merge(config_dict(tmp_path / "relay.db", upstream.url), overrides or {})
        config: RelayConfig = parse_config(raw)
        relay = Relay(config)
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.shutdown()


@pytest.fixture
async def relay_server(start_relay: StartRelay) -> Relay:
    """A running relay with the default test configuration."""
    return await start_relay()


async def client(relay: Relay, *, login: bool = True) -> aiosmtplib.SMTP:
    """An aiosmtplib client connected (and logged in) to ``relay``."""
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp.port, start_tls=False, timeout=10
    )
    await smtp.connect()
    if login:
        await smtp.login(ACCOUNT, PASSWORD)
    return smtp


def message(
    sender: str = "news@acme.example",
    to: str = "jane@example.org",
    subject: str = "Hello",
    body: str = "Hello Jane,\r\nthis is a test.\r\n",
    extra_headers: str = "",
) -> bytes:
    """A small, well-formed RFC 5322 message with CRLF line endings."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <test-{abs(hash(body))}@acme.example>\r\n{extra_headers}\r\n{body}"
    ).encode()


def strip_received(content: bytes) -> tuple[bytes, bytes]:
    """Split off the relay's leading Received header (with its folded lines)."""
    assert content.startswith(b"Received: ")
    end = 0
    while True:
        end = content.index(b"\r\n", end) + 2
        if content[end : end + 1] not in (b" ", b"\t"):
            return content[:end], content[end:]
