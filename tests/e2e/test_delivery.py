"""Delivery: retries, bounces, DSNs and connection reuse, against a real upstream."""

from __future__ import annotations

import asyncio
from email import message_from_bytes, policy

from relay.app import Relay
from storage.base import BounceType, EventKind
from storage.errors import StorageUnavailableError
from tests.conftest import StartRelay, client, message
from tests.support.upstream import CaptureUpstream


async def _send(
    relay: Relay, rcpts: list[str], sender: str = "news@acme.example"
) -> str:
    smtp = await client(relay)
    errors, reply = await smtp.sendmail(
        sender, rcpts, message(sender=sender, to=rcpts[0])
    )
    await smtp.quit()
    assert errors == {}
    return reply.rsplit(" ", 1)[1]


async def _until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll an async predicate until true (bounded)."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_temporary_failure_then_success_delivers_exactly_once(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    upstream.rcpt_replies["jane@example.org"] = [
        "451 4.3.0 try later",
        "421 4.7.0 busy",
        "250 2.1.5 ok",
    ]
    queue_id = await _send(relay_server, ["jane@example.org"])
    got = await upstream.wait_for(1)
    assert len(got) == 1

    async def gone() -> bool:
        return await relay_server.store.get_message(queue_id) is None

    await _until(gone)
    await asyncio.sleep(0.3)  # a further poll must not deliver it again
    assert len(upstream.to("jane@example.org")) == 1
    assert (
        relay_server.metrics.registry.get_sample_value(
            "relay_delivery_attempts_total", {"result": "deferred"}
        )
        == 2
    )


