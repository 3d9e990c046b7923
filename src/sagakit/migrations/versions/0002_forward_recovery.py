"""Forward recovery: past_pivot and deadline_at on saga_executions, attempt on saga_logs, and
WAITING among the recoverable statuses of the partial index (PostgreSQL and SQLite).

Revision ID: 0002
Revises: 0001

Every new column is nullable or has a server default, so rows written before stay valid (not
past a pivot, no deadline, no attempt number). On SQLite the columns are added with ``ALTER
TABLE ... ADD COLUMN`` (and dropped by the downgrade with ``DROP COLUMN``, SQLite 3.35+).

The downgrade changes the schema only: an older sagakit knows neither the WAITING status nor
RETRYING log entries, so let waiting sagas finish (or abort them) before going back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_RECOVERABLE_BEFORE = "status IN ('COMPENSATING', 'PENDING', 'RUNNING')"
_RECOVERABLE_AFTER = "status IN ('COMPENSATING', 'PENDING', 'RUNNING', 'WAITING')"


def _names() -> tuple[str, str]:
    attributes = context.config.attributes
    return (attributes.get("executions_table", "saga_executions"),
            attributes.get("logs_table", "saga_logs"))


def _timestamp() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _recreate_recoverable_index(executions: str, predicate: str) -> None:
    """The partial index of recoverable sagas, dropped and made again with ``predicate``
    (only where the dialect has partial indexes)."""
    if op.get_bind().dialect.name not in ("postgresql", "sqlite"):
        return
    name = f"ix_{executions}_recoverable"
    op.drop_index(name, table_name=executions)
    where = sa.text(predicate)
    op.create_index(name, executions, ["updated_at", "saga_id"],
                    postgresql_where=where, sqlite_where=where)


def upgrade() -> None:
    executions, logs = _names()
    op.add_column(executions, sa.Column("past_pivot", sa.Boolean(), nullable=False,
                                        server_default=sa.false()))
    op.add_column(executions, sa.Column("deadline_at", _timestamp(), nullable=True))
    op.add_column(logs, sa.Column("attempt", sa.Integer(), nullable=True))
    _recreate_recoverable_index(executions, _RECOVERABLE_AFTER)


def downgrade() -> None:
    executions, logs = _names()
    _recreate_recoverable_index(executions, _RECOVERABLE_BEFORE)
    op.drop_column(logs, "attempt")
    op.drop_column(executions, "deadline_at")
    op.drop_column(executions, "past_pivot")
