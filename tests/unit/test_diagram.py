"""Mermaid diagrams of saga definitions and stored sagas (sagakit.diagram).

Every diagram is checked by a structural validator (``check_flowchart``/``check_sequence``): each
line is a statement of the Mermaid subset the module emits, ids are safe and declared before
use, brackets and blocks balance, every class used is defined, and labels hold no character
Mermaid would read as syntax. The stored sagas coloured by ``instance_flowchart`` come from real
runs on the memory storage (plus hand-written logs for what a run cannot leave behind).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import types
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from sagakit import (
    CircuitBreaker,
    Fallback,
    MemorySagaStorage,
    Retry,
    Saga,
    SagaAction,
    SagaLogEntry,
    SagaState,
    SagaStatus,
    SagaStepHandler,
    SagaStepStatus,
    Step,
    recover_saga,
)
from sagakit.diagram import LEGEND, escape, flowchart, instance_flowchart, sequence
from tests.unit.support import (
    Crash,
    Ctx,
    Script,
    StepA,
    StepB,
    StepC,
    StepD,
    StepHandler,
    ThreeStepSaga,
    drive,
    transaction,
)

# -- the structural validators ------------------------------------------------------------------

ID = r"[A-Za-z_][A-Za-z0-9_]*"
LABEL = r'"(?:[^"#<>]|#\w+;|<br/>)*"'  # quoted; '#' only in entity codes; '<' only in <br/>
RESERVED = {"end", "graph", "flowchart", "subgraph", "style", "class", "classDef", "click",
            "linkStyle", "direction", "default"}
NODE = re.compile(rf"^(?P<id>{ID})(?:\[{LABEL}\]|\(\[{LABEL}\]\)|\{{\{{{LABEL}\}}\}}"
                  rf"|\[\[{LABEL}\]\])$")
EDGE = re.compile(rf"^(?P<src>{ID}) (?P<arrow>-->|-\.->|-\.-)(?:\|(?P<label>{LABEL})\|)? "
                  rf"(?P<dst>{ID})$")
STYLE = re.compile(rf"^style (?P<id>{ID}) (?P<css>[\w#:,.%-]+(?:,[\w#:,. %-]+)*)$")
CLASSDEF = re.compile(rf"^classDef (?P<name>{ID}) (?P<css>[\w#:,. -]+)$")
CLASS = re.compile(rf"^class (?P<ids>{ID}(?:,{ID})*) (?P<name>{ID})$")
SUBGRAPH = re.compile(rf"^subgraph (?P<id>{ID})\[{LABEL}\]$")
INVISIBLE = re.compile(rf"^{ID}(?: ~~~ {ID})+$")  # invisible links (layout only)


class Chart:
    """A parsed flowchart: nodes (id -> declaration), edges, classes (id -> class), styles."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}
        self.edges: list[tuple[str, str, str, str]] = []  # (src, arrow, label, dst)
        self.classes: dict[str, str] = {}
        self.class_defs: dict[str, str] = {}
        self.styles: dict[str, str] = {}
        self.subgraphs: list[str] = []

    def edge_set(self) -> set[tuple[str, str, str, str]]:
        return set(self.edges)

    def label(self, node: str) -> str:
        declaration = self.nodes[node]
        return declaration[declaration.index('"') + 1 : declaration.rindex('"')]

    def reachable(self, start: str = "start") -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            node = todo.pop()
            for src, _, _, dst in self.edges:
                if src == node and dst not in seen:
                    seen.add(dst)
                    todo.append(dst)
        return seen


def check_flowchart(text: str) -> Chart:
    """Parse and validate a flowchart this module emits; raise AssertionError on any flaw."""
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "graph TD", lines[0]
    chart = Chart()
    depth = 0
    referenced: list[str] = []
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        where = f"line {number}: {raw!r}"
        assert raw.startswith("    "), where
        assert line, where
        assert "\t" not in raw, where
        if m := NODE.match(line):
            assert m["id"] not in chart.nodes, f"{where}: declared twice"
            chart.nodes[m["id"]] = line
        elif m := EDGE.match(line):
            label = (m["label"] or '""')[1:-1]
            chart.edges.append((m["src"], m["arrow"], label, m["dst"]))
            referenced += [m["src"], m["dst"]]
        elif m := STYLE.match(line):
            chart.styles[m["id"]] = m["css"]
            referenced.append(m["id"])
        elif m := CLASSDEF.match(line):
            chart.class_defs[m["name"]] = m["css"]
        elif m := CLASS.match(line):
            for node in m["ids"].split(","):
                assert node not in chart.classes, f"{where}: {node} classed twice"
                chart.classes[node] = m["name"]
                referenced.append(node)
        elif m := SUBGRAPH.match(line):
            chart.subgraphs.append(m["id"])
            depth += 1
        elif INVISIBLE.match(line):
            assert depth > 0, where
            referenced += line.split(" ~~~ ")
        elif line == "direction LR":
            assert depth > 0, where
        elif line == "end":
            depth -= 1
            assert depth >= 0, f"{where}: end without subgraph"
        else:
            raise AssertionError(f"{where}: not a statement of the expected Mermaid subset")
        for ch_open, ch_close in ("[]", "()", "{}"):
            assert line.count(ch_open) == line.count(ch_close), f"{where}: unbalanced {ch_open}"
        assert line.count('"') % 2 == 0, f"{where}: unbalanced quotes"
    assert depth == 0, "subgraph not closed"
    for node in chart.nodes:
        assert node not in RESERVED, node
    for node in referenced:
        assert node in chart.nodes, f"{node} is used but never declared"
    for node, cls in chart.classes.items():
        assert cls in chart.class_defs, f"class {cls} of {node} has no classDef"
    return chart


