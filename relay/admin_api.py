"""The admin API under ``/api``: the exclusion list and the consent ledger over HTTP.

Every ``/api`` route needs ``Authorization: Bearer <[http] admin_token>`` (compared
in constant time); without a configured token the API answers 503. This module
owns the routes, their JSON shapes and the mapping of faults to JSON errors (never
a traceback). Parsing CSV and JSON-lines bodies is :mod:`storage.imports`' job, the
same code as ``relay suppress import`` and ``relay consent import``; the records and
the store protocols are :mod:`storage.base`'s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import SecretStr

from relay.clock import Clock
from storage.addresses import AddressError, canonical_address
from storage.base import (
    NEVER_EXPIRES,
    ConsentRecord,
    ConsentStore,
    Suppression,
    SuppressionReason,
    SuppressionRemoval,
    SuppressionStore,
)
from storage.errors import StorageError
from storage.imports import ImportProblems, parse_consents, parse_suppressions_csv

log = structlog.get_logger(__name__)

MAX_IMPORT_BYTES = 64 * 1024**2
"""Largest body of a POST (a CSV import of about a million addresses)."""
MAX_SMALL_BODY_BYTES = 64 * 1024
"""Largest body of the other requests (the reason of a removal)."""
DEFAULT_PAGE = 100
MAX_PAGE = 1000
SOURCE = "api"
DISABLED = "admin API disabled: set [http] admin_token"

_JSON = "application/json"
_CSV = "text/csv"
_NDJSON = ("application/x-ndjson", "application/jsonl", "application/json-lines")
_SUPPRESSION_KEYS = frozenset(
    {"address", "reason", "account", "note", "expires_at", "source"}
)


class AdminStore(SuppressionStore, ConsentStore, Protocol):
    """What the admin API reads and writes: the exclusion list and consent ledger."""


class ApiError(Exception):
    """A request the API refuses: answered as ``{"error": ..., "problems": [...]}``."""

    def __init__(
        self,
        status: int,
        message: str,
        problems: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = list(problems)
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The JSON error response."""
        body: dict[str, Any] = {"error": self.message}
        if self.problems:
            body["problems"] = self.problems
        return web.json_response(body, status=self.status, headers=self.headers)


def add_admin_routes(
    app: web.Application,
    store: AdminStore,
    admin_token: SecretStr | None,
    clock: Clock,
    accounts: frozenset[str] | None = None,
) -> None:
    """Mount the ``/api`` routes and their authentication on ``app``.

    ``accounts`` (the configured account names, when known) lets an import
    warn about entries for accounts relay.toml does not have.
    """
    api = _AdminApi(store, admin_token, clock, accounts)
    app.middlewares.append(api.middleware())
    router = app.router
    router.add_get("/api/suppressions", api.list_suppressions)
    router.add_post("/api/suppressions", api.add_suppressions)
    router.add_get("/api/suppressions/{address:.+}", api.show_suppressions)
    router.add_delete("/api/suppressions/{address:.+}", api.remove_suppressions)
    router.add_post("/api/consent", api.add_consents)
    router.add_get("/api/consent/{address:.+}", api.show_consents)


# -- JSON shapes (shared with ``relay suppress ... --json``) --------------------


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def suppression_json(entry: Suppression) -> dict[str, Any]:
    """One exclusion-list entry as JSON."""
    return {
        "address": entry.address,
        "account": entry.account,
        "reason": entry.reason.value,
        "source": entry.source,
        "created_at": _iso(entry.created_at),
        "note": entry.note,
        "expires_at": _iso(entry.expires_at),
    }


def removal_json(removal: SuppressionRemoval) -> dict[str, Any]:
    """One audit record of a removal as JSON."""
    return {
        "address": removal.address,
        "account": removal.account,
        "reason": removal.reason.value,
        "removed_by": removal.removed_by,
        "removed_at": _iso(removal.removed_at),
        "why": removal.why,
    }


def consent_json(record: ConsentRecord) -> dict[str, Any]:
    """One consent record (the proof) as JSON."""
    return {
        "account": record.account,
        "address": record.address,
        "collected_at": _iso(record.collected_at),
        "source": record.source.value,
        "collection_url": record.collection_url,
        "ip": record.ip,
        "opt_in": record.opt_in.value,
        "confirmed_at": _iso(record.confirmed_at),
        "statement": record.statement,
        "relationship": record.relationship,
        "recorded_at": _iso(record.recorded_at),
    }


