#!/usr/bin/env python3
"""Feedback ingestion benchmark: how many feedback events a running relay takes in
per second, by mail (RFC 3464 bounces to VERP addresses) and by the admin API.

``python bench/feedback_ingest.py [--messages N] [--concurrency K] [--events E]
[--batch B] [--repeat R] [--json OUT]``

One ``relay serve`` subprocess (SQLite in a temporary directory) with reputation
tracking fully on, as run.py's relay+reputation (``benchconf.relay_toml(...,
reputation=True)``, 10,000 spamtraps), plus ``[feedback] intake_rate`` raised so
that the per-IP allowance (600/m by default) does not throttle the benchmark, and
an ``[http] admin_token``. Its upstream is a small aiosmtpd sink in this process
(:class:`CaptureSink`) that records each message's envelope sender: smtp-sink,
run.py's sink, only counts.

1. Priming (not timed): N x R messages, one recipient each, through the relay
   with AUTH; the sink records each VERP envelope sender and the delivered header.
2. Bounces by SMTP: one RFC 3464 DSN per VERP address (``MAIL FROM:<>``,
   ``RCPT TO:<the VERP address>``, no AUTH) over K concurrent sessions, each
   sending back to back. Timed from the moment every session is open (EHLO done)
   to the last 250. Then ``relay_feedback_received_total{channel="dsn",
   result="recorded"}`` must have grown by N.
3. Events by the admin API: ``POST /api/events`` with batches of B events
   (click, unsubscribe and complaint mixed, unique ids and recipients) over
   ``--api-concurrency`` connections. The answers' ``recorded`` must add up to E,
   and so must ``relay_feedback_received_total{channel="api",result="recorded"}``.

Steps 2 and 3 run R times each (fresh DSNs and event ids every time); the median
run is reported. This is a benchmark, not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from aiosmtpd.smtp import SMTP
from benchconf import ACCOUNT, BOUNCE_DOMAIN, FBL_ADDRESS
from loadgen import RECIPIENT_DOMAIN, SENDER, make_message, recipient
from procstats import tree_cpu_seconds, wait_pid_gone
from run import (
    RELAY_PASSWORD,
    ListFiles,
    RelayLists,
    RelayTarget,
    Samples,
    exit_on_sigterm,
    fmt,
    relay_usable,
)

HOST = "127.0.0.1"
INTAKE_RATE = "1000000/m"
"""``[feedback] intake_rate`` of the benchmark: the default (600/m per client IP)
would answer 451 after the first 600 DSNs from 127.0.0.1."""
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"  # noqa: S105 - a throwaway config
SPAMTRAPS = 10_000
MESSAGE_SIZE = 4096
EVENT_KINDS = ("click",) * 7 + ("unsubscribe",) * 2 + ("complaint",)
"""The mix of each run's events: 70% clicks, 20% unsubscribes, 10% complaints."""
_VERP = re.compile(
    rf"{re.escape(SENDER.partition('@')[0])}\+[a-z2-7]{{37}}@{re.escape(BOUNCE_DOMAIN)}"
)


# -- the upstream --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Captured:
    """One message the relay delivered: its envelope and header block."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    header: bytes
    """Everything up to (and including) the blank line that ends the header."""


class CaptureSink:
    """An aiosmtpd sink on a free loopback port that remembers what it got.

    It runs its own event loop in a thread, so the benchmark's clients can block
    or run their own loop; it only works while the relay delivers (priming).
    """

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self.port = 0
        self.received: list[Captured] = []
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        content = bytes(envelope.original_content or envelope.content or b"")
        end = content.find(b"\r\n\r\n")
        captured = Captured(
            mail_from=str(envelope.mail_from or ""),
            rcpt_tos=tuple(envelope.rcpt_tos),
            header=content[: end + 4] if end >= 0 else content,
        )
        with self._cond:
            self.received.append(captured)
            self._cond.notify_all()
        return "250 2.0.0 Ok: captured"

    def start(self) -> CaptureSink:
        def factory() -> Any:
            return SMTP(self, hostname="sink.bench.test", loop=self._loop)

        self._server = self._loop.run_until_complete(
            self._loop.create_server(factory, self.host, 0)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:

            async def close() -> None:
                if self._server is not None:
                    self._server.close()

            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def wait_for(self, count: int, timeout: float) -> list[Captured]:
        """The first ``count`` messages received (fewer if ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.5))
            return self.received[:count]


