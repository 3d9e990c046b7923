"""The PostgreSQL hot path: checkpoints and saga starts sent straight to asyncpg on a pooled
connection (:class:`~sagakit.storage.pool.PoolLease`), one statement and one round trip each,
in autocommit mode. Everything else goes through SQLAlchemy (:mod:`sagakit.storage.queries`).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sagakit.storage.faults import Fault, classify
from sagakit.storage.listener import channel_for
from sagakit.storage.pool import LeasedStart, PoolLease
from sagakit.storage.run import Checkpoint
from sagakit.storage.schema import SagaTables

__all__ = ["PgWriter"]

_UNIQUE_VIOLATION = "23505"


async def _call(lease: PoolLease, method: str, sql: str, *args: Any) -> Any:
    """Run one statement on the lease's asyncpg connection. A connection asyncpg reports closed,
    or that failed as a lost connection does, is invalidated, so the pool replaces it instead of
    handing it out again."""
    raw = lease.driver
    try:
        return await getattr(raw, method)(sql, *args)
    except Exception as error:
        if raw.is_closed() or classify(error) is Fault.UNAVAILABLE:
            await lease.invalidate()
        raise


class PgWriter:
    """The asyncpg statements of one set of tables."""

    def __init__(self, tables: SagaTables) -> None:
        self.checkpoint_sql = _checkpoint_sql(tables)
        # The same, also sending a wake-up (a submitted saga's release, a durable wait): the
        # notification goes out with the commit, and only if the fence matched.
        self.checkpoint_wake_sql = self.checkpoint_sql.replace(
            "SELECT version FROM u",
            "SELECT u.version FROM u CROSS JOIN LATERAL "
            f"(SELECT pg_notify('{channel_for(tables.executions.name)}', $20::text)) AS n")
        self.insert_sql = _insert_sql(tables)
        self.batch_sql = _batch_sql(tables)

    async def write_checkpoint(self, lease: PoolLease, cp: Checkpoint, text: str | None) -> int | None:
        """Write one update checkpoint; return the new version, or None when the fence did not
        match (nothing written; the caller finds out why)."""
        entries = cp.entries
        wake = () if cp.wake is None else (cp.wake,)
        version = await _call(
            lease, "fetchval", self.checkpoint_sql if cp.wake is None else self.checkpoint_wake_sql,
            cp.saga_id, text is not None, text,
            None if cp.status is None else cp.status.value, cp.reset_attempts,
            cp.releases_lease, cp.lease_seconds, cp.fence_version, cp.expected_version,
            cp.fence_owner, [e.step_name for e in entries], [e.action.value for e in entries],
            [e.status.value for e in entries], [e.details for e in entries],
            [e.error_type for e in entries], [e.attempt for e in entries],
            cp.wait_seconds, cp.clear_wait, cp.past_pivot, *wake,
        )
        return None if version is None else int(version)

    async def insert_leased(self, lease: PoolLease, start: LeasedStart) -> bool:
        """Insert the saga RUNNING and leased; False, with nothing written, if the id exists."""
        try:
            await _call(lease, "execute", self.insert_sql, start.saga_id, start.name, start.text,
                        start.fingerprint, start.owner, start.lease_seconds,
                        start.deadline_seconds)
        except Exception as error:
            if getattr(error, "sqlstate", None) == _UNIQUE_VIOLATION:
                return False
            raise
        return True

    async def write_batch(
        self, lease: PoolLease, items: list[tuple[Checkpoint, str | None]],
        starts: list[LeasedStart],
    ) -> tuple[list[int | None], list[bool]]:
        """Write the update checkpoints of distinct sagas and insert the started sagas, in one
        statement. Returns, in the order given, each checkpoint's new version (None when its
        fence did not match: nothing of it was written) and whether each start was inserted
        (not when its id exists). Neither failure affects the others."""
        cps = [cp for cp, _ in items]
        entries = [(cp.saga_id, e) for cp in cps for e in cp.entries]
        rows = await _call(
            lease, "fetch", self.batch_sql,
            [cp.saga_id for cp in cps], [text is not None for _, text in items],
            [text for _, text in items],
            [None if cp.status is None else cp.status.value for cp in cps],
            [cp.reset_attempts for cp in cps], [cp.releases_lease for cp in cps],
            [cp.lease_seconds for cp in cps], [cp.fence_version for cp in cps],
            [cp.expected_version for cp in cps], [cp.fence_owner for cp in cps],
            [sid for sid, _ in entries], [e.step_name for _, e in entries],
            [e.action.value for _, e in entries], [e.status.value for _, e in entries],
            [e.details for _, e in entries], [e.error_type for _, e in entries],
            [s.saga_id for s in starts], [s.name for s in starts], [s.text for s in starts],
            [s.fingerprint for s in starts], [s.owner for s in starts],
            [s.lease_seconds for s in starts],
            [cp.wait_seconds for cp in cps], [cp.clear_wait for cp in cps],
            [cp.past_pivot for cp in cps], [e.attempt for _, e in entries],
            [s.deadline_seconds for s in starts],
        )
        written: dict[UUID, int] = {}
        inserted: set[UUID] = set()
        for saga_id, version in rows:
            if version == 0:  # the marker of an inserted start (a checkpoint's version is > 1)
                inserted.add(saga_id)
            else:
                written[saga_id] = version
        return ([written.get(cp.saga_id) for cp in cps],
                [s.saga_id in inserted for s in starts])


def _checkpoint_sql(tables: SagaTables) -> str:
    """One statement: the fenced row update and the log inserts, or nothing at all.

    Parameters: $1 saga_id, $2 has_ctx, $3 ctx, $4 status, $5 reset attempts, $6 release lease,
    $7 lease seconds, $8 fence version, $9 expected version, $10 fence owner, $11-$16 arrays of
    the log entries' step names, actions, statuses, details, error types and attempts, $17 wait
    seconds (NULL: no wait), $18 clear the wait, $19 past the pivot. Returns the new version, or
    no row when the fence (version / lease owner) did not match.
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
      ELSE now() + make_interval(secs => $7::float8) END,
    next_attempt_at = CASE
      WHEN $17::float8 IS NOT NULL THEN now() + make_interval(secs => $17::float8)
      WHEN $18::boolean THEN NULL
      ELSE next_attempt_at END,
    past_pivot = past_pivot OR $19::boolean
  WHERE saga_id = $1::uuid
    AND ($8::integer IS NULL OR version = $8::integer)
    AND ($9::integer IS NULL OR version = $9::integer)
    AND ($10::varchar IS NULL OR lease_owner = $10::varchar)
  RETURNING version
), i AS (
  INSERT INTO {logs} (saga_id, step_name, action, status, details, error_type, created_at,
                      attempt)
  SELECT $1::uuid, e.step_name, e.action, e.status, e.details, e.error_type, now(), e.attempt
  FROM u, unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                 $16::integer[])
       WITH ORDINALITY AS e(step_name, action, status, details, error_type, attempt, n)
  ORDER BY e.n
)
SELECT version FROM u
"""


def _insert_sql(tables: SagaTables) -> str:
    """The insert creating a saga RUNNING and leased: $1 saga_id, $2 name, $3 context,
    $4 fingerprint, $5 lease owner, $6 lease seconds, $7 deadline seconds (NULL: none)."""
    return f"""
