"""The ``relay`` command line (click). Parses arguments, calls services, maps errors
to exit codes: 0 ok, 1 refused or not found, 2 bad input or configuration."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO, TypeVar

import click

from config import ConfigError, RelayConfig, load_config
from policies.base import Outcome, Verdict
from policies.pipeline import Observer, Pipeline
from relay import __version__
from storage.base import (
    QueuedMessage,
    Suppression,
    SuppressionReason,
    SuppressionRemoval,
)
from storage.sqlite import SqliteStore

T = TypeVar("T")
R = TypeVar("R")

_CONFIG_HELP = "Path to relay.toml."
_DEFAULT_CONFIG = "relay.toml"


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    default=_DEFAULT_CONFIG,
    show_default=True,
    help=_CONFIG_HELP,
)


def _load(path: str) -> RelayConfig:
    try:
        config = load_config(path)
    except ConfigError as exc:
        click.echo(exc.report(), err=True)
        sys.exit(2)
    _pipeline(config, path, lambda _: None)
    return config


def _pipeline(config: RelayConfig, path: str, observer: Observer) -> Pipeline:
    """The offline pipeline of ``config`` (no store); exit 2 on a bad [policies]."""
    from policies.registry import PolicyConfigError, pipeline_for
    from relay.clock import SystemClock

    try:
        return pipeline_for(
            config,
            observer,
            clock=SystemClock(),
            base_dir=Path(path).resolve().parent,
        )
    except PolicyConfigError as exc:
        click.echo(f"{path}: {len(exc.problems)} error(s)", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    from storage.errors import StorageError

    try:
        return asyncio.run(factory())  # type: ignore[arg-type]
    except StorageError as exc:
        click.echo(f"error: store unavailable: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # e.g. a listen address already in use
        click.echo(f"error: {exc.strerror or exc}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """A compliance-enforcing SMTP relay (smarthost) for marketing mail."""


@main.command()
@config_option
def serve(config_path: str) -> None:
    """Run the SMTP listener, the HTTP listener and the delivery workers.

    Stops gracefully on SIGTERM or SIGINT: new transactions get 421 4.3.2,
    in-flight ones and delivery attempts finish within [server] shutdown_grace,
    everything else stays queued for the next start.
    """
    config = _load(config_path)
    from relay.app import serve as run_relay
    from relay.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    base_dir = Path(config_path).resolve().parent
    if not _run(lambda: run_relay(config, base_dir, Path(config_path))):
        sys.exit(1)


@main.command("reload")
@config_option
def reload_config(config_path: str) -> None:
    """Make the running relay re-read relay.toml (the same as kill -HUP).

    The file is checked here first: an unusable one is reported (exit 2) and the
    relay is not disturbed. Thresholds, policies and accounts change without
    dropping connections or queued mail; the relay logs config_reloaded, or
    reload_refused with the errors. Exit 1 when no relay is running for this
    file's storage.
    """
    import signal

    from relay.app import pid_file

    config = _load(config_path)
    _pipeline(config, config_path, lambda _: None)
    where = pid_file(config)
    try:
        pid = int(where.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        _fail(f"no running relay found (no live process in {where})", 1)
    click.echo(f"{config_path}: ok; relay (pid {pid}) asked to reload")


@main.command("check-config")
@config_option
def check_config(config_path: str) -> None:
    """Validate relay.toml: exit 0 if usable, else print every error and exit 2."""
    config = _load(config_path)
    click.echo(
        f"{config_path}: ok ({len(config.accounts)} account(s), "
        f"upstream {config.upstream.url.split('@')[-1]})"
    )


@main.command("hash-password")
def hash_password() -> None:
    """Read a password on stdin; print its hash for accounts.<name>.password_hash."""
    from relay.auth import hash_password as make_hash

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        click.echo("error: empty password", err=True)
        sys.exit(2)
    click.echo(make_hash(password))


@main.group()
def queue() -> None:
    """Inspect and steer the delivery queue (works while the relay runs)."""


def _with_store(
    config: RelayConfig, action: Callable[[SqliteStore], Awaitable[R]]
) -> R:
    """Open the configured store, run ``action`` on it, close it."""
    from relay.logs import configure_logging

    # Only problems are worth a line here, on stderr: stdout is the command's.
    configure_logging("warning", "console", stream=sys.stderr)

    async def run() -> R:
        store = _store(config)
        await store.open()
        try:
            return await action(store)
        finally:
            await store.close()

    return _run(run)


def _store(config: RelayConfig) -> SqliteStore:
    return SqliteStore(
        config.storage.sqlite_path, timeout_seconds=config.storage.timeout_seconds
    )


@queue.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", default=1000, show_default=True, help="At most this many.")
def queue_list(config_path: str, as_json: bool, limit: int) -> None:
    """List queued messages, oldest first."""
    config = _load(config_path)

    messages: list[QueuedMessage] = _with_store(
        config, lambda store: store.list_messages(limit)
    )
    now = datetime.now(UTC)
    if as_json:
        for m in messages:
            click.echo(
                json.dumps(
                    {
                        "queue_id": m.queue_id,
                        "account": m.account,
                        "mail_from": m.mail_from,
                        "recipients": list(m.recipients),
                        "received_at": m.received_at.isoformat(),
                        "next_attempt_at": m.next_attempt_at.isoformat(),
                        "attempts": m.attempts,
                        "size_bytes": m.size_bytes,
                        "last_error": m.last_error,
                    }
                )
            )
        return
    if not messages:
        click.echo("queue is empty")
        return
    click.echo(
        f"{'QUEUE ID':<18} {'ACCOUNT':<12} {'AGE':>8} {'TRIES':>5} {'NEXT':>8}  RCPTS"
    )
    for m in messages:
        age = _age((now - m.received_at).total_seconds())
        nxt = _age(max(0.0, (m.next_attempt_at - now).total_seconds()))
        click.echo(
            f"{m.queue_id:<18} {(m.account or '(relay)'):<12} {age:>8} "
            f"{m.attempts:>5} {nxt:>8}  {len(m.recipients)}"
        )
        if m.last_error:
            click.echo(f"{'':<18} last error: {m.last_error}")
    click.echo(f"{len(messages)} message(s)")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@queue.command("retry")
@click.argument("queue_id")
@config_option
def queue_retry(queue_id: str, config_path: str) -> None:
    """Make QUEUE_ID due now (a running relay picks it up within a second)."""
    config = _load(config_path)

    if not _with_store(
        config, lambda store: store.retry_now(queue_id, datetime.now(UTC))
    ):
        click.echo(f"error: no queued message {queue_id}", err=True)
        sys.exit(1)
    click.echo(f"{queue_id}: scheduled for immediate delivery")


@queue.command("delete")
@click.argument("queue_id")
@config_option
def queue_delete(queue_id: str, config_path: str) -> None:
    """Remove QUEUE_ID from the queue undelivered (no DSN; an attempt already
    under way still completes)."""
    config = _load(config_path)

    if not _with_store(config, lambda store: store.delete(queue_id)):
        click.echo(f"error: no queued message {queue_id}", err=True)
        sys.exit(1)
    click.echo(f"{queue_id}: deleted")


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _address_or_exit(address: str) -> str:
    from storage.addresses import AddressError, canonical_address

    try:
        return canonical_address(address.strip())
    except AddressError as exc:
        _fail(f"invalid address {address!r}: {exc.reason}")


def _account_or_exit(config: RelayConfig, account: str) -> None:
    if account not in config.accounts:
        known = ", ".join(sorted(config.accounts)) or "none"
        _fail(f"unknown account {account!r} (accounts in relay.toml: {known})")


def _plural(count: int, word: str) -> str:
    if count == 1:
        return f"1 {word}"
    return f"{count} {word[:-1]}ies" if word.endswith("y") else f"{count} {word}s"


# -- relay check ------------------------------------------------------------------

_CHECK_CORE = "core"
"""The policy name ``relay check`` gives the relay's own structural checks."""


