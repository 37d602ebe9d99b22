"""One reusable connection to the smarthost, with per-recipient outcomes.

This is the only module that knows aiosmtplib. Its errors become the relay's own
(:mod:`relay.errors`) or per-recipient :class:`Outcome` values here, once. A
connection carries many transactions; it is reset (RSET) after an incomplete one
and probed with RSET after sitting idle, so a connection the server dropped is
replaced before a message is risked on it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import aiosmtplib
import structlog

from config.models import UpstreamConfig, UpstreamScheme
from relay.errors import UpstreamTimeoutError, UpstreamUnavailableError
from relay.metrics import Metrics

log = structlog.get_logger(__name__)

_IDLE_PROBE_SECONDS = 2.0
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_IN_A_PATH = re.compile(r"[ <>]")
_QUIT_TIMEOUT_SECONDS = 1.0


class Outcome(StrEnum):
    """What the upstream did with one recipient."""

    DELIVERED = "delivered"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """The upstream's answer for one recipient."""

    address: str
    outcome: Outcome
    code: int | None
    status: str
    text: str
    at_mail: bool = False
    """The upstream refused the envelope sender (MAIL), not the recipient."""


def _enhanced(code: int | None, text: str) -> tuple[str, str]:
    """Split ``"5.1.1 User unknown"`` into status and text (derive a missing one)."""
    head, _, rest = text.partition(" ")
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "245":
        return head, rest
    if code is None:
        return "4.4.1", text
    return f"{code // 100}.0.0", text


def _classify(code: int) -> Outcome:
    if 200 <= code < 300:
        return Outcome.DELIVERED
    # RFC 5321 §4.5.3.1.10: 552 on RCPT/DATA ("too much mail data", historically
    # "too many recipients") is to be treated as temporary.
    if code == 552 or 400 <= code < 500:
        return Outcome.TEMPORARY
    return Outcome.PERMANENT


