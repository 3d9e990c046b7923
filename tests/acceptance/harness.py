"""Crash-injection harness: real processes, real databases, SIGKILL everywhere, then invariants.

Run by hand::

    python -m tests.acceptance.harness --backend postgres --sagas 200 --workers 3
    python -m tests.acceptance.harness --backend sqlite --sagas 50 --seed 7 --keep
    python -m tests.acceptance.harness --backend mysql --sagas 200 --workers 3 --partitions 36

What one run does:

1. Creates sagakit's tables and an events table under fresh names (``hx<pid>_<random>_*``).
2. Plans the sagas (seeded), a mix of the two definitions of :mod:`tests.acceptance.crashsaga`
   (``--forward-share`` of them ForwardSaga). A :class:`~tests.acceptance.crashsaga.CrashSaga`
   either completes, fails at a given act (compensation), fails with compensations that fail a
   few times first, or fails with a compensation that fails for good (it must end PARKED). A
   :class:`~tests.acceptance.crashsaga.ForwardSaga` has acts that fail a few attempts first
   (retried, after in-process or durable waits), and either completes, or has a step before the
   pivot fail for good (permanently, or at every attempt: it compensates), or a step after the
   pivot fail at every attempt (its retries run out: it must end PARKED, uncompensated). Many
   get one or two *crash points* where the process running them kills itself with SIGKILL: at
   the start of an act or compensation (the previous checkpoint just committed), in the middle
   of one, or at its end (work done, checkpoint not yet written); and for ForwardSaga inside a
   retried attempt, during an in-process wait, right after a durable wait's checkpoint (the
   saga WAITING), just before or just after the pivot's checkpoint. The first few sagas cover
   every kind of crash point, so even a tiny run hits them all.
3. Starts ``--workers`` recovery worker processes (``sagakit.RecoveryWorker``, lease
   ``--lease`` seconds, polling every 0.1 s, backoff 0) and saga runner processes (each starts a
   batch of sagas with ``SagaTransaction`` and chosen ids), and keeps them going: a dead worker
   is replaced; a dead runner's sagas that were never created are started again by a new one.
4. Meanwhile SIGKILLs ``--random-kills`` randomly chosen live processes at random moments
   (some of them, busy recovery workers, get SIGTERM instead: a graceful shutdown they must
   finish with exit code 0).

   *Partition mode* (``--partitions N``; PostgreSQL and MariaDB only: SQLite has no network
   link): every worker process reaches the database through a fault-injecting TCP proxy of its
   own (:class:`~tests.acceptance.faultproxy.FaultProxy`, started by the harness; sagakit's
   storage and with it the liveness and wake-up sessions go through it, the events table does
   not: it stands for the outside world the steps act on). Runners connect directly. Besides
   the kills, the harness injects N link faults at random moments into randomly chosen workers,
   preferably one in the middle of a step (see :mod:`tests.acceptance.links`): alternately a
   *cut* (every connection reset, new ones refused, for 0.5 to 3 s: the server ends the
   worker's liveness session, and other workers may take its sagas over at once) and a
   *stall* (packets held, not refused, some stalls shorter than the lease and some longer: the
   server keeps the session, the lease rules), then heals the link. Each fault is a ``fault``
   event and each heal a ``heal`` event; the report counts cuts and stalls, those that hit a
   worker holding a saga or in a step, and the sagas taken over meanwhile. The invariants are
   the same.
5. Waits until every saga is COMPLETED, FAILED or PARKED (``--timeout``: else it fails listing
   the stuck sagas; a WAITING saga is not done), stops the workers with SIGTERM, and writes one
   ``exit`` event per process.
6. Checks the invariants of :mod:`tests.acceptance.checker` on every saga and prints the report:
   sagas, processes, kills, crash points, link faults, invariant checks and violations.
7. Drops its tables (unless ``--keep``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
import uuid
from collections import Counter
from typing import Any

import sqlalchemy as sa

from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.checker import (
    CATEGORIES,
    Event,
    FinalSaga,
    Findings,
    LogRow,
    check_all,
    crash_points,
    expected_status,
)
from tests.acceptance.eventlog import TableNames, epoch
from tests.acceptance.links import Links, fault_counts, held_by_pid, leases
from tests.acceptance.procs import FINAL, Proc, ProcessHarness, RunConfig, RunReport, RunStuck
from tests.acceptance.scenarios import make_plan

HarnessStuck = RunStuck


@dataclasses.dataclass
class HarnessConfig(RunConfig):
    """One crash-injection run (see the module's docstring); the options by the same names set
    them by hand."""

    workers: int = 2
    concurrency: int = 4
    batch: int = 6
    runners: int = 3
    random_kills: int = 4
    """Random interventions of the harness: SIGKILL, or for a worker (``term_share`` of the
    time) SIGTERM, a graceful shutdown the worker must complete with exit code 0."""
    term_share: float = 0.3
    kill_every: tuple[float, float] = (0.2, 0.8)
    crash_rate: float = 0.5
    lease: float = 1.0
    max_attempts: int = 20  # SIGKILLs count as attempts: keep far above one saga's crashes
    retry: int = 3
    step_ms: int = 20
    group_commit: bool = False
    exhaust_retries: bool = False
    """Let some transient compensations fail for a whole recovery run first (N = retry): shows
    that sagakit then compensates the earlier steps before that one (I3.reverse-order-*)."""
    forward_share: float = 0.5
    """The share of ForwardSaga among the sagas planned after the coverage ones."""
    partitions: int = 0
    """Partition mode: link faults (cuts and stalls) to inject, each worker behind a proxy of
    its own (:mod:`tests.acceptance.links`); PostgreSQL and MariaDB only (ValueError for
    SQLite, which has no network link)."""
    fault_every: tuple[float, float] = (0.5, 2.0)
    """Seconds between two link faults (drawn uniformly)."""

    def __post_init__(self) -> None:
        if self.partitions and (self.url or self.backend).startswith("sqlite"):
            raise ValueError("partition mode needs a database reached over the network "
                             "(postgres, mysql): SQLite has no link to cut")


@dataclasses.dataclass
class Report(RunReport):
    """What a crash-injection run saw: the statuses the plan configured, the kills at crash
    points (``kills_self``) and by the harness, the crash points per category."""

    configured: dict[str, int]
    kills_self: int
    kills_parent: int
    crash_points: dict[str, int]
    most_attempts: int = 0
    """The most recovery attempts any saga not meant to park needed (SIGKILLs count)."""
    graceful_stops: int = 0
    group_commit: bool = False
    definitions: dict[str, int] = dataclasses.field(default_factory=dict)
    partitions: int = 0
    """The link faults asked for (partition mode); ``faults`` counts those injected (see
    :func:`tests.acceptance.links.fault_counts`)."""
    faults: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def kills(self) -> int:
        return self.kills_self + self.kills_parent

    @property
    def total_crash_points(self) -> int:
        return sum(self.crash_points.values())

    def render(self) -> str:
        points = ", ".join(f"{c} {self.crash_points.get(c, 0)}" for c in CATEGORIES)
        by_invariant: Counter[str] = Counter()
        for name, n in self.checks.items():
            by_invariant[name.split(".")[0]] += n
        lines = [
            f"crash-injection harness: backend={self.backend} seed={self.seed}"
            + (" group-commit" if self.group_commit else ""),
            f"  sagas            {self.sagas} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.definitions.items())) + ")  final: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
            + "  (configured: " + ", ".join(f"{k} {v}" for k, v in sorted(self.configured.items()))
            + ")",
            f"  processes        {self.processes} started",
            f"  kills (SIGKILL)  {self.kills}  (self-inflicted at crash points {self.kills_self}, "
            f"random by the harness {self.kills_parent}); graceful SIGTERM stops of busy "
            f"workers {self.graceful_stops}",
            f"  crash points     {self.total_crash_points}  ({points})",
            *([self._faults_line()] if self.partitions else []),
            f"  invariant checks {self.total_checks}  ("
            + ", ".join(f"{k} {v}" for k, v in sorted(by_invariant.items())) + ")",
            f"  events           {self.events}; most recovery attempts of a saga not meant "
            f"to park: {self.most_attempts}",
            f"  violations       {len(self.violations)}",
            f"  duration         {self.duration:.1f}s",
        ]
        return "\n".join(lines + self._problems(violations=50, exits=20))

    def _faults_line(self) -> str:
        f = self.faults.get
        kinds = [f"{k} {f(k, 0)} ({f(k + '_holding', 0)} of a worker holding a saga, "
                 f"{f(k + '_in_step', 0)} in a step; {f(k + '_taken_over', 0)} sagas taken "
                 "over meanwhile)" for k in ("cuts", "stalls")]
        return (f"  link faults      {f('cuts', 0) + f('stalls', 0)} of {self.partitions}: "
                f"{kinds[0]}, {kinds[1]}; {f('long_stalls', 0)} stalls longer than the lease")


def _open_storage(url: str, prefix: str) -> SqlAlchemySagaStorage:
    names = TableNames.for_prefix(prefix)
    return SqlAlchemySagaStorage.from_url(
        url, executions_table=names.executions, logs_table=names.logs)


class Harness(ProcessHarness[HarnessConfig]):
    def __init__(self, config: HarnessConfig) -> None:
        super().__init__(config, name="harness", tag="hx", open_storage=_open_storage)
        self.plan: dict[str, dict[str, Any]] = {}
        self.kills_parent = 0
        self.graceful_stops = 0
        self.queue: list[list[str]] = []
        self.links: Links | None = None

    # -- lifecycle

    async def run(self) -> Report:
        t0 = time.monotonic()
        try:
            c = self.config
            if c.partitions:
                self.links = Links(self.url, c.partitions, c.lease, self.rng, c.fault_every)
            await self._create_tables()
            self.plan = make_plan(self.config, self.rng)
            (self.workdir / "plan.json").write_text(json.dumps(self.plan))
            ids = list(self.plan)
            self.queue = [ids[i:i + self.config.batch] for i in range(0, len(ids), self.config.batch)]
            try:
                await self._drive()
            finally:
                if self.links is not None:
                    await self._healed(self.links.heal_all())
                await self._stop_all()
            findings, report_data = await self._check()
            return Report(
                backend=self.config.backend, seed=self.seed, sagas=len(self.plan),
                duration=time.monotonic() - t0, violations=findings.violations,
                checks=dict(findings.checks), unexpected_exits=self.unexpected,
                processes=self.started, kills_parent=self.kills_parent,
                graceful_stops=self.graceful_stops,
                group_commit=self.config.group_commit, partitions=self.config.partitions,
                **report_data,
            )
        finally:
            if self.links is not None:
                self.links.close()
            await self._cleanup()

    async def _start(self, kind: str, ids: list[str] | None = None) -> Proc:
        c = self.config
        options = ["--lease", str(c.lease), "--max-attempts", str(c.max_attempts),
                   "--retry", str(c.retry)]
        if c.group_commit:
            options.append("--group-commit")
        if kind == "saga":
            options += ["--plan", str(self.workdir / "plan.json"), "--ids", ",".join(ids or [])]
        else:
            options += ["--concurrency", str(c.concurrency), "--poll", "0.1"]
        links = self.links if kind == "worker" else None
        if links is None:
            return await self._spawn(kind, ["tests.acceptance.runner", kind], options, ids)
        proxy, url = links.open()
        proc = await self._spawn(kind, ["tests.acceptance.runner", kind],
                                 [*options, "--storage-url", url], ids)
        links.attach(proc.label, proxy)
        return proc

    def _live(self, kind: str) -> list[Proc]:
        return [p for p in self.procs if p.kind == kind and not p.terminated]

    async def _drive(self) -> None:
        c = self.config
        deadline = time.monotonic() + c.timeout
        next_kill = time.monotonic() + self.rng.uniform(*c.kill_every)
        next_poll = 0.0
        while True:
            while self.queue and len(self._live("saga")) < c.runners:
                await self._start("saga", self.queue.pop(0))
            while len(self._live("worker")) < c.workers:
                await self._start("worker")
            await self._wait_exits()
            now = time.monotonic()
            if self.kills_parent + self.graceful_stops < c.random_kills and now >= next_kill:
                next_kill = now + self.rng.uniform(*c.kill_every)
                candidates = [p for p in self.procs if now - p.started > 0.4 and not p.terminated
                              and not p.killed_by_parent and p.process.returncode is None]
                candidates.sort(key=lambda p: p.label)
                ready = [p for p in candidates if p.kind == "worker" and p.ready()]
                graceful = bool(ready) and self.rng.random() < c.term_share
                if candidates:
                    victim = self.rng.choice(ready if graceful else candidates)
                    if graceful:
                        self.graceful_stops += 1
                    else:
                        self.kills_parent += 1
                    await self._signal(victim, signal.SIGTERM if graceful else signal.SIGKILL)
            if self.links is not None:
                await self._partition(now)
            if now >= next_poll and not self.queue and not self._live("saga"):
                next_poll = now + 0.2
                statuses = await self._statuses()
                if len(statuses) == len(self.plan) and all(s in FINAL for s in statuses.values()):
                    return
            if now > deadline:
                raise HarnessStuck(await self._stuck_report())

    async def _partition(self, now: float) -> None:
        """Heal the link faults due, and inject one if due (see :mod:`tests.acceptance.links`),
        recorded as a ``fault`` event."""
        links = self.links
        assert links is not None
        await self._healed(links.heal_due(now))
        if not links.due(now):
            return
        t = self.events.events
        async with self._reader.connect() as conn:
            links.read_events(await conn.execute(
                sa.select(t.c.id, t.c.label, t.c.saga_id, t.c.step, t.c.action, t.c.phase)
                .where(t.c.id > links.cursor).order_by(t.c.id)))
            held = held_by_pid((await conn.execute(leases(self.storage.tables.executions)))
                               .scalars())
        live = {p.label: p.process.pid for p in self._live("worker") if now - p.started > 1.0
                and not p.killed_by_parent and p.process.returncode is None and p.ready()}
        label = links.choose(now, list(live), {k: held[pid] for k, pid in live.items()})
        if label is None:
            return
        pid = live[label]
        fault = links.inject(label, now)
        await self.events.record(None, None, None, "fault", label=label, pid=pid,
                                 outcome=f"{fault.kind}:{fault.seconds:.2f}:{held[pid]}")
        self._say(f"harness: {fault.kind} of {label}'s link for {fault.seconds:.2f}s "
                  f"(holding {held[pid]} sagas, in {links.in_step(label)} steps)")

    async def _healed(self, labels: list[str]) -> None:
        for label in labels:
            await self.events.record(None, None, None, "heal", label=label)
            self._say(f"harness: {label}'s link healed")

    async def _exited(self, proc: Proc) -> None:
        if self.links is not None:
            self.links.drop(proc.label)
        rc = proc.process.returncode
        if proc.killed_by_parent:
            outcome = "killed-by-parent"
        elif rc == -signal.SIGKILL:
            outcome = "killed-self"
        elif proc.terminated:
            outcome = f"terminated returncode={rc}"
        else:
            outcome = f"returncode={rc}"
        await self._record_exit(proc, outcome, expected=outcome.startswith("killed") or (
            rc == 0 and (proc.kind == "saga" or self.stopping or proc.terminated))
            # stopped at the end of the run before it served (a slow start): it did nothing
            or (rc == -signal.SIGTERM and self.stopping and not proc.ready()))
        if proc.kind == "saga" and outcome != "returncode=0":
            existing = await self._statuses(proc.ids)
            missing = [i for i in proc.ids if i not in existing]
            if missing:
                self.queue.insert(0, missing)

    # -- reading back

    async def _statuses(self, ids: list[str] | None = None) -> dict[str, str]:
        t = self.storage.tables.executions
        stmt = sa.select(t.c.saga_id, t.c.status)
        if ids is not None:
            stmt = stmt.where(t.c.saga_id.in_([uuid.UUID(i) for i in ids]))
        async with self._reader.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return {str(r[0]): r[1] for r in rows}

    async def _stuck_report(self) -> str:
        statuses = await self._statuses()
        stuck = [i for i in self.plan if statuses.get(i) not in FINAL]
        lines = [self._stuck_header(len(stuck), len(self.plan)) + "):"]
        events = [Event.from_row(r) for r in await self.events.all_events()]
        for sid in stuck[:20]:
            try:
                s = await self.storage.get_saga(uuid.UUID(sid))
                state = (f"{s.status.value} attempts={s.recovery_attempts} "
                         f"lease_owner={s.lease_owner} lease_expires_at={s.lease_expires_at} "
                         f"next_attempt_at={s.next_attempt_at}")
            except Exception as exc:
                state = f"not readable: {exc!r}"
            last = [f"{e.label}:{e.action or ''}:{e.step or ''}:{e.phase}:{e.outcome or ''}"
                    for e in events if e.saga_id == sid][-6:]
            lines.append(f"  {sid} {self.plan[sid]['key']} {state}; last events {last}")
        lines.append(f"live processes: {sorted(p.label for p in self.procs)}; "
                     f"queued batches: {len(self.queue)}")
        return "\n".join(lines)

    async def _check(self) -> tuple[Findings, dict[str, Any]]:
        finals: dict[str, FinalSaga] = {}
        for sid in self.plan:
            with contextlib.suppress(Exception):
                s = await self.storage.get_saga(uuid.UUID(sid))
                finals[sid] = FinalSaga(sid, s.status.value, dict(s.context), s.recovery_attempts,
                                        s.past_pivot)
        logs_t = self.storage.tables.logs
        async with self._reader.connect() as conn:
            rows = (await conn.execute(
                sa.select(logs_t.c.id, logs_t.c.saga_id, logs_t.c.step_name, logs_t.c.action,
                          logs_t.c.status, logs_t.c.attempt, logs_t.c.created_at)
                .order_by(logs_t.c.id))).all()
        logs: dict[str, list[LogRow]] = {}
        for r in rows:
            logs.setdefault(str(r.saga_id), []).append(LogRow(
                r.id, r.step_name, r.action, r.status, r.attempt, epoch(r.created_at)))
        events = [Event.from_row(r) for r in await self.events.all_events()]
        findings = check_all(self.plan, finals, logs, events)
        data = {
            "statuses": dict(Counter(f.status for f in finals.values())),
            "configured": dict(Counter(expected_status(c) for c in self.plan.values())),
            "kills_self": sum(1 for e in events if e.phase == "exit"
                              and e.outcome == "killed-self"),
            "crash_points": dict(crash_points(events)),
            "events": len(events),
            "most_attempts": max((f.attempts for sid, f in finals.items()
                                  if expected_status(self.plan[sid]) != "PARKED"), default=0),
            "definitions": dict(Counter(c["definition"] for c in self.plan.values())),
            "faults": fault_counts(events, self.config.lease),
        }
        return findings, data


async def run_harness(config: HarnessConfig) -> Report:
    return await Harness(config).run()


def main(argv: list[str] | None = None) -> int:
    d = HarnessConfig()
    p = HarnessConfig.parser("python -m tests.acceptance.harness", __doc__)
    p.add_argument("--workers", type=int, default=d.workers, help="recovery worker processes")
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="sagas each recovery worker runs at once")
    p.add_argument("--batch", type=int, default=d.batch, help="sagas per runner process")
    p.add_argument("--runners", type=int, default=d.runners, help="runner processes at once")
    p.add_argument("--random-kills", type=int, default=None,
                   help="random SIGKILLs (or SIGTERMs of busy workers) of live processes (default: sagas / 6)")
    p.add_argument("--crash-rate", type=float, default=d.crash_rate,
                   help="share of sagas given crash points")
    p.add_argument("--lease", type=float, default=d.lease)
    p.add_argument("--max-attempts", type=int, default=d.max_attempts)
    p.add_argument("--group-commit", action="store_true",
                   help="the processes' storages use group commit")
    p.add_argument("--exhaust-retries", action="store_true",
                   help="some compensations fail through all retries of one recovery run")
    p.add_argument("--forward-share", type=float, default=d.forward_share,
                   help="share of ForwardSaga among the randomly planned sagas")
    p.add_argument("--partitions", type=int, default=d.partitions,
                   help="partition mode: link faults (cuts, stalls) between workers and the "
                        "database (postgres, mysql)")
    p.add_argument("--timeout", type=float, default=None, help="seconds (default scales)")
    a = p.parse_args(argv)
    try:
        config = HarnessConfig(
            backend=a.backend, url=a.url, sagas=a.sagas, workers=a.workers,
            concurrency=a.concurrency, batch=a.batch, runners=a.runners,
            random_kills=a.random_kills if a.random_kills is not None else max(a.sagas // 6, 1),
            crash_rate=a.crash_rate, lease=a.lease, max_attempts=a.max_attempts,
            group_commit=a.group_commit, exhaust_retries=a.exhaust_retries,
            forward_share=a.forward_share, partitions=a.partitions, seed=a.seed,
            timeout=a.timeout if a.timeout is not None else 60 + 2.0 * a.sagas,
            keep=a.keep, verbose=a.verbose,
        )
    except ValueError as exc:
        p.error(str(exc))
    return Harness(config).run_by_hand()


if __name__ == "__main__":
    sys.exit(main())
