"""The pipeline: order, first refusal wins, monitor mode, fail-closed faults."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from policies import (
    PASS,
    Mode,
    Observation,
    OnError,
    Outcome,
    Pipeline,
    Policy,
    PolicyContext,
    PolicySettings,
    Stage,
    Verdict,
    refuse,
)


class Fixed:
    """A check that always returns the same verdict and records its calls."""

    def __init__(self, name: str, verdict: Verdict, stages: frozenset[Stage]) -> None:
        self.name = name
        self.stages = stages
        self.verdict = verdict
        self.calls = 0

    async def check(self, ctx: PolicyContext) -> Verdict:
        self.calls += 1
        return self.verdict


class Broken:
    """A check that raises or hangs."""

    stages = frozenset({Stage.DATA})

    def __init__(self, name: str, hang: bool = False) -> None:
        self.name = name
        self.hang = hang

    async def check(self, ctx: PolicyContext) -> Verdict:
        if self.hang:
            await asyncio.sleep(3600)
        raise RuntimeError("bug in the check")


BOTH = frozenset({Stage.RCPT, Stage.DATA})
DATA = frozenset({Stage.DATA})


def ctx(stage: Stage = Stage.DATA) -> PolicyContext:
    return PolicyContext(
        stage=stage,
        account="acme",
        mail_from="news@acme.example",
        received_at=datetime(2026, 11, 23, tzinfo=UTC),
    )


def build(*checks: tuple[Policy, PolicySettings]) -> tuple[Pipeline, list[Observation]]:
    seen: list[Observation] = []
    return Pipeline(checks, seen.append), seen


async def test_first_refusal_wins_and_later_checks_do_not_run() -> None:
    first = Fixed("first", PASS, BOTH)
    second = Fixed("second", refuse("nope", "refused by second"), BOTH)
    third = Fixed("third", refuse("also", "refused by third"), BOTH)
    pipeline, seen = build(
        (first, PolicySettings()), (second, PolicySettings()), (third, PolicySettings())
    )
    result = await pipeline.run(ctx())
    assert (result.policy, result.verdict.reason) == ("second", "nope")
    assert not result.passed
    assert (first.calls, second.calls, third.calls) == (1, 1, 0)
    assert [o.policy for o in seen] == ["first", "second"]  # passes are observed too
    assert pipeline.order == ("first", "second", "third")


async def test_checks_run_only_at_their_stages() -> None:
    data_only = Fixed("data_only", refuse("x", "x"), DATA)
    pipeline, seen = build((data_only, PolicySettings()))
    assert (await pipeline.run(ctx(Stage.RCPT))).passed
    assert data_only.calls == 0
    assert seen == []


async def test_monitor_mode_observes_the_refusal_but_lets_mail_through() -> None:
    watched = Fixed("watched", refuse("would_refuse", "would refuse"), BOTH)
    after = Fixed("after", PASS, BOTH)
    pipeline, seen = build(
        (watched, PolicySettings(mode=Mode.MONITOR)), (after, PolicySettings())
    )
    result = await pipeline.run(ctx())
    assert result.passed
    assert after.calls == 1
    assert (seen[0].mode, seen[0].verdict.outcome) == (Mode.MONITOR, Outcome.REFUSE)


async def test_a_failing_check_defers_fail_closed() -> None:
    pipeline, seen = build((Broken("broken"), PolicySettings()))
    result = await pipeline.run(ctx())
    assert result.verdict.outcome is Outcome.DEFER
    assert result.verdict.reason == "policy_error"
    assert "bug in the check" not in result.verdict.detail
    assert isinstance(seen[0].error, RuntimeError)


async def test_a_hanging_check_times_out_and_defers() -> None:
    pipeline, seen = build(
        (Broken("slow", hang=True), PolicySettings(timeout_seconds=0.05))
    )
    result = await pipeline.run(ctx())
    assert (result.verdict.outcome, result.policy) == (Outcome.DEFER, "slow")
    assert isinstance(seen[0].error, TimeoutError)


async def test_on_error_pass_lets_mail_through_but_still_reports_the_fault() -> None:
    pipeline, seen = build((Broken("lenient"), PolicySettings(on_error=OnError.PASS)))
    assert (await pipeline.run(ctx())).passed
    assert isinstance(seen[0].error, RuntimeError)


class SeesRecipients:
    """Records the recipients each call saw."""

    name = "sees"
    stages = DATA

    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    async def check(self, ctx: PolicyContext) -> Verdict:
        self.seen.append(ctx.recipients)
        return PASS


async def test_run_all_runs_every_check_but_the_first_refusal_decides() -> None:
    first = Fixed("first", refuse("one", "first refusal"), DATA)
    second = Fixed("second", refuse("two", "second refusal"), DATA)
    pipeline = Pipeline(
        [(first, PolicySettings()), (second, PolicySettings())], lambda _: None
    )
    decided = await pipeline.run(ctx(), run_all=True)
    assert (decided.policy, decided.verdict.reason) == ("first", "one")
    assert (first.calls, second.calls) == (1, 1)
    await pipeline.run(ctx())
    assert second.calls == 1  # without run_all the first refusal ends the stage


async def test_a_refusal_of_some_recipients_drops_only_them() -> None:
    some = Fixed(
        "some",
        Verdict(Outcome.REFUSE, "excluded", "on the list", {}, ("b@x.example",)),
        DATA,
    )
    sees = SeesRecipients()
    pipeline = Pipeline(
        [(some, PolicySettings()), (sees, PolicySettings())], lambda _: None
    )
    both = PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="n@acme.example",
        received_at=datetime(2026, 11, 23, tzinfo=UTC),
        recipients=("a@x.example", "b@x.example"),
    )
    decided = await pipeline.run(both)
    assert decided.passed
    assert set(decided.dropped) == {"b@x.example"}
    assert decided.dropped["b@x.example"][0] == "some"
    assert sees.seen == [("a@x.example",)]
    # A refusal naming every recipient refuses the message.
    alone = PolicyContext(
        stage=Stage.DATA,
        account="acme",
        mail_from="n@acme.example",
        received_at=datetime(2026, 11, 23, tzinfo=UTC),
        recipients=("b@x.example",),
    )
    decided = await pipeline.run(alone)
    assert not decided.passed
    assert decided.policy == "some"


class Suspending:
    """A check that waits on the event loop a few times before deciding."""

    stages = DATA

    def __init__(self, name: str, verdict: Verdict, *, fail: bool = False) -> None:
        self.name = name
        self.verdict = verdict
        self.fail = fail
        self.finished = False
        self.cancelled = False

    async def check(self, ctx: PolicyContext) -> Verdict:
        try:
            for _ in range(3):
                await asyncio.sleep(0)
            await asyncio.sleep(0.01)  # a real timer, not only a yield
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise RuntimeError("failed after waiting")
        self.finished = True
        return self.verdict


async def test_a_check_that_suspends_is_resumed_until_its_verdict() -> None:
    check = Suspending("slowish", refuse("late", "refused after waiting"))
    pipeline, seen = build((check, PolicySettings(timeout_seconds=5)))
    result = await pipeline.run(ctx())
    assert check.finished
    assert (result.policy, result.verdict.reason) == ("slowish", "late")
    assert seen[0].duration_seconds >= 0.01


async def test_a_check_that_fails_after_suspending_defers() -> None:
    check = Suspending("flaky", PASS, fail=True)
    pipeline, seen = build((check, PolicySettings()))
    result = await pipeline.run(ctx())
    assert result.verdict.outcome is Outcome.DEFER
    assert result.verdict.reason == "policy_error"
    assert isinstance(seen[0].error, RuntimeError)


async def test_a_check_that_suspends_past_its_timeout_is_cancelled() -> None:
    check = Suspending("slow", PASS)
    pipeline, _ = build((check, PolicySettings(timeout_seconds=0.005)))
    result = await pipeline.run(ctx())
    assert result.verdict.reason == "policy_error"
    assert check.cancelled
    assert not check.finished


async def test_cancelling_the_transaction_cancels_a_suspended_check() -> None:
    check = Suspending("slow", PASS)
    pipeline, seen = build((check, PolicySettings(timeout_seconds=5)))
    task = asyncio.create_task(pipeline.run(ctx()))
    for _ in range(2):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:  # pragma: no cover - the assertion below explains
        raise AssertionError("the run was not cancelled")
    assert check.cancelled
    assert seen == []


async def test_a_pass_counter_takes_plain_passes_and_the_observer_the_rest() -> None:
    plain = Fixed("plain", PASS, BOTH)
    noted = Fixed("noted", Verdict(Outcome.PASS, "allowed", "category allowed"), BOTH)
    watched = Fixed("watched", refuse("would_refuse", "would refuse"), BOTH)
    seen: list[Observation] = []
    counted: list[tuple[str, Stage, Mode, float]] = []
    pipeline = Pipeline(
        [
            (plain, PolicySettings()),
            (noted, PolicySettings()),
            (watched, PolicySettings(mode=Mode.MONITOR)),
            (Broken("broken"), PolicySettings(on_error=OnError.PASS)),
        ],
        seen.append,
        lambda *args: counted.append(args),
    )
    assert (await pipeline.run(ctx())).passed
    assert [(name, stage, mode) for name, stage, mode, _ in counted] == [
        ("plain", Stage.DATA, Mode.ENFORCE)
    ]
    assert counted[0][3] >= 0
    # A pass with a reason, a monitored refusal and a fault are observed in full.
    assert [o.policy for o in seen] == ["noted", "watched", "broken"]
    assert seen[2].error is not None and seen[2].verdict is PASS
