"""The SQL statements of the SQL storage, as SQLAlchemy Core, each run on a given connection.

Statements are built once per storage and reused, so SQLAlchemy's compiled cache and the
drivers' prepared-statement caches hit on every call.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from sagakit.exceptions import (
    SagaBusyError,
    SagaConcurrencyError,
    SagaLeaseLostError,
    SagaNotFoundError,
)
from sagakit.records import (
    RECOVERABLE_STATUSES,
    TERMINAL_STATUSES,
    SagaAction,
    SagaLogEntry,
    SagaState,
    SagaStatus,
    SagaStepStatus,
)
from sagakit.storage.dialect import Dialect
from sagakit.storage.liveness import BUSY, ORPHANS, QUIET
from sagakit.storage.pool import LeasedStart
from sagakit.storage.run import Checkpoint, wrong_saga
from sagakit.storage.schema import RECOVERABLE_SQL, RECOVERY_SQL

__all__ = ["Queries", "row_to_state"]

_RECOVERABLE = sorted(s.value for s in RECOVERABLE_STATUSES)
MYSQL_WINDOW = 4
"""MySQL/MariaDB: a claim of ``n`` sagas reads ``n * MYSQL_WINDOW`` candidates (oldest first)
and takes the first ``n`` still due that no other claimer has locked (see
:meth:`Queries.lock_by_ids`)."""
_CLAIMABLE = {
    False: _RECOVERABLE,
    True: sorted([*_RECOVERABLE, SagaStatus.PARKED.value]),
}


def row_to_state(row: Any) -> SagaState:
    m = row._mapping
    context = m["context"]
    return SagaState(
        saga_id=m["saga_id"],
        name=m["name"],
        status=SagaStatus(m["status"]),
        context=orjson.loads(context) if isinstance(context, str | bytes) else context,
        version=m["version"],
        recovery_attempts=m["recovery_attempts"],
        created_at=Dialect.aware(m["created_at"]),
        updated_at=Dialect.aware(m["updated_at"]),
        lease_owner=m["lease_owner"],
        lease_expires_at=Dialect.aware(m["lease_expires_at"]),
        fingerprint=m["fingerprint"],
        next_attempt_at=Dialect.aware(m["next_attempt_at"]),
        past_pivot=bool(m["past_pivot"]),
        deadline_at=Dialect.aware(m["deadline_at"]),
        queue=m["queue"],
        concurrency_key=m["concurrency_key"],
        priority=m["priority"],
    )


def _log_rows(cp: Checkpoint, time: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameters of a checkpoint's log entry inserts."""
    return [
        {"sid": cp.saga_id, "step_name": e.step_name, "action": e.action.value,
         "status": e.status.value, "details": e.details, "error_type": e.error_type,
         "attempt": e.attempt, **time}
        for e in cp.entries
    ]


