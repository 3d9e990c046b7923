"""The queue-workers checks on journals written by hand: a clean one passes, and each broken
limit, lost saga or double run is flagged with its evidence (the checks are only worth
something if they notice)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.acceptance.checker import Event
from tests.acceptance.queue_checker import (
    Planned,
    QueueFindings,
    Span,
    check_queue_run,
    crowd,
    process_of,
)
from tests.acceptance.queue_runner import QUEUES, STEP_NAMES

FULL_LOG = [(name, "act", "COMPLETED") for name in STEP_NAMES]


class Journal:
    """Events in the order they are added (ids 1, 2, ...); process ``w<n>`` runs as pid n, and
    its acts write the label ``w<n>/<run>``."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def _add(self, phase: str, saga: str | None, step: str | None, label: str,
             outcome: str | None = None, snapshot: dict[str, Any] | None = None) -> int:
        pid = int(process_of(label)[1:])
        self.events.append(Event(len(self.events) + 1, saga, step, None if step is None
                                 else "act", phase, outcome, label, pid, snapshot))
        return len(self.events)

    def start(self, saga: str, step: str, process: str, run: int = 1,
              owner_pid: int | None = None) -> int:
        pid = int(process[1:]) if owner_pid is None else owner_pid
        return self._add("start", saga, step, f"{process}/{run}", None,
                         {"status": "RUNNING", "owner": f"host:{pid}:ab12-1", "log": []})

    def end(self, saga: str, step: str, process: str, run: int = 1) -> int:
        return self._add("end", saga, step, f"{process}/{run}", "ok")

    def act(self, saga: str, step: str, process: str, run: int = 1) -> None:
        self.start(saga, step, process, run)
        self.end(saga, step, process, run)

    def saga(self, saga: str, process: str, run: int = 1) -> None:
        for step in STEP_NAMES:
            self.act(saga, step, process, run)

    def exit(self, label: str, killed: bool = False) -> int:
        return self._add("exit", None, None, label,
                         "killed-by-parent" if killed else "returncode=0")

    def check(self, plan: dict[str, Planned], statuses: dict[str, str | None] | None = None,
              logs: dict[str, Any] | None = None, exits: tuple[str, ...] = ("w1", "w2", "w3",
                                                                          "w4")) -> QueueFindings:
        """Check with every saga COMPLETED and fully logged unless told otherwise; the given
        processes exit (in that order) after everything else."""
        for label in exits:
            self.exit(label)
        final = dict.fromkeys(plan, "COMPLETED")
        for sid, status in (statuses or {}).items():
            if status is None:
                del final[sid]
            else:
                final[sid] = status
        full = dict.fromkeys(plan, FULL_LOG)
        full.update(logs or {})
        return check_queue_run(plan, QUEUES, final, full, self.events)


def flagged(f: QueueFindings, name: str) -> list[str]:
    return [v for v in f.violations if v.startswith(f"[{name}]")]


def emails(*sagas: str) -> dict[str, Planned]:
    return {s: Planned("emails") for s in sagas}


def test_a_clean_journal_passes_and_reports_the_peaks() -> None:
    j = Journal()
    for step in STEP_NAMES:  # three emails sagas in lockstep: at the limit, never past it
        for saga, label in (("e1", "w1"), ("e2", "w2"), ("e3", "w1")):
            j.start(saga, step, label)
        for saga, label in (("e1", "w1"), ("e2", "w2"), ("e3", "w1")):
            j.end(saga, step, label)
    j.saga("o1", "w3")
    j.saga("o2", "w4")  # same customer, after o1
    plan = {**emails("e1", "e2", "e3"), "o1": Planned("orders", "c-1"),
            "o2": Planned("orders", "c-1")}
    f = j.check(plan)
    assert f.violations == []
    assert f.peaks["Q4.queue-steps emails"] == (3, 3)
    assert f.peaks["Q5.queue-runs emails"] == (3, 3)
    assert f.peaks["Q4.key-steps orders (busiest key)"] == (1, 1)
    for name in ("Q1.completed", "Q2.log-shape", "Q3.lease-holder", "Q3.no-overlap-runs",
                 "Q4.queue-steps", "Q4.key-steps", "Q5.queue-runs", "Q5.key-runs"):
        assert f.checks[name] > 0, name


