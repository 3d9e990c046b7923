"""Circuit breakers for fallback steps: the protocol, its error, and the in-process breaker.

A breaker guards calls by *name* (a :class:`sagakit.Fallback` uses its primary step's name), so
one breaker object can protect several steps, each with its own circuit:

- **closed**: calls go through; ``failure_threshold`` failures in a row open the circuit.
- **open**: calls are refused with :class:`CircuitOpenError` (the fallback runs instead) until
  ``reset_timeout`` seconds have passed since the circuit opened.
- **half-open**: the first call after that is a trial and goes through; other calls are still
  refused while it runs. Its success closes the circuit, its failure opens it again. A trial
  that never reports back (its process died) is given up after another ``reset_timeout``.

Exceptions listed in ``exclude`` do not count as failures: they count as successes (the service
answered; the error is the caller's business), as in pybreaker, aiobreaker and purgatory.

:class:`sagakit.RedisCircuitBreaker` (module :mod:`sagakit.redis_breaker`) implements the same
state machine with its state in Redis, shared by every process of a service.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from sagakit import settings
from sagakit.exceptions import SagaError

__all__ = [
    "CIRCUIT_OPEN_ERROR_TYPE",
    "CircuitBreaker",
    "CircuitBreakerProtocol",
    "CircuitOpenError",
    "CircuitState",
    "exception_types",
]

CIRCUIT_OPEN_ERROR_TYPE = "sagakit.CircuitOpenError"
"""The ``error_type`` recorded (step log, step result) when an open circuit refused the call."""


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(SagaError):
    """The circuit of ``circuit`` is open (or half-open with its one trial call under way): the
    call was refused without being made. ``retry_after`` is the seconds until a trial call may
    go through, when known."""

    def __init__(
        self,
        message: str,
        *,
        circuit: str = "",
        retry_after: float | None = None,
        saga_id: Any = None,
        step_name: str | None = None,
        saga_name: str | None = None,
    ) -> None:
        super().__init__(
            message, saga_id=saga_id, step_name=step_name or circuit or None, saga_name=saga_name
        )
        self.circuit = circuit
        self.retry_after = retry_after

    @classmethod
    def refusing(cls, circuit: str, state: CircuitState, retry_after: float | None) -> CircuitOpenError:
        why = "is open" if state is CircuitState.OPEN else "is half-open and its trial call runs"
        after = f"; next trial in {retry_after:.3g}s" if retry_after is not None else ""
        return cls(f"circuit {circuit!r} {why}{after}", circuit=circuit, retry_after=retry_after)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.message, self.circuit, self.retry_after, self.saga_id,
                           self.step_name, self.saga_name))


def _rebuild(message: str, circuit: str, retry_after: float | None, saga_id: Any,
             step_name: str | None, saga_name: str | None) -> CircuitOpenError:
    return CircuitOpenError(message, circuit=circuit, retry_after=retry_after, saga_id=saga_id,
                            step_name=step_name, saga_name=saga_name)


@runtime_checkable
class CircuitBreakerProtocol(Protocol):
    """What :class:`sagakit.Fallback` needs from a circuit breaker.

    ``check(name)`` runs before each call of the guarded step and raises
    :class:`CircuitOpenError` when the call must not be made; it must not raise anything else
    (a breaker whose own backend is down decides for itself: see
    :class:`sagakit.RedisCircuitBreaker`). After the call, exactly one of ``record_success`` or
    ``record_failure`` is awaited (neither when the call was cut off by a cancellation or a
    crash). Errors raised by ``record_*`` are logged and ignored by the fallback.
    """

    async def check(self, name: str) -> None: ...

    async def record_success(self, name: str) -> None: ...

    async def record_failure(self, name: str, error: BaseException) -> None: ...


def exception_types(value: Any, what: str) -> tuple[type[BaseException], ...]:
    """``value`` (one exception class or an iterable of them) as a tuple; TypeError otherwise."""
    items: Iterable[Any] = (value,) if isinstance(value, type) else value
    try:
        found = tuple(items)
    except TypeError:
        raise TypeError(f"{what} must be exception classes, got {value!r}") from None
    for item in found:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{what} must be exception classes, got {item!r}")
    return found


def check_settings(failure_threshold: int, reset_timeout: float) -> float:
    """ValueError naming the option unless ``failure_threshold`` is an integer >= 1 and
    ``reset_timeout`` finite seconds > 0; returns ``reset_timeout`` as a float."""
    settings.count("failure_threshold", failure_threshold)
    return settings.seconds("reset_timeout", reset_timeout, exclusive=True)


@dataclasses.dataclass(slots=True)
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    trial_at: float = 0.0


class CircuitBreaker:
    """An in-process circuit breaker (state in this process's memory, one circuit per name).

    ``clock`` returns seconds (``time.monotonic`` by default; tests pass a fake). Safe for any
    number of tasks on one event loop: no transition awaits anything. ``failure_threshold`` is
    an integer >= 1, ``reset_timeout`` finite seconds > 0 (ValueError naming the option).
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 60.0,
        exclude: Iterable[type[BaseException]] | type[BaseException] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reset_timeout = check_settings(failure_threshold, reset_timeout)
        self.failure_threshold = failure_threshold
        self.exclude = exception_types(exclude, "exclude")
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def __repr__(self) -> str:
        return (f"CircuitBreaker(failure_threshold={self.failure_threshold}, "
                f"reset_timeout={self.reset_timeout})")

    async def check(self, name: str) -> None:
        """Let the call through, or raise CircuitOpenError. An open circuit past its
        ``reset_timeout`` turns half-open and lets this one call through as the trial."""
        circuit = self._circuits.get(name)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return
        now = self._clock()
        since = circuit.opened_at if circuit.state is CircuitState.OPEN else circuit.trial_at
        wait = since + self.reset_timeout - now
        if wait > 0:
            raise CircuitOpenError.refusing(name, circuit.state, wait)
        circuit.state = CircuitState.HALF_OPEN
        circuit.trial_at = now

    async def record_success(self, name: str) -> None:
        circuit = self._circuits.get(name)
        if circuit is None or circuit.state is CircuitState.OPEN:
            return  # a call let through before the circuit opened: it proves nothing now
        del self._circuits[name]  # closed, no failures

    async def record_failure(self, name: str, error: BaseException) -> None:
        if isinstance(error, self.exclude):
            await self.record_success(name)
            return
        circuit = self._circuits.setdefault(name, _Circuit())
        if circuit.state is CircuitState.OPEN:
            return
        circuit.failures += 1
        if circuit.state is CircuitState.HALF_OPEN or circuit.failures >= self.failure_threshold:
            circuit.state = CircuitState.OPEN
            circuit.opened_at = self._clock()

    async def state(self, name: str) -> CircuitState:
        """The circuit's state as last changed (an open circuit past its timeout stays OPEN
        until the next ``check`` makes it half-open)."""
        circuit = self._circuits.get(name)
        return CircuitState.CLOSED if circuit is None else circuit.state

    async def reset(self, name: str | None = None) -> None:
        """Close one circuit (or all of them) and forget its failures."""
        if name is None:
            self._circuits.clear()
        else:
            self._circuits.pop(name, None)
