"""The mediator: map context types to sagas once, then stream any context's saga by value.

``bootstrap(di_container=..., sagas_mapper=..., saga_storage=..., middlewares=[...])`` returns a
:class:`SagaMediator`; ``mediator.stream(context, saga_id=None)`` runs the saga bound to the
context's type and yields its step results; ``mediator.submit(context, queue=...)`` hands it to
workers instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from uuid import UUID

from sagakit.container import as_container
from sagakit.middleware import Middleware
from sagakit.queue import DEFAULT_QUEUE
from sagakit.records import SagaStatus
from sagakit.recovery import recover_saga
from sagakit.saga import Saga
from sagakit.step import SagaStepResult
from sagakit.storage.memory import MemorySagaStorage
from sagakit.storage.protocol import SagaStorage
from sagakit.submission import SubmittedSaga, submit
from sagakit.transaction import check_options

__all__ = ["SagaMap", "SagaMediator", "bootstrap"]

# The transaction options that also apply when the mediator recovers a saga.
_RECOVERY_OPTIONS = frozenset({
    "compensation_retry_count",
    "compensation_retry_delay",
    "compensation_retry_backoff",
    "compensation_retry_max_delay",
    "lease_seconds",
    "max_recovery_attempts",
})


class SagaMap:
    """Which saga runs for which context type (and, for recovery, which saga has which name)."""

    def __init__(self) -> None:
        self._by_type: dict[type[Any], type[Saga[Any]]] = {}
        self._by_name: dict[str, type[Saga[Any]]] = {}

    def bind(self, context_type: type[Any], saga_type: type[Saga[Any]]) -> None:
        """Run ``saga_type`` for contexts of ``context_type`` (or its subclasses). Raises
        ValueError if the type or the saga's name is already bound to another saga."""
        for key, bound in ((context_type, self._by_type.get(context_type)),
                           (saga_type.name, self._by_name.get(saga_type.name))):
            if bound is not None and bound is not saga_type:
                raise ValueError(f"{key!r} is already bound to saga {bound.name!r}")
        self._by_type[context_type] = saga_type
        self._by_name[saga_type.name] = saga_type

    def saga_for(self, context: Any) -> type[Saga[Any]]:
        """The saga bound to the context's type, or to its nearest bound base class."""
        for klass in type(context).__mro__:
            saga = self._by_type.get(klass)
            if saga is not None:
                return saga
        raise LookupError(f"no saga is bound to {type(context).__name__} contexts")

    def saga_named(self, name: str) -> type[Saga[Any]]:
        try:
            return self._by_name[name]
        except KeyError:
            raise LookupError(f"no saga named {name!r} is bound") from None

    def __iter__(self) -> Any:
        return iter(self._by_name.values())


class SagaMediator:
    """Runs bound sagas with one container, storage and middleware chain."""

    def __init__(
        self,
        *,
        container: Any,
        saga_map: SagaMap,
        storage: SagaStorage,
        middlewares: Sequence[Middleware] = (),
        **transaction_options: Any,
    ) -> None:
        self.container = as_container(container)
        self.saga_map = saga_map
        self.storage = storage
        self.middlewares = tuple(middlewares)
        check_options(transaction_options)
        self.options = transaction_options

    async def stream(
        self, context: Any, saga_id: UUID | None = None
    ) -> AsyncIterator[SagaStepResult[Any, Any]]:
        """Run the saga bound to ``context``'s type, yielding each completed step's result.
        Errors are those of :class:`~sagakit.SagaTransaction`."""
        saga = self.saga_map.saga_for(context)()
        transaction = saga.transaction(
            context=context, container=self.container, storage=self.storage, saga_id=saga_id,
            middlewares=self.middlewares, **self.options,
        )
        async with transaction:
            async for result in transaction:
                yield result

    async def submit(
        self,
        context: Any,
        *,
        queue: str = DEFAULT_QUEUE,
        concurrency_key: str | None = None,
        priority: int = 0,
        saga_id: UUID | None = None,
    ) -> SubmittedSaga:
        """Hand the saga bound to ``context``'s type to workers (see
        :func:`sagakit.submission.submit`); returns its handle at once."""
        saga = self.saga_map.saga_for(context)()
        return await submit(saga, context, storage=self.storage, queue=queue,
                            concurrency_key=concurrency_key, priority=priority, saga_id=saga_id)

    async def recover(self, saga_id: UUID) -> SagaStatus:
        """Recover one stored saga, finding its definition by its stored name."""
        state = await self.storage.get_saga(saga_id)
        saga = self.saga_map.saga_named(state.name)
        options = {k: v for k, v in self.options.items() if k in _RECOVERY_OPTIONS}
        return await recover_saga(
            saga(), saga_id, None, self.container, self.storage, middlewares=self.middlewares,
            **options,
        )


def bootstrap(
    di_container: Any = None,
    sagas_mapper: Callable[[SagaMap], None] | SagaMap | None = None,
    saga_storage: SagaStorage | None = None,
    middlewares: Sequence[Middleware] = (),
    **transaction_options: Any,
) -> SagaMediator:
    """Build a mediator. ``sagas_mapper`` is a function that binds sagas on a fresh
    :class:`SagaMap` (or a ready map). Without a storage, sagas live in memory.
    ``transaction_options`` (e.g. ``compensation_retry_count``) apply to every saga run; they
    are checked here, as each transaction will check them: a bad number raises ValueError
    naming it, an unknown option TypeError."""
    saga_map = sagas_mapper if isinstance(sagas_mapper, SagaMap) else SagaMap()
    if callable(sagas_mapper) and not isinstance(sagas_mapper, SagaMap):
        sagas_mapper(saga_map)
    return SagaMediator(
        container=di_container,
        saga_map=saga_map,
        storage=saga_storage if saga_storage is not None else MemorySagaStorage(),
        middlewares=middlewares,
        **transaction_options,
    )


# The seed library is used as ``from cqrs.saga import bootstrap; bootstrap.bootstrap(...)``:
# keep that spelling working for ``from sagakit import bootstrap``.
bootstrap.bootstrap = bootstrap  # type: ignore[attr-defined]