class Queries:
    def __init__(self, dialect: Dialect) -> None:
        self.d = d = dialect
        t, logs = dialect.tables.executions, dialect.tables.logs
        self.t, self.logs = t, logs
        sid = sa.bindparam("sid", type_=sa.Uuid())
        self.columns = [c for c in t.c if c.name != "context"] + [d.context_out]
        self._row = sa.select(*self.columns).where(t.c.saga_id == sid)
        self._state = sa.select(t.c.status, d.context_out, t.c.version).where(t.c.saga_id == sid)
        self._state_locked = self._state.with_for_update()
        self._history = (
            sa.select(logs.c.step_name, logs.c.action, logs.c.status, logs.c.created_at,
                      logs.c.details, logs.c.error_type, logs.c.attempt)
            .where(logs.c.saga_id == sid).order_by(logs.c.id)
        )
        self._insert_log = sa.insert(logs).values(
            saga_id=sid, step_name=sa.bindparam("step_name"), action=sa.bindparam("action"),
            status=sa.bindparam("status"), details=sa.bindparam("details"),
            error_type=sa.bindparam("error_type"), created_at=d.now(),
            attempt=sa.bindparam("attempt", type_=sa.Integer()),
        )
        self._insert_leased = sa.insert(t).values(
            saga_id=sid, name=sa.bindparam("name"), status=SagaStatus.RUNNING.value,
            context=d.context_in, version=1, recovery_attempts=0,
            fingerprint=sa.bindparam("fingerprint"), lease_owner=sa.bindparam("owner"),
            lease_expires_at=d.now_plus("lease"), created_at=d.now(), updated_at=d.now(),
            deadline_at=d.now_plus("deadline"),
        )
        self._insert_plain = sa.insert(t).values(
            saga_id=sid, name=sa.bindparam("name"), status=sa.bindparam("status"),
            context=d.context_in, version=1, recovery_attempts=0,
            created_at=d.now(), updated_at=d.now(),
        )
        self._claims = {allow: self._claim_stmt(sid, allow) for allow in (False, True)}
        # Fenced by owner and by the run's version: a later claim of the saga under the same
        # owner id (the same worker, its first run stalled past its lease) wrote a newer one.
        mine = (t.c.saga_id == sid, t.c.lease_owner == sa.bindparam("owner"),
                sa.or_(sa.bindparam("run_version", type_=sa.Integer()).is_(None),
                       t.c.version == sa.bindparam("run_version", type_=sa.Integer())))
        self._renew = sa.update(t).where(*mine).values(lease_expires_at=d.now_plus("lease"))
        self._release = (
            sa.update(t).where(*mine)
            .values(lease_owner=None, lease_expires_at=None)
        )
        self._release_later = self._release.values(next_attempt_at=d.now_plus("retry"))
        self._updates: dict[tuple[bool, ...], Any] = {}
        self._statements: dict[tuple[Any, ...], Any] = {}

    def _claim_stmt(self, sid: Any, allow_parked: bool) -> Any:
        t, d = self.t, self.d
        owner: Any = sa.bindparam("owner")
        stmt = (
            sa.update(t)
            .where(
                t.c.saga_id == sid,
                t.c.status.in_(_CLAIMABLE[allow_parked]),
                sa.or_(sa.bindparam("expected_name", type_=sa.String()).is_(None),
                       t.c.name == sa.bindparam("expected_name", type_=sa.String())),
                sa.or_(t.c.lease_owner == owner, d.lease_free(t)),
            )
            .ordered_values(*self._claim_values(sa.bindparam("inc", type_=sa.Integer())))
        )
        if not d.is_mysql:
            stmt = stmt.returning(*self.columns)
        return stmt

    # -- reads --------------------------------------------------------------------------------

    async def fetch_row(self, conn: AsyncConnection, saga_id: UUID) -> Any:
        return (await conn.execute(self._row, {"sid": saga_id})).first()

    async def load_state(
        self, conn: AsyncConnection, saga_id: UUID, *, for_update: bool = False
    ) -> tuple[SagaStatus, dict[str, Any], int]:
        stmt = self._state_locked if for_update and not self.d.is_sqlite else self._state
        row = (await conn.execute(stmt, {"sid": saga_id})).first()
        if row is None:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)
        context = row[1]
        return SagaStatus(row[0]), orjson.loads(context) if isinstance(context, str) else context, row[2]

    async def history(self, conn: AsyncConnection, saga_id: UUID) -> list[SagaLogEntry]:
        rows = (await conn.execute(self._history, {"sid": saga_id})).all()
        return [
            SagaLogEntry(saga_id, r[0], SagaAction(r[1]), SagaStepStatus(r[2]),
                         Dialect.aware(r[3]), r[4], r[5], r[6])  # type: ignore[arg-type]
            for r in rows
        ]

    async def due_for_recovery(
        self, conn: AsyncConnection, limit: int, max_attempts: int,
        stale_after: float | None, saga_name: str | None,
    ) -> list[UUID]:
        names = None if saga_name is None else frozenset({saga_name})
        stmt = self._due(stale_after is not None, names)
        params = {"limit": limit, "max_attempts": max_attempts, "owner": "",
                  **self.d.time_params(stale=None if stale_after is None else -stale_after)}
        return [r[0] for r in (await conn.execute(stmt, params)).all()]

    async def claim_due(
        self, conn: AsyncConnection, owner: str, limit: int, lease: float, max_attempts: int,
        names: frozenset[str] | None, stale_after: float | None,
    ) -> list[SagaState]:
        """Lease up to ``limit`` due sagas to ``owner`` in the caller's transaction. Rows another
        transaction is claiming are skipped (SKIP LOCKED) on PostgreSQL; on MySQL/MariaDB the
        primary-key UPDATE re-checks each lease; SQLite serialises writers (BEGIN IMMEDIATE)."""
        d = self.d
        params = {"owner": owner, "limit": limit, "max_attempts": max_attempts, **d.time_params(
            lease=lease, stale=None if stale_after is None else -stale_after)}
        if d.is_postgres:  # one statement: lock, lease and return
            stmt = self._cached(("claim", stale_after is not None, names), lambda: (
                sa.update(self.t)
                .where(self.t.c.saga_id.in_(self._due(stale_after is not None, names)
                                            .with_for_update(skip_locked=True).scalar_subquery()))
                .ordered_values(*self._claim_values(1)).returning(*self.columns)))
            return [row_to_state(r) for r in (await conn.execute(stmt, params)).all()]
        due = self._due(stale_after is not None, names)
        if d.is_mysql:  # a window of candidates, of which claimers take different ones
            params["limit"] = limit * MYSQL_WINDOW
        ids = [r[0] for r in (await conn.execute(due, params)).all()]
        if not ids:
            return []
        # MySQL/MariaDB: the candidates were read without locks (FOR UPDATE on the secondary
        # index deadlocks against concurrent checkpoints); then up to ``limit`` of them still
        # due are locked by primary key, skipping those another claimer has locked, and leased
        # (see lock_by_ids). SQLite: BEGIN IMMEDIATE already serialises claimers.
        update, mine = self.claim_by_ids(queued=False)
        params["ids"] = ids
        if d.is_sqlite:
            rows = (await conn.execute(update.returning(*self.columns), params)).all()
        else:
            params["ids"] = ids = await self.lock_by_ids(conn, ids, limit, params, queued=False)
            if not ids:
                return []
            await conn.execute(update, params)
            rows = (await conn.execute(mine, {"ids": ids, "owner": owner})).all()
        return [row_to_state(r) for r in rows]

    async def lock_by_ids(self, conn: AsyncConnection, ids: list[Any], limit: int,
                          params: dict[str, Any], *, queued: bool) -> list[Any]:
        """MySQL/MariaDB: lock up to ``limit`` of the candidates ``ids`` (in claim order) that
        are still due, by primary key, ``SKIP LOCKED``, ``limit`` candidates at a time (the
        oldest first; the next ones only if some of those were taken or locked): claimers that
        read the same candidates take different ones instead of queueing on each other's row
        locks and then finding them taken (with four claimers, over half of the claims came
        back empty that way). The ids locked."""
        lock = self._cached(("lock ids", queued), lambda: self._build_claim_by_ids(queued)[2])
        locked: list[Any] = []
        for start in range(0, len(ids), limit):
            found = await conn.execute(lock, {**params, "ids": ids[start:start + limit],
                                              "limit": limit - len(locked)})
            locked += [r[0] for r in found.all()]
            if len(locked) >= limit:
                break
        return locked

    def _claim_values(self, inc: Any) -> list[tuple[Any, Any]]:
        """What a claim writes: the lease, one more version, ``inc`` (an int or a SQL
        expression) more recovery attempts (none for a WAITING saga), and RUNNING for a PENDING
        or WAITING saga. In this order:
        MySQL/MariaDB assign left to right, each assignment seeing the ones before it, so the
        attempt count must read the status before it changes."""
        t, d = self.t, self.d
        return [
            (t.c.lease_owner, sa.bindparam("owner")),
            (t.c.lease_expires_at, d.now_plus("lease")),
            (t.c.version, t.c.version + 1),
            (t.c.updated_at, d.now()),
            (t.c.recovery_attempts, t.c.recovery_attempts + sa.case(
                (t.c.status == SagaStatus.WAITING.value, 0), else_=inc)),
            (t.c.status, sa.case(
                (t.c.status.in_([SagaStatus.PENDING.value, SagaStatus.WAITING.value]),
                 SagaStatus.RUNNING.value), else_=t.c.status)),
        ]

    def claim_by_ids(self, *, queued: bool) -> tuple[Any, Any]:
        """The claim of candidates read beforehand: the UPDATE of those still due, by primary
        key (``:ids``, ``:owner``, ``:max_attempts`` and the lease's time parameters), and the
        SELECT of the rows it leased to ``owner``. A claim of queued sagas (``queued``) counts
        no recovery attempt for a PENDING saga either: it is the saga's first run."""
        update, mine, _ = self._cached(("claim ids", queued),
                                       lambda: self._build_claim_by_ids(queued))
        return update, mine

    def _build_claim_by_ids(self, queued: bool) -> tuple[Any, Any, Any]:
        t, d = self.t, self.d
        ids = sa.bindparam("ids", expanding=True, type_=sa.Uuid())
        inc: Any = sa.case((t.c.status == SagaStatus.PENDING.value, 0), else_=1) if queued else 1
        still_due = (
            t.c.saga_id.in_(ids),
            sa.text(RECOVERABLE_SQL),
            t.c.recovery_attempts <= sa.bindparam("max_attempts", type_=sa.Integer()),
            d.lease_free(t),
            sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at <= d.now()),
        )
        update = sa.update(t).where(*still_due).ordered_values(*self._claim_values(inc))
        mine = sa.select(*self.columns).where(t.c.saga_id.in_(ids),
                                              t.c.lease_owner == sa.bindparam("owner"))
        lock = (sa.select(t.c.saga_id).where(*still_due)
                .limit(sa.bindparam("limit", type_=sa.Integer()))
                .with_for_update(skip_locked=True))
        return update, mine, lock

    @property
    def in_flight(self) -> Any:
        """Of the sagas in flight (RUNNING or COMPENSATING, the lease not run out) under live
        owners other than ``:owner``, one, a dead owner's first: whether its owner is dead
        (read on the (status, ...) index: the sagas in flight only)."""
        def build() -> Any:
            t, d = self.t, self.d
            dead = d.owner_dead(t.c.lease_owner).label("dead")
            return sa.select(dead).where(
                t.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]),
                t.c.lease_expires_at > d.now(), t.c.lease_owner.like("~%"),
                t.c.lease_owner != sa.bindparam("owner", type_=sa.String()),
            ).order_by(sa.desc(sa.literal_column("dead"))).limit(1)
        return self._cached(("in flight",), build)

    async def look(self, conn: AsyncConnection, owner: str) -> int:
        """What a liveness session looks for, through ``conn`` (see
        :data:`sagakit.storage.liveness.ORPHANS`): ORPHANS, BUSY or QUIET."""
        params = {"owner": owner, **self.d.time_params()}
        row = (await conn.execute(self.in_flight, params)).first()
        return QUIET if row is None else ORPHANS if row[0] else BUSY

    def _cached(self, key: tuple[Any, ...], build: Any) -> Any:
        """A statement built once per key (bounded: the keys are few in practice)."""
        stmt = self._statements.get(key)
        if stmt is None:
            if len(self._statements) > 256:
                self._statements.clear()
            stmt = self._statements[key] = build()
        return stmt

    def _due(self, stale: bool, names: frozenset[str] | None) -> Any:
        """The recovery scan: the ids of up to ``:limit`` due sagas in no queue, least recently
        updated first (``:max_attempts``, and ``:stale_at`` with ``stale``, are parameters too).
        PostgreSQL and SQLite read them from the partial index of recoverable sagas in no queue,
        in its order. MySQL/MariaDB have no partial indexes: there one branch per recoverable status
        reads the (status, updated_at) index in its order (InnoDB keys it by saga_id last) and
        stops at the limit, and the branches are merged; a single ``status IN`` query would
        sort every due saga on each call (a backlog of 10 000 costs milliseconds per claim)."""
        return self._cached(("due", stale, names), lambda: self._build_due(stale, names))

    def _build_due(self, stale: bool, names: frozenset[str] | None) -> Any:
        t, d = self.t, self.d
        limit = sa.bindparam("limit", type_=sa.Integer())
        conditions = [
            t.c.recovery_attempts <= sa.bindparam("max_attempts", type_=sa.Integer()),
            d.lease_free(t),
            sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at <= d.now()),
        ]
        if names is not None:
            conditions.append(t.c.name.in_(sorted(names)))
        if stale:
            conditions.append(t.c.updated_at <= d.now_plus("stale"))
        if not d.is_mysql:
            return (sa.select(t.c.saga_id)
                    .where(sa.text(RECOVERY_SQL), *conditions)  # the partial index's predicate
                    .order_by(t.c.updated_at, t.c.saga_id).limit(limit))
        branches = [
            sa.select(t.c.saga_id, t.c.updated_at)
            .where(t.c.status == status, t.c.queue.is_(None), *conditions)
            .order_by(t.c.updated_at, t.c.saga_id).limit(limit)
            for status in _RECOVERABLE
        ]
        due = sa.union_all(*branches).subquery("due")
        return sa.select(due.c.saga_id).order_by(due.c.updated_at, due.c.saga_id).limit(limit)

    async def list_sagas(
        self, conn: AsyncConnection, statuses: frozenset[SagaStatus] | None,
        saga_name: str | None, limit: int,
    ) -> list[SagaState]:
        t = self.t
        stmt = sa.select(*self.columns)
        if statuses is not None:
            stmt = stmt.where(t.c.status.in_(sorted(s.value for s in statuses)))
        if saga_name is not None:
            stmt = stmt.where(t.c.name == saga_name)
        stmt = stmt.order_by(t.c.created_at.desc(), t.c.saga_id).limit(limit)
        return [row_to_state(r) for r in (await conn.execute(stmt)).all()]

    # -- lease writes -------------------------------------------------------------------------

    async def insert_leased(self, conn: AsyncConnection, start: LeasedStart) -> bool:
        """Insert the saga RUNNING and leased, in the caller's transaction (SQLite; PostgreSQL
        and MySQL/MariaDB go through their driver-level writers). False, with nothing written,
        if the id exists."""
        params = {"sid": start.saga_id, "name": start.name, "ctx": start.text,
                  "fingerprint": start.fingerprint, "owner": start.owner,
                  **self.d.time_params(lease=start.lease_seconds,
                                       deadline=start.deadline_seconds)}
        try:
            await conn.execute(self._insert_leased, params)
        except sa.exc.IntegrityError:
            return False
        return True

    async def claim(
        self, conn: AsyncConnection, saga_id: UUID, owner: str, lease: float,
        count_attempt: bool, allow_parked: bool, name: str | None = None,
    ) -> SagaState:
        params = {"sid": saga_id, "owner": owner, "inc": int(count_attempt),
                  "expected_name": name,
                  **self.d.time_params(lease=lease)}
        result = await conn.execute(self._claims[allow_parked], params)
        if self.d.is_mysql:
            row = await self.fetch_row(conn, saga_id) if result.rowcount else None
        else:
            row = result.first()
        if row is not None:
            return row_to_state(row)
        row = await self.fetch_row(conn, saga_id)
        if row is None:
            raise SagaNotFoundError(f"no saga with id {saga_id}", saga_id=saga_id)
        state = row_to_state(row)
        if name is not None and state.name != name:
            raise wrong_saga(saga_id, state.name, name)
        if state.status in TERMINAL_STATUSES or state.status is SagaStatus.PARKED:
            return state
        raise SagaBusyError(
            f"saga {saga_id} is being run by {state.lease_owner} (lease until "
            f"{state.lease_expires_at})", saga_id=saga_id, saga_name=state.name,
        )

    async def renew(self, conn: AsyncConnection, saga_id: UUID, owner: str, lease: float,
                    version: int | None) -> bool:
        params = {"sid": saga_id, "owner": owner, "run_version": version,
                  **self.d.time_params(lease=lease)}
        return bool((await conn.execute(self._renew, params)).rowcount)

    async def release(
        self, conn: AsyncConnection, saga_id: UUID, owner: str, retry_after: float | None,
        version: int | None,
    ) -> None:
        params = {"sid": saga_id, "owner": owner, "run_version": version}
        if retry_after is None:
            await conn.execute(self._release, params)
        else:
            params.update(self.d.time_params(retry=retry_after))
            await conn.execute(self._release_later, params)

    def lease_lost(self, saga_id: UUID, owner: str) -> SagaLeaseLostError:
        return SagaLeaseLostError(
            f"saga {saga_id}: the lease of run {owner} was taken over by another run",
            saga_id=saga_id,
        )

    # -- checkpoints --------------------------------------------------------------------------

    async def write_checkpoint(
        self, conn: AsyncConnection, cp: Checkpoint, text: str | None
    ) -> int | None:
        """Write one checkpoint in the caller's transaction; return the new version, or None
        when its fence matched no row (nothing written; :meth:`diagnose` tells why). Creating
        a saga whose id exists raises SagaConcurrencyError."""
        time = self._time(cp)
        if cp.create_name is not None:
            status = (cp.status or SagaStatus.PENDING).value
            try:
                await conn.execute(self._insert_plain, {"sid": cp.saga_id, "name": cp.create_name,
                                                        "status": status, "ctx": text or "{}", **time})
            except sa.exc.IntegrityError as error:
                raise SagaConcurrencyError(f"saga {cp.saga_id} already exists",
                                           saga_id=cp.saga_id) from error
            version = 1
        else:
            stmt, params = self._update_for(cp, text)
            result = await conn.execute(stmt, {**params, **time})
            if result.rowcount != 1:
                return None
            version = await self._version_after(conn, cp)
        if cp.entries:
            await conn.execute(self._insert_log, _log_rows(cp, time))
        return version

    # -- group commit: many sagas' checkpoints in one transaction -------------------------------

    async def write_batch(
        self, conn: Any, items: list[tuple[Checkpoint, str | None]]
    ) -> dict[UUID, int]:
        """Write fenced update checkpoints of distinct sagas in one transaction (the caller's),
        statement by statement (SQLite; PostgreSQL and MySQL/MariaDB have driver-level batches).
        Returns the new version of each saga whose fence matched; the others are left as they
        were, without their log entries."""
        written: dict[UUID, int] = {}
        logs: list[dict[str, Any]] = []
        for cp, text in items:
            stmt, params = self._update_for(cp, text)
            time = self._time(cp)
            if (await conn.execute(stmt, {**params, **time})).rowcount != 1:
                continue
            written[cp.saga_id] = await self._version_after(conn, cp)
            logs.extend(_log_rows(cp, time))
        if logs:
            await conn.execute(self._insert_log, logs)
        return written

    async def diagnose(self, conn: AsyncConnection, cp: Checkpoint) -> None:
        """Raise why a fenced checkpoint matched no row (not found, lease lost, version)."""
        await self._diagnose(conn, cp)

    async def _version_after(self, conn: AsyncConnection, cp: Checkpoint) -> int:
        known = cp.fence_version if cp.fence_version is not None else cp.expected_version
        if known is not None:
            return known + 1
        return (await self.load_state(conn, cp.saga_id))[2]

    def _time(self, cp: Checkpoint) -> dict[str, Any]:
        """The time parameters of a checkpoint's statements (the wait's only when it has one)."""
        if cp.wait_seconds is None:
            return self.d.time_params(lease=cp.lease_seconds)
        return self.d.time_params(lease=cp.lease_seconds, wait=cp.wait_seconds)

    def _update_for(self, cp: Checkpoint, text: str | None) -> tuple[Any, dict[str, Any]]:
        key = (text is not None, cp.status is not None, cp.reset_attempts, cp.releases_lease,
               cp.lease_seconds is not None, cp.fence_version is not None,
               cp.expected_version is not None, cp.fence_owner is not None,
               cp.wait_seconds is not None, cp.clear_wait, cp.past_pivot)
        stmt = self._updates.get(key)
        if stmt is None:
            stmt = self._updates[key] = self._build_update(*key)
        params: dict[str, Any] = {"sid": cp.saga_id, "ctx": text,
                                  "status": None if cp.status is None else cp.status.value,
                                  "fv": cp.fence_version, "ev": cp.expected_version,
                                  "owner": cp.fence_owner}
        return stmt, {k: v for k, v in params.items() if v is not None or k == "sid"}

    def _build_update(self, has_ctx: bool, has_status: bool, reset: bool, release: bool,
                      has_lease: bool, has_fv: bool, has_ev: bool, has_owner: bool,
                      has_wait: bool, clear_wait: bool, pivot: bool) -> Any:
        t, d = self.t, self.d
        values: dict[str, Any] = {"version": t.c.version + 1, "updated_at": d.now()}
        if has_ctx:
            values["context"] = d.context_in
        if has_status:
            values["status"] = sa.bindparam("status")
        if reset:
            values["recovery_attempts"] = 0
        if release:
            values["lease_owner"] = None
            values["lease_expires_at"] = None
        elif has_lease:
            values["lease_expires_at"] = d.now_plus("lease")
        if has_wait:
            values["next_attempt_at"] = d.now_plus("wait")
        elif clear_wait:
            values["next_attempt_at"] = None
        if pivot:
            values["past_pivot"] = True
        stmt = sa.update(t).where(t.c.saga_id == sa.bindparam("sid", type_=sa.Uuid()))
        if has_fv:
            stmt = stmt.where(t.c.version == sa.bindparam("fv"))
        if has_ev:
            stmt = stmt.where(t.c.version == sa.bindparam("ev"))
        if has_owner:
            stmt = stmt.where(t.c.lease_owner == sa.bindparam("owner"))
        return stmt.values(**values)

    async def _diagnose(self, conn: AsyncConnection, cp: Checkpoint) -> None:
        """Raise the reason a fenced write matched no row."""
        row = await self.fetch_row(conn, cp.saga_id)
        if row is None:
            raise SagaNotFoundError(f"no saga with id {cp.saga_id}", saga_id=cp.saga_id)
        state = row_to_state(row)
        if cp.fence_owner is not None and state.lease_owner != cp.fence_owner:
            raise SagaLeaseLostError(
                f"saga {cp.saga_id}: this run's lease was taken over by {state.lease_owner!r}",
                saga_id=cp.saga_id, saga_name=state.name,
            )
        expected = cp.fence_version if cp.fence_version is not None else cp.expected_version
        if cp.expected_version is not None and state.version != cp.expected_version:
            expected = cp.expected_version
        raise SagaConcurrencyError(
            f"saga {cp.saga_id}: expected version {expected}, found {state.version}",
            saga_id=cp.saga_id, saga_name=state.name,
        )
