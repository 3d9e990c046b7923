"""Recovery throughput: sagas recovered per second from a backlog of interrupted sagas by 1 and by
4 RecoveryWorker instances, each with its own storage and engine, in this one process
(asyncio.gather); and EXPLAIN of the recovery listing query with its index.

The backlog is inserted straight into the storage's table: 5-step sagas RUNNING with no lease
and no step log (as a crash right after the start leaves them), updated an hour ago. Recovering
one claims it, re-reads it, and runs its 5 steps (5 checkpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from typing import Any

import orjson

from scenarios.common import (
    Backend,
    Counter,
    Section,
    Session,
    drop,
    fmt,
    new_context,
    saga_class,
    table,
)
from scenarios.procs import WorkerProcs, count_completed, drain, summarise

TITLE = "Recovery throughput"
NEEDS = ("postgres", "mariadb")
LISTING_LIMIT = 32
TIMEOUT_FACTOR = 2


async def make_backlog(storage: Any, count: int, *, saga: Any = None,
                       context: dict[str, Any] | None = None, status: str = "RUNNING",
                       queue: str | None = None) -> float:
    """Insert ``count`` sagas straight into the table, updated an hour ago, no lease, no step
    log: by default interrupted 5-step sagas (RUNNING in no queue); with ``status="PENDING"``
    and a ``queue``, sagas as ``submit`` stores them. Return the seconds it took."""
    saga = saga if saga is not None else saga_class(5)
    t = storage.tables.executions
    context = context if context is not None else new_context().to_dict()
    pg = storage.dialect.is_postgres
    base = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    if not pg:
        base = base.replace(tzinfo=None)
    started = time.perf_counter()
    chunk = 2000
    for first in range(0, count, chunk):
        rows = [
            {"saga_id": uuid.uuid4(), "name": saga.name, "status": status,
             "context": context if pg else orjson.dumps(context).decode(), "version": 1,
             "recovery_attempts": 0, "fingerprint": saga.fingerprint, "lease_owner": None,
             "lease_expires_at": None, "next_attempt_at": None, "queue": queue,
             "created_at": base + dt.timedelta(microseconds=i),
             "updated_at": base + dt.timedelta(microseconds=i)}
            for i in range(first, min(first + chunk, count))
        ]
        async with storage.engine.begin() as conn:
            await conn.execute(t.insert(), rows)
    return time.perf_counter() - started


async def analyze(storage: Any) -> None:
    from sqlalchemy import text

    name = storage.tables.executions.name
    sql = f"ANALYZE {name}" if storage.dialect.is_postgres else f"ANALYZE TABLE {name}"
    async with storage.engine.connect() as conn:
        await conn.execute(text(sql))
        await conn.commit()


async def explain_listing(storage: Any) -> tuple[str, str]:
    """(EXPLAIN output, index used) of the query get_sagas_for_recovery sends."""
    return await explain_call(storage, lambda: storage.get_sagas_for_recovery(LISTING_LIMIT),
                              lambda statement: statement.lstrip().upper().startswith("SELECT"))


async def explain_call(storage: Any, call: Any, wanted: Any) -> tuple[str, str]:
    """(EXPLAIN output, index used) of the last statement on the executions table that
    ``await call()`` sends and ``wanted(statement)`` accepts, captured as sent and explained
    with the same parameters (PostgreSQL: EXPLAIN ANALYZE, in a transaction rolled back)."""
    from sqlalchemy import event

    captured: list[tuple[str, Any]] = []
    name = storage.tables.executions.name

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if name in statement and wanted(statement):
            captured.append((statement, parameters))

    engine = storage.engine.sync_engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        await call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    if not captured:
        return "(the query was not seen)", "unknown"
    statement, parameters = captured[-1]
    prefix = "EXPLAIN (ANALYZE, BUFFERS) " if storage.dialect.is_postgres else "EXPLAIN "
    async with storage.engine.connect() as conn:
        result = await conn.exec_driver_sql(prefix + statement, parameters)
        keys = list(result.keys())
        rows = result.all()
        await conn.rollback()
    indexes = [str(ix.name) for ix in storage.tables.executions.indexes]
    if storage.dialect.is_postgres:
        plan = "\n".join(str(r[0]) for r in rows)
        used = [ix for ix in indexes if ix in plan]
    else:
        plan = "\n".join(
            "  ".join(f"{k}={v}" for k, v in zip(keys, r, strict=True) if v is not None)
            for r in rows)
        chosen = {str(r._mapping["key"]) for r in rows if r._mapping.get("key")}
        used = [ix for ix in indexes if ix in chosen]
    text = f"{statement.strip()}\n-- parameters: {parameters!r}\n\n{plan}"
    return text, ", ".join(used) if used else "none (no sagakit index in the plan)"


async def recover_backlog(session: Session, backend: Backend, tables: dict[str, str],
                          workers: int, backlog: int, deadline_s: float) -> dict[str, Any]:
    from sagakit import RecoveryWorker, SagaStatus
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    conc = session.sizes.recovery_concurrency
    storages = [SqlAlchemySagaStorage.from_url(backend.url, pool_size=conc + 2, max_overflow=0,
                                               **tables) for _ in range(workers)]
    saga = saga_class(5)
    pool = [RecoveryWorker(s, [saga], concurrency=conc, poll_interval=0.05) for s in storages]
    try:
        for s in storages:  # open each engine's first connection outside the timing
            async with s.engine.connect():
                pass
        completed: set[uuid.UUID] = set()
        seen = [0] * workers
        cpu0, t0 = time.process_time(), time.perf_counter()
        tasks = [asyncio.ensure_future(w.run(install_signal_handlers=False)) for w in pool]
        drained = False
        while time.perf_counter() - t0 < deadline_s:
            for i, w in enumerate(pool):
                new = w.outcomes[seen[i]:]
                seen[i] += len(new)
                completed.update(o.saga_id for o in new if o.status is SagaStatus.COMPLETED)
            if len(completed) >= backlog:
                drained = True
                break
            if all(task.done() for task in tasks):
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        for w in pool:
            w.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        outcomes = [o for w in pool for o in w.outcomes]
        busy = sum(1 for o in outcomes if o.busy)
        errors = [o for o in outcomes if o.error is not None and not o.busy]
        return {
            "workers": workers, "concurrency_each": conc, "backlog": backlog,
            "recovered": len(completed), "drained": drained, "elapsed_s": elapsed,
            "per_s": len(completed) / elapsed if elapsed > 0 else float("nan"),
            "attempts": len(outcomes), "busy": busy, "errors": len(errors),
            "first_error": repr(errors[0].error)[:300] if errors else None,
            "client_cpu_ms_per_saga": 1000 * cpu / max(len(completed), 1),
        }
    finally:
        for s in storages:
            await s.close()


async def recover_backlog_procs(session: Session, backend: Backend, tables: dict[str, str],
                                workers: int, backlog: int, deadline_s: float,
                                storage: Any) -> dict[str, Any]:
    """The same with each worker in its own subprocess (scenarios/recovery_child.py); progress
    is watched by counting COMPLETED rows."""
    conc = session.sizes.recovery_concurrency
    config = {"url": backend.url, "tables": tables, "deadline_s": deadline_s + 30,
              "concurrency": conc, "pool_size": conc + 2, "poll_interval": 0.05}
    async with WorkerProcs(config, workers) as procs:
        elapsed, done = await drain(procs, storage, backlog, deadline_s)
        reports = await procs.stop()
    total = summarise(reports, procs.stderr, workers)
    return {
        "workers": workers, "concurrency_each": conc,
        "backlog": backlog, "recovered": total["completed"], "drained": done >= backlog,
        "elapsed_s": elapsed,
        "per_s": total["completed"] / elapsed if elapsed > 0 else float("nan"),
        "attempts": total["attempts"], "busy": total["busy"], "errors": total["errors"],
        "first_error": total["first_error"],
        "client_cpu_ms_per_saga": 1000 * total["cpu_s"] / max(total["completed"], 1),
    }


async def count_recovery(session: Session, backend: Backend, sagas: int) -> dict[str, float]:
    """Statements, reads and commits per recovered saga: one in-process worker, a small backlog,
    the counting hooks on."""
    from sagakit import RecoveryWorker
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    tables = session.new_tables(backend.url)
    storage = SqlAlchemySagaStorage.from_url(backend.url, pool_size=4, **tables)
    try:
        await storage.create_schema()
        await make_backlog(storage, sagas)
        counter = Counter(storage.engine)
        worker = RecoveryWorker(storage, [saga_class(5)], concurrency=1, batch_size=sagas)
        try:
            outcomes = await worker.run_once()
        finally:
            await counter.aclose()
        done = max(1, sum(1 for o in outcomes if o.status is not None))
        c = counter.counts
        return {"statements": c.statements / done, "reads": c.reads / done,
                "commits": c.transactions / done, "listing_reads_included": 1 / done}
    finally:
        await drop(session, storage)


async def run(session: Session, section: Section) -> None:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    backlog = sizes.recovery_backlog
    where = ("each in its own process (a subprocess of the benchmark), timed from the signal "
             "to start until the COMPLETED rows reach the backlog"
             if session.recovery_mode == "process" else
             "all in this one process (asyncio.gather), sharing its one Python thread: with the "
             "client CPU per saga below, that CPU bounds in-process scaling")
    section.add(
        f"A backlog of {backlog} interrupted 5-step sagas (RUNNING, no lease, no step log) "
        f"recovered by {' and by '.join(map(str, sizes.recovery_workers))} RecoveryWorker "
        f"instances, {where}. Each worker has its own engine, "
        f"concurrency={sizes.recovery_concurrency} and poll_interval=0.05 s. Each worker claims "
        "up to `concurrency` due sagas at a time in one atomic step (claim_due: FOR UPDATE SKIP "
        "LOCKED on PostgreSQL; on MariaDB an unlocked read of the due sagas, in index order, "
        "and a primary-key UPDATE that re-checks each lease), so workers take disjoint sagas: "
        "busy = claims lost to another worker (0 expected); attempts = recoveries tried. Client "
        "CPU = the workers' CPU per recovered saga. The machine has 2 cores shared by the "
        "workers and the database server, so 4 worker processes compete for CPU rather than "
        "add it."
    )
    runs_total = len(session.backends) * len(sizes.recovery_workers)
    deadline = max(30.0, sizes.section_timeout * TIMEOUT_FACTOR / max(1, runs_total) - 60)
    data: dict[str, Any] = section.data
    for backend in session.backends.values():
        tables = session.new_tables(backend.url)
        storage = SqlAlchemySagaStorage.from_url(backend.url, pool_size=2, **tables)
        results, explains = [], {}
        costs: dict[str, float] = {}
        try:
            await storage.create_schema()
            for workers in sizes.recovery_workers:
                await storage.delete_all()
                session.log(f"{backend.name}: inserting a backlog of {backlog}")
                insert_s = await make_backlog(storage, backlog)
                await analyze(storage)
                if "backlog" not in explains:
                    explains["backlog"] = await explain_listing(storage)
                session.log(f"{backend.name}: recovering with {workers} worker(s)")
                if session.recovery_mode == "process":
                    result = await recover_backlog_procs(session, backend, tables, workers,
                                                         backlog, deadline, storage)
                else:
                    result = await recover_backlog(session, backend, tables, workers, backlog,
                                                   deadline)
                result["backlog_insert_s"] = insert_s
                result["completed_rows"] = await count_completed(storage)
                results.append(result)
            await analyze(storage)
            explains["steady"] = await explain_listing(storage)
            costs = await count_recovery(session, backend, min(50, backlog))
        finally:
            await drop(session, storage)
        rows = [[str(r["workers"]), str(r["recovered"]), fmt(r["elapsed_s"], 1),
                 f"**{r['per_s']:.0f}**", str(r["attempts"]), str(r["busy"]), str(r["errors"]),
                 fmt(r["client_cpu_ms_per_saga"], 2), fmt(r["backlog_insert_s"], 1),
                 str(r["completed_rows"])] for r in results]
        base = results[0]["per_s"] if results else None
        section.add(f"**{backend.label}**")
        section.add(table(["workers", "recovered", "seconds", "sagas/s", "attempts", "busy",
                           "errors", "client CPU ms/saga", "backlog insert s",
                           "COMPLETED rows"], rows))
        section.add(
            f"{backend.label}: one recovery costs {costs['statements']:.2f} statements, of them "
            f"{costs['reads']:.2f} reads, in {costs['commits']:.2f} server transactions (counted "
            "with one worker, concurrency 1, on a separate backlog of "
            f"{min(50, backlog)}; the listing query is shared by the batch).")
        if len(results) > 1 and base:
            section.add(f"{backend.label}: {results[-1]['workers']} workers recover "
                        f"{results[-1]['per_s'] / base:.2f}x as fast as 1.")
        for r in results:
            if r["first_error"]:
                section.add(f"First error ({r['workers']} workers): `{r['first_error']}`")
        for key, title in (("backlog", f"with the backlog of {backlog} due"),
                           ("steady", "afterwards: every saga COMPLETED, none due")):
            if key in explains:
                plan, used = explains[key]
                section.add(f"EXPLAIN of get_sagas_for_recovery({LISTING_LIMIT})'s query on "
                            f"{backend.label}, {title} — index used: **{used}**")
                section.add(f"```\n{plan}\n```")
        data[backend.name] = {"runs": results, "costs": costs,
                              "explain": {k: {"plan": v[0], "index": v[1]}
                                          for k, v in explains.items()}}
