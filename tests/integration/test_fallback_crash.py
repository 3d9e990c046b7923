"""A real crash inside a fallback step: a process runs the saga, its primary charges the card
and the process SIGKILLs itself before the step's checkpoint. Recovery, in this process against
the same database, finds the primary's gateway down: the primary's charge must be refunded
before the backup charges, and the backup must charge exactly once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from sagakit import SagaStatus, recover_saga
from tests.conftest import TABLES
from tests.integration.fallback_crash import Behaviour, Ledger, Payment, PaymentSaga

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def main_gateway_down() -> Any:
    Behaviour.main_down = True
    yield
    Behaviour.main_down = False


async def test_a_primary_killed_after_charging_is_refunded_before_the_backup_charges(
    sql_storage: Any, tmp_path: Path, main_gateway_down: None
) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    saga_id = uuid.uuid4()
    url = sql_storage.engine.url.render_as_string(hide_password=False)
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.integration.fallback_crash", url,
         TABLES["executions_table"], TABLES["logs_table"], ledger.path, str(saga_id)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert child.returncode == -9, child.stderr  # SIGKILLed by its own primary
    assert ledger.charges() == [("main", False)]
    row = await sql_storage.get_saga(saga_id)
    assert row.status is SagaStatus.RUNNING
    log = [(e.step_name, e.status.value) for e in await sql_storage.get_step_history(saga_id)]
    assert log == [("Reserve", "COMPLETED")]  # nothing of the fallback step was checkpointed

    for _ in range(600):  # the dead process's lease runs out (1 s)
        if saga_id in await sql_storage.get_sagas_for_recovery(limit=100):
            break
        await asyncio.sleep(0.05)
    status = await recover_saga(PaymentSaga, saga_id, Payment, None, sql_storage,
                                compensation_retry_delay=0.0)
    assert status is SagaStatus.COMPLETED
    assert ledger.charges() == [("main", True), ("backup", False)]
    assert ledger.calls() == [
        ("charge", "main"), ("charge", "main"), ("refund", "main"), ("charge", "backup"),
    ]
    log = [(e.step_name, e.action.value, e.status.value)
           for e in await sql_storage.get_step_history(saga_id)]
    assert log == [
        ("Reserve", "act", "COMPLETED"),
        ("ChargeCard", "compensate", "STARTED"),
        ("ChargeCard", "act", "FAILED"),
        ("ChargeCard", "compensate", "COMPENSATED"),
        ("ChargeBackup", "act", "COMPLETED"),
    ]
