"""From ``[policies]`` in relay.toml to a :class:`~policies.pipeline.Pipeline`.

The registry is an explicit table from policy name to a factory; each policy's
table is validated here (mode, on_error, timeout, and the policy's own settings),
at start-up and by ``relay check-config``. Unknown names are errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from config.units import parse_duration
from policies.base import Mode, OnError, Policy
from policies.pipeline import Observer, Pipeline, PolicySettings

PolicyFactory = Callable[[Mapping[str, Any]], Policy]
"""Builds a check from its table (without the generic keys)."""

REGISTRY: dict[str, PolicyFactory] = {}
"""Every built-in check, by name. The policies issue fills it."""

_GENERIC = {"mode", "on_error", "timeout"}


@dataclass(frozen=True, slots=True)
class RegistryProblem:
    """A problem in ``[policies]``, with its key path."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class PolicyConfigError(Exception):
    """``[policies]`` cannot be used; ``problems`` says why."""

    def __init__(self, problems: list[RegistryProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


def build_pipeline(
    mode: str,
    order: tuple[str, ...],
    tables: Mapping[str, Any],
    observer: Observer,
    registry: Mapping[str, PolicyFactory] | None = None,
) -> Pipeline:
    """Validate the ``[policies]`` section and build the pipeline it describes."""
    known = REGISTRY if registry is None else registry
    problems: list[RegistryProblem] = []
    problems.extend(
        RegistryProblem(f"policies.{name}", "unknown policy")
        for name in tables
        if name not in known
    )
    for index, name in enumerate(order):
        if name not in known:
            problems.append(
                RegistryProblem(f"policies.order[{index}]", f"unknown policy {name!r}")
            )
    if len(set(order)) != len(order):
        problems.append(RegistryProblem("policies.order", "a policy is listed twice"))
    checks: list[tuple[Policy, PolicySettings]] = []
    for name in order:
        if name not in known:
            continue
        table = tables.get(name, {})
        if not isinstance(table, Mapping):
            problems.append(RegistryProblem(f"policies.{name}", "must be a table"))
            continue
        settings = _settings(name, table, Mode(mode), problems)
        try:
            policy = known[name]({k: v for k, v in table.items() if k not in _GENERIC})
        except ValueError as exc:
            problems.append(RegistryProblem(f"policies.{name}", str(exc)))
            continue
        if settings is not None:
            checks.append((policy, settings))
    if problems:
        raise PolicyConfigError(problems)
    return Pipeline(checks, observer)


def _settings(
    name: str,
    table: Mapping[str, Any],
    default_mode: Mode,
    problems: list[RegistryProblem],
) -> PolicySettings | None:
    try:
        mode = Mode(table.get("mode", default_mode))
    except ValueError:
        problems.append(
            RegistryProblem(f"policies.{name}.mode", "must be 'enforce' or 'monitor'")
        )
        return None
    try:
        on_error = OnError(table.get("on_error", OnError.DEFER))
    except ValueError:
        problems.append(
            RegistryProblem(f"policies.{name}.on_error", "must be 'defer' or 'pass'")
        )
        return None
    try:
        timeout = parse_duration(table.get("timeout", "5s"))
    except ValueError as exc:
        problems.append(RegistryProblem(f"policies.{name}.timeout", str(exc)))
        return None
    if timeout <= 0:
        problems.append(
            RegistryProblem(f"policies.{name}.timeout", "must be above zero")
        )
        return None
    return PolicySettings(mode=mode, on_error=on_error, timeout_seconds=timeout)
