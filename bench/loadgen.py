"""Multi-process SMTP load generator, the same for every target.

``concurrency`` SMTP sessions are spread over ``procs`` worker processes; each worker
runs one asyncio loop with a lean hand-written SMTP client (an ``asyncio.Protocol``,
no aiosmtplib: the client must cost much less CPU than the servers it measures).
Every session connects, says EHLO, does AUTH PLAIN once if the server advertises it,
then waits for the common start signal and sends messages back to back over the
same connection: MAIL, RCPT, DATA, content, one command at a time (no pipelining,
so all targets see the same dialogue). Each worker takes messages from its own
share of the run; sessions inside a worker take the next one as soon as they are
free.

The latency of a message is the time from writing the end of its content (the
final ``.``) to reading the 250 reply, i.e. how long the server took to take
responsibility for it. The transaction time runs from writing MAIL to that 250.
All times are ``time.monotonic()`` values, comparable across processes on Linux.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import email.utils
import multiprocessing as mp
import os
import queue
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_PROSE = (
    "relay queue message sender recipient domain policy delivery mailbox header "
    "subscriber campaign newsletter offer update account weekly summary report "
    "transaction receipt invoice reminder welcome confirm unsubscribe preference "
    "the a of and to in for with on at by about your our this that new now"
)
_WORDS = tuple(_PROSE.split())

SENDER_DOMAIN = "bench.test"
SENDER = f"bench-sender@{SENDER_DOMAIN}"
RECIPIENT_DOMAIN = "example.net"

MESSAGE_KINDS = ("marketing", "plain")
"""``marketing``: multipart/alternative newsletter that passes every policy check;
``plain``: the original plain-text message (transactional, no list headers)."""


@dataclass(frozen=True)
class LoadSpec:
    """What to send, and where."""

    host: str
    port: int
    messages: int
    concurrency: int
    size: int
    procs: int = 2
    username: str | None = None
    password: str | None = None
    run_id: str = "run"
    reply_timeout: float = 60.0
    message: str = "marketing"


@dataclass
class LoadResult:
    """What happened, merged over all workers."""

    t_start: float = 0.0
    t_last_accept: float = 0.0
    accepted: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    transactions: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    worker_cpu: list[float] = field(default_factory=list)
    worker_wall: list[float] = field(default_factory=list)
    auth_used: bool = False
    complete: bool = True

    def percentile(self, q: float, values: list[float] | None = None) -> float | None:
        ordered = sorted(self.latencies if values is None else values)
        if not ordered:
            return None
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index]

    @property
    def accept_seconds(self) -> float:
        return max(self.t_last_accept - self.t_start, 1e-9)


# -- messages ------------------------------------------------------------------


def _body_lines() -> Iterator[bytes]:
    """An endless, deterministic stream of prose lines of at most 72 characters."""
    state = 12345
    line: list[str] = []
    length = 0
    while True:
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        word = _WORDS[state % len(_WORDS)]
        if length + len(word) + 1 > 72:
            yield (" ".join(line) + ".").capitalize().encode() + b"\r\n"
            line, length = [], 0
        line.append(word)
        length += len(word) + 1


_BODY_CACHE: dict[int, bytes] = {}


def _body(length: int) -> bytes:
    """Exactly ``length`` bytes of CRLF-terminated text (``length`` >= 3)."""
    body = _BODY_CACHE.get(length)
    if body is not None:
        return body
    parts: list[bytes] = []
    remaining = length
    lines = _body_lines()
    while remaining:
        line = next(lines)
        left = remaining - len(line)
        if left < 0 or 0 < left < 3:  # the last line: cut or pad to the exact size
            text = line[:-2][: remaining - 2]
            line = text + b"x" * (remaining - 2 - len(text)) + b"\r\n"
        parts.append(line)
        remaining -= len(line)
    body = b"".join(parts)
    _BODY_CACHE[length] = body
    return body


def prose(length: int) -> bytes:
    """Exactly ``length`` bytes (>= 3) of CRLF lines of prose, each < 78 bytes."""
    return _body(length)


def recipient(seq: int) -> str:
    return f"user{seq}@{RECIPIENT_DOMAIN}"


def make_message(seq: int, size: int, run_id: str, kind: str = "marketing") -> bytes:
    """A message of ``size`` bytes (before the final ``.``), or of the smallest
    size its kind allows (:func:`minimum_size`) if that is larger."""
    if kind == "plain":
        return make_plain(seq, size, run_id)
    if kind == "marketing":
        return make_marketing(seq, size, run_id)
    raise ValueError(f"unknown message kind {kind!r}")


def make_plain(seq: int, size: int, run_id: str) -> bytes:
    """A plain RFC 5322 message of ``size`` bytes, no list headers (transactional
    to the relay's classifier)."""
    headers = (
        f"From: Bench Sender <{SENDER}>\r\n"
        f"To: <{recipient(seq)}>\r\n"
        f"Subject: Benchmark message {seq} of {run_id}\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-ID: <{run_id}.{seq}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()
    return headers + _body(max(3, size - len(headers)))


def unsubscribe_url(seq: int) -> str:
    """The sender's own unsubscribe link for recipient ``seq``."""
    return f"https://{SENDER_DOMAIN}/unsubscribe?u={seq}"


def _marketing_frame(seq: int, run_id: str) -> tuple[bytes, bytes, bytes]:
    """Headers + text part opening, text part end + HTML part opening, and the
    HTML end + closing delimiter; the prose goes between them."""
    boundary = f"=_bench_{seq}"
    url = unsubscribe_url(seq)
    head = (
        f"From: Bench News <{SENDER}>\r\n"
        f"To: <{recipient(seq)}>\r\n"
        f"Subject: Weekly offers {seq} of {run_id}\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Message-ID: <{run_id}.{seq}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
        "X-Relay-Category: marketing\r\n"
        f"List-Unsubscribe: <{url}>,\r\n"
        f" <mailto:unsubscribe@{SENDER_DOMAIN}?subject=unsubscribe%20{seq}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a multi-part message in MIME format.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "Hello,\r\n"
        "\r\n"
    )
    middle = (
        "\r\n"
        "You receive this newsletter because you subscribed to it.\r\n"
        f"Unsubscribe: {url}\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Type: text/html; charset=us-ascii\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "<!DOCTYPE html>\r\n"
        "<html><head><title>Weekly offers</title></head>\r\n"
        "<body>\r\n"
        "<p>Hello,</p>\r\n"
        "<p>\r\n"
    )
    tail = (
        "</p>\r\n"
        "<p>You receive this newsletter because you subscribed to it.\r\n"
        f'<a href="{url}">Unsubscribe</a></p>\r\n'
        "</body></html>\r\n"
        "\r\n"
        f"--{boundary}--\r\n"
    )
    return head.encode(), middle.encode(), tail.encode()


def make_marketing(seq: int, size: int, run_id: str) -> bytes:
    """A newsletter as an email-marketing platform sends it: multipart/alternative
    (text and HTML with the same prose), ``X-Relay-Category: marketing``,
    ``List-Unsubscribe`` (https + mailto) with ``List-Unsubscribe-Post``, an
    unsubscribe link in both parts, From and Message-ID at the sender's domain."""
    head, middle, tail = _marketing_frame(seq, run_id)
    fill = max(6, size - len(head) - len(middle) - len(tail))
    text = fill // 2
    return head + _body(text) + middle + _body(fill - text) + tail


def minimum_size(kind: str, run_id: str = "run0-relay+policies") -> int:
    """The smallest ``size`` a message of ``kind`` can have exactly (with a
    six-digit sequence number and a run id as long as ``run_id``)."""
    if kind == "plain":
        return len(make_plain(999_999, 0, run_id))
    return sum(map(len, _marketing_frame(999_999, run_id))) + 6


# -- the client --------------------------------------------------------------


class SmtpError(Exception):
    def __init__(self, stage: str, code: int, text: bytes) -> None:
        super().__init__(f"{stage}: {code} {text[:120]!r}")
        self.stage = stage
        self.code = code


class _Client(asyncio.Protocol):
    """One SMTP connection; ``reply()`` returns the next complete reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._lines: list[bytes] = []
        self._replies: collections.deque[list[bytes]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start : nl + 1]
            start = nl + 1
            self._lines.append(line)
            if line[3:4] != b"-":
                self._replies.append(self._lines)
                self._lines = []
        self._buf = buf[start:]
        waiter = self._waiter
        if self._replies and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("server closed the connection")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def reply(self) -> tuple[int, list[bytes]]:
        while not self._replies:
            if self._lost is not None:
                raise ConnectionError(str(self._lost))
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        lines = self._replies.popleft()
        try:
            return int(lines[0][:3]), lines
        except ValueError:
            return 0, lines

    async def expect(self, stage: str, wanted: int) -> list[bytes]:
        code, lines = await self.reply()
        if code != wanted:
            raise SmtpError(stage, code, b"".join(lines))
        return lines

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _open_session(spec: LoadSpec) -> tuple[_Client, bool]:
    """Connect, EHLO, AUTH PLAIN if advertised. Returns (client, authenticated)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(spec.reply_timeout):
        _, client = await loop.create_connection(_Client, spec.host, spec.port)
        try:
            await client.expect("greeting", 220)
            client.write(b"EHLO loadgen.bench.test\r\n")
            lines = await client.expect("EHLO", 250)
            features = [line[4:].strip().upper() for line in lines]
            auth = any(
                f.startswith(b"AUTH") and b"PLAIN" in f.split() for f in features
            )
            if auth and spec.username is not None:
                token = base64.b64encode(
                    f"\0{spec.username}\0{spec.password or ''}".encode()
                )
                client.write(b"AUTH PLAIN " + token + b"\r\n")
                await client.expect("AUTH", 235)
                return client, True
        except BaseException:
            client.close()
            raise
    return client, False


@dataclass
class _WorkerState:
    next_index: int
    end: int
    accepted: int = 0
    failed: int = 0
    t_last_accept: float = 0.0
    latencies: list[float] = field(default_factory=list)
    transactions: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    auth_used: bool = False

    def take(self) -> int | None:
        if self.next_index >= self.end:
            return None
        index = self.next_index
        self.next_index += 1
        return index


async def _session(
    spec: LoadSpec,
    client: _Client,
    state: _WorkerState,
    messages: dict[int, tuple[bytes, bytes]],
) -> None:
    mail_cmd = f"MAIL FROM:<{SENDER}>\r\n".encode()
    reconnects = 0
    monotonic = time.monotonic
    while True:
        seq = state.take()
        if seq is None:
            break
        rcpt_cmd, content = messages.pop(seq)
        try:
            async with asyncio.timeout(spec.reply_timeout):
                began = monotonic()
                client.write(mail_cmd)
                await client.expect("MAIL", 250)
                client.write(rcpt_cmd)
                await client.expect("RCPT", 250)
                client.write(b"DATA\r\n")
                await client.expect("DATA", 354)
                client.write(content)
                sent = monotonic()
                code, _ = await client.reply()
        except SmtpError as exc:
            stage, code = exc.stage, exc.code
        except (OSError, TimeoutError) as exc:
            stage, code = type(exc).__name__, -1
        else:
            if code == 250:
                now = monotonic()
                state.accepted += 1
                state.latencies.append(now - sent)
                state.transactions.append(now - began)
                state.t_last_accept = max(state.t_last_accept, now)
                continue
            stage = "end of data"
        # The message failed: count it, then get the session usable again.
        state.failed += 1
        state.errors[f"{stage} {code}" if code >= 0 else stage] += 1
        if code in {421, 0, -1}:
            client.close()
            client, reconnects = await _reconnect(spec, state, reconnects)
        else:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(spec.reply_timeout):
                    client.write(b"RSET\r\n")
                    await client.reply()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5):
            client.write(b"QUIT\r\n")
            await client.reply()
    client.close()


async def _reconnect(
    spec: LoadSpec, state: _WorkerState, reconnects: int
) -> tuple[_Client, int]:
    """Open a fresh session, or give up (end the session) after 5 tries."""
    while reconnects < 5:
        reconnects += 1
        try:
            client, _ = await _open_session(spec)
        except (OSError, TimeoutError, SmtpError) as exc:
            state.errors[f"reconnect {type(exc).__name__}"] += 1
            await asyncio.sleep(0.5)
            continue
        return client, reconnects
    raise ConnectionError("giving up after 5 reconnects")


async def _worker_async(
    spec: LoadSpec,
    *,
    first: int,
    count: int,
    sessions: int,
    ready: Any,
    go: Any,
) -> dict[str, Any]:
    messages = {
        seq: (
            f"RCPT TO:<{recipient(seq)}>\r\n".encode(),
            make_message(seq, spec.size, spec.run_id, spec.message) + b".\r\n",
        )
        for seq in range(first, first + count)
    }
    state = _WorkerState(next_index=first, end=first + count)
    opened = await asyncio.gather(
        *(_open_session(spec) for _ in range(sessions)), return_exceptions=True
    )
    clients = [c for c in opened if isinstance(c, tuple)]
    problems = [repr(c) for c in opened if not isinstance(c, tuple)]
    state.auth_used = any(auth for _, auth in clients)
    ready.put(("ready", os.getpid(), len(clients), problems[:3]))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    cpu0, wall0 = time.process_time(), time.monotonic()
    results = await asyncio.gather(
        *(_session(spec, client, state, messages) for client, _ in clients),
        return_exceptions=True,
    )
    for result in results:
        if isinstance(result, BaseException):
            state.errors[f"session ended: {type(result).__name__}"] += 1
    # Messages nobody could send (all sessions gave up) count as failed.
    state.failed += len(messages)
    return {
        "accepted": state.accepted,
        "failed": state.failed,
        "t_last_accept": state.t_last_accept,
        "latencies": state.latencies,
        "transactions": state.transactions,
        "errors": dict(state.errors),
        "cpu": time.process_time() - cpu0,
        "wall": time.monotonic() - wall0,
        "auth_used": state.auth_used,
    }


def _worker_main(
    spec: LoadSpec, first: int, count: int, sessions: int, ready: Any, go: Any, out: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    try:
        result = asyncio.run(
            _worker_async(
                spec, first=first, count=count, sessions=sessions, ready=ready, go=go
            )
        )
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        ready.put(("error", os.getpid(), 0, [repr(exc)]))
        out.put({"error": repr(exc)})
        return
    out.put(result)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class LoadRun:
    """One run of the generator: start workers, wait until every session is open,
    fire, collect."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        procs = max(1, min(spec.procs, spec.concurrency, spec.messages))
        self._ctx = mp.get_context("spawn")
        self._ready: Any = self._ctx.Queue()
        self._out: Any = self._ctx.Queue()
        self._go: Any = self._ctx.Event()
        self._procs: list[Any] = []
        first = 0
        for count, sessions in zip(
            _split(spec.messages, procs), _split(spec.concurrency, procs), strict=True
        ):
            proc = self._ctx.Process(
                target=_worker_main,
                args=(spec, first, count, sessions, self._ready, self._go, self._out),
                daemon=True,
            )
            self._procs.append(proc)
            first += count
        self.sessions_open = 0
        self.problems: list[str] = []

    def start(self, timeout: float = 120.0) -> None:
        """Start the workers; return once all have opened their sessions."""
        for proc in self._procs:
            proc.start()
        deadline = time.monotonic() + timeout
        for _ in self._procs:
            try:
                _kind, _pid, opened, problems = self._ready.get(
                    timeout=max(0.1, deadline - time.monotonic())
                )
            except queue.Empty as exc:
                raise TimeoutError("load generator workers did not get ready") from exc
            self.sessions_open += opened
            self.problems.extend(problems)
        if self.sessions_open == 0:
            raise ConnectionError(
                "no SMTP session could be opened: " + "; ".join(self.problems[:3])
            )

    def fire(self) -> float:
        """Release all sessions at once; returns the start time."""
        start = time.monotonic()
        self._go.set()
        return start

    def collect(self, t_start: float, deadline: float) -> LoadResult:
        """Gather the workers' results (until ``deadline``, monotonic)."""
        result = LoadResult(t_start=t_start)
        got = 0
        for _ in self._procs:
            try:
                item = self._out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                result.complete = False
                break
            got += 1
            if "error" in item:
                result.errors[f"worker: {item['error']}"] = 1
                continue
            result.accepted += item["accepted"]
            result.failed += item["failed"]
            result.latencies.extend(item["latencies"])
            result.transactions.extend(item["transactions"])
            result.t_last_accept = max(result.t_last_accept, item["t_last_accept"])
            result.worker_cpu.append(item["cpu"])
            result.worker_wall.append(item["wall"])
            result.auth_used = result.auth_used or item["auth_used"]
            for key, value in item["errors"].items():
                result.errors[key] = result.errors.get(key, 0) + value
        if got < len(self._procs):
            result.complete = False
        if not result.complete:
            result.errors["generator timed out"] = 1
        return result

    def close(self) -> None:
        self._go.set()
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for q in (self._ready, self._out):
            q.close()
            q.cancel_join_thread()
