"""Create the sessions table, its indexes and the sessions_readable view.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import sqlite

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EPOCH: sa.Double[float] = sa.Double().with_variant(sqlite.REAL(), "sqlite")

_VIEW = {
    "sqlite": """
CREATE VIEW sessions_readable AS
SELECT session_id,
       strftime('%Y-%m-%dT%H:%M:%fZ', created_at, 'unixepoch') AS created_utc,
       strftime('%Y-%m-%dT%H:%M:%fZ', last_activity, 'unixepoch') AS last_activity_utc,
       round((julianday('now') - 2440587.5) * 86400.0 - last_activity, 3) AS idle_secs,
       version,
       length(data) AS data_bytes,
       data
FROM sessions
""",
    "postgresql": """
CREATE VIEW sessions_readable AS
SELECT session_id,
       to_char(to_timestamp(created_at) AT TIME ZONE 'UTC',
               'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS created_utc,
       to_char(to_timestamp(last_activity) AT TIME ZONE 'UTC',
               'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS last_activity_utc,
       round((extract(epoch FROM clock_timestamp()) - last_activity)::numeric, 3) AS idle_secs,
       version,
       octet_length(data) AS data_bytes,
       data
FROM sessions
""",
}


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("created_at", _EPOCH, nullable=False),
        sa.Column("last_activity", _EPOCH, nullable=False),
        sa.Column("data", sa.Text(), server_default="{}", nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column("token_hash", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_sessions_last_activity", "sessions", ["last_activity"])
    op.create_index("ix_sessions_token_hash", "sessions", ["token_hash"], unique=True)
    dialect = op.get_bind().dialect.name
    op.execute(_VIEW.get(dialect, _VIEW["sqlite"]))


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS sessions_readable")
    op.drop_index("ix_sessions_token_hash", table_name="sessions")
    op.drop_index("ix_sessions_last_activity", table_name="sessions")
    op.drop_table("sessions")
