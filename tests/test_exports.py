"""Pins the public names of the top-level packages."""

from __future__ import annotations

import importlib

import pytest

EXPORTS = {
    "config": [
        "AccountConfig",
        "ConfigError",
        "HttpConfig",
        "LogConfig",
        "Problem",
        "QueueConfig",
        "RelayConfig",
        "ServerConfig",
        "StorageConfig",
        "UpstreamConfig",
        "UpstreamScheme",
        "load_config",
        "parse_config",
        "parse_duration",
        "parse_size",
        "split_listen",
    ],
    "storage": [
        "AddressError",
        "AttemptRecord",
        "BounceType",
        "ConsentRecord",
        "ConsentSource",
        "ConsentStore",
        "Event",
        "EventKind",
        "EventStore",
        "ImportProblem",
        "ImportProblems",
        "NEVER_EXPIRES",
        "NewMessage",
        "OptInType",
        "QueueStats",
        "QueueStore",
        "QueuedMessage",
        "REFUSES_EVERY_CATEGORY",
        "RecipientResult",
        "RecipientState",
        "SqliteStore",
        "StorageError",
        "StorageFullError",
        "StorageUnavailableError",
        "Store",
        "Suppression",
        "SuppressionReason",
        "SuppressionRemoval",
        "SuppressionStore",
        "canonical_address",
        "canonical_domain",
        "detect_format",
        "domain_of",
        "parse_consents",
        "parse_suppressions_csv",
        "write_suppressions_csv",
    ],
    "policies": [
        "AccountPolicy",
        "MessageKind",
        "Mode",
        "Observation",
        "OnError",
        "Outcome",
        "PASS",
        "Pipeline",
        "Policy",
        "PolicyContext",
        "PolicyEnv",
        "PolicySettings",
        "Stage",
        "StageResult",
        "Verdict",
        "defer",
        "refuse",
        "refuse_recipients",
    ],
    "relay": ["__version__"],
}


@pytest.mark.parametrize("package", sorted(EXPORTS))
def test_all_is_pinned_and_sorted(package: str) -> None:
    module = importlib.import_module(package)
    assert list(module.__all__) == EXPORTS[package]
    assert list(module.__all__) == sorted(module.__all__)
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("package", sorted(EXPORTS))
def test_every_exported_name_exists(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_star_import_gives_exactly_all() -> None:
    for package, names in EXPORTS.items():
        namespace: dict[str, object] = {}
        exec(f"from {package} import *", namespace)  # noqa: S102
        assert set(namespace) - {"__builtins__"} == set(names)
