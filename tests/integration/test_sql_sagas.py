"""Sagas end to end on SQLite, PostgreSQL and MariaDB: costs, resumes, recovery, concurrency."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from sagakit import SagaBusyError, SagaMap, SagaStatus, bootstrap, recover_saga
from sagakit.records import SagaStepStatus
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import TABLES
from tests.integration.sagas import OrderContext, OrderSaga, Recorder
from tests.integration.sqlcount import SqlCounter

pytestmark = pytest.mark.integration

N_STEPS = len(OrderSaga.steps)


@pytest.fixture(autouse=True)
def _reset_recorder() -> None:
    Recorder.reset()


def _mediator(storage: Any) -> Any:
    def mapper(m: SagaMap) -> None:
        m.bind(OrderContext, OrderSaga)

    return bootstrap(sagas_mapper=mapper, saga_storage=storage, compensation_retry_delay=0)


def _statements_per_checkpoint(storage: SqlAlchemySagaStorage) -> int:
    # PostgreSQL: one CTE statement; MySQL/SQLite: UPDATE + INSERT of the log entry.
    return 1 if storage.dialect.is_postgres else 2


async def test_happy_path_costs_n_plus_one_transactions(sql_storage: Any) -> None:
    counter = SqlCounter(sql_storage.engine)
    try:
        results = [r async for r in _mediator(sql_storage).stream(OrderContext("o-1"))]
    finally:
        await counter.aclose()
    assert len(results) == N_STEPS
    assert counter.counts.transactions == N_STEPS + 1
    assert counter.counts.reads == 0
    per = _statements_per_checkpoint(sql_storage)
    assert counter.counts.statements == 1 + N_STEPS * per
    state = await sql_storage.get_saga(results[0].saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.version == N_STEPS + 1
    assert state.lease_owner is None


async def test_failure_after_k_steps_costs_2k_plus_2_transactions(sql_storage: Any) -> None:
    k = 3
    Recorder.fail = {OrderSaga.steps[k].__name__}
    counter = SqlCounter(sql_storage.engine)
    saga_id = uuid.uuid4()
    try:
        with pytest.raises(RuntimeError, match="failed"):
            async for _ in _mediator(sql_storage).stream(OrderContext("o-2"), saga_id=saga_id):
                pass
    finally:
        await counter.aclose()
    assert counter.counts.transactions == 2 * k + 2
    assert counter.counts.reads == 0
    state = await sql_storage.get_saga(saga_id)
    assert state.status is SagaStatus.FAILED
    assert state.context["done"] == []
    history = await sql_storage.get_step_history(saga_id)
    assert [(e.step_name, e.action.value, e.status.value) for e in history] == [
        ("Reserve", "act", "COMPLETED"),
        ("Charge", "act", "COMPLETED"),
        ("Ship", "act", "COMPLETED"),
        ("Notify", "act", "FAILED"),
        ("Ship", "compensate", "COMPENSATED"),
        ("Charge", "compensate", "COMPENSATED"),
        ("Reserve", "compensate", "COMPENSATED"),
    ]


async def _checkpoint_cost(storage: Any, write: Any) -> tuple[int, int, int, int]:
    """(transactions, statements, reads, round trips) of the checkpoint ``write()`` commits."""
    counter = SqlCounter(storage.engine)
    try:
        await write()
    finally:
        await counter.aclose()
    counts = counter.counts
    return counts.transactions, counts.statements, counts.reads, counts.round_trips


async def test_forward_recovery_checkpoints_cost_what_a_plain_one_does(sql_storage: Any) -> None:
    """A failed attempt (its RETRYING entry and the wait, in the process or durable), and the
    pivot's checkpoint, cost one write each, exactly as a plain step checkpoint: the same
    transactions, statements and round trips (none of them reads)."""
    async with sql_storage.create_run() as run:
        saga_id = uuid.uuid4()
        await run.start(saga_id, "OrderSaga", {"n": 0}, fingerprint=None, lease_seconds=30,
                        deadline_seconds=60)

        async def checkpoint(*options: str, n: int) -> None:
            status = SagaStepStatus.RETRYING if "wait" in options else SagaStepStatus.COMPLETED
            await run.log_step(saga_id, f"Step{n}", "act", status, None if n == 0 else "boom",
                               error_type=None if n == 0 else "x.E",
                               attempt=None if n == 0 else n)
            await run.update_context(saga_id, {"n": n})
            if "wait" in options:
                await run.wait(saga_id, 30, release="release" in options)
            if "pivot" in options:
                await run.pivot(saga_id)
            if "clear" in options:
                await run.clear_wait(saga_id)
            await run.commit()

        plain = await _checkpoint_cost(sql_storage, lambda: checkpoint(n=0))
        assert plain[0] == 1  # one transaction
        assert plain[2] == 0  # no reads
        for n, options in enumerate([("wait",), ("clear", "pivot"), ("wait", "release")], 1):
            cost = await _checkpoint_cost(sql_storage, lambda o=options, n=n: checkpoint(*o, n=n))
            assert cost == plain, options
    state = await sql_storage.get_saga(saga_id)
    assert (state.status, state.past_pivot, state.lease_owner) == (SagaStatus.WAITING, True, None)
    assert [e.attempt for e in await sql_storage.get_step_history(saga_id)] == [None, 1, 2, 3]


async def test_resume_after_break_runs_only_the_rest(sql_storage: Any) -> None:
    mediator = _mediator(sql_storage)
    saga_id = uuid.uuid4()
    stream = mediator.stream(OrderContext("o-3"), saga_id=saga_id)
    async for result in stream:
        if result.step_name == "Charge":
            break
    await stream.aclose()
    state = await sql_storage.get_saga(saga_id)
    assert state.status is SagaStatus.RUNNING
    assert state.lease_owner is None  # released when the iteration was closed
    rest = [r.step_name async for r in mediator.stream(OrderContext("ignored"), saga_id=saga_id)]
    assert rest == ["Ship", "Notify", "Invoice"]
    assert Recorder.calls.count("act:Reserve") == 1
    state = await sql_storage.get_saga(saga_id)
    assert state.status is SagaStatus.COMPLETED
    assert state.context["order_id"] == "o-3"  # the stored context, not the new argument
    assert state.context["done"] == ["Reserve", "Charge", "Ship", "Notify", "Invoice"]


async def test_a_second_storage_instance_recovers_the_saga(sql_storage: Any) -> None:
    saga_id = uuid.uuid4()
    stream = _mediator(sql_storage).stream(OrderContext("o-4"), saga_id=saga_id)
    async for _ in stream:
        break
    await stream.aclose()
    other = SqlAlchemySagaStorage.from_url(
        sql_storage.engine.url.render_as_string(hide_password=False), **TABLES
    )
    try:
        assert await other.get_sagas_for_recovery(10) == [saga_id]
        status = await recover_saga(OrderSaga(), saga_id, OrderContext, None, other)
        assert status is SagaStatus.COMPLETED
    finally:
        await other.close()
    assert Recorder.calls == [f"act:{s.__name__}" for s in OrderSaga.steps]
    assert (await sql_storage.get_saga(saga_id)).status is SagaStatus.COMPLETED


async def test_concurrent_sagas_finish_without_deadlock(sql_storage: Any) -> None:
    mediator = _mediator(sql_storage)
    Recorder.fail = set()

    async def one(i: int) -> list[str]:
        return [r.step_name async for r in mediator.stream(OrderContext(f"c-{i}"))]

    results = await asyncio.gather(*(one(i) for i in range(40)))
    assert all(len(r) == N_STEPS for r in results)
    done = await sql_storage.list_sagas(statuses=frozenset({SagaStatus.COMPLETED}), limit=100)
    assert len(done) == 40


async def test_a_second_start_of_a_live_saga_is_busy_and_writes_nothing(sql_storage: Any) -> None:
    mediator = _mediator(sql_storage)
    saga_id = uuid.uuid4()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        entered.set()
        await release.wait()

    Recorder.hooks["Charge"] = hold
    first = asyncio.create_task(_drain(mediator.stream(OrderContext("b-1"), saga_id=saga_id)))
    await entered.wait()
    before = await sql_storage.get_saga(saga_id)
    history_before = await sql_storage.get_step_history(saga_id)
    with pytest.raises(SagaBusyError) as info:
        await _drain(mediator.stream(OrderContext("b-2"), saga_id=saga_id))
    assert info.value.saga_id == saga_id
    assert await sql_storage.get_saga(saga_id) == before
    assert await sql_storage.get_step_history(saga_id) == history_before
    release.set()
    assert len(await first) == N_STEPS


async def _drain(stream: Any) -> list[Any]:
    return [r async for r in stream]


class Blip(ConnectionError):
    pass


async def test_a_failed_attempt_that_is_retried_costs_one_transaction(sql_storage: Any) -> None:
    from sagakit import Retry, Saga, Step

    class RetriedOrderSaga(Saga[OrderContext]):
        steps = [*OrderSaga.steps[:2], Step(OrderSaga.steps[2], retry=Retry(attempts=3, delay=0)),
                 *OrderSaga.steps[3:]]

    failures = [Blip("courier blip"), Blip("courier blip")]

    async def flaky() -> None:
        if failures:
            raise failures.pop()

    Recorder.hooks["Ship"] = flaky
    counter = SqlCounter(sql_storage.engine)
    saga_id = uuid.uuid4()
    try:
        status = await RetriedOrderSaga().transaction(
            context=OrderContext("o-r"), storage=sql_storage, saga_id=saga_id).run()
    finally:
        await counter.aclose()
    assert status is SagaStatus.COMPLETED
    assert counter.counts.transactions == N_STEPS + 1 + 2  # one more per failed attempt
    assert counter.counts.reads == 0
    history = await sql_storage.get_step_history(saga_id)
    assert [(e.step_name, e.status, e.attempt) for e in history][2:5] == [
        ("Ship", SagaStepStatus.RETRYING, 1), ("Ship", SagaStepStatus.RETRYING, 2),
        ("Ship", SagaStepStatus.COMPLETED, 3)]