TEXT = r"(?:[^;#\n<>]|#\w+;)+"  # ';' and '#' end a text in sequence diagrams
PARTICIPANT = re.compile(rf"^participant (?P<id>{ID}) as (?P<alias>{TEXT})$")
MESSAGE = re.compile(rf"^(?P<src>{ID})(?P<arrow>->>|-->>|--x|-x)(?P<dst>{ID}): (?P<text>{TEXT})$")
NOTE = re.compile(rf"^Note over (?P<ids>{ID}(?:,{ID})?): (?P<text>{TEXT})$")
BLOCK = re.compile(rf"^(?P<kind>alt|else) (?P<text>{TEXT})$")


def check_sequence(text: str) -> list[tuple[str, ...]]:
    """Validate a sequence diagram; return its statements as tuples:
    ("participant", id, alias), ("msg", src, arrow, dst, text), ("alt"|"else", text), ("end",),
    ("note", ids, text)."""
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram"
    participants: dict[str, str] = {}
    out: list[tuple[str, ...]] = []
    depth = 0
    for number, raw in enumerate(lines[1:], start=2):
        line = raw.strip()
        where = f"line {number}: {raw!r}"
        assert raw.startswith("    "), where
        if m := PARTICIPANT.match(line):
            assert not any(s[0] == "msg" for s in out), f"{where}: participant after messages"
            assert m["id"] not in participants, where
            participants[m["id"]] = m["alias"]
            out.append(("participant", m["id"], m["alias"]))
        elif m := MESSAGE.match(line):
            assert m["src"] in participants, where
            assert m["dst"] in participants, where
            out.append(("msg", m["src"], m["arrow"], m["dst"], m["text"]))
        elif m := NOTE.match(line):
            assert all(i in participants for i in m["ids"].split(",")), where
            out.append(("note", m["ids"], m["text"]))
        elif m := BLOCK.match(line):
            if m["kind"] == "alt":
                depth += 1
            assert depth > 0, f"{where}: else outside alt"
            out.append((m["kind"], m["text"]))
        elif line == "end":
            depth -= 1
            assert depth >= 0, f"{where}: end without alt"
            out.append(("end",))
        else:
            raise AssertionError(f"{where}: not a statement of the expected Mermaid subset")
    assert depth == 0, "alt not closed"
    return out


def test_the_validators_reject_broken_diagrams() -> None:
    good = flowchart(ThreeStepSaga)
    check_flowchart(good)
    for broken in (
        good.replace("    step1[", "    end["),  # undeclared node, reserved id
        good + "    step9 --> step1\n",  # undeclared node
        good.replace('["StepB"]', '["Step"B"]'),  # unbalanced quotes
        good + "    subgraph x[\"x\"]\n",  # unclosed block
        good + "    class step1 nope\n",  # class without classDef
    ):
        with pytest.raises(AssertionError):
            check_flowchart(broken)
    seq = sequence(ThreeStepSaga)
    check_sequence(seq)
    for broken in (seq + "    end\n", seq.replace("act(context)", "act; context"),
                   seq + "    saga->>nobody: hi\n"):
        with pytest.raises(AssertionError):
            check_sequence(broken)


# -- definitions --------------------------------------------------------------------------------


class Charge(StepHandler):
    pass


class Invoice(StepHandler):
    pass


class FallbackSaga(Saga[Ctx]):
    steps = [StepA, Fallback(step=Charge, fallback=Invoice), StepC]


class GuardedSaga(Saga[Ctx]):
    steps = [
        StepA,
        Fallback(step=Charge, fallback=Invoice, failure_exceptions=(TimeoutError, KeyError),
                 circuit_breaker=CircuitBreaker()),
        StepC,
    ]


