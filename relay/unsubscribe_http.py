"""``/unsubscribe/<token>``: RFC 8058 one-click unsubscribe and its confirmation page.

* ``POST`` with the form body ``List-Unsubscribe=One-Click`` (what mailbox
  providers send, RFC 8058 section 3.1): the recipient is excluded from the
  account's marketing mail at once; ``200`` with a short text, never a redirect.
* ``GET`` never unsubscribes by itself (link scanners and previews follow links):
  it shows a small plain-HTML page with one button, which ``POST``s ``confirm=yes``
  back, and a field for the person's other addresses to exclude too.
* A malformed token is ``400``; a forged, expired or foreign one ``404``. Neither
  changes anything. A repeated request answers the same and counts once.

The token is the only credential: it was signed with ``[feedback] secret`` for one
account, recipient and message (:mod:`relay.list_unsubscribe`).
"""

from __future__ import annotations

from html import escape

import structlog
from aiohttp import web

from relay.feedback import MAX_OTHER_ADDRESSES, Feedback
from relay.metrics import Metrics
from relay.tokens import InvalidTokenError
from storage.addresses import AddressError, canonical_address
from storage.errors import StorageError

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 16 * 1024
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
    ),
}
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:34em;margin:3em auto;"
    "padding:0 1em;line-height:1.5}button{font-size:1em;padding:.5em 1.5em}"
    "textarea{width:100%}"
)


def add_unsubscribe_routes(
    app: web.Application, feedback: Feedback, metrics: Metrics
) -> None:
    """Mount ``GET|POST /unsubscribe/{token}`` on ``app``."""
    pages = _Pages(feedback, metrics)
    app.router.add_get("/unsubscribe/{token}", pages.show)
    app.router.add_post("/unsubscribe/{token}", pages.submit)


def _page(title: str, body: str, status: int = 200) -> web.Response:
    html = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(
        text=html, content_type="text/html", status=status, headers=_HEADERS
    )


class _Pages:
    def __init__(self, feedback: Feedback, metrics: Metrics) -> None:
        self._feedback = feedback
        self._metrics = metrics

    def _count(self, channel: str, result: str) -> None:
        self._metrics.feedback_received_total.labels(channel, result).inc()

    def _invalid(self, channel: str, exc: InvalidTokenError) -> web.Response:
        self._count(channel, "invalid")
        log.info("unsubscribe_token_refused", channel=channel, reason=str(exc))
        malformed = "malformed" in str(exc)
        return _page(
            "Link not valid",
            "<p>This unsubscribe link is not valid"
            f"{' (it is damaged)' if malformed else ' (or no longer valid)'}. "
            "Use the link in a recent message, or reply to the sender.</p>",
            status=400 if malformed else 404,
        )

    async def show(self, request: web.Request) -> web.Response:
        """The confirmation page: nothing changes until its button is pressed."""
        try:
            account, recipient, _ = self._feedback.read_token(
                request.match_info["token"]
            )
        except InvalidTokenError as exc:
            return self._invalid("page", exc)
        return _page(
            "Unsubscribe",
            f"<p>Stop marketing mail from <strong>{escape(account)}</strong> to "
            f"<strong>{escape(recipient)}</strong>?</p>"
            '<form method="post"><input type="hidden" name="confirm" value="yes">'
            '<p><label for="others">Other addresses of yours that should get no '
            f"more of it (optional, one per line, up to {MAX_OTHER_ADDRESSES}):"
            '</label><br><textarea id="others" name="others" rows="3"></textarea>'
            '</p><p><button type="submit">Unsubscribe</button></p></form>',
        )

    async def submit(self, request: web.Request) -> web.Response:
        """One-click (RFC 8058) or the page's button."""
        token = request.match_info["token"]
        if (request.content_length or 0) > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY_BYTES, actual_size=request.content_length or 0
            )
        # RFC 8058 section 3.1: providers send multipart/form-data or a
        # url-encoded body; aiohttp reads both (and refuses oversized ones).
        try:
            form = await request.post()
        except ValueError:
            self._count("page", "invalid")
            return web.Response(text="unreadable form\n", status=400, headers=_HEADERS)
        one_click = form.get("List-Unsubscribe") == "One-Click"
        channel = "one_click" if one_click else "page"
        if not one_click and form.get("confirm") != "yes":
            self._count(channel, "invalid")
            return web.Response(
                text="expected List-Unsubscribe=One-Click (RFC 8058) or the "
                "page's form\n",
                status=400,
                headers=_HEADERS,
            )
        typed = form.get("others", "")
        others, bad = _addresses(typed if isinstance(typed, str) else "")
        try:
            done = await self._feedback.unsubscribe_token(
                token, source=channel.replace("_", "-"), others=others
            )
        except InvalidTokenError as exc:
            return self._invalid(channel, exc)
        except StorageError:
            log.exception("unsubscribe_not_recorded", channel=channel)
            self._count(channel, "error")
            return web.Response(
                text="temporarily unavailable, please try again in a minute\n",
                status=503,
                headers={**_HEADERS, "Retry-After": "60"},
            )
        self._count(channel, "recorded" if done.new else "duplicate")
        if one_click:
            return web.Response(text="unsubscribed\n", headers=_HEADERS)
        extra = (
            f"<p>Also excluded: {len(others)} other address(es).</p>" if others else ""
        )
        skipped = (
            f"<p>Not understood as addresses: {escape(', '.join(bad[:5]))}.</p>"
            if bad
            else ""
        )
        return _page(
            "Unsubscribed",
            f"<p><strong>{escape(done.recipient)}</strong> will get no more "
            f"marketing mail from <strong>{escape(done.account)}</strong>.</p>"
            f"{extra}{skipped}",
        )


def _addresses(text: str) -> tuple[list[str], list[str]]:
    """The canonical addresses in ``text`` (one per line or comma-separated),
    and what could not be read."""
    good: list[str] = []
    bad: list[str] = []
    for line in text.replace(",", "\n").splitlines():
        item = line.strip()
        if not item:
            continue
        try:
            good.append(canonical_address(item))
        except AddressError:
            bad.append(item[:80])
        if len(good) + len(bad) >= MAX_OTHER_ADDRESSES * 2:
            break
    return list(dict.fromkeys(good))[:MAX_OTHER_ADDRESSES], bad
