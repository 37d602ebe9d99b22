#!/usr/bin/env python3
"""Throughput benchmark: the relay (policies off, every policy enforced, and
reputation tracking fully on) vs. a pass-through reference vs. Postfix.

``python bench/run.py [--messages N] [--concurrency K] [--size BYTES]
[--skip-postfix] [--json out.json]``

The same load (N messages of SIZE bytes over K concurrent, long-lived SMTP sessions)
goes to each target on loopback; each target forwards to its own counting sink
(Postfix's smtp-sink). See bench/README.md for what each figure means. This is a
benchmark, not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pstats
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchconf import (
    ACCOUNT,
    WANTED_POLICIES,
    policy_order,
    recipients,
    registered_policies,
    relay_toml,
    write_consents_csv,
    write_spamtraps,
    write_suppressions_csv,
)
from loadgen import MESSAGE_KINDS, LoadResult, LoadRun, LoadSpec, minimum_size
from postfix import PostfixTarget, ensure_installed
from procstats import (
    RssSampler,
    peak_rss_kib,
    pss_kib,
    tree_cpu_seconds,
    tree_pids,
    wait_pid_gone,
)
from sink import Sink, free_port, wait_smtp_banner

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RELAY_USER = ACCOUNT
RELAY_PASSWORD = "benchpass"  # noqa: S105 - a throwaway account in a temp config

GOAL_VS_PASSTHROUGH = 0.80
GOAL_VS_POSTFIX = 1.2
GOAL_POLICIES_VS_OFF = 0.80
"""relay+policies delivered/s over relay delivered/s: every check costs <= 20%."""
GOAL_REPUTATION_VS_OFF = 0.90
"""relay+reputation delivered/s over relay delivered/s: tracking costs <= 10%."""

RATIO_GOALS = (
    ("relay", "pass-through", GOAL_VS_PASSTHROUGH),
    ("relay", "postfix", GOAL_VS_POSTFIX),
    ("relay+policies", "relay", GOAL_POLICIES_VS_OFF),
    ("relay+reputation", "relay", GOAL_REPUTATION_VS_OFF),
)
"""(numerator target, denominator target, goal for the delivered/s ratio)."""


class Target(Protocol):
    name: str
    credentials: tuple[str, str] | None
    host: str
    port: int
    pid: int

    def start(self, sink_host: str, sink_port: int) -> None: ...
    def stop(self) -> None: ...
    def log_tail(self, lines: int = 15) -> str: ...


# -- targets ------------------------------------------------------------------


def _stop_process(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class PassthroughTarget:
    """bench/passthrough.py as a subprocess."""

    name = "pass-through"
    credentials: tuple[str, str] | None = (RELAY_USER, RELAY_PASSWORD)

    def __init__(self, workdir: Path, pool_size: int) -> None:
        self.pool_size = pool_size
        self.host = "127.0.0.1"
        self.port = 0
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "passthrough.log"

    def start(self, sink_host: str, sink_port: int) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(BENCH_DIR / "passthrough.py"),
                    "--listen",
                    f"{self.host}:0",
                    "--upstream",
                    f"{sink_host}:{sink_port}",
                    "--pool",
                    str(self.pool_size),
                ],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us; we stop it
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().split()  # LISTENING <port>
        if len(line) != 2 or line[0] != "LISTENING":
            raise RuntimeError(f"pass-through did not start: {self.log_tail()}")
        self.port = int(line[1])
        if not wait_smtp_banner(self.host, self.port, 30):
            raise RuntimeError("pass-through does not answer")

    def stop(self) -> None:
        _stop_process(self.proc, 10)

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log, lines)


class SinkDirectTarget:
    """Calibration: the load generator straight into the sink, no server between.

    Shows the ceiling of generator + sink on this machine; every real target
    should stay well below it, or the benchmark measures the harness.
    """

    name = "sink-direct"
    credentials: tuple[str, str] | None = None
    host = "127.0.0.1"
    port = 0
    pid = 0

    def start(self, sink_host: str, sink_port: int) -> None:
        self.host, self.port = sink_host, sink_port

    def stop(self) -> None:
        pass

    def log_tail(self, lines: int = 15) -> str:
        return ""


def relay_command() -> list[str]:
    """``relay`` (console script) if installed, else ``python -m relay``."""
    found = shutil.which("relay")
    if found:
        return [found]
    return [sys.executable, "-m", "relay"]


def relay_env() -> dict[str, str]:
    # So that ``python -m relay`` finds the package even when not pip-installed.
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO_DIR}{os.pathsep}{path}" if path else str(REPO_DIR),
    }


def relay_usable() -> str | None:
    """None if ``relay --help`` works and lists ``serve``; else why not."""
    try:
        done = subprocess.run(
            [*relay_command(), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=relay_env(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {relay_command()}: {exc}"
    if done.returncode != 0 or "serve" not in done.stdout:
        return (
            f"'{' '.join(relay_command())} --help' failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-300:]}"
        )
    return None


@dataclass(frozen=True)
class RelayLists:
    """What the relay targets load into their database before they start."""

    consents: int
    """Consent records (double opt-in) for ``user0`` ... ``user{consents-1}``."""
    suppressions: int
    """Generated exclusion-list entries (none of them a generated recipient)."""
    spamtraps: int = 0
    """Generated spamtraps (none of them a generated recipient); only the
    relay with reputation tracking on loads them."""


class ListFiles:
    """The files of :class:`RelayLists`, written once per run and shared."""

    def __init__(self, workdir: Path, lists: RelayLists) -> None:
        self.lists = lists
        self.consents = workdir / "consents.csv"
        self.suppressions = workdir / "suppressions.csv"
        self.spamtraps = workdir / "spamtraps.txt"
        self._written = False

    def write(self) -> None:
        if self._written:
            return
        write_consents_csv(self.consents, recipients(self.lists.consents))
        write_suppressions_csv(self.suppressions, self.lists.suppressions)
        write_spamtraps(self.spamtraps, self.lists.spamtraps)
        self._written = True

    def imports(self, reputation: bool) -> list[tuple[str, Path]]:
        """(``relay`` command group, file) of each ``relay ... import`` to run;
        empty lists are left out."""
        lists = self.lists
        steps = [
            ("suppress", self.suppressions, lists.suppressions),
            ("consent", self.consents, lists.consents),
            ("spamtraps", self.spamtraps, lists.spamtraps if reputation else 0),
        ]
        return [(what, path) for what, path, count in steps if count > 0]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(name, sorted labels): value}."""
    samples: Samples = {}
    for line in text.splitlines():
        found = _SAMPLE.match(line)
        if found is None:
            continue
        labels = tuple(sorted(_LABEL.findall(found.group(2) or "")))
        try:
            samples[found.group(1), labels] = float(found.group(3))
        except ValueError:
            continue
    return samples


