"""The invariants the crash-injection harness checks, as pure functions over what it read back.

Inputs: each saga's configuration (its initial context), its final row (status, context), its
step log *with the log's ids*, and the events table (see :mod:`tests.acceptance.crashsaga`),
including one ``exit`` event per process the harness started, written by the harness after it
saw the process end (so its id is greater than the id of every event that process wrote).

Orders are compared by ids, never by clocks: the events' autoincrement id, and the ids of
sagakit's log entries as seen in the *snapshot* a step's ``start`` event carries (one SELECT of
the saga's committed row and log, taken when the act/compensate began). A snapshot read after a
checkpoint committed sees that checkpoint; so "the act started after the saga became
COMPENSATING" is exactly "the act's snapshot shows COMPENSATING (or the failed act)".

The invariants (each check counted under its name):

I1 terminal
    ``I1.terminal``: the saga is COMPLETED or FAILED, or PARKED and configured with a permanently
    failing compensation. ``I1.expected-status``: the status is the one its configuration
    implies (PARKED if a compensation fails for good, else FAILED if an act fails, else
    COMPLETED).
I2 no act after COMPENSATING
    ``I2.act-state``: every act's snapshot shows the saga RUNNING with no failed act in its log.
    ``I2.act-before-compensation``: every act start event precedes (by id) the saga's first
    compensate start event.
I3 compensations in reverse order, each at most once after it succeeded
    ``I3.compensated-once``: at most one COMPENSATED log entry per step.
    ``I3.compensates-completed``: each COMPENSATED entry follows an ACT COMPLETED of that step.
    ``I3.reverse-order-log``: the COMPENSATED entries' step indexes strictly decrease.
    ``I3.all-compensated``: a FAILED saga has compensated exactly the steps whose act completed.
    ``I3.comp-state``: a compensation's snapshot shows the saga COMPENSATING, the step's act
    COMPLETED.
    ``I3.reverse-order-start``: when step k's compensation starts, every later step whose act
    completed is already COMPENSATED, and no earlier step is. Exception, sagakit's documented
    behaviour: a compensation that failed for good does not stop the earlier ones (the
    compensator gives every step its chance), so the configured permanently failing step is
    exempt on both sides.
    ``I3.reverse-order-events``: the successful compensate ``end`` events of a saga, in id order,
    have non-increasing step indexes (a compensation re-run after a crash that cut it off
    before its checkpoint repeats the same index).
I4 one process in a saga at a time
    ``I4.lease-holder``: each act/compensate snapshot shows the saga leased by the process
    running it (the lease owner id embeds the pid).
    ``I4.no-overlap``: per saga, the intervals [start event id, end event id] of different
    processes do not overlap. A start without an end (the process was SIGKILLed) ends at the
    process's ``exit`` event; with no exit event it never ends.
I5 a checkpointed step is never run again
    ``I5.act-not-rerun``: no act's snapshot already holds an ACT COMPLETED entry for that step.
    ``I5.comp-not-rerun``: no compensation's snapshot already holds a COMPENSATED entry for it.
    ``I5.act-completed-once``: at most one ACT COMPLETED log entry per step.
    ``I5.log-append-only``: every snapshot's log is a prefix of the final log (same ids, same
    entries): nothing written was ever rewritten or lost.
I6 the final context matches the steps in effect
    ``I6.context``: the final ``context.done`` lists exactly the steps whose act is COMPLETED
    and not COMPENSATED in the log, in step order.
    ``I6.log-shape``: a COMPLETED saga logs every act COMPLETED and no compensation; a FAILED or
    PARKED one logs the configured act as FAILED.
    ``I6.no-anomaly``: no act found its own effect already in the context it received, nor
    what a failed attempt left in it (every attempt starts from the last checkpoint's context),
    and no compensation found its effect missing.

Forward recovery (:class:`~tests.acceptance.crashsaga.ForwardSaga`; the checks run on
CrashSaga too, whose every step has a budget of one attempt and no pivot):

I7 attempts never exceed the budget, except as documented for crashes
    ``I7.attempt-in-budget``: every act start's attempt number is within its step's budget
    (:func:`~tests.acceptance.crashsaga.budget`).
    ``I7.attempt-continues``: an act's attempt number is one more than the RETRYING entries of
    its step in its snapshot (recovery continues the count; an attempt cut off by a crash
    before its checkpoint is not counted, so it runs again under the same number).
    ``I7.budget``: a step's act starts number at most its budget plus the interruptions that
    hit it: the SIGKILLed processes whose last act/compensate event for the saga was that
    step's act (started, or ended with its checkpoint maybe not written); the attempts of that
    act cut off in flight (an ``end`` event ``error:CancelledError``: a graceful shutdown, the
    run's lease lost or possibly run out); and the runs that stopped on a lease or version
    conflict or a storage error (an ``interrupted`` event: a lease lost or run out under a
    loaded machine or a faulty link, the database unreachable) whose process's last such event
    before it was that step's act. An upper bound: a process killed later, elsewhere, still
    counts for the last step it ran.
    ``I7.log-attempts``: the log's act entries of a step number their attempts 1, 2, ... (all
    None for a step without a policy), every one RETRYING but the last, which is COMPLETED or
    FAILED.
I8 nothing is compensated after the pivot
    ``I8.no-compensation-past-pivot``: no compensation's snapshot shows the pivot's act
    COMPLETED; a saga whose final log shows it has no compensate event or log entry and did
    not end FAILED.
    ``I8.past-pivot-flag``: the stored ``past_pivot`` (in every snapshot, and at the end) is
    true exactly when the log shows the pivot COMPLETED (one checkpoint writes both).
I9 every waiting saga resumes, not before its time
    ``I9.no-saga-left-waiting``: no saga ends WAITING.
    ``I9.retry-resumed``: every RETRYING entry (attempt n) is followed by an act start of
    attempt n + 1 of its step whose snapshot shows that entry.
    ``I9.not-early``: an act start of attempt n >= 2 comes no earlier than the RETRYING entry
    of attempt n - 1 was written plus the policy's wait before attempt n (recomputed from the
    policy), on the database's clock (the snapshot's "now" against the entry's ``created_at``),
    within :data:`tests.acceptance.forward_checker.CLOCK_SLACK` (a millisecond).
    ``I9.due-respected``: no act starts before the ``next_attempt_at`` its snapshot shows.
I10 give up only as configured
    ``I10.gave-up-rightly``: a FAILED act entry of a retried step is the configured failure:
    at attempt 1 for a permanent one, at the last attempt of the budget for one that fails at
    every attempt.
    ``I10.parked-by-exhaustion``: a saga PARKED past its pivot was parked by exhausted retries:
    its last log entry is the FAILED act, at the budget's last attempt, of a step after the
    pivot. (And a saga meant to complete completes: ``I1.expected-status``.)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from tests.acceptance.crashsaga import INDEX, PIVOT, STEP_NAMES
from tests.acceptance.forward_checker import check_forward, completed_acts, kills_per_step

__all__ = ["CATEGORIES", "Event", "FinalSaga", "Findings", "LogRow", "check_all",
           "check_saga", "crash_points", "expected_status"]

INFINITY = float("inf")


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    id: int
    saga_id: str | None
    step: str | None
    action: str | None
    phase: str
    outcome: str | None
    label: str
    pid: int
    snapshot: dict[str, Any] | None = None
    attempt: int | None = None

    @classmethod
    def from_row(cls, row: Any) -> Event:
        snap = row.snapshot
        return cls(row.id, row.saga_id, row.step, row.action, row.phase, row.outcome, row.label,
                   row.pid, None if snap is None else json.loads(snap), row.attempt)


@dataclasses.dataclass(frozen=True, slots=True)
class LogRow:
    id: int
    step: str
    action: str
    status: str
    attempt: int | None = None
    created_at: float | None = None
    """Seconds since the epoch, on the database's clock."""

    def key(self) -> tuple[int, str, str, str, int | None]:
        """What a snapshot's log shows of the entry."""
        return (self.id, self.step, self.action, self.status, self.attempt)


