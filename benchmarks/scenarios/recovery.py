"""Recovery throughput: sagas recovered per second from a backlog of interrupted sagas by 1, 2 and
4 RecoveryWorker processes (or, with ``--recovery-mode inprocess``, instances in this one
process), each with its own storage and engine; where the time goes; EXPLAIN of the recovery
listing and of the claim.

The backlog is inserted straight into the storage's table: 5-step sagas RUNNING with no lease
and no step log (as a crash right after the start leaves them), updated an hour ago. Recovering
one claims it, re-reads it, and runs its 5 steps (5 checkpoints). Two variants:

- ``noop``: no-op steps. The workers and the database server share the machine's 2 cores, so
  this is CPU-bound: more processes cannot add CPU.
- ``io``: each step first awaits IO_SLEEP_MS (a remote call's latency, no CPU), at
  IO_CONCURRENCY sagas per process, so that one process is bound by that latency, not by CPU:
  throughput that does not grow with processes there points at the claim (a lock convoy), not
  at the CPU.
- ``slow``: the same with SLOW_SLEEP_MS per step: a tenth of the CPU per second, so that it
  tells the claim's scaling apart from the CPU's even on a machine busy with other work.

Each run also measures the CPU of the workers, of the database server and of the whole
machine (scenarios/serverload.py), counts the workers' claims (recovery_child.py) and samples
what the workers' server sessions wait on.
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
    new_context,
    saga_class,
    spread,
)
from scenarios.explain import LISTING_LIMIT, explain_claims, explain_listing
from scenarios.procs import WorkerProcs, count_completed, drain, summarise
from scenarios.recovery_report import intro, report
from scenarios.serverload import Clock, WaitSampler

TITLE = "Recovery throughput"
NEEDS = ("postgres", "mariadb")
TIMEOUT_FACTOR = 3
IO_SLEEP_MS = 10
"""What each step of the ``io`` variant awaits (milliseconds)."""
IO_CONCURRENCY = 4
"""Sagas per worker process in the ``io`` and ``slow`` variants."""
SLOW_SLEEP_MS = 100
"""What each step of the ``slow`` variant awaits (milliseconds): so little CPU per second
that even 4 processes leave the machine's cores mostly to others."""
__all__ = ["LISTING_LIMIT", "analyze", "make_backlog", "run"]