@main.command()
@click.argument("file", metavar="FILE.eml")
@click.option(
    "--account",
    required=True,
    help="The sending account, as if its mailer had logged in with AUTH.",
)
@config_option
@click.option(
    "--mail-from",
    default=None,
    metavar="ADDR",
    help="Envelope sender (MAIL FROM).  [default: the From header's address]",
)
@click.option(
    "--rcpt",
    "recipients",
    multiple=True,
    metavar="ADDR",
    help="Envelope recipient; repeat for several.  [default: To and Cc addresses]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check(
    file: str,
    account: str,
    config_path: str,
    mail_from: str | None,
    recipients: tuple[str, ...],
    as_json: bool,
) -> None:
    """Run the DATA-stage policy checks offline on FILE.eml.

    Classifies the message (marketing or transactional) as the relay would, then
    runs every check of [policies] that looks at the message, in order, and prints
    each verdict (policy, outcome, mode, reason, detail) and the SMTP reply the
    relay would give. Every check runs, even after a refusal; the first enforcing
    refusal decides, as in the relay. Nothing is sent and no store is opened:
    checks that need the exclusion list or the consent ledger pass. Bare LF line
    endings in the file are read as CRLF.

    Exit 0 if the relay would accept the message (monitor-mode refusals do not
    count), 1 if it would refuse or defer it, 2 on bad input (unreadable or empty
    file, unknown account, invalid relay.toml or address).
    """
    config = _load(config_path)
    _account_or_exit(config, account)
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}")
    if not raw.strip():
        _fail(f"{file} is empty")
    # Files on disk usually end lines with LF alone; SMTP DATA has CRLF.
    content = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    report = _check_message(
        config, config_path, account, content, mail_from, recipients
    )
    report["file"] = file
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_check(report)
    sys.exit(0 if report["decision"]["accepted"] else 1)


