"""Frozen pydantic models, one per ``relay.toml`` section.

Keys in the file are short (``idle_timeout = "5m"``); the Python attributes carry the
unit (``idle_timeout_seconds``) through aliases. Unknown keys are errors everywhere.
Secrets are ``SecretStr``; the loader resolves ``*_env`` keys before validation.
"""

from __future__ import annotations

import os
import re
import ssl
from datetime import date
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from config.units import Bytes, Percent, Rate, RateLimit, Seconds

MAX_POLICY_WORKERS = 64
_AUTO_POLICY_WORKERS = 4
_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PLAIN_LOCAL = re.compile(r"^[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*$")
"""A local part the relay can write into a mailto: URI and a header as it is."""
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, str_strip_whitespace=True
    )


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{value!r} is not host:port, e.g. '127.0.0.1:2525'")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} is out of range 0-65535")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{value!r} has no host, e.g. '0.0.0.0:2525'")
    return host, number


def split_listen(value: str) -> tuple[str, int]:
    """Split a validated ``host:port`` listen string."""
    return _split_listen(value)


def _listen(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected 'host:port'")
    _split_listen(value)
    return value


class ServerConfig(_Section):
    """``[server]``: the SMTP listener for the sending accounts' mailers."""

    hostname: str = "localhost"
    listen: str = "127.0.0.1:2525"
    max_message_size_bytes: Bytes = Field(
        default=25 * 1024**2, alias="max_message_size"
    )
    max_recipients: int = Field(default=100, ge=1, le=10_000)
    max_sessions: int = Field(default=500, ge=1)
    idle_timeout_seconds: Seconds = Field(default=300.0, alias="idle_timeout")
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    require_tls: bool = False
    allow_cleartext_auth: bool = False
    smtputf8: bool = True
    auth_max_failures: int = Field(default=5, ge=1)
    auth_failure_window_seconds: Seconds = Field(
        default=600.0, alias="auth_failure_window"
    )
    auth_lockout_seconds: Seconds = Field(default=900.0, alias="auth_lockout")
    shutdown_grace_seconds: Seconds = Field(default=30.0, alias="shutdown_grace")

    @field_validator("listen", mode="before")
    @classmethod
    def _check_listen(cls, value: object) -> str:
        return _listen(value)

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, value: str) -> str:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid host name")
        return value

    @field_validator("max_message_size_bytes")
    @classmethod
    def _check_size(cls, value: int) -> int:
        if value < 1024:
            raise ValueError("must be at least 1KiB")
        return value

    @model_validator(mode="after")
    def _check_tls_pair(self) -> ServerConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.require_tls and self.tls_cert_file is None:
            raise ValueError("require_tls needs tls_cert_file and tls_key_file")
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            # Load them now, so that check-config finds what serve would.
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert_file, self.tls_key_file
                )
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"cannot load tls_cert_file/tls_key_file: {exc.strerror or exc}"
                ) from exc
        return self


