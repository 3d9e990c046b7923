"""The ``sagakit`` command: inspect, draw, recover and operate stored sagas.

``sagakit --url sqlite+aiosqlite:///sagas.db list`` (or ``SAGAKIT_DATABASE_URL``). Subcommands:
``list``, ``show``, ``diagram``, ``recover``, ``worker``, ``resume``, ``abort`` and ``demo``; see
``docs/cli.md`` or ``sagakit COMMAND --help``.

Exit codes: 0 success; 1 the command ran but a saga it touched is not terminal (or a recovery
attempt failed); 2 usage (bad arguments, URL, ``module:Class`` or saga definition); 3 no saga
with that id; 4 the database cannot be reached or answered with an error; 5 the saga is leased
by a live run; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib
import json
import logging
import os
import signal
import sys
import threading
import types
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from uuid import UUID

from sagakit import settings
from sagakit.exceptions import (
    SagaBusyError,
    SagaDefinitionError,
    SagaNotFoundError,
    SagaPastPivotError,
    SagaStorageError,
    SagaStorageUnavailableError,
)
from sagakit.records import TERMINAL_STATUSES, SagaLogEntry, SagaState, SagaStatus
from sagakit.saga import Saga

if TYPE_CHECKING:
    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage
    from sagakit.worker import RecoveryOutcome

__all__ = [
    "EXIT_BUSY",
    "EXIT_DATABASE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNFINISHED",
    "EXIT_USAGE",
    "CliError",
    "load_saga",
    "main",
]

EXIT_OK = 0
EXIT_UNFINISHED = 1
"""The command ran, but a saga it touched is not terminal, or a recovery attempt failed."""
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_DATABASE = 4
EXIT_BUSY = 5
EXIT_INTERRUPTED = 130

URL_ENV = "SAGAKIT_DATABASE_URL"
PROG = "sagakit"

logger = logging.getLogger("sagakit.cli")

SagaClass = type[Saga[Any]]


class CliError(Exception):
    """A failure reported as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- loading saga definitions ----------------------------------------------------------------


def _import(module_name: str) -> types.ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise CliError(f"cannot import module {module_name!r}: no module named {missing!r} "
                           f"(run from the directory that contains it, or set PYTHONPATH)"
                           ) from None
        raise CliError(f"importing {module_name!r} failed: {_one_line(exc)}") from None
    except Exception as exc:
        raise CliError(f"importing {module_name!r} failed: {type(exc).__name__}: "
                       f"{_one_line(exc)}") from None


