"""Account reputation end to end: real SMTP through the running relay, the real
SQLite store, the real HTTP listener and the ``relay`` command in its own process.

Thresholds, suspension and reinstatement, throttling, per-account rates, one-click
unsubscribes, the mailer's events, complaints, spamtraps, restarts and the relay's
own DSNs. Every wait is a bounded loop; nothing here measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import pytest

from policies.reputation import Totals, hour_of
from relay.app import Relay
from relay.list_unsubscribe import UNSUBSCRIBE
from relay.tokens import TokenSigner
from storage.base import (
    AccountState,
    CounterBucket,
    EventKind,
    Suppression,
    SuppressionReason,
)
from storage.sqlite import SqliteStore
from tests.conftest import (
    ACCOUNT,
    PASSWORD,
    PASSWORD_HASH,
    StartRelay,
    client,
    config_dict,
    merge,
    message,
)
from tests.support.smtp import RawClient
from tests.support.toml import write
from tests.support.upstream import CaptureUpstream

REPO = Path(__file__).resolve().parents[2]
OTHER = "globex"
"""A second account, to show what one account does stays its own."""
TOKEN = "reputation-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "a-feedback-secret-of-at-least-32-characters"
SENDER = "news@acme.example"
GONE = "gone@example.org"
USER_UNKNOWN = "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"
TRAP = "trap@example.net"
LINK_BODY = (
    "Our autumn collection is here.\r\n\r\n"
    "Unsubscribe: https://acme.example/unsubscribe?u=42\r\n"
)
_REPLY = re.compile(r"(?P<code>\d{3}) (?P<status>\d\.\d{1,3}\.\d{1,3}) (?P<text>.*)")
_REF_SUFFIX = re.compile(r" \[ref [0-9a-f]{8}\]$")


# -- set-up ----------------------------------------------------------------------


def settings(**sections: Any) -> dict[str, Any]:
    """Overrides: the admin API on, a second account, plus ``sections``."""
    base: dict[str, Any] = {
        "http": {"admin_token": TOKEN},
        "accounts": {OTHER: {"password_hash": PASSWORD_HASH}},
    }
    return merge(base, sections)


def marketing_settings() -> dict[str, Any]:
    """The relay adds its own signed List-Unsubscribe to acme's marketing mail;
    the exclusion list is enforced at RCPT (acme's mail is marketing by default)."""
    return settings(
        policies={"order": ["exclusion", "optout_link"]},
        accounts={ACCOUNT: {"default_category": "marketing"}},
        feedback={"secret": SECRET},
        http={"public_url": "https://relay.example"},
    )


def write_toml(tmp_path: Path, upstream: CaptureUpstream, overrides: Any) -> Path:
    """The relay.toml of a relay started with ``overrides``: the same store, the
    same accounts and thresholds (what an operator's CLI reads)."""
    document = merge(config_dict(tmp_path / "relay.db", upstream.url), overrides)
    return write(tmp_path / "relay.toml", document)


async def cli(toml: Path, *args: str) -> tuple[int, str, str]:
    """``relay ARGS -c TOML`` in its own process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        "-c",
        str(toml),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def seed_sent(db: Path, sent: dict[str, int]) -> None:
    """Add ``sent`` counts in the current hour, before the relay starts.

    Sending a thousand real messages to reach the complaint and unsubscribe
    volumes would take far longer than the rest of this file; the relay loads
    its counters from the store at start, exactly as after a restart.
    """
    store = SqliteStore(db)
    await store.open()
    try:
        hour = hour_of(datetime.now(UTC).timestamp())
        await store.add_counts(
            [CounterBucket(name, hour, EventKind.SENT, n) for name, n in sent.items()]
        )
    finally:
        await store.close()


# -- observing -------------------------------------------------------------------


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def totals(relay: Relay, account: str = ACCOUNT) -> Totals:
    """The running relay's window totals for ``account``."""
    return (await relay.accounts.status(account)).totals


async def settled(relay: Relay) -> bool:
    """Nothing queued and nothing in flight: every attempt committed and counted
    (a lease ends only after its attempt was counted)."""
    return relay.queue.in_flight == 0 and not await relay.store.list_messages()


def sample(relay: Relay, name: str, **labels: str) -> float:
    """A metric's value (0 when never set)."""
    return relay.metrics.registry.get_sample_value(name, labels) or 0.0


def state_metric(relay: Relay, account: str = ACCOUNT) -> dict[str, float]:
    """``relay_account_state{account}`` by state."""
    return {
        s.value: sample(relay, "relay_account_state", account=account, state=s.value)
        for s in AccountState
    }


def parse_reply(reply: str) -> tuple[int, str, str]:
    """(code, enhanced status, text); a failure's ``[ref …]`` must be there and
    is left out of the text."""
    found = _REPLY.fullmatch(reply)
    assert found is not None, reply
    code, text = int(found["code"]), found["text"]
    if code >= 400:
        assert _REF_SUFFIX.search(text), reply
        text = _REF_SUFFIX.sub("", text)
    return code, found["status"], text


async def api(
    relay: Relay, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One admin API call with the bearer token: status and JSON body."""
    url = f"http://127.0.0.1:{relay.http.port}{path}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, headers=AUTH, json=body) as response,
    ):
        return response.status, await response.json()


async def post_events(relay: Relay, events: list[dict[str, Any]]) -> tuple[int, Any]:
    return await api(relay, "POST", "/api/events", {"events": events})


# -- SMTP ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def session(relay: Relay, account: str = ACCOUNT) -> AsyncIterator[RawClient]:
    """A raw, logged-in SMTP session (replies read exactly as sent)."""
    raw = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await raw.login(account, PASSWORD)).startswith("235")
        yield raw
    finally:
        await raw.close()


async def mail_reply(relay: Relay, account: str = ACCOUNT) -> str:
    """The reply to MAIL FROM in a fresh session."""
    async with session(relay, account) as raw:
        return await raw.cmd(f"MAIL FROM:<{SENDER}>")


async def send_each(relay: Relay, recipients: list[str]) -> None:
    """One message per recipient, in one session; each must be accepted."""
    smtp = await client(relay)
    try:
        for rcpt in recipients:
            errors, reply = await smtp.sendmail(SENDER, [rcpt], message(to=rcpt))
            assert errors == {}, errors
            assert reply.startswith("2.0.0 Ok: queued as"), reply
    finally:
        await smtp.quit()


async def hit_trap(relay: Relay) -> str:
    """One transaction with the spamtrap among its recipients: the trap's reply."""
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        return await raw.cmd(f"RCPT TO:<{TRAP}>")


async def suspended_by_traps(relay: Relay) -> None:
    """Two spamtrap hits in two messages: acme is suspended (spamtrap_hits = 1)."""
    await relay.store.add_spamtraps([TRAP], "test", datetime.now(UTC))
    for _ in range(2):
        assert (await hit_trap(relay)).startswith("550 5.7.1 ")
    assert relay.accounts.state_of(ACCOUNT) is AccountState.SUSPENDED


async def stored_state(relay: Relay, account: str = ACCOUNT) -> AccountState | None:
    found = {s.account: s.state for s in await relay.store.account_standings()}
    return found.get(account)


# -- 1. bounces: suspension, hard-bounce exclusion, reinstatement ---------------


async def test_bounce_rate_breach_suspends_at_mail_until_the_cli_reinstates(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    upstream.rcpt_replies[GONE] = USER_UNKNOWN
    overrides = settings(thresholds={"min_volume": 10, "bounce_rate": "8%"})
    relay = await start_relay(overrides)
    toml = write_toml(tmp_path, upstream, overrides)
    recipients = [f"r{n}@example.org" for n in range(9)]
    recipients.insert(4, GONE)  # 1 in 10: 10% bounces

    await send_each(relay, recipients)

    async def all_sent() -> bool:
        return (await totals(relay)).sent >= 10

    await until(all_sent, "10 recipients sent")
    counted = await totals(relay)
    assert (counted.sent, counted.bounces) == (10, 1)
    reason = "account acme suspended: bounce rate 10.0% over 30d exceeds 8.0%"
    assert parse_reply(await mail_reply(relay)) == (550, "5.7.1", reason)
    assert state_metric(relay) == {
        "ok": 0,
        "warning": 0,
        "throttled": 0,
        "suspended": 1,
    }
    assert (
        sample(
            relay,
            "relay_messages_refused_total",
            account=ACCOUNT,
            policy="smtp",
            reason="account_suspended",
        )
        == 1
    )
    # The other account sends on.
    assert parse_reply(await mail_reply(relay, OTHER))[0] == 250

    # The address that does not exist is excluded for every account.
    async def hard_bounce_listed() -> bool:
        now = datetime.now(UTC)
        return bool(await relay.store.suppressions_for(GONE, OTHER, now))

    await until(hard_bounce_listed, "the hard-bounce exclusion")
    (entry,) = await relay.store.suppressions_for(GONE, OTHER, datetime.now(UTC))
    assert (entry.account, entry.reason) == (None, SuppressionReason.HARD_BOUNCE)
    others = [
        await relay.store.suppressions_for(rcpt, ACCOUNT, datetime.now(UTC))
        for rcpt in recipients
        if rcpt != GONE
    ]
    assert others == [[]] * 9

    async def suspension_stored() -> bool:
        return await stored_state(relay) is AccountState.SUSPENDED

    await until(suspension_stored, "the suspension stored")

    # An operator reinstates the account from another process.
    code, out, err = await cli(
        toml, "accounts", "reinstate", ACCOUNT, "--reason", "cleaned list"
    )
    assert code == 0, err
    assert re.fullmatch(
        r"account acme reinstated by operator .+: reinstated: cleaned list\n", out
    ), out

    async def reconciled() -> bool:
        return relay.accounts.state_of(ACCOUNT) is AccountState.OK

    await until(reconciled, "the running relay to read the reinstatement back")
    assert parse_reply(await mail_reply(relay)) == (250, "2.1.0", "Sender ok")
    assert state_metric(relay)["ok"] == 1
    assert state_metric(relay)["suspended"] == 0

    code, out, err = await cli(toml, "accounts", "status", ACCOUNT)
    assert code == 0, err
    lines = out.splitlines()
    assert re.fullmatch(
        r"account acme: ok since \d{4}-\d\d-\d\d \d\d:\d\d UTC \(by operator .+\)",
        lines[0],
    ), lines[0]
    assert lines[1] == "  reinstated: cleaned list"
    history = lines[lines.index("last changes:") + 1 :]
    assert len(history) == 2, history
    assert re.fullmatch(
        r"  \S+ \S+ suspended -> ok by operator .+: reinstated: cleaned list",
        history[0],
    ), history[0]
    assert history[1].endswith(f" ok -> suspended by relay: {reason}"), history[1]


async def test_api_reinstatement_applies_at_once_and_is_audited(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(settings())
    await suspended_by_traps(relay)
    reason = "account acme suspended: spamtrap hits 2 over 30d exceeds 1"
    assert parse_reply(await mail_reply(relay)) == (550, "5.7.1", reason)

    async def suspension_stored() -> bool:
        return await stored_state(relay) is AccountState.SUSPENDED

    await until(suspension_stored, "the suspension stored")

    status, body = await api(relay, "POST", f"/api/accounts/{ACCOUNT}/reinstate", {})
    assert (status, body) == (400, {"error": "reason is required: say why"})
    status, body = await api(
        relay, "POST", "/api/accounts/nobody/reinstate", {"reason": "x"}
    )
    assert (status, body) == (404, {"error": "unknown account 'nobody'"})
    assert relay.accounts.state_of(ACCOUNT) is AccountState.SUSPENDED

    status, body = await api(
        relay,
        "POST",
        f"/api/accounts/{ACCOUNT}/reinstate",
        {"reason": "trap list cleaned", "by": "alice"},
    )
    assert status == 200, body
    assert (body["state"], body["reason"], body["changed_by"]) == (
        "ok",
        "reinstated: trap list cleaned",
        "alice",
    )
    assert [(c["from"], c["to"], c["by"], c["reason"]) for c in body["changes"]] == [
        ("suspended", "ok", "alice", "reinstated: trap list cleaned"),
        ("warning", "suspended", "relay", reason),
        (
            "ok",
            "warning",
            "relay",
            "account acme warning: spamtrap hits 1 over 30d is within 1",
        ),
    ]
    # In this process: no wait for the reconcile loop.
    assert parse_reply(await mail_reply(relay))[0] == 250
    assert state_metric(relay)["ok"] == 1
    (audit, *_) = await relay.store.account_state_changes(ACCOUNT)
    assert (audit.old_state, audit.new_state, audit.changed_by, audit.reason) == (
        AccountState.SUSPENDED,
        AccountState.OK,
        "alice",
        "reinstated: trap list cleaned",
    )
    (standing,) = await relay.store.account_standings()
    assert standing.state is AccountState.OK
    assert standing.judged_from is not None


async def test_spamtrap_hits_right_after_a_reinstatement_still_count(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(settings())
    await suspended_by_traps(relay)
    hour = hour_of(datetime.now(UTC).timestamp())
    status, body = await api(
        relay, "POST", f"/api/accounts/{ACCOUNT}/reinstate", {"reason": "cleaned"}
    )
    assert (status, body["state"]) == (200, "ok")
    for _ in range(2):  # two more hits: above spamtrap_hits = 1 again
        assert (await hit_trap(relay)).startswith("550 5.7.1 ")
    if hour_of(datetime.now(UTC).timestamp()) != hour:
        pytest.skip("crossed an hour boundary: the hits fell in the next hour")
    assert len(await relay.store.events(EventKind.SPAMTRAP_HIT)) == 4
    assert (await totals(relay)).spamtrap_hits == 2
    assert relay.accounts.state_of(ACCOUNT) is AccountState.SUSPENDED


# -- 2. throttling ---------------------------------------------------------------


async def test_a_throttled_account_gets_its_throttle_rate_then_451(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        settings(
            policies={"order": ["exclusion"]},
            thresholds={"min_volume": 10, "throttle_rate": "3/h"},
        )
    )
    blocked = [f"bad{n}@example.org" for n in range(10)]
    now = datetime.now(UTC)
    await relay.store.add_suppressions(
        [
            Suppression(a, None, SuppressionReason.HARD_BOUNCE, "test", now)
            for a in blocked
        ]
    )
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        for rcpt in blocked:  # 10 blocks of 10 submitted: block rate 100%
            code, status, _ = parse_reply(await raw.cmd(f"RCPT TO:<{rcpt}>"))
            assert (code, status) == (550, "5.7.1")
        assert relay.accounts.state_of(ACCOUNT) is AccountState.THROTTLED
        for n in range(3):
            assert parse_reply(await raw.cmd(f"RCPT TO:<ok{n}@example.org>")) == (
                250,
                "2.1.5",
                "Recipient ok",
            )
        assert parse_reply(await raw.cmd("RCPT TO:<ok3@example.org>")) == (
            451,
            "4.7.1",
            "account acme throttled: block rate 100.0% over 30d exceeds 30.0%; "
            "sending limited to 3/h recipients",
        )
        # The three accepted recipients still go out.
        data = message(to="ok0@example.org")
        reply = await raw.send_data(data + b".\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["ok0@example.org", "ok1@example.org", "ok2@example.org"]
    assert state_metric(relay)["throttled"] == 1
    assert (
        sample(
            relay,
            "relay_recipients_refused_total",
            account=ACCOUNT,
            policy="smtp",
            reason="account_throttled",
        )
        == 1
    )
    # Throttled is no suspension, and the other account is untouched.
    assert parse_reply(await mail_reply(relay))[0] == 250
    async with session(relay, OTHER) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        for n in range(5):
            assert (await raw.cmd(f"RCPT TO:<g{n}@example.org>")).startswith("250")


# -- 3. an account's own rate ----------------------------------------------------


async def test_an_accounts_rate_limits_its_recipients_only(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(settings(accounts={ACCOUNT: {"rate": "5/h"}}))
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        for n in range(5):  # [server] max_recipients is 5 per transaction
            assert (await raw.cmd(f"RCPT TO:<r{n}@example.org>")).startswith("250")
        assert (await raw.cmd("RSET")).startswith("250")
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert parse_reply(await raw.cmd("RCPT TO:<r5@example.org>")) == (
            451,
            "4.7.1",
            "account acme reached its sending rate of 5/h recipients; try again later",
        )
    assert (
        sample(
            relay,
            "relay_recipients_refused_total",
            account=ACCOUNT,
            policy="smtp",
            reason="rate_limited",
        )
        == 1
    )
    # A rate limit is no change of state.
    assert relay.accounts.state_of(ACCOUNT) is AccountState.OK
    async with session(relay, OTHER) as raw:
        for _ in range(2):
            assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
            for n in range(5):
                reply = await raw.cmd(f"RCPT TO:<g{n}@example.org>")
                assert reply.startswith("250"), reply
            assert (await raw.cmd("RSET")).startswith("250")


async def test_recipients_refused_for_other_reasons_use_no_allowance(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    overrides = settings(
        policies={"order": ["exclusion"]},
        accounts={ACCOUNT: {"rate": "3/h", "default_category": "marketing"}},
    )
    relay = await start_relay(overrides)
    await relay.store.add_suppressions(
        [
            Suppression(
                address=f"x{n}@example.org",
                account=None,
                reason=SuppressionReason.MANUAL,
                source="test",
                created_at=datetime.now(UTC),
            )
            for n in range(2)
        ]
    )
    await relay.store.add_spamtraps([TRAP], "test", datetime.now(UTC))
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        for refused in ("x0@example.org", "x1@example.org", TRAP):
            reply = await raw.cmd(f"RCPT TO:<{refused}>")
            assert reply.startswith("550 5.7.1"), reply
        for n in range(3):
            assert (await raw.cmd(f"RCPT TO:<r{n}@example.org>")).startswith("250")
        assert parse_reply(await raw.cmd("RCPT TO:<r3@example.org>"))[:2] == (
            451,
            "4.7.1",
        )
    # A reload that leaves the rate alone leaves the allowance used up too.
    toml = write_toml(tmp_path, upstream, overrides)
    assert await relay.reload(toml)
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert parse_reply(await raw.cmd("RCPT TO:<r4@example.org>"))[:2] == (
            451,
            "4.7.1",
        )


# -- 4. one-click unsubscribe ----------------------------------------------------


async def _links(
    relay: Relay, upstream: CaptureUpstream, recipients: list[str]
) -> dict[str, str]:
    """Send one marketing message to ``recipients``; each one's unsubscribe URL
    on the relay's own HTTP listener."""
    smtp = await client(relay)
    try:
        errors, _ = await smtp.sendmail(SENDER, recipients, message(body=LINK_BODY))
    finally:
        await smtp.quit()
    assert errors == {}
    await upstream.wait_for(len(recipients))
    links = {}
    for rcpt in recipients:
        (got,) = upstream.to(rcpt)
        parsed = message_from_bytes(got.content, policy=policy.default)
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        public = urlsplit(str(parsed["List-Unsubscribe"]).strip("<>"))
        assert (public.scheme, public.netloc) == ("https", "relay.example")
        links[rcpt] = f"http://127.0.0.1:{relay.http.port}{public.path}"
    return links


async def _http(
    method: str, url: str, data: Any = None
) -> tuple[int, str, str, dict[str, str]]:
    """Status, content type, text and headers; redirects are not followed."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, data=data, allow_redirects=False) as response,
    ):
        text = await response.text()
        return response.status, response.content_type, text, dict(response.headers)


ONE_CLICK = {"List-Unsubscribe": "One-Click"}


async def _excluded(relay: Relay, address: str, account: str = ACCOUNT) -> list[Any]:
    return [
        (e.account, e.reason)
        for e in await relay.store.suppressions_for(address, account, datetime.now(UTC))
    ]


def _unsubscribes(relay: Relay) -> float:
    return sample(
        relay, "relay_feedback_events_total", account=ACCOUNT, kind="unsubscribe"
    )


async def test_one_click_unsubscribe_excludes_at_once_and_counts_once(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing_settings())
    jane, john = "jane@example.org", "john@example.org"
    links = await _links(relay, upstream, [jane, john])

    # The page (what a link scanner fetches) changes nothing.
    status, kind, text, headers = await _http("GET", links[jane])
    assert (status, kind) == (200, "text/html")
    assert '<form method="post">' in text
    assert '<input type="hidden" name="confirm" value="yes">' in text
    assert jane in text and ACCOUNT in text
    assert headers["Cache-Control"] == "no-store"
    assert await _excluded(relay, jane) == []
    assert _unsubscribes(relay) == 0

    status, kind, text, _ = await _http("POST", links[jane], ONE_CLICK)
    assert (status, kind, text) == (200, "text/plain", "unsubscribed\n")
    assert await _excluded(relay, jane) == [(ACCOUNT, SuppressionReason.UNSUBSCRIBE)]
    assert await _excluded(relay, jane, OTHER) == []  # acme's list only
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        code, status_code, text = parse_reply(await raw.cmd(f"RCPT TO:<{jane}>"))
        assert (code, status_code) == (550, "5.7.1")
        assert text.startswith(
            "Refused by policy exclusion: recipient is on the exclusion list "
            "(unsubscribe, for account acme, since"
        )
    assert _unsubscribes(relay) == 1

    # Providers retry: the same answer, counted once.
    status, _, text, _ = await _http("POST", links[jane], ONE_CLICK)
    assert (status, text) == (200, "unsubscribed\n")
    assert _unsubscribes(relay) == 1
    assert (
        sample(
            relay,
            "relay_feedback_received_total",
            channel="one_click",
            result="duplicate",
        )
        == 1
    )
    assert len(await relay.store.events(EventKind.UNSUBSCRIBE)) == 1

    # A forged MAC (one character of a genuine token changed) and a malformed
    # token change nothing.
    base, token = links[john].rsplit("/", 1)
    assert TokenSigner(SECRET).verify(UNSUBSCRIBE, token)[:2] == (ACCOUNT, john)
    payload, mac = token.split(".")
    forged = f"{base}/{payload}.{'B' if mac[0] == 'A' else 'A'}{mac[1:]}"
    for method, data in (("POST", ONE_CLICK), ("GET", None)):
        status, kind, text, _ = await _http(method, forged, data)
        assert (status, kind) == (404, "text/html"), method
        assert "not valid" in text
        status, _, _, _ = await _http(method, f"{base}/not-a-token", data)
        assert status == 400, method
    assert await _excluded(relay, john) == []
    assert (
        sample(
            relay,
            "relay_feedback_received_total",
            channel="one_click",
            result="invalid",
        )
        == 2
    )

    # The page's own form: the person adds another address of theirs.
    other = "john.private@example.org"
    status, kind, text, _ = await _http(
        "POST", links[john], {"confirm": "yes", "others": other}
    )
    assert (status, kind) == (200, "text/html")
    assert "Also excluded: 1 other address(es)." in text
    for address in (john, other):
        assert await _excluded(relay, address) == [
            (ACCOUNT, SuppressionReason.UNSUBSCRIBE)
        ], address
    assert _unsubscribes(relay) == 2  # john's own; the other address is no event


async def test_one_click_unsubscribe_sent_as_multipart_form_data(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(marketing_settings())
    jane = "jane@example.org"
    links = await _links(relay, upstream, [jane])
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("List-Unsubscribe", "One-Click")
    async with (
        aiohttp.ClientSession() as http,
        http.post(links[jane], data=form, allow_redirects=False) as response,
    ):
        sent_as = response.request_info.headers["Content-Type"]
        assert sent_as.startswith("multipart/form-data; boundary="), sent_as
        status, text = response.status, await response.text()
    assert (status, text) == (200, "unsubscribed\n")
    assert await _excluded(relay, jane) == [(ACCOUNT, SuppressionReason.UNSUBSCRIBE)]


# -- 5. the mailer's events ------------------------------------------------------


def _event(kind: str, account: str, n: int, prefix: str = "") -> dict[str, Any]:
    return {
        "kind": kind,
        "account": account,
        "recipient": f"{prefix or kind}{n}@example.org",
        "id": f"{kind}-{n}",
    }


async def test_events_are_recorded_once_all_or_nothing(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(settings())
    clicks = [_event("click", ACCOUNT, n) for n in range(3)]
    assert await post_events(relay, clicks) == (200, {"recorded": 3, "duplicates": 0})
    assert await post_events(relay, clicks) == (200, {"recorded": 0, "duplicates": 3})
    assert (
        sample(relay, "relay_feedback_events_total", account=ACCOUNT, kind="click") == 3
    )

    bad = [
        _event("click", ACCOUNT, 10),
        {**_event("click", ACCOUNT, 11), "recipient": "not an address"},
        _event("unsubscribe", ACCOUNT, 12),
        {**_event("click", ACCOUNT, 13), "id": ""},
    ]
    status, body = await post_events(relay, bad)
    assert status == 400
    assert body["error"] == "no event recorded: fix these"
    assert [p["index"] for p in body["problems"]] == [1, 3]
    assert body["problems"][1]["error"].startswith("id must be")
    unknown = [_event("click", ACCOUNT, 20), _event("click", "nobody", 21)]
    status, body = await post_events(relay, unknown)
    assert (status, body["problems"]) == (
        400,
        [{"index": 1, "error": "unknown account 'nobody'"}],
    )
    # Nothing of either refused batch: no event, no exclusion, no count.
    assert len(await relay.store.events(EventKind.CLICK)) == 3
    assert await relay.store.events(EventKind.UNSUBSCRIBE) == []
    assert await _excluded(relay, "unsubscribe12@example.org") == []
    assert (await totals(relay)).clicks == 3
    assert (
        sample(relay, "relay_feedback_received_total", channel="api", result="invalid")
        == 3
    )


async def test_unsubscribes_above_the_stricter_limit_throttle_until_clicks_catch_up(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    await seed_sent(tmp_path / "relay.db", {ACCOUNT: 1000, OTHER: 1000})
    relay = await start_relay(settings(thresholds={"min_volume": 10}))
    assert (await totals(relay, OTHER)).sent == 1000

    # globex: 12 unsubscribes of 1000 delivered (1.2%) and no clicks: above 1%.
    unsubscribes = [_event("unsubscribe", OTHER, n, "g") for n in range(12)]
    assert (await post_events(relay, unsubscribes))[0] == 200
    assert relay.accounts.state_of(OTHER) is AccountState.THROTTLED
    status, body = await api(relay, "GET", f"/api/accounts/{OTHER}")
    assert status == 200
    assert body["reason"] == (
        "account globex throttled: unsubscribe rate 1.2% over 30d exceeds 1.0%"
    )
    assert (body["counts"]["unsubscribes"], body["counts"]["delivered"]) == (12, 1000)
    assert state_metric(relay, OTHER)["throttled"] == 1
    assert await _excluded(relay, "g0@example.org", OTHER) == [
        (OTHER, SuppressionReason.UNSUBSCRIBE)
    ]
    # 11 clicks: still fewer than the unsubscribes.
    assert (await post_events(relay, [_event("click", OTHER, n) for n in range(11)]))[
        0
    ] == 200
    assert relay.accounts.state_of(OTHER) is AccountState.THROTTLED
    # The 12th: the 1.4% limit applies; 1.2% is within it (above warn_at x 1.4%).
    assert (await post_events(relay, [_event("click", OTHER, 11)]))[0] == 200
    assert relay.accounts.state_of(OTHER) is AccountState.WARNING
    status, body = await api(relay, "GET", f"/api/accounts/{OTHER}")
    assert body["reason"] == (
        "account globex warning: unsubscribe rate 1.2% over 30d is within 1.4%"
    )
    assert state_metric(relay, OTHER)["throttled"] == 0

    # acme: as many clicks first, then the same unsubscribes: never throttled.
    clicks = [_event("click", ACCOUNT, n) for n in range(12)]
    assert (await post_events(relay, clicks))[0] == 200
    unsubscribes = [_event("unsubscribe", ACCOUNT, n, "a") for n in range(12)]
    assert (await post_events(relay, unsubscribes))[0] == 200
    assert relay.accounts.state_of(ACCOUNT) is AccountState.WARNING
    status, body = await api(relay, "GET", f"/api/accounts/{ACCOUNT}")
    assert "throttled" not in {c["to"] for c in body["changes"]}
    unsubscribe_rate = next(
        r for r in body["rates"] if r["statistic"] == "unsubscribe_rate"
    )
    assert (unsubscribe_rate["threshold"], unsubscribe_rate["breached"]) == (
        0.014,
        False,
    )
    # The 13th unsubscribe outnumbers the clicks: the 1% limit, breached.
    assert (await post_events(relay, [_event("unsubscribe", ACCOUNT, 12, "a")]))[
        0
    ] == 200
    assert relay.accounts.state_of(ACCOUNT) is AccountState.THROTTLED


# -- 6. complaints ---------------------------------------------------------------


async def test_complaint_rate_is_judged_only_above_complaint_min_volume(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    await seed_sent(tmp_path / "relay.db", {ACCOUNT: 1000})
    relay = await start_relay(
        settings(
            policies={"order": ["exclusion"]},
            thresholds={"min_volume": 10, "complaints_per_day": 3},
        )
    )
    angry = "angry@example.org"
    status, body = await post_events(
        relay,
        [{"kind": "complaint", "account": ACCOUNT, "recipient": angry, "id": "c1"}],
    )
    assert (status, body) == (200, {"recorded": 1, "duplicates": 0})
    # 1 in 1000 (0.1%) is above 0.08%, but 1000 sent is not above 1000.
    status, body = await api(relay, "GET", f"/api/accounts/{ACCOUNT}")
    complaint_rate = next(
        r for r in body["rates"] if r["statistic"] == "complaint_rate"
    )
    assert complaint_rate["value"] > complaint_rate["threshold"]
    assert (complaint_rate["judged"], complaint_rate["breached"]) == (False, False)
    assert body["state"] == "ok"
    # The complained-of address is excluded from everything acme sends.
    assert await _excluded(relay, angry) == [(ACCOUNT, SuppressionReason.COMPLAINT)]
    assert await _excluded(relay, angry, OTHER) == []

    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        code, _, text = parse_reply(await raw.cmd(f"RCPT TO:<{angry}>"))
        assert code == 550
        assert "(complaint, for account acme, since" in text
        assert (await raw.cmd("RCPT TO:<fine@example.org>")).startswith("250")
        reply = await raw.send_data(message(to="fine@example.org") + b".\r\n")
        assert reply.startswith("250 "), reply

    async def sent_1001() -> bool:
        return (await totals(relay)).sent == 1001

    await until(sent_1001, "the 1001st recipient sent")
    assert relay.accounts.state_of(ACCOUNT) is AccountState.SUSPENDED
    assert parse_reply(await mail_reply(relay)) == (
        550,
        "5.7.1",
        "account acme suspended: complaint rate 0.1% over 30d exceeds 0.08%",
    )


async def test_more_complaints_in_a_day_than_allowed_suspend_at_any_volume(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(settings(thresholds={"complaints_per_day": 3}))
    complaints = [_event("complaint", OTHER, n) for n in range(4)]
    assert (await post_events(relay, complaints[:3]))[0] == 200
    assert relay.accounts.state_of(OTHER) is AccountState.WARNING  # 3 > 0.8 x 3
    assert parse_reply(await mail_reply(relay, OTHER))[0] == 250
    assert (await post_events(relay, complaints[3:]))[0] == 200
    assert (await totals(relay, OTHER)).sent == 0
    assert parse_reply(await mail_reply(relay, OTHER)) == (
        550,
        "5.7.1",
        "account globex suspended: complaints in 24h 4 exceeds 3",
    )
    for n in range(4):
        assert await _excluded(relay, f"complaint{n}@example.org", OTHER) == [
            (OTHER, SuppressionReason.COMPLAINT)
        ]
    assert relay.accounts.state_of(ACCOUNT) is AccountState.OK


# -- 7. spamtraps ----------------------------------------------------------------


async def test_imported_spamtrap_is_refused_and_a_second_hit_suspends(
    start_relay: StartRelay, upstream: CaptureUpstream, tmp_path: Path
) -> None:
    overrides = settings()
    relay = await start_relay(overrides)
    toml = write_toml(tmp_path, upstream, overrides)
    traps = tmp_path / "traps.txt"
    traps.write_text(f"# from the blocklist vendor\n{TRAP}\n", encoding="utf-8")
    code, out, err = await cli(toml, "spamtraps", "import", str(traps))
    assert code == 0, err
    assert out == f"imported 1 new spamtrap from {traps} (1 listed)\n"

    def hits() -> float:
        return sample(
            relay, "relay_feedback_events_total", account=ACCOUNT, kind="spamtrap_hit"
        )

    trap_refusal = (
        550,
        "5.7.1",
        "Refused by policy spamtrap: recipient is on the exclusion list (spamtrap)",
    )
    async with session(relay) as raw:
        assert (await raw.cmd(f"MAIL FROM:<{SENDER}>")).startswith("250")
        assert parse_reply(await raw.cmd(f"RCPT TO:<{TRAP}>")) == trap_refusal
        # The same recipient again in the same message is the same hit.
        assert parse_reply(await raw.cmd(f"RCPT TO:<{TRAP}>")) == trap_refusal
        assert (await raw.cmd("RCPT TO:<jane@example.org>")).startswith("250")
    assert hits() == 1
    assert (
        sample(
            relay,
            "relay_recipients_refused_total",
            account=ACCOUNT,
            policy="spamtrap",
            reason="spamtrap",
        )
        == 2
    )
    assert relay.accounts.state_of(ACCOUNT) is AccountState.WARNING  # 1 allowed
    assert parse_reply(await mail_reply(relay))[0] == 250

    assert parse_reply(await hit_trap(relay)) == trap_refusal  # another message
    assert hits() == 2
    assert parse_reply(await mail_reply(relay)) == (
        550,
        "5.7.1",
        "account acme suspended: spamtrap hits 2 over 30d exceeds 1",
    )
    assert state_metric(relay)["suspended"] == 1
    # The trap is the spamtrap list's business, not the exclusion list's.
    assert await _excluded(relay, TRAP) == []


# -- 8. restart ------------------------------------------------------------------


async def test_counts_and_state_survive_a_restart(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    overrides = settings()
    first = await start_relay(overrides)
    await send_each(first, ["a@example.org", "b@example.org", "c@example.org"])

    async def three_sent() -> bool:
        return (await totals(first)).sent == 3

    await until(three_sent, "three recipients sent")
    await suspended_by_traps(first)
    refusal = await mail_reply(first)
    reason = "account acme suspended: spamtrap hits 2 over 30d exceeds 1"
    assert parse_reply(refusal) == (550, "5.7.1", reason)
    status, before = await api(first, "GET", f"/api/accounts/{ACCOUNT}")
    assert status == 200
    assert before["counts"] == {
        "sent": 3,
        "delivered": 3,
        "bounces": 0,
        "blocks": 2,
        "unsubscribes": 0,
        "complaints": 0,
        "complaints_24h": 0,
        "clicks": 0,
        "spamtrap_hits": 2,
    }

    async def suspension_stored() -> bool:
        return await stored_state(first) is AccountState.SUSPENDED

    await until(suspension_stored, "the suspension stored")
    await first.shutdown()

    second = await start_relay(overrides)
    assert second.store.path == first.store.path
    assert parse_reply(await mail_reply(second)) == (550, "5.7.1", reason)
    status, after = await api(second, "GET", f"/api/accounts/{ACCOUNT}")
    assert status == 200
    assert after["counts"] == before["counts"]
    assert (after["state"], after["reason"], after["since"]) == (
        before["state"],
        before["reason"],
        before["since"],
    )
    assert [c["to"] for c in after["changes"]] == ["suspended", "warning"]
    assert state_metric(second)["suspended"] == 1


# -- 9. the relay's own DSNs -----------------------------------------------------


@pytest.mark.parametrize("dsn_fate", ["delivered", "refused"])
async def test_the_relays_own_dsns_never_count(
    start_relay: StartRelay, upstream: CaptureUpstream, dsn_fate: str
) -> None:
    upstream.rcpt_replies[GONE] = USER_UNKNOWN
    if dsn_fate == "refused":  # the DSN itself bounces too
        upstream.rcpt_replies[SENDER] = ["550 5.1.1 <news@acme.example>: no mailbox"]
    relay = await start_relay(settings())
    await send_each(relay, [GONE])

    async def done() -> bool:
        bounced = sample(relay, "relay_delivery_recipients_total", result="bounced")
        wanted = 2 if dsn_fate == "refused" else 1
        return bounced == wanted and await settled(relay)

    if dsn_fate == "delivered":
        (dsn,) = await upstream.wait_for(1)
        assert (dsn.mail_from, dsn.rcpt_tos) == ("", [SENDER])
    await until(done, "the message and its DSN finished")
    assert sample(relay, "relay_dsn_generated_total") == 1  # never a DSN of a DSN

    counted = await totals(relay)
    assert (counted.sent, counted.bounces) == (1, 1)
    status, body = await api(relay, "GET", f"/api/accounts/{ACCOUNT}")
    assert status == 200
    assert (body["counts"]["sent"], body["counts"]["bounces"]) == (1, 1)
    assert (
        sample(relay, "relay_feedback_events_total", account=ACCOUNT, kind="bounce")
        == 1
    )
    buckets = await relay.store.counter_buckets(0)
    assert sorted((b.account, b.kind.value, b.count) for b in buckets) == [
        (ACCOUNT, "bounce", 1),
        (ACCOUNT, "sent", 1),
    ]
    bounces = await relay.store.events(EventKind.BOUNCE)
    assert sorted(str(e.account) for e in bounces) == (
        ["None", ACCOUNT] if dsn_fate == "refused" else [ACCOUNT]
    )


async def test_an_accounts_own_null_sender_mail_counts(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    upstream.rcpt_replies[GONE] = USER_UNKNOWN
    relay = await start_relay(settings())
    send = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=relay.smtp.port, start_tls=False, timeout=10
    )
    await send.connect()
    await send.login(ACCOUNT, PASSWORD)
    try:
        errors, reply = await send.sendmail("", [GONE], message(to=GONE))
    finally:
        await send.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as")

    async def bounced() -> bool:
        seen = sample(relay, "relay_delivery_recipients_total", result="bounced")
        return seen == 1 and await settled(relay)

    await until(bounced, "the bounce recorded")
    counted = await totals(relay)
    assert (counted.sent, counted.bounces) == (1, 1)

    async def excluded() -> bool:
        return await _excluded(relay, GONE, OTHER) == [
            (None, SuppressionReason.HARD_BOUNCE)
        ]

    await until(excluded, "the hard-bounce exclusion")
