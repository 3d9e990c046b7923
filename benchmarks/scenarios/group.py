"""Group commit at 32 concurrent sagas: throughput and latency against the unbatched floor."""

from __future__ import annotations

from scenarios.common import Section, Session, count_costs, fmt, ratio, table, verdict

TITLE = "Group commit at 32 concurrent sagas"
NEEDS = ("postgres", "mariadb")
CONCURRENCY = 32
TARGET = 1.0


async def run(session: Session, section: Section) -> None:
    c = CONCURRENCY
    section.add(
        f"{session.sizes.total_for(c)} five-step no-op sagas, {c} at a time (closed loop: each "
        f"of {c} workers starts a saga when its last one ends), after a warm-up of {c}. "
        f"Pools of {min(c, session.pool_cap)} connections. Latency is per saga, start to end."
    )
    for backend in session.backends.values():
        measures = {mode: await session.measure(backend, mode, c) for mode in
                    ("floor", "plain", "group")}
        for mode in ("plain", "group"):
            m = measures[mode]
            m.commits, m.statements, m.param_bytes = await count_costs(
                session, backend, mode == "group", c, max(session.sizes.count_sagas, 2 * c))
        base = measures["floor"]
        rows = []
        for mode, m in measures.items():
            # 6 writes per saga (the start and 5 checkpoints) share the batches
            per_batch = (6 / m.batches_per_saga) if m.batches_per_saga else None
            rows.append([
                mode, fmt(m.throughput, 0), ratio(m.throughput, base.throughput),
                fmt(m.p50_ms, 1), fmt(m.p99_ms, 1), ratio(m.p99_ms, base.p99_ms),
                fmt(m.cpu_ms, 2), fmt(m.commits), fmt(m.statements), fmt(per_batch, 1),
                str(m.errors),
            ])
        section.add(f"**{backend.label}**")
        section.add(table(["mode", "sagas/s", "x floor", "p50 ms", "p99 ms", "p99 x floor",
                           "client CPU ms/saga", "commits/saga", "statements/saga",
                           "writes/batch", "errors"], rows))
        group = measures["group"]
        x = group.throughput / base.throughput if base.throughput else float("nan")
        section.add(
            f"{backend.label} group commit at {c}: **{x:.2f}x the floor's throughput** "
            f"({group.throughput:.0f} vs {base.throughput:.0f} sagas/s; target ≥ {TARGET:.1f}x: "
            f"{verdict(x >= TARGET)}), p99 {group.p99_ms:.1f} ms vs {base.p99_ms:.1f} ms."
        )
        section.data[backend.name] = {mode: vars(m) for mode, m in measures.items()}
