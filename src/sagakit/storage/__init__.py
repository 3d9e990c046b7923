"""Saga storages and the protocol they implement."""

from sagakit.storage.memory import MemorySagaStorage
from sagakit.storage.protocol import ISagaStorage, LeasedRun, SagaStorage, SagaStorageRun

__all__ = ["ISagaStorage", "LeasedRun", "MemorySagaStorage", "SagaStorage", "SagaStorageRun"]
