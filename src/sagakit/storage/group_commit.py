"""Group commit: the checkpoints of concurrently running sagas share one transaction.

Up to ``max_in_flight`` batches are written at once, each on its own connection; while they are
busy, new checkpoints queue up, and the next free writer takes everything queued as one batch.
No timers: a lightly loaded storage writes each checkpoint at once, and batches grow only as
the load does. Each saga's ``commit()`` returns only after the batch holding its checkpoint is
durable.

Isolation between neighbours: every checkpoint stays fenced by its own version and lease owner,
so a checkpoint that no longer matches is simply not written and only its saga gets the error
(diagnosed on its own). If the batch as a whole fails (a driver error, a deadlock), each of its
checkpoints is retried alone, so one bad checkpoint fails only its own saga.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from sagakit.storage.run import Checkpoint

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["GroupCommitter"]

_Item = tuple[Checkpoint, "str | None", "asyncio.Future[int]"]


class GroupCommitter:
    """Coalesces update checkpoints of different sagas into batches of at most ``max_batch``."""

    def __init__(
        self, storage: SqlAlchemySagaStorage, max_batch: int = 256, max_in_flight: int = 4
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("group commit needs max_batch >= 1 and max_in_flight >= 1")
        self.storage = storage
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.batches = 0
        """How many batches were written (for tests and benchmarks)."""
        self._queue: list[_Item] = []
        self._writers: set[asyncio.Task[None]] = set()
        self._alone_in_flight = 0

    async def submit(self, cp: Checkpoint, text: str | None) -> int:
        """Queue one checkpoint; return the saga's new version once it is durable."""
        if not self._queue and not self._writers and not self._alone_in_flight:
            # An idle storage: write this one at once, in this task (no queue, no writer task),
            # so a saga running alone pays nothing for group commit. Whatever arrives meanwhile
            # queues up for a writer.
            self._alone_in_flight += 1
            try:
                version = await self.storage.write_one(cp, text)
            finally:
                self._alone_in_flight -= 1
            self.batches += 1
            return version
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((cp, text, future))
        if len(self._writers) < self.max_in_flight:
            writer = asyncio.create_task(self._flush())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        return await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._queue:
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            try:
                await self._write(batch)
            except BaseException as exc:  # e.g. the task was cancelled: fail, never hang
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    async def _write(self, batch: list[_Item]) -> None:
        s = self.storage
        batch.sort(key=lambda item: str(item[0].saga_id))  # one lock order for every batch
        try:
            async with s.raw_lease() if s.dialect.is_postgres else s.transaction() as conn:
                written = await s.queries.write_batch(conn, [(cp, text) for cp, text, _ in batch])
            self.batches += 1
        except Exception:
            await asyncio.gather(*(self._alone(item) for item in batch))
            return
        for cp, _, future in batch:
            version = written.get(cp.saga_id)
            if version is not None:
                future.set_result(version)
            else:
                await self._fenced(cp, future)

    async def _alone(self, item: _Item) -> None:
        cp, text, future = item
        try:
            future.set_result(await self.storage.write_one(cp, text))
        except Exception as exc:
            future.set_exception(exc)

    async def _fenced(self, cp: Checkpoint, future: asyncio.Future[int]) -> None:
        try:
            async with self.storage.single() as conn:
                await self.storage.queries.diagnose(conn, cp)
        except Exception as exc:
            future.set_exception(exc)
        else:  # the row changed back meanwhile: report the conflict all the same
            from sagakit.exceptions import SagaConcurrencyError

            future.set_exception(SagaConcurrencyError(
                f"saga {cp.saga_id}: checkpoint fenced out", saga_id=cp.saga_id))

    async def close(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                await writer

