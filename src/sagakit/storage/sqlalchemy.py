"""SQL storage over SQLAlchemy 2 async: SQLite (aiosqlite), PostgreSQL (asyncpg) and
MySQL/MariaDB (asyncmy or aiomysql).

Costs per checkpoint (one committed transaction each):

- PostgreSQL: one statement, one round trip (the row update and the log inserts in one
  data-modifying CTE, sent in autocommit mode).
- MySQL/MariaDB: UPDATE, INSERT, COMMIT, sent as one multi-statement query: one round trip.
- SQLite: BEGIN IMMEDIATE, UPDATE, INSERT, COMMIT (no network; WAL mode).

Both hot paths (checkpoints and saga starts) go straight to the driver (asyncpg, asyncmy or
aiomysql) on a pooled connection: see :mod:`sagakit.storage.postgres` and
:mod:`sagakit.storage.mysql`. With ``group_commit=True`` the checkpoints and starts of concurrent
sagas share transactions (:mod:`sagakit.storage.group_commit`).

A run borrows a pooled connection only for the duration of one write or read: nothing is held
while a step runs. The one exception is ``load_saga_state(read_for_update=True)`` through a run,
which pins a connection and its row lock until the run's next ``commit()``/``rollback()`` — the
orchestrator never does that.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)

from sagakit.exceptions import SagaNotFoundError, SagaSerializationError
from sagakit.records import SagaLogEntry, SagaState, SagaStatus, context_json
from sagakit.storage.dialect import Dialect
from sagakit.storage.group_commit import GroupCommitter
from sagakit.storage.mysql import MySqlWriter
from sagakit.storage.pool import LeasedStart, PoolLease
from sagakit.storage.postgres import PgWriter
from sagakit.storage.queries import Queries, row_to_state
from sagakit.storage.run import BufferedRun, Checkpoint, RunBackedStorage
from sagakit.storage.schema import SagaTables

__all__ = ["SqlAlchemySagaStorage"]

logger = logging.getLogger("sagakit.storage")

DEFAULT_MAX_CONTEXT_BYTES = 16 * 1024 * 1024
_EXTRAS = {"asyncpg": "postgres", "asyncmy": "mysql", "aiomysql": "aiomysql", "aiosqlite": ""}


class SqlAlchemySagaStorage(RunBackedStorage):
    """Sagas in two SQL tables (see :mod:`sagakit.storage.schema`).

    Takes an ``AsyncEngine`` or an ``async_sessionmaker`` bound to one. ``max_context_bytes``
    bounds a context's JSON size: a larger one raises SagaSerializationError before anything is
    written. On SQLite the storage switches the engine's connections to WAL mode and makes write
    transactions ``BEGIN IMMEDIATE``, so concurrent sagas queue instead of failing.
    """

    def __init__(
        self,
        engine_or_sessionmaker: AsyncEngine | async_sessionmaker[Any],
        *,
        executions_table: str = "saga_executions",
        logs_table: str = "saga_logs",
        max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
        group_commit: bool = False,
        _owns_engine: bool = False,
    ) -> None:
        self.engine = _engine_of(engine_or_sessionmaker)
        self.tables = SagaTables(executions_table, logs_table)
        self.dialect = Dialect(self.engine.dialect.name, self.tables)
        self.queries = Queries(self.dialect)
        self.max_context_bytes = max_context_bytes
        self._owns_engine = _owns_engine
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.group_commit = (GroupCommitter(self, parallel=2 if self.dialect.is_mysql else 1)
                             if group_commit else None)
        self.writer: PgWriter | MySqlWriter | None = None
        """The driver-level hot path (checkpoints, starts, batches), where there is one."""
        if self.dialect.is_postgres:
            self.writer = PgWriter(self.tables)
        elif self.dialect.is_mysql and self.engine.dialect.driver in ("asyncmy", "aiomysql"):
            self.writer = MySqlWriter(self.tables)
        if self.dialect.is_sqlite:
            _configure_sqlite(self.engine)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        executions_table: str = "saga_executions",
        logs_table: str = "saga_logs",
        max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
        group_commit: bool = False,
        **engine_options: Any,
    ) -> SqlAlchemySagaStorage:
        """Build the storage and its own engine from a database URL, e.g.
        ``sqlite+aiosqlite:///sagas.db`` or ``postgresql+asyncpg://user@host/db``.
        Raises ImportError naming the extra to install when the driver is missing."""
        SagaTables(executions_table, logs_table)  # validate names before building anything
        # Every connection this storage uses ends its transaction itself (commit, rollback or
        # autocommit), so the pool's reset-on-return would only add a ROLLBACK round trip.
        engine_options.setdefault("pool_reset_on_return", None)
        try:
            engine = create_async_engine(url, **engine_options)
        except ImportError as error:
            driver = sa.engine.make_url(url).get_driver_name()
            extra = _EXTRAS.get(driver)
            hint = f"pip install 'sagakit[{extra}]'" if extra else f"pip install {driver}"
            raise ImportError(f"the {driver!r} database driver is not installed: {hint}") from error
        return cls(engine, executions_table=executions_table, logs_table=logs_table,
                   max_context_bytes=max_context_bytes, group_commit=group_commit,
                   _owns_engine=True)

    async def create_schema(self) -> None:
        """Create the tables and indexes if they do not exist (idempotent)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.tables.metadata.create_all)

    async def drop_schema(self) -> None:
        """Drop sagakit's tables (tests and tear-down)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.tables.metadata.drop_all)

    async def delete_all(self) -> None:
        """Delete every saga and log entry (tests)."""
        async with self.engine.begin() as conn:
            await conn.execute(self.tables.logs.delete())
            await conn.execute(self.tables.executions.delete())

    async def close(self) -> None:
        """Dispose of the engine if this storage created it (``from_url``)."""
        if self.group_commit is not None:
            await self.group_commit.close()
        if self._owns_engine:
            await self.engine.dispose()

    def _new_run(self) -> _SqlRun:
        return _SqlRun(self)

    # -- connections --------------------------------------------------------------------------

    @asynccontextmanager
    async def single(self, *, write: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection for one statement that is its own transaction: autocommit where that
        saves round trips (PostgreSQL; SQLite reads), else a transaction committed on exit."""
        if self.dialect.is_postgres or (self.dialect.is_sqlite and not write):
            async with self._autocommit.connect() as conn:
                yield conn
        else:
            async with self.engine.begin() as conn:
                yield conn

    def transaction(self) -> Any:
        """A connection inside a transaction, committed on success."""
        return self.engine.begin()

    def raw_lease(self) -> PoolLease:
        """A pooled connection for driver-level statements, see :class:`PoolLease`."""
        return PoolLease(self.engine)

    @property
    def batches_starts(self) -> bool:
        """Whether group commit can put saga starts in its batches (PostgreSQL, MySQL/MariaDB
        through asyncmy or aiomysql)."""
        return self.writer is not None

    async def write_one(self, cp: Checkpoint, text: str | None) -> int:
        """Write one update checkpoint in its own transaction; return the new version. Raises
        SagaNotFoundError, SagaLeaseLostError or SagaConcurrencyError (nothing written) when the
        fence does not match; driver errors as they are."""
        if self.writer is not None:
            async with self.raw_lease() as lease:
                version = await self.writer.write_checkpoint(lease, cp, text)
            if version is None:  # fenced out: find out why (a read, off the hot path)
                async with self.single() as conn:
                    await self.queries.diagnose(conn, cp)
            assert version is not None
            return version
        async with self.transaction() as conn:
            return await self.queries.write_checkpoint(conn, cp, text)

    async def insert_one(self, start: LeasedStart) -> bool:
        """Insert a saga RUNNING and leased in its own transaction; False, with nothing
        written, if the id exists. Driver errors as they are."""
        if self.writer is not None:
            async with self.raw_lease() as lease:
                return await self.writer.insert_leased(lease, start)
        async with self.transaction() as conn:
            return await self.queries.insert_leased(conn, start)

    async def write_batch(
        self, items: list[tuple[Checkpoint, str | None]], starts: list[LeasedStart]
    ) -> tuple[list[int | None], list[bool]]:
        """Write update checkpoints of distinct sagas and insert started sagas (only where
        :attr:`batches_starts`) in one transaction. Returns, in the order given, each
        checkpoint's new version (None when its fence did not match: it was not written) and
        whether each start was inserted (not when its id exists). Raises on a driver error,
        with nothing written."""
        if self.writer is not None:
            async with self.raw_lease() as lease:
                return await self.writer.write_batch(lease, items, starts)
        assert not starts, "this storage does not batch saga starts"
        async with self.transaction() as conn:
            written = await self.queries.write_batch(conn, items)
        return [written.get(cp.saga_id) for cp, _ in items], []

    def dump(self, saga_id: UUID, context: Mapping[str, Any]) -> str:
        """The context's JSON text; SagaSerializationError if it is not JSON or too large."""
        try:
            text = context_json(context).decode()
        except TypeError as error:
            raise SagaSerializationError(
                f"saga {saga_id}: context is not JSON-serialisable: {error}", saga_id=saga_id
            ) from error
        if len(text) > self.max_context_bytes:
            raise SagaSerializationError(
                f"saga {saga_id}: context is {len(text)} bytes of JSON, more than the storage's "
                f"max_context_bytes={self.max_context_bytes}", saga_id=saga_id,
            )
        return text

    # -- reads --------------------------------------------------------------------------------

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        if read_for_update:
            async with self.transaction() as conn:
                return await self.queries.load_state(conn, saga_id, for_update=True)
        async with self.single() as conn:
            return await self.queries.load_state(conn, saga_id)

    async def get_saga(self, saga_id: UUID) -> SagaState:
        async with self.single() as conn:
            row = await self.queries.fetch_row(conn, saga_id)
        if row is None:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)
        return row_to_state(row)

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        async with self.single() as conn:
            return await self.queries.history(conn, saga_id)

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: float | None = None,
        saga_name: str | None = None,
    ) -> list[UUID]:
        async with self.single() as conn:
            return await self.queries.due_for_recovery(
                conn, limit, max_recovery_attempts, stale_after_seconds, saga_name
            )

    async def claim_due(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        max_recovery_attempts: int = 5,
        saga_names: frozenset[str] | None = None,
        stale_after_seconds: float | None = None,
    ) -> list[SagaState]:
        try:
            async with self.single(write=True) if self.dialect.is_postgres else self.transaction() as conn:
                return await self.queries.claim_due(
                    conn, owner, limit, lease_seconds, max_recovery_attempts, saga_names,
                    stale_after_seconds,
                )
        except exc.OperationalError as error:
            if not _is_lock_conflict(error):
                raise
            # InnoDB may pick the claim as a deadlock victim against concurrent checkpoints
            # (its locks on the secondary index); the transaction was rolled back, nothing was
            # claimed: the next poll tries again.
            logger.info("claim_due lost a lock conflict (%s); claiming nothing this time", error.orig)
            return []

    async def list_sagas(
        self,
        *,
        statuses: frozenset[SagaStatus] | None = None,
        saga_name: str | None = None,
        limit: int = 100,
    ) -> list[SagaState]:
        async with self.single() as conn:
            return await self.queries.list_sagas(conn, statuses, saga_name, limit)

    # -- commit-per-call writes that are not checkpoints ------------------------------------

    async def increment_recovery_attempts(
        self, saga_id: UUID, new_status: SagaStatus | None = None
    ) -> None:
        t = self.tables.executions
        values: dict[str, Any] = {"recovery_attempts": t.c.recovery_attempts + 1}
        if new_status is not None:
            values["status"] = SagaStatus(new_status).value
        await self._touch(saga_id, values)

    async def set_recovery_attempts(self, saga_id: UUID, attempts: int) -> None:
        await self._touch(saga_id, {"recovery_attempts": attempts})

    async def _touch(self, saga_id: UUID, values: dict[str, Any]) -> None:
        t = self.tables.executions
        stmt = (
            sa.update(t).where(t.c.saga_id == saga_id)
            .values(version=t.c.version + 1, updated_at=self.dialect.now(), **values)
        )
        async with self.single(write=True) as conn:
            result = await conn.execute(stmt, self.dialect.time_params())
        if result.rowcount == 0:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)


