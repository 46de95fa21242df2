"""Cleanup is an indexed DELETE against the raw ``last_activity`` column."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, bindparam, delete, func, insert, literal_column, select
from sqlalchemy.engine import Dialect, make_url

import sessionstore.store as store_module
from sessionstore import SessionManager
from sessionstore.schema import sessions
from sessionstore.store import SessionStore
from tests.conftest import _pg_admin
from tests.helpers import wait_until


async def _plan(manager: SessionManager, stmt: Any) -> list[str]:
    engine = manager.store.engine
    compiled = stmt.compile(dialect=engine.dialect)
    params = tuple(compiled.params[name] for name in compiled.positiontup)
    async with manager.store.reader.connect() as conn:
        rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
        return [str(row[-1]) for row in rows]


async def test_cleanup_delete_uses_last_activity_index(manager: SessionManager) -> None:
    # SQLite's chunk DELETE: one range of the last_activity index, up to the chunk's
    # last row in (last_activity, rowid) order.
    stmt = SessionStore.expire_upto_statement(last_activity=1000.0, rowid=7)
    sql = str(stmt.compile(dialect=manager.store.engine.dialect))
    assert "(sessions.last_activity, rowid) <= (?, ?)" in sql  # the raw column, bound
    plan = await _plan(manager, stmt)
    assert any("INDEX ix_sessions_last_activity (last_activity<?)" in step for step in plan), plan
    assert not any(step.startswith("SCAN sessions") for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan


async def test_the_chunk_bound_is_one_primary_key_look_up(manager: SessionManager) -> None:
    make, _order = store_module._DRIVER_SQL["expiry_of"]
    stmt = make("sqlite")
    plan = await _plan(manager, stmt)
    assert any("INDEX sqlite_autoindex_sessions_1 (session_id=?)" in step for step in plan), plan


async def test_the_rows_read_before_a_chunk_come_from_the_index_unsorted(
    manager: SessionManager,
) -> None:
    stmt = SessionStore.expiring_statement(cutoff=1000.0, chunk=500)
    plan = await _plan(manager, stmt)
    assert any("INDEX ix_sessions_last_activity (last_activity<?)" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan


async def test_wrapping_the_column_would_lose_the_index(manager: SessionManager) -> None:
    # The counter-example that shows the plan check above can fail.
    stmt = select(sessions.c.session_id).where(func.abs(sessions.c.last_activity) < 1000.0)
    plan = await _plan(manager, stmt)
    assert any(step.startswith("SCAN sessions") for step in plan), plan


async def test_live_count_for_the_limit_uses_the_index(manager: SessionManager) -> None:
    stmt = select(func.count()).where(sessions.c.last_activity >= 1000.0)
    plan = await _plan(manager, stmt)
    assert any("ix_sessions_last_activity" in step for step in plan), plan


def _rows(db_path: Path, sql: str) -> list[Any]:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute(sql).fetchall()


async def test_a_chunk_ends_inside_a_run_of_equal_times(
    manager: SessionManager, db_path: Path
) -> None:
    # One group commit gives all its creates the same time: a chunk boundary falls
    # inside such runs, and the chunk must be exactly its first rows in rowid order.
    await manager.recovered()  # its own start-up cleanup has run
    now = manager.now()
    cutoff = now - 10  # the chunks' own; the manager's is now - 60: its rows stay live
    times = [cutoff - 2] * 6 + [cutoff - 1] * 6 + [now] * 3

    def fill(conn: Connection) -> None:
        conn.execute(
            insert(sessions),
            [
                {"session_id": f"s{i:02}", "created_at": t, "last_activity": t, "data": "{}"}
                for i, t in enumerate(times)
            ],
        )
        SessionStore.store_token(conn, "s03", "h03", now=now)

    await manager.store.write(fill)
    order = [sid for (sid,) in _rows(db_path, "SELECT session_id FROM sessions ORDER BY rowid")]

    def chunk(rows: int) -> Any:
        return lambda conn: SessionStore.delete_expired_chunk(conn, cutoff, rows, now=now)

    assert await manager.store.write(chunk(4)) == order[:4]
    assert await manager.store.write(chunk(4)) == order[4:8]  # from one time into the next
    assert await manager.store.write(chunk(100)) == order[8:12]  # the rest, then none
    assert await manager.store.write(chunk(100)) == []
    assert [r[0] for r in _rows(db_path, "SELECT session_id FROM sessions")] == order[12:]
    assert _rows(db_path, "SELECT token_hash, session_id, reason FROM session_tombstones") == [
        ("h03", "s03", "expired")
    ]


async def test_a_chunk_that_deletes_other_rows_than_it_read_is_rolled_back(
    manager: SessionManager, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await manager.recovered()  # its own start-up cleanup has run
    now = manager.now()  # rows live for the manager, expired for the chunk's cutoff

    def fill(conn: Connection) -> None:
        conn.execute(
            insert(sessions),
            [
                {
                    "session_id": f"s{i}",
                    "created_at": now - 5,
                    "last_activity": now - 5,
                    "data": "{}",
                }
                for i in range(5)
            ],
        )
        SessionStore.store_token(conn, "s1", "h1", now=now)

    await manager.store.write(fill)
    real = store_module._run_driver_sql

    def one_more(conn: Connection, name: str, params: Any) -> int:
        return real(conn, name, params) + (name == "expire_upto")

    monkeypatch.setattr(store_module, "_run_driver_sql", one_more)
    with pytest.raises(RuntimeError, match="deleted 4 rows, read 3"):
        await manager.store.write(
            lambda conn: SessionStore.delete_expired_chunk(conn, now, 3, now=now)
        )
    assert len(_rows(db_path, "SELECT session_id FROM sessions")) == 5  # nothing deleted
    assert _rows(db_path, "SELECT * FROM session_tombstones") == []


# ----- PostgreSQL: the chunk DELETE's plan, generic as well as custom -----


@pytest.fixture
async def pg_sessions(postgres_url: str) -> AsyncIterator[tuple[Any, Dialect]]:
    """A migrated database of 50,000 analysed sessions: an asyncpg connection to it,
    and the dialect sessionstore compiles its statements with there."""
    import asyncpg

    url = make_url(postgres_url)
    await _pg_admin(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
    async with SessionManager(postgres_url, background_tasks=False) as manager:
        dialect = manager.store.engine.dialect
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        await conn.execute(
            "INSERT INTO sessions (session_id, created_at, last_activity, data, version) "
            "SELECT 's' || i, i, i, '{}', 1 FROM generate_series(1, 50000) AS i"
        )
        await conn.execute("ANALYZE sessions")
        yield conn, dialect
    finally:
        await conn.close()


async def _pg_plans(
    pg: tuple[Any, Dialect], sql: str, chunks: list[int], args: str = "25000.0, {rows}"
) -> dict[str, list[str]]:
    """The plans of ``sql`` prepared as asyncpg prepares it: generic, and custom ones.

    ``args`` are its arguments for a chunk of ``rows`` (a cutoff halfway up the table).
    """
    conn, _dialect = pg
    await conn.execute(f"PREPARE chunk_delete AS {sql}")
    plans: dict[str, list[str]] = {}
    try:
        for mode in ("force_generic_plan", "force_custom_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for rows in chunks:
                # EXPLAIN without ANALYZE: planned, not run, so nothing is deleted.
                plan = await conn.fetch(f"EXPLAIN EXECUTE chunk_delete({args.format(rows=rows)})")
                plans[f"{mode} {rows}"] = [r[0] for r in plan]
    finally:
        await conn.execute("DEALLOCATE chunk_delete")
        await conn.execute("RESET plan_cache_mode")
    return plans


async def test_the_postgresql_chunk_delete_never_scans_the_table(
    pg_sessions: tuple[Any, Dialect],
) -> None:
    # PostgreSQL may switch a prepared statement to its generic plan after five runs,
    # and chunks grow to 100,000 rows: in every plan the victims come from the
    # last_activity index and are deleted by address, never by a scan of every row.
    sql = store_module._driver_sql(pg_sessions[1], "expire")  # the text the store runs
    plans = await _pg_plans(pg_sessions, sql, [500, 10_000, 100_000], "25000.0, {rows}, 25000.0")
    for name, plan in plans.items():
        text = "\n".join(plan)
        assert "Tid Scan on sessions" in text, (name, text)
        assert "Index Scan using ix_sessions_last_activity" in text, (name, text)
        assert "Seq Scan" not in text, (name, text)


async def test_choosing_chunk_rows_by_id_would_scan_the_table(
    pg_sessions: tuple[Any, Dialect],
) -> None:
    # The counter-example that shows the check above can fail: the statement
    # sessionstore used until 2026-11-25, whose generic plan (on PostgreSQL 15's cost
    # estimates) hashed every row of the table.
    victims = (
        select(sessions.c.session_id)
        .where(sessions.c.last_activity < bindparam("cutoff"))
        .limit(bindparam("chunk"))
        .offset(literal_column("0"))
    )
    stmt = (
        delete(sessions)
        .where(sessions.c.session_id.in_(victims.scalar_subquery()))
        .returning(sessions.c.session_id, sessions.c.token_hash)
    )
    sql = str(stmt.compile(dialect=pg_sessions[1]))
    plans = await _pg_plans(pg_sessions, sql, [500])
    assert "Seq Scan on sessions" in "\n".join(plans["force_generic_plan 500"])


async def test_a_row_touched_while_its_chunk_waits_for_it_is_spared(
    pg_sessions: tuple[Any, Dialect], postgres_url: str
) -> None:
    # Another transaction holds row s5 (expired) and makes it live; the chunk that
    # picked it waits for that row, then judges it on the version it finds.
    import asyncpg

    conn, dialect = pg_sessions
    url = make_url(postgres_url)
    other = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        touch = other.transaction()
        await touch.start()
        await other.execute("UPDATE sessions SET last_activity = 99999 WHERE session_id = 's5'")
        sql = store_module._driver_sql(dialect, "expire")
        chunk = asyncio.create_task(conn.fetch(sql, 100.0, 10, 100.0))  # s1..s10

        async def chunk_waits() -> bool:
            return bool(
                await other.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM sessions%'"
                )
            )

        await wait_until(chunk_waits)
        await touch.commit()
        deleted = sorted(row[0] for row in await chunk)
        assert deleted == sorted(f"s{i}" for i in range(1, 11) if i != 5)
        assert (
            await conn.fetchval("SELECT last_activity FROM sessions WHERE session_id = 's5'")
            == 99999
        )
    finally:
        await other.close()
