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

from sagakit.plan import Backward, Finished, Forward, Mismatch, decide
from sagakit.records import SagaAction, SagaLogEntry, SagaState, SagaStatus, SagaStepStatus
from sagakit.saga import Saga, StepSpec

__all__ = ["LEGEND", "escape", "flowchart", "instance_flowchart", "sequence"]

COMPLETED_FILL = "#c8e6c9"
FAILED_FILL = "#ffcdd2"

# Node classes of instance_flowchart, with their Mermaid style and the legend's wording.
LEGEND: dict[str, tuple[str, str]] = {
    "completed": ("fill:#c8e6c9,stroke:#2e7d32,color:#1b5e20", "completed"),
    "failed": ("fill:#ffcdd2,stroke:#c62828,color:#b71c1c", "failed"),
    "compensated": ("fill:#ffe0b2,stroke:#ef6c00,color:#e65100", "compensated"),
    "compensationFailed": (
        "fill:#b71c1c,stroke:#7f0000,color:#ffffff,stroke-width:2px", "compensation failed"
    ),
    "started": ("fill:#bbdefb,stroke:#1565c0,color:#0d47a1", "started, no outcome"),
    "notRun": (
        "fill:#f5f5f5,stroke:#9e9e9e,color:#757575,stroke-dasharray:5 5", "not run"
    ),
    "current": ("fill:#fff59d,stroke:#f57f17,color:#000000,stroke-width:3px", "current status"),
}
"""``{class name: (classDef style, legend label)}`` as used by :func:`instance_flowchart`."""

_ENTITIES = {
    "#": "#35;",
    '"': "#quot;",
    "<": "#lt;",
    ">": "#gt;",
    "&": "#amp;",
    "`": "#96;",
    "|": "#124;",
    ";": "#59;",
    "{": "#123;",
    "}": "#125;",
    "[": "#91;",
    "]": "#93;",
}


def escape(text: str) -> str:
    """``text`` made safe inside a quoted Mermaid label or a sequence diagram message: the
    characters Mermaid gives a meaning to become entity codes, line breaks become spaces."""
    flat = " ".join(str(text).split())
    return "".join(_ENTITIES.get(ch, ch) for ch in flat)


# -- the shared model ------------------------------------------------------------------------


@dataclasses.dataclass
class _Node:
    id: str
    label: str  # escaped, may contain <br/>
    shape: str = "box"  # box | round | hexagon


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

    def add(self, node: _Node) -> None:
        self.nodes[node.id] = node


def _definition(saga: Saga[Any] | type[Saga[Any]]) -> tuple[str, tuple[StepSpec, ...]]:
    name = getattr(saga, "name", "") or getattr(saga, "__name__", type(saga).__name__)
    specs = tuple(getattr(saga, "step_specs", ()))
    return str(name), specs


def _alternative_name(spec: StepSpec) -> str | None:
    names = spec.handler_names()
    return names[1] if len(names) > 1 else None


def _exception_names(spec: StepSpec) -> list[str]:
    errors = getattr(spec.fallback, "failure_exceptions", ()) or ()
    return [getattr(e, "__name__", str(e)) for e in errors]


def _has_breaker(spec: StepSpec) -> bool:
    return getattr(spec.fallback, "circuit_breaker", None) is not None


def _handover_label(spec: StepSpec) -> str:
    errors = _exception_names(spec)
    parts = ["raises " + ", ".join(errors) if errors else "fails"]
    if _has_breaker(spec):
        parts.append("circuit open")
    return " / ".join(parts)