# -- what is sent --------------------------------------------------------------


def dsn(verp: str, rcpt: str, header: bytes, seq: int) -> bytes:
    """An RFC 3464 bounce of ``rcpt`` (5.1.1, user unknown), as Postfix writes
    it, to the VERP address; the returned header block starts with the
    Return-Path the final MTA adds (same shape as the e2e tests' ``dsn()``)."""
    diag = f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
    original = f"Return-Path: <{verp}>\r\n" + header.decode("utf-8", "replace")
    return (
        "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n"
        f"To: {verp}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-Id: <bounce.{seq}@mx.example.net>\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        '\tboundary="B1"\r\n\r\n'
        "--B1\r\nContent-Type: text/plain\r\n\r\n"
        f"<{rcpt}>: host mx.example.net said: {diag}\r\n\r\n"
        "--B1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\n"
        "Action: failed\r\nStatus: 5.1.1\r\n"
        "Remote-MTA: dns; mx.example.net\r\n"
        f"Diagnostic-Code: smtp; {diag}\r\n\r\n"
        "--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{original.rstrip()}\r\n\r\n"
        "--B1--\r\n"
    ).encode()


def event_batches(
    run: int, events: int, batch: int
) -> Iterator[tuple[bytes, dict[str, int]]]:
    """Run ``run``'s events as JSON request bodies of ``batch`` events, each with
    its count by kind. Ids and recipients are unique over all runs."""
    for start in range(0, events, batch):
        items = []
        kinds: dict[str, int] = {}
        for index in range(start, min(start + batch, events)):
            kind = EVENT_KINDS[index % len(EVENT_KINDS)]
            kinds[kind] = kinds.get(kind, 0) + 1
            items.append(
                {
                    "kind": kind,
                    "account": ACCOUNT,
                    "recipient": f"reader{run}.{index}@{RECIPIENT_DOMAIN}",
                    "id": f"bench-{run}-{index}",
                }
            )
        yield json.dumps({"events": items}).encode(), kinds


# -- measuring -----------------------------------------------------------------


@dataclass
class Figures:
    """One timed run of one channel."""

    channel: str
    items: int = 0
    """DSNs or events sent."""
    requests: int = 0
    """SMTP transactions or HTTP requests."""
    seconds: float | None = None
    per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    """Per SMTP transaction (MAIL..250) or per HTTP request."""
    relay_cpu_ms_per_item: float | None = None
    client_cpu_pct: float | None = None
    """This process (the clients; the sink is idle by then), % of one core."""
    recorded: int = 0
    """Recorded, as the relay's metrics (and the API's answers) say."""
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    status: str = "ok"
    runs_per_s: list[float | None] = field(default_factory=list)


