"""Queues on SQLite, PostgreSQL and MariaDB: the claims' query plans against a backlog, what
queues cost sagas run in their own process (nothing), and limits held by claimers on separate
engines claiming at the same moment. (The migration to the queues schema: test_migrations.py.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from sagakit.queue import QueueSettings
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import POSTGRES_DSN, TABLES
from tests.integration.sqlcount import SqlCounter

pytestmark = pytest.mark.integration

Q = "orders"
BACKLOG = 10_000
LIMIT = 10


@pytest.fixture
async def own(sql_storage: SqlAlchemySagaStorage) -> AsyncIterator[SqlAlchemySagaStorage]:
    """A storage on the backend's engine with tables of its own (their statistics are this
    test's), dropped afterwards."""
    prefix = f"qx{uuid.uuid4().hex[:8]}"
    storage = SqlAlchemySagaStorage(sql_storage.engine, executions_table=f"{prefix}_ex",
                                    logs_table=f"{prefix}_logs", queues_table=f"{prefix}_q")
    await storage.create_schema()
    try:
        yield storage
    finally:
        await storage.drop_schema()
        await storage.close()


# -- plans --------------------------------------------------------------------------------------


async def _seed(storage: SqlAlchemySagaStorage, n: int, **columns: Any) -> None:
    """``n`` PENDING sagas, oldest first, written in bulk; then the table's statistics."""
    engine, t = storage.engine, storage.tables.executions
    start = datetime.now(UTC) - timedelta(hours=1)
    if not storage.dialect.is_postgres:
        start = start.replace(tzinfo=None)
    context: Any = {} if storage.dialect.is_postgres else json.dumps({})
    rows = [{"saga_id": uuid.uuid4(), "name": "order", "status": "PENDING", "context": context,
             "version": 1, "recovery_attempts": 0, "created_at": start + timedelta(seconds=i),
             "updated_at": start + timedelta(seconds=i), "priority": i % 3, **columns}
            for i in range(n)]
    async with engine.begin() as conn:
        await conn.execute(sa.insert(t), rows)
    async with engine.begin() as conn:
        table = t.name
        await conn.exec_driver_sql(f"ANALYZE TABLE {table}" if storage.dialect.is_mysql
                                   else f"ANALYZE {table}")