def _build(saga: Saga[Any] | type[Saga[Any]]) -> _Chart:
    name, specs = _definition(saga)
    chart = _Chart({}, [], {}, {}, specs, name)
    chart.add(_Node("start", escape(f"{name}: start"), "round"))
    for index, spec in enumerate(specs, start=1):
        chart.add(_Node(f"step{index}", escape(spec.name)))
        chart.owner[spec.name] = f"step{index}"
        alternative = _alternative_name(spec)
        if alternative is not None:
            chart.add(_Node(f"step{index}_alt", escape(f"{alternative} (fallback)")))
            chart.owner[alternative] = f"step{index}_alt"
    for index, spec in enumerate(specs[:-1], start=1):
        names = " or ".join(spec.handler_names())
        whichever = " (whichever completed)" if spec.fallback is not None else ""
        chart.add(_Node(f"undo{index}", escape(f"compensate {names}{whichever}")))
        chart.undo[index - 1] = f"undo{index}"
    chart.add(_Node("completed", "COMPLETED", "round"))
    chart.add(_Node("failed", "FAILED", "round"))

    success: list[_Edge] = [_Edge("start", "step1" if specs else "completed")]
    handover: list[_Edge] = []
    failure: list[_Edge] = []
    for index, spec in enumerate(specs, start=1):
        primary, alternative = f"step{index}", f"step{index}_alt"
        following = f"step{index + 1}" if index < len(specs) else "completed"
        on_failure = f"undo{index - 1}" if index > 1 else "failed"
        success.append(_Edge(primary, following, "success"))
        if spec.fallback is None:
            failure.append(_Edge(primary, on_failure, "failure"))
            continue
        handover.append(_Edge(primary, alternative, escape(_handover_label(spec)), "dashed"))
        success.append(_Edge(alternative, following, "success"))
        if _exception_names(spec):  # the primary's other errors fail the step
            failure.append(_Edge(primary, on_failure, "other error"))
        failure.append(_Edge(alternative, on_failure, "failure"))
    chain = [_Edge(f"undo{index}", f"undo{index - 1}" if index > 1 else "failed")
             for index in range(len(specs) - 1, 0, -1)]
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

    Act nodes are ``completed``, ``failed``, ``started`` (an attempt without a recorded outcome)
    or ``notRun``; a step whose act completed and was later compensated is ``compensated`` (or
    ``compensationFailed`` while its compensation has failed); compensation nodes are
    ``compensated``, ``compensationFailed`` or ``notRun``. A terminal status highlights its
    terminal node; any other status (PENDING, RUNNING, COMPENSATING, PARKED) is a ``current``
    hexagon joined by a dotted line to where the saga will continue. Log entries naming steps
    the definition does not have are ignored (the status node then says so).
    """
    chart = _build(saga)
    acts: dict[str, SagaLogEntry] = {}
    undos: dict[str, list[SagaLogEntry]] = {}
    for entry in history:
        if entry.action == SagaAction.ACT:
            acts[entry.step_name] = entry
        else:
            undos.setdefault(entry.step_name, []).append(entry)

    classes: dict[str, str] = {}
    for handler, node_id in chart.owner.items():
        node = chart.nodes[node_id]
        act = acts.get(handler)
        cls, note = _act_outcome(act)
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
    short = str(state.saga_id)
    chart.nodes["start"].label = escape(f"{chart.name}: start") + "<br/>" + escape(short)
    if status not in (SagaStatus.COMPLETED, SagaStatus.FAILED):
        where, what = _resting_place(chart, status, history)
        label = f"{status.value}<br/>{escape(what)}"
        if status is SagaStatus.PARKED:
            label += "<br/>" + escape("parked: needs resume or abort")
        chart.add(_Node("status", label, "hexagon"))
        chart.edges.append(_Edge("status", where, "", "dotted"))
        classes["status"] = "current"
    return _render(chart, classes, legend)


def _act_outcome(entry: SagaLogEntry | None) -> tuple[str, str]:
    if entry is None:
        return "notRun", "not run"
    if entry.status == SagaStepStatus.COMPLETED:
        return "completed", "completed"
    if entry.status == SagaStepStatus.FAILED:
        return "failed", f"failed: {_short_error(entry)}"
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
        return f"step{plan.start + 1}", f"next: {chart.specs[plan.start].name}"
    if isinstance(plan, Backward):
        if not plan.to_compensate:
            return "failed", "nothing left to compensate; FAILED not written yet"
        step = plan.to_compensate[0]
        node = chart.undo.get(step.index, f"step{step.index + 1}")
        return node, f"next: compensate {step.handler_name}"
    assert isinstance(plan, Finished)  # only for a terminal status, excluded by the caller
    return "start", plan.status.value


# -- sequence diagram --------------------------------------------------------------------------


class _Lines:
    """Sequence diagram statements; every text is escaped here, once."""

    def __init__(self) -> None:
        self.lines = ["sequenceDiagram"]

    def add(self, depth: int, statement: str, text: str | None = None) -> None:
        pad = "    " * depth
        self.lines.append(f"{pad}{statement}" if text is None else f"{pad}{statement}{escape(text)}")

    def message(self, depth: int, src: str, arrow: str, dst: str, text: str) -> None:
        self.add(depth, f"{src}{arrow}{dst}: ", text)


def sequence(saga: Saga[Any] | type[Saga[Any]]) -> str:
    """A Mermaid ``sequenceDiagram`` of a saga definition: the orchestrator, the storage and
    each step handler; every act call and checkpoint, and for each step an ``alt`` block whose
    failure branch compensates the steps before it in reverse order."""
    name, specs = _definition(saga)
    out = _Lines()
    out.add(1, "participant saga as ", f"{name} (orchestrator)")
    out.add(1, "participant storage as Storage")
    for index, spec in enumerate(specs, start=1):
        out.add(1, f"participant step{index} as ", spec.name)
        alternative = _alternative_name(spec)
        if alternative is not None:
            out.add(1, f"participant step{index}_alt as ", f"{alternative} (fallback)")
    out.message(1, "saga", "->>", "storage", "write the saga row: RUNNING, leased to this run")
    if not specs:
        out.message(1, "saga", "->>", "storage", "checkpoint: COMPLETED, lease released")
    for index, spec in enumerate(specs, start=1):
        done = ", status COMPLETED, lease released" if index == len(specs) else ""
        pid, aid = f"step{index}", f"step{index}_alt"
        primary = spec.name
        out.message(1, "saga", "->>", pid, "act(context)")
        out.add(1, "alt ", f"{primary} returns")
        out.message(2, pid, "-->>", "saga", "result")
        out.message(2, "saga", "->>", "storage", f"checkpoint: {primary} COMPLETED + context{done}")
        alternative = _alternative_name(spec)
        if alternative is None:
            out.add(1, "else ", f"{primary} raises")
            out.message(2, pid, "--x", "saga", "error")
            _failure_path(out, 2, specs, index, primary)
            out.add(1, "end")
            continue
        out.add(1, "else ", f"{primary} {_handover_label(spec)}")
        skipped = " (an open circuit skips the call)" if _has_breaker(spec) else ""
        out.message(2, pid, "--x", "saga", f"error{skipped}")
        out.add(2, "Note over saga: ", "context restored")
        out.message(2, "saga", "->>", aid, "act(context)")
        out.add(2, "alt ", f"{alternative} returns")
        out.message(3, aid, "-->>", "saga", "result")
        out.message(3, "saga", "->>", "storage",
                    f"checkpoint: {primary} FAILED, {alternative} COMPLETED + context{done}")
        out.add(2, "else ", f"{alternative} raises")
        out.message(3, aid, "--x", "saga", "error")
        _failure_path(out, 3, specs, index, f"{primary} FAILED, {alternative}")
        out.add(2, "end")
        if _exception_names(spec):
            out.add(1, "else ", f"{primary} raises another error")
            out.message(2, pid, "--x", "saga", "error")
            _failure_path(out, 2, specs, index, primary)
        out.add(1, "end")
    if len(specs) > 1:
        out.add(1, "Note over saga,storage: ", "a compensation still failing after its retries "
                "leaves the saga COMPENSATING, for recovery to finish")
    return "\n".join(out.lines) + "\n"


def _failure_path(
    out: _Lines, depth: int, specs: Sequence[StepSpec], index: int, failed: str
) -> None:
    """The failure branch of step ``index`` (1-based): log it, compensate the steps before it."""
    if index == 1:
        out.message(depth, "saga", "->>", "storage",
                    f"checkpoint: {failed} FAILED + context, status FAILED, lease released")
        out.add(depth, "Note over saga: ", "FAILED, error re-raised")
        return
    out.message(depth, "saga", "->>", "storage",
                f"checkpoint: {failed} FAILED + context, status COMPENSATING")
    for k in range(index - 1, 0, -1):
        spec = specs[k - 1]
        alternative = _alternative_name(spec)
        which = f" (or {alternative}, if the fallback completed)" if alternative else ""
        out.message(depth, "saga", "->>", f"step{k}", f"compensate(context){which}")
        end = ", status FAILED, lease released" if k == 1 else ""
        whose = f"{spec.name} (or {alternative})" if alternative else spec.name
        out.message(depth, "saga", "->>", "storage", f"checkpoint: {whose} COMPENSATED{end}")
    out.add(depth, "Note over saga: ", "FAILED, error re-raised")
