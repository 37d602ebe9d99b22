"""Runs the DATA-stage policy checks in worker processes beside the event loop.

The checks are CPU work (MIME, HTML, term scoring: about 0.3 ms for a 4 KiB
newsletter) and the relay's event loop is one thread. With ``[policies] workers``
above 0, each message's DATA stage runs in a worker process instead, so the loop
goes on with SMTP and the queue on its own CPU meanwhile. The RCPT checks (one
indexed lookup each) stay in the relay process.

What a worker gets: the envelope, the classification, what the RCPT checks looked
up (``PolicyContext.notes``) and the message bytes. What it sends back: the stage
result and every verdict as its pipeline saw it; the relay replays those into its
own observer and warning hook, so logs and metrics read the same as when the
checks run in the relay process. Each worker builds its pipeline from the same
``RelayConfig`` and reads the exclusion list and consent ledger through its own
read-only SQLite connection.

Faults stay with the worker: one that dies, or answers nothing within the DATA
checks' timeouts put together (plus :data:`DEADLINE_MARGIN_SECONDS`; it is then
killed), costs the messages it was checking ``451 4.3.0`` (the client retries)
and is started again. While no worker is ready, the checks run in the relay
process.

Framing on the pipes: a 4-byte big-endian length, then a pickle. Both ends are
this module, of the same installed version, and nothing else writes to them. The
worker is ``python -m relay.policy_workers``: its first frame is its set-up
(answered with ``ready`` or an error), then requests one at a time. It ignores
SIGINT, SIGTERM and SIGHUP (the relay drains first); the relay closing its stdin
ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

import structlog

from config.models import RelayConfig
from policies.base import (
    PASS,
    MessageKind,
    Mode,
    Outcome,
    PolicyContext,
    Stage,
    Verdict,
    defer,
)
from policies.content_categories import ContentCategories
from policies.pipeline import (
    POLICY_ERROR,
    Observation,
    Observer,
    PassCounter,
    Pipeline,
    StageResult,
)
from policies.registry import pipeline_for
from relay.clock import SystemClock
from relay.logs import configure_logging
from relay.message import MessageView
from relay.metrics import Metrics
from storage.sqlite import SqliteStore

log = structlog.get_logger(__name__)

DEADLINE_MARGIN_SECONDS = 5.0
"""Added to the DATA checks' timeouts: time a request may wait behind others."""
START_TIMEOUT_SECONDS = 30.0
"""Start-up of a worker (imports, the Public Suffix List, term lists)."""
STOP_TIMEOUT_SECONDS = 2.0
_RESTART_DELAYS = (0.0, 1.0, 5.0, 30.0)
"""Wait before starting a worker again, by failures in a row."""
_STABLE_SECONDS = 10.0
"""A worker that lived this long resets its failures in a row."""
_MAX_ERROR_CHARS = 4000
PIPE_BYTES = 1024 * 1024
"""Capacity asked for each pipe to a worker (Linux's default maximum for a
process without CAP_SYS_RESOURCE, ``/proc/sys/fs/pipe-max-size``)."""
_HEADER = struct.Struct("!I")

WarningHook = Callable[[str, list[str]], None]
"""``(account, phrases)``: spam-trigger phrases in a Subject (content_categories)."""

VerdictWire = tuple[str, str, str, dict[str, float], tuple[str, ...]] | None
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}
_MODES = {mode.value: mode for mode in Mode}
_MODE_VALUES = {mode: mode.value for mode in Mode}
_KINDS = {kind.value: kind for kind in MessageKind}


class PolicyCheckFailed(Exception):  # noqa: N818 - reads as what happened
    """A check raised in a worker; the text is the worker's traceback."""


class _WorkerGone(Exception):  # noqa: N818 - internal signal, never logged
    """The worker exited or was killed with the request unanswered."""


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """The first frame a worker reads: what it builds its pipeline from."""

    config: RelayConfig
    base_dir: Path | None
    database: Path | None
    log_level: str


# -- the wire format, both ends -----------------------------------------------