class HttpConfig(_Section):
    """``[http]``: metrics, health, unsubscribe pages and the admin API."""

    listen: str = "127.0.0.1:9025"
    public_url: str = "http://127.0.0.1:9025"
    admin_token: SecretStr | None = None

    @field_validator("listen", mode="before")
    @classmethod
    def _check_listen(cls, value: object) -> str:
        return _listen(value)

    @field_validator("public_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if not value.isascii():
            raise ValueError(
                f"{value!r} must be ASCII: write an internationalised host in its "
                "xn-- form and percent-encode the path"
            )
        return value.rstrip("/")


class StorageConfig(_Section):
    """``[storage]``: where the queue, events and lists live."""

    url: str = "sqlite:///relay-data/relay.db"
    timeout_seconds: Seconds = Field(default=10.0, alias="timeout")
    min_free_space_bytes: Bytes = Field(default=64 * 1024**2, alias="min_free_space")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
            return value
        if value.startswith(("postgresql://", "postgres://")):
            raise ValueError("the PostgreSQL backend is not available yet; use sqlite")
        raise ValueError(
            f"{value!r} is not a storage URL; write 'sqlite:///relative/path.db' "
            "or 'sqlite:////absolute/path.db'"
        )

    @property
    def sqlite_path(self) -> str:
        """The database file named by ``url``."""
        return self.url[len("sqlite:///") :]


class UpstreamScheme(StrEnum):
    """How the relay talks to its smarthost."""

    SMTP = "smtp"
    STARTTLS = "smtp+starttls"
    SMTPS = "smtps"


class UpstreamConfig(_Section):
    """``[upstream]``: the smarthost that receives the relay's clean mail."""

    url: str = "smtp://127.0.0.1:2526"
    username: str | None = None
    password: SecretStr | None = None
    pool_size: int = Field(default=8, ge=1, le=256)
    connect_timeout_seconds: Seconds = Field(default=15.0, alias="connect_timeout")
    command_timeout_seconds: Seconds = Field(default=60.0, alias="command_timeout")
    idle_timeout_seconds: Seconds = Field(default=30.0, alias="idle_timeout")
    messages_per_connection: int = Field(default=1000, ge=1)
    tls_verify: bool = True
    helo_name: str | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {s.value for s in UpstreamScheme}:
            raise ValueError(
                f"scheme {parts.scheme!r} is not one of smtp://, smtp+starttls://, "
                "smtps://"
            )
        if not parts.hostname:
            raise ValueError(f"{value!r} names no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "put credentials in username and password (or password_env), "
                "not in the URL"
            )
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r} has an invalid port") from exc
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> UpstreamConfig:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @property
    def scheme(self) -> UpstreamScheme:
        """The transport named by ``url``."""
        return UpstreamScheme(urlsplit(self.url).scheme)

    @property
    def host(self) -> str:
        """The smarthost's name or address."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The smarthost's port (default 25, or 465 for ``smtps``)."""
        port = urlsplit(self.url).port
        if port is not None:
            return port
        return 465 if self.scheme is UpstreamScheme.SMTPS else 25


