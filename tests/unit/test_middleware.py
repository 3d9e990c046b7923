"""Middleware wraps every act and compensate; invocations describe the call."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from sagakit import (
    LoggingMiddleware,
    MemorySagaStorage,
    SagaAction,
    StepInvocation,
    current_invocation,
)
from tests.unit.support import Script, ThreeStepSaga, drive, transaction


class Recording:
    """Logs entering and leaving, with the invocation it saw."""

    def __init__(self, name: str, trace: list[Any]) -> None:
        self.name, self.trace = name, trace

    async def __call__(self, invocation: StepInvocation, call_next: Any) -> Any:
        self.trace.append((self.name, "enter", invocation.step_name, invocation.action.value))
        try:
            return await call_next(invocation)
        finally:
            self.trace.append((self.name, "exit", invocation.step_name, invocation.action.value))


class Capture:
    def __init__(self) -> None:
        self.seen: list[StepInvocation] = []

    async def __call__(self, invocation: StepInvocation, call_next: Any) -> Any:
        self.seen.append(invocation)
        return await call_next(invocation)


async def run_failing(script: Script, middlewares: list[Any], **options: Any) -> uuid.UUID:
    saga_id = uuid.uuid4()
    script.fail("StepC", "act", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        await drive(transaction(ThreeStepSaga(), script, MemorySagaStorage(), saga_id=saga_id,
                                middlewares=middlewares, **options))
    return saga_id


async def test_first_middleware_is_outermost():
    trace: list[Any] = []
    script = Script()
    await drive(transaction(ThreeStepSaga(), script, MemorySagaStorage(),
                            middlewares=[Recording("outer", trace), Recording("inner", trace)]))
    assert trace[:4] == [
        ("outer", "enter", "StepA", "act"),
        ("inner", "enter", "StepA", "act"),
        ("inner", "exit", "StepA", "act"),
        ("outer", "exit", "StepA", "act"),
    ]
    assert len(trace) == 4 * 3


async def test_middleware_wraps_every_act_and_compensate():
    trace: list[Any] = []
    await run_failing(Script(), [Recording("m", trace)])
    entered = [(step, action) for _, event, step, action in trace if event == "enter"]
    assert entered == [
        ("StepA", "act"), ("StepB", "act"), ("StepC", "act"),
        ("StepB", "compensate"), ("StepA", "compensate"),
    ]


async def test_invocations_carry_saga_step_action_attempt_and_context():
    capture = Capture()
    script = Script()
    seen_contexts: list[Any] = []

    async def keep(handler, context):
        seen_contexts.append(context)

    script.hook("StepA", "act", keep)
    saga_id = await run_failing(script, [capture])
    first = capture.seen[0]
    assert first.saga_id == saga_id
    assert first.saga_name == "ThreeStepSaga"
    assert first.step_name == "StepA"
    assert first.action is SagaAction.ACT
    assert first.attempt == 1
    assert first.context is seen_contexts[0]
    assert type(first.handler).__name__ == "StepA"
    assert [i.action for i in capture.seen[-2:]] == [SagaAction.COMPENSATE] * 2


async def test_each_compensation_retry_is_its_own_invocation():
    capture = Capture()
    script = Script()
    script.fail("StepB", "compensate", RuntimeError("1"), RuntimeError("2"))
    await run_failing(script, [capture], compensation_retry_count=3)
    retries = [(i.step_name, i.attempt) for i in capture.seen if i.action is SagaAction.COMPENSATE]
    assert retries == [("StepB", 1), ("StepB", 2), ("StepB", 3), ("StepA", 1)]


async def test_the_handler_that_ran_act_is_the_one_compensated():
    script = Script()
    await run_failing(script, [])
    by_call = {(name, action): ident for name, action, ident in script.instances}
    assert by_call[("StepA", "act")] == by_call[("StepA", "compensate")]
    assert by_call[("StepB", "act")] == by_call[("StepB", "compensate")]
    assert by_call[("StepA", "act")] != by_call[("StepB", "act")]


async def test_a_middleware_raising_fails_the_step():
    async def veto(invocation: StepInvocation, call_next: Any) -> Any:
        if invocation.step_name == "StepB" and invocation.action is SagaAction.ACT:
            raise PermissionError("not allowed")
        return await call_next(invocation)

    script = Script()
    with pytest.raises(PermissionError):
        await drive(transaction(ThreeStepSaga(), script, MemorySagaStorage(), middlewares=[veto]))
    assert script.acts() == ["StepA"]
    assert script.compensations() == ["StepA"]


async def test_what_a_middleware_returns_is_the_step_response():
    async def replace(invocation: StepInvocation, call_next: Any) -> Any:
        await call_next(invocation)
        return f"wrapped-{invocation.step_name}"

    results = await drive(transaction(ThreeStepSaga(), Script(), MemorySagaStorage(),
                                      middlewares=[replace]))
    assert [r.response for r in results] == ["wrapped-StepA", "wrapped-StepB", "wrapped-StepC"]


async def test_the_running_step_sees_its_invocation_and_a_stable_idempotency_key():
    script = Script()
    keys: list[tuple[str, str, int]] = []

    async def look(handler, context):
        invocation = current_invocation()
        assert invocation is not None
        keys.append((handler.idempotency_key, invocation.action.value, invocation.attempt))

    script.hook("StepB", "act", look)
    script.hook("StepB", "compensate", look)
    script.fail("StepB", "compensate", RuntimeError("retry me"))
    saga_id = await run_failing(script, [], compensation_retry_count=2)
    assert keys == [
        (f"{saga_id}:StepB:act", "act", 1),
        (f"{saga_id}:StepB:compensate", "compensate", 1),
        (f"{saga_id}:StepB:compensate", "compensate", 2),
    ]
    assert current_invocation() is None


async def test_logging_middleware_logs_with_structured_extras(caplog):
    logger = logging.getLogger("test.sagakit.steps")
    caplog.set_level(logging.INFO, logger="test.sagakit.steps")
    saga_id = await run_failing(Script(), [LoggingMiddleware(logger)])
    records = [r for r in caplog.records if r.name == "test.sagakit.steps"]
    started = [r for r in records if "started" in r.getMessage()]
    assert [(r.step_name, r.action) for r in started] == [
        ("StepA", "act"), ("StepB", "act"), ("StepC", "act"),
        ("StepB", "compensate"), ("StepA", "compensate"),
    ]
    assert {r.saga_id for r in records} == {str(saga_id)}
    assert {r.saga_name for r in records} == {"ThreeStepSaga"}
    failed = [r for r in records if r.levelno == logging.WARNING]
    assert [(r.step_name, r.action) for r in failed] == [("StepC", "act")]
