"""Where the time goes while worker processes run: the CPU of the database server and of the whole
machine (read from /proc, Linux only: elsewhere the readings are None), the TCP ports that
processes hold (to tell their connections apart on the server), and what the workers'
server sessions wait on (sampled).

- Server CPU: PostgreSQL's processes (a process per connection: the live ones' CPU plus what
  the postmaster has reaped from those that ended) or mariadbd's (one process, every thread).
  Any other client of the same server adds to it: the machine's load is reported beside it.
- Machine CPU: /proc/stat's busy time over all cores (2 cores busy for 1 s = 2 s).
- Waits (:class:`WaitSampler`): every ``every`` seconds, the server sessions of the given
  processes (matched by client port) and what each is doing. PostgreSQL: ``pg_stat_activity``
  state and wait event, and whether it waits for a lock (``pg_locks`` not granted). MariaDB:
  PROCESSLIST command and state; and the InnoDB row-lock and deadlock counters (global: any
  other client adds to them) over the run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from the 3rd (state) on


def server_cpu(backend: str) -> float | None:
    """CPU seconds the database server (``"postgres"`` or ``"mariadb"``) used so far."""
    comm = "postgres" if backend == "postgres" else "mariadbd"
    total, found = 0.0, False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != comm:
                continue
        except OSError:
            continue
        fields = _stat(pid)
        if fields is None:
            continue
        found = True
        # utime, stime (fields 14, 15); cutime, cstime (16, 17): children reaped
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / _TICK if found else None


def machine_cpu() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far, every core: busy = user, nice,
    system, irq and softirq (idle, iowait and steal excluded); steal = time the hypervisor
    gave this virtual machine's cores to others."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    v = [int(x) for x in first[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / _TICK, v[7] / _TICK


class Clock:
    """From :meth:`start` to :meth:`stop`: the server's CPU seconds, the machine's busy and
    stolen CPU seconds, this (benchmark) process's CPU seconds, and the wall time."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._start: tuple[Any, Any, float, float] = (None, None, 0.0, 0.0)
        self.server_s: float | None = None
        self.machine_s: float | None = None
        self.steal_s: float | None = None
        self.bench_s = 0.0
        self.wall_s = 0.0

    def start(self) -> None:
        self._start = (server_cpu(self.backend), machine_cpu(), time.process_time(),
                       time.perf_counter())

    def stop(self) -> None:
        server, machine = server_cpu(self.backend), machine_cpu()
        bench, wall = time.process_time(), time.perf_counter()
        s0, m0, b0, w0 = self._start
        self.server_s = None if server is None or s0 is None else server - s0
        if machine is not None and m0 is not None:
            self.machine_s, self.steal_s = machine[0] - m0[0], machine[1] - m0[1]
        self.bench_s = bench - b0
        self.wall_s = wall - w0