@dataclasses.dataclass(frozen=True, slots=True)
class FinalSaga:
    saga_id: str
    status: str
    context: dict[str, Any]
    attempts: int
    past_pivot: bool = False


@dataclasses.dataclass
class Findings:
    checks: Counter[str] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)

    def check(self, name: str, ok: bool, saga: str, message: str) -> None:
        self.checks[name] += 1
        if not ok:
            self.violations.append(f"[{name}] saga {saga}: {message}")

    @property
    def total(self) -> int:
        return sum(self.checks.values())


def expected_status(config: dict[str, Any]) -> str:
    """PARKED if a compensation fails for good, or a ForwardSaga step after the pivot fails at
    every attempt; else FAILED if an act fails for good; else COMPLETED."""
    fail_step = config.get("fail_step")
    if config.get("comp_permanent") is not None:
        return "PARKED"
    if fail_step is None:
        return "COMPLETED"
    if config.get("definition") == "ForwardSaga" and fail_step > PIVOT:
        return "PARKED"
    return "FAILED"


@dataclasses.dataclass(frozen=True, slots=True)
class Interval:
    label: str
    start: int
    end: float
    what: str


def deaths(events: Sequence[Event]) -> dict[str, int]:
    """Process label -> the id of the first event after which it ran no more: its ``exit``
    (recorded when the harness notices), or sooner the harness's SIGKILL (``killed``) or its own
    (``crash``, recorded right before it kills itself). A dead worker's sagas may be taken over
    before its exit is noticed (its liveness session is gone with it)."""
    out: dict[str, int] = {}
    for e in events:
        if e.phase in ("exit", "killed", "crash") and e.label not in out:
            out[e.label] = e.id
    return out


