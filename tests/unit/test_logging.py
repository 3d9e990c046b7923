"""Logging: every record sagakit emits while running a saga names the saga (and the step)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from sagakit import (
    Fallback,
    LoggingMiddleware,
    RecoveryWorker,
    Saga,
    SagaLogFilter,
    SagaStatus,
    recover_saga,
)
from sagakit.middleware import SAGAKIT_LOGGERS, saga_log_context
from sagakit.storage.memory import _MemoryRun
from tests.unit.support import (
    Crash,
    Ctx,
    Script,
    StepA,
    StepB,
    StepC,
    StepD,
    ThreeStepSaga,
    drive,
    transaction,
)

SRC = Path(__file__).resolve().parents[2] / "src" / "sagakit"


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures sagakit's loggers at every level."""
    caplog.set_level(logging.DEBUG, logger="sagakit")
    return caplog


def sagakit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sagakit" or r.name.startswith("sagakit.")]


def fields(record: logging.LogRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in
                 ("saga_id", "saga_name", "step_name", "action", "attempt"))


async def test_every_record_of_a_failing_saga_run_names_the_saga_and_its_step(records, storage):
    script = Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail("StepB", "compensate", ConnectionError("retry me"))
    saga_id = uuid.uuid4()
    with pytest.raises(RuntimeError, match="boom"):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                middlewares=[LoggingMiddleware(saga_runs=True)]))
    logged = sagakit_records(records)
    assert logged
    assert {r.saga_id for r in logged} == {str(saga_id)}
    assert {r.saga_name for r in logged} == {"ThreeStepSaga"}
    steps = [r for r in logged if r.step_name is not None]
    runs = [r for r in logged if r.step_name is None]
    assert {r.name for r in steps} == {"sagakit.steps"}
    assert [(r.step_name, r.action, r.attempt) for r in steps if "started" in r.getMessage()] == [
        ("StepA", "act", 1), ("StepB", "act", 1), ("StepC", "act", 1),
        ("StepB", "compensate", 1), ("StepB", "compensate", 2), ("StepA", "compensate", 1),
    ]
    failed = [(r.step_name, r.action, r.attempt) for r in steps if r.levelno == logging.WARNING]
    assert failed == [("StepC", "act", 1), ("StepB", "compensate", 1)]
    # The run's own records (saga_runs=True): where it began, how it ended.
    assert [r.getMessage().split(": ", 1)[1].split(" after ")[0] for r in runs] == [
        "run begins at RUNNING",
        "run ends at FAILED (RuntimeError: boom)",
    ]
    assert {(r.action, r.attempt) for r in runs} == {(None, None)}


async def test_a_fallback_warning_names_the_step_it_stands_in_for(records, storage):
    script = Script()
    script.fail("StepB", "act", ConnectionError("payments down"))

    class FallbackSaga(Saga[Ctx]):
        steps = [StepA, Fallback(step=StepB, fallback=StepD), StepC]

    saga_id = uuid.uuid4()
    await drive(transaction(FallbackSaga(), script, storage, saga_id=saga_id))
    (warning,) = [r for r in sagakit_records(records) if "running fallback" in r.getMessage()]
    assert (warning.saga_id, warning.saga_name, warning.step_name) == (
        str(saga_id), "FallbackSaga", "StepB",
    )


async def test_recovery_with_a_failing_compensation_logs_with_the_saga_id(records, storage):
    script = Script()
    saga_id = uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", ConnectionError("down"))
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                compensation_retry_count=1))
    records.clear()
    options: dict[str, Any] = {
        "middlewares": [LoggingMiddleware(saga_runs=True)], "compensation_retry_count": 2,
        "compensation_retry_delay": 0.0, "max_recovery_attempts": 1,
    }
    assert await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                              **options) is SagaStatus.COMPENSATING
    assert await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                              **options) is SagaStatus.PARKED
    logged = sagakit_records(records)
    assert {r.saga_id for r in logged} == {str(saga_id)}
    assert {r.saga_name for r in logged} == {"ThreeStepSaga"}
    compensations = [r for r in logged if r.name == "sagakit.steps" and r.step_name is not None]
    assert [(r.step_name, r.attempt, r.levelno) for r in compensations
            if r.levelno == logging.WARNING] == [("StepA", 1, logging.WARNING),
                                                 ("StepA", 2, logging.WARNING)]
    (parking,) = [r for r in logged if "parking it" in r.getMessage()]
    assert (parking.name, parking.levelno, parking.step_name) == ("sagakit", logging.ERROR, None)
    ends = [r.getMessage() for r in logged if " ends at " in r.getMessage()]
    assert [m.split(" ends at ")[1].split(" ")[0] for m in ends] == ["COMPENSATING", "PARKED"]


