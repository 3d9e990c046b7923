"""Container adapters, exercised with the real DI frameworks (di, dishka, dependency-injector).

Handler classes live at module level: ``di`` reads constructor annotations with
``typing.get_type_hints``, which needs them resolvable from the module's globals.
"""

from __future__ import annotations

import abc
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import di
import dishka
import pytest
from dependency_injector import containers, providers
from di.dependent import Dependent

from sagakit import Saga, SagaStepHandler
from sagakit.container import (
    CallableContainer,
    Container,
    DependencyInjectorContainer,
    DIContainer,
    DishkaContainer,
    MappingContainer,
    as_container,
)

# --- the domain: a handler with an interface dependency, and a step that always fails ---------


class Inventory(abc.ABC):
    @abc.abstractmethod
    def reserve(self, sku: str, by: object) -> None: ...

    @abc.abstractmethod
    def release(self, sku: str, by: object) -> None: ...


class InMemoryInventory(Inventory):
    def __init__(self) -> None:
        self.log: list[tuple[str, str, object]] = []

    def reserve(self, sku: str, by: object) -> None:
        self.log.append(("reserve", sku, by))

    def release(self, sku: str, by: object) -> None:
        self.log.append(("release", sku, by))


class ReserveStock(SagaStepHandler[dict[str, Any], None]):
    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory

    async def act(self, context: dict[str, Any]) -> None:
        self.inventory.reserve(context["sku"], by=self)

    async def compensate(self, context: dict[str, Any]) -> None:
        self.inventory.release(context["sku"], by=self)


class ReserveStockFast(ReserveStock):
    """A subclass, to check providers of subclasses are found."""


class PaymentDeclinedError(Exception):
    pass


class ChargePayment(SagaStepHandler[dict[str, Any], None]):
    async def act(self, context: dict[str, Any]) -> None:
        raise PaymentDeclinedError(context["sku"])

    async def compensate(self, context: dict[str, Any]) -> None:
        raise AssertionError("a failed step is never compensated")


class Plain(SagaStepHandler[dict[str, Any], None]):
    async def act(self, context: dict[str, Any]) -> None:
        return None

    async def compensate(self, context: dict[str, Any]) -> None:
        return None


class Unregistered(Plain):
    pass


class OrderSaga(Saga[dict]):  # the codec takes bare dict, not dict[str, Any]
    steps = [ReserveStock, ChargePayment]


async def iterate_order_saga(container: Any) -> None:
    async with OrderSaga().transaction(context={"sku": "sku-1"}, container=container) as tx:
        async for _ in tx:
            pass


async def run_failing_saga(container: Any) -> None:
    """Run OrderSaga; ChargePayment fails, so ReserveStock must be compensated, and then the
    step's own exception comes out of the iteration."""
    with pytest.raises(PaymentDeclinedError, match="sku-1"):
        await iterate_order_saga(container)


def assert_compensated_by_same_instance(inventory: InMemoryInventory) -> None:
    assert [entry[:2] for entry in inventory.log] == [
        ("reserve", "sku-1"),
        ("release", "sku-1"),
    ]
    reserved_by, released_by = inventory.log[0][2], inventory.log[1][2]
    assert isinstance(reserved_by, ReserveStock)
    assert released_by is reserved_by


# --- di ---------------------------------------------------------------------------------------


def di_container(inventory: Inventory) -> di.Container:
    container = di.Container()
    container.bind(di.bind_by_type(Dependent(lambda: inventory, scope="saga"), Inventory))
    return container


class CountingDIContainer(di.Container):
    """A real di.Container that counts how often a graph is solved."""

    def __init__(self) -> None:
        super().__init__()
        self.solves = 0

    def solve(self, *args: Any, **kwargs: Any) -> Any:
        self.solves += 1
        return super().solve(*args, **kwargs)


async def test_di_resolves_constructor_dependency_through_bind() -> None:
    inventory = InMemoryInventory()
    adapter = as_container(di_container(inventory))
    assert isinstance(adapter, DIContainer)

    handler = await adapter.resolve(ReserveStock)

    assert isinstance(handler, ReserveStock)
    assert handler.inventory is inventory


async def test_di_binds_interface_to_implementation_class() -> None:
    container = di.Container()
    container.bind(di.bind_by_type(Dependent(InMemoryInventory, scope="saga"), Inventory))
    adapter = DIContainer(container)

    first = await adapter.resolve(ReserveStock)
    second = await adapter.resolve(ReserveStock)

    assert isinstance(first.inventory, InMemoryInventory)
    assert first is not second  # each resolve runs in a fresh scope
    assert first.inventory is not second.inventory


