"""sagakit benchmark: every measurement in one run, reported as ratios to a raw-driver floor.

Run (servers as in tests/conftest.py, or SAGAKIT_POSTGRES_DSN / SAGAKIT_MYSQL_DSN)::

    python benchmarks/bench.py                       # everything (see RESULTS.md for how long)
    python benchmarks/bench.py --quick               # small sizes, for development
    python benchmarks/bench.py --only memory cpu     # some sections
    python benchmarks/bench.py --out /tmp/b          # write the report elsewhere

Sections: memory (framework cost), cpu (client CPU per saga vs the floor), group (group commit
at 32 concurrent sagas), scale (throughput and p99 at 1..512 concurrent sagas), steps (cost per
step at 1..100 steps), context (cost as the context grows; an unchanged context is not
rewritten), recovery (sagas recovered per second by 1, 2 and 4 worker processes, no-op steps and
steps awaiting a remote call's latency, where the time goes; EXPLAIN of the listing and the claim),
dispatch (submitted sagas: submit-to-first-step latency, throughput of 1, 2 and 4 worker
processes, the load of an idle worker on the database), failover (SIGKILL of a worker to its
saga resumed by another, with and without liveness, on SQLite, PostgreSQL and MariaDB; the
connections a worker holds).

Writes ``RESULTS.md`` (machine, headline numbers, every table, EXPLAIN output, how to read),
``results.json`` (the raw numbers) and ``throughput.png`` / ``p99.png`` into ``--out``
(default: this directory). Every table this run creates has a unique name and is dropped at
the end; every section runs under a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository: its tests hold the statement counter

from scenarios import SECTIONS  # noqa: E402
from scenarios.common import FULL, QUICK, Backend, Section, Session  # noqa: E402

PG = os.environ.get("SAGAKIT_POSTGRES_DSN", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
MYSQL = os.environ.get("SAGAKIT_MYSQL_DSN", "mysql+asyncmy://root@127.0.0.1:3306/test")
MEMORY_PART = {"steps", "context", "failover"}
"""Sections that still measure something (the memory storage, a SQLite file) when no database
server is reachable."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="sagakit benchmark: one run, every section, a markdown report.")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (development, smoke test): seconds, not minutes")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="directory for RESULTS.md, results.json and the charts "
                             "(default: benchmarks/)")
    parser.add_argument("--backends", nargs="+", choices=["postgres", "mariadb"],
                        default=["postgres", "mariadb"], help="database servers to use")
    parser.add_argument("--postgres-dsn", default=PG)
    parser.add_argument("--mysql-dsn", default=MYSQL)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds allowed per section (default: 120 quick, 900 full; "
                             "times each section's TIMEOUT_FACTOR: 3 recovery, 2 dispatch, "
                             "1.5 failover)")
    parser.add_argument("--recovery-mode", choices=["process", "inprocess"], default="process",
                        help="recovery workers as subprocesses (default) or all in this process")
    parser.add_argument("--recovery-backlog", type=int, default=None,
                        help="interrupted sagas to recover (default: 200 quick, 10000 full)")
    parser.add_argument("--recovery-rounds", type=int, default=None,
                        help="rounds of each recovery run (default: 1 quick, 2 full)")
    parser.add_argument("--recovery-variants", nargs="+", default=None,
                        choices=["noop", "io", "slow"],
                        help="recovery variants to run (default: all: noop, io, slow)")
    parser.add_argument("--failover-trials", type=int, default=None,
                        help="kill-and-take-over trials per backend with liveness on "
                             "(default: 5 quick, 30 full)")
    parser.add_argument("--pool-cap", type=int, default=48,
                        help="most connections one pool opens (servers' max_connections is "
                             "shared; default 48)")
    return parser.parse_args(argv)


async def probe(name: str, url: str) -> Backend:
    """Connect once; read the server's version and durability settings."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, connect_args={"timeout": 5} if name == "postgres" else {})
    try:
        async with engine.connect() as conn:
            if name == "postgres":
                version = (await conn.execute(text("SHOW server_version"))).scalar_one()
                shown = []
                for k in ("fsync", "synchronous_commit", "max_connections", "shared_buffers"):
                    shown.append(f"{k}={(await conn.execute(text(f'SHOW {k}'))).scalar_one()}")
                settings = ", ".join(shown)
                version = f"PostgreSQL {version}"
            else:
                version = (await conn.execute(text("SELECT VERSION()"))).scalar_one()
                row = (await conn.execute(text(
                    "SELECT @@innodb_flush_log_at_trx_commit, @@sync_binlog, @@log_bin, "
                    "@@max_connections, @@innodb_buffer_pool_size"))).one()
                settings = (f"innodb_flush_log_at_trx_commit={row[0]}, sync_binlog={row[1]}, "
                            f"log_bin={row[2]}, max_connections={row[3]}, "
                            f"innodb_buffer_pool_size={int(row[4]) // 2**20}MB")
                version = f"MariaDB/MySQL {version}"
    finally:
        await engine.dispose()
    return Backend(name, url, version, settings)


async def main(argv: list[str]) -> int:
    args = parse(argv)
    sizes = QUICK if args.quick else FULL
    if args.recovery_backlog:
        sizes = dataclasses.replace(sizes, recovery_backlog=args.recovery_backlog)
    if args.recovery_rounds:
        sizes = dataclasses.replace(sizes, recovery_rounds=args.recovery_rounds)
    if args.failover_trials:
        sizes = dataclasses.replace(sizes, failover_trials=args.failover_trials)
    wanted = [name for name in SECTIONS if not args.only or name in args.only]
    needs_db = any(SECTIONS[name].NEEDS for name in wanted)
    load_at_start = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()

    backends: dict[str, Backend] = {}
    unreachable: dict[str, str] = {}
    if needs_db:
        urls = {"postgres": args.postgres_dsn, "mariadb": args.mysql_dsn}
        for name in args.backends:
            try:
                backends[name] = await asyncio.wait_for(probe(name, urls[name]), 15)
            except Exception as exc:
                unreachable[name] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"[bench] {name} unreachable, skipped: {unreachable[name]}",
                      file=sys.stderr)
    session = Session(sizes, backends, args.pool_cap, args.quick)
    session.recovery_mode = args.recovery_mode
    session.recovery_variants = args.recovery_variants

    try:
        for name in wanted:
            module = SECTIONS[name]
            section = session.sections[name] = Section(module.TITLE)
            if module.NEEDS and not backends and name not in MEMORY_PART:
                section.status = "skipped: no database server reachable"
                continue
            timeout = args.timeout or sizes.section_timeout * getattr(module, "TIMEOUT_FACTOR", 1)
            session.log(f"section {name} (timeout {timeout:.0f} s)")
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(module.run(session, section), timeout)
            except TimeoutError:
                section.status = f"**timed out** after {timeout:.0f} s (partial results)"
                session.log(f"section {name} timed out")
            except Exception as exc:
                section.status = f"**failed**: `{type(exc).__name__}: {str(exc)[:300]}`"
                session.log(f"section {name} failed: {exc!r}")
            section.elapsed_s = time.perf_counter() - t0
            session.log(f"section {name} done in {section.elapsed_s:.1f} s")
    finally:
        try:
            await asyncio.wait_for(session.drop_all(), 300)
        except Exception as exc:
            session.log(f"clean-up failed: {exc!r}")
        from scenarios import report

        path = report.write(session, args.out, argv, time.perf_counter() - started,
                            unreachable, load_at_start)
        session.log(f"report written to {path}")
    failed = [n for n, s in session.sections.items() if s.status.startswith("**failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
