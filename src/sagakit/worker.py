"""The recovery worker: finds interrupted sagas and drives each to a terminal state.

Run one or many, on one machine or many, against one database: the database is the only
coordination point. Each saga is claimed atomically through its lease (a conditional UPDATE), so
exactly one worker runs it at a time; a worker that finds a saga taken simply moves on.

Database outages: a worker keeps running through them. A poll that fails (the database down or
restarting) claims nothing; the worker logs one warning line when the outage begins and one when
it ends, and polls again with exponential backoff and jitter (from ``poll_interval`` up to
``max_backoff``), so a pool of workers neither floods the log nor hammers a recovering server.
Sagas in hand whose checkpoints fail stay at their last checkpoint and are recovered later.

Shutdown is graceful: after :meth:`RecoveryWorker.stop` (or SIGTERM/SIGINT when
:meth:`RecoveryWorker.run` installs its handlers) the worker takes no new saga, and each saga in
hand stops at its next checkpoint with its lease released, for any worker to continue. Sagas
still busy after ``shutdown_timeout`` seconds are cancelled: they too rest at their last
checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from typing import Any
from uuid import UUID

from sagakit import settings
from sagakit.exceptions import (
    SagaBusyError,
    SagaConcurrencyError,
    SagaNotFoundError,
    SagaStorageError,
)
from sagakit.mediator import SagaMap
from sagakit.middleware import saga_log_context
from sagakit.presence import liveness_session, wake_ups
from sagakit.queue import DEFAULT_QUEUE, check_queue_name
from sagakit.records import SagaState, SagaStatus
from sagakit.recovery import RecoveryOptions, _drive
from sagakit.saga import Saga
from sagakit.storage.liveness import Liveness
from sagakit.storage.protocol import SagaStorage
from sagakit.storage.run import new_owner_id

__all__ = ["RecoveryOutcome", "RecoveryWorker"]

logger = logging.getLogger("sagakit.worker")


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryOutcome:
    """What one recovery attempt did: the saga's status afterwards, or the error it raised
    (``busy`` when another worker had it first)."""

    saga_id: UUID
    status: SagaStatus | None = None
    error: BaseException | None = None
    busy: bool = False


class RecoveryWorker:
    """Polls the storage for interrupted sagas and recovers them, ``concurrency`` at a time.

    ``sagas`` is a :class:`SagaMap` or saga classes; a stored saga whose name none of them has is
    skipped (logged), never touched. Every other option is a :class:`RecoveryOptions` field or
    the polling behaviour: ``poll_interval`` seconds between polls that found nothing,
    ``batch_size`` sagas listed per poll, ``stale_after_seconds`` (only sagas not updated for
    that long), ``saga_name`` (only that saga).

    The numbers are checked here (ValueError naming the option): ``concurrency`` and
    ``batch_size`` integers >= 1 (``batch_size`` None: ``concurrency * 4``), ``poll_interval``
    finite seconds > 0, ``stale_after_seconds`` None or finite seconds >= 0,
    ``shutdown_timeout`` finite seconds >= 0.

    Submitted sagas: the worker also serves ``queues`` (default: the ``"default"`` queue; an
    empty list serves none), claiming their sagas within each queue's limits (see
    :mod:`sagakit.queue`). Each poll shares the free slots between recovery and the queues,
    in an order that rotates from poll to poll, so that a flood in one queue does not starve
    another. While polls find nothing the wait between them grows from ``poll_interval`` to
    ``max_idle_poll`` (default: five times ``poll_interval``, fifteen times while the storage
    delivers wake-ups), with jitter; a wake-up from
    the storage (a submit, a freed slot, a durable wait falling due; PostgreSQL's
    LISTEN/NOTIFY, or the memory storage) ends the wait at once. A lost wake-up only delays
    work until the next poll.

    Failover: with ``liveness`` (the default, where the storage has liveness sessions) the
    worker holds one while it runs and claims under its live owner id (see
    :mod:`sagakit.storage.liveness`): should the worker die, another worker takes its sagas
    over instead of waiting for their leases. Every ``failover_poll`` seconds (with jitter)
    each worker's session looks for such orphans, one query, and wakes the worker to claim
    them; a worker without liveness still takes them over at lease expiry.
    """

    def __init__(
        self,
        storage: SagaStorage,
        sagas: SagaMap | Iterable[type[Saga[Any]]],
        container: Any = None,
        *,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        batch_size: int | None = None,
        stale_after_seconds: float | None = None,
        saga_name: str | None = None,
        shutdown_timeout: float = 30.0,
        options: RecoveryOptions | None = None,
        queues: Sequence[str] | None = (DEFAULT_QUEUE,),
        max_idle_poll: float | None = None,
        liveness: bool = True,
        failover_poll: float = 2.0,
    ) -> None:
        self.concurrency = settings.count("concurrency", concurrency)
        self.poll_interval = settings.seconds("poll_interval", poll_interval, exclusive=True)
        self.batch_size = (self.concurrency * 4 if batch_size is None
                           else settings.count("batch_size", batch_size))
        self.stale_after_seconds = settings.seconds("stale_after_seconds", stale_after_seconds,
                                                    allow_none=True)
        self.shutdown_timeout = settings.seconds("shutdown_timeout", shutdown_timeout)
        self._idle_ceiling_default = max_idle_poll is None
        self.queues: tuple[str, ...] = tuple(
            check_queue_name(q, "queues") for q in (queues or ()))
        self.max_idle_poll = settings.seconds(
            "max_idle_poll", min(5 * self.poll_interval, settings.MAX_SECONDS)
            if max_idle_poll is None
            else max_idle_poll, minimum=self.poll_interval)
        self.failover_poll = settings.seconds("failover_poll", failover_poll, exclusive=True)
        self.liveness: Liveness | None = None
        """The liveness session while the worker runs with one (None otherwise)."""
        self._use_liveness = liveness
        self.storage = storage
        self.container = container
        self._sagas = {s.name: s for s in sagas}
        self.saga_name = saga_name
        base = options or RecoveryOptions()
        self.options = dataclasses.replace(base, should_stop=self.stopping)
        self.outcomes: list[RecoveryOutcome] = []
        """Every attempt this worker made, in order (handy for tests and operators)."""
        self.owner = new_owner_id()
        """The lease owner id the worker claims under now (a live one while its liveness
        session holds: it changes when the session is lost and opened again)."""
        self.max_backoff = max(30.0, self.poll_interval)
        """The longest wait between polls while the database keeps failing (seconds)."""
        self.failed_polls = 0
        """Polls that failed in a row (the database unreachable, say); 0 when the last one
        worked."""
        self._claim_due_works = True
        self._queues_work = bool(self.queues)
        self._turn = 0  # rotates which source (recovery, then each queue) claims first
        self._idle_polls = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._in_hand: set[UUID] = set()
        self._claimed_at: dict[UUID, float] = {}  # saga id -> when its claim was sent
        self._resting: dict[str | None, float] = {}  # source -> not asked again before then

    def stopping(self) -> bool:
        """True once a shutdown was asked for."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask for a graceful shutdown (safe to call from a signal handler)."""
        self._stop.set()

    async def run_once(self) -> list[RecoveryOutcome]:
        """One poll: claim up to ``concurrency`` due sagas in one atomic step and recover them
        concurrently. Workers polling together claim disjoint sagas (the claim skips rows
        another worker is claiming). A storage without ``claim_due`` (or whose ``claim_due``
        raises NotImplementedError) is polled by listing due sagas and claiming them one by one
        (a saga another worker won is skipped)."""
        if not self._claims_due():
            return await self._run_listed()
        claimed = await self._claim(self.concurrency)
        if not self._claims_due():
            return await self._run_listed()
        return list(await asyncio.gather(*(self.recover(s.saga_id, s) for s in claimed)))

    async def _claim_all(self, free: int) -> list[SagaState]:
        """Share ``free`` slots between recovery and each queue: a first pass gives each source
        its share, in an order that rotates every poll; a second pass offers what is left to
        the sources that filled their share."""
        sources: list[str | None] = [None, *self.queues] if self._queues_work else [None]
        turn = self._turn % len(sources)
        self._turn += 1
        sources = sources[turn:] + sources[:turn]
        claimed: list[SagaState] = []
        full: list[str | None] = []
        for index, source in enumerate(sources):
            share = -(-(free - len(claimed)) // (len(sources) - index))
            if share <= 0:
                break
            got = await self._claim_from(source, share)
            claimed += got
            if len(got) == share:
                full.append(source)
        for source in full:
            left = free - len(claimed)
            if left <= 0:
                break
            claimed += await self._claim_from(source, left)
        return claimed

    async def _claim_from(self, source: str | None, limit: int) -> list[SagaState]:
        """Claim up to ``limit`` sagas from one source (None: recovery; else a queue). A source
        whose last claim found nothing rests for ``poll_interval`` seconds, or until a wake-up:
        a busy worker refilling its slots one by one asks the sources that have work, not the
        empty ones each time (without wake-ups, new work there waits a poll, as when idle)."""
        if self._resting.get(source, 0.0) > time.monotonic():
            return []
        if source is None:
            claimed = await self._claim(limit) if self._claims_due() else []
        else:
            claim_queued = (getattr(self.storage, "claim_queued", None) if self._queues_work
                            else None)
            if claim_queued is None:  # a storage of the seed's protocol: no submitted sagas
                self._no_queues()
                return []
            claimed = await self._claiming(claim_queued(
                self.owner, source, limit=limit, lease_seconds=self.options.lease_seconds,
                max_recovery_attempts=self.options.max_recovery_attempts,
                saga_names=frozenset(self._sagas),
            ), queued=True)
        if claimed or self.failed_polls:
            self._resting.pop(source, None)
        else:
            self._resting[source] = time.monotonic() + self.poll_interval
        return claimed

    def _no_queues(self) -> None:
        if self._queues_work:
            logger.warning("%s cannot hold submitted sagas: not serving queues %s",
                           type(self.storage).__name__, ", ".join(self.queues))
            self._queues_work = False

    def _claims_due(self) -> bool:
        return self._claim_due_works and getattr(self.storage, "claim_due", None) is not None

    async def _claim(self, limit: int) -> list[SagaState]:
        """Claim due sagas; a failing claim (the database briefly unreachable, say) claims
        nothing, so a worker outlives database outages (see :meth:`_poll_failed`)."""
        names = frozenset({self.saga_name} if self.saga_name else self._sagas)
        return await self._claiming(self.storage.claim_due(
            self.owner,
            limit=limit,
            lease_seconds=self.options.lease_seconds,
            max_recovery_attempts=self.options.max_recovery_attempts,
            saga_names=names & frozenset(self._sagas),
            stale_after_seconds=self.stale_after_seconds,
        ), queued=False)

    async def _claiming(self, claim: Awaitable[list[SagaState]], *,
                        queued: bool) -> list[SagaState]:
        """Await one claim: a storage without that kind of claim (NotImplementedError) is not
        asked again; a failure claims nothing (see :meth:`_poll_failed`). Each saga claimed
        is noted with when the claim was sent: its run counts the lease from then (the
        database started it no earlier), not from when the run begins."""
        sent = time.monotonic()
        try:
            claimed = await claim
        except NotImplementedError:  # e.g. the protocol's stub, inherited
            if queued:
                self._no_queues()
            else:
                self._claim_due_works = False
            return []
        except Exception as error:
            self._poll_failed(error)
            return []
        self._poll_worked()
        for state in claimed:
            self._claimed_at[state.saga_id] = sent
        return claimed

    def _poll_failed(self, error: Exception) -> None:
        """Count a failed poll; log the first of a run of them (a traceback only for errors
        that are not the storage's own, which may be bugs)."""
        self.failed_polls += 1
        if self.failed_polls == 1:
            logger.warning("polling for due sagas failed, retrying with backoff: %s", error,
                           exc_info=not isinstance(error, SagaStorageError))
        else:
            logger.debug("poll %d in a row failed: %s", self.failed_polls, error)

    def _poll_worked(self) -> None:
        if self.failed_polls:
            logger.warning("polling for due sagas works again after %d failed polls",
                           self.failed_polls)
            self.failed_polls = 0

    def poll_wait(self) -> float:
        """Seconds to wait before the next poll, when the last one found nothing to do:
        ``poll_interval`` after work, growing by half with each idle poll up to
        ``max_idle_poll``; while polls fail, twice as long after each failure up to
        ``max_backoff``. Spread by +-20% so workers do not poll in step."""
        if not self.failed_polls:
            if self._idle_polls <= 1:
                return self.poll_interval
            grown = self.poll_interval * 1.5 ** min(self._idle_polls - 1, 60)
            return min(grown, self.max_idle_poll) * random.uniform(0.8, 1.2)
        wait = min(self.poll_interval * 2.0 ** min(self.failed_polls - 1, 30), self.max_backoff)
        return wait * random.uniform(0.8, 1.2)

    async def _run_listed(self) -> list[RecoveryOutcome]:
        try:
            due = await self.storage.get_sagas_for_recovery(
                self.batch_size,
                max_recovery_attempts=self.options.max_recovery_attempts,
                stale_after_seconds=self.stale_after_seconds,
                saga_name=self.saga_name,
            )
        except Exception as error:
            self._poll_failed(error)
            return []
        self._poll_worked()
        random.shuffle(due)  # workers polling together then collide less
        slots = asyncio.Semaphore(self.concurrency)

        async def one(saga_id: UUID) -> RecoveryOutcome:
            async with slots:
                if self.stopping():
                    return RecoveryOutcome(saga_id, busy=True)
                return await self.recover(saga_id)

        return list(await asyncio.gather(*(one(i) for i in due if i not in self._in_hand)))

    async def recover(self, saga_id: UUID, claimed: SagaState | None = None) -> RecoveryOutcome:
        """Recover one saga by id (or one this worker already claimed), recording the outcome;
        never raises for a saga's failure."""
        self._in_hand.add(saga_id)
        try:
            with saga_log_context(saga_id):
                outcome = await self._recover(saga_id, claimed)
        finally:
            self._in_hand.discard(saga_id)
        self.outcomes.append(outcome)
        return outcome

    async def _recover(self, saga_id: UUID, claimed: SagaState | None) -> RecoveryOutcome:
        claimed_at = self._claimed_at.pop(saga_id, None)
        try:
            state = claimed if claimed is not None else await self._stored(saga_id)
            if state is None:  # a storage without get_saga: only a worker of one saga knows
                saga = self._only_saga()
                if saga is None:
                    logger.warning("saga %s: the storage cannot tell its name (no get_saga); "
                                   "give this worker one saga (saga_name) to recover it",
                                   saga_id)
                    return RecoveryOutcome(saga_id)
            else:
                saga = self._sagas.get(state.name)
                if saga is None:
                    logger.warning("saga %s: no definition named %r here; skipped", saga_id,
                                   state.name)
                    return RecoveryOutcome(saga_id, state.status)
            status = await _drive(saga(), saga_id, None, self.container, self.storage,
                                  self.options, "recover", claimed=claimed,
                                  claimed_at=claimed_at)
        except (SagaBusyError, SagaNotFoundError) as exc:
            return RecoveryOutcome(saga_id, error=exc, busy=isinstance(exc, SagaBusyError))
        except (SagaStorageError, SagaConcurrencyError) as exc:
            # An outage, or the saga taken over (a lost lease or session): expected in a
            # fleet, recovered by whoever holds the saga now; one line, no traceback.
            logger.warning("saga %s: recovery attempt stopped: %s", saga_id, exc)
            return RecoveryOutcome(saga_id, error=exc)
        except Exception as exc:
            logger.exception("saga %s: recovery attempt failed", saga_id)
            return RecoveryOutcome(saga_id, error=exc)
        logger.info("saga %s (%s): recovered to %s", saga_id, saga.name, status.value)
        return RecoveryOutcome(saga_id, status)

    async def _stored(self, saga_id: UUID) -> SagaState | None:
        try:
            return await self.storage.get_saga(saga_id)
        except NotImplementedError:  # the seed's protocol has no get_saga
            return None

    def _only_saga(self) -> type[Saga[Any]] | None:
        if self.saga_name is not None:
            return self._sagas.get(self.saga_name)
        return next(iter(self._sagas.values())) if len(self._sagas) == 1 else None

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Poll and recover until :meth:`stop` (or SIGTERM/SIGINT) — then shut down gracefully."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
                    installed.append(sig)
        try:
            await self._loop()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _loop(self) -> None:
        if self._claims_due():
            async with self._live():
                await self._claim_loop()
        if not self._claims_due():  # no claim_due, or it turned out to raise NotImplementedError
            await self._poll_loop()

    async def _claim_loop(self) -> None:
        in_flight: set[asyncio.Task[RecoveryOutcome]] = set()
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            async with self._wake_ups():
                while not self.stopping():
                    free = self.concurrency - len(in_flight)
                    self._wake.clear()
                    claimed = await self._claim_all(free) if free > 0 else []
                    if not self._claims_due():
                        break
                    for state in claimed:  # a slot is refilled as soon as a saga finishes
                        in_flight.add(asyncio.create_task(self.recover(state.saga_id, state)))
                    if claimed:
                        self._idle_polls = 0
                        if len(in_flight) < self.concurrency:
                            continue  # there may be more due right away
                    elif free > 0:
                        self._idle_polls += 1
                    timeout = None if len(in_flight) >= self.concurrency else self.poll_wait()
                    woken = asyncio.ensure_future(self._wake.wait())
                    try:
                        done, _ = await asyncio.wait({*in_flight, stopped, woken},
                                                     timeout=timeout,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
                    if woken in done:
                        self._idle_polls = 0
                    in_flight -= done
        finally:
            stopped.cancel()
            await self._drain(in_flight)

    def wake(self, _: object = None) -> None:
        """Poll now (a storage's wake-up callback; safe to call from the loop's thread)."""
        self._resting.clear()
        self._wake.set()
        if self.liveness is not None:  # work is coming: watch for dead workers closely
            self.liveness.poke()

    @contextlib.asynccontextmanager
    async def _live(self) -> AsyncIterator[None]:
        """Hold a liveness session while the worker runs (where the storage has them)."""
        if not self._use_liveness:
            yield
            return
        async with liveness_session(self.storage, every=self.failover_poll,
                                    on_change=self._owner_changed,
                                    on_orphans=self.wake) as self.liveness:
            try:
                yield
            finally:
                self.liveness = None

    def _owner_changed(self, owner: str) -> None:
        self.owner = owner

    @contextlib.asynccontextmanager
    async def _wake_ups(self) -> AsyncIterator[None]:
        """Listen to the storage's wake-ups while the worker runs; while they are delivered,
        polls (mostly for interrupted sagas then) and idle liveness looks may be further
        apart."""
        async with wake_ups(self.storage, self.wake) as pushed:
            if not pushed:
                yield
                return
            ceiling = self.max_idle_poll
            if self._idle_ceiling_default:
                self.max_idle_poll = min(15 * self.poll_interval, settings.MAX_SECONDS)
            if self.liveness is not None:
                self.liveness.max_quiet = self.max_idle_poll
            try:
                yield
            finally:
                self.max_idle_poll = ceiling
                if self.liveness is not None:
                    self.liveness.max_quiet = self.liveness.every

    async def _drain(self, in_flight: set[asyncio.Task[RecoveryOutcome]]) -> None:
        """Shutting down: sagas in hand stop at their next checkpoint; past the timeout, cancel."""
        if not in_flight:
            return
        _, pending = await asyncio.wait(in_flight, timeout=self.shutdown_timeout)
        if pending:
            logger.warning("shutdown timeout: cancelling sagas still in hand")
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _poll_loop(self) -> None:
        """For storages without ``claim_due``: poll, recover the batch, poll again."""
        while not self.stopping():
            poll = asyncio.ensure_future(self.run_once())
            stopped = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not poll.done():
                await self._drain({poll})  # type: ignore[arg-type]
                return
            outcomes = poll.result()
            if not any(o.status is not None or (o.error is not None and not o.busy)
                       for o in outcomes):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.poll_wait())
