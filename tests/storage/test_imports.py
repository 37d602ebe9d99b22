"""Tests for storage.imports: the CSV and JSON-lines parsers, their line-numbered
problem reports, and the exclusion-list CSV export's round trip."""

from __future__ import annotations

import contextlib
import io
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import (
    NEVER_EXPIRES,
    ConsentRecord,
    ConsentSource,
    ImportProblem,
    ImportProblems,
    OptInType,
    Suppression,
    SuppressionReason,
    canonical_address,
    detect_format,
    parse_consents,
    parse_suppressions_csv,
    write_suppressions_csv,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
R = SuppressionReason
HEADER = "address,account,reason,source,created_at,note,expires_at\n"


def parse(text: str) -> list[Suppression]:
    return parse_suppressions_csv(
        io.StringIO(text, newline=""), source="import", now=NOW
    )


def problems_of(text: str) -> list[ImportProblem]:
    with pytest.raises(ImportProblems) as caught:
        parse(text)
    return caught.value.problems


# -- exclusion list: good files ------------------------------------------------


def test_every_column_is_read() -> None:
    text = (
        HEADER + "Jane@Example.ORG,acme,soft_bounce,bounce,2026-02-01T10:00:00+01:00,"
        '"4.2.2, mailbox full",2026-04-01T00:00:00Z\n'
    )
    assert parse(text) == [
        Suppression(
            address="Jane@example.org",
            account="acme",
            reason=R.SOFT_BOUNCE,
            source="bounce",
            created_at=datetime(2026, 2, 1, 9, 0, tzinfo=UTC),
            note="4.2.2, mailbox full",
            expires_at=datetime(2026, 4, 1, tzinfo=UTC),
        )
    ]


def test_defaults_for_empty_and_absent_columns() -> None:
    [item] = parse("reason,address\n UNSUBSCRIBE , jane@example.org \n")
    assert item == Suppression(
        address="jane@example.org",
        account=None,
        reason=R.UNSUBSCRIBE,
        source="import",
        created_at=NOW,
    )
    [item] = parse(HEADER + "jane@example.org,,manual,,,,\n")
    assert (item.account, item.source, item.created_at) == (None, "import", NOW)


def test_naive_times_are_utc_and_aware_times_are_converted() -> None:
    [item] = parse(
        "address,reason,created_at,expires_at\n"
        "jane@example.org,manual,2026-02-01 10:00,2026-02-02T10:00-05:00\n"
    )
    assert item.created_at == datetime(2026, 2, 1, 10, 0, tzinfo=UTC)
    assert item.created_at.tzinfo is UTC
    assert item.expires_at == datetime(2026, 2, 2, 15, 0, tzinfo=UTC)
    assert item.expires_at.tzinfo is UTC


def test_byte_order_mark_blank_lines_and_crlf_are_tolerated() -> None:
    text = "\ufeffaddress,reason\r\n\r\njane@example.org,manual\r\n  \r\n,\r\n"
    assert [item.address for item in parse(text)] == ["jane@example.org"]


def test_empty_file_gives_nothing() -> None:
    assert parse("") == []
    assert parse("\n\n") == []
    assert parse("address,reason\n") == []


def test_repeated_key_keeps_the_last_row() -> None:
    text = (
        "address,account,reason,note\n"
        "jane@EXAMPLE.org,,manual,first\n"
        "jane@example.org,acme,manual,other scope\n"
        "jane@example.ORG,,manual,last\n"
    )
    found = parse(text)
    assert [(item.account, item.note) for item in found] == [
        (None, "last"),
        ("acme", "other scope"),
    ]


def test_short_rows_read_as_empty_fields() -> None:
    [item] = parse(HEADER + "jane@example.org,acme,manual\n")
    assert (item.note, item.expires_at) == ("", None)


# -- exclusion list: bad files -------------------------------------------------


def test_every_bad_row_is_reported_with_its_line() -> None:
    text = (
        HEADER  # line 1
        + "ok@example.org,,manual,,,,\n"  # 2
        + "not-an-address,,manual,,,,\n"  # 3
        + "\n"  # 4: blank, skipped
        + "ok2@example.org,,maybe,,,,\n"  # 5
        + "ok3@example.org,,unsubscribe,,,,2027-01-01\n"  # 6
        + '"multi\nline note",,manual,,,,\n'  # 7-8
        + "ok4@example.org,,manual,,yesterday,,\n"  # 9
        + ",,manual,,,,\n"  # 10
        + "ok5@example.org,,manual,,,,,extra\n"  # 11
        + "ok6@example.org,,complaint,,,,2027-01-01\n"  # 12
    )
    problems = problems_of(text)
    assert [p.line for p in problems] == [3, 5, 6, 7, 9, 10, 11, 12]
    messages = {p.line: p.message for p in problems}
    assert "'address'" in messages[3]
    assert "'not-an-address'" in messages[3]
    assert messages[5].startswith("column 'reason': 'maybe' is not one of")
    assert messages[6] == (
        "column 'expires_at': unsubscribe entries never expire (got '2027-01-01')"
    )
    assert "'yesterday'" in messages[9]
    assert "created_at" in messages[9]
    assert messages[10] == "column 'address': is empty"
    assert messages[11] == "8 fields but the header names 7 columns"


def test_a_row_with_several_bad_columns_reports_each() -> None:
    problems = problems_of("address,reason,created_at\nx,y,z\n")
    assert [p.line for p in problems] == [2, 2, 2]
    assert [p.message.split(":")[0] for p in problems] == [
        "column 'address'",
        "column 'reason'",
        "column 'created_at'",
    ]


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ("address,reason,colour\n", "unknown column(s) 'colour'"),
        ("address,account\n", "missing required column(s) reason"),
        ("reason\n", "missing required column(s) address"),
        ("address,reason,note,note\n", "repeated column(s) 'note'"),
    ],
)
def test_bad_header_is_reported_on_its_line(header: str, needle: str) -> None:
    problems = problems_of("\n\n" + header + "jane@example.org,manual\n")
    assert [p.line for p in problems] == [3]
    assert needle in problems[0].message