def _check_message(
    config: RelayConfig,
    config_path: str,
    account: str,
    content: bytes,
    mail_from: str | None,
    recipients: tuple[str, ...],
) -> dict[str, Any]:
    """Classify and run the DATA stage on ``content``; the report as a dict."""
    from policies.base import MessageKind, PolicyContext, Stage, Verdict, refuse
    from policies.classify import CategoryError, Classification, classify
    from policies.pipeline import Observation, StageResult
    from relay import replies
    from relay.message import MessageView
    from relay.smtp_handler import check_data

    refusal, refused_for, _ = check_data(content, config.server.max_message_size_bytes)
    view = MessageView.parse(content)
    sender = (
        _envelope_address(mail_from)
        if mail_from is not None
        else _header_addresses(view.header("From"))[:1]
    )
    rcpts = (
        [_address_or_exit(r) for r in recipients]
        if recipients
        else _header_addresses(view.header("To"), view.header("Cc"))
    )
    observations: list[Observation] = []
    pipeline = _pipeline(config, config_path, observations.append)
    default = config.accounts[account].default_category
    classified: Classification | None = None
    core: Verdict | None = None
    core_reply: replies.SmtpReply | None = refusal
    if refusal is not None:
        # What the SMTP listener itself refuses (NUL, bare CR, long lines, ...).
        core = refuse(refused_for, refusal.text)
    else:
        try:
            classified = classify(
                view.header, MessageKind(default) if default else None
            )
        except CategoryError as exc:
            core = refuse("bad_category", str(exc))
            core_reply = replies.malformed_message(str(exc))
    verdicts: list[dict[str, Any]] = [
        _verdict_json(_CHECK_CORE, core or Verdict(Outcome.PASS), "enforce")
    ]
    result: StageResult | None = None
    if classified is not None:
        ctx = PolicyContext(
            stage=Stage.DATA,
            account=account,
            mail_from=sender[0] if sender else "",
            received_at=datetime.now(UTC),
            recipients=tuple(rcpts),
            message=view,
            kind=classified.kind,
        )
        result = asyncio.run(pipeline.run(ctx, run_all=True))
        for seen in observations:
            entry = _verdict_json(seen.policy, seen.verdict, seen.mode.value)
            if seen.error is not None:
                entry["error"] = f"{type(seen.error).__name__}: {seen.error}"
            verdicts.append(entry)
    decision: dict[str, Any]
    if core is not None and core_reply is not None:
        decision = _decision(False, core, _CHECK_CORE, core_reply.render())
    elif result is not None and not result.passed:
        policy = result.policy or "-"
        reply = replies.policy_refusal(policy, result.verdict)
        decision = _decision(False, result.verdict, policy, reply.render())
    else:
        decision = _decision(True, None, None, replies.queued("<queue-id>").render())
    if result is not None and result.dropped:
        decision["refused_recipients"] = {
            rcpt: replies.policy_refusal(policy, verdict).render()
            for rcpt, (policy, verdict) in result.dropped.items()
        }
    return {
        "account": account,
        "mail_from": sender[0] if sender else "",
        "recipients": rcpts,
        "size_bytes": len(content),
        "classification": None
        if classified is None
        else {"kind": classified.kind.value, "reason": classified.reason},
        "order": list(pipeline.order),
        "verdicts": verdicts,
        "decision": decision,
    }


