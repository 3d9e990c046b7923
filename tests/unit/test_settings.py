"""Every number a user passes is checked when it is given (sagakit.settings).

Property-based: for each constructor or call that takes a number, and any value at all (NaN,
+-infinity, negatives, huge and tiny floats, ints, bools, strings, None), either it raises
ValueError naming the option, or the value is finite and in the documented range. Accepted
values behave: retry and recovery waits are finite for any attempt number.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fractions
import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagakit import (
    CircuitBreaker,
    MemorySagaStorage,
    RecoveryOptions,
    RecoveryWorker,
    RedisCircuitBreaker,
    RetryPolicy,
    SagaNotFoundError,
    SagaStatus,
    SqlAlchemySagaStorage,
    abort_saga,
    bootstrap,
    recover_saga,
    resume_saga,
)
from sagakit import settings as checks
from sagakit.cli import EXIT_USAGE, build_parser, main
from sagakit.storage.group_commit import GroupCommitter
from tests.unit.support import Crash, Ctx, Script, ThreeStepSaga, drive, state, transaction

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Anything a caller might pass: floats of every kind (NaN, +-inf, subnormal, huge), ints of any
# size, bools, None, strings, fractions.
ANYTHING = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-3, max_value=70),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.fractions(max_denominator=10),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.1, 0.09999, 1e9, 1.000001e9,
                     5e-324, 1e308, 2**31 - 1, 2**31]),
)


# -- the rules, stated independently of sagakit.settings ----------------------------------------


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | fractions.Fraction):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def secs(minimum: float = 0.0, *, above: bool = False, none: bool = False) -> Callable[[Any], bool]:
    """Finite seconds >= minimum (> with ``above``), at most 1e9; None too with ``none``."""

    def rule(value: Any) -> bool:
        if value is None:
            return none
        number = _real(value)
        return number is not None and (number > minimum if above else number >= minimum) \
            and number <= 1e9

    return rule


def ints(minimum: int = 1, maximum: int | None = None, *, none: bool = False) -> Callable[[Any], bool]:
    def rule(value: Any) -> bool:
        if value is None:
            return none
        return (isinstance(value, int) and not isinstance(value, bool) and value >= minimum
                and (maximum is None or value <= maximum))

    return rule


def within(minimum: float, maximum: float | None = None) -> Callable[[Any], bool]:
    def rule(value: Any) -> bool:
        number = _real(value)
        return number is not None and number >= minimum and (maximum is None or number <= maximum)

    return rule


def accepted_or_named(build: Callable[[Any], object], option: str, rule: Callable[[Any], bool],
                      value: Any) -> bool:
    """Build with ``value``: a ValueError must name ``option``, an acceptance must fit ``rule``.
    Returns whether it was accepted."""
    refused: ValueError | None = None
    try:
        build(value)
    except ValueError as exc:
        refused = exc
    if refused is None:
        assert rule(value), f"{option}={value!r} was accepted but is out of range"
        return True
    assert option in str(refused), (option, value, str(refused))
    assert not rule(value), f"{option}={value!r} is in range but was refused: {refused}"
    return False


# -- the constructors -------------------------------------------------------------------------

LEASE = secs(0.1)
ATTEMPTS = ints(1, 2**31 - 1)

RETRY_OPTIONS = {  # transaction option -> (RetryPolicy field, rule)
    "compensation_retry_count": ("attempts", ints()),
    "compensation_retry_delay": ("delay", secs()),
    "compensation_retry_backoff": ("backoff", within(1.0)),
    "compensation_retry_max_delay": ("max_delay", secs()),
    "compensation_retry_jitter": ("jitter", within(0.0, 1.0)),
}
TRANSACTION_OPTIONS = {
    **{name: rule for name, (_, rule) in RETRY_OPTIONS.items()},
    "lease_seconds": LEASE,
    "max_recovery_attempts": ATTEMPTS,
}


@pytest.mark.parametrize(("option", "field"), [(k, f) for k, (f, _) in RETRY_OPTIONS.items()])
@FAST
@given(value=ANYTHING)
def test_retry_policy(option: str, field: str, value: Any) -> None:
    rule = RETRY_OPTIONS[option][1]
    accepted_or_named(lambda v: RetryPolicy(**{field: v}), option, rule, value)
    accepted_or_named(lambda v: RetryPolicy.of(**{**_DEFAULT_POLICY, field: v}), option, rule,
                      value)


_DEFAULT_POLICY = {f.name: f.default for f in dataclasses.fields(RetryPolicy)}


@pytest.mark.parametrize("option", sorted(TRANSACTION_OPTIONS))
@FAST
@given(value=ANYTHING)
def test_transaction_options(option: str, value: Any) -> None:
    storage = MemorySagaStorage()
    accepted_or_named(
        lambda v: ThreeStepSaga().transaction(context=Ctx(), storage=storage, **{option: v}),
        option, TRANSACTION_OPTIONS[option], value)
    # the mediator checks them at bootstrap, not at the first saga
    accepted_or_named(lambda v: bootstrap(saga_storage=storage, **{option: v}), option,
                      TRANSACTION_OPTIONS[option], value)


RECOVERY_CALLS = {
    recover_saga: {**TRANSACTION_OPTIONS},
    resume_saga: {k: TRANSACTION_OPTIONS[k] for k in
                  ("compensation_retry_count", "compensation_retry_delay", "lease_seconds")},
    abort_saga: {k: TRANSACTION_OPTIONS[k] for k in
                 ("compensation_retry_count", "compensation_retry_delay", "lease_seconds")},
}


@pytest.mark.parametrize(
    ("call", "option"),
    [(call, option) for call, options in RECOVERY_CALLS.items() for option in sorted(options)],
    ids=lambda item: getattr(item, "__name__", str(item)),
)
@settings(max_examples=25, deadline=None)
@given(value=ANYTHING)
def test_recovery_calls(call: Any, option: str, value: Any) -> None:
    """Checked before the storage is read: an accepted value gets as far as looking the
    (missing) saga up."""

    def run(v: Any) -> None:
        with pytest.raises(SagaNotFoundError):
            asyncio.run(call(ThreeStepSaga, uuid.uuid4(), Ctx, Script().container,
                             MemorySagaStorage(), **{option: v}))

    accepted_or_named(run, option, RECOVERY_CALLS[call][option], value)


RECOVERY_OPTIONS = {
    "lease_seconds": LEASE,
    "max_recovery_attempts": ATTEMPTS,
    "backoff": secs(),
    "backoff_max": secs(),
}


@pytest.mark.parametrize("option", sorted(RECOVERY_OPTIONS))
@FAST
@given(value=ANYTHING)
def test_recovery_options(option: str, value: Any) -> None:
    accepted_or_named(lambda v: RecoveryOptions(**{option: v}), option,
                      RECOVERY_OPTIONS[option], value)


WORKER_OPTIONS = {
    "concurrency": ints(),
    "poll_interval": secs(above=True),
    "batch_size": ints(none=True),
    "stale_after_seconds": secs(none=True),
    "shutdown_timeout": secs(),
    "max_idle_poll": secs(1.0, none=True),  # at least poll_interval (1 s by default)
    "failover_poll": secs(above=True),
}


@pytest.mark.parametrize("option", sorted(WORKER_OPTIONS))
@FAST
@given(value=ANYTHING)
def test_recovery_worker(option: str, value: Any) -> None:
    accepted_or_named(lambda v: RecoveryWorker(MemorySagaStorage(), [ThreeStepSaga],
                                               **{option: v}),
                      option, WORKER_OPTIONS[option], value)


@pytest.mark.parametrize("option",
                         ["max_batch", "max_in_flight", "max_batch_bytes", "parallel", "min_part"])
@FAST
@given(value=ANYTHING)
def test_group_commit(option: str, value: Any) -> None:
    storage = SqlAlchemySagaStorage.from_url("sqlite+aiosqlite://")  # connects to nothing
    accepted_or_named(lambda v: GroupCommitter(storage, **{option: v}), option, ints(), value)


@FAST
@given(value=ANYTHING)
def test_max_context_bytes(value: Any) -> None:
    accepted_or_named(
        lambda v: SqlAlchemySagaStorage.from_url("sqlite+aiosqlite://", max_context_bytes=v),
        "max_context_bytes", ints(), value)


@FAST
@given(value=ANYTHING)
def test_acquire_timeout(value: Any) -> None:
    accepted_or_named(
        lambda v: SqlAlchemySagaStorage.from_url("sqlite+aiosqlite://", acquire_timeout=v),
        "acquire_timeout", secs(above=True), value)


BREAKER_OPTIONS = {"failure_threshold": ints(), "reset_timeout": secs(above=True)}


@pytest.mark.parametrize("option", sorted(BREAKER_OPTIONS))
@FAST
@given(value=ANYTHING)
def test_circuit_breakers(option: str, value: Any) -> None:
    from redis.asyncio import Redis

    client = Redis()  # built, never connected: construction talks to no server
    rule = BREAKER_OPTIONS[option]
    accepted_or_named(lambda v: CircuitBreaker(**{option: v}), option, rule, value)
    accepted_or_named(lambda v: RedisCircuitBreaker(client, **{option: v}), option, rule, value)


@FAST
@given(value=ANYTHING)
def test_redis_timeout(value: Any) -> None:
    from redis.asyncio import Redis

    accepted_or_named(lambda v: RedisCircuitBreaker(Redis(), redis_timeout=v), "redis_timeout",
                      secs(above=True, none=True), value)


# -- accepted values behave ---------------------------------------------------------------------

FLOATS = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=80, deadline=None)
@given(delay=FLOATS, backoff=FLOATS, max_delay=FLOATS, jitter=FLOATS)
def test_every_accepted_retry_policy_waits_a_finite_time(
    delay: float, backoff: float, max_delay: float, jitter: float
) -> None:
    try:
        policy = RetryPolicy(attempts=1000, delay=delay, backoff=backoff, max_delay=max_delay,
                             jitter=jitter)
    except ValueError:
        return
    for attempt in range(2, 1001):
        wait = policy.wait_before(attempt)
        assert math.isfinite(wait), attempt
        assert 0 <= wait <= max_delay * (1 + jitter), (attempt, wait)


@settings(max_examples=80, deadline=None)
@given(backoff=FLOATS, backoff_max=FLOATS,
       attempts=st.one_of(st.integers(0, 5000), st.integers(0, 2**31 - 1)))
def test_every_accepted_recovery_backoff_is_finite(
    backoff: float, backoff_max: float, attempts: int
) -> None:
    try:
        options = RecoveryOptions(backoff=backoff, backoff_max=backoff_max)
    except ValueError:
        return
    wait = options.wait_after(attempts)
    assert math.isfinite(wait)
    assert 0 <= wait <= backoff_max


@FAST
@given(value=ANYTHING, name=st.sampled_from(["a", "some_option"]))
def test_the_checks_return_the_number_they_accepted(value: Any, name: str) -> None:
    for check, rule in [
        (lambda v: checks.seconds(name, v), secs()),
        (lambda v: checks.seconds(name, v, minimum=2.5, exclusive=True), secs(2.5, above=True)),
        (lambda v: checks.count(name, v, minimum=0), ints(0)),
        (lambda v: checks.fraction(name, v), within(0.0, 1.0)),
    ]:
        if accepted_or_named(check, name, rule, value):
            assert float(check(value)) == float(value)


# -- the concrete reports -----------------------------------------------------------------------


def test_a_nan_retry_delay_is_refused_when_the_transaction_is_built(storage, script) -> None:
    # It used to be accepted, and the retry loop then slept NaN seconds: no wait at all.
    with pytest.raises(ValueError, match="compensation_retry_delay must be a finite number"):
        transaction(ThreeStepSaga(), script, storage, compensation_retry_delay=math.nan)
    with pytest.raises(ValueError, match="compensation_retry_max_delay"):
        RetryPolicy(max_delay=math.nan)


@pytest.mark.parametrize("lease", [0, 0.0, 0.05, -1, math.nan, math.inf, 1e12])
def test_a_lease_too_short_to_outlast_a_checkpoint_or_not_finite_is_refused(
    storage, script, lease
) -> None:
    with pytest.raises(ValueError, match=r"lease_seconds must be"):
        transaction(ThreeStepSaga(), script, storage, lease_seconds=lease)
    with pytest.raises(ValueError, match=r"lease_seconds must be"):
        RecoveryOptions(lease_seconds=lease)


def test_the_shortest_lease_is_a_tenth_of_a_second(storage, script) -> None:
    assert transaction(ThreeStepSaga(), script, storage, lease_seconds=0.1).lease_seconds == 0.1
    assert checks.MIN_LEASE_SECONDS == 0.1
    with pytest.raises(ValueError, match=r"lease_seconds must be a finite number of seconds "
                                         r">= 0.1, got nan"):
        transaction(ThreeStepSaga(), script, storage, lease_seconds=math.nan)


@pytest.mark.parametrize("backoff", [-1, -0.001, math.nan, -math.inf])
def test_a_negative_recovery_backoff_is_refused(backoff) -> None:
    with pytest.raises(ValueError, match="backoff"):
        RecoveryOptions(backoff=backoff)
    with pytest.raises(ValueError, match="backoff_max"):
        RecoveryOptions(backoff_max=backoff)


@pytest.mark.parametrize("backoff", [-2.0, 0.5, math.nan])
def test_a_compensation_backoff_below_one_is_refused(storage, script, backoff) -> None:
    with pytest.raises(ValueError, match="compensation_retry_backoff"):
        transaction(ThreeStepSaga(), script, storage, compensation_retry_backoff=backoff)


async def test_recovery_with_a_bad_number_touches_nothing(storage, script) -> None:
    saga_id = uuid.uuid4()
    script.fail("StepB", "act", Crash())
    with pytest.raises(Crash):
        await drive(transaction(ThreeStepSaga(), script, storage, saga_id=saga_id))
    before = await state(storage, saga_id)
    for call, option, value in [(recover_saga, "lease_seconds", math.nan),
                                (recover_saga, "max_recovery_attempts", True),
                                (recover_saga, "compensation_retry_jitter", math.inf),
                                (resume_saga, "lease_seconds", 0),
                                (abort_saga, "compensation_retry_delay", -1)]:
        with pytest.raises(ValueError, match=option):
            await call(ThreeStepSaga, saga_id, Ctx, script.container, storage, **{option: value})
    assert await state(storage, saga_id) == before
    assert script.acts() == ["StepA", "StepB"]


def test_bootstrap_checks_the_transaction_options_at_once() -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        bootstrap(lease_seconds=math.nan)
    with pytest.raises(ValueError, match="compensation_retry_count"):
        bootstrap(compensation_retry_count=0)
    with pytest.raises(TypeError, match="lease_secnds"):
        bootstrap(lease_secnds=10)
    assert bootstrap(lease_seconds=10, compensation_retry_jitter=0.5).options == {
        "lease_seconds": 10, "compensation_retry_jitter": 0.5}


def test_a_cached_policy_does_not_let_a_bool_or_a_nan_through() -> None:
    assert RetryPolicy.of(1, 1.0, 2.0, 60.0, 0.0).attempts == 1
    with pytest.raises(ValueError, match="compensation_retry_count"):
        RetryPolicy.of(True, 1.0, 2.0, 60.0, 0.0)  # True == 1 and hashes alike
    nan = math.nan
    for _ in range(2):  # the same NaN object twice: never served from the cache
        with pytest.raises(ValueError, match="compensation_retry_delay"):
            RetryPolicy.of(3, nan, 2.0, 60.0, 0.0)
    with pytest.raises(ValueError, match="compensation_retry_delay"):
        RetryPolicy.of(3, [1.0], 2.0, 60.0, 0.0)  # type: ignore[arg-type]  # unhashable


@pytest.mark.parametrize(("option", "value"), [
    ("concurrency", 0), ("concurrency", 2.0), ("poll_interval", 0), ("poll_interval", math.nan),
    ("batch_size", 0), ("stale_after_seconds", math.inf), ("stale_after_seconds", -1),
    ("shutdown_timeout", -1), ("shutdown_timeout", math.nan),
])
def test_bad_worker_settings_are_refused(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=option):
        RecoveryWorker(MemorySagaStorage(), [ThreeStepSaga], **{option: value})


def test_a_worker_without_batch_size_lists_four_per_slot() -> None:
    assert RecoveryWorker(MemorySagaStorage(), [ThreeStepSaga], concurrency=3).batch_size == 12


async def test_an_accepted_policy_still_retries(storage, script) -> None:
    script.fail("StepA", "compensate", RuntimeError("once"))
    script.fail("StepC", "act", RuntimeError("no"))
    txn = transaction(ThreeStepSaga(), script, storage, compensation_retry_delay=5e-324,
                      compensation_retry_backoff=1e308, compensation_retry_max_delay=0.001,
                      compensation_retry_jitter=1)
    with pytest.raises(RuntimeError, match="no"):
        await drive(txn)
    assert txn.status is SagaStatus.FAILED
    assert script.compensations().count("StepA") == 2


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "flag"), [
    (["recover", "--lease-seconds", "nan", "x"], "--lease-seconds"),
    (["recover", "--lease-seconds", "0", "x"], "--lease-seconds"),
    (["recover", "--max-attempts", "0", "x"], "--max-attempts"),
    (["recover", "--all", "--concurrency", "0"], "--concurrency"),
    (["recover", "--all", "--stale-after", "-inf"], "--stale-after"),
    (["worker", "--poll-interval", "-1"], "--poll-interval"),
    (["worker", "--poll-interval", "0"], "--poll-interval"),
    (["worker", "--stale-after", "inf"], "--stale-after"),
    (["worker", "--shutdown-timeout", "nan"], "--shutdown-timeout"),
    (["worker", "--lease-seconds", "1e300"], "--lease-seconds"),
    (["worker", "--concurrency", "-3"], "--concurrency"),
    (["resume", "x", "--lease-seconds", "-5"], "--lease-seconds"),
    (["abort", "x", "--lease-seconds", "infinity"], "--lease-seconds"),
    (["list", "--limit", "0"], "--limit"),
    (["worker", "--poll-interval", "soon"], "--poll-interval"),
])
def test_bad_numeric_flags_are_usage_errors(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_USAGE
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"sagakit {argv[0]}: error: ")
    assert flag in error


def test_good_numeric_flags_are_parsed() -> None:
    args = build_parser().parse_args(
        ["worker", "--poll-interval", "0.5", "--stale-after", "0", "--shutdown-timeout", "0",
         "--lease-seconds", "0.1", "--max-attempts", "7", "--concurrency", "2"])
    assert (args.poll_interval, args.stale_after, args.shutdown_timeout, args.lease_seconds,
            args.max_attempts, args.concurrency) == (0.5, 0.0, 0.0, 0.1, 7, 2)
    defaults = build_parser().parse_args(["worker"])
    assert (defaults.poll_interval, defaults.stale_after, defaults.lease_seconds) == (1.0, None,
                                                                                     30.0)


def test_a_too_long_table_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--url", "sqlite+aiosqlite://", "list", "--executions-table", "e" * 46])
    assert code == EXIT_USAGE
    error = capsys.readouterr().err
    assert "executions_table" in error
    assert "at most 45 characters" in error
