"""``relay accounts``, ``relay spamtraps`` and ``relay feedback`` on the command line.

They read and write the store directly, so they work whether the relay runs or
not; a running relay reads stored state changes back within seconds
(:data:`relay.accounts.RECONCILE_SECONDS`). Rates shown here are computed from the
stored hourly counts, exactly as the relay computes them.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
from datetime import UTC, datetime
from typing import Any

import click

from config import RelayConfig
from policies.reputation import (
    DAY_HOURS,
    Counters,
    Reading,
    hour_of,
    judge,
    readings,
)
from relay.accounts import AccountStatus, reinstate_in_store
from relay.admin_reputation import status_json
from relay.cli import (
    _account_or_exit,
    _fail,
    _load,
    _open_input,
    _plural,
    _with_store,
    config_option,
    main,
)
from storage.addresses import AddressError, canonical_address
from storage.base import AccountStanding, AccountStateChange, KeptFeedback
from storage.sqlite import SqliteStore

_STATE_CHANGES = 5


async def _snapshot(
    store: SqliteStore, config: RelayConfig, changes_of: str | None
) -> tuple[Counters, dict[str, AccountStanding], list[AccountStateChange]]:
    now_hour = hour_of(datetime.now(UTC).timestamp())
    counters = Counters(config.thresholds.window_seconds)
    buckets = await store.counter_buckets(
        now_hour - max(counters.window_hours, DAY_HOURS)
    )
    counters.load(buckets, now_hour)
    standings = {s.account: s for s in await store.account_standings()}
    for account, standing in standings.items():
        if standing.judged_from is not None:
            counters.start_after(account, hour_of(standing.judged_from.timestamp()) - 1)
    changes = (
        await store.account_state_changes(changes_of, _STATE_CHANGES)
        if changes_of
        else []
    )
    return counters, standings, changes


def _value(reading: Reading, value: float) -> str:
    if reading.base or reading.statistic.value.endswith("_rate"):
        return f"{value * 100:.2f}%"
    return f"{int(value)}"


def _status_json(
    account: str,
    config: RelayConfig,
    counters: Counters,
    standing: AccountStanding | None,
    changes: list[AccountStateChange],
) -> dict[str, Any]:
    """The same JSON as ``GET /api/accounts/NAME``."""
    totals = counters.totals(account)
    return status_json(
        AccountStatus(
            account=account,
            standing=standing,
            judgement=judge(readings(totals, config.thresholds)),
            totals=totals,
            window_seconds=config.thresholds.window_seconds,
            changes=tuple(changes),
        )
    )


@main.group(invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def accounts(ctx: click.Context, config_path: str, as_json: bool) -> None:
    """Every account with its state and the rate nearest its threshold.

    "relay accounts status NAME" shows one account in full; "relay accounts
    reinstate NAME --reason ..." lifts a suspension.
    """
    if ctx.invoked_subcommand is not None:
        return
    config = _load(config_path)
    counters, standings, _ = _with_store(
        config, lambda store: _snapshot(store, config, None)
    )
    names = sorted(set(config.accounts) | set(standings))
    rows = [
        _status_json(name, config, counters, standings.get(name), []) for name in names
    ]
    if as_json:
        click.echo(json.dumps({"accounts": rows}, indent=2))
        return
    click.echo(f"{'account':<20} {'state':<10} {'sent':>8}  nearest threshold")
    for row in rows:
        judged = [r for r in row["rates"] if r["judged"] and r["ratio"] != 0]
        nearest = max(judged, key=lambda r: r["ratio"] or float("inf"), default=None)
        if nearest is not None:
            ratio = nearest["ratio"]
            text = (
                f"{nearest['statistic']} at "
                f"{'no' if ratio is None else f'{ratio:.2f} of its'} threshold"
            )
        elif row["counts"]["sent"] < config.thresholds.min_volume:
            text = f"rates not judged below {config.thresholds.min_volume} sent"
        else:
            text = "every rate at 0"
        click.echo(
            f"{row['account']:<20} {row['state']:<10} {row['counts']['sent']:>8}  "
            f"{text}"
        )


@accounts.command("status")
@click.argument("name")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def accounts_status(name: str, config_path: str, as_json: bool) -> None:
    """One account: its state and why, each rate against its threshold with the
    counts behind it, and the last changes of state with their reasons."""
    config = _load(config_path)
    counters, standings, changes = _with_store(
        config, lambda store: _snapshot(store, config, name)
    )
    if name not in config.accounts and name not in standings:
        _account_or_exit(config, name)
    status = _status_json(name, config, counters, standings.get(name), changes)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    standing = standings.get(name)
    since = (
        f" since {standing.changed_at:%Y-%m-%d %H:%M} UTC (by {standing.changed_by})"
        if standing
        else ""
    )
    click.echo(f"account {name}: {status['state']}{since}")
    if standing and standing.reason:
        click.echo(f"  {standing.reason}")
    window = config.thresholds.window_seconds
    found = readings(counters.totals(name), config.thresholds)
    click.echo("")
    click.echo(
        f"{'statistic':<20} {'value':>8} {'threshold':>10} {'ratio':>6}  "
        f"{'counts':<24} {'on breach':<9} judged"
    )
    for reading in found:
        counts = (
            f"{reading.count} / {reading.base}" if reading.base else f"{reading.count}"
        )
        ratio = "inf" if reading.ratio == float("inf") else f"{reading.ratio:.2f}"
        click.echo(
            f"{reading.statistic.value:<20} {_value(reading, reading.value):>8} "
            f"{_value(reading, reading.limit):>10} {ratio:>6}  {counts:<24} "
            f"{reading.action.value:<9} {'yes' if reading.judged else 'no'}"
        )
    c = status["counts"]
    click.echo("")
    click.echo(
        f"over {window / 86400:g}d: sent {c['sent']}, delivered {c['delivered']}, "
        f"bounces {c['bounces']}, blocks {c['blocks']}, unsubscribes "
        f"{c['unsubscribes']}, clicks {c['clicks']}, complaints {c['complaints']} "
        f"({c['complaints_24h']} in 24h), spamtrap hits {c['spamtrap_hits']}"
    )
    if changes:
        click.echo("")
        click.echo("last changes:")
        for change in changes:
            click.echo(
                f"  {change.changed_at:%Y-%m-%d %H:%M:%S} {change.old_state.value} -> "
                f"{change.new_state.value} by {change.changed_by}: {change.reason}"
            )


@accounts.command("reinstate")
@click.argument("name")
@click.option("--reason", required=True, help="Why (kept in the audit trail).")
@click.option("--by", default=None, help="Who reinstates (default: the login name).")
@config_option
def accounts_reinstate(
    name: str, reason: str, by: str | None, config_path: str
) -> None:
    """Set the account back to ok; its rates count afresh from now on.

    A running relay applies it within seconds."""
    config = _load(config_path)
    _account_or_exit(config, name)
    if not reason.strip():
        _fail("--reason must say why")
    who = by or _login()
    standing = _with_store(
        config,
        lambda store: reinstate_in_store(
            store, name, reason.strip(), who, datetime.now(UTC)
        ),
    )
    click.echo(f"account {name} reinstated by {who}: {standing.reason}")


def _login() -> str:
    try:
        return f"operator {getpass.getuser()}"
    except (KeyError, OSError):
        return "operator"


@main.group()
def spamtraps() -> None:
    """Spamtrap addresses: mail to one is refused and counts as a spamtrap hit."""


@spamtraps.command("import")
@click.argument("file", metavar="FILE")
@click.option(
    "--source", default="import", show_default=True, help="Where the list came from."
)
@config_option
def spamtraps_import(file: str, source: str, config_path: str) -> None:
    """Import the addresses of FILE ("-" for stdin), all or nothing.

    One address per line, or a CSV whose first row names an "address" column;
    blank lines and lines starting with "#" are skipped. Every bad line is
    printed as FILE:LINE: message on stderr and nothing is written (exit 2).
    """
    config = _load(config_path)
    addresses: list[str] = []
    problems: list[str] = []
    column: int | None = None
    with _open_input(file) as lines:
        try:
            for number, line in enumerate(lines, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                fields = [f.strip().strip('"') for f in text.split(",")]
                if column is None and "address" in [f.lower() for f in fields]:
                    column = [f.lower() for f in fields].index("address")
                    continue
                value = (
                    fields[column]
                    if column is not None and column < len(fields)
                    else text
                )
                try:
                    addresses.append(canonical_address(value))
                except AddressError as exc:
                    problems.append(f"{file}:{number}: {value!r}: {exc.reason}")
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read {file}: {exc}")
    if problems:
        for problem in problems[:100]:
            click.echo(problem, err=True)
        _fail(f"{_plural(len(problems), 'bad line')}; nothing imported")
    unique = list(dict.fromkeys(addresses))

    async def run(store: SqliteStore) -> tuple[int, int]:
        added = await store.add_spamtraps(unique, source, datetime.now(UTC))
        return added, await store.count_spamtraps()

    added, total = _with_store(config, run)
    click.echo(
        f"imported {_plural(added, 'new spamtrap')} from {file} ({total} listed)"
    )


@main.group()
def feedback() -> None:
    """Feedback mail the relay kept because it could not read or attribute it."""


@feedback.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@config_option
def feedback_list(limit: int, as_json: bool, config_path: str) -> None:
    """List kept bounces, reports and unsubscribe mail, newest first, with why
    each was kept (relay feedback show ID prints one)."""
    config = _load(config_path)

    async def run(store: SqliteStore) -> tuple[list[KeptFeedback], int]:
        return await store.unattributed(limit), await store.unattributed_count()

    kept, total = _with_store(config, run)
    for item in kept:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "id": item.id,
                        "received_at": item.received_at.isoformat(),
                        "channel": item.kind,
                        "reason": item.reason,
                        "mail_from": item.mail_from,
                        "recipient": item.recipient,
                        "size_bytes": item.size_bytes,
                    }
                )
            )
        else:
            when = item.received_at.strftime("%Y-%m-%d %H:%M:%S")
            sender = item.mail_from or "<>"
            click.echo(
                f"{item.id}  {when}  {item.kind:<6}  from {sender} to "
                f"{item.recipient}  ({item.size_bytes} bytes): {item.reason}"
            )
    if not as_json:
        click.echo(f"{_plural(total, 'message')} kept", err=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@feedback.command("show")
@click.argument("feedback_id", metavar="ID", type=int)
@config_option
def feedback_show(feedback_id: int, config_path: str) -> None:
    """Print kept feedback mail ID as it was received (control characters
    escaped when writing to a terminal)."""
    config = _load(config_path)

    async def run(store: SqliteStore) -> bytes | None:
        return await store.unattributed_content(feedback_id)

    content = _with_store(config, run)
    if content is None:
        _fail(f"no kept feedback with id {feedback_id}", code=1)
    if sys.stdout.isatty():
        # Whoever sent it chose these bytes: no escape sequences to a terminal.
        text = content.decode("utf-8", "backslashreplace")
        click.echo(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text), nl=False)
    else:
        click.echo(content, nl=False)
