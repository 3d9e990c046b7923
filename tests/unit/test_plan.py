"""decide(): the pure Strict Backward Recovery rules, one test per rule of plan.py's docstring."""

from __future__ import annotations

import types
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from sagakit.plan import (
    ABORTED,
    Attempt,
    Backward,
    CompletedStep,
    Finished,
    Forward,
    Mismatch,
    decide,
)
from sagakit.records import SagaAction, SagaLogEntry, SagaStatus, SagaStepStatus
from sagakit.saga import StepSpec
from tests.unit.support import StepA, StepB, StepC, StepD

SAGA_ID = uuid.uuid4()
SPECS = (StepSpec(StepA), StepSpec(StepB), StepSpec(StepC))
ACT, COMP = SagaAction.ACT, SagaAction.COMPENSATE
DONE, FAILED, COMPENSATED, STARTED = (
    SagaStepStatus.COMPLETED, SagaStepStatus.FAILED, SagaStepStatus.COMPENSATED,
    SagaStepStatus.STARTED,
)


def log(*entries: tuple[Any, ...]) -> list[SagaLogEntry]:
    """Log entries from (step, action, status) or (step, action, status, error_type)."""
    now = datetime.now(UTC)
    return [SagaLogEntry(SAGA_ID, name, action, status, now, error_type=error_type)
            for name, action, status, error_type in (e if len(e) == 4 else (*e, None)
                                                    for e in entries)]


A_DONE = ("StepA", ACT, DONE)
B_DONE = ("StepB", ACT, DONE)
C_DONE = ("StepC", ACT, DONE)
C_FAILED = ("StepC", ACT, FAILED)


# -- terminal and parked -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [SagaStatus.COMPLETED, SagaStatus.FAILED])
@pytest.mark.parametrize("entries", [(), (A_DONE,), (A_DONE, B_DONE, C_FAILED)])
def test_terminal_statuses_are_finished_whatever_the_log(status, entries):
    assert decide(status, SPECS, log(*entries)) == Finished(status)


def test_terminal_status_is_finished_even_when_resuming_parked_is_asked():
    assert decide(SagaStatus.FAILED, SPECS, log(A_DONE), resume_parked=True) == Finished(
        SagaStatus.FAILED
    )


def test_parked_does_nothing_unless_resumed():
    assert decide(SagaStatus.PARKED, SPECS, log(A_DONE, C_FAILED)) == Finished(SagaStatus.PARKED)


# -- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [SagaStatus.PENDING, SagaStatus.RUNNING])
def test_new_saga_goes_forward_from_the_first_step(status):
    assert decide(status, SPECS, []) == Forward(0, ())


@pytest.mark.parametrize("status", [SagaStatus.PENDING, SagaStatus.RUNNING])
def test_forward_skips_steps_recorded_completed(status):
    plan = decide(status, SPECS, log(A_DONE, B_DONE))
    assert plan == Forward(2, (CompletedStep(0, "StepA"), CompletedStep(1, "StepB")))


def test_a_started_but_unrecorded_act_runs_again():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, ("StepB", ACT, STARTED)))
    assert plan == Forward(1, (CompletedStep(0, "StepA"),))


def test_all_steps_completed_means_only_mark_completed():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, B_DONE, C_DONE))
    assert isinstance(plan, Forward)
    assert plan.start == len(SPECS)


def test_a_step_completed_twice_is_counted_once():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, A_DONE))
    assert plan == Forward(1, (CompletedStep(0, "StepA"),))


def test_running_with_a_failed_act_in_the_log_goes_backward():
    # The status write (COMPENSATING) was cut off after the failure was logged.
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, B_DONE, C_FAILED))
    assert plan == Backward((CompletedStep(1, "StepB"), CompletedStep(0, "StepA")))


# -- backward --------------------------------------------------------------------------------------


def test_compensating_compensates_completed_steps_in_reverse_order():
    plan = decide(SagaStatus.COMPENSATING, SPECS, log(A_DONE, B_DONE, C_FAILED))
    assert plan == Backward((CompletedStep(1, "StepB"), CompletedStep(0, "StepA")))


def test_the_failed_step_itself_is_not_compensated():
    plan = decide(SagaStatus.COMPENSATING, SPECS, log(A_DONE, B_DONE, C_FAILED))
    assert isinstance(plan, Backward)
    assert "StepC" not in [c.handler_name for c in plan.to_compensate]


def test_compensating_never_goes_forward_even_without_a_failure_logged():
    plan = decide(SagaStatus.COMPENSATING, SPECS, log(A_DONE))
    assert plan == Backward((CompletedStep(0, "StepA"),))


def test_compensating_with_nothing_completed_only_marks_failed():
    assert decide(SagaStatus.COMPENSATING, SPECS, log(("StepA", ACT, FAILED))) == Backward(())


def test_steps_already_compensated_are_skipped():
    entries = log(A_DONE, B_DONE, C_FAILED, ("StepB", COMP, COMPENSATED))
    assert decide(SagaStatus.COMPENSATING, SPECS, entries) == Backward((CompletedStep(0, "StepA"),))


