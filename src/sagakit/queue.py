"""Queues of submitted sagas and their limits (see docs/workers.md).

A saga handed to workers (:func:`sagakit.submission.submit`) goes to a named queue and waits
there, PENDING, until a worker serving that queue claims it. A queue's limits live in the
database, so every worker on every machine enforces the same ones:

- ``concurrency``: at most this many of the queue's sagas run at once (RUNNING or COMPENSATING
  under a live lease), across all workers.
- ``key_concurrency``: at most this many run at once per concurrency key (a saga submitted
  with ``concurrency_key="customer-42"``); sagas without a key are not limited by it.
- ``rate``: at most this many starts per second (a token bucket holding ``burst`` starts,
  ``rate`` by default and at least one). A claim of an interrupted saga counts as a start.

A queue that was never configured has no limits. Limits apply to what workers claim
(submitted sagas, and recovery of interrupted ones); an operator's explicit ``recover`` or
``resume`` of one saga is not held back by them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from sagakit import settings

__all__ = [
    "DEFAULT_QUEUE", "MAX_PRIORITY", "QueueSettings", "check_key", "check_priority",
    "check_queue_name", "pick", "refill",
]

T = TypeVar("T")

DEFAULT_QUEUE = "default"
"""The queue of a saga submitted without one, and the queue a worker serves by default."""

MAX_PRIORITY = 2**31 - 1
"""Priorities are integers within [-MAX_PRIORITY, MAX_PRIORITY] (a SQL INTEGER); higher runs
first, 0 by default."""

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_KEY = 255


def check_queue_name(name: object, option: str = "queue") -> str:
    """A queue name: 1 to 64 letters, digits, ``_ . : -``; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{option} must be 1 to 64 letters, digits or '_.:-', got {name!r}")
    return name


def check_key(key: object) -> str | None:
    """A concurrency key: None, or a non-empty string of at most 255 characters without NUL."""
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY or "\x00" in key:
        raise ValueError("concurrency_key must be None or a string of 1 to 255 characters "
                         f"without NUL, got {key!r:.60}")
    return key


def check_priority(priority: object) -> int:
    return settings.count("priority", priority, minimum=-MAX_PRIORITY, maximum=MAX_PRIORITY)


@dataclasses.dataclass(frozen=True, slots=True)
class QueueSettings:
    """One queue's limits (None: no such limit). Checked when made: ValueError naming the
    option for a bad name, a count below 1, or a rate that is not a finite number > 0."""

    name: str
    concurrency: int | None = None
    key_concurrency: int | None = None
    rate: float | None = None
    burst: float | None = None

    def __post_init__(self) -> None:
        check_queue_name(self.name, "name")
        for option in ("concurrency", "key_concurrency"):
            value = getattr(self, option)
            if value is not None:
                settings.count(option, value, maximum=2**31 - 1)
        if self.rate is not None:
            object.__setattr__(self, "rate", settings.number(
                "rate", self.rate, minimum=0.0, exclusive=True, maximum=1e6))
        if self.burst is not None:
            if self.rate is None:
                raise ValueError(f"queue {self.name!r}: burst needs a rate")
            object.__setattr__(self, "burst", settings.number(
                "burst", self.burst, minimum=1.0, maximum=1e9))

    @property
    def bucket(self) -> float | None:
        """The most starts the rate limit lets through at once (None: no rate limit)."""
        if self.rate is None:
            return None
        return self.burst if self.burst is not None else max(1.0, self.rate)


def refill(limits: QueueSettings, tokens: float | None, refilled_at: float | None,
           now: float) -> float:
    """The starts a queue's rate limit allows now: its bucket (``settings.bucket``) refilled
    at ``rate`` per second since ``refilled_at`` (a bucket never used is full). Infinite for a
    queue without a rate limit. A clock that went back refills nothing."""
    bucket = limits.bucket
    if bucket is None:
        return float("inf")
    if tokens is None or refilled_at is None:
        return bucket
    assert limits.rate is not None
    return min(bucket, tokens + max(0.0, now - refilled_at) * limits.rate)


def pick(
    limits: QueueSettings | None,
    candidates: Sequence[tuple[T, str | None]],
    *,
    want: int,
    running: int,
    running_by_key: Mapping[str, int],
    tokens: float,
) -> list[T]:
    """Which of a queue's due sagas a claim may take, in the candidates' order (priority
    first): at most ``want``, and within the queue's limits given what runs now (``running``
    sagas, ``running_by_key`` of each key) and the rate limit's ``tokens``. A saga whose key
    is at its limit is passed over; the ones after it may still be taken."""
    slots = min(want, int(tokens)) if tokens != float("inf") else want
    key_limit = None
    if limits is not None:
        if limits.concurrency is not None:
            slots = min(slots, limits.concurrency - running)
        key_limit = limits.key_concurrency
    taken: list[T] = []
    by_key: dict[str, int] = {}
    for item, key in candidates:
        if len(taken) >= slots:
            break
        if key is not None and key_limit is not None:
            now_running = running_by_key.get(key, 0) + by_key.get(key, 0)
            if now_running >= key_limit:
                continue
            by_key[key] = by_key.get(key, 0) + 1
        taken.append(item)
    return taken