class QueueConfig(_Section):
    """``[queue]``: retries, lifetime and delivery status notifications."""

    retry_schedule_seconds: tuple[Seconds, ...] = Field(
        default=(60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
        alias="retry_schedule",
        min_length=1,
    )
    retry_jitter: float = Field(default=0.1, ge=0.0, le=0.5)
    max_lifetime_seconds: Seconds = Field(default=5 * 86400.0, alias="max_lifetime")
    send_dsn: bool = True
    dsn_sender: str = "MAILER-DAEMON"
    poll_interval_seconds: Seconds = Field(default=1.0, alias="poll_interval")

    @field_validator("retry_schedule_seconds")
    @classmethod
    def _check_schedule(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(step <= 0 for step in value):
            raise ValueError("every retry delay must be above zero")
        return value

    @field_validator("poll_interval_seconds")
    @classmethod
    def _check_poll(cls, value: float) -> float:
        if not 0.05 <= value <= 60:
            raise ValueError("must be between 50ms and 60s")
        return value


def _mailbox(value: str) -> str:
    """``value`` if it is an ASCII address like ``name@host.example``, lower-cased
    in its domain; raise ValueError otherwise."""
    local, at, domain = value.rpartition("@")
    if not at or not _PLAIN_LOCAL.fullmatch(local) or not _HOSTNAME.fullmatch(domain):
        raise ValueError(f"{value!r} is not an address like abuse@relay.example")
    return f"{local}@{domain.lower()}"


class FeedbackConfig(_Section):
    """``[feedback]``: how feedback reaches the relay, and the key that signs it."""

    secret: SecretStr | None = None
    """Signs the tokens of unsubscribe links, VERP addresses and X-Relay-Id
    (HMAC-SHA256); at least 32 characters."""
    unsubscribe_mailto: str | None = None
    """Address for the mailto form of List-Unsubscribe (optional); mail to it with
    the subject ``unsubscribe <token>`` unsubscribes."""
    bounce_domain: str | None = None
    """VERP: the envelope sender given to the upstream becomes
    ``<local>+<token>@<bounce_domain>``, and bounces to that domain are read."""
    fbl_address: str | None = None
    """Where mailbox providers send abuse reports (ARF, RFC 5965)."""
    intake_rate: Rate = RateLimit(600, 60.0)
    """Feedback messages accepted per client IP address (``"600/m"``); above it
    ``451 4.7.1``, and the sender retries later."""

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "must be at least 32 characters; generate one with "
                "'python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"'"
            )
        return value

    @field_validator("unsubscribe_mailto", "fbl_address")
    @classmethod
    def _check_mailto(cls, value: str | None) -> str | None:
        return None if value is None else _mailbox(value)

    @field_validator("bounce_domain")
    @classmethod
    def _check_bounce_domain(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.rstrip(".").lower()
            if not _HOSTNAME.fullmatch(value) or "." not in value:
                raise ValueError(
                    f"{value!r} is not a domain like bounces.relay.example"
                )
        return value

    @model_validator(mode="after")
    def _needs_secret(self) -> FeedbackConfig:
        for name in ("bounce_domain", "fbl_address", "unsubscribe_mailto"):
            if getattr(self, name) is not None and self.secret is None:
                raise ValueError(
                    f"{name} needs [feedback] secret (it signs the tokens that "
                    "attribute feedback)"
                )
        return self

    @property
    def intake(self) -> bool:
        """True if mail may arrive for the relay itself (bounces, reports,
        mailto unsubscribes): MAIL without AUTH is then allowed for them."""
        return (
            self.bounce_domain is not None
            or self.fbl_address is not None
            or self.unsubscribe_mailto is not None
        )

    @property
    def tracks(self) -> bool:
        """True if outgoing mail carries VERP and X-Relay-Id."""
        return self.bounce_domain is not None or self.fbl_address is not None


class BreachAction(StrEnum):
    """What crossing a threshold does to the account."""

    WARN = "warn"  # logged and flagged (state warning)
    THROTTLE = "throttle"  # sending limited to [thresholds] throttle_rate
    SUSPEND = "suspend"  # refused (550 5.7.1) until an operator reinstates it


class BreachActions(_Section):
    """``[thresholds.actions]``: the action for each statistic."""

    bounce_rate: BreachAction = BreachAction.SUSPEND
    unsubscribe_rate: BreachAction = BreachAction.THROTTLE
    block_rate: BreachAction = BreachAction.THROTTLE
    complaint_rate: BreachAction = BreachAction.SUSPEND
    complaints_per_day: BreachAction = BreachAction.SUSPEND
    spamtrap_hits: BreachAction = BreachAction.SUSPEND


class ThresholdsConfig(_Section):
    """``[thresholds]``: the acceptable rates of each sending account.

    Rates are measured over a rolling ``window`` of hourly buckets. The defaults are
    the sending policy's: bounces 8% of sent, unsubscribes 1.4% of delivered (1%
    when unsubscribes outnumber clicks), blocks 30% of submitted, complaints 0.08%
    of delivered (judged only above ``complaint_min_volume`` sent) and at most 50
    in any 24 hours, at most 1 spamtrap hit.
    """

    window_seconds: Seconds = Field(default=30 * 86400.0, alias="window")
    min_volume: int = Field(default=100, ge=1, le=10**9)
    """Recipients sent in the window below which no rate is judged."""
    warn_at: float = Field(default=0.8, gt=0, le=1)
    """A rate above ``warn_at`` x its threshold puts the account in ``warning``."""
    bounce_rate: Percent = 0.08
    unsubscribe_rate: Percent = 0.014
    unsubscribe_rate_without_clicks: Percent = 0.01
    """The stricter unsubscribe limit, once unsubscribes exceed clicks."""
    block_rate: Percent = 0.30
    complaint_rate: Percent = 0.0008
    complaint_min_volume: int = Field(default=1000, ge=0, le=10**9)
    complaints_per_day: int = Field(default=50, ge=0, le=10**9)
    """Complaints in any 24 hours; more breaches whatever the volume."""
    spamtrap_hits: int = Field(default=1, ge=0, le=10**6)
    """Spamtrap hits and unjustified abuse complaints allowed in the window."""
    throttle_rate: Rate = RateLimit(100, 3600.0)
    """What a throttled account may still send (recipients)."""
    actions: BreachActions = BreachActions()

    @field_validator("window_seconds")
    @classmethod
    def _check_window(cls, value: float) -> float:
        if not 3600 <= value <= 366 * 86400:
            raise ValueError("must be between 1h and 366d")
        if value % 3600:
            raise ValueError("must be a whole number of hours (counts are hourly)")
        return value


class AccountConfig(_Section):
    """``[accounts.NAME]``: a sending account; its name is the AUTH user name."""

    password_hash: SecretStr
    enabled: bool = True
    default_category: Literal["marketing", "transactional"] | None = None
    """The kind of mail the account sends when its mailer does not say."""
    domains: dict[str, date] = Field(default_factory=dict)
    """Sender domains with the date each was verified (or registered)."""
    allowed_senders: tuple[str, ...] = ()
    """Addresses or domains also allowed in Sender and Reply-To."""
    allowed_content: tuple[str, ...] = ()
    """Prohibited-content categories this account is allowed to send."""
    rate: Rate | None = None
    """The most recipients it may send, e.g. ``"5000/h"`` (451 4.7.1 above)."""

    @field_validator("password_hash")
    @classmethod
    def _check_hash(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith("$argon2"):
            raise ValueError(
                "is not an argon2 hash; produce one with 'relay hash-password'"
            )
        return value


class PoliciesConfig(BaseModel):
    """``[policies]``: mode, order, and one table per policy (kept raw here).

    Each policy owns its settings model; ``policies.registry`` validates the
    tables, so ``config`` stays at the bottom of the import order.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    mode: str = "enforce"
    order: tuple[str, ...] = ()
    workers: int | Literal["auto"] = "auto"
    """Processes that run the DATA-stage checks beside the relay's own: 0 runs
    them in the relay process; "auto" is one per CPU beyond the first, at most 4."""

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.isascii() and value.isdigit():  # *_env
            value = int(value)
        if value == "auto" or (
            type(value) is int and 0 <= value <= MAX_POLICY_WORKERS  # not a bool
        ):
            return value
        raise ValueError(f'must be "auto" or a number from 0 to {MAX_POLICY_WORKERS}')

    @property
    def worker_count(self) -> int:
        """``workers`` as a number (``auto`` resolved on this machine)."""
        if isinstance(self.workers, int):
            return self.workers
        return max(0, min(_AUTO_POLICY_WORKERS, (os.cpu_count() or 1) - 1))

    @field_validator("mode")
    @classmethod
    def _check_mode(cls, value: str) -> str:
        if value not in {"enforce", "monitor"}:
            raise ValueError("must be 'enforce' or 'monitor'")
        return value

    @property
    def tables(self) -> dict[str, Any]:
        """The per-policy tables, by policy name."""
        return dict(self.model_extra or {})


class LogConfig(_Section):
    """``[log]``: where and how the JSON log lines go."""

    level: str = "info"
    format: str = "auto"

    @field_validator("level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @field_validator("format")
    @classmethod
    def _check_format(cls, value: str) -> str:
        if value not in {"auto", "json", "console"}:
            raise ValueError("must be one of auto, json, console")
        return value


class RelayConfig(_Section):
    """The whole of ``relay.toml``."""

    server: ServerConfig = ServerConfig()
    http: HttpConfig = HttpConfig()
    storage: StorageConfig = StorageConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    queue: QueueConfig = QueueConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    log: LogConfig = LogConfig()
    policies: PoliciesConfig = PoliciesConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    accounts: dict[str, AccountConfig] = Field(default_factory=dict)

    @field_validator("accounts", mode="before")
    @classmethod
    def _check_account_names(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name in value:
                if not _ACCOUNT_NAME.match(str(name)):
                    raise ValueError(
                        f"account name {name!r} must be 1-64 letters, digits, "
                        "'_', '.' or '-'"
                    )
        return value