async def test_di_autowires_handler_without_dependencies() -> None:
    assert isinstance(await DIContainer(di.Container()).resolve(Plain), Plain)


async def test_di_caches_the_solved_graph_per_type() -> None:
    container = CountingDIContainer()
    container.bind(di.bind_by_type(Dependent(InMemoryInventory, scope="saga"), Inventory))
    adapter = DIContainer(container)

    for _ in range(3):
        await adapter.resolve(ReserveStock)
    assert container.solves == 1
    await adapter.resolve(Plain)
    assert container.solves == 2


async def test_di_unbound_abstract_interface_fails_in_the_constructor() -> None:
    with pytest.raises(TypeError, match="abstract class Inventory"):
        await DIContainer(di.Container()).resolve(ReserveStock)


async def test_di_end_to_end_compensates_with_the_same_instance() -> None:
    inventory = InMemoryInventory()
    await run_failing_saga(di_container(inventory))
    assert_compensated_by_same_instance(inventory)


# --- dishka -----------------------------------------------------------------------------------


def dishka_provider(inventory: InMemoryInventory) -> dishka.Provider:
    provider = dishka.Provider(scope=dishka.Scope.REQUEST)
    provider.provide(lambda: inventory, provides=Inventory, scope=dishka.Scope.APP)
    provider.provide(ReserveStock)
    provider.provide(ChargePayment)
    return provider


@pytest.fixture
async def dishka_request() -> AsyncIterator[tuple[dishka.AsyncContainer, InMemoryInventory]]:
    inventory = InMemoryInventory()
    root = dishka.make_async_container(dishka_provider(inventory))
    async with root() as request:
        yield request, inventory
    await root.close()


async def test_dishka_async_container_resolves_constructor_dependency(
    dishka_request: tuple[dishka.AsyncContainer, InMemoryInventory],
) -> None:
    request, inventory = dishka_request
    adapter = as_container(request)
    assert isinstance(adapter, DishkaContainer)

    handler = await adapter.resolve(ReserveStock)

    assert isinstance(handler, ReserveStock)
    assert handler.inventory is inventory


async def test_dishka_sync_container_resolves_constructor_dependency() -> None:
    inventory = InMemoryInventory()
    root = dishka.make_container(dishka_provider(inventory))
    try:
        with root() as request:
            adapter = as_container(request)
            assert isinstance(adapter, DishkaContainer)
            handler = await adapter.resolve(ReserveStock)
            assert handler.inventory is inventory
    finally:
        root.close()


async def test_dishka_unregistered_type_names_the_type(
    dishka_request: tuple[dishka.AsyncContainer, InMemoryInventory],
) -> None:
    request, _ = dishka_request
    with pytest.raises(dishka.exceptions.NoFactoryError, match="Unregistered"):
        await as_container(request).resolve(Unregistered)


async def test_dishka_end_to_end_compensates_with_the_same_instance(
    dishka_request: tuple[dishka.AsyncContainer, InMemoryInventory],
) -> None:
    request, inventory = dishka_request
    await run_failing_saga(request)
    assert_compensated_by_same_instance(inventory)


# --- dependency-injector ----------------------------------------------------------------------


class Services(containers.DeclarativeContainer):
    inventory = providers.Singleton(InMemoryInventory)
    reserve_stock = providers.Factory(ReserveStock, inventory=inventory)
    charge_payment = providers.Factory(ChargePayment)


async def make_inventory() -> InMemoryInventory:
    return InMemoryInventory()


class AsyncServices(containers.DeclarativeContainer):
    inventory = providers.Coroutine(make_inventory)
    reserve_stock = providers.Singleton(ReserveStock, inventory=inventory)


class SubclassServices(containers.DeclarativeContainer):
    inventory = providers.Factory(InMemoryInventory)
    fast = providers.Factory(ReserveStockFast, inventory=inventory)


class AmbiguousServices(containers.DeclarativeContainer):
    inventory = providers.Factory(InMemoryInventory)
    one = providers.Factory(ReserveStock, inventory=inventory)
    two = providers.Singleton(ReserveStock, inventory=inventory)


async def test_dependency_injector_resolves_factory_with_dependency() -> None:
    services = Services()
    adapter = as_container(services)
    assert isinstance(adapter, DependencyInjectorContainer)

    first = await adapter.resolve(ReserveStock)
    second = await adapter.resolve(ReserveStock)

    assert isinstance(first, ReserveStock)
    assert first.inventory is services.inventory()
    assert first is not second  # a Factory builds a new handler each time
    assert isinstance(await adapter.resolve(ChargePayment), ChargePayment)


