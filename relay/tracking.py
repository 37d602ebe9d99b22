"""Traces feedback back to the mail that caused it: VERP and ``X-Relay-Id``.

Two signed references leave with every message of an account when
``[feedback] bounce_domain`` or ``fbl_address`` is set:

- the envelope sender given to the upstream (VERP), one per recipient:
  ``<local>+<token>@<bounce_domain>``, where ``<local>`` is the account's own
  sender local part (or ``bounce``), so a bounce comes back to the relay naming
  the message and the recipient;
- the ``X-Relay-Id: <token>`` header (added before DKIM signing), naming the
  message, which abuse reports usually quote.

A token holds the issue day, the queue id and a 16-bit hint of the recipient;
its 64-bit MAC (HMAC-SHA256 with ``[feedback] secret``) also covers the account
and the recipient, which are not in the token: they are read back from the
``sent_messages`` row the queue wrote with the message, then the MAC is checked.
So the address stays within the 64 octets a local part may have
(RFC 5321 §4.5.3.1.1), only the holder of the secret can make a token that
attributes anything, and a token names exactly one account and recipient.
Tokens are base32 in lower case: local parts that some MTA changed to lower or
upper case still read the same.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import date, timedelta

from storage.base import SentMessage

VERP = "verp"
"""The purpose of a return-path token (it names a recipient)."""
TRACK = "track"
"""The purpose of an ``X-Relay-Id`` token (it names a message)."""
HEADER = "X-Relay-Id"
"""The tracking header the relay adds, and reads back from abuse reports."""
MAX_AGE_DAYS = 60
"""Feedback for mail older than this is not attributed (bounces come within days,
abuse reports within weeks)."""
_EPOCH = date(2020, 1, 1)
_MAC_BYTES = 8
_TOKEN_BYTES = 2 + 9 + 2 + 2 + _MAC_BYTES
_TOKEN_CHARS = 37  # base32 of 23 bytes, without padding
# Copies of a stamped message are <id>.2 up to <id>.<max_recipients> (10,000).
_QUEUE_ID = re.compile(r"([0-9A-F]{17})(?:\.([1-9][0-9]{0,4}))?")
_MAX_COPY = 0xFFFF  # two bytes in the token
# ASCII only: Unicode case folding would also let U+0131 (dotless i), U+017F
# (long s) and U+212A (Kelvin sign) match.
_TOKEN = re.compile(r"[a-z2-7]{37}", re.IGNORECASE | re.ASCII)
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,24}")
_FALLBACK_LOCAL = "bounce"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


class TokenError(ValueError):
    """Not a token of this relay, or one it can no longer use."""


@dataclass(frozen=True, slots=True)
class Reference:
    """What a token's text says, before its MAC is checked."""

    token: bytes
    issued: date
    queue_id: str
    hint: int


_B32_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
"""Every pair of base32 digits, by the 10 bits they spell."""


