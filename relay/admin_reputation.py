"""The admin API's reputation routes: events from the mailer, account states.

* ``POST /api/events``: a batch (``{"events": [...]}``, at most
  :data:`MAX_EVENTS`) of the mailer's own tracking: ``click``, ``unsubscribe``,
  ``complaint`` or ``bounce``, each ``{"kind", "account", "recipient", "id",
  "occurred_at"?, "status"?, "bounce_type"?, "detail"?}``. ``id`` is the mailer's
  unique id of the event: the same id twice counts once. All or nothing: one bad
  item refuses the batch (``400`` naming each by index).
* ``GET /api/accounts``, ``GET /api/accounts/{name}``: states and rates.
* ``POST /api/accounts/{name}/reinstate`` ``{"reason", "by"?}``.

Authentication and JSON errors are :mod:`relay.admin_api`'s middleware (every
``/api`` path).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from relay.accounts import Accounts, AccountStatus
from relay.admin_api import ApiError, _json_body, _read
from relay.clock import Clock
from relay.feedback import Feedback
from relay.metrics import Metrics
from storage.addresses import AddressError, canonical_address
from storage.base import BounceType, Event, EventKind

MAX_EVENTS = 10_000
MAX_BODY_BYTES = 8 * 1024 * 1024
_KINDS = {
    "click": EventKind.CLICK,
    "unsubscribe": EventKind.UNSUBSCRIBE,
    "complaint": EventKind.COMPLAINT,
    "bounce": EventKind.BOUNCE,
}
_FIELDS = frozenset(
    {"kind", "account", "recipient", "id", "occurred_at", "status", "bounce_type"}
    | {"detail"}
)


def add_reputation_routes(
    app: web.Application,
    feedback: Feedback,
    accounts: Accounts,
    names: frozenset[str],
    clock: Clock,
    metrics: Metrics,
) -> None:
    """Mount the routes on ``app`` (behind the admin middleware)."""
    api = _ReputationApi(feedback, accounts, names, clock, metrics)
    app.router.add_post("/api/events", api.add_events)
    app.router.add_get("/api/accounts", api.list_accounts)
    app.router.add_get("/api/accounts/{name}", api.show_account)
    app.router.add_post("/api/accounts/{name}/reinstate", api.reinstate)


def status_json(status: AccountStatus) -> dict[str, Any]:
    """The JSON shape of one account's status."""
    totals = status.totals
    standing = status.standing
    return {
        "account": status.account,
        "state": status.state.value,
        "reason": standing.reason if standing else None,
        "since": standing.changed_at.isoformat() if standing else None,
        "changed_by": standing.changed_by if standing else None,
        "rates_call_for": status.judgement.state.value,
        "window_seconds": status.window_seconds,
        "counts": {
            "sent": totals.sent,
            "delivered": totals.delivered,
            "bounces": totals.bounces,
            "blocks": totals.blocks,
            "unsubscribes": totals.unsubscribes,
            "complaints": totals.complaints,
            "complaints_24h": totals.complaints_24h,
            "clicks": totals.clicks,
            "spamtrap_hits": totals.spamtrap_hits,
        },
        "rates": [
            {
                "statistic": r.statistic.value,
                "value": r.value,
                "threshold": r.limit,
                "ratio": None if r.ratio == float("inf") else round(r.ratio, 4),
                "count": r.count,
                "base": r.base,
                "judged": r.judged,
                "breached": r.breached,
                "action": r.action.value,
            }
            for r in status.judgement.readings
        ],
        "changes": [
            {
                "at": c.changed_at.isoformat(),
                "from": c.old_state.value,
                "to": c.new_state.value,
                "by": c.changed_by,
                "reason": c.reason,
            }
            for c in status.changes
        ],
    }


