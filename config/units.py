"""Parsing of the human units used in relay.toml: durations and sizes.

Durations are written ``"90s"``, ``"5m"``, ``"2h"``, ``"3d"`` (or a bare number of
seconds); sizes ``"25MiB"``, ``"512KiB"``, ``"10MB"`` (or a bare number of bytes).
The models in :mod:`config.models` store the results as float seconds and int bytes.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION = re.compile(r"^\s*([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_SIZE = re.compile(
    r"^\s*([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*(B|KiB|MiB|GiB|kB|KB|MB|GB)?\s*$"
)
_MAX_SECONDS = 10 * 365 * 86400.0
_MAX_BYTES = 1024**5
_SIZE_UNITS = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """Return ``value`` as seconds; accepts numbers and strings such as ``"5m"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '90s', '5m', '2h' or '3d'")
    if isinstance(value, int | float):
        if not -_MAX_SECONDS <= value <= _MAX_SECONDS:  # also refuses NaN
            raise ValueError("duration out of range")
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a duration; write e.g. '90s', '5m', '2h' or '3d'"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise ValueError("expected a duration such as '90s', '5m', '2h' or '3d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > _MAX_SECONDS:
        raise ValueError("duration out of range (at most 10 years)")
    return seconds


def parse_size(value: object) -> int:
    """Return ``value`` as bytes; accepts integers and strings such as ``"25MiB"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512KiB' or '25MiB'")
    if isinstance(value, int):
        if not -_MAX_BYTES <= value <= _MAX_BYTES:
            raise ValueError("size out of range")
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a size; write e.g. '512KiB', '25MiB' or '1GiB'"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    else:
        raise ValueError("expected a size such as '512KiB' or '25MiB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    if size > _MAX_BYTES:
        raise ValueError("size out of range (at most 1PiB)")
    return size


Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""A duration given in relay.toml, held as float seconds."""

Bytes = Annotated[int, BeforeValidator(parse_size)]
"""A size given in relay.toml, held as int bytes."""
