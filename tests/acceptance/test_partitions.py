"""Partitions between workers and the database, on PostgreSQL and MariaDB (issue 14).

The crash-injection harness in partition mode (``partitions``, see
:mod:`tests.acceptance.harness` and :mod:`tests.acceptance.links`): every recovery worker process
reaches the database through a fault-injecting TCP proxy of its own, as if it ran on a host of
its own, and besides the crash points and random kills the harness faults those links, preferably
while the worker is in the middle of a step:

- a *cut* resets the worker's connections and refuses new ones: the server ends its liveness
  session, so its sagas may be taken over at once; the worker cuts its runs off (its lease
  renewals fail, its ping fails) and, healed, writes nothing more of them (its checkpoints are
  fenced) and opens a session under a new owner id;
- a *stall* holds its packets: the server keeps the session, so nothing is taken over before the
  lease runs out (some stalls are shorter than the lease, some longer); what the worker sent
  meanwhile arrives after the heal and is fenced if the saga changed hands.

Every invariant of :mod:`tests.acceptance.checker` must hold on every saga. The fast variant runs
with the suite; the large one is marked ``slow`` (``pytest -m slow tests/acceptance``); either
runs by hand too: ``python -m tests.acceptance.harness --backend mysql --sagas 200 --workers 3
--partitions 36``. ``SAGAKIT_HARNESS_SEED`` fixes the seed.
"""

from __future__ import annotations

import pytest

from tests.acceptance.checker import Event
from tests.acceptance.crashsaga import STEP_NAMES
from tests.acceptance.harness import HarnessConfig, Report, main, run_harness
from tests.acceptance.links import fault_counts
from tests.acceptance.test_checker import SID, History, _names
from tests.acceptance.test_crash_injection import SEED, _assert_clean, _require_server

pytestmark = pytest.mark.acceptance

SERVERS = ["postgres", "mysql"]


def _assert_faults(report: Report) -> None:
    """Cuts and stalls both hit a worker that held a saga."""
    faults = report.faults
    assert faults.get("cuts_holding", 0) > 0, report.render()
    assert faults.get("stalls_holding", 0) > 0, report.render()


@pytest.mark.parametrize("backend", SERVERS)
async def test_fast_partitions(backend: str) -> None:
    await _require_server(backend)
    report = await run_harness(HarnessConfig(
        backend=backend, sagas=20, workers=3, concurrency=4, batch=5, runners=2,
        random_kills=2, crash_rate=0.5, partitions=6, seed=SEED, timeout=120,
    ))
    _assert_clean(report)
    _assert_faults(report)


@pytest.mark.slow
@pytest.mark.parametrize("backend", SERVERS)
async def test_large_partitions(backend: str) -> None:
    await _require_server(backend)
    report = await run_harness(HarnessConfig(
        backend=backend, sagas=200, workers=3, concurrency=4, batch=10, runners=3,
        random_kills=10, crash_rate=0.6, partitions=36, seed=SEED, timeout=900,
    ))
    _assert_clean(report)
    _assert_faults(report)
    # Faults come 0.5-2 s apart while two links are up, each lasting up to seconds: how many of
    # the 36 land depends on how long the sagas take (16 to 29 seen).
    assert report.faults["cuts"] + report.faults["stalls"] >= 12, report.render()
    assert report.faults.get("long_stalls", 0) > 0, report.render()


def test_sqlite_has_no_link_to_cut(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="SQLite has no link"):
        HarnessConfig(backend="sqlite", partitions=2)
    with pytest.raises(SystemExit):
        main(["--backend", "sqlite", "--partitions", "2"])
    assert "SQLite has no link" in capsys.readouterr().err


def test_an_attempt_run_again_after_its_run_was_interrupted_is_no_violation() -> None:
    def history(interrupted: bool) -> History:
        h = History()
        h.claim(10)
        h.step("w1", 10, "Reserve")
        h.start("w1", 10, "Charge")
        h.end("w1", 10, "Charge")  # its checkpoint does not get through: the link is cut
        if interrupted:  # the run stops on the storage error (or its lease lost)
            h.events.append(Event(h._next(), SID, None, None, "interrupted",
                                  "SagaStorageUnavailableError", "w1", 10))
        h.claim(10)  # healed, it claims the saga again (under a new owner id)
        for name in STEP_NAMES[1:]:
            h.step("w1", 10, name)
        return h

    assert history(interrupted=True).check().violations == []
    assert "I7.budget" in _names(history(interrupted=False).check())


def test_fault_counts() -> None:
    sid = "00000000-0000-4000-8000-000000000002"
    events = [
        Event(1, sid, "Charge", "act", "start", None, "w1", 10),
        Event(2, None, None, None, "fault", "cut:1.50:1", "w1", 10),
        Event(3, sid, "Charge", "act", "end", "error:CancelledError", "w1", 10),
        Event(4, sid, "Charge", "act", "start", None, "w2", 20),  # taken over during the cut
        Event(5, None, None, None, "heal", None, "w1", 10),
        Event(6, sid, "Charge", "act", "end", "ok", "w2", 20),
        Event(7, None, None, None, "fault", "stall:2.50:0", "w2", 20),
        Event(8, None, None, None, "heal", None, "w2", 20),
        Event(9, sid, "Ship", "act", "start", None, "w1", 10),  # after the heal: not counted
    ]
    assert {k: v for k, v in fault_counts(events, lease=1.0).items() if v} == {
        "cuts": 1, "cuts_holding": 1, "cuts_in_step": 1, "cuts_taken_over": 1,
        "stalls": 1, "long_stalls": 1}
