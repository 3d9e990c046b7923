"""sagakit's tables: saga_executions and saga_logs.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import mysql, postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _names() -> tuple[str, str]:
    attributes = context.config.attributes
    return (attributes.get("executions_table", "saga_executions"),
            attributes.get("logs_table", "saga_logs"))


def _timestamp() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    executions, logs = _names()
    op.create_table(
        executions,
        sa.Column("saga_id", sa.Uuid(), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("context", sa.Text().with_variant(postgresql.JSONB(), "postgresql")
                  .with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("recovery_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", _timestamp(), nullable=True),
        sa.Column("next_attempt_at", _timestamp(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
    )
    op.create_index(f"ix_{executions}_status_updated", executions, ["status", "updated_at"])
    if op.get_bind().dialect.name in ("postgresql", "sqlite"):
        recoverable = sa.text("status IN ('COMPENSATING', 'PENDING', 'RUNNING')")
        op.create_index(f"ix_{executions}_recoverable", executions, ["updated_at", "saga_id"],
                        postgresql_where=recoverable, sqlite_where=recoverable)
    op.create_index(f"ix_{executions}_name_status", executions, ["name", "status"])
    op.create_index(f"ix_{executions}_created", executions, ["created_at"])
    op.create_table(
        logs,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("saga_id", sa.Uuid(), nullable=False),
        sa.Column("step_name", sa.String(255), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("details", sa.Text(), nullable=True),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
    )
    op.create_index(f"ix_{logs}_saga_id", logs, ["saga_id", "id"])


def downgrade() -> None:
    executions, logs = _names()
    op.drop_table(logs)
    op.drop_table(executions)
