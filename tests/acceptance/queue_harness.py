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

import asyncio
import contextlib
import dataclasses
import random
import signal
import sys
import time
import uuid
from collections import Counter

import sqlalchemy as sa

from tests.acceptance.checker import Event
from tests.acceptance.procs import FINAL, Proc, ProcessHarness, RunConfig, RunReport, RunStuck
from tests.acceptance.queue_checker import Planned, QueueFindings, check_queue_run, summary
from tests.acceptance.queue_runner import QUEUES, QueueContext, QueuedSaga, open_storage

__all__ = ["QueueReport", "QueueRunConfig", "QueueRunStuck", "make_plan", "run_queue_harness"]

QueueRunStuck = RunStuck


@dataclasses.dataclass
class QueueRunConfig(RunConfig):
    """One queue-workers run (see the module's docstring): ``kills`` SIGKILLs of a ready worker,
    one every ``kill_every`` seconds; ``submitters`` submits at a time; acts of ~``step_ms``."""

    sagas: int = 300
    workers: int = 4
    concurrency: int = 8
    lease: float = 2.0
    poll: float = 0.05
    kills: int = 12
    kill_every: tuple[float, float] = (0.5, 1.0)
    step_ms: int = 6
    submitters: int = 8
    timeout: float = 300.0


@dataclasses.dataclass
class QueueReport(RunReport):
    """What a queue-workers run saw: sagas per queue, kills (``killed_in_step`` of them cut
    ``cut_steps`` acts off), the most sagas at once per queue and key (``peaks``), acts ended
    by an error."""

    queues: dict[str, int]
    kills: int
    killed_in_step: int
    cut_steps: int
    peaks: list[str]
    errored_steps: list[str]
    submit_seconds: float

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
        errored = [f"  errored act: {e}" for e in self.errored_steps[:10]]
        return "\n".join(lines + self._problems(violations=30, exits=10, notes=errored))


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


class QueueHarness(ProcessHarness[QueueRunConfig]):
    def __init__(self, config: QueueRunConfig) -> None:
        super().__init__(config, name="queues", tag="qx", open_storage=open_storage)
        self.plan = make_plan(config.sagas, self.rng)
        self.kills = 0
        self.submit_seconds = 0.0

    async def run(self) -> QueueReport:
        t0 = time.monotonic()
        try:
            await self._create_tables()
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

    async def _start(self) -> Proc:
        c = self.config
        return await self._spawn("worker", ["tests.acceptance.queue_runner"], [
            "--lease", str(c.lease), "--concurrency", str(c.concurrency), "--poll", str(c.poll)])

    async def _drive(self, submitting: asyncio.Future[None], deadline: float) -> None:
        c = self.config
        next_kill = time.monotonic() + self.rng.uniform(*c.kill_every)
        next_poll = 0.0
        while True:
            while len(self.procs) < c.workers:
                await self._start()
            await self._wait_exits()
            if submitting.done():
                submitting.result()  # a failed submit fails the run
            now = time.monotonic()
            if self.kills < c.kills and now >= next_kill:
                next_kill = now + self.rng.uniform(*c.kill_every)
                await self._kill_one(now)
            if now >= next_poll and submitting.done():
                next_poll = now + 0.25
                counts = await self._status_counts()
                if sum(counts.get(s, 0) for s in FINAL) == len(self.plan):
                    return
            if now > deadline:
                raise QueueRunStuck(await self._stuck_report())

    async def _kill_one(self, now: float) -> None:
        ready = sorted((p for p in self.procs if now - p.started > 0.3
                        and not p.killed_by_parent and p.process.returncode is None
                        and p.ready()), key=lambda p: p.label)
        if not ready:
            return
        self.kills += 1
        await self._signal(self.rng.choice(ready), signal.SIGKILL)

    async def _exited(self, proc: Proc) -> None:
        rc = proc.process.returncode
        outcome = "killed-by-parent" if proc.killed_by_parent else f"returncode={rc}"
        await self._record_exit(proc, outcome, expected=proc.killed_by_parent or (
            self.stopping and rc == 0))

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
        stored_counts = sorted(Counter(r.status for r in rows).items())
        lines = [self._stuck_header(len(stuck), len(self.plan))
                 + f", {self.kills} kills); stored: "
                 + ", ".join(f"{k} {v}" for k, v in stored_counts),
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


async def run_queue_harness(config: QueueRunConfig) -> QueueReport:
    return await QueueHarness(config).run()


def main(argv: list[str] | None = None) -> int:
    d = QueueRunConfig()
    p = QueueRunConfig.parser("python -m tests.acceptance.queue_harness", __doc__)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="sagas each worker runs at once")
    p.add_argument("--lease", type=float, default=d.lease)
    p.add_argument("--poll", type=float, default=d.poll)
    p.add_argument("--kills", type=int, default=d.kills)
    p.add_argument("--kill-every", type=float, nargs=2, default=d.kill_every,
                   metavar=("MIN", "MAX"))
    p.add_argument("--step-ms", type=int, default=d.step_ms)
    p.add_argument("--timeout", type=float, default=d.timeout)
    a = p.parse_args(argv)
    config = QueueRunConfig(
        backend=a.backend, url=a.url, sagas=a.sagas, workers=a.workers,
        concurrency=a.concurrency, lease=a.lease, poll=a.poll, kills=a.kills,
        kill_every=tuple(a.kill_every), step_ms=a.step_ms, seed=a.seed, timeout=a.timeout,
        keep=a.keep, verbose=a.verbose)
    return QueueHarness(config).run_by_hand()


if __name__ == "__main__":
    sys.exit(main())
