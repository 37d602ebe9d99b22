"""The vocabulary of the sending policy: stages, outcomes, verdicts, the check protocol.

Policies only decide. They build no SMTP replies, touch no aiosmtpd objects and
change state only through injected storage protocols; :mod:`policies.pipeline`
runs them, logs and counts every verdict, and applies monitor mode and timeouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol


class Stage(StrEnum):
    """When a check runs: per recipient (envelope only) or on the whole message."""

    RCPT = "rcpt"
    DATA = "data"


class Outcome(StrEnum):
    """What a check decided."""

    PASS = "pass"  # noqa: S105 - an outcome, not a secret
    REFUSE = "refuse"  # permanent: the relay answers 5xx
    DEFER = "defer"  # temporary: the relay answers 4xx


class Mode(StrEnum):
    """``enforce`` acts on refusals; ``monitor`` only logs and counts them."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


class OnError(StrEnum):
    """What a check that fails or times out yields: fail closed, or let it pass."""

    DEFER = "defer"
    PASS = "pass"  # noqa: S105 - an outcome, not a secret


class MessageKind(StrEnum):
    """Marketing mail carries obligations transactional mail does not."""

    MARKETING = "marketing"
    TRANSACTIONAL = "transactional"


@dataclass(frozen=True, slots=True)
class Verdict:
    """One check's decision, with a reason token and a sentence that explains it."""

    outcome: Outcome
    reason: str = ""
    """Bounded snake_case token; also a metric label."""
    detail: str = ""
    """One sentence for the reply and the log, naming the figure that decided."""
    figures: Mapping[str, float] = field(default_factory=dict)


PASS = Verdict(Outcome.PASS)


def refuse(reason: str, detail: str, **figures: float) -> Verdict:
    """A permanent refusal."""
    return Verdict(Outcome.REFUSE, reason, detail, figures)


def defer(reason: str, detail: str, **figures: float) -> Verdict:
    """A temporary refusal."""
    return Verdict(Outcome.DEFER, reason, detail, figures)


class MessageLike(Protocol):
    """What DATA-stage checks may read of a message (``relay.message`` provides it)."""

    @property
    def size_bytes(self) -> int:
        """Size of the message as received."""
        ...


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """Everything a check may look at, as an immutable snapshot.

    At RCPT, ``recipient`` is the one being decided and ``message`` is ``None``;
    at DATA, ``recipients`` holds every accepted recipient and ``message`` is set.
    """

    stage: Stage
    account: str
    mail_from: str
    received_at: datetime
    peer_ip: str = ""
    tls: bool = False
    recipient: str | None = None
    recipients: tuple[str, ...] = ()
    message: MessageLike | None = None
    kind: MessageKind | None = None


class Policy(Protocol):
    """One check. ``name`` is its module name and its relay.toml table name.

    ``check`` is called once per stage it declares in ``stages``; it returns a
    verdict and raises only for faults (which the pipeline turns into DEFER).
    """

    name: str
    stages: frozenset[Stage]

    async def check(self, ctx: PolicyContext) -> Verdict:
        """Decide for this context."""
        ...


class Clock(Protocol):
    """Wall time (aware UTC) and monotonic time."""

    def now(self) -> datetime:
        """The current time, aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...
