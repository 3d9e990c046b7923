"""The ``storage`` fixture: every contract test runs once per backend.

Backends: memory, sqlite (a file in tmp_path), postgres and mysql (the local servers; see
tests/conftest.py for DSNs). Each test gets empty tables.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from sagakit.storage.memory import MemorySagaStorage
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, TABLES, server_unavailable

BACKENDS = [
    "memory", "sqlite", "postgres", "mysql",
    # the same SQL storages with group commit on: every mode passes the contract
    "sqlite-group", "postgres-group", "mysql-group",
]


async def make_storage(backend: str, tmp_path: Any) -> Any:
    if backend == "memory":
        return MemorySagaStorage()
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    base, _, mode = backend.partition("-")
    url = {
        "sqlite": f"sqlite+aiosqlite:///{tmp_path}/contract.db",
        "postgres": POSTGRES_DSN,
        "mysql": MYSQL_DSN,
    }[base]
    storage = SqlAlchemySagaStorage.from_url(url, group_commit=mode == "group", **TABLES)
    try:
        await storage.create_schema()
        await storage.delete_all()
    except OSError as exc:  # connection refused and friends
        await storage.close()
        server_unavailable(base, exc)
    return storage


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    store = await make_storage(request.param, tmp_path)
    try:
        yield store
    finally:
        await store.close()
