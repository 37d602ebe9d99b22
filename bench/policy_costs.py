#!/usr/bin/env python3
"""What the policy checks cost, without a server.

``python bench/policy_costs.py [--iterations N] [--suppressions N] [--json out.json]``

1. Per message: the DATA-stage pipeline of bench/run.py's ``relay+policies``
   (every registered check enforced, same relay.toml) on a 4 KiB marketing
   newsletter and on a 4 KiB transactional receipt, a fresh ``MessageView`` each
   time; the whole pipeline and each check (in the pipeline, and alone on a fresh
   message). Per recipient: the RCPT-stage pipeline (exclusion + consent lookups).
2. The exclusion list at 1,000,000 entries: import time with
   ``add_suppressions``, re-open time (start-up), ``suppressions_for`` for hits
   and misses, and the exclusion check's RCPT verdict time.

See bench/README.md. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import os
import platform
import pstats
import random
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from email.utils import format_datetime, getaddresses, parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

REPO_DIR = Path(__file__).resolve().parent.parent
if str(REPO_DIR) not in sys.path:  # run from a checkout that is not pip-installed
    sys.path.insert(1, str(REPO_DIR))

from benchconf import (  # noqa: E402
    ACCOUNT,
    WANTED_POLICIES,
    policy_order,
    recipients,
    relay_toml,
    suppression_rows,
)
from loadgen import (  # noqa: E402
    SENDER,
    SENDER_DOMAIN,
    make_marketing,
    prose,
    recipient,
)

from config.loader import load_config  # noqa: E402
from policies.base import MessageKind, PolicyContext, Stage  # noqa: E402
from policies.body import extract  # noqa: E402
from policies.classify import CATEGORY_HEADER, classify  # noqa: E402
from policies.pipeline import Observation, Observer, Pipeline  # noqa: E402
from policies.registry import REGISTRY, pipeline_for  # noqa: E402
from relay.clock import SystemClock  # noqa: E402
from relay.logs import configure_logging  # noqa: E402
from relay.message import MessageView  # noqa: E402
from relay.metrics import Metrics  # noqa: E402
from relay.smtp_handler import RelayHandler  # noqa: E402
from storage.base import (  # noqa: E402
    ConsentRecord,
    ConsentSource,
    OptInType,
    Suppression,
    SuppressionReason,
)
from storage.sqlite import SqliteStore  # noqa: E402
from storage.sqlite_lists import LOOKUP_SUPPRESSIONS  # noqa: E402

MESSAGE_SIZE = 4096
DISTINCT_MESSAGES = 500
"""Different messages (and recipients) cycled through by the timing loops."""
CLOCK = SystemClock()


# -- figures --------------------------------------------------------------------


def summary(nanoseconds: Sequence[int | float]) -> dict[str, float]:
    """median, p95, mean (microseconds) and the count."""
    if not nanoseconds:
        return {"n": 0, "median_us": 0.0, "p95_us": 0.0, "mean_us": 0.0}
    ordered = sorted(nanoseconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median_us": statistics.median(ordered) / 1000,
        "p95_us": p95 / 1000,
        "mean_us": statistics.fmean(ordered) / 1000,
    }


@dataclass
class Timed:
    """Wall time of each timed operation, and the CPU time of this process (all
    threads: the store's reader thread too) spent in them."""

    wall: list[int] = field(default_factory=list)
    cpu_ns: int = 0

    def add(self, wall_ns: int, cpu_ns: int) -> None:
        self.wall.append(wall_ns)
        self.cpu_ns += cpu_ns

    def figures(self) -> dict[str, float]:
        out = summary(self.wall)
        out["cpu_us"] = self.cpu_ns / max(1, len(self.wall)) / 1000
        return out


def relay_observer() -> Observer:
    """``RelayHandler.observe`` (a metric update, a histogram sample and a log
    call per verdict) on a metrics registry of its own: what every verdict costs
    the relay besides the check itself."""
    handler = cast(
        "RelayHandler", SimpleNamespace(_metrics=Metrics("bench"), _verdict_metrics={})
    )
    return functools.partial(RelayHandler.observe, handler)


class Recorder:
    """The pipeline's observer: each check's duration, while ``on``; every
    verdict also goes to the relay's own observer, as in the relay."""

    def __init__(self) -> None:
        self.on = False
        self.durations: dict[tuple[str, str], list[float]] = {}
        self.verdicts: Counter[str] = Counter()
        self._relay = relay_observer()

    def __call__(self, seen: Observation) -> None:
        self._relay(seen)
        if not self.on:
            return
        key = (seen.policy, seen.stage.value)
        self.durations.setdefault(key, []).append(seen.duration_seconds * 1e9)
        outcome = seen.verdict.outcome.value
        label = f"{seen.policy} {seen.stage.value} {outcome}"
        if seen.verdict.reason:
            label += f" {seen.verdict.reason}"
        if seen.error is not None:
            label += f" error {type(seen.error).__name__}: {seen.error}"
        self.verdicts[label] += 1

    def reset(self) -> None:
        self.durations.clear()
        self.verdicts.clear()

    def per_check(self, stage: Stage) -> dict[str, dict[str, float]]:
        return {
            policy: summary(values)
            for (policy, at), values in self.durations.items()
            if at == stage.value
        }


@dataclass
class StageFigures:
    """One timing loop: the stage's total, the checks in it, and what failed."""

    label: str
    total: dict[str, float]
    checks: dict[str, dict[str, float]]
    core: dict[str, float] | None = None
    """MessageView + classification: paid with or without checks."""
    alone: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "total": self.total,
            "core": self.core,
            "checks_in_pipeline": self.checks,
            "checks_alone": self.alone,
            "refused": self.refused,
        }


