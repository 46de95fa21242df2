"""Index only the token hashes that exist (a partial unique index).

Most sessions never get a resume token, yet each of them had an entry (NULL) in the
unique token index that every delete had to remove as well: cleanup deleting 10,000
expired rows of a million measured 20% faster without them. Lookups by hash are
unchanged (``token_hash = ?`` implies ``token_hash IS NOT NULL``, so both SQLite and
PostgreSQL still use the index), and so is uniqueness: NULLs never collided.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from sessionstore.schema: a migration must keep
# meaning what it meant when it was written.
_WHERE = "token_hash IS NOT NULL"


def upgrade() -> None:
    op.drop_index("ix_sessions_token_hash", table_name="sessions")
    op.create_index(
        "ix_sessions_token_hash",
        "sessions",
        ["token_hash"],
        unique=True,
        sqlite_where=sa.text(_WHERE),
        postgresql_where=sa.text(_WHERE),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_token_hash", table_name="sessions")
    op.create_index("ix_sessions_token_hash", "sessions", ["token_hash"], unique=True)
