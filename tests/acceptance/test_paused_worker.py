"""A worker frozen with a real SIGSTOP past its lease, while another process takes its saga over
and compensates it, then continued with SIGCONT: its late call to the payment service is refused,
or never sent (the lease keeper cancels the step in flight), it writes nothing to the saga, and
the service's books balance.

The processes are :mod:`tests.acceptance.paused_worker`; the saga and the payment service are
examples/fencing_service.py's. The saga charges an order, then fails to ship it; the recovering
process (token > 1) charges, fails, and refunds. The frozen one (token 1) is stopped inside its
charge step, either in synchronous code right before the call (it sends the charge as soon as it
runs again: the service must refuse it) or in an ``await`` (the keeper cancels the step as soon
as the loop runs again: nothing is sent).
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sagakit import SagaStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.paused_worker import example
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, TABLES, server_unavailable

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
LEASE = 1.0
PATIENCE = 90.0  # generous: the machine may be busy; never asserted as a duration


async def wait_for(what: str, condition: Callable[[], Any]) -> None:
    """Poll ``condition()`` (awaited if it returns an awaitable) until it is truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def open_storage(backend: str, tmp_path: Path) -> tuple[str, SqlAlchemySagaStorage]:
    url = {"sqlite": f"sqlite+aiosqlite:///{tmp_path}/sagas.db", "postgres": POSTGRES_DSN,
           "mysql": MYSQL_DSN}[backend]
    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    try:
        await storage.create_schema()
    except OSError as exc:
        await storage.close()
        server_unavailable(backend, exc)
    return url, storage


async def freeze_outside_a_write(
    process: asyncio.subprocess.Process, backend: str, sqlite_file: Path
) -> None:
    """SIGSTOP the process, at a moment it holds no SQLite write lock: a renewal's transaction
    frozen half-way would lock every other process out of the database (a real hazard of SQLite
    shared by processes, not what this test is about). PostgreSQL writes are single autocommit
    statements: nothing is held between round trips."""
    while True:
        process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.05)  # let the stop land on every thread
        if backend != "sqlite" or not await asyncio.to_thread(write_locked, sqlite_file):
            return
        process.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.05)


def write_locked(path: Path) -> bool:
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return True
    else:
        db.execute("ROLLBACK")
        return False
    finally:
        db.close()


async def start(cmd: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def finish(process: asyncio.subprocess.Process) -> tuple[str, str]:
    out, err = await asyncio.wait_for(process.communicate(), PATIENCE)
    return out.decode(), err.decode()


def command(action: str, url: str, payments: Path, saga_id: uuid.UUID, order: str,
            *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.acceptance.paused_worker", action, "--url", url,
            "--executions", TABLES["executions_table"], "--logs", TABLES["logs_table"],
            "--payments", str(payments), "--saga-id", str(saga_id), "--order", order,
            "--lease", str(LEASE), *extra]


@pytest.mark.parametrize("freeze", ["in_call", "awaiting"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres", "mysql"])
async def test_a_worker_frozen_past_its_lease_charges_nothing_late_and_writes_nothing(
    tmp_path: Path, backend: str, freeze: str,
) -> None:
    url, storage = await open_storage(backend, tmp_path)
    payments_db = tmp_path / "payments.db"
    payments = example().PaymentService(payments_db)
    saga_id, order = uuid.uuid4(), f"order-{uuid.uuid4().hex[:8]}"
    marker, go = tmp_path / "frozen", tmp_path / "go"
    first = await start(command("run", url, payments_db, saga_id, order, "--freeze", freeze,
                                "--marker", str(marker), "--go", str(go)))
    try:
        await wait_for("the first worker to reach its charge",
                       lambda: marker.exists() or first.returncode is not None)
        assert first.returncode is None, await first.communicate()
        await freeze_outside_a_write(first, backend, tmp_path / "sagas.db")

        async def lease_ran_out() -> bool:
            due = await storage.get_sagas_for_recovery(limit=1000, saga_name="OrderSaga")
            return saga_id in due

        await wait_for("the frozen worker's lease to run out", lease_ran_out)
        second = await start(command("recover", url, payments_db, saga_id, order))
        second_out, second_err = await finish(second)
        assert second.returncode == 0, second_err
        assert "outcome: FAILED" in second_out.splitlines(), second_out + second_err
        taken_over = await storage.get_saga(saga_id), await storage.get_step_history(saga_id)

        go.write_text("go")
        first.send_signal(signal.SIGCONT)
        out, err = await finish(first)
        finally_stored = await storage.get_saga(saga_id), await storage.get_step_history(saga_id)
    finally:
        if first.returncode is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            await first.communicate()
        await storage.close()

    print(f"-- second process:\n{second_out}{second_err}-- first process:\n{out}{err}")
    assert first.returncode == 0, err
    lines = out.splitlines()
    outcome = next(line for line in lines if line.startswith("outcome: "))
    assert outcome.startswith("outcome: SagaLeaseLostError"), out + err

    # The first worker wrote nothing: the saga is exactly as the second left it.
    state, log = taken_over
    assert finally_stored == taken_over
    assert state.status is SagaStatus.FAILED
    assert state.lease_owner is None
    assert [(e.step_name, e.action.value, e.status.value) for e in log] == [
        ("ChargeCard", "act", "COMPLETED"),
        ("ShipOrder", "act", "FAILED"),
        ("ChargeCard", "compensate", "COMPENSATED"),
    ]

    requests = payments.requests(order)
    seconds = [r for r in requests if r.token > 1]
    firsts = [r for r in requests if r.token == 1]
    assert [(r.op, r.outcome) for r in seconds] == [("charge", "charged"), ("refund", "refunded")]
    assert len({r.token for r in seconds}) == 1  # one run, one token
    if freeze == "in_call":
        # It sent its charge when it ran again, after the refund: refused for its stale token.
        [late] = firsts
        assert (late.op, late.key) == ("charge", seconds[0].key)
        assert late.outcome == f"refused: stale token ({seconds[0].token} seen)"
        assert late.seq > seconds[-1].seq
        assert any(line.startswith("step: refused StaleRequest") for line in lines), out
    else:
        # Its step was cancelled before it could send anything.
        assert firsts == []
        assert "step: cancelled" in lines, out
        assert "was cancelled in flight" in outcome

    # The books balance: one charge, refunded; no refund without its charge.
    [charge] = payments.charges(order)
    assert charge.payment_id is not None
    assert not charge.standing
    assert charge.token == seconds[0].token
