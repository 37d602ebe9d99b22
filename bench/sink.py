"""The counting SMTP sink every target delivers to.

Postfix's ``smtp-sink -c`` is used when installed: it accepts everything, discards
it, and writes a running counter (``sess=N quit=N mesg=N\\r``) to stdout after each
message. A thread drains that pipe continuously (if nobody reads it, smtp-sink blocks
on the full pipe after a few thousand messages) and remembers every count and
when it was read. Without smtp-sink, ``pysink.py`` (an asyncio sink
writing the same counter format) stands in.
"""

from __future__ import annotations

import bisect
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_MESG = re.compile(rb"mesg=(\d+)")

SMTP_SINK_PATHS = ("/usr/sbin/smtp-sink", "/usr/bin/smtp-sink")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_smtp_banner(host: str, port: int, timeout: float) -> bool:
    """True once something on host:port sends an SMTP 220 greeting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                sock.settimeout(5)
                banner = sock.recv(512)
                if banner.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def find_smtp_sink() -> str | None:
    """Path of Postfix's smtp-sink, if installed."""
    found = shutil.which("smtp-sink")
    if found:
        return found
    return next((p for p in SMTP_SINK_PATHS if Path(p).exists()), None)


class Sink:
    """A running sink on a free loopback port with a live message counter."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.kind = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0
        self._counts: list[int] = []  # every value the counter took, in order
        self._times: list[float] = []  # when each was read
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> Sink:
        for _attempt in range(5):
            self.port = free_port(self.host)
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the benchmark, which stops it
            )
            self._reader = threading.Thread(target=self._drain, daemon=True)
            self._reader.start()
            if wait_smtp_banner(self.host, self.port, timeout):
                # The probe connection above bumps sess/quit, not mesg.
                return self
            self.stop()
        raise RuntimeError("the SMTP sink did not start")

    def _command(self) -> list[str]:
        binary = find_smtp_sink()
        addr = f"{self.host}:{self.port}"
        if binary:
            self.kind = "smtp-sink"
            # -c: counters on stdout; -h: greeting name; backlog 256.
            cmd = [binary, "-c", "-h", "sink.bench.test"]
            if os.geteuid() == 0:
                cmd += ["-u", "postfix"]
            return [*cmd, addr, "256"]
        self.kind = "pysink"
        return [sys.executable, str(Path(__file__).with_name("pysink.py")), addr]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- counting --------------------------------------------------------------
    def _drain(self) -> None:
        proc = self.proc
        assert proc is not None
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        tail = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            data = tail + chunk
            # Only complete records (each ends with \r) are trusted.
            end = data.rfind(b"\r")
            if end < 0:
                tail = data[-256:]
                continue
            tail = data[end + 1 :][-256:]
            start = data.rfind(b"\r", 0, end)
            match = _MESG.search(data, start + 1, end)
            if match is None:
                continue
            count = int(match.group(1))
            with self._cond:
                if count > self._count:
                    self._count = count
                    self._counts.append(count)
                    self._times.append(now)
                self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_for(self, target: int, deadline: float) -> tuple[float | None, int]:
        """Block until the counter reaches ``target`` or ``deadline`` (monotonic).

        Returns (monotonic time at which the counter was first seen at or above
        ``target``, or None on timeout; the counter at return). The time comes from
        the counter's history, so it is right even if ``target`` was reached before
        this call.
        """
        with self._cond:
            while self._count < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None, self._count
                self._cond.wait(min(remaining, 0.5))
            if target <= 0 or not self._counts:
                return time.monotonic(), self._count
            index = bisect.bisect_left(self._counts, target)
            return self._times[index], self._count