def socket_ports(pids: list[int]) -> set[int]:
    """The local TCP ports of the sockets these processes hold open (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) > 9 and parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


# -- the workers' sessions on the server ----------------------------------------------------------

_PG_SESSIONS = """
SELECT a.pid, a.client_port, a.state, a.wait_event_type, a.wait_event, a.query,
       EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND NOT l.granted) AS lock_wait
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
"""
_MY_SESSIONS = """
SELECT ID, HOST, COMMAND, STATE, INFO FROM information_schema.PROCESSLIST
WHERE ID <> CONNECTION_ID()
"""
_MY_COUNTERS = ("Innodb_row_lock_waits", "Innodb_row_lock_time", "Innodb_deadlocks",
                "Innodb_row_lock_current_waits")


async def sessions(conn: Any, postgres: bool, ports: set[int]) -> list[dict[str, Any]]:
    """The server sessions whose client port is in ``ports``: PostgreSQL ``pid, port, state,
    wait (type:event or None), query, lock_wait``; MariaDB ``pid, port, state (command: state),
    wait (the state), query``."""
    from sqlalchemy import text

    out = []
    if postgres:
        for r in (await conn.execute(text(_PG_SESSIONS))).all():
            if r.client_port in ports:
                wait = f"{r.wait_event_type}:{r.wait_event}" if r.wait_event_type else None
                out.append({"pid": r.pid, "port": r.client_port, "state": r.state,
                            "wait": wait, "query": r.query or "", "lock_wait": r.lock_wait})
    else:
        for r in (await conn.execute(text(_MY_SESSIONS))).all():
            host = str(r.HOST or "")
            port = int(host.rsplit(":", 1)[1]) if ":" in host else -1
            if port in ports:
                out.append({"pid": int(r.ID), "port": port, "state": f"{r.COMMAND}",
                            "wait": r.STATE or None, "query": r.INFO or "",
                            "lock_wait": "lock" in str(r.STATE or "").lower()})
        await conn.commit()  # end the snapshot: the next sample reads afresh
    return out


async def innodb_counters(conn: Any) -> dict[str, float]:
    from sqlalchemy import text

    rows = (await conn.execute(text("SHOW GLOBAL STATUS WHERE Variable_name IN ("
                                    + ", ".join(f"'{c}'" for c in _MY_COUNTERS) + ")"))).all()
    return {str(r[0]): float(r[1]) for r in rows}


class WaitSampler:
    """``async with WaitSampler(url, postgres, pids)``: samples the server sessions of the
    processes ``pids()`` returns every ``every`` seconds while inside (their ports read afresh
    each second). ``result()``: samples taken, the share of session samples that were running
    a statement (PostgreSQL: state active; MariaDB: command Query), and among those the waits
    seen, most frequent first; on MariaDB the InnoDB counters' change over the run too."""

    def __init__(self, url: str, postgres: bool, pids: Any, every: float = 0.05) -> None:
        self.url = url
        self.postgres = postgres
        self.pids = pids
        self.every = every
        self.samples = 0
        self.session_samples = 0
        self.active = 0
        self.lock_waits = 0
        self.waits: collections.Counter[str] = collections.Counter()
        self.counters: dict[str, float] = {}
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._engine: Any = None
        self._stop = asyncio.Event()

    async def __aenter__(self) -> WaitSampler:
        from sqlalchemy.ext.asyncio import create_async_engine

        self._engine = create_async_engine(self.url, pool_size=1, max_overflow=0)
        self._conn = await self._engine.connect()
        if not self.postgres:
            self.counters = await innodb_counters(self._conn)
            await self._conn.commit()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()  # the sampler ends between samples: the connection stays usable
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except Exception as error:  # a failed sample, or a timeout (then cancelled)
                self.error = f"{type(error).__name__}: {error}"[:200]
        try:
            with contextlib.suppress(Exception):
                await self._conn.rollback()
            if not self.postgres:
                after = await innodb_counters(self._conn)
                self.counters = {k: after.get(k, 0.0) - v for k, v in self.counters.items()}
                self.counters["Innodb_row_lock_current_waits"] = after.get(
                    "Innodb_row_lock_current_waits", 0.0)
        finally:
            await self._conn.close()
            await self._engine.dispose()

    async def _sample(self) -> None:
        ports: set[int] = set()
        refreshed = 0.0
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 1.0:
                ports = await asyncio.to_thread(socket_ports, list(self.pids()))
                refreshed = time.monotonic()
            found = await sessions(self._conn, self.postgres, ports)
            if self.postgres:
                await self._conn.rollback()
            self.samples += 1
            self.session_samples += len(found)
            for s in found:
                running = s["state"] == ("active" if self.postgres else "Query")
                if not running:
                    continue
                self.active += 1
                self.lock_waits += bool(s["lock_wait"])
                self.waits[s["wait"] or "(on CPU: no wait event)"] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every)

    def result(self) -> dict[str, Any]:
        top = self.waits.most_common(6)
        return {"samples": self.samples, "session_samples": self.session_samples,
                "active": self.active, "lock_waits": self.lock_waits,
                "waits": [[w, n] for w, n in top], "innodb": self.counters,
                "error": self.error}
