"""A downstream payment service that makes a paused worker's late calls harmless.

A worker frozen past its lease (SIGSTOP, a long GC pause, a VM stall) can wake up after another
worker took its saga over, and finish the call it was making: a charge that the new owner has
meanwhile made again and refunded. Fencing keeps such a run from writing to the saga; the
service it calls must refuse the late call itself. It gets two things from each step:

- ``self.idempotency_key`` (``"<saga id>:<step>:act"``, the same on every re-run): the service
  charges a key once, and **remembers it after the refund** (even a refund that came first,
  when there was nothing to refund yet): a charge whose key was refunded is refused, never
  applied (nor answered as if it had gone through);
- ``self.fencing_token`` (the saga's version when the calling run took its lease, larger at
  every takeover): the service keeps the highest token it saw for the order, and **refuses a
  request with a lower one**. The check and the effect are one transaction.

:class:`PaymentService` keeps its books in one SQLite file (stdlib ``sqlite3``), so several
processes can share it: tests/acceptance/test_paused_worker.py runs it against a worker frozen
with a real SIGSTOP. (The steps call it synchronously to keep the example short; a real service
is a network call away.) ``main()`` plays the story in one process: worker 1 is paused right
before its charge, its lease runs out, worker 2 recovers the saga (charges, fails to ship,
refunds), then worker 1 wakes up and sends its charge, which the service refuses. See
docs/fencing.md.

Run: ``python examples/fencing_service.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from sagakit import (
    MemorySagaStorage,
    Saga,
    SagaContext,
    SagaLeaseLostError,
    SagaStepHandler,
    recover_saga,
)


class RequestRefused(Exception):
    """The service refused a request; nothing was changed."""


class StaleRequest(RequestRefused):
    """The request's fencing token is lower than one already seen for its order: it comes from
    a run of the saga that another run has replaced."""


class ChargeRefunded(RequestRefused):
    """A charge whose idempotency key was already refunded (a late act of a compensated
    step), or compensated before the charge arrived: refused, not applied."""


@dataclasses.dataclass(frozen=True)
class Request:
    seq: int
    op: str
    order_id: str
    key: str
    token: int
    outcome: str


@dataclasses.dataclass(frozen=True)
class Charge:
    """A charge key the service knows: charged (``payment_id``), and refunded once
    ``refund_key`` is set; or only refunded (no payment id: the refund came first)."""

    key: str
    payment_id: str | None
    order_id: str
    amount: int
    token: int
    refund_key: str | None

    @property
    def standing(self) -> bool:
        """Charged and not refunded."""
        return self.payment_id is not None and self.refund_key is None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS fences (      -- the highest fencing token seen, per order
    order_id TEXT PRIMARY KEY, token INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS charges (     -- one per charge key, kept after its refund
    key TEXT PRIMARY KEY, payment_id TEXT UNIQUE, order_id TEXT NOT NULL,
    amount INTEGER NOT NULL, token INTEGER NOT NULL, refund_key TEXT);
CREATE TABLE IF NOT EXISTS requests (    -- every request and what became of it
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, order_id TEXT NOT NULL,
    key TEXT NOT NULL, token INTEGER NOT NULL, outcome TEXT NOT NULL);
"""


