"""Dispatch: what handing sagas to workers costs, per backend.

- Submit-to-first-step latency: sagas submitted one at a time, at a fixed rate, while one worker
  process serves the queue. Measured from just before ``submit()`` is called (this process's
  ``time.time()``) to the start of the saga's first step in the worker (the worker's
  ``time.time()``, same machine and clock, kept in the saga's context and read back from the
  storage): the submit's commit, the wait until the worker notices (a poll, or a wake-up), its
  claim, and the saga's start.
- Dispatch throughput: a backlog of submitted 3-step no-op sagas in one queue without limits,
  drained by 1, 2 and 4 worker processes; next to the raw-driver floor and sagakit in process.
- The load of an idle worker on the database (scenarios/idle.py).
- Statements and transactions per dispatched saga, counted in one worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from sagakit import Saga, SagaContext, SagaStepHandler
from sagakit.queue import DEFAULT_QUEUE
from scenarios.common import (
    Backend,
    Counter,
    Section,
    Session,
    count_costs,
    drop,
    fmt,
    percentile,
    ratio,
    show,
    spread,
    table,
    verdict,
)
from scenarios.explain import explain_call
from scenarios.idle import measure_idle
from scenarios.procs import WorkerProcs, count_completed, drain, summarise, wakeups
from scenarios.recovery import analyze, make_backlog

TITLE = "Dispatch: submitted sagas and workers"
NEEDS = ("postgres", "mariadb")
TIMEOUT_FACTOR = 2
RATE = 10.0
"""Sagas submitted per second in the latency runs."""
QUEUE = DEFAULT_QUEUE
LATENCY_MODES = {
    "default": ({}, "default worker settings (concurrency 4, poll_interval 1 s, "
                    "max_idle_poll 5 s)"),
    "tight": ({"poll_interval": 0.05, "max_idle_poll": 0.05},
              "tight polling (poll_interval = max_idle_poll = 0.05 s)"),
}
IDLE_TARGET = 1.0
"""Queries per second an idle worker may send to PostgreSQL (the issue's target)."""

# -- the saga -------------------------------------------------------------------------------------


@dataclasses.dataclass
class DispatchContext(SagaContext):
    first_step_at: float = 0.0
    counter: int = 0


class StampFirstStep(SagaStepHandler[DispatchContext, None]):
    """Records when the first step started (its checkpoint stores it)."""

    async def act(self, context: DispatchContext) -> None:
        if not context.first_step_at:
            context.first_step_at = time.time()

    async def compensate(self, context: DispatchContext) -> None:
        return None


class Bump(SagaStepHandler[DispatchContext, None]):
    async def act(self, context: DispatchContext) -> None:
        context.counter += 1

    async def compensate(self, context: DispatchContext) -> None:
        context.counter -= 1


class BumpAgain(Bump):
    pass


class DispatchSaga(Saga[DispatchContext]):
    """Three no-op steps; the first records its start."""

    steps = [StampFirstStep, Bump, BumpAgain]


# -- latency --------------------------------------------------------------------------------------


async def latency_round(backend: Backend, tables: dict[str, str], storage: Any,
                        options: dict[str, Any], sagas: int) -> dict[str, Any]:
    """One worker process; ``sagas`` submitted at RATE per second; latencies in ms."""
    await storage.delete_all()
    config = {"url": backend.url, "tables": tables, "deadline_s": sagas / RATE + 120,
              "saga": "dispatch", **options}
    saga = DispatchSaga()
    submitted: list[tuple[Any, float]] = []
    submit_ms: list[float] = []
    async with WorkerProcs(config, 1) as procs:
        await procs.go()
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        for i in range(sagas):
            delay = start + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            at, t0 = time.time(), time.perf_counter()
            handle = await saga.submit(DispatchContext(), storage=storage, queue=QUEUE)
            submit_ms.append(1000 * (time.perf_counter() - t0))
            submitted.append((handle.saga_id, at))
        waited = time.perf_counter()
        while await count_completed(storage) < sagas and time.perf_counter() - waited < 60:
            await asyncio.sleep(0.05)
        reports = await procs.stop()
    latencies = []
    for saga_id, at in submitted:
        stamp = (await storage.get_saga(saga_id)).context.get("first_step_at")
        if stamp:
            latencies.append(1000 * (stamp - at))
    latencies.sort()
    submit_ms.sort()
    total = summarise(reports, procs.stderr, 1)
    return {"p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "submit_p50_ms": percentile(submit_ms, 0.5),
            "submit_p99_ms": percentile(submit_ms, 0.99),
            "started": len(latencies), "sagas": sagas, "errors": total["errors"],
            "first_error": total["first_error"], "warnings": total["warnings"],
            "wakeups": wakeups(reports)}


async def measure_latency(session: Session, backend: Backend) -> dict[str, Any]:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    tables = session.new_tables(backend.url)
    storage = SqlAlchemySagaStorage.from_url(backend.url, pool_size=2, **tables)
    out: dict[str, Any] = {}
    try:
        await storage.create_schema()
        for mode, (options, _) in LATENCY_MODES.items():
            session.log(f"{backend.name}: latency, {mode}")
            rounds = [await latency_round(backend, tables, storage, options, sizes.latency_sagas)
                      for _ in range(sizes.latency_rounds)]
            out[mode] = {"rounds": rounds,
                         **{k: spread([r[k] for r in rounds])
                            for k in ("p50_ms", "p99_ms", "submit_p50_ms", "submit_p99_ms")}}
    finally:
        await drop(session, storage)
    return out


# -- throughput -----------------------------------------------------------------------------------


async def measure_throughput(session: Session, backend: Backend,
                             deadline_s: float) -> dict[str, Any]:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    conc, backlog = session.sizes.recovery_concurrency, sizes.dispatch_backlog
    tables = session.new_tables(backend.url)
    storage = SqlAlchemySagaStorage.from_url(backend.url, pool_size=2, **tables)
    config = {"url": backend.url, "tables": tables, "deadline_s": deadline_s + 30,
              "saga": "dispatch", "concurrency": conc, "pool_size": conc + 2, "warm": True,
              "poll_interval": 0.05}
    runs: list[dict[str, Any]] = []
    explain: tuple[str, str] | None = None
    try:
        await storage.create_schema()
        for workers in sizes.dispatch_workers:
            rounds = []
            for _ in range(sizes.dispatch_rounds):
                await storage.delete_all()
                insert_s = await make_backlog(storage, backlog, saga=DispatchSaga,
                                              context=DispatchContext().to_dict(),
                                              status="PENDING", queue=QUEUE)
                await analyze(storage)
                session.log(f"{backend.name}: draining {backlog} with {workers} worker(s)")
                async with WorkerProcs(config, workers) as procs:
                    elapsed, done = await drain(procs, storage, backlog, deadline_s, 0.05)
                    reports = await procs.stop()
                total = summarise(reports, procs.stderr, workers)
                rounds.append({**total, "elapsed_s": elapsed, "completed_rows": done,
                               "per_s": min(done, backlog) / elapsed, "drained": done >= backlog,
                               "insert_s": insert_s,
                               "cpu_ms_per_saga": 1000 * total["cpu_s"] / max(done, 1)})
            runs.append({"workers": workers, "rounds": rounds,
                         "per_s": spread([r["per_s"] for r in rounds]),
                         "cpu_ms_per_saga": spread([r["cpu_ms_per_saga"] for r in rounds])})
        await storage.delete_all()
        await make_backlog(storage, backlog, saga=DispatchSaga,
                           context=DispatchContext().to_dict(), status="PENDING", queue=QUEUE)
        await analyze(storage)
        explain = await explain_call(
            storage, lambda: storage.claim_queued(
                "bench-explain", QUEUE, limit=conc, lease_seconds=60,
                saga_names=frozenset({DispatchSaga.name})),
            lambda statement: "UNION" in statement.upper())
    finally:
        await drop(session, storage)
    return {"runs": runs, "backlog": backlog, "concurrency_each": conc,
            "explain": {"plan": explain[0], "index": explain[1]} if explain else None}


async def count_dispatch(session: Session, backend: Backend, sagas: int) -> dict[str, float]:
    """Statements, reads and commits per dispatched saga: one worker in this process draining
    ``sagas`` with the counting hooks on (its polls included, and those of its last moments)."""
    from sagakit import RecoveryWorker, SagaStatus
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    conc = session.sizes.recovery_concurrency
    tables = session.new_tables(backend.url)
    storage = SqlAlchemySagaStorage.from_url(backend.url, pool_size=conc + 2, **tables)
    try:
        await storage.create_schema()
        await make_backlog(storage, sagas, saga=DispatchSaga, context=DispatchContext().to_dict(),
                           status="PENDING", queue=QUEUE)
        counter = Counter(storage.engine)
        worker = RecoveryWorker(storage, [DispatchSaga], concurrency=conc, poll_interval=0.05)
        task = asyncio.ensure_future(worker.run(install_signal_handlers=False))
        started = time.perf_counter()

        def done() -> int:
            return sum(1 for o in worker.outcomes if o.status is SagaStatus.COMPLETED)

        try:
            while done() < sagas and not task.done() and time.perf_counter() - started < 120:
                await asyncio.sleep(0.02)
        finally:
            worker.stop()
            await task
            await counter.aclose()
        n, c = max(1, done()), counter.counts
        return {"statements": c.statements / n, "reads": c.reads / n,
                "commits": c.transactions / n, "sagas": n}
    finally:
        await drop(session, storage)


# -- the section ----------------------------------------------------------------------------------


async def run(session: Session, section: Section) -> None:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    conc = sizes.recovery_concurrency
    listen = "present" if hasattr(SqlAlchemySagaStorage, "listen") else "absent"
    section.add(
        f"What handing sagas to workers costs. Each worker is a RecoveryWorker in its own "
        f"process (scenarios/recovery_child.py) with its own engine, serving queue {QUEUE!r} "
        f"(and recovery); the saga has 3 no-op steps, the first recording when it started. "
        f"`SqlAlchemySagaStorage.listen` (LISTEN/NOTIFY wake-ups, PostgreSQL only) is "
        f"**{listen}** in this build; the rows say whether the workers had wake-ups. Each "
        "latency and throughput run has workers of its own. The machine's cores are shared "
        "by the workers, this process and the database server.")
    budget = sizes.section_timeout * TIMEOUT_FACTOR
    drains = max(1, len(session.backends) * len(sizes.dispatch_workers) * sizes.dispatch_rounds)
    deadline = max(30.0, 0.5 * budget / drains)
    for backend in session.backends.values():
        data: dict[str, Any] = {"listen": listen}
        section.data[backend.name] = data
        data["latency"] = await measure_latency(session, backend)
        floor = await session.measure(backend, "floor", conc, steps=3)
        plain = await session.measure(backend, "plain", conc, steps=3)
        data["floor"] = {"throughput": floor.throughput, "in_process": plain.throughput,
                         "in_process_cpu_ms": plain.cpu_ms, "concurrency": conc}
        data["throughput"] = await measure_throughput(session, backend, deadline)
        counted = min(200, sizes.dispatch_backlog)
        data["costs"] = await count_dispatch(session, backend, counted)
        commits, statements, _ = await count_costs(session, backend, False, conc, counted,
                                                   steps=3)
        data["costs_in_process"] = {"statements": statements, "commits": commits}
        session.log(f"{backend.name}: idle worker load")
        data["idle"] = await measure_idle(session, backend)
        report(section, backend, data, sizes)


def report(section: Section, backend: Backend, data: dict[str, Any], sizes: Any) -> None:
    label = backend.label
    section.add(f"**{label}: submit-to-first-step latency** — {sizes.latency_sagas} sagas "
                f"submitted one at a time, {RATE:.0f} per second, one worker process; median "
                f"over {sizes.latency_rounds} round(s), range in brackets. `submit()` = the "
                "call itself (its one commit).")
    rows = []
    for mode, (_, what) in LATENCY_MODES.items():
        m = data["latency"][mode]
        r = m["rounds"]
        rows.append([what, show(m["p50_ms"], 1, True), show(m["p99_ms"], 1),
                     show(m["submit_p50_ms"], 2), show(m["submit_p99_ms"], 2),
                     f"{sum(x['started'] for x in r)}/{sum(x['sagas'] for x in r)}",
                     "yes" if all(x["wakeups"] for x in r) else "no"])
    section.add(table(["worker", "p50 ms", "p99 ms", "submit() p50 ms", "submit() p99 ms",
                       "started", "wake-ups"], rows))
    t = data["throughput"]
    floor = data["floor"]
    section.add(f"**{label}: dispatch throughput** — a backlog of {t['backlog']} submitted "
                "sagas (PENDING in one queue without limits, inserted directly as submit "
                f"stores them) drained by worker processes of concurrency {t['concurrency_each']}"
                ", poll_interval 0.05 s and their pools' connections open, timed from the start "
                "signal until the COMPLETED rows reach the backlog; median over "
                f"{sizes.dispatch_rounds} round(s), range in brackets. Floor: the raw driver running 3-step sagas at "
                f"{floor['concurrency']} concurrent in this process, {floor['throughput']:.0f}/s;"
                f" sagakit in process at the same concurrency: {floor['in_process']:.0f}/s, "
                f"{floor['in_process_cpu_ms']:.2f} ms CPU per saga.")
    rows = []
    for run in t["runs"]:
        rs = run["rounds"]
        rows.append([str(run["workers"]), show(run["per_s"], 0, True),
                     ratio(run["per_s"]["median"], floor["throughput"]),
                     ratio(run["per_s"]["median"], floor["in_process"]),
                     show(run["cpu_ms_per_saga"], 2), str(sum(r["busy"] for r in rs)),
                     str(sum(r["errors"] for r in rs)),
                     "yes" if all(r["drained"] for r in rs) else "**no**"])
    section.add(table(["workers", "sagas/s", "x floor", "x in process",
                       "worker CPU ms/saga", "busy", "errors", "drained"], rows))
    costs, inproc = data["costs"], data["costs_in_process"]
    section.add(
        f"{label}: a dispatched saga costs {costs['statements']:.2f} statements, of them "
        f"{costs['reads']:.2f} reads, in {costs['commits']:.2f} server transactions (counted in "
        f"one worker of concurrency {t['concurrency_each']} draining {costs['sagas']:.0f}, its "
        f"polls included); run in process, {inproc['statements']:.2f} statements in "
        f"{inproc['commits']:.2f} transactions.")
    firsts = [r["first_error"] for run in t["runs"] for r in run["rounds"] if r["first_error"]]
    firsts += [r["first_error"] for m in data["latency"].values() for r in m["rounds"]
               if r["first_error"]]
    if firsts:
        section.add(f"First error: `{firsts[0]}`")
    idle = data["idle"]
    client, server = idle["client"], idle["server"]
    if backend.name == "postgres":
        counted = (f"{fmt(server['transactions'], 2)} transactions/s counted by the server "
                   f"(pg_stat_database of a database of its own, `{idle['database']}`, less "
                   f"{fmt(idle['server_baseline']['transactions'], 2)}/s in the same window "
                   "without the worker; a backend reports its counts at most once a second, so "
                   "a window's edges may shift one poll in or out)")
    else:
        # Without other clients the window without the worker sees only this benchmark's
        # two SHOW STATUS reads.
        busy = idle["server_baseline"]["Questions"] > 2 / idle["window_s"] + 1
        counted = (f"{fmt(server['Questions'], 2)} Questions/s and "
                   f"{fmt(server['Com_select'], 2)} Com_select/s counted by the server (global "
                   f"counters: {fmt(idle['server_raw']['Questions'], 2)} Questions/s with the "
                   f"worker less {fmt(idle['server_baseline']['Questions'], 2)} in the same "
                   "window without it"
                   + ("; **other clients were using the server: not usable**)" if busy
                      else "; other clients of the server would make this noisy)"))
    queries = client.get("queries", float("nan"))
    met = queries < IDLE_TARGET if backend.name == "postgres" else None
    section.add(
        f"**{label}: an idle worker** (default settings, empty tables, wake-ups "
        f"{'on' if idle['wakeups'] else 'off'}), after a {idle['warmup_s']:.0f} s warm-up: "
        f"{counted}, over {idle['window_s']:.0f} s; then, over the next "
        f"{idle['client_window_s']:.0f} s, counted in the worker: **{fmt(queries, 2)} "
        f"queries/s**, of them {fmt(client.get('statements'), 2)} statements "
        f"({fmt(client.get('reads'), 2)} reads), the rest BEGIN and COMMIT "
        f"({fmt(client.get('transactions'), 2)} transactions/s). Worker CPU "
        f"{fmt(idle['client_cpu_ms_per_s'], 2)} ms/s."
        + (f" Target < {IDLE_TARGET:.0f} query/s: {verdict(met)}." if met is not None
           else ""))
    warnings = sorted({w for m in data["latency"].values() for r in m["rounds"]
                       for w in r["warnings"]} | set(idle["warnings"]))
    if warnings:
        section.add("Worker warnings: " + "; ".join(f"`{w}`" for w in warnings[:3]))
    if t["explain"]:
        section.add(f"EXPLAIN of claim_queued's candidate query on {label} with the backlog of "
                    f"{t['backlog']} due — index used: **{t['explain']['index']}**")
        section.add(f"```\n{t['explain']['plan']}\n```")
