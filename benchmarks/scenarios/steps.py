"""Cost as the step count grows (1, 5, 20, 100 no-op steps, one saga at a time): the cost per
step must stay flat — no step may pay for the ones before it (no history re-read, no growing
write)."""

from __future__ import annotations

import itertools
from typing import Any

from scenarios.common import (
    Measure,
    Section,
    Session,
    count_costs,
    drive,
    fmt,
    run_saga,
    saga_class,
    table,
    verdict,
)

TITLE = "Cost per step as the step count grows"
NEEDS = ("postgres", "mariadb")
FLAT = 1.5
"""Flat: the marginal client CPU of a step at the largest step counts is within this factor of
that at the smallest."""


async def _memory(steps: int, sagas: int) -> Measure:
    from sagakit import MemorySagaStorage

    storage = MemorySagaStorage()
    saga = saga_class(steps)()

    async def one() -> None:
        await run_saga(saga, storage)

    return await drive("memory", one, 1, sagas, warmup=min(sagas, 20))


def _marginals(points: list[tuple[int, float]]) -> list[float | None]:
    out: list[float | None] = [None]
    for (n0, c0), (n1, c1) in itertools.pairwise(points):
        out.append((c1 - c0) / (n1 - n0))
    return out


async def run(session: Session, section: Section) -> None:
    sizes = session.sizes
    section.add(
        f"No-op sagas whose every step changes the context, one at a time; "
        f"max(5, {sizes.step_budget}/steps) sagas per point ({sizes.memory_sagas * 5}/steps on "
        "memory). Per step = per saga / steps. Marginal = the extra client CPU of one more step "
        "between two step counts (the saga's start and finish cancel out): flat means no step "
        "pays for the ones before it. Client CPU is judged rather than wall time because it is "
        "much less disturbed by other load; statements/step shows the writes are flat too "
        "(N+1 statements on PostgreSQL, 2N+1 on MariaDB). Statements counted on a separate short "
        "run."
    )
    data: dict[str, Any] = section.data
    targets: list[Any] = [None, *session.backends.values()]
    for backend in targets:
        name = "memory" if backend is None else backend.name
        rows, points = [], []
        data[name] = []
        for n in sizes.steps:
            if backend is None:
                sagas = max(20, sizes.memory_sagas * 5 // n)
                session.log(f"memory: {n}-step saga x {sagas}")
                m = await _memory(n, sagas)
                floor = None
                statements = None
            else:
                sagas = max(5, sizes.step_budget // n)
                m = await session.measure(backend, "plain", 1, total=sagas, steps=n)
                floor = await session.measure(backend, "floor", 1, total=sagas, steps=n)
                _, statements, _ = await count_costs(
                    session, backend, False, 1, max(2, min(sizes.count_sagas, sagas)), steps=n)
            points.append((n, 1000 * m.cpu_ms))
            data[name].append({"steps": n, "sagas": sagas, "mean_ms": m.mean_ms,
                               "cpu_ms": m.cpu_ms, "statements": statements,
                               "floor_mean_ms": None if floor is None else floor.mean_ms,
                               "floor_cpu_ms": None if floor is None else floor.cpu_ms})
            rows.append([
                str(n), str(sagas), fmt(m.mean_ms / n, 3),
                fmt(None if floor is None else floor.mean_ms / n, 3),
                fmt(1000 * m.cpu_ms / n, 1),
                fmt(None if floor is None else 1000 * floor.cpu_ms / n, 1),
                fmt(None if statements is None else statements / n, 2),
            ])
        marginals = _marginals(points)
        for row, marginal in zip(rows, marginals, strict=True):
            row.append(fmt(marginal, 1))
        label = "memory storage" if backend is None else backend.label
        section.add(f"**{label}**")
        section.add(table(["steps", "sagas", "wall ms/step", "floor wall ms/step",
                           "CPU µs/step", "floor CPU µs/step", "statements/step",
                           "marginal CPU µs/step"], rows))
        known = [x for x in marginals if x is not None]
        if len(known) >= 2 and known[0] > 0:
            spread = known[-1] / known[0]
            section.add(
                f"{label}: marginal client CPU per step at {sizes.steps[-2]}→{sizes.steps[-1]} "
                f"steps is {spread:.2f}x that at {sizes.steps[0]}→{sizes.steps[1]} steps "
                f"(flat within {FLAT}x: {verdict(spread <= FLAT)})."
            )
