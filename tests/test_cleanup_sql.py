"""Cleanup is an indexed DELETE against the raw ``last_activity`` column."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from sessionstore import SessionManager
from sessionstore.schema import sessions
from sessionstore.store import SessionStore


async def _plan(manager: SessionManager, stmt: Any) -> list[str]:
    engine = manager.store.engine
    compiled = stmt.compile(dialect=engine.dialect)
    params = tuple(compiled.params[name] for name in compiled.positiontup)
    async with manager.store.reader.connect() as conn:
        rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", params)
        return [str(row[-1]) for row in rows]


async def test_cleanup_delete_uses_last_activity_index(manager: SessionManager) -> None:
    stmt = SessionStore.expired_chunk_statement("sqlite", cutoff=1000.0, chunk=500)
    sql = str(stmt.compile(dialect=manager.store.engine.dialect))
    assert "sessions.last_activity < ?" in sql  # the raw column, a bound parameter
    plan = await _plan(manager, stmt)
    assert any("INDEX ix_sessions_last_activity (last_activity<?)" in step for step in plan), plan
    # Each victim is deleted by its rowid, not looked up again by session_id.
    assert any("INTEGER PRIMARY KEY (rowid=?)" in step for step in plan), plan
    assert not any(step.startswith("SCAN sessions") for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan  # index order, no sort


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
