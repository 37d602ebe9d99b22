"""From, Sender, Reply-To and MAIL FROM must honestly name the account's own domains.

The From mailbox must be a single, parsable address whose domain is one of the
account's verified domains (``alignment = "strict"``) or shares its organisational
domain with one (``"relaxed"``, the DMARC notion, RFC 7489 §3.2, computed with the
Public Suffix List); that account domain must be at least ``min_domain_age`` old.
Sender and Reply-To must align the same way or be listed in the account's
``allowed_senders``; free-mail providers get a reason of their own. Display names
must not pass off another domain (``"support@paypal.com" <x@acme.example>``), and
MAIL FROM must align too, the null sender excepted. Duplicated or malformed headers
in general are :mod:`policies.header_sanity`'s business; this module only refuses
what would make the sender's identity ambiguous. The headers are read through
:mod:`policies._headers`, once per message for both checks.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any

from publicsuffixlist import PublicSuffixList
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
)

from config.units import Seconds
from policies._headers import (
    AddressList,
    Mailbox,
    Unreadable,
    address_list,
    header_fields,
    settings_error,
)
from policies.base import (
    PASS,
    AccountPolicy,
    Clock,
    MessageLike,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
    refuse,
)
from storage.addresses import AddressError, canonical_address, canonical_domain

DAY_SECONDS = 86400.0

# fmt: off
DEFAULT_FREE_MAIL_DOMAINS = frozenset({
    "163.com", "aol.com", "free.fr", "gmail.com", "gmx.com", "gmx.de", "gmx.net",
    "googlemail.com", "hotmail.co.uk", "hotmail.com", "hotmail.fr", "icloud.com",
    "laposte.net", "libero.it", "live.com", "mac.com", "mail.com", "mail.ru",
    "me.com", "msn.com", "orange.fr", "outlook.com", "pm.me", "proton.me",
    "protonmail.com", "qq.com", "seznam.cz", "t-online.de", "tutanota.com",
    "web.de", "wp.pl", "yahoo.co.uk", "yahoo.com", "yahoo.de", "yahoo.fr",
    "yandex.com", "yandex.ru", "ymail.com", "zoho.com",
})
# fmt: on
"""Mailbox providers anyone can sign up to: never the account's own identity."""

# Characters IDNA (RFC 3490 §3.1) treats as label dots but NFKC leaves alone.
_DOTS = str.maketrans({"\u3002": ".", "\uff61": ".", "\ufe52": "."})
# A domain-like token, optionally right after "@" (the domain of an address).
_DOMAIN_TOKEN = re.compile(r"(@?)([\w-]+(?:\.[\w-]+)+)")
_CACHE_SIZE = 4096
"""Distinct domains, addresses and display names remembered across messages."""


class Alignment(StrEnum):
    """How closely a header domain must match an account domain."""

    STRICT = "strict"
    """Exactly one of the account's domains."""
    RELAXED = "relaxed"
    """The same organisational domain as one of them (a subdomain, a parent)."""


