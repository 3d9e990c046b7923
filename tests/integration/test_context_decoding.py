"""A stored context with a key the context type does not have, on the SQL storages: recovery
raises SagaSerializationError naming the fields, runs nothing and changes nothing stored."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sagakit import SagaSerializationError, SagaStatus, recover_saga
from tests.unit.support import Crash, Ctx, Script, ThreeStepSaga, drive, transaction


async def test_recovery_refuses_a_context_with_an_unknown_key(sql_storage: Any) -> None:
    script, saga_id = Script(), uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, sql_storage, saga_id=saga_id))
    await sql_storage.update_context(saga_id, {"orderId": "o-1", "trail": ["StepA"]})
    logged = await sql_storage.get_step_history(saga_id)

    with pytest.raises(SagaSerializationError) as raised:
        await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, sql_storage)
    assert "['orderId']" in str(raised.value)
    assert "['order_id']" in str(raised.value)
    row = await sql_storage.get_saga(saga_id)
    assert row.status is SagaStatus.RUNNING
    assert row.context == {"orderId": "o-1", "trail": ["StepA"]}
    assert await sql_storage.get_step_history(saga_id) == logged
    assert script.acts() == ["StepA", "StepB"]
    # Backed off like a failed attempt: not listed again at once (a worker would claim it at
    # every poll until its attempts ran out).
    assert row.next_attempt_at is not None
    assert saga_id not in await sql_storage.get_sagas_for_recovery(10)
