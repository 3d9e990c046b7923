"""One RecoveryWorker in its own process, for the recovery and dispatch sections
(scenarios/procs.py starts it).

Run as ``python recovery_child.py '<json config>'``. Prints ``ready`` once its engine is
connected, starts on a ``go`` line on stdin, answers each ``mark`` line with one JSON line (the
time, its CPU, its claims so far and, once a ``count`` line started them, its statement
counters), stops
gracefully on a ``stop`` line (or at end of input, or after its deadline), then prints one JSON
line: what it did and the CPU it used.

Config: ``url``, ``tables`` and ``deadline_s``; optional ``saga`` (``"recovery"``, the default:
the 5-step saga of the recovery section, its steps each awaiting ``step_sleep_ms`` first if
given; ``"dispatch"``: the dispatch section's; ``"failover"``: the failover section's),
``pool_size`` (else the engine's defaults; ``warm``: all of its connections opened before
``ready``), ``concurrency``, ``poll_interval``, ``max_idle_poll``, ``queues``, ``liveness``,
``failover_poll`` and ``lease_seconds`` (else the worker's defaults).

Its final line also counts the worker's claims (``claim_due`` and ``claim_queued`` calls, the
sagas asked for and got, the calls that got none, their seconds, and the claims that lost a
lock conflict and claimed nothing): how the claim behaves with other workers claiming too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the repository (tests.)

WORKER_OPTIONS = ("concurrency", "poll_interval", "max_idle_poll", "queues", "liveness",
                  "failover_poll")


async def _readline() -> str:
    return await asyncio.to_thread(sys.stdin.readline)


class _Warnings(logging.Handler):
    """Keeps the first few warnings sagakit logs (e.g. wake-ups unavailable)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.seen) < 5:
            self.seen.append(f"{record.name}: {record.getMessage()}"[:300])


