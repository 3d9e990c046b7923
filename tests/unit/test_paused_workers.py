"""Paused workers: the fencing token steps send downstream, and the lease keeper cutting off the
step in flight once the run's lease is lost or may have run out.

A run's token is the saga's version when it took its lease (1 for a new saga); every takeover
is a claim, which writes a new version, so the token grows at every takeover and never within a
run. A step cut off by the keeper sees ``asyncio.CancelledError``; its caller gets
``SagaLeaseLostError`` and the run writes nothing more (the new owner owns the saga) and
compensates nothing. A cancellation from outside stays a cancellation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest

from sagakit import (
    Fallback,
    MemorySagaStorage,
    RecoveryOptions,
    RecoveryWorker,
    Saga,
    SagaContext,
    SagaLeaseLostError,
    SagaStatus,
    SagaStepHandler,
    StepInvocation,
    recover_saga,
)
from sagakit.storage.memory import _MemoryRun
from tests.unit.support import Gate, Script, ThreeStepSaga, history, transaction


class Clock:
    """The storage's clock (lease expiry); the keeper's own timing stays real."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Tokens:
    """A middleware recording (run label, step, action, token) of every invocation."""

    def __init__(self, label: str, into: list[tuple[str, str, str, int]]) -> None:
        self.label = label
        self.seen = into

    async def __call__(self, invocation: StepInvocation, call_next: Any) -> Any:
        self.seen.append((self.label, invocation.step_name, invocation.action.value,
                          invocation.fencing_token))
        return await call_next(invocation)


def step_tokens(script: Script, into: list[tuple[str, str, int]], *steps: str) -> None:
    """Hooks recording what the step itself reads: (step, action, self.fencing_token)."""
    for step in steps:
        for action in ("act", "compensate"):
            async def record(handler: Any, _context: Any, step: str = step,
                             action: str = action) -> None:
                into.append((step, action, handler.fencing_token))
            script.hook(step, action, record)


class Forever:
    """A hook that never returns by itself: it records being entered and how it ended."""

    def __init__(self, *, swallow: bool = False, cancel_own_task: bool = False) -> None:
        self.entered = asyncio.Event()
        self.ended: list[str] = []
        self.swallow = swallow
        self.cancel_own_task = cancel_own_task

    async def __call__(self, handler: Any, context: Any) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            if self.cancel_own_task:  # an outside cancellation arrives at the same moment
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            if self.swallow:
                return
            raise


class SeedStorage:
    """A memory storage seen through the seed's commit-per-call protocol only: no runs, no
    leases (sagakit wraps it in a CommitPerCallRun)."""

    def __init__(self) -> None:
        self.inner = MemorySagaStorage()

    def __getattr__(self, name: str) -> Any:
        if name in ("create_run", "claim_due"):
            raise AttributeError(name)
        return getattr(self.inner, name)


