"""Parsing of the human units used in relay.toml: durations, sizes, percentages
and rates.

Durations are written ``"90s"``, ``"5m"``, ``"2h"``, ``"3d"`` (or a bare number of
seconds); sizes ``"25MiB"``, ``"512KiB"``, ``"10MB"`` (or a bare number of bytes);
percentages ``"8%"`` or ``8`` (a bare number is a percentage too: ``0.08`` means
0.08%); rates ``"1000/h"``, ``"20/m"``, ``"5/s"``, ``"50000/d"``. The models in
:mod:`config.models` store the results as float seconds, int bytes, fractions
(``"8%"`` -> 0.08) and :class:`RateLimit`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


_PERCENT = re.compile(r"^\s*([0-9]{1,3}(?:\.[0-9]{1,6})?)\s*%?\s*$")
_RATE = re.compile(r"^\s*([0-9]{1,9})\s*/\s*(s|m|h|d)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE_NAMES = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}


def parse_percent(value: object) -> float:
    """Return ``value`` (a percentage, ``"8%"`` or ``8``) as a fraction (0.08)."""
    if isinstance(value, bool):
        raise ValueError("expected a percentage such as '8%'")
    if isinstance(value, int | float):
        percent = float(value)
    elif isinstance(value, str) and (match := _PERCENT.match(value)) is not None:
        percent = float(match.group(1))
    else:
        raise ValueError(f"{value!r} is not a percentage; write e.g. '8%' or '0.08%'")
    if not 0 <= percent <= 100:  # also refuses NaN
        raise ValueError("a percentage must be between 0% and 100%")
    # "1.4%" is 0.014, not 1.4 / 100 = 0.013999999999999999: 14 in 1000 must
    # not count as above a 1.4% limit.
    return round(percent / 100, 12)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` per ``per_seconds`` (a token bucket of ``count`` tokens)."""

    count: int
    per_seconds: float

    @property
    def per_second(self) -> float:
        """Tokens added back per second."""
        return self.count / self.per_seconds

    def __str__(self) -> str:
        return f"{self.count}/{_RATE_NAMES.get(self.per_seconds, 's')}"


def parse_rate(value: object) -> RateLimit:
    """Return ``value`` (``"1000/h"``) as a :class:`RateLimit`."""
    if isinstance(value, RateLimit):
        return value
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a rate; write e.g. '1000/h' or '20/m'")
    count = int(match.group(1))
    if count < 1:
        raise ValueError("a rate must allow at least 1")
    return RateLimit(count, _RATE_UNITS[match.group(2)])


Seconds = Annotated[float, BeforeValidator(parse_duration)]
"""A duration given in relay.toml, held as float seconds."""

Bytes = Annotated[int, BeforeValidator(parse_size)]
"""A size given in relay.toml, held as int bytes."""

Percent = Annotated[float, BeforeValidator(parse_percent)]
"""A percentage given in relay.toml, held as a fraction."""

Rate = Annotated[RateLimit, BeforeValidator(parse_rate)]
"""A rate given in relay.toml (``"1000/h"``)."""
