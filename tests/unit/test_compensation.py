"""Compensation: retries with backoff (asyncio.sleep is patched, never really slept) and
SagaCompensator on its own."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from sagakit import MemorySagaStorage, RetryPolicy, SagaCompensator, SagaStatus
from sagakit.compensator import CompensationTask
from tests.unit.support import (
    FourStepSaga,
    Script,
    ThreeStepSaga,
    drive,
    history,
    state,
    transaction,
)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait the engine asks asyncio.sleep for; the sleep itself only yields."""
    requested: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, result: object = None) -> object:
        requested.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return requested


def compensation_waits(waits: list[float]) -> list[float]:
    return [w for w in waits if w != 0]


# -- RetryPolicy -----------------------------------------------------------------------------------


def test_wait_before_grows_by_backoff():
    policy = RetryPolicy(attempts=5, delay=1.5, backoff=2.0, max_delay=1000)
    assert [policy.wait_before(a) for a in (2, 3, 4, 5)] == [1.5, 3.0, 6.0, 12.0]


def test_wait_before_is_capped_by_max_delay():
    policy = RetryPolicy(attempts=5, delay=10, backoff=10, max_delay=50)
    assert [policy.wait_before(a) for a in (2, 3, 4)] == [10, 50, 50]


def test_jitter_spreads_the_wait_within_its_fraction():
    policy = RetryPolicy(attempts=3, delay=10, backoff=2, max_delay=100, jitter=0.1)
    assert policy.wait_before(2, rng=lambda: 0.75) == pytest.approx(10.5)
    assert policy.wait_before(3, rng=lambda: 0.0) == pytest.approx(18.0)


def test_jitter_stays_within_bounds():
    policy = RetryPolicy(attempts=3, delay=10, backoff=1, max_delay=100, jitter=0.25)
    seen = {policy.wait_before(2) for _ in range(200)}
    assert all(7.5 <= w <= 12.5 for w in seen)
    assert len(seen) > 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attempts": 0}, "compensation_retry_count"),
        ({"delay": -1}, "compensation_retry_delay"),
        ({"max_delay": -1}, "compensation_retry_max_delay"),
        ({"backoff": 0.5}, "backoff"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": -0.1}, "jitter"),
    ],
)
def test_invalid_policies_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


# -- SagaCompensator on its own --------------------------------------------------------------------


class Flaky:
    """A compensation task body failing its first ``failures`` attempts."""

    def __init__(self, name: str, failures: int, log: list[tuple[str, int]]) -> None:
        self.name, self.failures, self.log = name, failures, log

    async def __call__(self, attempt: int) -> None:
        self.log.append((self.name, attempt))
        if attempt <= self.failures:
            raise RuntimeError(f"{self.name} attempt {attempt}")

    def task(self) -> CompensationTask:
        return CompensationTask(self.name, self)


async def test_compensator_runs_tasks_in_order_retrying_and_reporting(waits):
    calls: list[tuple[str, int]] = []
    events: list[tuple[str, ...]] = []

    async def record(step, error, attempts):
        events.append(("record", step, "ok" if error is None else "failed", str(attempts)))

    async def after():
        events.append(("after",))

    compensator = SagaCompensator(
        RetryPolicy(attempts=3, delay=2, backoff=3, max_delay=100),
        record=record, on_after_compensate_step=after,
    )
    tasks = [Flaky("c", 5, calls).task(), Flaky("b", 1, calls).task(), Flaky("a", 0, calls).task()]
    failures = await compensator.compensate(tasks)
    assert calls == [("c", 1), ("c", 2), ("c", 3), ("b", 1), ("b", 2), ("a", 1)]
    assert [(f.step_name, f.attempts, str(f.error)) for f in failures] == [("c", 3, "c attempt 3")]
    assert events == [  # on_after_compensate_step follows successful compensations only
        ("record", "c", "failed", "3"),
        ("record", "b", "ok", "2"), ("after",),
        ("record", "a", "ok", "1"), ("after",),
    ]
    assert compensation_waits(waits) == [2, 6, 2]


