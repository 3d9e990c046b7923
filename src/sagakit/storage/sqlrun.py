"""A run over the SQL storage (:class:`~sagakit.storage.sqlalchemy.SqlAlchemySagaStorage`):
buffered checkpoints, each written in one transaction; starts, claims, lease renewals and
releases. Every database error leaves it as one of sagakit's storage errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncConnection

from sagakit import settings
from sagakit.exceptions import SagaError
from sagakit.records import SagaLogEntry, SagaState, SagaStatus
from sagakit.storage.faults import storage_error
from sagakit.storage.pool import LEASE, WORK, LeasedStart
from sagakit.storage.run import BufferedRun, Checkpoint

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = ["SqlRun"]


class SqlRun(BufferedRun):
    """A run over the SQL storage: buffered checkpoints, each written in one transaction."""

    def __init__(self, storage: SqlAlchemySagaStorage) -> None:
        super().__init__()
        self._s = storage
        self._pinned: AsyncConnection | None = None
        self._pinned_tx: Any = None

    async def _write(self, cp: Checkpoint) -> int:
        s = self._s
        text = None if cp.context is None else s.dump(cp.saga_id, cp.context)
        if self._pinned is not None or cp.create_name is not None:
            return await self._write_slowly(cp, text)
        if s.group_commit is not None:
            version = await s.group_commit.submit(cp, text)
            if cp.wake is not None:  # a batch sends none: one statement more (PostgreSQL)
                await s.notify(cp.wake)
            return version
        return await s.write_one(cp, text)

    async def _write_slowly(self, cp: Checkpoint, text: str | None) -> int:
        """A checkpoint under a pinned row lock, or the creation of a PENDING saga (the seed's
        ``create_saga``): through SQLAlchemy, never retried."""
        s = self._s
        try:
            if self._pinned is not None:
                try:
                    version = await s.queries.write_checkpoint(self._pinned, cp, text)
                    if version is None:
                        await s.queries.diagnose(self._pinned, cp)
                finally:
                    await self._unpin(commit=True)
            else:
                async with s.connections.transaction() as conn:
                    version = await s.queries.write_checkpoint(conn, cp, text)
        except SagaError:
            raise
        except Exception as error:
            raise storage_error(error, "writing a checkpoint", saga_id=cp.saga_id) from error
        assert version is not None
        return version

    async def rollback(self) -> None:
        await super().rollback()
        await self._unpin(commit=False)

    async def _unpin(self, *, commit: bool) -> None:
        conn, tx = self._pinned, self._pinned_tx
        self._pinned = self._pinned_tx = None
        if conn is None:
            return
        try:
            await (tx.commit() if commit else tx.rollback())
        finally:
            await conn.close()
            gate = self._s.connections.gate
            if gate is not None:
                gate.leave()

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        if not read_for_update and self._pinned is None:
            return await self._s.load_saga_state(saga_id)
        try:
            if self._pinned is None:
                await self._pin()
            assert self._pinned is not None
            return await self._s.queries.load_state(self._pinned, saga_id,
                                                    for_update=read_for_update)
        except SagaError:
            raise
        except Exception as error:
            raise storage_error(error, "reading a saga", saga_id=saga_id) from error

    async def _pin(self) -> None:
        connections = self._s.connections
        if connections.gate is not None:
            await connections.gate.enter(WORK)
        try:
            self._pinned = await connections.engine.connect()
            self._pinned_tx = await self._pinned.begin()
        except BaseException:
            if self._pinned is not None:
                await self._pinned.close()
                self._pinned = None
            if connections.gate is not None:
                connections.gate.leave()
            raise

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        return await self._s.get_step_history(saga_id)

    async def start(
        self,
        saga_id: UUID,
        name: str,
        context: Mapping[str, Any],
        *,
        fingerprint: str | None,
        lease_seconds: float,
        deadline_seconds: float | None = None,
    ) -> tuple[SagaState, bool]:
        s = self._s
        if deadline_seconds is not None:
            deadline_seconds = settings.seconds("deadline_seconds", deadline_seconds)
        start = LeasedStart(saga_id, name, s.dump(saga_id, context), fingerprint, self.owner,
                            lease_seconds, deadline_seconds)
        if s.group_commit is not None:
            created = await s.group_commit.start(start)
        else:
            created = await s.insert_one(start)
        if not created:  # the id exists: claim it instead
            return await self.claim(saga_id, lease_seconds=lease_seconds, name=name), False
        state = SagaState(saga_id, name, SagaStatus.RUNNING, context, 1, 0,
                          lease_owner=self.owner, fingerprint=fingerprint)
        self._took_lease(state, lease_seconds)
        return state, True

    async def claim(
        self,
        saga_id: UUID,
        *,
        lease_seconds: float,
        count_attempt: bool = True,
        allow_parked: bool = False,
        name: str | None = None,
    ) -> SagaState:
        s = self._s
        # Retried on a fresh connection if this one is dead: a claim that got through the
        # first time matches again (the lease is this run's), at the cost of one more
        # recovery attempt counted.
        state = await s.connections.call("claiming a saga", lambda conn: s.queries.claim(
            conn, saga_id, self.owner, lease_seconds, count_attempt, allow_parked, name),
            mode="write", saga_id=saga_id)
        self._took_lease(state, lease_seconds)
        return state

    async def renew_lease(self, lease_seconds: float) -> None:
        saga_id = self.saga_id
        if saga_id is None or not self.holds_lease:
            return
        s = self._s
        held = await s.connections.call("renewing a lease", lambda conn: s.queries.renew(
            conn, saga_id, self.owner, lease_seconds, self.version), mode="write", saga_id=saga_id,
            priority=LEASE)
        if not held:  # keep holds_lease: it fences this run's later commits
            raise s.queries.lease_lost(saga_id, self.owner)

    async def release(self) -> None:
        saga_id = self.saga_id
        if saga_id is None or not self.holds_lease:
            return
        self.holds_lease = False
        s = self._s
        await s.connections.call("releasing a lease", lambda conn: s.queries.release(
            conn, saga_id, self.owner, self.retry_after, self.version), mode="write",
            saga_id=saga_id,
            priority=LEASE)
