"""OpenTelemetry tracing for sagas: one span per saga run, one per step act and compensate.

Needs the ``otel`` extra (``pip install 'sagakit[otel]'``, i.e. ``opentelemetry-api``); sagakit
itself never imports OpenTelemetry, only this module does. Pass the middleware like any other::

    from sagakit.telemetry import TracingMiddleware

    tracing = TracingMiddleware()            # the global tracer provider, or tracer_provider=...
    saga.transaction(context=ctx, storage=storage, middlewares=[tracing])
    await recover_saga(MySaga, saga_id, storage=storage, middlewares=[tracing])

Spans (see docs/observability.md):

- ``saga.<mode> <saga name>`` — one per run of a saga (mode ``run``, ``resume``, ``recover`` or
  ``abort``), a child of the span current when the run began. Attributes ``saga.id``,
  ``saga.name``, ``saga.mode`` and, at its end, ``saga.status`` (COMPLETED, FAILED,
  COMPENSATING, PARKED, or RUNNING when the run was interrupted). A run that did not complete
  has status ERROR, with the step error recorded as an exception event and ``error.type``.
- ``saga.act <step>`` / ``saga.compensate <step>`` — one per invocation (each compensation
  attempt is its own span), a child of its saga run's span and current while the step runs, so
  the step's own spans nest under it. Attributes ``saga.id``, ``saga.name``, ``saga.step``,
  ``saga.action``, ``saga.attempt`` and ``saga.step.status`` (COMPLETED, COMPENSATED, FAILED,
  or STARTED when the invocation was interrupted); a failure has status ERROR, an exception
  event and ``error.type``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

try:
    from opentelemetry import trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sagakit.telemetry needs OpenTelemetry: pip install 'sagakit[otel]'"
    ) from error

from sagakit import __version__
from sagakit.execution import describe_error
from sagakit.invocation import StepInvocation
from sagakit.middleware import CallNext, SagaRun
from sagakit.records import SagaAction, SagaStatus, SagaStepStatus

__all__ = ["TracingMiddleware"]

_SUCCESS = {
    SagaAction.ACT: SagaStepStatus.COMPLETED,
    SagaAction.COMPENSATE: SagaStepStatus.COMPENSATED,
}


class TracingMiddleware:
    """Middleware that traces saga runs and step invocations with OpenTelemetry.

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace.set_tracer_provider``).
    One instance can serve any number of sagas, concurrently.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("sagakit", __version__, tracer_provider=tracer_provider)
        self._runs: dict[UUID, Span] = {}

    @contextlib.asynccontextmanager
    async def observe_saga(self, run: SagaRun) -> AsyncIterator[None]:
        """The saga run's span. It is not made current (the run's steps yield to the caller
        between checkpoints); step spans find it by the saga id instead."""
        span = self.tracer.start_span(
            f"saga.{run.mode} {run.saga_name}",
            kind=SpanKind.INTERNAL,
            attributes={"saga.id": str(run.saga_id), "saga.name": run.saga_name,
                        "saga.mode": run.mode},
        )
        outer = self._runs.get(run.saga_id)
        self._runs[run.saga_id] = span
        raised: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            raised = exc
            raise
        finally:
            if outer is None:
                self._runs.pop(run.saga_id, None)
            else:
                self._runs[run.saga_id] = outer
            _finish_saga_span(span, run, raised)

    async def __call__(self, invocation: StepInvocation, call_next: CallNext) -> Any:
        parent = self._runs.get(invocation.saga_id)
        context = trace.set_span_in_context(parent) if parent is not None else None
        action = invocation.action
        with self.tracer.start_as_current_span(
            f"saga.{action.value} {invocation.step_name}",
            context=context,
            kind=SpanKind.INTERNAL,
            attributes={
                "saga.id": str(invocation.saga_id),
                "saga.name": invocation.saga_name,
                "saga.step": invocation.step_name,
                "saga.action": action.value,
                "saga.attempt": invocation.attempt,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            span.set_attribute("saga.step.status", SagaStepStatus.STARTED.value)
            try:
                result = await call_next(invocation)
            except Exception as exc:
                span.set_attribute("saga.step.status", SagaStepStatus.FAILED.value)
                _record_error(span, exc)
                raise
            span.set_attribute("saga.step.status", _SUCCESS[action].value)
            return result


def _finish_saga_span(span: Span, run: SagaRun, raised: BaseException | None) -> None:
    try:
        span.set_attribute("saga.status", run.status.value)
        error = raised if isinstance(raised, Exception) else None
        if error is None and isinstance(run.error, Exception):
            error = run.error
        if raised is not None and error is None:  # cancelled, closed early, or the process ends
            span.set_attribute("saga.interrupted", True)
        if error is not None:
            _record_error(span, error)
        elif run.status in (SagaStatus.FAILED, SagaStatus.COMPENSATING, SagaStatus.PARKED) and (
            raised is None
        ):
            span.set_status(Status(StatusCode.ERROR, f"saga ended {run.status.value}"))
    finally:
        span.end()


def _record_error(span: Span, error: Exception) -> None:
    error_type, details = describe_error(error)
    span.record_exception(error)
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, details))
