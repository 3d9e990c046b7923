"""Saga storages and the protocol they implement.

``SqlAlchemySagaStorage`` is imported lazily, so using sagakit with the memory storage never
imports SQLAlchemy.
"""

from typing import TYPE_CHECKING, Any

from sagakit.storage.memory import MemorySagaStorage
from sagakit.storage.protocol import ISagaStorage, LeasedRun, SagaStorage, SagaStorageRun

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

__all__ = [
    "ISagaStorage",
    "LeasedRun",
    "MemorySagaStorage",
    "SagaStorage",
    "SagaStorageRun",
    "SqlAlchemySagaStorage",
]


def __getattr__(name: str) -> Any:
    if name == "SqlAlchemySagaStorage":
        from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

        return SqlAlchemySagaStorage
    raise AttributeError(f"module 'sagakit.storage' has no attribute {name!r}")
