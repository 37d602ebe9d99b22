"""`relay check`, `relay suppress` and `relay consent` against a real relay.toml
and a real SQLite store (no relay running)."""

from __future__ import annotations

import csv
import io
import json
from email.utils import formatdate, make_msgid
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from tests.conftest import ACCOUNT, PASSWORD_HASH

ORDER = [
    "exclusion",
    "consent",
    "header_sanity",
    "sender_domains",
    "optout_link",
    "content_categories",
]


def write_config(tmp_path: Path, policies: str = "") -> Path:
    """A relay.toml with every DATA check and one account owning acme.example."""
    path = tmp_path / "relay.toml"
    path.write_text(
        f"""
[storage]
url = "sqlite:///{tmp_path}/relay.db"
min_free_space = 0
[http]
public_url = "https://relay.acme.example"
[feedback]
secret = "a-long-enough-secret-for-unsubscribe-links"
[policies]
mode = "enforce"
order = {json.dumps(ORDER)}
{policies}
[accounts.{ACCOUNT}]
password_hash = "{PASSWORD_HASH}"
domains = {{ "acme.example" = 2020-01-15 }}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    return write_config(tmp_path)


def relay(toml: Path, *args: str, stdin: str | None = None) -> Result:
    """``relay ARGS -c TOML`` in this process; stdout and stderr kept apart."""
    return CliRunner().invoke(main, [*args, "-c", str(toml)], input=stdin)


def eml(
    tmp_path: Path,
    name: str,
    *,
    sender: str = "News <news@acme.example>",
    category: str = "transactional",
    body: str = "Your receipt for order 1234.\n",
    extra: str = "",
) -> Path:
    """A message file as mail clients save them: LF line endings."""
    path = tmp_path / name
    path.write_text(
        f"From: {sender}\n"
        "To: Jane <jane@example.org>\n"
        "Subject: Your order\n"
        f"Date: {formatdate()}\n"
        f"Message-ID: {make_msgid(domain='acme.example')}\n"
        f"X-Relay-Category: {category}\n"
        f"{extra}"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n"
        f"{body}",
        encoding="utf-8",
    )
    return path


# -- relay check ------------------------------------------------------------------


def test_check_accepts_a_clean_transactional_message(
    toml: Path, tmp_path: Path
) -> None:
    result = relay(
        toml, "check", str(eml(tmp_path, "receipt.eml")), "--account", ACCOUNT
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"account:  {ACCOUNT}" in out
    assert "kind:     transactional (header)" in out
    assert "decision: accepted" in out
    assert "reply:    250 2.0.0" in out
    for name in ("core", *ORDER):
        assert any(line.split()[:2] == [name, "pass"] for line in out.splitlines()), (
            name
        )


def test_check_refuses_marketing_without_an_optout_link(
    toml: Path, tmp_path: Path
) -> None:
    path = eml(
        tmp_path,
        "promo.eml",
        category="marketing",
        body="Big sale this week only!\n",
    )
    result = relay(toml, "check", str(path), "--account", ACCOUNT, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["classification"] == {"kind": "marketing", "reason": "header"}
    assert report["mail_from"] == "news@acme.example"
    assert report["recipients"] == ["jane@example.org"]
    assert [v["policy"] for v in report["verdicts"]] == ["core", *ORDER]
    optout = next(v for v in report["verdicts"] if v["policy"] == "optout_link")
    assert (optout["outcome"], optout["mode"]) == ("refuse", "enforce")
    decision = report["decision"]
    assert (decision["accepted"], decision["policy"]) == (False, "optout_link")
    assert decision["reply"].startswith("550 5.7.1 Refused by policy optout_link: ")
    assert optout["detail"] in decision["reply"]


def test_check_refuses_a_from_of_another_domain_and_runs_every_check(
    toml: Path, tmp_path: Path
) -> None:
    path = eml(
        tmp_path,
        "spoof.eml",
        sender="Bank <security@bank.example>",
        category="marketing",
        body="Please confirm your account.\n",
    )
    result = relay(toml, "check", str(path), "--account", ACCOUNT, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    outcomes = {v["policy"]: v["outcome"] for v in report["verdicts"]}
    # Both refuse; every check ran; the first in order decides, as in the relay.
    assert outcomes["sender_domains"] == "refuse"
    assert outcomes["optout_link"] == "refuse"
    assert "content_categories" in outcomes
    assert report["decision"]["policy"] == "sender_domains"
    assert report["decision"]["reply"].startswith(
        "550 5.7.1 Refused by policy sender_domains: "
    )

    text = relay(toml, "check", str(path), "--account", ACCOUNT)
    assert text.exit_code == 1
    assert "decision: refused by sender_domains (from_domain_not_owned)" in text.stdout
    assert "reply:    550 5.7.1 Refused by policy sender_domains" in text.stdout


def test_check_monitor_mode_reports_but_does_not_refuse(tmp_path: Path) -> None:
    toml = write_config(tmp_path, '[policies.optout_link]\nmode = "monitor"\n')
    path = eml(tmp_path, "promo.eml", category="marketing", body="Sale!\n")
    result = relay(toml, "check", str(path), "--account", ACCOUNT, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    optout = next(v for v in report["verdicts"] if v["policy"] == "optout_link")
    assert (optout["outcome"], optout["mode"]) == ("refuse", "monitor")
    assert report["decision"]["accepted"] is True
    assert report["decision"]["reply"].startswith("250 2.0.0")


def test_check_core_refusals_bad_category_and_broken_headers(
    toml: Path, tmp_path: Path
) -> None:
    bad_category = eml(tmp_path, "odd.eml", category="newsletter")
    result = relay(toml, "check", str(bad_category), "--account", ACCOUNT, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["classification"] is None
    assert report["verdicts"][0]["policy"] == "core"
    assert report["verdicts"][0]["reason"] == "bad_category"
    assert report["decision"]["reply"].startswith("550 5.6.0 Message refused: ")

    broken = tmp_path / "broken.eml"
    broken.write_bytes(b"this is not a header line\n\nbody\n")
    result = relay(toml, "check", str(broken), "--account", ACCOUNT)
    assert result.exit_code == 1
    assert "malformed_message" in result.stdout
    assert "550 5.6.0" in result.stdout


def test_check_envelope_options(toml: Path, tmp_path: Path) -> None:
    path = eml(tmp_path, "receipt.eml")
    result = relay(
        toml,
        "check",
        str(path),
        "--account",
        ACCOUNT,
        "--mail-from",
        "bounces@Acme.Example",
        "--rcpt",
        "a@example.org",
        "--rcpt",
        "b@example.org",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mail_from"] == "bounces@acme.example"
    assert report["recipients"] == ["a@example.org", "b@example.org"]
    bad = relay(toml, "check", str(path), "--account", ACCOUNT, "--rcpt", "nope")
    assert bad.exit_code == 2
    assert "invalid address 'nope'" in bad.stderr


def test_check_bad_input_exits_2(toml: Path, tmp_path: Path) -> None:
    missing = relay(toml, "check", str(tmp_path / "nope.eml"), "--account", ACCOUNT)
    assert missing.exit_code == 2
    assert "cannot read" in missing.stderr and "nope.eml" in missing.stderr
    assert missing.stdout == ""

    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"\n")
    result = relay(toml, "check", str(empty), "--account", ACCOUNT)
    assert (result.exit_code, "is empty" in result.stderr) == (2, True)

    unknown = relay(toml, "check", str(eml(tmp_path, "m.eml")), "--account", "nobody")
    assert unknown.exit_code == 2
    assert "unknown account 'nobody'" in unknown.stderr
    assert ACCOUNT in unknown.stderr  # names the accounts that exist

    broken_config = tmp_path / "broken.toml"
    broken_config.write_text('[policies]\norder = ["no_such_check"]\n')
    bad = relay(
        broken_config, "check", str(eml(tmp_path, "m.eml")), "--account", ACCOUNT
    )
    assert bad.exit_code == 2
    assert "no_such_check" in bad.stderr


# -- relay suppress -----------------------------------------------------------------


def rows(result: Result) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_suppress_add_list_show_and_remove_with_an_audit(toml: Path) -> None:
    added = relay(
        toml,
        "suppress",
        "add",
        "jane@Example.ORG",
        "joe@example.org",
        "--reason",
        "unsubscribe",
        "--note",
        "asked by phone",
    )
    assert added.exit_code == 0, added.output
    assert "added jane@example.org (unsubscribe, every account)" in added.stdout
    assert "2 entries added" in added.stdout
    paused = relay(
        toml,
        "suppress",
        "add",
        "jane@example.org",
        "--reason",
        "manual",
        "--account",
        ACCOUNT,
        "--expires",
        "30d",
    )
    assert paused.exit_code == 0, paused.output

    listed = relay(toml, "suppress", "list", "--json")
    assert listed.exit_code == 0
    assert [(r["address"], r["account"], r["reason"]) for r in rows(listed)] == [
        ("jane@example.org", None, "unsubscribe"),
        ("jane@example.org", ACCOUNT, "manual"),
        ("joe@example.org", None, "unsubscribe"),
    ]
    assert rows(listed)[0]["source"] == "cli"
    assert rows(listed)[0]["note"] == "asked by phone"
    assert rows(listed)[1]["expires_at"] is not None
    only = relay(toml, "suppress", "list", "--account", ACCOUNT, "--json")
    assert [r["reason"] for r in rows(only)] == ["manual"]
    one = relay(toml, "suppress", "list", "--limit", "1")
    assert "1 entry (more: raise --limit or use export)" in one.stdout
    table = relay(toml, "suppress", "list", "--reason", "unsubscribe")
    assert "joe@example.org" in table.stdout and "2 entries" in table.stdout

    shown = relay(toml, "suppress", "show", "Jane@EXAMPLE.org")  # any ASCII case
    assert shown.exit_code == 0
    assert "unsubscribe for every account" in shown.stdout
    assert f"manual for account {ACCOUNT}" in shown.stdout

    removed = relay(
        toml,
        "suppress",
        "remove",
        "jane@example.org",
        "--why",
        "re-subscribed on the website",
        "--by",
        "alice",
    )
    assert removed.exit_code == 0, removed.output
    assert "removed jane@example.org (unsubscribe, every account)" in removed.stdout
    again = relay(
        toml, "suppress", "remove", "jane@example.org", "--why", "twice", "--by", "bob"
    )
    assert again.exit_code == 1
    assert "no entry for jane@example.org in the global list" in again.stderr

    audit = relay(toml, "suppress", "show", "jane@example.org", "--json")
    assert audit.exit_code == 0  # the account's own entry still applies
    body = json.loads(audit.stdout)
    assert [e["reason"] for e in body["entries"]] == ["manual"]
    (removal,) = body["removals"]
    assert (removal["removed_by"], removal["why"], removal["reason"]) == (
        "alice",
        "re-subscribed on the website",
        "unsubscribe",
    )
    gone = relay(
        toml,
        "suppress",
        "remove",
        "jane@example.org",
        "--account",
        ACCOUNT,
        "--reason",
        "manual",
        "--why",
        "break is over",
    )
    assert gone.exit_code == 0
    nothing = relay(toml, "suppress", "show", "jane@example.org")
    assert nothing.exit_code == 1
    assert "no active entry" in nothing.stdout
    assert "removed: manual for account acme" in nothing.stdout


def test_suppress_add_refuses_bad_input_and_writes_nothing(toml: Path) -> None:
    bad = relay(
        toml,
        "suppress",
        "add",
        "ok@example.org",
        "not-an-address",
        "--reason",
        "manual",
    )
    assert bad.exit_code == 2
    assert "not-an-address" in bad.stderr
    forever = relay(
        toml,
        "suppress",
        "add",
        "ok@example.org",
        "--reason",
        "complaint",
        "--expires",
        "30d",
    )
    assert forever.exit_code == 2
    assert "complaint entries never expire" in forever.stderr
    stranger = relay(
        toml,
        "suppress",
        "add",
        "ok@example.org",
        "--reason",
        "manual",
        "--account",
        "x",
    )
    assert stranger.exit_code == 2
    assert relay(toml, "suppress", "list", "--json").stdout == ""


def test_suppress_import_reports_every_bad_line_and_writes_nothing(
    toml: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "list.csv"
    bad.write_text(
        "address,account,reason,note\n"
        "one@example.org,,unsubscribe,\n"
        "two@example,,manual,\n"
        "three@example.org,,nope,\n"
        "four@example.org,,manual,fine\n",
        encoding="utf-8",
    )
    result = relay(toml, "suppress", "import", str(bad))
    assert result.exit_code == 2
    problems = [
        line for line in result.stderr.splitlines() if line.startswith(str(bad))
    ]
    assert [line.split(":")[1] for line in problems] == ["3", "4"]
    assert "no entries imported" in result.stderr
    assert relay(toml, "suppress", "list", "--json").stdout == ""

    missing = relay(toml, "suppress", "import", str(tmp_path / "none.csv"))
    assert missing.exit_code == 2


def test_suppress_export_round_trips_through_import(toml: Path, tmp_path: Path) -> None:
    source = tmp_path / "big.csv"
    with source.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["address", "account", "reason", "note", "expires_at"])
        for n in range(12_345):  # more than two keyset pages
            writer.writerow(
                [
                    f"user{n:05d}@example.org",
                    ACCOUNT if n % 3 == 0 else "",
                    "manual" if n % 2 else "unsubscribe",
                    'a note, with "quotes"\nand a line break' if n % 1000 == 0 else "",
                    "2099-01-01T00:00:00Z" if n % 2 else "",
                ]
            )
    imported = relay(toml, "suppress", "import", str(source), "--source", "crm")
    assert imported.exit_code == 0, imported.output
    assert "imported 12345 entries" in imported.stdout

    first = tmp_path / "export1.csv"
    exported = relay(toml, "suppress", "export", str(first))
    assert exported.exit_code == 0, exported.output
    assert "exported 12345 entries" in exported.stdout
    stdout = relay(toml, "suppress", "export")
    assert stdout.exit_code == 0
    assert stdout.stdout == first.read_text(encoding="utf-8")

    # Into an empty store and out again: the same file.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = write_config(other_dir)
    again = relay(other, "suppress", "import", str(first))
    assert again.exit_code == 0, again.output
    second = tmp_path / "export2.csv"
    assert relay(other, "suppress", "export", str(second)).exit_code == 0
    assert second.read_bytes() == first.read_bytes()

    parsed = list(csv.DictReader(io.StringIO(first.read_text(encoding="utf-8"))))
    assert len(parsed) == 12_345
    assert parsed[0]["note"] == 'a note, with "quotes"\nand a line break'
    assert {row["source"] for row in parsed} == {"crm"}

    only = relay(toml, "suppress", "export", "--account", ACCOUNT, "--reason", "manual")
    assert only.exit_code == 0
    filtered = list(csv.DictReader(io.StringIO(only.stdout)))
    assert len(filtered) == len([n for n in range(12_345) if n % 3 == 0 and n % 2])


# -- relay consent --------------------------------------------------------------------

CONSENT_CSV = (
    "account,address,collected_at,source,opt_in,collection_url,ip,confirmed_at,"
    "statement,relationship\n"
    f"{ACCOUNT},jane@Example.ORG,2025-03-01T10:00:00Z,newsletter,double,"
    "https://acme.example/signup,203.0.113.7,2025-03-01T10:05:00Z,"
    '"Yes, send me the Acme newsletter.",\n'
    "shop,jane@example.org,2021-06-01T00:00:00Z,purchase,single,,,,,"
    "customer since 2021\n"
)


def test_consent_import_and_show_print_the_full_proof(
    toml: Path, tmp_path: Path
) -> None:
    path = tmp_path / "consent.csv"
    path.write_text(CONSENT_CSV, encoding="utf-8")
    imported = relay(toml, "consent", "import", str(path))
    assert imported.exit_code == 0, imported.output
    assert "imported 2 records" in imported.stdout
    assert "shop" in imported.stderr  # warned: not an account of this relay

    shown = relay(toml, "consent", "show", "JANE@example.org")
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    for expected in (
        f"account:         {ACCOUNT}",
        "address:         jane@example.org",
        "collected at:    2025-03-01T10:00:00+00:00",
        "source:          newsletter",
        "collection URL:  https://acme.example/signup",
        "IP address:      203.0.113.7",
        "opt-in type:     double",
        "confirmed at:    2025-03-01T10:05:00+00:00",
        "statement:       Yes, send me the Acme newsletter.",
        "account:         shop",
        "relationship:    customer since 2021",
        "recorded at:     ",
    ):
        assert expected in out, expected

    as_json = relay(toml, "consent", "show", "jane@example.org", "--json")
    body = json.loads(as_json.stdout)
    assert [r["account"] for r in body["records"]] == [ACCOUNT, "shop"]
    assert body["records"][0]["opt_in"] == "double"

    nobody = relay(toml, "consent", "show", "nobody@example.org")
    assert nobody.exit_code == 1
    assert "no account holds a consent record for nobody@example.org" in nobody.stderr


def test_consent_import_of_json_lines_all_or_nothing(
    toml: Path, tmp_path: Path
) -> None:
    record = {
        "account": ACCOUNT,
        "address": "joe@example.org",
        "collected_at": "2025-01-01T00:00:00Z",
        "source": "event",
        "opt_in": "single",
    }
    path = tmp_path / "consent.jsonl"
    path.write_text(
        json.dumps(record) + "\n" + json.dumps({**record, "opt_in": "maybe"}) + "\n",
        encoding="utf-8",
    )
    bad = relay(toml, "consent", "import", str(path))
    assert bad.exit_code == 2
    assert f"{path}:2: " in bad.stderr
    assert relay(toml, "consent", "show", "joe@example.org").exit_code == 1

    stdin = relay(
        toml, "consent", "import", "-", "--format", "jsonl", stdin=json.dumps(record)
    )
    assert stdin.exit_code == 0, stdin.output
    shown = relay(toml, "consent", "show", "joe@example.org")
    assert shown.exit_code == 0
    assert "source:          event" in shown.stdout


def test_every_new_command_has_help(toml: Path) -> None:
    for args in (
        ["check"],
        ["suppress"],
        ["suppress", "add"],
        ["suppress", "remove"],
        ["suppress", "list"],
        ["suppress", "show"],
        ["suppress", "import"],
        ["suppress", "export"],
        ["consent"],
        ["consent", "import"],
        ["consent", "show"],
    ):
        result = CliRunner().invoke(main, [*args, "--help"], prog_name="relay")
        assert result.exit_code == 0, args
        assert "Usage: relay" in result.stdout


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        ("A NUL \x00 byte.\n", "550 5.5.2"),
        ("A bare CR \r in a line.\n", "550 5.5.2"),
        ("x" * 1200 + "\n", "500 5.5.2"),
    ],
)
def test_check_applies_the_smtp_listeners_own_data_checks(
    toml: Path, tmp_path: Path, body: str, reply: str
) -> None:
    path = eml(tmp_path, "odd.eml", body=body)
    result = relay(toml, "check", str(path), "--account", ACCOUNT, "--json")
    assert result.exit_code == 1, result.output
    decision = json.loads(result.stdout)["decision"]
    assert (decision["accepted"], decision["policy"]) == (False, "core")
    assert decision["reply"].startswith(reply)