def arrows(chart: Chart, arrow: str = "-->") -> set[tuple[str, str, str]]:
    return {(s, label, d) for s, a, label, d in chart.edges if a == arrow}


def test_flowchart_of_a_three_step_saga_follows_the_seed_shape() -> None:
    chart = check_flowchart(flowchart(ThreeStepSaga))
    assert chart.label("step1") == "StepA"
    assert chart.label("step3") == "StepC"
    assert chart.label("undo2") == "compensate StepB"
    assert "undo3" not in chart.nodes  # the last step's failure is never compensated
    assert arrows(chart) == {
        ("start", "", "step1"),
        ("step1", "success", "step2"),
        ("step2", "success", "step3"),
        ("step3", "success", "completed"),
        ("step1", "failure", "failed"),  # nothing to compensate
        ("step2", "failure", "undo1"),
        ("step3", "failure", "undo2"),  # compensate the steps before it, in reverse
        ("undo2", "", "undo1"),
        ("undo1", "", "failed"),
    }
    assert chart.styles == {"completed": "fill:#c8e6c9", "failed": "fill:#ffcdd2"}
    assert chart.reachable() == set(chart.nodes)


def test_flowchart_takes_a_class_or_an_instance() -> None:
    assert flowchart(ThreeStepSaga) == flowchart(ThreeStepSaga())


def test_flowchart_of_one_step_and_of_no_step() -> None:
    class One(Saga[Ctx]):
        steps = [StepA]

    class Empty(Saga[Ctx]):
        steps = []

    one = check_flowchart(flowchart(One))
    assert arrows(one) == {("start", "", "step1"), ("step1", "success", "completed"),
                           ("step1", "failure", "failed")}
    empty = check_flowchart(flowchart(Empty))
    assert arrows(empty) == {("start", "", "completed")}


def test_a_fallback_step_is_a_dashed_edge_and_both_handlers_continue() -> None:
    chart = check_flowchart(flowchart(FallbackSaga))
    assert chart.label("step2") == "Charge"
    assert chart.label("step2_alt") == "Invoice (fallback)"
    assert arrows(chart, "-.->") == {("step2", "fails", "step2_alt")}
    plain = arrows(chart)
    assert {("step2", "success", "step3"), ("step2_alt", "success", "step3")} <= plain
    assert ("step2_alt", "failure", "undo1") in plain
    # any Exception of the primary hands over: the primary has no failure edge of its own
    assert not [e for e in plain if e[0] == "step2" and e[1] != "success"]
    assert chart.label("undo2") == "compensate Charge or Invoice (whichever completed)"
    assert chart.reachable() == set(chart.nodes)


def test_a_fallback_with_listed_errors_and_a_breaker() -> None:
    chart = check_flowchart(flowchart(GuardedSaga))
    assert arrows(chart, "-.->") == {
        ("step2", "raises TimeoutError, KeyError / circuit open", "step2_alt")
    }
    assert ("step2", "other error", "undo1") in arrows(chart)  # other errors fail the step


def odd_step(name: str) -> type[StepHandler]:
    return type(name, (StepHandler,), {})


ODD_NAMES = ['end', 'a "quoted" step', "x<y>z & co", "semi;colon #hash", "[box] {brace} |pipe|",
             "back`tick", "o--x", "line\nbreak", "ünïcødé ✓"]


def test_odd_names_are_escaped_and_ids_stay_safe() -> None:
    steps = [odd_step(name) for name in ODD_NAMES]

    body = {"name": 'the "odd" saga; #1 <beta>', "steps": steps}
    odd = types.new_class("Odd", (Saga[Ctx],), exec_body=lambda ns: ns.update(body))
    chart = check_flowchart(flowchart(odd))
    assert [chart.label(f"step{i}") for i in range(1, len(steps) + 1)] == [
        escape(n) for n in ODD_NAMES
    ]
    assert chart.label("step2") == "a #quot;quoted#quot; step"
    assert chart.label("step4") == "semi#59;colon #35;hash"
    assert chart.label("step8") == "line break"
    assert chart.label("start").startswith("the #quot;odd#quot; saga#59; #35;1 #lt;beta#gt;")
    check_sequence(sequence(odd))


def test_escape() -> None:
    assert escape('a"b') == "a#quot;b"
    assert escape("#1") == "#35;1"
    assert escape("<br/>") == "#lt;br/#gt;"
    assert escape("  spaced\n out ") == "spaced out"


# -- sequence diagrams --------------------------------------------------------------------------