def test_one_saga_too_many_in_a_queue_is_flagged_with_the_open_acts() -> None:
    j = Journal()
    for saga, label in (("e1", "w1"), ("e2", "w2"), ("e3", "w3")):
        j.start(saga, "Prepare", label)
    fourth = j.start("e4", "Prepare", "w4")
    for saga, label in (("e1", "w1"), ("e2", "w2"), ("e3", "w3"), ("e4", "w4")):
        j.end(saga, "Prepare", label)
    for saga, label in (("e1", "w1"), ("e2", "w2"), ("e3", "w3"), ("e4", "w4")):
        j.act(saga, "Perform", label)
        j.act(saga, "Confirm", label)
    f = j.check(emails("e1", "e2", "e3", "e4"))
    [violation] = flagged(f, "Q4.queue-steps")
    assert "queue 'emails'" in violation
    assert f"4 sagas in steps at once (limit 3); first over the limit at event {fourth}" in violation
    assert all(s in violation for s in ("e1", "e2", "e3", "e4"))
    assert flagged(f, "Q5.queue-runs")


def test_two_sagas_of_one_key_at_once_are_flagged_but_other_keys_and_no_key_are_not() -> None:
    j = Journal()
    j.start("o1", "Prepare", "w1")
    j.start("o2", "Prepare", "w2")  # another customer: fine
    j.start("o3", "Prepare", "w3")  # o1's customer: one too many
    for saga, label in (("o1", "w1"), ("o2", "w2"), ("o3", "w3")):
        j.end(saga, "Prepare", label)
    for saga, label in (("o1", "w1"), ("o2", "w2"), ("o3", "w3")):
        j.act(saga, "Perform", label)
        j.act(saga, "Confirm", label)
    for saga in ("r1", "r2", "r3"):  # reports sagas without a key: no key limit applies
        j.start(saga, "Prepare", "w4")
    for saga in ("r1", "r2", "r3"):
        j.end(saga, "Prepare", "w4")
        j.act(saga, "Perform", "w4")
        j.act(saga, "Confirm", "w4")
    plan = {"o1": Planned("orders", "c-1"), "o2": Planned("orders", "c-2"),
            "o3": Planned("orders", "c-1"), "r1": Planned("reports"), "r2": Planned("reports"),
            "r3": Planned("reports")}
    f = j.check(plan)
    [violation] = flagged(f, "Q4.key-steps")
    assert "queue 'orders' key 'c-1'" in violation
    assert "o3" in violation
    assert flagged(f, "Q5.key-runs")
    assert not flagged(f, "Q4.queue-steps")


def test_a_saga_between_its_steps_still_holds_its_slot() -> None:
    """Two sagas of one key take turns step by step: their acts never overlap, but each is
    leased while the other runs an act. Only the run intervals see it."""
    j = Journal()
    for step in STEP_NAMES:
        j.act("t1", step, "w1")
        j.act("t2", step, "w2")
    f = j.check({"t1": Planned("reports", "k"), "t2": Planned("reports", "k")})
    assert not flagged(f, "Q4.key-steps")  # at most 2 at once (the limit), as acts go
    assert not flagged(f, "Q5.key-runs")
    j = Journal()
    for step in STEP_NAMES:
        j.act("t1", step, "w1")
        j.act("t2", step, "w2")
        j.act("t3", step, "w3")
    f = j.check({s: Planned("reports", "k") for s in ("t1", "t2", "t3")})
    assert not flagged(f, "Q4.key-steps")
    [violation] = flagged(f, "Q5.key-runs")
    assert "3 sagas in runs at once (limit 2)" in violation


