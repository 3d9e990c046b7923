"""What the two acceptance harnesses share: their processes, both sides, and the frame of a run.

The frame: :class:`RunConfig` and :class:`RunReport` (the bases of each harness's
configuration and report), :class:`RunStuck`, and :meth:`RunConfig.parser` and
:meth:`ProcessHarness.run_by_hand` for running one by hand.

The parent side, :class:`ProcessHarness` (the base of :class:`tests.acceptance.harness.Harness`
and :class:`tests.acceptance.queue_harness.QueueHarness`): a run's seed, work directory, fresh
table names, storage and events table; child processes started with their output in a file,
watched, signalled, stopped with SIGTERM (20 s each, then SIGKILL; a slow one is an unexpected
exit), one ``exit`` event per process; and afterwards the tables and files dropped (unless
``keep``, which prints where they are).

The child side: :func:`add_child_arguments` (the options every child takes),
:func:`start_child` (its logging, and the sabotage its environment asks for) and :func:`serve`
(a worker run until SIGTERM, saying ``ready`` once SIGTERM stops it gracefully).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from sagakit import RecoveryWorker
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.eventlog import EventLog, TableNames

__all__ = [
    "FINAL", "REPO", "Proc", "ProcessHarness", "RunConfig", "RunReport", "RunStuck",
    "add_child_arguments", "default_url", "serve", "start_child",
]

REPO = Path(__file__).resolve().parents[2]
FINAL = ("COMPLETED", "FAILED", "PARKED")


class RunStuck(AssertionError):
    """Some sagas did not reach a final status in time."""


@dataclasses.dataclass
class RunConfig:
    """What every harness run is given: the backend (``sqlite``, ``postgres``, ``mysql``) or
    a URL, how many sagas, the seed (None: a random one, which the report names), seconds
    until the run fails as stuck, whether to keep the tables and process output, and whether
    to narrate on stderr."""

    backend: str = "sqlite"
    url: str | None = None
    sagas: int = 24
    seed: int | None = None
    timeout: float = 120.0
    keep: bool = False
    verbose: bool = False

    @classmethod
    def parser(cls, prog: str, doc: str | None) -> argparse.ArgumentParser:
        """A parser with the options above (``--timeout`` aside; defaults those of ``cls``),
        described by the first paragraph of ``doc``."""
        d = cls()
        p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0] if doc else None)
        p.add_argument("--backend", choices=("sqlite", "postgres", "mysql"), default=d.backend)
        p.add_argument("--url", help="database URL (default: a temp SQLite file, or the test DSNs)")
        p.add_argument("--sagas", type=int, default=d.sagas)
        p.add_argument("--seed", type=int)
        p.add_argument("--keep", action="store_true", help="keep the tables and process logs")
        p.add_argument("-v", "--verbose", action="store_true")
        return p


C = TypeVar("C", bound=RunConfig)


@dataclasses.dataclass
class RunReport:
    """What every harness run reports; a subclass adds its own and renders it all."""

    backend: str
    seed: int
    sagas: int
    statuses: dict[str, int]
    processes: int
    checks: dict[str, int]
    violations: list[str]
    unexpected_exits: list[str]
    events: int
    duration: float

    @property
    def total_checks(self) -> int:
        return sum(self.checks.values())

    @property
    def ok(self) -> bool:
        return not self.violations and not self.unexpected_exits

    def render(self) -> str:
        raise NotImplementedError

    def _problems(self, violations: int, exits: int, notes: Iterable[str] = ()) -> list[str]:
        """The last lines of a rendering: the first ``violations`` violations (and how many
        more there are), ``notes``, and the first ``exits`` unexpected exits."""
        lines = [f"    {v}" for v in self.violations[:violations]]
        if len(self.violations) > violations:
            lines.append(f"    ... {len(self.violations) - violations} more")
        lines += notes
        if self.unexpected_exits:
            lines.append(f"  unexpected process exits {len(self.unexpected_exits)}")
            lines += [f"    {u}" for u in self.unexpected_exits[:exits]]
        return lines


@dataclasses.dataclass(eq=False)
class Proc:
    """A child process: ``kind`` is ``saga`` (a runner) or ``worker``; ``ids`` the sagas a
    runner starts; ``output`` its stdout and stderr; ``waiter`` ends with its exit code."""

    label: str
    kind: str
    process: asyncio.subprocess.Process
    started: float
    ids: list[str]
    output: Path
    waiter: asyncio.Task[int]
    killed_by_parent: bool = False
    terminated: bool = False

    def ready(self) -> bool:
        """Whether the process said it is ready (a worker does, once it serves)."""
        return b" ready" in self.output.read_bytes()


def default_url(backend: str, workdir: Path) -> str:
    """A SQLite file in ``workdir``, or the test suite's server DSNs; ValueError for another
    backend."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{workdir}/harness.db"
    from tests.conftest import MYSQL_DSN, POSTGRES_DSN

    if backend == "postgres":
        return POSTGRES_DSN
    if backend == "mysql":
        return MYSQL_DSN
    raise ValueError(f"unknown backend {backend!r} (sqlite, postgres, mysql)")


