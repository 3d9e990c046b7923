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

from sagakit import settings
from sagakit.exceptions import SagaLeaseLostError
from sagakit.retry import backoff_wait

__all__ = ["CompensationFailure", "CompensationTask", "RetryPolicy", "SagaCompensator"]


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before attempt i+1 is ``delay * backoff**(i-1)``,
    capped at ``max_delay``, then spread by up to ``jitter`` (a fraction, 0.1 = +-10%).

    Checked when built (see :mod:`sagakit.settings`): ``attempts`` an integer >= 1, ``delay``
    and ``max_delay`` finite seconds >= 0, ``backoff`` a finite number >= 1, ``jitter`` within
    [0, 1]; else ValueError naming the transaction option (``compensation_retry_count``,
    ``compensation_retry_delay``, ``compensation_retry_backoff``,
    ``compensation_retry_max_delay``, ``compensation_retry_jitter``)."""

    attempts: int = 3
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        settings.count("compensation_retry_count", self.attempts)
        settings.seconds("compensation_retry_delay", self.delay)
        settings.number("compensation_retry_backoff", self.backoff, minimum=1.0)
        settings.seconds("compensation_retry_max_delay", self.max_delay)
        settings.fraction("compensation_retry_jitter", self.jitter)

    @staticmethod
    def of(attempts: int, delay: float, backoff: float, max_delay: float,
           jitter: float) -> RetryPolicy:
        """The (shared, immutable) policy for these settings; raises ValueError like the
        constructor. Cached: a transaction per saga need not check the same settings again.
        A refused value is never cached (the constructor raised), and the cache tells types
        apart, so ``True`` cannot pass for an already cached ``1``."""
        try:
            return _policy(attempts, delay, backoff, max_delay, jitter)
        except TypeError:  # unhashable, so not a number: the constructor says which
            return RetryPolicy(attempts, delay, backoff, max_delay, jitter)

    def wait_before(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds to wait before ``attempt`` (2, 3, ...): finite and >= 0 for any attempt.
        The formula is :func:`sagakit.retry.backoff_wait`, jitter drawn from ``rng()``."""
        return backoff_wait(attempt, delay=self.delay, backoff=self.backoff,
                            max_delay=self.max_delay, jitter=self.jitter, rng=rng)


@functools.lru_cache(maxsize=64, typed=True)
def _policy(attempts: int, delay: float, backoff: float, max_delay: float,
            jitter: float) -> RetryPolicy:
    return RetryPolicy(attempts, delay, backoff, max_delay, jitter)


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