class RelayTarget:
    """The product: ``relay serve -c <tmp>/<name>/relay.toml``.

    ``order`` lists the enforced checks (``[policies] order``); empty for the
    policies-off relay. ``reputation`` turns reputation tracking fully on (VERP
    senders, ``X-Relay-Id``, tracking rows, an account rate; see
    :func:`benchconf.relay_toml`) and loads the spamtraps too. Every relay
    target loads the same exclusion list and consent records first.
    ``intake_rate`` and ``admin_token`` (``bench/feedback_ingest.py``) go to
    ``[feedback] intake_rate`` and ``[http] admin_token``.
    """

    credentials: tuple[str, str] | None = (RELAY_USER, RELAY_PASSWORD)

    def __init__(
        self,
        workdir: Path,
        pool_size: int,
        profile: str | None = None,
        *,
        name: str = "relay",
        order: tuple[str, ...] = (),
        lists: ListFiles | None = None,
        workers: str = "auto",
        reputation: bool = False,
        intake_rate: str | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.name = name
        self.order = order
        self.reputation = reputation
        self.intake_rate = intake_rate
        self.admin_token = admin_token
        self.workers = workers
        self.lists = lists
        self.profile = profile
        self.dir = workdir / name.replace("+", "-")
        self.pool_size = pool_size
        self.host = "127.0.0.1"
        self.port = 0
        self.http_port = 0
        self.pid = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "relay.log"
        self.setup_notes: list[str] = []

    def _hash_password(self) -> str:
        done = subprocess.run(
            [*relay_command(), "hash-password"],
            input=RELAY_PASSWORD,
            capture_output=True,
            text=True,
            timeout=60,
            env=relay_env(),
            check=False,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines or not lines[-1].startswith("$"):
            raise RuntimeError(
                f"relay hash-password failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-300:]}"
            )
        return lines[-1].strip()

    def _load_lists(self, config: Path) -> None:
        """``relay suppress import``, ``relay consent import`` and, with
        reputation tracking, ``relay spamtraps import`` (before serve)."""
        if self.lists is None:
            return
        self.lists.write()
        for what, path in self.lists.imports(self.reputation):
            started = time.monotonic()
            done = subprocess.run(
                [*relay_command(), what, "import", str(path), "-c", str(config)],
                capture_output=True,
                text=True,
                timeout=1800,
                env=relay_env(),
                cwd=self.dir,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"relay {what} import failed ({done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()[-300:]}"
                )
            self.setup_notes.append(
                f"{done.stdout.strip()} in {time.monotonic() - started:.1f}s"
            )

    def start(self, sink_host: str, sink_port: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        self.http_port = free_port(self.host)
        config = self.dir / "relay.toml"
        config.write_text(
            relay_toml(
                host=self.host,
                port=self.port,
                http_port=self.http_port,
                db=self.dir / "bench.db",
                sink_host=sink_host,
                sink_port=sink_port,
                pool_size=self.pool_size,
                password_hash=self._hash_password(),
                order=self.order,
                workers=self.workers,
                reputation=self.reputation,
                intake_rate=self.intake_rate,
                admin_token=self.admin_token,
            )
        )
        self._load_lists(config)
        command = [*relay_command(), "serve", "-c", str(config)]
        if self.profile:
            # cProfile writes its file when the relay returns after SIGTERM.
            command = [sys.executable, "-m", "cProfile", "-o", self.profile]
            command += ["-m", "relay", "serve", "-c", str(config)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us; we stop it
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=relay_env(),
            )
        self.pid = self.proc.pid
        url = f"http://{self.host}:{self.http_port}/readyz"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relay serve exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"relay not ready after 60s (GET {url})")
        if not wait_smtp_banner(self.host, self.port, 30):
            raise RuntimeError("relay SMTP listener does not answer")

    def stop(self) -> None:
        _stop_process(self.proc, 45)

    def log_tail(self, lines: int = 15) -> str:
        return _tail(self.log, lines)

    def metrics(self) -> str:
        url = f"http://{self.host}:{self.http_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode(errors="replace"))
        except (urllib.error.URLError, OSError):
            return ""

    def samples(self) -> Samples:
        """The relay's metrics now, parsed (empty if /metrics does not answer)."""
        return parse_metrics(self.metrics())

    def tracking_rows(self) -> int | None:
        """Rows in the relay's ``sent_messages`` table (one per message sent
        with tracking), read beside the running relay; None if unreadable."""
        db = self.dir / "bench.db"
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            ) as conn:
                (count,) = conn.execute("SELECT count(*) FROM sent_messages").fetchone()
        except sqlite3.Error:
            return None
        return int(count)


# -- measuring ----------------------------------------------------------------


@dataclass
class Figures:
    target: str
    status: str = "ok"
    messages: int = 0
    accepted: int = 0
    failed: int = 0
    delivered: int = 0
    accepted_per_s: float | None = None
    delivered_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    txn_p50_ms: float | None = None
    txn_p99_ms: float | None = None
    cpu_ms_per_msg: float | None = None
    peak_rss_mib: float | None = None
    end_rss_mib: float | None = None
    accept_seconds: float | None = None
    deliver_seconds: float | None = None
    sink_cpu_ms_per_msg: float | None = None
    generator_cpu_pct: list[float] = field(default_factory=list)
    auth_used: bool = False
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs_delivered_per_s: list[float | None] = field(default_factory=list)
    policy_order: list[str] = field(default_factory=list)
    policy_us_per_msg: dict[str, float] = field(default_factory=dict)
    """Per check: its summed duration over the measured runs (the relay's
    relay_policy_check_duration_seconds, RCPT and DATA) / messages accepted."""
    policy_calls_per_msg: dict[str, float] = field(default_factory=dict)
    refusals: dict[str, float] = field(default_factory=dict)
    """Refused messages and recipients during the measured runs, by
    policy/reason (from the relay's metrics); empty when all passed."""
    tracking_rows: int | None = None
    """Relays: rows in ``sent_messages`` after the runs (reputation tracking
    writes one per message; the policies-off relay none)."""


def _deadline_for(messages: int) -> float:
    return 120.0 + messages / 100.0


def run_load(
    target: Target, sink: Sink, args: argparse.Namespace, messages: int, run_id: str
) -> tuple[LoadResult, float | None, int, float, float]:
    """Send ``messages`` and wait until the sink has them all.

    Returns (load result, delivery time or None, sink count gained, target CPU s,
    sink CPU s).
    """
    user, password = target.credentials or (None, None)
    spec = LoadSpec(
        host=target.host,
        port=target.port,
        messages=messages,
        concurrency=args.concurrency,
        size=args.size,
        procs=args.gen_procs,
        username=user,
        password=password,
        run_id=run_id,
        message=args.message,
    )
    load = LoadRun(spec)
    try:
        load.start()
        baseline = sink.count
        cpu0, sink_cpu0 = tree_cpu_seconds(target.pid), tree_cpu_seconds(sink.pid)
        t0 = load.fire()
        deadline = t0 + _deadline_for(messages)
        result = load.collect(t0, deadline)
        reached, count = sink.wait_for(baseline + result.accepted, deadline)
        cpu1, sink_cpu1 = tree_cpu_seconds(target.pid), tree_cpu_seconds(sink.pid)
    finally:
        load.close()
    return result, reached, count - baseline, cpu1 - cpu0, sink_cpu1 - sink_cpu0


class Measurement:
    """One target under measurement: its own sink, the warm-up, the measured
    runs and, at the end, the figures.

    :func:`measure` (``--sequential``) runs the steps back to back for one
    target; :func:`measure_interleaved` (the default) starts every target first
    and then takes run 1 of each, run 2 of each, ..., so that the load others
    put on a shared machine falls on every target alike. A step that raises
    marks the target failed and stops it; the later steps then do nothing.
    """

    def __init__(self, target: Target, args: argparse.Namespace) -> None:
        self.target = target
        self.args = args
        self.sink = Sink()
        self.figures = Figures(target=target.name, messages=args.messages)
        self.runs: list[Figures] = []
        self.sampler: RssSampler | None = None
        self.before: Samples = {}
        self.warmed = 0
        self.done = False
        """Failed or finished: nothing more to run."""

    def start(self) -> None:
        """Sink, target, warm-up; then memory sampling and the metrics before."""
        target, args, figures = self.target, self.args, self.figures
        try:
            self.sink.start()
            target.start(self.sink.host, self.sink.port)
            if isinstance(target, SinkDirectTarget):
                target.pid = self.sink.pid
            if args.warmup:
                warm, reached, _, _, _ = run_load(
                    target, self.sink, args, args.warmup, f"warmup-{target.name}"
                )
                self.warmed = warm.accepted
                if reached is None or warm.accepted < args.warmup:
                    figures.notes.append(
                        f"warm-up: {warm.accepted}/{args.warmup} accepted, "
                        f"{'not all' if reached is None else 'all'} delivered, "
                        f"errors {warm.errors}"
                    )
            self.sampler = RssSampler(target.pid).start()
            self.before = target.samples() if isinstance(target, RelayTarget) else {}
        except Exception as exc:  # noqa: BLE001 - one target failing must not stop the rest
            self._failed(exc)

    def run(self, number: int) -> Figures | None:
        """Measured run ``number``; None if the target is done."""
        if self.done:
            return None
        target, args = self.target, self.args
        run = Figures(target=target.name, messages=args.messages)
        try:
            result, reached, delivered, cpu, sink_cpu = run_load(
                target, self.sink, args, args.messages, f"run{number}-{target.name}"
            )
            _fill(run, result, reached, delivered, cpu, sink_cpu)
            run.end_rss_mib = sum(pss_kib(p) for p in tree_pids(target.pid)) / 1024
        except Exception as exc:  # noqa: BLE001 - one target failing must not stop the rest
            self._failed(exc)
            return None
        self.runs.append(run)
        if run.status != "ok":
            self.done = True
        return run

    def finish(self) -> Figures:
        """The figures of the runs (the median one), then stop target and sink."""
        try:
            if self.runs:
                self._summarise()
        except Exception as exc:  # noqa: BLE001 - one target failing must not stop the rest
            self._failed(exc)
        finally:
            self.stop()
        return self.figures

    def _summarise(self) -> None:
        target, runs = self.target, self.runs
        assert self.sampler is not None
        peak_tree_kib = self.sampler.stop()
        self.sampler = None
        after = target.samples() if isinstance(target, RelayTarget) else {}
        figures = _representative(runs, self.figures.notes)
        self.figures = figures
        if isinstance(target, RelayTarget):
            figures.notes[:0] = target.setup_notes
            accepted = sum(r.accepted for r in runs)
            _policy_figures(figures, target.order, self.before, after, accepted)
            _tracking_figures(figures, target, self.warmed + accepted)
        figures.peak_rss_mib = max(peak_rss_kib(target.pid), peak_tree_kib) / 1024
        if figures.status != "ok":
            self._log_tail()

    def _failed(self, exc: Exception) -> None:
        self.figures.status = f"failed: {exc}"
        self.runs = []
        self._log_tail()
        self.stop()

    def _log_tail(self) -> None:
        tail = self.target.log_tail()
        if tail:
            self.figures.notes.append("log tail:\n" + tail)

    def stop(self) -> None:
        """Stop the target and its sink (again: a no-op)."""
        self.done = True
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
        try:
            self.target.stop()
        finally:
            self.sink.stop()


def measure(target: Target, args: argparse.Namespace) -> Figures:
    """Start ``target``, warm it up, run it ``--repeat`` times, stop it."""
    measurement = Measurement(target, args)
    try:
        measurement.start()
        for number in range(args.repeat):
            measurement.run(number)
        return measurement.finish()
    finally:
        measurement.stop()


def measure_interleaved(
    targets: list[Target], args: argparse.Namespace
) -> list[Figures]:
    """Start and warm up every target, then run 1 of each, run 2 of each, ...;
    stop them all at the end."""
    measurements = [Measurement(target, args) for target in targets]
    try:
        for m in measurements:
            print(f"-- {m.target.name}: start, warm up ...", flush=True)
            m.start()
            if m.done:
                print(f"   {m.figures.status}", flush=True)
        for number in range(args.repeat):
            for m in measurements:
                started = time.monotonic()
                run = m.run(number)
                if run is None:
                    continue
                print(
                    f"-- run {number + 1}/{args.repeat} {m.target.name}: {run.status}: "
                    f"delivered/s {fmt(run.delivered_per_s)} "
                    f"({time.monotonic() - started:.0f}s)",
                    flush=True,
                )
        return [m.finish() for m in measurements]
    finally:
        for m in measurements:
            m.stop()


def _delta(before: Samples, after: Samples, name: str, label: str) -> dict[str, float]:
    """Increase of every ``name`` sample over the run, by its ``label`` value
    (several samples with the same label value add up)."""
    out: dict[str, float] = {}
    for (sample, labels), value in after.items():
        if sample != name:
            continue
        key = dict(labels).get(label, "")
        gained = value - before.get((sample, labels), 0.0)
        out[key] = out.get(key, 0.0) + gained
    return out


def _policy_figures(
    figures: Figures,
    order: tuple[str, ...],
    before: Samples,
    after: Samples,
    accepted: int,
) -> None:
    """Per-check time and calls per message, and refusals, from the metrics."""
    figures.policy_order = list(order)
    if accepted <= 0:
        return
    seconds = _delta(before, after, "relay_policy_check_duration_seconds_sum", "policy")
    calls = _delta(before, after, "relay_policy_check_duration_seconds_count", "policy")
    for name in order:
        figures.policy_us_per_msg[name] = seconds.get(name, 0.0) * 1e6 / accepted
        figures.policy_calls_per_msg[name] = calls.get(name, 0.0) / accepted
    for metric in ("relay_messages_refused_total", "relay_recipients_refused_total"):
        for (sample, labels), value in after.items():
            gained = value - before.get((sample, labels), 0.0)
            if sample == metric and gained > 0:
                found = dict(labels)
                what = "messages" if "messages" in metric else "recipients"
                key = f"{what} {found.get('policy', '-')}/{found.get('reason', '-')}"
                figures.refusals[key] = figures.refusals.get(key, 0.0) + gained
    if order:
        total = sum(figures.policy_us_per_msg.values())
        figures.notes.append(
            "policy checks (relay's own timing, RCPT + DATA, per message): "
            + ", ".join(
                f"{name} {figures.policy_us_per_msg[name]:.0f} us"
                f" ({figures.policy_calls_per_msg[name]:.1f} calls)"
                for name in order
            )
            + f"; total {total:.0f} us"
        )
    if figures.refusals:
        figures.notes.append(
            "refused during the measured runs: "
            + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(figures.refusals.items()))
        )


