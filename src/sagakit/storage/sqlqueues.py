"""The SQL storage's queues: submitted sagas, queue limits, and the claims of queued sagas.

A part of :class:`~sagakit.storage.sqlalchemy.SqlAlchemySagaStorage` (a mixin), kept apart for
size. It keeps the same contract as the memory storage (tests/contract/test_queues.py), with the
same pure decisions (:func:`sagakit.queue.refill`, :func:`sagakit.queue.pick`).

A claim (:meth:`SqlQueues.claim_queued`) is one transaction:

1. the queue's settings row, locked (``SELECT ... FOR UPDATE`` on PostgreSQL and MySQL/MariaDB;
   SQLite's ``BEGIN IMMEDIATE`` already serialises writers), so claimers of a limited queue
   take turns, on every machine, and each sees what the one before it claimed. A queue without
   a settings row has no limits and takes no lock;
2. what runs now (RUNNING or COMPENSATING under a live lease), per concurrency key, when the
   queue limits concurrency; the rate limit's tokens, refilled on the database's clock;
3. the due candidates, highest priority then oldest first: one branch per recoverable status,
   each reading the queued index in its order and stopping at the limit, merged (a single
   ``status IN`` query would read and sort every due saga of the queue on each claim). On
   PostgreSQL the candidates are locked ``SKIP LOCKED``, so claimers of an unlimited queue
   take different sagas instead of waiting for each other;
4. the picked sagas leased by primary key, each re-checked still due (as ``claim_due`` does on
   MySQL/MariaDB and SQLite), and the rate limit's tokens spent. On MySQL/MariaDB a queue
   without limits takes no lock in step 1, so there the claim reads a window of candidates and
   locks up to its share of them ``SKIP LOCKED`` by primary key first (as ``claim_due`` does):
   concurrent claimers take different sagas instead of waiting on each other's row locks.

MySQL/MariaDB may pick a claim as a deadlock victim against concurrent checkpoints, or time it
out waiting for a row lock: it then claims nothing, with nothing written, as ``claim_due`` does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagakit.queue import QueueSettings, check_key, check_priority, check_queue_name, pick, refill
from sagakit.records import RECOVERABLE_STATUSES, SagaState, SagaStatus
from sagakit.storage.dialect import Dialect
from sagakit.storage.faults import lock_conflict
from sagakit.storage.listener import channel_for, listening, wake_payload
from sagakit.storage.pool import Connections
from sagakit.storage.queries import MYSQL_WINDOW, Queries, row_to_state
from sagakit.storage.schema import QUEUED_SQL, SagaTables

__all__ = ["QueueQueries", "SqlQueues"]

logger = logging.getLogger("sagakit.storage")

_RUNNING = sorted([SagaStatus.COMPENSATING.value, SagaStatus.RUNNING.value])
_STATUSES = sorted(s.value for s in RECOVERABLE_STATUSES)
_LIMITS = ("concurrency", "key_concurrency", "rate", "burst")
_KEYED_READ = (200, 1000)
"""How many candidates a claim reads when the queue limits concurrency per key: at least the
first, at most the second, else four per saga it may take (sagas whose key is at its limit are
passed over, so it reads past them). Sagas beyond those it reads wait for a later claim."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Turn:
    """A claim's view of its queue, read under the queue's lock: its limits (None: the queue
    has none), the starts its rate limit allows now (infinite without one), how many of its
    sagas run now, of each concurrency key too, and when spent starts are counted from (None:
    no rate limit)."""

    limits: QueueSettings | None
    tokens: float
    running: int
    by_key: dict[str, int]
    spent_at: Any

    def slots(self, limit: int) -> int:
        """How many sagas the claim may take at most (what :func:`pick` allows, before keys)."""
        slots = limit if self.tokens == float("inf") else min(limit, int(self.tokens))
        if self.limits is not None and self.limits.concurrency is not None:
            slots = min(slots, self.limits.concurrency - self.running)
        return slots


