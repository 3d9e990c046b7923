"""The SQL schema: three SQLAlchemy Core tables, one row per saga, one row per step log entry
and one row per configured queue.

``saga_executions``
    saga_id (PK), name, status, context (JSON; JSONB on PostgreSQL), version, recovery_attempts,
    fingerprint, lease_owner, lease_expires_at, next_attempt_at (recovery backoff; a WAITING
    saga's next attempt), created_at, updated_at, past_pivot, deadline_at, queue (NULL: a saga
    run in a process of its own; else the queue it was submitted to), concurrency_key, priority.
    Indexes: (status, queue, updated_at) and, on PostgreSQL and SQLite, a partial index on
    (updated_at, saga_id) of recoverable sagas in no queue for the recovery scan; (name,
    status); (created_at) for listing; (queue, status, priority DESC, created_at, saga_id) for
    the claims of queued sagas (partial, of queued sagas only, on PostgreSQL and SQLite).

``saga_logs``
    id (PK, autoincrement: the write order), saga_id, step_name, action, status, details,
    error_type, created_at, attempt. Index: (saga_id, id) for a saga's history in order.

``saga_queues``
    name (PK), concurrency, key_concurrency, rate, burst (a queue's limits, see
    :class:`sagakit.queue.QueueSettings`; NULL: no such limit), tokens and refilled_at (the rate
    limit's bucket as last counted; NULL: full), updated_at.

Columns added after the first release come last, where the migration adding them puts them
(``0002``: past_pivot, deadline_at, attempt; ``0003``: queue, concurrency_key, priority and
the queues table). Changes to existing tables go through the migrations
(:mod:`sagakit.migrations`): :meth:`SagaTables.create_missing` creates missing tables and
indexes only, and refuses tables that lack a column.

Timestamps are UTC (``timestamptz`` on PostgreSQL, ``DATETIME(6)`` holding UTC on MySQL/MariaDB).
Queue names and concurrency keys compare exactly on every backend (a binary collation on
MySQL/MariaDB, whose default ones ignore case). Table names are configurable and validated as
plain identifiers, together with the index names derived from them (``ix_<table>_<index>``),
against :data:`MAX_IDENTIFIER_LENGTH`: an executions table name has at most 45 characters, a
logs table name at most 52, a queues table name at most 63.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from sagakit.exceptions import SagaStorageError

__all__ = ["MAX_IDENTIFIER_LENGTH", "SagaTables", "build_tables", "validate_table_name"]

MAX_IDENTIFIER_LENGTH = 63
"""The longest name sagakit gives a table or an index: PostgreSQL's limit, the strictest of the
backends (MySQL/MariaDB allow 64, SQLite has none), so a schema fits wherever it moves."""

RECOVERABLE_SQL = "status IN ('COMPENSATING', 'PENDING', 'RUNNING', 'WAITING')"
"""The recoverable statuses as SQL."""

RECOVERY_SQL = RECOVERABLE_SQL + " AND queue IS NULL"
"""The recoverable sagas in no queue (the ones recovery takes) as SQL: the partial index's
predicate. The recovery scan uses this exact text, so the planner can match it to the index
(SQLite requires each of its terms to appear in the query as written)."""

QUEUED_SQL = "queue IS NOT NULL"
"""The queued sagas as SQL: the predicate of the partial index their claims read."""

UPGRADE_HINT = (
    "upgrade the tables with sagakit's migrations (await sagakit.migrations.upgrade(engine), "
    "or alembic upgrade head with script_location = sagakit:migrations)"
)
"""What to do about tables older than this version of sagakit (error messages end with it)."""

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_table_name(name: str) -> str:
    """Return ``name`` if it is a plain SQL identifier; raise ValueError otherwise."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ValueError(
            f"invalid table name {name!r}: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return name


def _index_name(table: str, index: str) -> str:
    return f"ix_{table}_{index}"