def _envelope_address(value: str) -> list[str]:
    value = value.strip().strip("<>")
    return [_address_or_exit(value)] if value else []


def _header_addresses(*values: str | None) -> list[str]:
    """The valid addresses of address headers, canonical, in order."""
    from email.utils import getaddresses

    from storage.addresses import AddressError, canonical_address

    found: list[str] = []
    for _, address in getaddresses([v for v in values if v is not None]):
        try:
            canonical = canonical_address(address)
        except AddressError:
            continue
        if canonical not in found:
            found.append(canonical)
    return found


def _verdict_json(policy: str, verdict: Verdict, mode: str) -> dict[str, Any]:
    return {
        "policy": policy,
        "outcome": verdict.outcome.value,
        "mode": mode,
        "reason": verdict.reason,
        "detail": verdict.detail,
        "figures": dict(verdict.figures),
        "recipients": list(verdict.recipients),
    }


def _decision(
    accepted: bool, verdict: Verdict | None, policy: str | None, reply: str
) -> dict[str, Any]:
    return {
        "accepted": accepted,
        "outcome": "accept" if verdict is None else verdict.outcome.value,
        "policy": policy,
        "reason": verdict.reason if verdict is not None else "",
        "reply": reply,
    }


def _print_check(report: dict[str, Any]) -> None:
    rcpts = ", ".join(report["recipients"]) or "(none)"
    kind = report["classification"]
    click.echo(f"message:  {report['file']} ({report['size_bytes']} bytes)")
    click.echo(f"account:  {report['account']}")
    click.echo(f"envelope: from <{report['mail_from']}> to {rcpts}")
    click.echo(
        f"kind:     {kind['kind']} ({kind['reason']})"
        if kind
        else "kind:     (not classified)"
    )
    click.echo(f"checks:   {', '.join(report['order']) or '(none configured)'}")
    click.echo("")
    click.echo(f"  {'POLICY':<20} {'OUTCOME':<8} {'MODE':<8} REASON")
    for verdict in report["verdicts"]:
        click.echo(
            f"  {verdict['policy']:<20} {verdict['outcome']:<8} "
            f"{verdict['mode']:<8} {verdict['reason'] or '-'}"
        )
        for extra in (verdict["detail"], verdict.get("error")):
            if extra:
                click.echo(f"  {'':<20} {extra}")
        if verdict["recipients"]:
            click.echo(f"  {'':<20} recipients: {', '.join(verdict['recipients'])}")
    decision = report["decision"]
    click.echo("")
    if decision["accepted"]:
        click.echo("decision: accepted")
    else:
        done = "deferred" if decision["outcome"] == "defer" else "refused"
        click.echo(f"decision: {done} by {decision['policy']} ({decision['reason']})")
    click.echo(f"reply:    {decision['reply']}")
    for rcpt, reply in decision.get("refused_recipients", {}).items():
        click.echo(f"          {rcpt}: {reply}")