class Settings(BaseModel):
    """``[policies.sender_domains]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alignment: Alignment = Alignment.RELAXED
    min_domain_age_seconds: Seconds = Field(
        default=30 * DAY_SECONDS, alias="min_domain_age"
    )
    check_envelope: StrictBool = True
    free_mail_domains: frozenset[str] = DEFAULT_FREE_MAIL_DOMAINS

    @field_validator("free_mail_domains")
    @classmethod
    def _canonical_domains(cls, value: frozenset[str]) -> frozenset[str]:
        canonical = set()
        for entry in sorted(value):
            try:
                canonical.add(canonical_domain(entry.strip()))
            except AddressError as exc:
                raise ValueError(f"{entry!r}: {exc.reason}") from None
        return frozenset(canonical)


@functools.cache
def _psl() -> PublicSuffixList:
    """The Public Suffix List (bundled with the package), loaded once."""
    return PublicSuffixList()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def organisational_domain(domain: str) -> str:
    """The registrable domain of a canonical ``domain`` (RFC 7489 §3.2), or
    ``domain`` itself when it is a public suffix or has no known one."""
    found = _psl().privatesuffix(domain)
    return found if isinstance(found, str) else domain


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _is_registrable(domain: str) -> bool:
    """True if ``domain`` lies under a suffix the Public Suffix List knows."""
    return _psl().privatesuffix(domain, accept_unknown=False) is not None


@dataclass(frozen=True, slots=True)
class _Account:
    """An account's domains indexed for matching."""

    name: str
    domains: Mapping[str, date]
    by_organisation: Mapping[str, tuple[str, ...]]
    allowed: frozenset[str]
    """``allowed_senders``, lower-cased (addresses and domains)."""

    @classmethod
    def index(cls, account: AccountPolicy) -> _Account:
        domains: dict[str, date] = {}
        for domain, verified in account.domains.items():
            try:
                domains[canonical_domain(domain)] = verified
            except AddressError:
                continue  # the registry refuses these at start-up
        by_organisation: dict[str, list[str]] = {}
        for domain in sorted(domains, key=lambda d: (domains[d], d)):
            by_organisation.setdefault(organisational_domain(domain), []).append(domain)
        return cls(
            name=account.name,
            domains=domains,
            by_organisation={k: tuple(v) for k, v in by_organisation.items()},
            allowed=frozenset(entry.lower() for entry in account.allowed_senders),
        )


_COMMENT = re.compile(r"\(([^()]*)\)")
"""The text of a (non-nested) RFC 5322 comment."""


@dataclass(frozen=True, slots=True)
class _Mailbox:
    """One parsed mailbox: canonical address and domain, decoded display name."""

    address: str
    domain: str
    display_name: str


