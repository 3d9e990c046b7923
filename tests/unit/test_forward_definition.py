"""Forward recovery's definitions: Retry, permanent errors, step options (handler attributes,
Step(...), saga defaults) and the checks a saga class makes when it is created."""

from __future__ import annotations

import hashlib
import pickle
import random
import types
import uuid
from typing import Any

import pytest

from sagakit import (
    Fallback,
    PermanentError,
    Retry,
    RetryPolicy,
    Saga,
    SagaDefinitionError,
    SagaError,
    SagaPastPivotError,
    SagaStepHandler,
    Step,
    StepTimeoutError,
    permanent,
)
from sagakit.retry import is_permanent
from sagakit.saga import NO_OPTIONS, StepOptions
from tests.unit.support import Ctx, StepA, StepB, StepC, StepD, StepHandler


class Forward(SagaStepHandler[Ctx, None]):
    """A step with no compensate: allowed only after a pivot."""

    async def act(self, context: Ctx) -> None:
        pass


class Retried(Forward):
    retry = Retry(attempts=4, delay=0.5)
    timeout = 2
    compensate_timeout = 3.5


class Pivot(StepHandler):
    pivot = True


def saga(*steps: Any, **attributes: Any) -> type[Saga[Ctx]]:
    body = {"steps": list(steps), **attributes}
    return types.new_class("Defined", (Saga[Ctx],), exec_body=lambda ns: ns.update(body))


# -- Retry ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "Retry attempts must be an integer >= 1, got 0"),
        ({"attempts": 2.0}, "Retry attempts"),
        ({"delay": -1}, "Retry delay must be a finite number of seconds >= 0"),
        ({"delay": float("nan")}, "Retry delay"),
        ({"backoff": 0.5}, "Retry backoff must be a finite number >= 1"),
        ({"max_delay": float("inf")}, "Retry max_delay"),
        ({"jitter": 1.5}, "Retry jitter must be a finite number within [0, 1]"),
    ],
)
def test_retry_settings_are_checked_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        Retry(**kwargs)


@pytest.mark.parametrize("bad", ["ValueError", [ValueError, 3], 3, ValueError("x")])
def test_retry_error_classes_must_be_exception_classes(bad):
    with pytest.raises(TypeError, match="Retry retry_on must be exception classes"):
        Retry(retry_on=bad)
    with pytest.raises(TypeError, match="Retry give_up_on must be exception classes"):
        Retry(give_up_on=bad)


def test_retry_error_classes_are_kept_as_tuples_and_the_policy_is_hashable():
    retry = Retry(retry_on=ConnectionError, give_up_on=[ConnectionRefusedError])
    assert retry.retry_on == (ConnectionError,)
    assert retry.give_up_on == (ConnectionRefusedError,)
    assert hash(retry) == hash(Retry(retry_on=(ConnectionError,),
                                     give_up_on=(ConnectionRefusedError,)))


def test_retry_and_the_compensation_policy_share_one_backoff_formula():
    settings = {"delay": 1.5, "backoff": 3.0, "max_delay": 20.0, "jitter": 0.3}
    retry, policy = Retry(attempts=6, **settings), RetryPolicy(attempts=6, **settings)
    for draw in (0.0, 0.25, 0.99):
        assert [retry.wait_before(n, lambda d=draw: d) for n in range(2, 7)] == [
            policy.wait_before(n, rng=lambda d=draw: d) for n in range(2, 7)]
    assert Retry(delay=2, jitter=0.5).wait_before(2, lambda: 0.0) == 1.0
    assert Retry(delay=2, backoff=10, max_delay=5).wait_before(500, random.random) == 5.0
    assert Retry(delay=0, jitter=1).wait_before(9, lambda: 0.9) == 0.0


