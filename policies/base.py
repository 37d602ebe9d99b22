"""The vocabulary of the sending policy: stages, outcomes, verdicts, the check protocol.

Policies only decide. They build no SMTP replies, touch no aiosmtpd objects and
change state only through injected storage protocols; :mod:`policies.pipeline`
runs them, logs and counts every verdict, and applies monitor mode and timeouts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import date, datetime
from email.message import EmailMessage
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from storage.base import ConsentStore, SuppressionStore

T = TypeVar("T")


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
    recipients: tuple[str, ...] = ()
    """At DATA: the refusal concerns only these recipients (the others go on)."""


PASS = Verdict(Outcome.PASS)


def refuse(reason: str, detail: str, **figures: float) -> Verdict:
    """A permanent refusal."""
    return Verdict(Outcome.REFUSE, reason, detail, figures)


def refuse_recipients(
    recipients: tuple[str, ...], reason: str, detail: str, **figures: float
) -> Verdict:
    """At DATA, a permanent refusal of some recipients only."""
    return Verdict(Outcome.REFUSE, reason, detail, figures, recipients)


def defer(reason: str, detail: str, **figures: float) -> Verdict:
    """A temporary refusal."""
    return Verdict(Outcome.DEFER, reason, detail, figures)


class MessageLike(Protocol):
    """What DATA-stage checks may read of a message (``relay.message`` provides it).

    The message is parsed once and shared: ``headers`` is the header section
    parsed with ``email.policy.default``; ``parsed`` is the whole message (MIME
    tree, bodies), built on first use; ``memo`` caches anything derived from the
    message (the header fields, the decoded body texts) so that several checks
    pay for it once.
    """

    @property
    def size_bytes(self) -> int:
        """Size of the message as received."""
        ...

    @property
    def content(self) -> bytes:
        """The message as received (CRLF line endings)."""
        ...

    def header(self, name: str) -> str | None:
        """The raw unfolded value of the first ``name`` header, or ``None``."""
        ...

    @property
    def headers(self) -> EmailMessage:
        """The header section, parsed once with ``policy.default``."""
        ...

    @property
    def parsed(self) -> EmailMessage:
        """The whole message, parsed once with ``policy.default``."""
        ...

    def memo(self, key: str, build: Callable[[], T]) -> T:
        """``build()`` on the first call with ``key``, the same value after."""
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
    notes: MutableMapping[str, Any] = field(default_factory=dict)
    """Shared by the RCPT and DATA contexts of one transaction: a check may keep
    what it looked up per recipient and reuse it at DATA."""


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    """What the checks know of one sending account (from ``[accounts.NAME]``)."""

    name: str
    domains: Mapping[str, date] = field(default_factory=dict)
    """Canonical sender domain -> the date it was verified/registered."""
    default_kind: MessageKind | None = None
    allowed_senders: frozenset[str] = frozenset()
    """Extra addresses or domains allowed in Sender and Reply-To (canonical)."""
    allowed_content: frozenset[str] = frozenset()
    """Prohibited-content categories this account may nevertheless send."""


@dataclass(frozen=True, slots=True)
class PolicyEnv:
    """What the checks are built with: accounts, lists, a clock, data paths."""

    accounts: Mapping[str, AccountPolicy]
    clock: Clock
    suppressions: SuppressionStore | None = None
    """``None`` offline (``relay check``): list checks then pass at DATA."""
    consents: ConsentStore | None = None
    base_dir: Path = field(default_factory=Path)
    """Relative data-file paths in ``[policies.*]`` resolve against this
    (the directory of relay.toml)."""


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
