"""``Step(Handler, retry=..., timeout=..., compensate_timeout=..., pivot=...)``: an entry of a
saga's ``steps`` that gives a step handler other options inside this one saga.

A keyword left out keeps what the handler class says (see :class:`sagakit.SagaStepHandler`);
a keyword given wins over the handler's class attribute and, for ``retry``, over the saga's
default: ``Step(Ship, retry=None)`` runs ``Ship`` once in this saga even when the saga or the
handler sets a retry policy. ``Step(Ship)`` alone is the same as ``Ship``.

Example::

    class PatientOrderSaga(Saga[Order]):
        steps = [ReserveStock, ChargeCard, Step(ShipOrder, retry=Retry(attempts=5, delay=30))]

A :class:`sagakit.Fallback` entry's handlers keep their own class options.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from sagakit.exceptions import SagaDefinitionError
from sagakit.retry import Retry
from sagakit.saga import StepSpec
from sagakit.step import OPTION_NAMES, SagaStepHandler, check_option

__all__ = ["UNSET", "Step"]


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset.UNSET
"""A keyword of :class:`Step` that was not given (None is a value: "no retry", "no limit")."""


@dataclasses.dataclass(frozen=True)
class Step:
    """A saga step with options for this saga only. See the module documentation.

    Checked when built: ``handler`` a SagaStepHandler subclass (SagaDefinitionError);
    ``retry`` a :class:`sagakit.Retry` or None, ``pivot`` a bool (TypeError); ``timeout`` and
    ``compensate_timeout`` finite seconds > 0 or None (ValueError naming the option). The
    saga's class creation checks the rest (at most one pivot, ...)."""

    handler: type[SagaStepHandler[Any, Any]]
    _: dataclasses.KW_ONLY
    retry: Retry | _Unset | None = UNSET
    timeout: float | _Unset | None = UNSET
    compensate_timeout: float | _Unset | None = UNSET
    pivot: bool | _Unset = UNSET

    def __post_init__(self) -> None:
        handler = self.handler
        if not (isinstance(handler, type) and issubclass(handler, SagaStepHandler)):
            raise SagaDefinitionError(
                f"Step handler must be a SagaStepHandler subclass, got {handler!r:.80}"
            )
        where = f"Step({handler.__name__}) "
        for name in OPTION_NAMES:
            value = getattr(self, name)
            if value is not UNSET:
                object.__setattr__(self, name, check_option(where, name, value))

    def overrides(self) -> dict[str, Any]:
        """The options given, by name."""
        return {name: value for name in OPTION_NAMES
                if (value := getattr(self, name)) is not UNSET}

    def __repr__(self) -> str:
        given = "".join(f", {name}={value!r}" for name, value in self.overrides().items())
        return f"Step({self.handler.__name__}{given})"

    def to_step_spec(self) -> StepSpec:
        """The engine's view of this entry of ``Saga.steps``."""
        return StepSpec(self.handler, overrides=self.overrides())
