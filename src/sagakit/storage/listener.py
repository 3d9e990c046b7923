"""Wake-ups on PostgreSQL: one LISTEN session per worker, kept up for as long as it runs.

The SQL storage sends ``NOTIFY <channel>, '<queue> <seconds>'`` when a saga is submitted (with
the insert, in one statement), when a submitted saga releases its lease (a slot is free), and
when any saga starts a durable wait (due in ``seconds``). :func:`listening` calls the worker's
callback for each one, after ``seconds`` where they say so.

The session is a connection of its own, outside the pool (a LISTEN must stay on one session).
Should it drop (a server restart, a failover), it is opened again with backoff, and the
callback is called once it is back: whatever was notified meanwhile is found by that poll. A
lost notification only delays work until the next poll; it never loses any.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from sagakit.exceptions import SagaStorageUnavailableError

__all__ = ["channel_for", "listening", "parse_wake", "wake_payload"]

logger = logging.getLogger("sagakit.storage")


def channel_for(executions_table: str) -> str:
    """The NOTIFY channel of one set of sagakit tables (at most 51 characters: a valid
    identifier, as the table's name is)."""
    return f"{executions_table}_wake"


def wake_payload(queue: str | None, seconds: float = 0.0) -> str:
    """What a notification says: the queue (empty for an in-process saga) and, for a durable
    wait, the seconds until it is due."""
    return f"{queue or ''} {seconds:.3f}"


def parse_wake(payload: str) -> tuple[str, float]:
    """(queue, seconds) from a wake-up's payload (a malformed number reads as 0)."""
    queue, _, seconds = payload.partition(" ")
    try:
        return queue, max(0.0, float(seconds or 0.0))
    except ValueError:
        return queue, 0.0


@contextlib.asynccontextmanager
async def listening(
    connect: Callable[[], Any], channel: str, callback: Callable[[str], object], *,
    max_backoff: float = 30.0,
) -> AsyncIterator[None]:
    """LISTEN on ``channel`` through connections from ``connect()`` (an awaitable asyncpg
    connection) while inside, calling ``callback(queue)`` per notification. The first connection
    is opened before the body runs: its failure (the database down) raises
    SagaStorageUnavailableError, the driver's error as its cause."""
    loop = asyncio.get_running_loop()
    lost = asyncio.Event()
    timers: set[asyncio.TimerHandle] = set()

    def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        queue, seconds = parse_wake(payload)
        if seconds <= 0:
            callback(queue)
            return
        now = loop.time()
        for done in [t for t in timers if t.when() <= now]:  # the timers that went off
            timers.discard(done)
        timers.add(loop.call_later(seconds, callback, queue))

    async def open_session() -> Any:
        conn = await connect()
        conn.add_termination_listener(lambda _c: lost.set())
        await conn.add_listener(channel, notified)
        return conn

    try:
        conn = await open_session()
    except Exception as error:
        raise SagaStorageUnavailableError(
            f"cannot open the wake-up session (LISTEN {channel}): "
            f"{type(error).__name__}: {error}") from error

    async def keep_up() -> None:
        nonlocal conn
        failures = 0
        while True:
            await lost.wait()
            lost.clear()
            while True:
                try:
                    conn = await open_session()
                except Exception as error:
                    failures += 1
                    wait = min(max_backoff, 0.1 * 2 ** min(failures, 20))
                    if failures == 1:
                        logger.warning("wake-up session lost, reconnecting: %s", error)
                    await asyncio.sleep(wait * random.uniform(0.8, 1.2))
                    continue
                if failures:
                    logger.warning("wake-up session back after %d failed reconnects", failures)
                failures = 0
                callback("")  # whatever came meanwhile: poll now
                break

    keeper = asyncio.create_task(keep_up())
    try:
        yield
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        for handle in timers:
            handle.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)