INSERT INTO {tables.executions.name} (saga_id, name, status, context, version, recovery_attempts,
    fingerprint, lease_owner, lease_expires_at, created_at, updated_at, deadline_at)
VALUES ($1::uuid, $2, 'RUNNING', $3::text::jsonb, 1, 0, $4, $5,
    now() + make_interval(secs => $6::float8), now(), now(),
    now() + make_interval(secs => $7::float8))
"""


def _batch_sql(tables: SagaTables) -> str:
    """One statement writing the checkpoints of many sagas and inserting started ones (group
    commit).

    $1-$10 and $23-$25 are parallel arrays, one element per checkpoint (saga_id, has_ctx, ctx,
    status, reset, release, lease seconds, fence version, expected version, fence owner; wait
    seconds, clear wait, past pivot); $11-$16 and $26 one element per log entry (saga_id, step,
    action, status, details, error type; attempt); $17-$22 and $27 one element per start
    (saga_id, name, ctx, fingerprint, owner, lease seconds; deadline seconds). Returns
    (saga_id, new version) for each saga whose fence matched and (saga_id, 0) for each saga
    inserted; a fenced-out checkpoint is neither updated nor logged, a start whose id exists
    inserts nothing (ON CONFLICT DO NOTHING), and neither affects the others.
    """
    ex, logs = tables.executions.name, tables.logs.name
    return f"""
WITH s AS (
  INSERT INTO {ex} (saga_id, name, status, context, version, recovery_attempts, fingerprint,
                    lease_owner, lease_expires_at, created_at, updated_at, deadline_at)
  SELECT s.sid, s.name, 'RUNNING', s.ctx::jsonb, 1, 0, s.fp, s.owner,
         now() + make_interval(secs => s.lease), now(), now(),
         now() + make_interval(secs => s.deadline)
  FROM unnest($17::uuid[], $18::text[], $19::text[], $20::text[], $21::text[], $22::float8[],
              $27::float8[])
    AS s(sid, name, ctx, fp, owner, lease, deadline)
  ON CONFLICT (saga_id) DO NOTHING
  RETURNING saga_id
), v AS (
  SELECT * FROM unnest($1::uuid[], $2::boolean[], $3::text[], $4::varchar[], $5::boolean[],
                       $6::boolean[], $7::float8[], $8::integer[], $9::integer[], $10::varchar[],
                       $23::float8[], $24::boolean[], $25::boolean[])
    AS v(sid, has_ctx, ctx, status, reset, release, lease, fv, ev, owner, wait, clear, pivot)
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
      ELSE now() + make_interval(secs => v.lease) END,
    next_attempt_at = CASE
      WHEN v.wait IS NOT NULL THEN now() + make_interval(secs => v.wait)
      WHEN v.clear THEN NULL
      ELSE x.next_attempt_at END,
    past_pivot = x.past_pivot OR v.pivot
  FROM v
  WHERE x.saga_id = v.sid
    AND (v.fv IS NULL OR x.version = v.fv)
    AND (v.ev IS NULL OR x.version = v.ev)
    AND (v.owner IS NULL OR x.lease_owner = v.owner)
  RETURNING x.saga_id, x.version
), i AS (
  INSERT INTO {logs} (saga_id, step_name, action, status, details, error_type, created_at,
                      attempt)
  SELECT e.sid, e.step_name, e.action, e.status, e.details, e.error_type, now(), e.attempt
  FROM unnest($11::uuid[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[],
              $26::integer[])
       WITH ORDINALITY AS e(sid, step_name, action, status, details, error_type, attempt, n)
  JOIN u ON u.saga_id = e.sid
  ORDER BY e.n
)
SELECT saga_id, version FROM u UNION ALL SELECT saga_id, 0 FROM s
"""
