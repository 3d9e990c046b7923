"""sagakit benchmark: a 5-step no-op saga on each backend, against a raw-driver floor.

Run: ``python benchmarks/bench.py [--sagas 300] [--concurrency 32] [--backends ...]``

Prints, per backend and in one run: sequential latency per saga, throughput with N concurrent
sagas, commits and statements per saga, client CPU per saga; each also as a ratio to the floor
measured in the same run: asyncpg alone doing the minimal N+2 single-statement autocommit writes
of a saga on PostgreSQL (insert the row, one update per step, one to complete).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sagakit import Saga, SagaContext, SagaStepHandler
from sagakit.storage.memory import MemorySagaStorage
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

PG = os.environ.get("SAGAKIT_POSTGRES_DSN", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
MYSQL = os.environ.get("SAGAKIT_MYSQL_DSN", "mysql+asyncmy://root@127.0.0.1:3306/test")
STEPS = 5
_TABLES = {"executions_table": "bench_saga_executions", "logs_table": "bench_saga_logs"}


@dataclasses.dataclass
class BenchContext(SagaContext):
    order_id: str
    counter: int = 0


class NoOp(SagaStepHandler[BenchContext, None]):
    async def act(self, context: BenchContext) -> None:
        context.counter += 1

    async def compensate(self, context: BenchContext) -> None:
        context.counter -= 1


STEP_TYPES = [type(f"Step{i}", (NoOp,), {}) for i in range(STEPS)]


class BenchSaga(Saga[BenchContext]):
    steps = STEP_TYPES


@dataclasses.dataclass
class Result:
    name: str
    latency_ms: float
    throughput: float
    cpu_ms: float
    commits: float | None = None
    statements: float | None = None


async def _measure(name: str, one: Callable[[int], Awaitable[None]], sagas: int,
                   concurrency: int) -> Result:
    for i in range(min(20, sagas)):  # warm up caches and pools
        await one(-i - 1)
    cpu0, t0 = time.process_time(), time.perf_counter()
    latencies = []
    for i in range(sagas):
        s = time.perf_counter()
        await one(i)
        latencies.append(time.perf_counter() - s)
    cpu = (time.process_time() - cpu0) / sagas
    queue = iter(range(sagas, sagas * 4))

    async def worker() -> None:
        for i in queue:
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    throughput = sagas * 3 / (time.perf_counter() - t0)
    return Result(name, statistics.mean(latencies) * 1000, throughput, cpu * 1000)


async def floor(sagas: int, concurrency: int) -> Result:
    """asyncpg alone: N+2 single-statement autocommit writes per saga."""
    import asyncpg
    import orjson

    dsn = PG.replace("postgresql+asyncpg", "postgresql")
    pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
    async with pool.acquire() as conn:
        await conn.execute("DROP TABLE IF EXISTS bench_floor")
        await conn.execute("CREATE TABLE bench_floor (saga_id uuid PRIMARY KEY, name text, "
                           "status text, context jsonb, version int, updated_at timestamptz)")

    async def one(_: int) -> None:
        saga_id = uuid.uuid4()
        context = {"order_id": "o", "counter": 0}
        async with pool.acquire() as conn:
            await conn.execute("INSERT INTO bench_floor VALUES ($1, 'B', 'RUNNING', $2, 1, now())",
                               saga_id, orjson.dumps(context).decode())
        for step in range(STEPS):
            context["counter"] = step + 1
            async with pool.acquire() as conn:
                await conn.execute("UPDATE bench_floor SET context = $2, version = version + 1, "
                                   "updated_at = now() WHERE saga_id = $1",
                                   saga_id, orjson.dumps(context).decode())
        async with pool.acquire() as conn:
            await conn.execute("UPDATE bench_floor SET status = 'COMPLETED', version = version + 1 "
                               "WHERE saga_id = $1", saga_id)

    try:
        result = await _measure("asyncpg floor", one, sagas, concurrency)
    finally:
        async with pool.acquire() as conn:
            await conn.execute("DROP TABLE bench_floor")
        await pool.close()
    result.commits = result.statements = STEPS + 2
    return result


async def sagakit_backend(name: str, storage: Any, sagas: int, concurrency: int) -> Result:
    saga = BenchSaga()

    async def one(_: int) -> None:
        async for _ in saga.transaction(context=BenchContext("o"), storage=storage):
            pass

    counter = None
    if isinstance(storage, SqlAlchemySagaStorage):
        await storage.create_schema()
        await storage.delete_all()
        from tests.integration.sqlcount import SqlCounter

        counter = SqlCounter(storage.engine)
    result = await _measure(name, one, sagas, concurrency)
    if counter is not None:
        total = sagas * 4 + min(20, sagas)
        result.commits = counter.counts.transactions / total
        result.statements = counter.counts.statements / total
        counter.close()
        await storage.delete_all()
    await getattr(storage, "close", _none)()
    return result


async def _none() -> None:
    return None


def _storages(backends: list[str], concurrency: int, tmp: str) -> dict[str, Callable[[], Any]]:
    pool = {"pool_size": concurrency, "max_overflow": 0, **_TABLES}
    table = {
        "memory": lambda: MemorySagaStorage(),
        "sqlite": lambda: SqlAlchemySagaStorage.from_url(f"sqlite+aiosqlite:///{tmp}/bench.db",
                                                         **_TABLES),
        "postgres": lambda: SqlAlchemySagaStorage.from_url(PG, **pool),
        "mysql": lambda: SqlAlchemySagaStorage.from_url(MYSQL, **pool),
        "postgres-group": lambda: SqlAlchemySagaStorage.from_url(PG, group_commit=True, **pool),
        "mysql-group": lambda: SqlAlchemySagaStorage.from_url(MYSQL, group_commit=True, **pool),
        "sqlite-group": lambda: SqlAlchemySagaStorage.from_url(
            f"sqlite+aiosqlite:///{tmp}/bench-group.db", group_commit=True, **_TABLES),
    }
    return {b: table[b] for b in backends}


def _report(rows: list[Result], base: Result, concurrency: int) -> str:
    head = (f"| backend | latency ms/saga | x floor | sagas/s @{concurrency} | x floor | "
            "client CPU ms/saga | x floor | commits/saga | statements/saga |")
    lines = [head, "|" + "---|" * 9]
    for r in [base, *rows]:
        lines.append(
            f"| {r.name} | {r.latency_ms:.2f} | {r.latency_ms / base.latency_ms:.2f} | "
            f"{r.throughput:.0f} | {r.throughput / base.throughput:.2f} | {r.cpu_ms:.3f} | "
            f"{r.cpu_ms / base.cpu_ms:.2f} | {_num(r.commits)} | {_num(r.statements)} |"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=300, help="sequential sagas per backend")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=["memory", "sqlite", "postgres", "mysql"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = await floor(args.sagas, args.concurrency)
        rows = []
        for name, make in _storages(args.backends, args.concurrency, tmp).items():
            rows.append(await sagakit_backend(f"sagakit {name}", make(), args.sagas,
                                              args.concurrency))
    print(f"{STEPS}-step no-op saga; {args.sagas} sequential sagas, then {args.sagas * 3} "
          f"with {args.concurrency} concurrent; floor = asyncpg, {STEPS + 2} autocommit writes")
    print(_report(rows, base, args.concurrency))
    memory = next((r for r in rows if r.name == "sagakit memory"), None)
    if memory is not None:
        print(f"memory storage framework cost: {memory.cpu_ms * 1000 / STEPS:.1f} us CPU per step")


if __name__ == "__main__":
    asyncio.run(main())
