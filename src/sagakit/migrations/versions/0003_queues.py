"""Queues: queue, concurrency_key and priority on saga_executions, the index of queued sagas,
the queues table, sagas in no queue only in the partial index of recoverable sagas
(PostgreSQL and SQLite), and queue in the (status, updated_at) index, which becomes (status,
queue, updated_at): MySQL/MariaDB's recovery scan reads it without passing over queued sagas.

Revision ID: 0003
Revises: 0002

Every new column is nullable or has a server default, so rows written before stay valid: they
are in no queue (recovery's, as before), with no key, at priority 0. The queues table's name
comes from ``queues_table`` (``saga_queues`` by default), like the other tables' names.

The downgrade changes the schema only and drops the queues table with its settings: an older
sagakit knows nothing of queues, and would recover submitted sagas as if they were its own, so
let the queues drain (or abort their sagas) before going back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_RECOVERABLE = "status IN ('COMPENSATING', 'PENDING', 'RUNNING', 'WAITING')"
_RECOVERY = _RECOVERABLE + " AND queue IS NULL"
_QUEUED = "queue IS NOT NULL"


def _names() -> tuple[str, str]:
    attributes = context.config.attributes
    return (attributes.get("executions_table", "saga_executions"),
            attributes.get("queues_table", "saga_queues"))


def _partial() -> bool:
    return op.get_bind().dialect.name in ("postgresql", "sqlite")


def _timestamp() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _queue_name() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.String(64).with_variant(
        mysql.VARCHAR(64, charset="ascii", collation="ascii_bin"), "mysql", "mariadb")


def _recreate_recoverable_index(executions: str, predicate: str) -> None:
    """The partial index of recoverable sagas, dropped and made again with ``predicate``
    (only where the dialect has partial indexes)."""
    if not _partial():
        return
    name = f"ix_{executions}_recoverable"
    op.drop_index(name, table_name=executions)
    where = sa.text(predicate)
    op.create_index(name, executions, ["updated_at", "saga_id"],
                    postgresql_where=where, sqlite_where=where)


def _recreate_status_index(executions: str, columns: list[str]) -> None:
    name = f"ix_{executions}_status_updated"
    op.drop_index(name, table_name=executions)
    op.create_index(name, executions, columns)


def upgrade() -> None:
    executions, queues = _names()
    op.add_column(executions, sa.Column("queue", _queue_name(), nullable=True))
    op.add_column(executions, sa.Column(
        "concurrency_key", sa.String(255).with_variant(
            mysql.VARCHAR(255, charset="utf8mb4", collation="utf8mb4_bin"), "mysql", "mariadb"),
        nullable=True))
    op.add_column(executions, sa.Column("priority", sa.Integer(), nullable=False,
                                        server_default="0"))
    where = sa.text(_QUEUED) if _partial() else None
    op.create_index(f"ix_{executions}_queued", executions,
                    ["queue", "status", sa.text("priority DESC"), "created_at", "saga_id"],
                    postgresql_where=where, sqlite_where=where)
    _recreate_recoverable_index(executions, _RECOVERY)
    _recreate_status_index(executions, ["status", "queue", "updated_at"])
    op.create_table(
        queues,
        sa.Column("name", _queue_name(), primary_key=True),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("key_concurrency", sa.Integer(), nullable=True),
        sa.Column("rate", sa.Double(), nullable=True),
        sa.Column("burst", sa.Double(), nullable=True),
        sa.Column("tokens", sa.Double(), nullable=True),
        sa.Column("refilled_at", _timestamp(), nullable=True),
        sa.Column("updated_at", _timestamp(), nullable=False),
    )


def downgrade() -> None:
    executions, queues = _names()
    op.drop_table(queues)
    _recreate_recoverable_index(executions, _RECOVERABLE)
    _recreate_status_index(executions, ["status", "updated_at"])
    op.drop_index(f"ix_{executions}_queued", table_name=executions)
    op.drop_column(executions, "priority")
    op.drop_column(executions, "concurrency_key")
    op.drop_column(executions, "queue")
