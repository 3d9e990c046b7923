"""The harness's invariant checker on hand-made histories: clean ones pass, broken ones are caught."""

from __future__ import annotations

from typing import Any

import pytest

from tests.acceptance.checker import Event, FinalSaga, Findings, LogRow, check_all, crash_points
from tests.acceptance.crashsaga import PIVOT, STEP_NAMES, wait_before

pytestmark = pytest.mark.acceptance

SID = "00000000-0000-4000-8000-000000000001"


class History:
    """Builds one saga's log and events the way sagakit and the harness steps would write them.

    ``clock`` is the database clock (seconds): each start moves it on a millisecond, a wait by
    its length; snapshots and log entries are stamped with it."""

    def __init__(self, **config: Any) -> None:
        self.config = {"key": "s000", "definition": "CrashSaga", "fail_step": None,
                       "comp_permanent": None, **config}
        self.forward = self.config["definition"] == "ForwardSaga"
        self.log: list[LogRow] = []
        self.events: list[Event] = []
        self.status = "RUNNING"
        self.owner_pid = 0
        self.done: list[str] = []
        self.clock = 1000.0
        self.next_attempt_at: float | None = None
        self.past_pivot = False
        self._id = 0

    def _next(self) -> int:
        self._id += 1
        return self._id

    def claim(self, pid: int) -> None:
        self.owner_pid = pid
        if self.status == "WAITING":
            self.status = "RUNNING"

    def start(self, label: str, pid: int, step: str, action: str = "act",
              attempt: int = 1) -> None:
        self.clock += 0.001
        snapshot = {"status": self.status, "owner": f"host:{self.owner_pid}:abc",
                    "log": [list(r.key()) for r in self.log], "now": self.clock,
                    "next_attempt_at": self.next_attempt_at, "past_pivot": self.past_pivot}
        self.events.append(Event(self._next(), SID, step, action, "start", None, label, pid,
                                 snapshot, attempt))

    def end(self, label: str, pid: int, step: str, action: str = "act",
            outcome: str = "ok", attempt: int = 1) -> None:
        self.events.append(Event(self._next(), SID, step, action, "end", outcome, label, pid,
                                 None, attempt))

    def checkpoint(self, step: str, action: str, status: str, saga_status: str | None = None,
                   attempt: int | None = None) -> None:
        self.log.append(LogRow(len(self.log) + 1, step, action, status, attempt, self.clock))
        if action == "act" and status == "COMPLETED":
            self.done.append(step)
            if self.forward and step == STEP_NAMES[PIVOT]:
                self.past_pivot = True  # one checkpoint with the pivot's entry
        if status == "COMPENSATED":
            self.done.remove(step)
        if saga_status:
            self.status = saga_status

    def step(self, label: str, pid: int, step: str, action: str = "act",
             attempt: int = 1) -> None:
        self.start(label, pid, step, action, attempt)
        self.end(label, pid, step, action, attempt=attempt)
        status = "COMPLETED" if action == "act" else "COMPENSATED"
        last = action == "act" and step == STEP_NAMES[-1]
        logged = attempt if self.forward and action == "act" else None
        self.checkpoint(step, action, status, "COMPLETED" if last else None, logged)

    def fail_attempt(self, label: str, pid: int, step: str, attempt: int, *,
                     durable: bool = False) -> None:
        """A failed attempt and its RETRYING checkpoint, then its wait (``durable``: WAITING,
        lease released, as sagakit writes it)."""
        self.start(label, pid, step, attempt=attempt)
        self.end(label, pid, step, outcome="error:Transient", attempt=attempt)
        self.checkpoint(step, "act", "RETRYING", "WAITING" if durable else None, attempt)
        wait = wait_before(step, attempt + 1)
        self.next_attempt_at = self.clock + wait
        if durable:
            self.owner_pid = 0
        self.clock += wait

    def exit(self, label: str, pid: int, outcome: str = "killed-by-parent") -> None:
        self.events.append(Event(self._next(), None, None, None, "exit", outcome, label, pid))

    def check(self, status: str | None = None, past_pivot: bool | None = None) -> Findings:
        final = FinalSaga(SID, status or self.status, {"done": list(self.done)}, 0,
                          self.past_pivot if past_pivot is None else past_pivot)
        return check_all({SID: self.config}, {SID: final}, {SID: self.log}, self.events)


def _names(findings: Findings) -> set[str]:
    return {v[1:].split("]")[0] for v in findings.violations}


