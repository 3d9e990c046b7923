"""sagakit: durable sagas for asyncio Python.

A saga is an ordered list of steps sharing one context; each step can act and compensate. A
:class:`SagaTransaction` runs the steps in order and, when one fails, compensates the completed
ones in reverse. State is checkpointed to a storage after every step, so a saga cut off by a
crash is finished by recovery under Strict Backward Recovery.
"""

from typing import TYPE_CHECKING, Any

from sagakit.breaker import CircuitBreaker, CircuitBreakerProtocol, CircuitOpenError, CircuitState
from sagakit.compensator import RetryPolicy, SagaCompensator
from sagakit.container import Container, as_container
from sagakit.context import SagaContext
from sagakit.exceptions import (
    SagaBusyError,
    SagaConcurrencyError,
    SagaDefinitionError,
    SagaError,
    SagaLeaseLostError,
    SagaNotFoundError,
    SagaParkedError,
    SagaPastPivotError,
    SagaSerializationError,
    SagaStorageError,
    SagaStorageRejectedError,
    SagaStorageUnavailableError,
    StepTimeoutError,
)
from sagakit.fallback import Fallback
from sagakit.invocation import StepInvocation, current_invocation
from sagakit.mediator import SagaMap, SagaMediator, bootstrap
from sagakit.middleware import LoggingMiddleware, Middleware, SagaLogFilter, SagaRun
from sagakit.queue import QueueSettings
from sagakit.records import (
    ContextJSON,
    SagaAction,
    SagaLogEntry,
    SagaState,
    SagaStatus,
    SagaStepStatus,
)
from sagakit.recovery import RecoveryOptions, abort_saga, recover_saga, resume_saga
from sagakit.retry import PermanentError, Retry, permanent
from sagakit.saga import Saga
from sagakit.step import SagaStepHandler, SagaStepResult
from sagakit.stepoptions import Step
from sagakit.storage import ISagaStorage, MemorySagaStorage, SagaStorage, SagaStorageRun
from sagakit.submission import SubmittedSaga, submit
from sagakit.transaction import SagaTransaction
from sagakit.worker import RecoveryOutcome, RecoveryWorker

if TYPE_CHECKING:
    from sagakit.redis_breaker import RedisCircuitBreaker
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__version__ = "0.1.0"

__all__ = [
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
    "SagaLeaseLostError",
    "SagaLogEntry",
    "SagaLogFilter",
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
    "SagaStorageRun",
    "SagaStorageUnavailableError",
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


def __getattr__(name: str) -> Any:
    # Imported lazily: sagakit with the memory storage never imports SQLAlchemy (nor redis).
    if name == "RedisCircuitBreaker":
        from sagakit.redis_breaker import RedisCircuitBreaker

        return RedisCircuitBreaker
    if name == "SqlAlchemySagaStorage":
        from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

        return SqlAlchemySagaStorage
    raise AttributeError(f"module 'sagakit' has no attribute {name!r}")
