"""Several recovery workers on one database, in one process: SQLite, PostgreSQL and MariaDB.

Each worker has its own storage (its own engine and connection pool), as separate processes
would. Steps record which worker ran them, so the tests can tell that every interrupted saga was
recovered exactly once, by one worker at a time, and that a run whose lease was taken over
while it stalled writes nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest

from sagakit import (
    RecoveryOptions,
    RecoveryWorker,
    Saga,
    SagaContext,
    SagaLeaseLostError,
    SagaStatus,
    SagaStepHandler,
    SagaTransaction,
    current_invocation,
)
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import TABLES
from tests.contract.conftest import make_storage
from tests.integration.conftest import SQL_BACKENDS

pytestmark = pytest.mark.integration

STEPS = ["Reserve", "Charge", "Ship", "Notify", "Invoice"]
UNFINISHED = frozenset({SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING})


class Interrupt(BaseException):
    """Stands for the process dying inside a step: the saga stays at its last checkpoint."""


@dataclasses.dataclass
class WorkContext(SagaContext):
    key: str
    interrupt_act: int | None = None
    fail_step: int | None = None
    interrupt_comp: int | None = None
    done: list[str] = dataclasses.field(default_factory=list)


class Tracker:
    """What the steps did: calls per (saga, step, action, phase), who ran them, overlaps."""

    phase = "seed"
    calls: Counter[tuple[uuid.UUID, str, str, str]] = Counter()
    runners: dict[uuid.UUID, set[str]] = defaultdict(set)
    inside: dict[uuid.UUID, str] = {}
    overlaps: list[str] = []
    hooks: dict[str, Callable[[str], Awaitable[None]]] = {}

    @classmethod
    def reset(cls) -> None:
        cls.phase = "seed"
        cls.calls = Counter()
        cls.runners = defaultdict(set)
        cls.inside = {}
        cls.overlaps = []
        cls.hooks = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def enter(cls, saga_id: uuid.UUID, label: str, what: str) -> AsyncIterator[None]:
        other = cls.inside.get(saga_id)
        if other is not None:
            cls.overlaps.append(f"{label} entered {what} of {saga_id} while {other} was inside")
        cls.inside[saga_id] = label
        try:
            yield
        finally:
            if cls.inside.get(saga_id) == label:
                del cls.inside[saga_id]


class _Step(SagaStepHandler[WorkContext, str]):
    index: ClassVar[int] = 0

    def __init__(self, label: str = "transaction") -> None:
        self.label = label

    async def act(self, context: WorkContext) -> str:
        invocation = current_invocation()
        assert invocation is not None
        sid, name = invocation.saga_id, type(self).__name__
        async with Tracker.enter(sid, self.label, f"act {name}"):
            Tracker.calls[(sid, name, "act", Tracker.phase)] += 1
            if Tracker.phase == "recover":
                Tracker.runners[sid].add(self.label)
            hook = Tracker.hooks.get(name)
            if hook is not None:
                await hook(self.label)
            await asyncio.sleep(random.uniform(0, 0.005))
            if Tracker.phase == "seed" and context.interrupt_act == self.index:
                raise Interrupt
            if context.fail_step == self.index:
                raise RuntimeError(f"{name} failed")
            context.done.append(name)
        return name

    async def compensate(self, context: WorkContext) -> None:
        invocation = current_invocation()
        assert invocation is not None
        sid, name = invocation.saga_id, type(self).__name__
        async with Tracker.enter(sid, self.label, f"compensate {name}"):
            Tracker.calls[(sid, name, "compensate", Tracker.phase)] += 1
            if Tracker.phase == "recover":
                Tracker.runners[sid].add(self.label)
            await asyncio.sleep(random.uniform(0, 0.005))
            if Tracker.phase == "seed" and context.interrupt_comp == self.index:
                raise Interrupt
            context.done.remove(name)


class Reserve(_Step):
    index = 0


class Charge(_Step):
    index = 1


class Ship(_Step):
    index = 2


class Notify(_Step):
    index = 3


class Invoice(_Step):
    index = 4


class WorkSaga(Saga[WorkContext]):
    steps = [Reserve, Charge, Ship, Notify, Invoice]


def _labelled(label: str) -> Callable[[type[Any]], Any]:
    return lambda handler_type: handler_type(label)


@pytest.fixture(autouse=True)
def _reset_tracker() -> None:
    Tracker.reset()


@pytest.fixture(params=SQL_BACKENDS)
async def storages(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[list[Any]]:
    """Five storages on one database, each with its own engine: [the seeder's, 4 workers']."""
    primary = await make_storage(request.param, tmp_path)
    url = primary.engine.url.render_as_string(hide_password=False)
    others = [SqlAlchemySagaStorage.from_url(url, **TABLES) for _ in range(4)]
    try:
        yield [primary, *others]
    finally:
        for storage in [primary, *others]:
            await storage.close()


def _backlog_plan(n: int) -> list[WorkContext]:
    plans = []
    for i in range(n):
        if i % 3 == 2:  # fails at f, interrupted while compensating step c < f
            f = 2 + (i // 3) % 3
            plans.append(WorkContext(f"b{i}", fail_step=f, interrupt_comp=(i // 9) % f))
        else:
            plans.append(WorkContext(f"b{i}", interrupt_act=i % len(STEPS)))
    return plans


async def _seed(storage: Any, plans: list[WorkContext]) -> dict[uuid.UUID, WorkContext]:
    sagas: dict[uuid.UUID, WorkContext] = {}

    async def one(plan: WorkContext) -> None:
        transaction = SagaTransaction(saga=WorkSaga(), context=plan, storage=storage,
                                      compensation_retry_delay=0.0)
        sagas[transaction.saga_id] = dataclasses.replace(plan, done=[])
        with pytest.raises(Interrupt):
            await transaction.run()

    for start in range(0, len(plans), 10):
        await asyncio.gather(*(one(p) for p in plans[start:start + 10]))
    return sagas


async def _eventually(predicate: Callable[[], Awaitable[bool]], seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


async def _run_workers(workers: list[RecoveryWorker], storage: Any, seconds: float) -> None:
    tasks = [asyncio.create_task(w.run(install_signal_handlers=False)) for w in workers]

    async def all_finished() -> bool:
        return not await storage.list_sagas(statuses=UNFINISHED, limit=1)

    try:
        await _eventually(all_finished, seconds)
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*tasks)


async def test_many_workers_recover_a_backlog_each_saga_once_and_one_at_a_time(
    storages: list[Any],
) -> None:
    primary, *worker_storages = storages
    sagas = await _seed(primary, _backlog_plan(50))
    assert len(await primary.list_sagas(statuses=UNFINISHED, limit=100)) == 50

    Tracker.phase = "recover"
    options = RecoveryOptions(lease_seconds=10.0, backoff=0.0)
    workers = [
        RecoveryWorker(s, [WorkSaga], _labelled(f"w{i}"), concurrency=4, poll_interval=0.02,
                       options=options)
        for i, s in enumerate(worker_storages)
    ]
    await _run_workers(workers, primary, seconds=90)

    assert Tracker.overlaps == []
    for saga_id, plan in sagas.items():
        state = await primary.get_saga(saga_id)
        recovered = {name: {action: Tracker.calls[(saga_id, name, action, "recover")]
                            for action in ("act", "compensate")} for name in STEPS}
        if plan.fail_step is None:
            assert state.status is SagaStatus.COMPLETED, plan
            assert state.context["done"] == STEPS
            k = plan.interrupt_act
            assert k is not None
            expected = {n: {"act": int(i >= k), "compensate": 0} for i, n in enumerate(STEPS)}
        else:
            assert state.status is SagaStatus.FAILED, plan
            assert state.context["done"] == []
            c = plan.interrupt_comp
            assert c is not None
            expected = {n: {"act": 0, "compensate": int(i <= c)} for i, n in enumerate(STEPS)}
        assert recovered == expected, (plan, recovered)  # every remaining call exactly once
        assert len(Tracker.runners[saga_id]) == 1, (plan, Tracker.runners[saga_id])
        assert state.recovery_attempts == 1, plan  # claimed once: nobody else got it
        assert state.lease_owner is None
    recovering = {label for labels in Tracker.runners.values() for label in labels}
    assert len(recovering) >= 2, "the backlog was expected to be shared between workers"
    finished = Counter(o.saga_id for w in workers for o in w.outcomes
                       if o.status in (SagaStatus.COMPLETED, SagaStatus.FAILED))
    assert set(finished) == set(sagas)
    assert not [o for w in workers for o in w.outcomes if o.error is not None and not o.busy]


@pytest.mark.parametrize("wakes", ["after the takeover finished", "during the takeover"])
async def test_a_stalled_run_loses_its_lease_and_writes_nothing_more(
    storages: list[Any], wakes: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled_storage, worker_storage = storages[0], storages[1]
    stalled_entered, wake_stalled = asyncio.Event(), asyncio.Event()
    worker_inside, let_worker_go = asyncio.Event(), asyncio.Event()

    async def ship(label: str) -> None:
        if label == "transaction":  # the stalled run: paused inside Ship past its lease
            stalled_entered.set()
            await wake_stalled.wait()

    async def notify(label: str) -> None:
        if label != "transaction" and wakes == "during the takeover":
            worker_inside.set()
            await let_worker_go.wait()

    Tracker.hooks.update(Ship=ship, Notify=notify)
    transaction = SagaTransaction(saga=WorkSaga(), context=WorkContext("stall"),
                                  storage=stalled_storage, lease_seconds=1.0)
    stalled = asyncio.create_task(transaction.run())
    async with asyncio.timeout(10):
        await stalled_entered.wait()
    assert transaction.execution is not None

    async def paused(lease_seconds: float) -> None:
        """A paused process renews nothing."""

    monkeypatch.setattr(transaction.execution.run, "renew_lease", paused)
    async def listed() -> bool:  # the lease expired: the saga is due for recovery
        return transaction.saga_id in await worker_storage.get_sagas_for_recovery(10)

    await _eventually(listed, 10)

    worker = RecoveryWorker(worker_storage, [WorkSaga], _labelled("w"),
                            options=RecoveryOptions(lease_seconds=10.0, backoff=0.0))
    recovery = asyncio.create_task(worker.recover(transaction.saga_id))
    async with asyncio.timeout(20):
        if wakes == "during the takeover":
            await worker_inside.wait()
        else:
            assert (await recovery).status is SagaStatus.COMPLETED
    before = await stalled_storage.get_saga(transaction.saga_id)
    history = await stalled_storage.get_step_history(transaction.saga_id)

    wake_stalled.set()
    with pytest.raises(SagaLeaseLostError):
        await asyncio.wait_for(stalled, 20)
    after = await stalled_storage.get_saga(transaction.saga_id)
    assert after == before  # not a field changed: no checkpoint, no release of the new lease
    assert await stalled_storage.get_step_history(transaction.saga_id) == history

    let_worker_go.set()
    outcome = await asyncio.wait_for(recovery, 20)
    assert outcome.status is SagaStatus.COMPLETED
    final = await stalled_storage.get_saga(transaction.saga_id)
    assert final.context["done"] == STEPS
    log = [(e.step_name, e.action.value, e.status.value)
           for e in await stalled_storage.get_step_history(transaction.saga_id)]
    assert log == [(name, "act", "COMPLETED") for name in STEPS]  # Ship logged once
    sid = transaction.saga_id
    assert Tracker.calls[(sid, "Ship", "act", "seed")] == 2  # stalled run + takeover
    assert [Tracker.calls[(sid, n, "act", "seed")] for n in ("Notify", "Invoice")] == [1, 1]