class ProcessHarness(Generic[C]):
    """The parent side of a harness run: ``name`` names its work directory
    (``sagakit-<name>-*``), ``tag`` its tables (``<tag><pid>_<random>_*``), ``open_storage``
    opens the storage over them (from the URL and that prefix). A subclass runs it all
    (:meth:`run`) and says what an exit means (:meth:`_exited`, which ends with
    :meth:`_record_exit`)."""

    def __init__(self, config: C, *, name: str, tag: str,
                 open_storage: Callable[[str, str], SqlAlchemySagaStorage]) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"sagakit-{name}-"))
        self.prefix = f"{tag}{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.url = config.url or default_url(config.backend, self.workdir)
        self.storage = open_storage(self.url, self.prefix)
        self._reader = self.storage.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.events = EventLog(self.url, TableNames.for_prefix(self.prefix), "harness")
        self.procs: set[Proc] = set()
        self.started = 0
        self.unexpected: list[str] = []
        self.stopping = False

    async def run(self) -> RunReport:
        raise NotImplementedError

    def run_by_hand(self) -> int:
        """Run, print the report; 0 if the run found nothing wrong, else 1."""
        report = asyncio.run(self.run())
        print(report.render())
        return 0 if report.ok else 1

    async def _create_tables(self) -> None:
        await self.storage.create_schema()
        await self.events.create()

    async def _cleanup(self) -> None:
        """Kill what still runs (only after an error: normally all are gone), drop the tables
        and the work directory unless ``keep``, and close the engines."""
        for proc in list(self.procs):
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

    async def _spawn(self, kind: str, command: list[str], options: list[str],
                     ids: list[str] | None = None) -> Proc:
        """Start ``python -m <command> --url --prefix --label <options>`` in the repository,
        labelled ``r<n>`` (a ``saga`` runner) or ``w<n>``, its output in ``<label>.log``."""
        self.started += 1
        label = f"{'r' if kind == 'saga' else 'w'}{self.started}"
        cmd = [sys.executable, "-m", *command, "--url", self.url, "--prefix", self.prefix,
               "--label", label, *options]
        output = self.workdir / f"{label}.log"
        with output.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                *cmd, cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out)
        proc = Proc(label, kind, process, time.monotonic(), list(ids or []), output,
                    asyncio.ensure_future(process.wait()))
        self.procs.add(proc)
        return proc

    async def _wait_exits(self) -> None:
        """Wait up to 0.05 s for a process to exit; handle every exit seen."""
        waiters = {p.waiter: p for p in self.procs}
        done, _ = await asyncio.wait(waiters, timeout=0.05,
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            await self._exited(waiters[task])

    async def _signal(self, proc: Proc, sig: signal.Signals) -> None:
        """Send ``sig`` to ``proc``, marked ``terminated`` (SIGTERM) or ``killed_by_parent``
        (any other); one that is gone already is no error. A SIGKILL is recorded first, as a
        ``killed`` event: the process is taken as dead from there on (its ``exit`` event comes
        when the harness notices, which may be after another worker took its sagas over, and a
        mark written after the signal could be ordered after the takeover's events too)."""
        if sig == signal.SIGTERM:
            proc.terminated = True
        else:
            proc.killed_by_parent = True
        if sig == signal.SIGKILL:
            await self.events.record(None, None, None, "killed", outcome=sig.name,
                                     label=proc.label, pid=proc.process.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.process.send_signal(sig)
        self._say(f"harness sends {sig.name} to {proc.label}")

    async def _exited(self, proc: Proc) -> None:
        raise NotImplementedError

    async def _record_exit(self, proc: Proc, outcome: str, *, expected: bool) -> None:
        """Forget ``proc``, write its ``exit`` event, and, unless ``expected``, keep the tail of
        its output as an unexpected exit."""
        self.procs.discard(proc)
        await self.events.record(None, None, None, "exit", outcome=outcome, label=proc.label,
                                 pid=proc.process.pid)
        self._say(f"{proc.label} ({proc.kind}) exited: {outcome}")
        if not expected:
            tail = proc.output.read_text(errors="replace")[-2000:]
            self.unexpected.append(f"{proc.label} ({proc.kind}) {outcome}: ...{tail}")

    async def _stop_all(self) -> None:
        """SIGTERM every process and wait for each (20 s, then SIGKILL and an unexpected
        exit)."""
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

    def _stuck_header(self, stuck: int, total: int) -> str:
        c = self.config
        return (f"{stuck} of {total} sagas did not reach COMPLETED/FAILED/PARKED within "
                f"{c.timeout:.0f}s (backend {c.backend}, seed {self.seed}")

    def _say(self, text: str) -> None:
        if self.config.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- in the child processes ----------------------------------------------------------------------


class _Closable(Protocol):
    async def close(self) -> None: ...


def add_child_arguments(parser: argparse.ArgumentParser, *, lease: float,
                        max_attempts: int) -> None:
    """The options every child takes: ``--url``, ``--prefix`` (of the run's tables),
    ``--label``, ``--lease`` and ``--max-attempts``."""
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--lease", type=float, default=lease)
    parser.add_argument("--max-attempts", type=int, default=max_attempts)


def start_child(args: argparse.Namespace, sabotage_variable: str,
                sabotage: Callable[[str], None]) -> None:
    """Log warnings to stderr, labelled; and break sagakit with ``sabotage`` if the variable
    ``sabotage_variable`` names a way to (tests of the checks only)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.label} %(name)s %(levelname)s %(message)s")
    kind = os.environ.get(sabotage_variable)
    if kind:
        sabotage(kind)


async def serve(worker: RecoveryWorker, label: str, resources: Iterable[_Closable],
                runs: str) -> int:
    """Run ``worker`` until SIGTERM or SIGINT (handlers installed before it says ``ready``),
    close ``resources``, and say how many ``runs`` it finished; 0."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # what run() installs, before saying "ready"
        loop.add_signal_handler(sig, worker.stop)
    print(f"worker {label} ready", flush=True)
    try:
        await worker.run(install_signal_handlers=False)
    finally:
        for resource in resources:
            await resource.close()
    done = [o for o in worker.outcomes if o.status is not None]
    print(f"worker {label} stopped after {len(done)} {runs}", flush=True)
    return 0
