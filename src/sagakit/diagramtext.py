"""What the diagrams say (see :mod:`sagakit.diagram`): Mermaid escaping and the labels the
flowcharts and the sequence diagram share: a step's options (retry policy, timeouts, pivot) and
a fallback's hand-over. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagakit.retry import Retry
from sagakit.saga import Saga, StepOptions, StepSpec

__all__ = [
    "alternative_name", "compensable_steps", "definition", "escape", "exception_names",
    "handover_label", "has_breaker", "join_label", "options_lines", "pivot_index", "retry_text",
]

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


def definition(saga: Saga[Any] | type[Saga[Any]]) -> tuple[str, tuple[StepSpec, ...]]:
    """The saga's name and step specs (a saga class or instance)."""
    name = getattr(saga, "name", "") or getattr(saga, "__name__", type(saga).__name__)
    specs = tuple(getattr(saga, "step_specs", ()))
    return str(name), specs


def pivot_index(specs: Sequence[StepSpec]) -> int | None:
    """The position of the pivot step, or None."""
    return next((index for index, spec in enumerate(specs) if spec.pivot), None)


def compensable_steps(specs: Sequence[StepSpec]) -> int:
    """How many steps, from the first, may fail into compensation: up to the pivot."""
    pivot = pivot_index(specs)
    return len(specs) if pivot is None else pivot + 1


def retry_text(retry: Retry) -> str:
    """``retry: 4 attempts, backoff 0.5s x2`` (``on E1, E2`` when ``retry_on`` is narrowed)."""
    if not retry.delay:
        pace = "no wait"
    elif retry.backoff == 1:
        pace = f"every {retry.delay:g}s"
    else:
        pace = f"backoff {retry.delay:g}s x{retry.backoff:g}"
    text = f"retry: {retry.attempts} attempts, {pace}"
    if retry.retry_on != (Exception,):
        text += " on " + ", ".join(e.__name__ for e in retry.retry_on)
    return text


def options_lines(options: StepOptions, pivot: bool = False) -> list[str]:
    """The option lines of a step's label (unescaped)."""
    lines = ["pivot: forward only after it"] if pivot else []
    if options.retry is not None and options.retry.attempts > 1:
        lines.append(retry_text(options.retry))
    timeouts = [f"{what}{seconds:g}s" for what, seconds in (
        ("timeout ", options.timeout), ("compensate timeout ", options.compensate_timeout))
        if seconds is not None]
    if timeouts:
        lines.append(", ".join(timeouts))
    return lines


def join_label(text: str, lines: Sequence[str] = ()) -> str:
    """A node label: ``text`` and ``lines``, each escaped, joined by line breaks."""
    return "<br/>".join(escape(line) for line in (text, *lines))


def alternative_name(spec: StepSpec) -> str | None:
    """A fallback step's alternative handler, or None."""
    names = spec.handler_names()
    return names[1] if len(names) > 1 else None


def exception_names(spec: StepSpec) -> list[str]:
    errors = getattr(spec.fallback, "failure_exceptions", ()) or ()
    return [getattr(e, "__name__", str(e)) for e in errors]


def has_breaker(spec: StepSpec) -> bool:
    return getattr(spec.fallback, "circuit_breaker", None) is not None


def handover_label(spec: StepSpec) -> str:
    """What hands a fallback step over: ``fails``, ``raises E1, E2``, ``/ circuit open``."""
    errors = exception_names(spec)
    parts = ["raises " + ", ".join(errors) if errors else "fails"]
    if has_breaker(spec):
        parts.append("circuit open")
    return " / ".join(parts)
