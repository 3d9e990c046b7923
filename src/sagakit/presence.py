"""What a running worker holds at its storage besides its leases, each where the storage has
one: a liveness session (:mod:`sagakit.storage.liveness`: the worker's sagas are taken over at
once should it die) and a wake-up listener (new work ends the wait between polls at once).

Neither is needed for correctness: without a liveness session a dead worker's sagas wait for
their leases; without wake-ups the next poll finds everything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sagakit.storage.liveness import Liveness

__all__ = ["liveness_session", "wake_ups"]

logger = logging.getLogger("sagakit.worker")


@contextlib.asynccontextmanager
async def liveness_session(
    storage: Any, *, every: float, on_change: Callable[[str], object],
    on_orphans: Callable[[], object],
) -> AsyncIterator[Liveness | None]:
    """Hold the storage's liveness session for the block (None: the storage has none).
    ``on_change(owner)`` is told the owner id to claim under, on entry and whenever the session
    is lost and opened again; ``on_orphans()`` when a look every ``every`` seconds finds sagas
    of dead owners. A session that cannot open does not fail the block: it is retried in the
    background (see :class:`~sagakit.storage.liveness.Liveness`)."""
    make = getattr(storage, "liveness", None)
    if make is None:
        yield None
        return
    liveness: Liveness = make()
    liveness.on_change = on_change
    liveness.on_orphans = on_orphans
    liveness.every = every
    async with liveness:
        yield liveness


@contextlib.asynccontextmanager
async def wake_ups(storage: Any, on_wake: Callable[[object], object]) -> AsyncIterator[bool]:
    """Listen to the storage's wake-ups for the block; yields whether they are delivered. A
    storage without them (or whose database has none) yields False; so does a listener that
    fails to start (logged once: polling alone still finds everything)."""
    listen = getattr(storage, "listen", None)
    listener = None
    if listen is not None:
        try:
            listener = listen(on_wake)
            if listener is not None:
                await listener.__aenter__()
        except Exception as error:
            logger.warning("wake-ups unavailable, polling only: %s", error)
            listener = None
    try:
        yield listener is not None
    finally:
        if listener is not None:
            await listener.__aexit__(None, None, None)
