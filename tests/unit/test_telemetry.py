"""OpenTelemetry tracing: a span per saga run, one per act and compensate invocation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sagakit import (
    SagaStatus,
    abort_saga,
    bootstrap,
    recover_saga,
    resume_saga,
)
from sagakit.telemetry import TracingMiddleware
from tests.unit.support import Crash, Ctx, Gate, Script, ThreeStepSaga, drive, transaction


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
def tracing(provider: TracerProvider) -> TracingMiddleware:
    return TracingMiddleware(tracer_provider=provider)


def spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def saga_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in spans(exporter) if s.name.startswith("saga.") and "saga.step" not in
            (s.attributes or {})]


def step_spans(exporter: InMemorySpanExporter, under: ReadableSpan | None = None) -> list[Any]:
    """(name, attempt, step status) of the step spans, in start order (optionally only the
    children of ``under``)."""
    found = [s for s in spans(exporter) if "saga.step" in (s.attributes or {})]
    if under is not None:
        found = [s for s in found if s.parent is not None
                 and s.parent.span_id == under.context.span_id]
    found.sort(key=lambda s: s.start_time or 0)
    return [(s.name, attr(s, "saga.attempt"), attr(s, "saga.step.status")) for s in found]


def attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


def exception_types(span: ReadableSpan) -> list[str]:
    return [str((e.attributes or {}).get("exception.type")) for e in span.events
            if e.name == "exception"]


async def test_a_completed_saga_has_one_run_span_parenting_one_span_per_act(
    tracing, exporter, storage
):
    saga_id = uuid.uuid4()
    await drive(transaction(ThreeStepSaga(), Script(), storage, saga_id=saga_id,
                            middlewares=[tracing]))
    (run,) = saga_spans(exporter)
    assert run.name == "saga.run ThreeStepSaga"
    assert run.parent is None
    assert dict(run.attributes or {}) == {
        "saga.id": str(saga_id), "saga.name": "ThreeStepSaga", "saga.mode": "run",
        "saga.status": "COMPLETED",
    }
    assert run.status.status_code is StatusCode.UNSET
    assert step_spans(exporter, under=run) == [
        ("saga.act StepA", 1, "COMPLETED"),
        ("saga.act StepB", 1, "COMPLETED"),
        ("saga.act StepC", 1, "COMPLETED"),
    ]
    assert len(spans(exporter)) == 4
    assert {s.context.trace_id for s in spans(exporter)} == {run.context.trace_id}
    act = next(s for s in spans(exporter) if s.name == "saga.act StepB")
    assert dict(act.attributes or {}) == {
        "saga.id": str(saga_id), "saga.name": "ThreeStepSaga", "saga.step": "StepB",
        "saga.action": "act", "saga.attempt": 1, "saga.step.status": "COMPLETED",
    }
    assert act.status.status_code is StatusCode.UNSET
    assert act.events == ()


async def test_a_failed_step_is_an_error_span_and_compensations_get_their_own_spans(
    tracing, exporter, storage
):
    script = Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await drive(transaction(ThreeStepSaga(), script, storage, middlewares=[tracing]))
    (run,) = saga_spans(exporter)
    assert step_spans(exporter, under=run) == [
        ("saga.act StepA", 1, "COMPLETED"),
        ("saga.act StepB", 1, "COMPLETED"),
        ("saga.act StepC", 1, "FAILED"),
        ("saga.compensate StepB", 1, "COMPENSATED"),
        ("saga.compensate StepA", 1, "COMPENSATED"),
    ]
    failed = next(s for s in spans(exporter) if s.name == "saga.act StepC")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "RuntimeError: boom"
    assert attr(failed, "error.type") == "RuntimeError"
    assert exception_types(failed) == ["RuntimeError"]
    compensated = next(s for s in spans(exporter) if s.name == "saga.compensate StepB")
    assert attr(compensated, "saga.action") == "compensate"
    assert compensated.status.status_code is StatusCode.UNSET
    # The run span: FAILED, an error, the step's exception recorded once.
    assert attr(run, "saga.status") == "FAILED"
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "RuntimeError: boom"
    assert attr(run, "error.type") == "RuntimeError"
    assert exception_types(run) == ["RuntimeError"]


async def test_each_compensation_attempt_is_its_own_span(tracing, exporter, storage):
    script = Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.fail("StepB", "compensate", ConnectionError("down"), ConnectionError("down"))
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, middlewares=[tracing],
                                compensation_retry_count=3))
    (run,) = saga_spans(exporter)
    assert step_spans(exporter, under=run)[3:] == [
        ("saga.compensate StepB", 1, "FAILED"),
        ("saga.compensate StepB", 2, "FAILED"),
        ("saga.compensate StepB", 3, "COMPENSATED"),
        ("saga.compensate StepA", 1, "COMPENSATED"),
    ]
    attempts = [s for s in spans(exporter) if s.name == "saga.compensate StepB"]
    assert [s.status.status_code for s in sorted(attempts, key=lambda s: s.start_time or 0)] == [
        StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET,
    ]
    assert attr(run, "saga.status") == "FAILED"


async def test_a_compensation_failing_for_good_leaves_the_run_span_compensating(
    tracing, exporter, storage
):
    script = Script()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", ConnectionError("down"))
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, middlewares=[tracing],
                                compensation_retry_count=2))
    (run,) = saga_spans(exporter)
    assert attr(run, "saga.status") == "COMPENSATING"
    assert run.status.status_code is StatusCode.ERROR
    assert step_spans(exporter, under=run)[-2:] == [
        ("saga.compensate StepA", 1, "FAILED"),
        ("saga.compensate StepA", 2, "FAILED"),
    ]


async def test_recovery_runs_get_their_own_run_span(tracing, exporter, storage):
    script = Script()
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                middlewares=[tracing]))
    (interrupted,) = saga_spans(exporter)
    assert attr(interrupted, "saga.status") == "RUNNING"
    assert attr(interrupted, "saga.interrupted") is True
    assert interrupted.status.status_code is StatusCode.UNSET
    assert step_spans(exporter, under=interrupted) == [
        ("saga.act StepA", 1, "COMPLETED"),
        ("saga.act StepB", 1, "STARTED"),  # the process "died" in the step
    ]
    exporter.clear()

    status = await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                                middlewares=[tracing])
    assert status is SagaStatus.COMPLETED
    (recovery,) = saga_spans(exporter)
    assert recovery.name == "saga.recover ThreeStepSaga"
    assert attr(recovery, "saga.mode") == "recover"
    assert attr(recovery, "saga.id") == str(saga_id)
    assert attr(recovery, "saga.status") == "COMPLETED"
    assert recovery.status.status_code is StatusCode.UNSET
    assert step_spans(exporter, under=recovery) == [
        ("saga.act StepB", 1, "COMPLETED"),
        ("saga.act StepC", 1, "COMPLETED"),
    ]


async def test_a_recovery_that_compensates_records_the_step_error(tracing, exporter, storage):
    script = Script()
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    script.fail("StepC", "act", ValueError("no stock"))
    status = await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                                middlewares=[tracing], compensation_retry_delay=0.0)
    assert status is SagaStatus.FAILED  # recovery returns FAILED, it does not raise
    (recovery,) = saga_spans(exporter)
    assert attr(recovery, "saga.status") == "FAILED"
    assert recovery.status.status_code is StatusCode.ERROR
    assert attr(recovery, "error.type") == "ValueError"
    assert exception_types(recovery) == ["ValueError"]
    assert [name for name, _, _ in step_spans(exporter, under=recovery)] == [
        "saga.act StepB", "saga.act StepC", "saga.compensate StepB", "saga.compensate StepA",
    ]


async def test_parking_and_explicit_calls_are_traced(tracing, exporter, storage):
    script = Script()
    saga_id = uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    script.always("StepA", "compensate", ConnectionError("down"))
    with pytest.raises(RuntimeError):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                compensation_retry_count=1))
    options: dict[str, Any] = {"middlewares": [tracing], "compensation_retry_count": 1,
                               "max_recovery_attempts": 1}
    for expected in (SagaStatus.COMPENSATING, SagaStatus.PARKED):
        assert await recover_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                                  **options) is expected
    runs = sorted(saga_spans(exporter), key=lambda s: s.start_time or 0)
    assert [(s.name, attr(s, "saga.status")) for s in runs] == [
        ("saga.recover ThreeStepSaga", "COMPENSATING"),
        ("saga.recover ThreeStepSaga", "PARKED"),
    ]
    assert runs[1].status.status_code is StatusCode.ERROR
    assert runs[1].status.description == "saga ended PARKED"
    assert step_spans(exporter, under=runs[1]) == []  # parked without running a step
    exporter.clear()

    script.heal("StepA", "compensate")
    assert await resume_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                             middlewares=[tracing]) is SagaStatus.FAILED
    (resumed,) = saga_spans(exporter)
    assert (resumed.name, attr(resumed, "saga.mode")) == ("saga.resume ThreeStepSaga", "resume")
    assert step_spans(exporter, under=resumed) == [("saga.compensate StepA", 1, "COMPENSATED")]


async def test_abort_is_traced(tracing, exporter, storage):
    script = Script()
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    assert await abort_saga(ThreeStepSaga, saga_id, Ctx, script.container, storage,
                            middlewares=[tracing]) is SagaStatus.FAILED
    (aborted,) = saga_spans(exporter)
    assert (aborted.name, attr(aborted, "saga.status")) == ("saga.abort ThreeStepSaga", "FAILED")
    assert step_spans(exporter, under=aborted) == [("saga.compensate StepA", 1, "COMPENSATED")]


async def test_the_step_span_is_current_inside_the_step_and_the_run_span_joins_the_callers(
    tracing, provider, exporter, storage
):
    tracer = provider.get_tracer("test")
    script = Script()

    async def inner_work(handler: Any, context: Any) -> None:
        with tracer.start_as_current_span("http call"):
            pass

    script.hook("StepB", "act", inner_work)
    with tracer.start_as_current_span("request"):
        await drive(transaction(ThreeStepSaga(), script, storage, middlewares=[tracing]))
    by_name = {s.name: s for s in spans(exporter)}
    run = by_name["saga.run ThreeStepSaga"]
    assert run.parent is not None
    assert run.parent.span_id == by_name["request"].context.span_id
    call = by_name["http call"]
    assert call.parent is not None
    assert call.parent.span_id == by_name["saga.act StepB"].context.span_id
    # Between steps the caller's context is untouched: nothing leaks out of the transaction.
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_concurrent_sagas_through_one_middleware_keep_their_spans_apart(
    tracing, exporter, storage
):
    script = Script()
    gate = Gate()
    script.hook("StepB", "act", gate)
    first, second = uuid.uuid4(), uuid.uuid4()

    async def run(saga_id: uuid.UUID) -> None:
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id,
                                middlewares=[tracing]))

    one = asyncio.create_task(run(first))
    await gate.entered.wait()
    script.unhook("StepB", "act")
    await run(second)
    gate.release.set()
    await one
    runs = {attr(s, "saga.id"): s for s in saga_spans(exporter)}
    assert set(runs) == {str(first), str(second)}
    for saga_id, run_span in runs.items():
        children = [s for s in spans(exporter) if s.parent is not None
                    and s.parent.span_id == run_span.context.span_id]
        assert len(children) == 3
        assert {attr(s, "saga.id") for s in children} == {saga_id}


async def test_the_mediator_passes_the_tracing_middleware_on(tracing, exporter):
    script = Script()
    mediator = bootstrap(di_container=script.container,
                         sagas_mapper=lambda m: m.bind(Ctx, ThreeStepSaga),
                         middlewares=[tracing])
    async for _ in mediator.stream(Ctx()):
        pass
    (run,) = saga_spans(exporter)
    assert len(step_spans(exporter, under=run)) == 3


# -- no OpenTelemetry unless asked for ----------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)


def test_importing_sagakit_never_imports_opentelemetry():
    done = run_python(
        "import sys\n"
        "import sagakit, sagakit.middleware, sagakit.recovery, sagakit.worker, sagakit.mediator\n"
        "import sagakit.storage.sqlalchemy\n"
        "from sagakit import LoggingMiddleware, SagaLogFilter, SqlAlchemySagaStorage\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_sagakit_works_without_opentelemetry_and_the_telemetry_module_says_what_to_install():
    done = run_python(
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the package were not installed\n"
        "import asyncio, sagakit\n"
        "class Step(sagakit.SagaStepHandler[dict, None]):\n"
        "    async def act(self, context): context['done'] = True\n"
        "    async def compensate(self, context): pass\n"
        "class S(sagakit.Saga[dict]):\n"
        "    steps = [Step]\n"
        "print(asyncio.run(S().transaction(context={}).run()))\n"
        "try:\n"
        "    import sagakit.telemetry\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "COMPLETED",
        "sagakit.telemetry needs OpenTelemetry: pip install 'sagakit[otel]'",
    ]