def test_permanent_marks_an_instance_and_returns_it():
    error = ValueError("declined")
    assert not is_permanent(error)
    assert permanent(error) is error
    assert is_permanent(error)
    assert is_permanent(PermanentError("no"))
    assert not is_permanent(ValueError("another"))
    with pytest.raises(TypeError, match="exception instance"):
        permanent(ValueError)  # type: ignore[type-var]


# -- errors -----------------------------------------------------------------------------------------


def test_step_timeout_error_names_the_saga_the_step_and_the_timeout():
    saga_id = uuid.uuid4()
    error = StepTimeoutError.expired(2.5, saga_id=saga_id, saga_name="OrderSaga",
                                     step_name="ShipOrder")
    assert isinstance(error, SagaError)
    assert isinstance(error, TimeoutError)
    assert str(error) == (f"saga 'OrderSaga' ({saga_id}): act of step 'ShipOrder' took longer "
                          f"than its timeout of 2.5 s")
    undo = StepTimeoutError.expired(1, action="compensate", step_name="S")
    assert "compensate of step 'S' took longer than its compensate_timeout of 1 s" in str(undo)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is StepTimeoutError
    assert (copy.timeout, copy.action, copy.saga_id, copy.step_name, copy.saga_name,
            str(copy)) == (2.5, "act", saga_id, "ShipOrder", "OrderSaga", str(error))


def test_past_pivot_error_is_a_saga_error():
    error = SagaPastPivotError("past its pivot", saga_name="S", step_name="Charge")
    assert isinstance(error, SagaError)
    assert (error.saga_name, error.step_name) == ("S", "Charge")


# -- Step(...) --------------------------------------------------------------------------------------


def test_step_keeps_only_the_options_given():
    step = Step(StepA, retry=None, timeout=3)
    assert step.overrides() == {"retry": None, "timeout": 3.0}
    assert repr(step) == "Step(StepA, retry=None, timeout=3.0)"
    assert repr(Step(StepA)) == "Step(StepA)"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"timeout": 0}, ValueError, r"Step\(StepA\) timeout must be a finite number of "
                                     r"seconds > 0, got 0"),
        ({"compensate_timeout": float("nan")}, ValueError, r"Step\(StepA\) compensate_timeout"),
        ({"timeout": "5"}, ValueError, r"Step\(StepA\) timeout"),
        ({"retry": 3}, TypeError, r"Step\(StepA\) retry must be a sagakit.Retry or None"),
        ({"pivot": 1}, TypeError, r"Step\(StepA\) pivot must be True or False"),
    ],
)
def test_step_options_are_checked_when_built(kwargs, error, message):
    with pytest.raises(error, match=message):
        Step(StepA, **kwargs)


def test_step_takes_a_handler_class():
    with pytest.raises(SagaDefinitionError, match="Step handler must be a SagaStepHandler"):
        Step(Fallback(step=StepA, fallback=StepB))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Step(StepA, Retry())  # type: ignore[misc]  # options are keywords


def test_a_bare_step_entry_is_the_handler_itself():
    plain, wrapped = saga(StepA, StepB), saga(Step(StepA), StepB)
    assert plain.fingerprint == wrapped.fingerprint
    assert [s.options(s.name) for s in wrapped.step_specs] == [NO_OPTIONS, NO_OPTIONS]


# -- resolved options -------------------------------------------------------------------------------


def test_handler_class_attributes_are_the_steps_options():
    defined = saga(Pivot, Retried)
    assert defined.step_specs[1].options("Retried") == StepOptions(
        Retry(attempts=4, delay=0.5), 2.0, 3.5)
    assert [s.pivot for s in defined.step_specs] == [True, False]
    assert defined.pivot_index == 0