def intervals(events: Sequence[Event], exits: dict[str, int]) -> list[Interval]:
    """The act/compensate intervals of one saga's events (ordered by id). An act without an
    end event ends at its process's death, or at the ``interrupted`` event of its run (the
    run's step was cut off, and the end record went down with the link it was cut off for)."""
    out: list[Interval] = []
    open_: dict[tuple[str, str, str], Event] = {}
    for e in events:
        if e.phase == "interrupted":  # the run stopped: its acts had ended, recorded or not
            for key in [k for k in open_ if k[0] == e.label]:
                start = open_.pop(key)
                out.append(Interval(e.label, start.id, e.id,
                                    f"{start.action} {start.step} (cut off: no end recorded)"))
            continue
        if e.phase not in ("start", "end") or e.step is None or e.action is None:
            continue
        key = (e.label, e.step, e.action)
        if e.phase == "start":
            previous = open_.pop(key, None)
            if previous is not None:  # cannot happen unless an end was lost: keep it open-ended
                out.append(Interval(e.label, previous.id, _died(exits, e.label, previous.id),
                                    f"{previous.action} {previous.step}"))
            open_[key] = e
        else:
            start = open_.pop(key, None)
            if start is not None:
                out.append(Interval(e.label, start.id, e.id, f"{e.action} {e.step}"))
    for start in open_.values():
        out.append(Interval(start.label, start.id, _died(exits, start.label, start.id),
                            f"{start.action} {start.step} (no end: process died)"))
    return sorted(out, key=lambda i: i.start)


def _died(exits: dict[str, int], label: str, start: int) -> float:
    """Where an act begun at ``start`` and never ended stops: at its process's death mark, or,
    begun after it (the harness marks a SIGKILL just before sending it), an instant later."""
    died = exits.get(label, INFINITY)
    return died if died > start else start + 0.5


def _compensated(log: Iterable[Sequence[Any]]) -> list[str]:
    return [entry[1] for entry in log if entry[2] == "compensate" and entry[3] == "COMPENSATED"]


