"""An order saga behind a FastAPI endpoint that streams its progress as Server-Sent Events.

- ``POST /orders`` with a JSON order starts the saga and streams ``text/event-stream``:
  ``start`` (the saga id), one ``step`` per completed step, then ``done`` (the final status) —
  or, when a step failed, one ``compensation`` per compensated step (read from the saga's step
  log) and ``error`` (the error type and message, and the final status).
- ``POST /orders/submit`` hands the saga to the workers instead (``OrderSaga().submit``, the
  ``orders`` queue) and answers at once (202) with its id;
  ``GET /sagas/{saga_id}/events`` then streams its step log as a worker writes it: one ``log``
  event per entry (steps, failed attempts, compensations), then ``done`` (the final status).
- ``GET /sagas/{saga_id}`` returns the stored saga: status, context and step history.

``POST /orders`` runs the saga in a background task detached from the request, fed into the
stream through a queue: a client that disconnects stops its stream, never its saga, which still
reaches a terminal state (poll ``GET /sagas/{id}``). A process that dies mid-saga leaves it at
its last checkpoint. The worker this app runs finishes such sagas, and runs the submitted ones;
other workers can serve the ``orders`` queue too (``sagakit worker --queue orders``). See
docs/sse.md.

Sagas are stored with SQLAlchemy, on SQLite by default; set ``SAGAKIT_DATABASE_URL`` for another
database (e.g. ``postgresql+asyncpg://user@host/db``). Run it with::

    pip install 'sagakit[fastapi]'
    python examples/fastapi_saga_sse.py --port 8000   # or: uvicorn examples.fastapi_saga_sse:app
    curl -N -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"items": ["book"], "amount": 25.0, "address": "1 Main Street"}'
    curl -X POST localhost:8000/orders/submit -H 'content-type: application/json' \\
         -d '{"items": ["book"], "amount": 25.0, "address": "1 Main Street"}'
    curl -N localhost:8000/sagas/<saga_id>/events

Failures to try: the address ``"Atlantis"`` (shipping fails: payment refunded, stock released),
an ``amount`` over 10000 (the card is declined), the item ``"unobtainium"`` (out of stock).
``payment_delay`` (seconds) makes the payment step slow, to watch the stream, or to disconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from sagakit import (
    LoggingMiddleware,
    RecoveryWorker,
    Saga,
    SagaAction,
    SagaContext,
    SagaLogFilter,
    SagaNotFoundError,
    SagaStepHandler,
    SagaStepStatus,
    SagaStorage,
)
from sagakit.middleware import saga_log_context
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from sagakit.submission import SubmittedSaga

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///sagakit_sse.db"
ORDERS_QUEUE = "orders"
logger = logging.getLogger("orders")


# -- services the steps call (in memory, for the example) -------------------------------------


class Inventory:
    sold_out = frozenset({"unobtainium"})

    async def reserve(self, order_id: str, items: list[str]) -> str:
        missing = [item for item in items if item in self.sold_out]
        if missing:
            raise LookupError(f"out of stock: {', '.join(missing)}")
        return f"reservation-{order_id}"

    async def release(self, reservation_id: str) -> None:
        logger.info("released %s", reservation_id)


class Payments:
    limit = 10_000.0

    async def charge(self, order_id: str, amount: float, delay: float) -> str:
        await asyncio.sleep(delay)  # a slow payment provider
        if amount > self.limit:
            raise PermissionError(f"card declined: {amount:.2f} is over the limit")
        return f"payment-{order_id}"

    async def refund(self, payment_id: str) -> None:
        logger.info("refunded %s", payment_id)


class Shipping:
    unreachable = frozenset({"Atlantis"})

    async def ship(self, order_id: str, address: str) -> str:
        if address in self.unreachable:
            raise RuntimeError(f"cannot ship to {address!r}")
        return f"shipment-{order_id}"

    async def cancel(self, shipment_id: str) -> None:
        logger.info("cancelled %s", shipment_id)


@dataclasses.dataclass
class Services:
    inventory: Inventory = dataclasses.field(default_factory=Inventory)
    payments: Payments = dataclasses.field(default_factory=Payments)
    shipping: Shipping = dataclasses.field(default_factory=Shipping)


# -- the saga ------------------------------------------------------------------------------------


@dataclasses.dataclass
class OrderContext(SagaContext):
    order_id: str
    items: list[str]
    amount: float
    address: str
    payment_delay: float = 0.0
    reservation_id: str | None = None
    payment_id: str | None = None
    shipment_id: str | None = None


class OrderStep(SagaStepHandler[OrderContext, str]):
    def __init__(self, services: Services) -> None:
        self.services = services


class ReserveInventory(OrderStep):
    async def act(self, context: OrderContext) -> str:
        context.reservation_id = await self.services.inventory.reserve(
            context.order_id, context.items
        )
        return context.reservation_id

    async def compensate(self, context: OrderContext) -> None:
        if context.reservation_id:
            await self.services.inventory.release(context.reservation_id)


class ChargePayment(OrderStep):
    async def act(self, context: OrderContext) -> str:
        context.payment_id = await self.services.payments.charge(
            context.order_id, context.amount, context.payment_delay
        )
        return context.payment_id

    async def compensate(self, context: OrderContext) -> None:
        if context.payment_id:
            await self.services.payments.refund(context.payment_id)


class ShipOrder(OrderStep):
    async def act(self, context: OrderContext) -> str:
        context.shipment_id = await self.services.shipping.ship(context.order_id, context.address)
        return context.shipment_id

    async def compensate(self, context: OrderContext) -> None:
        if context.shipment_id:
            await self.services.shipping.cancel(context.shipment_id)


class OrderSaga(Saga[OrderContext]):
    steps = [ReserveInventory, ChargePayment, ShipOrder]


class OrderRequest(BaseModel):
    """The request body: what the order is; the saga's context is built from it."""

    order_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    items: list[str] = Field(min_length=1)
    amount: float = Field(gt=0)
    address: str
    payment_delay: float = Field(default=0.0, ge=0, le=60, description="demo: slow payment")

    def context(self) -> OrderContext:
        return OrderContext(order_id=self.order_id, items=self.items, amount=self.amount,
                            address=self.address, payment_delay=self.payment_delay)


