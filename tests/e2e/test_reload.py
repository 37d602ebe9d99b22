"""Reloading relay.toml (SIGHUP, relay reload) while the relay runs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import ACCOUNT, PASSWORD, StartRelay, client, config_dict, merge
from tests.conftest import message as make_message
from tests.e2e.test_process import RelayProcess, free_port, write_config
from tests.support.smtp import RawClient
from tests.support.toml import write
from tests.support.upstream import CaptureUpstream

OLD = date(2024, 1, 15)


def document(
    tmp_path: Path, upstream: CaptureUpstream, **overrides: Any
) -> dict[str, Any]:
    """The test relay.toml as a dict, with ``overrides`` merged in."""
    return merge(config_dict(tmp_path / "relay.db", upstream.url), overrides)


def sample(relay: Relay, name: str, labels: dict[str, str]) -> float:
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


async def rcpt_replies(relay: Relay, count: int) -> list[str]:
    """Open one session and send ``count`` RCPTs; their replies."""
    conn = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await conn.login(ACCOUNT, PASSWORD)).startswith("235")
        assert (await conn.cmd("MAIL FROM:<news@acme.example>")).startswith("250")
        return [await conn.cmd(f"RCPT TO:<r{i}@example.org>") for i in range(count)]
    finally:
        await conn.close()


async def test_a_reload_applies_new_limits_to_the_next_transaction(
    tmp_path: Path, start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay()
    path = write(tmp_path / "relay.toml", document(tmp_path, upstream))
    assert all(r.startswith("250") for r in await rcpt_replies(relay, 4))
    # A session open across the reload is not dropped.
    smtp = await client(relay)
    overrides = {"accounts": {ACCOUNT: {"rate": "2/h"}}}
    write(path, document(tmp_path, upstream, **overrides))
    assert await relay.reload(path)
    replies = await rcpt_replies(relay, 3)
    assert [r[:3] for r in replies] == ["250", "250", "451"]
    assert "4.7.1" in replies[2] and "2/h" in replies[2]
    await smtp.noop()  # still connected
    await smtp.quit()
    assert sample(relay, "relay_config_reloads_total", {"result": "applied"}) == 1


async def test_a_reload_changes_the_policies(
    tmp_path: Path, start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay()
    path = tmp_path / "relay.toml"
    foreign = make_message(sender="news@elsewhere.example")
    smtp = await client(relay)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], foreign)
    await smtp.quit()
    policies = {"order": ["sender_domains"], "workers": 0}
    accounts = {ACCOUNT: {"domains": {"acme.example": OLD}}}
    write(path, document(tmp_path, upstream, policies=policies, accounts=accounts))
    assert await relay.reload(path)
    smtp = await client(relay)
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await smtp.sendmail("news@acme.example", ["jane@example.org"], foreign)
    await smtp.quit()
    assert info.value.code == 550
    assert "sender_domains" in info.value.message


async def test_an_unusable_file_is_refused_and_the_running_config_stays(
    tmp_path: Path, start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay({"accounts": {ACCOUNT: {"rate": "2/h"}}})
    path = tmp_path / "relay.toml"
    bad = document(tmp_path, upstream, thresholds={"min_volume": -1})
    write(path, bad)
    assert not await relay.reload(path)
    path.write_text("this is [not toml", encoding="utf-8")
    assert not await relay.reload(path)
    unknown_policy = document(tmp_path, upstream, policies={"order": ["nope"]})
    write(path, unknown_policy)
    assert not await relay.reload(path)
    assert sample(relay, "relay_config_reloads_total", {"result": "refused"}) == 3
    # The running limit still holds.
    replies = await rcpt_replies(relay, 3)
    assert [r[:3] for r in replies] == ["250", "250", "451"]


async def test_a_reload_starts_new_policy_workers_and_ends_the_old(
    tmp_path: Path, start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    policies = {"order": ["header_sanity"], "workers": 1}
    relay = await start_relay({"policies": policies})
    assert relay.policy_workers is not None
    old = relay.policy_workers.pids
    path = write(
        tmp_path / "relay.toml", document(tmp_path, upstream, policies=policies)
    )
    assert await relay.reload(path)
    assert relay.policy_workers is not None
    new = relay.policy_workers.pids
    assert new and not set(new) & set(old)
    for pid in old:  # the old worker ended (bounded wait)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"old policy worker {pid} still running")
    smtp = await client(relay)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], make_message())
    await smtp.quit()


@pytest.fixture
def ports() -> tuple[int, int, int]:
    """SMTP, HTTP and upstream ports for one test."""
    return free_port(), free_port(), free_port()


async def test_relay_reload_signals_the_running_relay(
    tmp_path: Path, ports: tuple[int, int, int]
) -> None:
    smtp_port, http_port, upstream_port = ports
    config = write_config(tmp_path, smtp_port, http_port, upstream_port)
    process = RelayProcess(config, http_port, smtp_port)
    await process.start()
    try:
        text = config.read_text(encoding="utf-8")
        config.write_text(text + 'rate = "2/h"\n', encoding="utf-8")
        done = run_cli("reload", "-c", str(config))
        assert done.returncode == 0, done.stderr
        assert "asked to reload" in done.stdout
        await wait_for_event(process, "config_reloaded")
        # An unusable file: reported by the CLI (exit 2), the relay not disturbed.
        config.write_text(text + "rate = 5\n", encoding="utf-8")
        done = run_cli("reload", "-c", str(config))
        assert done.returncode == 2
        assert "accounts.acme.rate" in done.stderr
        # The same through SIGHUP: the relay refuses it and keeps running.
        process.signal(signal.SIGHUP)
        await wait_for_event(process, "reload_refused")
        assert await process.ready()
        process.signal(signal.SIGTERM)
        assert await process.wait() == 0
        # No relay running: exit 1.
        done = run_cli("reload", "-c", str(config.with_name("ok.toml")))
        assert done.returncode in (1, 2)
        config.write_text(text, encoding="utf-8")
        done = run_cli("reload", "-c", str(config))
        assert done.returncode == 1
        assert "no running relay" in done.stderr
    finally:
        process.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def wait_for_event(process: RelayProcess, event: str) -> None:
    for _ in range(200):
        if any(line.get("event") == event for line in process.log_lines()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} in the log:\n{process.log.read_text()}")
