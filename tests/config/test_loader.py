"""Tests for config: units, the TOML loader's error report, and the config CLI."""

from __future__ import annotations

import math
from pathlib import Path

import argon2
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from config import (
    ConfigError,
    Problem,
    RelayConfig,
    load_config,
    parse_duration,
    parse_size,
)
from config.units import RateLimit
from relay.cli import main
from tests.conftest import PASSWORD_HASH

REPO_ROOT = Path(__file__).parents[2]
GOOD_TOML = f"""
[server]
hostname = "relay.test"
listen = "127.0.0.1:2525"
idle_timeout = "90s"
max_message_size = "25MiB"

[storage]
url = "sqlite:///relay-data/relay.db"
min_free_space = "512KiB"

[queue]
retry_schedule = ["1m", "5m", "3d", "250ms", 42]

[accounts.acme]
password_hash = "{PASSWORD_HASH}"
domains = {{ "acme.example" = 2024-01-15 }}
"""


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(
    tmp_path: Path, text: str, environ: dict[str, str] | None = None
) -> list[Problem]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ or {})
    return info.value.problems


def paths(problems: list[Problem]) -> list[str]:
    return [problem.path for problem in problems]


def only(problems: list[Problem], path: str) -> Problem:
    found = [problem for problem in problems if problem.path == path]
    assert len(found) == 1, problems
    return found[0]


# -- units ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("3d", 259200.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5m", 90.0),
        (" 10 s ", 10.0),
        ("7", 7.0),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["", "5 parsecs", "-1s", "1e3s", "s", "5mm", True, None, [], -1, -0.5]
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("25MiB", 25 * 1024**2),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("10MB", 10_000_000),
        ("2kB", 2000),
        ("100B", 100),
        ("1.5KiB", 1536),
        ("4096", 4096),
        (65536, 65536),
        (0, 0),
    ],
)
def test_parse_size_accepts(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", ["", "lots", "25 MiBs", "-1KiB", "1e3", True, None, 2.5, -1]
)
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_size(value)


@settings(max_examples=50)
@given(st.integers(min_value=0, max_value=5_000_000))
def test_duration_seconds_and_minutes(n: int) -> None:
    assert parse_duration(f"{n}s") == n
    assert parse_duration(f"{n}m") == 60 * n


@settings(max_examples=50)
@given(st.integers(min_value=0, max_value=10**9))
def test_size_kib(n: int) -> None:
    assert parse_size(f"{n}KiB") == 1024 * n


@settings(max_examples=200)
@given(st.text(max_size=40))
def test_parse_duration_text_raises_only_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert seconds >= 0


@settings(max_examples=200)
@given(st.text(max_size=40))
def test_parse_size_text_raises_only_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert size >= 0


@pytest.mark.parametrize(
    "text",
    ["9" * 400, "9" * 400 + "GiB", "1" + "0" * 320 + "B"],
    ids=["digits", "gib", "bytes"],
)
def test_parse_size_huge_number_is_value_error(text: str) -> None:
    # float(...) overflows to inf; int(inf) must not escape as OverflowError.
    with pytest.raises(ValueError, match=r"size"):
        parse_size(text)


def test_parse_duration_huge_integer_is_value_error() -> None:
    # TOML integers are unbounded; float(10**400) raises OverflowError.
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(10**400)


def test_parse_duration_refuses_nan() -> None:
    # TOML has `nan`; "a duration cannot be negative" does not catch it.
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(math.nan)


# -- the loader ----------------------------------------------------------------


def test_good_file_loads_with_units(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD_TOML), environ={})
    assert isinstance(config, RelayConfig)
    assert config.server.idle_timeout_seconds == 90.0
    assert config.server.max_message_size_bytes == 25 * 1024**2
    assert config.storage.min_free_space_bytes == 512 * 1024
    assert config.queue.retry_schedule_seconds == (60.0, 300.0, 259200.0, 0.25, 42.0)
    assert set(config.accounts) == {"acme"}


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={})
    assert config == RelayConfig()