def _path(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL FROM or RCPT TO. Canonical addresses always pass;
    the check is a last guard against anything that could end the path early
    and smuggle in a parameter or a command (ValueError)."""
    quoted = _QUOTED_LOCAL.match(address)
    rest = address[quoted.end() :] if quoted else address
    if _CONTROL.search(address) or _NOT_IN_A_PATH.search(rest):
        raise ValueError(f"address {address!r} cannot be sent on a command line")
    return b"<" + address.encode(encoding) + b">"


def _clean(text: str) -> str:
    return " ".join(text.split())[:500]


class UpstreamConnection:
    """A lazily opened, reused SMTP client connection to ``[upstream]``."""

    def __init__(
        self,
        config: UpstreamConfig,
        local_hostname: str,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._local_hostname = config.helo_name or local_hostname
        self._client: aiosmtplib.SMTP | None = None
        self._dirty = False
        self._transactions = 0
        self._last_used = 0.0
        self.name = f"{config.host}:{config.port}"
        """``host:port`` of the smarthost, for logs."""

    @property
    def connected(self) -> bool:
        """True while a connection is open."""
        return self._client is not None and self._client.is_connected

    def idle_for(self) -> float:
        """Seconds since the connection was last used."""
        return time.monotonic() - self._last_used

    async def close(self) -> None:
        """QUIT politely if possible, then drop the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.is_connected:
                # A polite QUIT, but never worth more than a moment at shutdown.
                async with asyncio.timeout(_QUIT_TIMEOUT_SECONDS):
                    await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            client.close()

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if not self._config.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _connect(self) -> aiosmtplib.SMTP:
        try:
            client = await self._open()
        except (UpstreamUnavailableError, UpstreamTimeoutError):
            if self._metrics is not None:
                self._metrics.upstream_connections_total.labels("failed").inc()
            raise
        if self._metrics is not None:
            self._metrics.upstream_connections_total.labels("ok").inc()
        return client

    async def _open(self) -> aiosmtplib.SMTP:
        cfg = self._config
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port,
            local_hostname=self._local_hostname,
            timeout=cfg.command_timeout_seconds,
            use_tls=cfg.scheme is UpstreamScheme.SMTPS,
            start_tls=cfg.scheme is UpstreamScheme.STARTTLS,
            tls_context=self._tls_context()
            if cfg.scheme is not UpstreamScheme.SMTP
            else None,
        )
        try:
            await client.connect(timeout=cfg.connect_timeout_seconds)
            if cfg.username is not None and cfg.password is not None:
                await client.login(cfg.username, cfg.password.get_secret_value())
            if client.is_ehlo_or_helo_needed:
                # Learn the extensions now: the first MAIL already needs to know
                # whether SMTPUTF8 and 8BITMIME may be asked for.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise UpstreamUnavailableError(
                f"upstream refused our credentials: {exc.code} {_clean(exc.message)}"
            ) from exc
        except aiosmtplib.SMTPTimeoutError as exc:
            client.close()
            raise UpstreamTimeoutError("timed out connecting to upstream") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise UpstreamUnavailableError(
                f"cannot connect to upstream {self.name}: {_clean(str(exc))}"
            ) from exc
        self._transactions = 0
        self._dirty = False
        log.debug("upstream_connected", upstream=self.name)
        return client

    async def _ready_client(self) -> tuple[aiosmtplib.SMTP, bool]:
        """An open client, and whether it was reused (not freshly connected)."""
        if (
            self._client is not None
            and self._transactions >= self._config.messages_per_connection
        ):
            await self.close()
        if self._client is not None and not self._client.is_connected:
            self._client.close()
            self._client = None
        if self._client is not None and (
            self._dirty or self.idle_for() > _IDLE_PROBE_SECONDS
        ):
            try:
                await self._client.rset()
                self._dirty = False
            except (aiosmtplib.SMTPException, OSError):
                self._client.close()
                self._client = None
        if self._client is None:
            self._client = await self._connect()
            return self._client, False
        return self._client, True

    async def send(
        self,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes,
        *,
        smtputf8: bool = False,
    ) -> list[RecipientOutcome]:
        """Offer one message; return an outcome for every recipient.

        Raises :class:`UpstreamUnavailableError` / :class:`UpstreamTimeoutError`
        only when no connection could be made; failures after that are reported
        per recipient as TEMPORARY.
        """
        client, reused = await self._ready_client()
        try:
            return await self._transaction(
                client, mail_from, recipients, content, smtputf8
            )
        except aiosmtplib.SMTPServerDisconnected as exc:
            if not reused:
                raise UpstreamUnavailableError(
                    f"upstream {self.name} closed the connection at MAIL"
                ) from exc
        # A reused connection died under us before the message was offered: the
        # server closed it while idle. Reconnect once.
        self._client = None
        client, _ = await self._ready_client()
        try:
            return await self._transaction(
                client, mail_from, recipients, content, smtputf8
            )
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise UpstreamUnavailableError(
                f"upstream {self.name} closed the connection at MAIL"
            ) from exc

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        mail_from: str,
        recipients: Sequence[str],
        content: bytes,
        smtputf8: bool,
    ) -> list[RecipientOutcome]:
        self._last_used = time.monotonic()
        self._transactions += 1
        self._dirty = True
        encoding = "utf-8" if smtputf8 else "ascii"
        options: list[str] = []
        if smtputf8 and client.supports_extension("smtputf8"):
            options.append("SMTPUTF8")
        if client.supports_extension("8bitmime") and not content.isascii():
            options.append("BODY=8BITMIME")
        stage = "MAIL"
        try:
            refused = await self._mail(client, mail_from, recipients, options, encoding)
            if refused is not None:
                return refused
            stage = "RCPT"
            outcomes: dict[str, RecipientOutcome] = {}
            accepted = await self._rcpts(client, recipients, encoding, outcomes)
            if accepted:
                stage = "DATA"
                try:
                    response = await client.data(content)
                    done = self._all(accepted, response.code, response.message)
                except aiosmtplib.SMTPDataError as exc:
                    done = self._all(accepted, exc.code, exc.message, refused=True)
                else:
                    self._dirty = False
                outcomes.update((o.address, o) for o in done)
            return [outcomes[rcpt] for rcpt in recipients]
        except aiosmtplib.SMTPServerDisconnected:
            self._drop()
            if stage == "MAIL":
                raise
            return self._all(recipients, None, f"upstream disconnected during {stage}")
        except aiosmtplib.SMTPTimeoutError:
            self._drop()
            return self._all(recipients, None, f"upstream timed out during {stage}")
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._drop()
            return self._all(recipients, None, f"upstream error during {stage}: {exc}")
        finally:
            self._last_used = time.monotonic()

    # MAIL and RCPT are sent as they are: the addresses are the relay's canonical
    # forms (aiosmtplib's mail() and rcpt() would parse each one again with
    # email.utils, which costs more than the command itself).

    async def _mail(
        self,
        client: aiosmtplib.SMTP,
        mail_from: str,
        recipients: Sequence[str],
        options: list[str],
        encoding: str,
    ) -> list[RecipientOutcome] | None:
        """MAIL FROM; ``None`` when accepted, else every recipient's outcome."""
        try:
            sender = _path(mail_from, encoding)
        except ValueError as exc:
            return [
                RecipientOutcome(
                    rcpt, Outcome.PERMANENT, None, "5.1.7", str(exc), at_mail=True
                )
                for rcpt in recipients
            ]
        reply = await client.execute_command(
            b"MAIL",
            b"FROM:" + sender,
            *(option.encode("ascii") for option in options),
        )
        if reply.code == 250:
            return None
        return [
            replace(outcome, at_mail=True)
            for outcome in self._all(
                recipients, reply.code, reply.message, refused=True
            )
        ]

    async def _rcpts(
        self,
        client: aiosmtplib.SMTP,
        recipients: Sequence[str],
        encoding: str,
        outcomes: dict[str, RecipientOutcome],
    ) -> list[str]:
        """RCPT TO for each recipient; the accepted ones (the refused land in
        ``outcomes``)."""
        accepted: list[str] = []
        for rcpt in recipients:
            try:
                path = _path(rcpt, encoding)
            except ValueError as exc:
                outcomes[rcpt] = RecipientOutcome(
                    rcpt, Outcome.PERMANENT, None, "5.1.3", str(exc)
                )
                continue
            reply = await client.execute_command(b"RCPT", b"TO:" + path)
            if reply.code in (250, 251):
                accepted.append(rcpt)
            else:
                outcomes[rcpt] = self._one(
                    rcpt, reply.code, reply.message, refused=True
                )
        return accepted

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    @staticmethod
    def _one(
        address: str, code: int | None, message: str, *, refused: bool = False
    ) -> RecipientOutcome:
        status, text = _enhanced(code, _clean(message))
        outcome = _classify(code) if code is not None else Outcome.TEMPORARY
        if refused and outcome is Outcome.DELIVERED:
            # aiosmtplib refuses replies it does not expect (252 to RCPT, a 2xx
            # other than 354 to DATA): nothing was accepted, so try again later.
            outcome = Outcome.TEMPORARY
            status = "4.5.0"
        return RecipientOutcome(address, outcome, code, status, text)

    def _all(
        self,
        recipients: Sequence[str],
        code: int | None,
        message: str,
        *,
        refused: bool = False,
    ) -> list[RecipientOutcome]:
        return [self._one(rcpt, code, message, refused=refused) for rcpt in recipients]