def check_saga(
    f: Findings,
    sid: str,
    config: dict[str, Any],
    final: FinalSaga | None,
    log: Sequence[LogRow],
    events: Sequence[Event],
    exits: dict[str, int],
    killed: set[str] | None = None,
) -> None:
    key = f"{sid} ({config.get('key')}, {config.get('definition', 'CrashSaga')})"
    f.check("I1.exists", final is not None, key, "the saga was never created")
    if final is None:
        return
    permanent = config.get("comp_permanent")
    fail_step = config.get("fail_step")
    deaths = {e.label for e in events if e.phase == "start"} & (killed or set())
    f.check("I1.terminal", final.status in ("COMPLETED", "FAILED")
            or (final.status == "PARKED" and expected_status(config) == "PARKED"), key,
            f"ended {final.status} after {final.attempts} recovery attempts; processes that "
            f"ran its steps and were SIGKILLed: {len(deaths)}")
    f.check("I1.expected-status", final.status == expected_status(config), key,
            f"ended {final.status}, expected {expected_status(config)}")

    final_log = [row.key() for row in log]
    completed = completed_acts(final_log)
    compensated = _compensated(final_log)

    # -- I5/I3 on the log itself
    for name, n in Counter(completed).items():
        f.check("I5.act-completed-once", n == 1, key, f"act {name} COMPLETED {n} times")
    for name, n in Counter(compensated).items():
        f.check("I3.compensated-once", n == 1, key, f"{name} COMPENSATED {n} times")
    for position, entry in enumerate(final_log):
        if entry[2] == "compensate" and entry[3] == "COMPENSATED":
            before = completed_acts(final_log[:position])
            f.check("I3.compensates-completed", entry[1] in before, key,
                    f"{entry[1]} COMPENSATED without a completed act before it")
    if compensated:
        order = [INDEX[n] for n in compensated]
        f.check("I3.reverse-order-log", all(a > b for a, b in itertools.pairwise(order)),
                key, f"compensated in the order {compensated}")
    if final.status == "FAILED":
        f.check("I3.all-compensated", sorted(compensated) == sorted(completed), key,
                f"completed {completed} but compensated {compensated}")

    # -- I6 the final context and the log's shape
    in_effect = [n for n in STEP_NAMES if n in completed and n not in compensated]
    done = final.context.get("done")
    f.check("I6.context", done == in_effect, key,
            f"context.done={done}, but the log has {in_effect} in effect")
    if final.status == "COMPLETED":
        f.check("I6.log-shape", completed == STEP_NAMES and not any(
            e[2] == "compensate" for e in final_log), key, f"COMPLETED with log {final_log}")
    elif fail_step is not None:
        failed = [e[1] for e in final_log if e[2] == "act" and e[3] == "FAILED"]
        f.check("I6.log-shape", failed == [STEP_NAMES[fail_step]], key,
                f"expected act {STEP_NAMES[fail_step]} FAILED once, log has {failed}")
    anomalies = [e for e in events if e.phase == "anomaly"]
    f.check("I6.no-anomaly", not anomalies, key,
            "; ".join(f"{e.action} {e.step} by {e.label}: {e.outcome}" for e in anomalies))

    # -- the snapshots of act/compensate starts: I2, I3, I4, I5
    starts = [e for e in events if e.phase == "start"]
    comp_starts = [e.id for e in starts if e.action == "compensate"]
    first_comp = min(comp_starts) if comp_starts else None
    for e in starts:
        snap = e.snapshot or {"status": None, "owner": None, "log": []}
        slog = [tuple(x) for x in snap["log"]]
        k = INDEX[e.step or ""]
        where = f"{e.action} {e.step} by {e.label} (event {e.id})"
        f.check("I5.log-append-only", slog == final_log[:len(slog)], key,
                f"{where} saw log {slog}, final log is {final_log}")
        owner = snap.get("owner") or ""
        parts = owner.rsplit(":", 2)
        f.check("I4.lease-holder", len(parts) == 3 and parts[1] == str(e.pid), key,
                f"{where} (pid {e.pid}) ran while the lease owner was {owner or None!r}")
        s_completed, s_compensated = completed_acts(slog), _compensated(slog)
        if e.action == "act":
            failed_acts = [x for x in slog if x[2] == "act" and x[3] == "FAILED"]
            f.check("I2.act-state", snap["status"] == "RUNNING" and not failed_acts, key,
                    f"{where} started while the saga was {snap['status']} "
                    f"(failed acts: {failed_acts})")
            if first_comp is not None:
                f.check("I2.act-before-compensation", e.id < first_comp, key,
                        f"{where} started after the first compensation (event {first_comp})")
            f.check("I5.act-not-rerun", e.step not in s_completed, key,
                    f"{where} ran although its completion was checkpointed")
        else:
            f.check("I3.comp-state", snap["status"] == "COMPENSATING" and e.step in s_completed,
                    key, f"{where} started with status {snap['status']}, completed {s_completed}")
            f.check("I5.comp-not-rerun", e.step not in s_compensated, key,
                    f"{where} ran although its compensation was checkpointed")
            later_open = [n for n in s_completed if INDEX[n] > k and n not in s_compensated
                          and INDEX[n] != permanent]
            earlier_done = [n for n in s_compensated if INDEX[n] < k]
            f.check("I3.reverse-order-start",
                    not later_open and (k == permanent or not earlier_done), key,
                    f"{where} started with later steps {later_open} not compensated, "
                    f"earlier steps {earlier_done} compensated")
    ends = [INDEX[e.step or ""] for e in events
            if e.phase == "end" and e.action == "compensate" and e.outcome == "ok"]
    if ends:
        f.check("I3.reverse-order-events", all(a >= b for a, b in itertools.pairwise(ends)),
                key, f"successful compensations in the order {[STEP_NAMES[i] for i in ends]}")

    # -- I4 no two processes inside the saga at once
    spans = intervals(events, exits)
    for i, a in enumerate(spans):
        clash = [b for b in spans[i + 1:] if b.label != a.label and b.start < a.end]
        clash += [b for b in spans[:i] if b.label != a.label and a.start < b.end]
        f.check("I4.no-overlap", not clash, key,
                f"{a.what} by {a.label} [{a.start}, {a.end}] overlaps "
                + ", ".join(f"{b.what} by {b.label} [{b.start}, {b.end}]" for b in clash))

    # -- I7 to I10: attempts, the pivot, waits, giving up
    check_forward(f, key, config, final, log, events,
                  kills_per_step(events, killed or set()))