@pytest.mark.parametrize(
    ("toml", "path", "bad"),
    [
        ('[server]\nidle_timeout = "5 parsecs"\n', "server.idle_timeout", "5 parsecs"),
        ('[server]\nmax_message_size = "lots"\n', "server.max_message_size", "lots"),
        ('[upstream]\nconnect_timeout = "soon"\n', "upstream.connect_timeout", "soon"),
        (
            '[storage]\nmin_free_space = "12 apples"\n',
            "storage.min_free_space",
            "apples",
        ),
        (
            '[queue]\nretry_schedule = ["1m", "later"]\n',
            "queue.retry_schedule.1",
            "later",
        ),
    ],
)
def test_bad_value_reported_at_its_key(
    tmp_path: Path, toml: str, path: str, bad: str
) -> None:
    problems = problems_of(tmp_path, toml)
    assert paths(problems) == [path]
    assert bad in problems[0].reason


def test_bad_duration_type_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[server]\nidle_timeout = true\n")
    assert paths(problems) == ["server.idle_timeout"]
    assert "duration" in problems[0].reason


def test_nan_duration_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[server]\nidle_timeout = nan\n")
    assert paths(problems) == ["server.idle_timeout"]


def test_huge_size_reported_not_crash(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, f'[server]\nmax_message_size = "{"9" * 400}GiB"\n')
    assert paths(problems) == ["server.max_message_size"]


def test_huge_integer_duration_reported_not_crash(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, f"[server]\nidle_timeout = {'9' * 400}\n")
    assert paths(problems) == ["server.idle_timeout"]


@pytest.mark.parametrize(
    ("toml", "path"),
    [
        ("bogus = 1\n", "bogus"),
        ("[nosuchsection]\nx = 1\n", "nosuchsection"),
        ("[server]\nidle_timout = '5m'\n", "server.idle_timout"),
        ("[upstream]\npasword = 'x'\n", "upstream.pasword"),
        (
            f'[accounts.acme]\npassword_hash = "{PASSWORD_HASH}"\nenabeld = true\n',
            "accounts.acme.enabeld",
        ),
    ],
)
def test_unknown_key_reported_with_full_path(
    tmp_path: Path, toml: str, path: str
) -> None:
    problems = problems_of(tmp_path, toml)
    assert only(problems, path).reason == "unknown key"


def test_several_errors_all_reported(tmp_path: Path) -> None:
    toml = f"""
bogus = 1
[server]
idle_timeout = "5 parsecs"
max_message_size = "lots"
extra = true
[queue]
retry_jitter = 3
[accounts.acme]
password_hash = "{PASSWORD_HASH}"
colour = "blue"
"""
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    error = info.value
    assert len(error.problems) == 6
    assert set(paths(error.problems)) == {
        "bogus",
        "server.idle_timeout",
        "server.max_message_size",
        "server.extra",
        "queue.retry_jitter",
        "accounts.acme.colour",
    }
    report = error.report()
    assert report.startswith(f"{path}: 6 error(s)")
    for problem in error.problems:
        assert f"  {problem.path}: {problem.reason}" in report


def test_bad_password_hash_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[accounts.acme]\npassword_hash = "hunter2"\n')
    assert "argon2" in only(problems, "accounts.acme.password_hash").reason


def test_env_secret_resolved_from_given_environ(tmp_path: Path) -> None:
    toml = '[upstream]\nusername = "relay"\npassword_env = "UPSTREAM_PW"\n'
    config = load_config(write(tmp_path, toml), environ={"UPSTREAM_PW": "s3cret"})
    assert config.upstream.password is not None
    assert config.upstream.password.get_secret_value() == "s3cret"


def test_env_secret_in_nested_table(tmp_path: Path) -> None:
    toml = '[http]\nadmin_token_env = "TOKEN"\n'
    config = load_config(write(tmp_path, toml), environ={"TOKEN": "t0k"})
    assert config.http.admin_token is not None
    assert config.http.admin_token.get_secret_value() == "t0k"


def test_env_secret_missing_variable(tmp_path: Path) -> None:
    toml = '[upstream]\nusername = "relay"\npassword_env = "UPSTREAM_PW"\n'
    problems = problems_of(tmp_path, toml, environ={"OTHER": "x"})
    problem = only(problems, "upstream.password_env")
    assert "UPSTREAM_PW" in problem.reason
    assert "not set" in problem.reason


