"""Runs the configured checks for a stage, in order; the first refusal wins.

Every verdict, passes included, goes to the observer (a log line and metrics in the
relay). A check runs inside ``asyncio.timeout``; one that raises or times out
yields DEFER with reason ``policy_error`` (fail closed) unless its table says
``on_error = "pass"``. In monitor mode a refusal is reported as what it would have
been and the stage goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar, cast

from policies.base import (
    PASS,
    Mode,
    OnError,
    Outcome,
    Policy,
    PolicyContext,
    Stage,
    Verdict,
    defer,
)

POLICY_ERROR = "policy_error"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """How one check is run: its mode, what a fault yields, and its time budget."""

    mode: Mode = Mode.ENFORCE
    on_error: OnError = OnError.DEFER
    timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class Observation:
    """One verdict as the pipeline saw it, for logs and metrics."""

    policy: str
    stage: Stage
    verdict: Verdict
    mode: Mode
    duration_seconds: float
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class StageResult:
    """The decision for a stage: the deciding verdict and the policy behind it."""

    verdict: Verdict
    policy: str | None = None
    dropped: Mapping[str, tuple[str, Verdict]] = field(default_factory=dict)
    """Recipients refused on their own at DATA: address -> (policy, verdict)."""

    @property
    def passed(self) -> bool:
        """True when no enforcing check refused or deferred."""
        return self.verdict.outcome is Outcome.PASS


Observer = Callable[[Observation], None]
PassCounter = Callable[[str, Stage, Mode, float], None]
"""``(policy, stage, mode, seconds)``: a plain pass (:data:`PASS`, no error).

Most verdicts are plain passes, several per message; counting them without an
:class:`Observation` each saves the relay's event loop real time. Without a
counter, passes go to the observer like every other verdict.
"""


class Pipeline:
    """An ordered list of checks with their settings; immutable once built."""

    def __init__(
        self,
        checks: Sequence[tuple[Policy, PolicySettings]],
        observer: Observer,
        passed: PassCounter | None = None,
    ) -> None:
        self._checks = tuple(checks)
        self._observer = observer
        self._passed = passed
        self._at: dict[Stage, tuple[tuple[Policy, PolicySettings], ...]] = {
            stage: tuple(c for c in self._checks if stage in c[0].stages)
            for stage in Stage
        }
        """The checks of each stage, in order."""
        self._stages = frozenset(stage for stage, at in self._at.items() if at)

    def runs_at(self, stage: Stage) -> bool:
        """True if any check runs at ``stage`` (callers skip building a context)."""
        return stage in self._stages

    def time_budget(self, stage: Stage) -> float:
        """The seconds the checks at ``stage`` may take together (their timeouts)."""
        return sum(
            settings.timeout_seconds
            for policy, settings in self._checks
            if stage in policy.stages
        )

    @property
    def order(self) -> tuple[str, ...]:
        """The names of the checks, in the order they run."""
        return tuple(policy.name for policy, _ in self._checks)

    def policy(self, name: str) -> Policy | None:
        """The configured check called ``name``, if any."""
        for policy, _ in self._checks:
            if policy.name == name:
                return policy
        return None

    async def run(self, ctx: PolicyContext, *, run_all: bool = False) -> StageResult:
        """Run every check that declares ``ctx.stage``; stop at the first refusal.

        At DATA a refusal that names some of the recipients (``Verdict.recipients``)
        drops only those: the later checks see the others, and the stage passes
        for them. With ``run_all`` (``relay check``) the later checks run too, so
        that the observer sees every verdict; the first enforcing refusal still
        decides.
        """
        decided: StageResult | None = None
        dropped: dict[str, tuple[str, Verdict]] = {}
        for policy, settings in self._at[ctx.stage]:
            # (One check, inline: this loop runs for every recipient and message.)
            started = time.monotonic()
            error: Exception | None = None
            try:
                # The check runs under asyncio.timeout; but one that ends without
                # suspending (in-memory work, a synchronous indexed lookup) arms
                # no timer: a timeout could not have interrupted it anyway, and
                # arming one costs more than many checks do.
                check = policy.check(ctx)
                try:
                    waiting_on = check.send(None)
                except StopIteration as done:
                    verdict: Verdict = done.value
                else:
                    async with asyncio.timeout(settings.timeout_seconds):
                        verdict = await _Resumed(check, waiting_on)
            except Exception as exc:  # noqa: BLE001 - pipeline boundary: fail closed
                error = exc
                verdict = self._on_error(policy, settings, exc)
            if verdict is PASS and error is None and self._passed is not None:
                self._passed(
                    policy.name, ctx.stage, settings.mode, time.monotonic() - started
                )
                continue
            self._observer(
                Observation(  # positional: one per check of every message
                    policy.name,
                    ctx.stage,
                    verdict,
                    settings.mode,
                    time.monotonic() - started,
                    error,
                )
            )
            if (
                verdict.outcome is Outcome.PASS
                or settings.mode is not Mode.ENFORCE
                or decided is not None
            ):
                continue
            partial = set(verdict.recipients) & set(ctx.recipients)
            if partial and len(partial) < len(ctx.recipients):
                for address in sorted(partial):
                    dropped.setdefault(address, (policy.name, verdict))
                ctx = replace(
                    ctx,
                    recipients=tuple(r for r in ctx.recipients if r not in partial),
                )
                continue
            decided = StageResult(verdict, policy.name, dropped)
            if not run_all:
                break
        return decided or StageResult(PASS, None, dropped)

    @staticmethod
    def _on_error(
        policy: Policy, settings: PolicySettings, error: Exception
    ) -> Verdict:
        """What a check that raised ``error`` (or timed out) yields."""
        if settings.on_error is OnError.PASS:
            return PASS
        what = "timed out" if isinstance(error, TimeoutError) else "failed"
        return defer(POLICY_ERROR, f"policy {policy.name} {what}; try again later")


class _Resumed(Generic[T]):
    """The rest of a coroutine that suspended once already: awaiting this does
    what ``yield from`` would have done from there on."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, None, T]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                yield waiting_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - cancellation: pass it in
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration as done:
                    return cast(T, done.value)
                continue
            try:
                waiting_on = coro.send(None)
            except StopIteration as done:
                return cast(T, done.value)