async def _sent_during(storage: SqlAlchemySagaStorage, marker: str, action: Any
                       ) -> tuple[str, Any]:
    """The one statement holding ``marker`` sent while ``action()`` ran, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if marker in statement:
            seen.append((statement, parameters))

    event.listen(storage.engine.sync_engine, "before_cursor_execute", record)
    try:
        await action()
    finally:
        event.remove(storage.engine.sync_engine, "before_cursor_execute", record)
    assert len(seen) == 1, seen
    return seen[0]


async def _plan(storage: SqlAlchemySagaStorage, statement: str, parameters: Any) -> list[Any]:
    """The plan of a statement as it runs (PostgreSQL, MariaDB: with the rows each step
    actually read), in a transaction rolled back afterwards (the claim's query locks rows)."""
    d = storage.dialect
    prefix = ("EXPLAIN (ANALYZE, FORMAT JSON) " if d.is_postgres
              else "ANALYZE " if d.is_mysql else "EXPLAIN QUERY PLAN ")
    async with storage.engine.connect() as conn:
        result = await conn.exec_driver_sql(prefix + statement, parameters)
        rows = [tuple(r) for r in result.all()]
        await conn.rollback()
    if d.is_postgres:
        document = rows[0][0]
        document = json.loads(document) if isinstance(document, str) else document
        return _pg_scans(document[0]["Plan"])
    return rows


def _pg_scans(node: dict[str, Any]) -> list[Any]:
    """Every scan of a PostgreSQL plan: (node type, index name, index condition, rows)."""
    found = []
    if "Scan" in node["Node Type"] and "Relation Name" in node:
        found.append((node["Node Type"], node.get("Index Name"), node.get("Index Cond", ""),
                      node["Actual Rows"]))
    for child in node.get("Plans", []):
        found.extend(_pg_scans(child))
    return found


def _check_plan(storage: SqlAlchemySagaStorage, plan: list[Any], index: str, status: str) -> None:
    """Every branch reads an index (no table scan); the branch of ``status`` reads ``index``,
    in its order, and stops at the limit instead of reading the whole backlog."""
    name = f"ix_{storage.tables.executions.name}_{index}"
    d = storage.dialect
    if d.is_postgres:
        assert plan, plan
        assert all(scan[0].startswith("Index") for scan in plan), plan
        [hot] = [scan for scan in plan if f"'{status}'" in scan[2] or index == "recoverable"]
        assert hot[1] == name, plan
        assert hot[3] <= LIMIT, plan
    elif d.is_mysql:
        # id, select_type, table, type, possible_keys, key, key_len, ref, rows, r_rows,
        # filtered, r_filtered, Extra; the branches come in status order after the outer query
        branches = [row for row in plan if row[2] == storage.tables.executions.name]
        assert branches, plan
        assert all(row[3] != "ALL" for row in branches), plan
        hot = branches[sorted(["COMPENSATING", "PENDING", "RUNNING", "WAITING"]).index(status)]
        assert hot[5] == name, plan
        assert float(hot[9]) <= LIMIT, plan
        assert "filesort" not in (hot[12] or ""), plan
    else:
        searches = [row[3] for row in plan if row[3].startswith(("SEARCH", "SCAN"))
                    and storage.tables.executions.name in row[3]]
        assert searches, plan
        assert all(f"USING INDEX {name}" in s or f"USING COVERING INDEX {name}" in s
                   for s in searches), plan


async def test_a_claim_reads_the_queued_index_without_reading_the_backlog(
    own: SqlAlchemySagaStorage,
) -> None:
    await _seed(own, BACKLOG, queue=Q)
    await own.set_queue(QueueSettings(Q, concurrency=100))
    statement, parameters = await _sent_during(own, "UNION ALL", lambda: own.claim_queued(
        "w", Q, limit=LIMIT, lease_seconds=60))
    _check_plan(own, await _plan(own, statement, parameters), "queued", "PENDING")
    # The claim took the highest priority, oldest first.
    claimed = await own.list_sagas(statuses=frozenset({SagaStatus.RUNNING}))
    assert len(claimed) == LIMIT
    assert {s.priority for s in claimed} == {2}


async def test_recovery_reads_no_queued_saga(own: SqlAlchemySagaStorage) -> None:
    """The recovery scan, with a backlog of queued sagas older than its own: it reads its own
    index and no more than it lists."""
    await _seed(own, BACKLOG, queue=Q)
    await _seed(own, 100)  # newer than every queued saga: in recovery's order, after them
    statement, parameters = await _sent_during(own, "updated_at", lambda: (
        own.get_sagas_for_recovery(LIMIT)))
    index = "status_updated" if own.dialect.is_mysql else "recoverable"
    _check_plan(own, await _plan(own, statement, parameters), index, "PENDING")
    listed = await own.get_sagas_for_recovery(LIMIT)
    assert len(listed) == LIMIT
    assert [(await own.get_saga(saga_id)).queue for saga_id in listed] == [None] * LIMIT


# -- what queues cost sagas run in their own process ---------------------------------------------


async def _cost(storage: SqlAlchemySagaStorage, write: Any) -> tuple[Any, ...]:
    counter = SqlCounter(storage.engine)
    try:
        await write()
    finally:
        await counter.aclose()
    counts = counter.counts
    return (counts.transactions, counts.statements, counts.reads, counts.round_trips,
            [line.split(" SET ")[0] for line in counter.log])


async def test_checkpoints_of_queued_and_in_process_sagas_cost_the_same(
    sql_storage: SqlAlchemySagaStorage,
) -> None:
    """A checkpoint sends the same statements whether its saga came from a queue or was
    started in the process, and a claim from a queue is one transaction."""
    saga_id = uuid.uuid4()
    assert await sql_storage.submit(saga_id, "order", {"n": 0}, queue=Q, concurrency_key="k")
    await sql_storage.set_queue(QueueSettings(Q, concurrency=5, key_concurrency=1, rate=10.0))
    claim_cost = await _cost(sql_storage, lambda: sql_storage.claim_queued(
        "w", Q, limit=5, lease_seconds=60))
    assert claim_cost[0] == 1  # one transaction
    [queued] = await sql_storage.claim_queued("w", Q, limit=5, lease_seconds=60) or [
        await sql_storage.get_saga(saga_id)]

    async def checkpoint(run: Any, sid: uuid.UUID, n: int) -> None:
        await run.log_step(sid, f"Step{n}", "act", SagaStepStatus.COMPLETED)
        await run.update_context(sid, {"n": n})
        await run.commit()

    costs = []
    async with sql_storage.create_run() as run:
        run.adopt(queued, 60)
        costs.append(await _cost(sql_storage, lambda: checkpoint(run, saga_id, 1)))
    async with sql_storage.create_run() as run:
        own_id = uuid.uuid4()
        await run.start(own_id, "order", {"n": 0}, fingerprint=None, lease_seconds=60)
        costs.append(await _cost(sql_storage, lambda: checkpoint(run, own_id, 1)))
    assert costs[0] == costs[1]
    assert costs[0][0] == 1  # one transaction
    assert costs[0][2] == 0  # no reads
    assert not any("queue" in line for line in costs[0][4])


# -- limits under concurrent claimers ----------------------------------------------------------


@pytest.fixture
async def claimers(sql_storage: SqlAlchemySagaStorage) -> AsyncIterator[list[Any]]:
    """Five storages on the same tables, each with its own engine, as separate processes."""
    url = sql_storage.engine.url.render_as_string(hide_password=False)
    others = [SqlAlchemySagaStorage.from_url(url, **TABLES) for _ in range(5)]
    try:
        yield others
    finally:
        for storage in others:
            await storage.close()


async def _running(storage: SqlAlchemySagaStorage) -> list[str | None]:
    """The concurrency keys of the queue's sagas running under a live lease, read directly."""
    t = storage.tables.executions
    query = sa.select(t.c.concurrency_key, t.c.lease_expires_at).where(
        t.c.queue == Q, t.c.status.in_(["RUNNING", "COMPENSATING"]), t.c.lease_owner.is_not(None))
    async with storage.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    now = datetime.now(UTC)
    return [key for key, expires in rows
            if (expires if expires.tzinfo else expires.replace(tzinfo=UTC)) > now]


async def _finish(storage: SqlAlchemySagaStorage, state: Any) -> None:
    async with storage.create_run() as run:
        run.adopt(state, 60)
        await run.update_status(state.saga_id, SagaStatus.COMPLETED)
        await run.commit()


async def test_claimers_on_separate_engines_never_exceed_the_limits_together(
    sql_storage: SqlAlchemySagaStorage, claimers: list[SqlAlchemySagaStorage],
) -> None:
    concurrency, per_key, keys = 4, 2, ["a", "b", "c", None]
    await sql_storage.set_queue(QueueSettings(Q, concurrency=concurrency,
                                              key_concurrency=per_key))
    submitted = [uuid.uuid4() for _ in range(40)]
    for i, saga_id in enumerate(submitted):
        assert await sql_storage.submit(saga_id, "order", {"i": i}, queue=Q,
                                        concurrency_key=keys[i % len(keys)])
    claimed: Counter[uuid.UUID] = Counter()
    running: list[Any] = []
    for _ in range(60):
        rounds = await asyncio.gather(*(storage.claim_queued(
            f"w{i}", Q, limit=3, lease_seconds=60) for i, storage in enumerate(claimers)))
        for states in rounds:
            claimed.update(state.saga_id for state in states)
            running.extend(states)
        live = await _running(sql_storage)
        assert len(live) <= concurrency, live
        assert all(n <= per_key for key, n in Counter(live).items() if key is not None), live
        assert len(live) == len(running)
        if not running:
            break
        # The two oldest claims end: their slots free for the next round.
        for state in running[:2]:
            await _finish(sql_storage, state)
        del running[:2]
    assert set(claimed) == set(submitted)
    assert set(claimed.values()) == {1}  # each once
    counts = await sql_storage.queue_counts()
    assert counts == {Q: {SagaStatus.COMPLETED: len(submitted)}}


async def test_claimers_on_separate_engines_share_one_rate_limit(
    sql_storage: SqlAlchemySagaStorage, claimers: list[SqlAlchemySagaStorage],
) -> None:
    await sql_storage.set_queue(QueueSettings(Q, rate=0.001, burst=5))  # then ~17 min a start
    for i in range(20):
        assert await sql_storage.submit(uuid.uuid4(), "order", {"i": i}, queue=Q)
    for _ in range(3):
        await asyncio.gather(*(storage.claim_queued(f"w{i}", Q, limit=3, lease_seconds=60)
                               for i, storage in enumerate(claimers)))
    assert len(await _running(sql_storage)) == 5


class Wakes:
    """A listener's callback: the queues it was called with, in order, and an event set by
    every call."""

    def __init__(self) -> None:
        self.heard: list[str] = []
        self.got = asyncio.Event()

    def __call__(self, queue: str) -> None:
        self.heard.append(queue)
        self.got.set()

    async def wait(self, seconds: float) -> None:
        """Until a call comes (TimeoutError after ``seconds``); then clears the event."""
        await asyncio.wait_for(self.got.wait(), seconds)
        self.got.clear()

    async def next(self) -> str:
        """The queue of the first call not yet taken, once one came (10 s at most)."""
        await self.wait(10)
        return self.heard.pop(0)


async def test_postgres_workers_are_woken_by_submit_release_and_due_wait() -> None:
    """A listening worker's callback hears a submit, the release of a submitted saga's lease
    and a durable wait falling due (LISTEN/NOTIFY on PostgreSQL)."""
    storage = SqlAlchemySagaStorage.from_url(POSTGRES_DSN, **TABLES)
    wakes = Wakes()
    try:
        await storage.create_schema()
        async with storage.listen(wakes):
            saga_id = uuid.uuid4()
            assert await storage.submit(saga_id, "order", {"n": 0}, queue="wake-q")
            assert await wakes.next() == "wake-q"
            [state] = await storage.claim_queued("w", "wake-q", limit=1, lease_seconds=30.0)
            async with storage.create_run() as run:
                run.adopt(state, 30.0)
                await run.log_step(saga_id, "Ship", SagaAction.ACT, SagaStepStatus.RETRYING,
                                   attempt=1)
                await run.wait(saga_id, 0.2, release=True)
                await run.commit()
            assert await wakes.next() == "wake-q"  # heard 0.2 s later: the wait is due
    finally:
        await storage.delete_all()
        await storage.close()


async def test_a_submit_wakes_an_idle_postgres_worker_at_once() -> None:
    from sagakit import RecoveryWorker
    from tests.unit.support import Ctx, OneStepSaga, Script

    storage = SqlAlchemySagaStorage.from_url(POSTGRES_DSN, **TABLES)
    script = Script()
    worker = RecoveryWorker(storage, [OneStepSaga], script.container, poll_interval=30.0)
    try:
        await storage.create_schema()
        task = asyncio.create_task(worker.run(install_signal_handlers=False))
        await asyncio.sleep(0.5)  # the worker polled, found nothing, and listens
        handle = await OneStepSaga().submit(Ctx(), storage=storage)
        async with asyncio.timeout(10):  # its next poll is 30 s away: only a wake-up is this fast
            final = await handle.outcome(poll=0.02)
        assert final.status is SagaStatus.COMPLETED
        worker.stop()
        await task
    finally:
        worker.stop()
        await storage.delete_all()
        await storage.close()


async def test_a_dropped_listen_session_is_reopened_and_the_worker_told_to_poll() -> None:
    """Killing the LISTEN session's backend (a failover, an idle-connection killer): the
    listener reconnects, calls back once ("poll now": whatever came meanwhile), and later
    notifications arrive again."""
    storage = SqlAlchemySagaStorage.from_url(POSTGRES_DSN, **TABLES)
    wakes = Wakes()
    try:
        await storage.create_schema()
        listener = storage.listen(wakes)
        assert listener is not None
        async with listener:
            async with storage.engine.connect() as conn:
                killed = (await conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE :listen AND pid <> pg_backend_pid()"),
                    {"listen": f"LISTEN %{storage.tables.executions.name}_wake%"})).all()
                await conn.commit()
            assert killed, "no LISTEN session found"
            await wakes.wait(20)  # the reconnect's "poll now"
            assert wakes.heard == [""]
            assert await storage.submit(uuid.uuid4(), "order", {}, queue="after-drop")
            await wakes.wait(10)
            assert wakes.heard[-1] == "after-drop"
    finally:
        await storage.delete_all()
        await storage.close()


async def test_a_listen_session_that_cannot_open_raises_sagakits_error() -> None:
    from sagakit.exceptions import SagaStorageUnavailableError

    storage = SqlAlchemySagaStorage.from_url(
        "postgresql+asyncpg://postgres@127.0.0.1:1/test", **TABLES)  # nothing listens there
    try:
        listener = storage.listen(lambda queue: None)
        assert listener is not None
        with pytest.raises(SagaStorageUnavailableError, match="wake-up session") as caught:
            async with listener:
                pass
        assert isinstance(caught.value.__cause__, OSError)
    finally:
        await storage.close()
