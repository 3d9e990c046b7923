"""Storages with only the seed's commit-per-call protocol (create_run() raises
NotImplementedError): the orchestrator falls back to committing per call."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sagakit import (
    ISagaStorage,
    MemorySagaStorage,
    RecoveryWorker,
    SagaStatus,
    SagaStorageError,
    recover_saga,
)
from sagakit.records import SagaStepStatus
from sagakit.storage.compat import open_run
from tests.unit.support import Crash, Ctx, Script, ThreeStepSaga, drive, transaction

SEED_METHODS = (
    "create_saga",
    "update_context",
    "update_status",
    "log_step",
    "load_saga_state",
    "get_step_history",
    "get_sagas_for_recovery",
    "increment_recovery_attempts",
    "set_recovery_attempts",
)


class SeedStorage:
    """Exposes only the seed's methods of a memory storage, logging each call by name."""

    def __init__(self, *, with_get_saga: bool = True) -> None:
        self.inner = MemorySagaStorage()
        self.calls: list[str] = []
        self.create_run_calls = 0
        if with_get_saga:
            self.get_saga = self._get_saga

    def __getattr__(self, name: str) -> Any:
        if name not in SEED_METHODS:
            raise AttributeError(name)
        method = getattr(self.inner, name)

        async def logged(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return logged

    async def _get_saga(self, saga_id: uuid.UUID) -> Any:
        return await self.inner.get_saga(saga_id)

    def create_run(self) -> Any:
        self.create_run_calls += 1
        raise NotImplementedError

    def writes(self) -> list[str]:
        return [c for c in self.calls if c not in ("load_saga_state", "get_step_history")]


async def history(storage: SeedStorage, saga_id: uuid.UUID) -> list[tuple[str, str, str]]:
    entries = await storage.inner.get_step_history(saga_id)
    return [(e.step_name, e.action.value, e.status.value) for e in entries]


async def test_a_saga_runs_on_a_commit_per_call_storage():
    storage, script, saga_id = SeedStorage(), Script(), uuid.uuid4()
    results = await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert [r.step_name for r in results] == ["StepA", "StepB", "StepC"]
    assert storage.create_run_calls == 1
    row = await storage.inner.get_saga(saga_id)
    assert row.status is SagaStatus.COMPLETED
    assert row.context["trail"] == ["StepA", "StepB", "StepC"]
    assert storage.writes()[:2] == ["create_saga", "update_status"]
    assert await history(storage, saga_id) == [
        ("StepA", "act", "COMPLETED"), ("StepB", "act", "COMPLETED"), ("StepC", "act", "COMPLETED"),
    ]


async def test_each_checkpoint_writes_context_then_log_then_status():
    storage, script = SeedStorage(), Script()
    await drive(transaction(ThreeStepSaga(), script, storage))
    assert storage.writes()[2:] == [
        "update_context", "log_step",
        "update_context", "log_step",
        "update_context", "log_step", "update_status",
    ]


async def test_failure_compensates_on_a_commit_per_call_storage():
    storage, script, saga_id = SeedStorage(), Script(), uuid.uuid4()
    boom = RuntimeError("boom")
    script.fail("StepC", "act", boom)
    with pytest.raises(RuntimeError) as caught:
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert caught.value is boom
    assert script.compensations() == ["StepB", "StepA"]
    assert (await storage.inner.get_saga(saga_id)).status is SagaStatus.FAILED
    assert (await history(storage, saga_id))[2:] == [
        ("StepC", "act", "FAILED"),
        ("StepB", "compensate", "COMPENSATED"),
        ("StepA", "compensate", "COMPENSATED"),
    ]


@pytest.mark.parametrize("with_get_saga", [True, False], ids=["get_saga", "seed-only"])
async def test_recovery_on_a_commit_per_call_storage(with_get_saga):
    storage, script, saga_id = SeedStorage(with_get_saga=with_get_saga), Script(), uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert (await storage.inner.get_saga(saga_id)).status is SagaStatus.RUNNING
    status = await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage)
    assert status is SagaStatus.COMPLETED
    assert script.acts() == ["StepA", "StepB", "StepB", "StepC"]
    assert "increment_recovery_attempts" in storage.calls
    assert (await storage.inner.get_saga(saga_id)).recovery_attempts == 1