class _ReputationApi:
    def __init__(
        self,
        feedback: Feedback,
        accounts: Accounts,
        names: frozenset[str],
        clock: Clock,
        metrics: Metrics,
    ) -> None:
        self._feedback = feedback
        self._accounts = accounts
        self._names = names
        self._clock = clock
        self._metrics = metrics

    async def add_events(self, request: web.Request) -> web.Response:
        """``POST /api/events``: record a batch, all or nothing."""
        body = _json_body(await _read(request, MAX_BODY_BYTES))
        items = body.get("events") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise ApiError(400, 'expected {"events": [...]} or a JSON array')
        if len(items) > MAX_EVENTS:
            raise ApiError(413, f"at most {MAX_EVENTS} events per request")
        events: list[Event] = []
        problems: list[dict[str, Any]] = []
        now = self._clock.now()
        for index, item in enumerate(items):
            try:
                events.append(self._event(item, now))
            except ValueError as exc:
                problems.append({"index": index, "error": str(exc)})
        if problems:
            self._metrics.feedback_received_total.labels("api", "invalid").inc(
                len(problems)
            )
            raise ApiError(400, "no event recorded: fix these", problems[:100])
        new = await self._feedback.record(events)
        self._metrics.feedback_received_total.labels("api", "recorded").inc(len(new))
        self._metrics.feedback_received_total.labels("api", "duplicate").inc(
            len(events) - len(new)
        )
        return web.json_response(
            {"recorded": len(new), "duplicates": len(events) - len(new)}
        )

    def _event(self, item: Any, now: datetime) -> Event:
        if not isinstance(item, Mapping):
            raise ValueError("each event must be a JSON object")
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        kind = _KINDS.get(str(item.get("kind", "")))
        if kind is None:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}")
        account = item.get("account")
        if not isinstance(account, str) or account not in self._names:
            raise ValueError(f"unknown account {account!r}")
        recipient = item.get("recipient")
        if not isinstance(recipient, str):
            raise ValueError("recipient must be an address")
        try:
            address = canonical_address(recipient)
        except AddressError as exc:
            raise ValueError(f"recipient: {exc.reason}") from None
        ident = item.get("id")
        if not isinstance(ident, str) or not 0 < len(ident) <= 200:
            raise ValueError("id must be the event's unique id (1-200 characters)")
        occurred = _when(item.get("occurred_at"), now)
        status = item.get("status")
        if status is not None and not isinstance(status, str):
            raise ValueError("status must be a string such as 5.1.1")
        detail = item.get("detail")
        if detail is not None and not isinstance(detail, str):
            raise ValueError("detail must be a string")
        bounce_type = None
        if kind is EventKind.BOUNCE:
            raw = item.get("bounce_type", "hard")
            if raw not in ("hard", "soft"):
                raise ValueError("bounce_type must be hard or soft")
            bounce_type = BounceType(raw)
        return Event(
            kind=kind,
            account=account,
            recipient=address,
            occurred_at=occurred,
            source="api",
            status=status,
            detail=detail[:500] if detail else None,
            bounce_type=bounce_type,
            dedup_key=f"api:{account}:{kind.value}:{ident}",
        )

    async def list_accounts(self, request: web.Request) -> web.Response:
        """``GET /api/accounts``."""
        rows = [
            status_json(await self._accounts.status(name, changes=0))
            for name in sorted(self._names)
        ]
        return web.json_response({"accounts": rows})

    async def show_account(self, request: web.Request) -> web.Response:
        """``GET /api/accounts/{name}``."""
        name = self._known(request)
        return web.json_response(status_json(await self._accounts.status(name)))

    async def reinstate(self, request: web.Request) -> web.Response:
        """``POST /api/accounts/{name}/reinstate`` ``{"reason", "by"?}``."""
        name = self._known(request)
        body = _json_body(await _read(request, 64 * 1024))
        reason = body.get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip():
            raise ApiError(400, "reason is required: say why")
        by = body.get("by") if isinstance(body, dict) else None
        who = by.strip()[:100] if isinstance(by, str) and by.strip() else "api"
        await self._accounts.reinstate(name, reason.strip()[:500], who)
        return web.json_response(status_json(await self._accounts.status(name)))

    def _known(self, request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in self._names:
            raise ApiError(404, f"unknown account {name!r}")
        return name


def _when(raw: Any, now: datetime) -> datetime:
    if raw is None:
        return now
    if not isinstance(raw, str):
        raise ValueError("occurred_at must be an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError("occurred_at must be an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError("occurred_at needs a time zone (e.g. Z or +00:00)")
    moment = moment.astimezone(UTC)
    if moment > now:
        return now  # a clock ahead of ours: count it now
    return moment
