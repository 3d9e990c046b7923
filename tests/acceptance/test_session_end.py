"""A worker's liveness session is lost the moment its connection ends, not at its next look.

When the link to the database is reset (a middlebox, a proxy restart) or the server ends the
session, the server frees the session's lock at once and other workers, seeing the owner dead,
take its sagas over at their next look. The worker cut off must stop its runs before that, so
it cannot wait for its own next look (up to ``failover_poll`` seconds later): the driver tells
it (asyncpg's termination listener; asyncmy's and aiomysql's transport closing). Here the
looks are an hour apart and never run; the loss is seen anyway, and the session reopens under
a new owner id once the link is back.

aiomysql does not report a clean close by the server (its stream keeps the socket half open on
EOF), only resets and errors: that case is left to the next look.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sagakit.storage.liveness import Liveness
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.faultproxy import FaultProxy
from tests.acceptance.test_crash_injection import _require_server
from tests.conftest import MYSQL_DSN, POSTGRES_DSN

pytestmark = pytest.mark.acceptance

AIOMYSQL_DSN = str(make_url(MYSQL_DSN).set(drivername="mysql+aiomysql"))
DRIVERS = {"asyncpg": POSTGRES_DSN, "asyncmy": MYSQL_DSN, "aiomysql": AIOMYSQL_DSN}
PORTS = {"asyncpg": 5432, "asyncmy": 3306, "aiomysql": 3306}
BACKEND = {"asyncpg": "postgres", "asyncmy": "mysql", "aiomysql": "mysql"}


def _hour_between_looks(storage: SqlAlchemySagaStorage) -> tuple[Liveness, list[str]]:
    live = storage.liveness()
    live.every = live.max_quiet = 3600.0
    looks: list[str] = []
    backend = live.backend
    assert backend is not None
    watch = backend.watch

    async def counted(session: Any, owner: str) -> int:
        looks.append(owner)
        return await watch(session, owner)

    backend.watch = counted  # type: ignore[method-assign]
    return live, looks


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.025)
    pytest.fail(f"never happened: {what}")


@pytest.mark.parametrize("driver", list(DRIVERS))
async def test_a_reset_link_loses_the_session_without_a_look_and_it_reopens(driver: str) -> None:
    await _require_server(BACKEND[driver])
    url = make_url(DRIVERS[driver])
    with FaultProxy(url.host or "127.0.0.1", url.port or PORTS[driver]) as proxy:
        storage = SqlAlchemySagaStorage.from_url(url.set(port=proxy.port))
        try:
            live, looks = _hour_between_looks(storage)
            async with live:
                assert live.live
                first = live.owner
                proxy.cut()
                await _until(lambda: live.losses == 1, "the session lost")
                assert looks == []
                assert not live.live
                assert live.owner != first
                proxy.heal()
                await _until(lambda: live.live, "the session reopened")
                assert live.owner != first
                assert live.owner.startswith("~")
                assert live.losses == 1
        finally:
            await storage.close()


_SESSION_ID = {"asyncpg": "SELECT pg_backend_pid()", "asyncmy": "SELECT CONNECTION_ID()"}
_KILL = {"asyncpg": "SELECT pg_terminate_backend({})", "asyncmy": "KILL {}"}


@pytest.mark.parametrize("driver", list(_KILL))
async def test_a_session_the_server_ends_is_lost_without_a_look(driver: str) -> None:
    await _require_server(BACKEND[driver])
    storage = SqlAlchemySagaStorage.from_url(DRIVERS[driver])
    try:
        live, looks = _hour_between_looks(storage)
        async with live:
            assert live.live
            first = live.owner
            session_id = (await live._session.execute(sa.text(_SESSION_ID[driver]))).scalar()
            async with storage.engine.connect() as conn:
                await conn.execute(sa.text(_KILL[driver].format(int(session_id))))
            await _until(lambda: live.losses == 1, "the session lost")
            await _until(lambda: live.live, "the session reopened")
            assert looks == []
            assert live.owner != first
    finally:
        await storage.close()
