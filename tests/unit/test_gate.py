"""The connection gate in front of the SQL storage's pool: fair waits, urgent callers first,
a clear error after the wait, and no slot ever lost."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from sagakit.storage.faults import PoolExhausted
from sagakit.storage.pool import LEASE, START, WORK, ConnectionGate


async def _waiter(gate: ConnectionGate, priority: int, name: str, order: list[str]) -> None:
    await gate.enter(priority)
    order.append(name)


async def test_free_slots_are_taken_at_once_and_waiters_are_served_by_urgency_then_arrival():
    gate = ConnectionGate(2, timeout=10)
    await gate.enter(WORK)
    await gate.enter(WORK)
    order: list[str] = []
    tasks = []
    for priority, name in [(START, "start-1"), (WORK, "work-1"), (LEASE, "lease"),
                           (WORK, "work-2"), (START, "start-2")]:
        tasks.append(asyncio.create_task(_waiter(gate, priority, name, order)))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert order == []  # every slot is in use
    for _ in range(5):
        gate.leave()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == ["lease", "work-1", "work-2", "start-1", "start-2"]
    assert gate.in_use == 2
    gate.leave()
    gate.leave()
    assert gate.in_use == 0


async def test_a_caller_waiting_past_the_timeout_gets_pool_exhausted_and_no_slot_is_lost():
    gate = ConnectionGate(1, timeout=0.05)
    await gate.enter(WORK)
    with pytest.raises(PoolExhausted, match=r"within 0\.05 s"):
        await gate.enter(START)
    gate.leave()
    assert gate.in_use == 0
    await gate.enter(WORK)  # the slot is free again, not owed to the one that gave up
    assert gate.in_use == 1


async def test_a_waiter_cancelled_after_it_was_handed_the_slot_passes_it_on():
    gate = ConnectionGate(1, timeout=10)
    await gate.enter(WORK)
    order: list[str] = []
    first = asyncio.create_task(_waiter(gate, WORK, "first", order))
    second = asyncio.create_task(_waiter(gate, WORK, "second", order))
    await asyncio.sleep(0)
    gate.leave()  # hands the slot to "first"...
    first.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)
    assert order == ["second"]
    assert gate.in_use == 1


async def test_a_cancelled_waiter_is_skipped():
    gate = ConnectionGate(1, timeout=10)
    await gate.enter(WORK)
    order: list[str] = []
    gone = asyncio.create_task(_waiter(gate, LEASE, "gone", order))
    later = asyncio.create_task(_waiter(gate, START, "later", order))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    gate.leave()
    await asyncio.wait_for(later, 1)
    assert order == ["later"]


async def test_the_gate_follows_the_engines_pool(tmp_path):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/g.db", pool_size=3,
                                 max_overflow=2)
    try:
        gate = ConnectionGate.for_engine(engine, 0.5)
        assert gate is not None
        assert (gate.capacity, gate.timeout) == (5, 0.5)  # pool_size + max_overflow
    finally:
        await engine.dispose()
    unlimited = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/n.db", poolclass=NullPool)
    try:
        assert ConnectionGate.for_engine(unlimited, 1.0) is None
    finally:
        await unlimited.dispose()