def test_sequence_diagram_calls_acts_in_order_and_compensates_in_reverse() -> None:
    statements = check_sequence(sequence(ThreeStepSaga))
    participants = [s[1:] for s in statements if s[0] == "participant"]
    assert participants == [("saga", "ThreeStepSaga (orchestrator)"), ("storage", "Storage"),
                            ("step1", "StepA"), ("step2", "StepB"), ("step3", "StepC")]
    acts = [s[3] for s in statements if s[0] == "msg" and s[4] == "act(context)"]
    assert acts == ["step1", "step2", "step3"]
    assert [s[1] for s in statements if s[0] == "alt"] == ["StepA returns", "StepB returns",
                                                            "StepC returns"]
    # the failure branch of the last step: log the failure, then compensate StepB, then StepA
    start = statements.index(("else", "StepC raises"))
    branch = statements[start : statements.index(("end",), start)]
    calls = [(s[3], s[4]) for s in branch if s[0] == "msg" and s[1] == "saga"]
    assert calls == [
        ("storage", "checkpoint: StepC FAILED + context, status COMPENSATING"),
        ("step2", "compensate(context)"),
        ("storage", "checkpoint: StepB COMPENSATED"),
        ("step1", "compensate(context)"),
        ("storage", "checkpoint: StepA COMPENSATED, status FAILED, lease released"),
    ]
    checkpoints = [s[4] for s in statements
                   if s[0] == "msg" and s[3] == "storage" and "COMPLETED +" in s[4]]
    assert checkpoints[-1] == "checkpoint: StepC COMPLETED + context, status COMPLETED, " \
                              "lease released"
    first = statements.index(("else", "StepA raises"))
    assert "status FAILED" in statements[first + 2][4]  # nothing to compensate


def test_sequence_diagram_of_a_fallback_step() -> None:
    statements = check_sequence(sequence(GuardedSaga))
    assert ("participant", "step2_alt", "Invoice (fallback)") in statements
    blocks = [s for s in statements if s[0] in ("alt", "else")]
    assert ("else", "Charge raises TimeoutError, KeyError / circuit open") in blocks
    assert ("alt", "Invoice returns") in blocks
    assert ("else", "Charge raises another error") in blocks
    assert ("msg", "saga", "->>", "step2_alt", "act(context)") in statements
    # compensating the fallback step (when StepC fails) names both handlers
    assert ("msg", "saga", "->>", "step2",
            "compensate(context) (or Invoice, if the fallback completed)") in statements


# -- stored sagas -------------------------------------------------------------------------------


async def run_saga(saga: Saga[Any], script: Script, **options: Any) -> tuple[
    SagaState, list[SagaLogEntry], MemorySagaStorage
]:
    storage = MemorySagaStorage()
    txn = transaction(saga, script, storage, **options)
    with contextlib.suppress(Exception, Crash):
        await drive(txn)
    return (await storage.get_saga(txn.saga_id), await storage.get_step_history(txn.saga_id),
            storage)


def classes_of(chart: Chart, *nodes: str) -> list[str]:
    return [chart.classes[n] for n in nodes]


def check_instance(text: str) -> Chart:
    chart = check_flowchart(text)
    assert set(LEGEND) <= set(chart.class_defs)
    for name in LEGEND:  # the legend shows every class
        assert chart.classes[f"legend_{name}"] == name
    steps = {n for n in chart.nodes if not n.startswith("legend_")}
    assert steps <= set(chart.classes) | {"start"}
    assert chart.reachable() | {"status"} >= steps - {"status"}
    return chart


async def test_instance_of_a_completed_saga() -> None:
    state, log, _ = await run_saga(ThreeStepSaga(), Script())
    chart = check_instance(instance_flowchart(ThreeStepSaga, state, log))
    assert classes_of(chart, "step1", "step2", "step3") == ["completed"] * 3
    assert classes_of(chart, "undo1", "undo2") == ["notRun"] * 2
    assert chart.classes["completed"] == "completed"
    assert chart.classes["failed"] == "notRun"
    assert "status" not in chart.nodes
    assert chart.label("step1") == "StepA<br/>completed"
    assert str(state.saga_id) in chart.label("start")


class FiveStepSaga(Saga[Ctx]):
    steps = [StepA, StepB, StepC, StepD, odd_step("StepE")]


async def test_instance_of_a_saga_that_failed_at_step_3_and_was_compensated() -> None:
    script = Script()
    script.always("StepC", "act", ValueError("no"))
    state, log, _ = await run_saga(FiveStepSaga(), script)
    assert state.status is SagaStatus.FAILED
    chart = check_instance(instance_flowchart(FiveStepSaga, state, log))
    assert classes_of(chart, "step1", "step2") == ["compensated"] * 2
    assert chart.classes["step3"] == "failed"
    assert chart.label("step3") == "StepC<br/>failed: ValueError"
    assert classes_of(chart, "step4", "step5") == ["notRun"] * 2
    assert classes_of(chart, "undo2", "undo1") == ["compensated"] * 2
    assert classes_of(chart, "undo3", "undo4") == ["notRun"] * 2
    assert chart.classes["failed"] == "failed"
    assert chart.classes["completed"] == "notRun"
    assert "status" not in chart.nodes