def _verdict_out(verdict: Verdict) -> VerdictWire:
    if verdict is PASS:
        return None
    return (
        verdict.outcome.value,
        verdict.reason,
        verdict.detail,
        dict(verdict.figures),
        verdict.recipients,
    )


def _verdict_in(wire: VerdictWire) -> Verdict:
    if wire is None:
        return PASS
    outcome, reason, detail, figures, recipients = wire
    return Verdict(_OUTCOMES[outcome], reason, detail, figures, recipients)


def _frame(value: object) -> bytes:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _read_frame(stream: IO[bytes]) -> Any:
    """The next frame of a blocking stream, or ``None`` at its end."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)  # noqa: S301 - our own parent process


# -- the relay's side ------------------------------------------------------------


class _Worker(asyncio.SubprocessProtocol):
    """One worker slot: its current process, and the requests it has not answered.

    It is the process's protocol too: answers are cut from the stdout pipe's data
    as it arrives and handed to their requests at once.
    """

    def __init__(self, slot: int, on_exit: Callable[[_Worker], None]) -> None:
        self.slot = slot
        self._on_exit = on_exit
        self.transport: asyncio.SubprocessTransport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._buffer = bytearray()
        self.hello: asyncio.Future[Any] | None = None
        self.ready = False
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.started_at = 0.0
        self.stuck = False
        self.failures = 0
        self.exited: asyncio.Event = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return None if self.transport is None else self.transport.get_pid()

    # -- asyncio.SubprocessProtocol ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)
        self.loop = asyncio.get_running_loop()
        stdin = self.transport.get_pipe_transport(0)
        self._stdin = cast(asyncio.WriteTransport, stdin)
        _grow_pipe(stdin)
        _grow_pipe(self.transport.get_pipe_transport(1))

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or isinstance(data, str):
            return
        buffer = self._buffer
        buffer += data
        start = 0
        garbled = False
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            try:
                answer = pickle.loads(buffer[start + _HEADER.size : end])  # noqa: S301 - our child
            except Exception:  # noqa: BLE001 - whatever it is, the pipe is garbled
                garbled = True
                break
            start = end
            if not self._deliver(answer):
                garbled = True
                break
        del buffer[:start]
        if garbled:
            log.error("policy_worker_garbled", pid=self.pid)
            self.kill()

    def connection_lost(self, exc: Exception | None) -> None:
        # Called once the process has exited and its pipes are closed: every
        # answer it wrote has been read by then.
        self.ready = False
        if self.hello is not None and not self.hello.done():
            self.hello.set_result(None)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(_WorkerGone())
        self.pending.clear()
        self.exited.set()
        self._on_exit(self)

    # -- requests ------------------------------------------------------------------

    def _deliver(self, answer: Any) -> bool:
        """Hand ``answer`` to whoever waits for it; False if it is no answer."""
        if not isinstance(answer, tuple) or not answer:
            return False
        if self.hello is not None and not self.hello.done():
            self.hello.set_result(answer)
            return True
        future = self.pending.get(answer[0])
        if future is not None and not future.done():
            future.set_result(answer)
        return True

    def send(self, frame: bytes) -> None:
        if self._stdin is None or self._stdin.is_closing():
            raise _WorkerGone
        self._stdin.write(frame)

    def submit(self, request_id: int, frame: bytes) -> asyncio.Future[Any]:
        if self.loop is None:
            raise _WorkerGone  # never started
        future: asyncio.Future[Any] = self.loop.create_future()
        self.send(frame)
        self.pending[request_id] = future
        return future

    def close_stdin(self) -> None:
        if self._stdin is not None and not self._stdin.is_closing():
            self._stdin.close()

    def kill(self) -> None:
        if self.transport is not None and self.transport.get_returncode() is None:
            with contextlib.suppress(ProcessLookupError):
                self.transport.kill()


class PolicyWorkers:
    """A pool of worker processes that run the DATA stage of ``local``'s checks.

    ``local`` is the relay's own pipeline, built from the same config: it keeps
    running the RCPT stage, and the DATA stage too while no worker is ready.
    """

    def __init__(
        self,
        setup: WorkerSetup,
        local: Pipeline,
        observer: Observer,
        metrics: Metrics,
        *,
        count: int,
        on_warning: WarningHook | None = None,
        command: Sequence[str] | None = None,
        passed: PassCounter | None = None,
    ) -> None:
        self._setup_frame = _frame(setup)
        self._local = local
        self._observer = observer
        self._passed = passed
        self._metrics = metrics
        self._on_warning = on_warning
        self._command = tuple(command or (sys.executable, "-m", "relay.policy_workers"))
        self._workers = [_Worker(slot, self._exited) for slot in range(count)]
        self._deadline = local.time_budget(Stage.DATA) + DEADLINE_MARGIN_SECONDS
        self._next_id = 0
        self._closing = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._in_process_logged = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers that are ready."""
        return [w.pid for w in self._workers if w.ready and w.pid is not None]

    async def start(self) -> None:
        """Start every worker; one that cannot start is retried in the background."""
        await asyncio.gather(*(self._start(worker) for worker in self._workers))
        self._metrics.policy_workers_ready.set(len(self.pids))

    async def close(self) -> None:
        """End every worker: close its stdin, wait a little, then kill it."""
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        # A start cut short ends its own process (``_start``): wait for that.
        await asyncio.gather(*self._restarts, return_exceptions=True)
        for worker in self._workers:
            if worker.transport is None or worker.exited.is_set():
                continue
            worker.ready = False
            worker.close_stdin()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                    await worker.exited.wait()
            await self._end(worker)
        self._metrics.policy_workers_ready.set(0)

    async def run(self, ctx: PolicyContext) -> StageResult:
        """The DATA stage for ``ctx``, in the least busy worker."""
        if ctx.stage is not Stage.DATA or ctx.message is None:
            return await self._local.run(ctx)
        worker = None
        for candidate in self._workers:  # the ready one with the fewest requests
            if candidate.ready and (
                worker is None or len(candidate.pending) < len(worker.pending)
            ):
                worker = candidate
        if worker is None:
            if not self._in_process_logged:
                self._in_process_logged = True
                log.warning("policy_checks_in_process", reason="no worker ready")
            return await self._local.run(ctx)
        self._next_id += 1
        request_id = self._next_id
        try:
            frame = _frame(
                (
                    request_id,
                    ctx.account,
                    ctx.mail_from,
                    # A timestamp: pickling an aware datetime costs 25x more.
                    ctx.received_at.timestamp(),
                    ctx.peer_ip,
                    ctx.tls,
                    ctx.recipients,
                    None if ctx.kind is None else ctx.kind.value,
                    dict(ctx.notes),
                    ctx.message.content,
                )
            )
        except (pickle.PicklingError, TypeError, AttributeError):
            log.exception("policy_request_unpicklable")
            return await self._local.run(ctx)
        reply = None
        stuck = False
        # The deadline is a timer that fails the answer's future: cheaper than
        # asyncio.timeout around the await, on every message.
        deadline: asyncio.TimerHandle | None = None
        try:
            answer = worker.submit(request_id, frame)
            deadline = answer.get_loop().call_later(self._deadline, _expire, answer)
            reply = await answer
        except TimeoutError:
            stuck = True  # no answer in time: it hangs, or is far behind
        except _WorkerGone:
            pass
        finally:
            if deadline is not None:
                deadline.cancel()
            worker.pending.pop(request_id, None)
        if reply is not None:
            return self._replay(reply)
        if stuck:
            log.error(
                "policy_worker_stuck",
                pid=worker.pid,
                seconds=self._deadline,
                pending=len(worker.pending),
            )
            worker.stuck = True
            worker.kill()
        return _unavailable()

    def _replay(self, reply: Any) -> StageResult:
        """The worker's answer as a :class:`StageResult`; its verdicts observed."""
        _, policy, verdict, dropped, observed, warnings = reply
        passed = self._passed
        for name, seen, mode, duration, error in observed:
            if seen is None and error is None and passed is not None:
                passed(name, Stage.DATA, _MODES[mode], duration)
                continue
            self._observer(
                Observation(
                    policy=name,
                    stage=Stage.DATA,
                    verdict=_verdict_in(seen),
                    mode=_MODES[mode],
                    duration_seconds=duration,
                    error=None if error is None else PolicyCheckFailed(error),
                )
            )
        if self._on_warning is not None:
            for account, phrases in warnings:
                self._on_warning(account, phrases)
        return StageResult(
            _verdict_in(verdict),
            policy,
            {rcpt: (name, _verdict_in(wire)) for rcpt, name, wire in dropped},
        )

    # -- supervision ------------------------------------------------------------

    async def _start(self, worker: _Worker) -> None:
        worker.stuck = False
        worker.transport = None
        worker.exited.clear()
        loop = asyncio.get_running_loop()
        worker.hello = loop.create_future()
        try:
            await loop.subprocess_exec(
                lambda: worker,
                *self._command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
            worker.send(self._setup_frame)
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                answer = await worker.hello
        except (OSError, _WorkerGone, TimeoutError) as exc:
            answer = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:  # close() during the start
            await self._end(worker)
            raise
        if not (isinstance(answer, tuple) and answer[:1] == ("ready",)):
            error = answer[1] if isinstance(answer, tuple) else answer or "no answer"
            await self._end(worker)
            self._start_failed(worker, str(error))
            return
        if self._closing:
            await self._end(worker)
            return
        worker.ready = True
        worker.started_at = time.monotonic()
        self._in_process_logged = False
        log.info("policy_worker_started", pid=worker.pid, slot=worker.slot)

    async def _end(self, worker: _Worker) -> None:
        """Stop ``worker``'s process (if any) and wait for it to be gone."""
        if worker.transport is None:
            return
        worker.ready = False
        worker.kill()
        await worker.exited.wait()
        worker.transport.close()

    def _start_failed(self, worker: _Worker, error: str) -> None:
        self._metrics.policy_worker_failures_total.labels("start_failed").inc()
        log.error("policy_worker_start_failed", slot=worker.slot, error=error[:1000])
        worker.failures += 1
        self._restart_later(worker)

    def _exited(self, worker: _Worker) -> None:
        """A worker process ended: count it and start another (not at close)."""
        self._metrics.policy_workers_ready.set(len(self.pids))
        if self._closing or worker.hello is None or not worker.started_at:
            return  # closing, or a start that failed (``_start`` reports it)
        if worker.transport is not None:
            worker.transport.close()
        reason = "stuck" if worker.stuck else "exited"
        code = None if worker.transport is None else worker.transport.get_returncode()
        self._metrics.policy_worker_failures_total.labels(reason).inc()
        log.error("policy_worker_ended", pid=worker.pid, reason=reason, code=code)
        lived = time.monotonic() - worker.started_at
        worker.started_at = 0.0
        worker.failures = 1 if lived >= _STABLE_SECONDS else worker.failures + 1
        self._restart_later(worker)

    def _restart_later(self, worker: _Worker) -> None:
        if self._closing:
            return
        delay = _RESTART_DELAYS[min(worker.failures, len(_RESTART_DELAYS)) - 1]

        async def restart() -> None:
            await asyncio.sleep(delay)
            await self._start(worker)
            self._metrics.policy_workers_ready.set(len(self.pids))

        task = asyncio.create_task(restart(), name=f"policy-worker-{worker.slot}-start")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)