@pytest.fixture
def renewals_hang(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Every lease renewal of a memory run hangs (a database lock, a cut-off network): the
    lease runs out while the run is alive. The event is set at the first renewal."""
    stalled = asyncio.Event()

    async def hangs(self: object, lease_seconds: float) -> None:
        stalled.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(_MemoryRun, "renew_lease", hangs)
    return stalled


# -- the token --------------------------------------------------------------------------------


async def test_a_new_saga_runs_with_token_1_in_every_act_and_compensation() -> None:
    storage, script = MemorySagaStorage(), Script()
    seen: list[tuple[str, str, str, int]] = []
    read: list[tuple[str, str, int]] = []
    step_tokens(script, read, "StepA", "StepB", "StepC")
    script.fail("StepC", "act", RuntimeError("boom"))
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                      middlewares=[Tokens("first", seen)])
    with pytest.raises(RuntimeError, match="boom"):
        await txn.run()
    assert read == [("StepA", "act", 1), ("StepB", "act", 1), ("StepC", "act", 1),
                    ("StepB", "compensate", 1), ("StepA", "compensate", 1)]
    assert seen == [("first", *entry) for entry in read]  # middleware sees the same token
    # Five checkpoints moved the saga's version on; the run's token stayed what it was.
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.FAILED
    assert state.version == 6


async def test_each_takeover_runs_with_a_larger_token_than_every_run_before_it() -> None:
    """Run 1 (a transaction) and run 2 (recover_saga) are paused in StepB past their leases;
    run 3 (a worker: claim_due, then adopt) finishes the saga. Each takeover's token is the
    version its claim wrote, larger than any before; the paused runs keep theirs."""
    clock = Clock()
    storage, script = MemorySagaStorage(clock=clock), Script()
    seen: list[tuple[str, str, str, int]] = []
    versions_at_start: list[int] = []
    saga_id = uuid.uuid4()
    gates = [Gate(), Gate()]

    async def pause_then_note(handler: Any, context: Any) -> None:
        versions_at_start.append((await storage.get_saga(saga_id)).version)
        if len(versions_at_start) <= len(gates):
            await gates[len(versions_at_start) - 1](handler, context)

    script.hook("StepB", "act", pause_then_note)
    first = asyncio.create_task(transaction(
        ThreeStepSaga(), script, storage, saga_id=saga_id, middlewares=[Tokens("run 1", seen)],
    ).run())
    await gates[0].entered.wait()
    clock.now += 31  # run 1's lease runs out (on the storage's clock) while it is paused
    second = asyncio.create_task(recover_saga(
        ThreeStepSaga, saga_id, container=script.container, storage=storage,
        middlewares=[Tokens("run 2", seen)],
    ))
    await gates[1].entered.wait()
    clock.now += 31
    worker = RecoveryWorker(storage, [ThreeStepSaga], container=script.container,
                            options=RecoveryOptions(middlewares=[Tokens("run 3", seen)]))
    [outcome] = await worker.run_once()
    assert outcome.status is SagaStatus.COMPLETED

    for gate in gates:
        gate.release.set()
    for paused in (first, second):
        with pytest.raises(SagaLeaseLostError):
            await paused  # each paused run's checkpoint is fenced out

    tokens = {label: token for label, _step, _action, token in seen}
    # start wrote 1, StepA's checkpoint 2; run 2's claim wrote 3, run 3's claim_due 4.
    assert tokens == {"run 1": 1, "run 2": 3, "run 3": 4}
    assert versions_at_start == [2, 3, 4]  # run 2 and 3 reach StepB first: token == version
    assert [(label, step) for label, step, *_ in seen] == [
        ("run 1", "StepA"), ("run 1", "StepB"), ("run 2", "StepB"), ("run 3", "StepB"),
        ("run 3", "StepC")]


async def test_fencing_token_is_only_available_while_a_step_runs() -> None:
    handler = _Plain()
    with pytest.raises(RuntimeError, match="fencing_token"):
        _ = handler.fencing_token


class _Plain(SagaStepHandler[Any, None]):
    async def act(self, context: Any) -> None: ...

    async def compensate(self, context: Any) -> None: ...


async def test_a_commit_per_call_storage_gives_the_version_the_run_began_with() -> None:
    """No leases there: the token is the version after the run created the saga, or after
    recovery counted its attempt (a write), so a later run's is still larger."""
    storage, script = SeedStorage(), Script()
    read: list[tuple[str, str, int]] = []
    step_tokens(script, read, "StepA", "StepB", "StepC")
    saga_id = uuid.uuid4()
    async with transaction(ThreeStepSaga(), script, storage, saga_id=saga_id) as txn:
        async for result in txn:
            if result.step_name == "StepA":
                break  # the saga rests after StepA
    first = (await storage.inner.get_saga(saga_id)).version
    status = await recover_saga(ThreeStepSaga, saga_id, container=script.container,
                                storage=storage)
    assert status is SagaStatus.COMPLETED
    tokens = [token for _step, _action, token in read]
    assert tokens[0] == 2  # create_saga wrote 1, the RUNNING status 2
    assert tokens[1] == tokens[2] == first + 1  # the recovery's counted attempt
    assert tokens[1] > tokens[0]


# -- cutting off the step in flight -------------------------------------------------------------


async def test_a_renewal_that_finds_another_owner_cancels_the_act_in_flight() -> None:
    clock = Clock()
    storage, script = MemorySagaStorage(clock=clock), Script()
    stuck = Forever()
    script.hook("StepB", "act", stuck)
    saga_id = uuid.uuid4()
    running = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.6).run())
    await stuck.entered.wait()
    clock.now += 1  # on the storage's clock the lease ran out: another worker claims the saga
    [claimed] = await storage.claim_due("another-worker", limit=1, lease_seconds=60)
    taken_over = await storage.get_saga(saga_id)
    log = await history(storage, saga_id)

    with pytest.raises(SagaLeaseLostError) as caught:
        await running  # the run's next renewal finds the other owner and cuts StepB off
    assert stuck.ended == ["cancelled"]
    error = caught.value
    assert (error.saga_id, error.step_name, error.saga_name) == (saga_id, "StepB", "ThreeStepSaga")
    assert "act of step 'StepB' was cancelled" in str(error)
    assert isinstance(error.__cause__, SagaLeaseLostError)  # the renewal's finding
    assert "another-worker" in str(error.__cause__)
    assert script.compensations() == []
    assert await storage.get_saga(saga_id) == taken_over  # nothing written, lease untouched
    assert await history(storage, saga_id) == log == [("StepA", "act", "COMPLETED")]
    assert claimed.lease_owner == "another-worker"


