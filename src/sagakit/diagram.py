"""Mermaid diagrams of saga definitions and of stored sagas. Pure functions: no I/O.

- :func:`flowchart` draws a definition as a ``graph TD``: start, each step in order, COMPLETED;
  each step's failure edge leads into the compensation chain (the steps before it, in reverse)
  and on to FAILED. A fallback step is drawn as its primary with a dashed edge to its
  alternative; both continue to the next step.
- :func:`sequence` draws the same definition as a ``sequenceDiagram`` between the orchestrator,
  the storage and the step handlers: every act call and checkpoint, with an ``alt`` block per
  step for its failure path (the compensations in reverse order).
- :func:`instance_flowchart` draws the flowchart of one stored saga, each node coloured by what
  its step log says happened, with the saga's current status and a legend.

Forward recovery shows in all three: a step's retry policy and timeouts are lines of its label
(``retry: 4 attempts, backoff 0.5s x2``, ``timeout 2s``); the pivot is a double-bordered node
(``pivot: forward only after it``); the steps after it have no compensation: their failure
(retries exhausted) leads to PARKED. The sequence diagram adds a branch per retried step (the
failed attempt's checkpoint and the wait); an instance chart shows a step's failed attempts, a
saga past its pivot, and when a WAITING saga resumes.

The module is split in three: :mod:`sagakit.diagramtext` (escaping, labels),
:mod:`sagakit.sequencediagram` (:func:`sequence`) and this one (the flowcharts); every public
function is importable from here.

Node ids are generated (``step1``, ``step1_alt``, ``undo1``...), never taken from class names, so
any step name is safe; every label is quoted and escaped with Mermaid entity codes.

Example::

    from sagakit.diagram import flowchart
    print(flowchart(OrderSaga))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sagakit.diagramtext import (
    alternative_name,
    compensable_steps,
    definition,
    escape,
    exception_names,
    handover_label,
    join_label,
    options_lines,
    pivot_index,
)
from sagakit.plan import Backward, Finished, Forward, Mismatch, decide
from sagakit.records import SagaAction, SagaLogEntry, SagaState, SagaStatus, SagaStepStatus
from sagakit.saga import Saga, StepSpec
from sagakit.sequencediagram import sequence

__all__ = ["LEGEND", "escape", "flowchart", "instance_flowchart", "sequence"]

COMPLETED_FILL = "#c8e6c9"
FAILED_FILL = "#ffcdd2"
PARKED_FILL = "#cfd8dc"

# Node classes of instance_flowchart, with their Mermaid style and the legend's wording.
LEGEND: dict[str, tuple[str, str]] = {
    "completed": ("fill:#c8e6c9,stroke:#2e7d32,color:#1b5e20", "completed"),
    "failed": ("fill:#ffcdd2,stroke:#c62828,color:#b71c1c", "failed"),
    "compensated": ("fill:#ffe0b2,stroke:#ef6c00,color:#e65100", "compensated"),
    "compensationFailed": (
        "fill:#b71c1c,stroke:#7f0000,color:#ffffff,stroke-width:2px", "compensation failed"
    ),
    "started": ("fill:#bbdefb,stroke:#1565c0,color:#0d47a1", "started, no outcome"),
    "retrying": ("fill:#e1bee7,stroke:#6a1b9a,color:#4a148c", "retrying"),
    "notRun": (
        "fill:#f5f5f5,stroke:#9e9e9e,color:#757575,stroke-dasharray:5 5", "not run"
    ),
    "current": ("fill:#fff59d,stroke:#f57f17,color:#000000,stroke-width:3px", "current status"),
}
"""``{class name: (classDef style, legend label)}`` as used by :func:`instance_flowchart`."""


# -- the shared model ------------------------------------------------------------------------


@dataclasses.dataclass
class _Node:
    id: str
    label: str  # escaped, may contain <br/>
    shape: str = "box"  # box | round | hexagon | pivot (double-bordered)


@dataclasses.dataclass(frozen=True)
class _Edge:
    src: str
    dst: str
    label: str = ""  # escaped
    kind: str = "arrow"  # arrow | dashed | dotted (a dotted line, no arrow head)


@dataclasses.dataclass
class _Chart:
    nodes: dict[str, _Node]
    edges: list[_Edge]
    owner: dict[str, str]  # handler name -> id of its act node
    undo: dict[int, str]  # step index -> id of its compensation node
    specs: tuple[StepSpec, ...]
    name: str
    pivot: int | None  # index of the pivot step

    def add(self, node: _Node) -> None:
        self.nodes[node.id] = node


def _build(saga: Saga[Any] | type[Saga[Any]]) -> _Chart:
    name, specs = definition(saga)
    pivot = pivot_index(specs)
    compensable = compensable_steps(specs)
    chart = _Chart({}, [], {}, {}, specs, name, pivot)
    deadline = getattr(saga, "deadline", None)
    chart.add(_Node("start", join_label(f"{name}: start", [f"deadline {deadline:g}s"]
                                    if deadline is not None else []), "round"))
    for index, spec in enumerate(specs, start=1):
        lines = options_lines(spec.options(spec.name), spec.pivot)
        shape = "pivot" if spec.pivot else "box"
        chart.add(_Node(f"step{index}", join_label(spec.name, lines), shape))
        chart.owner[spec.name] = f"step{index}"
        alternative = alternative_name(spec)
        if alternative is not None:
            lines = options_lines(spec.options(alternative))
            chart.add(_Node(f"step{index}_alt", join_label(f"{alternative} (fallback)", lines)))
            chart.owner[alternative] = f"step{index}_alt"
    for index, spec in enumerate(specs[: compensable - 1], start=1):
        names = " or ".join(spec.handler_names())
        whichever = " (whichever completed)" if spec.fallback is not None else ""
        chart.add(_Node(f"undo{index}", escape(f"compensate {names}{whichever}")))
        chart.undo[index - 1] = f"undo{index}"
    chart.add(_Node("completed", "COMPLETED", "round"))
    chart.add(_Node("failed", "FAILED", "round"))
    if compensable < len(specs):
        chart.add(_Node("parked", "PARKED", "round"))

    success: list[_Edge] = [_Edge("start", "step1" if specs else "completed")]
    handover: list[_Edge] = []
    failure: list[_Edge] = []
    for index, spec in enumerate(specs, start=1):
        primary, alternative = f"step{index}", f"step{index}_alt"
        following = f"step{index + 1}" if index < len(specs) else "completed"
        fails = "failure"
        if index > compensable:  # after the pivot: retried, then parked, never compensated
            on_failure, fails = "parked", "retries exhausted"
        else:
            on_failure = f"undo{index - 1}" if index > 1 else "failed"
        success.append(_Edge(primary, following, "success"))
        if spec.fallback is None:
            failure.append(_Edge(primary, on_failure, fails))
            continue
        handover.append(_Edge(primary, alternative, escape(handover_label(spec)), "dashed"))
        success.append(_Edge(alternative, following, "success"))
        if exception_names(spec):  # the primary's other errors fail the step
            failure.append(_Edge(primary, on_failure, "other error"))
        failure.append(_Edge(alternative, on_failure, fails))
    chain = [_Edge(f"undo{index}", f"undo{index - 1}" if index > 1 else "failed")
             for index in range(compensable - 1, 0, -1)]
    chart.edges.extend(success + handover + failure + chain)
    return chart


def _render(chart: _Chart, classes: dict[str, str] | None = None, legend: bool = False) -> str:
    lines = ["graph TD"]
    for node in chart.nodes.values():
        lines.append(f"    {node.id}{_shape(node)}")
    for edge in chart.edges:
        lines.append(f"    {_edge(edge)}")
    if classes is None:
        lines.append(f"    style completed fill:{COMPLETED_FILL}")
        lines.append(f"    style failed fill:{FAILED_FILL}")
        if "parked" in chart.nodes:
            lines.append(f"    style parked fill:{PARKED_FILL}")
        return "\n".join(lines) + "\n"
    if legend:
        lines.append('    subgraph legend["legend"]')
        lines.append("        direction LR")
        for cls, (_, label) in LEGEND.items():
            lines.append(f'        legend_{cls}["{escape(label)}"]')
        # invisible links keep the legend in one row
        lines.append("        " + " ~~~ ".join(f"legend_{cls}" for cls in LEGEND))
        lines.append("    end")
    for cls, (style, _) in LEGEND.items():
        lines.append(f"    classDef {cls} {style}")
    by_class: dict[str, list[str]] = {}
    for node_id, cls in classes.items():
        by_class.setdefault(cls, []).append(node_id)
    if legend:
        for cls in LEGEND:
            by_class.setdefault(cls, []).append(f"legend_{cls}")
    for cls, node_ids in by_class.items():
        lines.append(f"    class {','.join(node_ids)} {cls}")
    return "\n".join(lines) + "\n"


def _shape(node: _Node) -> str:
    if node.shape == "round":
        return f'(["{node.label}"])'
    if node.shape == "hexagon":
        return '{{"' + node.label + '"}}'
    if node.shape == "pivot":
        return f'[["{node.label}"]]'
    return f'["{node.label}"]'


def _edge(edge: _Edge) -> str:
    arrow = {"arrow": "-->", "dashed": "-.->", "dotted": "-.-"}[edge.kind]
    label = f'|"{edge.label}"|' if edge.label else ""
    return f"{edge.src} {arrow}{label} {edge.dst}"


# -- public functions --------------------------------------------------------------------------


def flowchart(saga: Saga[Any] | type[Saga[Any]]) -> str:
    """A Mermaid ``graph TD`` of a saga definition (a class or an instance)."""
    return _render(_build(saga))


def instance_flowchart(
    saga: Saga[Any] | type[Saga[Any]],
    state: SagaState,
    history: Sequence[SagaLogEntry],
    *,
    legend: bool = True,
) -> str:
    """The :func:`flowchart` of ``saga`` coloured by a stored saga's step log.

    Act nodes are ``completed``, ``failed``, ``started`` (an attempt without a recorded outcome),
    ``retrying`` (its last attempt failed and is to be retried) or ``notRun``; a step whose act
    completed and was later compensated is ``compensated`` (or ``compensationFailed`` while its
    compensation has failed); compensation nodes are ``compensated``, ``compensationFailed`` or
    ``notRun``. A step that failed attempts says how many. A terminal status highlights its
    terminal node; any other status (PENDING, RUNNING, WAITING, COMPENSATING, PARKED) is a
    ``current`` hexagon joined by a dotted line to where the saga will continue, saying when a
    WAITING saga resumes and whether the saga is past its pivot (then PARKED is the parked
    node's class too). Log entries naming steps the definition does not have are ignored (the
    status node then says so).
    """
    chart = _build(saga)
    acts: dict[str, SagaLogEntry] = {}
    failed_attempts: dict[str, int] = {}  # RETRYING entries before (and up to) the last act entry
    undos: dict[str, list[SagaLogEntry]] = {}
    for entry in history:
        if entry.action == SagaAction.ACT:
            previous = acts.get(entry.step_name)
            streak = failed_attempts.get(entry.step_name, 0)
            if previous is not None and previous.status != SagaStepStatus.RETRYING:
                streak = 0  # a new run of attempts (after a resume, say)
            failed_attempts[entry.step_name] = streak + (entry.status == SagaStepStatus.RETRYING)
            acts[entry.step_name] = entry
        else:
            undos.setdefault(entry.step_name, []).append(entry)

    classes: dict[str, str] = {}
    for handler, node_id in chart.owner.items():
        node = chart.nodes[node_id]
        act = acts.get(handler)
        cls, note = _act_outcome(act, failed_attempts.get(handler, 0))
        undo_cls, undo_note = _undo_outcome(undos.get(handler, []))
        if act is not None and act.status == SagaStepStatus.COMPLETED and undo_cls is not None:
            cls, note = undo_cls, f"completed, {undo_note}"
        classes[node_id] = cls
        node.label += "<br/>" + escape(note)
    for index, undo_id in chart.undo.items():
        spec = chart.specs[index]
        ran = [n for n in spec.handler_names()
               if n in acts and acts[n].status == SagaStepStatus.COMPLETED]
        # only the completed handler's: a fallback primary compensated after a crash, before
        # its alternative ran, is not the step's compensation
        entries = [e for name in ran for e in undos.get(name, [])]
        entries.sort(key=lambda e: e.timestamp)
        cls_or_none, note = _undo_outcome(entries)
        if ran and spec.fallback is not None:
            chart.nodes[undo_id].label = escape(f"compensate {ran[-1]}")
        classes[undo_id] = cls_or_none or "notRun"
        chart.nodes[undo_id].label += "<br/>" + escape(note if cls_or_none else "not run")

    status = SagaStatus(state.status)
    classes["completed"] = "completed" if status is SagaStatus.COMPLETED else "notRun"
    classes["failed"] = "failed" if status is SagaStatus.FAILED else "notRun"
    past_pivot = state.past_pivot or (
        chart.pivot is not None
        and any(acts.get(name) is not None and acts[name].status == SagaStepStatus.COMPLETED
                for name in chart.specs[chart.pivot].handler_names()))
    if "parked" in chart.nodes:
        classes["parked"] = "failed" if status is SagaStatus.PARKED and past_pivot else "notRun"
    short = str(state.saga_id)
    chart.nodes["start"].label = escape(f"{chart.name}: start") + "<br/>" + escape(short)
    if status not in (SagaStatus.COMPLETED, SagaStatus.FAILED):
        where, what = _resting_place(chart, status, history)
        lines = [what]
        if status is SagaStatus.WAITING and state.next_attempt_at is not None:
            lines.append(f"resumes at {state.next_attempt_at.isoformat(timespec='seconds')}")
        if past_pivot:
            lines.append("past the pivot: forward only")
        if status is SagaStatus.PARKED:
            lines.append("parked: needs resume" if past_pivot
                         else "parked: needs resume or abort")
        chart.add(_Node("status", join_label(status.value, lines), "hexagon"))
        chart.edges.append(_Edge("status", where, "", "dotted"))
        classes["status"] = "current"
    return _render(chart, classes, legend)


def _act_outcome(entry: SagaLogEntry | None, failed_attempts: int) -> tuple[str, str]:
    if entry is None:
        return "notRun", "not run"
    tried = f"{failed_attempts} failed attempt{'s' if failed_attempts != 1 else ''}"
    if entry.status == SagaStepStatus.COMPLETED:
        return "completed", f"completed after {tried}" if failed_attempts else "completed"
    if entry.status == SagaStepStatus.RETRYING:
        return "retrying", f"retrying: {tried}, last: {_short_error(entry)}"
    if entry.status == SagaStepStatus.FAILED:
        after = f" after {failed_attempts + 1} attempts" if failed_attempts else ""
        return "failed", f"failed{after}: {_short_error(entry)}"
    return "started", "started, outcome not recorded"


def _undo_outcome(entries: Sequence[SagaLogEntry]) -> tuple[str | None, str]:
    if not entries:
        return None, ""
    if any(e.status == SagaStepStatus.COMPENSATED for e in entries):
        return "compensated", "compensated"
    failures = [e for e in entries if e.status == SagaStepStatus.FAILED]
    if failures:
        return "compensationFailed", f"compensation failed: {_short_error(failures[-1])}"
    return "started", "compensation started, outcome not recorded"


def _short_error(entry: SagaLogEntry) -> str:
    kind = entry.error_type or (entry.details or "error").split(":", 1)[0]
    return kind.rsplit(".", 1)[-1]


def _resting_place(
    chart: _Chart, status: SagaStatus, history: Sequence[SagaLogEntry]
) -> tuple[str, str]:
    """(node id, description) of where a non-terminal saga continues from."""
    plan = decide(status, chart.specs, history, resume_parked=status is SagaStatus.PARKED)
    if isinstance(plan, Mismatch):
        return "start", f"the log does not fit this definition ({plan.reason})"
    if isinstance(plan, Forward):
        if plan.start >= len(chart.specs):
            return "completed", "every step completed; COMPLETED not written yet"
        attempt = f", attempt {plan.attempts + 1}" if plan.attempts else ""
        return f"step{plan.start + 1}", f"next: {chart.specs[plan.start].name}{attempt}"
    if isinstance(plan, Backward):
        if not plan.to_compensate:
            return "failed", "nothing left to compensate; FAILED not written yet"
        step = plan.to_compensate[0]
        node = chart.undo.get(step.index, f"step{step.index + 1}")
        return node, f"next: compensate {step.handler_name}"
    assert isinstance(plan, Finished)  # only for a terminal status, excluded by the caller
    return "start", plan.status.value