def test_a_clean_completed_saga_passes_every_check() -> None:
    h = History()
    h.claim(10)
    for name in STEP_NAMES:
        h.step("r1", 10, name)
    findings = h.check()
    assert findings.violations == []
    assert findings.checks["I5.act-not-rerun"] == 5
    assert findings.checks["I4.no-overlap"] == 5


def test_a_crash_and_a_takeover_after_the_death_pass() -> None:
    h = History()
    h.claim(10)
    h.step("r1", 10, "Reserve")
    h.start("r1", 10, "Charge")  # SIGKILLed here: no end
    h.exit("r1", 10)
    h.claim(20)
    for name in STEP_NAMES[1:]:
        h.step("w2", 20, name)
    assert h.check().violations == []
    assert crash_points(h.events)["in_step"] == 1


@pytest.mark.parametrize(("phase", "outcome"), [("killed", "SIGKILL"), ("crash", "act:2:mid")])
def test_a_process_is_dead_from_its_sigkill_not_from_its_exit_event(phase: str,
                                                                    outcome: str) -> None:
    """A live owner's sagas are taken over as soon as it dies, maybe before the harness notices
    the exit: a harness SIGKILL (``killed``) or a self-inflicted one (``crash``) ends its acts."""
    h = History()
    h.claim(10)
    h.step("r1", 10, "Reserve")
    h.start("r1", 10, "Charge")
    h.events.append(Event(h._next(), None, None, None, phase, outcome, "r1", 10))
    h.claim(20)
    for name in STEP_NAMES[1:]:
        h.step("w2", 20, name)
    h.exit("r1", 10)
    assert h.check().violations == []


def test_an_act_cut_off_without_an_end_record_ends_at_its_runs_interruption() -> None:
    """A worker whose link was cut loses its session: its step is cancelled at once, and the
    step's own end record may be lost with the link; the run's ``interrupted`` event (written
    once the run stopped) ends the act."""
    h = History()
    h.claim(10)
    h.step("r1", 10, "Reserve")
    h.start("r1", 10, "Charge")
    h.events.append(Event(h._next(), SID, None, None, "interrupted", "SagaLeaseLostError",
                          "r1", 10))
    h.claim(20)
    for name in STEP_NAMES[1:]:
        h.step("w2", 20, name)
    h.exit("r1", 10, outcome="returncode=0")
    assert h.check().violations == []


def test_two_processes_inside_one_saga_at_once_are_caught() -> None:
    h = History()
    h.claim(10)
    h.step("r1", 10, "Reserve")
    h.start("r1", 10, "Charge")  # stalled, not dead: its exit comes later
    h.claim(20)
    for name in STEP_NAMES[1:]:
        h.step("w2", 20, name)
    h.exit("r1", 10)
    assert "I4.no-overlap" in _names(h.check())


def test_a_step_run_by_a_process_that_does_not_hold_the_lease_is_caught() -> None:
    h = History()
    h.claim(10)
    for name in STEP_NAMES[:-1]:
        h.step("r1", 10, name)
    h.claim(20)
    h.step("r1", 10, STEP_NAMES[-1])
    assert "I4.lease-holder" in _names(h.check())


def test_a_checkpointed_step_run_again_is_caught() -> None:
    h = History()
    h.claim(10)
    h.step("r1", 10, "Reserve")
    h.start("r1", 10, "Reserve")
    h.end("r1", 10, "Reserve")
    for name in STEP_NAMES[1:]:
        h.step("r1", 10, name)
    assert "I5.act-not-rerun" in _names(h.check())


def _failing_at_ship() -> History:
    h = History(fail_step=2)
    h.claim(10)
    h.step("r1", 10, "Reserve")
    h.step("r1", 10, "Charge")
    h.start("r1", 10, "Ship")
    h.end("r1", 10, "Ship", outcome="error:StepFailed")
    h.checkpoint("Ship", "act", "FAILED", "COMPENSATING")
    return h


def test_a_clean_compensation_passes() -> None:
    h = _failing_at_ship()
    h.step("r1", 10, "Charge", "compensate")
    h.step("r1", 10, "Reserve", "compensate")
    assert h.check("FAILED").violations == []


def test_an_act_after_the_saga_became_compensating_is_caught() -> None:
    h = _failing_at_ship()
    h.step("r1", 10, "Charge", "compensate")
    h.start("r1", 10, "Notify")
    h.end("r1", 10, "Notify", outcome="error:StepFailed")
    h.step("r1", 10, "Reserve", "compensate")
    names = _names(h.check("FAILED"))
    assert {"I2.act-state", "I2.act-before-compensation"} <= names