def test_problems_error_is_a_value_error_naming_the_first() -> None:
    with pytest.raises(ValueError, match=r"^2 problem\(s\) in the file; line 2: "):
        parse("address,reason\nx,manual\ny,manual\n")


# -- exclusion list: round trip and properties ---------------------------------

local_parts = st.from_regex(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[A-Za-z0-9_+-]{1,8}){0,2}",
    fullmatch=True,
)
labels = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=2, max_size=3).map(".".join)
addresses = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)
accounts = st.none() | st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
moments = st.datetimes(
    min_value=datetime(1971, 1, 1),  # noqa: DTZ001 (hypothesis bounds are naive)
    max_value=datetime(2200, 1, 1),  # noqa: DTZ001
    timezones=zones,
)


@st.composite
def suppressions(draw: st.DrawFn) -> Suppression:
    reason = draw(st.sampled_from(list(SuppressionReason)))
    expires = None if reason in NEVER_EXPIRES else draw(st.none() | moments)
    return Suppression(
        address=canonical_address(draw(addresses)),
        account=draw(accounts),
        reason=reason,
        source=draw(st.text(min_size=1)),
        created_at=draw(moments),
        note=draw(st.text()),
        expires_at=expires,
    )


@settings(max_examples=200)
@given(st.lists(suppressions(), max_size=8))
def test_written_entries_parse_back_identically(entries: list[Suppression]) -> None:
    out = io.StringIO(newline="")
    assert write_suppressions_csv(entries, out) == len(entries)
    expected = {(e.address, e.account, e.reason): e for e in entries}
    assert parse(out.getvalue()) == list(expected.values())


@settings(max_examples=300)
@given(st.text())
def test_junk_raises_only_import_problems(junk: str) -> None:
    for text in (junk, HEADER + junk, "address,reason\n" + junk):
        with contextlib.suppress(ImportProblems):
            parse(text)


@settings(max_examples=200)
@given(st.lists(st.text(), max_size=6))
def test_junk_lines_raise_only_import_problems(lines: list[str]) -> None:
    with contextlib.suppress(ImportProblems):
        parse_suppressions_csv(["address,reason\n", *lines], source="s", now=NOW)


@settings(max_examples=200)
@given(local_parts, domains, st.randoms(use_true_random=False))
def test_domain_case_never_changes_the_imported_address(
    local: str, domain: str, rnd: random.Random
) -> None:
    def shuffled_case(text: str) -> str:
        return "".join(c.upper() if rnd.random() < 0.5 else c for c in text)

    [imported] = parse(f"address,reason\n{local}@{shuffled_case(domain)},manual\n")
    assert imported.address == canonical_address(f"{local}@{shuffled_case(domain)}")
    assert imported.address == f"{local}@{domain}"


# -- consent -------------------------------------------------------------------

CONSENT_HEADER = (
    "account,address,collected_at,source,opt_in,collection_url,ip,confirmed_at,"
    "statement,relationship\n"
)


def consent_line(**values: object) -> str:
    base: dict[str, object] = {
        "account": "acme",
        "address": "jane@example.org",
        "collected_at": "2026-03-01T12:00:00Z",
        "source": "newsletter",
        "opt_in": "double",
        "confirmed_at": "2026-03-01T12:05:00Z",
    }
    base.update(values)
    return json.dumps({k: v for k, v in base.items() if v is not ...}) + "\n"


def consent_problems(
    lines: list[str], fmt: Literal["csv", "jsonl"] = "jsonl"
) -> list[ImportProblem]:
    with pytest.raises(ImportProblems) as caught:
        parse_consents(lines, fmt=fmt)
    return caught.value.problems


def test_consent_csv_is_read() -> None:
    text = (
        CONSENT_HEADER + "acme,Jane@EXAMPLE.org,2026-03-01 12:00,purchase,Confirmed,"
        "https://acme.example/checkout, 2001:db8::1 ,2026-03-01T13:00:00+01:00,"
        '"Yes, send offers",customer since 2021\n'
    )
    assert parse_consents(io.StringIO(text, newline=""), fmt="csv") == [
        ConsentRecord(
            account="acme",
            address="Jane@example.org",
            collected_at=NOW,
            source=ConsentSource.PURCHASE,
            opt_in=OptInType.CONFIRMED,
            collection_url="https://acme.example/checkout",
            ip="2001:db8::1",
            confirmed_at=NOW,
            statement="Yes, send offers",
            relationship="customer since 2021",
        )
    ]


