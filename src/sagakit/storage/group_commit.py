"""Group commit: the checkpoints and starts of concurrently running sagas share one transaction.

Up to ``max_in_flight`` batches are written at once, each on its own connection; while they are
busy, new writes queue up, and the next free writer takes what is queued as one batch (at most
``max_batch`` writes and about ``max_batch_bytes`` of contexts, of distinct sagas: a second write
of a saga waits for the next batch). No timers: a lightly loaded storage writes each checkpoint
or start at once, in the caller's task, and batches grow only as the load does. Each saga's ``commit()`` (or start) returns only after
the batch holding its write is durable.

A large batch may be written as ``parallel`` transactions at once, each of at least
``min_part`` writes, on as many connections: MySQL/MariaDB run one connection's statements on one
server thread, so one big transaction would leave the server's other cores idle (the storage
sets ``parallel=2`` there; PostgreSQL writes a batch fastest as one statement).

Saga starts join batches where the storage can insert many sagas in one statement and tell
which ids already existed (PostgreSQL, MySQL/MariaDB); elsewhere (SQLite) each start is written
at once. A start whose id exists writes nothing and reports so: its run claims the saga instead.

Isolation between neighbours: every checkpoint stays fenced by its own version and lease owner,
so a checkpoint that no longer matches is simply not written and only its saga gets the error
(diagnosed on its own). If the batch as a whole fails (a driver error, a deadlock, a duplicate
start id on MySQL/MariaDB), each of its writes is retried alone, so one bad write fails only its
own saga.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from sagakit import settings
from sagakit.exceptions import SagaConcurrencyError
from sagakit.storage.faults import reconnectable
from sagakit.storage.pool import LeasedStart
from sagakit.storage.run import Checkpoint

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["GroupCommitter"]

_T = TypeVar("_T")
_Item = tuple["Checkpoint | LeasedStart", "str | None", "asyncio.Future[Any]"]


class GroupCommitter:
    """Coalesces update checkpoints and saga starts of different sagas into batches of at most
    ``max_batch``. Every size is an integer >= 1 (ValueError naming it otherwise)."""

    def __init__(
        self, storage: SqlAlchemySagaStorage, max_batch: int = 256, max_in_flight: int = 4,
        max_batch_bytes: int = 4 * 1024 * 1024, parallel: int = 1, min_part: int = 16,
    ) -> None:
        self.max_batch = settings.count("max_batch", max_batch)
        self.max_in_flight = settings.count("max_in_flight", max_in_flight)
        self.parallel = settings.count("parallel", parallel)
        self.min_part = settings.count("min_part", min_part)
        self.max_batch_bytes = settings.count("max_batch_bytes", max_batch_bytes)
        """A batch stops growing once its contexts' JSON reaches this size (it always takes at
        least one write): a MySQL/MariaDB batch is one query, which must stay under the
        server's ``max_allowed_packet``."""
        self.storage = storage
        self.batches = 0
        """How many transactions group commit wrote: batches, and writes made alone on an idle
        storage (for tests and benchmarks)."""
        self._queue: list[_Item] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._alone_in_flight = 0

    async def submit(self, cp: Checkpoint, text: str | None) -> int:
        """Write one update checkpoint; return the saga's new version once it is durable.
        Raises as :meth:`SqlAlchemySagaStorage.write_one` does, for this checkpoint only."""
        if self._idle():
            return await self._now(self.storage.write_one(cp, text))
        version: int = await self._enqueue(cp, text)
        return version

    async def start(self, start: LeasedStart) -> bool:
        """Insert a started saga; True once it is durable, False (nothing written) if its id
        exists. Raises a driver error for this start only. Where starts cannot share batches
        (SQLite), it is written as it comes, outside group commit (and not counted in
        :attr:`batches`)."""
        if not self.storage.batches_starts:
            return await self.storage.insert_one(start)
        if self._idle():
            return await self._now(self.storage.insert_one(start))
        created: bool = await self._enqueue(start, None)
        return created

    def _idle(self) -> bool:
        return not self._queue and not self._writers and not self._alone_in_flight

    async def _now(self, write: Awaitable[_T]) -> _T:
        # An idle storage: write at once, in this task (no queue, no writer task), so a saga
        # running alone pays nothing for group commit. Whatever arrives meanwhile queues up for
        # a writer.
        self._alone_in_flight += 1
        try:
            result = await write
        finally:
            self._alone_in_flight -= 1
        self.batches += 1
        return result

    async def _enqueue(self, job: Checkpoint | LeasedStart, text: str | None) -> Any:
        # The future is awaited without a shield: cancelling the waiting task cancels it, and
        # the writer, which only ever completes futures that are not done yet, writes the job
        # all the same (as a cancelled commit may or may not have been written anyway).
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((job, text, future))
        if len(self._writers) < self.max_in_flight:
            writer = asyncio.create_task(self._flush())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await future

    def _take(self) -> list[_Item]:
        """The next batch: queued writes of distinct sagas, oldest first, up to ``max_batch``
        of them and ``max_batch_bytes`` of contexts."""
        batch: list[_Item] = []
        seen: set[int] = set()
        later: list[_Item] = []
        room = self.max_batch_bytes
        for item in self._queue:
            job, text, _ = item
            key = job.saga_id.int
            size = len(job.text) if isinstance(job, LeasedStart) else len(text or "")
            if key not in seen and len(batch) < self.max_batch and (size <= room or not batch):
                seen.add(key)
                batch.append(item)
                room -= size
            else:
                later.append(item)
        self._queue = later
        return batch

    async def _flush(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                await self._write(batch)
            except BaseException as exc:  # e.g. the task was cancelled: fail, never hang
                for _, _, future in batch:
                    _fail(future, exc)
                if not isinstance(exc, Exception):
                    raise

    async def _write(self, batch: list[_Item]) -> None:
        batch.sort(key=lambda item: item[0].saga_id.int)  # one lock order for every batch
        parts = min(self.parallel, len(batch) // self.min_part)
        if parts < 2:
            await self._write_part(batch)
            return
        size = -(-len(batch) // parts)  # disjoint, each in saga id order
        await asyncio.gather(*(self._write_part(batch[i:i + size])
                               for i in range(0, len(batch), size)))

    async def _write_part(self, batch: list[_Item]) -> None:
        """Write these items in one transaction; if it fails, write each alone."""
        cps = [(job, text, f) for job, text, f in batch if isinstance(job, Checkpoint)]
        starts = [(job, f) for job, _, f in batch if isinstance(job, LeasedStart)]
        try:
            versions, inserted = await self.storage.write_batch(
                [(cp, text) for cp, text, _ in cps], [start for start, _ in starts])
            self.batches += 1
        except Exception as error:
            # Written alone, each fails or succeeds for itself. A batch cut off by a lost
            # connection may have been committed all the same: then each write recognises
            # its own earlier write instead of reporting a conflict.
            maybe_written = reconnectable(error)
            if maybe_written:
                self.storage.connections.forget()
            await asyncio.gather(*(self._alone(item, maybe_written) for item in batch))
            return
        for (_, future), created in zip(starts, inserted, strict=True):
            _resolve(future, created)
        fenced = []
        for (cp, _, future), version in zip(cps, versions, strict=True):
            if version is not None:
                _resolve(future, version)
            else:
                fenced.append((cp, future))
        for cp, future in fenced:  # after the others are on their way: each costs a read
            await self._fenced(cp, future)

    async def _alone(self, item: _Item, maybe_written: bool) -> None:
        job, text, future = item
        try:
            if isinstance(job, LeasedStart):
                _resolve(future, await self.storage.insert_one(job, maybe_written=maybe_written))
            else:
                _resolve(future, await self.storage.write_one(job, text,
                                                              maybe_written=maybe_written))
        except Exception as exc:
            _fail(future, exc)

    async def _fenced(self, cp: Checkpoint, future: asyncio.Future[Any]) -> None:
        try:
            await self.storage.diagnose(cp)
        except Exception as exc:
            _fail(future, exc)
        else:  # the row changed back meanwhile: report the conflict all the same
            _fail(future, SagaConcurrencyError(
                f"saga {cp.saga_id}: checkpoint fenced out", saga_id=cp.saga_id))

    async def close(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                await writer


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # its waiter may have been cancelled
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
