"""Shared test configuration: server DSNs and the rule that CI never skips a server test."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

POSTGRES_DSN = os.environ.get(
    "SAGAKIT_POSTGRES_DSN", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
MYSQL_DSN = os.environ.get("SAGAKIT_MYSQL_DSN", "mysql+asyncmy://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("SAGAKIT_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def server_unavailable(what: str, error: BaseException) -> None:
    """Skip a test whose server is down — except under CI=true, where that is a failure."""
    message = f"{what} is not reachable: {error!r}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing server is a failure, not a skip)")
    pytest.skip(message)


# Each pytest process gets its own table names on the shared servers, so two test runs on one
# machine (a developer's and CI's, or parallel sessions) cannot delete each other's rows.
TABLES = {
    "executions_table": f"saga_executions_t{os.getpid()}",
    "logs_table": f"saga_logs_t{os.getpid()}",
    "queues_table": f"saga_queues_t{os.getpid()}",
}


@pytest.fixture(scope="session", autouse=True)
def _drop_test_tables() -> Iterator[None]:
    yield
    asyncio.run(_drop_tables())


async def _drop_tables() -> None:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    for url in (POSTGRES_DSN, MYSQL_DSN):
        storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
        try:
            await storage.drop_schema()
        except Exception:  # the server may be down; the tests said so already
            pass
        finally:
            await storage.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The large variants (marked ``slow``) run only when asked for: ``pytest -m slow``.
    Otherwise they are deselected, not skipped."""
    expression = config.option.markexpr or ""
    if "slow" in expression.replace("not slow", ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
