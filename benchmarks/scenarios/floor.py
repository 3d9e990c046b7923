"""The floor: the raw driver alone doing the minimal writes of a saga of N steps, each a
single-statement autocommit transaction (N+2: insert the row, one update per step writing the
context, one to complete). No step log, no lease, no fencing: what any durable orchestrator has
to pay at least, measured in the same run.

PostgreSQL: asyncpg, pool with the per-release reset query turned off (asyncpg's default sends
``RESET ALL`` etc. on every release: one more round trip per statement, which would flatter
sagakit). MariaDB: asyncmy with autocommit on (its pool's release sends nothing).
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from scenarios.common import Backend, Measure, Session, drive


async def _no_reset(_connection: Any) -> None:
    return None


class PgFloor:
    def __init__(self, session: Session, backend: Backend, pool: int) -> None:
        self.session, self.backend, self.pool_size = session, backend, pool
        self.table = session.new_floor_table(backend.url)
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg

        dsn = self.backend.url.replace("postgresql+asyncpg", "postgresql")
        self.pool = await asyncpg.create_pool(dsn, min_size=self.pool_size,
                                              max_size=self.pool_size, reset=_no_reset)
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"CREATE TABLE {self.table} (saga_id uuid PRIMARY KEY, name text, status text, "
                "context jsonb, version int, updated_at timestamptz)")

    async def close(self) -> None:
        if self.pool is not None:
            async with self.pool.acquire() as conn:
                await conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            self.session.dropped(self.table)
            await self.pool.close()

    async def one(self, steps: int, payload: str) -> None:
        pool, t = self.pool, self.table
        saga_id = uuid.uuid4()
        context: dict[str, Any] = {"order_id": "o", "counter": 0, "payload": payload}
        async with pool.acquire() as conn:
            await conn.execute(f"INSERT INTO {t} VALUES ($1, 'B', 'RUNNING', $2::text::jsonb, 1, "
                               "now())", saga_id, orjson.dumps(context).decode())
        for step in range(steps):
            context["counter"] = step + 1
            async with pool.acquire() as conn:
                await conn.execute(f"UPDATE {t} SET context = $2::text::jsonb, "
                                   "version = version + 1, updated_at = now() WHERE saga_id = $1",
                                   saga_id, orjson.dumps(context).decode())
        async with pool.acquire() as conn:
            await conn.execute(f"UPDATE {t} SET status = 'COMPLETED', version = version + 1, "
                               "updated_at = now() WHERE saga_id = $1", saga_id)


class MariaFloor:
    def __init__(self, session: Session, backend: Backend, pool: int) -> None:
        self.session, self.backend, self.pool_size = session, backend, pool
        self.table = session.new_floor_table(backend.url)
        self.pool: Any = None

    async def open(self) -> None:
        import asyncmy
        from sqlalchemy.engine import make_url

        url = make_url(self.backend.url)
        self.pool = await asyncmy.create_pool(
            minsize=self.pool_size, maxsize=self.pool_size, host=url.host or "127.0.0.1",
            port=url.port or 3306, user=url.username or "root", password=url.password or "",
            database=url.database, autocommit=True)
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"CREATE TABLE {self.table} (saga_id CHAR(36) PRIMARY KEY, name VARCHAR(255), "
                "status VARCHAR(16), context LONGTEXT, version INT, updated_at DATETIME(6))")

    async def close(self) -> None:
        if self.pool is not None:
            async with self.pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"DROP TABLE IF EXISTS {self.table}")
            self.session.dropped(self.table)
            self.pool.close()
            await self.pool.wait_closed()

    async def one(self, steps: int, payload: str) -> None:
        pool, t = self.pool, self.table
        saga_id = str(uuid.uuid4())
        context: dict[str, Any] = {"order_id": "o", "counter": 0, "payload": payload}
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"INSERT INTO {t} VALUES (%s, 'B', 'RUNNING', %s, 1, "
                              "UTC_TIMESTAMP(6))", (saga_id, orjson.dumps(context).decode()))
        for step in range(steps):
            context["counter"] = step + 1
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"UPDATE {t} SET context = %s, version = version + 1, "
                                  "updated_at = UTC_TIMESTAMP(6) WHERE saga_id = %s",
                                  (orjson.dumps(context).decode(), saga_id))
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(f"UPDATE {t} SET status = 'COMPLETED', version = version + 1, "
                              "updated_at = UTC_TIMESTAMP(6) WHERE saga_id = %s", (saga_id,))


def make_floor(session: Session, backend: Backend, pool: int) -> PgFloor | MariaFloor:
    pool = max(1, min(pool, session.pool_cap))
    if backend.name == "postgres":
        return PgFloor(session, backend, pool)
    return MariaFloor(session, backend, pool)


async def measure_floor(
    session: Session, backend: Backend, concurrency: int, total: int, *, steps: int = 5,
    payload: str = "",
) -> Measure:
    floor = make_floor(session, backend, concurrency)
    try:
        await floor.open()

        async def one() -> None:
            await floor.one(steps, payload)

        result = await drive(f"floor {backend.name}", one, concurrency, total)
    finally:
        await floor.close()
    result.commits = result.statements = float(steps + 2)
    return result
