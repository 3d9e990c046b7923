"""What the queue-workers test checks, as pure functions over what it read back.

Inputs: the plan (each saga's queue and concurrency key), the queues' limits, each saga's final
status and step log, and the journal: the events table the acts of
:class:`~tests.acceptance.queue_runner.QueuedSaga` write (a ``start`` and an ``end`` event per
act, see :mod:`tests.acceptance.queue_runner`), with one ``exit`` event per worker process,
written by the harness after it saw the process end (its id is greater than that of every
event the process wrote). Nothing comes from the workers' own counts.

Moments are event ids, never clocks: an id is allocated when its INSERT runs, and of two events
where one INSERT returned before the other began, the first has the smaller id.

The acts label their events ``<process label>/<n>``: the process, and which of the process's
runs of sagas the act belongs to (the ``exit`` events carry the bare process label).

Intervals:

- a *step interval* is one act in one run: [its start event, its end event]; an act without
  an end (its process was SIGKILLed) ends at its process's ``exit`` event, or never when there
  is none (:func:`tests.acceptance.checker.intervals`);
- a *run interval* is one run of one saga: from its first act's start to its last act's end.
  Between two acts the saga holds its queue slot (RUNNING under a live lease), so counting run
  intervals counts more of the time a slot is held than counting step intervals, and is still
  sound: a run interval lies within the time from the claim to the release (or the lease's
  end) of its run.

Both are within the time the storage counts the saga as running (RUNNING or COMPENSATING under
a live lease: from the claim that leased it to the write that released it, or, for a killed
process, until its lease runs out, after the exit event). So at every moment the sagas with an
open interval are at most the sagas the storage counts as running: more than a limit is a
limit broken. (A lease that runs out under a live process is not counted by the storage; with
leases of seconds and acts of milliseconds it should not happen, and it shows here too: as two
runs of one saga at once, and maybe as a limit broken.)

The checks (each counted under its name):

``Q1.exists``, ``Q1.completed``
    every planned saga was stored, and ended COMPLETED (no saga lost, none stuck or failed).
``Q1.known-sagas``
    the journal names no saga outside the plan.
``Q2.log-shape``
    the step log holds each step's act COMPLETED exactly once, in step order, and nothing else.
``Q2.journal-complete``
    every step the log shows COMPLETED has an ``ok`` end event (the journal is complete: a
    check over a journal missing events would prove nothing).
``Q2.no-anomaly``
    no act found its own effect already in the context, no compensation ran.
``Q3.lease-holder``
    each act's start snapshot shows the saga RUNNING and leased by the process running it (the
    lease owner id embeds the pid).
``Q3.no-overlap-steps``, ``Q3.no-overlap-runs``
    per saga, the step intervals (and the run intervals) of different runs do not overlap,
    whether the runs are in two processes or in one.
``Q4.queue-steps``, ``Q4.key-steps``
    per queue with a concurrency limit, the distinct sagas with an open step interval never
    exceed it; per concurrency key of a queue with a key limit, likewise.
``Q5.queue-runs``, ``Q5.key-runs``
    the same with run intervals.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from sagakit.queue import QueueSettings
from tests.acceptance.checker import INFINITY, Event, Findings, deaths, intervals
from tests.acceptance.queue_runner import STEP_NAMES

__all__ = ["Crowd", "Planned", "QueueFindings", "Span", "check_queue_run", "crowd",
           "process_of", "run_spans", "summary"]


@dataclasses.dataclass(frozen=True, slots=True)
class Planned:
    """Where a saga was submitted."""

    queue: str
    key: str | None = None
    priority: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """A step or run interval of one saga in one run, in event ids."""

    saga: str
    label: str
    start: int
    end: float
    what: str

    def render(self) -> str:
        end = "never" if self.end == INFINITY else str(int(self.end))
        return f"{self.saga} {self.what} by {self.label} [{self.start}, {end}]"


@dataclasses.dataclass(frozen=True, slots=True)
class Crowd:
    """The most sagas with an open interval at one moment, and the first moment over a limit
    with the intervals open then (the evidence)."""

    most: int
    most_at: int | None
    over_at: int | None = None
    evidence: tuple[Span, ...] = ()


@dataclasses.dataclass
class QueueFindings(Findings):
    peaks: dict[str, tuple[int, int | None]] = dataclasses.field(default_factory=dict)
    """Check name and group -> (the most sagas at once, the limit)."""
    cut_steps: int = 0
    """Acts left without an end by a SIGKILL."""
    killed_in_step: int = 0
    """SIGKILLed processes that were in at least one act."""
    errored_steps: list[str] = dataclasses.field(default_factory=list)
    """Acts that ended with an error (cut off: their lease may have run out)."""

    def check_group(self, name: str, ok: bool, where: str, message: str) -> None:
        self.checks[name] += 1
        if not ok:
            self.violations.append(f"[{name}] {where}: {message}")


def crowd(spans: Sequence[Span], limit: int | None = None) -> Crowd:
    """Sweep the spans in event-id order, counting the distinct sagas with an open span."""
    points: list[tuple[float, int, int]] = []
    for i, s in enumerate(spans):
        points.append((s.start, 1, i))
        points.append((s.end, 0, i))  # at equal ids (none but exits) closes come first
    heapq.heapify(points)
    open_: dict[int, Span] = {}
    per_saga: Counter[str] = Counter()
    most, most_at = 0, None
    over_at: int | None = None
    evidence: tuple[Span, ...] = ()
    while points:
        at, opens, i = heapq.heappop(points)
        span = spans[i]
        if not opens:
            del open_[i]
            per_saga[span.saga] -= 1
            if not per_saga[span.saga]:
                del per_saga[span.saga]
            continue
        open_[i] = span
        per_saga[span.saga] += 1
        if len(per_saga) > most:
            most, most_at = len(per_saga), int(at)
        if limit is not None and over_at is None and len(per_saga) > limit:
            over_at, evidence = int(at), tuple(sorted(open_.values(), key=lambda s: s.start))
    return Crowd(most, most_at, over_at, evidence)


def process_of(label: str) -> str:
    """The process label of an act's ``<process>/<run>`` label."""
    return label.split("/", 1)[0]