async def test_instance_of_a_saga_whose_compensation_failed() -> None:
    script = Script()
    script.always("StepC", "act", ValueError("no"))
    script.always("StepA", "compensate", RuntimeError("stuck"))
    state, log, _ = await run_saga(ThreeStepSaga(), script, compensation_retry_count=2)
    assert state.status is SagaStatus.COMPENSATING
    chart = check_instance(instance_flowchart(ThreeStepSaga, state, log))
    assert classes_of(chart, "step1", "undo1") == ["compensationFailed"] * 2
    assert chart.label("undo1") == "compensate StepA<br/>compensation failed: RuntimeError"
    assert classes_of(chart, "step2", "undo2") == ["compensated"] * 2
    assert chart.classes["step3"] == "failed"
    assert classes_of(chart, "completed", "failed") == ["notRun"] * 2
    assert chart.classes["status"] == "current"
    assert chart.label("status") == "COMPENSATING<br/>next: compensate StepA"
    assert ("status", "-.-", "", "undo1") in chart.edges


async def test_instance_of_a_saga_running_mid_way() -> None:
    script = Script()
    script.always("StepC", "act", Crash())
    state, log, _ = await run_saga(ThreeStepSaga(), script)
    assert state.status is SagaStatus.RUNNING
    chart = check_instance(instance_flowchart(ThreeStepSaga, state, log))
    assert classes_of(chart, "step1", "step2") == ["completed"] * 2
    assert classes_of(chart, "step3", "undo1", "undo2", "completed", "failed") == ["notRun"] * 5
    assert chart.label("status") == "RUNNING<br/>next: StepC"
    assert ("status", "-.-", "", "step3") in chart.edges


async def test_instance_of_a_parked_saga() -> None:
    script = Script()
    script.always("StepB", "act", Crash())
    state, _, storage = await run_saga(ThreeStepSaga(), script)
    await storage.set_recovery_attempts(state.saga_id, 7)
    parked = await recover_saga(ThreeStepSaga, state.saga_id, storage=storage,
                                container=script.container, max_recovery_attempts=5)
    assert parked is SagaStatus.PARKED
    state = await storage.get_saga(state.saga_id)
    log = await storage.get_step_history(state.saga_id)
    chart = check_instance(instance_flowchart(ThreeStepSaga, state, log))
    assert chart.label("status") == "PARKED<br/>next: StepB<br/>parked: needs resume or abort"
    assert ("status", "-.-", "", "step2") in chart.edges


async def test_instance_of_a_saga_that_used_its_fallback() -> None:
    script = Script()
    script.always("Charge", "act", TimeoutError("slow"))
    state, log, _ = await run_saga(FallbackSaga(), script)
    assert state.status is SagaStatus.COMPLETED
    chart = check_instance(instance_flowchart(FallbackSaga, state, log))
    assert chart.classes["step2"] == "failed"
    assert chart.label("step2") == "Charge<br/>failed: TimeoutError"
    assert chart.classes["step2_alt"] == "completed"
    assert classes_of(chart, "step1", "step3", "completed") == ["completed"] * 3
    assert ("step2", "-.->", "fails", "step2_alt") in chart.edges


async def test_instance_of_a_fallback_step_compensated() -> None:
    script = Script()
    script.always("Charge", "act", TimeoutError("slow"))
    script.always("StepC", "act", ValueError("no"))
    state, log, _ = await run_saga(FallbackSaga(), script)
    assert state.status is SagaStatus.FAILED
    chart = check_instance(instance_flowchart(FallbackSaga, state, log))
    assert chart.classes["step2_alt"] == "compensated"
    assert chart.label("undo2") == "compensate Invoice<br/>compensated"
    assert chart.classes["undo2"] == "compensated"


SID = uuid.uuid4()
T0 = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def entry(step: str, action: str, status: str, error: str | None = None) -> SagaLogEntry:
    return SagaLogEntry(SID, step, SagaAction(action), SagaStepStatus(status), T0, None, error)


def state_of(status: SagaStatus) -> SagaState:
    return SagaState(SID, "ThreeStepSaga", status, {}, 1)


