"""The admin API over real HTTP: bearer auth, the exclusion list, the consent ledger."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from relay.app import Relay
from tests.conftest import ACCOUNT, StartRelay, client, message
from tests.support.upstream import CaptureUpstream

TOKEN = "t0ken"
WITH_TOKEN: dict[str, Any] = {"http": {"admin_token": TOKEN}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Reply:
    """A response read in full: status, headers and the JSON body."""

    def __init__(self, status: int, headers: dict[str, str], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def call(
    relay: Relay,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    json_body: Any = None,
    data: str | bytes | None = None,
    content_type: str | None = None,
) -> Reply:
    """One request to the relay's HTTP listener, with the admin token by default."""
    sent = dict(AUTH if headers is None else headers)
    if content_type is not None:
        sent["Content-Type"] = content_type
    url = f"http://127.0.0.1:{relay.http.port}{path}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, headers=sent, json=json_body, data=data) as response,
    ):
        text = await response.text()
        assert response.content_type == "application/json", text
        return Reply(response.status, dict(response.headers), json.loads(text))


async def test_the_api_is_disabled_without_an_admin_token(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay()
    got = await call(relay, "GET", "/api/suppressions")
    assert got.status == 503
    assert got.body == {"error": "admin API disabled: set [http] admin_token"}
    status = await call(relay, "GET", "/healthz", headers={})
    assert status.status == 200  # the rest of the listener is not affected


async def test_every_api_route_needs_the_bearer_token(start_relay: StartRelay) -> None:
    relay = await start_relay(WITH_TOKEN)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        for method, path in (
            ("GET", "/api/suppressions"),
            ("GET", "/api/consent/jane@example.org"),
            ("POST", "/api/suppressions"),
            ("GET", "/api/no-such-route"),
        ):
            got = await call(relay, method, path, headers=headers)
            assert got.status == 401, (headers, path)
            assert got.headers["WWW-Authenticate"].startswith("Bearer")
            assert "error" in got.body
    assert (await call(relay, "GET", "/api/suppressions")).status == 200
    unknown = await call(relay, "GET", "/api/no-such-route")
    assert (unknown.status, unknown.body) == (404, {"error": "Not Found"})


async def test_suppressions_added_listed_shown_and_removed_with_an_audit(
    start_relay: StartRelay, upstream: CaptureUpstream
) -> None:
    relay = await start_relay(
        {
            **WITH_TOKEN,
            "policies": {"order": ["exclusion"]},
            "accounts": {ACCOUNT: {"default_category": "marketing"}},
        }
    )
    added = await call(
        relay,
        "POST",
        "/api/suppressions",
        json_body={
            "entries": [
                {"address": "gone@Example.ORG", "reason": "unsubscribe"},
                {
                    "address": "paused@example.org",
                    "reason": "manual",
                    "account": ACCOUNT,
                    "note": "asked for a break",
                    "expires_at": "2099-01-01T00:00:00+00:00",
                },
                {"address": "trap@example.net", "reason": "spamtrap"},
            ]
        },
    )
    assert (added.status, added.body) == (201, {"added": 3})

    # An opt-out takes effect at once: the running relay refuses the address.
    smtp = await client(relay)
    try:
        errors, _ = await smtp.sendmail(
            "news@acme.example", ["gone@example.org", "stay@example.org"], message()
        )
    finally:
        await smtp.quit()
    assert set(errors) == {"gone@example.org"}
    assert errors["gone@example.org"].code == 550

    listed = await call(relay, "GET", "/api/suppressions")
    assert listed.status == 200
    assert [e["address"] for e in listed.body["entries"]] == [
        "gone@example.org",
        "paused@example.org",
        "trap@example.net",
    ]
    assert listed.body["next"] is None
    paused = listed.body["entries"][1]
    assert paused == {
        "address": "paused@example.org",
        "account": ACCOUNT,
        "reason": "manual",
        "source": "api",
        "created_at": paused["created_at"],
        "note": "asked for a break",
        "expires_at": "2099-01-01T00:00:00+00:00",
    }

    # Keyset pages: follow "next" until it is null.
    seen: list[str] = []
    path = "/api/suppressions?limit=2"
    while True:
        page = await call(relay, "GET", path)
        assert page.status == 200
        seen += [e["address"] for e in page.body["entries"]]
        if page.body["next"] is None:
            break
        path = f"/api/suppressions?limit=2&after={page.body['next']}"
    assert seen == [e["address"] for e in listed.body["entries"]]

    filtered = await call(relay, "GET", f"/api/suppressions?account={ACCOUNT}")
    assert [e["address"] for e in filtered.body["entries"]] == ["paused@example.org"]
    traps = await call(relay, "GET", "/api/suppressions?reason=spamtrap")
    assert [e["address"] for e in traps.body["entries"]] == ["trap@example.net"]

    no_why = await call(
        relay, "DELETE", "/api/suppressions/gone@example.org", json_body={}
    )
    assert no_why.status == 400
    assert "why" in no_why.body["error"]

    removed = await call(
        relay,
        "DELETE",
        "/api/suppressions/gone@EXAMPLE.org",
        json_body={"why": "re-subscribed on the website", "by": "support"},
    )
    assert removed.status == 200
    assert [(e["address"], e["reason"]) for e in removed.body["removed"]] == [
        ("gone@example.org", "unsubscribe")
    ]
    shown = await call(relay, "GET", "/api/suppressions/Gone@example.org")
    assert shown.status == 200
    assert shown.body["entries"] == []
    (audit,) = shown.body["removals"]
    assert (audit["removed_by"], audit["why"], audit["reason"]) == (
        "support",
        "re-subscribed on the website",
        "unsubscribe",
    )
    again = await call(
        relay,
        "DELETE",
        "/api/suppressions/gone@example.org",
        json_body={"why": "twice"},
    )
    assert again.status == 404

    # An account's entry is removed in that account's scope only.
    global_scope = await call(
        relay,
        "DELETE",
        "/api/suppressions/paused@example.org",
        json_body={"why": "x"},
    )
    assert global_scope.status == 404
    account_scope = await call(
        relay,
        "DELETE",
        f"/api/suppressions/paused@example.org?account={ACCOUNT}&reason=manual",
        json_body={"why": "break is over"},
    )
    assert account_scope.status == 200
    left = await call(relay, "GET", "/api/suppressions")
    assert [e["address"] for e in left.body["entries"]] == ["trap@example.net"]


async def test_a_json_batch_with_a_bad_entry_adds_nothing(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(WITH_TOKEN)
    got = await call(
        relay,
        "POST",
        "/api/suppressions",
        json_body={
            "entries": [
                {"address": "fine@example.org", "reason": "manual"},
                {"address": "not an address", "reason": "manual"},
                {
                    "address": "x@example.org",
                    "reason": "unsubscribe",
                    "expires_at": "2099-01-01T00:00:00Z",
                },
                {"address": "y@example.org", "reason": "bored"},
                "just a string",
            ]
        },
    )
    assert got.status == 400
    assert [p["index"] for p in got.body["problems"]] == [1, 2, 3, 4]
    assert "invalid address" in got.body["problems"][0]["message"]
    assert "never expire" in got.body["problems"][1]["message"]
    assert "reason must be one of" in got.body["problems"][2]["message"]
    listed = await call(relay, "GET", "/api/suppressions")
    assert listed.body["entries"] == []


async def test_csv_import_reports_problems_by_line_and_adds_nothing(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(WITH_TOKEN)
    bad = (
        "address,account,reason,note\n"
        "one@example.org,,unsubscribe,\n"
        "two@example,,manual,no dot in the domain\n"
        "three@example.org,,unknown,\n"
    )
    got = await call(
        relay, "POST", "/api/suppressions", data=bad, content_type="text/csv"
    )
    assert got.status == 400
    assert [p["line"] for p in got.body["problems"]] == [3, 4]
    assert "address" in got.body["problems"][0]["message"]
    assert (await call(relay, "GET", "/api/suppressions")).body["entries"] == []

    good = (
        "address,account,reason,note\n"
        "one@example.org,,unsubscribe,\n"
        f'two@example.org,{ACCOUNT},manual,"a note, with a comma"\n'
    )
    done = await call(
        relay,
        "POST",
        "/api/suppressions",
        data=good,
        content_type="text/csv; charset=utf-8",
    )
    assert (done.status, done.body) == (201, {"added": 2})
    two = await call(
        relay, "GET", f"/api/suppressions/two@example.org?account={ACCOUNT}"
    )
    assert [(e["note"], e["source"]) for e in two.body["entries"]] == [
        ("a note, with a comma", "api")
    ]


async def test_bad_requests_get_clear_json_errors(start_relay: StartRelay) -> None:
    relay = await start_relay(WITH_TOKEN)
    cases: list[tuple[int, str, str, dict[str, Any]]] = [
        (
            400,
            "POST",
            "/api/suppressions",
            {"data": "{not json", "content_type": "application/json"},
        ),
        (400, "POST", "/api/suppressions", {"json_body": [1, 2]}),
        (415, "POST", "/api/suppressions", {"data": "x", "content_type": "text/plain"}),
        (
            415,
            "POST",
            "/api/consent",
            {"data": "<x/>", "content_type": "application/xml"},
        ),
        (
            400,
            "POST",
            "/api/suppressions",
            {"data": b"\xff\xfe", "content_type": "text/csv"},
        ),
        (400, "GET", "/api/suppressions?reason=bored", {}),
        (400, "GET", "/api/suppressions?limit=0", {}),
        (400, "GET", "/api/suppressions?after=bm9wZQ", {}),
        (400, "GET", "/api/suppressions/not-an-address", {}),
        (405, "PUT", "/api/suppressions", {"json_body": {}}),
        (
            413,
            "DELETE",
            "/api/suppressions/a@example.org",
            {"json_body": {"why": "x" * 100_000}},
        ),
        (
            415,
            "DELETE",
            "/api/suppressions/a@example.org",
            {"data": "why", "content_type": "text/plain"},
        ),
    ]
    for status, method, path, kwargs in cases:
        got = await call(relay, method, path, **kwargs)
        assert got.status == status, (method, path, got.body)
        assert isinstance(got.body["error"], str) and got.body["error"]


async def test_a_store_failure_is_a_503(start_relay: StartRelay) -> None:
    relay = await start_relay(WITH_TOKEN)
    await relay.store.close()
    got = await call(relay, "GET", "/api/suppressions")
    assert got.status == 503
    assert "store unavailable" in got.body["error"]


CONSENT = {
    "account": ACCOUNT,
    "address": "jane@Example.ORG",
    "collected_at": "2025-03-01T10:00:00Z",
    "source": "newsletter",
    "opt_in": "double",
    "collection_url": "https://acme.example/signup",
    "ip": "203.0.113.7",
    "confirmed_at": "2025-03-01T10:05:00Z",
    "statement": "Yes, send me the Acme newsletter every week.",
}


async def test_consent_imported_as_json_lines_or_csv_and_shown(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(WITH_TOKEN)
    added = await call(relay, "POST", "/api/consent", json_body={"records": [CONSENT]})
    assert (added.status, added.body) == (201, {"added": 1})

    bad = await call(
        relay,
        "POST",
        "/api/consent",
        json_body={
            "records": [CONSENT, {**CONSENT, "opt_in": "maybe"}, {"account": ACCOUNT}]
        },
    )
    assert bad.status == 400
    assert sorted({p["index"] for p in bad.body["problems"]}) == [1, 2]

    lines = (
        json.dumps(
            {**CONSENT, "account": "other", "opt_in": "single", "confirmed_at": None}
        )
        + "\n"
        + "{broken\n"
    )
    ndjson = await call(
        relay, "POST", "/api/consent", data=lines, content_type="application/x-ndjson"
    )
    assert ndjson.status == 400
    assert [p["line"] for p in ndjson.body["problems"]] == [2]

    csv_body = (
        "account,address,collected_at,source,opt_in,relationship\n"
        "shop,jane@example.org,2021-06-01T00:00:00Z,purchase,single,customer since 2021\n"
    )
    imported = await call(
        relay, "POST", "/api/consent", data=csv_body, content_type="text/csv"
    )
    assert (imported.status, imported.body["added"]) == (201, 1)
    # "shop" is no account of this relay.toml: kept, with a warning.
    assert imported.body["warnings"] == [
        "account 'shop' is not in relay.toml: its entries match no mail"
    ]

    shown = await call(relay, "GET", "/api/consent/jane@EXAMPLE.org")
    assert shown.status == 200
    assert shown.body["address"] == "jane@example.org"
    acme, shop = shown.body["records"]
    assert acme["account"] == ACCOUNT
    assert acme["address"] == "jane@example.org"
    assert {k: acme[k] for k in ("opt_in", "ip", "collection_url", "statement")} == {
        "opt_in": "double",
        "ip": "203.0.113.7",
        "collection_url": "https://acme.example/signup",
        "statement": "Yes, send me the Acme newsletter every week.",
    }
    assert acme["confirmed_at"] == "2025-03-01T10:05:00+00:00"
    assert acme["recorded_at"] is not None
    assert (shop["account"], shop["relationship"]) == ("shop", "customer since 2021")

    missing = await call(relay, "GET", "/api/consent/nobody@example.org")
    assert missing.status == 404


async def test_odd_limits_and_token_bytes_get_clear_answers(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay({"http": {"admin_token": TOKEN}})
    base = f"http://127.0.0.1:{relay.http.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{base}/api/suppressions?limit=\u00b2", headers=AUTH
        ) as response:
            assert response.status == 400
            assert "limit" in (await response.json())["error"]
        async with http.get(
            f"{base}/api/suppressions",
            headers={"Authorization": "Bearer t\u00f6ken".encode().decode("latin-1")},
        ) as response:
            assert response.status == 401


async def test_an_empty_account_is_not_taken_for_every_account(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(WITH_TOKEN)
    refused = await call(
        relay,
        "POST",
        "/api/suppressions",
        json_body={
            "entries": [{"address": "a@example.org", "reason": "manual", "account": ""}]
        },
    )
    assert refused.status == 400
    assert "account" in json.dumps(refused.body)
    assert await relay.store.count_suppressions() == 0


async def test_entries_for_an_unknown_account_are_added_with_a_warning(
    start_relay: StartRelay,
) -> None:
    relay = await start_relay(WITH_TOKEN)
    added = await call(
        relay,
        "POST",
        "/api/suppressions",
        json_body={
            "entries": [
                {"address": "a@example.org", "reason": "manual", "account": "ghost"},
                {"address": "b@example.org", "reason": "manual", "account": ACCOUNT},
            ]
        },
    )
    assert added.status == 201
    assert added.body["added"] == 2
    assert added.body["warnings"] == [
        "account 'ghost' is not in relay.toml: its entries match no mail"
    ]
