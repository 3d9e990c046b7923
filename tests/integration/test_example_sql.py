"""examples/saga_sqlalchemy_storage.py runs as a script on SQLite, PostgreSQL and MariaDB, and
what it reads back from the database tells the success and the rollback story."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MYSQL_DSN, POSTGRES_DSN, server_unavailable

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "saga_sqlalchemy_storage.py"

# Tables of our own on the shared servers, so no other test run's rows get in the way.
TABLES = {
    "executions_table": f"saga_executions_ex{os.getpid()}",
    "logs_table": f"saga_logs_ex{os.getpid()}",
}
SERVERS = {"postgres": POSTGRES_DSN, "mysql": MYSQL_DSN}
SAGA_LINE = re.compile(
    r"^Saga OrderSaga (?P<id>[0-9a-f-]{36}): status=(?P<status>\w+) version=(?P<version>\d+) "
    r"recovery_attempts=(?P<attempts>\d+) lease_owner=(?P<owner>\S+)$"
)


def example_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SAGAKIT_DATABASE_URL"}
    env["SAGAKIT_EXECUTIONS_TABLE"] = TABLES["executions_table"]
    env["SAGAKIT_LOGS_TABLE"] = TABLES["logs_table"]
    env.update(extra)
    return env


def run_example(*args: str, env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return done.stdout.splitlines()


async def _prepare(url: str) -> None:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    try:
        await storage.create_schema()
    finally:
        await storage.close()


async def _drop(url: str) -> None:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    storage = SqlAlchemySagaStorage.from_url(url, **TABLES)
    try:
        await storage.drop_schema()
    finally:
        await storage.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres", "mysql"])
def output(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    backend = request.param
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('example')}/sagas.db"
    else:
        url = SERVERS[backend]
        try:
            asyncio.run(_prepare(url))
        except OSError as exc:  # connection refused and friends
            server_unavailable(backend, exc)
    try:
        yield run_example(url, env=example_env())
    finally:
        if backend != "sqlite":
            asyncio.run(_drop(url))


def section(lines: list[str], title: str) -> list[str]:
    start = next(i for i, line in enumerate(lines) if title in line)
    rest = lines[start + 1 :]
    end = next((i for i, line in enumerate(rest) if line.startswith("== ")), len(rest))
    return rest[:end]


def stored_sagas(lines: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(saga line fields, its indented lines) per saga of the read-back section."""
    sagas: list[tuple[dict[str, str], list[str]]] = []
    for line in section(lines, "Stored state"):
        match = SAGA_LINE.match(line)
        if match:
            sagas.append((match.groupdict(), []))
        else:
            assert line.startswith("  "), line
            sagas[-1][1].append(line.strip())
    return sagas


def test_success_scenario_runs_every_step_in_order(output: list[str]) -> None:
    lines = section(output, "Scenario 1")
    completed = [line.split()[2] for line in lines if line.startswith("Step completed:")]
    assert completed == ["ReserveInventoryStep", "ProcessPaymentStep", "ShipOrderStep"]
    assert not any("refunded" in line or "released" in line for line in lines)


def test_failure_scenario_compensates_in_reverse_and_reports_the_error(output: list[str]) -> None:
    lines = section(output, "Scenario 2")
    completed = [line.split()[2] for line in lines if line.startswith("Step completed:")]
    assert completed == ["ReserveInventoryStep", "ProcessPaymentStep"]
    refund = next(i for i, line in enumerate(lines) if "payment: refunded 42.50" in line)
    release = next(i for i, line in enumerate(lines) if "released reservation-456" in line)
    failed = lines.index("Saga failed: cannot ship to 'Atlantis'")
    assert refund < release < failed
    assert not any("shipping: cancelled" in line for line in lines)
    assert "Stock after rollback: {'item_1': 4, 'item_2': 2}" in lines
    assert "Payments still charged: ['payment-123']" in lines


def test_the_completed_saga_is_read_back_from_the_database(output: list[str]) -> None:
    (saga, details), _ = stored_sagas(output)
    assert saga["status"] == "COMPLETED"
    assert saga["version"] == "4"  # the start and one checkpoint per step: N + 1 writes
    assert saga["attempts"] == "0"
    assert saga["owner"] == "-"  # the lease was released
    assert details[0].startswith("context: {")
    assert '"shipment_id": "shipment-123"' in details[0]
    assert details[1:] == [
        "1. ReserveInventoryStep act COMPLETED",
        "2. ProcessPaymentStep act COMPLETED",
        "3. ShipOrderStep act COMPLETED",
    ]


def test_the_failed_saga_and_its_compensations_are_read_back(output: list[str]) -> None:
    _, (saga, details) = stored_sagas(output)
    assert saga["status"] == "FAILED"
    assert saga["version"] == "6"  # 2k + 2 writes with k = 2 completed steps
    assert saga["owner"] == "-"
    assert '"payment_id": "payment-456"' in details[0]
    assert '"shipment_id": null' in details[0]
    assert details[1:] == [
        "1. ReserveInventoryStep act COMPLETED",
        "2. ProcessPaymentStep act COMPLETED",
        "3. ShipOrderStep act FAILED (RuntimeError: cannot ship to 'Atlantis')",
        "4. ProcessPaymentStep compensate COMPENSATED",
        "5. ReserveInventoryStep compensate COMPENSATED",
    ]


def test_the_two_sagas_have_distinct_ids(output: list[str]) -> None:
    ids = [saga["id"] for saga, _ in stored_sagas(output)]
    assert len(ids) == 2
    assert ids[0] != ids[1]


def test_the_url_can_come_from_the_environment(tmp_path: Path) -> None:
    database = tmp_path / "from-env.db"
    url = f"sqlite+aiosqlite:///{database}"
    lines = run_example(env=example_env(SAGAKIT_DATABASE_URL=url))
    assert lines[0] == f"Database: {url}"
    assert database.is_file()
    assert [saga["status"] for saga, _ in stored_sagas(lines)] == ["COMPLETED", "FAILED"]


def test_without_a_url_it_uses_a_temporary_sqlite_file() -> None:
    lines = run_example(env=example_env())
    assert lines[0].startswith("Database: sqlite+aiosqlite:///")
    assert lines[0].endswith("/sagas.db")
    assert not Path(lines[0].removeprefix("Database: sqlite+aiosqlite:///")).exists()  # removed
    assert [saga["status"] for saga, _ in stored_sagas(lines)] == ["COMPLETED", "FAILED"]
