"""Worker processes for the recovery, dispatch and failover sections: each runs
scenarios/recovery_child.py (one RecoveryWorker with its own engine), started together, watched
through the storage's COMPLETED rows, stopped gracefully, and reporting what it did as one JSON
line. The failover section also SIGKILLs one (:meth:`WorkerProcs.kill`) and starts a
replacement (:meth:`WorkerProcs.add`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("recovery_child.py")


class WorkerProcs:
    """``count`` worker processes, each given ``config`` (see recovery_child.py). Inside
    ``async with``, each has connected and waits for :meth:`go`; leaving kills any still alive.
    ``stderr`` holds the tail of their standard errors afterwards."""

    def __init__(self, config: dict[str, Any], count: int) -> None:
        self.config = json.dumps(config)
        self.count = count
        self.procs: list[Any] = []
        self.stderr = ""
        self._files = contextlib.ExitStack()
        self._logs: list[Any] = []
        self._starting: list[Any] = []

    async def __aenter__(self) -> WorkerProcs:
        try:
            started = [await self._spawn() for _ in range(self.count)]
            for proc in started:
                await self._ready(proc)
            self.procs += started
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs + self._starting:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        self.stderr = self._tail()
        self._files.close()

    async def _spawn(self) -> Any:
        log = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
        self._logs.append(log)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), self.config, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=log, limit=2**24)
        self._starting.append(proc)
        return proc

    async def _ready(self, proc: Any) -> None:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"worker process did not start: {line!r} "
                               f"{self._tail()[-300:]}")
        self._starting.remove(proc)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    async def kill(self, pid: int) -> float:
        """SIGKILL the worker ``pid`` and reap it (only then is its pid gone: SQLite's
        liveness test); the ``time.time()`` reading just before the signal. It leaves
        :attr:`procs`."""
        proc = next(p for p in self.procs if p.pid == pid)
        at = time.time()
        proc.kill()
        await proc.wait()
        self.procs.remove(proc)
        return at

    async def add(self) -> int:
        """Start one more worker, wait until it is connected, tell it to go; its pid."""
        proc = await self._spawn()
        await self._ready(proc)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        self.procs.append(proc)
        return int(proc.pid)

    def _tail(self) -> str:
        data = b""
        for log in self._logs:
            with contextlib.suppress(ValueError, OSError):
                log.seek(0)
                data += log.read()[-2000:]
        return data.decode(errors="replace")

    async def _send(self, line: bytes) -> None:
        for proc in self.procs:
            proc.stdin.write(line)
            await proc.stdin.drain()

    async def go(self) -> float:
        """Tell every worker to start; the perf_counter reading when the last was told."""
        await self._send(b"go\n")
        return time.perf_counter()

    def alive(self) -> bool:
        return all(proc.returncode is None for proc in self.procs)

    async def mark(self, command: str = "mark") -> list[dict[str, Any]]:
        """Each worker's time, CPU and (after ``mark("count")`` started them) statement
        counters now."""
        await self._send(command.encode() + b"\n")
        return [json.loads(await asyncio.wait_for(p.stdout.readline(), 30)) for p in self.procs]

    async def stop(self) -> list[dict[str, Any]]:
        """Stop every worker gracefully; their reports (an empty dict for one that printed
        none)."""
        await self._send(b"stop\n")
        for proc in self.procs:
            proc.stdin.close()
        reports = []
        for proc in self.procs:
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            reports.append(json.loads(line) if line.strip() else {})
            await asyncio.wait_for(proc.wait(), 30)
        return reports


async def count_completed(storage: Any) -> int:
    import sqlalchemy as sa

    t = storage.tables.executions
    async with storage.engine.connect() as conn:
        return int((await conn.execute(
            sa.select(sa.func.count()).select_from(t).where(t.c.status == "COMPLETED")
        )).scalar_one())


async def drain(procs: WorkerProcs, storage: Any, backlog: int, deadline_s: float,
                every: float = 0.1) -> tuple[float, int]:
    """Start the workers and wait until ``backlog`` sagas are COMPLETED (or the deadline, or a
    worker died): (seconds from the start signal, COMPLETED rows seen last)."""
    t0 = await procs.go()
    done = 0
    while time.perf_counter() - t0 < deadline_s:
        done = await count_completed(storage)
        if done >= backlog or not procs.alive():
            break
        await asyncio.sleep(every)
    return time.perf_counter() - t0, done


def summarise(reports: list[dict[str, Any]], stderr: str, workers: int) -> dict[str, Any]:
    """The workers' reports added up: completed sagas (distinct), attempts, busy claims, errors
    and the first one, client CPU seconds, their claims (see recovery_child.py)."""
    completed = {sid for r in reports for sid in r.get("completed", ())}
    first = next((r["first_error"] for r in reports if r.get("first_error")), None)
    if first is None and len([r for r in reports if r]) < workers:
        first = stderr[-300:]
    return {
        "completed": len(completed),
        "attempts": sum(r.get("attempts", 0) for r in reports),
        "busy": sum(r.get("busy", 0) for r in reports),
        "errors": sum(r.get("errors", 0) for r in reports),
        "first_error": first,
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in reports),
        "warnings": sorted({w for r in reports for w in r.get("warnings", ())})[:3],
        "claims": {method: {k: sum(r.get("claims", {}).get(method, {}).get(k, 0)
                                   for r in reports)
                            for k in ("calls", "asked", "got", "empty", "seconds", "conflicts")}
                   for method in ("claim_due", "claim_queued")},
    }


def wakeups(reports: list[dict[str, Any]]) -> bool:
    """Whether every worker had wake-ups (a storage that listens, and no warning that it
    could not)."""
    return all(r.get("wakeups") and not any("wake-ups unavailable" in w
                                            for w in r.get("warnings", ())) for r in reports)