def test_env_secret_and_plain_value_together(tmp_path: Path) -> None:
    toml = (
        '[upstream]\nusername = "relay"\npassword = "x"\npassword_env = "UPSTREAM_PW"\n'
    )
    problems = problems_of(tmp_path, toml, environ={"UPSTREAM_PW": "s3cret"})
    problem = only(problems, "upstream.password_env")
    assert "password" in problem.reason
    assert "not both" in problem.reason


def test_env_secret_must_name_a_variable(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[http]\nadmin_token_env = ""\n')
    assert "environment variable" in only(problems, "http.admin_token_env").reason


def test_toml_syntax_error_reported(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "[server\nidle_timeout = 5\n")
    assert len(problems) == 1
    assert problems[0].path == ""
    assert "TOML syntax error" in problems[0].reason
    assert "line 1" in problems[0].reason


def test_non_utf8_file_reported(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "UTF-8" in info.value.problems[0].reason


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_unreadable_file_reported(tmp_path: Path, which: str) -> None:
    path = tmp_path / "missing.toml" if which == "missing" else tmp_path
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert len(info.value.problems) == 1
    assert "cannot read file" in info.value.problems[0].reason
    assert str(path) in info.value.report()


def test_shipped_relay_toml_is_valid() -> None:
    config = load_config(REPO_ROOT / "relay.toml", environ={})
    assert "demo" in config.accounts
    demo = config.accounts["demo"]
    assert demo.enabled
    stored = demo.password_hash.get_secret_value()
    assert argon2.PasswordHasher().verify(stored, "demo-password")


# -- the CLI -------------------------------------------------------------------


def test_cli_check_config_bad_file(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        '[server]\nidle_timeout = "5 parsecs"\nbogus = 1\n'
        '[upstream]\npassword_env = "NO_SUCH_VARIABLE_FOR_RELAY_TESTS"\n',
        name="bad.toml",
    )
    result = CliRunner().invoke(main, ["check-config", "-c", str(bad)])
    assert result.exit_code == 2
    for key in ("server.idle_timeout", "server.bogus", "upstream.password_env"):
        assert key in result.output


def test_cli_check_config_good_file(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD_TOML, name="good.toml")
    result = CliRunner().invoke(main, ["check-config", "-c", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    assert "1 account(s)" in result.output


def test_cli_check_config_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["check-config", "-c", str(tmp_path / "nope.toml")]
    )
    assert result.exit_code == 2
    assert "cannot read file" in result.output


def test_cli_hash_password() -> None:
    result = CliRunner().invoke(main, ["hash-password"], input="pw\n")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert hashed.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(hashed, "pw")


def test_cli_hash_password_empty() -> None:
    result = CliRunner().invoke(main, ["hash-password"], input="\n")
    assert result.exit_code == 2
    assert "empty password" in result.output


# -- [feedback] ----------------------------------------------------------------

FEEDBACK_SECRET = "k" * 32


def feedback_toml(**values: str) -> str:
    lines = [f'{key} = "{value}"' for key, value in values.items()]
    return "[feedback]\n" + "\n".join(lines) + "\n"


def test_feedback_values_are_normalised(tmp_path: Path) -> None:
    toml = feedback_toml(
        secret=FEEDBACK_SECRET,
        bounce_domain="Bounces.Relay.EXAMPLE.",
        fbl_address="FBL-Reports@Relay.EXAMPLE",
        unsubscribe_mailto="Unsub@Relay.Example",
        intake_rate="20/s",
    )
    feedback = load_config(write(tmp_path, toml), environ={}).feedback
    assert feedback.bounce_domain == "bounces.relay.example"
    # The local part keeps its case (RFC 5321 §2.4); the domain is lower-cased.
    assert feedback.fbl_address == "FBL-Reports@relay.example"
    assert feedback.unsubscribe_mailto == "Unsub@relay.example"
    assert feedback.intake_rate == RateLimit(20, 1.0)
    assert feedback.intake
    assert feedback.tracks


def test_feedback_defaults_take_no_mail(tmp_path: Path) -> None:
    feedback = load_config(write(tmp_path, ""), environ={}).feedback
    assert feedback.secret is None
    assert feedback.bounce_domain is None
    assert feedback.fbl_address is None
    assert feedback.unsubscribe_mailto is None
    assert feedback.intake_rate == RateLimit(600, 60.0)
    assert not feedback.intake
    assert not feedback.tracks


def test_feedback_secret_from_the_environment(tmp_path: Path) -> None:
    toml = (
        '[feedback]\nsecret_env = "RELAY_FEEDBACK_SECRET"\n'
        'bounce_domain = "b.example"\n'
    )
    config = load_config(
        write(tmp_path, toml), environ={"RELAY_FEEDBACK_SECRET": FEEDBACK_SECRET}
    )
    assert config.feedback.secret is not None
    assert config.feedback.secret.get_secret_value() == FEEDBACK_SECRET
    assert config.feedback.bounce_domain == "b.example"


@pytest.mark.parametrize(
    "value",
    [
        "localhost",
        "bounces",
        "bad_domain.example",
        "-bounces.relay.example",
        "bounces..relay.example",
        "bücher.example",
        "bounces.relay.example/x",
        "abuse@relay.example",
        "[192.0.2.1]",
        ".",
        "",
    ],
)
def test_bad_bounce_domain_reported(tmp_path: Path, value: str) -> None:
    toml = feedback_toml(secret=FEEDBACK_SECRET, bounce_domain=value)
    problem = only(problems_of(tmp_path, toml), "feedback.bounce_domain")
    assert "is not a domain" in problem.reason


@pytest.mark.parametrize("key", ["fbl_address", "unsubscribe_mailto"])
@pytest.mark.parametrize(
    "value",
    [
        "abuse",
        "@relay.example",
        "abuse@",
        "abuse@localhost_x.example",
        "abuse@relay.example.",
        "jürgen@relay.example",
        "abuse@bücher.example",
        "",
    ],
)
def test_bad_feedback_address_reported(tmp_path: Path, key: str, value: str) -> None:
    toml = feedback_toml(secret=FEEDBACK_SECRET, **{key: value})
    problem = only(problems_of(tmp_path, toml), f"feedback.{key}")
    assert "is not an address" in problem.reason


@pytest.mark.parametrize("key", ["fbl_address", "unsubscribe_mailto"])
@pytest.mark.parametrize(
    "local",
    [
        "a\\r\\nBcc: victim",
        "two words",
        "u>, <https://evil.example/",
        "a?subject=x",
        "a%20b",
        ".a",
        "a..b",
        "a\\n",
    ],
)
def test_feedback_address_with_a_bad_local_part_reported(
    tmp_path: Path, key: str, local: str
) -> None:
    toml = feedback_toml(secret=FEEDBACK_SECRET, **{key: f"{local}@relay.example"})
    problem = only(problems_of(tmp_path, toml), f"feedback.{key}")
    assert "is not an address" in problem.reason


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("bounce_domain", "bounces.relay.example"),
        ("fbl_address", "abuse@relay.example"),
        ("unsubscribe_mailto", "unsubscribe@relay.example"),
    ],
)
def test_feedback_address_needs_a_secret(tmp_path: Path, key: str, value: str) -> None:
    problems = problems_of(tmp_path, feedback_toml(**{key: value}))
    assert len(problems) == 1, problems
    assert problems[0].path == "feedback"
    assert problems[0].reason.startswith(f"{key} needs [feedback] secret")


def test_short_feedback_secret_reported(tmp_path: Path) -> None:
    toml = feedback_toml(secret="k" * 31, bounce_domain="bounces.relay.example")
    problem = only(problems_of(tmp_path, toml), "feedback.secret")
    assert "at least 32 characters" in problem.reason


@pytest.mark.parametrize("value", ["lots", "10", "0/m", "-5/s", "10/fortnight"])
def test_bad_intake_rate_reported(tmp_path: Path, value: str) -> None:
    toml = feedback_toml(secret=FEEDBACK_SECRET, intake_rate=value)
    assert paths(problems_of(tmp_path, toml)) == ["feedback.intake_rate"]


def test_unknown_feedback_key_reported(tmp_path: Path) -> None:
    toml = feedback_toml(secret=FEEDBACK_SECRET, bounce_domian="b.example")
    assert only(problems_of(tmp_path, toml), "feedback.bounce_domian").reason == (
        "unknown key"
    )
