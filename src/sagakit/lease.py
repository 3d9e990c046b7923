"""Keeping a run's lease alive while its steps run, and cutting a step off when it is lost.

A checkpoint extends the lease as a side effect, so a saga whose steps are quick never renews
it explicitly. Only when no checkpoint was written for a third of the lease is a renewal sent
(its own small write). A lost lease — another run claimed the saga after this one stalled — is
remembered in ``lost`` and logged; the run's next checkpoint is fenced out anyway and raises
``SagaLeaseLostError``.

A step (act or compensation) running when the keeper learns that the lease is lost (a renewal
found another owner) or may have run out (its sweeper tick finds the lease's end passed with
no renewal confirmed: the process was paused, or its renewals did not get through) is cut off:
the keeper cancels the task running it. The engine tells that cancellation from any other by
``cut_off`` and turns it into ``SagaLeaseLostError`` (:meth:`LeaseKeeper.step_cut_off`); a
cancellation from outside stays a cancellation.

One timer per event loop watches every running saga (:class:`_Sweeper`): it ticks every sixth
of the shortest lease in use, so a stale saga is renewed at most half a lease after its last
write, and a saga costs a set insertion, not a timer of its own. Watching a step costs the
engine a ``current_task`` lookup and two attribute writes, no task or timer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any
from uuid import UUID

from sagakit.exceptions import SagaLeaseLostError, SagaStorageError
from sagakit.invocation import StepInvocation
from sagakit.records import SagaAction
from sagakit.storage.liveness import LIVE_MARK, Held, held_by
from sagakit.storage.protocol import LeasedRun

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("sagakit")


_current_tasks = getattr(asyncio.tasks, "_current_tasks", None)
running_task: Callable[[asyncio.AbstractEventLoop | None], asyncio.Task[Any] | None] = (
    _current_tasks.get if isinstance(_current_tasks, dict) else asyncio.current_task)
"""The task running on ``loop`` now: ``asyncio.current_task(loop)``, read straight from asyncio's
own table where it has one (less than half the cost of the call, paid before every step)."""


class LeaseKeeper:
    """``async with LeaseKeeper(run, lease_seconds):`` around the part of a run where steps run.

    :meth:`ensure` is called before every step invocation: a run must not start step code once
    its lease is known lost, or may have run out (its renewal did not get through in time, say
    behind a database lock): another worker may have claimed the saga meanwhile.

    The engine sets ``step_task`` to the task running a step while it runs (None otherwise;
    :func:`running_task`); a step running
    when the lease is found lost or possibly run out is cancelled, with the reason kept in
    ``cut_off`` until the engine takes it back (:meth:`step_cut_off`)."""

    __slots__ = ("_failed_renewals", "_held", "_renewal", "_sweeper", "cut_off", "interval",
                 "lease_seconds", "loop", "lost", "run", "step_task")

    def __init__(self, run: LeasedRun, lease_seconds: float) -> None:
        self.run = run
        self.interval = lease_seconds / 3
        self.lease_seconds = lease_seconds
        self.lost: SagaLeaseLostError | None = None
        self.step_task: asyncio.Task[Any] | None = None
        self.cut_off: SagaLeaseLostError | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: _Sweeper | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._failed_renewals = 0
        self._held: Held | None = None

    async def __aenter__(self) -> LeaseKeeper:
        self.loop = loop = asyncio.get_running_loop()
        if getattr(self.run, "holds_lease", False):
            self._sweeper = _Sweeper.join(self, loop)
            owner: str | None = getattr(self.run, "owner", None)
            if owner is not None and owner[:1] == LIVE_MARK:
                self._watch_session(owner)
        return self

    def _watch_session(self, owner: str) -> None:
        """A run under a live owner id stops as soon as that owner's liveness session is lost
        (see :mod:`sagakit.storage.liveness`); one already lost stops before its first step."""
        held = held_by(owner)
        if held is None:
            self.lost = SagaLeaseLostError(
                f"saga {getattr(self.run, 'saga_id', None)}: the liveness session of {owner} "
                "is gone: another worker may take the saga over now",
                saga_id=getattr(self.run, "saga_id", None))
        else:
            held.keepers.add(self)
            self._held = held

    def lose(self, reason: SagaLeaseLostError) -> None:
        """The lease is to be taken as lost now (its owner's liveness session is gone): no
        step starts any more, and the step in flight is cancelled."""
        if self.lost is None:
            self.lost = reason
            self._cut_off(reason)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sweeper is not None:
            self._sweeper.keepers.discard(self)
            self._sweeper = None
        if self._held is not None:
            self._held.keepers.discard(self)
            self._held = None
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    def ensure(self, saga_id: UUID, saga_name: str, step_name: str) -> None:
        """Raise SagaLeaseLostError if the lease is lost or may have run out."""
        if self.lost is not None:
            raise self.lost
        run = self.run  # what _ran_out tells, inline: this runs before every step
        until = getattr(run, "lease_until", None)
        if until is not None and time.monotonic() >= until and getattr(run, "holds_lease", False):
            raise SagaLeaseLostError(
                f"saga {saga_id}: this run's lease may have run out (no renewal got through "
                f"in time); step {step_name!r} was not started",
                saga_id=saga_id, saga_name=saga_name, step_name=step_name,
            )

    def step_cut_off(self, invocation: StepInvocation) -> SagaLeaseLostError | None:
        """Called by the engine when a step call ends while ``cut_off`` is set (the step was
        cancelled by this keeper, whether it raised, swallowed the cancellation and returned, or
        turned it into another error): withdraw that cancellation request (``Task.uncancel``)
        and return the SagaLeaseLostError to raise in place of the step's outcome. None when
        the task was also cancelled from outside: that cancellation is the one to propagate."""
        reason, self.cut_off = self.cut_off, None
        task = asyncio.current_task(self.loop)
        if reason is None or task is None or task.uncancel() > 0:
            return None
        what = "act" if invocation.action is SagaAction.ACT else "compensation"
        error = SagaLeaseLostError(
            f"saga {invocation.saga_name!r} {invocation.saga_id}: the {what} of step "
            f"{invocation.step_name!r} was cancelled in flight and this run writes nothing "
            f"more ({reason.message})",
            saga_id=invocation.saga_id, saga_name=invocation.saga_name,
            step_name=invocation.step_name,
        )
        error.__cause__ = reason
        return error

    def _ran_out(self, now: float) -> bool:
        """Whether this run's lease may have run out: its end, as last confirmed, has passed."""
        run = self.run
        until = getattr(run, "lease_until", None)
        return until is not None and now >= until and getattr(run, "holds_lease", False)

    def _cut_off(self, reason: SagaLeaseLostError) -> None:
        """Cancel the step running now, if any (once per step)."""
        task = self.step_task
        if task is None or self.cut_off is not None or task.done():
            return
        self.cut_off = reason
        logger.warning("%s: cancelling the step in flight", reason.message)
        task.cancel(f"sagakit: {reason.message}")

    def check(self, now: float, loop: asyncio.AbstractEventLoop) -> None:
        """Cut off the step in flight if the lease may have run out; start a renewal if no
        checkpoint was written for a third of the lease."""
        if self.lost is not None:
            return
        if self.step_task is not None and self._ran_out(now):
            saga_id = getattr(self.run, "saga_id", None)
            self._cut_off(SagaLeaseLostError(
                f"saga {saga_id}: this run's lease may have run out (no renewal got through in "
                "time: the process was paused, or cut off from the database)",
                saga_id=saga_id,
            ))
        last = getattr(self.run, "last_commit", None)
        stale = last is None or now - last >= self.interval
        if stale and (self._renewal is None or self._renewal.done()):
            self._renewal = loop.create_task(self._renew())

    async def _renew(self) -> None:
        sent = time.monotonic()
        try:
            await self.run.renew_lease(self.lease_seconds)
            confirm = getattr(self.run, "confirm_lease", None)
            if confirm is not None:
                confirm(sent)
            self._failed_renewals = 0
        except SagaLeaseLostError as exc:
            self.lost = exc
            logger.error("%s", exc)
            self._cut_off(exc)
        except Exception as exc:
            # One line per run of failures (a database outage would otherwise log every tick);
            # a traceback only for what is not a storage error, which may be a bug.
            self._failed_renewals += 1
            if self._failed_renewals == 1:
                logger.warning("saga %s: lease renewal failed, will retry: %s",
                               getattr(self.run, "saga_id", None), exc,
                               exc_info=not isinstance(exc, SagaStorageError))


class _Sweeper:
    """The one timer of an event loop that checks its running sagas' leases. It stops (and
    forgets the loop) on the first tick that finds no saga running."""

    # Weak keys: a loop closed with sagas still running is not kept alive by its sweeper
    # (which, for that reason, holds no reference to its loop).
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
        weakref.WeakKeyDictionary())

    def __init__(self) -> None:
        self.keepers: set[LeaseKeeper] = set()
        self.period = float("inf")
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def join(cls, keeper: LeaseKeeper, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        sweeper = cls._by_loop.get(loop)
        if sweeper is None:
            sweeper = cls._by_loop[loop] = cls()
        sweeper.keepers.add(keeper)
        period = keeper.interval / 2
        if period < sweeper.period:  # tick often enough for the shortest lease
            sweeper.period = period
            if sweeper._timer is not None:
                sweeper._timer.cancel()
            sweeper._timer = loop.call_later(period, sweeper._tick)
        return sweeper

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        if not self.keepers:
            self._timer = None
            if self._by_loop.get(loop) is self:
                del self._by_loop[loop]
            return
        now = time.monotonic()
        for keeper in list(self.keepers):
            keeper.check(now, loop)
        self._timer = loop.call_later(self.period, self._tick)
