"""What differs between SQLite, PostgreSQL and MySQL/MariaDB in SQLAlchemy statements: time and
JSON binding, upserts, the liveness of a lease's owner. (The driver-level hot paths are in :mod:`sagakit.storage.postgres` and
:mod:`sagakit.storage.mysql`.)

Lease times come from the database server's clock on PostgreSQL and MySQL/MariaDB, so workers on
machines with skewed clocks still agree on who holds a lease. SQLite is embedded: the process
clock is the database's clock.
"""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from sagakit.storage.schema import SagaTables

__all__ = ["Dialect"]


class Dialect:
    """SQL fragments for one database dialect, bound to one set of tables."""

    def __init__(self, name: str, tables: SagaTables) -> None:
        self.name = name
        self.is_postgres = name == "postgresql"
        self.is_mysql = name in ("mysql", "mariadb")
        self.is_sqlite = name == "sqlite"
        self.tables = tables
        t = tables.executions
        if self.is_postgres:
            self.context_in: Any = sa.cast(sa.bindparam("ctx", type_=sa.Text()), postgresql.JSONB)
            self.context_out: Any = sa.cast(t.c.context, sa.Text()).label("context")
        else:
            self.context_in = sa.bindparam("ctx", type_=sa.Text())
            self.context_out = t.c.context

    def upsert(self, table: sa.Table, values: dict[str, Any], replace: list[str]) -> Any:
        """An INSERT of ``values`` that, when a row with the same primary key exists, sets
        that row's ``replace`` columns to the values given instead (one statement, atomic)."""
        if self.is_mysql:
            mine = mysql.insert(table).values(**values)
            return mine.on_duplicate_key_update({c: mine.inserted[c] for c in replace})
        insert = (postgresql.insert if self.is_postgres else sqlite.insert)(table).values(**values)
        return insert.on_conflict_do_update(
            index_elements=list(table.primary_key.columns),
            set_={c: insert.excluded[c] for c in replace})

    # -- time ---------------------------------------------------------------------------------

    def now(self) -> Any:
        """An expression for 'now' in UTC on the database's clock."""
        if self.is_postgres:
            return sa.func.now()
        if self.is_mysql:
            return sa.literal_column("UTC_TIMESTAMP(6)")
        return sa.bindparam("now", type_=sa.DateTime())

    def now_plus(self, param: str) -> Any:
        """'now' plus the seconds bound to ``param`` (seconds may be negative)."""
        seconds = sa.bindparam(param, type_=sa.Float())
        if self.is_postgres:
            return sa.func.now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, seconds)
        if self.is_mysql:
            micros = sa.bindparam(param + "_us", type_=sa.BigInteger())
            return sa.func.timestampadd(sa.literal_column("MICROSECOND"), micros,
                                        sa.literal_column("UTC_TIMESTAMP(6)"))
        return sa.bindparam(param + "_at", type_=sa.DateTime())

    def time_params(self, **seconds: float | None) -> dict[str, Any]:
        """Bind values for :meth:`now` and :meth:`now_plus` parameters."""
        params: dict[str, Any] = {}
        if self.is_sqlite:
            now = datetime.now(UTC).replace(tzinfo=None)
            params["now"] = now
            for name, value in seconds.items():
                params[name + "_at"] = None if value is None else now + timedelta(seconds=value)
        elif self.is_mysql:
            for name, value in seconds.items():
                params[name + "_us"] = None if value is None else int(value * 1_000_000)
        else:
            params.update(seconds)
        return params

    # -- leases -------------------------------------------------------------------------------

    @property
    def lock_space(self) -> int:
        """The first key of PostgreSQL's liveness advisory locks: one per executions table."""
        return zlib.crc32(self.tables.executions.name.encode()) & 0x7FFFFFFF

    def owner_dead(self, owner: Any) -> Any:
        """True where ``owner`` is a live owner id whose liveness session is gone (see
        :mod:`sagakit.storage.liveness`): its advisory lock (PostgreSQL) or named lock
        (MySQL/MariaDB) is free, or its process is gone (SQLite's ``sagakit_owner_dead``
        function, registered on each connection)."""
        live = owner.like("~%")
        if self.is_postgres:
            locks: Any = (sa.select(sa.literal_column("objid")).select_from(sa.table("pg_locks"))
                     .where(sa.text(f"locktype = 'advisory' AND classid = {self.lock_space} "
                                    "AND objsubid = 2")))
            return sa.and_(live, sa.cast(sa.func.hashtext(owner), postgresql.OID)
                           .not_in(locks.scalar_subquery()))
        if self.is_mysql:
            return sa.and_(live, sa.func.coalesce(sa.func.is_free_lock(
                sa.func.concat("sagakit:", sa.func.md5(owner))), 0) == 1)
        return sa.and_(live, sa.func.sagakit_owner_dead(owner) == 1)

    def lease_free(self, table: sa.Table) -> Any:
        """True where the row's lease may be taken by the claimer ``:owner``: none, run out,
        or held by another owner who is dead. (A claimer's own leases are never judged dead:
        its session may have died a moment ago without its knowing yet, and its runs of those
        sagas still be going; they stop when it notices.)"""
        c = table.c
        return sa.or_(c.lease_owner.is_(None), c.lease_expires_at <= self.now(),
                      sa.and_(c.lease_owner != sa.bindparam("owner", type_=sa.String()),
                              self.owner_dead(c.lease_owner)))

    def lease_held(self, table: sa.Table) -> Any:
        """True where the row's lease is held by a run still alive (the negation of
        :meth:`lease_free`)."""
        c = table.c
        return sa.and_(c.lease_owner.is_not(None), c.lease_expires_at > self.now(),
                       sa.not_(self.owner_dead(c.lease_owner)))

    @staticmethod
    def aware(value: datetime | None) -> datetime | None:
        """Timestamps read back are UTC; make naive ones (MySQL, SQLite) aware."""
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