def load_saga(spec: str) -> SagaClass:
    """The saga class named by ``module:Class`` (``module:Outer.Inner`` for a nested class).
    Raises :class:`CliError` (exit code 2) when it cannot be loaded or is not a saga."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"bad saga {spec!r}: expected module:SagaClass, "
                       "e.g. myapp.sagas:OrderSaga")
    found: Any = _import(module_name)
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise CliError(f"bad saga {spec!r}: module {module_name!r} has no attribute "
                           f"{attribute!r}") from None
    if not (isinstance(found, type) and issubclass(found, Saga)) or found is Saga:
        raise CliError(f"bad saga {spec!r}: {attribute} is not a sagakit.Saga subclass")
    return found


def _sagas_in(module: types.ModuleType) -> list[SagaClass]:
    return [value for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, Saga) and value is not Saga]


def _definitions(args: argparse.Namespace) -> list[SagaClass]:
    """The sagas named by ``--saga`` and those found in ``--import`` modules, one per name."""
    found: list[SagaClass] = [load_saga(spec) for spec in getattr(args, "saga", None) or ()]
    for module_name in getattr(args, "imports", None) or ():
        found.extend(_sagas_in(_import(module_name)))
    by_name: dict[str, SagaClass] = {}
    for saga in found:
        other = by_name.setdefault(saga.name, saga)
        if other is not saga:
            raise CliError(f"two saga definitions are named {saga.name!r}: "
                           f"{_qualname(other)} and {_qualname(saga)}")
    return list(by_name.values())


def _require_definitions(args: argparse.Namespace) -> list[SagaClass]:
    sagas = _definitions(args)
    if not sagas:
        raise CliError("no saga definition given: pass --saga module:SagaClass "
                       "(or --import module)")
    return sagas


def _definition_for(args: argparse.Namespace, state: SagaState) -> SagaClass:
    sagas = _definitions(args)
    for saga in sagas:
        if saga.name == state.name:
            return saga
    if not sagas:
        raise CliError(f"saga {state.saga_id} is a {state.name!r} saga: pass --saga "
                       "module:SagaClass for it (or --import the module that defines it)")
    names = ", ".join(repr(s.name) for s in sagas)
    raise CliError(f"saga {state.saga_id} is a {state.name!r} saga; no definition given has "
                   f"that name (given: {names})")


def _qualname(saga: SagaClass) -> str:
    return f"{saga.__module__}:{saga.__qualname__}"


# -- storage ------------------------------------------------------------------------------------


def _open_storage(args: argparse.Namespace) -> SqlAlchemySagaStorage:
    import sqlalchemy as sa
    from sqlalchemy import exc as sa_exc

    from sagakit.storage.sqlalchemy import SqlAlchemySagaStorage

    url = args.url or os.environ.get(URL_ENV, "")
    if not url:
        raise CliError(f"no database: pass --url or set {URL_ENV} "
                       "(e.g. sqlite+aiosqlite:///sagas.db)")
    try:
        parsed = sa.engine.make_url(url)
    except sa_exc.ArgumentError:
        raise CliError(f"bad database URL {url!r}: expected dialect+driver://..., "
                       "e.g. sqlite+aiosqlite:///sagas.db") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        storage = SqlAlchemySagaStorage.from_url(
            url, executions_table=args.executions_table, logs_table=args.logs_table
        )
    except ImportError as exc:
        raise CliError(f"bad database URL {shown}: {_one_line(exc)}") from None
    except ValueError as exc:  # a table name that is not an identifier, or too long
        raise CliError(_one_line(exc)) from None
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, sa_exc.InvalidRequestError) as exc:
        raise CliError(f"bad database URL {shown}: {_one_line(exc)}") from None
    if parsed.get_backend_name() == "sqlite":  # don't let SQLite create an empty file
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:") and not (
            Path(database).is_file()
        ):
            raise CliError(f"cannot reach the database {shown}: no such SQLite file "
                           f"{database!r}", EXIT_DATABASE)
    return storage


def _database_error(exc: BaseException) -> CliError | None:
    """The CliError for a database failure, or None when ``exc`` is not one."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, SagaStorageError):
        cause = exc.__cause__
        inner = cause.orig if isinstance(cause, sa_exc.DBAPIError) and cause.orig else cause
        text = f"{type(inner).__name__}: {_one_line(inner)}" if inner else _one_line(exc)
        if isinstance(exc, SagaStorageUnavailableError):
            return CliError(f"cannot reach the database: {text}", EXIT_DATABASE)
        return CliError(f"database error: {text} (is the schema created, and are "
                        "--executions-table/--logs-table right?)", EXIT_DATABASE)
    if isinstance(exc, sa_exc.DBAPIError):
        original = exc.orig if exc.orig is not None else exc
        text = _one_line(original) or type(original).__name__
        if exc.connection_invalidated or _looks_unreachable(original):
            return CliError(f"cannot reach the database: {text}", EXIT_DATABASE)
        return CliError(f"database error: {text} (is the schema created, and are "
                        "--executions-table/--logs-table right?)", EXIT_DATABASE)
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return CliError(f"database error: {_one_line(exc)}", EXIT_DATABASE)
    if isinstance(exc, OSError | TimeoutError):
        return CliError(f"cannot reach the database: {type(exc).__name__}: {_one_line(exc)}",
                        EXIT_DATABASE)
    return None


