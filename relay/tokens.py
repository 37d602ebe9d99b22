"""Signs and verifies the relay's tokens (unsubscribe links now; VERP later).

A token is ``<payload>.<mac>``, both base64url without padding. The payload holds a
version, the purpose, the issue day and the fields (account, recipient, message id
for an unsubscribe link), separated by U+001F, which canonical addresses and account
names never contain. The MAC is HMAC-SHA256 over the payload with
``[feedback] secret``, truncated to 128 bits. Nothing is stored: a token proves
itself, and only a holder of the secret can make one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import date, datetime

_VERSION = "1"
_SEP = "\x1f"
_MAC_BYTES = 16
_MAX_TOKEN = 2048


class InvalidTokenError(ValueError):
    """The token is malformed, forged, for another purpose, or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Makes and checks tokens with one secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"relay-token-v1:" + secret.encode()).digest()

    def sign(self, purpose: str, fields: tuple[str, ...], issued: date) -> str:
        """A token for ``fields`` (none may contain U+001F)."""
        if any(_SEP in field for field in (purpose, *fields)):
            raise ValueError("token fields may not contain U+001F")
        payload = _SEP.join((_VERSION, purpose, issued.isoformat(), *fields)).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(
        self,
        purpose: str,
        token: str,
        *,
        now: datetime | None = None,
        max_age_days: int | None = None,
    ) -> tuple[str, ...]:
        """The fields of a genuine ``purpose`` token; raise InvalidTokenError."""
        if len(token) > _MAX_TOKEN or token.count(".") != 1:
            raise InvalidTokenError("malformed token")
        encoded, mac = token.split(".")
        try:
            payload = _unb64(encoded)
            given = _unb64(mac)
        except (binascii.Error, ValueError) as exc:
            raise InvalidTokenError("malformed token") from exc
        if _b64(payload) != encoded or _b64(given) != mac:
            # One token, one spelling: no variants through unused base64 bits.
            raise InvalidTokenError("malformed token")
        if not hmac.compare_digest(given, self._mac(payload)):
            raise InvalidTokenError("token signature does not match")
        try:
            version, kind, issued, *fields = payload.decode().split(_SEP)
            issued_on = date.fromisoformat(issued)
        except ValueError as exc:  # pragma: no cover - only a holder of the key
            raise InvalidTokenError("malformed token") from exc
        if version != _VERSION or kind != purpose:
            raise InvalidTokenError("token is not for this purpose")
        if (
            now is not None
            and max_age_days is not None
            and (now.date() - issued_on).days > max_age_days
        ):
            raise InvalidTokenError("token has expired")
        return tuple(fields)

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
