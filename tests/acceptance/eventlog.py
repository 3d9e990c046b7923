"""The events table the harness's steps write to, and the reader of sagakit's tables.

Every event is committed at once (it must survive a SIGKILL of the process that wrote it); see
:mod:`tests.acceptance.crashsaga` for the events the steps write and
:mod:`tests.acceptance.checker` for how they are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from sagakit.storage.schema import SagaTables, build_tables

__all__ = ["EventLog", "TableNames", "epoch", "events_table"]


def events_table(name: str, metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(36), nullable=True),
        sa.Column("step", sa.String(32), nullable=True),
        sa.Column("action", sa.String(16), nullable=True),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(64), nullable=True),
        sa.Column("label", sa.String(32), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("snapshot", sa.Text(), nullable=True),
    )


@dataclasses.dataclass(frozen=True)
class TableNames:
    executions: str
    logs: str
    events: str

    @classmethod
    def for_prefix(cls, prefix: str) -> TableNames:
        return cls(f"{prefix}_exec", f"{prefix}_logs", f"{prefix}_events")


def epoch(value: datetime | None) -> float | None:
    """A timestamp read from the database as seconds since the epoch (naive ones are UTC)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL, a long busy timeout and BEGIN IMMEDIATE writes: many processes share the file."""

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_isolation_level() != "AUTOCOMMIT":
            conn.exec_driver_sql("BEGIN IMMEDIATE")


class EventLog:
    """Writes and reads the events table; reads sagakit's tables for snapshots."""

    def __init__(self, url: str, names: TableNames, label: str) -> None:
        self.label = label
        self.pid = os.getpid()
        self.engine = create_async_engine(url, pool_size=4, max_overflow=8)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.metadata = sa.MetaData()
        self.events = events_table(names.events, self.metadata)
        self.saga_tables: SagaTables = build_tables(names.executions, names.logs)
        ex, logs = self.saga_tables.executions, self.saga_tables.logs
        sid = sa.bindparam("sid", type_=sa.Uuid())
        # The database clock's "now" (SQLite has none: the reading process's clock, read just
        # before the SELECT, is the one sagakit's SQLite storage writes timestamps with).
        now: list[Any] = []
        if self.engine.dialect.name == "postgresql":
            now = [sa.func.now().label("db_now")]
        elif not self.is_sqlite:
            now = [sa.literal_column("UTC_TIMESTAMP(6)").label("db_now")]
        self._snapshot = (
            sa.select(ex.c.status, ex.c.lease_owner, ex.c.next_attempt_at, ex.c.past_pivot, *now,
                      logs.c.id, logs.c.step_name, logs.c.action,
                      logs.c.status.label("log_status"), logs.c.attempt)
            .select_from(ex.outerjoin(logs, logs.c.saga_id == ex.c.saga_id))
            .where(ex.c.saga_id == sid)
            .order_by(logs.c.id)
        )

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    async def drop(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all)

    async def close(self) -> None:
        await self.engine.dispose()

    async def record(
        self,
        saga_id: Any,
        step: str | None,
        action: str | None,
        phase: str,
        *,
        outcome: str | None = None,
        attempt: int | None = None,
        snapshot: dict[str, Any] | None = None,
        label: str | None = None,
        pid: int | None = None,
    ) -> None:
        values = {
            "saga_id": None if saga_id is None else str(saga_id), "step": step, "action": action,
            "phase": phase, "outcome": outcome, "label": label or self.label,
            "pid": self.pid if pid is None else pid, "attempt": attempt, "ts": time.time(),
            "snapshot": None if snapshot is None else json.dumps(snapshot),
        }
        if self.is_sqlite:
            async with self.engine.begin() as conn:
                await conn.execute(self.events.insert().values(**values))
        else:
            async with self._autocommit.connect() as conn:
                await conn.execute(self.events.insert().values(**values))

    async def snapshot(self, saga_id: Any) -> dict[str, Any]:
        """The saga's committed row (status, lease owner, next attempt time, past its pivot),
        its log and the database's "now", read by one SELECT."""
        now = time.time()
        async with self._autocommit.connect() as conn:
            rows = (await conn.execute(self._snapshot, {"sid": saga_id})).all()
        if not rows:
            return {"status": None, "owner": None, "log": [], "now": now,
                    "next_attempt_at": None, "past_pivot": False}
        first = rows[0]
        log = [[r.id, r.step_name, r.action, r.log_status, r.attempt]
               for r in rows if r.id is not None]
        return {"status": first.status, "owner": first.lease_owner, "log": log,
                "now": now if self.is_sqlite else epoch(first.db_now),
                "next_attempt_at": epoch(first.next_attempt_at),
                "past_pivot": bool(first.past_pivot)}

    async def count(self, saga_id: Any, phase: str, *, step: str | None = None,
                    action: str | None = None, outcome: str | None = None) -> int:
        t = self.events
        stmt = sa.select(sa.func.count()).select_from(t).where(
            t.c.saga_id == str(saga_id), t.c.phase == phase)
        if step is not None:
            stmt = stmt.where(t.c.step == step)
        if action is not None:
            stmt = stmt.where(t.c.action == action)
        if outcome is not None:
            stmt = stmt.where(t.c.outcome == outcome)
        async with self._autocommit.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())

    async def all_events(self) -> list[Any]:
        async with self._autocommit.connect() as conn:
            return list((await conn.execute(sa.select(self.events).order_by(self.events.c.id))).all())