def check_all(
    configs: dict[str, dict[str, Any]],
    finals: dict[str, FinalSaga],
    logs: dict[str, list[LogRow]],
    events: Sequence[Event],
) -> Findings:
    f = Findings()
    exits = deaths(events)
    killed = {e.label for e in events if e.phase == "exit" and (e.outcome or "").startswith("killed")}
    by_saga: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        if e.saga_id is not None:
            by_saga[e.saga_id].append(e)
    for sid, config in configs.items():
        check_saga(f, sid, config, finals.get(sid), logs.get(sid, []), by_saga.get(sid, []),
                   exits, killed)
    unknown = set(by_saga) - set(configs)
    f.check("I0.known-sagas", not unknown, "-", f"events for unknown sagas {sorted(unknown)}")
    return f


# -- crash points -------------------------------------------------------------------------------

CATEGORIES = ("checkpoint_boundary", "in_step", "in_compensation", "in_wait", "waiting",
              "pivot", "retried_attempt", "outside_steps")

_KINDS = {"wait": "in_wait", "waiting": "waiting", "pivot": "pivot", "retry": "retried_attempt"}


def crash_points(events: Sequence[Event]) -> Counter[str]:
    """Where the SIGKILLs landed.

    - A self-inflicted crash (a ``crash`` event): ``act:k:start``/``comp:k:start`` (right after
      the previous checkpoint) and ``act:k:end``/``comp:k:end`` (the work done, its checkpoint
      not yet written) are checkpoint boundaries; ``act:k:mid`` is inside a step and
      ``comp:k:mid`` inside a compensation. The forward-recovery points have kinds of their
      own: ``wait:k`` during an in-process wait (``in_wait``), ``waiting:k`` right after a
      durable wait's checkpoint (``waiting``), ``pivot:before``/``pivot:after`` around the
      pivot's checkpoint (``pivot``), ``retry:k:...`` inside a retried attempt
      (``retried_attempt``).
    - Every other act/compensate a SIGKILLed process was in (its start has no end before the
      process's exit event: the harness's random kills and the other sagas a self-crashing
      process held) is a crash point inside a step or a compensation.
    - A harness kill that found the process in no act/compensate (polling, claiming, writing a
      checkpoint, waiting before an attempt, starting up) is ``outside_steps``.
    """
    points: Counter[str] = Counter()
    crash_events: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        if e.phase == "crash":
            crash_events[e.label].append(e)
            kind = (e.outcome or "").split(":")
            if kind[0] in _KINDS:
                points[_KINDS[kind[0]]] += 1
            elif kind[-1] == "mid":
                points["in_step" if kind[0] == "act" else "in_compensation"] += 1
            else:
                points["checkpoint_boundary"] += 1
    for death in (e for e in events if e.phase == "exit" and e.outcome
                  and e.outcome.startswith("killed")):
        own = [e for e in events if e.label == death.label and e.id < death.id]
        crashed = {c.saga_id for c in crash_events.get(death.label, [])}
        open_: dict[tuple[str | None, str | None, str | None], Event] = {}
        for e in own:
            k = (e.saga_id, e.step, e.action)
            if e.phase == "start":
                open_[k] = e
            elif e.phase == "end":
                open_.pop(k, None)
        inside = [e for e in open_.values() if e.saga_id not in crashed]
        for e in inside:
            points["in_step" if e.action == "act" else "in_compensation"] += 1
        if not inside and not crashed:
            points["outside_steps"] += 1
    return points