def suppression_key(entry: Suppression) -> tuple[str, str, str]:
    """The keyset position of ``entry`` (``after`` of the next page)."""
    return (entry.address, entry.account or "", entry.reason.value)


async def suppressions_of(
    store: SuppressionStore, address: str, now: datetime, page: int = 200
) -> list[Suppression]:
    """Every active entry for canonical ``address``, global and per account.

    The keyset starts just before the address's first key, so this is one index
    range scan rather than a walk of the list. Addresses match without regard to
    ASCII case, as the store's lookups do.
    """
    found: list[Suppression] = []
    wanted = _nocase(address)
    after = (address, "", "")
    while True:
        batch = await store.list_suppressions(after=after, limit=page)
        for entry in batch:
            if _nocase(entry.address) != wanted:
                return found
            if entry.active(now):
                found.append(entry)
        if len(batch) < page:
            return found
        after = suppression_key(batch[-1])


def _nocase(address: str) -> bytes:
    # SQLite's NOCASE folds ASCII letters only; bytes.lower() does the same.
    return address.encode("utf-8", "surrogatepass").lower()


# -- the routes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AdminApi:
    store: AdminStore
    token: SecretStr | None
    clock: Clock
    accounts: frozenset[str] | None = None

    def _unknown(self, named: set[str | None]) -> dict[str, Any]:
        """``{"warnings": [...]}`` for accounts relay.toml does not have."""
        if self.accounts is None:
            return {}
        unknown = sorted(a for a in named if a is not None and a not in self.accounts)
        if not unknown:
            return {}
        return {
            "warnings": [
                f"account {name!r} is not in relay.toml: its entries match no mail"
                for name in unknown
            ]
        }

    def middleware(self) -> Middleware:
        """Authentication and JSON errors for every path under ``/api``."""

        @web.middleware
        async def admin(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path != "/api" and not request.path.startswith("/api/"):
                return await handler(request)
            try:
                self._authorise(request)
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            except web.HTTPException as exc:
                # The router's 404/405, aiohttp's own 413: JSON like the rest.
                if exc.status < 400:
                    raise
                allow = exc.headers.get("Allow")
                headers = {"Allow": allow} if allow is not None else {}
                return ApiError(exc.status, exc.reason, headers=headers).response()
            except StorageError:
                log.exception("admin_api_store_failed", path=request.path)
                return ApiError(503, "store unavailable, try again later").response()

        return admin

    def _authorise(self, request: web.Request) -> None:
        if self.token is None:
            raise ApiError(503, DISABLED)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(
                401,
                "authentication required: send Authorization: Bearer <admin_token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        expected = self.token.get_secret_value().encode("utf-8")
        if not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            raise ApiError(
                401,
                "invalid admin token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    # -- suppressions ---------------------------------------------------------

    async def list_suppressions(self, request: web.Request) -> web.Response:
        """``GET /api/suppressions?account=&reason=&after=&limit=``: one page."""
        query = request.query
        account = query.get("account") or None
        reason = _reason(query.get("reason"))
        limit = _limit(query.get("limit"))
        after = _cursor(query["after"]) if query.get("after") else None
        page = await self.store.list_suppressions(
            account=account, reason=reason, after=after, limit=limit + 1
        )
        more = len(page) > limit
        page = page[:limit]
        cursor = _make_cursor(suppression_key(page[-1])) if more else None
        return web.json_response(
            {"entries": [suppression_json(e) for e in page], "next": cursor}
        )

    async def show_suppressions(self, request: web.Request) -> web.Response:
        """``GET /api/suppressions/{address}[?account=]``: active entries, removals."""
        address = _address(request.match_info["address"])
        account = request.query.get("account") or None
        now = self.clock.now()
        if account is None:
            entries = await suppressions_of(self.store, address, now)
        else:
            entries = await self.store.suppressions_for(address, account, now)
        removals = await self.store.suppression_removals(address)
        return web.json_response(
            {
                "address": address,
                "entries": [suppression_json(e) for e in entries],
                "removals": [removal_json(r) for r in removals],
            }
        )

    async def add_suppressions(self, request: web.Request) -> web.Response:
        """``POST /api/suppressions``: a JSON ``entries`` list or a CSV body."""
        kind = request.content_type
        now = self.clock.now()
        if kind not in (_JSON, _CSV):
            raise _unsupported(kind, (_JSON, _CSV))
        raw = await _read(request, MAX_IMPORT_BYTES)
        # A million rows take seconds to parse: not on the loop that serves SMTP.
        entries = await asyncio.to_thread(_parse_suppressions, kind, raw, now)
        added = await self.store.add_suppressions(entries)
        log.info("suppressions_added", count=added, source=SOURCE)
        warnings = self._unknown({entry.account for entry in entries})
        return web.json_response({"added": added, **warnings}, status=201)

    async def remove_suppressions(self, request: web.Request) -> web.Response:
        """``DELETE /api/suppressions/{address}?account=&reason=`` with ``why``."""
        address = _address(request.match_info["address"])
        account = request.query.get("account") or None
        reason = _reason(request.query.get("reason"))
        if request.content_type != _JSON:
            raise _unsupported(request.content_type, (_JSON,))
        body = _json_body(await _read(request, MAX_SMALL_BODY_BYTES))
        if not isinstance(body, dict):
            raise ApiError(400, 'expected {"why": "...", "by": "..."}')
        why, by = body.get("why"), body.get("by", SOURCE)
        if not isinstance(why, str) or not why.strip():
            raise ApiError(400, "why is required: say why the entry is lifted")
        if not isinstance(by, str) or not by.strip():
            raise ApiError(400, "by must be a non-empty string")
        removed = await self.store.remove_suppressions(
            address,
            account,
            reason=reason,
            removed_by=by.strip(),
            why=why.strip(),
            now=self.clock.now(),
        )
        if not removed:
            scope = f"account {account}" if account else "the global list"
            raise ApiError(404, f"no matching entry for {address} in {scope}")
        log.info("suppressions_removed", count=len(removed), account=account)
        return web.json_response({"removed": [suppression_json(e) for e in removed]})

    # -- consent --------------------------------------------------------------

    async def add_consents(self, request: web.Request) -> web.Response:
        """``POST /api/consent``: ``{"records": [...]}``, JSON lines or CSV."""
        kind = request.content_type
        if kind not in (_JSON, _CSV, *_NDJSON):
            raise _unsupported(kind, (_JSON, _NDJSON[0], _CSV))
        raw = await _read(request, MAX_IMPORT_BYTES)
        records = await asyncio.to_thread(_parse_consent_body, kind, raw)
        added = await self.store.add_consents(records)
        log.info("consents_added", count=added, source=SOURCE)
        warnings = self._unknown({record.account for record in records})
        return web.json_response({"added": added, **warnings}, status=201)

    async def show_consents(self, request: web.Request) -> web.Response:
        """``GET /api/consent/{address}``: every account's proof, or 404."""
        address = _address(request.match_info["address"])
        records = await self.store.consents_of(address)
        if not records:
            raise ApiError(404, f"no consent record for {address}")
        return web.json_response(
            {"address": address, "records": [consent_json(r) for r in records]}
        )


# -- request helpers --------------------------------------------------------------


async def _read(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (read as a stream, so the
    application-wide ``client_max_size`` does not apply)."""
    too_large = ApiError(413, f"request body larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(256 * 1024):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(_text(body))
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from None


def _unsupported(kind: str, accepted: Sequence[str]) -> ApiError:
    return ApiError(
        415,
        f"unsupported Content-Type {kind or '(none)'!r}; send {' or '.join(accepted)}",
    )


def _line_problems(exc: ImportProblems) -> ApiError:
    return ApiError(
        400,
        f"{len(exc.problems)} invalid line(s); nothing was added",
        [{"line": p.line, "message": p.message} for p in exc.problems],
    )


def _address(raw: str) -> str:
    try:
        return canonical_address(raw)
    except AddressError as exc:
        raise ApiError(400, f"invalid address: {exc.reason}") from None


def _reason(raw: str | None) -> SuppressionReason | None:
    if not raw:
        return None
    try:
        return SuppressionReason(raw)
    except ValueError:
        choices = ", ".join(r.value for r in SuppressionReason)
        raise ApiError(400, f"reason must be one of {choices}") from None


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_PAGE:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_PAGE}")
    return int(raw)


def _make_cursor(key: tuple[str, str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _cursor(raw: str) -> tuple[str, str, str]:
    try:
        key = json.loads(base64.urlsafe_b64decode(raw.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        key = None
    if (
        not isinstance(key, list)
        or len(key) != 3
        or not all(isinstance(part, str) for part in key)
    ):
        raise ApiError(400, "after must be the next cursor of a previous page")
    return (key[0], key[1], key[2])


def _entries_from_json(items: list[Any], now: datetime) -> list[Suppression]:
    """Validate every item (all or nothing) into entries; ApiError lists problems."""
    problems: list[dict[str, Any]] = []
    entries: list[Suppression] = []
    for index, item in enumerate(items):
        try:
            entries.append(_entry_from_json(item, now))
        except ValueError as exc:
            problems.append({"index": index, "message": str(exc)})
    if problems:
        raise ApiError(
            400, f"{len(problems)} invalid entr(y/ies); nothing was added", problems
        )
    return entries


def _entry_from_json(item: Any, now: datetime) -> Suppression:
    if not isinstance(item, dict):
        raise ValueError("each entry must be an object")
    unknown = sorted(set(item) - _SUPPRESSION_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s): {', '.join(map(str, unknown))}")
    address = item.get("address")
    if not isinstance(address, str):
        raise ValueError("address is required")
    try:
        canonical = canonical_address(address.strip())
    except AddressError as exc:
        raise ValueError(f"invalid address {address[:80]!r}: {exc.reason}") from None
    try:
        reason = SuppressionReason(str(item.get("reason")))
    except ValueError:
        choices = ", ".join(r.value for r in SuppressionReason)
        raise ValueError(f"reason must be one of {choices}") from None
    account = item.get("account")
    if account is not None and (not isinstance(account, str) or not account.strip()):
        raise ValueError("account must be an account name, or null for every account")
    note, source = item.get("note", ""), item.get("source", SOURCE)
    if not isinstance(note, str) or not isinstance(source, str) or not source:
        raise ValueError("note and source must be strings")
    expires_at = _expiry(item.get("expires_at"), reason, now)
    return Suppression(
        address=canonical,
        account=account.strip() if account is not None else None,
        reason=reason,
        source=source,
        created_at=now,
        note=note,
        expires_at=expires_at,
    )


def _expiry(raw: Any, reason: SuppressionReason, now: datetime) -> datetime | None:
    if raw is None:
        return None
    if reason in NEVER_EXPIRES:
        raise ValueError(f"{reason.value} entries never expire: drop expires_at")
    if not isinstance(raw, str):
        raise ValueError("expires_at must be an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"expires_at {raw[:40]!r} is not an ISO 8601 time") from None
    if moment.utcoffset() is None:  # as in CSV imports: naive means UTC
        moment = moment.replace(tzinfo=UTC)
    if moment <= now:
        raise ValueError("expires_at is in the past")
    return moment


def _parse_suppressions(kind: str, raw: bytes, now: datetime) -> list[Suppression]:
    """The entries of a ``POST /api/suppressions`` body (run in a worker thread)."""
    if kind == _JSON:
        body = _json_body(raw)
        if not isinstance(body, dict) or not isinstance(body.get("entries"), list):
            raise ApiError(400, 'expected {"entries": [...]}')
        return _entries_from_json(body["entries"], now)
    try:
        return parse_suppressions_csv(
            io.StringIO(_text(raw), newline=""), source=SOURCE, now=now
        )
    except ImportProblems as exc:
        raise _line_problems(exc) from None


def _parse_consent_body(kind: str, raw: bytes) -> list[ConsentRecord]:
    """The records of a ``POST /api/consent`` body (run in a worker thread)."""
    if kind == _JSON:
        body = _json_body(raw)
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise ApiError(400, 'expected {"records": [...]}')
        # One JSON line per record: the ledger's importer validates them, and
        # its line N is the record at index N - 1.
        as_lines = [json.dumps(record) + "\n" for record in body["records"]]
        try:
            records = parse_consents(as_lines, fmt="jsonl")
        except ImportProblems as exc:
            raise ApiError(
                400,
                f"{len(exc.problems)} invalid record(s); nothing was added",
                [{"index": p.line - 1, "message": p.message} for p in exc.problems],
            ) from None
        return records
    lines = io.StringIO(_text(raw), newline="")
    try:
        return parse_consents(lines, fmt="csv" if kind == _CSV else "jsonl")
    except ImportProblems as exc:
        raise _line_problems(exc) from None