def variants(session: Session) -> dict[str, dict[str, Any]]:
    """name -> steps' sleep (ms), concurrency per worker, backlog, description."""
    sizes = session.sizes
    return {
        "noop": {"sleep_ms": 0, "concurrency": sizes.recovery_concurrency,
                 "backlog": sizes.recovery_backlog, "what": "no-op steps"},
        "io": {"sleep_ms": IO_SLEEP_MS, "concurrency": IO_CONCURRENCY,
               "backlog": sizes.recovery_io_backlog,
               "what": f"steps each awaiting {IO_SLEEP_MS} ms (a remote call)"},
        "slow": {"sleep_ms": SLOW_SLEEP_MS, "concurrency": IO_CONCURRENCY,
                 "backlog": max(40, sizes.recovery_io_backlog // 5),
                 "what": f"steps each awaiting {SLOW_SLEEP_MS} ms (a slow remote call)"},
    }


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


async def recover_backlog(session: Session, backend: Backend, tables: dict[str, str],
                          workers: int, backlog: int, deadline_s: float,
                          variant: dict[str, Any]) -> dict[str, Any]:
    """``workers`` RecoveryWorker instances in this process (asyncio.gather), each with its
    own storage and engine."""
    from sagakit import RecoveryWorker, SagaStatus
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    conc = variant["concurrency"]
    storages = [SqlAlchemySagaStorage.from_url(backend.url, pool_size=conc + 2, max_overflow=0,
                                               **tables) for _ in range(workers)]
    saga = saga_class(5, sleep_ms=variant["sleep_ms"])
    pool = [RecoveryWorker(s, [saga], concurrency=conc, poll_interval=0.05) for s in storages]
    try:
        for s in storages:  # open each engine's first connection outside the timing
            async with s.engine.connect():
                pass
        completed: set[uuid.UUID] = set()
        seen = [0] * workers
        clock = Clock(backend.name)
        clock.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        tasks = [asyncio.ensure_future(w.run(install_signal_handlers=False)) for w in pool]
        while time.perf_counter() - t0 < deadline_s:
            for i, w in enumerate(pool):
                new = w.outcomes[seen[i]:]
                seen[i] += len(new)
                completed.update(o.saga_id for o in new if o.status is SagaStatus.COMPLETED)
            if len(completed) >= backlog or all(task.done() for task in tasks):
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        clock.stop()
        for w in pool:
            w.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        outcomes = [o for w in pool for o in w.outcomes]
        errors = [o for o in outcomes if o.error is not None and not o.busy]
        total = {"completed": len(completed), "attempts": len(outcomes),
                 "busy": sum(1 for o in outcomes if o.busy), "errors": len(errors),
                 "first_error": repr(errors[0].error)[:300] if errors else None,
                 "cpu_s": cpu, "claims": None}
        return outcome(workers, conc, backlog, elapsed, total, clock, None)
    finally:
        for s in storages:
            await s.close()


async def recover_backlog_procs(session: Session, backend: Backend, tables: dict[str, str],
                                workers: int, backlog: int, deadline_s: float,
                                storage: Any, variant: dict[str, Any]) -> dict[str, Any]:
    """The same with each worker in its own subprocess (scenarios/recovery_child.py); progress
    is watched by counting COMPLETED rows, the workers' server sessions sampled meanwhile."""
    conc = variant["concurrency"]
    config = {"url": backend.url, "tables": tables, "deadline_s": deadline_s + 30,
              "concurrency": conc, "pool_size": conc + 2, "poll_interval": 0.05,
              "step_sleep_ms": variant["sleep_ms"]}
    clock = Clock(backend.name)
    async with WorkerProcs(config, workers) as procs:
        async with WaitSampler(backend.url, backend.name == "postgres",
                               lambda: procs.pids, every=0.1) as sampler:
            clock.start()
            elapsed, _ = await drain(procs, storage, backlog, deadline_s)
            clock.stop()
        drained = await procs.mark() if procs.alive() else []
        reports = await procs.stop()
    total = summarise(reports, procs.stderr, workers)
    if drained:  # the claims until the backlog was drained, not those of the idle end
        total["claims"] = summarise(drained, "", workers)["claims"]
    return outcome(workers, conc, backlog, elapsed, total, clock, sampler.result())


def outcome(workers: int, conc: int, backlog: int, elapsed: float, total: dict[str, Any],
            clock: Clock, waits: dict[str, Any] | None) -> dict[str, Any]:
    """One run's figures: throughput, and CPU per recovered saga of the workers (client), the
    database server, this benchmark process, the whole machine, and the rest (machine less
    those three: other processes on the machine); cores busy and stolen (None where /proc could
    not be read)."""
    done = max(total["completed"], 1)

    def per_saga(seconds: float | None) -> float | None:
        return None if seconds is None else 1000 * seconds / done

    other = (None if clock.machine_s is None or clock.server_s is None
             else clock.machine_s - clock.server_s - total["cpu_s"] - clock.bench_s)
    wall = clock.wall_s or float("nan")
    return {
        "workers": workers, "concurrency_each": conc, "backlog": backlog,
        "recovered": total["completed"], "drained": total["completed"] >= backlog,
        "elapsed_s": elapsed,
        "per_s": total["completed"] / elapsed if elapsed > 0 else float("nan"),
        "attempts": total["attempts"], "busy": total["busy"], "errors": total["errors"],
        "first_error": total["first_error"],
        "client_cpu_ms_per_saga": per_saga(total["cpu_s"]),
        "server_cpu_ms_per_saga": per_saga(clock.server_s),
        "bench_cpu_ms_per_saga": per_saga(clock.bench_s),
        "other_cpu_ms_per_saga": per_saga(other),
        "machine_cpu_ms_per_saga": per_saga(clock.machine_s),
        "machine_cores_busy": None if clock.machine_s is None else clock.machine_s / wall,
        "steal_cores": None if clock.steal_s is None else clock.steal_s / wall,
        "claims": total["claims"], "waits": waits,
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


def spread_of(rounds: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return spread(values) if values else None


def summarise_runs(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One worker count's rounds: the median and range of each figure, claims added up, and
    the waits of every round together."""
    claims = [r["claims"] for r in rounds if r.get("claims")]
    waits = [r["waits"] for r in rounds if r.get("waits")]
    merged_waits: dict[str, Any] | None = None
    if waits:
        counts: dict[str, int] = {}
        for w in waits:
            for name, n in w["waits"]:
                counts[name] = counts.get(name, 0) + n
        innodb: dict[str, float] = {}
        for w in waits:
            for k, v in w["innodb"].items():
                innodb[k] = innodb.get(k, 0.0) + v
        merged_waits = {k: sum(w[k] for w in waits)
                        for k in ("samples", "session_samples", "active", "lock_waits")}
        merged_waits["waits"] = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
        merged_waits["innodb"] = innodb
    return {
        "workers": rounds[0]["workers"], "rounds": rounds,
        **{k: spread_of(rounds, k) for k in (
            "per_s", "elapsed_s", "client_cpu_ms_per_saga", "server_cpu_ms_per_saga",
            "bench_cpu_ms_per_saga", "other_cpu_ms_per_saga", "machine_cpu_ms_per_saga",
            "machine_cores_busy", "steal_cores")},
        "claims": ({m: {k: sum(c[m][k] for c in claims) for k in claims[0][m]}
                    for m in claims[0]} if claims else None),
        "waits": merged_waits,
    }


async def run(session: Session, section: Section) -> None:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    kinds = {k: v for k, v in variants(session).items()
             if session.recovery_variants is None or k in session.recovery_variants}
    where = ("each in its own process (a subprocess of the benchmark), timed from the signal "
             "to start until the COMPLETED rows reach the backlog"
             if session.recovery_mode == "process" else
             "all in this one process (asyncio.gather), sharing its one Python thread: with the "
             "client CPU per saga below, that CPU bounds in-process scaling")
    section.add(intro(sizes, kinds, where))
    deadline = max(30.0, sizes.section_timeout / 5)
    for backend in session.backends.values():
        tables = session.new_tables(backend.url)
        storage = SqlAlchemySagaStorage.from_url(backend.url, pool_size=2, **tables)
        explains: dict[str, Any] = {}
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {
            k: {w: [] for w in sizes.recovery_workers} for k in kinds}
        costs: dict[str, float] = {}
        try:
            await storage.create_schema()
            for rnd in range(sizes.recovery_rounds):  # rounds outermost: noise spreads evenly
                for name, variant in kinds.items():
                    saga = saga_class(5, sleep_ms=variant["sleep_ms"])
                    for workers in sizes.recovery_workers:
                        await storage.delete_all()
                        insert_s = await make_backlog(storage, variant["backlog"], saga=saga)
                        await analyze(storage)
                        if "backlog" not in explains:
                            explains["backlog"] = await explain_listing(storage)
                        session.log(f"{backend.name}: round {rnd + 1}, {name}, "
                                    f"{variant['backlog']} by {workers} worker(s)")
                        if session.recovery_mode == "process":
                            result = await recover_backlog_procs(
                                session, backend, tables, workers, variant["backlog"],
                                deadline, storage, variant)
                        else:
                            result = await recover_backlog(session, backend, tables, workers,
                                                           variant["backlog"], deadline,
                                                           variant)
                        result["backlog_insert_s"] = insert_s
                        result["completed_rows"] = await count_completed(storage)
                        runs[name][workers].append(result)
            await analyze(storage)
            explains["steady"] = await explain_listing(storage)
            await storage.delete_all()
            await make_backlog(storage, sizes.recovery_backlog)
            await analyze(storage)
            explains["claim"] = await explain_claims(storage, saga_class(5),
                                                     sizes.recovery_concurrency)
            costs = await count_recovery(session, backend, min(50, sizes.recovery_backlog))
        finally:
            await drop(session, storage)
        data = {
            "variants": {name: {**kinds[name],
                                "runs": [summarise_runs(rs) for rs in per.values() if rs]}
                         for name, per in runs.items()},
            "costs": costs, "rounds": sizes.recovery_rounds,
            "explain": {k: ({"plan": v[0], "index": v[1]} if isinstance(v, tuple) else v)
                        for k, v in explains.items()},
        }
        section.data[backend.name] = data
        report(section, backend, data, sizes.recovery_backlog)