def test_compensations_out_of_order_are_caught() -> None:
    h = _failing_at_ship()
    h.step("r1", 10, "Reserve", "compensate")
    h.step("r1", 10, "Charge", "compensate")
    names = _names(h.check("FAILED"))
    assert {"I3.reverse-order-log", "I3.reverse-order-start", "I3.reverse-order-events"} <= names


def test_a_compensation_run_again_after_its_checkpoint_is_caught() -> None:
    h = _failing_at_ship()
    h.step("r1", 10, "Charge", "compensate")
    h.start("r1", 10, "Charge", "compensate")
    h.end("r1", 10, "Charge", "compensate")
    h.step("r1", 10, "Reserve", "compensate")
    assert "I5.comp-not-rerun" in _names(h.check("FAILED"))


def test_an_unexpected_final_status_and_context_are_caught() -> None:
    h = _failing_at_ship()
    h.step("r1", 10, "Charge", "compensate")
    h.done.append("Ship")
    names = _names(h.check("PARKED"))
    assert {"I1.terminal", "I1.expected-status", "I6.context"} <= names


# -- forward recovery (ForwardSaga: Charge is the pivot; see crashsaga.FORWARD_RETRY) -----------

def _forward(**config: Any) -> History:
    h = History(**{"definition": "ForwardSaga", "fail_mode": "exhaust", **config})
    h.claim(10)
    return h


def _past_the_pivot(h: History) -> None:
    h.step("r1", 10, "Reserve")
    h.fail_attempt("r1", 10, "Charge", 1)  # 0.05 s: slept in the process
    h.step("r1", 10, "Charge", attempt=2)


def test_a_clean_forward_saga_with_waits_of_both_kinds_and_a_takeover_passes() -> None:
    h = _forward(act_transient={"1": 1, "4": 2})
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    h.start("r1", 10, "Notify")  # SIGKILLed here: this attempt is not counted
    h.exit("r1", 10)
    h.claim(20)
    h.step("w2", 20, "Notify")
    h.fail_attempt("w2", 20, "Invoice", 1, durable=True)  # 0.2 s: the saga WAITING
    h.claim(30)
    h.fail_attempt("w3", 30, "Invoice", 2, durable=True)
    h.claim(20)
    h.step("w2", 20, "Invoice", attempt=3)
    findings = h.check()
    assert findings.violations == []
    for name in ("I7.attempt-continues", "I7.budget", "I8.past-pivot-flag", "I9.retry-resumed",
                 "I9.not-early", "I9.due-respected"):
        assert findings.checks[name] > 0, name


def test_a_compensation_after_the_pivot_is_caught() -> None:
    h = _forward(fail_step=3)
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    for attempt in (1, 2):
        h.fail_attempt("r1", 10, "Notify", attempt)
    h.start("r1", 10, "Notify", attempt=3)
    h.end("r1", 10, "Notify", outcome="error:Transient", attempt=3)
    h.checkpoint("Notify", "act", "FAILED", "COMPENSATING", attempt=3)
    h.step("r1", 10, "Charge", "compensate")  # a broken engine undoes the point of no return
    h.step("r1", 10, "Reserve", "compensate")
    names = _names(h.check("FAILED"))
    assert {"I8.no-compensation-past-pivot", "I1.expected-status"} <= names


def test_a_stored_saga_that_does_not_say_it_is_past_its_pivot_is_caught() -> None:
    h = _forward()
    _past_the_pivot(h)
    h.past_pivot = False  # the pivot's checkpoint did not set the flag
    for name in STEP_NAMES[PIVOT + 1:]:
        h.step("r1", 10, name)
    assert "I8.past-pivot-flag" in _names(h.check())


def test_a_retry_after_the_saga_started_compensating_is_caught() -> None:
    h = _forward(fail_step=1, fail_mode="permanent")
    h.step("r1", 10, "Reserve")
    h.start("r1", 10, "Charge")
    h.end("r1", 10, "Charge", outcome="error:StepFailed")
    h.checkpoint("Charge", "act", "FAILED", "COMPENSATING", attempt=1)
    h.step("r1", 10, "Reserve", "compensate")
    h.start("r1", 10, "Charge", attempt=2)  # retried although the saga compensated
    h.end("r1", 10, "Charge", outcome="error:StepFailed", attempt=2)
    names = _names(h.check("FAILED"))
    assert {"I2.act-state", "I2.act-before-compensation"} <= names


