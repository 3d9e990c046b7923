"""Group commit: the checkpoints of concurrently running sagas share one transaction.

While one batch is being written, new checkpoints queue up; when it commits, everything queued
meanwhile goes out as the next batch (no timers: an idle storage writes a lone checkpoint at
once). Each saga's ``commit()`` returns only after the batch holding its checkpoint is durable.

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

    def __init__(self, storage: SqlAlchemySagaStorage, max_batch: int = 256) -> None:
        self.storage = storage
        self.max_batch = max_batch
        self.batches = 0
        """How many batches were written (for tests and benchmarks)."""
        self._queue: list[_Item] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, cp: Checkpoint, text: str | None) -> int:
        """Queue one checkpoint; return the saga's new version once it is durable."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((cp, text, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
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
            async with s.single(write=True) if s.dialect.is_postgres else s.transaction() as conn:
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
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