def _tracking_figures(figures: Figures, target: RelayTarget, accepted: int) -> None:
    """Check that reputation tracking was on exactly where configured: one
    ``sent_messages`` row per accepted message (warm-up included) with it, none
    without it. A relay+reputation that tracked nothing would measure nothing."""
    rows = target.tracking_rows()
    figures.tracking_rows = rows
    wanted = accepted if target.reputation else 0
    figures.notes.append(
        f"tracking rows (sent_messages): {fmt(rows)} for {accepted:,} messages "
        f"accepted (warm-up included); expected {wanted:,}"
    )
    if rows != wanted and figures.status == "ok":
        figures.status = f"failed: {fmt(rows)} tracking rows, expected {wanted:,}"


def _representative(runs: list[Figures], notes: list[str]) -> Figures:
    """The run to report: the first failed one, else the median by delivered/s."""
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        chosen = failed[0]
    else:
        ordered = sorted(runs, key=lambda r: r.delivered_per_s or 0.0)
        chosen = ordered[len(ordered) // 2]
    chosen.notes[:0] = notes
    chosen.runs_delivered_per_s = [r.delivered_per_s for r in runs]
    if len(runs) > 1:
        chosen.notes.append(
            "delivered/s per run: "
            + ", ".join(fmt(r.delivered_per_s) for r in runs)
            + (" (first failed run shown)" if failed else " (median shown)")
        )
    return chosen


def _fill(
    figures: Figures,
    result: LoadResult,
    reached: float | None,
    delivered: int,
    cpu: float,
    sink_cpu: float,
) -> None:
    n = figures.messages
    figures.accepted = result.accepted
    figures.failed = result.failed
    figures.delivered = delivered
    figures.errors = result.errors
    figures.auth_used = result.auth_used
    figures.generator_cpu_pct = [
        round(100 * c / w, 1)
        for c, w in zip(result.worker_cpu, result.worker_wall, strict=True)
        if w > 0
    ]
    if result.accepted:
        figures.accept_seconds = result.accept_seconds
        figures.accepted_per_s = result.accepted / result.accept_seconds
        p50, p99 = result.percentile(0.50), result.percentile(0.99)
        figures.p50_ms = None if p50 is None else p50 * 1000
        figures.p99_ms = None if p99 is None else p99 * 1000
        t50 = result.percentile(0.50, result.transactions)
        t99 = result.percentile(0.99, result.transactions)
        figures.txn_p50_ms = None if t50 is None else t50 * 1000
        figures.txn_p99_ms = None if t99 is None else t99 * 1000
        figures.cpu_ms_per_msg = cpu * 1000 / result.accepted
        figures.sink_cpu_ms_per_msg = sink_cpu * 1000 / result.accepted
    if reached is not None and result.accepted:
        figures.deliver_seconds = max(reached - result.t_start, 1e-9)
        figures.delivered_per_s = result.accepted / figures.deliver_seconds
    problems = []
    if not result.complete:
        problems.append("generator did not finish in time")
    if result.accepted < n:
        problems.append(f"{result.accepted}/{n} accepted")
    if reached is None:
        problems.append(
            f"sink counted {delivered}/{result.accepted} within {_deadline_for(n):.0f}s"
        )
    if problems:
        figures.status = "failed: " + "; ".join(problems)


# -- report -------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    """A figure for the tables (``n/a`` when missing)."""
    return "n/a" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[Figures]) -> None:
    header = (
        f"{'target':<15}{'accepted/s':>11}{'delivered/s':>12}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'CPU ms/msg':>11}{'peak RSS MiB':>13}{'failed':>8}  status"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.target:<15}{fmt(r.accepted_per_s):>11}{fmt(r.delivered_per_s):>12}"
            f"{fmt(r.p50_ms, 1):>9}{fmt(r.p99_ms, 1):>9}"
            f"{fmt(r.cpu_ms_per_msg, 2):>11}{fmt(r.peak_rss_mib, 1):>13}"
            f"{r.failed:>8}  {r.status}"
        )