class PaymentService:
    """Charges and refunds, deduplicated by idempotency key and fenced by token, per order
    (an order has one saga here: the highest token of its order is the highest of its saga).

    Every request is one ``BEGIN IMMEDIATE`` transaction on the SQLite file at ``path``, so
    processes sharing the file see each request whole, and a refused request changes nothing
    but the request log.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.executescript(_SCHEMA)  # idempotent: every process sharing the file may run it

    def charge(self, order_id: str, amount: int, *, key: str, token: int) -> str:
        """Charge ``amount`` for the order once per ``key``; return the payment id (the same
        for a repeated key). Raises StaleRequest or ChargeRefunded, charging nothing."""
        with self._transaction() as db:
            outcome = self._fence(db, order_id, token)
            payment_id = ""
            if not outcome:
                row = db.execute("SELECT payment_id, refund_key FROM charges WHERE key = ?",
                                 (key,)).fetchone()
                if row is None:
                    payment_id = f"pay-{uuid.uuid4().hex[:8]}"
                    db.execute("INSERT INTO charges VALUES (?, ?, ?, ?, ?, NULL)",
                               (key, payment_id, order_id, amount, token))
                    outcome = "charged"
                elif row[1] is not None:
                    outcome = "refused: this charge key was refunded"
                else:
                    payment_id, outcome = row[0], "duplicate: charged before"
            self._log(db, "charge", order_id, key, token, outcome)
        self._raise_if_refused(outcome, key)
        return payment_id

    def refund(self, order_id: str, charge_key: str, *, key: str, token: int) -> None:
        """Refund the charge made with ``charge_key``, once. With no such charge (yet: a late
        charge may still be on its way) there is nothing to refund, and the charge key is
        remembered as refunded all the same. Either way a charge with that key is refused from
        now on. Raises StaleRequest, refunding nothing."""
        with self._transaction() as db:
            outcome = self._fence(db, order_id, token)
            if not outcome:
                row = db.execute("SELECT refund_key FROM charges WHERE key = ?",
                                 (charge_key,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO charges VALUES (?, NULL, ?, 0, ?, ?)",
                               (charge_key, order_id, token, key))
                    outcome = "nothing to refund: charge key remembered"
                elif row[0] is None:
                    db.execute("UPDATE charges SET refund_key = ? WHERE key = ?",
                               (key, charge_key))
                    outcome = "refunded"
                else:
                    outcome = "duplicate: refunded before"
            self._log(db, "refund", order_id, key, token, outcome)
        self._raise_if_refused(outcome, key)

    def charges(self, order_id: str) -> list[Charge]:
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM charges WHERE order_id = ? ORDER BY rowid",
                              (order_id,)).fetchall()
        return [Charge(*row) for row in rows]

    def requests(self, order_id: str) -> list[Request]:
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM requests WHERE order_id = ? ORDER BY seq",
                              (order_id,)).fetchall()
        return [Request(*row) for row in rows]

    # -- the rules ---------------------------------------------------------------------------

    @staticmethod
    def _fence(db: sqlite3.Connection, order_id: str, token: int) -> str:
        """Refuse a token lower than the highest seen for the order (return why), else make it
        the highest (return "")."""
        row = db.execute("SELECT token FROM fences WHERE order_id = ?", (order_id,)).fetchone()
        if row is not None and token < row[0]:
            return f"refused: stale token ({row[0]} seen)"
        db.execute("INSERT INTO fences VALUES (?, ?) ON CONFLICT (order_id) "
                   "DO UPDATE SET token = max(token, excluded.token)", (order_id, token))
        return ""

    @staticmethod
    def _raise_if_refused(outcome: str, key: str) -> None:
        if outcome.startswith("refused: stale"):
            raise StaleRequest(f"{key}: {outcome}")
        if outcome.startswith("refused"):
            raise ChargeRefunded(f"{key}: {outcome}")

    @staticmethod
    def _log(db: sqlite3.Connection, op: str, order_id: str, key: str, token: int,
             outcome: str) -> None:
        db.execute("INSERT INTO requests (op, order_id, key, token, outcome) "
                   "VALUES (?, ?, ?, ?, ?)", (op, order_id, key, token, outcome))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()


# -- a saga whose steps call it ------------------------------------------------------------------


@dataclasses.dataclass
class Order(SagaContext):
    order_id: str
    amount: int
    address: str
    payment_id: str | None = None


class Pause:
    """Where the demo freezes worker 1: right before its charge goes out."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.resume = asyncio.Event()

    async def __call__(self) -> None:
        self.reached.set()
        await self.resume.wait()


