"""The harness's invariant checker on hand-made histories: clean ones pass, broken ones are caught."""

from __future__ import annotations

from typing import Any

import pytest

from tests.acceptance.checker import Event, FinalSaga, Findings, LogRow, check_all, crash_points
from tests.acceptance.crashsaga import STEP_NAMES

pytestmark = pytest.mark.acceptance

SID = "00000000-0000-4000-8000-000000000001"


class History:
    """Builds one saga's log and events the way sagakit and the harness steps would write them."""

    def __init__(self, **config: Any) -> None:
        self.config = {"key": "s000", "fail_step": None, "comp_permanent": None, **config}
        self.log: list[LogRow] = []
        self.events: list[Event] = []
        self.status = "RUNNING"
        self.owner_pid = 0
        self.done: list[str] = []
        self._id = 0

    def _next(self) -> int:
        self._id += 1
        return self._id

    def claim(self, pid: int) -> None:
        self.owner_pid = pid

    def start(self, label: str, pid: int, step: str, action: str = "act") -> None:
        snapshot = {"status": self.status, "owner": f"host:{self.owner_pid}:abc",
                    "log": [list(r.key()) for r in self.log]}
        self.events.append(Event(self._next(), SID, step, action, "start", None, label, pid,
                                 snapshot))

    def end(self, label: str, pid: int, step: str, action: str = "act",
            outcome: str = "ok") -> None:
        self.events.append(Event(self._next(), SID, step, action, "end", outcome, label, pid))

    def checkpoint(self, step: str, action: str, status: str, saga_status: str | None = None) -> None:
        self.log.append(LogRow(len(self.log) + 1, step, action, status))
        if action == "act" and status == "COMPLETED":
            self.done.append(step)
        if status == "COMPENSATED":
            self.done.remove(step)
        if saga_status:
            self.status = saga_status

    def step(self, label: str, pid: int, step: str, action: str = "act") -> None:
        self.start(label, pid, step, action)
        self.end(label, pid, step, action)
        status = "COMPLETED" if action == "act" else "COMPENSATED"
        last = action == "act" and step == STEP_NAMES[-1]
        self.checkpoint(step, action, status, "COMPLETED" if last else None)

    def exit(self, label: str, pid: int, outcome: str = "killed-by-parent") -> None:
        self.events.append(Event(self._next(), None, None, None, "exit", outcome, label, pid))

    def check(self, status: str | None = None) -> Findings:
        final = FinalSaga(SID, status or self.status, {"done": list(self.done)}, 0)
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
