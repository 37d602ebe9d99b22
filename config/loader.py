"""Reads ``relay.toml`` into a :class:`~config.models.RelayConfig`.

Resolves ``*_env`` secrets from the environment, and gathers every problem (TOML
syntax, unknown keys, bad values, unset environment variables) into one
:class:`ConfigError` whose ``problems`` carry a key path and a reason each. The CLI
prints them (``relay check-config``) and exits 2.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from config.models import RelayConfig

_ENV_SUFFIX = "_env"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the file: where (dotted key path) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(Exception):
    """The configuration file cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.report())

    def report(self) -> str:
        """A human report: one line per problem, each with its key path."""
        lines = [f"{self.source}: {len(self.problems)} error(s)"]
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)


def load_config(
    path: str | Path, environ: Mapping[str, str] | None = None
) -> RelayConfig:
    """Read and validate ``path``; raise :class:`ConfigError` if it is unusable."""
    source = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            source, [Problem("", f"cannot read file: {exc.strerror}")]
        ) from exc
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [Problem("", "file is not UTF-8")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"TOML syntax error: {exc}")]) from exc
    return parse_config(raw, source=source, environ=environ)


def parse_config(
    raw: Mapping[str, Any],
    *,
    source: str = "relay.toml",
    environ: Mapping[str, str] | None = None,
) -> RelayConfig:
    """Validate an already-parsed TOML document."""
    problems: list[Problem] = []
    resolved = _resolve_env(
        raw, (), os.environ if environ is None else environ, problems
    )
    try:
        config = RelayConfig.model_validate(resolved)
    except ValidationError as exc:
        problems.extend(_problems_from(exc))
        raise ConfigError(source, problems) from exc
    if problems:
        raise ConfigError(source, problems)
    return config


def _resolve_env(
    table: Mapping[str, Any],
    path: tuple[str, ...],
    environ: Mapping[str, str],
    problems: list[Problem],
) -> dict[str, Any]:
    """Replace every ``KEY_env = "VAR"`` by ``KEY = <value of $VAR>``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out[key] = _resolve_env(value, (*path, key), environ, problems)
            continue
        if not key.endswith(_ENV_SUFFIX):
            out[key] = value
            continue
        base = key[: -len(_ENV_SUFFIX)]
        where = ".".join((*path, key))
        if base in table:
            problems.append(Problem(where, f"give either {base} or {key}, not both"))
            continue
        if not isinstance(value, str) or not value:
            problems.append(Problem(where, "must name an environment variable"))
            continue
        if value not in environ:
            problems.append(Problem(where, f"environment variable {value} is not set"))
            continue
        out[base] = environ[value]
    return out


def _problems_from(exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            reason = "unknown key"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
        problems.append(Problem(path, reason))
    return problems