async def test_permanent_failure_bounces_with_dsn_to_sender(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    upstream.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    queue_id = await _send(relay_server, ["gone@example.org", "jane@example.org"])
    got = await upstream.wait_for(2)
    original = [m for m in got if m.mail_from == "news@acme.example"]
    dsns = [m for m in got if m.mail_from == ""]
    assert [m.rcpt_tos for m in original] == [["jane@example.org"]]
    assert [m.rcpt_tos for m in dsns] == [["news@acme.example"]]
    dsn = message_from_bytes(dsns[0].content, policy=policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = dsns[0].content.decode()
    assert "Final-Recipient: rfc822; gone@example.org" in status
    assert "Status: 5.1.1" in status
    assert "no such user" in status
    events = await relay_server.store.events(EventKind.BOUNCE)
    assert [
        (e.recipient, e.bounce_type, e.smtp_code, e.account, e.queue_id) for e in events
    ] == [("gone@example.org", BounceType.HARD, 550, "acme", queue_id)]


async def test_null_sender_bounce_gets_no_dsn(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    upstream.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    smtp = await client(relay_server)
    await smtp.sendmail("", ["gone@example.org"], message())
    await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    await smtp.quit()
    await upstream.wait_for(1)

    async def bounced() -> bool:
        return len(await relay_server.store.events(EventKind.BOUNCE)) == 1

    await _until(bounced)
    await asyncio.sleep(0.3)
    assert [m.rcpt_tos for m in upstream.messages] == [["jane@example.org"]]
    assert (
        relay_server.metrics.registry.get_sample_value("relay_dsn_generated_total") == 0
    )


async def test_upstream_down_retries_then_expires_with_dsn(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    port = upstream.port
    await upstream.stop()  # nothing listens: connection refused
    relay = await start_relay(
        {"queue": {"max_lifetime": "1s", "retry_schedule": ["150ms"]}}
    )
    queue_id = await _send(relay, ["jane@example.org"])

    async def expired() -> bool:
        return bool(await relay.store.events(EventKind.BOUNCE))

    await _until(expired)
    (event,) = await relay.store.events(EventKind.BOUNCE)
    assert event.bounce_type is BounceType.SOFT
    assert event.queue_id == queue_id
    attempts = relay.metrics.registry.get_sample_value(
        "relay_delivery_attempts_total", {"result": "deferred"}
    )
    assert attempts is not None and attempts >= 2
    assert await relay.store.get_message(queue_id) is None
    # The DSN waits in the queue; once the upstream is back it is delivered.
    (dsn,) = await relay.store.list_messages()
    assert dsn.mail_from == "" and dsn.recipients == ("news@acme.example",)
    revived = CaptureUpstream(port=port)
    await revived.start()
    try:
        (got,) = await revived.wait_for(1)
        assert got.mail_from == ""
        assert b"Status: 4.4.7" in got.content
        assert b"Action: failed" in got.content
    finally:
        await revived.stop()


async def test_connection_is_reused_for_many_messages(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay({"upstream": {"pool_size": 1}})
    smtp = await client(relay)
    for n in range(10):
        await smtp.sendmail("news@acme.example", [f"r{n}@example.org"], message())
    await smtp.quit()
    await upstream.wait_for(10)
    assert upstream.connections == 1


async def test_data_stage_5xx_bounces_every_recipient(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    upstream.data_reply = "554 5.6.0 content rejected"
    await _send(relay_server, ["a@example.org", "b@example.org"])

    async def bounced() -> bool:
        return len(await relay_server.store.events(EventKind.BOUNCE)) == 2

    await _until(bounced)
    (dsn,) = await upstream.wait_for(1)
    assert dsn.mail_from == ""
    assert dsn.content.count(b"Final-Recipient:") == 2


async def test_message_queued_before_start_is_delivered_on_start(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    """The queue resumes: a message left in the store is delivered by a new relay."""
    port = upstream.port
    await upstream.stop()
    first = await start_relay({"queue": {"retry_schedule": ["1h"]}})
    queue_id = await _send(first, ["jane@example.org"])
    await first.shutdown()
    revived = CaptureUpstream(port=port)
    await revived.start()
    try:
        second = await start_relay()
        await second.store.retry_now(queue_id, second.clock.now())
        (got,) = await revived.wait_for(1)
        assert got.rcpt_tos == ["jane@example.org"]
    finally:
        await revived.stop()


async def test_unexpected_2xx_to_rcpt_is_retried_not_counted_as_delivered(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    """aiosmtplib refuses a 252; the recipient got nothing, so it must be retried."""
    upstream.rcpt_replies["jane@example.org"] = [
        "252 2.1.5 cannot verify",
        "250 2.1.5 ok",
    ]
    queue_id = await _send(relay_server, ["jane@example.org"])
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["jane@example.org"]

    async def gone() -> bool:
        return await relay_server.store.get_message(queue_id) is None

    await _until(gone)
    assert (
        relay_server.metrics.registry.get_sample_value(
            "relay_delivery_attempts_total", {"result": "deferred"}
        )
        == 1
    )


async def test_upstream_dropping_the_connection_at_mail_is_retried_then_expires(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    """A smarthost that hangs up at MAIL: temporary failures, then a soft bounce."""

    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 rude.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith((b"EHLO", b"HELO")):
                writer.write(b"250 rude.test\r\n")
                await writer.drain()
                continue
            break  # MAIL (or anything else): hang up
        writer.close()

    server = await asyncio.start_server(rude, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        relay = await start_relay(
            {
                "upstream": {"url": f"smtp://127.0.0.1:{port}"},
                "queue": {"max_lifetime": "1s", "retry_schedule": ["150ms"]},
            }
        )
        queue_id = await _send(relay, ["jane@example.org"])

        async def expired() -> bool:
            return bool(await relay.store.events(EventKind.BOUNCE))

        await _until(expired)
        (event,) = await relay.store.events(EventKind.BOUNCE)
        assert (event.queue_id, event.bounce_type) == (queue_id, BounceType.SOFT)
        deferred = relay.metrics.registry.get_sample_value(
            "relay_delivery_attempts_total", {"result": "deferred"}
        )
        assert deferred is not None
        assert deferred >= 2
    finally:
        server.close()
        await server.wait_closed()


async def test_results_that_cannot_be_recorded_are_retried_without_resending(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    """While the store refuses a result, the message stays leased: no second copy."""
    store = relay_server.store
    real = store.record_attempts
    failures = 0

    async def flaky(records):
        nonlocal failures
        if failures < 3:
            failures += 1
            raise StorageUnavailableError("disk trouble")
        await real(records)

    store.record_attempts = flaky  # type: ignore[method-assign]
    queue_id = await _send(relay_server, ["jane@example.org"])
    await upstream.wait_for(1)

    async def gone() -> bool:
        return await store.get_message(queue_id) is None

    await _until(gone)
    assert failures == 3
    assert len(upstream.to("jane@example.org")) == 1
    assert (
        relay_server.metrics.registry.get_sample_value(
            "relay_storage_errors_total", {"kind": "record"}
        )
        == 3
    )