@pytest.mark.parametrize("before_exit", [False, True])
def test_a_killed_process_holds_its_slot_until_its_exit_event(before_exit: bool) -> None:
    j = Journal()
    j.start("e1", "Prepare", "w1")
    j.start("e2", "Prepare", "w2")
    j.start("e3", "Prepare", "w2")
    if before_exit:
        j.start("e4", "Prepare", "w3")  # w1 is not known dead yet: four at once
    j.exit("w1", killed=True)
    if not before_exit:
        j.start("e4", "Prepare", "w3")  # e1's slot is free as far as the journal can tell
    for saga, label in (("e2", "w2"), ("e3", "w2"), ("e4", "w3")):
        j.end(saga, "Prepare", label)
        j.act(saga, "Perform", label)
        j.act(saga, "Confirm", label)
    j.saga("e1", "w3", run=2)
    f = j.check(emails("e1", "e2", "e3", "e4"), exits=("w2", "w3"))
    assert bool(flagged(f, "Q4.queue-steps")) is before_exit
    assert (f.cut_steps, f.killed_in_step) == (1, 1)


def test_a_process_is_dead_from_its_sigkill_on_not_from_its_later_exit_event() -> None:
    """Its liveness session gone with it, a killed worker's saga is taken over at once; the
    harness may notice the exit later: the act ends at the ``killed`` event."""
    j = Journal()
    j.start("e1", "Prepare", "w1")
    j._add("killed", None, None, "w1", "SIGKILL")
    j.saga("e1", "w2", run=1)
    j.exit("w1", killed=True)
    f = j.check(emails("e1"), exits=("w2",))
    assert not flagged(f, "Q3.no-overlap-steps")
    assert (f.cut_steps, f.killed_in_step) == (1, 1)

    j = Journal()  # an act begun after the mark (before the signal landed) ends with it
    j._add("killed", None, None, "w1", "SIGKILL")
    j.start("e1", "Prepare", "w1")
    j.saga("e1", "w2", run=1)
    j.exit("w1", killed=True)
    f = j.check(emails("e1"), exits=("w2",))
    assert not flagged(f, "Q3.no-overlap-steps")
    assert f.cut_steps == 1

    j = Journal()  # without the kill recorded, the same journal shows an overlap
    j.start("e1", "Prepare", "w1")
    j.saga("e1", "w2", run=1)
    j.exit("w1", killed=True)
    assert flagged(j.check(emails("e1"), exits=("w2",)), "Q3.no-overlap-steps")


def test_a_process_without_an_exit_event_never_ends_its_open_act() -> None:
    j = Journal()
    j.start("o1", "Prepare", "w1")  # w1's death was never recorded
    j.saga("o1", "w2", run=1)
    j.saga("o2", "w2")
    f = j.check({"o1": Planned("orders", "c"), "o2": Planned("orders", "c")},
                exits=("w2",))
    assert "never" in flagged(f, "Q4.key-steps")[0]
    assert flagged(f, "Q3.no-overlap-steps")


def test_two_processes_in_one_saga_at_once_are_flagged() -> None:
    j = Journal()
    j.start("e1", "Prepare", "w1")
    j.start("e1", "Prepare", "w2")
    j.end("e1", "Prepare", "w1")
    j.end("e1", "Prepare", "w2")
    j.act("e1", "Perform", "w2")
    j.act("e1", "Confirm", "w2")
    f = j.check(emails("e1"))
    [violation] = flagged(f, "Q3.no-overlap-steps")
    assert "by w1" in violation
    assert "by w2" in violation

    j = Journal()  # w1 still holds the saga between its acts while w2 runs one
    j.act("e1", "Prepare", "w1")
    j.act("e1", "Perform", "w2")
    j.act("e1", "Confirm", "w1")
    f = j.check(emails("e1"))
    assert not flagged(f, "Q3.no-overlap-steps")
    assert flagged(f, "Q3.no-overlap-runs")


