"""The DATA-stage checks in worker processes: through real SMTP, and the pool's faults.

Each relay here runs with ``[policies] workers = 1`` (the suite's base config runs
the checks in process). The pool's fault handling (a hung worker, one that dies
mid-request, one that cannot start) is tested on ``PolicyWorkers`` itself, with
worker commands of our own.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

import relay.policy_workers as policy_workers_module
from config import ConfigError, RelayConfig, parse_config
from policies import (
    PASS,
    MessageKind,
    Observation,
    Outcome,
    Pipeline,
    PolicyContext,
    PolicySettings,
    Stage,
    StageResult,
    Verdict,
    refuse,
)
from relay import __version__
from relay.app import Relay
from relay.message import MessageView
from relay.metrics import Metrics
from relay.policy_workers import PolicyWorkers, WorkerSetup
from storage.base import Suppression, SuppressionReason
from tests.conftest import ACCOUNT, StartRelay, client, config_dict, merge, message
from tests.support.upstream import CaptureUpstream

OLD = date(2024, 1, 15)
SECRET = "a-feedback-secret-of-at-least-32-characters"
MARKETING = "X-Relay-Category: marketing\r\n"
LINK_BODY = (
    "Our autumn collection is here.\r\n\r\n"
    "Unsubscribe: https://acme.example/unsubscribe?u=42\r\n"
)
CHECKS = (
    "exclusion",
    "header_sanity",
    "sender_domains",
    "optout_link",
    "content_categories",
)
WAIT_SECONDS = 10.0


def overrides(workers: int, **extra: Any) -> dict[str, Any]:
    """Every check enforced, ``workers`` policy workers, acme owning acme.example."""
    return merge(
        {
            "policies": {"workers": workers, "order": list(CHECKS)},
            "accounts": {ACCOUNT: {"domains": {"acme.example": OLD}}},
            "feedback": {"secret": SECRET},
            "http": {"public_url": "https://relay.example"},
        },
        extra,
    )


def clean(tag: str) -> bytes:
    """A marketing message that passes every check; ``tag`` is its Subject."""
    return message(subject=tag, body=f"{tag}\r\n{LINK_BODY}", extra_headers=MARKETING)


FOREIGN_FROM = message(sender="news@someone-else.example")


async def send(
    relay: Relay,
    content: bytes,
    recipients: tuple[str, ...] = ("jane@example.org",),
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """Send ``content`` from news@acme.example; raises on a refusal at DATA."""
    smtp = await client(relay)
    try:
        return await smtp.sendmail("news@acme.example", list(recipients), content)
    finally:
        await smtp.quit()


async def data_reply(relay: Relay, content: bytes) -> tuple[int, str]:
    """The reply to DATA for ``content``, accepted or not."""
    try:
        _, text = await send(relay, content)
    except aiosmtplib.SMTPDataError as exc:
        return exc.code, exc.message
    return 250, text


def without_ref(text: str) -> str:
    """A refusal without its trailing ``[ref SESSION]`` (one per session)."""
    head, ref = text.rsplit(" [ref ", 1)
    assert re.fullmatch(r"[0-9a-f]+\]", ref), text
    return head


def sample(relay_or_metrics: Relay | Metrics, name: str, **labels: str) -> float:
    metrics = (
        relay_or_metrics.metrics
        if isinstance(relay_or_metrics, Relay)
        else relay_or_metrics
    )
    return metrics.registry.get_sample_value(name, labels) or 0.0


def worker_failures(relay_or_metrics: Relay | Metrics, reason: str) -> float:
    return sample(relay_or_metrics, "relay_policy_worker_failures_total", reason=reason)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``WAIT_SECONDS``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"still waiting after {WAIT_SECONDS}s for {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """True while a process with this pid exists (a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children_running(marker: str) -> list[int]:
    """Pids of this process's live children whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and marker.encode() in cmdline:
            found.append(int(entry.name))
    return found


def local_stages(relay: Relay, monkeypatch: pytest.MonkeyPatch) -> list[Stage]:
    """Record the stages the relay process's own pipeline runs from now on."""
    pipeline = relay.handler.pipeline
    real = pipeline.run
    stages: list[Stage] = []

    async def spy(ctx: PolicyContext, *, run_all: bool = False) -> StageResult:
        stages.append(ctx.stage)
        return await real(ctx, run_all=run_all)

    monkeypatch.setattr(pipeline, "run", spy)
    return stages


async def suppress(relay: Relay, address: str) -> None:
    """An unsubscribe (marketing only) for every account, written now."""
    await relay.store.add_suppressions(
        [
            Suppression(
                address=address,
                account=None,
                reason=SuppressionReason.UNSUBSCRIBE,
                source="test",
                created_at=datetime.now(UTC) - timedelta(days=1),
            )
        ]
    )


# -- through the relay -------------------------------------------------------------


async def test_worker_answers_exactly_as_the_relay_process_does(
    start_relay: StartRelay,
    upstream: CaptureUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    in_process = await start_relay(
        overrides(0, storage={"url": f"sqlite:///{tmp_path / 'in-process.db'}"})
    )
    assert in_process.policy_workers is None
    relay = await start_relay(overrides(1))
    workers = relay.policy_workers
    assert workers is not None
    assert relay.handler.data_checks == workers.run
    pids = workers.pids
    assert len(pids) == 1
    assert os.getpid() not in pids
    assert alive(pids[0])
    assert sample(relay, "relay_policy_workers_ready") == 1
    stages = local_stages(relay, monkeypatch)

    expected_code, expected = await data_reply(in_process, FOREIGN_FROM)
    code, text = await data_reply(relay, FOREIGN_FROM)
    assert (code, without_ref(text)) == (expected_code, without_ref(expected))
    assert code == 550
    assert text.startswith(
        "5.7.1 Refused by policy sender_domains: From domain "
        "someone-else.example is not a domain of account acme"
    )

    _, reply = await send(relay, clean("clean through the worker"))
    assert reply.startswith("2.0.0 Ok: queued as")
    (delivered,) = await upstream.wait_for(1)
    assert delivered.rcpt_tos == ["jane@example.org"]
    assert b"Subject: clean through the worker" in delivered.content

    # The relay process ran the RCPT stage only: the DATA stage ran in the worker.
    assert Stage.RCPT in stages
    assert Stage.DATA not in stages
    # ... and its verdicts were counted here all the same.
    verdicts = {
        outcome: sample(
            relay,
            "relay_policy_verdicts_total",
            policy="sender_domains",
            stage="data",
            outcome=outcome,
            mode="enforce",
        )
        for outcome in ("refuse", "pass")
    }
    assert verdicts == {"refuse": 1, "pass": 1}
    assert (
        sample(
            relay,
            "relay_policy_verdicts_total",
            policy="optout_link",
            stage="data",
            outcome="pass",
            mode="enforce",
        )
        == 1
    )
    assert (
        sample(
            relay, "relay_policy_check_duration_seconds_count", policy="sender_domains"
        )
        == sample(
            in_process,
            "relay_policy_check_duration_seconds_count",
            policy="sender_domains",
        )
        + 1
    )
    assert workers.pids == pids  # nothing went wrong with the worker


async def test_exclusion_at_data_in_the_worker(
    start_relay: StartRelay,
    upstream: CaptureUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No default category: unsubscribes are checked at DATA, once the message is
    # known to be marketing.
    relay = await start_relay({"policies": {"workers": 1, "order": ["exclusion"]}})
    workers = relay.policy_workers
    assert workers is not None
    assert workers.pids
    stages = local_stages(relay, monkeypatch)
    await suppress(relay, "gone@example.org")  # after the worker opened the store

    smtp = await client(relay)
    await smtp.mail("news@acme.example")
    for rcpt in ("stay@example.org", "gone@example.org", "late@example.org"):
        await smtp.rcpt(rcpt)
    # Excluded between RCPT and DATA: the RCPT lookup (in ctx.notes, which the
    # worker gets) found nothing, and that decides, as in the relay process.
    await suppress(relay, "late@example.org")
    response = await smtp.data(message(extra_headers=MARKETING))
    await smtp.quit()
    assert response.code == 250
    assert "1 recipient(s) refused by policy, reported in a DSN" in response.message

    await upstream.wait_for(2)
    (delivered,) = upstream.to("stay@example.org")
    assert sorted(delivered.rcpt_tos) == ["late@example.org", "stay@example.org"]
    (dsn,) = upstream.to("news@acme.example")
    assert b"gone@example.org" in dsn.content
    assert not upstream.to("gone@example.org")
    assert (
        sample(
            relay,
            "relay_recipients_refused_total",
            account=ACCOUNT,
            policy="exclusion",
            reason="excluded_unsubscribe",
        )
        == 1
    )
    assert Stage.DATA not in stages

    # Without notes the worker looks the recipients up itself, through its own
    # read-only connection, opened before these entries were written.
    result = await workers.run(
        PolicyContext(
            stage=Stage.DATA,
            account=ACCOUNT,
            mail_from="news@acme.example",
            received_at=datetime.now(UTC),
            recipients=("late@example.org", "stay@example.org"),
            message=MessageView(message()),
            kind=MessageKind.MARKETING,
        )
    )
    assert result.passed
    assert list(result.dropped) == ["late@example.org"]
    policy, verdict = result.dropped["late@example.org"]
    assert policy == "exclusion"
    assert verdict.outcome is Outcome.REFUSE
    assert verdict.reason == "excluded_unsubscribe"
    assert Stage.DATA not in stages


async def test_a_killed_worker_is_replaced_and_no_accepted_mail_is_lost(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(overrides(1))
    workers = relay.policy_workers
    assert workers is not None
    (killed,) = workers.pids
    accepted: list[str] = []

    async def exchange(tag: str) -> None:
        """A refused and a clean message; both get real verdicts."""
        code, text = await data_reply(relay, FOREIGN_FROM)
        assert code == 550, text
        assert "sender_domains" in text
        code, text = await data_reply(relay, clean(tag))
        assert code == 250, text
        accepted.append(tag)

    os.kill(killed, signal.SIGKILL)
    # A message in the worker when it died costs 451; one accepted is kept.
    code, text = await data_reply(relay, clean("at the kill"))
    assert code in {250, 451}, text
    if code == 250:
        accepted.append("at the kill")
    else:
        assert text.startswith("4.3.0")

    await wait_until(lambda: killed not in workers.pids, "the death to be noticed")
    await exchange("after the kill")
    await wait_until(
        lambda: bool(workers.pids) and killed not in workers.pids,
        "a new worker",
    )
    (replacement,) = workers.pids
    assert replacement != killed
    assert replacement != os.getpid()
    assert not alive(killed)
    await exchange("with the new worker")

    assert worker_failures(relay, "exited") == 1
    assert worker_failures(relay, "stuck") == 0
    assert sample(relay, "relay_policy_workers_ready") == 1
    await upstream.wait_for(len(accepted))
    subjects = sorted(
        line.removeprefix(b"Subject: ").decode()
        for got in upstream.messages
        for line in got.content.split(b"\r\n")
        if line.startswith(b"Subject: ")
    )
    assert subjects == sorted(accepted)


async def test_spam_subject_warning_in_the_worker_is_counted_in_the_relay(
    start_relay: StartRelay,
    upstream: CaptureUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    relay = await start_relay(overrides(1))
    assert relay.policy_workers is not None
    assert relay.policy_workers.pids
    stages = local_stages(relay, monkeypatch)
    _, reply = await send(relay, clean("Act now: limited time offer"))
    assert reply.startswith("2.0.0 Ok: queued as")
    _, reply = await send(relay, clean("Autumn news"))
    assert reply.startswith("2.0.0 Ok: queued as")
    await upstream.wait_for(2)
    assert Stage.DATA not in stages
    assert sample(relay, "relay_spam_subject_warnings_total", account=ACCOUNT) == 1


async def test_shutdown_ends_the_worker_processes(start_relay: StartRelay) -> None:
    relay = await start_relay(overrides(1))
    workers = relay.policy_workers
    assert workers is not None
    pids = workers.pids
    assert pids
    assert all(alive(pid) for pid in pids)
    await relay.shutdown()
    await wait_until(lambda: not any(alive(pid) for pid in pids), "the workers to exit")
    assert workers.pids == []
    assert sample(relay, "relay_policy_workers_ready") == 0
    assert worker_failures(relay, "exited") == 0


# -- the pool on its own ----------------------------------------------------------

FAKE_WORKER = """
import os, pickle, struct, sys

stdin, stdout = sys.stdin.buffer, sys.stdout.buffer

def skip_frame():
    head = stdin.read(4)
    if len(head) < 4:
        sys.exit(0)  # the relay closed our stdin
    stdin.read(struct.unpack("!I", head)[0])

skip_frame()  # the set-up
ready = pickle.dumps(("ready", os.getpid()))
stdout.write(struct.pack("!I", len(ready)) + ready)
stdout.flush()
"""
"""A worker of our own: it reads the set-up and says it is ready."""
HANGING_WORKER = (
    "# policy-worker-that-hangs" + FAKE_WORKER + "while True:\n    skip_frame()\n"
)
"""... then reads requests and never answers."""
DYING_WORKER = (
    "# policy-worker-that-dies-mid-request"
    + FAKE_WORKER
    + "skip_frame()\nos._exit(3)\n"
)
"""... then dies on its first request (its successors too)."""


class RefuseAll:
    """Refuses every message at DATA."""

    name = "refuse_all"
    stages = frozenset({Stage.DATA})

    async def check(self, ctx: PolicyContext) -> Verdict:
        return refuse("test_refusal", "every message is refused here")


class PassAll:
    """Passes every message at DATA."""

    name = "pass_all"
    stages = frozenset({Stage.DATA})

    async def check(self, ctx: PolicyContext) -> Verdict:
        return PASS


def setup_for(tmp_path: Path) -> WorkerSetup:
    config: RelayConfig = parse_config(
        config_dict(tmp_path / "relay.db", "smtp://127.0.0.1:9")
    )
    return WorkerSetup(config, None, None, "info")


def data_context() -> PolicyContext:
    return PolicyContext(
        stage=Stage.DATA,
        account=ACCOUNT,
        mail_from="news@acme.example",
        received_at=datetime.now(UTC),
        recipients=("jane@example.org",),
        message=MessageView(message()),
        kind=MessageKind.TRANSACTIONAL,
    )


async def test_a_hung_worker_is_killed_and_the_message_deferred(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policy_workers_module, "DEADLINE_MARGIN_SECONDS", 0.2)
    observed: list[Observation] = []
    local = Pipeline(
        [(PassAll(), PolicySettings(timeout_seconds=0.1))], observed.append
    )
    metrics = Metrics(__version__)
    workers = PolicyWorkers(
        setup_for(tmp_path),
        local,
        observed.append,
        metrics,
        count=1,
        command=[sys.executable, "-c", HANGING_WORKER],
    )
    try:
        await workers.start()
        (hung,) = workers.pids
        assert alive(hung)
        async with asyncio.timeout(WAIT_SECONDS):  # a bound, not a measurement
            result = await workers.run(data_context())
        assert result.verdict.outcome is Outcome.DEFER
        assert result.verdict.reason == "policy_error"
        assert not result.passed
        assert observed == []  # not run in the relay process instead
        await wait_until(lambda: not alive(hung), "the hung worker to be killed")
        await wait_until(
            lambda: worker_failures(metrics, "stuck") == 1, "the failure count"
        )
        assert worker_failures(metrics, "exited") == 0
        await wait_until(
            lambda: bool(workers.pids) and hung not in workers.pids,
            "a replacement",
        )
    finally:
        await workers.close()
    assert workers.pids == []
    await wait_until(
        lambda: not children_running("policy-worker-that-hangs"),
        "no fake worker left",
    )


async def test_a_worker_that_dies_mid_request_defers_that_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No deadline to save the request: only the worker's death can end it.
    monkeypatch.setattr(policy_workers_module, "DEADLINE_MARGIN_SECONDS", 3600.0)
    observed: list[Observation] = []
    local = Pipeline([(PassAll(), PolicySettings())], observed.append)
    metrics = Metrics(__version__)
    workers = PolicyWorkers(
        setup_for(tmp_path),
        local,
        observed.append,
        metrics,
        count=1,
        command=[sys.executable, "-c", DYING_WORKER],
    )
    try:
        await workers.start()
        (dying,) = workers.pids
        async with asyncio.timeout(WAIT_SECONDS):  # a bound, not a measurement
            result = await workers.run(data_context())
        assert result.verdict.outcome is Outcome.DEFER
        assert result.verdict.reason == "policy_error"
        assert observed == []
        await wait_until(
            lambda: worker_failures(metrics, "exited") == 1, "the failure count"
        )
        assert worker_failures(metrics, "stuck") == 0
        await wait_until(
            lambda: bool(workers.pids) and dying not in workers.pids,
            "a replacement",
        )
        assert not alive(dying)
    finally:
        await workers.close()
    await wait_until(
        lambda: not children_running("policy-worker-that-dies-mid-request"),
        "no fake worker left",
    )


async def test_a_worker_that_cannot_start_leaves_the_checks_in_process(
    tmp_path: Path,
) -> None:
    observed: list[Observation] = []
    local = Pipeline([(RefuseAll(), PolicySettings())], observed.append)
    metrics = Metrics(__version__)
    marker = "import sys  # policy-worker-that-cannot-start"
    workers = PolicyWorkers(
        setup_for(tmp_path),
        local,
        observed.append,
        metrics,
        count=1,
        command=[sys.executable, "-c", marker],
    )
    try:
        await workers.start()
        assert workers.pids == []
        assert sample(metrics, "relay_policy_workers_ready") == 0
        assert worker_failures(metrics, "start_failed") >= 1
        result = await workers.run(data_context())
        expected = await local.run(data_context())
        assert result == expected
        assert result.verdict.outcome is Outcome.REFUSE
        assert result.verdict.reason == "test_refusal"
        assert result.policy == "refuse_all"
        assert [seen.policy for seen in observed] == ["refuse_all", "refuse_all"]
    finally:
        await workers.close()
    assert workers.pids == []
    await wait_until(
        lambda: not children_running("policy-worker-that-cannot-start"),
        "no fake worker left",
    )


async def test_close_during_a_restart_leaves_no_worker_behind(
    tmp_path: Path,
) -> None:
    local = Pipeline([(PassAll(), PolicySettings())], lambda seen: None)
    marker = "import sys  # policy-worker-restarting"
    workers = PolicyWorkers(
        setup_for(tmp_path),
        local,
        lambda seen: None,
        Metrics(__version__),
        count=1,
        command=[sys.executable, "-c", marker],
    )
    await workers.start()  # it fails, and is started again at once
    await workers.close()
    try:
        assert children_running("policy-worker-restarting") == []
    finally:
        # Let the cancelled restart end the process it started.
        await wait_until(
            lambda: not children_running("policy-worker-restarting"),
            "no fake worker left",
        )


# -- configuration ----------------------------------------------------------------


def raw_config(tmp_path: Path, policies: dict[str, Any]) -> dict[str, Any]:
    raw = config_dict(tmp_path / "relay.db", "smtp://127.0.0.1:9")
    raw["policies"] = policies
    return raw


@pytest.mark.parametrize("value", [-1, 65, "x", True, "", "AUTO", 2.0, None])
def test_bad_worker_counts_are_refused(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw_config(tmp_path, {"workers": value}), environ={})
    (problem,) = info.value.problems
    assert problem.path == "policies.workers"
    assert problem.reason == 'must be "auto" or a number from 0 to 64'


@pytest.mark.parametrize("value", ["auto", 0, 1, 4, 64])
def test_good_worker_counts_are_accepted(tmp_path: Path, value: object) -> None:
    config = parse_config(raw_config(tmp_path, {"workers": value}), environ={})
    assert config.policies.workers == value
    if value == "auto":
        assert 0 <= config.policies.worker_count <= 4
        assert config.policies.worker_count <= max(0, (os.cpu_count() or 1) - 1)
    else:
        assert config.policies.worker_count == value


def test_the_default_is_auto(tmp_path: Path) -> None:
    config = parse_config(raw_config(tmp_path, {}), environ={})
    assert config.policies.workers == "auto"


@pytest.mark.parametrize(("env", "count"), [("3", 3), ("0", 0), ("64", 64)])
def test_worker_count_from_the_environment(
    tmp_path: Path, env: str, count: int
) -> None:
    config = parse_config(
        raw_config(tmp_path, {"workers_env": "RELAY_POLICY_WORKERS"}),
        environ={"RELAY_POLICY_WORKERS": env},
    )
    assert config.policies.workers == count
    assert config.policies.worker_count == count


@pytest.mark.parametrize("env", ["x", "-1", "65", " 2"])
def test_bad_worker_count_from_the_environment(tmp_path: Path, env: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            raw_config(tmp_path, {"workers_env": "RELAY_POLICY_WORKERS"}),
            environ={"RELAY_POLICY_WORKERS": env},
        )
    assert [problem.path for problem in info.value.problems] == ["policies.workers"]
