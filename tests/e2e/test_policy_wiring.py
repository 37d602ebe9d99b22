"""The policy pipeline as the SMTP listener uses it, with small checks of our own."""

from __future__ import annotations

import logging

import aiosmtplib
import pytest

from policies import (
    PASS,
    MessageKind,
    Mode,
    Observation,
    Pipeline,
    PolicyContext,
    PolicySettings,
    Stage,
    Verdict,
    refuse,
)
from relay.app import Relay
from tests.conftest import StartRelay, client, message
from tests.support.upstream import CaptureUpstream


class RefuseRecipient:
    """Refuses one address at RCPT."""

    name = "refuse_recipient"
    stages = frozenset({Stage.RCPT})

    def __init__(self, address: str) -> None:
        self.address = address

    async def check(self, ctx: PolicyContext) -> Verdict:
        if ctx.recipient == self.address:
            return refuse("listed", f"{ctx.recipient} is on the test list")
        return PASS


class RefuseLarge:
    """Refuses messages above a size at DATA."""

    name = "refuse_large"
    stages = frozenset({Stage.DATA})

    async def check(self, ctx: PolicyContext) -> Verdict:
        assert ctx.message is not None
        if ctx.message.size_bytes > 100:
            return refuse("too_big_for_test", "message is over 100 bytes")
        return PASS


class Exploding:
    """A check with a bug."""

    name = "exploding"
    stages = frozenset({Stage.DATA})

    async def check(self, ctx: PolicyContext) -> Verdict:
        raise RuntimeError("secret internals")