def test_step_overrides_win_over_the_handler_and_the_saga_default():
    default = Retry(attempts=2, delay=0)
    mine = Retry(attempts=9)
    defined = saga(
        StepA,
        Step(StepB, retry=mine, compensate_timeout=1),
        Step(StepC, retry=None),
        Step(Pivot, pivot=False),
        Step(StepD, pivot=True),
        Step(Retried, timeout=None),
        retry=default,
    )
    options = {s.name: s.options(s.name) for s in defined.step_specs}
    assert options == {
        "StepA": StepOptions(default),  # the saga's default
        "StepB": StepOptions(mine, None, 1.0),  # Step(...)
        "StepC": NO_OPTIONS,  # Step(retry=None): one attempt, whatever the saga says
        "Pivot": StepOptions(default),
        "StepD": StepOptions(default),
        "Retried": StepOptions(Retry(attempts=4, delay=0.5), None, 3.5),  # handler, timeout off
    }
    assert [s.pivot for s in defined.step_specs] == [False] * 4 + [True, False]
    assert defined.pivot_index == 4


def test_a_fallbacks_handlers_keep_their_own_options():
    class Primary(StepHandler):
        timeout = 1.0

    class Alternative(StepHandler):
        retry = Retry(attempts=5)

    default = Retry(attempts=2)
    spec = saga(Fallback(step=Primary, fallback=Alternative), retry=default).step_specs[0]
    assert spec.options("Primary") == StepOptions(default, 1.0)
    assert spec.options("Alternative") == StepOptions(Retry(attempts=5))
    with pytest.raises(KeyError):
        spec.options("StepA")


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"retry": 3}, "retry must be a sagakit.Retry or None, got 3"),
        ({"timeout": -1}, "timeout must be a finite number of seconds > 0, got -1"),
        ({"compensate_timeout": float("inf")}, "compensate_timeout must be"),
        ({"pivot": "yes"}, "pivot must be True or False"),
    ],
)
def test_a_bad_handler_option_is_refused_naming_the_saga_and_the_step(attributes, message):
    bad = type("Bad", (StepHandler,), attributes)
    with pytest.raises(SagaDefinitionError, match=f"saga 'Defined': step 'Bad': {message}") as raised:
        saga(StepA, bad)
    assert (raised.value.saga_name, raised.value.step_name) == ("Defined", "Bad")


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"retry": 2}, "saga 'Defined': retry must be a sagakit.Retry or None"),
        ({"deadline": 0}, "saga 'Defined': deadline must be a finite number of seconds > 0"),
        ({"deadline": float("nan")}, "deadline"),
        ({"durable_wait": -1}, "saga 'Defined': durable_wait must be a finite number of "
                               "seconds >= 0"),
    ],
)
def test_bad_saga_options_are_refused(attributes, message):
    with pytest.raises(SagaDefinitionError, match=message):
        saga(StepA, **attributes)


def test_saga_options_default_and_are_kept_as_floats():
    assert (saga(StepA).retry, saga(StepA).deadline, saga(StepA).durable_wait) == (None, None, 5.0)
    defined = saga(StepA, deadline=30, durable_wait=0)
    assert (defined.deadline, defined.durable_wait) == (30.0, 0.0)
    assert type(defined.deadline) is float


# -- the definition checks --------------------------------------------------------------------------


def test_the_classic_taxonomy_is_accepted():
    defined = saga(StepA, Pivot, Retried, Step(Forward, retry=Retry(attempts=2)))
    assert defined.pivot_index == 1
    assert [s.pivot for s in defined.step_specs] == [False, True, False, False]


def test_at_most_one_pivot():
    with pytest.raises(SagaDefinitionError, match="steps 'Pivot' and 'StepC' are both marked "
                                                  "pivot: a saga has at most one") as raised:
        saga(StepA, Pivot, Step(StepC, pivot=True, retry=Retry()))
    assert raised.value.step_name == "StepC"


@pytest.mark.parametrize(("entry", "what"), [
    (Forward, "has no retry policy"),
    (Step(Retried, retry=None), "has no retry policy"),
    (Step(Retried, retry=Retry(attempts=1)), "allows a single attempt"),
])
def test_a_step_after_the_pivot_must_be_retriable(entry, what):
    with pytest.raises(SagaDefinitionError, match=f"comes after the pivot 'Pivot' and {what}"):
        saga(StepA, Pivot, entry)


