"""The registry: [policies] tables validated with key paths, pipelines built in order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from policies import PASS, Mode, OnError, PolicyContext, Stage, Verdict
from policies.base import PolicyEnv
from policies.registry import PolicyConfigError, build_pipeline
from relay.clock import SystemClock


class Named:
    stages = frozenset({Stage.DATA})

    def __init__(self, name: str, table: Mapping[str, Any]) -> None:
        self.name = name
        if "bad" in table:
            raise ValueError("bad: not allowed")
        self.table = dict(table)

    async def check(self, ctx: PolicyContext) -> Verdict:
        return PASS


REGISTRY = {
    "alpha": lambda table, env: Named("alpha", table),
    "beta": lambda table, env: Named("beta", table),
}
ENV = PolicyEnv(accounts={}, clock=SystemClock())


def test_pipeline_follows_order_and_settings() -> None:
    pipeline = build_pipeline(
        "enforce",
        ("beta", "alpha"),
        {"alpha": {"mode": "monitor", "on_error": "pass", "timeout": "250ms", "x": 1}},
        lambda _: None,
        ENV,
        REGISTRY,
    )
    assert pipeline.order == ("beta", "alpha")
    (_, beta), (alpha_policy, alpha) = pipeline._checks
    assert beta.mode is Mode.ENFORCE
    assert (alpha.mode, alpha.on_error, alpha.timeout_seconds) == (
        Mode.MONITOR,
        OnError.PASS,
        0.25,
    )
    assert alpha_policy.table == {"x": 1}  # type: ignore[attr-defined]


def test_every_problem_is_reported_with_its_key_path() -> None:
    with pytest.raises(PolicyConfigError) as info:
        build_pipeline(
            "enforce",
            ("alpha", "gamma", "beta", "alpha"),
            {
                "delta": {},
                "alpha": {"mode": "loud"},
                "beta": {"bad": True, "timeout": "soon"},
            },
            lambda _: None,
            ENV,
            REGISTRY,
        )
    paths = {problem.path for problem in info.value.problems}
    assert {
        "policies.delta",
        "policies.order[1]",
        "policies.order",
        "policies.alpha.mode",
        "policies.beta.timeout",
    } <= paths


def test_global_monitor_mode_applies_unless_a_table_overrides_it() -> None:
    pipeline = build_pipeline(
        "monitor",
        ("alpha", "beta"),
        {"beta": {"mode": "enforce"}},
        lambda _: None,
        ENV,
        REGISTRY,
    )
    modes = [settings.mode for _, settings in pipeline._checks]
    assert modes == [Mode.MONITOR, Mode.ENFORCE]


def test_adding_list_unsubscribe_needs_a_secret_and_an_https_public_url() -> None:
    from config import parse_config
    from policies.registry import pipeline_for

    raw = {"policies": {"order": ["optout_link"]}}
    with pytest.raises(PolicyConfigError) as info:
        pipeline_for(parse_config(raw), lambda _: None, clock=SystemClock())
    reasons = [p.reason for p in info.value.problems]
    assert {p.path for p in info.value.problems} == {
        "policies.optout_link.list_unsubscribe"
    }
    assert any("[feedback] secret" in r for r in reasons)
    assert any("https" in r for r in reasons)
    fine = {
        **raw,
        "http": {"public_url": "https://relay.example"},
        "feedback": {"secret": "x" * 32},
    }
    pipeline = pipeline_for(parse_config(fine), lambda _: None, clock=SystemClock())
    assert pipeline.order == ("optout_link",)
