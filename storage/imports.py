"""Exclusion-list and consent files: CSV and JSON-lines parsers, and the CSV export.

Pure functions: they read the lines they are given and return records; opening
files and writing to the store is the caller's job. A parser checks every row
and reports every bad one at once, with its line number, in
:class:`ImportProblems`; it then returns nothing, so the caller writes nothing.

Within one file a repeated key (address, account and reason for the exclusion
list; account and address for consent) is not an error: the last row wins, as
it would if the rows were written to the store one after another.
"""

from __future__ import annotations

import csv
import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import PurePath
from typing import Final, Literal, TextIO, TypeVar

from storage.addresses import AddressError, canonical_address
from storage.base import (
    NEVER_EXPIRES,
    ConsentRecord,
    ConsentSource,
    OptInType,
    Suppression,
    SuppressionReason,
)

SUPPRESSION_COLUMNS: Final = (
    "address",
    "account",
    "reason",
    "source",
    "created_at",
    "note",
    "expires_at",
)
"""Columns of an exclusion-list CSV file, in the order the export writes them."""

CONSENT_COLUMNS: Final = (
    "account",
    "address",
    "collected_at",
    "source",
    "opt_in",
    "collection_url",
    "ip",
    "confirmed_at",
    "statement",
    "relationship",
)
"""Columns (CSV) or keys (JSON lines) of a consent file."""

_SUPPRESSION_REQUIRED: Final = frozenset({"address", "reason"})
_CONSENT_REQUIRED: Final = frozenset(
    {"account", "address", "collected_at", "source", "opt_in"}
)
_NEEDS_CONFIRMATION: Final = frozenset({OptInType.CONFIRMED, OptInType.DOUBLE})
_SHOWN_CHARS = 60
_BOM = "\ufeff"

