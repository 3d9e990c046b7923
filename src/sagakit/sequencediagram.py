"""The sequence diagram of a saga definition (:func:`sequence`, also importable from
:mod:`sagakit.diagram`): the orchestrator, the storage and each step handler; every act call,
checkpoint, retry and compensation. Pure functions: no I/O."""

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
    has_breaker,
    options_lines,
)
from sagakit.saga import Saga, StepOptions, StepSpec

__all__ = ["sequence"]


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
    failure branch compensates the steps before it in reverse order (after the pivot: parks
    the saga). A step with a retry policy has a branch for a failed attempt it retries (its
    checkpoint, the wait); its options are a note over the call."""
    name, specs = definition(saga)
    compensable = compensable_steps(specs)
    waits = _Waits(getattr(saga, "durable_wait", 5.0), getattr(saga, "deadline", None))
    out = _Lines()
    out.add(1, "participant saga as ", f"{name} (orchestrator)")
    out.add(1, "participant storage as Storage")
    for index, spec in enumerate(specs, start=1):
        out.add(1, f"participant step{index} as ", spec.name)
        alternative = alternative_name(spec)
        if alternative is not None:
            out.add(1, f"participant step{index}_alt as ", f"{alternative} (fallback)")
    out.message(1, "saga", "->>", "storage", "write the saga row: RUNNING, leased to this run")
    if not specs:
        out.message(1, "saga", "->>", "storage", "checkpoint: COMPLETED, lease released")
    for index, spec in enumerate(specs, start=1):
        done = ", status COMPLETED, lease released" if index == len(specs) else ""
        if spec.pivot:
            done += ", past the pivot"
        failing = _Failing(specs, index, compensable)
        pid, aid = f"step{index}", f"step{index}_alt"
        primary = spec.name
        _options_note(out, 1, pid, spec.options(primary), spec.pivot)
        out.message(1, "saga", "->>", pid, "act(context)")
        out.add(1, "alt ", f"{primary} returns")
        out.message(2, pid, "-->>", "saga", "result")
        out.message(2, "saga", "->>", "storage", f"checkpoint: {primary} COMPLETED + context{done}")
        if spec.pivot:
            out.add(2, "Note over saga: ", "past the pivot: from here on the saga only goes "
                                           "forward, nothing is compensated")
        alternative = alternative_name(spec)
        if alternative is None:
            retried = waits.branch(out, 1, pid, primary, spec.options(primary), failing)
            out.add(1, "else ", f"{primary} raises" + (retried and f" ({retried})"))
            out.message(2, pid, "--x", "saga", "error")
            failing.path(out, 2, primary)
            out.add(1, "end")
            continue
        waits.branch(out, 1, pid, primary, spec.options(primary), failing)
        out.add(1, "else ", f"{primary} {handover_label(spec)}")
        skipped = " (an open circuit skips the call)" if has_breaker(spec) else ""
        out.message(2, pid, "--x", "saga", f"error{skipped}")
        out.add(2, "Note over saga: ", "context restored")
        _options_note(out, 2, aid, spec.options(alternative))
        out.message(2, "saga", "->>", aid, "act(context)")
        out.add(2, "alt ", f"{alternative} returns")
        out.message(3, aid, "-->>", "saga", "result")
        out.message(3, "saga", "->>", "storage",
                    f"checkpoint: {primary} FAILED, {alternative} COMPLETED + context{done}")
        retried = waits.branch(out, 2, aid, alternative, spec.options(alternative), failing)
        out.add(2, "else ", f"{alternative} raises" + (retried and f" ({retried})"))
        out.message(3, aid, "--x", "saga", "error")
        failing.path(out, 3, f"{primary} FAILED, {alternative}")
        out.add(2, "end")
        if exception_names(spec):
            out.add(1, "else ", f"{primary} raises another error")
            out.message(2, pid, "--x", "saga", "error")
            failing.path(out, 2, primary)
        out.add(1, "end")
    if compensable > 1:
        out.add(1, "Note over saga,storage: ", "a compensation still failing after its retries "
                "leaves the saga COMPENSATING, for recovery to finish")
    return "\n".join(out.lines) + "\n"


def _options_note(out: _Lines, depth: int, participant: str, options: StepOptions,
                  pivot: bool = False) -> None:
    lines = options_lines(options, pivot)
    if lines:
        out.add(depth, f"Note over saga,{participant}: ", ", ".join(lines))


@dataclasses.dataclass(frozen=True)
class _Waits:
    """The saga's wait settings, for the branch of a failed attempt that is retried."""

    durable_wait: float
    deadline: float | None

    def branch(self, out: _Lines, depth: int, participant: str, handler: str,
               options: StepOptions, failing: _Failing) -> str:
        """The ``else`` branch of a failed attempt to retry; returns the wording of the final
        failure branch ("" for a handler without retries)."""
        if options.retry is None or options.retry.attempts < 2:
            return ""
        out.add(depth, "else ", f"{handler} raises an error it retries, attempts left")
        out.message(depth + 1, participant, "--x", "saga", "error")
        out.message(depth + 1, "saga", "->>", "storage",
                    f"checkpoint: {handler} RETRYING (attempt n), time of the next attempt")
        until = ("" if failing.past_pivot or self.deadline is None
                 else f", unless the saga's deadline ({self.deadline:g}s) comes first")
        out.add(depth + 1, "Note over saga: ",
                f"wait, then act again{until}; a wait over {self.durable_wait:g}s: status "
                f"WAITING, lease released, a recovery worker resumes it")
        return "retries exhausted, or an error it does not retry"


class _Failing:
    """The failure path of step ``index`` (1-based): compensate the steps before it, or, after
    the pivot, park the saga."""

    def __init__(self, specs: Sequence[StepSpec], index: int, compensable: int) -> None:
        self.specs = specs
        self.index = index
        self.past_pivot = index > compensable

    def path(self, out: _Lines, depth: int, failed: str) -> None:
        if self.past_pivot:
            out.message(depth, "saga", "->>", "storage",
                        f"checkpoint: {failed} FAILED, status PARKED, lease released")
            out.add(depth, "Note over saga: ", "PARKED, never compensated: resume_saga after "
                                               "a fix retries the step with a fresh budget")
            return
        _failure_path(out, depth, self.specs, self.index, failed)


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
        alternative = alternative_name(spec)
        which = f" (or {alternative}, if the fallback completed)" if alternative else ""
        out.message(depth, "saga", "->>", f"step{k}", f"compensate(context){which}")
        end = ", status FAILED, lease released" if k == 1 else ""
        whose = f"{spec.name} (or {alternative})" if alternative else spec.name
        out.message(depth, "saga", "->>", "storage", f"checkpoint: {whose} COMPENSATED{end}")
    out.add(depth, "Note over saga: ", "FAILED, error re-raised")