# -- relay suppress -----------------------------------------------------------------

_REASONS = click.Choice([reason.value for reason in SuppressionReason])
_PAGE = 5000
"""Entries per keyset page when listing or exporting."""


def _scope(account: str | None) -> str:
    return f"account {account}" if account else "every account"


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment is not None else "-"


@main.group()
def suppress() -> None:
    """The exclusion list: addresses that get no mail (works while the relay runs).

    An entry is global (every account) or belongs to one account, and has a
    reason: unsubscribe and complaint entries never expire; hard_bounce,
    complaint and spamtrap entries refuse transactional mail too, the others
    refuse marketing mail only.
    """


@suppress.command("add")
@click.argument("addresses", nargs=-1, required=True, metavar="ADDRESS...")
@click.option("--reason", required=True, type=_REASONS, help="Why they are excluded.")
@click.option(
    "--account",
    default=None,
    help="Exclude them for this account only.  [default: every account]",
)
@click.option("--note", default="", help="Free text kept with each entry.")
@click.option(
    "--expires",
    default=None,
    metavar="DURATION",
    help="Lift the entries after this long, e.g. 90d (not for unsubscribe or "
    "complaint, which never expire).",
)
@click.option(
    "--source", default="cli", show_default=True, help="Where the entries came from."
)
@config_option
def suppress_add(
    addresses: tuple[str, ...],
    reason: str,
    account: str | None,
    note: str,
    expires: str | None,
    source: str,
    config_path: str,
) -> None:
    """Add ADDRESS... to the exclusion list (an existing entry with the same
    address, account and reason is replaced). Nothing is written if any address
    is invalid (exit 2)."""
    from config import parse_duration
    from storage.base import NEVER_EXPIRES, Suppression

    config = _load(config_path)
    if account is not None:
        _account_or_exit(config, account)
    why = SuppressionReason(reason)
    now = datetime.now(UTC)
    expires_at: datetime | None = None
    if expires is not None:
        if why in NEVER_EXPIRES:
            _fail(f"{why.value} entries never expire: drop --expires")
        try:
            seconds = parse_duration(expires)
        except ValueError as exc:
            _fail(f"--expires: {exc}")
        if seconds <= 0:
            _fail("--expires must be above zero")
        expires_at = now + timedelta(seconds=seconds)
    canonical = [_address_or_exit(address) for address in addresses]
    entries = [
        Suppression(
            address=address,
            account=account,
            reason=why,
            source=source,
            created_at=now,
            note=note,
            expires_at=expires_at,
        )
        for address in dict.fromkeys(canonical)
    ]
    added = _with_store(config, lambda store: store.add_suppressions(entries))
    until = f", until {_when(expires_at)}" if expires_at else ""
    for entry in entries:
        click.echo(f"added {entry.address} ({why.value}, {_scope(account)}{until})")
    click.echo(f"{_plural(added, 'entry')} added")


@suppress.command("remove")
@click.argument("address")
@click.option(
    "--account",
    default=None,
    help="Remove this account's entries.  [default: the global entries]",
)
@click.option(
    "--reason",
    type=_REASONS,
    default=None,
    help="Remove only the entry with this reason.  [default: every reason]",
)
@click.option("--why", required=True, help="Why the entry is lifted (audited).")
@click.option(
    "--by",
    default=None,
    help="Who lifts it (audited).  [default: $USER, else 'cli']",
)
@config_option
def suppress_remove(
    address: str,
    account: str | None,
    reason: str | None,
    why: str,
    by: str | None,
    config_path: str,
) -> None:
    """Remove ADDRESS from the exclusion list, with an audit record (who, when,
    why) per entry removed. Exit 1 if no entry matched."""
    config = _load(config_path)
    canonical = _address_or_exit(address)
    if not why.strip():
        _fail("--why must say why the entry is lifted")
    who = by or os.environ.get("USER") or "cli"
    removed = _with_store(
        config,
        lambda store: store.remove_suppressions(
            canonical,
            account,
            reason=SuppressionReason(reason) if reason else None,
            removed_by=who,
            why=why.strip(),
            now=datetime.now(UTC),
        ),
    )
    if not removed:
        what = f"{reason} entry" if reason else "entry"
        scope = f"account {account}" if account else "the global list"
        _fail(f"no {what} for {canonical} in {scope}", 1)
    for entry in removed:
        click.echo(
            f"removed {entry.address} ({entry.reason.value}, {_scope(entry.account)})"
        )