def test_two_runs_of_one_saga_at_once_in_one_process_are_flagged() -> None:
    """A worker whose lease ran out under it may claim the saga again while its first run is
    still in an act: the same process, two runs."""
    j = Journal()
    j.start("e1", "Prepare", "w1", run=4)
    j.saga("e1", "w1", run=9)
    j._add("end", "e1", "Prepare", "w1/4", "error:CancelledError")
    f = j.check(emails("e1"))
    [violation] = flagged(f, "Q3.no-overlap-steps")
    assert "by w1/4" in violation
    assert "by w1/9" in violation
    assert flagged(f, "Q3.no-overlap-runs")
    assert f.errored_steps == ["e1 act Prepare by w1/4 (event 8): error:CancelledError"]


def test_runs_of_one_process_are_told_apart_by_their_numbers() -> None:
    """w1 runs o1's first act, gives the saga up, o2 (same key) runs, then w1 runs o1 again:
    two runs, not one long one."""
    j = Journal()
    j.act("o1", "Prepare", "w1", run=1)
    j.saga("o2", "w2")
    j.act("o1", "Perform", "w1", run=2)
    j.act("o1", "Confirm", "w1", run=2)
    f = j.check({"o1": Planned("orders", "c"), "o2": Planned("orders", "c")})
    assert f.violations == []
    j = Journal()  # the same journal without run numbers would be a broken key limit
    j.act("o1", "Prepare", "w1", run=1)
    j.saga("o2", "w2")
    j.act("o1", "Perform", "w1", run=1)
    j.act("o1", "Confirm", "w1", run=1)
    f = j.check({"o1": Planned("orders", "c"), "o2": Planned("orders", "c")})
    assert flagged(f, "Q5.key-runs")


@pytest.mark.parametrize(("damage", "check"), [
    ({"statuses": {"e1": None}}, "Q1.exists"),
    ({"statuses": {"e1": "PENDING"}}, "Q1.completed"),
    ({"statuses": {"e1": "FAILED"}}, "Q1.completed"),
    ({"logs": {"e1": [*FULL_LOG, ("Confirm", "act", "COMPLETED")]}}, "Q2.log-shape"),
    ({"logs": {"e1": FULL_LOG[:2]}}, "Q2.log-shape"),
    ({"logs": {"e1": [FULL_LOG[1], FULL_LOG[0], FULL_LOG[2]]}}, "Q2.log-shape"),
    ({"logs": {"e1": [*FULL_LOG, ("Confirm", "compensate", "COMPENSATED")]}}, "Q2.log-shape"),
])
def test_a_lost_unfinished_or_misrun_saga_is_flagged(damage: dict[str, Any], check: str) -> None:
    j = Journal()
    j.saga("e1", "w1")
    f = j.check(emails("e1"), **damage)
    assert flagged(f, check), f.violations


def test_the_journal_must_match_the_log_and_the_leases() -> None:
    j = Journal()
    j.act("e1", "Prepare", "w1")
    j.start("e1", "Perform", "w1")  # no end, yet the log says COMPLETED
    j.start("e1", "Confirm", "w1", owner_pid=2)  # someone else's lease
    j.end("e1", "Confirm", "w1")
    j.saga("stray", "w2")
    j._add("anomaly", "e1", "Prepare", "w1", "already in context.done")
    f = j.check(emails("e1"))
    assert "act Perform is COMPLETED in the log" in flagged(f, "Q2.journal-complete")[0]
    assert "leased by 'host:2:ab12-1'" in flagged(f, "Q3.lease-holder")[0]
    assert "stray" in flagged(f, "Q1.known-sagas")[0]
    assert "already in context.done" in flagged(f, "Q2.no-anomaly")[0]


def test_crowd_counts_distinct_sagas_and_closes_before_it_opens() -> None:
    spans = [Span("a", "w1", 1, 5, "x"), Span("a", "w2", 2, 6, "x"),  # one saga, twice
             Span("b", "w1", 3, 4, "x"), Span("c", "w3", 5, 8, "x")]
    c = crowd(spans, limit=2)
    assert (c.most, c.most_at, c.over_at) == (2, 3, None)
    c = crowd(spans, limit=1)
    assert c.over_at == 3
    assert [s.saga for s in c.evidence] == ["a", "a", "b"]