def _looks_unreachable(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return first[:500]


Command = Callable[[argparse.Namespace, "SqlAlchemySagaStorage"], Awaitable[int]]


def _with_storage(args: argparse.Namespace, command: Command) -> int:
    storage = _open_storage(args)

    async def run() -> int:
        try:
            return await command(args, storage)
        finally:
            await storage.close()

    return _run_async(run())


def _run_async(coro: Awaitable[int]) -> int:
    async def guarded() -> int:
        try:
            return await coro
        except CliError:
            raise
        except SagaNotFoundError as exc:
            raise CliError(_one_line(exc), EXIT_NOT_FOUND) from None
        except SagaBusyError as exc:
            raise CliError(f"{_one_line(exc)} (leased by a live run; try again later)",
                           EXIT_BUSY) from None
        except (SagaDefinitionError, SagaPastPivotError) as exc:
            raise CliError(_one_line(exc), EXIT_UNFINISHED) from None
        except Exception as exc:
            error = _database_error(exc)
            if error is None:
                raise
            raise error from None

    return asyncio.run(guarded())


# -- formatting ---------------------------------------------------------------------------------


def _when(moment: dt.datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _status(state: SagaState) -> str:
    """A saga's status, and for a waiting one when its next attempt is due."""
    if state.status is SagaStatus.WAITING and state.next_attempt_at is not None:
        return f"WAITING until {_when(state.next_attempt_at)}"
    return state.status.value


def _lease(state: SagaState, now: dt.datetime) -> str:
    if not state.lease_owner:
        return "-"
    expires = state.lease_expires_at
    if expires is not None and expires <= now:
        return f"{state.lease_owner} (expired)"
    return state.lease_owner


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    body = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in body) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             .rstrip() for row in body]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, SagaStatus):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _state_json(state: SagaState, *, context: bool) -> dict[str, Any]:
    data = {f.name: _jsonable(getattr(state, f.name)) for f in dataclasses.fields(state)}
    if not context:
        data.pop("context", None)
    return data


def _entry_json(entry: SagaLogEntry) -> dict[str, Any]:
    return {
        "step_name": entry.step_name,
        "action": str(entry.action),
        "status": str(entry.status),
        "timestamp": _jsonable(entry.timestamp),
        "error_type": entry.error_type,
        "details": entry.details,
        "attempt": entry.attempt,
    }


def _print_json(data: Any, out: TextIO | None = None) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str), file=out or sys.stdout)


def _status_arg(text: str) -> SagaStatus:
    try:
        return SagaStatus(text.upper())
    except ValueError:
        choices = ", ".join(s.value for s in SagaStatus)
        raise argparse.ArgumentTypeError(f"unknown status {text!r} (choose from {choices})"
                                         ) from None


