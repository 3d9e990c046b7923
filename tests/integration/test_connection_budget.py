"""A worker's connections stay within its documented budget, however many sagas it holds.

A worker of concurrency 64 holds 64 sagas in a step at once; this process's TCP connections to
the database server are counted (from /proc: its sockets and the kernel's TCP table). The budget
(docs/workers.md): the pool's ``pool_size + max_overflow`` (SQLAlchemy's 5 + 10), one wake-up
session on PostgreSQL, one liveness session.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from sagakit import SagaStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance import failover_worker as fw
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, TABLES, server_unavailable

SAGAS = 64


def connections_to(port: int) -> int:
    """Established TCP connections of this process to ``port`` (Linux /proc)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in mine:
                    count += 1
    return count


def _marks(directory: Path, what: str) -> int:
    return len(list(directory.glob(f"{what}-*")))


async def _until(directory: Path, what: str) -> None:
    """Until every saga's step has written its ``what`` mark."""
    while _marks(directory, what) < SAGAS:  # noqa: ASYNC110 (another task writes files)
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("url", "sessions"), [
    pytest.param(POSTGRES_DSN, 2, id="postgres"),  # LISTEN + liveness
    pytest.param(MYSQL_DSN, 1, id="mysql"),  # liveness
])
async def test_a_worker_of_concurrency_64_stays_within_its_connection_budget(
    url: str, sessions: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fw, "_DIR", tmp_path)
    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    try:
        await storage.create_schema()
        await storage.delete_all()
    except OSError as exc:
        await storage.close()
        server_unavailable(url.split(":")[0], exc)
    port = make_url(url).port
    assert port is not None
    worker = fw.worker(storage)
    worker.concurrency = SAGAS
    running = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        async with asyncio.timeout(120):
            for _ in range(SAGAS):
                await fw.HoldSaga().submit(fw.HoldContext(), storage=storage, queue=fw.QUEUE)
            await _until(tmp_path, "hold")
            in_hand = await storage.list_sagas(statuses=frozenset({SagaStatus.RUNNING}),
                                               limit=1000)
            assert len(in_hand) == SAGAS
            held = connections_to(port)
            pool: Any = storage.engine.pool
            assert sessions <= held <= pool.size() + pool._max_overflow + sessions
            (tmp_path / "go").write_text("")
            await _until(tmp_path, "finish")
    finally:
        worker.stop()
        await running
        await storage.close()