async def test_a_lease_that_may_have_run_out_cancels_the_act_in_flight(
    renewals_hang: asyncio.Event,
) -> None:
    storage, script = MemorySagaStorage(), Script()
    stuck = Forever()
    script.hook("StepB", "act", stuck)
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.3)
    with pytest.raises(SagaLeaseLostError, match="may have run out") as caught:
        await txn.run()  # in this task: the keeper cancels the test's own task, and withdraws it
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    assert renewals_hang.is_set()
    assert stuck.ended == ["cancelled"]
    assert caught.value.step_name == "StepB"
    assert script.compensations() == []
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.RUNNING
    assert state.version == 2
    assert state.lease_owner is None  # given up on the way out: recovery may take it now
    assert await history(storage, saga_id) == [("StepA", "act", "COMPLETED")]
    assert txn.status is SagaStatus.RUNNING


async def test_a_compensation_in_flight_is_cut_off_the_same_way(
    renewals_hang: asyncio.Event,
) -> None:
    storage, script = MemorySagaStorage(), Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    stuck = Forever()
    script.hook("StepB", "compensate", stuck)
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.3,
                      compensation_retry_count=5)
    with pytest.raises(SagaLeaseLostError, match="compensation of step 'StepB'"):
        await txn.run()
    assert stuck.ended == ["cancelled"]
    assert script.compensations() == ["StepB"]  # not retried, and StepA not compensated
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.COMPENSATING
    assert state.lease_owner is None
    assert await history(storage, saga_id) == [
        ("StepA", "act", "COMPLETED"), ("StepB", "act", "COMPLETED"), ("StepC", "act", "FAILED")]


async def test_a_step_that_swallows_the_cancellation_still_ends_the_run(
    renewals_hang: asyncio.Event,
) -> None:
    storage, script = MemorySagaStorage(), Script()
    stuck = Forever(swallow=True)
    script.hook("StepB", "act", stuck)
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.3)
    with pytest.raises(SagaLeaseLostError):
        await txn.run()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0
    assert stuck.ended == ["cancelled"]
    assert script.acts() == ["StepA", "StepB"]  # StepC never started
    assert await history(storage, saga_id) == [("StepA", "act", "COMPLETED")]


async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    storage, script = MemorySagaStorage(), Script()
    stuck = Forever()
    script.hook("StepB", "act", stuck)
    saga_id = uuid.uuid4()
    running = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.6).run())
    await stuck.entered.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert stuck.ended == ["cancelled"]
    state = await storage.get_saga(saga_id)
    assert state.status is SagaStatus.RUNNING
    assert state.lease_owner is None
    assert script.compensations() == []


