"""The public names of ``sagakit`` and the exception tree."""

from __future__ import annotations

import importlib
import pickle
import uuid

import pytest

import sagakit

PUBLIC = [
    "CircuitBreaker",
    "CircuitBreakerProtocol",
    "CircuitOpenError",
    "CircuitState",
    "Container",
    "ContextJSON",
    "Fallback",
    "ISagaStorage",
    "LoggingMiddleware",
    "MemorySagaStorage",
    "Middleware",
    "PermanentError",
    "QueueSettings",
    "RecoveryOptions",
    "RecoveryOutcome",
    "RecoveryWorker",
    "RedisCircuitBreaker",
    "Retry",
    "RetryPolicy",
    "Saga",
    "SagaAction",
    "SagaBusyError",
    "SagaCompensator",
    "SagaConcurrencyError",
    "SagaContext",
    "SagaDefinitionError",
    "SagaError",
    "SagaLogFilter",
    "SagaLeaseLostError",
    "SagaLogEntry",
    "SagaMap",
    "SagaMediator",
    "SagaNotFoundError",
    "SagaParkedError",
    "SagaPastPivotError",
    "SagaRun",
    "SagaSerializationError",
    "SagaState",
    "SagaStatus",
    "SagaStepHandler",
    "SagaStepResult",
    "SagaStepStatus",
    "SagaStorage",
    "SagaStorageError",
    "SagaStorageRejectedError",
    "SagaStorageUnavailableError",
    "SagaStorageRun",
    "SagaTransaction",
    "SqlAlchemySagaStorage",
    "Step",
    "StepInvocation",
    "StepTimeoutError",
    "SubmittedSaga",
    "abort_saga",
    "as_container",
    "bootstrap",
    "current_invocation",
    "permanent",
    "recover_saga",
    "resume_saga",
    "submit",
]


def test_all_lists_exactly_the_public_names():
    assert sorted(sagakit.__all__) == sorted(PUBLIC)
    assert len(set(sagakit.__all__)) == len(sagakit.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_name_imports(name):
    module = importlib.import_module("sagakit")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from sagakit import {name}", namespace)
    assert namespace[name] is getattr(sagakit, name)


def test_seed_import_paths_work():
    from sagakit import bootstrap
    from sagakit.saga import Saga
    from sagakit.step import SagaStepHandler, SagaStepResult
    from sagakit.storage.memory import MemorySagaStorage

    assert callable(bootstrap.bootstrap)
    assert bootstrap.bootstrap is sagakit.bootstrap
    assert Saga is sagakit.Saga
    assert SagaStepHandler is sagakit.SagaStepHandler
    assert SagaStepResult is sagakit.SagaStepResult
    assert MemorySagaStorage is sagakit.MemorySagaStorage
    assert sagakit.ISagaStorage is sagakit.SagaStorage


ERRORS = [
    sagakit.CircuitOpenError,
    sagakit.SagaBusyError,
    sagakit.SagaConcurrencyError,
    sagakit.SagaDefinitionError,
    sagakit.SagaLeaseLostError,
    sagakit.SagaNotFoundError,
    sagakit.SagaParkedError,
    sagakit.SagaPastPivotError,
    sagakit.SagaSerializationError,
    sagakit.SagaStorageError,
    sagakit.SagaStorageRejectedError,
    sagakit.SagaStorageUnavailableError,
    sagakit.StepTimeoutError,
]


@pytest.mark.parametrize("error", ERRORS)
def test_every_error_is_a_saga_error(error):
    assert issubclass(error, sagakit.SagaError)
    assert issubclass(sagakit.SagaError, Exception)


def test_error_tree_details():
    assert issubclass(sagakit.SagaDefinitionError, TypeError)
    assert issubclass(sagakit.SagaSerializationError, TypeError)
    assert issubclass(sagakit.SagaNotFoundError, LookupError)
    assert issubclass(sagakit.SagaLeaseLostError, sagakit.SagaConcurrencyError)
    assert issubclass(sagakit.SagaStorageUnavailableError, sagakit.SagaStorageError)
    assert issubclass(sagakit.SagaStorageRejectedError, sagakit.SagaStorageError)
    assert issubclass(sagakit.StepTimeoutError, TimeoutError)
    assert not issubclass(sagakit.PermanentError, sagakit.SagaError)  # the user's own errors


def test_errors_keep_their_attributes_through_pickle():
    saga_id = uuid.uuid4()
    error = sagakit.SagaBusyError("busy", saga_id=saga_id, step_name="StepA", saga_name="S")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is sagakit.SagaBusyError
    assert (copy.message, copy.saga_id, copy.step_name, copy.saga_name) == (
        "busy", saga_id, "StepA", "S",
    )


def test_statuses_are_the_documented_ones():
    assert {s.value for s in sagakit.SagaStatus} == {
        "PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "FAILED", "PARKED", "WAITING",
    }