def _percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _gained(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much every ``name`` sample with these labels grew."""
    total = 0.0
    for (sample, found), value in after.items():
        if sample == name and all(dict(found).get(k) == v for k, v in labels.items()):
            total += value - before.get((sample, found), 0.0)
    return total


def _finish(
    figures: Figures,
    started: float,
    ended: float,
    latencies: list[float],
    cpu: tuple[float, float],
) -> None:
    relay_cpu, client_cpu = cpu
    figures.seconds = max(ended - started, 1e-9)
    figures.per_s = figures.items / figures.seconds
    p50, p99 = _percentile(latencies, 0.50), _percentile(latencies, 0.99)
    figures.p50_ms = None if p50 is None else p50 * 1000
    figures.p99_ms = None if p99 is None else p99 * 1000
    if figures.items:
        figures.relay_cpu_ms_per_item = relay_cpu * 1000 / figures.items
    figures.client_cpu_pct = 100 * client_cpu / figures.seconds


async def prime(
    relay: RelayTarget, sink: CaptureSink, first: int, count: int, concurrency: int
) -> list[Captured]:
    """Send ``count`` messages (recipients ``user{first}``...) through the relay
    with AUTH; return what the sink received for them, each with a VERP sender."""
    pending = iter(range(first, first + count))
    already = len(sink.received)

    async def session() -> None:
        smtp = aiosmtplib.SMTP(
            hostname=relay.host, port=relay.port, start_tls=False, timeout=60
        )
        await smtp.connect()
        try:
            await smtp.login(ACCOUNT, RELAY_PASSWORD)
            for seq in pending:
                await smtp.sendmail(
                    SENDER,
                    [recipient(seq)],
                    make_message(seq, MESSAGE_SIZE, "feedback"),
                )
        except BaseException:
            smtp.close()  # no QUIT dialogue while failing or being cancelled
            raise
        await smtp.quit()

    await asyncio.gather(*(session() for _ in range(min(concurrency, count))))
    got = await asyncio.to_thread(sink.wait_for, already + count, 120 + count / 50)
    got = got[already:]
    if len(got) < count:
        raise RuntimeError(f"the sink received {len(got)} of {count} primed messages")
    strays = [c.mail_from for c in got if not _VERP.fullmatch(c.mail_from)]
    if strays:
        raise RuntimeError(
            f"{len(strays)} messages left without a VERP sender, e.g. {strays[0]!r}"
        )
    if len({c.mail_from for c in got}) != count:
        raise RuntimeError("two primed messages left with the same VERP sender")
    return got


async def bounces(
    relay: RelayTarget, captured: Sequence[Captured], concurrency: int
) -> Figures:
    """Send one DSN per captured message, without AUTH, over ``concurrency``
    sessions; check that the relay recorded each."""
    mails = [
        (c.mail_from, dsn(c.mail_from, c.rcpt_tos[0], c.header, seq))
        for seq, c in enumerate(captured)
    ]
    figures = Figures(channel="DSN by SMTP", items=len(mails), requests=len(mails))
    pending = iter(mails)
    latencies: list[float] = []
    replies: dict[str, int] = {}

    async def open_session() -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            start_tls=False,
            timeout=60,
            local_hostname="mx.example.net",
        )
        await smtp.connect()
        await smtp.ehlo()
        return smtp

    async def session(smtp: aiosmtplib.SMTP) -> None:
        try:
            for verp, content in pending:
                began = time.monotonic()
                try:
                    _, reply = await smtp.sendmail("", [verp], content)
                except aiosmtplib.SMTPException as exc:  # 4xx/5xx at any stage
                    figures.failed += 1
                    key = str(exc)[:80]
                    figures.errors[key] = figures.errors.get(key, 0) + 1
                    await smtp.rset()
                    continue
                latencies.append(time.monotonic() - began)
                text = reply.split("[ref")[0].strip()
                replies[text] = replies.get(text, 0) + 1
        except BaseException:
            smtp.close()  # no QUIT dialogue while failing or being cancelled
            raise
        await smtp.quit()

    sessions = await asyncio.gather(
        *(open_session() for _ in range(min(concurrency, len(mails))))
    )
    before = await asyncio.to_thread(relay.samples)
    cpu0, own0 = tree_cpu_seconds(relay.pid), time.process_time()
    started = time.monotonic()
    await asyncio.gather(*(session(smtp) for smtp in sessions))
    ended = time.monotonic()
    cpu = (tree_cpu_seconds(relay.pid) - cpu0, time.process_time() - own0)
    after = await asyncio.to_thread(relay.samples)
    _finish(figures, started, ended, latencies, cpu)
    name = "relay_feedback_received_total"
    figures.recorded = round(
        _gained(before, after, name, channel="dsn", result="recorded")
    )
    others = {
        result: round(_gained(before, after, name, channel="dsn", result=result))
        for result in ("duplicate", "unattributed", "ignored", "error")
    }
    bounced = _gained(
        before, after, "relay_feedback_events_total", account=ACCOUNT, kind="bounce"
    )
    problems = [f"{n} {result}" for result, n in others.items() if n]
    if figures.recorded != figures.items:
        problems.append(f"{figures.recorded}/{figures.items} recorded (metrics)")
    if round(bounced) != figures.items:
        problems.append(f"{bounced:.0f}/{figures.items} bounce events (metrics)")
    if figures.failed:
        problems.append(f"{figures.failed} refused: {figures.errors}")
    if problems:
        figures.status = "failed: " + "; ".join(problems)
    elif set(replies) != {"2.0.0 Feedback recorded, thank you"}:
        figures.status = f"failed: replies {replies}"
    return figures


async def api_events(
    relay: RelayTarget, run: int, events: int, batch: int, concurrency: int
) -> Figures:
    """POST ``events`` events in batches of ``batch``; check what was recorded."""
    bodies = list(event_batches(run, events, batch))
    figures = Figures(channel="events by API", items=events, requests=len(bodies))
    kinds: dict[str, int] = {}
    for _, counts in bodies:
        for kind, n in counts.items():
            kinds[kind] = kinds.get(kind, 0) + n
    pending = iter(bodies)
    latencies: list[float] = []
    answered = {"recorded": 0, "duplicates": 0}
    url = f"http://{relay.host}:{relay.http_port}/api/events"
    headers = {
        "Authorization": f"Bearer {ADMIN_TOKEN}",
        "Content-Type": "application/json",
    }

    async def worker(http: aiohttp.ClientSession) -> None:
        for body, counts in pending:
            began = time.monotonic()
            async with http.post(url, data=body, headers=headers) as response:
                answer = await response.json()
                if response.status != 200:
                    figures.failed += sum(counts.values())
                    key = f"{response.status} {str(answer)[:80]}"
                    figures.errors[key] = figures.errors.get(key, 0) + 1
                    continue
            latencies.append(time.monotonic() - began)
            answered["recorded"] += int(answer["recorded"])
            answered["duplicates"] += int(answer["duplicates"])

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        before = await asyncio.to_thread(relay.samples)
        cpu0, own0 = tree_cpu_seconds(relay.pid), time.process_time()
        started = time.monotonic()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        ended = time.monotonic()
        cpu = (tree_cpu_seconds(relay.pid) - cpu0, time.process_time() - own0)
        after = await asyncio.to_thread(relay.samples)
    _finish(figures, started, ended, latencies, cpu)
    name = "relay_feedback_received_total"
    figures.recorded = round(
        _gained(before, after, name, channel="api", result="recorded")
    )
    problems = []
    if answered["recorded"] != events or answered["duplicates"]:
        problems.append(
            f"the API answered {answered['recorded']} recorded, "
            f"{answered['duplicates']} duplicates of {events}"
        )
    if figures.recorded != events:
        problems.append(f"{figures.recorded}/{events} recorded (metrics)")
    for kind, wanted in sorted(kinds.items()):
        got = _gained(
            before, after, "relay_feedback_events_total", account=ACCOUNT, kind=kind
        )
        if round(got) != wanted:
            problems.append(f"{got:.0f}/{wanted} {kind} events (metrics)")
    if figures.failed:
        problems.append(f"{figures.failed} refused: {figures.errors}")
    if problems:
        figures.status = "failed: " + "; ".join(problems)
    return figures


def median_run(runs: list[Figures]) -> Figures:
    """The run to report: the first failed one, else the median by rate."""
    failed = [r for r in runs if r.status != "ok"]
    chosen = (
        failed[0]
        if failed
        else sorted(runs, key=lambda r: r.per_s or 0.0)[len(runs) // 2]
    )
    chosen.runs_per_s = [r.per_s for r in runs]
    return chosen


async def measure(
    relay: RelayTarget, sink: CaptureSink, args: argparse.Namespace
) -> tuple[list[Figures], dict[str, Any]]:
    """Prime, then time the DSN runs and the API runs; (figures, priming notes)."""
    started = time.monotonic()
    total = args.messages * args.repeat
    captured = await prime(relay, sink, 0, total, args.concurrency)
    seconds = time.monotonic() - started
    notes = {"primed_messages": total, "priming_seconds": round(seconds, 2)}
    print(
        f"   primed: {total:,} messages delivered with VERP senders in {seconds:.1f}s",
        flush=True,
    )
    dsn_runs = []
    for number in range(args.repeat):
        part = captured[number * args.messages : (number + 1) * args.messages]
        figures = await bounces(relay, part, args.concurrency)
        print(
            f"   DSN run {number + 1}: {fmt(figures.per_s)}/s, {figures.status}",
            flush=True,
        )
        dsn_runs.append(figures)
    api_runs = []
    for number in range(args.repeat):
        figures = await api_events(
            relay, number, args.events, args.batch, args.api_concurrency
        )
        print(
            f"   API run {number + 1}: {fmt(figures.per_s)} events/s, {figures.status}",
            flush=True,
        )
        api_runs.append(figures)
    return [median_run(dsn_runs), median_run(api_runs)], notes


# -- report --------------------------------------------------------------------


def print_table(results: list[Figures]) -> None:
    header = (
        f"{'channel':<15}{'items':>8}{'requests':>9}{'seconds':>9}{'items/s':>9}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'relay CPU ms/item':>18}  status"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.channel:<15}{r.items:>8,}{r.requests:>9,}{fmt(r.seconds, 2):>9}"
            f"{fmt(r.per_s):>9}{fmt(r.p50_ms, 1):>8}{fmt(r.p99_ms, 1):>8}"
            f"{fmt(r.relay_cpu_ms_per_item, 3):>18}  {r.status}"
        )
    for r in results:
        lines = [f"recorded (relay metrics): {r.recorded:,} of {r.items:,}"]
        if len(r.runs_per_s) > 1:
            lines.append(
                "items/s per run: "
                + ", ".join(fmt(v) for v in r.runs_per_s)
                + (" (median shown)" if r.status == "ok" else "")
            )
        if r.client_cpu_pct is not None:
            lines.append(
                f"client (this process) CPU: {r.client_cpu_pct:.0f}% of a core"
            )
        print(f"\n[{r.channel}]")
        for line in lines:
            print("  " + line)


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Feedback events a running relay takes in per second: RFC 3464 "
        "bounces by SMTP, and events by the admin API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=2000,
        help="messages primed and DSNs sent per run (one recipient each)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="concurrent SMTP sessions (priming and DSNs)",
    )
    parser.add_argument(
        "--events", type=int, default=20_000, help="events posted per API run"
    )
    parser.add_argument(
        "--batch", type=int, default=500, help="events per POST /api/events"
    )
    parser.add_argument(
        "--api-concurrency",
        type=int,
        default=2,
        help="concurrent POST /api/events requests",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed runs of each channel; the median (by items/s) is reported",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory"
    )
    args = parser.parse_args(argv)
    if min(args.messages, args.concurrency, args.events, args.api_concurrency) < 1:
        parser.error(
            "--messages, --concurrency, --events, --api-concurrency must be >= 1"
        )
    if not 1 <= args.batch <= 10_000 or args.repeat < 1:
        parser.error("--batch must be 1..10000 (the API's limit); --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    problem = relay_usable()
    if problem is not None:
        print(f"cannot run the relay: {problem}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="relay-feedback-"))
    print(
        f"{args.messages:,} DSNs over {args.concurrency} SMTP sessions; "
        f"{args.events:,} events in batches of {args.batch} over "
        f"{args.api_concurrency} HTTP connections; {args.repeat} run(s) each; "
        f"{os.cpu_count()} CPUs; work dir {workdir}",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(
            f"warning: load average {load_before:.2f} before the run: other work "
            "on this machine makes the figures noisy (try --repeat 3)",
            flush=True,
        )
    sink = CaptureSink()
    relay = RelayTarget(
        workdir,
        16,
        name="relay+reputation",
        lists=ListFiles(
            workdir, RelayLists(consents=0, suppressions=0, spamtraps=SPAMTRAPS)
        ),
        reputation=True,
        intake_rate=INTAKE_RATE,
        admin_token=ADMIN_TOKEN,
    )
    try:
        sink.start()
        relay.start(sink.host, sink.port)
        print(f"-- relay ready ({'; '.join(relay.setup_notes)})", flush=True)
        results, notes = asyncio.run(measure(relay, sink, args))
    except Exception:
        tail = relay.log_tail()
        if tail:
            print(f"relay log tail:\n{tail}", file=sys.stderr)
        raise
    finally:
        try:
            relay.stop()
        finally:
            sink.stop()
            if relay.pid:
                wait_pid_gone(relay.pid, 1)
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(results)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "params": {
                        k: getattr(args, k)
                        for k in (
                            "messages",
                            "concurrency",
                            "events",
                            "batch",
                            "api_concurrency",
                            "repeat",
                        )
                    }
                    | {"intake_rate": INTAKE_RATE, "spamtraps": SPAMTRAPS},
                    "config": {
                        "bounce_domain": BOUNCE_DOMAIN,
                        "fbl_address": FBL_ADDRESS,
                    },
                    "machine": {
                        "cpus": os.cpu_count(),
                        "load_before": load_before,
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                    "priming": notes,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