class QueueQueries:
    """The statements of the queue operations, built once per storage (see :class:`Queries`)."""

    def __init__(self, queries: Queries) -> None:
        self.queries = queries
        self.d = d = queries.d
        self.t = t = d.tables.executions
        self.q = q = d.tables.queues
        name = sa.bindparam("q", type_=q.c.name.type)
        self._settings = sa.select(
            *(q.c[c] for c in _LIMITS), q.c.tokens, q.c.refilled_at, d.now().label("now"),
        ).where(q.c.name == name)
        if not d.is_sqlite:
            self._settings = self._settings.with_for_update()
        self._running = (
            sa.select(t.c.concurrency_key, sa.func.count())
            .where(t.c.queue == name, t.c.status.in_(_RUNNING), d.lease_held(t))
            .group_by(t.c.concurrency_key))
        self._spend = sa.update(q).where(q.c.name == name).values(
            tokens=sa.bindparam("tokens", type_=sa.Double()),
            refilled_at=sa.bindparam("at", type_=q.c.refilled_at.type))
        self._submit: Any = sa.insert(t).values(
            saga_id=sa.bindparam("sid", type_=sa.Uuid()), name=sa.bindparam("name"),
            status=SagaStatus.PENDING.value, context=d.context_in, version=1,
            recovery_attempts=0, fingerprint=sa.bindparam("fingerprint"), created_at=d.now(),
            updated_at=d.now(), deadline_at=d.now_plus("deadline"), queue=name,
            concurrency_key=sa.bindparam("key"), priority=sa.bindparam("priority"))
        if d.is_postgres:
            # The insert and its wake-up in one statement: the NOTIFY goes out with the commit,
            # and only when a row was inserted (a row back: created).
            inserted = self._submit.returning(t.c.saga_id).cte("inserted")
            self._submit = sa.select(inserted.c.saga_id, sa.func.pg_notify(
                channel_for(t.name), sa.bindparam("wake", type_=sa.String()))).select_from(inserted)
        self._upsert = d.upsert(
            q, {"name": name, **{c: sa.bindparam(c, type_=q.c[c].type) for c in _LIMITS},
                "updated_at": d.now()}, [*_LIMITS, "updated_at"])
        self._queues = sa.select(q.c.name, *(q.c[c] for c in _LIMITS))
        self._delete = sa.delete(q).where(q.c.name == name)
        self._counts = (sa.select(t.c.queue, t.c.status, sa.func.count())
                        .where(sa.text(QUEUED_SQL)).group_by(t.c.queue, t.c.status))
        self._candidates: dict[frozenset[str] | None, Any] = {}
        update, self._mine = queries.claim_by_ids(queued=True)
        self._lease = update if d.is_mysql else update.returning(*queries.columns)

    # -- writes and reads of settings -----------------------------------------------------------

    async def submit(self, conn: AsyncConnection, saga_id: UUID, name: str, text: str,
                     queue: str, key: str | None, priority: int, fingerprint: str | None,
                     deadline: float | None) -> bool:
        params = {"sid": saga_id, "name": name, "ctx": text, "fingerprint": fingerprint,
                  "q": queue, "key": key, "priority": priority,
                  **self.d.time_params(deadline=deadline)}
        if self.d.is_postgres:
            params["wake"] = wake_payload(queue)
        try:
            await conn.execute(self._submit, params)
        except exc.IntegrityError:
            return False
        return True

    async def set_queue(self, conn: AsyncConnection, settings: QueueSettings) -> None:
        await conn.execute(self._upsert, {"q": settings.name, **self.d.time_params(),
                                          **{c: getattr(settings, c) for c in _LIMITS}})

    async def get_queues(self, conn: AsyncConnection) -> list[QueueSettings]:
        rows = (await conn.execute(self._queues)).all()
        return sorted((QueueSettings(*row) for row in rows), key=lambda s: s.name)

    async def delete_queue(self, conn: AsyncConnection, name: str) -> bool:
        return bool((await conn.execute(self._delete, {"q": name})).rowcount)

    async def counts(self, conn: AsyncConnection) -> dict[str, dict[SagaStatus, int]]:
        counts: dict[str, dict[SagaStatus, int]] = {}
        for queue, status, n in (await conn.execute(self._counts)).all():
            counts.setdefault(queue, {})[SagaStatus(status)] = n
        return counts

    # -- claims ---------------------------------------------------------------------------------

    async def claim(self, conn: AsyncConnection, owner: str, queue: str, limit: int,
                    lease: float, max_attempts: int, names: frozenset[str] | None
                    ) -> list[SagaState]:
        """Lease up to ``limit`` of the queue's due sagas to ``owner`` within its limits, in
        the caller's transaction (see the module docstring); in the order they were picked."""
        time = self.d.time_params(lease=lease)  # SQLite: one clock reading for the claim
        turn = await self._turn(conn, queue, time)
        slots = turn.slots(limit)
        if slots <= 0:
            return []
        keyed = turn.limits is not None and turn.limits.key_concurrency is not None
        # MySQL/MariaDB, a queue without limits (no lock taken): a window of candidates, of
        # which concurrent claimers take different ones (Queries.lock_by_ids)
        window = self.d.is_mysql and turn.limits is None
        read = (min(max(4 * slots, _KEYED_READ[0]), _KEYED_READ[1]) if keyed
                else slots * MYSQL_WINDOW if window else slots)
        candidates = (await conn.execute(self._candidates_for(names), {
            "q": queue, "limit": read, "max_attempts": max_attempts, "owner": owner,
            **time})).all()
        ids = pick(turn.limits, [(c[0], c[1]) for c in candidates], want=read if window else limit,
                   running=turn.running, running_by_key=turn.by_key, tokens=turn.tokens)
        if not ids:
            return []
        order = {saga_id: i for i, saga_id in enumerate(ids)}
        params = {"ids": ids, "owner": owner, "max_attempts": max_attempts, **time}
        if window:
            params["ids"] = ids = await self.queries.lock_by_ids(conn, ids, limit, params,
                                                                  queued=True)
            if not ids:
                return []
        if self.d.is_mysql:
            await conn.execute(self._lease, params)
            rows = (await conn.execute(self._mine, {"ids": ids, "owner": owner})).all()
        else:
            rows = (await conn.execute(self._lease, params)).all()
        if turn.spent_at is not None and rows:
            await conn.execute(self._spend, {"q": queue, "tokens": turn.tokens - len(rows),
                                             "at": turn.spent_at})
        return sorted((row_to_state(r) for r in rows), key=lambda s: order[s.saga_id])

    async def _turn(self, conn: AsyncConnection, queue: str, time: dict[str, Any]) -> _Turn:
        """The queue's limits, locked until the transaction ends, and what they leave now."""
        row = (await conn.execute(self._settings, {"q": queue, **time})).first()
        if row is None:
            return _Turn(None, float("inf"), 0, {}, None)
        limits = QueueSettings(queue, *row[:4])
        now, refilled_at = Dialect.aware(row.now), Dialect.aware(row.refilled_at)
        assert now is not None
        tokens = refill(limits, row.tokens, None if refilled_at is None
                        else refilled_at.timestamp(), now.timestamp())
        # Starts spent are counted from the later clock reading: a claimer whose reading is
        # older than the last one (PostgreSQL's now() is when its transaction began, maybe
        # before it waited for the lock) keeps the later one, so no second refills twice.
        spent_at = None
        if limits.rate is not None:
            spent_at = row.now if refilled_at is None or now >= refilled_at else row.refilled_at
        running, by_key = 0, {}
        if limits.concurrency is not None or limits.key_concurrency is not None:
            for key, n in (await conn.execute(self._running, {"q": queue, **time})).all():
                running += n
                if key is not None:
                    by_key[key] = n
        return _Turn(limits, tokens, running, by_key, spent_at)

    def _candidates_for(self, names: frozenset[str] | None) -> Any:
        stmt = self._candidates.get(names)
        if stmt is None:
            if len(self._candidates) > 64:
                self._candidates.clear()
            stmt = self._candidates[names] = self._build_candidates(names)
        return stmt

    def _build_candidates(self, names: frozenset[str] | None) -> Any:
        """(saga_id, concurrency_key) of up to ``:limit`` due sagas of queue ``:q``, highest
        priority then oldest first: one branch per recoverable status over the queued index,
        in its order, merged."""
        t, d = self.t, self.d
        limit = sa.bindparam("limit", type_=sa.Integer())
        conditions = [
            t.c.queue == sa.bindparam("q", type_=t.c.queue.type),
            t.c.recovery_attempts <= sa.bindparam("max_attempts", type_=sa.Integer()),
            d.lease_free(t),
            sa.or_(t.c.next_attempt_at.is_(None), t.c.next_attempt_at <= d.now()),
        ]
        if names is not None:
            conditions.append(t.c.name.in_(sorted(names)))
        order = (t.c.priority.desc(), t.c.created_at, t.c.saga_id)
        branches = []
        for status in _STATUSES:
            branch = (sa.select(t.c.saga_id, t.c.concurrency_key, t.c.priority, t.c.created_at)
                      .where(t.c.status == status, *conditions).order_by(*order).limit(limit))
            if d.is_postgres:
                branch = branch.with_for_update(skip_locked=True)
            if not d.is_mysql:
                # PostgreSQL allows no FOR UPDATE, SQLite no ORDER BY or LIMIT, on a UNION's
                # own branches: each is read as a subquery
                inner = branch.subquery()
                branch = sa.select(*inner.c)
            branches.append(branch)
        due = sa.union_all(*branches).subquery("due")
        return (sa.select(due.c.saga_id, due.c.concurrency_key)
                .order_by(due.c.priority.desc(), due.c.created_at, due.c.saga_id).limit(limit))


