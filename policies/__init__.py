"""The sending policy: the check protocol, its verdicts and the pipeline."""

from policies.base import (
    PASS,
    MessageKind,
    Mode,
    OnError,
    Outcome,
    Policy,
    PolicyContext,
    Stage,
    Verdict,
    defer,
    refuse,
)
from policies.pipeline import Observation, Pipeline, PolicySettings, StageResult

__all__ = [  # noqa: RUF022 - plain sorted(), as tests/test_exports.py pins
    "MessageKind",
    "Mode",
    "Observation",
    "OnError",
    "Outcome",
    "PASS",
    "Pipeline",
    "Policy",
    "PolicyContext",
    "PolicySettings",
    "Stage",
    "StageResult",
    "Verdict",
    "defer",
    "refuse",
]
