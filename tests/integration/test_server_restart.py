"""The database server restarts while sagas run and a worker recovers them: every saga ends
terminal, nothing is lost, and no caller sees a driver's raw error.

These tests restart the local PostgreSQL and MariaDB servers (``pg_ctlcluster ... restart``;
``mariadb-admin shutdown`` then ``mariadbd`` started again) and put them back before they end.
They need root and the servers on this machine: under CI=true a missing server fails them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from sagakit import (
    RecoveryOptions,
    RecoveryWorker,
    Saga,
    SagaContext,
    SagaError,
    SagaNotFoundError,
    SagaStatus,
    SagaStepHandler,
)
from sagakit.records import SagaAction, SagaStepStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, TABLES, server_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.acceptance]

SAGAS = 48
STEP_SECONDS = 0.05
LEASE = 2.0


@dataclasses.dataclass
class RestartContext(SagaContext):
    key: str
    done: list[str] = dataclasses.field(default_factory=list)


class _Step(SagaStepHandler[RestartContext, None]):
    async def act(self, context: RestartContext) -> None:
        await asyncio.sleep(STEP_SECONDS)
        context.done.append(type(self).__name__)

    async def compensate(self, context: RestartContext) -> None:
        context.done.remove(type(self).__name__)


class Book(_Step):
    pass


class Pay(_Step):
    pass


class Send(_Step):
    pass


class Confirm(_Step):
    pass


class RestartSaga(Saga[RestartContext]):
    steps = [Book, Pay, Send, Confirm]


# -- the servers -------------------------------------------------------------------------------


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def _wait(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:g} s")


def _answers(*command: str) -> bool:
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


def _postgres_up() -> bool:
    return _answers("pg_isready", "-h", "127.0.0.1", "-p", "5432")


def _mariadb_up() -> bool:
    return _answers("mariadb-admin", "-h", "127.0.0.1", "-uroot", "ping")


def _mariadb_running() -> bool:
    return _answers("pgrep", "-x", "mariadbd")


def _can_restart(tool: str) -> bool:
    return os.geteuid() == 0 and shutil.which(tool) is not None and os.path.isdir(
        "/etc/postgresql")


def _pg_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


def restart_postgres() -> None:
    _run("pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main", "restart")
    _wait(_postgres_up, "PostgreSQL answering again")


def start_postgres() -> None:
    if not _postgres_up():
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", _pg_version(), "main",
                        "start"], capture_output=True, timeout=120)
        _wait(_postgres_up, "PostgreSQL answering")


def restart_mariadb() -> None:
    _run("mariadb-admin", "-h", "127.0.0.1", "-uroot", "shutdown")
    _wait(lambda: not _mariadb_running(), "MariaDB stopping")
    start_mariadb()


def start_mariadb() -> None:
    if not _mariadb_up():
        if not _mariadb_running():
            _run("start-stop-daemon", "--start", "--oknodo", "--background", "--exec",
                 "/usr/sbin/mariadbd")
        _wait(_mariadb_up, "MariaDB answering")


SERVERS = {
    "postgres": (POSTGRES_DSN, restart_postgres, start_postgres, "pg_ctlcluster"),
    "mysql": (MYSQL_DSN, restart_mariadb, start_mariadb, "mariadb-admin"),
}


# -- the test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
async def test_a_server_restart_under_load_loses_no_saga(backend: str) -> None:
    url, restart, start, tool = SERVERS[backend]
    if not _can_restart(tool):
        server_unavailable(f"a {backend} server this test may restart", PermissionError(tool))
    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    try:
        await storage.create_schema()
        await storage.delete_all()
    except OSError as error:
        await storage.close()
        server_unavailable(backend, error)
    started_before = await _server_started(storage)
    worker = RecoveryWorker(
        storage, [RestartSaga], concurrency=8, poll_interval=0.1,
        options=RecoveryOptions(lease_seconds=LEASE, backoff=0.0, max_recovery_attempts=100),
    )
    worker_task = asyncio.create_task(worker.run(install_signal_handlers=False))
    ids = [uuid.uuid4() for _ in range(SAGAS)]
    outcomes: dict[uuid.UUID, BaseException | SagaStatus] = {}

    async def run(saga_id: uuid.UUID) -> None:
        try:
            outcomes[saga_id] = await RestartSaga().transaction(
                context=RestartContext(saga_id.hex), storage=storage, saga_id=saga_id,
                lease_seconds=LEASE).run()
        except Exception as error:  # every error is examined below
            outcomes[saga_id] = error

    try:
        runs = []
        restarting: asyncio.Future[None] | None = None
        for number, saga_id in enumerate(ids):
            runs.append(asyncio.create_task(run(saga_id)))
            if number == SAGAS // 3:  # sagas are mid-step now: take the server away
                restarting = asyncio.ensure_future(asyncio.to_thread(restart))
            await asyncio.sleep(0.04)
        assert restarting is not None
        await restarting
        await asyncio.gather(*runs)
        await _until_all_terminal(storage, ids)
    finally:
        worker.stop()
        await asyncio.wait_for(worker_task, 60)
        await asyncio.to_thread(start)  # whatever happened, the server is back
        await storage.close()

    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    try:
        assert await _server_started(storage) > started_before  # it did restart meanwhile
        raw = [o for o in outcomes.values() if isinstance(o, BaseException)
               and not isinstance(o, SagaError)]
        assert raw == []  # callers saw sagakit's errors only
        for saga_id in ids:
            try:
                state = await storage.get_saga(saga_id)
            except SagaNotFoundError:
                # Only a start that failed may have written nothing.
                assert isinstance(outcomes[saga_id], SagaError)
                continue
            assert state.status is SagaStatus.COMPLETED, (saga_id, state.status)
            assert state.lease_owner is None
            assert state.context["done"] == ["Book", "Pay", "Send", "Confirm"]
            history = await storage.get_step_history(saga_id)
            assert [(e.step_name, e.action, e.status) for e in history] == [
                (name, SagaAction.ACT, SagaStepStatus.COMPLETED)
                for name in ("Book", "Pay", "Send", "Confirm")]  # each step checkpointed once
    finally:
        await storage.drop_schema()
        await storage.close()


async def _server_started(storage: SqlAlchemySagaStorage) -> float:
    """When the database server last started (seconds since the epoch, its own clock)."""
    query = ("SELECT EXTRACT(EPOCH FROM pg_postmaster_start_time())" if storage.dialect.is_postgres
             else "SELECT UNIX_TIMESTAMP() - VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                  "WHERE VARIABLE_NAME = 'UPTIME'")
    async with storage.engine.connect() as conn:
        return float((await conn.execute(sa.text(query))).scalar_one())


async def _until_all_terminal(storage: SqlAlchemySagaStorage, ids: list[uuid.UUID]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            open_ = await storage.list_sagas(statuses=frozenset({
                SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING}), limit=1000)
        except SagaError:
            open_ = None  # the server is still coming back
        if open_ == []:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"sagas still open after the restart: {open_}")