class _SqlRun(BufferedRun):
    """A run over the SQL storage: buffered checkpoints, each written in one transaction."""

    def __init__(self, storage: SqlAlchemySagaStorage) -> None:
        super().__init__()
        self._s = storage
        self._pinned: AsyncConnection | None = None
        self._pinned_tx: Any = None

    async def _write(self, cp: Checkpoint) -> int:
        s = self._s
        text = None if cp.context is None else s.dump(cp.saga_id, cp.context)
        if self._pinned is not None:
            try:
                return await s.queries.write_checkpoint(self._pinned, cp, text)
            finally:
                await self._unpin(commit=True)
        if cp.create_name is not None:
            async with s.transaction() as conn:
                return await s.queries.write_checkpoint(conn, cp, text)
        if s.group_commit is not None:
            return await s.group_commit.submit(cp, text)
        return await s.write_one(cp, text)

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

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        if read_for_update and self._pinned is None:
            self._pinned = await self._s.engine.connect()
            self._pinned_tx = await self._pinned.begin()
        if self._pinned is not None:
            return await self._s.queries.load_state(self._pinned, saga_id, for_update=read_for_update)
        return await self._s.load_saga_state(saga_id)

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
    ) -> tuple[SagaState, bool]:
        s = self._s
        start = LeasedStart(saga_id, name, s.dump(saga_id, context), fingerprint, self.owner,
                            lease_seconds)
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
        async with s.single(write=True) as conn:
            state = await s.queries.claim(
                conn, saga_id, self.owner, lease_seconds, count_attempt, allow_parked, name
            )
        self._took_lease(state, lease_seconds)
        return state

    async def renew_lease(self, lease_seconds: float) -> None:
        if self.saga_id is None or not self.holds_lease:
            return
        async with self._s.single(write=True) as conn:
            lost = not await self._s.queries.renew(conn, self.saga_id, self.owner, lease_seconds)
        if lost:  # keep holds_lease: it fences this run's later commits
            raise self._s.queries.lease_lost(self.saga_id, self.owner)

    async def release(self) -> None:
        if self.saga_id is None or not self.holds_lease:
            return
        self.holds_lease = False
        async with self._s.single(write=True) as conn:
            await self._s.queries.release(conn, self.saga_id, self.owner, self.retry_after)


def _is_lock_conflict(error: exc.DBAPIError) -> bool:
    """A deadlock or lock wait timeout (MySQL/MariaDB 1213/1205, PostgreSQL 40P01/55P03)."""
    orig = error.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in ("40P01", "55P03"):
        return True
    args: Any = getattr(orig, "args", ())
    return bool(args) and args[0] in (1213, 1205)


def _engine_of(obj: AsyncEngine | async_sessionmaker[Any]) -> AsyncEngine:
    if isinstance(obj, AsyncEngine):
        return obj
    bind = getattr(obj, "kw", {}).get("bind")
    if isinstance(bind, AsyncEngine):
        return bind
    raise TypeError(
        "SqlAlchemySagaStorage needs an AsyncEngine or an async_sessionmaker bound to one, "
        f"got {type(obj).__name__}"
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine
    if getattr(sync_engine, "_sagakit_sqlite", False):
        return
    sync_engine._sagakit_sqlite = True  # type: ignore[attr-defined]

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_isolation_level() != "AUTOCOMMIT":
            conn.exec_driver_sql("BEGIN IMMEDIATE")

