"""Building and configuring the SQL storage: URLs, engines, session makers, drivers, names."""

from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from sagakit.storage.schema import validate_table_name
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.conftest import TABLES

pytestmark = pytest.mark.integration


def test_a_missing_driver_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from sagakit.storage import SqlAlchemySagaStorage\n"
        "try:\n"
        "    SqlAlchemySagaStorage.from_url('postgresql+asyncpg://u@127.0.0.1/db')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'sagakit[postgres]'" in out.stdout


@pytest.mark.parametrize(
    "name", ["saga; DROP TABLE x", "a b", "1abc", "", "x" * 64, 'q"uote', "t-1", None]
)
def test_table_names_must_be_plain_identifiers(name: Any) -> None:
    with pytest.raises(ValueError, match="invalid table name"):
        validate_table_name(name)
    with pytest.raises(ValueError, match="invalid table name"):
        SqlAlchemySagaStorage.from_url("sqlite+aiosqlite://", executions_table=name)


async def test_an_async_sessionmaker_is_accepted_and_schema_creation_is_idempotent(
    tmp_path: Any,
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/maker.db")
    storage = SqlAlchemySagaStorage(async_sessionmaker(engine), **TABLES)
    assert storage.engine is engine
    await storage.create_schema()
    await storage.create_schema()
    saga_id = uuid.uuid4()
    await storage.create_saga(saga_id, "Made", {"x": 1})
    assert (await storage.get_saga(saga_id)).context == {"x": 1}
    await storage.close()  # not ours: the engine stays usable
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
    await engine.dispose()


def test_anything_else_is_refused() -> None:
    with pytest.raises(TypeError, match="AsyncEngine or an async_sessionmaker"):
        SqlAlchemySagaStorage("sqlite:///x.db")  # type: ignore[arg-type]


async def test_from_url_storages_dispose_their_engine_on_close(sql_storage: Any) -> None:
    url = sql_storage.engine.url.render_as_string(hide_password=False)
    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    await storage.get_sagas_for_recovery(1)
    assert storage.engine.pool.checkedin() >= 1
    await storage.close()
    assert storage.engine.pool.checkedin() == 0