async def test_dependency_injector_accepts_the_declarative_class() -> None:
    adapter = as_container(Services)
    assert isinstance(adapter, DependencyInjectorContainer)
    assert isinstance(await adapter.resolve(ReserveStock), ReserveStock)


async def test_dependency_injector_awaits_async_providers_and_keeps_singletons() -> None:
    adapter = as_container(AsyncServices())

    handler = await adapter.resolve(ReserveStock)

    assert isinstance(handler, ReserveStock)
    assert isinstance(handler.inventory, InMemoryInventory)
    assert await adapter.resolve(ReserveStock) is handler


async def test_dependency_injector_finds_a_subclass_provider() -> None:
    handler = await as_container(SubclassServices()).resolve(ReserveStock)
    assert type(handler) is ReserveStockFast


async def test_dependency_injector_honours_overrides() -> None:
    services = Services()
    fake = InMemoryInventory()
    # The overriding provider provides the same class: it must not count as a second match.
    with services.reserve_stock.override(providers.Factory(ReserveStock, inventory=fake)):
        handler = await as_container(services).resolve(ReserveStock)
    assert handler.inventory is fake


async def test_dependency_injector_unregistered_type_names_the_type() -> None:
    with pytest.raises(LookupError, match=r"no Factory or Singleton .* provides Unregistered"):
        await as_container(Services()).resolve(Unregistered)


async def test_dependency_injector_ambiguous_type_is_an_error() -> None:
    with pytest.raises(LookupError, match=r"several providers .* provide ReserveStock"):
        await as_container(AmbiguousServices()).resolve(ReserveStock)


async def test_dependency_injector_end_to_end_compensates_with_the_same_instance() -> None:
    services = Services()
    await run_failing_saga(services)
    assert_compensated_by_same_instance(services.inventory())


# --- mapping, callable, None, custom ----------------------------------------------------------


async def test_mapping_container_instance_factories_and_missing_key() -> None:
    instance = Plain()

    async def make_unregistered() -> Unregistered:
        return Unregistered()

    adapter = as_container(
        {
            Plain: instance,
            ChargePayment: ChargePayment,  # a class is a sync factory
            Unregistered: make_unregistered,
        }
    )
    assert isinstance(adapter, MappingContainer)

    assert await adapter.resolve(Plain) is instance
    assert isinstance(await adapter.resolve(ChargePayment), ChargePayment)
    assert type(await adapter.resolve(Unregistered)) is Unregistered


async def test_mapping_container_constructs_missing_key() -> None:
    adapter = as_container({Plain: Plain()})
    assert type(await adapter.resolve(ChargePayment)) is ChargePayment


async def test_mapping_container_end_to_end() -> None:
    inventory = InMemoryInventory()
    await run_failing_saga({ReserveStock: lambda: ReserveStock(inventory)})
    assert_compensated_by_same_instance(inventory)


async def test_callable_container_sync_and_async() -> None:
    seen: list[type[Any]] = []

    def build(type_: type[Any]) -> Any:
        seen.append(type_)
        return type_()

    async def build_async(type_: type[Any]) -> Any:
        return type_()

    sync_adapter = as_container(build)
    async_adapter = as_container(build_async)
    assert isinstance(sync_adapter, CallableContainer)
    assert isinstance(async_adapter, CallableContainer)

    assert type(await sync_adapter.resolve(Plain)) is Plain
    assert seen == [Plain]
    assert type(await async_adapter.resolve(Unregistered)) is Unregistered


async def test_none_constructs_with_no_arguments() -> None:
    assert type(await as_container(None).resolve(Plain)) is Plain


async def test_object_with_async_resolve_is_used_as_is() -> None:
    class Custom:
        async def resolve(self, type_: type[Any]) -> Any:
            return type_()

    custom = Custom()
    assert isinstance(custom, Container)
    assert as_container(custom) is custom


@pytest.mark.parametrize("value", [42, "container", object()])
def test_unsupported_object_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match=rf"cannot use {type(value).__name__} as a container"):
        as_container(value)


def test_sync_resolve_is_a_type_error_saying_why() -> None:
    class SyncResolve:
        def resolve(self, type_: type[Any]) -> Any:
            return type_()

    with pytest.raises(TypeError, match="'resolve' is not a coroutine function"):
        as_container(SyncResolve())


def test_detection_imports_no_framework() -> None:
    code = textwrap.dedent(
        """
        import sys
        from sagakit.container import as_container
        as_container(None)
        as_container({})
        as_container(lambda type_: type_())
        try:
            as_container(42)
        except TypeError:
            pass
        loaded = [m for m in ("di", "dishka", "dependency_injector") if m in sys.modules]
        assert not loaded, loaded
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
