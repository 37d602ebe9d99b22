"""The exclusion and consent checks' verdicts, on a real SQLite store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from policies import MessageKind, Outcome, PolicyContext, Stage
from policies.base import AccountPolicy, PolicyEnv
from policies.consent import from_table as consent_check
from policies.exclusion import from_table as exclusion_check
from storage import SqliteStore
from storage.base import (
    ConsentRecord,
    ConsentSource,
    OptInType,
    Suppression,
    SuppressionReason,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class FixedClock:
    def now(self) -> datetime:
        return NOW

    def monotonic(self) -> float:
        return 0.0


def env(store: SqliteStore, default: MessageKind | None = None) -> PolicyEnv:
    return PolicyEnv(
        accounts={"acme": AccountPolicy(name="acme", default_kind=default)},
        clock=FixedClock(),
        suppressions=store,
        consents=store,
    )


def rcpt(address: str, kind: MessageKind | None) -> PolicyContext:
    return PolicyContext(
        stage=Stage.RCPT,
        account="acme",
        mail_from="news@acme.example",
        received_at=NOW,
        recipient=address,
        kind=kind,
    )


def data(*recipients: str, kind: MessageKind) -> PolicyContext:
    return PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="news@acme.example",
        received_at=NOW,
        recipients=recipients,
        kind=kind,
    )


def entry(
    address: str,
    reason: SuppressionReason,
    account: str | None = None,
    expires_at: datetime | None = None,
) -> Suppression:
    return Suppression(
        address=address,
        account=account,
        reason=reason,
        source="test",
        created_at=NOW - timedelta(days=2),
        expires_at=expires_at,
    )


async def test_exclusion_refuses_by_reason_and_kind(store: SqliteStore) -> None:
    await store.add_suppressions(
        [
            entry("unsub@example.org", SuppressionReason.UNSUBSCRIBE),
            entry("bounced@example.org", SuppressionReason.HARD_BOUNCE),
            entry("other@example.org", SuppressionReason.MANUAL, account="other"),
            entry(
                "soft@example.org",
                SuppressionReason.SOFT_BOUNCE,
                expires_at=NOW - timedelta(seconds=1),
            ),
        ]
    )
    check = exclusion_check({}, env(store))
    marketing, transactional = MessageKind.MARKETING, MessageKind.TRANSACTIONAL
    verdict = await check.check(rcpt("unsub@example.org", marketing))
    assert (verdict.outcome, verdict.reason) == (Outcome.REFUSE, "excluded_unsubscribe")
    assert verdict.detail == (
        "recipient is on the exclusion list (unsubscribe, for every account, "
        "since 2026-11-21)"
    )
    assert (await check.check(rcpt("unsub@example.org", transactional))).outcome is (
        Outcome.PASS
    )
    assert (await check.check(rcpt("UNSUB@example.org", None))).outcome is Outcome.PASS
    hard = await check.check(rcpt("bounced@example.org", transactional))
    assert hard.reason == "excluded_hard_bounce"
    assert (await check.check(rcpt("other@example.org", marketing))).outcome is (
        Outcome.PASS
    )
    assert (await check.check(rcpt("soft@example.org", marketing))).outcome is (
        Outcome.PASS
    )


async def test_exclusion_at_data_names_only_the_excluded_recipients(
    store: SqliteStore,
) -> None:
    await store.add_suppressions([entry("gone@example.org", SuppressionReason.ERASURE)])
    check = exclusion_check({}, env(store))
    some = await check.check(
        data("stay@example.org", "gone@example.org", kind=MessageKind.MARKETING)
    )
    assert (some.outcome, some.recipients) == (Outcome.REFUSE, ("gone@example.org",))
    alone = await check.check(data("gone@example.org", kind=MessageKind.MARKETING))
    assert (alone.outcome, alone.recipients) == (Outcome.REFUSE, ("gone@example.org",))
    receipt = await check.check(
        data("gone@example.org", kind=MessageKind.TRANSACTIONAL)
    )
    assert receipt.outcome is Outcome.PASS
    # An account whose mail is marketing by default was decided at RCPT.
    decided = exclusion_check({}, env(store, MessageKind.MARKETING))
    again = await decided.check(data("gone@example.org", kind=MessageKind.MARKETING))
    assert again.outcome is Outcome.PASS


async def test_exclusion_has_no_settings(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="strict: unknown key"):
        exclusion_check({"strict": True}, env(store))


def record(address: str, opt_in: OptInType, relationship: str = "") -> ConsentRecord:
    return ConsentRecord(
        account="acme",
        address=address,
        collected_at=NOW - timedelta(days=10),
        source=ConsentSource.EVENT,
        opt_in=opt_in,
        confirmed_at=None if opt_in is OptInType.SINGLE else NOW,
        relationship=relationship,
    )


async def test_consent_by_opt_in_type_and_relationship(store: SqliteStore) -> None:
    await store.add_consents(
        [
            record("single@example.org", OptInType.SINGLE),
            record("double@example.org", OptInType.DOUBLE),
            record("client@example.org", OptInType.SINGLE, "customer since 2020"),
        ]
    )
    strict = consent_check(
        {"require": "double", "accept_relationship": False}, env(store)
    )
    lenient = consent_check({"require": "single"}, env(store))
    marketing = MessageKind.MARKETING
    assert (await strict.check(rcpt("double@example.org", marketing))).outcome is (
        Outcome.PASS
    )
    weak = await strict.check(rcpt("client@example.org", marketing))
    assert (weak.reason, weak.detail) == (
        "consent_too_weak",
        "consent is single opt-in; marketing needs double",
    )
    none = await lenient.check(rcpt("nobody@example.org", marketing))
    assert none.reason == "no_consent"
    assert (await lenient.check(rcpt("single@example.org", marketing))).outcome is (
        Outcome.PASS
    )
    receipt = await strict.check(rcpt("nobody@example.org", MessageKind.TRANSACTIONAL))
    assert receipt.outcome is Outcome.PASS


async def test_consent_settings_are_validated(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="require"):
        consent_check({"require": "triple"}, env(store))
    with pytest.raises(ValueError, match="unknown: unknown key"):
        consent_check({"unknown": 1}, env(store))