def test_the_sagas_retry_makes_the_steps_after_the_pivot_retriable():
    defined = saga(StepA, Pivot, Forward, retry=Retry(attempts=2))
    assert defined.step_specs[2].options("Forward").retry == Retry(attempts=2)


def test_a_fallback_after_the_pivot_is_retriable_when_its_alternative_is():
    class Alternative(Retried):
        pass

    saga(Pivot, Fallback(step=StepA, fallback=Alternative))
    with pytest.raises(SagaDefinitionError, match="step 'Forward': comes after the pivot"):
        saga(Pivot, Fallback(step=StepA, fallback=Forward))


def test_a_fallbacks_primary_after_the_pivot_still_implements_compensate():
    with pytest.raises(SagaDefinitionError, match="step 'Forward': does not implement "
                                                  "compensate, which a fallback's primary must"):
        saga(Pivot, Fallback(step=Forward, fallback=Retried))


def test_every_step_of_a_saga_without_pivot_implements_compensate():
    with pytest.raises(SagaDefinitionError, match="saga 'Defined': step 'Forward': does not "
                                                  "implement compensate, which every step of a "
                                                  "saga without a pivot must") as raised:
        saga(StepA, Forward)
    assert (raised.value.saga_name, raised.value.step_name) == ("Defined", "Forward")


@pytest.mark.parametrize("steps", [
    (Forward, Pivot, Retried),  # before the pivot
    (StepA, Step(Retried, pivot=True), StepC),  # the pivot itself
    (StepA, Fallback(step=StepB, fallback=Forward), Pivot),  # a fallback's alternative
])
def test_steps_up_to_the_pivot_implement_compensate(steps):
    with pytest.raises(SagaDefinitionError, match="does not implement compensate, which every "
                                                  "step up to the pivot"):
        saga(*steps)


def test_an_inherited_compensate_counts():
    class Child(StepA):
        pass

    saga(Child)


@pytest.mark.parametrize("method", ["act", "compensate"])
def test_a_step_that_is_not_async_is_refused(method):
    def sync(self: Any, context: Any) -> None:
        return None

    bad = type("Sync", (StepHandler,), {method: sync})
    with pytest.raises(SagaDefinitionError, match=f"step 'Sync': {method} must be a coroutine "
                                                  "function"):
        saga(bad)
    with pytest.raises(SagaDefinitionError, match="coroutine function"):
        saga(Fallback(step=StepA, fallback=bad))


def test_a_wrapped_coroutine_function_is_accepted():
    import functools

    def logged(function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any) -> Any:
            return function(*args)
        return wrapper

    wrapped = type("Wrapped", (StepHandler,), {"act": logged(StepHandler.act)})
    saga(wrapped)


# -- the fingerprint --------------------------------------------------------------------------------


def test_the_fingerprint_of_a_saga_without_pivot_is_unchanged():
    expected = hashlib.sha256(b"StepA\nStepB|StepD\nStepC").hexdigest()[:16]
    assert saga(StepA, Fallback(step=StepB, fallback=StepD), StepC).fingerprint == expected


def test_the_pivot_is_part_of_the_fingerprint_retries_and_timeouts_are_not():
    plain = saga(StepA, StepB, Step(StepC, retry=Retry()))
    assert saga(StepA, StepB, StepC).fingerprint == plain.fingerprint
    assert saga(StepA, StepB, Step(StepC, timeout=9)).fingerprint == plain.fingerprint
    pivot_b = saga(StepA, Step(StepB, pivot=True), Step(StepC, retry=Retry()))
    pivot_a = saga(Step(StepA, pivot=True), Step(StepB, retry=Retry()), Step(StepC, retry=Retry()))
    assert len({plain.fingerprint, pivot_b.fingerprint, pivot_a.fingerprint}) == 3
