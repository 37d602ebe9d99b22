"""The ``relay`` command line (click). Parses arguments, calls services, maps errors
to exit codes: 0 ok, 1 refused or not found, 2 bad input or configuration."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from datetime import UTC, datetime
from typing import TypeVar

import click

from config import ConfigError, RelayConfig, load_config
from relay import __version__
from storage.base import QueuedMessage
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
    from policies.registry import PolicyConfigError, pipeline_for
    from relay.clock import SystemClock

    try:
        config = load_config(path)
    except ConfigError as exc:
        click.echo(exc.report(), err=True)
        sys.exit(2)
    try:
        pipeline_for(
            config,
            lambda _: None,
            clock=SystemClock(),
            base_dir=Path(path).resolve().parent,
        )
    except PolicyConfigError as exc:
        click.echo(f"{path}: {len(exc.problems)} error(s)", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)
    return config


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
    if not _run(lambda: run_relay(config, base_dir)):
        sys.exit(1)


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