async def test_compensator_without_callbacks_returns_failures(waits):
    calls: list[tuple[str, int]] = []
    compensator = SagaCompensator(RetryPolicy(attempts=1, delay=0))
    failures = await compensator.compensate([Flaky("x", 1, calls).task()])
    assert [f.step_name for f in failures] == ["x"]
    assert calls == [("x", 1)]


async def test_a_base_exception_in_a_compensation_is_not_retried(waits):
    async def crash(attempt: int) -> None:
        raise KeyboardInterrupt

    compensator = SagaCompensator(RetryPolicy(attempts=3, delay=1))
    with pytest.raises(KeyboardInterrupt):
        await compensator.compensate([CompensationTask("x", crash)])
    assert compensation_waits(waits) == []


# -- retries inside a saga -------------------------------------------------------------------------


async def test_a_compensation_is_retried_until_it_succeeds(waits):
    script, storage, saga_id = Script(), MemorySagaStorage(), uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail("StepB", "compensate", RuntimeError("1"), RuntimeError("2"))
    with pytest.raises(RuntimeError, match="boom"):
        await drive(transaction(
            ThreeStepSaga(), script, storage, saga_id=saga_id, compensation_retry_count=3,
            compensation_retry_delay=5, compensation_retry_backoff=3,
        ))
    assert script.compensations() == ["StepB", "StepB", "StepB", "StepA"]
    assert compensation_waits(waits) == [5, 15]
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.FAILED
    assert row.version == 2 * 2 + 2  # retries are not checkpoints


async def test_waits_are_capped_by_the_max_delay(waits):
    script, storage = Script(), MemorySagaStorage()
    script.fail("StepB", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    with pytest.raises(RuntimeError, match="boom"):
        await drive(transaction(
            ThreeStepSaga(), script, storage, compensation_retry_count=5,
            compensation_retry_delay=10, compensation_retry_backoff=4,
            compensation_retry_max_delay=100,
        ))
    assert script.count("StepA", "compensate") == 5
    assert compensation_waits(waits) == [10, 40, 100, 100]


async def test_a_single_attempt_means_no_retry_and_no_wait(waits):
    script, storage = Script(), MemorySagaStorage()
    script.fail("StepB", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    with pytest.raises(RuntimeError, match="boom"):
        await drive(transaction(ThreeStepSaga(), script, storage, compensation_retry_count=1,
                                compensation_retry_delay=30))
    assert script.count("StepA", "compensate") == 1
    assert compensation_waits(waits) == []


async def test_a_compensation_that_keeps_failing_does_not_stop_the_others(waits):
    script, storage, saga_id = Script(), MemorySagaStorage(), uuid.uuid4()
    boom = RuntimeError("boom")
    script.fail("StepD", "act", boom)
    script.always("StepB", "compensate", RuntimeError("refund service down"))
    with pytest.raises(RuntimeError) as caught:
        await drive(transaction(FourStepSaga(), script, storage, saga_id=saga_id,
                                compensation_retry_count=2, compensation_retry_delay=1))
    assert caught.value is boom
    assert any("COMPENSATING" in note for note in getattr(boom, "__notes__", []))
    assert script.compensations() == ["StepC", "StepB", "StepB", "StepA"]
    row = await state(storage, saga_id)
    assert row.status is SagaStatus.COMPENSATING
    assert row.lease_owner is None
    assert (await history(storage, saga_id))[-3:] == [
        ("StepC", "compensate", "COMPENSATED"),
        ("StepB", "compensate", "FAILED"),
        ("StepA", "compensate", "COMPENSATED"),
    ]
    failed = [e for e in await storage.get_step_history(saga_id) if e.status.value == "FAILED"]
    assert "after 2 attempts" in (failed[-1].details or "")


async def test_a_failed_last_compensation_never_reports_failed(waits):
    script, storage, saga_id = Script(), MemorySagaStorage(), uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", RuntimeError("down"))
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id, compensation_retry_count=2)
    with pytest.raises(RuntimeError, match="boom"):
        await drive(txn)
    assert txn.status is SagaStatus.COMPENSATING
    assert (await state(storage, saga_id)).status is SagaStatus.COMPENSATING
