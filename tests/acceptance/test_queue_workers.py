"""Submitted sagas on worker processes under SIGKILL, on SQLite, PostgreSQL and MariaDB.

Four worker processes (:mod:`tests.acceptance.queue_runner`) serve three queues with different
limits while the test submits the sagas and SIGKILLs a random worker every 0.5 to 1 s (a
replacement starts at once). Every saga must end COMPLETED with each act logged once, no saga
may be in two processes at once, and every queue and key limit must hold at every moment, as
the journal of act start and end events shows (:mod:`tests.acceptance.queue_checker`).

On PostgreSQL the full run (2,000 sagas) is part of every run of the suite; SQLite and MariaDB
run 300 sagas there, and 2,000 in the variants marked ``slow`` (``pytest -m slow
tests/acceptance``). By hand: ``python -m tests.acceptance.queue_harness --backend mysql
--sagas 2000 -v``. ``SAGAKIT_HARNESS_SEED`` fixes the seed (the report names it).
"""

from __future__ import annotations

import pytest

from tests.acceptance.queue_harness import QueueReport, QueueRunConfig, run_queue_harness
from tests.acceptance.test_crash_injection import SEED, _require_server

pytestmark = pytest.mark.acceptance

# On SQLite every write of the workers, the journal and the test waits for one file lock; on a
# busy two-core machine a write can wait seconds for it. A lease that runs out under a live
# worker lets another take the saga (as leases allow, see docs/fencing.md) and frees its queue
# slot while the first still finishes its act: the lease must outlast the slowest write for
# "no overlap" and "within the limits" to be fair demands.
LEASE = {"sqlite": 5.0, "postgres": 2.0, "mysql": 2.0}


def _assert_clean(report: QueueReport) -> None:
    print(report.render())
    assert report.ok, report.render()
    assert report.statuses == {"COMPLETED": report.sagas}, report.render()
    assert report.total_checks > 0


@pytest.mark.parametrize(("backend", "sagas", "kills"), [
    pytest.param("postgres", 2000, 12, id="postgres-2000"),
    pytest.param("sqlite", 300, 5, id="sqlite-300"),
    pytest.param("mysql", 300, 5, id="mysql-300"),
    pytest.param("sqlite", 2000, 12, id="sqlite-2000", marks=pytest.mark.slow),
    pytest.param("mysql", 2000, 12, id="mysql-2000", marks=pytest.mark.slow),
])
async def test_queue_workers_keep_every_limit_through_sigkills(
    backend: str, sagas: int, kills: int,
) -> None:
    await _require_server(backend)
    report = await run_queue_harness(QueueRunConfig(
        backend=backend, sagas=sagas, workers=4, concurrency=8, lease=LEASE[backend],
        kills=kills, seed=SEED, timeout=120 + 0.15 * sagas,
    ))
    _assert_clean(report)
    assert report.kills > 0, report.render()


# The checks are only worth something if they notice broken limits: each of these runs the
# workers with sagakit sabotaged (see tests.acceptance.queue_runner._sabotage).
@pytest.mark.parametrize("sabotage", ["limits", "recovery"])
async def test_the_checks_notice_broken_limits(
    sabotage: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGAKIT_QUEUE_SABOTAGE", sabotage)
    report = await run_queue_harness(QueueRunConfig(
        backend="sqlite", sagas=80, kills=0, seed=SEED or 5, timeout=90))
    print(report.render())
    assert report.statuses == {"COMPLETED": 80}, report.render()
    assert any(v.startswith(("[Q4.", "[Q5.")) for v in report.violations), report.render()
