"""Retry policies of step acts, and permanent errors (see docs/forward-recovery.md).

- :class:`Retry` says how often a step's act is tried and how long to wait between attempts;
  it is set on a step handler class (``retry = Retry(...)``), per saga as a default
  (``Saga.retry``), or for one step of one saga (``Step(Handler, retry=...)``).
- An error is never retried when it is a :class:`PermanentError`, was marked with
  :func:`permanent`, is an instance of the policy's ``give_up_on``, or is not an instance of its
  ``retry_on``. ``give_up_on`` wins over ``retry_on``.
- The waits grow by ``backoff`` from ``delay``, capped at ``max_delay``, spread by ``jitter``:
  :func:`backoff_wait` is the one formula, shared with the compensation retries
  (:class:`sagakit.RetryPolicy`).

What follows a failed attempt (retry after a wait, give up, the saga's deadline, durable or
in-process wait) is decided by :func:`sagakit.plan.after_failure`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

from sagakit import settings
from sagakit.breaker import exception_types

__all__ = ["PermanentError", "Retry", "backoff_wait", "is_permanent", "permanent"]

E = TypeVar("E", bound=BaseException)

_PERMANENT = "__sagakit_permanent__"
"""The attribute :func:`permanent` sets on an exception instance."""


class PermanentError(Exception):
    """An error that must never be retried: raise it (or a subclass of it) from a step's act,
    e.g. for a declined card. The step fails at once, whatever its retry policy says."""


def permanent(error: E) -> E:
    """Mark ``error`` (any exception instance) as permanent, so no retry policy retries it, and
    return it: ``raise permanent(ValueError("card declined"))``. TypeError for anything but an
    exception instance."""
    if not isinstance(error, BaseException):
        raise TypeError(f"permanent() takes an exception instance, got {error!r:.80}")
    setattr(error, _PERMANENT, True)
    return error


def is_permanent(error: BaseException) -> bool:
    """Whether ``error`` is a :class:`PermanentError` or was marked by :func:`permanent`."""
    return isinstance(error, PermanentError) or getattr(error, _PERMANENT, False) is True


def backoff_wait(
    attempt: int, *, delay: float, backoff: float, max_delay: float, jitter: float,
    rng: Callable[[], float],
) -> float:
    """Seconds to wait before ``attempt`` (2, 3, ...): ``delay * backoff**(attempt - 2)``,
    capped at ``max_delay``, then multiplied by ``1 + jitter * (2 * rng() - 1)`` (``rng()`` in
    [0, 1), so within +-``jitter``). Finite and >= 0 for any attempt (the settings are checked
    when a policy is built); ``rng`` is called only when there is jitter to draw."""
    if not delay:
        return 0.0
    try:
        growth = backoff ** (attempt - 2)
    except OverflowError:  # past the float range: the cap applies
        growth = math.inf
    wait = min(delay * growth, max_delay)
    if jitter:
        wait *= 1 + jitter * (2 * rng() - 1)
    return max(wait, 0.0)


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """How a step's act is retried. ``attempts`` counts every attempt (1: never retried); the
    wait before attempt i+1 is ``delay * backoff**(i-1)`` seconds, capped at ``max_delay``, then
    spread by up to ``jitter`` (a fraction, 0.1 = +-10%). Only errors that are instances of
    ``retry_on`` and not of ``give_up_on`` are retried, and never a permanent one (see
    :func:`permanent`).

    Checked when built: ``attempts`` an integer >= 1, ``delay`` and ``max_delay`` finite
    seconds >= 0, ``backoff`` a finite number >= 1, ``jitter`` within [0, 1] (ValueError naming
    the option, as for every setting, see :mod:`sagakit.settings`); ``retry_on`` and
    ``give_up_on`` one exception class or a tuple of them (TypeError otherwise; kept as
    tuples)."""

    attempts: int = 3
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        settings.count("Retry attempts", self.attempts)
        settings.seconds("Retry delay", self.delay)
        settings.number("Retry backoff", self.backoff, minimum=1.0)
        settings.seconds("Retry max_delay", self.max_delay)
        settings.fraction("Retry jitter", self.jitter)
        object.__setattr__(self, "retry_on", exception_types(self.retry_on, "Retry retry_on"))
        object.__setattr__(self, "give_up_on",
                           exception_types(self.give_up_on, "Retry give_up_on"))

    def wait_before(self, attempt: int, rng: Callable[[], float]) -> float:
        """Seconds to wait before ``attempt`` (2, 3, ...), jitter drawn from ``rng()`` in
        [0, 1) (e.g. ``random.random``): see :func:`backoff_wait`."""
        return backoff_wait(attempt, delay=self.delay, backoff=self.backoff,
                            max_delay=self.max_delay, jitter=self.jitter, rng=rng)

    def retries(self, error: BaseException) -> bool:
        """Whether this policy retries ``error`` (attempts left aside): False for a permanent
        error, an instance of ``give_up_on`` (which wins over ``retry_on``), or an error that
        is not an instance of ``retry_on``."""
        return self.refusal(error) is None

    def refusal(self, error: BaseException) -> str | None:
        """Why this policy does not retry ``error`` (see :meth:`retries`), or None when it
        does."""
        kind = type(error).__name__
        if is_permanent(error):
            return f"{kind} is a permanent error"
        if isinstance(error, self.give_up_on):
            return f"{kind} is in give_up_on"
        if not isinstance(error, self.retry_on):
            return f"{kind} is not in retry_on"
        return None
