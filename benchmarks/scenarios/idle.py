"""The load of an idle worker on the database, for the dispatch section: one worker process
with default settings on empty tables, after a warm-up; over one window counted by the server
(PostgreSQL: the transactions of a database of its own in pg_stat_database; MariaDB: the global
``Questions`` and ``Com_select``; each less the same window without the worker), over the next
counted in the worker, every query (tests/integration/sqlcount.py's hooks, which on PostgreSQL
query the server themselves, hence the two windows).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from scenarios.common import Backend, Session, drop
from scenarios.procs import WorkerProcs, summarise, wakeups


class ServerCounters:
    """The server's own counters: PostgreSQL, transactions of one database; MariaDB, the global
    ``Questions`` and ``Com_select``."""

    def __init__(self, backend: Backend, database: str | None) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        self.backend, self.database = backend, database
        self.engine = create_async_engine(backend.url, isolation_level="AUTOCOMMIT",
                                          pool_size=1)

    async def read(self) -> dict[str, float]:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            if self.backend.name == "postgres":
                await conn.execute(text("SELECT pg_stat_clear_snapshot()"))
                value = (await conn.execute(text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                    "WHERE datname = :d"), {"d": self.database})).scalar_one()
                return {"transactions": float(value), "t": time.perf_counter()}
            rows = (await conn.execute(text(
                "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_select')"))).all()
            return {**{str(k): float(v) for k, v in rows}, "t": time.perf_counter()}

    async def close(self) -> None:
        await self.engine.dispose()


def _rates(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...],
           clock: str = "t") -> dict[str, float]:
    seconds = b[clock] - a[clock]
    return {k: (b[k] - a[k]) / seconds for k in keys if a.get(k) is not None}


async def _own_database(backend: Backend, name: str, create: bool) -> str:
    """Create (or drop) a PostgreSQL database; return its URL."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(backend.url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"' if create else
                                    f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await engine.dispose()
    return make_url(backend.url).set(database=name).render_as_string(hide_password=False)


async def measure_idle(session: Session, backend: Backend) -> dict[str, Any]:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    pg = backend.name == "postgres"
    database = None
    url = backend.url
    if pg:
        database = f"bx{session.run_id}_idle"
        url = await _own_database(backend, database, create=True)
    tables = session.new_tables(url)
    storage = SqlAlchemySagaStorage.from_url(url, pool_size=1, **tables)
    counters = ServerCounters(backend, database)
    window, warmup = sizes.idle_window_s, sizes.idle_warmup_s
    config = {"url": url, "tables": tables, "deadline_s": 3 * window + warmup + 120,
              "saga": "dispatch"}
    try:
        await storage.create_schema()
        # Closed, so that its session's counts reach the server's statistics now (PostgreSQL
        # reports a session's counts when it ends, or up to 10 s later), not in the windows.
        await storage.engine.dispose()
        async with WorkerProcs(config, 1) as procs:
            s0 = await counters.read()  # the floor: the same window without the worker
            await asyncio.sleep(window)
            s1 = await counters.read()
            await procs.go()
            await asyncio.sleep(warmup)
            m0, s2 = (await procs.mark())[0], await counters.read()
            await asyncio.sleep(window)  # counted by the server, no hooks in the worker
            m1, s3 = (await procs.mark())[0], await counters.read()
            c0 = (await procs.mark("count"))[0]
            await asyncio.sleep(window)  # counted in the worker
            c1 = (await procs.mark())[0]
            reports = await procs.stop()
    finally:
        await counters.close()
        if pg:
            await storage.close()
            await _own_database(backend, str(database), create=False)
            session.dropped(tables)
        else:
            await drop(session, storage)
    keys = ("transactions",) if pg else ("Questions", "Com_select")
    baseline, loaded = _rates(s0, s1, keys), _rates(s2, s3, keys)
    client = _rates(c0, c1, ("queries", "statements", "transactions", "reads"))
    total = summarise(reports, procs.stderr, 1)
    return {"window_s": s3["t"] - s2["t"], "warmup_s": warmup, "database": database,
            "server": {k: loaded[k] - baseline[k] for k in keys},
            "server_raw": loaded, "server_baseline": baseline, "client": client,
            "client_window_s": c1["t"] - c0["t"],
            "client_cpu_ms_per_s": 1000 * (m1["cpu_s"] - m0["cpu_s"]) / (m1["t"] - m0["t"]),
            "wakeups": wakeups(reports), "warnings": total["warnings"],
            "errors": total["errors"], "first_error": total["first_error"]}
