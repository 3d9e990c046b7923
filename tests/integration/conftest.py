"""Fixtures for tests against the real SQL servers (and a SQLite file)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.contract.conftest import make_storage

SQL_BACKENDS = ["sqlite", "postgres", "mysql"]


@pytest.fixture(params=SQL_BACKENDS)
async def sql_storage(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    store = await make_storage(request.param, tmp_path)
    try:
        yield store
    finally:
        await store.close()
