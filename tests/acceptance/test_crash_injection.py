"""Crash injection with real processes on SQLite, PostgreSQL and MariaDB.

The fast variant (every run of the suite) drives ~20 sagas per backend (CrashSaga and
ForwardSaga, see :mod:`tests.acceptance.crashsaga`) through saga runner and recovery worker
subprocesses, SIGKILLs them at injected crash points (forward recovery's among them: inside
retried attempts, during in-process and durable waits, around the pivot's checkpoint) and at
random moments, and checks the invariants of :mod:`tests.acceptance.checker` on every saga. The large variant is
marked ``slow`` and only runs when selected: ``pytest -m slow tests/acceptance``. Either runs by
hand too: ``python -m tests.acceptance.harness --backend postgres --sagas 200 --workers 3``.

``SAGAKIT_HARNESS_SEED`` fixes the seed (the report names the seed of every run).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from tests.acceptance.harness import HarnessConfig, HarnessStuck, Report, run_harness
from tests.conftest import MYSQL_DSN, POSTGRES_DSN, server_unavailable

pytestmark = pytest.mark.acceptance

BACKENDS = ["sqlite", "postgres", "mysql"]
SEED = int(os.environ["SAGAKIT_HARNESS_SEED"]) if os.environ.get("SAGAKIT_HARNESS_SEED") else None


async def _require_server(backend: str) -> None:
    url = {"postgres": POSTGRES_DSN, "mysql": MYSQL_DSN}.get(backend)
    if url is None:
        return
    engine = create_async_engine(url)
    try:
        async with engine.connect():
            pass
    except OSError as exc:
        server_unavailable(backend, exc)
    finally:
        await engine.dispose()


def _assert_clean(report: Report) -> None:
    print(report.render())
    assert report.ok, report.render()
    assert report.statuses == report.configured, report.render()
    assert report.total_checks > 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_fast_crash_injection(backend: str) -> None:
    await _require_server(backend)
    report = await run_harness(HarnessConfig(
        backend=backend, sagas=20, workers=2, concurrency=4, batch=5, runners=2,
        random_kills=4, crash_rate=0.5, seed=SEED, timeout=90,
    ))
    _assert_clean(report)
    assert report.kills_self > 0
    assert report.kills_parent + report.graceful_stops > 0
    for category in ("checkpoint_boundary", "in_step", "in_compensation", "in_wait", "waiting",
                     "pivot", "retried_attempt"):
        assert report.crash_points.get(category, 0) > 0, (category, report.render())
    assert report.definitions["ForwardSaga"] >= 6, report.render()
    for invariant in ("I7", "I8", "I9", "I10"):  # the forward-recovery invariants ran
        assert sum(n for name, n in report.checks.items()
                   if name.startswith(f"{invariant}.")) > 0, (invariant, report.render())


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_large_crash_injection(backend: str) -> None:
    await _require_server(backend)
    # On SQLite, seven processes share one write lock: on a busy two-core machine a write can
    # wait over a second for it, and a lease shorter than that runs out under a live worker (two
    # workers then overlap, as leases allow: see docs/fencing.md). The lease must outlast the
    # slowest write for "no overlap" to be a fair demand.
    report = await run_harness(HarnessConfig(
        backend=backend, sagas=200, workers=3, concurrency=4, batch=10, runners=3,
        random_kills=30, crash_rate=0.6, seed=SEED, timeout=600,
        lease=3.0 if backend == "sqlite" else 1.0,
    ))
    _assert_clean(report)
    assert report.kills > 100


# The harness is only worth something if it notices a broken sagakit: each of these runs it
# with sagakit sabotaged in the subprocesses (see tests.acceptance.runner._sabotage).
SABOTAGE: list[tuple[str, dict[str, Any], str]] = [
    ("rerun", {}, "I5.act-not-rerun"),  # recovery re-runs a checkpointed step
    ("order", {}, "I3.reverse-order-log"),  # compensations in forward order
    ("steal", {"step_ms": 300, "workers": 3}, "I4.no-overlap"),  # leases ignored
    # compensates past the pivot; one saga per process at a time: a process killed by another
    # saga's crash point between the sabotaged COMPENSATING checkpoint and its first
    # compensation leaves the saga to recovery, which (not sabotaged) parks it: unnoticeable
    ("pivot", {"concurrency": 1, "batch": 1}, "I8.no-compensation-past-pivot"),
    ("early", {}, "I9.not-early"),  # the next attempt comes before its wait is over
]


@pytest.mark.parametrize(("sabotage", "options", "invariant"), SABOTAGE,
                         ids=[s[0] for s in SABOTAGE])
async def test_the_harness_notices_a_broken_sagakit(
    sabotage: str, options: dict[str, Any], invariant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAGAKIT_HARNESS_SABOTAGE", sabotage)
    config = HarnessConfig(backend="sqlite", sagas=6, random_kills=0, seed=SEED or 3,
                           timeout=60)
    for name, value in options.items():
        setattr(config, name, value)
    try:
        report = await run_harness(config)
    except HarnessStuck:
        # A broken sagakit may also leave a saga unfinished (e.g. stolen leases fence out the
        # write that would have parked it): the harness noticed, which is what this asserts.
        if sabotage != "steal":
            raise
        return
    print(report.render())
    assert any(v.startswith(f"[{invariant}]") for v in report.violations), report.render()
