"""Resolving step handlers: a one-method container protocol and adapters for common DI tools.

Anything with ``async resolve(type) -> instance`` is a container. :func:`as_container` also
accepts, and wraps:

- ``None``: handlers are built by calling their class with no arguments;
- a mapping ``{HandlerClass: instance_or_factory}``;
- a callable ``factory(HandlerClass) -> instance`` (sync or async);
- a ``di.Container`` (the seed example's), a dishka ``AsyncContainer``, a
  ``dependency_injector`` container.

The orchestrator resolves each handler once per saga run, so the instance that ran ``act`` is
the one whose ``compensate`` runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

__all__ = [
    "CallableContainer",
    "Container",
    "DIContainer",
    "DependencyInjectorContainer",
    "DishkaContainer",
    "MappingContainer",
    "as_container",
]

T = TypeVar("T")


@runtime_checkable
class Container(Protocol):
    async def resolve(self, type_: type[T]) -> T: ...


class _Constructor:
    """No container: call the handler class with no arguments."""

    async def resolve(self, type_: type[T]) -> T:
        return type_()


class MappingContainer:
    """``{HandlerClass: instance_or_factory}``; a class missing from the mapping is constructed
    with no arguments. A factory (any callable value that is not an instance of the key) is
    called with no arguments, and may be async."""

    def __init__(self, mapping: Mapping[type[Any], Any]) -> None:
        self._mapping = mapping

    async def resolve(self, type_: type[T]) -> T:
        if type_ not in self._mapping:
            return type_()
        value = self._mapping[type_]
        if isinstance(value, type_):
            return value
        if callable(value):
            value = value()
            if inspect.isawaitable(value):
                value = await value
        return cast(T, value)


class CallableContainer:
    """``factory(HandlerClass) -> instance``, sync or async."""

    def __init__(self, factory: Callable[[type[Any]], Any]) -> None:
        self._factory = factory

    async def resolve(self, type_: type[T]) -> T:
        value = self._factory(type_)
        if inspect.isawaitable(value):
            value = await value
        return cast(T, value)


class DIContainer:
    """Adapter for the ``di`` package (install ``di[anyio]``)."""

    def __init__(self, container: Any, scope: str = "saga") -> None:
        self._container = container
        self._scope = scope
        self._solved: dict[type[Any], Any] = {}

    async def resolve(self, type_: type[T]) -> T:
        raise NotImplementedError  # filled in below by the DI adapters work


class DishkaContainer:
    """Adapter for a dishka ``AsyncContainer``."""

    def __init__(self, container: Any) -> None:
        self._container = container

    async def resolve(self, type_: type[T]) -> T:
        return cast(T, await self._container.get(type_))


class DependencyInjectorContainer:
    """Adapter for a ``dependency_injector`` container: the provider whose provided class is
    the handler class is called."""

    def __init__(self, container: Any) -> None:
        self._container = container

    async def resolve(self, type_: type[T]) -> T:
        raise NotImplementedError  # filled in below by the DI adapters work


def as_container(obj: Any) -> Container:
    """Wrap whatever the user passed as a container (see the module docstring)."""
    if obj is None:
        return _Constructor()
    if isinstance(obj, Container) and inspect.iscoroutinefunction(obj.resolve):
        return obj
    module = type(obj).__module__.split(".")[0]
    if module == "di":
        return DIContainer(obj)
    if module == "dishka":
        return DishkaContainer(obj)
    if module == "dependency_injector" or hasattr(obj, "providers"):
        return DependencyInjectorContainer(obj)
    if isinstance(obj, Mapping):
        return MappingContainer(obj)
    if callable(obj):
        return CallableContainer(obj)
    raise TypeError(
        f"cannot use {type(obj).__name__} as a container: pass an object with "
        "'async resolve(type)', a mapping, a factory callable, or a di/dishka/"
        "dependency-injector container"
    )
