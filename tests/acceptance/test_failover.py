"""Failover between worker processes, on SQLite, PostgreSQL and MariaDB.

A worker process (:mod:`tests.acceptance.failover_worker`, one-hour leases) takes a submitted
saga and holds it in its first step. Then:

- SIGKILL: another worker takes the saga over at once (its liveness session died with the
  process; the lease is far from running out) and finishes it;
- SIGSTOP: the worker is alive but silent; another worker, polling all the while, takes nothing
  (the session is still there); after SIGCONT the first worker finishes the saga itself;
- its liveness session killed by the server: the worker cuts its run off at once (another
  worker could take the saga over now) and opens a session under a new owner id (PostgreSQL
  and MariaDB, which have sessions);
- SIGTERM: the worker finishes the step in hand, checkpoints, releases the lease and exits 0;
  another worker goes on from the next step at once.

Without liveness (or the release) the second worker would wait an hour: the tests would time out.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sagakit import SagaStatus
from sagakit.exceptions import SagaLeaseLostError
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance import failover_worker as fw
from tests.acceptance.procs import REPO, default_url
from tests.acceptance.test_crash_injection import _require_server

pytestmark = pytest.mark.acceptance
every_backend = pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])


class Setup:
    def __init__(self, backend: str, workdir: Path) -> None:
        self.url = default_url(backend, workdir)
        self.prefix = f"fo{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.dir = workdir
        self.storage = SqlAlchemySagaStorage.from_url(self.url, **fw.tables(self.prefix))
        self.child: subprocess.Popen[bytes] | None = None

    def marks(self, what: str) -> list[str]:
        """The pids that wrote ``what`` marks, one per act started, in no order."""
        return sorted(p.name.split("-")[1] for p in self.dir.glob(f"{what}-*"))

    def start_worker(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "SAGAKIT_FAILOVER_DIR": str(self.dir)}
        with open(self.dir / "child.log", "wb") as log:
            self.child = subprocess.Popen(
                [sys.executable, "-m", "tests.acceptance.failover_worker", self.url,
                 self.prefix], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self.child

    async def wait_for(self, what: str, count: int = 1) -> None:
        while len(self.marks(what)) < count:
            assert self.child is None or self.child.poll() is None or what != "hold", (
                (self.dir / "child.log").read_text())
            await asyncio.sleep(0.02)

    def pause(self, pid: int) -> None:
        """SIGSTOP the worker, at a moment it holds no SQLite write lock (a writer paused in
        its transaction would block every other writer of the file: SQLite's nature, not what
        this test is about)."""
        while True:
            os.kill(pid, signal.SIGSTOP)
            if not self.url.startswith("sqlite"):
                return
            db = sqlite3.connect(self.url.partition(":///")[2], timeout=0.05)
            try:
                db.execute("BEGIN IMMEDIATE")
                db.rollback()
                return
            except sqlite3.OperationalError:
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.05)
            finally:
                db.close()

    async def outcome(self, saga_id: uuid.UUID) -> Any:
        while True:
            state = await self.storage.get_saga(saga_id)
            if state.status in (SagaStatus.COMPLETED, SagaStatus.FAILED, SagaStatus.PARKED):
                return state
            await asyncio.sleep(0.05)


@pytest.fixture
async def setup(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                ) -> AsyncIterator[Setup]:
    await _require_server(backend)
    monkeypatch.setattr(fw, "_DIR", tmp_path)
    s = Setup(backend, tmp_path)
    await s.storage.create_schema()
    try:
        async with asyncio.timeout(120):  # an hour's lease would stop the tests here instead
            yield s
    finally:
        if s.child is not None and s.child.poll() is None:
            s.child.kill()
            s.child.wait()
        await s.storage.drop_schema()
        await s.storage.close()


async def _submit(s: Setup) -> uuid.UUID:
    handle = await fw.HoldSaga().submit(fw.HoldContext(), storage=s.storage, queue=fw.QUEUE)
    return handle.saga_id


async def _held_by_a_child(s: Setup) -> tuple[subprocess.Popen[bytes], uuid.UUID]:
    """A worker process, and a saga it holds in its first step."""
    child = s.start_worker()
    saga_id = await _submit(s)
    await s.wait_for("hold")
    return child, saga_id


async def _finish_here(s: Setup, saga_id: uuid.UUID) -> Any:
    """Run a worker in this process until the saga is done; its final state."""
    other = fw.worker(s.storage)
    running = asyncio.create_task(other.run(install_signal_handlers=False))
    try:
        return await s.outcome(saga_id)
    finally:
        other.stop()
        await running


@every_backend
async def test_a_killed_workers_saga_is_taken_over_before_its_lease_runs_out(
    setup: Setup,
) -> None:
    s = setup
    child, saga_id = await _held_by_a_child(s)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (s.dir / "go").write_text("")
    final = await _finish_here(s, saga_id)
    assert final.status is SagaStatus.COMPLETED
    assert final.lease_owner is None
    here = str(os.getpid())
    # The killed worker started the step; this one ran it again and the rest, once each.
    assert s.marks("hold") == sorted([str(child.pid), here])
    assert s.marks("finish") == [here]
    assert final.recovery_attempts == 1


@every_backend
async def test_a_paused_worker_is_not_taken_over_and_finishes_its_saga(setup: Setup) -> None:
    s = setup
    child, saga_id = await _held_by_a_child(s)
    s.pause(child.pid)
    try:
        other = fw.worker(s.storage)
        for _ in range(5):  # it polls, and finds nothing it may take
            assert await other.run_once() == []
            await asyncio.sleep(0.3)
        state = await s.storage.get_saga(saga_id)
        assert state.status is SagaStatus.RUNNING
        assert state.lease_owner is not None
        assert state.lease_owner.startswith("~")
    finally:
        os.kill(child.pid, signal.SIGCONT)
    (s.dir / "go").write_text("")
    final = await s.outcome(saga_id)
    assert final.status is SagaStatus.COMPLETED
    assert s.marks("hold") == s.marks("finish") == [str(child.pid)]
    assert final.recovery_attempts == 0


@every_backend
async def test_sigterm_hands_the_saga_over_at_its_next_checkpoint(setup: Setup) -> None:
    s = setup
    child, saga_id = await _held_by_a_child(s)
    child.send_signal(signal.SIGTERM)
    (s.dir / "go").write_text("")  # the step in hand ends; the worker checkpoints and stops
    assert await asyncio.to_thread(child.wait) == 0, (s.dir / "child.log").read_text()
    state = await s.storage.get_saga(saga_id)
    assert (state.status, state.lease_owner) == (SagaStatus.RUNNING, None)
    final = await _finish_here(s, saga_id)
    assert final.status is SagaStatus.COMPLETED
    # The step in hand ran once, in the stopped worker; the next one here.
    assert s.marks("hold") == [str(child.pid)]
    assert s.marks("finish") == [str(os.getpid())]


_SESSION_ID = {"postgres": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}
_KILL = {"postgres": "SELECT pg_terminate_backend({})", "mysql": "KILL {}"}


@pytest.mark.parametrize("backend", ["postgres", "mysql"])
async def test_a_lost_session_cuts_its_runs_off_and_reopens_under_a_new_owner(
    setup: Setup, backend: str,
) -> None:
    s = setup
    worker = fw.worker(s.storage)
    running = asyncio.create_task(worker.run(install_signal_handlers=False))
    try:
        saga_id = await _submit(s)
        await s.wait_for("hold")
        live = worker.liveness
        assert live is not None
        assert live.live
        first = worker.owner
        session_id = (await live._session.execute(sa.text(_SESSION_ID[backend]))).scalar()
        async with s.storage.engine.connect() as conn:
            await conn.execute(sa.text(_KILL[backend].format(int(session_id))))
        while live.losses == 0:  # noqa: ASYNC110 (a counter, not an event)
            await asyncio.sleep(0.02)
        await s.wait_for("hold", 2)  # cut off, claimed again: the step starts over
        (s.dir / "go").write_text("")
        final = await s.outcome(saga_id)
    finally:
        worker.stop()
        await running
    assert final.status is SagaStatus.COMPLETED
    assert worker.owner != first
    assert first.startswith("~")
    lost = [o for o in worker.outcomes if isinstance(o.error, SagaLeaseLostError)]
    assert [o.saga_id for o in lost] == [saga_id]
    assert s.marks("finish") == [str(os.getpid())]
