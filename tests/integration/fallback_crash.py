"""A fallback saga whose primary charges a card and then the process SIGKILLs itself, before the
step's checkpoint; used by ``test_fallback_crash.py``.

The charges live in a ledger, a SQLite file of its own written with the standard library and
committed at once (so a charge survives the kill): one row per charge, keyed by the act's
idempotency key (a charge is made once per key, as a payment service deduplicates), with a
``refunded`` flag, and one row per call made.

Run as the process that is killed::

    python -m tests.integration.fallback_crash URL EXECUTIONS_TABLE LOGS_TABLE LEDGER SAGA_ID
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sqlite3
import sys
import uuid
from pathlib import Path

from sagakit import Fallback, Saga, SagaContext, SagaStepHandler
from sagakit.storage import SqlAlchemySagaStorage

LEASE_SECONDS = 1.0


class GatewayDown(ConnectionError):
    pass


class Ledger:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, "
                       "gateway TEXT NOT NULL, refunded INTEGER NOT NULL DEFAULT 0)")
            db.execute("CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, "
                       "what TEXT NOT NULL, gateway TEXT NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)  # autocommit: durable at once

    def call(self, what: str, gateway: str) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO calls (what, gateway) VALUES (?, ?)", (what, gateway))

    def charge(self, gateway: str, act_key: str) -> None:
        self.call("charge", gateway)
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO charges (key, gateway) VALUES (?, ?)",
                       (act_key, gateway))

    def refund(self, gateway: str, act_key: str) -> None:
        """A no-op when nothing was charged under that key."""
        self.call("refund", gateway)
        with self._connect() as db:
            db.execute("UPDATE charges SET refunded = 1 WHERE key = ?", (act_key,))

    def charges(self) -> list[tuple[str, bool]]:
        """(gateway, refunded) per charge, in the order made."""
        with self._connect() as db:
            rows = db.execute("SELECT gateway, refunded FROM charges ORDER BY rowid").fetchall()
        return [(gateway, bool(refunded)) for gateway, refunded in rows]

    def calls(self) -> list[tuple[str, str]]:
        with self._connect() as db:
            return db.execute("SELECT what, gateway FROM calls ORDER BY id").fetchall()


@dataclasses.dataclass
class Payment(SagaContext):
    ledger: str
    order_id: str = "o-1"


class Behaviour:
    """What the gateways do in this process."""

    die_after_charging = False
    main_down = False


class ChargeCard(SagaStepHandler[Payment, None]):
    gateway = "main"

    async def act(self, context: Payment) -> None:
        ledger = Ledger(context.ledger)
        if self.gateway == "main" and Behaviour.main_down:
            ledger.call("charge", self.gateway)
            raise GatewayDown("main gateway down")
        ledger.charge(self.gateway, self.idempotency_key)
        if Behaviour.die_after_charging:  # charged; the checkpoint never gets written
            os.kill(os.getpid(), signal.SIGKILL)

    async def compensate(self, context: Payment) -> None:
        act_key = self.idempotency_key.removesuffix(":compensate") + ":act"
        Ledger(context.ledger).refund(self.gateway, act_key)


class ChargeBackup(ChargeCard):
    gateway = "backup"


class Reserve(SagaStepHandler[Payment, None]):
    async def act(self, context: Payment) -> None: ...

    async def compensate(self, context: Payment) -> None: ...


class PaymentSaga(Saga[Payment]):
    steps = [Reserve, Fallback(step=ChargeCard, fallback=ChargeBackup,
                               failure_exceptions=(GatewayDown,))]


async def run_until_killed(url: str, executions: str, logs: str, ledger: str,
                           saga_id: uuid.UUID) -> None:
    Behaviour.die_after_charging = True
    storage = SqlAlchemySagaStorage.from_url(url, executions_table=executions, logs_table=logs)
    try:
        await PaymentSaga().transaction(context=Payment(ledger), storage=storage,
                                        saga_id=saga_id, lease_seconds=LEASE_SECONDS).run()
    finally:
        await storage.close()


if __name__ == "__main__":
    url, executions, logs, ledger, saga_id = sys.argv[1:6]
    asyncio.run(run_until_killed(url, executions, logs, ledger, uuid.UUID(saga_id)))
    sys.exit(3)  # not killed: the test fails on this exit code
