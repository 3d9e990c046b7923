"""Saga definitions for the ``sagakit`` CLI acceptance tests.

The CLI subprocesses run with the repository root as their working directory, so they load these
as ``tests.acceptance.cli_sagas:OrderSaga``. The test process prepares a SQLite database with
them (:func:`prepare`): a completed saga, a failed one, one crashed mid-way, one parked.

``CRASH_AT`` (set only in the test process) makes that step's act raise :class:`Crash`, a
``BaseException`` standing for the process dying: the saga is left RUNNING at its last
checkpoint. In a CLI subprocess it is None, so recovery runs every step normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from typing import Any

from sagakit import Fallback, Saga, SagaContext, SagaStatus, SagaStepHandler, recover_saga
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

CRASH_AT: str | None = None


class Crash(BaseException):
    """The process dying in the middle of a step."""


class CardDeclined(Exception):
    """Makes the payment fall back to an invoice."""


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str
    fail_at: str | None = None
    card_declined: bool = False
    trail: list[str] = dataclasses.field(default_factory=list)


class _Step(SagaStepHandler[OrderContext, str]):
    async def act(self, context: OrderContext) -> str:
        name = type(self).__name__
        if name == CRASH_AT:
            raise Crash(name)
        if context.fail_at == name:
            raise ValueError(f"{name} failed on purpose")
        if context.card_declined and name == "ChargeCard":
            raise CardDeclined("card declined")
        context.trail.append(name)
        return name

    async def compensate(self, context: OrderContext) -> None:
        context.trail.append(f"undo {type(self).__name__}")


class ReserveStock(_Step):
    pass


class ChargeCard(_Step):
    pass


class SendInvoice(_Step):
    pass


class ShipOrder(_Step):
    pass


class NotifyCustomer(_Step):
    pass


class OrderSaga(Saga[OrderContext]):
    steps = [
        ReserveStock,
        Fallback(step=ChargeCard, fallback=SendInvoice, failure_exceptions=(CardDeclined,)),
        ShipOrder,
        NotifyCustomer,
    ]


class RefundSaga(Saga[OrderContext]):
    name = "refund"
    steps = [ShipOrder, NotifyCustomer]


NotASaga = OrderContext


async def run(storage: SqlAlchemySagaStorage, context: OrderContext, *,
              crash_at: str | None = None, saga: Any = OrderSaga) -> uuid.UUID:
    """Run a saga; a failing step or a crash is swallowed. Returns its id."""
    global CRASH_AT
    saga_id = uuid.uuid4()
    CRASH_AT = crash_at
    try:
        with contextlib.suppress(Exception, Crash):
            await saga().transaction(context=context, storage=storage, saga_id=saga_id,
                                     compensation_retry_delay=0.0).run()
    finally:
        CRASH_AT = None
    return saga_id


async def prepare(url: str) -> dict[str, uuid.UUID]:
    """A fresh database with one saga per situation; returns their ids by situation name, in
    creation order (oldest first)."""
    storage = SqlAlchemySagaStorage.from_url(url)
    await storage.create_schema()
    try:
        ids = {
            "completed": await run(storage, OrderContext("o-1", card_declined=True)),
            "failed": await run(storage, OrderContext("o-2", fail_at="ShipOrder")),
            "parked": await run(storage, OrderContext("o-3"), crash_at="ChargeCard"),
            "crashed": await run(storage, OrderContext("o-4"), crash_at="ShipOrder"),
        }
        await storage.set_recovery_attempts(ids["parked"], 9)
        parked = await recover_saga(OrderSaga, ids["parked"], storage=storage,
                                    max_recovery_attempts=5)
        assert parked is SagaStatus.PARKED, parked
    finally:
        await storage.close()
    return ids