async def test_recovery_of_a_compensating_saga_on_a_commit_per_call_storage():
    storage, script, saga_id = SeedStorage(), Script(), uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail("StepA", "compensate", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert (await storage.inner.get_saga(saga_id)).status is SagaStatus.COMPENSATING
    status = await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                                compensation_retry_delay=0)
    assert status is SagaStatus.FAILED
    assert script.compensations() == ["StepB", "StepA", "StepA"]
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_a_storage_without_create_run_uses_the_same_fallback():
    class NoRun(SeedStorage):
        create_run = None  # type: ignore[assignment]

    storage, script, saga_id = NoRun(), Script(), uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert (await storage.inner.get_saga(saga_id)).status is SagaStatus.COMPLETED


async def test_starting_a_terminal_saga_on_a_commit_per_call_storage_writes_nothing():
    storage, script, saga_id = SeedStorage(), Script(), uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    storage.calls.clear()
    assert await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)) == []
    assert storage.writes() == []
    assert script.acts() == ["StepA", "StepB", "StepC"]


async def test_a_seed_storage_is_handed_plain_dicts_never_the_engines_json():
    storage, script = SeedStorage(), Script()
    seen: list[type] = []
    inner_create, inner_update = storage.inner.create_saga, storage.inner.update_context

    async def create(saga_id: uuid.UUID, name: str, context: Any) -> None:
        seen.append(type(context))
        await inner_create(saga_id, name, context)

    async def update(saga_id: uuid.UUID, context: Any, current_version: Any = None) -> None:
        seen.append(type(context))
        await inner_update(saga_id, context, current_version)

    storage.inner.create_saga = create  # type: ignore[method-assign]
    storage.inner.update_context = update  # type: ignore[method-assign]
    await drive(transaction(ThreeStepSaga(), script, storage))
    assert seen
    assert set(seen) == {dict}


class SubclassedSeedStorage(ISagaStorage):
    """A seed-style storage as users write it: a subclass of the protocol with the seed's
    methods only. It inherits the protocol's stubs of everything else (``create_run``,
    ``get_saga``, ...)."""

    def __init__(self) -> None:
        self.inner = MemorySagaStorage()

    async def create_saga(self, saga_id: uuid.UUID, name: str, context: Any) -> None:
        await self.inner.create_saga(saga_id, name, context)

    async def update_context(self, saga_id: uuid.UUID, context: Any,
                             current_version: int | None = None) -> None:
        await self.inner.update_context(saga_id, context, current_version)

    async def update_status(self, saga_id: uuid.UUID, status: SagaStatus) -> None:
        await self.inner.update_status(saga_id, status)

    async def log_step(self, saga_id: uuid.UUID, step_name: str, action: str, status: Any,
                       details: str | None = None, *, error_type: str | None = None) -> None:
        await self.inner.log_step(saga_id, step_name, action, status, details,
                                  error_type=error_type)

    async def load_saga_state(self, saga_id: uuid.UUID, *,
                              read_for_update: bool = False) -> tuple[SagaStatus, Any, int]:
        return await self.inner.load_saga_state(saga_id)

    async def get_step_history(self, saga_id: uuid.UUID) -> list[Any]:
        return await self.inner.get_step_history(saga_id)

    async def increment_recovery_attempts(self, saga_id: uuid.UUID,
                                          new_status: SagaStatus | None = None) -> None:
        await self.inner.increment_recovery_attempts(saga_id, new_status)


async def test_a_subclass_of_the_protocol_without_create_run_commits_per_call():
    storage, script, saga_id = SubclassedSeedStorage(), Script(), uuid.uuid4()
    with pytest.raises(NotImplementedError):
        storage.create_run()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail("StepA", "compensate", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert (await storage.inner.get_saga(saga_id)).status is SagaStatus.COMPENSATING

    status = await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                                compensation_retry_delay=0)
    assert status is SagaStatus.FAILED
    assert script.acts() == ["StepA", "StepB", "StepC"]
    assert script.compensations() == ["StepB", "StepA", "StepA"]
    assert (await storage.inner.get_saga(saga_id)).context["trail"] == []
    entries = await storage.inner.get_step_history(saga_id)
    assert [(e.action.value, e.status.value) for e in entries][2:] == [
        ("act", "FAILED"), ("compensate", "COMPENSATED"), ("compensate", "COMPENSATED"),
    ]


