"""Builds every part of the relay, starts them in order and drains them on SIGTERM.

Start: store → policy workers → queue → delivery workers → SMTP and HTTP
listeners → ready.
Stop (SIGTERM or SIGINT): not ready; stop accepting connections; ``421 4.3.2`` to new
transactions; in-flight transactions and delivery attempts get
``[server] shutdown_grace`` to finish; the rest stays queued; the store closes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import structlog

from config import ConfigError, load_config
from config.models import RelayConfig, split_listen
from policies.base import MessageKind, Stage
from policies.content_categories import ContentCategories
from policies.pipeline import Pipeline
from policies.registry import PolicyConfigError, pipeline_for
from relay import __version__, replies
from relay.accounts import Accounts
from relay.admin_reputation import add_reputation_routes
from relay.auth import Authenticator
from relay.clock import Clock, SystemClock
from relay.delivery import Delivery, DeliverySettings
from relay.feedback import Feedback
from relay.feedback_mail import FeedbackMail
from relay.http import HttpListener
from relay.list_unsubscribe import ListUnsubscribe, list_unsubscribe_for
from relay.metrics import Metrics
from relay.policy_workers import PolicyWorkers, WorkerSetup
from relay.queue import Queue
from relay.smtp_handler import HandlerSettings, RelayHandler
from relay.smtp_server import SmtpListener
from relay.tokens import TokenSigner
from relay.unsubscribe_http import add_unsubscribe_routes
from storage.sqlite import SqliteStore

log = structlog.get_logger(__name__)


class Relay:
    """One running relay: store, queue, workers and listeners."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        clock: Clock | None = None,
        base_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.metrics = Metrics(__version__)
        self.store = SqliteStore(
            config.storage.sqlite_path,
            timeout_seconds=config.storage.timeout_seconds,
            min_free_space_bytes=config.storage.min_free_space_bytes,
        )
        workers = config.upstream.pool_size
        self.queue = Queue(
            self.store,
            config.queue,
            self.clock,
            self.metrics,
            capacity=max(8, workers * 4),
        )
        self.delivery = Delivery(
            self.queue,
            self.store,
            DeliverySettings(config.server.hostname, config.upstream, config.queue),
            self.clock,
            self.metrics,
        )
        server = config.server
        self.authenticator = Authenticator(
            config.accounts,
            clock=self.clock,
            max_failures=server.auth_max_failures,
            failure_window_seconds=server.auth_failure_window_seconds,
            lockout_seconds=server.auth_lockout_seconds,
        )
        self.handler = RelayHandler(
            _handler_settings(config),
            self.authenticator,
            self.queue,
            self.metrics,
            self.clock,
            free_space_ok=self.store.free_space_ok,
            events=self.store,
        )
        self.accounts = Accounts(config, self.store, self.clock, self.metrics)
        self.handler.accounts = self.accounts
        secret = config.feedback.secret
        self.feedback = Feedback(
            self.store,
            self.accounts,
            self.clock,
            TokenSigner(secret.get_secret_value()) if secret is not None else None,
        )
        self.queue.on_recorded = self.feedback.attempts_recorded
        self.feedback_mail = FeedbackMail(
            config.feedback,
            self.feedback,
            self.store,
            lambda: self.config.accounts,
            self.clock,
            self.metrics,
            ledger_in_use=lambda: self.handler.pipeline.policy("consent") is not None,
        )
        self.handler.feedback_mail = self.feedback_mail
        self.delivery.tracker = self.feedback_mail.tracker
        self.base_dir = base_dir
        checks = self._checks(config)
        self.handler.pipeline, self.handler.list_unsubscribe = checks
        self.policy_workers = self._policy_workers(config, checks[0])
        if self.policy_workers is not None:
            self.handler.data_checks = self.policy_workers.run
        self._reloading = asyncio.Lock()
        smtp_host, smtp_port = split_listen(server.listen)
        self.smtp = SmtpListener(server, self.handler, smtp_host, smtp_port)
        http_host, http_port = split_listen(config.http.listen)
        self.http = HttpListener(
            http_host,
            http_port,
            self.metrics,
            is_ready=lambda: self.ready,
            refresh=self.refresh_metrics,
            store=self.store,
            admin_token=config.http.admin_token,
            clock=self.clock,
            accounts=frozenset(config.accounts),
        )
        add_unsubscribe_routes(self.http.app, self.feedback, self.metrics)
        add_reputation_routes(
            self.http.app,
            self.feedback,
            self.accounts,
            frozenset(config.accounts),
            self.clock,
            self.metrics,
        )
        self.ready = False
        self.running = False
        self.failed = False
        self.stop_requested = asyncio.Event()
        """Set by SIGTERM/SIGINT, or when a background task died."""
        self._tasks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store, start the workers and both listeners; then be ready."""
        await self.store.open()
        self.running = True  # from here on, shutdown() has something to undo
        await self.accounts.start()
        if self.policy_workers is not None:
            await self.policy_workers.start()
        self._tasks = asyncio.create_task(self._run_tasks(), name="relay-tasks")
        self._tasks.add_done_callback(self._tasks_ended)
        await self.http.start()
        await self.smtp.start()
        self.ready = not self.failed
        # What start-up built (config, term lists, the Public Suffix List) lives as
        # long as the process: keep the collector from walking it again and again.
        gc.freeze()
        stats = await self.store.stats()
        log.info(
            "relay_started",
            version=__version__,
            smtp_port=self.smtp.port,
            http_port=self.http.port,
            queued=stats.messages,
            upstream=self.config.upstream.url.split("@")[-1],
        )

    async def _run_tasks(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.queue.run_poller(), name="queue-poller")
            group.create_task(self.queue.run_recorder(), name="queue-recorder")
            group.create_task(self.accounts.run(), name="accounts")
            for number in range(self.config.upstream.pool_size):
                group.create_task(
                    self.delivery.run_worker(number), name=f"worker-{number}"
                )

    def _tasks_ended(self, task: asyncio.Task[None]) -> None:
        """The poller, recorder and workers never end while running: if they do,
        nothing would be delivered while SMTP still says 250, so stop instead."""
        if task.cancelled() or not self.running:
            return
        error = task.exception()
        log.critical("relay_tasks_failed", exc_info=error)
        self.failed = True
        self.ready = False
        self.stop_requested.set()

    async def shutdown(self) -> None:
        """Drain: finish what is in flight within the grace period; keep the rest."""
        if not self.running:
            return
        self.running = False
        grace = self.config.server.shutdown_grace_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.ready = False
        self.handler.draining = True
        self.smtp.stop_accepting()
        log.info("relay_draining", grace_seconds=grace)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self.handler.wait_idle()
        for connection in list(self.handler.connections):
            transport = connection.transport
            if (
                isinstance(transport, asyncio.WriteTransport)
                and not transport.is_closing()
            ):
                transport.write(f"{replies.SHUTTING_DOWN.render()}\r\n".encode())
                transport.close()
        self.queue.stop_accepting_work()
        self.delivery.stop()
        if self._tasks is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(max(deadline, loop.time() + 0.1)):
                    await self.delivery.wait_idle()
            self._tasks.cancel()
            # A failure of these tasks was logged by _tasks_ended already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tasks
            self._tasks = None
        await self.queue.drain_results()
        await self.feedback.stop()
        await self.accounts.stop()
        await self.http.stop()
        if self.policy_workers is not None:
            await self.policy_workers.close()
        await self.store.close()
        log.info("relay_stopped")

    def _checks(self, config: RelayConfig) -> tuple[Pipeline, ListUnsubscribe | None]:
        """The pipeline and List-Unsubscribe stamper ``config`` describes; raises
        PolicyConfigError."""
        pipeline = pipeline_for(
            config,
            self.handler.observe,
            clock=self.clock,
            suppressions=self.store,
            consents=self.store,
            base_dir=self.base_dir,
            passed=self.handler.observe_pass,
        )
        content = pipeline.policy("content_categories")
        if isinstance(content, ContentCategories):
            content.on_warning = self.handler.spam_subject_warning
        return pipeline, list_unsubscribe_for(config, pipeline)

    def _policy_workers(
        self, config: RelayConfig, pipeline: Pipeline
    ) -> PolicyWorkers | None:
        workers = config.policies.worker_count
        if not workers or not pipeline.runs_at(Stage.DATA):
            return None
        # They read the system clock, whatever ``clock`` is.
        return PolicyWorkers(
            WorkerSetup(
                config,
                self.base_dir,
                Path(config.storage.sqlite_path),
                config.log.level,
            ),
            pipeline,
            self.handler.observe,
            self.metrics,
            count=workers,
            passed=self.handler.observe_pass,
            on_warning=self.handler.spam_subject_warning,
        )

    async def reload(self, path: Path) -> bool:
        """Re-read relay.toml at ``path`` and apply it without dropping anything.

        Policies, thresholds, accounts (passwords, domains, rates, categories),
        limits per message and the feedback secret change at once; a transaction
        under way finishes with the checks it started with. Listen addresses,
        TLS files, storage, upstream, queue and log settings need a restart: they
        are logged as such. An unusable file is refused with its errors logged,
        and the running configuration stays.
        """
        async with self._reloading:
            problems: list[str] = []
            try:
                config = load_config(path)
                checks = self._checks(config)
            except (ConfigError, PolicyConfigError) as exc:
                problems = [str(p) for p in exc.problems]
            if problems:
                self.metrics.reloads_total.labels("refused").inc()
                log.error("reload_refused", path=str(path), problems=problems)
                return False
            workers = self._policy_workers(config, checks[0])
            if workers is not None:
                await workers.start()
            old_workers, self.policy_workers = self.policy_workers, workers
            self.handler.pipeline, self.handler.list_unsubscribe = checks
            self.handler.data_checks = workers.run if workers is not None else None
            self.handler.configure(_handler_settings(config))
            self.authenticator.set_accounts(config.accounts)
            self.accounts.configure(config)
            secret = config.feedback.secret
            self.feedback.set_signer(
                TokenSigner(secret.get_secret_value()) if secret is not None else None
            )
            self.feedback_mail.configure(config.feedback)
            self.delivery.tracker = self.feedback_mail.tracker
            restart = _needs_restart(self.config, config)
            self.config = config
            if old_workers is not None:
                await old_workers.close()
            self.metrics.reloads_total.labels("applied").inc()
            log.info(
                "config_reloaded",
                path=str(path),
                accounts=len(config.accounts),
                policies=list(checks[0].order),
                needs_restart=restart or None,
            )
            return True

    async def refresh_metrics(self) -> None:
        """Update the queue gauges from the store (called at scrape time)."""
        stats = await self.store.stats()
        in_flight = self.queue.in_flight
        self.metrics.queue_messages.labels("queued").set(
            max(0, stats.messages - in_flight)
        )
        self.metrics.queue_messages.labels("in_flight").set(in_flight)
        self.metrics.queue_recipients.set(stats.recipients)
        oldest = stats.oldest_received_at
        age = (self.clock.now() - oldest).total_seconds() if oldest else 0.0
        self.metrics.queue_oldest_message_age_seconds.set(max(0.0, age))


def _handler_settings(config: RelayConfig) -> HandlerSettings:
    server = config.server
    return HandlerSettings(
        hostname=server.hostname,
        max_recipients=server.max_recipients,
        max_message_size_bytes=server.max_message_size_bytes,
        max_sessions=server.max_sessions,
        default_categories={
            name: MessageKind(account.default_category)
            for name, account in config.accounts.items()
            if account.default_category is not None
        },
    )


_RESTART_ONLY = ("http", "storage", "upstream", "queue", "log")
_SERVER_RESTART_ONLY = ("listen", "tls_cert", "tls_key", "require_tls")


def _needs_restart(old: RelayConfig, new: RelayConfig) -> list[str]:
    """The changed settings a reload cannot apply."""
    changed = [
        name for name in _RESTART_ONLY if getattr(old, name) != getattr(new, name)
    ]
    changed += [
        f"server.{name}"
        for name in _SERVER_RESTART_ONLY
        if getattr(old.server, name, None) != getattr(new.server, name, None)
    ]
    return changed


@contextlib.contextmanager
def stop_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM or SIGINT while inside; restore handlers after."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def pid_file(config: RelayConfig) -> Path:
    """Where ``relay serve`` writes its process id (``relay reload`` reads it)."""
    return Path(config.storage.sqlite_path).with_suffix(".pid")


async def serve(
    config: RelayConfig, base_dir: Path | None = None, path: Path | None = None
) -> bool:
    """Run the relay until SIGTERM or SIGINT, then drain; False if it failed.
    SIGHUP re-reads ``path`` (relay.toml)."""
    relay = Relay(config, base_dir=base_dir)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        if path is None:
            return
        task = loop.create_task(relay.reload(path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    pid = pid_file(config)
    with stop_signals(relay.stop_requested):
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await relay.start()
            with contextlib.suppress(OSError):
                pid.write_text(f"{os.getpid()}\n")
            await relay.stop_requested.wait()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            with contextlib.suppress(OSError):
                if pid.read_text().strip() == str(os.getpid()):
                    pid.unlink()
            await relay.shutdown()
    return not relay.failed