class SenderDomains:
    """The From, Sender, Reply-To and envelope domains must be the account's own."""

    name = "sender_domains"
    stages = frozenset({Stage.DATA})

    def __init__(
        self,
        settings: Settings,
        accounts: Mapping[str, AccountPolicy],
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._accounts = {name: _Account.index(a) for name, a in accounts.items()}
        self._clock = clock

    async def check(self, ctx: PolicyContext) -> Verdict:
        """Refuse the message unless every sender identity belongs to the account."""
        message = ctx.message
        if message is None:
            return PASS
        account = self._accounts.get(ctx.account)
        if account is None:
            return refuse(
                "unknown_account",
                f"account {ctx.account} is not configured, so it has no sender domains",
            )
        if not account.domains:
            return refuse(
                "no_sender_domains",
                f"account {account.name} has no sender domains: "
                f"[accounts.{account.name}] domains is empty",
            )
        return (
            self._check_from(message, account)
            or self._check_other("Sender", message, account)
            or self._check_other("Reply-To", message, account)
            or self._check_envelope(ctx.mail_from, account)
            or PASS
        )

    def _check_from(self, message: MessageLike, account: _Account) -> Verdict | None:
        values = _raw_values(message, "From")
        if not values:
            return refuse("from_missing", "message has no From header (RFC 5322 3.6.2)")
        if len(values) > 1:
            return refuse(
                "from_duplicated",
                f"message has {len(values)} From headers; RFC 5322 3.6 allows one",
                count=len(values),
            )
        header = _parse_address_header(message, "From", values[0])
        if isinstance(header, Unreadable):
            return refuse("from_unparsable", f"From cannot be parsed: {header.why}")
        if header.grouped:
            return refuse(
                "from_not_single_mailbox",
                "From uses group syntax; it must hold exactly one mailbox",
            )
        if len(header.mailboxes) != 1:
            return refuse(
                "from_not_single_mailbox",
                f"From holds {len(header.mailboxes)} mailboxes; "
                "it must hold exactly one",
                count=len(header.mailboxes),
            )
        mailbox = _mailbox(header.mailboxes[0])
        if isinstance(mailbox, Unreadable):
            return refuse("from_unparsable", f"From cannot be parsed: {mailbox.why}")
        matched = self._aligned(mailbox.domain, account)
        if matched is None:
            return refuse(
                "from_domain_not_owned",
                f"From domain {mailbox.domain} is not a domain of account "
                f"{account.name}{self._alignment_note()}",
            )
        verdict = self._check_age(matched, account)
        if verdict is not None:
            return verdict
        # Some readers show a comment as the sender's name: "x@acme.example
        # (support@paypal.com)" is the same trick as a display name.
        for text in (mailbox.display_name, *_COMMENT.findall(values[0])):
            verdict = self._check_display_name("From", text, account)
            if verdict is not None:
                return verdict
        return None

    def _check_age(self, domain: str, account: _Account) -> Verdict | None:
        age_days = (self._clock.now().date() - account.domains[domain]).days
        minimum = self.settings.min_domain_age_seconds
        if age_days * DAY_SECONDS >= minimum:
            return None
        minimum_days = minimum / DAY_SECONDS
        return refuse(
            "domain_too_young",
            f"domain {domain} of account {account.name} is {age_days} days old, "
            f"below the minimum age of {minimum_days:g} days",
            age_days=age_days,
            min_age_days=minimum_days,
        )

    def _check_other(
        self, name: str, message: MessageLike, account: _Account
    ) -> Verdict | None:
        """Sender (one mailbox) and Reply-To (one or more) when present."""
        values = _raw_values(message, name)
        if not values:
            return None
        token = name.lower().replace("-", "_")
        mailboxes: list[_Mailbox] = []
        for value in values:
            header = _parse_address_header(message, name, value)
            if isinstance(header, Unreadable):
                return refuse(
                    f"{token}_unparsable", f"{name} cannot be parsed: {header.why}"
                )
            for address in header.mailboxes:
                mailbox = _mailbox(address)
                if isinstance(mailbox, Unreadable):
                    return refuse(
                        f"{token}_unparsable", f"{name} cannot be parsed: {mailbox.why}"
                    )
                mailboxes.append(mailbox)
        if not mailboxes or (name == "Sender" and len(mailboxes) > 1):
            wanted = "exactly one mailbox" if name == "Sender" else "a mailbox"
            return refuse(
                f"{token}_unparsable",
                f"{name} holds {len(mailboxes)} mailboxes; it must hold {wanted}",
                count=len(mailboxes),
            )
        for mailbox in mailboxes:
            verdict = self._check_mailbox(name, token, mailbox, account)
            if verdict is not None:
                return verdict
        return None

    def _check_mailbox(
        self, name: str, token: str, mailbox: _Mailbox, account: _Account
    ) -> Verdict | None:
        if not self._owned_or_allowed(mailbox.domain, account, mailbox.address):
            if self._is_free_mail(mailbox.domain):
                return refuse(
                    f"{token}_free_mail",
                    f"{name} domain {mailbox.domain} is a free-mail provider, "
                    f"not a domain of account {account.name}",
                )
            return refuse(
                f"{token}_domain_not_owned",
                f"{name} domain {mailbox.domain} is not a domain of account "
                f"{account.name} nor in its allowed_senders{self._alignment_note()}",
            )
        return self._check_display_name(name, mailbox.display_name, account)

    def _check_display_name(
        self, name: str, display_name: str, account: _Account
    ) -> Verdict | None:
        """A display name must not name a domain that is not the account's.

        Any domain of the account's organisations may be named, whatever the
        alignment: "Shop at www.acme.example" impersonates no one.
        """
        for domain in _named_domains(display_name):
            if not self._owned_or_allowed(domain, account, relaxed=True):
                return refuse(
                    "display_name_spoofing",
                    f"{name} display name names {domain}, which is not a domain "
                    f"of account {account.name}",
                )
        return None

    def _check_envelope(self, mail_from: str, account: _Account) -> Verdict | None:
        if not self.settings.check_envelope or mail_from == "":
            return None  # the null sender (RFC 5321 §4.5.5) has no domain
        try:
            domain = _canonical_domain(mail_from.rpartition("@")[2])
        except AddressError as exc:
            return refuse(
                "envelope_domain_not_owned",
                f"MAIL FROM domain cannot be read: {exc.reason}",
            )
        if self._aligned(domain, account) is None:
            return refuse(
                "envelope_domain_not_owned",
                f"MAIL FROM domain {domain} is not a domain of account "
                f"{account.name}{self._alignment_note()}",
            )
        return None

    def _aligned(
        self, domain: str, account: _Account, *, relaxed: bool = False
    ) -> str | None:
        """The account domain ``domain`` aligns with, or ``None``.

        An exact match wins; in relaxed mode (or with ``relaxed``) the oldest
        account domain of the same organisation stands for it.
        """
        if domain in account.domains:
            return domain
        if self.settings.alignment is Alignment.STRICT and not relaxed:
            return None
        candidates = account.by_organisation.get(organisational_domain(domain))
        return candidates[0] if candidates else None

    def _owned_or_allowed(
        self,
        domain: str,
        account: _Account,
        address: str | None = None,
        *,
        relaxed: bool = False,
    ) -> bool:
        if domain in account.allowed:
            return True
        if self._aligned(domain, account, relaxed=relaxed) is not None:
            return True
        return address is not None and address.lower() in account.allowed

    def _is_free_mail(self, domain: str) -> bool:
        free = self.settings.free_mail_domains
        return domain in free or organisational_domain(domain) in free

    def _alignment_note(self) -> str:
        if self.settings.alignment is Alignment.STRICT:
            return " (alignment is strict)"
        return ""


def _raw_values(message: MessageLike, name: str) -> tuple[str, ...]:
    """Every ``name`` field's raw value, unfolded, without parsing it."""
    return header_fields(message).values(name)


def _parse_address_header(
    message: MessageLike, name: str, raw: str
) -> AddressList | Unreadable:
    """One address header's raw value as ``policy.default`` reads it (plain
    values without it: :func:`policies._headers.address_list`), or why it cannot
    be read; shared with header_sanity through the message's memo.

    Raw UTF-8 (RFC 6532) arrives surrogate-escaped; it is decoded first so that
    an internationalised address reads as text.
    """
    try:
        text = raw.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return Unreadable("it holds bytes that are not UTF-8")
    return address_list(message, name, text)


def _mailbox(address: Mailbox) -> _Mailbox | Unreadable:
    """Canonicalise one parsed address, or say why it cannot be."""
    try:
        canonical = _canonical_address(address.addr_spec)
    except AddressError as exc:
        return Unreadable(exc.reason)
    return _Mailbox(
        address=canonical,
        domain=canonical.rpartition("@")[2],
        display_name=address.display_name,
    )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _canonical_domain(domain: str) -> str:
    """:func:`canonical_domain`, remembered (MAIL FROM repeats its domain)."""
    return canonical_domain(domain)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _canonical_address(address: str) -> str:
    """:func:`canonical_address` (IDNA included), remembered: a sender writes
    the same few addresses on every message."""
    return canonical_address(address)


def _named_domains(display_name: str) -> tuple[str, ...]:
    """Canonical domains a display name spells out (see :func:`_spelled_domains`),
    remembered per display name."""
    if not display_name:
        return ()
    return _named_domains_of(display_name)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _named_domains_of(display_name: str) -> tuple[str, ...]:
    return tuple(_spelled_domains(display_name))


def _spelled_domains(display_name: str) -> Iterable[str]:
    """Canonical domains a display name spells out, alone or as an address.

    NFKC folds full-width and compatibility forms (U+FF20, U+FF0E) into ASCII, the
    other IDNA dots become ".", and invisible format characters (zero-width
    space, soft hyphen) are dropped so they cannot split a name. A bare token
    counts only under a suffix the Public Suffix List knows ("Mr.Smith" does not);
    after "@" any fully qualified domain counts.
    """
    if not display_name:
        return
    text = unicodedata.normalize("NFKC", display_name).translate(_DOTS)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf").lower()
    for match in _DOMAIN_TOKEN.finditer(text):
        try:
            domain = canonical_domain(match.group(2))
        except AddressError:
            continue
        if match.group(1) or _is_registrable(domain):
            yield domain


def from_table(table: Mapping[str, Any], env: PolicyEnv) -> SenderDomains:
    """Build the check from ``[policies.sender_domains]``; ``ValueError`` names
    the key of a bad or unknown setting."""
    try:
        settings = Settings.model_validate(dict(table))
    except ValidationError as exc:
        raise settings_error(exc) from None
    _psl()  # load the list now, not on the first message
    return SenderDomains(settings, env.accounts, env.clock)
