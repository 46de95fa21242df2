"""Schema migrations: one code path for the CLI, the daemon and ``alembic`` itself.

The alembic scripts live in the top-level ``migrations/`` of a checkout and ship inside
the wheel as ``sessionstore/_migrations``; :func:`script_location` finds whichever is
there. The library checks the schema on every start and upgrades it in-process under
the database's write lock, so two daemons starting at once do not both migrate, and a
crash mid-migration rolls back (SQLite and PostgreSQL both have transactional DDL).
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Column, MetaData, String, Table, inspect, select
from sqlalchemy.engine import Connection

from .errors import ForeignDatabaseError, UnknownRevisionError

__all__ = [
    "SchemaState",
    "alembic_config",
    "head_revision",
    "inspect_schema",
    "run_env",
    "script_location",
    "upgrade_locked",
    "validate",
]

VERSION_TABLE = "alembic_version"


def script_location() -> Path:
    """The directory of alembic scripts: packaged copy first, then the checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"sessionstore migrations not found next to {here}")


def alembic_config(database: str | None = None) -> Config:
    """An alembic Config that needs no ini file (used in-process and by the CLI)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("path_separator", "os")
    if database is not None:
        cfg.attributes["database"] = database
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError("sessionstore has no migrations")
    return head


def known_revisions() -> frozenset[str]:
    """Every revision id in the migration scripts."""
    return frozenset(s.revision for s in _scripts().walk_revisions())


@dataclass(frozen=True, slots=True)
class SchemaState:
    """What a database holds before sessionstore touches it."""

    tables: frozenset[str]
    revision: str | None

    @property
    def empty(self) -> bool:
        """No tables but alembic's own (possibly empty) one: a new database, or base."""
        return self.tables <= {VERSION_TABLE} and self.revision is None


def inspect_schema(conn: Connection) -> SchemaState:
    """Read the table names and the alembic revision; writes nothing."""
    tables = frozenset(inspect(conn).get_table_names())
    revision = None
    if VERSION_TABLE in tables:
        version = Table(VERSION_TABLE, MetaData(), Column("version_num", String))
        revision = conn.execute(select(version.c.version_num)).scalar()
    return SchemaState(tables=tables, revision=revision)


def validate(state: SchemaState, label: str) -> None:
    """Refuse a database that is not ours, or that is newer than this code.

    Raises:
        ForeignDatabaseError: tables but no alembic revision of ours.
        UnknownRevisionError: a revision the migration scripts do not contain.
    """
    if state.empty:
        return
    if state.revision is None:
        names = ", ".join(sorted(state.tables)[:5])
        raise ForeignDatabaseError(
            f"{label}: not a sessionstore database (it has tables {names} and no "
            f"{VERSION_TABLE}); refusing to touch it"
        )
    if state.revision not in known_revisions():
        raise UnknownRevisionError(
            f"{label}: database is at schema revision {state.revision!r}, which this "
            f"version of sessionstore does not know (newest known: {head_revision()!r}); "
            "upgrade sessionstore"
        )


def upgrade_locked(conn: Connection, label: str, target: str = "head") -> None:
    """Upgrade inside the caller's write transaction, after looking again.

    The caller holds the write lock (``BEGIN IMMEDIATE``), so a second process that
    raced us here sees the schema we just committed and does nothing.
    """
    validate(inspect_schema(conn), label)
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, target)


def downgrade_locked(conn: Connection, label: str, target: str) -> None:
    """Downgrade inside the caller's write transaction (for tests and operators)."""
    validate(inspect_schema(conn), label)
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, target)


def _database_from_context(context: Any) -> str:
    cfg: Config = context.config
    x_args = context.get_x_argument(as_dictionary=True)
    return str(
        cfg.attributes.get("database")
        or x_args.get("database")
        or os.environ.get("SESSIONSTORE_DATABASE")
        or "sessions.db"
    )


def run_env(context: Any) -> None:
    """The body of ``migrations/env.py``.

    In-process (the library or the CLI), the caller hands its connection in through
    ``config.attributes["connection"]``, already inside a write transaction. From the
    ``alembic`` command line, the database comes from ``-x database=...``, else
    ``SESSIONSTORE_DATABASE``, else ``sessions.db``, and is opened through the same
    :class:`~sessionstore.store.SessionStore` as the library uses.
    """
    from . import schema

    connection = context.config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=schema.metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    database = _database_from_context(context)
    if context.is_offline_mode():
        from .store import database_url

        context.configure(
            url=database_url(database).set(drivername="sqlite"),
            target_metadata=schema.metadata,
            literal_binds=True,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_online(context, database))


async def _run_online(context: Any, database: str) -> None:
    from . import schema
    from .store import SessionStore

    store = SessionStore(database)
    await store.open(upgrade=False)
    try:

        def work(conn: Connection) -> None:
            validate(inspect_schema(conn), store.label)
            context.configure(
                connection=conn, target_metadata=schema.metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()

        async with store.guard(), store.engine.begin() as conn:
            await conn.run_sync(work)
    finally:
        await store.close()