def test_all_compensated_means_only_mark_failed():
    entries = log(
        A_DONE, B_DONE, C_FAILED, ("StepB", COMP, COMPENSATED), ("StepA", COMP, COMPENSATED)
    )
    assert decide(SagaStatus.COMPENSATING, SPECS, entries) == Backward(())


def test_a_failed_compensation_is_tried_again():
    entries = log(A_DONE, B_DONE, C_FAILED, ("StepB", COMP, FAILED), ("StepA", COMP, COMPENSATED))
    assert decide(SagaStatus.COMPENSATING, SPECS, entries) == Backward((CompletedStep(1, "StepB"),))


# -- resumed parked sagas --------------------------------------------------------------------------


def test_resumed_parked_saga_with_a_failure_goes_backward():
    plan = decide(SagaStatus.PARKED, SPECS, log(A_DONE, C_FAILED), resume_parked=True)
    assert plan == Backward((CompletedStep(0, "StepA"),))


def test_resumed_parked_saga_with_any_compensation_goes_backward():
    entries = log(A_DONE, B_DONE, ("StepB", COMP, FAILED))
    plan = decide(SagaStatus.PARKED, SPECS, entries, resume_parked=True)
    assert plan == Backward((CompletedStep(1, "StepB"), CompletedStep(0, "StepA")))


def test_resumed_parked_saga_without_failure_goes_forward():
    plan = decide(SagaStatus.PARKED, SPECS, log(A_DONE), resume_parked=True)
    assert plan == Forward(1, (CompletedStep(0, "StepA"),))


# -- mismatches ------------------------------------------------------------------------------------


def test_a_logged_step_the_saga_no_longer_has_is_a_mismatch():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, ("Removed", ACT, DONE)))
    assert isinstance(plan, Mismatch)
    assert "Removed" in plan.reason


def test_unknown_step_is_a_mismatch_even_when_compensating():
    plan = decide(SagaStatus.COMPENSATING, SPECS, log(("StepD", ACT, DONE)))
    assert isinstance(plan, Mismatch)


def test_completed_steps_that_are_not_a_prefix_are_a_mismatch():
    plan = decide(SagaStatus.RUNNING, SPECS, log(B_DONE))
    assert isinstance(plan, Mismatch)
    assert "StepB" in plan.reason


@pytest.mark.parametrize("status", [
    SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.PARKED,
])
def test_completed_steps_logged_out_of_definition_order_are_a_mismatch(status):
    # e.g. the definition swapped two steps that had already completed
    plan = decide(status, SPECS, log(B_DONE, A_DONE), resume_parked=True)
    assert isinstance(plan, Mismatch)
    assert "'StepB' before step 'StepA'" in plan.reason
    assert "reordered" in plan.reason


def test_a_reorder_is_a_mismatch_even_with_a_failure_logged():
    plan = decide(SagaStatus.RUNNING, SPECS, log(B_DONE, A_DONE, C_FAILED))
    assert isinstance(plan, Mismatch)


def test_a_step_completed_again_after_a_later_one_is_a_mismatch():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE, B_DONE, A_DONE))
    assert isinstance(plan, Mismatch)


def test_a_fallback_hand_over_keeps_the_step_in_order():
    entries = log(A_DONE, ("StepB", ACT, FAILED), ("StepD", ACT, DONE), C_DONE)
    plan = decide(SagaStatus.RUNNING, fallback_specs(), entries)
    assert plan == Forward(3, (CompletedStep(0, "StepA"), CompletedStep(1, "StepD"),
                               CompletedStep(2, "StepC")))


def test_a_fallback_step_moved_before_a_completed_step_is_a_mismatch():
    moved = fallback_specs()
    specs = (moved[1], moved[0], moved[2])  # Fallback(StepB -> StepD), StepA, StepC
    entries = log(A_DONE, ("StepB", ACT, FAILED), ("StepD", ACT, DONE))
    plan = decide(SagaStatus.COMPENSATING, specs, entries)
    assert isinstance(plan, Mismatch)
    assert "'StepA' before step 'StepD'" in plan.reason


# -- fallback steps --------------------------------------------------------------------------------


def fallback_specs() -> tuple[StepSpec, ...]:
    spec = StepSpec(StepB, fallback=types.SimpleNamespace(fallback=StepD))
    return (StepSpec(StepA), spec, StepSpec(StepC))


def test_failed_primary_of_a_fallback_does_not_fail_the_step():
    entries = log(A_DONE, ("StepB", ACT, FAILED), ("StepD", ACT, DONE))
    plan = decide(SagaStatus.RUNNING, fallback_specs(), entries)
    assert plan == Forward(2, (CompletedStep(0, "StepA"), CompletedStep(1, "StepD")))