# The indexes of each table, by the suffix of their names.
_EXECUTIONS_INDEXES = ("status_updated", "recoverable", "name_status", "created", "queued")
_LOGS_INDEXES = ("saga_id",)


def _check_derived(option: str, table: str, indexes: tuple[str, ...]) -> None:
    """ValueError when an index name derived from ``table`` exceeds the identifier limit."""
    longest = _index_name(table, max(indexes, key=len))
    if len(longest) > MAX_IDENTIFIER_LENGTH:
        most = MAX_IDENTIFIER_LENGTH - (len(longest) - len(table))
        raise ValueError(
            f"{option} {table!r} is too long ({len(table)} characters): its index name "
            f"{longest!r} would have {len(longest)} characters, over the "
            f"{MAX_IDENTIFIER_LENGTH}-character identifier limit; {option} may have at most "
            f"{most} characters"
        )


def _timestamp() -> sa.types.TypeEngine[Any]:
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.Text().with_variant(postgresql.JSONB(), "postgresql").with_variant(
        mysql.LONGTEXT(), "mysql", "mariadb"
    )


def _queue_name() -> sa.types.TypeEngine[Any]:
    return sa.String(64).with_variant(
        mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")


def _key() -> sa.types.TypeEngine[Any]:
    return sa.String(255).with_variant(
        mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb")


def _has_partial_indexes(
    ddl: Any, target: Any, bind: Any, tables: Any = None, state: Any = None, *,
    dialect: Any, compiler: Any = None, checkfirst: bool = False,
) -> bool:
    return dialect.name in ("postgresql", "sqlite")


class SagaTables:
    """The three tables, bound to one MetaData. Raises ValueError, before anything is built, for
    a name that is not a plain identifier, that makes an index name longer than
    :data:`MAX_IDENTIFIER_LENGTH`, or that two tables share."""

    def __init__(
        self,
        executions_table: str = "saga_executions",
        logs_table: str = "saga_logs",
        metadata: sa.MetaData | None = None,
        queues_table: str = "saga_queues",
    ) -> None:
        self.metadata = metadata if metadata is not None else sa.MetaData()
        _check_derived("executions_table", validate_table_name(executions_table),
                       _EXECUTIONS_INDEXES)
        _check_derived("logs_table", validate_table_name(logs_table), _LOGS_INDEXES)
        validate_table_name(queues_table)
        options = [("executions_table", executions_table), ("logs_table", logs_table),
                   ("queues_table", queues_table)]
        for (first, name), (second, other) in itertools.combinations(options, 2):
            if name == other:
                raise ValueError(f"{first} and {second} are both {name!r}: "
                                 "the tables need different names")
        names = {suffix: _index_name(executions_table, suffix) for suffix in _EXECUTIONS_INDEXES}
        self.executions = sa.Table(
            executions_table,
            self.metadata,
            sa.Column("saga_id", sa.Uuid(), primary_key=True),
            sa.Column("name", sa.String(255), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("context", _json(), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("recovery_attempts", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("fingerprint", sa.String(64), nullable=True),
            sa.Column("lease_owner", sa.String(128), nullable=True),
            sa.Column("lease_expires_at", _timestamp(), nullable=True),
            sa.Column("next_attempt_at", _timestamp(), nullable=True),
            sa.Column("created_at", _timestamp(), nullable=False),
            sa.Column("updated_at", _timestamp(), nullable=False),
            sa.Column("past_pivot", sa.Boolean(), nullable=False, server_default=sa.false()),
            sa.Column("deadline_at", _timestamp(), nullable=True),
            sa.Column("queue", _queue_name(), nullable=True),
            sa.Column("concurrency_key", _key(), nullable=True),
            sa.Column("priority", sa.Integer(), nullable=False, server_default="0"),
            # MySQL/MariaDB's recovery scan (status = ? AND queue IS NULL, in updated_at
            # order) reads it without passing over queued sagas; listing by status too.
            sa.Index(names["status_updated"], "status", "queue", "updated_at"),
            # The recovery scan, in its order, over recoverable sagas in no queue only
            # (PostgreSQL and SQLite have partial indexes; MySQL/MariaDB use the index above).
            sa.Index(
                names["recoverable"], "updated_at", "saga_id",
                postgresql_where=sa.text(RECOVERY_SQL), sqlite_where=sa.text(RECOVERY_SQL),
            ).ddl_if(callable_=_has_partial_indexes),
            sa.Index(names["name_status"], "name", "status"),
            sa.Index(names["created"], "created_at"),
        )
        t = self.executions
        # The claims of a queue's sagas, one status at a time, in their order: highest
        # priority, then oldest, first. Sagas in no queue are left out where the dialect has
        # partial indexes, so sagas run in their own process pay nothing for it there.
        sa.Index(names["queued"], t.c.queue, t.c.status, t.c.priority.desc(), t.c.created_at,
                 t.c.saga_id, postgresql_where=sa.text(QUEUED_SQL),
                 sqlite_where=sa.text(QUEUED_SQL))
        self.logs = sa.Table(
            logs_table,
            self.metadata,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                      primary_key=True, autoincrement=True),
            sa.Column("saga_id", sa.Uuid(), nullable=False),
            sa.Column("step_name", sa.String(255), nullable=False),
            sa.Column("action", sa.String(16), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("details", sa.Text(), nullable=True),
            sa.Column("error_type", sa.String(255), nullable=True),
            sa.Column("created_at", _timestamp(), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=True),
            sa.Index(_index_name(logs_table, "saga_id"), "saga_id", "id"),
        )
        self.queues = sa.Table(
            queues_table,
            self.metadata,
            sa.Column("name", _queue_name(), primary_key=True),
            sa.Column("concurrency", sa.Integer(), nullable=True),
            sa.Column("key_concurrency", sa.Integer(), nullable=True),
            sa.Column("rate", sa.Double(), nullable=True),
            sa.Column("burst", sa.Double(), nullable=True),
            sa.Column("tokens", sa.Double(), nullable=True),
            sa.Column("refilled_at", _timestamp(), nullable=True),
            sa.Column("updated_at", _timestamp(), nullable=False),
        )

    def create_missing(self, connection: sa.Connection) -> None:
        """Create whatever part of the schema is missing: a missing table with its indexes,
        and each missing index of a table that exists (``create_all`` checks tables only).
        Completes a schema an interrupted or failed creation left half-built (MySQL/MariaDB
        commit each CREATE at once); on a complete schema it only reads the catalog.

        Columns are not added: a table made by an older sagakit raises SagaStorageError naming
        the missing columns and the migrations to run, before anything is created."""
        inspector = sa.inspect(connection)
        tables = (self.executions, self.logs, self.queues)
        for table in tables:
            if inspector.has_table(table.name):
                _check_columns(table, inspector)
        for table in tables:
            if not inspector.has_table(table.name):
                table.create(connection)
                continue
            present = {index["name"] for index in inspector.get_indexes(table.name)}
            for index in sorted(table.indexes, key=lambda index: str(index.name)):
                if index.name not in present:
                    index.create(connection)  # honours ddl_if: no partial index on MySQL


def _check_columns(table: sa.Table, inspector: Any) -> None:
    present = {column["name"] for column in inspector.get_columns(table.name)}
    missing = [column.name for column in table.columns if column.name not in present]
    if missing:
        raise SagaStorageError(
            f"table {table.name} lacks the columns {', '.join(missing)}: it was made by an "
            f"older sagakit; {UPGRADE_HINT}")


def build_tables(
    executions_table: str = "saga_executions",
    logs_table: str = "saga_logs",
    metadata: sa.MetaData | None = None,
    queues_table: str = "saga_queues",
) -> SagaTables:
    """The sagakit tables under the given names (validated)."""
    return SagaTables(executions_table, logs_table, metadata, queues_table)