def run_spans(saga: str, steps: Sequence[Span]) -> list[Span]:
    """The run intervals of one saga: its step intervals grouped by run, each from its first
    start to its last end."""
    runs: dict[str, tuple[int, float]] = {}
    for s in steps:
        start, end = runs.get(s.label, (s.start, s.end))
        runs[s.label] = (min(start, s.start), max(end, s.end))
    return sorted((Span(saga, label, start, end, "run") for label, (start, end) in runs.items()),
                  key=lambda s: s.start)


def _no_overlap(f: QueueFindings, name: str, saga: str, spans: Sequence[Span]) -> None:
    for i, a in enumerate(spans):
        clash = [b for b in spans[i + 1:] if b.label != a.label and b.start < a.end]
        f.check(name, not clash, saga, f"{a.render()} overlaps "
                + ", ".join(b.render() for b in clash))


def _check_saga(f: QueueFindings, sid: str, status: str | None,
                log: Sequence[tuple[str, str, str]], events: Sequence[Event],
                exits: Mapping[str, int]) -> tuple[list[Span], list[Span]]:
    f.check("Q1.exists", status is not None, sid, "the saga was never stored")
    f.check("Q1.completed", status in (None, "COMPLETED"), sid, f"ended {status}")
    expected = [(name, "act", "COMPLETED") for name in STEP_NAMES]
    f.check("Q2.log-shape", list(log) == expected, sid, f"step log {list(log)}")
    ended = {e.step for e in events if e.phase == "end" and e.outcome == "ok"}
    for name, action, st in log:
        if action == "act" and st == "COMPLETED":
            f.check("Q2.journal-complete", name in ended, sid,
                    f"act {name} is COMPLETED in the log but has no ok end event")
    anomalies = [f"{e.action} {e.step} by {e.label}: {e.outcome}"
                 for e in events if e.phase == "anomaly"]
    f.check("Q2.no-anomaly", not anomalies, sid, "; ".join(anomalies))
    for e in events:
        if e.phase == "start":
            snap = e.snapshot or {}
            owner = snap.get("owner") or ""
            parts = owner.rsplit(":", 2)
            f.check("Q3.lease-holder", snap.get("status") == "RUNNING" and len(parts) == 3
                    and parts[1] == str(e.pid), sid,
                    f"act {e.step} by {e.label} (pid {e.pid}, event {e.id}) started while the "
                    f"saga was {snap.get('status')} leased by {owner or None!r}")
        elif e.phase == "end" and e.outcome != "ok":
            f.errored_steps.append(f"{sid} act {e.step} by {e.label} (event {e.id}): "
                                   f"{e.outcome}")
    ends = {e.label: exits[process_of(e.label)] for e in events
            if process_of(e.label) in exits}
    step_spans = [Span(sid, s.label, s.start, s.end, s.what) for s in intervals(events, ends)]
    runs = run_spans(sid, step_spans)
    _no_overlap(f, "Q3.no-overlap-steps", sid, step_spans)
    _no_overlap(f, "Q3.no-overlap-runs", sid, runs)
    return step_spans, runs