def test_failed_alternative_of_a_fallback_fails_the_step():
    entries = log(A_DONE, ("StepB", ACT, FAILED), ("StepD", ACT, FAILED))
    plan = decide(SagaStatus.RUNNING, fallback_specs(), entries)
    assert plan == Backward((CompletedStep(0, "StepA"),))


def test_the_handler_that_completed_a_fallback_step_is_the_one_compensated():
    entries = log(A_DONE, ("StepB", ACT, FAILED), ("StepD", ACT, DONE), C_FAILED)
    plan = decide(SagaStatus.COMPENSATING, fallback_specs(), entries)
    assert plan == Backward((CompletedStep(1, "StepD"), CompletedStep(0, "StepA")))


# -- fallback steps after a crash --------------------------------------------------------------------


B_HANDED_OVER = ("StepB", ACT, FAILED)
B_UNDO_STARTED = ("StepB", COMP, STARTED)


def test_a_plain_step_has_no_earlier_attempt_to_tell():
    plan = decide(SagaStatus.RUNNING, SPECS, log(A_DONE))
    assert isinstance(plan, Forward)
    assert plan.attempt is None


def test_resuming_at_a_fallback_step_without_an_entry_the_primary_may_have_run():
    plan = decide(SagaStatus.RUNNING, fallback_specs(), log(A_DONE))
    assert isinstance(plan, Forward)
    assert plan.attempt == Attempt(1, "StepB", None, undo_primary=True)
    assert not plan.attempt.undo_pending


def test_a_recorded_hand_over_runs_the_alternative_without_undoing_the_primary():
    entries = log(A_DONE, B_HANDED_OVER)
    plan = decide(SagaStatus.RUNNING, fallback_specs(), entries)
    assert isinstance(plan, Forward)
    assert plan.start == 1
    assert plan.attempt == Attempt(1, "StepB", entries[1], undo_primary=False)


def test_a_hand_over_with_a_pending_compensation_of_the_primary_undoes_it_first():
    entries = log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER)
    plan = decide(SagaStatus.RUNNING, fallback_specs(), entries)
    assert isinstance(plan, Forward)
    assert plan.start == 1
    assert plan.attempt == Attempt(1, "StepB", entries[2], undo_primary=True)
    assert plan.attempt.undo_pending
    assert plan.completed == (CompletedStep(0, "StepA"),)


def test_a_compensated_primary_is_not_undone_again():
    entries = log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER, ("StepB", COMP, COMPENSATED))
    plan = decide(SagaStatus.RUNNING, fallback_specs(), entries)
    assert isinstance(plan, Forward)
    assert plan.attempt == Attempt(1, "StepB", entries[2], undo_primary=False)


def test_a_pending_compensation_without_its_hand_over_reruns_the_primary():
    # a storage writing entries one by one was cut off between the two
    plan = decide(SagaStatus.RUNNING, fallback_specs(), log(A_DONE, B_UNDO_STARTED))
    assert isinstance(plan, Forward)
    assert plan.attempt == Attempt(1, "StepB", None, undo_primary=True)


def test_a_primary_that_could_not_be_compensated_fails_the_step_and_is_compensated_first():
    entries = log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER, ("StepB", COMP, FAILED))
    for status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        plan = decide(status, fallback_specs(), entries)
        assert plan == Backward((CompletedStep(1, "StepB"), CompletedStep(0, "StepA")))


def test_going_backward_compensates_a_primary_whose_compensation_is_pending():
    entries = log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER, ("StepB", ACT, FAILED, ABORTED))
    plan = decide(SagaStatus.COMPENSATING, fallback_specs(), entries)
    assert plan == Backward((CompletedStep(1, "StepB"), CompletedStep(0, "StepA")))


def test_a_primary_compensated_before_its_alternative_ran_is_not_compensated_again():
    entries = log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER, ("StepB", COMP, COMPENSATED),
                  ("StepD", ACT, DONE), C_FAILED)
    plan = decide(SagaStatus.COMPENSATING, fallback_specs(), entries)
    assert plan == Backward((CompletedStep(1, "StepD"), CompletedStep(0, "StepA")))


def test_a_parked_saga_undoing_a_primary_resumes_forward():
    # the compensation of a primary that never completed is not a compensation of the saga
    for extra in ((), (("StepB", COMP, COMPENSATED),)):
        entries = log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER, *extra)
        plan = decide(SagaStatus.PARKED, fallback_specs(), entries, resume_parked=True)
        assert isinstance(plan, Forward)
        assert plan.start == 1


def test_an_abort_compensates_a_primary_whose_compensation_is_pending_first():
    pending = decide(SagaStatus.RUNNING, fallback_specs(), log(A_DONE, B_UNDO_STARTED, B_HANDED_OVER))
    assert isinstance(pending, Forward)
    assert pending.to_abort() == (CompletedStep(1, "StepB"), CompletedStep(0, "StepA"))
    unknown = decide(SagaStatus.RUNNING, fallback_specs(), log(A_DONE))
    assert isinstance(unknown, Forward)
    assert unknown.to_abort() == (CompletedStep(0, "StepA"),)
