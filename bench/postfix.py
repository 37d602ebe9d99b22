"""A private Postfix instance configured as a plain relay (smarthost) to the sink.

Everything lives under one temporary directory: ``etc/`` (config_directory: main.cf,
master.cf), ``spool/`` (queue_directory), ``lib/`` (data_directory) and
``maillog`` (maillog_file, via postlogd, so no syslog is needed). It is started with
``postfix -c etc start`` and stopped with ``postfix -c etc stop``; the system-wide
Postfix (if any) is not touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from procstats import wait_pid_gone
from sink import free_port, wait_smtp_banner

POSTFIX_CANDIDATES = ("/usr/sbin/postfix", "/usr/bin/postfix")

# Not chrooted (column 5 = n) so that no copy of /etc files is needed in the spool.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen}  inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# Private benchmark instance: a relay to the sink, nothing delivered locally.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {maillog}
maillog_file_prefixes = {root}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 no local delivery on this relay
alias_maps =
alias_database =
relay_domains =
relayhost = [{sink_host}]:{sink_port}
mynetworks = 127.0.0.0/8
inet_interfaces = {listen_host}
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_banner = $myhostname ESMTP
# No DNS in a loopback benchmark: do not look up the client's name.
smtpd_peername_lookup = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtp_connection_cache_on_demand = yes
biff = no
append_dot_mydomain = no
readme_directory = no
"""


def find_postfix() -> str | None:
    found = shutil.which("postfix")
    if found:
        return found
    return next((p for p in POSTFIX_CANDIDATES if Path(p).exists()), None)


def ensure_installed(say: Callable[[str], None] = print) -> str | None:
    """Install Debian's postfix when missing and root. Returns a reason if unusable."""
    if shutil.which("postmulti") or find_postfix():
        return None
    if os.geteuid() != 0:
        return "postfix is not installed (run as root, or: apt-get install postfix)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say("postfix is missing: apt-get install -y postfix (may take a minute)")
    for attempt in range(2):
        if attempt:
            subprocess.run(
                ["apt-get", "update", "-q"], env=env, capture_output=True, check=False
            )
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "postfix"],
            env=env,
            capture_output=True,
            check=False,
            timeout=900,
        )
        if done.returncode == 0 and find_postfix():
            return None
    return "apt-get install postfix failed"


class PostfixTarget:
    name = "postfix"
    credentials: tuple[str, str] | None = None  # mynetworks: no AUTH needed

    def __init__(self, workdir: Path, overrides: list[str] | None = None) -> None:
        self.overrides = list(overrides or [])
        self.root = workdir / "postfix"
        self.etc = self.root / "etc"
        self.queue = self.root / "spool"
        self.data = self.root / "lib"
        self.maillog = self.root / "maillog"
        self.host = "127.0.0.1"
        self.port = 0
        self.pid = 0
        self._started = False
        self.binary = find_postfix() or "postfix"

    def _postfix(
        self, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def start(self, sink_host: str, sink_port: int) -> None:
        # The daemons run as mail_owner and must be able to reach their directories.
        parent = self.root.parent
        parent.mkdir(parents=True, exist_ok=True)
        parent.chmod(parent.stat().st_mode | 0o755)
        for path in (self.root, self.etc, self.queue, self.data):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        if os.geteuid() == 0:
            # master.lock and the caches live here and are opened as mail_owner.
            owner = pwd.getpwnam("postfix")
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
        self.port = free_port(self.host)
        (self.etc / "master.cf").write_text(
            MASTER_CF.format(listen=f"{self.host}:{self.port}")
        )
        (self.etc / "main.cf").write_text(
            MAIN_CF.format(
                queue=self.queue,
                data=self.data,
                maillog=self.maillog,
                root=self.root,
                sink_host=sink_host,
                sink_port=sink_port,
                listen_host=self.host,
            )
            + "".join(f"{item.strip()}\n" for item in self.overrides)
        )
        done = self._postfix("start", timeout=120)
        self._started = True
        if done.returncode != 0:
            raise RuntimeError(
                f"postfix start failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}"
            )
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.pid:
            try:
                self.pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        if not self.pid:
            raise RuntimeError(f"postfix master did not write {pid_file}")
        if not wait_smtp_banner(self.host, self.port, 30):
            raise RuntimeError(f"postfix does not answer on {self.host}:{self.port}")

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._postfix("stop", timeout=60)
        if self.pid and not wait_pid_gone(self.pid, 20):
            # Our own master (pid from our queue directory) would not stop.
            self._postfix("abort", timeout=30)
            if not wait_pid_gone(self.pid, 5):
                os.kill(self.pid, signal.SIGKILL)

    def queue_size(self) -> int:
        """Messages still in the private queue (active, incoming, deferred)."""
        total = 0
        for sub in ("incoming", "active", "deferred", "maildrop"):
            for _dirpath, _dirs, files in os.walk(self.queue / sub):
                total += len(files)
        return total

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.maillog.read_text().splitlines()[-lines:])
        except OSError:
            return ""
