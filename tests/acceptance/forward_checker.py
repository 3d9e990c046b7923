"""The forward-recovery invariants of the crash-injection harness (I7 to I10), pure functions
over what it read back; :func:`tests.acceptance.checker.check_saga` calls them for every saga
(the definitions of the invariants are in :mod:`tests.acceptance.checker`'s docstring).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tests.acceptance.crashsaga import INDEX, PIVOT, STEP_NAMES, budget, wait_before

if TYPE_CHECKING:
    from tests.acceptance.checker import Event, FinalSaga, Findings, LogRow

PIVOT_NAME = STEP_NAMES[PIVOT]
CLOCK_SLACK = 0.001
"""Seconds two database timestamps may disagree by for the same instant: the clocks tick in
microseconds, but MariaDB takes "now" per statement, and one checkpoint is several (the log
entry's ``created_at`` and the row's ``next_attempt_at`` are microseconds apart there)."""


def completed_acts(log: Iterable[Sequence[Any]]) -> list[str]:
    """The steps whose act a log (entries as (id, step, action, status, ...)) shows COMPLETED."""
    return [entry[1] for entry in log if entry[2] == "act" and entry[3] == "COMPLETED"]


def kills_per_step(events: Sequence[Event], killed: set[str]) -> Counter[str]:
    """The interruptions that hit each step's act of one saga (its events, ordered by id), after
    which the attempt in hand runs again under the same number: per process SIGKILLed
    (``killed``), one for the step of its last act/compensate event for the saga; one per act
    cut off in flight (an ``end`` event ``error:CancelledError``: a graceful shutdown, the
    run's lease lost or possibly run out); and per run that stopped on a lease or version
    conflict or a storage error (an ``interrupted`` event: the lease lost or run out, a
    liveness session lost, the link to the database down), one for the step of that process's
    last act/compensate event for the saga before it, unless that act was cut off in flight
    (counted already)."""
    last: dict[str, Event] = {}
    hits: Counter[str] = Counter()
    for e in events:
        if e.phase == "interrupted":
            before = last.get(e.label)
            if before is not None and not _cut_off(before):
                _hit(hits, before)
        elif e.phase in ("start", "end") and e.action is not None:
            last[e.label] = e
            if _cut_off(e):
                _hit(hits, e)
    for label, e in last.items():
        if label in killed:
            _hit(hits, e)
    return hits


def _cut_off(e: Event) -> bool:
    return e.phase == "end" and e.outcome == "error:CancelledError"


def _hit(hits: Counter[str], e: Event | None) -> None:
    if e is not None and e.action == "act" and e.step is not None:
        hits[e.step] += 1


def check_forward(
    f: Findings,
    key: str,
    config: dict[str, Any],
    final: FinalSaga,
    log: Sequence[LogRow],
    events: Sequence[Event],
    hits: Counter[str],
) -> None:
    """I7 to I10 on one saga (see :mod:`tests.acceptance.checker`)."""
    definition = config.get("definition", "CrashSaga")
    starts = [e for e in events if e.phase == "start"]
    acts = [e for e in starts if e.action == "act"]
    _attempts(f, key, definition, log, acts, hits)
    _pivot(f, key, definition, final, log, events, starts)
    _waits(f, key, final, log, acts)
    if definition == "ForwardSaga":
        _give_ups(f, key, config, final, log)


def _snapshot_log(e: Event) -> list[tuple[Any, ...]]:
    return [tuple(x) for x in (e.snapshot or {}).get("log", [])]


def _attempts(f: Findings, key: str, definition: str, log: Sequence[LogRow],
              acts: Sequence[Event], hits: Counter[str]) -> None:
    for e in acts:
        step = e.step or ""
        where = f"act {step} attempt {e.attempt} by {e.label} (event {e.id})"
        most = budget(definition, step)
        f.check("I7.attempt-in-budget", e.attempt is not None and 1 <= e.attempt <= most, key,
                f"{where}: the budget is {most}")
        retrying = [x for x in _snapshot_log(e)
                    if x[1] == step and x[2] == "act" and x[3] == "RETRYING"]
        f.check("I7.attempt-continues", e.attempt == len(retrying) + 1, key,
                f"{where} started after {len(retrying)} failed attempts were checkpointed")
    for step, n in Counter(e.step or "" for e in acts).items():
        most = budget(definition, step)
        f.check("I7.budget", n <= most + hits[step], key,
                f"act {step} started {n} times: budget {most}, kills that hit it {hits[step]}")
    for step in STEP_NAMES:
        entries = [r for r in log if r.step == step and r.action == "act"]
        if not entries:
            continue
        numbers = [r.attempt for r in entries]
        expected: list[int | None] = (list(range(1, len(entries) + 1))
                                      if definition == "ForwardSaga" else [None])
        shape = (all(r.status == "RETRYING" for r in entries[:-1])
                 and entries[-1].status in ("COMPLETED", "FAILED"))
        f.check("I7.log-attempts", numbers == expected and shape, key,
                f"act entries of {step}: "
                + ", ".join(f"{r.status} attempt {r.attempt}" for r in entries))


def _pivot(f: Findings, key: str, definition: str, final: FinalSaga, log: Sequence[LogRow],
           events: Sequence[Event], starts: Sequence[Event]) -> None:
    has_pivot = definition == "ForwardSaga"
    past = has_pivot and PIVOT_NAME in completed_acts(r.key() for r in log)
    f.check("I8.past-pivot-flag", final.past_pivot == past, key,
            f"stored past_pivot={final.past_pivot}, but the log "
            + ("shows" if past else "does not show") + " the pivot completed")
    for e in starts:
        snap = e.snapshot or {}
        slog = _snapshot_log(e)
        shown = has_pivot and PIVOT_NAME in completed_acts(slog)
        where = f"{e.action} {e.step} by {e.label} (event {e.id})"
        f.check("I8.past-pivot-flag", bool(snap.get("past_pivot")) == shown, key,
                f"{where} saw past_pivot={snap.get('past_pivot')} with log {slog}")
        if e.action == "compensate":
            f.check("I8.no-compensation-past-pivot", not shown, key,
                    f"{where} started although the log shows the pivot {PIVOT_NAME} completed")
    if past:
        compensations = [e.id for e in events if e.action == "compensate"]
        logged = [r.step for r in log if r.action == "compensate"]
        f.check("I8.no-compensation-past-pivot",
                not compensations and not logged and final.status != "FAILED", key,
                f"past its pivot, ended {final.status} with compensate events {compensations} "
                f"and compensate entries {logged}")


def _waits(f: Findings, key: str, final: FinalSaga, log: Sequence[LogRow],
           acts: Sequence[Event]) -> None:
    f.check("I9.no-saga-left-waiting", final.status != "WAITING", key, "ended WAITING")
    by_id = {r.id: r for r in log}
    for r in log:
        if r.status != "RETRYING":
            continue
        resumed = [e.id for e in acts if e.step == r.step and e.attempt == (r.attempt or 1) + 1
                   and any(x[0] == r.id for x in _snapshot_log(e))]
        f.check("I9.retry-resumed", bool(resumed), key,
                f"{r.step} RETRYING (attempt {r.attempt}, log {r.id}) never led to attempt "
                f"{(r.attempt or 1) + 1}")
    for e in acts:
        snap = e.snapshot or {}
        now = snap.get("now")
        if now is None:
            continue
        where = f"act {e.step} attempt {e.attempt} by {e.label} (event {e.id})"
        due = snap.get("next_attempt_at")
        if due is not None:
            f.check("I9.due-respected", now >= due - CLOCK_SLACK, key,
                    f"{where} started {due - now:.4f}s before next_attempt_at")
        if e.attempt is None or e.attempt < 2:
            continue
        failed = next((x for x in _snapshot_log(e) if x[1] == e.step and x[2] == "act"
                       and x[3] == "RETRYING" and x[4] == e.attempt - 1), None)
        entry = None if failed is None else by_id.get(failed[0])
        if entry is None or entry.created_at is None:
            continue  # I7.attempt-continues or I5.log-append-only says what is wrong
        wait = wait_before(e.step or "", e.attempt)
        f.check("I9.not-early", now >= entry.created_at + wait - CLOCK_SLACK, key,
                f"{where} started {now - entry.created_at:.4f}s after attempt {e.attempt - 1} "
                f"failed (log {entry.id}); the policy waits {wait:g}s")


def _give_ups(f: Findings, key: str, config: dict[str, Any], final: FinalSaga,
              log: Sequence[LogRow]) -> None:
    fail_step, mode = config.get("fail_step"), config.get("fail_mode")
    for r in log:
        if r.action != "act" or r.status != "FAILED":
            continue
        configured = fail_step is not None and r.step == STEP_NAMES[fail_step]
        expected = 1 if mode == "permanent" else budget("ForwardSaga", r.step)
        f.check("I10.gave-up-rightly", configured and r.attempt == expected, key,
                f"{r.step} FAILED at attempt {r.attempt} (configured: "
                + (f"{STEP_NAMES[fail_step]} fails, {mode}" if fail_step is not None
                   else "no failure") + f"; expected attempt {expected})")
    if final.status == "PARKED" and final.past_pivot:
        last = log[-1] if log else None
        ok = (last is not None and last.action == "act" and last.status == "FAILED"
              and INDEX.get(last.step, -1) > PIVOT
              and last.attempt == budget("ForwardSaga", last.step))
        f.check("I10.parked-by-exhaustion", ok, key,
                "PARKED past its pivot, last log entry "
                + ("none" if last is None else
                   f"{last.step} {last.action} {last.status} attempt {last.attempt}"))
