"""Resolving step handlers: a one-method container protocol and adapters for common DI tools.

Anything with ``async resolve(type) -> instance`` is a container. :func:`as_container` also
accepts, and wraps:

- ``None``: handlers are built by calling their class with no arguments;
- a mapping ``{HandlerClass: instance_or_factory}``;
- a callable ``factory(HandlerClass) -> instance`` (sync or async);
- a ``di.Container`` (the seed example's), a dishka ``AsyncContainer`` or ``Container``, a
  ``dependency_injector`` container (instance or ``DeclarativeContainer`` class).

The orchestrator resolves each handler once per saga run, so the instance that ran ``act`` is
the one whose ``compensate`` runs.
"""

from __future__ import annotations

import inspect
import sys
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


_CONSTRUCTOR = _Constructor()


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
    """Adapter for a ``di.Container`` (install ``sagakit[di]``, which pulls ``di[anyio]``).

    A handler class is solved once (the solved graph is cached per class, so a bind added after
    a class was first resolved does not apply to it) and executed with di's ``AsyncExecutor`` in
    a fresh ``scope``. Constructor parameters are autowired from their type annotations; an
    interface bound with ``container.bind(di.bind_by_type(Dependent(Impl, scope=...), Iface))``
    gets the implementation. Dependencies without a scope of their own get ``scope``.

    The scope is exited as soon as the handler is built, so a yield (context-manager) dependency
    is torn down before the handler runs: give handlers plain or async-function dependencies.
    di's errors propagate: ``WiringError`` for a parameter with no annotation, marker or
    default; ``UnknownScopeError`` for a dependency declared in another scope; the constructor's
    own ``TypeError`` for an abstract interface that was not bound; ``ImportError`` (from di)
    when anyio is missing.
    """

    def __init__(self, container: Any, scope: str = "saga") -> None:
        self._container = container
        self._scope = scope
        self._solved: dict[type[Any], Any] = {}

    async def resolve(self, type_: type[T]) -> T:
        from di.dependent import Dependent
        from di.executors import AsyncExecutor

        solved = self._solved.get(type_)
        if solved is None:
            solved = self._container.solve(
                Dependent(type_, scope=self._scope),
                scopes=[self._scope],
                scope_resolver=self._scope_of,
            )
            self._solved[type_] = solved
        async with self._container.enter_scope(self._scope) as state:
            return cast(T, await solved.execute_async(AsyncExecutor(), state))

    def _scope_of(self, dependent: Any, sub_scopes: Any, solver_scopes: Any) -> Any:
        return self._scope if dependent.scope is None else dependent.scope


class DishkaContainer:
    """Adapter for a dishka ``AsyncContainer`` (``await get``) or sync ``Container`` (``get``).

    Pass the container whose scope provides the handlers, usually a REQUEST-scope child
    (``async with root() as request: ...``): a root (APP-scope) container cannot see
    REQUEST-scoped factories. A class with no reachable factory raises dishka's
    ``NoFactoryError``, whose message names the class and the scope searched.
    """

    def __init__(self, container: Any) -> None:
        self._container = container
        self._is_async = inspect.iscoroutinefunction(container.get)

    async def resolve(self, type_: type[T]) -> T:
        if self._is_async:
            return cast(T, await self._container.get(type_))
        return cast(T, self._container.get(type_))


class DependencyInjectorContainer:
    """Adapter for a ``dependency_injector`` container (instance, or a ``DeclarativeContainer``
    class): calls the ``Factory``/``Singleton`` provider (nested containers included) whose
    provided class is the handler class, or else the only one providing a subclass of it.

    Overrides are honoured (the original provider is called, and delegates to its override).
    A provider that returns an awaitable (async dependencies) is awaited. A ``Singleton`` hands
    the same instance to every saga run. Raises ``LookupError`` naming the class when no
    provider, or more than one, qualifies.
    """

    def __init__(self, container: Any) -> None:
        self._container = container

    async def resolve(self, type_: type[T]) -> T:
        value = self._provider_for(type_)()
        if inspect.isawaitable(value):
            value = await value
        return cast(T, value)

    def _provider_for(self, type_: type[Any]) -> Any:
        from dependency_injector import providers

        kinds = [providers.Factory, providers.BaseSingleton]
        found = {id(p): p for p in self._container.traverse(types=kinds)}
        overriding = {id(o) for p in found.values() for o in p.overridden}
        exact: list[Any] = []
        sub: list[Any] = []
        for key, provider in found.items():
            provides = provider.provides
            if key in overriding or not isinstance(provides, type):
                continue
            if provides is type_:
                exact.append(provider)
            elif issubclass(provides, type_):
                sub.append(provider)
        matches = exact or sub
        if len(matches) == 1:
            return matches[0]
        name, where = type_.__qualname__, _name(self._container)
        if not matches:
            raise LookupError(
                f"no Factory or Singleton provider in {where} provides {name} (or a subclass)"
            )
        raise LookupError(f"several providers in {where} provide {name}: {matches!r}")


def _name(obj: Any) -> str:
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def _is_framework_instance(obj: Any, module: str, *names: str) -> bool:
    """isinstance against ``module.name`` classes, only if ``module`` is already imported
    (an object of one of its classes implies it is); never imports anything."""
    loaded = sys.modules.get(module)
    classes = [getattr(loaded, name, None) for name in names]
    return any(isinstance(cls, type) and isinstance(obj, cls) for cls in classes)


def as_container(obj: Any) -> Container:
    """Wrap whatever the user passed as a container (see the module docstring).

    Checked in order: None, an object with an ``async resolve``, a di / dishka /
    dependency-injector container (detected by isinstance against the framework's classes,
    without importing a framework the object does not come from), a mapping, a callable.
    Raises TypeError for anything else.
    """
    if obj is None:
        return _CONSTRUCTOR
    resolve = getattr(obj, "resolve", None)
    if isinstance(obj, Container) and inspect.iscoroutinefunction(resolve):
        return obj
    if _is_framework_instance(obj, "di", "Container"):
        return DIContainer(obj)
    if _is_framework_instance(obj, "dishka", "AsyncContainer", "Container"):
        return DishkaContainer(obj)
    di_containers = sys.modules.get("dependency_injector.containers")
    if di_containers is not None and di_containers.is_container(obj):
        return DependencyInjectorContainer(obj)
    if isinstance(obj, Mapping):
        return MappingContainer(obj)
    if callable(obj):
        return CallableContainer(obj)
    hint = " (its 'resolve' is not a coroutine function)" if resolve is not None else ""
    raise TypeError(
        f"cannot use {type(obj).__name__} as a container{hint}: pass None, an object with "
        "'async def resolve(type)', a mapping {handler class: instance or factory}, a "
        "factory callable, or a di / dishka / dependency-injector container"
    )