def test_an_attempt_beyond_the_budget_is_caught() -> None:
    h = _forward(fail_step=3)
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    for attempt in (1, 2, 3):  # the budget is 3: the third must be the last
        h.fail_attempt("r1", 10, "Notify", attempt)
    h.start("r1", 10, "Notify", attempt=4)
    h.end("r1", 10, "Notify", outcome="error:Transient", attempt=4)
    h.checkpoint("Notify", "act", "FAILED", "PARKED", attempt=4)
    names = _names(h.check())
    assert {"I7.attempt-in-budget", "I7.budget", "I10.gave-up-rightly",
            "I10.parked-by-exhaustion"} <= names


def test_an_attempt_run_again_needs_a_crash_that_hit_it() -> None:
    def history(outcome: str) -> History:
        h = History()
        h.claim(10)
        h.step("r1", 10, "Reserve")
        h.start("r1", 10, "Charge")  # cut off before its checkpoint
        h.exit("r1", 10, outcome)
        h.claim(20)
        for name in STEP_NAMES[1:]:
            h.step("w2", 20, name)
        return h

    assert history("killed-self").check().violations == []  # the documented exception
    # the same history without a kill: the step ran twice, once too many
    assert "I7.budget" in _names(history("returncode=0").check())


def test_a_failed_attempt_counted_twice_or_not_at_all_is_caught() -> None:
    h = _forward(act_transient={"2": 2})
    _past_the_pivot(h)
    h.fail_attempt("r1", 10, "Ship", 1)
    h.fail_attempt("r1", 10, "Ship", 1)  # its checkpointed failure not counted
    h.step("r1", 10, "Ship", attempt=3)
    h.step("r1", 10, "Notify")
    h.step("r1", 10, "Invoice")
    assert {"I7.attempt-continues", "I7.log-attempts"} <= _names(h.check())


def test_a_saga_left_waiting_is_caught() -> None:
    h = _forward(act_transient={"4": 1})
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    h.step("r1", 10, "Notify")
    h.fail_attempt("r1", 10, "Invoice", 1, durable=True)  # and no worker ever resumed it
    names = _names(h.check())
    assert {"I9.no-saga-left-waiting", "I9.retry-resumed", "I1.terminal"} <= names


def test_a_waiting_saga_resumed_before_its_time_is_caught() -> None:
    h = _forward(act_transient={"4": 1})
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    h.step("r1", 10, "Notify")
    h.fail_attempt("r1", 10, "Invoice", 1, durable=True)
    h.clock -= 0.15  # the worker claims it 0.05 s after its failure: the policy waits 0.2 s
    h.claim(20)
    h.step("w2", 20, "Invoice", attempt=2)
    assert {"I9.not-early", "I9.due-respected"} <= _names(h.check())


def test_a_saga_parked_past_its_pivot_other_than_by_exhausted_retries_is_caught() -> None:
    h = _forward(fail_step=3)
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    h.fail_attempt("r1", 10, "Notify", 1)
    h.start("r1", 10, "Notify", attempt=2)
    h.end("r1", 10, "Notify", outcome="error:Transient", attempt=2)
    h.checkpoint("Notify", "act", "FAILED", "PARKED", attempt=2)  # gave up one attempt early
    names = _names(h.check())
    assert {"I10.parked-by-exhaustion", "I10.gave-up-rightly"} <= names


def test_a_forward_saga_meant_to_complete_that_parks_is_caught() -> None:
    h = _forward(act_transient={"3": 1})
    _past_the_pivot(h)
    h.step("r1", 10, "Ship")
    h.fail_attempt("r1", 10, "Notify", 1)
    h.checkpoint("Notify", "act", "FAILED", "PARKED", attempt=2)
    names = _names(h.check())
    assert {"I1.terminal", "I1.expected-status", "I10.gave-up-rightly"} <= names


def test_the_forward_crash_points_have_kinds_of_their_own() -> None:
    events = [Event(i, SID, None, None, "crash", point, f"p{i}", i) for i, point in
              enumerate(["wait:2", "waiting:4", "pivot:before", "pivot:after", "retry:3:mid",
                         "act:1:mid", "comp:0:end"], start=1)]
    assert crash_points(events) == {"in_wait": 1, "waiting": 1, "pivot": 2, "retried_attempt": 1,
                                    "in_step": 1, "checkpoint_boundary": 1}
