"""The sending policy: the check protocol, its verdicts and the pipeline."""

from policies.base import (
    PASS,
    AccountPolicy,
    MessageKind,
    Mode,
    OnError,
    Outcome,
    Policy,
    PolicyContext,
    PolicyEnv,
    Stage,
    Verdict,
    defer,
    refuse,
    refuse_recipients,
)
from policies.pipeline import Observation, Pipeline, PolicySettings, StageResult

__all__ = [  # noqa: RUF022 - plain sorted(), as tests/test_exports.py pins
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
]
