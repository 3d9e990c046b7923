"""Checks for the numbers a user passes as settings, made when the settings are given.

Every public constructor and call that takes a number (a lease, a retry count, a delay, a poll
interval, a batch size, ...) checks it with these before anything is written or scheduled, so a
bad value fails at once with a ``ValueError`` naming the option, e.g. ``lease_seconds must be a
finite number of seconds >= 0.1, got nan``, and never later (a retry loop spinning on a NaN
delay, a raw ``OverflowError`` from a lease ending after the year 9999).

- A number is an int or a float (any ``numbers.Real``), and finite: NaN and +-infinity are
  refused everywhere. A bool is not a number here (``True`` is not a retry count).
- Anything else (a string, a list, None where None means nothing) is refused with ValueError
  too, not TypeError: every bad setting fails the same way, naming the option.
- Counts are integers (``3.0`` is refused).
- Seconds are at most :data:`MAX_SECONDS` (about 31 years): every deadline computed from them
  stays within the range of a ``datetime`` and of each database's timestamps.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, overload

__all__ = [
    "MAX_RECOVERY_ATTEMPTS",
    "MAX_SECONDS",
    "MIN_LEASE_SECONDS",
    "count",
    "fraction",
    "lease_seconds",
    "number",
    "recovery_attempts",
    "seconds",
]

MAX_SECONDS = 1e9
"""The longest duration any setting may have, in seconds (about 31 years)."""

MIN_LEASE_SECONDS = 0.1
"""The shortest lease a run may take: a lease must outlast a checkpoint's round trip, or two
runs could hold the same saga."""

MAX_RECOVERY_ATTEMPTS = 2**31 - 1
"""The most recovery attempts a saga may be allowed: the stored count is a SQL INTEGER."""


def _real(value: object) -> float | None:
    """``value`` as a finite float, or None when it is not a finite number (or is a bool)."""
    if type(value) is float:  # the common case, without the ABC checks below
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an int or Fraction beyond the float range
        return None
    return number if math.isfinite(number) else None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number(
    name: str,
    value: object,
    *,
    minimum: float,
    maximum: float | None = None,
    exclusive: bool = False,
    unit: str = "",
) -> float:
    """``value`` as a float if it is a finite number >= ``minimum`` (> with ``exclusive``) and,
    given a ``maximum``, <= it; ValueError naming ``name`` otherwise. ``unit`` ("seconds") is
    for the message."""
    checked = _real(value)
    if (checked is None or checked < minimum or (exclusive and checked == minimum)
            or (maximum is not None and checked > maximum)):
        kind = f"a finite number of {unit}" if unit else "a finite number"
        if maximum is None:
            bound = f"{'>' if exclusive else '>='} {minimum:g}"
        else:
            bound = f"within {'(' if exclusive else '['}{minimum:g}, {maximum:g}]"
        raise ValueError(f"{name} must be {kind} {bound}, got {_shown(value)}")
    return checked


@overload
def seconds(
    name: str, value: object, *, minimum: float = ..., exclusive: bool = ...,
    allow_none: Literal[False] = ...,
) -> float: ...


@overload
def seconds(
    name: str, value: object, *, minimum: float = ..., exclusive: bool = ...,
    allow_none: Literal[True],
) -> float | None: ...


def seconds(
    name: str,
    value: object,
    *,
    minimum: float = 0.0,
    exclusive: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A duration: a finite number of seconds >= ``minimum`` (> with ``exclusive``) and at
    most :data:`MAX_SECONDS`, as a float; None passes through with ``allow_none``."""
    if value is None and allow_none:
        return None
    checked = number(name, value, minimum=minimum, exclusive=exclusive, unit="seconds")
    if checked > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:g} seconds (about 31 years), "
                         f"got {_shown(value)}")
    return checked


def count(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer >= ``minimum`` (and <= ``maximum``); bools and floats are refused."""
    if type(value) is int or (isinstance(value, numbers.Integral)
                              and not isinstance(value, bool)):
        checked = int(value)
        if checked >= minimum and (maximum is None or checked <= maximum):
            return checked
    bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
    raise ValueError(f"{name} must be an integer {bound}, got {_shown(value)}")


def fraction(name: str, value: object) -> float:
    """A finite number within [0, 1], as a float."""
    return number(name, value, minimum=0.0, maximum=1.0)


def lease_seconds(value: object, name: str = "lease_seconds") -> float:
    """A run's lease: seconds >= :data:`MIN_LEASE_SECONDS`."""
    return seconds(name, value, minimum=MIN_LEASE_SECONDS)


def recovery_attempts(value: object, name: str = "max_recovery_attempts") -> int:
    """The recovery attempts before a saga is parked: an integer from 1 to
    :data:`MAX_RECOVERY_ATTEMPTS`."""
    return count(name, value, maximum=MAX_RECOVERY_ATTEMPTS)
