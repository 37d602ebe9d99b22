"""CPU and memory figures of a process tree, read from ``/proc`` (Linux only).

No psutil: the benchmark must not add dependencies. CPU of a tree is the root's
own user+sys time, plus what it reaped from dead children (cutime+cstime), plus the
same for every live descendant. Taking that sum before and after a run gives the CPU
spent in between, even for children (Postfix daemons) that exit during the run.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _all_parents() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents[int(entry.name)] = int(fields[1])
    return parents


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _all_parents().items():
        children.setdefault(ppid, []).append(pid)
    result, todo = [], [root]
    while todo:
        pid = todo.pop()
        result.append(pid)
        todo.extend(children.get(pid, []))
    return result


def process_cpu_seconds(pid: int) -> float:
    """user+sys of ``pid`` plus what it reaped from its children, in seconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime are stat fields 14-17 (1-based); fields[0] is 3.
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / _CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and its descendants (live, or reaped)."""
    return sum(process_cpu_seconds(pid) for pid in tree_pids(root))


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set size) of one process, in KiB."""
    return _status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    """Current resident set size of one process, in KiB."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    return int(fields[21]) * _PAGE // 1024


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split between their users), in KiB.

    Summing PSS over processes does not count shared libraries and shared memory
    once per process, unlike RSS. Falls back to RSS without smaps_rollup.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return rss_kib(pid)


class RssSampler:
    """Samples the summed PSS of a process tree in a thread; keeps the maximum."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            total = sum(pss_kib(pid) for pid in tree_pids(self.root))
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        """Stop sampling; return the peak in KiB."""
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak_kib


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """True once /proc/<pid> disappears (or turns zombie) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            return True
        time.sleep(0.05)
    return False
