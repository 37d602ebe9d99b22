"""Refuses recipients on the exclusion list: opt-outs, bounces, complaints, traps.

``hard_bounce``, ``complaint`` and ``spamtrap`` entries refuse every kind of mail at
RCPT. The other reasons (``unsubscribe``, ``soft_bounce``, ``manual``, ``erasure``)
refuse marketing mail only. At RCPT the kind is known only when the account's
``default_category`` is ``marketing``; otherwise those entries are checked again at
DATA, once the message is classified, and refuse just the excluded recipients of a
marketing message (the others go on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies.base import (
    PASS,
    MessageKind,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
    refuse,
    refuse_recipients,
)
from storage.base import REFUSES_EVERY_CATEGORY, Suppression, SuppressionStore

_NOTE = "exclusion:"


class Exclusion:
    """Recipients on the exclusion list get no mail of the kinds their entry bars."""

    name = "exclusion"
    stages = frozenset({Stage.RCPT, Stage.DATA})

    def __init__(self, env: PolicyEnv) -> None:
        self._store: SuppressionStore | None = env.suppressions
        self._accounts = env.accounts
        self._clock = env.clock

    async def check(self, ctx: PolicyContext) -> Verdict:
        """At RCPT, one indexed lookup; at DATA, marketing mail only."""
        if self._store is None:
            return PASS
        if ctx.stage is Stage.RCPT:
            return await self._check_recipient(self._store, ctx)
        return await self._check_message(self._store, ctx)

    async def _check_recipient(
        self, store: SuppressionStore, ctx: PolicyContext
    ) -> Verdict:
        if ctx.recipient is None:
            return PASS
        entries = await store.suppressions_for(
            ctx.recipient, ctx.account, self._clock.now()
        )
        ctx.notes[_NOTE + ctx.recipient] = entries
        marketing = ctx.kind is MessageKind.MARKETING
        for entry in _strongest_first(entries):
            if marketing or entry.reason in REFUSES_EVERY_CATEGORY:
                return refuse(f"excluded_{entry.reason.value}", _describe(entry))
        return PASS

    async def _check_message(
        self, store: SuppressionStore, ctx: PolicyContext
    ) -> Verdict:
        account = self._accounts.get(ctx.account)
        decided_at_rcpt = (
            account is not None and account.default_kind is MessageKind.MARKETING
        )
        if ctx.kind is not MessageKind.MARKETING or decided_at_rcpt:
            return PASS
        now = self._clock.now()
        excluded: dict[str, Suppression] = {}
        for rcpt in ctx.recipients:
            # Looked up at RCPT a moment ago, unless the check was added since.
            entries = ctx.notes.get(_NOTE + rcpt)
            if entries is None:
                entries = await store.suppressions_for(rcpt, ctx.account, now)
            if entries:
                excluded[rcpt] = _strongest_first(entries)[0]
        if not excluded:
            return PASS
        first = next(iter(excluded.values()))
        others = len(excluded) - 1
        detail = _describe(first) + (
            f" (and {others} more excluded recipient(s))" if others else ""
        )
        # Naming them all refuses the message (the pipeline decides which).
        return refuse_recipients(
            tuple(excluded), f"excluded_{first.reason.value}", detail
        )


def _strongest_first(entries: list[Suppression]) -> list[Suppression]:
    """Entries that refuse every kind of mail first, then the oldest."""
    return sorted(
        entries,
        key=lambda e: (e.reason not in REFUSES_EVERY_CATEGORY, e.created_at),
    )


def _describe(entry: Suppression) -> str:
    scope = "every account" if entry.account is None else f"account {entry.account}"
    since = entry.created_at.date().isoformat()
    return (
        f"recipient is on the exclusion list ({entry.reason.value}, "
        f"for {scope}, since {since})"
    )


def from_table(table: Mapping[str, Any], env: PolicyEnv) -> Exclusion:
    """The check; it has no settings of its own."""
    if table:
        raise ValueError("; ".join(f"{key}: unknown key" for key in sorted(table)))
    return Exclusion(env)