async def _first_entries(
    store: SqliteStore,
    account: str | None,
    reason: SuppressionReason | None,
    limit: int,
) -> tuple[list[Suppression], bool]:
    """Up to ``limit`` entries in key order, and whether more exist."""
    from relay.admin_api import suppression_key

    found: list[Suppression] = []
    after: tuple[str, str, str] | None = None
    while len(found) <= limit:
        want = min(_PAGE, limit + 1 - len(found))
        page = await store.list_suppressions(
            account=account, reason=reason, after=after, limit=want
        )
        found.extend(page)
        if len(page) < want:
            break
        after = suppression_key(page[-1])
    return found[:limit], len(found) > limit


@suppress.command("list")
@click.option("--account", default=None, help="Only this account's own entries.")
@click.option("--reason", type=_REASONS, default=None, help="Only this reason.")
@click.option("--limit", default=1000, show_default=True, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@config_option
def suppress_list(
    account: str | None,
    reason: str | None,
    limit: int,
    as_json: bool,
    config_path: str,
) -> None:
    """List exclusion-list entries in address order (expired ones included)."""
    from relay.admin_api import suppression_json

    config = _load(config_path)
    if limit < 1:
        _fail("--limit must be at least 1")
    why = SuppressionReason(reason) if reason else None
    entries, more = _with_store(
        config, lambda store: _first_entries(store, account, why, limit)
    )
    if as_json:
        for entry in entries:
            click.echo(json.dumps(suppression_json(entry)))
        return
    if not entries:
        click.echo("no entries")
        return
    now = datetime.now(UTC)
    click.echo(
        f"{'ADDRESS':<32} {'ACCOUNT':<12} {'REASON':<12} {'SOURCE':<8} "
        f"{'CREATED':<20} {'EXPIRES':<20} NOTE"
    )
    for e in entries:
        expires = _when(e.expires_at) if e.active(now) else "expired"
        click.echo(
            f"{e.address:<32} {(e.account or '*'):<12} {e.reason.value:<12} "
            f"{e.source:<8} {_when(e.created_at):<20} {expires:<20} {e.note}"
        )
    shown = _plural(len(entries), "entry")
    click.echo(f"{shown} (more: raise --limit or use export)" if more else shown)


@suppress.command("show")
@click.argument("address")
@click.option(
    "--account",
    default=None,
    help="Only the entries that apply to this account's mail (its own and the "
    "global ones).  [default: every account's]",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
def suppress_show(
    address: str, account: str | None, as_json: bool, config_path: str
) -> None:
    """Show the active entries for ADDRESS and the audit of its removals.

    Exit 0 if an active entry applies, 1 if none does."""
    from relay.admin_api import removal_json, suppression_json, suppressions_of

    config = _load(config_path)
    canonical = _address_or_exit(address)

    async def lookup(
        store: SqliteStore,
    ) -> tuple[list[Suppression], list[SuppressionRemoval]]:
        now = datetime.now(UTC)
        if account is None:
            entries = await suppressions_of(store, canonical, now)
        else:
            entries = await store.suppressions_for(canonical, account, now)
        return entries, await store.suppression_removals(canonical)

    entries, removals = _with_store(config, lookup)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "address": canonical,
                    "entries": [suppression_json(e) for e in entries],
                    "removals": [removal_json(r) for r in removals],
                },
                indent=2,
            )
        )
    else:
        if not entries:
            click.echo(f"{canonical}: no active entry ({_scope(account)})")
        for e in entries:
            click.echo(
                f"{canonical}: {e.reason.value} for {_scope(e.account)}, since "
                f"{_when(e.created_at)} (source {e.source}"
                + (f", until {_when(e.expires_at)}" if e.expires_at else "")
                + (f", note: {e.note}" if e.note else "")
                + ")"
            )
        for r in removals:
            click.echo(
                f"removed: {r.reason.value} for {_scope(r.account)}, at "
                f"{_when(r.removed_at)} by {r.removed_by}: {r.why}"
            )
    if not entries:
        sys.exit(1)