class SqlQueues:
    """The queue methods of the SQL storage (see the module docstring); each goes through
    ``connections.call``, so database faults reach callers as SagaStorageError."""

    connections: Connections
    queue_queries: QueueQueries
    engine: AsyncEngine
    dialect: Dialect
    tables: SagaTables

    def dump(self, saga_id: UUID, context: Mapping[str, Any]) -> str:
        raise NotImplementedError

    async def submit(
        self,
        saga_id: UUID,
        name: str,
        context: Mapping[str, Any],
        *,
        queue: str,
        concurrency_key: str | None = None,
        priority: int = 0,
        fingerprint: str | None = None,
        deadline_seconds: float | None = None,
    ) -> bool:
        """See :meth:`SagaStorage.submit`. ValueError for a bad queue name, key or priority,
        SagaSerializationError for a context the storage refuses, both before anything is
        written. A submit whose connection was lost is sent once more on a fresh one; if the
        first try was committed after all, the second finds the id taken and returns False."""
        check_queue_name(queue)
        check_key(concurrency_key)
        check_priority(priority)
        text = self.dump(saga_id, context)
        created: bool = await self.connections.call(
            "submitting a saga", lambda conn: self.queue_queries.submit(
                conn, saga_id, name, text, queue, concurrency_key, priority, fingerprint,
                deadline_seconds), mode="write", saga_id=saga_id)
        return created

    async def claim_queued(
        self,
        owner: str,
        queue: str,
        *,
        limit: int,
        lease_seconds: float,
        max_recovery_attempts: int = 5,
        saga_names: frozenset[str] | None = None,
    ) -> list[SagaState]:
        """See :meth:`SagaStorage.claim_queued` and the module docstring. ValueError for a bad
        queue name, before anything is read."""
        check_queue_name(queue)

        async def claim(conn: AsyncConnection) -> list[SagaState]:
            try:
                return await self.queue_queries.claim(
                    conn, owner, queue, limit, lease_seconds, max_recovery_attempts, saga_names)
            except exc.OperationalError as error:
                if not lock_conflict(error):
                    raise
                # Chosen as a deadlock victim or timed out waiting for a row lock (see the
                # module docstring): nothing is claimed this time; the next poll tries again.
                await conn.rollback()
                logger.info("claim_queued lost a lock conflict (%s); claiming nothing this time",
                            error.orig)
                return []

        # Not retried: a claim cut off by a lost connection may have been committed, and
        # claiming again would take more sagas (those of the first try wait for their lease).
        return await self.connections.call(
            f"claiming sagas of queue {queue!r}", claim, mode="transaction", retry=False)

    async def set_queue(self, settings: QueueSettings) -> None:
        """See :meth:`SagaStorage.set_queue`: one upsert; a rate limit's bucket is kept as
        last counted (a queue that had no rate limit starts with a full one)."""
        await self.connections.call(
            f"setting queue {settings.name!r}",
            lambda conn: self.queue_queries.set_queue(conn, settings), mode="write")

    async def get_queues(self) -> list[QueueSettings]:
        """See :meth:`SagaStorage.get_queues`."""
        return await self.connections.call("listing queues", self.queue_queries.get_queues)

    async def delete_queue(self, name: str) -> bool:
        """See :meth:`SagaStorage.delete_queue`. (Sent once more on a fresh connection when
        the first one was lost: if the first try was committed after all, this says False.)"""
        return await self.connections.call(
            f"deleting queue {name!r}", lambda conn: self.queue_queries.delete_queue(conn, name),
            mode="write")

    async def queue_counts(self) -> dict[str, dict[SagaStatus, int]]:
        """See :meth:`SagaStorage.queue_counts` (read from the queued index)."""
        return await self.connections.call("counting queued sagas", self.queue_queries.counts)

    # -- wake-ups (PostgreSQL's LISTEN/NOTIFY; see sagakit.storage.listener) ---------------------

    def listen(
        self, callback: Callable[[str], object],
    ) -> AbstractAsyncContextManager[None] | None:
        """While inside, call ``callback(queue)`` when workers have something to do: a saga
        submitted to ``queue``, a slot freed in it, a durable wait fallen due (PostgreSQL, one
        connection of its own outside the pool, reopened if it drops). None on the other
        databases: workers find their work by polling alone."""
        if not self.dialect.is_postgres:
            return None
        return listening(self._listen_connection, channel_for(self.tables.executions.name),
                         callback)

    async def _listen_connection(self) -> Any:
        import asyncpg  # the driver of every PostgreSQL engine sagakit accepts

        url = self.engine.url
        return await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password,
            database=url.database)

    async def notify(self, payload: str) -> None:
        """Send a wake-up (see :func:`~sagakit.storage.listener.wake_payload`) to listening
        workers. PostgreSQL only; a failure is logged and ignored: a lost wake-up only delays
        work until the next poll."""
        if not self.dialect.is_postgres:
            return
        params = {"channel": channel_for(self.tables.executions.name), "payload": payload}
        try:
            await self.connections.call("waking workers", lambda conn: conn.execute(
                _NOTIFY, params), mode="write", retry=False)
        except Exception as error:  # a wake-up is never worth a failure
            logger.debug("wake-up %r not sent: %s", payload, error)


_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")