def test_consent_jsonl_is_read_with_nulls_and_a_bom() -> None:
    first = "\ufeff" + consent_line(
        opt_in="single", confirmed_at=None, ip=None, statement="Weekly news"
    )
    records = parse_consents([first, "\n", consent_line(account="globex")], fmt="jsonl")
    assert [(r.account, r.opt_in, r.confirmed_at) for r in records] == [
        ("acme", OptInType.SINGLE, None),
        ("globex", OptInType.DOUBLE, NOW + timedelta(minutes=5)),
    ]
    assert records[0].statement == "Weekly news"
    assert records[0].collected_at.tzinfo is UTC


def test_consent_repeated_key_keeps_the_last() -> None:
    records = parse_consents(
        [consent_line(statement="old"), consent_line(statement="new")], fmt="jsonl"
    )
    assert [r.statement for r in records] == ["new"]


def test_consent_jsonl_problems_have_line_numbers() -> None:
    lines = [
        consent_line(),  # 1
        "[1, 2]\n",  # 2
        "{not json\n",  # 3
        "\n",  # 4
        consent_line(confirmed_at=...),  # 5: double opt-in needs confirmation
        consent_line(confirmed_at="2026-03-01T11:00:00Z"),  # 6: before collection
        consent_line(ip="192.0.2.300"),  # 7
        consent_line(account=7),  # 8
        consent_line(colour="red"),  # 9
        consent_line(source="radio", opt_in=...),  # 10: two problems
        consent_line(collected_at="soon"),  # 11
    ]
    problems = consent_problems(lines)
    assert [p.line for p in problems] == [2, 3, 5, 6, 7, 8, 9, 10, 10, 11]
    messages = [p.message for p in problems]
    assert messages[0] == "expected a JSON object, got list"
    assert messages[1].startswith("invalid JSON: ")
    assert messages[2] == "key 'confirmed_at': is required for double opt-in"
    assert messages[3] == (
        "key 'confirmed_at': '2026-03-01T11:00:00Z' is before collected_at"
        " '2026-03-01T12:00:00Z'"
    )
    assert messages[4] == "key 'ip': '192.0.2.300' is not an IP address"
    assert messages[5] == "key 'account': expected a string, got 7"
    assert messages[6].startswith("unknown key(s) 'colour'")
    assert messages[7].startswith("key 'source': 'radio' is not one of")
    assert messages[8] == "key 'opt_in': is required"
    assert messages[9] == "key 'collected_at': 'soon' is not an ISO 8601 date and time"


def test_consent_csv_problems_have_line_numbers() -> None:
    text = (
        CONSENT_HEADER
        + "acme,jane@example.org,2026-03-01,newsletter,single,,,,,\n"  # 2: fine
        + ",jane@example.org,2026-03-01,newsletter,single,,,,,\n"  # 3
        + "acme,jane@example.org,,newsletter,single,,,,,\n"  # 4
        + "acme,jane@example.org,2026-03-01,newsletter,confirmed,,,,,\n"  # 5
    )
    problems = consent_problems(io.StringIO(text, newline="").readlines(), "csv")
    assert [(p.line, p.message) for p in problems] == [
        (3, "column 'account': is empty"),
        (4, "column 'collected_at': is empty"),
        (5, "column 'confirmed_at': is required for confirmed opt-in"),
    ]


def test_consent_csv_header_needs_the_required_columns() -> None:
    problems = consent_problems(["account,address,source\n"], "csv")
    assert problems == [
        ImportProblem(1, "missing required column(s) collected_at, opt_in")
    ]


@settings(max_examples=300)
@given(st.text())
def test_consent_junk_raises_only_import_problems(junk: str) -> None:
    cases: list[tuple[Literal["csv", "jsonl"], str]] = [
        ("jsonl", junk),
        ("csv", junk),
        ("csv", CONSENT_HEADER + junk),
    ]
    for fmt, text in cases:
        with contextlib.suppress(ImportProblems):
            parse_consents(io.StringIO(text, newline=""), fmt=fmt)


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["account", "address", "collected_at", "ip", "opt_in"]),
        st.none() | st.integers() | st.text() | st.lists(st.integers(), max_size=2),
    )
)
def test_consent_odd_json_values_raise_only_import_problems(
    values: dict[str, object],
) -> None:
    with contextlib.suppress(ImportProblems):
        parse_consents([consent_line(**values)], fmt="jsonl")


# -- formats -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "fmt"),
    [
        ("list.csv", "csv"),
        ("LIST.JSONL", "jsonl"),
        ("export.ndjson", "jsonl"),
        ("consents.txt", "csv"),
        ("noextension", "csv"),
        ("dir.jsonl/file.csv", "csv"),
    ],
)
def test_detect_format(filename: str, fmt: str) -> None:
    assert detect_format(filename) == fmt