class _Checked(argparse.Action):
    """Stores a numeric option once ``check(flag, value)`` (a :mod:`sagakit.settings` check)
    accepts it; a refused value (NaN, infinite, out of range) is a usage error naming the
    flag."""

    def __init__(self, *args: Any, check: Callable[[str, Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.check = check

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            value = self.check(option_string or self.dest, values)
        except ValueError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, value)


def _lease_seconds(flag: str, value: float) -> float:
    return settings.lease_seconds(value, flag)


def _max_attempts(flag: str, value: int) -> int:
    return settings.recovery_attempts(value, flag)


def _poll_interval(flag: str, value: float) -> float:
    return settings.seconds(flag, value, exclusive=True)


def _saga_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise CliError(f"bad saga id {text!r}: expected a UUID such as "
                       "3f2a9c1e-0b7d-4c55-9a39-5f7f4c8d2e10") from None


# -- commands -----------------------------------------------------------------------------------


async def _list(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    statuses = frozenset(args.status) if args.status else None
    states = await storage.list_sagas(statuses=statuses, saga_name=args.name, limit=args.limit)
    if args.json:
        _print_json([_state_json(s, context=False) for s in states])
        return EXIT_OK
    if not states:
        print("no sagas found")
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    rows = [(str(s.saga_id), s.name, _status(s), str(s.version), str(s.recovery_attempts),
             _when(s.updated_at), _lease(s, now)) for s in states]
    print(_table(("ID", "NAME", "STATUS", "VERSION", "ATTEMPTS", "UPDATED (UTC)", "LEASE OWNER"),
                 rows))
    return EXIT_OK


async def _show(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    saga_id = _saga_id(args.saga_id)
    state = await storage.get_saga(saga_id)
    history = await storage.get_step_history(saga_id)
    if args.json:
        data = _state_json(state, context=True)
        data["history"] = [_entry_json(e) for e in history]
        _print_json(data)
        return EXIT_OK
    now = dt.datetime.now(dt.UTC)
    lease = _lease(state, now)
    if state.lease_owner:
        lease += f" until {_when(state.lease_expires_at)}"
    fields = [
        ("saga", str(state.saga_id)),
        ("name", state.name),
        ("status", state.status.value),
        ("version", str(state.version)),
        ("attempts", str(state.recovery_attempts)),
        ("created", _when(state.created_at)),
        ("updated", _when(state.updated_at)),
        ("lease", lease),
        ("next attempt", _when(state.next_attempt_at)),
        ("fingerprint", state.fingerprint or "-"),
    ]
    if state.deadline_at is not None:
        fields.append(("deadline", _when(state.deadline_at)))
    if state.past_pivot:
        fields.append(("past pivot", "yes"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    print("context:")
    text = json.dumps(state.context, indent=2, ensure_ascii=False, default=str)
    print("\n".join("  " + line for line in text.splitlines()))
    if not history:
        print("steps: none recorded")
        return EXIT_OK
    print("steps:")
    attempts = any(entry.attempt is not None for entry in history)  # else no ATTEMPT column
    rows = []
    for number, entry in enumerate(history, start=1):
        error = _clip(entry.details) or entry.error_type or ""
        attempt = [] if not attempts else [str(entry.attempt or "")]
        rows.append((str(number), _when(entry.timestamp), entry.step_name, str(entry.action),
                     str(entry.status), *attempt, error))
    headers = ("#", "TIME (UTC)", "STEP", "ACTION", "STATUS", *(["ATTEMPT"] * attempts), "ERROR")
    table = _table(headers, rows)
    print("\n".join("  " + line for line in table.splitlines()))
    return EXIT_OK


def _clip(text: str | None, limit: int = 100) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _diagram(args: argparse.Namespace) -> int:
    from sagakit import diagram

    if ":" in args.target:
        if args.saga or args.imports:
            raise CliError("diagram module:SagaClass draws that definition: "
                           "--saga and --import are for a saga id")
        saga = load_saga(args.target)
        print(diagram.sequence(saga) if args.sequence else diagram.flowchart(saga), end="")
        return EXIT_OK
    try:
        saga_id = UUID(args.target)
    except ValueError:
        raise CliError(f"bad diagram target {args.target!r}: expected module:SagaClass "
                       "(a definition) or a saga id") from None
    if args.sequence:
        raise CliError("--sequence draws a definition: use diagram module:SagaClass --sequence")

    async def instance(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
        state = await storage.get_saga(saga_id)
        history = await storage.get_step_history(saga_id)
        saga = _definition_for(args, state)
        print(diagram.instance_flowchart(saga, state, history), end="")
        return EXIT_OK

    return _with_storage(args, instance)


@dataclasses.dataclass
class _Outcome:
    saga_id: UUID
    name: str
    status: SagaStatus | None = None
    before: SagaStatus | None = None
    error: str | None = None
    busy: bool = False

    def ok(self) -> bool:
        return self.busy or (self.status in TERMINAL_STATUSES and self.error is None)

    def json(self) -> dict[str, Any]:
        return {
            "saga_id": str(self.saga_id),
            "name": self.name,
            "status_before": self.before.value if self.before else None,
            "status": self.status.value if self.status else None,
            "error": self.error,
            "busy": self.busy,
        }

    def line(self) -> str:
        if self.busy:
            result = "skipped: leased by another run"
        elif self.error is not None:
            result = f"error: {self.error}"
        else:
            assert self.status is not None
            result = self.status.value
            if self.before is not None:
                result = f"{self.before.value} -> {result}"
            if self.status is SagaStatus.PARKED:
                result += " (parked: resume or abort it)"
            elif self.status is SagaStatus.WAITING:
                result += " (waiting: recovery resumes it when its next attempt is due)"
            elif self.status not in TERMINAL_STATUSES:
                result += " (not finished: recovery will try again)"
        return f"{self.saga_id}  {self.name}  {result}"


def _report(args: argparse.Namespace, outcomes: Sequence[_Outcome], *, many: bool) -> int:
    if args.json:
        _print_json([o.json() for o in outcomes] if many else outcomes[0].json())
    elif not outcomes:
        print("nothing to recover")
    else:
        for outcome in outcomes:
            print(outcome.line())
    return EXIT_OK if all(o.ok() for o in outcomes) else EXIT_UNFINISHED


def _explicit(action: str) -> Command:
    """recover / resume / abort of one saga by id."""

    async def command(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
        from sagakit.recovery import abort_saga, recover_saga, resume_saga

        saga_id = _saga_id(args.saga_id)
        state = await storage.get_saga(saga_id)
        saga = _definition_for(args, state)
        if action == "recover":
            status = await recover_saga(saga, saga_id, storage=storage,
                                        max_recovery_attempts=args.max_attempts,
                                        lease_seconds=args.lease_seconds)
        elif action == "resume":
            status = await resume_saga(saga, saga_id, storage=storage,
                                       lease_seconds=args.lease_seconds)
        else:
            status = await abort_saga(saga, saga_id, storage=storage, reason=args.reason,
                                      lease_seconds=args.lease_seconds)
        return _report(args, [_Outcome(saga_id, state.name, status, before=state.status)],
                       many=False)

    return command


async def _recover_all(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    from sagakit.recovery import RecoveryOptions
    from sagakit.worker import RecoveryWorker

    sagas = _require_definitions(args)
    options = RecoveryOptions(max_recovery_attempts=args.max_attempts,
                              lease_seconds=args.lease_seconds)
    workers = [
        RecoveryWorker(storage, [saga], concurrency=args.concurrency, saga_name=saga.name,
                       stale_after_seconds=args.stale_after, options=options)
        for saga in sagas
    ]
    seen: dict[UUID, _Outcome] = {}
    progress = True
    while progress:  # until a round of polls finds no saga not handled yet
        progress = False
        for saga, worker in zip(sagas, workers, strict=True):
            for outcome in await worker.run_once():
                if outcome.saga_id in seen and not seen[outcome.saga_id].busy:
                    continue
                progress = progress or outcome.saga_id not in seen
                seen[outcome.saga_id] = _outcome(saga.name, outcome)
    return _report(args, list(seen.values()), many=True)


def _outcome(name: str, outcome: RecoveryOutcome) -> _Outcome:
    error = None
    if outcome.error is not None and not outcome.busy:
        error = f"{type(outcome.error).__name__}: {_one_line(outcome.error)}"
    return _Outcome(outcome.saga_id, name, outcome.status, error=error, busy=outcome.busy)


def _recover(args: argparse.Namespace) -> int:
    if args.all == (args.saga_id is not None):
        raise CliError("recover needs a SAGA_ID or --all (not both)")
    if args.all:
        return _with_storage(args, _recover_all)
    return _with_storage(args, _explicit("recover"))


async def _worker(args: argparse.Namespace, storage: SqlAlchemySagaStorage) -> int:
    from sagakit.recovery import RecoveryOptions
    from sagakit.worker import RecoveryWorker

    sagas = _require_definitions(args)
    await storage.list_sagas(limit=1)  # fail fast (exit 4) when the database is not there
    worker = RecoveryWorker(
        storage, sagas, concurrency=args.concurrency, poll_interval=args.poll_interval,
        stale_after_seconds=args.stale_after, shutdown_timeout=args.shutdown_timeout,
        options=RecoveryOptions(max_recovery_attempts=args.max_attempts,
                                lease_seconds=args.lease_seconds),
    )
    names = ", ".join(s.name for s in sagas)
    logger.info("worker started (pid %d): sagas %s, concurrency %d, polling every %gs",
                os.getpid(), names, args.concurrency, args.poll_interval)
    await worker.run()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate_early)  # a second SIGTERM while closing: rc 0
    logger.info("worker stopped after %d recovery attempts", len(worker.outcomes))
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from sagakit.demo import main as demo_main

    return demo_main(["--keep"] if args.keep else [])


# -- the parser ---------------------------------------------------------------------------------


def _common(suppress: bool) -> argparse.ArgumentParser:
    """--url and friends, accepted before and after the subcommand."""
    parser = argparse.ArgumentParser(add_help=False)
    default: Any = argparse.SUPPRESS

    def value(normal: Any) -> Any:
        return default if suppress else normal

    group = parser.add_argument_group("database")
    group.add_argument("--url", default=value(None), metavar="URL",
                       help=f"SQLAlchemy async database URL (default: ${URL_ENV}), "
                            "e.g. sqlite+aiosqlite:///sagas.db")
    group.add_argument("--executions-table", default=value("saga_executions"), metavar="NAME",
                       help="saga table name (default: saga_executions)")
    group.add_argument("--logs-table", default=value("saga_logs"), metavar="NAME",
                       help="step log table name (default: saga_logs)")
    parser.add_argument("-v", "--verbose", action="store_true", default=value(False),
                        help="log more (and show tracebacks of unexpected errors)")
    return parser


def _definition_options(parser: argparse.ArgumentParser, *, required_hint: str) -> None:
    parser.add_argument("--saga", action="append", default=[], metavar="MODULE:CLASS",
                        help=f"a saga definition, e.g. myapp.sagas:OrderSaga (repeatable); "
                             f"{required_hint}")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="import MODULE and use the saga classes in it (repeatable)")


def _recovery_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-attempts", type=int, action=_Checked, check=_max_attempts,
                        default=5, metavar="N",
                        help="recovery attempts before a saga is parked (default: 5)")
    _lease_option(parser, "lease taken on a saga while it runs (default: 30)")


def _lease_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--lease-seconds", type=float, action=_Checked, check=_lease_seconds,
                        default=30.0, metavar="S", help=f"{text}; at least 0.1")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sagakit`` command."""
    from sagakit import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[_common(False)],
        description="Inspect, draw, recover and operate sagakit sagas stored in a database.",
        epilog="exit codes: 0 ok, 1 a saga is not terminal or an attempt failed, 2 usage, "
               "3 unknown saga id, 4 database unreachable or failing, 5 saga busy, "
               "130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"sagakit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = [_common(True)]

    p = commands.add_parser("list", parents=common, help="list stored sagas, newest first")
    p.add_argument("--status", action="append", type=_status_arg, default=[], metavar="STATUS",
                   help="only sagas with this status (repeatable)")
    p.add_argument("--name", metavar="NAME", help="only sagas with this saga name")
    p.add_argument("--limit", type=int, action=_Checked, check=settings.count, default=50,
                   metavar="N",
                   help="at most N (default: 50)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=lambda a: _with_storage(a, _list))

    p = commands.add_parser("show", parents=common,
                            help="one saga: status, context and step history")
    p.add_argument("saga_id", metavar="SAGA_ID")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=lambda a: _with_storage(a, _show))

    p = commands.add_parser(
        "diagram", parents=common, help="print a Mermaid diagram",
        description="diagram module:SagaClass prints the definition's flowchart (--sequence: "
                    "its sequence diagram); diagram SAGA_ID prints the stored saga's flowchart, "
                    "coloured by its step log.",
    )
    p.add_argument("target", metavar="MODULE:CLASS|SAGA_ID")
    p.add_argument("--sequence", action="store_true",
                   help="a sequence diagram instead of a flowchart (definitions only)")
    _definition_options(p, required_hint="for SAGA_ID (else found by name in --import modules)")
    p.set_defaults(run=_diagram)

    p = commands.add_parser("recover", parents=common,
                            help="recover one interrupted saga, or all of them")
    p.add_argument("saga_id", nargs="?", metavar="SAGA_ID")
    p.add_argument("--all", action="store_true",
                   help="recover every saga due for recovery, until none is left")
    _definition_options(p, required_hint="required with --all")
    _recovery_options(p)
    p.add_argument("--concurrency", type=int, action=_Checked, check=settings.count,
                   default=4, metavar="N", help="sagas recovered at once with --all (default: 4)")
    p.add_argument("--stale-after", type=float, action=_Checked, check=settings.seconds,
                   default=None, metavar="S",
                   help="with --all, only sagas not updated for S seconds")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_recover)

    p = commands.add_parser("worker", parents=common,
                            help="run a recovery worker until SIGTERM/SIGINT")
    _definition_options(p, required_hint="at least one (or --import)")
    _recovery_options(p)
    p.add_argument("--concurrency", type=int, action=_Checked, check=settings.count,
                   default=4, metavar="N", help="sagas recovered at once (default: 4)")
    p.add_argument("--poll-interval", type=float, action=_Checked, check=_poll_interval,
                   default=1.0, metavar="S",
                   help="seconds between polls that found nothing (default: 1)")
    p.add_argument("--stale-after", type=float, action=_Checked, check=settings.seconds,
                   default=None, metavar="S", help="only sagas not updated for S seconds")
    p.add_argument("--shutdown-timeout", type=float, action=_Checked, check=settings.seconds,
                   default=30.0, metavar="S",
                   help="on SIGTERM, wait this long for sagas in hand (default: 30)")
    p.set_defaults(run=lambda a: _with_storage(a, _worker))

    p = commands.add_parser("resume", parents=common, help="resume a PARKED saga")
    p.add_argument("saga_id", metavar="SAGA_ID")
    _definition_options(p, required_hint="or --import")
    _lease_option(p, "lease taken on the saga while it runs (default: 30)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=lambda a: _with_storage(a, _explicit("resume")))

    p = commands.add_parser("abort", parents=common,
                            help="compensate a saga now (e.g. a PARKED one)")
    p.add_argument("saga_id", metavar="SAGA_ID")
    _definition_options(p, required_hint="or --import")
    p.add_argument("--reason", default="aborted by operator", metavar="TEXT",
                   help="recorded in the step log (default: 'aborted by operator')")
    _lease_option(p, "lease taken on the saga while it runs (default: 30)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=lambda a: _with_storage(a, _explicit("abort")))

    p = commands.add_parser("demo", help="run the crash-and-recovery demo on a temporary SQLite")
    p.add_argument("--keep", action="store_true", help="keep the SQLite database")
    p.set_defaults(run=_demo)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    if args.command == "worker":
        level = logging.DEBUG if args.verbose else logging.INFO
    else:
        level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _Terminated(BaseException):
    """SIGTERM arrived before the worker was ready to shut down gracefully."""


def _terminate_early(signum: int, frame: Any) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sagakit`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    if args.command == "worker" and threading.current_thread() is threading.main_thread():
        # Until the worker installs its graceful handler, SIGTERM (a deploy that changed its
        # mind, a supervisor stopping a worker still starting) ends the command cleanly, rc 0:
        # nothing is in hand yet.
        signal.signal(signal.SIGTERM, _terminate_early)
    try:
        code: int = args.run(args)
    except _Terminated:
        logger.info("worker stopped during start-up (SIGTERM)")
        return EXIT_OK
    except CliError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `sagakit list | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.verbose:
            raise
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {_one_line(exc)} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_UNFINISHED
    return code