async def test_recipient_refused_by_a_policy_while_the_others_are_delivered(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    handler = relay_server.handler
    handler.pipeline = Pipeline(
        [(RefuseRecipient("bad@example.org"), PolicySettings())], handler.observe
    )
    smtp = await client(relay_server)
    errors, _ = await smtp.sendmail(
        "news@acme.example", ["good@example.org", "bad@example.org"], message()
    )
    await smtp.quit()
    assert errors["bad@example.org"].code == 550
    assert errors["bad@example.org"].message.startswith("5.7.1 Refused by policy")
    (got,) = await upstream.wait_for(1)
    assert got.rcpt_tos == ["good@example.org"]
    sample = relay_server.metrics.registry.get_sample_value
    assert (
        sample(
            "relay_recipients_refused_total",
            {"account": "acme", "policy": "refuse_recipient", "reason": "listed"},
        )
        == 1
    )
    assert (
        sample(
            "relay_policy_verdicts_total",
            {
                "policy": "refuse_recipient",
                "stage": "rcpt",
                "outcome": "pass",
                "mode": "enforce",
            },
        )
        == 1
    )


async def test_message_refused_at_data_names_the_policy(relay_server: Relay) -> None:
    handler = relay_server.handler
    handler.pipeline = Pipeline([(RefuseLarge(), PolicySettings())], handler.observe)
    smtp = await client(relay_server)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    assert refused.value.code == 550
    assert "refuse_large" in refused.value.message
    assert "over 100 bytes" in refused.value.message
    await smtp.quit()


async def test_monitor_mode_counts_but_delivers(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    handler = relay_server.handler
    handler.pipeline = Pipeline(
        [(RefuseLarge(), PolicySettings(mode=Mode.MONITOR))], handler.observe
    )
    smtp = await client(relay_server)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    await smtp.quit()
    await upstream.wait_for(1)
    assert (
        relay_server.metrics.registry.get_sample_value(
            "relay_policy_verdicts_total",
            {
                "policy": "refuse_large",
                "stage": "data",
                "outcome": "refuse",
                "mode": "monitor",
            },
        )
        == 1
    )


async def test_a_failing_policy_defers_without_leaking_its_error(
    relay_server: Relay,
) -> None:
    handler = relay_server.handler
    handler.pipeline = Pipeline([(Exploding(), PolicySettings())], handler.observe)
    smtp = await client(relay_server)
    with pytest.raises(aiosmtplib.SMTPDataError) as deferred:
        await smtp.sendmail("news@acme.example", ["jane@example.org"], message())
    assert deferred.value.code == 451
    assert deferred.value.message.startswith("4.3.0")
    assert "secret" not in deferred.value.message
    await smtp.quit()
    assert (
        relay_server.metrics.registry.get_sample_value(
            "relay_policy_errors_total", {"policy": "exploding"}
        )
        == 1
    )


async def test_category_header_is_consumed_and_not_forwarded(
    relay_server: Relay, upstream: CaptureUpstream
) -> None:
    body = message(extra_headers="X-Relay-Category: transactional\r\n")
    smtp = await client(relay_server)
    await smtp.sendmail("news@acme.example", ["jane@example.org"], body)
    await smtp.quit()
    (got,) = await upstream.wait_for(1)
    assert b"X-Relay-Category" not in got.content
    assert got.content.endswith(
        body.replace(b"X-Relay-Category: transactional\r\n", b"")
    )


async def test_unknown_category_is_refused(relay_server: Relay) -> None:
    smtp = await client(relay_server)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await smtp.sendmail(
            "news@acme.example",
            ["jane@example.org"],
            message(extra_headers="X-Relay-Category: newsletter\r\n"),
        )
    assert refused.value.code == 550
    assert refused.value.message.startswith("5.6.0")
    assert "X-Relay-Category" in refused.value.message
    await smtp.quit()


class RecordKind:
    """Remembers the kind the pipeline was given."""

    name = "record_kind"
    stages = frozenset({Stage.DATA})

    def __init__(self) -> None:
        self.kinds: list[object] = []

    async def check(self, ctx: PolicyContext) -> Verdict:
        self.kinds.append(ctx.kind)
        return PASS


async def test_policies_see_the_classification(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay({"accounts": {"acme": {"default_category": "marketing"}}})
    recorder = RecordKind()
    relay.handler.pipeline = Pipeline(
        [(recorder, PolicySettings())], relay.handler.observe
    )
    smtp = await client(relay)
    await smtp.sendmail("news@acme.example", ["a@example.org"], message())
    await smtp.sendmail(
        "news@acme.example",
        ["b@example.org"],
        message(extra_headers="X-Relay-Category: transactional\r\n"),
    )
    await smtp.quit()
    await upstream.wait_for(2)
    assert recorder.kinds == [MessageKind.MARKETING, MessageKind.TRANSACTIONAL]


async def test_plain_passes_are_counted_once_and_observed_in_full_at_debug(
    relay_server: Relay,
    upstream: CaptureUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Passes take the counter's short way (no Observation each). With debug
    # logging on, observe() gets them in full, for its log line, and the metric
    # is still counted once.
    handler = relay_server.handler
    observed: list[Observation] = []
    full = handler.observe

    def observe(seen: Observation) -> None:
        observed.append(seen)
        full(seen)

    monkeypatch.setattr(handler, "observe", observe)
    handler.pipeline = Pipeline(
        [(RefuseRecipient("bad@example.org"), PolicySettings())],
        handler.observe,
        handler.observe_pass,
    )
    root = logging.getLogger()
    level = root.level

    async def send(rcpt: str) -> None:
        smtp = await client(relay_server)
        await smtp.sendmail("news@acme.example", [rcpt], message())
        await smtp.quit()

    try:
        root.setLevel(logging.INFO)
        await send("good@example.org")  # info: counted, nothing observed
        assert observed == []
        root.setLevel(logging.DEBUG)
        await send("other@example.org")  # debug: observed in full, counted once
    finally:
        root.setLevel(level)
    assert [(o.policy, o.stage, o.verdict) for o in observed] == [
        ("refuse_recipient", Stage.RCPT, PASS)
    ]
    await upstream.wait_for(2)
    assert (
        relay_server.metrics.registry.get_sample_value(
            "relay_policy_verdicts_total",
            {
                "policy": "refuse_recipient",
                "stage": "rcpt",
                "outcome": "pass",
                "mode": "enforce",
            },
        )
        == 2
    )
