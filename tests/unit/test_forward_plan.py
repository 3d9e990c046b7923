"""Forward recovery's pure decisions (plan.py): attempts counted from the log, past-pivot sagas,
WAITING, and after_failure (retry or give up, waits, deadlines, durable or in-process)."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sagakit import Fallback, PermanentError, Retry, Step, permanent
from sagakit.plan import (
    Backward,
    CompletedStep,
    Forward,
    GiveUp,
    Mismatch,
    RetryAfter,
    after_failure,
    decide,
)
from sagakit.records import SagaAction, SagaLogEntry, SagaStatus, SagaStepStatus
from sagakit.saga import StepSpec
from tests.unit.support import StepA, StepB, StepC, StepD

SAGA_ID = uuid.uuid4()
ACT, COMP = SagaAction.ACT, SagaAction.COMPENSATE
DONE, FAILED, RETRYING, COMPENSATED = (
    SagaStepStatus.COMPLETED, SagaStepStatus.FAILED, SagaStepStatus.RETRYING,
    SagaStepStatus.COMPENSATED,
)
RETRY = Retry(attempts=3, delay=0)


def log(*entries: tuple[str, SagaAction, SagaStepStatus]) -> list[SagaLogEntry]:
    now = datetime.now(UTC)
    return [SagaLogEntry(SAGA_ID, name, action, status, now) for name, action, status in entries]


def spec(entry: Any) -> StepSpec:
    built: StepSpec = entry.to_step_spec() if hasattr(entry, "to_step_spec") else StepSpec(entry)
    return built


# A, B (pivot), C (retried): the classic taxonomy.
SPECS = (spec(StepA), spec(Step(StepB, pivot=True)), spec(Step(StepC, retry=RETRY)))
A_DONE, B_DONE = ("StepA", ACT, DONE), ("StepB", ACT, DONE)
PAST_PIVOT = (CompletedStep(0, "StepA"), CompletedStep(1, "StepB"))


# -- decide: attempts -------------------------------------------------------------------------------


def test_attempts_count_the_retrying_entries_of_the_step_that_runs_next():
    plan = decide(SagaStatus.RUNNING, SPECS,
                  log(A_DONE, ("StepB", ACT, RETRYING), ("StepB", ACT, RETRYING)))
    assert plan == Forward(1, (CompletedStep(0, "StepA"),), attempts=2)


def test_retrying_entries_of_earlier_steps_do_not_count():
    plan = decide(SagaStatus.RUNNING, SPECS,
                  log(("StepA", ACT, RETRYING), A_DONE, ("StepB", ACT, RETRYING)))
    assert plan == Forward(1, (CompletedStep(0, "StepA"),), attempts=1)


def test_a_retrying_entry_never_sends_the_saga_backward():
    plan = decide(SagaStatus.RUNNING, (spec(StepA), spec(StepB)),
                  log(A_DONE, ("StepB", ACT, RETRYING)))
    assert isinstance(plan, Forward)
    assert plan.attempts == 1


def test_a_saga_without_retries_counts_no_attempts():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE))
    assert plan == Forward(1, (CompletedStep(0, "StepA"),))
    assert (plan.attempts, plan.past_pivot) == (0, False)


@pytest.mark.parametrize("status", [SagaStatus.WAITING, SagaStatus.RUNNING])
def test_a_waiting_saga_goes_forward_at_the_waiting_step(status):
    history = log(A_DONE, B_DONE, ("StepC", ACT, RETRYING))
    assert decide(status, SPECS, history) == Forward(2, PAST_PIVOT, attempts=1, past_pivot=True)


def test_a_waiting_saga_before_its_pivot_goes_forward_too():
    history = log(("StepA", ACT, RETRYING), ("StepA", ACT, RETRYING))
    assert decide(SagaStatus.WAITING, SPECS, history) == Forward(0, (), attempts=2)


# -- decide: past the pivot -----------------------------------------------------------------------


def test_the_pivot_logged_completed_puts_the_saga_past_its_pivot():
    assert decide(SagaStatus.RUNNING, SPECS, log(A_DONE)).past_pivot is False  # type: ignore[union-attr]
    assert decide(SagaStatus.RUNNING, SPECS, log(A_DONE, B_DONE)) == Forward(
        2, PAST_PIVOT, past_pivot=True)


def test_a_failed_pivot_compensates_as_before():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, ("StepB", ACT, FAILED)))
    assert plan == Backward((CompletedStep(0, "StepA"),))


@pytest.mark.parametrize("status", [SagaStatus.RUNNING, SagaStatus.PARKED])
def test_a_failed_act_after_the_pivot_never_goes_backward(status):
    history = log(A_DONE, B_DONE, ("StepC", ACT, RETRYING), ("StepC", ACT, RETRYING),
                  ("StepC", ACT, FAILED))
    plan = decide(status, SPECS, history, resume_parked=True)
    assert plan == Forward(2, PAST_PIVOT, past_pivot=True)  # a fresh budget: attempts 0


def test_a_parked_saga_past_its_pivot_stays_parked_unless_resumed():
    history = log(A_DONE, B_DONE, ("StepC", ACT, FAILED))
    assert decide(SagaStatus.PARKED, SPECS, history).status is SagaStatus.PARKED  # type: ignore[union-attr]


def test_a_resume_after_exhaustion_counts_only_the_attempts_made_since():
    history = log(A_DONE, B_DONE, ("StepC", ACT, RETRYING), ("StepC", ACT, RETRYING),
                  ("StepC", ACT, FAILED), ("StepC", ACT, RETRYING))
    plan = decide(SagaStatus.RUNNING, SPECS, history)
    assert plan == Forward(2, PAST_PIVOT, attempts=1, past_pivot=True)


@pytest.mark.parametrize("status", [SagaStatus.COMPENSATING, SagaStatus.PARKED])
def test_compensation_past_the_pivot_is_a_mismatch(status):
    history = log(A_DONE, B_DONE, ("StepC", ACT, FAILED), ("StepB", COMP, COMPENSATED))
    plan = decide(status, SPECS, history, resume_parked=True)
    assert isinstance(plan, Mismatch)
    assert "'StepB'" in plan.reason


def test_a_compensating_status_past_the_pivot_is_a_mismatch():
    plan = decide(SagaStatus.COMPENSATING, SPECS, log(A_DONE, B_DONE))
    assert isinstance(plan, Mismatch)


def test_the_same_log_without_a_pivot_compensates_as_before():
    specs = tuple(spec(s) for s in (StepA, StepB, Step(StepC, retry=RETRY)))
    history = log(A_DONE, B_DONE, ("StepC", ACT, FAILED))
    assert decide(SagaStatus.RUNNING, specs, history) == Backward(
        (CompletedStep(1, "StepB"), CompletedStep(0, "StepA")))


# -- decide: fallback steps with retries --------------------------------------------------------


def fallback_specs() -> tuple[StepSpec, ...]:
    return (spec(StepA), spec(Step(StepB, pivot=True)),
            spec(Fallback(step=StepC, fallback=StepD)))


def test_retrying_entries_of_a_primary_are_its_failed_attempts():
    history = log(A_DONE, B_DONE, ("StepC", ACT, RETRYING), ("StepC", ACT, RETRYING))
    plan = decide(SagaStatus.RUNNING, fallback_specs(), history)
    assert isinstance(plan, Forward)
    assert plan.attempts == 2
    assert plan.attempt is not None
    assert plan.attempt.handed_over is None  # the primary runs again


def test_after_a_hand_over_the_alternatives_attempts_count():
    history = log(A_DONE, B_DONE, ("StepC", ACT, RETRYING), ("StepC", ACT, FAILED),
                  ("StepD", ACT, RETRYING))
    plan = decide(SagaStatus.WAITING, fallback_specs(), history)
    assert isinstance(plan, Forward)
    assert plan.attempt is not None
    assert plan.attempt.handed_over is not None
    assert (plan.attempts, plan.past_pivot) == (1, True)


def test_a_parked_alternative_past_the_pivot_resumes_with_a_fresh_budget():
    history = log(A_DONE, B_DONE, ("StepC", ACT, FAILED), ("StepD", ACT, RETRYING),
                  ("StepD", ACT, FAILED))
    plan = decide(SagaStatus.PARKED, fallback_specs(), history, resume_parked=True)
    assert isinstance(plan, Forward)
    assert (plan.start, plan.attempts, plan.past_pivot) == (2, 0, True)


# -- after_failure ----------------------------------------------------------------------------------


def decide_after(retry: Retry | None, attempt: int, error: BaseException | None = None,
                 **options: Any) -> Any:
    options.setdefault("now", 1000.0)
    options.setdefault("deadline_at", None)
    options.setdefault("past_pivot", False)
    options.setdefault("durable_wait", 5.0)
    options.setdefault("rng", lambda: 0.5)
    return after_failure(retry, attempt, error or ConnectionError("reset"), **options)


@pytest.mark.parametrize("retry", [None, Retry(attempts=1)])
def test_a_step_that_retries_nothing_gives_up_without_a_reason(retry):
    assert decide_after(retry, 1) == GiveUp("")


def test_retries_follow_the_backoff_until_the_budget_is_spent():
    retry = Retry(attempts=4, delay=1.0, backoff=2.0, max_delay=3.0)
    assert [decide_after(retry, n) for n in (1, 2, 3)] == [
        RetryAfter(1.0, False), RetryAfter(2.0, False), RetryAfter(3.0, False)]
    assert decide_after(retry, 4) == GiveUp("attempts exhausted (4 of 4 failed)")
    assert isinstance(decide_after(retry, 7), GiveUp)  # beyond the budget (crashes): give up


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PermanentError("declined"), "PermanentError is a permanent error"),
        (permanent(ValueError("declined")), "ValueError is a permanent error"),
        (KeyError("k"), "KeyError is in give_up_on"),
        (ValueError("v"), "ValueError is not in retry_on"),
    ],
)
def test_errors_the_policy_does_not_retry_give_up_at_once(error, reason):
    retry = Retry(attempts=5, retry_on=(ConnectionError, KeyError, PermanentError),
                  give_up_on=KeyError)
    assert decide_after(retry, 1, error) == GiveUp(reason)
    assert not retry.retries(error)


def test_give_up_on_wins_over_retry_on():
    retry = Retry(attempts=5, retry_on=OSError, give_up_on=ConnectionRefusedError)
    assert isinstance(decide_after(retry, 1, ConnectionRefusedError()), GiveUp)
    assert isinstance(decide_after(retry, 1, ConnectionResetError()), RetryAfter)
    assert retry.retries(ConnectionResetError())


def test_a_permanent_mark_stays_on_the_instance_only():
    marked = permanent(ConnectionError("gone for good"))
    assert isinstance(decide_after(RETRY, 1, marked), GiveUp)
    assert isinstance(decide_after(RETRY, 1, ConnectionError("blip")), RetryAfter)


def test_the_default_retry_on_covers_every_exception_not_base_exceptions():
    assert isinstance(decide_after(RETRY, 1, TimeoutError()), RetryAfter)
    assert isinstance(decide_after(RETRY, 1, KeyboardInterrupt()), GiveUp)


def test_before_the_pivot_a_deadline_reached_by_the_wait_gives_up():
    retry = Retry(attempts=5, delay=10.0)
    assert decide_after(retry, 1, now=100.0, deadline_at=111.0) == RetryAfter(10.0, True)
    assert decide_after(retry, 1, now=100.0, deadline_at=110.0) == GiveUp(
        "the saga's deadline passes before the next attempt (in 10 s)")
    assert decide_after(retry, 1, now=120.0, deadline_at=110.0) == GiveUp(
        "the saga's deadline passed")


def test_past_the_pivot_deadlines_do_not_apply():
    retry = Retry(attempts=5, delay=10.0)
    assert decide_after(retry, 1, now=120.0, deadline_at=110.0, past_pivot=True) == RetryAfter(
        10.0, True)
    assert isinstance(decide_after(retry, 5, past_pivot=True), GiveUp)  # the budget still does


def test_a_wait_longer_than_durable_wait_is_durable():
    retry = Retry(attempts=3, delay=5.0)
    assert decide_after(retry, 1, durable_wait=5.0) == RetryAfter(5.0, False)
    assert decide_after(retry, 1, durable_wait=4.99) == RetryAfter(5.0, True)
    assert decide_after(Retry(attempts=3, delay=0), 1, durable_wait=0.0) == RetryAfter(0.0, False)


def test_jitter_is_drawn_from_the_injected_rng():
    retry = Retry(attempts=3, delay=10.0, jitter=0.2)
    assert decide_after(retry, 1, rng=lambda: 0.0).seconds == pytest.approx(8.0)
    assert decide_after(retry, 1, rng=lambda: 0.5).seconds == pytest.approx(10.0)
    assert decide_after(retry, 1, rng=lambda: 0.75).seconds == pytest.approx(11.0)


retries = st.builds(
    Retry,
    attempts=st.integers(1, 12),
    delay=st.floats(0, 1e9),
    backoff=st.floats(1, 1e6),
    max_delay=st.floats(0, 1e9),
    jitter=st.floats(0, 1),
)
draws = st.floats(0, 1, exclude_max=True)


@given(retry=retries, draw=draws, durable_wait=st.floats(0, 1e9))
def test_a_policy_retries_at_most_attempts_minus_one_times_with_finite_waits(
    retry: Retry, draw: float, durable_wait: float,
) -> None:
    retried, attempt = 0, 1
    while True:
        decision = decide_after(retry, attempt, rng=lambda: draw, durable_wait=durable_wait)
        if isinstance(decision, GiveUp):
            break
        assert math.isfinite(decision.seconds)
        assert decision.seconds >= 0
        assert decision.durable is (decision.seconds > durable_wait)
        assert decision.seconds <= retry.max_delay * (1 + retry.jitter)
        retried += 1
        attempt += 1
    assert retried == retry.attempts - 1


@given(retry=retries, draw=draws, attempt=st.integers(1, 12),
       now=st.floats(0, 1e9), deadline=st.floats(0, 2e9))
def test_a_retry_never_overruns_the_deadline_before_the_pivot(
    retry: Retry, draw: float, attempt: int, now: float, deadline: float,
) -> None:
    decision = decide_after(retry, attempt, rng=lambda: draw, now=now, deadline_at=deadline)
    if isinstance(decision, RetryAfter):
        assert now + decision.seconds < deadline