def _grow_pipe(pipe: asyncio.BaseTransport | None) -> None:
    """Let the pipe hold :data:`PIPE_BYTES` (Linux): with 16 requests of a few
    KiB in flight, the default 64 KiB fills, and every full pipe costs the
    writer a wait for it to drain (an epoll registration and a wake-up more)."""
    setter = getattr(fcntl, "F_SETPIPE_SZ", None)
    end = None if pipe is None else pipe.get_extra_info("pipe")
    if setter is None or end is None:
        return
    with contextlib.suppress(OSError, ValueError):  # a limit; or already closed
        fcntl.fcntl(end.fileno(), setter, PIPE_BYTES)


def _expire(answer: asyncio.Future[Any]) -> None:
    """The deadline of a request passed: its answer is a TimeoutError."""
    if not answer.done():
        answer.set_exception(TimeoutError())


def _unavailable() -> StageResult:
    return StageResult(
        defer(POLICY_ERROR, "the policy checks could not run; try again later"), "-"
    )


# -- the worker's side ------------------------------------------------------------


def main() -> None:
    """``python -m relay.policy_workers``: serve the relay on stdin and stdout."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # A large read buffer: requests that queued up while one was checked come
    # in with one read (the default 8 KiB holds about one 4 KiB message).
    requests = open(  # noqa: SIM115 - stdin itself, for the process's life
        sys.stdin.fileno(), "rb", buffering=PIPE_BYTES, closefd=False
    )
    answers = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print() must not corrupt the answers
    asyncio.run(_serve(requests, answers))


async def _serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    setup = _read_frame(requests)
    if not isinstance(setup, WorkerSetup):
        sys.stderr.write(f"policy worker: set-up expected, got {type(setup)}\n")
        return
    try:
        pipeline, observed, warnings = _build(setup)
    except Exception as exc:  # noqa: BLE001 - reported to the relay, which logs it
        answers.write(_frame(("error", f"{type(exc).__name__}: {exc}")))
        answers.flush()
        return
    answers.write(_frame(("ready", os.getpid())))
    answers.flush()
    # Reading blocks the loop, but only between requests: nothing else runs here.
    while (request := _read_frame(requests)) is not None:
        answers.write(_frame(await _answer(pipeline, observed, warnings, request)))
        answers.flush()


def _build(
    setup: WorkerSetup,
) -> tuple[Pipeline, list[Observation], list[tuple[str, list[str]]]]:
    configure_logging(setup.log_level, "json", sys.stderr)
    store = None
    if setup.database is not None:
        store = SqliteStore(setup.database)
        store.open_lookups()
    observed: list[Observation] = []
    warnings: list[tuple[str, list[str]]] = []
    pipeline = pipeline_for(
        setup.config,
        observed.append,
        clock=SystemClock(),
        suppressions=store,
        consents=store,
        base_dir=setup.base_dir,
    )
    content = pipeline.policy("content_categories")
    if isinstance(content, ContentCategories):
        content.on_warning = lambda account, phrases: warnings.append(
            (account, list(phrases))
        )
    return pipeline, observed, warnings


async def _answer(
    pipeline: Pipeline,
    observed: list[Observation],
    warnings: list[tuple[str, list[str]]],
    request: Any,
) -> tuple[Any, ...]:
    (
        request_id,
        account,
        mail_from,
        received_at,
        peer_ip,
        tls,
        recipients,
        kind,
        notes,
        content,
    ) = request
    observed.clear()
    warnings.clear()
    result = await pipeline.run(
        PolicyContext(
            stage=Stage.DATA,
            account=account,
            mail_from=mail_from,
            received_at=datetime.fromtimestamp(received_at, UTC),
            peer_ip=peer_ip,
            tls=tls,
            recipients=recipients,
            message=MessageView(content, checked=True),
            kind=None if kind is None else _KINDS[kind],
            notes=notes,
        )
    )
    return (
        request_id,
        result.policy,
        _verdict_out(result.verdict),
        [
            (rcpt, name, _verdict_out(verdict))
            for rcpt, (name, verdict) in result.dropped.items()
        ],
        [
            (
                seen.policy,
                _verdict_out(seen.verdict),
                _MODE_VALUES[seen.mode],
                seen.duration_seconds,
                None if seen.error is None else _describe(seen.error),
            )
            for seen in observed
        ],
        list(warnings),
    )


def _describe(error: BaseException) -> str:
    text = "".join(traceback.format_exception(error))
    return text[-_MAX_ERROR_CHARS:]


if __name__ == "__main__":
    # Run the module's own definitions, not __main__'s copies: the set-up frame
    # names relay.policy_workers.WorkerSetup.
    from relay.policy_workers import main as worker_main

    worker_main()
