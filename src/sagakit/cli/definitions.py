"""Saga definitions named on the command line (``--saga module:Class``, ``--import module``),
and contexts given as JSON (``--context``).

Everything here fails with a :class:`~sagakit.cli.exits.CliError` (exit code 2) that says what
could not be loaded and why, before anything touches the database.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
from typing import Any

from sagakit.cli.exits import CliError, one_line
from sagakit.context import codec_for
from sagakit.exceptions import SagaSerializationError
from sagakit.records import SagaState
from sagakit.saga import Saga

__all__ = ["SagaClass", "decode_context", "definition_for", "definitions", "load_saga",
           "require_definitions"]

SagaClass = type[Saga[Any]]


def _import(module_name: str) -> types.ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise CliError(f"cannot import module {module_name!r}: no module named {missing!r} "
                           f"(run from the directory that contains it, or set PYTHONPATH)"
                           ) from None
        raise CliError(f"importing {module_name!r} failed: {one_line(exc)}") from None
    except Exception as exc:
        raise CliError(f"importing {module_name!r} failed: {type(exc).__name__}: "
                       f"{one_line(exc)}") from None


def load_saga(spec: str) -> SagaClass:
    """The saga class named by ``module:Class`` (``module:Outer.Inner`` for a nested class).
    Raises :class:`CliError` (exit code 2) when it cannot be loaded or is not a saga."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"bad saga {spec!r}: expected module:SagaClass, "
                       "e.g. myapp.sagas:OrderSaga")
    found: Any = _import(module_name)
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CliError(f"bad saga {spec!r}: module {module_name!r} has no attribute "
                           f"{attribute!r}") from None
    if not (isinstance(found, type) and issubclass(found, Saga)) or found is Saga:
        raise CliError(f"bad saga {spec!r}: {attribute} is not a sagakit.Saga subclass")
    return found


def _sagas_in(module: types.ModuleType) -> list[SagaClass]:
    return [value for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, Saga) and value is not Saga]


def definitions(args: argparse.Namespace) -> list[SagaClass]:
    """The sagas named by ``--saga`` and those found in ``--import`` modules, one per name."""
    found: list[SagaClass] = [load_saga(spec) for spec in getattr(args, "saga", None) or ()]
    for module_name in getattr(args, "imports", None) or ():
        found.extend(_sagas_in(_import(module_name)))
    by_name: dict[str, SagaClass] = {}
    for saga in found:
        other = by_name.setdefault(saga.name, saga)
        if other is not saga:
            raise CliError(f"two saga definitions are named {saga.name!r}: "
                           f"{_qualname(other)} and {_qualname(saga)}")
    return list(by_name.values())


def require_definitions(args: argparse.Namespace) -> list[SagaClass]:
    """:func:`definitions`, at least one (else a usage error)."""
    sagas = definitions(args)
    if not sagas:
        raise CliError("no saga definition given: pass --saga module:SagaClass "
                       "(or --import module)")
    return sagas


def definition_for(args: argparse.Namespace, state: SagaState) -> SagaClass:
    """The definition given for a stored saga, matched by its stored name."""
    sagas = definitions(args)
    for saga in sagas:
        if saga.name == state.name:
            return saga
    if not sagas:
        raise CliError(f"saga {state.saga_id} is a {state.name!r} saga: pass --saga "
                       "module:SagaClass for it (or --import the module that defines it)")
    names = ", ".join(repr(s.name) for s in sagas)
    raise CliError(f"saga {state.saga_id} is a {state.name!r} saga; no definition given has "
                   f"that name (given: {names})")


def _qualname(saga: SagaClass) -> str:
    return f"{saga.__module__}:{saga.__qualname__}"


def decode_context(saga: SagaClass, text: str, option: str = "--context") -> Any:
    """The context of a ``saga`` given as a JSON object: built as the saga's context type
    (a dict for a saga without one). A usage error naming ``option`` when the text is not
    JSON, not an object, or does not fit the type (a missing field, an unknown key, a value of
    the wrong type)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CliError(f"bad {option}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"bad {option}: expected a JSON object, got {type(data).__name__}")
    try:
        return codec_for(saga.context_type or dict).decode(data)
    except SagaSerializationError as exc:
        problem = one_line(exc).replace("stored context", "the context", 1)
        raise CliError(f"bad {option} for saga {saga.name!r}: {problem}") from None