def _report_problems(file: str, problems: Sequence[Any], what: str) -> NoReturn:
    for problem in problems:
        click.echo(f"{file}:{problem.line}: {problem.message}", err=True)
    _fail(f"{_plural(len(problems), 'problem')} in {file}; no {what} imported")


def _open_input(file: str) -> TextIO:
    """``file`` (``-`` for stdin) as text; exit 2 when it cannot be opened."""
    if file == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
    try:
        return Path(file).open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}")


@suppress.command("import")
@click.argument("file", metavar="FILE.csv")
@click.option(
    "--source", default="import", show_default=True, help="Where the entries came from."
)
@config_option
def suppress_import(file: str, source: str, config_path: str) -> None:
    """Import the entries of FILE.csv ("-" for stdin), all or nothing.

    The format is the one "relay suppress export" writes: a header row naming
    some of address, account, reason, source, created_at, note, expires_at
    (address and reason are required; an empty account means every account, an
    empty source the --source option). Every problem is printed as
    FILE:LINE: message on stderr and nothing is written (exit 2).
    """
    from storage.imports import ImportProblems, parse_suppressions_csv

    config = _load(config_path)
    with _open_input(file) as lines:
        try:
            entries = parse_suppressions_csv(
                lines, source=source, now=datetime.now(UTC)
            )
        except ImportProblems as exc:
            _report_problems(file, exc.problems, "entries")
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read {file}: {exc}")
    unknown = sorted({e.account for e in entries if e.account} - set(config.accounts))
    if unknown:
        # Entries of an account relay.toml does not have match no mail (yet).
        click.echo(
            f"warning: {file} names account(s) not in relay.toml: {', '.join(unknown)}",
            err=True,
        )
    added = _with_store(config, lambda store: store.add_suppressions(entries))
    click.echo(f"imported {_plural(added, 'entry')} from {file}")


