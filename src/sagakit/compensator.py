"""Compensation: undo completed steps in reverse order, retrying each with backoff.

A compensation that still fails after its last attempt does not stop the others: every step
gets its chance, and the failures are reported together. The saga then stays COMPENSATING for
recovery to retry (and, once recovery attempts run out, PARKED); it is never reported as a
clean FAILED rollback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Awaitable, Callable, Sequence

from sagakit.exceptions import SagaLeaseLostError

__all__ = ["CompensationFailure", "CompensationTask", "RetryPolicy", "SagaCompensator"]


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before attempt i+1 is ``delay * backoff**(i-1)``,
    capped at ``max_delay``, then spread by up to ``jitter`` (a fraction, 0.1 = +-10%)."""

    attempts: int = 3
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"compensation_retry_count must be at least 1, got {self.attempts}")
        if self.delay < 0 or self.max_delay < 0:
            raise ValueError("compensation retry delays cannot be negative")
        if self.backoff < 1:
            raise ValueError(f"compensation_retry_backoff must be >= 1, got {self.backoff}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"compensation_retry_jitter must be within [0, 1], got {self.jitter}")

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(attempts: int, delay: float, backoff: float, max_delay: float,
           jitter: float) -> RetryPolicy:
        """The (shared, immutable) policy for these settings; raises ValueError like the
        constructor. Cached: a transaction per saga need not validate the same settings."""
        return RetryPolicy(attempts, delay, backoff, max_delay, jitter)

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2, 3, ...)."""
        wait = min(self.delay * self.backoff ** (attempt - 2), self.max_delay)
        if self.jitter:
            wait *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(wait, 0.0)


@dataclasses.dataclass(frozen=True, slots=True)
class CompensationTask:
    """One step to compensate: ``call(attempt)`` runs its compensate once."""

    step_name: str
    call: Callable[[int], Awaitable[None]]


@dataclasses.dataclass(frozen=True, slots=True)
class CompensationFailure:
    step_name: str
    error: Exception
    attempts: int


class SagaCompensator:
    """Runs compensation tasks in the order given.

    After each step's outcome, ``record(step_name, error_or_None, attempts)`` is awaited; after
    each *successfully* compensated step, ``on_after_compensate_step()`` is awaited too. The
    orchestrator buffers the step's log entry in ``record`` and commits it in the callback, so
    each compensated step is durable before the next one starts (a compensation that failed for
    good is committed by ``record`` itself).
    """

    def __init__(
        self,
        retry: RetryPolicy,
        *,
        record: Callable[[str, Exception | None, int], Awaitable[None]] | None = None,
        on_after_compensate_step: Callable[[], Awaitable[None]] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.retry = retry
        self._record = record
        self._after = on_after_compensate_step
        self._should_stop = should_stop
        self.stopped = False
        """True when ``should_stop()`` ended the run before every task was compensated."""

    async def compensate(self, tasks: Sequence[CompensationTask]) -> list[CompensationFailure]:
        failures: list[CompensationFailure] = []
        for position, task in enumerate(tasks):
            if position and self._should_stop is not None and self._should_stop():
                self.stopped = True
                break
            error, attempts = await self._run(task)
            if error is not None:
                failures.append(CompensationFailure(task.step_name, error, attempts))
            if self._record is not None:
                await self._record(task.step_name, error, attempts)
            if error is None and self._after is not None:
                await self._after()
        return failures

    async def _run(self, task: CompensationTask) -> tuple[Exception | None, int]:
        error: Exception | None = None
        for attempt in range(1, self.retry.attempts + 1):
            if attempt > 1:
                await asyncio.sleep(self.retry.wait_before(attempt))
            try:
                await task.call(attempt)
            except SagaLeaseLostError:
                raise  # another run owns the saga now: no retry, no record
            except Exception as exc:
                error = exc
            else:
                return None, attempt
        return error, self.retry.attempts
