"""Validation of a ``[policies.NAME]`` table against the check's settings model.

Errors read as ``relay check-config`` prints every other problem: ``key: reason``,
joined by "; ", with "unknown key" for a key the model does not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def describe(exc: ValidationError) -> str:
    """``key: reason`` for each error of ``exc``."""
    problems = []
    for error in exc.errors(include_url=False):
        path = ""
        for part in error["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        reason = (
            "unknown key"
            if error["type"] == "extra_forbidden"
            else str(error["msg"]).removeprefix("Value error, ")
        )
        problems.append(f"{path.lstrip('.') or 'settings'}: {reason}")
    return "; ".join(problems)


def parse_settings(model: type[M], table: Mapping[str, Any]) -> M:
    """``table`` as ``model``; raises ``ValueError`` naming each bad key."""
    try:
        return model.model_validate(dict(table))
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None