class ChargeCard(SagaStepHandler[Order, str]):
    """Charges the order. ``pause``, if given, is awaited right before the charge goes out
    (where the demo, and the SIGSTOP test, freeze a worker)."""

    def __init__(
        self, payments: PaymentService, pause: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.payments = payments
        self.pause = pause

    async def act(self, context: Order) -> str:
        if self.pause is not None:
            await self.pause()
        context.payment_id = self.payments.charge(
            context.order_id, context.amount, key=self.idempotency_key, token=self.fencing_token
        )
        return context.payment_id

    async def compensate(self, context: Order) -> None:
        # Refund by the act's key, not by a payment id from the context: a compensation can
        # run for an act whose outcome is unknown (a fallback's primary cut off by a crash),
        # and the service must remember the key even when nothing was charged yet.
        charge_key = self.idempotency_key.removesuffix(":compensate") + ":act"
        self.payments.refund(context.order_id, charge_key, key=self.idempotency_key,
                             token=self.fencing_token)


class ShipOrder(SagaStepHandler[Order, None]):
    def __init__(self, payments: PaymentService) -> None:
        self.payments = payments

    async def act(self, context: Order) -> None:
        if context.address == "Atlantis":
            raise ValueError(f"cannot ship to {context.address!r}")

    async def compensate(self, context: Order) -> None: ...


class OrderSaga(Saga[Order]):
    steps = [ChargeCard, ShipOrder]


# -- the story --------------------------------------------------------------------------------


class Clock:
    """The storage's clock: moved forward by hand to let a lease run out at once."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def steps_for(
    payments: PaymentService, pause: Callable[[], Awaitable[None]] | None = None
) -> Any:
    """A container: builds the steps with the service (and ChargeCard with ``pause``)."""

    def build(step_type: type[Any]) -> Any:
        if step_type is ChargeCard:
            return ChargeCard(payments, pause)
        return step_type(payments)

    return build


async def main(folder: Path) -> None:
    logging.getLogger("sagakit").setLevel(logging.CRITICAL)  # the takeover is logged loudly
    payments = PaymentService(folder / "payments.db")
    clock = Clock()
    storage = MemorySagaStorage(clock=clock)
    saga_id = uuid.uuid4()
    order = Order("order-1", 4990, address="Atlantis")  # undeliverable: the saga rolls back

    frozen = Pause()
    first = asyncio.create_task(OrderSaga().transaction(
        context=order, storage=storage, saga_id=saga_id, lease_seconds=30,
        container=steps_for(payments, pause=frozen)).run())
    await frozen.reached.wait()
    print("worker 1: paused in ChargeCard, right before its charge (token 1)")

    clock.now += 31  # its lease runs out while it is paused
    status = await recover_saga(OrderSaga, saga_id, container=steps_for(payments),
                                storage=storage, compensation_retry_delay=0)
    print(f"worker 2: took the saga over and recovered it: {status.value}")
    after_worker_2 = await storage.get_saga(saga_id), await storage.get_step_history(saga_id)

    frozen.resume.set()  # worker 1 wakes up and sends its charge
    try:
        await first
    except SagaLeaseLostError as exc:
        refused = exc.__context__
        print(f"worker 1: its charge was refused: {type(refused).__name__}: {refused}")
        print("worker 1: its run ended with SagaLeaseLostError")
    assert (await storage.get_saga(saga_id), await storage.get_step_history(saga_id)) == (
        after_worker_2)  # fenced: worker 1 wrote nothing to the saga
    log = ", ".join(f"{e.step_name} {e.action.value} {e.status.value}" for e in after_worker_2[1])
    print(f"saga: {after_worker_2[0].status.value}, as worker 2 left it ({log})")

    print("requests the payment service received:")
    for r in payments.requests(order.order_id):
        print(f"  {r.seq}. {r.op:<6} token {r.token}  {r.outcome}")
    [charge] = payments.charges(order.order_id)
    print(f"ledger: {charge.payment_id} {charge.amount} charged with token {charge.token}, "
          f"{'NOT refunded' if charge.standing else 'refunded'}")
    assert not charge.standing  # no charge left without its refund

    try:  # the charge key is remembered after its refund: refused even with a current token
        payments.charge(order.order_id, order.amount, key=charge.key, token=2)
    except ChargeRefunded as exc:
        print(f"a late charge with the refunded key and token 2: refused ({exc})")

    # A refund that comes before its charge (the charge still on its way from a paused
    # worker): nothing to refund, but the key is remembered, and the charge is refused.
    payments.refund("order-2", "saga-2:ChargeCard:act", key="saga-2:ChargeCard:compensate",
                    token=3)
    try:
        payments.charge("order-2", 1200, key="saga-2:ChargeCard:act", token=3)
    except ChargeRefunded as exc:
        print(f"a charge arriving after its refund: refused ({exc})")
    assert not any(c.standing for c in payments.charges("order-2"))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))