def ratios(
    results: list[Figures], missing_checks: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    by_name = {r.target: r for r in results}
    out: dict[str, dict[str, Any]] = {}
    for name, other, goal in RATIO_GOALS:
        mine, ref = by_name.get(name), by_name.get(other)
        value = None
        if (
            mine is not None
            and ref is not None
            and mine.delivered_per_s
            and ref.delivered_per_s
            and mine.status == "ok"
            and ref.status == "ok"
        ):
            value = mine.delivered_per_s / ref.delivered_per_s
        # CPU per message: less sensitive to other work on the machine than
        # throughput; a target bound by one core has delivered/s ~ 1 / CPU.
        mine_cpu = mine.cpu_ms_per_msg if mine is not None else None
        ref_cpu = ref.cpu_ms_per_msg if ref is not None else None
        cpu_ratio = (
            mine_cpu / ref_cpu if value is not None and mine_cpu and ref_cpu else None
        )
        item: dict[str, Any] = {
            "ratio": value,
            "goal": goal,
            "met": None if value is None else value >= goal,
            "cpu_ratio": cpu_ratio,
        }
        if name == "relay+policies" and mine is not None:
            item["checks"] = mine.policy_order
            if missing_checks:
                item["missing_checks"] = missing_checks
        out[f"{name}/{other}"] = item
    return out


def print_ratios(table: dict[str, dict[str, Any]]) -> None:
    print("\ndelivered/s ratios:")
    for name, item in table.items():
        if item["ratio"] is None:
            verdict = "not measured"
            value = "n/a"
        else:
            value = f"{item['ratio']:.2f}"
            if not item["met"] and float(value) >= item["goal"]:
                value = f"{item['ratio']:.3f}"  # 0.898 must not read as 0.90
            verdict = "MET" if item["met"] else "NOT met"
        if item.get("missing_checks"):
            verdict += f" (without {', '.join(item['missing_checks'])})"
        if item.get("cpu_ratio") is not None:
            verdict += f"; CPU ms/msg x{item['cpu_ratio']:.2f}"
        print(f"  {name:<22} {value:>6}   goal >= {item['goal']:.2f}: {verdict}")


def print_notes(results: list[Figures]) -> None:
    for r in results:
        lines = []
        if r.generator_cpu_pct:
            lines.append(
                "load generator CPU per worker process: "
                + ", ".join(f"{p:.0f}%" for p in r.generator_cpu_pct)
            )
        if r.sink_cpu_ms_per_msg is not None:
            lines.append(f"sink CPU: {r.sink_cpu_ms_per_msg:.3f} ms/msg")
        if r.txn_p50_ms is not None:
            lines.append(
                f"whole transaction (MAIL..250): p50 {r.txn_p50_ms:.1f} ms, "
                f"p99 {fmt(r.txn_p99_ms, 1)} ms"
            )
        if r.end_rss_mib is not None:
            lines.append(f"memory after the run (PSS): {r.end_rss_mib:.1f} MiB")
        if r.accept_seconds is not None:
            lines.append(
                f"last 250 after {r.accept_seconds:.2f}s; all delivered "
                + (
                    "never (timed out)"
                    if r.deliver_seconds is None
                    else f"after {r.deliver_seconds:.2f}s"
                )
                + f"; AUTH used: {r.auth_used}"
            )
        if r.errors:
            lines.append(f"errors: {r.errors}")
        lines.extend(r.notes)
        if lines:
            print(f"\n[{r.target}]")
            for line in lines:
                print("  " + line.replace("\n", "\n    "))


def print_profile(path: str, top: int = 25) -> None:
    try:
        stats = pstats.Stats(path, stream=sys.stdout)
    except (OSError, TypeError, EOFError) as exc:
        print(f"\nno relay profile in {path}: {exc}")
        return
    print(f"\nrelay profile ({path}), top {top} by own time:")
    stats.sort_stats("tottime").print_stats(top)
    print(f"relay profile ({path}), top {top} by cumulative time:")
    stats.sort_stats("cumulative").print_stats(top)


# -- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the relay (every policy check off, enforced, and "
        "with reputation tracking fully on) against a pass-through reference and "
        "Postfix.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--messages", type=int, default=5000, help="messages per target"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="concurrent SMTP sessions"
    )
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument(
        "--skip-postfix", action="store_true", help="do not run Postfix"
    )
    parser.add_argument(
        "--skip-relay", action="store_true", help="do not run the relay"
    )
    parser.add_argument(
        "--skip-relay-policies",
        action="store_true",
        help="do not run the relay with every policy check enforced",
    )
    parser.add_argument(
        "--skip-relay-reputation",
        action="store_true",
        help="do not run the relay with reputation tracking fully on",
    )
    parser.add_argument(
        "--skip-passthrough", action="store_true", help="do not run the pass-through"
    )
    parser.add_argument(
        "--message",
        choices=MESSAGE_KINDS,
        default="marketing",
        help="generated mail: a multipart newsletter that passes every check, or "
        "the plain-text message of earlier versions (transactional to the relay)",
    )
    parser.add_argument(
        "--suppressions",
        type=int,
        default=100_000,
        help="exclusion-list entries loaded into every relay's database",
    )
    parser.add_argument(
        "--spamtraps",
        type=int,
        default=10_000,
        help="generated spamtraps loaded into relay+reputation's database",
    )
    parser.add_argument(
        "--policies",
        metavar="NAME,NAME",
        help="the checks relay+policies enforces, in order (attribution "
        "experiments); default: every registered check of the sending policy",
    )
    parser.add_argument(
        "--policy-workers",
        metavar="N",
        default="auto",
        help='[policies] workers of every relay: "auto" (the default of relay.toml) '
        "or a number; 0 runs the checks in the relay process",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument(
        "--warmup", type=int, default=200, help="warm-up messages per target (0: none)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measured runs per target; the median (by delivered/s) is reported",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="measure one target after the other (start, warm up, every run, "
        "stop) instead of starting them all and interleaving their runs",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=16,
        help="upstream connections (relay, pass-through)",
    )
    parser.add_argument(
        "--gen-procs", type=int, default=2, help="load generator worker processes"
    )
    parser.add_argument(
        "--skip-sink-check",
        action="store_true",
        help="do not calibrate (generator straight into the sink)",
    )
    parser.add_argument(
        "--postfix-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra main.cf line for Postfix (repeatable), e.g. in_flow_delay=0",
    )
    parser.add_argument(
        "--profile-relay",
        metavar="OUT.prof",
        help="run the relay under cProfile, write its stats here and print the top "
        "functions (slows the relay: its figures are then not comparable)",
    )
    parser.add_argument(
        "--profile-relay-policies",
        metavar="OUT.prof",
        help="the same for the relay+policies target",
    )
    parser.add_argument(
        "--profile-relay-reputation",
        metavar="OUT.prof",
        help="the same for the relay+reputation target",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory"
    )
    args = parser.parse_args(argv)
    for name in ("profile_relay", "profile_relay_policies", "profile_relay_reputation"):
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    smallest = max(512, minimum_size(args.message))
    if (
        args.messages < 1
        or args.concurrency < 1
        or args.size < smallest
        or args.gen_procs < 1
        or args.repeat < 1
        or args.suppressions < 0
        or args.spamtraps < 0
    ):
        parser.error(
            "--messages, --concurrency, --gen-procs, --repeat >= 1; "
            "--suppressions, --spamtraps >= 0; "
            f"--size >= {smallest} for --message {args.message}"
        )
    return args


def select_targets(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[Target], list[Figures], list[str]]:
    """The targets to measure, rows for those that cannot run (with why), and the
    wanted checks that are not registered yet (relay+policies runs without them)."""
    targets: list[Target] = []
    skipped: list[Figures] = []
    missing: list[str] = []
    if not args.skip_sink_check:
        targets.append(SinkDirectTarget())
    if not args.skip_passthrough:
        targets.append(PassthroughTarget(workdir, args.pool_size))
    relays = [
        (name, profile)
        for name, skip, profile in (
            ("relay", args.skip_relay, args.profile_relay),
            # Right after relay: the two are compared, and the load others put
            # on a shared machine drifts less between neighbours.
            (
                "relay+reputation",
                args.skip_relay_reputation,
                args.profile_relay_reputation,
            ),
            ("relay+policies", args.skip_relay_policies, args.profile_relay_policies),
        )
        if not skip
    ]
    problem = relay_usable() if relays else None
    lists = ListFiles(
        workdir,
        RelayLists(
            consents=max(args.messages, args.warmup),
            suppressions=args.suppressions,
            spamtraps=args.spamtraps,
        ),
    )
    for name, profile in relays:
        if problem is not None:
            skipped.append(Figures(target=name, status=f"not run: {problem}"))
            continue
        order: tuple[str, ...] = ()
        if name == "relay+policies":
            try:
                found, missing = policy_order(
                    registered_policies([sys.executable], relay_env())
                )
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                skipped.append(Figures(target=name, status=f"not run: {exc}"))
                continue
            if args.policies is not None:
                wanted = [n.strip() for n in args.policies.split(",") if n.strip()]
                missing = [n for n in WANTED_POLICIES if n not in wanted]
                found = wanted
            order = tuple(found)
            print(
                f"relay+policies enforces: {', '.join(order)}"
                + (f" (left out: {', '.join(missing)})" if missing else ""),
                flush=True,
            )
        targets.append(
            RelayTarget(
                workdir,
                args.pool_size,
                profile,
                name=name,
                order=order,
                lists=lists,
                workers=args.policy_workers,
                reputation=name == "relay+reputation",
            )
        )
    if not args.skip_postfix:
        problem = (
            ensure_installed(lambda line: print(line, flush=True))
            if os.geteuid() == 0
            else "Postfix needs root to start a private instance"
        )
        if problem is None:
            targets.append(PostfixTarget(workdir, args.postfix_set))
        else:
            skipped.append(Figures(target="postfix", status=f"not run: {problem}"))
    return targets, skipped, missing


def exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every cleanup (finally)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    workdir.chmod(0o755)  # Postfix daemons run as 'postfix' and must get in
    print(
        f"{args.messages} {args.message} messages of {args.size} bytes over "
        f"{args.concurrency} sessions ({args.gen_procs} generator processes), "
        f"warm-up {args.warmup}; "
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
    targets, skipped, missing = select_targets(args, workdir)
    results: list[Figures] = []
    try:
        if args.sequential:
            for target in targets:
                print(f"-- {target.name} ...", flush=True)
                started = time.monotonic()
                figures = measure(target, args)
                results.append(figures)
                print(
                    f"   {figures.status}: delivered/s "
                    f"{fmt(figures.delivered_per_s)} "
                    f"({time.monotonic() - started:.0f}s)",
                    flush=True,
                )
        else:
            results = measure_interleaved(targets, args)
    finally:
        for target in targets:  # measuring stops them; this is the safety net
            try:
                target.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"stopping {target.name}: {exc}", file=sys.stderr)
            if target.pid:
                wait_pid_gone(target.pid, 1)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results.extend(skipped)
    print()
    print_table(results)
    table = ratios(results, missing)
    print_ratios(table)
    print_notes(results)
    for path in (
        args.profile_relay,
        args.profile_relay_policies,
        args.profile_relay_reputation,
    ):
        if path:
            print_profile(path)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "params": {
                        k: getattr(args, k)
                        for k in (
                            "messages",
                            "concurrency",
                            "size",
                            "warmup",
                            "pool_size",
                            "gen_procs",
                            "repeat",
                            "sequential",
                            "postfix_set",
                            "message",
                            "suppressions",
                            "spamtraps",
                        )
                    },
                    "machine": {
                        "cpus": os.cpu_count(),
                        "load_before": load_before,
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                    "results": [asdict(r) for r in results],
                    "ratios": table,
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
