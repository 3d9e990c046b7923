"""Client CPU per 5-step saga, one saga at a time, against the floor on the same server.

Client CPU is this process's CPU time (user + system: the loopback TCP sends count too) divided
by the sagas run; the database server's own CPU is not in it.
"""

from __future__ import annotations

from scenarios.common import (
    Section,
    Session,
    count_costs,
    fmt,
    ratio,
    table,
    verdict,
)

TITLE = "Client CPU per 5-step saga"
NEEDS = ("postgres", "mariadb")
TARGET_MS = 2.0


async def run(session: Session, section: Section) -> None:
    section.add(
        f"5-step no-op saga, one at a time ({session.sizes.total_for(1)} sagas after a warm-up). "
        "floor = the raw driver doing the saga's N+2 autocommit writes; plain = "
        "SqlAlchemySagaStorage; group = the same with group_commit=True (alone, a batch is one "
        "checkpoint). Costs counted on a separate short run."
    )
    for backend in session.backends.values():
        measures = {mode: await session.measure(backend, mode, 1) for mode in
                    ("floor", "plain", "group")}
        for mode in ("plain", "group"):
            m = measures[mode]
            m.commits, m.statements, m.param_bytes = await count_costs(
                session, backend, mode == "group", 1, session.sizes.count_sagas)
        base = measures["floor"]
        rows = []
        for mode, m in measures.items():
            rows.append([
                mode, fmt(m.mean_ms), ratio(m.mean_ms, base.mean_ms), fmt(m.cpu_ms, 3),
                ratio(m.cpu_ms, base.cpu_ms), fmt(m.commits), fmt(m.statements),
                fmt(m.param_bytes, 0),
            ])
        section.add(f"**{backend.label}**")
        section.add(table(["mode", "latency ms/saga", "x floor", "client CPU ms/saga", "x floor",
                           "commits/saga", "statements/saga", "param bytes/saga"], rows))
        plain = measures["plain"]
        if backend.name == "postgres":
            section.add(
                f"PostgreSQL client CPU per saga: **{plain.cpu_ms:.2f} ms** "
                f"({ratio(plain.cpu_ms, base.cpu_ms)} the floor's {base.cpu_ms:.2f} ms; target "
                f"≤ {TARGET_MS:.0f} ms: {verdict(plain.cpu_ms <= TARGET_MS)})."
            )
        section.data[backend.name] = {mode: vars(m) for mode, m in measures.items()}