# -- running sagas apart from the requests -------------------------------------------------------

Event = tuple[str, dict[str, Any]]


def sse(event: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class SagaRunner:
    """Runs each saga in its own task, detached from the request that started it.

    The task is kept in ``tasks`` (a task nobody references can be garbage-collected) and
    reports its progress into a queue the request streams from. When the client goes away only
    the stream ends; the task carries the saga to a terminal state regardless.
    """

    def __init__(self, storage: SagaStorage, services: Services) -> None:
        self.storage = storage
        self.services = services
        self.middlewares = [LoggingMiddleware()]
        self.tasks: set[asyncio.Task[None]] = set()

    def build(self, step_type: type[OrderStep]) -> OrderStep:
        return step_type(self.services)

    def start(self, context: OrderContext) -> tuple[uuid.UUID, asyncio.Queue[Event | None]]:
        saga_id = uuid.uuid4()
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        task = asyncio.create_task(self._run(saga_id, context, queue), name=f"saga-{saga_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return saga_id, queue

    async def _run(
        self, saga_id: uuid.UUID, context: OrderContext, queue: asyncio.Queue[Event | None]
    ) -> None:
        ids = {"saga_id": str(saga_id)}
        queue.put_nowait(("start", {**ids, "saga": OrderSaga.name, "order_id": context.order_id}))
        transaction = OrderSaga().transaction(
            context=context, container=self.build, storage=self.storage, saga_id=saga_id,
            middlewares=self.middlewares, compensation_retry_delay=0.5,
        )
        with saga_log_context(saga_id, OrderSaga.name):  # this task's own records name the saga
            try:
                async with transaction:
                    async for result in transaction:
                        queue.put_nowait(("step", {**ids, "step": result.step_name,
                                                   "response": result.response}))
            except Exception as exc:
                failed_step, compensations = await self.after_failure(saga_id)
                for entry in compensations:
                    queue.put_nowait(("compensation", {**ids, **entry}))
                status = transaction.status.value if transaction.status else None
                queue.put_nowait(("error", {**ids, "status": status, "step": failed_step,
                                            "error_type": type(exc).__name__,
                                            "message": str(exc)}))
                logger.warning("order %s: saga ended %s: %r", context.order_id, status, exc)
            else:
                status = transaction.status.value if transaction.status else None
                queue.put_nowait(("done", {**ids, "status": status}))
                logger.info("order %s: saga ended %s", context.order_id, status)
            finally:
                queue.put_nowait(None)

    async def after_failure(self, saga_id: uuid.UUID) -> tuple[str | None, list[dict[str, Any]]]:
        """The step that failed and the compensations recorded after it, from the step log."""
        try:
            history = await self.storage.get_step_history(saga_id)
        except Exception:  # the error event still goes out
            logger.exception("could not read the step history")
            return None, []
        failed = [i for i, e in enumerate(history)
                  if e.action is SagaAction.ACT and e.status is SagaStepStatus.FAILED]
        if not failed:
            return None, []
        compensations = [
            {"step": e.step_name, "status": e.status.value, "error_type": e.error_type,
             "details": e.details}
            for e in history[failed[-1] + 1:] if e.action is SagaAction.COMPENSATE
        ]
        return history[failed[-1]].step_name, compensations

    async def shutdown(self, timeout: float) -> None:
        """Let the sagas in flight finish; after ``timeout`` seconds cancel the rest (they rest at
        their last checkpoint, for recovery)."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def stream(saga_id: uuid.UUID, queue: asyncio.Queue[Event | None]) -> AsyncIterator[str]:
    """The response body: the saga's events until its last one. Ends early when the client
    disconnects (the server cancels or closes this generator); the saga goes on."""
    finished = False
    try:
        while (item := await queue.get()) is not None:
            yield sse(*item)
        finished = True
    finally:
        if not finished:
            logger.info("saga %s: the client left the stream; the saga goes on", saga_id,
                        extra={"saga_id": str(saga_id), "saga_name": OrderSaga.name})


async def follow(handle: SubmittedSaga) -> AsyncIterator[str]:
    """A submitted saga's stream: its step log entries as the workers write them (from the
    first, however late the client comes), then its final status. A client that leaves ends
    only this stream."""
    ids = {"saga_id": str(handle.saga_id)}
    async for entry in handle.steps():
        yield sse("log", {**ids, "step": entry.step_name, "action": entry.action.value,
                          "status": entry.status.value, "error_type": entry.error_type,
                          "details": entry.details, "attempt": entry.attempt})
    state = await handle.state()
    yield sse("done", {**ids, "status": state.status.value})


# -- the app ------------------------------------------------------------------------------------


def create_app(database_url: str | None = None, *, shutdown_timeout: float = 30.0) -> FastAPI:
    url = database_url or os.environ.get("SAGAKIT_DATABASE_URL", DEFAULT_DATABASE_URL)
    storage = SqlAlchemySagaStorage.from_url(url)
    services = Services()
    runner = SagaRunner(storage, services)
    # Runs the sagas submitted to the orders queue, and finishes sagas a crash or a deploy cut
    # off (never one a live run holds). On PostgreSQL a submit wakes it (and every other worker
    # serving the queue) at once; elsewhere it polls, from every second up to every 5 s.
    worker = RecoveryWorker(storage, [OrderSaga], runner.build, queues=[ORDERS_QUEUE],
                            poll_interval=1.0, max_idle_poll=5.0)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await storage.create_schema()
        recovering = asyncio.create_task(worker.run(install_signal_handlers=False))
        try:
            yield
        finally:
            worker.stop()
            await runner.shutdown(shutdown_timeout)
            await recovering
            await storage.close()

    app = FastAPI(title="sagakit orders", lifespan=lifespan)
    app.state.runner = runner

    @app.post("/orders")
    async def create_order(order: OrderRequest) -> StreamingResponse:
        saga_id, queue = runner.start(order.context())
        return StreamingResponse(
            stream(saga_id, queue),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                     "Location": f"/sagas/{saga_id}"},
        )

    @app.post("/orders/submit", status_code=202)
    async def submit_order(order: OrderRequest) -> dict[str, Any]:
        handle = await OrderSaga().submit(order.context(), storage=storage, queue=ORDERS_QUEUE)
        worker.wake()  # this process's worker: no need to wait for its next poll
        saga_id = handle.saga_id
        return {"saga_id": str(saga_id), "saga": handle.saga_name, "queue": handle.queue,
                "order_id": order.order_id, "events": f"/sagas/{saga_id}/events"}

    @app.get("/sagas/{saga_id}/events")
    async def saga_events(saga_id: uuid.UUID) -> StreamingResponse:
        try:
            saga = await storage.get_saga(saga_id)
        except SagaNotFoundError:
            raise HTTPException(status_code=404, detail=f"no saga {saga_id}") from None
        handle = SubmittedSaga(saga_id, saga.name, saga.queue or ORDERS_QUEUE, storage)
        return StreamingResponse(
            follow(handle), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/sagas/{saga_id}")
    async def get_saga(saga_id: uuid.UUID) -> dict[str, Any]:
        try:
            saga = await storage.get_saga(saga_id)
        except SagaNotFoundError:
            raise HTTPException(status_code=404, detail=f"no saga {saga_id}") from None
        history = await storage.get_step_history(saga_id)
        return {
            "saga_id": str(saga.saga_id),
            "name": saga.name,
            "status": saga.status.value,
            "context": saga.context,
            "created_at": saga.created_at.isoformat() if saga.created_at else None,
            "updated_at": saga.updated_at.isoformat() if saga.updated_at else None,
            "history": [
                {"step": e.step_name, "action": e.action.value, "status": e.status.value,
                 "error_type": e.error_type, "details": e.details,
                 "timestamp": e.timestamp.isoformat()}
                for e in history
            ],
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


_app: FastAPI | None = None


async def app(scope: Any, receive: Any, send: Any) -> None:
    """``uvicorn examples.fastapi_saga_sse:app``: the app for ``SAGAKIT_DATABASE_URL``, built
    on first use (importing this module builds nothing)."""
    global _app
    if _app is None:
        _app = create_app()
    await _app(scope, receive, send)


def configure_logging() -> None:
    """Every record names its saga and step (None outside one): see docs/observability.md."""
    handler = logging.StreamHandler()
    handler.addFilter(SagaLogFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s saga=%(saga_id)s step=%(step_name)s %(message)s"
    ))
    for name in ("sagakit", "orders"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args()
    configure_logging()
    uvicorn.run(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
