"""The ``sagakit`` command, run as a real process against a SQLite file prepared by the test.

Every subcommand's output and exit code, through ``python -m sagakit`` and through the installed
``sagakit`` script. The database (see :func:`tests.acceptance.cli_sagas.prepare`) holds a
completed saga (its payment fell back to an invoice), a failed one (compensated), one crashed
mid-way (RUNNING, two steps checkpointed) and one parked.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sagakit import SagaStatus
from sagakit.cli import EXIT_BUSY, EXIT_DATABASE, EXIT_NOT_FOUND, EXIT_UNFINISHED, EXIT_USAGE
from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
from tests.acceptance.cli_sagas import prepare
from tests.conftest import POSTGRES_DSN, server_unavailable

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "sagakit"
ORDER = "tests.acceptance.cli_sagas:OrderSaga"
REFUND = "tests.acceptance.cli_sagas:RefundSaga"
MODULE = "tests.acceptance.cli_sagas"
UNREACHABLE = "postgresql+asyncpg://postgres@127.0.0.1:1/x"


class Db:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite+aiosqlite:///{path}"
        self.ids = asyncio.run(prepare(self.url))

    def __getitem__(self, situation: str) -> str:
        return str(self.ids[situation])

    def state(self, situation: str) -> SagaStatus:
        async def read() -> SagaStatus:
            storage = SqlAlchemySagaStorage.from_url(self.url)
            try:
                return (await storage.get_saga(self.ids[situation])).status
            finally:
                await storage.close()

        return asyncio.run(read())


@pytest.fixture
def db(tmp_path: Path) -> Db:
    return Db(tmp_path / "sagas.db")


def command(how: str) -> list[str]:
    return [str(SCRIPT)] if how == "script" else [sys.executable, "-m", "sagakit"]


def sagakit(
    *args: str,
    url: str | None = None,
    how: str = "module",
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the command from the repository root, with ``url`` as SAGAKIT_DATABASE_URL."""
    env = {**{k: v for k, v in os.environ.items() if k != "SAGAKIT_DATABASE_URL"}, **(env or {})}
    if url is not None:
        env["SAGAKIT_DATABASE_URL"] = url
    return subprocess.run(
        [*command(how), *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.stdout


def error_of(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The one-line error a failed command printed on stderr."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sagakit: error: ")
    return lines[0]


# -- installation -----------------------------------------------------------------------------


def test_the_installed_script_and_the_module_are_the_same_command(db: Db) -> None:
    assert SCRIPT.is_file(), "install the project (pip install -e .) to get the sagakit script"
    assert ok(sagakit("--version", how="script")).startswith("sagakit ")
    by_script = ok(sagakit("list", "--json", url=db.url, how="script"))
    by_module = ok(sagakit("list", "--json", url=db.url))
    assert json.loads(by_script) == json.loads(by_module)
    assert "COMMAND" in ok(sagakit("--help", how="script"))


# -- list ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["module", "script"])
def test_list_prints_a_table_newest_first(db: Db, how: str) -> None:
    lines = ok(sagakit("list", url=db.url, how=how)).splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "VERSION", "ATTEMPTS", "UPDATED", "(UTC)",
                                "LEASE", "OWNER"]
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == [db["crashed"], db["parked"], db["failed"],
                                        db["completed"]]
    assert [row[2] for row in rows] == ["RUNNING", "PARKED", "FAILED", "COMPLETED"]
    parked = rows[1]
    assert parked[1] == "OrderSaga"
    assert parked[4] == "10"  # recovery attempts
    assert all(row[-1] == "-" for row in rows)  # no live lease


def test_list_filters_and_json(db: Db) -> None:
    data = json.loads(ok(sagakit("list", "--status", "running", "--status", "PARKED", "--json",
                                 url=db.url)))
    assert [(d["saga_id"], d["status"]) for d in data] == [
        (db["crashed"], "RUNNING"), (db["parked"], "PARKED")
    ]
    assert set(data[0]) >= {"saga_id", "name", "status", "version", "recovery_attempts",
                            "updated_at", "lease_owner", "lease_expires_at"}
    assert "context" not in data[0]
    assert json.loads(ok(sagakit("list", "--name", "refund", "--json", url=db.url))) == []
    assert len(json.loads(ok(sagakit("list", "--limit", "2", "--json", url=db.url)))) == 2
    assert ok(sagakit("list", "--name", "refund", url=db.url)).strip() == "no sagas found"


def test_list_says_when_there_are_more_sagas_than_it_shows(db: Db) -> None:
    lines = ok(sagakit("list", "--limit", "2", url=db.url)).splitlines()
    assert [line.split()[0] for line in lines[1:3]] == [db["crashed"], db["parked"]]
    assert lines[3] == ("(the 2 newest; there are more: raise --limit, or "
                        "narrow with --status or --name)")
    assert len(lines) == 4
    exact = ok(sagakit("list", "--limit", "4", url=db.url)).splitlines()
    assert len(exact) == 5  # header and the 4 sagas, no note: there are no more


def test_list_rejects_an_unknown_status(db: Db) -> None:
    done = sagakit("list", "--status", "SLEEPING", url=db.url)
    assert done.returncode == EXIT_USAGE
    assert "unknown status 'SLEEPING'" in done.stderr


# -- show ---------------------------------------------------------------------------------------


def test_show_prints_status_context_and_history(db: Db) -> None:
    out = ok(sagakit("show", db["failed"], url=db.url))
    lines = out.splitlines()
    assert lines[0].split() == ["saga", db["failed"]]
    assert lines[2].split() == ["status", "FAILED"]
    context = out[out.index("context:") + len("context:"): out.index("steps:")]
    assert json.loads(context)["trail"] == ["ReserveStock", "ChargeCard", "undo ChargeCard",
                                            "undo ReserveStock"]
    steps = [line.split()[3:6] for line in out[out.index("steps:"):].splitlines()[2:]]
    assert steps == [
        ["ReserveStock", "act", "COMPLETED"],
        ["ChargeCard", "act", "COMPLETED"],
        ["ShipOrder", "act", "FAILED"],
        ["ChargeCard", "compensate", "COMPENSATED"],
        ["ReserveStock", "compensate", "COMPENSATED"],
    ]
    assert "ValueError: ShipOrder failed on purpose" in out


def test_show_json(db: Db) -> None:
    data = json.loads(ok(sagakit("show", db["completed"], "--json", url=db.url)))
    assert data["status"] == "COMPLETED"
    assert data["context"]["trail"] == ["ReserveStock", "SendInvoice", "ShipOrder",
                                        "NotifyCustomer"]
    history = [(h["step_name"], h["action"], h["status"]) for h in data["history"]]
    assert history[1] == ("ChargeCard", "act", "FAILED")
    assert data["history"][1]["error_type"].endswith("CardDeclined")
    assert history[2] == ("SendInvoice", "act", "COMPLETED")


def test_list_and_show_a_waiting_saga_past_its_pivot(db: Db) -> None:
    saga_id = asyncio.run(_waiting_saga(db.url))
    rows = {line.split()[0]: line for line in ok(sagakit("list", url=db.url)).splitlines()[1:]}
    state = asyncio.run(_stored(db.url, saga_id))
    assert state.next_attempt_at is not None
    assert state.deadline_at is not None
    due = state.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S")
    assert f"WAITING until {due}" in rows[str(saga_id)]
    out = ok(sagakit("show", str(saga_id), url=db.url))
    fields = {line[:13].strip(): line[13:].strip() for line in out[:out.index("context:")]
              .splitlines()}
    assert fields["status"] == "WAITING"
    assert fields["next attempt"] == due
    assert fields["deadline"] == state.deadline_at.strftime("%Y-%m-%d %H:%M:%S")
    assert fields["past pivot"] == "yes"
    lines = out[out.index("steps:"):].splitlines()
    assert lines[1].split()[:7] == ["#", "TIME", "(UTC)", "STEP", "ACTION", "STATUS", "ATTEMPT"]
    assert [line.split()[3:] for line in lines[2:]] == [
        ["ChargeCard", "act", "COMPLETED"],  # no attempt number, no error: blank cells
        ["ShipOrder", "act", "RETRYING", "1", "TimeoutError:", "slow"],
    ]
    data = json.loads(ok(sagakit("show", str(saga_id), "--json", url=db.url)))
    assert (data["status"], data["past_pivot"]) == ("WAITING", True)
    assert data["deadline_at"] == state.deadline_at.isoformat()
    assert data["next_attempt_at"] == state.next_attempt_at.isoformat()
    assert [h["attempt"] for h in data["history"]] == [None, 1]
    listed = json.loads(ok(sagakit("list", "--status", "waiting", "--json", url=db.url)))
    assert [(d["saga_id"], d["past_pivot"]) for d in listed] == [(str(saga_id), True)]


async def _waiting_saga(url: str) -> uuid.UUID:
    """A saga past its pivot, with a deadline, waiting before the second attempt of a step."""
    storage = SqlAlchemySagaStorage.from_url(url)
    saga_id = uuid.uuid4()
    try:
        async with storage.create_run() as run:
            await run.start(saga_id, "OrderSaga", {"order_id": "o-9"}, fingerprint=None,
                            lease_seconds=30, deadline_seconds=3600)
            await run.log_step(saga_id, "ChargeCard", "act", "COMPLETED")
            await run.pivot(saga_id)
            await run.commit()
            await run.log_step(saga_id, "ShipOrder", "act", "RETRYING", "TimeoutError: slow",
                               error_type="builtins.TimeoutError", attempt=1)
            await run.wait(saga_id, 600, release=True)
            await run.commit()
    finally:
        await storage.close()
    return saga_id


async def _stored(url: str, saga_id: uuid.UUID) -> Any:
    storage = SqlAlchemySagaStorage.from_url(url)
    try:
        return await storage.get_saga(saga_id)
    finally:
        await storage.close()


# -- diagram ------------------------------------------------------------------------------------


def test_diagram_of_a_definition_needs_no_database() -> None:
    chart = ok(sagakit("diagram", ORDER))
    assert chart.startswith("graph TD\n")
    assert '-.->|"raises CardDeclined"| step2_alt' in chart
    assert "style completed fill:#c8e6c9" in chart
    seq = ok(sagakit("diagram", ORDER, "--sequence"))
    assert seq.startswith("sequenceDiagram\n")
    assert "participant step2_alt as SendInvoice (fallback)" in seq


def test_diagram_of_a_stored_saga(db: Db) -> None:
    chart = ok(sagakit("diagram", db["failed"], "--saga", ORDER, url=db.url))
    assert chart.startswith("graph TD\n")
    classes = node_classes(chart)
    assert classes["step3"] == classes["failed"] == "failed"
    assert {classes[n] for n in ("step1", "step2", "undo1", "undo2")} == {"compensated"}
    assert {classes[n] for n in ("step2_alt", "step4", "undo3", "completed")} == {"notRun"}
    by_import = ok(sagakit("diagram", db["failed"], "--import", MODULE, url=db.url))
    assert by_import == chart
    parked = ok(sagakit("diagram", db["parked"], "--import", MODULE, url=db.url))
    assert 'status{{"PARKED<br/>next: ChargeCard' in parked
    assert "status -.- step2" in parked


def test_diagram_errors(db: Db) -> None:
    assert "pass --saga" in error_of(sagakit("diagram", db["failed"], url=db.url), EXIT_USAGE)
    wrong = error_of(sagakit("diagram", db["failed"], "--saga", REFUND, url=db.url), EXIT_USAGE)
    assert "is a 'OrderSaga' saga" in wrong
    error_of(sagakit("diagram", db["failed"], "--sequence", "--saga", ORDER, url=db.url),
             EXIT_USAGE)
    error_of(sagakit("diagram", "not-an-id"), EXIT_USAGE)


def node_classes(chart: str) -> dict[str, str]:
    found = {}
    for line in chart.splitlines():
        words = line.split()
        if words[0] == "class":
            found.update(dict.fromkeys(words[1].split(","), words[2]))
    return found


# -- recover ------------------------------------------------------------------------------------


def test_recover_one_saga(db: Db) -> None:
    out = ok(sagakit("recover", db["crashed"], "--saga", ORDER, url=db.url))
    assert out.strip() == f"{db['crashed']}  OrderSaga  RUNNING -> COMPLETED"
    assert db.state("crashed") is SagaStatus.COMPLETED
    again = json.loads(ok(sagakit("recover", db["crashed"], "--saga", ORDER, "--json",
                                  url=db.url)))
    assert again == {"saga_id": db["crashed"], "name": "OrderSaga", "status_before": "COMPLETED",
                     "status": "COMPLETED", "error": None, "busy": False}


def test_recover_of_a_parked_saga_exits_1_and_says_so(db: Db) -> None:
    done = sagakit("recover", db["parked"], "--import", MODULE, url=db.url)
    assert done.returncode == EXIT_UNFINISHED
    assert "PARKED -> PARKED (parked: resume or abort it)" in done.stdout


def test_recover_all_until_nothing_is_left(db: Db) -> None:
    data = json.loads(ok(sagakit("recover", "--all", "--saga", ORDER, "--saga", REFUND,
                                 "--json", url=db.url)))
    assert data == [{"saga_id": db["crashed"], "name": "OrderSaga", "status_before": None,
                     "status": "COMPLETED", "error": None, "busy": False}]
    assert db.state("crashed") is SagaStatus.COMPLETED
    assert db.state("parked") is SagaStatus.PARKED  # never recovered automatically
    assert ok(sagakit("recover", "--all", "--saga", ORDER, url=db.url)).strip() == (
        "nothing to recover"
    )


def test_recover_all_prints_each_saga_as_it_ends_then_a_summary(db: Db) -> None:
    lines = ok(sagakit("recover", "--all", "--saga", ORDER, url=db.url)).splitlines()
    assert lines == [f"{db['crashed']}  OrderSaga  COMPLETED", "recovered 1 saga: 1 COMPLETED"]


def test_recover_usage_errors(db: Db) -> None:
    error_of(sagakit("recover", "--saga", ORDER, url=db.url), EXIT_USAGE)
    error_of(sagakit("recover", db["crashed"], "--all", "--saga", ORDER, url=db.url), EXIT_USAGE)
    assert "no saga definition given" in error_of(
        sagakit("recover", "--all", url=db.url), EXIT_USAGE
    )


def test_a_saga_leased_by_a_live_run_is_busy(db: Db) -> None:
    async def while_leased() -> tuple[str, subprocess.CompletedProcess[str], str]:
        storage = SqlAlchemySagaStorage.from_url(db.url)
        try:
            async with storage.create_run() as run:
                await run.claim(db.ids["crashed"], lease_seconds=60)  # type: ignore[attr-defined]
                listed = await asyncio.to_thread(
                    sagakit, "list", "--status", "RUNNING", "--json", url=db.url
                )
                recovered = await asyncio.to_thread(
                    sagakit, "recover", db["crashed"], "--saga", ORDER, url=db.url
                )
                owner: str = run.owner  # type: ignore[attr-defined]
                return ok(listed), recovered, owner
        finally:
            await storage.close()

    listed, recovered, owner = asyncio.run(while_leased())
    assert json.loads(listed)[0]["lease_owner"] == owner
    assert "leased by a live run" in error_of(recovered, EXIT_BUSY)
    assert db.state("crashed") is SagaStatus.RUNNING


# -- resume and abort ---------------------------------------------------------------------------


def test_resume_a_parked_saga(db: Db) -> None:
    out = ok(sagakit("resume", db["parked"], "--saga", ORDER, url=db.url))
    assert out.strip() == f"{db['parked']}  OrderSaga  PARKED -> COMPLETED"
    assert db.state("parked") is SagaStatus.COMPLETED


def test_abort_a_parked_saga(db: Db) -> None:
    data = json.loads(ok(sagakit("abort", db["parked"], "--saga", ORDER, "--reason",
                                 "customer cancelled", "--json", url=db.url)))
    assert (data["status_before"], data["status"]) == ("PARKED", "FAILED")
    shown = json.loads(ok(sagakit("show", db["parked"], "--json", url=db.url)))
    aborted = [h for h in shown["history"] if h["error_type"] == "SagaAborted"]
    assert len(aborted) == 1
    assert "customer cancelled" in aborted[0]["details"]
    assert shown["context"]["trail"][-1] == "undo ReserveStock"


def test_a_parked_saga_shows_no_next_attempt(db: Db) -> None:
    """Parked after failed recoveries, its row may keep the time of a backoff that no longer
    applies: only an explicit resume or abort runs it again."""
    with sqlite3.connect(db.path) as conn:
        changed = conn.execute("UPDATE saga_executions SET next_attempt_at = '2030-01-01 00:00:00'"
                               " WHERE saga_id = ?", (db.ids["parked"].hex,)).rowcount
    assert changed == 1
    out = ok(sagakit("show", db["parked"], url=db.url))
    fields = {line[:13].strip(): line[13:].strip() for line in out[:out.index("context:")]
              .splitlines()}
    assert (fields["status"], fields["next attempt"]) == ("PARKED", "-")


def test_aborting_a_finished_saga_is_an_error_and_writes_nothing(db: Db) -> None:
    before = json.loads(ok(sagakit("show", db["completed"], "--json", url=db.url)))
    message = error_of(sagakit("abort", db["completed"], "--saga", ORDER, url=db.url),
                       EXIT_USAGE)
    assert f"saga {db['completed']} (OrderSaga) is already COMPLETED" in message
    assert "nothing left to abort" in message
    after = json.loads(ok(sagakit("show", db["completed"], "--json", url=db.url)))
    assert after == before


# -- worker -------------------------------------------------------------------------------------


def wait_for(worker: subprocess.Popen[str], done: Callable[[], bool], what: str,
             pause: float = 0.1) -> None:
    """Check ``done`` every ``pause`` seconds until it holds; fails, saying ``what`` did not
    happen, after 30 s, or with the worker's output if it exits first."""
    deadline = time.monotonic() + 30
    while not done():
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(pause)


def stop(worker: subprocess.Popen[str], timeout: float = 30) -> str:
    """SIGTERM the worker; its stderr once it exited 0 (within ``timeout`` seconds)."""
    try:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=timeout)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, stderr
    return stderr


