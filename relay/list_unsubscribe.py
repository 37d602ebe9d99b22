"""The relay's own ``List-Unsubscribe`` for marketing mail that lacks one.

RFC 2369 and RFC 8058: an https URL on ``[http] public_url`` (one-click by POST,
a confirmation page on GET), optionally a mailto form, and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``. The URL carries a token
signed with ``[feedback] secret`` naming the account, the recipient and the
message, so each recipient gets a copy of their own. The headers are prepended to
the message before it is queued, so a later DKIM signature covers them.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING
from urllib.parse import quote

from relay.tokens import TokenSigner

if TYPE_CHECKING:
    from config.models import RelayConfig
    from policies.pipeline import Pipeline

UNSUBSCRIBE = "unsubscribe"
"""The purpose of unsubscribe tokens (``TokenSigner.sign``/``verify``)."""


class ListUnsubscribe:
    """Builds the header lines for one recipient of one message."""

    def __init__(
        self, signer: TokenSigner, public_url: str, mailto: str | None = None
    ) -> None:
        self._signer = signer
        self._base = public_url.rstrip("/") + "/unsubscribe/"
        self._mailto = mailto

    def token(self, account: str, recipient: str, message_id: str, today: date) -> str:
        """The signed token for this recipient of this message."""
        return self._signer.sign(UNSUBSCRIBE, (account, recipient, message_id), today)

    def headers(
        self, account: str, recipient: str, message_id: str, today: date
    ) -> bytes:
        """``List-Unsubscribe`` and ``List-Unsubscribe-Post``, CRLF-terminated."""
        token = self.token(account, recipient, message_id, today)
        uris = [f"<{self._base}{token}>"]
        if self._mailto is not None:
            subject = quote(f"unsubscribe {token}", safe="")
            uris.append(f"<mailto:{self._mailto}?subject={subject}>")
        return (
            "List-Unsubscribe: "
            + ",\r\n ".join(uris)
            + "\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode("ascii")


def list_unsubscribe_for(
    config: RelayConfig, pipeline: Pipeline
) -> ListUnsubscribe | None:
    """The stamper when the configured ``optout_link`` check says ``add``
    (``policies.registry`` has made sure ``[feedback] secret`` is set then)."""
    check = pipeline.policy("optout_link")
    secret = config.feedback.secret
    if not getattr(check, "adds_list_unsubscribe", False) or secret is None:
        return None
    return ListUnsubscribe(
        TokenSigner(secret.get_secret_value()),
        config.http.public_url,
        config.feedback.unsubscribe_mailto,
    )