@pytest.mark.parametrize(
    ("status", "log", "where", "text"),
    [
        (SagaStatus.PENDING, [], "step1", "PENDING<br/>next: StepA"),
        (SagaStatus.RUNNING,
         [entry("StepA", "act", "COMPLETED"), entry("StepB", "act", "COMPLETED"),
          entry("StepC", "act", "COMPLETED")],
         "completed", "RUNNING<br/>every step completed#59; COMPLETED not written yet"),
        (SagaStatus.COMPENSATING,
         [entry("StepA", "act", "COMPLETED"), entry("StepB", "act", "FAILED", "E")],
         "undo1", "COMPENSATING<br/>next: compensate StepA"),
        (SagaStatus.COMPENSATING,
         [entry("StepA", "act", "COMPLETED"), entry("StepB", "act", "FAILED", "E"),
          entry("StepA", "compensate", "COMPENSATED")],
         "failed", "COMPENSATING<br/>nothing left to compensate#59; FAILED not written yet"),
        (SagaStatus.RUNNING, [entry("Gone", "act", "COMPLETED")], "start",
         "RUNNING<br/>the log does not fit this definition (the log names step #39;Gone#39;, "
         "which the saga no longer has)"),
    ],
)
def test_where_a_non_terminal_saga_continues(
    status: SagaStatus, log: Sequence[SagaLogEntry], where: str, text: str
) -> None:
    chart = check_instance(instance_flowchart(ThreeStepSaga, state_of(status), log))
    assert ("status", "-.-", "", where) in chart.edges
    assert chart.label("status") == text.replace("#39;", "'")


def test_a_started_entry_without_outcome() -> None:
    log = [entry("StepA", "act", "COMPLETED"), entry("StepB", "act", "STARTED")]
    chart = check_instance(instance_flowchart(ThreeStepSaga, state_of(SagaStatus.RUNNING), log))
    assert chart.classes["step2"] == "started"
    assert chart.label("step2") == "StepB<br/>started, outcome not recorded"


def test_the_legend_can_be_left_out() -> None:
    text = instance_flowchart(ThreeStepSaga, state_of(SagaStatus.RUNNING), [], legend=False)
    chart = check_flowchart(text)
    assert not chart.subgraphs
    assert not any(n.startswith("legend_") for n in chart.nodes)
    assert set(chart.class_defs) == set(LEGEND)


# -- forward recovery: retries, timeouts, the pivot ---------------------------------------------


class Charge2(StepHandler):
    pivot = True
    retry = Retry(attempts=3, delay=0.5, retry_on=ConnectionError)
    timeout = 2


class Ship(SagaStepHandler[Ctx, None]):
    retry = Retry(attempts=4, delay=1, backoff=3)

    async def act(self, context: Ctx) -> None:
        pass


class Notify(StepHandler):
    pass


class NotifyLater(Ship):
    pass


class ForwardSaga(Saga[Ctx]):
    steps = [StepA, Step(StepB, compensate_timeout=5), Charge2, Ship,
             Fallback(step=Notify, fallback=NotifyLater)]
    deadline = 60
    durable_wait = 10


def test_flowchart_of_a_saga_with_a_pivot_compensates_only_up_to_it() -> None:
    chart = check_flowchart(flowchart(ForwardSaga))
    assert chart.nodes["step3"].startswith('step3[["')  # the pivot: a double-bordered node
    assert chart.label("step3") == ("Charge2<br/>pivot: forward only after it<br/>retry: 3 "
                                    "attempts, backoff 0.5s x2 on ConnectionError<br/>timeout 2s")
    assert chart.label("step2") == "StepB<br/>compensate timeout 5s"
    assert chart.label("step4") == "Ship<br/>retry: 4 attempts, backoff 1s x3"
    assert chart.label("step5_alt") == "NotifyLater (fallback)<br/>retry: 4 attempts, backoff 1s x3"
    assert chart.label("start") == "ForwardSaga: start<br/>deadline 60s"
    assert {n for n in chart.nodes if n.startswith("undo")} == {"undo1", "undo2"}
    plain = arrows(chart)
    assert ("step3", "failure", "undo2") in plain  # the pivot's own failure compensates
    assert {(s, label, d) for s, label, d in plain if d == "parked"} == {
        ("step4", "retries exhausted", "parked"), ("step5_alt", "retries exhausted", "parked"),
    }
    after = {"step4", "step5", "step5_alt"}
    assert not [e for e in plain if e[0] in after and e[2].startswith(("undo", "failed"))]
    assert chart.styles["parked"] == "fill:#cfd8dc"
    assert chart.reachable() == set(chart.nodes)


def test_flowchart_without_a_pivot_has_no_parked_node() -> None:
    class Retried(Saga[Ctx]):
        steps = [StepA, Step(StepB, retry=Retry(attempts=2, delay=0), timeout=1.5)]

    chart = check_flowchart(flowchart(Retried))
    assert "parked" not in chart.nodes
    assert chart.label("step2") == "StepB<br/>retry: 2 attempts, no wait<br/>timeout 1.5s"
    assert ("step2", "failure", "undo1") in arrows(chart)