def _b32(raw: bytes) -> str:
    """Base32 (RFC 4648) in lower case without padding: ``base64.b32encode``'s
    digits, two at a time (it runs on every message, and base64's loops in Python)."""
    bits = len(raw) * 8
    digits = -(-bits // 5)
    pairs = (digits + 1) // 2
    value = int.from_bytes(raw, "big") << (pairs * 10 - bits)
    table = _B32_PAIRS
    text = "".join(
        [table[(value >> shift) & 0x3FF] for shift in range(pairs * 10 - 10, -1, -10)]
    )
    return text[:digits]


def _queue_id(queue_id: str) -> re.Match[str] | None:
    match = _QUEUE_ID.fullmatch(queue_id)
    if match is None or int(match.group(2) or 0) > _MAX_COPY:
        return None
    return match


def trackable(queue_id: str) -> bool:
    """True if a token can name this queue id (every id the relay makes)."""
    return _queue_id(queue_id) is not None


def message_id_key(value: str | None) -> str | None:
    """The Message-ID as the relay stores and looks it up: the ``<...>`` part,
    or the stripped value; ``None`` for nothing usable."""
    if value is None:
        return None
    value = value.strip()
    start = value.find("<")
    end = value.find(">", start + 1)
    if start >= 0 and end > start + 1:
        value = value[start : end + 1]
    if not value or len(value) > 998 or not value.isprintable():
        return None
    return value


class Tracker:
    """Makes and reads the relay's tracking tokens with one key."""

    def __init__(self, secret: str, bounce_domain: str | None) -> None:
        key = hashlib.sha256(b"relay-tracking-v1:" + secret.encode()).digest()
        # Keyed once; each MAC starts from a copy (hmac.new would key it again).
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self.bounce_domain = bounce_domain

    # -- making -------------------------------------------------------------------

    def return_path(
        self,
        sender: str,
        queue_id: str,
        account: str,
        recipient: str,
        today: date,
    ) -> str:
        """The VERP envelope sender for one recipient of ``queue_id``."""
        if self.bounce_domain is None:
            raise ValueError("no bounce domain is configured")
        local = sender.rpartition("@")[0]
        if not _PLAIN_LOCAL.fullmatch(local) or ".." in local:
            local = _FALLBACK_LOCAL
        token = self._token(VERP, queue_id, account, recipient, today)
        return f"{local}+{token}@{self.bounce_domain}"

    def header(self, queue_id: str, account: str, today: date) -> bytes:
        """The ``X-Relay-Id`` line (CRLF-terminated) for ``queue_id``."""
        return (
            f"{HEADER}: {self._token(TRACK, queue_id, account, '', today)}\r\n".encode(
                "ascii"
            )
        )

    def _token(
        self, purpose: str, queue_id: str, account: str, recipient: str, today: date
    ) -> str:
        match = _queue_id(queue_id)
        if match is None:
            raise ValueError(f"queue id {queue_id!r} cannot be tracked")
        day = (today - _EPOCH).days
        payload = (
            day.to_bytes(2, "big")
            + int(match.group(1), 16).to_bytes(9, "big")
            + int(match.group(2) or 0).to_bytes(2, "big")
            + (self._hint(recipient) if recipient else 0).to_bytes(2, "big")
        )
        return _b32(payload + self._mac(purpose, payload, account, recipient))

    # -- reading ------------------------------------------------------------------

    def token_in(self, address: str | None) -> str | None:
        """The token of a VERP address (``local+token@bounce_domain``), if any."""
        if not address:
            return None
        address = address.strip().strip("<>").strip()
        local, at, domain = address.rpartition("@")
        if not at or self.bounce_domain is None:
            return None
        if domain.rstrip(".").lower() != self.bounce_domain:
            return None
        token = local.rpartition("+")[2]
        return token if _TOKEN.fullmatch(token) else None

    def read(self, token: str, today: date) -> Reference:
        """What ``token`` says (queue id, issue day, recipient hint); raise
        TokenError for text that is no token or one older than MAX_AGE_DAYS."""
        token = token.strip()
        if not _TOKEN.fullmatch(token):
            raise TokenError("malformed token")
        try:
            raw = base64.b32decode(token.upper() + "===")
        except (binascii.Error, ValueError) as exc:
            raise TokenError("malformed token") from exc
        if len(raw) != _TOKEN_BYTES or _b32(raw) != token.lower():
            # One token, one spelling: no variants through the unused last bit.
            raise TokenError("malformed token")
        issued = _EPOCH + timedelta(days=int.from_bytes(raw[0:2], "big"))
        if not timedelta(days=-1) <= today - issued <= timedelta(days=MAX_AGE_DAYS):
            raise TokenError("token has expired")
        copy = int.from_bytes(raw[11:13], "big")
        queue_id = f"{int.from_bytes(raw[2:11], 'big'):017X}"
        if len(queue_id) != 17:
            raise TokenError("malformed token")
        if copy:
            queue_id = f"{queue_id}.{copy}"
        return Reference(raw, issued, queue_id, int.from_bytes(raw[13:15], "big"))

    def recipient(self, reference: Reference, sent: SentMessage) -> str | None:
        """The recipient a genuine VERP token names in ``sent``; ``None`` if the
        token was not made by this relay for one of its recipients."""
        for candidate in sent.recipients:
            if self._hint(candidate) == reference.hint and self._genuine(
                VERP, reference, sent.account, candidate
            ):
                return candidate
        return None

    def names_message(self, reference: Reference, sent: SentMessage) -> bool:
        """True if ``reference`` is a genuine ``X-Relay-Id`` of ``sent``."""
        return reference.hint == 0 and self._genuine(TRACK, reference, sent.account, "")

    def _genuine(
        self, purpose: str, reference: Reference, account: str, recipient: str
    ) -> bool:
        payload, given = reference.token[:-_MAC_BYTES], reference.token[-_MAC_BYTES:]
        return hmac.compare_digest(
            given, self._mac(purpose, payload, account, recipient)
        )

    def _hint(self, recipient: str) -> int:
        """16 bits that pick the recipient out of the message's list (keyed, so
        a Return-Path tells an onlooker nothing about the address)."""
        return int.from_bytes(self._hmac(b"hint\x1f" + recipient.encode())[:2], "big")

    def _mac(self, purpose: str, payload: bytes, account: str, recipient: str) -> bytes:
        data = b"\x1f".join(
            (purpose.encode(), payload, account.encode(), recipient.encode())
        )
        return self._hmac(data)[:_MAC_BYTES]

    def _hmac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the tracking key."""
        mac = self._keyed.copy()
        mac.update(data)
        return mac.digest()
