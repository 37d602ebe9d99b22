"""Writes a relay.toml from a dict, for tests that hand a file to the relay."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON-compatible
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items())
        return "{ " + pairs + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps(document: dict[str, Any]) -> str:
    """``document`` as TOML: nested dicts become tables, except inline ones
    whose values are not dicts (such as ``domains``)."""
    lines: list[str] = []

    def table(path: list[str], values: dict[str, Any]) -> None:
        plain = {k: v for k, v in values.items() if not _is_table(v)}
        if path:
            lines.append("[" + ".".join(json.dumps(p) for p in path) + "]")
        lines.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in plain.items())
        for key, value in values.items():
            if _is_table(value):
                table([*path, key], value)

    table([], document)
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    """A dict is a table, unless all its values are dates (``domains``)."""
    return isinstance(value, dict) and not (
        value and all(isinstance(v, date) for v in value.values())
    )


def write(path: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` to ``path`` as TOML."""
    path.write_text(dumps(document), encoding="utf-8")
    return path
