"""From ``[policies]`` in relay.toml to a :class:`~policies.pipeline.Pipeline`.

The registry is an explicit table from policy name to a factory; each policy's
table is validated here (mode, on_error, timeout, and the policy's own settings),
at start-up and by ``relay check-config``. Unknown names are errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.models import RelayConfig
from config.units import parse_duration
from policies import (
    consent,
    content_categories,
    exclusion,
    header_sanity,
    optout_link,
    sender_domains,
)
from policies.base import AccountPolicy, MessageKind, Mode, OnError, Policy, PolicyEnv
from storage.addresses import AddressError, canonical_address, canonical_domain

if TYPE_CHECKING:
    from policies.base import Clock
    from storage.base import ConsentStore, SuppressionStore
from policies.pipeline import Observer, PassCounter, Pipeline, PolicySettings

PolicyFactory = Callable[[Mapping[str, Any], PolicyEnv], Policy]
"""Builds a check from its table (without the generic keys) and the environment;
raises ``ValueError`` naming the key for a bad setting."""

REGISTRY: dict[str, PolicyFactory] = {
    "exclusion": exclusion.from_table,
    "consent": consent.from_table,
    "header_sanity": header_sanity.from_table,
    "sender_domains": sender_domains.from_table,
    "optout_link": optout_link.from_table,
    "content_categories": content_categories.from_table,
}
"""Every built-in check, by name (= its module and its relay.toml table)."""

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
    env: PolicyEnv,
    registry: Mapping[str, PolicyFactory] | None = None,
    passed: PassCounter | None = None,
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
            policy = known[name](
                {k: v for k, v in table.items() if k not in _GENERIC}, env
            )
        except ValueError as exc:
            problems.append(RegistryProblem(f"policies.{name}", str(exc)))
            continue
        if settings is not None:
            checks.append((policy, settings))
    if problems:
        raise PolicyConfigError(problems)
    return Pipeline(checks, observer, passed)


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


def account_policies(config: RelayConfig) -> dict[str, AccountPolicy]:
    """What the checks need of each ``[accounts.NAME]``, with canonical domains.

    Raises :class:`PolicyConfigError` for a domain or address that cannot be
    canonicalised, naming its key path.
    """
    problems: list[RegistryProblem] = []
    accounts: dict[str, AccountPolicy] = {}
    for name, account in config.accounts.items():
        domains = {}
        for domain, verified in account.domains.items():
            try:
                domains[canonical_domain(domain)] = verified
            except AddressError as exc:
                problems.append(
                    RegistryProblem(f"accounts.{name}.domains.{domain}", exc.reason)
                )
        senders = set()
        for index, entry in enumerate(account.allowed_senders):
            try:
                senders.add(
                    canonical_address(entry)
                    if "@" in entry
                    else canonical_domain(entry)
                )
            except AddressError as exc:
                problems.append(
                    RegistryProblem(
                        f"accounts.{name}.allowed_senders[{index}]", exc.reason
                    )
                )
        accounts[name] = AccountPolicy(
            name=name,
            domains=domains,
            default_kind=MessageKind(account.default_category)
            if account.default_category
            else None,
            allowed_senders=frozenset(senders),
            allowed_content=frozenset(
                c.strip().lower() for c in account.allowed_content
            ),
        )
    if problems:
        raise PolicyConfigError(problems)
    return accounts


def pipeline_for(
    config: RelayConfig,
    observer: Observer,
    *,
    clock: Clock,
    suppressions: SuppressionStore | None = None,
    consents: ConsentStore | None = None,
    base_dir: Path | None = None,
    registry: Mapping[str, PolicyFactory] | None = None,
    passed: PassCounter | None = None,
) -> Pipeline:
    """The pipeline ``config`` describes, with its accounts; plain passes go to
    ``passed`` where given (:data:`~policies.pipeline.PassCounter`).

    Every problem of ``[policies]`` and of the accounts' policy keys is reported
    in one :class:`PolicyConfigError`.
    """
    problems: list[RegistryProblem] = []
    accounts: dict[str, AccountPolicy] = {}
    try:
        accounts = account_policies(config)
    except PolicyConfigError as exc:
        problems.extend(exc.problems)
    env = PolicyEnv(
        accounts=accounts,
        clock=clock,
        suppressions=suppressions,
        consents=consents,
        base_dir=base_dir or Path(),
    )
    policies = config.policies
    try:
        pipeline = build_pipeline(
            policies.mode,
            policies.order,
            policies.tables,
            observer,
            env,
            registry,
            passed,
        )
    except PolicyConfigError as exc:
        problems.extend(exc.problems)
    else:
        optout = pipeline.policy("optout_link")
        if getattr(optout, "adds_list_unsubscribe", False):
            problems.extend(_add_problems(config))
    if problems:
        raise PolicyConfigError(problems)
    return pipeline


def _add_problems(config: RelayConfig) -> list[RegistryProblem]:
    """What ``list_unsubscribe = "add"`` needs that ``config`` lacks."""
    path = "policies.optout_link.list_unsubscribe"
    problems = []
    if config.feedback.secret is None:
        problems.append(
            RegistryProblem(
                path,
                "'add' signs unsubscribe links: set [feedback] secret (or secret_env)",
            )
        )
    if not config.http.public_url.startswith("https://"):
        problems.append(
            RegistryProblem(
                path,
                "'add' needs an https:// [http] public_url: one-click unsubscribe "
                "links must be https (RFC 8058)",
            )
        )
    return problems
