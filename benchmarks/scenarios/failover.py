"""Failover: how long a SIGKILLed worker's saga waits before another worker resumes it, and how
many connections a worker holds.

Per backend (a SQLite file, PostgreSQL, MariaDB), two worker processes
(scenarios/recovery_child.py, RecoveryWorker's default settings: concurrency, poll_interval,
failover_poll; the report states them) serve the default queue. Each trial submits one :class:`FailoverSaga`; its
first step appends ``<trial> <pid> <time.time()>`` to a marks file, then sleeps. At a random
moment of that step (KILL_WITHIN seconds after its start, so that the kill falls anywhere in
the other worker's poll cycle: the submit's wake-up made both poll at once on PostgreSQL) the
benchmark SIGKILLs that worker (reaping it at once), notes ``time.time()`` just before the
signal, and waits for another worker's mark of the same saga: the delay is the failover
time. A replacement process is started before the next trial, so two are always alive.

- liveness on (the default) with the default 30 s lease: taken over once the other worker
  finds the dead owner's liveness session gone (its session looks for such orphans every
  failover_poll seconds and wakes it);
- liveness off (``RecoveryWorker(liveness=False)``) with a 5 s lease: taken over once the lease
  has run out, at the next poll after that (lease-bound). The kill comes within about a
  second of the claim, before any renewal (sent after a third of the lease without a
  checkpoint), so with the default 30 s lease the same wait is 25 s longer: that figure is
  computed, not measured.

Connections per worker (PostgreSQL, MariaDB): one worker process with the engine's default pool
(5 + 10 overflow; the storage's gate queues the rest), liveness on, 64 submitted sagas whose
first step sleeps, at concurrency 4 and 64: its server sessions, matched by the TCP ports the
process holds, split into the liveness session (holding the owner's lock), the LISTEN session
(PostgreSQL) and the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from sagakit import Saga, SagaContext, SagaStepHandler
from scenarios.common import Backend, Section, Session, drop, fmt, percentile, table
from scenarios.procs import WorkerProcs, summarise
from scenarios.serverload import sessions, socket_ports

TITLE = "Failover: a SIGKILLed worker's sagas taken over"
NEEDS = ("postgres", "mariadb")
TIMEOUT_FACTOR = 1.5
HOLD_S = 1.5
"""How long the first step sleeps in the failover trials."""
LEASE_BOUND_S = 5.0
"""The lease of the liveness-off trials."""
DEFAULT_LEASE_S = 30.0
KILL_WITHIN = 1.0
"""The kill comes uniformly 0..KILL_WITHIN s after the first step started (seeded)."""
CONNECTION_SAGAS = 64
CONNECTION_CONCURRENCIES = (4, 64)

# -- the saga -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FailoverContext(SagaContext):
    mark_dir: str = ""
    trial: int = 0
    hold_s: float = HOLD_S
    counter: int = 0


class MarkAndHold(SagaStepHandler[FailoverContext, None]):
    """Appends ``<trial> <pid> <time.time()>`` to ``<mark_dir>/marks`` (one write: lines of
    concurrent writers do not mix), then sleeps ``hold_s``."""

    async def act(self, context: FailoverContext) -> None:
        line = f"{context.trial} {os.getpid()} {time.time():.6f}\n".encode()
        fd = os.open(Path(context.mark_dir) / "marks", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        await asyncio.sleep(context.hold_s)

    async def compensate(self, context: FailoverContext) -> None:
        return None


class Finish(SagaStepHandler[FailoverContext, None]):
    async def act(self, context: FailoverContext) -> None:
        context.counter += 1

    async def compensate(self, context: FailoverContext) -> None:
        context.counter -= 1


class FailoverSaga(Saga[FailoverContext]):
    steps = [MarkAndHold, Finish]


def read_marks(directory: Path) -> dict[int, list[tuple[int, float]]]:
    """trial -> [(pid, time)] in the order written."""
    out: dict[int, list[tuple[int, float]]] = {}
    try:
        text = (directory / "marks").read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.setdefault(int(parts[0]), []).append((int(parts[1]), float(parts[2])))
    return out


async def wait_marks(directory: Path, trial: int, count: int,
                     timeout: float) -> list[tuple[int, float]]:
    """The marks of ``trial`` once there are ``count`` (fewer after ``timeout`` seconds)."""
    end = time.monotonic() + timeout
    while True:
        marks = read_marks(directory).get(trial, [])
        if len(marks) >= count or time.monotonic() > end:
            return marks
        await asyncio.sleep(0.01)


# -- trials ---------------------------------------------------------------------------------------


async def trials(session: Session, url: str, tables: dict[str, str], storage: Any,
                 liveness: bool, count: int) -> dict[str, Any]:
    """``count`` kill-and-take-over trials with two worker processes alive throughout."""
    lease = DEFAULT_LEASE_S if liveness else LEASE_BOUND_S
    config: dict[str, Any] = {"url": url, "tables": tables, "deadline_s": 3600,
                              "saga": "failover", "liveness": liveness}
    if not liveness:
        config["lease_seconds"] = lease
    delays: list[float] = []
    misses: list[str] = []
    rng = random.Random(14 + liveness)
    with tempfile.TemporaryDirectory(prefix="sagakit-failover-") as tmp:
        directory = Path(tmp)
        async with WorkerProcs(config, 2) as procs:
            await procs.go()
            await asyncio.sleep(1.0)  # sessions open, first polls done
            for trial in range(count):
                await FailoverSaga().submit(
                    FailoverContext(mark_dir=tmp, trial=trial), storage=storage)
                first = await wait_marks(directory, trial, 1, 30)
                if not first or first[0][0] not in procs.pids:
                    misses.append(f"trial {trial}: no first step seen ({first})")
                    continue
                killed = first[0][0]
                await asyncio.sleep(max(0.0, first[0][1] + rng.uniform(0, KILL_WITHIN)
                                        - time.time()))
                killed_at = await procs.kill(killed)
                marks = await wait_marks(directory, trial, 2, lease + 60)
                taken = [(pid, t) for pid, t in marks[1:] if pid != killed]
                if taken:
                    delays.append(taken[0][1] - killed_at)
                else:
                    misses.append(f"trial {trial}: not taken over within {lease + 60:.0f} s")
                await procs.add()
                await asyncio.sleep(0.3)
                session.log(f"  trial {trial}: "
                            + (f"{delays[-1]:.2f} s" if taken else "not taken over"))
            reports = await procs.stop()
    total = summarise(reports, procs.stderr, len(reports))
    ordered = sorted(delays)
    return {"liveness": liveness, "lease_s": lease, "trials": count, "delays_s": delays,
            "taken_over": len(delays), "misses": misses[:3],
            "p50_s": percentile(ordered, 0.5), "p99_s": percentile(ordered, 0.99),
            "max_s": ordered[-1] if ordered else float("nan"),
            "min_s": ordered[0] if ordered else float("nan"),
            "errors": total["errors"], "first_error": total["first_error"]}


# -- connections per worker -----------------------------------------------------------------------


async def _holders(conn: Any, backend: Backend, storage: Any) -> set[int]:
    """The server sessions holding the liveness lock of a live owner of the sagas in hand."""
    import sqlalchemy as sa

    t = storage.tables.executions
    owners = [r[0] for r in (await conn.execute(
        sa.select(t.c.lease_owner).where(t.c.lease_owner.like("~%")).distinct())).all()]
    held: set[int] = set()
    for owner in owners:
        if backend.name == "postgres":
            rows = (await conn.execute(sa.text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
                "classid = :space AND objid = hashtext(:owner)::oid AND objsubid = 2"),
                {"space": storage.dialect.lock_space, "owner": owner})).all()
            held |= {int(r[0]) for r in rows}
        else:
            got = (await conn.execute(sa.text(
                "SELECT IS_USED_LOCK(CONCAT('sagakit:', MD5(:owner)))"),
                {"owner": owner})).scalar()
            if got is not None:
                held.add(int(got))
    await conn.rollback()
    return held


async def connections(session: Session, backend: Backend, tables: dict[str, str],
                      storage: Any, concurrency: int) -> dict[str, Any]:
    """One worker of ``concurrency`` with CONNECTION_SAGAS submitted sagas (first step sleeping
    4 s): its server sessions by kind, the most seen at once over samples every 0.1 s from its
    start until every saga it can hold is in its first step, and at that moment."""
    from sqlalchemy.ext.asyncio import create_async_engine

    await storage.delete_all()
    config = {"url": backend.url, "tables": tables, "deadline_s": 600, "saga": "failover",
              "concurrency": concurrency}
    in_hand = min(concurrency, CONNECTION_SAGAS)
    peak = {"pool": 0, "listener": 0, "liveness": 0, "total": 0}
    engine = create_async_engine(backend.url, pool_size=1, max_overflow=0)
    with tempfile.TemporaryDirectory(prefix="sagakit-conns-") as tmp:
        for i in range(CONNECTION_SAGAS):
            await FailoverSaga().submit(FailoverContext(mark_dir=tmp, trial=i, hold_s=4.0),
                                        storage=storage)
        try:
            async with engine.connect() as conn, WorkerProcs(config, 1) as procs:
                await procs.go()
                end, settled = time.monotonic() + 30, None
                now: dict[str, int] = {}
                while time.monotonic() < end:
                    ports = socket_ports(procs.pids)
                    found = await sessions(conn, backend.name == "postgres", ports)
                    if backend.name == "postgres":
                        await conn.rollback()
                    held = await _holders(conn, backend, storage)
                    now = {"liveness": sum(1 for s in found if s["pid"] in held),
                           "listener": sum(1 for s in found
                                           if s["query"].upper().startswith("LISTEN")),
                           "total": len(found)}
                    now["pool"] = now["total"] - now["liveness"] - now["listener"]
                    for k, v in now.items():
                        peak[k] = max(peak[k], v)
                    if settled is None and len(read_marks(Path(tmp))) >= in_hand:
                        settled = time.monotonic() + 0.5
                    if settled is not None and time.monotonic() >= settled:
                        break
                    await asyncio.sleep(0.1)
                marks = len(read_marks(Path(tmp)))
                await procs.stop()
        finally:
            await engine.dispose()
    return {"concurrency": concurrency, "in_hand": marks, "peak": peak, "settled": now}


# -- the section ----------------------------------------------------------------------------------


def sqlite_backend(directory: str) -> Backend:
    return Backend("sqlite", f"sqlite+aiosqlite:///{directory}/failover.db",
                   f"SQLite {sqlite3.sqlite_version}", "a file, WAL")


async def measure(session: Session, backend: Backend) -> dict[str, Any]:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    sizes = session.sizes
    sqlite = backend.name == "sqlite"
    tables = ({"executions_table": "fo_e", "logs_table": "fo_l", "queues_table": "fo_q"}
              if sqlite else session.new_tables(backend.url))
    storage = SqlAlchemySagaStorage.from_url(backend.url, **(
        {} if sqlite else {"pool_size": 2}), **tables)
    out: dict[str, Any] = {}
    try:
        await storage.create_schema()
        for key, live, count in (("liveness", True, sizes.failover_trials),
                                 ("lease_bound", False, sizes.failover_lease_trials)):
            session.log(f"{backend.name}: failover, liveness {'on' if live else 'off'}, "
                        f"{count} trials")
            await storage.delete_all()
            out[key] = await trials(session, backend.url, tables, storage, live, count)
        if not sqlite:
            out["connections"] = []
            for conc in CONNECTION_CONCURRENCIES:
                session.log(f"{backend.name}: connections of a worker of concurrency {conc}")
                out["connections"].append(
                    await connections(session, backend, tables, storage, conc))
    finally:
        if sqlite:
            await storage.close()
        else:
            await drop(session, storage)
    return out


async def run(session: Session, section: Section) -> None:
    import inspect

    from sagakit import RecoveryWorker

    defaults = {k: v.default for k, v in inspect.signature(RecoveryWorker).parameters.items()}
    settings = ", ".join(f"{k} {defaults[k]}" for k in ("concurrency", "poll_interval",
                                                        "failover_poll"))
    section.add(
        "Time from SIGKILL of a worker process to the start of the saga's first step in "
        "another worker process (both clocks are this machine's `time.time()`). Two worker "
        f"processes (scenarios/recovery_child.py, RecoveryWorker's defaults: {settings} s) "
        "serve the default queue; each trial submits "
        f"one saga whose first step records its start and sleeps {HOLD_S} s, SIGKILLs the "
        f"worker that started it at a random moment 0-{KILL_WITHIN:.0f} s into that step (so "
        "that the kill falls anywhere in the other worker's cycle; reaped at once) and "
        "waits for another worker's start of "
        "that step; a replacement process is started before the next trial. **Liveness on** "
        f"(the default, lease {DEFAULT_LEASE_S:.0f} s): the other worker finds the dead "
        "owner's liveness session gone — PostgreSQL: its advisory lock free; MariaDB: its "
        "named lock free; SQLite: its pid gone (its own session looks for such orphans every "
        "failover_poll seconds, with jitter, and wakes it). **Liveness off** "
        f"(`RecoveryWorker(liveness=False)`), lease {LEASE_BOUND_S:.0f} s: taken over once "
        "the lease has run out, at the next poll after that (an idle worker without liveness "
        "polls up to every max_idle_poll: 5 s, 15 s on PostgreSQL where it has wake-ups). "
        f"The kill comes within {KILL_WITHIN + 0.1:.1f} s of the claim, before any renewal (a "
        "third of the lease), so with the default "
        f"{DEFAULT_LEASE_S:.0f} s lease the same wait is {DEFAULT_LEASE_S - LEASE_BOUND_S:.0f} "
        "s longer: that row is computed from the measured one, not measured. With fewer "
        "than 100 trials p99 is the largest delay.")
    backends = list(session.backends.values())
    with tempfile.TemporaryDirectory(prefix="sagakit-bench-sqlite-") as tmp:
        for backend in [sqlite_backend(tmp), *backends]:
            data = section.data[backend.name] = await measure(session, backend)
            report(section, backend, data)


def report(section: Section, backend: Backend, data: dict[str, Any]) -> None:
    rows = []
    for key, what in (("liveness", f"liveness on, lease {DEFAULT_LEASE_S:.0f} s"),
                      ("lease_bound", f"liveness off, lease {LEASE_BOUND_S:.0f} s "
                                      "(lease-bound)")):
        r = data[key]
        rows.append([what, f"{r['taken_over']}/{r['trials']}", f"**{fmt(r['p50_s'])}**",
                     fmt(r["p99_s"]), fmt(r["max_s"]), fmt(r["min_s"]), str(r["errors"])])
    lb = data["lease_bound"]
    extra = DEFAULT_LEASE_S - LEASE_BOUND_S
    rows.append([f"liveness off, lease {DEFAULT_LEASE_S:.0f} s (computed: the row above + "
                 f"{extra:.0f} s)", "-", f"**{fmt(lb['p50_s'] + extra)}**",
                 fmt(lb["p99_s"] + extra), fmt(lb["max_s"] + extra), fmt(lb["min_s"] + extra),
                 "-"])
    section.add(f"**{backend.label}** ({backend.version})")
    section.add(table(["worker", "taken over", "p50 s", "p99 s", "max s", "min s",
                       "worker errors"], rows))
    for key in ("liveness", "lease_bound"):
        for miss in data[key]["misses"]:
            section.add(f"{backend.label}, {key}: {miss}")
        if data[key]["first_error"]:
            section.add(f"{backend.label}, {key}, first worker error: "
                        f"`{data[key]['first_error']}`")
    conns = data.get("connections")
    if conns:
        section.add(
            f"{backend.label}: server sessions of one worker process (liveness on, the "
            "engine's default pool of 5 + 10 overflow, the storage's gate queueing the rest) "
            f"with {CONNECTION_SAGAS} submitted sagas whose first step sleeps 4 s; peak = the "
            "most seen at once, sampled every 0.1 s from its start; settled = once every saga "
            "it can hold is in its first step.")
        section.add(table(
            ["concurrency", "sagas in hand", "pool peak", "LISTEN peak", "liveness peak",
             "total peak", "total settled (pool / LISTEN / liveness)"],
            [[str(c["concurrency"]), str(c["in_hand"]), str(c["peak"]["pool"]),
              str(c["peak"]["listener"]), str(c["peak"]["liveness"]),
              f"**{c['peak']['total']}**",
              f"{c['settled'].get('total', '-')} ({c['settled'].get('pool', '-')} / "
              f"{c['settled'].get('listener', '-')} / {c['settled'].get('liveness', '-')})"]
             for c in conns]))
