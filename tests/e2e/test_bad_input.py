"""End to end: hostile or broken SMTP input gets a clear reply and nothing is half-done.

Every test talks real SMTP over loopback to the relay started in-process. For each
refusal it checks the reply class and enhanced status code (the contract in
DESIGN.md), that nothing was queued or forwarded, that a metric counted it, and that
the server keeps serving the connection or the next client.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Sequence

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import ACCOUNT, PASSWORD, StartRelay, client, message
from tests.support.smtp import RawClient
from tests.support.upstream import CaptureUpstream

SENDER = "news@acme.example"
RCPT = "jane@example.org"
GOOD_SENDER = "good@acme.example"

# A complete reply line with an enhanced status code (RFC 2034, RFC 3463).
ENHANCED = re.compile(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ")
ENHANCED_LINE = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


# -- helpers ------------------------------------------------------------------


def code_of(reply: str) -> tuple[str, str]:
    """``("550", "5.5.2")`` from the last line of a reply."""
    last = reply.splitlines()[-1]
    assert ENHANCED.match(last), f"no enhanced status code in {reply!r}"
    code, status, _ = last.split(" ", 2)
    return code, status


def assert_reply(reply: str, code: str, status: str) -> None:
    """The reply has exactly this basic code and enhanced status."""
    assert code_of(reply) == (code, status), reply


def refused(relay: Relay, reason: str, account: str = ACCOUNT) -> float:
    """``relay_messages_refused_total`` for the SMTP core and ``reason``."""
    value = relay.metrics.registry.get_sample_value(
        "relay_messages_refused_total",
        {"account": account, "policy": "smtp", "reason": reason},
    )
    return value or 0.0


def rcpt_refused(relay: Relay, reason: str, account: str = ACCOUNT) -> float:
    """``relay_recipients_refused_total`` for the SMTP core and ``reason``."""
    value = relay.metrics.registry.get_sample_value(
        "relay_recipients_refused_total",
        {"account": account, "policy": "smtp", "reason": reason},
    )
    return value or 0.0


def sample(relay: Relay, name: str, labels: dict[str, str] | None = None) -> float:
    """Any sample of the relay's registry (0 when absent)."""
    return relay.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def auth_plain_token(user: str = ACCOUNT, password: str = PASSWORD) -> str:
    """The AUTH PLAIN initial response for ``user``/``password``."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def data_of(content: bytes) -> bytes:
    """DATA payload for ``content`` (no line starts with a dot): add the terminator."""
    assert content.endswith(b"\r\n")
    return content + b".\r\n"


@pytest.fixture
async def raw(relay_server: Relay) -> AsyncIterator[RawClient]:
    """A RawClient that said EHLO and logged in."""
    conn = await RawClient.connect("127.0.0.1", relay_server.smtp.port)
    assert (await conn.login(ACCOUNT, PASSWORD)).startswith("235 2.7.0")
    yield conn
    await conn.close()


async def open_transaction(
    conn: RawClient,
    *,
    mail_from: str = SENDER,
    rcpts: Sequence[str] = (RCPT,),
    mail_params: str = "",
) -> None:
    """MAIL and RCPT, all of them accepted."""
    reply = await conn.cmd(f"MAIL FROM:<{mail_from}>{mail_params}")
    assert_reply(reply, "250", "2.1.0")
    for rcpt in rcpts:
        assert_reply(await conn.cmd(f"RCPT TO:<{rcpt}>"), "250", "2.1.5")


async def transaction(
    conn: RawClient,
    payload: bytes,
    *,
    mail_from: str = SENDER,
    rcpts: Sequence[str] = (RCPT,),
    mail_params: str = "",
) -> str:
    """MAIL, RCPT, DATA with ``payload`` sent byte for byte; the final reply."""
    await open_transaction(
        conn, mail_from=mail_from, rcpts=rcpts, mail_params=mail_params
    )
    return await conn.send_data(payload)


async def good_transaction(conn: RawClient, mail_params: str = "") -> str:
    """A well-formed message from GOOD_SENDER on ``conn``; asserts it was queued."""
    reply = await transaction(
        conn,
        data_of(message(sender=GOOD_SENDER)),
        mail_from=GOOD_SENDER,
        mail_params=mail_params,
    )
    assert_reply(reply, "250", "2.0.0")
    assert "queued as" in reply
    return reply


async def assert_nothing_queued(relay: Relay, upstream: CaptureUpstream) -> None:
    """Nothing was queued and nothing forwarded (checked in an order free of races).

    Anything queued before a refusal's reply is either still in the store, or was
    delivered and deleted after the upstream recorded it; so check the store first.
    """
    assert (await relay.store.stats()).messages == 0
    assert upstream.messages == []


async def assert_only_good_forwarded(upstream: CaptureUpstream, count: int = 1) -> None:
    """The known-good messages arrived, and nothing else did."""
    got = await upstream.wait_for(count)
    assert [m.mail_from for m in got] == [GOOD_SENDER] * count


# -- 1. relaying without AUTH ---------------------------------------------------


@pytest.mark.parametrize("greeting", ["EHLO", "HELO"])
async def test_mail_without_auth_is_refused(
    relay_server: Relay, upstream: CaptureUpstream, greeting: str
) -> None:
    conn = await RawClient.connect("127.0.0.1", relay_server.smtp.port)
    try:
        assert (await conn.cmd(f"{greeting} mailer.test")).startswith("250")
        assert_reply(await conn.cmd(f"MAIL FROM:<{SENDER}>"), "530", "5.7.0")
        # No transaction was opened: RCPT and DATA have nothing to attach to.
        assert_reply(await conn.cmd(f"RCPT TO:<{RCPT}>"), "503", "5.5.1")
        assert_reply(await conn.cmd("DATA"), "503", "5.5.1")
        assert_reply(await conn.cmd("MAIL FROM:<>"), "530", "5.7.0")
        assert_reply(await conn.cmd("NOOP"), "250", "2.0.0")
    finally:
        await conn.close()
    assert refused(relay_server, "auth_required", account="-") == 2
    assert sample(relay_server, "relay_messages_received_total", {"account": "-"}) == 0
    await assert_nothing_queued(relay_server, upstream)

    # The relay still serves an authenticated client.
    good = await RawClient.connect("127.0.0.1", relay_server.smtp.port)
    try:
        assert (await good.login(ACCOUNT, PASSWORD)).startswith("235")
        await good_transaction(good)
    finally:
        await good.close()
    await assert_only_good_forwarded(upstream)


# -- 2. AUTH over cleartext when it is not allowed --------------------------------


async def test_cleartext_auth_refused_when_not_allowed(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay({"server": {"allow_cleartext_auth": False}})
    conn = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        ehlo = await conn.cmd("EHLO mailer.test")
        assert ehlo.startswith("250")
        assert "AUTH" not in ehlo.upper()
        assert_reply(
            await conn.cmd(f"AUTH PLAIN {auth_plain_token()}"), "538", "5.7.11"
        )
        assert_reply(await conn.cmd("AUTH LOGIN"), "538", "5.7.11")
        # Still not logged in.
        assert_reply(await conn.cmd(f"MAIL FROM:<{SENDER}>"), "530", "5.7.0")
    finally:
        await conn.close()
    assert sample(relay, "relay_auth_attempts_total", {"result": "success"}) == 0
    await assert_nothing_queued(relay, upstream)


# -- 3. lockout after repeated failures -------------------------------------------


async def test_lockout_after_failed_logins(start_relay: StartRelay) -> None:
    relay = await start_relay({"server": {"auth_max_failures": 3}})
    conn = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await conn.cmd("EHLO mailer.test")).startswith("250")
        for _ in range(3):
            reply = await conn.cmd(f"AUTH PLAIN {auth_plain_token(password='wrong')}")
            assert_reply(reply, "535", "5.7.8")
        # The right password no longer helps, on this connection ...
        reply = await conn.cmd(f"AUTH PLAIN {auth_plain_token()}")
        assert_reply(reply, "454", "4.7.0")
        assert_reply(await conn.cmd(f"MAIL FROM:<{SENDER}>"), "530", "5.7.0")
    finally:
        await conn.close()
    # ... nor on a new one from the same address.
    again = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await again.cmd("EHLO mailer.test")).startswith("250")
        assert_reply(
            await again.cmd(f"AUTH PLAIN {auth_plain_token()}"), "454", "4.7.0"
        )
    finally:
        await again.close()
    assert sample(relay, "relay_auth_attempts_total", {"result": "failure"}) == 3
    assert sample(relay, "relay_auth_attempts_total", {"result": "locked_out"}) == 2
    assert sample(relay, "relay_auth_attempts_total", {"result": "success"}) == 0


# -- 4. oversized messages ----------------------------------------------------------


async def test_declared_size_over_limit_is_refused_at_mail(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient
) -> None:
    reply = await raw.cmd(f"MAIL FROM:<{SENDER}> SIZE=999999")
    assert_reply(reply, "552", "5.3.4")
    assert_reply(await raw.cmd(f"RCPT TO:<{RCPT}>"), "503", "5.5.1")
    await assert_nothing_queued(relay_server, upstream)
    # A SIZE within the limit, then a normal transaction, on the same connection.
    await good_transaction(raw, mail_params=" SIZE=2000")
    await assert_only_good_forwarded(upstream)
    # DESIGN.md: every refusal is counted, this one (made before the MAIL hook) too.
    assert refused(relay_server, "too_large") == 1


async def test_data_over_limit_is_refused(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient
) -> None:
    line = b"x" * 76 + b"\r\n"
    body = line * (70 * 1024 // len(line))  # ~70 KiB, over the 64 KiB limit
    content = message(body=body.decode())
    assert len(content) > 64 * 1024
    reply = await transaction(raw, data_of(content))
    assert_reply(reply, "552", "5.3.4")
    assert refused(relay_server, "too_large") == 1
    await assert_nothing_queued(relay_server, upstream)
    await good_transaction(raw)
    await assert_only_good_forwarded(upstream)


# -- 5. too many recipients ---------------------------------------------------------


async def test_sixth_recipient_is_deferred_first_five_delivered(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient
) -> None:
    rcpts = [f"r{n}@example.org" for n in range(1, 6)]
    await open_transaction(raw, mail_from=GOOD_SENDER, rcpts=rcpts)
    assert_reply(await raw.cmd("RCPT TO:<r6@example.org>"), "452", "4.5.3")
    assert_reply(await raw.cmd("RCPT TO:<r7@example.org>"), "452", "4.5.3")
    reply = await raw.send_data(data_of(message(sender=GOOD_SENDER)))
    assert_reply(reply, "250", "2.0.0")
    assert rcpt_refused(relay_server, "too_many_recipients") == 2
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == rcpts


# -- 6. over-long lines -------------------------------------------------------------


async def test_line_over_998_octets_is_refused(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient
) -> None:
    body = "a" * 1000 + "\r\n"
    reply = await transaction(raw, data_of(message(body=body)))
    assert_reply(reply, "500", "5.5.2")
    assert refused(relay_server, "line_too_long") == 1
    await assert_nothing_queued(relay_server, upstream)
    await good_transaction(raw)
    await assert_only_good_forwarded(upstream)


@pytest.mark.parametrize(("length", "accepted"), [(998, True), (999, False)])
async def test_line_length_limit_is_998_octets(
    relay_server: Relay,
    upstream: CaptureUpstream,
    raw: RawClient,
    length: int,
    accepted: bool,
) -> None:
    # RFC 5321 4.5.3.1.6: at most 998 octets plus CRLF; the reply text says so too.
    content = message(sender=GOOD_SENDER, body="b" * length + "\r\n")
    reply = await transaction(raw, data_of(content), mail_from=GOOD_SENDER)
    if accepted:
        assert_reply(reply, "250", "2.0.0")
        (got,) = await upstream.wait_for(1)
        assert got.content.endswith(b"b" * length + b"\r\n")
    else:
        assert_reply(reply, "500", "5.5.2")
        await assert_nothing_queued(relay_server, upstream)


# -- 7. SMTP smuggling ----------------------------------------------------------------

_SMUGGLED = (
    b"MAIL FROM:<evil@x.org>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"From: evil@x.org\r\nTo: victim@example.org\r\nSubject: smuggled\r\n\r\nowned\r\n"
)
_HEAD = (
    b"From: news@acme.example\r\nTo: jane@example.org\r\nSubject: Hi\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHello\r\n"
)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            _HEAD[:-2] + b"\r\n\n.\r\n" + _SMUGGLED + b".\r\n", id="crlf-lf-dot-crlf"
        ),
        pytest.param(_HEAD[:-2] + b"\n.\n" + _SMUGGLED + b".\r\n", id="lf-dot-lf"),
        pytest.param(_HEAD + b".\n" + _SMUGGLED + b".\r\n", id="crlf-dot-lf"),
        pytest.param(_HEAD[:-2] + b"\n.\r\n" + _SMUGGLED + b".\r\n", id="lf-dot-crlf"),
        pytest.param(_HEAD[:-2] + b"\r.\r" + _SMUGGLED + b".\r\n", id="cr-dot-cr"),
        pytest.param(_HEAD + b".\r" + _SMUGGLED + b".\r\n", id="crlf-dot-cr"),
        pytest.param(_HEAD + b"hello\rworld\r\n.\r\n", id="bare-cr-mid-line"),
        pytest.param(_HEAD + b"hello\nworld\r\n.\r\n", id="bare-lf-mid-line"),
    ],
)
async def test_smuggling_sequences_refuse_the_whole_message(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient, payload: bytes
) -> None:
    reply = await transaction(raw, payload)
    # One reply only, for the whole data: nothing after a bare dot was a command.
    assert_reply(reply, "550", "5.5.2")
    assert refused(relay_server, "bare_line_ending") == 1
    await assert_nothing_queued(relay_server, upstream)
    # The connection is in a clean state: the next reply answers the next command.
    assert_reply(await raw.cmd("NOOP"), "250", "2.0.0")
    await good_transaction(raw)
    await assert_only_good_forwarded(upstream)
    assert not upstream.to("victim@example.org")
    assert all(b"smuggled" not in m.content for m in upstream.messages)


# -- 8. NUL bytes -------------------------------------------------------------------------


async def test_nul_byte_in_data_is_refused(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient
) -> None:
    reply = await transaction(raw, data_of(_HEAD + b"nul\x00here\r\n"))
    assert_reply(reply, "550", "5.5.2")
    assert refused(relay_server, "nul_byte") == 1
    await assert_nothing_queued(relay_server, upstream)
    await good_transaction(raw)
    await assert_only_good_forwarded(upstream)


@pytest.mark.parametrize(
    "command", ["RCPT TO:<a\x00b@example.org>", "RCPT TO:<ab@exa\x00mple.org>"]
)
async def test_nul_byte_in_recipient_is_refused(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient, command: str
) -> None:
    assert_reply(await raw.cmd(f"MAIL FROM:<{GOOD_SENDER}>"), "250", "2.1.0")
    reply = await raw.cmd(command)
    assert reply.startswith("5"), reply
    assert ENHANCED.match(reply), reply
    # The transaction is still usable with a valid recipient.
    assert_reply(await raw.cmd(f"RCPT TO:<{RCPT}>"), "250", "2.1.5")
    reply = await raw.send_data(data_of(message(sender=GOOD_SENDER)))
    assert_reply(reply, "250", "2.0.0")
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == [RCPT]


# -- 9. broken MIME and header sections ---------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            message(
                extra_headers="MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n",
                body="--x\r\nContent-Type: text/plain\r\n\r\nhi\r\n--x--\r\n",
            ),
            id="multipart-without-boundary",
        ),
        pytest.param(
            message(
                extra_headers=(
                    'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
                ),
                body="--b1\r\nContent-Type: text/plain\r\n\r\nhi\r\n",
            ),
            id="multipart-never-closed",
        ),
        pytest.param(
            message(
                extra_headers=(
                    'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n'
                ),
                body="no parts at all\r\n",
            ),
            id="multipart-boundary-absent",
        ),
        pytest.param(b"\r\nbody only, no header section\r\n", id="no-header-section"),
        pytest.param(
            b"garbage first line\r\nFrom: news@acme.example\r\n\r\nbody\r\n",
            id="garbage-first-line",
        ),
    ],
)
async def test_broken_structure_is_refused(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient, content: bytes
) -> None:
    reply = await transaction(raw, data_of(content))
    assert_reply(reply, "550", "5.6.0")
    assert refused(relay_server, "malformed_message") == 1
    await assert_nothing_queued(relay_server, upstream)
    await good_transaction(raw)
    await assert_only_good_forwarded(upstream)


# -- 10. addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "status", "reason"),
    [
        pytest.param(
            "a" * 65 + "@example.org", "5.1.3", "invalid_recipient", id="local-65"
        ),
        pytest.param("user@[127.0.0.1]", "5.1.3", "invalid_recipient", id="literal"),
        pytest.param("user@localhost", "5.1.3", "invalid_recipient", id="unqualified"),
        pytest.param(
            "jäne@example.org", "5.6.7", "smtputf8_required", id="non-ascii-local"
        ),
        pytest.param(
            "jane@bücher.example", "5.6.7", "smtputf8_required", id="non-ascii-domain"
        ),
    ],
)
async def test_bad_recipient_address_is_refused(
    relay_server: Relay,
    upstream: CaptureUpstream,
    raw: RawClient,
    address: str,
    status: str,
    reason: str,
) -> None:
    assert_reply(await raw.cmd(f"MAIL FROM:<{GOOD_SENDER}>"), "250", "2.1.0")
    assert_reply(await raw.cmd(f"RCPT TO:<{address}>"), "553", status)
    assert rcpt_refused(relay_server, reason) == 1
    # With no recipient accepted there is nothing to send.
    assert_reply(await raw.cmd("DATA"), "503", "5.5.1")
    assert_reply(await raw.cmd(f"RCPT TO:<{RCPT}>"), "250", "2.1.5")
    assert_reply(
        await raw.send_data(data_of(message(sender=GOOD_SENDER))), "250", "2.0.0"
    )
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == [RCPT]


@pytest.mark.parametrize(
    ("address", "status", "reason"),
    [
        pytest.param(
            "a" * 65 + "@acme.example", "5.1.7", "invalid_sender", id="local-65"
        ),
        pytest.param("news@[127.0.0.1]", "5.1.7", "invalid_sender", id="literal"),
        pytest.param("news@localhost", "5.1.7", "invalid_sender", id="unqualified"),
        pytest.param(
            "nëws@acme.example", "5.6.7", "smtputf8_required", id="non-ascii-local"
        ),
        pytest.param(
            "news@bücher.example", "5.6.7", "smtputf8_required", id="non-ascii-domain"
        ),
    ],
)
async def test_bad_sender_address_is_refused(
    relay_server: Relay,
    upstream: CaptureUpstream,
    raw: RawClient,
    address: str,
    status: str,
    reason: str,
) -> None:
    assert_reply(await raw.cmd(f"MAIL FROM:<{address}>"), "553", status)
    assert refused(relay_server, reason) == 1
    assert_reply(await raw.cmd(f"RCPT TO:<{RCPT}>"), "503", "5.5.1")
    await assert_nothing_queued(relay_server, upstream)
    await good_transaction(raw)
    await assert_only_good_forwarded(upstream)


async def test_domain_is_lowercased_and_local_part_kept(
    upstream: CaptureUpstream, raw: RawClient
) -> None:
    await open_transaction(
        raw, mail_from="News@ACME.Example", rcpts=["Jane@EXAMPLE.Org"]
    )
    assert_reply(await raw.send_data(data_of(message())), "250", "2.0.0")
    (got,) = await upstream.wait_for(1)
    assert got.mail_from == "News@acme.example"
    assert got.rcpt_tos == ["Jane@example.org"]


async def test_idn_domain_is_forwarded_as_a_label(
    upstream: CaptureUpstream, raw: RawClient
) -> None:
    await open_transaction(raw, rcpts=["jane@bücher.example"], mail_params=" SMTPUTF8")
    assert_reply(await raw.send_data(data_of(message())), "250", "2.0.0")
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["jane@xn--bcher-kva.example"]


# -- 11. client gone mid-DATA --------------------------------------------------------------


async def test_disconnect_mid_data_queues_nothing(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    conn = await RawClient.connect("127.0.0.1", relay_server.smtp.port)
    assert (await conn.login(ACCOUNT, PASSWORD)).startswith("235")
    await open_transaction(conn)
    assert (await conn.cmd("DATA")).startswith("354")
    conn.writer.write(_HEAD + b"first line\r\nsecond line\r\n")
    await conn.writer.drain()
    await conn.close()
    # The relay ends the open transaction when it sees the connection go (an
    # event, not a delay; bounded only so that a bug fails instead of hanging).
    async with asyncio.timeout(10):
        await relay_server.handler.wait_idle()
    assert (
        sample(relay_server, "relay_smtp_sessions_total", {"result": "disconnected"})
        == 1
    )
    assert relay_server.handler.active_transactions == 0
    assert (await relay_server.store.stats()).messages == 0
    assert upstream.messages == []
    assert (
        sample(relay_server, "relay_messages_received_total", {"account": ACCOUNT}) == 0
    )

    fresh = await client(relay_server)
    errors, _ = await fresh.sendmail(GOOD_SENDER, [RCPT], message(sender=GOOD_SENDER))
    await fresh.quit()
    assert errors == {}
    await assert_only_good_forwarded(upstream)


# -- 12-14. storage trouble --------------------------------------------------------------


async def test_store_unavailable_answers_451_never_250(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    # A long poll interval keeps the queue poller idle, so closing the store cannot
    # race one of its reads (that race is the subject of the next test).
    relay = await start_relay({"queue": {"poll_interval": "60s"}})
    conn = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await conn.login(ACCOUNT, PASSWORD)).startswith("235")
        await relay.store.close()
        reply = await conn.cmd(f"MAIL FROM:<{SENDER}>")
        assert_reply(reply, "250", "2.1.0")  # MAIL needs no store
        # RCPT looks the recipient up among the spamtraps: that read fails.
        assert_reply(await conn.cmd(f"RCPT TO:<{RCPT}>"), "451", "4.3.0")
        # No recipient was accepted: DATA is refused.
        assert_reply(await conn.cmd("DATA"), "503", "5.5.1")
        # The session is still usable.
        assert_reply(await conn.cmd("RSET"), "250", "2.0.0")
    finally:
        await conn.close()
    assert (
        sample(
            relay,
            "relay_recipients_refused_total",
            {"account": ACCOUNT, "policy": "smtp", "reason": "storage_unavailable"},
        )
        == 1
    )
    assert sample(relay, "relay_storage_errors_total", {"kind": "unavailable"}) == 1
    assert upstream.messages == []


async def test_delivery_survives_a_failed_read_connection(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    # The store's read connection fails under a running relay. Reads must fail as
    # StorageError (which the queue poller handles); anything else kills the poller
    # and, with it, every delivery worker, while SMTP keeps answering 250.
    relay = await start_relay({"queue": {"poll_interval": "60s"}})
    conn = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await conn.login(ACCOUNT, PASSWORD)).startswith("235")
        reader = relay.store._reader
        assert reader is not None
        await reader.close()
        relay.queue.wake()  # the poller reads the store at its next step
        # Writes use the other connection: the message is still accepted ...
        await good_transaction(conn)
    finally:
        await conn.close()
    # ... and, handed straight to a worker, delivered.
    await assert_only_good_forwarded(upstream)


async def test_out_of_disk_refuses_mail_with_452(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay({"storage": {"min_free_space": "100000GiB"}})
    conn = await RawClient.connect("127.0.0.1", relay.smtp.port)
    try:
        assert (await conn.login(ACCOUNT, PASSWORD)).startswith("235")
        assert_reply(await conn.cmd(f"MAIL FROM:<{SENDER}>"), "452", "4.3.1")
        assert_reply(await conn.cmd(f"RCPT TO:<{RCPT}>"), "503", "5.5.1")
        assert_reply(await conn.cmd("NOOP"), "250", "2.0.0")
    finally:
        await conn.close()
    assert refused(relay, "storage_full") == 1
    assert sample(relay, "relay_storage_errors_total", {"kind": "full"}) == 1
    await assert_nothing_queued(relay, upstream)


async def test_database_full_answers_452_at_data(
    relay_server: Relay, upstream: CaptureUpstream, raw: RawClient
) -> None:
    writer = relay_server.store._writer
    assert writer is not None
    async with writer.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    async with writer.execute(f"PRAGMA max_page_count = {int(row[0])}") as cur:
        await cur.fetchone()
    body = ("y" * 70 + "\r\n") * 300  # ~21 KiB: several pages more than the cap
    reply = await transaction(raw, data_of(message(body=body)))
    assert_reply(reply, "452", "4.3.1")
    assert refused(relay_server, "storage_full") == 1
    assert sample(relay_server, "relay_storage_errors_total", {"kind": "full"}) == 1
    await assert_nothing_queued(relay_server, upstream)
    assert_reply(await raw.cmd("NOOP"), "250", "2.0.0")


# -- 15. every reply carries an enhanced status code ---------------------------------------


async def test_every_reply_has_an_enhanced_status_code(relay_server: Relay) -> None:
    conn = await RawClient.connect("127.0.0.1", relay_server.smtp.port)
    replies: dict[str, str] = {}
    try:
        # Before the greeting-exchange and before AUTH.
        replies["MAIL before EHLO"] = await conn.cmd(f"MAIL FROM:<{SENDER}>")
        assert (await conn.cmd("EHLO mailer.test")).startswith("250")
        replies["MAIL before AUTH"] = await conn.cmd(f"MAIL FROM:<{SENDER}>")
        replies["AUTH bad base64"] = await conn.cmd("AUTH PLAIN !!!notbase64")
        replies["AUTH unknown mech"] = await conn.cmd("AUTH KERBEROS_V9")
        replies["AUTH"] = await conn.cmd(f"AUTH PLAIN {auth_plain_token()}")
        replies["AUTH again"] = await conn.cmd(f"AUTH PLAIN {auth_plain_token()}")
        replies["NOOP"] = await conn.cmd("NOOP")
        replies["RSET"] = await conn.cmd("RSET")
        replies["VRFY"] = await conn.cmd(f"VRFY {RCPT}")
        replies["EXPN"] = await conn.cmd("EXPN staff")
        replies["HELP"] = await conn.cmd("HELP")
        replies["HELP MAIL"] = await conn.cmd("HELP MAIL")
        replies["unknown"] = await conn.cmd("XYZZY")
        replies["long command"] = await conn.cmd("NOOP " + "z" * 600)
        replies["MAIL bad syntax"] = await conn.cmd("MAIL FROM:bogus")
        replies["MAIL bad param"] = await conn.cmd(f"MAIL FROM:<{SENDER}> FOO=BAR")
        replies["MAIL bad SIZE"] = await conn.cmd(f"MAIL FROM:<{SENDER}> SIZE=big")
        replies["RCPT before MAIL"] = await conn.cmd(f"RCPT TO:<{RCPT}>")
        replies["DATA before MAIL"] = await conn.cmd("DATA")
        replies["MAIL"] = await conn.cmd(f"MAIL FROM:<{SENDER}>")
        replies["nested MAIL"] = await conn.cmd(f"MAIL FROM:<{SENDER}>")
        replies["RCPT bad syntax"] = await conn.cmd("RCPT TO:nobody")
        replies["DATA before RCPT"] = await conn.cmd("DATA")
        replies["DATA with arg"] = await conn.cmd("DATA now")
        replies["RSET again"] = await conn.cmd("RSET")
        replies["QUIT"] = await conn.cmd("QUIT")
    finally:
        await conn.close()
    for what, reply in replies.items():
        for line in reply.splitlines():
            assert ENHANCED_LINE.match(line), f"{what}: {line!r}"
    assert code_of(replies["unknown"]) == ("500", "5.5.1")
    assert code_of(replies["MAIL before AUTH"]) == ("530", "5.7.0")
    assert code_of(replies["AUTH"]) == ("235", "2.7.0")
    assert code_of(replies["VRFY"])[0] == "252"
    assert code_of(replies["MAIL bad syntax"])[0].startswith("5")
    assert code_of(replies["RCPT before MAIL"]) == ("503", "5.5.1")
    assert code_of(replies["DATA before MAIL"]) == ("503", "5.5.1")
    assert code_of(replies["DATA before RCPT"]) == ("503", "5.5.1")
    assert code_of(replies["QUIT"]) == ("221", "2.0.0")


# -- 16. an unexpected fault -----------------------------------------------------------------


async def test_unexpected_fault_answers_451_without_details(
    relay_server: Relay,
    upstream: CaptureUpstream,
    raw: RawClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(content: bytes) -> None:
        raise RuntimeError("boom secret")

    monkeypatch.setattr(relay_server.handler, "_check_data", boom)
    reply = await transaction(raw, data_of(message()))
    assert_reply(reply, "451", "4.3.0")
    assert "boom" not in reply
    assert "secret" not in reply
    assert "RuntimeError" not in reply
    await assert_nothing_queued(relay_server, upstream)
    # A 4xx after the data ends the transaction (RFC 5321 4.1.1.4): the client may
    # start a new one on the same connection, with a fresh envelope ...
    monkeypatch.undo()
    await good_transaction(raw)
    (got,) = await upstream.wait_for(1)
    assert got.mail_from == GOOD_SENDER
    assert got.rcpt_tos == [RCPT]
    # ... and nothing is left open that a shutdown would wait for.
    assert relay_server.handler.active_transactions == 0


async def test_unexpected_fault_reply_names_the_session(
    relay_server: Relay, raw: RawClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refusals end with the session reference, the session_id in the log lines, so
    # an operator can find what a mailer reports; a fault's 451 must too.
    refusal = await raw.cmd("MAIL FROM:<news@localhost>")
    assert_reply(refusal, "553", "5.1.7")
    session_ref = re.search(r"\[ref (\w+)\]", refusal)
    assert session_ref is not None, refusal

    def boom(content: bytes) -> None:
        raise RuntimeError("boom secret")

    monkeypatch.setattr(relay_server.handler, "_check_data", boom)
    reply = await transaction(raw, data_of(message()))
    assert_reply(reply, "451", "4.3.0")
    assert reply.endswith(f"[ref {session_ref.group(1)}]"), reply


async def test_a_write_that_timed_out_before_it_started_is_never_applied(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    """451 means not queued: a write abandoned in the queue must not commit later."""
    import sqlite3

    relay = await start_relay({"storage": {"timeout": "300ms"}})
    blocker = sqlite3.connect(relay.config.storage.sqlite_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
    try:
        first = await client(relay)
        second = await client(relay)
        # The first write starts and waits for the lock; the second queues behind it.
        send_first = asyncio.ensure_future(
            first.sendmail("news@acme.example", ["a@example.org"], message())
        )
        await asyncio.sleep(0.5)  # ample time for it to reach the (blocked) writer
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await second.sendmail("news@acme.example", ["b@example.org"], message())
        assert refused.value.code == 451
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    _, reply = await send_first  # its transaction was under way: its commit decides
    assert reply.startswith("2.0.0")
    await first.quit()
    await second.quit()
    await upstream.wait_for(1)
    await asyncio.sleep(0.3)
    assert [m.rcpt_tos for m in upstream.messages] == [["a@example.org"]]
    assert await relay.store.list_messages() == []


async def test_first_message_on_a_new_upstream_connection_keeps_its_esmtp_options(
    upstream: CaptureUpstream, raw: RawClient
) -> None:
    # The upstream's extensions are known before the first MAIL of a connection:
    # a UTF-8 address and an 8-bit body go out with SMTPUTF8 and BODY=8BITMIME
    # from the very first message, not only once the connection is reused.
    await open_transaction(raw, rcpts=["jäne@example.org"], mail_params=" SMTPUTF8")
    body = "Grüße aus Köln\r\n"
    assert_reply(await raw.send_data(data_of(message(body=body))), "250", "2.0.0")
    (got,) = await upstream.wait_for(1)
    assert upstream.connections == 1
    assert got.rcpt_tos == ["jäne@example.org"]
    assert sorted(got.mail_options) == ["BODY=8BITMIME", "SMTPUTF8"]
    assert "Grüße aus Köln".encode() in got.content
