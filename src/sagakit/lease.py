"""Keeping a run's lease alive while its steps run.

A checkpoint extends the lease as a side effect, so a saga whose steps are quick never renews
it explicitly. A timer fires every third of the lease; only when no checkpoint was written
within that time does it send a renewal (its own small write). A lost lease — another run
claimed the saga after this one stalled — is remembered in ``lost`` and logged; the run's next
checkpoint is fenced out anyway and raises ``SagaLeaseLostError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sagakit.exceptions import SagaLeaseLostError
from sagakit.storage.protocol import LeasedRun

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("sagakit")


class LeaseKeeper:
    """``async with LeaseKeeper(run, lease_seconds):`` around the part of a run where steps run.

    Uses a loop timer, not a task, while nothing needs renewing: a saga costs one timer handle.
    """

    def __init__(self, run: LeasedRun, lease_seconds: float) -> None:
        self.run = run
        self.interval = lease_seconds / 3
        self.lease_seconds = lease_seconds
        self.lost: SagaLeaseLostError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._renewal: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaseKeeper:
        if getattr(self.run, "holds_lease", False):
            self._loop = asyncio.get_running_loop()
            self._timer = self._loop.call_later(self.interval, self._tick)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._loop = None  # no more ticks
        if self._timer is not None:
            self._timer.cancel()
        renewal = self._renewal
        if renewal is not None and not renewal.done():
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    def _tick(self) -> None:
        loop = self._loop
        if loop is None or self.lost is not None:
            return
        last = getattr(self.run, "last_commit", None)
        stale = last is None or time.monotonic() - last >= self.interval
        if stale and (self._renewal is None or self._renewal.done()):
            self._renewal = loop.create_task(self._renew())
        self._timer = loop.call_later(self.interval, self._tick)

    async def _renew(self) -> None:
        try:
            await self.run.renew_lease(self.lease_seconds)
        except SagaLeaseLostError as exc:
            self.lost = exc
            logger.error("%s", exc)
        except Exception:
            logger.warning("lease renewal failed; will retry", exc_info=True)