def test_sequence_diagram_of_a_saga_with_retries_and_a_pivot() -> None:
    statements = check_sequence(sequence(ForwardSaga))
    notes = [s[2] for s in statements if s[0] == "note"]
    assert ("note", "saga,step3", "pivot: forward only after it, retry: 3 attempts, backoff "
            "0.5s x2 on ConnectionError, timeout 2s") in statements
    assert "checkpoint: Charge2 COMPLETED + context, past the pivot" in [
        s[4] for s in statements if s[0] == "msg"]
    blocks = [s[1] for s in statements if s[0] in ("alt", "else")]
    assert "Ship raises an error it retries, attempts left" in blocks
    assert "Ship raises (retries exhausted, or an error it does not retry)" in blocks
    assert "StepA raises" in blocks  # no retries: as before
    # before the pivot the deadline stops retries; after it, it does not apply
    waits = [n for n in notes if n.startswith("wait, then act again")]
    assert waits[0] == ("wait, then act again, unless the saga#39;s deadline (60s) comes first"
                        "#59; a wait over 10s: status WAITING, lease released, a recovery "
                        "worker resumes it").replace("#39;", "'")
    assert "deadline" not in waits[1]
    # a step after the pivot parks: nothing is compensated from there
    start = blocks.index("Ship raises (retries exhausted, or an error it does not retry)")
    branch = statements[statements.index(("else", blocks[start])):]
    branch = branch[: branch.index(("end",))]
    assert [s[4] for s in branch if s[0] == "msg" and s[1] == "saga"] == [
        "checkpoint: Ship FAILED, status PARKED, lease released"]
    assert not [s for s in statements if s[0] == "msg" and s[3] in ("step3", "step4", "step5")
                and s[4].startswith("compensate")]


def forward_log(*entries: tuple[str, str, str | None]) -> list[SagaLogEntry]:
    return [entry(step, "act", status, error) for step, status, error in entries]


def forward_state(status: SagaStatus, **fields: Any) -> SagaState:
    return SagaState(SID, "ForwardSaga", status, {}, 3, **fields)


UP_TO_THE_PIVOT = [("StepA", "COMPLETED", None), ("StepB", "COMPLETED", None),
                   ("Charge2", "RETRYING", "ConnectionError"), ("Charge2", "COMPLETED", None)]


def test_instance_of_a_waiting_saga_past_its_pivot() -> None:
    log = forward_log(*UP_TO_THE_PIVOT, ("Ship", "RETRYING", "x.Busy"),
                      ("Ship", "RETRYING", "x.Busy"))
    state = forward_state(SagaStatus.WAITING, past_pivot=True,
                          next_attempt_at=T0 + dt.timedelta(seconds=30))
    chart = check_instance(instance_flowchart(ForwardSaga, state, log))
    assert chart.classes["step3"] == "completed"
    assert chart.label("step3").endswith("<br/>completed after 1 failed attempt")
    assert chart.classes["step4"] == "retrying"
    assert chart.label("step4").endswith("<br/>retrying: 2 failed attempts, last: Busy")
    assert chart.label("status") == ("WAITING<br/>next: Ship, attempt 3<br/>resumes at "
                                     "2024-05-01T00:00:30+00:00<br/>past the pivot: forward only")
    assert ("status", "-.-", "", "step4") in chart.edges
    assert chart.classes["parked"] == "notRun"


def test_instance_of_a_saga_parked_past_its_pivot() -> None:
    log = forward_log(*UP_TO_THE_PIVOT, ("Ship", "RETRYING", "x.Busy"), ("Ship", "FAILED", "x.Busy"))
    state = forward_state(SagaStatus.PARKED)  # past_pivot read from the log too
    chart = check_instance(instance_flowchart(ForwardSaga, state, log))
    assert chart.label("step4").endswith("<br/>failed after 2 attempts: Busy")
    assert chart.classes["parked"] == "failed"
    assert chart.label("status") == ("PARKED<br/>next: Ship<br/>past the pivot: forward only"
                                     "<br/>parked: needs resume")


def test_instance_of_a_step_resumed_after_its_retries_ran_out() -> None:
    log = forward_log(*UP_TO_THE_PIVOT, ("Ship", "RETRYING", "x.Busy"), ("Ship", "FAILED", "x.Busy"),
                      ("Ship", "RETRYING", "x.Busy"))
    chart = check_instance(instance_flowchart(ForwardSaga, forward_state(SagaStatus.RUNNING), log))
    assert chart.label("step4").endswith("<br/>retrying: 1 failed attempt, last: Busy")
    assert chart.label("status").startswith("RUNNING<br/>next: Ship, attempt 2<br/>")


