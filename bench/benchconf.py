"""The relay configuration the benchmarks use, and the lists they load into it.

``bench/run.py`` writes :func:`relay_toml` for its relay targets (``relay``: no
checks; ``relay+policies``: every check enforced; ``relay+reputation``: no checks,
reputation tracking fully on) and ``bench/policy_costs.py`` loads the same text,
so both measure the same pipeline. ``relay`` and ``relay+policies`` differ only
in ``[policies] order``: same account, same sender domain, same ``[feedback]
secret``, and the same exclusion list and consent ledger in the database
(:func:`write_suppressions_csv`, :func:`write_consents_csv`).
``relay+reputation`` adds what tracking costs (``reputation=True``: VERP and
``X-Relay-Id`` through ``[feedback] bounce_domain`` and ``fbl_address``, an
account ``rate``) and a spamtrap list (:func:`write_spamtraps`);
``bench/feedback_ingest.py`` uses the same configuration.
"""

from __future__ import annotations

import csv
import random
import secrets
import subprocess
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loadgen import RECIPIENT_DOMAIN, SENDER_DOMAIN

from storage.imports import CONSENT_COLUMNS

ACCOUNT = "bench"
"""The sending account (= the SMTP AUTH user name)."""

DOMAIN_VERIFIED = "2024-01-15"
"""When the account's sender domain was verified: older than any minimum age."""

WANTED_POLICIES = (
    "exclusion",
    "consent",
    "header_sanity",
    "sender_domains",
    "optout_link",
    "content_categories",
)
"""Every check of the sending policy, in the order ``relay+policies`` runs them
(the list lookups first: they decide at RCPT where they can)."""

BOUNCE_DOMAIN = "bounces.bench.example"
"""``[feedback] bounce_domain`` with reputation tracking on (VERP senders)."""

FBL_ADDRESS = "fbl@bench.example"
"""``[feedback] fbl_address`` with reputation tracking on."""

ACCOUNT_RATE = "100000000/h"
"""``[accounts.bench] rate`` with reputation tracking on: a token bucket is
taken per recipient, but this one never runs dry in a benchmark."""

DUMMY_PASSWORD_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$riXugVX5PjR5ppP6EE1XSA$"  # noqa: S105 - a dummy
    "2OI2aAVM6AIR4rQbcfNMZFo3cOeWUjBvo6xPNybrwZM"
)
"""A well-formed hash for configurations nobody logs in to (bench/policy_costs.py)."""

RELAY_TOML = """\
[server]
hostname = "relay.bench.test"
listen = "{host}:{port}"
allow_cleartext_auth = true
max_sessions = 1000

[http]
listen = "{host}:{http_port}"
public_url = "http://{host}:{http_port}"
{http}
[storage]
url = "sqlite:///{db}"

[upstream]
url = "smtp://{sink_host}:{sink_port}"
pool_size = {pool_size}

[queue]
send_dsn = false

[feedback]
secret = "{secret}"
{feedback}
[policies]
mode = "enforce"
order = [{order}]
workers = {workers}

[policies.optout_link]
# The generated messages carry their own List-Unsubscribe.
list_unsubscribe = "refuse"

[log]
level = "warning"

[accounts.{user}]
password_hash = "{password_hash}"
domains = {{ "{domain}" = {verified} }}
{extra}"""


def relay_toml(
    *,
    db: Path,
    sink_host: str = "127.0.0.1",
    sink_port: int = 2526,
    host: str = "127.0.0.1",
    port: int = 0,
    http_port: int = 0,
    pool_size: int = 16,
    password_hash: str = DUMMY_PASSWORD_HASH,
    order: Sequence[str] = (),
    secret: str | None = None,
    default_category: str | None = None,
    workers: str = "auto",
    reputation: bool = False,
    intake_rate: str | None = None,
    admin_token: str | None = None,
) -> str:
    """relay.toml for the bench account; ``order`` lists the enforced checks.

    ``reputation``: reputation tracking fully on (:data:`BOUNCE_DOMAIN`,
    :data:`FBL_ADDRESS`, the account's :data:`ACCOUNT_RATE`); ``intake_rate``:
    ``[feedback] intake_rate`` (the default, 600/m per client IP, would throttle
    a feedback benchmark); ``admin_token``: ``[http] admin_token`` (the admin
    API, ``/api``, is off without it).
    """
    feedback = ""
    account = f'default_category = "{default_category}"\n' if default_category else ""
    if reputation:
        feedback += (
            f'bounce_domain = "{BOUNCE_DOMAIN}"\nfbl_address = "{FBL_ADDRESS}"\n'
        )
        account += f'rate = "{ACCOUNT_RATE}"\n'
    if intake_rate is not None:
        feedback += f'intake_rate = "{intake_rate}"\n'
    return RELAY_TOML.format(
        host=host,
        port=port,
        http_port=http_port,
        db=db,
        sink_host=sink_host,
        sink_port=sink_port,
        pool_size=pool_size,
        secret=secret or secrets.token_urlsafe(32),
        order=", ".join(f'"{name}"' for name in order),
        workers=workers if workers.isdecimal() else f'"{workers}"',
        user=ACCOUNT,
        password_hash=password_hash,
        domain=SENDER_DOMAIN,
        verified=DOMAIN_VERIFIED,
        extra=account,
        feedback=feedback,
        http=f'admin_token = "{admin_token}"\n' if admin_token else "",
    )