_E = TypeVar("_E", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class ImportProblem:
    """One bad row: its first physical line (1-based) and what is wrong."""

    line: int
    message: str


class ImportProblems(ValueError):  # noqa: N818 (a report of problems, named so)
    """The file has bad rows; ``problems`` lists every one. Nothing was imported."""

    def __init__(self, problems: Sequence[ImportProblem]) -> None:
        self.problems = list(problems)
        first = (
            f"; line {self.problems[0].line}: {self.problems[0].message}"
            if self.problems
            else ""
        )
        super().__init__(f"{len(self.problems)} problem(s) in the file{first}")


def detect_format(filename: str) -> Literal["csv", "jsonl"]:
    """``jsonl`` for a ``.jsonl`` or ``.ndjson`` file name, else ``csv``."""
    suffix = PurePath(filename).suffix.lower()
    return "jsonl" if suffix in {".jsonl", ".ndjson"} else "csv"


# -- reading one row -----------------------------------------------------------


def _show(value: object) -> str:
    """``value`` for a message: a string quoted, JSON as written; cut short."""
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    if len(text) > _SHOWN_CHARS:
        text = text[: _SHOWN_CHARS - 3] + "..."
    return text


def _utc(moment: datetime) -> datetime:
    # Naive timestamps in a file are taken as UTC.
    if moment.utcoffset() is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class _Fields:
    """The values of one row, read with checks; ``errors`` collects what is wrong."""

    def __init__(self, values: Mapping[str, object], label: str) -> None:
        self._values = values
        self._label = label
        self.errors: list[str] = []

    def error(self, name: str, message: str) -> None:
        """Record one problem with field ``name``."""
        self.errors.append(f"{self._label} {name!r}: {message}")

    def raw(self, name: str) -> str:
        """The value as written ("" when absent or null)."""
        value = self._values.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            self.error(name, f"expected a string, got {_show(value)}")
            return ""
        return value

    def text(self, name: str, *, required: bool = False) -> str:
        """The value without surrounding white space; "" if absent."""
        value = self.raw(name).strip()
        if required and not value:
            given = self._values.get(name)
            if given is None:
                self.error(name, "is required")
            elif isinstance(given, str):
                self.error(name, "is empty")
        return value

    def address(self, name: str) -> str | None:
        """The canonical address, or None (an error is recorded)."""
        value = self.text(name, required=True)
        if not value:
            return None
        try:
            return canonical_address(value)
        except AddressError as exc:
            self.error(name, f"{_show(value)} is not a valid address ({exc.reason})")
            return None

    def moment(self, name: str, *, required: bool = False) -> datetime | None:
        """An ISO 8601 timestamp as aware UTC; None when empty or bad."""
        value = self.text(name, required=required)
        if not value:
            return None
        try:
            return _utc(datetime.fromisoformat(value))
        except ValueError:
            self.error(name, f"{_show(value)} is not an ISO 8601 date and time")
        except OverflowError:  # in range locally, but not once moved to UTC
            self.error(name, f"{_show(value)} is out of range")
        return None

    def choice(self, name: str, enum: type[_E]) -> _E | None:
        """A required member of ``enum`` given by its value (any case)."""
        value = self.text(name, required=True)
        if not value:
            return None
        try:
            return enum(value.lower())
        except ValueError:
            allowed = ", ".join(member.value for member in enum)
            self.error(name, f"{_show(value)} is not one of: {allowed}")
            return None


# -- reading a file ------------------------------------------------------------


def _without_bom(lines: Iterable[str]) -> Iterator[str]:
    """``lines`` with a byte-order mark removed from the first one."""
    iterator = iter(lines)
    for first in iterator:
        yield first.removeprefix(_BOM)
        break
    yield from iterator


def _csv_rows(
    lines: Iterable[str],
    columns: Sequence[str],
    required: frozenset[str],
    problems: list[ImportProblem],
) -> Iterator[tuple[int, dict[str, str]]]:
    """Each non-blank data row as (first line, values by column).

    Header problems raise at once; a malformed row is added to ``problems``.
    """
    reader = csv.reader(_without_bom(lines))
    header: list[str] | None = None
    read = 0  # physical lines consumed so far; a row starts on the next one
    while True:
        start = read + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            read = reader.line_num
            problems.append(ImportProblem(start, f"malformed CSV: {exc}"))
            continue
        read = reader.line_num
        if not any(field.strip() for field in row):
            continue  # a blank line
        if header is None:
            header = [name.strip().lower() for name in row]
            _check_header(header, columns, required, start)
            continue
        if len(row) > len(header):
            problems.append(
                ImportProblem(
                    start,
                    f"{len(row)} fields but the header names {len(header)} columns",
                )
            )
            continue
        # A short row (some tools drop trailing empty fields) reads as empty.
        yield start, dict(zip(header, row, strict=False))


def _check_header(
    header: list[str], columns: Sequence[str], required: frozenset[str], line: int
) -> None:
    messages: list[str] = []
    unknown = [name for name in header if name not in columns]
    if unknown:
        messages.append(
            f"unknown column(s) {', '.join(map(repr, unknown))};"
            f" expected some of {', '.join(columns)}"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        messages.append(f"repeated column(s) {', '.join(map(repr, repeated))}")
    missing = sorted(required - set(header))
    if missing:
        messages.append(f"missing required column(s) {', '.join(missing)}")
    if messages:
        raise ImportProblems([ImportProblem(line, message) for message in messages])


def _jsonl_rows(
    lines: Iterable[str], keys: Sequence[str], problems: list[ImportProblem]
) -> Iterator[tuple[int, dict[str, object]]]:
    """Each non-blank line as (line, object); a bad one is added to ``problems``."""
    for number, line in enumerate(_without_bom(lines), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(
                ImportProblem(number, f"invalid JSON: {exc.msg} at column {exc.colno}")
            )
            continue
        except (ValueError, RecursionError):  # e.g. nesting or a huge number
            problems.append(ImportProblem(number, "invalid JSON"))
            continue
        if not isinstance(value, dict):
            problems.append(
                ImportProblem(
                    number, f"expected a JSON object, got {type(value).__name__}"
                )
            )
            continue
        unknown = [key for key in value if key not in keys]
        if unknown:
            problems.append(
                ImportProblem(
                    number,
                    f"unknown key(s) {', '.join(map(repr, unknown))};"
                    f" expected some of {', '.join(keys)}",
                )
            )
            continue
        yield number, value


# -- the exclusion list --------------------------------------------------------


def _suppression(fields: _Fields, *, source: str, now: datetime) -> Suppression | None:
    address = fields.address("address")
    account = fields.text("account") or None
    reason = fields.choice("reason", SuppressionReason)
    created_at = fields.moment("created_at") or now
    expires_at = fields.moment("expires_at")
    if reason is not None and reason in NEVER_EXPIRES and expires_at is not None:
        given = _show(fields.raw("expires_at"))
        fields.error("expires_at", f"{reason.value} entries never expire (got {given})")
    if fields.errors or address is None or reason is None:
        return None
    return Suppression(
        address=address,
        account=account,
        reason=reason,
        source=fields.raw("source") or source,
        created_at=created_at,
        note=fields.raw("note"),
        expires_at=expires_at,
    )


def parse_suppressions_csv(
    lines: Iterable[str], *, source: str, now: datetime
) -> list[Suppression]:
    """Exclusion-list entries from a CSV file with a header row.

    Columns are :data:`SUPPRESSION_COLUMNS`; ``address`` and ``reason`` are
    required. An empty ``account`` means every account; an empty ``source`` or
    ``created_at`` takes ``source`` or ``now``. Pass a text stream opened with
    ``newline=""``. Raises :class:`ImportProblems` listing every bad row.
    """
    now = _utc(now)
    problems: list[ImportProblem] = []
    entries: dict[tuple[str, str | None, SuppressionReason], Suppression] = {}
    rows = _csv_rows(lines, SUPPRESSION_COLUMNS, _SUPPRESSION_REQUIRED, problems)
    for line, values in rows:
        fields = _Fields(values, "column")
        entry = _suppression(fields, source=source, now=now)
        if entry is None:
            problems.extend(ImportProblem(line, message) for message in fields.errors)
        else:
            entries[entry.address, entry.account, entry.reason] = entry
    if problems:
        raise ImportProblems(problems)
    return list(entries.values())


def write_suppressions_csv(entries: Iterable[Suppression], out: TextIO) -> int:
    """Write ``entries`` as CSV that :func:`parse_suppressions_csv` reads back.

    ``out`` should be opened with ``newline=""``. Returns the number of entries.
    """
    writer = csv.writer(out)
    writer.writerow(SUPPRESSION_COLUMNS)
    count = 0
    for entry in entries:
        writer.writerow(
            (
                entry.address,
                entry.account or "",
                entry.reason.value,
                entry.source,
                entry.created_at.astimezone(UTC).isoformat(),
                entry.note,
                entry.expires_at.astimezone(UTC).isoformat()
                if entry.expires_at is not None
                else "",
            )
        )
        count += 1
    return count


# -- the consent ledger --------------------------------------------------------


def _consent(fields: _Fields) -> ConsentRecord | None:
    account = fields.text("account", required=True)
    address = fields.address("address")
    collected_at = fields.moment("collected_at", required=True)
    source = fields.choice("source", ConsentSource)
    opt_in = fields.choice("opt_in", OptInType)
    ip = fields.text("ip")
    if ip:
        try:
            ipaddress.ip_address(ip)  # checked, but kept as the proof gave it
        except ValueError:
            fields.error("ip", f"{_show(ip)} is not an IP address")
    confirmed_at = fields.moment("confirmed_at")
    if (
        opt_in is not None
        and opt_in in _NEEDS_CONFIRMATION
        and not fields.raw("confirmed_at").strip()
    ):
        fields.error("confirmed_at", f"is required for {opt_in.value} opt-in")
    if (
        confirmed_at is not None
        and collected_at is not None
        and confirmed_at < collected_at
    ):
        fields.error(
            "confirmed_at",
            f"{_show(fields.raw('confirmed_at'))} is before collected_at"
            f" {_show(fields.raw('collected_at'))}",
        )
    statement = fields.raw("statement")
    relationship = fields.raw("relationship")
    collection_url = fields.text("collection_url")
    if (
        fields.errors
        or address is None
        or collected_at is None
        or source is None
        or opt_in is None
    ):
        return None
    return ConsentRecord(
        account=account,
        address=address,
        collected_at=collected_at,
        source=source,
        opt_in=opt_in,
        collection_url=collection_url,
        ip=ip,
        confirmed_at=confirmed_at,
        statement=statement,
        relationship=relationship,
    )


def parse_consents(
    lines: Iterable[str], *, fmt: Literal["csv", "jsonl"]
) -> list[ConsentRecord]:
    """Consent records from a CSV file (header row) or JSON lines (one object each).

    Fields are :data:`CONSENT_COLUMNS`; ``confirmed_at`` is required for confirmed
    and double opt-in and may not precede ``collected_at``. Timestamps are ISO
    8601, naive ones taken as UTC. Raises :class:`ImportProblems` listing every
    bad row.
    """
    problems: list[ImportProblem] = []
    rows: Iterable[tuple[int, Mapping[str, object]]]
    if fmt == "jsonl":
        rows, label = _jsonl_rows(lines, CONSENT_COLUMNS, problems), "key"
    else:
        rows = _csv_rows(lines, CONSENT_COLUMNS, _CONSENT_REQUIRED, problems)
        label = "column"
    records: dict[tuple[str, str], ConsentRecord] = {}
    for line, values in rows:
        fields = _Fields(values, label)
        record = _consent(fields)
        if record is None:
            problems.extend(ImportProblem(line, message) for message in fields.errors)
        else:
            records[record.account, record.address] = record
    if problems:
        raise ImportProblems(problems)
    return list(records.values())
