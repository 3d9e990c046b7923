"""The in-process circuit breaker's state machine, on a fake clock, and the Redis breaker's
fail-open behaviour on fake clients (the real Redis is in tests/integration)."""

from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from sagakit import (
    CircuitBreaker,
    CircuitBreakerProtocol,
    CircuitOpenError,
    CircuitState,
    RedisCircuitBreaker,
    SagaError,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_timeout=10.0, clock=clock)


async def fail(breaker: Any, times: int = 1, name: str = "Pay", error: Exception | None = None) -> None:
    for _ in range(times):
        await breaker.record_failure(name, error or ConnectionError("down"))


async def allowed(breaker: Any, name: str = "Pay") -> bool:
    try:
        await breaker.check(name)
    except CircuitOpenError:
        return False
    return True


# -- closed ---------------------------------------------------------------------------------------


async def test_a_new_circuit_is_closed_and_lets_calls_through(breaker):
    assert await breaker.state("Pay") is CLOSED
    assert await allowed(breaker)


async def test_failures_below_the_threshold_keep_it_closed(breaker):
    await fail(breaker, 2)
    assert await breaker.state("Pay") is CLOSED
    assert await allowed(breaker)


async def test_the_threshold_of_failures_in_a_row_opens_it(breaker):
    await fail(breaker, 3)
    assert await breaker.state("Pay") is OPEN
    assert not await allowed(breaker)


async def test_a_success_resets_the_failure_count(breaker):
    await fail(breaker, 2)
    await breaker.record_success("Pay")
    await fail(breaker, 2)
    assert await breaker.state("Pay") is CLOSED


async def test_excluded_exceptions_count_as_successes(clock):
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=10, exclude=(ValueError,), clock=clock)
    await fail(breaker, 1)
    await fail(breaker, 5, error=ValueError("business error"))
    assert await breaker.state("Pay") is CLOSED
    await fail(breaker, 1)
    assert await breaker.state("Pay") is CLOSED  # the ValueErrors reset the count
    await fail(breaker, 1)
    assert await breaker.state("Pay") is OPEN


# -- open -----------------------------------------------------------------------------------------


async def test_an_open_circuit_refuses_with_the_time_left(breaker, clock):
    await fail(breaker, 3)
    clock.now += 4
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.check("Pay")
    assert caught.value.circuit == "Pay"
    assert caught.value.step_name == "Pay"
    assert caught.value.retry_after == pytest.approx(6.0)
    assert "circuit 'Pay' is open" in str(caught.value)


async def test_failures_and_successes_while_open_change_nothing(breaker, clock):
    await fail(breaker, 3)
    clock.now += 5
    await fail(breaker, 3)  # late failures of calls let through before it opened
    await breaker.record_success("Pay")  # a late success
    assert await breaker.state("Pay") is OPEN
    clock.now += 5
    assert await allowed(breaker)  # still timed from the first opening


# -- half-open ------------------------------------------------------------------------------------


async def test_after_the_reset_timeout_one_trial_call_goes_through(breaker, clock):
    await fail(breaker, 3)
    clock.now += 10
    assert await allowed(breaker)
    assert await breaker.state("Pay") is HALF_OPEN
    with pytest.raises(CircuitOpenError, match="half-open"):
        await breaker.check("Pay")


async def test_a_successful_trial_closes_the_circuit(breaker, clock):
    await fail(breaker, 3)
    clock.now += 10
    assert await allowed(breaker)
    await breaker.record_success("Pay")
    assert await breaker.state("Pay") is CLOSED
    assert await allowed(breaker)
    await fail(breaker, 2)
    assert await breaker.state("Pay") is CLOSED  # the count started again from zero


async def test_a_failed_trial_opens_the_circuit_again_for_a_full_timeout(breaker, clock):
    await fail(breaker, 3)
    clock.now += 10
    assert await allowed(breaker)
    clock.now += 1
    await fail(breaker, 1)
    assert await breaker.state("Pay") is OPEN
    clock.now += 9.5
    assert not await allowed(breaker)
    clock.now += 0.5
    assert await allowed(breaker)