async def test_an_outside_cancellation_together_with_the_keepers_wins(
    renewals_hang: asyncio.Event,
) -> None:
    storage, script = MemorySagaStorage(), Script()
    stuck = Forever(cancel_own_task=True)
    script.hook("StepB", "act", stuck)
    saga_id = uuid.uuid4()
    running = asyncio.create_task(
        transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, lease_seconds=0.3).run())
    with pytest.raises(asyncio.CancelledError):
        await running
    assert running.cancelled()
    assert stuck.ended == ["cancelled"]
    assert await history(storage, saga_id) == [("StepA", "act", "COMPLETED")]


# -- a fallback step -----------------------------------------------------------------------------


@dataclasses.dataclass
class PayCtx(SagaContext):
    paid_by: str = ""


backup_ran: list[str] = []


class CardPayment(SagaStepHandler[PayCtx, None]):
    entered: asyncio.Event

    async def act(self, context: PayCtx) -> None:
        CardPayment.entered.set()
        await asyncio.Event().wait()

    async def compensate(self, context: PayCtx) -> None: ...


class InvoicePayment(SagaStepHandler[PayCtx, None]):
    async def act(self, context: PayCtx) -> None:
        backup_ran.append("InvoicePayment")
        context.paid_by = "invoice"

    async def compensate(self, context: PayCtx) -> None: ...


class RecordingBreaker:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def check(self, name: str) -> None:
        self.calls.append(f"check {name}")

    async def record_success(self, name: str) -> None:
        self.calls.append(f"success {name}")

    async def record_failure(self, name: str, error: BaseException) -> None:
        self.calls.append(f"failure {name}")


async def test_a_primary_cut_off_does_not_hand_over_to_its_fallback(
    renewals_hang: asyncio.Event,
) -> None:
    breaker = RecordingBreaker()
    CardPayment.entered = asyncio.Event()

    class PaySaga(Saga[PayCtx]):
        steps = [Fallback(step=CardPayment, fallback=InvoicePayment, circuit_breaker=breaker)]

    storage = MemorySagaStorage()
    saga_id = uuid.uuid4()
    backup_ran.clear()
    txn = PaySaga().transaction(context=PayCtx(), storage=storage, saga_id=saga_id,
                                lease_seconds=0.3)
    with pytest.raises(SagaLeaseLostError, match="CardPayment"):
        await txn.run()
    assert backup_ran == []
    assert breaker.calls == ["check CardPayment"]  # no verdict on the primary
    assert await storage.get_step_history(saga_id) == []
    assert (await storage.get_saga(saga_id)).status is SagaStatus.RUNNING


async def test_a_worker_logs_a_run_cut_off_by_its_lease_as_one_warning_line(
    renewals_hang: asyncio.Event, caplog: pytest.LogCaptureFixture,
) -> None:
    """In a fleet a lost lease (or liveness session) is expected: the saga is someone else's
    now. The keeper and the worker each say so in one warning line, without the traceback an
    unexpected error gets."""
    storage, script = MemorySagaStorage(), Script()
    stuck = Forever()
    script.hook("StepB", "act", stuck)
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, "ThreeStepSaga", {"order_id": "o-1", "trail": []})
    worker = RecoveryWorker(storage, [ThreeStepSaga], container=script.container,
                            options=RecoveryOptions(lease_seconds=0.3))
    with caplog.at_level("INFO", logger="sagakit"):
        outcome = await worker.recover(saga_id)
    assert isinstance(outcome.error, SagaLeaseLostError)
    assert stuck.ended == ["cancelled"]
    mine = [r for r in caplog.records if str(saga_id) in r.getMessage()]
    assert {(r.levelname, r.exc_info) for r in mine} == {("WARNING", None)}
    [stopped] = [r.getMessage() for r in mine if r.name == "sagakit.worker"]
    assert "recovery attempt stopped" in stopped
    assert "step 'StepB'" in stopped
