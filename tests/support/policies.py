"""Shared by the policy tests: a stopped clock and a spy on the header registry."""

from __future__ import annotations

from datetime import UTC, datetime
from email import policy
from types import SimpleNamespace

import pytest

from policies import _headers

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


class FrozenClock:
    """A clock stopped at ``NOW``."""

    def now(self) -> datetime:
        return NOW

    def monotonic(self) -> float:
        return 0.0


def counting_registry(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every ``policy.default.header_factory`` call the checks make."""
    calls: list[tuple[str, str]] = []
    real = policy.default.header_factory

    def factory(name: str, value: str) -> object:
        calls.append((name, value))
        return real(name, value)

    monkeypatch.setattr(
        _headers,
        "policy",
        SimpleNamespace(default=SimpleNamespace(header_factory=factory)),
    )
    return calls