async def test_a_create_run_returning_none_counts_as_not_implemented():
    class ReturnsNone(SeedStorage):
        def create_run(self) -> Any:
            self.create_run_calls += 1
            return None

    storage, script, saga_id = ReturnsNone(), Script(), uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert storage.create_run_calls == 1
    assert (await storage.inner.get_saga(saga_id)).status is SagaStatus.COMPLETED


class ListingSeedStorage(SubclassedSeedStorage):
    """The seed protocol plus ``get_sagas_for_recovery``: what a worker needs to find sagas."""

    async def get_sagas_for_recovery(self, limit: int, max_recovery_attempts: int = 5,
                                     stale_after_seconds: float | None = None,
                                     saga_name: str | None = None) -> list[uuid.UUID]:
        return await self.inner.get_sagas_for_recovery(limit, max_recovery_attempts,
                                                       stale_after_seconds, saga_name)


async def test_a_worker_recovers_sagas_of_a_protocol_subclass_by_listing_them():
    storage, script, saga_id = ListingSeedStorage(), Script(), uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    with pytest.raises(NotImplementedError):  # inherited stubs
        await storage.claim_due("w", limit=1, lease_seconds=30)
    worker = RecoveryWorker(storage, [ThreeStepSaga], script.container, poll_interval=0.01)
    outcomes = await worker.run_once()  # claim_due is the stub: it lists instead
    assert [(o.saga_id, o.status) for o in outcomes] == [(saga_id, SagaStatus.COMPLETED)]
    assert script.acts() == ["StepA", "StepB", "StepB", "StepC"]  # StepB was cut off once


async def test_a_custom_storages_own_errors_reach_callers_as_storage_errors():
    class Down(SubclassedSeedStorage):
        async def create_saga(self, saga_id: uuid.UUID, name: str, context: Any) -> None:
            raise ConnectionError("my database is down")

    script, saga_id = Script(), uuid.uuid4()
    with pytest.raises(SagaStorageError) as raised:
        await drive(transaction(ThreeStepSaga(), script, Down(), saga_id=saga_id))
    assert raised.value.saga_id == saga_id
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert script.acts() == []


# -- forward recovery on a commit-per-call storage ----------------------------------------------


async def test_forward_recovery_writes_what_the_seed_protocol_can_keep():
    storage, saga_id = SeedStorage(), uuid.uuid4()
    async with open_run(storage) as run:
        await run.start(saga_id, "S", {"n": 0}, fingerprint=None, lease_seconds=30,
                        deadline_seconds=60)
        storage.calls.clear()
        # A wait in the process, the pivot and clear_wait write nothing of their own.
        await run.log_step(saga_id, "StepA", "act", SagaStepStatus.RETRYING, "TimeoutError",
                           error_type="builtins.TimeoutError", attempt=1)
        await run.wait(saga_id, 5, release=False)
        await run.pivot(saga_id)
        await run.commit()
        await run.clear_wait(saga_id)
        await run.commit()
        assert storage.writes() == ["log_step"]
        # A durable wait: its status, after the entry (whose attempt goes into the details).
        await run.log_step(saga_id, "StepA", "act", SagaStepStatus.RETRYING, None, attempt=2)
        await run.wait(saga_id, 600, release=True)
        await run.commit()
        assert storage.writes() == ["log_step", "log_step", "update_status"]
    state = await storage.inner.get_saga(saga_id)
    assert (state.status, state.past_pivot, state.deadline_at, state.next_attempt_at) == (
        SagaStatus.WAITING, False, None, None)
    entries = await storage.inner.get_step_history(saga_id)
    assert [(e.details, e.error_type, e.attempt) for e in entries] == [
        ("attempt 1: TimeoutError", "builtins.TimeoutError", None),
        ("attempt 2", None, None),
    ]


async def test_claiming_a_waiting_saga_on_a_commit_per_call_storage_counts_no_attempt():
    storage, saga_id = SeedStorage(), uuid.uuid4()
    await storage.inner.create_saga(saga_id, "S", {})
    await storage.inner.update_status(saga_id, SagaStatus.WAITING)
    await storage.inner.set_recovery_attempts(saga_id, 2)
    assert await storage.get_sagas_for_recovery(10) == [saga_id]  # no next_attempt_at: at once
    async with open_run(storage) as run:
        state = await run.claim(saga_id, lease_seconds=30)
    assert (state.status, state.recovery_attempts) == (SagaStatus.RUNNING, 2)
    assert "increment_recovery_attempts" not in storage.calls
