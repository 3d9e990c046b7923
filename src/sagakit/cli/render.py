"""How the ``sagakit`` command prints: times, statuses, leases, tables, JSON, and the one line
per saga that ``recover``, ``resume``, ``abort`` and ``submit --wait`` report."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO
from uuid import UUID

from sagakit.cli.exits import EXIT_OK, EXIT_UNFINISHED
from sagakit.records import TERMINAL_STATUSES, SagaLogEntry, SagaState, SagaStatus

__all__ = ["Outcome", "clip", "entry_json", "lease", "print_json", "report", "state_json",
           "status", "table", "when"]


def when(moment: dt.datetime | None) -> str:
    """A time in UTC to the second, ``-`` for none."""
    if moment is None:
        return "-"
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def status(state: SagaState) -> str:
    """A saga's status, and for a waiting one when its next attempt is due."""
    if state.status is SagaStatus.WAITING and state.next_attempt_at is not None:
        return f"WAITING until {when(state.next_attempt_at)}"
    return state.status.value


def lease(state: SagaState, now: dt.datetime) -> str:
    """Who holds a saga's lease: ``-``, the owner, or the owner ``(expired)``."""
    if not state.lease_owner:
        return "-"
    expires = state.lease_expires_at
    if expires is not None and expires <= now:
        return f"{state.lease_owner} (expired)"
    return state.lease_owner


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, headers first."""
    body = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in body) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in body]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, SagaStatus):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def state_json(state: SagaState, *, context: bool) -> dict[str, Any]:
    """Every field of a saga row, the context only when asked for."""
    data = {f.name: _jsonable(getattr(state, f.name)) for f in dataclasses.fields(state)}
    if not context:
        data.pop("context", None)
    return data


def entry_json(entry: SagaLogEntry) -> dict[str, Any]:
    """One step log entry as JSON."""
    return {
        "step_name": entry.step_name,
        "action": str(entry.action),
        "status": str(entry.status),
        "timestamp": _jsonable(entry.timestamp),
        "error_type": entry.error_type,
        "details": entry.details,
        "attempt": entry.attempt,
    }


def print_json(data: Any, out: TextIO | None = None) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str), file=out or sys.stdout)


def clip(text: str | None, limit: int = 100) -> str:
    """Text on one line, cut to ``limit`` characters."""
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@dataclasses.dataclass
class Outcome:
    """What a command did to one saga: its status before and after, or an error, or busy."""

    saga_id: UUID
    name: str
    status: SagaStatus | None = None
    before: SagaStatus | None = None
    error: str | None = None
    busy: bool = False

    def ok(self) -> bool:
        return self.busy or (self.status in TERMINAL_STATUSES and self.error is None)

    def json(self) -> dict[str, Any]:
        return {
            "saga_id": str(self.saga_id),
            "name": self.name,
            "status_before": self.before.value if self.before else None,
            "status": self.status.value if self.status else None,
            "error": self.error,
            "busy": self.busy,
        }

    def line(self) -> str:
        if self.busy:
            result = "skipped: leased by another run"
        elif self.error is not None:
            result = f"error: {self.error}"
        else:
            assert self.status is not None
            result = self.status.value
            if self.before is not None:
                result = f"{self.before.value} -> {result}"
            if self.status is SagaStatus.PARKED:
                result += " (parked: resume or abort it)"
            elif self.status is SagaStatus.WAITING:
                result += " (waiting: recovery resumes it when its next attempt is due)"
            elif self.status not in TERMINAL_STATUSES:
                result += " (not finished: recovery will try again)"
        return f"{self.saga_id}  {self.name}  {result}"


def report(args: argparse.Namespace, outcomes: Sequence[Outcome], *, many: bool) -> int:
    """Print outcomes (``--json``: objects); exit 0 when every saga is terminal, else 1.
    (``recover --all`` prints its text lines itself, as they come, and a summary.)"""
    if args.json:
        print_json([o.json() for o in outcomes] if many else outcomes[0].json())
    else:
        for outcome in outcomes:
            print(outcome.line())
    return EXIT_OK if all(o.ok() for o in outcomes) else EXIT_UNFINISHED
