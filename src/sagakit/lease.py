"""Keeping a run's lease alive while its steps run.

A checkpoint extends the lease as a side effect, so a saga whose steps are quick never renews
it explicitly. Only when no checkpoint was written for a third of the lease is a renewal sent
(its own small write). A lost lease — another run claimed the saga after this one stalled — is
remembered in ``lost`` and logged; the run's next checkpoint is fenced out anyway and raises
``SagaLeaseLostError``.

One timer per event loop watches every running saga (:class:`_Sweeper`): it ticks every sixth
of the shortest lease in use, so a stale saga is renewed at most half a lease after its last
write, and a saga costs a set insertion, not a timer of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from uuid import UUID

from sagakit.exceptions import SagaLeaseLostError
from sagakit.storage.protocol import LeasedRun

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("sagakit")


class LeaseKeeper:
    """``async with LeaseKeeper(run, lease_seconds):`` around the part of a run where steps run.

    :meth:`ensure` is called before every step invocation: a run must not start step code once
    its lease is known lost, or may have run out (its renewal did not get through in time, say
    behind a database lock): another worker may have claimed the saga meanwhile."""

    __slots__ = ("_renewal", "_sweeper", "interval", "lease_seconds", "lost", "run")

    def __init__(self, run: LeasedRun, lease_seconds: float) -> None:
        self.run = run
        self.interval = lease_seconds / 3
        self.lease_seconds = lease_seconds
        self.lost: SagaLeaseLostError | None = None
        self._sweeper: _Sweeper | None = None
        self._renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseKeeper:
        if getattr(self.run, "holds_lease", False):
            self._sweeper = _Sweeper.join(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._sweeper is not None:
            self._sweeper.keepers.discard(self)
            self._sweeper = None
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    def ensure(self, saga_id: UUID, saga_name: str, step_name: str) -> None:
        """Raise SagaLeaseLostError if the lease is lost or may have run out."""
        if self.lost is not None:
            raise self.lost
        run = self.run
        until = getattr(run, "lease_until", None)
        if until is not None and getattr(run, "holds_lease", False) and time.monotonic() >= until:
            raise SagaLeaseLostError(
                f"saga {saga_id}: this run's lease may have run out (no renewal got through "
                f"in time); step {step_name!r} was not started",
                saga_id=saga_id, saga_name=saga_name, step_name=step_name,
            )

    def check(self, now: float, loop: asyncio.AbstractEventLoop) -> None:
        """Start a renewal if no checkpoint was written for a third of the lease."""
        if self.lost is not None:
            return
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
        except SagaLeaseLostError as exc:
            self.lost = exc
            logger.error("%s", exc)
        except Exception:
            logger.warning("lease renewal failed; will retry", exc_info=True)


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
    def join(cls, keeper: LeaseKeeper) -> _Sweeper:
        loop = asyncio.get_running_loop()
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
