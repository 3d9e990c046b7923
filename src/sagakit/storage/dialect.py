"""What differs between SQLite, PostgreSQL and MySQL/MariaDB: time, JSON binding, and the
one-round-trip checkpoint statement PostgreSQL allows.

Lease times come from the database server's clock on PostgreSQL and MySQL/MariaDB, so workers on
machines with skewed clocks still agree on who holds a lease. SQLite is embedded: the process
clock is the database's clock.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

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
        self.checkpoint_sql = _pg_checkpoint(tables) if self.is_postgres else None
        self.insert_leased_sql = pg_insert_leased(tables) if self.is_postgres else None
        self.checkpoint_batch_sql = pg_checkpoint_batch(tables) if self.is_postgres else None
        self.mysql_checkpoint_sql = mysql_checkpoint(tables) if self.is_mysql else None

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

    @staticmethod
    def aware(value: datetime | None) -> datetime | None:
        """Timestamps read back are UTC; make naive ones (MySQL, SQLite) aware."""
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _pg_checkpoint(tables: SagaTables) -> str:
    """One asyncpg statement: the fenced row update and the log inserts, or nothing at all.

    Parameters: $1 saga_id, $2 has_ctx, $3 ctx, $4 status, $5 reset attempts, $6 release lease,
    $7 lease seconds, $8 fence version, $9 expected version, $10 fence owner, $11-$15 arrays of
    the log entries' step names, actions, statuses, details and error types. Returns the new
    version, or no row when the fence (version / lease owner) did not match.
    """
    ex, logs = tables.executions.name, tables.logs.name
    return f"""
WITH u AS (
  UPDATE {ex} SET
    version = version + 1,
    updated_at = now(),
    context = CASE WHEN $2::boolean THEN $3::text::jsonb ELSE context END,
    status = COALESCE($4::varchar, status),
    recovery_attempts = CASE WHEN $5::boolean THEN 0 ELSE recovery_attempts END,
    lease_owner = CASE WHEN $6::boolean THEN NULL ELSE lease_owner END,
    lease_expires_at = CASE
      WHEN $6::boolean THEN NULL
      WHEN $7::float8 IS NULL THEN lease_expires_at
      ELSE now() + make_interval(secs => $7::float8) END
  WHERE saga_id = $1::uuid
    AND ($8::integer IS NULL OR version = $8::integer)
    AND ($9::integer IS NULL OR version = $9::integer)
    AND ($10::varchar IS NULL OR lease_owner = $10::varchar)
  RETURNING version
), i AS (
  INSERT INTO {logs} (saga_id, step_name, action, status, details, error_type, created_at)
  SELECT $1::uuid, e.step_name, e.action, e.status, e.details, e.error_type, now()
  FROM u, unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::text[])
       WITH ORDINALITY AS e(step_name, action, status, details, error_type, n)
  ORDER BY e.n
)
SELECT version FROM u
"""


def pg_insert_leased(tables: SagaTables) -> str:
    """asyncpg statement creating a saga RUNNING and leased: $1 saga_id, $2 name, $3 context,
    $4 fingerprint, $5 lease owner, $6 lease seconds."""
    return f"""
INSERT INTO {tables.executions.name} (saga_id, name, status, context, version, recovery_attempts,
    fingerprint, lease_owner, lease_expires_at, created_at, updated_at)
VALUES ($1::uuid, $2, 'RUNNING', $3::text::jsonb, 1, 0, $4, $5,
    now() + make_interval(secs => $6::float8), now(), now())
"""


def pg_checkpoint_batch(tables: SagaTables) -> str:
    """One asyncpg statement writing the checkpoints of many sagas (group commit).

    $1-$10 are parallel arrays, one element per saga (saga_id, has_ctx, ctx, status, reset,
    release, lease seconds, fence version, expected version, fence owner); $11-$16 are parallel
    arrays, one element per log entry (saga_id, step, action, status, details, error type).
    Returns (saga_id, new version) for each saga whose fence matched; a fenced-out saga is
    neither updated nor logged, and does not affect the others.
    """
    ex, logs = tables.executions.name, tables.logs.name
    return f"""
WITH v AS (
  SELECT * FROM unnest($1::uuid[], $2::boolean[], $3::text[], $4::varchar[], $5::boolean[],
                       $6::boolean[], $7::float8[], $8::integer[], $9::integer[], $10::varchar[])
    AS v(sid, has_ctx, ctx, status, reset, release, lease, fv, ev, owner)
), u AS (
  UPDATE {ex} AS x SET
    version = x.version + 1,
    updated_at = now(),
    context = CASE WHEN v.has_ctx THEN v.ctx::jsonb ELSE x.context END,
    status = COALESCE(v.status, x.status),
    recovery_attempts = CASE WHEN v.reset THEN 0 ELSE x.recovery_attempts END,
    lease_owner = CASE WHEN v.release THEN NULL ELSE x.lease_owner END,
    lease_expires_at = CASE
      WHEN v.release THEN NULL
      WHEN v.lease IS NULL THEN x.lease_expires_at
      ELSE now() + make_interval(secs => v.lease) END
  FROM v
  WHERE x.saga_id = v.sid
    AND (v.fv IS NULL OR x.version = v.fv)
    AND (v.ev IS NULL OR x.version = v.ev)
    AND (v.owner IS NULL OR x.lease_owner = v.owner)
  RETURNING x.saga_id, x.version
), i AS (
  INSERT INTO {logs} (saga_id, step_name, action, status, details, error_type, created_at)
  SELECT e.sid, e.step_name, e.action, e.status, e.details, e.error_type, now()
  FROM unnest($11::uuid[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[])
       WITH ORDINALITY AS e(sid, step_name, action, status, details, error_type, n)
  JOIN u ON u.saga_id = e.sid
  ORDER BY e.n
)
SELECT saga_id, version FROM u
"""


def mysql_checkpoint(tables: SagaTables) -> tuple[str, str]:
    """The MySQL/MariaDB checkpoint statements for the driver's own cursor (format paramstyle):
    the fenced row update (parameters: has_ctx, ctx, status, reset, release, lease
    microseconds (twice), saga_id hex, fence version (twice), expected version (twice), owner
    (twice)) and the start of the log insert (append ``(%s, ...)`` rows)."""
    ex, logs = tables.executions.name, tables.logs.name
    update = f"""UPDATE {ex} SET
  version = version + 1,
  updated_at = UTC_TIMESTAMP(6),
  context = IF(%s, %s, context),
  status = COALESCE(%s, status),
  recovery_attempts = IF(%s, 0, recovery_attempts),
  lease_expires_at = IF(%s, NULL, IF(%s IS NULL, lease_expires_at,
                                     TIMESTAMPADD(MICROSECOND, %s, UTC_TIMESTAMP(6)))),
  lease_owner = IF(%s, NULL, lease_owner)
WHERE saga_id = %s AND (%s IS NULL OR version = %s) AND (%s IS NULL OR version = %s)
  AND (%s IS NULL OR lease_owner = %s)"""
    insert = (f"INSERT INTO {logs} (saga_id, step_name, action, status, details, error_type, "
              "created_at) VALUES ")
    return update, insert
