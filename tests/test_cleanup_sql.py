"""Cleanup is an indexed DELETE against the raw ``last_activity`` column."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

import sessionstore.store as store_module
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