# -- messages -------------------------------------------------------------------


def make_transactional(seq: int, size: int) -> bytes:
    """An order receipt: multipart/alternative, no list headers, no category
    header (the classifier finds no list signal: transactional)."""
    boundary = f"=_receipt_{seq}"
    head = (
        f"From: Bench Shop <orders@{SENDER_DOMAIN}>\r\n"
        f"To: <{recipient(seq)}>\r\n"
        f"Subject: Your order {100000 + seq} has shipped\r\n"
        f"Date: {_date()}\r\n"
        f"Message-ID: <order.{seq}.{time.time_ns()}@{SENDER_DOMAIN}>\r\n"
        f"Reply-To: Bench Shop Support <support@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        f"Order {100000 + seq}: 2 items, total 42.00 EUR.\r\n"
        "\r\n"
    ).encode()
    middle = (
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/html; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "<html><body>\r\n"
        f"<p>Order <b>{100000 + seq}</b>: 2 items, total 42.00 EUR.</p>\r\n"
        "<p>\r\n"
    ).encode()
    tail = (
        "</p>\r\n"
        f'<p><a href="https://{SENDER_DOMAIN}/orders/{100000 + seq}">'
        "Track your order</a></p>\r\n"
        "</body></html>\r\n"
        "\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    fill = max(6, size - len(head) - len(middle) - len(tail))
    return head + prose(fill // 2) + middle + prose(fill - fill // 2) + tail


def _date() -> str:
    return format_datetime(CLOCK.now())


# -- part 1: the pipeline per message and per recipient -------------------------


async def _time_data(
    pipeline: Pipeline,
    recorder: Recorder,
    messages: Sequence[bytes],
    *,
    iterations: int,
    warmup: int,
    default_kind: MessageKind | None,
) -> tuple[Timed, Timed, Counter[str]]:
    """(MessageView + classify, pipeline, refusals) per message at DATA."""
    core, total = Timed(), Timed()
    refused: Counter[str] = Counter()
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    for index in range(warmup + iterations):
        seq = index % len(messages)
        recorder.on = index >= warmup
        cpu0 = cpu()
        began = clock()
        view = MessageView(messages[seq])
        classified = classify(view.header, default_kind)
        if classified.reason == "header":
            view.without_header(CATEGORY_HEADER)
        parsed = clock()
        cpu1 = cpu()
        if view.problem is not None:
            raise RuntimeError(f"generated message is malformed: {view.problem}")
        result = await pipeline.run(
            PolicyContext(
                stage=Stage.DATA,
                account=ACCOUNT,
                mail_from=SENDER,
                received_at=CLOCK.now(),
                peer_ip="127.0.0.1",
                recipients=(recipient(seq),),
                message=view,
                kind=classified.kind,
            )
        )
        done = clock()
        cpu2 = cpu()
        if index < warmup:
            continue
        core.add(parsed - began, cpu1 - cpu0)
        total.add(done - parsed, cpu2 - cpu1)
        if not result.passed or result.dropped:
            refused[f"{result.policy}: {result.verdict.reason}"] += 1
    recorder.on = False
    return core, total, refused


async def _time_rcpt(
    pipeline: Pipeline,
    recorder: Recorder,
    addresses: Sequence[str],
    *,
    iterations: int,
    warmup: int,
    kind: MessageKind | None,
    expect_pass: bool = True,
) -> tuple[Timed, Counter[str]]:
    """(pipeline, unexpected verdicts) per recipient at RCPT."""
    total = Timed()
    unexpected: Counter[str] = Counter()
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    for index in range(warmup + iterations):
        address = addresses[index % len(addresses)]
        recorder.on = index >= warmup
        cpu0 = cpu()
        began = clock()
        result = await pipeline.run(
            PolicyContext(
                stage=Stage.RCPT,
                account=ACCOUNT,
                mail_from=SENDER,
                received_at=CLOCK.now(),
                peer_ip="127.0.0.1",
                recipient=address,
                kind=kind,
            )
        )
        done = clock()
        cpu1 = cpu()
        if index < warmup:
            continue
        total.add(done - began, cpu1 - cpu0)
        if result.passed != expect_pass:
            unexpected[f"{result.policy}: {result.verdict.reason or 'pass'}"] += 1
    recorder.on = False
    return total, unexpected


def _build(
    workdir: Path,
    order: Sequence[str],
    store: SqliteStore,
    recorder: Recorder,
    default_category: str | None = None,
) -> Pipeline:
    """The pipeline of bench/run.py's relay+policies config, with ``order``."""
    path = workdir / f"relay-{'-'.join(order) or 'none'}-{default_category}.toml"
    path.write_text(
        relay_toml(
            db=workdir / "bench.db", order=order, default_category=default_category
        )
    )
    return pipeline_for(
        load_config(path),
        recorder,
        clock=CLOCK,
        suppressions=store,
        consents=store,
        base_dir=workdir,
    )


async def _fill_lists(store: SqliteStore, consents: int, suppressions: int) -> None:
    """Consent for the generated recipients; an unrelated exclusion list."""
    collected = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
    await store.add_consents(
        [
            ConsentRecord(
                account=ACCOUNT,
                address=address,
                collected_at=collected,
                source=ConsentSource.NEWSLETTER,
                opt_in=OptInType.DOUBLE,
                collection_url=f"https://{SENDER_DOMAIN}/subscribe",
                ip="192.0.2.10",
                confirmed_at=collected + timedelta(minutes=7),
                statement="Yes, send me the weekly offers.",
            )
            for address in recipients(consents)
        ]
    )
    await store.add_suppressions(_suppressions(suppressions, seed=1))


def _suppressions(count: int, seed: int) -> list[Suppression]:
    return [
        Suppression(
            address=address,
            account=account,
            reason=SuppressionReason(reason),
            source="import",
            created_at=created,
            expires_at=expires,
        )
        for address, account, reason, created, expires in suppression_rows(
            count, seed=seed
        )
    ]


async def per_message(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    order, missing = policy_order(REGISTRY)
    store = SqliteStore(workdir / "bench.db", timeout_seconds=600)
    await store.open()
    try:
        await _fill_lists(store, DISTINCT_MESSAGES, args.list_size)
        recorder = Recorder()
        pipeline = _build(workdir, order, store, recorder)
        marketing = [
            make_marketing(seq, MESSAGE_SIZE, "policies")
            for seq in range(DISTINCT_MESSAGES)
        ]
        transactional = [
            make_transactional(seq, MESSAGE_SIZE) for seq in range(DISTINCT_MESSAGES)
        ]
        stages: list[StageFigures] = []
        for label, messages in (
            ("DATA, marketing 4 KiB", marketing),
            ("DATA, transactional 4 KiB", transactional),
        ):
            core, total, refused = await _time_data(
                pipeline,
                recorder,
                messages,
                iterations=args.iterations,
                warmup=args.warmup,
                default_kind=None,
            )
            figures = StageFigures(
                label,
                total.figures(),
                recorder.per_check(Stage.DATA),
                core=core.figures(),
                refused=dict(refused),
            )
            recorder.reset()
            for name in order:
                alone = _build(workdir, [name], store, recorder)
                if not alone.runs_at(Stage.DATA):
                    continue
                _, only, _ = await _time_data(
                    alone,
                    recorder,
                    messages,
                    iterations=args.iterations,
                    warmup=args.warmup,
                    default_kind=None,
                )
                figures.alone[name] = only.figures()
                recorder.reset()
            stages.append(figures)
        addresses = recipients(DISTINCT_MESSAGES)
        for label, kind, category in (
            ("RCPT, no default category (kind decided at DATA)", None, None),
            (
                "RCPT, default_category = marketing",
                MessageKind.MARKETING,
                "marketing",
            ),
        ):
            rcpt_pipeline = _build(workdir, order, store, recorder, category)
            total_rcpt, unexpected = await _time_rcpt(
                rcpt_pipeline,
                recorder,
                addresses,
                iterations=args.iterations,
                warmup=args.warmup,
                kind=kind,
            )
            stages.append(
                StageFigures(
                    label,
                    total_rcpt.figures(),
                    recorder.per_check(Stage.RCPT),
                    refused=dict(unexpected),
                )
            )
            recorder.reset()
    finally:
        await store.close()
    return {
        "order": order,
        "missing": missing,
        "message_size": MESSAGE_SIZE,
        "list_size": args.list_size,
        "stages": [s.as_json() for s in stages],
        "references": references(marketing, args.iterations),
    }


def _timed_calls(call: Callable[[int], object], iterations: int) -> Timed:
    """``call(i)`` for i in range(iterations), each timed (wall and CPU)."""
    out = Timed()
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    for index in range(iterations):
        cpu0 = cpu()
        began = clock()
        call(index)
        done = clock()
        out.add(done - began, cpu() - cpu0)
    return out


def references(messages: Sequence[bytes], iterations: int) -> dict[str, Any]:
    """What the stdlib pieces the checks rely on cost on these messages: where the
    time of the checks goes, and what cheaper ways of doing the same would cost."""
    count = len(messages)
    views = [MessageView(m) for m in messages]
    parsed = [v.parsed for v in views]
    header = policy.default.header_factory
    compat = BytesParser(policy=policy.compat32)
    full = BytesParser(policy=policy.default)
    to = [str(v.headers["To"]) for v in views]
    date = str(views[0].headers["Date"])
    rows: dict[str, Timed] = {
        "MessageView(content), paid without checks": (
            _timed_calls(lambda i: MessageView(messages[i % count]), iterations)
        ),
        "MIME parse, policy.default (view.parsed)": _timed_calls(
            lambda i: full.parsebytes(messages[i % count]), iterations
        ),
        "MIME parse, policy.compat32": _timed_calls(
            lambda i: compat.parsebytes(messages[i % count]), iterations
        ),
        "policies.body.extract(view.parsed)": _timed_calls(
            lambda i: extract(parsed[i % count]), iterations
        ),
        "policy.default.header_factory('To', v)": _timed_calls(
            lambda i: header("To", to[i % count]), iterations
        ),
        "email.utils.getaddresses([To])": _timed_calls(
            lambda i: getaddresses([to[i % count]]), iterations
        ),
        "policy.default.header_factory('Date', v)": _timed_calls(
            lambda i: header("Date", date), iterations
        ),
        "email.utils.parsedate_to_datetime(Date)": _timed_calls(
            lambda i: parsedate_to_datetime(date), iterations
        ),
    }
    return {label: timed.figures() for label, timed in rows.items()}


# -- part 2: a million exclusion-list entries ------------------------------------


async def _timed_lookups(
    lookup: Callable[[str], Awaitable[object]], addresses: Sequence[str]
) -> Timed:
    out = Timed()
    clock, cpu = time.perf_counter_ns, time.process_time_ns
    for address in addresses:
        cpu0 = cpu()
        began = clock()
        await lookup(address)
        done = clock()
        out.add(done - began, cpu() - cpu0)
    return out


async def million(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    count = args.suppressions
    path = workdir / "million.db"
    result: dict[str, Any] = {"entries": count}
    began = time.perf_counter()
    entries = _suppressions(count, seed=2)
    result["generate_seconds"] = time.perf_counter() - began
    store = SqliteStore(path, timeout_seconds=3600)
    began = time.perf_counter()
    await store.open()
    result["create_seconds"] = time.perf_counter() - began
    try:
        began = time.perf_counter()
        written = await store.add_suppressions(entries)
        result["import_seconds"] = time.perf_counter() - began
        result["written"] = written
    finally:
        began = time.perf_counter()
        await store.close()
        result["close_seconds"] = time.perf_counter() - began
    gc.collect()
    result["db_mib"] = sum(
        p.stat().st_size for p in workdir.glob("million.db*") if p.is_file()
    ) / (1024 * 1024)

    store = SqliteStore(path, timeout_seconds=600)
    began = time.perf_counter()
    await store.open()
    result["reopen_seconds"] = time.perf_counter() - began
    try:
        now = CLOCK.now()
        began = time.perf_counter()
        await store.suppressions_for("first@lookup.example", ACCOUNT, now)
        result["first_lookup_ms"] = (time.perf_counter() - began) * 1000
        result["counted"] = await store.count_suppressions()
        rng = random.Random(3)  # noqa: S311 - sampling, not secrets
        applicable = [
            e.address for e in entries if e.account in {None, ACCOUNT} and e.active(now)
        ]
        hits = rng.sample(applicable, min(args.lookups, len(applicable)))
        misses = [
            f"nobody.{i:07d}@d{rng.randrange(20_000)}.example.org"
            for i in range(args.lookups)
        ]
        del entries, applicable
        for address in hits[:200] + misses[:200]:  # warm the statement cache
            await store.suppressions_for(address, ACCOUNT, now)

        async def lookup(address: str) -> object:
            found = await store.suppressions_for(address, ACCOUNT, now)
            return found

        hit_ns = await _timed_lookups(lookup, hits)
        miss_ns = await _timed_lookups(lookup, misses)
        empty = 0
        for address in hits[:1000]:
            if not await store.suppressions_for(address, ACCOUNT, now):
                empty += 1
        result["suppressions_for_hit"] = hit_ns.figures()
        result["suppressions_for_miss"] = miss_ns.figures()
        raw_hit, raw_miss = _raw_lookups(path, hits, misses, now)
        result["sqlite3_direct_hit"] = raw_hit.figures()
        result["sqlite3_direct_miss"] = raw_miss.figures()
        result["hits_not_found"] = empty

        recorder = Recorder()
        exclusion = _build(workdir, ["exclusion"], store, recorder)
        for label, addresses, expect in (
            ("exclusion_rcpt_hit", hits, False),
            ("exclusion_rcpt_miss", misses, True),
        ):
            total, unexpected = await _time_rcpt(
                exclusion,
                recorder,
                addresses,
                iterations=len(addresses),
                warmup=0,
                kind=MessageKind.MARKETING,
                expect_pass=expect,
            )
            result[label] = {
                "pipeline": total.figures(),
                "check": recorder.per_check(Stage.RCPT).get("exclusion"),
                "unexpected": dict(unexpected),
            }
            recorder.reset()
    finally:
        await store.close()
    return result


def _estimate(part: dict[str, Any], relay_cpu_ms: float) -> dict[str, float]:
    """What the checks add to a one-recipient marketing message (RCPT + DATA, CPU
    per message, the relay as configured by bench/run.py: no default category),
    and the relay+policies/relay throughput ratio that implies for a relay bound
    by one core at ``relay_cpu_ms`` per message."""
    stages = {stage["label"]: stage for stage in part["stages"]}
    rcpt = stages["RCPT, no default category (kind decided at DATA)"]["total"]
    data = stages["DATA, marketing 4 KiB"]["total"]
    added_us = rcpt["cpu_us"] + data["cpu_us"]
    return {
        "rcpt_us": rcpt["cpu_us"],
        "data_us": data["cpu_us"],
        "added_us": added_us,
        "relay_cpu_ms": relay_cpu_ms,
        "budget_us": relay_cpu_ms * 1000 * 0.25,
        "expected_ratio": relay_cpu_ms * 1000 / (relay_cpu_ms * 1000 + added_us),
    }


def _raw_lookups(
    path: Path, hits: Sequence[str], misses: Sequence[str], now: datetime
) -> tuple[Timed, Timed]:
    """The store's RCPT query on a plain ``sqlite3`` connection in this thread:
    what a lookup costs without aiosqlite's hop to its thread (a reference)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only=1")
        stamp = now.timestamp()
        out = []
        clock, cpu = time.perf_counter_ns, time.process_time_ns
        for addresses in (hits, misses):
            timed = Timed()
            for address in addresses:
                cpu0 = cpu()
                began = clock()
                conn.execute(LOOKUP_SUPPRESSIONS, (address, ACCOUNT, stamp)).fetchall()
                done = clock()
                timed.add(done - began, cpu() - cpu0)
            out.append(timed)
    finally:
        conn.close()
    return out[0], out[1]


# -- report ---------------------------------------------------------------------


def _row(label: str, figures: dict[str, float] | None, width: int = 46) -> str:
    if not figures:
        return f"  {label:<{width}}{'n/a':>9}"
    cpu = figures.get("cpu_us")
    return (
        f"  {label:<{width}}{figures['median_us']:>9.1f}{figures['p95_us']:>9.1f}"
        f"{figures['mean_us']:>9.1f}{'-' if cpu is None else f'{cpu:.1f}':>9}"
    )


def print_report(report: dict[str, Any]) -> None:
    head = f"  {'microseconds':<46}{'median':>9}{'p95':>9}{'mean':>9}{'CPU':>9}"
    part = report.get("per_message")
    if part is not None:
        print(
            f"\nchecks enforced: {', '.join(part['order']) or '(none)'}"
            + (
                f"; not registered yet: {', '.join(part['missing'])}"
                if part["missing"]
                else ""
            )
        )
        print(f"exclusion list {part['list_size']:,} entries (SQLite, warm cache)")
        for stage in part["stages"]:
            print(f"\n{stage['label']}")
            print(head)
            if stage["core"]:
                print(
                    _row("MessageView + classify (paid without checks)", stage["core"])
                )
            print(_row("pipeline.run, all checks", stage["total"]))
            for name, figures in stage["checks_in_pipeline"].items():
                print(_row(f"  {name} (in the pipeline)", figures))
            for name, figures in stage["checks_alone"].items():
                print(_row(f"  {name} (alone, fresh message)", figures))
            if stage["refused"]:
                print(f"  NOT PASSED: {stage['refused']}")
        print("\nreferences: the stdlib pieces, on the 4 KiB marketing messages")
        print(head)
        for label, figures in part["references"].items():
            print(_row(label, figures))
        guess = part["estimate"]
        print(
            f"\none-recipient marketing message: RCPT {guess['rcpt_us']:.0f} us + "
            f"DATA {guess['data_us']:.0f} us = {guess['added_us']:.0f} us CPU of "
            "checks; "
            f"the budget for relay+policies/relay >= 0.80 is "
            f"{guess['budget_us']:.0f} us\n(25% of the policies-off relay's "
            f"{guess['relay_cpu_ms']:.2f} ms CPU/message, --relay-cpu-ms): expected "
            f"ratio {guess['expected_ratio']:.2f} for a relay bound by one core "
            "that runs every check itself ([policies] workers = 0).\nWith policy "
            "workers the DATA checks run on another CPU: the relay process pays the "
            "RCPT checks and the hand-over, the machine the rest (bench/run.py)."
        )
    big = report.get("million")
    if big is not None:
        print(f"\nexclusion list of {big['entries']:,} entries (SQLite)")
        print(
            f"  add_suppressions: {big['import_seconds']:.1f} s "
            f"({big['entries'] / big['import_seconds']:,.0f} entries/s; generating "
            f"the entries took {big['generate_seconds']:.1f} s); close "
            f"{big['close_seconds']:.2f} s; database {big['db_mib']:.0f} MiB"
        )
        print(
            f"  re-open (start-up): {big['reopen_seconds'] * 1000:.1f} ms; first "
            f"lookup {big['first_lookup_ms']:.2f} ms; entries counted "
            f"{big['counted']:,}"
        )
        print(head)
        print(_row("suppressions_for, hit", big["suppressions_for_hit"]))
        print(_row("suppressions_for, miss", big["suppressions_for_miss"]))
        print(_row("same query, sqlite3 in-thread, hit", big["sqlite3_direct_hit"]))
        print(_row("same query, sqlite3 in-thread, miss", big["sqlite3_direct_miss"]))
        for key, label in (
            ("exclusion_rcpt_hit", "exclusion at RCPT, hit (refuse)"),
            ("exclusion_rcpt_miss", "exclusion at RCPT, miss (pass)"),
        ):
            print(_row(f"{label}: pipeline", big[key]["pipeline"]))
            print(_row(f"{label}: check", big[key]["check"]))
            if big[key]["unexpected"]:
                print(f"  UNEXPECTED: {big[key]['unexpected']}")
        if big["hits_not_found"]:
            print(f"  {big['hits_not_found']} of 1000 hits NOT found")


# -- main -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-message cost of the policy checks; exclusion-list lookups "
        "at 1,000,000 entries. No server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--iterations", type=int, default=3000, help="timed runs per measurement"
    )
    parser.add_argument(
        "--warmup", type=int, default=300, help="untimed runs before each measurement"
    )
    parser.add_argument(
        "--list-size",
        type=int,
        default=100_000,
        help="exclusion-list entries behind the per-message figures",
    )
    parser.add_argument(
        "--suppressions",
        type=int,
        default=1_000_000,
        help="entries of the large exclusion list (part 2)",
    )
    parser.add_argument(
        "--lookups", type=int, default=20_000, help="timed lookups per kind (part 2)"
    )
    parser.add_argument(
        "--relay-cpu-ms",
        type=float,
        default=0.8,
        help="CPU ms per message of the policies-off relay (bench/run.py's relay "
        "row), to turn the pipeline cost into an expected throughput ratio",
    )
    parser.add_argument(
        "--skip-per-message", action="store_true", help="leave part 1 out"
    )
    parser.add_argument("--skip-million", action="store_true", help="leave part 2 out")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument(
        "--profile",
        metavar="OUT.prof",
        help="run everything under cProfile, write the stats here and print the "
        "top functions (the figures are then inflated)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory"
    )
    args = parser.parse_args(argv)
    if (
        min(args.iterations, args.suppressions, args.lookups) < 1
        or min(args.warmup, args.list_size) < 0
    ):
        parser.error("--iterations, --suppressions, --lookups >= 1; others >= 0")
    return args


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "params": {
            k: getattr(args, k)
            for k in ("iterations", "warmup", "list_size", "suppressions", "lookups")
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "wanted": list(WANTED_POLICIES),
    }
    report["params"]["relay_cpu_ms"] = args.relay_cpu_ms
    if not args.skip_per_message:
        print("part 1: pipeline cost per message and per recipient ...", flush=True)
        report["per_message"] = part = await per_message(args, workdir)
        part["estimate"] = _estimate(part, args.relay_cpu_ms)
    if not args.skip_million:
        print(
            f"part 2: exclusion list of {args.suppressions:,} entries ...", flush=True
        )
        report["million"] = await million(args, workdir)
    report["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", "json")  # as bench/run.py's relays
    workdir = Path(tempfile.mkdtemp(prefix="relay-policies-bench-"))
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs; load average {load:.2f}; work dir {workdir}")
    profiler = cProfile.Profile() if args.profile else None
    try:
        if profiler is not None:
            profiler.enable()
        report = asyncio.run(run(args, workdir))
    finally:
        if profiler is not None:
            profiler.disable()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    if profiler is not None:
        profiler.dump_stats(args.profile)
        stats = pstats.Stats(args.profile, stream=sys.stdout)
        print(f"\nprofile ({args.profile}), top 30 by own time:")
        stats.sort_stats("tottime").print_stats(30)
        print(f"profile ({args.profile}), top 40 by cumulative time:")
        stats.sort_stats("cumulative").print_stats(40)
    print(f"\npeak RSS of this process: {report['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    part = report.get("per_message", {})
    failed = any(stage["refused"] for stage in part.get("stages", []))
    big = report.get("million", {})
    failed = failed or any(
        big.get(key, {}).get("unexpected")
        for key in ("exclusion_rcpt_hit", "exclusion_rcpt_miss")
    )
    return 1 if failed or big.get("hits_not_found") else 0


if __name__ == "__main__":
    sys.exit(main())