def test_worker_recovers_and_stops_cleanly_on_sigterm(db: Db) -> None:
    env = {**os.environ, "SAGAKIT_DATABASE_URL": db.url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "sagakit", "worker", "--saga", ORDER, "--poll-interval", "0.2"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(worker, lambda: db.state("crashed") is SagaStatus.COMPLETED,
                 "the worker did not recover the saga", pause=0.2)
    finally:
        stderr = stop(worker)
    assert "worker started" in stderr
    assert f"saga {db['crashed']} (OrderSaga): recovered to COMPLETED" in stderr
    assert "worker stopped" in stderr
    assert db.state("parked") is SagaStatus.PARKED


def test_sigterm_while_the_worker_starts_up_exits_cleanly(db: Db, tmp_path: Path) -> None:
    marker = tmp_path / "importing"
    (tmp_path / "slow_sagas.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "time.sleep(30)  # a slow start-up: big imports, a cold container\n"
        f"from {MODULE} import OrderSaga\n"
    )
    env = {**os.environ, "SAGAKIT_DATABASE_URL": db.url,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    worker = subprocess.Popen(
        [sys.executable, "-m", "sagakit", "worker", "--import", "slow_sagas"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(worker, marker.exists, "the worker never started importing", pause=0.05)
    finally:
        stderr = stop(worker, timeout=20)
    assert "Traceback" not in stderr
    assert db.state("crashed") is SagaStatus.RUNNING  # it took no saga


def test_worker_needs_a_definition_and_a_database(db: Db, tmp_path: Path) -> None:
    error_of(sagakit("worker", url=db.url), EXIT_USAGE)
    missing = f"sqlite+aiosqlite:///{tmp_path / 'missing.db'}"
    error_of(sagakit("worker", "--saga", ORDER, url=missing), EXIT_DATABASE)


# -- demo ---------------------------------------------------------------------------------------


def test_demo_keeps_its_database_and_the_commands_it_suggests_work(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    out = ok(sagakit("demo", "--db", str(db), timeout=120))
    lines = out.splitlines()
    assert any("worker killed with SIGKILL (exit -9)" in line for line in lines)
    assert "   recover_saga returned COMPLETED" in lines
    assert f"The database is kept: {db}" in lines
    url = f"sqlite+aiosqlite:///{db}"
    assert f"  export SAGAKIT_DATABASE_URL={url}" in lines
    suggested = [line.split("#")[0].split() for line in lines
                 if line.startswith(("  sagakit show", "  sagakit diagram"))]
    assert [words[:2] for words in suggested] == [["sagakit", "show"], ["sagakit", "diagram"]]
    shown = ok(sagakit(*suggested[0][1:], url=url))
    assert "COMPLETED" in shown.splitlines()[2]
    assert ok(sagakit(*suggested[1][1:], url=url)).startswith("graph TD")


def test_demo_discard_deletes_its_database(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    lines = ok(sagakit("demo", "--db", str(db), "--discard", timeout=120)).splitlines()
    assert "   recover_saga returned COMPLETED" in lines
    assert not db.exists()
    assert not any(line.startswith("The database is kept") for line in lines)


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["module", "script"])
def test_unknown_saga_id_exits_3(db: Db, how: str) -> None:
    unknown = str(uuid.uuid4())
    assert unknown in error_of(sagakit("show", unknown, url=db.url, how=how), EXIT_NOT_FOUND)
    error_of(sagakit("recover", unknown, "--saga", ORDER, url=db.url), EXIT_NOT_FOUND)
    error_of(sagakit("diagram", unknown, "--saga", ORDER, url=db.url), EXIT_NOT_FOUND)


def test_a_malformed_saga_id_is_a_usage_error(db: Db) -> None:
    assert "bad saga id" in error_of(sagakit("show", "12345", url=db.url), EXIT_USAGE)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nonsense", "bad database URL"),
        ("nosuchdb+driver://host/x", "bad database URL"),
        ("sqlite:///sagas.db", "sqlite:// names no async driver; sagakit needs one: "
                               "sqlite+aiosqlite:///sagas.db"),
        ("postgresql://u:secret@db/x", "postgresql+asyncpg://u:***@db/x "
                                       "(pip install 'sagakit[postgres]')"),
        ("postgres://u@db/x", "postgresql+asyncpg://u@db/x (pip install 'sagakit[postgres]')"),
        ("mysql://root@db/x", "mysql+asyncmy://root@db/x (pip install 'sagakit[mysql]')"),
    ],
)
def test_a_bad_url_exits_2(url: str, expected: str) -> None:
    assert expected in error_of(sagakit("list", url=url), EXIT_USAGE)


def test_no_url_exits_2() -> None:
    assert "SAGAKIT_DATABASE_URL" in error_of(sagakit("list"), EXIT_USAGE)


def test_the_url_option_wins_over_the_environment(db: Db) -> None:
    done = sagakit("list", "--json", "--url", db.url, url="nonsense")
    assert len(json.loads(ok(done))) == 4
    before = sagakit("--url", db.url, "list", "--json", url="nonsense")  # before the command too
    assert len(json.loads(ok(before))) == 4


@pytest.mark.parametrize("how", ["module", "script"])
def test_an_unreachable_database_exits_4(how: str) -> None:
    line = error_of(sagakit("list", url=UNREACHABLE, how=how), EXIT_DATABASE)
    assert "cannot reach the database" in line


def test_a_missing_sqlite_file_exits_4_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nope.db"
    error_of(sagakit("list", url=f"sqlite+aiosqlite:///{path}"), EXIT_DATABASE)
    assert not path.exists()


def test_a_database_without_the_tables_exits_4(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    assert "no such table" in error_of(sagakit("list", url=f"sqlite+aiosqlite:///{path}"),
                                       EXIT_DATABASE)


def test_other_table_names(db: Db) -> None:
    done = sagakit("list", "--executions-table", "other_executions", url=db.url)
    assert "no such table: other_executions" in error_of(done, EXIT_DATABASE)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_such_module:OrderSaga", "no module named 'no_such_module'"),
        ("tests.acceptance.cli_sagas", "expected module:SagaClass"),
        ("tests.acceptance.cli_sagas:Missing", "has no attribute 'Missing'"),
        ("tests.acceptance.cli_sagas:NotASaga", "is not a sagakit.Saga subclass"),
    ],
)
def test_a_bad_module_class_exits_2(db: Db, spec: str, expected: str) -> None:
    assert expected in error_of(sagakit("diagram", spec), EXIT_USAGE)
    assert expected in error_of(sagakit("recover", db["crashed"], "--saga", spec, url=db.url),
                                EXIT_USAGE)
    assert db.state("crashed") is SagaStatus.RUNNING


def test_a_module_that_fails_to_import_exits_2(tmp_path: Path) -> None:
    (tmp_path / "broken_sagas.py").write_text("raise RuntimeError('boom at import')\n")
    done = sagakit("diagram", "broken_sagas:OrderSaga", env={"PYTHONPATH": str(tmp_path)})
    assert "RuntimeError: boom at import" in error_of(done, EXIT_USAGE)


# -- submitted sagas: submit, worker --queue, queues ----------------------------------------------


class Queued:
    """An empty schema for submitted sagas: a SQLite file, or tables of this test process's own
    on the local PostgreSQL (dropped after the test). ``args`` name the tables."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        pid = os.getpid()
        if backend == "sqlite":
            self.url = f"sqlite+aiosqlite:///{tmp_path / 'queued.db'}"
            self.tables: dict[str, Any] = {}
        else:
            self.url = POSTGRES_DSN
            self.tables = {"executions_table": f"cli_sagas_{pid}", "logs_table": f"cli_logs_{pid}",
                           "queues_table": f"cli_queues_{pid}"}
        self.args = [arg for name, table in self.tables.items()
                     for arg in (f"--{name.replace('_', '-')}", table)]

    def storage(self) -> SqlAlchemySagaStorage:
        return SqlAlchemySagaStorage.from_url(self.url, **self.tables)

    def run(self, *args: str, **options: Any) -> subprocess.CompletedProcess[str]:
        return sagakit(*args, *self.args, url=self.url, **options)

    def state(self, saga_id: str) -> Any:
        async def read() -> Any:
            storage = self.storage()
            try:
                return await storage.get_saga(uuid.UUID(saga_id))
            finally:
                await storage.close()

        return asyncio.run(read())

    def worker(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "sagakit", "worker", "--saga", ORDER, *self.args,
             "--poll-interval", "0.2", *args],
            cwd=ROOT, env={**os.environ, "SAGAKIT_DATABASE_URL": self.url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def queued(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Queued]:
    schema = Queued(request.param, tmp_path)

    async def create() -> None:
        storage = schema.storage()
        try:
            await storage.create_schema()
            await storage.delete_all()
        except OSError as exc:
            server_unavailable(request.param, exc)
        finally:
            await storage.close()

    async def drop() -> None:
        storage = schema.storage()
        try:
            await storage.drop_schema()
        finally:
            await storage.close()

    asyncio.run(create())
    try:
        yield schema
    finally:
        if request.param != "sqlite":
            asyncio.run(drop())


CONTEXT = json.dumps({"order_id": "o-7"})


def test_submit_stores_the_saga_pending_and_a_worker_serving_its_queue_runs_it(
    queued: Queued,
) -> None:
    saga_id = ok(queued.run("submit", "--saga", ORDER, "--context", CONTEXT, "--queue", "orders",
                            "--key", "customer-1", "--priority", "5")).strip()
    state = queued.state(saga_id)
    assert (state.status, state.queue, state.concurrency_key, state.priority) == (
        SagaStatus.PENDING, "orders", "customer-1", 5)
    assert state.context["order_id"] == "o-7"
    lines = ok(queued.run("list")).splitlines()
    assert lines[0].split()[:6] == ["ID", "NAME", "STATUS", "QUEUE", "KEY", "PRIORITY"]
    assert lines[1].split()[:6] == [saga_id, "OrderSaga", "PENDING", "orders", "customer-1", "5"]
    shown = ok(queued.run("show", saga_id))
    fields = dict(line.split(None, 1) for line in shown[:shown.index("context:")].splitlines())
    assert (fields["queue"], fields["key"], fields["priority"]) == ("orders", "customer-1", "5")
    data = json.loads(ok(queued.run("show", saga_id, "--json")))
    assert (data["queue"], data["concurrency_key"], data["priority"]) == ("orders", "customer-1", 5)

    worker = queued.worker("--queue", "orders", "--queue", "other")
    try:
        # --wait follows a second saga while the worker runs both
        done = queued.run("submit", "--saga", ORDER, "--context", json.dumps(
            {"order_id": "o-8", "fail_at": "ShipOrder"}), "--queue", "other", "--wait",
            "--timeout", "60")
        out = ok(done).splitlines()
        assert out[1] == f"{out[0]}  OrderSaga  FAILED"  # compensated: a success, as recover says
        waited = json.loads(ok(queued.run("submit", "--saga", ORDER, "--context", CONTEXT,
                                          "--queue", "orders", "--wait", "--json")))
        assert (waited["queue"], waited["status"], waited["created"]) == (
            "orders", "COMPLETED", True)
        wait_for(worker, lambda: queued.state(saga_id).status is SagaStatus.COMPLETED,
                 "the worker did not run the first saga")
    finally:
        stderr = stop(worker)
    assert "queues orders, other" in stderr
    assert queued.state(saga_id).context["trail"] == ["ReserveStock", "ChargeCard", "ShipOrder",
                                                      "NotifyCustomer"]
    assert queued.state(out[0]).status is SagaStatus.FAILED


def test_a_worker_serves_only_its_queues(queued: Queued) -> None:
    elsewhere = ok(queued.run("submit", "--saga", ORDER, "--context", CONTEXT, "--queue",
                              "elsewhere")).strip()
    default = ok(queued.run("submit", "--saga", ORDER, "--context", CONTEXT)).strip()
    worker = queued.worker()  # the default queue only
    try:
        wait_for(worker, lambda: queued.state(default).status is SagaStatus.COMPLETED,
                 "the worker did not run the saga")
    finally:
        stderr = stop(worker)
    assert "queues default," in stderr
    assert queued.state(elsewhere).status is SagaStatus.PENDING


def test_submit_wait_gives_up_after_its_timeout_and_the_saga_stays(queued: Queued) -> None:
    done = queued.run("submit", "--saga", ORDER, "--context", CONTEXT, "--wait", "--timeout",
                      "0.3")
    line = error_of(done, EXIT_UNFINISHED)
    saga_id = done.stdout.strip()
    assert f"saga {saga_id} is still PENDING after 0.3 s" in line
    assert queued.state(saga_id).status is SagaStatus.PENDING


def test_submit_with_an_id_is_idempotent(queued: Queued) -> None:
    saga_id = str(uuid.uuid4())
    first = queued.run("submit", "--saga", ORDER, "--context", CONTEXT, "--id", saga_id)
    assert ok(first).strip() == saga_id
    again = queued.run("submit", "--saga", ORDER, "--context", json.dumps({"order_id": "x"}),
                       "--id", saga_id, "--queue", "other")
    assert ok(again).strip() == saga_id
    assert "already submitted: nothing written" in again.stderr
    state = queued.state(saga_id)
    assert (state.queue, state.context["order_id"]) == ("default", "o-7")
    other = error_of(queued.run("submit", "--saga", REFUND, "--context", CONTEXT, "--id",
                                saga_id), EXIT_USAGE)
    assert "bad --id" in other
    assert "is a 'OrderSaga' saga" in other


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--context", CONTEXT], "no saga definition given"),
        (["--saga", ORDER, "--context", "{oops"], "bad --context: not valid JSON"),
        (["--saga", ORDER, "--context", "[1]"], "bad --context: expected a JSON object"),
        (["--saga", ORDER, "--context", '{"order_id": "o", "colour": "red"}'],
         "bad --context for saga 'OrderSaga'"),
        (["--saga", ORDER, "--context", "{}"], "bad --context for saga 'OrderSaga'"),
        (["--saga", ORDER, "--context", CONTEXT, "--queue", "no spaces"], "--queue must be"),
        (["--saga", ORDER, "--context", CONTEXT, "--key", ""], "--key must be"),
        (["--saga", ORDER, "--context", CONTEXT, "--priority", str(2**31)], "--priority must"),
        (["--saga", ORDER, "--context", CONTEXT, "--id", "12345"], "bad saga id '12345'"),
        (["--saga", ORDER, "--context", CONTEXT, "--timeout", "5"], "--timeout needs --wait"),
        (["--saga", ORDER, "--context", CONTEXT, "--wait", "--timeout", "0"], "--timeout must"),
        (["--saga", "tests.acceptance.cli_sagas:Missing", "--context", CONTEXT],
         "has no attribute 'Missing'"),
    ],
)
def test_submit_refuses_bad_input_and_writes_nothing(
    db: Db, args: list[str], expected: str
) -> None:
    done = sagakit("submit", *args, url=db.url)
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert expected in done.stderr.strip().splitlines()[-1]
    assert len(json.loads(ok(sagakit("list", "--json", url=db.url)))) == 4


def test_queues_set_list_and_delete(queued: Queued) -> None:
    assert ok(queued.run("queues")).strip() == "no queues: none configured, no saga submitted"
    line = ok(queued.run("queues", "set", "orders", "--concurrency", "2", "--key-concurrency",
                         "1", "--rate", "5", "--burst", "10"))
    assert line.strip() == "queue orders: concurrency 2, key concurrency 1, rate 5/s, burst 10"
    ok(queued.run("queues", "set", "slow", "--rate", "0.5"))
    ok(queued.run("submit", "--saga", ORDER, "--context", CONTEXT, "--queue", "orders"))
    ok(queued.run("submit", "--saga", ORDER, "--context", CONTEXT))
    lines = ok(queued.run("queues")).splitlines()
    assert lines[0].split() == ["QUEUE", "CONCURRENCY", "PER-KEY", "RATE", "BURST", "PENDING",
                                "RUNNING", "WAITING", "COMPENSATING", "PARKED", "COMPLETED",
                                "FAILED"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows == {
        "default": ["-", "-", "-", "-", "1", "0", "0", "0", "0", "0", "0"],  # not configured
        "orders": ["2", "1", "5", "10", "1", "0", "0", "0", "0", "0", "0"],
        "slow": ["-", "-", "0.5", "1", "0", "0", "0", "0", "0", "0", "0"],  # burst max(1, rate)
    }
    listed = json.loads(ok(queued.run("queues", "--json")))
    assert listed[1] == {"name": "orders", "configured": True, "concurrency": 2,
                         "key_concurrency": 1, "rate": 5.0, "burst": 10.0,
                         "counts": {"PENDING": 1}}
    assert (listed[0]["name"], listed[0]["configured"]) == ("default", False)
    # set replaces every limit: what is not given is no limit
    ok(queued.run("queues", "set", "orders", "--concurrency", "3"))
    assert json.loads(ok(queued.run("queues", "--json")))[1]["key_concurrency"] is None
    assert "limits deleted" in ok(queued.run("queues", "delete", "orders"))
    assert "no queue 'orders' is configured" in error_of(queued.run("queues", "delete", "orders"),
                                                         EXIT_NOT_FOUND)
    names = [q["name"] for q in json.loads(ok(queued.run("queues", "--json")))]
    assert names == ["default", "orders", "slow"]  # orders still holds a saga


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["queues", "set", "orders", "--concurrency", "0"], "--concurrency"),
        (["queues", "set", "orders", "--key-concurrency", "-1"], "--key-concurrency"),
        (["queues", "set", "orders", "--concurrency", "many"], "--concurrency"),
        (["queues", "set", "orders", "--rate", "nan"], "--rate"),
        (["queues", "set", "orders", "--rate", "0"], "--rate"),
        (["queues", "set", "orders", "--rate", "1", "--burst", "0.5"], "--burst"),
        (["queues", "set", "orders", "--burst", "3"], "--burst needs --rate"),
        (["queues", "set", "no spaces"], "queue name must be"),
        (["queues", "delete", "x" * 65], "queue name must be"),
        (["worker", "--saga", ORDER, "--queue", "a/b"], "--queue must be"),
        (["worker", "--saga", ORDER, "--max-idle-poll", "0"], "--max-idle-poll"),
        (["worker", "--saga", ORDER, "--failover-poll", "nan"], "--failover-poll"),
        (["worker", "--saga", ORDER, "--poll-interval", "2", "--max-idle-poll", "1"],
         "--max-idle-poll (1) must be at least --poll-interval (2)"),
    ],
)
def test_bad_queue_options_are_usage_errors_naming_the_option(
    db: Db, args: list[str], flag: str
) -> None:
    done = sagakit(*args, url=db.url)
    assert done.returncode == EXIT_USAGE, (done.stdout, done.stderr)
    assert flag in done.stderr.strip().splitlines()[-1]
    assert json.loads(ok(sagakit("queues", "--json", url=db.url))) == []


def test_the_recover_all_summary_counts_each_ending() -> None:
    from sagakit.cli.recovery import summary
    from sagakit.cli.render import Outcome

    ids = [uuid.uuid4() for _ in range(5)]
    outcomes = [Outcome(ids[0], "A", SagaStatus.COMPLETED), Outcome(ids[1], "A", SagaStatus.PARKED),
                Outcome(ids[2], "B", SagaStatus.COMPLETED), Outcome(ids[3], "B", busy=True),
                Outcome(ids[4], "B", error="SagaStorageUnavailableError: down")]
    assert summary(outcomes) == "recovered 5 sagas: 2 COMPLETED, 1 PARKED, 1 busy, 1 error"
    assert summary([]) == "nothing to recover"