@suppress.command("export")
@click.argument("file", default="-", metavar="[FILE.csv]")
@click.option("--account", default=None, help="Only this account's own entries.")
@click.option("--reason", type=_REASONS, default=None, help="Only this reason.")
@config_option
def suppress_export(
    file: str, account: str | None, reason: str | None, config_path: str
) -> None:
    """Write the exclusion list as CSV to FILE.csv (default "-": stdout).

    Entries are read in pages, so any size of list streams out; the output is
    what "relay suppress import" reads back.
    """
    from relay.admin_api import suppression_key
    from storage.imports import write_suppressions_csv

    config = _load(config_path)
    why = SuppressionReason(reason) if reason else None

    async def export(store: SqliteStore, out: TextIO) -> int:
        # The writer runs in a thread and pulls one keyset page at a time from
        # the store on this loop: a million entries never sit in memory at once.
        loop = asyncio.get_running_loop()

        def entries() -> Iterator[Suppression]:
            after: tuple[str, str, str] | None = None
            while True:
                page = asyncio.run_coroutine_threadsafe(
                    store.list_suppressions(
                        account=account, reason=why, after=after, limit=_PAGE
                    ),
                    loop,
                ).result()
                yield from page
                if len(page) < _PAGE:
                    return
                after = suppression_key(page[-1])

        return await asyncio.to_thread(write_suppressions_csv, entries(), out)

    if file == "-":
        count = _with_store(config, lambda store: export(store, sys.stdout))
        sys.stdout.flush()
        click.echo(f"exported {_plural(count, 'entry')}", err=True)
        return
    target = Path(file)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as out:
            count = _with_store(config, lambda store: export(store, out))
        partial.replace(target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        _fail(f"cannot write {file}: {exc.strerror or exc}")
    click.echo(f"exported {_plural(count, 'entry')} to {file}")


# -- relay consent --------------------------------------------------------------------


@main.group()
def consent() -> None:
    """The consent ledger: the proof of opt-in each account holds per address."""


@consent.command("import")
@click.argument("file")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="The file's format.  [default: jsonl for .jsonl and .ndjson, else csv]",
)
@config_option
def consent_import(file: str, fmt: str | None, config_path: str) -> None:
    """Import the consent records of FILE ("-" for stdin), all or nothing.

    CSV has a header row; JSON lines hold one object per line. The fields are
    account, address, collected_at, source (newsletter, purchase, sweepstakes,
    event, other), opt_in (single, confirmed, double) - all required - and
    collection_url, ip, confirmed_at (required for confirmed and double
    opt-in), statement, relationship. Times are ISO 8601 (naive ones are UTC).
    A record for an account and address replaces the one held before. Every
    problem is printed as FILE:LINE: message on stderr and nothing is written
    (exit 2).
    """
    from storage.imports import ImportProblems, detect_format, parse_consents

    config = _load(config_path)
    kind: Literal["csv", "jsonl"] = detect_format(file)
    if fmt is not None:
        kind = "jsonl" if fmt == "jsonl" else "csv"
    with _open_input(file) as lines:
        try:
            records = parse_consents(lines, fmt=kind)
        except ImportProblems as exc:
            _report_problems(file, exc.problems, "records")
        except (OSError, UnicodeDecodeError) as exc:
            _fail(f"cannot read {file}: {exc}")
    unknown = sorted({r.account for r in records} - set(config.accounts))
    if unknown:
        click.echo(
            f"warning: records for accounts not in {config_path}: {', '.join(unknown)}",
            err=True,
        )
    added = _with_store(config, lambda store: store.add_consents(records))
    click.echo(f"imported {_plural(added, 'record')} from {file}")


_PROOF_FIELDS = (
    ("account", "account"),
    ("address", "address"),
    ("collected_at", "collected at"),
    ("source", "source"),
    ("collection_url", "collection URL"),
    ("ip", "IP address"),
    ("opt_in", "opt-in type"),
    ("confirmed_at", "confirmed at"),
    ("statement", "statement"),
    ("relationship", "relationship"),
    ("recorded_at", "recorded at"),
)


@consent.command("show")
@click.argument("address")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@config_option
def consent_show(address: str, as_json: bool, config_path: str) -> None:
    """Print the proof of consent for ADDRESS held by every account that has one:
    when, where (URL, IP) and how (opt-in type, confirmation) it was collected,
    the statement agreed to, any customer relationship, and when it was recorded.
    Exit 1 if no account holds a record."""
    from relay.admin_api import consent_json

    config = _load(config_path)
    canonical = _address_or_exit(address)
    records = _with_store(config, lambda store: store.consents_of(canonical))
    if not records:
        _fail(f"no account holds a consent record for {canonical}", 1)
    if as_json:
        body = {"address": canonical, "records": [consent_json(r) for r in records]}
        click.echo(json.dumps(body, indent=2))
        return
    for index, record in enumerate(records):
        if index:
            click.echo("")
        shown = consent_json(record)
        for key, label in _PROOF_FIELDS:
            click.echo(f"{label + ':':<16} {shown[key] or '-'}")


# Registers "relay accounts" and "relay spamtraps" on ``main`` (kept apart: they
# need everything above).
from relay import cli_reputation  # noqa: E402, F401
