"""RedisCircuitBreaker against the real local Redis: state shared between processes (two clients
stand for two processes), half-open timing on the server's clock, atomic transitions, a saga
falling back because another instance opened the circuit, and fail-open when Redis is down.

Every test uses its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sagakit import (
    CircuitOpenError,
    CircuitState,
    Fallback,
    MemorySagaStorage,
    RedisCircuitBreaker,
    Saga,
    SagaStatus,
)
from tests.conftest import REDIS_URL, server_unavailable
from tests.unit.support import Ctx, Script, StepA, StepB, StepC, StepD, drive, transaction

pytestmark = pytest.mark.integration

OPEN, HALF_OPEN, CLOSED = CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    prefix = f"sagakit:test:{uuid.uuid4().hex}:"
    yield prefix
    client: Redis = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    except (RedisError, OSError):
        pass
    finally:
        await client.aclose()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[], Redis]]:
    """A factory of separate clients (each one stands for another process of the service)."""
    made: list[Redis] = []

    def make() -> Redis:
        client: Redis = Redis.from_url(REDIS_URL)
        made.append(client)
        return client

    try:
        await make().ping()
    except (RedisError, OSError) as exc:
        for client in made:
            await client.aclose()
        server_unavailable("Redis", exc)
    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def pair(clients: Callable[[], Redis], prefix: str) -> Callable[..., tuple[RedisCircuitBreaker, ...]]:
    def make(**options: Any) -> tuple[RedisCircuitBreaker, ...]:
        options.setdefault("key_prefix", prefix)
        return tuple(RedisCircuitBreaker(clients(), **options) for _ in range(2))

    return make


async def allowed(breaker: RedisCircuitBreaker, name: str = "Pay") -> bool:
    try:
        await breaker.check(name)
    except CircuitOpenError:
        return False
    return True


async def test_two_instances_see_the_same_open_circuit(pair):
    first, second = pair(failure_threshold=3, reset_timeout=60)
    await first.record_failure("Pay", ConnectionError("down"))
    await second.record_failure("Pay", ConnectionError("down"))
    assert await first.state("Pay") is CLOSED
    await first.record_failure("Pay", ConnectionError("down"))
    assert await second.state("Pay") is OPEN
    with pytest.raises(CircuitOpenError) as caught:
        await second.check("Pay")
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 60
    assert await allowed(second, "Ship")  # another name, another circuit


async def test_a_client_that_decodes_responses_works_too(clients, prefix):
    raw = RedisCircuitBreaker(clients(), failure_threshold=1, key_prefix=prefix)
    decoding = RedisCircuitBreaker(Redis.from_url(REDIS_URL, decode_responses=True),
                                   failure_threshold=1, key_prefix=prefix)
    try:
        await raw.record_failure("Pay", ConnectionError("down"))
        assert await decoding.state("Pay") is OPEN
        with pytest.raises(CircuitOpenError, match="is open"):
            await decoding.check("Pay")
    finally:
        await decoding.redis.aclose()


async def test_a_success_from_any_instance_resets_the_shared_count(pair):
    first, second = pair(failure_threshold=2)
    await first.record_failure("Pay", ConnectionError("down"))
    await second.record_success("Pay")
    await first.record_failure("Pay", ConnectionError("down"))
    assert await second.state("Pay") is CLOSED


async def test_excluded_errors_do_not_count(pair):
    first, _ = pair(failure_threshold=1, exclude=(ValueError,))
    await first.record_failure("Pay", ValueError("business error"))
    assert await first.state("Pay") is CLOSED


async def test_after_the_reset_timeout_one_instance_gets_the_trial(pair):
    first, second = pair(failure_threshold=1, reset_timeout=0.3)
    await first.record_failure("Pay", ConnectionError("down"))
    assert not await allowed(second)
    await asyncio.sleep(0.4)
    assert await allowed(second)
    assert await first.state("Pay") is HALF_OPEN
    assert not await allowed(first)  # the trial is under way in the other instance
    await second.record_success("Pay")
    assert await first.state("Pay") is CLOSED
    assert await allowed(first)


async def test_a_failed_trial_opens_the_circuit_for_everyone(pair):
    first, second = pair(failure_threshold=1, reset_timeout=0.3)
    await first.record_failure("Pay", ConnectionError("down"))
    await asyncio.sleep(0.4)
    assert await allowed(first)
    await first.record_failure("Pay", ConnectionError("still down"))
    assert await second.state("Pay") is OPEN
    assert not await allowed(second)


async def test_concurrent_checks_of_many_instances_let_exactly_one_trial_through(
    clients, prefix
):
    breakers = [RedisCircuitBreaker(clients(), failure_threshold=1, reset_timeout=0.3,
                                    key_prefix=prefix) for _ in range(4)]
    await breakers[0].record_failure("Pay", ConnectionError("down"))
    await asyncio.sleep(0.4)
    outcomes = await asyncio.gather(*(allowed(b) for b in breakers for _ in range(10)))
    assert outcomes.count(True) == 1


async def test_concurrent_failures_are_all_counted(pair):
    first, second = pair(failure_threshold=20)
    await asyncio.gather(*(b.record_failure("Pay", ConnectionError("x"))
                           for b in (first, second) for _ in range(10)))
    assert await first.state("Pay") is OPEN


async def test_opening_time_is_the_redis_servers_clock(pair, clients):
    first, _ = pair(failure_threshold=1)
    client = clients()
    await first.record_failure("Pay", ConnectionError("down"))
    seconds, micros = await client.time()
    opened_at = int(await client.hget(first.key("Pay"), "opened_at"))
    assert abs(seconds * 1000 + micros // 1000 - opened_at) < 5000


async def test_key_prefixes_keep_services_apart(clients, prefix):
    ours = RedisCircuitBreaker(clients(), failure_threshold=1, key_prefix=prefix + "a:")
    theirs = RedisCircuitBreaker(clients(), failure_threshold=1, key_prefix=prefix + "b:")
    await ours.record_failure("Pay", ConnectionError("down"))
    assert await allowed(theirs)
    await ours.reset("Pay")
    assert await allowed(ours)


async def test_a_saga_falls_back_when_another_instance_opened_the_circuit(pair):
    elsewhere, here = pair(failure_threshold=2, reset_timeout=60)
    await elsewhere.record_failure("StepB", ConnectionError("down"))
    await elsewhere.record_failure("StepB", ConnectionError("down"))

    class RedisGuarded(Saga[Ctx]):
        steps = [StepA, Fallback(step=StepB, fallback=StepD, circuit_breaker=here), StepC]

    script, storage = Script(), MemorySagaStorage()
    txn = transaction(RedisGuarded(), script, storage)
    results = await drive(txn)
    assert script.acts() == ["StepA", "StepD", "StepC"]
    assert txn.status is SagaStatus.COMPLETED
    assert results[1].step_name == "StepD"
    assert results[1].error_type == "sagakit.CircuitOpenError"
    log = await storage.get_step_history(txn.saga_id)
    assert (log[1].step_name, log[1].status.value, log[1].error_type) == (
        "StepB", "FAILED", "sagakit.CircuitOpenError",
    )


async def test_with_redis_unreachable_the_breaker_fails_open(prefix, caplog):
    client: Redis = Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens on port 1
    breaker = RedisCircuitBreaker(client, failure_threshold=1, key_prefix=prefix)

    class Guarded(Saga[Ctx]):
        steps = [StepA, Fallback(step=StepB, fallback=StepD, circuit_breaker=breaker), StepC]

    script, storage = Script(), MemorySagaStorage()
    try:
        with caplog.at_level(logging.WARNING, logger="sagakit"):
            await breaker.record_failure("StepB", ConnectionError("down"))
            await breaker.check("StepB")  # no error: fail-open
            await drive(transaction(Guarded(), script, storage))  # the primary runs
            script.fail("StepB", "act", ConnectionError("payments down"))
            await drive(transaction(Guarded(), script, storage))  # its error still hands over
        with pytest.raises((RedisError, OSError)):
            await breaker.state("StepB")  # inspection is not guarded: it says Redis is down
    finally:
        await client.aclose()
    assert script.acts() == ["StepA", "StepB", "StepC", "StepA", "StepB", "StepD", "StepC"]
    unreachable = [r.getMessage() for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert any("fail-open" in m for m in unreachable)
    assert len(unreachable) >= 5  # every check and record of the breaker said so


def test_the_example_tells_the_same_story_with_the_redis_breaker(clients):
    from tests.unit.test_fallback import example_story, run_example

    with_redis = run_example("--redis", REDIS_URL)
    assert with_redis[0].startswith("Circuit breaker: RedisCircuitBreaker")
    assert example_story(with_redis) == example_story(run_example())
