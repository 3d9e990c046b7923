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

Faults: every call raises sagakit's own errors, never a driver's: ``SagaStorageUnavailableError``
when the database cannot be reached (down, restarting, connection lost, no pooled connection
free within ``acquire_timeout``), ``SagaStorageRejectedError`` when it refuses a write's data,
``SagaStorageError`` otherwise, each with the driver's error as ``__cause__``
(:mod:`sagakit.storage.faults`). A pooled connection found dead (after a server restart, a
failover, an idle-connection kill) is replaced and the work done once more on a fresh one
wherever that is safe: reads, fenced checkpoints (a checkpoint whose first try was committed
after all is recognised as written, not reported as a conflict), saga starts, lease renewals
and releases. More concurrent sagas than connections wait their turn (:mod:`sagakit.storage.pool`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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

from sagakit import settings
from sagakit.exceptions import SagaError, SagaNotFoundError, SagaSerializationError
from sagakit.records import SagaLogEntry, SagaState, SagaStatus, context_json
from sagakit.storage.dialect import Dialect
from sagakit.storage.faults import lock_conflict, reconnectable, storage_error
from sagakit.storage.group_commit import GroupCommitter
from sagakit.storage.liveness import Liveness
from sagakit.storage.mysql import MySqlWriter
from sagakit.storage.pool import START, WORK, Connections, LeasedStart, PoolLease
from sagakit.storage.postgres import PgWriter
from sagakit.storage.queries import Queries, row_to_state
from sagakit.storage.run import Checkpoint, RunBackedStorage, refuse_nul
from sagakit.storage.schema import SagaTables
from sagakit.storage.sqlliveness import SqlSessions, register_sqlite_function
from sagakit.storage.sqlqueues import QueueQueries, SqlQueues
from sagakit.storage.sqlrun import SqlRun

__all__ = ["SqlAlchemySagaStorage"]

logger = logging.getLogger("sagakit.storage")

DEFAULT_MAX_CONTEXT_BYTES = 16 * 1024 * 1024
DEFAULT_ACQUIRE_TIMEOUT = 120.0
_EXTRAS = {"asyncpg": "postgres", "asyncmy": "mysql", "aiomysql": "aiomysql", "aiosqlite": ""}
_ASYNC_URLS = {  # a URL naming no driver (or PostgreSQL's short scheme): the one to write
    "postgresql": ("postgresql+asyncpg", "postgres"), "postgres": ("postgresql+asyncpg", "postgres"),
    "mysql": ("mysql+asyncmy", "mysql"), "mariadb": ("mysql+asyncmy", "mysql"),
    "sqlite": ("sqlite+aiosqlite", ""),
}


def _check_driver(url: str | sa.engine.URL) -> None:
    """ValueError, before anything is built, for a URL that names no async driver (e.g.
    ``postgresql://``, ``postgres://``, ``mysql://``, ``sqlite:///``): which URL to write, and
    which sagakit extra installs its driver."""
    text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    scheme, sep, rest = text.partition("://")
    if not sep or "+" in scheme or scheme not in _ASYNC_URLS:
        return
    better, extra = _ASYNC_URLS[scheme]
    shown = sa.engine.make_url(f"{better}://{rest}").render_as_string(hide_password=True)
    install = f" (pip install 'sagakit[{extra}]')" if extra else ""
    raise ValueError(f"bad database URL: {scheme}:// names no async driver; sagakit needs one: "
                     f"{shown}{install}")


class SqlAlchemySagaStorage(SqlQueues, RunBackedStorage):
    """Sagas in SQL tables (see :mod:`sagakit.storage.schema`); queued sagas and queue limits
    as :mod:`sagakit.storage.sqlqueues` describes.

    Takes an ``AsyncEngine`` or an ``async_sessionmaker`` bound to one. ``max_context_bytes``
    bounds a context's JSON size: a larger one raises SagaSerializationError before anything is
    written. On SQLite the storage switches the engine's connections to WAL mode and makes write
    transactions ``BEGIN IMMEDIATE``, so concurrent sagas queue instead of failing.

    ``executions_table``, ``logs_table``, ``queues_table``: the tables' names (validated, see
    :class:`~sagakit.storage.schema.SagaTables`).

    ``acquire_timeout``: how long a call may wait for a pooled connection when every one is in
    use (seconds, 120 by default) before it fails with ``SagaStorageUnavailableError``, nothing
    written. Waiting callers are served lease upkeep
    first, then running sagas, then new starts (see :mod:`sagakit.storage.pool`).
    """

    def __init__(
        self,
        engine_or_sessionmaker: AsyncEngine | async_sessionmaker[Any],
        *,
        executions_table: str = "saga_executions",
        logs_table: str = "saga_logs",
        max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
        group_commit: bool = False,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        queues_table: str = "saga_queues",
        _owns_engine: bool = False,
    ) -> None:
        self.engine = _engine_of(engine_or_sessionmaker)
        self.tables = SagaTables(executions_table, logs_table, queues_table=queues_table)
        self.dialect = Dialect(self.engine.dialect.name, self.tables)
        self.queries = Queries(self.dialect)
        self.queue_queries = QueueQueries(self.queries)
        self.max_context_bytes = settings.count("max_context_bytes", max_context_bytes)
        self._owns_engine = _owns_engine
        self.connections = Connections(
            self.engine, self.dialect.name,
            settings.seconds("acquire_timeout", acquire_timeout, exclusive=True))
        self.group_commit = (GroupCommitter(self, parallel=2 if self.dialect.is_mysql else 1)
                             if group_commit else None)
        self.writer: PgWriter | MySqlWriter | None = None
        """The driver-level hot path (checkpoints, starts, batches), where there is one."""
        if self.dialect.is_postgres:
            self.writer = PgWriter(self.tables)
        elif self.dialect.is_mysql and self.engine.dialect.driver in ("asyncmy", "aiomysql"):
            self.writer = MySqlWriter(self.tables)
        self._sessions = None if self.dialect.is_sqlite else SqlSessions(self.engine, self.queries)
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
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        queues_table: str = "saga_queues",
        **engine_options: Any,
    ) -> SqlAlchemySagaStorage:
        """Build the storage and its own engine from a database URL, e.g.
        ``sqlite+aiosqlite:///sagas.db`` or ``postgresql+asyncpg://user@host/db``.
        Raises ImportError naming the extra to install when the driver is missing, and
        ValueError naming the URL to write for one that names no async driver
        (``postgresql://``, ``postgres://``, ``mysql://``, ``sqlite:///``)."""
        # validate names and numbers before building anything
        SagaTables(executions_table, logs_table, queues_table=queues_table)
        settings.count("max_context_bytes", max_context_bytes)
        settings.seconds("acquire_timeout", acquire_timeout, exclusive=True)
        # Every connection this storage uses ends its transaction itself (commit, rollback or
        # autocommit), so the pool's reset-on-return would only add a ROLLBACK round trip.
        engine_options.setdefault("pool_reset_on_return", None)
        _check_driver(url)
        try:
            engine = create_async_engine(url, **engine_options)
        except ImportError as error:
            driver = sa.engine.make_url(url).get_driver_name()
            extra = _EXTRAS.get(driver)
            hint = f"pip install 'sagakit[{extra}]'" if extra else f"pip install {driver}"
            raise ImportError(f"the {driver!r} database driver is not installed: {hint}") from error
        return cls(engine, executions_table=executions_table, logs_table=logs_table,
                   max_context_bytes=max_context_bytes, group_commit=group_commit,
                   acquire_timeout=acquire_timeout, queues_table=queues_table,
                   _owns_engine=True)

    async def create_schema(self) -> None:
        """Create the tables and indexes that do not exist (idempotent): completes a schema
        that an earlier, failed run left half-built (see :meth:`SagaTables.create_missing`)."""
        await self.connections.call(
            "creating the schema", lambda conn: conn.run_sync(self.tables.create_missing),
            mode="transaction")

    async def drop_schema(self) -> None:
        """Drop sagakit's tables (tests and tear-down)."""
        await self.connections.call(
            "dropping the schema", lambda conn: conn.run_sync(self.tables.metadata.drop_all),
            mode="transaction")

    async def delete_all(self) -> None:
        """Delete every saga, log entry and queue setting (tests)."""
        async def delete(conn: AsyncConnection) -> None:
            await conn.execute(self.tables.logs.delete())
            await conn.execute(self.tables.executions.delete())
            await conn.execute(self.tables.queues.delete())

        await self.connections.call("deleting every saga", delete, mode="transaction")

    async def close(self) -> None:
        """Dispose of the engine if this storage created it (``from_url``)."""
        if self.group_commit is not None:
            await self.group_commit.close()
        if self._sessions is not None:
            await self._sessions.dispose()
        if self._owns_engine:
            await self.engine.dispose()

    def liveness(self) -> Liveness:
        """A worker's liveness session (see :mod:`sagakit.storage.liveness`): on PostgreSQL
        and MySQL/MariaDB one connection outside the pool, holding a lock named after the
        worker's owner id; on SQLite the worker's process itself."""
        if self._sessions is not None:
            return Liveness(self._sessions)
        return Liveness(watch=lambda owner: self.connections.call(
            "looking for orphaned sagas", lambda conn: self.queries.look(conn, owner)))

    def _new_run(self) -> SqlRun:
        return SqlRun(self)

    # -- connections --------------------------------------------------------------------------

    def single(self, *, write: bool = False) -> Any:
        """A connection for one statement that is its own transaction (see
        :meth:`~sagakit.storage.pool.Connections.single`). Driver errors as they are."""
        return self.connections.single(write=write)

    def transaction(self) -> Any:
        """A connection inside a transaction, committed on success. Driver errors as they are."""
        return self.connections.transaction()

    def raw_lease(self, priority: int = WORK) -> PoolLease:
        """A pooled connection for driver-level statements, see :class:`PoolLease`."""
        return PoolLease(self.engine, self.connections.gate, priority)

    @property
    def batches_starts(self) -> bool:
        """Whether group commit can put saga starts in its batches (PostgreSQL, MySQL/MariaDB
        through asyncmy or aiomysql)."""
        return self.writer is not None

    # -- checkpoints and starts -----------------------------------------------------------------

    async def write_one(self, cp: Checkpoint, text: str | None, *, maybe_written: bool = False
                        ) -> int:
        """Write one update checkpoint in its own transaction; return the new version. Raises
        SagaNotFoundError, SagaLeaseLostError or SagaConcurrencyError (nothing written) when the
        fence does not match, SagaStorageError when the database fails.

        A fenced checkpoint whose connection turns out dead is written once more on a fresh
        one; if the first try was committed after all, the second finds its own write there
        and returns as if it had made it. ``maybe_written``: an earlier try of this checkpoint
        (a group-commit batch) may have been committed; a fence mismatch is then checked the
        same way before it is reported."""
        again = False
        while True:
            try:
                if self.writer is not None:
                    async with self.raw_lease() as lease:
                        version = await self.writer.write_checkpoint(lease, cp, text)
                else:
                    async with self.connections.transaction() as conn:
                        version = await self.queries.write_checkpoint(conn, cp, text)
                if version is None:
                    if maybe_written or again:
                        written = await self._written_already(cp)
                        if written is not None:
                            return written
                    await self.diagnose(cp)  # raises why the fence did not match
                assert version is not None
                return version
            except SagaError:
                raise
            except Exception as error:
                if again or _known_version(cp) is None or not reconnectable(error):
                    raise storage_error(error, "writing a checkpoint", saga_id=cp.saga_id
                                        ) from error
                again = True
                self.connections.forget()

    async def diagnose(self, cp: Checkpoint) -> None:
        """Raise why a fenced checkpoint matched no row (not found, lease lost, version)."""
        await self.connections.call(
            "reading a saga", lambda conn: self.queries.diagnose(conn, cp), saga_id=cp.saga_id)

    async def _written_already(self, cp: Checkpoint) -> int | None:
        """The saga's version if this checkpoint is what was written last (an earlier try of it
        got through), else None: the version moved by exactly one, to the status and lease the
        checkpoint writes, and the log ends with its entries."""
        known = _known_version(cp)

        async def read(conn: AsyncConnection) -> int | None:
            row = await self.queries.fetch_row(conn, cp.saga_id)
            if row is None or known is None:
                return None
            state = row_to_state(row)
            owner = None if cp.releases_lease else cp.fence_owner
            if (state.version != known + 1 or (cp.status is not None and state.status != cp.status)
                    or (cp.fence_owner is not None and state.lease_owner != owner)):
                return None
            if cp.entries:
                logged = (await self.queries.history(conn, cp.saga_id))[-len(cp.entries):]
                if [(e.step_name, e.action, e.status) for e in logged] != [
                        (e.step_name, e.action, e.status) for e in cp.entries]:
                    return None
            return state.version

        return await self.connections.call("reading a saga", read, saga_id=cp.saga_id)

    async def insert_one(self, start: LeasedStart, *, maybe_written: bool = False) -> bool:
        """Insert a saga RUNNING and leased in its own transaction; False, with nothing
        written, if the id exists. A connection found dead is replaced and the insert tried
        once more; an id that exists then (or with ``maybe_written``, an earlier try in a
        group-commit batch) counts as inserted if it is this start's own row. Raises
        SagaStorageError when the database fails."""
        again = False
        while True:
            try:
                if self.writer is not None:
                    async with self.raw_lease(START) as lease:
                        created = await self.writer.insert_leased(lease, start)
                else:
                    async with self.connections.transaction(priority=START) as conn:
                        created = await self.queries.insert_leased(conn, start)
                if not created and (maybe_written or again):
                    return await self._started_already(start)
                return created
            except SagaError:
                raise
            except Exception as error:
                if again or not reconnectable(error):
                    raise storage_error(error, "starting a saga", saga_id=start.saga_id
                                        ) from error
                again = True
                self.connections.forget()

    async def _started_already(self, start: LeasedStart) -> bool:
        row = await self.connections.call(
            "reading a saga", lambda conn: self.queries.fetch_row(conn, start.saga_id),
            saga_id=start.saga_id)
        if row is None:
            return False
        state = row_to_state(row)
        return state.version == 1 and state.lease_owner == start.owner

    async def write_batch(
        self, items: list[tuple[Checkpoint, str | None]], starts: list[LeasedStart]
    ) -> tuple[list[int | None], list[bool]]:
        """Write update checkpoints of distinct sagas and insert started sagas (only where
        :attr:`batches_starts`) in one transaction. Returns, in the order given, each
        checkpoint's new version (None when its fence did not match: it was not written) and
        whether each start was inserted (not when its id exists). Raises the driver's error
        (the caller, group commit, then writes each alone); nothing was written unless the
        connection was lost, in which case the batch may have been committed."""
        if self.writer is not None:
            async with self.raw_lease() as lease:
                return await self.writer.write_batch(lease, items, starts)
        assert not starts, "this storage does not batch saga starts"
        async with self.connections.transaction() as conn:
            written = await self.queries.write_batch(conn, items)
        return [written.get(cp.saga_id) for cp, _ in items], []

    def dump(self, saga_id: UUID, context: Mapping[str, Any]) -> str:
        """The context's JSON text; SagaSerializationError if it is not JSON, too large, or
        holds what no storage keeps (U+0000)."""
        try:
            data = context_json(context)
        except TypeError as error:
            raise SagaSerializationError(
                f"saga {saga_id}: context is not JSON-serialisable: {error}", saga_id=saga_id
            ) from error
        if len(data) > self.max_context_bytes:
            raise SagaSerializationError(
                f"saga {saga_id}: context is {len(data)} bytes of JSON, more than the storage's "
                f"max_context_bytes={self.max_context_bytes}", saga_id=saga_id,
            )
        if b"\\u0000" in data:  # the common case costs one scan, no call
            refuse_nul(saga_id, data)
        return data.decode()

    # -- reads --------------------------------------------------------------------------------

    async def load_saga_state(
        self, saga_id: UUID, *, read_for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        return await self.connections.call(
            "reading a saga",
            lambda conn: self.queries.load_state(conn, saga_id, for_update=read_for_update),
            mode="transaction" if read_for_update else "read", saga_id=saga_id)

    async def get_saga(self, saga_id: UUID) -> SagaState:
        row = await self.connections.call(
            "reading a saga", lambda conn: self.queries.fetch_row(conn, saga_id), saga_id=saga_id)
        if row is None:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)
        return row_to_state(row)

    async def get_step_history(self, saga_id: UUID) -> list[SagaLogEntry]:
        return await self.connections.call(
            "reading a step log", lambda conn: self.queries.history(conn, saga_id),
            saga_id=saga_id)

    async def get_sagas_for_recovery(
        self,
        limit: int,
        max_recovery_attempts: int = 5,
        stale_after_seconds: float | None = None,
        saga_name: str | None = None,
    ) -> list[UUID]:
        return await self.connections.call("listing sagas due for recovery", lambda conn: (
            self.queries.due_for_recovery(conn, limit, max_recovery_attempts, stale_after_seconds,
                                          saga_name)))

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
        async def claim(conn: AsyncConnection) -> list[SagaState]:
            try:
                return await self.queries.claim_due(
                    conn, owner, limit, lease_seconds, max_recovery_attempts, saga_names,
                    stale_after_seconds)
            except exc.OperationalError as error:
                if not lock_conflict(error):
                    raise
                # InnoDB may pick the claim as a deadlock victim against concurrent checkpoints
                # (its locks on the secondary index); the transaction was rolled back, nothing
                # was claimed: the next poll tries again.
                logger.info("claim_due lost a lock conflict (%s); claiming nothing this time",
                            error.orig)
                return []

        # Not retried: a claim cut off by a lost connection may have been committed, and
        # claiming again would take more sagas (those of the first try wait for their lease).
        return await self.connections.call(
            "claiming sagas due for recovery", claim,
            mode="write" if self.dialect.is_postgres else "transaction", retry=False)

    async def list_sagas(
        self,
        *,
        statuses: frozenset[SagaStatus] | None = None,
        saga_name: str | None = None,
        limit: int = 100,
    ) -> list[SagaState]:
        return await self.connections.call(
            "listing sagas", lambda conn: self.queries.list_sagas(conn, statuses, saga_name, limit))

    # -- commit-per-call writes that are not checkpoints ------------------------------------

    async def increment_recovery_attempts(
        self, saga_id: UUID, new_status: SagaStatus | None = None
    ) -> None:
        t = self.tables.executions
        values: dict[str, Any] = {"recovery_attempts": t.c.recovery_attempts + 1}
        if new_status is not None:
            values["status"] = SagaStatus(new_status).value
        await self._touch(saga_id, values, retry=False)

    async def set_recovery_attempts(self, saga_id: UUID, attempts: int) -> None:
        await self._touch(saga_id, {"recovery_attempts": attempts}, retry=True)

    async def _touch(self, saga_id: UUID, values: dict[str, Any], *, retry: bool) -> None:
        t = self.tables.executions
        stmt = (
            sa.update(t).where(t.c.saga_id == saga_id)
            .values(version=t.c.version + 1, updated_at=self.dialect.now(), **values)
        )
        result = await self.connections.call(
            "updating a saga", lambda conn: conn.execute(stmt, self.dialect.time_params()),
            mode="write", retry=retry, saga_id=saga_id)
        if result.rowcount == 0:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)


def _known_version(cp: Checkpoint) -> int | None:
    """The version a checkpoint expects its saga to have (None: an unfenced write)."""
    return cp.fence_version if cp.fence_version is not None else cp.expected_version


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
        register_sqlite_function(dbapi_connection)

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_isolation_level() != "AUTOCOMMIT":
            conn.exec_driver_sql("BEGIN IMMEDIATE")