def registered_policies(python: Sequence[str], env: dict[str, str]) -> list[str]:
    """The names in ``policies.registry.REGISTRY`` as ``python`` sees them.

    Raises ``RuntimeError`` when the registry cannot be imported.
    """
    done = subprocess.run(
        [
            *python,
            "-c",
            "from policies.registry import REGISTRY; print(' '.join(REGISTRY))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"cannot read the policy registry: {done.stderr.strip()[-300:]}"
        )
    return done.stdout.split()


def policy_order(registered: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the wanted checks that are registered, in order; those that are not)."""
    known = set(registered)
    return (
        [name for name in WANTED_POLICIES if name in known],
        [name for name in WANTED_POLICIES if name not in known],
    )


def recipients(count: int) -> list[str]:
    """The addresses the load generator sends to (``user0`` ... ``user{count-1}``)."""
    return [f"user{seq}@{RECIPIENT_DOMAIN}" for seq in range(count)]


def write_consents_csv(path: Path, addresses: Iterable[str]) -> int:
    """A consent file (``relay consent import``): double opt-in for each address."""
    collected = datetime(2024, 3, 1, 9, 30, tzinfo=UTC)
    count = 0
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(CONSENT_COLUMNS)
        for address in addresses:
            writer.writerow(
                (
                    ACCOUNT,
                    address,
                    collected.isoformat(),
                    "newsletter",
                    "double",
                    f"https://{SENDER_DOMAIN}/subscribe",
                    "192.0.2.10",
                    (collected + timedelta(minutes=7)).isoformat(),
                    "Yes, send me the weekly offers.",
                    "",
                )
            )
            count += 1
    return count


_REASONS = (
    ("unsubscribe", 60),
    ("hard_bounce", 25),
    ("soft_bounce", 8),
    ("complaint", 5),
    ("spamtrap", 1),
    ("manual", 1),
)


def suppression_rows(
    count: int, *, seed: int = 1, now: datetime | None = None
) -> Iterable[tuple[str, str | None, str, datetime, datetime | None]]:
    """``count`` generated exclusion-list entries: (address, account or None,
    reason, created_at, expires_at).

    70% global, 20% for the bench account, 10% for other accounts; reasons in
    the proportions of ``_REASONS``; soft bounces expire. Addresses are in
    ``example.org``-style domains, never the load generator's recipients.
    """
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    moment = now or datetime.now(UTC)
    reasons = [name for name, weight in _REASONS for _ in range(weight)]
    for index in range(count):
        scope_roll = rng.random()
        account = (
            None
            if scope_roll < 0.7
            else ACCOUNT
            if scope_roll < 0.9
            else f"other{index % 7}"
        )
        reason = reasons[index % len(reasons)]
        created = moment - timedelta(seconds=rng.randrange(86400, 3 * 365 * 86400))
        expires = moment + timedelta(days=30) if reason == "soft_bounce" else None
        local = f"{rng.choice(('anna', 'bob', 'chen', 'dara', 'eli'))}.{index:07d}"
        domain = f"d{rng.randrange(20_000)}.example.org"
        yield f"{local}@{domain}", account, reason, created, expires


def spamtrap_addresses(count: int) -> Iterable[str]:
    """``count`` generated spamtrap addresses, never a load generator recipient
    (those are in ``example.net``)."""
    for index in range(count):
        yield f"trap.{index:07d}@t{index % 997}.example.com"


def write_spamtraps(path: Path, count: int) -> int:
    """A spamtrap file (``relay spamtraps import``): one address per line."""
    with path.open("w", encoding="utf-8") as out:
        out.write("# generated spamtraps (bench/benchconf.py)\n")
        for address in spamtrap_addresses(count):
            out.write(address + "\n")
    return count


def write_suppressions_csv(path: Path, count: int) -> int:
    """An exclusion-list file (``relay suppress import``) of ``count`` entries."""
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            (
                "address",
                "account",
                "reason",
                "source",
                "created_at",
                "note",
                "expires_at",
            )
        )
        for address, account, reason, created, expires in suppression_rows(count):
            writer.writerow(
                (
                    address,
                    account or "",
                    reason,
                    "import",
                    created.isoformat(),
                    "",
                    expires.isoformat() if expires else "",
                )
            )
    return count
