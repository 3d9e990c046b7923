"""Throughput and p99 latency as concurrency grows: 1 ... 512 concurrent 5-step sagas, floor,
plain and group commit, on each server."""

from __future__ import annotations

from scenarios.common import MODES, Measure, Section, Session, fmt, ratio, table

TITLE = "Scale: throughput and p99 latency vs concurrency"
NEEDS = ("postgres", "mariadb")


async def run(session: Session, section: Section) -> None:
    sizes = session.sizes
    section.add(
        f"Closed loop at each concurrency c: max({sizes.min_sagas}, {sizes.rounds}·c) sagas "
        f"after a warm-up of c. Pools hold min(c, {session.pool_cap}) connections (the servers' "
        "max_connections is shared with other clients): above that, sagas queue for a "
        "connection, as they would in a real service. x floor = throughput / the floor's at the "
        "same c. writes/batch = writes (a saga's start and its checkpoints) per group-commit "
        "transaction."
    )
    series: dict[str, dict[str, list[dict[str, float]]]] = {}
    section.data["series"] = series
    for backend in session.backends.values():
        rows = []
        series[backend.name] = {mode: [] for mode in MODES}
        for c in sizes.concurrencies:
            got: dict[str, Measure | None] = {}
            for mode in MODES:
                try:
                    got[mode] = m = await session.measure(backend, mode, c)
                except Exception as exc:  # one failed point does not lose the others
                    session.log(f"{backend.name} {mode} x{c} failed: {exc!r}")
                    got[mode] = None
                    continue
                series[backend.name][mode].append(
                    {"concurrency": c, "throughput": m.throughput, "p99_ms": m.p99_ms,
                     "p50_ms": m.p50_ms, "cpu_ms": m.cpu_ms, "errors": m.errors})
            floor, plain, group = got["floor"], got["plain"], got["group"]

            def tp(m: Measure | None) -> float | None:
                return None if m is None else m.throughput

            def p99(m: Measure | None) -> str:
                return "error" if m is None else fmt(m.p99_ms, 1)

            per_batch = (6 / group.batches_per_saga
                         if group is not None and group.batches_per_saga else None)
            errors = sum(m.errors for m in got.values() if m is not None)
            rows.append([
                str(c), fmt(tp(floor), 0), fmt(tp(plain), 0), ratio(tp(plain), tp(floor)),
                fmt(tp(group), 0), ratio(tp(group), tp(floor)), p99(floor), p99(plain),
                p99(group), fmt(per_batch, 1),
                fmt(None if plain is None else plain.cpu_ms),
                fmt(None if group is None else group.cpu_ms), str(errors),
            ])
        section.add(f"**{backend.label}**")
        section.add(table(["c", "floor sagas/s", "plain sagas/s", "x floor", "group sagas/s",
                           "x floor", "floor p99 ms", "plain p99 ms", "group p99 ms",
                           "writes/batch", "plain CPU ms/saga", "group CPU ms/saga", "errors"],
                          rows))
