"""What operators use: /metrics, /healthz, /readyz, `relay queue`, upstream AUTH."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from aiosmtpd.smtp import AuthResult, LoginPassword
from click.testing import CliRunner

from config import parse_config
from relay.app import Relay
from relay.cli import main
from storage.base import EventKind
from tests.conftest import StartRelay, client, config_dict, message
from tests.support.smtp import RawClient
from tests.support.upstream import CaptureUpstream


async def _get(relay: Relay, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{relay.http.port}{path}"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def test_metrics_count_sessions_messages_and_deliveries(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    smtp = await client(relay_server)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    await smtp.quit()
    await upstream.wait_for(1)
    status, text = await _get(relay_server, "/metrics")
    assert status == 200
    assert 'relay_messages_received_total{account="acme"} 1.0' in text
    assert 'relay_recipients_accepted_total{account="acme"} 1.0' in text
    assert 'relay_auth_attempts_total{result="success"} 1.0' in text
    assert "relay_accept_duration_seconds_count 1.0" in text
    assert 'relay_build_info{version="0.1.0"} 1.0' in text
    assert "relay_queue_oldest_message_age_seconds" in text
    assert 'relay_smtp_sessions_total{result="completed"} 1.0' in text


async def test_queue_gauges_show_waiting_messages(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    await upstream.stop()
    relay = await start_relay({"queue": {"retry_schedule": ["1h"]}})
    smtp = await client(relay)
    await smtp.sendmail(
        "news@acme.example", ["a@example.org", "b@example.org"], message()
    )
    await smtp.quit()
    _, text = await _get(relay, "/metrics")
    assert "relay_queue_recipients 2.0" in text
    queued = [
        line for line in text.splitlines() if line.startswith("relay_queue_messages{")
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in queued) == 1.0


async def test_health_and_readiness(relay_server: Relay) -> None:
    assert (await _get(relay_server, "/healthz"))[0] == 200
    status, body = await _get(relay_server, "/readyz")
    assert (status, json.loads(body)["status"]) == (200, "ready")
    relay_server.ready = False  # as during a drain
    assert (await _get(relay_server, "/readyz"))[0] == 503


async def test_queue_cli_lists_retries_and_deletes(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    port = upstream.port
    await upstream.stop()
    relay = await start_relay({"queue": {"retry_schedule": ["1h"]}})
    smtp = await client(relay)
    _, reply1 = await smtp.sendmail("news@acme.example", ["a@example.org"], message())
    _, reply2 = await smtp.sendmail("news@acme.example", ["b@example.org"], message())
    await smtp.quit()
    first, second = reply1.rsplit(" ", 1)[1], reply2.rsplit(" ", 1)[1]
    async with asyncio.timeout(10):  # until both first attempts are recorded
        while any(m.attempts == 0 for m in await relay.store.list_messages()):
            await asyncio.sleep(0.02)
    toml = tmp_path / "cli.toml"
    toml.write_text(
        f'[storage]\nurl = "sqlite:///{relay.config.storage.sqlite_path}"\n',
        encoding="utf-8",
    )
    runner = CliRunner()

    def cli(*args: str):  # type: ignore[no-untyped-def]
        # The CLI runs its own event loop: call it from a thread.
        return asyncio.to_thread(runner.invoke, main, [*args, "-c", str(toml)])

    listed = await cli("queue", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert {row["queue_id"] for row in rows} == {first, second}
    assert all(row["attempts"] >= 1 and row["last_error"] for row in rows)

    table = await cli("queue", "list")
    assert first in table.output and "2 message(s)" in table.output

    deleted = await cli("queue", "delete", second)
    assert deleted.exit_code == 0
    assert (await cli("queue", "delete", second)).exit_code == 1

    revived = CaptureUpstream(port=port)
    await revived.start()
    try:
        retried = await cli("queue", "retry", first)
        assert retried.exit_code == 0, retried.output
        (got,) = await revived.wait_for(1)
        assert got.rcpt_tos == ["a@example.org"]
    finally:
        await revived.stop()
    assert (await cli("queue", "retry", "NOSUCHID")).exit_code == 1


async def test_upstream_auth_is_used_when_configured(start_relay: StartRelay) -> None:
    seen: list[tuple[bytes, bytes]] = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        seen.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"up-secret")

    upstream = CaptureUpstream(authenticator=authenticator)
    await upstream.start()
    try:
        relay = await start_relay(
            {
                "upstream": {
                    "url": upstream.url,
                    "username": "relay",
                    "password": "up-secret",
                }
            }
        )
        smtp = await client(relay)
        await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
        await smtp.quit()
        await upstream.wait_for(1)
        assert seen == [(b"relay", b"up-secret")]
    finally:
        await upstream.stop()


async def test_no_dsn_when_disabled(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    upstream.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    relay = await start_relay({"queue": {"send_dsn": False}})
    smtp = await client(relay)
    await smtp.sendmail("news@acme.example", ["gone@example.org"], message())
    await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    await smtp.quit()
    await upstream.wait_for(1)
    async with asyncio.timeout(10):
        while not await relay.store.events(EventKind.BOUNCE):
            await asyncio.sleep(0.02)
    (event,) = await relay.store.events(EventKind.BOUNCE)
    assert event.recipient == "gone@example.org"
    async with asyncio.timeout(10):  # the delivered message's result commits too
        while await relay.store.list_messages():
            await asyncio.sleep(0.02)
    assert relay.metrics.registry.get_sample_value("relay_dsn_generated_total") == 0
    assert upstream.to("news@acme.example") == []  # no DSN came back


async def test_a_dead_delivery_task_stops_the_relay_instead_of_queueing_forever(
    tmp_path: Path, upstream: CaptureUpstream
) -> None:
    relay = Relay(parse_config(config_dict(tmp_path / "relay.db", upstream.url)))

    async def broken_worker(number: int) -> None:
        raise RuntimeError("worker bug")

    relay.delivery.run_worker = broken_worker  # type: ignore[method-assign]
    await relay.start()
    try:
        async with asyncio.timeout(10):
            await relay.stop_requested.wait()
        assert relay.failed
        assert not relay.ready
    finally:
        await relay.shutdown()


async def test_protocol_refusals_are_counted(start_relay: StartRelay) -> None:
    relay = await start_relay({"server": {"allow_cleartext_auth": False}})
    raw = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        await raw.cmd("EHLO raw.test")
        assert (await raw.cmd("AUTH PLAIN AGFjbWUAeA==")).startswith("538 5.7.11")
        assert (await raw.cmd("BOGUS")).startswith("500 5.5.1")
        assert (await raw.cmd("RCPT TO:<a@example.org>")).startswith("503 5.5.1")
    finally:
        await raw.close()
    sample = relay.metrics.registry.get_sample_value
    for reason in ("auth_needs_tls", "unknown_command", "bad_sequence"):
        assert sample("relay_smtp_protocol_errors_total", {"reason": reason}) == 1