def _check_limits(f: QueueFindings, kind: str, plan: Mapping[str, Planned],
                  limits: Mapping[str, QueueSettings], spans: Mapping[str, list[Span]]) -> None:
    """Q4 (``kind`` steps) or Q5 (runs): every queue's and every key's limit."""
    number = "Q4" if kind == "steps" else "Q5"
    by_queue: dict[str, list[Span]] = defaultdict(list)
    by_key: dict[tuple[str, str], list[Span]] = defaultdict(list)
    for sid, saga_spans in spans.items():
        planned = plan[sid]
        by_queue[planned.queue] += saga_spans
        if planned.key is not None:
            by_key[(planned.queue, planned.key)] += saga_spans
    for queue, queue_spans in sorted(by_queue.items()):
        limit = limits[queue].concurrency if queue in limits else None
        c = crowd(queue_spans, limit)
        f.peaks[f"{number}.queue-{kind} {queue}"] = (c.most, limit)
        if limit is not None:
            f.check_group(f"{number}.queue-{kind}", c.over_at is None, f"queue {queue!r}",
                          _crowded(c, limit, kind))
    key_peaks: dict[str, int] = {}
    for (queue, key), key_spans in sorted(by_key.items()):
        limit = limits[queue].key_concurrency if queue in limits else None
        c = crowd(key_spans, limit)
        key_peaks[queue] = max(key_peaks.get(queue, 0), c.most)
        if limit is not None:
            f.check_group(f"{number}.key-{kind}", c.over_at is None,
                          f"queue {queue!r} key {key!r}", _crowded(c, limit, kind))
    for queue, most in key_peaks.items():
        limit = limits[queue].key_concurrency if queue in limits else None
        f.peaks[f"{number}.key-{kind} {queue} (busiest key)"] = (most, limit)


def _crowded(c: Crowd, limit: int, kind: str) -> str:
    return (f"{c.most} sagas in {kind} at once (limit {limit}); first over the limit at "
            f"event {c.over_at}, open then: " + "; ".join(s.render() for s in c.evidence))


def check_queue_run(
    plan: Mapping[str, Planned],
    limits: Sequence[QueueSettings],
    statuses: Mapping[str, str],
    logs: Mapping[str, Sequence[tuple[str, str, str]]],
    events: Sequence[Event],
) -> QueueFindings:
    """Every check of the module docstring over one run."""
    f = QueueFindings()
    exits = deaths(events)
    by_saga: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        if e.saga_id is not None:
            by_saga[e.saga_id].append(e)
    unknown = set(by_saga) - set(plan)
    f.check_group("Q1.known-sagas", not unknown, "journal",
                  f"events for sagas never submitted: {sorted(unknown)}")
    steps: dict[str, list[Span]] = {}
    runs: dict[str, list[Span]] = {}
    for sid in plan:
        steps[sid], runs[sid] = _check_saga(f, sid, statuses.get(sid), logs.get(sid, ()),
                                            by_saga.get(sid, []), exits)
    by_name = {q.name: q for q in limits}
    _check_limits(f, "steps", plan, by_name, steps)
    _check_limits(f, "runs", plan, by_name, runs)
    killed = {e.label for e in events
              if e.phase == "exit" and (e.outcome or "").startswith("killed")}
    cut = [s for saga_spans in steps.values() for s in saga_spans
           if process_of(s.label) in killed and s.what.endswith("(no end: process died)")]
    f.cut_steps, f.killed_in_step = len(cut), len({process_of(s.label) for s in cut})
    return f


def summary(f: QueueFindings) -> list[str]:
    """The peaks, as report lines: ``name: most (limit n)``."""
    return [f"{name}: {most}" + ("" if limit is None else f" (limit {limit})")
            for name, (most, limit) in f.peaks.items()]
