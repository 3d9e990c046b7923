"""Queue workers under SIGKILL: submitted sagas, queue and key limits, checked from a journal.

Run by hand::

    python -m tests.acceptance.queue_harness --backend postgres --sagas 2000 -v
    python -m tests.acceptance.queue_harness --backend sqlite --sagas 300 --seed 7 --keep

What one run does:

1. Creates sagakit's tables, a queues table and an events table under fresh names
   (``qx<pid>_<random>_*``) and sets the limits of the queues of
   :data:`tests.acceptance.queue_runner.QUEUES` (``orders``: 6 at once, 1 per customer;
   ``emails``: 3 at once; ``reports``: 2 per tenant).
2. Plans the sagas (seeded): each goes to a queue, with a concurrency key (most of them) and a
   priority.
3. Starts ``--workers`` worker processes (:mod:`tests.acceptance.queue_runner`, each serving
   the three queues, ``--concurrency`` sagas at once, lease ``--lease`` seconds) and submits
   every saga (:meth:`sagakit.Saga.submit`, ``--submitters`` at a time) while they run.
4. Meanwhile SIGKILLs a random worker every ``--kill-every`` seconds, ``--kills`` times, and
   starts a replacement for every worker that dies.
5. Waits until every saga is COMPLETED, FAILED or PARKED (``--timeout``: else it fails listing
   the stuck sagas), stops the workers with SIGTERM, and writes one ``exit`` event per process.
6. Runs the checks of :mod:`tests.acceptance.queue_checker` and prints the report: sagas per
   queue, processes, kills, the most sagas seen at once per queue and per key against the
   limits, checks and violations.
7. Drops its tables (unless ``--keep``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import sqlalchemy as sa

from tests.acceptance.checker import Event
from tests.acceptance.eventlog import EventLog, TableNames
from tests.acceptance.harness import REPO, Proc, _default_url
from tests.acceptance.queue_checker import Planned, QueueFindings, check_queue_run, summary
from tests.acceptance.queue_runner import QUEUES, QueueContext, QueuedSaga, open_storage

__all__ = ["QueueReport", "QueueRunConfig", "QueueRunStuck", "make_plan", "run_queue_harness"]

FINAL = ("COMPLETED", "FAILED", "PARKED")


class QueueRunStuck(AssertionError):
    """Some sagas did not reach a final status in time."""


@dataclasses.dataclass
class QueueRunConfig:
    backend: str = "sqlite"
    url: str | None = None
    sagas: int = 300
    workers: int = 4
    concurrency: int = 8
    lease: float = 2.0
    poll: float = 0.05
    kills: int = 12
    kill_every: tuple[float, float] = (0.5, 1.0)
    step_ms: int = 6
    submitters: int = 8
    seed: int | None = None
    timeout: float = 300.0
    keep: bool = False
    verbose: bool = False


@dataclasses.dataclass
class QueueReport:
    backend: str
    seed: int
    sagas: int
    queues: dict[str, int]
    statuses: dict[str, int]
    processes: int
    kills: int
    killed_in_step: int
    cut_steps: int
    checks: dict[str, int]
    violations: list[str]
    peaks: list[str]
    errored_steps: list[str]
    unexpected_exits: list[str]
    events: int
    submit_seconds: float
    duration: float

    @property
    def total_checks(self) -> int:
        return sum(self.checks.values())

    @property
    def ok(self) -> bool:
        return not self.violations and not self.unexpected_exits

    def render(self) -> str:
        lines = [
            f"queue workers: backend={self.backend} seed={self.seed}",
            f"  sagas            {self.sagas} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.queues.items())) + ")  final: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())),
            f"  processes        {self.processes} started; SIGKILLs {self.kills} "
            f"({self.killed_in_step} of them cut {self.cut_steps} acts off)",
            "  most at once     " + "; ".join(self.peaks),
            f"  checks           {self.total_checks} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.checks.items())) + ")",
            f"  events           {self.events}; acts ended by an error: "
            f"{len(self.errored_steps)}",
            f"  violations       {len(self.violations)}",
            f"  duration         {self.duration:.1f}s (submitting {self.submit_seconds:.1f}s)",
        ]
        lines += [f"    {v}" for v in self.violations[:30]]
        if len(self.violations) > 30:
            lines.append(f"    ... {len(self.violations) - 30} more")
        lines += [f"  errored act: {e}" for e in self.errored_steps[:10]]
        if self.unexpected_exits:
            lines.append(f"  unexpected process exits {len(self.unexpected_exits)}")
            lines += [f"    {u}" for u in self.unexpected_exits[:10]]
        return "\n".join(lines)


def make_plan(sagas: int, rng: random.Random) -> dict[str, Planned]:
    """Where each saga goes: ``orders`` (45%, one of 20 customers), ``emails`` (25%, half of
    them with one of 3 keys its queue does not limit), ``reports`` (30%, one of 6 tenants or,
    for a fifth, no key); priorities mixed."""
    plan: dict[str, Planned] = {}
    for _ in range(sagas):
        saga_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        roll = rng.random()
        key: str | None
        if roll < 0.45:
            queue, key = "orders", f"customer-{rng.randrange(20)}"
        elif roll < 0.7:
            queue, key = "emails", rng.choice((None, f"list-{rng.randrange(3)}"))
        else:
            queue, key = "reports", None if rng.random() < 0.2 else f"tenant-{rng.randrange(6)}"
        plan[saga_id] = Planned(queue, key, rng.choice((0, 0, 0, 1, 5, -2)))
    return plan


class QueueHarness:
    def __init__(self, config: QueueRunConfig) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="sagakit-queues-"))
        self.prefix = f"qx{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.url = config.url or _default_url(config.backend, self.workdir)
        self.storage = open_storage(self.url, self.prefix)
        self._reader = self.storage.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.events = EventLog(self.url, TableNames.for_prefix(self.prefix), "harness")
        self.plan = make_plan(config.sagas, self.rng)
        self.procs: set[Proc] = set()
        self.started = 0
        self.kills = 0
        self.unexpected: list[str] = []
        self.stopping = False
        self.submit_seconds = 0.0

    async def run(self) -> QueueReport:
        t0 = time.monotonic()
        try:
            await self.storage.create_schema()
            await self.events.create()
            for queue in QUEUES:
                await self.storage.set_queue(queue)
            submitting = asyncio.ensure_future(self._submit_all())
            try:
                await self._drive(submitting, t0 + self.config.timeout)
            finally:
                submitting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await submitting
                await self._stop_all()
            findings, statuses, events = await self._check()
            return QueueReport(
                backend=self.config.backend, seed=self.seed, sagas=len(self.plan),
                queues=dict(Counter(p.queue for p in self.plan.values())),
                statuses=statuses, processes=self.started, kills=self.kills,
                killed_in_step=findings.killed_in_step, cut_steps=findings.cut_steps,
                checks=dict(findings.checks), violations=findings.violations,
                peaks=summary(findings), errored_steps=findings.errored_steps,
                unexpected_exits=self.unexpected, events=events,
                submit_seconds=self.submit_seconds, duration=time.monotonic() - t0,
            )
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        for proc in list(self.procs):  # only after an error: normally all are gone
            with contextlib.suppress(ProcessLookupError):
                proc.process.kill()
            await proc.waiter
        if not self.config.keep:
            with contextlib.suppress(Exception):
                await self.storage.drop_schema()
            with contextlib.suppress(Exception):
                await self.events.drop()
        await self.storage.close()
        await self.events.close()
        if self.config.keep:
            print(f"kept: tables {self.prefix}_*, process output in {self.workdir}",
                  file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- processes

    async def _submit_all(self) -> None:
        t0 = time.monotonic()
        saga, gate = QueuedSaga(), asyncio.Semaphore(self.config.submitters)

        async def one(saga_id: str, planned: Planned) -> None:
            async with gate:
                handle = await saga.submit(
                    QueueContext(queue=planned.queue, key=planned.key,
                                 step_ms=self.config.step_ms),
                    storage=self.storage, queue=planned.queue, concurrency_key=planned.key,
                    priority=planned.priority, saga_id=uuid.UUID(saga_id))
                assert handle.created, saga_id

        await asyncio.gather(*(one(i, p) for i, p in self.plan.items()))
        self.submit_seconds = time.monotonic() - t0
        self._say(f"submitted {len(self.plan)} sagas in {self.submit_seconds:.1f}s")

    async def _spawn(self) -> Proc:
        self.started += 1
        label, c = f"w{self.started}", self.config
        cmd = [sys.executable, "-m", "tests.acceptance.queue_runner", "--url", self.url,
               "--prefix", self.prefix, "--label", label, "--lease", str(c.lease),
               "--concurrency", str(c.concurrency), "--poll", str(c.poll)]
        output = self.workdir / f"{label}.log"
        with output.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *cmd, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
        proc = Proc(label, "worker", process, time.monotonic(), [], output,
                    asyncio.ensure_future(process.wait()))
        self.procs.add(proc)
        return proc

    async def _drive(self, submitting: asyncio.Future[None], deadline: float) -> None:
        c = self.config
        next_kill = time.monotonic() + self.rng.uniform(*c.kill_every)
        next_poll = 0.0
        while True:
            while len(self.procs) < c.workers:
                await self._spawn()
            waiters = {p.waiter: p for p in self.procs}
            done, _ = await asyncio.wait(waiters, timeout=0.05,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                await self._exited(waiters[task])
            if submitting.done():
                submitting.result()  # a failed submit fails the run
            now = time.monotonic()
            if self.kills < c.kills and now >= next_kill:
                next_kill = now + self.rng.uniform(*c.kill_every)
                self._kill_one(now)
            if now >= next_poll and submitting.done():
                next_poll = now + 0.25
                counts = await self._status_counts()
                if sum(counts.get(s, 0) for s in FINAL) == len(self.plan):
                    return
            if now > deadline:
                raise QueueRunStuck(await self._stuck_report())

    def _kill_one(self, now: float) -> None:
        ready = sorted((p for p in self.procs if now - p.started > 0.3
                        and not p.killed_by_parent and p.process.returncode is None
                        and b" ready" in p.output.read_bytes()), key=lambda p: p.label)
        if not ready:
            return
        victim = self.rng.choice(ready)
        victim.killed_by_parent = True
        self.kills += 1
        with contextlib.suppress(ProcessLookupError):
            victim.process.send_signal(signal.SIGKILL)
        self._say(f"SIGKILL {victim.label}")

    async def _exited(self, proc: Proc) -> None:
        self.procs.discard(proc)
        rc = proc.process.returncode
        outcome = "killed-by-parent" if proc.killed_by_parent else f"returncode={rc}"
        await self.events.record(None, None, None, "exit", outcome=outcome, label=proc.label,
                                 pid=proc.process.pid)
        self._say(f"{proc.label} exited: {outcome}")
        if not proc.killed_by_parent and not (self.stopping and rc == 0):
            tail = proc.output.read_text(errors="replace")[-2000:]
            self.unexpected.append(f"{proc.label} {outcome}: ...{tail}")

    async def _stop_all(self) -> None:
        self.stopping = True
        for proc in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
        for proc in list(self.procs):
            try:
                await asyncio.wait_for(asyncio.shield(proc.waiter), 20)
            except TimeoutError:
                self.unexpected.append(f"{proc.label} did not stop on SIGTERM within 20s")
                proc.process.kill()
                await proc.waiter
            await self._exited(proc)

    # -- reading back

    async def _status_counts(self) -> dict[str, int]:
        t = self.storage.tables.executions
        async with self._reader.connect() as conn:
            rows = (await conn.execute(
                sa.select(t.c.status, sa.func.count()).group_by(t.c.status))).all()
        return {r[0]: r[1] for r in rows}

    async def _stuck_report(self) -> str:
        t = self.storage.tables.executions
        async with self._reader.connect() as conn:
            rows = (await conn.execute(sa.select(
                t.c.saga_id, t.c.status, t.c.queue, t.c.concurrency_key, t.c.lease_owner,
                t.c.lease_expires_at, t.c.recovery_attempts, t.c.next_attempt_at))).all()
        stored = {str(r.saga_id): r for r in rows}
        stuck = [i for i in self.plan if i not in stored or stored[i].status not in FINAL]
        lines = [f"{len(stuck)} of {len(self.plan)} sagas did not reach COMPLETED/FAILED/PARKED "
                 f"within {self.config.timeout:.0f}s (backend {self.config.backend}, seed "
                 f"{self.seed}, {self.kills} kills); stored: "
                 + ", ".join(f"{k} {v}" for k, v in sorted(
                     Counter(r.status for r in rows).items())),
                 f"queue counts: {await self.storage.queue_counts()}"]
        events = [Event.from_row(r) for r in await self.events.all_events()]
        for sid in stuck[:20]:
            r = stored.get(sid)
            state = "never stored" if r is None else (
                f"{r.status} queue={r.queue} key={r.concurrency_key} attempts="
                f"{r.recovery_attempts} lease_owner={r.lease_owner} lease_expires_at="
                f"{r.lease_expires_at} next_attempt_at={r.next_attempt_at}")
            last = [f"{e.label}:{e.step}:{e.phase}:{e.outcome or ''}"
                    for e in events if e.saga_id == sid][-6:]
            lines.append(f"  {sid} {state}; last events {last}")
        lines.append(f"live processes: {sorted(p.label for p in self.procs)}")
        for proc in sorted(self.procs, key=lambda p: p.label):
            tail = proc.output.read_text(errors="replace")[-600:]
            lines.append(f"  {proc.label} output: ...{tail}")
        return "\n".join(lines)

    async def _check(self) -> tuple[QueueFindings, dict[str, int], int]:
        ex, logs_t = self.storage.tables.executions, self.storage.tables.logs
        async with self._reader.connect() as conn:
            finals = (await conn.execute(sa.select(ex.c.saga_id, ex.c.status))).all()
            rows = (await conn.execute(
                sa.select(logs_t.c.saga_id, logs_t.c.step_name, logs_t.c.action,
                          logs_t.c.status).order_by(logs_t.c.id))).all()
        statuses = {str(r.saga_id): r.status for r in finals}
        logs: dict[str, list[tuple[str, str, str]]] = {}
        for r in rows:
            logs.setdefault(str(r.saga_id), []).append((r.step_name, r.action, r.status))
        events = [Event.from_row(r) for r in await self.events.all_events()]
        findings = check_queue_run(self.plan, QUEUES, statuses, logs, events)
        return findings, dict(Counter(statuses.values())), len(events)

    def _say(self, text: str) -> None:
        if self.config.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_queue_harness(config: QueueRunConfig) -> QueueReport:
    return await QueueHarness(config).run()


def main(argv: list[str] | None = None) -> int:
    d = QueueRunConfig()
    p = argparse.ArgumentParser(prog="python -m tests.acceptance.queue_harness",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backend", choices=("sqlite", "postgres", "mysql"), default=d.backend)
    p.add_argument("--url", help="database URL (default: a temp SQLite file, or the test DSNs)")
    p.add_argument("--sagas", type=int, default=d.sagas)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="sagas each worker runs at once")
    p.add_argument("--lease", type=float, default=d.lease)
    p.add_argument("--poll", type=float, default=d.poll)
    p.add_argument("--kills", type=int, default=d.kills)
    p.add_argument("--kill-every", type=float, nargs=2, default=d.kill_every,
                   metavar=("MIN", "MAX"))
    p.add_argument("--step-ms", type=int, default=d.step_ms)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=d.timeout)
    p.add_argument("--keep", action="store_true", help="keep the tables and process logs")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    config = QueueRunConfig(
        backend=a.backend, url=a.url, sagas=a.sagas, workers=a.workers,
        concurrency=a.concurrency, lease=a.lease, poll=a.poll, kills=a.kills,
        kill_every=tuple(a.kill_every), step_ms=a.step_ms, seed=a.seed, timeout=a.timeout,
        keep=a.keep, verbose=a.verbose)
    report = asyncio.run(run_queue_harness(config))
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
