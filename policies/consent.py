"""Marketing recipients need provable consent (off unless listed in ``order``).

A recipient passes with a consent record of the account whose opt-in type is at
least ``require`` (``single`` < ``confirmed`` < ``double``), or, when
``accept_relationship`` is on, a record that states an existing customer
relationship. Like the exclusion check, it decides at RCPT when the account's
default category is marketing, and otherwise at DATA once the message is
classified, refusing only the recipients without consent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

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
from policies.settings import parse_settings
from storage.base import ConsentRecord, ConsentStore, OptInType

_NOTE = "consent:"
_RANK = {opt_in: opt_in.rank for opt_in in OptInType}
"""``OptInType.rank``, looked up (the property lists the members each time)."""


class ConsentSettings(BaseModel):
    """``[policies.consent]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    require: OptInType = OptInType.CONFIRMED
    """The weakest opt-in type accepted."""
    accept_relationship: bool = True
    """An existing customer relationship counts as consent (soft opt-in)."""


class Consent:
    """Refuses marketing recipients without a sufficient consent record."""

    name = "consent"
    stages = frozenset({Stage.RCPT, Stage.DATA})

    def __init__(self, settings: ConsentSettings, env: PolicyEnv) -> None:
        self._settings = settings
        self._store: ConsentStore | None = env.consents
        self._accounts = env.accounts

    async def check(self, ctx: PolicyContext) -> Verdict:
        """At RCPT when the kind is known, else at DATA for marketing mail."""
        if self._store is None or ctx.kind is not MessageKind.MARKETING:
            return PASS
        if ctx.stage is Stage.RCPT:
            if ctx.recipient is None:
                return PASS
            record = await self._store.consent_for(ctx.account, ctx.recipient)
            ctx.notes[_NOTE + ctx.recipient] = record
            problem = self._problem(record)
            return PASS if problem is None else refuse(*problem)
        account = self._accounts.get(ctx.account)
        if account is not None and account.default_kind is MessageKind.MARKETING:
            return PASS  # already decided recipient by recipient at RCPT
        refused: dict[str, tuple[str, str]] = {}
        for rcpt in ctx.recipients:
            key = _NOTE + rcpt
            # Looked up at RCPT a moment ago, unless the check was added since.
            record = (
                ctx.notes[key]
                if key in ctx.notes
                else await self._store.consent_for(ctx.account, rcpt)
            )
            problem = self._problem(record)
            if problem is not None:
                refused[rcpt] = problem
        if not refused:
            return PASS
        reason, detail = next(iter(refused.values()))
        if len(refused) > 1:
            detail += f" (and {len(refused) - 1} more recipient(s))"
        # Naming them all refuses the message (the pipeline decides which).
        return refuse_recipients(tuple(refused), reason, detail)

    def _problem(self, record: ConsentRecord | None) -> tuple[str, str] | None:
        required = self._settings.require
        if record is None:
            return (
                "no_consent",
                f"no consent record for this recipient (marketing needs "
                f"{required.value} opt-in)",
            )
        if self._settings.accept_relationship and record.relationship:
            return None
        if _RANK[record.opt_in] < _RANK[required]:
            return (
                "consent_too_weak",
                f"consent is {record.opt_in.value} opt-in; marketing needs "
                f"{required.value}",
            )
        return None


def from_table(table: Mapping[str, Any], env: PolicyEnv) -> Consent:
    """Validate ``[policies.consent]`` and build the check."""
    return Consent(parse_settings(ConsentSettings, table), env)