async def test_an_excluded_error_of_the_trial_closes_the_circuit(clock):
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=10, exclude=KeyError, clock=clock)
    await fail(breaker, 1)
    clock.now += 10
    assert await allowed(breaker)
    await fail(breaker, 1, error=KeyError("no such order"))
    assert await breaker.state("Pay") is CLOSED


async def test_a_trial_that_never_reports_is_given_up_after_another_timeout(breaker, clock):
    await fail(breaker, 3)
    clock.now += 10
    assert await allowed(breaker)  # the trial's process dies: no record_* ever comes
    clock.now += 9
    assert not await allowed(breaker)
    clock.now += 1
    assert await allowed(breaker)
    assert not await allowed(breaker)


async def test_concurrent_checks_let_exactly_one_trial_through(breaker, clock):
    await fail(breaker, 3)
    clock.now += 10
    outcomes = await asyncio.gather(*(allowed(breaker) for _ in range(20)))
    assert outcomes.count(True) == 1


# -- names, reset, settings -----------------------------------------------------------------------


async def test_each_name_has_its_own_circuit(breaker):
    await fail(breaker, 3, name="Pay")
    await fail(breaker, 2, name="Ship")
    assert await breaker.state("Pay") is OPEN
    assert await breaker.state("Ship") is CLOSED
    assert await allowed(breaker, "Ship")
    assert await allowed(breaker, "Reserve")


async def test_reset_closes_one_circuit_or_all(breaker):
    await fail(breaker, 3, name="Pay")
    await fail(breaker, 3, name="Ship")
    await breaker.reset("Pay")
    assert (await breaker.state("Pay"), await breaker.state("Ship")) == (CLOSED, OPEN)
    await breaker.reset()
    assert await breaker.state("Ship") is CLOSED


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 2.5}, "failure_threshold"),
        ({"reset_timeout": 0}, "reset_timeout"),
        ({"reset_timeout": -1}, "reset_timeout"),
        ({"reset_timeout": float("inf")}, "reset_timeout"),
    ],
)
def test_invalid_settings_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(**options)


def test_exclude_must_be_exception_classes():
    with pytest.raises(TypeError, match="exception classes"):
        CircuitBreaker(exclude=("ValueError",))  # type: ignore[arg-type]


def test_both_breakers_implement_the_protocol():
    assert isinstance(CircuitBreaker(), CircuitBreakerProtocol)
    assert isinstance(RedisCircuitBreaker(UnreachableRedis()), CircuitBreakerProtocol)
    assert not isinstance(object(), CircuitBreakerProtocol)


def test_circuit_open_error_is_a_saga_error_and_pickles():
    error = CircuitOpenError.refusing("Pay", OPEN, 2.5)
    assert isinstance(error, SagaError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.circuit, copy.retry_after, copy.step_name) == (
        error.message, "Pay", 2.5, "Pay",
    )


# -- RedisCircuitBreaker fails open ---------------------------------------------------------------


class UnreachableRedis:
    """Stands for a redis.asyncio client whose server is down (or hangs, with ``hang``)."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    def register_script(self, script: str) -> Any:
        async def call(keys: Any = (), args: Any = ()) -> Any:
            if self.hang:
                await asyncio.Event().wait()
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1")

        return call


@pytest.mark.parametrize("hang", [False, True], ids=["refused", "hanging"])
async def test_redis_breaker_fails_open_when_redis_is_unreachable(hang, caplog):
    breaker = RedisCircuitBreaker(UnreachableRedis(hang), failure_threshold=1, redis_timeout=0.05)
    with caplog.at_level(logging.WARNING, logger="sagakit"):
        await breaker.check("Pay")  # let through
        await breaker.record_failure("Pay", ConnectionError("down"))
        await breaker.check("Pay")  # the failure could not be counted: still let through
        await breaker.record_success("Pay")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    assert all("Redis unreachable" in m for m in messages)
    assert "fail-open" in messages[0]