class _Counting:
    """The statement counter (tests/integration/sqlcount.py) and the BEGINs sent: every query
    the server runs is a statement, a BEGIN or a COMMIT/ROLLBACK (on MySQL/MariaDB the driver
    sends no BEGIN; the counter sees the rest on the wire). On PostgreSQL the counter's hooks
    ask the server for the isolation level, one query per statement and commit: the server's
    own counts are read while they are off."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        from scenarios.common import Counter

        self.counter = Counter(engine)
        self.begins = 0
        self._mysql = engine.dialect.name in ("mysql", "mariadb")
        event.listen(engine.sync_engine, "begin", self._on_begin)

    def _on_begin(self, conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            self.begins += 1

    def now(self) -> dict[str, Any]:
        c = self.counter.counts
        # PostgreSQL: each transaction SQLAlchemy begins is a BEGIN and a COMMIT (or ROLLBACK);
        # its other "transactions" are statements sent in autocommit mode.
        control = c.transactions if self._mysql else 2 * self.begins
        return {"queries": c.statements + control, "statements": c.statements,
                "transactions": c.transactions, "reads": c.reads, "round_trips": c.round_trips}


class _Claims(logging.Handler):
    """Counts the worker's claims, per method: wraps the storage's ``claim_due`` and
    ``claim_queued`` (calls, sagas asked for and got, calls that got none, seconds in them:
    the wait for a connection and for the event loop included) and counts the claims that
    lost a lock conflict (the storage logs each at INFO and claims nothing)."""

    def __init__(self, storage: Any) -> None:
        super().__init__(logging.INFO)
        self.counts: dict[str, dict[str, float]] = {}
        for name in ("claim_due", "claim_queued"):
            original = getattr(storage, name, None)
            if original is not None:
                self.counts[name] = {"calls": 0, "asked": 0, "got": 0, "empty": 0,
                                     "seconds": 0.0, "conflicts": 0}
                setattr(storage, name, self._wrap(original, self.counts[name]))
        log = logging.getLogger("sagakit.storage")
        log.setLevel(logging.INFO)  # that logger's only INFO records are the lost conflicts
        log.addHandler(self)

    @staticmethod
    def _wrap(claim: Any, counts: dict[str, float]) -> Any:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                got = await claim(*args, **kwargs)
            finally:
                counts["seconds"] += time.perf_counter() - t0
            counts["calls"] += 1
            counts["asked"] += int(kwargs.get("limit", 0))
            counts["got"] += len(got)
            counts["empty"] += not got
            return got

        return counted

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for name, counts in self.counts.items():
            if message.startswith(f"{name} lost a lock conflict"):
                counts["conflicts"] += 1


def _saga(config: dict[str, Any]) -> Any:
    kind = config.get("saga", "recovery")
    if kind == "dispatch":
        from scenarios.dispatch import DispatchSaga

        return DispatchSaga
    if kind == "failover":
        from scenarios.failover import FailoverSaga

        return FailoverSaga
    from scenarios.common import saga_class

    return saga_class(5, sleep_ms=int(config.get("step_sleep_ms", 0)))


async def main(config: dict[str, Any]) -> None:
    from sagakit import RecoveryOptions, RecoveryWorker, SagaStatus
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
    pool = ({"pool_size": int(config["pool_size"]), "max_overflow": 0}
            if "pool_size" in config else {})
    storage = SqlAlchemySagaStorage.from_url(config["url"], **pool, **config["tables"])
    options: dict[str, Any] = {k: config[k] for k in WORKER_OPTIONS if k in config}
    if "lease_seconds" in config:
        options["options"] = RecoveryOptions(lease_seconds=float(config["lease_seconds"]))
    claims = _Claims(storage)
    worker = RecoveryWorker(storage, [_saga(config)], **options)
    warnings = _Warnings()
    logging.getLogger("sagakit").addHandler(warnings)
    counting: _Counting | None = None
    try:
        async with contextlib.AsyncExitStack() as opened:  # "warm": the whole pool, opened
            for _ in range(int(config["pool_size"]) if config.get("warm") else 1):
                await opened.enter_async_context(storage.engine.connect())
        print("ready", flush=True)
        if (await _readline()).strip() != "go":
            return
        cpu0 = time.process_time()
        deadline = time.monotonic() + float(config["deadline_s"])
        run = asyncio.ensure_future(worker.run(install_signal_handlers=False))
        while True:
            line = asyncio.ensure_future(_readline())
            await asyncio.wait({run, line}, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            command = line.result().strip() if line.done() else ""
            if command not in ("mark", "count"):
                break
            if command == "count" and counting is None:
                counting = _Counting(storage.engine)
            print(json.dumps({"t": time.time(), "cpu_s": time.process_time() - cpu0,
                              "claims": claims.counts,
                              **(counting.now() if counting is not None else {})}),
                  flush=True)
        worker.stop()
        await asyncio.wait_for(run, 60)
        cpu = time.process_time() - cpu0
        outcomes = worker.outcomes
        errors = [o for o in outcomes if o.error is not None and not o.busy]
        print(json.dumps({
            "attempts": len(outcomes),
            "completed": [str(o.saga_id) for o in outcomes if o.status is SagaStatus.COMPLETED],
            "busy": sum(1 for o in outcomes if o.busy),
            "errors": len(errors),
            "first_error": repr(errors[0].error)[:300] if errors else None,
            "cpu_s": cpu,
            # The SQL storage listens on PostgreSQL only (LISTEN/NOTIFY); elsewhere it polls.
            "wakeups": (getattr(storage, "listen", None) is not None
                        and storage.dialect.is_postgres),
            "warnings": warnings.seen,
            "claims": claims.counts,
        }), flush=True)
        line.cancel()
    finally:
        if counting is not None:
            counting.counter.close()
        await storage.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
    # The stdin reader thread may still be blocked in readline: do not wait for it.
    sys.stdout.flush()
    import os

    os._exit(0)