def test_instance_of_a_saga_that_failed_before_its_pivot() -> None:
    log = forward_log(("StepA", "COMPLETED", None), ("StepB", "COMPLETED", None),
                      ("Charge2", "RETRYING", "ConnectionError"),
                      ("Charge2", "RETRYING", "ConnectionError"),
                      ("Charge2", "FAILED", "ConnectionError"))
    log += [entry("StepB", "compensate", "COMPENSATED"), entry("StepA", "compensate",
                                                               "COMPENSATED")]
    chart = check_instance(instance_flowchart(ForwardSaga, forward_state(SagaStatus.FAILED), log))
    assert chart.label("step3").endswith("<br/>failed after 3 attempts: ConnectionError")
    assert classes_of(chart, "undo2", "undo1", "failed", "parked") == [
        "compensated", "compensated", "failed", "notRun"]


# -- the real Mermaid parser, when it is installed ----------------------------------------------

MERMAID_CHECK = """
import { JSDOM } from 'jsdom';
import fs from 'fs';
const dom = new JSDOM('<!doctype html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.DOMParser = dom.window.DOMParser;
globalThis.Element = dom.window.Element;
globalThis.HTMLElement = dom.window.HTMLElement;
const { default: mermaid } = await import('mermaid');
mermaid.initialize({ startOnLoad: false });
let failed = 0;
for (const file of process.argv.slice(2)) {
  try { await mermaid.parse(fs.readFileSync(file, 'utf8')); }
  catch (e) { failed++; console.log(file + ': ' + String(e.message || e)); }
}
process.exit(failed ? 1 : 0);
"""


def test_the_real_mermaid_parser_accepts_every_kind_of_diagram(tmp_path: Any) -> None:
    """Runs only where SAGAKIT_MERMAID_DIR names a directory with ``npm install mermaid jsdom``
    done in it (no network is used here); the structural checks above run everywhere."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    directory = os.environ.get("SAGAKIT_MERMAID_DIR")
    node = shutil.which("node")
    if not directory or node is None or not (Path(directory) / "node_modules/mermaid").is_dir():
        message = "set SAGAKIT_MERMAID_DIR to a directory with mermaid and jsdom installed"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message + " (scripts/test.sh does it; CI=true: no silent skip)")
        pytest.skip(message)
    body = {"name": 'the "odd" saga; #1 <beta>', "steps": [odd_step(n) for n in ODD_NAMES]}
    odd = types.new_class("Odd", (Saga[Ctx],), exec_body=lambda ns: ns.update(body))
    sagas = (ThreeStepSaga, FallbackSaga, GuardedSaga, ForwardSaga, odd)
    diagrams = [flowchart(s) for s in sagas]
    diagrams += [sequence(s) for s in sagas]
    log = [entry("StepA", "act", "COMPLETED"), entry("StepB", "act", "FAILED", "x.E"),
           entry("StepA", "compensate", "FAILED", "y.F")]
    diagrams += [instance_flowchart(ThreeStepSaga, state_of(s), log) for s in SagaStatus]
    forward = forward_log(*UP_TO_THE_PIVOT, ("Ship", "RETRYING", "x.Busy"))
    diagrams += [instance_flowchart(ForwardSaga, forward_state(
        s, next_attempt_at=T0, past_pivot=True), forward) for s in SagaStatus]
    files = []
    for number, text in enumerate(diagrams):
        path = tmp_path / f"d{number}.mmd"
        path.write_text(text, encoding="utf-8")
        files.append(str(path))
    script = Path(directory) / "sagakit_check.mjs"
    script.write_text(MERMAID_CHECK, encoding="utf-8")
    done = subprocess.run([node, str(script), *files], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# -- docs/diagrams.md shows real output ---------------------------------------------------------


def test_the_diagrams_page_shows_what_the_functions_print(capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    import asyncio
    import sys
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "diagrams.md"
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", page.read_text(encoding="utf-8"), re.S | re.M)
    python = [code for language, code in blocks if language == "python"]
    mermaid = [code for language, code in blocks if language == "mermaid"]
    assert len(python) == 1
    assert len(mermaid) == 4
    module = types.ModuleType("docs_diagrams_example")
    sys.modules[module.__name__] = module  # dataclasses resolve annotations through it
    try:
        exec(compile(python[0], str(page), "exec"), module.__dict__)
        instance = asyncio.run(module.main())
    finally:
        del sys.modules[module.__name__]
    capsys.readouterr()
    saga = module.OrderSaga
    assert mermaid == [flowchart(saga), sequence(saga), instance,
                       flowchart(module.ForwardOrderSaga)]
    check_flowchart(mermaid[0])
    check_sequence(mermaid[1])
    check_instance(mermaid[2])
    check_flowchart(mermaid[3])