async def test_the_recovery_worker_logs_with_the_saga_id(records, storage):
    script = Script()
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    worker = RecoveryWorker(storage, [ThreeStepSaga], script.container)
    records.clear()
    outcome = await worker.recover(saga_id)
    assert outcome.status is SagaStatus.COMPLETED
    (recovered,) = [r for r in sagakit_records(records) if r.name == "sagakit.worker"]
    assert "recovered to COMPLETED" in recovered.getMessage()
    assert recovered.saga_id == str(saga_id)

    class Renamed(Saga[Ctx]):  # a saga of another name: the worker finds no definition
        name = "Unknown"
        steps = [StepA]

    other = uuid.uuid4()
    script.fail("StepA", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(Renamed(), script, storage, saga_id=other))
    records.clear()
    await worker.recover(other)
    (skipped,) = sagakit_records(records)
    assert "no definition named 'Unknown'" in skipped.getMessage()
    assert skipped.saga_id == str(other)


async def test_lease_renewal_and_release_failures_name_the_saga(records, storage, monkeypatch):
    warned = asyncio.Event()

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "lease renewal failed" in record.getMessage():
                warned.set()

    async def renew_fails(self: Any, lease_seconds: float) -> None:
        raise OSError("storage unreachable")

    async def release_fails(self: Any) -> None:
        raise OSError("storage unreachable")

    monkeypatch.setattr(_MemoryRun, "renew_lease", renew_fails)
    monkeypatch.setattr(_MemoryRun, "release", release_fails)
    script = Script()

    async def wait_for_renewal(handler: Any, context: Any) -> None:
        await asyncio.wait_for(warned.wait(), timeout=30)  # the lease keeper runs meanwhile

    script.hook("StepB", "act", wait_for_renewal)
    script.fail("StepC", "act", Crash())  # the run ends without a final checkpoint: release
    notice = Notice()
    logging.getLogger("sagakit").addHandler(notice)
    try:
        saga_id = uuid.uuid4()
        with pytest.raises(Crash):
            await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                    lease_seconds=0.3))
    finally:
        logging.getLogger("sagakit").removeHandler(notice)
    logged = sagakit_records(records)
    renewal = [r for r in logged if "lease renewal failed" in r.getMessage()]
    release = [r for r in logged if "could not release the lease" in r.getMessage()]
    assert renewal
    assert release
    assert {r.saga_id for r in logged} == {str(saga_id)}
    assert {r.saga_id for r in renewal + release} == {str(saga_id)}
    assert {r.saga_name for r in renewal + release} == {"ThreeStepSaga"}


async def test_a_handler_filter_gives_the_applications_own_records_the_saga_fields(storage):
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    handler.addFilter(SagaLogFilter())
    app = logging.getLogger("test.app.orders")
    app.addHandler(handler)
    app.setLevel(logging.INFO)
    script = Script()

    async def log_inside(handler: Any, context: Any) -> None:
        app.info("charging the card")

    script.hook("StepB", "act", log_inside)
    script.hook("StepA", "compensate", log_inside)
    script.fail("StepC", "act", RuntimeError("boom"))
    saga_id = uuid.uuid4()
    txn = transaction(ThreeStepSaga(), script, storage, saga_id=saga_id)

    async def drive_and_log() -> None:
        async with txn:
            async for _ in txn:
                app.info("between steps")  # the caller's code: not inside the saga

    try:
        with pytest.raises(RuntimeError):
            await drive_and_log()
        app.info("after the saga")
    finally:
        app.removeHandler(handler)
    assert [(r.getMessage(), *fields(r)) for r in seen] == [
        ("between steps", None, None, None, None, None),
        ("charging the card", str(saga_id), "ThreeStepSaga", "StepB", "act", 1),
        ("between steps", None, None, None, None, None),
        ("charging the card", str(saga_id), "ThreeStepSaga", "StepA", "compensate", 1),
        ("after the saga", None, None, None, None, None),
    ]


def test_the_filter_keeps_explicit_extras_and_fills_the_rest():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.saga_id = "explicit"
    saga_id = uuid.uuid4()
    with saga_log_context(saga_id, "S", "Step"):
        SagaLogFilter().filter(record)
    assert fields(record) == ("explicit", "S", "Step", None, None)


def test_every_logger_sagakit_writes_to_has_the_filter():
    names = set()
    for path in SRC.rglob("*.py"):
        names.update(re.findall(r"getLogger\(\"([\w.]+)\"\)", path.read_text(encoding="utf-8")))
    assert names
    missing = names - set(SAGAKIT_LOGGERS)
    assert not missing, f"add {sorted(missing)} to sagakit.middleware.SAGAKIT_LOGGERS"
    for name in SAGAKIT_LOGGERS:
        assert any(isinstance(f, SagaLogFilter) for f in logging.getLogger(name).filters)
